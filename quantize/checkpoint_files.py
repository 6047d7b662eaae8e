"""Checkpoint files checked before any library reads them: the one clean error per damaged file.

Role: the structure checks behind the readers of quantize/tensor_readers.py. Each ``check_*``
function reads a file's headers only (never the whole file, never allocating what
a damaged length field claims) and raises ``CheckpointError`` (a ``ValueError``
whose one-line message is ``<file>: <what is wrong>``) for anything the format
does not allow: safetensors (header length, JSON, dtype x shape against the byte
offsets, overlaps, trailing bytes), torch zip (the archive's records and their
CRC-32), torch legacy pickle (scanned with every class stubbed, so that no code
runs and nothing is built; storages against the file size) and GGUF (every count
and length of the header against the file, alignment, overlaps). The readers then
translate their libraries' own exceptions, type by type, with the error tuples
defined here. docs/quantizer.md ("Bad checkpoints") lists every message.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import stat
import struct
import zipfile
from pathlib import Path


# -- the error, and what every kind of file shares --------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that cannot be read as what it claims to be.

    The message is one line, ``<file>: <what is wrong>``; ``sop`` prints it as
    ``sop: error: ...`` and exits 2. ``path`` is the file (or folder) at fault.
    """

    def __init__(self, path, what: str):
        self.path = Path(path)
        self.what = " ".join(str(what).split())
        super().__init__(f"{self.path}: {self.what}")

    def __reduce__(self):                # pickled from a --jobs worker process (quantize/jobs.py)
        return type(self), (self.path, self.what)


def describe_error(err: BaseException, limit: int = 160) -> str:
    """What a library's exception says, as one short line (its type when it says nothing)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    for line in text.splitlines():                       # torch puts the cause on a line of its own
        if "WeightsUnpickler error:" in line:
            text = line.split("WeightsUnpickler error:", 1)[1]
            break
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_file(f: Path) -> int:
    """The size of checkpoint file ``f``; a clean error when it is no readable, non-empty regular file."""
    try:
        st = f.stat()
    except OSError as err:
        raise CheckpointError(f, f"cannot be read ({err.strerror or describe_error(err)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f, "is a directory, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f, "not a regular file (a device, pipe or socket is never read)")
    if not os.access(f, os.R_OK):
        raise CheckpointError(f, "not readable (permission denied)")
    if st.st_size == 0:
        raise CheckpointError(f, "empty file (0 bytes)")
    return st.st_size


def read_at(f: Path, offset: int, n: int) -> bytes:
    try:
        with open(f, "rb") as fh:
            fh.seek(offset)
            return fh.read(n)
    except OSError as err:
        raise CheckpointError(f, f"cannot be read ({err.strerror or describe_error(err)})") from None


def check_layer_size(f: Path, name: str, shape: tuple) -> None:
    if 0 in shape:
        raise CheckpointError(f, f"layer {name} has shape {tuple(int(d) for d in shape)}: a linear layer "
                                 f"needs at least one row and one column")


# -- safetensors ----------------------------------------------------------------------------------

ST_MAX_HEADER = 100_000_000                   # the safetensors format's own limit on the header
ST_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
                 "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
ST_NUMPY = ("F16", "F32", "F64")              # read by numpy
ST_TORCH = ("BF16", "F8_E4M3", "F8_E5M2")     # read through torch: numpy has no such type


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def check_safetensors(f: Path, size: int) -> None:
    """Validate a safetensors file's header against its size (reads the header only)."""
    head = read_at(f, 0, 8)
    if len(head) < 8:
        raise CheckpointError(f, f"truncated: {size} bytes, shorter than the 8-byte safetensors header length")
    n = int.from_bytes(head, "little")
    if n > ST_MAX_HEADER:
        raise CheckpointError(f, f"header length field claims {n} bytes, over the format's limit of "
                                 f"{ST_MAX_HEADER}: not a safetensors file, or corrupted")
    if n > size - 8:
        raise CheckpointError(f, f"truncated: the header length field claims {n} bytes, the file holds "
                                 f"{size - 8} after it")
    try:
        header = json.loads(read_at(f, 8, n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise CheckpointError(f, f"the header is not valid JSON ({describe_error(err, 80)}): not a safetensors "
                                 f"file, or corrupted") from None
    if not isinstance(header, dict):
        raise CheckpointError(f, "the header is not a JSON object: not a safetensors file, or corrupted")
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str)
                and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)):
            raise CheckpointError(f, f"tensor {name}: the header entry lacks dtype, shape or data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f, f"tensor {name}: invalid shape {shape} in the header")
        if not (len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f, f"tensor {name}: invalid data_offsets {offs} in the header")
        if dtype in ST_ITEM_BYTES:
            need = math.prod(shape) * ST_ITEM_BYTES[dtype]
            if offs[1] - offs[0] != need:
                raise CheckpointError(f, f"tensor {name}: {dtype} x {shape} needs {need} bytes, its "
                                         f"data_offsets {offs} hold {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    data = size - 8 - n
    pos = 0
    for a, b, name in sorted(spans):
        if a != pos:
            raise CheckpointError(f, f"tensor {name}: its data starts at byte {a} of the data section, "
                                     f"expected {pos} (tensors overlap or leave a gap)")
        pos = b
    if pos > data:
        raise CheckpointError(f, f"truncated: the header places tensor data up to byte {pos} of the data "
                                 f"section, the file holds {data}")
    if pos < data:
        raise CheckpointError(f, f"{data - pos} bytes follow the last tensor's data: corrupted, or not a "
                                 f"safetensors file")


# -- torch: zip archives and legacy pickles ---------------------------------------------------------

ZIP_MAGIC = b"PK\x03\x04"
# What torch.load raises on a damaged checkpoint (found by truncating and garbling real files):
# the unpickler's own errors, and whatever the rebuild functions meet in a garbled pickle stream.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, struct.error, ValueError, KeyError,
                     IndexError, AttributeError, TypeError, AssertionError, OverflowError, ImportError,
                     zipfile.BadZipFile)


def check_torch_zip(f: Path, size: int) -> set:
    """The zip container of a torch checkpoint: central directory, local headers, stored members in bounds.

    Returns the (size, CRC-32) of every tensor-data member, for ``tensor_readers.TorchReader.get`` to check.
    """
    crcs = set()
    try:
        with zipfile.ZipFile(f) as zf, open(f, "rb") as fh:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f, f"zip member {info.filename} is compressed; torch stores its "
                                             f"members uncompressed")
                with zf.open(info):                  # checks the local header against the directory
                    pass
                fh.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", fh.read(4))
                end = info.header_offset + 30 + name_len + extra_len + info.compress_size
                if end > size:
                    raise CheckpointError(f, f"truncated: zip member {info.filename} ends at byte {end}, "
                                             f"the file has {size}")
                if "/data/" in info.filename:
                    crcs.add((info.file_size, info.CRC))
                elif info.CRC and info.file_size <= ST_MAX_HEADER:
                    zf.read(info)                    # the pickle and small records: zipfile checks the CRC
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, ValueError, RuntimeError,
            NotImplementedError, OSError) as err:         # OSError: zipfile seeks to a damaged offset
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f, f"corrupt or truncated torch zip checkpoint ({describe_error(err)})") from None
    return crcs


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C        # torch's legacy (non-zip) format opens with this number
_STORAGE_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                  "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


class _Stub:
    """Stands in for every class a legacy pickle names, so that scanning it runs no code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _LegacyScan(pickle._Unpickler):
    """Reads a legacy torch checkpoint's pickles without building anything: the storages it declares.

    The pure-Python unpickler, as torch's weights-only one: its memo is a dict, where the C unpickler
    grows an array to whatever index a damaged LONG_BINPUT names (minutes and gigabytes).
    """

    def __init__(self, fh):
        super().__init__(fh)
        self.storages: dict[str, tuple[int, int]] = {}      # key -> (elements, bytes)

    def find_class(self, module, name):
        return type(name, (_Stub,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind, key, numel = pid[1], str(pid[2]), pid[4]
            item = _STORAGE_BYTES.get(getattr(kind, "__name__", "").removesuffix("Storage"), 1)
            if type(numel) is not int or numel < 0:
                raise ValueError(f"storage {key} declares {numel!r} elements")
            if self.storages.setdefault(key, (numel, numel * item))[0] != numel:
                raise ValueError(f"storage {key} is declared with {self.storages[key][0]} and {numel} elements")
        return _Stub()


LEGACY_SCAN_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError,
                      AttributeError, struct.error, OverflowError, RecursionError, MemoryError)


def check_torch_legacy(f: Path, size: int) -> None:
    """A legacy torch checkpoint's declared storages against the file, before torch allocates them.

    torch.load allocates each storage at the size its pickle declares, then reads it: a damaged size
    would ask for any amount of memory. The scan reads the pickles through a memory map (a damaged
    length never allocates) and checks every storage record: its element count, and that it fits.
    """
    try:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            scan = _LegacyScan(m)
            if scan.load() != LEGACY_MAGIC:
                raise CheckpointError(f, "not a torch checkpoint: neither a zip archive nor torch's legacy "
                                         "pickle format")
            scan.load()                          # protocol version
            scan.load()                          # sys info
            scan.load()                          # the state dict
            keys = scan.load()
            pos = m.tell()
            if not isinstance(keys, list):
                raise ValueError("no storage key list")
            for key in keys:
                if str(key) not in scan.storages:
                    raise ValueError(f"storage {key} is listed but never used")
                declared, need = scan.storages[str(key)]
                if pos + 8 > size:
                    raise EOFError(f"storage {key} is missing")
                numel = int.from_bytes(m[pos:pos + 8], "little", signed=True)
                pos += 8
                if numel != declared:
                    raise ValueError(f"storage {key} holds {numel} elements, the pickle declares {declared}")
                if pos + need > size:
                    raise CheckpointError(f, f"truncated: storage {key} ({need} bytes) ends at byte "
                                             f"{pos + need}, the file has {size}")
                pos += need
            if pos < size:
                raise CheckpointError(f, f"{size - pos} bytes follow the last storage: corrupted, or not a "
                                         f"torch checkpoint")
    except LEGACY_SCAN_ERRORS as err:
        if isinstance(err, CheckpointError):
            raise
        if read_at(f, 0, 1) != b"\x80":           # torch writes pickle protocol 2: it opens with PROTO
            raise CheckpointError(f, f"not a torch checkpoint: neither a zip archive nor a pickle "
                                     f"({describe_error(err)})") from None
        raise CheckpointError(f, f"corrupt or truncated torch checkpoint, legacy pickle format "
                                 f"({describe_error(err)})") from None


# -- GGUF -----------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
# What gguf.GGUFReader raises on a damaged file (found by truncating and garbling real files):
# its own checks, numpy views past the end of the memory map, unknown enum values.
GGUF_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error)


GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9


def check_gguf(f: Path, size: int) -> None:
    """Walk a GGUF header (metadata and tensor infos), every length and count against the file size.

    gguf.GGUFReader builds Python objects for each array element a count declares: a damaged count
    would run for minutes and exhaust memory. Nothing here allocates more than the header holds.
    """
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 4
        where = "the header"

        def take(n: int) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise CheckpointError(f, f"truncated or corrupt GGUF file: {where} runs past the end of the "
                                         f"file ({size} bytes)")
            pos += n
            return pos - n

        order = "<"
        version = struct.unpack_from("<I", m, take(4))[0]
        if version & 0xFFFF == 0:                # written on a big-endian machine
            order, version = ">", struct.unpack_from(">I", m, pos - 4)[0]
        if version not in (2, 3):
            raise CheckpointError(f, f"GGUF version {version} is not supported (2 and 3 are)")

        def u(fmt: str) -> int:
            return struct.unpack_from(order + fmt, m, take(struct.calcsize(fmt)))[0]

        def string() -> bytes:
            n = u("Q")
            return m[take(n):pos]

        def value(kind: int, depth: int = 0) -> None:
            if kind in GGUF_SCALAR_BYTES:
                take(GGUF_SCALAR_BYTES[kind])
            elif kind == GGUF_STRING:
                take(u("Q"))
            elif kind == GGUF_ARRAY and depth < 4:
                item, count = u("I"), u("Q")
                if item in GGUF_SCALAR_BYTES:
                    take(count * GGUF_SCALAR_BYTES[item])
                else:
                    for _ in range(count):       # each element takes >= 8 bytes: ends with the file
                        value(item, depth + 1)
            else:
                raise CheckpointError(f, f"corrupt GGUF file: {where} has unknown value type {kind}")

        n_tensors, n_kv = u("Q"), u("Q")
        for i in range(n_kv):
            where = f"metadata entry {i}"
            key = string()
            where = f"metadata entry {key[:60].decode('utf-8', 'replace')!r}"
            value(u("I"))
        for i in range(n_tensors):
            where = f"tensor info {i}"
            name = string()
            where = f"tensor info {name[:60].decode('utf-8', 'replace')!r}"
            dims = u("I")
            if not 1 <= dims <= 4:
                raise CheckpointError(f, f"corrupt GGUF file: {where} has {dims} dimensions (1 to 4 are valid)")
            take(8 * dims + 4 + 8)
