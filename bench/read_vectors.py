#!/usr/bin/env python3
"""Vector values read per second by read_vectors (sim/vectors.py), before and after its numpy parse.

Writes MiniLM vectors once (sop4-g16: the first ``--layers`` linear layers of the model, all of them
with ``--layers 0``; with ``--sparse`` also the sop4-g16 layers of the sop-budget artifact, which carry
sparse residuals, made once and cached under build/vectors/), then reads each set with the reader of
an earlier revision (``--old``, imported from ``git show REV:sim/vectors.py``: the line-by-line parser)
and with today's, alternately, in one process; checks that both return the same arrays, bit for bit,
and prints the best of ``--rounds`` reads of each: values (decoded weights) per second.

Run: .venv/bin/python bench/read_vectors.py [--layers 6] [--sparse] [--rounds 3]
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sop.argtypes import ToolParser, number, positive
from sop.sim import vectors
from sop.terminal import run_command

#: the last revision with the line-by-line reader
OLD = "aadb5a5628c3da68cf243bee423f2a0f5dbbd85c"
FIELDS = ("luts", "offset", "headers", "codes", "expected_bf16", "expected_exact", "sparse_index", "sparse_values")


ROOT = Path(__file__).resolve().parents[1]


def old_source(rev: str) -> bytes | None:
    """sim/vectors.py as it was at ``rev`` (None: no such revision, or no such file in it; a ``rev``
    beginning with ``-`` would be an option of git's)."""
    if rev.startswith("-"):
        return None
    p = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:sim/vectors.py"], capture_output=True)
    return p.stdout if p.returncode == 0 else None


def old_module(source: bytes, tmp: Path):
    """``source`` (an earlier sim/vectors.py) imported as a module of its own."""
    path = tmp / "vectors_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("vectors_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def same(a, b) -> bool:
    return all(np.asarray(getattr(a, f)).dtype == np.asarray(getattr(b, f)).dtype
               and np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def main() -> None:
    p = ToolParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=number(int, 0, inclusive=True), default=6,
                   help="MiniLM's first N linear layers (0: all 37)")
    p.add_argument("--sparse", action="store_true", help="also the sop-budget artifact's sop4-g16 layers")
    p.add_argument("--rounds", type=positive(int), default=3)
    p.add_argument("--old", default=OLD, help="the revision whose reader is timed as before")
    args = p.parse_args()
    source = old_source(args.old)           # before any work: a bad revision was a traceback after none
    if source is None:
        p.error(f"--old {args.old}: no sim/vectors.py at that revision in {ROOT} (git show failed)")
    from sop.quantize.models import open_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = old_module(source, tmp)
        names = [lay.name for lay in open_model("minilm").layers]
        names = names[:args.layers] if args.layers else names
        sets = {f"minilm, {len(names)} layers": vectors.make_vectors("minilm", "sop4-g16", names, tmp / "dense")}
        if args.sparse:
            art = vectors.minilm_budget_artifact(6.0)
            sets["sop-budget artifact, sop4-g16 layers"] = vectors.make_vectors(str(art), "sop4-g16", None,
                                                                                 tmp / "sparse")
        print("| vector set | values | sparse entries | old s | new s | old values/s | new values/s | speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, index in sets.items():
            best = {"old": float("inf"), "new": float("inf")}
            for _ in range(args.rounds):
                for kind, read in (("old", old.read_vectors), ("new", vectors.read_vectors)):
                    t = time.perf_counter()
                    layers = read(index.parent)
                    best[kind] = min(best[kind], time.perf_counter() - t)
                    if kind == "old":
                        before = layers
                assert len(before) == len(layers) and all(map(same, before, layers)), "the readers differ"
            n = sum(lay.codes.size for lay in layers)
            entries = sum(len(lay.sparse_index) for lay in layers)
            print(f"| {label} | {n:,} | {entries:,} | {best['old']:.2f} | {best['new']:.2f} | "
                  f"{n / best['old'] / 1e6:.2f} M | {n / best['new'] / 1e6:.2f} M | "
                  f"{best['old'] / best['new']:.1f}x |", flush=True)


if __name__ == "__main__":
    run_command("python bench/read_vectors.py", main)
