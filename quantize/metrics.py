"""Weight-error metrics, per layer and aggregated over layers.

For a weight ``W`` and its reconstruction ``Q`` (both ``(out, in)``), and the
per-input-channel activation mean square ``m_j`` (quantize/calib.py; ``m = 1``
without calibration), with ``a_j = sqrt(m_j)``:

* ``sqnr_db = 10 log10(sum W^2 / sum (W - Q)^2)`` (infinite when Q == W);
* ``rel_mse = sum (W - Q)^2 / sum W^2``;
* ``acos``: the activation-weighted cosine, the cosine between ``W diag(a)``
  and ``Q diag(a)`` flattened: ``sum m_j W_ij Q_ij / sqrt(sum m_j W_ij^2 *
  sum m_j Q_ij^2)`` (1 when both sides are all zero, 0 when only one is; the
  same definition as quantize/sop_search.py uses to pick a codebook pair);
* ``max_abs_err = max |W - Q|``.

**Range.** Every sum is kept scaled by one power of two per layer (``2^-2k``
with ``2^k`` above the layer's largest magnitude, exact), and the weighted ones
by a second (``unit_scaled``: the largest ``m_j`` brought into [0.5, 1), exact),
so that no square overflows to Inf and the layer's own squares do not underflow: the metrics are
right for any finite float64 layer, from ``1e-300`` to ``1e300``, under any finite ``m`` (only ACos
uses it, and a cosine does not change when ``m`` is scaled), to float64's precision: an error more
than about 2^-537 below the layer's largest magnitude squares to zero (a float64 layer of such a
range alone; float32, float16 and bfloat16 layers cannot reach it), and ``max_abs_err`` resolves
errors to about 2^-1074 times that magnitude.
An all-zero reconstruction of a nonzero layer is ``0 dB``, an exact one ``inf``
dB; a NaN is never produced.
A non-finite reconstruction is a bug of the quantizer and raises
``RuntimeError``. ``ErrorStats.of`` works through the layer in row chunks of
about ``CHUNK`` weights: its temporaries do not grow with the layer.

``ErrorStats`` keeps the sums, so stats add up over layers: the aggregate is
computed from the summed numerators and denominators over all selected layers
(aggregate SQNR = ``10 log10(sum over layers of sum W^2 / sum over layers of
sum (W - Q)^2)``, not a mean of per-layer decibels), likewise ``rel_mse`` and
``acos`` (the cosine of the concatenated weighted matrices), and the maximum of
``max_abs_err``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 18          # weights per chunk of ErrorStats.of (a few MB of float64 temporaries)


@dataclass(frozen=True)
class ErrorStats:
    signal: float = 0.0          # sum W^2           (these two: times 2^-scale_exp)
    noise: float = 0.0           # sum (W - Q)^2
    wq: float = 0.0              # sum m_j W Q       (these three: times 2^-weighted_exp)
    ww: float = 0.0              # sum m_j W^2
    qq: float = 0.0              # sum m_j Q^2
    max_abs_err: float = 0.0     # unscaled
    weights: int = 0
    bits: int = 0
    scale_exp: int = 0           # signal and noise are the true sums times 2^-scale_exp
    weighted_exp: int = 0        # wq, ww and qq are the true sums times 2^-weighted_exp

    @classmethod
    def of(cls, w, q, act_ms=None, bits: int = 0) -> "ErrorStats":
        w, q = np.asarray(w), np.asarray(q)
        if w.shape != q.shape:
            raise ValueError(f"reconstruction shape {q.shape} differs from the weight's {w.shape}")
        m = np.ones(w.shape[-1]) if act_ms is None else np.asarray(act_ms, dtype=np.float64)
        if m.shape != (w.shape[-1],):
            raise ValueError(f"activation statistics of length {m.shape} for {w.shape[-1]} input channels")
        if (m < 0).any() or not np.isfinite(m).all():
            raise ValueError("activation mean squares must be finite and non-negative")
        m, j = unit_scaled(m)
        w2 = w.reshape(-1, w.shape[-1]) if w.ndim else w.reshape(1, 1)
        q2 = q.reshape(w2.shape)
        # The power of two 2^k above every magnitude: scaling by 2^-k is exact.
        peaks = abs_max(w2), abs_max(q2)
        peak = max(peaks)                   # (Python's max drops a NaN after a number: each is checked)
        if not all(math.isfinite(p) for p in peaks):
            raise RuntimeError("a weight or its reconstruction is not finite: the quantizer must not "
                               "produce one (a bug)")
        k = math.frexp(peak)[1] if peak > 0 else 0
        sums = np.zeros(5)
        max_err = 0.0
        step = max(1, CHUNK // max(1, w2.shape[1]))
        for r in range(0, w2.shape[0], step):
            ws = np.ldexp(w2[r:r + step].astype(np.float64), -k)
            qs = np.ldexp(q2[r:r + step].astype(np.float64), -k)
            d = ws - qs
            sums += (float((ws * ws).sum()), float((d * d).sum()), float(((ws * qs) @ m).sum()),
                     float(((ws * ws) @ m).sum()), float(((qs * qs) @ m).sum()))
            if d.size:
                max_err = max(max_err, float(np.abs(d).max()))
        return cls(*(float(x) for x in sums), max_abs_err=math.ldexp(max_err, k), weights=int(w.size),
                   bits=int(bits), scale_exp=2 * k, weighted_exp=2 * k + j)

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        def added(xs, ex, ys, ey):          # both brought to the larger scale (exact: powers of two)
            e = max(ex, ey)
            return [math.ldexp(x, ex - e) + math.ldexp(y, ey - e) for x, y in zip(xs, ys)], e

        plain, e = added((self.signal, self.noise), self.scale_exp, (other.signal, other.noise), other.scale_exp)
        weighted, we = added((self.wq, self.ww, self.qq), self.weighted_exp,
                             (other.wq, other.ww, other.qq), other.weighted_exp)
        return ErrorStats(*plain, *weighted, max_abs_err=max(self.max_abs_err, other.max_abs_err),
                          weights=self.weights + other.weights, bits=self.bits + other.bits, scale_exp=e,
                          weighted_exp=we)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def rel_mse(self) -> float:
        return self.noise / self.signal if self.signal > 0 else (0.0 if self.noise == 0 else math.inf)

    @property
    def acos(self) -> float:
        return cosine(self.wq, self.ww, self.qq)

    @property
    def bpw(self) -> float:
        return self.bits / self.weights if self.weights else 0.0

    def as_dict(self) -> dict:
        return {"bpw": self.bpw, "sqnr_db": self.sqnr_db, "rel_mse": self.rel_mse, "acos": self.acos,
                "max_abs_err": self.max_abs_err}


def cosine(wq: float, ww: float, qq: float) -> float:
    """``wq / sqrt(ww * qq)``: the cosine from its three sums (quantize/sop_search.py scores pairs with it
    too). Two zero sides are identical (1), a zero against a nonzero 0. Where ``ww * qq`` would overflow or
    fall below float64's normal range, the two roots are taken apart (the product's own bits otherwise)."""
    if ww <= 0 or qq <= 0:
        return 1.0 if ww <= 0 and qq <= 0 else 0.0
    d = ww * qq
    if sys.float_info.min <= d < math.inf:
        return float(wq / math.sqrt(d))
    return float(wq / math.sqrt(ww) / math.sqrt(qq))


def unit_scaled(a: np.ndarray) -> tuple[np.ndarray, int]:
    """``(a * 2^-j, j)`` with ``2^j`` the power of two that puts ``a``'s largest entry in [0.5, 1) (``j`` = 0
    for an ``a`` of zeros): exact (entries more than 2^1074 below the largest become zero), so every
    comparison of sums weighted by ``a`` comes out as it would unscaled, and none of those sums overflows."""
    peak = float(a.max()) if a.size else 0.0
    j = math.frexp(peak)[1] if peak > 0 else 0
    return (np.ldexp(a, -j) if j else a), j


def abs_max(x: np.ndarray) -> float:
    """max |x| without a temporary the size of ``x`` (NaN if ``x`` holds one)."""
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


def aggregate(stats) -> ErrorStats:
    """Sum ErrorStats over layers."""
    total = ErrorStats()
    for s in stats:
        total = total + s
    return total
