"""argparse types for every command line of the project (`sop`, the hardware tools, the benches):
a number outside its range is a usage error naming the option and the value, before any work.

``number(int, 0, inclusive=True)`` takes 0, 1, 2, ...; ``positive(float)`` any finite number above
0. NaN and the infinities are never in range. ``Once``: an option that takes one value, given twice, is a
usage error (argparse keeps the last); a ``ToolParser`` with ``options_once`` (`sop`'s) makes every such
option one. ``in_file``, ``out_folder``, ``layer_name``: a path or name, never the empty one.
``output_checked``: an output a tool cannot write (a folder where a file goes, a device, an input), refused as
a usage line before any work. ``ToolParser``: the parser of every tool, its usage error one line, each list
option's values once, its help's names never cut at a hyphen.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap

from sop.terminal import one_line


class _NamesWhole(argparse.HelpFormatter):
    """argparse's help, its lines broken at spaces only: textwrap also breaks after a hyphen, and a
    format or configuration name in a list (``gemv-sop4-g16-bf16``) came out cut over two lines."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class ToolParser(argparse.ArgumentParser):
    """argparse with a usage error on one line, ``PROG: error: MESSAGE (see PROG --help)``, exit 2 (argparse's
    own prints the usage block first: several lines for a tool with many options), through
    ``sop.terminal.one_line`` (an unknown argument's escape sequence was printed raw). A subcommand's parser
    is one too (argparse makes them of the parent's class). ``hint``, where a parser sets one: a function of
    its arguments and the message, one more clause for the error (a mistake whose plain message misleads)."""

    hint = None
    _argv: list = []
    #: every option of one value (argparse's ``store``: no ``action`` given) is ``Once``; a parser's
    #: subcommands' too (argparse makes them of the parent's class). `sop` sets it; the other tools keep
    #: argparse's rule (a Makefile line may repeat an option to override it).
    options_once = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _NamesWhole)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        """argparse's, an option of one value made ``Once`` where ``options_once``: one rule for every
        option of every command (``sop eval --json a.json --json b.json`` wrote b.json alone, ``sop
        dequantize --out`` and ``sop report --out`` kept the last), not an ``action=Once`` each option's
        author had to remember. A flag, a list option (``append``) and a positional argument are left be."""
        if self.options_once and kwargs.get("action", "store") == "store" and args and \
                all(a.startswith(tuple(self.prefix_chars)) for a in args):
            kwargs["action"] = Once
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        extra = self.hint(self._argv, message) if self.hint is not None else ""
        if message.startswith(("argument --format: invalid choice", "argument --config: invalid choice")):
            from sop.golden.points import own_point_hint

            message += own_point_hint()
        print(one_line(self.error_line(message + (f"; {extra}" if extra else ""))), file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, with each list option's values once, in the order first given: every such option
        names a set of things to run or select (``bench/lane_sweep.py --lanes 8 8`` synthesized the same
        netlist twice into one folder at once, and counted it twice in the slope; ``sop eval --format A
        --format A`` already evaluated A once)."""
        self._argv = list(sys.argv[1:] if args is None else args)    # a subcommand's own, for its hint
        namespace, extra = super().parse_known_args(args, namespace)
        for action in self._actions:
            values = getattr(namespace, action.dest, None)
            if isinstance(values, list) and (isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")):
                setattr(namespace, action.dest, list(dict.fromkeys(values)))
        return namespace, extra

    def error_line(self, message: str) -> str:
        return f"{self.prog}: error: {message} (see {self.prog} --help)"

    def _print_message(self, message, file=None):
        """argparse's, but a failed write of ``--help`` to standard output is not dropped (``> /dev/full``:
        exit 0, nothing written): one line and exit 2, or exit 141 where the reader is gone (``| head``)."""
        if file is None or file is not sys.stdout:
            return super()._print_message(message, file)
        from sop.terminal import reader_gone

        try:
            file.write(message)
        except BrokenPipeError:
            sys.exit(reader_gone())
        except OSError as err:
            print(one_line(f"{self.prog}: error: standard output: {err.strerror or err}"), file=sys.stderr)
            sys.exit(2)


def number(kind, minimum, inclusive: bool, maximum=None):
    """An argparse type: a finite number of ``kind`` above ``minimum`` (at or above it if
    ``inclusive``) and, given a ``maximum``, at most that; anything else is a usage error naming
    the value."""
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
        if not ok or (maximum is not None and value > maximum):     # NaN and Inf too
            most = f" and at most {maximum:g}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be {what} {'at least' if inclusive else 'above'} "
                                             f"{minimum}{most}, got {text}")
        return value
    return parse


def positive(kind, maximum=None):
    """An argparse type: a finite number of ``kind`` above zero (at most ``maximum``, if given)."""
    return number(kind, 0, inclusive=False, maximum=maximum)


class Once(argparse.Action):
    """Store the option's one value; given twice, a usage error rather than the last silently kept
    (``sop quantize --format A --format B`` wrote B: ``sop eval`` takes several ``--format``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_once_given", set())
        if self.dest in given:
            parser.error(f"argument {'/'.join(self.option_strings)}: given twice; it takes one value")
        namespace._once_given = given | {self.dest}
        setattr(namespace, self.dest, values)


def out_folder(text: str):
    """An argparse type: an output folder's path, never the empty name (``Path('')`` is ``.``: a tool's
    ``--out ''`` wrote into the working folder)."""
    from pathlib import Path

    from sop.golden.files import EMPTY_FOLDER_NAME

    if not text:
        raise argparse.ArgumentTypeError(EMPTY_FOLDER_NAME)
    return Path(text)


def in_file(text: str):
    """An argparse type: an input file's path, never the empty name (``Path('')`` is ``.``: ``sop gemv
    --x ''`` was refused as the working folder, ``sop report ''`` with a repr)."""
    from pathlib import Path

    if not text:
        raise argparse.ArgumentTypeError("'': an empty name; give the file's name")
    return Path(text)


def layer_name(text: str) -> str:
    """An argparse type: a layer's name (``as_typed``), never the empty one (``--layer ''`` was looked up
    and refused as an unquoted blank name)."""
    if not text:
        raise argparse.ArgumentTypeError("'': an empty name; give a layer's name")
    return as_typed(text)


def serial_port(text: str) -> str:
    """An argparse type: a board's serial port (a device path or a pyserial URL), never the empty name
    (``--port ''``: the layer was read, then pyserial's ``could not open port : ... No such file or
    directory: ''`` came out as "cannot open serial port  at 115200 Bd")."""
    if not text:
        raise argparse.ArgumentTypeError("'': an empty name; give the board's serial port (for example "
                                         "/dev/ttyUSB1; ls /dev/ttyUSB* /dev/ttyACM*)")
    return text


def as_typed(text: str) -> str:
    """An argparse type: a name (a layer's, a glob of them) as typed. Under a locale that is not UTF-8
    (``LC_ALL=C``) Python decodes each non-ASCII byte of an argument as a surrogate escape, and
    ``--layer couche.\u00e9.weight`` matched no layer: a checkpoint's names are Unicode (UTF-8 in a
    safetensors header). Such bytes are read as the UTF-8 they are; bytes that are not UTF-8 stay escaped."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return text


def output_checked(parser: argparse.ArgumentParser, path, *, folder: bool = False, option: str | None = None,
                   inputs=()):
    """``golden.files.check_output(path, inputs, folder=folder)``, its refusal a usage error (``option: ...``
    where ``option`` names it); the path back. ``inputs``: every file the tool reads, its own source
    included (a bench script's ``--out`` once replaced the script itself)."""
    from sop.golden.files import OutputError, check_output

    try:
        return check_output(path, inputs, folder=folder)
    except OutputError as err:
        parser.error(f"{option}: {err}" if option else str(err))
