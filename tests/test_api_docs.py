"""docs/quantizer.md's "From Python" block runs as it is written (a doc example that drifts from the
code fails here), and what it prints is what the registry gives."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "quantizer.md"


def python_block() -> str:
    text = DOC.read_text()
    section = text[text.index("## 7. From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_example_runs():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block(), str(DOC), "exec"), {})          # noqa: S102 - the doc's own code
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fp8-e4m3-pot") and any(line.startswith("sop4-g16 ") for line in lines)
    assert re.fullmatch(r"\{'a': '[^']+', 'b': '[^']+'\}", lines[-1]), lines[-1]
