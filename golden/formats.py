"""Number formats: the one definition of every element, scale, LUT and output format.

Every format here is a *code table*: a format of ``bits`` bits maps each code
``0 .. 2**bits - 1`` to one value (a float64, NaN for a NaN code). Decoding is a
table look-up; encoding is "nearest value in the table".

Contract (documented in docs/formats.md, tested exhaustively against ml_dtypes):

* ``decode(codes)`` is exact: every value of every format here is a float64.
* ``encode(x)`` rounds to the nearest representable value (decided exactly for
  every float64 ``x``, by comparison with exact midpoints), **ties to the even
  code** (to the larger magnitude for a float without mantissa bits, E8M0,
  where both neighbours have significand 1; a tie beside zero goes to zero), and
  **saturates**: anything beyond the largest finite value, ±Inf included, becomes ±max.
  It never returns a NaN or Inf code. A zero result keeps the sign of ``x`` where the
  format has a negative zero. NaN input raises ``ValueError`` naming the first NaN's
  position; a negative input to an unsigned format raises too. Input that is no number
  (a string, bytes, an object array) raises ``TypeError``.

Float formats are sign-magnitude, ``[sign][exponent E][mantissa M]``, with
value ``(1 + m/2^M) * 2^(e - bias)`` for ``e > 0`` and, where subnormals exist,
``(m/2^M) * 2^(1 - bias)`` for ``e == 0``. Special codes, by ``specials``:

* ``"finite"``: every code is a number (E2M1, E2M3, E3M2, UE4M4, HIF, ...).
* ``"fn"``: only the all-ones magnitude ``.1111.111`` is NaN (E4M3fn, UE4M3).
* ``"ieee"``: exponent all ones is Inf (mantissa 0) or NaN (E5M2, BF16).
* ``"e8m0"``: no sign, no mantissa, no zero (code 0 is ``2^-bias``), all ones NaN.

Integer formats are two's complement (INT4, INT8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

__all__ = [
    "CodeTable", "FloatFormat", "IntFormat", "FORMATS", "get_format",
    "format_names", "round_to_table", "table_midpoints", "ELEMENT_FORMATS", "SCALE_FORMATS", "OUTPUT_FORMATS",
]


def _code_dtype(bits: int):
    return np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32


def check_no_nan(x: np.ndarray, what: str) -> None:
    """Raise ValueError naming the first NaN of ``x`` (by multi-index), if any."""
    nan = np.isnan(x)
    if nan.any():
        raise ValueError(f"{what}: NaN at position {_position(np.argwhere(nan)[0])}; NaN cannot be encoded")


def _position(index) -> int | tuple[int, ...]:
    """An element's position for an error line: its index in a 1-D array, its multi-index otherwise."""
    pos = tuple(int(i) for i in index)
    return pos[0] if len(pos) == 1 else pos


def table_midpoints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The exact decision points of a sorted table: ``(m, r, exact)``.

    For neighbours ``lo < hi`` the true midpoint ``(lo + hi) / 2`` is a rational that
    float64 may not hold (``-1/8`` and ``3e-300``; two NF4 constants of different
    binades). It is kept as ``m = fl((lo + hi) / 2)`` (rounded to nearest) and the sign
    ``r`` of ``(lo + hi) / 2 - m``, both computed exactly:

    * TwoSum (Knuth) gives ``s = fl(lo + hi)`` and ``e = (lo + hi) - s`` exactly for any
      finite ``lo, hi`` whose sum does not overflow; then ``m = s / 2`` is the rounded
      midpoint (halving is exact) and ``r = sign(e)``.
    * Halving is inexact only for ``|s| < 2^-1021``; a sum that small is exact
      (both terms are multiples of 2^-1074, and so is every float below 2^-1021),
      so ``e = 0`` and ``r = sign(s - 2 m)``, itself exact. ``(s - 2m) + e`` covers both.
    * Where ``lo + hi`` overflows, both are huge, their halves are exact, and the
      midpoint is the (TwoSum) sum of the halves.

    ``m`` is non-decreasing (rounding is monotone). For a float ``x``: ``x > m``
    implies ``x > (lo + hi) / 2`` and ``x < m`` implies ``x <`` it (the true midpoint
    lies within half an ulp of ``m``, a neighbouring float a whole ulp), so only
    ``x == m`` needs ``r``. ``exact`` is True when every ``r`` is 0 and ``m`` is
    strictly increasing (every table of few-bit values): one search then decides.
    """
    v = np.asarray(values, dtype=np.float64)
    lo, hi = v[:-1], v[1:]

    def two_sum(a, b):
        s = a + b
        bb = s - a
        return s, (a - (s - bb)) + (b - bb)

    with np.errstate(over="ignore", invalid="ignore"):
        s, e = two_sum(lo, hi)
        m = s / 2
        r = np.sign((s - 2 * m) + e)
    over = ~np.isfinite(s)
    if over.any():
        m[over], e2 = two_sum(lo[over] / 2, hi[over] / 2)
        r[over] = np.sign(e2)
    exact = not r.any() and bool(np.all(m[1:] > m[:-1]))
    return m, r.astype(np.int8), exact


def exact_numpy(a: np.ndarray) -> np.ndarray:
    """An ml_dtypes array (``bfloat16``, ``float8_e4m3fn``, ``int4``: numpy's kind ``V``) as the numpy type
    that holds every value of it exactly, float32 or int64; any other array as it is."""
    if a.dtype.kind != "V":
        return a
    import ml_dtypes

    for info, to in ((ml_dtypes.finfo, np.float32), (ml_dtypes.iinfo, np.int64)):
        try:
            info(a.dtype)
        except (TypeError, ValueError):
            continue
        return a.astype(to)
    return a


def round_to_table(x: np.ndarray, values: np.ndarray, codes: np.ndarray,
                   neg_zero_code: int | None = None, ties: str = "even",
                   midpoints: tuple | None = None) -> np.ndarray:
    """Nearest entry of a table, ties to the even code, saturating at both ends.

    ``ties="away"`` sends ties to the larger magnitude instead: the rule for a
    float with no mantissa bits (E8M0), whose neighbours both have significand 1,
    so that "even" does not decide (IEEE 754 and ml_dtypes agree on this). A tie
    between zero and its neighbour (a parametric ``e3m0``'s 0 and 2^-2) goes to
    zero there too: its significand 0 is the even one.

    ``values`` must be sorted ascending and free of duplicates, NaN and Inf; ``codes``
    gives the code of each value. Where the nearest value is 0 and ``x`` carries a
    negative sign, ``neg_zero_code`` (if given) is returned instead.
    This is the single rounding rule of the project: element formats, scale
    formats, HIF and codebook assignment all use it.

    Exact for every float64 ``x`` and every table: ``x`` is compared with the exact
    midpoints of neighbouring values (``table_midpoints``, which ``midpoints`` may
    pass precomputed), never with rounded differences. The nearest value is the
    one above as many midpoints as lie strictly below ``x``; ``x`` equal to a
    midpoint is a tie. Beyond either end that count is 0 or ``n - 1``: saturation.
    """
    x = np.asarray(x, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("round_to_table: empty table")
    m, r, exact = table_midpoints(values) if midpoints is None else midpoints
    flat = x.reshape(-1)
    j = np.searchsorted(m, flat, side="left")             # midpoints with m < x
    # positions where x equals some rounded midpoint (none in a one-entry table)
    eq = np.flatnonzero(m[np.minimum(j, n - 2)] == flat) if n > 1 else j[:0]
    if eq.size and not exact:
        # Equal rounded midpoints, in order of the true ones: r < 0 (below x), at most
        # one r == 0 (a tie), then r > 0 (above x).
        xe = flat[eq]
        lo_i, hi_i = j[eq], np.searchsorted(m, xe, side="right")
        neg = np.concatenate([[0], np.cumsum(r < 0)])
        zero = np.concatenate([[0], np.cumsum(r == 0)])
        j[eq] += neg[hi_i] - neg[lo_i]
        eq = eq[zero[hi_i] > zero[lo_i]]
    if eq.size:                                            # ties between j and j + 1
        je = j[eq]
        if ties == "even":
            up = (codes[je + 1] & 1) == 0
        else:   # away from zero, but for a tie beside zero (significand 0, even: IEEE's choice too)
            up = np.where(values[je + 1] == 0, True, (flat[eq] > 0) & (values[je] != 0))
        j[eq] = je + up
    out = codes[j]
    if neg_zero_code is not None:
        z = np.searchsorted(values, 0.0)
        if z < n and values[z] == 0:
            out = np.where((j == z) & np.signbit(flat), neg_zero_code, out)
    return out.reshape(x.shape)


@dataclass(frozen=True)
class CodeTable:
    """A format given by the value of each of its ``2**bits`` codes."""

    name: str
    bits: int

    # -- to be provided by subclasses ------------------------------------
    def _values(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    signed: bool = field(default=True)

    # -- derived -----------------------------------------------------------
    @cached_property
    def values(self) -> np.ndarray:
        """float64 value of every code, NaN for NaN codes, ±Inf for Inf codes."""
        v = self._values().astype(np.float64)
        v.setflags(write=False)
        return v

    @cached_property
    def _encode_table(self):
        v = self.values
        finite = np.isfinite(v)
        codes = np.arange(len(v))[finite]
        vals = v[finite]
        # One entry per value. +0 sorts before -0, so the kept zero is the positive
        # one; the negative zero's code is remembered for negative inputs.
        order = np.lexsort((np.signbit(vals), vals))
        vals, codes = vals[order], codes[order]
        keep = np.concatenate([[True], np.diff(vals) != 0])
        neg = (vals == 0) & np.signbit(vals)
        neg_zero = int(codes[neg][0]) if neg.any() else None
        return vals[keep], codes[keep], neg_zero

    @cached_property
    def _midpoints(self):
        """``table_midpoints`` of the encode table, computed once."""
        return table_midpoints(self._encode_table[0])

    @property
    def max(self) -> float:
        """Largest finite value."""
        return float(self._encode_table[0][-1])

    @property
    def min_positive(self) -> float:
        """Smallest value above zero."""
        vals = self._encode_table[0]
        return float(vals[vals > 0][0])

    def decode(self, codes) -> np.ndarray:
        """Exact value of each code (float64); raises on codes out of range or not integers."""
        codes = np.asarray(codes)
        if codes.dtype.kind == "V":                     # an ml_dtypes array: it was "got 1.0 (bfloat16)"
            exact = exact_numpy(codes)
            if exact.dtype.kind == "f":                 # values, not codes: bfloat16 1.0 is the code 0x3f80
                raise TypeError(f"{self.name}: codes are integers, got an array of {codes.dtype} values (a "
                                f"{codes.dtype} array's codes are its bits: .view(np.uint{codes.dtype.itemsize * 8}))")
            codes = exact                               # int4, uint4: integers, as int64
        if codes.dtype.kind not in "iubf":              # strings, bytes, objects, dates: no codes at all
            raise TypeError(f"{self.name}: codes are integers, got an array of dtype {codes.dtype}")
        if codes.dtype.kind == "f":                     # a float array of whole numbers is taken, as an index would
            frac = ~np.isfinite(codes) | (codes != np.trunc(codes))     # (Inf was an OverflowError from int())
            if frac.any():
                raise ValueError(f"{self.name}: codes are integers, got {codes[frac].flat[0]} ({codes.dtype})")
        if codes.size and (codes.min() < 0 or codes.max() >= (1 << self.bits)):
            bad = codes[(codes < 0) | (codes >= (1 << self.bits))].flat[0]
            raise ValueError(f"{self.name}: code {int(bad)} is out of range 0..{(1 << self.bits) - 1}")
        return self.values[codes.astype(np.int64)]

    def encode(self, x) -> np.ndarray:
        """Round to nearest, ties to even code, saturating; see the module contract."""
        if np.iscomplexobj(x):          # numpy's cast drops the imaginary part with a warning alone
            raise ValueError(f"encode to {self.name}: complex input ({np.asarray(x).dtype}); the format holds "
                             f"real numbers")
        x = exact_numpy(np.asarray(x))  # (bfloat16, float8_*, int4: their values, exactly)
        if x.dtype.kind not in "biuf":  # numpy's cast parsed "1.0" and b"1.0", and took objects and dates
            raise TypeError(f"encode to {self.name}: non-numeric input ({x.dtype}); the format encodes numbers "
                            f"(bool, integer or float arrays)")
        x = x.astype(np.float64, copy=False)
        check_no_nan(x, f"encode to {self.name}")
        if not self.signed and (x < 0).any():
            pos = np.argwhere(x < 0)[0]
            raise ValueError(f"encode to {self.name}: negative value {float(x[tuple(pos)])!r} at position "
                             f"{_position(pos)}; the format is unsigned")
        vals, codes, neg_zero = self._encode_table
        return round_to_table(x, vals, codes, neg_zero, self.ties,
                              self._midpoints).astype(_code_dtype(self.bits))

    @property
    def ties(self) -> str:
        """Tie rule of ``encode``: "even" (the even code) or "away" (larger magnitude)."""
        return "even"

    def quantize(self, x) -> np.ndarray:
        """``decode(encode(x))``: the value ``x`` becomes in this format."""
        return self.decode(self.encode(x))


@dataclass(frozen=True)
class FloatFormat(CodeTable):
    """Sign-magnitude binary float with E exponent and M mantissa bits."""

    ebits: int = 0
    mbits: int = 0
    bias: int = 0
    specials: str = "finite"        # "finite" | "fn" | "ieee" | "e8m0"

    def __post_init__(self):
        if self.bits != int(self.signed) + self.ebits + self.mbits:
            raise ValueError(f"{self.name}: bits {self.bits} != sign + E + M")
        if self.specials not in ("finite", "fn", "ieee", "e8m0"):
            raise ValueError(f"{self.name}: unknown specials {self.specials!r}")
        if self.ebits < 1 or self.mbits < 0:
            raise ValueError(f"{self.name}: need at least one exponent bit")

    @property
    def ties(self) -> str:
        return "away" if self.mbits == 0 else "even"

    @property
    def subnormals(self) -> bool:
        return self.specials != "e8m0"

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value (the OCP MX ``emax``)."""
        return int(np.floor(np.log2(self.max)))

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal value."""
        return (0 if self.specials == "e8m0" else 1) - self.bias

    def _values(self) -> np.ndarray:
        E, M = self.ebits, self.mbits
        codes = np.arange(1 << self.bits, dtype=np.int64)
        m = codes & ((1 << M) - 1)
        e = (codes >> M) & ((1 << E) - 1)
        s = (codes >> (E + M)) & 1 if self.signed else np.zeros_like(codes)
        normal = np.ldexp((m + (1 << M)).astype(np.float64), (e - self.bias - M).astype(np.int32))
        if self.subnormals:
            sub = np.ldexp(m.astype(np.float64), np.full_like(e, 1 - self.bias - M).astype(np.int32))
            mag = np.where(e == 0, sub, normal)
        else:
            mag = normal
        e_all, m_all = (1 << E) - 1, (1 << M) - 1
        if self.specials == "ieee":
            mag = np.where(e == e_all, np.where(m == 0, np.inf, np.nan), mag)
        elif self.specials in ("fn", "e8m0"):
            mag = np.where((e == e_all) & (m == m_all), np.nan, mag)
        return np.where(s == 1, -mag, mag)


@dataclass(frozen=True)
class IntFormat(CodeTable):
    """Two's-complement (or unsigned) integer; the value is the integer itself."""

    def _values(self) -> np.ndarray:
        codes = np.arange(1 << self.bits, dtype=np.int64)
        if self.signed:
            codes = np.where(codes >= 1 << (self.bits - 1), codes - (1 << self.bits), codes)
        return codes.astype(np.float64)


def _fp(name, E, M, bias=None, signed=True, specials="finite") -> FloatFormat:
    bias = (1 << (E - 1)) - 1 if bias is None else bias
    return FloatFormat(name=name, bits=int(signed) + E + M, signed=signed,
                       ebits=E, mbits=M, bias=bias, specials=specials)


ELEMENT_FORMATS = {
    "e2m1": _fp("e2m1", 2, 1),
    "e2m3": _fp("e2m3", 2, 3),
    "e3m2": _fp("e3m2", 3, 2),
    "e4m3": _fp("e4m3", 4, 3, specials="fn"),
    "e5m2": _fp("e5m2", 5, 2, specials="ieee"),
    "int4": IntFormat(name="int4", bits=4),
    "int8": IntFormat(name="int8", bits=8),
}

SCALE_FORMATS = {
    "ue8m0": _fp("ue8m0", 8, 0, bias=127, signed=False, specials="e8m0"),
    "ue4m3": _fp("ue4m3", 4, 3, signed=False, specials="fn"),
    "ue4m4": _fp("ue4m4", 4, 4, signed=False),
    "ue5m3": _fp("ue5m3", 5, 3, signed=False),
    # 6-bit magnitudes for the 8-bit SOP4 header (selection + sign + scale).
    "ue3m3": _fp("ue3m3", 3, 3, signed=False),
    "ue2m4": _fp("ue2m4", 2, 4, signed=False),
    "ue4m2": _fp("ue4m2", 4, 2, signed=False),
    "ue5m1": _fp("ue5m1", 5, 1, signed=False),
}

OUTPUT_FORMATS = {
    "bf16": _fp("bf16", 8, 7, specials="ieee"),
}

FORMATS = {**ELEMENT_FORMATS, **SCALE_FORMATS, **OUTPUT_FORMATS}

_PARAMETRIC = re.compile(r"^(?P<u>u)?e(?P<E>\d+)m(?P<M>\d+)(?:b(?P<bias>-?\d+))?$")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def to_float32(x) -> np.ndarray:
    """``x`` rounded to float32, to nearest, ties to even, **saturating**: the float32 output rule.

    The float32 files the project writes (``sop dequantize``, the ``f32`` records of
    a ``.sopq``) follow the rule of the BF16 output: a finite value beyond the largest
    float32 becomes +-FLT_MAX, never Inf, so a finite input never becomes a
    non-finite output. NaN stays NaN (no quantizer output is one)."""
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        y = x.astype(np.float32)
    over = np.isinf(y)
    if over.any():
        over &= np.isfinite(x)
        y[over] = np.copysign(np.float32(FLOAT32_MAX), x[over])
    return y


def bf16_codes_of_float32(x) -> np.ndarray:
    """``FORMATS["bf16"].encode(x)`` of a finite float32 array, computed on its bits: the upper 16 rounded to
    nearest on the lower 16, ties to even, saturating at BF16's largest finite (the codes are BF16's bit
    patterns, so a float32 ``f`` is ``(code << 16)`` viewed as float32). The same codes as the table's
    ``encode`` (tests/test_formats.py: every BF16 value's float32 neighbours, ties and subnormals), a hundred
    times faster: a model's tensors in BF16 (``sop dequantize --model-folder --dtype bfloat16``). A NaN or an
    infinity is a ValueError (``encode`` refuses a NaN; what a non-finite value becomes is its caller's rule)."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize != 4:
        raise TypeError(f"bf16_codes_of_float32: {x.dtype} input; the bits are float32's")
    x = x.astype(np.float32, copy=False)        # this machine's byte order
    if not np.isfinite(x).all():
        raise ValueError("bf16_codes_of_float32: a NaN or an infinity; the rounding is of finite values")
    u = x.view(np.uint32)
    # a finite float32's bits plus 0x8000 stay below 2**32: no wrap (the largest, 0xFF7FFFFF, gives 0xFF807FFF)
    codes = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    over = (codes & np.uint16(0x7FFF)) == np.uint16(0x7F80)       # rounded up past the largest finite
    codes[over] = (codes[over] & np.uint16(0x8000)) | np.uint16(0x7F7F)
    return codes


#: BF16's largest finite value, (2 - 2^-7) * 2^127, where ``round_to_bf16`` saturates
BF16_MAX = float.fromhex("0x1.fep127")
#: BF16's smallest normal, 2^-126: below it the step is the subnormals' 2^-133
_BF16_MIN_NORMAL = float.fromhex("0x1p-126")
#: float64's 52 fraction bits less BF16's 7: the bits a normal BF16 rounding drops
_DROPPED = np.uint64(52 - 7)
#: added to |x| (< 2^-126) it puts the float64 sum's last bit at 2^-133 (2^-81 / 2^52): float64's own
#: rounding of the sum is then the rounding to BF16's subnormal step, to nearest, ties to even
_SUBNORMAL_SHIFTER = float.fromhex("0x1p-81")


def round_to_bf16(x) -> np.ndarray:
    """``FORMATS["bf16"].quantize(x)`` of float64 values, computed on their bits: the same values as the
    table's rounding (to nearest, ties to even, BF16's subnormals kept, everything past BF16's largest finite
    ``BF16_MAX`` saturated to it, +-Inf included; a value that rounds to zero keeps its sign, -0 stays -0),
    without its search: the golden decoder's ``"bf16"`` output. A NaN stays NaN (the table refuses one; the
    decoder's NaN scale code makes one). tests/test_formats.py checks it against the table: every BF16 value,
    every midpoint, their float64 neighbours, the saturation threshold, random values of every exponent.

    A float64 of magnitude at least 2^-126 rounds as a BF16 normal: its fraction's low 45 bits rounded
    away (adding 2^44 - 1 and the kept last bit, the classic round-half-even on bits; a carry into the
    exponent is the next binade's 1.0, and past float64's largest it is Inf, saturated below). The sign
    bit is never reached. A smaller one (and a NaN, which no comparison holds) rounds by the float64 sum
    ``|x| + 2^-81``, whose ulp is BF16's subnormal step 2^-133."""
    x = np.asarray(x, dtype=np.float64)
    shape, x = x.shape, x.reshape(-1)               # (a 0-d array has no array to write into)
    u = x.view(np.uint64)
    half = np.uint64((1 << int(_DROPPED - np.uint64(1))) - 1)
    kept = np.uint64(0xFFFF_FFFF_FFFF_FFFF) << _DROPPED
    out = ((u + half + ((u >> _DROPPED) & np.uint64(1))) & kept).view(np.float64)
    small = ~(np.abs(x) >= _BF16_MIN_NORMAL)        # below BF16's normals, or NaN
    if small.any():
        t = x[small]
        with np.errstate(invalid="ignore"):         # a signalling NaN's addition: NaN it stays
            out[small] = np.copysign((np.abs(t) + _SUBNORMAL_SHIFTER) - _SUBNORMAL_SHIFTER, t)
    return np.clip(out, -BF16_MAX, BF16_MAX, out=out).reshape(shape)


def bf16_codes_of_float64(x) -> np.ndarray:
    """``FORMATS["bf16"].encode(x)`` of finite float64 values (BF16's bit patterns), from ``round_to_bf16`` (the
    table's values, on the bits): a BF16 value is exact in float32, and its code is the upper half of the float32
    bits (tests/test_export_dtype.py: the same codes as the table's at every BF16 value, midpoint and
    neighbour)."""
    return (round_to_bf16(x).astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def format_names() -> list[str]:
    return sorted(FORMATS)


class UnknownFormat(ValueError):
    """No format of that name (a parametric name whose sizes or bias float64 cannot hold is a plain
    ValueError)."""


def get_format(name: str) -> CodeTable:
    """A format by name: a named one, or parametric ``[u]e<E>m<M>[b<bias>]``.

    Parametric formats have every code finite (no Inf/NaN), subnormals, and the
    bias ``2^(E-1) - 1`` unless ``b<bias>`` is given; ``u`` drops the sign bit. A
    bias whose values float64 cannot hold (past 2^1024, or a nonzero code below
    2^-1074) is refused, and so is E = 11 with its default bias.
    """
    key = name.lower()
    if key in FORMATS:
        return FORMATS[key]
    m = _PARAMETRIC.match(key)
    if m:
        long = next((t for t in (m["E"], m["M"], m["bias"]) if t is not None and len(t.lstrip("-")) > 100), None)
        if long is not None:            # (int() of a 5000-digit text is Python's own error, naming no format)
            raise ValueError(f"format {name[:40]!r}{'...' if len(name) > 40 else ''}: a number of {len(long)} "
                             f"digits in a parametric [u]e<E>m<M>[b<bias>], past every size and bias")
        E, M = int(m["E"]), int(m["M"])
        if not (1 <= E <= 11 and M <= 15 and E + M <= 16):       # it was "unknown", beside "or any eNmM"
            raise ValueError(f"format {name!r}: a parametric [u]e<E>m<M> takes E from 1 to 11, M from 0 to 15 "
                             f"and E + M at most 16, got E = {E}, M = {M}")
        bias = (1 << (E - 1)) - 1 if m["bias"] is None else int(m["bias"])
        # every code a finite float64, the smallest nonzero one too: top exponent (2^E - 1) - bias at
        # most 1023, the smallest subnormal 2^(1 - bias - M) at least 2^-1074
        lo, hi = (1 << E) - 1 - 1023, 1075 - M
        if not lo <= bias <= hi:
            raise ValueError(f"format {name!r}: with bias {bias} its values do not fit float64 (every code "
                             f"finite and nonzero); e{E}m{M} takes a bias from {lo} to {hi}")
        return _fp(key, E, M, bias=bias, signed=not m["u"])
    raise UnknownFormat(f"unknown format {name!r}; valid: {', '.join(format_names())}, "
                     f"or parametric [u]e<E>m<M>[b<bias>] (for example ue4m4b7)")
