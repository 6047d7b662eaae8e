"""The mutation score as sim/mutate.py and sim/gemv_mutate.py compute and report it (docs/hardware.md,
docs/gemv-mutation.md, build/mutate/summary.md), on hand-made verdicts: no yosys run. The score is killed /
(all - proven equivalent); survivors and mutants not run are both listed as alive; the numbers --only takes
run 1 .. N; a run whose original did not pass twice is void. An outside mutation run found each of these
unchecked: the flow tests compared the score with the same function's own output."""

import argparse

import pytest

from sop.sim import gemv_mutate
from sop.sim import mutate as mu


def _rows():
    killed = [{"mutant": i, "verdict": "killed", "by": by} for i, by in
              enumerate(["y word"] * 4 + ["status"] * 2, start=1)]
    return killed + [{"mutant": 7, "verdict": "equivalent", "proof": {"how": "one step from any shared state"}},
                     {"mutant": 8, "verdict": "equivalent", "proof": {}},
                     {"mutant": 9, "verdict": "survived", "mutation": "m9", "verilog": ["a | b"]},
                     {"mutant": 10, "verdict": "not run", "mutation": "m10", "verilog": []},
                     {"mutant": 11, "verdict": "survived", "mutation": "m11", "verilog": []}]


def test_the_score_is_killed_over_all_but_the_proven_equivalent():
    # 6 killed of 11 mutants, 2 proven equivalent: 6 / (11 - 2) = 2 / 3
    assert mu.counts(_rows()) == {"total": 11, "killed": 6, "equivalent": 2, "survived": 2, "not_run": 1,
                                  "score": 6 / 9, "killed_by": {"y word": 4, "status": 2}}
    assert mu.counts([])["score"] == 1.0                       # nothing to kill: nothing missed


def test_the_summary_table_and_the_survivors_listed():
    s = {"config": "c", "sites": 5, "timing_s": {"total": 1}, "mutants": _rows(), **mu.counts(_rows())}
    text = mu.markdown([s], "make mutate")
    assert "| c | 5 | 11 | 6 | 2 | 2 | 66.7 % |" in text
    assert "Killed by check: y word 4, status 2." in text
    assert "Proven equivalent: 1 by one step from any shared state, 1 by ?." in text
    assert "| 9 | `m9` | `a \\| b` |" in text and "| 10 | `m10` |" in text       # survived and not run


def test_a_run_whose_original_did_not_pass_twice_is_void(tmp_path):
    (tmp_path / "prep.il").write_text("")
    once = [{"mutant": 0, "verdict": "survived"}]
    assert mu.verdict_rows(once, [], tmp_path, tmp_path / "x.v")[1] is True
    twice = once * 2
    assert mu.verdict_rows(twice, [], tmp_path, tmp_path / "x.v")[1] is False
    assert mu.verdict_rows([*once, {"mutant": 0, "verdict": "killed"}], [], tmp_path, tmp_path / "x.v")[1] is True


class _Reached(Exception):
    pass


def test_only_may_name_the_last_mutant_and_never_the_original(monkeypatch):
    """`--mutants N --only N` names the list's last mutant (1 .. N): past the checks; 0 is the original."""
    monkeypatch.setattr(mu, "named_configs", lambda: (_ for _ in ()).throw(_Reached()))
    with pytest.raises(_Reached):
        mu.main(["--mutants", "400", "--only", "400"])           # (--sparse-mutants' default is 300)
    monkeypatch.setattr(gemv_mutate, "output_checked", lambda *a, **k: (_ for _ in ()).throw(_Reached()))
    with pytest.raises(_Reached):
        gemv_mutate.main(["--mutants", "7", "--only", "7"])
    with pytest.raises(argparse.ArgumentTypeError):
        mu.mutant_indices("0")


def test_the_engines_survivors_by_module_and_its_timeouts():
    assert gemv_mutate.module_of("front.x_buffer $add -> front.x_buffer.$5") == "front.x_buffer"
    assert gemv_mutate.module_of("$dff -> seq.state") == "seq"
    assert gemv_mutate.module_of("$dff -> q") == "(top)"
    rows = [{"verdict": "survived", "location": "a.b $add -> a.b.x"},
            {"verdict": "not run", "location": "a.b $mux -> a.b.y"},
            {"verdict": "survived", "location": "c $xor -> c.z"},
            {"verdict": "killed", "by": "timeout", "location": "d $and -> d.w"},
            {"verdict": "killed", "by": "y word", "location": "d $and -> d.w"}]
    assert gemv_mutate.timeouts(rows) == 1
    text = gemv_mutate.by_location({"mutants": rows, "timeouts": 1})
    assert text.index("| a.b | 2 |") < text.index("| c | 1 |") and "| d |" not in text
    assert "Timeouts (counted as killed): 1." in text
