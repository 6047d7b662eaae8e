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

Ports: ``header`` (in, ``header_bits``), ``select`` (out, 1), ``fields`` (out,
``fields(config)``). Latency 0 (combinational). ``model`` gives ``select`` and
the fields of any headers from golden.decoder's fields of the scale code;
``block_model`` the ``block(config)`` values with the layer offset added (what
hdl.block_fields registers).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Module, Mux, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sop.golden.decoder import float_fields
from sop.golden.formats import get_format
from sop.golden.layout import OFFSET_RANGE

from . import lut_word
from .arith import leading_zeros
from .config import DecoderConfig, signed_width

BF16 = get_format("bf16")
BF16_BIAS, BF16_M = BF16.bias, BF16.mbits


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
    return signed(signed_width(OFFSET_RANGE[0] + c, OFFSET_RANGE[1] + c))


def fields(config: DecoderConfig) -> data.StructLayout:
    """What the scale decoder produces from a header alone."""
    scale = config.scale
    exp = signed(signed_width(1 - scale.mbits, (1 << scale.ebits) - 1))
    if config.output == "exact":
        return data.StructLayout({"sig": unsigned(scale.mbits + 1), "exp": exp, "sign": unsigned(1)})
    return data.StructLayout({"frac": unsigned(scale.mbits), "exp": exp, "zero": unsigned(1), "sign": unsigned(1)})


def block(config: DecoderConfig) -> data.StructLayout:
    """The fields with the layer term added: what a lane's formatter takes."""
    scale, c = config.scale, exp_constant(config)
    exp = signed(signed_width(1 - scale.mbits + OFFSET_RANGE[0] + c, (1 << scale.ebits) - 1 + OFFSET_RANGE[1] + c))
    if config.output == "exact":
        return data.StructLayout({"sig": unsigned(scale.mbits + 1), "exp": exp, "sign": unsigned(1)})
    return data.StructLayout({"frac": unsigned(scale.mbits), "kb": exp, "zero": unsigned(1), "sign": unsigned(1)})


def with_layer_term(config: DecoderConfig, f, layer_term):
    """``block(config)`` field values from ``fields(config)`` values ``f`` and the page's layer term."""
    if config.output == "exact":
        return {"sig": f.sig, "exp": f.exp + layer_term, "sign": f.sign}
    return {"frac": f.frac, "kb": f.exp + layer_term, "zero": f.zero, "sign": f.sign}


def _normalized(sig: np.ndarray, bits: int):
    """(leading zeros within ``bits`` bits, the significand shifted up to its leading one)."""
    lz = np.zeros_like(sig)                      # 0 for a zero significand, as in the hardware
    for i in range(bits):
        lz = np.where(sig >> i == 1, bits - 1 - i, lz)
    return lz, np.where(sig == 0, 0, sig << lz)


def model(config: DecoderConfig, headers) -> dict[str, np.ndarray]:
    """``select`` and the ``fields(config)`` of each header, from golden's scale fields.

    golden.decoder.float_fields gives the scale as ``sig * 2^X`` with
    ``X = max(e, 1) - bias - M``; ``exp`` is ``X`` without the constant ``-bias - M``. BF16:
    the significand normalized (its leading one at bit M, ``lz`` places up), ``frac`` below it,
    ``exp = X + bias + M - lz``; ``zero`` for a zero scale."""
    lay, scale = config.layout, config.scale
    code, sign, select = lay.split_header(np.asarray(headers, dtype=np.int64))
    _, sig, x = float_fields(scale, code)
    M = scale.mbits
    exp = x + scale.bias + M
    if config.output == "exact":
        return {"select": select, "sig": sig, "exp": exp, "sign": sign}
    lz, norm = _normalized(sig, M + 1)
    return {"select": select, "frac": norm & ((1 << M) - 1), "exp": exp - lz,
            "zero": (sig == 0).astype(np.int64), "sign": sign}


def block_model(config: DecoderConfig, headers, offset) -> dict[str, np.ndarray]:
    """The ``block(config)`` values of each header at the layer offset(s) ``offset``.

    Exact: the scale times ``2^offset`` as golden.decoder.product_fields has it,
    ``sig * 2^(X + offset)``. BF16: ``kb`` such that a lane's ``e0 = word.exp + kb`` is the BF16
    biased exponent, minus one, of its product when the product's leading one is at its
    second-highest bit: with the word ``(2^M + frac) * 2^(exp + exp_base)`` (hdl.lut_word) and the
    scale ``(2^Ms + frac_s) * 2^(X - lz + offset)``, the ``P``-bit product has its leading one at
    bit ``P - 2`` times ``2^(exp + exp_base + X - lz + offset)``, so
    ``kb = X - lz + offset + exp_base + P - 2 + BF16 bias - 1``."""
    lay, scale = config.layout, config.scale
    code, sign, _ = lay.split_header(np.asarray(headers, dtype=np.int64))
    offset = np.broadcast_to(np.asarray(offset, dtype=np.int64), code.shape)
    _, sig, x = float_fields(scale, code)
    if config.output == "exact":
        return {"sig": sig, "exp": x + offset, "sign": sign}
    M = scale.mbits
    lz, norm = _normalized(sig, M + 1)
    kb = x - lz + offset + lut_word.exp_base(config) + config.sig_bits - 2 + BF16.bias - 1
    return {"frac": norm & ((1 << M) - 1), "kb": kb,
            "zero": (sig == 0).astype(np.int64), "sign": sign}


class ScaleDecoder(wiring.Component):
    latency = 0                         # combinational
    model = staticmethod(model)

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
