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

BF16 = get_format("bf16")


def sparse_residuals(w, recon, k: int, act_ms=None) -> Sparse:
    """The ``k`` largest activation-weighted residuals of ``w - recon`` as golden Sparse entries."""
    w = np.asarray(w, dtype=np.float64)
    r = (w - recon).reshape(-1)
    if k <= 0 or r.size == 0:
        return Sparse()
    energy = r * r
    if act_ms is not None:
        energy = (energy.reshape(w.shape) * np.asarray(act_ms, dtype=np.float64)).reshape(-1)
    k = min(int(k), r.size)
    idx = np.argpartition(-energy, k - 1)[:k] if k < r.size else np.arange(r.size)
    idx = np.sort(idx[energy[idx] > 0])
    codes = BF16.encode(r[idx]).astype(np.uint16)
    keep = BF16.decode(codes) != 0
    return Sparse(idx[keep].astype(np.uint32), codes[keep])


def apply_sparse(recon: np.ndarray, sparse: Sparse) -> np.ndarray:
    """``recon`` with the entries added, the way golden.decoder does it (a dense float64
    residual added to the exact products), so the result equals decode_layer bit for bit."""
    if not len(sparse):
        return recon
    residual = np.zeros(recon.size)
    residual[sparse.index.astype(np.int64)] = BF16.decode(sparse.value_bf16)
    return (recon.reshape(-1) + residual).reshape(recon.shape)


def add_sparse(stream: LayerStream, w, recon, k: int, act_ms=None) -> tuple[LayerStream, np.ndarray]:
    """(stream with the ``k`` largest residuals as sparse entries, its reconstruction).

    ``recon`` must be the stream's reconstruction without sparse entries."""
    if len(stream.sparse):
        raise ValueError("the stream already carries sparse entries")
    sp = sparse_residuals(w, recon, k, act_ms)
    return dataclasses.replace(stream, sparse=sp), apply_sparse(recon, sp)
