"""The quantizer's format registry: every name `sop eval --format` accepts, with its exact bit cost.

``get_quant_format(name)`` returns a ``QuantFormat``: a name, a quantizer
``quantize(w, act_ms=None, name="layer", **kw) -> QuantResult`` (quantize/result.py: the
reconstruction ``recon``, the stored ``bits``, the ``choice``, a SOP point's golden ``stream``),
behind the checks of quantize/inputs.py (a 2-D matrix of finite reals inside float32's range, a
torch tensor too; ``act_ms`` one non-negative value per column; else one ``ValueError``), the
nominal bits per weight of a large layer, and, where the cost depends only on
the shape, ``bits(rows, cols)``: every stored bit of a ``rows x cols`` layer
(padding included). An unknown name raises ``ValueError`` listing the valid
ones.

* Baselines (quantize/baselines.py): ``fp8-e4m3-pot``, ``int8-ch``,
  ``mxfp8-e4m3``, ``mxfp6-e2m3``, ``mxfp6-e3m2``, ``mxfp4``, ``nvfp4``,
  ``nvfp4-46``, ``if4``, ``nf4-g64``.
* SOP points: one format per operating point of golden/points.py (``sop4-g16``,
  ``e2m3-ue4m4-g16``, and any point registered there), quantized by
  ``quantize.sop_search.quantize_point`` (the point's ``search``). ``sop-budget``
  is model-level: ``solve_budget(layers, budget)`` runs the multiple-choice
  knapsack of ``quantize.knapsack`` over every layer at once (each layer is read
  once to measure its options; only their costs, sparse entries and streams are
  kept), choosing per layer among ``knapsack.DEFAULT_OPTIONS``
  (SOP4, SOP4 + sparse residuals, the FP6 point alone and with residuals, FP8) under the
  average ``--budget``.

Widths that are not a multiple of a format's block are zero-padded per row (the
rule of quantize/baselines.py); for the SOP points the registry pads before
calling the quantizer and crops the reconstruction, so the padded codes count.
The padding columns get error weight 0 (``_pad``): they are stored, not data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from sop.golden.points import own_point_hint
from sop.quantize import baselines as B
from sop.quantize.blockwise import float_weights
from sop.quantize.inputs import REGISTRY_NAN_HINT, column_weights, sanitize, weight_matrix
from sop.quantize.result import QuantResult



@dataclass(frozen=True)
class QuantFormat:
    name: str
    quantize: Callable[..., QuantResult]
    bpw: float | None                           # nominal bits per weight of a large layer
    bpw_formula: str                            # the exact cost, in words
    description: str
    group: int | None = None                    # block size along a row (None: no blocks)
    bits: Callable[[int, int], int] | None = None   # exact bits of a (rows, cols) layer
    kind: str = "baseline"                      # "baseline" | "sop"
    model_level: bool = False                   # needs every layer at once (knapsack)
    solve_budget: Callable | None = None        # for model-level formats: (layers, budget) -> BudgetResult

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bpw": self.bpw, "bpw_formula": self.bpw_formula,
                "group": self.group, "description": self.description}


def _padded(cols: int, group: int) -> int:
    return -(-cols // group) * group


def _block_bits(elem_bits: int, group: int, scale_bits: int, per_layer: int = 0):
    def bits(rows: int, cols: int) -> int:
        pc = _padded(cols, group)
        return rows * pc * elem_bits + rows * (pc // group) * scale_bits + per_layer
    return bits


# -- the SOP points --------------------------------------------------------------------------------

def _pad_call(fn, group: int, w, act_ms, **kw) -> QuantResult:
    """Call a block quantizer on the padded layer (``_pad``); crop the reconstruction back.
    A float32 layer stays float32 (the quantizers cast chunks to float64, exactly)."""
    w = float_weights(w)
    cols = w.shape[1]
    wp, act_p = _pad(w, act_ms, group)
    res = fn(wp, act_ms=act_p, **kw)
    if wp.shape[1] != cols:
        res.recon = res.recon[:, :cols]
        res.extra = {**res.extra, "padded_cols": wp.shape[1]}
    return res


def _point_quantizer(point) -> Callable[..., QuantResult]:
    """The registry's quantizer of an operating point: padded to its block, cropped back."""
    def quantize(w, act_ms=None, name: str = "layer", **kw) -> QuantResult:
        from sop.quantize.sop_search import quantize_point

        return _pad_call(lambda wp, act_ms=None: quantize_point(wp, point, act_ms=act_ms, name=name, **kw),
                         point.layout.group, w, act_ms)
    return quantize


def _point_format(point) -> QuantFormat:
    from sop.golden.layout import layer_bits

    lay = point.layout
    tables = f"{lay.banks} LUT image{'s' if lay.banks > 1 else ''} + offset byte"
    return QuantFormat(point.name, _point_quantizer(point), lay.bpw,
                       f"{lay.code_bits} + {lay.header_bits}/{lay.group} + ({tables})/numel"
                       + (" + sparse" if point.search == "pair" else ""),
                       point.description, group=lay.group, kind="sop",
                       bits=lambda r, c: layer_bits(lay, point.hif, r, c))     # without sparse entries


def _sop_budget(w, act_ms=None, **kw) -> QuantResult:
    raise ValueError("format sop-budget is chosen over all layers at once: use quantize_sop_budget "
                     "(`sop eval MODEL --format sop-budget --budget B`)")


def _pad(w: np.ndarray, act_ms, group: int):
    """``w`` zero-padded to a multiple of ``group`` columns, and the error weights its quantizer
    sees: ``act_ms`` (all ones without it) then 0 for each padding column. The padding is stored
    (a stream is whole blocks) but cropped on decode, so it is not data: at weight 0 nothing is
    chosen for its sake, not a block's scale or table, not a DD4 level, not a sparse entry. A
    layer that needs no padding is returned as it is."""
    wp = B.pad_to_block(w, group)
    if wp.shape[1] == w.shape[1]:
        return wp, act_ms
    real = np.ones(w.shape[1]) if act_ms is None else np.asarray(act_ms, dtype=np.float64)
    return wp, np.concatenate([real, np.zeros(wp.shape[1] - w.shape[1])])


class _Padded(Mapping):
    """name -> (w padded to the SOP block, its error weights), as ``_pad`` pads them, on access;
    records each layer's real columns and weights as it goes."""

    def __init__(self, layers: Mapping, group: int):
        self.layers, self.group, self.cols, self.real = layers, group, {}, {}

    def __getitem__(self, name):
        pair = self.layers[name]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:    # a bare matrix was unpacked row by row
            raise ValueError(f"sop-budget layer {name!r}: give a (w, act_ms) pair (act_ms None for an unweighted "
                             f"layer), got {type(pair).__name__}")
        w, act_ms = _checked_layer(name, *pair)
        self.cols[name], self.real[name] = w.shape[1], w.size
        return _pad(w, act_ms, self.group)

    def measured(self, rows):
        """``budget_row`` results -> their ``LayerRow``s, the real sizes recorded as they pass."""
        for row, cols, real in rows:
            self.cols[row.name], self.real[row.name] = cols, real
            yield row

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


BUDGET_GROUP = 16           # sop-budget pads every layer's width to the SOP block, as the SOP points do


def budget_row(name: str, w, act_ms, options=None, sop4_kw: dict | None = None):
    """One layer's knapsack options for sop-budget, measured as ``quantize_sop_budget`` measures
    them (padded to the block): ``(knapsack.LayerRow, real columns, real weights)``. The task of
    a --jobs worker (quantize/jobs.py), with the default options; the same bits in this process."""
    from sop.quantize import knapsack

    w, act_ms = _checked_layer(name, w, act_ms)
    cols = w.shape[1]
    wp, act_p = _pad(w, act_ms, BUDGET_GROUP)
    return knapsack.option_row(name, wp, act_p, options or knapsack.DEFAULT_OPTIONS, sop4_kw, cols), cols, w.size


def quantize_sop_budget(layers: Mapping, budget: float | None, rows=None, **kw):
    """sop-budget: ``quantize.knapsack.quantize_budget(layers, budget)`` over every layer at once.

    ``layers``: name -> ``(w, act_ms)`` (a ``knapsack.LazyLayers`` loads each only when
    needed, so that no two layers are held at once); widths are padded to 16 like the other
    SOP points, and ``budget`` counts bits per *real* weight (the knapsack's ``real_weights``).
    ``rows``: each layer's ``budget_row``, in layer order, measured elsewhere with the same
    options (--jobs workers); ``layers`` is then read only for the chosen results. Returns the
    knapsack's ``BudgetResult`` (``results``: name -> QuantResult, built as asked for;
    ``choice``: name -> option, ``report``). A refusal names the budget as ``option`` (a ``kw``
    of ``knapsack.quantize_budget``): ``budget`` from Python, ``--budget`` from the command line."""
    from sop.quantize import knapsack

    if budget is None:
        option = kw.get("option", "budget")
        give = f"{option} B" if option.startswith("--") else f"{option}=B"
        raise ValueError(f"format sop-budget needs {give} (average bits per weight)")
    knapsack.check_budget(budget, kw.get("option", "budget"))      # before any layer is quantized
    if not isinstance(layers, Mapping):
        raise ValueError(f"sop-budget's layers are a mapping of name -> (w, act_ms), got {type(layers).__name__}")
    padded = _Padded(layers, BUDGET_GROUP)
    options, sop4_kw = kw.pop("options", knapsack.DEFAULT_OPTIONS), kw.pop("sop4_kw", None)
    if rows is not None:
        rows = padded.measured(rows)
    opts = kw.pop("prepared", None) or knapsack.layer_options(padded, options, sop4_kw, rows=rows,
                                                                       cols=padded.cols)
    # the budget is per real weight: padded zeros cost bits but are not weights
    real = sum(padded.real.values()) if padded.real else sum(np.asarray(w).size for w, _ in layers.values())
    return knapsack.quantize_budget(padded, budget, prepared=opts, cols=dict(padded.cols), real_weights=real, **kw)


# -- the registry ---------------------------------------------------------------------------------

def _mx(element: str):
    return lambda w, act_ms=None, name="layer": B.mx(w, element, name=name)


def _baseline(fn):
    return lambda w, act_ms=None, name="layer": fn(w, name=name)        # act_ms: the baselines weigh no error


def _checked_layer(name: str, w, act_ms):
    """``(w, act_ms)`` through the checks of quantize/inputs.py: a weight matrix of real, finite numbers
    inside float32's range (float16/32/64 as given, else float64) and its ``act_ms``, or one
    ``ValueError`` naming the layer."""
    w = float_weights(weight_matrix(w, name))
    act_ms = column_weights(act_ms, w.shape[1], name)
    sanitize(name, w, hint=REGISTRY_NAN_HINT)
    return w, act_ms


def _checked(quantize: Callable[..., QuantResult]) -> Callable[..., QuantResult]:
    """A registry quantizer behind ``_checked_layer``."""
    def checked(w, act_ms=None, name: str = "layer", **kw) -> QuantResult:
        return quantize(*_checked_layer(name, w, act_ms), name=name, **kw)
    return checked


def _registry() -> dict[str, QuantFormat]:
    from sop.golden.formats import get_format
    from sop.golden.points import operating_points

    fmts = [
        QuantFormat("fp8-e4m3-pot", _baseline(B.fp8_e4m3_pot), 8.0, "8 + 8/numel",
                    "E4M3, one power-of-two scale per layer",
                    bits=lambda r, c: 8 * r * c + 8),
        QuantFormat("int8-ch", _baseline(B.int8_per_channel), 8.0, "8 + 32/cols",
                    "INT8, symmetric FP32 scale amax/127 per output row",
                    bits=lambda r, c: 8 * r * c + 32 * r),
    ]
    for name, elem in B.MX_ELEMENTS.items():
        eb = get_format(elem).bits
        fmts.append(QuantFormat(name, _mx(elem), eb + 8 / B.MX_BLOCK, f"{eb} + 8/32",
                                f"OCP MX: {elem.upper()} elements, block 32, UE8M0 shared scale",
                                group=B.MX_BLOCK, bits=_block_bits(eb, B.MX_BLOCK, 8)))
    nv = _block_bits(4, B.NV_BLOCK, 8, per_layer=B.FP32_BITS)
    fmts += [
        QuantFormat("nvfp4", _baseline(B.nvfp4), 4.5, "4 + 8/16 + 32/numel",
                    "E2M1, block 16, E4M3 block scale, FP32 tensor scale", group=B.NV_BLOCK, bits=nv),
        QuantFormat("nvfp4-46", _baseline(B.nvfp4_46), 4.5, "4 + 8/16 + 32/numel",
                    "NVFP4, each block scaled to max 6 or max 4 (Four over Six), lower error wins",
                    group=B.NV_BLOCK, bits=nv),
        QuantFormat("if4", _baseline(B.if4), 4.5, "4 + 8/16 + 32/numel",
                    "IF4: per block E2M1 or INT4 (k*6/7) under an E4M3 scale, choice in its sign bit",
                    group=B.NV_BLOCK, bits=nv),
        QuantFormat("nf4-g64", _baseline(B.nf4_g64), 4.5, "4 + 32/64",
                    "bitsandbytes NF4 (published table), block 64, FP32 absmax",
                    group=B.NF4_BLOCK, bits=_block_bits(4, B.NF4_BLOCK, 32)),
        QuantFormat("sop-budget", _sop_budget, None, "the --budget average (knapsack over layers)",
                    "SOP points chosen per layer under an average bit budget", group=BUDGET_GROUP, kind="sop",
                    model_level=True, solve_budget=quantize_sop_budget),
    ]
    # a point of a quantizer's name would replace that quantizer (or be hidden by it) in this table:
    # golden/points.py cannot see these names, so a clash is refused here, on every look-up
    if clash := sorted({f.name for f in fmts} & set(operating_points())):
        raise ValueError(f"operating point(s) {', '.join(clash)}: the name of a quantizer format "
                         f"(quantize/schemes.py); register the point under another name")
    fmts[-1:-1] = [_point_format(p) for p in operating_points().values()]    # before sop-budget
    return {f.name: replace(f, quantize=_checked(f.quantize)) for f in fmts}


def quant_formats() -> dict[str, QuantFormat]:
    """Every format, by name: built on each call, so a point registered in golden/points.py shows."""
    return _registry()


def get_quant_format(name: str) -> QuantFormat:
    """The format called ``name``; ``ValueError`` listing every valid name otherwise."""
    fmts = quant_formats()
    if not isinstance(name, str):   # `quantize_model(m, ["nf4-g64"], out)` was TypeError "unhashable type: 'list'"
        raise ValueError(f"a format is one name (a string), got {type(name).__name__} {name!r}; valid: "
                         f"{', '.join(fmts)}")
    if name not in fmts:
        case = f": names are lower case ({name.lower()})" if name.lower() in fmts else ""   # `sop codebook NF4` reads
        raise ValueError(f"unknown format {name!r}{case}; valid: {', '.join(fmts)}{own_point_hint()}")
    return fmts[name]
