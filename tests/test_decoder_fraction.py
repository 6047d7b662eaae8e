"""golden.decoder against exact rational arithmetic, from a layer stream's bytes up.

The oracle here reads docs/formats.md, not golden: it packs and unpacks each block bit by bit
(section 7: LSB first; scale code, sign, selection, then the codes), decodes LUT entries, block
scales and BF16 residuals from their bit fields (section 2's formula), forms every product
``(-1)^(sign(h) xor s) * |HIF(h)| * SCALE(c) * 2^offset`` and every sum with a sparse residual as a
``fractions.Fraction``, and rounds it once to BF16 by its own rule (section 1: to nearest, ties to
the even significand, subnormals kept, saturating at 0x7F7F; section 9's zero signs). No golden
table, field split or rounding is used. It covers every registered operating point, offsets from
-128 (BF16 subnormals, zeros) to 127 (saturation), residuals that flip a product's sign, cancel it
exactly or sit far below it. The last tests show the check catching a truncating BF16 rounding and a
header bit read from the wrong place.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.layout import LayerStream, Sparse, pack_layer, unpack_layer
from sop.golden.points import operating_points

BF16_E, BF16_M, BF16_BIAS = 8, 7, 127
BF16_MAX = Fraction(2 ** 8 - 1, 2 ** 7) * 2 ** 127


def field_value(code: int, ebits: int, mbits: int, bias: int, signed: bool = True) -> tuple[Fraction, bool]:
    """(value, sign bit) of a finite float code, from its fields: ``(1 + m/2^M) 2^(e-b)`` for e > 0,
    ``(m/2^M) 2^(1-b)`` for e == 0 (the formats of these points have every code finite)."""
    m = code & ((1 << mbits) - 1)
    e = (code >> mbits) & ((1 << ebits) - 1)
    neg = bool((code >> (ebits + mbits)) & 1) if signed else False
    sig = m if e == 0 else (1 << mbits) + m
    mag = Fraction(sig, 1 << mbits) * Fraction(2) ** (max(e, 1) - bias)
    return (-mag if neg else mag), neg


def bf16_bits(x: Fraction, zero_negative: bool) -> int:
    """The BF16 code of ``x`` rounded once: nearest, ties to even, subnormals kept, saturating."""
    a = abs(x)
    if a == 0:
        return 0x8000 if zero_negative else 0
    e = a.numerator.bit_length() - a.denominator.bit_length()       # 2^e <= a < 2^(e + 1) after the fix-up
    if Fraction(2) ** e > a:
        e -= 1
    e = max(e, 1 - BF16_BIAS)
    quantum = Fraction(2) ** (e - BF16_M)
    n, rest = divmod(a, quantum)
    if rest > quantum / 2 or (rest == quantum / 2 and n % 2):
        n += 1
    v = min(n * quantum, BF16_MAX)
    if v == 0:
        return 0x8000 if x < 0 else 0
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if Fraction(2) ** e > v:
        e -= 1
    if e < 1 - BF16_BIAS:                                             # subnormal: exponent field 0
        bits = int(v / Fraction(2) ** (1 - BF16_BIAS - BF16_M))
    else:
        bits = ((e + BF16_BIAS) << BF16_M) | (int(v / Fraction(2) ** (e - BF16_M)) - (1 << BF16_M))
    return bits | (0x8000 if x < 0 else 0)


def on_bf16_tie(x: Fraction) -> bool:
    """Whether ``x`` lies exactly halfway between two neighbouring BF16 values."""
    a = abs(x)
    if a == 0 or a >= BF16_MAX:
        return False
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    return (a / Fraction(2) ** (max(e, 1 - BF16_BIAS) - BF16_M)).denominator == 2


def random_layer(point, seed: int, offset: int, n_sparse: int, tables: bool):
    """A layer of ``point`` packed by hand (section 7), and the exact (value, negative) of every product."""
    rng = np.random.default_rng(seed)
    lay, hif = point.layout, point.hif
    g, k, S = lay.group, lay.code_bits, lay.scale.bits
    if tables:      # the point's tables (a pair point: two of the search's)
        names = point.codebooks or ("nf4", "sh4")
        luts = np.stack([get_codebook(n, hif).hif_codes for n in names]).astype(np.int64)
    else:           # any HIF codes, +0 and -0 among them
        luts = rng.integers(0, 1 << hif.bits, (lay.banks, 1 << k))
        luts[:, 0], luts[:, 1] = 0, 1 << (hif.bits - 1)
    rows, cols = 4, 4 * g
    data, products = bytearray(), []
    for _ in range(rows * cols // g):
        scale = int(rng.integers(0, 1 << S)) if rng.random() < 0.7 else (1 << S) - 1   # the top scale too
        sign = int(rng.integers(0, 2)) if lay.signed_scale else 0
        select = int(rng.integers(0, 2)) if lay.select_bit else 0
        codes = [int(c) for c in rng.integers(0, 1 << k, g)]
        fields = [(scale, S)] + [(sign, 1)] * lay.signed_scale + [(select, 1)] * lay.select_bit
        word, pos = 0, 0
        for v, width in fields + [(c, k) for c in codes]:                # LSB first
            word |= v << pos
            pos += width
        data += word.to_bytes(pos // 8, "little")
        s_val, _ = field_value(scale, lay.scale.ebits, lay.scale.mbits, lay.scale.bias, signed=False)
        for c in codes:
            h, h_neg = field_value(int(luts[select][c]), hif.ebits, hif.mbits, hif.bias)
            neg = h_neg != bool(sign)
            mag = abs(h) * s_val * Fraction(2) ** offset
            products.append((-mag if neg else mag, neg))
    # half the entries on products that sit on a BF16 tie, where a residual far below decides the rounding
    ties = np.flatnonzero([on_bf16_tie(p) for p, _ in products])
    on_tie = rng.choice(ties, min(n_sparse // 2, len(ties)), replace=False)
    rest = rng.choice(np.setdiff1d(np.arange(rows * cols), on_tie), n_sparse - len(on_tie), replace=False)
    index = np.sort(np.concatenate([on_tie, rest]).astype(np.int64))
    values = []
    for j, i in enumerate(index):
        p = float(products[i][0])
        kind = 2 if i in on_tie else j % 4
        target = (-2 * p if kind == 0 else -p if kind == 1 else       # a sign flip, a cancellation,
                  # far below (past float64's 53 bits too), or anything
                  p * 2.0 ** -int(rng.integers(8, 70)) * (-1) ** int(rng.integers(0, 2)) if kind == 2 else
                  float(rng.standard_normal()) * 2.0 ** int(rng.integers(-140, 120)))
        b = int(np.array([np.clip(target, -3e38, 3e38)], np.float32).view(np.uint32)[0] >> 16)
        values.append(b)                                                  # (truncated: a finite BF16)
    stream = LayerStream(lay, hif, luts, offset, rows, cols, bytes(data),
                         Sparse(index.astype(np.uint32), np.array(values, np.uint16)))
    return unpack_layer(pack_layer(stream)), products


def oracle_mismatches(stream: LayerStream, products, got_bits: np.ndarray) -> list[str]:
    """Where ``got_bits`` (BF16 codes, one per weight) differ from the oracle's rounding."""
    residual = {int(i): field_value(int(v), BF16_E, BF16_M, BF16_BIAS)
                for i, v in zip(stream.sparse.index, stream.sparse.value_bf16)}
    sparse = len(residual) > 0
    bad = []
    for i, (p, p_neg) in enumerate(products):
        r, r_neg = residual.get(i, (Fraction(0), False))
        # section 9: a zero sum is -0 only when both terms are -0; a layer with entries adds +0 elsewhere
        want = bf16_bits(p + r, p_neg and (r_neg if sparse else True))
        if want != int(got_bits[i]):
            bad.append(f"weight {i}: golden {int(got_bits[i]):#06x}, oracle {want:#06x} (product {float(p)!r})")
    return bad


def golden_bf16_bits(stream: LayerStream) -> np.ndarray:
    out = decode_layer(stream, "bf16").reshape(-1)
    return (out.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)   # BF16 values: exact in float32


CASES = [(offset, n_sparse, tables) for offset in (-128, -20, 0, 60, 127)
         for n_sparse, tables in ((0, True), (24, False))]


@pytest.mark.parametrize("point", list(operating_points()))
@pytest.mark.parametrize("offset, n_sparse, tables", CASES)
def test_bf16_decode_is_the_exact_value_rounded_once(point, offset, n_sparse, tables):
    pt = operating_points()[point]
    stream, products = random_layer(pt, 1000 + offset + n_sparse, offset, n_sparse, tables)
    assert oracle_mismatches(stream, products, golden_bf16_bits(stream)) == []
    if n_sparse == 0:       # and the exact output is the product itself, sign of zero included
        exact = decode_layer(stream, "exact").reshape(-1)
        assert [Fraction(float(v)) for v in exact] == [p for p, _ in products]
        assert [bool(np.signbit(v)) for v in exact] == [neg for _, neg in products]


def test_the_cases_reach_saturation_subnormals_sign_flips_and_ties():
    """What the cases above claim to cover, they reach: outputs at BF16's largest value, subnormal
    outputs, products whose residual flips their sign, and residuals on products exactly on a BF16 tie."""
    sat = sub = flips = ties = 0
    for point in operating_points().values():
        for offset, n_sparse, tables in CASES:
            stream, products = random_layer(point, 1000 + offset + n_sparse, offset, n_sparse, tables)
            bits = golden_bf16_bits(stream)
            sat += int(((bits & 0x7FFF) == 0x7F7F).sum())
            sub += int(((((bits >> 7) & 0xFF) == 0) & ((bits & 0x7F) != 0)).sum())
            for i, v in zip(stream.sparse.index, stream.sparse.value_bf16):
                r, _ = field_value(int(v), BF16_E, BF16_M, BF16_BIAS)
                p = products[int(i)][0]
                flips += (p + r) * p < 0
            ties += sum(on_bf16_tie(products[int(i)][0]) for i in stream.sparse.index)
    assert sat and sub and flips and ties, (sat, sub, flips, ties)


def test_the_check_catches_truncation_instead_of_rounding():
    pt = operating_points()["sop4-g16"]
    stream, products = random_layer(pt, 7, -3, 0, True)
    exact = decode_layer(stream, "exact").reshape(-1)
    truncated = (exact.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
    assert oracle_mismatches(stream, products, truncated)


def test_the_check_catches_a_selection_bit_read_from_the_sign_bit():
    pt = operating_points()["sop4-g16"]
    stream, products = random_layer(pt, 8, 0, 0, True)
    blocks = np.frombuffer(stream.blocks, np.uint8).reshape(-1, pt.layout.block_bytes).copy()
    b6, b7 = (blocks[:, 0] >> 6) & 1, (blocks[:, 0] >> 7) & 1           # sign, selection (section 7)
    blocks[:, 0] = (blocks[:, 0] & 0x3F) | (b7 << 6) | (b6 << 7)
    swapped = LayerStream(stream.layout, stream.hif, stream.luts, stream.offset, stream.rows, stream.cols,
                          blocks.tobytes(), stream.sparse)
    assert oracle_mismatches(stream, products, golden_bf16_bits(swapped))
