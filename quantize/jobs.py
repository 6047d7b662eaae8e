"""Layers quantized in parallel worker processes: ``--jobs N`` of `sop eval` and `sop quantize`.

Role: ``LayerPool(jobs)`` starts ``jobs`` worker processes (multiprocessing's ``forkserver``
start method where the platform has it, else ``spawn``: never a plain ``fork`` of a process that
may hold threads), and ``pool.map(fn, argss)`` runs ``fn(*args)`` for each item on them and
yields the results **in item order**, so that whatever the caller builds from them (a ``.sopq``,
an eval JSON) is the bytes ``--jobs 1`` builds. The task functions here (``layer_task``, ``budget_layer``) open
the checkpoint itself (``open_model(*src.opened_with)``, once per
worker, with the forward pass the parent found: not decided again) and read only the layer they are
given; the parent sends a layer name and its calibration statistics, never weights. The fork server they
are forked from, and its early start, are quantize/job_server.py's.

Contract.

* **Identical results.** A task is the computation the serial loop does
  (``layer_loop.quantize_layer``) on the same inputs; the quantizers are
  deterministic and independent of the thread count (their chunk threads write disjoint slices).
* **Bounded memory.** At most ``jobs`` items are in flight or waiting to be consumed: a new one is
  sent only when the oldest result has been handed on. Peak memory is about ``jobs`` times the
  single-process peak of the largest layer (docs/benchmarks.md) plus the results held. A caller whose
  results are a few numbers (``sop eval`` without the end-to-end check: no arrays) lets the workers
  run ahead of the oldest result (``map``'s ``ahead``): a worker done with a small layer takes the
  next one while a large one ahead of it is still worked on, where it waited.
  Large arrays come back as raw bytes into a preallocated array (``Connection.send_bytes`` /
  ``recv_bytes_into``), not through pickle, so the parent holds each once.
* **One core per worker.** Each worker runs its chunk loop inline (``SOP_THREADS=1``) and
  limits BLAS / OpenMP / torch to one thread: ``jobs`` workers use ``jobs`` cores. A pool never
  starts more workers than the CPUs the process may use (``usable_cpus``): a larger ``--jobs``
  gets that many (the results are the same for any count).
* **No hang, clear errors.** Every wait polls with a timeout (``POLL`` seconds) and watches each
  busy worker's process sentinel: a worker that dies (killed for memory, a crash) raises
  ``WorkerError`` naming the layer and the exit status, and the other workers are ended. A worker
  that is alive but stuck (stopped, deadlocked, swapping) is caught by a per-layer time limit
  (``layer_limit``: ``LIMIT_BASE`` seconds plus ``LIMIT_PER_WEIGHT`` per weight of the layer, 5 min
  plus 50 s per million weights, about 15 times what the slowest format takes on a loaded 2-core
  machine; ``SOP_LAYER_TIMEOUT=S`` makes it S seconds for every layer): past it, ``WorkerError``
  says which layer and how long, every worker is ended and nothing is written. Sending an item and
  reading a result are bounded by the same limit (a thread), so a worker stopped while idle (an item
  over the pipe's buffer) or halfway through sending cannot hang the parent either. An
  exception inside a task comes back as its message and is raised in the parent, in item order
  (the first failing layer, as ``--jobs 1`` would report it), as the same kind (``ValueError``,
  ``OSError``, ``MemoryError``; anything else as ``RuntimeError`` with the worker's traceback as a
  note). Workers ignore SIGINT: Ctrl-C reaches the parent, which ends them; leaving the pool
  (``close`` or ``with``) ends every worker, politely when idle, by ``terminate``/``kill``
  after a timeout or on an exception.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from sop.quantize.inputs import command_line, on_command_line, option
from sop.quantize.job_server import (SINGLE_THREAD_ENV, context, ensure_server, has_server, sigint_blocked,
                                     usable_cpus, worker_environment)

#: Seconds between checks of the busy workers' health while waiting for a result.
POLL = 1.0
#: Seconds a worker gets to exit after being told to, before it is terminated.
EXIT_TIMEOUT = 10.0
#: A layer's time limit on a worker: this many seconds plus LIMIT_PER_WEIGHT per weight.
LIMIT_BASE = 300.0
#: Seconds per weight of a layer's time limit (50 s per million weights: the sop4-g16 search runs
#: at 0.4 to 2.5 M weights/s per core, sop-budget's options at about 0.3 to 0.9).
LIMIT_PER_WEIGHT = 50e-6
#: Environment variable: every layer's time limit in seconds, instead of the scaled default.
LIMIT_ENV = "SOP_LAYER_TIMEOUT"


class WorkerError(RuntimeError):
    """A worker process died or could not start (`sop` prints it as one ``sop: error:`` line)."""


def limit_override() -> float | None:
    """``SOP_LAYER_TIMEOUT`` as seconds (None when unset); anything but a positive number is a
    ValueError naming it."""
    text = os.environ.get(LIMIT_ENV)
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{LIMIT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def layer_limit(weights: int | None, override: float | None = None) -> float:
    """Seconds a worker may spend on one item of ``weights`` weights (see the module docstring)."""
    if override is not None:
        return override
    return LIMIT_BASE + LIMIT_PER_WEIGHT * max(0, int(weights or 0))


def check_jobs(jobs) -> int:
    """``jobs`` as a positive int; anything else is a ``ValueError`` naming it as its caller did: ``jobs``
    from Python, ``--jobs`` from the command line (``inputs.option``)."""
    if isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer)) or jobs < 1:
        raise ValueError(f"{option('jobs')} must be a positive integer, got {jobs!r}")
    return int(jobs)


# -- the worker side ---------------------------------------------------------------------------

def _single_thread() -> None:
    """One thread for everything this worker runs (see the module docstring)."""
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        from sop.quantize import blockwise

        blockwise.THREADS = 1                # read at call time: the chunk loop runs inline
    except ImportError:                      # pragma: no cover - the package is broken anyway
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)                 # BLAS / OpenMP pools numpy already started
    except ImportError:                      # pragma: no cover - threadpoolctl comes with the deps
        pass
    if "torch" in sys.modules:               # imported later otherwise: OMP_NUM_THREADS holds then
        sys.modules["torch"].set_num_threads(1)


def _kind(err: BaseException) -> str:
    for kind, cls in (("value", ValueError), ("os", OSError), ("memory", MemoryError)):
        if isinstance(err, cls):
            return kind
    return "other"


def _worker(conn, dev: str = "numpy", regs: dict | None = None, cli: bool = False) -> None:
    """A worker's loop: receive ``(index, fn, args)``, send back ``fn(*args)``; ``None`` ends it.
    ``dev``: the parent's ``--device`` (quantize/device.py); ``regs``: its run-time tables and points
    (``golden.points.registrations``: a worker starts from the modules as imported, where a point a
    script registered was an "unknown format"; an outside probe, --jobs 2); ``cli``: the parent runs
    inside ``inputs.command_line()`` (a context variable no process inherits: a refusal a worker raises
    must name the command's options, as one raised in the parent does)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the parent's to handle
    if hasattr(signal, "pthread_sigmask"):              # blocked as the server started (sigint_blocked):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})     # not for what this process may start
    _single_thread()
    from sop.quantize import device

    device.set_default(dev)
    from sop.golden.points import adopt

    if regs is not None:
        adopt(regs)
    with command_line() if cli else contextlib.nullcontext():
        _serve(conn)


def _serve(conn) -> None:
    """``_worker``'s loop, in the worker's settings."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):                     # the parent is gone
            return
        if msg is None:
            return
        index, fn, args = msg
        try:
            meta, arrays = fn(*args)
            arrays = [np.asarray(a, order="C") for a in arrays]     # (ascontiguousarray made a 0-d array 1-d)
            conn.send((index, "ok", meta, [(a.shape, a.dtype.str) for a in arrays]))
            for a in arrays:                            # raw bytes: no pickled copy on either side
                conn.send_bytes(_raw(a))
            del meta, arrays
        except BaseException as err:                    # noqa: BLE001 - every failure goes back
            try:
                conn.send((index, "error", (_kind(err), str(err) or type(err).__name__, type(err).__name__,
                                            traceback.format_exc()), []))
            except OSError:                             # the parent is gone (killed outright: it was a
                return                                  # double traceback from each worker on its stderr)


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a flat uint8 view of it (no copy) that a pipe sends or fills:
    ``memoryview(a).cast("B")`` refused an empty array (a zero in its shape), a TypeError on both sides."""
    return a.reshape(-1).view(np.uint8)


# -- the parent side ---------------------------------------------------------------------------

def _exit_text(code) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit status {code}"


def _raise_task_error(kind: str, message: str, type_name: str, tb: str):
    if kind == "value":
        raise ValueError(message)
    if kind == "os":
        raise OSError(message)
    if kind == "memory":
        raise MemoryError(message)
    err = RuntimeError(f"{type_name}: {message}")
    err.add_note(f"in a {option('jobs')} worker process:\n{tb}")
    raise err


@contextlib.contextmanager
def _caller_main_hidden():
    """While a worker starts, ``__main__`` is an empty module: spawn and forkserver would otherwise
    run the caller's main script again in the worker (``python script.py`` without an
    ``if __name__ == "__main__"`` guard would start its work there). The workers need nothing of it:
    their tasks live in sop's modules."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


@dataclass
class _Worker:
    process: Any                       # a multiprocessing Process of the pool's context
    conn: Connection
    item: int | None = None            # the item it is working on
    started: float = 0.0               # time.monotonic() when the item was sent
    limit: float = 0.0                 # seconds it may take (layer_limit)


_NOTHING = object()


class LayerPool:
    """``jobs`` worker processes; see the module docstring. Use as a context manager."""

    def __init__(self, jobs: int):
        from sop.golden import points
        from sop.quantize import device

        # One core per worker: more workers than CPUs only add processes and memory (and --jobs
        # 100000 would start processes until the machine stalls), never speed.
        self.jobs = min(check_jobs(jobs), usable_cpus())
        self.limit_override = limit_override()          # a bad SOP_LAYER_TIMEOUT: before any work
        ctx = context()
        regs = points.registrations()
        self.workers: list[_Worker] = []
        try:
            ensure_server(self.jobs)                    # Ctrl-C kept from it from its start (job_server.py)
            for i in range(self.jobs):
                parent, child = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_worker, args=(child, device.active(), regs, on_command_line()),
                                name=f"sop-job-{i}", daemon=True)
                spawned = contextlib.nullcontext() if has_server() else sigint_blocked()
                with worker_environment(), spawned, _caller_main_hidden():
                    p.start()
                child.close()
                self.workers.append(_Worker(p, parent))
        except Exception as err:                        # a process that could not start (the forkserver gone)
            self.close(abort=True)
            raise WorkerError(f"a {option('jobs')} worker process could not start ({type(err).__name__}: {err}); "
                              f"nothing was written; {option('jobs', '1')} runs without workers") from err
        except BaseException:
            self.close(abort=True)
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        self.close(abort=kind is not None)

    def map(self, fn, argss, label=str, weights=None, ahead: int | None = None):
        """Yield ``(meta, arrays)`` of ``fn(*args)`` for each ``args`` of ``argss``, in order.

        ``label(i)`` names item ``i`` in an error (a layer name); ``weights(i)`` is its size, which
        scales its time limit (``layer_limit``; without it each item has ``LIMIT_BASE`` seconds).
        ``ahead``: items sent but not yet handed on, at most (default ``jobs``: no result waits in
        this process while an earlier one is worked on; more only for results of a few numbers)."""
        ahead = self.jobs if ahead is None else max(self.jobs, int(ahead))
        argss = list(argss)
        n = len(argss)
        results: dict[int, tuple] = {}
        idle = list(self.workers)
        busy: list[_Worker] = []
        sent = done = 0
        while done < n:
            while idle and sent < n and sent - done < ahead:
                w = idle.pop(0)
                w.item, w.started = sent, time.monotonic()
                w.limit = layer_limit(None if weights is None else weights(sent), self.limit_override)
                # within the limit: an item over the pipe's 64 kB (a layer's calibration statistics) waited with
                # no end on a worker stopped idle; a broken pipe is one that died idle (no closed stdout here)
                msg = (sent, fn, argss[sent])
                self._within_limit(w, label, lambda: w.conn.send(msg), before=True)
                busy.append(w)
                sent += 1
            if done in results:
                status, meta, arrays = results.pop(done)
                done += 1
                if status == "error":
                    self.close(abort=True)
                    _raise_task_error(*meta)
                yield meta, arrays
                continue
            now = time.monotonic()
            timeout = min([POLL] + [max(0.0, w.started + w.limit - now) for w in busy])
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=timeout))
            for w in list(busy):
                if w.conn in ready:
                    index, status, meta, arrays = self._receive(w, label)
                    results[index] = (status, meta, arrays)
                    w.item = None
                    busy.remove(w)
                    idle.append(w)
                elif w.process.sentinel in ready:
                    self._died(w, label)
                elif time.monotonic() - w.started > w.limit:
                    self._stuck(w, label)

    def _receive(self, w: _Worker, label) -> tuple:
        """A result from ``w`` (whose pipe has data), read within the item's time limit
        (``_within_limit``): a worker stopped halfway through sending cannot hang this process."""
        def read():
            index, status, meta, specs = w.conn.recv()
            arrays = []
            for shape, dtype in specs:
                a = np.empty(shape, dtype=np.dtype(dtype))
                w.conn.recv_bytes_into(_raw(a))
                arrays.append(a)
            return index, status, meta, arrays

        return self._within_limit(w, label, read)

    def _within_limit(self, w: _Worker, label, talk, before: bool = False):
        """``talk()`` (a send to ``w`` or a read from it) run by a thread, its result; past the item's time
        limit ``w`` is stuck (``_stuck``: it is ended, which ends the thread too), a pipe that breaks or
        ends is ``w`` died (``_died``; ``before``: before it took its item), anything else is raised here."""
        box: dict = {}

        def run():
            try:
                box["result"] = talk()
            except (EOFError, OSError) as err:
                box["lost"] = err
            except BaseException as err:                # noqa: BLE001 - raised in the parent
                box["error"] = err

        thread = threading.Thread(target=run, name="sop-job-pipe", daemon=True)
        thread.start()
        thread.join(max(0.0, w.started + w.limit - time.monotonic()) + POLL)
        if thread.is_alive():
            self._stuck(w, label)
        if "lost" in box:
            self._died(w, label, before=before)
        if "error" in box:
            self.close(abort=True)
            raise box["error"]
        return box["result"]

    def _stuck(self, w: _Worker, label):
        item = label(w.item) if w.item is not None else "no item"
        spent, limit, pid = time.monotonic() - w.started, w.limit, w.process.pid
        self.close(abort=True)
        how = (f"{LIMIT_ENV}={limit:g}" if self.limit_override is not None else
               f"{LIMIT_BASE:g} s plus {LIMIT_PER_WEIGHT * 1e6:g} s per million weights; {LIMIT_ENV}=S sets "
               f"S seconds")
        raise WorkerError(f"a {option('jobs')} worker process (pid {pid}) was still working on {item} after "
                          f"{spent:.0f} s, its time limit ({limit:g} s: {how}); it was stopped and nothing was written")

    def _died(self, w: _Worker, label, before: bool = False):
        w.process.join(1.0)
        what = _exit_text(w.process.exitcode)
        item = label(w.item) if w.item is not None else "no item"
        self.close(abort=True)
        raise WorkerError(f"a {option('jobs')} worker process (pid {w.process.pid}) died "
                          f"{'before it took' if before else 'while working on'} {item} ({what}); "
                          f"nothing was written; fewer {option('jobs')} use less memory")

    def close(self, abort: bool = False) -> None:
        """End every worker: told to exit (``abort``: terminated at once), killed after a timeout."""
        for w in self.workers:
            if not abort and w.process.is_alive():
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + (0.0 if abort else EXIT_TIMEOUT)
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(2.0)
            if w.process.is_alive():                   # pragma: no cover - terminate is enough
                w.process.kill()
                w.process.join(2.0)
            w.conn.close()
        self.workers = []


# -- the tasks ---------------------------------------------------------------------------------

_SOURCE: dict = {}


def source(opened_with: tuple):
    """The model as the parent opened it, opened once in this worker (the last one kept)."""
    key = repr(opened_with)
    if key not in _SOURCE:
        from sop.quantize.models import open_model

        _SOURCE.clear()
        _SOURCE[key] = open_model(*opened_with)
    return _SOURCE[key]


def layer_task(opened_with: tuple, name: str, fmt_name: str, act, nan_policy: str, want: str | None):
    """One layer of `sop eval` / `sop quantize` in a worker: ``(LayerOutcome, arrays)``.

    ``want``: None (the statistics only), ``"recon"`` (also the float32 reconstruction, for the
    end-to-end check) or ``"record"`` (also the layer's ``.sopq`` record)."""
    from sop.quantize.layer_loop import layer_outcome

    return layer_outcome(source(opened_with), name, fmt_name, act, nan_policy, want)


def budget_layer(opened_with: tuple, name: str, act, nan_policy: str):
    """One layer's sop-budget options in a worker (quantize.schemes.budget_row):
    ``((LayerRow, real columns, real weights, seconds), [])``; the layer read and checked as the
    parent's ``layer_loop.budget_inputs`` reads it."""
    from sop.quantize.layer_loop import read_weight
    from sop.quantize.schemes import budget_row

    t0 = time.perf_counter()
    w = read_weight(source(opened_with), name, nan_policy)[0]
    row, cols, real = budget_row(name, w, act)
    return (row, cols, real, time.perf_counter() - t0), []
