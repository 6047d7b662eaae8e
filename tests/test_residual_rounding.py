"""golden.decoder: a product plus a sparse residual is rounded to BF16 once, exactly.

The reference is ``fractions.Fraction``: the exact sum of the exact product and the BF16
residual, rounded to nearest even at BF16's precision (subnormals kept, saturating at the
largest finite value), a zero sum signed as IEEE round-to-nearest signs it. The cases are
the adversarial ones: products exactly on a BF16 tie plus a residual 60 binades below
them (float64 alone rounds such a sum onto the tie and then breaks it the wrong way),
products near 2^100 plus residuals near 2^-133, cancellation to zero, sign flips,
overflow to the BF16 maximum, both signs of zero. The last test shows the check failing
on the old rule (the sum rounded to float64 first).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

import sop.golden.decoder as D
from sop.golden.decoder import decode_blocks, decode_layer, sum_rounded_to_odd
from sop.golden.formats import get_format
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import BlockLayout, LayerStream, Sparse, named_layouts, pack_blocks

BF16 = get_format("bf16")
SOP4 = named_layouts()["sop4-g16"]
BF16_MAX = Fraction(BF16.max)
MIN_SUB = Fraction(1, 2 ** 133)


def bf16_reference(p: float, r: float) -> float:
    """RNE to BF16 of the exact ``p + r`` (both float64), saturating; IEEE's zero signs."""
    x = Fraction(p) + Fraction(r)
    if x == 0:
        return -0.0 if (math.copysign(1, p) < 0 and math.copysign(1, r) < 0) else 0.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()     # 2^e <= a < 2^(e + 2)
    if a >= Fraction(2) ** (e + 1):
        e += 1
    if a < Fraction(2) ** e:
        e -= 1
    q = Fraction(2) ** (max(e, -126) - 7)                         # BF16's quantum at a
    n, rem = divmod(a, q)
    if rem > q / 2 or (rem == q / 2 and n % 2 == 1):
        n += 1
    v = min(n * q, BF16_MAX)
    return math.copysign(float(v), float(x))


def layer_products(seed: int, offset: int, n_blocks: int = 64, luts=None):
    """Random sop4 blocks: (headers, codes, luts) and the exact products (float64, signed zeros)."""
    rng = np.random.default_rng(seed)
    if luts is None:
        luts = rng.integers(0, 1 << DEFAULT_HIF.bits, (2, 16))
        luts[:, 0] = 0                                            # a zero entry: +-0 products
    headers = SOP4.make_header(rng.integers(0, 64, n_blocks), rng.integers(0, 2, n_blocks),
                               rng.integers(0, 2, n_blocks))
    codes = rng.integers(0, 16, (n_blocks, 16))
    p = decode_blocks(DEFAULT_HIF, luts, SOP4, offset, headers, codes, "exact")
    return (headers, codes, luts), p


def binade(x: np.ndarray) -> np.ndarray:
    """floor(log2 |x|) (x != 0)."""
    return np.frexp(x)[1] - 1


def bf16_values(x: np.ndarray) -> np.ndarray:
    return BF16.quantize(np.clip(x, -BF16.max, BF16.max))


def adversarial_cases():
    """(name, offset, blocks, residual): the layer offset, the blocks and one residual per value."""
    out = []
    rng = np.random.default_rng(7)
    for name, seed, offset, make in [
        # 60 binades below the product: float64 drops it, the exact sum does not
        ("tie-breakers", 1, -3, lambda p: np.where(p != 0, np.ldexp(np.sign(p) * rng.choice([-1, 1], p.shape),
                                                                    binade(np.where(p == 0, 1, p)) - 60), 0.0)),
        # products near 2^100, residuals at BF16's smallest subnormals
        ("huge gap", 2, 100, lambda p: rng.choice([-1, 1], p.shape) * rng.integers(1, 4, p.shape) * 2.0 ** -133),
        # exact cancellation where the product is a BF16 value: +0
        ("cancel", 3, -5, lambda p: np.where(bf16_values(p) == p, -p, bf16_values(-p))),
        # the residual flips the sign
        ("sign flip", 4, -5, lambda p: bf16_values(-2.5 * p - 2.0 ** -20)),
        # products near the BF16 maximum pushed beyond it (saturate), or back below it
        ("overflow", 5, 127, lambda p: rng.choice([-1, 1], p.shape) * BF16.max),
        ("just over", 6, 120, lambda p: bf16_values(np.sign(p) * 2.0 ** 127 * rng.random(p.shape))),
        # random residuals across the whole gap range, both signs
        ("random gap", 8, -20, lambda p: bf16_values(rng.standard_normal(p.shape) *
                                                     2.0 ** rng.integers(-130, 30, p.shape))),
        # near the bottom of BF16: subnormal sums and sums that round to zero
        ("subnormal", 9, -128, lambda p: bf16_values(rng.choice([-1, 1], p.shape) *
                                                     rng.integers(0, 300, p.shape) * 2.0 ** -140)),
    ]:
        blocks, p = layer_products(seed, offset)
        out.append((name, offset, blocks, make(p)))
    # signed zeros: a zero entry under both block signs, plus +0 and -0
    luts = np.zeros((2, 16), dtype=np.int64)
    for r in (0.0, -0.0):
        blocks, p = layer_products(10, 0, 8, luts=luts)
        out.append((f"zero {r!r}", 0, blocks, np.full(p.shape, r)))
    return out


CASES = adversarial_cases()


def decoded(offset, blocks, residual):
    headers, codes, luts = blocks
    return decode_blocks(DEFAULT_HIF, luts, SOP4, offset, headers, codes, "bf16", residual)


def mismatches(name, offset, blocks, residual) -> list:
    """(index, product, residual, golden's BF16, the reference) of every value golden gets wrong."""
    headers, codes, luts = blocks
    got = decode_blocks(DEFAULT_HIF, luts, SOP4, offset, headers, codes, "bf16", residual).ravel()
    p = decode_blocks(DEFAULT_HIF, luts, SOP4, offset, headers, codes, "exact").ravel()
    bad = []
    for i, (pi, ri) in enumerate(zip(p, np.asarray(residual, dtype=np.float64).ravel())):
        want = bf16_reference(pi, ri)
        if got[i] != want or math.copysign(1, got[i]) != math.copysign(1, want):
            bad.append((i, pi, ri, got[i], want))
    return bad


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bf16_output_is_the_exact_sum_rounded_once(case):
    assert np.all(BF16.quantize(case[3]) == case[3])            # the residuals are BF16 values
    assert mismatches(*case) == []


def test_the_cases_reach_what_they_claim():
    out = {name: (decoded(offset, blocks, r), r) for name, offset, blocks, r in CASES}
    cancel = out["cancel"][0]
    assert (cancel == 0).sum() > 100 and not np.signbit(cancel[cancel == 0]).any()     # x + (-x) = +0
    assert (np.abs(out["overflow"][0]) == BF16.max).sum() > 100                        # saturated
    flip, r = out["sign flip"]
    assert (np.signbit(flip) == np.signbit(r))[r != 0].all()
    sub = np.abs(out["subnormal"][0])
    assert ((sub > 0) & (sub < 2.0 ** -126)).any() and (sub == 0).any()
    neg = out["zero -0.0"][0]
    assert np.signbit(neg).any() and not np.signbit(neg).all()    # -0 + -0 = -0, +0 + -0 = +0
    assert not np.signbit(out["zero 0.0"][0]).any()                # +-0 + +0 = +0


def test_exact_output_is_the_sum_rounded_once_to_float64():
    name, offset, (headers, codes, luts), residual = CASES[0]
    got = decode_blocks(DEFAULT_HIF, luts, SOP4, offset, headers, codes, "exact", residual).ravel()
    p = decode_blocks(DEFAULT_HIF, luts, SOP4, offset, headers, codes, "exact").ravel()
    want = [float(Fraction(a) + Fraction(b)) for a, b in zip(p, residual.ravel())]
    assert got.tolist() == want


def float32_reference(x: Fraction) -> float:
    """RNE to float32 of an exact value (normal range), as numpy rounds a float64 that holds it."""
    e = math.floor(math.log2(abs(x))) if x else 0
    q = Fraction(2) ** (e - 23)
    n, rem = divmod(abs(x), q)
    if rem > q / 2 or (rem == q / 2 and n % 2 == 1):
        n += 1
    return math.copysign(float(n * q), float(x))


def test_float32_output_is_the_exact_sum_rounded_once():
    """A layer decoded into float32 (sop dequantize) rounds the exact sum once. With a wide HIF (M10) under
    a wide scale (UE2M14) the product (1 + 2^-10)(1 + 2^-14) has 25 significant bits: a float32 tie. A
    residual of +2^-80 puts the exact sum above the tie (up), -2^-80 below it (down), none leaves the tie
    (to even: down). Through the float64 sum (the old rule) the residual was lost and +2^-80 went down."""
    from sop.golden.hif import hif_format

    hif = hif_format(10)                                              # E3 M10, bias 5
    lay = BlockLayout(4, 8, get_format("ue2m14"))
    one_plus = (5 << 10) | 1                                          # HIF (1 + 2^-10) * 2^0
    luts = np.zeros((1, 16), dtype=np.int64)
    luts[0, 1], luts[0, 2] = one_plus, (1 << 13) | one_plus         # +-(1 + 2^-10)
    scale = (1 << 14) | 1                                             # (1 + 2^-14) * 2^0 in UE2M14 (bias 1)
    codes = np.array([[1, 2, 1, 2, 1, 0, 0, 0]])
    blocks = pack_blocks(lay, lay.make_header(np.array([scale])), codes)
    r = [2.0 ** -80, -2.0 ** -80, -2.0 ** -80, 2.0 ** -80]
    sp = Sparse(np.arange(4, dtype=np.uint32), BF16.encode(np.array(r)))
    stream = LayerStream(lay, hif, luts, 0, 1, 8, blocks, sp)
    p = Fraction(1 + 2 ** 10, 2 ** 10) * Fraction(1 + 2 ** 14, 2 ** 14)
    assert p.denominator == 2 ** 24 and p.numerator % 2 == 1       # 25 bits: a float32 tie
    got = decode_layer(stream, dest=np.empty((1, 8), np.float32))[0]
    want = [float32_reference(v * p + Fraction(ri)) for v, ri in zip((1, -1, 1, -1), r)] + [float32_reference(p)]
    assert got[:5].tolist() == want and got[0] != got[2]              # the residual decides the tie
    assert decode_layer(stream)[0, 0] == float(p + Fraction(r[0]))  # the exact output: once, to float64


def test_round_to_odd_is_the_odd_neighbour():
    a = np.array([1.0, 1.0, -1.0, 2.0 ** 100, 1.5, 0.0, -0.0, 3.0])
    b = np.array([2.0 ** -70, -2.0 ** -70, 2.0 ** -70, -2.0 ** -133, 0.0, -0.0, -0.0, -3.0])
    s = sum_rounded_to_odd(a, b)
    one_up, one_down = np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0)
    assert s[0] == one_up and s[1] == one_down and s[2] == -one_down      # away/towards zero
    assert s[3] == np.nextafter(2.0 ** 100, 0.0)                          # below a power of two
    assert s[4] == 1.5 and s[6] == 0 and np.signbit(s[6])                 # exact sums stay
    assert s[5] == 0 and not np.signbit(s[5]) and s[7] == 0 and not np.signbit(s[7])
    assert np.isnan(sum_rounded_to_odd(np.array([np.nan]), np.array([1.0])))[0]


def test_a_sparse_layer_adds_plus_zero_everywhere():
    """decode_layer: a -0 product with no entry becomes +0 once the layer has an entry (the
    dense residual's +0); entries with -0 residuals keep a -0 product's sign."""
    luts = np.zeros((2, 16), dtype=np.int64)
    headers = SOP4.make_header(np.full(2, 20), np.ones(2, dtype=np.int64), np.zeros(2, dtype=np.int64))
    codes = np.zeros((2, 16), dtype=np.int64)
    base = LayerStream(SOP4, DEFAULT_HIF, luts, 0, 1, 32, pack_blocks(SOP4, headers, codes))
    assert np.signbit(decode_layer(base, "bf16")).all()
    sp = dataclasses.replace(base, sparse=Sparse(np.array([3, 9], np.uint32), BF16.encode(np.array([-0.0, 1.0]))))
    out = decode_layer(sp, "bf16").ravel()
    assert np.signbit(out[3]) and out[9] == 1.0
    assert not np.signbit(np.delete(out, 3)).any()


def test_the_check_fails_on_the_old_rule(monkeypatch):
    """Rounding to float64 first (the old ``value + residual``) is caught: the tie-breakers
    and the huge gaps land on BF16 ties and round to even, not towards the residual."""
    monkeypatch.setattr(D, "sum_rounded_to_odd", lambda a, b: a + b)
    for name in ("tie-breakers", "huge gap"):
        case = next(c for c in CASES if c[0] == name)
        bad = mismatches(*case)
        assert len(bad) > 10, name
        # every miss is one BF16 ulp, at a product that is a BF16 tie
        for _, p, r, got, want in bad[:20]:
            assert got != want and BF16.quantize(np.array([p]))[0] != p
