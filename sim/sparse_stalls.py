"""The residual path's stall rate on real layers: `python -m sop.sim.sparse_stalls`.

    python -m sop.sim.sparse_stalls [--budget B ...] [--lanes N ...] [--residuals R ...]
                                    [--out build/bench/sparse_stalls.json]

Quantizes MiniLM with ``sop-budget`` at each budget (`sop quantize`, calibrated, the
quantizer's own knapsack: the densities it really chooses), and for every layer that
carries sparse entries counts the cycles the decoder's stage 0 spends on it with the
residual path's rule (hdl.sparse_merge.MergeModel, the cycle model the RTL is checked
against, tests/test_hdl_residual.py): the host offers a beat every cycle and the
layer's entries from the cycle after its swap beat, one a cycle; the output is always
ready. A stall is a cycle in which stage 0 presents a chunk it must present again (more
than R entries in it, or its entries not yet proven complete). ``stall rate`` = stalls /
chunks: the throughput lost. tests/test_sparse_stalls.py checks the count against the
decoder itself in amaranth.sim on a MiniLM layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sop.argtypes import ToolParser, number, output_checked, positive
from sop.golden.files import write_atomic
from sop.golden.points import operating_points
from sop.hdl.config import MAX_RESIDUALS, DecoderConfig
from sop.hdl.sparse_merge import MergeModel

DEFAULT_BUDGETS = (4.75, 5.0, 5.5, 6.0)


def issue_cycles(config: DecoderConfig, layers, gaps=(0,)) -> dict:
    """Cycles of stage 0 for ``layers``, each ``(n_values, sparse indices)``, streamed back to back
    at full speed (tables preloaded, every beat offered as soon as the host may, output always
    ready), the sparse entries offered with ``gaps``: entry ``k`` of the whole stream (counted over
    every layer) is offered ``gaps[k % len(gaps)]`` cycles after it is due (after entry ``k - 1`` is
    taken, or from the cycle after its layer's swap beat; all 0: as soon as the host may). Returns
    ``chunks`` (output beats), ``cycles`` (passes: chunks plus stalls), ``stalls``,
    ``stalls_per_layer`` and ``entry_cycles`` (the cycle each entry is taken, ``sparse.ready``,
    counted from the cycle the first beat is taken)."""
    N, C = config.lanes, config.beats_per_block
    model = MergeModel(config)
    chunks = [-(-n // N) for n, _ in layers]
    total_cycles, per_layer = 0, []
    queue, qi, k, wait = np.zeros(0, dtype=np.int64), 0, 0, gaps[0]
    active, hold = 0, 0
    cur = None                                   # (layer, chunk) presented
    li, beat = 0, 0                              # the next beat to take
    first_flag_written = False
    t, t0, took = 0, None, []                    # the cycle; the first beat's; each entry's
    while cur is not None or li < len(layers):
        offer = li < len(layers)
        we = ls = 0
        if offer and beat == 0 and not first_flag_written:      # its flag, before its swap beat
            we, ls, first_flag_written = 1, int(len(layers[li][1]) > 0), True
        present = cur is not None
        last_chunk = present and (cur[1] % C == C - 1 or cur[1] == chunks[cur[0]] - 1)
        take_reg = not present or last_chunk
        swap = offer and beat == 0
        taken = bool(take_reg and not hold and offer and not we)
        due = qi < len(queue)
        valid = due and wait == 0
        if due and wait:
            wait -= 1
        entry = (int(queue[qi]), 0, int(qi == len(queue) - 1)) if due else (0, 0, 0)
        cy = {"present": int(present), "present_next": int(offer and not we if take_reg and not hold else present),
              "taken": int(taken), "swap": int(swap), "page": active ^ int(swap), "write_page": 1 - active,
              "en": 1, "offset_we": we, "layer_sparse": ls, "valid": int(valid), "entry": entry}
        out = model.step(cy)
        if present:
            total_cycles += 1
            while len(per_layer) <= cur[0]:
                per_layer.append(0)
            per_layer[cur[0]] += 1
        if valid and out["ready"]:
            qi, k = qi + 1, k + 1
            wait = gaps[k % len(gaps)]
            took.append(t)
        if taken and t0 is None:
            t0 = t
        t += 1
        if present and not hold:
            cur = None if last_chunk else (cur[0], cur[1] + 1)
        if taken:
            if swap:
                active ^= 1
                queue, qi = np.asarray(layers[li][1], dtype=np.int64), 0
            cur = (li, beat * C)
            beat += 1
            if beat * C >= chunks[li]:
                li, beat, first_flag_written = li + 1, 0, False
        hold = out["hold_next"]
    if any(out["error"].values()):
        raise AssertionError(f"the stream set {out['error']}")
    stalls = [p - c for p, c in zip(per_layer, chunks)]
    return {"chunks": sum(chunks), "cycles": total_cycles, "stalls": sum(stalls), "stalls_per_layer": stalls,
            "entry_cycles": [x - t0 for x in took]}


def budget_streams(budget: float) -> dict:
    """``{layer: LayerStream}`` of MiniLM quantized with sop-budget at ``budget`` (``minilm_budget_artifact``)."""
    from sop.quantize.artifact import open_artifact
    from sop.sim.vectors import minilm_budget_artifact

    art = open_artifact(minilm_budget_artifact(budget))
    return {e.name: art.stream(e) for e in art.layers if e.kind == "sopl"}


def measure(budgets, lanes, residuals) -> dict:
    points = {p.layout: p for p in operating_points().values()}
    rows = []
    for budget in budgets:
        streams = budget_streams(budget)
        sparse = {name: s for name, s in streams.items() if len(s.sparse)}
        for n in lanes:
            for r in residuals:
                by_point: dict = {}
                for name, s in sparse.items():
                    by_point.setdefault(points[s.layout].name, []).append((name, s))
                for point, items in by_point.items():
                    p = points[items[0][1].layout]
                    cfg = DecoderConfig(f"{point}-x{n}-r{r}", n, p.layout, p.hif, residuals=r)
                    t0 = time.monotonic()
                    res = issue_cycles(cfg, [(s.rows * s.cols, s.sparse.index) for _, s in items])
                    dens = [len(s.sparse) / (s.rows * s.cols) for _, s in items]
                    per_beat = [np.bincount(np.asarray(s.sparse.index, dtype=np.int64) // n).max() for _, s in items]
                    rows.append({"budget": budget, "point": point, "lanes": n, "residuals": r,
                                 "layers": len(items), "entries": int(sum(len(s.sparse) for _, s in items)),
                                 "density_min": min(dens), "density_max": max(dens),
                                 "densities": sorted({round(d * 100, 2) for d in dens}),
                                 "max_entries_in_a_beat": int(max(per_beat)),
                                 "chunks": res["chunks"], "stalls": res["stalls"],
                                 "stall_rate": res["stalls"] / res["chunks"],
                                 "worst_layer": max(st / -(-(s.rows * s.cols) // n)
                                                    for st, (_, s) in zip(res["stalls_per_layer"], items)),
                                 "seconds": round(time.monotonic() - t0, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "all_layers": len(streams)}


def main(argv=None) -> int:
    p = ToolParser(prog="python -m sop.sim.sparse_stalls", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=positive(float), action="append", help="sop-budget's bits per weight")
    p.add_argument("--lanes", type=positive(int), action="append", help="the decoder's lanes")
    p.add_argument("--residuals", type=number(int, 1, inclusive=True, maximum=MAX_RESIDUALS), action="append",
                   help=f"residual adders (1 to {MAX_RESIDUALS})")
    p.add_argument("--out", type=Path, default=Path("build/bench/sparse_stalls.json"))
    args = p.parse_args(argv)
    lanes, residuals = args.lanes or [8], args.residuals or [1, 2]
    try:                        # every decoder the run builds, before minutes of quantizing
        _ = [DecoderConfig(f"x{n}-r{r}", n, pt.layout, pt.hif, residuals=r)
             for n in lanes for r in residuals for pt in operating_points().values()]
    except ValueError as err:
        p.error(str(err))
    output_checked(p, args.out, option="--out")
    try:
        doc = measure(args.budget or DEFAULT_BUDGETS, lanes, residuals)
    except ValueError as err:   # a budget below sop-budget's cheapest options
        p.exit(2, f"{p.prog}: error: {err}\n")
    write_atomic(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.sim.sparse_stalls", main)

