"""No silent non-finite or wrong numbers: a finite weight never becomes Inf or NaN in any output of any
format (float32 files saturate, like BF16), the metrics are right at the ends of float64's range, and
never report a failure as a success (docs/formats.md section 4, docs/robustness.md)."""

import math
from fractions import Fraction

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.formats import FLOAT32_MAX, to_float32
from sop.quantize import artifact as A
from sop.quantize.schemes import quant_formats
from sop.quantize.metrics import ErrorStats, aggregate

LAYER = "blk.0.fc.weight"
FORMATS = list(quant_formats())


@pytest.fixture(scope="module")
def near_max(tmp_path_factory):
    """A float32 layer whose largest weights are within 3 % of float32's maximum, both signs."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 64))
    w = w / np.abs(w).max() * 0.97 * FLOAT32_MAX
    w[0, :4] = [FLOAT32_MAX, -FLOAT32_MAX, np.nextafter(FLOAT32_MAX, 0), 0.0]
    path = tmp_path_factory.mktemp("max") / "max.safetensors"
    save_file({LAYER: w.astype(np.float32)}, str(path))
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_near_the_float32_maximum_stay_finite_in_every_format(near_max, tmp_path, capsys, fmt):
    budget = ["--budget", "5"] if fmt == "sop-budget" else []
    art, out = tmp_path / "q.sopq", tmp_path / "w.safetensors"
    assert main(["quantize", str(near_max), "--format", fmt, "--out", str(art), "--quiet", *budget]) == 0
    said = capsys.readouterr().out
    sqnr = float(said.split("SQNR ")[1].split(" dB")[0])
    assert math.isfinite(sqnr) and sqnr > 5, said                  # a real figure, not nan or inf
    assert main(["dequantize", str(art), "--out", str(out), "--quiet"]) == 0
    w = load_file(str(out))[LAYER]
    assert np.isfinite(w).all()
    assert np.abs(w).max() <= FLOAT32_MAX
    a = A.open_artifact(art)
    for e in a.layers:                                   # the hardware's BF16 output saturates too
        if (s := a.stream(e)) is not None:
            assert np.isfinite(decode_layer(s, "bf16")).all() and np.isfinite(decode_layer(s, "exact")).all()


def test_the_float32_output_rule_rounds_to_nearest_and_saturates():
    big = float(np.nextafter(np.float32(FLOAT32_MAX), np.float32(0)))     # the float32 below the maximum
    half_ulp = (FLOAT32_MAX - big) / 2
    x = np.array([FLOAT32_MAX + half_ulp * 0.99, FLOAT32_MAX * 2, -1e300, 1e-50, -0.0, 1.0 + 2.0 ** -24,
                  1.0 + 3 * 2.0 ** -24, np.nan])
    y = to_float32(x)
    assert y.dtype == np.float32
    assert y[0] == FLOAT32_MAX and y[1] == FLOAT32_MAX and y[2] == -FLOAT32_MAX
    assert y[3] == 0 and np.signbit(y[4])
    assert y[5] == np.float32(1.0) and y[6] == np.float32(1.0 + 2.0 ** -22)      # ties to even
    assert np.isnan(y[7])
    with np.errstate(over="ignore"):
        plain = x.astype(np.float32)                        # the check catches a cast that does not saturate
    assert np.isinf(plain[1])


# -- the metrics --------------------------------------------------------------------------------------------

def exact_sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    """SQNR from exact rational sums: the reference, free of overflow and underflow."""
    sig = sum(Fraction(float(v)) ** 2 for v in w.ravel())
    noise = sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(w.ravel(), q.ravel()))
    return 10 * (math.log10(sig.numerator) - math.log10(sig.denominator)
                 - math.log10(noise.numerator) + math.log10(noise.denominator))


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1.0, 1e150, 1e300])
def test_sqnr_is_right_across_the_float64_range(scale):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((6, 16)) * scale
    q = w * (1 + rng.standard_normal(w.shape) * 1e-3)
    s = ErrorStats.of(w, q)
    assert s.sqnr_db == pytest.approx(exact_sqnr_db(w, q), abs=1e-9)
    assert 0.999 < s.acos <= 1.0
    total = aggregate([s, ErrorStats.of(w / scale, q / scale)])        # layers of very different scales add
    assert total.sqnr_db == pytest.approx(exact_sqnr_db(np.concatenate([w / scale, w]),
                                                         np.concatenate([q / scale, q])), abs=1e-9)


def test_an_all_zero_reconstruction_of_a_nonzero_layer_is_0_db_not_inf():
    w = np.full((2, 16), 1e-300)
    s = ErrorStats.of(w, np.zeros_like(w))
    assert s.sqnr_db == 0.0 and s.acos == 0.0 and s.rel_mse == 1.0
    unscaled = float((w * w).sum()), float(((w - 0) ** 2).sum())        # what squaring directly gives
    assert unscaled == (0.0, 0.0)                                          # ... the old "inf dB"


def test_a_non_finite_reconstruction_is_a_bug_not_a_figure():
    w = np.ones((2, 16))
    q = w.copy()
    q[1, 3] = np.inf
    with pytest.raises(RuntimeError, match="not finite"):
        ErrorStats.of(w, q)
