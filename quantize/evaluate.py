"""`sop eval`: quantize a model's linear layers in each format and measure the damage.

``evaluate(model, formats, ...)`` opens the model (quantize/models.py), gathers
activation statistics where the model can be run (quantize/calib.py), then for
each format quantizes every selected layer, one layer at a time, through the
format registry (quantize/schemes.py) and accumulates the metrics of
quantize/metrics.py. A model-level format (``sop-budget``: the knapsack over
layers under ``budget``) gets every layer at once and is then measured the same
way. For a model it can run (``minilm``, BERT folders) it also
measures end-to-end fidelity (quantize/e2e.py): the cosine between full-precision
and quantized sentence embeddings on held-out sentences; only then are a
format's reconstructions kept until its forward pass (as float32).

The result is a JSON-ready dict (``write_json`` writes it atomically)::

    {"model": str,
     "source": {"spec", "kind", "files", "layers", "weights"},
     "calibration": {"weighted", "note", "key", "sentences", "tokens", "cached"},
     "nan_policy": "error" | "zero", "budget": float | null,
     "formats": {F: {"bpw", "sqnr_db", "rel_mse", "acos", "max_abs_err", "bits", "weights", "seconds",
                     "budget": {"bpw", "report", "error", "lower_bound"}   (sop-budget only),
                     "layers": {name: {"bpw", "sqnr_db", "rel_mse", "acos", "max_abs_err", "choice",
                                       "shape", "weighted"}},
                     "e2e": {"metric", "sentences", "cos_mean", "cos_min"} | {"skipped": reason}}}}

A non-finite number (the SQNR of an exact reconstruction) is written as null.

Bad input: an unknown format raises ``ValueError`` listing the valid names
before any work; a NaN or Inf weight raises ``ValueError`` naming the layer, row
and column (of the ``(out, in)`` matrix) unless ``nan_policy="zero"``, which
replaces each with 0, uses the cleaned matrix as the reference and reports the
count in the layer's ``nonfinite_replaced``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from sop.golden.files import write_atomic
from sop.golden.formats import FLOAT32_MAX, to_float32
from sop.quantize import calib as C
from sop.quantize.blockwise import narrow_weights
from sop.quantize.schemes import get_quant_format
from sop.quantize.metrics import ErrorStats, abs_max, aggregate
from sop.quantize.models import open_model

NAN_POLICIES = ("error", "zero")


FLOAT32_TINY = float(np.finfo(np.float32).tiny)      # the smallest normal float32, 2^-126


def sanitize(name: str, w: np.ndarray, policy: str = "error") -> tuple[np.ndarray, int]:
    """The weight with non-finite entries handled by ``policy``, and how many there were.

    A weight beyond float32's range, or a nonzero layer whose every weight lies
    below float32's smallest normal number (possible only in a float64
    checkpoint), is refused: the outputs (float32 files, BF16 hardware values)
    could not hold it, the first as Inf, the second as all zeros."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"unknown NaN policy {policy!r}; valid: {', '.join(NAN_POLICIES)}")
    bad = ~np.isfinite(w)
    n = int(bad.sum())
    if n and policy == "error":
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: non-finite weight {w[r, c]} at row {r}, column {c} ({n} in the layer); "
                         f"--nan-policy zero replaces them with 0")
    w = np.where(bad, 0.0, w) if n else w
    peak = abs_max(w)
    if peak > FLOAT32_MAX:
        r, c = (int(i) for i in np.argwhere(np.abs(w) > FLOAT32_MAX)[0])
        raise ValueError(f"{name}: weight {w[r, c]:.6g} at row {r}, column {c} is beyond float32's range "
                         f"(+-{FLOAT32_MAX:.6g}); the quantized outputs are float32 and BF16: rescale the "
                         f"checkpoint")
    if 0 < peak < FLOAT32_TINY:
        raise ValueError(f"{name}: every weight lies below float32's smallest normal number "
                         f"({FLOAT32_TINY:.6g}; the largest is {peak:.6g}): the layer would decode to "
                         f"zeros; rescale the checkpoint")
    return w, n


def _e2e_runner(src, enabled: bool, n_heldout: int):
    if not enabled:
        return None, {"skipped": "disabled"}
    if src.bert_folder is None:
        return None, {"skipped": f"no forward pass for this model ({src.kind})"}
    from sop.quantize.e2e import Bert

    bert = Bert(src.bert_folder, src.bert_prefix)
    sentences = C.heldout_sentences(n_heldout)
    return (bert, sentences, bert.embed(sentences)), None


def check_options(fmts, budget: float | None, nan_policy: str) -> None:
    """Refuse a NaN policy, or a budget given to / missing from the formats, before any work."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"unknown NaN policy {nan_policy!r}; valid: {', '.join(NAN_POLICIES)}")
    if budget is not None and not any(f.model_level for f in fmts):
        raise ValueError("--budget applies to a budgeted format (sop-budget) only")
    if budget is None and any(f.model_level for f in fmts):
        raise ValueError(f"{next(f.name for f in fmts if f.model_level)} needs --budget B "
                         f"(average bits per weight)")


def reporter(progress: bool):
    """A ``say(msg)`` that prints status lines to stderr when ``progress`` is on."""
    def say(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)
    return say


def calibration_for(src, calibrate: bool, n_calib: int, cache_dir, say):
    """The model's activation statistics (unweighted when disabled or the model cannot run)."""
    if calibrate and src.bert_folder is not None:
        say(f"calibrating on {n_calib} sentences (cache {cache_dir})")
    return (C.calibrate(src, n_calib, cache_dir) if calibrate
            else C.unweighted("calibration disabled; errors are unweighted (a = 1)"))


def evaluate(model: str, formats: list[str], *, budget: float | None = None, include=None, exclude=None,
             calibrate: bool = True, e2e: bool = True, nan_policy: str = "error",
             n_calib: int = C.N_CALIB, n_heldout: int = C.N_HELDOUT, cache_dir=C.DEFAULT_CACHE,
             progress: bool = True) -> dict:
    """Quantize ``model`` in every format and measure it; see the module docstring."""
    from tqdm import tqdm

    names = list(dict.fromkeys(formats))
    if not names:
        raise ValueError("no format given")
    fmts = [get_quant_format(n) for n in names]          # unknown names fail here, before any work
    check_options(fmts, budget, nan_policy)
    say = reporter(progress)
    src = open_model(model, include, exclude)
    say(f"{model}: {len(src.layers)} linear layers, {src.n_weights:,} weights")
    cal = calibration_for(src, calibrate, n_calib, cache_dir, say)
    if not cal.weighted:
        say(f"calibration: {cal.note}")
    runner, e2e_skip = _e2e_runner(src, e2e, n_heldout)

    doc = {"model": str(model), "source": src.describe(), "calibration": cal.describe(),
           "nan_policy": nan_policy, "budget": budget, "formats": {}}
    for fmt in fmts:
        t0 = time.time()
        layers, stats, recons = {}, [], {}
        budgeted = None
        if fmt.model_level:                 # the knapsack needs every layer at once
            say(f"{fmt.name}: building every layer's options and solving under {budget} bpw")
            inputs = {lay.name: (narrow_weights(sanitize(lay.name, src.load(lay.name), nan_policy)[0]),
                                 cal.get(lay.name)) for lay in src.layers}
            budgeted = fmt.quantize_model(inputs, budget)
            del inputs
        for lay in tqdm(src.layers, desc=f"{fmt.name:>16}", unit="layer", file=sys.stderr,
                        disable=not progress, leave=False):
            w, n_bad = sanitize(lay.name, src.load(lay.name), nan_policy)
            w = narrow_weights(w)           # float32 where exact: the layer held costs 4 bytes a weight
            act = cal.get(lay.name)
            if budgeted is not None:
                res = budgeted.results.pop(lay.name)
                res.choice = f"{budgeted.choice[lay.name]}: {res.choice}"
            else:
                res = fmt.quantize(w, act_ms=act, name=lay.name)
            s = ErrorStats.of(w, res.recon, act, res.bits)
            stats.append(s)
            rec = {**s.as_dict(), "choice": res.choice, "shape": list(lay.shape), "weighted": act is not None}
            if n_bad:
                rec["nonfinite_replaced"] = n_bad
            layers[lay.name] = rec
            if runner is not None:
                recons[lay.name] = to_float32(res.recon)
            del w, res                      # before the next layer is read
        total = aggregate(stats)
        entry = {**total.as_dict(), "bits": total.bits, "weights": total.weights}
        if budgeted is not None:
            sol = budgeted.solution
            entry["budget"] = {"bpw": budget, "report": budgeted.report, "error": sol.error,
                               "lower_bound": sol.lower_bound}
        if runner is not None:
            from sop.quantize.e2e import embedding_fidelity

            bert, sentences, ref = runner
            entry["e2e"] = embedding_fidelity(ref, bert.embed(sentences, weights=recons))
        else:
            entry["e2e"] = dict(e2e_skip)
        entry["seconds"] = round(time.time() - t0, 3)
        entry["layers"] = layers
        doc["formats"][fmt.name] = entry
    return doc


def jsonable(x):
    """``x`` with numpy scalars made Python numbers and non-finite floats made None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return jsonable(x.item())
    return x


def to_json(doc: dict) -> str:
    return json.dumps(jsonable(doc), indent=1, allow_nan=False)


def write_json(path, doc: dict) -> None:
    write_atomic(Path(path), (to_json(doc) + "\n").encode())


def format_table(doc: dict) -> str:
    """The human-readable summary `sop eval` prints."""
    src, cal = doc["source"], doc["calibration"]
    lines = [f"model {doc['model']} ({src['kind']}): {src['layers']} linear layers, {src['weights']:,} weights",
             f"calibration: {cal['note']}" + (" [cached]" if cal.get("cached") else ""), ""]
    head = f"{'format':<16}{'bpw':>8}{'SQNR dB':>9}{'rel MSE':>11}{'1-ACos':>11}{'max err':>10}" \
           f"{'e2e cos mean':>14}{'e2e cos min':>13}"
    lines.append(head)
    for name, f in doc["formats"].items():
        e = f["e2e"]
        e2e = (f"{e['cos_mean']:14.6f}{e['cos_min']:13.6f}" if "cos_mean" in e else f"{'-':>14}{'-':>13}")
        lines.append(f"{name:<16}{f['bpw']:8.4f}{f['sqnr_db']:9.2f}{f['rel_mse']:11.3e}{1 - f['acos']:11.3e}"
                     f"{f['max_abs_err']:10.4f}{e2e}")
    skipped = {e['skipped'] for f in doc["formats"].values() if "skipped" in (e := f["e2e"])}
    if skipped:
        lines.append(f"e2e: skipped ({'; '.join(sorted(skipped))})")
    return "\n".join(lines)
