"""Text for a terminal: one line, holding nothing a terminal would act on.

A tensor name, a path or a library's message is any string. A line break in it would split a
``sop: error:`` line in two; an escape sequence (ESC, BEL, a CSI) would be run by the terminal, which
a checkpoint's tensor names could then recolour, retitle or clear. Every error, warning and progress
line of ``sop`` passes through ``one_line``; a list of names in such a line, through ``some_names``.

The standard streams of a command (``sop`` and the ``python -m`` tools, through ``run_command``) are the
user's: a locale whose encoding lacks a character printed (``LC_ALL=C``, ``PYTHONIOENCODING=ascii``), a
reader gone (``| head -1``), a full disk (``> /dev/full``), a stream the shell closed (``>&-``). Each is
one line or a sensible exit status, never a traceback: ``prepare_streams`` before the command,
``finish_output`` after it.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import re
import signal
import sys

#: what Python reads as a line boundary (str.splitlines), with the spaces and tabs beside it
_BREAK = re.compile(r"[ \t]*[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+[ \t]*")

#: C0 controls (a tab too), DEL and C1 controls (CSI is 0x9b) left after the line breaks are folded,
#: and the bidirectional marks and overrides, which would reorder what the line shows
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def one_line(text) -> str:
    """``text`` as one line: each line break (with the spaces around it) one space, every other control
    character as ``\\xNN`` (a tab too; a bidirectional one as ``\\uNNNN``), so that it is seen, not run.

    Other whitespace stays as it is (two names that differ in a tab, runs of spaces or a no-break space
    print apart). A literal backslash is not escaped: ``\\x1b`` in a name and an escaped ESC then print
    alike, which a reader can only tell from the name's source; doubling every backslash would garble
    the paths and patterns that messages quote far more often."""
    return _CONTROL.sub(_escape, _BREAK.sub(" ", str(text)).strip("\n\r "))


def _escape(m: re.Match) -> str:
    """A control character as the escape Python writes for it."""
    c = ord(m[0])
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def some_names(names, shown: int = 5) -> str:
    """The first ``shown`` of ``names`` and how many there are, for an error line: an LLM has hundreds of
    layers, and a line listing them all ran to kilobytes (SmolLM2's 210: 4.9 kB)."""
    names = list(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _escape_unencodable(err: UnicodeError):
    """The ``sop.escape`` error handler of standard output: a character its encoding lacks printed as
    ``\\xNN`` / ``\\uNNNN`` (``LC_ALL=C``: an ``\u00e9`` in the layer's name that ``sop gemv`` prints was a
    UnicodeEncodeError after its file was written), and a byte of a file name that the file
    system's encoding did not decode (Python's surrogate escape) printed as that byte, as the name is on disk."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    text = err.object[err.start:err.end]
    if all("\udc80" <= c <= "\udcff" for c in text):
        return bytes(ord(c) - 0xdc00 for c in text), err.end
    return codecs.backslashreplace_errors(err)


codecs.register_error("sop.escape", _escape_unencodable)


def closed_standard_streams() -> list[int]:
    """The standard file descriptors (0, 1, 2) the shell left closed (``<&-``, ``2>&-``), in order."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    return closed


def prepare_streams(prog: str) -> int | None:
    """Make the standard streams safe for a command; an exit code where it cannot run (else None).

    A stream the shell closed (``<&-``, ``2>&-``) is opened on /dev/null: else the command's first file
    takes its number, and a child process (a simulator) writes into that file or reads from it, and with
    ``sys.stderr`` None ``print(..., file=sys.stderr)`` wrote the error lines into standard output. A closed
    standard output is refused in one line (what the command prints would be lost, exit 0). Standard output
    escapes what its encoding cannot hold (``sop.escape``) instead of raising."""
    closed = closed_standard_streams()
    for fd in closed:                       # in order: each the lowest free number when it is opened
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:                      # (the lowest free number: fd itself, those below it open)
            os.dup2(null, fd)
            os.close(null)
        # os.open's descriptor is close-on-exec (dup2's is not): opened at fd itself, a child (a
        # simulator, the --jobs fork server) started with that number closed all the same
        os.set_inheritable(fd, True)
    if 2 in closed or sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)     # noqa: SIM115 - for the run
    if 1 in closed or sys.stdout is None:
        print(f"{prog}: error: standard output is closed; give >/dev/null to discard what it prints",
              file=sys.stderr)
        return 2
    if getattr(sys.stdout, "errors", None) in ("strict", "surrogateescape"):
        with contextlib.suppress(AttributeError, ValueError, OSError):     # a replaced stream keeps its own
            sys.stdout.reconfigure(errors="sop.escape")
    _name_standard_output()
    return None


class _StandardOutput(io.FileIO):
    """File descriptor 1 as a raw file whose failed write names it: ``standard output: No space left on
    device`` where a print that flushed the buffer in the middle of a command (``sop formats > /dev/full``)
    raised ``[Errno 28] No space left on device``, which named no file. The error's class is kept
    (``BrokenPipeError`` is a reader gone), and the rest of the output is discarded as ``reader_gone``
    does (else the text left in the buffer failed again at the command's last flush: a second line)."""

    def write(self, data):
        try:
            return super().write(data)
        except OSError as err:
            if err.filename is not None or err.errno is None:
                raise
            reader_gone()
            raise type(err)(err.errno, err.strerror, "standard output") from None


def _name_standard_output() -> None:
    """``sys.stdout`` again, the same text stream (encoding, error handler, line buffering, unbuffered
    under ``python -u``, the buffer size ``open`` gives) over ``_StandardOutput``; a stream that is not
    Python's own on descriptor 1 is left as it is."""
    out = sys.stdout
    try:
        if type(out) is not io.TextIOWrapper or out.fileno() != 1:
            return
        out.flush()
    except (AttributeError, ValueError, OSError):
        return
    raw = _StandardOutput(1, "w", closefd=False)
    unbuffered = isinstance(getattr(out, "buffer", None), io.RawIOBase)         # python -u, PYTHONUNBUFFERED
    size = os.fstat(1).st_blksize
    size = size if size > 1 else io.DEFAULT_BUFFER_SIZE                          # as open() chooses it
    sys.stdout = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw, size),
                                  encoding=out.encoding, errors=out.errors, line_buffering=out.line_buffering,
                                  write_through=out.write_through)


def reader_gone() -> int:
    """Standard output's reader has exited (``| head``): the exit code, with standard output sent to
    /dev/null so that Python's own flush at exit does not complain of the broken pipe."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def finish_output(prog: str, code: int) -> int:
    """Flush standard output after the command returned ``code``; the exit code. Its last output waited in
    the buffer (a file, a pipe): a reader gone is ``reader_gone``'s exit, a failed write (``> /dev/full``, a
    full disk) one line and exit 2 where it was 0 (it was exit 0 and nothing written, or Python's
    ``Exception ignored ... OSError`` and exit 120)."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        return reader_gone()
    except OSError as err:
        reader_gone()                       # the rest is discarded: Python's own flush at exit would fail again
        with contextlib.suppress(OSError, ValueError):                  # (standard error on that disk too)
            print(f"{prog}: error: standard output: {err.strerror or err}", file=sys.stderr)
        return code or 2
    except ValueError:                      # standard output closed by the command itself
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    return code


def run_command(prog: str, main) -> None:
    """A ``python -m`` tool's ``main`` as a command: ``sys.exit`` of its code, the streams prepared and its
    output flushed as above; argparse's exit (``--help``, a usage error) flushed too. A broken pipe is exit
    141, no message; an OSError the tool did not catch (a build folder it cannot make: a read-only working
    folder) is its one line ``PROG: error: PATH: REASON``, exit 2 (SOP_DEBUG=1: the traceback)."""
    code = prepare_streams(prog)
    if code is None:
        try:
            from sop.user_points import refused_at_start      # (it imports this module)

            code = refused_at_start(prog)                   # the user's own points (SOP_POINTS), as `sop`
            code = main() if code is None else code
        except SystemExit as stop:
            if stop.code is not None and not isinstance(stop.code, int):
                raise
            code = stop.code or 0
        except BrokenPipeError:
            code = reader_gone()
        except OSError as err:
            if os.environ.get("SOP_DEBUG"):
                raise
            with contextlib.suppress(OSError, ValueError):
                print(one_line(f"{prog}: error: {os_error_text(err)}"), file=sys.stderr)
            code = 2
        code = finish_output(prog, code)
    sys.exit(code)


def os_error_text(err: OSError) -> str:
    """An OSError as ``path: reason`` where it names a path (standard output as ``standard output``:
    ``prepare_streams``), else its message."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__
