#!/usr/bin/env python3
"""Fmax over placement seeds on ECP5: the table read as LUT RAM rows against one memory per lane.

nextpnr's placement depends on its seed, and at 200 MHz on ECP5 the achieved
Fmax of one design moves by several per cent from seed to seed. `make synth`
reports seed 1; this script shows the spread. For each operating point
(sop4-g16, e2m3-ue4m4-g16: 8 lanes) it builds two variants side by side in the
same process:

* ``lutram`` (what `make synth` builds for ECP5, synth.flow.yosys_nextpnr.for_target:
  ``lutram_depth`` 16 for sop4, 32 for the 6-bit codes): the tables as LUT RAM
  memories, each read into its own register, then a registered row select;
* ``lutram_depth=0`` (the baseline: one memory per lane, the 4:1 or 8:1 row
  mux in front of the read register: the shape ECP5 was built with before);

synthesizes each once (synth/flow/yosys_nextpnr.py, ``build/synth-seeds/``) and places and
routes it with seeds 1 to ``--seeds``, then prints per variant the Fmax of
every seed, min / median / max, and the ratio of the medians.

``--lanes N`` (repeatable) measures each configuration's layout at ``N`` lanes instead (``<name>-x<N>``,
the lane sweep's configuration, bench/lane_sweep.py ``sweep_config``): the widest decoder that
keeps a median of 200 MHz.

``--copies K`` places ``K`` decoders of each configuration side by side, each with its own
ports (``Copies``; label ``<name>-<variant>-k<K>``): whether ``K`` decoders of ``N`` lanes keep
the clock that one decoder of ``K N`` lanes does not.

``--placer NAME`` (repeatable; ``PLACERS``) places each netlist again with nextpnr's own
settings changed, beside the flow's (``default``): the same netlist and seeds, so that
the rows compare the placer alone (``speed7``, ``speed8``: the same placer, timed for speed
grade 7 or 8).

Run: .venv/bin/python bench/fmax_seeds.py [--seeds 5] [--jobs 2]    (about 5 min)
     .venv/bin/python bench/fmax_seeds.py --config sop4-g16-x64 --variant lutram   (64 lanes: 8-14 min a seed)
     .venv/bin/python bench/fmax_seeds.py --variant lutram --placer default --placer timing40
     .venv/bin/python bench/fmax_seeds.py --variant lutram --lanes 16 --lanes 32   (2-5 min a seed)
     .venv/bin/python bench/fmax_seeds.py --variant lutram --lanes 32 --copies 2    (6-10 min a seed)
     .venv/bin/python bench/fmax_seeds.py --config sop4-g16-x64 --variant lutram --placer speed8   (speed grade 8)
     .venv/bin/python bench/fmax_seeds.py --config sop4-g16-x64 --variant lutram --placer speed7   (speed grade 7)
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from sop.argtypes import ToolParser, positive
from sop import toolenv
from sop.golden.files import write_atomic
from sop.golden.points import config_point
from sop.hdl.config import DecoderConfig, named_configs
from sop.hdl.decoder import Decoder
from sop.hdl.generate import module_name
from sop.synth.flow.yosys_nextpnr import (SEED, TARGETS, for_target, place_and_route, read_pnr, run_design,
                                          tool_runs_at_once)
from sop.terminal import run_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lane_sweep import sweep_config  # noqa: E402  (a sibling script: bench/ is not a package)

OUT = toolenv.build_root() / "synth-seeds"
CONFIGS = ("sop4-g16", "e2m3-ue4m4-g16")
VARIANTS = ("lutram", "one-memory")
# nextpnr settings added to the flow's ECP5 command (``default``: none): HeAP's timing weight
# (default 10) and criticality exponent (default 2) raised; the electrostatic placer in place of HeAP;
# the router's timing-driven rip-up, alone and after timing40's placement (docs/fmax64.md);
# speed grade 7, or the fastest, 8, in place of nextpnr's default 6 (the ULX3S's LFE5U-85F-6BG381C)
PLACERS = {"default": (),
           "timing40": ("--placer-heap-timingweight", "40", "--placer-heap-critexp", "4"),
           "static": ("--placer", "static"),
           "tmg-ripup": ("--tmg-ripup",),
           "timing40-ripup": ("--placer-heap-timingweight", "40", "--placer-heap-critexp", "4", "--tmg-ripup"),
           "speed7": ("--speed", "7"),
           "speed8": ("--speed", "8")}


class Copies(wiring.Component):
    """``k`` independent decoders of ``cfg``, each with its own ports ``d0`` ... (no shared logic)."""

    def __init__(self, cfg: DecoderConfig, k: int):
        self.decoders = [Decoder(cfg) for _ in range(k)]
        super().__init__({f"d{i}": Out(dec.signature) for i, dec in enumerate(self.decoders)})

    def elaborate(self, platform):
        m = Module()
        for i, dec in enumerate(self.decoders):
            m.submodules[f"dec{i}"] = dec
            wiring.connect(m, wiring.flipped(getattr(self, f"d{i}")), dec)
        return m


def fmax_for_seed(work: Path, seed: int, placer: str = "default") -> dict:
    """Place and route the netlist in ``work`` again with ``seed`` and ``placer``'s settings (seed 1
    with the flow's own: the synthesis run's)."""
    if seed == SEED and placer == "default":
        return read_pnr(work)
    target = replace(TARGETS["ecp5"], pnr=TARGETS["ecp5"].pnr + PLACERS[placer])
    run = work / (f"seed{seed}" if placer == "default" else f"{placer}-seed{seed}")
    run.mkdir(exist_ok=True)
    shutil.copy(work / "netlist.json", run / "netlist.json")     # the YoWASP tools take relative paths
    place_and_route(run, target, target.freq_mhz, seed=seed)
    return read_pnr(run)


def main(argv: list[str] | None = None) -> None:
    p = ToolParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=positive(int), default=5)
    p.add_argument("--jobs", type=positive(int), default=2, help="nextpnr runs at once (at most one per usable CPU)")
    p.add_argument("--config", action="append", choices=list(named_configs()),
                   help=f"a named configuration (default: {', '.join(CONFIGS)})")
    p.add_argument("--lanes", action="append", type=int, default=[],
                   help="each configuration at this many lanes (sop4-g16 -> sop4-g16-xN), instead of its own")
    p.add_argument("--copies", type=positive(int), default=1, help="decoders side by side, each with its own ports")
    p.add_argument("--variant", action="append", choices=VARIANTS, help="default: both")
    p.add_argument("--placer", action="append", choices=list(PLACERS),
                   help="nextpnr settings, each beside the others on the same netlists (default: the flow's)")
    args = p.parse_args(argv)
    named = {name: named_configs()[name] for name in args.config or CONFIGS}
    if args.lanes:          # each configuration's operating point (sop4-g16-x64's is sop4-g16) at N lanes
        points = sorted({config_point(name)[0].name for name in named})
        try:
            named = {c.name: c for c in (sweep_config(n, point) for point in points for n in args.lanes)}
        except ValueError as e:                     # DecoderConfig says what to change
            p.error(f"--lanes: {e}")
    configs = list(named)
    variants = args.variant or list(VARIANTS)
    placers = args.placer or ["default"]
    toolenv.apply()
    t0 = time.monotonic()
    works, depths = {}, {}
    suffix = f"-k{args.copies}" if args.copies > 1 else ""      # the run's label: K decoders side by side
    for name in configs:
        for variant in variants:
            cfg = named[name]
            cfg = for_target(cfg, "ecp5") if variant == "lutram" else replace(cfg, lutram_depth=0)
            label = f"{name}-{variant}{suffix}"
            dut = Decoder(cfg) if args.copies == 1 else Copies(cfg, args.copies)
            run_design(dut, label, "ecp5", OUT, top="synth_" + module_name(cfg, variant=False))
            works[label], depths[label] = OUT / "runs" / label / "ecp5", cfg.lutram_depth
    jobs = [(label, placer, seed) for label in works for placer in placers for seed in range(1, args.seeds + 1)]
    with ThreadPoolExecutor(max_workers=tool_runs_at_once(args.jobs)) as pool:
        got = list(pool.map(lambda j: fmax_for_seed(works[j[0]], j[2], j[1]), jobs))
    fmax = {(label, placer): [] for label in works for placer in placers}
    for (label, placer, _), rec in zip(jobs, got):
        fmax[label, placer].append(rec["fmax_mhz"])
    summary = {}
    lines = ["| config | table RAM | placer | Fmax per seed (MHz) | min | median | max |",
             "|---|---|---|---|---:|---:|---:|"]
    for name in configs:
        med = {}
        for variant in variants:
            label = f"{name}-{variant}{suffix}"
            for placer in placers:
                f, m = fmax[label, placer], statistics.median(fmax[label, placer])
                key = label if placer == "default" else f"{label}-{placer}"
                summary[key] = {"lutram_depth": depths[label], "placer": list(PLACERS[placer]), "fmax_mhz": f,
                                "median": m}
                shown = f"{name} (x {args.copies})" if suffix else name
                lines.append(f"| {shown} | {variant} (lutram_depth {depths[label]}) | {placer} | "
                             f"{' / '.join(f'{x:.1f}' for x in f)} | {min(f):.1f} | {m:.1f} | {max(f):.1f} |")
            med[variant] = statistics.median(fmax[label, placers[0]])   # the ratio: with the first placer named
        if len(med) == 2:
            summary[name] = {"median_ratio": med["lutram"] / med["one-memory"]}
    ratios = [f"{n}: median Fmax lutram / one-memory = {summary[n]['median_ratio']:.3f}"
              for n in configs if n in summary]
    text = "\n".join(lines) + "\n\n" + "\n".join(ratios) + "\n"
    default_run = configs == list(CONFIGS) and variants == list(VARIANTS) and placers == ["default"] and not suffix
    stem = "fmax_seeds" if default_run \
        else "fmax_seeds-" + "-".join(configs + variants + placers) + suffix
    write_atomic(OUT / f"{stem}.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(OUT / f"{stem}.md", text.encode())
    print(text)
    print(f"wall time {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    run_command("python bench/fmax_seeds.py", main)
