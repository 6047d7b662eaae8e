"""quantize.dd4: the Lloyd-Max table recovers a layer drawn from 16 points and fits real-like data."""

import numpy as np
import pytest

from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import named_layouts
from sop.quantize.blockwise import encode_layer, prepare
from sop.quantize.dd4 import fit_dd4, initial_levels, subsample, table
from sop.quantize.schemes import get_quant_format

SOP4 = named_layouts()["sop4-g16"]


def sixteen_point_layer(seed, rows=96, cols=128):
    """Every weight is one of 16 HIF levels (top +1, asymmetric) times its block's scale,
    and every block holds the top level, so its covering scale is exactly that scale."""
    rng = np.random.default_rng(seed)
    # 15 jittered, distinct HIF levels in [-0.8, 0.95) plus the pinned top
    base = np.linspace(-0.78, 0.9, 15) + rng.uniform(-0.02, 0.02, 15)
    levels = np.append(DEFAULT_HIF.quantize(base), 1.0)
    n_blocks = rows * cols // 16
    p = rng.uniform(0.1, 1.0, 15)                 # unequal populations: quantiles miss some levels
    idx = rng.choice(15, (n_blocks, 16), p=p / p.sum())
    idx[np.arange(n_blocks), rng.integers(0, 16, n_blocks)] = 15
    ue3m3 = SOP4.scale
    scales = ue3m3.values[rng.integers(24, 56, n_blocks)] * 2.0 ** -7       # normal UE3M3 values
    return levels, (levels[idx] * scales[:, None]).reshape(rows, cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dd4_recovers_sixteen_points(seed):
    levels, w = sixteen_point_layer(seed)
    cb = fit_dd4(w, iters=40, max_weights=w.size)
    np.testing.assert_array_equal(cb.values, levels)
    # and the layer then encodes without error
    assert np.array_equal(decode_layer(encode_layer(w, SOP4, [cb, cb])), w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovery_check_would_catch_a_fit_that_does_not_iterate(seed):
    # the quantile start is not the answer: the recovery above takes Lloyd steps
    levels, w = sixteen_point_layer(seed)
    assert not np.array_equal(table(initial_levels(prepare(w, SOP4), iters=0)).values, levels)


@pytest.mark.parametrize("seed, df, shape", [(3, 5, (64, 256)), (0, 3, (64, 128))])
def test_top_level_is_pinned_and_table_is_hif(seed, df, shape):
    """Pinned through the block refinement too (heavier tails: a refinement that let it go gave 0.984)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(df, shape) * 0.03
    cb = fit_dd4(w)
    assert cb.values.max() == 1.0 and cb.peak == 1.0
    assert np.array_equal(cb.values, DEFAULT_HIF.quantize(cb.values))        # LUT values are HIF
    assert np.array_equal(np.sort(cb.values), cb.values)


def test_dd4_is_better_than_its_start_and_than_nf4_alone():
    rng = np.random.default_rng(4)
    w = rng.standard_t(5, (64, 256)) * 0.03
    prep = prepare(w, SOP4)
    start = get_codebook("nf4")
    hist = []
    cb = fit_dd4(w, init=start.values, history=hist, max_weights=w.size, iters=8)
    assert min(e for e, _ in hist) < hist[0][0]

    def err(c):
        return ((decode_layer(encode_layer(w, SOP4, [c, c])) - w) ** 2).sum()

    assert err(cb) < err(start)
    assert len(initial_levels(subsample(prep, 1 << 12))) == 16


def test_activation_weighted_fit_follows_the_weighted_columns():
    # Columns 0-7 of every block hold values from one 16-point grid, columns 8-15 from
    # another; weighting one half makes DD4 fit that half's grid.
    levels_a, wa = sixteen_point_layer(6, rows=64, cols=128)
    levels_b, wb = sixteen_point_layer(7, rows=64, cols=128)
    cols = np.arange(128) % 16 < 8
    w = np.where(cols, wa, wb)
    a = np.where(cols, 1.0, 1e-6)
    cb = fit_dd4(w, a, iters=10, max_weights=w.size)
    near_a = np.abs(cb.values[:, None] - levels_a[None]).min(axis=1).mean()
    near_b = np.abs(cb.values[:, None] - levels_b[None]).min(axis=1).mean()
    assert near_a < near_b


def test_levels_closer_than_hif_spacing_still_make_sixteen_entries():
    """Levels closer than HIF's spacing rounded to one value: a repeated entry, a code wasted.
    ``table`` moves a repeated value to the next HIF value below, the top staying at +1. A layer of
    four clusters of near-equal weights: the SOP4 search's DD4 bank held 10 distinct entries of 16,
    at 4.5 times this error (3.9e-5 against 8.7e-6)."""
    cb = table(np.r_[np.linspace(-1, 0.5, 13), 0.7001, 0.7002, 1.0])
    assert np.array_equal(cb.values[-3:], [0.6953125, 0.703125, 1.0]) and len(set(cb.values)) == 16
    assert np.array_equal(cb.values[:13], DEFAULT_HIF.quantize(np.linspace(-1, 0.5, 13)))   # the others as rounded
    rng = np.random.default_rng(0)
    w = rng.choice([-1.0, -0.5, 0.5, 1.0], size=(64, 256)) * (1 + 1e-2 * rng.standard_normal((64, 256)))
    res = get_quant_format("sop4-g16").quantize(w)
    assert res.choice == "nf4+dd4" and len(set(DEFAULT_HIF.decode(res.stream.luts[1]))) == 16
    assert ((res.recon - w) ** 2).mean() < 1e-5
