#!/usr/bin/env python3
"""The golden decoder's BF16 output timed against its exact output and against the old table search.

``decode_layer(stream, "bf16")`` against ``"exact"``, and against the table search it used before
(docs/benchmarks.md, "The golden decoder's BF16 output").

A seeded ``SIZE x SIZE`` matrix, ``N(0, 1) * 0.02`` in float32 (a model's weights), is quantized to each
format (the registry's quantizer, no calibration; not timed), once as it is and once with the 0.25 % largest
residuals as sparse entries (``quantize.sparse.add_sparse``, the density ``sop-budget`` stores). Each stream
is then decoded three ways in this one process, alternating, best of ``--repeat``, in user CPU seconds
(``resource.getrusage``: the figure that holds on a machine shared with other jobs, the decoder being numpy
on one thread; wall and system time took spikes of 0.6 s from the machine, the same page faults either way):

* ``exact``: ``decode_layer(stream, "exact")``, no rounding (with residuals: one float64 addition);
* ``bf16``: ``decode_layer(stream, "bf16")``, the exact sum rounded once to BF16 on its bits
  (``golden.formats.round_to_bf16``);
* ``bf16, table``: the same with the decoder's rounding swapped for the one it had before, the table search
  ``FORMATS["bf16"].quantize`` of the finite values (NaN kept); the two BF16 outputs are checked equal,
  bit for bit, every run.

Run: .venv/bin/python bench/decode_bf16.py [--size 4096] [--format sop4-g16 --format e2m3-ue4m4-g16]
[--repeat 5]
"""

from __future__ import annotations

import resource

import numpy as np

from sop.argtypes import ToolParser, positive
from sop.golden import decoder
from sop.golden.formats import FORMATS
from sop.terminal import run_command

FORMATS_TIMED = ("sop4-g16", "e2m3-ue4m4-g16")
#: sparse entries per weight: the density sop-budget stores on MiniLM (docs/benchmarks.md, sparse residuals)
SPARSE_DENSITY = 1 / 400


def user_seconds() -> float:
    """User CPU seconds of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def table_rounding(value: np.ndarray) -> np.ndarray:
    """The decoder's BF16 rounding before ``round_to_bf16``: the table's ``quantize`` of the finite values."""
    finite = ~np.isnan(value)
    rounded = np.full_like(value, np.nan)
    rounded[finite] = FORMATS["bf16"].quantize(value[finite])
    return rounded


def streams(size: int, fmt: str):
    """(label, stream) of the seeded matrix in ``fmt``, without and with sparse residuals."""
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.sparse import add_sparse

    w = (np.random.default_rng(0).standard_normal((size, size)) * 0.02).astype(np.float32)
    res = get_quant_format(fmt).quantize(w)
    sparse, _ = add_sparse(res.stream, w, res.recon, int(w.size * SPARSE_DENSITY))
    return [(fmt, res.stream), (f"{fmt} + {len(sparse.sparse):,} sparse", sparse)]


def best_times(stream, repeat: int) -> dict[str, float]:
    """Best user CPU seconds of each way (module docstring), the ways alternating; the BF16 outputs compared."""
    ways = {"exact": (decoder.round_to_bf16, "exact"), "bf16": (decoder.round_to_bf16, "bf16"),
            "bf16, table": (table_rounding, "bf16")}
    best = dict.fromkeys(ways, float("inf"))
    bits = {}
    rounding = decoder.round_to_bf16
    try:
        for _ in range(repeat):
            for name, (rule, out) in ways.items():
                decoder.round_to_bf16 = rule
                t0 = user_seconds()
                got = decoder.decode_layer(stream, out)
                best[name] = min(best[name], user_seconds() - t0)
                if out == "bf16":
                    bits[name] = got.view(np.uint64)
            if not np.array_equal(bits["bf16"], bits["bf16, table"]):
                raise SystemExit("decode_bf16: the bit rounding and the table's differ: a bug in round_to_bf16")
    finally:
        decoder.round_to_bf16 = rounding
    return best


def ratio(a: float, b: float) -> str:
    """``a / b`` for the table, "-" where ``b`` is below the clock's resolution (a small ``--size``)."""
    return f"{a / b:.2f}x" if b > 0 else "-"


def main() -> None:
    ap = ToolParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=positive(int), default=4096, help="rows and columns of the layer (default 4096)")
    ap.add_argument("--format", action="append", choices=FORMATS_TIMED, help="a format to time (default: both)")
    ap.add_argument("--repeat", type=positive(int), default=5, help="runs of each way, the best kept (default 5)")
    args = ap.parse_args()
    print(f"{args.size} x {args.size} layer, best of {args.repeat}, user CPU seconds")
    print("| stream | exact | bf16 | bf16, table | bf16 / exact | table / exact | table / bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fmt in args.format or FORMATS_TIMED:
        for label, stream in streams(args.size, fmt):
            t = best_times(stream, args.repeat)
            print(f"| {label} | {t['exact']:.2f} | {t['bf16']:.2f} | {t['bf16, table']:.2f} | "
                  f"{ratio(t['bf16'], t['exact'])} | {ratio(t['bf16, table'], t['exact'])} | "
                  f"{ratio(t['bf16, table'], t['bf16'])} |", flush=True)


if __name__ == "__main__":
    run_command("python bench/decode_bf16.py", main)
