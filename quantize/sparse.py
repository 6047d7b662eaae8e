"""Sparse residuals: a layer's k worst-reconstructed weights corrected by golden ``Sparse`` entries.

After a layer is encoded, ``q`` is its reconstruction and ``r = w - q`` the residual.
``sparse_residuals`` keeps the ``k`` positions with the largest activation-weighted
residual energy ``a_j r^2`` (``a_j`` = the column's activation mean square, or 1)
as entries of ``golden.layout.Sparse``: the flat index ``row * cols + col`` (u32,
strictly increasing) and the residual rounded to BF16 (golden's rule, via
``get_format("bf16").encode``). ``golden.decoder.decode_layer`` adds them to the
exact block products before its output rounding, and ``LayerStream.bits``
counts ``SPARSE_ENTRY_BITS`` (48) per entry, so the bit budget sees them.

With the entries the layer's weighted error drops by exactly
``sum a_j (r^2 - (r - bf16(r))^2)`` over the kept positions: the removed residual
energy up to BF16's rounding of each residual (a test checks this).

Entries whose residual rounds to BF16 zero are dropped (they would cost 48 bits
for nothing), so a stream can hold fewer than ``k``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sop.golden.formats import get_format
from sop.golden.layout import LayerStream, Sparse
from sop.quantize.blockwise import float_weights, row_slices

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


def _top_k(w, recon, k: int, act) -> np.ndarray | None:
    """The flat indices of the ``k`` largest energies, row chunk by row chunk, when they are
    unambiguous: no energy outside them equals the smallest inside (else None: which of tied
    entries ``np.argpartition`` keeps is its own business, so the caller asks it)."""
    cols = w.shape[1]
    parts_e, parts_i, total, thr = [], [], 0, -np.inf

    def prune():
        pe, pi = np.concatenate(parts_e), np.concatenate(parts_i)
        kth = np.partition(pe, pe.size - k)[pe.size - k]     # the k-th largest so far
        m = pe >= kth
        return pe[m], pi[m], kth

    for sl in _rows(w.shape):
        _, e = _energy(w, recon, act, sl)
        keep = np.flatnonzero(e >= thr)            # below the k-th largest so far: never chosen
        parts_e.append(e[keep])
        parts_i.append(keep + sl.start * cols)
        total += keep.size
        if total > 2 * k + CHUNK_WEIGHTS:
            pe, pi, thr = prune()
            parts_e, parts_i, total = [pe], [pi], pe.size
    pe, pi, _ = prune()
    if pe.size != k:                                # a tie across the boundary: ambiguous
        return None
    return pi


def sparse_residuals(w, recon, k: int, act_ms=None) -> Sparse:
    """The ``k`` largest activation-weighted residuals of ``w - recon`` as golden Sparse entries.

    Row chunk by row chunk (a float32 ``w`` stays so): the entries are those of the
    whole-layer ``np.argpartition`` of the energies; where a tie at the k-th largest energy
    makes that choice ambiguous, the whole-layer arrays are built and it is asked."""
    w = float_weights(w)
    n = w.size
    if k <= 0 or n == 0:
        return Sparse()
    recon = np.asarray(recon)
    act = None if act_ms is None else np.asarray(act_ms, dtype=np.float64)
    k = min(int(k), n)
    idx = None
    if w.ndim == 2 and recon.shape == w.shape and k < n:
        idx = _top_k(w, recon, k, act)
    if idx is None:
        # np.argpartition over the whole layer's energies, as before (which of tied entries it
        # keeps depends on the whole array); built row chunk by row chunk and negated in place
        # (the same values as ``-energy``), without the float64 copy of w or the residuals
        energy = np.empty(n)
        if w.ndim == 2 and recon.shape == w.shape:
            cols = w.shape[1]
            for sl in _rows(w.shape):
                energy[sl.start * cols:sl.stop * cols] = _energy(w, recon, act, sl)[1]
        else:
            r = (np.asarray(w, dtype=np.float64) - recon).reshape(-1)
            energy[:] = r * r if act is None else ((r * r).reshape(w.shape) * act).reshape(-1)
            del r
        np.negative(energy, out=energy)
        idx = np.argpartition(energy, k - 1)[:k].copy() if k < n else np.arange(n)
        idx = np.sort(idx[energy[idx] < 0])          # energy > 0
        del energy
        rv = (np.asarray(w, dtype=np.float64).reshape(-1)[idx] if w.ndim != 2 else
              np.asarray(w[idx // w.shape[1], idx % w.shape[1]], dtype=np.float64)) - recon.reshape(-1)[idx]
    else:
        idx = np.sort(idx)
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


def apply_sparse(recon: np.ndarray, sparse: Sparse) -> np.ndarray:
    """``recon`` with the entries added, the way golden.decoder does it (a dense float64
    residual added to the exact products), so the result equals decode_layer bit for bit.
    Built without the dense residual: ``recon + 0.0`` everywhere (which turns -0 into +0, as
    adding the residual's zeros does), then the entries' sums at their positions."""
    if not len(sparse):
        return recon
    out = np.empty(recon.shape)
    flat, src = out.reshape(-1), recon.reshape(-1)
    step = CHUNK_WEIGHTS
    for a in range(0, src.size, step):
        np.add(src[a:a + step], 0.0, out=flat[a:a + step], dtype=np.float64)
    idx = sparse.index.astype(np.int64)
    flat[idx] = src[idx].astype(np.float64) + np.asarray(BF16.decode(sparse.value_bf16), dtype=np.float64)
    return out


def add_sparse(stream: LayerStream, w, recon, k: int, act_ms=None) -> tuple[LayerStream, np.ndarray]:
    """(stream with the ``k`` largest residuals as sparse entries, its reconstruction).

    ``recon`` must be the stream's reconstruction without sparse entries."""
    if len(stream.sparse):
        raise ValueError("the stream already carries sparse entries")
    sp = sparse_residuals(w, recon, k, act_ms)
    return dataclasses.replace(stream, sparse=sp), apply_sparse(recon, sp)
