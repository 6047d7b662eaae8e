"""The BF16-activation GEMV engine's quick cocotb plan in Verilator (sim/gemv_runner.py,
sim/tb_gemv.py): 40 MiniLM rows with real activations, without and with sparse residuals, every
corner layer back to back, the bad vectors, on the largest datapath (its term units and the block
dot unit's slow path). A file of its own so that it runs beside tests/test_cocotb_gemv.py (the
other engines' quick plans, in Icarus) on another worker. Every engine's full plan (whole MiniLM
layers) is `make sim`'s, in Icarus or Verilator, which keeps the suite under 20 minutes on two
cores: the quick plan builds Verilator's C++ unoptimized (sim/runner.build) and takes about half
the time of the full one.
"""

import pytest

from sop.sim import gemv_runner

ENGINES = gemv_runner.engines()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemv-sop4-g16-bf16"])
def test_quick_regression_verilator(name, tmp_path):
    """Every corner (the BF16 window's power-of-two drop, the subnormal barrier, the row adder's
    sticky and its cancellation to bit 2, ``ulp-cancel``, among them), and the timing job with its
    two BF16 layers (blocks at the window's edge, zero products far below it: all fast, back to
    back), in Verilator."""
    s = gemv_runner.run(ENGINES[name], "verilator", quick=True, seed=2, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] == s["expected"] > 800 and s["layers"] == 34 and s["entries"] > 450
