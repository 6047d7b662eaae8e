#!/usr/bin/env python3
"""Quantizer speed and reconstruction on all-MiniLM-L6-v2: the SOP points against nf4-g64, in one run.

For every format, all 37 linear layers (10,764,288 weights) are quantized and
the script reports bits per weight (every stored bit), aggregate SQNR
``10 log10(sum w^2 / sum (w - q)^2)`` (unweighted: no calibration here), wall
time, CPU time and weights per second, and the speed relative to ``nf4-g64``
(quantize.baselines, bitsandbytes NF4 with an FP32 absmax per 64 weights)
measured in the same run. Each quantizer first runs once on the first layer
(warm-up: table caches), which is not timed.

Formats: ``e2m3-ue4m4-g16`` (quantize_fp6, scale search +-2), the same with no
scale search (``scale_search=0``: one candidate per block, the single-pass
encoder), ``sop4-g16`` (quantize_sop4: the full pair search over FIXED_4BIT and
the layer's DD4), ``fp8-e4m3-pot``, ``nvfp4``, ``if4``, ``nf4-g64``; with
``--budget B [B ...]`` also ``sop-budget`` (quantize.knapsack at each B bpw; the
options of every layer are quantized once, and each budget's time is that build
plus its own solve).

The weights are passed as float32, as the model holds them and as ``sop eval`` passes them
(errors are summed in float64). One core: ``SOP_THREADS=1 OPENBLAS_NUM_THREADS=1``.

Run: SOP_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/quantize_speed.py [--budget 5.0] [--layers N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sop.quantize import baselines as B
from sop.quantize.blockwise import THREADS
from sop.quantize.knapsack import layer_options, quantize_budget
from sop.quantize.sop_search import quantize_fp6, quantize_sop4
from sop.quantize.weights import minilm_linear_weights

FORMATS = {
    "nf4-g64": lambda w: B.nf4_g64(w),
    "e2m3-ue4m4-g16": lambda w: quantize_fp6(w),
    "e2m3-ue4m4-g16 (no search)": lambda w: quantize_fp6(w, scale_search=0),
    "sop4-g16": lambda w: quantize_sop4(w),
    "fp8-e4m3-pot": lambda w: B.fp8_e4m3_pot(w),
    "nvfp4": lambda w: B.nvfp4(w),
    "if4": lambda w: B.if4(w),
}


def measure(weights: dict[str, np.ndarray], fn) -> dict:
    first = next(iter(weights.values()))
    fn(first)                                            # warm-up, not timed
    signal = noise = 0.0
    bits = 0
    per_layer = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for name, w in weights.items():
        res = fn(w)
        w64 = w.astype(np.float64)                      # the errors in float64, whatever recon's dtype
        e = float(((w64 - res.recon) ** 2).sum())
        s = float((w64 ** 2).sum())
        signal, noise, bits = signal + s, noise + e, bits + res.bits
        per_layer[name] = 10 * np.log10(s / e)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(w.size for w in weights.values())
    return {"sqnr": 10 * np.log10(signal / noise), "bpw": bits / n, "wall": wall, "cpu": cpu,
            "wps": n / wall, "per_layer": per_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, nargs="*", default=[],
                    help="also run sop-budget at these bpw (the options are quantized once)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers")
    args = ap.parse_args()
    # float32, as the model holds them and as sop eval / sop quantize pass them (narrow_weights):
    # the quantizers' float32 paths are the ones that run
    weights = {k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in list(minilm_linear_weights().items())[:args.layers]}
    n = sum(w.size for w in weights.values())
    print(f"all-MiniLM-L6-v2: {len(weights)} layers, {n:,} weights; encoder threads {THREADS}\n")
    rows = {name: measure(weights, fn) for name, fn in FORMATS.items()}
    reports = []
    if args.budget:
        t0, c0 = time.perf_counter(), time.process_time()
        layers = {k: (w, None) for k, w in weights.items()}
        prep = layer_options(layers)
        build_wall, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        signal = sum(float((w.astype(np.float64) ** 2).sum()) for w in weights.values())
        for b in args.budget:
            t0, c0 = time.perf_counter(), time.process_time()
            res = quantize_budget(layers, b, prepared=prep)
            wall = build_wall + time.perf_counter() - t0
            cpu = build_cpu + time.process_time() - c0
            noise = sum(float(((w.astype(np.float64) - res.results[k].recon) ** 2).sum())
                        for k, w in weights.items())
            rows[f"sop-budget {b}"] = {"sqnr": 10 * np.log10(signal / noise), "bpw": res.bpw,
                                       "wall": wall, "cpu": cpu, "wps": n / wall, "per_layer": {}}
            reports.append(res.report)
    base = rows["nf4-g64"]["wps"]
    print("| format | bpw | aggregate SQNR (dB) | wall (s) | CPU (s) | M weights/s | speed vs nf4-g64 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['bpw']:.3f} | {r['sqnr']:.2f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
              f"{r['wps'] / 1e6:.2f} | {r['wps'] / base:.3f} |")
    fp6, fp8 = rows["e2m3-ue4m4-g16"]["per_layer"], rows["fp8-e4m3-pot"]["per_layer"]
    d = [fp6[k] - fp8[k] for k in weights]
    print(f"\ne2m3-ue4m4-g16 minus fp8-e4m3-pot per layer: min {min(d):+.2f} dB, "
          f"max {max(d):+.2f} dB, better on {sum(x > 0 for x in d)}/{len(d)} layers")
    for r in reports:
        print("\n" + r)


if __name__ == "__main__":
    main()
