"""Sparse residuals: a layer's k worst-reconstructed weights corrected by golden ``Sparse`` entries.

After a layer is encoded, ``q`` is its reconstruction and ``r = w - q`` the residual.
``sparse_residuals`` keeps the ``k`` positions with the largest activation-weighted
residual energy ``a_j r^2`` (``a_j`` = the column's activation mean square, or 1;
docs/sop.md writes it ``a_j^2``)
as entries of ``golden.layout.Sparse``: the flat index ``row * cols + col`` (u32,
strictly increasing) and the residual rounded to BF16 (golden's rule, via
``get_format("bf16").encode``). ``golden.decoder.decode_layer`` adds them to the
exact block products before its output rounding, and ``LayerStream.bits``
counts ``SPARSE_ENTRY_BITS`` (48) per entry, so the bit budget sees them.

With the entries the layer's weighted error drops by exactly
``sum a_j (r^2 - (r - bf16(r))^2)`` over the kept positions: the removed residual
energy up to BF16's rounding of each residual (a test checks this).

Among equal energies at the k-th largest, the lowest flat indices are kept (a rule
of this module, not of numpy's partition, so that the choice can be made row chunk
by row chunk). Entries whose residual rounds to BF16 zero are dropped (they would cost 48 bits
for nothing), so a stream can hold fewer than ``k``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sop.golden.formats import get_format
from sop.golden.layout import LayerStream, Sparse
from sop.quantize.blockwise import float_weights, row_slices
from sop.quantize.metrics import unit_scaled

BF16 = get_format("bf16")


#: Weights per row chunk of the residual pass (float64 temporaries of a few MB).
CHUNK_WEIGHTS = 1 << 18


def _rows(shape) -> list[slice]:
    return row_slices(shape[0], shape[1], CHUNK_WEIGHTS)


def _energy(w, recon, act, sl) -> tuple[np.ndarray, np.ndarray]:
    """(residual, weighted energy) of rows ``sl``, flat, as the whole-layer expressions give them."""
    r = np.asarray(w[sl], dtype=np.float64) - recon[sl]
    energy = r * r
    if act is not None:
        energy = energy * act
    return r.reshape(-1), energy.reshape(-1)


def _top_k(w, recon, k: int, act) -> np.ndarray:
    """The flat indices (ascending) of the ``k`` largest energies, ties at the k-th largest
    going to the lowest flat indices, row chunk by row chunk.

    Candidates are kept in index order: once ``k`` are held, a later energy must beat the
    smallest held one strictly to enter (an equal one has a higher index, so it loses),
    and a prune keeps exactly ``k``. Memory: the candidates (at most ``2k`` + one chunk),
    16 bytes each, besides one chunk of float64 temporaries."""
    cols = w.shape[1]
    parts_e, parts_i, total, thr, full = [], [], 0, -np.inf, False

    def prune():
        pe, pi = np.concatenate(parts_e), np.concatenate(parts_i)
        if pe.size <= k:
            return pe, pi
        kth = np.partition(pe, pe.size - k)[pe.size - k]     # the k-th largest so far
        above = pe > kth
        ties = np.flatnonzero(pe == kth)[:k - int(np.count_nonzero(above))]   # the lowest indices
        keep = above
        keep[ties] = True
        return pe[keep], pi[keep]

    for sl in _rows(w.shape):
        _, e = _energy(w, recon, act, sl)
        keep = np.flatnonzero(e > thr if full else e >= thr)
        parts_e.append(e[keep])
        parts_i.append(keep + sl.start * cols)
        total += keep.size
        if total > 2 * k + CHUNK_WEIGHTS:
            pe, pi = prune()
            parts_e, parts_i, total = [pe], [pi], pe.size
            full = pe.size == k
            thr = float(pe.min()) if full else -np.inf
    return prune()[1]


def sparse_residuals(w, recon, k: int, act_ms=None) -> Sparse:
    """The ``k`` largest activation-weighted residuals of ``w - recon`` as golden Sparse entries.

    Row chunk by row chunk (a float32 ``w`` stays so; nothing of the layer's size is
    allocated); among equal energies at the k-th largest, the lowest flat indices are kept."""
    w = float_weights(w)
    recon = np.asarray(recon)
    if recon.shape != w.shape:
        raise ValueError(f"reconstruction shape {recon.shape} differs from the weights' {w.shape}")
    if w.ndim != 2:
        w, recon = w.reshape(1, -1), recon.reshape(1, -1)
    if k <= 0 or w.size == 0:
        return Sparse()
    # scaled by a power of two (exact): the same order of energies, none of them Inf
    act = None if act_ms is None else unit_scaled(np.asarray(act_ms, dtype=np.float64))[0]
    idx = _top_k(w, recon, min(int(k), w.size), act)
    rows, cols = idx // w.shape[1], idx % w.shape[1]
    rv = np.asarray(w[rows, cols], dtype=np.float64) - recon[rows, cols]
    e = rv * rv
    if act is not None:
        e = e * act[cols]
    pos = e > 0
    idx, rv = idx[pos], rv[pos]
    codes = BF16.encode(rv).astype(np.uint16)
    keep = BF16.decode(codes) != 0
    return Sparse(idx[keep].astype(np.uint32), codes[keep])


def apply_sparse(recon: np.ndarray, sparse: Sparse, inplace: bool = False) -> np.ndarray:
    """``recon`` with the entries added, the way golden.decoder does it (a dense float64
    residual added to the exact products), so the result equals decode_layer bit for bit.
    Built without the dense residual: ``recon + 0.0`` everywhere (which turns -0 into +0, as
    adding the residual's zeros does), then the entries' sums at their positions.
    ``inplace`` (a C-contiguous float64 ``recon`` the caller owns) writes into ``recon``."""
    if not len(sparse):
        return recon
    if inplace and not (recon.dtype == np.float64 and recon.flags.c_contiguous):
        raise ValueError("apply_sparse in place needs a C-contiguous float64 reconstruction")
    out = recon if inplace else np.empty(recon.shape)
    flat, src = out.reshape(-1), recon.reshape(-1)
    step = CHUNK_WEIGHTS
    for a in range(0, src.size, step):
        np.add(src[a:a + step], 0.0, out=flat[a:a + step], dtype=np.float64)
    idx = sparse.index.astype(np.int64)
    flat[idx] = src[idx].astype(np.float64) + sparse_values(sparse)
    return out


def sparse_values(sparse: Sparse) -> np.ndarray:
    """The entries' residuals as float64 (their BF16 values, exactly)."""
    return np.asarray(BF16.decode(sparse.value_bf16), dtype=np.float64)


def add_sparse(stream: LayerStream, w, recon, k: int, act_ms=None) -> tuple[LayerStream, np.ndarray]:
    """(stream with the ``k`` largest residuals as sparse entries, its reconstruction).

    ``recon`` must be the stream's reconstruction without sparse entries."""
    if len(stream.sparse):
        raise ValueError("the stream already carries sparse entries")
    sp = sparse_residuals(w, recon, k, act_ms)
    return dataclasses.replace(stream, sparse=sp), apply_sparse(recon, sp)
