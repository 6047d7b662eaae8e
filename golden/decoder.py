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
product, and the exact sum is rounded once into the output format
(docs/formats.md section 9):

* ``"exact"``: without residuals no rounding (float64 holds every product
  exactly); with them, the exact sum rounded once to float64 (an IEEE float64
  addition of two float64 values is exactly that). Only a scale format as wide as
  ``ue11m4b1060`` (with the offset) reaches past float64's range: such a product is
  held as +-``FLOAT64_MAX`` (past 2^1024) or rounded where it reaches float64's
  subnormals (below 2^-1022, with more significant bits than they hold; below
  2^-1074, to a signed zero or 2^-1074); either is beyond BF16 and float32, whose outputs are then still
  the exact value's rounding (saturated, or a signed zero);
* ``"bf16"``: the exact sum rounded once to BF16: to nearest, ties to even,
  saturating, subnormals kept (golden.formats' rule, ``FORMATS["bf16"].quantize``; computed on the
  bits by ``round_to_bf16``, tested against that table; BF16 = E8M7, bias 127).
  ``sum_rounded_to_odd`` makes the one rounding exact: float64 alone would round
  twice (a product near 2^100 plus a residual near 2^-133 first to float64, whose
  result can sit exactly on a BF16 tie that the exact sum does not).

``decode_layer`` into a float32 array (what `sop dequantize` writes) rounds the exact sum once to
float32 the same way: rounded to odd in float64, then ``to_float32`` (a product of more than 24
significant bits, a wide HIF under a wide scale, plus a residual could otherwise land on a float32 tie
in float64 that the exact sum is not on).

The sum's zero follows IEEE round-to-nearest: ``x + (-x) = +0``, ``(-0) + (-0) = -0``,
``(-0) + (+0) = +0``. A layer that carries sparse entries adds its residual to
*every* value (``+0`` where it has no entry), so there a -0 product decodes to +0.
"""

from __future__ import annotations

import numpy as np

from .formats import FORMATS, CodeTable, FloatFormat, round_to_bf16, to_float32
from .layout import BlockLayout, LayerStream, unpack_blocks

OUTPUTS = ("exact", "bf16")
#: The most output lanes a decoder instance has (hdl/config.py builds 1, 2, 4, ... up to it).
MAX_LANES = 64


def decoder_problems(lanes, layout: BlockLayout, hif: FloatFormat, output: str) -> list[str]:
    """What keeps the hardware from decoding ``layout`` into ``lanes`` lanes of ``output``: one
    sentence per problem, none where it can. Here, beside the decoder it implements, so that
    ``hdl.config.DecoderConfig`` and the operating-point registry (golden/points.py, which may not
    import Amaranth) refuse the same configurations: a point the hardware cannot build is refused
    when it is defined, not later by every `make verilog` (an outside probe registered lanes=3)."""
    problems = []
    g = layout.group
    if (not isinstance(lanes, (int, np.integer)) or isinstance(lanes, bool) or not 1 <= lanes <= MAX_LANES
            or lanes & (lanes - 1)):
        problems.append(f"lanes must be a power of two in 1..{MAX_LANES}, got {lanes!r}")
    elif g % lanes and lanes % g:
        problems.append(f"lanes {lanes} and block size {g} must divide one another")
    if output not in OUTPUTS:
        problems.append(f"output must be one of {OUTPUTS}, got {output!r}")
    for what, fmt in (("scale", layout.scale), ("HIF", hif)):
        if not isinstance(fmt, FloatFormat) or fmt.specials != "finite":
            problems.append(f"{what} format {fmt.name} has NaN/Inf codes; the hardware decodes "
                            f"formats whose every code is a number (for example ue4m4, ue3m3)")
    return problems


#: where a product past float64's range is held (module docstring): beyond every BF16 and float32, so
#: those outputs saturate it as they saturate any value past their largest
FLOAT64_MAX = float(np.finfo(np.float64).max)


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


def sum_rounded_to_odd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` (float64 arrays) rounded to odd in float64: a float64 whose BF16 rounding
    (to nearest even, saturating) is the BF16 rounding of the exact sum, and whose float32
    rounding (``to_float32``) the float32 rounding of it.

    TwoSum gives ``s = fl(a + b)`` and the exact error ``e = (a + b) - s`` (exact for any
    finite ``a``, ``b`` whose sum does not overflow, which no decoded value comes near).
    Where ``e != 0`` and ``s`` has an even significand, ``s`` moves one ulp towards ``e``:
    that is the odd one of the two float64 neighbours of the exact sum (round to odd).
    A rounding to odd at p bits followed by a rounding to nearest at q <= p - 2 bits is
    the rounding to nearest of the exact value (Boldo and Melquiond): 53 >= 8 + 2 for
    BF16's normal range and 53 >= 24 + 2 for float32's, and the subnormals and the
    saturation thresholds of both are farther apart still. A zero sum is exact (``e == 0``)
    and keeps IEEE's sign (``x + (-x) = +0``, ``(-0) + (-0) = -0``); a nonzero sum is never
    rounded to float64 zero (every float64 sum that small is exact). NaN propagates."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    bits = s.view(np.int64)
    odd = (e != 0) & ((bits & 1) == 0)                  # NaN: e is NaN, != 0, but s stays NaN below
    # one ulp away from zero (bits + 1) where e has the sign of s, towards zero (bits - 1) else:
    # sign-magnitude bit patterns, so the same for either sign of s
    step = np.where(np.signbit(e) == np.signbit(s), 1, -1)
    return np.where(odd & ~np.isnan(s), (bits + step * odd).view(np.float64), s)


def decode_blocks(hif: FloatFormat, luts, layout: BlockLayout, offset: int, headers, codes,
                  out: str = "exact", residual: np.ndarray | None = None) -> np.ndarray:
    """Decoded values (n, g) of blocks given as header and code arrays.

    ``residual`` (float64, one per value, BF16 values; +0 where a layer with sparse entries
    has none) is added to the exact products and the sum rounded once (module docstring)."""
    if out not in OUTPUTS:
        raise ValueError(f"unknown output format {out!r}; valid: {', '.join(OUTPUTS)}")
    sign, sig, exp, nan = product_fields(hif, luts, layout, offset, headers, codes)
    with np.errstate(over="ignore", under="ignore"):    # past float64's range: see the module docstring
        magnitude = np.ldexp(sig.astype(np.float64), exp.astype(np.int32))
    np.minimum(magnitude, FLOAT64_MAX, out=magnitude)
    # The sign is always HIF sign xor block sign, zero included: a zero entry under a
    # negative scale decodes to -0 (BF16 0x8000), as the datapath's sign bit does.
    value = np.where(nan, np.nan, np.where(sign == 1, -magnitude, magnitude))
    if residual is not None:
        residual = np.asarray(residual, dtype=np.float64).reshape(value.shape)
        # float64 output: one IEEE addition is the exact sum rounded once to float64;
        # BF16 output: rounded to odd, so that the BF16 rounding below is the only one
        value = sum_rounded_to_odd(value, residual) if out == "bf16" else value + residual
    if out == "bf16":
        # FORMATS["bf16"].quantize's values, from the bits (no table search); a NaN stays NaN
        value = round_to_bf16(value)
    return value


#: Weights decoded per chunk by ``decode_layer``: its integer temporaries (about 80 bytes per
#: weight) stay a few MB whatever the layer's size. A chunk is whole rows, at least one: a row
#: wider than this (65,536 columns) is one chunk, its temporaries about 80 bytes a column.
CHUNK_WEIGHTS = 1 << 16


def decode_layer(stream: LayerStream, out: str = "exact", *, dest: np.ndarray | None = None) -> np.ndarray:
    """Decode a whole layer to its (rows, cols) weight matrix (float64).

    The layer is decoded in chunks of whole rows (``CHUNK_WEIGHTS`` weights), each
    exactly as ``decode_blocks`` decodes the whole layer, so the values do not depend on
    the chunking. ``dest``, if given, is a preallocated ``(rows, c)`` array with
    ``c <= cols``, float64 or float32: the first ``c`` columns of every row are written
    into it (float32 by ``to_float32``, which saturates) and it is returned; the padding is
    cropped without a float64 copy of the layer. Another dtype is refused: numpy's cast to
    float16 made a finite value Inf, and ml_dtypes' to bfloat16 rounds through float32, twice."""
    if out not in OUTPUTS:
        raise ValueError(f"unknown output format {out!r}; valid: {', '.join(OUTPUTS)}")
    rows, cols, lay = stream.rows, stream.cols, stream.layout
    if dest is None:
        dest = np.empty((rows, cols))
    elif dest.dtype not in (np.float64, np.float32):
        raise ValueError(f"dest is {dest.dtype}: decode_layer writes float64 or float32 (round those, or take "
                         f"out='bf16' for BF16)")
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
        to32 = dest.dtype == np.float32 and out == "exact"
        values = decode_blocks(stream.hif, stream.luts, lay, stream.offset, headers, codes, out,
                               None if to32 else residual)
        if to32 and residual is not None:           # rounded once to float32 (module docstring)
            values = sum_rounded_to_odd(values, residual.reshape(values.shape))
        values = values.reshape(r1 - r0, cols)[:, :keep]
        # float32 (the files' type) by its output rule: saturating, so a finite value stays finite
        dest[r0:r1] = to_float32(values) if dest.dtype == np.float32 else values
    return dest
