"""docs/quantizer.md's "From Python" block runs as it is written (a doc example that drifts from the
code fails here), and what it prints is what the registry gives."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "quantizer.md"


def python_block(index: int = 0) -> str:
    text = DOC.read_text()
    section = text[text.index("## 7. From Python"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_the_python_example_runs():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block(), str(DOC), "exec"), {})          # noqa: S102 - the doc's own code
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fp8-e4m3-pot") and any(line.startswith("sop4-g16 ") for line in lines)
    assert re.fullmatch(r"\{'a': '[^']+', 'b': '[^']+'\}", lines[-1]), lines[-1]


def test_the_in_memory_example_runs():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block(1), str(DOC), "exec"), {})        # noqa: S102 - the doc's own code
    # 2 blocks x 7 projections at 4.5 bpw (4-bit codes, an 8-bit header per 16) and the tables, the
    # embedding and the head kept
    m = re.fullmatch(r"14 layers, (4\.\d{4}) bpw, kept: \['an embedding', 'lm_head'\]", out.getvalue().strip())
    assert m and 4.5 < float(m[1]) < 4.6, out.getvalue()
