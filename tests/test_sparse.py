"""quantize.sparse: the k largest weighted residuals as golden Sparse entries, decoded by golden."""

import numpy as np
import pytest

from sop.golden.decoder import decode_layer
from sop.golden.formats import get_format
from sop.golden.layout import SPARSE_ENTRY_BITS, pack_layer, unpack_layer
from sop.quantize.sop_search import quantize_fp6, quantize_sop4
from sop.quantize.sparse import add_sparse, sparse_residuals

BF16 = get_format("bf16")


def layer(seed, rows=32, cols=128):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.05
    w[rng.integers(0, rows, 6), rng.integers(0, cols, 6)] = rng.choice([-1, 1], 6) * 0.9   # outliers
    return w


@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("k", [1, 25, 300])
def test_error_drops_by_the_removed_residual_energy(act, k):
    w = layer(1)
    a = np.random.default_rng(2).random(w.shape[1]) + 0.01 if act else None
    base = quantize_sop4(w, a, dd4=False)
    stream, recon = add_sparse(base.stream, w, base.recon, k, a)
    assert len(stream.sparse) == k
    # the golden decoder applies the entries (through pack/unpack): recon is its output
    assert np.array_equal(decode_layer(unpack_layer(pack_layer(stream))), recon)
    assert stream.bits == base.stream.bits + k * SPARSE_ENTRY_BITS
    aw = np.ones(w.shape[1]) if a is None else a
    r = (w - base.recon).ravel()
    idx = stream.sparse.index.astype(np.int64)
    kept = r[idx]
    ac = np.tile(aw, w.shape[0])[idx]
    removed = (ac * (kept ** 2 - (kept - BF16.decode(stream.sparse.value_bf16)) ** 2)).sum()
    err_before = (aw * (w - base.recon) ** 2).sum()
    err_after = (aw * (w - recon) ** 2).sum()
    assert err_before - err_after == pytest.approx(removed, rel=1e-9, abs=1e-15)
    # BF16 keeps 8 significant bits: rounding moves each kept residual by at most 2^-8 of itself
    assert np.all(np.abs(kept - BF16.decode(stream.sparse.value_bf16)) <= np.abs(kept) * 2.0 ** -8)


def test_entries_are_the_largest_weighted_residuals():
    w = layer(3)
    a = np.random.default_rng(4).random(w.shape[1])
    base = quantize_fp6(w, a)
    sp = sparse_residuals(w, base.recon, 50, a)
    energy = ((w - base.recon) ** 2 * a).ravel()
    idx = sp.index.astype(np.int64)
    assert np.all(np.diff(idx) > 0)
    rest = np.delete(energy, idx)
    assert energy[idx].min() >= rest.max()
    # unweighted selection differs: the weighting matters
    assert set(sparse_residuals(w, base.recon, 50).index.tolist()) != set(idx.tolist())


def test_outliers_are_caught_and_zero_residuals_are_not_stored():
    w = layer(5)
    w[:, 5::16] = 0.0                      # exact zeros reconstruct exactly: nothing to store
    base = quantize_sop4(w, dd4=False)
    stream, recon = add_sparse(base.stream, w, base.recon, w.size, None)
    nonzero = np.count_nonzero(BF16.encode((w - base.recon).ravel()) & 0x7FFF)
    assert len(stream.sparse) == nonzero < w.size
    assert np.abs(w - recon).max() <= np.abs(w - base.recon).max() * 2.0 ** -8 * (1 + 1e-9)
    with pytest.raises(ValueError, match="already"):
        add_sparse(stream, w, recon, 3)


def test_the_edges_of_the_entry_rules():
    """k as large as the layer takes every weight; a residual that BF16 rounds to zero costs an entry for
    nothing and is not stored; a -0 product with no entry becomes +0, as the decoder's dense residual makes it."""
    from sop.golden.layout import Sparse
    from sop.quantize.sparse import apply_sparse

    w = np.arange(1, 17, dtype=float).reshape(1, 16) / 7
    assert len(sparse_residuals(w, np.zeros((1, 16)), 16)) == len(sparse_residuals(w, np.zeros((1, 16)), 99)) == 16
    tiny = np.zeros((1, 16))
    tiny[0, 3], tiny[0, 5] = 1e-45, 1.0                    # below BF16's smallest subnormal, and a real one
    sp = sparse_residuals(tiny, np.zeros((1, 16)), 2)
    assert sp.index.tolist() == [5]
    out = apply_sparse(np.array([[-0.0, 1.0, -0.0]]), Sparse(np.array([1], np.uint32), BF16.encode(np.array([0.5]))))
    assert out.tolist() == [[0.0, 1.5, 0.0]] and not np.signbit(out).any()


@pytest.mark.parametrize("chunk", [7, 64, 1 << 18])
@pytest.mark.parametrize("k", [1, 5, 40, 199, 400])
def test_ties_at_the_kth_energy_go_to_the_lowest_flat_indices(monkeypatch, chunk, k):
    """Many equal residuals (levels of a coarse grid): the entries are the first k of the
    whole layer sorted by (energy descending, flat index ascending), however the rows are
    chunked."""
    from sop.quantize import sparse

    monkeypatch.setattr(sparse, "CHUNK_WEIGHTS", chunk)
    rng = np.random.default_rng(k + chunk)
    recon = np.zeros((20, 20), dtype=np.float32)
    w = (rng.integers(-3, 4, recon.shape) * 0.25).astype(np.float32)     # |r| in {0, .25, .5, .75}
    energy = (w.astype(np.float64) ** 2).ravel()
    order = np.lexsort((np.arange(energy.size), -energy))                 # energy desc, index asc
    want = np.sort(order[:k][energy[order[:k]] > 0])
    got = sparse_residuals(w, recon, k).index.astype(np.int64)
    np.testing.assert_array_equal(got, want)
