"""The cocotb regression's fast subset (`make sim` runs the whole of it).

Real simulators on the generated Verilog: Icarus for the two operating points
and sop4-g16 with its tables in LUT RAM rows (what ECP5 builds), Verilator for
the 1-lane configuration; and a deliberately broken design must
make the regression report mismatches.
"""

import dataclasses
import json
import os

import pytest
from amaranth.back import verilog

import mutants
from sop.golden.layout import named_layouts
from sop.hdl.config import named_configs
from sop.hdl.decoder import Decoder
from sop.hdl.generate import module_name
from sop.sim import runner
from sop.sim.vectors import VectorError, make_vectors, read_vectors

CONFIGS = named_configs()


@pytest.mark.parametrize("name,sim,lutram_depth", [("sop4-g16", "icarus", 0), ("e2m3-ue4m4-g16", "icarus", 0),
                                                   ("sop4-g16-x1", "verilator", 0), ("sop4-g16", "icarus", 16)])
def test_regression_quick(name, sim, lutram_depth, tmp_path):
    # A fixed seed: the coverage bound below is then a fact about this stimulus, not a chance
    # (`make sim` draws a new seed every run).
    cfg = dataclasses.replace(CONFIGS[name], lutram_depth=lutram_depth)
    s = runner.run(cfg, sim, quick=True, build_dir=tmp_path / "build", seed=1)
    print(runner.summary_line(s))
    assert s["failed_tests"] == 0 and s["mismatches"] == 0
    assert s["checked"] > 5000 and s["coverage_hit"] / s["coverage_bins"] > 0.5


@pytest.mark.parametrize("mutant", ["bank", "mux"])
def test_regression_reports_a_broken_design(mutant, tmp_path):
    cfg = CONFIGS["sop4-g16"]
    broken = Decoder(cfg, **{mutant: {"bank": mutants.FlippedLutBit, "mux": mutants.InvertedSelect}[mutant]})
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(broken, name=module_name(cfg), emit_src=False))
    s = runner.run(cfg, "icarus", quick=True, verilog=v, build_dir=tmp_path / "build", vectors=False)
    assert s["mismatches"] > 0 and s["failed_tests"] == 1


def test_vectors_round_trip_and_bad_files(tmp_path):
    out = tmp_path / "v"
    make_vectors("minilm", "sop4-g16", ["encoder.layer.1.attention.self.key.weight"], out, rows=4)
    (layer,) = read_vectors(out)
    assert layer.layout == named_layouts()["sop4-g16"] and layer.headers.shape == (4 * 384 // 16,)
    doc = json.loads((out / "vectors.json").read_text())
    blocks = out / doc["layers"][0]["files"]["blocks"]
    good = blocks.read_text()
    blocks.write_text(good[:-10])                                     # truncated
    with pytest.raises(VectorError, match=r"blocks.hex: SHA-256 does not match .*sha256.blocks"):
        read_vectors(out)
    blocks.write_text(good)
    del doc["layers"][0]["offset"]
    (out / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(VectorError, match=r"vectors.json layers\[0\]: field 'offset' is missing"):
        read_vectors(out)
    (out / "vectors.json").write_text("{not json")
    with pytest.raises(VectorError, match="not valid JSON"):
        read_vectors(out)
    with pytest.raises(VectorError, match="no such vector index"):
        read_vectors(tmp_path / "nowhere")


def test_missing_simulator_says_how_to_install(monkeypatch):
    monkeypatch.setitem(runner.SIMULATORS, "icarus", "iverilog-not-installed")
    monkeypatch.setenv("PATH", os.environ["PATH"])
    with pytest.raises(runner.SimulatorMissing, match="make setup"):
        runner.check_simulator("icarus")
