"""The GEMV engines' full cocotb plans in Verilator (sim/gemv_runner.py, sim/tb_gemv.py): every named
engine and the small-FPGA one, a whole MiniLM layer with real activations and every corner. Slow;
a file of its own so that it runs beside tests/test_cocotb_gemv.py (the quick plans) on another
worker. In Icarus the full plans are `make sim`'s (about 100 s an engine).
"""

import pytest

from sop.sim import gemv_runner

ENGINES = gemv_runner.engines()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENGINES))
def test_full_regression_verilator(name, tmp_path):
    """A whole MiniLM layer with real activations, every corner, in Verilator."""
    s = gemv_runner.run(ENGINES[name], "verilator", seed=2, build_dir=tmp_path / "build")
    print(gemv_runner.summary_line(s))
    assert gemv_runner.passed(s), gemv_runner.summary_line(s)
    assert s["checked"] > 1000
