"""Test vectors: a quantized layer as files any testbench can read (docs/vectors.md).

A vector directory holds ``vectors.json`` and, per layer, these text files:

* ``<layer>.blocks.hex``: one block per line, the block's bytes (golden.layout
  packing) as one hexadecimal number, most significant digit first, so bit 0 of
  the number is bit 0 of the block (Verilog ``$readmemh`` reads it as is);
* ``<layer>.bf16.hex``: the expected BF16 output, one value per line, 4 hex
  digits, in code order (block by block, code 0 first);
* ``<layer>.exact.txt``: the expected exact product, one value per line,
  ``sign exp sig`` in decimal (value = (-1)^sign * sig * 2^exp);
* ``<layer>.sparse.txt`` (a layer with sparse residuals only): one entry per
  line, ``index value``: the flat index in decimal and the BF16 value as 4 hex
  digits, strictly increasing. The layer's ``bf16.hex`` then holds golden's
  values with the residuals added (rounded once); ``exact.txt`` stays the
  product without them (the exact-output decoder does not add residuals).

And, for a testbench of the AXI4-Stream shell (hdl/axis.py) that reads files
with ``$readmemh``, the words it sends and expects that do not depend on the
number of lanes (``axis_files``):

* ``<layer>.axis_load.hex``: the layer's ``s_axis_load`` packet
  (``hdl.axis.load_beats``), one beat a line, ``{tlast, tdata}``;
* ``<layer>.axis_sparse.hex`` (a layer with sparse residuals only): its
  ``s_axis_sparse`` packet (``hdl.axis.sparse_beats``), ``{tlast, tdata}``;
* ``<layer>.exact.hex``: the exact-output lane word of every value
  (``hdl.reference.pack_exact``: ``{sign, exp, sig}``), what an exact
  configuration's ``m_axis`` lanes hold, in code order.

``vectors.json`` carries the layout (the scale's format by name and by its
fields, ``scale_format``), the HIF, the AXI words' widths (``axis``),
and per layer its shape (the stream's ``cols`` and the layer's own ``width``,
fewer where the stream holds padding), offset, LUT images, its number of
sparse entries and the SHA-256 of each file. Expected
values come from golden/ only. Reading checks everything and raises
``VectorError`` naming the file and the field that is missing or malformed; a
sparse file that is not strictly increasing, indexes past the layer or holds a
non-finite value is refused with the line that does. Each file is parsed whole
with numpy (``_hex_matrix``, ``_fields``); a text that is not lines of the
expected form is read line by line (``_lines``, ``_read_sparse_slow``), which
names its first bad line (or reads a sparse file spaced by hand).

``make_vectors`` takes a model, or a ``.sopq`` artifact (`sop quantize`): its
layers' streams as stored, sparse residuals included (``sop-budget``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sop.golden.files import FileSet, InputError, another_version, atomic_files, input_file
from sop.golden.decoder import decode_blocks, product_fields
from sop.golden.formats import FORMATS, get_format
from sop.golden.hif import hif_format
from sop.golden.layout import OFFSET_RANGE, BlockLayout, LayerStream, decoder_format, unpack_blocks, validate_stream
from sop.golden.points import operating_points
from sop.hdl import axis, reference
from sop.hdl.config import DecoderConfig

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
    sparse_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sparse_values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def vector_files(name: str, sparse: bool = False) -> dict[str, str]:
    """The file names of a layer's vectors (in the vector directory), by kind."""
    out = {"blocks": f"{_safe(name)}.blocks.hex", "bf16": f"{_safe(name)}.bf16.hex",
           "exact": f"{_safe(name)}.exact.txt", "axis_load": f"{_safe(name)}.axis_load.hex",
           "exact_hex": f"{_safe(name)}.exact.hex"}
    if sparse:
        out["sparse"] = f"{_safe(name)}.sparse.txt"
        out["axis_sparse"] = f"{_safe(name)}.axis_sparse.hex"
    return out


#: the files read_vectors checks against the layer's other fields, absent in sets written before them
AXIS_KINDS = ("axis_load", "axis_sparse", "exact_hex")


#: each byte's two hex digits, as one uint16 (its memory: the two characters in order)
_HEX_PAIRS = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint16)


def _text(chars: np.ndarray, keep: np.ndarray | None = None) -> str:
    """The rows of a character matrix (``keep``: the characters kept), one file's text; one empty line
    for no rows, as every vector file of an empty layer."""
    if not len(chars):
        return "\n"
    return (chars if keep is None else chars[keep]).tobytes().decode("ascii")


def hex_lines(words, bits: int) -> str:
    """``words`` (non-negative integers below ``2**bits``) as lower-case hex, ``ceil(bits / 4)``
    digits a line, each line ended by a newline; vectorized, no Python loop per word: each word's
    bytes, most significant first, two digits each (``_HEX_PAIRS``)."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1)
    digits = -(-bits // 4)
    low = min(digits, 16)                                   # the digits a uint64 holds; any above are 0
    used = -(-low // 2)                                     # the words' low bytes that hold them
    pairs = _HEX_PAIRS[words.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - used:]].view(np.uint8)
    chars = np.full((len(words), digits + 1), ord("\n"), dtype=np.uint8)
    chars[:, :digits - low] = ord("0")
    chars[:, digits - low:digits] = pairs[:, 2 * used - low:]
    return _text(chars)


def block_lines(blocks: bytes, block_bytes: int) -> str:
    """Packed blocks one a line, each its bytes as one hexadecimal number, most significant digit
    first (the block's last byte first), so that bit 0 of the number is bit 0 of the block."""
    b = np.frombuffer(blocks, dtype=np.uint8).reshape(-1, block_bytes)[:, ::-1]
    chars = np.full((len(b), 2 * block_bytes + 1), ord("\n"), dtype=np.uint8)
    chars[:, :-1] = _HEX_PAIRS[b].view(np.uint8)
    return _text(chars)


def decimal_lines(*columns) -> str:
    """Rows of integers (int64 columns of one length) in decimal, ``-`` before a negative one, the
    columns parted by one space, each row a line; vectorized: every number written with the columns'
    widest digit count, then its leading zeros (all but a zero's last) and unused signs dropped."""
    parts, keeps = [], []
    for j, col in enumerate(columns):
        col = np.asarray(col, dtype=np.int64).reshape(-1)
        mag = np.abs(col).astype(np.uint64)         # int64's least wraps to itself, then to 2**63: right
        width = len(str(int(mag.max()))) if len(mag) else 1
        digits = (mag[:, None] // (np.uint64(10) ** np.arange(width - 1, -1, -1, dtype=np.uint64))) % np.uint64(10)
        nonzero = digits != 0
        lead = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), width - 1)
        parts += [np.full((len(col), 1), ord("-"), dtype=np.uint8), (digits + ord("0")).astype(np.uint8),
                  np.full((len(col), 1), ord("\n" if j == len(columns) - 1 else " "), dtype=np.uint8)]
        keeps += [(col < 0)[:, None], np.arange(width)[None, :] >= lead[:, None], np.ones((len(col), 1), bool)]
    return _text(np.hstack(parts), np.hstack(keeps))


def _word_configs(layout: BlockLayout, hif) -> tuple[DecoderConfig, DecoderConfig]:
    """Configurations whose words the AXI files hold: a BF16 one with the residual path (its load word
    may carry ``CTRL_SPARSE``) and an exact one. The words depend on the layout and HIF only, the same
    in every configuration that decodes them, whatever its lanes."""
    return (DecoderConfig("vectors", 1, layout, hif, residuals=1),
            DecoderConfig("exact", 1, layout, hif, output="exact"))


def axis_widths(layout: BlockLayout, hif) -> dict[str, int]:
    """TDATA bits of the AXI files' words (``{tlast, tdata}`` is one bit more) and the exact lane
    word's bits (``vectors.json``'s ``axis``)."""
    cfg, ecfg = _word_configs(layout, hif)
    return {"load": axis.load_bits(cfg), "sparse": axis.SPARSE_BITS, "exact_lane": reference.lane_word_bits(ecfg)}


def axis_files(layout: BlockLayout, hif, luts, offset: int, index, values, exact) -> dict[str, str]:
    """A layer's AXI files' text, by kind: its load packet (``CTRL_SPARSE`` on the offset word where it
    has entries, as a ``-sp`` shell reads it), its sparse packet (entries only) and the exact lane words
    of ``exact``'s ``(sign, exp, sig)`` rows. A word's layout is the layout's and HIF's alone
    (``_word_configs``), so one file serves every lane count."""
    cfg, ecfg = _word_configs(layout, hif)
    w = axis_widths(layout, hif)
    load = axis.load_beats(cfg, luts, offset, len(index) > 0)
    out = {"axis_load": hex_lines(axis.tlast_words(load, w["load"]), w["load"] + 1)}
    if len(index):
        sparse = axis.sparse_beats(index, values)
        out["axis_sparse"] = hex_lines(axis.tlast_words(sparse, w["sparse"]), w["sparse"] + 1)
    exact = np.asarray(exact, dtype=np.int64).reshape(-1, 3)
    out["exact_hex"] = hex_lines(reference.pack_exact(ecfg, exact[:, 0], exact[:, 2], exact[:, 1]), w["exact_lane"])
    return out


def dense_residual(s: LayerStream) -> np.ndarray | None:
    """The layer's residual as golden.decoder adds it: every value, +0 where no entry; None
    without entries."""
    if not len(s.sparse):
        return None
    r = np.zeros(s.rows * s.cols)
    r[np.asarray(s.sparse.index, dtype=np.int64)] = FORMATS["bf16"].decode(s.sparse.value_bf16)
    return r


def out_option() -> str:
    """The output folder as its caller gives it: ``sop vectors``' ``--out``, ``make_vectors``' ``out_dir``."""
    from sop.quantize.inputs import option

    return option("out_dir", flag="--out")


def _check_distinct(names: list[str]) -> None:
    """Two layers whose file names would coincide (``a/b`` and ``a_b``) would overwrite each other."""
    seen: dict[str, str] = {}
    for name in names:
        stem = _safe(name)
        if stem in seen:
            raise ValueError(f"layers {seen[stem]!r} and {name!r} would share the vector files {stem}.*; "
                             f"write them to separate {out_option()} folders")
        if len(stem) > 200:
            raise ValueError(f"layer {name[:60]!r}...: name too long for a vector file name")
        seen[stem] = name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_vectors(out_dir: Path, streams: dict[str, LayerStream], meta: dict | None = None,
                  widths: dict[str, int] | None = None) -> Path:
    """Write ``streams`` (name -> golden LayerStream, sparse entries included) as vectors; ``widths``
    names a layer's own width where the stream's ``cols`` holds padding (the stream's width otherwise)."""
    out_dir = Path(out_dir)
    if not streams:                         # (an AttributeError on the first layer's layout)
        raise ValueError(f"{out_dir}: no layers to write (a vector set holds one at least)")
    _check_distinct(list(streams))
    with atomic_files() as out:             # all or nothing: an interrupted run leaves the old set whole
        return _write_vectors(out, out_dir, streams, meta, widths or {})


def _write_vectors(out: FileSet, out_dir: Path, streams: dict[str, LayerStream], meta: dict | None,
                   widths: dict[str, int]) -> Path:
    layers, first = [], None
    for name, s in streams.items():
        validate_stream(s)
        width = widths.get(name, s.cols)
        if not s.cols - s.layout.group < width <= s.cols:
            raise ValueError(f"{name}: width {width} does not pad to the stream's {s.cols} columns "
                             f"(blocks of {s.layout.group})")
        first = first or s
        if (s.layout, s.hif) != (first.layout, first.hif):
            raise ValueError("all layers of a vector set share one layout and HIF")
        headers, codes = unpack_blocks(s.layout, s.blocks)
        bf16 = FORMATS["bf16"].encode(decode_blocks(s.hif, s.luts, s.layout, s.offset, headers, codes, "bf16",
                                                    dense_residual(s)))
        sign, sig, exp, _ = product_fields(s.hif, s.luts, s.layout, s.offset, headers, codes)
        files = {
            "blocks": block_lines(s.blocks, s.layout.block_bytes),
            "bf16": hex_lines(bf16, 16),
            "exact": decimal_lines(sign, exp, sig),
        }
        if len(s.sparse):
            files["sparse"] = "\n".join(f"{i} {v:04x}" for i, v in zip(s.sparse.index.tolist(),
                                                                        s.sparse.value_bf16.tolist())) + "\n"
        files |= axis_files(s.layout, s.hif, s.luts, s.offset, s.sparse.index, s.sparse.value_bf16,
                            np.stack([sign.ravel(), exp.ravel(), sig.ravel()], axis=1))
        names = vector_files(name, sparse=len(s.sparse) > 0)
        for kind, text in files.items():
            out.write(out_dir / names[kind], text.encode())
        layers.append({"name": name, "rows": s.rows, "cols": s.cols, "width": width, "n_blocks": s.n_blocks,
                       "offset": s.offset, "luts": s.luts.tolist(), "sparse": len(s.sparse), "files": names,
                       "sha256": {k: _sha(t.encode()) for k, t in files.items()}})
    lay = first.layout
    doc = {"version": VERSION, **(meta or {}),
           "layout": {"code_bits": lay.code_bits, "group": lay.group, "scale": lay.scale.name,
                      "scale_format": scale_format(lay, first.hif), "signed_scale": lay.signed_scale,
                      "select_bit": lay.select_bit, "header_bits": lay.header_bits, "block_bytes": lay.block_bytes},
           "hif": {"ebits": first.hif.ebits, "mbits": first.hif.mbits, "bias": first.hif.bias},
           "axis": axis_widths(lay, first.hif), "layers": layers}
    out.write(out_dir / "vectors.json", (json.dumps(doc, indent=1) + "\n").encode())
    return out_dir / "vectors.json"


def scale_format(layout: BlockLayout, hif) -> dict:
    """The block scale's float format as the hardware decodes it, ``vectors.json``'s ``layout.scale_format``:
    ``bits``, ``signed``, ``ebits``, ``mbits``, ``bias``, ``specials`` (docs/formats.md), golden.layout's
    ``decoder_format`` of it (the definition the board's format id is the CRC of), so that a testbench
    needs no table of the scale formats' names (``scale`` names it, as before)."""
    return decoder_format(layout, hif)["scale"]


def _field(doc: dict, key: str, where: str, kind=None):
    if not isinstance(doc, dict) or key not in doc:
        raise VectorError(f"{where}: field {key!r} is missing")
    value = doc[key]
    if kind is not None and not isinstance(value, kind):
        raise VectorError(f"{where}: field {key!r} must be {kind.__name__ if isinstance(kind, type) else kind}, "
                          f"got {type(value).__name__}")
    return value


def _check_shape(ld: dict, lw: str, group: int, n_blocks: int) -> None:
    """A layer's ``rows``, ``cols`` and ``width`` (absent in sets written before it: ``cols``) as the
    writer gives them: whole blocks a row, ``rows * cols`` the blocks' weights, the padding less than
    a block."""
    rows, cols = _field(ld, "rows", lw, int), _field(ld, "cols", lw, int)
    width = ld.get("width", cols)
    for key, v in (("rows", rows), ("cols", cols), ("width", width)):
        if type(v) is not int or v < 0:
            raise VectorError(f"{lw}: field {key!r} must be a count, got {v!r}")
    if cols % group or rows * cols != n_blocks * group:
        raise VectorError(f"{lw}: {rows} rows x {cols} columns is not {n_blocks} blocks of {group} "
                          f"(whole blocks a row)")
    if not cols - group < width <= cols:
        raise VectorError(f"{lw}: field 'width' {width} must be the layer's width before padding to whole "
                          f"blocks of {group}: more than {cols - group} and at most {cols}")


def read_vectors(directory: Path) -> list[VectorLayer]:
    directory = Path(directory)
    index = directory / "vectors.json"
    try:
        input_file(index, "vector index (write vectors with `sop vectors`)")
    except InputError as err:
        raise VectorError(str(err)) from None
    try:
        doc = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VectorError(f"{index}: not valid JSON ({err})") from None
    except RecursionError:
        raise VectorError(f"{index}: JSON nested too deeply") from None
    where = str(index)
    if _field(doc, "version", where, int) != VERSION:
        raise VectorError(f"{where}: " + another_version("vector set", doc["version"], VERSION,
                                                         "run `sop vectors` again to write it anew"))
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
    _check_derived(doc, lay_doc, layout, hif, where)
    out = []
    layer_docs = _field(doc, "layers", where, list)
    if not layer_docs:                      # a testbench over it would check nothing and pass
        raise VectorError(f"{where}: field 'layers' is empty; a vector set holds one layer at least")
    for i, ld in enumerate(layer_docs):
        lw = f"{where} layers[{i}]"
        name = _field(ld, "name", lw, str)
        files = _field(ld, "files", lw, dict)
        sums = _field(ld, "sha256", lw, dict)
        n_sparse = ld.get("sparse", 0) if isinstance(ld, dict) else 0
        if type(n_sparse) is not int or n_sparse < 0:
            raise VectorError(f"{lw}: field 'sparse' must be a count of entries, got {n_sparse!r}")
        texts = {}
        axis_kinds = [k for k in AXIS_KINDS if k in files]      # sets written before them have none
        for kind in ("blocks", "bf16", "exact") + (("sparse",) if n_sparse else ()) + tuple(axis_kinds):
            fname = _field(files, kind, f"{lw} files", str)
            if Path(fname).name != fname or fname in ("", ".", ".."):     # read nothing outside the set
                raise VectorError(f"{index}: {lw} files.{kind} must be a file name in the vector folder, "
                                  f"got {fname!r}")
            path = directory / fname
            try:
                input_file(path, f"vector file named by {lw} files.{kind}")
            except InputError as err:
                raise VectorError(str(err)) from None
            data = path.read_bytes()
            if _sha(data) != _field(sums, kind, f"{lw} sha256", str):
                raise VectorError(f"{path}: SHA-256 does not match {lw} sha256.{kind}: "
                                  f"the file is truncated or changed")
            try:
                texts[kind] = (path, data.decode())
            except UnicodeDecodeError as err:          # its checksum made good: a hand-made or edited set
                raise VectorError(f"{path}: not UTF-8 text (byte {err.start}: "
                                  f"{data[err.start]:#04x})") from None
        n_blocks = _field(ld, "n_blocks", lw, int)
        if isinstance(n_blocks, bool) or n_blocks < 0:
            raise VectorError(f"{lw}: field 'n_blocks' must be a count, got {n_blocks!r}")
        _check_shape(ld, lw, layout.group, n_blocks)
        luts = _field(ld, "luts", lw, list)
        shape = (layout.banks, 1 << layout.code_bits)
        if (len(luts) != shape[0] or not all(isinstance(b, list) and len(b) == shape[1] for b in luts)
                or not all(type(v) is int and 0 <= v < 1 << hif.bits for b in luts for v in b)):
            raise VectorError(f"{lw}: field 'luts' must be {shape[0]} x {shape[1]} {hif.bits}-bit HIF codes")
        luts = np.asarray(luts, dtype=np.int64)
        offset = _field(ld, "offset", lw, int)
        if isinstance(offset, bool) or not OFFSET_RANGE[0] <= offset <= OFFSET_RANGE[1]:
            raise VectorError(f"{lw}: field 'offset' must be an integer in {OFFSET_RANGE}, got {offset!r}")
        path, text = texts["blocks"]
        raw = _read_blocks(path, text, layout.block_bytes)
        if len(raw) != n_blocks * layout.block_bytes:
            raise VectorError(f"{path}: {len(raw) // layout.block_bytes} blocks, {lw} n_blocks says {n_blocks}")
        headers, codes = unpack_blocks(layout, raw)
        n = n_blocks * layout.group
        path, text = texts["bf16"]
        bf16 = _read_bf16(path, text)
        if len(bf16) != n:
            raise VectorError(f"{path}: {len(bf16)} values, expected {n}")
        path, text = texts["exact"]
        exact = _read_exact(path, text)
        if len(exact) != n:
            raise VectorError(f"{path}: {len(exact)} lines, expected {n} of 'sign exp sig'")
        index, values = (_read_sparse(*texts["sparse"], lw, n_sparse, n) if n_sparse
                         else (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
        if axis_kinds:
            _check_axis_files(texts, axis_kinds, lw, axis_files(layout, hif, luts, offset, index, values, exact))
        out.append(VectorLayer(name, layout, hif, luts, offset, headers, codes,
                               bf16, exact, index, values))
    return out


def _check_derived(doc: dict, lay_doc: dict, layout: BlockLayout, hif, where: str) -> None:
    """The index's fields that the layout and HIF determine, each where present, must be what they give
    (an integrator's testbench sizes its words from ``block_bytes`` and ``axis``, and decodes the scale by
    ``scale_format``: one edited alone was read as good), and a ``format``, where present, must name an
    operating point (golden/points.py) of this layout and HIF."""
    for key, want in (("header_bits", layout.header_bits), ("block_bytes", layout.block_bytes)):
        if key in lay_doc and (type(lay_doc[key]) is not int or lay_doc[key] != want):
            raise VectorError(f"{where}: field 'layout.{key}' is {lay_doc[key]!r}; the layout gives {want}")
    # compared as JSON text: 0 for false, or 3.0 for 3, is not what the writer writes
    want = scale_format(layout, hif)
    if "scale_format" in lay_doc and _canonical(lay_doc["scale_format"]) != _canonical(want):
        raise VectorError(f"{where}: field 'layout.scale_format' is {lay_doc['scale_format']!r}; the layout's "
                          f"scale {layout.scale.name} is {want}")
    if "axis" in doc and doc["axis"] != (want := axis_widths(layout, hif)):
        raise VectorError(f"{where}: field 'axis' is {doc['axis']!r}; the layout and HIF give {want}")
    fmt = doc.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, str):
        raise VectorError(f"{where}: field 'format' must be str, got {type(fmt).__name__}")
    points = operating_points()
    if fmt not in points:                       # (a name no point has was read as a good set)
        raise VectorError(f"{where}: field 'format' is {fmt!r}, which names no operating point; valid: "
                          f"{', '.join(points)} (golden/points.py; `sop formats` lists them)")
    point = points[fmt]
    if (point.layout, point.hif) != (layout, hif):
        raise VectorError(f"{where}: field 'format' is {fmt!r}, whose layout and HIF are not the set's "
                          f"'layout' and 'hif' fields")


def _canonical(value) -> str:
    """``value`` as JSON text, its keys sorted: equal for equal JSON data, whatever Python would call equal."""
    return json.dumps(value, sort_keys=True)


def _check_axis_files(texts: dict, kinds: list[str], where: str, expected: dict[str, str]) -> None:
    """The AXI files are the layer's other fields in another form: each must be the one the writer
    makes of them (a ``VectorError`` naming the file and its first line that differs), and all of them
    there (a sparse packet exactly where the layer has entries)."""
    what = {"axis_load": "the s_axis_load packet of its luts and offset", "exact_hex": "the lane words of exact.txt",
            "axis_sparse": "the s_axis_sparse packet of sparse.txt"}
    for kind in sorted(set(kinds) ^ set(expected)):
        if kind in expected:
            raise VectorError(f"{where}: files.{kind} is missing (the layer's other AXI files are listed)")
        raise VectorError(f"{where}: files.{kind} is listed, but the layer has no sparse entries")
    for kind in kinds:
        path, text = texts[kind]
        if text != expected[kind]:
            got, want = text.splitlines(), expected[kind].splitlines()
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise VectorError(f"{path}: line {k + 1}: not {what[kind]} ({len(want)} lines of hex expected: "
                              f"docs/vectors.md)")


def _lines(path: Path, text: str, pattern: str, what: str) -> list[str]:
    """The lines of a vector file (none in a file of one empty line, an empty layer's), each a match of
    ``pattern``: checked on the whole text at once, and line by line only to name the first that is
    not (a ``VectorError``). The readers' slow path: a text their numpy parse does not take."""
    if not text.strip():
        return []
    lines = text.splitlines()
    if re.fullmatch(f"(?:(?:{pattern})\r?\n)*(?:{pattern})?", text) is None:
        rx = re.compile(pattern)
        bad = next(((k, line) for k, line in enumerate(lines) if rx.fullmatch(line) is None), None)
        if bad is None:                         # every line matches: a line break other than \n or \r\n
            raise VectorError(f"{path}: expected lines of {what}, each ended by a newline")
        raise VectorError(f"{path}: line {bad[0] + 1}: expected {what}, got {bad[1][:80]!r}")
    return lines


# The readers parse a file with numpy, no Python loop per line, where it is lines of the expected form
# (each ended by \n or \r\n, the last maybe by nothing); any other text (an error, an empty layer's
# file, a sparse file spaced by hand) goes the slow way, line by line (``_lines``, ``_read_sparse_slow``),
# which names the first bad line. A fast parse takes only texts the slow one takes, and reads them the same.

#: each byte's hex digit value (either case), 255 for a byte that is none
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdefABCDEF", dtype=np.uint8)] = [*range(16), *range(10, 16)]

#: the fields of an exact.txt line (``[01] -?[0-9]{1,9} [0-9]{1,18}``) and of a sparse.txt line as the
#: writer makes it (``[0-9]{1,18} [0-9a-fA-F]{4}``): (base, greatest digit, a '-' allowed, digits min, max)
EXACT_FIELDS = ((10, 1, False, 1, 1), (10, 9, True, 1, 9), (10, 9, False, 1, 18))
SPARSE_FIELDS = ((10, 9, False, 1, 18), (16, 15, False, 4, 4))


def _unix_bytes(text: str) -> np.ndarray | None:
    """A file's text as bytes, each ``\\r\\n`` made ``\\n`` and a ``\\n`` after its last line; None for
    an empty text, one that is not ASCII or one with a ``\\r`` not followed by ``\\n``."""
    if not text or not text.isascii():
        return None
    a = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    cr = a == ord("\r")
    if cr.any():
        if cr[-1] or (a[1:][cr[:-1]] != ord("\n")).any():
            return None
        a = a[~cr]
    return a if a[-1] == ord("\n") else np.append(a, np.uint8(ord("\n")))


def _hex_matrix(text: str, width: int) -> np.ndarray | None:
    """The digit values, one row a line, of a text whose every line is ``width`` hex digits (the
    whole-text match of ``_lines``); None for any other text."""
    a = _unix_bytes(text)
    if a is None or len(a) % (width + 1):
        return None
    rows = a.reshape(-1, width + 1)
    nibbles = _NIBBLE[rows[:, :width]]
    if (rows[:, width] != ord("\n")).any() or (nibbles > 15).any():
        return None
    return nibbles


def _fields(text: str, fields: tuple) -> np.ndarray | None:
    """The numbers, one row a line, of a text whose every line is ``fields`` (``EXACT_FIELDS``) parted
    by one space; None for any other text. Digit by digit from each number's end, no loop per line."""
    a = _unix_bytes(text)
    if a is None:
        return None
    k, newline = len(fields), a == ord("\n")
    ends = np.flatnonzero(newline | (a == ord(" ")))        # each field's end: a space, the last's a newline
    if len(ends) % k or np.count_nonzero(newline) != len(ends) // k or not newline[ends[k - 1::k]].all():
        return None
    ends = ends.astype(np.int32 if len(a) < 2**31 else np.int64).reshape(-1, k).T.copy()    # a field's a row
    chars = np.append(a, np.uint8(ord("0")))                # a '0' past the text: a digit left of a number
    out = []
    for c, (base, top, signed, least, most) in enumerate(fields):
        e = ends[c]
        first = ends[c - 1] + 1 if c else np.concatenate([[0], ends[-1, :-1] + 1]).astype(e.dtype)
        neg = a[first] == ord("-") if signed else np.zeros(len(e), dtype=bool)
        first += neg                                        # the first digit
        count = e - first
        if len(e) and (count.min() < least or count.max() > most):
            return None
        value = np.zeros(len(e), dtype=np.int64)
        for j in range(count.max(initial=0)):               # the j-th digit from the end, of each line's
            at = e - (1 + j)
            if j >= count.min():
                at = np.where(at >= first, at, len(a))
            digit = chars[at] - np.uint8(ord("0")) if base == 10 else _NIBBLE[chars[at]]
            if digit.max() > top:                           # one not a digit (uint8: below '0' wraps high)
                return None
            value += digit * np.int64(base ** j)
        out.append(np.where(neg, -value, value))
    return np.stack(out, axis=1)


def _read_blocks(path: Path, text: str, block_bytes: int) -> bytes:
    """The packed blocks of a blocks.hex file (each line one block, most significant digit first)."""
    digits = 2 * block_bytes
    nibbles = _hex_matrix(text, digits)
    if nibbles is None:
        ints = [int(h, 16) for h in _lines(path, text, f"[0-9a-fA-F]{{{digits}}}", f"a block as {digits} hex digits")]
        return b"".join(b.to_bytes(block_bytes, "little") for b in ints)
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])[:, ::-1].tobytes()


def _read_bf16(path: Path, text: str) -> np.ndarray:
    """The values of a bf16.hex file (int64 BF16 codes)."""
    nibbles = _hex_matrix(text, 4)
    if nibbles is None:
        digits = "".join(_lines(path, text, "[0-9a-fA-F]{4}", "a BF16 value as 4 hex digits"))
        return np.frombuffer(bytes.fromhex(digits), dtype=">u2").astype(np.int64)
    nibbles = nibbles.astype(np.int64)
    return nibbles[:, 0] << 12 | nibbles[:, 1] << 8 | nibbles[:, 2] << 4 | nibbles[:, 3]


def _read_exact(path: Path, text: str) -> np.ndarray:
    """The ``(sign, exp, sig)`` rows of an exact.txt file (int64)."""
    rows = _fields(text, EXACT_FIELDS)
    if rows is None:
        rows = np.array(" ".join(_lines(path, text, "[01] -?[0-9]{1,9} [0-9]{1,18}", "'sign exp sig' (decimal)"))
                        .split(), dtype=np.int64).reshape(-1, 3)
    return rows


def _read_sparse(path: Path, text: str, where: str, count: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A layer's sparse file: ``count`` lines of ``index value`` (decimal, 4 hex digits), strictly
    increasing indices below ``n``, finite BF16 values; a ``VectorError`` naming the line otherwise."""
    rows = _fields(text, SPARSE_FIELDS)
    if rows is None:
        index, values = _read_sparse_slow(path, text, where, count)
    elif len(rows) != count:
        raise VectorError(f"{path}: {len(rows)} sparse entries, {where} sparse says {count}")
    else:
        index, values = rows[:, 0], rows[:, 1]
    bad = np.flatnonzero(np.diff(index) <= 0)
    if len(bad):
        raise VectorError(f"{path}: line {bad[0] + 2}: index {int(index[bad[0] + 1])} does not follow "
                          f"{int(index[bad[0]])}: the indices must be strictly increasing")
    past = np.flatnonzero(index >= n)
    if len(past):
        raise VectorError(f"{path}: line {past[0] + 1}: index {int(index[past[0]])} is past the layer's {n} values")
    nonfinite = np.flatnonzero((values >> 7) & 0xFF == 0xFF)
    if len(nonfinite):
        raise VectorError(f"{path}: line {nonfinite[0] + 1}: value {values[nonfinite[0]]:04x} is not a finite BF16")
    return index.astype(np.int64), values


def _read_sparse_slow(path: Path, text: str, where: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A sparse file line by line (any line breaks and spacing ``str.split`` takes): its indices as
    Python ints (one past int64 is past the layer, said so, not an OverflowError) and its values."""
    lines = text.splitlines()
    if len(lines) != count:
        raise VectorError(f"{path}: {len(lines)} sparse entries, {where} sparse says {count}")
    index, values = np.zeros(count, dtype=object), np.zeros(count, dtype=np.int64)
    for k, line in enumerate(lines):
        parts = line.split()
        # ASCII digits only: str.isdigit took '²' (then int() failed naming no file) and '٣' (read as 3)
        if len(parts) != 2 or not re.fullmatch(r"[0-9]+", parts[0]) or not re.fullmatch(r"[0-9a-fA-F]{4}", parts[1]):
            raise VectorError(f"{path}: line {k + 1}: expected 'index value' (decimal, 4 hex digits), got {line!r}")
        index[k], values[k] = int(parts[0]), int(parts[1], 16)
    return index, values


def minilm_budget_artifact(budget: float) -> Path:
    """MiniLM quantized with sop-budget at ``budget`` bits per weight, calibrated: the artifact whose
    sparse layers the regressions and the stall measurement run, made once and cached under
    build/vectors/."""
    from sop import toolenv
    from sop.quantize.artifact import quantize_model

    path = toolenv.build_root() / "vectors" / f"minilm-sop-budget-{float(budget)}.sopq"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _only_builder(path):
            if not path.is_file():                  # another process built it while this one waited
                quantize_model("minilm", "sop-budget", path, budget=budget, progress=False)
    return path


_BUILD_WAIT_S = 900.0           # a cold build takes about 30 s on 2 cores; a lock held longer is stuck


@contextmanager
def _only_builder(path: Path, wait_s: float = _BUILD_WAIT_S):
    """Hold an exclusive lock beside ``path`` (``<path>.lock``) while it is built, so that two processes
    (pytest-xdist workers, two ``make sim`` runs) build it once, not side by side. The lock goes with its
    holder's process, however that ends; a lock not freed within ``wait_s`` seconds raises
    ``TimeoutError`` naming the lock file instead of waiting for ever."""
    import fcntl

    deadline = time.monotonic() + wait_s
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock.name}: held by another process for over {wait_s:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def quantize_layer(fmt: str, w: np.ndarray, name: str) -> LayerStream:
    """The golden stream of one layer in a hardware format (the quantizer's choice).

    ``w`` as ``quantize.layer_loop.read_weight`` hands it on: checked as every command checks
    weights (no NaN/Inf, nothing a float32 or BF16 output could not hold)."""
    from sop.golden.points import vector_points
    from sop.quantize.schemes import get_quant_format

    if fmt not in vector_points():
        raise ValueError(f"format {fmt!r} has no hardware stream; valid: {', '.join(vector_points())}")
    return get_quant_format(fmt).quantize(w, name=name).stream


def crop_rows(s: LayerStream, rows: int) -> LayerStream:
    """The first ``rows`` rows of a stream: their blocks and the sparse entries inside them."""
    from dataclasses import replace

    from sop.golden.layout import Sparse

    rows = min(rows, s.rows)
    keep = np.asarray(s.sparse.index, dtype=np.int64) < rows * s.cols
    blocks = s.blocks[:rows * s.cols // s.layout.group * s.layout.block_bytes]
    return replace(s, rows=rows, blocks=blocks, sparse=Sparse(s.sparse.index[keep], s.sparse.value_bf16[keep]))


def not_in_layout(path, entry, stream: LayerStream | None, fmt: str) -> ValueError:
    """The refusal of a stored layer that is not in ``fmt``'s layout: the layout it is in, or, with no
    block layout, what it is stored as."""
    from sop.golden.layout import layout_name

    how = f"stored as {entry.choice}" if stream is None else f"in the {layout_name(stream.layout)} layout"
    return ValueError(f"{path}: layer {entry.name} is {how}, not in the {fmt} layout")


def artifact_vectors(path: Path, fmt: str, layers: list[str] | None, out_dir: Path, rows: int | None) -> Path:
    """Vectors of the stored layer streams of a ``.sopq`` artifact (sparse entries included)."""
    from sop.golden.files import check_output
    from sop.golden.points import get_point
    from sop.quantize.artifact import open_artifact

    art = open_artifact(path)
    layout = get_point(fmt).layout
    entries = [e for e in art.layers if e.kind == "sopl"]
    names = list(dict.fromkeys(layers or [e.name for e in entries if art.stream(e).layout == layout]))
    streams, widths = {}, {}
    for name in names:
        entry = next((e for e in art.layers if e.name == name), None)
        if entry is None:
            raise ValueError(f"{path}: no layer {name}; its layers: {art.some_layer_names()}")
        s = art.stream(entry)
        if s is None or s.layout != layout:
            raise not_in_layout(path, entry, s, fmt)
        streams[name] = s if rows is None else crop_rows(s, rows)
        widths[name] = entry.shape[1]
    if not streams:
        raise ValueError(f"{path}: no layer is stored in the {fmt} layout")
    _check_distinct(list(streams))
    for f in ["vectors.json", *(f for n in streams for f in vector_files(n, True).values())]:
        check_output(out_dir / f, [Path(path)], option=out_option())
    return write_vectors(out_dir, streams, {"model": str(path), "format": fmt}, widths)


def make_vectors(model: str, fmt: str, layers: list[str] | None, out_dir: Path,
                 rows: int | None = None, lm_head: bool = False) -> Path:
    """Quantize ``layers`` of ``model`` (all linear layers if None) into vectors under ``out_dir``;
    a ``.sopq`` artifact gives its stored streams instead (``artifact_vectors``).

    ``rows`` keeps only the first rows of each layer (small, fast vector sets); ``lm_head`` counts the
    output head as a linear layer (``open_model``'s option: ``--include-lm-head``).
    """
    from sop.golden.files import check_output
    from sop.quantize.inputs import boolean, option
    from sop.quantize.layer_loop import read_weight
    from sop.quantize.models import is_artifact, open_model
    from sop.terminal import some_names

    if rows is not None and rows <= 0:
        raise ValueError(f"{option('rows')} must be a positive number of rows, got {rows}")
    if is_artifact(model):
        # (an artifact's layers are those `sop quantize` stored: the switch was passed over, and a head
        # the artifact does not hold was silently missing from the vectors asked for with it)
        if boolean("lm_head", lm_head):
            flag = option("lm_head", "True", flag="--include-lm-head")
            raise ValueError(f"{model}: {flag} goes with a model, not a .sopq artifact, whose layers are "
                             f"the ones `sop quantize` stored (quantize with {flag} to store the head)")
        return artifact_vectors(Path(model), fmt, layers, Path(out_dir), rows)
    source = open_model(model, lm_head=lm_head, routers=bool(layers))   # a MoE router named by --layer is one
    names = list(dict.fromkeys(layers or [lay.name for lay in source.layers]))
    known = {lay.name for lay in source.layers}
    for name in names:
        if name not in known:
            why = source.not_selected_why(name)
            raise ValueError(f"{model}: {name} is not a linear layer{f' ({why})' if why else ''}; "
                             f"linear layers: {some_names(lay.name for lay in source.layers)}")
    out_dir = Path(out_dir)
    _check_distinct(names)
    for f in ["vectors.json", *(f for n in names for f in vector_files(n).values())]:
        check_output(out_dir / f, source.files, option=out_option())     # no vector file may replace an input
    streams, widths = {}, {}
    for name in names:                      # one layer in memory at a time
        w = read_weight(source, name)[0]    # a weight no output can hold: refused naming its file
        streams[name] = quantize_layer(fmt, w if rows is None else w[:rows], name)
        widths[name] = w.shape[1]
    return write_vectors(out_dir, streams, {"model": model, "format": fmt}, widths)
