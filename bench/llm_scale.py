#!/usr/bin/env python3
"""Large models and parallel search: peak memory per weight, the memory refusal, the --jobs 2 speed-up.

Peak memory per weight of the largest layer on a sharded multi-GB bf16 checkpoint, the end-to-end
memory refusal, and the `--jobs 2` speed-up.

1. **Checkpoint.** Under ``--workdir`` (default ``build/bench/llm_scale``; the script writes
   nowhere else) a synthetic Llama-shaped checkpoint: ``--blocks`` transformer blocks of 7B-class
   shapes (hidden 4096, intermediate 14336, times ``--scale``): q/k/v/o ``H x H``, gate/up
   ``I x H``, down ``H x I``, the norms, and an embedding (``32000 x H``, kept), in bf16, one
   safetensors shard per block plus ``model.safetensors.index.json``, no config.json (so there is
   no forward pass: calibration and the end-to-end check are skipped, as the tool says). Each
   tensor is generated row chunk by row chunk from its own seed and streamed into its shard: the
   writer holds a few MB whatever the size. Kept between runs (a manifest records the
   parameters).
2. **Memory.** Each command runs in a fresh process as `sop` does (``sop.cli.main`` in a child
   that resets its peak at start and reports its ``VmHWM``): ``eval --no-calib --no-e2e``, ``quantize --no-calib`` and
   ``dequantize``, per format (``--format``, default nf4-g64 and e2m3-ue4m4-g16 over the whole
   model; sop4-g16 over block 0's MLP, ``--sop4-include``, since its search runs at about 1 M
   weights/s). The figure is (peak RSS - the fixed overhead) / weights of the largest layer,
   where the overhead is the peak RSS of the same command on a one-layer 64 x 64 checkpoint (the
   interpreter, numpy, torch, the quantizer). Every per-layer progress line the command printed is
   counted and the first and last are shown.
3. **Refusal.** A folder with a Llama-7B config.json and a *sparse* safetensors file of its shapes
   (32 blocks, 8.0 G parameters, 16 GB that take no disk): `sop eval` (end-to-end on) and
   `sop quantize` (calibration on) must be refused at once, in one line, with nothing written.
4. **--jobs.** `sop eval minilm --format sop4-g16 --no-calib --no-e2e` with --jobs 1 and 2
   (``--jobs-repeats`` runs each, best time kept; the JSON must be the same but its timings).

Run: .venv/bin/python bench/llm_scale.py [--scale 1.0] [--blocks 4] [--format F ...] [--skip-memory]
     [--skip-jobs] [--json FILE]; ``--scale 0.125 --blocks 2`` is a quick check (about a minute; its
     layers are so small that the process's fixed memory puts it past 16 bytes per weight: MISSED
     is expected there).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sop import toolenv
from sop.argtypes import ToolParser, output_checked, positive
from sop.golden.files import write_atomic
from sop.quantize.memory import PEAK_BYTES_PER_WEIGHT as TARGET
from sop.terminal import run_command

HIDDEN, INTER, VOCAB = 4096, 14336, 32000
# The child resets its peak first (ru_maxrss and VmHWM are inherited from the forking parent
# across exec, so the bench's own resident set would be a floor), then runs `sop` as the
# command line does and reports VmHWM.
CHILD = r"""
import sys
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from sop.quantize.job_server import start_for      # what the `sop` console script does first (sop.launch)
start_for(sys.argv[1:])
from sop.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(f"@@peak {peak}", file=sys.stderr, flush=True)
sys.exit(rc)
"""


def dims(scale: float) -> tuple[int, int, int]:
    def r(x):
        return max(64, int(round(x * scale / 64)) * 64)
    return r(HIDDEN), r(INTER), r(VOCAB)


def block_tensors(b: int, H: int, I: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{b}."
    return ([(p + f"self_attn.{x}_proj.weight", (H, H)) for x in "qkvo"]
            + [(p + "mlp.gate_proj.weight", (I, H)), (p + "mlp.up_proj.weight", (I, H)),
               (p + "mlp.down_proj.weight", (H, I)),
               (p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))])


def bf16_bytes(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 (round to nearest even, as torch does), little-endian bytes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(
        torch.int16).numpy().tobytes()


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, sparse: bool = False) -> int:
    """A safetensors file of bf16 ``tensors``, N(0, 1) x 0.02 (norms 1), streamed row chunk by row
    chunk; ``sparse``: the data left as a hole (zeros that take no disk). Returns its size."""
    header, pos = {}, 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        if sparse:
            f.truncate(8 + len(hb) + pos)
        else:
            for i, (name, shape) in enumerate(tensors):
                rng = np.random.default_rng([seed, i])
                if len(shape) == 1:
                    f.write(bf16_bytes(np.ones(shape, dtype=np.float32)))
                    continue
                rows, cols = shape
                step = max(1, (1 << 22) // cols)
                for r in range(0, rows, step):
                    f.write(bf16_bytes(rng.standard_normal((min(step, rows - r), cols), dtype=np.float32) * 0.02))
    os.replace(tmp, path)
    return path.stat().st_size


def make_checkpoint(folder: Path, scale: float, blocks: int) -> dict:
    H, I, V = dims(scale)
    manifest = {"scale": scale, "blocks": blocks, "hidden": H, "intermediate": I, "vocab": V}
    mf = folder / "manifest.json"
    if mf.is_file() and json.loads(mf.read_text()) == manifest:
        return manifest
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    weight_map = {}
    for b in range(blocks):
        shard = f"model-{b + 1:05d}-of-{blocks:05d}.safetensors"
        tensors = block_tensors(b, H, I) + ([("model.embed_tokens.weight", (V, H))] if b == 0 else [])
        write_shard(folder / shard, tensors, seed=b)
        weight_map.update({name: shard for name, _ in tensors})
        print(f"  shard {shard}: {(folder / shard).stat().st_size / 1e9:.2f} GB", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    mf.write_text(json.dumps(manifest))
    print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return manifest


#: the longest one `sop` run may take (a 7B-size layer at one job takes minutes): past it the child
#: is killed and ``subprocess.TimeoutExpired`` raised, so the bench never waits forever
CHILD_TIMEOUT_S = 4 * 3600


def run_sop(args: list[str], cwd: Path, env: dict | None = None) -> dict:
    """`sop ARGS` in a fresh process: exit status, wall seconds, peak RSS, progress lines, stderr."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    lines = p.stderr.splitlines()
    peak = next((int(l.split()[1]) for l in lines if l.startswith("@@peak ")), None)
    progress = [l for l in lines if " [" in l and "] " in l and l.endswith(" s")]
    errors = [l for l in lines if l.startswith("sop: ")]
    return {"rc": p.returncode, "seconds": wall, "peak": peak, "progress": progress, "errors": errors,
            "stdout": p.stdout}


def commands(model: Path, fmt: str, work: Path, include: list[str]) -> dict[str, list[str]]:
    sel = [a for g in include for a in ("--include", g)]
    sopq = work / f"{fmt}.sopq"
    return {"eval": ["eval", str(model), "--format", fmt, "--no-calib", "--no-e2e", *sel,
                     "--json", str(work / f"{fmt}.json")],
            "quantize": ["quantize", str(model), "--format", fmt, "--no-calib", "--out", str(sopq), *sel],
            "dequantize": ["dequantize", str(sopq), "--out", str(work / f"{fmt}.safetensors")]}


def memory_bench(args, work: Path) -> dict:
    model = work / "model"
    print(f"checkpoint: {args.blocks} blocks at scale {args.scale} in {model}", file=sys.stderr)
    man = make_checkpoint(model, args.scale, args.blocks)
    H, I = man["hidden"], man["intermediate"]
    largest = H * I
    total_linear = args.blocks * (4 * H * H + 3 * H * I)
    disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    tiny = work / "tiny"
    tiny.mkdir(exist_ok=True)
    write_shard(tiny / "model.safetensors", [("model.layers.0.mlp.down_proj.weight", (64, 64))], seed=99)
    out = {"checkpoint": {**man, "bytes": disk, "linear_weights": total_linear, "largest_layer": [I, H],
                          "largest_weights": largest}, "formats": {}}
    print(f"  {disk / 1e9:.2f} GB on disk, {total_linear:,} linear weights, largest layer {I} x {H} "
          f"({largest:,} weights)", file=sys.stderr)
    plan = [(f, []) for f in args.formats] + ([("sop4-g16", args.sop4_include)] if args.sop4 else [])
    for fmt, include in plan:
        row = {"include": include}
        overhead = {}
        for cmd, argv in commands(tiny / "model.safetensors", fmt, tiny, []).items():
            r = run_sop(argv + ["--quiet"], work)
            if r["rc"]:
                raise RuntimeError(f"overhead run {cmd} {fmt} failed: {r['errors']}")
            overhead[cmd] = r["peak"]
        for cmd, argv in commands(model, fmt, work, include).items():
            r = run_sop(argv, work)
            if r["rc"]:
                raise RuntimeError(f"{cmd} {fmt} failed: {r['errors']}")
            bpw = (r["peak"] - overhead[cmd]) / largest
            row[cmd] = {"peak": r["peak"], "overhead": overhead[cmd], "bytes_per_weight": bpw,
                        "seconds": r["seconds"], "progress_lines": len(r["progress"]),
                        "first": r["progress"][:1], "last": r["progress"][-1:]}
            print(f"{fmt:<16} {cmd:<10} peak {r['peak'] / 2**20:8.0f} MiB, overhead {overhead[cmd] / 2**20:5.0f} MiB: "
                  f"{bpw:6.2f} B/w of the largest layer, {r['seconds']:7.1f} s, {len(r['progress'])} progress lines",
                  flush=True)
            for line in r["progress"][:1] + r["progress"][-1:]:
                print(f"    {line}", flush=True)
        for f in work.glob(f"{fmt}.*"):
            f.unlink()
        out["formats"][fmt] = row
    return out


def refusal_bench(work: Path) -> dict:
    """A Llama-7B-shaped folder (config.json, a sparse safetensors of its shapes): refused at once."""
    folder = work / "llama7b-sparse"
    folder.mkdir(exist_ok=True)
    tensors = [t for b in range(32) for t in block_tensors(b, HIDDEN, INTER)]
    tensors += [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
                ("model.norm.weight", (HIDDEN,))]
    st = folder / "model.safetensors"
    if not st.is_file():
        write_shard(st, tensors, seed=0, sparse=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": VOCAB, "tie_word_embeddings": False}))
    params = sum(math.prod(s) for _, s in tensors)
    res = {"params": params, "file_bytes": st.stat().st_size, "disk_bytes": st.stat().st_blocks * 512}
    for name, argv in (("eval", ["eval", str(folder), "--format", "nf4-g64", "--json", str(work / "refused.json")]),
                       ("quantize", ["quantize", str(folder), "--format", "nf4-g64", "--out",
                                     str(work / "refused.sopq")])):
        r = run_sop(argv, work)
        written = [p.name for p in work.glob("refused.*")]
        res[name] = {"rc": r["rc"], "seconds": r["seconds"], "error": r["errors"], "written": written}
        print(f"refusal {name}: exit {r['rc']} in {r['seconds']:.1f} s, written {written or 'nothing'}: "
              f"{r['errors'][-1] if r['errors'] else '(no error!)'}", flush=True)
    return res


def jobs_bench(repeats: int, work: Path) -> dict:
    base = ["eval", "minilm", "--format", "sop4-g16", "--no-calib", "--no-e2e", "--quiet"]
    res, docs = {}, {}
    for jobs in (1, 2) * repeats:
        out = work / f"jobs{jobs}.json"
        r = run_sop(base + ["--jobs", str(jobs), "--json", str(out)], work)
        if r["rc"]:
            raise RuntimeError(f"--jobs {jobs} failed: {r['errors']}")
        res.setdefault(jobs, []).append(r["seconds"])
        doc = json.loads(out.read_text())
        for f in doc["formats"].values():
            f.pop("seconds")
        docs[jobs] = doc
        print(f"minilm sop4-g16 --jobs {jobs}: {r['seconds']:.1f} s", flush=True)
    same = docs[1] == docs[2]
    speedup = min(res[1]) / min(res[2])
    print(f"--jobs 2 speed-up {speedup:.2f}x (best of {repeats}; target >= 1.7), same JSON: {same}", flush=True)
    return {"seconds": res, "speedup": speedup, "same_json": same}


def main(argv=None) -> int:
    ap = ToolParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=positive(float), default=1.0,
                    help="layer dimensions times this (default 1: 7B-class)")
    ap.add_argument("--blocks", type=positive(int), default=4, help="transformer blocks, one shard each (default 4)")
    ap.add_argument("--format", action="append", dest="formats", help="formats over the whole model "
                    "(default nf4-g64, e2m3-ue4m4-g16; none: only the sop4-g16 run)")
    ap.add_argument("--no-sop4", dest="sop4", action="store_false", help="skip the sop4-g16 run")
    ap.add_argument("--sop4-include", action="append", default=None, metavar="GLOB",
                    help="layers of the sop4-g16 run (default model.layers.0.mlp.*)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-refusal", action="store_true")
    ap.add_argument("--skip-jobs", action="store_true")
    ap.add_argument("--jobs-repeats", type=positive(int), default=2)
    ap.add_argument("--workdir", default=str(toolenv.build_root() / "bench" / "llm_scale"),
                    help="the checkpoint's folder (default build/bench/llm_scale under the working folder)")
    ap.add_argument("--json", help="also write the figures here (default WORKDIR/results.json)")
    args = ap.parse_args(argv)
    args.formats = [f for f in args.formats or ["nf4-g64", "e2m3-ue4m4-g16"] if f != "none"]
    args.sop4_include = args.sop4_include or ["model.layers.0.mlp.*"]
    from sop.quantize.schemes import quant_formats

    if unknown := [f for f in args.formats if f not in quant_formats()]:
        ap.error(f"--format: unknown format(s) {', '.join(unknown)}; valid: {', '.join(quant_formats())}, none")
    work = Path(args.workdir).resolve()
    out = Path(args.json) if args.json else work / "results.json"
    output_checked(ap, work, folder=True)   # before gigabytes of checkpoint are written
    output_checked(ap, out)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}}
    if not args.skip_memory:
        results["memory"] = memory_bench(args, work)
    if not args.skip_refusal:
        results["refusal"] = refusal_bench(work)
    if not args.skip_jobs:
        results["jobs"] = jobs_bench(args.jobs_repeats, work)
    write_atomic(out, (json.dumps(results, indent=1) + "\n").encode())
    if "memory" in results:
        worst = max(c["bytes_per_weight"] for row in results["memory"]["formats"].values()
                    for k, c in row.items() if k != "include")
        print(f"worst {worst:.2f} bytes/weight of the largest layer: target <= {TARGET:g} "
              f"{'met' if worst <= TARGET else 'MISSED'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_command("python bench/llm_scale.py", main)
