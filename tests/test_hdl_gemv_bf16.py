"""The GEMV engine with BF16 activations (hdl/gemv.py, ``GemvConfig(act="bf16")``) in amaranth.sim,
bit for bit against golden.dot.gemv (act="bf16").

The host driver is tests/test_hdl_gemv.py's (random idle cycles on every input, random stalls on
``y``, the next layer's tables loaded while the current one runs). Checked: the BF16 term unit
(``ResidualTermBF16``: ``RNE_fp32(rho x_j)`` of two BF16 values, which can underflow and overflow
binary32) on hand-worked pairs and on pairs drawn around binary32's subnormal range and FLT_MAX;
the engine on random layers over every code, both banks and signs, with residual terms that
saturate, go subnormal or vanish; corners (the largest and subnormal BF16 activations, zero blocks,
cancellation to zero, blocks whose products span so many binades that the block dot unit takes its
exact serial path and stalls the front end); the first 40 rows of MiniLM's layer-0 query quantized to
sop4-g16, without and with 2 % residuals, with **real activations** (the layer's inputs in the BERT
forward pass, rounded to BF16); one block a cycle and the stated latency; the x NaN/Inf error bit; the
named engine's Verilog. Injected bugs in the term unit's rounding (no sticky bit, truncation, ties
away from zero) and a NaN check that looks at E4M3's bits are caught.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.sim import Simulator

from sop.golden import dot
from sop.golden.formats import FLOAT32_MAX, FORMATS
from sop.golden.layout import LayerStream, Sparse, pack_blocks
from sop.golden.points import get_point
from sop.hdl import gemv, gemv_config
from sop.hdl.gemv import GemvEngine
from sop.hdl.gemv_config import GemvConfig, gemv_configs
from sop.hdl.gemv_sequencer import BlockSequencer
from sop.hdl.gemv_term import ResidualTermBF16
from sop.quantize.weights import QUERY_LAYER

from test_hdl_gemv import Job, check, no_bubble, random_layer, rows_wrong, with_residuals
from test_hdl_gemv import run_terms as run_gemv_terms  # noqa: E402  (the shared term bench)

BF16 = FORMATS["bf16"]
SOP4 = get_point("sop4-g16")
FP6 = get_point("e2m3-ue4m4-g16")
TINY = float(np.finfo(np.float32).tiny)


def config(point=SOP4, **kw) -> GemvConfig:
    return GemvConfig(f"test-{point.name}-bf16", point.layout, point.hif, act="bf16",
                      **{"max_cols": 256, "max_rows": 255, **kw})


def bf16_vectors(rng, batch, cols):
    """Gaussian activations at a scale per vector, a few outlier channels, rounded to BF16."""
    x = rng.standard_normal((batch, cols)) * rng.choice([0.05, 1, 20], size=(batch, 1))
    x[:, rng.integers(0, cols, 4)] *= 50
    return BF16.quantize(x).astype(np.float32)


def f32(pattern: int) -> float:
    return float(np.array([pattern], np.uint32).view(np.float32)[0])


# -- the term unit ------------------------------------------------------------------------------------------

# (rho, x, the binary32 pattern of RNE_fp32(rho x)), worked by hand. BF16 code: sign, 8 exponent bits
# (bias 127), 7 fraction bits; 0x0001 is 2^-133 (the smallest subnormal), 0x3700 is 2^-17 (exponent 110).
HAND = [
    (0x3F80, 0x4040, 0x40400000),   # 1 x 3 = 3: exact, normal
    (0x0080, 0x3F80, 0x00800000),   # 2^-126 x 1: the smallest normal
    (0x0080, 0x3F00, 0x00400000),   # 2^-126 x 0.5 = 2^-127: an exact subnormal (shifted left, no rounding)
    (0x0001, 0x3700, 0x00000000),   # 2^-133 x 2^-17 = 2^-150: half the smallest subnormal, a tie: to even, +0
    (0x0001, 0xB700, 0x80000000),   # the same negative: -0 (the sign kept)
    (0x0001, 0x3701, 0x00000001),   # 2^-150 x (1 + 2^-7): above the tie by the sticky bit: up to 2^-149
    (0x0001, 0x3740, 0x00000001),   # 0.75 x 2^-149: above half, up
    (0x0001, 0x37C0, 0x00000002),   # 2^-133 x 1.5 x 2^-16 = 1.5 x 2^-149: a tie, 1 odd: up to 2
    (0x0001, 0x3820, 0x00000002),   # 2^-133 x 1.25 x 2^-15 = 2.5 x 2^-149: a tie, 2 even: stays 2
    (0x0001, 0x3600, 0x00000000),   # 2^-133 x 2^-19 = 2^-152: below half, +0
    (0x8001, 0x0001, 0x80000000),   # -2^-133 x 2^-133 = -2^-266: -0
    (0x7F7F, 0x3F80, 0x7F7F0000),   # the largest BF16 x 1: exact, normal
    (0x7F00, 0x4000, 0x7F7FFFFF),   # 2^127 x 2 = 2^128: beyond FLT_MAX, saturated
    (0x7F7F, 0xFF7F, 0xFF7FFFFF),   # largest x -largest: -FLT_MAX
    (0x8000, 0x4040, 0x80000000),   # -0 x 3 = -0
    (0x0000, 0xC040, 0x80000000),   # +0 x -3 = -0
    (0x8000, 0xC040, 0x00000000),   # -0 x -3 = +0
    (0x7F7F, 0x0000, 0x00000000),   # largest x +0 = +0
]


def term_pairs(rng, n):
    """BF16 (rho, x) codes, finite: a third anywhere, two thirds with exponent sums around binary32's
    subnormal range (where the term is rounded) and around FLT_MAX (where it saturates)."""
    def code(exp, sign):
        return (sign << 15) | (exp << 7) | rng.integers(0, 128, len(exp))

    k = n // 3
    er = rng.integers(0, 255, n)
    ex = np.concatenate([rng.integers(0, 255, k),
                         np.clip(rng.integers(95, 146, k) - er[k:2 * k], 0, 254),
                         np.clip(rng.integers(370, 385, n - 2 * k) - er[2 * k:], 0, 254)])
    return code(er, rng.integers(0, 2, n)), code(ex, rng.integers(0, 2, n))


def term_classes(want: np.ndarray) -> dict[str, int]:
    v = want.view(np.float32).astype(np.float64)
    return {"saturated": int((np.abs(v) == FLOAT32_MAX).sum()), "subnormal": int(((v != 0) & (np.abs(v) < TINY)).sum()),
            "-0": int(((v == 0) & np.signbit(v)).sum()), "+0": int(((v == 0) & ~np.signbit(v)).sum()),
            "normal": int(((np.abs(v) >= TINY) & (np.abs(v) < FLOAT32_MAX)).sum())}


def golden_terms(rho, x) -> np.ndarray:
    """golden.dot.residual_terms on a one-row layer whose sparse entries are ``rho``, against ``x``."""
    n = len(rho)
    stream = LayerStream(SOP4.layout, SOP4.hif, np.zeros((2, 16), np.int64), 0, 1, 16 * n,
                         pack_blocks(SOP4.layout, np.zeros(n, np.int64), np.zeros((n, 16), np.int64)),
                         Sparse(np.arange(n, dtype=np.uint32) * 16, np.asarray(rho, np.uint16)))
    xv = np.zeros((1, 16 * n))
    xv[0, ::16] = BF16.decode(np.asarray(x, np.int64))
    return dot.residual_terms(stream, xv)[1][0].view(np.uint32)


def run_terms(dut, rho, xc, seed=1) -> np.ndarray:
    """The term unit alone (test_hdl_gemv.run_terms), the entries' columns drawn from ``seed``."""
    col = np.random.default_rng(seed).integers(0, dut.config.max_cols, len(rho))
    return run_gemv_terms(dut, rho, xc, col, stall_seed=seed + 1)


@pytest.fixture(scope="module")
def pairs():
    rho, x = term_pairs(np.random.default_rng(21), 2400)
    hand = np.array(HAND)
    return np.concatenate([hand[:, 0], rho]), np.concatenate([hand[:, 1], x])


def test_hand_worked_terms_are_golden():
    """The hand-worked patterns are golden's (so the table above is a check of the spec, not of the unit)."""
    hand = np.array(HAND)
    np.testing.assert_array_equal(golden_terms(hand[:, 0], hand[:, 1]), hand[:, 2].astype(np.uint32))


def test_bf16_term_unit_bit_exact(pairs):
    """rho (BF16) x x_j (BF16) rounded once into binary32: exact normal products, rounded subnormals
    (ties, sticky bits), underflow to signed zeros, saturation to +-FLT_MAX."""
    rho, xc = pairs
    want = golden_terms(rho, xc)
    classes = term_classes(want)
    assert min(classes.values()) >= 20, classes
    # terms that needed rounding: the exact product is not a binary32 value
    exact = BF16.decode(rho) * BF16.decode(xc)
    rounded = (want.view(np.float32).astype(np.float64) != exact) & (np.abs(exact) < TINY)
    assert rounded.sum() > 100
    np.testing.assert_array_equal(ResidualTermBF16.model(rho, xc), want)     # the unit's model is golden's
    got = run_terms(ResidualTermBF16(config()), rho, xc)
    bad = np.nonzero(got != want)[0]
    assert len(got) == len(want) and not len(bad), [(hex(rho[i]), hex(xc[i]), hex(got[i]), hex(want[i]))
                                                     for i in bad[:5]]
    np.testing.assert_array_equal(got[:len(HAND)], np.array(HAND)[:, 2])


class NoSticky(ResidualTermBF16):
    """The bits below the round bit are ignored: a tie is broken to even even when it is not a tie."""

    @staticmethod
    def sticky(tz, eb):
        return 0


class Truncates(ResidualTermBF16):
    """Subnormal terms are truncated, never rounded up."""

    @staticmethod
    def round_up(round_bit, sticky, lsb):
        return 0


class TiesAway(ResidualTermBF16):
    """Ties round away from zero."""

    @staticmethod
    def round_up(round_bit, sticky, lsb):
        return round_bit


@pytest.mark.parametrize("unit", [NoSticky, Truncates, TiesAway], ids=lambda c: c.__name__)
def test_the_term_check_catches_a_broken_rounding(unit, pairs):
    rho, xc = pairs
    got = run_terms(unit(config()), rho, xc)
    assert (got != golden_terms(rho, xc)).sum() > 0


# -- the engine -------------------------------------------------------------------------------------------

def special_vector(rng, cols):
    """BF16 values: +-0, subnormals (the smallest, the largest), the smallest normal, the largest finite
    (+-3.39e38), 1, and a quarter of random finite codes."""
    codes = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80])
    c = rng.choice(codes, cols)
    other = rng.random(cols) < 0.25
    e = rng.integers(0, 255, other.sum())
    c[other] = (rng.integers(0, 2, other.sum()) << 15) | (e << 7) | rng.integers(0, 128, other.sum())
    return BF16.decode(c).astype(np.float32)


def far_vector(rng, cols, g):
    """Plain activations but for block column 1, which spans 200 binades (2^100 beside 2^-100): there
    the block dot unit's window drops a bit, so it takes its exact serial path (and stalls its front end)."""
    x = BF16.quantize(rng.standard_normal(cols))
    far = BF16.quantize(rng.standard_normal(g) * np.exp2(rng.choice([-100.0, 0.0, 100.0], g)))
    far[:2] = 2.0 ** 100, -(2.0 ** 100)
    x[g:2 * g] = far
    return x.astype(np.float32)


def test_random_layers_with_residuals_both_points_and_a_table_swap():
    """Over every code, bank and sign; 40 rows (two tiles and a partial one) with 60 residual entries
    whose terms saturate, go subnormal or vanish; then a plain layer (a table swap between); then an
    e2m3-ue4m4-g16 engine (one bank, 6-bit codes)."""
    rng = np.random.default_rng(31)
    a = with_residuals(random_layer(SOP4, 40, 32, rng), rng, 60)
    xa = np.concatenate([bf16_vectors(rng, 1, 32), special_vector(rng, 32)[None]])
    xa[0, ::5] = BF16.quantize(xa[0, ::5] * 2.0 ** -20)                # terms under 2^-126 too
    terms = dot.residual_terms(a, xa)[1].reshape(-1)
    exact = np.repeat(BF16.decode(a.sparse.value_bf16)[None], 2, 0).reshape(-1) * \
        xa[:, a.sparse.index % a.cols].reshape(-1).astype(np.float64)
    t = np.abs(terms.astype(np.float64))
    assert (t == FLOAT32_MAX).any() and ((t > 0) & (t < TINY)).any() and ((t == 0) & (exact != 0)).any()
    assert ((terms.astype(np.float64) != exact) & (exact != 0) & (t < FLOAT32_MAX)).any()   # rounded ones
    b = random_layer(SOP4, 18, 16, rng)
    check(GemvEngine(config()), [Job(a, xa), Job(b, bf16_vectors(rng, 1, 16))], seed=9)
    check(GemvEngine(config(FP6)), [Job(random_layer(FP6, 18, 32, rng), bf16_vectors(rng, 2, 32))], seed=2)


def cancelling_layer(rng, rows=20, cols=64) -> LayerStream:
    """sop4-g16 tables with ``t[i + 8] = -t[i]``: row 0 cancels inside each block (codes ``i, i + 8`` in
    pairs under equal activations), row 1 across blocks (block ``2k + 1`` the negatives of ``2k``, the
    same scale), row 2 by the block sign, row 3 all zero codes (a zero block), the rest random."""
    lay = SOP4.layout
    luts = np.zeros((2, 16), np.int64)
    for b in range(2):
        pos = rng.integers(1, 1 << (SOP4.hif.bits - 1), 8)
        pos[0] = 0                                   # codes 0 and 8: +0 and -0
        luts[b, :8], luts[b, 8:] = pos, pos | (1 << (SOP4.hif.bits - 1))
    nb = cols // 16
    headers, codes = [], []
    for r in range(rows):
        for b in range(nb):
            base = np.random.default_rng(100 * r + b - b % 2).integers(0, 8, 16)
            sign = 0
            if r == 0:
                c = base.reshape(-1, 2)[:, :1].repeat(2, 1).reshape(-1) + 8 * (np.arange(16) % 2)
            elif r == 1:
                c = base + 8 * (b % 2)
            elif r == 2:
                c, sign = base, b % 2
            elif r == 3:
                c = np.zeros(16, np.int64)
            else:
                c, sign = rng.integers(0, 16, 16), int(rng.integers(0, 2))
            headers.append(int(lay.make_header(9 + (b // 2) % 3, sign, (b // 2) % 2)))
            codes.append(c)
    blocks = pack_blocks(lay, np.array(headers), np.array(codes))
    return LayerStream(lay, SOP4.hif, luts, 3, rows, cols, blocks)


def test_corners_largest_subnormal_cancellation_zero_blocks_and_slow_blocks():
    """Largest and subnormal activations at offsets that saturate and go subnormal; cancellation to
    exactly zero (inside a block, across blocks, by the block sign), a zero block and a zero vector;
    blocks on the block dot unit's slow path between fast ones."""
    rng = np.random.default_rng(33)
    g = 16
    pair = np.repeat(BF16.quantize(rng.standard_normal(16) * 4), 2).astype(np.float32)       # equal pairs
    paired = np.concatenate([pair[:16], pair[:16], pair[16:], pair[16:]])                  # block 2k + 1 = 2k
    cancel = cancelling_layer(rng)
    y = dot.gemv(cancel, paired, "bf16")
    assert (y[:4] == 0).all() and not np.signbit(y[:4]).any()
    largest = random_layer(SOP4, 18, 32, rng, offset=20)
    tiny = random_layer(SOP4, 18, 32, rng, offset=0)
    far = random_layer(SOP4, 20, 64, rng, offset=0)
    x_far = far_vector(rng, 64, g)
    slow = dot_slow_blocks(far, x_far)
    assert far.rows // 2 < slow <= far.rows, slow     # slow and fast blocks mixed
    x_max = np.where(np.arange(32) % 3 == 0, -1, 1) * np.float32(BF16.max)
    # subnormal activations and +-0
    x_sub = BF16.decode(rng.integers(0, 0x80, 32) | (rng.integers(0, 2, 32) << 15)).astype(np.float32)
    ylarge = dot.gemv(largest, x_max[None], "bf16")
    assert (np.abs(ylarge) == FLOAT32_MAX).any()
    ytiny = dot.gemv(tiny, x_sub[None], "bf16")
    assert ((ytiny != 0) & (np.abs(ytiny) < TINY)).any()
    jobs = [Job(cancel, np.stack([paired, np.zeros(64, np.float32)])),
            Job(largest, np.stack([x_max, special_vector(rng, 32)]).astype(np.float32)),
            Job(tiny, x_sub[None]), Job(far, np.stack([x_far, bf16_vectors(rng, 1, 64)[0]]))]
    check(GemvEngine(config()), jobs, seed=4)


def dot_slow_blocks(layer: LayerStream, x) -> int:
    """Blocks of ``layer`` against ``x`` that the BF16 block dot unit computes on its slow path."""
    from sop.golden.layout import unpack_blocks
    from sop.hdl.block_dot_bf16 import takes_fallback

    lay = layer.layout
    headers, codes = unpack_blocks(lay, layer.blocks)
    scale, sign, select = lay.split_header(headers)
    hif = np.asarray(layer.luts)[select[:, None], codes]
    xc = dot.activation_codes(np.asarray(x).reshape(-1, lay.group), "bf16")
    xc = np.tile(xc, (layer.rows, 1))
    return int(takes_fallback(lay, layer.hif, hif, xc, scale, np.full(len(scale), layer.offset)).sum())


# -- a real layer -------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def minilm_query():
    """The first 40 rows of MiniLM's layer-0 query quantized to sop4-g16, without and with 2 % sparse
    residuals, and that layer's real inputs (the BERT forward pass's, quantize/e2e.py) for the tokens of
    a sentence, rounded to BF16."""
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.sparse import add_sparse
    from sop.quantize.weights import layer_inputs, minilm_linear_weights

    w = minilm_linear_weights()[QUERY_LAYER][:40].astype(np.float32)
    res = get_quant_format("sop4-g16").quantize(w)
    x = BF16.quantize(layer_inputs(QUERY_LAYER)).astype(np.float32)
    return res.stream, add_sparse(res.stream, w, res.recon, int(0.02 * w.size))[0], x


def test_real_minilm_layer_with_real_bf16_activations_under_stalls(minilm_query):
    layer, sparse_layer, x = minilm_query
    assert x.shape[1] == layer.cols == 384 and len(sparse_layer.sparse) > 300
    # real BF16 activations are not E4M3 values: the test would pass an E4M3-only x path by no accident
    assert (dot.ACT_FORMATS["e4m3"].quantize(x) != x).mean() > 0.5
    tr = check(GemvEngine(config(max_cols=512)), [Job(layer, x[[1, 5]]), Job(sparse_layer, x[[3]])], seed=3,
               p_idle=0.3, p_stall=0.3)
    assert len(tr.y) == 120


def test_the_engine_check_catches_a_broken_term_unit():
    """A term unit that truncates, or one without the sticky bit, in the engine: a layer whose tables
    hold only zeros, so each row's ``y`` is the sum of its residual terms, tiny ones (rounded into
    binary32's subnormal range) among them. (Beside a row's block sum of ordinary size a subnormal
    term's last bit vanishes in the FP32 addition: the term unit's own test is the sharp one.)"""
    rng = np.random.default_rng(31)
    base = random_layer(SOP4, 18, 32, rng)
    zero = LayerStream(base.layout, base.hif, np.zeros_like(base.luts), base.offset, base.rows, base.cols,
                       base.blocks)
    a = with_residuals(zero, rng, 40)
    x = BF16.quantize(rng.standard_normal((1, 32)) * 2.0 ** -14).astype(np.float32)
    jobs = [Job(a, x)]
    y = dot.gemv(a, x, "bf16")
    assert ((y != 0) & (np.abs(y) < TINY)).any()
    assert rows_wrong(GemvEngine(config()), jobs) == 0
    for unit in (Truncates, NoSticky):
        assert rows_wrong(GemvEngine(config(), term=unit), jobs) > 0, unit.__name__


# -- throughput, latency, errors, Verilog -------------------------------------------------------------------

def test_one_block_a_cycle_and_the_stated_latency():
    """Two full tiles of 8 blocks per row, three vectors, nothing idle: one block a cycle (the fast
    path), each pass's last row ``latency`` (53: the BF16 block dot unit's 30) cycles after its last block."""
    dut = GemvEngine(config())
    assert dut.latency == 1 + 3 + 30 + 2 + 17
    assert no_bubble(dut, 34, 128) == []


class E4M3NanCheck(BlockSequencer):
    """The x NaN check of E4M3 codes (S.1111.111) applied to BF16 codes."""

    def not_finite(self, code):
        return code[:7] == 0x7F


@pytest.mark.parametrize("sequencer", [BlockSequencer, E4M3NanCheck], ids=["engine", "e4m3-check"])
def test_x_nan_flags_bf16_inf_and_nan(sequencer):
    """A vector with +Inf, -Inf or a NaN (an exponent of all ones) sets ``x_nan``; a vector with the largest
    finite values, -0 and subnormals does not; ``clear`` clears it. Each vector's pass (one row of two
    blocks) runs so that the next one has an x page."""
    dut = GemvEngine(config(), sequencer=sequencer)
    rng = np.random.default_rng(5)
    seen = []

    async def bench(ctx):
        async def vector(codes, swap):
            for k, beat in enumerate(gemv_config.x_beats(dut.config, codes)):
                ctx.set(dut.x.valid, 1)
                ctx.set(dut.x.payload.codes.as_value(), beat)
                ctx.set(dut.x.payload.last, int(k == 1))
                ctx.set(dut.x.payload.swap, int(swap and k == 0))
                await ctx.tick().until(dut.x.ready)
            ctx.set(dut.x.valid, 0)
            for _ in range(3):
                await ctx.tick()
            seen.append(ctx.get(dut.status.errors.x_nan))
            ctx.set(dut.clear, 1)
            await ctx.tick()
            ctx.set(dut.clear, 0)
            ctx.set(dut.w.valid, 1)
            ctx.set(dut.w.payload, 0)
            for _ in range(2):
                await ctx.tick().until(dut.w.ready)
            ctx.set(dut.w.valid, 0)
            await ctx.tick().until(dut.y.valid)

        ctx.set(dut.y.ready, 1)
        ctx.set(dut.layer.valid, 1)
        ctx.set(dut.layer.payload.rows, 1)
        ctx.set(dut.layer.payload.blocks_per_row, 2)
        await ctx.tick()
        ctx.set(dut.layer.valid, 0)
        await ctx.tick()
        good = np.array([0x7F7F, 0xFF7F, 0x0001, 0x807F, 0x8000, 0x3F80, 0x7F00, 0x0080] * 4)
        await vector(good, True)
        for bad in (0x7F80, 0xFF80, 0x7FC1, 0xFFFF):
            codes = good.copy()
            codes[int(rng.integers(0, 32))] = bad
            await vector(codes, False)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    if sequencer is BlockSequencer:
        assert seen == [0, 1, 1, 1, 1]
    else:
        assert seen != [0, 1, 1, 1, 1]


def test_the_named_bf16_engine_converts_to_verilog_with_its_manifest():
    cfg = gemv_configs()["gemv-sop4-g16-bf16"]
    assert cfg.act == "bf16" and cfg.layout == SOP4.layout and cfg.hif == SOP4.hif
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dut = GemvEngine(cfg)
        text = verilog.convert(dut, name=gemv.module_name(cfg), emit_src=False)
    assert "module sop_gemv_sop4_g16_bf16(" in text
    doc = gemv.describe(cfg, dut)
    assert doc["parameters"]["act"] == "bf16" and doc["latency_cycles"] == 53 == sum(doc["latency_stages"].values())
    ports = {p["name"]: p["width"] for p in doc["ports"]}
    assert ports["x__payload"] == 16 * 16 + 2                     # 16 BF16 codes, last, swap
