"""synth/'s split and the protocol engine's FSMs, checked on the code itself.

* The gateware (synth/gateware/) never imports the host software
  (synth/host/): every gateware module imported in a fresh interpreter leaves
  no ``sop.synth.host`` module loaded, and no gateware file names one in an
  import. The protocol's numbers (synth/wire.py) and the host client need no
  Amaranth.
* The FSMs of the gateware are written out: every ``m.State(...)`` and every
  ``m.next = ...`` names its state with a string literal (no name built by
  formatting or string replacement), and docs/board-protocol.md lists the
  protocol engine's states, exactly.
* The command lines of the Makefile and `sop board` name modules that exist.
"""

import ast
import json
import pkgutil
import re
import subprocess
import sys
from importlib import util
from pathlib import Path

import pytest

import sop.synth.gateware

ROOT = Path(__file__).resolve().parent.parent
GATEWARE = Path(sop.synth.gateware.__file__).parent
GATEWARE_MODULES = sorted(f"sop.synth.gateware.{m.name}" for m in pkgutil.iter_modules([str(GATEWARE)]))


def loaded_after(*modules: str) -> list[str]:
    """The modules loaded once ``modules`` are imported in a fresh interpreter."""
    code = (f"import json, sys\nfor m in {list(modules)!r}:\n    __import__(m)\n"
            f"print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def test_gateware_modules_are_the_ones_named():
    assert GATEWARE_MODULES == [f"sop.synth.gateware.{m}" for m in
                                ("board", "gemv_port", "protocol", "simboard", "uart", "wrapper")]


def test_the_gateware_does_not_load_the_host_software():
    loaded = loaded_after(*GATEWARE_MODULES)
    assert set(GATEWARE_MODULES) <= set(loaded)
    assert [m for m in loaded if m == "sop.synth.host" or m.startswith("sop.synth.host.")] == []


def imported_names(path: Path, package: str = "sop.synth.gateware") -> list[str]:
    """Every module an import statement of ``path`` names, relative ones resolved from ``package``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("path", sorted(GATEWARE.glob("*.py")), ids=lambda p: p.name)
def test_no_gateware_file_imports_the_host(path):
    """Imports inside functions count too (a lazy import would still tie the gateware to the host)."""
    host = [n for n in imported_names(path) if n == "sop.synth.host" or n.startswith("sop.synth.host.")]
    assert host == [], f"{path.name} imports {host}"


def test_the_scan_sees_a_host_import(tmp_path):
    """The import scan resolves relative imports: a gateware file importing the host is found."""
    bad = tmp_path / "probe.py"
    for text in ("from ..host import client\n", "from ..host.client import BoardLink\n",
                 "from sop.synth.host.client import BoardLink\n", "def f():\n    from sop.synth import host\n",
                 "import sop.synth.host.bringup\n"):
        bad.write_text(text)
        assert any(n.startswith("sop.synth.host") for n in imported_names(bad)), text
    bad.write_text("from .protocol import ProtocolEngine\nfrom sop.synth import wire\n")
    assert not any(n.startswith("sop.synth.host") for n in imported_names(bad))


def test_the_protocol_numbers_and_the_host_client_need_no_amaranth():
    loaded = loaded_after("sop.synth.wire", "sop.synth.host.client")
    assert not [m for m in loaded if m == "amaranth" or m.startswith("amaranth.")]
    assert not [m for m in loaded if m.startswith("sop.synth.gateware")]


# -- FSMs written out ------------------------------------------------------------------------------
def fsm_states(path: Path) -> tuple[dict[str, dict[str, list]], list]:
    """({FSM name: {"states": the name nodes of its ``m.State(...)``}}, every ``m.next`` value node)."""
    tree = ast.parse(path.read_text())
    out: dict[str, dict[str, list]] = {}

    def fsm_name(with_node):
        for item in with_node.items:
            call = item.context_expr
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "FSM":
                kw = {k.arg: k.value for k in call.keywords}
                name = kw.get("name")
                return name.value if isinstance(name, ast.Constant) else "fsm"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.With) and (name := fsm_name(node)) is not None:
            rec = out.setdefault(name, {"states": []})
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "State":
                    rec["states"].append(sub.args[0])
    # m.next assignments anywhere in the file (helpers included)
    nexts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Attribute) and t.attr == "next" for t in n.targets)]
    return out, nexts


@pytest.mark.parametrize("name", ["protocol.py", "uart.py"])
def test_every_fsm_state_is_a_literal(name):
    fsms, nexts = fsm_states(GATEWARE / name)
    assert fsms
    for fsm, rec in fsms.items():
        bad = [ast.unparse(s) for s in rec["states"] if not (isinstance(s, ast.Constant) and isinstance(s.value, str))]
        assert bad == [], f"{name} FSM {fsm}: state names not written out: {bad}"
        values = [s.value for s in rec["states"]]
        assert len(values) == len(set(values))
    bad = [ast.unparse(v) for v in nexts if not (isinstance(v, ast.Constant) and isinstance(v.value, str))]
    assert bad == [], f"{name}: m.next set to a computed name: {bad}"
    defined = {s.value for rec in fsms.values() for s in rec["states"]}
    assert {v.value for v in nexts} <= defined


def test_the_literal_check_catches_a_built_name(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('with m.FSM(name="x"):\n    for s in ("A_USE",):\n        with m.State(s):\n'
                     '            m.next = s.replace("USE", "FETCH")\n')
    fsms, nexts = fsm_states(probe)
    assert not isinstance(fsms["x"]["states"][0], ast.Constant) and not isinstance(nexts[0], ast.Constant)


def documented_states() -> dict[str, list[str]]:
    """docs/board-protocol.md, "Engine states": ``| fsm | `STATE` | ...`` rows."""
    text = (ROOT / "docs" / "board-protocol.md").read_text()
    section = text[text.index("## Engine states"):]
    section = section[:section.index("\n## ", 1)]
    out: dict[str, list[str]] = {}
    for fsm, state in re.findall(r"^\| (parser|reply) \| `([A-Z0-9_]+)` \|", section, re.M):
        out.setdefault(fsm, []).append(state)
    return out


def test_the_documented_engine_states_are_the_engines():
    fsms, _ = fsm_states(GATEWARE / "protocol.py")
    code = {fsm: [s.value for s in rec["states"]] for fsm, rec in fsms.items()}
    assert documented_states() == code


# -- command lines ---------------------------------------------------------------------------------
def test_the_makefile_and_cli_name_modules_that_exist():
    makefile = (ROOT / "Makefile").read_text()
    modules = set(re.findall(r"-m (sop\.[\w.]+)", makefile))
    assert {"sop.synth", "sop.synth.flow.bitstream", "sop.synth.host.bringup"} <= modules
    for m in modules:
        assert util.find_spec(m) is not None, m
    cli = (ROOT / "sop" / "cli.py").read_text()
    imports = re.findall(r"from (sop\.synth[\w.]*) import ([\w, ]+)", cli)
    # the protocol's numbers (no Amaranth: test_the_protocol_numbers_and_the_host_client_need_no_amaranth),
    # then the host tools
    assert imports[0] == ("sop.synth.wire", "DEFAULT_BAUD")
    imports = imports[1:]
    assert imports == [("sop.synth.host", "bringup"), ("sop.synth.host", "bringup, client"),
                       ("sop.synth.host", "gemv_bringup")]
    for package, names in imports:
        for name in names.split(", "):
            assert util.find_spec(f"{package}.{name}") is not None, name


@pytest.mark.parametrize("argv, code, text", [
    (["-m", "sop.synth", "--config", "nope"], 2, "configurations"),
    # one line as the other tools': it was "unknown ['nope']; ..." without the prefix (an outside probe)
    (["-m", "sop.synth", "--target", "nope"], 2, "python -m sop.synth: error: unknown ['nope']; configurations: "),
    (["-m", "sop.synth.flow.bitstream"], 2, "argument BOARD: no board named (make bitstream's BOARD= is empty"),
    (["-m", "sop.synth.flow.bitstream", "--help"], 0, "the board: icebreaker, ulx3s, icebreaker-gemv"),
    (["-m", "sop.synth.flow.bitstream", "ulx3s", "--out", "README.md"], 2,
     "README.md: the output folder exists and is not a folder"),
    (["-m", "sop.synth", "--out", "README.md"], 2, "README.md: the output folder exists and is not a folder"),
    (["-m", "sop.synth", "--jobs", "0"], 2, "argument --jobs: must be an integer above 0, got 0"),
    (["-m", "sop.synth.host.bringup", "--sim", "--divisor", "0"], 2, "argument --divisor: must be an integer "
                                                                     "at least 4 and at most 217, got 0"),
    (["-m", "sop.synth.host.gemv_bringup", "--sim", "--divisor", "-4"], 2,
     "argument --divisor: must be an integer at least 4 and at most 217, got -4"),
    (["-m", "sop.synth.host.bringup", "--help"], 0, "--sim"),
    (["-m", "sop.synth.host.gemv_bringup", "--help"], 0, "--sim"),
])
def test_the_entry_points_run(argv, code, text):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == code and text in r.stdout + r.stderr
