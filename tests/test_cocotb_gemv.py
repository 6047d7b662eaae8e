"""The GEMV engine's cocotb regression (sim/gemv_runner.py, sim/tb_gemv.py): its fast subset.

Icarus on ``gemv-sop4-g16``'s Verilog with the quick plan (40 real MiniLM rows
with real E4M3 activations, without and with sparse residuals, the corner layers
back to back, the bad vectors): every expected ``y`` word checked, none
mismatched, the status bits as they should be. The checker can fail: an engine
whose table bank stores one bit of entry 5 flipped (tests/mutants.py), and a plan
with one expected word off by one bit and a NaN vector said to be good, must be
reported. The e2m3-ue4m4-g16 engine and the small-FPGA one (``gemv-sop4-g16-small``: folded to
one MAC a cycle, the compact adder, tiles of 4; the iCEBreaker's) run the quick plan in Icarus
here too, the BF16 engine's as a slow test. The BF16 engine's full plan (whole layers) in
Verilator is a slow test of its own file (tests/test_cocotb_gemv_full.py, so that it runs on the
other worker); every engine's full plan is `make sim`'s.
"""

import pytest

import mutants
from sop.hdl import gemv
from sop.sim import gemv_runner

CONFIGS = gemv.gemv_configs()
SOP4 = CONFIGS["gemv-sop4-g16"]
SMALL = gemv_runner.small_engines()["gemv-sop4-g16-small"]


def test_quick_regression_icarus(tmp_path):
    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert s["failed_tests"] == 0 and s["mismatches"] == 0 and s["status_errors"] == 0
    assert s["checked"] == s["expected"] > 250 and s["counted"] == 3 * 19   # 18 bad vectors of 3 rows, the bad entry's
    assert s["entries"] > 550 and s["layers"] == 25          # terms-alone, swap-RxC, deep-cancel, ... included
    assert gemv_runner.passed(s)


def test_fp6_engine_quick_regression_icarus(tmp_path):
    """The e2m3-ue4m4-g16 engine (one bank, 6-bit codes, unsigned scales) under its quick plan."""
    s = gemv_runner.run(CONFIGS["gemv-e2m3-ue4m4-g16"], "icarus", quick=True, seed=1, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] == s["expected"] > 250 and s["entries"] > 550 and s["layers"] == 25


def test_small_fpga_engine_quick_regression_icarus(tmp_path):
    """The folded engine's Verilog (a chunk of one code a cycle, one table copy, the compact adder)
    under the same plan: real MiniLM rows with and without sparse residuals, the corners, the bad
    vectors; about 62,000 cycles (a block every 16)."""
    assert (SMALL.dot_lanes, SMALL.acc_adder, SMALL.tile, SMALL.sparse) == (1, "compact", 4, True)
    s = gemv_runner.run(SMALL, "icarus", quick=True, seed=1, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] == s["expected"] > 450 and s["entries"] > 550 and s["layers"] == 25


def corners_only(plan: dict) -> None:
    """The plan without its MiniLM job (a shorter run for the injected bugs)."""
    plan["jobs"] = [job for job in plan["jobs"] if job.get("name") != "minilm"]


def test_a_broken_engine_is_reported(tmp_path):
    verilog = gemv_runner.build_verilog(SOP4, tmp_path / "rtl", gemv.GemvEngine(SOP4, bank=mutants.FlippedLutBit))
    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, verilog=verilog, build_dir=tmp_path / "build",
                        plan_edit=corners_only)
    print(gemv_runner.summary_line(s))
    assert s["mismatches"] > 0 and s["failed_tests"] == 1 and not gemv_runner.passed(s)
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "expected 0x" in log                                   # reported word by word, with its layer and row


def test_a_wrong_expected_word_and_a_wrong_status_are_reported(tmp_path):
    def break_plan(plan):
        corners_only(plan)
        layer = plan["jobs"][0]["layers"][3]                       # cancellation-and-zero-blocks
        layer["vectors"][0]["expect"][5] ^= 1                      # one bit of one word
        plan["jobs"][-1]["cases"][3]["error"] = None               # the first NaN vector, said to be good

    s = gemv_runner.run(SOP4, "icarus", quick=True, seed=1, build_dir=tmp_path / "build", plan_edit=break_plan)
    print(gemv_runner.summary_line(s))
    assert s["mismatches"] == 1 and s["status_errors"] >= 1 and s["failed_tests"] == 1
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "cancellation-and-zero-blocks vector 0 row 5" in log and "status errors case 3" in log


@pytest.mark.slow
def test_bf16_quick_regression_icarus(tmp_path):
    """The BF16 engine's quick plan: 40 real MiniLM rows with real activations rounded to BF16, the
    corners (the largest BF16 activations, subnormal ones, a block column on the block dot unit's slow
    path), the term unit's rounding cases and the window's edge (sim/gemv_runner.py's two BF16 layers),
    NaN and Inf vectors (``make sim`` runs it in both simulators; slow: the BF16 engine's Verilog is
    larger)."""
    s = gemv_runner.run(CONFIGS["gemv-sop4-g16-bf16"], "icarus", quick=True, seed=1, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] == s["expected"] > 280 and s["counted"] == 3 * 19 and s["layers"] == 13 + 2 + 8
