"""The user's own tables and operating points for the command lines: the JSON file ``SOP_POINTS`` names
(golden.points.register_file), registered by `sop` (sop.cli.main) and every ``python -m`` tool
(sop.terminal.run_command) before they read their options, and checked against the names the
registries outside golden/ hold (docs/quantizer.md, "Your own table and operating point")."""

from __future__ import annotations

import os
import sys

from sop.golden.points import POINTS_FILE_ENV, register_file
from sop.terminal import one_line


def register_env_points() -> None:
    """``register_file`` of the file ``SOP_POINTS`` names, if it names one, and then the names of the
    file's points checked against those golden/ cannot see: a quantizer format's (quantize.schemes) and a
    GEMV engine's named on purpose (hdl.gemv_config): one ValueError naming the file. Those tables refuse
    such a point where they are read, and so a point ``sop4-g16-bf16`` ran in `sop` and was a traceback in
    `python -m sop.hdl.generate --help`, and ``nvfp4`` was built by it and refused by `sop`, in a line that
    named no file."""
    if not (path := os.environ.get(POINTS_FILE_ENV)):
        return
    register_file(path)
    from sop.hdl.gemv_config import gemv_configs          # (Amaranth's import: only with a file)
    from sop.quantize.schemes import quant_formats

    try:
        quant_formats()
        gemv_configs()
    except ValueError as err:
        raise ValueError(f"{POINTS_FILE_ENV}={path}: {err}") from None


def refused_at_start(prog: str) -> int | None:
    """``register_env_points`` at a command's start: None where it ran, else its one line
    ``PROG: error: ...`` printed and exit code 2 (`sop` and every ``python -m`` tool alike)."""
    try:
        register_env_points()
    except ValueError as err:
        print(one_line(f"{prog}: error: {err}"), file=sys.stderr)
        return 2
    return None
