"""The naive GEMV path (hdl/naive_dot.py) in amaranth.sim, bit for bit against its model.

Both reductions (``tree``: the block's products summed first; ``lanes``: a running sum per lane)
on random layers with random activations (every E4M3 finite code, BF16 weights of both signs
over the offsets the decoder takes), and on a MiniLM-derived layer (sop4-g16, real-shaped
activations), under random input gaps on both input streams and random output stalls; the
stated latency and one block a cycle with 17 rows interleaved; an FP32 adder that drops its
sticky bit is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.hdl import ClockDomain, Module
from amaranth.sim import Simulator

from sop.golden import dot
from sop.hdl import naive_dot, reference
from sop.hdl.config import DecoderConfig
from sop.hdl.fp32_acc import Fp32Add
from sop.hdl.naive_dot import BF16, NaiveDot, naive_config
from sop.sim.stimulus import Layer, from_stream, host_sequence, random_layer

CFG = naive_config()
E4M3 = dot.act_format("e4m3")
SLOTS = 17
FINITE_E4M3 = np.array([c for c in range(256) if c & 0x7F != 0x7F])     # S.1111.111 is NaN


def interleaved_tags(rows: int, blocks_per_row: int, slots: int = SLOTS):
    """Block order, slot, first and last of ``rows`` rows fed in groups of ``slots``, block by block
    (the order the ring needs for one block a cycle): ``order[i]`` is (row, block) of the i-th block."""
    order, slot, first, last = [], [], [], []
    for g0 in range(0, rows, slots):
        group = range(g0, min(rows, g0 + slots))
        for b in range(blocks_per_row):
            for r in group:
                order.append((r, b)), slot.append(r - g0), first.append(b == 0), last.append(b == blocks_per_row - 1)
    return order, np.array(slot), np.array(first), np.array(last)


def run(dut: NaiveDot, layer: Layer, acts, slots, first, last, *, seed=0, p_idle=0.3, p_stall=0.3):
    """Stream ``layer`` (its blocks in order, as the host does: tables, then the swap beat) and the
    blocks' activations and tags through ``dut``; returns the sums (value, slot), the cycle each
    left on, the cycle each activation transfer was taken and the cycle each beat was taken."""
    rng = np.random.default_rng(seed)
    top = Module()
    top.domains.sync = ClockDomain()
    top.submodules.dut = dut
    got, when, taken, beats = [], [], [], []
    n_out = int(np.sum(last))

    clock = [0]

    async def host(ctx):               # the decoder's ports: hdl_harness's host sequence
        sequence = host_sequence(dut.config, [layer], rng, p_idle=p_idle)
        try:
            cycle = next(sequence)
            while True:
                w = cycle.write
                if w is not None and w[0] == "lut":
                    _, bank, addr, value = w
                    ctx.set(dut.load.payload.bank, bank)
                    ctx.set(dut.load.payload.addr, addr)
                    ctx.set(dut.load.payload.data, value)
                ctx.set(dut.load.valid, w is not None and w[0] == "lut")
                if w is not None and w[0] == "offset":
                    ctx.set(dut.offset, w[1])
                ctx.set(dut.offset_we, w is not None and w[0] == "offset")
                if cycle.beat is not None:
                    ctx.set(dut.blocks.payload.blocks, cycle.beat)
                    ctx.set(dut.blocks.payload.swap, cycle.swap)
                ctx.set(dut.blocks.valid, cycle.beat is not None)
                _, _, ready = await ctx.tick().sample(dut.blocks.ready)
                if cycle.beat is not None and ready:
                    beats.append(clock[0])
                clock[0] += 1
                cycle = sequence.send(cycle.beat is not None and bool(ready))
        except StopIteration:
            pass
        ctx.set(dut.blocks.valid, 0)

    async def activations_and_sums(ctx):
        sent, cycle = 0, 0
        limit = SLOTS * (len(acts) + dut.latency) + 500
        while len(got) < n_out:
            assert cycle < limit, "the naive path stopped"
            offer = sent < len(acts) and rng.random() >= p_idle
            ctx.set(dut.acts.valid, int(offer))
            if offer:
                for j, a in enumerate(acts[sent]):
                    ctx.set(dut.acts.payload.act[j], int(a))
                ctx.set(dut.acts.payload.slot, int(slots[sent]))
                ctx.set(dut.acts.payload.first, int(first[sent]))
                ctx.set(dut.acts.payload.last, int(last[sent]))
            ctx.set(dut.sums.ready, int(rng.random() >= p_stall))
            _, _, a_ready, s_valid, s_ready, value, slot = await ctx.tick().sample(
                dut.acts.ready, dut.sums.valid, dut.sums.ready, dut.sums.payload.value, dut.sums.payload.slot)
            if offer and a_ready:
                sent += 1
                taken.append(cycle)
            if s_valid and s_ready:
                got.append((value, slot))
                when.append(cycle)
            cycle += 1
        ctx.set(dut.sums.ready, 1)
        for _ in range(dut.latency + 4):            # nothing more may come out
            _, _, valid = await ctx.tick().sample(dut.sums.valid)
            assert not valid, "the naive path produced more sums than rows"

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.add_testbench(activations_and_sums)
    sim.run()
    return got, np.array(when), np.array(taken), np.array(beats)


def weights_of(layer: Layer) -> np.ndarray:
    """The decoder's BF16 weight codes of each block, (n, g) (hdl.reference, golden only)."""
    return reference.lane_words(CFG, layer.luts, layer.offset, layer.headers, layer.codes).reshape(-1, CFG.lanes)


def random_case(seed: int, rows=SLOTS, blocks_per_row=4):
    rng = np.random.default_rng(seed)
    order, slot, first, last = interleaved_tags(rows, blocks_per_row)
    layer = random_layer(CFG, rng, len(order), offset=int(rng.integers(-20, 12)))
    acts = rng.choice(FINITE_E4M3, (len(order), CFG.lanes))
    acts[rng.random(acts.shape) < 0.1] = 0                       # zero activations, both signs
    acts[rng.random(acts.shape) < 0.05] = 0x80
    return layer, acts, slot, first, last


@pytest.mark.parametrize("reduction", naive_dot.REDUCTIONS)
def test_random_blocks_bit_exact_under_stalls(reduction):
    layer, acts, slot, first, last = random_case(1)
    dut = NaiveDot(CFG, reduction=reduction)
    got, *_ = run(dut, layer, acts, slot, first, last, seed=2)
    want = dut.model(weights_of(layer), acts, slot, first, last)
    assert got == want


@pytest.fixture(scope="module")
def minilm_case():
    """17 rows x 64 columns of MiniLM's first query weight quantized to sop4-g16 (4 blocks a row),
    the blocks interleaved over the 17 slots, with transformer-like E4M3 activations (outliers)."""
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    w = minilm_linear_weights()["encoder.layer.0.attention.self.query.weight"][:SLOTS, :64].astype(np.float32)
    stream = get_quant_format("sop4-g16").quantize(w).stream
    base = from_stream(CFG, stream, "minilm")
    bpr = stream.cols // CFG.layout.group
    order, slot, first, last = interleaved_tags(stream.rows, bpr)
    pick = [r * bpr + b for r, b in order]
    layer = Layer(base.luts, base.offset, base.headers[pick], base.codes[pick], "minilm")
    rng = np.random.default_rng(5)
    x = rng.standard_normal(stream.cols) * 0.5
    x[rng.integers(0, stream.cols, 3)] *= 40
    xc = dot.activation_codes(E4M3.quantize(np.clip(x, -E4M3.max, E4M3.max)).astype(np.float32), E4M3)
    acts = xc.reshape(bpr, CFG.lanes)[[b for _, b in order]]
    return layer, acts, slot, first, last


def test_minilm_blocks_bit_exact_under_stalls(minilm_case):
    layer, acts, slot, first, last = minilm_case
    dut = NaiveDot(CFG, reduction="tree")
    got, *_ = run(dut, layer, acts, slot, first, last, seed=3, p_idle=0.4, p_stall=0.4)
    want = dut.model(weights_of(layer), acts, slot, first, last)
    assert got == want
    # within the float32 summation bound of the exact row sums (64 terms a row: gamma_64)
    y = np.array([v for v, _ in got], np.uint32).view(np.float32).astype(np.float64)
    terms = BF16.decode(weights_of(layer)) * E4M3.decode(acts)                  # exact in float64
    rows = np.array([s for _, s in got])
    exact = np.array([terms[slot == s].sum() for s in rows])
    scale = np.array([np.abs(terms[slot == s]).sum() for s in rows])
    assert (np.abs(y - exact) <= 64 * 2.0 ** -24 / (1 - 64 * 2.0 ** -24) * scale).all()


@pytest.mark.slow
def test_minilm_blocks_bit_exact_lane_accumulators(minilm_case):
    layer, acts, slot, first, last = minilm_case
    dut = NaiveDot(CFG, reduction="lanes")
    got, *_ = run(dut, layer, acts, slot, first, last, seed=4, p_idle=0.4, p_stall=0.4)
    assert got == dut.model(weights_of(layer), acts, slot, first, last)


def test_one_block_per_cycle_and_the_stated_latency():
    layer, acts, slot, first, last = random_case(7, blocks_per_row=2)
    dut = NaiveDot(CFG)
    got, when, taken, beats = run(dut, layer, acts, slot, first, last, seed=8, p_idle=0, p_stall=0)
    assert got == dut.model(weights_of(layer), acts, slot, first, last)
    assert (np.diff(taken) == 1).all(), "a block a cycle while 17 rows interleave"
    assert (when - taken[last.nonzero()[0]] == dut.latency).all()
    assert (np.diff(when) == 1).all()
    # the first block waits for its weights, then for the ring to reach slot 0 (the ring turns every
    # cycle from reset here: the output is never stalled)
    ready_at = beats[0] + dut.weights_latency
    assert taken[0] == ready_at + (-ready_at) % SLOTS


class AdderDropsSticky(Fp32Add):
    @staticmethod
    def round_up(lsb, guard, sticky):
        return guard & lsb


def test_the_random_blocks_catch_an_adder_that_drops_its_sticky_bit():
    layer, acts, slot, first, last = random_case(1)
    dut = NaiveDot(CFG, adder=AdderDropsSticky)
    got, *_ = run(dut, layer, acts, slot, first, last, seed=2, p_idle=0, p_stall=0)
    assert got != dut.model(weights_of(layer), acts, slot, first, last)


def test_wrong_configurations_are_refused():
    with pytest.raises(ValueError, match="one block a cycle"):
        NaiveDot(DecoderConfig("x8", 8, CFG.layout, CFG.hif))
    with pytest.raises(ValueError, match="17"):
        NaiveDot(CFG, slots=16)
    with pytest.raises(ValueError, match="reduction"):
        NaiveDot(CFG, reduction="serial")
