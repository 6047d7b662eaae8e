"""`make sim` for the GEMV engine: its cocotb regression (sim/tb_gemv.py) in Icarus or Verilator.

    python -m sop.sim.gemv_runner [--config NAME ...] [--sim icarus|verilator] [--quick] [--seed N]

For each named engine (hdl.gemv_config.gemv_configs: ``gemv-sop4-g16``,
``gemv-e2m3-ue4m4-g16``, ``gemv-sop4-g16-bf16``) it converts ``GemvEngine`` to Verilog under
``build/sim/<sim>/<config>/rtl/`` (as named: up to 16384 columns and 65535 rows;
one Verilator waiver, ``SIM_WAIVERS``), writes the plan (``plan.json``: the layers'
beats and every expected ``y`` word) and runs sim/tb_gemv.py on it with
cocotb's runner (sim/runner.py's build and test step, ``simulate``). Beside
them, ``--config gemv-sop4-g16-small`` (``small_engines``, not in the default
list: `make sim` runs it on its own line): sop4-g16 folded for the smallest
FPGAs (hdl.gemv_config.small_engines, the registry of those: one MAC a cycle, the
compact FP32 adder, tiles of 4) at MiniLM's size, with its residual path (the plan has
sparse layers): the iCEBreaker GEMV core's engine, ``gemv-sop4-g16-icebreaker``, is the
same built without that path.

Contract: every expected word is ``golden.dot.gemv`` of the layer and the
vector, computed here; the bench only drives beats and compares words. The
plan (``plan_for``, on layers that sim/gemv_layers.py builds; its random layers,
and the bench's idles and stalls, drawn from ``--seed``, else from a new seed
each run, printed: ``--seed`` reruns it):

* ``minilm``: MiniLM's layer-0 query quantized to the configuration's operating
  point, with real activations (that layer's inputs in the BERT forward pass of a
  sentence, quantize/e2e.py, rounded to the engine's activation format, E4M3 or BF16;
  cached under build/vectors/). Quick:
  its first 40 rows (two tiles and a partial one) for one token, then the same rows
  with 2 % sparse residuals (quantize/sparse.py); full: all 384 rows for two
  tokens, then 40 rows with residuals for two tokens.
* ``corners`` (layers back to back, a table swap before each): the largest
  magnitudes (every table entry the largest HIF value, the largest scale, x the
  largest finite activation, +-448 or +-3.39e38, at offsets 0 and 127: saturation)
  and the smallest (offset -128, subnormal x);
  cancellation to exactly zero inside a block and across blocks (tables holding
  ``v`` and ``-v``, +-0 entries; with a signed scale, blocks that differ only by the
  sign bit); zero blocks and a zero vector; subnormal, +-0 and +-448 activations; a
  random layer over every code, both banks and signs; a single row; random layers
  with sparse residuals (terms that saturate or go subnormal) and a partial last tile.
  With BF16 activations (``finite_codes``: random ones within 2^-8 .. 2^9, so that the
  block dot unit stays on its fast path where a layer is not about its slow one) three
  layers more: subnormal activations at offset -16 (subnormal sums), a block column
  spanning 200 binades (the block dot unit's exact slow path between fast blocks), and
  residual terms alone (all-zero tables) whose values cover ``ResidualTermBF16``'s
  rounding: subnormal terms rounded at every shift, ties to even both ways, flushed ones,
  the normal range's ends, saturation (``term_rounding_layer``, drawn from a generator of
  its own: the other layers' draws are unchanged). With E4M3 activations one layer more:
  residual terms alone (all-zero tables) of subnormal and near-subnormal values, plain and
  huge ones, and rows ``t + u - t`` that cancel far below ``t`` from every exponent below 28
  (the row accumulator's normalization barrier; ``terms_alone_layer``, a generator of its own
  too). With either activation, then, eight small layers swapped in back to back, ``swap-RxC``
  (``swap_layers``, a generator of their own): vectors of one or two ``x`` beats after a layer of
  other dimensions, so that their first blocks come in the two cycles after the swap beat (the
  sequencer's ``settled`` guard). With E4M3, after them and from a generator of their own,
  terms ``(t + u) - t`` that cancel to the row adder's leading-zero counts up to 24
  (``deep_cancel_layer``), block values at offset 127 short of saturation
  (``top_offset_layer``), and a layer that reuses its page's tables two layers on, with no
  table writes (``reused_table_layers``); last, from a generator of their own again, odd
  products at every alignment shift in every lane, exact block values (``lane_align_layer``),
  a subnormal block value at every block exponent where one can be, one layer per offset
  (``subnormal_block_layers``), and ``t + u - t`` of powers of two, a single one bit at every
  position of the row adder's word (``deep_cancel_layer`` with ``SINGLE_BIT_ROWS``). Last, with
  either activation and from a generator of its own, random layers of one block a row and 257
  rows, twice (one in each page of layer registers: a row count with bit 8 set), then 240 rows
  (a partial last tile at row 238) (``tall_layers``); with E4M3, after them (a generator of its
  own), one row whose vector puts in every lane each code one bit short of NaN, with both signs
  (``near_nan_layer``: a NaN detect with a compare bit stuck at 1 sets ``x_nan``); with BF16, after
  them (a generator of its own), residual terms alone ``(t - u) - t``, ``u`` the last place of the
  binade below ``t``: the row adder cancels to its word's bit 2, above and beside its barrier at
  every bit (``ulp_cancel_layer``). With a folded block dot unit (the small-FPGA engine), last
  and from a generator of its own, two ``paced`` layers (``paced_layer``, ``paced_gaps``): ``y``
  held and the blocks spaced so that the front end's skid is left holding a block's last chunk
  (whose tag the tags FIFO takes), then the chunk before it (whose sign and scale the unit takes).
* ``errors``: a vector one beat too long, one too short, then one vector for each
  lane of a beat with an E4M3 NaN there (+NaN and -NaN in turn: each lane's
  detector alone; BF16: +NaN, -NaN, +Inf, -Inf in turn) (``x_length``, ``x_nan`` must be set while it is loaded, clear
  after ``clear``; their ``y`` words are counted, not compared), then a good
  vector (compared) and a clear status; the good vector again, its block offered
  from the cycle after its pass's last block on with no vector after it: never
  taken, ``w_before_x`` (the x page must be free once the pass is done); a layer
  word with no rows (``layer``); the layer with one sparse entry beyond its
  columns, then one beyond its rows; last, a layer of two tiles whose one bad
  entry, among the second tile's, lies in the first tile's rows (``sparse``, once
  the engine takes the entry; their ``y`` words counted).
* ``timing`` (``timing_job``; with the engine's latency, from the manifest
  ``build_verilog`` writes beside the Verilog): hdl/gemv.py's throughput and
  latency with no idle input and no stall: a one-tile layer that leaves the ring
  at slot 0, then two full tiles of MiniLM's rows for two vectors (with BF16
  activations then two layers more, every block on the fast path: blocks at the
  window's edge in every lane, ``window-edge-fast``, and blocks of one product
  whose zero lanes lie far below the window, ``zero-products-fast``), whose blocks
  must be taken back to back (one every ``g / P`` cycles) and whose last ``y`` word
  must come ``latency`` cycles after the last block (folded: up to the ring's wait
  for its slot more). A cycles-only bug (a block sent down a slow path, a ring
  that waits) fails here, not in a word.

The bench drives random idle cycles on ``x``, ``w``, ``sparse``, ``load`` and
``layer`` and random stalls on ``y`` (``p_idle``, ``p_stall``) but in the
``timing`` job. One summary line per configuration: words checked, mismatches,
status and timing errors. Exit status 1 on any mismatch, status or timing error,
failed test or expected word not checked; 2 on a bad argument or a missing
simulator.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from sop import toolenv
from sop.argtypes import ToolParser
from sop.golden.layout import LayerStream
from sop.hdl import gemv, gemv_config
from sop.hdl.gemv_config import GemvConfig
from sop.quantize.weights import QUERY_LAYER
from sop.sim.gemv_layers import (BF16, E4M3, EXTREMES, SINGLE_BIT_ROWS, adder_sticky_layer, corner_layers,
                                 deep_cancel_layer, finite_codes, lane_align_layer, minilm_activations, minilm_layers,
                                 near_nan_layer, paced_layer, random_layer, reused_table_layers,
                                 subnormal_barrier_layer, subnormal_block_layers, swap_layers, tall_layers,
                                 term_rounding_layer, terms_alone_layer, top_offset_layer, ulp_cancel_layer,
                                 window_edge_fast_layer, window_edge_layer, window_pow2_layer, with_residuals,
                                 zero_products_fast_layer)
from sop.sim.runner import (BuildFolderBusy, SimulatorMissing, add_run_options, check_simulator, failed_note,
                            held_build_folder, interruptible, simulate)

SIZES = {"quick": {"rows": 40, "tokens": [1], "sparse_tokens": [3]},
         "full": {"rows": None, "tokens": [2, 7], "sparse_tokens": [3, 5]}}


def point_of(cfg: GemvConfig) -> str:
    """The operating point whose layout and HIF the engine takes."""
    from sop.golden.points import operating_points

    return next(name for name, p in operating_points().items() if (p.layout, p.hif) == (cfg.layout, cfg.hif))


# -- the plan --------------------------------------------------------------------------------------------------

def layer_entry(cfg: GemvConfig, name: str, layer: LayerStream, vectors, write_tables: bool = True) -> dict:
    """A layer as the bench drives it: table writes, layer registers, ``w`` and ``sparse`` beats, and
    per vector its ``x`` beats and the expected ``y`` words (golden.dot.gemv). ``write_tables=False``:
    no table writes (``loads`` empty): the layer reads what its page already holds."""
    lay = layer.layout
    vectors = [np.asarray(v, np.int64) for v in vectors]
    x = cfg.act_format.decode(np.stack(vectors)).astype(np.float32)
    y = gemv.model(cfg, layer, x).view(np.uint32)
    return {"name": name, "rows": layer.rows,
            "loads": [[b, a, int(layer.luts[b][a])] for b in range(lay.banks) for a in range(1 << lay.code_bits)]
            if write_tables else [],
            "layer": [layer.rows, layer.cols // lay.group, layer.offset, int(len(layer.sparse) > 0)],
            "w": gemv_config.w_beats(cfg, layer),
            "sparse": [[e["row"], e["col"], e["value"], e["last"]] for e in gemv_config.sparse_beats(cfg, layer)]
            if len(layer.sparse) else [],
            "entries": int(len(layer.sparse)),
            "vectors": [{"x": gemv_config.x_beats(cfg, v), "expect": [int(w) for w in yv]} for v, yv in zip(vectors, y)]}


#: The errors job's block offered after a pass: from the cycle after the pass's last block until status
#: has shown no vector loaded for this many cycles (then ``w_before_x`` is on status)
AFTER_PASS = 3


def error_job(cfg: GemvConfig, point: str, rng, seed: int) -> dict:
    """A 3-row, 2-block layer; a block offered before any vector; vectors too long, too short, with a
    NaN in each lane of a beat (one vector a lane, +NaN and -NaN in turn: every lane's detector must
    fire on its own; their ``y`` counted, not compared), then a good one with 448 (compared), twice:
    the second time a block offered right after the pass's last one, with no vector loaded after it
    (``AFTER_PASS``: never taken, ``w_before_x``); a layer word with no rows; the layer with a sparse
    entry beyond its columns, and with one beyond its rows; last (from a generator of its own,
    ``[seed, 28]``), a layer of two tiles, one block a row, whose one bad entry, among the second
    tile's, has the first tile's last row (a case with its own ``rows`` and ``w``)."""
    act = cfg.act_format
    ext, bits = EXTREMES[act.name], act.bits
    layer = random_layer(point, 3, 2 * cfg.group, rng, offset=0)
    good = finite_codes(act, rng, 2 * cfg.group, signed=False)
    good[5] = ext["largest"]
    entry = layer_entry(cfg, "errors", layer, [good])
    beats = entry["vectors"][0]["x"]
    # (BF16: NaN and Inf in turn, +NaN, -NaN, +Inf, -Inf: every code with an exponent of all ones)
    bad = [(ext["nan"] if act is E4M3 or k % 4 < 2 else 0x7F80) | (k & 1) * ext["sign"] for k in range(cfg.group)]
    mask = (1 << bits) - 1
    nans = [beats[1] & ~(mask << bits * k) | bad[k] << bits * k for k in range(cfg.group)]
    cases = [("x_length", beats + [beats[0]]), ("x_length", beats[:1])] + [("x_nan", [beats[0], n]) for n in nans]
    # the good vector twice: the second time its first block offered from right after its last on, with
    # no vector after it (``AFTER_PASS``; its y compared; w_before_x once the pass has freed its page)
    entry["cases"] = [{"error": "w_before_x", "offer": 5}] + [{"error": e, "x": x} for e, x in cases] + \
        [{"error": None, **entry["vectors"][0]}, {"error": "w_before_x", "after_pass": AFTER_PASS,
                                                   **entry["vectors"][0]}]
    # the layer registers: a layer word with no rows (nothing else is sent)
    entry["cases"].append({"error": "layer", "layer": [0, *entry["layer"][1:]]})
    # the sparse side: the same layer with entries, one moved beyond the layer's columns: its tables
    # and layer word into the inactive page, its x swaps them in, then the blocks and the entries
    # (its y counted)
    sparse = layer_entry(cfg, "errors+sparse", with_residuals(layer, rng, 4), [good])
    beyond_rows = [list(e) for e in sparse["sparse"]]
    bad = sparse["sparse"][1]
    bad[1] = layer.cols + cfg.group * int(rng.integers(0, 4))
    entry["cases"].append({"error": "sparse", "loads": sparse["loads"], "layer": sparse["layer"], "x": beats,
                           "sparse": sparse["sparse"]})
    # and again with an entry beyond the layer's rows instead, so beyond its tile's last row: the
    # sequencer's compare of an entry's row with that row is reached alone (with the column one's, the
    # sticky bit is set either way; the small-FPGA engine's survivors 3 and 8 lived on that)
    beyond_rows[1][0] = layer.rows + int(rng.integers(0, 4))
    entry["cases"].append({"error": "sparse", "loads": sparse["loads"], "layer": sparse["layer"], "x": beats,
                           "sparse": beyond_rows})
    # last, a layer of two tiles (a tile and one row, one block a row: its own blocks and row count),
    # whose one bad entry is the second tile's first, moved to the first tile's last row: below its
    # tile's first row, where neither the last-row compare nor the column one flags it, so the
    # sequencer's compare with the tile's first row is reached alone (and at its edge: a first row
    # taken a row or more too low misses it). No case before had an entry below its tile's first row.
    # A generator of its own: every case above is drawn as before.
    gen = np.random.default_rng([seed, 28])
    two = with_residuals(random_layer(point, cfg.tile + 1, cfg.group, gen, offset=0), gen, 2)
    below = layer_entry(cfg, "errors+sparse-below", two, [finite_codes(act, gen, cfg.group, signed=False)])
    moved = next(e for e in below["sparse"] if e[0] >= cfg.tile)
    moved[0] = cfg.tile - 1
    entry["cases"].append({"error": "sparse", "rows": two.rows, "loads": below["loads"], "layer": below["layer"],
                           "w": below["w"], "x": below["vectors"][0]["x"], "sparse": below["sparse"]})
    return {"kind": "errors", **entry}


#: The ``timing`` job's two vectors: MiniLM tokens (the sentence's) other than the plan's others
TIMING_TOKENS = [4, 6]


def timing_job(cfg: GemvConfig, point: str, x: np.ndarray, latency: int, seed: int) -> dict:
    """The engine's throughput and latency as hdl/gemv.py documents them, with no idle input and no
    stall: a layer of one full tile (a random one, two blocks a row, from a generator of its own), so
    that the ring ends at slot 0 and the value FIFO drains while the next layer's x loads (after a
    partial tile, as the errors job's, a pass's first value waits for the ring and the FIFO keeps
    that backlog while the blocks come back to back); then the measured layers: MiniLM's query
    rows, two full tiles (no residuals: every block a fast one), two vectors; with BF16
    activations also ``window_edge_fast_layer`` and ``zero_products_fast_layer`` (every block fast,
    at the window's edge or with zero products far below it: a window check that sends one down the
    slow path costs cycles only; a generator of their own). The
    bench checks that each measured layer's blocks are taken back to back (one every ``g / P``
    cycles, across its passes) and that the last ``y`` word comes ``latency`` cycles after the last
    block (folded, a value every ``g / P`` cycles: plus at most the ring's wait for the row's slot,
    ``slack``) (``timing``), beside every word."""
    rng, step = np.random.default_rng([seed, 23]), cfg.group // cfg.macs_per_cycle
    settle = random_layer(point, cfg.tile, 2 * cfg.group, rng, offset=0)
    plain, _ = minilm_layers(point, 2 * cfg.tile)
    layers = [layer_entry(cfg, "timing-settle", settle, [finite_codes(cfg.act_format, rng, 2 * cfg.group)]),
              layer_entry(cfg, f"{QUERY_LAYER}[:{plain.rows}]", plain, x[TIMING_TOKENS])]
    if cfg.act_format is BF16:
        edge = np.random.default_rng([seed, 24])
        layers += [layer_entry(cfg, "window-edge-fast", *window_edge_fast_layer(point, edge, cfg.tile)),
                   layer_entry(cfg, "zero-products-fast", *zero_products_fast_layer(point, edge, cfg.tile))]
    return {"kind": "layers", "name": "timing", "layers": layers,
            "timing": {"latency": latency, "block_cycles": step, "slack": 0 if step == 1 else cfg.tile - 1,
                       "layers": list(range(1, len(layers)))}}


def plan_for(cfg: GemvConfig, size: str, seed: int, latency: int | None = None) -> dict:
    """The plan of ``cfg``'s regression: its ``minilm``, ``corners`` and ``errors`` jobs (the module's
    doc) drawn from ``seed``, and with the engine's ``latency`` (``latency_of``) a last ``timing`` job."""
    point = point_of(cfg)
    rng = np.random.default_rng(seed)
    s = SIZES[size]
    x = minilm_activations(cfg.act)
    plain, sparse = minilm_layers(point, s["rows"])
    minilm = [layer_entry(cfg, f"{QUERY_LAYER}[:{plain.rows}]", plain, x[s["tokens"]]),
              layer_entry(cfg, f"{QUERY_LAYER}[:40]+2%sparse", sparse, x[s["sparse_tokens"]])]
    corners = [layer_entry(cfg, name, layer, v) for name, layer, v in corner_layers(point, rng, cfg.act_format)]
    if cfg.act_format is BF16:
        # the term unit's rounding (after every other draw, from a generator of its own: the plan's
        # other layers are drawn as before)
        layer, vectors = term_rounding_layer(point, np.random.default_rng([seed, 15]))
        corners.append(layer_entry(cfg, "residual-term-rounding", layer, vectors))
        layer, vectors = window_edge_layer(point, np.random.default_rng([seed, 16]))
        corners.append(layer_entry(cfg, "window-edge", layer, vectors))
    else:
        # E4M3: the residual terms alone (after every other draw, from a generator of its own)
        layer, vectors = terms_alone_layer(point, np.random.default_rng([seed, 17]))
        corners.append(layer_entry(cfg, "terms-alone", layer, vectors))
    # layers of one and two x beats, swapped in back to back (a generator of their own, last)
    corners += [layer_entry(cfg, name, layer, v)
                for name, layer, v in swap_layers(point, np.random.default_rng([seed, 18]), cfg.act_format)]
    if cfg.act_format is BF16:
        # the window check's largest HIF trailing-zero count on a dropping product, the tail's barrier
        # at every kmax (a generator of their own, after every other draw)
        more = np.random.default_rng([seed, 20])
        for name, build in (("window-pow2-drop", window_pow2_layer), ("subnormal-barrier", subnormal_barrier_layer)):
            corners.append(layer_entry(cfg, name, *build(point, more)))
        # the row adder's rounding by its sticky bit alone (a generator of its own, last)
        corners.append(layer_entry(cfg, "adder-sticky", *adder_sticky_layer(point, np.random.default_rng([seed, 21]))))
    if cfg.act_format is E4M3:
        # the row adder's deep cancellations, offset 127 short of saturation, a page's tables reused
        # (a generator of their own, after every other draw)
        more = np.random.default_rng([seed, 19])
        for name, build in (("deep-cancel", deep_cancel_layer), ("offset127-normal", top_offset_layer)):
            corners.append(layer_entry(cfg, name, *build(point, more)))
        corners += [layer_entry(cfg, name, layer, vectors, write_tables=written)
                    for name, layer, vectors, written in reused_table_layers(point, more)]
        # every lane's alignment shift, a subnormal block value at every block exponent, the row
        # adder's sums of a single one bit (a generator of their own, last)
        last = np.random.default_rng([seed, 22])
        corners.append(layer_entry(cfg, "lane-align", *lane_align_layer(point, last)))
        corners += [layer_entry(cfg, name, layer, v) for name, layer, v in subnormal_block_layers(point, last)]
        corners.append(layer_entry(cfg, "single-bit-cancel",
                                   *deep_cancel_layer(point, last, rows=SINGLE_BIT_ROWS, powers_of_two=True)))
    # layers of 257 rows (one in each page) and 240 (a generator of their own, after every other draw)
    corners += [layer_entry(cfg, name, layer, v)
                for name, layer, v in tall_layers(point, np.random.default_rng([seed, 25]), cfg.act_format)]
    if cfg.act_format is E4M3:
        # every lane's NaN detect against each code one bit short of NaN (a generator of its own, last)
        corners.append(layer_entry(cfg, "near-nan-x", *near_nan_layer(point, np.random.default_rng([seed, 26]),
                                                                       cfg.group)))
    if cfg.act_format is BF16:
        # the row adder's cancellations to its word's bit 2, beside the barrier at every bit (a generator
        # of its own, last)
        corners.append(layer_entry(cfg, "ulp-cancel", *ulp_cancel_layer(point, np.random.default_rng([seed, 27]))))
    if cfg.dot_lanes:
        # folded: y held and the blocks spaced so that the front end's skid keeps a block's last chunk,
        # then the one before it (a generator of its own, last)
        paced = np.random.default_rng([seed, 29])
        for name, pace in paced_gaps(cfg).items():
            corners.append({**layer_entry(cfg, f"paced-{name}", *paced_layer(point, paced, act=cfg.act_format)),
                            "paced": pace})
    engine = {"tile": cfg.tile, "max_cols": cfg.max_cols, "max_rows": cfg.max_rows, "lutram_depth": cfg.lutram_depth,
              "act": cfg.act, "dot_lanes": cfg.dot_lanes, "dot_tail": cfg.dot_tail, "acc_adder": cfg.acc_adder,
              "sparse": cfg.sparse}
    return {"config": cfg.name, "point": point, "seed": seed, "engine": engine,
            "size": size, "p_idle": 0.25, "p_stall": 0.3,
            "jobs": [{"kind": "layers", "name": "minilm", "layers": minilm},
                     {"kind": "layers", "name": "corners", "layers": corners}, error_job(cfg, point, rng, seed)]
            + ([timing_job(cfg, point, x, latency, seed)] if latency is not None else [])}


def paced_gaps(cfg: GemvConfig) -> dict[str, int]:
    """A folded engine's ``paced`` layers: per chunk of a block (its last, the one before), the gap in
    cycles between blocks (``w.ready`` high, no block offered: an empty stage 0 on an enabled edge, a
    bubble in the chunk stream) that leaves that chunk in the front end's skid when a held ``y`` stops
    the block dot unit.

    Why: the unit's enable drops in the cycle its last stage gets a value while its skid holds one (the
    value FIFO full); that value's block's last chunk went in ``L`` cycles before (``L`` the unit's
    latency, ``stages()``: 26 at g = 16, P = 1). The chunk the front end offers in that cycle is not
    taken and goes into its skid: the ``L``-th position after that last chunk. With ``n = g / P`` chunks
    a block and ``G`` bubbles after each block it is the next block's chunk ``L - G - 1`` (mod ``n``), so
    ``G = L mod n`` leaves the last chunk there and ``G = (L + 1) mod n`` the one before. With no gap
    (every plan before) it is chunk ``(L - 1) mod n``: the tenth; random idle cycles on ``w`` add a
    bubble or two at a block's edge, about 0.25^10 for the ten the last chunk needs. The tags FIFO
    takes a block's tag from its last chunk, the unit its sign and scale from the one before."""
    from sop.hdl.block_dot_folded import BlockDotFolded

    unit = BlockDotFolded(cfg.layout, cfg.hif, cfg.act, lanes=cfg.dot_lanes, tail=cfg.dot_tail, chunked=True)
    unit._MustUse__silence = True                # asked for its latency only, never elaborated
    n, L = unit.cycles_per_block, unit.latency
    return {"last-chunk": {"gap": L % n, "stops": cfg.tile + 1}, "chunk-before-last": {"gap": (L + 1) % n, "stops": 1}}


def expected_words(plan: dict) -> int:
    """The ``y`` words the plan's bench compares."""
    n = 0
    for job in plan["jobs"]:
        if job["kind"] == "layers":
            n += sum(len(v["expect"]) for layer in job["layers"] for v in layer["vectors"])
        else:
            n += sum(len(c.get("expect") or []) for c in job["cases"])
    return n


#: Verilator warnings the engine's Verilog raises beyond hdl/lint.vlt's, waived in the file for the
#: simulation only: CMPCONST, the sequencer's ``layer.rows > max_rows`` check, constant when
#: ``max_rows`` is the largest value of the ``rows`` field (65535 in the named engines).
SIM_WAIVERS = "/* verilator lint_off CMPCONST */\n"


def build_verilog(cfg: GemvConfig, out_dir: Path, engine=None) -> Path:
    """``engine`` (default ``GemvEngine(cfg)``) as Verilog, module ``gemv.module_name(cfg)``, with
    ``SIM_WAIVERS`` in front, and beside it its manifest (``gemv.describe``: the latency that the
    plan's ``timing`` job checks, ``latency_of``)."""
    from amaranth.back import verilog

    from sop.golden.files import write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gemv.module_name(cfg)}.v"
    engine = engine or gemv.GemvEngine(cfg)
    text = verilog.convert(engine, name=gemv.module_name(cfg), emit_src=False)
    write_atomic(path, (SIM_WAIVERS + text).encode())
    write_atomic(path.with_suffix(".json"), json.dumps(gemv.describe(cfg, engine), indent=1).encode())
    return path


def latency_of(verilog: Path) -> int | None:
    """The engine's latency from the manifest ``build_verilog`` wrote beside its Verilog (None if there
    is none: the plan then has no ``timing`` job)."""
    manifest = Path(verilog).with_suffix(".json")
    return json.loads(manifest.read_text())["latency_cycles"] if manifest.is_file() else None


def run(cfg: GemvConfig, sim: str = "icarus", *, quick: bool = False, seed: int | None = None,
        verilog: Path | None = None, build_dir: Path | None = None, plan_edit=None, waves: bool = False) -> dict:
    """Build and run the regression of ``cfg``; the summary (words checked, mismatches, failed tests,
    seconds). ``verilog`` replaces the generated design and ``plan_edit(plan)`` changes the plan
    (tests inject bugs with them)."""
    size = "quick" if quick else "full"
    build_dir = Path(build_dir or toolenv.build_root() / "sim" / sim / cfg.name).resolve()
    check_simulator(sim, build_dir)
    with held_build_folder(build_dir):               # (a second run there is refused: sim/runner.py)
        if verilog is None:
            verilog = build_verilog(cfg, build_dir / "rtl")
        seed = secrets.randbelow(1 << 31) if seed is None else seed
        plan = plan_for(cfg, size, seed, latency=latency_of(verilog))
        if plan_edit is not None:
            plan_edit(plan)
        summary = simulate(cfg, sim, Path(verilog), gemv.module_name(cfg), "sop.sim.tb_gemv", plan, size,
                           build_dir, seed=seed, waves=waves)
    summary.update(seed=seed, expected=expected_words(plan))
    return summary


def summary_line(s: dict) -> str:
    return (f"{s['config']} [{s['sim']}, {s.get('plan')}]: {s.get('checked', 0)} words checked "
            f"({s.get('counted', 0)} more counted after a bad vector, {s.get('entries', 0)} sparse entries, "
            f"{s.get('layers', 0)} layers), {s['mismatches']} mismatches, {s.get('status_errors', 0)} status errors, "
            f"{s.get('timing_errors', 0)} timing errors "
            f"(seed {s.get('seed')}, {s.get('cycles', 0)} cycles, {s['wall_seconds']:.1f} s)" + failed_note(s))


def passed(s: dict) -> bool:
    return (s["mismatches"] == 0 and s["failed_tests"] == 0 and s.get("status_errors") == 0
            and s.get("timing_errors", 0) == 0 and s.get("checked") == s.get("expected"))


def small_engines() -> dict[str, GemvConfig]:
    """The engines this runner takes beside the named ones (module docstring): of hdl.gemv_config's
    ``small_engines``, the one with the residual path (``SMALL_SIM``); the iCEBreaker's, without it,
    would fail the plan's sparse layers."""
    return {gemv_config.SMALL_SIM: gemv_config.small_engines()[gemv_config.SMALL_SIM]}


def engines() -> dict[str, GemvConfig]:
    """Every engine this runner takes by name: the named ones (hdl.gemv_config) and ``small_engines``."""
    return {**gemv_config.gemv_configs(), **small_engines()}


def cli(argv, prog: str, description: str, run_one, line, ok, extra: dict[str, GemvConfig] | None = None) -> int:
    """The command line of an engine bench (this runner's and sim.tb_gemv_axis's): ``run_one(cfg, sim,
    quick=, seed=, waves=)`` for each named engine chosen (or one of ``extra``, by name only),
    ``line(summary)`` printed, exit 0 when ``ok(summary)`` for all, 2 when the simulator is missing; an
    interrupt is one line, exit 128 + N, the simulators killed (runner.interruptible)."""
    named = gemv_config.gemv_configs()
    configs = {**named, **(extra or {})}
    p = ToolParser(prog=prog, description=description)
    p.add_argument("--config", action="append", choices=list(configs),
                   help="a named engine (default: every named one)")
    add_run_options(p)
    args = p.parse_args(argv)
    waves = os.environ.get("WAVES", "0") not in ("", "0")

    def run_all() -> int:
        results = []
        try:
            for name in args.config or list(named):
                results.append(run_one(configs[name], args.sim, quick=args.quick, seed=args.seed, waves=waves))
                print(line(results[-1]), flush=True)
        except (SimulatorMissing, BuildFolderBusy) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        print("\n".join(["", "summary:"] + [line(s) for s in results]))
        return 0 if all(ok(s) for s in results) else 1
    return interruptible(prog, run_all)


def main(argv=None) -> int:
    return cli(argv, "python -m sop.sim.gemv_runner", __doc__.splitlines()[0], run, summary_line, passed,
               small_engines())


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.sim.gemv_runner", main)
