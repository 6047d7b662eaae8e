#!/usr/bin/env python3
"""What each part of the two searches buys on all-MiniLM-L6-v2: the tables of docs/sop.md.

Every figure is an aggregate over the 37 linear layers (``10 log10(sum w^2 / sum (w - q)^2)``;
the weighted one puts the layer's input mean squares ``act_ms`` under both sums), each variant run
through the quantizer's own functions (quantize/sop_search.py) in this process:

1. ``e2m3-ue4m4-g16``: the scale search's reach, the covering code only and +-1, +-2 (the default)
   and +-3 neighbours (``quantize_fp6(scale_search=...)``);
2. ``sop4-g16``: one fixed pair (nf4 + sh4), the 21 fixed pairs, all 28 with DD4 (the default) and
   the default with covering code +-2 (``quantize_sop4(pairs=, dd4=, scale_search=)``), unweighted,
   with the pairs chosen and the share of blocks that select bank B;
3. both points searched unweighted and activation-weighted (``quantize.calib``: 256 sentences, the
   statistics cached under ``build/calib/`` as every command caches them): weighted and plain SQNR.

Seconds are wall time on this machine (the search's speed is bench/quantize_speed.py's subject);
the SQNR figures are deterministic. ``--skip-weighted`` leaves out part 3 (no forward pass).

    python bench/search_ablation.py [--skip-weighted]
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from sop.argtypes import ToolParser
from sop.quantize.knapsack import weighted_error
from sop.quantize.metrics import ErrorStats, aggregate
from sop.quantize.sop_search import quantize_fp6, quantize_sop4
from sop.quantize.weights import minilm_linear_weights
from sop.terminal import run_command


def run(weights: dict, quantize, act: dict | None = None, weighted_search: bool = False) -> dict:
    """Quantize every layer (``quantize(w, act_ms)``; the layer's ``act`` only for a ``weighted_search``):
    the aggregate plain SQNR (``metrics.aggregate``) and, given ``act``, the weighted one (the weighted
    energies of ``knapsack.weighted_error``: of ``w - 0`` and of ``w - q``), the choices, the bank-B share."""
    stats, wsignal, wnoise = [], 0.0, 0.0
    blocks = blocks_b = 0.0
    choices: Counter = Counter()
    t0 = time.perf_counter()
    for name, w in weights.items():
        res = quantize(w, act[name] if weighted_search else None)
        stats.append(ErrorStats.of(w, res.recon))
        if act is not None:
            wsignal += weighted_error(w, np.zeros_like(w), act[name])
            wnoise += weighted_error(w, res.recon, act[name])
        choices[res.choice] += 1
        if "share_b" in res.extra:
            n = res.stream.n_blocks
            blocks, blocks_b = blocks + n, blocks_b + res.extra["share_b"] * n
    return {"sqnr": aggregate(stats).sqnr_db, "seconds": time.perf_counter() - t0,
            "wsqnr": 10 * np.log10(wsignal / wnoise) if act is not None else None,
            "choices": dict(choices.most_common()), "share_b": blocks_b / blocks if blocks else None}


def calibration(weights: dict) -> dict:
    from sop.quantize.calib import calibrate
    from sop.quantize.models import open_model

    cal = calibrate(open_model("minilm"))
    return {name: np.asarray(cal.get(name), dtype=np.float64) for name in weights}


def main(argv=None) -> int:
    ap = ToolParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-weighted", action="store_true", help="leave out the calibrated part (no forward pass)")
    args = ap.parse_args(argv)
    weights = minilm_linear_weights()
    print(f"all-MiniLM-L6-v2: {len(weights)} linear layers, {sum(w.size for w in weights.values()):,} weights\n")

    print("e2m3-ue4m4-g16, unweighted | aggregate SQNR (dB) | s")
    for ss, label in ((0, "covering code only"), (1, "+-1"), (2, "+-2 (default)"), (3, "+-3")):
        r = run(weights, lambda w, a, ss=ss: quantize_fp6(w, a, scale_search=ss))
        print(f"{label:27} | {r['sqnr']:.2f} | {r['seconds']:.1f}")

    print("\nsop4-g16 search, unweighted | aggregate SQNR (dB) | s | choices | bank B share")
    variants = (("fixed pair nf4 + sh4", {"pairs": [("nf4", "sh4")], "dd4": False}),
                ("all 21 fixed pairs", {"dd4": False}),
                ("all 28 pairs incl. DD4 (default)", {}),
                ("the same, covering code +-2", {"scale_search": 2}))
    for label, kw in variants:
        r = run(weights, lambda w, a, kw=kw: quantize_sop4(w, a, **kw))
        print(f"{label:32} | {r['sqnr']:.2f} | {r['seconds']:.1f} | {r['choices']} | {r['share_b']:.1%}")

    if args.skip_weighted:
        return 0
    act = calibration(weights)
    print("\nsearch | weighted SQNR (dB) | plain SQNR (dB) | choices")
    for label, fn in (("sop4-g16", quantize_sop4), ("e2m3-ue4m4-g16", quantize_fp6)):
        for how in ("unweighted", "weighted"):
            r = run(weights, fn, act, weighted_search=how == "weighted")
            print(f"{label}, {how} search | {r['wsqnr']:.2f} | {r['sqnr']:.2f} | {r['choices']}")
    return 0


if __name__ == "__main__":
    run_command("python bench/search_ablation.py", main)
