"""The simulations of the generated Verilog against golden/: cocotb regressions, their runners, the
mutation runs, and the contract between a runner and its testbench.

* The decoder: ``runner`` (`make sim`) runs ``tb_decoder`` (driver, monitors, scoreboard) against
  ``model`` (the decoder as a transaction-level model), on ``stimulus``'s layers and host sequences
  (shared with the amaranth.sim harness) and ``vectors``' real layers; ``tb_axis`` is its AXI4-Stream
  shell's bench; ``sparse_stalls`` measures the residual path's stall rate; ``objcache`` keeps
  Verilator's run-time library objects for every later build (a standalone script, not imported).
* The GEMV engine: ``gemv_runner`` runs ``tb_gemv`` on the plans of ``gemv_layers``; ``tb_gemv_axis``
  is its AXI4-Stream shell's bench.
* The mutation scores: ``mutate`` with its testbench ``tb_mutants`` (the decoder, `make mutate`),
  ``gemv_mutate`` (the GEMV engine, its testbench in the same module).

The runner <-> testbench contract, defined here and nowhere else: a runner writes a plan (JSON)
and starts the simulator with the plan's path in the testbench's environment, ``SIM_PLAN`` for a
regression, ``MUT_PLAN`` for a mutation run (``sim_env``, ``mut_env``); the testbench reads it
(``read_plan``) and writes its summary, one JSON object, to the file ``SIM_REPORT`` names
(``write_report``), or its results, a JSON line per design, to the file ``MUT_RESULTS`` names
(``results_path``). Tables and operating points registered at run time in the runner's process travel in
``REGISTRATIONS`` (``registrations_env``), registered again by ``read_plan``. Plain Python: a testbench
imports it inside the simulator. The conventions every bench keeps (its clock, the quiet cycles after a
job, how many mismatches it logs) are here too.
"""

from __future__ import annotations

from sop import imported_as_subpackage

imported_as_subpackage(__name__)

import contextlib
import json
import os
from pathlib import Path

#: The environment variables a runner sets for its testbench: a regression's plan and report ...
SIM_PLAN, SIM_REPORT = "SOP_SIM_PLAN", "SOP_SIM_REPORT"
#: ... and a mutation run's plan and results.
MUT_PLAN, MUT_RESULTS = "SOP_MUT_PLAN", "SOP_MUT_RESULTS"

#: ... and the parent's run-time tables and operating points (``registrations_env``).
REGISTRATIONS = "SOP_SIM_REGISTRATIONS"

#: The simulators the runners drive (cocotb's names) and the program each needs on PATH.
SIMULATORS = {"icarus": "iverilog", "verilator": "verilator"}

#: Every bench's clock period (its timeouts are counted in these cycles) ...
CLOCK_NS = 10
#: ... the cycles after a job in which no output may come ...
QUIET_CYCLES = 12
#: ... and how many mismatches it logs one by one (the rest only counted).
MISMATCHES_LOGGED = 10


def registrations_env() -> dict[str, str]:
    """The tables and operating points registered in this process (``golden.points.registrations``), as
    JSON for a testbench: the simulator's Python starts from the modules as imported, where a point a
    script registered named no point (its vectors were refused, its GEMV engine's ``get_point`` failed;
    an outside probe). ``read_plan`` registers them there (``golden.points.adopt``)."""
    from sop.golden.points import registrations

    return {REGISTRATIONS: json.dumps(registrations())}


def sim_env(plan: Path, report: Path) -> dict[str, str]:
    """A regression's testbench environment (the runner's side): its plan and its report file."""
    return {SIM_PLAN: str(plan), SIM_REPORT: str(report), **registrations_env()}


def mut_env(plan: Path, results: Path) -> dict[str, str]:
    """A mutation run's testbench environment: its plan and its results file."""
    return {MUT_PLAN: str(plan), MUT_RESULTS: str(results), **registrations_env()}


@contextlib.contextmanager
def runner_owns_environment(seed: int | None):
    """While a runner's cocotb test runs: the variables it gives its testbench (the plan, the report or
    results, and the seed where it names one) taken out of this process's environment, which cocotb's
    runner lays over what it is given; an exported ``COCOTB_RANDOM_SEED`` replaced ``--seed``."""
    names = [SIM_PLAN, SIM_REPORT, MUT_PLAN, MUT_RESULTS, REGISTRATIONS]
    names += ["COCOTB_RANDOM_SEED"] if seed is not None else []
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def read_plan(variable: str = SIM_PLAN) -> dict:
    """The plan the runner wrote (the testbench's side): ``SIM_PLAN``'s, or ``MUT_PLAN``'s; the runner's
    run-time registrations are registered here first (``registrations_env``)."""
    if REGISTRATIONS in os.environ:
        from sop.golden.points import adopt

        adopt(json.loads(os.environ[REGISTRATIONS]))
    return json.loads(Path(os.environ[variable]).read_text())


def write_report(summary: dict) -> None:
    """A regression's summary into the report file the runner reads back."""
    Path(os.environ[SIM_REPORT]).write_text(json.dumps(summary))


def results_path() -> Path:
    """A mutation run's results file (JSON lines, appended as each design is decided)."""
    return Path(os.environ[MUT_RESULTS])
