"""Text for a terminal: one line, holding nothing a terminal would act on.

A tensor name, a path or a library's message is any string. A line break in it would split a
``sop: error:`` line in two; an escape sequence (ESC, BEL, a CSI) would be run by the terminal, which
a checkpoint's tensor names could then recolour, retitle or clear. Every error, warning and progress
line of ``sop`` passes through ``one_line``; a list of names in such a line, through ``some_names``.
"""

from __future__ import annotations

import re

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
