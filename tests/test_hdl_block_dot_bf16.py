"""The block dot unit with BF16 activations (hdl/block_dot_bf16.py) in amaranth.sim, bit for bit against
golden.dot.block_values.

Hand-worked blocks (patterns worked out in the comments, and the path each must take), random blocks
over every code with BF16 activations drawn to exercise each class (fast path, fallback, subnormal
and maximal activations, zeros, cancellation, saturation, underflow; each must occur), a real
MiniLM layer with real BF16 activations (the query layer's input in all-MiniLM-L6-v2) under random
input gaps and output stalls, back-to-back throughput, slow blocks that stall the input and still
leave in order, and the mutants each check catches.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from sop.golden import dot
from sop.golden.formats import FORMATS
from sop.golden.layout import BlockLayout
from sop.golden.points import get_point
from sop.hdl import block_dot
from sop.hdl.block_dot import BlockDot
from sop.hdl.block_dot_bf16 import BlockDotBF16, takes_fallback

import test_hdl_block_dot
from test_hdl_block_dot import classify, pack_blocks_in, stream_blocks

BF16 = dot.ACT_FORMATS["bf16"]
SOP4 = get_point("sop4-g16")
HIF = SOP4.hif
G = 16


def run(dut, hif, act, scale, sign, offset, *, seed=0, p_idle=0.3, p_stall=0.3, hold=0, window=()):
    """Stream the blocks through ``dut`` (random input gaps and output stalls; ``values.ready`` low for
    the first ``hold`` cycles except in the cycles of ``window``); the output patterns, the cycle each
    left on, and the number of slow blocks that entered the main pipeline."""
    words = pack_blocks_in(dut, hif, act, scale, sign, offset)
    rng = np.random.default_rng(seed)
    got, when, slow = [], [], [0]

    async def bench(ctx):
        sent, cycle = 0, 0
        limit = (dut.slow_cycles_max + 8) * (len(words) + 4) + hold + 8 * dut.latency
        while len(got) < len(words):
            assert cycle < limit, "the unit stopped"
            offer = sent < len(words) and rng.random() >= p_idle
            ctx.set(dut.blocks.valid, int(offer))
            if offer:
                ctx.set(dut.blocks.payload.as_value(), words[sent])
            ctx.set(dut.values.ready, int((cycle >= hold or cycle in window) and rng.random() >= p_stall))
            if offer and ctx.get(dut.blocks.ready):
                sent += 1
            if ctx.get(dut.values.valid) and ctx.get(dut.values.ready):
                got.append(ctx.get(dut.values.payload))
                when.append(cycle)
            slow[0] += ctx.get(dut.took_slow)
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return np.array(got, np.uint32), np.array(when), slow[0]


def model(layout, hif, *blocks):
    return block_dot.model(layout, hif, "bf16", *blocks)


def bf16(x) -> int:
    """The BF16 code of a value BF16 holds exactly."""
    code = int(BF16.encode(np.float64(x)))
    assert BF16.decode(code) == x, x
    return code


# -- hand-worked blocks -------------------------------------------------------------------------------

ONE_H, ONE_S = 5 << 6, 3 << 3                  # 1.0 in E3M6 b5 and UE3M3
NEG_H = 1 << 9                                 # the HIF sign bit
TINY_H, MAX_H = 1, 0x1FF                       # 2^-10 and 7.9375 = 127 * 2^-4
ONE_X, MAX_X, SUB_X = 0x3F80, 0x7F7F, 0x0001   # 1.0, (2 - 2^-7) * 2^127 = 255 * 2^120, 2^-133


def pad(v, fill=0):
    return list(v) + [fill] * (G - len(v))


def hand_blocks():
    """(hif codes, act codes, scale code, sign, offset, expected pattern, path, what)."""
    return [
        # 16 x (1 * 1), scale 1: 16.0 = 2^4: biased exponent 131 = 0x83 -> 0x41800000
        ([ONE_H] * G, [ONE_X] * G, ONE_S, 0, 0, 0x41800000, "fast", "sixteen ones"),
        # the block sign and offset: -(16 * 2^-3) = -2.0 = 0xC0000000
        ([ONE_H] * G, [ONE_X] * G, ONE_S, 1, -3, 0xC0000000, "fast", "sign and offset"),
        # 8 x (+1) + 8 x (-1) = 0: +0 whatever the block sign
        ([ONE_H] * 8 + [ONE_H | NEG_H] * 8, [ONE_X] * G, ONE_S, 1, 0, 0, "fast", "cancellation to +0"),
        # every activation +0 under the largest weights: +0 (every t masked to 0)
        ([MAX_H] * G, [0] * G, ONE_S, 0, 0, 0, "fast", "zero activations"),
        # zero weights under the largest activations must not set T: the one real product, 1 * 2^-100,
        # stays in the window (fast), 2^-100 = biased 27 -> 27 << 23 = 0x0D800000
        (pad([ONE_H], 0), pad([bf16(2.0 ** -100)], MAX_X), ONE_S, 0, 0, 0x0D800000, "fast",
         "zero weights at the largest activations"),
        # 7.9375 * 255 * 2^120 = 2024.0625 * 2^120 ~ 2^130.98: beyond FLT_MAX, saturates, both signs
        (pad([MAX_H]), pad([MAX_X]), ONE_S, 0, 0, 0x7F7FFFFF, "fast", "saturates"),
        (pad([MAX_H]), pad([MAX_X | 0x8000]), ONE_S, 1, 0, 0x7F7FFFFF, "fast", "saturates, two signs"),
        (pad([MAX_H]), pad([MAX_X | 0x8000]), ONE_S, 0, 0, 0xFF7FFFFF, "fast", "saturates negative"),
        # 16 x 7.9375 x 255 x 2^120 x 2^-127 = 32385 / 128 = 253.0078125 = 1.11111010000001b x 2^7:
        # biased 134, mantissa 1111101 0000001 then zeros -> 0x437D0200 (exact)
        ([MAX_H] * G, [MAX_X] * G, ONE_S, 0, -127, 0x437D0200, "fast", "largest activations, exact"),
        # the smallest subnormal activation times 1: 2^-133 = 2^16 * 2^-149 -> 0x00010000
        (pad([ONE_H]), pad([SUB_X]), ONE_S, 0, 0, 0x00010000, "fast", "subnormal activation"),
        # 2^100 - 2^100 + 2^-100: the large products cancel, the tiny one is 200 binades below the
        # largest (dropped from the window: slow): exactly 2^-100 = 0x0D800000
        (pad([ONE_H, ONE_H | NEG_H, ONE_H]), pad([bf16(2.0 ** 100)] * 2 + [bf16(2.0 ** -100)]), ONE_S, 0, 0,
         0x0D800000, "slow", "cancellation exposes a far product"),
        # 2^24 + 1: exactly half an ulp above 2^24, ties to even: 2^24 = 0x4B800000 (fast)
        (pad([ONE_H, ONE_H]), pad([bf16(2.0 ** 24), ONE_X]), ONE_S, 0, 0, 0x4B800000, "fast", "tie to even"),
        # plus 2^-30, 54 binades below (past the window and the 13 trailing zeros of 1 * 1: slow): the
        # sticky bit rounds up to 2^24 + 2 = 0x4B800001
        (pad([ONE_H, ONE_H, ONE_H]), pad([bf16(2.0 ** 24), ONE_X, bf16(2.0 ** -30)]), ONE_S, 0, 0, 0x4B800001,
         "slow", "a far product is the sticky bit"),
        # minus 2^-30: just below the tie, down to 2^24 = 0x4B800000 (slow)
        (pad([ONE_H, ONE_H, ONE_H | NEG_H]), pad([bf16(2.0 ** 24), ONE_X, bf16(2.0 ** -30)]), ONE_S, 0, 0,
         0x4B800000, "slow", "a far product below a tie"),
        # 2^-100 * 2^-50 = 2^-150 exactly: half the smallest subnormal, ties to +0; kmax < 0 (slow)
        (pad([ONE_H]), pad([bf16(2.0 ** -100)]), ONE_S, 0, -50, 0, "slow", "subnormal tie to +0"),
        # plus 2^-10 * 2^-133 * 2^-50 = 2^-193 (within the window, but kmax < 0 as above: slow): above
        # the tie, up to 2^-149 = 0x00000001
        (pad([ONE_H, TINY_H]), pad([bf16(2.0 ** -100), SUB_X]), ONE_S, 0, -50, 0x00000001, "slow",
         "smallest subnormal by a far sticky bit"),
        # -(2^-133 * 2^-50) = -2^-183: far below half of 2^-149, a nonzero value to -0 = 0x80000000
        (pad([ONE_H]), pad([SUB_X]), ONE_S, 1, -50, 0x80000000, "slow", "underflow to -0"),
        # 3 * 2^-150 = 1.5 * 2^-149 ties to 2 * 2^-149 (even) = 0x00000002 (1.5 = 1.1b: x = 1.5 * 2^-100)
        (pad([ONE_H]), pad([bf16(1.5 * 2.0 ** -100)]), ONE_S, 0, -49, 0x00000002, "slow",
         "subnormal tie up to even"),
        # 2^120 * 1 + 1 * 2^-120 - 2^120: cancellation on the slow path with a negative partial sum
        # first: exactly 2^-120 = biased 7 -> 0x03800000
        (pad([ONE_H | NEG_H, ONE_H, ONE_H]), pad([bf16(2.0 ** 120), bf16(2.0 ** -120), bf16(2.0 ** 120)]), ONE_S,
         0, 0, 0x03800000, "slow", "far cancellation, negative first"),
        # -2^120 - 2^-120 (240 binades apart: slow) rounds to -2^120: biased 247 = 0xF7, sign set
        # -> 0xFB800000
        (pad([ONE_H | NEG_H, ONE_H | NEG_H]), pad([bf16(2.0 ** 120), bf16(2.0 ** -120)]), ONE_S, 0, 0,
         0xFB800000, "slow", "negative sum, far sticky"),
    ]


@pytest.fixture(scope="module")
def sop4_dut():
    return lambda: BlockDot(SOP4.layout, HIF, "bf16")


def test_hand_worked_blocks(sop4_dut):
    cases = hand_blocks()
    hif, act = [c[0] for c in cases], [c[1] for c in cases]
    s, sign, off = ([c[i] for c in cases] for i in (2, 3, 4))
    want = np.array([c[5] for c in cases], np.uint32)
    paths = np.array([c[6] == "slow" for c in cases])
    np.testing.assert_array_equal(model(SOP4.layout, HIF, hif, act, s, sign, off), want)
    np.testing.assert_array_equal(takes_fallback(SOP4.layout, HIF, hif, act, s, off), paths)
    got, _, slow = run(sop4_dut(), hif, act, s, sign, off, p_idle=0, p_stall=0)
    bad = [(c[-1], hex(g), hex(c[5])) for g, c in zip(got, cases) if g != c[5]]
    assert not bad, bad
    assert slow == paths.sum()


def test_the_bf16_build_is_its_own_class():
    bf, e4 = BlockDot(SOP4.layout, HIF, "bf16"), BlockDot(SOP4.layout, HIF)
    bf._MustUse__silence = e4._MustUse__silence = True          # built, never elaborated
    assert isinstance(bf, BlockDotBF16) and bf.act is BF16 and type(e4) is BlockDot


# -- random blocks over every code ------------------------------------------------------------------------

def bf16_codes(rng, shape):
    """Random finite BF16 codes (the exponent field 255, Inf / NaN, is outside the contract)."""
    c = rng.integers(0, 1 << 16, shape)
    return np.where(((c >> 7) & 0xFF) == 0xFF, c & ~(1 << 14), c)


def random_blocks(layout: BlockLayout, hif, rng, n):
    """(hif, act, scale, sign, offset) of ``n`` blocks, a mix of kinds (the cases below)."""
    g, scale_fmt = layout.group, layout.scale
    hif_c = rng.integers(0, 1 << hif.bits, (n, g))
    # activations as a layer sees them (one block's magnitudes within a few binades) or any code
    x = rng.standard_normal((n, g)) * 2.0 ** rng.integers(-60, 60, (n, 1))
    act_c = np.where(rng.random((n, 1)) < 0.5, BF16.encode(BF16.quantize(x)).astype(np.int64),
                     bf16_codes(rng, (n, g)))
    scale = rng.integers(0, 1 << scale_fmt.bits, n)
    scale = np.where(np.isnan(scale_fmt.values[scale]), 0, scale)
    sign = rng.integers(0, 2, n) if layout.signed_scale else np.zeros(n, np.int64)
    kind = rng.integers(0, 9, n)
    h_max = int(np.argmax(np.where(hif.values > 0, hif.values, 0)))
    half = g // 2
    for b in np.flatnonzero(kind == 1):          # zero block: every weight or every activation 0
        (hif_c if rng.random() < 0.5 else act_c)[b] = 0
    for b in np.flatnonzero(kind == 2):          # cancellation: the second half negates the first
        hif_c[b, half:] = hif_c[b, :half] ^ (1 << (hif.bits - 1))
        act_c[b, half:] = act_c[b, :half]
    for b in np.flatnonzero(kind == 3):          # the largest products, one sign
        hif_c[b] = h_max
        act_c[b] = 0x7F7F | (rng.integers(0, 2) << 15)
        scale[b] = (1 << scale_fmt.bits) - 1
    for b in np.flatnonzero(kind == 4):          # subnormal activations (exponent field 0)
        act_c[b] &= 0x807F
    for b in np.flatnonzero(kind == 5):          # cancellation leaving one far product
        hif_c[b, half:] = hif_c[b, :half] ^ (1 << (hif.bits - 1))
        act_c[b, half:] = act_c[b, :half]
        hif_c[b, -1], act_c[b, -1] = rng.integers(1, 1 << hif.bits), bf16_codes(rng, 1)[0]
    for b in np.flatnonzero(kind == 6):          # a block at one binade plus one product far below
        act_c[b] = (act_c[b] & 0x807F) | (rng.integers(60, 200) << 7)
        act_c[b, rng.integers(g)] = bf16_codes(rng, 1)[0] & 0x3FFF
    for b in np.flatnonzero(kind == 7):          # a few of the smallest products: the result can vanish
        hif_c[b] = rng.choice([0, 0, 1, 1 | (1 << (hif.bits - 1))], g)
        act_c[b] = rng.choice([1, 2, 0x8001, 0x80], g)
    # offsets: uniform over the byte, or placed near the subnormal range, the top, or in between
    w = hif.decode(hif_c) * BF16.decode(act_c)
    mag = np.abs(w.sum(axis=1)) * scale_fmt.decode(scale)
    with np.errstate(over="ignore", invalid="ignore"):
        lg = np.where((mag > 0) & np.isfinite(mag), np.log2(np.where(mag > 0, mag, 1)), 0)
    target = rng.choice([-149, -140, -127, -126, -125, 0, 20, 126, 127, 128], n) + rng.integers(-3, 4, n)
    target = np.where(kind == 7, rng.integers(-153, -148, n), target)
    offset = np.where(rng.random(n) < 0.3, rng.integers(-128, 128, n), np.round(target - lg))
    return hif_c, act_c, scale, sign, np.clip(offset, -128, 127).astype(np.int64)


def layout_case(name):
    if name == "g8":
        return BlockLayout(4, 8, FORMATS["ue3m3"], signed_scale=True, select_bit=True), HIF
    point = get_point(name)
    return point.layout, point.hif


@pytest.mark.parametrize("name,n", [("sop4-g16", 240), ("e2m3-ue4m4-g16", 60), ("g8", 60)])
def test_random_blocks_bit_exact(name, n):
    layout, hif = layout_case(name)
    rng = np.random.default_rng(len(name) + n)
    blocks = random_blocks(layout, hif, rng, n)
    want = model(layout, hif, *blocks)
    slow = takes_fallback(layout, hif, *blocks[:3], blocks[4])
    x = BF16.decode(blocks[1])
    counts = classify(want) | {
        "fast": int((~slow).sum()), "slow": int(slow.sum()),
        "subnormal x": int(((x != 0) & (np.abs(x) < 2.0 ** -126)).any(axis=1).sum()),
        "max x": int((np.abs(x) == BF16.max).any(axis=1).sum()),
        "cancelled": int(((want & 0x7FFFFFFF) == 0).sum())}
    assert all(c > 0 for c in counts.values()), counts
    got, _, n_slow = run(BlockDot(layout, hif, "bf16"), *blocks, seed=n)
    bad = np.flatnonzero(got != want)
    assert not len(bad), [(int(b), hex(got[b]), hex(want[b])) for b in bad[:5]]
    assert n_slow == slow.sum()


# -- real blocks: MiniLM's query layer with its real input, rounded to BF16 -----------------------------------

@pytest.fixture(scope="module")
def minilm_query():
    """(stream of the query layer's first 6 rows in sop4-g16, 2 real input rows in BF16)."""
    from sop.quantize.calib import heldout_sentences
    from sop.quantize.e2e import Bert
    from sop.quantize.models import minilm_folder
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    name = "encoder.layer.0.attention.self.query.weight"
    w = minilm_linear_weights()[name][:6].astype(np.float32)
    stream = get_quant_format("sop4-g16").quantize(w).stream
    seen = {}
    Bert(minilm_folder()).embed(heldout_sentences(1), hook=lambda n, x: seen.setdefault(n, x))
    x = seen[name][[0, -1]]
    return stream, BF16.quantize(x).astype(np.float32)


def bf16_stream_blocks(stream, x):
    """The unit's inputs for every block of ``stream`` with the BF16 vector ``x``, and golden's V."""
    blocks, _, select = stream_blocks(stream, BF16.quantize(np.zeros_like(x)).astype(np.float32))
    g = stream.layout.group
    act = np.tile(dot.activation_codes(x, BF16).reshape(-1, g), (stream.rows, 1))
    want = dot.block_values(stream, x, "bf16").reshape(-1).view(np.uint32)
    return (blocks[0], act) + blocks[2:], want, select


def test_real_minilm_blocks_under_stalls(minilm_query):
    stream, xs = minilm_query
    for k, x in enumerate(xs):
        blocks, want, select = bf16_stream_blocks(stream, x)
        assert 0 < select.mean() < 1 and 0 < blocks[3].mean() < 1            # both banks, both signs
        np.testing.assert_array_equal(model(stream.layout, stream.hif, *blocks), want)
        got, _, slow = run(BlockDot(stream.layout, stream.hif, "bf16"), *blocks, seed=k, p_idle=0.4, p_stall=0.4)
        np.testing.assert_array_equal(got, want)
        assert slow == takes_fallback(stream.layout, stream.hif, *blocks[:3], blocks[4]).sum() == 0


# -- throughput, the stalls of a slow block, its order ------------------------------------------------------

def fast_blocks(rng, n):
    hif = rng.integers(0, 1 << HIF.bits, (n, G))
    act = BF16.encode(BF16.quantize(rng.standard_normal((n, G)))).astype(np.int64)
    return hif, act, rng.integers(1, 48, n), rng.integers(0, 2, n), rng.integers(-4, 4, n)


def test_one_fast_block_per_cycle_and_the_stated_latency():
    rng = np.random.default_rng(5)
    blocks = fast_blocks(rng, 64)
    assert not takes_fallback(SOP4.layout, HIF, *blocks[:3], blocks[4]).any()
    dut = BlockDot(SOP4.layout, HIF, "bf16")
    got, when, slow = run(dut, *blocks, p_idle=0, p_stall=0)
    np.testing.assert_array_equal(got, model(SOP4.layout, HIF, *blocks))
    # the first block is taken at cycle 0: out at cycle latency, then one a cycle, no bubbles
    np.testing.assert_array_equal(when, dut.latency + np.arange(64))
    assert slow == 0


def slow_mix(rng):
    """Fast and slow blocks interleaved: f f S S f S f f S (the slow ones a far cancellation)."""
    hif, act, scale, sign, off = fast_blocks(rng, 9)
    pattern = "ffSSfSffS"
    for b in (i for i, c in enumerate(pattern) if c == "S"):
        act[b, 0] = act[b, 1] = bf16(2.0 ** 100)
        hif[b, 0], hif[b, 1] = ONE_H, ONE_H | NEG_H
    return (hif, act, scale, sign, off), np.array([c == "S" for c in pattern])


def test_slow_blocks_stall_the_input_and_leave_in_order():
    rng = np.random.default_rng(7)
    blocks, slow = slow_mix(rng)
    assert (takes_fallback(SOP4.layout, HIF, *blocks[:3], blocks[4]) == slow).all()
    want = model(SOP4.layout, HIF, *blocks)
    dut = BlockDot(SOP4.layout, HIF, "bf16")
    got, when, n_slow = run(dut, *blocks, p_idle=0, p_stall=0)
    np.testing.assert_array_equal(got, want)
    assert n_slow == slow.sum()
    # no stalls on the output: a fast block after a fast block one cycle later, a slow block some
    # tens of cycles later (its serial path), never more than the stated bound
    gaps = np.diff(when)
    assert (gaps[~slow[1:] & ~slow[:-1]] == 1).all()
    assert (gaps[slow[1:]] > 20).all() and (gaps <= dut.slow_cycles_max + 1).all(), gaps
    # under random gaps and stalls
    for seed in (1, 2):
        got, _, _ = run(dut, *blocks, seed=seed, p_idle=0.3, p_stall=0.5)
        np.testing.assert_array_equal(got, want)
    # a slow block stalled inside the pipeline while the next one is computed and handed over
    blocks, want = held_blocks()
    for window in HELD_WINDOWS:
        got, _, _ = run(dut, *blocks, p_idle=0, p_stall=0, hold=600, window=window)
        np.testing.assert_array_equal(got, want)


#: ``values.ready`` high only in these cycles before cycle 600 (``held_blocks``)
HELD_WINDOWS = [range(300, 300 + k) for k in range(1, 5)]


def held_blocks():
    """f f f f S S f: with ``values.ready`` low, the first two fill the output and the next two wait
    inside the pipeline; a short window of ready lets the first slow block in behind them and stalls
    it there, while the second one is computed: it must not be handed over (its result register
    is read at the pipeline's end) until the first has left."""
    hif, act, scale, sign, off = fast_blocks(np.random.default_rng(7), 7)
    for b in (4, 5):
        act[b, 0] = act[b, 1] = bf16(2.0 ** 100)
        hif[b, 0], hif[b, 1] = ONE_H, ONE_H | NEG_H
    blocks = (hif, act, scale, sign, off)
    return blocks, model(SOP4.layout, HIF, *blocks)


# -- the checks catch injected bugs ------------------------------------------------------------------------

class NoFallback(BlockDotBF16):
    """Never detects a dropped bit: every block with products far apart is summed in the window."""

    @staticmethod
    def drops(nz, d, lim):
        return nz & 0


class DropsSticky(BlockDotBF16):
    """Forgets the bits below the guard bit (both paths round through this): the E4M3 unit's mutant."""

    round_up = staticmethod(test_hdl_block_dot.DropsSticky.round_up)


class Overwrites(BlockDotBF16):
    """Hands a slow result over without waiting for the previous slow block to leave."""

    HOLD_WORD = False


@pytest.mark.parametrize("mutant", [NoFallback, DropsSticky])
def test_the_random_and_hand_blocks_catch_a_broken_unit(mutant):
    rng = np.random.default_rng(9)
    blocks = random_blocks(SOP4.layout, HIF, rng, 60)
    want = model(SOP4.layout, HIF, *blocks)
    got, _, _ = run(mutant(SOP4.layout, HIF), *blocks, p_idle=0, p_stall=0)
    assert (got != want).any()
    cases = hand_blocks()
    got, _, _ = run(mutant(SOP4.layout, HIF), *([c[i] for c in cases] for i in range(5)), p_idle=0, p_stall=0)
    assert (got != np.array([c[5] for c in cases], np.uint32)).any()


def test_the_order_check_catches_an_overwritten_slow_result():
    blocks, want = held_blocks()
    dut = Overwrites(SOP4.layout, HIF)
    assert any((run(dut, *blocks, p_idle=0, p_stall=0, hold=600, window=w)[0] != want).any()
               for w in HELD_WINDOWS)
