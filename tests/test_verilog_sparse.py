"""`python -m sop.hdl.generate --residuals 1`: the configurations with the residual path generate,
lint clean with the documented waivers, compile in Icarus, and their manifests say what the
Verilog has (ports parsed from it, the residual stage in the latency)."""

import json
import shutil
import subprocess

import pytest
from test_verilog import LINT_WAIVERS, verilog_ports

from sop.hdl.config import MAX_RESIDUALS, named_configs, residual_configs
from sop.hdl.generate import generate, main

SPARSE = residual_configs()


@pytest.fixture(scope="module")
def verilog_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("verilog-sp")
    assert main(["--residuals", "1", "--out", str(out)]) == 0
    return out


def test_the_residual_configurations():
    assert set(SPARSE) == {"sop4-g16-sp", "sop4-g16-x1-sp", "e2m3-ue4m4-g16-sp"}
    for name, cfg in SPARSE.items():
        base = named_configs()[name[:-3]]
        assert cfg.residuals == 1 and (cfg.lanes, cfg.layout, cfg.output) == (base.lanes, base.layout, base.output)


@pytest.mark.parametrize("name", SPARSE)
def test_manifest_describes_the_ports(verilog_dir, name):
    cfg = SPARSE[name]
    doc = json.loads((verilog_dir / f"{name}.json").read_text())
    ports = {p["name"]: p for p in doc["ports"]}
    assert ports["sparse__payload"] == {"name": "sparse__payload", "width": 49, "direction": "input"}
    assert ports["sparse__ready"]["direction"] == "output" and ports["layer_sparse"]["direction"] == "input"
    assert ports["sparse_error"] == {"name": "sparse_error", "width": 4, "direction": "output"}
    text = (verilog_dir / f"{name}.v").read_text()
    assert verilog_ports(text, doc["module"]) == {p["name"]: (p["direction"], p["width"]) for p in doc["ports"]}
    stages = doc["latency_stages"]
    assert doc["latency_cycles"] == sum(stages.values()) and stages["residual"] == 9
    assert doc["parameters"]["residuals"] == cfg.residuals
    assert not (verilog_dir / f"{name}_axis.v").exists()


@pytest.mark.parametrize("name", SPARSE)
def test_verilator_lint_and_iverilog(verilog_dir, name, tmp_path):
    assert shutil.which("verilator") and shutil.which("iverilog"), "simulators not found: run `make setup`"
    r = subprocess.run(["verilator", "--lint-only", "-Wall", str(LINT_WAIVERS), str(verilog_dir / f"{name}.v")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(["iverilog", "-g2005", "-o", str(tmp_path / "a.vvp"), str(verilog_dir / f"{name}.v")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_residuals_refused_where_they_cannot_be(tmp_path, capsys):
    """One usage line (sop.argtypes) before any work: 0 once wrote the whole default build (72 files,
    a minute)."""
    for r, why in [("9", f"must be an integer at least 1 and at most {MAX_RESIDUALS}, got 9"),
                   ("0", f"must be an integer at least 1 and at most {MAX_RESIDUALS}, got 0"),
                   ("-1", f"must be an integer at least 1 and at most {MAX_RESIDUALS}, got -1"),
                   ("two", "not an integer: 'two'")]:
        with pytest.raises(SystemExit) as exit_:
            main(["--residuals", r, "--out", str(tmp_path / "v")])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines() == \
            [f"python -m sop.hdl.generate: error: argument --residuals: {why} (see python -m sop.hdl.generate --help)"]
    assert not (tmp_path / "v").exists()
    for names in [[], ["--config", "sop4-g16"], ["--config", "sop4-g16-sp"]]:   # (a bare name was listed as
        assert main(["--residuals", "1", "--pipeline", "shallow", *names, "--out", str(tmp_path / "v")]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == \
            "python -m sop.hdl.generate: error: --pipeline shallow has no residual path (hdl/residual.py is " \
            "timed against the deep formatter): give --residuals with the deep pipeline"   # -sp "bare decoders")
    assert not (tmp_path / "v").exists()
    with pytest.raises(ValueError, match="need the bf16 output"):
        named_configs()["sop4-g16-exact"].__class__(**{**named_configs()["sop4-g16-exact"].__dict__, "residuals": 1})
    assert generate   # the plain generator is the same function (tests/test_verilog.py)


def test_more_adders_go_into_a_folder_of_their_own(verilog_dir, tmp_path, monkeypatch):
    """Without --out, --residuals 2 wrote build/verilog/sop4-g16-sp.v, replacing `make verilog`'s design of
    one adder under the same file and module names, beside that design's shell (an outside probe). Its top
    module was the one-adder design's ``sop_decoder_<NAME>`` too (and so every submodule's name): Icarus
    refused the two in one design, every module declared twice (an outside probe). With R > 1 the name
    says R; R = 1 keeps its name."""
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "sop4-g16-sp", "--residuals", "2"]) == 0
    two = tmp_path / "build" / "verilog-sp2" / "sop4-g16-sp"
    doc = json.loads(two.with_suffix(".json").read_text())
    assert doc["parameters"]["residuals"] == 2
    assert not (tmp_path / "build" / "verilog").exists()
    one = json.loads((verilog_dir / "sop4-g16-sp.json").read_text())["module"]
    assert (one, doc["module"]) == ("sop_decoder_sop4_g16_sp", "sop_decoder_sop4_g16_sp_r2")
    assert verilog_ports(two.with_suffix(".v").read_text(), doc["module"])       # the Verilog's top, so named
    r = subprocess.run(["iverilog", "-g2005", "-o", str(tmp_path / "both.vvp"), str(verilog_dir / "sop4-g16-sp.v"),
                        str(two.with_suffix(".v"))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

