"""cocotb testbench of the AXI4-Stream shell (hdl/axis.py, ``NAME_axis.v``) with cocotbext-axi's BFMs.

Run through sim/runner.py (``run_axis``; `make sim`, tests/test_axis.py). The
plan (``SOP_SIM_PLAN``) carries the configuration and the jobs, as for
sim/tb_decoder.py; its layers come from ``stimulus.plan_jobs`` (random layers,
the corner layers, real MiniLM vectors), their expected output from
``hdl.axis.model`` (golden/ only)::

    AxiStreamSource s_axis_load   ─▶ ┐
    AxiStreamSource s_axis        ─▶ DUT ─▶ m_axis ─▶ AxiStreamSink ─▶ per layer: bytes == model's
    AxiStreamSource s_axis_sparse ─▶ ┘   └─▶ ProtocolMonitor (m_axis: AXI4-Stream rules, every cycle)
    (with residuals)

* Every layer is one load packet (hdl.axis.load_beats: table words, then the
  offset word with TLAST) and one block packet (hdl.axis.block_beats: TLAST on
  its last beat); all of a job's packets are queued at once, so the loads of
  layer ``L + 1`` run beside layer ``L``'s blocks and the shell's own
  sequencing (hdl/axis.py) is what keeps them apart.
* With residuals (a ``-sp`` configuration): each layer with sparse entries has the
  ``CTRL_SPARSE`` bit on its offset word and one packet on ``s_axis_sparse``
  (hdl.axis.sparse_beats: index and BF16 value, TLAST on the last entry), queued
  with the rest, so the shell alone holds it until its layer's first beat; the
  expected values are golden's residual sums (hdl.residual.expected_words), and
  ``sparse_error`` must read 0 at the end. ``load_error`` must read 0 at the end (every configuration).
* The sources pause at random (TVALID gaps, ``p_idle``), the sink too (TREADY
  low, ``p_stall``); the pause generators draw from the plan's ``seed`` (``--seed``).
* Each output packet (the beats up to TLAST) must be exactly the model's bytes
  for its layer: a misplaced TLAST makes packets of the wrong length, a wrong
  value a wrong byte; mismatches are logged with beat and lane.
* ``ProtocolMonitor`` samples ``m_axis`` every cycle (ReadOnly): while TVALID
  is high and TREADY low, TVALID, TDATA and TLAST must hold to the next cycle;
  TVALID is never X or Z after reset.

Summary (``SOP_SIM_REPORT``): values and output beats checked, layers,
sparse entries, mismatches, protocol errors, the ``sparse_error`` bits, ``load_error``, cycles, seed.
"""

from __future__ import annotations

import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge, with_timeout
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource

from sop.hdl import axis, reference
from sop.hdl.config import DecoderConfig
from sop.hdl.sparse_merge import ERRORS
from sop.sim import CLOCK_NS, MISMATCHES_LOGGED, read_plan, stimulus, write_report


def pauses(rng: np.random.Generator, p: float):
    """A pause generator: ``True`` (paused) with probability ``p`` each cycle."""
    while True:
        yield bool(rng.random() < p)


class ProtocolMonitor:
    """AXI4-Stream rules on a master interface the DUT drives (``prefix``): a beat offered
    (TVALID high) stays, with the same TDATA and TLAST, until its handshake."""

    def __init__(self, dut, prefix: str):
        self.dut, self.prefix = dut, prefix
        self.tvalid, self.tready = getattr(dut, f"{prefix}_tvalid"), getattr(dut, f"{prefix}_tready")
        self.tdata, self.tlast = getattr(dut, f"{prefix}_tdata"), getattr(dut, f"{prefix}_tlast")
        self.errors, self.cycles, self.stalls = 0, 0, 0
        self.enabled = False

    def error(self, msg: str) -> None:
        if self.errors < MISMATCHES_LOGGED:
            self.dut._log.error(f"{self.prefix} cycle {self.cycles}: {msg}")
        self.errors += 1

    async def run(self) -> None:
        held = None                               # (tdata, tlast) of a beat offered and not taken
        while True:
            await RisingEdge(self.dut.aclk)
            await ReadOnly()
            self.cycles += 1
            if not self.enabled:
                held = None
                continue
            if not self.tvalid.value.is_resolvable:
                self.error(f"TVALID is {self.tvalid.value}")
                held = None
                continue
            valid = bool(self.tvalid.value)
            if held is not None:
                if not valid:
                    self.error("TVALID fell before its handshake")
                elif (str(self.tdata.value), str(self.tlast.value)) != held:
                    self.error("TDATA or TLAST changed while TVALID high and TREADY low")
            stalled = valid and not bool(self.tready.value)
            self.stalls += stalled
            held = (str(self.tdata.value), str(self.tlast.value)) if stalled else None


async def monitor_out_of_reset(dut, port: str) -> ProtocolMonitor:
    """``port``'s protocol monitor started, ``aresetn`` (low from the start) released after three
    cycles, and the monitor checking from the first cycle out of reset on; the monitor."""
    monitor = ProtocolMonitor(dut, port)
    cocotb.start_soon(monitor.run())
    for _ in range(3):
        await RisingEdge(dut.aclk)
    dut.aresetn.value = 1
    await RisingEdge(dut.aclk)
    monitor.enabled = True
    return monitor


class Scoreboard:
    """Each output packet against the model's beats for its layer."""

    def __init__(self, cfg: DecoderConfig, log):
        self.cfg, self.log = cfg, log
        self.data_bytes = axis.widths(cfg)["m_axis"] // 8
        self.lane_bytes = axis.lane_bytes(cfg)
        self.checked = self.beats = self.mismatches = self.layers = 0

    def compare(self, got: bytes, want_beats: list[tuple[int, int]], name: str) -> None:
        want = axis.to_bytes(want_beats, self.data_bytes * 8)
        n, B = self.cfg.lanes, self.data_bytes
        self.layers += 1
        if len(got) != len(want):
            self.log.error(f"layer {self.layers - 1} ({name}): packet of {len(got) // B} beats, "
                           f"expected {len(want) // B} (TLAST misplaced)")
        beats = min(len(got), len(want)) // B
        for i in range(beats):
            g, w = got[i * B:(i + 1) * B], want[i * B:(i + 1) * B]
            self.beats += 1
            self.checked += n
            if g == w:
                continue
            lb = self.lane_bytes
            bad = [ln for ln in range(n) if g[ln * lb:(ln + 1) * lb] != w[ln * lb:(ln + 1) * lb]]
            if self.mismatches < MISMATCHES_LOGGED:
                ln = bad[0]
                self.log.error(f"layer {self.layers - 1} ({name}) output beat {i} lane {ln}: got "
                               f"{g[ln * lb:(ln + 1) * lb][::-1].hex()}, expected "
                               f"{w[ln * lb:(ln + 1) * lb][::-1].hex()} ({len(bad)} of {n} lanes differ)")
            self.mismatches += len(bad)
        # beats missing from a short packet, or extra in a long one
        self.mismatches += abs(len(got) - len(want)) // B * n


@cocotb.test()
async def regression(dut):
    plan = read_plan()
    cfg = DecoderConfig.from_description(plan["decoder"])
    seed = plan["seed"]
    dut._log.info(f"config {cfg.name} (AXI4-Stream shell), random seed {seed} (rerun: --seed {seed})")
    content, timing = stimulus.seeded_rngs(seed)
    jobs = stimulus.plan_jobs(cfg, plan, content)
    p_idle, p_stall = plan.get("p_idle", 0.3), plan.get("p_stall", 0.3)

    Clock(dut.aclk, CLOCK_NS, unit="ns").start()
    dut.aresetn.value = 0
    src = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis"), dut.aclk, dut.aresetn, reset_active_level=False)
    load = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis_load"), dut.aclk, dut.aresetn,
                           reset_active_level=False)
    sink = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_axis"), dut.aclk, dut.aresetn, reset_active_level=False)
    sources = [src, load]
    if cfg.residuals:
        sparse = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis_sparse"), dut.aclk, dut.aresetn,
                                 reset_active_level=False)
        sources.append(sparse)
    for bfm in (*sources, sink):
        bfm.log.setLevel("WARNING")                       # one line per frame otherwise
    for bfm in sources:
        bfm.set_pause_generator(pauses(timing, p_idle))
    sink.set_pause_generator(pauses(timing, p_stall))
    monitor = await monitor_out_of_reset(dut, "m_axis")

    sb = Scoreboard(cfg, dut._log)
    sw, lw = axis.widths(cfg)["s_axis"], axis.widths(cfg)["s_axis_load"]
    t0 = time.time()
    entries = 0
    for job in jobs:
        if job.cut_after is not None:
            raise ValueError("the AXI4-Stream bench has no reset job (sim/tb_decoder.py covers reset)")
        for layer in job.layers:                           # every packet of the job queued at once
            await load.send(AxiStreamFrame(axis.to_bytes(axis.load_beats(cfg, layer.luts, layer.offset,
                                                                         layer.has_sparse), lw)))
            await src.send(AxiStreamFrame(axis.to_bytes(axis.block_beats(cfg, layer.headers, layer.codes), sw)))
            if layer.has_sparse:
                beats = axis.sparse_beats(layer.sparse_index, layer.sparse_values)
                await sparse.send(AxiStreamFrame(axis.to_bytes(beats, axis.SPARSE_BITS)))
                entries += len(beats)
        for layer in job.layers:
            want = axis.model(cfg, [(layer.luts, layer.offset, layer.headers, layer.codes, layer.sparse_index,
                                     layer.sparse_values)])
            budget_ns = CLOCK_NS * (100 * len(want) + 1000)
            try:
                frame = await with_timeout(sink.recv(), budget_ns, "ns")
            except TimeoutError:   # cocotb.triggers.SimTimeoutError is a TimeoutError
                dut._log.error(f"{job.kind} layer {layer.name}: no output packet within {budget_ns} ns")
                sb.mismatches += len(want) * cfg.lanes
                break
            sb.compare(bytes(frame.tdata), want, layer.name or job.kind)
    for _ in range(12):                                   # nothing more may come
        await RisingEdge(dut.aclk)
    if not sink.empty():
        dut._log.error(f"{sink.count()} output packets nobody owed")
        sb.mismatches += cfg.lanes
    errors = {}
    if cfg.residuals:
        bits = str(dut.sparse_error.value)[::-1]          # bit 0 first
        errors = {name: bits[i] for i, name in enumerate(ERRORS) if bits[i] != "0"}
        if errors:
            dut._log.error(f"sparse_error set on a good stream: {errors}")
    load_error = str(dut.load_error.value) != "0"          # X counts as set
    if load_error:
        dut._log.error("load_error set on a good stream: the shell saw a misframed load packet")
    summary = {"config": cfg.name, "lutram_depth": cfg.lutram_depth, "seed": seed, "checked": sb.checked,
               "beats": sb.beats, "layers": sb.layers, "sparse_entries": entries, "mismatches": sb.mismatches,
               "protocol_errors": monitor.errors, "sparse_errors": errors, "load_error": load_error,
               "stalled_cycles": monitor.stalls,
               "cycles": monitor.cycles, "lane_bits": reference.lane_word_bits(cfg), "seconds": time.time() - t0}
    write_report(summary)
    dut._log.info(f"{cfg.name} AXI4-Stream: {sb.checked} values in {sb.beats} beats of {sb.layers} layers checked"
                  f"{f', {entries} sparse entries' if cfg.residuals else ''}, {sb.mismatches} mismatches, "
                  f"{monitor.errors} protocol errors")
    assert sb.mismatches == 0 and monitor.errors == 0 and not errors and not load_error, \
        f"{sb.mismatches} mismatching values, {monitor.errors} protocol errors, sparse errors {errors}, " \
        f"load_error {int(load_error)}"
