"""The residual adder: one lane's product plus one BF16 residual, rounded once to BF16.

Part of the sparse-residual path (hdl.residual, its overview; docs/hardware.md, "Sparse
residuals"): ``ResidualPath`` builds R of these beside the lanes, each fed the table word and
block fields of the lane its entry hits.

Contract: ``out`` = ``round_bf16(word x block + residual)``: the lane's exact product
(recomputed as hdl.hif_formatter computes it) plus the residual, rounded once to nearest
even at BF16's precision (subnormals kept, saturating at 0x7F7F, an exact zero +0 unless
both terms are -0). Exactly: the smaller operand is aligned with every shifted-out bit
jammed into its LSB (the sum rounded to odd, golden.decoder.sum_rounded_to_odd), then one
rounding. ``model`` (``adder_model``) is golden's, bit for bit.

Ports: ``en`` (in, the lane's pipeline enable), ``word`` (in, ``lut_word.word(config)``),
``block`` (in, ``scale_decoder.block(config)``), ``residual`` (in, a BF16 code), ``out``
(out, BF16). Only for BF16 output.

Latency: ``ResidualAdder.latency`` = ``stages(config)`` enabled edges,
``max(multiplier stages, 2) + 11`` (13 for sop4-g16-sp, 14 for e2m3-ue4m4-g16-sp).

The helpers of its datapath live here too: ``window`` (the accumulator's layout),
``shift_right_sticky`` (a shift whose shifted-out bits are ORed into a sticky bit) and
``leading_one``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Shape, Signal, Value, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sop.golden.decoder import sum_rounded_to_odd

from . import hif_formatter, lut_word, scale_decoder
from .arith import PipelinedMultiplier, Stages, delay, leading_zeros_tree
from .config import DecoderConfig
from .hif_formatter import HifFormatter
from .scale_decoder import BF16

SATURATED = hif_formatter.SATURATED
GUARD = 3                   # exact bits kept below the larger operand (>= 2 for the one rounding)


def window(config: DecoderConfig) -> tuple[int, int]:
    """(T, WA): the larger operand's reference bit sits at bit T of a WA-bit accumulator."""
    P = config.sig_bits
    T = max(P - 2, BF16.mbits) + GUARD
    return T, T + 3


def shift_right_sticky(value, amount, step: int = 1):
    """``(value >> (amount * step), any bit shifted out)`` for a Value ``amount``: a mux over the
    amounts a ``value`` can be shifted by (at most its width), each with its shifted-out bits
    ORed beforehand, so the sticky bit costs no mask decoder."""
    w = len(value)
    n = min(1 << len(amount), w // step + 1)
    shifted = Array((value >> (a * step))[:w] if a * step < w else Const(0, w) for a in range(n))
    lost = Array(value[:a * step].any() if a else Const(0) for a in range(n))
    if (1 << len(amount)) > n:           # amounts past the width: everything shifted out
        big = amount >= n
        return Mux(big, 0, shifted[amount]), Mux(big, value.any(), lost[amount])
    return shifted[amount], lost[amount]


def leading_one(m: Module, value, name: str):
    """The position of ``value``'s leading one (0 for a zero value): a tree of halves of a
    power-of-two width, whose upper half's position is the lower one's with a bit set (no adder)."""
    w = 1 << (len(value) - 1).bit_length()
    v = Cat(value, Const(0, w - len(value)))

    def pos(v):
        if len(v) == 1:
            return Const(0, 0), v[0]
        half = len(v) // 2
        (p_hi, nz_hi), (p_lo, nz_lo) = pos(v[half:]), pos(v[:half])
        return Mux(nz_hi, Cat(p_hi, 1), Cat(p_lo, 0)), nz_hi | nz_lo

    p, _ = pos(v)
    out = Signal(max(1, len(p)), name=name)
    m.d.comb += out.eq(p)
    return out


def adder_model(config: DecoderConfig, words, block: dict, residuals) -> np.ndarray:
    """``ResidualAdder``'s output words: golden's exact sum of the product and the BF16
    residual, rounded once to BF16 (golden.decoder.sum_rounded_to_odd, then golden's BF16)."""
    r = BF16.decode(np.asarray(residuals, dtype=np.int64))
    return BF16.encode(sum_rounded_to_odd(hif_formatter.product_values(config, words, block), r)).astype(np.int64)


@dataclass(frozen=True)
class _Widths:
    """The adder's widths: the larger operand's reference bit ``T`` in the ``WA``-bit accumulator, the
    rounding point's bound ``kmax`` and the ``kbits`` of a shift or rounding point; the shapes of the
    product's exponent ``e0``, the residual's ``er`` and their differences ``d``."""
    T: int
    WA: int
    kmax: int
    kbits: int
    e0: Shape
    er: Shape
    d: Shape


def _stage(stage: Stages, cls, **regs):
    """One register stage read by name: a ``cls`` (a stage's dataclass below) of the registers built
    from ``field=(name, value, shape)``. The fields come in ``cls``'s order, the order the registers
    are built in, so that the Verilog lists them as before."""
    assert tuple(regs) == tuple(f.name for f in fields(cls)), (tuple(regs), cls)
    return cls(**dict(zip(regs, stage(*regs.values()))))


# -- each stage method's outputs, the next one's inputs (in the order the stage builds them) ------------------

@dataclass(frozen=True)
class _Fields:
    """Stage 1: the product's exponent ``e0 = word.exp + kb``, zero flag and sign; the residual's
    biased exponent ``er`` (minus its leading zeros when subnormal), whether it is normal, its
    mantissa's leading zeros ``rlz``, its mantissa ``rm``, sign ``rs`` and zero flag."""
    e0: Value
    pzero: Value
    psign: Value
    er: Value
    rnorm: Value
    rlz: Value
    rm: Value
    rs: Value
    rzero: Value


@dataclass(frozen=True)
class _Differences:
    """Stage 2, delayed to the product: ``d0 = e0 + 1 - Er`` and ``nd0 = -d0``; with the product
    (``_p``) or the residual (``_r``) as ``A``, the accumulator LSB's exponent ``eat = E_A - T`` and
    the rounding point's lower bound ``mmin = 1 - eat``; the residual's normalized significand ``rn``;
    the terms' zero flags and signs."""
    d0: Value
    nd0: Value
    eat_p: Value
    eat_r: Value
    mmin_p: Value
    mmin_r: Value
    rn: Value
    pzero: Value
    psign: Value
    rs: Value
    rzero: Value


@dataclass(frozen=True)
class _Operands:
    """Stage 3: the larger operand ``a`` in the accumulator, the other ``b`` unshifted and its clamped
    shift ``sh``; ``A``'s sign ``sa``, ``sub`` (the signs differ), ``eat`` and ``mmin`` of ``A``;
    ``zneg``: both terms ``-0``."""
    a: Value
    b: Value
    sh: Value
    sa: Value
    sub: Value
    eat: Value
    mmin: Value
    zneg: Value


@dataclass(frozen=True)
class _Aligned:
    """Stage 5: ``b`` shifted right with its lost bits jammed into its LSB, ``a``; ``mmin`` clamped to
    ``[0, kmax]``; the rest as in ``_Operands``."""
    b: Value
    a: Value
    sa: Value
    sub: Value
    eat: Value
    mmin: Value
    zneg: Value


@dataclass(frozen=True)
class _Sum:
    """Stage 7: ``s = |A +- B|`` and the sum's ``sign``; ``eat``, ``mmin`` and ``zneg`` passed on."""
    s: Value
    sign: Value
    eat: Value
    mmin: Value
    zneg: Value


@dataclass(frozen=True)
class _Point:
    """Stage 9: the bit ``k`` below which ``s`` rounds, the exponent ``es``, ``normal`` (``k`` is the
    leading one, not the subnormal bound), ``szero`` (``s == 0``); ``s``, ``sign``, ``zneg``."""
    k: Value
    es: Value
    normal: Value
    szero: Value
    s: Value
    sign: Value
    zneg: Value


@dataclass(frozen=True)
class _Bits:
    """Stage 11: the 8 bits ``r0`` kept, the ``guard`` and ``sticky`` bits, the exponent field ``ef``,
    ``sat`` (the exponent reaches 255); ``szero``, ``sign``, ``zneg``."""
    r0: Value
    guard: Value
    sticky: Value
    ef: Value
    sat: Value
    szero: Value
    sign: Value
    zneg: Value


class ResidualAdder(wiring.Component):
    """``round_bf16(word x block + residual)``, the exact sum rounded once (one lane's value).

    Ports: ``en`` (in), ``word`` (in, ``lut_word.word(config)``), ``block`` (in,
    ``scale_decoder.block(config)``), ``residual`` (in, a BF16 code), ``out`` (out, BF16).
    Latency ``latency`` enabled edges (``stages(config)``).

    The arithmetic (each step a register stage, one carry chain or a few LUT levels):

    1. the lane's product as the formatter computes it (hdl.hif_formatter: ``p`` of
       ``P`` bits, leading one at bit ``P - 1`` or ``P - 2``, ``e0 = word.exp + kb``; bit
       ``P - 2`` weighs ``2^(e0 + 1 - 127)``); the residual's significand normalized to
       8 bits (``rn``, leading one at bit 7) with its biased exponent ``Er``;
    2. ``d0 = e0 + 1 - Er``: the product's reference bit against the residual's MSB;
    3. the larger operand ``A`` (the product when ``d0 >= 0``) is placed with that bit
       at bit ``T`` of a ``WA = T + 3``-bit accumulator (``T = max(P - 2, 7) + 3``:
       three exact bits below either operand), the other, ``B``, ``|d0|`` bits lower;
    4-5. ``B`` shifted right, every bit shifted out ORed into its LSB (jammed): ``B``
       rounded to odd at the accumulator's LSB;
    6-7. ``S = |A +- B|`` and its sign: with ``A`` exact this is the exact sum rounded to
       odd at the LSB, and a rounding to nearest two or more bits higher (any BF16
       result: ``A`` has at least 8 + 3 bits above it) is the exact sum's;
    8. the leading one ``m`` of ``S``;
    9. ``k = max(m, 1 - (E_A - T))``: the bit below which ``S`` rounds (BF16's 8 bits
       below ``m``, or the subnormal grid); ``E_S = E_A - T + m`` the exponent;
    10-11. ``S`` (padded with 8 zero bits) shifted right by ``k``: 8 bits, guard, sticky;
    12. round to nearest even on ``{exponent, mantissa}`` (a carry walks into the
       exponent); saturation detected as in the formatter;
    13. ``0x7F7F`` on saturation; an exact zero is ``+0`` unless both terms are ``-0``.
    """

    model = staticmethod(adder_model)

    #: the bits shifted out of the smaller operand are ORed into its LSB (tests break this)
    jam = True
    round_up = staticmethod(HifFormatter.round_up)

    def __init__(self, config: DecoderConfig):
        if config.output != "bf16":
            raise ValueError("the residual adder produces BF16")
        self.config = config
        self.multiplier_stages = PipelinedMultiplier.stages(config.scale.mbits + 1)
        super().__init__({
            "en": In(1),
            "word": In(lut_word.word(config)),
            "block": In(scale_decoder.block(config)),
            "residual": In(16),
            "out": Out(16),
        })

    @staticmethod
    def stages(config: DecoderConfig) -> int:
        return max(PipelinedMultiplier.stages(config.scale.mbits + 1), 2) + 11

    @property
    def latency(self) -> int:
        """Enabled edges from the inputs to ``out``: ``stages(config)``."""
        return self.stages(self.config)

    def elaborate(self, platform):
        m = Module()
        w = self._widths()
        stage = Stages(m, self.en)
        mul, operand_fields = self._operand_fields(m, stage, w)
        terms, p = self._differences(m, stage, w, mul, operand_fields)
        ops = self._operands(stage, w, terms, p)
        aligned = self._jammed_shift(stage, w, ops)
        total = self._sum(stage, w, aligned)
        point = self._rounding_point(m, stage, w, total)
        bits = self._rounding_bits(stage, w, point)
        out = self._rounded(stage, bits)
        m.d.comb += self.out.eq(out)
        assert stage.depth == self.latency, (stage.depth, self.latency)
        return m

    def _widths(self) -> _Widths:
        """The accumulator's window, the rounding point's bound and bits, the exponents' shapes."""
        T, WA = window(self.config)
        kmax = WA + 8                               # a rounding point past S's bits: all sticky
        e0_shape = signed(max(len(self.block.kb), len(self.word.exp) + 1) + 1)
        er_shape = signed(10)
        d_shape = signed(max(e0_shape.width, er_shape.width) + 3)
        return _Widths(T, WA, kmax, kmax.bit_length(), e0_shape, er_shape, d_shape)

    def _operand_fields(self, m, stage, w) -> tuple[PipelinedMultiplier, _Fields]:
        """The multiplier of the significands; stage 1: the product's exponent, zero and sign, the residual's fields."""
        cfg = self.config
        M, Ms = cfg.hif.mbits, cfg.scale.mbits
        word, blk, r = self.word, self.block, self.residual
        m.submodules.mul = mul = PipelinedMultiplier(M + 1, Ms + 1)
        m.d.comb += [mul.en.eq(self.en), mul.a.eq(Cat(word.frac, 1)), mul.b.eq(Cat(blk.frac, 1))]

        # 1: the product's exponent, zero and sign; the residual's fields
        re, rm = r[BF16.mbits:15], r[:BF16.mbits]
        rlz = leading_zeros_tree(m, rm, "rlz")
        return mul, _stage(
            stage, _Fields,
            e0=("e0_1", word.exp + blk.kb, w.e0), pzero=("pzero1", (word.exp == 0) | blk.zero, 1),
            psign=("psign1", word.sign ^ blk.sign, 1),
            er=("er1", Mux(re != 0, re, -rlz), w.er), rnorm=("rnorm1", re != 0, 1), rlz=("rlz1", rlz, len(rlz)),
            rm=("rm1", rm, BF16.mbits), rs=("rs1", r[15], 1), rzero=("rzero1", (re == 0) & (rm == 0), 1))

    def _differences(self, m, stage, w, mul, f: _Fields) -> tuple[_Differences, Value]:
        """Stage 2, delayed to the product: the exponent differences, the normalized residual ``rn``; ``p``."""
        T, d_shape = w.T, w.d
        e0, er = f.e0, f.er
        # 2: the exponent differences (both signs) and the terms the later stages need
        rn = Mux(f.rnorm, Cat(f.rm, 1), (f.rm << (f.rlz + 1))[:BF16.mbits + 1])
        diff = _stage(
            stage, _Differences,
            d0=("d0_2", e0 + 1 - er, d_shape), nd0=("nd0_2", er - e0 - 1, d_shape),
            eat_p=("eat_p2", e0 + 1 - T, d_shape), eat_r=("eat_r2", er - T, d_shape),
            mmin_p=("mmin_p2", T - e0, d_shape), mmin_r=("mmin_r2", T + 1 - er, d_shape),
            rn=("rn2", rn, BF16.mbits + 1), pzero=("pzero2", f.pzero, 1), psign=("psign2", f.psign, 1),
            rs=("rs2", f.rs, 1), rzero=("rzero2", f.rzero, 1))
        align = max(mul.latency, 2)
        # each register delayed under its own name (vars: the fields in their order, the registers' order)
        diff = _Differences(**{k: delay(m, self.en, s, align - 2, s.name) for k, s in vars(diff).items()})
        p = delay(m, self.en, mul.p, align - mul.latency, "p")
        stage.depth += align - 2
        return diff, p

    def _operands(self, stage, w, t: _Differences, p) -> _Operands:
        """Stage 3: the larger operand ``A`` in the accumulator, the unshifted ``B``, the clamped shift, the signs."""
        P = self.config.sig_bits
        T, WA, kbits, d_shape = w.T, w.WA, w.kbits, w.d
        pzero, psign, rs, rzero = t.pzero, t.psign, t.rs, t.rzero
        # 3: which operand is larger, the accumulator's A and the unshifted B, the shift
        # (each shift clamped beside the choice, not after it: a negative one is never used)
        prod_a = ~pzero & (rzero | ~t.d0[-1])
        p_acc = Cat(Const(0, T - (P - 2)), p)
        r_acc = Cat(Const(0, T - BF16.mbits), t.rn)

        def clamp(v):
            return Mux(v[-1] | (v >= WA), WA, v[:kbits])

        return _stage(
            stage, _Operands,
            a=("a_acc3", Mux(prod_a, p_acc, r_acc), unsigned(WA)),
            b=("b_pre3", Mux(prod_a, Mux(rzero, 0, r_acc), Mux(pzero, 0, p_acc)), unsigned(WA)),
            sh=("sh3", Mux(prod_a, clamp(t.d0), clamp(t.nd0)), unsigned(kbits)),
            sa=("sa3", Mux(prod_a, psign, rs), 1), sub=("sub3", psign ^ rs, 1),
            eat=("eat3", Mux(prod_a, t.eat_p, t.eat_r), d_shape),
            mmin=("mmin3", Mux(prod_a, t.mmin_p, t.mmin_r), d_shape),
            zneg=("zneg3", pzero & rzero & psign & rs, 1))

    def _jammed_shift(self, stage, w, ops: _Operands) -> _Aligned:
        """Stages 4-5: ``B`` shifted right, the bits shifted out jammed into its LSB (``B`` rounded to odd)."""
        WA, kmax, kbits, d_shape = w.WA, w.kmax, w.kbits, w.d
        mmin = ops.mmin
        # 4-5: B shifted right, the lost bits jammed into its LSB; the rounding point's lower bound clamped
        b1, lost1 = shift_right_sticky(ops.b, ops.sh[:2])
        b1, st1, shc, a_acc, s_a, sub, eat, mminc, zero_neg = stage(
            ("b4", b1, unsigned(WA)), ("st4", lost1, 1), ("sh4", ops.sh, unsigned(kbits)), ("a4", ops.a, unsigned(WA)),
            ("sa4", ops.sa, 1), ("sub4", ops.sub, 1), ("eat4", ops.eat, d_shape),
            ("mmin4", Mux(mmin[-1], 0, Mux(mmin >= kmax, kmax, mmin[:kbits])), unsigned(kbits)),
            ("zneg4", ops.zneg, 1))
        b2, lost2 = shift_right_sticky(b1, shc[2:], 4)
        return _stage(
            stage, _Aligned,
            b=("b5", b2 | ((lost2 | st1) if self.jam else 0), unsigned(WA)), a=("a5", a_acc, unsigned(WA)),
            sa=("sa5", s_a, 1), sub=("sub5", sub, 1), eat=("eat5", eat, d_shape),
            mmin=("mmin5", mminc, unsigned(kbits)), zneg=("zneg5", zero_neg, 1))

    def _sum(self, stage, w, ops: _Aligned) -> _Sum:
        """Stages 6-7: ``S = |A +- B|`` and its sign."""
        WA, kbits, d_shape = w.WA, w.kbits, w.d
        a_acc, b_acc = ops.a, ops.b
        # 6-7: |A +- B| and its sign
        s1, s2, s_a, sub, eat, mminc, zero_neg = stage(
            ("s1_6", Mux(ops.sub, a_acc - b_acc, a_acc + b_acc), signed(WA + 1)),
            ("s2_6", b_acc - a_acc, unsigned(WA)), ("sa6", ops.sa, 1), ("sub6", ops.sub, 1),
            ("eat6", ops.eat, d_shape), ("mmin6", ops.mmin, unsigned(kbits)), ("zneg6", ops.zneg, 1))
        neg = sub & s1[-1]
        return _stage(
            stage, _Sum,
            s=("s7", Mux(neg, s2, s1[:WA]), unsigned(WA)), sign=("sign7", s_a ^ neg, 1),
            eat=("eat7", eat, d_shape), mmin=("mmin7", mminc, unsigned(kbits)), zneg=("zneg7", zero_neg, 1))

    def _rounding_point(self, m, stage, w, total: _Sum) -> _Point:
        """Stages 8-9: the leading one of ``S``, the bit ``k`` below which it rounds and its exponent."""
        WA, kbits, d_shape = w.WA, w.kbits, w.d
        s = total.s
        # 8: the leading one
        msb, szero, s, sign, eat, mminc, zero_neg = stage(
            ("msb8", leading_one(m, s, "s_msb"), unsigned(kbits)), ("szero8", s == 0, 1), ("s8", s, unsigned(WA)),
            ("sign8", total.sign, 1), ("eat8", total.eat, d_shape), ("mmin8", total.mmin, unsigned(kbits)),
            ("zneg8", total.zneg, 1))

        # 9: where S rounds, and its exponent
        normal = msb >= mminc
        return _stage(
            stage, _Point,
            k=("k9", Mux(normal, msb, mminc), unsigned(kbits)), es=("es9", eat + msb, d_shape),
            normal=("normal9", normal, 1), szero=("szero9", szero, 1), s=("s9", s, unsigned(WA)),
            sign=("sign9", sign, 1), zneg=("zneg9", zero_neg, 1))

    def _rounding_bits(self, stage, w, point: _Point) -> _Bits:
        """Stages 10-11: ``S`` shifted right by ``k``: its 8 bits, guard and sticky; the exponent field."""
        WA, kbits = w.WA, w.kbits
        normal, es = point.normal, point.es
        # 10-11: 8 bits, guard and sticky: {S, 8 zeros} shifted right by k
        s_ext = Cat(Const(0, 8), point.s)
        y1, lost1 = shift_right_sticky(s_ext, point.k[:2])
        y1, st1, k, ef, sat, szero, sign, zero_neg = stage(
            ("y10", y1, unsigned(WA + 8)), ("st10", lost1, 1), ("k10", point.k, unsigned(kbits)),
            ("ef10", Mux(normal, es[:8], 0), unsigned(8)), ("sat10", normal & (es >= 255), 1),
            ("szero10", point.szero, 1), ("sign10", point.sign, 1), ("zneg10", point.zneg, 1))
        y2, lost2 = shift_right_sticky(y1, k[2:], 4)
        return _stage(
            stage, _Bits,
            r0=("r0_11", y2[1:9], unsigned(8)), guard=("guard11", y2[0], 1), sticky=("sticky11", st1 | lost2, 1),
            ef=("ef11", ef, unsigned(8)), sat=("sat11", sat, 1), szero=("szero11", szero, 1),
            sign=("sign11", sign, 1), zneg=("zneg11", zero_neg, 1))

    def _rounded(self, stage, bits: _Bits):
        """Stages 12-13: the BF16 word rounded to nearest even, saturated, its zero signed: ``out``'s value."""
        r0, ef = bits.r0, bits.ef
        # 12: round to nearest even; whether the result reaches exponent 255 (as hdl.hif_formatter)
        up = self.round_up(r0, bits.guard, bits.sticky)
        word15, sat, szero, sign, zero_neg = stage(
            ("word12", Cat(r0[:BF16.mbits], ef) + up, unsigned(15)),
            ("sat12", bits.sat | ef.all() | (ef[1:].all() & r0[:BF16.mbits].all() & up), 1),
            ("szero12", bits.szero, 1), ("sign12", bits.sign, 1), ("zneg12", bits.zneg, 1))

        # 13: saturate to 0x7F7F; an exact zero is +0 unless both terms were -0
        (out,) = stage(("out13", Mux(szero, Cat(Const(0, 15), zero_neg),
                                      Cat(Mux(sat, SATURATED, word15), sign)), unsigned(16)))
        return out
