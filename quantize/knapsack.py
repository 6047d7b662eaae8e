"""Layer promotion under a bit budget: a multiple-choice knapsack over the model's layers.

Every layer ``l`` has options ``o`` (a format, or a format plus sparse residuals),
each with its exact bit cost ``b_lo`` (``QuantResult.bits``: blocks, LUT images,
offset, sparse entries) and its activation-weighted squared error
``e_lo = sum_ij act_ms_j (w_ij - q_ij)^2``. Choose one option per layer to

    minimize  sum_l e_l,o(l)   subject to   sum_l b_l,o(l) <= B = budget_bpw * total weights.

``solve_mckp`` solves it by dynamic programming over a discretized budget:

* every layer's cheapest option is taken as the base; only the *extra* bits over
  it are budgeted: ``X = B - sum_l min_o b_lo`` (infeasible if negative);
* the extra bits are counted in units of ``u = max(1, ceil(S / resolution))``
  bits, ``S`` the span (the extra bits of every layer's dearest option), each
  option's extra cost rounded **up** to whole units, the capacity rounded down
  (``floor(min(X, S) / u)`` units). So every solution of the discrete problem
  fits the real budget. The unit depends on the options, not on the budget: a
  larger budget only adds capacity, so the error never rises with the budget;
* the DP over (layer, units used) is exact for those discretized costs: it
  returns a minimum-error choice among all choices whose rounded-up costs fit.
  With ``u = 1`` (the span fits in ``resolution`` states) it is the exact
  optimum of the real problem. Equal totals go to the option of the lower own
  error (a layer's error below the last bit of the total still counts), and a
  budget that buys every layer's least-error option gets it without the DP.

What the rounding can cost is bounded by the **Lagrangian lower bound**
``max_{lambda >= 0} sum_l min_o (e_lo + lambda b_lo) - lambda B``, which is at most
the real optimum; ``Solution.gap`` = DP error - bound bounds the loss of the
DP solution against the true optimum (discretization plus the LP duality gap).

``quantize_budget`` builds the options of every layer (``DEFAULT_OPTIONS``: SOP4 with the
pair search, SOP4 plus sparse residuals at four densities, the FP6 point alone and with
0.25 % residuals, FP8 E4M3 with a per-layer power-of-two scale), solves, and reports which
layers were promoted above the base option and why: their error reduction per extra bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from sop.golden.decoder import decode_layer
from sop.golden.layout import Sparse
from sop.golden.points import get_point, operating_points
from sop.quantize.baselines import fp8_e4m3_pot

from .blockwise import float_weights
from .result import QuantResult
from .sop_search import StreamSums, quantize_point
from .sparse import apply_sparse, sparse_residuals, sparse_values

DEFAULT_RESOLUTION = 1 << 18      # DP states over the span of the extra bits (solve_mckp)


@dataclass
class Solution:
    choice: list[int]          # option index per layer
    bits: int                  # real bits of the choice
    error: float               # its total error
    lower_bound: float         # Lagrangian bound: no choice within the budget has less error
    unit: int                  # bits per DP cost unit
    budget_bits: int

    @property
    def gap(self) -> float:
        return self.error - self.lower_bound


def lagrangian_bound(options: list[list[tuple[int, float]]], budget_bits: float) -> float:
    """``max_{lambda >= 0} sum_l min_o (e + lambda b) - lambda B``: a lower bound on the optimum.

    The function of lambda is concave and piecewise linear, so its maximum sits at
    lambda = 0 or at a breakpoint, where two options of one layer tie: lambda =
    (e_i - e_j) / (b_j - b_i) > 0. All are tried (a loop over option pairs, not weights)."""
    lams = {0.0}
    for opts in options:
        for (bi, ei), (bj, ej) in ((p, q) for p in opts for q in opts):
            if bj > bi and ei > ej:
                lams.add((ei - ej) / (bj - bi))
    lam = np.array(sorted(lams))
    total = -lam * budget_bits
    for opts in options:
        b = np.array([o[0] for o in opts], dtype=np.float64)
        e = np.array([o[1] for o in opts], dtype=np.float64)
        total = total + (e[None, :] + lam[:, None] * b[None, :]).min(axis=1)
    return float(total.max())


def solve_mckp(options: list[list[tuple[int, float]]], budget_bits: int,
               resolution: int = DEFAULT_RESOLUTION) -> Solution:
    """One option per layer, minimum total error, total bits <= ``budget_bits``; see the module docstring.

    ``options[l]`` is a list of ``(bits, error)``. Where two totals are equal the option of the lower
    error of its own wins, then the earlier: a layer whose error is below the last bit of the total
    so far (an earlier layer's error 1e10 times larger) still takes its better option when it fits.
    A budget that buys every layer's least-error option gets it, with no DP."""
    if not options or any(not o for o in options):
        raise ValueError("every layer needs at least one option")
    min_bits = [min(b for b, _ in opts) for opts in options]
    extra = int(budget_bits) - sum(min_bits)
    if extra < 0:
        raise ValueError(f"budget of {budget_bits} bits is below the cheapest choice ({sum(min_bits)} bits)")
    best = [min(range(len(opts)), key=lambda i, o=opts: (o[i][1], i)) for opts in options]
    if sum(opts[i][0] for opts, i in zip(options, best)) <= budget_bits:
        return _solution(options, best, budget_bits, 1)
    span = sum(max(b for b, _ in opts) - mb for opts, mb in zip(options, min_bits))
    unit = max(1, math.ceil(span / resolution))     # the options' own scale, not the budget's: monotone
    cap = min(extra, span) // unit
    dp = np.zeros(cap + 1)                          # min error over the layers so far, using <= c units
    picks = []
    for opts, mb in zip(options, min_bits):
        new = np.full(cap + 1, np.inf)
        own = np.full(cap + 1, np.inf)              # the error of the option picked in each cell
        pick = np.zeros(cap + 1, dtype=np.int8 if len(opts) <= 127 else np.int32)
        for i, (b, e) in enumerate(opts):
            cost = -(-(b - mb) // unit)               # rounded up: a discrete fit is a real fit
            if cost > cap:
                continue
            cand = dp[:cap + 1 - cost] + e
            better = (cand < new[cost:]) | ((cand == new[cost:]) & (e < own[cost:]))
            new[cost:][better], own[cost:][better], pick[cost:][better] = cand[better], e, i
        dp, picks = new, picks + [pick]
    c = cap
    choice = []
    for opts, mb, pick in zip(reversed(options), reversed(min_bits), reversed(picks)):
        i = int(pick[c])
        choice.append(i)
        c -= -(-(opts[i][0] - mb) // unit)
    choice.reverse()
    return _solution(options, choice, budget_bits, unit)


def _solution(options, choice: list[int], budget_bits: int, unit: int) -> Solution:
    bits = sum(options[l][i][0] for l, i in enumerate(choice))
    error = sum(options[l][i][1] for l, i in enumerate(choice))
    # the bound is at most the optimum in exact arithmetic; its float sums of errors 1e300 apart are not
    bound = min(lagrangian_bound(options, budget_bits), float(error))
    return Solution(choice, int(bits), float(error), bound, unit, int(budget_bits))


# -- the per-layer options and the model-level quantizer -----------------------------------------

#: The options each layer may take: a base format, optionally "+sp<percent>%" sparse residuals.
DEFAULT_OPTIONS = ("sop4-g16", "sop4-g16+sp0.25%", "sop4-g16+sp0.5%", "sop4-g16+sp1%",
                   "sop4-g16+sp2%", "e2m3-ue4m4-g16", "e2m3-ue4m4-g16+sp0.25%", "fp8-e4m3-pot")

_OPTION = re.compile(r"^(?P<base>[a-z0-9-]+?)(?:\+sp(?P<pct>\d+(?:\.\d+)?)%)?$")
FP8 = "fp8-e4m3-pot"      # the one base that is not an operating point (no layer stream)


def parse_option(name: str) -> tuple[str, float]:
    """``"sop4-g16+sp0.5%"`` -> ``("sop4-g16", 0.005)``. A base is an operating point
    (golden/points.py) or ``fp8-e4m3-pot``."""
    bases = [*operating_points(), FP8]
    m = _OPTION.match(name)
    if not m or m["base"] not in bases:
        raise ValueError(f"unknown budget option {name!r}; a base ({', '.join(sorted(bases))}) "
                         f"optionally followed by +sp<percent>%")
    if m["pct"] and m["base"] == FP8:
        raise ValueError("sparse residuals apply to the SOP layouts (they have a layer stream)")
    return m["base"], float(m["pct"] or 0) / 100


#: Weights per row chunk of ``weighted_error``.
CHUNK_WEIGHTS = 1 << 18


def weighted_error(w, recon, act_ms=None, sparse: Sparse | None = None) -> float:
    """``sum_ij act_ms_j (w_ij - q_ij)^2`` (all ones without ``act_ms``), where ``q`` is
    ``recon`` with the ``sparse`` entries added as ``sparse.apply_sparse`` adds them, without
    building ``q``: the squared differences are formed row chunk by row chunk (the entries'
    positions replaced), so nothing of the layer's size is held. Unweighted, their sum is
    numpy's pairwise sum of the whole layer reproduced segment by segment
    (``sop_search.StreamSums``): the bits of ``((w - q)^2).sum()``; weighted, each row's sum
    of ``act_ms_j (w_ij - q_ij)^2`` goes into a vector of the rows, summed at the end: the
    bits of the whole-layer ``((w - q)^2 * act_ms).sum(axis=1).sum()`` (a test checks both;
    not a matrix-vector product, whose rounding depends on how many rows BLAS gets)."""
    w, recon = np.asarray(w), np.asarray(recon)
    if recon.shape != w.shape:
        raise ValueError(f"reconstruction shape {recon.shape} differs from the weights' {w.shape}")
    if w.ndim != 2:
        w, recon = w.reshape(1, -1), recon.reshape(1, -1)
    rows, cols = w.shape
    act = None if act_ms is None else np.asarray(act_ms, dtype=np.float64)
    idx = vals = None
    if sparse is not None and len(sparse):
        idx, vals = sparse.index.astype(np.int64), sparse_values(sparse)
    step = max(1, CHUNK_WEIGHTS // max(1, cols))
    sums = StreamSums(1, w.size, most=1 << 16) if act is None else None
    per_row = np.empty(rows) if act is not None else None
    for r in range(0, rows, step):
        d = np.asarray(w[r:r + step], dtype=np.float64) - recon[r:r + step]
        if idx is not None:
            lo, hi = np.searchsorted(idx, (r * cols, (r + step) * cols))
            if hi > lo:
                rr, cc = np.divmod(idx[lo:hi], cols)
                d[rr - r, cc] = np.asarray(w[rr, cc], dtype=np.float64) - (
                    np.asarray(recon[rr, cc], dtype=np.float64) + vals[lo:hi])
        d *= d
        if act is None:
            sums.push(d.reshape(1, -1))
        else:
            with np.errstate(over="ignore"):            # Inf past float64: quantize_budget refuses it
                d *= act
                per_row[r:r + step] = d.sum(axis=1)    # pairwise per row: independent of the chunking
    with np.errstate(over="ignore"):
        return float(sums.total()[0]) if act is None else float(per_row.sum())


def _base_result(base: str, w, act_ms, name: str, sop4_kw: dict, cols: int | None = None) -> QuantResult:
    """A base format's result for ``w``; ``cols``: its real columns where ``w`` is zero-padded to a
    block. The SOP points store their padding (a stream is whole blocks); FP8 stores none, so it is
    quantized and costed without it (the same values: one scale for the layer, the padding's zeros
    change no maximum) and its reconstruction padded back with zeros."""
    if base == FP8:
        if cols is None or cols == w.shape[1]:
            return fp8_e4m3_pot(w, act_ms, name=name)
        res = fp8_e4m3_pot(w[:, :cols], None if act_ms is None else act_ms[:cols], name=name)
        res.recon = np.pad(res.recon, ((0, 0), (0, w.shape[1] - cols)))
        return res
    point = get_point(base)
    return quantize_point(w, point, act_ms, name=name, **(sop4_kw if point.search == "pair" else {}))


class LazyLayers(Mapping):
    """name -> ``(w, act_ms)``, each layer loaded (``load(name)``) when asked for and not kept:
    the knapsack reads every layer once to measure its options, and once more for the
    layers whose chosen result it cannot rebuild from what it kept."""

    def __init__(self, names, load: Callable[[str], tuple]):
        self.names, self.load = list(names), load

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        return self.load(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


@dataclass
class BudgetResult:
    results: Mapping[str, QuantResult]   # the chosen quantization of every layer (``LazyResults``)
    choice: dict[str, str]               # layer -> option name
    solution: Solution
    table: list[dict] = field(default_factory=list)   # per layer: options, choice, why
    report: str = ""
    n_weights: int = 0

    @property
    def bpw(self) -> float:
        return self.solution.bits / self.n_weights


@dataclass
class LayerOptions:
    """Every layer's options, measured once: reusable for several budgets.

    Only what the knapsack needs is kept per option (its bits and error, and the sparse
    entries of a sparse option, a few bytes each), not its reconstruction: of an SOP base
    (a stream without sparse entries) the result less its reconstruction is kept (the
    stream, under a byte per weight), and ``result`` decodes the stream again
    (``golden.decoder.decode_layer``, which the encoder's reconstruction equals bit for
    bit) into the dtype the quantizer gave and adds the kept entries in place, without
    reading the layer; any other base (FP8) is quantized again from the layer (the
    quantizers are deterministic: the same result, bit for bit)."""

    names: list[str]                     # layer names, in order
    parsed: list[tuple[str, str, float]] # (option name, base format, sparse density)
    costs: list[list[tuple[int, float]]] # per layer, per option: (bits, weighted error)
    layers: Mapping
    #: (layer, option) -> the sparse entries of that option (a few bytes per entry), so that
    #: ``result`` does not search the residuals again
    entries: dict = field(default_factory=dict)
    sop4_kw: dict = field(default_factory=dict)
    #: (layer, base) -> (the base result without its reconstruction, the reconstruction's dtype)
    streams: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)    # layer -> weights
    cols: dict = field(default_factory=dict)     # layer -> its real columns, where padded (``option_row``)

    @property
    def n_weights(self) -> int:
        return sum(self.sizes.values())

    def result(self, layer: str, option: int) -> QuantResult:
        _, base, density = self.parsed[option]
        kept = self.streams.get((layer, base))
        if kept is None:
            w, act_ms = self.layers[layer]
            return _base_result(base, float_weights(w), act_ms, layer, self.sop4_kw,   # FP8: no entries
                                self.cols.get(layer))
        res, dtype = kept
        entries = self.entries.get((layer, option)) if density > 0 else None
        # with entries the sums need float64 (a BF16 residual on a product is not a float32 in
        # general): decoded straight into float64, the entries are then added in place
        shape = (res.stream.rows, res.stream.cols)
        recon = decode_layer(res.stream, dest=np.empty(shape, dtype=np.float64 if entries else dtype))
        if entries is None:
            return dataclasses.replace(res, recon=recon, extra=dict(res.extra))
        stream = dataclasses.replace(res.stream, sparse=entries)
        recon = apply_sparse(recon, entries, inplace=True)
        return QuantResult(recon, stream.bits, f"{res.choice} +{len(entries)} sparse", stream,
                           extra={**res.extra, "sparse": len(entries)})


class LazyResults(Mapping):
    """layer -> its chosen ``QuantResult``, built when asked for (``pop`` it to let it go):
    one layer's reconstruction at a time. ``cols`` crops a padded reconstruction."""

    def __init__(self, opts: LayerOptions, choice: dict[str, int], cols: dict[str, int] | None = None):
        self.opts, self.choice, self.cols = opts, dict(choice), dict(cols or {})

    def __getitem__(self, name):
        res = self.opts.result(name, self.choice[name])
        if name in self.cols and res.recon.shape[1] != self.cols[name]:
            res.recon = res.recon[:, :self.cols[name]]
        return res

    def pop(self, name, *default):
        if name not in self.choice:
            if default:
                return default[0]
            raise KeyError(name)
        res = self[name]
        del self.choice[name]
        return res

    def __iter__(self):
        return iter(self.choice)

    def __len__(self):
        return len(self.choice)


@dataclass
class LayerRow:
    """One layer's options, measured (``option_row``): what ``layer_options`` keeps of it."""

    name: str
    size: int                            # weights (the real ones: the padding left out)
    costs: list                          # per option: (bits, weighted error)
    entries: dict                        # option index -> sparse entries
    streams: dict                        # base -> (the base result without its reconstruction, its dtype)


def option_row(name: str, w, act_ms, options=DEFAULT_OPTIONS, sop4_kw: dict | None = None,
               cols: int | None = None) -> LayerRow:
    """Quantize one layer in every option's base format and measure each option's bits and
    activation-weighted error (sparse variants from the base result's residuals, their error
    measured without building their reconstruction). One base result is held at a time: each
    base format's options are measured, then it is dropped. The same in this process or in a
    --jobs worker (quantize/jobs.py), bit for bit. ``cols``: the real columns of a zero-padded
    ``w`` (``_base_result``)."""
    parsed = [(o, *parse_option(o)) for o in options]
    sop4_kw = dict(sop4_kw or {})
    w = float_weights(w)                           # float32 stays (the quantizers cast chunks, exactly)
    # the layer's real weights, not the zero columns padding it to whole blocks: the densities and the
    # table's bits per weight count these
    real = w.shape[0] * (w.shape[1] if cols is None else cols)
    out = LayerRow(name, real, [None] * len(parsed), {}, {})
    for base in dict.fromkeys(base for _, base, _ in parsed):       # in order of first use
        base_res = _base_result(base, w, act_ms, name, sop4_kw, cols)
        for i, (oname, b, density) in enumerate(parsed):
            if b != base:
                continue
            if density > 0:
                if len(base_res.stream.sparse):
                    raise ValueError("the stream already carries sparse entries")
                sp = sparse_residuals(w, base_res.recon, int(round(density * real)), act_ms)
                out.entries[i] = sp
                out.costs[i] = (dataclasses.replace(base_res.stream, sparse=sp).bits,
                                weighted_error(w, base_res.recon, act_ms, sparse=sp))
            else:
                out.costs[i] = (base_res.bits, weighted_error(w, base_res.recon, act_ms))
        st = base_res.stream
        if st is not None and not len(st.sparse) and base_res.recon.shape == (st.rows, st.cols):
            out.streams[base] = (dataclasses.replace(base_res, recon=None), base_res.recon.dtype)
        del base_res
    return out


def layer_options(layers: Mapping, options=DEFAULT_OPTIONS, sop4_kw: dict | None = None,
                  rows: Iterable[LayerRow] | None = None, cols: Mapping | None = None) -> LayerOptions:
    """Every layer's ``option_row``, one layer held at a time. ``rows``: the rows already
    measured elsewhere (--jobs workers), in the order of ``layers``; ``layers`` is then read
    only later, for what the chosen results need. ``cols``: layer -> real columns where ``layers``
    pads (filled as each layer is read or its row passes: quantize/schemes.py's ``_Padded``)."""
    cols = {} if cols is None else cols
    parsed = [(o, *parse_option(o)) for o in options]
    sop4_kw = dict(sop4_kw or {})
    if rows is None:
        rows = (option_row(lname, w, act_ms, options, sop4_kw, cols.get(lname))
                for lname, (w, act_ms) in layers.items())
    costs, entries, streams, sizes = [], {}, {}, {}
    for lname, row in zip(layers, rows, strict=True):
        if row.name != lname:
            raise RuntimeError(f"option rows out of order: {row.name} where {lname} was expected")
        sizes[lname] = row.size
        costs.append(row.costs)
        entries.update(((lname, i), sp) for i, sp in row.entries.items())
        streams.update(((lname, base), kept) for base, kept in row.streams.items())
    return LayerOptions(list(layers), parsed, costs, layers, entries, sop4_kw, streams, sizes, dict(cols))


def _check_finite_errors(opts: LayerOptions) -> None:
    """Every option's weighted error finite, and the largest the knapsack forms from them (the sum of each
    layer's largest error times every bit it could spend: the Lagrangian's multiplier times the budget is
    below it): a layer's own search holds its errors at a power of two of their own (any finite
    ``act_ms``), but the knapsack adds them up across layers at their true scale, and an Inf there would
    choose by nothing."""
    bad = next((n for n, row in zip(opts.names, opts.costs) if not all(math.isfinite(e) for _, e in row)), None)
    errors = sum(max(e for _, e in row) for row in opts.costs)
    if bad is None and math.isfinite(errors * max(1, sum(max(b for b, _ in row) for row in opts.costs))):
        return
    where = f"layer {bad}'s weighted error overflows" if bad is not None else "the weighted errors overflow"
    raise ValueError(f"sop-budget: {where} float64 in the knapsack's sums (act_ms of about 1e280 or more): "
                     f"only the ratios between act_ms matter, so divide every layer's act_ms by one factor")


def check_budget(budget_bpw, option: str = "budget") -> float:
    """``budget_bpw`` as a float above 0, or one ``ValueError`` naming it as ``option`` (a string compared
    with 0 was a TypeError, ``True`` a budget of 1 bit per weight)."""
    if isinstance(budget_bpw, bool) or not isinstance(budget_bpw, Real):
        raise ValueError(f"{option} must be a number (average bits per weight), got {budget_bpw!r}")
    if not budget_bpw > 0:                          # NaN too: it would compare as no budget at all
        raise ValueError(f"{option} must be a number above 0, got {budget_bpw!r}")
    try:
        return float(budget_bpw)
    except OverflowError:                           # an int past float's range: past every option too
        return math.inf


def quantize_budget(layers: Mapping, budget_bpw: float, options=DEFAULT_OPTIONS,
                    resolution: int = DEFAULT_RESOLUTION, sop4_kw: dict | None = None,
                    prepared: LayerOptions | None = None, cols: dict[str, int] | None = None,
                    real_weights: int | None = None, option: str = "budget") -> BudgetResult:
    """Quantize every layer under an average of ``budget_bpw`` bits per weight.

    ``layers``: name -> ``(w, act_ms)`` (``act_ms`` may be None: unweighted error); a
    ``LazyLayers`` loads each when needed. The first option of ``options`` should be the
    cheapest (it is the base the report measures promotions against). ``prepared`` (from
    ``layer_options``) reuses the quantized options for another budget; ``cols`` crops the
    results (padded layers) and ``real_weights`` (their weights before padding; default: the
    layers' own count) is what ``budget_bpw`` counts bits per: the padded zeros cost bits but are
    not weights, so the bits to spend, the least budget a refusal names and the report are all per
    real weight. The results are built one at a time as they are asked for
    (``BudgetResult.results``); see the module docstring. ``option`` is what a refusal calls the
    budget: the Python API's ``budget`` (the default: a caller from Python has no ``--budget`` to
    give), the command line's ``--budget`` (quantize/layer_loop.py passes it)."""
    budget_bpw = check_budget(budget_bpw, option)
    opts = prepared if prepared is not None else layer_options(layers, options, sop4_kw)
    _check_finite_errors(opts)
    n_weights = opts.n_weights if real_weights is None else real_weights
    sol = solve_mckp(opts.costs, budget_bits(opts.costs, budget_bpw, n_weights, option), resolution)
    choice, table = {}, []
    for lname, row, i in zip(opts.names, opts.costs, sol.choice):
        choice[lname] = opts.parsed[i][0]
        b0, e0 = row[0]
        b, e = row[i]
        table.append({"layer": lname, "option": choice[lname], "bits": b, "error": e,
                      "bpw": b / opts.sizes[lname], "extra_bits": b - b0, "error_reduction": e0 - e,
                      "reduction_per_bit": (e0 - e) / (b - b0) if b > b0 else 0.0,
                      "options": {opts.parsed[j][0]: {"bits": bb, "error": ee}
                                  for j, (bb, ee) in enumerate(row)}})
    results = LazyResults(opts, dict(zip(opts.names, sol.choice)), cols)
    res = BudgetResult(results, choice, sol, table, n_weights=n_weights)
    res.report = budget_report(res, budget_bpw, n_weights)
    return res


def least_bits(rows: int, cols: int, options=DEFAULT_OPTIONS) -> int:
    """The bits of a ``rows x cols`` layer's cheapest option, from its shape alone: each base format's
    ``bits`` of the registry (quantize/schemes.py; ``option_row`` measures the same: a SOP point's stream of
    the width padded to 16 first, FP8 unpadded), a sparse variant costing no fewer. Exact for options that
    include their bases, as the built-in ones do; a lower bound otherwise."""
    from sop.quantize.schemes import BUDGET_GROUP, get_quant_format

    padded = -(-cols // BUDGET_GROUP) * BUDGET_GROUP          # sop-budget pads each layer first
    return min(get_quant_format(base).bits(rows, cols if base == FP8 else padded)
               for base in dict.fromkeys(parse_option(o)[0] for o in options))


def refuse_small_budget(wanted: float, cheapest: int, n_weights: int, option: str = "budget") -> None:
    """The refusal of a budget that buys ``wanted`` bits, below ``cheapest`` (every layer in its cheapest
    option): it names the least budget that runs, as ``option`` (``budget=`` or ``--budget``)."""
    least = math.ceil(cheapest / n_weights * 1e4) / 1e4    # the 4-decimal budget that buys it
    give = f"{option} {least:.4f}" if option.startswith("--") else f"{option}={least:.4f}"
    raise ValueError(f"{option} is too small: it buys {math.floor(wanted):,} bits, below the cheapest "
                     f"choice, {cheapest:,} bits (every layer in its cheapest option): give {give} or more")


def check_budget_shapes(shapes, budget_bpw: float, option: str = "budget", options=DEFAULT_OPTIONS) -> None:
    """Refuse, from the layers' ``(rows, cols)`` alone, a budget below every layer's cheapest option
    (``least_bits``): before any layer is read (it was refused after every layer's options were built,
    hours of a large model's), as ``budget_bits`` refuses it then."""
    shapes = [(int(r), int(c)) for r, c in shapes]
    n_weights = sum(r * c for r, c in shapes)
    cheapest = sum(least_bits(r, c, options) for r, c in shapes)
    wanted = check_budget(budget_bpw, option) * n_weights
    if n_weights and wanted < cheapest:
        refuse_small_budget(wanted, cheapest, n_weights, option)


def budget_bits(costs: list[list[tuple[int, float]]], budget_bpw: float, n_weights: int,
                option: str = "budget") -> int:
    """``floor(budget_bpw * n_weights)``: the bits the knapsack may spend, for any budget above 0.

    A budget past every layer's dearest option buys exactly that option everywhere: it is capped
    there before it becomes an integer (1e308 bpw times the weights is inf, no integer). A budget
    below every layer's cheapest option is refused naming ``option`` and the least budget that runs."""
    cheapest = sum(min(b for b, _ in row) for row in costs)
    dearest = sum(max(b for b, _ in row) for row in costs)
    wanted = budget_bpw * n_weights
    if wanted >= dearest:
        return dearest
    if wanted < cheapest:
        refuse_small_budget(wanted, cheapest, n_weights, option)
    return int(math.floor(wanted))


def budget_report(res: BudgetResult, budget_bpw: float, n_weights: int) -> str:
    sol = res.solution
    base = res.table[0]["options"] and next(iter(res.table[0]["options"]))
    capped = " (capped at every layer's dearest option)" if sol.budget_bits < budget_bpw * n_weights - 1 else ""
    lines = [f"budget {budget_bpw:.10g} bpw = {sol.budget_bits:,} bits{capped} over {n_weights:,} weights; "
             f"used {sol.bits:,} bits ({sol.bits / n_weights:.4f} bpw)",
             f"total weighted error {sol.error:.6g}; Lagrangian lower bound {sol.lower_bound:.6g} "
             f"(gap {sol.gap:.3g}, {100 * sol.gap / sol.error if sol.error else 0:.3f}%); "
             f"DP unit {sol.unit} bits",
             f"layers not in {base}: promoted (sorted by error reduction per extra bit), then cheaper:"]
    moved = sorted((t for t in res.table if t["option"] != base),
                   key=lambda t: (t["extra_bits"] <= 0, -t["reduction_per_bit"]))
    for t in moved:
        per_bit = f" ({t['reduction_per_bit']:.3g}/bit)" if t["extra_bits"] > 0 else ""
        lines.append(f"  {t['layer']:<50} {t['option']:<24} {t['extra_bits']:>+10,} bits  "
                     f"error {-t['error_reduction']:+.4g}{per_bit}")
    if not moved:
        lines.append("  (none)")
    return "\n".join(lines)
