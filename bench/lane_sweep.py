#!/usr/bin/env python3
"""Lane sweep: area per lane and Fmax of the sop4-g16 decoder at 1 to 64 lanes, against a stated floor.

For N = 1, 2, 4, 8, 16, 32, 64 lanes it runs synth/flow/yosys_nextpnr.py (yosys, and
nextpnr where the design fits the device) on iCE40UP5K and ECP5-85F. Runs
that `make synth` already made (1, 8, 64 lanes: the named configurations)
come from its cache. It prints and writes (``build/synth/lane_sweep.json``,
``lane_sweep.md``) per target: LUT4, FF, RAM and DSP counts, LUT4 per lane,
the marginal cost of a lane (least-squares slope of LUT4 over N >= 4, which
leaves out the per-decoder control and the beat register), Fmax, and the
ratio of the slope to the floor.

The floor (``floor``) is per lane and is an estimate, not a proof:

* RAM. ECP5: ``banks * 2 pages * ceil(2^k / 16) * ceil(W / 4)``
  TRELLIS_DPR16X4 (W = 10 HIF bits; 12 for sop4), one copy per read port,
  which is what a lane needs each cycle. iCE40: one SB_RAM40_4K per lane: a
  lane must read one table entry per cycle and a RAM40 (256 x 16) has one read
  port; its capacity (4096 bits) is far above what a lane needs
  (``banks * 2 * 2^k * W`` = 640 bits), so the ports, not the bits, bound it.
  The floor assumes only the selected bank is read (both banks in one RAM,
  the selection bit an address bit), as the RTL does.
* LUT4 (the BF16 lane datapath, one LUT4 per bit for each function of more
  than four inputs): codebook mux ``W``; exponent sum ``Ew``; leading-one
  detect ``ceil(P / 2)``; BF16 exponent ``Ew``; alignment shifter
  ``(7 + 3) * 4`` (8 result bits, guard and one spare, four 2:1 levels);
  sticky ``ceil((P - 1) / 4)``; rounding incrementer 15; output saturation
  and sign 16. The significand multiplier is one DSP (MULT18X18D, SB_MAC16).
  The RTL builds it from LUTs instead (two pipelined adder levels, for Fmax),
  so its LUT4 count is held to a floor that leaves the multiplier out.
  ``P`` is the product significand width (11), ``Ew`` the exponent width (9).
* FF: the pipeline registers the latency needs: read data ``banks * W`` on
  ECP5 (the distributed RAM reads asynchronously; iCE40's RAM40 has its own
  output register), the product fields ``P + Ew + 1``, the rounding inputs
  ``9 + 2 + Ew + 2`` and the output word 16.

Run: .venv/bin/python bench/lane_sweep.py [--lanes 1 2 4 ...] [--jobs N]   (about 10 minutes cold)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from sop import toolenv
from sop.golden.files import write_atomic
from sop.golden.layout import named_layouts
from sop.hdl.config import DecoderConfig, named_configs
from sop.synth.flow.yosys_nextpnr import DEFAULT_OUT, TARGETS, rtl_state, run_many

LANES = (1, 2, 4, 8, 16, 32, 64)
SWEEP_TARGETS = ("ice40", "ecp5")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def sweep_config(lanes: int, layout: str = "sop4-g16") -> DecoderConfig:
    """The sweep's configuration of ``lanes`` lanes; a named one where it exists (shared cache)."""
    for cfg in named_configs().values():
        if cfg.layout == named_layouts()[layout] and cfg.lanes == lanes and cfg.output == "bf16":
            return cfg
    return DecoderConfig(f"{layout}-x{lanes}", lanes, named_layouts()[layout])


def floor(cfg: DecoderConfig) -> dict[str, dict[str, int]]:
    """Per-lane floor estimate {target: {luts, ffs, ram, dsps}} (see the module docstring)."""
    lay, w, p = cfg.layout, cfg.hif.bits, cfg.sig_bits
    ew = cfg.exp_shape.width
    mux = w if lay.banks == 2 else 0
    luts = mux + ew + ceil_div(p, 2) + ew + (7 + 3) * 4 + ceil_div(p - 1, 4) + 15 + 16
    ffs_core = (p + ew + 1) + (9 + 2 + ew + 2) + 16
    return {
        "ecp5": {"luts": luts, "ffs": ffs_core + lay.banks * w, "dsps": 1,
                 "ram": lay.banks * 2 * ceil_div(1 << lay.code_bits, 16) * ceil_div(w, 4)},
        "ice40": {"luts": luts, "ffs": ffs_core, "dsps": 1,
                  "ram": max(1, ceil_div(lay.banks * 2 * (1 << lay.code_bits) * w, 4096))},
    }


RAM_KEY = {"ecp5": "lutram", "ice40": "brams"}


def slope(lanes: np.ndarray, values: np.ndarray) -> float:
    """Least-squares cost of one more lane over N >= 4 (nan with fewer than two points)."""
    keep = lanes >= 4
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(lanes[keep], values[keep], 1)[0])


def summarize(results: dict[str, dict[str, dict]], lanes: list[int]) -> dict:
    out = {}
    cfgs = [sweep_config(n) for n in lanes]
    fl = floor(cfgs[0])
    for t in SWEEP_TARGETS:
        recs = [results[c.name][t] for c in cfgs]
        n = np.array(lanes, dtype=float)
        luts = np.array([r["luts"] for r in recs], dtype=float)
        ffs = np.array([r["ffs"] for r in recs], dtype=float)
        ram = np.array([r[RAM_KEY[t]] for r in recs], dtype=float)
        per = {"luts": slope(n, luts), "ffs": slope(n, ffs), "ram": slope(n, ram)}
        out[t] = {
            "device": TARGETS[t].device, "constraint_mhz": TARGETS[t].freq_mhz, "floor_per_lane": fl[t],
            "slope_per_lane": {k: round(v, 1) for k, v in per.items()},
            "slope_over_floor": {k: round(per[k] / fl[t][k], 2) for k in per},
            "rows": [{"lanes": int(k), "luts": r["luts"], "ffs": r["ffs"], "ram": r[RAM_KEY[t]],
                      "dsps": r["dsps"], "luts_per_lane": round(r["luts"] / k, 1),
                      "ffs_per_lane": round(r["ffs"] / k, 1), "fmax_mhz": r["fmax_mhz"],
                      "critical_path": r.get("critical_path"), "note": r.get("note", ""),
                      "wall_s": r["wall_s"]} for k, r in zip(lanes, recs)],
        }
    return out


def markdown(summary: dict) -> str:
    lines = []
    for t, s in summary.items():
        f = s["floor_per_lane"]
        ram = "DPR16X4" if t == "ecp5" else "RAM40"
        lines += [f"**{s['device']}** (constraint {s['constraint_mhz']:g} MHz; floor per lane: "
                  f"{f['luts']} LUT4, {f['ffs']} FF, {f['ram']} {ram}, {f['dsps']} DSP)", "",
                  f"| lanes | LUT4 | LUT4/lane | FF | FF/lane | {ram} | DSP | Fmax (MHz) | note |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in s["rows"]:
            fmax = "-" if r["fmax_mhz"] is None else f"{r['fmax_mhz']:.1f}"
            lines.append(f"| {r['lanes']} | {r['luts']} | {r['luts_per_lane']} | {r['ffs']} | "
                         f"{r['ffs_per_lane']} | {r['ram']} | {r['dsps']} | {fmax} | {r['note']} |")
        sl, ratio = s["slope_per_lane"], s["slope_over_floor"]
        lines += ["", f"Marginal cost of a lane (slope over N >= 4): {sl['luts']} LUT4 "
                  f"({ratio['luts']}x floor), {sl['ffs']} FF ({ratio['ffs']}x), {sl['ram']} {ram} "
                  f"({ratio['ram']}x).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lanes", type=int, nargs="+", default=list(LANES))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args()
    toolenv.apply()
    rtl = rtl_state()
    t0 = time.monotonic()
    pairs = [(sweep_config(n), t) for n in args.lanes for t in SWEEP_TARGETS]
    pairs.sort(key=lambda p: -p[0].lanes * (3 if p[1] == "ecp5" else 1))
    results = run_many(pairs, args.out, jobs=args.jobs, force=args.force)
    summary = summarize(results, sorted(args.lanes))
    text = markdown(summary) + f"RTL: {rtl}.\n"
    out = args.out                                  # relative: under the working directory
    write_atomic(f"{out}/lane_sweep.json", (json.dumps({**summary, "_rtl": rtl}, indent=1) + "\n").encode())
    write_atomic(f"{out}/lane_sweep.md", text.encode())
    print()
    print(text)
    print(f"wall time {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
