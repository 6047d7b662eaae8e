"""Text for a terminal: one line, holding nothing a terminal would act on.

A tensor name, a path or a library's message is any string. A line break in it would split a
``sop: error:`` line in two; an escape sequence (ESC, BEL, a CSI) would be run by the terminal, which
a checkpoint's tensor names could then recolour, retitle or clear. Every error, warning and progress
line of ``sop`` passes through ``one_line``.
"""

from __future__ import annotations

import re

#: C0 controls, DEL and C1 controls (CSI is 0x9b) left after the whitespace is folded
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text) -> str:
    """``text`` as one line: each run of whitespace (line breaks too) one space, every other control
    character as ``\\xNN``, so that it is seen, not run."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", " ".join(str(text).split()))
