#!/usr/bin/env python3
"""What rounding a codebook into HIF costs: SQNR loss per HIF width, on real weights.

This is the measurement behind the default LUT output format (docs/hif.md).
Every codebook is rounded into HIF once (``get_codebook(name, hif)``); the
question is how much quantization quality that rounding gives up against the
exact (float64) table, and which HIF width is the smallest that gives up
essentially nothing.

Data: the 37 linear weight matrices of all-MiniLM-L6-v2 (10.8M weights), all of
them, no subsampling.

Quantizer (deliberately simple, the same for every table):

* blocks of ``G = 16`` consecutive weights along the input dimension;
* a float64 *signed* block scale ``s = w[argmax|w|] / peak`` (``peak`` = the
  table's largest positive entry), so the block's largest-magnitude weight
  lands on the table's largest positive entry;
* each weight becomes the nearest table entry to ``w / s`` (for a HIF-rounded
  table: ``Codebook.quantize``, the project's rounding rule; for the exact
  table: a nearest search over the raw float64 values), times ``s``.

Aggregate SQNR over all layers = ``10 log10(sum w^2 / sum (w - q)^2)``;
loss = SQNR(exact table) - SQNR(HIF-rounded table).

Run: ``.venv/bin/python bench/hif_sqnr.py [--out FILE.md]`` (about a minute).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sop.argtypes import ToolParser, output_checked
from sop.golden.bof4 import lloyd
from sop.golden.codebooks import FIXED_4BIT, Codebook, get_codebook
from sop.golden.files import write_atomic
from sop.golden.formats import ELEMENT_FORMATS, FloatFormat
from sop.golden.hif import DEFAULT_HIF, HIF_BIAS, HIF_EBITS, hif_format
from sop.quantize.weights import minilm_linear_weights
from sop.terminal import run_command

G = 16                                   # block size along the input dimension
#: the columns: every table the SOP pair search draws from (one added to it joins at the end) and E2M3's
CODEBOOKS = tuple(dict.fromkeys(("nf4", "fp4", "int4", "bof4", "bof4-s", "split87", "sh4", *FIXED_4BIT, "e2m3")))
MBITS = range(2, 9)                      # HIF widths 6 .. 12 bits
MAX_LOSS_DB = 0.05                       # the acceptance rule for a HIF width
SCALE_MBITS = 4                          # UE4M4 block scale: 4 mantissa bits
SCALE_EBITS = 4
CHUNK_BLOCKS = 4096                      # 64K weights per step: temporaries stay in cache
DD4_SAMPLE = 1 << 20                     # normalized values the DD4 k-means sees
DD4_SEED = 20250511

Nearest = Callable[[np.ndarray], np.ndarray]


# -- data --------------------------------------------------------------------

def weight_blocks(layers: dict[str, np.ndarray], g: int = G) -> np.ndarray:
    """All layers' weights as one float64 (n_blocks, g) array, blocks along the input dim."""
    out = []
    for name, w in layers.items():
        if w.shape[1] % g:
            raise ValueError(f"{name}: input dimension {w.shape[1]} is not a multiple of {g}")
        out.append(w.astype(np.float64).reshape(-1, g))   # rows are contiguous: row-wise blocks
    return np.concatenate(out)


def signed_max(blocks: np.ndarray) -> np.ndarray:
    """Per block, the element of largest magnitude, with its sign."""
    idx = np.abs(blocks).argmax(axis=1)
    return blocks[np.arange(len(blocks)), idx]


# -- quantizer ---------------------------------------------------------------

def exact_nearest(raw) -> Nearest:
    """Nearest value of the unrounded float64 table (midpoint search, saturating).

    Ties go to the lower value; with real data they have measure zero, and this
    reference must not pass through any rounded format.
    """
    table = np.unique(np.asarray(raw, dtype=np.float64))   # sorted; +0 and -0 merge
    mid = (table[:-1] + table[1:]) / 2
    return lambda x: table[np.searchsorted(mid, x)]


def codebook_nearest(cb: Codebook) -> Nearest:
    """Nearest entry of the HIF-rounded table, by the project's rule (``encode``)."""
    return cb.quantize


def squared_error(blocks: np.ndarray, smax: np.ndarray, peak: float, nearest: Nearest) -> float:
    """Sum over all weights of (w - q)^2 for the signed-scale block quantizer."""
    err = 0.0
    for i in range(0, len(blocks), CHUNK_BLOCKS):
        w = blocks[i:i + CHUNK_BLOCKS]
        s = smax[i:i + CHUNK_BLOCKS] / peak
        s = np.where(s == 0, 1.0, s)[:, None]   # an all-zero block is exact under any scale
        q = nearest(w / s) * s
        err += float(np.square(w - q).sum())
    return err


def sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


# -- the DD4 stand-in ----------------------------------------------------------

def fit_dd4(blocks: np.ndarray, smax: np.ndarray, levels: int = 16) -> np.ndarray:
    """16-level Lloyd-Max (1-D k-means, unweighted) on signed-max-normalized weights.

    Stands for the per-layer fitted DD4 tables; one fit over all layers is
    enough to see how a fitted, irregular table survives HIF rounding. The top
    level is pinned at +1: every block puts one value exactly there, and the
    quantizer maps the block maximum onto the table's peak anyway.
    """
    smax = np.where(smax == 0, 1.0, smax)
    x = (blocks / smax[:, None]).ravel()
    rng = np.random.default_rng(DD4_SEED)
    x = np.sort(rng.choice(x, size=min(DD4_SAMPLE, x.size), replace=False))
    init = np.quantile(x, (np.arange(levels) + 0.5) / levels)
    init[-1] = 1.0
    pinned = init == 1.0
    return lloyd(x, np.ones_like(x), init, pinned, iters=500, tol=1e-10)


# -- decode datapath cost (estimates) -----------------------------------------

def lut_storage_bits(width: int) -> int:
    """2 banks x 2 (double buffering) x 16 entries x width."""
    return 2 * 2 * 16 * width


def multiplier_size(mbits: int) -> tuple[int, int]:
    """HIF significand (hidden bit + M) times UE4M4 significand (hidden bit + 4)."""
    return mbits + 1, SCALE_MBITS + 1


def multiplier_lut4(mbits: int) -> int:
    """Estimate: an a x b array multiplier costs about a*b LUT4 (one per partial-product bit)."""
    a, b = multiplier_size(mbits)
    return a * b


def exponent_adder_bits(ebits: int = HIF_EBITS) -> int:
    """HIF exponent + scale exponent, plus one carry bit."""
    return max(ebits, SCALE_EBITS) + 1


# -- measurement ---------------------------------------------------------------

def is_exact(hif: FloatFormat, values: np.ndarray) -> bool:
    """True when every value is a HIF value (rounding leaves it unchanged)."""
    return bool(np.array_equal(hif.quantize(values), values))


def raw_tables(dd4: np.ndarray) -> dict[str, np.ndarray]:
    tables = {name: np.asarray(get_codebook(name).raw) for name in CODEBOOKS}
    tables["dd4"] = dd4
    return tables


def measure(blocks: np.ndarray, smax: np.ndarray, tables: dict[str, np.ndarray]):
    """SQNR of each exact table, and the loss of each table in each HIF width.

    ``loss[mbits][name]`` is None where the table does not fit the HIF at all
    (a raw value beyond the HIF's largest value, refused by ``Codebook``).
    """
    signal = float(np.square(blocks).sum())
    exact = {name: sqnr_db(signal, squared_error(blocks, smax, float(raw.max()), exact_nearest(raw)))
             for name, raw in tables.items()}
    loss = {}
    for m in MBITS:
        hif = hif_format(m)
        loss[m] = {}
        for name, raw in tables.items():
            try:
                cb = Codebook.from_values(name, raw, hif)
            except ValueError:
                loss[m][name] = None
                continue
            noise = squared_error(blocks, smax, cb.peak, codebook_nearest(cb))
            loss[m][name] = exact[name] - sqnr_db(signal, noise)
    return exact, loss


def recommend(loss) -> int | None:
    """Smallest mbits where every table loses <= MAX_LOSS_DB and E2M1/E2M3 are exact."""
    for m in MBITS:
        hif = hif_format(m)
        fits = all(v is not None and v <= MAX_LOSS_DB for v in loss[m].values())
        exact = all(is_exact(hif, ELEMENT_FORMATS[f].values) for f in ("e2m1", "e2m3"))
        if fits and exact:
            return m
    return None


# -- report --------------------------------------------------------------------

def _fmt_loss(v: float | None) -> str:
    return "refused" if v is None else f"{v:.3f}"


def report(exact, loss, n_weights: int, n_layers: int, dd4: np.ndarray) -> str:
    names = list(exact)
    lines = [f"HIF rounding loss (dB) on all-MiniLM-L6-v2: {n_layers} linear layers, "
             f"{n_weights:,} weights, g={G}, signed block max, loss = SQNR(exact) - SQNR(HIF)", ""]
    head = (["HIF bits", "E/M/bias"] + names +
            ["max loss", "E2M1 exact", "E2M3 exact", "LUT bits", "mult", "~LUT4"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| exact | float64 | " + " | ".join(f"{exact[n]:.2f} dB" for n in names)
                 + " | | | | | | |")
    for m in MBITS:
        hif = hif_format(m)
        vals = [loss[m][n] for n in names]
        worst = "refused" if None in vals else f"{max(vals):.3f}"
        a, b = multiplier_size(m)
        row = ([str(hif.bits), f"E{HIF_EBITS}M{m} b{HIF_BIAS}"] + [_fmt_loss(v) for v in vals] +
               [worst] + ["yes" if is_exact(hif, ELEMENT_FORMATS[f].values) else "no"
                          for f in ("e2m1", "e2m3")] +
               [str(lut_storage_bits(hif.bits)), f"{a}x{b}", str(multiplier_lut4(m))])
        lines.append("| " + " | ".join(row) + " |")
    rec = recommend(loss)
    lines += ["",
              "The 'exact' row is SQNR(exact table) in dB; the other rows are losses in dB "
              "('refused': a raw entry exceeds the HIF's largest value).",
              f"LUT bits = 2 banks x 2 (double buffer) x 16 entries x width; mult = (M+1) x "
              f"({SCALE_MBITS}+1) significand multiply against a UE4M4 scale; ~LUT4 = a*b "
              f"(array-multiplier estimate); exponent adder = max(E, {SCALE_EBITS}) + 1 = "
              f"{exponent_adder_bits()} bits at every width.",
              "dd4 (Lloyd-Max fit, 16 levels): " + ", ".join(f"{v:.4f}" for v in dd4), ""]
    if rec is None:
        lines.append(f"No width in {MBITS.start + 4} .. {MBITS.stop + 3} bits meets the rule.")
    else:
        hif = hif_format(rec)
        lines.append(f"Smallest width meeting the rule: {hif.bits} bits, E{HIF_EBITS}M{rec} bias "
                     f"{HIF_BIAS}: every codebook loses <= {MAX_LOSS_DB} dB and E2M1/E2M3 are exact.")
    lines.append(f"Project default: {DEFAULT_HIF.name}, {DEFAULT_HIF.bits} bits (docs/hif.md: "
                 f"the next width up costs no LUT RAM and leaves 8x margin).")
    return "\n".join(lines) + "\n"


def report_inputs(script: str) -> list[Path]:
    """The files a report of ``script`` (this one, or codebook_sqnr.py, which imports it) reads: no
    ``--out`` may be one of them (``--out bench/codebook_sqnr.py`` replaced the script with its report)."""
    from importlib import resources

    from sop.quantize.models import model_inputs

    return [Path(script), Path(__file__), *model_inputs("minilm"),
            Path(str(resources.files("sop.golden").joinpath("data/bof4.json")))]


def main(argv=None) -> int:
    ap = ToolParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.out:                                # before the measurement: a FIFO or a folder is refused, not opened
        output_checked(ap, args.out, inputs=report_inputs(__file__))

    t0 = time.perf_counter()
    layers = minilm_linear_weights()
    blocks = weight_blocks(layers)
    smax = signed_max(blocks)
    dd4 = fit_dd4(blocks, smax)
    exact, loss = measure(blocks, smax, raw_tables(dd4))
    text = report(exact, loss, blocks.size, len(layers), dd4)
    text += f"\nRuntime: {time.perf_counter() - t0:.1f} s\n"
    print(text, end="")
    if args.out:
        write_atomic(args.out, text.encode())
    return 0


if __name__ == "__main__":
    run_command("python bench/hif_sqnr.py", main)
