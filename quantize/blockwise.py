"""Block encoder: weights -> a golden LayerStream (headers, codes, LUT images, offset).

This is the minimal, exact encoder on which the SOP search builds: for a given
layout and codebook bank(s) it picks, per block, the bank, the scale sign and
the scale code that minimize the block's squared error, among

* every bank of the layout (1, or 2 with a selection bit),
* both signs where the header carries one,
* the scale code that just covers the block without clipping, and its
  ``scale_search`` neighbours on each side;

and assigns each weight the nearest codebook entry (golden.formats' rule).
The error of each candidate is computed on the exact product the decoder
forms, so the chosen reconstruction is, bit for bit, ``golden.decoder``'s output.

The per-layer power-of-two offset is the smallest that lets the largest block
fit under the scale format's maximum. Width must be a multiple of the block
size (the quantizer issue adds padding); NaN/Inf weights are refused.
"""

from __future__ import annotations

import numpy as np

from sop.golden.codebooks import Codebook
from sop.golden.layout import OFFSET_RANGE, BlockLayout, LayerStream, pack_blocks


def check_weights(name: str, w: np.ndarray, group: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight matrix, got shape {w.shape}")
    bad = ~np.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: non-finite weight {w[r, c]} at row {r}, column {c}")
    if w.shape[1] % group:
        raise ValueError(f"{name}: {w.shape[1]} columns are not a multiple of the block size {group}")
    return w


def _cover_targets(blocks: np.ndarray, cb: Codebook, sign: int) -> np.ndarray:
    """Smallest scale magnitude per block that maps it into ``sign * cb`` without clipping."""
    top, bottom = (cb.values.max(), cb.values.min()) if sign > 0 else (-cb.values.min(), -cb.values.max())
    hi = np.maximum(blocks.max(axis=1), 0) / top if top > 0 else np.zeros(len(blocks))
    lo = np.maximum(-blocks.min(axis=1), 0) / -bottom if bottom < 0 else np.zeros(len(blocks))
    return np.maximum(hi, lo)


def choose_offset(layout: BlockLayout, max_target: float) -> int:
    """Smallest per-layer power of two that puts ``max_target`` under the scale format's maximum."""
    if max_target <= 0:
        return 0
    off = int(np.ceil(np.log2(max_target / layout.scale.max)))
    return int(np.clip(off, *OFFSET_RANGE))


def encode_layer(w, layout: BlockLayout, banks: list[Codebook], scale_search: int = 1,
                 name: str = "layer") -> LayerStream:
    """Encode a (rows, cols) weight matrix into a LayerStream; see the module docstring."""
    w = check_weights(name, w, layout.group)
    if len(banks) != layout.banks:
        raise ValueError(f"layout needs {layout.banks} codebook bank(s), got {len(banks)}")
    hif = banks[0].hif
    if any(cb.hif != hif or cb.bits != layout.code_bits for cb in banks):
        raise ValueError(f"every bank must be a {layout.code_bits}-bit table in one HIF format")
    blocks = w.reshape(-1, layout.group)
    signs = (1, -1) if layout.signed_scale else (1,)
    scale = layout.scale
    scale_values = np.where(np.isfinite(scale.values), scale.values, -np.inf)  # NaN codes never chosen

    targets = {(t, s): _cover_targets(blocks, cb, s) for t, cb in enumerate(banks) for s in signs}
    offset = choose_offset(layout, max(float(v.max()) for v in targets.values()))
    step = 2.0 ** offset

    best_err = np.full(len(blocks), np.inf)
    best = np.zeros((len(blocks), 3), dtype=np.int64)       # bank, sign bit, scale code
    best_codes = np.zeros(blocks.shape, dtype=np.int64)
    finite_codes = np.flatnonzero(np.isfinite(scale.values))
    for (t, s), target in targets.items():
        cb = banks[t]
        # index (into the sorted finite scale values) of the smallest value covering the target
        order = finite_codes[np.argsort(scale_values[finite_codes], kind="stable")]
        sorted_vals = scale_values[order] * step
        cover = np.clip(np.searchsorted(sorted_vals, target, side="left"), 0, len(order) - 1)
        for d in range(-scale_search, scale_search + 1):
            code = order[np.clip(cover + d, 0, len(order) - 1)]
            sv = s * scale.values[code] * step
            safe = np.where(sv == 0, 1.0, sv)
            q = cb.encode(blocks / safe[:, None]).astype(np.int64)
            recon = cb.values[q] * sv[:, None]
            err = ((blocks - recon) ** 2).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best[better] = np.stack([np.full(better.sum(), t), np.full(better.sum(), int(s < 0)),
                                     code[better]], axis=1)
            best_codes[better] = q[better]

    headers = layout.make_header(best[:, 2], best[:, 1], best[:, 0])
    luts = np.stack([cb.hif_codes.astype(np.int64) for cb in banks])
    return LayerStream(layout, hif, luts, offset, w.shape[0], w.shape[1],
                       pack_blocks(layout, headers, best_codes))
