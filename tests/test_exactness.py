"""The rounding rule is exact for every float64 input and every table: checked against
rational arithmetic (``fractions.Fraction``), never against float differences.

``exact_nearest`` is the reference: the nearest table value by exact distance, ties
to the even code (to the larger magnitude for ``ties="away"``, but to a zero neighbour),
±Inf to the ends, the negative-zero code for a negative input whose nearest value is
zero. It is compared
with golden's ``round_to_table`` (and ``CodeTable.encode``) and with the quantizer's
``FastTable`` on

* tables without a zero entry (``±1/8, ±3/8, ...``; asymmetric; HIF codebooks),
  tables of arbitrary float64 values whose midpoints float64 cannot hold, spanning
  the whole float64 range, of neighbouring floats, of subnormals;
* every named format and fixed codebook;
* inputs across every binade (2^-1074 .. 2^1023, subnormals), both signs, ±0, ±Inf,
  the midpoints and their neighbouring floats.

``test_*_catches_*`` show the checks fail on the rule this replaced (float
differences ``x - lo`` against ``hi - x``) and on an injected FastTable bug.
"""

from bisect import bisect_left
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sop.golden.codebooks import Codebook, codebook_names, get_codebook
from sop.golden.formats import format_names, get_format, round_to_table, table_midpoints
from sop.golden.hif import DEFAULT_HIF
from sop.quantize.fast_table import FastTable

TINY = 5e-324
BIG = np.finfo(np.float64).max


# -- the reference ---------------------------------------------------------------------------------

def exact_nearest(x, values, codes, neg_zero=None, ties="even") -> np.ndarray:
    """Nearest entry by exact rational distance; see the module docstring."""
    vals = [Fraction(float(v)) for v in values]
    n = len(vals)
    out = []
    for xi in np.asarray(x, dtype=np.float64).ravel().tolist():
        if np.isinf(xi):
            i = n - 1 if xi > 0 else 0
        else:
            fx = Fraction(xi)
            j = bisect_left(vals, fx)
            cand = [c for c in (j - 1, j) if 0 <= c < n]
            dist = [abs(fx - vals[c]) for c in cand]
            best = [c for c, d in zip(cand, dist) if d == min(dist)]
            if len(best) == 1:
                i = best[0]
            else:
                lo, hi = best
                assert codes[lo] % 2 != codes[hi] % 2, "ambiguous tie rule for this table"
                # "away": the larger magnitude, but a tie beside zero goes to zero (its significand is even)
                up = codes[hi] % 2 == 0 if ties == "even" else vals[hi] == 0 or (xi > 0 and vals[lo] != 0)
                i = hi if up else lo
        c = int(codes[i])
        if neg_zero is not None and vals[i] == 0 and np.signbit(xi):
            c = neg_zero
        out.append(c)
    return np.array(out, dtype=np.int64).reshape(np.shape(x))


def probes(values, seed=0) -> np.ndarray:
    """Inputs across every binade and both signs, plus the table's own decision points."""
    rng = np.random.default_rng(seed)
    e = np.arange(-1074, 1024, 3)
    sweep = np.ldexp(1 + rng.random(e.size), e)                     # one value per third binade
    sweep = np.where(e < -1022, np.ldexp(1.0, e), sweep)            # subnormals: powers of two
    local = decision_points(values)
    fixed = [0.0, TINY, 2 * TINY, 3 * TINY, 1e-310, 2.0 ** -1022, 1e-300, 1e-18, 1e-5, 0.1, 1.0,
             1e5, 1e18, 1e300, BIG, np.inf]
    pos = np.concatenate([sweep, np.abs(local), fixed])
    return np.concatenate([pos, -pos, local])


def decision_points(values) -> np.ndarray:
    """The values, the (rounded) midpoints between neighbours, and the floats either side."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):                                # BIG's neighbour is Inf
        mid = (v[1:] + v[:-1]) / 2
        mid = np.where(np.isfinite(mid), mid, v[1:] / 2 + v[:-1] / 2)
        return np.concatenate([v, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf),
                               np.nextafter(v, np.inf), np.nextafter(v, -np.inf)])


def encode_table(values, codes=None, neg_zero=None):
    v = np.asarray(values, dtype=np.float64)
    assert np.all(v[1:] > v[:-1])                 # not np.diff: +-1.8e308 apart overflows
    return v, np.arange(len(v)) if codes is None else np.asarray(codes), neg_zero


def mismatches(rule, table, x, ties="even") -> np.ndarray:
    """Inputs where ``rule(x, values, codes, neg_zero, ties)`` differs from the exact reference."""
    v, c, nz = table
    got = np.asarray(rule(x, v, c, nz, ties)).astype(np.int64)
    want = exact_nearest(x, v, c, nz, ties)
    return x[got != want]


def _float_difference_rule(x, values, codes, neg_zero_code=None, ties="even"):
    """The rule this project used before: ties found by comparing rounded differences."""
    x = np.asarray(x, dtype=np.float64)
    n = len(values)
    hi_idx = np.clip(np.searchsorted(values, x, side="left"), 0, n - 1)
    lo_idx = np.clip(hi_idx - 1, 0, n - 1)
    lo, hi = values[lo_idx], values[hi_idx]
    with np.errstate(invalid="ignore", over="ignore"):
        d_lo, d_hi = x - lo, hi - x
    tie_hi = (codes[hi_idx] & 1) == 0 if ties == "even" else x > 0
    pick_hi = (d_hi < d_lo) | ((d_lo == d_hi) & tie_hi)
    out = np.where(pick_hi, codes[hi_idx], codes[lo_idx])
    if neg_zero_code is not None:
        out = np.where((np.where(pick_hi, hi, lo) == 0) & np.signbit(x), neg_zero_code, out)
    return out


# -- tables ----------------------------------------------------------------------------------------

ODD_EIGHTHS = (2 * np.arange(-8, 8) + 1) / 8                       # ±1/8, ±3/8, ... ±15/8: no zero
TABLES = {
    "odd-eighths": ODD_EIGHTHS,
    "asymmetric": np.array([-0.375, -0.125, 0.25, 0.5, 1.0]),        # midpoint 1/16 across zero
    "positive": np.array([0.125, 0.25, 0.75, 3.0]),
    "negative": np.array([-7.5, -2.0, -1.0 / 3, -1e-300]),
    # arbitrary float64 values: most midpoints are not float64 numbers; the ends overflow a sum
    "whole-range": np.array([-BIG, -1e300, -1.0 / 3, -3e-300, TINY, 2.5e-310, 1e-5, 0.1, 1.0 / 3,
                             1.0, np.pi, 1e300, 1.7e308, BIG]),
    # neighbouring floats: several rounded midpoints coincide
    "adjacent": 1.0 + np.arange(6) * np.finfo(np.float64).eps,
    "subnormal": np.array([-3, -1, 1, 2, 4, 7]) * TINY,
    "one-entry": np.array([0.375]),
    "zero-only": np.array([0.0]),
}


def random_table(seed, n=16):
    rng = np.random.default_rng(seed)
    v = np.ldexp(1 + rng.random(n), rng.integers(-1074, 1023, n)) * rng.choice([-1, 1], n)
    return np.unique(v)


@pytest.mark.parametrize("name", TABLES)
def test_nearest_is_exact_for_tables_without_zero_and_odd_values(name):
    v = TABLES[name]
    x = probes(v)
    for ties in ("even", "away"):
        assert mismatches(round_to_table, encode_table(v), x, ties).size == 0
    # codes that are not the positions (a permuted code assignment) and a neg-zero code
    codes = np.arange(len(v))[::-1]
    assert mismatches(round_to_table, encode_table(v, codes, neg_zero=99), x).size == 0


@pytest.mark.parametrize("seed", range(6))
def test_nearest_is_exact_for_random_float64_tables(seed):
    v = random_table(seed)
    assert mismatches(round_to_table, encode_table(v), probes(v, seed)).size == 0


def test_the_reported_case():
    # encode(-1e-18) on ±1/8, ±3/8, ...: -1/8, not +1/8 (the tie at 0 is not reached)
    v, c, _ = encode_table(ODD_EIGHTHS)
    got = v[round_to_table(np.array([-1e-18, 1e-18, -TINY, TINY]), v, c)]
    assert got.tolist() == [-0.125, 0.125, -0.125, 0.125]


def test_checker_catches_the_float_difference_rule():
    # The rule this replaced fails the same checks: tiny inputs against a zero-free table,
    # and midpoints float64 cannot hold.
    for name in ("odd-eighths", "asymmetric", "whole-range"):
        v = TABLES[name]
        bad = mismatches(_float_difference_rule, encode_table(v), probes(v))
        assert bad.size > 0, name
    assert -1e-18 in mismatches(_float_difference_rule, encode_table(ODD_EIGHTHS), probes(ODD_EIGHTHS))


@settings(max_examples=300, deadline=None)
@given(table=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=12),
       x=st.lists(st.floats(allow_nan=False), min_size=1, max_size=20))
@example(table=[1.7976931348623157e+308, -9.9792015476736e+291], x=[0.0])   # entries more than DBL_MAX apart
def test_nearest_is_exact_for_any_table_and_input(table, x):
    v = np.unique(np.array(table, dtype=np.float64) + 0.0)          # +0.0: one zero
    xs = np.concatenate([np.array(x, dtype=np.float64), decision_points(v)])
    for ties in ("even", "away"):
        assert mismatches(round_to_table, encode_table(v), xs, ties).size == 0


# -- the midpoints themselves ----------------------------------------------------------------------

@pytest.mark.parametrize("name", [*TABLES, "random-0", "random-1"])
def test_table_midpoints_are_the_rounded_exact_midpoints_with_the_sign_of_the_rest(name):
    v = TABLES[name] if name in TABLES else random_table(int(name[-1]))
    m, r, exact = table_midpoints(v)
    true = [(Fraction(a) + Fraction(b)) / 2 for a, b in zip(v[:-1].tolist(), v[1:].tolist())]
    assert m.tolist() == [float(t) for t in true]                   # CPython rounds Fractions to nearest
    assert r.tolist() == [(t > Fraction(mi)) - (t < Fraction(mi)) for t, mi in zip(true, m.tolist())]
    assert exact == (all(t == Fraction(mi) for t, mi in zip(true, m.tolist())) and len(set(m)) == len(m))


# -- every named format and codebook ---------------------------------------------------------------

def _reference_table(values):
    """(sorted distinct values, code of each, negative-zero code) read off a code table directly."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(v))
    uniq, first = np.unique(v[finite], return_index=True)          # first code of each value
    codes = finite[first]
    assert not np.signbit(v[codes][uniq == 0]).any()                # +0 before -0 in code order
    nz = np.flatnonzero(np.isfinite(v) & (v == 0) & np.signbit(v))
    return uniq, codes, int(nz[0]) if nz.size else None


@pytest.mark.parametrize("name", format_names())
def test_every_format_encodes_exactly(name):
    fmt = get_format(name)
    table = _reference_table(fmt.values)
    x = probes(table[0][::max(1, len(table[0]) // 512)])            # bf16: a sample of its decision points
    if not fmt.signed:
        x = x[~(x < 0)]
    v, c, nz = table
    np.testing.assert_array_equal(fmt.encode(x), exact_nearest(x, v, c, nz, fmt.ties))


def _codebooks():
    rng = np.random.default_rng(3)
    hif = DEFAULT_HIF.values[np.isfinite(DEFAULT_HIF.values) & (np.abs(DEFAULT_HIF.values) <= 1)
                             & (DEFAULT_HIF.values != 0)]
    pos = np.unique(hif[hif > 0])
    return ([get_codebook(n) for n in codebook_names() if n != "dd4"]
            + [Codebook.from_values("nozero", ODD_EIGHTHS / 2),
               Codebook.from_values("dd4-nozero", np.sort(rng.choice(hif, 16, replace=False))),
               Codebook.from_values("dd4-nozero-asym", np.concatenate([-pos[-3:], pos[-13:]]))])


@pytest.mark.parametrize("cb", _codebooks(), ids=lambda c: c.name)
def test_codebook_encode_and_fast_table_are_exact(cb):
    v, c, nz = _reference_table(cb.values)
    assert len(v) + (nz is not None) == len(cb.values), "a table with duplicate entries"
    x = probes(v)
    want = exact_nearest(x, v, c, nz)
    np.testing.assert_array_equal(cb.encode(x), want)
    ft = FastTable(cb)
    assert ft.exact                                                  # the grid path, not the fallback
    np.testing.assert_array_equal(ft.encode(x), want)
    np.testing.assert_array_equal(ft.values(x), cb.values[want])    # up to the sign of zero


@pytest.mark.parametrize("cb", _codebooks()[:3], ids=lambda c: c.name)
def test_fast_table_is_exact_for_any_memory_layout(cb):
    """Ties and zeros are fixed through flat views: a Fortran-ordered input (a transposed layer) made them
    copies, and the fixes were lost (a tie came back the grid's, -0 as +0)."""
    v, c, nz = _reference_table(cb.values)
    x = probes(v)
    x = x[:len(x) // 2 * 2]
    xt = x.reshape(2, -1).T                                          # Fortran-ordered, as x.T is
    want = exact_nearest(x, v, c, nz).reshape(2, -1).T
    ft = FastTable(cb)
    np.testing.assert_array_equal(ft.encode(xt), want)
    np.testing.assert_array_equal(ft.values(xt), cb.values[want])    # up to the sign of zero
    with pytest.raises(ValueError, match="NaN"):
        ft.values(np.array([0.5, np.nan]))


class _TiesFromTheGrid(FastTable):
    """An injected bug: a FastTable that answers ties and zeros from its grid, not from golden."""

    def _cells(self, t):
        j, hits = super()._cells(t)
        return j, hits[:0]


def test_fast_table_check_catches_a_grid_that_decides_ties():
    cb = Codebook.from_values("nozero", ODD_EIGHTHS / 2)
    v, c, nz = _reference_table(cb.values)
    x = probes(v)
    assert (_TiesFromTheGrid(cb).encode(x) != exact_nearest(x, v, c, nz)).any()
