"""Arithmetic building blocks of the datapath: leading and trailing zeros, a pipelined multiplier, delays, and the
pipelined stages the decoder, the residual path and the dot-product engine share (``stage_reg``,
``Stages``, ``shift_left``, ``leading_zeros_pipelined``).

``PipelinedMultiplier`` multiplies two small unsigned significands in LUT
logic over ``stages(b_bits)`` register stages: the partial products ``a << i``
gated by bit ``i`` of ``b``, summed in a tree of two-input adders, one level
per stage. Each stage is then one short carry chain, which is what lets the
datapath reach 200 MHz on ECP5: a MULT18X18D used combinationally takes
3.9 ns by itself, and yosys does not pack pipeline registers into it. A
constant bit of ``b`` (the hidden bit of a normalized significand) removes its
gate in synthesis.

``PipelinedMultiplier`` ports: ``en``, ``a``, ``b`` (in), ``p`` (out); latency
``latency`` enabled edges, one per adder-tree level built. ``model`` is ``a * b``.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


def trailing_zeros(value):
    """Trailing zeros of ``value`` within its width (its width for 0), a priority mux."""
    w = len(value)
    tz = Const(w, range(w + 1))
    for i in reversed(range(w)):              # the lowest set bit wins: the last Mux applied
        tz = Mux(value[i], i, tz)
    return tz


def leading_zeros(m: Module, value, name: str):
    """Leading zeros of ``value`` within its width (a priority encoder; 0 for a zero value)."""
    w = len(value)
    lz = Signal(range(w + 1), name=name)
    for i in range(w):                        # the highest set bit wins
        with m.If(value[i]):
            m.d.comb += lz.eq(w - 1 - i)
    return lz


def leading_zeros_tree(m: Module, value, name: str):
    """Leading zeros of ``value`` within its width (0 for a zero value, as ``leading_zeros``),
    as a tree of halves: ``log2(width)`` levels of 2:1 muxes, not a priority chain."""
    def lz(v):
        w = len(v)
        if w == 1:
            return Cat(~v[0]), v[0]           # (leading zeros of a 1-bit value, nonzero)
        lo_w = w // 2
        hi, lo = v[lo_w:], v[:lo_w]
        (lz_hi, nz_hi), (lz_lo, nz_lo) = lz(hi), lz(lo)
        out_w = w.bit_length()
        return Mux(nz_hi, lz_hi, (len(hi) + lz_lo)[:out_w]), nz_hi | nz_lo

    count, nonzero = lz(value)
    out = Signal(range(len(value) + 1), name=name)
    m.d.comb += out.eq(Mux(nonzero, count, 0))
    return out


CHUNK = 8                # leading_zeros_pipelined: per chunk of 8 bits, then across chunks


def stage_reg(m: Module, en, name: str, value, shape) -> Signal:
    """A reset-less register loaded from ``value`` when ``en`` is high: one pipeline stage."""
    r = Signal(shape, name=name, reset_less=True)
    with m.If(en):
        m.d.sync += r.eq(value)
    return r


class Stages:
    """Register stages on an enable: ``stage(*pairs)`` builds one stage, a reset-less register per
    ``(name, value, shape)`` loaded from ``value`` when ``en`` is high, and returns them; ``depth``
    counts the stages built (a component checks its latency against it)."""

    def __init__(self, m: Module, en):
        self.m, self.en, self.depth = m, en, 0

    def __call__(self, *pairs):
        self.depth += 1
        return [stage_reg(self.m, self.en, name, value, shape) for name, value, shape in pairs]


def delay(m: Module, en, value, stages: int, name: str):
    """``value`` through ``stages`` reset-less registers that advance on ``en``."""
    for s in range(stages):
        r = Signal.like(value, name=f"{name}_d{s}", reset_less=True)
        with m.If(en):
            m.d.sync += r.eq(value)
        value = r
    return value


def shift_stages(max_shift: int) -> int:
    """Stages of ``shift_left`` for amounts up to ``max_shift``: two bits of the amount per stage."""
    return max(1, (max_shift.bit_length() + 1) // 2)


def shift_left(m: Module, en, value, amount, width: int, name: str):
    """``value << amount`` truncated to ``width`` bits (signed if ``value`` is), two bits of ``amount``
    per stage (a 4:1 mux each): ``shift_stages(2^len(amount) - 1)`` stages."""
    shape = signed(width) if value.shape().signed else unsigned(width)
    for i in range(shift_stages(2 ** len(amount) - 1)):
        lo = 2 * i
        bits = amount[lo:lo + 2]
        choices = Array([value << (j << lo) for j in range(1 << len(bits))])
        value = stage_reg(m, en, f"{name}{i}", choices[bits], shape)
        amount = stage_reg(m, en, f"{name}_amt{i}", amount, amount.shape())
    return value


def chunks(width: int) -> list[tuple[int, int]]:
    """(lo, hi) bit ranges of ``CHUNK`` bits, the top one first (the last may be narrower)."""
    return [(max(0, hi - CHUNK), hi) for hi in range(width, 0, -CHUNK)]


def leading_zeros_pipelined(m: Module, en, value, name: str) -> Signal:
    """Leading zeros of ``value`` within its width (its width for 0), two stages later: per chunk
    of ``CHUNK`` bits (a priority mux) and its nonzero flag, then the first nonzero chunk's."""
    parts = chunks(len(value))
    lzc = [stage_reg(m, en, f"{name}_lz{c}", _chunk_lz(value[lo:hi]), unsigned(CHUNK.bit_length()))
           for c, (lo, hi) in enumerate(parts)]
    nzc = stage_reg(m, en, f"{name}_nz", Cat(value[lo:hi].any() for lo, hi in parts), unsigned(len(parts)))
    k = Const(len(value), range(len(value) + 1))
    for c in reversed(range(len(parts))):            # the first nonzero chunk from the top wins
        k = Mux(nzc[c], CHUNK * c + lzc[c], k)
    return stage_reg(m, en, name, k, range(len(value) + 1))


def _chunk_lz(value):
    """Leading zeros of a short ``value`` (a chunk) within its width, as a priority mux."""
    w = len(value)
    lz = Const(w, range(w + 1))
    for i in range(w):                        # the highest set bit wins: the last Mux applied
        lz = Mux(value[i], w - 1 - i, lz)
    return lz


def model(a, b) -> np.ndarray:
    """The multiplier's product (unsigned integers)."""
    return np.asarray(a, dtype=np.int64) * np.asarray(b, dtype=np.int64)


class PipelinedMultiplier(wiring.Component):
    """``p = a * b`` (unsigned), ``stages(b_bits)`` cycles after ``a``, ``b`` with ``en`` high."""

    model = staticmethod(model)

    def __init__(self, a_bits: int, b_bits: int):
        self.a_bits, self.b_bits = a_bits, b_bits
        super().__init__({"en": In(1), "a": In(unsigned(a_bits)), "b": In(unsigned(b_bits)),
                          "p": Out(unsigned(a_bits + b_bits))})

    @staticmethod
    def stages(b_bits: int) -> int:
        """One stage per adder-tree level (at least one: the result is registered)."""
        return max(1, (b_bits - 1).bit_length())

    @property
    def latency(self) -> int:
        """Enabled edges from ``a``, ``b`` to ``p``: ``stages(b_bits)``."""
        return self.stages(self.b_bits)

    def elaborate(self, platform):
        m = Module()
        a_max = (1 << self.a_bits) - 1
        terms = [(Mux(self.b[i], self.a << i, 0), a_max << i) for i in range(self.b_bits)]
        for level in range(self.latency):
            sums = []
            for j in range(0, len(terms), 2):
                pair = terms[j:j + 2]
                top = sum(t[1] for t in pair)               # the largest value the sum can take
                r = Signal(unsigned(top.bit_length()), name=f"sum{level}_{j // 2}", reset_less=True)
                with m.If(self.en):
                    m.d.sync += r.eq(pair[0][0] + pair[1][0] if len(pair) == 2 else pair[0][0])
                sums.append((r, top))
            terms = sums
        assert len(terms) == 1, "the adder tree must end in one sum after its levels"
        m.d.comb += self.p.eq(terms[0][0])
        return m
