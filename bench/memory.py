#!/usr/bin/env python3
"""Peak memory of `sop quantize`, `sop dequantize` and `sop eval`, in bytes per weight of the layer.

A synthetic checkpoint (safetensors, one ``SIZE x SIZE`` linear layer named
``model.layers.0.mlp.down_proj.weight``, weights ``N(0, 1) * 0.02`` from a fixed
seed, float32 by default or ``--dtype bf16``) is quantized in every format
family (``--format`` to choose), and for each format three commands run, each in
a fresh Python process:

* ``quantize``: ``quantize.artifact.quantize_model(..., calibrate=False)`` into a ``.sopq``;
* ``dequantize``: ``quantize.artifact.dequantize`` of that artifact into float32 safetensors;
* ``eval``: ``quantize.evaluate.evaluate(..., calibrate=False, e2e=False)``.

Two more, asked for by ``--command``, quantize the same layer held in memory (the in-memory path,
quantize/in_memory.py): the child loads it into a ``torch.nn.Linear`` of the checkpoint's dtype
(``model.layers.0.mlp.down_proj``) before its baseline is taken, so the model itself is not counted:

* ``module``: ``quantize.in_memory.quantize_module(model, fmt, budget=...)``, no calibration;
* ``module-sopq``: the same with ``out=`` a ``.sopq`` (the layer's matrix then stays until its record
  is written, as the disk path's ``quantize`` holds it).

Their figure includes the cast copy of the quantized layer, which ``quantize_module`` holds until it
writes the model (2 bytes per weight in bf16, 4 in float32): what the disk path does not hold.

The figure is the child's peak resident set (``VmHWM`` of ``/proc/self/status``)
minus its resident set after every import (the interpreter's baseline; the peak
is reset there through ``/proc/self/clear_refs``), divided by the layer's
weights. The target of issue 11 is at most 16 bytes per weight. Wall seconds
of each command are printed too (indicative: other jobs share the machine).

Run: .venv/bin/python bench/memory.py [--size 8192] [--format F ...] [--command C ...] [--budget 5.0]
[--dtype bf16] [--json FILE] (the commands by default: the three of the disk path)

To measure another source tree (a "before" figure), put its ``sop`` package on
``PYTHONPATH``: the children run outside the repository, so it takes precedence
over the editable install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sop.argtypes import ToolParser, output_checked, positive
from sop.golden.files import write_atomic
from sop.quantize.schemes import quant_formats
from sop.quantize.memory import PEAK_BYTES_PER_WEIGHT as TARGET
from sop.terminal import run_command

LAYER = "model.layers.0.mlp.down_proj.weight"
COMMANDS = ("quantize", "dequantize", "eval", "module", "module-sopq")
DISK_COMMANDS = COMMANDS[:3]                        # the default

# The child: imports everything first, takes its baseline, resets the peak, runs one command.
CHILD = r"""
import gc, json, sys, time
import numpy as np
import tqdm
from sop.quantize import artifact, evaluate, schemes, knapsack, sop_search, baselines, blockwise, dd4, sparse
from sop.golden import decoder
from sop.quantize.memory import release_freed_memory
release_freed_memory()                             # as `sop` does at start
try:                                               # a bf16 layer is read through torch, which would count its
    import torch                                   # import (11 bytes per weight of fp8-e4m3-pot's 24.4 at 4096)
except ImportError:
    pass

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

cmd, model, fmt, sopq, out, budget, n = sys.argv[1:8]
budget = None if budget == "-" else float(budget)
if cmd.startswith("module"):                       # the layer in a torch model, loaded before the baseline
    import torch
    from safetensors.torch import load_file
    from sop.quantize import in_memory
    # what quantize_module imports on its first call (transformers' experts conversions, some 700 modules):
    # a fixed cost (about 145 MB, 8.7 bytes per weight at 4096 x 4096) that a script holding a model has paid
    in_memory.linear_modules(torch.nn.Linear(2, 2))
    (name, w), = load_file(model).items()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w.clone())    # resident: load_file's tensor may be pages of the file, read
    #                                                (and counted) only when the quantizer first reads them
    net = torch.nn.ModuleDict({"down_proj": lin})
    for part in reversed(name.split(".")[:-2]):    # model.layers.0.mlp: the layer's name on disk
        net = torch.nn.ModuleList([net]) if part.isdigit() else torch.nn.ModuleDict({part: net})
    del w
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:      # reset VmHWM to the current RSS
    f.write("5")
t0 = time.perf_counter()
if cmd == "quantize":
    artifact.quantize_model(model, fmt, sopq, budget=budget, calibrate=False, progress=False)
elif cmd == "dequantize":
    artifact.dequantize(sopq, out, progress=False)
elif cmd == "eval":
    evaluate.evaluate(model, [fmt], budget=budget, calibrate=False, e2e=False, progress=False)
else:
    in_memory.quantize_module(net, fmt, budget=budget, out=sopq if cmd == "module-sopq" else None)
wall = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "bpw": (peak - base) / int(n), "seconds": wall}))
"""


def write_checkpoint(path: Path, size: int, dtype: str) -> None:
    """One ``size x size`` linear layer, N(0, 1) * 0.02, written without holding a float64 copy."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(11)
    w = np.empty((size, size), dtype=np.float32)
    step = max(1, (1 << 22) // size)
    for r in range(0, size, step):                  # row chunks: the generator's float64 stays small
        w[r:r + step] = rng.standard_normal((min(step, size - r), size)) * 0.02
    if dtype == "bf16":
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({LAYER: torch.from_numpy(w).to(torch.bfloat16)}, str(path))
    else:
        save_file({LAYER: w}, str(path))


#: the longest one measured command may take: past it the child is killed and
#: ``subprocess.TimeoutExpired`` raised, so the bench never waits forever
CHILD_TIMEOUT_S = 4 * 3600


def run_child(cmd: str, model: Path, fmt: str, work: Path, budget: float | None, n: int) -> dict:
    sopq, out = work / f"{fmt}.sopq", work / f"{fmt}.safetensors"
    args = [sys.executable, "-c", CHILD, cmd, str(model), fmt, str(sopq), str(out),
            "-" if budget is None else str(budget), str(n)]
    p = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if p.returncode:
        raise RuntimeError(f"{cmd} {fmt} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = ToolParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=positive(int), default=8192, help="the layer is SIZE x SIZE (default 8192)")
    ap.add_argument("--format", action="append", dest="formats", choices=list(quant_formats()),
                    help="format(s) to measure (default: every format of `sop formats`)")
    ap.add_argument("--command", action="append", dest="commands", choices=COMMANDS,
                    help="command(s) to measure (default: the disk path's three)")
    ap.add_argument("--budget", type=positive(float), default=5.0, help="sop-budget's --budget (default 5.0)")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="checkpoint dtype (default f32)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--workdir", help="folder for the checkpoint and artifacts (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.workdir is not None and not Path(args.workdir).is_dir():
        ap.error(f"--workdir {args.workdir}: not a folder (the temporary folder is made in it)")
    if args.json is not None:
        output_checked(ap, args.json, option="--json")
    formats = args.formats or list(quant_formats())
    commands = [c for c in COMMANDS if c in (args.commands or DISK_COMMANDS)]
    n = args.size * args.size
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp).absolute()         # the children run in it: a relative --workdir named nothing there
        model = work / "model.safetensors"
        t0 = time.perf_counter()
        write_checkpoint(model, args.size, args.dtype)
        print(f"checkpoint: {LAYER} {args.size} x {args.size} {args.dtype} ({n:,} weights), "
              f"{time.perf_counter() - t0:.1f} s; target <= {TARGET:g} bytes/weight", file=sys.stderr)
        head = f"{'format':<16}" + "".join(f"{c + ' B/w':>16}{'s':>7}" for c in commands)
        print(head, flush=True)
        for fmt in formats:
            budget = args.budget if fmt == "sop-budget" else None
            row = {}
            for cmd in commands:
                if cmd == "dequantize" and not (work / f"{fmt}.sopq").exists():
                    run_child("quantize", model, fmt, work, budget, n)
                row[cmd] = run_child(cmd, model, fmt, work, budget, n)
            for f in work.glob(f"{fmt}.*"):
                f.unlink()
            results[fmt] = row
            print(f"{fmt:<16}" + "".join(f"{row[c]['bpw']:16.2f}{row[c]['seconds']:7.1f}" for c in commands),
                  flush=True)
    worst = max(r["bpw"] for row in results.values() for r in row.values())
    print(f"worst {worst:.2f} bytes/weight: target <= {TARGET:g} {'met' if worst <= TARGET else 'MISSED'}")
    if args.json:
        write_atomic(args.json, (json.dumps({"size": args.size, "dtype": args.dtype, "weights": n,
                                             "results": results}, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    run_command("python bench/memory.py", main)
