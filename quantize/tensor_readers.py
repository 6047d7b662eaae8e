"""Tensor readers: a checkpoint file's tensor names, shapes and types, and one tensor at a time.

Role: the file-format side of model input (quantize/models.py's ``open_model`` picks a reader by
the checkpoint's kind, ``READERS``, and applies the layer policy to what it lists). One reader per
format: safetensors (``SafetensorsReader``, MiniLM's too), torch state dicts (``TorchReader``:
zip or legacy pickle, loaded with ``weights_only=True``, nested dicts flattened with dots) and
GGUF (``GGUFReader``: quantized tensors dequantized to float32).

Contract, the same for every reader, built from a list of files:

* ``names()``: every tensor's name; ``info(name)``: ``(shape, dtype name, is floating point)``;
  ``file_of(name)``: the file that holds it;
* ``check(name)``: raises ``CheckpointError`` for a selected layer the quantizer cannot read
  (sparse, meta, zero-size, a GGUF type the gguf package cannot dequantize), before any work;
* ``get(name, index=None)``: the tensor as a numpy array, as the file stores it (with ``index``, its
  ``tensor[index]`` alone, read without the rest: one expert of a fused ``(experts, ...)`` tensor):
  float16, float32 and float64
  in their own type, every value kept (the same numbers from every reader, so the same range
  checks and refusals downstream); only BF16 and FP8 (numpy has no such type; float32 holds
  them exactly) and GGUF's quantized types (as gguf dequantizes them) come as float32; read-only
  where it is a view of data the reader keeps (a legacy torch pickle, held in memory). Never a view
  of a memory-mapped file (a torch zip, a GGUF): a file truncated while a layer is processed would
  end the process with SIGBUS, so the tensor is copied out, after a check that the file's size,
  modification time and inode are those it was opened with (a changed file is a
  ``CheckpointError``, as safetensors' own reads report one). ``open_model``'s
  ``ModelSource.load`` makes it float64 and ``(out, in)``;
* GGUF only: ``quantized(name)`` (its quantization type, or None) and ``field(key)`` (a metadata
  value).
  A GGUF that would be read silently wrong is refused at open: one part of a split model
  (``split.count`` > 1), or a file in the other byte order than this machine's holding BF16 or
  quantized tensors (gguf dequantizes those in the machine's byte order only).
* safetensors: MXFP4 fused experts as GPT-OSS stores them, a ``X_blocks`` (U8, ``(experts, out, groups,
  16)``: two E2M1 codes a byte, the low nibble first) and ``X_scales`` (U8, ``(experts, out, groups)``:
  E8M0, one for each 32 values) pair, are listed as the one tensor ``X`` of dtype ``MXFP4``, shape
  ``(experts, in, out)``, the tensor transformers dequantizes them into (``convert_moe_packed_tensors``)
  and runs; ``get`` decodes it exactly (golden.formats' E2M1 times 2^(scale - 127), float32 holds every
  value but those past its range, which stay float64), one expert alone with ``index``. A scale of 255
  (E8M0's NaN) is a ``CheckpointError`` naming the tensor. ``where`` still names the stored pair (a shard
  index lists those).

Each reader validates its files' structure when it opens them (quantize/checkpoint_files.py:
headers only, never the whole file) and translates the exceptions its library raises on damaged
input, type by type, into ``CheckpointError``, whose message starts with the file at fault.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np

from sop.quantize.checkpoint_files import (GGUF_ERRORS, GGUF_MAGIC, ST_NUMPY, ST_TORCH, TORCH_LOAD_ERRORS,
                                           ZIP_MAGIC, CheckpointError, check_file, check_gguf,
                                           check_layer_size, check_safetensors, check_torch_legacy,
                                           check_torch_zip, describe_error, read_at)
from sop.quantize.inputs import option

class Reader:
    """What every reader shares: ``where`` (each tensor's name, in the files' order, to its file), and
    for a memory-mapped file the check that it is the file opened (``_opened``, ``_check_unchanged``)."""

    where: dict[str, Path]
    _stamps: dict[Path, tuple]

    def _opened(self, f: Path) -> None:
        """Note ``f``'s size, modification time and inode as it is opened."""
        self._stamps = getattr(self, "_stamps", {})
        self._stamps[f] = _stamp(f)

    def _check_unchanged(self, f: Path, name: str) -> None:
        """``CheckpointError`` if ``f`` is not the file opened: its memory map may now reach past the end."""
        try:
            now = _stamp(f)
        except OSError as err:
            raise CheckpointError(f, f"tensor {name} cannot be read ({err.strerror or describe_error(err)})") from None
        if now != self._stamps[f]:
            raise CheckpointError(f, f"tensor {name} cannot be read: the file changed since it was opened "
                                     f"(size, modification time or inode); run again on the file as it is now")

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name) -> Path:
        return self.where[name]

    def info(self, name) -> tuple:
        """``(shape, dtype name, is floating point)``, read from the header alone."""
        raise NotImplementedError

    def get(self, name, index: int | None = None) -> np.ndarray:
        """The tensor, or its ``tensor[index]`` (the module docstring says which dtype each kind comes as)."""
        raise NotImplementedError


#: The dtype name of an MXFP4 pair read as one tensor (``SafetensorsReader``).
MXFP4 = "MXFP4"


def _mxfp4_pairs(meta: dict) -> dict[str, tuple[str, str]]:
    """The MXFP4 ``X_blocks`` / ``X_scales`` pairs of a safetensors checkpoint, by the name ``X``."""
    pairs = {}
    for name, (shape, dtype) in meta.items():
        if not name.endswith("_blocks") or dtype != "U8" or len(shape) != 4 or shape[-1] != 16:
            continue
        base = name.removesuffix("_blocks")
        scales = meta.get(base + "_scales")
        if scales is not None and scales[1] == "U8" and tuple(scales[0]) == tuple(shape[:-1]) and base not in meta:
            pairs[base] = (name, base + "_scales")
    return pairs


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str, f: Path) -> np.ndarray:
    """``(..., out, groups, 16)`` code bytes and ``(..., out, groups)`` E8M0 scales as the ``(..., in, out)``
    values they hold (in = 32 * groups), float32 where every value fits it."""
    from sop.golden.formats import get_format

    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if (scales == 255).any():
        raise CheckpointError(f, f"tensor {name}: an MXFP4 scale is 255 (E8M0's NaN); its values are not numbers")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = get_format("e2m1").decode(codes) * get_format("ue8m0").decode(scales)[..., None]
    values = values.reshape(*blocks.shape[:-2], -1).swapaxes(-1, -2)
    return values.astype(np.float32) if np.abs(values).max(initial=0) <= np.finfo(np.float32).max else values


class SafetensorsReader(Reader):
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
        self.mxfp4 = _mxfp4_pairs(self.meta)
        for base, (blocks, _) in self.mxfp4.items():
            experts, out, groups, _ = self.meta[blocks][0]
            self.meta[base] = ((experts, 32 * groups, out), MXFP4)
            self.where[base] = self.where[blocks]
        self._hidden = {n for pair in self.mxfp4.values() for n in pair}

    def names(self) -> list[str]:
        return [n for n in self.where if n not in self._hidden]

    def info(self, name):
        shape, dtype = self.meta[name]
        return shape, dtype, dtype.startswith(("F", "BF")) or dtype == MXFP4

    def check(self, name) -> None:
        shape, dtype = self.meta[name]
        if dtype == MXFP4:
            check_layer_size(self.where[name], name, shape)
            return
        if dtype not in ST_NUMPY + ST_TORCH:
            raise CheckpointError(self.where[name], f"layer {name} has dtype {dtype}, which is not read "
                                                    f"(F16, F32, F64, BF16, F8_E4M3, F8_E5M2 are); "
                                                    f"{option('exclude', '')} it")
        check_layer_size(self.where[name], name, shape)

    def get(self, name, index: int | None = None) -> np.ndarray:
        _, dtype = self.meta[name]
        if dtype == MXFP4:
            blocks, scales = self.mxfp4[name]
            return decode_mxfp4(self._read(blocks, index, "np"), self._read(scales, index, "np"), name,
                                self.where[name])
        if dtype in ST_NUMPY:
            return self._read(name, index, "np")
        return self._read(name, index, "pt").float().numpy()      # BF16, FP8: numpy has no type

    def _read(self, name, index, framework):
        from safetensors import SafetensorError, safe_open

        f = self.where[name]
        try:
            with safe_open(str(f), framework=framework) as h:
                return h.get_tensor(name) if index is None else h.get_slice(name)[index]
        except SafetensorError as err:
            raise CheckpointError(f, f"tensor {name} cannot be read ({describe_error(err)}); was the file changed "
                                     f"since it was opened?") from None
        except OSError as err:
            raise CheckpointError(f, f"tensor {name} cannot be read ({err.strerror or describe_error(err)})") from None


def _stamp(f: Path) -> tuple:
    st = os.stat(f)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _flatten(d: dict, f: Path, prefix: str = "", out: dict | None = None) -> dict:
    """The tensors of a nested state dict under dotted names. Two that come to one name
    (``{"a.b": x, "a": {"b": y}}``) are refused: keeping either would quantize a tensor the
    checkpoint's other reader (transformers, the user's own code) may not mean by that name."""
    import torch

    out = {} if out is None else out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, f, key + ".", out)
        elif isinstance(v, torch.Tensor):
            if key in out:
                raise CheckpointError(f, f"two tensors are named {key} once its nested dicts are joined "
                                         f"with dots")
            out[key] = v
    return out


def _torch_problem(t, of_dtype: bool = True) -> str | None:
    """Why a torch tensor cannot be read as a dense floating-point matrix, or None (``of_dtype`` False:
    whatever its dtype; an FP8 scale's, E8M0 bytes too, is fp8_scales' to judge)."""
    import torch

    if t.layout != torch.strided:
        return f"is sparse ({str(t.layout).removeprefix('torch.')}); only dense tensors are read"
    if t.is_meta:
        return "has no data (a meta tensor)"
    if t.is_quantized:
        return f"is a quantized torch tensor ({str(t.dtype).removeprefix('torch.')}); only dense " \
               f"floating-point tensors are read"
    if of_dtype and t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                    torch.float8_e4m3fn, torch.float8_e5m2):
        return f"has dtype {str(t.dtype).removeprefix('torch.')}, which is not read"
    return None


class TorchReader(Reader):
    def __init__(self, files: list[Path]):
        import torch

        self.files = files
        self.tensors = {}
        self.where: dict[str, Path] = {}
        self.crcs: dict[Path, set] = {}          # zip checkpoints: (size, CRC-32) of each data member
        self.verified: set = set()               # storages whose CRC matched
        for f in files:
            size = check_file(f)
            self._opened(f)
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
            for k, v in _flatten(sd, f).items():
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

    def info(self, name):
        t = self.tensors[name]
        # by the dtype, whatever the layout or device: a sparse or meta float tensor is then selected
        # and refused by ``check``; a sparse or meta integer one is no layer, as a dense one is not
        is_float = t.dtype.is_floating_point or t.is_quantized
        return tuple(t.shape), str(t.dtype).removeprefix("torch."), is_float

    def check(self, name) -> None:
        t = self.tensors[name]
        why = _torch_problem(t)
        if why is not None:
            raise CheckpointError(self.where[name], f"layer {name} {why}")
        check_layer_size(self.where[name], name, tuple(t.shape))

    def check_scale(self, name) -> None:
        """An FP8 scale tensor's layout (its dtype is fp8_scales' to judge): dense, with data."""
        why = _torch_problem(self.tensors[name], of_dtype=False)
        if why is not None:
            raise CheckpointError(self.where[name], f"FP8 scale {name} {why}")

    def get(self, name, index: int | None = None) -> np.ndarray:
        import torch

        t = self.tensors[name]
        f = self.where[name]
        mapped = f in self.crcs                 # a zip: memory-mapped
        if mapped:
            self._check_unchanged(f, name)
            self._verify(name, t, f)
        t = t.detach() if index is None else t.detach()[index]
        if t.dtype not in (torch.float16, torch.float32, torch.float64):    # BF16, FP8: numpy has no type
            t = t.float()
        elif mapped:                            # out of the map: a later truncation cannot reach it
            t = t.clone()
        # float64 is read as float64: made float32 first, 1e300 would pass as a non-finite weight and
        # 1e-320 as zero, ahead of the range checks every reader's weights go through
        a = t.numpy()
        # a legacy pickle's float16/32/64: a view of the tensor this reader keeps, and a caller that
        # wrote into it would change every later read of the layer, unchecked
        a.flags.writeable = False
        return a

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


def _gguf_scalar(fields: dict, key: str):
    """A scalar metadata value of a gguf.GGUFReader's ``fields`` (str or number), or None."""
    fl = fields.get(key)
    if fl is None or not fl.data:
        return None
    try:
        part = fl.parts[fl.data[0]]
        if fl.types and fl.types[0].name == "STRING":
            return bytes(part).decode("utf-8", "replace")
        return part.tolist()[0] if hasattr(part, "tolist") else part
    except (IndexError, ValueError, TypeError, AttributeError):
        return None


def _check_whole_and_in_order(f: Path, r, plain: tuple) -> None:
    """Refuse a GGUF that would be read silently wrong: one part of a split model (``split.count``
    > 1: the other parts' layers would be left out without a word), or a file in the other byte
    order than this machine's that holds BF16 or quantized tensors. gguf reads F32/F16/F64 (and
    the integer types) of such a file in its byte order, but dequantizes BF16 and the quantized
    blocks (their f16 scales) in this machine's: a file swapped by gguf_convert_endian.py would
    come out as other numbers (a Q8_0 weight of 1e6, a BF16 one of 1e38), not as an error."""
    count = _gguf_scalar(r.fields, "split.count")
    if isinstance(count, int) and count > 1:
        no = _gguf_scalar(r.fields, "split.no")
        part = f"part {no + 1} of " if isinstance(no, int) and 0 <= no < count else "one part of "
        total = _gguf_scalar(r.fields, "split.tensors.count")
        held = f" ({len(r.tensors)} of its {total} tensors)" if isinstance(total, int) else ""
        raise CheckpointError(f, f"{part}a GGUF model split into {count} files (split.count){held}: the "
                                 f"other parts' layers would be left out; merge the parts into one file "
                                 f"first (llama-gguf-split --merge)")
    if r.byte_order == "S":
        odd = next((t for t in r.tensors if t.tensor_type.name not in plain), None)
        if odd is not None:
            order = "big" if sys.byteorder == "little" else "little"
            raise CheckpointError(f, f"a {order}-endian GGUF holding {odd.tensor_type.name} tensors "
                                     f"({odd.name}): the gguf package dequantizes BF16 and quantized "
                                     f"blocks in this machine's byte order ({sys.byteorder}-endian) only, "
                                     f"so their values would be misread; convert the file to "
                                     f"{sys.byteorder}-endian first")


@functools.cache
def _fast_gguf_reader():
    """gguf.GGUFReader, parsing the metadata three times as fast: each value it reads is a view of a plain
    array of the memory map, where gguf slices the ``np.memmap`` itself (whose every slice costs a memmap's
    bookkeeping: two per vocabulary string, 11.5 s for Llama 3's 128k tokens and 280k merges, 3.7 s so).
    The fields, their parts and the tensors hold the same values, types and offsets as gguf's own parse
    (tests/test_models_robust.py)."""
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None or plain.base is not self.data:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count, dt = int(count), np.dtype(dtype)
            arr = plain[offset:offset + dt.itemsize * count].view(dtype=dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return FastGGUFReader


class GGUFReader(Reader):
    PLAIN = ("F32", "F16", "F64")
    INTS = ("I8", "I16", "I32", "I64")

    def __init__(self, files: list[Path]):
        try:
            parse = _fast_gguf_reader()
        except ModuleNotFoundError:
            raise ValueError("reading GGUF needs the `gguf` package (pip install gguf)") from None
        self.files = files
        self.tensors = {}
        self.where: dict[str, Path] = {}
        self.fields: dict[str, object] = {}      # the first file's metadata: architecture, tokenizer
        self.parsed: dict[str, object] = {}      # each file's gguf.GGUFReader, by real path (causal_lm reuses it)
        for f in files:
            size = check_file(f)
            self._opened(f)
            if read_at(f, 0, 4) != GGUF_MAGIC:
                raise CheckpointError(f, "not a GGUF file (it does not start with the GGUF magic)")
            check_gguf(f, size)
            try:
                r = parse(str(f))
            except GGUF_ERRORS as err:
                raise CheckpointError(f, f"corrupt or truncated GGUF file ({describe_error(err)})") from None
            except OSError as err:
                raise CheckpointError(f, f"cannot be read ({err.strerror or describe_error(err)})") from None
            _check_whole_and_in_order(f, r, self.PLAIN + self.INTS)
            self.parsed[os.path.realpath(f)] = r
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
            if not self.fields:
                self.fields = r.fields

    def field(self, key: str):
        """A scalar metadata value (str or number), or None when the file has none."""
        return _gguf_scalar(self.fields, key)

    def quantized(self, name: str) -> str | None:
        """The GGUF type of a tensor stored quantized (Q4_1, Q8_0, ...), None for a float type."""
        kind = self.tensors[name].tensor_type.name
        return None if kind in self.PLAIN or kind == "BF16" else kind

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
                                                    f"package cannot dequantize; {option('exclude', '')} it")
        check_layer_size(self.where[name], name, self.info(name)[0])

    def get(self, name, index: int | None = None) -> np.ndarray:
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        self._check_unchanged(self.where[name], name)           # the file is memory-mapped
        data, shape = (t.data, self.info(name)[0]) if index is None else (t.data[index], self.info(name)[0][1:])
        if kind in self.PLAIN:
            return np.array(data)               # a copy: out of the map
        try:                                     # quantized (or BF16): ModelSource.notes says so, once
            return quants.dequantize(data, t.tensor_type).reshape(shape)
        except NotImplementedError:             # (a selected layer was refused by check, naming --exclude)
            raise CheckpointError(self.where[name], f"tensor {name} has GGUF type {kind}, which the gguf "
                                                    f"package cannot dequantize") from None


#: The reader of each checkpoint kind (quantize/models.py's ``_resolve``).
READERS = {"minilm": SafetensorsReader, "safetensors": SafetensorsReader, "torch": TorchReader,
           "gguf": GGUFReader}
