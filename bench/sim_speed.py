#!/usr/bin/env python3
"""Decoded weights verified per minute by the cocotb regression, Verilator against Icarus.

Runs the full regression plan (real MiniLM vectors, random streams, corners,
reset) of one configuration in both simulators in the same process and prints
values checked per minute for each (simulation time only, build excluded) and
the Verilator/Icarus ratio. Target (issue): at least 5 M per minute with Verilator.

Run: .venv/bin/python bench/sim_speed.py [--config sop4-g16-x64]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sop.argtypes import ToolParser
from sop.hdl.config import named_configs
from sop.sim import runner
from sop.terminal import run_command


def main() -> None:
    p = ToolParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=list(named_configs()))
    args = p.parse_args()
    configs = named_configs()
    print("| config | simulator | values checked | sim seconds | values / minute |")
    print("|---|---|---:|---:|---:|")
    for name in args.config or ["sop4-g16", "sop4-g16-x64"]:
        rate = {}
        for sim in ("verilator", "icarus"):
            with tempfile.TemporaryDirectory() as d:
                s = runner.run(configs[name], sim, build_dir=Path(d))
            assert s["mismatches"] == 0, runner.summary_line(s)
            rate[sim] = s["checked"] / s["seconds"] * 60
            print(f"| {name} | {sim} | {s['checked']:,} | {s['seconds']:.1f} | {rate[sim] / 1e6:.2f} M |",
                  flush=True)
        print(f"| {name} | verilator / icarus | | | {rate['verilator'] / rate['icarus']:.2f}x |")


if __name__ == "__main__":
    run_command("python bench/sim_speed.py", main)
