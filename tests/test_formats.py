"""golden.formats against ml_dtypes, exhaustively: every code, every midpoint, saturation, zeros.

``oracle_mismatches`` is the checker; the real tests assert it finds nothing, and
``test_oracle_catches_*`` show it finds an injected rounding or decoding bug.
"""

import dataclasses
import re
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from sop.golden import formats
from sop.golden.formats import FloatFormat, get_format
from sop.golden.hif import hif_format

# (our format, ml_dtypes type, storage dtype of the ml type's bits)
ORACLES = [
    ("e2m1", ml_dtypes.float4_e2m1fn, np.uint8),
    ("e2m3", ml_dtypes.float6_e2m3fn, np.uint8),
    ("e3m2", ml_dtypes.float6_e3m2fn, np.uint8),
    ("e4m3", ml_dtypes.float8_e4m3fn, np.uint8),
    ("e5m2", ml_dtypes.float8_e5m2, np.uint8),
    ("ue8m0", ml_dtypes.float8_e8m0fnu, np.uint8),
    ("bf16", ml_dtypes.bfloat16, np.uint16),
    # The parametric class covers ml_dtypes' IEEE-style 8-bit floats too.
    (FloatFormat(name="e4m3-ieee", bits=8, ebits=4, mbits=3, bias=7, specials="ieee"),
     ml_dtypes.float8_e4m3, np.uint8),
    (FloatFormat(name="e3m4-ieee", bits=8, ebits=3, mbits=4, bias=3, specials="ieee"),
     ml_dtypes.float8_e3m4, np.uint8),
]


def _fmt(f):
    return get_format(f) if isinstance(f, str) else f


def ml_decode(codes, ml_type, storage):
    with np.errstate(invalid="ignore"):          # NaN codes cast with a warning
        return np.asarray(codes, dtype=storage).view(ml_type).astype(np.float64)


def ml_encode(x, ml_type, storage):
    return np.asarray(x, dtype=np.float64).astype(ml_type).view(storage)


def probe_values(fmt) -> np.ndarray:
    """Every finite value, every midpoint between neighbours (the ties), points just
    either side of each midpoint, and values beyond the maximum; both signs."""
    v = np.unique(fmt.values[np.isfinite(fmt.values)])
    v = v[v >= 0]
    mid = (v[:-1] + v[1:]) / 2
    # ml_dtypes casts float64 through float32, so probes are float32 values (exact there).
    mid32 = mid.astype(np.float32)
    up, down = np.nextafter(mid32, np.float32(np.inf)), np.nextafter(mid32, np.float32(0))
    top = fmt.max * np.array([1.0001, 1.5, 2.0, 1e6, np.inf])
    pos = np.concatenate([v, mid, up, down, top,
                          [fmt.min_positive / 2, fmt.min_positive / 4]])
    return np.concatenate([pos, -pos]) if fmt.signed else pos


def oracle_mismatches(fmt, ml_type, storage) -> list[str]:
    """Differences between ``fmt`` and the ml_dtypes oracle, described."""
    problems = []
    codes = np.arange(1 << fmt.bits)
    ours, theirs = fmt.decode(codes), ml_decode(codes, ml_type, storage)
    same = (ours == theirs) & (np.signbit(ours) == np.signbit(theirs)) | (np.isnan(ours) & np.isnan(theirs))
    problems += [f"decode code {c}: {ours[c]} != {theirs[c]}" for c in codes[~same]]

    x = probe_values(fmt)
    if fmt.specials == "e8m0":
        # No zero: the oracle is defined from the minimum up; and ml_dtypes rounds a
        # float32-subnormal input (below 2^-126) by its exponent field alone.
        x = x[(x >= fmt.min_positive) & ((x >= 2.0 ** -126) | np.isin(x, fmt.values))]
    # ml_dtypes gives NaN/Inf beyond the range where we saturate: clip first (the documented rule).
    expect = ml_encode(np.clip(x, -fmt.max, fmt.max), ml_type, storage)
    got = fmt.encode(x)
    problems += [f"encode {xi!r}: {g} != {e}" for xi, g, e in zip(x, got, expect) if g != e]
    return problems


@pytest.mark.parametrize("name,ml_type,storage", ORACLES, ids=lambda o: getattr(o, "name", str(o)))
def test_format_matches_ml_dtypes_exhaustively(name, ml_type, storage):
    fmt = _fmt(name)
    assert oracle_mismatches(fmt, ml_type, storage) == []


def test_unsigned_e4m3_is_the_positive_half_of_e4m3fn():
    ue, e = get_format("ue4m3"), get_format("e4m3")
    np.testing.assert_array_equal(ue.values, e.values[:128])
    x = probe_values(ue)
    np.testing.assert_array_equal(ue.encode(x), e.encode(x))


class _TiesAwayFromZero(FloatFormat):
    """An injected bug: ties round away from zero instead of to the even code."""

    def encode(self, x):
        x = np.asarray(x, dtype=np.float64)
        nudged = x + np.sign(x) * np.abs(x) * 1e-12
        return super().encode(nudged)


def test_oracle_catches_wrong_tie_rounding():
    e2m3 = get_format("e2m3")
    broken = _TiesAwayFromZero(**{f.name: getattr(e2m3, f.name) for f in dataclasses.fields(e2m3)})
    problems = oracle_mismatches(broken, ml_dtypes.float6_e2m3fn, np.uint8)
    assert any("encode" in p for p in problems)


def test_oracle_catches_wrong_bias():
    e4m3 = get_format("e4m3")
    broken = dataclasses.replace(e4m3, bias=8)
    assert any("decode" in p for p in oracle_mismatches(broken, ml_dtypes.float8_e4m3fn, np.uint8))


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_int_formats(name):
    fmt = get_format(name)
    lo, hi = -(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1
    codes = np.arange(1 << fmt.bits)
    if name == "int4":   # decode of every code against ml_dtypes' int4
        ml = np.arange(-8, 8).astype(ml_dtypes.int4).astype(np.int64)
        np.testing.assert_array_equal(fmt.decode(np.arange(-8, 8) & 15), ml)
    np.testing.assert_array_equal(fmt.decode(codes), np.where(codes > hi, codes - (1 << fmt.bits), codes))
    x = np.concatenate([np.arange(lo - 3, hi + 3, 0.25), [np.inf, -np.inf, -0.0]])
    expect = np.clip(np.rint(x), lo, hi)        # numpy rint: round half to even
    np.testing.assert_array_equal(fmt.decode(fmt.encode(x)), expect)


# -- properties every format of the registry must have (no oracle needed) ---------------

@pytest.mark.parametrize("name", sorted(formats.FORMATS) + ["ue6m2", "e3m3b5", "ue4m4b3"])
def test_every_finite_code_round_trips_and_ties_go_to_even(name):
    fmt = get_format(name)
    codes = np.arange(1 << fmt.bits)
    v = fmt.decode(codes)
    fin = np.isfinite(v)
    back = fmt.encode(v[fin])
    np.testing.assert_array_equal(fmt.decode(back), v[fin])
    np.testing.assert_array_equal(np.signbit(fmt.decode(back)), np.signbit(v[fin]))
    vals = np.unique(v[fin])
    mids = (vals[:-1] + vals[1:]) / 2
    mids = mids[mids != 0]
    if fmt.ties == "even":
        assert (fmt.encode(mids) % 2 == 0).all()
    else:
        np.testing.assert_array_equal(fmt.decode(fmt.encode(mids)), vals[1:][vals[1:] != 0 ][-len(mids):])


def test_parametric_format_values_follow_the_formula():
    fmt = get_format("ue4m4")
    # largest: (2 - 2^-4) * 2^(15 - 7); smallest subnormal: 2^-4 * 2^(1 - 7)
    assert fmt.max == (2 - 2 ** -4) * 2 ** 8
    assert fmt.min_positive == 2.0 ** -10
    assert get_format("ue4m4b3").max == (2 - 2 ** -4) * 2 ** 12
    assert np.all(np.diff(fmt.values) > 0)


@pytest.mark.parametrize("E, M, lo, hi", [(2, 1, -1020, 1074), (4, 4, -1008, 1071), (11, 4, 1024, 1071)])
def test_a_parametric_bias_float64_cannot_hold_is_refused(E, M, lo, hi):
    """The ends of the bias range by hand: the top code's exponent (2^E - 1) - bias at most 1023, the
    smallest subnormal 2^(1 - bias - M) at least 2^-1074. Inside, every code is finite and every
    nonzero code nonzero; one past either end (and a bias past int32 or int64, which the exponent
    arithmetic once wrapped) is refused, naming the range."""
    for bias in (lo, hi):
        fmt = get_format(f"ue{E}m{M}b{bias}")
        assert np.isfinite(fmt.values).all() and (fmt.values[1:] > 0).all()
        assert fmt.min_positive == 2.0 ** (1 - bias - M) and fmt.max == (2 - 2.0 ** -M) * 2.0 ** ((1 << E) - 1 - bias)
    for bias in (lo - 1, hi + 1, 2 ** 32 + 1, 2 ** 63):
        with pytest.raises(ValueError, match=f"takes a bias from {lo} to {hi}$"):
            get_format(f"e{E}m{M}b{bias}")
    if E == 11:                                            # its default bias, 1023, is past the range
        with pytest.raises(ValueError, match="with bias 1023 its values do not fit float64"):
            get_format(f"e{E}m{M}")


def test_signed_zero_and_negative_underflow():
    e2m1 = get_format("e2m1")
    assert e2m1.encode(-0.0) == 0b1000
    assert e2m1.encode(-0.2) == 0b1000      # rounds to zero, keeps the sign
    assert e2m1.encode(0.25) == 0           # tie between 0 and 0.5: even code 0


@pytest.mark.parametrize("name", ["e3m0", "ue4m0", "e2m0b-3"])
def test_a_tie_beside_zero_goes_to_zero_in_a_format_without_mantissa_bits(name):
    # An outside probe: e3m0 took its tie between 0 and 2^-2 away from zero (code 1, odd), as E8M0's rule
    # does between two powers of two; zero's significand 0 is the even one, as every other format rounds
    # (e2m1's 0.25 above). The ties between two powers of two still go to the larger magnitude.
    fmt = get_format(name)
    lo, nxt = fmt.min_positive, 2 * fmt.min_positive
    x = np.array([lo / 2, (lo + nxt) / 2, np.nextafter(lo / 2, np.inf)])
    np.testing.assert_array_equal(fmt.decode(fmt.encode(x)), [0, nxt, lo])
    if fmt.signed:
        codes = fmt.encode(-x)
        np.testing.assert_array_equal(fmt.decode(codes), [-0.0, -nxt, -lo])
        assert np.signbit(fmt.decode(codes[0]))                # the tie's zero keeps the sign


@pytest.mark.parametrize("name, got", [("e8m23", "E = 8, M = 23"), ("ue0m0", "E = 0, M = 0"),
                                       ("e12m0", "E = 12, M = 0"), ("e1m16b3", "E = 1, M = 16")])
def test_a_parametric_name_past_the_sizes_says_the_sizes(name, got, capsys):
    """`sop codebook e8m23` said "unknown codebook or format 'e8m23'; ... or any eNmM": an eNmM whose
    sizes are out of range is named with the range (docs/formats.md, section 2)."""
    from sop.cli import main

    with pytest.raises(ValueError, match=f"format '{name}': a parametric .* takes E from 1 to 11, M from 0 to 15 "
                                         f"and E \\+ M at most 16, got {got}$"):
        get_format(name)
    assert main(["codebook", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sop: error: format '{name}': a parametric") and err.count("\n") == 1, err


def test_saturation():
    e4m3 = get_format("e4m3")
    assert e4m3.decode(e4m3.encode([1e30, -np.inf, 464.0, 470.0])).tolist() == [448, -448, 448, 448]


def bf16_neighbourhoods() -> np.ndarray:
    """Every finite float32 whose lower 16 bits are a BF16 value exactly, one float32 ulp either side of it or
    of the midpoint to the next, the midpoint (a tie) or a quarter of the way: each BF16 code's rounding
    boundaries, subnormals and the largest finite (which saturates above) among them."""
    lows = np.array([0, 1, 0x4000, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=np.uint32)
    bits = ((np.arange(1 << 16, dtype=np.uint32) << np.uint32(16))[:, None] | lows).reshape(-1)
    x = bits.view(np.float32)
    return x[np.isfinite(x)]


def test_the_float32_fast_path_of_bf16_is_the_table_encode():
    """``bf16_codes_of_float32`` (the bits) gives the table's codes (``FORMATS["bf16"].encode``) at every BF16
    code's boundaries and on random float32 values, and refuses what the table refuses or does not take."""
    bf16 = formats.FORMATS["bf16"]
    x = bf16_neighbourhoods()
    assert np.array_equal(formats.bf16_codes_of_float32(x), bf16.encode(x))
    r = np.random.default_rng(7).integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    r = r[np.isfinite(r)]
    assert np.array_equal(formats.bf16_codes_of_float32(r), bf16.encode(r))
    assert np.array_equal(formats.bf16_codes_of_float32(x.astype(">f4")), bf16.encode(x))   # either byte order
    for bad in (np.float32([1.0, np.nan]), np.float32([np.inf])):
        with pytest.raises(ValueError, match="a NaN or an infinity"):
            formats.bf16_codes_of_float32(bad)
    with pytest.raises(TypeError, match="float64 input"):
        formats.bf16_codes_of_float32(np.float64([1.0]))


def neighbours(x: np.ndarray) -> np.ndarray:
    """``x`` and the float64 either side of each value (np.nextafter both ways; float64's largest's is Inf)."""
    with np.errstate(over="ignore"):
        return np.concatenate([x, np.nextafter(x, -np.inf), np.nextafter(x, np.inf)])


def bf16_float64_boundaries() -> np.ndarray:
    """Every finite BF16 value, every midpoint between consecutive ones (the ties, subnormal ones and those
    beside zero included; exact in float64: 9 significant bits), each with its float64 neighbours; the
    saturation threshold (halfway from the largest finite to 2^128) and its neighbours; far past either end."""
    vals = formats.FORMATS["bf16"].values
    vals = np.unique(vals[np.isfinite(vals)])           # sorted, -0 and +0 as one
    mids = (vals[:-1] + vals[1:]) / 2
    big = float.fromhex("0x1.fep127")                   # (2 - 2^-7) 2^127, BF16's largest
    threshold = float.fromhex("0x1.ffp127")              # halfway to 2^128: IEEE would round it to Inf
    edges = np.array([threshold, 2.0 ** 128, 2.0 ** 1000, np.finfo(np.float64).max, np.inf,
                      2.0 ** -134, 2.0 ** -200, 2.0 ** -1074, 0.0])
    x = neighbours(np.concatenate([vals, mids, edges, -edges]))
    assert big in x and threshold in x and np.signbit(x[x == 0]).any() and 2.0 ** -134 in x
    return x


def random_float64_of_every_exponent(n: int) -> np.ndarray:
    """Random float64 of the whole exponent range (random bits, no NaN: far below BF16's smallest subnormal
    and far past its largest, float64 subnormals among them) and as many of BF16's own exponents and a few
    beyond (-160 to 140), random signs and fractions."""
    rng = np.random.default_rng(11)
    anywhere = rng.integers(0, 1 << 63, n, dtype=np.uint64) | (rng.integers(0, 2, n, dtype=np.uint64) << 63)
    anywhere = anywhere.view(np.float64)
    near = np.ldexp(rng.uniform(-1, 1, n), rng.integers(-160, 141, n))
    return np.concatenate([anywhere[~np.isnan(anywhere)], near])


def same_bits(a, b) -> bool:
    """Equal as float64 bit patterns: -0 is not +0."""
    return np.array_equal(np.asarray(a, np.float64).view(np.uint64), np.asarray(b, np.float64).view(np.uint64))


@pytest.mark.parametrize("inputs", [bf16_float64_boundaries, lambda: random_float64_of_every_exponent(1 << 18)],
                         ids=["boundaries", "random"])
def test_round_to_bf16_is_the_tables_quantize(inputs):
    """``round_to_bf16`` (the bits; the decoder's BF16 output) is ``FORMATS["bf16"].quantize`` (the table, the
    specification) bit for bit, signed zeros included, at every BF16 value, every midpoint, their float64
    neighbours, the saturation threshold, and random float64 of every exponent."""
    x = inputs()
    want = formats.FORMATS["bf16"].quantize(x)
    got = formats.round_to_bf16(x)
    bad = np.flatnonzero(want.view(np.uint64) != got.view(np.uint64))
    assert not bad.size, f"{len(bad)} differ, first {x[bad[0]].hex()}: {got[bad[0]].hex()}, table {want[bad[0]].hex()}"


def test_round_to_bf16_by_hand():
    """Cases worked out by hand: ties to the even significand (normal and subnormal, step 2^-133), the
    saturation (at and past the threshold, +-Inf), signed zeros of values below half the smallest subnormal,
    a NaN kept, and the input's shape (a 0-d array too)."""
    s = 2.0 ** -133                                     # BF16's smallest subnormal
    big = float.fromhex("0x1.fep127")
    x = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1.5 * s, 2.5 * s, 0.5 * s, -0.5 * s, np.nextafter(0.5 * s, 1),
         -0.0, 0.0, 2 ** -126 - 0.5 * s, float.fromhex("0x1.ffp127"), np.nextafter(float.fromhex("0x1.ffp127"), 0),
         -np.inf, 2.0 ** 1023]
    want = [1.0, 1 + 2 ** -6, -1.0, 2 * s, 2 * s, 0.0, -0.0, s,
            -0.0, 0.0, 2 ** -126, big, big, -big, big]
    assert same_bits(formats.round_to_bf16(np.array(x)), want)
    # a NaN of any payload stays NaN: one of low payload bits alone would lose them to the rounding (an
    # infinity), one of all-ones carry into the sign (-0)
    nans = np.array([0x7FF8 << 48, 0x7FF0_0000_0000_0001, 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64).view(np.float64)
    assert np.isnan(formats.round_to_bf16(nans)).all()
    assert formats.round_to_bf16(np.float64(1 + 2 ** -9)).shape == () and formats.round_to_bf16(1 + 2 ** -9) == 1.0
    assert same_bits(formats.round_to_bf16(np.full((2, 3), -1e-50))[:, ::2], np.full((2, 2), -0.0))


def test_bad_input_is_refused_clearly():
    e2m3 = get_format("e2m3")
    with pytest.raises(ValueError, match=r"NaN at position \(1, 2\)"):
        e2m3.encode(np.array([[0, 1, 2], [3, 4, np.nan]]))
    with pytest.raises(ValueError, match=r"negative value -2.0 at position 1; the format is unsigned"):
        get_format("ue4m4").encode([1.0, -2.0])   # a 1-D index as the NaN's is (it said "(1,)")
    with pytest.raises(ValueError, match=r"NaN at position 1;"):
        e2m3.encode([1.0, np.nan])
    with pytest.raises(ValueError, match="out of range"):
        e2m3.decode([64])
    with pytest.raises(ValueError, match=r"codes are integers, got 1.7 \(float64\)"):
        e2m3.decode([1.0, 1.7])                   # was read as code 1 (an outside review)
    assert e2m3.decode(np.array([1.0, 2.0])).tolist() == e2m3.decode([1, 2]).tolist() == [0.125, 0.25]
    with pytest.raises(ValueError, match=r"^encode to e2m3: complex input \(complex128\); the format holds real"):
        e2m3.encode([1 + 2j, 3])                  # was code of 1.0, the imaginary part dropped (an outside probe)
    with pytest.raises(ValueError, match="valid: .*e2m3.*ue4m4"):
        get_format("e9m9x")


@pytest.mark.parametrize("x", ["1.0", b"1.0", np.array(["1.0", "2"]), ["1.0", 2], np.array([1.0], dtype=object),
                               None, np.array([1, 2], dtype="timedelta64[s]")])
def test_encode_refuses_what_is_no_number(x):
    """A numeric string was parsed by numpy's cast (``encode("1.0")`` gave the code of 1.0), as were bytes,
    object arrays and dates (an outside probe): no number, a ``TypeError``; ml_dtypes arrays are numbers."""
    e2m3 = get_format("e2m3")
    with pytest.raises(TypeError, match=r"^encode to e2m3: non-numeric input \(.+\); the format encodes numbers"):
        e2m3.encode(x)
    bf16 = np.array([0.125, -7.5], dtype=ml_dtypes.bfloat16)
    assert e2m3.encode(bf16).tolist() == e2m3.encode([0.125, -7.5]).tolist()
    assert e2m3.encode(np.array([3, -8], dtype=ml_dtypes.int4)).tolist() == e2m3.encode([3.0, -8.0]).tolist()


def test_decode_names_what_it_was_given_when_it_is_no_code():
    """A bfloat16 array of codes was "codes are integers, got 1.0 (bfloat16)": 1.0 is a whole number, and
    the array's codes are its bits, which the message did not say; ml_dtypes' int4 codes were refused as
    no integers; an Inf code was an OverflowError from ``int`` (an outside probe)."""
    bf16, e2m1 = get_format("bf16"), get_format("e2m1")
    values = np.array([1.0, -2.5], dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"^bf16: codes are integers, got an array of bfloat16 values \(a bfloat16 "
                                        r"array's codes are its bits: \.view\(np\.uint16\)\)$"):
        bf16.decode(values)
    assert bf16.decode(values.view(np.uint16)).tolist() == [1.0, -2.5]        # the advice works
    with pytest.raises(TypeError, match=r"float8_e4m3fn values .*\.view\(np\.uint8\)"):
        e2m1.decode(np.array([1.0], dtype=ml_dtypes.float8_e4m3fn))
    assert e2m1.decode(np.array([1, 7], dtype=ml_dtypes.uint4)).tolist() == [0.5, 6.0]
    for codes, dtype in [(["1"], "<U1"), (np.array([1], dtype=object), "object"), ([b"1"], "|S1")]:
        with pytest.raises(TypeError, match=rf"^e2m1: codes are integers, got an array of dtype {re.escape(dtype)}$"):
            e2m1.decode(codes)
    for inf in (np.inf, -np.inf, np.nan):
        with pytest.raises(ValueError, match=rf"^e2m1: codes are integers, got {inf} \(float64\)$"):
            e2m1.decode([1.0, inf])


@pytest.mark.parametrize("name", ["e" + "9" * 5000 + "m1", "e4m" + "1" * 101, "e4m3b-" + "7" * 200])
def test_a_parametric_name_with_a_huge_number_is_one_line_naming_the_format(name, capsys):
    """A 5000-digit size was Python's own "Exceeds the limit (4300 digits) for integer string conversion",
    naming neither the format nor the rule."""
    from sop.cli import main

    with pytest.raises(ValueError, match=r"^format 'e.*: a number of \d+ digits in a parametric "):
        get_format(name)
    assert main(["codebook", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sop: error: format 'e") and err.count("\n") == 1 and len(err) < 200, err


# -- the docs' format tables against the field formula, every code ------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def field_values(bits: int, E: int, M: int, bias: int, specials: str, signed: bool) -> list:
    """Every code's value by the formula of docs/formats.md section 2, in exact rationals (None: NaN,
    "inf"/"-inf": Inf): ``(1 + m/2^M) 2^(e-b)``, subnormal ``(m/2^M) 2^(1-b)``; E8M0 ``2^(e-b)``."""
    out = []
    for code in range(1 << bits):
        m, e = code & ((1 << M) - 1), (code >> M) & ((1 << E) - 1)
        neg = signed and (code >> (E + M)) & 1
        top = e == (1 << E) - 1
        if specials == "ieee" and top:
            out.append(None if m else "-inf" if neg else "inf")
            continue
        if specials in ("fn", "e8m0") and top and m == (1 << M) - 1:
            out.append(None)
            continue
        if specials == "e8m0":
            mag = Fraction(2) ** (e - bias)
        else:
            mag = Fraction(m + (e > 0 and 1 << M), 1 << M) * Fraction(2) ** (max(e, 1) - bias)
        out.append((-mag if neg else mag, bool(neg)))
    return out


def _number(cell: str) -> Fraction:
    cell = cell.strip().strip("`")
    m = re.fullmatch(r"2\^\(?(-?\d+)\)?", cell)
    return Fraction(2) ** int(m[1]) if m else Fraction(cell)


def doc_table_problems(formats_md: str, hif_md: str) -> list[str]:
    """Where the format tables of docs/formats.md (sections 2 and 3) and docs/hif.md ("The format") are
    not what the field formula gives from their own columns, or not golden's formats, code for code."""
    problems = []

    def check(name: str, fmt, bits, E, M, bias, specials, signed, top=None, bottom=None):
        if (fmt.bits, fmt.ebits, fmt.mbits, fmt.bias, fmt.specials, fmt.signed) != (bits, E, M, bias, specials, signed):
            problems.append(f"{name}: doc row {(bits, E, M, bias, specials, signed)}, golden "
                            f"{(fmt.bits, fmt.ebits, fmt.mbits, fmt.bias, fmt.specials, fmt.signed)}")
            return
        want = field_values(bits, E, M, bias, specials, signed)
        for code, (w, g) in enumerate(zip(want, fmt.values)):
            same = (np.isnan(g) if w is None else g == np.inf if w == "inf" else g == -np.inf if w == "-inf"
                    else np.isfinite(g) and Fraction(g) == w[0] and bool(np.signbit(g)) == w[1])
            if not same:
                problems.append(f"{name}: code {code} is {g!r} in golden, {w} by the formula")
        finite = [w[0] for w in want if isinstance(w, tuple)]
        if top is not None and max(finite) != top:
            problems.append(f"{name}: the doc's largest value {top}, the formula's {max(finite)}")
        if bottom is not None and min(v for v in finite if v > 0) != bottom:
            problems.append(f"{name}: the doc's smallest value {bottom}, the formula's "
                            f"{min(v for v in finite if v > 0)}")

    def rows(text: str, head: str) -> list[list[str]]:
        start = text.index(head)
        lines = text[start:].splitlines()[2:]
        return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in
                lines[:next(i for i, ln in enumerate(lines) if not ln.startswith("|"))]]

    def kind(cell: str) -> str:
        return "ieee" if "ieee" in cell else "e8m0" if "0xFF" in cell else "fn" if "NaN" in cell else "finite"

    section_2 = rows(formats_md, "| name | bits | E | M | bias | specials | max |")
    for name, bits, E, M, bias, specials, top, bottom in section_2:
        if name.startswith("int"):
            continue
        check(name, get_format(name), int(bits), int(E), int(M), int(bias), kind(specials), True,
              _number(top), _number(bottom))
    for names, bits, E, M, bias, specials, _ in rows(formats_md, "| name | bits | E | M | bias | specials | use |"):
        for name in names.split(", "):
            Ei, Mi = (int(E), int(M)) if E else (int(name[2]), int(name[4]))     # "ue2m4, ...": from the names
            b = int(bias) if bias.lstrip("-").isdigit() else (1 << (Ei - 1)) - 1         # "2^(E-1)-1"
            check(name, get_format(name), int(bits), Ei, Mi, b, kind(specials), False)
    if "code 0 is 2^-127" in formats_md and get_format("ue8m0").values[0] != 2.0 ** -127:
        problems.append("ue8m0: code 0 is not 2^-127")
    for M, width, top, normal, sub in rows(hif_md, "| M | width | largest value"):
        hif = hif_format(int(M))
        check(hif.name, hif, int(width), 3, int(M), 5, "finite", True, _number(top), _number(sub))
        if min(v for v in hif.values if v >= 2.0 ** -4) != _number(normal):
            problems.append(f"{hif.name}: smallest normal is not {normal}")
    return problems


def test_the_docs_format_tables_are_the_field_formula_and_golden_code_for_code():
    """docs/formats.md sections 2 and 3 and docs/hif.md's table, every row: golden's format has the row's
    fields, each of its codes the formula's exact value (the scale formats and HIFs ml_dtypes lacks
    included), and the row's largest and smallest values are the formula's."""
    formats_md, hif_md = (DOCS / "formats.md").read_text(), (DOCS / "hif.md").read_text()
    assert doc_table_problems(formats_md, hif_md) == []
    # the check can fail: a wrong bias, a wrong largest value and a wrong subnormal in the docs are reported
    assert doc_table_problems(formats_md.replace("| e4m3 | 8 | 4 | 3 | 7 |", "| e4m3 | 8 | 4 | 3 | 8 |"), hif_md)
    assert doc_table_problems(formats_md.replace("| 57344 |", "| 61440 |"), hif_md)
    assert doc_table_problems(formats_md, hif_md.replace("| 6 | 10 | 7.9375 | 0.0625 | 2^-10 |",
                                                         "| 6 | 10 | 7.9375 | 0.0625 | 2^-11 |"))
