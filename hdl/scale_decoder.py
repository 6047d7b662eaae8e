"""Scale decoder: a block header to the block's scale fields, the per-layer offset aside.

Combinational; one per block of a beat, on the incoming beat. From the header
(golden.layout's field order: scale code from bit 0, then the sign bit, then
the selection bit, each where the layout has it) it produces
``fields(config)``: ``sign``, the significand, and ``exp``, the scale's
exponent *without* its constant part. The decoder registers them with the
beat and adds, one stage later, the page's ``layer_term``: the per-layer
offset plus ``exp_constant(config)`` (added once, when the offset is written).
That gives ``block(config)``, what a lane's formatter takes:

* exact output: the scale significand ``sig`` (hidden bit included) and
  ``exp = max(e, 1) - bias - M + offset``, so that the block scale is
  ``(-1)^sign * sig * 2^exp`` as golden.decoder.product_fields has it;
* BF16 output: the scale *normalized* like the LUT words (hdl.lut_word): its
  significand's fraction ``frac`` below a leading one at bit ``M``, ``zero``
  for a zero scale, and ``kb = max(e, 1) - lz + offset + exp_constant``, the
  block's share of the lane's exponent sum: a lane's ``e0 = word.exp + kb`` is
  the BF16 biased exponent, minus one, of its product when the product's
  leading one is at its second-highest bit (hdl.hif_formatter).

Without the constant, ``exp`` is ``max(e, 1) - lz``: for a normal scale the
exponent field itself (``lz = 0``), for a subnormal one ``1 - lz``, a function
of the mantissa; no adder sits on the input path. ``select`` (the bank of the
block's codes) is decoded here as well.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sop.golden.layout import OFFSET_RANGE

from . import lut_word
from .arith import leading_zeros
from .config import DecoderConfig, _signed_width

BF16_BIAS, BF16_M = 127, 7


def product_bits(config: DecoderConfig) -> int:
    """Width of the significand product: (HIF M + 1) + (scale M + 1)."""
    return config.sig_bits


def exp_constant(config: DecoderConfig) -> int:
    """The constant part of the block exponent, added to the per-layer offset."""
    scale = config.scale
    if config.output == "exact":
        return -(scale.bias + scale.mbits)
    # e0 = X + P - 2 + BF16_BIAS - 1 with X the exponent of the product's LSB, P its width.
    return lut_word.exp_base(config) + config.sig_bits - 3 + BF16_BIAS - scale.bias - scale.mbits


def layer_term_shape(config: DecoderConfig):
    """Shape of ``offset + exp_constant`` (the per-page register of the decoder)."""
    c = exp_constant(config)
    return signed(_signed_width(OFFSET_RANGE[0] + c, OFFSET_RANGE[1] + c))


def fields(config: DecoderConfig) -> data.StructLayout:
    """What the scale decoder produces from a header alone."""
    scale = config.scale
    exp = signed(_signed_width(1 - scale.mbits, (1 << scale.ebits) - 1))
    if config.output == "exact":
        return data.StructLayout({"sig": unsigned(scale.mbits + 1), "exp": exp, "sign": unsigned(1)})
    return data.StructLayout({"frac": unsigned(scale.mbits), "exp": exp, "zero": unsigned(1), "sign": unsigned(1)})


def block(config: DecoderConfig) -> data.StructLayout:
    """The fields with the layer term added: what a lane's formatter takes."""
    scale, c = config.scale, exp_constant(config)
    exp = signed(_signed_width(1 - scale.mbits + OFFSET_RANGE[0] + c, (1 << scale.ebits) - 1 + OFFSET_RANGE[1] + c))
    if config.output == "exact":
        return data.StructLayout({"sig": unsigned(scale.mbits + 1), "exp": exp, "sign": unsigned(1)})
    return data.StructLayout({"frac": unsigned(scale.mbits), "kb": exp, "zero": unsigned(1), "sign": unsigned(1)})


def with_layer_term(config: DecoderConfig, f, layer_term):
    """``block(config)`` field values from ``fields(config)`` values ``f`` and the page's layer term."""
    if config.output == "exact":
        return {"sig": f.sig, "exp": f.exp + layer_term, "sign": f.sign}
    return {"frac": f.frac, "kb": f.exp + layer_term, "zero": f.zero, "sign": f.sign}


class ScaleDecoder(wiring.Component):
    def __init__(self, config: DecoderConfig):
        self.config = config
        super().__init__({
            "header": In(unsigned(config.layout.header_bits)),
            "select": Out(1),
            "fields": Out(fields(config)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, lay = self.config, self.config.layout
        fmt, S = lay.scale, lay.scale.bits
        mant, expf = self.header[:fmt.mbits], self.header[fmt.mbits:S]
        normal = expf != 0
        sig = Cat(mant, normal)
        f = self.fields
        if cfg.output == "exact":
            m.d.comb += [f.sig.eq(sig), f.exp.eq(Mux(normal, expf, 1))]
        else:
            lz = leading_zeros(m, sig, "lz")       # 0 for a normal scale
            m.d.comb += [f.frac.eq((sig << lz)[:fmt.mbits]), f.zero.eq(sig == 0),
                         f.exp.eq(Mux(normal, expf, 1 - lz))]
        if lay.signed_scale:
            m.d.comb += f.sign.eq(self.header[lay.sign_position])
        if lay.select_bit:
            m.d.comb += self.select.eq(self.header[lay.select_position])
        return m
