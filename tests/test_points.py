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
from sop.golden.codebooks import Codebook, get_codebook, register_codebook, registered_codebook
from sop.golden.formats import get_format
from sop.golden.hif import DEFAULT_HIF, hif_format
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
    # an outside probe: each of these was accepted, then failed later (at quantize time, or in every
    # `make verilog` once registered) or, for the HIF of a pair point, gave streams the decoder was not built for
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("mine",)),
     "unknown codebook 'mine'"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("e2m3",)),
     "codebook e2m3 has 64 entries, 6-bit codes; the layout's codes are 4-bit"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("dd4",)),
     "dd4 has no fixed table"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks="nf4"),
     "codebooks must be a tuple of table names .* got 'nf4'"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d",
                            codebooks=(Codebook.from_values("t", np.linspace(-1, 1, 16)),)),
     "codebooks must be a tuple of table names .* got a Codebook"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",), lanes=3),
     "lanes must be a power of two in 1..64, got 3"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",),
                            variants=(Variant("wide", lanes=128),)), "configuration x-wide: lanes must be"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue8m0")), "d", codebooks=("nf4",)),
     "scale format ue8m0 has NaN/Inf codes"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue3m3"), True, True), "d", search="pair",
                            hif=hif_format(4)), "the pair search writes hif-e3m6b5 tables; hif must be that"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue3m3"), True, True), "d", search="pair",
                            codebooks=("nf4", "sh4")), "codebooks must be empty"),
    (lambda: OperatingPoint("My point", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "name must be lower-case letters, digits and '-'"),
    (lambda: OperatingPoint("a_b", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "name must be lower-case letters"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",),
                            variants=(Variant("x/1"),)), "variant suffix name must be"),
    # names the tools derive for other designs: `make verilog` wrote sop4-g16-sp's residual design over a
    # point of that name, and gemv-/board- are the engines' and board cores' (the registry probe)
    (lambda: OperatingPoint("sop4-g16-sp", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "configuration sop4-g16-sp: a name the tools derive"),
    (lambda: OperatingPoint("gemv-x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "configuration gemv-x: a name the tools derive"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",),
                            variants=(Variant("sp2"),)), "configuration x-sp2: a name the tools derive"),
    # module names' endings (an outside probe): sop4-g16-axis was module sop_decoder_sop4_g16_axis, sop4-g16's
    # AXI4-Stream shell, and build/sim/icarus/sop4-g16-axis its bench's folder; -shallow and -lutram16 the
    # shallow and LUT-RAM builds' modules (and -lutram16 the LUT-RAM sim's folder), -sp-r2 the two-adder path's
    (lambda: OperatingPoint("sop4-g16-axis", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "configuration sop4-g16-axis: a name the tools derive"),
    (lambda: OperatingPoint("sop4-g16-shallow", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "configuration sop4-g16-shallow: a name the tools derive"),
    (lambda: OperatingPoint("sop4-g16-lutram16", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "configuration sop4-g16-lutram16: a name the tools derive"),
    (lambda: OperatingPoint("sop4-g16-sp-r2", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",)),
     "configuration sop4-g16-sp-r2: a name the tools derive"),
    (lambda: OperatingPoint("x", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",),
                            variants=(Variant("axis"),)), "configuration x-axis: a name the tools derive"),
])
def test_malformed_points_are_refused(point, message):
    with pytest.raises(ValueError, match=message):
        point()


def test_the_derived_names_refused_are_the_module_names_the_generator_gives():
    """Each ending refused is one hdl/generate.py adds to a configuration's module name: the point's own
    module would be that design of another configuration (checked here from the generator itself)."""
    from sop.hdl.config import residual_configs

    cfg, sp = named_configs()["sop4-g16"], residual_configs(2)["sop4-g16-sp"]
    derived = {generate.axis_module_name(cfg): "sop4-g16-axis",
               generate.module_name(replace(cfg, pipeline="shallow")): "sop4-g16-shallow",
               generate.module_name(replace(cfg, lutram_depth=16)): "sop4-g16-lutram16",
               generate.module_name(sp): "sop4-g16-sp-r2"}
    for module, name in derived.items():
        assert module == "sop_decoder_" + name.replace("-", "_")
        with pytest.raises(ValueError, match=f"configuration {name}: a name the tools derive"):
            OperatingPoint(name, BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",))
    # a name that only contains such a word is no clash
    assert OperatingPoint("axis-shallow1", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",))


def test_a_point_named_after_a_built_in_gemv_engine_is_refused_where_engines_are_listed():
    """A point sop4-g16-bf16 had its engine gemv-sop4-g16-bf16 replaced by sop4-g16's BF16 one, silently
    (and sop4-g16-small shared the small engine's name): an outside probe."""
    for name in ("sop4-g16-bf16", "sop4-g16-small", "sop4-g16-icebreaker"):
        with registered(OperatingPoint(name, BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",))):
            with pytest.raises(ValueError, match=f"operating point\\(s\\) {name}: its GEMV engine would be named"):
                gemv_config.gemv_configs()
    assert gemv_config.gemv_configs()["gemv-sop4-g16-bf16"].act == "bf16"
    with registered(OperatingPoint("sop4-g32-bf16", BlockLayout(4, 32, get_format("ue4m4")), "d", codebooks=("nf4",))):
        assert "gemv-sop4-g32-bf16" not in gemv_config.gemv_configs()     # blocks of 32: no engine, no clash


def test_a_name_taken_by_a_point_or_a_configuration_is_refused():
    clash = OperatingPoint("sop4-g16-x64", BlockLayout(6, 16, get_format("ue4m4")), "d", codebooks=("e2m3",))
    with pytest.raises(ValueError, match="already registered: sop4-g16-x64"):
        with registered(clash):
            pass
    assert "sop4-g16-x64" not in operating_points()


# -- a researcher's own table and point (an outside probe) -----------------------------------------------

#: a 16-entry table in code order, as a paper would give it: tanh-companded levels
TANH4 = tuple(np.tanh(np.linspace(-2, 2, 16)) / np.tanh(2))


def test_a_registered_table_reaches_a_point_the_quantizer_and_the_golden_decoder():
    from sop.golden.decoder import decode_layer
    from sop.quantize.schemes import get_quant_format

    w = np.random.default_rng(7).standard_normal((4, 64))
    with registered_codebook("tanh4", TANH4) as cb, \
            registered(OperatingPoint("tanh4-g16", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("tanh4",))):
        assert cb.bits == 4 and get_codebook("tanh4") == cb
        r = get_quant_format("tanh4-g16").quantize(w)
        # the LUT image is the table's, each entry rounded into HIF by golden's rule
        assert np.array_equal(r.stream.luts[0], DEFAULT_HIF.encode(np.array(TANH4)))
        np.testing.assert_array_equal(decode_layer(r.stream), r.recon)
        assert cli.main(["codebook", "tanh4", "--json"]) == 0
    with pytest.raises(ValueError, match="unknown codebook 'tanh4'"):        # gone again, cache included
        get_codebook("tanh4")


@pytest.mark.parametrize("name, values, message", [
    ("t15", TANH4[:15], "15 entries, need a power of two"),
    ("t17", TANH4 + (0.5,), "17 entries, need a power of two"),
    ("t8", TANH4[::2], "8 entries; a LUT bank holds 16 or 64"),
    ("tdup", TANH4[:15] + (TANH4[14],), "entries 14 and 15 .* are one hif-e3m6b5 value"),
    ("tnear", TANH4[:15] + (TANH4[14] + 1e-4,), "entries 14 and 15"),        # one value once rounded into HIF
    ("tnan", TANH4[:15] + (float("nan"),), "entries must be finite"),
    ("tinf", TANH4[:15] + (float("inf"),), "entries must be finite"),
    ("tbig", TANH4[:15] + (1e3,), "exceeds the largest hif-e3m6b5 value"),
    ("nf4", TANH4, "codebook 'nf4' is already defined"),
    ("dd4", TANH4, "codebook 'dd4' is already defined"),
    ("My Table", TANH4, "codebook name must be lower-case"),
    # anything but one list of real numbers (an outside probe): a complex table lost its imaginary parts
    # (a ComplexWarning), strings were parsed, a 4 x 4 array read row by row, None was "must be finite"
    ("tcplx", np.array(TANH4) + 0.5j, "entries must be real numbers, got an array of complex128"),
    ("tstr", tuple(str(v) for v in TANH4), "entries must be real numbers, got an array of <U"),
    ("tnone", TANH4[:15] + (None,), "entries must be real numbers, got an array of object"),
    ("t4x4", np.array(TANH4).reshape(4, 4), "entries must be one list in code order, got an array of shape \\(4, 4\\)"),
])
def test_a_bad_table_is_refused_in_one_error(name, values, message):
    with pytest.raises(ValueError, match=message):
        register_codebook(name, values)
    assert name in ("nf4", "dd4") or name not in cli_codebooks()


def test_a_bfloat16_table_is_refused_in_one_value_error():
    """A torch bfloat16 tensor was torch's TypeError out of numpy's cast, without the table's name."""
    import torch

    with pytest.raises(ValueError, match="codebook tbf: entries must be real numbers numpy can read .*BFloat16"):
        register_codebook("tbf", torch.tensor(TANH4, dtype=torch.bfloat16))
    with registered_codebook("tf32", torch.tensor(TANH4, dtype=torch.float32)) as cb:    # float32: read as is
        assert np.array_equal(cb.raw, np.array(TANH4, dtype=np.float32).astype(np.float64))


def cli_codebooks() -> list[str]:
    from sop.golden.codebooks import codebook_names

    return codebook_names()


def test_a_table_in_descending_or_sign_magnitude_order_is_kept_in_code_order():
    """Code order is the table's (fp4 and int4 are not ascending), so an unsorted table is no error."""
    with registered_codebook("tanh4-rev", TANH4[::-1]) as cb:
        assert np.array_equal(cb.values, get_codebook("tanh4-rev").values) and cb.values[0] == 1.0
    with registered_codebook("signed0", (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0,
                                         -3.0, -4.0, -6.0)) as cb:     # E2M1's +0 and -0 are two codes
        assert np.array_equal(cb.values, get_codebook("fp4").values)


def test_a_point_quantizes_its_tables_in_its_own_hif():
    """A blockwise point's streams carry its HIF, the one its decoder is built for: it was the default
    HIF's tables, while hdl.config built the decoder for the point's (a silent mismatch)."""
    from sop.quantize.schemes import get_quant_format

    h = hif_format(4)
    with registered(OperatingPoint("nf4-h4", BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",), hif=h)):
        r = get_quant_format("nf4-h4").quantize(np.random.default_rng(3).standard_normal((2, 32)))
        assert r.stream.hif == h == named_configs()["nf4-h4"].hif
        assert np.array_equal(r.stream.luts[0], get_codebook("nf4", h).hif_codes)


def test_a_point_of_a_quantizer_name_is_refused_where_formats_are_listed():
    """A point named like a baseline replaced that baseline in `--format` (or was hidden behind
    sop-budget), silently."""
    from sop.quantize.schemes import get_quant_format

    for name in ("nvfp4", "sop-budget"):
        with registered(OperatingPoint(name, BlockLayout(4, 16, get_format("ue4m4")), "d", codebooks=("nf4",))):
            with pytest.raises(ValueError, match=f"operating point\\(s\\) {name}: the name of a quantizer format"):
                get_quant_format("sop4-g16")
    assert get_quant_format("nvfp4").kind == "baseline"


def test_a_point_travels_to_a_testbench_process(tmp_path):
    """A simulator's Python imports the modules afresh: a run-time table and point must reach it
    through the runner's environment (sim.sim_env), or its vectors name no point (an outside probe)."""
    import os
    import subprocess
    import sys

    from sop.golden.points import point_from_spec, point_spec
    from sop.sim import sim_env

    (tmp_path / "plan.json").write_text("{}")
    with registered_codebook("tanh4", TANH4):
        pt = OperatingPoint("tanh4-g32", BlockLayout(4, 32, get_format("ue4m4")), "d", codebooks=("tanh4",),
                            lanes=4, variants=(Variant("exact", output="exact"),), hif=hif_format(5))
        want = [pt.describe(), get_codebook("tanh4", pt.hif).values.tolist()]
        with registered(pt):
            assert point_from_spec(json.loads(json.dumps(point_spec(pt)))) == pt
            env = {**os.environ, **sim_env(tmp_path / "plan.json", tmp_path / "report.json")}
    code = ("import json; from sop.sim import read_plan; read_plan(); from sop.golden.points import get_point; "
            "from sop.golden.codebooks import get_codebook; p = get_point('tanh4-g32'); "
            "print(json.dumps([p.describe(), get_codebook('tanh4', p.hif).values.tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(json.dumps(want))


def test_the_sim_caches_a_points_vectors_by_its_definition_not_its_name():
    """`build/vectors/<point>-quick` was keyed by the name alone: a table registered again with other
    values under one name reused the old table's vectors (they carry their own LUTs, so the run still
    passed, testing the old table; the registry probe). Now the folder names the definition's digest."""
    cfg = named_configs()["sop4-g16"]
    layout = BlockLayout(4, 16, get_format("ue4m4"))

    def folder(values, **kw):
        with registered_codebook("tanh4", values), \
                registered(OperatingPoint("tanh4-g16", layout, "d", codebooks=("tanh4",), **kw)) as pt:
            return runner.vectors_folder(pt, cfg, quick=True)

    first = folder(TANH4)
    assert first == folder(TANH4)                                   # the same definition: the same cache
    assert first.name.startswith("tanh4-g16-") and first.name.endswith("-quick")
    others = {folder(TANH4[::-1]), folder(TANH4, hif=hif_format(5)), folder(TANH4, lanes=4)}
    assert first not in others and len(others) == 3                  # other values, HIF or lanes: not it


def test_the_sims_cached_vectors_are_keyed_by_the_vector_files_version(monkeypatch):
    """A vector set cached by a run of another version of the vector files was kept under the same name, and
    the next run's reader refused it (or, for the AXI shell's sparse rows, named by the point alone, a table
    defined again reused it): every cached set names the point's digest and the files' version."""
    from sop.sim import vectors

    cfg, pt = named_configs()["sop4-g16"], get_point("sop4-g16")
    now = runner.vectors_folder(pt, cfg, quick=True), runner.cached_vectors_folder(pt, "-sparse-rows16")
    assert all(f"-v{vectors.VERSION}" in f.name and runner.point_digest(pt) in f.name for f in now)
    monkeypatch.setattr(vectors, "VERSION", vectors.VERSION + 1)
    later = runner.vectors_folder(pt, cfg, quick=True), runner.cached_vectors_folder(pt, "-sparse-rows16")
    assert not set(now) & set(later)


def test_a_point_a_script_made_with_numpy_numbers_travels_as_its_spec():
    """A point whose formats a script built with numpy's integers (``FloatFormat(bits=np.int64(6))``, say from
    an array of settings): its spec, which --jobs workers and simulators read it from, had numpy scalars in it,
    which the spec's type checks refuse (``scale: bits must be an integer``) and json cannot write."""
    from sop.golden.formats import FloatFormat
    from sop.golden.points import point_from_spec, point_spec

    i = np.int64
    scale = FloatFormat("ue3m3-np", i(6), False, i(3), i(3), i(3))
    pt = OperatingPoint("np-g16", BlockLayout(i(4), i(16), scale, signed_scale=True, select_bit=True), "numpy numbers",
                        codebooks=("nf4", "bof4"),
                        lanes=i(8))
    spec = point_spec(pt)
    assert point_from_spec(spec) == pt and point_from_spec(json.loads(json.dumps(spec))) == pt
    assert type(spec["layout"]["scale"]["bits"]) is int and type(spec["lanes"]) is int
