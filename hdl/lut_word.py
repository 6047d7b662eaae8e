"""LUT word: the form in which the decoder's table RAM holds a HIF entry.

The host loads HIF codes (golden.hif); the table stores them as ``word(config)``:

* exact output: the HIF code itself, ``{hif}``;
* BF16 output: the entry *pre-normalized*, ``{frac, exp, sign}``: a nonzero
  entry is ``(-1)^sign * (2^M + frac) * 2^(exp + exp_base(config))`` with the
  leading one of its significand at bit ``M`` (a subnormal HIF value is shifted
  up to it), and ``exp == 0`` means zero. This takes the leading-zero count and
  the normalizing shift out of every lane: the table is written once per layer
  through one encoder, and read by every lane every cycle. It costs one bit of
  RAM width (11 bits for E3M6), which fits in the same RAM cells on ECP5
  (three 4-bit DPR16X4 columns) and on iCE40 (one 16-bit RAM40).

``LutWordEncoder`` is the combinational HIF -> word encoder on the write path
(ports ``hif`` in, ``word`` out; latency 0); ``encode`` (also ``model``) is its
numpy model, from golden.decoder's fields of the HIF code.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Module, Mux, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sop.golden.decoder import float_fields

from .arith import leading_zeros
from .config import DecoderConfig


def exp_base(config: DecoderConfig) -> int:
    """``exp`` field value 1 is the exponent of the smallest normalized HIF entry."""
    hif = config.hif
    return (1 - hif.bias - 2 * hif.mbits) - 1


def exp_bits(config: DecoderConfig) -> int:
    hif = config.hif
    return ((1 << hif.ebits) - 1 + hif.mbits).bit_length()


def word(config: DecoderConfig) -> data.StructLayout:
    hif = config.hif
    if config.output == "exact":
        return data.StructLayout({"hif": unsigned(hif.bits)})
    return data.StructLayout({"frac": unsigned(hif.mbits), "exp": unsigned(exp_bits(config)),
                              "sign": unsigned(1)})


def encode(config: DecoderConfig, codes) -> np.ndarray:
    """Numpy model of the encoder: the stored word of each HIF code, as integers."""
    hif, codes = config.hif, np.asarray(codes, dtype=np.int64)
    if config.output == "exact":
        return codes
    M = hif.mbits
    sign, sig, x = float_fields(hif, codes)                        # value = ±sig * 2^x (golden)
    lz = np.zeros_like(sig)
    for i in range(M + 1):                                          # leading zeros of sig
        lz = np.where(sig >> i == 1, M - i, lz)
    field = np.where(sig == 0, 0, x - lz - exp_base(config))        # max(e, 1) + M - lz
    frac = (sig << lz) & ((1 << M) - 1)
    return frac | field << M | sign << (M + exp_bits(config))


model = encode                          # ``lut_word.model``: the name tests and docs/hardware.md use


class LutWordEncoder(wiring.Component):
    """HIF code in, stored word out (combinational)."""

    latency = 0                         # combinational
    model = staticmethod(encode)

    def __init__(self, config: DecoderConfig):
        self.config = config
        super().__init__({"hif": In(unsigned(config.hif.bits)), "word": Out(word(config))})

    def elaborate(self, platform):
        m = Module()
        cfg, hif = self.config, self.config.hif
        if cfg.output == "exact":
            m.d.comb += self.word.hif.eq(self.hif)
            return m
        M, E = hif.mbits, hif.ebits
        mant, e, sign = self.hif[:M], self.hif[M:M + E], self.hif[M + E]
        sig = Cat(mant, e != 0)
        lz = leading_zeros(m, sig, "lz")
        m.d.comb += [
            self.word.frac.eq((sig << lz)[:M]),
            self.word.exp.eq(Mux(sig == 0, 0, Mux(e != 0, e, 1) + M - lz)),    # = x - exp_base
            self.word.sign.eq(sign),
        ]
        return m

