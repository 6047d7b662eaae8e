"""Test-suite set-up: the project's tool environment (see sop.toolenv), Hypothesis's files (its
example database and its cache of constants) under ``build/hypothesis``: generated files stay out of
the tree; and, under pytest-xdist (``make test``: a worker per core), each worker's OpenMP and BLAS
thread pools at its share of the cores, where not set already: two workers' torch pools of one thread
per core each fought over the cores (the causal-LM tests on 2 cores: 41 s, 30 s at one thread a worker).
The variables reach the ``sop`` processes the tests start, too."""

import os

from hypothesis.configuration import set_hypothesis_home_dir

from sop import toolenv

toolenv.apply()
set_hypothesis_home_dir(str(toolenv.build_root() / "hypothesis"))

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def pytest_terminal_summary(terminalreporter):
    """Where Verilator cannot run (a checkout or working folder whose path has a space:
    toolenv.verilator_refusal), the reason under the results (-q hides the header): the tests that run
    Verilator fail there, the lint ones with Verilator's own "Can't exec", the cocotb ones with this line."""
    if why := toolenv.verilator_refusal(toolenv.build_root()):
        terminalreporter.write_line(f"note: {why}")
