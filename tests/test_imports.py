"""Static analysis resolves every import (issue 12): pyright on the whole tree, with the project's
own configuration (pyproject.toml ``[tool.pyright]``) and nothing per user.

The gate is every unresolved import (``reportMissingImports``, ``reportMissingModuleSource``) and
every name a module does not define (``from sop.x import NAME``, ``module.NAME``); other pyright
diagnostics are not gated. The package tree: ``sop/<folder>`` is a symlink to each top-level
package folder (golden, quantize, hdl, sim, synth), which is how Python, pyright and setuptools
all see ``sop.golden`` and the others without a path mapping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYRIGHT = PYPROJECT["tool"]["pyright"]
IMPORT_RULES = {"reportMissingImports", "reportMissingModuleSource"}
# reportAttributeAccessIssue also covers attributes of objects (Amaranth's signature ports read as
# unknown to pyright): only the ones about a module are gated.
MODULE_NAME_MISSING = re.compile(r"is unknown import symbol|is not a known attribute of module")


def _pyright(*args: str, timeout: int = 300) -> dict:
    """Run pyright with the project's configuration on the interpreter running the tests."""
    env = {**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"}
    r = subprocess.run([sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
                        "-p", str(ROOT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode in (0, 1), f"pyright failed to run (exit {r.returncode}): {r.stderr[-2000:]}{r.stdout[-2000:]}"
    return json.loads(r.stdout)


def unresolved(report: dict) -> list[str]:
    """The gated diagnostics, one line each: ``file:line: message``."""
    out = []
    for d in report["generalDiagnostics"]:
        rule = d.get("rule", "")
        if rule in IMPORT_RULES or (rule == "reportAttributeAccessIssue" and MODULE_NAME_MISSING.search(d["message"])):
            path = Path(d["file"])
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            out.append(f"{where}:{d['range']['start']['line'] + 1}: {d['message'].splitlines()[0]}")
    return out


def checked_sources() -> list[Path]:
    """The .py files pyright must analyze: its ``include`` folders, symlinks not followed."""
    files = []
    for folder in PYRIGHT["include"]:
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):        # os.walk does not follow links
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (Path(dirpath) / d).is_symlink()]
            files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return files


def package_folders() -> list[str]:
    """Top-level folders of the checkout that are Python packages (other than sop/ itself)."""
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "sop")


def test_pyright_resolves_every_import():
    report = _pyright()
    bad = unresolved(report)
    assert not bad, (f"{len(bad)} unresolved import(s) or module name(s):\n" + "\n".join(bad) +
                     "\n(a package the code needs goes into pyproject.toml's dependencies; an optional import "
                     "under `except ImportError` ends with `# pyright: ignore[reportMissingImports, "
                     "reportMissingModuleSource]`)")
    # the check covered the tree: every file of the include folders, each once
    assert report["summary"]["filesAnalyzed"] == len(checked_sources()), report["summary"]


def test_the_check_fails_on_a_bad_import(tmp_path):
    """The gate is not vacuous: a module that does not exist, and a name a module does not define."""
    bad = tmp_path / "bad_imports.py"
    bad.write_text("import sop.golden.no_such_module\n"
                   "from sop.toolenv import NO_SUCH_NAME\n"
                   "from sop import toolenv\n"
                   "import no_such_top_level_package\n"
                   "toolenv.no_such_attribute\n"
                   "import sop.golden.formats, sop.synth\n")            # these resolve
    lines = unresolved(_pyright(str(bad), timeout=120))
    assert len(lines) == 4, lines
    assert [ln.split(":")[1] for ln in lines] == ["1", "2", "4", "5"], lines


def test_the_package_tree_is_the_checkout():
    """sop/<folder> -> ../<folder> for every top-level package folder, and pyright checks each file once."""
    folders = package_folders()
    assert {"golden", "quantize", "hdl", "sim", "synth"} <= set(folders), folders
    links = sorted(p.name for p in (ROOT / "sop").iterdir() if p.is_symlink())
    assert links == folders, f"sop/ symlinks {links}, top-level package folders {folders}: " \
                             f"add `ln -s ../NAME sop/NAME` (and git add it) for a new folder"
    for name in folders:
        link = ROOT / "sop" / name
        assert os.readlink(link) == f"../{name}", f"sop/{name} -> {os.readlink(link)}, expected ../{name}"
        assert name in PYRIGHT["include"], f"[tool.pyright] include lacks {name!r}"
        assert f"sop/{name}" in PYRIGHT["exclude"], f"[tool.pyright] exclude lacks 'sop/{name}' (checked twice)"


def test_a_checkout_folder_imported_on_its_own_is_refused_in_one_line():
    """From the checkout's root, `from quantize.artifact import open_artifact` and `golden.decoder` imported a
    second tree of the same modules: an artifact's formats (sop.golden's) then failed golden.decoder's checks
    (`ValueError: hif-e3m6b5 is not a float format`). Each folder now names the import that works."""
    for name in package_folders():
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
            f"ImportError: import sop.{name}, not {name}: the checkout's {name}/ is the sop package's, and "
            f"imported apart its classes are not those sop.{name} returns"), r.stderr[-500:]
    r = subprocess.run([sys.executable, "-c", "import sop.golden.decoder, sop.quantize.artifact, sop.sim, sop.synth"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]


@pytest.mark.parametrize("folder", ["golden", "quantize", "hdl", "sim", "synth", "sop"])
def test_every_source_folder_is_a_package(folder):
    """A folder of .py files without __init__.py is no package: the wheel would leave it out."""
    missing = []
    for dirpath, dirnames, filenames in os.walk(ROOT / folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (Path(dirpath) / d).is_symlink()]
        if any(f.endswith(".py") for f in filenames) and "__init__.py" not in filenames:
            missing.append(str(Path(dirpath).relative_to(ROOT)))
    assert not missing, f"folders without __init__.py: {missing}"


def test_no_module_reaches_into_the_checkout():
    """Data files come through importlib.resources and outputs go under the working directory:
    no module of the package climbs out of its own folder from ``__file__`` (a wheel has no
    checkout above it; tests/test_wheel.py runs the installed package)."""
    climbing = re.compile(r"__file__.*(parents\[|\.parent\.parent)")
    bad = []
    for folder in ("golden", "quantize", "hdl", "sim", "synth", "sop"):
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):          # sop/'s links not followed
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in (Path(dirpath) / n for n in filenames if n.endswith(".py")):
                bad += [f"{f.relative_to(ROOT)}:{i}" for i, line in enumerate(f.read_text().splitlines(), 1)
                        if climbing.search(line)]
    assert not bad, f"paths from __file__ above the package: {bad}"


TOP_LEVEL_TRANSFORMERS = re.compile(r"^\s*(from\s+transformers\s+import\b|import\s+transformers(\s+as\s+\w+)?\s*$)")


def test_transformers_names_come_from_their_subpackages():
    """``from transformers import X`` makes pyright bind every model transformers ships (half a
    minute of the check above); each name is imported from the subpackage that defines it
    (quantize/causal_lm.py's docstring). The pattern is shown to match the top-level forms."""
    assert TOP_LEVEL_TRANSFORMERS.match("    from transformers import AutoConfig")
    assert TOP_LEVEL_TRANSFORMERS.match("import transformers")
    assert TOP_LEVEL_TRANSFORMERS.match("import transformers as hf")
    assert not TOP_LEVEL_TRANSFORMERS.match("from transformers.models.auto import AutoConfig")
    bad = [f"{f.relative_to(ROOT)}:{i}" for f in checked_sources()
           for i, line in enumerate(f.read_text().splitlines(), 1) if TOP_LEVEL_TRANSFORMERS.match(line)]
    assert not bad, f"names imported from transformers' top level: {bad}"
