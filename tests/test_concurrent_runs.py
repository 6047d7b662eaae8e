"""Two runs at once in one checkout (`make sim` in one terminal, a second `make sim` or `sop demo` in another):
the bench runners' build folders under build/sim/ are held by one run at a time, and a second run of the same
design there is refused in one line before any work, never given the other run's summary (sim/runner.py
``held_build_folder``; docs/vectors.md, "The regression")."""

import re
import shutil
import subprocess
import sys
import time

import pytest

from sop.sim import gemv_runner, runner

#: a child that imports everything first, then waits for the file ``go`` (both start their runs together)
#: and runs the decoder bench's command line; no MiniLM vectors (their quantization takes half a minute)
CHILD = ("import sys, time; from pathlib import Path; from sop.sim import runner; "
         "runner.minilm_vectors = lambda cfg, quick: None; print('ready', flush=True)\n"
         "while not Path('go').exists(): time.sleep(0.01)\n"
         "sys.exit(runner.main(sys.argv[1:]))")


def test_two_regressions_of_one_design_at_once_are_never_given_each_others_summary(tmp_path):
    """Two `python -m sop.sim.runner` of one configuration in one working folder shared
    build/sim/icarus/CONFIG: each wrote its plan, rebuilt the simulator and removed the report there, so one
    printed the other's summary, a pass of a run it never checked (its seed the other's: seen 2 times in
    3), or ended in a traceback (Icarus's sim.vvp gone under it). Now the second is refused in one line
    and the first checks its own run."""
    if shutil.which("iverilog") is None:
        pytest.skip("iverilog is not installed")
    seeds = [11, 22]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, "--config", "sop4-g16-x1", "--quick", "--seed", str(s)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in seeds]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        (tmp_path / "go").touch()
        done = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, done)
    for seed, code, (out, err) in zip(seeds, codes, done):
        if code == 0:                          # the run that held the folder: its own seed, its own pass
            assert re.search(rf"sop4-g16-x1 \[icarus, quick\]: [1-9]\d* vectors checked, 0 mismatches, .*"
                             rf"\(seed {seed}, ", out), out
            assert err == "", err
        else:                                  # the other: one line, before any run
            assert "summary" not in out, out
            folder = tmp_path.resolve() / "build" / "sim" / "icarus" / "sop4-g16-x1"
            assert re.fullmatch(rf"python -m sop\.sim\.runner: error: {re.escape(str(folder))}: another run "
                                rf"\(process \d+\) is simulating in this build folder; wait for it to end, or "
                                rf"run this one from another working folder \(its build/ is its own\)\n", err), err
    # the holder gone, the folder is free again (the lock goes with its process)
    with runner.held_build_folder(tmp_path / "build" / "sim" / "icarus" / "sop4-g16-x1"):
        pass


def test_an_engine_bench_in_a_held_folder_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """The GEMV engine's bench and its shell's (``gemv_runner.cli``) share the decoder bench's lock: a
    second run in a held folder says so in one line, exit 2, and builds nothing there."""
    if shutil.which("iverilog") is None:
        pytest.skip("iverilog is not installed")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path.resolve() / "build" / "sim" / "icarus" / "gemv-sop4-g16"
    folder.mkdir(parents=True)
    # another process holds the folder as a run does: flock on its lock file, its process id in it
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); "
                               "print('held', flush=True); time.sleep(60)", str(folder / runner.BUILD_LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        t0 = time.monotonic()
        assert gemv_runner.main(["--config", "gemv-sop4-g16", "--quick"]) == 2
        assert time.monotonic() - t0 < 10                  # refused, not waited on
    finally:
        holder.kill()
        holder.communicate()
    err = capsys.readouterr().err
    assert err == (f"python -m sop.sim.gemv_runner: error: {folder}: another run (process {holder.pid}) is "
                   f"simulating in this build folder; wait for it to end, or run this one from another working "
                   f"folder (its build/ is its own)\n"), err
    assert sorted(p.name for p in folder.iterdir()) == [runner.BUILD_LOCK]     # no rtl/, no plan, no build


@pytest.mark.parametrize("tool", ["mutate", "gemv_mutate"])
def test_a_mutation_run_into_a_held_folder_is_one_line_before_any_work(tool, tmp_path, capsys):
    """Two mutation runs into one folder (`make mutate` beside `python -m sop.sim.mutate --config X`, both
    into build/mutate) replaced each other's mutants, plan and results: the second is refused before it
    draws a mutant."""
    import importlib

    if shutil.which("iverilog") is None:
        pytest.skip("iverilog is not installed")
    out = tmp_path.resolve() / "mutate"
    main = importlib.import_module(f"sop.sim.{tool}").main
    with runner.held_build_folder(out):             # (flock: a second open file of this process conflicts too)
        assert main(["--mutants", "2", "--no-prove", "--sim", "icarus", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m sop.sim.{tool}: error: {out}: another run (process ") and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [runner.BUILD_LOCK]
