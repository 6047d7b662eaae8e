"""The commands in a user's environment rather than a developer's terminal (an outside tester, 2026-12-07):
an ASCII locale, a reader gone, a full disk, a standard stream the shell closed, a working folder where no
build folder can be made. Each gives its output or one line, never a traceback (sop/terminal.py:
prepare_streams, finish_output, run_command; docs/robustness.md)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sop.cli import main

SOP = [sys.executable, "-m", "sop.cli"]
NON_UTF8 = b"lat\xe9"                    # a Latin-1 name: no UTF-8, so Python holds its byte as a surrogate escape


def _env(**changes):
    """The environment with standard output buffered as a user's is (this shell may set PYTHONUNBUFFERED),
    and ``changes`` (None: the variable removed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "PYTHONIOENCODING")}
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A folder holding toy.safetensors (a layer with a non-ASCII name) and its artifact toy.sopq."""
    folder = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal((16, 32)).astype(np.float32) for n in ("couche.\u00e9.weight", "plain.weight")},
              str(folder / "toy.safetensors"))
    assert main(["quantize", str(folder / "toy.safetensors"), "--format", "sop4-g16", "--no-calib", "--quiet",
                 "--out", str(folder / "toy.sopq")]) == 0
    np.save(folder / "x.npy", np.ones(32, np.float32))
    return folder


def _one_error_line(stderr: str, prog: str, *said: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith(f"{prog}: error: "), stderr
    assert all(s in stderr for s in said), stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("argv, prog", [
    (["formats"], "sop"), (["codebook", "nf4"], "sop"), (["codebook", "bf16"], "sop"), (["--help"], "sop"),
    (["eval", "--help"], "sop"), (["-m", "sop.hdl.generate", "--help"], "python -m sop.hdl.generate")])
def test_output_to_a_full_disk_is_one_line(argv, prog):
    """``> /dev/full``: `sop formats` was exit 0 with nothing written (the failed flush at exit was dropped),
    `sop codebook nf4` Python's ``Exception ignored ... OSError`` and exit 120, `--help` exit 0 (argparse
    drops a failed write); `sop codebook bf16` (its buffer filled and written in the middle of the command)
    ``[Errno 28] No space left on device``, which named no file."""
    cmd = [sys.executable, *argv] if argv[0] == "-m" else SOP + argv
    with open("/dev/full", "w") as full:
        run = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, env=_env(), timeout=120)
    assert run.returncode == 2
    _one_error_line(run.stderr, prog, "standard output: No space left on device")


BENCHES = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


def test_every_bench_script_runs_as_a_command():
    """The benches' scripts ended in ``sys.exit(main())`` or ``main()``: ``> /dev/full`` a traceback or
    exit 0 with nothing written; each now ends in ``run_command`` as the ``python -m`` tools do."""
    assert len(BENCHES) >= 14
    tails = {p.name: p.read_text().rstrip().splitlines()[-2:] for p in BENCHES}
    assert {n: t for n, t in tails.items()
            if t != ['if __name__ == "__main__":', f'    run_command("python bench/{n}", main)']} == {}
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "bench/sim_speed.py", "--help"], stdout=full, stderr=subprocess.PIPE,
                             text=True, env=_env(), timeout=120, cwd=BENCHES[0].parents[1])
    assert run.returncode == 2
    _one_error_line(run.stderr, "python bench/sim_speed.py", "standard output: No space left on device")


@pytest.mark.parametrize("argv", [["-m", "sop.hdl.generate", "--help"], ["-m", "sop.sim.runner", "--help"]])
def test_a_reader_gone_is_exit_141_and_no_message(argv):
    """``python -m sop.hdl.generate --help | true``: 'Exception ignored ... BrokenPipeError', exit 120."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()                                         # the reader is gone before the tool writes
    code = proc.wait(timeout=120)
    with proc.stderr:
        assert (code, proc.stderr.read()) == (141, b"")


#: every ``python -m`` command of the project (README, the Makefile, docs/): each goes through run_command
MODULE_TOOLS = ("sop.hdl.generate", "sop.sim.runner", "sop.sim.gemv_runner", "sop.sim.tb_gemv_axis",
                "sop.sim.mutate", "sop.sim.gemv_mutate", "sop.sim.sparse_stalls", "sop.synth",
                "sop.synth.flow.bitstream", "sop.synth.host.bringup", "sop.synth.host.gemv_bringup", "sop.demo_llm")


@pytest.mark.parametrize("argv, prog", [(["formats"], "sop")] + [(["--help"], f"python -m {m}") for m in MODULE_TOOLS])
def test_a_closed_standard_output_is_one_line(argv, prog):
    """``sop formats >&-``: an AttributeError traceback (``sys.stdout`` is None) after printing nothing."""
    module = "sop.cli" if prog == "sop" else prog.removeprefix("python -m ")
    run = subprocess.run(["bash", "-c", f'exec "$0" -m {module} "$@" >&-', sys.executable, *argv],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 2
    _one_error_line(run.stderr, prog, "standard output is closed")


def test_a_closed_standard_error_keeps_error_lines_out_of_the_output():
    """``sop codebook nope 2>&- | ...``: with ``sys.stderr`` None, ``print(..., file=sys.stderr)`` wrote the
    error line into standard output, among the data a pipe reads."""
    run = subprocess.run(["bash", "-c", 'exec "$0" -m sop.cli codebook nope 2>&-', sys.executable],
                         stdout=subprocess.PIPE, env=_env(), timeout=120)
    assert (run.returncode, run.stdout) == (2, b"")


@pytest.mark.parametrize("fd, redirect", [(0, "<&-"), (2, "2>&-")])
def test_a_closed_standard_stream_is_dev_null_in_a_child_process_too(fd, redirect):
    """The /dev/null opened on a closed fd 0 or 2 (``prepare_streams``) was close-on-exec where it took the
    fd's own number (os.open's rule): a child process (a simulator, the --jobs fork server) started with the
    stream closed all the same, and its first file took the number."""
    code = ("import subprocess\nfrom sop.terminal import prepare_streams\nprepare_streams('sop')\n"
            f"print(subprocess.run(['readlink', '/proc/self/fd/{fd}'], stdout=subprocess.PIPE).stdout.decode())")
    run = subprocess.run(["bash", "-c", f'exec "$0" -c "$1" {redirect}', sys.executable, code],
                         stdout=subprocess.PIPE, text=True, env=_env(), timeout=120)
    assert (run.returncode, run.stdout.strip()) == (0, os.devnull)


@pytest.mark.parametrize("env, shown", [
    # LC_ALL=C: standard output ASCII, and the argument's UTF-8 bytes decoded as surrogate escapes (the layer
    # was "not a layer"); then the name printed was a UnicodeEncodeError (exit 2 after writing Y)
    ({"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}, b"couche.\\xe9.weight"),
    ({"PYTHONIOENCODING": "ascii"}, b"couche.\\xe9.weight"),
])
def test_a_non_ascii_layer_in_an_ascii_locale_is_selected_and_printed(toy, tmp_path, env, shown):
    run = subprocess.run(SOP + ["gemv", str(toy / "toy.sopq"), "--layer", "couche.\u00e9.weight", "--x",
                                str(toy / "x.npy"), "--out", str(tmp_path / "y.npy")],
                         capture_output=True, env=_env(**env), timeout=120)
    assert (run.returncode, run.stderr) == (0, b""), run.stderr
    assert run.stdout.startswith(b"wrote " + bytes(tmp_path / "y.npy") + b": y = W x of " + shown + b" (16 x 32")


def test_a_file_name_not_in_utf8_is_printed_as_it_is_on_disk(toy, tmp_path):
    """A file named in Latin-1 under a strict UTF-8 standard output: `wrote ...` was a UnicodeEncodeError
    ('surrogates not allowed'), exit 2 after the artifact was written."""
    out = bytes(tmp_path) + b"/" + NON_UTF8 + b".sopq"
    run = subprocess.run(SOP + ["quantize", str(toy / "toy.safetensors"), "--format", "sop4-g16", "--no-calib",
                                "--quiet", "--out", os.fsdecode(out)],
                         capture_output=True, env=_env(PYTHONIOENCODING="utf-8"), timeout=120)
    assert (run.returncode, run.stderr) == (0, b""), run.stderr
    assert run.stdout.startswith(b"wrote " + out + b": sop4-g16, 2 layers")


def test_a_report_of_a_json_named_in_undecodable_bytes(toy, tmp_path, capsys):
    """`sop report` of an eval JSON whose name is no UTF-8: the markdown naming it was a UnicodeEncodeError
    ('surrogates not allowed'), exit 2 and no report."""
    assert main(["eval", str(toy / "toy.safetensors"), "--format", "sop4-g16", "--no-calib", "--no-e2e", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    capsys.readouterr()
    json_path = bytes(tmp_path) + b"/" + NON_UTF8 + b".json"
    os.rename(tmp_path / "e.json", json_path)
    run = subprocess.run(SOP + ["report", os.fsdecode(json_path)], capture_output=True, env=_env(), timeout=120)
    assert (run.returncode, run.stderr) == (0, b""), run.stderr
    assert b"Source: `" + NON_UTF8 + b".json`." in (tmp_path / os.fsdecode(NON_UTF8 + b".md")).read_bytes()


@pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus is not installed")
def test_a_build_folder_the_runner_cannot_make_is_one_line(tmp_path):
    """``python -m sop.sim.runner`` where build/sim cannot be made (a read-only working folder; here a file
    named build): an OSError traceback from pathlib's mkdir."""
    (tmp_path / "build").write_text("")
    run = subprocess.run([sys.executable, "-m", "sop.sim.runner", "--quick", "--config", "sop4-g16"], cwd=tmp_path,
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 2
    _one_error_line(run.stderr, "python -m sop.sim.runner", str(tmp_path / "build"), "Not a directory")
