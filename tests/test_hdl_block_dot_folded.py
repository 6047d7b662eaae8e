"""The folded block dot unit (hdl/block_dot_folded.py) in amaranth.sim, bit for bit against
golden.dot.block_values, for P = 1, 2, 4 and 8 products a cycle.

The blocks are BlockDot's test's (tests/test_hdl_block_dot.py): the hand-worked ones with their
patterns worked out there, random blocks over every code and its corners (both banks and signs, zero
blocks, cancellation, the largest sums, subnormal activations, saturation, offsets giving subnormal or
vanishing results: each result class must occur), MiniLM's query layer quantized to sop4-g16 with
E4M3 activations; each under random input gaps and output stalls. Then the cycles: exactly one block
every g/P cycles back to back, ``blocks.ready`` low while a block folds, the stated latency, order
under a long output stall. The mutants below are each caught.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from sop.golden import dot
from sop.golden.points import get_point
from sop.hdl import block_dot, block_dot_folded
from sop.hdl.block_dot_folded import BlockDotFolded

import test_hdl_block_dot
from test_hdl_block_dot import (classify, hand_blocks, layout_case, pack_blocks_in, random_blocks, real_activations,
                                stream_blocks)

SOP4 = get_point("sop4-g16")
HIF = SOP4.hif


def run(dut: BlockDotFolded, hif, act, scale, sign, offset, *, seed=0, p_idle=0.3, p_stall=0.3, hold=0):
    """Stream the blocks through ``dut`` (random input gaps, output stalls, ``values.ready`` low for the
    first ``hold`` cycles). After each block taken the next is offered at once, or with probability
    ``p_idle`` after 1 to ``2 g/P`` cycles (so some come while the unit folds, some after it is ready:
    a gap in its input); a block offered is held until taken (the stream rule). A chunked unit gets
    each block as ``g/P`` chunk transfers (``chunk_words``), the same gaps before each chunk (inside
    blocks too). Returns the output patterns, the cycle each left on, the cycle each block (chunk)
    was taken, and the cycles ``blocks.ready`` was high."""
    pack = chunk_words if dut.chunked else pack_blocks_in
    words = pack(dut, hif, act, scale, sign, offset)
    rng = np.random.default_rng(seed)
    got, when, taken, ready = [], [], [], []
    n = dut.cycles_per_block

    def wait():
        return int(rng.integers(1, 2 * n + 1)) if rng.random() < p_idle else 0

    async def bench(ctx):
        sent, cycle, start = 0, 0, wait()
        limit = 3 * n * len(words) + 4 * dut.latency + hold + 100
        while len(got) < len(scale):
            assert cycle < limit, "the unit stopped"
            offer = sent < len(words) and cycle >= start
            ctx.set(dut.blocks.valid, int(offer))
            if offer:
                ctx.set(dut.blocks.payload.as_value(), words[sent])
            ctx.set(dut.values.ready, int(cycle >= hold and rng.random() >= p_stall))
            if ctx.get(dut.blocks.ready):
                ready.append(cycle)
                if offer:
                    sent += 1
                    taken.append(cycle)
                    start = cycle + 1 + wait()
            if ctx.get(dut.values.valid) and ctx.get(dut.values.ready):
                got.append(ctx.get(dut.values.payload))
                when.append(cycle)
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return np.array(got, np.uint32), np.array(when), np.array(taken), np.array(ready)


def model(layout, hif, *blocks):
    return block_dot_folded.model(layout, hif, "e4m3", *blocks)


# -- hand-worked blocks -------------------------------------------------------------------------------

@pytest.mark.parametrize("lanes,tail", [(1, "pipelined"), (4, "pipelined"), (1, "serial")])
def test_hand_worked_blocks(lanes, tail):
    """All of BlockDot's hand-worked blocks in one stream (patterns worked out in its test): each
    value, in order, under gaps and stalls."""
    cases = hand_blocks()
    blocks = [np.array([c[k] for c in cases]) for k in range(5)]
    got, _, _, _ = run(BlockDotFolded(SOP4.layout, HIF, lanes=lanes, tail=tail), *blocks, seed=lanes)
    gold = model(SOP4.layout, HIF, *blocks)
    want = np.array([c[5] for c in cases], np.uint32)
    np.testing.assert_array_equal(gold, want)
    bad = [(c[-1], hex(g), hex(w)) for c, g, w in zip(cases, got, want) if g != w]
    assert not bad, bad


# -- random blocks over every code -----------------------------------------------------------------------

@pytest.mark.parametrize("name,lanes,tail,n", [
    ("sop4-g16", 1, "pipelined", 200), ("sop4-g16", 4, "pipelined", 400), ("sop4-g16", 2, "pipelined", 120),
    ("sop4-g16", 8, "pipelined", 200), ("e2m3-ue4m4-g16", 4, "pipelined", 200), ("g8", 2, "pipelined", 120),
    ("g32", 8, "pipelined", 80), ("sop4-g16", 1, "serial", 300), ("e2m3-ue4m4-g16", 1, "serial", 150),
    ("g32", 2, "serial", 80)])
def test_random_blocks_bit_exact(name, lanes, tail, n):
    layout, hif = layout_case(name)
    rng = np.random.default_rng(len(name) + n + lanes)
    blocks = random_blocks(layout, hif, rng, n)
    want = model(layout, hif, *blocks)
    counts = classify(want)
    assert all(c > 0 for c in counts.values()), counts
    got, _, taken, _ = run(BlockDotFolded(layout, hif, lanes=lanes, tail=tail), *blocks, seed=n)
    step = np.diff(taken)                       # blocks back to back and after input gaps both occur
    assert (step == layout.group // lanes).any() and (step > layout.group // lanes).any()
    bad = np.flatnonzero(got != want)
    assert not len(bad), [(int(b), hex(got[b]), hex(want[b])) for b in bad[:5]]


# -- real blocks: MiniLM's query layer quantized to sop4-g16, E4M3 activations ------------------------------

@pytest.fixture(scope="module")
def minilm_stream():
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    w = minilm_linear_weights()["encoder.layer.0.attention.self.query.weight"][:6].astype(np.float32)
    return get_quant_format("sop4-g16").quantize(w).stream


@pytest.mark.parametrize("lanes,tail", [(1, "pipelined"), (4, "pipelined"), (1, "serial")])
def test_real_minilm_blocks_under_stalls(minilm_stream, lanes, tail):
    x = real_activations(np.random.default_rng(3 + lanes), 1, minilm_stream.cols)[0]
    blocks, want, select = stream_blocks(minilm_stream, x)
    assert 0 < select.mean() < 1 and 0 < blocks[3].mean() < 1            # both banks, both signs
    dut = BlockDotFolded(minilm_stream.layout, minilm_stream.hif, lanes=lanes, tail=tail)
    got, _, _, _ = run(dut, *blocks, seed=lanes, p_idle=0.4, p_stall=0.4)
    np.testing.assert_array_equal(got, want)


# -- the cycles: one block every g/P cycles, the latency, order under a long stall ----------------------------

@pytest.mark.parametrize("name,lanes,tail", [("sop4-g16", 1, "pipelined"), ("sop4-g16", 2, "pipelined"),
                                             ("sop4-g16", 4, "pipelined"), ("sop4-g16", 8, "pipelined"),
                                             ("sop4-g16", 1, "serial"), ("e2m3-ue4m4-g16", 4, "pipelined"),
                                             ("e2m3-ue4m4-g16", 1, "serial")])
def test_one_block_every_g_over_p_cycles_and_the_stated_latency(name, lanes, tail):
    """Back to back. e2m3-ue4m4-g16's serial tail takes all 16 cycles of a block (5 scale bits)."""
    layout, hif = layout_case(name)
    rng = np.random.default_rng(5)
    blocks = random_blocks(layout, hif, rng, 24)
    dut = BlockDotFolded(layout, hif, lanes=lanes, tail=tail)
    n = layout.group // lanes
    assert dut.cycles_per_block == n
    got, when, taken, ready = run(dut, *blocks, p_idle=0, p_stall=0)
    np.testing.assert_array_equal(got, model(layout, hif, *blocks))
    # the first block is taken at cycle 0, then one every n cycles, ready low in between (it folds);
    # the first value at cycle latency, then one every n cycles: no further bubbles
    np.testing.assert_array_equal(taken, n * np.arange(24))
    np.testing.assert_array_equal(ready[:24], taken)
    np.testing.assert_array_equal(when, dut.latency + n * np.arange(24))
    assert dut.latency == n - 1 + dut.front_stages() + dut.tail_stages()


@pytest.mark.parametrize("lanes,tail", [(1, "pipelined"), (4, "pipelined"), (1, "serial")])
def test_order_under_a_long_output_stall(lanes, tail):
    """``values.ready`` low for the first 120 cycles: the pipeline fills, the skid holds what left it,
    ``blocks.ready`` stays low, and every value comes out once, in order."""
    rng = np.random.default_rng(11)
    blocks = random_blocks(SOP4.layout, HIF, rng, 40)
    dut = BlockDotFolded(SOP4.layout, HIF, lanes=lanes, tail=tail)
    got, when, taken, _ = run(dut, *blocks, p_idle=0.2, p_stall=0.2, hold=120)
    np.testing.assert_array_equal(got, model(SOP4.layout, HIF, *blocks))
    assert when[0] >= 120 and len(taken) == 40
    # while the output is held, no more blocks go in than the pipeline and its skid can keep
    held_in = int((taken < 120).sum())
    assert held_in <= dut.depth // dut.cycles_per_block + 3, held_in


def test_refusals():
    with pytest.raises(ValueError, match="P = g is BlockDot"):
        BlockDotFolded(SOP4.layout, HIF, lanes=16)
    with pytest.raises(ValueError, match="power of two"):
        BlockDotFolded(SOP4.layout, HIF, lanes=3)
    with pytest.raises(ValueError, match="279-bit exact block accumulator; the folded unit builds E4M3"):
        BlockDotFolded(SOP4.layout, HIF, "bf16", lanes=4)
    with pytest.raises(ValueError, match="serial tail takes 15 cycles per block here; with lanes 2 a block comes "
                                         "every 8"):
        BlockDotFolded(SOP4.layout, HIF, lanes=2, tail="serial")
    with pytest.raises(ValueError, match="tail 'fast'"):
        BlockDotFolded(SOP4.layout, HIF, lanes=1, tail="fast")


# -- the checks catch injected bugs --------------------------------------------------------------------------

class DropsSticky(BlockDotFolded):
    """Forgets the bits below the guard bit (test_hdl_block_dot's mutant): every value above a tie rounds as a tie."""

    round_up = staticmethod(test_hdl_block_dot.DropsSticky.round_up)


class OnesComplement(BlockDotFolded):
    """Negates a product as its ones' complement (test_hdl_block_dot's mutant): each negative product one LSB too small."""

    negate = staticmethod(test_hdl_block_dot.OnesComplement.negate)


class NeverRestarts(BlockDotFolded):
    """Adds a block's first chunk to the previous block's sum."""

    @staticmethod
    def restart(first, acc):
        return acc


class LateHop(BlockDotFolded):
    """Hops the header values every g/P + 1 stages: a register is read after the next block's
    header has replaced it, which only back-to-back blocks show."""

    def hop_stride(self):
        return self.cycles_per_block + 1


class ShortNormalize(BlockDotFolded):
    """The serial tail with 6 fine normalizing steps: a value 7 shifts from normalized after the
    coarse steps stays a bit short (and one step earlier, so the latency is one less)."""

    FINE_STEPS = 6


@pytest.mark.parametrize("mutant,lanes,tail", [(DropsSticky, 4, "pipelined"), (OnesComplement, 4, "pipelined"),
                                               (NeverRestarts, 4, "pipelined"), (DropsSticky, 1, "serial"),
                                               (ShortNormalize, 1, "serial")])
def test_the_random_blocks_catch_a_broken_unit(mutant, lanes, tail):
    rng = np.random.default_rng(9)
    blocks = random_blocks(SOP4.layout, HIF, rng, 100)
    got, _, _, _ = run(mutant(SOP4.layout, HIF, lanes=lanes, tail=tail), *blocks, p_idle=0, p_stall=0)
    assert (got != model(SOP4.layout, HIF, *blocks)).any()


def test_back_to_back_blocks_catch_a_late_hop():
    """The kept mutant: a block on its own is right (its header reaches the tail before anything
    replaces it); back to back it is not."""
    rng = np.random.default_rng(12)
    blocks = random_blocks(SOP4.layout, HIF, rng, 40)
    got, _, _, _ = run(LateHop(SOP4.layout, HIF, lanes=4), *blocks, p_idle=0, p_stall=0)
    assert (got != model(SOP4.layout, HIF, *blocks)).any()
    for k in range(5):                            # one block at a time: the mutant is right
        one = [b[k:k + 1] for b in blocks]
        got1, _, _, _ = run(LateHop(SOP4.layout, HIF, lanes=4), *one, p_idle=0, p_stall=0)
        np.testing.assert_array_equal(got1, model(SOP4.layout, HIF, *one))


def test_the_accumulator_is_goldens_width_and_the_tail_blockdots():
    """W = P + D + log2 g + 1 = 11 + 20 + 4 + 1 (docs/dot.md section 2); Q as wide as BlockDot's."""
    dut = BlockDotFolded(SOP4.layout, HIF, lanes=4)
    assert dut.acc.bits == dot.accumulator(HIF, dot.ACT_FORMATS["e4m3"], 16).bits == 36
    wide = block_dot.BlockDot(SOP4.layout, HIF)
    assert dut.nq == wide.nq
    wide._MustUse__silence = dut._MustUse__silence = True


# -- chunked input (the GEMV engine's folded front end: P codes a transfer) -----------------------------------

def chunk_words(dut: BlockDotFolded, hif, act, scale, sign, offset) -> list[int]:
    """Each block as ``g/P`` chunk payloads (``block_dot_folded.chunk_layout``), in order."""
    lay = dut.blocks.payload.shape()
    P, n = dut.lanes, dut.cycles_per_block
    return [lay.const({"hif": [int(h) for h in hif[b][c * P:(c + 1) * P]],
                       "act": [int(a) for a in act[b][c * P:(c + 1) * P]], "scale": int(scale[b]),
                       "sign": int(sign[b]), "offset": int(offset[b]), "first": int(c == 0),
                       "last": int(c == n - 1)}).as_value().value & ((1 << lay.size) - 1)
            for b in range(len(scale)) for c in range(n)]


@pytest.mark.parametrize("lanes,tail", [(1, "serial"), (4, "pipelined")])
def test_chunked_input_bit_exact_with_gaps_inside_blocks(lanes, tail):
    """``chunked=True``: the random blocks (every result class) as chunks, with gaps inside blocks and
    between them and output stalls: each value bit for bit; back to back a chunk a cycle."""
    rng = np.random.default_rng(57 + lanes)
    blocks = random_blocks(SOP4.layout, HIF, rng, 120)
    want = model(SOP4.layout, HIF, *blocks)
    dut = BlockDotFolded(SOP4.layout, HIF, lanes=lanes, tail=tail, chunked=True)
    assert dut.latency == dut.depth and dut.blocks.payload.shape() == block_dot_folded.chunk_layout(
        HIF, dut.act, SOP4.layout, lanes)
    got, _, _, _ = run(dut, *blocks, seed=lanes)
    np.testing.assert_array_equal(got, want)
    got, _, taken, _ = run(BlockDotFolded(SOP4.layout, HIF, lanes=lanes, tail=tail, chunked=True), *blocks,
                           seed=lanes, p_idle=0, p_stall=0)
    np.testing.assert_array_equal(got, want)
    assert (np.diff(taken) == 1).all()


class CountsGaps(BlockDotFolded):
    """Adds the chunk sum on every enabled cycle, as the whole-block fold may: a gap inside a block
    adds a stale chunk."""

    def chunk_in(self, m, en0, first0, last0):
        codes, hdr_en, _ = super().chunk_in(m, en0, first0, last0)
        return codes, hdr_en, None


def test_gaps_inside_blocks_catch_an_ungated_accumulator():
    rng = np.random.default_rng(58)
    blocks = random_blocks(SOP4.layout, HIF, rng, 60)
    want = model(SOP4.layout, HIF, *blocks)
    got, _, _, _ = run(CountsGaps(SOP4.layout, HIF, lanes=4, chunked=True), *blocks, seed=2)
    assert (got != want).any()
    got, _, _, _ = run(CountsGaps(SOP4.layout, HIF, lanes=4, chunked=True), *blocks, seed=2, p_idle=0)
    np.testing.assert_array_equal(got, want)             # without gaps it is right: the gaps catch it
