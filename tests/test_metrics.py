"""quantize.metrics: SQNR, relative MSE, activation-weighted cosine and max error, worked by hand,
and aggregation over layers from summed energies (not from averaged decibels)."""

import math

import numpy as np
import pytest

from sop.quantize.metrics import ErrorStats, aggregate


def test_one_layer_by_hand():
    s = ErrorStats.of([[3.0, 4.0]], [[3.0, 3.0]], bits=9)
    assert s.sqnr_db == pytest.approx(10 * math.log10(25 / 1))
    assert s.rel_mse == pytest.approx(1 / 25)
    assert s.acos == pytest.approx(21 / (5 * math.sqrt(18)))   # (9 + 12) / (|W| |Q|)
    assert s.max_abs_err == 1.0
    assert s.bpw == 4.5


def test_acos_weights_input_columns_by_activation_rms():
    w, q = np.eye(2), np.array([[1.0, 0.0], [0.0, 0.0]])
    assert ErrorStats.of(w, q).acos == pytest.approx(1 / math.sqrt(2))
    # a = (2, 1): W diag(a) = [[2, 0], [0, 1]], Q diag(a) = [[2, 0], [0, 0]] -> 4 / (sqrt(5) * 2)
    assert ErrorStats.of(w, q, act_ms=[4.0, 1.0]).acos == pytest.approx(4 / (math.sqrt(5) * 2))
    # an input channel that never carries activation does not count at all
    assert ErrorStats.of(w, q, act_ms=[1.0, 0.0]).acos == pytest.approx(1.0)
    # the unweighted metrics ignore the activations
    assert ErrorStats.of(w, q, act_ms=[4.0, 1.0]).sqnr_db == ErrorStats.of(w, q).sqnr_db


def test_aggregate_sqnr_sums_energies_over_layers():
    a = ErrorStats.of([[10.0]], [[9.0]], bits=4)       # 20 dB
    b = ErrorStats.of([[1.0]], [[0.5]], bits=8)        # 6.02 dB
    t = aggregate([a, b])
    assert a.sqnr_db == pytest.approx(20.0)
    assert t.sqnr_db == pytest.approx(10 * math.log10(101 / 1.25))   # 19.07 dB, not the 13.0 dB mean
    assert t.rel_mse == pytest.approx(1.25 / 101)
    assert t.max_abs_err == 1.0 and t.bpw == 6.0 and t.weights == 2
    assert t.acos == pytest.approx((90 + 0.5) / math.sqrt(101 * 81.25))


def test_exact_and_degenerate_cases():
    assert ErrorStats.of([[1.0, -2.0]], [[1.0, -2.0]]).sqnr_db == math.inf
    assert ErrorStats.of([[1.0, 2.0]], [[0.0, 0.0]]).acos == 0.0
    assert ErrorStats.of([[0.0, 0.0]], [[0.0, 0.0]]).acos == 1.0
    assert ErrorStats.of([[0.0, 0.0]], [[1.0, 1.0]]).sqnr_db == -math.inf    # no signal, some noise


def test_aggregate_acos_weighs_each_layer_by_its_own_activations():
    """Layers' sums are kept scaled by powers of two of their own; the aggregate takes them back to one
    scale: here sum m w q = 1e6, sum m w^2 = sum m q^2 = 1e6 + 2 over both layers, by hand."""
    a = ErrorStats.of([[1.0, 0.0]], [[1.0, 0.0]], act_ms=[1e6, 1e6])
    b = ErrorStats.of([[1.0, 1.0]], [[1.0, -1.0]], act_ms=[1.0, 1.0])
    assert aggregate([a, b]).acos == pytest.approx(1e6 / (1e6 + 2), rel=1e-12)


def test_bad_shapes_and_statistics_are_refused():
    with pytest.raises(ValueError, match="shape"):
        ErrorStats.of(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="input channels"):
        ErrorStats.of(np.ones((2, 3)), np.ones((2, 3)), act_ms=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        ErrorStats.of(np.ones((1, 2)), np.ones((1, 2)), act_ms=[1.0, -1.0])


@pytest.mark.parametrize("scale", [2.0 ** -1000, 1e-300, 1e160, 1e300])
def test_acos_does_not_see_the_scale_of_the_activations(scale):
    """ACos is a cosine: scaling every m_j by one constant changes nothing (the weighted sums were
    Inf or 0 past 1e154 or below 1e-154: ACos 0, or a ZeroDivisionError)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 64))
    q = w + 0.05 * rng.standard_normal(w.shape)
    m = rng.uniform(0.1, 2.0, 64)
    ref = ErrorStats.of(w, q, m)
    s = ErrorStats.of(w, q, m * scale)
    if math.frexp(scale)[0] == 0.5:                      # a power of two: the same bits
        assert s.acos == ref.acos
    assert s.acos == pytest.approx(ref.acos, abs=1e-15) and 0.99 < s.acos < 1
    both = aggregate([s, ErrorStats.of(2 * w, q, m * scale)]).acos          # layers of one scale of m
    assert both == pytest.approx(aggregate([ref, ErrorStats.of(2 * w, q, m)]).acos, abs=1e-15) and 0.8 < both < 0.99
