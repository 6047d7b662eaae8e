"""The user's own tables and operating points for the command lines: the JSON file ``SOP_POINTS`` names
(golden.points.register_file), registered by `sop` (sop.cli.main) and every ``python -m`` tool
(sop.terminal.run_command) before they read their options, and checked against the names the
registries outside golden/ hold (docs/quantizer.md, "Your own table and operating point")."""

from __future__ import annotations

import os

from sop.golden.points import POINTS_FILE_ENV, register_env_file


def register_env_points() -> None:
    """golden.points.register_env_file, and then the names of the file's points checked against those
    golden/ cannot see: a quantizer format's (quantize.schemes) and a GEMV engine's named on purpose
    (hdl.gemv_config): one ValueError naming the file. Those tables refuse such a point where they are
    read, and so a point ``sop4-g16-bf16`` ran in `sop` and was a traceback in `python -m sop.hdl.generate
    --help`, and ``nvfp4`` was built by it and refused by `sop`, in a line that named no file."""
    if not (path := os.environ.get(POINTS_FILE_ENV)):
        return
    register_env_file()
    from sop.hdl.gemv_config import gemv_configs          # (Amaranth's import: only with a file)
    from sop.quantize.schemes import quant_formats

    try:
        quant_formats()
        gemv_configs()
    except ValueError as err:
        raise ValueError(f"{POINTS_FILE_ENV}={path}: {err}") from None
