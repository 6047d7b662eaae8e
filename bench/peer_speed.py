#!/usr/bin/env python3
"""Quantizer speed against the peers: each baseline beside the library it reproduces, in one process.

One seeded 4096 x 4096 float32 matrix (standard normal; ``--minilm`` adds the largest
all-MiniLM-L6-v2 layer, 1536 x 384). Each row times our quantizer and its peer on the same
matrix, interleaved, ``--repeats`` times after one untimed warm-up each, and keeps the best
(fastest) time of each: the machine is shared, and the best run is the one least disturbed.

| ours (quantize.baselines) | peer | what the peer returns |
|---|---|---|
| ``nf4-g64`` | bitsandbytes ``functional.quantize_4bit(nf4, blocksize=64)`` on CPU | packed codes + absmax |
| ``mxfp8-e4m3``, ``mxfp6-e2m3``, ``mxfp6-e3m2``, ``mxfp4`` | torchao ``prototype.mx_formats.mx_tensor.to_mx`` (FLOOR: the OCP rule) | E8M0 scales + elements |
| ``nvfp4`` | torchao ``nvfp4_tensor.nvfp4_quantize`` with the per-tensor scale of its amax | E4M3 scales + packed codes |
| ``nvfp4-46`` | fouroversix ``quantize.pytorch.reference.quantize_to_fp4(nvfp4, mse)`` | packed codes + scales |
| ``if4`` | fouroversix ``quantize_to_fp4(if4, mse)`` | packed codes + scales |

Like with like: every peer stops at codes and scales; ours also returns the exact float64
reconstruction (``QuantResult.recon``, what ``sop eval`` scores), so our side does strictly
more work (the codes of ``nf4-g64`` and the MX scale codes are in ``extra``). Both sides
start from the same float32 matrix (a tensor sharing the numpy array's memory).

Also ``sop4-g16``, the full pair search (``quantize_sop4``: 28 pairs with the layer's DD4),
in weights per second per core; it has no peer.

Threads: ``--threads N`` (default 1) sets ``SOP_THREADS`` (our chunk threads), the BLAS
and OpenMP thread counts and ``torch.set_num_threads`` for the peers, before anything is
imported, so the per-core figure is the single-thread one.

A peer that is not installed is skipped with one line saying that ``make peers`` installs
it (pinned: bitsandbytes 0.50.2, torchao 0.18.0, fouroversix 1.0.5). The table is printed
and written, with the versions, threads and machine, to ``build/bench/peer_speed.json``.

Run: .venv/bin/python bench/peer_speed.py [--threads 1] [--repeats 5] [--minilm] [--no-sop]
"""

from __future__ import annotations

import os
import sys

from sop.argtypes import ToolParser, output_checked, positive  # argparse and math only: no thread pool started

ap = ToolParser(description=__doc__.splitlines()[0])
ap.add_argument("--threads", type=positive(int), default=1, help="threads for ours and the peers (default 1: per core)")
ap.add_argument("--repeats", type=positive(int), default=5, help="timed runs per quantizer; the best counts")
ap.add_argument("--sop-repeats", type=positive(int), default=2, help="timed runs of the sop4-g16 search")
ap.add_argument("--size", type=positive(int), nargs=2, default=(4096, 4096), metavar=("ROWS", "COLS"))
ap.add_argument("--minilm", action="store_true", help="also time the largest all-MiniLM-L6-v2 layer")
ap.add_argument("--no-sop", action="store_true", help="skip the sop4-g16 search")
ap.add_argument("--json", default="build/bench/peer_speed.json")
ARGS = ap.parse_args()
# before numpy, torch or sop are imported: their thread pools read these once
for var in ("SOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sop.golden.files import write_atomic  # noqa: E402
from sop.quantize import baselines as B  # noqa: E402
from sop.quantize import blockwise  # noqa: E402
from sop.quantize.sop_search import quantize_sop4  # noqa: E402
from sop.terminal import run_command

torch.set_num_threads(ARGS.threads)
#: the releases `make peers` installs (tests/test_bench_arithmetic.py checks the Makefile against it)
PINS = {"bitsandbytes": "0.50.2", "torchao": "0.18.0", "fouroversix": "1.0.5"}


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def quietly(fn):
    """Import a peer with its logging of optional native kernels (CUDA, kernels-community) off."""
    logging.disable(logging.WARNING)
    try:
        return fn()
    finally:
        logging.disable(logging.NOTSET)


def peers() -> tuple[dict, list[str]]:
    """name -> (peer label, callable on a torch tensor, what it returns); and the missing lines."""
    out, missing = {}, []
    if version("bitsandbytes"):
        def load_bnb():
            import bitsandbytes.functional as F  # pyright: ignore[reportMissingImports, reportMissingModuleSource]
            return F
        F = quietly(load_bnb)
        out["nf4-g64"] = ("bitsandbytes quantize_4bit nf4/64",
                          lambda t: F.quantize_4bit(t, blocksize=64, quant_type="nf4"), "packed codes + absmax")
    else:
        missing.append("bitsandbytes")
    if version("torchao"):
        def load_ao():
            # (the peers are optional: `make peers`; a fresh `make setup` has none of them)
            from torchao.prototype.mx_formats import constants as C  # pyright: ignore[reportMissingImports, reportMissingModuleSource]
            from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor  # pyright: ignore[reportMissingImports, reportMissingModuleSource]
            return C, mx_tensor.to_mx, nvfp4_tensor.nvfp4_quantize, nvfp4_tensor.per_tensor_amax_to_scale
        C, to_mx, nvfp4_quantize, amax_to_scale = quietly(load_ao)
        for name, dt in (("mxfp8-e4m3", torch.float8_e4m3fn), ("mxfp6-e2m3", C.DTYPE_FP6_E2M3),
                         ("mxfp6-e3m2", C.DTYPE_FP6_E3M2), ("mxfp4", torch.float4_e2m1fn_x2)):
            out[name] = ("torchao to_mx", (lambda d: lambda t: to_mx(t, d, 32))(dt), "E8M0 scales + elements")
        out["nvfp4"] = ("torchao nvfp4_quantize",
                        lambda t: nvfp4_quantize(t, 16, amax_to_scale(torch.amax(torch.abs(t)))),
                        "E4M3 scales + packed codes")
    else:
        missing.append("torchao")
    if version("fouroversix"):
        def load_fos():
            from fouroversix.quantize.pytorch import reference  # pyright: ignore[reportMissingImports, reportMissingModuleSource]
            from fouroversix import utils  # pyright: ignore[reportMissingImports, reportMissingModuleSource]
            return reference.quantize_to_fp4, utils.DataType, utils.ScaleRule
        q4, DT, SR = quietly(load_fos)
        out["nvfp4-46"] = ("fouroversix reference nvfp4 mse",
                           lambda t: q4(t, fp4_format=DT.nvfp4, scale_rule=SR.mse, use_blackwell_scale_layout=False),
                           "packed codes + E4M3 scales")
        out["if4"] = ("fouroversix reference if4 mse",
                      lambda t: q4(t, fp4_format=DT.if4, scale_rule=SR.mse, use_blackwell_scale_layout=False),
                      "packed codes + E4M3 scales (IF4 flag)")
    else:
        missing.append("fouroversix")
    return out, missing


OURS = {
    "nf4-g64": B.nf4_g64,
    "mxfp8-e4m3": lambda w: B.mx(w, "e4m3"),
    "mxfp6-e2m3": lambda w: B.mx(w, "e2m3"),
    "mxfp6-e3m2": lambda w: B.mx(w, "e3m2"),
    "mxfp4": lambda w: B.mx(w, "e2m1"),
    "nvfp4": B.nvfp4,
    "nvfp4-46": B.nvfp4_46,
    "if4": B.if4,
}


def best_of(fns: list, repeats: int) -> list[float]:
    """Fastest wall time of each function, runs interleaved after one warm-up each."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def run_matrix(label: str, w: np.ndarray, table: dict) -> list[dict]:
    t = torch.from_numpy(w)
    rows = []
    for name, ours in OURS.items():
        if name not in table:
            continue
        plabel, pfn, returns = table[name]
        t_ours, t_peer = best_of([lambda: ours(w), lambda: pfn(t)], ARGS.repeats)
        rows.append({"matrix": label, "format": name, "ours_mwps": w.size / t_ours / 1e6, "peer": plabel,
                     "peer_mwps": w.size / t_peer / 1e6, "ratio": t_peer / t_ours, "peer_returns": returns})
    return rows


def main() -> None:
    output_checked(ap, ARGS.json, option="--json")                # before minutes of timing
    table, missing = peers()
    for dist in missing:
        print(f"{dist} is not installed: `make peers` installs it ({dist}=={PINS[dist]}); its rows are skipped")
    rows_n, cols_n = ARGS.size
    w = np.random.default_rng(0).standard_normal((rows_n, cols_n)).astype(np.float32)
    matrices = [(f"random normal {rows_n} x {cols_n} fp32", w)]
    if ARGS.minilm:
        from sop.quantize.weights import minilm_linear_weights
        layers = minilm_linear_weights()
        name = max(layers, key=lambda k: layers[k].size)
        matrices.append((f"MiniLM {name} {layers[name].shape[0]} x {layers[name].shape[1]}",
                         np.ascontiguousarray(layers[name], dtype=np.float32)))
    env = {"threads": ARGS.threads, "sop_threads": blockwise.THREADS, "torch_threads": torch.get_num_threads(),
           "machine": machine(), "python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__, "peers": {d: version(d) for d in PINS}, "repeats": ARGS.repeats}
    print(f"threads {ARGS.threads} (SOP_THREADS {blockwise.THREADS}, torch {torch.get_num_threads()}); "
          f"{env['machine']}; torch {torch.__version__}; "
          + ", ".join(f"{d} {v or 'missing'}" for d, v in env["peers"].items()))
    rows = []
    for label, m in matrices:
        rows += run_matrix(label, m, table)
    sop = None
    if not ARGS.no_sop:
        quantize_sop4(w[:64])                                  # warm-up: table caches
        best = cpu = float("inf")
        for _ in range(ARGS.sop_repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            quantize_sop4(w)
            best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        # per core: wall time times threads; the CPU-time figure shows what a shared machine took
        sop = {"matrix": matrices[0][0], "mwps": w.size / best / 1e6, "seconds": best,
               "mwps_per_core": w.size / best / 1e6 / ARGS.threads, "cpu_seconds": cpu,
               "mwps_per_cpu_second": w.size / cpu / 1e6}
    print()
    print("| matrix | format | ours (M w/s) | peer | peer (M w/s) | ours / peer |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['matrix']} | {r['format']} | {r['ours_mwps']:.1f} | {r['peer']} | {r['peer_mwps']:.1f} | "
              f"{r['ratio']:.2f} |")
    if sop:
        print(f"| {sop['matrix']} | sop4-g16 full search | {sop['mwps']:.2f} "
              f"({sop['mwps_per_core']:.2f} per core; {sop['mwps_per_cpu_second']:.2f} per CPU second) "
              f"| (none) | | |")
    path = Path(ARGS.json)
    write_atomic(path, (json.dumps({"env": env, "rows": rows, "sop4-g16": sop}, indent=2) + "\n").encode())
    print(f"\nwritten {path}", file=sys.stderr)


if __name__ == "__main__":
    run_command("python bench/peer_speed.py", main)
