"""Regenerate the BOF4 and BOF4-S codebooks (Blumenberg et al., arXiv 2505.06653).

No values are published, so the project regenerates them with the published
procedure and checks the result in (``golden/data/bof4.json``, written by
``scripts/make_bof4.py``; ``tests/test_codebooks.py`` reproduces it).

Procedure (data-driven Lloyd, the paper's "end-to-end" objective):

* Draw ``n_blocks`` blocks of ``block`` iid N(0, 1) weights with a fixed seed.
* Normalize each block: BOF4 by its absolute maximum ``s = max|w|`` (values in
  [-1, 1], one element per block at exactly ±1); BOF4-S by its *signed*
  maximum ``s = w[argmax|w|]`` (the largest-magnitude element maps to +1).
* Minimize the error of the *weights*, ``sum s^2 (x - c(x))^2``, not of the
  normalized values: each sample carries the weight ``s^2``, and the Lloyd
  centroid of a cell is the ``s^2``-weighted mean of the samples in it.
* Levels where the normalization puts point masses or where exactness matters
  are pinned: BOF4 pins {-1, 0, +1}, BOF4-S pins {0, +1}. The others start
  evenly spaced in NF4's layout (7 levels in [-1, 0), zero, 8 in (0, 1]) and move
  by Lloyd iterations until no level moves by ``tol`` or more (at most ``iters``).
"""

from __future__ import annotations

import numpy as np

DEFAULTS = dict(block=64, n_blocks=1 << 16, seed=20250510, iters=500, tol=1e-12)


def normalized_samples(block: int, n_blocks: int, seed: int, signed: bool):
    """Sorted block-normalized values and their weights ``s^2``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_blocks, block))
    idx = np.abs(w).argmax(axis=1)
    s = w[np.arange(n_blocks), idx]
    if not signed:
        s = np.abs(s)
    x = (w / s[:, None]).ravel()
    weight = np.repeat(s * s, block)
    order = np.argsort(x, kind="stable")
    return x[order], weight[order]


def lloyd(x: np.ndarray, weight: np.ndarray, init: np.ndarray, pinned: np.ndarray,
          iters: int, tol: float) -> np.ndarray:
    """Weighted Lloyd-Max on sorted samples; ``pinned`` levels never move."""
    cw = np.concatenate([[0.0], np.cumsum(weight)])
    cwx = np.concatenate([[0.0], np.cumsum(weight * x)])
    levels = np.sort(init.astype(np.float64))
    for _ in range(iters):
        edges = (levels[:-1] + levels[1:]) / 2
        cut = np.concatenate([[0], np.searchsorted(x, edges), [len(x)]])
        mass = cw[cut[1:]] - cw[cut[:-1]]
        centroid = (cwx[cut[1:]] - cwx[cut[:-1]]) / np.where(mass > 0, mass, 1)
        new = np.where(pinned | (mass == 0), levels, centroid)
        moved = np.abs(new - levels).max()
        levels = new
        if moved < tol:
            break
    return levels


def generate(block=DEFAULTS["block"], n_blocks=DEFAULTS["n_blocks"], seed=DEFAULTS["seed"],
             iters=DEFAULTS["iters"], tol=DEFAULTS["tol"]) -> dict[str, list[float]]:
    """Both codebooks, ascending, 16 levels each."""
    # Start from NF4's layout: 7 levels below zero, zero, 8 above, ends at ±1.
    init = np.concatenate([-np.linspace(1, 0, 7, endpoint=False), [0.0],
                           np.linspace(0, 1, 9)[1:]])
    out = {}
    for name, signed in (("bof4", False), ("bof4-s", True)):
        x, weight = normalized_samples(block, n_blocks, seed, signed)
        pinned = (init == 0) | (init == 1) | ((init == -1) & (not signed))
        out[name] = lloyd(x, weight, init, pinned, iters, tol).tolist()
    return out
