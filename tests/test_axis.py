"""The AXI4-Stream shell (hdl/axis.py) and its FuseSoC core (hdl/generate.py).

* Its beat-level model: TDATA byte layout, load words, TLAST per layer.
* amaranth.sim: the shell against its model with random TVALID gaps and TREADY pauses,
  every cycle checking that ``m_axis``'s TVALID, TDATA and TLAST do not depend on TREADY;
  and at full speed: the decoder's latency handshake to handshake and no bubble across layers;
  TLASTs tied to a constant on three MiniLM layers do what docs/hardware.md says (``-k tied``).
* cocotb with cocotbext-axi's BFMs on the generated ``NAME_axis.v`` in Icarus (`make sim` runs
  every configuration, `--axis`): layers back to back with table swaps, bit-exact against
  golden; three broken shells (a flipped table bit, a dropped TLAST, TVALID that falls before
  its handshake) are each reported.
* Every named configuration's shell lints clean; `fusesoc run --target lint` and
  `--target sim` pass on the generated core, and fail on a broken design.
* docs/hardware.md's port table, shell instance and manifest table are the generated shell's; its
  manifest gives the lane fields and the reset's polarity.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Const, Signal
from amaranth.lib import wiring
from amaranth.sim import Simulator

import mutants
from hdl_harness import ShellTop
from sop.golden.layout import pack_blocks
from sop.hdl import axis, reference
from sop.hdl.config import base_name, named_configs, residual_configs
from sop.hdl.decoder import Decoder
from sop.hdl.generate import axis_module_name, generate, generate_axis
from sop.sim import runner, stimulus
from test_verilog import LATENCY, LINT_WAIVERS, verilog_ports

CONFIGS = named_configs()
SPARSE = residual_configs()
ALL = {**CONFIGS, **SPARSE}


def random_layers(cfg, n_layers, n_blocks, seed):
    rng = np.random.default_rng(seed)
    return [stimulus.random_layer(cfg, rng, n_blocks) for _ in range(n_layers)]


def as_model_layers(layers):
    return [(la.luts, la.offset, la.headers, la.codes, la.sparse_index, la.sparse_values) for la in layers]


# -- the model ------------------------------------------------------------------------------------
def test_tdata_layout_and_load_words():
    cfg, exact = CONFIGS["sop4-g16"], CONFIGS["sop4-g16-exact"]
    assert axis.widths(cfg) == {"s_axis": 72, "s_axis_load": 32, "m_axis": 128}
    assert axis.widths(exact)["m_axis"] == 8 * 24 and axis.lane_bytes(exact) == 3      # 21-bit lanes in 3 bytes
    assert all(w % 8 == 0 for c in CONFIGS.values() for w in axis.widths(c).values())
    # a load word: ctrl byte (bank, offset flag), address byte, HIF code in bytes 2-3
    assert axis.load_word(cfg, bank=1, addr=0xA, data=0x3FF) == 0x03FF_0A_01
    assert axis.load_word(cfg, data=-3 & 0xFF, offset=True) == 0x00FD_00_02
    layer = random_layers(cfg, 1, 4, seed=0)[0]
    loads = axis.load_beats(cfg, layer.luts, layer.offset)
    assert len(loads) == 2 * 16 + 1 and [t for _, t in loads] == [0] * 32 + [1]
    # the block packet is golden's packed bytes, TLAST on the last beat
    beats = axis.block_beats(cfg, layer.headers, layer.codes)
    assert axis.to_bytes(beats, 72) == pack_blocks(cfg.layout, layer.headers, layer.codes)
    assert [t for _, t in beats] == [0, 0, 0, 1]
    # output: lane i at bytes [i * lane_bytes, ...), zero-extended; one packet per layer
    layers = random_layers(exact, 2, 3, seed=1)
    out = axis.model(exact, as_model_layers(layers))
    assert [t for _, t in out] == ([0] * 5 + [1]) * 2
    words = reference.expected_beats(exact, layers[0].luts, layers[0].offset, layers[0].headers, layers[0].codes)[0]
    assert [(out[0][0] >> (24 * i)) & 0xFFFFFF for i in range(8)] == words


# -- amaranth.sim ---------------------------------------------------------------------------------
class ValidWaitsForReady(axis.AxisDecoder):
    """A broken shell: ``m_axis_tvalid`` low every other cycle unless TREADY is high."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        toggle = Signal()
        m.d.sync += toggle.eq(~toggle)
        m.d.comb += self.m_axis.tvalid.eq(self.decoder.values.valid & (self.m_axis.tready | ~toggle))
        return m


def simulate_shell(cfg, layers, *, p_idle, p_stall, seed=0, max_cycles=20_000, shell=axis.AxisDecoder,
                   n_out=None, load_packets=None, block_packets=None):
    """Drive an ``AxisDecoder`` as an AXI host does: all load packets on ``s_axis_load``, all
    block packets on ``s_axis``, beats held until taken, random gaps and pauses. Returns the
    output beats ``(tdata, tlast)``, their handshake cycles, the block beats' handshake cycles,
    the cycles where ``m_axis`` changed with TREADY, and the shell simulated (``final_errors``:
    its ``sparse_error`` at the end, with residuals; ``final_load_error``; ``load_cycles``: the
    load beats' handshake cycles; ``trace``: each cycle's ``(s_axis_tready, load_error)``).
    ``load_packets``, ``block_packets``: each layer's load or block beats, where a test frames
    them otherwise than ``axis.load_beats`` or ``axis.block_beats``; ``n_out``: the output beats
    to wait for, where fewer than the layers' come (the run ends at ``max_cycles`` if they do not)."""
    dut = shell(cfg)
    rng = np.random.default_rng(seed)
    if block_packets is None:
        block_packets = [axis.block_beats(cfg, la.headers, la.codes) for la in layers]
    blocks = [b for packet in block_packets for b in packet]
    if load_packets is None:
        load_packets = [axis.load_beats(cfg, la.luts, la.offset, la.has_sparse) for la in layers]
    loads = [b for packet in load_packets for b in packet]
    entries = [b for la in layers for b in axis.sparse_beats(la.sparse_index, la.sparse_values)]
    if n_out is None:
        n_out = sum(len(la.expected(cfg)) for la in layers)
    got, out_cycles, in_cycles, depends, errors = [], [], [], [], []
    dut.final_errors = errors                   # the sparse_error bits at the end (with residuals)
    dut.load_cycles, dut.trace = [], []

    async def host(ctx):
        s, ld, m = dut.s_axis, dut.s_axis_load, dut.m_axis
        sp = dut.s_axis_sparse if cfg.residuals else None
        si = li = ei = 0
        s_on = l_on = e_on = False
        for cycle in range(max_cycles):
            if not s_on and si < len(blocks) and rng.random() >= p_idle:
                s_on = True
                ctx.set(s.tdata, blocks[si][0])
                ctx.set(s.tlast, blocks[si][1])
            if not l_on and li < len(loads) and rng.random() >= p_idle:
                l_on = True
                ctx.set(ld.tdata, loads[li][0])
                ctx.set(ld.tlast, loads[li][1])
            if sp is not None and not e_on and ei < len(entries) and rng.random() >= p_idle:
                e_on = True
                ctx.set(sp.tdata, entries[ei][0])
                ctx.set(sp.tlast, entries[ei][1])
            sources = [x for x in (s, ld, sp) if x is not None]
            probe = []
            for v in (0, 1):                    # every TREADY the same with TVALID low and high
                for x in sources:
                    ctx.set(x.tvalid, v)
                probe.append([ctx.get(x.tready) for x in sources])
            if probe[0] != probe[1]:
                depends.append(cycle)
            ctx.set(s.tvalid, s_on)
            ctx.set(ld.tvalid, l_on)
            if sp is not None:
                ctx.set(sp.tvalid, e_on)
            seen = []
            for r in (0, 1):                    # m_axis with TREADY low, then high: the same
                ctx.set(m.tready, r)
                seen.append((ctx.get(m.tvalid), ctx.get(m.tdata), ctx.get(m.tlast)))
            if seen[0] != seen[1]:
                depends.append(cycle)
            ready = rng.random() >= p_stall
            ctx.set(m.tready, ready)
            dut.trace.append((ctx.get(s.tready), ctx.get(dut.load_error)))
            if s_on and ctx.get(s.tready):
                in_cycles.append(cycle)
                si, s_on = si + 1, False
            if l_on and ctx.get(ld.tready):
                dut.load_cycles.append(cycle)
                li, l_on = li + 1, False
            if e_on and ctx.get(sp.tready):
                ei, e_on = ei + 1, False
            if ready and seen[1][0]:
                got.append((seen[1][1], seen[1][2]))
                out_cycles.append(cycle)
                if len(got) == n_out:
                    break
            await ctx.tick()
        if sp is not None:
            errors.append(ctx.get(dut.sparse_error))
        dut.final_load_error = ctx.get(dut.load_error)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.run()
    return got, out_cycles, in_cycles, depends, dut


@pytest.mark.parametrize("name", ["sop4-g16", "sop4-g16-x64"])
def test_shell_matches_its_model_and_valid_never_waits_for_ready(name):
    cfg = CONFIGS[name]
    layers = random_layers(cfg, 3, 8 if cfg.lanes <= 8 else 16, seed=2)
    got, _, _, depends, dut = simulate_shell(cfg, layers, p_idle=0.3, p_stall=0.3, seed=3)
    assert got == axis.model(cfg, as_model_layers(layers)) and dut.final_load_error == 0
    assert depends == [], f"m_axis changed with TREADY (or a TREADY with TVALID) in cycles {depends[:5]}"


def sparse_layers(cfg, seed, n_blocks=8):
    """Layers with every pattern of entries (stimulus.with_sparse), a layer without entries after
    every other one."""
    rng = np.random.default_rng(seed)
    out = []
    for i, pattern in enumerate(stimulus.SPARSE_PATTERNS):
        out.append(stimulus.with_sparse(cfg, stimulus.random_layer(cfg, rng, n_blocks), rng, pattern, 0.05))
        if i % 2 == 0:
            out.append(stimulus.random_layer(cfg, rng, 2))
    return out


def test_sparse_shell_matches_golden_with_gaps_and_pauses():
    """The -sp shell: every entry pattern, layers with and without entries back to back, every
    packet queued at once (entries wait for their layer), random TVALID gaps and TREADY pauses;
    golden's residual sums, no TREADY that depends on TVALID, no error bit set."""
    cfg = SPARSE["sop4-g16-sp"]
    layers = sparse_layers(cfg, seed=6)
    assert sum(la.has_sparse for la in layers) == len(stimulus.SPARSE_PATTERNS)
    got, _, _, depends, dut = simulate_shell(cfg, layers, p_idle=0.3, p_stall=0.3, seed=7, max_cycles=40_000)
    assert got == axis.model(cfg, as_model_layers(layers))
    assert depends == [], f"a TREADY depends on TVALID, or m_axis on TREADY, in cycles {depends[:5]}"
    assert axis.widths(cfg) == {"s_axis": 72, "s_axis_load": 32, "m_axis": 128, "s_axis_sparse": 48}
    assert dut.latency == dut.decoder.latency and dut.final_errors == [0] and dut.final_load_error == 0


@pytest.mark.parametrize("fault", ["offset word without TLAST", "TLAST on a table word"])
def test_a_misframed_load_packet_sets_load_error(fault):
    """A load packet ends with its offset word, TLAST on it and nowhere else. An offset word
    without TLAST ran the packet on into the next layer's, whose tables and offset replaced the
    waiting page's: layer A came out decoded with layer B's page and nothing said so (an outside
    review, after the same bug in the GEMV shell). Now ``load_error`` is set; a packet cut short
    by TLAST on a table word sets it too. Good packets leave it 0 (the tests above)."""
    cfg = CONFIGS["sop4-g16"]
    a, b = random_layers(cfg, 2, 4, seed=8)
    packets = [axis.load_beats(cfg, la.luts, la.offset) for la in (a, b)]
    if fault == "offset word without TLAST":
        packets[0][-1] = (packets[0][-1][0], 0)
    else:
        packets[0][4] = (packets[0][4][0], 1)
    n_a = len(a.expected(cfg))
    got, _, _, _, dut = simulate_shell(cfg, [a, b], p_idle=0.2, p_stall=0.2, seed=9, n_out=n_a,
                                       load_packets=packets)
    assert dut.final_load_error == 1
    if fault == "offset word without TLAST":      # what the flag reports: A on B's page, no other sign
        b_page = dataclasses.replace(a, luts=b.luts, offset=b.offset)
        assert got == axis.model(cfg, as_model_layers([b_page])) != axis.model(cfg, as_model_layers([a]))


# -- constant TLASTs (docs/hardware.md, "Every input must be driven") -------------------------------
MINILM_QKV = tuple(f"encoder.layer.0.attention.self.{w}.weight" for w in ("query", "key", "value"))


@pytest.fixture(scope="module")
def minilm_layers():
    """Three MiniLM layers as sop4-g16 streams them (each the first row of a weight, 24 blocks),
    each with its own page (tables and offset): what docs/hardware.md's constant-TLAST paragraph
    streamed back to back."""
    from sop.quantize.sop_search import quantize_sop4
    from sop.quantize.weights import minilm_linear_weights

    weights = minilm_linear_weights()
    return [stimulus.from_stream(CONFIGS["sop4-g16"], quantize_sop4(weights[n][:1], None).stream, n)
            for n in MINILM_QKV]


def tied(packet, tlast: int):
    """``packet``'s beats with TLAST tied to the constant ``tlast``."""
    return [(d, tlast) for d, _ in packet]


def on_page(layer, page):
    """``layer``'s blocks with ``page``'s tables and offset: what it decodes to on that page."""
    return dataclasses.replace(layer, luts=page.luts, offset=page.offset)


def test_m_axis_tready_tied_high_decodes_the_layers(minilm_layers):
    """A consumer without TREADY ties ``m_axis_tready`` high (docs/hardware.md): the three MiniLM layers
    come out as golden decodes them, one packet each, no error bit."""
    cfg = CONFIGS["sop4-g16"]
    got, _, _, _, dut = simulate_shell(cfg, minilm_layers, p_idle=0.2, p_stall=0.0, seed=12)
    assert got == axis.model(cfg, as_model_layers(minilm_layers)) and dut.final_load_error == 0


def test_s_axis_tlast_tied_low_makes_the_stream_one_layer(minilm_layers):
    """``s_axis_tlast`` tied low: every beat comes out, the second and third layers decoded with the
    first's page (golden's decode of their blocks with its tables and offset, not their own), no
    ``m_axis_tlast`` and no ``load_error``."""
    cfg = CONFIGS["sop4-g16"]
    blocks = [tied(axis.block_beats(cfg, la.headers, la.codes), 0) for la in minilm_layers]
    got, _, in_cycles, _, dut = simulate_shell(cfg, minilm_layers, p_idle=0.2, p_stall=0.2, seed=13,
                                               block_packets=blocks)
    assert len(in_cycles) == sum(map(len, blocks))                          # every block beat taken
    def tdata(layer):
        return [d for d, _ in axis.model(cfg, as_model_layers([layer]))]

    first, rest = minilm_layers[0], got
    for k, la in enumerate(minilm_layers):
        n = len(la.expected(cfg))
        mine, rest = rest[:n], rest[n:]
        assert [d for d, _ in mine] == tdata(on_page(la, first)), f"layer {k + 1} not on layer 1's page"
        if k:                           # (the page matters: on its own page the layer decodes otherwise)
            assert [d for d, _ in mine] != tdata(la), k
        assert [t for _, t in mine] == [0] * n, f"m_axis_tlast in layer {k + 1}"
    assert rest == [] and dut.final_load_error == 0


def test_s_axis_tlast_tied_high_makes_every_beat_a_layer(minilm_layers):
    """``s_axis_tlast`` tied high: every block beat is a layer of its own, the ``k``-th decoded with the
    ``k``-th load packet's page, TLAST on its last output beat; once the three load packets are in,
    ``s_axis_tready`` stays low (a bounded wait: 300 cycles after the last beat taken)."""
    cfg = CONFIGS["sop4-g16"]
    blocks = [tied(axis.block_beats(cfg, la.headers, la.codes), 1) for la in minilm_layers]
    wait = 300
    got, _, in_cycles, _, dut = simulate_shell(cfg, minilm_layers, p_idle=0.2, p_stall=0.2, seed=14,
                                               block_packets=blocks, max_cycles=len(minilm_layers) * 60 + wait)
    stream, bpb = minilm_layers[0], cfg.blocks_per_beat                 # the stream's first beats: layer 1's
    beats = [dataclasses.replace(on_page(stream, page), headers=stream.headers[k * bpb:(k + 1) * bpb],
                                 codes=stream.codes[k * bpb:(k + 1) * bpb]) for k, page in enumerate(minilm_layers)]
    assert got == axis.model(cfg, as_model_layers(beats))
    n_loads = sum(len(axis.load_beats(cfg, la.luts, la.offset)) for la in minilm_layers)
    assert len(in_cycles) == len(minilm_layers) and len(dut.load_cycles) == n_loads < in_cycles[-1]
    after = [r for r, _ in dut.trace[in_cycles[-1] + 1:]]
    assert len(after) >= wait and not any(after), "s_axis_tready rose with no load packet left"
    assert dut.final_load_error == 0


def test_s_axis_load_tlast_tied_low_sets_load_error_and_takes_no_block(minilm_layers):
    """``s_axis_load_tlast`` tied low: ``load_error`` rises the cycle after the first offset word's
    handshake (0 before, sticky after), and no block beat is taken (``s_axis_tready`` low throughout)
    while the load stream takes every word (no packet ever completes a page)."""
    cfg = CONFIGS["sop4-g16"]
    loads = [tied(axis.load_beats(cfg, la.luts, la.offset), 0) for la in minilm_layers]
    got, _, in_cycles, _, dut = simulate_shell(cfg, minilm_layers, p_idle=0.2, p_stall=0.2, seed=15,
                                               load_packets=loads, max_cycles=400)
    offset_word = dut.load_cycles[len(loads[0]) - 1]
    errors = [e for _, e in dut.trace]
    assert errors == [0] * (offset_word + 1) + [1] * (len(errors) - offset_word - 1), "load_error not set then"
    assert in_cycles == [] and got == [] and not any(r for r, _ in dut.trace)
    assert len(dut.load_cycles) == sum(map(len, loads))


def test_valid_check_catches_valid_that_waits_for_ready():
    cfg = CONFIGS["sop4-g16"]
    got, _, _, depends, _ = simulate_shell(cfg, random_layers(cfg, 1, 4, seed=5), p_idle=0.3, p_stall=0.3,
                                           shell=ValidWaitsForReady)
    assert got == axis.model(cfg, as_model_layers(random_layers(cfg, 1, 4, seed=5)))   # the values are right
    assert len(depends) > 3


@pytest.mark.parametrize("name", ["sop4-g16", "sop4-g16-x64"])
def test_shell_full_speed_latency_and_no_bubble(name):
    cfg = CONFIGS[name]
    # each layer's output takes 48 cycles: more than the next layer's load packet (33 words), which
    # streams beside it (x64: one cycle per beat of 4 blocks; the most input beats in flight)
    layers = random_layers(cfg, 3, 24 if cfg.lanes <= 8 else 192, seed=4)
    got, out_cycles, in_cycles, _, dut = simulate_shell(cfg, layers, p_idle=0.0, p_stall=0.0)
    assert got == axis.model(cfg, as_model_layers(layers))
    assert dut.latency == dut.decoder.latency == LATENCY[name]
    # the first layer's first beat waits for its load packet (33 words), then nothing waits
    assert in_cycles[0] == 33
    assert out_cycles[0] - in_cycles[0] == dut.latency
    assert out_cycles == list(range(out_cycles[0], out_cycles[0] + len(got)))   # no bubble, across layers


def test_the_documented_shortest_layer_without_a_bubble():
    """docs/hardware.md's bound for no bubble across layers at full speed, measured: the next
    layer's load packet (33 words for sop4-g16's tables) starts the cycle after this layer's first
    beat and the next first beat the cycle after its TLAST, so a layer of 33 cycles leaves one
    bubble and 34 none (an outside probe found the page saying 33 was enough). A 16-lane sop4-g16
    takes one beat a cycle, so a layer can last any number of cycles."""
    from dataclasses import replace

    text = Path(__file__).resolve().parent.parent.joinpath("docs", "hardware.md").read_text()
    m = re.search(r"words: 33 for sop4-g16, so (\d+) cycles or more", " ".join(text.split()))
    assert m, "docs/hardware.md no longer states the shortest layer without a bubble in the expected words"
    documented = int(m[1])
    cfg = replace(CONFIGS["sop4-g16"], lanes=16, name="sop4-g16-x16")
    lengths = [documented - 1, documented, 4]                 # cycles (= beats = blocks) of each layer
    layers = [random_layers(cfg, 1, n, seed=i)[0] for i, n in enumerate(lengths)]
    got, out_cycles, _, _, _ = simulate_shell(cfg, layers, p_idle=0.0, p_stall=0.0)
    assert got == axis.model(cfg, as_model_layers(layers))
    starts = np.cumsum([0] + lengths[:-1])                    # each layer's first output beat
    bubbles = [out_cycles[s] - out_cycles[s - 1] - 1 for s in starts[1:]]
    assert bubbles == [1, 0], f"bubbles before layers 2 and 3: {bubbles}"


def test_a_shallow_decoder_gets_no_shell():
    """The shallow pipeline's ``values.ready`` reaches ``blocks.ready`` combinationally: an ``AxisDecoder``
    around it was built, its ``s_axis_tready`` following ``m_axis_tready`` in the same cycle, where the
    shell's contract is TREADYs from registers only (an outside probe; `generate` writes it no shell)."""
    from dataclasses import replace

    with pytest.raises(ValueError, match="the shallow one has no shell"):
        axis.AxisDecoder(replace(CONFIGS["sop4-g16"], pipeline="shallow"))


# -- cocotb (Icarus) with cocotbext-axi -------------------------------------------------------------
def plan_values(summary, build_dir, cfg):
    """(values, layers) of the plan the runner wrote, rebuilt from the seed the bench reported."""
    plan = json.loads((build_dir / "plan.json").read_text())
    content, _ = stimulus.seeded_rngs(summary["seed"])
    layers = [la for job in stimulus.plan_jobs(cfg, plan, content) for la in job.layers]
    return sum(la.codes.size for la in layers), len(layers)


@pytest.mark.parametrize("name", ["sop4-g16", "sop4-g16-exact", "e2m3-ue4m4-g16"])
def test_axis_regression_quick(name, tmp_path):
    cfg = CONFIGS[name]
    s = runner.run_axis(cfg, "icarus", quick=True, seed=1, build_dir=tmp_path / "build")
    print(runner.axis_summary_line(s))
    assert s["failed_tests"] == 0 and s["mismatches"] == 0 and s["protocol_errors"] == 0
    values, n_layers = plan_values(s, tmp_path / "build", cfg)
    assert s["checked"] == values and s["layers"] == n_layers == 6       # 3 random + 3 corner layers
    assert s["stalled_cycles"] > 10                                        # TREADY pauses did happen


@pytest.mark.parametrize("name, sim", [("sop4-g16-sp", "icarus"), ("sop4-g16-x1-sp", "verilator")])
def test_sparse_axis_regression_quick(name, sim, tmp_path):
    """A -sp shell in cocotb: random and corner layers, then every entry pattern with layers
    without entries between (sparse packets on ``s_axis_sparse``), golden's residual sums."""
    cfg = SPARSE[name]
    s = runner.run_axis(cfg, sim, quick=True, seed=1, build_dir=tmp_path / "build")
    print(runner.axis_summary_line(s))
    assert s["failed_tests"] == 0 and s["mismatches"] == 0 and s["protocol_errors"] == 0 and not s["sparse_errors"]
    assert s["load_error"] is False
    plan = json.loads((tmp_path / "build" / "plan.json").read_text())
    content, _ = stimulus.seeded_rngs(s["seed"])
    layers = [la for job in stimulus.plan_jobs(cfg, plan, content) for la in job.layers]
    assert s["checked"] == sum(la.codes.size for la in layers) and s["layers"] == len(layers)
    assert s["sparse_entries"] == sum(len(la.sparse_index) for la in layers) > 50
    assert sum(la.has_sparse for la in layers) == len(stimulus.SPARSE_PATTERNS)


class NoSparseFlag(axis.AxisDecoder):
    """A broken -sp shell: the offset word's ``CTRL_SPARSE`` bit is ignored (every layer loaded
    as one without entries, so no packet is ever taken and no residual added)."""

    def _sparse(self, m, dec, offset_take, flag, swap_take):
        super()._sparse(m, dec, offset_take, Const(0), swap_take)


class TamperedTop(ShellTop):
    """``AxisTop``'s ports around a shell whose ``m_axis`` is broken: ``"tlast"`` drops every
    second layer's TLAST (two layers in one packet), ``"hold"`` lowers TVALID every other
    cycle while TREADY is low (a beat withdrawn before its handshake; the data stay right),
    ``"data"`` flips TDATA's low bit every other cycle while TREADY is low (right at every
    handshake), ``"load_error"`` reports a misframed load packet on a good stream."""

    def __init__(self, cfg, how):
        self.how = how
        super().__init__(cfg)

    def wire(self, m, core) -> None:
        wiring.connect(m, wiring.flipped(self.s_axis), core.s_axis)
        wiring.connect(m, wiring.flipped(self.s_axis_load), core.s_axis_load)
        o, c = self.m_axis, core.m_axis
        toggle = Signal()
        m.d.sync += toggle.eq(~toggle)
        m.d.comb += [o.tdata.eq(c.tdata), c.tready.eq(o.tready), o.tvalid.eq(c.tvalid), o.tlast.eq(c.tlast)]
        if self.how == "load_error":
            m.d.comb += self.load_error.eq(1)              # (replaces ShellTop's core.load_error)
        if self.how == "tlast":
            odd = Signal()
            with m.If(c.tvalid & c.tready & c.tlast):
                m.d.sync += odd.eq(~odd)
            m.d.comb += o.tlast.eq(c.tlast & ~odd)
        elif self.how == "data":
            m.d.comb += o.tdata.eq(c.tdata ^ (~o.tready & toggle))
        elif self.how == "hold":
            m.d.comb += o.tvalid.eq(c.tvalid & (o.tready | ~toggle))


@pytest.mark.parametrize("how", ["value", "tlast", "hold", "data", "sparse", "load_error"])
def test_axis_regression_reports_a_broken_shell(how, tmp_path):
    cfg = SPARSE["sop4-g16-sp"] if how == "sparse" else CONFIGS["sop4-g16"]
    if how == "value":
        top = axis.AxisTop(cfg, decoder=Decoder(cfg, bank=mutants.FlippedLutBit))
    elif how == "sparse":
        top = axis.AxisTop(cfg, core=NoSparseFlag(cfg))
    else:
        top = TamperedTop(cfg, how)
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(top, name=axis_module_name(cfg), ports=axis.axi_ports(top), emit_src=False))
    s = runner.run_axis(cfg, "icarus", quick=True, seed=1, verilog=v, build_dir=tmp_path / "build")
    assert s["failed_tests"] == 1
    log = (tmp_path / "build" / "sim.log").read_text()
    if how in ("hold", "data"):         # the values are right; only the protocol monitor sees it
        said = {"hold": "TVALID fell before its handshake",
                "data": "TDATA or TLAST changed while TVALID high and TREADY low"}[how]
        assert s["mismatches"] == 0 and s["protocol_errors"] > 0 and said in log
    elif how == "load_error":           # the values are right; only the status bit says otherwise
        assert s["mismatches"] == 0 and s["load_error"] is True and "load_error set on a good stream" in log
    else:
        assert s["mismatches"] > 0
        assert ("TLAST misplaced" if how == "tlast" else "lane") in log


# -- the generated files and FuseSoC ----------------------------------------------------------------
@pytest.fixture(scope="module")
def axis_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("verilog")
    for cfg in ALL.values():
        generate_axis(cfg, out)
    for cfg in SPARSE.values():             # the bare -sp decoders' manifests (their latency)
        generate(cfg, out)
    return out


@pytest.mark.parametrize("name", ALL)
def test_shell_ports_manifest_and_lint(axis_dir, name):
    cfg = ALL[name]
    doc = json.loads((axis_dir / f"{name}_axis.json").read_text())
    ports = {p["name"]: (p["direction"], p["width"]) for p in doc["ports"]}
    assert verilog_ports((axis_dir / f"{name}_axis.v").read_text(), doc["module"]) == ports
    w = axis.widths(cfg)
    streams = ("", "_load", "_sparse") if cfg.residuals else ("", "_load")
    assert ports == {"aclk": ("input", 1), "aresetn": ("input", 1),
                     **{f"s_axis{s}_{sig}": (d, n) for s in streams
                        for sig, d, n in (("tdata", "input", w[f"s_axis{s}"]), ("tvalid", "input", 1),
                                          ("tready", "output", 1), ("tlast", "input", 1))},
                     "m_axis_tdata": ("output", w["m_axis"]), "m_axis_tvalid": ("output", 1),
                     "m_axis_tready": ("input", 1), "m_axis_tlast": ("output", 1), "load_error": ("output", 1),
                     **({"sparse_error": ("output", 4)} if cfg.residuals else {})}
    if cfg.residuals:       # the decoder's latency with its residual stage (tests/test_verilog_sparse.py)
        bare = json.loads((axis_dir / f"{name}.json").read_text())          # the decoder's manifest
        assert doc["latency_cycles"] == bare["latency_cycles"] == \
            LATENCY[base_name(name)] + bare["latency_stages"]["residual"]
        assert w["s_axis_sparse"] == 48 and doc["ctrl_bits"]["sparse"] == 2
        assert doc["sparse_fields"] == {"index": {"lsb": 0, "width": 32}, "value": {"lsb": 32, "width": 16}}
        assert doc["sparse_error_bits"] == ["order", "past_layer", "no_layer", "not_finite"]
    else:
        assert doc["latency_cycles"] == LATENCY[name]                # the decoder's (tests/test_verilog.py)
    r = subprocess.run(["verilator", "--lint-only", "-Wall", str(LINT_WAIVERS), str(axis_dir / f"{name}_axis.v")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("name", ALL)
def test_the_shell_manifest_gives_the_lane_fields_and_the_reset_polarity(axis_dir, name):
    """An integrator of the shell reads `NAME_axis.json` alone: the lane word's fields (the exact
    lane's `sig`, `exp`, `sign` were only in the bare decoder's manifest) tile the lane, and
    ``aresetn`` says it is synchronous and active low (the bare manifest's ``rst`` said so; the
    shell's said nothing)."""
    doc = json.loads((axis_dir / f"{name}_axis.json").read_text())
    fields = doc["lane_fields"]
    assert [f["lsb"] for f in fields] == [sum(g["width"] for g in fields[:i]) for i in range(len(fields))]
    assert sum(f["width"] for f in fields) == doc["lane_word_bits"] <= 8 * doc["lane_bytes"]
    want = [("sig", 11, False), ("exp", 9, True), ("sign", 1, False)] if ALL[name].output == "exact" \
        else [("bf16", 16, False)]                      # hardware.md: sop4-g16-exact's P = 11, E = 9
    assert [(f["name"], f["width"], f["signed"]) for f in fields] == want
    (reset,) = [p for p in doc["ports"] if p["name"] == "aresetn"]
    assert reset["note"] == "synchronous, active low"


def test_the_documented_shell_instance_ports_and_manifest_are_the_generated_ones(axis_dir, tmp_path):
    """docs/hardware.md, "AXI4-Stream shell", against the generated sop4-g16-sp shell (every port a
    shell has): the port table (names, directions, widths), the instance an integrator copies (every
    port connected once, each TDATA's width in its comment; it compiles in Icarus and lints clean
    with -Wall beside the shell's waivers) and the manifest table (exactly the manifest's fields;
    the `-sp only` rows absent from sop4-g16's). The doc had no instance of the shell and no
    table of its manifest."""
    text = Path(__file__).resolve().parent.parent.joinpath("docs", "hardware.md").read_text()
    section = text[text.index("## AXI4-Stream shell"):text.index("### The FuseSoC core")]
    name = "sop4-g16-sp"
    doc = json.loads((axis_dir / f"{name}_axis.json").read_text())
    ports = {p["name"]: (p["direction"], p["width"]) for p in doc["ports"]}
    # the port table: one row per port or group of ports; "in, out" pairs with the names in order
    table = section[section.index("| port | dir | width (sop4-g16) | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names, dirs = re.findall(r"`(\w+)`", cells[0]), [d.strip() for d in cells[1].split(",")]
        dirs = dirs * len(names) if len(dirs) == 1 else dirs
        assert len(dirs) == len(names), line
        for n, d in zip(names, dirs):
            rows[n] = ({"in": "input", "out": "output"}[d], int(re.findall(r"\d+", cells[2])[-1]))
    assert rows == ports
    # the instance
    m = re.search(r"```verilog\n(?P<mod>\w+) u_dec \((?P<body>.*?)\n\);\n```", section, re.S)
    assert m and m["mod"] == doc["module"], "docs/hardware.md has no instance of the shell"
    conns = re.findall(r"\.(\w+)\((\w+)\)", m["body"])
    assert sorted(p for p, _ in conns) == sorted(ports)
    for line in m["body"].splitlines():
        said = re.search(r"\.(\w+)\(.*// (\d+):", line)
        if said:
            assert int(said[2]) == ports[said[1]][1], line
    assert {p for line in m["body"].splitlines() if (said := re.search(r"\.(\w+_tdata)\(.*// (\d+):", line))
            for p in [said[1]]} == {p for p in ports if p.endswith("_tdata")}
    decl = ",\n".join(f"  {ports[p][0]} wire {f'[{ports[p][1] - 1}:0] ' if ports[p][1] > 1 else ''}{s}"
                      for p, s in conns)
    (tmp_path / "my_top.v").write_text(f"module my_top(\n{decl});\n{m['mod']} u_dec ({m['body']}\n);\nendmodule\n")
    shell, vlt = axis_dir / f"{name}_axis.v", axis_dir / f"{name}_axis.vlt"
    subprocess.run(["iverilog", "-g2005", "-o", str(tmp_path / "a.vvp"), "my_top.v", str(shell)], cwd=tmp_path,
                   check=True, capture_output=True, text=True)
    r = subprocess.run(["verilator", "--lint-only", "-Wall", str(vlt), str(shell), "my_top.v"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "%Warning" not in r.stderr, r.stderr[-3000:]
    # the manifest table
    table = section[section.index("| field | meaning |"):]
    table = table[:table.index("\n\n")]
    keys = {re.match(r"\| `(\w+)`", line)[1]: "`-sp` only" in line for line in table.splitlines()[2:]}
    assert set(keys) == set(doc)
    plain = json.loads((axis_dir / "sop4-g16_axis.json").read_text())
    assert set(plain) == {k for k, sp_only in keys.items() if not sp_only}


def fusesoc(cores_root: Path | list[Path], target: str, vlnv: str, work: Path) -> subprocess.CompletedProcess:
    """`fusesoc run --target TARGET VLNV` on the cores in ``cores_root`` (one folder or several): its own
    config file and XDG folders under ``work`` (nothing read from or written to the home folder), no
    network."""
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "fusesoc.conf"
    conf.write_text("[main]\n")
    env = {**os.environ, **{k: str(work / k.lower()) for k in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")}}
    exe = Path(sys.executable).parent / "fusesoc"
    roots = [a for root in (cores_root if isinstance(cores_root, list) else [cores_root])
             for a in ("--cores-root", str(root))]
    return subprocess.run([str(exe), "--config", str(conf), *roots, "run",
                           "--work-root", str(work / target), "--target", target, vlnv],
                          capture_output=True, text=True, env=env, cwd=work)


@pytest.mark.parametrize("drive, edges", [("assignment", 1), ("initializer", 2)])
def test_the_documented_reset_leaves_no_x_in_a_systemverilog_simulator(axis_dir, tmp_path, drive, edges):
    """docs/hardware.md's rule for ARESETn in a SystemVerilog-mode simulator (Icarus -g2012): low for
    one edge, driven by an assignment, or for two edges where a declaration initializer drives it
    (`reg aresetn = 0`: no event at time 0, so the Verilog's combinational blocks, which yosys starts with
    an initializer of its own, wait for the first edge, which loads X; one edge so left TVALID X for
    good). After the reset every output the handshake reads, and ``load_error``, is 0 or 1, and stays so.
    Shown to fail:
    the initializer with one edge."""
    assert shutil.which("iverilog"), "run `make setup`"
    for d, n, want_x in ((drive, edges, False), ("initializer", 1, True)) if drive == "initializer" else \
            ((drive, edges, False),):
        decl = "reg aclk = 0, aresetn = 0;" if d == "initializer" else "reg aclk, aresetn;"
        start = "" if d == "initializer" else "aclk = 0; aresetn = 0;"
        tb = tmp_path / f"tb_{d}_{n}.sv"
        tb.write_text(f"""module tb; {decl} wire r, lr, mv, ml, le; wire [127:0] md; integer i;
  {axis_module_name(CONFIGS["sop4-g16"])} u(.aclk(aclk), .aresetn(aresetn), .s_axis_tdata(72'd0),
    .s_axis_tvalid(1'b0), .s_axis_tlast(1'b0), .s_axis_tready(r), .s_axis_load_tdata(32'd0),
    .s_axis_load_tvalid(1'b0), .s_axis_load_tlast(1'b0), .s_axis_load_tready(lr), .m_axis_tdata(md),
    .m_axis_tvalid(mv), .m_axis_tready(1'b1), .m_axis_tlast(ml), .load_error(le));
  initial begin
    {start}
    for (i = 1; i <= {n} + 3; i = i + 1) begin
      if (i == {n} + 1) aresetn = 1;
      #4 aclk = 1; #1 if (i >= {n}) $display("edge %0d: %b%b%b%b%b", i, r, lr, mv, ml, le);
      #5 aclk = 0;
    end
  end
endmodule
""")
        exe = tmp_path / f"tb_{d}_{n}"
        subprocess.run(["iverilog", "-g2012", "-o", str(exe), str(tb), str(axis_dir / "sop4-g16_axis.v")],
                       check=True, capture_output=True, text=True)
        out = subprocess.run(["vvp", "-n", str(exe)], check=True, capture_output=True, text=True).stdout
        states = re.findall(r"edge \d+: (\S+)", out)
        assert len(states) == 4, out
        assert any("x" in st for st in states) == want_x, (d, n, out)


def readmemh_testbench(cfg, vdir: Path, layer: dict, expect: str, seed: int) -> str:
    """An integrator's testbench of ``NAME_axis.v`` written from docs/vectors.md alone: every word it
    sends or expects comes from a vector set's files through ``$readmemh`` (blocks, the load and
    sparse packets, the expected lane words), every count from ``vectors.json``; random TVALID gaps
    and TREADY pauses; PASS or FAIL."""
    f = {k: (vdir / n).as_posix() for k, n in layer["files"].items()}
    doc = json.loads((vdir / "vectors.json").read_text())
    bb, ld, lane = 8 * doc["layout"]["block_bytes"], doc["axis"]["load"], doc["axis"]["exact_lane"]
    lane = 16 if expect == "bf16" else lane
    bpb = max(1, cfg.lanes // doc["layout"]["group"])           # hardware.md: N/g blocks a beat where N > g
    lbytes = 8 * -(-lane // 8)
    n_blk, n_sp, n_val = layer["n_blocks"], layer["sparse"], layer["rows"] * layer["cols"]
    n_ld = sum(len(b) for b in layer["luts"]) + 1
    sp = cfg.residuals > 0
    return f"""`timescale 1ns/1ps
module tb;
  localparam BB = {bb}, BPB = {bpb}, NBEAT = {n_blk // bpb}, NLD = {n_ld}, NSP = {n_sp}, LANES = {cfg.lanes};
  localparam NOUT = {n_val // cfg.lanes}, LB = {lbytes};
  reg [BB-1:0] blk [0:{n_blk - 1}];
  reg [{ld}:0] ldw [0:NLD-1];
  reg [48:0] spw [0:{max(n_sp, 1) - 1}];
  reg [{lane - 1}:0] expv [0:{n_val - 1}];
  initial begin
    $readmemh("{f["blocks"]}", blk);
    $readmemh("{f["axis_load"]}", ldw);
    $readmemh("{f["bf16" if expect == "bf16" else "exact_hex"]}", expv);
    {f'$readmemh("{f["axis_sparse"]}", spw);' if n_sp else ""}
  end
  reg aclk = 1'b0;
  always #5 aclk = ~aclk;
  reg aresetn;
  reg [BPB*BB-1:0] s_tdata = 0;  reg s_tvalid = 1'b0, s_tlast = 1'b0;  wire s_tready;
  reg [{ld - 1}:0] l_tdata = 0;  reg l_tvalid = 1'b0, l_tlast = 1'b0;  wire l_tready;
  reg [47:0] e_tdata = 0;  reg e_tvalid = 1'b0, e_tlast = 1'b0;  wire e_tready;  wire [3:0] sparse_error;
  wire [LANES*LB-1:0] m_tdata;  wire m_tvalid, m_tlast;  reg m_tready = 1'b0;  wire load_error;
  {axis_module_name(cfg)} dut (.aclk(aclk), .aresetn(aresetn),
    .s_axis_tdata(s_tdata), .s_axis_tvalid(s_tvalid), .s_axis_tlast(s_tlast), .s_axis_tready(s_tready),
    .s_axis_load_tdata(l_tdata), .s_axis_load_tvalid(l_tvalid), .s_axis_load_tlast(l_tlast),
    .s_axis_load_tready(l_tready), .load_error(load_error),{'''
    .s_axis_sparse_tdata(e_tdata), .s_axis_sparse_tvalid(e_tvalid), .s_axis_sparse_tlast(e_tlast),
    .s_axis_sparse_tready(e_tready), .sparse_error(sparse_error),''' if sp else ""}
    .m_axis_tdata(m_tdata), .m_axis_tvalid(m_tvalid), .m_axis_tlast(m_tlast), .m_axis_tready(m_tready));
  {"" if sp else "assign e_tready = 1'b0;  assign sparse_error = 4'b0;"}
  integer seed = {seed}, bi = 0, li = 0, ei = 0, oi = 0, k, cycles = 0, errors = 0;
  reg s_took = 1'b0, l_took = 1'b0, e_took = 1'b0;
  initial begin
    aresetn = 1'b0;
    @(posedge aclk); @(posedge aclk); #1 aresetn = 1'b1;
  end
  always @(posedge aclk) if (aresetn) begin
    s_took = s_tvalid & s_tready;  l_took = l_tvalid & l_tready;  e_took = e_tvalid & e_tready;
    if (s_took) bi = bi + 1;
    if (l_took) li = li + 1;
    if (e_took) ei = ei + 1;
    if (m_tvalid & m_tready) begin
      for (k = 0; k < LANES; k = k + 1)
        if (m_tdata[k*LB +: LB] !== expv[oi*LANES + k]) begin
          errors = errors + 1;
          if (errors < 10) $display("FAIL: value %0d: got %h, expected %h", oi*LANES + k, m_tdata[k*LB +: LB],
                                    expv[oi*LANES + k]);
        end
      if (m_tlast !== (oi == NOUT - 1)) begin
        errors = errors + 1;
        $display("FAIL: output beat %0d: TLAST %b", oi, m_tlast);
      end
      oi = oi + 1;
    end
    cycles = cycles + 1;
    if (oi == NOUT) begin
      if (sparse_error !== 4'b0 || load_error !== 1'b0) begin
        errors = errors + 1;
        $display("FAIL: sparse_error %b load_error %b", sparse_error, load_error);
      end
      if (li != NLD || ei != NSP) begin
        errors = errors + 1;
        $display("FAIL: took %0d load and %0d sparse beats of %0d and %0d", li, ei, NLD, NSP);
      end
      if (errors == 0) $display("PASS: %0d values, %0d load words, %0d sparse entries", oi*LANES, li, ei);
      else $fatal(1, "FAIL: %0d errors", errors);
      $finish;
    end
    if (cycles > 40 * (NBEAT * {cfg.beats_per_block} + NLD + NSP) + 1000) $fatal(1, "FAIL: timeout at %0d", oi);
  end
  always @(negedge aclk) if (aresetn) begin
    if (!s_tvalid || s_took) begin
      s_tvalid = (bi < NBEAT) && (($random(seed) & 3) != 0);
      for (k = 0; k < BPB; k = k + 1) s_tdata[k*BB +: BB] = blk[(bi < NBEAT ? bi : 0)*BPB + k];
      s_tlast = bi == NBEAT - 1;
    end
    if (!l_tvalid || l_took) begin
      l_tvalid = (li < NLD) && (($random(seed) & 3) != 0);
      {{l_tlast, l_tdata}} = ldw[li < NLD ? li : 0];
    end
    if (!e_tvalid || e_took) begin
      e_tvalid = (ei < NSP) && (($random(seed) & 3) != 0);
      {{e_tlast, e_tdata}} = spw[ei < NSP ? ei : 0];
    end
    m_tready = ($random(seed) & 3) != 0;
    s_took = 1'b0;  l_took = 1'b0;  e_took = 1'b0;
  end
endmodule
"""


@pytest.mark.parametrize("name, source, expect", [
    ("sop4-g16-sp", "sparse", "bf16"), ("sop4-g16-exact", "minilm", "exact"), ("e2m3-ue4m4-g16", "minilm", "bf16"),
    ("sop4-g16-x64", "minilm", "bf16")])
def test_the_vector_files_drive_the_shell_through_readmemh(axis_dir, tmp_path, name, source, expect):
    """`sop vectors`'s files are what docs/vectors.md says an integrator's testbench reads: the blocks,
    the load and sparse packets as `{tlast, tdata}` words and the expected lane words (bf16.hex, or
    exact.hex for an exact configuration) drive the generated shell in Icarus, 0 mismatches, every
    packet taken, `sparse_error` 0 (a layer with entries on the -sp shell; one without on the
    others; blocks of 4 a beat at 64 lanes)."""
    from cli_run import run

    assert shutil.which("iverilog"), "run `make setup`"
    cfg, point = ALL[name], base_name(name).removesuffix("-exact").removesuffix("-x64")
    if source == "sparse":
        art, _ = runner.sparse_artifact(point)
        layer = json.loads((runner.sparse_row_vectors(cfg) / "vectors.json").read_text())["layers"][0]["name"]
        args, rows = [art, "--layer", layer], runner.AXIS_SPARSE_ROWS
    else:
        args, rows = ["minilm", "--layer", "encoder.layer.0.attention.self.query.weight"], 2
    vdir = tmp_path / "v"
    assert run(["vectors", *args, "--format", point, "--rows", rows, "--out", vdir]) == 0
    (layer,) = json.loads((vdir / "vectors.json").read_text())["layers"]
    assert (layer["sparse"] > 0) == (source == "sparse")
    tb = tmp_path / "tb.v"
    tb.write_text(readmemh_testbench(cfg, vdir, layer, expect, seed=11))
    exe = tmp_path / "tb.vvp"
    subprocess.run(["iverilog", "-g2005", "-o", str(exe), str(tb), str(axis_dir / f"{name}_axis.v")],
                   check=True, capture_output=True, text=True)
    r = subprocess.run(["vvp", "-n", str(exe)], capture_output=True, text=True, timeout=600)
    values = layer["rows"] * layer["cols"]
    assert f"PASS: {values} values, {sum(map(len, layer['luts'])) + 1} load words, {layer['sparse']} sparse" \
        in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_fusesoc_lint_and_sim_targets(axis_dir, tmp_path):
    assert shutil.which("iverilog") and shutil.which("verilator"), "run `make setup`"
    for name in ("sop4-g16", "sop4-g16-exact", "sop4-g16-sp"):
        vlnv = f"sop:decoder:{axis_module_name(ALL[name])}"
        r = fusesoc(axis_dir, "lint", vlnv, tmp_path / name)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "--lint-only" in (tmp_path / name / "lint" / f"{vlnv.replace(':', '_')}_0.1.0.vc").read_text()
        r = fusesoc(axis_dir, "sim", vlnv, tmp_path / name)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        # the -sp testbench: its first and last layers with entries, sparse_error 0 at the end
        assert ("PASS: 48 output beats, 3 layers, 26 sparse entries" if ALL[name].residuals
                else "PASS: 48 output beats, 3 layers,") in r.stdout


@pytest.mark.parametrize("parent_rtl", ["clean", "junk", "timescale"],
                         ids=["clean parent", "parent with an unused wire", "parent with a timescale"])
def test_a_parent_core_lints_the_shell_clean_and_its_own_rtl_strictly(axis_dir, tmp_path, parent_rtl):
    """A parent core that instantiates a shell (its `default` target) and lints with -Wall: none of the
    shell's warnings (1,714 before: the default target carried no waivers), and every one of its own
    (the waivers are confined to the shell's file; a copy of the global ones would hide the parent's).
    A parent file that sets a `timescale made Verilator ask each of the shell's modules for one
    (TIMESCALEMOD, an error even without -Wall)."""
    junk = parent_rtl == "junk"
    cfg = CONFIGS["sop4-g16"]
    mod = axis_module_name(cfg)
    ports = json.loads((axis_dir / "sop4-g16_axis.json").read_text())["ports"]
    parent = tmp_path / "parent"
    parent.mkdir()
    ranges = {p["name"]: f"[{p['width'] - 1}:0] " if p["width"] > 1 else "" for p in ports}
    decl = ",\n".join(f"  {p['direction']} wire {ranges[p['name']]}{p['name']}" for p in ports)
    conn = ", ".join(f".{p['name']}({p['name']})" for p in ports)
    (parent / "my_top.v").write_text(("`timescale 1ns / 1ps\n" if parent_rtl == "timescale" else "")
                                     + f"`default_nettype none\nmodule my_top(\n{decl});\n"
                                     + ("  wire [3:0] parent_junk;\n" if junk else "")
                                     + f"  {mod} u_dec({conn});\nendmodule\n`default_nettype wire\n")
    (parent / "my_top.core").write_text(f"""CAPI=2:
name: me:test:my_top:0.1.0
filesets:
  rtl:
    files: [my_top.v]
    file_type: verilogSource
    depend: [sop:decoder:{mod}]
targets:
  lint:
    filesets: [rtl]
    toplevel: my_top
    flow: lint
    flow_options:
      tool: verilator
      verilator_options: [-Wall]
""")
    shutil.copytree(axis_dir, tmp_path / "cores", ignore=shutil.ignore_patterns("*-sp*", "*-x64*", "e2m3*"))
    r = fusesoc([tmp_path / "cores", parent], "lint", "me:test:my_top", tmp_path / "work")
    out = r.stdout + r.stderr
    assert "sop4-g16_axis.v:" not in out, out[-3000:]
    if junk:
        assert r.returncode != 0 and "%Warning-UNUSEDSIGNAL: " in out and "parent_junk" in out, out[-3000:]
    else:
        assert r.returncode == 0, out[-3000:]


def test_the_shell_waivers_reach_the_shell_file_and_no_other(tmp_path):
    """A shell's ``.vlt`` waives its warnings in ``sop4-g16_axis.v`` however the path is given (bare from
    its folder, or with folders: FuseSoC's ``src/CORE/``) and in no other file: a parent's
    ``my_sop4-g16_axis.v`` and the GEMV shell's ``gemv-sop4-g16_axis.v`` end in the same name, and the
    pattern ``*sop4-g16_axis.v`` hid their warnings (an outside probe). Stand-in files with one unused
    wire each keep it fast."""
    from sop.hdl.generate import scoped_waivers

    assert shutil.which("verilator"), "run `make setup`"
    (tmp_path / "src").mkdir()
    (tmp_path / "sop4-g16_axis.vlt").write_bytes(scoped_waivers("sop4-g16_axis"))

    def warnings(rel: str) -> str:
        module = re.sub(r"\W", "_", Path(rel).stem)
        (tmp_path / rel).write_text(f"module {module}(input wire a, output wire y);\n"
                                    f"  wire [3:0] dangling;\n  assign y = a;\nendmodule\n")
        r = subprocess.run(["verilator", "--lint-only", "-Wall", "sop4-g16_axis.vlt", rel],
                           capture_output=True, text=True, cwd=tmp_path)
        return r.stdout + r.stderr

    for rel in ("sop4-g16_axis.v", "src/sop4-g16_axis.v"):
        assert "%Warning" not in warnings(rel), rel
    for rel in ("my_sop4-g16_axis.v", "src/gemv-sop4-g16_axis.v"):
        out = warnings(rel)
        assert "%Warning-UNUSEDSIGNAL" in out and "dangling" in out, (rel, out[-2000:])


def test_fusesoc_targets_fail_on_a_broken_design(axis_dir, tmp_path):
    """The lint target fails on an undriven output (TLAST left unassigned); the testbench fails on a
    wrong value and on ``load_error`` set at the end (one run: each has its own FAIL line)."""
    cfg = CONFIGS["sop4-g16"]
    vlnv = f"sop:decoder:{axis_module_name(cfg)}"
    cores = tmp_path / "cores"
    cores.mkdir()
    for f in ("sop4-g16_axis.core", "sop4-g16_axis_tb.v", "sop4-g16_axis.vlt"):
        shutil.copy(axis_dir / f, cores / f)
    good = (axis_dir / "sop4-g16_axis.v").read_text()
    assert good.count("  assign m_axis_tlast = m_axis__tlast;\n") == 1
    (cores / "sop4-g16_axis.v").write_text(good.replace("  assign m_axis_tlast = m_axis__tlast;\n", ""))
    r = fusesoc(cores, "lint", vlnv, tmp_path / "lint")
    assert r.returncode != 0 and "UNDRIVEN" in r.stdout + r.stderr
    # the testbench's 6th expected beat with one bit flipped; the shell's load_error register set for good
    stuck, n = re.subn(r"(\n    load_error <= )[^;]*;", r"\g<1>1'h1;", good)
    assert n == 1
    (cores / "sop4-g16_axis.v").write_text(stuck)
    tb = (cores / "sop4-g16_axis_tb.v").read_text()
    i = tb.index("exp[5] = 129'h") + len("exp[5] = 129'h") + 5
    (cores / "sop4-g16_axis_tb.v").write_text(tb[:i] + "%x" % (int(tb[i], 16) ^ 1) + tb[i + 1:])
    r = fusesoc(cores, "sim", vlnv, tmp_path / "sim")
    assert r.returncode != 0 and "FAIL: output beat 5" in r.stdout and "FAIL: load_error 1" in r.stdout
