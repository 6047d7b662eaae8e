"""Timing wrapper: every port of a component registered, its wide I/O reduced to a few pins.

``IoWrapper(dut)`` puts any ``wiring.Component`` that works in the ``sync``
domain (the decoder, ``hdl.decoder.Decoder``) between flip-flops, so that
place and route times every path of the design as a register-to-register path,
and so that a design with hundreds of I/O bits still fits a small package
(the iCE40UP5K in sg48 has 39 I/O):

* **Inputs.** A shift register of ``din_width`` bits per cycle, fed from the
  ``din`` pins, holds every input bit of the design (all its ``In`` ports,
  stream payloads, valids and readies included) plus the design's synchronous
  reset; each input of the design is one bit of that register. The shift
  register itself has no reset. The design's ``sync`` reset is therefore a
  flip-flop output too, and its fanout is a timed path like any other.
* **Outputs.** Every ``Out`` bit of the design goes into a pipelined XOR fold: each level
  XORs at most four adjacent bits of the level before (bits ``[j k, (j + 1) k)``
  into bit ``j``) into one flip-flop (one LUT4 per bit), until ``dout_width``
  bits remain; the last level drives the ``dout`` pins. Adjacent bits come from
  the same lane, so the first level's inputs sit beside each other: folding
  bits a quarter of the bus apart made the fold itself the longest path at 64
  lanes. Every output bit reaches ``dout``, so synthesis can remove nothing
  (a constant output, such as the tied-high ``load.ready``, folds away),
  and no fold level adds more than one LUT between two flip-flops, so the
  wrapper never sets the clock period.

Ports of the wrapper: ``clk``, ``din`` (``din_width`` bits), ``dout``
(``dout_width`` bits); no reset pin. Contract: the wrapped design is the
submodule ``dut`` (its Verilog module is ``<top>.dut``), unchanged, so its
cell counts can be read from a synthesis that keeps its hierarchy
(synth/flow/yosys_nextpnr.py). The wrapper is a synthesis harness, not a usable interface:
the inputs change every cycle.
"""

from __future__ import annotations

from amaranth.hdl import Cat, ClockDomain, ClockSignal, Const, Module, ResetSignal, Shape, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

FOLD_FANIN = 4


def port_bits(dut: wiring.Component) -> tuple[list, list]:
    """The design's input and output port values, in signature order (flattened)."""
    ins, outs = [], []
    for path, member in dut.signature.members.flatten():
        if not member.is_port:
            continue
        value = dut
        for part in path:
            value = getattr(value, part) if isinstance(part, str) else value[part]
        (ins if member.flow == In else outs).append(value)
    return ins, outs


def fold_levels(n_bits: int, width: int) -> list[int]:
    """Widths of the XOR-fold levels that reduce ``n_bits`` to ``width`` (fan-in at most 4 each)."""
    levels = []
    while n_bits > width:
        n_bits = max(width, -(-n_bits // FOLD_FANIN))
        levels.append(n_bits)
    return levels or [width]


class IoWrapper(wiring.Component):
    def __init__(self, dut: wiring.Component, *, din_width: int = 1, dout_width: int = 8):
        if din_width < 1 or dout_width < 1:
            raise ValueError("din_width and dout_width must be at least 1")
        self.dut = dut
        ins, outs = port_bits(dut)
        self.in_bits = sum(Shape.cast(v.shape()).width for v in ins) + 1       # + the design's reset
        self.out_bits = sum(Shape.cast(v.shape()).width for v in outs)
        self.fold = fold_levels(self.out_bits, dout_width)
        super().__init__({"clk": In(1), "din": In(din_width), "dout": Out(dout_width)})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = ClockDomain()
        m.submodules.dut = dut = self.dut
        ins, outs = port_bits(dut)

        # Inputs: a shift register, din_width bits per cycle, holding every input bit and the reset.
        w = len(self.din)
        shift = Signal(max(self.in_bits, w), reset_less=True)
        m.d.sync += shift.eq(Cat(self.din, shift[:-w]) if len(shift) > w else self.din)
        pos = 0
        for value in ins:
            width = Shape.cast(value.shape()).width
            m.d.comb += value.eq(shift[pos:pos + width])
            pos += width
        m.d.comb += [ClockSignal("sync").eq(self.clk), ResetSignal("sync").eq(shift[pos])]

        # Outputs: a pipelined XOR fold, at most 4 bits into each flip-flop, down to dout.
        level = [v[i] for v in map(Value.cast, outs) for i in range(len(v))]
        for n, width in enumerate(self.fold):
            reg = Signal(width, name=f"fold{n}", reset_less=True)
            terms, k = [Const(0, 1)] * width, -(-len(level) // width)
            for i, bit in enumerate(level):
                terms[i // k] = terms[i // k] ^ bit
            m.d.sync += reg.eq(Cat(*terms))
            level = list(reg)
        m.d.comb += self.dout.eq(Cat(*level))
        return m
