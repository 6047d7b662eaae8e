#!/usr/bin/env python3
"""Why Split87 and SH4 are defined the way they are: SQNR of the fixed codebooks, and SH4's alpha.

Split87 and SH4 are this project's own tables (golden/codebooks.py): Split87 has
an exact zero, 8 uniform steps of 1/8 above it and 7 of 1/7 below; SH4 compands
the Split87 levels t by ``sinh(a t) / sinh(a)``. This script measures

* the SQNR of every fixed 4-bit codebook (nf4, bof4, bof4-s, split87, sh4, fp4,
  int4) on (a) iid Gaussian data and (b) the all-MiniLM-L6-v2 linear weights;
* a sweep of SH4's ``alpha`` over 0.0 .. 3.0 (step 0.1) on both data sets, and
  the alpha that maximizes each (alpha = 0 is the limit ``t``, i.e. Split87).

The quantizer is the one of bench/hif_sqnr.py: blocks of 16 along the input
dimension, float64 signed block scale ``w[argmax|w|] / peak``, nearest entry of
the *exact* float64 table (no HIF rounding here: this is about the definitions,
not the LUT format).

Run: ``.venv/bin/python bench/codebook_sqnr.py [--out FILE.md]`` (under a minute).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

# The shared quantizer lives next to this file (bench/ is a folder of scripts, not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hif_sqnr import (G, exact_nearest, report_inputs, signed_max, sqnr_db, squared_error,  # noqa: E402
                      weight_blocks)

from sop.argtypes import ToolParser, output_checked  # noqa: E402
from sop.golden.codebooks import FIXED_4BIT, SH4_ALPHA, get_codebook, sh4_levels, split87_levels  # noqa: E402
from sop.golden.files import write_atomic  # noqa: E402
from sop.quantize.weights import minilm_linear_weights  # noqa: E402
from sop.terminal import run_command  # noqa: E402

GAUSS_N = 1 << 22                     # ~4.2M iid N(0, 1) values
GAUSS_SEED = 20250512
ALPHAS = np.round(np.arange(0, 31) * 0.1, 1)


class DataSet:
    """Blocks, their signed maxima and signal power: computed once, reused for every table."""

    def __init__(self, name: str, blocks: np.ndarray):
        self.name = name
        self.blocks = blocks
        self.smax = signed_max(blocks)
        self.signal = float(np.square(blocks).sum())

    def sqnr(self, raw) -> float:
        raw = np.asarray(raw, dtype=np.float64)
        noise = squared_error(self.blocks, self.smax, float(raw.max()), exact_nearest(raw))
        return sqnr_db(self.signal, noise)


def gaussian_blocks() -> np.ndarray:
    return np.random.default_rng(GAUSS_SEED).standard_normal((GAUSS_N // G, G))


def sh4_table(alpha: float) -> np.ndarray:
    """SH4 levels; at alpha = 0 the companding is the identity (the limit of sinh(at)/sinh(a))."""
    return split87_levels() if alpha == 0 else sh4_levels(alpha)


def fixed_table(datasets: list[DataSet]) -> str:
    head = ["codebook"] + [d.name for d in datasets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in FIXED_4BIT:
        raw = get_codebook(name).raw
        label = f"{name} (alpha {SH4_ALPHA})" if name == "sh4" else name
        lines.append(f"| {label} | " + " | ".join(f"{d.sqnr(raw):.2f}" for d in datasets) + " |")
    return "\n".join(lines)


def alpha_sweep(datasets: list[DataSet]) -> tuple[str, dict[str, float]]:
    sqnr = {d.name: np.array([d.sqnr(sh4_table(a)) for a in ALPHAS]) for d in datasets}
    best = {name: float(ALPHAS[int(np.argmax(v))]) for name, v in sqnr.items()}
    head = ["alpha"] + [d.name for d in datasets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, a in enumerate(ALPHAS):
        cells = []
        for d in datasets:
            mark = " **best**" if a == best[d.name] else ""
            cells.append(f"{sqnr[d.name][i]:.3f}{mark}")
        lines.append(f"| {a:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines), best


def main(argv=None) -> int:
    ap = ToolParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.out:                                # before the sweep: a FIFO, a folder or an input is refused
        output_checked(ap, args.out, inputs=report_inputs(__file__))

    t0 = time.perf_counter()
    layers = minilm_linear_weights()
    datasets = [DataSet(f"Gaussian ({GAUSS_N:,} iid, seed {GAUSS_SEED})", gaussian_blocks()),
                DataSet(f"MiniLM ({len(layers)} layers, "
                        f"{sum(w.size for w in layers.values()):,} weights)", weight_blocks(layers))]
    sweep, best = alpha_sweep(datasets)
    gauss, minilm = (d.name for d in datasets)
    text = "\n".join([
        f"SQNR (dB) of the fixed 4-bit codebooks, exact float64 tables, g={G}, signed block max",
        "", fixed_table(datasets), "",
        f"SH4 alpha sweep, SQNR (dB); alpha 0.0 is Split87; project value SH4_ALPHA = {SH4_ALPHA}",
        "", sweep, "",
        f"Best alpha on MiniLM: {best[minilm]:.1f}; best alpha on Gaussian: {best[gauss]:.1f}",
        "", f"Runtime: {time.perf_counter() - t0:.1f} s", ""])
    print(text, end="")
    if args.out:
        write_atomic(args.out, text.encode())
    return 0


if __name__ == "__main__":
    run_command("python bench/codebook_sqnr.py", main)
