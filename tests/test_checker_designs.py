"""The regressions' checkers on designs that are wrong in exactly one way (or legal but unusual), each
a real cocotb run (Icarus, the quick plan, a fixed seed); and the plans' sizes against the docs.

An outside mutation run of the checkers (sim/tb_decoder.py, sim/tb_axis.py, sim/tb_gemv.py,
sim/tb_gemv_axis.py, sim/runner.py, sim/gemv_runner.py) left checks that no design the tests ran
could trigger, so deleting them survived. Each test here names the check it keeps alive:

* a decoder whose ``sparse_error`` bit is stuck at 1 on a good stream (sim/tb_decoder.py's verdict);
* a decoder that offers one extra output beat a few cycles after every owed beat was drained (the
  quiet window after a job, ``QUIET_CYCLES``);
* an AXI4-Stream shell that sends one packet more after the owed ones (sim/tb_axis.py: "output
  packets nobody owed");
* a GEMV engine, and a GEMV shell, whose ``status`` reads ``x_loaded`` for good (the status check
  after each job, and at the end of the shell's run);
* a shell whose TREADY waits for TVALID (legal AXI4-Stream): it must pass, not hang;
* ``values.valid`` at X while the bench is ready (sim/tb_decoder.py ``OutputMonitor``);
* the plans' sizes (sim/runner.py, sim/gemv_runner.py, sim/tb_gemv_axis.py) as docs/vectors.md,
  docs/hardware.md and docs/dot.md state them, without a simulator.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from cocotb.types import Logic

from hdl_harness import ShellTop
from sop.hdl import axis, gemv, gemv_axis, gemv_config
from sop.hdl.config import named_configs, residual_configs
from sop.hdl.decoder import Decoder
from sop.hdl.gemv_axis import GemvAxis, GemvAxisTop
from sop.hdl.generate import axis_module_name, module_name
from sop.sim import QUIET_CYCLES, gemv_runner, runner, stimulus, tb_decoder, tb_gemv_axis

CONFIGS = named_configs()
SPARSE = residual_configs()
SEED = 1


def owed(cfg, plan: dict, seed: int = SEED) -> tuple[int, int]:
    """(output beats the bare decoder's bench takes, layers) of ``plan`` at ``seed``: the checked
    layers' values over the lanes (a reset job's cut layer is stalled, never taken)."""
    content, _ = stimulus.seeded_rngs(seed)
    jobs = stimulus.plan_jobs(cfg, plan, content)
    beats = sum(layer.codes.size for job in jobs for layer in job.checked) // cfg.lanes
    return beats, sum(len(job.layers) for job in jobs)


def convert_decoder(top, cfg, path: Path) -> Path:
    path.write_text(verilog.convert(top, name=module_name(cfg), emit_src=False))
    return path


# -- the bare decoder (sim/tb_decoder.py) -----------------------------------------------------------------
class StuckSparseError(wiring.Component):
    """A -sp decoder whose ``sparse_error`` bit ``bit`` reads 1 for good; its values are right."""

    def __init__(self, cfg, bit: int = 3):
        self.decoder, self.bit = Decoder(cfg), bit
        super().__init__(self.decoder.signature)

    def elaborate(self, platform):
        m = Module()
        m.submodules.decoder = dec = self.decoder
        for name in ("blocks", "load", "sparse"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(dec, name))
        wiring.connect(m, dec.values, wiring.flipped(self.values))
        m.d.comb += [dec.offset.eq(self.offset), dec.offset_we.eq(self.offset_we),
                     dec.layer_sparse.eq(self.layer_sparse),
                     self.sparse_error.as_value().eq(dec.sparse_error.as_value() | 1 << self.bit)]
        return m


def test_a_sparse_error_bit_set_on_a_good_stream_fails_the_regression(tmp_path, monkeypatch):
    """sim/tb_decoder.py ``regression``: a ``sparse_error`` bit set at the end of a good stream is a
    failing verdict, counted as a mismatch, so `make sim`'s exit status (sim/runner.py ``main``) fails
    too, not only cocotb's test. Kills the mutant that deletes ``sb.mismatches += 1`` there."""
    cfg = SPARSE["sop4-g16-sp"]
    v = convert_decoder(StuckSparseError(cfg), cfg, tmp_path / "broken.v")
    s = runner.run(cfg, "icarus", quick=True, seed=SEED, verilog=v, build_dir=tmp_path / "build", vectors=False)
    assert s["failed_tests"] == 1 and s["mismatches"] == 1 and s["sparse_errors"]["not_finite"] == 1
    assert s["checked"] > 0 and sum(s["sparse_errors"].values()) == 1     # the values were right
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "sparse_error set on a good stream: {'order': 0, 'past_layer': 0, 'no_layer': 0, 'not_finite': 1}" in log
    # make sim's verdict on it: exit status 1, whatever cocotb's test said
    monkeypatch.setattr(runner, "run", lambda *a, **k: {**s, "failed_tests": 0})
    assert runner.main(["--config", cfg.name, "--quick"]) == 1


class ExtraBeat(wiring.Component):
    """A decoder that, ``delay`` cycles after its ``after``-th output beat (counted across resets),
    offers that beat once more: one beat nobody owes, after every owed one was drained."""

    def __init__(self, cfg, after: int, delay: int = 8):
        self.decoder, self.after, self.delay = Decoder(cfg), after, delay
        super().__init__(self.decoder.signature)

    def elaborate(self, platform):
        m = Module()
        m.submodules.decoder = dec = self.decoder
        wiring.connect(m, wiring.flipped(self.blocks), dec.blocks)
        wiring.connect(m, wiring.flipped(self.load), dec.load)
        m.d.comb += [dec.offset.eq(self.offset), dec.offset_we.eq(self.offset_we)]
        out, got = self.values, dec.values
        count = Signal(range(self.after + 1), reset_less=True)
        wait = Signal(range(self.delay + 1), reset_less=True)
        phase = Signal(2, reset_less=True)          # counting, waiting, offering, done
        last = Signal(len(got.payload.as_value()), reset_less=True)
        extra = phase == 2
        m.d.comb += [out.valid.eq(got.valid | extra), out.payload.eq(Mux(extra, last, got.payload.as_value())),
                     got.ready.eq(out.ready & ~extra)]
        with m.Switch(phase):
            with m.Case(0):
                with m.If(got.valid & got.ready):
                    m.d.sync += [count.eq(count + 1), last.eq(got.payload.as_value())]
                    with m.If(count == self.after - 1):
                        m.d.sync += phase.eq(1)
            with m.Case(1):
                m.d.sync += wait.eq(wait + 1)
                with m.If(wait == self.delay - 1):
                    m.d.sync += phase.eq(2)
            with m.Case(2):
                with m.If(out.ready):
                    m.d.sync += phase.eq(3)
        return m


def test_an_extra_beat_after_the_last_job_is_caught_in_the_quiet_window(tmp_path):
    """sim/tb_decoder.py ``Testbench.run``: after the drain, ``QUIET_CYCLES`` cycles with the output
    always ready in which nothing may come. A decoder that offers its last beat again 8 cycles after
    the plan's last owed beat is drained (no input pending, nothing owed: only the quiet window sees
    it) fails, the beat named. Kills the mutants that drop the window or shorten it below 9 cycles."""
    cfg = CONFIGS["sop4-g16"]
    beats, _ = owed(cfg, runner.plan_for(cfg, "quick", None))
    assert QUIET_CYCLES > 8
    v = convert_decoder(ExtraBeat(cfg, after=beats, delay=8), cfg, tmp_path / "broken.v")
    s = runner.run(cfg, "icarus", quick=True, seed=SEED, verilog=v, build_dir=tmp_path / "build", vectors=False)
    assert s["failed_tests"] == 1 and s["mismatches"] == cfg.lanes
    assert s["checked"] == beats * cfg.lanes                     # every owed beat came, and was right
    log = (tmp_path / "build" / "sim.log").read_text()
    assert f"output beat {beats}: 0x" in log and "came with nothing owed (more output than input)" in log


# -- X on values.valid (sim/tb_decoder.py OutputMonitor) -------------------------------------------------
class Port:
    def __init__(self, value=0):
        self.value = value


def test_the_output_monitor_flags_x_or_z_on_valid_while_ready():
    """``OutputMonitor.sample``: ``values.valid`` at X or Z while the bench holds ``values.ready``
    high is an error at that cycle (a beat may hide behind it), counted every such cycle and reported
    once through ``on_x``; at 0 nothing, at 1 the beat goes to the sink; while not ready valid is not
    looked at. Kills the mutant that treats X like 0 (the monitor before this check)."""
    dut = SimpleNamespace(values__valid=Port(Logic(0)), values__payload=Port(0x1234), values__ready=Port(0))
    taken, reported = [], []
    mon = tb_decoder.OutputMonitor(dut, np.random.default_rng(0), 0.0, taken.append, on_x=reported.append)
    mon.drive()
    assert mon.ready and dut.values__ready.value == 1
    mon.sample()
    assert (taken, mon.x_valid, reported) == ([], 0, [])
    for bad in ("X", "Z", "x"):
        dut.values__valid.value = Logic(bad)
        mon.sample()
    assert taken == [] and mon.x_valid == 3 and [str(x) for x in reported] == ["X"]     # reported once
    dut.values__valid.value = Logic(1)
    mon.sample()
    assert taken == [0x1234]
    mon.ready = False                            # not ready: valid is not looked at
    dut.values__valid.value = Logic("X")
    mon.sample()
    assert mon.x_valid == 3


XWRAP = """
module {top}({decl});
{ports}
  wire inner_valid;
  reg [7:0] beats = 0;
  reg fired = 0;
  // one cycle with valid X: the first cycle after the 20th beat in which the decoder offers none
  // and the bench is ready
  wire glitch = beats == 20 && !fired && !inner_valid && values__ready;
  assign values__valid = glitch ? 1'bx : inner_valid;
  always @(posedge clk) begin
    if (inner_valid && values__ready && beats != 20) beats <= beats + 1;
    if (glitch) fired <= 1;
  end
  {inner} core({conns}, .values__valid(inner_valid));
endmodule
"""


def x_valid_decoder(cfg, path: Path) -> Path:
    """The generated decoder (renamed) inside a hand-written Verilog top of the same ports that
    drives ``values__valid`` to X for one cycle in which nothing is offered and the bench is ready."""
    import re

    inner = module_name(cfg) + "_inner"
    text = verilog.convert(Decoder(cfg), name=inner, emit_src=False)
    head = text[text.index(f"module {inner}("):]
    ports = re.findall(r"^\s*(input|output)\s+((?:signed\s+)?(?:\[[^\]]+\]\s*)?)(\w+);",
                       head[:head.index("endmodule")], re.M)
    names = [p[2] for p in ports]
    assert {"values__valid", "clk", "offset", "blocks__payload"} <= set(names)
    decl = "\n".join(f"  {d} {w}{n};" for d, w, n in ports)
    conns = ", ".join(f".{n}({n})" for n in names if n != "values__valid")
    path.write_text(text + XWRAP.format(top=module_name(cfg), decl=", ".join(names), ports=decl, inner=inner,
                                        conns=conns))
    return path


def test_x_on_values_valid_fails_the_regression_at_its_cycle(tmp_path):
    """The Verilog decoder with ``values.valid`` at X for one cycle in which it offers no beat (every
    value right, no beat lost): the regression fails with the cycle named. Before the check, X was
    read as "not valid" and the run passed."""
    cfg = CONFIGS["sop4-g16"]
    v = x_valid_decoder(cfg, tmp_path / "broken.v")
    s = runner.run(cfg, "icarus", quick=True, seed=SEED, verilog=v, build_dir=tmp_path / "build", vectors=False)
    beats, _ = owed(cfg, runner.plan_for(cfg, "quick", None))
    assert s["failed_tests"] == 1 and s["mismatches"] == 1 and s["x_valid_cycles"] == 1
    assert s["checked"] == beats * cfg.lanes                     # every beat came, and was right
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "values.valid is X at cycle " in log and log.count("values.valid is") == 1


# -- the AXI4-Stream shell (sim/tb_axis.py) ----------------------------------------------------------------
class Shell(ShellTop):
    """``AxisTop``'s ports around the real shell, changed by ``how``: ``"extra"`` sends one packet
    more (the last beat again, with TLAST) 3 cycles after its ``after``-th packet; ``"wait"`` holds
    each input's TREADY low until its TVALID is high (``tready = core.tready & tvalid``: AXI4-Stream
    lets a slave wait for TVALID)."""

    def __init__(self, cfg, how: str, after: int = 0):
        self.how, self.after = how, after
        super().__init__(cfg)

    def wire(self, m, core) -> None:
        for name in ("s_axis", "s_axis_load"):
            outer, inner = getattr(self, name), getattr(core, name)
            if self.how == "wait":
                m.d.comb += [inner.tdata.eq(outer.tdata), inner.tlast.eq(outer.tlast), inner.tvalid.eq(outer.tvalid),
                             outer.tready.eq(inner.tready & outer.tvalid)]
            else:
                wiring.connect(m, wiring.flipped(outer), inner)
        o, c = self.m_axis, core.m_axis
        if self.how == "wait":
            wiring.connect(m, c, wiring.flipped(o))
            return
        count = Signal(range(self.after + 1))
        wait = Signal(2)
        phase = Signal(2)                           # counting, waiting, offering, done
        data = Signal.like(c.tdata)
        extra = phase == 2
        m.d.comb += [o.tvalid.eq(c.tvalid | extra), o.tdata.eq(Mux(extra, data, c.tdata)),
                     o.tlast.eq(c.tlast | extra), c.tready.eq(o.tready & ~extra)]
        with m.Switch(phase):
            with m.Case(0):
                with m.If(c.tvalid & c.tready):
                    m.d.sync += data.eq(c.tdata)
                    with m.If(c.tlast):
                        m.d.sync += count.eq(count + 1)
                        with m.If(count == self.after - 1):
                            m.d.sync += phase.eq(1)
            with m.Case(1):
                m.d.sync += wait.eq(wait + 1)
                with m.If(wait == 2):
                    m.d.sync += phase.eq(2)
            with m.Case(2):
                with m.If(o.tready):
                    m.d.sync += phase.eq(3)


def run_shell(cfg, top, tmp_path):
    v = tmp_path / "shell.v"
    v.write_text(verilog.convert(top, name=axis_module_name(cfg), ports=axis.axi_ports(top), emit_src=False))
    s = runner.run_axis(cfg, "icarus", quick=True, seed=SEED, verilog=v, build_dir=tmp_path / "build")
    return s, (tmp_path / "build" / "sim.log").read_text()


def test_axis_regression_reports_a_packet_nobody_owed(tmp_path):
    """sim/tb_axis.py: after the last owed packet, 12 cycles in which nothing more may come; a shell
    that sends one more packet (right values otherwise) fails with "1 output packets nobody owed".
    Kills the mutants that delete that check's ``sb.mismatches += cfg.lanes`` or its wait."""
    cfg = CONFIGS["sop4-g16"]
    _, layers = owed(cfg, runner.axis_plan(cfg, "quick", None))
    s, log = run_shell(cfg, Shell(cfg, "extra", after=layers), tmp_path)
    assert s["failed_tests"] == 1 and s["mismatches"] == cfg.lanes and s["protocol_errors"] == 0
    assert s["layers"] == layers and "1 output packets nobody owed" in log


def test_axis_regression_passes_a_shell_whose_tready_waits_for_tvalid(tmp_path):
    """AXI4-Stream lets a slave hold TREADY low until TVALID is high: a shell whose ``s_axis`` and
    ``s_axis_load`` TREADY is the real one AND TVALID is legal, so the bench must pass it (every
    layer, no mismatch, no protocol error), not flag it nor deadlock waiting for TREADY."""
    cfg = CONFIGS["sop4-g16"]
    beats, layers = owed(cfg, runner.axis_plan(cfg, "quick", None))
    s, log = run_shell(cfg, Shell(cfg, "wait"), tmp_path)
    assert s["failed_tests"] == 0 and s["mismatches"] == 0 and s["protocol_errors"] == 0, log[-2000:]
    assert s["layers"] == layers and s["beats"] == beats


# -- the GEMV engine (sim/tb_gemv.py) and its shell (sim/tb_gemv_axis.py) ----------------------------------
SOP4_ENGINE = gemv_config.gemv_configs()["gemv-sop4-g16"]


class StuckXLoaded(gemv.GemvEngine):
    """An engine whose ``status`` reads ``x_loaded`` for good (its own sequencing unchanged)."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        m.d.comb += self.status.x_loaded.eq(1)
        return m


def test_gemv_regression_reports_a_status_stuck_at_x_loaded(tmp_path):
    """sim/tb_gemv.py ``Testbench.run``: after each job ``status`` must read 0. An engine whose
    ``x_loaded`` is stuck at 1, on the corners job alone (no errors job, whose reads would see it
    too), computes every word right and fails on that check. Kills the mutant that deletes it."""
    verilog_path = gemv_runner.build_verilog(SOP4_ENGINE, tmp_path / "rtl", StuckXLoaded(SOP4_ENGINE))

    def corners_only(plan):
        plan["jobs"] = [job for job in plan["jobs"] if job.get("name") == "corners"]
        plan["jobs"][0]["layers"] = plan["jobs"][0]["layers"][:2]

    s = gemv_runner.run(SOP4_ENGINE, "icarus", quick=True, seed=SEED, verilog=verilog_path,
                        build_dir=tmp_path / "build", plan_edit=corners_only)
    assert s["failed_tests"] == 1 and s["mismatches"] == 0 and s["status_errors"] == 1
    assert s["checked"] == s["expected"] > 0 and not gemv_runner.passed(s)
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "status after the corners job: 0x1 ['x_loaded'], expected 0x0" in log


class StuckShellXLoaded(GemvAxis):
    """A GEMV shell whose ``status`` reads ``x_loaded`` for good (the engine's own unchanged)."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        m.d.comb += self.status.x_loaded.eq(1)
        return m


def test_gemv_axis_regression_reports_a_status_stuck_at_x_loaded(tmp_path):
    """sim/tb_gemv_axis.py: ``status`` must read 0 at the end; a shell whose ``x_loaded`` is stuck at
    1 (every word right) fails the test and ``passed``, the status logged. Kills the mutants that
    drop ``status == 0`` from the assert or delete the log line."""
    cfg = SOP4_ENGINE
    top = GemvAxisTop(cfg, core=StuckShellXLoaded(cfg))
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(top, name=gemv_axis.module_name(cfg), ports=top.ports(), emit_src=False))
    s = tb_gemv_axis.run(cfg, "icarus", quick=True, seed=SEED, verilog=v, build_dir=tmp_path / "build",
                         plan_edit=lambda plan: plan.update(layers=plan["layers"][:1]))
    assert s["failed_tests"] == 1 and s["mismatches"] == 0 and s["protocol_errors"] == 0 and s["status"] == 1
    assert s["checked"] == s["expected"] == 80 and not tb_gemv_axis.passed(s)
    log = (tmp_path / "build" / "sim.log").read_text()
    assert "status 0x1 at the end (x_loaded, then the error bits from bit 1), expected 0" in log


# -- the plans' sizes, as the docs state them -------------------------------------------------------------
# docs/vectors.md: "The two operating points (sop4-g16, e2m3-ue4m4-g16), and the two with the residual path
# (sop4-g16-sp, e2m3-ue4m4-g16-sp ...), run the full plan (the two whole layers, 737,280 weights, and
# 4 x 256 random blocks); the other configurations ... a medium plan (16 rows of the query layer, 4 x 64
# random blocks); the 64-lane design in Icarus ... runs the quick plan (Verilator runs it with the medium
# plan)."
FULL_PLAN = {"sop4-g16", "e2m3-ue4m4-g16", "sop4-g16-sp", "e2m3-ue4m4-g16-sp"}
RANDOM_BLOCKS = {"full": (4, 256), "medium": (4, 64)}


def test_the_decoder_plans_are_the_documented_sizes():
    """sim/runner.py ``plan_size`` and ``plan_for``: which configurations get the full, medium and
    quick plans, and their random layers, as docs/vectors.md states them (not from the code)."""
    configs = {**CONFIGS, **SPARSE}
    assert FULL_PLAN <= set(configs) and any(c.lanes == 64 for c in configs.values())
    for name, cfg in configs.items():
        want = "full" if name in FULL_PLAN else "medium"
        assert runner.plan_size(cfg, "verilator", False) == want, name
        assert runner.plan_size(cfg, "icarus", False) == ("quick" if cfg.lanes == 64 else want), name
        assert runner.plan_size(cfg, "verilator", True) == runner.plan_size(cfg, "icarus", True) == "quick"
    cfg = CONFIGS["sop4-g16"]
    for size, (layers, blocks) in RANDOM_BLOCKS.items():
        (job,) = [j for j in runner.plan_for(cfg, size, None)["jobs"] if j["kind"] == "random"]
        assert (job["layers"], job["blocks"]) == (layers, blocks), size
    # the quick plan (`make test`'s): 2 x 16 random blocks; the corners and a reset in every plan; the
    # sparse job's layers 64, 16 and 8 blocks long
    (quick,) = [j for j in runner.plan_for(cfg, "quick", None)["jobs"] if j["kind"] == "random"]
    assert (quick["layers"], quick["blocks"]) == (2, 16)
    for size, blocks in (("full", 64), ("medium", 16), ("quick", 8)):
        jobs = runner.plan_for(SPARSE["sop4-g16-sp"], size, None)["jobs"]
        assert [j["kind"] for j in jobs] == ["random", "corners", "reset", "sparse"] and jobs[-1]["blocks"] == blocks
    kinds = [j["kind"] for j in runner.plan_for(SPARSE["sop4-g16-sp"], "medium", Path("v"))["jobs"]]
    assert kinds == ["vectors", "random", "corners", "reset", "sparse"]


@pytest.mark.parametrize("name", ["sop4-g16", "sop4-g16-sp", "sop4-g16-exact"])
def test_the_decoder_plans_vectors_are_the_documented_layers(name, tmp_path, monkeypatch):
    """sim/runner.py ``run`` and ``minilm_vectors``: the full plan's vectors are two whole layers
    (query and FFN output: 384 x 384 + 384 x 1536 = 737,280 weights; with residuals the first two
    `sop-budget` layers with entries), the medium plan's 16 rows of the query layer (of the first
    such layer), per docs/vectors.md; the simulator is not run."""
    from sop.sim import vectors as sim_vectors

    cfg = {**CONFIGS, **SPARSE}[name]
    calls, ran = [], []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sim_vectors, "make_vectors", lambda src, fmt, layers, out, rows=None:
                        calls.append((src, list(layers), rows)))
    monkeypatch.setattr(runner, "sparse_artifact",
                        lambda fmt, missing_ok=False: (Path("budget.sopq"), ["b0", "b1", "b2"]))
    monkeypatch.setattr(runner, "simulate", lambda cfg, sim, v, top, mod, plan, size, *a, **k: ran.append((plan, size)))
    (tmp_path / "d.v").write_text("")
    runner.run(cfg, "verilator", verilog=tmp_path / "d.v", build_dir=tmp_path / "b")
    plan, size = ran[0]
    assert size == ("full" if name in FULL_PLAN else "medium")
    assert plan["jobs"][0]["kind"] == "vectors"
    src, layers, rows = calls[0]
    if name == "sop4-g16-sp":
        assert (src, layers, rows) == ("budget.sopq", ["b0", "b1"], None)
    elif size == "full":
        from sop.quantize.weights import FFN_OUT_LAYER, QUERY_LAYER

        assert (src, layers, rows) == ("minilm", [QUERY_LAYER, FFN_OUT_LAYER], None)
        assert "query" in QUERY_LAYER and "output.dense" in FFN_OUT_LAYER and "attention" not in FFN_OUT_LAYER
    else:
        from sop.quantize.weights import QUERY_LAYER

        assert (src, layers, rows) == ("minilm", [QUERY_LAYER], 16)


def test_the_axis_plans_are_the_documented_sizes(tmp_path, monkeypatch):
    """sim/runner.py ``run_axis``, ``axis_plan``, AXIS_PLAN: per docs/hardware.md `make sim` runs every
    shell with "ten layers back to back with their table swaps, 16 MiniLM rows among them and six random
    layers of 128 blocks; six for the 64-lane design in Icarus, its random layers 16 blocks long" (the quick
    plan, `make test`'s); "a -sp shell adds nine layers with every entry pattern on s_axis_sparse, of 32
    blocks (8 in the quick plan), and 16 rows of the three sop-budget layers with the most entries"."""
    ran = []
    monkeypatch.setattr(runner, "simulate", lambda cfg, sim, v, top, mod, plan, size, *a, **k: ran.append((plan, size)))
    monkeypatch.setattr(runner, "minilm_vectors", lambda cfg, quick: ("minilm rows", quick))
    monkeypatch.setattr(runner, "sparse_row_vectors", lambda cfg: "sparse rows")
    (tmp_path / "d.v").write_text("")
    wide = next(c for c in CONFIGS.values() if c.lanes == 64)
    for cfg, sim, quick, size in [(CONFIGS["sop4-g16"], "icarus", False, "full"), (wide, "icarus", False, "quick"),
                                  (wide, "verilator", False, "full"), (CONFIGS["sop4-g16"], "icarus", True, "quick"),
                                  (SPARSE["sop4-g16-sp"], "icarus", False, "full")]:
        ran.clear()
        runner.run_axis(cfg, sim, quick=quick, verilog=tmp_path / "d.v", build_dir=tmp_path / "b")
        plan, got = ran[0]
        assert got == size, (cfg.name, sim, quick)
        vectors = [j for j in plan["jobs"] if j["kind"] == "vectors"]
        if size == "quick":
            assert not vectors
        else:           # 16 MiniLM rows (the quick vectors), or with residuals the sop-budget rows
            want = "sparse rows" if cfg.residuals else ("minilm rows", True)
            assert vectors == [{"kind": "vectors", "dir": str(want)}]
    assert (runner.AXIS_SPARSE_ROWS, runner.AXIS_SPARSE_LAYERS) == (16, 3)
    # the random layers: 128 blocks (16 in the quick plan); the -sp shell's pattern layers 32 blocks (8)
    for size, blocks, sparse_blocks in (("full", 128, 32), ("quick", 16, 8)):
        jobs = runner.axis_plan(SPARSE["sop4-g16-sp"], size, None)["jobs"]
        assert [j["blocks"] for j in jobs if j["kind"] in ("random", "sparse")] == [blocks, sparse_blocks], size
    cfg, sp = CONFIGS["sop4-g16"], SPARSE["sop4-g16-sp"]
    assert owed(cfg, runner.axis_plan(cfg, "quick", None))[1] == 6
    assert owed(cfg, runner.axis_plan(cfg, "full", None))[1] == 10 - 1        # + the MiniLM rows' layer
    for size in ("quick", "full"):
        plan = runner.axis_plan(sp, size, None)
        plain = owed(sp, {**plan, "jobs": [j for j in plan["jobs"] if j["kind"] != "sparse"]})[1]
        assert owed(sp, plan)[1] - plain == 9, size


def test_the_gemv_plans_are_the_documented_sizes():
    """sim/gemv_runner.py's and sim/tb_gemv_axis.py's SIZES as docs/dot.md and the runners' documented
    plans state them: the engine's quick plan 40 MiniLM rows for one token, then those rows with 2 %
    residuals for one; the full plan all 384 rows for two tokens, then the 40 with residuals for two
    (docs/dot.md: "all 384 rows for two tokens, then 40 rows with 2 % sparse residuals"); the shell's
    quick plan 40 rows for two tokens, with residuals for one, plain again for one (docs/dot.md: "40
    rows for two tokens, the same rows with 2 % residuals, plain again"), its full one the whole layer
    for two tokens."""
    quick, full = gemv_runner.SIZES["quick"], gemv_runner.SIZES["full"]
    assert (quick["rows"], len(quick["tokens"]), len(quick["sparse_tokens"])) == (40, 1, 1)
    assert (full["rows"], len(full["tokens"]), len(full["sparse_tokens"])) == (None, 2, 2)   # None: all 384
    rows, plain, sparse, last = tb_gemv_axis.SIZES["quick"]
    assert (rows, len(plain), len(sparse), len(last)) == (40, 2, 1, 1)
    rows, plain, sparse, last = tb_gemv_axis.SIZES["full"]
    assert (rows, len(plain), len(sparse), len(last)) == (None, 2, 2, 1)
