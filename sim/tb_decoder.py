"""cocotb testbench of a generated decoder: a driver, monitors, a model on golden/ and a scoreboard.

Run through sim/runner.py (it builds the Verilog and passes the plan). The plan
(JSON file named by ``SOP_SIM_PLAN``) carries the configuration
(``"decoder"``: ``DecoderConfig.describe()``, rebuilt here with
``from_description``, so a configuration made at run time simulates too) and
the jobs (sim/stimulus.py ``plan_jobs``):

* ``vectors``: a vector directory written by `sop vectors` (real quantized layers);
* ``random``: random layers (random LUTs, headers, codes, offsets);
* ``corners``: every code x bank x sign x scale extreme at offsets -128, 0, 127;
* ``reset``: a layer cut off by a reset mid-stream, then a fresh one;
* ``sparse`` (a configuration with residuals): layers with every pattern of sparse entries
  (sim.stimulus.with_sparse: bursts of a whole beat, block and beat boundaries, the first
  and last value, the swap beat, residuals that cancel, flip the sign, saturate or break
  ties), layers without entries between them. The sparse stream goes beside the beats
  (each layer's entries after its swap beat), with random gaps; the ``sparse_error`` bits
  must stay clear.

Structure (cocotb's ``examples/matrix_multiplier``)::

    stimulus.host_sequence ─▶ HostDriver ─▶ DUT ─▶ OutputMonitor (values.ready: random stalls)
                                  InputMonitor ─┘         │ each output beat as it arrives
                                      │ load, offset,      ▼
                                      │ beats, reset ─▶ DecoderModel (golden/) ─▶ Scoreboard (in order)

* ``HostDriver`` drives the host side from ``stimulus.host_sequence``, the
  same host-sequence driver the amaranth.sim harness (tests/hdl_harness.py)
  consumes: tables loaded into the inactive page while the current layer
  streams, a swap on each layer's first beat, random input idles, the reset.
* ``InputMonitor`` observes every handshake on the input side (table and
  offset writes, accepted beats, reset) at each clock edge, as transactions.
* ``DecoderModel`` (sim/model.py) turns them into the output beats owed, from
  golden/ only; the ``Scoreboard`` queues them in order.
* ``OutputMonitor`` drives ``values.ready`` with random stalls and hands each
  output beat taken to the ``Scoreboard``, which compares it at once with the
  next beat owed (a mismatch is logged with its beat and lane as it happens);
  an output beat nobody owes is an error, and a reset drops what was owed; ``values.valid``
  at X or Z while ``values.ready`` is high is an error too (each such cycle a mismatch,
  the first logged with its cycle).
* ``Testbench`` wires them and runs the jobs: each job's host sequence (which
  must end within a cycle bound: a decoder that stops taking input fails the
  test, it does not hang it), then the drain (every owed beat must come within
  a cycle bound), then a quiet
  window in which nothing more may come out. One clock loop calls each
  component's phase every cycle: in ReadOnly before the edge the monitors
  sample what the edge takes (output first, so a reset never races an output
  beat) and the driver sees whether its beat is taken; after the edge the
  driver drives its next cycle and the output side its ``ready``. (A
  coroutine per component would cost cocotb two more awaits a cycle each,
  the regression's main cost.)

For vector jobs the files' expected values must agree with golden too. The
random seed is the plan's ``seed`` (the runner's ``--seed``, else a new one; printed): the layers
are drawn from one stream of it and the idles and stalls from another (``stimulus.seeded_rngs``),
so a failure reproduces with ``--seed`` and a test can rebuild the layers from the seed. A summary
(values checked, mismatches, coverage of the blocks whose output was checked, and its bitmap) is
written to ``SOP_SIM_REPORT``.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import Event, ReadOnly, RisingEdge, with_timeout
from cocotb.types import Logic

from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.hdl.sparse_merge import ERRORS
from sop.sim import CLOCK_NS, MISMATCHES_LOGGED, QUIET_CYCLES, read_plan, stimulus, write_report
from sop.sim.model import DecoderModel
from sop.sim.stimulus import HostCycle
from sop.sim.vectors import read_vectors

#: a job's host sequence may take this many cycles per unit (a table write, an input beat, a sparse
#: entry) plus SEQUENCE_SLACK: at the plans' idle and stall rates it takes about 2
SEQUENCE_CYCLES_PER_UNIT, SEQUENCE_SLACK = 100, 10_000
ONE, ZERO = Logic(1), Logic(0)   # a 1-bit value read from the DUT is one of these (Logic is interned)


class HostDriver:
    """The host side of the DUT (``blocks``, ``load``, ``offset``, ``rst``), one ``HostCycle`` a cycle
    from a host sequence (stimulus.host_sequence); ``done`` is set when it has run out."""

    def __init__(self, dut, cfg: DecoderConfig):
        self.dut, self.cfg = dut, cfg
        self.k = cfg.layout.code_bits
        self.sequence = None
        self.cycle: HostCycle | None = None
        self.taken = self.entry_taken = False
        self.done = Event()
        self._driven: dict[str, int] = {}

    def start(self, sequence) -> None:
        """Drive ``sequence`` from the next clock edge on."""
        self.sequence, self.cycle, self.taken = sequence, None, False
        self.done.clear()

    def _put(self, name: str, value: int) -> None:
        """Write a DUT input only when it changes (a write costs the simulator, even of the same value)."""
        if self._driven.get(name) != value:
            self._driven[name] = value
            getattr(self.dut, name).value = value

    def apply(self, cycle: HostCycle) -> None:
        w = cycle.write
        lut = w is not None and w[0] == "lut"
        if lut:
            _, bank, addr, value = w
            self._put("load__payload", bank | (addr << 1) | (value << (1 + self.k)))
        self._put("load__valid", int(lut))
        offset = w is not None and w[0] == "offset"
        if offset:
            self._put("offset", w[1] & 0xFF)
            if self.cfg.residuals:
                self._put("layer_sparse", w[2])
        self._put("offset_we", int(offset))
        if self.cfg.residuals:
            if cycle.entry is not None:
                index, value, last = cycle.entry
                self._put("sparse__payload", index | (value << 32) | (last << 48))
            self._put("sparse__valid", int(cycle.entry is not None))
        if cycle.beat is not None:
            self._put("blocks__payload", cycle.beat | (int(cycle.swap) << self.cfg.beat_bits))
        self._put("blocks__valid", int(cycle.beat is not None))
        self._put("rst", int(cycle.reset))

    def sample(self) -> None:
        """Before the edge: is the beat offered taken (and the sparse entry offered)?"""
        self.taken = self.cycle is not None and self.cycle.beat is not None and self.dut.blocks__ready.value is ONE
        self.entry_taken = (self.cfg.residuals and self.cycle is not None and self.cycle.entry is not None
                            and self.dut.sparse__ready.value is ONE)

    def step(self) -> None:
        """After the edge: tell the sequence, drive its next cycle."""
        if self.sequence is None:
            return
        reply = (self.taken, self.entry_taken) if self.cfg.residuals else self.taken
        try:
            self.cycle = next(self.sequence) if self.cycle is None else self.sequence.send(reply)
        except StopIteration:
            self.sequence, self.cycle = None, None
            self.apply(HostCycle())
            self.done.set()
            return
        self.apply(self.cycle)


class InputMonitor:
    """Every input-side transaction at each clock edge, to ``sink``: ``reset()``, ``beat(blocks,
    swap)``, ``write(bank, addr, code)``, ``set_offset(value, layer_sparse)``, ``entry(index,
    value)`` (a sparse entry taken; DecoderModel's order: at one edge the beat comes before the
    writes and the entry, and a reset replaces everything else)."""

    def __init__(self, dut, cfg: DecoderConfig, sink):
        self.dut, self.cfg, self.sink = dut, cfg, sink
        k = cfg.layout.code_bits
        self._addr_mask, self._data_shift = (1 << k) - 1, 1 + k
        self._beat_bits = cfg.beat_bits
        self._beat_mask = (1 << cfg.beat_bits) - 1

    def sample(self) -> None:
        """Before the edge (ReadOnly): what the edge will take."""
        d, sink = self.dut, self.sink
        if d.rst.value is ONE:
            sink.reset()
            return
        if d.blocks__valid.value is ONE and d.blocks__ready.value is ONE:
            word = int(d.blocks__payload.value)
            sink.beat(word & self._beat_mask, bool(word >> self._beat_bits))
        if d.load__valid.value is ONE and d.load__ready.value is ONE:
            word = int(d.load__payload.value)
            sink.write(word & 1, (word >> 1) & self._addr_mask, word >> self._data_shift)
        if d.offset_we.value is ONE:
            if self.cfg.residuals:
                sink.set_offset(int(d.offset.value), int(d.layer_sparse.value))
            else:
                sink.set_offset(int(d.offset.value))
        if self.cfg.residuals and d.sparse__valid.value is ONE and d.sparse__ready.value is ONE:
            word = int(d.sparse__payload.value)
            sink.entry(word & 0xFFFFFFFF, (word >> 32) & 0xFFFF)


class OutputMonitor:
    """The output side: drives ``values.ready`` (stalls with probability ``p_stall``, none while
    ``stalled`` or ``always_ready``) and passes every output beat taken to ``sink(payload)``. While
    ``ready`` is high, ``values.valid`` at X or Z is an error (a beat may hide behind it): each such
    cycle is counted in ``x_valid``, the first passed to ``on_x(valid)``."""

    def __init__(self, dut, rng: np.random.Generator, p_stall: float, sink, on_x=None):
        self.dut, self.rng, self.p_stall, self.sink, self.on_x = dut, rng, p_stall, sink, on_x
        self.stalled = False                    # held low (output owed before a reset)
        self.always_ready = False               # the quiet window: anything that comes is taken
        self.ready = False
        self.x_valid = 0                        # cycles with values.ready high and values.valid X or Z

    def drive(self) -> None:
        """After the edge: ``values.ready`` for the cycle to come."""
        ready = not self.stalled and (self.always_ready or self.rng.random() >= self.p_stall)
        if ready != self.ready:                 # written only when it changes
            self.dut.values__ready.value = int(ready)
            self.ready = ready

    def sample(self) -> None:
        """Before the edge (ReadOnly): an output beat taken at it goes to the sink (None when
        it has X or Z bits); ``values.valid`` neither 0 nor 1 is counted (two identity tests a cycle)."""
        if self.ready:
            valid = self.dut.values__valid.value
            if valid is ONE:
                try:
                    payload = int(self.dut.values__payload.value)
                except ValueError:              # X or Z bits (cheaper than is_resolvable bit by bit)
                    payload = None
                self.sink(payload)
            elif valid is not ZERO:
                self.x_valid += 1
                if self.x_valid == 1 and self.on_x is not None:
                    self.on_x(valid)


class Scoreboard:
    """In-order, streaming: the model's output beats are queued as the input monitor sees their
    input beats; each output beat is compared as it arrives with the next one owed."""

    def __init__(self, cfg: DecoderConfig, log):
        self.cfg, self.log = cfg, log
        self.lane_bits = reference.lane_word_bits(cfg)
        self.owed: collections.deque = collections.deque()   # (output beat, input beat record, last?)
        self.checked = self.mismatches = self.beats_seen = 0
        self.coverage = stimulus.Coverage(cfg)

    def expect(self, outputs: list[int], blocks: tuple) -> None:
        for i, out in enumerate(outputs):
            self.owed.append((out, blocks, i == len(outputs) - 1))

    def flush(self) -> None:
        """A reset: the output owed is lost (its beats were cut off)."""
        self.owed.clear()

    def compare(self, got: int | None) -> None:
        """One output beat as it arrives (``None``: it had X or Z bits)."""
        n = self.cfg.lanes
        index, self.beats_seen = self.beats_seen, self.beats_seen + 1
        if not self.owed:
            self.log.error(f"output beat {index}: {got if got is None else hex(got)} came with nothing owed "
                           f"(more output than input)")
            self.mismatches += n
            return
        want, blocks, last = self.owed.popleft()
        if callable(want):                       # a beat of a sparse layer: its entries are in by now
            want = want()
        self.checked += n
        if last:
            self.coverage.add(*blocks)
        if got == want:
            return
        if got is None:
            self.log.error(f"output beat {index}: X or Z bits, expected {want:#x}")
            self.mismatches += n
            return
        w = self.lane_bits
        mask = (1 << w) - 1
        bad = [lane for lane in range(n) if (got >> (lane * w)) & mask != (want >> (lane * w)) & mask]
        if self.mismatches < MISMATCHES_LOGGED:
            lane = bad[0]
            self.log.error(f"output beat {index} lane {lane}: got {(got >> (lane * w)) & mask:#x}, "
                           f"expected {(want >> (lane * w)) & mask:#x} ({len(bad)} of {n} lanes differ)")
        self.mismatches += len(bad)

    def missing(self) -> None:
        """The owed beats that never came (the decoder stopped)."""
        if self.owed:
            self.log.error(f"{len(self.owed)} output beats never came")
            self.mismatches += len(self.owed) * self.cfg.lanes
            self.owed.clear()


class ModelFeed:
    """The input monitor's sink: each transaction into the model; a beat's outputs to the scoreboard."""

    def __init__(self, model: DecoderModel, scoreboard: Scoreboard, on_reset=None):
        self.model, self.scoreboard, self.on_reset = model, scoreboard, on_reset
        self.write, self.set_offset, self.entry = model.write, model.set_offset, model.entry

    def reset(self) -> None:
        self.model.reset()
        self.scoreboard.flush()
        if self.on_reset is not None:
            self.on_reset()

    def beat(self, blocks: int, swap: bool) -> None:
        outputs = self.model.beat(blocks, swap)
        self.scoreboard.expect(outputs, self.model.last)


class Testbench:
    """The components wired; one clock loop calls their phases each cycle (before the edge:
    output monitor, input monitor, driver's sample; after it: driver, output ready), in that
    order, so a reset never races an output beat, and cocotb schedules two awaits a cycle, not
    one pair per component."""

    def __init__(self, dut, cfg: DecoderConfig, timing: np.random.Generator, p_idle: float, p_stall: float):
        self.dut, self.cfg, self.timing, self.p_idle = dut, cfg, timing, p_idle
        self.scoreboard = Scoreboard(cfg, dut._log)
        self.driver = HostDriver(dut, cfg)
        self.model = ModelFeed(DecoderModel(cfg), self.scoreboard, on_reset=self._after_reset)
        self.input_monitor = InputMonitor(dut, cfg, self.model)
        self.output_monitor = OutputMonitor(dut, timing, p_stall, self.scoreboard.compare, on_x=self._x_valid)
        self.cycles = 0
        self._task = None

    def _x_valid(self, valid) -> None:
        self.dut._log.error(f"values.valid is {valid} at cycle {self.cycles} with values.ready high (a beat may "
                            f"hide behind it; every such cycle counts as a mismatch)")

    def _after_reset(self) -> None:
        self.output_monitor.stalled = False     # what was owed is gone: the output may flow again

    async def _clock(self) -> None:
        d, out, inp, drv = self.dut, self.output_monitor, self.input_monitor, self.driver
        while True:
            await ReadOnly()
            out.sample()
            inp.sample()
            drv.sample()
            await RisingEdge(d.clk)
            self.cycles += 1
            drv.step()
            out.drive()

    def start(self) -> None:
        self._task = cocotb.start_soon(self._clock())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def reset(self, cycles: int = 2) -> None:
        self.driver.apply(HostCycle(reset=True))
        for _ in range(cycles):
            await RisingEdge(self.dut.clk)
        self.driver.apply(HostCycle())

    async def run(self, job: stimulus.Job) -> None:
        """One job: its host sequence, the drain of every owed beat, a quiet window."""
        out = self.output_monitor
        out.stalled = job.cut_after is not None         # the cut layer's output stays in the decoder
        self.driver.start(stimulus.host_sequence(self.cfg, job.layers, self.timing, p_idle=self.p_idle,
                                                 cut_after=job.cut_after))
        units = sum(L.luts.size + 1 + L.codes.size // self.cfg.lanes + len(L.sparse_index) for L in job.layers)
        bound = SEQUENCE_CYCLES_PER_UNIT * units + SEQUENCE_SLACK
        try:
            await with_timeout(self.driver.done.wait(), bound * CLOCK_NS, "ns")
        except TimeoutError:            # cocotb's SimTimeoutError: the decoder stopped taking input
            raise AssertionError(f"job {job.kind}: the host sequence ran past {bound} cycles (the decoder "
                                 f"stopped taking its input)") from None
        out.stalled = False
        limit = self.cycles + 100 * len(self.scoreboard.owed) + 10_000
        while self.scoreboard.owed and self.cycles < limit:
            await RisingEdge(self.dut.clk)
        self.scoreboard.missing()
        out.always_ready = True
        for _ in range(QUIET_CYCLES):
            await RisingEdge(self.dut.clk)
        out.always_ready = False


def check_vector_expectations(cfg: DecoderConfig, vectors_dir: Path) -> None:
    """The vector files' expected values must be golden's (they are written from golden)."""
    from sop.golden.decoder import product_fields
    from sop.hdl.residual import expected_words
    for v in read_vectors(vectors_dir):
        if cfg.output == "bf16":
            want = expected_words(cfg, v.luts, v.offset, v.headers, v.codes, v.sparse_index, v.sparse_values)
            assert np.array_equal(want, v.expected_bf16), f"{v.name}: BF16 vector file disagrees with golden"
        else:
            sign, sig, exp, _ = product_fields(cfg.hif, v.luts, cfg.layout, v.offset, v.headers, v.codes)
            got = np.stack([sign.ravel(), exp.ravel(), sig.ravel()], axis=1)
            assert np.array_equal(got, v.expected_exact), f"{v.name}: exact vector file disagrees with golden"


@cocotb.test()
async def regression(dut):
    plan = read_plan()
    cfg = DecoderConfig.from_description(plan["decoder"])
    seed = plan["seed"]
    dut._log.info(f"config {cfg.name}, random seed {seed} (rerun: --seed {seed})")
    content, timing = stimulus.seeded_rngs(seed)
    jobs = stimulus.plan_jobs(cfg, plan, content)
    for job in plan["jobs"]:
        if job["kind"] == "vectors":
            check_vector_expectations(cfg, Path(job["dir"]))
    tb = Testbench(dut, cfg, timing, plan.get("p_idle", 0.2), plan.get("p_stall", 0.2))
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    tb.driver.apply(HostCycle())
    dut.load__payload.value = 0
    dut.offset.value = 0
    dut.blocks__payload.value = 0
    dut.values__ready.value = 0
    if cfg.residuals:
        dut.sparse__payload.value = 0
        dut.layer_sparse.value = 0
    tb.start()
    await tb.reset()
    t0 = time.time()
    for job in jobs:
        await tb.run(job)
    tb.stop()
    sb = tb.scoreboard
    hit, total = sb.coverage.counts
    # a good stream sets no sparse error bit (each bit is the hardware's verdict on its input)
    errors = {name: int(str(dut.sparse_error.value)[::-1][i]) for i, name in enumerate(ERRORS)} \
        if cfg.residuals else {}
    if any(errors.values()):
        dut._log.error(f"sparse_error set on a good stream: {errors}")
        sb.mismatches += 1
    x_valid = tb.output_monitor.x_valid         # values.valid X or Z while ready (logged at the first)
    sb.mismatches += x_valid
    summary = {"config": cfg.name, "lutram_depth": cfg.lutram_depth, "seed": seed, "checked": sb.checked,
               "mismatches": sb.mismatches, "coverage_hit": hit, "coverage_bins": total,
               "coverage_map": sb.coverage.bitmap(), "sparse_errors": errors, "x_valid_cycles": x_valid,
               "sparse_entries": sum(len(layer.sparse_index) for job in jobs for layer in job.checked),
               "seconds": time.time() - t0}
    write_report(summary)
    dut._log.info(f"{cfg.name}: {sb.checked} vectors checked, {sb.mismatches} mismatches, "
                  f"coverage {hit}/{total} = {hit / total:.3f}")
    assert sb.mismatches == 0, f"{sb.mismatches} mismatching values"
