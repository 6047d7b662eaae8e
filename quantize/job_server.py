"""The fork server that ``--jobs`` workers are forked from (quantize/jobs.py), and starting it early.

Role: ``context()`` is the multiprocessing context of every ``LayerPool``: ``forkserver`` where the
platform has it (the server imports the quantizer once, ``PRELOAD``; each worker is a fork of it),
else ``spawn``; never a plain ``fork`` of a process that may hold threads. ``worker_environment()``
puts ``SINGLE_THREAD_ENV`` in the environment a worker or the server inherits as it starts.
``start(jobs)`` starts the server without waiting for it: its imports (a quarter of a second, the
whole of a worker's start) then run on another core while this process opens the model.
``start_for(argv)`` does it from a command line, before `sop` has imported anything heavy
(``sop.launch``).

Contract: this module imports nothing but the standard library (no numpy), so that starting the
server early costs the command nothing; a server started for a command that then stops before its
pool (a refusal, a usage error) ends with the process, silently; Ctrl-C during its imports is the
parent's alone (the server, and a spawned worker, start with SIGINT blocked, ``sigint_blocked``: the
server's imports stopped with a ``KeyboardInterrupt`` traceback after `sop`'s one line); a pool's open-file
limit is raised to what it needs, or refused in one line (``allow_open_files``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading

#: Modules the fork server imports once, before it forks any worker.
PRELOAD = ["sop.quantize.jobs", "sop.quantize.evaluate", "sop.quantize.artifact"]
#: Environment of a worker: one thread for sop's chunk loop, BLAS, OpenMP and torch.
SINGLE_THREAD_ENV = {"SOP_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                     "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
#: Open files a pool needs (``allow_open_files``): this many, plus so many per worker (its pipe and its
#: process's sentinel here, its status pipe in the server; measured: 16 workers failed at 56, ran at 64).
FILES_BASE, FILES_PER_WORKER = 32, 3
#: `sop` commands that start a pool for ``--jobs`` greater than 1.
POOL_COMMANDS = ("eval", "quantize")


def has_server() -> bool:
    """This platform starts workers from a fork server (else each is spawned afresh)."""
    return "forkserver" in mp.get_all_start_methods()


def context():
    """The context a pool starts its workers in (see the module docstring)."""
    if has_server():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or ``taskset``'s share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                      # no affinity call (macOS)
        return os.cpu_count() or 1


@contextlib.contextmanager
def worker_environment():
    """``SINGLE_THREAD_ENV`` in this process's environment while a worker or the fork server starts
    (each inherits it: numpy's BLAS reads it as the server imports it), restored after."""
    saved = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def sigint_blocked():
    """SIGINT blocked here while a process is spawned from this one, which inherits the mask through its
    exec: its imports, before it sets up its own handling (the fork server ignores SIGINT, ``_worker`` too,
    and unblocks it), cannot end in a ``KeyboardInterrupt`` traceback of its own. Here a Ctrl-C in those
    milliseconds is kept pending and raised after, or taken at once by another thread (numpy's): it was
    ignored here, and lost (`sop` ran on to the end and wrote its file). Where there are no signal masks
    (Windows) it is ignored instead, in the main thread only (the only one that may set a handler); a mask is
    the calling thread's, so any thread blocks it. The mask found is restored after, whatever happens: a
    caller's own block of SIGINT outlives the block (unblocking it delivered the caller's pending Ctrl-C
    inside the caller's critical section)."""
    if hasattr(signal, "pthread_sigmask"):
        found = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, found)
        return
    if threading.current_thread() is not threading.main_thread():     # pragma: no cover - no masks (Windows)
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)       # pragma: no cover - no masks (Windows)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def ensure_server(jobs: int) -> None:
    """The fork server running for ``jobs`` workers (started here if not, without waiting for its imports;
    ``allow_open_files`` first); nothing without one."""
    if not has_server():
        return
    from multiprocessing import forkserver, resource_tracker

    allow_open_files(jobs)
    context()                                           # its PRELOAD set: the server imports it as it starts
    with worker_environment():
        # the tracker first: its start unblocks SIGINT after it, which would end sigint_blocked's block early
        resource_tracker.ensure_running()
        with sigint_blocked():                          # (the server runs no main script: not in PRELOAD)
            forkserver.ensure_running()


def allow_open_files(jobs: int) -> None:
    """The open-file limit (``ulimit -n``) raised, up to its hard limit, to what ``jobs`` workers need
    (``FILES_BASE`` plus ``FILES_PER_WORKER`` each); an OSError saying so where the hard limit is lower.
    Below that the fork server ran out of descriptors as it started a worker and died with a traceback
    of its own beside `sop`'s error line (``ulimit -n 14``). The server and its workers inherit the limit
    this process has when the server starts."""
    try:
        import resource
    except ImportError:                                 # pragma: no cover - no such limit (Windows)
        return
    need = FILES_BASE + FILES_PER_WORKER * jobs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise OSError(f"{jobs} workers need {need} open files, and the limit is {soft} (ulimit -n; "
                      f"its hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def start(jobs: int) -> None:
    """``ensure_server`` now, where ``jobs`` (a checked count) workers will be started; nothing for
    fewer than 2 usable ones. It only saves time: a server that cannot start here (no socket can be
    made) is left to the pool, whose ``WorkerError`` says so in one line."""
    jobs = min(jobs, usable_cpus())
    if jobs >= 2:
        try:
            ensure_server(jobs)
        except Exception:                       # noqa: BLE001 - the pool tries again and reports it
            pass


def jobs_asked(argv: list[str]) -> int:
    """The ``--jobs`` of a `sop` command line that starts a pool (``POOL_COMMANDS``), else 1: read
    without the parser, as a guess (``--jobs N``, ``--jobs=N``; anything it cannot read is 1), since a
    wrong guess costs a server started for nothing or one started later, never a result."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] not in POOL_COMMANDS or "--" in argv:
        return 1
    for i, arg in enumerate(argv):
        value = arg[len("--jobs="):] if arg.startswith("--jobs=") else \
            argv[i + 1] if arg == "--jobs" and i + 1 < len(argv) else None
        if value is not None and value.isdigit():
            return int(value)
    return 1


def start_for(argv: list[str]) -> None:
    """``start`` for the ``--jobs`` of a `sop` command line (``jobs_asked``), where the standard streams
    are open: with one closed (``2>&-``) the server's socket would take its number, in the server too (its
    standard error then a socket), before `sop` opens /dev/null there (``sop.terminal.prepare_streams``);
    the pool starts the server after that instead."""
    from sop.terminal import closed_standard_streams     # (the standard library alone, as this module)

    jobs = jobs_asked(argv)
    if jobs > 1 and not closed_standard_streams():
        start(jobs)
