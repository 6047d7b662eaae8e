"""HIF, the hardware-efficient LUT output format: how LUT entries are stored and read out.

A HIF value is a small sign-magnitude float, ``[sign][exponent E][mantissa M]``
with bias ``b``: ``(1 + m/2^M) 2^(e-b)`` for ``e > 0``, ``(m/2^M) 2^(1-b)`` for
``e == 0`` (so code 0 and the sign-only code are ±0). Every code is a number:
no Inf, no NaN, the all-ones exponent is an ordinary binade (a LUT never needs
specials, and the datapath needs no special-case logic).

The default, chosen in docs/hif.md from bench/hif_sqnr.py, is E3 with bias 5:
normal exponents -4 .. 2, so the E2M1 (0.5 .. 6) element values are exact for M >= 1
and the E2M3 (0.125 .. 7.5) ones for M >= 3, and normalized codebooks (entries in [-1, 1],
smallest nonzero NF4 entry 0.0796 = 1.27 * 2^-4) sit in normal binades.
"""

from __future__ import annotations

from .formats import FloatFormat

HIF_EBITS = 3
HIF_BIAS = 5


def hif_format(mbits: int, ebits: int = HIF_EBITS, bias: int = HIF_BIAS) -> FloatFormat:
    """The HIF with ``mbits`` mantissa bits (width ``1 + ebits + mbits``)."""
    if not (1 <= ebits <= 5 and 0 <= mbits <= 10):
        raise ValueError(f"HIF widths out of range: E{ebits} M{mbits} (E 1..5, M 0..10)")
    if not 0 <= bias < 1 << ebits:
        raise ValueError(f"HIF bias {bias} out of range for E{ebits}: 0 .. {(1 << ebits) - 1} (the "
                         f"largest binade must reach 1, and a negative bias would add nothing below it)")
    return FloatFormat(name=f"hif-e{ebits}m{mbits}b{bias}", bits=1 + ebits + mbits,
                       ebits=ebits, mbits=mbits, bias=bias, specials="finite")


#: The project's LUT output format: 10 bits, S1 E3 M6, bias 5 (see docs/hif.md).
DEFAULT_HIF_MBITS = 6
DEFAULT_HIF = hif_format(DEFAULT_HIF_MBITS)
