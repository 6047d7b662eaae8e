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
held-out text (llama.cpp's ``perplexity --kl-divergence`` convention): the built-in one, or a file of the
user's (``eval_text``, `sop eval --eval-text`). Only then
are a format's reconstructions kept until its forward pass (as float32).
``jobs=N`` quantizes the layers of a per-layer format N at a time in worker
processes (quantize/jobs.py), results taken in layer order: the same document.
Each layer prints one progress line (``layer_line``: name, shape, seconds). Each line is said once, in the
stream it belongs to: the summary of what was measured (the layers kept as they are, the calibration) is
the report's (``format_table``, `sop eval`'s standard output, a file when piped), not progress too; a
warning about the reference is standard error's, printed at the start even when quiet, and in the
JSON's ``source.notes``, not the report's (`sop eval` printed both twice on a terminal). An
end-to-end check or calibration that would not fit in memory is refused before
any work (``check_e2e_memory``, quantize/memory.py). The per-layer loop itself (read, quantize,
measure, report; ``--jobs``; sop-budget's knapsack) is quantize/layer_loop.py's, which `sop quantize`
runs too.

The result is a JSON-ready dict (``write_json`` writes it atomically)::

    {"model": str,
     "source": {"spec", "kind", "files", "layers", "weights", "kept": {reason: count}, "forward",
                "lm_head" (what happened to the output head), "notes" (warnings about the reference)},
     "calibration": {"weighted", "note", "key", "sentences", "tokens", "cached", "seqs", "seq_len" (causal LMs),
                     "text" (``calib_text``: {"path", "sha256"})},
     "nan_policy": "error" | "zero", "budget": float | null,
     "formats": {F: {"bpw", "sqnr_db", "rel_mse", "acos", "max_abs_err", "bits", "weights", "seconds",
                     "budget": {"bpw", "report", "error", "lower_bound"}   (sop-budget only),
                     "layers": {name: {"bpw", "sqnr_db", "rel_mse", "acos", "max_abs_err", "choice",
                                       "shape", "weighted"}},
                     "e2e": {"metric": "sentence-embedding cosine", "sentences", "cos_mean", "cos_min"}
                          | {"metric": "causal-lm", "tokens", "ppl", "ppl_ref", "kld", "top1", "windows",
                             "seq_len", "text" (``eval_text``: {"path", "sha256"})}
                          | {"skipped": reason}}}}

A non-finite number (the SQNR of an exact reconstruction) is written as null.

Bad input: an unknown format raises ``ValueError`` listing the valid names
before any work; a NaN or Inf weight raises ``ValueError`` naming the layer, row
and column (of the ``(out, in)`` matrix) unless ``nan_policy="zero"``, which
replaces each with 0, uses the cleaned matrix as the reference and reports the
count in the layer's ``nonfinite_replaced``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from sop.golden.files import write_atomic
from sop.quantize import calib as C
from sop.quantize.schemes import get_quant_format
from sop.quantize.inputs import boolean, cache_folder, no_e2e, option
from sop.quantize.knapsack import check_budget_shapes
from sop.quantize.metrics import aggregate
from sop.quantize.causal_lm import DEFAULT_E2E_WINDOWS, DEFAULT_SEQ_LEN
from sop.quantize.layer_loop import (BudgetOutcomes, announce, budget_model, calibration_for, check_options,
                                     layer_line, layer_outcomes, read_weight, recon_float32, reporter)
from sop.quantize.models import kept_text, linear_layers, open_model
from sop.terminal import one_line


def clean_forward_weight(src, name: str, weight) -> int:
    """A forward pass's torch copy of selected layer ``name`` (in place), as ``read_weight`` reads the
    layer under ``src.nan_policy``: non-finite entries 0 (``zero``), or the error naming the first
    (``error``). Calibration and the end-to-end reference then run the cleaned model the metrics
    measure against (a NaN once reached the next layers' statistics, and the error named one of them).
    Returns how many entries were replaced."""
    import torch

    data = weight.data
    try:        # numpy tests a float32 matrix in one thread, 20 times faster than torch (SmolLM2: 7.5 s to 0.02 s)
        if np.isfinite(data.numpy()).all():
            return 0
    except (TypeError, RuntimeError):                   # bf16, or a tensor numpy cannot view
        pass
    bad = ~torch.isfinite(data)
    n = int(bad.sum())
    if not n:
        return 0
    if src.nan_policy == "zero":
        with torch.no_grad():
            weight.data[bad] = 0
        return n
    read_weight(src, name, "error")                      # raises, naming the row and column
    raise AssertionError(f"{name}: the forward pass's copy has {n} non-finite weights the file does not")


def bert_forward(src):
    """The BERT forward pass of ``src`` (its own files), its selected layers cleaned
    (``clean_forward_weight``; ``cleaned``: how many entries were replaced)."""
    from sop.quantize.e2e import Bert

    bert = Bert(src.bert_folder, src.bert_prefix, src.files)
    bert.cleaned = sum(clean_forward_weight(src, lay.name, bert.params[lay.name])
                       for lay in src.layers if lay.name in bert.params)
    return bert


def _e2e_prepare(src, enabled: bool, n_heldout: int, windows: int = DEFAULT_E2E_WINDOWS,
                 seq_len: int = DEFAULT_SEQ_LEN, text: "C.CalibText | None" = None):
    """The end-to-end check, loaded and its text cut (so that a model or text that cannot serve is
    refused before any work): (("bert", runner, sentences) | ("causal-lm", runner, windows), None),
    or (None, {"skipped": why}). ``text``: a causal LM's held-out text file (``--eval-text``), its windows
    cut as the built-in held-out text's; None: the built-in held-out text."""
    if not enabled:
        if windows != DEFAULT_E2E_WINDOWS:  # as a calibration size with --no-calib: said, not dropped
            print(one_line(f"warning: {option('e2e_windows', str(windows))} unused: {no_e2e()} skips the "
                           f"end-to-end check"), file=sys.stderr, flush=True)
        return None, {"skipped": "disabled"}
    if src.forward == "causal-lm":
        from sop.quantize import causal_lm

        runner = causal_lm.load(src)
        if text is not None:
            return ("causal-lm", runner, C.text_windows(runner, text, windows, seq_len, "eval_text",
                                                        option("e2e_windows"))), None
        ids = runner.token_ids(C.heldout_sentences(C.HELDOUT_RESERVE))
        return ("causal-lm", runner, runner.windows(ids, windows, seq_len,
                                                    f"held-out text ({option('e2e_windows')} x "
                                                    f"{option('seq_len')})")), None
    if src.bert_folder is None:
        return None, {"skipped": f"no forward pass for this model ({src.forward_note or src.kind})"}
    if windows != DEFAULT_E2E_WINDOWS:      # as a causal LM's calibration size on an encoder: said, not dropped
        print(one_line(f"warning: {option('e2e_windows', str(windows))} counts a causal LM's held-out windows, "
                       f"unused here: a sentence encoder's (BERT) end-to-end check compares the embeddings of "
                       f"{n_heldout} held-out sentences"), file=sys.stderr, flush=True)
    return ("bert", bert_forward(src), C.heldout_sentences(n_heldout)), None


def _e2e_reference(prep):
    """The prepared check with its reference run: ("bert", bert, sentences, embeddings) | ("causal-lm", runner)."""
    if prep is None:
        return None
    if prep[0] == "causal-lm":
        prep[1].reference(prep[2])
        return ("causal-lm", prep[1])
    _, bert, sentences = prep
    ref = bert.embed(sentences)
    if not np.isfinite(np.asarray(ref)).all():
        raise reference_not_finite(str(bert.folder), "sentence embeddings")
    return ("bert", bert, sentences, ref)


def reference_not_finite(spec: str, what: str) -> ValueError:
    """The one-line error of an end-to-end reference (the model's own ``what``) that is not finite."""
    return ValueError(f"{spec}: the end-to-end check: the model's own {what} are not finite (a non-finite weight "
                      f"outside the layers quantized, or activations that overflow); {no_e2e()} skips it")


def _e2e_measure(runner, recons: dict) -> dict:
    if runner[0] == "causal-lm":
        return runner[1].score(recons)
    from sop.quantize.e2e import embedding_fidelity

    _, bert, sentences, ref = runner
    return embedding_fidelity(ref, bert.embed(sentences, weights=recons))


def search_memory(src, jobs: int = 1) -> int:
    """Bytes the layer search holds at its peak beside a forward pass: ``jobs`` layers of the
    largest size at 16 bytes per weight (the bound docs/benchmarks.md measures)."""
    return 16 * jobs * max(lay.size for lay in src.layers)


def check_e2e_memory(src, e2e: bool, windows: int, seq_len: int, jobs: int = 1) -> None:
    """Refuse, before any work, an end-to-end check (causal LM or BERT) that would not fit in memory."""
    if not e2e:
        return
    if src.forward == "causal-lm":
        from sop.quantize import causal_lm

        causal_lm.check_memory(src, windows, seq_len, extra=search_memory(src, jobs))
    elif src.bert_folder is not None:
        from sop.quantize import e2e as E
        from sop.quantize.memory import check_fits

        check_fits(E.memory_needed(src, search_memory(src, jobs)),
                   f"{src.spec}: the end-to-end check (the BERT model in float32 and one format of float32 "
                   f"reconstructions, beside the layer search)", f"{no_e2e()} skips it")


def evaluate(model: str, formats: list[str], *, budget: float | None = None, include=None, exclude=None,
             calibrate: bool = True, e2e: bool = True, nan_policy: str = "error",
             n_calib: "int | C.CalibSize" = C.N_CALIB, n_heldout: int = C.N_HELDOUT, cache_dir=C.DEFAULT_CACHE,
             progress: bool = True, lm_head: bool = False, routers: bool = False,
             e2e_windows: int = DEFAULT_E2E_WINDOWS, on_format=None, jobs: int = 1, calib_text=None,
             eval_text=None) -> dict:
    """Quantize ``model`` in every format and measure it; see the module docstring.

    ``n_calib``: calibration sentences, or a ``calib.CalibSize`` (causal LMs: ``seqs`` windows of
    ``seq_len`` tokens; ``seq_len`` is also the length of the ``e2e_windows`` held-out windows).
    ``lm_head``, ``routers``: quantize the output head, the MoE routers too. ``on_format(name, runner,
    recons)``, if given, is called after each format's end-to-end check with the causal-LM runner and
    that format's float32 reconstructions (the demo prints a greedy completion there). ``jobs``: layers
    quantized in that many worker processes (quantize/jobs.py; the same results). ``calib_text``: a UTF-8 text
    file a causal LM calibrates on instead of the built-in text (``calib.read_calib_text``). ``eval_text``: a
    UTF-8 text file a causal LM's end-to-end check measures on instead of the built-in held-out text (the same
    checks, ``calib.with_eval_text``; its windows cut as the built-in text's); the text of ``calib_text`` again
    (the same bytes or text, or one beginning with the other: ``calib.text_overlap``) is one warning line (the
    figures are then not held out)."""
    from sop.quantize.jobs import LayerPool, check_jobs, usable_cpus
    from sop.quantize.job_server import start as start_server

    calibrate, e2e, progress = boolean("calibrate", calibrate), boolean("e2e", e2e), boolean("progress", progress)
    lm_head, routers = boolean("lm_head", lm_head), boolean("routers", routers)
    if isinstance(formats, str):            # one name, not its characters (it was "unknown format 's'")
        formats = [formats]
    given = list(() if formats is None else formats)
    for name in given:
        if not isinstance(name, str):       # get_quant_format's one line, not dict.fromkeys' "unhashable type"
            get_quant_format(name)
    names = list(dict.fromkeys(given))
    if not names:
        raise ValueError("no format given")
    fmts = [get_quant_format(n) for n in names]          # unknown names fail here, before any work
    budget = check_options(fmts, budget, nan_policy)
    jobs = min(check_jobs(jobs), usable_cpus())           # as the pool lowers it: the memory estimate's too
    size = C.calib_size(n_calib, "n_calib", sentences=calibrate)     # (only calibration reads the sentences)
    size = C.with_calib_text(size, calib_text, calibrate, model)
    size = C.with_eval_text(size, eval_text, e2e, model)
    cache_dir = cache_folder(cache_dir, calibrate)
    if isinstance(e2e_windows, bool) or not isinstance(e2e_windows, (int, np.integer)) or e2e_windows < 1:
        raise ValueError(f"{option('e2e_windows')} must be a positive integer, got {e2e_windows!r}")
    say = reporter(progress)
    start_server(jobs)                      # the workers' imports run while the model is opened
    src = open_model(model, include, exclude, lm_head=lm_head, routers=routers)
    src.nan_policy = nan_policy
    C.check_text_model(src, size)                # before the calibration says it starts
    overlap = C.same_text_warning(size)
    if overlap is not None:                     # said with the model's warnings (announce), and in source.notes
        src.notes.append(overlap)
    if budget is not None:              # a budget below every cheapest option: refused before any layer is read
        check_budget_shapes([lay.shape for lay in src.layers], budget, option("budget"))
    say(f"{model}: {linear_layers(len(src.layers))}, {src.n_weights:,} weights")
    announce(src, lambda _: None)       # its warnings; what was kept is the report's (the module docstring)
    check_e2e_memory(src, e2e, e2e_windows, size.seq_len, jobs)        # before any work
    with contextlib.ExitStack() as stack:
        # started before the model is loaded and calibrated here
        pool = stack.enter_context(LayerPool(jobs)) if jobs > 1 else None
        return _evaluate(src, model, fmts, budget, calibrate, e2e, nan_policy, size, n_heldout, cache_dir,
                         say, progress, e2e_windows, on_format, pool)


def _evaluate(src, model, fmts, budget, calibrate, e2e, nan_policy, size, n_heldout, cache_dir, say, progress,
              e2e_windows, on_format, pool) -> dict:
    prep, e2e_skip = _e2e_prepare(src, e2e, n_heldout, e2e_windows, size.seq_len, size.eval_text)
    cal = calibration_for(src, calibrate, size, cache_dir, say, announced=True)    # (its note: the report's)
    held = C.text_record(size.eval_text)
    if prep is not None and prep[0] == "causal-lm":
        say(f"end-to-end reference: {e2e_windows} x {size.seq_len} held-out tokens"
            + (f" of {held['path']}" if held else ""))
    runner = _e2e_reference(prep)
    del prep

    doc = {"model": str(model), "source": src.describe(), "calibration": cal.describe(),
           "nan_policy": nan_policy, "budget": budget, "formats": {}}
    n = len(src.layers)
    for fmt in fmts:
        t0 = time.time()
        layers, stats, recons = {}, [], {}
        if fmt.model_level:                 # the knapsack needs every layer at once
            say(f"{fmt.name}: building every layer's options and solving under {budget} bpw")
            inputs, budgeted = budget_model(fmt, src, cal, nan_policy, budget, say, pool)
            want_recon = runner is not None
            outcomes = BudgetOutcomes(budgeted, src, cal, nan_policy,
                                      lambda res, lay: (None, [recon_float32(res.recon)] if want_recon else []))
            entry_budget = outcomes.budgeted
        else:
            outcomes = layer_outcomes(src, fmt, cal, nan_policy, "recon" if runner is not None else None, pool)
            entry_budget = None
        for i, (out, arrays) in enumerate(outcomes, 1):
            lay = src.layers[i - 1]
            say(layer_line(fmt.name, i, n, lay.name, lay.shape, out.seconds))
            stats.append(out.stats)
            rec = {**out.stats.as_dict(), "choice": out.choice, "shape": list(lay.shape),
                   "weighted": cal.get(lay.name) is not None}
            if out.n_bad:
                rec["nonfinite_replaced"] = out.n_bad
            layers[lay.name] = rec
            if runner is not None:
                recons[lay.name] = arrays[0]
            del arrays                      # before the next layer is read
        total = aggregate(stats)
        entry = {**total.as_dict(), "bits": total.bits, "weights": total.weights}
        if entry_budget is not None:
            sol = entry_budget.solution
            entry["budget"] = {"bpw": budget, "report": entry_budget.report, "error": sol.error,
                               "lower_bound": sol.lower_bound}
        if runner is not None:
            say(f"{fmt.name}: end-to-end check")
            entry["e2e"] = e = _e2e_measure(runner, recons)
            if held:                        # the figures name the text they were measured on
                e["text"] = dict(held)
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
    """A causal LM's table has ppl/KLD/top-1 columns, with dashes when its check was skipped (--no-e2e)."""
    return (doc["source"].get("forward") == "causal-lm"
            or any(f.get("e2e", {}).get("metric") == "causal-lm" for f in doc["formats"].values()))


def _ppl_cell(ppl: float) -> str:
    """A perplexity in its 9-wide column, a space before it whatever its size (100000.000 filled the column
    and ran into max err's: an outside probe): the most decimals, 3 to 0, that fit in 8 characters, else
    the most significant digits that do (12345.678 is 12345.68, 99999.9994 100000.0, 1.234e100 1.2e+100)."""
    fixed = [f"{ppl:.{d}f}" for d in (3, 2, 1, 0)] + [f"{ppl:.{d}g}" for d in (3, 2, 1)]
    return f"{' ' + next((t for t in fixed if len(t) <= 8), fixed[-1]):>9}"


def budget_choices_line(fmt: str, bpw: float, choices: list[str]) -> str:
    """What the knapsack of ``fmt`` (sop-budget) chose, in one line: how many layers took each option, the most
    taken first (``budget 5 bpw (sop-budget): 12 layers sop4-g16, 3 e2m3-ue4m4-g16``). ``choices``: each layer's
    choice as a LayerOutcome spells it, ``option: what the option chose`` (the codebook pair)."""
    counts = Counter(c.split(": ", 1)[0] for c in choices)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    said = [f"{n} {'layer' if n == 1 else 'layers'} {opt}" if i == 0 else f"{n} {opt}"
            for i, (opt, n) in enumerate(ranked)]
    return f"budget {bpw:.10g} bpw ({fmt}): {', '.join(said) or 'no layer'}"


def format_table(doc: dict) -> str:
    """The human-readable summary `sop eval` prints: the model, what was kept, the calibration and a row a
    format, each one terminal line (``one_line``). The warnings about the reference (``source.notes``) are not
    repeated: `sop eval` printed them on standard error as the model was opened (``announce``)."""
    src, cal = doc["source"], doc["calibration"]
    lines = [f"model {doc['model']} ({src['kind']}): {linear_layers(src['layers'])}, {src['weights']:,} weights"]
    if isinstance(src.get("kept"), dict):
        lines.append(kept_text(src["kept"], src.get("lm_head", "")))
    lines += [f"calibration: {cal['note']}" + (" [cached]" if cal.get("cached") else ""), ""]
    causal = _causal(doc)
    # no forward pass and no end-to-end result: no such columns at all (a sentence encoder's dashes said nothing)
    no_e2e = not causal and not src.get("forward") and not any("cos_mean" in f["e2e"] for f in doc["formats"].values())
    e2e_head = ("" if no_e2e else f"{'ppl':>9}{'KLD':>11}{'top-1':>8}" if causal
                else f"{'e2e cos mean':>14}{'e2e cos min':>13}")
    head = f"{'format':<16}{'bpw':>8}{'SQNR dB':>9}{'rel MSE':>11}{'1-ACos':>11}{'max err':>10}{e2e_head}"
    lines.append(head)
    ref = None
    for name, f in doc["formats"].items():
        e = f["e2e"]
        if no_e2e:
            e2e = ""
        elif causal:
            e2e = (f"{_ppl_cell(e['ppl'])}{e['kld']:11.3e}{e['top1']:8.4f}" if "kld" in e
                   else f"{'-':>9}{'-':>11}{'-':>8}")
            ref = e if "kld" in e else ref
        else:
            e2e = (f"{e['cos_mean']:14.6f}{e['cos_min']:13.6f}" if "cos_mean" in e else f"{'-':>14}{'-':>13}")
        sq = f["sqnr_db"]
        sq = f"{sq:9.2f}" if sq is not None else f"{'inf':>9}"
        lines.append(f"{name:<16}{f['bpw']:8.4f}{sq}{f['rel_mse']:11.3e}{1 - f['acos']:11.3e}"
                     f"{f['max_abs_err']:10.4g}{e2e}")      # .4g: any size in its column
    lines += [budget_choices_line(name, f["budget"]["bpw"], [r["choice"] for r in f["layers"].values()])
              for name, f in doc["formats"].items() if f.get("budget")]
    if ref is not None:
        held = ref.get("text")
        of = f" of {held['path']} (SHA-256 {held['sha256']})" if held else ""
        lines.append(f"e2e: next-token perplexity, mean KL divergence (nats/token) against the unquantized model "
                     f"and top-1 agreement on {ref['tokens']:,} held-out tokens{of} ({ref['windows']} windows of "
                     f"{ref['seq_len']}, second halves scored); reference ppl {ref['ppl_ref']:.3f}")
    skipped = {e['skipped'] for f in doc["formats"].values() if "skipped" in (e := f["e2e"])}
    if skipped:
        lines.append(f"e2e: skipped ({'; '.join(sorted(skipped))})")
    # each a terminal line: a file's name (the model's, a --calib-text's or --eval-text's) may hold a line break or
    # an escape sequence, as the progress lines' do (one_line)
    return "\n".join(map(one_line, lines))
