"""The package works as a wheel (issue 12): built from the checkout, installed (not editable) into
a fresh venv, and run from a working directory that is not the checkout.

The wheel is built from a copy of the tree (git's tracked and untracked-but-not-ignored files, so
the checkout's build/ is never touched) with ``--no-build-isolation``, and installed with
``--no-deps`` into a venv made for the test. Installing torch and the rest again would take
minutes: a ``.pth`` file in the new venv lists this venv's site-packages instead. Python does
not process the ``.pth`` files inside a folder added that way, so this venv's editable ``sop``
finder stays off: ``sop`` comes from the wheel (checked). Every command runs from an empty
temporary folder; its outputs must land there (``build/`` under the working directory) and
nothing may be written into the new venv's site-packages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = tuple(sorted(p.name for p in (ROOT / "sop").iterdir() if p.is_symlink()))   # sop/<f> -> ../<f>
LAYER = "encoder.layer.0.attention.self.query.weight"
SKIP_WALK = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}


def source_files() -> list[str]:
    """The checkout's files a build sees: git's tracked and untracked-but-not-ignored ones."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return sorted({n for n in out.split("\0") if n and os.path.lexists(ROOT / n)})
    names = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_WALK and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(ROOT)
        names += [str(rel / f) for f in filenames if not f.endswith(".pyc")]
        names += [str(rel / d) for d in dirnames if (Path(dirpath) / d).is_symlink()]
    return sorted(names)


def package_files() -> set[str]:
    """What the wheel must hold: every file of sop/ and of the folders its symlinks reach, as sop/..."""
    want = set()
    for name in source_files():
        top, _, rest = name.partition("/")
        if top in FOLDERS and rest:
            want.add(f"sop/{name}")
        elif top == "sop" and not (ROOT / name).is_symlink():
            want.add(name)
    return want


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


def _snapshot(folder: Path) -> set[str]:
    """Files under ``folder``, byte-code caches left out (Python writes those on import)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if "__pycache__" not in p.parts and not p.is_dir()}


class Installed:
    """The wheel installed in a fresh venv, and a working directory of its own."""

    def __init__(self, base: Path):
        src, dist, self.venv, self.cwd = base / "src", base / "dist", base / "venv", base / "work"
        for name in source_files():                       # a copy: the build writes build/ and *.egg-info
            dst = src / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / name).is_symlink():
                os.symlink(os.readlink(ROOT / name), dst)
            else:
                shutil.copy2(ROOT / name, dst)
        self._check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                     "--no-index", "-w", str(dist), str(src)], "pip wheel")
        wheels = list(dist.glob("*.whl"))
        assert len(wheels) == 1, wheels
        self.wheel = wheels[0]
        self._check([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], "venv")
        self.python = self.venv / "bin" / "python"
        self._check([sys.executable, "-m", "pip", "--python", str(self.python), "install", "-q", "--no-deps",
                     "--no-index", str(self.wheel)], "pip install")
        self.site = _site_packages(self.python)
        # this venv's dependencies (torch, amaranth, cocotb, ...), without its editable `sop` finder
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (self.site / "_sop_test_deps.pth").write_text("".join(p + "\n" for p in sorted(ours)))
        self.cwd.mkdir()
        # the child's own tool environment, not the one conftest set for this process
        here = {str(Path(sys.executable).parent), *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                     if p.startswith(tuple(ours)))}
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "VIRTUAL_ENV", "YOWASP_CACHE_DIR", "PYTHONHOME")}
        self.env["PATH"] = os.pathsep.join([str(self.venv / "bin")] + [p for p in os.environ["PATH"].split(os.pathsep)
                                                                        if p not in here])
        self.before = _snapshot(self.site)

    @staticmethod
    def _check(argv: list[str], what: str) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{what} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    def run(self, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
        """Run a command of the venv in the working directory; it must succeed and leave site-packages alone."""
        exe = argv[0] if argv[0].startswith("/") else str(self.venv / "bin" / argv[0])
        r = subprocess.run([exe, *argv[1:]], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"{' '.join(argv)} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        written = _snapshot(self.site) - self.before
        assert not written, f"{' '.join(argv)} wrote into site-packages: {sorted(written)[:10]}"
        return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_real_files_of_every_folder(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        infos = z.infolist()
    links = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000]
    assert not links, f"symlinks in the wheel: {links}"
    names = {i.filename for i in infos}
    missing = package_files() - names
    assert not missing, f"left out of the wheel (package-data or __init__.py missing): {sorted(missing)}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"sop"}, f"top-level names besides sop: {tops}"
    for data in ("sop/golden/data/bof4.json", "sop/hdl/lint.vlt", "sop/sim/tb_decoder.py"):
        assert data in names
    licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]   # the text pyproject's
    assert len(licenses) == 1, sorted(names)                                      # Apache-2.0 promises
    with zipfile.ZipFile(installed.wheel) as z:
        assert z.read(licenses[0]).startswith(b"                                 Apache License\n")
    assert (installed.site / "sop" / "golden" / "formats.py").is_file()
    assert not (installed.site / "sop" / "golden").is_symlink()


def test_the_wheel_version_is_the_package_version(installed):
    """pyproject's version is dynamic: the wheel's name and metadata carry sop.__version__."""
    import sop
    assert installed.wheel.name.startswith(f"sop_decoder-{sop.__version__}-"), installed.wheel.name
    r = installed.run("python", "-c", "import importlib.metadata as m; print(m.version('sop-decoder'))")
    assert r.stdout.strip() == sop.__version__


def test_sop_comes_from_the_wheel(installed):
    r = installed.run("python", "-c",
                      "import sys, sop, sop.golden.codebooks, sop.synth; from sop import toolenv; "
                      "print(sop.__file__); print(toolenv.lint_waivers()); "
                      "print(any('editable' in m for m in sys.modules))")
    sop_file, waivers, editable = r.stdout.split()
    assert Path(sop_file).resolve().is_relative_to(installed.site.resolve()), sop_file
    assert Path(waivers).is_file() and Path(waivers).resolve().is_relative_to(installed.site.resolve()), waivers
    assert editable == "False"


def test_sop_formats_and_a_codebook_from_package_data(installed):
    assert "nf4-g64" in installed.run("sop", "formats").stdout
    book = json.loads(installed.run("sop", "codebook", "bof4", "--json").stdout)   # golden/data/bof4.json
    assert book["name"] == "bof4" and len(book["values"]) == 16


def test_sop_eval_writes_under_the_working_directory(installed):
    installed.run("sop", "eval", "minilm", "--format", "nf4-g64", "--include", LAYER, "--calib-sentences", "4",
                  "--no-e2e", "--quiet", "--json", "eval.json")
    assert json.loads((installed.cwd / "eval.json").read_text())
    assert list((installed.cwd / "build" / "calib").glob("*.npz")), "the calibration cache is not under build/"


def test_generate_and_verilator_lint_with_the_packaged_waivers(installed):
    installed.run("python", "-m", "sop.hdl.generate", "--out", "verilog", "--config", "sop4-g16")
    v = installed.cwd / "verilog" / "sop4-g16.v"
    assert v.is_file() and (installed.cwd / "verilog" / "sop4-g16.json").is_file()
    # the user's way: the project's tool environment, then verilator with hdl/lint.vlt from the package
    lint = ("import subprocess, sys; from sop import toolenv; toolenv.apply(); "
            "sys.exit(subprocess.run(['verilator', '--lint-only', '-Wall', str(toolenv.lint_waivers()), "
            "sys.argv[1]]).returncode)")
    installed.run("python", "-c", lint, str(v))


def test_the_sim_runner_without_make(installed):
    if shutil.which("iverilog") is None:
        pytest.fail("iverilog not found: run `make setup`")
    r = installed.run("python", "-m", "sop.sim.runner", "--config", "sop4-g16", "--quick", "--sim", "icarus")
    assert re.search(r"sop4-g16 \[icarus, quick\]: [1-9]\d* vectors checked, 0 mismatches", r.stdout), r.stdout[-2000:]
    report = installed.cwd / "build" / "sim" / "icarus" / "sop4-g16" / "report.json"
    assert json.loads(report.read_text())["mismatches"] == 0

