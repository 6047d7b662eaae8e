"""Block layout: how a quantized layer travels to the decoder, bit for bit.

A layer is a sequence of *blocks*. A block is ``g`` codes of ``k`` bits plus a
header; the header holds the block scale code, optionally the scale's sign and
optionally the codebook-selection bit. Blocks are packed back to back, each a
whole number of bytes, **LSB first**: bit ``j`` of a block is bit ``j % 8`` of its
byte ``j // 8``. Within a block::

    bit 0 ............ S-1 | S      | S+1    | H + i*k ... H + (i+1)*k - 1
        scale code         | sign   | select | code i (i = 0 .. g-1)
                           (if any) (if any)

where ``S`` is the scale format's width and ``H = S + sign + select`` (docs/formats.md
has the byte diagrams). Blocks run along a weight row: block ``b`` of row ``r``
holds weights ``W[r, b*g : (b+1)*g]``, and rows follow each other.

A ``LayerStream`` is everything the decoder needs for one layer: the layout, the
HIF format, the LUT images of bank A (and bank B when the header has a selection
bit), the per-layer power-of-two scale offset, the packed blocks and the sparse
residual entries. ``pack_layer`` / ``unpack_layer`` serialize it with a CRC-32;
unpacking a truncated or inconsistent buffer raises ``LayoutError``.

``format_id(layout, hif)``: the 32-bit identity of what a decoder built for a
layout and HIF decodes (``decoder_format``, its definition), which a board
reports in STATUS and the host compares with the point it was asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from .files import another_version, crc32
from .formats import CodeTable, FloatFormat, get_format
from .hif import hif_format

CODE_BITS = (4, 6)
GROUP_SIZES = (8, 16, 32, 64)
OFFSET_RANGE = (-128, 127)          # the per-layer offset is one signed byte


class LayoutError(ValueError):
    """A packed stream that is truncated, corrupted or inconsistent."""


@dataclass(frozen=True)
class BlockLayout:
    """Shape of one block: code width, block size and header fields."""

    code_bits: int
    group: int
    scale: CodeTable              # the scale's magnitude format (unsigned), or its name
    signed_scale: bool = False
    select_bit: bool = False

    def __post_init__(self):
        if isinstance(self.scale, str):         # a format's name, as the docs and `sop formats` spell it
            object.__setattr__(self, "scale", get_format(self.scale))
        if not isinstance(self.scale, CodeTable):
            raise TypeError(f"scale must be a format (golden.formats.get_format) or its name, "
                            f"not {type(self.scale).__name__}")
        if self.code_bits not in CODE_BITS:
            raise ValueError(f"code width {self.code_bits} not supported; valid: {CODE_BITS}")
        if self.group not in GROUP_SIZES:
            raise ValueError(f"block size {self.group} not supported; valid: {GROUP_SIZES}")
        if self.scale.signed:
            raise ValueError(f"scale format {self.scale.name} is signed: a block scale is an unsigned "
                             f"magnitude (ue3m3, ue4m3, ...), and a layout with signed scales carries the "
                             f"sign in a header bit of its own (signed_scale)")
        if self.block_bits % 8:
            raise ValueError(f"a block of {self.block_bits} bits is not whole bytes")

    @property
    def header_bits(self) -> int:
        return self.scale.bits + int(self.signed_scale) + int(self.select_bit)

    @property
    def block_bits(self) -> int:
        return self.header_bits + self.group * self.code_bits

    @property
    def block_bytes(self) -> int:
        return self.block_bits // 8

    @property
    def banks(self) -> int:
        return 2 if self.select_bit else 1

    @property
    def bpw(self) -> float:
        """Bits per weight of the blocks alone (per-layer tables are extra)."""
        return self.block_bits / self.group

    # -- header fields ------------------------------------------------------
    @property
    def sign_position(self) -> int:
        """Bit of the header that holds the block sign (when ``signed_scale``)."""
        return self.scale.bits

    @property
    def select_position(self) -> int:
        """Bit of the header that holds the selection bit (when ``select_bit``)."""
        return self.scale.bits + int(self.signed_scale)

    def make_header(self, scale_code, sign=0, select=0) -> np.ndarray:
        scale_code, sign, select = (_integers(a, f"header {what}") for a, what in
                                    ((scale_code, "scale codes"), (sign, "signs"), (select, "selections")))
        S = self.scale.bits
        if (scale_code < 0).any() or (scale_code >= 1 << S).any():
            raise ValueError(f"scale code out of range for {self.scale.name}")
        for name, v, present in (("sign", sign, self.signed_scale), ("select", select, self.select_bit)):
            if ((v != 0) & (v != 1)).any() or (not present and v.any()):
                raise ValueError(f"header field {name} must be 0/1 and needs the layout to carry it")
        hdr = scale_code | (sign << self.sign_position) if self.signed_scale else scale_code
        if self.select_bit:
            hdr = hdr | (select << self.select_position)
        return hdr

    def split_header(self, header) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale code, sign, select) of each header; absent fields read as 0."""
        header = np.asarray(header, dtype=np.int64)
        S = self.scale.bits
        scale_code = header & ((1 << S) - 1)
        sign = (header >> self.sign_position) & 1 if self.signed_scale else np.zeros_like(header)
        select = (header >> self.select_position) & 1 if self.select_bit else np.zeros_like(header)
        return scale_code, sign, select


def decoder_format(layout: BlockLayout, hif: FloatFormat) -> dict:
    """What a decoder's hardware interprets of a point, as JSON data: the block layout (code width, block
    size, the scale's float format, the sign and selection bits) and the HIF its LUT entries are in. Not
    the tables' values (a LOAD brings them at run time), nor the formats' names (two names of one format
    decode alike). ``format_id`` is its CRC; docs/formats.md, "The format id", spells it out."""
    def fmt(f: CodeTable) -> dict:
        if not isinstance(f, FloatFormat):          # (golden.decoder.decoder_problems refuses it first)
            raise ValueError(f"{f.name} is not a float format: the hardware decodes float scales and HIFs")
        return {"bits": f.bits, "signed": f.signed, "ebits": f.ebits, "mbits": f.mbits, "bias": f.bias,
                "specials": f.specials}

    return {"code_bits": layout.code_bits, "group": layout.group, "scale": fmt(layout.scale),
            "signed_scale": layout.signed_scale, "select_bit": layout.select_bit, "hif": fmt(hif)}


def format_id(layout: BlockLayout, hif: FloatFormat) -> int:
    """The 32-bit identity of what a decoder (or GEMV engine) built for ``layout`` and ``hif`` decodes,
    the one STATUS reports (docs/board-protocol.md): zlib's CRC-32 of ``decoder_format``'s canonical JSON
    (keys sorted, no spaces, ASCII). Equal for equal definitions, whatever the names and tables;
    stable across runs and Python versions (never ``hash()``, which is salted per process)."""
    doc = json.dumps(decoder_format(layout, hif), sort_keys=True, separators=(",", ":"))
    return crc32(doc.encode("ascii"))


def _integers(a, what: str) -> np.ndarray:
    """``a`` as int64, refusing a value that is no integer (the cast truncated 1.7 to code 1)."""
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        frac = a != np.trunc(a) if a.dtype.kind == "f" else np.ones(a.shape, bool)
        if frac.any():
            raise ValueError(f"{what} are integers, got {a[frac].flat[0]} ({a.dtype})")
    return a.astype(np.int64, copy=False)


def _to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """(..., n) integers -> (..., n*width) bits, LSB first."""
    v = np.asarray(values, dtype=np.int64)[..., None]
    # (the bit count given, not -1: numpy cannot infer it for no values, and a layer of no blocks
    # must pack and unpack too)
    return ((v >> np.arange(width)) & 1).astype(np.uint8).reshape(*v.shape[:-2], v.shape[-2] * width)


def _from_bits(bits: np.ndarray, width: int) -> np.ndarray:
    b = bits.reshape(*bits.shape[:-1], bits.shape[-1] // width, width).astype(np.int64)
    return (b << np.arange(width)).sum(axis=-1)


def pack_blocks(layout: BlockLayout, headers, codes) -> bytes:
    """Pack ``headers`` (n,) and ``codes`` (n, g) into the block stream."""
    headers = _integers(headers, "headers").reshape(-1)
    codes = _integers(codes, "codes")
    if codes.ndim != 2 or codes.shape != (len(headers), layout.group):
        raise ValueError(f"codes must be (n_blocks, {layout.group}) with n_blocks = {len(headers)}; "
                         f"got {codes.shape}")
    if (codes < 0).any() or (codes >= 1 << layout.code_bits).any():
        raise ValueError(f"codes out of range for {layout.code_bits}-bit codes")
    if (headers < 0).any() or (headers >= 1 << layout.header_bits).any():
        raise ValueError(f"headers out of range for {layout.header_bits}-bit headers")
    bits = np.concatenate([_to_bits(headers[:, None], layout.header_bits),
                           _to_bits(codes, layout.code_bits)], axis=1)
    return np.packbits(bits, axis=1, bitorder="little").tobytes()


def unpack_blocks(layout: BlockLayout, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_blocks``: (headers (n,), codes (n, g))."""
    if len(data) % layout.block_bytes:
        raise LayoutError(f"block stream of {len(data)} bytes is not a whole number of "
                          f"{layout.block_bytes}-byte blocks (truncated?)")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, layout.block_bytes)
    bits = np.unpackbits(raw, axis=1, bitorder="little")
    H = layout.header_bits
    headers = _from_bits(bits[:, :H], H)[:, 0]
    codes = _from_bits(bits[:, H:], layout.code_bits)
    return headers, codes


def block_headers(layout: BlockLayout, data: bytes) -> np.ndarray:
    """The header of every block (n,), without unpacking the codes."""
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, layout.block_bytes)
    nbytes = (layout.header_bits + 7) // 8
    head = np.zeros(len(raw), dtype=np.int64)
    for i in range(nbytes):                    # a few bytes, little-endian: no per-block Python loop
        head |= raw[:, i].astype(np.int64) << (8 * i)
    return head & ((1 << layout.header_bits) - 1)


@dataclass(frozen=True)
class Sparse:
    """Sparse residuals: flat indices (row * cols + col, strictly increasing) and BF16 values."""

    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    value_bf16: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))

    def __len__(self):
        return len(self.index)


@dataclass(frozen=True)
class LayerStream:
    """One layer as the decoder receives it."""

    layout: BlockLayout
    hif: FloatFormat
    luts: np.ndarray              # (banks, 2**code_bits) HIF codes: bank A, then bank B
    offset: int                   # per-layer power of two applied to every block scale
    rows: int
    cols: int
    blocks: bytes
    sparse: Sparse = field(default_factory=Sparse)

    @property
    def n_blocks(self) -> int:
        return self.rows * self.cols // self.layout.group

    @property
    def bits(self) -> int:
        """Every bit the layer costs: blocks, LUT images, offset and sparse entries (``layer_bits``)."""
        return layer_bits(self.layout, self.hif, self.rows, self.cols, len(self.sparse))


def layer_bits(layout: BlockLayout, hif: FloatFormat, rows: int, cols: int, n_sparse: int = 0) -> int:
    """The bits of a ``rows x cols`` layer's stream, from its shape: its blocks (each row padded to whole
    blocks), the LUT images, the offset byte and ``n_sparse`` sparse entries."""
    blocks = rows * -(-cols // layout.group)
    return (blocks * layout.block_bits + layout.banks * (1 << layout.code_bits) * hif.bits + 8
            + n_sparse * SPARSE_ENTRY_BITS)

    @property
    def bpw(self) -> float:
        return self.bits / (self.rows * self.cols)


SPARSE_ENTRY_BITS = 32 + 16       # u32 flat index + BF16 value
MAGIC = b"SOPL"
VERSION = 1


def _layer_header(s: LayerStream) -> bytes:
    lay = s.layout
    name = lay.scale.name.encode("ascii")
    flags = int(lay.signed_scale) | int(lay.select_bit) << 1
    return (MAGIC + struct.pack("<BBBB", VERSION, lay.code_bits, lay.group, flags)
            + struct.pack("<B", len(name)) + name
            + struct.pack("<BBbb", s.hif.ebits, s.hif.mbits, s.hif.bias, s.offset)
            + struct.pack("<III", s.rows, s.cols, len(s.sparse)))


def validate_stream(s: LayerStream) -> None:
    """Raise ValueError if the stream's parts do not fit together."""
    lay = s.layout
    if not OFFSET_RANGE[0] <= s.offset <= OFFSET_RANGE[1]:
        raise ValueError(f"per-layer offset {s.offset} outside {OFFSET_RANGE}")
    if s.cols % lay.group:
        raise ValueError(f"{s.cols} columns are not a multiple of the block size {lay.group}")
    if s.luts.shape != (lay.banks, 1 << lay.code_bits):
        raise ValueError(f"LUT images must be {(lay.banks, 1 << lay.code_bits)}, got {s.luts.shape}")
    if (s.luts >= 1 << s.hif.bits).any() or (s.luts < 0).any():
        raise ValueError(f"a LUT entry is not a {s.hif.bits}-bit {s.hif.name} code")
    if len(s.blocks) != s.n_blocks * lay.block_bytes:
        raise ValueError(f"{len(s.blocks)} block bytes for {s.n_blocks} blocks of {lay.block_bytes}")
    idx = np.asarray(s.sparse.index, dtype=np.int64)
    if len(idx) != len(s.sparse.value_bf16):
        raise ValueError("sparse index and value arrays differ in length")
    if len(idx) and (idx[0] < 0 or idx[-1] >= s.rows * s.cols or (np.diff(idx) <= 0).any()):
        raise ValueError("sparse indices must be strictly increasing and inside the layer")
    # Nothing in a stream may decode to a non-finite value: the quantizer never writes
    # a NaN scale code or a non-finite residual, so a stream holding one is corrupt.
    bf16_exp = (np.asarray(s.sparse.value_bf16, dtype=np.int64) >> 7) & 0xFF
    if (bf16_exp == 0xFF).any():
        i = int(np.flatnonzero(bf16_exp == 0xFF)[0])
        raise ValueError(f"sparse value {i} (BF16 {int(s.sparse.value_bf16[i]):#06x}) is not finite")
    nan_codes = np.flatnonzero(np.isnan(lay.scale.values))
    if len(nan_codes) and s.n_blocks:
        scale_code, _, _ = lay.split_header(block_headers(lay, s.blocks))
        bad = np.isin(scale_code, nan_codes)
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise ValueError(f"block {b}: scale code {int(scale_code[b]):#x} is NaN in {lay.scale.name}")


def pack_layer(s: LayerStream) -> bytes:
    """Serialize a layer: header, LUT images (u16 LE), blocks, sparse table, CRC-32."""
    validate_stream(s)
    body = (_layer_header(s) + np.asarray(s.luts, dtype="<u2").tobytes() + s.blocks
            + np.asarray(s.sparse.index, dtype="<u4").tobytes()
            + np.asarray(s.sparse.value_bf16, dtype="<u2").tobytes())
    return body + struct.pack("<I", crc32(body))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise LayoutError(f"layer stream truncated: {what} needs {n} bytes at offset "
                              f"{self.pos}, only {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def unpack_layer(data: bytes) -> LayerStream:
    """Inverse of ``pack_layer``; raises LayoutError on any inconsistency."""
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise LayoutError(f"not a SOP layer stream (magic {data[:4]!r}, expected {MAGIC!r})")
    # another version may lay out or check its bytes otherwise: its version byte is named, not taken for
    # a corrupted stream of this one (and where the checksum fails as well, both are)
    other = another_version("layer stream", data[4], VERSION, "quantize the layer again to write it anew") \
        if len(data) > 4 and data[4] != VERSION else None
    if len(data) < 8 or crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
        raise LayoutError("layer stream checksum mismatch: the data is truncated or corrupted"
                          + (f"; or a {other}" if other else ""))
    if other:
        raise LayoutError(other)
    r = _Reader(data[:-4])
    r.take(4, "magic")
    _, k, g, flags = r.unpack("<BBBB", "header")
    if flags & ~0b11:
        raise LayoutError(f"inconsistent layer header: flags {flags:#04x} set reserved bits (only bit 0, "
                          f"signed scale, and bit 1, selection bit, are defined)")
    (name_len,) = r.unpack("<B", "scale format name length")
    name = r.take(name_len, "scale format name").decode("ascii", errors="replace")
    e, m, bias, offset = r.unpack("<BBbb", "HIF and offset")
    rows, cols, n_sparse = r.unpack("<III", "shape")
    try:
        layout = BlockLayout(k, g, get_format(name), bool(flags & 1), bool(flags & 2))
        hif = hif_format(m, e, bias)
    except ValueError as err:
        raise LayoutError(f"inconsistent layer header: {err}") from None
    if layout.scale.name != name:              # one spelling a format: packing writes its own name
        raise LayoutError(f"inconsistent layer header: scale format written {name!r}, not as "
                          f"{layout.scale.name!r}")
    luts = np.frombuffer(r.take(2 * layout.banks << k, "LUT images"), "<u2").reshape(layout.banks, -1)
    if cols % g:
        raise LayoutError(f"inconsistent layer header: {cols} columns, block size {g}")
    blocks = r.take(rows * cols // g * layout.block_bytes, "blocks")
    index = np.frombuffer(r.take(4 * n_sparse, "sparse indices"), "<u4")
    values = np.frombuffer(r.take(2 * n_sparse, "sparse values"), "<u2")
    if r.pos != len(r.data):
        raise LayoutError(f"{len(r.data) - r.pos} unexpected trailing bytes in layer stream")
    s = LayerStream(layout, hif, luts.astype(np.int64), offset, rows, cols, blocks,
                    Sparse(index.astype(np.uint32), values.astype(np.uint16)))
    try:
        validate_stream(s)
    except ValueError as err:
        raise LayoutError(f"inconsistent layer stream: {err}") from None
    return s


def named_layouts() -> dict[str, BlockLayout]:
    """The layout of each operating point, by name (the registry is golden/points.py)."""
    from .points import operating_points      # points builds on this module

    return {name: p.layout for name, p in operating_points().items()}


def layout_name(layout: BlockLayout) -> str:
    """The operating point whose layout ``layout`` is (the first registered), else its fields."""
    return next((name for name, lay in named_layouts().items() if lay == layout),
                f"{layout.code_bits}-bit codes in blocks of {layout.group} with {layout.scale.name} scales")
