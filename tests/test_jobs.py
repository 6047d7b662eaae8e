"""`--jobs N` (quantize/jobs.py): layers quantized in worker processes give the bytes of `--jobs 1`
(the .sopq of every record kind, the eval JSON but its timings, calibrated and end to end on
MiniLM), errors come back in layer order as one line, a dying worker is a clear error and no
hang, a worker alive but stuck (sleeping, stopped) ends the run at its layer's time limit with
one line and nothing written, a bad --jobs value or SOP_LAYER_TIMEOUT is refused before any
work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli_run import run
from sop.quantize import job_server
from sop.quantize import jobs as J
from sop.quantize.evaluate import evaluate


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Seven layers of several shapes: float32 and bfloat16, a width that is no multiple of 16
    (padded), a transposed Conv1D."""
    d = tmp_path_factory.mktemp("jobs")
    g = torch.Generator().manual_seed(5)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    save_file({"h.0.attn.q.weight": w(64, 128), "h.0.attn.k.weight": w(32, 128),
               "h.0.mlp.up.weight": w(160, 128).to(torch.bfloat16), "h.0.mlp.down.weight": w(128, 160),
               "h.1.attn.q.weight": w(64, 120), "h.1.c_attn.weight": w(128, 96),
               "h.1.mlp.up.weight": w(96, 64).to(torch.bfloat16), "h.1.norm.weight": w(128)},
              str(d / "model.safetensors"))
    return d / "model.safetensors"


FORMATS = ["sop4-g16", "e2m3-ue4m4-g16", "nf4-g64", "fp8-e4m3-pot"]


def without_timings(doc: dict) -> dict:
    for f in doc["formats"].values():
        f.pop("seconds")
    return doc


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_with_two_jobs_writes_the_same_bytes(model, tmp_path, fmt):
    outs = []
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}.sopq"
        assert run(["quantize", str(model), "--format", fmt, "--out", str(out), "--quiet", "--jobs", str(jobs)]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".sopq"]      # no spool or temporary left


def test_eval_with_two_jobs_gives_the_same_json(model, tmp_path):
    docs = []
    for jobs in (1, 3):
        out = tmp_path / f"j{jobs}.json"
        argv = ["eval", str(model), "--json", str(out), "--quiet", "--jobs", str(jobs)]
        for f in FORMATS:
            argv += ["--format", f]
        assert run(argv) == 0
        docs.append(without_timings(json.loads(out.read_text())))
    assert docs[0] == docs[1]
    assert len(docs[0]["formats"]["sop4-g16"]["layers"]) == 7


def test_minilm_calibrated_end_to_end_with_two_jobs(tmp_path):
    """Calibration statistics go to the workers and the float32 reconstructions come back for
    the end-to-end check: the same JSON."""
    kw = dict(include=["encoder.layer.5.attention.*"], cache_dir=tmp_path / "calib", progress=False)
    one = evaluate("minilm", ["sop4-g16", "nf4-g64"], **kw)
    two = evaluate("minilm", ["sop4-g16", "nf4-g64"], jobs=2, **kw)
    assert one["calibration"]["weighted"] and one["formats"]["sop4-g16"]["e2e"]["cos_mean"] > 0.99
    assert not one["calibration"].pop("cached") and two["calibration"].pop("cached")    # the same statistics
    assert without_timings(one) == without_timings(two)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_jobs_value_is_one_error_line(model, tmp_path, capsys, value):
    out = tmp_path / "x.sopq"
    assert run(["quantize", str(model), "--format", "nf4-g64", "--out", str(out), "--jobs", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "--jobs" in err and "\n" not in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="^jobs must be a positive integer, got 0$"):     # Python's name there
        evaluate(str(model), ["nf4-g64"], jobs=0, progress=False)


def test_a_layer_error_comes_back_as_with_one_job(tmp_path, capsys):
    w = np.random.default_rng(1).standard_normal((4, 32, 64)).astype(np.float32) * 0.02
    w[2, 3, 5] = np.nan
    path = tmp_path / "nan.safetensors"
    save_file({f"l.{i}.fc.weight": torch.from_numpy(w[i]) for i in range(4)}, str(path))
    errs = []
    for jobs in ("1", "2"):
        out = tmp_path / f"{jobs}.sopq"
        assert run(["quantize", str(path), "--format", "sop4-g16", "--out", str(out), "--quiet",
                    "--jobs", jobs]) == 2
        errs.append(capsys.readouterr().err.strip())
        assert not out.exists() and not list(tmp_path.glob("*.records*"))
    assert errs[0] == errs[1] and "l.2.fc.weight: non-finite weight nan at row 3, column 5" in errs[0]


def square(x, delay):
    """A task: (x squared, [an array of x]) after ``delay`` seconds (later items finish first)."""
    import time

    time.sleep(delay)
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x, [np.full((3, 2), x, dtype=np.float32)]


def test_results_come_in_order_and_the_first_error_in_order_is_raised():
    with J.LayerPool(2) as pool:
        got = list(pool.map(square, [(1, 0.3), (2, 0.0), (3, 0.1), (4, 0.0)]))
    assert [m for m, _ in got] == [1, 4, 9, 16]
    assert all(a[0].dtype == np.float32 and (a[0] == x).all() for x, (_, a) in zip((1, 2, 3, 4), got))
    with J.LayerPool(2) as pool, pytest.raises(ValueError, match="negative -1"):
        list(pool.map(square, [(-1, 0.3), (-2, 0.0)]))


def quantized_in_worker(fmt: str, w):
    """A task: ``fmt``'s quantization of ``w`` in a worker: (its bits, [its reconstruction])."""
    from sop.quantize.schemes import get_quant_format

    r = get_quant_format(fmt).quantize(w)
    return r.bits, [r.recon]


def empty_range_and_half(n):
    """A task: (n, [an empty array, the n integers from 0, n / 2 as an array of no dimension])."""
    return n, [np.empty((0, 3), dtype=np.float32), np.arange(n, dtype=np.int64), np.array(n / 2)]


def test_an_empty_or_0_d_array_comes_back_as_it_was():
    """A result with an array of no elements (a zero in its shape) was a TypeError in the worker and in this
    process (``memoryview.cast`` refuses such a view), an internal error; one of no dimension came back with
    one (``np.ascontiguousarray`` gives at least one)."""
    with J.LayerPool(2) as pool:
        got = list(pool.map(empty_range_and_half, [(0,), (3,)]))
    assert [m for m, _ in got] == [0, 3]
    assert [[(a.shape, a.dtype, a.tolist()) for a in arrays] for _, arrays in got] == [
        [((0, 3), np.float32, []), ((0,), np.int64, []), ((), np.float64, 0.0)],
        [((0, 3), np.float32, []), ((3,), np.int64, [0, 1, 2]), ((), np.float64, 1.5)]]


def test_a_point_and_table_registered_at_run_time_reach_the_workers():
    """A worker starts from the modules as imported: a point a script registered (with its own table)
    was "unknown format" there, so `quantize_model(..., jobs=2)` failed where jobs=1 worked (an outside probe)."""
    from sop.golden.codebooks import registered_codebook
    from sop.golden.formats import get_format
    from sop.golden.layout import BlockLayout
    from sop.golden.points import OperatingPoint, registered
    from sop.quantize.schemes import get_quant_format

    w = np.random.default_rng(2).standard_normal((4, 64))
    with registered_codebook("probe4", np.tanh(np.linspace(-2, 2, 16))), \
            registered(OperatingPoint("probe4-g16", BlockLayout(4, 16, get_format("ue4m4")), "d",
                                      codebooks=("probe4",))):
        here = get_quant_format("probe4-g16").quantize(w)
        with J.LayerPool(1) as pool:
            ((bits, (recon,)),) = list(pool.map(quantized_in_worker, [("probe4-g16", w)]))
    assert bits == here.bits and np.array_equal(recon, here.recon)


def test_a_worker_opens_the_selection_the_parent_opened(tmp_path):
    """Every option of ``open_model`` reaches the workers (``opened_with``): a worker that dropped
    ``routers`` would not know a router the parent selected (`--include-routers --jobs 2`)."""
    from sop.quantize.models import open_model

    save_file({"m.0.moe.gate.weight": torch.ones(4, 16), "m.0.moe.experts.0.w1.weight": torch.ones(8, 16),
               "lm_head.weight": torch.ones(8, 16)}, tmp_path / "m.safetensors")
    for lm_head, routers in ((False, False), (True, True)):
        src = open_model(str(tmp_path / "m.safetensors"), lm_head=lm_head, routers=routers)
        names = [lay.name for lay in J.source(src.opened_with).layers]
        assert names == [lay.name for lay in src.layers] and len(names) == 1 + lm_head + routers


def which_worker(x, delay):
    """A task: (this worker's pid, []) after ``delay`` seconds."""
    import time

    time.sleep(delay)
    return os.getpid(), []


def test_workers_run_ahead_of_a_slow_item_only_when_asked():
    """With ``ahead``, a worker done with a small item takes the next ones while a slow item before them
    is worked on (``sop eval`` without the end-to-end check: its results are a few numbers); by default
    (results of a layer's size) it waits, so that no result is held here while an earlier one is
    worked on."""
    items = [(0, 2.0), (1, 0.0), (2, 0.0), (3, 0.0)]
    for ahead, fast_on_one in ((None, False), (4, True)):
        with J.LayerPool(2) as pool:
            if pool.jobs < 2:
                pytest.skip("one CPU")
            pids = [pid for pid, _ in pool.map(which_worker, items, ahead=ahead)]
        assert pids[0] not in pids[1:2]                 # the slow item and the first fast one: two workers
        assert (len(set(pids[1:])) == 1) == fast_on_one, (ahead, pids)


def test_a_worker_takes_the_forward_pass_the_parent_found(monkeypatch):
    """A worker reopens the parent's selection without deciding its forward pass again (for a GGUF that
    imported transformers' architecture table, about 2 s in every worker): ``opened_with`` carries it."""
    from sop.quantize import models
    from sop.quantize.models import open_model

    src = open_model("minilm", ["*.attention.*"])

    def decided_again(*args):
        raise AssertionError("the worker decided the forward pass again")

    monkeypatch.setattr(models, "_forward_of", decided_again)
    monkeypatch.setattr(J, "_SOURCE", {})
    again = J.source(src.opened_with)
    assert (again.forward, again.forward_note, again.bert_folder) == (src.forward, src.forward_note, src.bert_folder)
    assert src.forward == "bert" and src.bert_folder is not None
    assert [lay.name for lay in again.layers] == [lay.name for lay in src.layers]


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """The workers, forked from the fork server that ``job_server.start`` started while the model was opened,
    do not run the caller's script again (``python script.py`` with no ``if __name__ == "__main__"``
    guard; they prepare themselves from the parent's ``__main__``): the script's work is done once."""
    script = tmp_path / "no_guard.py"
    script.write_text("from sop.quantize.evaluate import evaluate\n"
                      "print('started', flush=True)\n"
                      "evaluate('minilm', ['nf4-g64'], include=['encoder.layer.0.*'], calibrate=False, e2e=False,\n"
                      "         progress=False, jobs=2)\n"
                      "print('done', flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["started", "done"]


@pytest.mark.parametrize("argv, jobs", [
    (["eval", "minilm", "--format", "sop4-g16", "--jobs", "2"], 2), (["quantize", "m", "--jobs=3", "--out", "x"], 3),
    (["eval", "minilm", "--jobs", "1"], 1), (["eval", "minilm"], 1), (["report", "r.json", "--jobs", "2"], 1),
    (["--help"], 1), ([], 1), (["eval", "m", "--jobs", "two"], 1), (["eval", "m", "--jobs"], 1),
    (["eval", "m", "--", "--jobs", "2"], 1)])
def test_the_jobs_of_a_command_line_are_guessed_without_the_parser(argv, jobs):
    """``sop.launch`` starts the fork server for `sop eval` / `sop quantize` with ``--jobs`` of 2 or
    more, read before the parser (and numpy) is imported; what it cannot read is 1 (no early start)."""
    assert job_server.jobs_asked(argv) == jobs


def _in_a_fresh_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    """``code`` run by a new Python in a session of its own (a signal to its group reaches no test), with
    this one's path and ``tmp_path`` (where a fork server, which takes PYTHONPATH, finds a test's module)."""
    script = tmp_path / "s.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
                          start_new_session=True)


def test_the_fork_server_starts_before_numpy_is_imported(tmp_path):
    """``start_for`` (the ``sop`` console script's first step) starts the server with the standard library
    alone: its imports of the quantizer run while `sop` imports its own; ``--jobs 1`` starts none."""
    r = _in_a_fresh_python(
        "import sys\nimport multiprocessing.forkserver as fs\nfrom sop.quantize import job_server\n"
        "job_server.start_for(sys.argv[1:] or ['eval', 'minilm', '--jobs', '1'])\n"
        "one = fs._forkserver._forkserver_pid\n"
        "job_server.start_for(['eval', 'minilm', '--format', 'sop4-g16', '--jobs', '2'])\n"
        "print(one is None, fs._forkserver._forkserver_pid is not None, 'numpy' in sys.modules)\n", tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True", "False"], r.stderr
    # a closed standard stream (2>&-): not before `sop` has opened /dev/null on it (the server's socket
    # took its number, in the server too)
    r = _in_a_fresh_python(
        "import os, sys\nimport multiprocessing.forkserver as fs\nfrom sop.quantize import job_server\n"
        "os.close(2)\njob_server.start_for(['eval', 'minilm', '--jobs', '2'])\n"
        "print(fs._forkserver._forkserver_pid is None)\n", tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["True"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads a process's descriptors in /proc")
def test_a_closed_standard_stream_leaves_the_fork_server_to_the_pool(tmp_path):
    """`sop eval ... --jobs 2 <&-` (or ``2>&-``): the server, started before `sop` opened the closed stream
    on /dev/null (sop.terminal.prepare_streams), took the socket it listens on as its standard input (or
    error), and its workers a closed one, which their first file then took. It is started by the pool
    then, after the streams are made safe, and inherits /dev/null."""
    if J.usable_cpus() < 2:
        pytest.skip("one CPU: no server")
    r = _in_a_fresh_python(
        "import os\nos.close(0)\nimport multiprocessing.forkserver as fs\nfrom sop.quantize import job_server\n"
        "job_server.start_for(['eval', 'minilm', '--format', 'sop4-g16', '--jobs', '2'])\n"
        "early = fs._forkserver._forkserver_pid\n"
        "from sop.terminal import prepare_streams\nprepare_streams('sop')\njob_server.start(2)\n"
        "print(early is None, os.readlink(f'/proc/{fs._forkserver._forkserver_pid}/fd/0'))\n", tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["True", os.devnull], (r.stdout, r.stderr)


def test_ctrl_c_while_the_fork_server_imports_is_no_traceback(tmp_path):
    """A Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the fork server imported
    the quantizer stopped the server with a ``KeyboardInterrupt`` traceback after `sop`'s one line: the
    server starts with SIGINT blocked, the parent alone handles it. (Here the server's first import
    says it has begun and then takes 2 s, so that the signal reaches it inside its imports.)"""
    began = tmp_path / "began"
    (tmp_path / "slow_import.py").write_text(f"import pathlib, time\npathlib.Path({str(began)!r}).touch()\n"
                                             "time.sleep(2)\n")
    r = _in_a_fresh_python(
        "import os, signal, time\nfrom sop.quantize import job_server\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)   # (ignored in a pytest-xdist worker)\n"
        "job_server.PRELOAD = ['slow_import', *job_server.PRELOAD]\n"
        "job_server.start(2)\n"
        "try:\n"
        f"    for _ in range(6000):\n        if os.path.exists({str(began)!r}):\n            break\n"
        "        time.sleep(0.01)\n"
        "    os.killpg(0, signal.SIGINT)\n    time.sleep(10)\n"
        "except KeyboardInterrupt:\n    print('interrupted', flush=True)\n    time.sleep(2.5)\n", tmp_path)
    assert r.stdout.split() == ["interrupted"] and "Traceback" not in r.stderr, r.stderr


def test_a_pool_starts_no_more_workers_than_cpus(monkeypatch):
    """--jobs 100000 once started processes until the machine stalled: a pool is capped at the CPUs."""
    assert 1 <= J.usable_cpus() <= (os.cpu_count() or 1)
    monkeypatch.setattr(J, "usable_cpus", lambda: 1)
    with J.LayerPool(10**5) as pool:
        assert pool.jobs == 1 and len(pool.workers) == 1
        assert [m for m, _ in pool.map(square, [(2, 0.0), (3, 0.0)])] == [4, 9]


def test_one_usable_cpu_quantizes_without_a_pool(model, tmp_path, monkeypatch):
    """`sop quantize --jobs 8` on one usable CPU (``taskset -c 0``, a one-CPU container) started the fork server
    and a pool of one worker, this process waiting on it, where `sop eval` lowers --jobs first and runs none."""
    from sop.quantize import artifact

    for module in (artifact, J, job_server):
        monkeypatch.setattr(module, "usable_cpus", lambda: 1, raising=False)

    def no_pool(jobs):
        raise AssertionError(f"a pool of {jobs}")

    monkeypatch.setattr(artifact, "LayerPool", no_pool)
    out = tmp_path / "x.sopq"
    assert run(["quantize", model, "--format", "nf4-g64", "--out", out, "--jobs", "8", "--quiet", "--no-calib"]) == 0
    assert out.exists()


def test_a_large_jobs_is_lowered_before_the_memory_estimate(tmp_path, capsys):
    """`sop eval --jobs 100000` was refused for memory (879 GiB: a layer search per job), where the
    docs say a large N is lowered to the usable CPUs without a word (an outside review)."""
    out = tmp_path / "e.json"
    assert run(["eval", "minilm", "--format", "fp8-e4m3-pot", "--jobs", "100000", "--no-calib", "--include",
                "encoder.layer.0.attention.self.query.weight", "--json", str(out), "--quiet"]) == 0, \
        capsys.readouterr().err
    assert json.loads(out.read_text())["formats"]["fp8-e4m3-pot"]["e2e"] is not None


def test_a_dying_worker_is_a_clear_error_not_a_hang(capsys):
    with J.LayerPool(2) as pool, pytest.raises(J.WorkerError) as exc:
        list(pool.map(os._exit, [(3,), (0,)], label=lambda i: f"layer {i}"))
    msg = str(exc.value)
    assert "died while working on layer" in msg and "exit status" in msg, msg
    assert pool.workers == []                     # every worker ended


def test_a_worker_that_dies_idle_is_the_same_clear_error(no_hang):
    """A worker killed while it waited (the parent calibrating, or between two layers) broke the next send's
    pipe: the BrokenPipeError reached `sop` as a closed stdout, exit 141 and no word (an outside review)."""
    import signal

    with J.LayerPool(2) as pool, pytest.raises(J.WorkerError) as exc:
        os.kill(pool.workers[1].process.pid, signal.SIGKILL)
        pool.workers[1].process.join(10)
        list(pool.map(square, [(1, 0.0), (2, 0.0), (3, 0.0)], label=lambda i: f"layer {i}"))
    assert "died before it took layer" in str(exc.value) and "SIGKILL" in str(exc.value), exc.value
    assert pool.workers == []


def test_a_worker_that_cannot_start_is_a_worker_error(monkeypatch):
    """A process start failing (the forkserver gone: EOFError) came out as an internal error, exit 70."""
    ctx = job_server.context()

    def broken(*a, **k):
        raise EOFError("unexpected EOF")

    monkeypatch.setattr(type(ctx.Process(target=print)), "start", broken)
    with pytest.raises(J.WorkerError, match=r"could not start \(EOFError: unexpected EOF\)"):
        J.LayerPool(2)
    # the fork server that cannot start (no socket in a read-only temporary folder): the same one line
    monkeypatch.undo()

    def no_socket(*_):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(J, "ensure_server", no_socket)
    with pytest.raises(J.WorkerError, match=r"could not start \(OSError: \[Errno 30\] Read-only file system\)"):
        J.LayerPool(2)


def test_sop_budget_options_on_two_jobs_give_the_same_bytes_and_json(model, tmp_path, capsys):
    outs, docs = [], []
    for jobs in (1, 2):
        out, js = tmp_path / f"j{jobs}.sopq", tmp_path / f"j{jobs}.json"
        assert run(["quantize", str(model), "--format", "sop-budget", "--budget", "5", "--out", str(out),
                    "--no-calib", "--jobs", str(jobs)]) == 0
        err = capsys.readouterr().err
        assert err.count("sop-budget options [") == 7, err           # one progress line per layer
        assert run(["eval", str(model), "--format", "sop-budget", "--budget", "5", "--json", str(js),
                    "--no-calib", "--quiet", "--jobs", str(jobs)]) == 0
        outs.append(out.read_bytes())
        docs.append(without_timings(json.loads(js.read_text())))
    assert outs[0] == outs[1]
    assert docs[0] == docs[1]


# -- a worker that is alive but stuck --------------------------------------------------------------

def sleep_forever(*args):
    """A task that never ends (a worker alive but stuck)."""
    import time

    time.sleep(3600)


def stop_self(*args):
    """A task whose worker stops itself (SIGSTOP: alive, never answering)."""
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)


@pytest.fixture
def no_hang():
    """Turn a hang into a failure (the code under test should never need it)."""
    import signal

    def fail(*_):
        raise AssertionError("the run hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("task", [sleep_forever, stop_self])
def test_a_stuck_worker_is_stopped_at_its_time_limit(monkeypatch, no_hang, task):
    monkeypatch.setenv("SOP_LAYER_TIMEOUT", "1.5")
    with J.LayerPool(2) as pool, pytest.raises(J.WorkerError) as exc:
        list(pool.map(task, [(1,), (2,)], label=lambda i: f"layer {i}"))
    msg = str(exc.value)
    assert msg.startswith("a jobs worker process (pid ")           # Python's name: `sop quantize` says --jobs
    assert "was still working on layer 0 after" in msg and "SOP_LAYER_TIMEOUT=1.5" in msg, msg
    assert "nothing was written" in msg and "\n" not in msg
    assert pool.workers == []                     # every worker ended, the stopped one too


@pytest.mark.parametrize("fmt,task", [("sop4-g16", "layer_task"), ("sop-budget", "budget_layer")])
def test_a_stuck_worker_ends_the_run_with_one_line_and_nothing_written(model, tmp_path, capsys, monkeypatch,
                                                                        no_hang, fmt, task):
    from sop.quantize import artifact

    monkeypatch.setenv("SOP_LAYER_TIMEOUT", "2")
    monkeypatch.setattr(J, task, sleep_forever)   # the workers run it in place of the layer's task
    for module in (artifact, J):                  # workers on one CPU too (--jobs is lowered to the CPUs)
        monkeypatch.setattr(module, "usable_cpus", lambda: 2)
    out = tmp_path / "x.sopq"
    budget = ["--budget", "5"] if fmt == "sop-budget" else []
    assert run(["quantize", model, "--format", fmt, *budget, "--out", out, "--jobs", "2",
                "--quiet", "--no-calib"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sop: error: a --jobs worker process (pid ") and err.count("\n") == 1, err
    assert "was still working on h.0.attn.k.weight after" in err          # the first layer in order
    assert not any(tmp_path.iterdir())            # no artifact, no spool, no temporary


def test_a_large_item_for_a_worker_stopped_idle_is_stopped_at_its_time_limit(monkeypatch, no_hang):
    """An item larger than the pipe's buffer (a large layer's calibration statistics: 88 kB for 11008 inputs)
    sent to a worker stopped while idle (SIGSTOP) waited in the send, where no time limit is checked: a hang."""
    import signal

    monkeypatch.setenv("SOP_LAYER_TIMEOUT", "1.5")
    with J.LayerPool(2) as pool, pytest.raises(J.WorkerError) as exc:
        os.kill(pool.workers[0].process.pid, signal.SIGSTOP)
        list(pool.map(square, [(np.zeros(1 << 17), 0.0), (2, 0.0)], label=lambda i: f"layer {i}"))
    assert "was still working on layer 0 after" in str(exc.value), exc.value
    assert pool.workers == []                     # the stopped worker ended too


def test_the_time_limit_grows_with_the_layer_and_can_be_set(monkeypatch):
    """The documented default: 5 minutes plus 50 s per million weights; SOP_LAYER_TIMEOUT sets
    one limit for every layer; anything but a positive number is refused."""
    assert J.layer_limit(0) == 300 and J.layer_limit(2_000_000) == 400
    assert J.layer_limit(58_720_256) > J.layer_limit(1_000_000)
    assert J.layer_limit(58_720_256, override=7.0) == 7.0
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv("SOP_LAYER_TIMEOUT", bad)
        with pytest.raises(ValueError, match="SOP_LAYER_TIMEOUT must be a positive number of seconds"):
            J.limit_override()


def test_a_bad_time_limit_is_one_error_line_before_any_work(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOP_LAYER_TIMEOUT", "ten")
    out = tmp_path / "x.sopq"
    assert run(["quantize", model, "--format", "sop4-g16", "--out", out, "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "sop: error: SOP_LAYER_TIMEOUT must be a positive number of seconds, got 'ten'\n"
    assert not any(tmp_path.iterdir())


def test_a_worker_whose_parent_is_gone_ends_quietly(capfd):
    """The parent killed outright (SIGKILL, the OOM killer) while a worker quantized a layer: the worker's
    reply met a closed pipe, and each worker printed a double BrokenPipeError traceback on the terminal."""
    ctx = job_server.context()
    parent, child = ctx.Pipe(duplex=True)
    p = ctx.Process(target=J._worker, args=(child, "numpy"), daemon=True)
    p.start()
    child.close()
    parent.send((0, divmod, (7, 2)))            # its result is no (meta, arrays): the error reply is sent
    parent.close()                              # the parent gone before the worker replies
    p.join(60)
    assert p.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def test_a_fork_server_that_cannot_start_early_is_left_to_the_pool(monkeypatch):
    """``job_server.start`` (before the model is opened) only saves time: a server that cannot start there
    (no socket: OSError) was the command's error without saying what failed; the pool's one line says it."""
    tried = []

    def no_socket(*_):
        tried.append(True)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(job_server, "ensure_server", no_socket)
    monkeypatch.setattr(job_server, "usable_cpus", lambda: 2)
    job_server.start(2)                         # tried, and nothing raised
    assert tried == [True]


# -- Ctrl-C as `sop` starts, a low open-file limit (an adversarial review) ---------------------------

def test_ctrl_c_as_sop_cli_is_imported_is_one_line(tmp_path):
    """A Ctrl-C in the import machinery as ``sop.launch`` imports ``sop.cli`` (before sop.cli's own try
    runs; here a finder raises it) was a ``KeyboardInterrupt`` traceback: it is `sop`'s one line."""
    r = _in_a_fresh_python(
        "import sys\n"
        "class CtrlC:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'sop.cli':\n            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\nsys.argv = ['sop', 'formats']\n"
        "from sop.launch import INTERRUPTED_STARTING, entry\nprint(INTERRUPTED_STARTING, flush=True)\nentry()\n",
        tmp_path)
    assert r.returncode == 130 and r.stderr == r.stdout, r.stderr       # the line, and nothing else
    assert r.stderr.startswith("sop: interrupted (SIGINT) while starting")


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask") or not job_server.has_server(),
                    reason="a fork server, and signal masks")
@pytest.mark.parametrize("threads", ["", "import numpy  # its BLAS threads\n"])
def test_ctrl_c_while_the_fork_server_is_spawned_is_raised(tmp_path, threads):
    """SIGINT was ignored while the fork server was spawned (its imports must not see a Ctrl-C): one that came
    in those milliseconds was lost, and `sop` ran on to the end and wrote its file. Blocked instead (the server
    inherits the mask), it is raised here: after the spawn (one thread: `sop`'s early start) or at once (numpy's
    threads take it). Here it is sent in the middle of the spawn. A worker has it unblocked."""
    (tmp_path / "task.py").write_text("def cube(x):\n    return x ** 3, []\n")
    r = _in_a_fresh_python(
        f"import os, signal\n{threads}from multiprocessing import util\nfrom sop.quantize import job_server\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)   # (ignored in a pytest-xdist worker)\n"
        "spawn, sent = util.spawnv_passfds, []\n"
        "def ctrl_c_inside(path, args, fds):\n"
        "    if 'forkserver' in repr(args) and not sent:\n        sent.append(1)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return spawn(path, args, fds)\n"
        "util.spawnv_passfds = ctrl_c_inside\n"
        "try:\n    job_server.ensure_server(2)\n    print('ran on')\nexcept KeyboardInterrupt:\n"
        "    print('interrupted')\n"
        "import task\nfrom sop.quantize import jobs\njobs.usable_cpus = lambda: 2\n"
        "with jobs.LayerPool(2) as pool:\n"
        "    assert [m for m, _ in pool.map(task.cube, [(2,), (3,)])] == [8, 27]     # each worker set up\n"
        "    for w in pool.workers:\n"
        "        status = open(f'/proc/{w.process.pid}/status').read()\n"
        "        blocked = int(status.split('SigBlk:')[1].split()[0], 16)\n"
        "        print('blocked' if blocked & (1 << (signal.SIGINT - 1)) else 'unblocked')\n", tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["interrupted", "unblocked", "unblocked"], (r.stdout, r.stderr)


@pytest.mark.skipif(not job_server.has_server(), reason="the fork server's descriptors")
@pytest.mark.parametrize("hard", ["14", "resource.getrlimit(resource.RLIMIT_NOFILE)[1]"])
def test_a_low_open_file_limit_is_raised_or_one_line(tmp_path, hard):
    """``ulimit -n 14``: the fork server ran out of descriptors as it started a worker and died with a
    traceback of its own beside `sop`'s line. The limit is raised to what the pool needs where the hard limit
    allows it (the pool runs), else the pool's one line says so."""
    (tmp_path / "task.py").write_text("def cube(x):\n    return x ** 3, []\n")
    r = _in_a_fresh_python(
        "import resource\nfrom sop.quantize import jobs\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (14, {hard}))\n"
        "jobs.usable_cpus = lambda: 4\n"
        "import task\n"
        "try:\n    with jobs.LayerPool(4) as pool:\n"
        "        print([m for m, _ in pool.map(task.cube, [(x,) for x in range(6)])])\n"
        "except jobs.WorkerError as err:\n    print(err)\n", tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    if hard == "14":
        assert r.stdout.startswith("a jobs worker process could not start (OSError: 4 workers need 44 open files, "
                                   "and the limit is 14 (ulimit -n; its hard limit 14))"), r.stdout
    else:
        assert r.stdout.split("\n")[0] == "[0, 1, 8, 27, 64, 125]", r.stdout


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="signal masks")
@pytest.mark.parametrize("blocked_before", [False, True])
def test_sigint_blocked_leaves_the_mask_as_it_found_it_whatever_happens(blocked_before):
    """``sigint_blocked`` unblocked SIGINT on the way out even where its caller had it blocked (a caller's
    critical section then took a Ctrl-C it had kept pending): the mask it found is restored, after an
    exception inside the block too."""
    import signal

    found = signal.pthread_sigmask(signal.SIG_BLOCK if blocked_before else signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with job_server.sigint_blocked():
                assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
                raise RuntimeError("inside")
        assert (signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())) == blocked_before
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, found)


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="signal masks")
def test_sigint_blocked_blocks_it_in_a_thread_that_is_not_the_main_one():
    """A pool made from another thread (a notebook's or a GUI's worker) spawned its fork server with SIGINT
    open (the block was skipped outside the main thread, a rule for handlers, not masks): its imports could
    end in a ``KeyboardInterrupt`` traceback of their own. The calling thread's mask is blocked there too."""
    import signal
    import threading

    seen = []

    def spawn_here():
        with job_server.sigint_blocked():
            seen.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()))
        seen.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set()))

    thread = threading.Thread(target=spawn_here)
    thread.start()
    thread.join(10)
    assert seen == [True, False]
