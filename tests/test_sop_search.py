"""The SOP search and its block encoder: exactness against golden, speed paths against slow references.

* FastTable gives the codes of ``Codebook.encode`` on random inputs, exact ties, ±0, saturation;
* the vectorized ``encode_layer`` equals a plain per-candidate reference encoder bit for bit;
* quantize -> pack -> unpack -> golden decode gives back ``recon`` bit for bit;
* the pair search is exhaustive and exact (every pair re-encoded independently), never
  worse than a single fixed codebook, and activation weighting changes choices where it must.
"""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from sop.golden.codebooks import FIXED_4BIT, Codebook, get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.formats import get_format
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import BlockLayout, named_layouts, pack_blocks, pack_layer, unpack_blocks, unpack_layer
from sop.quantize import blockwise
from sop.quantize.blockwise import encode, encode_layer, pack_blocks_fast
from sop.quantize.fast_table import FastTable
from sop.quantize.sop_search import quantize_fp6, quantize_sop4

SOP4 = named_layouts()["sop4-g16"]
FP6 = named_layouts()["e2m3-ue4m4-g16"]


def weights(seed, rows=32, cols=128, scale=0.05):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (rows, cols)) * scale
    w[rng.random((rows, cols)) < 0.02] = 0.0            # exact zeros: the sign-of-zero path
    return w


# -- FastTable == Codebook.encode ---------------------------------------------------------------

def _tables():
    rng = np.random.default_rng(0)
    hif_vals = DEFAULT_HIF.values[np.isfinite(DEFAULT_HIF.values) & (np.abs(DEFAULT_HIF.values) <= 1)]
    dd4 = Codebook.from_values("dd4", np.sort(rng.choice(hif_vals, 16, replace=False)))
    # no zero entry, mirror-symmetric: 0 itself is a midpoint (a tie between -1/8 and +1/8)
    nozero = Codebook.from_values("nz", (2 * np.arange(-8, 8) + 1) / 8)
    return [get_codebook(n) for n in (*FIXED_4BIT, "e2m3")] + [dd4, nozero]


def probe_inputs(cb: Codebook, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.unique(cb.values)
    mids = (u[1:] + u[:-1]) / 2
    peak = np.abs(u).max()
    parts = [rng.standard_normal(20000) * peak / 2, rng.uniform(-1.5 * peak, 1.5 * peak, 20000),
             u, -u, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
             [0.0, -0.0, 1e-300, -1e-300, 5e-324, -5e-324, 1e300, -1e300, np.inf, -np.inf],
             rng.standard_normal(2000) * 1e-6]
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])


@pytest.mark.parametrize("cb", _tables(), ids=lambda c: c.name)
def test_fast_table_gives_codebook_encode_codes(cb):
    ft = FastTable(cb)
    assert ft.exact                                     # HIF tables take the fast path
    x = probe_inputs(cb)
    want = cb.encode(x)
    got = ft.encode(x)
    assert np.array_equal(got, want)
    np.testing.assert_array_equal(ft.values(x), cb.values[want])
    # the 2-D chunk shapes the encoder uses
    assert np.array_equal(ft.encode(x[:19998].reshape(3, -1, 6)), want[:19998].reshape(3, -1, 6))


def test_fast_table_check_would_catch_a_wrong_tie_rule():
    # The probe set contains exact ties; a look-up that sends every tie up (no even-code
    # rule) disagrees with Codebook.encode on it, so the equality test above can fail.
    cb = get_codebook("nf4")
    x = probe_inputs(cb)
    u = np.unique(cb.values)
    ties_up = u[np.clip(np.searchsorted((u[1:] + u[:-1]) / 2, x, side="right"), 0, len(u) - 1)]
    assert (ties_up != cb.values[cb.encode(x)]).any()
    neg_zero = cb.encode(np.array([-0.0]))[0]
    assert cb.values[neg_zero] == 0 and FastTable(cb).encode(np.array([-0.0]))[0] == neg_zero


# -- the vectorized encoder == a plain reference encoder -------------------------------------------

def reference_encode_layer(w, layout, banks, scale_search=1, col_weight=None):
    """The block encoder written plainly: every candidate through Codebook.encode, first minimum wins."""
    w = np.asarray(w, dtype=np.float64)
    g = layout.group
    blocks = w.reshape(-1, g)
    a = np.ones(w.shape[1]) if col_weight is None else np.asarray(col_weight, dtype=np.float64)
    a_blocks = np.tile(a.reshape(-1, g), (w.shape[0], 1))
    signs = (1, -1) if layout.signed_scale else (1,)
    scale = layout.scale
    finite = np.flatnonzero(np.isfinite(scale.values))
    order = finite[np.argsort(scale.values[finite], kind="stable")]

    def target(cb, s):
        top, bottom = (cb.values.max(), cb.values.min()) if s > 0 else (-cb.values.min(), -cb.values.max())
        hi = np.maximum(blocks.max(axis=1), 0) / top if top > 0 else 0 * blocks[:, 0]
        lo = np.maximum(-blocks.min(axis=1), 0) / -bottom if bottom < 0 else 0 * blocks[:, 0]
        return np.maximum(hi, lo)

    targets = {(t, s): target(cb, s) for t, cb in enumerate(banks) for s in signs}
    mt = max(float(v.max()) for v in targets.values())
    offset = 0 if mt <= 0 else int(np.clip(np.ceil(np.log2(mt / scale.max)), -128, 127))
    step = 2.0 ** offset
    best_err = np.full(len(blocks), np.inf)
    best = np.zeros((len(blocks), 3), dtype=np.int64)
    best_codes = np.zeros(blocks.shape, dtype=np.int64)
    for (t, s), tg in targets.items():
        cb = banks[t]
        vals = scale.values[order] * step
        cover = np.clip(np.searchsorted(vals, tg, side="left"), 0, len(order) - 1)
        for d in range(-scale_search, scale_search + 1):
            code = order[np.clip(cover + d, 0, len(order) - 1)]
            sv = s * scale.values[code] * step
            q = cb.encode(blocks / np.where(sv == 0, 1.0, sv)[:, None]).astype(np.int64)
            err = (a_blocks * (blocks - cb.values[q] * sv[:, None]) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best[better] = np.stack([np.full(better.sum(), t), np.full(better.sum(), int(s < 0)),
                                     code[better]], axis=1)
            best_codes[better] = q[better]
    headers = layout.make_header(best[:, 2], best[:, 1], best[:, 0] if layout.select_bit else 0)
    return offset, pack_blocks(layout, headers, best_codes)


CASES = [(SOP4, ("nf4", "sh4"), 1), (SOP4, ("fp4", "int4"), 2), (SOP4, ("bof4-s", "split87"), 0),
         (FP6, ("e2m3",), 2), (BlockLayout(4, 32, get_format("ue8m0")), ("nf4",), 1),
         (BlockLayout(6, 8, get_format("ue4m3"), signed_scale=True), ("e2m3",), 1)]


@pytest.mark.parametrize("layout,banks,ss", CASES,
                         ids=[f"{lay.code_bits}b-g{lay.group}-{lay.scale.name}-{'+'.join(b)}-ss{ss}"
                              for lay, b, ss in CASES])
@pytest.mark.parametrize("weighted", [False, True])
def test_encoder_equals_plain_reference(layout, banks, ss, weighted):
    w = weights(3, rows=16, cols=128)
    rng = np.random.default_rng(4)
    cbs = [get_codebook(b) for b in banks]
    # a few blocks sit exactly on the table's grid: ties and exact reconstructions
    cb0 = cbs[0]
    w[:2, :layout.group] = cb0.values[rng.integers(0, len(cb0.values), (2, layout.group))] * 2.0 ** -5
    w[2, :layout.group] = 0.0                                  # every bank and scale ties: bank A's, code 0
    # the layer's largest block, covered by exactly the top scale code (offset -3): the end of the scale range
    tops = [v for cb in cbs for v in ((cb.values.max(), -cb.values.min()) if layout.signed_scale
                                      else (cb.values.max(),))]
    w[3, :layout.group] *= 1e-3
    w[3, 0] = float(layout.scale.max) * 2.0 ** -3 * min(tops)
    a = rng.random(128) ** 3 if weighted else None
    s = encode_layer(w, layout, cbs, scale_search=ss, col_weight=a)
    offset, blocks = reference_encode_layer(w, layout, cbs, ss, a)
    assert s.offset == offset == -3
    assert s.blocks == blocks
    headers, _ = unpack_blocks(layout, s.blocks)
    assert headers[2 * (128 // layout.group)] == 0                # the zero block: bank A, code 0, sign +


@pytest.mark.parametrize("layout", [SOP4, FP6, BlockLayout(6, 32, get_format("ue4m4")),
                                    BlockLayout(4, 8, get_format("ue3m3"), True, True),
                                    BlockLayout(4, 16, get_format("ue4m3"), True, False)])
def test_fast_packer_matches_golden(layout):
    rng = np.random.default_rng(5)
    n = 37
    headers = rng.integers(0, 1 << layout.header_bits, n)
    codes = rng.integers(0, 1 << layout.code_bits, (n, layout.group))
    assert pack_blocks_fast(layout, headers, codes) == pack_blocks(layout, headers, codes)
    h, c = unpack_blocks(layout, pack_blocks_fast(layout, headers, codes))
    assert np.array_equal(h, headers) and np.array_equal(c, codes)


def test_threaded_and_inline_encoders_agree(monkeypatch):
    w = weights(6, rows=256, cols=256)
    monkeypatch.setattr(blockwise, "CHUNK_WEIGHTS", 4096)     # many chunks
    monkeypatch.setattr(blockwise, "THREADS", 2)
    a = encode_layer(w, SOP4, [get_codebook("nf4"), get_codebook("sh4")])
    monkeypatch.setattr(blockwise, "THREADS", 1)
    b = encode_layer(w, SOP4, [get_codebook("nf4"), get_codebook("sh4")])
    assert a.blocks == b.blocks


@pytest.mark.parametrize("value, threads, warned", [("abc", 1, True), ("-3", 1, True), ("2.5", 1, True),
                                                     ("²", 1, True),      # a digit to str.isdigit, not to int()
                                                     ("0", 1, False), ("", 1, False), ("3", 3, False)])
def test_sop_threads_from_the_environment(value, threads, warned):
    """A bad ``SOP_THREADS`` was a traceback at import (``sop formats`` too): now one warning line and
    one thread (a speed knob alone: the output's bits do not depend on it)."""
    run = subprocess.run([sys.executable, "-c", "from sop.quantize import blockwise; print(blockwise.THREADS)"],
                         env={**os.environ, "SOP_THREADS": value}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == f"{threads}\n", run
    if warned:
        assert run.stderr == f"sop: warning: SOP_THREADS={value!r} is not a positive integer; using 1 thread\n"
    else:
        assert run.stderr == ""


def test_bad_col_weight_is_refused():
    with pytest.raises(ValueError, match="col_weight"):
        encode_layer(np.zeros((2, 32)), SOP4, [get_codebook("nf4")] * 2, col_weight=np.ones(16))
    with pytest.raises(ValueError, match="non-negative"):
        encode_layer(np.zeros((2, 32)), SOP4, [get_codebook("nf4")] * 2, col_weight=-np.ones(32))


# -- quantize -> pack -> unpack -> golden decode == recon --------------------------------------------

def same_bits(a, b) -> bool:
    return np.array_equal(a, b) and np.array_equal(np.signbit(a), np.signbit(b))


def roundtrip(res):
    return decode_layer(unpack_layer(pack_layer(res.stream)))


@pytest.mark.parametrize("act", [False, True])
def test_fp6_recon_is_the_golden_decode(act):
    w = weights(7)
    a = np.random.default_rng(8).random(w.shape[1]) if act else None
    res = quantize_fp6(w, a)
    assert same_bits(res.recon, roundtrip(res))
    assert res.bits == res.stream.bits and res.stream.layout == FP6
    # 16 x 6-bit codes + 8-bit scale per block, the 64-entry LUT image in 10-bit HIF, the offset byte
    assert res.bits == w.size // 16 * 104 + 64 * 10 + 8


@pytest.mark.parametrize("act,sparse_k", [(False, 0), (True, 0), (True, 40)])
def test_sop4_recon_is_the_golden_decode(act, sparse_k):
    w = weights(9)
    a = np.random.default_rng(10).random(w.shape[1]) if act else None
    res = quantize_sop4(w, a, sparse_k=sparse_k)
    assert same_bits(res.recon, roundtrip(res))
    assert len(res.stream.sparse) == sparse_k
    # 9-byte blocks, two 16-entry LUT images in 10-bit HIF, the offset byte, 48 bits per sparse entry
    assert res.bits == res.stream.bits == w.size // 16 * 72 + 2 * 16 * 10 + 8 + 48 * sparse_k


def test_fp6_scale_search_beats_round_up_and_fp8():
    w = weights(11, rows=64, cols=256)
    err = {ss: ((quantize_fp6(w, scale_search=ss).recon - w) ** 2).sum() for ss in (0, 1, 2)}
    assert err[2] <= err[1] <= err[0] and err[2] < err[0]
    e4m3 = get_format("e4m3")
    step = 2.0 ** np.ceil(np.log2(np.abs(w).max() / e4m3.max))
    assert err[2] < ((e4m3.quantize(w / step) * step - w) ** 2).sum()


# -- the pair search ---------------------------------------------------------------------------

def acos(w, q, a=None):
    s = np.ones(w.shape[1]) if a is None else np.sqrt(a)
    x, y = (w * s).ravel(), (q * s).ravel()
    return x @ y / np.sqrt((x @ x) * (y @ y))


def test_pair_search_is_exhaustive_and_exact():
    w = weights(12, rows=16, cols=128)
    a = np.random.default_rng(13).random(128) + 0.1
    res = quantize_sop4(w, a, dd4=False)
    scores = {}
    for x, y in itertools.combinations(FIXED_4BIT, 2):
        s = encode_layer(w, SOP4, [get_codebook(x), get_codebook(y)], col_weight=a)
        scores[f"{x}+{y}"] = acos(w, decode_layer(s), a)
        assert res.extra["pairs"][f"{x}+{y}"][0] == pytest.approx(scores[f"{x}+{y}"], abs=1e-12)
    assert res.choice == max(scores, key=scores.get)
    assert res.extra["acos"] == pytest.approx(acos(w, res.recon, a), abs=1e-12)
    x, y = res.choice.split("+")
    assert res.stream.blocks == encode_layer(w, SOP4, [get_codebook(x), get_codebook(y)], col_weight=a).blocks


def test_search_never_worse_than_a_single_fixed_codebook():
    w = weights(14, rows=32, cols=256)
    res = quantize_sop4(w)
    err = ((res.recon - w) ** 2).sum()
    for name in FIXED_4BIT:
        single = decode_layer(encode_layer(w, SOP4, [get_codebook(name)] * 2))
        assert err < ((single - w) ** 2).sum(), name
        assert res.extra["acos"] > acos(w, single), name


def test_dd4_joins_the_search_and_never_hurts():
    w = weights(15, rows=64, cols=256)
    res = quantize_sop4(w)
    assert any("dd4" in p for p in res.extra["pairs"])
    dd4 = res.extra["dd4"]
    assert dd4.max() == 1.0 and len(np.unique(dd4)) >= 15
    fixed = quantize_sop4(w, dd4=False)
    assert res.extra["acos"] >= fixed.extra["acos"]


def test_activation_weighting_changes_choices_where_it_must():
    w = weights(16, rows=64, cols=64)
    left = np.where(np.arange(64) % 16 < 8, 1.0, 1e-4)          # the first half of every block counts
    right = left[::-1].copy()
    cbs = [get_codebook("nf4"), get_codebook("sh4")]
    ea, eb = encode(w, SOP4, cbs, col_weight=left), encode(w, SOP4, cbs, col_weight=right)
    assert ea.stream.blocks != eb.stream.blocks

    def werr(recon, a):
        return ((recon - w) ** 2 * a).reshape(w.shape[0], -1, 16).sum(axis=-1)

    # each is the per-block minimum of its own objective over the same candidates
    assert np.all(werr(ea.recon, left) <= werr(eb.recon, left))
    assert np.all(werr(eb.recon, right) <= werr(ea.recon, right))
    assert werr(ea.recon, left).sum() < werr(eb.recon, left).sum()
    # and the weighted search keeps the weighted columns closer than the unweighted one
    un = encode(w, SOP4, cbs)
    assert werr(ea.recon, left).sum() < werr(un.recon, left).sum()
    fp6_w, fp6_u = quantize_fp6(w, left), quantize_fp6(w)
    assert werr(fp6_w.recon, left).sum() < werr(fp6_u.recon, left).sum()


@pytest.mark.parametrize("exp", [-1000, -700, 520, 1000])
def test_the_scale_of_act_ms_changes_no_choice(exp):
    """act_ms times a power of two (1e-301 .. 1e301): the same stream, sparse entries and ACos, the error
    times that power (the search's sums overflowed to Inf past about 1e154, or underflowed to 0, and the
    first pair won with every score 0 or Inf)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    act = rng.uniform(0.2, 3.0, 64)
    ref = quantize_sop4(w, act, sparse_k=5)
    res = quantize_sop4(w, np.ldexp(act, exp), sparse_k=5)
    assert ref.choice == "nf4+dd4" and res.choice == ref.choice
    assert res.stream.blocks == ref.stream.blocks and np.array_equal(res.stream.luts, ref.stream.luts)
    assert np.array_equal(res.stream.sparse.index, ref.stream.sparse.index)
    assert res.extra["acos"] == ref.extra["acos"] and res.extra["error"] == np.ldexp(ref.extra["error"], exp)
    fp6, fp6_ref = quantize_fp6(w, np.ldexp(act, exp)), quantize_fp6(w, act)
    assert fp6.stream.blocks == fp6_ref.stream.blocks and fp6.extra["error"] == np.ldexp(fp6_ref.extra["error"], exp)


def test_a_layer_of_zeros_takes_offset_0_and_the_first_pair():
    """docs/sop.md: no scale is needed (offset 0, scale codes 0) and every pair's ACos is 1 (first pair);
    both banks tie on every block, and bank A wins a tie (as encode_layer): every header is 0."""
    w = np.zeros((4, 32), np.float32)
    res, fp6 = (quantize_sop4(w), quantize_sop4(w, dd4=False)), quantize_fp6(w)
    assert res[0].choice == "nf4+bof4" and res[0].extra["acos"] == 1.0
    for r in (*res, fp6):
        headers, _ = unpack_blocks(r.stream.layout, r.stream.blocks)
        assert r.stream.offset == 0 and not r.recon.any()
        assert not headers.any()


def test_the_registrys_fp6_point_is_the_fp6_quantizer():
    """quantize_point (the registry's path: sop quantize, the knapsack's FP6 option) takes the point's
    scale search, the one quantize_fp6 uses (a default of 1 there gave a larger error, unseen)."""
    from sop.golden.points import get_point
    from sop.quantize.sop_search import quantize_point

    w = np.random.default_rng(0).standard_normal((4, 64))
    a, b = quantize_point(w, get_point("e2m3-ue4m4-g16")), quantize_fp6(w)
    assert pack_layer(a.stream) == pack_layer(b.stream)
    np.testing.assert_array_equal(a.recon, b.recon)


def test_sop4_refuses_bad_pairs():
    with pytest.raises(ValueError, match="twice"):
        quantize_sop4(weights(17, 2, 32), pairs=[("nf4", "nf4")])
    with pytest.raises(ValueError, match="no codebook pair"):
        quantize_sop4(weights(17, 2, 32), pairs=[])


def test_offset_override_decodes_and_is_range_checked():
    w = weights(18, rows=8, cols=64)
    cbs = [get_codebook("nf4"), get_codebook("sh4")]
    auto = encode(w, SOP4, cbs)
    up = encode(w, SOP4, cbs, offset=auto.stream.offset + 2)
    assert up.stream.offset == auto.stream.offset + 2
    assert same_bits(up.recon, decode_layer(up.stream))
    with pytest.raises(ValueError, match="offset"):
        encode(w, SOP4, cbs, offset=200)
