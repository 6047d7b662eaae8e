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

from .formats import FORMATS, CodeTable, FloatFormat
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


def decode_layer(stream: LayerStream, out: str = "exact") -> np.ndarray:
    """Decode a whole layer to its (rows, cols) weight matrix."""
    headers, codes = unpack_blocks(stream.layout, stream.blocks)
    residual = None
    if len(stream.sparse):
        residual = np.zeros(stream.rows * stream.cols)
        residual[stream.sparse.index.astype(np.int64)] = FORMATS["bf16"].decode(stream.sparse.value_bf16)
    values = decode_blocks(stream.hif, stream.luts, stream.layout, stream.offset, headers, codes,
                           out, residual)
    return values.reshape(stream.rows, stream.cols)
