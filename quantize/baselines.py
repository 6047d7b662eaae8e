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
  argument clipped to ±7 first; the value ``k * 6/7 * scale`` is not a float, so
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

import numpy as np

from sop.golden.codebooks import NF4_VALUES
from sop.golden.formats import get_format, round_to_table
from sop.quantize.blockwise import as_weights, row_slices, run_chunks
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


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _amax(w: np.ndarray) -> float:
    """``max |w|`` over the layer (0 for an empty one), chunk by chunk."""
    if not w.size:
        return 0.0
    return max(float(np.abs(_f64(w[sl])).max()) for sl in _row_chunks(w))


def _chunked(w: np.ndarray, fn) -> tuple[np.ndarray, list]:
    """(float64 reconstruction of ``w``'s shape, per-chunk extras in row order): ``fn(sl)``
    returns the reconstruction of rows ``sl`` and its extra; chunks run on blockwise's threads."""
    recon = np.empty(w.shape)
    chunks = _row_chunks(w)
    extras = [None] * len(chunks)

    def work(i):
        recon[chunks[i]], extras[i] = fn(chunks[i])

    run_chunks(work, list(range(len(chunks))))
    return recon, extras


def _pct(mask: np.ndarray) -> str:
    return f"{100.0 * mask.mean():.1f}%" if mask.size else "0%"


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
    recon, _ = _chunked(w, lambda sl: (e4m3.quantize(_f64(w[sl]) / step) * step, None))
    return QuantResult(recon, 8 * w.size + 8, choice=f"scale 2^{exp}", extra={"scale_exp": exp})


def int8_per_channel(w, act_ms=None, name: str = "layer") -> QuantResult:
    """Symmetric INT8 with an FP32 scale amax/127 per output row."""
    w = as_weights(name, w, 1)
    int8 = get_format("int8")

    def rows(sl):
        x = _f64(w[sl])
        amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
        scale = _fp32(amax / 127.0)
        scale = np.where(scale > 0, scale, 1.0)
        return int8.quantize(x / scale[:, None]) * scale[:, None], None

    recon, _ = _chunked(w, rows)
    return QuantResult(recon, 8 * w.size + FP32_BITS * w.shape[0], choice="per-row")


# -- OCP MX ----------------------------------------------------------------------------------

def mx(w, element: str, act_ms=None, name: str = "layer") -> QuantResult:
    """OCP MX: block 32, UE8M0 shared scale 2^(floor(log2 amax) - emax), saturating elements."""
    w = as_weights(name, w, 1)
    elem, ue8m0 = get_format(element), get_format("ue8m0")

    def rows(sl):
        blocks = _blocks(_f64(w[sl]), MX_BLOCK)
        amax = np.abs(blocks).max(axis=2)
        # floor(log2 amax) exactly: amax = m * 2^e with m in [0.5, 1)
        _, e = np.frexp(amax)
        shared = np.where(amax > 0, e - 1 - elem.emax, -ue8m0.bias)
        code = np.clip(shared + ue8m0.bias, 0, 254)          # 255 is NaN
        X = ue8m0.decode(code)
        return _crop(elem.quantize(blocks / X[..., None]) * X[..., None], w.shape[1]), code

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
    """Decoded E4M3 block scale for ``amax_block / target / s_t`` (golden ue4m3, saturating)."""
    return get_format("ue4m3").quantize(amax_block / target / s_t)


def _e2m1_recon(blocks: np.ndarray, eff: np.ndarray) -> np.ndarray:
    """E2M1 elements under the effective scale ``eff`` (per block); a zero scale gives zeros."""
    safe = np.where(eff > 0, eff, 1.0)[..., None]
    q = get_format("e2m1").quantize(blocks / safe) * safe
    return np.where(eff[..., None] > 0, q, 0.0)


def nvfp4(w, act_ms=None, name: str = "layer") -> QuantResult:
    """NVFP4: E2M1, block 16, E4M3 block scale, FP32 tensor scale (4.5 bpw + 32 bits)."""
    w = as_weights(name, w, 1)
    s_t = _tensor_scale(w, get_format("e4m3").max)

    def rows(sl):
        blocks = _blocks(_f64(w[sl]), NV_BLOCK)
        eff = _e4m3_block_scale(np.abs(blocks).max(axis=2), 6.0, s_t) * s_t
        return _crop(_e2m1_recon(blocks, eff), w.shape[1]), None

    recon, _ = _chunked(w, rows)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NV_BLOCK))
    return QuantResult(recon, int(4 * n_blocks * NV_BLOCK + 8 * n_blocks + FP32_BITS), choice="e2m1 x e4m3/16",
                       extra={"tensor_scale": s_t})


def nvfp4_46(w, act_ms=None, name: str = "layer") -> QuantResult:
    """Four over Six: NVFP4 with each block scaled to max 6 or max 4, lower block error wins."""
    w = as_weights(name, w, 1)
    s_t = _tensor_scale(w, E4M3_MAX_FOUROVERSIX)

    def rows(sl):
        blocks = _blocks(_f64(w[sl]), NV_BLOCK)
        amax = np.abs(blocks).max(axis=2)
        r6 = _e2m1_recon(blocks, _e4m3_block_scale(amax, 6.0, s_t) * s_t)
        r4 = _e2m1_recon(blocks, _e4m3_block_scale(amax, 4.0, s_t) * s_t)
        pick4 = ((blocks - r4) ** 2).sum(axis=2) < ((blocks - r6) ** 2).sum(axis=2)
        return _crop(np.where(pick4[..., None], r4, r6), w.shape[1]), pick4

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
    int4 = get_format("int4")

    def rows(sl):
        blocks = _blocks(_f64(w[sl]), NV_BLOCK)
        amax = np.abs(blocks).max(axis=2)
        eff = _e4m3_block_scale(amax, 6.0, s_t) * s_t
        r_fp = _e2m1_recon(blocks, eff)
        safe = np.where(eff > 0, eff, 1.0)[..., None]
        k = int4.quantize(np.clip(blocks / safe * (7.0 / 6.0), -7.0, 7.0))
        r_int = np.where(eff[..., None] > 0, if4_int_recon(k, safe), 0.0)
        pick_int = ((blocks - r_int) ** 2).sum(axis=2) < ((blocks - r_fp) ** 2).sum(axis=2)
        return _crop(np.where(pick_int[..., None], r_int, r_fp), w.shape[1]), pick_int

    recon, picks = _chunked(w, rows)
    pick_int = np.concatenate(picks)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NV_BLOCK))
    return QuantResult(recon, int(4 * n_blocks * NV_BLOCK + 8 * n_blocks + FP32_BITS),
                       choice=f"int4 on {_pct(pick_int)} of blocks",
                       extra={"tensor_scale": s_t, "int": pick_int})


# -- NF4 ---------------------------------------------------------------------------------------

def nf4_g64(w, act_ms=None, name: str = "layer") -> QuantResult:
    """bitsandbytes NF4: block 64, FP32 absmax, nearest entry of the published NF4 table."""
    w = as_weights(name, w, 1)
    table = np.array(NF4_VALUES, dtype=np.float64)

    def rows(sl):
        blocks = _blocks(_f64(w[sl]), NF4_BLOCK)
        absmax = _fp32(np.abs(blocks).max(axis=2))
        safe = np.where(absmax > 0, absmax, 1.0)[..., None]
        codes = round_to_table(blocks / safe, table, np.arange(len(table)))
        return _crop(table[codes] * safe, w.shape[1]), codes.astype(np.uint8)

    recon, codes = _chunked(w, rows)
    n_blocks = w.shape[0] * (-(-w.shape[1] // NF4_BLOCK))
    bits = 4 * n_blocks * NF4_BLOCK + FP32_BITS * n_blocks
    return QuantResult(recon, int(bits), choice="nf4 x fp32/64",
                       extra={"codes": np.concatenate(codes)})     # uint8: 16 codes
