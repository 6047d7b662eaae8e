#!/usr/bin/env python3
"""The SOP dot-product engine against the naive path, side by side in one flow (issue 15 s.4).

Both do ``y = W x`` from the packed sop4-g16 blocks with E4M3 activations at 16 MACs a
cycle (one block of ``g`` = 16 weights a cycle), and both are built from the project's units:

* **SOP engine** (``sop-engine``): ``hdl.gemv.GemvEngine`` of ``gemv_configs()["gemv-sop4-g16"]``
  (sequencer, x buffer, the table RAM, BlockDot: the exact block sum with one scale multiply and
  one rounding per block, a FIFO, RowAccumulator). If hdl/gemv.py is missing or does not
  elaborate, the units below are measured in its place and the output says so.
* **SOP units** (``sop-units``): the engine's arithmetic alone, BlockDot and RowAccumulator(17),
  each synthesized on its own, their counts added and the lower Fmax taken (no table RAM, no x
  buffer, no sequencer): what the engine costs and reaches without its front end.
* **SOP engine, folded** (``sop-engine-folded``, not in the ratios): the same engine folded
  (``GemvConfig(dot_lanes=1, dot_tail="serial")``: hdl/block_dot_folded.py and the front end in
  chunks): one MAC a cycle, for FPGAs too small for 16 lanes (docs/dot.md 7.2). On iCE40 it is
  hdl.gemv_config's ``small_engines()["gemv-sop4-g16-small"]``, at MiniLM's size with the compact FP32
  adder (``max_cols`` 2048, ``max_rows`` 1536, ``acc_adder="compact"``, ``tile=4``: the iCEBreaker's
  engine, with its residual path), the one that fits the UP5K.
* **naive path** (hdl/naive_dot.py): the decoder (16 lanes, one block a cycle, BF16 weights), a
  BF16 x E4M3 multiply per lane into FP32, and FP32 additions, in its two reductions: ``tree``
  (the block's 16 products through an FP32 adder tree, then one ring of running sums: 16 FP32
  adders, the cheaper one, used for the headline ratios) and ``lanes`` (a ring of running sums per
  lane, then the adder tree over the 16 lane sums: 31 FP32 adders, the issue's "one
  multiply-accumulate per lane"). It has no x buffer or sequencer (its activations come in as a
  stream beside the blocks): that favours it.

Each design runs through synth/flow/yosys_nextpnr.py's ``run_design`` (the I/O wrapper, yosys,
nextpnr at the target's constraint: 200 MHz on ECP5-85F, 50 MHz on iCE40UP5K; seed 1, or
``--seed N``: the synthesized netlist placed again with that seed), with the tables as LUT RAM on
ECP5 as `make synth` builds the decoder (``lutram_depth`` 16). A design larger than the device is
not placed by the flow; this script then runs nextpnr on it anyway to record the utilisation it
reports before it gives up. Reported: LUT4 (ECP5: a carry cell counts as two), FF, RAM blocks
(block RAM; ECP5 LUT RAM cells apart), DSP, Fmax, MACs per cycle, GMAC/s = MACs/cycle x Fmax,
and the ratios naive / SOP.

Outputs under ``build/dot_vs_naive/``: ``report.json`` (every record and the ratios),
``report.md`` (the table), ``runs/`` (the flow's run folders).

Run: .venv/bin/python bench/dot_vs_naive.py [--target ecp5] [--design naive-tree] [--seed 1] [--jobs 2]
     (cold: about 40 min on 2 cores, most of it nextpnr on ECP5; a partial run keeps the other records)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sop.argtypes import ToolParser, out_folder, output_checked, positive
from sop import toolenv
from sop.golden.files import write_atomic
from sop.hdl.block_dot import BlockDot
from sop.hdl.fp32_acc import ADD_LATENCY, RowAccumulator
from sop.hdl.naive_dot import NaiveDot, naive_config
from sop.synth.flow.yosys_nextpnr import (SEED, TARGETS, ToolError, for_target, place_and_route, read_pnr,
                                          rtl_state, run_design, tool_runs_at_once)
from sop.terminal import run_command

OUT = toolenv.build_root() / "dot_vs_naive"
POINT = "sop4-g16"
BENCH_TARGETS = ("ecp5", "ice40")
SOP = "sop-engine"
SOP_UNITS = "sop-units"
SOP_FOLDED = "sop-engine-folded"
NAIVE = ("naive-tree", "naive-lanes")
DESIGNS = (SOP, SOP_UNITS) + NAIVE + (SOP_FOLDED,)
HEADLINE = "naive-tree"
MACS_PER_CYCLE = 16


def sop_units() -> tuple[str, list[tuple[str, object]]]:
    """The SOP arithmetic alone: BlockDot and RowAccumulator(17), each synthesized on its own."""
    from sop.golden.points import get_point
    p = get_point(POINT)
    return (f"BlockDot({POINT}, e4m3) + RowAccumulator({ADD_LATENCY + 1}) synthesized apart, counts added, "
            f"the lower Fmax; no table RAM, no x buffer, no sequencer"), [
        (f"{SOP}-block-dot", BlockDot(p.layout, p.hif)), (f"{SOP}-row-acc", RowAccumulator(ADD_LATENCY + 1))]


def sop_engine(target: str, folded: bool = False) -> tuple[str, list[tuple[str, object]]]:
    """(what was measured, [(run name, component)]): the engine, or (it is unusable) the units alone;
    ``folded``: with the folded block dot unit, a product a cycle (``dot_lanes=1``, the serial tail)."""
    depth = TARGETS[target].lutram_depth
    try:
        from amaranth.back import rtlil

        from sop.hdl.gemv import GemvEngine
        from sop.hdl.gemv_config import SMALL_SIM, gemv_configs, small_engines
        small = folded and target == "ice40"      # the size and adder that fit the UP5K (module docstring)
        cfg = small_engines()[SMALL_SIM] if small else gemv_configs()[f"gemv-{POINT}"]
        cfg = replace(cfg, lutram_depth=depth) if depth else cfg
        if target == "ecp5":          # the x buffer's DP16KDs with their output register (hdl/gemv_x_buffer.py)
            cfg = replace(cfg, x_ram="dp16kd")
        if folded and not small:
            cfg = replace(cfg, dot_lanes=1, dot_tail="serial")
        rtlil.convert(GemvEngine(cfg))                       # elaborates, or the stand-in
        return (f"hdl.gemv.GemvEngine({cfg.name}: tile {cfg.tile}, max_cols {cfg.max_cols}, "
                f"lutram_depth {cfg.lutram_depth}, x_ram {cfg.x_ram}, macs_per_cycle {cfg.macs_per_cycle}, "
                f"acc_adder {cfg.acc_adder})"), [
            (SOP_FOLDED if folded else SOP, GemvEngine(cfg))]
    except Exception as e:                                    # noqa: BLE001  (any failure: the stand-in)
        what, parts = sop_units()
        return f"stand-in (hdl.gemv unusable: {type(e).__name__}: {e}): {what}", parts


def naive(reduction: str, target: str) -> tuple[str, list[tuple[str, object]]]:
    cfg = for_target(naive_config(POINT), target)
    return (f"hdl.naive_dot.NaiveDot({cfg.name}, reduction={reduction!r}, lutram_depth {cfg.lutram_depth})",
            [(f"naive-{reduction}", NaiveDot(cfg, reduction=reduction))])


def nextpnr_utilisation(work: Path, target: str) -> dict:
    """nextpnr's own utilisation of a design the flow did not place (larger than the device): the
    'Device utilisation' lines it logs before it fails, e.g. {"ICESTORM_LC": [used, available]}."""
    t = TARGETS[target]
    try:
        place_and_route(work, t, t.freq_mhz)
    except ToolError:
        pass                                                  # it fails: too large
    log = (work / "nextpnr.log").read_text(errors="replace") if (work / "nextpnr.log").exists() else ""
    util = {m[1]: [int(m[2]), int(m[3])] for m in re.finditer(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)", log)}
    errors = [ln.strip() for ln in log.splitlines() if "ERROR" in ln]
    return {"utilisation": util, "error": errors[-1] if errors else ""}


def place_with_seed(work: Path, target: str, seed: int) -> dict:
    """The synthesized netlist placed and routed again with ``seed`` (as bench/fmax_seeds.py)."""
    t = TARGETS[target]
    run = work / f"seed{seed}"
    run.mkdir(exist_ok=True)
    shutil.copy(work / "netlist.json", run / "netlist.json")
    if not (run / "pnr.json").exists():
        place_and_route(run, t, t.freq_mhz, seed=seed)
    return read_pnr(run)


def measure(design: str, target: str, out: Path, seed: int, force: bool) -> dict:
    what, parts = (sop_engine(target) if design == SOP else sop_units() if design == SOP_UNITS
                   else sop_engine(target, folded=True) if design == SOP_FOLDED
                   else naive(design.split("-", 1)[1], target))
    macs = 1 if design == SOP_FOLDED else MACS_PER_CYCLE
    recs = []
    for name, dut in parts:
        rec = run_design(dut, name, target, out, force=force)
        work = out / "runs" / name / target
        if rec["note"].startswith("does not fit"):
            rec["nextpnr"] = nextpnr_utilisation(work, target)
        elif seed != SEED and rec["fmax_mhz"] is not None:
            rec.update(place_with_seed(work, target, seed))
        recs.append(rec)
    keys = ("luts", "ffs", "brams", "dsps", "lutram", "carries")
    total = {k: sum(r.get(k, 0) for r in recs) for k in keys if any(k in r for r in recs)}
    fmaxes = [r["fmax_mhz"] for r in recs]
    fmax = None if None in fmaxes else min(fmaxes)
    total.update({
        "design": design, "measured": what, "target": target, "device": TARGETS[target].device,
        "constraint_mhz": TARGETS[target].freq_mhz, "seed": seed, "fmax_mhz": fmax,
        "macs_per_cycle": macs, "gmac_s": None if fmax is None else round(macs * fmax / 1000, 2),
        "critical_path": [r.get("critical_path") for r in recs], "note": "; ".join(r["note"] for r in recs if r["note"]),
        "nextpnr": [r["nextpnr"] for r in recs if "nextpnr" in r], "wall_s": sum(r["wall_s"] for r in recs),
        "parts": {name: {k: r.get(k) for k in keys + ("fmax_mhz",)} for (name, _), r in zip(parts, recs)},
    })
    return total


def ratios(results: dict) -> dict:
    """{naive design: {SOP design: {target: naive / SOP}}} of LUT4, FF, Fmax and GMAC/s (None where
    either side has no figure)."""
    out: dict = {}
    for design in NAIVE:
        for sop_design in (SOP, SOP_UNITS):
            for target, sop in results.get(sop_design, {}).items():
                n = results.get(design, {}).get(target)
                if not n:
                    continue
                r = {}
                for k in ("luts", "ffs", "fmax_mhz", "gmac_s"):
                    a, b = n.get(k), sop.get(k)
                    r[k] = None if a is None or not b else round(a / b, 2)
                out.setdefault(design, {}).setdefault(sop_design, {})[target] = r
    return out


def fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def markdown(results: dict, rat: dict) -> str:
    """The measurements, then the ratios naive / SOP."""
    head = ["design", "target", "LUT4", "FF", "RAM", "DSP", "LUT RAM", "Fmax (MHz)", "MACs/cycle", "GMAC/s",
            "note"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for target in BENCH_TARGETS:
        for design in DESIGNS:
            r = results.get(design, {}).get(target)
            if not r:
                continue
            note = r["note"]
            for npr in r["nextpnr"]:
                util = ", ".join(f"{k} {u}/{a}" for k, (u, a) in npr["utilisation"].items() if u)
                note += f" (nextpnr: {util})" if util else ""
            cons = r["constraint_mhz"]
            fmax = "-" if r["fmax_mhz"] is None else f"{r['fmax_mhz']:.1f} ({cons:g} asked)"
            lines.append("| " + " | ".join(str(x) for x in [
                design, target, r["luts"], r["ffs"], r["brams"], r["dsps"], r.get("lutram", ""), fmax,
                r["macs_per_cycle"], fmt(r["gmac_s"]), note]) + " |")
    lines += ["", "| naive / SOP | target | LUT4 | FF | Fmax | GMAC/s |", "|---|---|---:|---:|---:|---:|"]
    for design, per_sop in rat.items():
        for sop_design, per_target in per_sop.items():
            for target, q in per_target.items():
                lines.append(f"| {design} / {sop_design} | {target} | " + " | ".join(
                    fmt(q[k]) for k in ("luts", "ffs", "fmax_mhz", "gmac_s")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = ToolParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", action="append", choices=BENCH_TARGETS, help="default: both")
    p.add_argument("--design", action="append", choices=DESIGNS, help="default: all five")
    p.add_argument("--seed", type=positive(int), default=SEED, help="nextpnr placement seed (default 1, the flow's)")
    p.add_argument("--jobs", type=positive(int), default=1, help="synthesis runs at once (at most one per usable CPU)")
    p.add_argument("--force", action="store_true", help="run the tools again even where cached")
    p.add_argument("--out", type=out_folder, default=OUT)
    args = p.parse_args()
    output_checked(p, args.out, folder=True, option="--out")       # before any synthesis
    toolenv.apply()
    targets, designs = args.target or list(BENCH_TARGETS), args.design or list(DESIGNS)
    out = args.out
    path = out / "report.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    results = {d: dict(per) for d, per in old.get("results", {}).items()}       # a partial run keeps the rest
    t0 = time.monotonic()

    def one(item):
        design, target = item
        rec = measure(design, target, out, args.seed, args.force)
        print(f"{design:>12} {target:>6}: {rec['luts']:>6} LUT4 {rec['ffs']:>6} FF {rec['brams']:>3} RAM "
              f"{rec['dsps']:>3} DSP  {fmt(rec['fmax_mhz'], '7.2f')} MHz  ({rec['wall_s']} s) {rec['note']}",
              flush=True)
        return design, target, rec

    jobs = [(d, t) for t in targets for d in designs]
    with ThreadPoolExecutor(max_workers=tool_runs_at_once(args.jobs)) as pool:
        for design, target, rec in pool.map(one, jobs):
            results.setdefault(design, {})[target] = rec
    rat = ratios(results)
    table = markdown(results, rat)
    measured = sorted({r["measured"] for per in results.values() for r in per.values()})
    report = {"point": POINT, "activations": "e4m3", "rtl": rtl_state(), "results": results,
              "ratios_naive_over_sop": rat, "headline": HEADLINE, "measured": measured}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(report, indent=1) + "\n").encode())
    write_atomic(out / "report.md", (table + "".join(f"\n* {m}\n" for m in measured)).encode())
    print()
    print(table)
    for m in measured:
        print(f"* {m}")
    print(f"\n{time.monotonic() - t0:.0f} s; {path}")


if __name__ == "__main__":
    run_command("python bench/dot_vs_naive.py", main)
