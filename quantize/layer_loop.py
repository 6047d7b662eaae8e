"""The per-layer loop every command runs: read a layer, quantize it, measure it, report it.

``sop eval`` (quantize/evaluate.py) and ``sop quantize`` (quantize/artifact.py) both run it; in-memory
quantization (quantize/in_memory.py) builds the same ``LayerOutcome``. The steps, in order:

* ``check_options`` refuses a bad NaN policy or budget before any work; ``reporter`` is the
  progress printer, ``announce`` says what was kept and warns about the reference;
* ``calibration_for`` gathers the activation statistics (quantize/calib.py), or says why there are none;
* ``read_weight`` reads and checks one layer (quantize/inputs.py ``sanitize``: a non-finite weight is an
  error or 0 by ``--nan-policy``); ``quantize_layer`` quantizes it through the format registry
  (quantize/schemes.py) and measures it (quantize/metrics.py);
* ``layer_outcomes`` runs that over every layer, here or on ``--jobs`` workers (quantize/jobs.py
  ``layer_task``), as ``(LayerOutcome, arrays)`` in layer order; ``layer_outcome`` is one layer of it,
  with the float32 reconstruction (``sop eval``'s forward pass) or the ``.sopq`` record;
* a model-level format (``sop-budget``): ``budget_model`` measures every layer's options and solves the
  knapsack (quantize/knapsack.py), ``BudgetOutcomes`` then yields each layer's chosen result the same way.

Each layer prints one progress line (``layer_line``: name, shape, seconds).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from numbers import Real

import numpy as np

from sop.golden.formats import to_float32
from sop.quantize import calib as C
from sop.quantize.blockwise import narrow_weights
from sop.quantize.checkpoint_files import CheckpointError
from sop.quantize.inputs import NAN_POLICIES, WeightError, no_calib, on_command_line, option, sanitize
from sop.quantize.metrics import ErrorStats
from sop.quantize.schemes import get_quant_format
from sop.terminal import one_line


def read_weight(src, name: str, policy: str = "error") -> tuple[np.ndarray, int]:
    """A layer of ``src`` read and checked by ``sanitize``, narrowed to float32 where exact (4 bytes
    a weight held), and its count of non-finite entries. A weight the outputs cannot hold is a
    ``CheckpointError`` naming the file that holds it, as every other fault of a checkpoint is."""
    try:
        w, n_bad = sanitize(name, src.load(name), policy)
    except WeightError as e:
        raise CheckpointError(src.file_of(name), str(e)) from None
    return narrow_weights(w), n_bad


def check_options(fmts, budget: float | None, nan_policy: str) -> float | None:
    """Refuse a NaN policy, or a budget given to / missing from the formats or not above 0, before any work
    (a budget of 0 was refused only once calibration was done); the budget as a float (a Python ``Fraction``
    or an int past float's range, a budget past every option as ``inf`` is, were a TypeError and an
    OverflowError from the knapsack). The budget is named as its caller gave it (``inputs.option``):
    ``budget=`` from Python, ``--budget`` from the command line."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"unknown NaN policy {nan_policy!r}; valid: {', '.join(NAN_POLICIES)}")
    if budget is not None and not any(f.model_level for f in fmts):
        raise ValueError(f"{option('budget')} applies to a budgeted format (sop-budget) only")
    if budget is None and any(f.model_level for f in fmts):
        raise ValueError(f"{next(f.name for f in fmts if f.model_level)} needs {option('budget', 'B')} "
                         f"(average bits per weight)")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise ValueError(f"{option('budget')} must be a number (average bits per weight), got {budget!r}")
    if not budget > 0:                                  # NaN too
        raise ValueError(f"{option('budget')} must be a number above 0, got {budget!r}")
    try:
        return float(budget)
    except OverflowError:                               # an int past float's range: past every option too
        return math.inf


def reporter(progress: bool):
    """A ``say(msg)`` that prints status lines to stderr when ``progress`` is on, each one terminal line
    (``sop.terminal.one_line``: a tensor name is any string, line breaks and escape sequences too)."""
    def say(msg):
        if progress:
            print(one_line(msg), file=sys.stderr, flush=True)
    return say


def announce(src, say) -> None:
    """What was kept and why (progress), and the warnings about the reference: one line each,
    printed even when quiet (a warning is no progress)."""
    say(f"{src.spec}: {src.kept_line()}")
    for note in src.notes:
        print(one_line(f"warning: {note}"), file=sys.stderr, flush=True)


def unused_size_warning(src, size, calibrate: bool = True) -> None:
    """One warning line where the calibration size given is of the other kind of model than ``src``'s forward
    pass runs, and so unused: ``--calib-sentences 64`` on a causal LM calibrated on the default 32 x 256
    tokens, ``--calib-seqs`` / ``--seq-len`` on a sentence encoder on 256 sentences, without a word; and
    where no calibration runs (``--no-calib``), a count of sentences or windows given (``--seq-len`` is
    left out: it also sets the length of a causal LM's held-out windows in ``sop eval``)."""
    default, cli = C.CalibSize(), on_command_line()
    if not calibrate:
        given = [f"{option(k, str(v))}" for k, v, d in (("calib_sentences", size.sentences, default.sentences),
                                                         ("calib_seqs", size.seqs, default.seqs)) if v != d]
        if cli and given:
            print(one_line(f"warning: {' '.join(given)} unused: {no_calib()} skips the calibration"),
                  file=sys.stderr, flush=True)
        return
    if src.forward == "causal-lm" and size.sentences != default.sentences:
        given, rule = (f"--calib-sentences {size.sentences}", "--calib-seqs x --seq-len") if cli else \
            (f"n_calib={size.sentences}", "n_calib=CalibSize(seqs=, seq_len=)")
        said = (f"{given} counts a sentence encoder's (BERT) calibration sentences, unused here: a causal LM "
                f"calibrates on {rule} tokens ({size.seqs} x {size.seq_len})")
    elif src.bert_folder is not None and (size.seqs, size.seq_len) != (default.seqs, default.seq_len):
        given, rule = (f"--calib-seqs {size.seqs} --seq-len {size.seq_len} set", "--calib-sentences") if cli else \
            (f"n_calib=CalibSize(seqs={size.seqs}, seq_len={size.seq_len}) sets", "n_calib")
        said = (f"{given} a causal LM's calibration windows, unused here: a sentence encoder (BERT) calibrates "
                f"on {rule} sentences ({size.sentences})")
    else:
        return
    print(one_line(f"warning: {said}"), file=sys.stderr, flush=True)


def calibration_for(src, calibrate: bool, n_calib, cache_dir, say, announced: bool = False):
    """The model's activation statistics (unweighted when disabled or the model cannot run).

    ``n_calib``: the sentence count, or a ``calib.CalibSize`` (causal LMs: windows x tokens).
    Says what was kept and warns about the reference first (``announce``), unless ``announced``."""
    if not announced:
        announce(src, say)
    size = n_calib if isinstance(n_calib, C.CalibSize) else C.CalibSize(n_calib)
    unused_size_warning(src, size, calibrate)
    if calibrate and src.forward == "causal-lm":
        from sop.quantize import causal_lm

        causal_lm.check_memory(src, 0, size.seq_len)
        of = f" of {size.text.path}" if size.text is not None else ""
        say(f"calibrating on {size.seqs} x {size.seq_len} tokens{of} (cache {cache_dir})")
    elif calibrate and src.bert_folder is not None:
        from sop.quantize import e2e as E
        from sop.quantize.memory import check_fits

        check_fits(E.memory_needed(src) - 4 * src.n_weights, f"{src.spec}: the forward pass for calibration "
                   f"(the BERT model in float32)", f"{no_calib()} skips it (unweighted search)")
        say(f"calibrating on {size.sentences} sentences (cache {cache_dir})")
    return (C.calibrate(src, size, cache_dir, say=say) if calibrate
            else C.unweighted("calibration disabled; errors are unweighted (a = 1)"))


def budget_inputs(src, cal, nan_policy: str, say=None):
    """The layers of ``src`` for a model-level format: name -> ``(w, act_ms)``, each layer read
    (and checked, as every command checks it) only when the knapsack asks for it. With ``say``,
    the first pass over the layers (the knapsack's options, built layer by layer) prints one
    progress line per layer as the next is read; ``budget_done(inputs)`` prints the last."""
    from sop.quantize.knapsack import LazyLayers

    shapes = {lay.name: lay.shape for lay in src.layers}
    n = len(src.layers)
    seen: list = []                     # (name, start time) of the layers read in the first pass

    def load(name):
        if say is not None and len(seen) < n:
            _budget_line(say, seen, n, shapes)
            seen.append((name, time.perf_counter()))
        return read_weight(src, name, nan_policy)[0], cal.get(name)

    class Inputs(LazyLayers):
        progress = (say, seen, n, shapes)          # for budget_done

    return Inputs([lay.name for lay in src.layers], load)


def budget_model(fmt, src, cal, nan_policy: str, budget: float, say, pool):
    """``fmt.solve_budget`` (sop-budget) over ``src``'s layers: ``(inputs, BudgetResult)``.
    Every layer's options measured here, or on ``pool``'s workers (quantize/jobs.py: the same
    bits, at most ``jobs`` layers in flight), then the knapsack here; ``inputs`` reads the
    layers the chosen results need as they are built."""
    if pool is None:
        inputs = budget_inputs(src, cal, nan_policy, say)
        budgeted = fmt.solve_budget(inputs, budget, option=option("budget"))     # as its caller named it
        budget_done(inputs)
        return inputs, budgeted
    from sop.quantize import jobs

    def rows():
        args = [(src.opened_with, lay.name, cal.get(lay.name), nan_policy) for lay in src.layers]
        results = pool.map(jobs.budget_layer, args, label=lambda i: src.layers[i].name,
                           weights=lambda i: src.layers[i].size)
        for i, ((row, cols, real, seconds), _) in enumerate(results, 1):
            lay = src.layers[i - 1]
            say(layer_line(f"{fmt.name} options", i, len(src.layers), lay.name, lay.shape, seconds))
            yield row, cols, real

    inputs = budget_inputs(src, cal, nan_policy)        # no progress: read only for the results
    return inputs, fmt.solve_budget(inputs, budget, rows=rows(), option=option("budget"))


def _budget_line(say, seen, n, shapes) -> None:
    if seen and len(seen) <= n:
        name, t0 = seen[-1]
        say(layer_line("sop-budget options", len(seen), n, name, shapes[name], time.perf_counter() - t0))


def budget_done(inputs) -> None:
    """The progress line of the last layer of the knapsack's first pass (see ``budget_inputs``)."""
    say, seen, n, shapes = inputs.progress
    if say is not None and len(seen) == n:
        _budget_line(say, seen, n, shapes)
        seen.append(None)               # printed once


def layer_line(what: str, i: int, n: int, name: str, shape, seconds: float) -> str:
    """The progress line of one layer: ``what [i/n] name ROWSxCOLS: s``."""
    return f"{what} [{i}/{n}] {name} {shape[0]}x{shape[1]}: {seconds:.2f} s"


def quantize_layer(src, name: str, fmt, act, nan_policy: str):
    """One layer read, checked and quantized: ``(QuantResult, ErrorStats, non-finite count)``.
    The computation of every command, in this process or a --jobs worker (quantize/jobs.py)."""
    w, n_bad = read_weight(src, name, nan_policy)
    res = fmt.quantize(w, act_ms=act, name=name)
    return res, ErrorStats.of(w, res.recon, act, res.bits), n_bad


@dataclass
class LayerOutcome:
    """What a --jobs worker sends back for one layer (its arrays travel beside it, raw)."""

    name: str
    stats: ErrorStats
    choice: str
    bits: int
    n_bad: int
    seconds: float
    record: tuple | None = None          # (kind, padded shape): the payload is the first array


def recon_float32(recon) -> np.ndarray:
    """``to_float32(recon)`` built row chunk by row chunk (no float64 temporary of the layer)."""
    recon = np.asarray(recon)
    out = np.empty(recon.shape, dtype=np.float32)
    step = max(1, (1 << 18) // max(1, recon.shape[-1]))
    for r in range(0, recon.shape[0], step):
        out[r:r + step] = to_float32(recon[r:r + step])
    return out


def layer_outcome(src, name: str, fmt_name: str, act, nan_policy: str, want: str | None):
    """``quantize_layer`` packed for the parent: ``(LayerOutcome, arrays)``; ``want`` "recon" adds
    the float32 reconstruction, "record" the ``.sopq`` record (quantize/artifact.py) as one array."""
    from sop.quantize.artifact import record_payload

    t0 = time.perf_counter()
    res, stats, n_bad = quantize_layer(src, name, get_quant_format(fmt_name), act, nan_policy)
    arrays, record = [], None
    if want == "recon":
        arrays.append(recon_float32(res.recon))
    elif want == "record":
        kind, payload, padded = record_payload(res, src.layer(name).shape, name)
        arrays.append(payload)
        record = (kind, padded)
    return LayerOutcome(name, stats, res.choice, int(res.bits), n_bad, time.perf_counter() - t0, record), arrays


def layer_outcomes(src, fmt, cal, nan_policy: str, want: str | None, pool):
    """``(LayerOutcome, arrays)`` of every layer in order: quantized here one at a time, or on the
    workers of ``pool`` (at most its ``jobs`` layers in flight)."""
    if pool is not None:
        from sop.quantize import jobs

        args = [(src.opened_with, lay.name, fmt.name, cal.get(lay.name), nan_policy, want) for lay in src.layers]
        # statistics only (no arrays): every layer may be sent ahead, none waits behind a large one
        yield from pool.map(jobs.layer_task, args, label=lambda i: src.layers[i].name,
                            weights=lambda i: src.layers[i].size, ahead=len(args) if want is None else None)
        return
    for lay in src.layers:
        yield layer_outcome(src, lay.name, fmt.name, cal.get(lay.name), nan_policy, want)


class BudgetOutcomes:
    """The chosen result of every layer of a budgeted format as ``(LayerOutcome, payload)``, in
    order, built one at a time (``BudgetResult.results`` is lazy); ``budgeted`` is the result.
    ``pack(result, layer)`` gives the outcome's ``record`` and the payload beside it: for
    ``sop eval`` no record and the float32 reconstruction or nothing, for ``sop quantize`` the
    ``.sopq`` record and its row chunks (quantize/artifact.py)."""

    def __init__(self, budgeted, src, cal, nan_policy: str, pack):
        self.budgeted, self.src, self.cal, self.nan_policy, self.pack = budgeted, src, cal, nan_policy, pack

    def __iter__(self):
        b = self.budgeted
        for lay in self.src.layers:
            t0 = time.perf_counter()
            w, n_bad = read_weight(self.src, lay.name, self.nan_policy)
            act = self.cal.get(lay.name)
            res = b.results.pop(lay.name)
            s = ErrorStats.of(w, res.recon, act, res.bits)
            del w
            record, payload = self.pack(res, lay)
            out = LayerOutcome(lay.name, s, f"{b.choice[lay.name]}: {res.choice}", int(res.bits), n_bad,
                               time.perf_counter() - t0, record)
            del res
            yield out, payload
