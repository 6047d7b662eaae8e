"""cocotb testbench of a generated decoder: drivers, a monitor and a golden scoreboard.

Run through sim/runner.py (it builds the Verilog and passes the plan). The plan
(JSON file named by ``SOP_SIM_PLAN``) names the configuration and the jobs:

* ``vectors``: a vector directory written by `sop vectors` (real quantized layers);
* ``random``: random layers (random LUTs, headers, codes, offsets);
* ``corners``: every code x bank x sign x scale extreme at offsets -128, 0, 127;
* ``reset``: a layer cut off by a reset mid-stream, then a fresh one.

Every job's layers stream back to back with table swaps between them (the next
layer's tables are loaded while the current one streams), with random input
idles and output stalls. Expected values come only from golden/ (hdl.reference);
for vector jobs the files' expected values must agree with golden too. The
random seed is ``cocotb.RANDOM_SEED`` (printed), so a failure reproduces with
``COCOTB_RANDOM_SEED``. A summary (vectors checked, mismatches, coverage) is
written to ``SOP_SIM_REPORT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from sop.hdl import reference
from sop.hdl.config import DecoderConfig, named_configs
from sop.sim import stimulus
from sop.sim.vectors import read_vectors


class Testbench:
    def __init__(self, dut, cfg: DecoderConfig, rng: np.random.Generator, p_idle: float, p_stall: float):
        self.dut, self.cfg, self.rng = dut, cfg, rng
        self.p_idle, self.p_stall = p_idle, p_stall
        self.lane_bits = reference.lane_word_bits(cfg)
        self.checked = self.mismatches = 0
        self.layers_checked: list[stimulus.Layer] = []
        self.log = dut._log

    # -- host side -------------------------------------------------------------------------
    def _write(self, w) -> None:
        d = self.dut
        if w[0] == "lut":
            _, bank, addr, value = w
            k = self.cfg.layout.code_bits
            d.load__payload.value = bank | (addr << 1) | (value << (1 + k))
            d.load__valid.value = 1
        else:
            d.offset.value = w[1] & 0xFF
            d.offset_we.value = 1

    def _idle_writes(self) -> None:
        self.dut.load__valid.value = 0
        self.dut.offset_we.value = 0

    async def _tick(self) -> None:
        await RisingEdge(self.dut.clk)
        self._idle_writes()

    async def load(self, writes) -> None:
        self.dut.blocks__valid.value = 0
        for w in writes:
            self._write(w)
            await self._tick()

    async def send(self, beat: int, swap: bool, budget: list | None = None) -> bool:
        """Offer one beat until it is accepted (or a cycle budget runs out)."""
        d = self.dut
        d.blocks__payload.value = beat | (int(swap) << self.cfg.beat_bits)
        d.blocks__valid.value = 1
        while True:
            await ReadOnly()
            accepted = d.blocks__ready.value == 1
            await self._tick()
            if accepted:
                return True
            if budget is not None:
                budget[0] -= 1
                if budget[0] <= 0:
                    return False

    async def drive(self, layers, cut_after: int | None = None) -> None:
        """Stream ``layers``; with ``cut_after``, stop the first layer after that many beats."""
        pending: list = []
        await self.load(layers[0].writes())
        for li, layer in enumerate(layers):
            beats = reference.input_beats(self.cfg, layer.headers, layer.codes)
            cut = cut_after is not None and li == 0
            await self.load(pending)
            pending = []
            budget = [4 * cut_after * self.cfg.beats_per_block] if cut else None
            for bi, beat in enumerate(beats[:cut_after] if cut else beats):
                while self.rng.random() < self.p_idle:
                    self.dut.blocks__valid.value = 0
                    await self._tick()
                if pending:
                    self._write(pending.pop(0))
                if not await self.send(beat, bi == 0, budget):
                    break
                if bi == 0 and li + 1 < len(layers) and not cut:
                    pending = list(layers[li + 1].writes())
            self.dut.blocks__valid.value = 0
            if cut:
                return

    # -- device side -----------------------------------------------------------------------
    async def collect(self, n_beats: int) -> list[int]:
        d, got, cycles = self.dut, [], 0
        while len(got) < n_beats:
            ready = self.rng.random() >= self.p_stall
            d.values__ready.value = int(ready)
            await ReadOnly()
            if ready and d.values__valid.value == 1:
                got.append(int(d.values__payload.value))
            await RisingEdge(d.clk)
            cycles += 1
            assert cycles < 100 * n_beats + 10_000, "decoder stopped producing output"
        return got

    async def quiet(self, cycles: int = 12) -> int:
        """Output beats seen in ``cycles`` cycles after the expected ones (must be 0)."""
        extra = 0
        self.dut.values__ready.value = 1
        for _ in range(cycles):
            await ReadOnly()
            extra += int(self.dut.values__valid.value == 1)
            await RisingEdge(self.dut.clk)
        return extra

    def score(self, layers, got: list[int], extra: int) -> None:
        """Compare the output beats with golden's; ``extra`` beats came after the last one."""
        want = [self._pack(beat) for layer in layers for beat in layer.expected(self.cfg)]
        self.layers_checked += layers
        w, n = self.lane_bits, self.cfg.lanes
        mask = (1 << w) - 1
        if len(got) != len(want):
            self.log.error(f"got {len(got)} output beats, expected {len(want)}")
        for i, (g, e) in enumerate(zip(got, want)):
            if g != e:
                bad = [lane for lane in range(n) if (g >> (lane * w)) & mask != (e >> (lane * w)) & mask]
                if self.mismatches < 10:
                    lane = bad[0]
                    self.log.error(f"beat {i} lane {lane}: got {(g >> (lane * w)) & mask:#x}, "
                                   f"expected {(e >> (lane * w)) & mask:#x}")
                self.mismatches += len(bad)
        if extra:
            self.log.error(f"{extra} output beats more than the input gave")
        self.mismatches += (abs(len(got) - len(want)) + extra) * n
        self.checked += min(len(got), len(want)) * n

    def _pack(self, lanes: list[int]) -> int:
        return sum(v << (i * self.lane_bits) for i, v in enumerate(lanes))

    async def reset(self) -> None:
        d = self.dut
        d.rst.value = 1
        for _ in range(2):
            await RisingEdge(d.clk)
        d.rst.value = 0

    async def run(self, layers) -> None:
        n = sum(len(layer.expected(self.cfg)) for layer in layers)
        drive = cocotb.start_soon(self.drive(layers))
        got = await self.collect(n)
        await drive
        self.score(layers, got, await self.quiet())

    async def run_reset(self, first, second, cut_after: int) -> None:
        """Reset with a layer half streamed and the output stalled; then a fresh layer."""
        self.dut.values__ready.value = 0
        await self.drive([first], cut_after=cut_after)
        await self.reset()
        n = len(second.expected(self.cfg))
        drive = cocotb.start_soon(self.drive([second]))
        got = await self.collect(n)
        await drive
        self.score([second], got, await self.quiet())


def _job_layers(cfg, job, rng) -> list[stimulus.Layer]:
    kind = job["kind"]
    if kind == "vectors":
        layers = []
        for v in read_vectors(Path(job["dir"])):
            if v.layout != cfg.layout or v.hif != cfg.hif:
                raise ValueError(f"{job['dir']}: vectors are for another layout/HIF than {cfg.name}")
            layer = stimulus.Layer(v.luts, v.offset, *stimulus.pad_to_beats(cfg, v.headers, v.codes), v.name)
            _check_vector_expectations(cfg, v)
            layers.append(layer)
        return layers
    if kind == "random":
        return [stimulus.random_layer(cfg, rng, job.get("blocks", 32)) for _ in range(job.get("layers", 3))]
    if kind == "corners":
        return [stimulus.corner_layer(cfg, off) for off in (-128, 0, 127)]
    raise ValueError(f"unknown job kind {kind!r}")


def _check_vector_expectations(cfg: DecoderConfig, v) -> None:
    """The vector files' expected values must be golden's (they are written from golden)."""
    from sop.golden.decoder import product_fields
    if cfg.output == "bf16":
        want = reference.lane_words(cfg, v.luts, v.offset, v.headers, v.codes)
        assert np.array_equal(want, v.expected_bf16), f"{v.name}: BF16 vector file disagrees with golden"
    else:
        sign, sig, exp, _ = product_fields(cfg.hif, v.luts, cfg.layout, v.offset, v.headers, v.codes)
        got = np.stack([sign.ravel(), exp.ravel(), sig.ravel()], axis=1)
        assert np.array_equal(got, v.expected_exact), f"{v.name}: exact vector file disagrees with golden"


@cocotb.test()
async def regression(dut):
    plan = json.loads(Path(os.environ["SOP_SIM_PLAN"]).read_text())
    cfg = dataclasses.replace(named_configs()[plan["config"]], lutram_depth=plan.get("lutram_depth", 0))
    seed = cocotb.RANDOM_SEED
    dut._log.info(f"config {cfg.name}, random seed {seed} (rerun with COCOTB_RANDOM_SEED={seed})")
    rng = np.random.default_rng(seed)
    tb = Testbench(dut, cfg, rng, plan.get("p_idle", 0.2), plan.get("p_stall", 0.2))
    Clock(dut.clk, 10, unit="ns").start()
    for name in ("blocks__valid", "load__valid", "offset_we", "values__ready"):
        getattr(dut, name).value = 0
    dut.load__payload.value = 0
    dut.offset.value = 0
    dut.blocks__payload.value = 0
    await tb.reset()
    t0 = time.time()
    for job in plan["jobs"]:
        if job["kind"] == "reset":
            first = stimulus.random_layer(cfg, rng, 16)
            second = stimulus.random_layer(cfg, rng, 8)
            await tb.run_reset(first, second, cut_after=5)
        else:
            await tb.run(_job_layers(cfg, job, rng))
    hit, total = stimulus.coverage(cfg, tb.layers_checked)
    summary = {"config": cfg.name, "lutram_depth": cfg.lutram_depth, "seed": seed, "checked": tb.checked,
               "mismatches": tb.mismatches, "coverage_hit": hit, "coverage_bins": total, "seconds": time.time() - t0}
    Path(os.environ["SOP_SIM_REPORT"]).write_text(json.dumps(summary))
    dut._log.info(f"{cfg.name}: {tb.checked} vectors checked, {tb.mismatches} mismatches, "
                  f"coverage {hit}/{total} = {hit / total:.3f}")
    assert tb.mismatches == 0, f"{tb.mismatches} mismatching values"
