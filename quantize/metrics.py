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

``ErrorStats`` keeps the sums, so stats add up over layers: the aggregate is
computed from the summed numerators and denominators over all selected layers
(aggregate SQNR = ``10 log10(sum over layers of sum W^2 / sum over layers of
sum (W - Q)^2)``, not a mean of per-layer decibels), likewise ``rel_mse`` and
``acos`` (the cosine of the concatenated weighted matrices), and the maximum of
``max_abs_err``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorStats:
    signal: float = 0.0          # sum W^2
    noise: float = 0.0           # sum (W - Q)^2
    wq: float = 0.0              # sum m_j W Q
    ww: float = 0.0              # sum m_j W^2
    qq: float = 0.0              # sum m_j Q^2
    max_abs_err: float = 0.0
    weights: int = 0
    bits: int = 0

    @classmethod
    def of(cls, w, q, act_ms=None, bits: int = 0) -> "ErrorStats":
        w = np.asarray(w, dtype=np.float64)
        q = np.asarray(q, dtype=np.float64)
        if w.shape != q.shape:
            raise ValueError(f"reconstruction shape {q.shape} differs from the weight's {w.shape}")
        m = np.ones(w.shape[-1]) if act_ms is None else np.asarray(act_ms, dtype=np.float64)
        if m.shape != (w.shape[-1],):
            raise ValueError(f"activation statistics of length {m.shape} for {w.shape[-1]} input channels")
        if (m < 0).any() or not np.isfinite(m).all():
            raise ValueError("activation mean squares must be finite and non-negative")
        d = w - q
        return cls(signal=float((w * w).sum()), noise=float((d * d).sum()),
                   wq=float(((w * q) @ m).sum()), ww=float(((w * w) @ m).sum()),
                   qq=float(((q * q) @ m).sum()),
                   max_abs_err=float(np.abs(d).max()) if d.size else 0.0,
                   weights=int(w.size), bits=int(bits))

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(self.signal + other.signal, self.noise + other.noise, self.wq + other.wq,
                          self.ww + other.ww, self.qq + other.qq,
                          max(self.max_abs_err, other.max_abs_err),
                          self.weights + other.weights, self.bits + other.bits)

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
        if self.ww <= 0 or self.qq <= 0:          # two zero matrices are identical; zero vs nonzero: 0
            return 1.0 if self.ww <= 0 and self.qq <= 0 else 0.0
        return self.wq / math.sqrt(self.ww * self.qq)

    @property
    def bpw(self) -> float:
        return self.bits / self.weights if self.weights else 0.0

    def as_dict(self) -> dict:
        return {"bpw": self.bpw, "sqnr_db": self.sqnr_db, "rel_mse": self.rel_mse, "acos": self.acos,
                "max_abs_err": self.max_abs_err}


def aggregate(stats) -> ErrorStats:
    """Sum ErrorStats over layers."""
    total = ErrorStats()
    for s in stats:
        total = total + s
    return total
