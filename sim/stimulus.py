"""Stimulus shared by the amaranth.sim tests and the cocotb regression: layers and coverage.

A ``Layer`` is one layer's worth of decoder input (LUT images, per-layer
offset, block headers and codes); its expected output comes from
hdl.reference, i.e. from golden/ only. ``random_layer`` draws one,
``corner_layer`` covers every code x bank x sign at the scale codes' extremes,
``from_stream`` takes a real quantized layer. ``coverage`` measures which
(code, bank, sign, scale-exponent) bins a set of layers exercises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sop.golden.codebooks import get_codebook
from sop.golden.layout import LayerStream, unpack_blocks
from sop.hdl import reference
from sop.hdl.config import DecoderConfig


@dataclass
class Layer:
    luts: np.ndarray            # (banks, 2**k) HIF codes
    offset: int
    headers: np.ndarray         # (n,)
    codes: np.ndarray           # (n, g)
    name: str = ""

    def writes(self):
        """The host's load sequence: every LUT word, then the offset."""
        out = [("lut", b, a, int(self.luts[b, a])) for b in range(self.luts.shape[0])
               for a in range(self.luts.shape[1])]
        return out + [("offset", self.offset)]

    def expected(self, cfg: DecoderConfig) -> list[list[int]]:
        return reference.expected_beats(cfg, self.luts, self.offset, self.headers, self.codes)


def pad_to_beats(cfg: DecoderConfig, headers, codes):
    """Repeat the last block so the layer fills whole input beats (N > g)."""
    extra = -len(headers) % cfg.blocks_per_beat
    if extra:
        headers = np.concatenate([headers, np.repeat(headers[-1:], extra)])
        codes = np.concatenate([codes, np.repeat(codes[-1:], extra, axis=0)])
    return headers, codes


def from_stream(cfg: DecoderConfig, stream: LayerStream, name: str = "") -> Layer:
    headers, codes = pad_to_beats(cfg, *unpack_blocks(stream.layout, stream.blocks))
    return Layer(np.asarray(stream.luts, dtype=np.int64), stream.offset, headers, codes, name)


def random_layer(cfg: DecoderConfig, rng: np.random.Generator, n_blocks: int, offset=None,
                 luts=None) -> Layer:
    lay = cfg.layout
    scale_codes = rng.integers(0, 1 << lay.scale.bits, n_blocks)
    headers = lay.make_header(scale_codes, rng.integers(0, 2, n_blocks) * lay.signed_scale,
                              rng.integers(0, 2, n_blocks) * lay.select_bit)
    codes = rng.integers(0, 1 << lay.code_bits, (n_blocks, lay.group))
    if luts is None:
        luts = rng.integers(0, 1 << cfg.hif.bits, (lay.banks, 1 << lay.code_bits))
    if offset is None:
        offset = int(rng.integers(-40, 20))
    headers, codes = pad_to_beats(cfg, headers, codes)
    return Layer(np.asarray(luts, dtype=np.int64), offset, headers, codes, "random")


def corner_layer(cfg: DecoderConfig, offset: int) -> Layer:
    """Every code, both banks, both signs, the scale codes at both extremes (zero included)."""
    lay = cfg.layout
    n_codes = 1 << lay.code_bits
    rows = np.arange(n_codes).reshape(-1, lay.group) if n_codes >= lay.group else \
        np.resize(np.arange(n_codes), (1, lay.group))
    headers, codes = [], []
    for sc in (0, 1, (1 << lay.scale.bits) - 2, (1 << lay.scale.bits) - 1):
        for sign in ((0, 1) if lay.signed_scale else (0,)):
            for sel in ((0, 1) if lay.select_bit else (0,)):
                for row in rows:
                    headers.append(int(lay.make_header(sc, sign, sel)))
                    codes.append(row)
    if lay.code_bits == 6:
        luts = get_codebook("e2m3").hif_codes[None, :]
    else:
        luts = np.stack([get_codebook("nf4").hif_codes, get_codebook("sh4").hif_codes])[:lay.banks]
    headers, codes = pad_to_beats(cfg, np.array(headers), np.array(codes))
    return Layer(np.asarray(luts, dtype=np.int64), offset, headers, codes, f"corners{offset:+d}")


def coverage(cfg: DecoderConfig, layers: list[Layer]) -> tuple[int, int]:
    """(bins hit, bins in all) over code x bank x sign x scale-exponent field."""
    lay = cfg.layout
    n_exp = 1 << lay.scale.ebits
    n_sign = 2 if lay.signed_scale else 1
    hit = np.zeros((1 << lay.code_bits, lay.banks, n_sign, n_exp), dtype=bool)
    for layer in layers:
        scale_code, sign, select = lay.split_header(layer.headers)
        e = scale_code >> lay.scale.mbits
        idx = (layer.codes, select[:, None] + 0 * layer.codes, sign[:, None] + 0 * layer.codes,
               e[:, None] + 0 * layer.codes)
        hit[idx] = True
    return int(hit.sum()), hit.size
