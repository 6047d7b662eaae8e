"""Scale decoder: a block header and the per-layer offset to sign, select and scale fields.

Combinational. From the header (golden.layout's field order: scale code from
bit 0, then the sign bit, then the selection bit, each where the layout has
it) it produces the scale's significand ``sig`` (hidden bit included) and its
exponent ``exp = max(e, 1) - bias - M + offset``, so that the block scale is
``(-1)^sign * sig * 2^exp`` exactly as golden.decoder.product_fields has it.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sop.golden.layout import BlockLayout

from .config import scale_exp_shape


class ScaleDecoder(wiring.Component):
    def __init__(self, layout: BlockLayout):
        self.layout = layout
        fmt = layout.scale
        super().__init__({
            "header": In(unsigned(layout.header_bits)),
            "offset": In(signed(8)),
            "sign": Out(1),
            "select": Out(1),
            "sig": Out(unsigned(fmt.mbits + 1)),
            "exp": Out(scale_exp_shape(layout)),
        })

    def elaborate(self, platform):
        m = Module()
        fmt, S = self.layout.scale, self.layout.scale.bits
        mant = self.header[:fmt.mbits]
        expf = self.header[fmt.mbits:S]
        normal = expf != 0
        m.d.comb += [
            self.sig.eq(Cat(mant, normal)),
            self.exp.eq(Mux(normal, expf, 1) - (fmt.bias + fmt.mbits) + self.offset),
        ]
        if self.layout.signed_scale:
            m.d.comb += self.sign.eq(self.header[S])
        if self.layout.select_bit:
            m.d.comb += self.select.eq(self.header[S + int(self.layout.signed_scale)])
        return m
