"""The quantized artifact (``.sopq``): `sop quantize` writes it, `sop dequantize` reads it back.

A ``.sopq`` file holds one model quantized in one format (docs/quantizer.md,
"Artifacts and reports"). All integers are little-endian::

    offset        bytes  field
    0             4      magic  b"SOPQ"
    4             2      container version (1)
    6             2      reserved, 0
    8             4      header length H
    12            H      header: UTF-8 JSON (model, fingerprint, format, calibration,
                         one entry per layer, summary)
    12 + H        4      CRC-32 of the header bytes
    16 + H        D      data: the layer records back to back, in header order
    16 + H + D    4      CRC-32 of every byte before it (the whole file)

A layer's header entry gives its name (as in the source checkpoint), its
``(out, in)`` shape, its padded shape, whether the checkpoint stores it
transposed, the record kind, the record's offset (from the start of the data)
and length, the record's CRC-32 (a ``sopl`` record's own, its last 4 bytes:
``record_crc_ok``), its bits, bpw and the quantizer's choice; an expert of a
fused experts tensor also ``stack``: ``[tensor, expert, experts]``
(its name is ``tensor[expert]``, and a tensor's experts follow one another in
order). Two record kinds:

* ``"sopl"``: exactly ``golden.layout.pack_layer(stream)`` (its own magic, LUT
  images, offset, blocks, sparse table and CRC-32), for every format with a
  golden layer stream (``sop4-g16``, ``e2m3-ue4m4-g16``, the SOP layers of
  ``sop-budget``). Its ``rows x cols`` is the padded shape; decoding crops.
* ``"f32"``: the reconstruction as float32, little-endian, row-major
  ``(out, in)``, for the baselines (and ``sop-budget``'s FP8 layers), which have
  no hardware stream in this project: they are stored *decoded*, 32 bits per
  weight on disk (their ``bits``/``bpw`` in the header are the format's cost).

Contract.

* ``quantize_model`` reads and quantizes the layers one at a time (peak memory
  about one layer; ``sop-budget``'s knapsack reads every layer once to measure its
  options and keeps only their costs, sparse entries and streams; ``jobs=N``: N
  layers at a time in worker processes, quantize/jobs.py, the records taken in
  layer order so the file is the same bytes) and
  streams the records to a temporary file in the target folder; the container is
  then assembled in a second temporary file, flushed to disk and renamed over
  the target. On any exception (Ctrl-C included) both temporary files are
  removed and an existing target is left as it was.
* ``open_artifact`` checks, before returning anything, the magic, version,
  header CRC, every header field, the file length, every record's CRC and the
  whole-file CRC; any failure raises ``ArtifactError`` naming what is wrong
  (the layer, for a record). Decoding a record checks it again.
* ``dequantize`` decodes every layer through ``golden.decoder.decode_layer``
  (exact output) or reads its float32 record, crops the padding, restores the
  checkpoint's orientation and writes float32 safetensors (the quantized linear
  layers only, under their source names; the experts of a fused tensor as that
  one ``(experts, ...)`` tensor), streamed through a temporary file and
  renamed: the same all-or-nothing guarantee. For every layer the result equals
  ``golden.formats.to_float32(QuantResult.recon)`` bit for bit (float32 by the output rule, which
  saturates: a baseline's reconstruction can reach 2^128, past float32's largest). A layer stream is
  decoded as the exact value rounded once to float32; that is ``to_float32`` of the float64 ``recon``
  wherever a product has at most 24 significant bits (every registered point: HIF M6 under UE4M4).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sop.golden.files import (InputError, OutputError, another_version, atomic_output, check_output, crc32,
                              input_file, temp_file_in)
from sop.golden.decoder import OUTPUTS, decode_layer
from sop.golden.formats import bf16_codes_of_float32, to_float32
from sop.golden.layout import VERSION as LAYER_STREAM_VERSION
from sop.golden.layout import LayerStream, LayoutError, pack_layer, unpack_layer
from sop.quantize import calib as C
from sop.quantize.evaluate import jsonable
from sop.quantize.inputs import boolean, cache_folder, on_command_line, option
from sop.quantize.knapsack import check_budget_shapes
from sop.quantize.layer_loop import (BudgetOutcomes, LayerOutcome, budget_model, calibration_for, check_options,
                                     layer_line, quantize_layer, recon_float32, reporter)
from sop.quantize.layer_loop import layer_outcomes as pooled_layer_outcomes
from sop.quantize.job_server import start as start_server
from sop.quantize.jobs import LayerPool, check_jobs, usable_cpus
from sop.quantize.schemes import get_quant_format
from sop.quantize.metrics import abs_max, aggregate
from sop.quantize.models import (ARTIFACT_SUFFIX, CHECKPOINT_SUFFIXES, MINILM, SAFETENSORS_SUFFIXES, SIBLINGS_READ,
                                 SMOLLM2, builtin_path, expert_layer_name, files_fingerprint, is_artifact, is_lm_head,
                                 linear_layers, model_inputs, open_model)
from sop.quantize.result import QuantResult
from sop.terminal import some_names

MAGIC = b"SOPQ"
VERSION = 1
PREAMBLE = struct.Struct("<4sHHI")        # magic, version, reserved, header length
CRC = struct.Struct("<I")
RECORD_KINDS = {
    "sopl": f"golden.layout.pack_layer stream (layer stream version {LAYER_STREAM_VERSION}), padded shape",
    "f32": "float32 little-endian reconstruction, row-major (out, in), stored decoded",
}
MAX_HEADER = 1 << 30                      # a sanity bound on the header length field
MAX_NAME = 1024                           # longest layer name (a checkpoint tensor name)
RESERVED_NAMES = ("__metadata__",)        # the safetensors header's own key
#: CRC-32 (zlib's) of any bytes followed by their own CRC-32, little-endian: every intact ``sopl`` record's
SOPL_RESIDUE = 0x2144DF1C
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """A .sopq file that is truncated, corrupted or inconsistent."""


# -- records -----------------------------------------------------------------------------------------

def encode_record(res: QuantResult, shape: tuple[int, int], name: str):
    """(kind, the record's bytes as an iterator of chunks, padded shape) of one quantized layer.

    An ``f32`` record is the reconstruction rounded by the float32 output rule
    (``golden.formats.to_float32``: saturating, so never Inf), in row chunks of about
    ``_CHUNK`` bytes; a ``sopl`` record is one chunk, ``pack_layer(stream)``."""
    rows, cols = shape
    if res.recon.shape != (rows, cols):
        raise ValueError(f"{name}: reconstruction shape {res.recon.shape} differs from the layer's {shape}")
    if res.stream is not None:
        s: LayerStream = res.stream
        if s.rows != rows or s.cols < cols:
            raise ValueError(f"{name}: layer stream {s.rows} x {s.cols} cannot hold a {rows} x {cols} layer")
        return "sopl", iter([pack_layer(s)]), [s.rows, s.cols]
    step = max(1, _CHUNK // max(1, 4 * cols))
    chunks = (np.ascontiguousarray(to_float32(res.recon[r:r + step]), dtype="<f4").tobytes()
              for r in range(0, rows, step))
    return "f32", chunks, [rows, cols]


def record_payload(res: QuantResult, shape: tuple[int, int], name: str):
    """(kind, the record as one array, padded shape): ``encode_record``'s chunks joined, for a
    --jobs worker to send back raw (quantize/jobs.py). An ``f32`` record is the float32 array itself
    (the chunks are its rows: the same bytes), a ``sopl`` record a uint8 array of its bytes."""
    kind, chunks, padded = encode_record(res, shape, name)
    if kind == "f32":
        return kind, np.ascontiguousarray(recon_float32(res.recon), dtype="<f4"), padded
    return kind, np.frombuffer(b"".join(chunks), dtype=np.uint8), padded


def decode_record(entry: "LayerEntry", data: bytes | bytearray, out: str = "exact") -> np.ndarray:
    """The layer's float32 ``(out, in)`` weights from its record (padding cropped): an ``f32``
    record's are a view of ``data`` (writable where ``data`` is), refused if one is not finite.
    ``out="bf16"``: each weight is the exact value rounded once to BF16 (golden's rule: a layer stream
    decoded with output ``"bf16"``, an ``f32`` record's values by ``FORMATS["bf16"]``), held in float32,
    which holds every BF16 value exactly (`sop dequantize --model-folder --dtype bfloat16`)."""
    if out not in OUTPUTS:                  # golden's outputs for either kind (an f32 record took any format's name)
        raise ValueError(f"unknown output format {out!r}; valid: {', '.join(OUTPUTS)}")
    rows, cols = entry.shape
    if entry.kind == "sopl":
        try:
            s = unpack_layer(bytes(data))
        except LayoutError as err:
            raise ArtifactError(f"layer {entry.name}: bad layer stream: {err}") from None
        if [s.rows, s.cols] != list(entry.padded_shape):
            raise ArtifactError(f"layer {entry.name}: stream is {s.rows} x {s.cols}, the header says "
                                f"{entry.padded_shape[0]} x {entry.padded_shape[1]}")
        if s.cols - cols >= s.layout.group:      # the writer pads a row to its next whole block, no more
            raise ArtifactError(f"layer {entry.name}: {cols} columns padded to {s.cols}: more than one "
                                f"block of {s.layout.group} of padding")
        # decoded in row chunks straight into float32, the padding cropped: no float64 layer
        return decode_layer(s, out, dest=np.empty((rows, cols), dtype=np.float32))
    if len(data) != 4 * rows * cols:
        raise ArtifactError(f"layer {entry.name}: float32 record of {len(data)} bytes for {rows} x {cols}")
    w = np.frombuffer(data, dtype="<f4").reshape(rows, cols)           # a view of the record, no copy
    # The writer rounds by the float32 output rule, which saturates: a NaN or Inf here was put there
    # by someone else (the CRC is no proof of origin), and would reach every file decoded from it.
    # Checked by max |w| first: ~isfinite(w) would hold a byte a weight for the whole layer.
    if not math.isfinite(abs_max(w)):
        bad = np.flatnonzero(~np.isfinite(w))
        r, c = divmod(int(bad[0]), cols)
        raise ArtifactError(f"layer {entry.name}: float32 record holds {len(bad)} non-finite value"
                            f"{'s' if len(bad) > 1 else ''} (the first, {w[r, c]}, at row {r}, column {c}); "
                            f"sop never writes one: the artifact was altered")
    if out == "exact":
        return w
    # "bf16": golden's codes from the float32 bits (no float64 table search)
    return (bf16_codes_of_float32(w).astype(np.uint32) << np.uint32(16)).view(np.float32)


def record_crc_ok(entry: "LayerEntry", crc: int, tail: bytes) -> bool:
    """Whether a record whose CRC-32 is ``crc`` and whose last 4 bytes are ``tail`` is the one its
    header entry names. An ``f32`` record's CRC is the entry's. A ``sopl`` record ends in its own CRC,
    so the CRC of the whole is the residue for every intact record, and the whole-file CRC does not
    change when two records of one length trade places: the entry names the record by its own CRC
    (the residue in files written before 2026-12-06, which cannot tell such records apart)."""
    if entry.kind != "sopl":
        return crc == entry.crc32
    return crc == SOPL_RESIDUE and entry.crc32 in (SOPL_RESIDUE, int.from_bytes(tail[-4:], "little"))


# -- the header --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerEntry:
    name: str
    shape: tuple[int, int]            # (out, in), the real weights
    padded_shape: tuple[int, int]     # the record's rows x cols ("sopl": padded to the block)
    transposed: bool                  # the checkpoint stores it (in, out)
    kind: str                         # "sopl" | "f32"
    offset: int                       # from the start of the data section
    length: int
    crc32: int
    bits: int
    choice: str
    #: one expert of a fused experts tensor: (the tensor, the expert, how many experts it holds); decoded,
    #: the experts of a tensor are that tensor again, ``(experts, ...)``
    stack: tuple[str, int, int] | None = None

    def as_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "padded_shape": list(self.padded_shape),
             "transposed": self.transposed, "record": self.kind, "offset": self.offset,
             "length": self.length, "crc32": self.crc32, "bits": self.bits,
             "bpw": self.bits / (self.shape[0] * self.shape[1]), "choice": self.choice}
        if self.stack is not None:
            d["stack"] = list(self.stack)
        return d


def _get(d, key: str, where: str, kind):
    if not isinstance(d, dict) or key not in d:
        raise ArtifactError(f"header: {where}: field {key!r} is missing")
    v = d[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ArtifactError(f"header: {where}: field {key!r} must be {want}, got {type(v).__name__}")
    return v


def _pair(d, key: str, where: str) -> tuple[int, int]:
    v = _get(d, key, where, list)
    if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise ArtifactError(f"header: {where}: field {key!r} must be two positive integers, got {v!r}")
    return int(v[0]), int(v[1])


def name_problem(name: str) -> str:
    """Why a layer name cannot be a ``.sopq`` layer (it becomes a safetensors tensor name when the
    artifact is decoded), or "" when it can: the writer refuses such a model before any work, the
    reader such a header."""
    if name in RESERVED_NAMES or not name or len(name) > MAX_NAME:
        return f"cannot be written to safetensors (empty, reserved or over {MAX_NAME} characters)"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:                  # a lone surrogate: a torch checkpoint's key may hold one
        return "cannot be written to safetensors (not valid Unicode: a lone surrogate)"
    return ""


def parse_entries(meta: dict) -> list[LayerEntry]:
    """The layer entries of a header, checked field by field; records must tile the data section."""
    layers = _get(meta, "layers", "top level", list)
    if not layers:
        raise ArtifactError("header: no layer")
    entries, pos, seen = [], 0, set()
    for i, d in enumerate(layers):
        where = f"layers[{i}]"
        name = _get(d, "name", where, str)
        why = name_problem(name)
        if why:
            raise ArtifactError(f"header: {where}: layer name {name[:80]!r} {why}")
        where = f"layer {name}"
        if name in seen:
            raise ArtifactError(f"header: {where} appears twice")
        seen.add(name)
        shape, padded = _pair(d, "shape", where), _pair(d, "padded_shape", where)
        kind = _get(d, "record", where, str)
        if kind not in RECORD_KINDS:
            raise ArtifactError(f"header: {where}: unknown record kind {kind!r}; valid: {', '.join(RECORD_KINDS)}")
        if padded[0] != shape[0] or padded[1] < shape[1] or (kind == "f32" and padded != shape):
            raise ArtifactError(f"header: {where}: padded shape {padded} does not fit shape {shape}")
        if kind == "f32" and _get(d, "length", where, int) != 4 * shape[0] * shape[1]:
            raise ArtifactError(f"header: {where}: float32 record of {d['length']} bytes for a "
                                f"{shape[0]} x {shape[1]} layer")
        offset, length = _get(d, "offset", where, int), _get(d, "length", where, int)
        if offset != pos or length <= 0:
            raise ArtifactError(f"header: {where}: record at {offset} (+{length}) does not follow the "
                                f"previous one (expected offset {pos})")
        crc = _get(d, "crc32", where, int)
        if not 0 <= crc < 1 << 32:
            raise ArtifactError(f"header: {where}: crc32 {crc} is not a 32-bit value")
        bits = _get(d, "bits", where, int)
        if bits < 0:
            raise ArtifactError(f"header: {where}: field 'bits' is negative ({bits})")
        entries.append(LayerEntry(name, shape, padded, _get(d, "transposed", where, bool), kind, offset,
                                  length, crc, bits, _get(d, "choice", where, str), _stack(d, name, where)))
        pos += length
    if _get(meta, "data_bytes", "top level", int) != pos:
        raise ArtifactError(f"header: data_bytes {meta['data_bytes']} is not the sum of the records ({pos})")
    _check_stacks(entries, seen)
    return entries


def _stack(d: dict, name: str, where: str) -> tuple[str, int, int] | None:
    """An entry's optional ``stack`` field: ``[tensor, expert, experts]``, the name ``tensor[expert]``."""
    if "stack" not in d:
        return None
    v = _get(d, "stack", where, list)
    ok = len(v) == 3 and isinstance(v[0], str) and all(isinstance(x, int) and not isinstance(x, bool) for x in v[1:])
    if not ok or not 0 <= v[1] < v[2] or name != expert_layer_name(v[0], v[1]) or name_problem(v[0]):
        raise ArtifactError(f"header: {where}: field 'stack' must be [tensor, expert, experts] with "
                            f"0 <= expert < experts and the layer named tensor[expert], got {v!r}")
    return v[0], v[1], v[2]


def _check_stacks(entries: list, names: set) -> None:
    """The experts of each fused tensor: all of them, in order, one after another, alike in shape and
    orientation, and the tensor's name no layer's (decoded, it is one tensor again)."""
    i = 0
    while i < len(entries):
        first = entries[i]
        if first.stack is None:
            i += 1
            continue
        tensor, _, n = first.stack
        group = entries[i:i + n]
        if tensor in names or [e.stack for e in group] != [(tensor, k, n) for k in range(n)] or \
                len({(e.shape, e.transposed) for e in group}) != 1:
            raise ArtifactError(f"header: the experts of {tensor[:80]!r} are not its {n} experts in order, one "
                                f"after another, of one shape and orientation, under a name no other layer has")
        i += n


# -- reading -----------------------------------------------------------------------------------------

@dataclass
class Artifact:
    """An opened, fully verified .sopq file."""

    path: Path
    meta: dict
    layers: list[LayerEntry]
    data_start: int

    @property
    def format(self) -> str:
        return self.meta["format"]["name"]

    def entry(self, name: str) -> LayerEntry:
        """The layer of that name (``KeyError`` naming the file and a few of its layers if it has none)."""
        for e in self.layers:
            if e.name == name:
                return e
        raise KeyError(f"{name} is not a layer of {self.path}; its layers: {self.some_layer_names()}")

    def some_layer_names(self, shown: int = 5) -> str:
        """The first ``shown`` layer names and how many there are, for an error line (an LLM has hundreds)."""
        return some_names((e.name for e in self.layers), shown)

    def _layer(self, layer: LayerEntry | str) -> LayerEntry:
        """A layer given as its entry or its name (``record``, ``stream`` and ``weights`` take either);
        anything else a TypeError saying so (an index, ``stream(0)``, was "'int' object has no attribute 'kind'")."""
        if isinstance(layer, str):
            return self.entry(layer)
        if not isinstance(layer, LayerEntry):
            raise TypeError(f"a layer of {self.path} is given as its entry (in .layers) or its name, got "
                            f"{type(layer).__name__} {layer!r:.80}")
        return layer

    def record(self, entry: LayerEntry | str) -> bytearray:
        """A layer's record bytes, CRC-checked: a new buffer of the caller's own, writable, so that an
        f32 record's weights (``weights``: a view of it, no copy) are a writable array that torch
        takes without a warning (the --model-folder export)."""
        entry = self._layer(entry)
        data = bytearray(entry.length)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + entry.offset)
            got = f.readinto(data)
        if got != entry.length:
            raise ArtifactError(f"{self.path}: layer {entry.name}: record truncated "
                                f"({got} of {entry.length} bytes)")
        if not record_crc_ok(entry, crc32(data), bytes(data[-4:])):
            raise ArtifactError(f"{self.path}: layer {entry.name}: record checksum mismatch (corrupted)")
        return data

    def stream(self, entry: LayerEntry | str) -> LayerStream | None:
        """The golden layer stream of a "sopl" record (None for "f32")."""
        entry = self._layer(entry)
        if entry.kind != "sopl":
            return None
        try:
            return unpack_layer(bytes(self.record(entry)))
        except LayoutError as err:
            raise ArtifactError(f"{self.path}: layer {entry.name}: bad layer stream: {err}") from None

    def weights(self, entry: LayerEntry | str, out: str = "exact") -> np.ndarray:
        """The layer's float32 ``(out, in)`` weights, through the golden decoder where it has a stream
        (``out="bf16"``: rounded once to BF16, ``decode_record``)."""
        entry = self._layer(entry)
        data = self.record(entry)
        try:
            return decode_record(entry, data, out)
        except ArtifactError as err:
            raise ArtifactError(f"{self.path}: {err}") from None


def open_artifact(path: str | os.PathLike) -> Artifact:
    """Open and verify a .sopq file (see the module docstring); ``ArtifactError`` on any fault."""
    try:
        path = input_file(path, ".sopq file")
    except InputError as err:
        raise ArtifactError(str(err)) from None
    try:
        return _verify(path)
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read: {err.strerror or err}") from None


def _verify(path: Path) -> Artifact:
    size = path.stat().st_size
    where = str(path)
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE.size)
        if len(pre) < 4 or pre[:4] != MAGIC:
            raise ArtifactError(f"{where}: not a SOPQ artifact (magic {pre[:4]!r}, expected {MAGIC!r})")
        if len(pre) < PREAMBLE.size:
            raise ArtifactError(f"{where}: truncated: {size} bytes, shorter than the "
                                f"{PREAMBLE.size}-byte preamble")
        _, version, reserved, hlen = PREAMBLE.unpack(pre)
        if version != VERSION:
            raise ArtifactError(f"{where}: " + another_version(".sopq container", version, VERSION,
                                                               "run `sop quantize` again to write it anew"))
        if reserved != 0:
            raise ArtifactError(f"{where}: reserved preamble field is {reserved}, expected 0 (corrupted)")
        if hlen > MAX_HEADER or PREAMBLE.size + hlen + 2 * CRC.size > size:
            raise ArtifactError(f"{where}: truncated or corrupted: a {hlen}-byte header does not fit in "
                                f"the {size}-byte file")
        hbytes = f.read(hlen)
        (hcrc,) = CRC.unpack(f.read(CRC.size))
        if crc32(hbytes) != hcrc:
            raise ArtifactError(f"{where}: header checksum mismatch: the header is corrupted "
                                f"(or the header length field is)")
        try:
            meta = json.loads(hbytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{where}: header is not valid JSON ({err})") from None
        except RecursionError:
            raise ArtifactError(f"{where}: header JSON is nested too deeply") from None
        try:
            if not isinstance(meta, dict) or meta.get("container") != "sopq":
                raise ArtifactError("header: field 'container' is not 'sopq'")
            fmt = _get(meta, "format", "top level", dict)
            _get(fmt, "name", "format", str)
            model = _get(meta, "model", "top level", dict)
            if not isinstance(model.get("fingerprint", ""), str):
                raise ArtifactError("header: model: field 'fingerprint' must be str")
            aux = model.get("aux_files", {})
            if not (isinstance(aux, dict) and all(isinstance(v, str) for v in aux.values())):
                raise ArtifactError("header: model: field 'aux_files' must be an object of file names to SHA-256")
            entries = parse_entries(meta)
        except ArtifactError as err:
            raise ArtifactError(f"{where}: {err}") from None
        data_start = PREAMBLE.size + hlen + CRC.size
        expected = data_start + meta["data_bytes"] + CRC.size
        if size != expected:
            raise ArtifactError(f"{where}: {'truncated' if size < expected else 'trailing bytes'}: the file is "
                                f"{size} bytes, its header says {expected}")
        running = zlib.crc32(pre + hbytes + CRC.pack(hcrc))
        for e in entries:              # in chunks: no record (4 bytes a weight for f32) is held
            crc, left, tail = 0, e.length, b""
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                crc, running = zlib.crc32(chunk, crc), zlib.crc32(chunk, running)
                left, tail = left - len(chunk), (tail + chunk[-4:])[-4:]
            if left or not record_crc_ok(e, crc & 0xFFFFFFFF, tail):
                raise ArtifactError(f"{where}: layer {e.name}: record checksum mismatch (corrupted)")
        (fcrc,) = CRC.unpack(f.read(CRC.size))
        if running & 0xFFFFFFFF != fcrc:
            raise ArtifactError(f"{where}: whole-file checksum mismatch (the trailer or the preamble is "
                                f"corrupted)")
    return Artifact(path, meta, entries, data_start)


# -- writing -----------------------------------------------------------------------------------------

def write_container(out: Path, meta: dict, spool: BinaryIO) -> int:
    """Assemble preamble, header, the records in ``spool`` and the trailer into ``out`` atomically."""
    hbytes = json.dumps(jsonable(meta), indent=1, allow_nan=False).encode("utf-8")
    head = PREAMBLE.pack(MAGIC, VERSION, 0, len(hbytes)) + hbytes + CRC.pack(crc32(hbytes))
    with atomic_output(out) as f:
        f.write(head)
        running = zlib.crc32(head)
        spool.seek(0)
        for chunk in iter(lambda: spool.read(_CHUNK), b""):
            f.write(chunk)
            running = zlib.crc32(chunk, running)
        f.write(CRC.pack(running & 0xFFFFFFFF))
        return f.tell()


def quantize_model(model: str, fmt_name: str, out: str | os.PathLike, *, budget: float | None = None,
                   include=None, exclude=None, calibrate: bool = True, nan_policy: str = "error",
                   n_calib: int = C.N_CALIB, cache_dir=C.DEFAULT_CACHE, progress: bool = True,
                   jobs: int = 1, lm_head: bool = False, routers: bool = False, calib_text=None) -> dict:
    """Quantize ``model``'s selected linear layers in ``fmt_name`` into the artifact ``out``.

    ``jobs``: layers quantized in that many worker processes (quantize/jobs.py; the same bytes;
    ``sop-budget`` builds its options here). Returns a summary: path, file bytes, layers,
    weights, bits, bpw, sqnr_db, record kinds. ``lm_head``, ``routers``: quantize the output head, the
    MoE routers too (``models.open_model``). ``calib_text``: a UTF-8 text file a causal LM calibrates on
    instead of the built-in text (``calib.read_calib_text``)."""
    calibrate, progress = boolean("calibrate", calibrate), boolean("progress", progress)
    lm_head, routers = boolean("lm_head", lm_head), boolean("routers", routers)
    fmt = get_quant_format(fmt_name)                      # unknown names fail before any work
    budget = check_options([fmt], budget, nan_policy)
    jobs = min(check_jobs(jobs), usable_cpus())           # as the pool lowers it: none for one CPU (as sop eval)
    n_calib = C.calib_size(n_calib, "n_calib", sentences=calibrate)
    cache_dir = cache_folder(cache_dir, calibrate)
    # before any work: never one of the model's files
    out = check_output(out, model_inputs(model), option=option("out"))
    named_as_written(out, ARTIFACT_SUFFIX, "quantize_model()")
    n_calib = C.with_calib_text(n_calib, calib_text, calibrate, model, outputs=(out,))
    say = reporter(progress)
    start_server(jobs)                      # the workers' imports run while the model is opened
    src = open_model(model, include, exclude, lm_head=lm_head, routers=routers)
    src.nan_policy = nan_policy
    C.check_text_model(src, n_calib)                # before the calibration says it starts
    if fmt.model_level:                 # a budget below every cheapest option: refused before any layer is read
        check_budget_shapes([lay.shape for lay in src.layers], budget, option("budget"))
    for lay in src.layers:
        why = name_problem(lay.name)
        if why:
            raise ArtifactError(f"{src.file_of(lay.name)}: layer {lay.name[:80]!r} {why}; a .sopq cannot "
                                f"hold it")
    say(f"{model}: {linear_layers(len(src.layers))}, {src.n_weights:,} weights -> {out} ({fmt.name})")
    with contextlib.ExitStack() as stack:
        # started first, so that the workers start while the model is calibrated here
        pool = stack.enter_context(LayerPool(jobs)) if jobs > 1 else None
        cal = calibration_for(src, calibrate, n_calib, cache_dir, say)
        if calibrate and not cal.weighted:              # asked for and impossible: said, as sop eval says it
            say(f"calibration: {cal.note}")
        if fmt.model_level:                               # the knapsack needs every layer at once
            say(f"{fmt.name}: building every layer's options and solving under {budget} bpw")
            outcomes = BudgetOutcomes(budget_model(fmt, src, cal, nan_policy, budget, say, pool)[1], src, cal,
                                      nan_policy, _budget_record)
        else:
            outcomes = _layer_outcomes(src, fmt, cal, nan_policy, "record", pool)
        return _write_artifact(src, fmt, out, budget, cal, nan_policy, outcomes, say)


def _budget_record(res, lay):
    """A budgeted layer's ``.sopq`` record and its row chunks (``BudgetOutcomes``'s ``pack``): no
    copy of the layer."""
    kind, chunks, padded = encode_record(res, lay.shape, lay.name)
    return (kind, padded), chunks


def _layer_outcomes(src, fmt, cal, nan_policy: str, want: str, pool):
    """``(LayerOutcome, record chunks)`` of every layer in order: on the workers of ``pool``, the
    per-layer loop's (``layer_loop.layer_outcomes``: the record comes back as one array); here its
    serial branch, but with the record streamed as ``encode_record``'s row chunks (no copy of the
    layer, as ``layer_outcome``'s one array would be)."""
    if pool is not None:
        yield from pooled_layer_outcomes(src, fmt, cal, nan_policy, want, pool)
        return
    for lay in src.layers:
        t0 = time.perf_counter()
        res, stats, n_bad = quantize_layer(src, lay.name, fmt, cal.get(lay.name), nan_policy)
        kind, chunks, padded = encode_record(res, lay.shape, lay.name)
        out = LayerOutcome(lay.name, stats, res.choice, int(res.bits), n_bad, time.perf_counter() - t0,
                           (kind, padded))
        del res
        yield out, chunks


def _write_artifact(src, fmt, out: Path, budget, cal, nan_policy: str, outcomes, say) -> dict:
    """The records of ``outcomes`` streamed to a temporary file beside ``out``, then the container."""
    entries, stats, pos = [], [], 0
    n = len(src.layers)
    with temp_file_in(out.parent, out.name + ".records", target=out) as (spool, spool_path):
        try:
            for i, (o, chunks) in enumerate(outcomes, 1):
                lay = src.layers[i - 1]
                stats.append(o.stats)
                kind, padded = o.record
                length, crc, tail = 0, 0, b""
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    spool.write(view)
                    crc, length, tail = zlib.crc32(view, crc), length + len(view), (tail + bytes(view[-4:]))[-4:]
                # a sopl record's CRC is the residue, whichever it is: the entry holds its own CRC (record_crc_ok)
                crc = int.from_bytes(tail, "little") if kind == "sopl" else crc & 0xFFFFFFFF
                del chunks
                e = LayerEntry(lay.name, tuple(lay.shape), tuple(padded), lay.transposed, kind, pos, length,
                               crc, o.bits, o.choice, getattr(lay, "stack", None))
                d = e.as_dict()
                if o.n_bad:
                    d["nonfinite_replaced"] = o.n_bad
                entries.append(d)
                pos += length
                say(layer_line(f"quantize {fmt.name}", i, n, lay.name, lay.shape, o.seconds))
            total = aggregate(stats)
            meta = {
                "container": "sopq", "version": VERSION,
                "format": fmt.describe(), "budget": budget,
                "model": {**src.describe(), "fingerprint": src.fingerprint(), "aux_files": src.aux_files()},
                # not whether the statistics came from the cache: the same input, the same bytes
                "calibration": {k: v for k, v in cal.describe().items() if k != "cached"}, "nan_policy": nan_policy,
                "record_kinds": RECORD_KINDS,
                "summary": {**total.as_dict(), "bits": total.bits, "weights": total.weights},
                "data_bytes": pos, "layers": entries,
            }
            if getattr(outcomes, "budgeted", None) is not None:
                meta["budget_report"] = outcomes.budgeted.report
            size = write_container(out, meta, spool)
        finally:
            spool.close()
            spool_path.unlink(missing_ok=True)
    kinds = sorted({d["record"] for d in entries})
    return {"path": str(out), "bytes": size, "layers": len(entries), "weights": total.weights,
            "bits": total.bits, "bpw": total.bpw, "sqnr_db": total.sqnr_db, "records": kinds,
            "format": fmt.name, "budget": budget, "choices": [d["choice"] for d in entries]}


# -- dequantize --------------------------------------------------------------------------------------

def _safetensors_header(art: Artifact) -> bytes:
    """The safetensors JSON header of the float32 output (shapes in the checkpoint's orientation)."""
    header = {"__metadata__": {"format": "pt", "sop_artifact": art.path.name, "sop_format": art.format,
                               "sop_model_fingerprint": str(art.meta.get("model", {}).get("fingerprint", ""))}}
    pos = 0
    for e in art.layers:
        shape = [e.shape[1], e.shape[0]] if e.transposed else list(e.shape)
        n = 4 * e.shape[0] * e.shape[1]
        if e.stack is None:
            header[e.name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + n]}
        elif e.stack[1] == 0:                       # the experts follow one another: one (experts, ...) tensor
            header[e.stack[0]] = {"dtype": "F32", "shape": [e.stack[2], *shape],
                                  "data_offsets": [pos, pos + e.stack[2] * n]}
        pos += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return hb + b" " * (-len(hb) % 8)               # pad to 8 bytes, as the safetensors library does


def source_files(art: Artifact) -> list:
    """The files of the checkpoint the artifact records it was made from (as ``sop quantize`` named
    them: its weights files, and every file its model spec reads, ``models.model_inputs``)."""
    model = art.meta["model"]
    files = [f for f in model.get("files", []) if isinstance(f, str) and f] \
        if isinstance(model.get("files"), list) else []
    spec = model.get("spec")
    try:
        return files + (model_inputs(spec) if isinstance(spec, str) and spec else [])
    except (OSError, ValueError):                 # a spec no path can be (a NUL in it): no file to keep
        return files


def source_spec(art, model: str | None) -> str:
    """The source model of an artifact: ``model`` where given, else the one the artifact names, which must
    be found from here (the model folder and the GGUF exports: quantize/hf_export.py, quantize/gguf_export.py)."""
    meta = art.meta.get("model", {})
    if model is not None and not model:         # it was "names no source model; give --model"
        raise ValueError(f"{option('model')} '' is an empty name: give the source model (a file, a folder, "
                         f"'minilm' or 'smollm2')")
    spec = model if model is not None else meta.get("spec")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{art.path}: the artifact names no source model; give {option('model', '')}")
    if model is None and builtin_path(spec) is None and not os.path.exists(spec):
        raise ValueError(f"{art.path}: its source model {spec!r} (the path sop quantize was given) is not "
                         f"found from here; give it with {option('model', '')}")
    return spec


def source_selection(art) -> dict:
    """``open_model``'s selection of an artifact's layers in its source (the model folder and the GGUF exports):
    each layer by its name, a fused experts tensor by its own (its experts with it), a MoE router by its name
    (with --include-routers, or from a .sopq made when they were quantized by default), and the output head
    where the artifact holds it or an embedding (a tied head: its weights are the embedding's)."""
    names = [e.name for e in art.layers]
    head = any(is_lm_head(n) or "embed" in n or "embd" in n or n.endswith("wte.weight") for n in names)
    return {"include": sorted({glob.escape(e.stack[0] if e.stack else e.name) for e in art.layers}),
            "lm_head": head, "routers": True}


def _dequantized_from(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` is a file ``dequantize`` wrote from the checkpoint of that fingerprint (its
    safetensors ``__metadata__`` names it), read from its header alone: never that checkpoint, which
    cannot hold its own hash."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__") if n <= 1 << 24 else None
    except (OSError, ValueError, struct.error, AttributeError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("sop_model_fingerprint") == fingerprint


def source_by_contents(art: Artifact, out: str | os.PathLike) -> Path | None:
    """The source checkpoint's folder when the existing file ``out`` is one of the files that
    ``source_files`` names, found by contents wherever the command runs (None if it is none): the header
    records the source as ``sop quantize`` was given it, relative to the folder it ran in, which
    ``source_files`` resolves from here; from another folder only the contents tell. ``out`` is one
    where its folder holds the checkpoint's weights files laid out as recorded, with the model
    fingerprint, and ``out`` is one of them, a file the loader reads beside a weights file given alone
    (``SIBLINGS_READ``) or, for a model folder, any file of it but a ``.sopq`` (``folder_inputs``).
    The target is looked at as named and, where that is a link, as the file it points to (a hub cache's
    ``snapshots/X/model.safetensors`` links into ``blobs/``: the write would replace the blob)."""
    model = art.meta.get("model")
    if not os.path.isfile(out) or not isinstance(model, dict):
        return None
    fp, spec, files = model.get("fingerprint"), model.get("spec"), model.get("files")
    if not (fp and isinstance(fp, str) and spec and isinstance(spec, str) and isinstance(files, list)) \
            or spec in (MINILM, SMOLLM2):           # a built-in model: source_files names it from anywhere
        return None
    if _dequantized_from(out, fp):                  # an earlier output of this checkpoint (a re-run): no hashing
        return None
    files = [f for f in files if isinstance(f, str) and f]
    given_alone = Path(spec) in {Path(f) for f in files}
    base = Path(spec).parent if given_alone else Path(spec)
    for target in dict.fromkeys((Path(os.path.abspath(out)), Path(os.path.realpath(out)))):
        if given_alone and target.name not in {Path(f).name for f in files} | set(SIBLINGS_READ) \
                or not given_alone and is_artifact(target):
            continue
        with contextlib.suppress(OSError, ValueError):     # a recorded file that is not there: not this checkpoint
            layout = [target.parent / os.path.relpath(f, base) for f in files]
            if layout and all(f.is_file() and not _dequantized_from(f, fp) for f in layout) \
                    and files_fingerprint(layout) == fp:    # an earlier output of this checkpoint is not hashed
                return target.parent
    return None


#: what ``named_as_written`` checks an output's name against: its ending -> (the command writing it, what it holds)
WRITTEN = {ARTIFACT_SUFFIX: ("sop quantize", f"a {ARTIFACT_SUFFIX} artifact"),
           ".safetensors": ("sop dequantize", "decoded weights as safetensors"),
           ".gguf": ("sop dequantize --gguf", "a GGUF file")}


def named_as_written(out, ending: str, call: str) -> None:
    """Refuse an output whose name's ending is not what it holds: every reader takes a model or an artifact
    by its name's ending (``models.is_artifact``, ``models.open_model``), so an artifact named
    ``.safetensors`` was read as a damaged checkpoint (``header length field claims 5659184979 bytes``),
    one named with no ending as an ``unsupported file type ''``, and decoded weights named ``.sopq`` as a
    damaged artifact. ``ending``: what ``out`` holds (``WRITTEN``: ``ARTIFACT_SUFFIX``, an artifact;
    ``.safetensors``, decoded weights; ``.gguf``, a GGUF file), in any case; ``call``: the Python function
    writing it (``"quantize_model()"``, ``"quantize_module()"``, ``"dequantize()"``, ``"export_gguf()"``); the
    command line's is the ``WRITTEN`` command."""
    suffix = Path(out).suffix.lower()
    if suffix == ending:
        return
    command, holds = WRITTEN[ending]
    name = f"`{command}`" if on_command_line() else call
    if suffix in CHECKPOINT_SUFFIXES + (ARTIFACT_SUFFIX,):      # another reader's: the same name, its ending changed
        read_as = f"as a {suffix} {'checkpoint' if suffix in CHECKPOINT_SUFFIXES else 'artifact'}"
        fix = Path(out).with_suffix(ending)
    else:                                                       # no reader's: the name kept, the ending added
        read_as, fix = "as no file type" if not suffix else f"as a {suffix} file, which no reader takes", \
            f"{out}{ending}"
    raise OutputError(f"{out}: {name} writes {holds}, which every reader takes by its name's ending: this name "
                      f"would be read {read_as}; name it {fix}")


def dequantize(path: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> dict:
    """Decode every layer of the artifact ``path`` into the float32 safetensors file ``out``, which
    may be neither the artifact nor a file of the checkpoint it was made from (replaced by its
    quantized layers alone, the source would lose every other tensor): by its path from here, or by
    its contents (``source_by_contents``: run from another folder than ``sop quantize``)."""
    progress = boolean("progress", progress)
    art = open_artifact(path)
    fp = art.meta["model"].get("fingerprint")
    # an earlier output of this checkpoint written into its folder is no file of it: the re-run replaces it
    earlier = isinstance(fp, str) and bool(fp) and os.path.isfile(out) and _dequantized_from(Path(out), fp)
    check_output(out, [path] if earlier else [path, *source_files(art)], option=option("out"))
    folder = source_by_contents(art, out)
    if folder is not None:
        raise OutputError(f"{out}: the output is a file of the checkpoint {art.path.name} was made from (found "
                          f"by its contents in {folder}); refusing to overwrite an input (choose another "
                          f"{option('out')})")
    named_as_written(out, SAFETENSORS_SUFFIXES[0], "dequantize()")    # after the refusals to overwrite an input
    hb = _safetensors_header(art)
    say = reporter(progress)
    n = len(art.layers)
    with atomic_output(out) as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for i, e in enumerate(art.layers, 1):
            t0 = time.perf_counter()
            w = art.weights(e)
            if not e.transposed:
                f.write(np.ascontiguousarray(w, dtype="<f4").data)       # no copy: w is float32 already
            else:                                                        # (in, out): transposed in row chunks
                step = max(1, _CHUNK // max(1, 4 * w.shape[0]))
                for c in range(0, w.shape[1], step):
                    f.write(np.ascontiguousarray(w[:, c:c + step].T, dtype="<f4").data)
            del w
            say(layer_line("dequantize", i, n, e.name, e.shape, time.perf_counter() - t0))
        size = f.tell()
    return {"path": str(out), "bytes": size, "layers": len(art.layers), "format": art.format,
            "tensors": len({e.stack[0] if e.stack else e.name for e in art.layers}),    # fused experts: one
            "weights": sum(e.shape[0] * e.shape[1] for e in art.layers)}
