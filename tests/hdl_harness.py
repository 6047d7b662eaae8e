"""amaranth.sim harness for the decoder top: the shared host-sequence driver and a monitor; the frame
of the tests' altered AXI4-Stream shells (``ShellTop``).

``run_decoder`` streams any number of layers through a ``Decoder`` the
way a host does, with the cycles of ``sim.stimulus.host_sequence`` (the same
host-sequence driver the cocotb bench, sim/tb_decoder.py, consumes): the next
layer's tables loaded into the inactive page while the current layer streams,
the first beat of each layer with ``swap``, random idle cycles on the input;
and random stalls on the output. It returns the output beats it saw. Layers
and their expected beats come from sim.stimulus and hdl.reference (golden only).
"""

from __future__ import annotations

import random

from amaranth.hdl import ClockDomain, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from sop.hdl import axis, reference
from sop.hdl.config import DecoderConfig
from sop.hdl.decoder import Decoder
from sop.sim.stimulus import HostCycle, Layer, corner_layer, host_sequence, random_layer  # noqa: F401  (re-exported)


def run_decoder(cfg: DecoderConfig, layers: list[Layer], *, seed=0, p_idle=0.2, p_stall=0.3,
                dut: Decoder | None = None, reset_after_beats: int | None = None,
                max_cycles: int = 200_000, beat_cycles: list | None = None,
                errors: dict | None = None) -> list[list[int]]:
    """Stream ``layers`` through the decoder; returns the output beats (lane words).

    With ``reset_after_beats``, the first layer is cut off after that many input
    beats, the output held stalled, and a synchronous reset pulsed; the other
    layers then follow from a fresh load. The monitor only counts beats after
    the reset, so stale data would show up as extra or wrong beats.
    ``beat_cycles``, if given, receives the cycle number of each output beat. With sparse
    residuals (``cfg.residuals``) the layers' entries go on the ``sparse`` stream and
    ``errors``, if given, receives the ``sparse_error`` bits at the end.
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

    def apply(ctx, cycle: HostCycle):
        w = cycle.write
        lut = w is not None and w[0] == "lut"
        if lut:
            _, bank, addr, value = w
            ctx.set(dut.load.payload.bank, bank)
            ctx.set(dut.load.payload.addr, addr)
            ctx.set(dut.load.payload.data, value)
        ctx.set(dut.load.valid, lut)
        if w is not None and w[0] == "offset":
            ctx.set(dut.offset, w[1])
            if cfg.residuals:
                ctx.set(dut.layer_sparse, w[2])
        ctx.set(dut.offset_we, w is not None and w[0] == "offset")
        if cfg.residuals:
            if cycle.entry is not None:
                index, value, last = cycle.entry
                ctx.set(dut.sparse.payload.index, index)
                ctx.set(dut.sparse.payload.value, value)
                ctx.set(dut.sparse.payload.last, last)
            ctx.set(dut.sparse.valid, cycle.entry is not None)
        if cycle.beat is not None:
            ctx.set(dut.blocks.payload.blocks, cycle.beat)
            ctx.set(dut.blocks.payload.swap, cycle.swap)
        ctx.set(dut.blocks.valid, cycle.beat is not None)
        ctx.set(cd.rst, cycle.reset)

    async def driver(ctx):
        sequence = host_sequence(cfg, layers, rng, p_idle=p_idle, cut_after=reset_after_beats)
        try:
            cycle = next(sequence)
            while True:
                apply(ctx, cycle)
                if cfg.residuals:
                    _, _, ready, sready = await ctx.tick().sample(dut.blocks.ready, dut.sparse.ready)
                    reply = (cycle.beat is not None and bool(ready), cycle.entry is not None and bool(sready))
                else:
                    _, _, ready = await ctx.tick().sample(dut.blocks.ready)
                    reply = cycle.beat is not None and bool(ready)
                if cycle.reset:
                    after_reset[0] = True
                cycle = sequence.send(reply)
        except StopIteration:
            pass
        apply(ctx, HostCycle())

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
        if errors is not None and cfg.residuals:
            errors.update({k: ctx.get(getattr(dut.sparse_error, k)) for k in dut.sparse_error.shape().members})

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(driver)
    sim.add_testbench(monitor)
    sim.run()
    return got


class ShellTop(wiring.Component):
    """``AxisTop``'s ports (``aclk``, ``aresetn`` and the shell's streams) around the real shell of ``cfg``
    (``self.core``), for a test's altered shell: a subclass wires the ports to the core in ``wire(m, core)``
    (``load_error`` is the core's unless ``wire`` drives it)."""

    def __init__(self, cfg):
        self.core = axis.AxisDecoder(cfg)
        super().__init__({"aclk": wiring.In(1), "aresetn": wiring.In(1), **dict(self.core.signature.members)})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd = ClockDomain("sync", local=True)
        m.d.comb += [cd.clk.eq(self.aclk), cd.rst.eq(~self.aresetn)]
        m.submodules.core = self.core
        m.d.comb += self.load_error.eq(self.core.load_error)
        self.wire(m, self.core)
        return m

    def wire(self, m, core) -> None:
        raise NotImplementedError
