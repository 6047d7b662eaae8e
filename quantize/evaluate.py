"""`sop eval`: quantize a model's linear layers in each format and measure the damage.

``evaluate(model, formats, ...)`` opens the model (quantize/models.py), gathers
activation statistics where the model can be run (quantize/calib.py), then for
each format quantizes every selected layer, one layer at a time, through the
format registry (quantize/schemes.py) and accumulates the metrics of
quantize/metrics.py. A model-level format (``sop-budget``: the knapsack over
layers under ``budget``) gets every layer at once and is then measured the same
way. For a model it can run it also measures end-to-end fidelity, with the
format's reconstructions substituted into the model: for ``minilm`` and BERT
folders (quantize/e2e.py) the cosine between full-precision and quantized
sentence embeddings on held-out sentences; for causal LMs (quantize/causal_lm.py:
``transformers`` folders, GGUF, ``smollm2``) perplexity, the KL divergence of the
next-token distributions against the unquantized model and top-1 agreement on
held-out text (llama.cpp's ``perplexity --kl-divergence`` convention). Only then
are a format's reconstructions kept until its forward pass (as float32).

The result is a JSON-ready dict (``write_json`` writes it atomically)::

    {"model": str,
     "source": {"spec", "kind", "files", "layers", "weights", "kept": {reason: count}, "forward",
                "lm_head" (what happened to the output head), "notes" (warnings about the reference)},
     "calibration": {"weighted", "note", "key", "sentences", "tokens", "cached", "seqs", "seq_len" (causal LMs)},
     "nan_policy": "error" | "zero", "budget": float | null,
     "formats": {F: {"bpw", "sqnr_db", "rel_mse", "acos", "max_abs_err", "bits", "weights", "seconds",
                     "budget": {"bpw", "report", "error", "lower_bound"}   (sop-budget only),
                     "layers": {name: {"bpw", "sqnr_db", "rel_mse", "acos", "max_abs_err", "choice",
                                       "shape", "weighted"}},
                     "e2e": {"metric": "sentence-embedding cosine", "sentences", "cos_mean", "cos_min"}
                          | {"metric": "causal-lm", "tokens", "ppl", "ppl_ref", "kld", "top1", "windows",
                             "seq_len"}
                          | {"skipped": reason}}}}

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
from sop.quantize.models import kept_text, open_model

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


def _e2e_prepare(src, enabled: bool, n_heldout: int, windows: int = 16, seq_len: int = 256):
    """The end-to-end check, loaded and its text cut (so that a model or text that cannot serve is
    refused before any work): (("bert", runner, sentences) | ("causal-lm", runner, windows), None),
    or (None, {"skipped": why})."""
    if not enabled:
        return None, {"skipped": "disabled"}
    if src.forward == "causal-lm":
        from sop.quantize import causal_lm

        runner = causal_lm.load(src)
        ids = runner.token_ids(C.heldout_sentences(C.HELDOUT_RESERVE))
        return ("causal-lm", runner, runner.windows(ids, windows, seq_len,
                                                    "held-out text (--e2e-windows x --seq-len)")), None
    if src.bert_folder is None:
        return None, {"skipped": f"no forward pass for this model ({src.forward_note or src.kind})"}
    from sop.quantize.e2e import Bert

    return ("bert", Bert(src.bert_folder, src.bert_prefix), C.heldout_sentences(n_heldout)), None


def _e2e_reference(prep):
    """The prepared check with its reference run: ("bert", bert, sentences, embeddings) | ("causal-lm", runner)."""
    if prep is None:
        return None
    if prep[0] == "causal-lm":
        prep[1].reference(prep[2])
        return ("causal-lm", prep[1])
    _, bert, sentences = prep
    return ("bert", bert, sentences, bert.embed(sentences))


def _e2e_measure(runner, recons: dict) -> dict:
    if runner[0] == "causal-lm":
        return runner[1].score(recons)
    from sop.quantize.e2e import embedding_fidelity

    _, bert, sentences, ref = runner
    return embedding_fidelity(ref, bert.embed(sentences, weights=recons))


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


def announce(src, say) -> None:
    """What was kept and why (progress), and the warnings about the reference: one line each,
    printed even when quiet (a warning is no progress)."""
    say(f"{src.spec}: {src.kept_line()}")
    for note in src.notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)


def calibration_for(src, calibrate: bool, n_calib, cache_dir, say, announced: bool = False):
    """The model's activation statistics (unweighted when disabled or the model cannot run).

    ``n_calib``: the sentence count, or a ``calib.CalibSize`` (causal LMs: windows x tokens).
    Says what was kept and warns about the reference first (``announce``), unless ``announced``."""
    if not announced:
        announce(src, say)
    size = n_calib if isinstance(n_calib, C.CalibSize) else C.CalibSize(n_calib)
    if calibrate and src.forward == "causal-lm":
        from sop.quantize import causal_lm

        causal_lm.check_memory(src, 0, size.seq_len)
        say(f"calibrating on {size.seqs} x {size.seq_len} tokens (cache {cache_dir})")
    elif calibrate and src.bert_folder is not None:
        say(f"calibrating on {size.sentences} sentences (cache {cache_dir})")
    return (C.calibrate(src, size, cache_dir) if calibrate
            else C.unweighted("calibration disabled; errors are unweighted (a = 1)"))


def budget_inputs(src, cal, nan_policy: str):
    """The layers of ``src`` for a model-level format: name -> ``(w, act_ms)``, each layer read
    (and checked, as every command checks it) only when the knapsack asks for it."""
    from sop.quantize.knapsack import LazyLayers

    return LazyLayers([lay.name for lay in src.layers],
                      lambda name: (narrow_weights(sanitize(name, src.load(name), nan_policy)[0]), cal.get(name)))


def evaluate(model: str, formats: list[str], *, budget: float | None = None, include=None, exclude=None,
             calibrate: bool = True, e2e: bool = True, nan_policy: str = "error",
             n_calib: "int | C.CalibSize" = C.N_CALIB, n_heldout: int = C.N_HELDOUT, cache_dir=C.DEFAULT_CACHE,
             progress: bool = True, lm_head: bool = False, e2e_windows: int = 16, on_format=None) -> dict:
    """Quantize ``model`` in every format and measure it; see the module docstring.

    ``n_calib``: calibration sentences, or a ``calib.CalibSize`` (causal LMs: ``seqs`` windows of
    ``seq_len`` tokens; ``seq_len`` is also the length of the ``e2e_windows`` held-out windows).
    ``lm_head``: quantize the output head too. ``on_format(name, runner, recons)``, if given, is
    called after each format's end-to-end check with the causal-LM runner and that format's
    float32 reconstructions (the demo prints a greedy completion there)."""
    from tqdm import tqdm

    names = list(dict.fromkeys(formats))
    if not names:
        raise ValueError("no format given")
    fmts = [get_quant_format(n) for n in names]          # unknown names fail here, before any work
    check_options(fmts, budget, nan_policy)
    size = n_calib if isinstance(n_calib, C.CalibSize) else C.CalibSize(n_calib)
    if isinstance(e2e_windows, bool) or not isinstance(e2e_windows, (int, np.integer)) or e2e_windows < 1:
        raise ValueError(f"--e2e-windows must be a positive integer, got {e2e_windows!r}")
    say = reporter(progress)
    src = open_model(model, include, exclude, lm_head=lm_head)
    say(f"{model}: {len(src.layers)} linear layers, {src.n_weights:,} weights")
    announce(src, say)
    if src.forward == "causal-lm" and e2e:
        from sop.quantize import causal_lm

        causal_lm.check_memory(src, e2e_windows, size.seq_len)       # before any work
    prep, e2e_skip = _e2e_prepare(src, e2e, n_heldout, e2e_windows, size.seq_len)
    cal = calibration_for(src, calibrate, size, cache_dir, say, announced=True)
    if not cal.weighted:
        say(f"calibration: {cal.note}")
    if prep is not None and prep[0] == "causal-lm":
        say(f"end-to-end reference: {e2e_windows} x {size.seq_len} held-out tokens")
    runner = _e2e_reference(prep)
    del prep

    doc = {"model": str(model), "source": src.describe(), "calibration": cal.describe(),
           "nan_policy": nan_policy, "budget": budget, "formats": {}}
    for fmt in fmts:
        t0 = time.time()
        layers, stats, recons = {}, [], {}
        budgeted = None
        if fmt.model_level:                 # the knapsack needs every layer at once
            say(f"{fmt.name}: building every layer's options and solving under {budget} bpw")
            budgeted = fmt.quantize_model(budget_inputs(src, cal, nan_policy), budget)
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
            say(f"{fmt.name}: end-to-end check")
            entry["e2e"] = e = _e2e_measure(runner, recons)
            if "kld" in e:
                say(f"{fmt.name}: ppl {e['ppl']:.3f} (reference {e['ppl_ref']:.3f}), KLD {e['kld']:.3e}, "
                    f"top-1 {e['top1']:.4f}")
            if on_format is not None and runner[0] == "causal-lm":
                on_format(fmt.name, runner[1], recons)
        else:
            entry["e2e"] = dict(e2e_skip)
        recons = None
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


def _causal(doc: dict) -> bool:
    return any(f.get("e2e", {}).get("metric") == "causal-lm" for f in doc["formats"].values())


def format_table(doc: dict) -> str:
    """The human-readable summary `sop eval` prints."""
    src, cal = doc["source"], doc["calibration"]
    lines = [f"model {doc['model']} ({src['kind']}): {src['layers']} linear layers, {src['weights']:,} weights"]
    if isinstance(src.get("kept"), dict):
        lines.append(kept_text(src["kept"], src.get("lm_head", "")))
    lines += [f"warning: {n}" for n in src.get("notes", [])]
    lines += [f"calibration: {cal['note']}" + (" [cached]" if cal.get("cached") else ""), ""]
    causal = _causal(doc)
    e2e_head = f"{'ppl':>9}{'KLD':>11}{'top-1':>8}" if causal else f"{'e2e cos mean':>14}{'e2e cos min':>13}"
    head = f"{'format':<16}{'bpw':>8}{'SQNR dB':>9}{'rel MSE':>11}{'1-ACos':>11}{'max err':>10}{e2e_head}"
    lines.append(head)
    ref = None
    for name, f in doc["formats"].items():
        e = f["e2e"]
        if causal:
            e2e = (f"{e['ppl']:9.3f}{e['kld']:11.3e}{e['top1']:8.4f}" if "kld" in e
                   else f"{'-':>9}{'-':>11}{'-':>8}")
            ref = e if "kld" in e else ref
        else:
            e2e = (f"{e['cos_mean']:14.6f}{e['cos_min']:13.6f}" if "cos_mean" in e else f"{'-':>14}{'-':>13}")
        sq = f["sqnr_db"]
        sq = f"{sq:9.2f}" if sq is not None else f"{'inf':>9}"
        lines.append(f"{name:<16}{f['bpw']:8.4f}{sq}{f['rel_mse']:11.3e}{1 - f['acos']:11.3e}"
                     f"{f['max_abs_err']:10.4f}{e2e}")
    if ref is not None:
        lines.append(f"e2e: next-token perplexity, mean KL divergence (nats/token) against the unquantized model "
                     f"and top-1 agreement on {ref['tokens']:,} held-out tokens ({ref['windows']} windows of "
                     f"{ref['seq_len']}, second halves scored); reference ppl {ref['ppl_ref']:.3f}")
    skipped = {e['skipped'] for f in doc["formats"].values() if "skipped" in (e := f["e2e"])}
    if skipped:
        lines.append(f"e2e: skipped ({'; '.join(sorted(skipped))})")
    return "\n".join(lines)
