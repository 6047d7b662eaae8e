"""DD4: a per-layer 16-entry codebook fitted to the layer, held in the LUT like any other table.

``fit_dd4(w, act_ms)`` returns ``Codebook.from_values("dd4", levels)``: the levels
are rounded into HIF by golden.codebooks (the one rounding rule), so the table the
search evaluates is exactly the LUT image the decoder will hold.

The fit is activation-weighted Lloyd-Max (k-means in one dimension) on the
block-normalized values, alternated with the block assignment (``a_j`` below is
the error weight of column ``j``, its activation mean square, or 1; docs/sop.md writes it ``a_j^2``):

1. *assign*: encode the layer with the current table (quantize.blockwise, the
   same per-block sign and scale search as the final encode); every weight gets a
   signed block scale ``s`` and a code;
2. *refit*: each level becomes the weighted mean of the normalized values
   ``y = w / s`` assigned to it, weight ``a_j * s^2``. That is the exact minimizer
   of ``sum a_j (w - level * s)^2`` for fixed assignments, so the weighted error
   in the weight domain is what the fit descends;
3. *project*: round the levels into HIF (``Codebook.from_values``) and repeat
   until the projected table stops changing or ``iters`` runs out. The table with
   the lowest measured error is returned (HIF projection can make a step worse).

The top level is pinned at the peak, +1. The scale search maps a block's
signed maximum onto the table's top entry; every value in the top cell is
therefore at most the peak, so a free Lloyd update would pull the top level
below +1 each round while the covering scale grows to compensate: a drift
along the one direction (table x c, scales / c) that changes nothing but the
scale format's rounding. Pinning removes that degeneracy and keeps the block's
largest weight exact up to the scale code's rounding, the weight that costs the
most when it is wrong. The bottom level is free (with a signed scale a block's
largest magnitude can always be put on the +1 side).

Start: plain weighted Lloyd-Max on the values normalized by each block's signed
largest-magnitude weight (in [-1, 1], each block's maximum at +1; these do not
move, so it is ordinary k-means), from their weighted quantiles; dead levels are
moved into the widest cell. Starting the alternation there matters: from a table
whose bottom level sits above the data, the blocks with a large negative side
take larger covering scales, which keeps the bottom level up (a fixed point the
alternation alone does not leave). A caller may pass another start (``init``),
and a ``partner`` table to fit DD4 as its second bank (the SOP4 search does).
For speed the fit runs on at most ``max_weights`` weights (evenly spaced rows,
deterministic; one row where a row is wider); the final encode of the layer uses every weight.
"""

from __future__ import annotations

import numpy as np

from sop.golden.codebooks import Codebook
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import named_layouts

from .blockwise import Prepared, bank_offset, evaluate_bank, prepare

PEAK = 1.0
DD4_ENTRIES = 16


def subsample(prep: Prepared, max_weights: int) -> Prepared:
    """Evenly spaced rows of the layer, at most ``max_weights`` weights (all rows if it is small, one
    row if a row is wider)."""
    rows, cols = prep.w.shape
    n = max(1, min(rows, max_weights // cols))
    if n >= rows:
        return prep
    pick = np.unique(np.linspace(0, rows - 1, n).round().astype(np.int64))
    return prepare(prep.w[pick], prep.layout, None if prep.a is None else prep.a.reshape(-1),
                   prep.name)


def _weights(prep: Prepared, s: np.ndarray) -> np.ndarray:
    wt = np.broadcast_to((s * s)[..., None], prep.blocks.shape)
    return wt if prep.a is None else wt * prep.a


def _normalized(prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(values normalized by their block's signed largest magnitude, weights a_j * s^2)."""
    amax = np.where(-prep.bmin > prep.bmax, prep.bmin, prep.bmax)      # signed largest magnitude
    s = np.where(amax == 0, 1.0, amax)
    y = (prep.blocks / s[..., None]).reshape(-1)
    wt = np.where(amax == 0, 0.0, 1.0)[..., None] * _weights(prep, s)
    return y, np.asarray(wt, dtype=np.float64).reshape(-1)


def initial_levels(prep: Prepared, n: int = DD4_ENTRIES, iters: int = 30) -> np.ndarray:
    """Weighted Lloyd-Max (1-D k-means) on the values normalized by their block's signed
    largest magnitude (so they lie in [-1, 1] with each block's maximum at +1), started
    from the weighted quantiles, the top level pinned at +1. With unquantized scales the
    data do not move, so this is plain k-means; it gives the alternating fit a start
    whose bottom level already reaches the data (see fit_dd4)."""
    y, wt = _normalized(prep)
    order = np.argsort(y, kind="stable")
    y, wt = y[order], wt[order]
    cw = np.cumsum(wt)
    if not len(cw) or cw[-1] <= 0:
        return np.linspace(-1, 1, n)
    q = np.searchsorted(cw, (np.arange(n) + 0.5) / n * cw[-1])
    levels = _spread(np.append(np.sort(y[np.clip(q, 0, len(y) - 1)])[:-1], PEAK))
    cy, cy2 = np.concatenate([[0.0], np.cumsum(wt * y)]), np.concatenate([[0.0], np.cumsum(wt * y * y)])
    cw = np.concatenate([[0.0], cw])
    for _ in range(iters):
        # y is sorted, so each cell is a contiguous run: its sums are differences of prefix sums
        edges = np.searchsorted(y, (levels[1:] + levels[:-1]) / 2, side="left")
        lo, hi = np.concatenate([[0], edges]), np.concatenate([edges, [len(y)]])
        den, num, y2 = cw[hi] - cw[lo], cy[hi] - cy[lo], cy2[hi] - cy2[lo]
        new = np.where(den > 0, num / np.where(den > 0, den, 1.0), levels)
        new[-1] = PEAK
        _reseed_empty(new, den, y2, num, n - 1)
        new = _spread(new)
        if np.array_equal(new, levels):
            break
        levels = new
    return levels


def _spread(levels: np.ndarray) -> np.ndarray:
    """Spread repeated levels apart (quantiles of data with repeated values can coincide): going up,
    the lower of two equal levels moves to the midpoint between its lower neighbour and the
    repeated value (1/64 below it at the bottom), so the order is kept. Levels an ulp apart can stay
    equal (their midpoint is one of them): ``table`` makes the HIF entries distinct afterwards."""
    lv = np.sort(np.asarray(levels, dtype=np.float64))
    for i in range(1, len(lv)):                 # 16 levels: a loop over entries, not weights
        if lv[i] <= lv[i - 1]:
            lv[i - 1] = lv[i - 2] + (lv[i] - lv[i - 2]) / 2 if i >= 2 else lv[i] - 1.0 / 64
    return lv


def _reseed_empty(levels, den, sum_y2, num, top) -> None:
    """Move each level that no value chose (a dead Lloyd cell) into the cell with the largest
    weighted spread, half a standard deviation above its centroid, so that the next
    assignment splits that cell (the usual k-means repair; in place)."""
    live = den > 0
    sse = np.where(live, sum_y2 - num * num / np.where(live, den, 1.0), -np.inf)
    for i in np.flatnonzero(~live):             # at most 16 levels: a loop over entries
        if i == top or not np.isfinite(sse.max()) or sse.max() <= 0:
            continue
        k = int(np.argmax(sse))
        levels[i] = min(levels[k] + 0.5 * np.sqrt(sse[k] / den[k]), PEAK * (1 - 1.0 / 256))
        sse[k] /= 4


def table(levels) -> Codebook:
    """The DD4 codebook of the given levels, rounded into HIF (golden.codebooks), 16 distinct values.

    Levels closer than HIF's spacing (a cell of near-equal weights) would round to one value: two
    codes that decode alike, one of them wasted. Going down from the top (pinned at the peak), a
    value at or above the one after it moves to the next HIF value below that; a table whose levels
    round apart, which is every MiniLM layer's, is untouched."""
    hif = DEFAULT_HIF                            # the HIF Codebook.from_values rounds into
    grid = np.unique(hif.values[np.isfinite(hif.values)])       # every HIF value, ascending (-0 is 0)
    lv = np.sort(np.asarray(levels, dtype=np.float64))
    first = np.searchsorted(grid, hif.quantize(lv))
    idx = first.copy()
    for i in range(len(idx) - 2, -1, -1):       # 16 entries: a loop over the table, not the weights
        idx[i] = min(idx[i], idx[i + 1] - 1)    # (the top is +1: hundreds of HIF values lie below it)
    return Codebook.from_values("dd4", np.where(idx == first, lv, grid[idx]))


def fit_dd4(w, act_ms=None, *, layout=None, iters: int = 6, scale_search: int = 1,
            max_weights: int = 1 << 15, prep: Prepared | None = None,
            partner: Codebook | None = None, init=None, history: list | None = None) -> Codebook:
    """Fit a layer's DD4 table; see the module docstring.

    ``partner``: fit DD4 as bank B next to this table (bank A): a block then counts
    for the refit only while DD4 beats the partner on it, so the levels descend the
    pair's error instead of the single table's. ``init``: starting levels (scaled so
    the largest is +1); default ``initial_levels`` (k-means on the normalized values). ``history``, if given,
    receives ``(weighted error, levels)`` per iteration, on the (sub)sample the fit uses.
    """
    layout = layout or named_layouts()["sop4-g16"]
    if layout.code_bits != 4:
        raise ValueError("DD4 is a 16-entry table: it needs a 4-bit layout")
    full = prep if prep is not None else prepare(w, layout, act_ms, "dd4")
    sub = subsample(full, max_weights)
    if init is None:
        levels = initial_levels(sub)
    else:
        levels = np.sort(np.asarray(init, dtype=np.float64))
        if levels.shape != (DD4_ENTRIES,) or not np.isfinite(levels).all() or levels.max() <= 0:
            raise ValueError("DD4 init must be 16 finite levels with a positive largest one")
        levels = levels / levels.max()
    cb = table(_spread(levels))
    partner_off = bank_offset(sub, partner) if partner is not None else None
    partner_evals = {}
    best_cb, best_err = cb, np.inf
    for _ in range(iters):
        off = bank_offset(sub, cb)
        if partner is not None:
            off = max(off, partner_off)
            if off not in partner_evals:
                partner_evals[off] = evaluate_bank(sub, partner, off, scale_search)
        ev = evaluate_bank(sub, cb, off, scale_search)
        mine = np.ones(ev.err.shape, dtype=bool)
        if partner is not None:
            mine = ev.err < partner_evals[off].err           # bank A wins ties, as in the encoder
        err = float(np.where(mine, ev.err, np.inf if partner is None else partner_evals[off].err).sum())
        if history is not None:
            history.append((err, cb.values.copy()))
        if err < best_err:
            best_cb, best_err = cb, err
        s = np.where(mine, ev.sv, 0.0)                       # weight s^2 = 0: the block is not DD4's
        y = sub.blocks / np.where(s == 0, 1.0, s)[..., None]
        wt = np.ascontiguousarray(_weights(sub, s)).reshape(-1)
        codes = ev.codes(sub).reshape(-1)
        yf = y.reshape(-1)
        num = np.bincount(codes, wt * yf, DD4_ENTRIES)
        den = np.bincount(codes, wt, DD4_ENTRIES)
        new = np.where(den > 0, num / np.where(den > 0, den, 1.0), cb.values)
        top = int(np.argmax(cb.values))
        new[top] = PEAK
        _reseed_empty(new, den, np.bincount(codes, wt * yf * yf, DD4_ENTRIES), num, top)
        nxt = table(_spread(new))
        if np.array_equal(nxt.values, cb.values):
            break
        cb = nxt
    return best_cb
