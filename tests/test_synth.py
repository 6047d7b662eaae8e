"""Synthesis flow (synth/flow/, synth/gateware/wrapper.py): the timing wrapper, the report schema,
and Fmax only where paths are timed.

Small on purpose (about 20 s): the 1-lane decoder on iCE40 through yosys and
nextpnr, and two tiny designs; `make synth` runs the full flow.
"""

import dataclasses
import json
import random

import pytest
from amaranth.back import verilog
from amaranth.hdl import Cat, Module, Shape, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from sop.hdl.config import named_configs
from sop.hdl.decoder import Decoder
from sop.hdl.replica import replica
from sop.synth.flow.cli import main
from sop.synth.flow.yosys_nextpnr import (REPORT_KEYS, TARGETS, Target, for_target, late_endpoints, markdown_table,
                                          report, run_config, run_design, write_reports)
from sop.synth.gateware.wrapper import IoWrapper, fold_levels, port_bits

# docs/synthesis.md, "The floor": a sop4 lane needs at least 108 LUT4 (one per result bit of each
# function of more than four inputs) and, on iCE40, 59 flip-flops (product fields, rounding inputs,
# output word) and one RAM40 (its read port). A count under the floor is a miscount.
FLOOR_LUT4, FLOOR_FF_ICE40 = 108, 59
# The iCEBreaker's iCE40UP5K (5280 logic cells, one LUT4 and one FF each) holds 8 lanes of sop4-g16
# (README, synthesis.md): one lane, the decoder's control included, over an eighth of it could not.
LANE_BUDGET_ICE40 = 5280 // 8


class Passthrough(wiring.Component):
    """Combinational: y = a. No flip-flop of its own."""
    a: In(12)
    y: Out(12)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.y.eq(self.a)
        return m


class OneFlop(wiring.Component):
    """One flip-flop: q <= d."""
    d: In(1)
    q: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.q.eq(self.d)
        return m


class Copies(wiring.Component):
    """Three registers of the same 4-bit input, XORed with three other inputs: copies of one value."""
    d: In(4)
    x: In(12)
    q: Out(12)

    def __init__(self, replicated: bool):
        self.replicated = replicated
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        new = (lambda i: replica(4, name=f"copy{i}")) if self.replicated else (lambda i: Signal(4, name=f"copy{i}"))
        copies = [new(i) for i in range(3)]
        m.d.sync += [c.eq(self.d) for c in copies]
        m.d.comb += self.q.eq(Cat(copies) ^ self.x)
        return m


def test_register_copies_survive_synthesis_only_as_replicas(tmp_path):
    """hdl.replica's attribute makes the flow keep identical flip-flops apart; plain ones merge."""
    assert run_design(Copies(True), "replicas", "generic", tmp_path)["ffs"] == 12
    assert run_design(Copies(False), "plain", "generic", tmp_path)["ffs"] == 4


def test_fold_levels_reduce_to_the_pin_count_with_fan_in_four():
    for n in range(1, 3000, 7):
        levels = fold_levels(n, 8)
        assert levels[-1] == 8
        prev = n
        for width in levels:
            assert -(-prev // width) <= 4         # no flip-flop XORs more than 4 bits of the level before
            prev = width
    assert fold_levels(1026, 8) == [257, 65, 17, 8]


def test_wrapper_registers_every_decoder_port():
    cfg = named_configs()["sop4-g16"]
    dut = Decoder(cfg)
    ins, outs = port_bits(dut)
    w = IoWrapper(dut)
    in_width = sum(Shape.cast(v.shape()).width for v in ins)
    out_width = sum(Shape.cast(v.shape()).width for v in outs)
    # blocks {payload + swap, valid}, load {bank, addr, data, valid}, offset, offset_we, values.ready
    assert in_width == (cfg.beat_bits + 1) + 1 + (1 + 4 + 10) + 1 + 8 + 1 + 1
    assert out_width == cfg.lanes * 16 + 1 + 1 + 1          # values payload and valid, blocks/load ready
    assert w.in_bits == in_width + 1                         # + the decoder's reset
    assert w.out_bits == out_width
    assert {n: len(getattr(w, n)) for n in ("clk", "din", "dout")} == {"clk": 1, "din": 1, "dout": 8}
    text = verilog.convert(w, name="wrapped", emit_src=False)
    head = text[text.index("module wrapped("):text.index("endmodule")]
    decls = [ln.split()[-1].rstrip(";") for ln in head.splitlines() if ln.strip().startswith(("input", "output"))]
    ports = sorted(decls)
    assert ports == ["clk", "din", "dout"]                   # 10 pins: no reset pin, no wide bus


def _xor_fold(bits: list[int], levels: list[int]) -> list[int]:
    for width in levels:
        out, k = [0] * width, -(-len(bits) // width)      # bit j: the XOR of bits [j k, (j + 1) k)
        for i, b in enumerate(bits):
            out[i // k] ^= b
        bits = out
    return bits


def test_wrapper_shifts_inputs_in_and_folds_every_output_bit():
    """Simulated: the pass-through design sees the shifted-in bits; dout is the XOR fold of them."""
    w = IoWrapper(Passthrough(), dout_width=2)
    assert w.fold == [3, 2]
    rng = random.Random(1)
    stream = [rng.randrange(2) for _ in range(200)]
    seen = []

    async def bench(ctx):
        for bit in stream:
            ctx.set(w.din, bit)
            await ctx.posedge(w.clk)
            seen.append(ctx.get(w.dout))

    async def clock(ctx):
        while True:
            ctx.set(w.clk, 1)
            await ctx.delay(0.5e-6)
            ctx.set(w.clk, 0)
            await ctx.delay(0.5e-6)

    sim = Simulator(w)
    sim.add_process(clock)
    sim.add_testbench(bench)
    sim.run()
    # The shift register's bit i holds the bit shifted in i cycles earlier; the design's input a is
    # bits 0..11 (bit 12 is its reset) and dout, two fold levels on, the XOR fold of a two cycles back.
    for t in range(14, len(stream)):
        a = [stream[t - 2 - i] for i in range(12)]
        want = _xor_fold(a, w.fold)
        assert seen[t] == want[0] | want[1] << 1, t


def test_one_lane_decoder_on_ice40_report_schema(tmp_path):
    cfg = named_configs()["sop4-g16-x1"]
    rec = run_config(cfg, "ice40", tmp_path)
    for key in ("luts", "ffs", "brams", "dsps"):
        assert isinstance(rec[key], int), key
    assert FLOOR_LUT4 <= rec["luts"] <= LANE_BUDGET_ICE40 and FLOOR_FF_ICE40 <= rec["ffs"] <= LANE_BUDGET_ICE40
    assert rec["brams"] == cfg.lanes                         # one SB_RAM40_4K per lane: both banks
    # the iCE40 target's constraint, met by every placed iCE40 configuration (synthesis.md, Results)
    assert isinstance(rec["fmax_mhz"], float) and rec["fmax_mhz"] >= rec["constraint_mhz"] == 50
    cp = rec["critical_path"]
    assert cp["delay_ns"] > 0 and cp["start"].startswith("dut.") and cp["end"].startswith("dut.")
    # The wrapper's cells are not the decoder's: it adds a shift register and the fold.
    assert rec["total_cells"]["SB_DFF"] >= rec["cells"].get("SB_DFF", 0) + 100
    assert run_config(cfg, "ice40", tmp_path)["cached"]      # an unchanged run is not repeated

    results = {cfg.name: {"ice40": rec}}
    write_reports(results, tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert list(doc) == [cfg.name] and list(doc[cfg.name]) == ["ice40"]
    assert tuple(doc[cfg.name]["ice40"]) == REPORT_KEYS
    assert doc == report(results)
    assert "| sop4-g16-x1 | ice40 |" in markdown_table(results)
    assert (tmp_path / "report.md").read_text().startswith(markdown_table(results))
    assert "hdl/*.py sha256" in json.loads((tmp_path / "details.json").read_text())[cfg.name]["ice40"]["rtl"]
    assert "RTL: hdl/ of git " in (tmp_path / "report.md").read_text()


def test_fmax_only_where_a_register_to_register_path_exists(tmp_path):
    """A design with one flip-flop path gets an Fmax; a bare combinational design gets none."""
    one = run_design(OneFlop(), "one-flop", "ice40", tmp_path)
    assert one["fmax_mhz"] is not None and one["fmax_mhz"] > 100
    assert one["ffs"] == 1
    bare = Target(**{**TARGETS["ice40"].__dict__, "name": "ice40-bare", "wrap": False})
    comb = run_design(Passthrough(), "passthrough", bare, tmp_path)
    assert comb["fmax_mhz"] is None and comb["critical_path"] is None
    wrapped = run_design(Passthrough(), "passthrough", "ice40", tmp_path)
    assert wrapped["fmax_mhz"] is not None          # the wrapper's registers time the same logic


def test_a_failing_synthesis_falls_back_and_says_so(tmp_path):
    """Yosys's ABC9 asserts on some designs; a target's fallback script then maps it, noted."""
    broken = Target(**{**TARGETS["ice40"].__dict__, "name": "ice40-fb", "synth": "synth_ice40 -no-such-option",
                       "fallback": "synth_ice40 -top {top}"})
    rec = run_design(OneFlop(), "one-flop", broken, tmp_path)
    assert rec["ffs"] == 1 and rec["fmax_mhz"] is not None
    assert "mapped with the fallback script" in rec["note"] and "Unknown option" in rec["note"]
    assert (tmp_path / "runs" / "one-flop" / "ice40-fb" / "yosys-failed.log").exists()


def test_a_failed_place_and_route_is_recorded_tried_again_and_fails_the_run(tmp_path, monkeypatch, capsys):
    """nextpnr failing (or past its time limit) left `make synth` at exit 0 with the failure cached, so
    the next run printed it again without trying (an outside review). It is recorded, never reused,
    and `python -m sop.synth` exits 1 after writing its report."""
    from sop.synth.flow import cli, yosys_nextpnr

    broken = Target(**{**TARGETS["ice40"].__dict__, "name": "ice40-pnr-fails",
                       "pnr": (*TARGETS["ice40"].pnr, "--no-such-option")})
    first = run_design(OneFlop(), "one-flop", broken, tmp_path)
    assert first["fmax_mhz"] is None and first["pnr_error"] and "place and route failed" in first["note"]
    again = run_design(OneFlop(), "one-flop", broken, tmp_path)
    assert not again["cached"] and again["pnr_error"]          # tried again, not taken from run.json
    assert run_design(OneFlop(), "one-flop", "ice40", tmp_path)["pnr_error"] is None
    monkeypatch.setattr(cli, "run_many", lambda order, *a, **k: {c.name: {t: first for _, t in order}
                                                                 for c, _ in order})
    assert cli.main(["--config", "sop4-g16-x1", "--target", "ice40", "--out", str(tmp_path / "r")]) == 1
    assert "error: place and route failed for sop4-g16-x1 on ice40" in capsys.readouterr().err
    assert (tmp_path / "r" / "report.json").exists()
    # the cache key covers the whole yosys script: a register keep changed is another run
    key = yosys_nextpnr.run_key("x", TARGETS["ice40"], "top", 12.0)
    monkeypatch.setattr(yosys_nextpnr, "YOSYS_KEEP", ("proc",))
    assert yosys_nextpnr.run_key("x", TARGETS["ice40"], "top", 12.0) != key


def test_generic_target_counts_memories_abstractly(tmp_path):
    cfg = named_configs()["sop4-g16-x1"]
    rec = run_config(cfg, "generic", tmp_path)
    assert rec["fmax_mhz"] is None and rec["dsps"] == 0
    assert rec["brams"] == 1                                # one $mem_v2 a lane: both banks and pages
    assert FLOOR_LUT4 <= rec["luts"] <= LANE_BUDGET_ICE40   # 4-input LUTs, as on iCE40


def test_ecp5_builds_the_tables_from_lut_ram_rows(tmp_path):
    """On ECP5 the decoder is built with its tables as LUT RAM memories (sop4: 16 words, each
    DPR16X4 row read into its own register), still the floor of 12 DPR16X4 per sop4 lane;
    iCE40 keeps one RAM40 per lane."""
    cfg = named_configs()["sop4-g16-x1"]
    assert for_target(cfg, "ecp5").lutram_depth == 16
    assert for_target(named_configs()["e2m3-ue4m4-g16"], "ecp5").lutram_depth == 32   # at most 4 memories
    assert for_target(cfg, "ice40") == cfg and for_target(cfg, "generic") == cfg
    own = dataclasses.replace(cfg, lutram_depth=32)
    assert for_target(own, "ecp5") == own                 # a config that names its shape keeps it
    rec = run_config(cfg, "ecp5", tmp_path)
    assert rec["lutram_depth"] == 16 and rec["lutram"] == 12 and rec["brams"] == 0
    assert rec["fmax_mhz"] is not None


def test_jobs_above_the_usable_cpus_run_that_many_at_a_time(monkeypatch):
    """`python -m sop.synth --jobs 100000` started a yosys or nextpnr run (a few GB each) for every
    configuration and target at once: at most one per usable CPU, as the quantizer's --jobs pool."""
    import threading
    import time

    from sop.quantize import jobs
    from sop.synth.flow import yosys_nextpnr

    lock, running, peak = threading.Lock(), [0], [0]

    def fake_run(cfg, target, out, force=False):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)                 # the others start meanwhile, as many as the pool lets
        with lock:
            running[0] -= 1
        return {"luts": 1, "ffs": 1, "brams": 0, "dsps": 0, "fmax_mhz": None, "wall_s": 0, "note": ""}

    monkeypatch.setattr(yosys_nextpnr, "run_config", fake_run)
    monkeypatch.setattr(jobs, "usable_cpus", lambda: 2)
    pairs = [(cfg, t) for cfg in list(named_configs().values())[:4] for t in ("ice40", "ecp5")]
    done = yosys_nextpnr.run_many(pairs, jobs=100000, log=lambda *a: None)
    assert sum(len(per) for per in done.values()) == len(pairs) == 8
    assert peak[0] == 2
    # the bench scripts that place in threads (bench/fmax_seeds.py, bench/dot_vs_naive.py) take the same cap
    assert [yosys_nextpnr.tool_runs_at_once(n) for n in (1, 2, 100000)] == [1, 2, 2]


def test_cli_refuses_unknown_names(capsys):
    assert main(["--config", "nope"]) == 2
    assert main(["--target", "virtex"]) == 2
    assert "configurations" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["generic", "ice40", "ecp5"])
def test_targets_declare_their_report_keys(name):
    t = TARGETS[name]
    assert {"luts", "ffs", "brams", "dsps"} <= set(t.counts)
    assert (t.freq_mhz is None) == (not t.pnr)


def test_late_endpoints_groups_registers_by_name_worst_first():
    """nextpnr's detailed report (shape of ``--detailed-timing-report``): endpoints after 96 % of the
    period are counted per register (lane and bit numbers folded), pins left out, worst first."""
    def net(name, *ends):
        return {"net": name, "endpoints": [{"cell": c, "delay": [0.5, t]} for c, t in ends]}
    report = {"detailed_net_timings": [
        net("dut.lanes.bank.wdata_g9", ("dut.lanes.bank.wdata_g3_TRELLIS_FF_Q_2", 6.1),
            ("dut.lanes.bank.wdata_g12_TRELLIS_FF_Q", 5.0), ("dut.lanes.bank.wdata_g1_TRELLIS_FF_Q", 4.7)),
        net("dut.lanes.lane_7.word5", ("dut.lanes.lane_7.word5_TRELLIS_FF_Q_14", 5.5)),
        net("dout[3]$TRELLIS_IO_OUT", ("dout[3]$tr_io", 8.6)),
    ]}
    got = late_endpoints(report, 200.0)            # late: after 4.8 ns
    assert got == [{"register": "dut.lanes.bank.wdata_g#", "count": 2, "worst_ns": 6.1,
                    "via": "dut.lanes.bank.wdata_g9"},
                   {"register": "dut.lanes.lane_#.word#", "count": 1, "worst_ns": 5.5,
                    "via": "dut.lanes.lane_7.word5"}]
    assert late_endpoints(report, 100.0) == []     # a 10 ns period: none late
    assert late_endpoints({}, 200.0) == []         # no detailed report
