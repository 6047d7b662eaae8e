"""Test vectors: a quantized layer as files any testbench can read (docs/vectors.md).

A vector directory holds ``vectors.json`` and, per layer, three text files:

* ``<layer>.blocks.hex``: one block per line, the block's bytes (golden.layout
  packing) as one hexadecimal number, most significant digit first, so bit 0 of
  the number is bit 0 of the block (Verilog ``$readmemh`` reads it as is);
* ``<layer>.bf16.hex``: the expected BF16 output, one value per line, 4 hex
  digits, in code order (block by block, code 0 first);
* ``<layer>.exact.txt``: the expected exact product, one value per line,
  ``sign exp sig`` in decimal (value = (-1)^sign * sig * 2^exp).

``vectors.json`` carries the layout, the HIF, and per layer its shape, offset,
LUT images and the SHA-256 of each file. Expected values come from golden/
only. Reading checks everything and raises ``VectorError`` naming the file and
the field that is missing or malformed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sop.golden.artifact import write_atomic
from sop.golden.decoder import decode_blocks, product_fields
from sop.golden.formats import FORMATS, get_format
from sop.golden.hif import hif_format
from sop.golden.layout import BlockLayout, LayerStream, unpack_blocks

VERSION = 1


class VectorError(ValueError):
    """A vector file that is missing, malformed or inconsistent."""


@dataclass
class VectorLayer:
    name: str
    layout: BlockLayout
    hif: object
    luts: np.ndarray
    offset: int
    headers: np.ndarray
    codes: np.ndarray
    expected_bf16: np.ndarray
    expected_exact: np.ndarray        # (n, 3): sign, exp, sig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_vectors(out_dir: Path, streams: dict[str, LayerStream], meta: dict | None = None) -> Path:
    """Write ``streams`` (name -> golden LayerStream without sparse entries) as vectors."""
    out_dir = Path(out_dir)
    layers, first = [], None
    for name, s in streams.items():
        if len(s.sparse):
            raise ValueError(f"{name}: sparse residuals are not decoded by the hardware; "
                             f"write vectors of the dense stream")
        first = first or s
        if (s.layout, s.hif) != (first.layout, first.hif):
            raise ValueError("all layers of a vector set share one layout and HIF")
        headers, codes = unpack_blocks(s.layout, s.blocks)
        bf16 = FORMATS["bf16"].encode(decode_blocks(s.hif, s.luts, s.layout, s.offset, headers, codes, "bf16"))
        sign, sig, exp, _ = product_fields(s.hif, s.luts, s.layout, s.offset, headers, codes)
        bb = s.layout.block_bytes
        files = {
            "blocks": "\n".join(s.blocks[i:i + bb][::-1].hex() for i in range(0, len(s.blocks), bb)) + "\n",
            "bf16": "\n".join(f"{v:04x}" for v in bf16.ravel()) + "\n",
            "exact": "\n".join(f"{a} {b} {c}" for a, b, c in zip(sign.ravel(), exp.ravel(), sig.ravel())) + "\n",
        }
        names = {"blocks": f"{_safe(name)}.blocks.hex", "bf16": f"{_safe(name)}.bf16.hex",
                 "exact": f"{_safe(name)}.exact.txt"}
        for kind, text in files.items():
            write_atomic(out_dir / names[kind], text.encode())
        layers.append({"name": name, "rows": s.rows, "cols": s.cols, "n_blocks": s.n_blocks,
                       "offset": s.offset, "luts": s.luts.tolist(), "files": names,
                       "sha256": {k: _sha(t.encode()) for k, t in files.items()}})
    lay = first.layout
    doc = {"version": VERSION, **(meta or {}),
           "layout": {"code_bits": lay.code_bits, "group": lay.group, "scale": lay.scale.name,
                      "signed_scale": lay.signed_scale, "select_bit": lay.select_bit,
                      "header_bits": lay.header_bits, "block_bytes": lay.block_bytes},
           "hif": {"ebits": first.hif.ebits, "mbits": first.hif.mbits, "bias": first.hif.bias},
           "layers": layers}
    write_atomic(out_dir / "vectors.json", (json.dumps(doc, indent=1) + "\n").encode())
    return out_dir / "vectors.json"


def _field(doc: dict, key: str, where: str, kind=None):
    if not isinstance(doc, dict) or key not in doc:
        raise VectorError(f"{where}: field {key!r} is missing")
    value = doc[key]
    if kind is not None and not isinstance(value, kind):
        raise VectorError(f"{where}: field {key!r} must be {kind.__name__ if isinstance(kind, type) else kind}, "
                          f"got {type(value).__name__}")
    return value


def read_vectors(directory: Path) -> list[VectorLayer]:
    directory = Path(directory)
    index = directory / "vectors.json"
    if not index.is_file():
        raise VectorError(f"{index}: missing (write vectors with `sop vectors`)")
    try:
        doc = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise VectorError(f"{index}: not valid JSON ({err})") from None
    where = str(index)
    if _field(doc, "version", where, int) != VERSION:
        raise VectorError(f"{where}: field 'version' is {doc['version']}, expected {VERSION}")
    lay_doc = _field(doc, "layout", where, dict)
    hif_doc = _field(doc, "hif", where, dict)
    try:
        layout = BlockLayout(_field(lay_doc, "code_bits", f"{where} layout", int),
                             _field(lay_doc, "group", f"{where} layout", int),
                             get_format(_field(lay_doc, "scale", f"{where} layout", str)),
                             bool(_field(lay_doc, "signed_scale", f"{where} layout", bool)),
                             bool(_field(lay_doc, "select_bit", f"{where} layout", bool)))
        hif = hif_format(_field(hif_doc, "mbits", f"{where} hif", int),
                         _field(hif_doc, "ebits", f"{where} hif", int),
                         _field(hif_doc, "bias", f"{where} hif", int))
    except ValueError as err:
        if isinstance(err, VectorError):
            raise
        raise VectorError(f"{where}: layout/hif fields are inconsistent: {err}") from None
    out = []
    for i, ld in enumerate(_field(doc, "layers", where, list)):
        lw = f"{where} layers[{i}]"
        name = _field(ld, "name", lw, str)
        files = _field(ld, "files", lw, dict)
        sums = _field(ld, "sha256", lw, dict)
        texts = {}
        for kind in ("blocks", "bf16", "exact"):
            path = directory / _field(files, kind, f"{lw} files", str)
            if not path.is_file():
                raise VectorError(f"{path}: missing (named by {lw} files.{kind})")
            data = path.read_bytes()
            if _sha(data) != _field(sums, kind, f"{lw} sha256", str):
                raise VectorError(f"{path}: SHA-256 does not match {lw} sha256.{kind}: "
                                  f"the file is truncated or changed")
            texts[kind] = (path, data.decode())
        n_blocks = _field(ld, "n_blocks", lw, int)
        luts = np.asarray(_field(ld, "luts", lw, list), dtype=np.int64)
        if luts.shape != (layout.banks, 1 << layout.code_bits):
            raise VectorError(f"{lw}: field 'luts' must be {layout.banks} x {1 << layout.code_bits} integers")
        path, text = texts["blocks"]
        try:
            block_ints = [int(line, 16) for line in text.split()]
        except ValueError:
            raise VectorError(f"{path}: a line is not a hexadecimal number") from None
        if len(block_ints) != n_blocks:
            raise VectorError(f"{path}: {len(block_ints)} blocks, {lw} n_blocks says {n_blocks}")
        raw = b"".join(b.to_bytes(layout.block_bytes, "little") for b in block_ints)
        headers, codes = unpack_blocks(layout, raw)
        n = n_blocks * layout.group
        path, text = texts["bf16"]
        bf16 = np.array([int(v, 16) for v in text.split()], dtype=np.int64)
        if len(bf16) != n:
            raise VectorError(f"{path}: {len(bf16)} values, expected {n}")
        path, text = texts["exact"]
        exact = np.array([int(v) for v in text.split()], dtype=np.int64)
        if len(exact) != 3 * n:
            raise VectorError(f"{path}: expected {n} lines of 'sign exp sig'")
        out.append(VectorLayer(name, layout, hif, luts, _field(ld, "offset", lw, int), headers, codes,
                               bf16, exact.reshape(n, 3)))
    return out


def quantize_layer(fmt: str, w: np.ndarray, name: str) -> LayerStream:
    """The golden stream of one layer in a hardware format (the quantizer's choice)."""
    from sop.quantize import sop_search

    quantizers = {"sop4-g16": sop_search.quantize_sop4, "e2m3-ue4m4-g16": sop_search.quantize_fp6}
    if fmt not in quantizers:
        raise ValueError(f"format {fmt!r} has no hardware stream; valid: {', '.join(quantizers)}")
    return quantizers[fmt](np.asarray(w, dtype=np.float64), name=name).stream


def make_vectors(model: str, fmt: str, layers: list[str] | None, out_dir: Path,
                 rows: int | None = None) -> Path:
    """Quantize ``layers`` of ``model`` (all linear layers if None) into vectors under ``out_dir``.

    ``rows`` keeps only the first rows of each layer (small, fast vector sets).
    """
    from sop.quantize.models import open_model

    source = open_model(model)
    names = layers or [lay.name for lay in source.layers]
    streams = {}
    for name in names:                      # one layer in memory at a time
        try:
            w = source.load(name)
        except KeyError as err:
            raise ValueError(f"{model}: {err.args[0]}; linear layers: "
                             f"{', '.join(lay.name for lay in source.layers)}") from None
        streams[name] = quantize_layer(fmt, w if rows is None else w[:rows], name)
    return write_vectors(Path(out_dir), streams, {"model": model, "format": fmt})
