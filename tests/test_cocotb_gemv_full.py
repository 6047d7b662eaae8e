"""A GEMV engine's full cocotb plan in Verilator (sim/gemv_runner.py, sim/tb_gemv.py): a whole MiniLM
layer with real activations and every corner, on the BF16-activation engine (the largest datapath:
its term units and the block dot unit's slow path). Slow; a file of its own so that it runs beside
tests/test_cocotb_gemv.py (every engine's quick plan, in Icarus) on another worker. The other
engines' full plans are `make sim`'s, in Icarus or Verilator (about 100 s an engine in Icarus),
which keeps the suite under 20 minutes on two cores.
"""

import pytest

from sop.sim import gemv_runner

ENGINES = gemv_runner.engines()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemv-sop4-g16-bf16"])
def test_full_regression_verilator(name, tmp_path):
    """A whole MiniLM layer with real activations, every corner, in Verilator."""
    s = gemv_runner.run(ENGINES[name], "verilator", seed=2, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] > 1000
