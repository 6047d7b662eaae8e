"""The golden decoder: the exact function the hardware computes, in vectorized numpy.

For block ``b`` with header (scale code ``c``, sign ``s``, select ``t``) and code ``q``:

    h      = LUT[t][q]                         (a HIF code; bank A is t = 0)
    value  = (-1)^(sign(h) xor s) * |HIF(h)| * SCALE(c) * 2^offset

computed as integers, the way the datapath does it (``product_fields``)::

    sig = Sh * Ss                 Sh = HIF significand, hidden bit included
    exp = Xh + Xs + offset        Xh = max(e_h, 1) - bias_h - M_h, likewise Xs

so that ``value = (-1)^sign * sig * 2^exp`` exactly (a zero keeps its sign, so
a zero entry under a negative scale gives -0). A NaN scale code (UE8M0
0xFF, UE4M3 0x7F) yields NaN. Sparse residuals are then added to the exact
product (in float64), and the sum is rounded once into the output format:

* ``"exact"``: no rounding (float64 holds every product exactly);
* ``"bf16"``: round to nearest, ties to even, saturating, subnormals kept
  (golden.formats' rule; BF16 = E8M7, bias 127).
"""

from __future__ import annotations

import numpy as np

from .formats import FORMATS, CodeTable, FloatFormat, to_float32
from .layout import BlockLayout, LayerStream, unpack_blocks

OUTPUTS = ("exact", "bf16")


def float_fields(fmt: CodeTable, codes: np.ndarray):
    """(sign, significand, exponent) of float codes: value = ±sig * 2^exp."""
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"{fmt.name} is not a float format")
    M, E = fmt.mbits, fmt.ebits
    m = codes & ((1 << M) - 1)
    e = (codes >> M) & ((1 << E) - 1)
    sign = (codes >> (E + M)) & 1 if fmt.signed else np.zeros_like(codes)
    hidden = (e > 0) | (not fmt.subnormals)
    sig = m + (hidden.astype(np.int64) << M)
    exp = (np.maximum(e, 1) if fmt.subnormals else e) - fmt.bias - M
    return sign, sig, exp


def product_fields(hif: FloatFormat, luts, layout: BlockLayout, offset: int, headers, codes):
    """Integer fields of the exact product for every code: (sign, sig, exp, nan).

    ``luts`` is (banks, 2**k) HIF codes, ``headers`` (n,), ``codes`` (n, g).
    """
    luts = np.asarray(luts, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    scale_code, sign_b, select = layout.split_header(headers)
    h = luts[select[:, None], codes]
    sh, Sh, Xh = float_fields(hif, h)
    _, Ss, Xs = float_fields(layout.scale, scale_code)
    nan = np.isnan(layout.scale.values[scale_code])[:, None] & np.ones_like(h, dtype=bool)
    return sh ^ sign_b[:, None], Sh * Ss[:, None], Xh + (Xs + offset)[:, None], nan


def decode_blocks(hif: FloatFormat, luts, layout: BlockLayout, offset: int, headers, codes,
                  out: str = "exact", residual: np.ndarray | None = None) -> np.ndarray:
    """Decoded values (n, g) of blocks given as header and code arrays."""
    if out not in OUTPUTS:
        raise ValueError(f"unknown output format {out!r}; valid: {', '.join(OUTPUTS)}")
    sign, sig, exp, nan = product_fields(hif, luts, layout, offset, headers, codes)
    magnitude = np.ldexp(sig.astype(np.float64), exp.astype(np.int32))
    # The sign is always HIF sign xor block sign, zero included: a zero entry under a
    # negative scale decodes to -0 (BF16 0x8000), as the datapath's sign bit does.
    value = np.where(nan, np.nan, np.where(sign == 1, -magnitude, magnitude))
    if residual is not None:
        value = value + residual.reshape(value.shape)
    if out == "bf16":
        bf16 = FORMATS["bf16"]
        finite = ~np.isnan(value)
        rounded = np.full_like(value, np.nan)
        rounded[finite] = bf16.quantize(value[finite])
        value = rounded
    return value


#: Weights decoded per chunk by ``decode_layer``: its integer temporaries (about 80 bytes per
#: weight) stay a few MB whatever the layer's size.
CHUNK_WEIGHTS = 1 << 16


def decode_layer(stream: LayerStream, out: str = "exact", *, dest: np.ndarray | None = None) -> np.ndarray:
    """Decode a whole layer to its (rows, cols) weight matrix (float64).

    The layer is decoded in chunks of whole rows (``CHUNK_WEIGHTS`` weights), each
    exactly as ``decode_blocks`` decodes the whole layer, so the values do not depend on
    the chunking. ``dest``, if given, is a preallocated ``(rows, c)`` array with
    ``c <= cols`` (of any float dtype): the first ``c`` columns of every row are written
    into it (each chunk rounded to its dtype; float32 by ``to_float32``, which saturates)
    and it is returned; the padding is cropped without a float64 copy of the layer."""
    if out not in OUTPUTS:
        raise ValueError(f"unknown output format {out!r}; valid: {', '.join(OUTPUTS)}")
    rows, cols, lay = stream.rows, stream.cols, stream.layout
    if dest is None:
        dest = np.empty((rows, cols))
    elif dest.ndim != 2 or dest.shape[0] != rows or dest.shape[1] > cols:
        raise ValueError(f"dest of shape {dest.shape} cannot hold a {rows} x {cols} layer (cropped)")
    keep = dest.shape[1]
    bpr = cols // lay.group                         # blocks per row
    if len(stream.blocks) != rows * bpr * lay.block_bytes:
        unpack_blocks(lay, stream.blocks)           # golden's error for a truncated stream
        raise ValueError(f"block stream of {len(stream.blocks)} bytes for {rows} x {cols} weights")
    sparse = len(stream.sparse) > 0
    if sparse:
        index = stream.sparse.index.astype(np.int64)
        svals = FORMATS["bf16"].decode(stream.sparse.value_bf16)
        order = np.argsort(index, kind="stable")    # validated streams are sorted already
        index, svals = index[order], svals[order]
    step = max(1, CHUNK_WEIGHTS // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        headers, codes = unpack_blocks(lay, stream.blocks[r0 * bpr * lay.block_bytes:r1 * bpr * lay.block_bytes])
        residual = None
        if sparse:
            # A dense residual whenever the layer has sparse entries (adding +0 turns a -0
            # product into +0, exactly as the whole-layer residual does).
            lo, hi = np.searchsorted(index, [r0 * cols, r1 * cols])
            residual = np.zeros((r1 - r0) * cols)
            residual[index[lo:hi] - r0 * cols] = svals[lo:hi]
        values = decode_blocks(stream.hif, stream.luts, lay, stream.offset, headers, codes, out, residual)
        values = values.reshape(r1 - r0, cols)[:, :keep]
        # float32 (the files' type) by its output rule: saturating, so a finite value stays finite
        dest[r0:r1] = to_float32(values) if dest.dtype == np.float32 else values
    return dest
