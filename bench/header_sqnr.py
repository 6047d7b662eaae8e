#!/usr/bin/env python3
"""Choose the 8-bit SOP4 block header by measured SQNR on the real MiniLM weights.

Every candidate spends exactly 8 header bits per 16-weight block (4.5 bpw):

* select + sign + 6-bit scale (UE2M4, UE3M3, UE4M2, UE5M1): two banks, signed scales;
* select + 7-bit UE4M3 scale: two banks, no scale sign;
* sign + 7-bit UE4M3 scale: one bank (the first of the pair), signed scales.

Each is encoded with quantize.blockwise (the same per-block search for all:
bank, sign, covering scale code and one neighbour each side) and decoded with
the golden decoder; the figure is the aggregate SQNR over all 37 linear layers.

Run: .venv/bin/python bench/header_sqnr.py   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import time

import numpy as np

from sop.argtypes import ToolParser
from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.formats import get_format
from sop.golden.layout import BlockLayout
from sop.quantize.blockwise import encode_layer
from sop.quantize.weights import minilm_linear_weights
from sop.terminal import run_command

PAIRS = [("nf4", "sh4"), ("bof4-s", "split87"), ("nf4", "fp4")]


def candidates() -> dict[str, tuple[BlockLayout, int]]:
    """name -> (layout, number of banks used)."""
    out = {}
    for scale in ("ue2m4", "ue3m3", "ue4m2", "ue5m1"):
        out[f"sel+sign+{scale}"] = (BlockLayout(4, 16, get_format(scale), True, True), 2)
    out["sel+ue4m3"] = (BlockLayout(4, 16, get_format("ue4m3"), False, True), 2)
    out["sign+ue4m3"] = (BlockLayout(4, 16, get_format("ue4m3"), True, False), 1)
    return out


def aggregate_sqnr(weights: dict[str, np.ndarray], layout: BlockLayout, banks) -> float:
    signal = noise = 0.0
    for name, w in weights.items():
        q = decode_layer(encode_layer(w, layout, banks, scale_search=1, name=name))
        w64 = w.astype(np.float64)
        signal += float((w64 ** 2).sum())
        noise += float(((w64 - q) ** 2).sum())
    return 10 * np.log10(signal / noise)


def main() -> None:
    ToolParser(description=__doc__.splitlines()[0]).parse_args()
    weights = minilm_linear_weights()
    cands = candidates()
    print("| header | " + " | ".join(f"{a}+{b}" for a, b in PAIRS) + " |")
    print("|---|" + "---:|" * len(PAIRS))
    t0 = time.time()
    for name, (layout, n_banks) in cands.items():
        row = []
        for pair in PAIRS:
            banks = [get_codebook(n) for n in pair[:n_banks]]
            row.append(f"{aggregate_sqnr(weights, layout, banks):.2f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
    print(f"\naggregate SQNR in dB over {len(weights)} MiniLM layers; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_command("python bench/header_sqnr.py", main)
