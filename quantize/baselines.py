"""Baseline formats: the published block formats the SOP points are measured against.

Each function maps a float ``(out, in)`` weight matrix to a ``QuantResult``
(quantize/result.py): ``recon`` is the exact reconstruction (decoded element ×
decoded scale(s), in float64) and ``bits`` every stored bit of the layer. Every
number format, codebook and the rounding rule come from ``golden`` (round to
nearest, ties to even, saturating): nothing here defines a format of its own.
Blocks run along a row (the input dimension), as in golden/layout.py.

Definitions (docs/quantizer.md has the same list; ``numel = rows * cols``):

* ``fp8-e4m3-pot``: E4M3 elements, one power-of-two scale per layer,
  ``2^ceil(log2(amax / 448))`` (raised by one if rounding the logarithm left the
  maximum above 448). Bits: ``8 * numel + 8`` (the scale is one exponent byte).
* ``int8-ch``: per output row a symmetric FP32 scale ``amax_row / 127``, INT8
  elements (golden ``int8``). Bits: ``8 * numel + 32 * rows``.
* ``mxfp8-e4m3``, ``mxfp6-e2m3``, ``mxfp6-e3m2``, ``mxfp4`` (OCP MX v1.0): block
  32, shared UE8M0 scale ``X = 2^(floor(log2 amax_block) - emax_elem)``
  (clamped to UE8M0's range; an all-zero block takes ``2^-127``), elements
  ``elem.encode(w / X)`` (values beyond the element maximum clamp). emax: E4M3 8,
  E2M3 2, E3M2 4, E2M1 2. Bits: ``elem_bits * numel + 8 * blocks``.
* ``nvfp4``: block 16, E2M1 elements, per-tensor FP32 scale
  ``s_t = amax_tensor / (6 * 448)``, block scale the E4M3 value of
  ``amax_block / 6 / s_t`` (golden ``ue4m3``, the non-negative half of E4M3; it
  is stored as the full E4M3 byte), elements ``e2m1.encode(w / (scale * s_t))``.
  Bits: ``4 * numel + 8 * blocks + 32``.
* ``nvfp4-46`` (Four over Six, arXiv 2512.02010, as in its reference code): per
  block, two candidate E4M3 scales, ``amax_block / 6 / s_t`` and
  ``amax_block / 4 / s_t``, with ``s_t = amax_tensor / (6 * 256)`` so that the
  larger one (at most 384) stays inside E4M3; the candidate with the lower block
  squared error is kept (ties keep the 6). No flag bit: same bits as ``nvfp4``.
* ``if4`` (IF4, arXiv 2603.28765): the NVFP4 scales (``s_t`` with 448, one E4M3
  block scale ``amax_block / 6 / s_t``); per block either E2M1 elements or INT4
  elements on the grid ``k * 6/7``, ``k = -7 .. 7`` (golden ``int4``, RNE, the
  argument ``w / scale * 7/6`` computed in float64, each operation rounded, and
  clipped to ±7 first: an argument within a few ulp of a half-integer may round
  otherwise than the exact quotient would; the value ``k * 6/7 * scale`` is not a float, so
  the reconstruction holds it correctly rounded to float64, ``if4_int_recon``),
  whichever has the lower block squared error
  (ties keep FP4). The choice is the sign bit of the scale byte, so bits are
  those of ``nvfp4``.
* ``nf4-g64`` (bitsandbytes NF4): block 64, FP32 absmax scale, each element the
  nearest entry of the *published* NF4 table (``golden.codebooks.NF4_VALUES``,
  not rounded into HIF, because bitsandbytes does not) to ``w / absmax``, by
  golden's ``round_to_table``. Bits: ``4 * numel + 32 * blocks``.

**Padding rule** (every block format): a row whose width is not a multiple of
the block size is padded with zeros to the next multiple. The padded elements
are stored, so their bits count (``numel`` above is then ``rows * padded
cols``), while ``QuantResult.bpw`` divides by the real number of weights; the
reconstruction has the original shape.

Non-finite weights are refused with a ``ValueError`` naming the layer, row and
column (``quantize.blockwise.as_weights``). The ``act_ms`` argument is
accepted for a common signature and ignored: these baselines are defined
without activation weighting.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from sop.golden.codebooks import NF4_VALUES
from sop.golden.formats import check_no_nan, get_format, round_to_table, table_midpoints
from sop.quantize.blockwise import as_weights, block_reduce, row_slices, run_chunks
from sop.quantize.result import QuantResult

FP32_BITS = 32
MX_BLOCK = 32
NV_BLOCK = 16
NF4_BLOCK = 64
E4M3_MAX_FOUROVERSIX = 256.0     # Four over Six's tensor-scale denominator (6 * 256)

#: MX name -> element format name (OCP MX v1.0 element types).
MX_ELEMENTS = {"mxfp8-e4m3": "e4m3", "mxfp6-e2m3": "e2m3", "mxfp6-e3m2": "e3m2", "mxfp4": "e2m1"}


def pad_to_block(w: np.ndarray, group: int) -> np.ndarray:
    """``w`` with each row zero-padded on the right to a multiple of ``group`` columns."""
    pad = (-w.shape[1]) % group
    return np.pad(w, ((0, 0), (0, pad))) if pad else w


def _blocks(w: np.ndarray, group: int) -> np.ndarray:
    """(rows, n_blocks, group) view of the zero-padded matrix."""
    wp = pad_to_block(w, group)
    return wp.reshape(w.shape[0], -1, group)


def _crop(blocks: np.ndarray, cols: int) -> np.ndarray:
    return blocks.reshape(blocks.shape[0], -1)[:, :cols]


def _fp32(x) -> np.ndarray:
    """Round to the FP32 value that is stored (exact in float64)."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


#: Weights per row chunk: every baseline computes its reconstruction chunk by
#: chunk into one float64 array, so its temporaries stay O(chunk), not O(layer).
CHUNK_WEIGHTS = 1 << 16


def _row_chunks(w: np.ndarray) -> list[slice]:
    """Row slices of about CHUNK_WEIGHTS weights (one empty slice for a layer without rows,
    so that the per-chunk code still runs and gives its outputs their dtypes)."""
    return row_slices(w.shape[0], w.shape[1], CHUNK_WEIGHTS) or [slice(0, 0)]


def block_max(m: np.ndarray) -> np.ndarray:
    """``m.max(axis=-1)``, the same bits, faster (``blockwise.block_reduce``)."""
    return block_reduce(m, np.maximum)


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _amax(w: np.ndarray) -> float:
    """``max |w|`` over the layer (0 for an empty one), chunk by chunk."""
    if not w.size:
        return 0.0
    return max(float(np.abs(_f64(w[sl])).max()) for sl in _row_chunks(w))


def _chunked(w: np.ndarray, fn) -> tuple[np.ndarray, list]:
    """(float64 reconstruction of ``w``'s shape, per-chunk extras in row order): ``fn(sl, out)``
    writes the reconstruction of rows ``sl`` into ``out`` (that slice of the result) and returns
    its extra; chunks run on blockwise's threads."""
    recon = np.empty(w.shape)
    chunks = _row_chunks(w)
    extras = [None] * len(chunks)

    def work(i):
        extras[i] = fn(chunks[i], recon[chunks[i]])

    run_chunks(work, list(range(len(chunks))))
    return recon, extras


def _out_blocks(out: np.ndarray, group: int) -> np.ndarray | None:
    """``out`` (rows, cols) as (rows, blocks, group) to write into, or None where the rows are
    padded (then the caller crops a block array into ``out``)."""
    return out.reshape(out.shape[0], -1, group) if out.shape[1] % group == 0 else None


def _put(out: np.ndarray, blocks: np.ndarray) -> None:
    out[...] = _crop(blocks, out.shape[1])


def _pct(mask: np.ndarray) -> str:
    return f"{100.0 * mask.mean():.1f}%" if mask.size else "0%"


# -- exact fast rounding -----------------------------------------------------------------------
# Speed without a second rule: golden's ``quantize`` (a binary search over exact midpoints per
# weight) is what every baseline means; the two helpers below give its bits with a handful of
# vectorized passes, and tests/test_quantize_speedpaths.py checks them against golden on every
# rounding boundary of each format (ties, subnormals, saturation, signed zeros).

def round_magnitude(a: np.ndarray, fmt, X: np.ndarray | None = None) -> np.ndarray:
    """``fmt.quantize(a)`` for a non-negative finite float32 or float64 ``a``, bit for bit, in place
    (``fmt`` a golden FloatFormat with subnormals and no Inf: round to nearest, ties to even,
    saturating). Every value of those formats is a float32, so ``a``'s dtype holds the result.

    ``|a|`` is clamped to the maximum first (saturation: the maximum is a value and rounding is
    monotone). Then with ``E = max(exponent of a, emin)`` the format's step at ``a`` is
    ``q = 2^(E - M)``, and ``c = 2^(E + p - M)`` (``p`` = 23 or 52 fraction bits) has an ulp of
    exactly ``q`` while ``a < c``: the IEEE sum ``a + c`` rounds ``a`` to a multiple of ``q``, to
    nearest, ties to the even multiple, and ``(a + c) - c`` is exact. An even multiple is an even
    mantissa, and a float format's code ends in its mantissa bit: golden's even code.

    ``X`` (powers of two broadcasting against ``a``), if given, scales the format: the result
    is ``quantize(a / X) * X``, computed as the rounding of ``a`` itself on the grid scaled by
    ``X`` (maximum ``max X``, fixed step below ``2^emin X``). The caller guarantees that
    ``2^emin X`` is a normal float and that ``c`` below cannot overflow."""
    it, mant, expo = ((np.int32, 23, 0x7F800000) if a.dtype == np.float32
                      else (np.int64, 52, 0x7FF0000000000000))
    np.minimum(a, fmt.max if X is None else fmt.max * X, out=a)
    c = a.view(it) & it(expo)                    # 2^exponent (0 for zeros and subnormals)
    c = c.view(a.dtype)
    # subnormals of the format: a fixed step
    np.maximum(c, 2.0 ** fmt.emin if X is None else 2.0 ** fmt.emin * X, out=c)
    c *= 2.0 ** (mant - fmt.mbits)
    a += c
    a -= c
    return a


def round_float(x: np.ndarray, fmt) -> np.ndarray:
    """``fmt.quantize(x)`` for a finite float32 or float64 ``x``, bit for bit, in ``x``'s dtype: the
    magnitude by ``round_magnitude``, the sign copied back (a negative ``x`` that rounds to zero
    gives -0, as golden's negative-zero code decodes)."""
    r = round_magnitude(np.abs(x), fmt)
    np.copysign(r, x, out=r)
    return r


class TableRound:
    """``round_to_table(x, values, codes)`` (golden's nearest entry, ties to the even code) for
    ``x`` in ``[-1, 1]``, bit for bit, by one look-up and one comparison per weight.

    The range is cut into ``2H`` cells; for each cell the table holds the code below the one
    exact midpoint (``table_midpoints``) within a window of the cell and its two neighbours
    (``base``), and a threshold ``thr``: the rounded midpoint where ``x`` equal to it goes down,
    the float below it where it goes up (a tie to an even code above, or a true midpoint below
    the rounded one), ``+Inf`` where the window holds no midpoint. Then the code is
    ``base + (x > thr)``, exactly golden's comparisons. The cell index ``floor((x + 1) H)``
    may be rounded by one cell at a cell edge, which the window absorbs. Needs every window
    to hold at most one midpoint (checked; else ``ok`` is False and callers use golden)."""

    def __init__(self, values, codes, H: int = 128):
        v = np.asarray(values, dtype=np.float64)
        codes = np.asarray(codes)
        m, r, _ = table_midpoints(v)
        self.H, self.values, self.codes = H, v, codes
        edges = np.arange(2 * H + 1) / H - 1.0                  # left edge of each cell
        lo, hi = edges - 1.0 / H, edges + 2.0 / H               # the window: cells c-1 .. c+1
        self.base = np.empty(2 * H + 1, dtype=np.intp)
        self.thr = np.full(2 * H + 1, np.inf)
        self.ok = True
        for c in range(2 * H + 1):                               # 257 cells: set-up, not weights
            inside = np.flatnonzero((m >= lo[c]) & (m < hi[c]))
            if len(inside) > 1:
                self.ok = False
                return
            j = inside[0] if len(inside) else np.searchsorted(m, edges[c], side="left")
            self.base[c] = j
            if len(inside):
                up = r[j] < 0 or (r[j] == 0 and (codes[j + 1] & 1) == 0)
                self.thr[c] = np.nextafter(m[j], -np.inf) if up else m[j]

    def index(self, x: np.ndarray) -> np.ndarray:
        """Position in ``values`` of the entry nearest each ``x`` (|x| <= 1)."""
        c = x + 1.0
        c *= self.H
        c = c.astype(np.intp)                  # x + 1 >= 0: truncation is the floor
        j = self.base[c]
        j += x > self.thr[c]
        return j


# -- per-layer and per-channel scales ------------------------------------------------------

def fp8_e4m3_pot(w, act_ms=None, name: str = "layer") -> QuantResult:
    """E4M3 with one power-of-two scale per layer (8.0 bpw); see the module docstring."""
    w = as_weights(name, w, 1)
    e4m3 = get_format("e4m3")
    amax = _amax(w)
    exp = int(np.ceil(np.log2(amax / e4m3.max))) if amax > 0 else 0
    if amax > 0 and amax / 2.0 ** exp > e4m3.max:
        exp += 1
    step = 2.0 ** exp

    def rows(sl, out):
        np.multiply(round_float(_f64(w[sl]) / step, e4m3), step, out=out)

    recon, _ = _chunked(w, rows)
    return QuantResult(recon, 8 * w.size + 8, choice=f"scale 2^{exp}", extra={"scale_exp": exp})


def int8_per_channel(w, act_ms=None, name: str = "layer") -> QuantResult:
    """Symmetric INT8 with an FP32 scale amax/127 per output row."""
    w = as_weights(name, w, 1)
    int8 = get_format("int8")

    def rows(sl, out):
        x = _f64(w[sl])
        amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
        scale = _fp32(amax / 127.0)
        scale = np.where(scale > 0, scale, 1.0)
        out[...] = int8.quantize(x / scale[:, None]) * scale[:, None]

    recon, _ = _chunked(w, rows)
    return QuantResult(recon, 8 * w.size + FP32_BITS * w.shape[0], choice="per-row")


# -- OCP MX ----------------------------------------------------------------------------------

def mx(w, element: str, act_ms=None, name: str = "layer") -> QuantResult:
    """OCP MX: block 32, UE8M0 shared scale 2^(floor(log2 amax) - emax), saturating elements."""
    w = as_weights(name, w, 1)
    elem, ue8m0 = get_format(element), get_format("ue8m0")

    # A float32 (or float16) layer is worked in float32: the elements w / X are exact there
    # (X is a power of two from 2^-127 to 2^127, so w * 2^(127 - code) is a float32 scaling
    # that neither overflows nor, above the smallest element step, underflows), and round_float
    # gives golden's bits in either width; only the products, exact in both, are float64.
    narrow = w.dtype.itemsize <= 4
    # largest code for which 2^(exponent + 23 - M) of every |w| <= max X stays a float32
    lim_code = 231 - elem.emax + elem.mbits

    def scales(amax):
        """(UE8M0 code, X, 1 / X) per block, X and 1 / X in amax's dtype."""
        if narrow:
            # floor(log2 amax) is the float32 exponent field less 127 where amax is a normal
            # float32; the codes then run from 1 - emax up, and X = 2^(code - 127) and its
            # inverse are float32 bit patterns. Zero or subnormal block maxima (code 0,
            # X = 2^-127 a subnormal) take frexp below.
            code = (amax.view(np.int32) >> 23) - elem.emax
            if code.size and 1 <= int(code.min()) and int(code.max()) <= 253:
                return code, (code << 23).view(np.float32), ((254 - code) << 23).view(np.float32)
        # floor(log2 amax) exactly: amax = m * 2^e with m in [0.5, 1)
        _, e = np.frexp(amax.astype(np.float64))
        shared = np.where(amax > 0, e - 1 - elem.emax, -ue8m0.bias)
        code = np.clip(shared + ue8m0.bias, 0, 254)          # 255 is NaN
        X = ue8m0.decode(code)
        inv = np.ldexp(np.float32(1), ue8m0.bias - code) if narrow else None
        return code, X.astype(amax.dtype), inv

    def rows(sl, out):
        blocks = _blocks(np.asarray(w[sl], dtype=np.float32 if narrow else np.float64), MX_BLOCK)
        mag = np.abs(blocks)
        code, X, inv = scales(block_max(mag))
        X = X[..., None]
        if narrow and code.size and 1 - elem.emin <= int(code.min()) and int(code.max()) <= lim_code:
            # |w| rounded on X's grid directly: the element grid scaled by the power of two X
            # (maximum max X, subnormal threshold 2^emin X, a float32 normal for these codes),
            # which is round_magnitude of |w| / X, times X, without the two products
            round_magnitude(mag, elem, X)
        else:
            if narrow:
                mag *= inv[..., None]
            else:
                mag /= X
            round_magnitude(mag, elem)                       # |w| / X rounded, sign below
            # element x X is exact in float32 too (down to 2^-136, a float32 subnormal)
            mag *= X
        ob = _out_blocks(out, MX_BLOCK)
        if ob is None:
            _put(out, np.copysign(mag, blocks))
        else:
            np.copysign(mag, blocks, out=ob)                 # the sign, and the float64 result
        return code.astype(np.int32)

    recon, codes = _chunked(w, rows)
    n_blocks = w.shape[0] * (-(-w.shape[1] // MX_BLOCK))
    bits = elem.bits * n_blocks * MX_BLOCK + 8 * n_blocks
    return QuantResult(recon, int(bits), choice=f"{element} x ue8m0/32",
                       extra={"scale_codes": np.concatenate(codes)})


# -- NVFP4 family ----------------------------------------------------------------------------

def _tensor_scale(w: np.ndarray, scale_max: float) -> float:
    """The FP32 per-tensor scale amax / (6 * scale_max); 1 for an all-zero tensor."""
    amax = _amax(w)
    return float(_fp32(amax / (6.0 * scale_max))) if amax > 0 else 1.0


def _e4m3_block_scale(amax_block: np.ndarray, target: float, s_t: float) -> np.ndarray:
    """Decoded E4M3 block scale for ``amax_block / target / s_t`` (golden ue4m3, saturating;
    a NaN, 0 / 0 where the tensor scale underflowed to 0, is refused as golden's encode does)."""
    x = amax_block / target / s_t
    check_no_nan(x, "encode to ue4m3")
    return round_float(x, get_format("ue4m3"))


def _safe(eff: np.ndarray) -> np.ndarray:
    """The per-block divisor: ``eff``, or 1 for a zero scale (whose block reconstructs to 0)."""
    return np.where(eff > 0, eff, 1.0)[..., None]


def _zero_blocks(r: np.ndarray, eff: np.ndarray) -> np.ndarray:
    """``r`` with the blocks of a zero scale set to +0 (in place)."""
    zero = eff == 0
    if zero.any():
        r[zero] = 0.0
    return r


def _e2m1_recon(blocks: np.ndarray, eff: np.ndarray, mag: np.ndarray | None = None) -> np.ndarray:
    """E2M1 elements under the effective scale ``eff`` (per block); a zero scale gives zeros.
    ``mag``, if given, is ``|blocks|`` already computed. The element of ``w`` is golden's
    ``quantize(w / s)``, sign-symmetric: the magnitude ``|w| / s`` (the same division) is
    rounded and the product ``q s`` takes ``w``'s sign, -0 included."""
    safe = _safe(eff)
    q = (np.abs(blocks) if mag is None else mag) / safe
    round_magnitude(q, get_format("e2m1"))
    q *= safe
    np.copysign(q, blocks, out=q)
    return _zero_blocks(q, eff)


def _write_choice(out: np.ndarray, group: int, pick: np.ndarray, r_pick: np.ndarray, r_else: np.ndarray) -> None:
    """``out`` = per block ``r_pick`` where ``pick`` else ``r_else`` (cropped where padded)."""
    ob = _out_blocks(out, group)
    if ob is None:
        _put(out, np.where(pick[..., None], r_pick, r_else))
        return
    np.copyto(ob, r_else)
    np.copyto(ob, r_pick, where=pick[..., None])


def nvfp4(w, act_ms=None, name: str = "layer") -> QuantResult:
    """NVFP4: E2M1, block 16, E4M3 block scale, FP32 tensor scale (4.5 bpw + 32 bits)."""
    w = as_weights(name, w, 1)
    s_t = _tensor_scale(w, get_format("e4m3").max)

    def rows(sl, out):
        blocks = _blocks(_f64(w[sl]), NV_BLOCK)
        mag = np.abs(blocks)
        eff = _e4m3_block_scale(block_max(mag), 6.0, s_t) * s_t
        _put(out, _e2m1_recon(blocks, eff, mag))

    recon, _ = _chunked(w, rows)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NV_BLOCK))
    return QuantResult(recon, int(4 * n_blocks * NV_BLOCK + 8 * n_blocks + FP32_BITS), choice="e2m1 x e4m3/16",
                       extra={"tensor_scale": s_t})


def nvfp4_46(w, act_ms=None, name: str = "layer") -> QuantResult:
    """Four over Six: NVFP4 with each block scaled to max 6 or max 4, lower block error wins."""
    w = as_weights(name, w, 1)
    s_t = _tensor_scale(w, E4M3_MAX_FOUROVERSIX)

    def rows(sl, out):
        blocks = _blocks(_f64(w[sl]), NV_BLOCK)
        mag = np.abs(blocks)
        amax = block_max(mag)
        r6 = _e2m1_recon(blocks, _e4m3_block_scale(amax, 6.0, s_t) * s_t, mag)
        r4 = _e2m1_recon(blocks, _e4m3_block_scale(amax, 4.0, s_t) * s_t, mag)
        pick4 = ((blocks - r4) ** 2).sum(axis=2) < ((blocks - r6) ** 2).sum(axis=2)
        _write_choice(out, NV_BLOCK, pick4, r4, r6)
        return pick4

    recon, picks = _chunked(w, rows)
    pick4 = np.concatenate(picks)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NV_BLOCK))
    return QuantResult(recon, int(4 * n_blocks * NV_BLOCK + 8 * n_blocks + FP32_BITS),
                       choice=f"max-4 on {_pct(pick4)} of blocks",
                       extra={"tensor_scale": s_t, "four": pick4})


def if4_int_recon(k: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """IF4's INT4 value ``k * 6/7 * scale``, correctly rounded to float64 (one rounding).

    ``k`` is an integer in -7 .. 7 and ``scale`` an E4M3 value (4 significant bits)
    times the FP32 tensor scale (24): at most 28 significant bits. So ``6 k`` (6 bits)
    times ``scale`` has at most 34 significant bits and is exact in float64 (no
    underflow: the product is 0 or above 2^-170), and the only rounding is the IEEE
    division by 7, correctly rounded. ``k * (6/7) * scale`` would round 6/7 first and
    miss the correctly rounded value on about 30 % of INT4 weights.

    Its float32 cast is the correctly rounded float32 of the exact value, too: the
    exact ``n 2^a / 7`` (``n`` < 2^34) is either a float64 (7 divides ``n``) or at
    least ``2^min(a, b) / 7`` from every float32 rounding midpoint ``c 2^b``, far more
    than the half float64 ulp it moves, so it never rounds onto one.
    """
    return np.asarray(k, dtype=np.float64) * 6.0 * scale / 7.0


def if4(w, act_ms=None, name: str = "layer") -> QuantResult:
    """IF4: per block FP4 (E2M1) or INT4 (k * 6/7) under one E4M3 scale, lower block error wins."""
    w = as_weights(name, w, 1)
    s_t = _tensor_scale(w, get_format("e4m3").max)

    def rows(sl, out):
        blocks = _blocks(_f64(w[sl]), NV_BLOCK)
        mag = np.abs(blocks)
        amax = block_max(mag)
        eff = _e4m3_block_scale(amax, 6.0, s_t) * s_t
        safe = _safe(eff)
        r_fp = _e2m1_recon(blocks, eff, mag)
        t = blocks / safe
        # golden int4 on [-7, 7]: the nearest integer, ties to the even code, which is the even
        # integer (np.rint); int4 has no -0, so the +0.0 turns rint's -0 into golden's +0
        k = np.clip(t * (7.0 / 6.0), -7.0, 7.0)
        np.rint(k, out=k)
        k += 0.0
        r_int = _zero_blocks(if4_int_recon(k, safe), eff)
        pick_int = ((blocks - r_int) ** 2).sum(axis=2) < ((blocks - r_fp) ** 2).sum(axis=2)
        _write_choice(out, NV_BLOCK, pick_int, r_int, r_fp)
        return pick_int

    recon, picks = _chunked(w, rows)
    pick_int = np.concatenate(picks)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NV_BLOCK))
    return QuantResult(recon, int(4 * n_blocks * NV_BLOCK + 8 * n_blocks + FP32_BITS),
                       choice=f"int4 on {_pct(pick_int)} of blocks",
                       extra={"tensor_scale": s_t, "int": pick_int})


# -- NF4 ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _nf4_round() -> TableRound:
    return TableRound(NF4_VALUES, np.arange(len(NF4_VALUES)))


def nf4_g64(w, act_ms=None, name: str = "layer") -> QuantResult:
    """bitsandbytes NF4: block 64, FP32 absmax, nearest entry of the published NF4 table."""
    w = as_weights(name, w, 1)
    table = np.array(NF4_VALUES, dtype=np.float64)
    look = _nf4_round()

    def rows(sl, out):
        blocks = _blocks(_f64(w[sl]), NF4_BLOCK)
        absmax = _fp32(block_max(np.abs(blocks)))
        safe = np.where(absmax > 0, absmax, 1.0)[..., None]
        x = blocks / safe                                     # in [-1, 1], but:
        if (absmax < np.finfo(np.float32).tiny).any():
            # a float64 block whose largest magnitude FP32 holds only as a subnormal rounds it by up to half
            # its last place, so |x| may pass 1: the nearest entry is then the end one (round_to_table's)
            np.clip(x, -1.0, 1.0, out=x)
        codes = look.index(x) if look.ok else round_to_table(x, table, np.arange(len(table)))
        ob = _out_blocks(out, NF4_BLOCK)
        if ob is not None:
            np.multiply(table[codes], safe, out=ob)
        else:
            _put(out, table[codes] * safe)
        return codes.astype(np.uint8)

    recon, codes = _chunked(w, rows)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NF4_BLOCK))
    bits = 4 * n_blocks * NF4_BLOCK + FP32_BITS * n_blocks
    return QuantResult(recon, int(bits), choice="nf4 x fp32/64",
                       extra={"codes": np.concatenate(codes)})     # uint8: 16 codes
