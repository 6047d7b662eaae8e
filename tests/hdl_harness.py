"""amaranth.sim harness for the decoder top: a host driver and a monitor.

``run_decoder`` streams any number of layers through a ``Decoder`` the
way a host does (load the next layer's tables into the inactive page while the
current layer streams, first beat of each layer with ``swap``), with random
idle cycles on the input and random stalls on the output, and returns the
output beats it saw. Layers and their expected beats come from sim.stimulus and hdl.reference (golden only).
"""

from __future__ import annotations

import random

from amaranth.hdl import ClockDomain, Module
from amaranth.sim import Simulator

from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.hdl.decoder import Decoder
from sop.sim.stimulus import Layer, corner_layer, random_layer  # noqa: F401  (re-exported for tests)


def run_decoder(cfg: DecoderConfig, layers: list[Layer], *, seed=0, p_idle=0.2, p_stall=0.3,
                dut: Decoder | None = None, reset_after_beats: int | None = None,
                max_cycles: int = 200_000, beat_cycles: list | None = None) -> list[list[int]]:
    """Stream ``layers`` through the decoder; returns the output beats (lane words).

    With ``reset_after_beats``, the first layer is cut off after that many input
    beats, the output held stalled, and a synchronous reset pulsed; the other
    layers then follow from a fresh load. The monitor only counts beats after
    the reset, so stale data would show up as extra or wrong beats.
    ``beat_cycles``, if given, receives the cycle number of each output beat.
    """
    rng = random.Random(seed)
    dut = dut or Decoder(cfg)
    top = Module()
    top.domains.sync = cd = ClockDomain()
    top.submodules.dut = dut
    after_reset = [reset_after_beats is None]
    got: list[list[int]] = []
    n_expected = sum(len(layer.expected(cfg)) for layer in
                     (layers[1:] if reset_after_beats is not None else layers))

    async def write_one(ctx, w):
        if w[0] == "lut":
            _, bank, addr, value = w
            ctx.set(dut.load.payload.bank, bank)
            ctx.set(dut.load.payload.addr, addr)
            ctx.set(dut.load.payload.data, value)
            ctx.set(dut.load.valid, 1)
        else:
            ctx.set(dut.offset, w[1])
            ctx.set(dut.offset_we, 1)

    def idle_writes(ctx):
        ctx.set(dut.load.valid, 0)
        ctx.set(dut.offset_we, 0)

    async def send(ctx, beat: int, swap: bool, budget: list | None):
        """Offer one beat until accepted (or, in the reset phase, until the cycle budget runs out)."""
        ctx.set(dut.blocks.payload.blocks, beat)
        ctx.set(dut.blocks.payload.swap, int(swap))
        ctx.set(dut.blocks.valid, 1)
        while True:
            _, _, ready = await ctx.tick().sample(dut.blocks.ready)
            if ready:
                return True
            if budget is not None:
                budget[0] -= 1
                if budget[0] <= 0:
                    return False

    async def load(ctx, writes):
        ctx.set(dut.blocks.valid, 0)
        for w in writes:
            await write_one(ctx, w)
            await ctx.tick()
        idle_writes(ctx)

    async def driver(ctx):
        await load(ctx, layers[0].writes())
        pending = []
        for li, layer in enumerate(layers):
            beats = reference.input_beats(cfg, layer.headers, layer.codes)
            cut = reset_after_beats is not None and li == 0
            budget = [4 * reset_after_beats * cfg.beats_per_block] if cut else None
            await load(ctx, pending)             # the next tables must be in before their swap beat
            pending = []
            for bi, beat in enumerate(beats[:reset_after_beats] if cut else beats):
                while rng.random() < p_idle:
                    ctx.set(dut.blocks.valid, 0)
                    await ctx.tick()
                if pending:                       # one table word per cycle beside the stream
                    await write_one(ctx, pending.pop(0))
                accepted = await send(ctx, beat, bi == 0, budget)
                idle_writes(ctx)
                if not accepted:
                    break
                if bi == 0 and li + 1 < len(layers) and not cut:
                    pending = list(layers[li + 1].writes())
            if cut:                               # reset with a beat possibly still offered
                ctx.set(cd.rst, 1)
                await ctx.tick()
                ctx.set(cd.rst, 0)
                ctx.set(dut.blocks.valid, 0)
                after_reset[0] = True
                pending = list(layers[1].writes()) if len(layers) > 1 else []
        ctx.set(dut.blocks.valid, 0)

    async def monitor(ctx):
        cycles = 0
        while len(got) < n_expected:
            ready = after_reset[0] and rng.random() >= p_stall
            ctx.set(dut.values.ready, ready)
            _, _, valid, rdy, payload = await ctx.tick().sample(
                dut.values.valid, dut.values.ready, dut.values.payload.as_value())
            if valid and rdy and after_reset[0]:
                got.append(reference.split_lanes(cfg, payload))
                if beat_cycles is not None:
                    beat_cycles.append(cycles)
            cycles += 1
            assert cycles < max_cycles, "decoder stopped producing output"
        ctx.set(dut.values.ready, 1)
        for _ in range(12):                       # nothing more may come out
            _, _, valid = await ctx.tick().sample(dut.values.valid)
            assert not valid, f"decoder produced more beats than it was given ({len(got)} + more)"

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(driver)
    sim.add_testbench(monitor)
    sim.run()
    return got
