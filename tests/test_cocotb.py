"""The cocotb regression's fast subset (`make sim` runs the whole of it).

Real simulators on the generated Verilog: Icarus for the two operating points,
for sop4-g16 with its tables in LUT RAM rows (what ECP5 builds) and for a
configuration made by hand at run time (in no registry: the bench rebuilds it
from the plan's description), Verilator for the 1-lane configuration. Each run
must check every value of every block its plan streams (the reset job's cut
layer aside), and its coverage must be exactly the bins of those blocks,
rebuilt here from the plan and the seed. Broken designs (a flipped table bit,
an inverted bank select, an output beat dropped) must make the streaming
scoreboard report mismatches.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring

import mutants
import residual_mutants
from sop.golden.layout import named_layouts
from sop.hdl.config import DecoderConfig, named_configs, residual_configs
from sop.hdl.decoder import Decoder
from sop.hdl.generate import module_name
from sop.sim import runner, stimulus
from sop.sim.vectors import VectorError, make_vectors, read_vectors

CONFIGS = named_configs()
SPARSE = residual_configs()
# Made here, registered nowhere: the simulator's process must build it from the plan alone.
ADHOC = DecoderConfig("adhoc-sop4-x2-exact", 2, named_layouts()["sop4-g16"], output="exact")


def plan_blocks(summary: dict, build_dir, cfg) -> tuple[int, stimulus.Coverage, stimulus.Coverage]:
    """(values the plan's checked blocks hold, their coverage, the corners job's coverage),
    rebuilt from the plan the runner wrote and the seed the bench reported."""
    plan = json.loads((build_dir / "plan.json").read_text())
    assert DecoderConfig.from_description(plan["decoder"]) == cfg
    content, _ = stimulus.seeded_rngs(summary["seed"])
    values, cov, corners = 0, stimulus.Coverage(cfg), stimulus.Coverage(cfg)
    for job in stimulus.plan_jobs(cfg, plan, content):
        for layer in job.checked:
            values += layer.codes.size
            cov.add(layer.headers, layer.codes)
            if job.kind == "corners":
                corners.add(layer.headers, layer.codes)
    return values, cov, corners


# Verilator here on the 1-lane decoder with the residual path; without it, tests/test_mutate.py's
# tiny run passes its regression (the mutation flow's tiny plan) on sop4-g16-x1 in Verilator twice,
# and `make sim SIM=verilator` runs every configuration's quick and full plans.
@pytest.mark.parametrize("cfg,sim", [
    (CONFIGS["sop4-g16"], "icarus"), (CONFIGS["e2m3-ue4m4-g16"], "icarus"),
    (dataclasses.replace(CONFIGS["sop4-g16"], lutram_depth=16), "icarus"),
    (ADHOC, "icarus"), (SPARSE["sop4-g16-sp"], "icarus"), (SPARSE["sop4-g16-x1-sp"], "verilator")],
    ids=["sop4-g16", "e2m3-ue4m4-g16", "sop4-g16-lutram16", "adhoc", "sop4-g16-sp", "sop4-g16-x1-sp-verilator"])
def test_regression_quick(cfg, sim, tmp_path, monkeypatch):
    # A fixed seed reproduces a run; the checks below hold for any seed (`make sim` draws one each run).
    # Exported variables do not replace the runner's own (cocotb's runner lays the environment over them).
    monkeypatch.setenv("COCOTB_RANDOM_SEED", "777")
    monkeypatch.setenv("SOP_SIM_PLAN", str(tmp_path / "not-the-plan.json"))
    build = tmp_path / "build"
    s = runner.run(cfg, sim, quick=True, build_dir=build, seed=1)
    print(runner.summary_line(s))
    assert s["failed_tests"] == 0 and s["mismatches"] == 0 and s["seed"] == 1
    values, cov, corners = plan_blocks(s, build, cfg)
    assert s["checked"] == values                      # every value of every checked block, once
    assert (s["coverage_hit"], s["coverage_bins"]) == cov.counts and s["coverage_map"] == cov.bitmap()
    # the corners job alone: every code x bank x sign at the smallest and largest scale exponent
    lay = cfg.layout
    assert corners.counts[0] == (1 << lay.code_bits) * lay.banks * (2 if lay.signed_scale else 1) * 2
    assert ((cov.hit | corners.hit) == cov.hit).all()
    if cfg.residuals:           # the sparse job and the budget layer's entries, no error bit set
        assert s["sparse_entries"] > 100 and not any(s["sparse_errors"].values())


class Tampered(wiring.Component):
    """The decoder with one of its streams tampered with after its ``index``-th beat
    (``tamper``); its tables and offset wired straight through."""

    def __init__(self, cfg: DecoderConfig, index: int = 40):
        self.decoder, self.index = Decoder(cfg), index
        super().__init__(self.decoder.signature)

    def elaborate(self, platform):
        m = Module()
        m.submodules.decoder = dec = self.decoder
        wiring.connect(m, wiring.flipped(self.load), dec.load)
        m.d.comb += [dec.offset.eq(self.offset), dec.offset_we.eq(self.offset_we)]
        self.tamper(m, dec)
        return m


class DropsABeat(Tampered):
    """The ``index``-th output beat swallowed (taken from the decoder, never offered): every beat
    after it comes one place early."""

    def tamper(self, m, dec):
        wiring.connect(m, wiring.flipped(self.blocks), dec.blocks)
        count = Signal(range(self.index + 2))
        drop = count == self.index
        m.d.comb += [self.values.payload.eq(dec.values.payload), self.values.valid.eq(dec.values.valid & ~drop),
                     dec.values.ready.eq(self.values.ready | drop)]
        with m.If(dec.values.valid & dec.values.ready & (count <= self.index)):
            m.d.sync += count.eq(count + 1)


class StopsTaking(Tampered):
    """``blocks.ready`` low for good after the ``index``-th input beat: a design that stops taking
    input (the host sequence would wait for it forever)."""

    def tamper(self, m, dec):
        wiring.connect(m, wiring.flipped(self.values), dec.values)
        count = Signal(range(self.index + 1))
        stop = count == self.index
        m.d.comb += [dec.blocks.payload.eq(self.blocks.payload), dec.blocks.valid.eq(self.blocks.valid & ~stop),
                     self.blocks.ready.eq(dec.blocks.ready & ~stop)]
        with m.If(self.blocks.valid & self.blocks.ready):
            m.d.sync += count.eq(count + 1)


def test_a_design_that_stops_taking_input_fails_the_regression_not_hangs_it(tmp_path):
    """Every wait has a bound: the host sequence of a job ends within its cycle bound or the test
    fails naming it (the driver used to wait for ``blocks.ready`` forever)."""
    cfg = CONFIGS["sop4-g16"]
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(StopsTaking(cfg), name=module_name(cfg), emit_src=False))
    s = runner.run(cfg, "icarus", quick=True, verilog=v, build_dir=tmp_path / "build", vectors=False)
    assert s["failed_tests"] == 1
    assert "the host sequence ran past" in (tmp_path / "build" / "sim.log").read_text()


def test_a_vector_set_that_disagrees_with_golden_fails_the_run_and_its_line_says_why(tmp_path, monkeypatch):
    """One expected value of a vector set changed, its SHA-256 made good: the run fails before its report,
    and the summary line names the reason, the seed and the log (it said only "0 vectors checked, None
    mismatches, coverage 0/1 = 0.000 (seed None, ...)"; an outside probe)."""
    cfg, out = CONFIGS["sop4-g16-x1"], tmp_path / "v"
    make_vectors("minilm", "sop4-g16", ["encoder.layer.0.attention.self.query.weight"], out, rows=2)
    doc = json.loads((out / "vectors.json").read_text())
    bf16 = out / doc["layers"][0]["files"]["bf16"]
    lines = bf16.read_text().splitlines()
    lines[1] = f"{int(lines[1], 16) ^ 1:04x}"
    bf16.write_text("\n".join(lines) + "\n")
    doc["layers"][0]["sha256"]["bf16"] = hashlib.sha256(bf16.read_bytes()).hexdigest()
    (out / "vectors.json").write_text(json.dumps(doc))
    monkeypatch.setattr(runner, "minilm_vectors", lambda cfg, quick: out)
    s = runner.run(cfg, "icarus", quick=True, build_dir=tmp_path / "build", seed=1)
    line = runner.summary_line(s)
    assert s["failed_tests"] == 1 and s["checked"] == 0, line
    assert "FAILED: encoder.layer.0.attention.self.query.weight: BF16 vector file disagrees with golden" in line
    assert "(seed 1," in line and f"(the log: {tmp_path / 'build' / 'sim.log'})" in line


@pytest.mark.parametrize("mutant", ["bank", "mux", "drop"])
def test_regression_reports_a_broken_design(mutant, tmp_path):
    cfg = CONFIGS["sop4-g16"]
    broken = DropsABeat(cfg) if mutant == "drop" else \
        Decoder(cfg, **{mutant: {"bank": mutants.FlippedLutBit, "mux": mutants.InvertedSelect}[mutant]})
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(broken, name=module_name(cfg), emit_src=False))
    s = runner.run(cfg, "icarus", quick=True, verilog=v, build_dir=tmp_path / "build", vectors=False)
    assert s["mismatches"] > 0 and s["failed_tests"] == 1
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "lane" in log and "expected" in log                    # reported beat by beat as it came
    if mutant == "drop":
        assert "output beat 40 lane" in log                        # the first beat out of place


@pytest.mark.parametrize("mutant", ["never hold", "neighbour lane"])
def test_regression_reports_a_broken_residual_path(mutant, tmp_path):
    cfg = SPARSE["sop4-g16-sp"]
    kw = {"never hold": {"merge": residual_mutants.NeverHold},
          "neighbour lane": {"path": residual_mutants.NeighbourLane}}[mutant]
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(Decoder(cfg, **kw), name=module_name(cfg), emit_src=False))
    s = runner.run(cfg, "icarus", quick=True, verilog=v, build_dir=tmp_path / "build", vectors=False)
    assert s["mismatches"] > 0 and s["failed_tests"] == 1


def test_sparse_vectors_round_trip_and_bad_files(tmp_path):
    """`sop vectors` of a sop-budget artifact carries its layers' residuals; a sparse file that
    is not strictly increasing, indexes past the layer or holds a non-finite value is refused
    with the line that does."""
    art, names = runner.sparse_artifact("sop4-g16")
    out = tmp_path / "v"
    make_vectors(str(art), "sop4-g16", names[:1], out, rows=8)
    (layer,) = read_vectors(out)
    assert len(layer.sparse_index) > 0 and (np.diff(layer.sparse_index) > 0).all()
    assert layer.sparse_index[-1] < layer.codes.size
    doc = json.loads((out / "vectors.json").read_text())
    path = out / doc["layers"][0]["files"]["sparse"]
    good = path.read_text().splitlines()
    for bad, match in [([good[1], good[0]] + good[2:], "must be strictly increasing"),
                       (good[:-1] + [f"{layer.codes.size + 3} 3f80"], "past the layer"),
                       ([good[0].split()[0] + " 7fc0"] + good[1:], "not a finite BF16"),
                       (["12 zz"] + good[1:], "expected 'index value'")]:
        text = "\n".join(bad) + "\n"
        path.write_text(text)
        doc["layers"][0]["sha256"]["sparse"] = hashlib.sha256(text.encode()).hexdigest()
        (out / "vectors.json").write_text(json.dumps(doc))
        with pytest.raises(VectorError, match=match) as err:
            read_vectors(out)
        assert "\n" not in str(err.value)
    # a layer with residuals is refused by a decoder without the residual path
    path.write_text("\n".join(good) + "\n")
    doc["layers"][0]["sha256"]["sparse"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "vectors.json").write_text(json.dumps(doc))
    plan = {"jobs": [{"kind": "vectors", "dir": str(out)}]}
    with pytest.raises(ValueError, match="no residual path"):
        stimulus.plan_jobs(CONFIGS["sop4-g16"], plan, np.random.default_rng(0))
    assert len(stimulus.plan_jobs(SPARSE["sop4-g16-sp"], plan, np.random.default_rng(0))[0].layers[0].sparse_index)


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
    outside = tmp_path / "elsewhere.hex"                              # a name that leaves the folder
    outside.write_text(good)
    for name in ("../elsewhere.hex", str(outside), ".."):
        bad = json.loads(json.dumps(doc))
        bad["layers"][0]["files"]["blocks"] = name
        (out / "vectors.json").write_text(json.dumps(bad))
        with pytest.raises(VectorError, match=r"layers\[0\] files.blocks must be a file name in the vector folder"):
            read_vectors(out)
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


FAKE_CC = """import pathlib, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("-o") + 1])
src = pathlib.Path(next(a for a in args if a.endswith(".cpp")))
header = pathlib.Path(args[args.index("-include") + 1])
runs = pathlib.Path(args[args.index("-runs") + 1])
runs.write_text(runs.read_text() + "x")
out.write_bytes(src.read_bytes() + header.read_bytes())
out.with_suffix(".d").write_text(f"{out.name}: {src} \\\\\\n {header}\\n")
"""


def test_verilators_library_objects_are_compiled_once_and_reused_while_their_sources_hold(tmp_path):
    """sim/objcache.py, the ``OBJCACHE`` of every Verilator build (runner.build): an object compiled
    from a file outside the build folder comes back in another build folder without the compiler;
    a header it depends on changed, or another flag, compiles it again; an object that depends on a
    file of the build folder (cocotb's verilator.cpp includes the design's Vtop.h) is never kept."""
    import subprocess
    import sys
    from pathlib import Path

    objcache = Path(runner.__file__).with_name("objcache.py")
    lib, cache, runs = tmp_path / "include", tmp_path / "cache", tmp_path / "runs"
    lib.mkdir()
    (lib / "verilated.cpp").write_text("library ")
    (lib / "verilated.h").write_text("header one")
    runs.write_text("")
    cc = tmp_path / "fakecc.py"
    cc.write_text(FAKE_CC)

    def build(folder, header=lib / "verilated.h", flag="-O0"):
        folder.mkdir(exist_ok=True)
        cmd = [sys.executable, "-S", str(objcache), str(cache), sys.executable, str(cc), flag, "-MMD", "-include",
               str(header), "-runs", str(runs), "-c", "-o", "verilated.o", str(lib / "verilated.cpp")]
        assert subprocess.run(cmd, cwd=folder).returncode == 0
        return (folder / "verilated.o").read_text(), len(runs.read_text())

    assert build(tmp_path / "a") == ("library header one", 1)
    assert build(tmp_path / "b") == ("library header one", 1)                  # from the cache
    assert (tmp_path / "b" / "verilated.d").read_text() == (tmp_path / "a" / "verilated.d").read_text()
    assert build(tmp_path / "c", flag="-Os") == ("library header one", 2)     # another command
    (lib / "verilated.h").write_text("header two")
    assert build(tmp_path / "d") == ("library header two", 3)                 # a dependency changed
    assert build(tmp_path / "e") == ("library header two", 3)
    own = tmp_path / "f" / "Vtop.h"
    own.parent.mkdir()
    own.write_text("the design's")
    assert build(tmp_path / "f", header=own) == ("library the design's", 4)
    assert build(tmp_path / "f", header=own) == ("library the design's", 5)   # not kept
    assert runner.objcache_flag()[0].startswith("OBJCACHE=")
