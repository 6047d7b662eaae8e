"""The compact FP32 adder and the row accumulator built on it (hdl/fp32_acc.py: ``Fp32Add("compact")``,
``RowAccumulator(slots, adder="compact")``) in amaranth.sim, bit for bit against golden.dot.

The compact adder is the full one's stage code with most stage registers made wires; it must
give the same sums (``add_model``) on the pairs the full adder is checked on
(tests/test_hdl_block_dot.py: random, ``x + -x``, near cancellation, subnormals, sums beyond
FLT_MAX, signed zeros) under random stalls. The row accumulator with it: interleaved rows
(``first``/``last`` tags) under input gaps and output stalls, real MiniLM block values, one row
at a time, its ``schedule``, a ring longer than the minimum, and the refusal of too few slots.
A compact adder that drops the sticky bit is caught.
"""

import numpy as np
import pytest
from test_hdl_block_dot import fp32_pairs, interleave, real_activations, run_adder, run_rows

from sop.golden import dot
from sop.hdl import fp32_acc
from sop.hdl.fp32_acc import ADD_LATENCY, Fp32Add, RowAccumulator, min_slots

COMPACT = min_slots("compact")          # the fewest running sums the ring takes with the compact adder (4)


def test_adder_latencies_and_minimum_slots():
    """The full adder is the 16-stage one (the engine's ``MIN_TILE`` stays 17); the compact one has
    3 registers, so its ring needs 4 slots."""
    assert fp32_acc.adder_latency() == fp32_acc.adder_latency("full") == ADD_LATENCY == 16
    assert fp32_acc.adder_latency("compact") == 3
    assert min_slots() == min_slots("full") == 17 and COMPACT == 4
    with pytest.raises(ValueError, match="one of 'full', 'compact'"):
        fp32_acc.adder_latency("tiny")


def test_compact_adder_bit_exact():
    """The same 2000 pairs as the full adder's test (seed 21), every result class present."""
    a, b = fp32_pairs(np.random.default_rng(21), 2000)
    want = fp32_acc.add_model(a, b)
    v = want.view(np.float32)
    assert (v == np.finfo(np.float32).max).any() and (np.abs(v[v != 0]) < np.finfo(np.float32).tiny).any()
    assert ((v == 0) & np.signbit(v)).any() and ((v == 0) & ~np.signbit(v)).any()       # -0 + -0, x + -x
    dut = Fp32Add("compact")
    assert dut.latency == 3
    np.testing.assert_array_equal(run_adder(dut, a, b, seed=3), want)


class CompactDropsSticky(Fp32Add):
    @staticmethod
    def round_up(lsb, guard, sticky):
        return guard & lsb


def test_the_compact_adder_check_catches_a_dropped_sticky_bit():
    a, b = fp32_pairs(np.random.default_rng(22), 300)
    assert (run_adder(CompactDropsSticky("compact"), a, b) != fp32_acc.add_model(a, b)).any()


@pytest.mark.parametrize("slots", [COMPACT, COMPACT + 3])
def test_compact_row_accumulator_interleaved_rows(slots):
    """``slots`` rows of 6 values interleaved, then 2 rows of 3 (a short tile), under random input
    gaps and output stalls: golden's sums; back to back with no stalls, one value a cycle as
    ``schedule`` says (a ring longer than the minimum has ``slots - 4`` more registers)."""
    rng = np.random.default_rng(slots)
    parts = [interleave(rng.standard_normal(shape).astype(np.float32) * 2.0 ** rng.integers(-30, 30, shape),
                        slots) for shape in ((slots, 6), (2, 3))]
    vals, slot, first, last = (np.concatenate([p[k] for p in parts]) for k in range(4))
    want = fp32_acc.model(vals, slot, first, last)
    dut = RowAccumulator(slots, adder="compact")
    got, _ = run_rows(dut, vals, slot, first, last, seed=slots)
    assert got == want
    got, taken = run_rows(RowAccumulator(slots, adder="compact"), vals, slot, first, last, p_idle=0, p_stall=0)
    assert got == want
    n = 6 * slots
    np.testing.assert_array_equal(taken[:n], np.arange(n))                  # no bubbles
    np.testing.assert_array_equal(taken, dut.schedule(slot))


@pytest.fixture(scope="module")
def minilm_stream():
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    w = minilm_linear_weights()["encoder.layer.0.attention.self.query.weight"][:6].astype(np.float32)
    return get_quant_format("sop4-g16").quantize(w).stream


def test_compact_row_accumulator_on_real_block_values(minilm_stream):
    """MiniLM sop4-g16 with 2 E4M3 activation vectors: 12 rows of 24 blocks in tiles of 4, under
    stalls: golden.dot.gemv's y bit for bit."""
    x = real_activations(np.random.default_rng(5), 2, minilm_stream.cols)
    V = dot.block_values(minilm_stream, x, "e4m3")
    y = dot.gemv(minilm_stream, x, "e4m3")
    vals, slot, first, last, order = interleave(V.reshape(-1, V.shape[-1]), COMPACT)
    got, _ = run_rows(RowAccumulator(COMPACT, adder="compact"), vals, slot, first, last, seed=2)
    assert got == fp32_acc.model(vals, slot, first, last)
    np.testing.assert_array_equal(np.array([v for v, _ in got], np.uint32), y.reshape(-1)[order].view(np.uint32))


def test_compact_row_accumulator_order_and_one_row_at_a_time():
    """Golden's order (1 + 2^-24 + 2^-24 ties to even twice: 1.0), saturation, -0 sums to +0; every
    value in slot 0: one value per turn of the 4-slot ring."""
    big = np.finfo(np.float32).max
    V = np.array([[1.0, 2.0 ** -24, 2.0 ** -24], [big, big, -1.0], [-0.0, -0.0, -0.0]], np.float32)
    vals = V.reshape(-1).view(np.uint32)
    first, last = [b == 0 for b in range(3)] * 3, [b == 2 for b in range(3)] * 3
    dut = RowAccumulator(COMPACT, adder="compact")
    assert dut.latency == COMPACT                                      # the operand register and 3
    got, taken = run_rows(dut, vals, [0] * 9, first, last, p_idle=0, p_stall=0)
    assert got == [(0x3F800000, 0), (0x7F7FFFFF, 0), (0x00000000, 0)] == fp32_acc.model(vals, [0] * 9, first, last)
    assert (np.diff(taken) == COMPACT).all()
    np.testing.assert_array_equal(taken, dut.schedule([0] * 9))


def test_compact_row_accumulator_refuses_fewer_slots_than_the_adder_latency():
    with pytest.raises(ValueError, match=f"at least its operand register and the adder's latency, {COMPACT}"):
        RowAccumulator(COMPACT - 1, adder="compact")
    with pytest.raises(ValueError, match="adder stages 'tiny'"):
        RowAccumulator(COMPACT, adder="tiny")
