"""The decoder's reference: beats in and lane words out, computed only by golden/.

One model serves the amaranth.sim unit tests and the cocotb regression: it
turns golden block arrays into the input beats a ``DecoderConfig`` takes and
the output beats it must produce, as plain integers (the bit patterns on the
wires), so a testbench only compares integers.

* ``input_beats``: the packed blocks (golden.layout.pack_blocks) cut into
  beats of ``blocks_per_beat`` blocks, each an integer, LSB first.
* ``expected_beats``: golden.decoder's values for every code, grouped ``lanes``
  per output beat, each lane as its output word: the BF16 code, or the exact
  product fields packed ``sig | exp << P | sign << (P + E)`` (the order of
  ``DecoderConfig.lane_layout``).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Shape

from sop.golden.decoder import decode_blocks, product_fields
from sop.golden.formats import FORMATS
from sop.golden.layout import pack_blocks

from .config import DecoderConfig


def input_beats(cfg: DecoderConfig, headers, codes) -> list[int]:
    data = pack_blocks(cfg.layout, headers, codes)
    step = cfg.blocks_per_beat * cfg.layout.block_bytes
    if len(data) % step:
        raise ValueError(f"{len(headers)} blocks do not fill whole beats of {cfg.blocks_per_beat}")
    return [int.from_bytes(data[i:i + step], "little") for i in range(0, len(data), step)]


def lane_words(cfg: DecoderConfig, luts, offset: int, headers, codes) -> np.ndarray:
    """Expected output word of every code, (n_blocks * g,) as Python ints in an object array."""
    if cfg.output == "bf16":
        values = decode_blocks(cfg.hif, luts, cfg.layout, offset, headers, codes, "bf16")
        return FORMATS["bf16"].encode(values).astype(np.int64).reshape(-1)
    sign, sig, exp, _ = product_fields(cfg.hif, luts, cfg.layout, offset, headers, codes)
    return pack_exact(cfg, sign, sig, exp).reshape(-1)


def pack_exact(cfg: DecoderConfig, sign, sig, exp) -> np.ndarray:
    """Exact-output lane words: ``sig | exp << P | sign << (P + E)``, the exponent in E-bit two's
    complement (``DecoderConfig.lane_layout``; docs/hardware.md)."""
    P, E = cfg.sig_bits, cfg.exp_shape.width
    sign, sig, exp = (np.asarray(a, dtype=np.int64) for a in (sign, sig, exp))
    return (sig | ((exp & ((1 << E) - 1)) << P) | (sign << (P + E))).astype(np.int64)


def expected_beats(cfg: DecoderConfig, luts, offset: int, headers, codes) -> list[list[int]]:
    words = lane_words(cfg, luts, offset, headers, codes)
    return [[int(w) for w in words[i:i + cfg.lanes]] for i in range(0, len(words), cfg.lanes)]


def lane_word_bits(cfg: DecoderConfig) -> int:
    return Shape.cast(cfg.lane_layout).width


def split_lanes(cfg: DecoderConfig, payload: int) -> list[int]:
    """The ``lanes`` output words of one output beat's payload integer."""
    w = lane_word_bits(cfg)
    return [(payload >> (i * w)) & ((1 << w) - 1) for i in range(cfg.lanes)]
