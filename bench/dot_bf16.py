#!/usr/bin/env python3
"""How often the BF16 block dot unit takes its slow path on real activations (docs/dot.md section 7).

``BlockDot(layout, hif, act="bf16")`` (hdl/block_dot_bf16.py) sums a block in a window of ``F``
fraction bits below its largest product and falls back to an exact serial path when a product
would lose a nonzero bit to the window, or when the result lies below the range its ``Q`` holds.
``hdl.block_dot_bf16.takes_fallback`` is that rule in numpy (the tests check it against the
unit's own count). This script runs all-MiniLM-L6-v2 on held-out sentences, takes every linear
layer's real input rows (the non-padding tokens, rounded to BF16), quantizes the layer to
sop4-g16 and counts, for every (token, block), whether the unit falls back, at the built ``F``
and at smaller windows (what the choice of ``F`` rests on).

Run: ``.venv/bin/python bench/dot_bf16.py [--sentences N] [--layers all|0]`` (a few minutes for
all six encoder layers).
"""

from __future__ import annotations

import time

import numpy as np

from sop.argtypes import ToolParser, positive
from sop.golden import dot
from sop.golden.layout import unpack_blocks
from sop.golden.points import get_point
from sop.hdl import block_dot_bf16
from sop.hdl.block_dot_bf16 import takes_fallback
from sop.quantize.calib import HELDOUT_RESERVE
from sop.terminal import run_command

BF16 = dot.ACT_FORMATS["bf16"]


def _windows(text: str) -> list[int]:
    return [positive(int)(w) for w in text.split(",")]


def main() -> None:
    ap = ToolParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=positive(int, HELDOUT_RESERVE), default=8,
                    help=f"held-out sentences (1 to {HELDOUT_RESERVE}; default 8)")
    ap.add_argument("--layers", choices=("all", "0"), default="0")
    ap.add_argument("--windows", type=_windows, default="16,20,24,28,32",
                    help="window widths to try, comma-separated (default 16,20,24,28,32)")
    args = ap.parse_args()

    from sop.quantize.calib import heldout_sentences
    from sop.quantize.e2e import Bert
    from sop.quantize.models import minilm_folder, open_model
    from sop.quantize.schemes import get_quant_format

    t0 = time.time()
    bert = Bert(minilm_folder())
    inputs: dict[str, np.ndarray] = {}
    bert.embed(heldout_sentences(args.sentences), hook=lambda n, x: inputs.setdefault(n, x))
    names = [n for n in bert.linear_names() if n in inputs and "pooler" not in n]
    if args.layers == "0":
        names = [n for n in names if n.startswith("encoder.layer.0.")]
    point = get_point("sop4-g16")
    windows = args.windows
    total = {w: 0 for w in windows}
    blocks_all = 0
    print("| layer | tokens x blocks | " + " | ".join(f"F = {w}" for w in windows) + " |")
    print("|---|---:|" + "---:|" * len(windows))
    model = open_model("minilm")
    for name in names:
        stream = get_quant_format("sop4-g16").quantize(model.load(name).astype(np.float32)).stream
        lay, g = stream.layout, stream.layout.group
        headers, codes = unpack_blocks(lay, stream.blocks)
        scale, _, select = lay.split_header(headers)
        hif = np.asarray(stream.luts, np.int64)[select[:, None], codes]
        x = BF16.quantize(inputs[name]).astype(np.float32)
        xc = dot.activation_codes(x, BF16).reshape(len(x), -1, g)
        bpr = stream.cols // g
        counts = {}
        for w in windows:
            n = 0
            for tok in xc:                                     # every block of the layer with this token
                act = np.tile(tok, (stream.rows, 1))
                n += int(takes_fallback(lay, point.hif, hif, act, scale, np.full(len(hif), stream.offset),
                                       f_bits=w).sum())
            counts[w] = n
            total[w] += n
        nb = len(xc) * len(hif)
        blocks_all += nb
        print(f"| {name.removesuffix('.weight')} | {len(xc)} x {len(hif)} | "
              + " | ".join(f"{counts[w] / nb:.4%} ({counts[w]})" for w in windows) + " |", flush=True)
        assert bpr * stream.rows == len(hif)
    print(f"| all | {blocks_all} | " + " | ".join(f"{total[w] / blocks_all:.4%} ({total[w]})" for w in windows)
          + " |")
    print(f"built F = {block_dot_bf16.F_BITS}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_command("python bench/dot_bf16.py", main)
