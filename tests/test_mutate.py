"""The mutation tool itself (sim/mutate.py, sim/tb_mutants.py) on a tiny run: `make mutate` measures
the score; this checks that the flow works and classifies.

The 1-lane configuration, 20 mutations listed by yosys, plus two chosen ones: yosys's "none"
mutation (the original under a mutant's number: it must survive the regression and be proven
equivalent) and the output's valid bit inverted (it must be killed). Every mutant must come out
killed, proven equivalent or survived; the original must pass before and after the mutants.
The sparse scenario (sop4-g16-sp: the residual path's mutations, the sparse regression) kills
two known-bad mutants: a merge that never holds, error bits set on good input; the throughput
check's model and the adder's corner stimulus are checked here without a simulation.
"""

import dataclasses
import json
import time

import numpy as np
import pytest

from sop.hdl.config import named_configs, residual_configs
from sop.sim import mutate
from sop.sim.tb_mutants import (RoundingCases, adder_deep_layer, adder_edge_layers, rounding_layers, stage0_stalls,
                                throughput_layers)

BAD = "-mode inv -wire values__valid"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mutate")
    cfg = named_configs()["sop4-g16-x1"]
    t0 = time.time()
    s = mutate.run_config(cfg, out, n=20, seed=3, sim="verilator", prove_survivors=True, prove_timeout=30,
                          depth=0, vectors=False, size="tiny", induction=2, extra=(BAD,), none=True)
    s["elapsed"] = time.time() - t0
    return out, s


def test_flow_classifies_every_mutant(tiny_run):
    out, s = tiny_run
    print(f"{s['total']} mutants: {s['killed']} killed, {s['equivalent']} equivalent, {s['survived']} survived "
          f"({s['elapsed']:.0f} s)")
    assert not s["void"], s["original"]
    assert 20 <= s["total"] <= 22 and s["sites"] > 1000   # yosys's 20 (fewer where two coincide) + 2 chosen
    verdicts = [r["verdict"] for r in s["mutants"]]
    assert set(verdicts) <= {"killed", "equivalent", "survived"}
    assert s["killed"] + s["equivalent"] + s["survived"] == s["total"]
    assert s["killed"] >= 10                       # most single-bit mutations break a decoder
    for r in s["mutants"]:
        if r["verdict"] == "killed":
            assert r["by"] and r["reason"]
        if r["verdict"] in ("survived", "equivalent"):
            assert r["proof"]["status"] in ("proven", "not proven")
    doc = json.loads((out / "sop4-g16-x1" / "summary.json").read_text())
    assert doc["score"] == s["score"] and len(doc["mutants"]) == s["total"]


def test_known_bad_mutant_is_killed_and_none_is_proven(tiny_run):
    _, s = tiny_run
    bad = next(r for r in s["mutants"] if r.get("extra") == BAD)
    assert bad["verdict"] == "killed", bad
    assert "output beat" in bad["reason"]
    none = next(r for r in s["mutants"] if r["mutation"].startswith("none"))
    assert none["verdict"] == "equivalent" and none["proof"]["status"] == "proven", none


def test_mutation_commands_round_trip():
    line = ("mutate -ctrl mutsel 10 7 -mode cnot1 -module top -cell $flatten\\a.$add$x.v:1$2 -port B "
            "-portbit 3 -ctrlbit 1 -wire a.$5 -wirebit 3 -src x.v:4.1-4.9 -src x.v:9.2-9.8")
    m = mutate.Mutant.parse(line)
    assert m.index == 7 and m.args["mode"] == "cnot1" and m.args["src"] == ["x.v:4.1-4.9", "x.v:9.2-9.8"]
    assert m.command_for(ctrl=False) == line.replace("-ctrl mutsel 10 7 ", "")
    assert m.command_for("gate", ctrl=False).split()[:5] == ["mutate", "-mode", "cnot1", "-module", "gate"]
    assert "a $add.B[3] -> a.$5[3]" in m.describe()


def test_rounding_layers_reach_every_case_in_every_lane():
    """The regression's rounding stimulus (found by the survivors' analysis) hits each reachable
    rounding case of golden's products in every lane, here for 8 lanes."""
    cfg = dataclasses.replace(named_configs()["sop4-g16"])
    layers = rounding_layers(cfg, np.random.default_rng(0))
    cases = RoundingCases(cfg)
    reachable = set()
    for off in range(-128, 128):
        reachable |= set(np.unique(cases.bins(off)).tolist())
    per_lane = [set() for _ in range(cfg.lanes)]
    for layer in layers:
        scale, _, select = cfg.layout.split_header(layer.headers)
        hif = layer.luts[select[:, None], layer.codes]
        bins = cases.bins(layer.offset)[:, hif, scale[:, None]].reshape(4, -1)
        for i in range(bins.shape[1]):
            per_lane[i % cfg.lanes].update(bins[:, i].tolist())
    assert all(lane == reachable for lane in per_lane)
    assert len(reachable) > 1000


# -- the sparse scenario (a -sp design: the residual path's mutants, the sparse regression) --------
SPARSE_BAD = {"-mode const0 -wire issue__hold_next": "differs from golden",   # a merge that never holds
              "-mode inv -wire sparse_error": "after a good stream"}       # error bits set on good input


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    cfg = residual_configs()["sop4-g16-sp"]
    return mutate.run_config(cfg, tmp_path_factory.mktemp("mutate-sp"), n=4, seed=1, sim="verilator",
                             prove_survivors=False, prove_timeout=30, depth=0, vectors=False, size="tiny",
                             extra=tuple(SPARSE_BAD))


def test_sparse_scenario_kills_known_bad_mutants(sparse_run):
    """The residual path's mutations only (the cells of hdl/sparse_merge.py's merge and
    hdl/residual.py's path with its adders), the sparse scenarios: the original passes them before
    and after, a merge that never holds is caught by an output beat (chunks of more than R
    entries), error bits set on a good stream by the error check."""
    s = sparse_run
    assert not s["void"], s["original"]
    names = [sc["name"] for sc in mutate.sparse_scenarios(residual_configs()["sop4-g16-sp"], None, size="tiny")]
    assert {"sparse", "dense", "plain", "reset", "error-order", "error-no_layer", "adder-edges", "throughput",
            "throughput-gaps", "error-past_layer-far"} <= set(names)
    assert set(s["original"][0]["limits"]) == set(names)
    for f, reason in SPARSE_BAD.items():
        bad = next(r for r in s["mutants"] if r.get("extra") == f)
        assert bad["verdict"] == "killed" and reason in bad["reason"], bad


def test_stage0_stalls_counts_each_entry_and_gaps_cost_cycles():
    """The throughput check's model (tb_mutants.stage0_stalls: sim.sparse_stalls.issue_cycles, which
    tests/test_sparse_stalls.py checks against the decoder, with gaps in the sparse stream): every
    entry taken once, in order; gaps make the merge wait for entries, so they cost cycles and take
    no entry earlier."""
    cfg = residual_configs()["sop4-g16-sp"]
    layers = throughput_layers(cfg, np.random.default_rng(0), 40)
    stalls, taken = stage0_stalls(cfg, layers, [0])
    assert stalls > 0
    assert len(taken) == sum(len(L.sparse_index) for L in layers) and taken == sorted(set(taken))
    gapped, later = stage0_stalls(cfg, layers, [0, 3])
    assert gapped > stalls and all(b >= a for a, b in zip(taken, later))


def test_adder_corner_layers_reach_saturation_and_deep_subnormal_ties():
    """The adder's corner stimulus (tb_mutants.adder_edge_layers, adder_deep_layer): golden's
    results include saturated words, subnormal words, and, deep in the subnormal range, sums
    exactly halfway between two subnormals (the sticky bit's corner)."""
    from sop.golden.decoder import decode_blocks
    from sop.golden.formats import get_format

    cfg = residual_configs()["sop4-g16-sp"]
    rng = np.random.default_rng(0)
    words = np.concatenate([np.asarray(L.expected(cfg)).ravel() for L in adder_edge_layers(cfg, rng, 2)])
    assert ((words & 0x7FFF) == 0x7F7F).sum() > 20 and (((words >> 7) & 0xFF) == 0).sum() > 100
    deep = adder_deep_layer(cfg, rng, 16)
    p = decode_blocks(cfg.hif, deep.luts, cfg.layout, deep.offset, deep.headers, deep.codes, "exact").ravel()
    r = get_format("bf16").decode(deep.sparse_values)
    half = np.abs(p + r) / 2.0 ** -134                 # exact in float64: 11- and 5-bit terms near 2^-133
    assert (half % 2 == 1).sum() > 20                  # p + r an odd multiple of half the step: a tie
