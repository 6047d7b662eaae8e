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
