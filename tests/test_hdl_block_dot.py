"""The block dot unit (hdl/block_dot.py) in amaranth.sim, bit for bit against golden.dot.block_values.

Hand-worked blocks (expected patterns worked out in the comments), random blocks over
the whole input space and its corners (both banks and signs, zero blocks, cancellation
to zero, the largest sums, subnormal and maximal activations, results that saturate or
round to a subnormal or to zero), and real MiniLM blocks quantized to sop4-g16 with
E4M3 activations, each under random input gaps and output backpressure. A unit that
truncates, or drops the sticky bit, is caught (the mutants below).
"""

import numpy as np
import pytest
from amaranth.hdl import Mux
from amaranth.sim import Simulator

from sop.golden import dot
from sop.golden.formats import FORMATS
from sop.golden.layout import BlockLayout, LayerStream, unpack_blocks
from sop.golden.points import get_point
from sop.hdl import block_dot, fp32_acc
from sop.hdl.block_dot import BlockDot
from sop.hdl.fp32_acc import Fp32Add, RowAccumulator

E4M3 = dot.ACT_FORMATS["e4m3"]
SOP4 = get_point("sop4-g16")
HIF = SOP4.hif


# -- the harness --------------------------------------------------------------------------------------

def pack_blocks_in(dut: BlockDot, hif, act, scale, sign, offset) -> list[int]:
    """Each block's payload as an integer in ``block_dot.block_layout``'s bit order."""
    lay = block_dot.block_layout(dut.hif, dut.act, dut.layout)
    f = {name: fld for name, fld in lay}
    hw, aw = dut.hif.bits, dut.act.bits
    words = []
    for b in range(len(hif)):
        v = 0
        for j in range(dut.layout.group):
            v |= int(hif[b][j]) << (f["hif"].offset + j * hw)
            v |= int(act[b][j]) << (f["act"].offset + j * aw)
        v |= int(scale[b]) << f["scale"].offset
        v |= int(sign[b]) << f["sign"].offset
        v |= (int(offset[b]) & 0xFF) << f["offset"].offset
        words.append(v)
    return words


def run(dut: BlockDot, hif, act, scale, sign, offset, *, seed=0, p_idle=0.3, p_stall=0.3):
    """Stream the blocks through ``dut`` (random input gaps and output stalls); the output patterns,
    and per output the cycle it left on."""
    words = pack_blocks_in(dut, hif, act, scale, sign, offset)
    rng = np.random.default_rng(seed)
    got, when = [], []

    async def bench(ctx):
        sent, cycle = 0, 0
        limit = 8 * (len(words) + dut.latency) + 100
        while len(got) < len(words):
            assert cycle < limit, "the unit stopped"
            offer = sent < len(words) and rng.random() >= p_idle
            ctx.set(dut.blocks.valid, int(offer))
            if offer:
                ctx.set(dut.blocks.payload.as_value(), words[sent])
            ctx.set(dut.values.ready, int(rng.random() >= p_stall))
            if offer and ctx.get(dut.blocks.ready):
                sent += 1
            if ctx.get(dut.values.valid) and ctx.get(dut.values.ready):
                got.append(ctx.get(dut.values.payload))
                when.append(cycle)
            await ctx.tick()
            cycle += 1

    simulate(dut, bench)
    return np.array(got, np.uint32), np.array(when)


def simulate(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


# -- hand-worked blocks -------------------------------------------------------------------------------

ONE_H, ONE_X, ONE_S = 5 << 6, 7 << 3, 3 << 3          # 1.0 in E3M6 b5, E4M3, UE3M3
NEG_H = 1 << 9                                         # the HIF sign bit
G = 16


def hand_blocks():
    """(hif codes, act codes, scale code, sign, offset, expected pattern, what)."""
    tiny_h, tiny_x, tiny_s = 1, 1, 1                   # 2^-10, 2^-9, 2^-5: the smallest of each
    max_h, max_x, max_s = 0x1FF, 0x7E, 0x3F            # 7.9375, 448, 30
    ones = [ONE_H] * G
    return [
        # 16 x (1 * 1), scale 1: A = 16 -> 16.0 = 0x41800000
        (ones, [ONE_X] * G, ONE_S, 0, 0, 0x41800000, "sixteen ones"),
        # the block sign and offset: -(16 * 2^-3) = -2.0 = 0xC0000000
        (ones, [ONE_X] * G, ONE_S, 1, -3, 0xC0000000, "sign and offset"),
        # 8 x (+1) + 8 x (-1): A = 0 -> +0, whatever the block sign
        ([ONE_H] * 8 + [ONE_H | NEG_H] * 8, [ONE_X] * G, ONE_S, 1, 0, 0x00000000, "cancellation to +0"),
        # every weight 0 (HIF code 0): +0
        ([0] * G, [ONE_X] * G, ONE_S, 1, 5, 0x00000000, "zero weights"),
        # the largest sum: 16 * 7.9375 * 448 * 30 * 2^127 is beyond FLT_MAX: saturates
        ([max_h] * G, [max_x] * G, max_s, 0, 127, 0x7F7FFFFF, "saturates"),
        ([max_h] * G, [max_x | 0x80] * G, max_s, 0, 127, 0xFF7FFFFF, "saturates negative"),
        # the same sum at offset 0: 16 * 7.9375 * 448 * 30 = 1706880 exactly (0x49D05A00)
        ([max_h] * G, [max_x] * G, max_s, 0, 0, 0x49D05C00, "largest sum, exact"),
        # one product 2^-10 * 2^-9 * 2^-5 * 2^-128 = 2^-152: below half the smallest subnormal: -0
        ([tiny_h] + [0] * 15, [tiny_x] * G, tiny_s, 1, -128, 0x80000000, "rounds to -0"),
        # four such products: 2^-150, exactly half of 2^-149: ties to even, +0
        ([tiny_h] * 4 + [0] * 12, [tiny_x] * G, tiny_s, 0, -128, 0x00000000, "tie to +0"),
        # five: 5 * 2^-152 > 2^-150: rounds up to 2^-149 (0x00000001)
        ([tiny_h] * 5 + [0] * 11, [tiny_x] * G, tiny_s, 0, -128, 0x00000001, "smallest subnormal"),
        # twelve: 12 * 2^-152 = 1.5 * 2^-149 ties to 2 * 2^-149 (even, 0x00000002)
        ([tiny_h] * 12 + [0] * 4, [tiny_x] * G, tiny_s, 0, -128, 0x00000002, "subnormal tie up to even"),
        # in units of the accumulator's LSB 2^-19 (scale 1, offset 0): 1 * 64 = 2^25 units, plus
        # 2^-10 * 2^-8 = 2 units: 2^25 + 2, exactly half an ulp (4 units) above 64: to even, 64.0
        ([ONE_H, 1] + [0] * 14, [0x68, 2] + [0] * 14, ONE_S, 0, 0, 0x42800000, "tie to even, down"),
        # plus 1 unit more (2^-10 * 2^-9): the sticky bit below the round bit: up, 64 + 2^-18
        ([ONE_H, 1, 1] + [0] * 13, [0x68, 2, 1] + [0] * 13, ONE_S, 0, 0, 0x42800001, "sticky rounds up"),
        # 2^25 + 4 + 2: half an ulp above an odd significand: up to even, 64 + 2^-16
        ([ONE_H, 1, 1] + [0] * 13, [0x68, 4, 2] + [0] * 13, ONE_S, 0, 0, 0x42800002, "tie to even, up"),
        # 7.9375 * 448 - 7.9375 * 448 + 2^-19: the exact sum keeps the 2^-19 (0x36000000)
        ([max_h, max_h | NEG_H, 1] + [0] * 13, [max_x, max_x, 1] + [0] * 13, ONE_S, 0, 0, 0x36000000,
         "exact cancellation"),
    ]


@pytest.mark.parametrize("case", hand_blocks(), ids=lambda c: c[-1])
def test_hand_worked_blocks(case):
    hif, act, s, sign, off, want, _ = case
    dut = BlockDot(SOP4.layout, HIF)
    got, _ = run(dut, [hif], [act], [s], [sign], [off], p_idle=0, p_stall=0)
    gold = block_dot.model(SOP4.layout, HIF, "e4m3", [hif], [act], [s], [sign], [off])
    assert got[0] == gold[0], (hex(got[0]), hex(gold[0]))
    if want is not None:
        assert got[0] == want, (hex(got[0]), hex(want))


# -- random blocks over the input space and its corners ------------------------------------------------

def act_codes(rng, shape, act=E4M3):
    """Random activation codes, NaN codes excluded (the contract: finite activations)."""
    codes = rng.integers(0, 1 << act.bits, shape)
    nan = np.isnan(act.decode(codes))
    return np.where(nan, codes & ~1, codes)           # S.1111.110: the largest finite


def random_blocks(layout: BlockLayout, hif, rng, n):
    """(hif, act, scale, sign, offset) of ``n`` blocks, a mix of kinds (see the cases below)."""
    g, scale_fmt = layout.group, layout.scale
    hif_c = rng.integers(0, 1 << hif.bits, (n, g))
    act_c = act_codes(rng, (n, g))
    scale = rng.integers(0, 1 << scale_fmt.bits, n)
    scale = np.where(np.isnan(scale_fmt.values[scale]), 0, scale)
    sign = rng.integers(0, 2, n) if layout.signed_scale else np.zeros(n, np.int64)
    kind = rng.integers(0, 8, n)
    h_max = int(np.argmax(np.where(hif.values > 0, hif.values, 0)))            # the largest HIF code
    a_max = int(np.argmax(np.where(np.isfinite(E4M3.values), E4M3.values, 0)))
    for b in np.flatnonzero(kind == 1):          # a zero block: every weight or every activation 0
        (hif_c if rng.random() < 0.5 else act_c)[b] = 0
    for b in np.flatnonzero(kind == 2):          # cancellation: the second half negates the first
        half = g // 2
        hif_c[b, half:] = hif_c[b, :half] ^ (1 << (hif.bits - 1))
        act_c[b, half:] = act_c[b, :half]
    for b in np.flatnonzero(kind == 3):          # the largest sum, every product of one sign
        hif_c[b] = h_max
        act_c[b] = a_max | (rng.integers(0, 2) << 7)
        scale[b] = (1 << scale_fmt.bits) - 1
    for b in np.flatnonzero(kind == 4):          # subnormal activations (exponent field 0)
        act_c[b] &= 0x87
    for b in np.flatnonzero(kind == 5):          # a near-cancellation: +-1 ulp of the accumulator left
        half = g // 2
        hif_c[b, half:] = hif_c[b, :half] ^ (1 << (hif.bits - 1))
        act_c[b, half:] = act_c[b, :half]
        hif_c[b, -1], act_c[b, -1] = 1, 1
    for b in np.flatnonzero(kind == 6):          # a few of the smallest products: the result can vanish
        hif_c[b] = rng.choice([0, 0, 1, 1 | (1 << (hif.bits - 1))], g)
        act_c[b] = rng.choice([1, 2, 0x81], g)
        scale[b] = rng.integers(1, 3)
    # offsets: uniform over the byte (most results saturate or vanish), or placed so that the
    # result lands near the subnormal range, the top of the normal range, or in between
    w = hif.decode(hif_c) * E4M3.decode(act_c)
    mag = np.abs(w.sum(axis=1)) * scale_fmt.decode(scale)
    lg = np.where(mag > 0, np.log2(np.where(mag > 0, mag, 1)), 0)
    target = rng.choice([-149, -140, -127, -126, -125, 0, 20, 126, 127, 128], n) + rng.integers(-3, 4, n)
    target = np.where(kind == 6, rng.integers(-153, -148, n), target)      # around half 2^-149
    offset = np.where((rng.random(n) < 0.3) & (kind != 6), rng.integers(-128, 128, n), np.round(target - lg))
    offset = np.clip(offset, -128, 127).astype(np.int64)
    return hif_c, act_c, scale, sign, offset


def classify(bits):
    """Counts of the result classes in ``bits``: each must occur for the test to mean anything."""
    v = f32(bits)
    return {"zero": int((v == 0).sum()), "-0": int(((v == 0) & np.signbit(v)).sum()),
            "subnormal": int(((v != 0) & (np.abs(v) < np.finfo(np.float32).tiny)).sum()),
            "saturated": int((np.abs(v) == np.finfo(np.float32).max).sum()),
            "normal": int(((np.abs(v) >= np.finfo(np.float32).tiny) & (np.abs(v) < np.finfo(np.float32).max)).sum())}


def layout_case(name):
    if name in ("g8", "g32"):           # g = 32 with 4-bit codes: the model's one-block LUT needs 6-bit codes
        return BlockLayout(4, int(name[1:]), FORMATS["ue3m3"], signed_scale=True, select_bit=True), HIF
    point = get_point(name)
    return point.layout, point.hif


@pytest.mark.parametrize("name,n", [("sop4-g16", 600), ("e2m3-ue4m4-g16", 200), ("g8", 200), ("g32", 120)])
def test_random_blocks_bit_exact(name, n):
    layout, hif = layout_case(name)
    rng = np.random.default_rng(len(name) + n)
    blocks = random_blocks(layout, hif, rng, n)
    want = block_dot.model(layout, hif, "e4m3", *blocks)
    counts = classify(want)
    assert all(c > 0 for c in counts.values()), counts
    got, _ = run(BlockDot(layout, hif), *blocks, seed=n)
    bad = np.flatnonzero(got != want)
    assert not len(bad), [(int(b), hex(got[b]), hex(want[b])) for b in bad[:5]]


# -- real blocks: a MiniLM layer quantized to sop4-g16, E4M3 activations ----------------------------------

def real_activations(rng, batch, cols):
    """Activations as a transformer feeds a linear layer: mostly unit scale, a few outlier channels,
    rounded to E4M3 (test_dot's generator)."""
    x = rng.standard_normal((batch, cols)) * rng.choice([0.05, 1, 20], size=(batch, 1))
    x[:, rng.integers(0, cols, 4)] *= 50
    return E4M3.quantize(np.clip(x, -E4M3.max, E4M3.max)).astype(np.float32)


@pytest.fixture(scope="module")
def minilm_stream():
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    w = minilm_linear_weights()["encoder.layer.0.attention.self.query.weight"][:6].astype(np.float32)
    return get_quant_format("sop4-g16").quantize(w).stream


def stream_blocks(stream: LayerStream, x):
    """The unit's inputs for every block of ``stream`` with activation vector ``x``, and golden's V."""
    lay, g = stream.layout, stream.layout.group
    headers, codes = unpack_blocks(lay, stream.blocks)
    scale, sign, select = lay.split_header(headers)
    hif = np.asarray(stream.luts, np.int64)[select[:, None], codes]             # both banks
    bpr = stream.cols // g
    xc = dot.activation_codes(x, E4M3).reshape(bpr, g)
    act = np.tile(xc, (stream.rows, 1))                                         # block n: row n // bpr
    offset = np.full(len(headers), stream.offset)
    want = dot.block_values(stream, x, "e4m3").reshape(-1).view(np.uint32)
    return (hif, act, scale, sign, offset), want, select


def test_real_minilm_blocks_under_stalls(minilm_stream):
    rng = np.random.default_rng(3)
    for k, x in enumerate(real_activations(rng, 2, minilm_stream.cols)):
        blocks, want, select = stream_blocks(minilm_stream, x)
        assert 0 < select.mean() < 1 and 0 < blocks[3].mean() < 1            # both banks, both signs
        got, _ = run(BlockDot(minilm_stream.layout, minilm_stream.hif), *blocks, seed=k, p_idle=0.4, p_stall=0.4)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(block_dot.model(minilm_stream.layout, minilm_stream.hif, "e4m3", *blocks), want)


# -- throughput, latency, the refusal of a format with no path -----------------------------------------

def test_one_block_per_cycle_and_the_stated_latency():
    rng = np.random.default_rng(5)
    blocks = random_blocks(SOP4.layout, HIF, rng, 64)
    dut = BlockDot(SOP4.layout, HIF)
    got, when = run(dut, *blocks, p_idle=0, p_stall=0)
    np.testing.assert_array_equal(got, block_dot.model(SOP4.layout, HIF, "e4m3", *blocks))
    # the first block is taken at cycle 0 (the enable starts high): out at cycle latency, then one
    # a cycle, no bubbles
    np.testing.assert_array_equal(when, dut.latency + np.arange(64))


def test_a_format_without_a_path_is_refused_with_the_reason():
    """BF16 builds its own unit (tests/test_hdl_block_dot_bf16.py); another wide format is refused."""
    with pytest.raises(ValueError, match=r"274-bit exact block accumulator.*bf16"):
        BlockDot(SOP4.layout, HIF, FORMATS["ue8m0"])


# -- the checks catch injected bugs ------------------------------------------------------------------------

class Truncates(BlockDot):
    """Rounds toward zero: never increments."""

    @staticmethod
    def round_up(lsb, guard, sticky):
        return guard & 0


class DropsSticky(BlockDot):
    """Forgets the bits below the guard bit: every value above a tie rounds as a tie."""

    @staticmethod
    def round_up(lsb, guard, sticky):
        return guard & lsb


class OnesComplement(BlockDot):
    """Negates a product as its ones' complement: each negative product one LSB (2^L) too small."""

    @staticmethod
    def negate(sign, p):
        return Mux(sign, -p - 1, p)


@pytest.mark.parametrize("mutant", [Truncates, DropsSticky, OnesComplement])
def test_the_random_blocks_catch_a_broken_unit(mutant):
    rng = np.random.default_rng(9)
    blocks = random_blocks(SOP4.layout, HIF, rng, 150)
    want = block_dot.model(SOP4.layout, HIF, "e4m3", *blocks)
    got, _ = run(mutant(SOP4.layout, HIF), *blocks, p_idle=0, p_stall=0)
    assert (got != want).any()


def test_the_real_blocks_catch_a_broken_unit(minilm_stream):
    """Real blocks with E4M3 activations are mostly exact in FP32 (11-bit products over a narrow
    exponent spread), so a broken rounding can pass them (the random blocks catch it); an
    accumulator one LSB off per negative product does not."""
    x = real_activations(np.random.default_rng(9), 1, minilm_stream.cols)[0]
    real, want, _ = stream_blocks(minilm_stream, x)
    got, _ = run(OnesComplement(minilm_stream.layout, minilm_stream.hif), *real, p_idle=0, p_stall=0)
    assert (got != want).any()


# -- the FP32 adder and the row accumulator (hdl/fp32_acc.py) ----------------------------------------------

SLOTS = fp32_acc.ADD_LATENCY + 1       # the fewest running sums the ring takes (17)


def fp32_pairs(rng, n):
    """Binary32 pattern pairs (finite): random, x + -x, near cancellation, subnormals, sums beyond
    FLT_MAX, signed zeros."""
    def rnd(k, e_lo=0, e_hi=255):
        return (rng.integers(0, 2, k) << 31 | rng.integers(e_lo, e_hi, k) << 23
                | rng.integers(0, 1 << 23, k)).astype(np.uint32)

    a, b = rnd(n), rnd(n)
    kind = rng.integers(0, 7, n)
    flip = np.uint32(1 << 31)
    b = np.where(kind == 1, a ^ flip, b)
    # exponents 0 .. 2 apart, opposite signs: massive cancellation
    near = ((a >> 23) & 0xFF).astype(np.int64) - rng.integers(0, 3, n)
    near = np.clip(near, 0, 254).astype(np.uint32)
    b = np.where(kind == 2, ((a ^ flip) & np.uint32(0x807FFFFF)) | (near << 23) ^ np.uint32(rng.integers(0, 2, n)),
                 b)
    a = np.where(kind == 3, a & np.uint32(0x807FFFFF), a)
    b = np.where(kind == 3, b & np.uint32(0x807FFFFF), b)
    big = rnd(n, 252, 255)
    a = np.where(kind == 4, big & np.uint32(0x7FFFFFFF), a)
    b = np.where(kind == 4, rnd(n, 252, 255) & np.uint32(0x7FFFFFFF), b)
    a = np.where(kind == 5, rng.choice([0, 1 << 31], n).astype(np.uint32), a)
    b = np.where(kind == 5, rng.choice([0, 1 << 31, 1], n).astype(np.uint32), b)
    return a, b


def run_adder(dut, a, b, seed=0):
    rng = np.random.default_rng(seed)
    got = []

    async def bench(ctx):
        issued, in_flight = 0, []
        while len(got) < len(a):
            e = rng.random() < 0.7                                # a stalled stage holds its value
            if e and issued < len(a):
                ctx.set(dut.a, int(a[issued]))
                ctx.set(dut.b, int(b[issued]))
            ctx.set(dut.en, int(e))
            await ctx.tick()
            if e:
                in_flight.append(issued < len(a))
                issued += issued < len(a)
                if len(in_flight) >= dut.latency and in_flight.pop(0):
                    got.append(ctx.get(dut.s))

    simulate(dut, bench)
    return np.array(got, np.uint32)


def test_fp32_adder_bit_exact():
    a, b = fp32_pairs(np.random.default_rng(21), 2000)
    want = fp32_acc.add_model(a, b)
    v = f32(want)
    assert (v == np.finfo(np.float32).max).any() and (np.abs(v[v != 0]) < np.finfo(np.float32).tiny).any()
    assert ((v == 0) & np.signbit(v)).any() and ((v == 0) & ~np.signbit(v)).any()       # -0 + -0, x + -x
    np.testing.assert_array_equal(run_adder(Fp32Add(), a, b), want)


class AdderDropsSticky(Fp32Add):
    @staticmethod
    def round_up(lsb, guard, sticky):
        return guard & lsb


def test_the_adder_check_catches_a_dropped_sticky_bit():
    a, b = fp32_pairs(np.random.default_rng(22), 300)
    assert (run_adder(AdderDropsSticky(), a, b) != fp32_acc.add_model(a, b)).any()


def run_rows(dut: RowAccumulator, values, slots, first, last, *, seed=0, p_idle=0.3, p_stall=0.3, idle=0,
             gaps=None):
    """Offer ``values`` (after ``idle`` cycles; ``gaps``: value index -> idle cycles before it);
    the sums and the cycle each value is taken."""
    rng = np.random.default_rng(seed)
    n_out = int(np.sum(last))
    got, taken = [], []

    gaps = dict(gaps or {})

    async def bench(ctx):
        sent, cycle, resume = 0, 0, idle
        while len(got) < n_out:
            assert cycle < 40 * (len(values) + dut.slots) + 200, "the accumulator stopped"
            if sent in gaps:
                resume = cycle + gaps.pop(sent)
            offer = sent < len(values) and cycle >= resume and rng.random() >= p_idle
            ctx.set(dut.values.valid, int(offer))
            if offer:
                ctx.set(dut.values.payload.value, int(values[sent]))
                ctx.set(dut.values.payload.slot, int(slots[sent]))
                ctx.set(dut.values.payload.first, int(first[sent]))
                ctx.set(dut.values.payload.last, int(last[sent]))
            ctx.set(dut.sums.ready, int(rng.random() >= p_stall))
            if offer and ctx.get(dut.values.ready):
                sent += 1
                taken.append(cycle)
            if ctx.get(dut.sums.valid) and ctx.get(dut.sums.ready):
                got.append((ctx.get(dut.sums.payload.value), ctx.get(dut.sums.payload.slot)))
            await ctx.tick()
            cycle += 1

    simulate(dut, bench)
    return got, np.array(taken)


def interleave(V, slots):
    """The values of rows ``V`` (rows, blocks) in the order an engine with ``slots`` running sums
    feeds them: rows in groups of ``slots``, block by block, one row per slot."""
    rows, bpr = V.shape
    vals, slot, first, last, order = [], [], [], [], []
    for g0 in range(0, rows, slots):
        group = range(g0, min(rows, g0 + slots))
        for b in range(bpr):
            for r in group:
                vals.append(V[r, b]), slot.append(r - g0), first.append(b == 0), last.append(b == bpr - 1)
        order += list(group)
    return np.array(vals, np.float32).view(np.uint32), slot, first, last, order


def test_row_accumulator_on_real_block_values(minilm_stream):
    """MiniLM sop4-g16 with 3 E4M3 activation vectors: 18 rows of 24 blocks, 17 slots; the sums are
    golden.dot.gemv's y bit for bit (the layer has no sparse entries), under stalls."""
    x = real_activations(np.random.default_rng(4), 3, minilm_stream.cols)
    V = dot.block_values(minilm_stream, x, "e4m3")                   # (3, rows, blocks)
    y = dot.gemv(minilm_stream, x, "e4m3")                            # (3, rows)
    assert not len(minilm_stream.sparse)
    rows = V.reshape(-1, V.shape[-1])
    dut = RowAccumulator(SLOTS)
    vals, slot, first, last, order = interleave(rows, SLOTS)
    got, _ = run_rows(dut, vals, slot, first, last, seed=1)
    assert got == fp32_acc.model(vals, slot, first, last)
    np.testing.assert_array_equal(np.array([v for v, _ in got], np.uint32), y.reshape(-1)[order].view(np.uint32))


def test_row_accumulator_order_saturation_and_one_row_at_a_time():
    # 1, 2^-24, 2^-24 in order: each 2^-24 is half an ulp of 1 and ties to even: 1.0 (reversed the
    # sum would be 1 + 2^-23); FLT_MAX + FLT_MAX saturates; every value in slot 0: one row at a time
    big = np.finfo(np.float32).max
    V = np.array([[1.0, 2.0 ** -24, 2.0 ** -24], [big, big, -1.0], [-0.0, -0.0, -0.0]], np.float32)
    vals = V.reshape(-1).view(np.uint32)
    first, last = [b == 0 for b in range(3)] * 3, [b == 2 for b in range(3)] * 3
    dut = RowAccumulator(SLOTS)
    got, taken = run_rows(dut, vals, [0] * 9, first, last, p_idle=0, p_stall=0)
    want = [(0x3F800000, 0), (0x7F7FFFFF, 0), (0x00000000, 0)]           # +0 + -0 + ... = +0
    assert got == want == fp32_acc.model(vals, [0] * 9, first, last)
    assert (np.diff(taken) == SLOTS).all()                                   # one value per ring turn
    np.testing.assert_array_equal(taken, dut.schedule([0] * 9))


def test_row_accumulator_takes_one_value_a_cycle_when_rows_interleave():
    rng = np.random.default_rng(6)
    V = rng.standard_normal((SLOTS, 5)).astype(np.float32)
    dut = RowAccumulator(SLOTS)
    vals, slot, first, last, _ = interleave(V, SLOTS)
    got, taken = run_rows(dut, vals, slot, first, last, p_idle=0, p_stall=0)
    assert got == fp32_acc.model(vals, slot, first, last)
    np.testing.assert_array_equal(taken, np.arange(len(vals)))            # no bubbles
    np.testing.assert_array_equal(taken, dut.schedule(slot))


class FreeRing(RowAccumulator):
    """The ring before: it turns freely, and a first value waits for it to reach its slot."""

    def turns(self, empty, offered):
        return 1


@pytest.mark.parametrize("wait", [0, 5, 16])
def test_row_accumulator_holds_its_ring_while_empty(wait):
    """After ``wait`` idle cycles (the ring holds at slot 0), 17 rows of 3 values one a cycle from
    the first; then 3 rows of 2 (a short tile: its second column waits for the ring), after a gap
    of ``wait`` cycles (the ring holds where the last row left it: slot 0), and 4 rows of one value
    each after a gap (slot 3: where the ring holds). The free-turning ring (the design before) is
    caught waiting."""
    rng = np.random.default_rng(7 + wait)
    parts = [interleave(rng.standard_normal(shape).astype(np.float32), SLOTS) for shape in ((SLOTS, 3), (3, 2))]
    parts.append(interleave(rng.standard_normal((4, 1)).astype(np.float32), SLOTS))
    parts[2] = (parts[2][0], [3, 4, 5, 6], *parts[2][2:])                  # slots 3 .. 6
    n = [len(p[0]) for p in parts]
    vals, slot, first, last = (np.concatenate([p[k] for p in parts]) for k in range(4))
    gaps = {n[0]: wait, n[0] + n[1]: 5}                                      # idle cycles before these values
    want = np.concatenate([np.arange(3 * SLOTS), 3 * SLOTS + np.array([0, 1, 2, SLOTS, SLOTS + 1, SLOTS + 2]),
                           4 * SLOTS + 3 + np.arange(4)])
    want[n[0]:] += wait
    want[n[0] + n[1]:] += 5
    for dut in (RowAccumulator(SLOTS), FreeRing(SLOTS)):
        got, taken = run_rows(dut, vals, slot, first, last, p_idle=0, p_stall=0, idle=wait, gaps=gaps)
        assert got == fp32_acc.model(vals, slot, first, last)
        if type(dut) is RowAccumulator:
            np.testing.assert_array_equal(taken - wait, want)
            np.testing.assert_array_equal(taken[:n[0]], dut.schedule(slot[:n[0]], start=wait))
        else:                                                   # slot 0 comes round once a turn
            assert taken[0] - wait == (-wait) % SLOTS and (taken - wait != want).any(), taken[:3]


def test_row_accumulator_refuses_fewer_slots_than_the_adder_latency():
    with pytest.raises(ValueError, match=f"at least its operand register and the adder's latency, {SLOTS}"):
        RowAccumulator(fp32_acc.ADD_LATENCY)
