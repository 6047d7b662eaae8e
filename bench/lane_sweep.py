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

The floor (``floor_terms``, ``floor``) is per lane and derived from what a lane
must compute (docs/synthesis.md, "The floor"): every term is a lower bound under
a stated cost model, not a measurement of the RTL.

* RAM. ECP5: ``banks * 2 pages * ceil(2^k / 16) * ceil(W / 4)`` TRELLIS_DPR16X4
  (W = 11 stored bits for the E3M6 HIF: hdl/lut_word.py), one copy per read port. iCE40: one
  SB_RAM40_4K per lane (one read port per lane per cycle; the bits fit).
* LUT4, cost model: one LUT4 per result bit of a function of at most four
  inputs; one LUT4 per result bit of a two-operand add on a carry chain, a gate
  folded into it (a CCU2C counts as two, as everywhere in this flow); an
  ``n``:1 mux costs ``ceil(n / 2)`` LUT4 per bit on ECP5 (PFUMX / L6MUX21 are
  free) and ``n - 1`` on iCE40. Terms: the table row select (ECP5: the rows of
  LUT RAM); the significand product in LUTs, ``(b - 1)`` gated additions of
  ``a + 1`` bits (``a``, ``b`` the significand widths, ``b``'s top bit a
  constant one); the exponent sum; the BF16 exponent; the shift amount and
  flags; the alignment shifter; sticky; round to nearest even; saturation, zero
  and sign; on ECP5 the stall skid's ``(D + 1)``:1 output mux (``D`` = the
  enable's register levels, hdl.pipeline: at 200 MHz the stall cannot reach
  every lane in the cycle it is decided; at iCE40's 50 MHz it can, so the iCE40
  floor has no skid); the lane's code register when a block takes ``C > 1`` cycles.
* FF: the stage cuts the target's clock needs, each holding only the live bits:
  ECP5 (200 MHz: one carry chain per stage) cuts after the table read (W; the
  LUT RAM reads asynchronously), after the product's first adder level, after
  the product, after the alignment, after the rounding add, and the output
  word; iCE40 (50 MHz) one cut after the product and the output word (the
  RAM40 registers its own read). ECP5 also the skid's ``D`` entries of 16
  bits; both the lane's ``C * k`` code bits.

The build measured. ECP5 measures the decoder as `make synth` builds it (the
default ``pipeline="deep"``: the one design built for 200 MHz). iCE40 measures
the shallow pipeline (``DecoderConfig(pipeline="shallow")``, hdl/config.py: no
output skid, the stall combinational, a four-stage formatter), the build for a
50 MHz LUT4 FPGA that the iCE40 floor assumes; its runs are named
``<config>-shallow``. ``--ice40-pipeline deep`` measures the default build there.

The marginal floor is the slope of ``N * floor(N)`` over the same ``N`` as the
design's (the skid depth and ``C`` change with ``N``), so the ratio compares
like with like.

Run: .venv/bin/python bench/lane_sweep.py [--lanes 1 2 4 ...] [--jobs N] [--ice40-pipeline deep|shallow]
(about 10 minutes cold)
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np

from sop.argtypes import ToolParser, output_checked, positive
from sop import toolenv
from sop.golden.files import write_atomic
from sop.golden.layout import named_layouts
from sop.hdl import lut_word
from sop.hdl.config import PIPELINES, DecoderConfig, named_configs
from sop.hdl.hif_formatter import MAX_SHIFT
from sop.hdl.replica import enable_levels
from sop.hdl.scale_decoder import BF16_M
from sop.synth.flow.yosys_nextpnr import DEFAULT_OUT, TARGETS, rtl_state, run_many
from sop.terminal import run_command

LANES = (1, 2, 4, 8, 16, 32, 64)
SWEEP_TARGETS = ("ice40", "ecp5")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


PIPELINE = {"ice40": "shallow", "ecp5": "deep"}      # the build measured per target (module docstring)


def sweep_config(lanes: int, layout: str = "sop4-g16", pipeline: str = "deep") -> DecoderConfig:
    """The sweep's configuration of ``lanes`` lanes; a named one where it exists (shared cache), with
    ``pipeline`` (hdl.config.DecoderConfig): a shallow build is named ``<name>-shallow``."""
    cfg = next((c for c in named_configs().values()
                if c.layout == named_layouts()[layout] and c.lanes == lanes and c.output == "bf16"),
               None) or DecoderConfig(f"{layout}-x{lanes}", lanes, named_layouts()[layout])
    return cfg if pipeline == "deep" else replace(cfg, name=f"{cfg.name}-{pipeline}", pipeline=pipeline)


def floor_terms(cfg: DecoderConfig, target: str) -> list[tuple[str, int, int]]:
    """Per-lane floor of a BF16 lane on ``target`` as ``(term, LUT4, FF)`` rows (module docstring):
    each row costs LUT4 or FF, not both."""
    lay, hif, scale = cfg.layout, cfg.hif, cfg.scale
    W = lut_word.word(cfg).size                        # the stored table word
    a, b, P, ew = hif.mbits + 1, scale.mbits + 1, cfg.sig_bits, cfg.exp_shape.width
    k, C, D = lay.code_bits, cfg.beats_per_block, enable_levels(cfg.lanes)
    ecp5 = target == "ecp5"
    rows = lay.banks * 2 * ceil_div(1 << k, 16)        # LUT RAM rows of a lane's table (ECP5)

    def mux(n: int) -> int:
        return ceil_div(n, 2) if ecp5 else n - 1

    window = BF16_M + 3                                # R0, guard, and the product's top bit
    luts = [
        ("table row select: a rows:1 mux per stored bit", W * mux(rows) if ecp5 else 0),
        ("significand product: b - 1 gated additions of a + 1 bits", (b - 1) * (a + 1)),
        ("exponent sum e0", ew),
        ("shift amount (4 bits) and the normal / saturate / zero flags", 4 + 3),
        ("alignment shifter: the window over log2(11) 2:1 levels", window * MAX_SHIFT.bit_length()),
        ("sticky", ceil_div(P - 1, 4)),
        ("BF16 exponent", 8),
        ("round to nearest even: the 15-bit increment and its decision", 15 + 1),
        ("saturation, zero and sign of the 16-bit word", 16),
        (f"stall skid: the {D + 1}:1 output mux", 16 * mux(D + 1) if ecp5 else 0),
        (f"code register: {C} codes issued one per cycle", min(C * k, k * mux(C)) if C > 1 else 0),
    ]
    ffs = [("code register", C * k), ("output word", 16), ("cut after the product: p, e0, sign, zero", P + ew + 2)]
    if ecp5:                                           # 200 MHz: one carry chain per stage
        ffs += [("skid entries", 16 * D),("cut after the table read (LUT RAM reads asynchronously)", W),
                ("cut inside the product: two partial sums, e0, sign, zero", 2 * (a + 2) + ew + 2),
                ("cut after the alignment: exponent, R0, guard, sticky, flags", 8 + BF16_M + 1 + 2 + 3),
                ("cut after the rounding add: word, flags", 15 + 3)]
    terms = [(name, n, 0) for name, n in luts] + [(name, 0, n) for name, n in ffs]
    return terms


def floor(cfg: DecoderConfig) -> dict[str, dict[str, int]]:
    """Per-lane floor {target: {luts, ffs, ram, dsps}} of ``cfg`` (the sum of ``floor_terms``)."""
    lay, w = cfg.layout, lut_word.word(cfg).size
    out = {}
    for t in SWEEP_TARGETS:
        terms = floor_terms(cfg, t)
        out[t] = {"luts": sum(r[1] for r in terms), "ffs": sum(r[2] for r in terms), "dsps": 0,
                  "ram": (lay.banks * 2 * ceil_div(1 << lay.code_bits, 16) * ceil_div(w, 4)) if t == "ecp5"
                  else max(1, ceil_div(lay.banks * 2 * (1 << lay.code_bits) * w, 4096))}
    return out


RAM_KEY = {"ecp5": "lutram", "ice40": "brams"}


def slope(lanes: np.ndarray, values: np.ndarray) -> float | None:
    """Least-squares cost of one more lane over N >= 4 (None with fewer than two such N: no slope, and
    ``null`` in lane_sweep.json, not a NaN that strict JSON readers refuse)."""
    keep = lanes >= 4
    if len(set(lanes[keep].tolist())) < 2:
        return None
    return float(np.polyfit(lanes[keep], values[keep], 1)[0])


def _rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def summarize(results: dict[str, dict[str, dict]], lanes: list[int], pipelines: dict[str, str] = PIPELINE) -> dict:
    out = {}
    n = np.array(lanes, dtype=float)
    for t in SWEEP_TARGETS:
        cfgs = [sweep_config(k, pipeline=pipelines[t]) for k in lanes]
        floors = [floor(c) for c in cfgs]
        recs = [results[c.name][t] for c in cfgs]
        design = {"luts": [r["luts"] for r in recs], "ffs": [r["ffs"] for r in recs],
                  "ram": [r[RAM_KEY[t]] for r in recs]}
        per = {k: slope(n, np.array(v, dtype=float)) for k, v in design.items()}
        # the floor's own marginal cost over the same N (its skid depth and code register change with N)
        fl = {k: slope(n, n * np.array([f[t][k] for f in floors], dtype=float)) for k in per}
        out[t] = {
            "device": TARGETS[t].device, "constraint_mhz": TARGETS[t].freq_mhz, "pipeline": pipelines[t],
            "floor_slope_per_lane": {k: _rounded(v, 1) for k, v in fl.items()},
            "floor_terms": [list(r) for r in floor_terms(cfgs[-1], t)], "floor_terms_lanes": lanes[-1],
            "slope_per_lane": {k: _rounded(v, 1) for k, v in per.items()},
            "slope_over_floor": {k: None if per[k] is None else _rounded(per[k] / fl[k], 2) for k in per},
            "rows": [{"lanes": int(k), "luts": r["luts"], "ffs": r["ffs"], "ram": r[RAM_KEY[t]],
                      "dsps": r["dsps"], "luts_per_lane": round(r["luts"] / k, 1),
                      "ffs_per_lane": round(r["ffs"] / k, 1), "floor_luts_per_lane": f[t]["luts"],
                      "floor_ffs_per_lane": f[t]["ffs"], "fmax_mhz": r["fmax_mhz"],
                      "critical_path": r.get("critical_path"), "note": r.get("note", ""),
                      "wall_s": r["wall_s"]} for k, r, f in zip(lanes, recs, floors)],
        }
    return out


def markdown(summary: dict) -> str:
    lines = []
    for t, s in summary.items():
        f = {k: "-" if v is None else v for k, v in s["floor_slope_per_lane"].items()}
        ram = "DPR16X4" if t == "ecp5" else "RAM40"
        lines += [f"**{s['device']}** (constraint {s['constraint_mhz']:g} MHz; the {s['pipeline']} pipeline, "
                  f"DecoderConfig(pipeline=\"{s['pipeline']}\"); marginal floor per lane: "
                  f"{f['luts']} LUT4, {f['ffs']} FF, {f['ram']} {ram}, no DSP)", "",
                  f"| lanes | LUT4 | LUT4/lane | floor | FF | FF/lane | floor | {ram} | DSP | Fmax (MHz) | note |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in s["rows"]:
            fmax = "-" if r["fmax_mhz"] is None else f"{r['fmax_mhz']:.1f}"
            lines.append(f"| {r['lanes']} | {r['luts']} | {r['luts_per_lane']} | {r['floor_luts_per_lane']} | "
                         f"{r['ffs']} | {r['ffs_per_lane']} | {r['floor_ffs_per_lane']} | {r['ram']} | "
                         f"{r['dsps']} | {fmax} | {r['note']} |")
        sl, ratio = ({k: "-" if v is None else v for k, v in s[key].items()}
                     for key in ("slope_per_lane", "slope_over_floor"))
        lines += ["", f"Marginal cost of a lane (slope over N >= 4): {sl['luts']} LUT4 "
                  f"({ratio['luts']}x floor), {sl['ffs']} FF ({ratio['ffs']}x), {sl['ram']} {ram} "
                  f"({ratio['ram']}x).", "", f"Floor terms per lane at {s['floor_terms_lanes']} lanes:", "",
                  "| term | LUT4 | FF |", "|---|---:|---:|"]
        lines += [f"| {name} | {lut or ''} | {ff or ''} |" for name, lut, ff in s["floor_terms"] if lut or ff]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = ToolParser(description=__doc__.splitlines()[0])
    p.add_argument("--lanes", type=int, nargs="+", default=list(LANES))
    p.add_argument("--jobs", type=positive(int), default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--ice40-pipeline", choices=PIPELINES, default=PIPELINE["ice40"],
                   help="the build measured on iCE40 (default: the shallow pipeline)")
    args = p.parse_args(argv)
    try:                                            # every lane count a decoder takes, before any run
        [sweep_config(n) for n in args.lanes]
    except ValueError as err:
        p.error(f"--lanes: {err}")
    output_checked(p, args.out, folder=True, option="--out")
    pipelines = {**PIPELINE, "ice40": args.ice40_pipeline}
    toolenv.apply()
    rtl = rtl_state()
    t0 = time.monotonic()
    pairs = [(sweep_config(n, pipeline=pipelines[t]), t) for n in args.lanes for t in SWEEP_TARGETS]
    pairs.sort(key=lambda p: -p[0].lanes * (3 if p[1] == "ecp5" else 1))
    results = run_many(pairs, args.out, jobs=args.jobs, force=args.force)
    summary = summarize(results, sorted(args.lanes), pipelines)
    text = markdown(summary) + f"RTL: {rtl}.\n"
    out = args.out                                  # relative: under the working directory
    write_atomic(f"{out}/lane_sweep.json", (json.dumps({**summary, "_rtl": rtl}, indent=1) + "\n").encode())
    write_atomic(f"{out}/lane_sweep.md", text.encode())
    print()
    print(text)
    print(f"wall time {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    run_command("python bench/lane_sweep.py", main)
