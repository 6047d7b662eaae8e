"""`make verilog`: every named configuration generates, lints clean and compiles; the manifest
says what the Verilog has (its ports parsed from the module's header and declarations)."""

import contextlib
import dataclasses
import io
import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from sop.hdl import reference
from sop.hdl.config import named_configs
from sop.hdl import gemv_axis, gemv_config
from sop.hdl.generate import generate, main

LINT_WAIVERS = Path(str(resources.files("sop.hdl").joinpath("lint.vlt")))      # the documented waivers
CONFIGS = named_configs()
# docs/hardware.md's latencies: BF16 8 cycles (9 with a UE4M4 scale: one more multiplier level),
# exact 4; tests/test_hdl_decoder.py measures them in simulation.
# The LUT RAM variants (--lutram-depth, what make synth builds for ECP5) read their tables in two
# cycles: one more.
# The shallow builds (--pipeline shallow, the iCE40 lane) merge two pairs of formatter stages: two fewer.
# 64 lanes (a wide decoder, hdl/config.py): the beat's input stage in front of stage 0, one more.
LATENCY = {"sop4-g16": 8, "e2m3-ue4m4-g16": 9, "sop4-g16-x1": 8, "sop4-g16-exact": 4, "sop4-g16-x64": 9,
           "sop4-g16-lutram16": 9, "e2m3-ue4m4-g16-lutram32": 10, "sop4-g16-shallow": 6, "e2m3-ue4m4-g16-shallow": 7}
VARIANTS = {**CONFIGS, **{f"{n}-lutram{d}": dataclasses.replace(CONFIGS[n], name=f"{n}-lutram{d}", lutram_depth=d)
                          for n, d in (("sop4-g16", 16), ("e2m3-ue4m4-g16", 32))},
            **{f"{n}-shallow": dataclasses.replace(CONFIGS[n], name=f"{n}-shallow", pipeline="shallow")
               for n in ("sop4-g16", "e2m3-ue4m4-g16")}}


@pytest.fixture(scope="module")
def verilog_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("verilog")
    for cfg in VARIANTS.values():
        generate(cfg, out)
    return out


def test_named_configurations_include_the_required_ones():
    assert {"sop4-g16", "e2m3-ue4m4-g16"} <= set(CONFIGS)
    assert CONFIGS["sop4-g16"].lanes == 8 and CONFIGS["e2m3-ue4m4-g16"].lanes == 8
    assert CONFIGS["sop4-g16"].layout.code_bits == 4 and CONFIGS["e2m3-ue4m4-g16"].layout.code_bits == 6
    assert min(c.lanes for c in CONFIGS.values()) == 1


def verilog_ports(text: str, module: str) -> dict[str, tuple[str, int]]:
    """The ports of ``module`` in Verilog ``text``: every name of its header, with the direction
    and width of its declaration in the module body (Yosys's non-ANSI style)."""
    m = re.search(rf"^module {re.escape(module)}\((?P<names>[^)]*)\);(?P<body>.*?)^endmodule", text, re.S | re.M)
    assert m, f"module {module} not in the text"
    names = [n.strip() for n in m["names"].split(",") if n.strip()]
    decls = {d["name"]: (d["dir"], int(d["msb"]) - int(d["lsb"]) + 1 if d["msb"] else 1)
             for d in re.finditer(r"^\s*(?P<dir>input|output|inout)\s+(?:wire\s+|reg\s+)?(?:signed\s+)?"
                                  r"(?:\[(?P<msb>\d+):(?P<lsb>\d+)\]\s+)?(?P<name>\S+?)\s*;", m["body"], re.M)}
    assert sorted(decls) == sorted(names), f"header and declarations disagree on {sorted(set(decls) ^ set(names))}"
    return decls


def test_port_parser_reads_names_directions_and_widths():
    text = ("module other(a);\n  input [9:0] a;\nendmodule\n"
            "module top(x, clk, y);\n  input signed [72:0] x;\n  wire [3:0] t;\n  input clk;\n  output reg [15:0] y;\n"
            "endmodule\n")
    assert verilog_ports(text, "top") == {"x": ("input", 73), "clk": ("input", 1), "y": ("output", 16)}
    with pytest.raises(AssertionError, match="disagree"):             # a header name without declaration
        verilog_ports(text.replace("top(x, clk, y)", "top(x, clk, y, z)"), "top")


@pytest.mark.parametrize("name", VARIANTS)
def test_manifest_describes_the_ports(verilog_dir, name):
    cfg = VARIANTS[name]
    doc = json.loads((verilog_dir / f"{name}.json").read_text())
    ports = {p["name"]: p for p in doc["ports"]}
    assert ports["blocks__payload"]["width"] == cfg.beat_bits + 1 and ports["blocks__payload"]["direction"] == "input"
    assert ports["values__payload"]["width"] == cfg.lanes * doc["lane_word_bits"]
    assert ports["values__payload"]["direction"] == "output" and ports["clk"]["direction"] == "input"
    # exactly the Verilog top's ports, each with its direction and width
    text = (verilog_dir / f"{name}.v").read_text()
    assert verilog_ports(text, doc["module"]) == {p["name"]: (p["direction"], p["width"]) for p in doc["ports"]}
    assert doc["latency_cycles"] == LATENCY[name] == sum(doc["latency_stages"].values())
    # the lane word's fields tile it, LSB first, in the order hdl.reference packs them
    fields = doc["lane_fields"]
    assert [f["lsb"] for f in fields] == [sum(g["width"] for g in fields[:i]) for i in range(len(fields))]
    assert sum(f["width"] for f in fields) == doc["lane_word_bits"] == reference.lane_word_bits(cfg)
    if cfg.output == "exact":
        sig, exp, sign = ({f["name"]: f for f in fields}[k] for k in ("sig", "exp", "sign"))
        assert exp["signed"] and not sig["signed"]
        word = int(reference.pack_exact(cfg, 1, 5, -3))
        assert (word >> sig["lsb"]) & ((1 << sig["width"]) - 1) == 5 and word >> sign["lsb"] == 1
        assert (word >> exp["lsb"]) & ((1 << exp["width"]) - 1) == (1 << exp["width"]) - 3


@pytest.mark.parametrize("name", VARIANTS)
def test_verilator_lint_clean_with_documented_waivers(verilog_dir, name):
    """Clean with the waivers written beside it, ``NAME.vlt`` (hdl/lint.vlt confined to ``NAME.v``: a
    parent's own warnings stay, tests/test_axis.py checks the confinement)."""
    assert shutil.which("verilator"), "verilator not found: run `make setup`"
    r = subprocess.run(["verilator", "--lint-only", "-Wall", f"{name}.vlt", f"{name}.v"], cwd=verilog_dir,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("name", VARIANTS)
def test_iverilog_compiles(verilog_dir, name, tmp_path):
    assert shutil.which("iverilog"), "iverilog not found: run `make setup`"
    r = subprocess.run(["iverilog", "-g2005", "-o", str(tmp_path / "a.vvp"), str(verilog_dir / f"{name}.v")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_lint_catches_a_real_problem(tmp_path):
    """The waivers are narrow: an undriven output still fails the lint."""
    bad = tmp_path / "bad.v"
    bad.write_text("module bad(input clk, output [3:0] q);\nendmodule\n")
    r = subprocess.run(["verilator", "--lint-only", "-Wall", str(LINT_WAIVERS), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "UNDRIVEN" in r.stderr


def test_unknown_configuration_is_refused(capsys):
    assert main(["--config", "nope", "--out", "/nonexistent"]) == 2
    assert "sop4-g16" in capsys.readouterr().err


@pytest.mark.parametrize("columns", [40, 57, 80, 200])
def test_help_names_every_configuration_whole(capsys, monkeypatch, columns):
    """`--help` said only "a named configuration": the names were in the error of a wrong one alone. Each
    name stays whole at any terminal width (argparse's wrap broke `gemv-sop4-g16-bf16` after a hyphen)."""
    from sop.hdl.config import named_configs, residual_configs
    from sop.hdl.gemv_config import gemv_configs

    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    words = set(capsys.readouterr().out.replace(",", " ").split())
    assert exit_.value.code == 0
    for name in [*named_configs(), *residual_configs(), *gemv_configs()]:
        assert name in words, name


def test_lutram_depth_option(tmp_path, monkeypatch, capsys):
    """Without --out the LUT RAM build goes into a folder of its own (it wrote build/verilog's
    sop4-g16.v, the block-RAM build's file of the same name, as README's command line does)."""
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "sop4-g16", "--lutram-depth", "16"]) == 0
    doc = json.loads((tmp_path / "build" / "verilog-lutram16" / "sop4-g16.json").read_text())
    assert doc["parameters"]["lutram_depth"] == 16 and doc["latency_cycles"] == LATENCY["sop4-g16"] + 1
    assert not (tmp_path / "build" / "verilog").exists()
    # 64 words is a sop4 lane's whole table: no split to make
    assert main(["--config", "sop4-g16", "--lutram-depth", "64", "--out", str(tmp_path)]) == 2
    assert "lutram_depth must be 0" in capsys.readouterr().err


def test_pipeline_option_writes_the_bare_shallow_decoders(tmp_path, capsys):
    assert main(["--pipeline", "shallow", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.v")) == sorted(f"{n}.v" for n in CONFIGS)   # no shells, -sp, engines
    doc = json.loads((tmp_path / "sop4-g16.json").read_text())
    assert doc["parameters"]["pipeline"] == "shallow" and doc["latency_cycles"] == LATENCY["sop4-g16-shallow"]
    assert "pipeline" not in json.loads(main_manifest(tmp_path / "deep"))["parameters"]       # the default says nothing
    assert main(["--pipeline", "shallow", "--config", "sop4-g16-sp", "--out", str(tmp_path)]) == 2
    assert "no residual path" in capsys.readouterr().err


def main_manifest(out: Path) -> str:
    assert main(["--config", "sop4-g16", "--out", str(out)]) == 0
    return (out / "sop4-g16.json").read_text()


# The GEMV engines (hdl/gemv.py) `make verilog` writes after the decoders: docs/dot.md section 8's
# latencies (sop4-g16 47 cycles, e2m3-ue4m4-g16 one more: the scale multiplier's extra level; with
# BF16 activations 53: the block dot unit's window path and the BF16 term unit).
ENGINE_LATENCY = {"gemv-sop4-g16": 47, "gemv-e2m3-ue4m4-g16": 48, "gemv-sop4-g16-bf16": 53}


@pytest.fixture(scope="module")
def engines_build(tmp_path_factory):
    """`make verilog`'s files of the three GEMV engines, written once by ``main`` (each engine and its
    AXI4-Stream shell take seconds to convert; the tests below read them, none writes them again):
    the folder, what ``main`` printed and the names of the files it wrote."""
    out = tmp_path_factory.mktemp("gemv")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--out", str(out), *[a for name in ENGINE_LATENCY for a in ("--config", name)]]) == 0
    return out, printed.getvalue(), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("name", ENGINE_LATENCY)
def test_gemv_engines_generate_with_a_manifest_lint_clean_and_compile(engines_build, tmp_path, name):
    out, printed, _ = engines_build
    assert f"{out / name}.v  (GEMV engine" in printed
    doc = json.loads((out / f"{name}.json").read_text())
    text = (out / f"{name}.v").read_text()
    assert doc["module"] == "sop_gemv_" + name.removeprefix("gemv-").replace("-", "_")
    assert verilog_ports(text, doc["module"]) == {p["name"]: (p["direction"], p["width"]) for p in doc["ports"]}
    ports = {p["name"]: p for p in doc["ports"]}
    assert ports["y__payload"]["direction"] == "output" and ports["y__payload"]["width"] == 33   # value, last
    assert doc["latency_cycles"] == ENGINE_LATENCY[name] == sum(doc["latency_stages"].values())
    assert doc["block_order"] == "golden.dot.tile_order" and doc["tile"] >= 17
    lint = subprocess.run(["verilator", "--lint-only", "-Wall", f"{name}.vlt", f"{name}.v"], cwd=out,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stderr[-3000:]
    cc = subprocess.run(["iverilog", "-g2005", "-o", str(tmp_path / "a.vvp"), str(out / f"{name}.v")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr[-3000:]


# The GEMV engines' AXI4-Stream shells (hdl/gemv_axis.py), written beside the engines (main calls
# generate_gemv_axis for each).
@pytest.fixture(scope="module")
def gemv_axis_dir(engines_build):
    assert set(gemv_config.gemv_configs()) == set(ENGINE_LATENCY)        # every engine's shell
    return engines_build[0]


@pytest.mark.parametrize("name", ENGINE_LATENCY)
def test_gemv_axis_shells_lint_clean_compile_and_match_their_manifest(gemv_axis_dir, name):
    cfg = gemv_config.gemv_configs()[name]
    doc = json.loads((gemv_axis_dir / f"{name}_axis.json").read_text())
    text = (gemv_axis_dir / f"{name}_axis.v").read_text()
    ports = verilog_ports(text, doc["module"])
    assert doc["module"] == gemv_axis.module_name(cfg) and ports == {p["name"]: (p["direction"], p["width"])
                                                                      for p in doc["ports"]}
    w = gemv_axis.widths(cfg)
    assert ports == {"aclk": ("input", 1), "aresetn": ("input", 1), "clear": ("input", 1),
                     "status": ("output", len(doc["status_bits"])),
                     **{f"{s}_{sig}": (d if s.startswith("s_") else {"input": "output", "output": "input"}[d],
                                       w[s] if sig == "tdata" else 1)
                        for s in w for sig, d in (("tdata", "input"), ("tvalid", "input"), ("tready", "output"),
                                                  ("tlast", "input"))}}
    assert doc["latency_cycles"] == ENGINE_LATENCY[name] and doc["tdata_bits"] == w
    assert doc["status_bits"][:2] == ["x_loaded", "w_before_x"] and doc["status_bits"][-1] == "load_tlast"
    lint = subprocess.run(["verilator", "--lint-only", "-Wall", str(LINT_WAIVERS), str(gemv_axis_dir / f"{name}_axis.v")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stderr[-3000:]
    cc = subprocess.run(["iverilog", "-g2005", "-o", str(gemv_axis_dir / f"{name}.vvp"),
                         str(gemv_axis_dir / f"{name}_axis.v"), str(gemv_axis_dir / f"{name}_axis_tb.v")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr[-3000:]


def test_gemv_axis_fusesoc_lint_and_sim_targets(gemv_axis_dir, tmp_path):
    """`fusesoc run --target lint` and `--target sim` (the self-checking testbench) on each shell's
    core; the testbench fails on one flipped bit of an expected word."""
    from test_axis import fusesoc            # (test_axis imports this module)

    for name in ENGINE_LATENCY:
        vlnv = f"sop:gemv:{gemv_axis.module_name(gemv_config.gemv_configs()[name])}"
        r = fusesoc(gemv_axis_dir, "lint", vlnv, tmp_path / name)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        r = fusesoc(gemv_axis_dir, "sim", vlnv, tmp_path / name)
        assert r.returncode == 0 and "PASS: 58 y words, 2 layers" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    cores = tmp_path / "cores"
    cores.mkdir()
    name = "gemv-sop4-g16"
    for f in (f"{name}_axis.core", f"{name}_axis.v", f"{name}_axis.vlt"):
        shutil.copy(gemv_axis_dir / f, cores / f)
    tb = (gemv_axis_dir / f"{name}_axis_tb.v").read_text()
    i = tb.index("exp[5] = 33'h") + len("exp[5] = 33'h") + 3
    (cores / f"{name}_axis_tb.v").write_text(tb[:i] + "%x" % (int(tb[i], 16) ^ 1) + tb[i + 1:])
    r = fusesoc(cores, "sim", f"sop:gemv:{gemv_axis.module_name(gemv_config.gemv_configs()[name])}", tmp_path / "broken")
    assert r.returncode != 0 and "FAIL: y word 5" in r.stdout


def test_the_lutram_and_shallow_builds_sit_beside_the_default_in_one_design(engines_build, tmp_path):
    """A LUT-RAM or shallow build's modules (and its shell's FuseSoC VLNV) carry the build in their
    names (config.variant_suffix): Icarus compiles the three builds of sop4-g16, both shells and
    the two GEMV engines in one design (with one name for all it refused every module as declared
    twice), and the cores of one cores root are distinct."""
    builds = {"default": [], "lutram": ["--lutram-depth", "16"], "shallow": ["--pipeline", "shallow"]}
    for folder, extra in builds.items():
        configs = ["sop4-g16"] + (["gemv-sop4-g16"] if folder == "lutram" else [])
        assert main(["--out", str(tmp_path / folder), *[a for c in configs for a in ("--config", c)], *extra]) == 0
    # the default build's gemv-sop4-g16 (engine and shell): the files main wrote for engines_build
    engines, _, written = engines_build
    for f in (n for n in written if n.startswith("gemv-sop4-g16") and not n.startswith("gemv-sop4-g16-")):
        shutil.copy(engines / f, tmp_path / "default" / f)
    modules = {json.loads(p.read_text())["module"] for p in tmp_path.glob("*/*.json")}
    assert {"sop_decoder_sop4_g16", "sop_decoder_sop4_g16_lutram16", "sop_decoder_sop4_g16_shallow",
            "sop_gemv_sop4_g16", "sop_gemv_sop4_g16_lutram16"} <= modules
    vlnvs = [re.search(r"^name: (\S+)", p.read_text(), re.M)[1] for p in tmp_path.glob("*/*.core")]
    assert len(vlnvs) == 4 and len(set(vlnvs)) == 4, vlnvs
    sources = sorted(str(p) for p in tmp_path.glob("*/*.v") if not p.name.endswith("_tb.v"))
    cc = subprocess.run(["iverilog", "-g2005", "-o", str(tmp_path / "all.vvp"), *sources],
                        capture_output=True, text=True, timeout=300)
    assert cc.returncode == 0, cc.stderr[-2000:]
