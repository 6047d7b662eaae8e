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
import time

import numpy as np
import pytest

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
    from sop.hdl.gemv import gemv_configs
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


@pytest.mark.slow
def test_bf16_engine_flow_kills_the_known_bad_mutants(tmp_path):
    """The checker on gemv-sop4-g16-bf16 (Verilator: the BF16 corners take some 30,000 cycles a
    design, minutes in Icarus): the original passes twice, yosys's "none" survives, and the two
    mutants above are killed by a ``y`` word in the corners job."""
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
    residual-term and barrier survivors were killed by it (docs/dot.md)."""
    from sop.hdl.gemv import gemv_configs
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
    (docs/dot.md)."""
    from sop.hdl.gemv import gemv_configs
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
