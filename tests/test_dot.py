"""golden.dot, the dot-product engine's bit-exact model: hand-worked blocks (expected values worked out
in the comments, not by the code under test), an independent exact oracle (fractions.Fraction and an
integer round-to-nearest-even into binary32) over random layouts with hypothesis, the derived float64
error bound on real MiniLM layers (with and without sparse residuals), and a demonstration that each
check catches a wrong rounding or a wrong order (docs/dot.md)."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sop.golden import dot
from sop.golden.decoder import decode_layer
from sop.golden.formats import FLOAT32_MAX, FORMATS, get_format
from sop.golden.hif import DEFAULT_HIF, hif_format
from sop.golden.layout import BlockLayout, LayerStream, Sparse, pack_blocks, unpack_blocks

BF16, E4M3 = FORMATS["bf16"], FORMATS["e4m3"]
UE3M3 = get_format("ue3m3")
FMAX = FLOAT32_MAX
# sop4-like with blocks of 8: 8 header bits (UE3M3, sign, select) + 8 x 4-bit codes
SMALL = BlockLayout(4, 8, UE3M3, signed_scale=True, select_bit=True)


# -- the independent oracle --------------------------------------------------------------------------

def rne_float32(v: Fraction) -> float:
    """``v`` rounded to binary32 by integers alone: nearest, ties to even, subnormals, saturating.
    A nonzero value that rounds to zero keeps its sign."""
    if v == 0:
        return 0.0
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if a < Fraction(2) ** e:
        e -= 1                                          # now 2^e <= a < 2^(e + 1)
    q = max(e - 23, -149)                               # the ulp: 24 significand bits, or the subnormal one
    scaled = a / Fraction(2) ** q
    k = scaled.numerator // scaled.denominator
    rem = scaled - k
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and k % 2 == 1):
        k += 1
    mag = FMAX if e >= 128 else min(math.ldexp(k, q), FMAX)        # past 2^128 (and float64): saturated
    return -mag if v < 0 else mag


def exact(value) -> Fraction:
    return Fraction(float(value))


def oracle(stream: LayerStream, x: np.ndarray, act) -> tuple[np.ndarray, np.ndarray]:
    """(block values (batch, rows, bpr), y (batch, rows)) by Fractions, one weight at a time."""
    lay, g = stream.layout, stream.layout.group
    headers, codes = unpack_blocks(lay, stream.blocks)
    scode, sign, select = lay.split_header(headers)
    hif_values = stream.hif.values
    bpr = stream.cols // g
    xs = np.atleast_2d(x)
    V = np.zeros((len(xs), stream.rows, bpr))
    y = np.zeros((len(xs), stream.rows))
    rows_of = stream.sparse.index.astype(np.int64) // stream.cols
    rho = BF16.decode(stream.sparse.value_bf16)
    for i, xv in enumerate(xs):
        for r in range(stream.rows):
            acc = Fraction(0)
            for b in range(bpr):
                n = r * bpr + b
                s = sum((exact(hif_values[stream.luts[select[n], codes[n, j]]]) * exact(xv[b * g + j])
                         for j in range(g)), Fraction(0))
                scale = exact(lay.scale.values[scode[n]]) * Fraction(2) ** stream.offset
                V[i, r, b] = rne_float32(-s * scale if sign[n] else s * scale)
                acc = Fraction(rne_float32(acc + exact(V[i, r, b])))     # FP32 additions, block order
            for k in np.flatnonzero(rows_of == r):                        # then the residuals, in order
                term = rne_float32(exact(rho[k]) * exact(xv[int(stream.sparse.index[k]) % stream.cols]))
                acc = Fraction(rne_float32(acc + Fraction(term)))
            y[i, r] = float(acc)
    return V, y


def same_float32(got, want) -> bool:
    """Bit for bit, signed zeros included."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float64).astype(np.float32)
    return got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))


# -- building streams by hand ------------------------------------------------------------------------

def lut(values) -> np.ndarray:
    """A 16-entry bank A (and bank B the same) of HIF codes for ``values`` (the rest 0)."""
    v = np.zeros(16)
    v[:len(values)] = values
    bank = DEFAULT_HIF.encode(v).astype(np.int64)
    assert np.array_equal(DEFAULT_HIF.decode(bank), v), "a hand value HIF does not hold"
    return np.stack([bank, bank])


def small_stream(values, codes, scale=1.0, sign=0, offset=0, rows=1, sparse=None) -> LayerStream:
    """``rows`` rows of ``len(codes[0]) * 8`` columns: every block with the same scale and sign."""
    codes = np.asarray(codes, np.int64).reshape(-1, 8)
    n = len(codes)
    scode = int(UE3M3.encode(scale))
    assert UE3M3.values[scode] == scale
    headers = SMALL.make_header(np.full(n, scode), np.full(n, sign), np.zeros(n, np.int64))
    return LayerStream(SMALL, DEFAULT_HIF, lut(values), offset, rows, n * 8 // rows,
                       pack_blocks(SMALL, headers, codes), sparse or Sparse())


# -- hand-worked blocks ------------------------------------------------------------------------------

def test_a_plain_block():
    # LUT: code 0 -> 0, 1 -> 1, 2 -> 0.5, 3 -> -0.25, 4 -> 2, 5 -> -1, 6 -> 0.125, 7 -> 3
    s = small_stream([0, 1, 0.5, -0.25, 2, -1, 0.125, 3], [[1, 2, 3, 0, 4, 5, 6, 7]],
                     scale=1.5, sign=1, offset=-1)
    x = np.array([2, 3, 4, 5, 0.5, 1, 8, -1], np.float32)
    # products: 1*2 + 0.5*3 - 0.25*4 + 0*5 + 2*0.5 - 1*1 + 0.125*8 + 3*(-1) = 2 + 1.5 - 1 + 0 + 1 - 1 + 1 - 3
    #         = 0.5;  times the scale 1.5 * 2^-1 and the block sign: -(0.5 * 0.75) = -0.375
    assert same_float32(dot.block_values(s, x), [[[-0.375]]])
    assert same_float32(dot.gemv(s, x), [-0.375])


def check_ties():
    s = small_stream([0, 1], [[1, 1, 1, 0, 0, 0, 0, 0]])
    x = np.array([[2 ** 24, 1, 0, 0, 0, 0, 0, 0],          # 2^24 + 1: halfway between 2^24 and 2^24 + 2;
                  #                                         ties to the even significand: 2^24
                  [2 ** 24, 3, 0, 0, 0, 0, 0, 0],           # 2^24 + 3: halfway between 2^24 + 2 (odd,
                  #                                         2^23 + 1 ulps) and 2^24 + 4 (even): 2^24 + 4
                  [2 ** 24, 1, 2 ** -10, 0, 0, 0, 0, 0]],   # 2^24 + 1 + 2^-10: above half: 2^24 + 2
                 np.float32)
    assert same_float32(dot.gemv(s, x)[:, 0], [2 ** 24, 2 ** 24 + 4, 2 ** 24 + 2])


def test_ties_go_to_even_and_the_sum_is_exact_below_the_round_bit():
    check_ties()


def test_the_block_sum_is_exact_across_the_whole_exponent_range():
    s = small_stream([0, 1], [[1, 1, 1, 0, 0, 0, 0, 0]])
    x = np.array([2.0 ** 100, 2.0 ** -100, -(2.0 ** 100), 0, 0, 0, 0, 0], np.float32)
    # exact: 2^100 + 2^-100 - 2^100 = 2^-100 (a binary32 normal); a float32 running sum of the
    # products in the same order loses 2^-100 against 2^100 and gives 0
    assert same_float32(dot.gemv(s, x), [2.0 ** -100])
    naive = np.float32(0)
    for p in x[:3]:
        naive = np.float32(naive + p)
    assert naive == 0


def test_subnormal_activations_and_results_are_exact_then_rounded_once():
    # HIF code 1 = 2^-10 (HIF's smallest subnormal), BF16 2^-133 (its smallest subnormal):
    # product 2^-143; UE3M3's smallest value is 2^-5 (subnormal, m = 1), offset -2: scale 2^-7
    s = small_stream([0, 2.0 ** -10], [[1, 0, 0, 0, 0, 0, 0, 0]], scale=2.0 ** -5, offset=-2)
    x = np.zeros((4, 8), np.float32)
    x[:, 0] = [2.0 ** -133, 3 * 2.0 ** -133, -(2.0 ** -133), 2.0 ** -120]
    # 2^-150 is half the smallest binary32 subnormal 2^-149: a tie between 0 and 1 ulp, to the even 0: +0
    # 3 * 2^-150 = 1.5 ulps of 2^-149: a tie between 1 and 2 ulps, to the even 2: 2^-148
    # -2^-150: ties to -0 (the sign kept); y = +0 + -0 = +0
    # 2^-120 * 2^-10 * 2^-7 = 2^-137: a binary32 subnormal, exact
    v = dot.block_values(s, x)[:, 0, 0]
    assert same_float32(v, [0.0, 2.0 ** -148, -0.0, 2.0 ** -137])
    assert same_float32(dot.gemv(s, x)[:, 0], [0.0, 2.0 ** -148, 0.0, 2.0 ** -137])


def test_overflow_saturates_in_the_block_and_in_the_sum():
    # HIF 7.9375 (its max), UE3M3 30 (its max) x 2^127 (the largest offset), x = 2^100:
    # 7.9375 * 2^100 * 30 * 2^127 >> FLT_MAX: each block saturates to +-FLT_MAX, and
    # FLT_MAX + FLT_MAX saturates again instead of overflowing to Inf
    s = small_stream([0, 7.9375], [[1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]], scale=30.0,
                     offset=127)
    x = np.array([([2.0 ** 100] + [0] * 7) * 2, ([-(2.0 ** 100)] + [0] * 7) * 2], np.float32)
    assert same_float32(dot.block_values(s, x)[:, 0, 0], [FMAX, -FMAX])
    assert same_float32(dot.gemv(s, x)[:, 0], [FMAX, -FMAX])


def check_block_order():
    # three blocks of one row, values 1, 2^-24, 2^-24:
    # block order: (+0 + 1) + 2^-24 = 1 + 2^-24, a tie between 1 and 1 + 2^-23: even -> 1; again -> 1
    # (reversed, 2^-24 + 2^-24 = 2^-23 is exact and 2^-23 + 1 = 1 + 2^-23 is a binary32)
    s = small_stream([0, 1], [[1, 0, 0, 0, 0, 0, 0, 0]] * 3)
    x = np.zeros(24, np.float32)
    x[[0, 8, 16]] = [1, 2.0 ** -24, 2.0 ** -24]
    assert same_float32(dot.block_values(s, x)[0, 0], [1, 2.0 ** -24, 2.0 ** -24])
    assert same_float32(dot.gemv(s, x), [1.0])


def check_wide_block_on_the_float64_route():
    """A block float64 cannot sum exactly: products ``p0 = H X``, ``p1 = H X 2^-39``, ``p2 = -H X``
    with ``H = 127/64`` (HIF) and ``X = 255/128`` (BF16): 15-bit significands 39 binades apart,
    so ``p0 + p1`` needs 54 bits. The exact sum is ``p1`` (15 bits, a float32), what the limbs
    give; float64 rounds ``p0 + p1`` and leaves ``p1`` off by one of its units."""
    h, x_ = 127 / 64, 255 / 128
    s = small_stream([0, h, -h], [[1, 1, 2, 0, 0, 0, 0, 0]])
    x = np.array([x_, x_ * 2.0 ** -39, x_, 0, 0, 0, 0, 0], np.float32)
    assert dot.block_values(s, x)[0, 0, 0] == np.float32(h * x_ * 2.0 ** -39)


def test_a_block_past_the_float64_span_takes_the_exact_limbs():
    assert dot.float64_span(DEFAULT_HIF, BF16, 8, 4) < 39        # the limbs' route, unless mutated
    check_wide_block_on_the_float64_route()


def check_the_float64_span_is_tight():
    """Blocks one binade past ``float64_span`` (31 here: products spanning 32 binades): the sum A fits
    float64, but A * Ss (Ss = 15) is an odd 54-bit integer whose float64 rounding lands on a binary32
    midpoint, which float32 then breaks to even the wrong way (one ulp low with the low bits 2^29 + 1 under
    an even kept part, one ulp high with 2^29 - 1 under an odd one). Products as (Sh * Sx, binade)."""
    top = [(127 * 255, 32)] * 5                                   # five maximal products at the top
    for lows in ([(8775, 0), (31125, 3), (20203, 16)], [(8645, 0), (-25645, 2), (25125, 15)]):
        h, x = [], []
        for p, shift in lows + top:
            sh = next(d for d in range(64, 128) if abs(p) % d == 0 and 128 <= abs(p) // d < 256)
            h.append(sh * 2.0 ** -4)                                # HIF's top binade
            x.append(math.copysign(abs(p) // sh * 2.0 ** (shift - 46), p))
        stream = small_stream([0, *h], [list(range(1, 9))], scale=1.875)
        x = np.array(x, np.float32)
        assert same_float32(dot.block_values(stream, x, "bf16"), oracle(stream, x, "bf16")[0])


def test_the_float64_span_is_tight():
    assert dot.float64_span(DEFAULT_HIF, BF16, 8, 4) == 31
    check_the_float64_span_is_tight()


def test_blocks_are_summed_in_block_order_each_addition_rounded():
    check_block_order()


def check_residuals_after_the_blocks():
    # one block with value 1 (code 1 = 1.0 at column 0; columns 1, 2 decode to 0), residuals
    # 2^-24 at columns 1 and 2 with x = 1: terms 2^-24, 2^-24 added after the block:
    # (1 + 2^-24) -> 1 (tie to even), again -> 1. Inside the exact block sum they would give 1 + 2^-23.
    one_tiny = int(BF16.encode(2.0 ** -24))
    s = small_stream([0, 1], [[1, 0, 0, 0, 0, 0, 0, 0]],
                     sparse=Sparse(np.array([1, 2], np.uint32), np.array([one_tiny] * 2, np.uint16)))
    x = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)
    assert same_float32(dot.gemv(s, x), [1.0])
    # and a residual scaled by x: 0.75 * 2 = 1.5 exact, 1 + 1.5 = 2.5
    s2 = dataclasses.replace(s, sparse=Sparse(np.array([3], np.uint32), BF16.encode([0.75]).astype(np.uint16)))
    assert same_float32(dot.gemv(s2, np.array([1, 0, 0, 2, 0, 0, 0, 0], np.float32)), [2.5])


def test_sparse_residuals_are_rounded_terms_added_after_the_row_blocks():
    check_residuals_after_the_blocks()


def test_e4m3_activations():
    s = small_stream([0, 1, -0.5], [[1, 2, 1, 0, 0, 0, 0, 0]], scale=1.5)
    # E4M3 holds 448, 2^-9 (its smallest subnormal) and 0.875; 448 - 0.5 * 2^-9 + 0.875 = 448.875 - 2^-10,
    # times 1.5: 673.3125 - 1.5 * 2^-10; binary32 holds it (the ulp at 512 is 2^-14)
    x = np.array([448, 2.0 ** -9, 0.875, 0, 0, 0, 0, 0], np.float32)
    want = (448 + 0.875 - 2.0 ** -10) * 1.5
    assert same_float32(dot.gemv(s, x, "e4m3"), [want])


def test_batches_give_one_row_per_vector():
    s = small_stream([0, 1, 2], [[1, 2, 0, 0, 0, 0, 0, 0], [2, 2, 0, 0, 0, 0, 0, 0]], rows=2)
    x = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0.5, -1, 0, 0, 0, 0, 0, 0]], np.float32)
    # row 0 = (1, 2), row 1 = (2, 2): W x for x0 = (1, 1): 3, 4; for x1 = (0.5, -1): -1.5, -1
    assert same_float32(dot.gemv(s, x), [[3, 4], [-1.5, -1]])
    assert same_float32(dot.gemv(s, x[1]), [-1.5, -1])


@pytest.mark.parametrize("bad,what", [
    (np.nan, "not finite"), (np.inf, "not finite"), (1 + 2.0 ** -10, "not exactly representable in bf16"),
])
def test_activations_that_are_not_finite_or_not_held_are_refused(bad, what):
    s = small_stream([0, 1], [[1, 0, 0, 0, 0, 0, 0, 0]])
    x = np.zeros(8, np.float32)
    x[5] = bad
    with pytest.raises(ValueError, match=rf"x\[5\].*{what}"):
        dot.gemv(s, x)
    with pytest.raises(ValueError, match="not exactly representable in e4m3"):
        dot.gemv(s, np.full(8, 500.0, np.float32), "e4m3")     # beyond E4M3's 448
    with pytest.raises(ValueError, match="entries per vector"):
        dot.gemv(s, np.zeros(9, np.float32))


def test_bfloat16_activations_numpy_cannot_name_as_floats_are_taken():
    # an ml_dtypes bfloat16 or float8 array (numpy's kind "V") was refused as "not floating point", and a
    # torch bfloat16 tensor was torch's TypeError "Got unsupported ScalarType BFloat16" (an outside probe)
    import ml_dtypes
    import torch

    s = small_stream([0, 1, 2], [[1, 2, 0, 0, 0, 0, 0, 0], [2, 2, 0, 0, 0, 0, 0, 0]], rows=2)
    x = np.array([[1, 1, 0, 0, 0, 0, 0, -3], [0.5, -1, 0, 0, 0, 0, 0, 0]], np.float32)
    want = dot.gemv(s, x)
    assert same_float32(dot.gemv(s, x.astype(ml_dtypes.bfloat16)), want)
    assert same_float32(dot.gemv(s, torch.from_numpy(x).bfloat16()), want)
    assert same_float32(dot.gemv(s, x.astype(ml_dtypes.float8_e4m3fn), "e4m3"), dot.gemv(s, x, "e4m3"))
    with pytest.raises(ValueError, match="must be floating point, got int4"):
        dot.gemv(s, np.zeros(8, ml_dtypes.int4))


# -- the accumulator width ----------------------------------------------------------------------------

def test_the_documented_widths_of_the_operating_points():
    widths = {(a["point"], a["act"]): a["bits"] for a in dot.operating_point_accumulators()}
    assert widths == {("sop4-g16", "bf16"): 279, ("sop4-g16", "e4m3"): 36,
                      ("e2m3-ue4m4-g16", "bf16"): 279, ("e2m3-ue4m4-g16", "e4m3"): 36}
    text = (Path(__file__).resolve().parent.parent / "docs" / "dot.md").read_text()
    assert "279" in text and "36" in text


@pytest.mark.parametrize("act", [BF16, E4M3])
@pytest.mark.parametrize("g", [8, 64])
def test_the_width_holds_the_worst_block_and_no_fewer_bits_do(act, g):
    acc = dot.accumulator(DEFAULT_HIF, act, g)
    # worst |A|: g products of the largest significands at the largest exponents, in LSB units
    big_h = (2 ** (DEFAULT_HIF.mbits + 1) - 1) * 2 ** (7 - DEFAULT_HIF.bias - DEFAULT_HIF.mbits)
    big_x = Fraction(act.max)
    small = Fraction(2) ** (1 - DEFAULT_HIF.bias - DEFAULT_HIF.mbits) * Fraction(act.min_positive)
    worst = g * Fraction(big_h) * big_x / small
    assert worst.denominator == 1 and small == Fraction(2) ** acc.lsb_exp
    assert -(2 ** (acc.bits - 1)) <= -worst and worst < 2 ** (acc.bits - 1)   # fits W bits signed
    assert worst >= 2 ** (acc.bits - 2)                                         # W - 1 would not


# -- the oracle over random layouts ---------------------------------------------------------------------

def _layouts():
    out = []
    for name in ("ue3m3", "ue2m4", "ue5m1", "ue4m3", "ue4m4", "ue5m3", "ue8m0"):
        f = get_format(name)
        for signed in (False, True):
            for select in (False, True):
                if (f.bits + signed + select) % 8 == 0:
                    out.append((f, signed, select))
    return out


LAYOUT_CHOICES = _layouts()


def _finite_codes(fmt, rng, n, exp_window) -> np.ndarray:
    """n finite codes of a float format, exponent fields in a window (a narrow one: cancellation, ties)."""
    E, M = fmt.ebits, fmt.mbits
    codes = ((rng.integers(0, 2, n) << (E + M)) | (rng.integers(exp_window[0], exp_window[1] + 1, n) << M)
             | rng.integers(0, 1 << M, n))
    nan = ~np.isfinite(fmt.values[codes])
    codes[nan] &= ~((1 << M) - 1)                        # E4M3's NaN (S.1111.111): drop the mantissa
    assert np.isfinite(fmt.values[codes]).all()
    return codes


@st.composite
def cases(draw):
    """A random layer stream (every valid header of seven scale formats, 4/6-bit codes, g 8..64, any HIF),
    random activations of one format with exponents in a drawn window, and up to 4 sparse entries."""
    scale, signed, select = draw(st.sampled_from(LAYOUT_CHOICES))
    k, g = draw(st.sampled_from([4, 6])), draw(st.sampled_from([8, 16, 32, 64]))
    lay = BlockLayout(k, g, scale, signed, select)
    E = draw(st.integers(1, 5))
    hif = hif_format(draw(st.integers(0, 10)), E, draw(st.integers(0, (1 << E) - 1)))
    rows, bpr, batch = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    act = draw(st.sampled_from([BF16, E4M3]))
    top = (1 << act.ebits) - (2 if act.specials == "ieee" else 1)
    lo = draw(st.integers(0, top))
    window = (lo, draw(st.integers(lo, min(top, lo + draw(st.sampled_from([0, 2, 8, 300]))))))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    n = rows * bpr
    luts = rng.integers(0, 1 << hif.bits, (lay.banks, 1 << k))
    finite_scales = np.flatnonzero(np.isfinite(scale.values))
    headers = lay.make_header(rng.choice(finite_scales, n), rng.integers(0, 1 + signed, n),
                              rng.integers(0, 1 + select, n))
    codes = rng.integers(0, 1 << k, (n, g))
    x = act.decode(_finite_codes(act, rng, batch * bpr * g, window)).reshape(batch, bpr * g)
    idx = np.sort(rng.choice(n * g, size=draw(st.integers(0, 4)), replace=False))
    rho = _finite_codes(BF16, rng, len(idx), (0, 254))
    stream = LayerStream(lay, hif, luts, draw(st.integers(-128, 127)), rows, bpr * g,
                         pack_blocks(lay, headers, codes),
                         Sparse(idx.astype(np.uint32), rho.astype(np.uint16)))
    return stream, x, act


@settings(max_examples=60, deadline=None)
@given(cases())
def test_block_values_and_rows_equal_the_exact_oracle(case):
    """Both routes of golden's block sums (float64 where exact, the limb accumulator for the
    rest; docs/dot.md section 6) give the oracle's bits: once as chosen, once all on limbs."""
    stream, x, act = case
    V, y = oracle(stream, x, act)
    assert same_float32(dot.block_values(stream, x, act), V)
    assert same_float32(dot.gemv(stream, x, act), y)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dot, "FLOAT64_ROUTE", False)
        assert same_float32(dot.block_values(stream, x, act), V)


WIDE = BlockLayout(4, 16, get_format("ue11m4b1060"), signed_scale=True)     # scales from 2^-1067 to 2^988


@pytest.mark.parametrize("blocks, offset, x", [
    ([((2047 << 4) | 15, 0)], 127, np.ones(16)),                   # a block past float64: saturates
    ([((2047 << 4) | 15, 0), ((2047 << 4) | 15, 1)], 127, np.ones(32)),   # +FLT_MAX + -FLT_MAX = +0
    ([((2047 << 4) | 15, 0)], 127, np.zeros(16)),                  # A = 0 under a scale past float64: +0
    ([(15, 1)], -128, np.ones(16)),                                # below float64's least subnormal: -0
    ([(15, 0), (1 << 4, 1)], 100, np.ones(32))])                   # in range: the float64 route, float32's 0s
def test_a_scale_format_past_float64s_range_takes_the_exact_route(blocks, offset, x):
    """The float64 route holds a block exactly only inside float64's exponent range: with a scale format as
    wide as ue11m4b1060 (which layer streams may carry) it gave Inf, NaN (0 * Inf) and +0 for a -0."""
    luts = np.zeros((1, 16), np.int64)
    luts[0, 1] = 5 << 6                                            # HIF 1.0
    codes = np.ones((len(blocks), 16), np.int64)
    headers = WIDE.make_header(np.array([c for c, _ in blocks]), np.array([sg for _, sg in blocks]))
    stream = LayerStream(WIDE, DEFAULT_HIF, luts, offset, 1, 16 * len(blocks), pack_blocks(WIDE, headers, codes))
    V, y = oracle(stream, x.astype(np.float32), "bf16")
    assert same_float32(dot.block_values(stream, x.astype(np.float32), "bf16"), V)
    assert same_float32(dot.gemv(stream, x.astype(np.float32), "bf16"), y[0])
    assert np.isfinite(V).all()


# -- each check can fail ----------------------------------------------------------------------------------

real_accumulate = dot.accumulate_blocks


def test_the_checks_catch_a_wrong_rounding_a_wrong_order_and_residuals_in_the_block(monkeypatch):
    with monkeypatch.context() as m:                 # round half up instead of half to even (limbs)
        m.setattr(dot, "FLOAT64_ROUTE", False)
        m.setattr(dot, "_rne_increment", lambda round_bit, sticky, lsb: round_bit)
        with pytest.raises(AssertionError):
            check_ties()
    with monkeypatch.context() as m:                 # float64 trusted 8 bits past its significand
        m.setattr(dot, "float64_span", lambda *a, real=dot.float64_span: real(*a) + 8)
        with pytest.raises(AssertionError):
            check_wide_block_on_the_float64_route()
    with monkeypatch.context() as m:                 # ... or one bit
        m.setattr(dot, "float64_span", lambda *a, real=dot.float64_span: real(*a) + 1)
        with pytest.raises(AssertionError):
            check_the_float64_span_is_tight()
    with monkeypatch.context() as m:                 # the blocks of a row summed last to first
        m.setattr(dot, "accumulate_blocks", lambda v: real_accumulate(v[..., ::-1]))
        with pytest.raises(AssertionError):
            check_block_order()
    with monkeypatch.context() as m:                 # residual terms summed exactly, then added once
        def lumped(y, rows, terms):
            total = np.zeros_like(y, dtype=np.float64)
            np.add.at(total.T, rows, terms.T.astype(np.float64))
            return (y + total).astype(np.float32)
        m.setattr(dot, "add_residuals", lumped)
        with pytest.raises(AssertionError):
            check_residuals_after_the_blocks()
    # and the oracle comparison sees one ulp
    s = small_stream([0, 1, 0.5, -0.25], [[1, 2, 3, 1, 2, 3, 1, 2]], scale=1.25, offset=-3)
    x = BF16.quantize(np.random.default_rng(0).standard_normal(8)).astype(np.float32)
    V, y = oracle(s, x, BF16)
    assert same_float32(dot.block_values(s, x), V)
    assert not same_float32(np.nextafter(dot.block_values(s, x), np.float32(np.inf)), V)


# -- the float64 bound on real layers -----------------------------------------------------------------------

U32 = 2.0 ** -24


def gamma(n, u=U32):
    return n * u / (1 - n * u)


def error_bound(stream: LayerStream, x: np.ndarray) -> np.ndarray:
    """docs/dot.md, section 5: |y - W x| <= gamma_n * sum_i |t*_i| + (1 + gamma_{n-1}) n 2^-150 per row,
    n = blocks per row + the row's residual entries, t*_i the exact block values and residual
    terms; plus the float64 reference's own error (gamma^64 of the cols + 2 terms of |w||x|)."""
    g, bpr = stream.layout.group, stream.cols // stream.layout.group
    wb = decode_layer(dataclasses.replace(stream, sparse=Sparse()))              # the blocks alone, exact
    blocks = np.abs(np.einsum("rbj,ibj->irb", wb.reshape(stream.rows, bpr, g), x.reshape(len(x), bpr, g)))
    t_abs = blocks.sum(axis=2)
    n = np.full(stream.rows, bpr)
    wr = np.zeros_like(wb)
    if len(stream.sparse):
        idx = stream.sparse.index.astype(np.int64)
        wr.reshape(-1)[idx] = BF16.decode(stream.sparse.value_bf16)
        n = n + np.bincount(idx // stream.cols, minlength=stream.rows)
        t_abs = t_abs + np.abs(x) @ np.abs(wr).T
    abs_wx = np.abs(x) @ (np.abs(wb) + np.abs(wr)).T
    ref_err = gamma(stream.cols + 2, 2.0 ** -53) * abs_wx * 2
    return gamma(n) * t_abs * (1 + 2.0 ** -40) + (1 + gamma(n - 1)) * n * 2.0 ** -150 + ref_err


MINILM = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.weight"]


@pytest.fixture(scope="module")
def minilm_streams():
    from sop.quantize.models import open_model
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.sparse import add_sparse

    src = open_model("minilm")
    out = {}
    for name in MINILM:
        w = src.load(name).astype(np.float32)
        for fmt, density in (("sop4-g16", 0.02), ("e2m3-ue4m4-g16", 0.0025)):
            res = get_quant_format(fmt).quantize(w)
            out[name, fmt] = res.stream
            out[name, fmt + "+sp"] = add_sparse(res.stream, w, res.recon, int(density * w.size))[0]
    return out


def activations(rng, batch, cols, act):
    x = rng.standard_normal((batch, cols)) * rng.choice([0.05, 1, 20], size=(batch, 1))
    x[:, rng.integers(0, cols, 4)] *= 50                                        # a few outlier channels
    return act.quantize(np.clip(x, -act.max, act.max)).astype(np.float32)


def measured_vs_bound(stream, x, act):
    y = dot.gemv(stream, x, act)
    ref = x.astype(np.float64) @ decode_layer(stream).T
    err = np.abs(y - ref)
    bound = error_bound(stream, x.astype(np.float64))
    return err, bound


@pytest.mark.parametrize("act", [BF16, E4M3])
def test_minilm_layers_are_within_the_derived_float64_bound(minilm_streams, act):
    rng = np.random.default_rng(11)
    worst = 0.0
    for (name, fmt), stream in minilm_streams.items():
        x = activations(rng, 3, stream.cols, act)
        err, bound = measured_vs_bound(stream, x, act)
        assert (err <= bound).all(), (name, fmt, float((err / bound).max()))
        worst = max(worst, float((err / bound).max()))
    assert 0 < worst < 1


@pytest.mark.parametrize("act", [BF16, E4M3])
def test_both_routes_give_the_same_bits_on_real_layers(minilm_streams, act, monkeypatch):
    """Real MiniLM blocks and spread activations (outlier channels, three magnitudes): the
    float64 route golden takes for them gives the limb accumulator's bits. (Real blocks all
    fit float64; the limb route's own check is the oracle over random layouts above.)"""
    rng = np.random.default_rng(12)
    for (name, fmt), stream in minilm_streams.items():
        x = activations(rng, 3, stream.cols, act)
        chosen = dot.block_values(stream, x, act)
        with monkeypatch.context() as m:
            m.setattr(dot, "FLOAT64_ROUTE", False)
            assert same_float32(chosen, dot.block_values(stream, x, act)), (name, fmt)


def test_the_forward_pass_takes_a_layers_products_from_the_engine():
    """quantize.e2e's ``products`` hook (the demo's dot-engine step): a linear computed by
    golden.dot.gemv from a sop4-g16 stream moves the sentence embedding as little as the
    decoded weights do; a hook that is ignored, or that returns zeros, is told apart."""
    from sop.quantize.calib import heldout_sentences
    from sop.quantize.e2e import Bert, embedding_fidelity
    from sop.quantize.models import minilm_folder, open_model
    from sop.quantize.schemes import get_quant_format

    bert, sentences = Bert(minilm_folder()), heldout_sentences(3)
    name = "encoder.layer.0.intermediate.dense.weight"
    res = get_quant_format("sop4-g16").quantize(open_model("minilm").load(name).astype(np.float32))
    ref = bert.embed(sentences)
    decoded = bert.embed(sentences, weights={name: res.recon})
    seen = []

    def engine(x):
        seen.append(x.shape)
        return dot.gemv(res.stream, BF16.quantize(x).astype(np.float32), "bf16")

    through_engine = bert.embed(sentences, products={name: engine})
    tokens = int(bert.tokenize(sentences)[1].sum())
    assert seen == [(tokens, 384)]                                   # the non-padding rows, once
    assert not np.array_equal(through_engine, decoded)               # the engine's own arithmetic
    cos = embedding_fidelity(decoded, through_engine)["cos_min"]
    assert cos > 0.99999, cos                                        # BF16 activations, FP32 sums
    assert embedding_fidelity(ref, through_engine)["cos_min"] > 0.99
    zeros = bert.embed(sentences, products={name: lambda x: np.zeros((len(x), 1536), np.float32)})
    assert embedding_fidelity(ref, zeros)["cos_min"] < 0.99
