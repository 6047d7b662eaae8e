"""The GEMV engine's AXI4-Stream shell (hdl/gemv_axis.py), its Verilog, FuseSoC core and cocotb bench.

* The beat-level model and the TDATA layouts (the BF16 engine's too: 256-bit x beats).
* amaranth.sim (small buffers): every packet of every layer queued at once, random TVALID
  gaps and TREADY pauses: golden's words, TLAST on each vector's last row; ``m_axis_y``
  never depends on TREADY (probed every cycle); the sequencing rule (a layer's first
  vector waits for its load packet, the next packet waits for that vector, a layer's
  ``vectors`` count decides where the next swap is); the shell's error bits and ``clear`` (an
  event not on ``status`` yet is kept); the recovery docs/dot.md gives after an error that leaves
  the shell out of step (a reset, then every stream again from a layer's load packet), and a reset
  while a load packet waits and vectors of a layer are left; the same queued packets with a BF16
  engine.
* (tests/test_verilog.py: the generated shells, their manifests, lint, FuseSoC targets.)
* cocotb with cocotbext-axi (sim/tb_gemv_axis.py) on ``gemv-sop4-g16_axis.v``: two layers
  of a real MiniLM slice with real E4M3 activations, one with sparse residuals, page
  swaps, bit-exact in Icarus and Verilator; a broken shell (a dropped TLAST) and a
  byte-swapped expected word are reported.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module, ResetInserter, Signal
from amaranth.sim import Simulator

from sop.golden.points import get_point
from sop.hdl import axis, gemv, gemv_axis, gemv_config
from sop.hdl.gemv_config import GemvConfig
from sop.hdl.gemv_axis import GemvAxis, GemvAxisTop
from sop.sim import gemv_layers, tb_gemv_axis

SOP4 = get_point("sop4-g16")
SMALL = GemvConfig("test-axis-sop4-g16", SOP4.layout, SOP4.hif, max_cols=256, max_rows=255)
NAMED = gemv_config.gemv_configs()


def two_layers(seed=0):
    """A 20-row, 64-column layer for two vectors, then a 24-row one with residuals for one."""
    rng = np.random.default_rng(seed)
    a = gemv_layers.random_layer("sop4-g16", 20, 64, rng)
    b = gemv_layers.with_residuals(gemv_layers.random_layer("sop4-g16", 24, 48, rng), rng, 30)
    return [(a, [rng.integers(0, 0x7F, 64), rng.integers(0, 0xFF, 64) & 0xF7]), (b, [rng.integers(0, 0x7F, 48)])]


def simulate(dut, streams, n_out, *, p_idle=0.3, p_stall=0.3, seed=0, max_cycles=30_000, clear_at=None,
             reset_at=None, restart=None, before_reset=None):
    """Drive ``dut`` (a ``GemvAxis``) as an AXI host: each stream's beats held until taken, random
    gaps, random TREADY pauses on ``m_axis_y``. Returns the output beats, the handshake cycles of
    every stream, the cycles where ``m_axis_y`` changed with TREADY or a TREADY with TVALID, and
    ``status`` at the end. ``reset_at`` (a cycle, or a function of the handshake cycles so far that
    says when): in that cycle the host drops every TVALID and holds the reset for one edge, then
    starts afresh on ``restart`` (streams); ``before_reset`` (a dict) gets the output beats, the
    handshake cycles and ``status`` of the cycles before, which the returned ones leave out."""
    rng = np.random.default_rng(seed)
    got, taken, depends, final = [], {name: [] for name in [*streams, "m_axis_y"]}, [], []
    rst = Signal(name="host_reset")
    reset_done = reset_at is None

    async def host(ctx):
        nonlocal streams, reset_done
        pos, on = dict.fromkeys(streams, 0), dict.fromkeys(streams, False)
        y = dut.m_axis_y
        for cycle in range(max_cycles):
            if not reset_done and (reset_at(taken) if callable(reset_at) else cycle == reset_at):
                reset_done = True
                if before_reset is not None:
                    before_reset.update(got=list(got), status=ctx.get(dut.status.as_value()),
                                        taken={k: list(v) for k, v in taken.items()})
                for name in streams:
                    ctx.set(getattr(dut, name).tvalid, 0)
                ctx.set(rst, 1)
                await ctx.tick()
                ctx.set(rst, 0)
                streams = restart
                pos, on = dict.fromkeys(streams, 0), dict.fromkeys(streams, False)
                got.clear()
                taken.update({name: [] for name in [*streams, "m_axis_y"]})
            for name, beats in streams.items():
                port = getattr(dut, name)
                if not on[name] and pos[name] < len(beats) and rng.random() >= p_idle:
                    on[name] = True
                    ctx.set(port.tdata, beats[pos[name]][0])
                    ctx.set(port.tlast, beats[pos[name]][1])
            probe = []
            for v in (0, 1):                    # every TREADY the same with TVALID low and high
                for name in streams:
                    ctx.set(getattr(dut, name).tvalid, v)
                probe.append([ctx.get(getattr(dut, name).tready) for name in streams])
            if probe[0] != probe[1]:
                depends.append(cycle)
            for name in streams:
                ctx.set(getattr(dut, name).tvalid, on[name])
            seen = []
            for r in (0, 1):                    # m_axis_y with TREADY low, then high: the same
                ctx.set(y.tready, r)
                seen.append((ctx.get(y.tvalid), ctx.get(y.tdata), ctx.get(y.tlast)))
            if seen[0] != seen[1]:
                depends.append(cycle)
            ready = rng.random() >= p_stall
            ctx.set(y.tready, ready)
            ctx.set(dut.clear, clear_at is not None and cycle == clear_at)
            for name in streams:
                if on[name] and ctx.get(getattr(dut, name).tready):
                    taken[name].append(cycle)
                    pos[name], on[name] = pos[name] + 1, False
            if ready and seen[1][0]:
                got.append((seen[1][1], seen[1][2]))
                taken["m_axis_y"].append(cycle)
            if len(got) == n_out and all(pos[n] == len(b) for n, b in streams.items()) \
                    and (clear_at is None or cycle > clear_at) and reset_done:
                for _ in range(8):
                    await ctx.tick()
                final.append(ctx.get(dut.status.as_value()))
                return
            await ctx.tick()
        final.append(ctx.get(dut.status.as_value()))

    top = dut
    if reset_at is not None:            # the reset as aresetn gives it: synchronous, every register of the shell
        top = Module()
        top.submodules.dut = ResetInserter({"sync": rst})(dut)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.run()
    return got, taken, depends, final[0]


def status_bits(word: int) -> dict[str, int]:
    """``status`` by field name: ``x_loaded``, the engine's error bits, the shell's."""
    fields = {"x_loaded": 0, **{n: 1 + f.offset for n, f in gemv_config.error_layout()},
              **{n: 1 + gemv_config.error_layout().size + f.offset for n, f in gemv_axis.shell_error_layout()}}
    return {n: (word >> bit) & 1 for n, bit in fields.items()}


# -- the model --------------------------------------------------------------------------------------------
def test_tdata_layouts_and_the_model():
    cfg = NAMED["gemv-sop4-g16"]
    assert gemv_axis.widths(cfg) == {"s_axis_x": 128, "s_axis_w": 72, "s_axis_sparse": 56, "s_axis_load": 64,
                                     "m_axis_y": 32}
    assert gemv_axis.widths(NAMED["gemv-e2m3-ue4m4-g16"])["s_axis_w"] == 104
    layers = two_layers()
    (a, va), (b, vb) = layers
    loads = gemv_axis.load_beats(cfg, a, 2)
    # table words as the decoder shell's (ctrl, address byte, HIF code in bytes 2-3), then the layer word
    assert loads[5] == (axis.load_word(cfg, bank=0, addr=5, data=int(a.luts[0][5])), 0)
    word, last = loads[-1]
    assert last == 1 and word & 0xFF == gemv_axis.CTRL_LAYER and (word >> 8) & 0xFF == a.offset & 0xFF
    assert (word >> 16) & 0xFFFF == 20 and (word >> 32) & 0xFFFF == 4 and word >> 48 == 2
    assert gemv_axis.load_beats(cfg, b, 1)[-1][0] & gemv_axis.CTRL_SPARSE
    # blocks: golden's bytes in tile order, TLAST on the pass's last; x: byte j = column j
    w = gemv_axis.w_beats(cfg, a)
    assert axis.to_bytes(w, 72) == gemv.dot.tiled_blocks(a, cfg.tile) and [t for _, t in w][-2:] == [0, 1]
    x = gemv_axis.x_beats(cfg, va[0])
    assert axis.to_bytes(x, 128) == bytes(int(c) for c in va[0]) and [t for _, t in x] == [0, 0, 0, 1]
    sp = gemv_axis.sparse_beats(cfg, b)
    entries = gemv_config.sparse_beats(cfg, b)
    assert [(d & 0xFFFF, (d >> 16) & 0xFFFF, (d >> 32) & 0xFFFF, d >> 48) for d, _ in sp] == \
        [(e["row"], e["col"], e["value"], e["last"]) for e in entries]
    assert [t for _, t in sp].count(1) == 1 and sp[-1][1] == 1 and gemv_axis.sparse_beats(cfg, a) == []
    # y: golden.dot.gemv word by word, one packet per vector
    out = gemv_axis.model(cfg, layers)
    assert len(out) == 2 * 20 + 24 and [i for i, (_, t) in enumerate(out) if t] == [19, 39, 63]
    y = gemv.model(cfg, b, gemv.dot.ACT_FORMATS["e4m3"].decode(vb[0]).astype(np.float32))
    assert [d for d, _ in out[40:]] == list(y.view(np.uint32))


def bf16_layers(seed=0):
    """``two_layers``' shapes with BF16 code vectors (values within 2^-8 .. 2^9, both signs)."""
    rng = np.random.default_rng(seed)
    a = gemv_layers.random_layer("sop4-g16", 20, 64, rng)
    b = gemv_layers.with_residuals(gemv_layers.random_layer("sop4-g16", 24, 48, rng), rng, 30)
    act = gemv.dot.ACT_FORMATS["bf16"]
    return [(a, [gemv_layers.finite_codes(act, rng, 64) for _ in range(2)]),
            (b, [gemv_layers.finite_codes(act, rng, 48)])]


def test_bf16_tdata_layout_and_model():
    """The BF16 engine's shell: 16 codes of 16 bits a beat (column j in bytes 2j, 2j + 1, little-endian),
    the other streams as the E4M3 engine's; the model is golden.dot.gemv with BF16 activations."""
    cfg = NAMED["gemv-sop4-g16-bf16"]
    assert gemv_axis.widths(cfg) == {**gemv_axis.widths(NAMED["gemv-sop4-g16"]), "s_axis_x": 256}
    layers = bf16_layers()
    (a, va), (b, vb) = layers
    x = gemv_axis.x_beats(cfg, va[0])
    assert axis.to_bytes(x, 256) == np.asarray(va[0], "<u2").tobytes() and [t for _, t in x] == [0, 0, 0, 1]
    bf16 = gemv.dot.ACT_FORMATS["bf16"]
    out = gemv_axis.model(cfg, layers)
    assert len(out) == 2 * 20 + 24 and [i for i, (_, t) in enumerate(out) if t] == [19, 39, 63]
    y = gemv.dot.gemv(b, bf16.decode(vb[0]).astype(np.float32), "bf16")
    assert [d for d, _ in out[40:]] == list(y.view(np.uint32))
    assert y.view(np.uint32).tolist() != gemv.dot.gemv(b, gemv.dot.ACT_FORMATS["e4m3"].decode(vb[0] & 0xFF)
                                                      .astype(np.float32)).view(np.uint32).tolist()


def test_bf16_shell_matches_golden_queued_at_once_with_gaps_and_pauses():
    """The BF16 engine behind the shell, every packet of both layers (the second with residual
    entries) queued at once, random gaps and pauses: golden's words, no error bit."""
    cfg = GemvConfig("test-axis-sop4-g16-bf16", SOP4.layout, SOP4.hif, act="bf16", max_cols=256, max_rows=255)
    layers = bf16_layers(1)
    dut = GemvAxis(cfg)
    want = dut.model(layers)
    got, _, depends, status = simulate(dut, gemv_axis.stream_beats(cfg, layers), len(want), seed=2)
    assert got == want and not depends and status == 0


# -- amaranth.sim -----------------------------------------------------------------------------------------
def test_shell_matches_golden_queued_at_once_with_gaps_and_pauses():
    """Every packet of both layers queued at once: the shell's sequencing alone keeps the pages
    apart; golden's words, TLAST per vector, m_axis_y independent of TREADY, no error bit."""
    layers = two_layers()
    streams = gemv_axis.stream_beats(SMALL, layers)
    dut = GemvAxis(SMALL)
    want = dut.model(layers)
    got, taken, depends, status = simulate(dut, streams, len(want), seed=1)
    assert got == want
    assert depends == [], f"m_axis_y changed with TREADY, or a TREADY with TVALID, in cycles {depends[:5]}"
    assert status == 0, status_bits(status)
    # the sequencing: the first vector waits for its load packet, is taken after its TLAST word; the
    # second layer's packet waits for that swap (and completes during the first layer's passes),
    # the first layer's 2nd vector does not swap, the second layer's vector does, after its packet
    half = len(streams["s_axis_load"]) // 2
    load_end = [taken["s_axis_load"][i] for i, (_, t) in enumerate(streams["s_axis_load"]) if t]
    firsts = [taken["s_axis_x"][0]] + [taken["s_axis_x"][i + 1] for i, (_, t) in
                                       enumerate(streams["s_axis_x"][:-1]) if t]
    assert len(load_end) == 2 and len(firsts) == 3
    assert load_end[0] < firsts[0] < taken["s_axis_load"][half]
    assert firsts[1] < load_end[1] < firsts[2]      # two x pages: A's 2nd vector loads during its 1st pass


def test_a_layers_vector_count_decides_the_swap():
    """Layer A for 2 vectors, B for 1, then a third vector nobody loaded: it waits (no swap into
    the stale page), A's 2nd vector does not wait for B's packet although B's packet is complete."""
    layers = two_layers(seed=3)
    streams = gemv_axis.stream_beats(SMALL, layers)
    extra = gemv_axis.x_beats(SMALL, layers[1][1][0])
    streams["s_axis_x"] = streams["s_axis_x"] + extra
    want = gemv_axis.model(SMALL, layers)
    got, taken, _, status = simulate(GemvAxis(SMALL), streams, len(want), p_idle=0.0, p_stall=0.0,
                                     max_cycles=3000)
    assert got == want
    n_x = len(streams["s_axis_x"]) - len(extra)
    assert len(taken["s_axis_x"]) == n_x                     # the extra vector waits for a load packet
    # A's 2nd vector starts before B's swap: B's packet completed during A's first pass
    b_end = taken["s_axis_load"][-1]
    assert taken["s_axis_x"][4] < b_end < taken["s_axis_x"][8]
    assert status & 1 == 0


def test_error_bits_and_clear():
    """A pass whose TLAST is dropped (w_tlast), a load packet ending on a table word (load_tlast),
    a layer for 0 vectors (the engine's ``layer`` bit); ``clear`` clears them."""
    (a, va), _ = two_layers()
    streams = gemv_axis.stream_beats(SMALL, [(a, va[:1])])
    w = streams["s_axis_w"]
    w[-1] = (w[-1][0], 0)                   # dropped
    w[3] = (w[3][0], 1)                     # and one too early
    got, _, _, status = simulate(GemvAxis(SMALL), streams, 20, seed=2)
    assert got == gemv_axis.model(SMALL, [(a, va[:1])])          # the engine frames the pass itself
    bits = status_bits(status)
    assert bits["w_tlast"] == 1 and sum(bits.values()) == 1
    loads = gemv_axis.load_beats(SMALL, a, 0)
    bad = {"s_axis_load": loads[:-1] + [(loads[-1][0], 0), (loads[0][0], 1)]}
    *_, status = simulate(GemvAxis(SMALL), bad, 0, max_cycles=200)
    bits = status_bits(status)
    assert bits["load_tlast"] == 1 and bits["layer"] == 1 and bits["w_tlast"] == 0
    *_, status = simulate(GemvAxis(SMALL), bad, 0, max_cycles=200, clear_at=150)
    assert status == 0


def test_an_error_in_the_cycle_of_clear_is_kept():
    """``clear`` clears what ``status`` shows in its cycle; an error event not on ``status`` yet is kept
    (set wins over clear), for the shell's bits as for the engine's: a layer word of 0 vectors (the
    shell's own ``layer``, on ``status`` a cycle after the word) in the cycle of ``clear`` is kept, a
    cycle before (on ``status`` by then) cleared; a load packet cut short (``load_tlast``, two cycles
    to ``status``) in the cycle of ``clear`` and in the cycle before is kept. Until 2026-12-07 the
    0-vector word with ``clear`` and the cut packet a cycle before it were dropped. Each case after a
    reset (a fresh shell); a bit cleared in a cycle it shows stays 0."""
    dut, rst = GemvAxis(SMALL), Signal(name="host_reset")
    top = Module()
    top.submodules.dut = ResetInserter({"sync": rst})(dut)
    yf = gemv_axis.layer_fields(SMALL)
    zero_vectors = gemv_axis.CTRL_LAYER | (20 << yf["rows"][0]) | (4 << yf["blocks_per_row"][0])   # vectors 0
    table_word = gemv_axis.load_beats(SMALL, two_layers()[0][0], 1)[0][0]
    cases = {"layer": [(zero_vectors, 1)], "load_tlast": [(table_word, 1)]}
    # (error, clear in the word's cycle (0) or the next (1)): whether the bit shows after the clear
    want = {("layer", 0): 1, ("layer", 1): 0, ("load_tlast", 0): 1, ("load_tlast", 1): 1}
    seen = {}

    async def bench(ctx):
        ld = dut.s_axis_load
        for name, clear_at in want:
            words = cases[name]
            ctx.set(rst, 1)
            await ctx.tick()
            ctx.set(rst, 0)
            # the word (taken at once: nothing is loaded after a reset), clear with it or a cycle after
            for i in range(2):
                ctx.set(ld.tvalid, i == 0)
                ctx.set(ld.tdata, words[0][0])
                ctx.set(ld.tlast, words[0][1])
                ctx.set(dut.clear, clear_at == i)
                assert i or ctx.get(ld.tready)
                await ctx.tick()
            ctx.set(dut.clear, 0)
            await ctx.tick().repeat(3)
            shows = ctx.get(dut.status.as_value())
            ctx.set(dut.clear, 1)                               # cleared in a cycle it shows: gone for good
            await ctx.tick()
            ctx.set(dut.clear, 0)
            await ctx.tick().repeat(3)
            seen[name, clear_at] = (status_bits(shows), ctx.get(dut.status.as_value()))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen.keys() == want.keys()
    for (name, clear_at), (bits, after) in seen.items():
        assert bits[name] == want[name, clear_at] and sum(bits.values()) == bits[name], (name, clear_at, bits)
        assert after == 0, (name, clear_at, status_bits(after))


def test_a_layer_word_without_tlast_is_flagged():
    """A load packet is its table words, then its layer word with TLAST. A layer word without TLAST ran
    the packet on into the next layer's: those tables overwrote the page the first layer waits in and
    their layer word took its place, so the first layer's vectors ran on the second's tables and
    offset; with two layers of one shape (an LLM's q, k and v) no bit was set, and the second layer's
    vector then waited for a packet already taken (an outside probe, 2026-12-07). ``load_tlast`` marks
    it now, as it marks TLAST on a table word."""
    rng = np.random.default_rng(9)
    a, b = (gemv_layers.random_layer("sop4-g16", 20, 64, rng) for _ in range(2))
    good = gemv_axis.load_beats(SMALL, a, 1) + gemv_axis.load_beats(SMALL, b, 1)
    end = len(good) // 2 - 1                # the first packet's layer word
    bad = good[:end] + [(good[end][0], 0)] + good[end + 1:]
    *_, status = simulate(GemvAxis(SMALL), {"s_axis_load": bad}, 0, p_idle=0.0, max_cycles=120)
    bits = status_bits(status)
    assert bits["load_tlast"] == 1 and sum(bits.values()) == 1, bits
    *_, status = simulate(GemvAxis(SMALL), {"s_axis_load": good}, 0, p_idle=0.0, max_cycles=120)
    assert status == 0, status_bits(status)


def _misplace(streams, error):
    """``streams`` with one error that leaves the shell out of step with the host (docs/dot.md, section 9,
    "After an error"): the first vector's TLAST dropped (its two vectors become one: ``x_length``), a
    layer word of 0 rows (``layer``), the first load packet's TLAST on its sixth table word (``load_tlast``)."""
    if error == "x_length":
        x = streams["s_axis_x"]
        last = [i for i, (_, t) in enumerate(x) if t][0]
        x[last] = (x[last][0], 0)
    elif error == "layer":
        ld = streams["s_axis_load"]
        end = [i for i, (_, t) in enumerate(ld) if t][0]
        lsb, bits = gemv_axis.layer_fields(SMALL)["rows"]
        ld[end] = (ld[end][0] & ~(((1 << bits) - 1) << lsb), 1)
    else:
        ld = streams["s_axis_load"]
        ld[5] = (ld[5][0], 1)
    return streams


@pytest.mark.parametrize("error", ["x_length", "layer", "load_tlast"])
def test_after_an_error_that_needs_one_a_reset_and_a_fresh_start_give_golden_words(error):
    """docs/dot.md's recovery, as an integrator does it: the error bit is set, the host's words are
    wrong or missing (the two vectors of layer A's packets taken as one, and then nothing; a layer of 0
    rows; a page swapped in with the power-up layer registers, one row of one block: one word, with
    TLAST); then ``aresetn`` for one edge, every stream started again at a packet's start with the
    layer's whole load packet: golden's words, status 0."""
    layers = two_layers(seed=5)[:1]
    want = gemv_axis.model(SMALL, layers)
    seen = {}
    got, _, _, status = simulate(GemvAxis(SMALL), _misplace(gemv_axis.stream_beats(SMALL, layers), error),
                                 len(want), seed=4, reset_at=200, restart=gemv_axis.stream_beats(SMALL, layers),
                                 before_reset=seen)
    assert status_bits(seen["status"])[error] == 1 and seen["got"] != want
    if error == "load_tlast":
        assert seen["got"][0][1] == 1
    assert got == want and status == 0, status_bits(status)


def test_a_reset_while_a_packet_waits_and_vectors_are_left_starts_afresh():
    """A reset clears the shell's sequencing registers, ``loaded`` (a load packet waits for its layer's
    first vector) and ``left`` (the layer's vectors still to start), not only the streams: the reset
    comes once layer B's packet is complete (``loaded`` 1) while layer A, for 6 vectors, has vectors
    left to start (``left`` at least 1; the scenarios above reset where both are 0). After it two
    other layers' packets (2 vectors, then 1) give golden's words: a ``loaded`` kept through the reset
    would swap the first vector in before its packet, a ``left`` kept (its ``left == 0`` flag, which
    decides the swap: the count is reloaded at each swap) would take it as A's."""
    rng = np.random.default_rng(11)
    a, b, c, d = (gemv_layers.random_layer("sop4-g16", rows, cols, rng)
                  for rows, cols in ((20, 64), (18, 32), (17, 32), (5, 16)))
    before = [(a, [rng.integers(0, 0x7F, 64) for _ in range(6)]), (b, [rng.integers(0, 0x7F, 32)])]
    after = [(c, [rng.integers(0, 0x7F, 32) for _ in range(2)]), (d, [rng.integers(0, 0x7F, 16)])]
    loads = [len(gemv_axis.load_beats(SMALL, layer, len(v))) for layer, v in before]
    x_beats = len(gemv_axis.x_beats(SMALL, before[0][1][0]))

    def b_waits(taken):         # B's packet is in, A's last vector has not started (loaded 1, left >= 1)
        return len(taken["s_axis_load"]) == sum(loads) and len(taken["s_axis_x"]) < 5 * x_beats

    want = gemv_axis.model(SMALL, after)
    seen = {}
    got, _, _, status = simulate(GemvAxis(SMALL), gemv_axis.stream_beats(SMALL, before), len(want), seed=6,
                                 reset_at=b_waits, restart=gemv_axis.stream_beats(SMALL, after),
                                 before_reset=seen, max_cycles=4000)
    assert seen, "the reset never came: A's vectors all started before B's packet was in"
    started = len(seen["taken"]["s_axis_x"]) // x_beats + (len(seen["taken"]["s_axis_x"]) % x_beats > 0)
    assert 1 <= started <= 5 and seen["status"] == 1     # A runs, no error; vectors left: left = 6 - started
    assert got == want and status == 0, status_bits(status)


@pytest.mark.parametrize("field, value, flagged", [("blocks_per_row", 4, False), ("blocks_per_row", 1025, True),
                                                   ("blocks_per_row", 2052, True), ("rows", 65535, False)])
def test_a_layer_word_past_the_engines_registers_is_flagged_not_cut(field, value, flagged):
    """The layer word's u16 shape went into the engine's narrower registers cut: 2052 blocks a row
    (gemv-sop4-g16 takes 1024, in 11 bits) became a 4-block layer, taken without an error (an outside
    review). Saturated now (``gemv.drive_layer_shape``), it is the ``layer`` error the docs give."""
    cfg = gemv_config.gemv_configs()["gemv-sop4-g16"]
    yf = gemv_axis.layer_fields(cfg)
    shape = {"offset": 0, "rows": 17, "blocks_per_row": 4, "vectors": 1, field: value}
    word = gemv_axis.CTRL_LAYER | sum(v << yf[k][0] for k, v in shape.items())
    dut = GemvAxis(cfg)
    seen = {}

    async def bench(ctx):
        ctx.set(dut.s_axis_load.tdata, word)
        ctx.set(dut.s_axis_load.tlast, 1)
        ctx.set(dut.s_axis_load.tvalid, 1)
        await ctx.tick()
        ctx.set(dut.s_axis_load.tvalid, 0)
        await ctx.tick().repeat(4)
        seen["layer"] = ctx.get(dut.status).errors.layer

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert seen["layer"] == flagged


def test_the_pysim_check_catches_a_dropped_tlast():
    class NoYLast(GemvAxis):
        def elaborate(self, platform):
            m = super().elaborate(platform)
            m.d.comb += self.m_axis_y.tlast.eq(0)
            return m

    layers = two_layers()[:1]
    want = gemv_axis.model(SMALL, layers)
    got, *_ = simulate(NoYLast(SMALL), gemv_axis.stream_beats(SMALL, layers), len(want), seed=1)
    assert got != want and [d for d, _ in got] == [d for d, _ in want]


# -- cocotb ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shell_verilog(tmp_path_factory):
    """gemv-sop4-g16's shell as `make verilog` writes it, generated once for the runs on it (about 5 s
    each, which every run spent on its own copy before)."""
    from sop.hdl.generate import generate_gemv_axis

    return generate_gemv_axis(NAMED["gemv-sop4-g16"], tmp_path_factory.mktemp("gemv_axis_rtl"))["verilog"]


def test_cocotb_quick_icarus(tmp_path, shell_verilog):
    """40 MiniLM rows for two tokens, with 2 % residuals for one, plain again for one: three swaps."""
    s = tb_gemv_axis.run(NAMED["gemv-sop4-g16"], "icarus", quick=True, seed=1, verilog=shell_verilog,
                         build_dir=tmp_path / "build")
    print(tb_gemv_axis.summary_line(s))
    assert tb_gemv_axis.passed(s), tb_gemv_axis.summary_line(s)
    assert s["checked"] == s["expected"] == 4 * 40 and s["packets"] == 4 and s["layers"] == 3
    assert s["entries"] > 300 and s["stalled_cycles"] > 10


@pytest.mark.slow
def test_cocotb_quick_verilator(tmp_path, shell_verilog):
    """The quick plan in Verilator, another seed (most of its time is Verilator's C++ build; the whole
    query layer, 384 rows for two tokens, is `make sim`'s full plan, in either simulator)."""
    s = tb_gemv_axis.run(NAMED["gemv-sop4-g16"], "verilator", quick=True, seed=2, verilog=shell_verilog,
                         build_dir=tmp_path / "build")
    print(tb_gemv_axis.summary_line(s))
    assert tb_gemv_axis.passed(s), tb_gemv_axis.summary_line(s)
    assert s["checked"] == s["expected"] == 4 * 40 and s["layers"] == 3


def first_layer_only(plan: dict) -> None:
    """The plan's first layer (two vectors): a shorter run for the injected bugs."""
    plan["layers"] = plan["layers"][:1]


class DropsEveryOtherTlast(GemvAxis):
    """A broken shell: every other vector's TLAST is dropped, the first's first (two vectors in one
    packet)."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        y, odd = self.m_axis_y, Signal(init=1)
        with m.If(y.tvalid & y.tready & self.engine.y.payload.last):
            m.d.sync += odd.eq(~odd)
        m.d.comb += y.tlast.eq(self.engine.y.payload.last & ~odd)
        return m


def test_cocotb_reports_a_dropped_tlast(tmp_path):
    cfg = NAMED["gemv-sop4-g16"]
    top = GemvAxisTop(cfg, core=DropsEveryOtherTlast(cfg))
    v = tmp_path / "broken.v"
    v.write_text(verilog.convert(top, name=gemv_axis.module_name(cfg), ports=top.ports(), emit_src=False))
    s = tb_gemv_axis.run(cfg, "icarus", quick=True, seed=1, verilog=v, build_dir=tmp_path / "build",
                         plan_edit=first_layer_only)
    print(tb_gemv_axis.summary_line(s))
    assert s["failed_tests"] == 1 and s["mismatches"] >= 40 and not tb_gemv_axis.passed(s)
    assert "packet of 80 words, expected 40 (TLAST misplaced)" in (tmp_path / "build" / "sim.log").read_text()


def test_cocotb_reports_a_byte_swapped_word(tmp_path, shell_verilog):
    def swap_bytes(plan):
        first_layer_only(plan)
        expect = plan["layers"][0]["vectors"][1]["expect"]
        expect[3] = int.from_bytes(expect[3].to_bytes(4, "little"), "big")

    s = tb_gemv_axis.run(NAMED["gemv-sop4-g16"], "icarus", quick=True, seed=1, verilog=shell_verilog,
                         build_dir=tmp_path / "build", plan_edit=swap_bytes)
    print(tb_gemv_axis.summary_line(s))
    assert s["failed_tests"] == 1 and s["mismatches"] == 1 and s["checked"] == s["expected"] == 80
    assert "vector 1 row 3: got" in (tmp_path / "build" / "sim.log").read_text()
