"""The golden dot-product engine: ``y = W x`` computed on a layer stream, bit for bit as hardware would.

Role: the bit-exact model the GEMV engine's RTL is built and checked against
(docs/dot.md has the derivations). Inputs: a ``golden.layout.LayerStream`` (the
matrix ``W``, ``rows x cols``, blocks of ``g`` along a row) and activations ``x``
whose values an activation format holds exactly: BF16 or FP8 E4M3
(``ACT_FORMATS``). Everything is integer significands and exponents, as in
``golden.decoder.product_fields``:

    HIF entry       h_j = (-1)^a_j * Sh_j * 2^Xh_j      (golden.decoder.float_fields)
    activation      x_j = (-1)^c_j * Sx_j * 2^Ex_j
    block scale     (-1)^s * Ss * 2^(Xs + offset)        (s: the header's sign bit)

Contract, per block ``b`` of row ``r`` and activation vector ``x``:

1. **Exact block sum.** ``A = sum_j (-1)^(a_j xor c_j) * Sh_j * Sx_j * 2^(Xh_j + Ex_j - L)``
   over the block's ``g`` weights, an integer: every product is aligned to the fixed
   LSB weight ``2^L``, ``L = min Xh + min Ex`` of the two formats. ``accumulator``
   gives the two's-complement width ``W`` that holds every such sum of every block
   (no overflow, no rounding: proven in docs/dot.md).
2. **One rounding per block.** ``V_b = RNE_fp32((-1)^s * A * Ss * 2^(L + Xs + offset))``:
   the exact scaled sum rounded once to IEEE binary32, to nearest, ties to even,
   subnormal results kept; a value beyond FLT_MAX **saturates** to +-FLT_MAX (the
   project's float32 rule, ``golden.formats.to_float32``). ``A = 0`` gives +0; a
   nonzero value that rounds to zero keeps its sign (IEEE).
3. **FP32 accumulation in block order.** ``y_r = (((+0 + V_0) + V_1) + ... + V_{n-1})``,
   each addition an IEEE binary32 addition rounded to nearest even, saturating at
   +-FLT_MAX (so no Inf or NaN from finite input). Starting from +0, ``y_r`` is never -0.
4. **Sparse residuals after the blocks.** Each residual entry ``(r, j, rho)`` of the
   row, in flat-index order (ascending ``j``), adds ``T = RNE_fp32(rho * x_j)`` (the
   product of two 8-bit significands is exact; one saturating rounding into FP32) to
   ``y_r`` with the same FP32 addition: the layer stream carries its sparse table
   after all the blocks, so an engine reading the stream in order meets them last.
5. **Non-finite activations** (NaN, +-Inf) are refused (``ValueError`` naming the
   element), as is any value the activation format does not hold exactly: the
   engine's input is finite activations by contract. The stream itself can hold
   nothing non-finite (``golden.layout.validate_stream``).

``x`` is ``(cols,)`` or ``(batch, cols)``; ``gemv`` returns ``(rows,)`` or
``(batch, rows)`` float32. ``block_values`` returns the rounded block values
``V`` themselves, ``(batch, rows, cols // g)``.

The exact sums are held as little-endian limbs of ``LIMB_BITS`` bits in int64 (the
wide accumulator, in software): no Python loop over weights or blocks; the only
loops are over limbs, over the blocks of a row (the sequential FP32 chain) and over
the residual entries of a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .decoder import float_fields
from .formats import FLOAT32_MAX, FORMATS, FloatFormat, exact_numpy, to_float32
from .layout import LayerStream, unpack_blocks, validate_stream


def _float_format(name: str) -> FloatFormat:
    fmt = FORMATS[name]
    assert isinstance(fmt, FloatFormat)
    return fmt


#: Activation formats the engine takes, by the name `sop gemv --x-format` uses.
ACT_FORMATS: dict[str, FloatFormat] = {name: _float_format(name) for name in ("bf16", "e4m3")}

#: Bits per limb of the software accumulator. A product significand (< 2^19: HIF M <= 10,
#: BF16's 8 bits) shifted by < 32 stays under 2^51; a limb sums at most 2g <= 128 such
#: pieces of < 2^32 (< 2^39), so every partial sum is an integer float64 and int64 hold exactly.
LIMB_BITS = 32
_LIMB_MASK = (1 << LIMB_BITS) - 1

#: FP32: 24 significand bits; the quantum of the smallest subnormal is 2^-149.
FP32_PRECISION = 24
FP32_MIN_QUANTUM_EXP = -149

#: Products per chunk of rows: the per-product int64 temporaries stay a few tens of MB.
CHUNK_PRODUCTS = 1 << 20


def exponent_range(fmt: FloatFormat) -> tuple[int, int]:
    """(smallest, largest) exponent ``X`` of a finite value ``S * 2^X`` of ``fmt`` (float_fields' X)."""
    top = (1 << fmt.ebits) - 1
    if fmt.specials == "ieee":
        top -= 1                                # the all-ones exponent is Inf / NaN
    low = 1 if fmt.subnormals else 0
    return low - fmt.bias - fmt.mbits, top - fmt.bias - fmt.mbits


@dataclass(frozen=True)
class Accumulator:
    """The block accumulator of one (HIF, activation format, block size): docs/dot.md, section 2.

    ``|A| < g * 2^product_bits * 2^span`` in units of ``2^lsb_exp``: ``bits`` (two's
    complement, sign included) holds every block sum exactly."""

    hif: str
    act: str
    group: int
    product_bits: int          # significand bits of HIF x activation: (M_h + 1) + (M_x + 1)
    lsb_exp: int               # L: the weight of the accumulator's LSB, 2^L
    span: int                  # (max Xh - min Xh) + (max Ex - min Ex): the alignment shifts 0 .. span

    @property
    def bits(self) -> int:
        return self.product_bits + self.span + int(math.log2(self.group)) + 1

    def describe(self) -> dict:
        return {"hif": self.hif, "act": self.act, "group": self.group, "product_bits": self.product_bits,
                "lsb_exp": self.lsb_exp, "span": self.span, "bits": self.bits}


def accumulator(hif: FloatFormat, act: FloatFormat, group: int) -> Accumulator:
    """The exact block accumulator for HIF entries times ``act`` activations, ``group`` per block."""
    if group & (group - 1) or group < 1:
        raise ValueError(f"block size {group} is not a power of two")
    h_lo, h_hi = exponent_range(hif)
    x_lo, x_hi = exponent_range(act)
    return Accumulator(hif.name, act.name, group, (hif.mbits + 1) + (act.mbits + 1), h_lo + x_lo,
                       (h_hi - h_lo) + (x_hi - x_lo))


def act_format(name_or_format) -> FloatFormat:
    """An activation format by its ``ACT_FORMATS`` name (or a ``FloatFormat``, as given)."""
    if isinstance(name_or_format, FloatFormat):
        return name_or_format
    try:
        return ACT_FORMATS[name_or_format]
    except KeyError:
        raise ValueError(f"unknown activation format {name_or_format!r}; valid: "
                         f"{', '.join(ACT_FORMATS)}") from None


def _where(pos: tuple, ndim: int) -> str:
    return f"x[{pos[-1]}]" if ndim == 1 else f"x[{pos[0]}, {pos[1]}]"


def _as_array(x) -> np.ndarray:
    if not isinstance(x, np.ndarray) and hasattr(x, "detach") and getattr(x, "is_floating_point", bool)():
        x = x.detach().cpu().double()       # exact for every torch float; numpy has no torch.bfloat16
    return np.asarray(x)


def activation_codes(x, act) -> np.ndarray:
    """The ``act`` codes of ``x`` (int64, same shape); ``ValueError`` naming the first element
    that is not finite or that ``act`` does not hold exactly. ``x`` is any float array: numpy's,
    ml_dtypes' (a ``bfloat16`` array) or a torch tensor (its ``bfloat16`` too, which numpy cannot take)."""
    fmt = act_format(act)
    given = _as_array(x)
    x = exact_numpy(given)                  # an ml_dtypes float (kind "V") as float32, which holds it
    if x.dtype.kind != "f":
        raise ValueError(f"activations must be floating point, got {given.dtype}")
    x64 = x.astype(np.float64)
    bad = ~np.isfinite(x64)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"activation {_where(pos, x.ndim)} = {float(x64[pos])} is not finite; the engine takes "
                         f"finite activations only")
    codes = fmt.encode(x64).astype(np.int64)
    back = fmt.decode(codes)
    bad = back != x64                          # -0.0 == 0.0: a signed zero is held (encode keeps the sign)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"activation {_where(pos, x.ndim)} = {float(x64[pos])!r} is not exactly representable "
                         f"in {fmt.name} (nearest: {float(back[pos])!r}); give values {fmt.name} holds exactly")
    return codes


# -- the exact block sums: limbs of a wide two's-complement integer --------------------------------------

def _propagate(limbs: np.ndarray) -> None:
    """Carry-normalize (n, L) int64 limbs in place: limbs 0 .. L-2 into [0, 2^LIMB_BITS), the top one signed."""
    for i in range(limbs.shape[1] - 1):
        carry = limbs[:, i] >> LIMB_BITS             # arithmetic shift: floor division, negatives too
        limbs[:, i] &= _LIMB_MASK
        limbs[:, i + 1] += carry


def _exact_sums(n: int, n_limbs: int, owner: np.ndarray, signed_sig: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """(n, n_limbs) limbs of ``sum over products p with owner[p] == i of signed_sig[p] * 2^shift[p]``.

    Each product's significand, shifted by ``shift % LIMB_BITS``, spans at most two limbs;
    ``np.bincount`` adds the pieces of every limb (integer partial sums below 2^53: exact)."""
    limb = shift // LIMB_BITS
    wide = np.abs(signed_sig) << (shift & (LIMB_BITS - 1))
    sign = np.where(signed_sig < 0, -1, 1)
    lo, hi = (wide & _LIMB_MASK) * sign, (wide >> LIMB_BITS) * sign
    key = owner * n_limbs + limb
    size = n * n_limbs
    sums = (np.bincount(key, weights=lo, minlength=size) + np.bincount(key + 1, weights=hi, minlength=size))
    limbs = sums[:size].astype(np.int64).reshape(n, n_limbs)
    _propagate(limbs)
    return limbs


def _rne_increment(round_bit: np.ndarray, sticky: np.ndarray, lsb: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even: add one ulp when above half, or at half with an odd LSB."""
    return round_bit & (sticky | lsb)


def round_to_float32(negative: np.ndarray, limbs: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """``(-1)^negative * M * 2^exp`` rounded once to binary32 (RNE, subnormals kept, saturating).

    ``M >= 0`` is given as (n, L) normalized limbs (each in [0, 2^LIMB_BITS)); ``exp`` is (n,).
    ``M = 0`` gives +0."""
    n, L = limbs.shape
    # two zero limbs above the top: the 64-bit window below may start at the first of them
    limbs = np.concatenate([limbs, np.zeros((n, 2), np.int64)], axis=1)
    nonzero = limbs != 0
    zero = ~nonzero.any(axis=1)
    top = limbs.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)          # highest nonzero limb
    rows = np.arange(n)
    bitlen = top * LIMB_BITS + np.frexp(limbs[rows, top].astype(np.float64))[1]   # frexp: exact below 2^53
    lead = bitlen - 1 + exp                                                  # exponent of M's leading bit
    quantum = np.maximum(lead - (FP32_PRECISION - 1), FP32_MIN_QUANTUM_EXP)
    t = quantum - exp                                                        # bits of M below the quantum
    rounds = t > 0
    # t <= 0: M < 2^24 (all of it in limb 0), exact. t > 0: the bits from t - 1 upward (the round
    # bit, then at most 24 kept bits) lie in one 64-bit window of two adjacent limbs. A round bit
    # beyond M's top (a value far below 2^-149) reads the zero limbs: kept 0, round bit 0, sticky.
    s = np.minimum(np.where(rounds, t - 1, 0), L * LIMB_BITS)
    li, off = s // LIMB_BITS, s % LIMB_BITS
    window = (limbs[rows, li].astype(np.uint64) | (limbs[rows, li + 1].astype(np.uint64) << np.uint64(32)))
    window >>= off.astype(np.uint64)
    round_bit = (window & np.uint64(1)).astype(bool)
    kept = (window >> np.uint64(1)).astype(np.int64)
    below_in_limb = (limbs[rows, li] & ((np.int64(1) << off) - 1)) != 0
    any_below = np.concatenate([np.zeros((n, 1), bool), np.logical_or.accumulate(nonzero, axis=1)], axis=1)
    sticky = below_in_limb | any_below[rows, li]
    kept = kept + _rne_increment(round_bit, sticky, (kept & 1).astype(bool))
    kept = np.where(rounds, kept, limbs[:, 0])
    # kept * 2^q is a binary32 value (kept <= 2^24), or beyond FLT_MAX; q is capped where any
    # nonzero kept is beyond it anyway, so that float64 never overflows
    q = np.minimum(np.where(rounds, quantum, exp), 2 * 128)
    magnitude = np.ldexp(kept.astype(np.float64), q.astype(np.int32))
    value = np.where(zero, 0.0, np.where(negative, -magnitude, magnitude))
    return to_float32(value)                                                 # exact, or saturating


# -- the engine -------------------------------------------------------------------------------------------

def _as_batch(x, cols: int, act) -> tuple[np.ndarray, bool]:
    x = _as_array(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"activations must be 1-D (cols,) or 2-D (batch, cols), got shape {x.shape}")
    if x.shape[-1] != cols:
        raise ValueError(f"activations have {x.shape[-1]} entries per vector, the layer has {cols} columns")
    codes = activation_codes(x, act)
    return (codes[None, :] if x.ndim == 1 else codes), x.ndim == 1


#: Whether ``_block_values`` takes the float64 route where it is exact (tests turn it off to check
#: the limb accumulator on every block).
FLOAT64_ROUTE = True
#: float64's range for the float64 route: the lowest LSB it holds (2^-1074, subnormal) and the power of
#: two every value must stay below (2^1024)
F64_LSB_MIN, F64_TOP = -1074, 1024


def float64_span(hif: FloatFormat, act: FloatFormat, group: int, scale_bits: int) -> int:
    """The widest exponent spread of a block's nonzero products (``max - min`` of their LSB
    exponents) for which ``|A| * Ss`` stays below 2^53, so float64 holds it and every partial
    sum exactly: each product is below 2^(hif significand + act significand bits) times its
    LSB weight, ``group`` of them add ``ceil(log2 group)`` bits, ``Ss`` its ``scale_bits``."""
    return 53 - (hif.mbits + 1) - (act.mbits + 1) - math.ceil(math.log2(group)) - scale_bits


def _block_values(stream: LayerStream, codes_x: np.ndarray, act: FloatFormat) -> np.ndarray:
    """(batch, rows, blocks per row) float32: ``V_b`` of every block and activation vector.

    Two routes to the same bits. Where a block's nonzero products span few enough binades
    that ``A * Ss`` fits in a float64 significand (``float64_span``, bounded by the block's
    HIF exponent spread plus the activations'), every product, every partial sum (a multiple
    of the smallest product's quantum below 2^53), the scale and the power of two are exact
    in float64, in any order: the block is a float64 matrix product, and its one rounding into
    binary32 is contract 2's. The other blocks (wide exponent spreads, rare in real layers)
    take the limb accumulator."""
    lay, g = stream.layout, stream.layout.group
    acc = accumulator(stream.hif, act, g)
    bpr = stream.cols // g
    batch = codes_x.shape[0]
    if not isinstance(lay.scale, FloatFormat):
        raise ValueError(f"scale format {lay.scale.name} is not a float format")
    scale_bits = lay.scale.mbits + 1
    n_limbs = (acc.bits + scale_bits) // LIMB_BITS + 2
    fast_span = float64_span(stream.hif, act, g, scale_bits)
    # per LUT entry: HIF sign, significand, exponent, value
    luts = np.asarray(stream.luts, dtype=np.int64)
    h_sign, h_sig, h_exp = float_fields(stream.hif, luts)
    h_value = np.where(h_sign == 1, -h_sig, h_sig) * np.ldexp(1.0, h_exp)
    # per activation: (bpr, batch, g), the block's columns; their exponent spread per block column
    x_sign, x_sig, x_exp = (f.reshape(batch, bpr, g).transpose(1, 0, 2)
                            for f in float_fields(act, codes_x))
    x_signed = np.where(x_sign == 1, -x_sig, x_sig)
    x_value = x_signed * np.ldexp(1.0, x_exp)
    x_shift = x_exp - acc.lsb_exp
    x_spread, x_zero = _spread(x_exp, x_sig != 0)                                  # (bpr, batch)
    out = np.empty((batch, stream.rows, bpr), np.float32)
    step = max(1, CHUNK_PRODUCTS // max(1, stream.cols * batch))
    for r0 in range(0, stream.rows, step):
        r1 = min(stream.rows, r0 + step)
        nr = r1 - r0
        headers, codes = unpack_blocks(lay, stream.blocks[r0 * bpr * lay.block_bytes:r1 * bpr * lay.block_bytes])
        scale_code, block_sign, select = lay.split_header(headers)
        entry = (select[:, None], codes)                                           # (nb, g)
        _, s_sig, s_exp = float_fields(lay.scale, scale_code)                      # (nb,)
        exp = acc.lsb_exp + s_exp + stream.offset
        h_spread, h_zero = _spread(h_exp[entry], h_sig[entry] != 0)                # (nb,)
        # float64 holds the scale and the value exactly only inside its exponent range: a block of a wide
        # scale format (ue11m4b1060) beyond it would give Inf, NaN (0 * Inf) or a lost sign there
        s_lsb = s_exp + stream.offset
        in_range = ((s_lsb >= F64_LSB_MIN) & (s_lsb + scale_bits <= F64_TOP) & (exp >= F64_LSB_MIN)
                    & (exp + acc.bits + scale_bits <= F64_TOP)).reshape(nr, bpr)
        # the float64 route: (bpr, rows, g) @ (bpr, g, batch), then the block's signed scale
        a = np.matmul(h_value[entry].reshape(nr, bpr, g).transpose(1, 0, 2), x_value.transpose(0, 2, 1))
        with np.errstate(over="ignore", under="ignore"):          # the blocks out of range are taken below
            scale = np.where(block_sign == 1, -1.0, 1.0) * np.ldexp(s_sig.astype(np.float64), s_lsb)
        scale = np.where(in_range.reshape(-1), scale, 0.0)
        v = a.transpose(2, 1, 0) * scale.reshape(nr, bpr)                          # (batch, rows, bpr)
        v = to_float32(np.where(v == 0, 0.0, v))                                   # A * Ss = 0: +0
        # the blocks float64 may not hold: their exact sums on limbs
        wide = ~(h_zero.reshape(nr, bpr)[None] | x_zero.T[:, None]) & (
            h_spread.reshape(nr, bpr)[None] + x_spread.T[:, None] > fast_span) | ~in_range[None] \
            | (not FLOAT64_ROUTE)
        n, r, b = np.nonzero(wide)
        if len(n):
            blk = r * bpr + b
            hs = h_sign[entry][blk]
            product = np.where(hs == 1, -h_sig[entry][blk], h_sig[entry][blk]) * x_signed[b, n]
            shift = h_exp[entry][blk] + x_shift[b, n]
            limbs = _exact_sums(len(n), n_limbs, np.repeat(np.arange(len(n)), g), product.reshape(-1),
                                shift.reshape(-1))
            negative = limbs[:, -1] < 0                                            # the accumulator's sign
            limbs[negative] = -limbs[negative]
            _propagate(limbs)                                                      # |A|
            limbs *= s_sig[blk][:, None]                                           # |A| * Ss, < 2^48 a limb
            _propagate(limbs)
            v[n, r, b] = round_to_float32(negative ^ (block_sign[blk] == 1), limbs, exp[blk])
        out[:, r0:r1, :] = v
    return out


def _spread(exponents: np.ndarray, nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over the last axis: ``max - min`` of the exponents of the nonzero entries, and whether
    there is none."""
    big = 1 << 40
    hi = np.where(nonzero, exponents, -big).max(axis=-1)
    lo = np.where(nonzero, exponents, big).min(axis=-1)
    none = ~nonzero.any(axis=-1)
    return np.where(none, 0, hi - lo), none


def block_values(stream: LayerStream, x, act="bf16") -> np.ndarray:
    """The rounded block values ``V_b``: (batch, rows, cols // g) float32 (batch 1 for a 1-D ``x``)."""
    fmt = act_format(act)
    validate_stream(stream)          # no NaN scale code, sorted sparse entries
    codes_x, _ = _as_batch(x, stream.cols, fmt)
    return _block_values(stream, codes_x, fmt)


def fp32_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IEEE binary32 addition, round to nearest even, saturating at +-FLT_MAX (finite in, finite out)."""
    with np.errstate(over="ignore"):
        s = np.add(a, b, dtype=np.float32)
    return np.clip(s, -np.float32(FLOAT32_MAX), np.float32(FLOAT32_MAX))


def accumulate_blocks(values: np.ndarray) -> np.ndarray:
    """``(((+0 + V_0) + V_1) + ...)`` along the last axis, in block order, by ``fp32_add``."""
    acc = np.zeros(values.shape[:-1], np.float32)
    for b in range(values.shape[-1]):
        acc = fp32_add(acc, values[..., b])
    return acc


def residual_terms(stream: LayerStream, x_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each sparse entry, its term ``RNE_fp32(rho * x_j)`` per vector: (batch, n_s))."""
    if not len(stream.sparse):
        return np.zeros(0, np.int64), np.zeros((x_values.shape[0], 0), np.float32)
    index = stream.sparse.index.astype(np.int64)
    rho = FORMATS["bf16"].decode(stream.sparse.value_bf16)
    # rho * x_j: two significands of at most 8 bits, exponents well inside float64's: exact in
    # float64, then one rounding into FP32 (saturating)
    return index // stream.cols, to_float32(rho[None, :] * x_values[:, index % stream.cols])


def add_residuals(y: np.ndarray, rows: np.ndarray, terms: np.ndarray) -> np.ndarray:
    """``y`` (batch, rows) with each row's terms added in entry order (ascending flat index)."""
    if not len(rows):
        return y
    y = y.copy()
    first = np.searchsorted(rows, rows, side="left")        # rows ascend: entries are sorted by flat index
    rank = np.arange(len(rows)) - first
    for k in range(int(rank.max()) + 1):                     # the k-th entry of every row, rows at once
        sel = rank == k
        y[:, rows[sel]] = fp32_add(y[:, rows[sel]], terms[:, sel])
    return y


def gemv(stream: LayerStream, x, act="bf16") -> np.ndarray:
    """``y = W x`` by the engine's arithmetic (module docstring): (rows,) or (batch, rows) float32."""
    fmt = act_format(act)
    validate_stream(stream)          # no NaN scale code, sorted sparse entries
    codes_x, one = _as_batch(x, stream.cols, fmt)
    y = accumulate_blocks(_block_values(stream, codes_x, fmt))          # (batch, rows)
    rows, terms = residual_terms(stream, fmt.decode(codes_x))
    y = add_residuals(y, rows, terms)
    return y[0] if one else y


def operating_point_accumulators() -> list[dict]:
    """The accumulator of every operating point and activation format (docs/dot.md's table)."""
    from .points import operating_points

    return [{"point": p.name, **accumulator(p.hif, fmt, p.layout.group).describe()}
            for p in operating_points().values() for fmt in ACT_FORMATS.values()]


# -- the RTL engine's block order ---------------------------------------------------------------------------

def tile_order(rows: int, blocks_per_row: int, tile: int) -> np.ndarray:
    """Block indices (``row * blocks_per_row + b``, golden.layout's order) in the order the GEMV
    engine (hdl/gemv.py, docs/dot.md section 8) takes them: row tiles of ``tile`` rows (the last
    one holds what is left), and within a tile, for each block column ``b``, that block of every
    row of the tile, rows ascending::

        for t0 in 0, tile, 2 tile, ...:
            for b in 0 .. blocks_per_row - 1:
                for r in t0 .. min(t0 + tile, rows) - 1:
                    block r * blocks_per_row + b

    Each row still meets its blocks in ascending ``b``, so ``y`` is ``gemv``'s bit for bit; ``tile``
    rows in turn keep a pipelined FP32 adder busy (one running sum per row of the tile)."""
    if rows < 1 or blocks_per_row < 1 or tile < 1:
        raise ValueError(f"rows ({rows}), blocks per row ({blocks_per_row}) and tile ({tile}) must be >= 1")
    out = []
    for t0 in range(0, rows, tile):
        tile_rows = np.arange(t0, min(rows, t0 + tile))
        out.append((tile_rows[None, :] * blocks_per_row + np.arange(blocks_per_row)[:, None]).reshape(-1))
    return np.concatenate(out)


def tiled_blocks(stream: LayerStream, tile: int) -> bytes:
    """The layer's packed blocks (``stream.blocks``, each block's bytes unchanged) in ``tile_order``."""
    bpr = stream.cols // stream.layout.group
    raw = np.frombuffer(stream.blocks, np.uint8).reshape(-1, stream.layout.block_bytes)
    return raw[tile_order(stream.rows, bpr, tile)].tobytes()


def tile_residuals(stream: LayerStream, tile: int) -> list[dict[str, np.ndarray]]:
    """Per row tile (``tile_order``'s), the sparse residual entries as the GEMV engine takes them
    after the tile's blocks: ``row`` (the layer's row), ``col``, ``value`` (BF16 code) and ``last``
    (set on each row's entry in the last round: its own last entry or the padding after it), in
    rounds: round ``i`` holds the ``i``-th entry of every row of the tile, rows ascending.
    Each row keeps its entries in ascending column (golden's order, step 4), then is padded to the
    tile's largest count (at least one) with entries ``rho = +0`` at column 0, which add exactly
    nothing (``y + (+-0) = y``: a row sum is never -0). So every row's ``last`` entry is in the last
    round, and the rows' sums leave in row order; the rounds cost no more than without the padding
    (each round is one turn of the engine's ring)."""
    index = stream.sparse.index.astype(np.int64)
    rows, cols = index // stream.cols, index % stream.cols
    values = np.asarray(stream.sparse.value_bf16, np.int64)
    out = []
    for t0 in range(0, stream.rows, tile):
        t1 = min(stream.rows, t0 + tile)
        bounds = np.searchsorted(rows, np.arange(t0, t1 + 1))
        rounds = max(1, int(np.diff(bounds).max()))
        # (tile rows, rounds): each row's entries, then +0 at column 0
        col = np.zeros((t1 - t0, rounds), np.int64)
        val = np.zeros((t1 - t0, rounds), np.int64)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            col[i, :hi - lo], val[i, :hi - lo] = cols[lo:hi], values[lo:hi]
        row = np.repeat(np.arange(t0, t1)[:, None], rounds, axis=1)
        last = np.zeros_like(col)
        last[:, -1] = 1
        out.append({k: a.T.reshape(-1) for k, a in (("row", row), ("col", col), ("value", val), ("last", last))})
    return out
