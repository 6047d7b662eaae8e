"""Verilator's run-time library objects, compiled once and reused by every later build (``OBJCACHE``).

Every Verilator build of a cocotb bench (sim/runner.py ``build``) compiles the same run-time library
beside the design: ``verilated.cpp``, ``verilated_vpi.cpp``, ``verilated_dpi.cpp`` and
``verilated_threads.cpp`` from the installed Verilator, about 13 s of C++ a build whatever the
design (`make test` builds seven Verilator models, `make sim SIM=verilator` one per configuration).
Verilator's makefile puts ``$(OBJCACHE)`` in front of each compile command (ccache, where it is
installed); ``build`` names this script there, which runs a command unchanged unless it compiles one
source file from outside the build folder (the library's, from the installed package) into an
object. Such an object is stored under ``CACHE`` with the dependency file the compiler's ``-MMD``
writes, keyed by the command (flags, defines, optimization) and the source's bytes; it is reused
while every file of that dependency list still has the bytes it had (ccache's "direct mode"). A
dependency inside the build folder (cocotb's ``verilator.cpp`` includes the design's ``Vtop.h``)
makes the object uncacheable: it is compiled every time.

    python -S objcache.py CACHE COMPILER ARGS...

Standard library only (make runs it once per C++ file); entries are written to a temporary folder
and renamed into place, so two builds at once (pytest-xdist's workers) never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cacheable(args: list[str], cwd: Path) -> tuple[Path, Path] | None:
    """(object, source) of a command that compiles one C++ file from outside ``cwd`` into an object
    with a dependency file (``-c -o X.o /abs/file.cpp -MMD``); None for any other command."""
    if "-c" not in args or "-MMD" not in args or args.count("-o") != 1:
        return None
    out = args[args.index("-o") + 1]
    sources = [a for a in args[1:] if a.endswith((".cpp", ".cc", ".c"))]
    if not out.endswith(".o") or len(sources) != 1:
        return None
    source = Path(sources[0])
    if not source.is_absolute() or source.resolve().is_relative_to(cwd) or not source.is_file():
        return None
    return Path(out), source


def dependencies(dep_file: Path) -> list[str]:
    """The prerequisites of the one rule in a ``-MMD`` dependency file (make syntax, ``\\`` continued)."""
    text = dep_file.read_text().replace("\\\n", " ")
    _, _, rest = text.partition(": ")
    return rest.split()


def key(args: list[str], source: Path) -> str:
    """The command (the compiler as it resolves on ``PATH``, with its size and time: another compiler
    is another key) and the source's bytes."""
    compiler = shutil.which(args[0]) or args[0]
    st = os.stat(compiler) if os.path.exists(compiler) else None
    who = [os.path.realpath(compiler), st.st_size if st else 0, st.st_mtime_ns if st else 0]
    return hashlib.sha256(json.dumps([who, args, digest(source)]).encode()).hexdigest()


def lookup(entry: Path, out: Path, dep_file: Path) -> bool:
    """Copy the cached object and dependency file into place if every dependency is unchanged."""
    try:
        manifest = json.loads((entry / "deps.json").read_text())
        if any(not os.path.isfile(p) or digest(Path(p)) != h for p, h in manifest.items()):
            return False
        for name, target in (("object.o", out), ("deps.d", dep_file)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copyfile(entry / name, tmp)
            os.replace(tmp, target)
        return True
    except (OSError, ValueError):
        return False


def store(entry: Path, out: Path, dep_file: Path, cwd: Path) -> None:
    """Keep the object just compiled, unless a dependency lies in the build folder (or is relative)."""
    deps = dependencies(dep_file)
    if not deps or any(not os.path.isabs(p) or Path(p).resolve().is_relative_to(cwd) for p in deps):
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        shutil.copyfile(out, tmp / "object.o")
        shutil.copyfile(dep_file, tmp / "deps.d")
        (tmp / "deps.json").write_text(json.dumps({p: digest(Path(p)) for p in deps}))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)      # stale: a dependency changed since
        os.rename(tmp, entry)
    except OSError:
        pass                                               # another build stored it first: fine
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    cache, args = Path(argv[0]), argv[1:]
    cwd = Path.cwd().resolve()
    found = cacheable(args, cwd)
    if found is None:
        os.execvp(args[0], args)                           # as if make had run it
    out, source = found
    dep_file = out.with_suffix(".d")
    entry = cache / key(args, source)
    if lookup(entry, out, dep_file):
        return 0
    rc = subprocess.call(args)
    if rc == 0 and out.is_file() and dep_file.is_file():
        store(entry, out, dep_file, cwd)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
