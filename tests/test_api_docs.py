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


def test_the_own_table_and_point_example_runs():
    """A researcher's table and point, registered for a ``with`` block: 64 x 200 weights padded to 13 blocks
    of 16 a row, 4-bit codes and an 8-bit scale each, a 16-entry table of 10-bit HIF and an offset byte;
    gone again afterwards."""
    from sop.golden.codebooks import codebook_names
    from sop.golden.points import operating_points

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block(2), str(DOC), "exec"), {})        # noqa: S102 - the doc's own code
    bits = 64 * 13 * (16 * 4 + 8) + 16 * 10 + 8
    assert out.getvalue().strip() == f"tanh4-ue4m4-g16 {bits / (64 * 200):.4f} bpw"
    assert "tanh4" not in codebook_names() and "tanh4-ue4m4-g16" not in operating_points()
