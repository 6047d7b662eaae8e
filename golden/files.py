"""Safe file output: targets checked before any work, atomic writes, the project's checksum, and the one
line for a file of another format version (``another_version``).

Every file the project writes goes through ``atomic_output`` (or ``write_atomic``).
The contract:

* **Never replace what is not ours to replace.** ``check_output(path, inputs)``
  refuses, before any work, a target that exists and is not a regular file (a
  device such as ``/dev/null``, a FIFO, a socket, a folder), a regular file that
  is the process's standard input, output or error (``--out /dev/stdout`` with
  ``>> log``: the rename would drop the file the shell opened), a target that is
  the same file as one of the command's inputs (``os.path.samefile`` on the path the
  write reaches: through symbolic and hard links, and through ``..`` after a folder
  still to be made), a file target written as a folder (``out/``: pathlib would drop the
  slash and write a file ``out``), and a target whose folder cannot be made. It makes nothing.
  ``atomic_output`` repeats the regular-file and standard-stream checks just before the rename, so
  no writer of the project can turn a device into a regular file. A target
  that is a symbolic link is written through it: the link stays, the file it
  names is replaced.
* **All or nothing.** The data goes to a temporary file in the target's folder,
  is flushed to disk, then renamed over the target, and the folder is flushed
  too: a reader sees the old file or the complete new one, never a partial one. If anything raises (Ctrl-C,
  and SIGTERM/SIGHUP, which ``signals_as_interrupts`` turns into exceptions for
  the CLI, included) the
  temporary file is removed and the target is left as it was. A replaced file keeps
  its permissions (a private 0600 file is not widened to the umask's 0644).
* **No litter.** A temporary file is named ``.<target name>.<pid>-<random>.sop-tmp``
  (the target name cut to ``NAME_KEEP`` bytes): plainly ours, and naming
  the process that writes it. A run killed outright (SIGKILL, power loss) leaves
  its temporary file behind; the next write to the same target removes every
  such file whose process is no longer running.

CRC-32 (zlib's, IEEE 802.3 polynomial) is the project's checksum for packed
streams and artifacts.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import types
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".sop-tmp"
NAME_KEEP = 120                 # bytes of the target name kept in a temporary file's name (of 255)


class OutputError(ValueError):
    """A target the project refuses to write: not a regular file, an input, or an impossible path."""


class InputError(ValueError):
    """An input path that is missing, or not a regular file (a folder, a FIFO, a device)."""


def input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file; ``InputError`` naming it otherwise.

    A FIFO or a device is refused rather than read: reading one can block forever."""
    if not isinstance(path, (str, os.PathLike)):    # from Python: None was pathlib's TypeError
        raise InputError(f"the {what} is given as {type(path).__name__}, not a path (str or os.PathLike)")
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: the {what} is {_kind(mode)}, not a regular file")
    return path


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def another_version(what: str, version: int, current: int, redo: str) -> str:
    """The one line for a file of another version than ``current`` of a format this project versions
    (layer stream, ``.sopq``, vector set): which side is newer and what to do, never "corrupted"."""
    if version < current:
        return f"{what} version {version}, written by an older sop (this one reads version {current}): {redo}"
    return (f"{what} version {version}, written by a newer sop (this one reads version {current}): read it with "
            f"that sop, or {redo}")


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


_STREAMS = ((0, "input"), (1, "output"), (2, "error output"))


def _refuse_non_regular(path: Path) -> None:
    try:
        st = os.stat(path)                      # follows symbolic links: the file that would be replaced
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(f"{path}: cannot check the output path: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: the output exists and is {_kind(st.st_mode)}; refusing to replace it "
                          f"with a regular file")
    # `--out /dev/stdout` with the output redirected to a file (`>> log`): the rename would put a new
    # file in the place of the one the shell opened, and what it held is lost
    for fd, what in _STREAMS:
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.fstat(fd)):
                raise OutputError(f"{path}: the output is this command's standard {what}, a file the "
                                  f"shell opened; refusing to replace it (give a file name)")


def _real_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: a symbolic link is followed, so that the link stays."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


#: an output folder given as the empty name, which pathlib reads as ``.`` (the files went into the working
#: folder): the refusal of ``check_output(folder=True)`` and of the tools' ``--out`` (``argtypes.out_folder``)
EMPTY_FOLDER_NAME = "'': an empty name; give the output folder's name ('.' for the working folder)"


def refuse_folder_name(path: str | os.PathLike, wanted: str) -> None:
    """``OutputError`` for a file target written as a folder (``out/``, ``out/.``, ``..``, or the empty
    name, which pathlib reads as ``.``): pathlib drops the slash and the ``.``, and the write would
    make (or replace) a file ``out``. ``wanted``: what to give instead."""
    name = os.fspath(path)
    if not name:
        raise OutputError(f"'': an empty name; give {wanted}")
    last = os.path.basename(name)
    if name.endswith(os.sep) or last in (".", ".."):
        raise OutputError(f"{name}: names a folder (it ends with {os.sep if name.endswith(os.sep) else last}); "
                          f"give {wanted}")


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                 folder: bool = False, option: str = "--out") -> Path:
    """Refuse a target before any work (see the module docstring); returns it as a Path.

    ``inputs``: every file the command reads. ``folder``: the target is a folder
    the command writes files into (``sop vectors --out DIR``), not a file. ``option``: how
    the caller gave the target, for the refusal's "choose another": a tool's ``--out``, a
    Python function's keyword (``quantize_model``'s ``out``: its caller has no ``--out``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"the output is given as {type(path).__name__}, not a path (str or os.PathLike)")
    if not folder:
        refuse_folder_name(path, "the output file's name")
    elif not os.fspath(path):                   # pathlib's '.': the files went into the working folder
        raise OutputError(EMPTY_FOLDER_NAME)
    path = Path(path)
    if folder:                                  # checked, not made: a refused run leaves no folder behind
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: the output folder exists and is not a folder")
    else:
        _refuse_non_regular(path)
    # The file the write will reach: '..' after a folder the writer is still to make ('new/../in')
    # leads back out of it, as the kernel resolves it once the folder exists; realpath (not strict)
    # resolves the same way, so compare that, not the path as written.
    reached = os.path.realpath(path)
    for src in inputs:
        with contextlib.suppress(OSError):      # an input that does not exist cannot be overwritten
            if os.path.samefile(reached, src):
                raise OutputError(f"{path}: the output is the input {src}; refusing to overwrite an "
                                  f"input (choose another {option})")
    parent = path if folder else _real_target(path).parent
    existing = nearest_existing(parent)
    if not existing.is_dir():
        raise OutputError(f"{path}: cannot create the output folder: {existing} is not a folder")
    if existing == parent:                      # a real probe: os.access says yes to root everywhere
        try:
            with tempfile.NamedTemporaryFile(prefix=".sop-probe.", suffix=TEMP_SUFFIX, dir=parent):
                pass
        except OSError as err:
            raise OutputError(f"{path}: cannot write there: {err.strerror or err}") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write there: {existing} is not writable")
    return path


def _temp_prefix(name: str) -> str:
    kept = name                                 # cut to NAME_KEEP bytes, on a character's boundary
    while len(os.fsencode(kept)) > NAME_KEEP:
        kept = kept[:-1]
    return f".{kept}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                    # another user's process: running
        return True
    return True


def reclaim_temps(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files (and ``staging_folder``s) of writes to ``folder/name`` whose
    process has died; returns them."""
    removed = []
    for p in glob.glob(glob.escape(str(folder / _temp_prefix(name))) + "*" + TEMP_SUFFIX):
        middle = Path(p).name[len(_temp_prefix(name)):-len(TEMP_SUFFIX)]
        pid = middle.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
                removed.append(Path(p))
    return removed


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back within the block and raised again when it ends, each to the
    handler it had: for a short change in memory that must happen whole or not at all (a model's
    parameters written back). Python's handlers are swapped, not the thread's signal mask: a signal
    sent to the process reaches whichever thread does not block it (torch's own), and Python runs
    the handler in the main thread. Outside the main thread (no handler can be set) the block runs
    unchanged."""
    caught: list[int] = []
    old: dict = {}
    try:
        for s in _DEFERRED:
            old[s] = signal.signal(s, lambda number, _frame: caught.append(number))
    except ValueError:                                   # not the main thread
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


#: A write that fails for want of room: said as the target's error (the OSError names no file).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_room(err: BaseException, target: Path) -> OutputError | None:
    """The target's one-line error where ``err`` says the disk or a quota is full: an OSError naming no
    file, or another library's error that carries the system's (safetensors' ``SafetensorError`` while a
    model folder is saved: ``I/O error: No space left on device (os error 28)``); else None."""
    if isinstance(err, OSError):
        why = err.strerror if err.errno in _NO_ROOM and err.filename is None else None
    else:
        m = re.search(r"\(os error (\d+)\)", str(err))
        why = os.strerror(int(m[1])) if m and int(m[1]) in _NO_ROOM else None
    return None if why is None else OutputError(f"{target}: {why}; nothing was written (the target is as it was)")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _resolved(folder: Path) -> Path:
    """The folder an output goes into, symbolic links followed even where they lead to a folder not made
    yet (a file output writes through a link to a missing file alike; mkdir on the link says EEXIST)."""
    return Path(os.path.realpath(folder))


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else the nearest of its parents that does (what a folder to be made
    would be made in)."""
    missing = _missing_folders(path)
    return missing[0].parent if missing else path


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write made (innermost first), where they are still empty."""
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


def _mode_for(target: Path) -> int:
    """The permissions of a new file for ``target``: those of the file it replaces (a private file
    stays private), else the usual ones (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode) & 0o777      # the permission bits, no set-id
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def temp_file_in(folder: Path, name: str, target: Path | None = None) -> Iterator[tuple[BinaryIO, Path]]:
    """A temporary file for ``folder/name``, with the permissions of the file it replaces (or the
    usual ones); removed if the block raises, with the folders made for it (where still empty). A
    full disk is an ``OutputError`` naming ``target`` (default ``folder/name``: the file the
    temporary one is for).

    Stale temporary files of earlier, killed writes to the same name are removed first."""
    made = _missing_folders(_resolved(folder))
    target = target or folder / name
    try:
        _resolved(folder).mkdir(parents=True, exist_ok=True)
        reclaim_temps(folder, name)
    except OSError as err:
        raise OutputError(f"{target}: cannot write there: {err.strerror or err}") from None
    # The signals that unwind a run are held back from the file's creation until the
    # clean-up below is armed, so that no interrupt lands between the two.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    tmp = None
    try:
        try:
            fd, path = tempfile.mkstemp(prefix=_temp_prefix(name) + f"{os.getpid()}-", suffix=TEMP_SUFFIX,
                                        dir=folder)
        except OSError as err:
            raise OutputError(f"{target}: cannot write there: {err.strerror or err}") from None
        tmp = Path(path)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.fchmod(fd, _mode_for(folder / name))  # mkstemp makes 0600
        with os.fdopen(fd, "w+b") as f:
            yield f, tmp
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _remove_empty(made)
        full = _no_room(err, target)
        if full is not None:
            raise full from None
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target``, named as a temporary file for it is, for files another
    library makes (a model folder's ``save_pretrained``) before they are written into place; removed
    with its content when the block ends, and the folders made for it where still empty if the
    block raises. A killed run's folder is removed by the next write to ``target`` (``reclaim_temps``)."""
    target = Path(target)
    made = _missing_folders(_resolved(target.parent))
    try:
        _resolved(target.parent).mkdir(parents=True, exist_ok=True)
        reclaim_temps(target.parent, target.name)
    except OSError as err:
        _remove_empty(made)
        raise OutputError(f"{target}: cannot write there: {err.strerror or err}") from None
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)   # no interrupt before the clean-up is armed
    tmp = None
    try:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name) + f"{os.getpid()}-",
                                        suffix=TEMP_SUFFIX, dir=target.parent))
        except OSError as err:
            raise OutputError(f"{target}: cannot write there: {err.strerror or err}") from None
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        yield tmp
    except BaseException as err:
        if tmp is not None:                     # first, so that the folders made for it are empty
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
        _remove_empty(made)
        full = _no_room(err, target)            # the library writing into the folder filled the disk
        if full is not None:
            raise full from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Stream a file to ``path``: renamed into place when the block ends normally (a set of one
    file, ``atomic_files``).

    Refuses (``OutputError``) a target that exists and is not a regular file, before
    writing and again just before the rename."""
    with atomic_files() as files, files.open(path) as f:
        yield f


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that an interruption leaves no partial file."""
    with atomic_output(path) as f:
        f.write(data)


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that the renames into it outlive a power loss; where the file system cannot
    (EINVAL on some), the renames are made all the same."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileSet:
    """Files that must change together (a vector set and its index, a model folder): see ``atomic_files``."""

    def __init__(self):
        self._staged: dict[Path, Path] = {}     # target -> its complete temporary file, in writing order
        self._made: list[Path] = []             # the folders made for the set, removed if it fails

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike) -> Iterator[BinaryIO]:
        """Stream one file of the set: to a temporary file beside its target, renamed at the end."""
        path = Path(path)
        _refuse_non_regular(path)
        target = _real_target(path)
        if target in self._staged:
            raise OutputError(f"{path}: written twice in one set of files")
        self._made += _missing_folders(_resolved(target.parent))     # (those made through a link too)
        with temp_file_in(target.parent, target.name) as (f, tmp):
            self._staged[target] = tmp          # first, so that an interrupt below still removes it
            yield f
            f.flush()
            os.fsync(f.fileno())

    def write(self, path: str | os.PathLike, data: bytes) -> None:
        with self.open(path) as f:
            f.write(data)

    def _commit(self) -> None:
        for target in self._staged:             # every target checked before any is replaced
            _refuse_non_regular(target)
        folders = {target.parent for target in self._staged}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
        try:                                    # no interrupt between the first rename and the last
            while self._staged:
                target, tmp = next(iter(self._staged.items()))
                try:
                    os.replace(tmp, target)
                except OSError as err:          # said of the target, not of the temporary file
                    raise OutputError(f"{target}: cannot replace it: {err.strerror or err}") from None
                del self._staged[target]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for folder in folders:                  # the renames on disk too, not only the files' data
            _sync_folder(folder)

    def _discard(self) -> None:
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()
        _remove_empty(self._made)               # none is empty once the set is in place


@contextlib.contextmanager
def atomic_files() -> Iterator[FileSet]:
    """A set of files written all or nothing: ``files.write(path, data)`` / ``files.open(path)``
    for each; when the block ends normally every file is renamed into place, in writing order,
    with signals held back; if anything raises, every temporary file is removed and no target
    has changed. Write an index last: a reader then never sees the new index with old files.

    The limit: a set is one rename per file, and nothing holds back SIGKILL or a power loss. One
    of those between the first rename and the last (microseconds per file) leaves some files new
    and the others old. A vector set's index (``vectors.json``) names each file's SHA-256, so a
    reader refuses such a mix; a model folder (``sop dequantize --model-folder``) has no such index
    for transformers to check (docs/robustness.md)."""
    files = FileSet()
    try:
        yield files
        files._commit()
    finally:
        files._discard()


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every temporary file is removed on the way out."""

    def __init__(self, number: int):
        self.number, self.name = number, signal.Signals(number).name
        super().__init__(self.name)


def interrupted(prog: str, sig: BaseException) -> int:
    """A run ended by a signal (Ctrl-C's KeyboardInterrupt, or ``Signalled``): its one line on stderr,
    ``PROG: interrupted (SIGNAME); no partial file was left`` (every writer here is atomic), and the
    exit status 128 + N."""
    print(f"{prog}: interrupted ({getattr(sig, 'name', 'SIGINT')}); no partial file was left", file=sys.stderr)
    # What the run leaves to collect is no news now: its exceptions in finalizers (signals_as_interrupts)
    # and the warnings of its objects cut short (Amaranth's unused parts, asyncio's coroutines never awaited),
    # until signals_as_interrupts ends: then the filters are as they were (a Python caller's later warnings)
    _run_state.interrupted = True
    if _run_state.quiet is None:
        _run_state.quiet = warnings.catch_warnings()
        _run_state.quiet.__enter__()
    warnings.simplefilter("ignore")
    return 128 + getattr(sig, "number", signal.SIGINT)


#: ``interrupted``: whether the run within ``signals_as_interrupts`` has said it was interrupted, and the
#: warnings filters it quieted (restored as the block ends)
_run_state = types.SimpleNamespace(interrupted=False, quiet=None)


@contextlib.contextmanager
def signals_as_interrupts():
    """Within the block, SIGTERM and SIGHUP raise ``Signalled`` (a KeyboardInterrupt), as SIGINT does.

    A process killed by them then unwinds like one interrupted by Ctrl-C, and the
    writers above remove their temporary files. An interrupt whose exception Python
    drops (one raised in a weakref callback or a ``__del__``) is sent again, for
    SIGINT too. Outside the main thread (where Python cannot set handlers) the block
    runs unchanged."""
    def handler(number, _frame):
        raise Signalled(number)

    def again(number: int) -> None:
        timer = threading.Timer(0.01, os.kill, (os.getpid(), number))
        timer.daemon = True
        timer.start()

    def unraisable(info):
        # Python runs a signal handler at the next bytecode boundary, which may lie in a weakref
        # callback or a __del__ (an import lock's, say): an exception raised there is printed as
        # "Exception ignored" and dropped, and the run would go on. Send the signal again shortly,
        # from a helper thread, so that it lands in ordinary code. A plain KeyboardInterrupt is
        # Python's own SIGINT handler's (Ctrl-C). On a loaded machine the signal sent again may land
        # in this hook itself (Python drops an exception raised here too, without calling the hook):
        # then it is sent once more.
        # Once the run has said it was interrupted, an object the signal cut short in its constructor
        # may fail in its __del__ as the unwinding frees it (an Amaranth part: "Exception ignored ... has
        # no attribute '_MustUse__context'", seen under load): printed after that line, it is no news.
        try:
            if isinstance(info.exc_value, KeyboardInterrupt):
                again(getattr(info.exc_value, "number", signal.SIGINT))
            elif not _run_state.interrupted:
                previous_hook(info)
        except KeyboardInterrupt as landed:
            again(getattr(landed, "number", signal.SIGINT))

    caught = (signal.SIGTERM, signal.SIGHUP)
    try:
        old = {s: signal.signal(s, handler) for s in caught}
    except ValueError:                                   # not the main thread
        yield
        return
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    outer = (_run_state.interrupted, _run_state.quiet)
    _run_state.interrupted, _run_state.quiet = False, None
    try:
        yield
    finally:
        if _run_state.quiet is not None:         # the run's objects cut short collected while still quiet
            gc.collect()
            _run_state.quiet.__exit__(None, None, None)
        _run_state.interrupted, _run_state.quiet = outer
        sys.unraisablehook = previous_hook
        for s, h in old.items():
            signal.signal(s, h)
