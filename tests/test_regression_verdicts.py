"""The verdicts the regressions and the bring-ups hand back, on hand-made summaries and results (no
simulation): `make sim` exits 1 on a mismatch or a failed test; the summary line's figures; the GEMV
bench passes only with every word checked and no error of any kind; the coverage's bins; a board run is
OK only when every value matches and no sparse error bit is set. An outside mutation run of the
checkers found each of these unchecked (a checker that says "pass" wrongly lets wrong hardware through)."""

from types import SimpleNamespace

import numpy as np
import pytest

from sop.hdl.config import named_configs
from sop.sim import gemv_runner, runner
from sop.sim.stimulus import Coverage
from sop.synth.host.bringup import BoardResult
from sop.synth.host.gemv_bringup import GemvResult


def _summary(**kw):
    return {"config": "sop4-g16", "sim": "icarus", "plan": "quick", "checked": 100, "mismatches": 0,
            "failed_tests": 0, "coverage_hit": 3, "coverage_bins": 4, "seed": 7, "wall_seconds": 1.5, **kw}


@pytest.mark.parametrize("bad, code", [({}, 0), ({"mismatches": 1}, 1), ({"failed_tests": 1}, 1)])
def test_make_sim_exits_1_on_a_mismatch_or_a_failed_test(monkeypatch, capsys, bad, code):
    monkeypatch.setattr(runner, "check_simulator", lambda sim: None)
    monkeypatch.setattr(runner, "run", lambda cfg, sim, **kw: _summary(**bad))
    assert runner.main(["--config", "sop4-g16", "--quick"]) == code
    capsys.readouterr()


def test_the_summary_lines_figures():
    assert runner.summary_line(_summary(mismatches=2)) == \
        "sop4-g16 [icarus, quick]: 100 vectors checked, 2 mismatches, coverage 3/4 = 0.750 (seed 7, 1.5 s)"


def test_the_coverage_bins_are_code_x_bank_x_sign_x_scale_exponent():
    # sop4-g16: 16 codes x 2 banks x 2 signs x 8 UE3M3 exponents = 512; e2m3-ue4m4-g16: 64 x 1 x 1 x 16
    assert Coverage(named_configs()["sop4-g16"]).counts == (0, 512)
    assert Coverage(named_configs()["e2m3-ue4m4-g16"]).counts == (0, 1024)


@pytest.mark.parametrize("bad", [{}, {"mismatches": 1}, {"failed_tests": 1}, {"status_errors": 1},
                                 {"timing_errors": 1}, {"checked": 9}])
def test_the_gemv_bench_passes_only_with_every_word_checked_and_no_error(bad):
    s = {"mismatches": 0, "failed_tests": 0, "status_errors": 0, "timing_errors": 0, "checked": 10, "expected": 10}
    assert gemv_runner.passed({**s, **bad}) == (not bad)


def test_a_board_decode_is_ok_only_with_every_value_and_no_sparse_error():
    ok = BoardResult.ok.fget
    assert ok(SimpleNamespace(got=(10, 0xABC), expected=(10, 0xABC), sparse_errors=()))
    assert not ok(SimpleNamespace(got=(10, 0xABD), expected=(10, 0xABC), sparse_errors=()))
    assert not ok(SimpleNamespace(got=(10, 0xABC), expected=(10, 0xABC), sparse_errors=("order",)))


def test_a_board_gemv_is_exact_only_with_every_row():
    exact = GemvResult.exact.fget
    want = np.arange(17, dtype=np.uint32)
    wrong_row_4 = want.copy()
    wrong_row_4[4] ^= 1
    assert exact(SimpleNamespace(got=want.copy(), expected=want))
    assert not exact(SimpleNamespace(got=wrong_row_4, expected=want))
    assert not exact(SimpleNamespace(got=want[:16], expected=want))
    assert not exact(SimpleNamespace(got=want.copy(), expected=None))


def test_the_sparse_summary_line_names_its_entries():
    line = runner.summary_line(_summary(config="sop4-g16-sp", sparse_entries=5))
    assert line.startswith("sop4-g16-sp [icarus, quick]: 100 vectors checked, 5 sparse entries, 0 mismatches")
