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
(errors are summed in float64). One core: ``SOP_THREADS=1 OPENBLAS_NUM_THREADS=1`` (and torch on
one thread).

Per core: besides wall time, every row gives weights per CPU second (``time.process_time``), the
figure that holds on a machine shared with other jobs. Only the quantizer calls are timed (the
SQNR and the bit checks are computed outside the clock). ``--device D [D ...]`` (default ``cpu``)
times the SOP rows (the formats whose search ``--device`` moves: both e2m3-ue4m4-g16 rows,
sop4-g16, sop-budget) again on each torch device, side by side, and checks that each gives the
numpy run's bits (streams and reconstructions); ``--device`` with no name skips it, and then
the script also times a checkout from before ``--device`` existed (``PYTHONPATH=that/checkout``:
the "before" column of docs/benchmarks.md).
``--matrix`` adds the full sop4-g16 search on a seeded 4096 x 4096 standard-normal float32
matrix (the figure of the issue's target, 2 M weights/s per core), on numpy and each device.

Run: SOP_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/quantize_speed.py [--budget 5.0] [--layers N]
     [--device cpu] [--matrix]
"""

from __future__ import annotations

import time

import contextlib

import numpy as np

from sop.argtypes import ToolParser, positive
from sop.quantize import baselines as B
from sop.quantize.blockwise import THREADS
from sop.quantize.knapsack import layer_options, quantize_budget
from sop.quantize.sop_search import quantize_fp6, quantize_sop4
from sop.quantize.weights import minilm_linear_weights
from sop.terminal import run_command

FORMATS = {
    "nf4-g64": lambda w: B.nf4_g64(w),
    "e2m3-ue4m4-g16": lambda w: quantize_fp6(w),
    "e2m3-ue4m4-g16 (no search)": lambda w: quantize_fp6(w, scale_search=0),
    "sop4-g16": lambda w: quantize_sop4(w),
    "fp8-e4m3-pot": lambda w: B.fp8_e4m3_pot(w),
    "nvfp4": lambda w: B.nvfp4(w),
    "if4": lambda w: B.if4(w),
}


#: The rows whose search runs on ``--device`` (quantize/device.py).
ON_DEVICE = ("e2m3-ue4m4-g16", "e2m3-ue4m4-g16 (no search)", "sop4-g16")


def fingerprint(res) -> bytes:
    """What must be identical on every device: the stream and the reconstruction's bits."""
    rec = np.ascontiguousarray(res.recon, dtype=np.float64).view(np.int64).tobytes()
    return (res.stream.blocks if res.stream is not None else b"") + rec


def measure(weights: dict[str, np.ndarray], fn) -> dict:
    first = next(iter(weights.values()))
    fn(first)                                            # warm-up, not timed
    signal = noise = 0.0
    bits = 0
    per_layer = {}
    prints = []
    wall = cpu = 0.0
    for name, w in weights.items():
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn(w)                                     # only the quantizer is timed
        wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
        w64 = w.astype(np.float64)                      # the errors in float64, whatever recon's dtype
        e = float(((w64 - res.recon) ** 2).sum())
        s = float((w64 ** 2).sum())
        signal, noise, bits = signal + s, noise + e, bits + res.bits
        per_layer[name] = 10 * np.log10(s / e)
        prints.append(fingerprint(res))
    n = sum(w.size for w in weights.values())
    return {"sqnr": 10 * np.log10(signal / noise), "bpw": bits / n, "wall": wall, "cpu": cpu,
            "wps": n / wall, "cps": n / cpu, "per_layer": per_layer, "prints": prints}


def budget_rows(weights: dict[str, np.ndarray], budgets: list[float]) -> tuple[dict, list[str]]:
    """sop-budget at each budget: the options built once, each budget's time that build plus its solve."""
    rows, reports = {}, []
    n = sum(w.size for w in weights.values())
    t0, c0 = time.perf_counter(), time.process_time()
    layers = {k: (w, None) for k, w in weights.items()}
    prep = layer_options(layers)
    build_wall, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    signal = sum(float((w.astype(np.float64) ** 2).sum()) for w in weights.values())
    for b in budgets:
        t0, c0 = time.perf_counter(), time.process_time()
        res = quantize_budget(layers, b, prepared=prep)
        wall = build_wall + time.perf_counter() - t0
        cpu = build_cpu + time.process_time() - c0
        noise, prints = 0.0, []
        for k, w in weights.items():
            r = res.results[k]
            noise += float(((w.astype(np.float64) - r.recon) ** 2).sum())
            prints.append(fingerprint(r))
        rows[f"sop-budget {b}"] = {"sqnr": 10 * np.log10(signal / noise), "bpw": res.bpw, "wall": wall,
                                   "cpu": cpu, "wps": n / wall, "cps": n / cpu, "per_layer": {}, "prints": prints}
        reports.append(res.report)
    return rows, reports


def on(dev: str | None):
    """The searches inside on torch device ``dev`` (None: numpy; the code before ``--device``
    existed can be timed by this script with ``--device`` and no name)."""
    if dev is None:
        return contextlib.nullcontext()
    from sop.quantize import device

    return device.use(dev)


def matrix_rows(devices: list[str]) -> list[str]:
    """The full sop4-g16 search on a seeded 4096 x 4096 float32 matrix, numpy and each device."""
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    lines, first = [], None
    for dev in [None, *devices]:
        with on(dev):
            quantize_sop4(w[:64])                        # warm-up: table caches
            t0, c0 = time.perf_counter(), time.process_time()
            res = quantize_sop4(w)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        first = first or fingerprint(res)
        same = "" if dev is None else f"; bits {'identical' if fingerprint(res) == first else 'DIFFER'}"
        lines.append(f"sop4-g16 full search, 4096 x 4096, {dev or 'numpy'}: {w.size / cpu / 1e6:.2f} M weights per CPU "
                     f"second ({cpu:.1f} s CPU, {wall:.1f} s wall{same})")
    return lines


def main() -> None:
    ap = ToolParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=positive(float), nargs="*", default=[],
                    help="also run sop-budget at these bpw (the options are quantized once)")
    ap.add_argument("--layers", type=positive(int), default=None, help="only the first N layers")
    ap.add_argument("--device", nargs="*", default=["cpu"],
                    help="torch devices to time the SOP rows on too (default cpu; none: numpy only)")
    ap.add_argument("--matrix", action="store_true", help="also the sop4-g16 search on a 4096 x 4096 matrix")
    args = ap.parse_args()
    devices = args.device
    if devices:
        import torch

        from sop.quantize import device
        from sop.quantize.inputs import command_line

        try:
            with command_line():            # a refusal names --device, as this script's user gave it
                devices = [device.check(d) for d in devices]
        except ValueError as err:
            ap.error(str(err))
        torch.set_num_threads(THREADS)
    # float32, as the model holds them and as sop eval / sop quantize pass them (narrow_weights):
    # the quantizers' float32 paths are the ones that run
    weights = {k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in list(minilm_linear_weights().items())[:args.layers]}
    n = sum(w.size for w in weights.values())
    print(f"all-MiniLM-L6-v2: {len(weights)} layers, {n:,} weights; encoder threads {THREADS}\n")
    rows = {name: measure(weights, fn) for name, fn in FORMATS.items()}
    reports = []
    if args.budget:
        try:
            more, reports = budget_rows(weights, args.budget)
        except ValueError as err:          # a budget below the cheapest options: known once they are
            ap.exit(2, f"{ap.prog}: error: {err}\n")
        rows.update(more)
    # the same SOP rows on each torch device: the bits must be numpy's
    on_dev = {}
    for dev in devices:
        with on(dev):
            for name in ON_DEVICE:
                on_dev[(dev, name)] = measure(weights, FORMATS[name])
            if args.budget:
                on_dev.update({(dev, name): r for name, r in budget_rows(weights, args.budget)[0].items()})
    base = rows["nf4-g64"]["wps"]
    heads = "".join(f" {d}: M w/s per CPU s | {d}: bits |" for d in devices)
    print(f"| format | bpw | aggregate SQNR (dB) | wall (s) | CPU (s) | M weights/s | M w/s per CPU s | "
          f"speed vs nf4-g64 |{heads}")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|---|" * len(devices))
    for name, r in rows.items():
        cells = ""
        for dev in devices:
            d = on_dev.get((dev, name))
            cells += (" | |" if d is None else
                      f" {d['cps'] / 1e6:.2f} | {'identical' if d['prints'] == r['prints'] else 'DIFFER'} |")
        print(f"| {name} | {r['bpw']:.3f} | {r['sqnr']:.2f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
              f"{r['wps'] / 1e6:.2f} | {r['cps'] / 1e6:.2f} | {r['wps'] / base:.3f} |{cells}")
    if args.matrix:
        print()
        for line in matrix_rows(devices):
            print(line)
    fp6, fp8 = rows["e2m3-ue4m4-g16"]["per_layer"], rows["fp8-e4m3-pot"]["per_layer"]
    d = [fp6[k] - fp8[k] for k in weights]
    print(f"\ne2m3-ue4m4-g16 minus fp8-e4m3-pot per layer: min {min(d):+.2f} dB, "
          f"max {max(d):+.2f} dB, better on {sum(x > 0 for x in d)}/{len(d)} layers")
    for r in reports:
        print("\n" + r)


if __name__ == "__main__":
    run_command("python bench/quantize_speed.py", main)
