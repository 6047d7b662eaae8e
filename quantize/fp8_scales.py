"""The scales of FP8 checkpoints: a layer stored in FP8 beside a scale tensor is its product with that scale.

FP8 releases of LLMs store each linear weight as FP8 values ``q`` and a float32 scale ``s`` beside it;
the weight is ``q * s``, ``s`` broadcast over blocks of the matrix. Read alone, ``q`` is the weight
divided by up to thousands: quantizing it would write a model off by those factors, without a word.
The two conventions in use, found by the tensor's name (``X.weight`` -> its sibling):

* ``X.weight_scale_inv`` (DeepSeek-V3, Qwen3 FP8, transformers' ``fp8`` quantization config): one
  scale per block of ``b0 x b1`` weights, shape ``(ceil(rows / b0), ceil(cols / b1))``, the block from
  ``config.json``'s ``quantization_config.weight_block_size`` (the config of the folder, or the one
  beside a weights file given alone), else 128 x 128 where the shape fits it; like ``weight_scale``
  it also takes one scale for the tensor or one per row (the only reading of those shapes);
* ``X.weight_scale`` (compressed-tensors, FBGEMM, ModelOpt): one scale for the tensor (``()``,
  ``(1,)``), one per row (``(rows,)``, ``(rows, 1)``), or one per group of columns (``(rows, groups)``,
  ``groups`` dividing ``cols``).

A scale is a float (F32, F16, BF16, F64, E8M0) or unsigned bytes holding E8M0 exponents (MXFP8:
``2 ** (byte - 127)``, 255 NaN); any other type is refused, and so is a scale that is not finite.

``scale_of`` names the scale of an FP8 layer and how it spreads, or ``None`` for an FP8 layer with
no scale beside it (plain FP8 values); a scale it cannot place (another shape, both conventions at
once, a scale tensor of another name such as Mistral's ``qscale_weight``) is a ``CheckpointError``:
never the unscaled values. ``values`` decodes a scale tensor (refusing one that is not finite);
``apply`` forms ``q * s`` in float64, exactly (an FP8 value has at most 4 significant bits, a
float32 scale 24; a float64 scale rounds once), in place, block row by block row (the product's 8
bytes a weight and no broadcast copy). Activation scales (``input_scale``, ``k_scale``, ...) do not
change a weight and are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sop.quantize.checkpoint_files import CheckpointError
from sop.quantize.inputs import option

FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")
#: scale types read as their values, and those that hold E8M0 exponents as bytes
FLOAT_SCALES = ("F32", "F16", "BF16", "F64", "F8_E8M0", "float32", "float16", "bfloat16", "float64", "float8_e8m0fnu")
BYTE_SCALES = ("U8", "uint8")
#: scale tensors that belong to the activations, not the weight
ACTIVATION_SCALES = ("input_scale", "output_scale", "k_scale", "v_scale", "q_scale")
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Fp8Scale:
    """The scale tensor of an FP8 layer and the block of weights each of its values covers."""

    name: str                   # the scale tensor
    block: tuple[int, int]      # (rows, columns) of weights per scale value
    e8m0: bool = False          # stored as bytes holding E8M0 exponents: 2 ** (byte - 127)


def scale_tensors(names) -> dict[str, list[str]]:
    """The checkpoint's tensors whose last name part says ``scale``, by their module (the name up to and
    with its last dot): what ``scale_of`` looks among, found once for every layer."""
    out: dict[str, list[str]] = {}
    for n in names:
        module, _, last = n.rpartition(".")
        if "scale" in last:
            out.setdefault(f"{module}." if module else "", []).append(n)
    return out


def scale_of(name: str, shape: tuple, dtype: str, scales: dict[str, list[str]], info, cfg: dict | None,
             where) -> Fp8Scale | None:
    """The scale of layer ``name`` (stored ``shape``, ``dtype``) among ``scales`` (``scale_tensors``;
    ``info(n)``: a tensor's stored shape and type; ``cfg``: config.json or None; ``where``: the file named
    by an error). None: not FP8, or FP8 with no scale beside it."""
    if dtype not in FP8_DTYPES or not name.endswith("weight"):
        return None
    siblings = scales.get(name[:-len("weight")], [])
    found = [n for n in (f"{name}_scale_inv", f"{name}_scale") if n in siblings]
    others = [n for n in siblings if n not in found and not n.endswith(ACTIVATION_SCALES)]
    if len(found) > 1 or others:
        raise CheckpointError(where, f"layer {name} is stored in FP8 beside scale tensors this reader does not "
                                     f"apply ({', '.join(found[1:] + others)}): its values alone are not the "
                                     f"weights; {option('exclude', '')} it")
    if not found:
        return None
    rows, cols = (int(v) for v in shape)
    s, stype = info(found[0])[:2]
    s = tuple(int(v) for v in s)
    if stype not in FLOAT_SCALES + BYTE_SCALES:
        raise CheckpointError(where, f"layer {name} is stored in FP8 with a scale {found[0]} of type {stype}, "
                                     f"which this reader does not apply (a float, or bytes of E8M0 exponents); "
                                     f"{option('exclude', '')} it")
    block = _block(found[0], rows, cols, s, cfg)
    if block is None:
        raise CheckpointError(where, f"layer {name} is stored in FP8 with a scale {found[0]} of shape {s}, which "
                                     f"spreads over its {rows} x {cols} weights in no way this reader knows; "
                                     f"{option('exclude', '')} it")
    return Fp8Scale(found[0], block, stype in BYTE_SCALES)


def _block(scale: str, rows: int, cols: int, s: tuple, cfg: dict | None) -> tuple[int, int] | None:
    """The weights per scale value, or None where ``s`` fits no convention."""
    if math.prod(s) == 1 and len(s) <= 2:
        return rows, cols                                   # one scale for the tensor
    if s in ((rows,), (rows, 1)):
        return 1, cols                                      # one per row
    if len(s) != 2:
        return None
    if scale.endswith("_scale_inv"):
        qc = (cfg or {}).get("quantization_config") or {}
        b = qc.get("weight_block_size") if isinstance(qc, dict) else None
        b0, b1 = (int(b[0]), int(b[1])) if isinstance(b, list) and len(b) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b) else DEFAULT_BLOCK
        return (b0, b1) if s == (-(-rows // b0), -(-cols // b1)) else None
    if s[0] == rows and cols % s[1] == 0:
        return 1, cols // s[1]                              # groups of columns
    return None


def values(scale: np.ndarray, fp8: Fp8Scale, layer: str, where) -> np.ndarray:
    """The scale's values as float64 (E8M0 bytes decoded); a value that is not finite is refused."""
    s = np.asarray(scale, dtype=np.float64)
    if fp8.e8m0:
        s = np.where(s == 255, np.nan, np.ldexp(1.0, (s - 127).astype(np.int64)))
    bad = ~np.isfinite(s)
    if bad.any():
        raise CheckpointError(where, f"layer {layer}: its FP8 scale {fp8.name} holds {s[bad].flat[0]} "
                                     f"({int(bad.sum())} of {s.size}): the weights it scales are not numbers; "
                                     f"{option('exclude', '')} it")
    return s


def apply(q: np.ndarray, s: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``q * s`` in float64, each value of ``s`` (``values``) over its ``block`` of ``q`` (stored
    ``(rows, cols)``), formed in place (in ``q`` itself where it is a float64 array) block row by block
    row: no array but the product's."""
    out = np.asarray(q, dtype=np.float64)
    rows, cols = out.shape
    b0, b1 = block
    s = s.reshape(-(-rows // b0), -(-cols // b1))
    if b0 == 1 and cols % b1 == 0:                      # a scale per row or per group of columns: at once
        out.reshape(rows, cols // b1, b1)[...] *= s[:, :, None]
        return out
    for i in range(s.shape[0]):
        slab = out[i * b0:(i + 1) * b0]                 # whole rows: contiguous, so reshape is a view
        if cols % b1 == 0:
            slab.reshape(slab.shape[0], cols // b1, b1)[...] *= s[i][None, :, None]
        else:                                           # a ragged last column block
            for j in range(s.shape[1]):
                slab[:, j * b1:(j + 1) * b1] *= s[i, j]
    return out
