"""The operating-point registry (golden/points.py): one row added there reaches every tool.

A new point is registered at run time (no file changed) and must show in
`sop formats`, in the configurations `make verilog` writes, in `sop vectors`
and in the `make sim` plan; the registry refuses a malformed or clashing row.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sop import cli
from sop.golden.formats import get_format
from sop.golden.layout import BlockLayout, named_layouts
from sop.golden.points import OperatingPoint, Variant, get_point, operating_points, registered
from sop.hdl import gemv_config, generate
from sop.hdl.config import DecoderConfig, named_configs
from sop.sim import runner
from sop.sim.vectors import read_vectors

LAYER = "encoder.layer.0.attention.self.query.weight"


def fp6_g32() -> OperatingPoint:
    return OperatingPoint("e2m3-ue4m4-g32", BlockLayout(6, 32, get_format("ue4m4")),
                          "E2M3 codes, UE4M4 scale, block 32 (a test point)", codebooks=("e2m3",),
                          lanes=4, variants=(Variant("exact", output="exact"),))


def test_a_registered_point_reaches_formats_verilog_vectors_and_the_sim_plan(tmp_path, capsys):
    name = "e2m3-ue4m4-g32"
    with registered(fp6_g32()):
        # sop formats
        assert cli.main(["formats", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        point = next(p for p in doc["points"] if p["name"] == name)
        assert (point["group"], point["block_bpw"], point["configs"]) == (32, 6 + 8 / 32, [name, name + "-exact"])
        quant = next(q for q in doc["quantizers"] if q["name"] == name)
        assert (quant["kind"], quant["bpw"], quant["group"]) == ("sop", 6.25, 32)
        # make verilog: the point's configuration and its variant
        cfgs = named_configs()
        assert (cfgs[name].lanes, cfgs[name].layout.group, cfgs[name + "-exact"].output) == (4, 32, "exact")
        # sop vectors: real MiniLM rows in the new layout
        assert cli.main(["vectors", "minilm", "--format", name, "--layer", LAYER, "--rows", "2",
                         "--out", str(tmp_path / "v")]) == 0
        capsys.readouterr()
        (layer,) = read_vectors(tmp_path / "v")
        assert layer.layout == BlockLayout(6, 32, get_format("ue4m4")) and layer.headers.shape == (2 * 384 // 32,)
        # make sim: the full plan for the point, the medium one for its variant, vectors from the point
        assert runner.plan_size(cfgs[name], "verilator", quick=False) == "full"
        assert runner.plan_size(cfgs[name + "-exact"], "verilator", quick=False) == "medium"
        assert runner.point_of(cfgs[name + "-exact"]).name == name
        plan = runner.plan_for(cfgs[name], "full", tmp_path / "v")
        assert plan["config"] == name and DecoderConfig.from_description(plan["decoder"]) == cfgs[name]
        # make sim's LUT-RAM runs: every point's own configuration, as make synth builds it on ECP5
        lutram = runner.chosen_configs(None, lutram_ecp5=True)
        assert {n: c.lutram_depth for n, c in lutram.items()} == {"sop4-g16": 16, "e2m3-ue4m4-g16": 32, name: 32}
        # the GEMV engines: only points with blocks of 16 have one (their plan is written for 16-wide
        # x beats); the shell's testbench counts its layers in blocks, so it fits any block size
        assert f"gemv-{name}" not in gemv_config.gemv_configs() and "gemv-e2m3-ue4m4-g16" in gemv_config.gemv_configs()
        g32 = replace(gemv_config.gemv_configs()["gemv-e2m3-ue4m4-g16"], name="g32", layout=cfgs[name].layout)
        assert [(layer.rows, layer.cols) for layer, _ in generate.gemv_testbench_layers(g32)] == [(20, 96), (18, 64)]
    # gone again: nothing else holds a copy
    assert name not in named_configs() and name not in named_layouts()
    assert cli.main(["formats", "--json"]) == 0
    assert name not in {p["name"] for p in json.loads(capsys.readouterr().out)["points"]}


def test_a_registered_point_quantizes_through_the_scheme_registry():
    from sop.golden.decoder import decode_layer
    from sop.quantize.schemes import get_quant_format

    w = np.random.default_rng(5).standard_normal((3, 70))
    with registered(fp6_g32()):
        r = get_quant_format("e2m3-ue4m4-g32").quantize(w, name="t")
    assert r.stream.layout.group == 32 and r.stream.cols == 96          # padded to the block
    np.testing.assert_array_equal(decode_layer(r.stream)[:, :70], r.recon)


def test_the_named_configs_are_the_points_and_their_variants():
    assert list(named_configs()) == ["sop4-g16", "sop4-g16-x1", "sop4-g16-exact", "sop4-g16-x64",
                                     "e2m3-ue4m4-g16"]
    assert {n: (c.lanes, c.output) for n, c in named_configs().items()} == {
        "sop4-g16": (8, "bf16"), "sop4-g16-x1": (1, "bf16"), "sop4-g16-exact": (8, "exact"),
        "sop4-g16-x64": (64, "bf16"), "e2m3-ue4m4-g16": (8, "bf16")}
    assert get_point("sop4-g16").layout.header_bits == 8 and get_point("e2m3-ue4m4-g16").layout.banks == 1


@pytest.mark.parametrize("point, message", [
    (lambda: OperatingPoint("x", BlockLayout(6, 16, get_format("ue4m4")), "d"), "one codebook per LUT bank"),
    (lambda: OperatingPoint("x", BlockLayout(6, 16, get_format("ue4m4")), "d", search="pair"),
     "4-bit codes and a selection bit"),
    (lambda: OperatingPoint("x", BlockLayout(6, 16, get_format("ue4m4")), "d", search="magic",
                            codebooks=("e2m3",)), "search must be one of"),
    (lambda: OperatingPoint("x", BlockLayout(6, 16, get_format("ue4m4")), "d", codebooks=("e2m3",),
                            output="fp16"), "output must be one of"),
    (lambda: OperatingPoint("x", BlockLayout(6, 16, get_format("ue4m4")), "d", codebooks=("e2m3",),
                            variants=(Variant("a"), Variant("a"))), "suffixes must be distinct"),
])
def test_malformed_points_are_refused(point, message):
    with pytest.raises(ValueError, match=message):
        point()


def test_a_name_taken_by_a_point_or_a_configuration_is_refused():
    clash = OperatingPoint("sop4-g16-x64", BlockLayout(6, 16, get_format("ue4m4")), "d", codebooks=("e2m3",))
    with pytest.raises(ValueError, match="already registered: sop4-g16-x64"):
        with registered(clash):
            pass
    assert "sop4-g16-x64" not in operating_points()
