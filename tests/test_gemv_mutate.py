"""The GEMV engine's mutation checker (sim/gemv_mutate.py) on a tiny run: `python -m
sop.sim.gemv_mutate` measures the engine's score; this checks that the checker passes the
unmutated design and kills known-bad mutants.

gemv-sop4-g16 (the mutation run's x buffer), one mutation listed by yosys plus three chosen: yosys's
"none" (the original under a mutant's number: it must survive), a ``y`` payload bit inverted (a
wrong word: killed by the scoreboard) and ``y.valid`` inverted (words out of turn, or none).
Icarus and the quick plan's error job only (a small layer, about 300 cycles a design), so that it
runs in seconds; the equivalence proofs are sim/mutate.py's, tested in tests/test_mutate.py.
"""

import json
import math
import time

import numpy as np
import pytest

from sop.golden import dot
from sop.sim import gemv_mutate

BAD_WORD = "-mode inv -wire y__payload"
BAD_VALID = "-mode inv -wire y__valid"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mutate-gemv")
    t0 = time.time()
    s = gemv_mutate.run_engine(gemv_mutate.mutation_config(), out, n=1, seed=1, sim="icarus",
                               prove_survivors=False, extra=(BAD_WORD, BAD_VALID), none=True, jobs=("errors",),
                               count_sites=False)
    s["elapsed"] = time.time() - t0
    return out, s


def test_original_passes_and_known_bad_mutants_are_killed(tiny_run):
    out, s = tiny_run
    print(f"{s['total']} mutants: {s['killed']} killed, {s['survived']} survived ({s['elapsed']:.0f} s, "
          f"{s['timing_s']})")
    assert not s["void"], s["original"]
    assert [r["verdict"] for r in s["original"]] == ["survived", "survived"]
    assert s["original"][0]["cycles"] == s["original"][1]["cycles"]       # the run is deterministic
    none = next(r for r in s["mutants"] if r["mutation"].startswith("none"))
    assert none["verdict"] == "survived", none
    word = next(r for r in s["mutants"] if r.get("extra") == BAD_WORD)
    assert word["verdict"] == "killed" and word["by"] == "y word" and "expected" in word["reason"], word
    valid = next(r for r in s["mutants"] if r.get("extra") == BAD_VALID)
    assert valid["verdict"] == "killed" and valid["by"] in ("y word", "timeout"), valid
    assert s["killed"] + s["survived"] + s["equivalent"] == s["total"]
    doc = json.loads((out / s["config"] / "summary.json").read_text())
    assert doc["score"] == s["score"] and len(doc["mutants"]) == s["total"]


# -- the BF16 engine (gemv-sop4-g16-bf16) ------------------------------------------------------------------

def bf16_plan_terms(seed: int):
    """(rho, x) of every sparse beat of the BF16 engine's quick plan, each against every vector of
    its layer, as float64 values (decoded here from the beats' codes)."""
    from sop.golden.dot import FORMATS
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_runner import plan_for

    bf16 = FORMATS["bf16"]
    plan = plan_for(gemv_configs()["gemv-sop4-g16-bf16"], "quick", seed)
    rho, x = [], []
    for job in plan["jobs"]:
        for layer in job.get("layers", []) if job["kind"] == "layers" else []:
            for v in layer["vectors"]:
                codes = np.array([(b >> (16 * k)) & 0xFFFF for b in v["x"] for k in range(16)])
                for _row, col, value, _last in layer["sparse"]:
                    rho.append(value)
                    x.append(codes[col])
    return bf16.decode(np.array(rho)), bf16.decode(np.array(x))


@pytest.mark.parametrize("seed", [1, 11])
def test_bf16_quick_plan_reaches_the_term_units_rounding(seed):
    """The BF16 quick plan's residual terms ``rho * x_j`` (exact in float64) reach every case of
    ``ResidualTermBF16``'s one rounding, counted here from the values (the 2^-149 quantum): subnormal
    terms that round down, up past the halfway point (a sticky bit), ties to even both ways, terms
    below half the quantum (flushed to zero), normal ones at the smallest exponent, saturated ones.
    (Without the plan's ``residual-term-rounding`` layer none of the rounding cases is reached:
    the mutation run's survivors there were not seen.)"""
    rho, x = bf16_plan_terms(seed)
    p = rho * x                                                     # exact: 8 x 8 significand bits
    q = np.abs(p) / 2.0 ** -149
    sub = (p != 0) & (np.abs(p) < 2.0 ** -126)
    frac = q - np.floor(q)
    even = np.floor(q) % 2 == 0
    cases = {"round down": sub & (frac > 0) & (frac < 0.5), "round up (sticky)": sub & (frac > 0.5),
             "tie to even, down": sub & (frac == 0.5) & even, "tie to even, up": sub & (frac == 0.5) & ~even,
             "flushed": (p != 0) & (q < 0.5), "exact subnormal": sub & (frac == 0) & (q >= 1),
             "smallest normal binade": (np.abs(p) >= 2.0 ** -126) & (np.abs(p) < 2.0 ** -125),
             "saturated": np.abs(p) > np.finfo(np.float32).max,
             "negative rounded": sub & (frac != 0) & (p < 0)}
    counts = {k: int(v.sum()) for k, v in cases.items()}
    print(counts)
    assert min(counts.values()) >= 3, counts


#: Known-bad mutants of the BF16 engine that its quick plan reached only with the layers added for
#: them (the mutation run's survivors before): the term unit's sticky bit held high (a subnormal
#: term that is a tie rounds up: to odd) and lane 5's nonzero flag held low in the block dot unit's
#: window check (a product past the window's last bit stays on the fast path and loses that bit).
BF16_STICKY = "-mode const1 -wire residual_term.sticky8"
BF16_WINDOW = "-mode const0 -wire block_dot.fnz5_d0"


@pytest.mark.long
def test_bf16_engine_flow_kills_the_known_bad_mutants(tmp_path):
    """The checker on gemv-sop4-g16-bf16 (Verilator: the BF16 corners take some 30,000 cycles a
    design, minutes in Icarus): the original passes twice, yosys's "none" survives, and the two
    mutants above are killed by a ``y`` word in the corners job. About 80 s: `make mutate` runs it
    (``long``), before the BF16 engine's own run; the E4M3 flow's check above is `make test`'s."""
    t0 = time.time()
    s = gemv_mutate.run_engine(gemv_mutate.mutation_config("gemv-sop4-g16-bf16"), tmp_path, n=1, seed=1,
                               sim="verilator", prove_survivors=False, extra=(BF16_STICKY, BF16_WINDOW), none=True,
                               jobs=("corners",), count_sites=False)
    print(f"{s['total']} mutants: {s['killed']} killed, {s['survived']} survived ({time.time() - t0:.0f} s, "
          f"{s['timing_s']})")
    assert not s["void"], s["original"]
    assert s["original"][0]["cycles"] == s["original"][1]["cycles"]
    none = next(r for r in s["mutants"] if r["mutation"].startswith("none"))
    assert none["verdict"] == "survived", none
    for f in (BF16_STICKY, BF16_WINDOW):
        r = next(r for r in s["mutants"] if r.get("extra") == f)
        assert r["verdict"] == "killed" and r["by"] == "y word" and "corners" in r["reason"], r


def test_the_small_fpga_engine_is_a_mutation_target():
    """`make mutate` also scores the folded small-FPGA engine (sim/gemv_runner.py's
    ``gemv-sop4-g16-small``): the run takes it by name, with the mutation run's x buffer."""
    from sop.sim.gemv_runner import engines, small_engines

    small = small_engines()["gemv-sop4-g16-small"]
    cfg = gemv_mutate.mutation_config("gemv-sop4-g16-small")
    assert cfg.max_cols == gemv_mutate.MAX_COLS and cfg.dot_lanes == small.dot_lanes == 1
    assert cfg.acc_adder == "compact" and cfg.sparse            # the engine as cocotb runs it, residual path too
    assert {"gemv-sop4-g16", "gemv-sop4-g16-bf16", "gemv-sop4-g16-small"} <= set(engines())
    with pytest.raises(SystemExit) as e:
        gemv_mutate.main(["--config", "no-such-engine"])
    assert e.value.code == 2


def test_the_e4m3_plans_terms_alone_layer_reaches_subnormal_sums():
    """The E4M3 quick plan's ``terms-alone`` layer (all-zero tables: each ``y`` is its residual
    terms' sum alone): sums at many exponents below 28 and FP32 subnormals, and plain and
    saturating ones too; its last 27 rows, ``t + u - t`` against activations of 1.0, cancel to
    sums far below ``t`` (the row accumulator's normalization barrier). The mutation run's
    residual-term and barrier survivors were killed by it (docs/gemv-mutation.md)."""
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_runner import plan_for

    plan = plan_for(gemv_configs()["gemv-sop4-g16"], "quick", 1)
    (layer,) = [lay for lay in plan["jobs"][1]["layers"] if lay["name"] == "terms-alone"]
    ys = [np.asarray(v["expect"], dtype=np.int64) for v in layer["vectors"]]
    y = np.concatenate(ys)
    e = (y >> 23) & 0xFF
    assert len(set(e[(e > 0) & (e < 28)].tolist())) >= 20
    assert ((e == 0) & ((y & 0x7FFFFF) != 0)).sum() >= 20                # FP32 subnormal sums
    assert (e > 100).sum() >= 10 and (e >= 250).sum() >= 3                # plain ones, and near the top
    cancelled = (ys[2][-27:] >> 23) & 0xFF                                 # t at exponents 1 .. 27
    assert (cancelled < np.arange(1, 28)).sum() >= 25


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-sop4-g16-bf16"])
def test_the_quick_plans_swap_in_layers_of_one_and_two_x_beats(engine):
    """The quick plans end with layers whose one vector is one or two ``x`` beats, each after a
    layer that differs in a counter flag its first two blocks read (one row or two, one block per
    row or two): the bench offers such a layer's first block the cycle after its last beat, inside
    the two cycles in which the sequencer's ``settled`` guard holds blocks back. The small-FPGA
    engine's survivor with that guard stuck open (``swap_take`` tied to 0) was killed by them
    (docs/gemv-mutation.md)."""
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_runner import plan_for

    plan = plan_for(gemv_configs()[engine], "quick", 1)
    layers = plan["jobs"][1]["layers"]

    def flags(lay):
        rows, bpr = lay["layer"][:2]
        return rows == 1, rows == 2, bpr == 1, bpr == 2

    short = [(before, lay) for before, lay in zip(layers, layers[1:])
             if len(lay["vectors"][0]["x"]) <= 2 and flags(lay) != flags(before)]
    assert len(short) >= 6
    assert {len(lay["vectors"][0]["x"]) for _, lay in short} == {1, 2}
    assert {flags(lay) for _, lay in short} >= {(True, False, True, False), (False, True, True, False),
                                                (True, False, False, True), (False, True, False, True)}


def _next_tile_starts_flipped(rows: int, tile: int) -> list[int]:
    """The row each tile of a pass starts at in a sequencer whose next tile's first row (``row + 1``, into
    ``row`` and ``tile_base`` through one mux) has bit 8 XORed with bit 7: gemv-sop4-g16's survivor 185.
    A tile's rows run on from its start, so the next one starts ``tile`` rows on, flipped again."""
    starts, row = [], 0
    for _ in range(0, rows, tile):
        starts.append(row)
        row += tile
        row ^= (row >> 7 & 1) << 8
    return starts


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-sop4-g16-bf16", "gemv-sop4-g16-small"])
def test_the_quick_plans_tall_layers_set_bit_8_of_the_row_count_in_each_page(engine):
    """The quick plans' ``tall-*`` layers: a row count (rows - 1) with bit 8 set in each page of the
    sequencer's layer registers (the ``k``-th layer swapped in after reset was written into page ``k %
    2``; every other layer has at most 75 rows), and with tiles of 17 a partial last tile that a
    next-tile row with bit 8 XORed with bit 7 starts at another row, so that it never meets its last
    row (gemv-sop4-g16's survivors 174, ``rows_m1_p1[8]`` stuck at 0, and 185, both killed by them)."""
    from sop.sim.gemv_runner import engines, plan_for

    cfg = engines()[engine]
    plan = plan_for(cfg, "quick", 1)
    layers = [lay["layer"] for job in plan["jobs"][:2] for lay in job["layers"]]     # minilm, corners
    assert [job["name"] for job in plan["jobs"][:2]] == ["minilm", "corners"]
    assert {k % 2 for k, (rows, *_) in enumerate(layers, 1) if (rows - 1) & 256} == {0, 1}
    if cfg.tile == 17:
        moved = [rows for rows, *_ in layers if rows % cfg.tile
                 and _next_tile_starts_flipped(rows, cfg.tile)[-1] != (rows - 1) // cfg.tile * cfg.tile]
        assert moved, sorted({rows for rows, *_ in layers})
    assert _next_tile_starts_flipped(262, 17)[-1] == 255 and _next_tile_starts_flipped(240, 17)[-1] == 238 + 256


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-sop4-g16-small"])
def test_the_e4m3_quick_plans_send_every_code_one_bit_short_of_nan_in_every_lane(engine):
    """Every lane of an ``x`` beat gets, in the plan's good vectors (every job but the errors job's NaN
    cases), each E4M3 code one bit short of NaN (S.1111.111 with one of its low 7 bits cleared), with
    both signs: a NaN detect whose compare has a bit stuck at 1 flags one of them, and the job's
    ``status`` check reports ``x_nan`` (the small-FPGA engine's survivor 133, lane 3's bit 4, lived on
    the plan before, which left 2 to 6 of the 7 out of every lane)."""
    from sop.sim.gemv_runner import engines, plan_for

    cfg = engines()[engine]
    plan = plan_for(cfg, "quick", 1)
    beats = [b for job in plan["jobs"] if job["kind"] == "layers"
             for lay in job["layers"] for v in lay["vectors"] for b in v["x"]]
    beats += [b for case in plan["jobs"][2]["cases"] if case["error"] != "x_nan" for b in case.get("x", [])]
    codes = (np.array(beats, dtype=object)[:, None] >> (8 * np.arange(cfg.group))) & 0xFF
    near = [0x7F ^ (1 << i) | sign for i in range(7) for sign in (0, 0x80)]
    missing = {lane: [hex(c) for c in near if c not in set(codes[:, lane].tolist())] for lane in range(cfg.group)}
    assert missing == {lane: [] for lane in range(cfg.group)}


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-sop4-g16-bf16", "gemv-sop4-g16-small"])
def test_the_folded_plan_paces_its_blocks_to_leave_a_last_chunk_and_the_one_before_in_the_skid(engine):
    """The folded engine's ``paced`` layers (last in its corners; no other engine's plan has them: their
    front end hands on whole blocks): the gaps between blocks that leave in the front end's skid, when
    the held ``y`` stops the block dot unit (latency 26 at g = 16, P = 1: the 26th chunk position after
    a block's last chunk), a block's last chunk (the tags FIFO's) and the one before (the sign's and
    scale's). Every word positive, nonzero (a sign set is a wrong word), rows of two blocks (a row's
    first block's slot is read again by its second: a first chunk's tag in the wrong slot is a wrong
    sum), and more stops than a tile's rows, so that one of them meets a row's first block whatever
    the held words before (the small-FPGA engine's survivors 10 and 67 lived on the plan before)."""
    from sop.sim.gemv_runner import engines, paced_gaps, plan_for

    cfg = engines()[engine]
    corners = plan_for(cfg, "quick", 1)["jobs"][1]["layers"]
    paced = [lay for lay in corners if "paced" in lay]
    if not cfg.dot_lanes:
        assert paced == []
        return
    n, latency = cfg.group // cfg.dot_lanes, 26
    assert (n, cfg.dot_tail) == (16, "serial")
    assert paced == corners[-2:] and [lay["name"] for lay in paced] == ["paced-last-chunk", "paced-chunk-before-last"]
    assert [lay["paced"] for lay in paced] == list(paced_gaps(cfg).values())
    # the chunk in the skid: the next block's (latency - gap - 1) mod n
    assert [(latency - lay["paced"]["gap"] - 1) % n for lay in paced] == [n - 1, n - 2]
    assert paced[0]["paced"]["stops"] > cfg.tile
    for lay in paced:
        rows, blocks_per_row, offset, sparse = lay["layer"]
        assert blocks_per_row == 2 and rows > 2 * cfg.tile and not sparse
        assert len(lay["vectors"]) == 1
        words = np.array(lay["vectors"][0]["expect"], np.uint32)
        assert (words > 0).all() and (words < 0x7F800000).all()


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-sop4-g16-bf16", "gemv-sop4-g16-small"])
def test_the_errors_job_sends_an_entry_beyond_the_tiles_last_row_alone(engine):
    """The errors job's ``sparse`` cases: one whose only entry outside its tile is beyond the layer's
    columns, and one whose only one is beyond the tile's last row (the layer's: it has fewer rows than
    a tile), below row 256. The sequencer's compare of an entry's row with the tile's last row is
    then the only one that flags the second: the small-FPGA engine's survivors 3 (that compare tied
    to 0) and 8 (bit 8 of the tile's last row inverted in it) lived on the plan before, whose one
    case had the column compare flag its entry either way."""
    from sop.sim.gemv_runner import engines, plan_for

    cfg = engines()[engine]
    errors = plan_for(cfg, "quick", 1)["jobs"][2]
    rows, bpr = errors["layer"][:2]
    assert rows <= cfg.tile
    outside = []
    for case in errors["cases"]:
        if case["error"] == "sparse" and "w" not in case:          # (on the errors job's layer)
            assert case["layer"][:2] == [rows, bpr]
            out = [("row" if r >= rows else "col", r) for r, c, *_ in case["sparse"]
                   if r >= rows or c >= bpr * cfg.group]
            assert len(out) == 1, case["sparse"]
            outside.append(out[0])
    assert sorted(kind for kind, _ in outside) == ["col", "row"]
    assert all(r < 256 for kind, r in outside if kind == "row")


def _outside_their_tiles(cfg, case: dict) -> list[tuple[str, int, int]]:
    """A ``sparse`` errors case's entries that lie outside their tile, as ``(kind, row, tile's first
    row)``: ``below`` the tile's first row, ``beyond`` its last, or its column (``col``) beyond the
    layer's. The tiles from the layer word and the engine's tile (``golden.dot.tile_residuals``'
    tiles), each tile's entries in rounds, closed by its rows' ``last`` entries, one a row."""
    rows, bpr = case["layer"][:2]
    bases = list(range(0, rows, cfg.tile))
    t, closed, out = 0, 0, []
    for r, c, _, last in case["sparse"]:
        first, top = bases[t], min(rows, bases[t] + cfg.tile) - 1
        kind = "below" if r < first else "beyond" if r > top else "col" if c >= bpr * cfg.group else None
        if kind:
            out.append((kind, r, first))
        closed += last
        if closed == top - first + 1:
            t, closed = t + 1, 0
    assert t == len(bases) and closed == 0, "a tile's entries not closed by its rows' last ones"
    return out


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-e2m3-ue4m4-g16", "gemv-sop4-g16-bf16",
                                    "gemv-sop4-g16-small"])
def test_the_errors_job_sends_an_entry_below_its_tiles_first_row_alone(engine):
    """The errors job's last ``sparse`` case: a layer of two tiles (its own blocks and row count),
    whose only entry outside its tile, among the second tile's entries, has the first tile's last
    row: below the tile's first row, inside the layer's rows and columns, so the sequencer's compare
    of an entry's row with its tile's first row is the only one that flags it, at that compare's
    edge; ``sparse`` is the bit the plan expects (dot.md, section 8, the error bits: an entry whose
    row is not in the current tile). No case of the plan before had an entry below its tile's first
    row: that compare tied to 0 (``mutants.EntryBelowTileUnflagged``) passed it."""
    from sop.sim.gemv_runner import engines, plan_for

    cfg = engines()[engine]
    errors = plan_for(cfg, "quick", 1)["jobs"][2]
    sparse = [case for case in errors["cases"] if case["error"] == "sparse"]
    below = [case for case in sparse if [k for k, *_ in _outside_their_tiles(cfg, case)] == ["below"]]
    assert len(below) == 1 and below[0] is sparse[-1]
    case = below[0]
    rows, bpr = case["layer"][:2]
    assert rows > cfg.tile and case["rows"] == rows and len(case["w"]) == rows * bpr and case["layer"][3] == 1
    (_, row, first), = _outside_their_tiles(cfg, case)
    assert first > 0 and row == first - 1
    assert all(k != "below" for other in sparse[:-1] for k, *_ in _outside_their_tiles(cfg, other))


def _quick_corners(engine: str = "gemv-sop4-g16") -> dict:
    """The corner layers of an engine's quick plan (seed 1), by name."""
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_runner import plan_for

    return {lay["name"]: lay for lay in plan_for(gemv_configs()[engine], "quick", 1)["jobs"][1]["layers"]}


def _biased_exponent(f32: np.ndarray) -> np.ndarray:
    return (np.asarray(f32, np.float32).view(np.uint32).astype(np.int64) >> 23) & 0xFF


def test_the_e4m3_plans_deep_cancel_layer_reaches_the_row_adders_leading_zero_counts():
    """The E4M3 quick plan's ``deep-cancel`` layer (all-zero tables, activations of 1.0: each ``y`` is
    ``(t + u) - t``): the row accumulator's last addition has the leading-zero count ``k`` (the
    adder's ``e'_big`` minus the result's exponent field, plus one; ``e'_big`` for a subnormal result)
    of 19 by a cancellation above exponent 19 and by the barrier at 19, counts beyond 11 at
    ``e'_big = 75``, and every count from 6 to 24 (20 in all) above the barrier. The folded engine's survivors
    there (a leading-zero select at 19, the compare ``e'_big == 11`` with one bit stuck, which
    also holds at 75) were killed by it (docs/gemv-mutation.md)."""
    from sop.golden.dot import FORMATS

    layer = _quick_corners()["deep-cancel"]
    rows: dict[int, list] = {}
    for row, col, value, _last in layer["sparse"]:
        rows.setdefault(row, []).append((col, value))
    assert sorted(rows) == list(range(layer["rows"])) and layer["layer"][1] == 1
    y = np.asarray(layer["vectors"][0]["expect"], np.uint32).view(np.float32)
    seen = []
    for r, entries in sorted(rows.items()):
        t, u, minus_t = FORMATS["bf16"].decode(np.array([v for _, v in sorted(entries)])).astype(np.float32)
        assert minus_t == -t
        s1 = np.float32(t) + np.float32(u)
        assert np.float32(s1 + minus_t) == y[r]                                   # the golden sum
        e_big = max(int(_biased_exponent(s1)), int(_biased_exponent(t)), 1)
        e_y = int(_biased_exponent(y[r]))
        seen.append((e_big, e_big - max(e_y - 1, 0)))
    assert sum(k == 19 for e, k in seen if e > 19) >= 5
    assert sum(k == 19 for e, k in seen if e == 19) >= 3                        # the barrier's count
    assert sum(k > 11 for e, k in seen if e == 75) >= 3
    above = {k for e, k in seen if e >= 28}
    assert set(range(6, 25)) <= above and len(above) >= 20


def test_the_e4m3_plans_offset127_layer_has_normal_block_values():
    """The E4M3 quick plan's ``offset127-normal`` layer: one block a row at offset 127 (the block
    dot unit's ``kmax`` at 256 or more, its bit 8 set: the folded tail's ``kk`` starts there), and
    block values, each a row's ``y``, that are normal and not saturated, up to FLT_MAX's binade: the
    count down from ``kmax`` crosses 256. (A bit of the folded tail's ``kk`` tied to its bit 8
    survived every layer before: the others' values at such a ``kmax`` saturate.)"""
    layer = _quick_corners()["offset127-normal"]
    assert layer["layer"][1:3] == [1, 127]
    y = np.concatenate([np.asarray(v["expect"], np.int64) for v in layer["vectors"]])
    e = (y >> 23) & 0xFF
    normal = (e >= 1) & (e <= 254) & ((y & 0x7FFFFFFF) != 0x7F7FFFFF)
    assert normal.sum() >= 24 and len(set(e[normal].tolist())) >= 8 and (e[normal] < 248).sum() >= 5


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-e2m3-ue4m4-g16"])
def test_the_e4m3_plans_reuse_a_pages_tables(engine):
    """The E4M3 quick plans have ``tables-A``, ``tables-B`` and ``tables-A-reused`` in a row: the third
    writes no table word (its page still holds ``A``'s), the last word ``B`` writes is the
    negation of ``A``'s at the same bank and code, and half of ``A``'s blocks read that word in every
    lane. (The table bank's write enable stuck high wrote ``B``'s last word, held on ``load``, into
    ``A``'s page after ``B``'s swap: a folded-engine survivor, killed by these layers.)"""
    from sop.golden.points import get_point

    corners = _quick_corners(engine)
    names = list(corners)
    at = names.index("tables-A")
    assert names[at:at + 3] == ["tables-A", "tables-B", "tables-A-reused"]
    a, b, again = (corners[n] for n in names[at:at + 3])
    assert again["loads"] == [] and a["loads"] and again["layer"] == a["layer"] and again["w"] == a["w"]
    bank, code, value = b["loads"][-1]
    assert value != dict(((bk, ad), v) for bk, ad, v in a["loads"])[(bank, code)]
    lay = get_point(engine.removeprefix("gemv-")).layout
    reads = 0
    for beat in a["w"]:
        header = beat & ((1 << lay.header_bits) - 1)
        codes = [(beat >> (lay.header_bits + j * lay.code_bits)) & ((1 << lay.code_bits) - 1) for j in range(lay.group)]
        in_bank = ((header >> lay.select_position) & 1 if lay.select_bit else 0) == bank
        reads += in_bank and codes == [code] * lay.group
    assert reads == len(a["w"]) // 2


def _e4m3_last_layers(engine: str, seed: int) -> tuple:
    """The E4M3 quick plan's layers from ``lane-align`` to ``single-bit-cancel`` (the ``tall-*`` ones
    follow), drawn again as plan_for draws them (a generator of their own, ``[seed, 22]``), checked
    against the plan's entries: (cfg, layers as (name, LayerStream, vectors), the entries by name)."""
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_layers import SINGLE_BIT_ROWS, deep_cancel_layer, lane_align_layer, subnormal_block_layers
    from sop.sim.gemv_runner import layer_entry, plan_for

    cfg = gemv_configs()[engine]
    plan = plan_for(cfg, "quick", seed)
    entries = {lay["name"]: lay for lay in plan["jobs"][1]["layers"]}
    last = np.random.default_rng([seed, 22])
    layers = [("lane-align", *lane_align_layer(plan["point"], last))]
    layers += subnormal_block_layers(plan["point"], last)
    layers += [("single-bit-cancel", *deep_cancel_layer(plan["point"], last, rows=SINGLE_BIT_ROWS,
                                                        powers_of_two=True))]
    names = list(entries)
    at = names.index("lane-align")
    assert names[at:at + len(layers)] == [name for name, _, _ in layers]
    for name, layer, vectors in layers:
        assert layer_entry(cfg, name, layer, vectors) == entries[name]
    return cfg, layers, entries


def _block_fields(layer):
    """Per block of a layer: the HIF codes its lanes read, its scale code and its sign bit."""
    from sop.golden.layout import unpack_blocks

    headers, codes = unpack_blocks(layer.layout, layer.blocks)
    scale, sign, bank = layer.layout.split_header(headers)
    return layer.luts[bank[:, None], codes], scale, sign


@pytest.mark.parametrize("engine,seed", [("gemv-sop4-g16", 1), ("gemv-sop4-g16", 2), ("gemv-e2m3-ue4m4-g16", 1)])
def test_the_e4m3_plans_lane_align_layer_shifts_an_odd_product_by_every_amount_in_every_lane(engine, seed):
    """The E4M3 quick plans' ``lane-align`` layer: in every lane, products whose HIF and activation
    significands are both odd (the product's lowest bit set) at every alignment shift ``t`` (the
    two exponents above their formats' smallest: 0 .. 20), and block values that are exact: each
    ``y`` (one block a row) is the exact sum of its 16 products times the scale, so a bit that a
    lane's shift loses or adds changes it. Fields from golden's ``float_fields``; the exact value in
    float64 (fewer than 53 bits). (The alignment selects of the block dot unit's lanes were
    survivors of the mutation runs, reachable only where a lane's shift met an odd product.)"""
    from sop.golden.decoder import float_fields
    from sop.sim.gemv_layers import E4M3

    _, layers, entries = _e4m3_last_layers(engine, seed)
    _, layer, vectors = layers[0]
    lay, hif = layer.layout, layer.hif
    h, scale, sign = _block_fields(layer)
    _, h_sig, h_exp = float_fields(hif, h & ((1 << (hif.bits - 1)) - 1))
    h_val = hif.decode(h).astype(np.float64)
    s_val = lay.scale.decode(scale).astype(np.float64) * np.where(sign == 1, -1.0, 1.0)
    t_max = int(np.ptp(dot.exponent_range(hif)) + np.ptp(dot.exponent_range(E4M3)))
    assert t_max == 20
    shifts = [set() for _ in range(lay.group)]
    for x, expect in zip(vectors, (v["expect"] for v in entries["lane-align"]["vectors"])):
        _, x_sig, x_exp = float_fields(E4M3, x & 0x7F)
        t = (h_exp - dot.exponent_range(hif)[0]) + (x_exp - dot.exponent_range(E4M3)[0])
        odd = (h_sig % 2 == 1) & (x_sig % 2 == 1)
        for j in range(lay.group):
            shifts[j] |= set(t[odd[:, j], j].tolist())
        exact = (h_val * E4M3.decode(x).astype(np.float64)).sum(axis=1) * s_val * 2.0 ** layer.offset
        y = np.asarray(expect, np.uint32).view(np.float32).astype(np.float64)
        assert (y == exact).all() and (exact != 0).all()
    assert all(s == set(range(t_max + 1)) for s in shifts), shifts


@pytest.mark.parametrize("engine", ["gemv-sop4-g16", "gemv-e2m3-ue4m4-g16"])
def test_the_e4m3_plans_subnormal_block_layers_reach_every_block_exponent(engine):
    """The E4M3 quick plans' ``subnormal-block-offset*`` layers: one block a row whose value, the
    row's ``y``, is an FP32 subnormal (exponent field 0, nonzero), at least two at every block
    exponent ``E`` (the products' LSB exponent + the scale's exponent + the offset: the value is
    ``Q * 2^E``, ``Q`` a positive integer) from the lowest (offset -128, the smallest scale
    exponent) to -127, the last where a value can be subnormal (``Q = 1``); the block dot unit's
    barrier bit for that ``E`` alone sets the normalizing shift. (Its compare ``kmax == 19``, ``E =
    -145``, survived the mutation run: no plan had a subnormal block there.)"""
    from sop.golden.decoder import float_fields
    from sop.golden.layout import OFFSET_RANGE
    from sop.sim.gemv_layers import E4M3

    _, layers, entries = _e4m3_last_layers(engine, 1)
    blocks = [(name, layer) for name, layer, _ in layers if name.startswith("subnormal-block-")]
    lay = blocks[0][1].layout
    lsb = dot.accumulator(blocks[0][1].hif, E4M3, lay.group).lsb_exp
    s_lo = dot.exponent_range(lay.scale)[0]
    reached = {}
    for name, layer in blocks:
        _, scale, _ = _block_fields(layer)
        _, _, e_s = float_fields(lay.scale, scale)
        y = np.asarray(entries[name]["vectors"][0]["expect"], np.int64)
        subnormal = ((y >> 23) & 0xFF == 0) & (y & 0x7FFFFF != 0)
        for E in (lsb + e_s + layer.offset)[subnormal].tolist():
            reached[E] = reached.get(E, 0) + 1
    expected = range(lsb + s_lo + OFFSET_RANGE[0], -126)
    assert sorted(reached) == list(expected) and min(reached.values()) >= 2, reached


def test_the_e4m3_plans_single_bit_cancel_layer_cancels_to_one_bit_at_every_distance():
    """The E4M3 quick plan's ``single-bit-cancel`` layer: each row ``t, u, -t`` against activations
    of 1.0, ``t`` and ``u`` powers of two of one sign, ``u`` 1 to 23 binades below ``t`` (each
    once), and ``y == u``: every sum of the row is one or two one bits, and the last, ``(t + u) -
    t``, a single bit at every position of the row adder's word below its top, alone in its
    leading-zero chunk. (The adder's chunk flag ``|rb[19:12]`` without bit 17 survived the
    mutation run: the random fractions of ``deep-cancel`` left another bit in that chunk.)"""
    from sop.golden.dot import FORMATS
    from sop.sim.gemv_layers import E4M3

    _, layers, entries = _e4m3_last_layers("gemv-sop4-g16", 1)
    _, layer, (x,) = layers[-1]
    assert not layer.luts.any() and (E4M3.decode(x) == 1.0).all()
    rows: dict[int, list] = {}
    for row, col, value, _last in entries["single-bit-cancel"]["sparse"]:
        rows.setdefault(row, []).append((col, value))
    y = np.asarray(entries["single-bit-cancel"]["vectors"][0]["expect"], np.uint32).view(np.float32)
    distances = []
    for r, entry in sorted(rows.items()):
        t, u, minus_t = FORMATS["bf16"].decode(np.array([v for _, v in sorted(entry)])).tolist()
        assert minus_t == -t and t * u > 0 and float(y[r]) == u
        assert math.log2(abs(t)).is_integer() and math.log2(abs(u)).is_integer()
        distances.append(int(math.log2(t / u)))
    assert sorted(distances) == list(range(1, 24))


@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_plans_window_pow2_layer_drops_power_of_two_hif_products_by_one_bit(seed):
    """The BF16 quick plan's ``window-pow2-drop`` layer: in every lane, blocks whose one dropping
    product (past the window's last bit: the slow path) has a power-of-two HIF significand (its
    trailing-zero count at the largest, ``m_bits``) and drops by exactly one bit (``T - t_j = F +
    tz_h + tz_x + 1``): a window check whose count for a power of two is one too high keeps such a
    block on the fast path (``takes_fallback`` with a window one bit wider: fast), which loses the
    product's last bit, and the block's value is the product alone (``y`` nonzero). Computed here from
    the table words and the codes. (``window-edge`` cannot reach it: its dropping entries' power of
    two would be subnormal; lane 1's count raised from 6 to 7 survived the mutation run.)"""
    from sop.hdl import block_dot_bf16 as bd
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_layers import window_pow2_layer
    from sop.sim.gemv_runner import layer_entry, plan_for

    cfg = gemv_configs()["gemv-sop4-g16-bf16"]
    plan = plan_for(cfg, "quick", seed)
    (entry,) = [lay for lay in plan["jobs"][1]["layers"] if lay["name"] == "window-pow2-drop"]
    layer, vectors = window_pow2_layer(plan["point"], np.random.default_rng([seed, 20]))
    assert layer_entry(cfg, "window-pow2-drop", layer, vectors) == entry      # the plan's layer is this one
    lay, hif = layer.layout, layer.hif
    g, F = lay.group, bd.F_BITS
    p = _bf16_products(layer, vectors[0])
    nz, tzh, tzx = p["nz"], p["tzh"], p["tzx"]
    d = p["T"][:, None] - p["t"]
    drops = nz & (d > F + tzh + tzx)
    target = drops & (tzh == hif.mbits) & (d == F + tzh + tzx + 1) & (drops.sum(axis=1) == 1)[:, None]
    wider = bd.takes_fallback(lay, hif, p["h"], p["xs"], p["scale"], layer.offset, f_bits=F + 1)
    y = np.asarray(entry["vectors"][0]["expect"], np.int64)
    blocks = np.arange(len(p["h"]))
    hit = target & (p["slow"] & ~wider)[:, None] & (y[blocks // (layer.cols // g)] & 0x7FFFFFFF != 0)[:, None]
    per_lane = hit.sum(axis=0)
    assert (per_lane >= 1).all(), per_lane
    assert set(tzx[hit].tolist()) >= set(range(8))                             # every activation count


@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_plans_subnormal_barrier_layer_reaches_every_kmax_with_a_subnormal_block(seed):
    """The BF16 quick plan's ``subnormal-barrier`` layer: for every ``kmax`` of the block dot unit's
    tail from 0 to 53 (``NQ - 2``), at least two fast blocks with that ``kmax`` whose value, the row's
    ``y``, is an FP32 subnormal (exponent field 0, nonzero): ``Q`` has more than ``kmax`` leading
    zeros, so the one-hot barrier bit for that ``kmax`` alone sets the shift (hdl/block_dot.py
    ``scaled_word``). ``kmax`` is read from the unit's own model: a block whose ``takes_fallback``
    is false at offset ``-K`` and true at ``-K - 1`` has ``kmax == K``. (The barrier compares
    ``kmax == 52`` and ``kmax == 23`` survived the mutation run: no subnormal block reached them.)"""
    from sop.golden.layout import unpack_blocks
    from sop.hdl import block_dot_bf16 as bd
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_layers import subnormal_barrier_layer, window_pow2_layer
    from sop.sim.gemv_runner import layer_entry, plan_for

    cfg = gemv_configs()["gemv-sop4-g16-bf16"]
    plan = plan_for(cfg, "quick", seed)
    (entry,) = [lay for lay in plan["jobs"][1]["layers"] if lay["name"] == "subnormal-barrier"]
    more = np.random.default_rng([seed, 20])
    window_pow2_layer(plan["point"], more)                                      # the generator's first draws
    layer, vectors = subnormal_barrier_layer(plan["point"], more)
    assert layer_entry(cfg, "subnormal-barrier", layer, vectors) == entry
    lay, hif = layer.layout, layer.hif
    g, bpr = lay.group, layer.cols // lay.group
    headers, codes = unpack_blocks(lay, layer.blocks)
    bank = (headers >> lay.select_position) & 1 if lay.select_bit else np.zeros_like(headers)
    h = layer.luts[bank[:, None], codes]
    xs = np.asarray(vectors[0], np.int64).reshape(-1, g)[np.arange(len(codes)) % bpr]
    scale = headers & ((1 << lay.scale.bits) - 1)
    live = (codes != 0).any(axis=1)                                             # each row's one nonzero block
    assert (live.reshape(-1, bpr).sum(axis=1) == 1).all()
    h, xs, scale = h[live], xs[live], scale[live]
    fast = ~bd.takes_fallback(lay, hif, h, xs, scale, layer.offset)
    kmax = np.full(len(h), -1)
    for K in range(0, 80):
        at = ~bd.takes_fallback(lay, hif, h, xs, scale, layer.offset - K) & \
            bd.takes_fallback(lay, hif, h, xs, scale, layer.offset - K - 1)
        kmax[at] = K
    y = np.asarray(entry["vectors"][0]["expect"], np.int64)
    subnormal = ((y >> 23) & 0xFF == 0) & (y & 0x7FFFFF != 0)
    reached = np.bincount(kmax[fast & subnormal & (kmax >= 0)], minlength=54)
    assert (reached[:54] >= 2).all(), reached


@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_plans_adder_sticky_layer_rounds_by_the_sticky_bit_alone(seed):
    """The BF16 quick plan's ``adder-sticky`` layer: in every row, ``y = (t1 + t2) + t3`` of three exact
    terms, and its last add carries out (the sum reaches the binade above its larger operand's) and
    lands above a tie by less than an eighth of the result's last place, with that place even: only
    the sticky bit below the guard and round bits tells it from a tie, which would round down to
    even. Checked here from the values in float64 (exact) against the plan's ``y``, which is the
    rounded-up value. (The row adder's sticky OR with its bit 0 tied to 0 survived the mutation run.)"""
    from sop.golden.dot import FORMATS
    from sop.sim.gemv_layers import adder_sticky_layer

    entry, layer, x = _bf16_corner(seed, "adder-sticky", adder_sticky_layer, 21)
    assert not layer.luts.any()                                                 # every block's value 0
    rows = layer.rows
    assert layer.sparse.index.tolist() == [r * layer.cols + 3 * r + i for r in range(rows) for i in range(3)]
    terms = FORMATS["bf16"].decode(layer.sparse.value_bf16) * FORMATS["bf16"].decode(x[:3 * rows])   # exact
    for r in range(rows):
        t = terms[3 * r:3 * r + 3].tolist()
        a = float(np.float32(t[0] + t[1]))                                      # the running sum, rounded
        s = a + t[2]                                                            # exact in float64
        assert s >= 2.0 ** (math.floor(math.log2(max(a, t[2]))) + 1), (r, a, t[2])   # a carry-out
        q = 2.0 ** (math.floor(math.log2(s)) - 23)                              # the result's last place
        kept, rest = divmod(s, q)
        assert kept % 2 == 0 and q / 2 < rest < q / 2 + q / 8, (r, s, rest / q)
        y = float(np.uint32(entry["vectors"][0]["expect"][r]).view(np.float32))
        assert y == (kept + 1) * q, (r, y, s)


def _bf16_corner(seed: int, name: str, make, stream: int):
    """The BF16 quick plan's corner layer ``name``: (its plan entry, the layer and its vector made again by
    ``make`` from the corner's own generator ``[seed, stream]``), the entry checked to be theirs."""
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_runner import layer_entry, plan_for

    cfg = gemv_configs()["gemv-sop4-g16-bf16"]
    plan = plan_for(cfg, "quick", seed)
    (entry,) = [lay for lay in plan["jobs"][1]["layers"] if lay["name"] == name]
    layer, (x,) = make(plan["point"], np.random.default_rng([seed, stream]))
    assert layer_entry(cfg, name, layer, [x]) == entry
    return entry, layer, x


def _adder_fields(v: float) -> tuple[int, int, int]:
    """(sign, significand with its hidden bit, ``e' = max(e, 1)``) of a binary32 value, as the row
    adder unpacks it (hdl/fp32_acc.py ``_unpack``)."""
    bits = int(np.float32(v).view(np.uint32))
    e = bits >> 23 & 0xFF
    return bits >> 31, bits & 0x7FFFFF | (e > 0) << 23, max(e, 1)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_plans_ulp_cancel_layer_cancels_the_row_adders_sum_to_bit_2_beside_every_barrier_bit(seed):
    """The BF16 quick plan's ``ulp-cancel`` layer: in every row, ``y = (t1 + t2) + t3`` of three exact
    terms whose last add cancels, its operands of opposite signs one binade apart (the alignment shift
    1), to the adder's word ``R = 4`` (hdl/fp32_acc.py ``Fp32Add``: the larger significand with 3 bits
    below it, minus the smaller one shifted under it): its leading one at bit 2, the lowest that any
    cancellation leaves. The larger operand's biased exponent takes every value from 2 to 27 (the
    normalization barrier at each bit from 25 down to 0, which caps the leading-zero count below 25: a
    subnormal ``y``) and some above 27 (no barrier: the count 25 from ``R`` alone). Checked from the
    values (the adder's fields in integers, the sums in float64, exact) against the plan's ``y``. (The
    count's chunk flag of ``R[11:4]`` stuck at 1, 24 for 25, and the barrier's bit 21 stuck at 0 survived
    the mutation run on the plan before, whose BF16 layers never cancelled that deep in the row adder.)"""
    from sop.golden.dot import FORMATS
    from sop.sim.gemv_layers import ulp_cancel_layer

    entry, layer, x = _bf16_corner(seed, "ulp-cancel", ulp_cancel_layer, 27)
    assert not layer.luts.any()                                                 # every block's value 0
    rows, cols = layer.rows, layer.cols
    assert layer.sparse.index.tolist() == [r * cols + i for r in range(rows) for i in range(3)]
    bf16 = FORMATS["bf16"]
    terms = (bf16.decode(layer.sparse.value_bf16) * np.tile(bf16.decode(x[:3]), rows)).reshape(rows, 3)
    e_big = []
    for r, t in enumerate(terms.tolist()):
        a = float(np.float32(t[0] + t[1]))                                      # the running sum, rounded
        (sa, ma, ea), (sb, mb, eb) = _adder_fields(a), _adder_fields(t[2])
        (big, e1), (small, e2) = sorted([(mb, eb), (ma, ea)], key=lambda f: (f[1], f[0]), reverse=True)
        assert sa != sb and e1 - e2 == 1, (r, a, t[2])                          # a subtraction, shift 1
        assert (big << 3) - ((small << 3) >> 1) == 4, (r, a, t[2])              # R = 4: nothing shifted out
        y = float(np.uint32(entry["vectors"][0]["expect"][r]).view(np.float32))
        assert y == a + t[2] != 0, (r, y, a, t[2])                              # exact in float64
        e_big.append(e1)
    assert set(range(2, 28)) <= set(e_big) and max(e_big) > 27, sorted(e_big)


def _bf16_timing_layers(seed: int) -> tuple:
    """The BF16 quick plan's timing job's measured layers after MiniLM's, drawn again as plan_for
    draws them (a generator of their own, ``[seed, 24]``) and checked against the plan's entries:
    (cfg, [(name, LayerStream, vectors)])."""
    from sop.hdl.gemv_config import gemv_configs
    from sop.sim.gemv_layers import window_edge_fast_layer, zero_products_fast_layer
    from sop.sim.gemv_runner import layer_entry, plan_for

    cfg = gemv_configs()["gemv-sop4-g16-bf16"]
    plan = plan_for(cfg, "quick", seed, latency=53)                # (any latency: the layers are the same)
    timing = plan["jobs"][-1]
    assert timing["name"] == "timing" and timing["timing"]["layers"] == [1, 2, 3]
    edge = np.random.default_rng([seed, 24])
    layers = [("window-edge-fast", *window_edge_fast_layer(plan["point"], edge, cfg.tile)),
              ("zero-products-fast", *zero_products_fast_layer(plan["point"], edge, cfg.tile))]
    for (name, layer, vectors), entry in zip(layers, timing["layers"][2:], strict=True):
        assert layer_entry(cfg, name, layer, vectors) == entry
    return cfg, layers


def _bf16_products(layer, x) -> dict:
    """Per block and lane of a BF16 layer under activation codes ``x``: the HIF and activation codes
    (``h``, ``xs``) and the scale code, the significands, the product exponents ``t`` (zero products
    0), their trailing zeros, the block's ``T``, and whether the block takes the block dot unit's
    slow path (``takes_fallback``)."""
    from sop.hdl import block_dot_bf16 as bd

    lay, hif, g = layer.layout, layer.hif, layer.layout.group
    h, scale, _ = _block_fields(layer)
    xs = np.asarray(x, np.int64).reshape(-1, g)[np.arange(len(h)) % (layer.cols // g)]
    Sh, eh = bd._fields(hif, h)
    Sx, ex = bd._fields(dot.FORMATS["bf16"], xs)
    nz = (Sh > 0) & (Sx > 0)
    t = np.where(nz, eh + ex, 0)
    return {"h": h, "xs": xs, "scale": scale, "Sh": Sh, "Sx": Sx, "eh": eh, "ex": ex, "nz": nz, "t": t,
            "T": t.max(axis=1), "tzh": bd._trailing_zeros(Sh), "tzx": bd._trailing_zeros(Sx),
            "slow": bd.takes_fallback(lay, hif, h, xs, scale, layer.offset)}


def _window_edge_reach(layer, x) -> tuple[bool, list[set], list[set]]:
    """Whether every block of ``layer`` is fast, and per lane the HIF and activation trailing-zero
    counts of its products that sit exactly at the window's edge (``T - t = F + tz_h + tz_x``: the
    lowest set bit on the window's last bit) in a block that a window one bit narrower sends slow."""
    from sop.hdl.block_dot_bf16 import F_BITS, takes_fallback

    p = _bf16_products(layer, x)
    narrower = takes_fallback(layer.layout, layer.hif, p["h"], p["xs"], p["scale"], layer.offset, f_bits=F_BITS - 1)
    at_edge = p["nz"] & (p["T"][:, None] - p["t"] == F_BITS + p["tzh"] + p["tzx"]) & narrower[:, None]
    g = layer.layout.group
    return (not p["slow"].any(), [set(p["tzh"][at_edge[:, j], j].tolist()) for j in range(g)],
            [set(p["tzx"][at_edge[:, j], j].tolist()) for j in range(g)])


@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_timing_jobs_window_edge_layer_is_fast_at_the_windows_edge_in_every_lane(seed):
    """The BF16 quick plan's timing job runs ``window-edge-fast`` (no idles: its blocks must come back
    to back): whole tiles of rows whose blocks all take the fast path, and in every lane products
    whose lowest set bit sits exactly on the window's last bit, with every HIF trailing-zero count
    (0 .. 6) and seven of the eight activation counts, in blocks that a window one bit narrower
    would send down the slow path. A window check that counts one trailing zero too few there costs
    cycles only: the window-check mutants 113 and 160 of the BF16 mutation run, killed by ``cycles``
    with this layer. The check fails on ``window-edge``'s dropping rows."""
    from sop.sim.gemv_layers import layer_rows, window_edge_layer

    cfg, layers = _bf16_timing_layers(seed)
    _, layer, (x,) = layers[0]
    hif = layer.hif
    assert layer.rows % cfg.tile == 0
    fast, tzh, tzx = _window_edge_reach(layer, x)
    assert fast and all(s == set(range(hif.mbits + 1)) for s in tzh), tzh
    assert all(len(s) >= 7 for s in tzx), tzx
    full, (xf,) = window_edge_layer("sop4-g16", np.random.default_rng([seed, 24]))
    assert not _window_edge_reach(layer_rows(full, np.arange(1, full.rows, 2)), xf)[0]    # the dropping rows


def _stuck_nonzero_slows(layer, x) -> list[int]:
    """Per lane ``L``: how many blocks of ``layer`` a window check whose lane-``L`` nonzero flag is
    stuck at one would send down the slow path: its zero product counted with ``t = e_h + e_x`` and
    found to drop a bit (its trailing zeros taken as the significand's width, the most a count can
    say) while nothing else changes."""
    from sop.hdl.block_dot_bf16 import F_BITS

    p = _bf16_products(layer, x)
    hif = layer.hif
    out = []
    for lane in range(layer.layout.group):
        nz = p["nz"].copy()
        nz[:, lane] = True
        t = np.where(nz, p["eh"] + p["ex"], 0)
        tzh = np.where(p["Sh"] > 0, p["tzh"], hif.mbits + 1)
        tzx = np.where(p["Sx"] > 0, p["tzx"], 8)
        drop = (nz & (t.max(axis=1)[:, None] - t > F_BITS + tzh + tzx)).any(axis=1)
        out.append(int((drop & ~p["slow"]).sum()))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_the_bf16_timing_jobs_zero_products_layer_slows_down_under_a_stuck_nonzero_flag(seed):
    """The BF16 quick plan's timing job runs ``zero-products-fast``: one tile of blocks that all take
    the fast path (one product each, the other lanes zero entries under tiny activations), where a
    lane's nonzero flag stuck at one would send blocks down the slow path, for every lane: the
    mutant 48 of the BF16 mutation run (lane 5's flag), killed by ``cycles`` with this layer. The
    check fails when the zero lanes' activations are as large as the product's."""
    cfg, layers = _bf16_timing_layers(seed)
    _, layer, (x,) = layers[1]
    assert layer.rows == cfg.tile
    assert not _bf16_products(layer, x)["slow"].any()
    assert min(_stuck_nonzero_slows(layer, x)) >= layer.rows
    big = np.full_like(x, x[0])
    assert min(_stuck_nonzero_slows(layer, big)) == 0
