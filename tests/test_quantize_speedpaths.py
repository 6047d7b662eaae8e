"""The quantizer's fast paths give golden's bits: each against the plain computation it replaces.

* ``baselines.round_magnitude`` / ``round_float`` (the element and block-scale formats of the
  baselines, float32 and float64) against golden ``FloatFormat.quantize``, on every value of
  the format, every midpoint (exact ties), the floats on either side of each, the subnormal
  range of the format and of float32, beyond the maximum, ±0 and random values; bits compared
  (the sign of zero included).
* ``baselines.TableRound`` (NF4) against golden ``round_to_table`` on the midpoints, their
  neighbouring floats and random values of [-1, 1].
* ``fast_table.FastTable.values_div`` (the float32 quotient) and ``values_mirrored``
  against ``values_t`` of the float64 quotient, with quotients that are integers, zero,
  beyond the grid and beyond float32.
* ``blockwise.block_reduce`` against ``max`` / ``min``.
* The candidate search (``BankEvaluator.chunk``: every fast path, the fixed-order sums) against
  the plain computation with ``np.sum`` over each block, for every fixed table, three dtypes,
  weighted or not; chunking that does not change it; a table at a second offset reusing the
  first one's results only where the scales are the same; the pair sums (``StreamSums``)
  against ``np.sum`` for any batches.
* End to end: every baseline and the SOP points on a float32 layer (the float32 paths) give
  the bits of the same layer as float64 (the float64 paths).
"""

import math

import numpy as np
import pytest

from sop.golden.codebooks import NF4_VALUES, get_codebook
from sop.golden.formats import get_format, round_to_table, table_midpoints
from sop.golden.points import get_point
from sop.quantize import baselines as B
from sop.quantize import blockwise
from sop.quantize.blockwise import BankEvaluator, bank_offset, block_reduce, prepare
from sop.quantize.fast_table import fast_table
from sop.quantize.sop_search import StreamSums, _Source, quantize_fp6, quantize_sop4, score_pairs


def bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.int64 if x.dtype == np.float64 else np.int32)


def neighbours(x: np.ndarray, dtype) -> np.ndarray:
    """x and the floats of ``dtype`` on either side of each, both signs."""
    x = np.asarray(x, dtype=dtype)
    up, down = np.nextafter(x, dtype(np.inf)), np.nextafter(x, dtype(-np.inf))
    v = np.concatenate([x, up, down])
    return np.concatenate([v, -v])


def probes(fmt, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vals = np.unique(np.abs(fmt.values[np.isfinite(fmt.values)]))
    mids = (vals[1:] + vals[:-1]) / 2                       # exact: few-bit values
    f32 = np.finfo(np.float32)
    extra = [0.0, fmt.max * 1.01, fmt.max * 4, 2.0 ** fmt.emin, 2.0 ** (fmt.emin - fmt.mbits - 1),
             float(f32.tiny), float(f32.smallest_subnormal), 1e-40, 3e38 if dtype == np.float32 else 1e300]
    rand = np.concatenate([rng.uniform(0, fmt.max * 1.2, 4000),
                           np.exp(rng.uniform(np.log(1e-12), np.log(fmt.max * 2), 4000))])
    return neighbours(np.concatenate([vals, mids, extra, rand]), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["e2m1", "e2m3", "e3m2", "e4m3", "ue4m3"])
def test_round_float_is_golden_quantize(name, dtype):
    fmt = get_format(name)
    x = probes(fmt, dtype)
    if not fmt.signed:
        x = np.abs(x)
    with np.errstate(over="ignore"):
        want = fmt.quantize(x.astype(np.float64))
    got = B.round_float(x, fmt)
    assert got.dtype == dtype
    np.testing.assert_array_equal(bits(got.astype(np.float64)), bits(want))


def test_table_round_is_golden_round_to_table():
    v = np.array(NF4_VALUES)
    look = B.TableRound(v, np.arange(16))
    assert look.ok
    m, _, _ = table_midpoints(v)
    rng = np.random.default_rng(1)
    x = np.concatenate([neighbours(m, np.float64), v, -v, [0.0, -0.0, 1.0, -1.0],
                        rng.uniform(-1, 1, 20000), np.float32(rng.uniform(-1, 1, 2000)) / np.float32(0.7)])
    x = x[np.abs(x) <= 1]
    np.testing.assert_array_equal(look.index(x), round_to_table(x, v, np.arange(16)))


@pytest.mark.parametrize("cb_name", ["nf4", "bof4-s", "int4", "fp4", "sh4"])
def test_values_div_float32_quotient_is_the_float64_one(cb_name):
    ft = fast_table(get_codebook(cb_name))
    assert ft.exact
    rng = np.random.default_rng(2)
    C, r, nb, g = 3, 7, 9, 16
    w = (rng.standard_normal((r, nb, g)) * np.exp(rng.uniform(-3, 3, (r, nb, 1)))).astype(np.float32)
    w[0, 0] = 0.0
    w[0, 1] = -0.0
    w[1, 0, :4] = [3e38, -3e38, 1e-45, -1e-45]
    d = np.ldexp(rng.integers(8, 16, (C, r, nb)).astype(np.float64), rng.integers(-12, -2, (C, r, nb)))
    d[0, 2, 0] = 2.0 ** -140                                  # quotients beyond float32: Inf
    # weights that are exact multiples of their divisor: integer quotients, many on midpoints
    k = rng.integers(-2 * ft.K, 2 * ft.K, (r, g)) / ft.mul
    w[:, 3] = (k * d[1, :, 3, None]).astype(np.float32)
    d32 = d.astype(np.float32)
    assert np.array_equal(d32.astype(np.float64), d)
    want = ft.values_t(w.astype(np.float64)[None] / d[..., None])
    np.testing.assert_array_equal(bits(ft.values_div(w[None], d[..., None], d32[..., None])), bits(want))
    rec = np.empty((2 * C,) + w.shape)                       # + then - candidates
    ft.values_mirrored(ft.cells_div(w[None], d[..., None], d32[..., None]), rec)
    np.testing.assert_array_equal(bits(rec[:C]), bits(want))
    np.testing.assert_array_equal(bits(rec[C:]), bits(ft.values_t(w.astype(np.float64)[None] / -d[..., None])))


def test_evaluators_mirror_the_tables_with_opposite_ends():
    prep = prepare(np.ones((1, 16), np.float32), get_point("sop4-g16").layout)
    assert BankEvaluator(prep, get_codebook("nf4"), 0).mirrored
    assert not BankEvaluator(prep, get_codebook("bof4-s"), 0).mirrored


@pytest.mark.parametrize("g", [1, 3, 16, 32, 64])
def test_block_reduce_is_max_and_min(g):
    x = np.random.default_rng(3).standard_normal((5, 7, g))
    assert np.array_equal(block_reduce(x, np.maximum), x.max(axis=-1))
    assert np.array_equal(block_reduce(x, np.minimum), x.min(axis=-1))


def layer32() -> np.ndarray:
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    w[0, :32] = 0.0
    w[1, ::3] = -0.0
    w[2] *= np.float32(1e-38)                                # subnormal float32 weights
    w[3, :16] = (np.arange(16) - 8) / 8                      # exact ties
    return w


QUANTIZERS = {
    "nf4-g64": B.nf4_g64, "nvfp4": B.nvfp4, "nvfp4-46": B.nvfp4_46, "if4": B.if4,
    "fp8-e4m3-pot": B.fp8_e4m3_pot, "int8-ch": B.int8_per_channel,
    **{name: (lambda e: lambda w: B.mx(w, e))(e) for name, e in B.MX_ELEMENTS.items()},
    "e2m3-ue4m4-g16": quantize_fp6, "sop4-g16": quantize_sop4,
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_float32_paths_give_the_float64_bits(name):
    w = layer32()
    a, b = QUANTIZERS[name](w), QUANTIZERS[name](w.astype(np.float64))
    np.testing.assert_array_equal(bits(np.asarray(a.recon, np.float64)), bits(np.asarray(b.recon, np.float64)))
    assert a.bits == b.bits and a.choice == b.choice
    for key, val in a.extra.items():
        if isinstance(val, np.ndarray):
            np.testing.assert_array_equal(val, b.extra[key])
            assert val.dtype == b.extra[key].dtype
        else:
            assert val == b.extra[key], key
    if a.stream is not None:
        assert a.stream.blocks == b.stream.blocks and a.stream.offset == b.stream.offset


@pytest.mark.parametrize("name", ["e2m1", "e2m3", "e3m2", "e4m3"])
def test_round_magnitude_on_a_scaled_grid_is_the_scaled_rounding(name):
    fmt = get_format(name)
    rng = np.random.default_rng(5)
    X = np.ldexp(np.float32(1), rng.integers(-120 - fmt.emin, 100 - fmt.emax, (64, 1)).astype(np.int32))
    x = np.abs(probes(fmt, np.float32))
    x = x[x <= 4 * fmt.max]
    a = x[:64 * (len(x) // 64)].reshape(64, -1) * X
    want = B.round_magnitude(a / X, fmt) * X
    np.testing.assert_array_equal(bits(B.round_magnitude(a.copy(), fmt, X)), bits(want))


def plain_search(ev: BankEvaluator, sl):
    """``ev.chunk(sl)`` written plainly: every candidate's values through ``values_t`` of the
    float64 quotient, the errors and qq by ``np.sum`` over the block's last axis, ``np.argmin``."""
    prep = ev.prep
    idx = ev._compute_idx(sl)
    cdiv, cmul = ev.sgn * ev.divs[idx], ev.sgn * ev.svals[idx]
    blk = np.asarray(prep.blocks[sl], np.float64)
    q = ev.ft.values_t(blk[None] / cdiv[..., None]) * cmul[..., None]
    a = 1.0 if prep.a is None else prep.a
    errs = ((blk[None] - q) ** 2 * a).sum(axis=-1)
    k = np.argmin(errs, axis=0)
    qk = np.take_along_axis(q, k[None, ..., None], 0)[0]
    return errs.min(axis=0), (qk * qk * a).sum(axis=-1), k, idx


SEARCHED = [("sop4-g16", n) for n in ("nf4", "bof4", "bof4-s", "split87", "sh4", "fp4", "int4")] + \
    [("e2m3-ue4m4-g16", "e2m3")]


@pytest.mark.parametrize("point,cb_name", SEARCHED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_the_candidate_search_is_the_plain_computation(point, cb_name, dtype):
    """Every per-block number of the search (the least error, its qq, the candidate, the scale
    indices), through every fast path (the float32 quotient, the mirrored tables, the float32
    products, the shared cells, the primed batches), is the plain computation's, bit for bit:
    the sums are np.sum's over each block (no BLAS, no other order)."""
    w = layer32().astype(dtype)
    act = np.random.default_rng(6).uniform(0, 2, w.shape[1])
    act[:3] = 0
    for a in (None, act):
        prep = prepare(w, get_point(point).layout, a)
        cb = get_codebook(cb_name)
        for ss in (0, 1, 2):
            ev = BankEvaluator(prep, cb, bank_offset(prep, cb), ss, cached=False)
            for primed in (False, True):
                if primed:
                    ev.prime(0, w.shape[0])
                for sl in ev.chunks():
                    for got, want in zip(ev.chunk(sl), plain_search(ev, sl)):
                        np.testing.assert_array_equal(got, want)
                        assert bits(np.asarray(got, np.float64)).tobytes() == bits(np.asarray(want, np.float64)).tobytes()


def test_chunking_does_not_change_the_search(monkeypatch):
    """A block's results depend on the block alone: one row per chunk and the whole layer in one
    chunk give the same pair search."""
    w = layer32()
    res = []
    for weights in (1, 1 << 24):
        monkeypatch.setattr(blockwise, "EVAL_WEIGHTS", weights)
        res.append(quantize_sop4(w, np.linspace(0, 1, w.shape[1])))
    assert res[0].stream.blocks == res[1].stream.blocks
    assert res[0].extra["pairs"] == res[1].extra["pairs"] and res[0].extra["acos"] == res[1].extra["acos"]


def test_a_table_at_a_second_offset_takes_the_first_ones_results_only_where_they_are_the_same(monkeypatch):
    """FP4 and INT4 at their own offset and at NF4's: the pair search takes the first
    evaluation's results on the blocks whose candidates are the same scales and searches the
    others; every score, choice of bank and candidate is that of searching every block."""
    w = layer32()
    w[40:, 16:48] *= 1e-4                                 # two blocks a row whose small scales differ
    monkeypatch.setattr(blockwise, "EVAL_WEIGHTS", 1)     # one row per chunk
    prep = prepare(w, get_point("sop4-g16").layout)
    books = {n: get_codebook(n) for n in ("nf4", "fp4", "int4")}
    own = max(bank_offset(prep, books["fp4"]), bank_offset(prep, books["int4"]))
    other = max(bank_offset(prep, books["nf4"]), bank_offset(prep, books["fp4"]))
    assert own != other
    keys = [("fp4", own), ("int4", own), ("nf4", other), ("fp4", other), ("int4", other)]
    pairs = [(0, 1), (2, 3), (2, 4)]

    def search():
        sources = [_Source(BankEvaluator(prep, books[n], off, 1, cached=False)) for n, off in keys]
        scores, masks = score_pairs(prep, sources, pairs)
        return scores, [np.concatenate([np.unpackbits(m, count=c) for m, c in mask]) for mask in masks], \
            [s.k.copy() for s in sources]

    partial = []
    reuse = BankEvaluator.reuse

    def spy(self, other, results, sl):
        got = reuse(self, other, results, sl)
        if got is not None:
            partial.append(any((a != b).any() for a, b in zip(got, results[:3])))
        return got

    monkeypatch.setattr(BankEvaluator, "reuse", spy)
    reused = search()
    assert any(partial) and not all(partial), partial     # rows reused whole, rows in part
    monkeypatch.setattr(BankEvaluator, "reuse", lambda self, other, results, sl: None)
    every = search()
    assert reused[0] == every[0]
    for a, b in zip(reused[1] + reused[2], every[1] + every[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,most", [(1, 128), (1000, 128), (50_000, 1 << 13), (70_001, 128)])
def test_stream_sums_are_np_sum_for_any_batches(n, most):
    """The pair scores' sums: np.sum of each row, bit for bit, whatever the batches (empty ones,
    ones inside a segment, segments across several batches)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)) * np.exp(rng.uniform(-20, 20, (3, n)))
    cuts = np.unique(np.concatenate([[0, n], rng.integers(0, n + 1, 12)]))
    sums = StreamSums(3, n, most)
    for a, b in zip(cuts[:-1], cuts[1:]):
        sums.push(x[:, a:b])
        sums.push(x[:, b:b])
    assert bits(sums.total()).tobytes() == bits(x.sum(axis=1)).tobytes()


@pytest.mark.parametrize("point", ["sop4-g16", "e2m3-ue4m4-g16"])
def test_the_offset_is_the_smallest_that_covers_the_target_to_the_ulp(point):
    """``choose_offset`` took the ceiling of log2 of target / smax, which rounds: a target one ulp
    above smax * 2^k gave k, and its block's largest weight clipped (an outside review, |k| >= 4 on
    both layouts). Each target on, one ulp above and one ulp below smax * 2^k, and far from both."""
    lay = get_point(point).layout
    smax = float(lay.scale.max)
    for k in range(-60, 61):
        edge = math.ldexp(smax, k)
        assert blockwise.choose_offset(lay, edge) == k
        assert blockwise.choose_offset(lay, float(np.nextafter(edge, np.inf))) == k + 1
        assert blockwise.choose_offset(lay, float(np.nextafter(edge, 0))) == k
        assert blockwise.choose_offset(lay, 0.77 * edge) == k
    assert blockwise.choose_offset(lay, 1.7e308) == 127 and blockwise.choose_offset(lay, 5e-324) == -128
