"""What quantizing one layer returns, whatever the format: the common currency of quantize/.

Every format's quantizer (baselines and SOP points alike) maps a (out, in)
float weight matrix, and optionally the per-input-channel activation mean
square, to a ``QuantResult``. ``recon`` is the exact reconstruction the
format's decoder produces, float64, or float32 where float32 holds every value
exactly (the SOP points without sparse entries: each value is a LUT entry times
a block scale; ``blockwise.products_fit_float32``), which halves what a layer
costs in memory; cast to float64 it is the same array, bit for bit; ``bits`` counts every bit stored for the layer
(elements, block headers, per-layer tables and scales, sparse entries, padding);
``stream`` is the golden layer stream where the format has one (SOP points),
so that ``golden.decoder.decode_layer(stream)`` equals ``recon`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sop.golden.layout import LayerStream


@dataclass
class QuantResult:
    recon: np.ndarray                    # (out, in) float64 (or float32 where exact), the decoded weights
    bits: int                            # every stored bit of the layer
    choice: str = ""                     # what was chosen, for reports (e.g. "nf4+dd4")
    stream: LayerStream | None = None    # the golden stream, for formats the hardware decodes
    extra: dict = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return self.bits / self.recon.size
