"""HIF formatter: one lane's table word times its block's scale, into the output format.

Pipelined; every register advances on ``en`` (the lane's copy of the decoder's
pipeline enable), so the lane holds its state while the output is stalled.
The datapath registers have no reset: the decoder's valid bits say which
stages hold data. Each stage is one short carry chain or two to three LUT
levels, for Fmax.

Exact output (golden.decoder.product_fields). The word is the HIF code; the
block gives the raw scale fields. ``sig = Sh * Ss`` in the pipelined
multiplier (hdl.arith), ``exp = Xh + Xs`` and ``sign = sign_h ^ sign_block``
beside it: ``stages = multiplier stages`` (2 for a UE3M3 scale).

BF16 output (round to nearest, ties to even, saturating at the largest finite
value, subnormals kept: golden.formats' rule). The word and the block scale
arrive normalized (hdl.lut_word, hdl.scale_decoder), so each significand has
its leading one at its top bit, and the ``P``-bit product ``p`` has its leading
one at bit ``P - 1`` (``top``) or ``P - 2``. With ``e0 = word.exp + kb``, the
BF16 biased exponent of the result is ``Eb = e0 + 1 + top``. Stages:

1. (multiplier, first adder level) ``e0``; the zero flag and the sign;
2. (multiplier, last level) from ``e0`` alone: whether the result is normal
   (``Eb >= 1``) and whether it saturates (``Eb >= 255``) for either value
   of ``top``; ``Eb`` for ``top = 0``; the subnormal shift ``-e0`` (clamped);
3. select by ``top``: the exponent field, the saturation flag and the right
   shift ``sa`` (``top`` for a normal result, ``-e0`` for a subnormal one, at
   most 10: from there on everything rounds to zero); take a 10-bit window of
   ``p`` (the rest into ``sticky``) and shift it right by ``sa mod 4``;
4. shift right by ``4 * (sa // 4)``: the 8 bits ``R0`` (hidden bit included for
   a normal result), the ``guard`` bit below them and ``sticky``;
5. ``{exponent field, R0[6:0]} + (guard & (sticky | R0[0]))``: a mantissa carry
   walks into the exponent by itself, and a subnormal that rounds up becomes
   the smallest normal; beside it, whether the result reaches ``0x7F80``
   (exponent 255) from the exponent field and the carry, with no comparator;
6. such a result saturates to ``0x7F7F``; a zero product is 0; the sign goes on top.

A multiplier of more than two levels (a scale with more than 3 mantissa bits)
adds a stage before 3.

Shallow pipeline (``config.shallow``, hdl.config: a 50 MHz LUT4 FPGA such as
iCE40): the same word in four stages (``_shallow``): 1 and 2 as above, a zero
product folded into stage 2's flags; 3 = 3 and 4 (the whole alignment shift,
the exponent field as one add ``e0 + 1 + top``); 4 = 5 and 6. No ``e0`` copy.
Measured alone on iCE40 (``synth_ice40 -dsp``, sop4): 146 LUT4 and 93
flip-flops against the deep 160 and 137.

With sparse residuals (``config.residuals > 0``) a ``plus0`` input (the block's
layer carries sparse entries, hdl.block_fields) clears the sign of a zero
product in stage 1: such a layer adds +0 where it has no entry, and -0 + +0 = +0
(golden.decoder). The lanes an entry falls in are replaced later (hdl.residual).

Ports: ``en`` (in), ``word`` (in, ``lut_word.word(config)``), ``block`` (in,
``scale_decoder.block(config)``), ``out`` (out, ``config.lane_layout``).
Latency: ``latency`` enabled edges from ``word``/``block`` to ``out`` (the
stages above; elaboration checks that it builds that many). ``model`` computes
the output word from golden: the word's and the block's values as their
contracts define them (hdl.lut_word, hdl.scale_decoder), their exact product,
rounded by golden.formats' BF16 (or golden's exact product fields).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sop.golden.decoder import float_fields

from . import lut_word, reference, scale_decoder
from .arith import PipelinedMultiplier, Stages, delay
from .config import DecoderConfig
from .replica import replica
from .scale_decoder import BF16, BF16_M

WINDOW = BF16_M + 3              # R0 (8 bits) and the guard bit, plus the top bit of p
SATURATED = int(BF16.encode(BF16.max))      # 0x7F7F: the largest finite BF16
MAX_SHIFT = 10                   # from a right shift of 10 on, everything rounds to zero


def model(config: DecoderConfig, words, block: dict, plus0=0) -> np.ndarray:
    """Output words of table words ``words`` (integers, ``lut_word.word(config)``) times blocks
    ``block`` (arrays of the ``scale_decoder.block(config)`` fields).

    Exact: the word is a HIF code; golden.decoder.float_fields gives ``(sign, Sh, Xh)`` and the
    block ``(sig, exp, sign)`` is the scale times ``2^offset`` (golden's product fields), so the
    lane is ``{Sh * sig, Xh + exp, sign_h ^ sign}`` (packed as hdl.reference packs it).
    BF16: the word is ``(2^M + frac) * 2^(exp + exp_base)`` (zero where ``exp == 0``,
    hdl.lut_word) and ``kb`` is defined so that ``e0 = exp + kb`` is the BF16 biased exponent
    minus one of the ``P``-bit significand product ``p`` with its leading one at bit ``P - 2``
    (hdl.scale_decoder): the value is ``p * 2^(e0 + 1 - bias - (P - 2))``, rounded by golden's
    BF16 encoder (to nearest, ties to even, saturating, subnormals kept). ``plus0`` (residual
    configurations): where set, a zero product is +0 (golden's +0 residual added)."""
    cfg, hif = config, config.hif
    words = np.asarray(words, dtype=np.int64)
    if cfg.output == "exact":
        sign_h, sig_h, x_h = float_fields(hif, words)
        return reference.pack_exact(cfg, sign_h ^ block["sign"], sig_h * block["sig"], x_h + block["exp"])
    value = product_values(cfg, words, block)
    value = np.where((value == 0) & (np.asarray(plus0) == 1), 0.0, value)
    return BF16.encode(value).astype(np.int64)


def product_values(config: DecoderConfig, words, block: dict) -> np.ndarray:
    """The exact products (float64, a zero signed by the word's and block's signs) of BF16-form
    table words ``words`` times ``block`` fields, as their contracts define them (hdl.lut_word,
    hdl.scale_decoder): ``(2^M + frac) * (2^Ms + frac_s) * 2^(e0 + 1 - bias - (P - 2))`` with
    ``e0 = exp + kb``, zero where the word's ``exp`` is 0 or the block is ``zero``."""
    words = np.asarray(words, dtype=np.int64)
    M, eb, Ms, P = config.hif.mbits, lut_word.exp_bits(config), config.scale.mbits, config.sig_bits
    frac, exp, sign = words & ((1 << M) - 1), (words >> M) & ((1 << eb) - 1), (words >> (M + eb)) & 1
    p = (frac + (1 << M)) * (np.asarray(block["frac"], dtype=np.int64) + (1 << Ms))
    e0 = exp + np.asarray(block["kb"], dtype=np.int64)
    mag = np.ldexp(p.astype(np.float64), (e0 + 1 - BF16.bias - (P - 2)).astype(np.int32))
    mag = np.where((exp == 0) | (np.asarray(block["zero"]) == 1), 0.0, mag)
    return np.where((sign ^ np.asarray(block["sign"])) == 1, -mag, mag)


class HifFormatter(wiring.Component):
    model = staticmethod(model)

    def __init__(self, config: DecoderConfig):
        self.config = config
        super().__init__({
            "en": In(1),
            "word": In(lut_word.word(config)),
            "block": In(scale_decoder.block(config)),
            **({"plus0": In(1)} if config.residuals else {}),
            "out": Out(config.lane_layout),
        })

    @property
    def latency(self) -> int:
        """Enabled edges from ``word``/``block`` to ``out``: ``stages(config)``."""
        return self.stages(self.config)

    @staticmethod
    def _multiplier_stages(config: DecoderConfig) -> int:
        return PipelinedMultiplier.stages(config.scale.mbits + 1)

    @classmethod
    def stages(cls, config: DecoderConfig) -> int:
        """Pipeline stages (= cycles of latency) for ``config``'s output format."""
        lm = cls._multiplier_stages(config)
        if config.output == "exact":
            return lm
        return max(lm, 2) + (2 if config.shallow else 4)

    def elaborate(self, platform):
        m = Module()
        cfg, hif, scale = self.config, self.config.hif, self.config.scale
        M = hif.mbits

        stage = Stages(m, self.en)      # register stages built on the path from word/block to out

        m.submodules.mul = mul = PipelinedMultiplier(M + 1, scale.mbits + 1)
        m.d.comb += mul.en.eq(self.en)
        word, blk = self.word, self.block

        if cfg.output == "exact":
            mant, expf, sign_h = word.hif[:M], word.hif[M:M + hif.ebits], word.hif[M + hif.ebits]
            normal = expf != 0
            m.d.comb += [mul.a.eq(Cat(mant, normal)), mul.b.eq(blk.sig)]
            exp, sign = stage(("exp1", Mux(normal, expf, 1) - (hif.bias + M) + blk.exp, cfg.exp_shape),
                              ("sign1", sign_h ^ blk.sign, 1))
            lm = mul.latency
            m.d.comb += [self.out.sig.eq(mul.p), self.out.exp.eq(delay(m, self.en, exp, lm - 1, "exp")),
                         self.out.sign.eq(delay(m, self.en, sign, lm - 1, "sign"))]
            assert stage.depth + lm - 1 == self.latency
            return m

        # 1-2: the product; beside it the exponent e0 and what follows from it
        m.d.comb += [mul.a.eq(Cat(word.frac, 1)), mul.b.eq(Cat(blk.frac, 1))]
        e0_shape = signed(max(len(blk.kb), len(word.exp) + 1) + 1)
        zero_p, sign_p = (word.exp == 0) | blk.zero, word.sign ^ blk.sign
        if cfg.residuals:                    # a layer with sparse entries: -0 + (+0) = +0
            sign_p = sign_p & ~(zero_p & self.plus0)
        e0, zero, sign = stage(("e0_1", word.exp + blk.kb, e0_shape),
                               ("zero1", zero_p, 1), ("sign1", sign_p, 1))
        if cfg.shallow:
            return self._shallow(m, stage, mul, e0, zero, sign)
        # e0 twice (a register copy): one for the flags, one for the subnormal shift and eb0,
        # halving each bit's fanout.
        e0_copy = replica(e0_shape, name="e0c_1", reset_less=True)
        with m.If(self.en):
            m.d.sync += e0_copy.eq(word.exp + blk.kb)
        *flags, sub = self._flags(e0, e0_copy)
        normal0, normal1, sat0, sat1, eb0, sub, zero, sign = stage(
            *flags, ("eb0_2", e0_copy[:8] + 1, unsigned(8)),                          # Eb for top = 0
            sub, ("zero2", zero, 1), ("sign2", sign, 1))
        align = max(mul.latency, 2)
        normal0, normal1, sat0, sat1, eb0, sub, zero, sign = (
            delay(m, self.en, s, align - 2, s.name) for s in (normal0, normal1, sat0, sat1, eb0, sub, zero, sign))
        p = delay(m, self.en, mul.p, align - mul.latency, "p")
        stage.depth += align - 2

        # 3: select by top; a WINDOW-bit window of p, shifted right by sa mod 4
        top, normal, sa, y, lost = self._select(m, p, normal0, normal1, sub)
        fine = sa[:2]
        y1, sticky, sa_hi, ef, sat, zero, sign = stage(
            ("y3", y >> fine, unsigned(WINDOW)), ("sticky3", lost | self._fine_lost(y, fine), 1),
            ("sa_hi3", sa[2:], unsigned(2)),
            ("ef3", Mux(normal, eb0 + top, 0), unsigned(8)),
            ("sat3", Mux(top, sat1, sat0), 1), ("zero3", zero, 1), ("sign3", sign, 1))

        # 4: shift right by 4 * sa_hi (0, 4 or 8): R0, guard, sticky
        z, lost = self._coarse(y1, sa_hi)
        r0, guard, sticky, ef, sat, zero, sign = stage(
            ("r0_4", z[1:9], unsigned(8)), ("guard4", z[0], 1), ("sticky4", sticky | lost, 1),
            ("ef4", ef, unsigned(8)), ("sat4", sat, 1), ("zero4", zero, 1), ("sign4", sign, 1))

        # 5: round to nearest even on the assembled {exponent, mantissa}; beside the add, whether
        #    the result reaches exponent 255 (Inf/NaN in BF16): already there, or 254 plus the
        #    carry of a rounded-up all-ones mantissa
        up = self.round_up(r0, guard, sticky)
        word15, sat, zero, sign = stage(
            ("word5", Cat(r0[:BF16_M], ef) + up, unsigned(15)),
            ("sat5", sat | ef.all() | (ef[1:].all() & r0[:BF16_M].all() & up), 1),
            ("zero5", zero, 1), ("sign5", sign, 1))

        # 6: saturate to 0x7F7F, zero, sign
        (out,) = stage(("out6", Cat(Mux(zero, 0, Mux(sat, SATURATED, word15)), sign), unsigned(16)))
        m.d.comb += self.out.eq(out)
        assert stage.depth == self.latency
        return m

    def _shallow(self, m, stage, mul, e0, zero, sign):
        """Stages 2 to 4 of the shallow pipeline (``config.shallow``: a low-Fmax LUT4 FPGA), the
        deep stages regrouped where a 50 MHz clock allows, and what a 200 MHz ECP5 build needs
        but a LUT4 FPGA pays for dropped:

        2. (multiplier, last level) from ``e0``: the flags and the subnormal shift, as in the deep
           stage 2, with a zero product folded in (no normal, no saturation, the shift past the
           window: everything after it then yields 0 with no mux of its own); ``e0``'s low 8 bits;
        3. the deep stages 3 and 4 in one: select by ``top``, the whole alignment shift, sticky,
           and the exponent field ``e0 + 1 + top`` as one add (the deep build adds the 1 in
           stage 2 and ``top`` in stage 3: two adders, for a shorter path);
        4. the deep stages 5 and 6 in one: the rounding add, saturation and sign.

        No ``e0`` register copy (it halves a fanout for 200 MHz) and no zero register."""
        normal0, normal1, sat0, sat1, sub, e8, sign = stage(
            *self._flags(e0, e0, live=~zero), ("e8_2", e0[:8], unsigned(8)), ("sign2", sign, 1))
        align = max(mul.latency, 2)
        normal0, normal1, sat0, sat1, sub, e8, sign = (
            delay(m, self.en, s, align - 2, s.name) for s in (normal0, normal1, sat0, sat1, sub, e8, sign))
        p = delay(m, self.en, mul.p, align - mul.latency, "p")
        stage.depth += align - 2

        # 3: select by top; the WINDOW-bit window of p shifted right by sa (fine, then coarse)
        top, normal, sa, y, lost = self._select(m, p, normal0, normal1, sub)
        y1 = y >> sa[:2]
        z, lost_hi = self._coarse(y1, sa[2:])
        r0, guard, sticky, ef, sat, sign = stage(
            ("r0_3", z[1:9], unsigned(8)), ("guard3", z[0], 1),
            ("sticky3", lost | self._fine_lost(y, sa[:2]) | lost_hi, 1),
            ("ef3", Mux(normal, e8 + Cat(~top, top), 0), unsigned(8)),            # e0 + 1 + top
            ("sat3", Mux(top, sat1, sat0), 1), ("sign3", sign, 1))

        # 4: round to nearest even, saturate, sign (a zero product arrives as +-0 from stage 3)
        up = self.round_up(r0, guard, sticky)
        word15 = Cat(r0[:BF16_M], ef) + up
        sat = sat | ef.all() | (ef[1:].all() & r0[:BF16_M].all() & up)
        (out,) = stage(("out4", Cat(Mux(sat, SATURATED, word15[:15]), sign), unsigned(16)))
        m.d.comb += self.out.eq(out)
        assert stage.depth == self.latency
        return m

    @staticmethod
    def _flags(e0, e0_sub, live=None):
        """Stage 2's flags as ``(name, value, shape)``: ``normal0``, ``normal1`` (``Eb >= 1`` for
        ``top`` = 0 / 1), ``sat0``, ``sat1`` (``Eb >= 255``) from ``e0``, and ``sub`` (the subnormal
        shift ``-e0`` clamped to ``MAX_SHIFT``) from ``e0_sub`` (the same value: the deep pipeline's
        register copy). ``live`` (the shallow pipeline): low for a zero product, which then is not
        normal, does not saturate and shifts by ``MAX_SHIFT``, out of the window."""
        # Written as bit logic on e0, not as comparisons, so that no carry chain follows the add
        # of stage 1 (e0 in [-16, -1] iff its top bits are all ones).
        keep = (lambda v: v) if live is None else (lambda v: v & live)        # noqa: E731
        neg, high = e0[-1], e0[8:-1]
        minus16_to_1 = e0_sub[-1] & e0_sub[4:].all()
        return [("normal0_2", keep(~neg), 1), ("normal1_2", keep(~neg | e0.all()), 1),
                ("sat0_2", keep(~neg & (high.any() | e0[1:8].all())), 1),                 # e0 >= 254
                ("sat1_2", keep(~neg & (high.any() | (e0[2:8].all() & e0[:2].any()))), 1),    # e0 >= 253
                ("sub2", Mux(keep(minus16_to_1 & (e0_sub[:4] > 15 - MAX_SHIFT)), (0 - e0_sub[:4])[:4], MAX_SHIFT),
                 unsigned(4))]

    def _select(self, m, p, normal0, normal1, sub):
        """Stage 3's start, both pipelines: ``top`` (the product's top bit), whether the result is
        normal, the right shift ``sa`` and the WINDOW-bit window ``y`` of ``p`` (``lost``: the bits
        of ``p`` below it, into sticky)."""
        P = self.config.sig_bits
        top = p[P - 1]
        normal = Mux(top, normal1, normal0)
        sa = Signal(unsigned(4), name="sa3")
        m.d.comb += sa.eq(Mux(normal, top, sub))
        if P >= WINDOW:
            y, lost = p[P - WINDOW:], p[:P - WINDOW].any() if P > WINDOW else Const(0, 1)
        else:
            y, lost = Cat(Const(0, WINDOW - P), p), Const(0, 1)
        return top, normal, sa, y, lost

    @staticmethod
    def _fine_lost(y, fine):
        """The bits of ``y`` a right shift by ``fine`` (0 to 3) drops, ORed."""
        return Mux(fine == 0, 0, Mux(fine == 1, y[0], Mux(fine == 2, y[:2].any(), y[:3].any())))

    @staticmethod
    def _coarse(y1, sa_hi):
        """``y1`` shifted right by ``4 * sa_hi`` (0, 4 or 8), and the bits that drops, ORed."""
        z = Mux(sa_hi == 0, y1, Mux(sa_hi == 1, y1 >> 4, y1 >> 8))
        lost = Mux(sa_hi == 0, 0, Mux(sa_hi == 1, y1[:4].any(), y1[:8].any()))
        return z, lost

    @staticmethod
    def round_up(r0, guard, sticky):
        """Round to nearest, ties to even: up when past the half, or at it with R0 odd."""
        return guard & (sticky | r0[0])
