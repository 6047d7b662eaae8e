"""cocotb bench of the mutation run (sim/mutate.py): every mutant of one design in one simulation.

The design under test is the decoder with all its yosys mutants built in, one selected at run
time by the input ``mutsel`` (0: the original). For each mutant the bench

1. scrubs the tables with the original selected: a reset, then every word of both pages and
   both offsets written with values that differ from every value the regression loads at that
   address, so that a mutant whose write path is broken cannot read a word left by the run
   before it;
2. selects the mutant and resets it;
3. runs the plan's scenarios in order and stops at the first failure.

A scenario (``Scenario``) streams layers back to back with table swaps (the next layer's tables
loaded while the current one streams, as sim/tb_decoder.py does), with random input idles and
output stalls; expected beats come from golden/ only (hdl.reference). Layer kinds: ``vectors``
(the first blocks of a real quantized MiniLM layer, `sop vectors`), ``random``, ``corners``
(sim/stimulus.py), ``tables`` (every HIF code in some table) and ``rounding`` (every reachable
BF16 rounding case in every lane, ``RoundingCases``). Scenario kinds: ``stream``, ``timed``
(beat timing checked too), ``reset`` (a layer cut off by a reset with the output stalled) and,
for a configuration with residuals (``-sp``), ``error`` (a faulty sparse stream: exactly its
sticky ``sparse_error`` bit must be set) and ``throughput`` (full speed; the output's extra
cycles and the cycle each sparse entry is taken must be the merge's rule's, ``stage0_stalls``).
With residuals, layer kinds ``sparse`` (every entry pattern of sim/stimulus.py, layers without
entries between), ``bad`` (``bad_layers``), ``adder`` (``adder_layer``), ``adder-edges``
(``adder_edge_layers``, ``adder_deep_layer``) and ``throughput`` (``throughput_layers``) too,
``vectors`` keep their entries, each layer's entries go on the ``sparse`` stream from the cycle
after its swap beat (random gaps, or a scenario's fixed ones), and every good stream must leave
``sparse_error`` at 0.

A mutant is killed by the first output beat that differs from golden (any lane; an X or Z bit
counts as a difference), an output beat more than expected, a missing beat or an input that is
never taken (a cycle limit of twice the original's cycles plus 200), or, in ``timed``, a beat out
of its cycle. The original runs first (its cycles set the limits) and last; it must pass both
times, or the run is void.

One JSON line per design (``"mutant": 0`` is the original) goes to the file named by
``SOP_MUT_RESULTS`` as it is decided; the plan is the JSON file named by ``SOP_MUT_PLAN``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from sop.golden.decoder import float_fields
from sop.golden.formats import get_format
from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.hdl.sparse_merge import ERRORS
from sop.sim import CLOCK_NS, MUT_PLAN, read_plan, results_path, stimulus
from sop.sim.vectors import read_vectors


#: the decoder's sparse-residual ports (a configuration with residuals)
SPARSE_PINS = ("sparse__valid", "sparse__payload", "sparse__ready", "layer_sparse", "sparse_error")
BF16 = get_format("bf16")
BF16_INF = 0x7F80


class Killed(Exception):
    """The mutant under test failed a check: the message says which and where."""


def _layers(cfg: DecoderConfig, spec: dict, rng: np.random.Generator) -> list[stimulus.Layer]:
    kind = spec["kind"]
    if kind == "vectors":
        out = []
        for v in read_vectors(Path(spec["dir"])):
            n = min(len(v.headers), spec.get("blocks", len(v.headers)))
            n -= n % cfg.blocks_per_beat
            keep = np.asarray(v.sparse_index) < n * cfg.layout.group if cfg.residuals else []
            out.append(stimulus.Layer(v.luts, v.offset, v.headers[:n], v.codes[:n], v.name,
                                      *((np.asarray(v.sparse_index)[keep], np.asarray(v.sparse_values)[keep])
                                        if cfg.residuals else ())))
        return out[:spec.get("layers", 1)]
    if kind == "sparse":
        # each pattern of entries (stimulus.with_sparse) on a random layer, a layer without
        # entries after each
        out = []
        for pattern in spec.get("patterns", stimulus.SPARSE_PATTERNS):
            out.append(stimulus.with_sparse(cfg, stimulus.random_layer(cfg, rng, spec.get("blocks", 16)), rng,
                                            pattern, spec.get("density", 0.05)))
            if spec.get("plain", True):
                out.append(stimulus.random_layer(cfg, rng, spec.get("plain_blocks", 2)))
        return out
    if kind == "bad":
        return bad_layers(cfg, rng, spec["bad"], spec.get("blocks", 8), at=spec.get("at"),
                          next_blocks=spec.get("next_blocks"), past=spec.get("past", 5))
    if kind == "adder":
        return [adder_layer(cfg, rng, spec.get("blocks", 16)) for _ in range(spec.get("layers", 1))]
    if kind == "adder-edges":
        return adder_edge_layers(cfg, rng, spec.get("blocks", 8))
    if kind == "adder-deep":
        return [adder_deep_layer(cfg, rng, spec.get("blocks", 16), spec.get("carry", False))
                for _ in range(spec.get("layers", 4))]
    if kind == "throughput":
        return throughput_layers(cfg, rng, spec.get("blocks", 40))
    if kind == "random":
        return [stimulus.random_layer(cfg, rng, spec.get("blocks", 32), offset=spec.get("offset"))
                for _ in range(spec.get("layers", 2))]
    if kind == "tables":
        return _table_layers(cfg, rng)
    if kind == "scales":
        return [_scales_layer(cfg, rng)]
    if kind == "rounding":
        return rounding_layers(cfg, rng)
    if kind == "corners":
        return [stimulus.corner_layer(cfg, off) for off in spec.get("offsets", (-128, 0, 127))]
    raise ValueError(f"unknown layer kind {kind!r}")


def adder_layer(cfg: DecoderConfig, rng: np.random.Generator, blocks: int) -> stimulus.Layer:
    """A random layer with an entry on half its values, each residual chosen against its value's
    exact product ``p`` (golden.decoder) to reach every step of the residual adder: ``±|p| 2^k``
    with ``k`` from -30 to 30 (either operand shifted out, the sticky bit), ``-p (1 ± 2^-j)``
    (cancellation down to the last bits), ``-p`` rounded to BF16, and random values for ``p = 0``;
    one entry in five a BF16 zero or subnormal of either sign (the residual's normalization)."""
    from sop.golden.decoder import decode_blocks

    layer = stimulus.random_layer(cfg, rng, blocks)
    n = layer.codes.size
    idx = np.flatnonzero(rng.random(n) < 0.5).astype(np.int64)
    if len(idx) == 0:
        idx = np.array([0], dtype=np.int64)
    p = decode_blocks(cfg.hif, layer.luts, cfg.layout, layer.offset, layer.headers, layer.codes,
                      "exact").ravel()[idx]
    k = len(idx)
    mag = np.where(p == 0, 2.0 ** rng.integers(-40, 10, k).astype(float), np.abs(p))
    sign = rng.choice([-1.0, 1.0], k)
    j = rng.integers(1, 24, k).astype(float)
    kind = rng.integers(0, 4, k)
    r = np.select([kind == 0, kind == 1, kind == 2],
                  [sign * mag * 2.0 ** rng.integers(-30, 31, k).astype(float),
                   -p * (1 + rng.choice([-1.0, 1.0], k) * 2.0 ** -j),
                   -BF16.quantize(p)],
                  sign * mag * (1 + rng.random(k)))
    values = BF16.encode(np.clip(r, -BF16.max, BF16.max)).astype(np.int64)
    tiny = rng.random(k) < 0.2                      # ±0 and subnormals: exponent field 0
    values = np.where(tiny, (rng.integers(0, 2, k) << 15) | rng.integers(0, 1 << BF16.mbits, k), values)
    return replace(layer, sparse_index=idx, sparse_values=values.astype(np.int64), name="adder")


#: adder-edges: offsets whose products reach BF16's subnormal range (its smallest normal
#: binades and below) and its top binades (the sums that saturate); the middle ones the others have
ADDER_EDGE_OFFSETS = (-128, -126, -124, -122, -120, -118, -116, -112, 104, 112, 116, 118, 120, 122, 124, 126, 127)


def _bf16_exact(x: np.ndarray) -> np.ndarray:
    """Whether each of ``x`` is a finite BF16 value (no rounding)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x) & (np.abs(x) <= BF16.max)
    return ok & (BF16.decode(BF16.encode(np.where(ok, x, 0.0))) == np.where(ok, x, 0.0))


def edge_residuals(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """BF16 codes of residuals against exact products ``p`` (golden.decoder), for the residual
    adder's corners: the sum exactly halfway between two BF16 neighbours (a tie, either way of
    it by the smallest step a BF16 residual has there: the sticky bit), just below and above the
    saturation point (the largest normal plus half its ulp), a cancellation to a few bits (the
    result subnormal near BF16's smallest normal), ``±|p| 2^k`` for ``k`` from -12 to 12 (every
    alignment shift), residuals of any exponent from the smallest subnormal to the largest normal
    (one operand far above the other), powers of two near ``p`` (``1 - 2^-j`` sums: the sticky
    bit alone decides a tie), and subnormal residuals (each leading-zero count).
    Only the stimulus is chosen from ``p``: the expected words are golden's."""
    k = len(p)
    kind = rng.integers(0, 9, k)
    sign = rng.choice([-1.0, 1.0], k)
    q = BF16.quantize(p)
    # the BF16 grid step at q (the subnormal step below the smallest normal)
    e = np.floor(np.log2(np.maximum(np.abs(q), 2.0 ** -126)))
    ulp = 2.0 ** (np.maximum(e, -126) - BF16_M)
    mid = q + sign * ulp / 2                                  # a midpoint next to q
    sat = np.sign(np.where(p == 0, sign, p)) * 2.0 ** 127 * (2 - 2.0 ** -8)   # max + half its ulp
    tiny = 2.0 ** -133
    cands = [
        mid - p,                                              # the sum is a tie
        mid - p + sign * np.maximum(np.abs(mid - p) * 2.0 ** -7, tiny),     # just off it
        sat - p - np.sign(sat) * 2.0 ** rng.integers(119, 121, k).astype(float),  # just below saturation
        sat - p + np.sign(sat) * 2.0 ** rng.integers(119, 121, k).astype(float),  # just above
        -p * (1 - sign * 2.0 ** -rng.integers(1, 13, k).astype(float)),     # cancellation
        sign * np.where(p == 0, 2.0 ** -130, np.abs(p)) * 2.0 ** rng.integers(-12, 13, k).astype(float),
        sign * 2.0 ** rng.uniform(-133, 127.9, k),            # any exponent
        np.zeros(k),                                          # a subnormal, below
        # a power of two near p (a residual significand of one bit: the other's low bits alone
        # make the sticky bit)
        sign * 2.0 ** (np.floor(np.log2(np.where(p == 0, 2.0 ** -128, np.abs(p)))) + rng.integers(-12, 13, k))]
    r = np.choose(kind, cands)
    codes = BF16.encode(np.clip(np.where(_bf16_exact(r), r, BF16.quantize(np.clip(r, -BF16.max, BF16.max))),
                                -BF16.max, BF16.max)).astype(np.int64)
    sub = kind == 7
    codes[sub] = (rng.integers(0, 2, sub.sum()) << 15) | rng.integers(0, 1 << BF16.mbits, sub.sum())
    return codes


#: the subnormal grid's step, BF16's smallest subnormal
SUB = 2.0 ** -133


def adder_deep_layer(cfg: DecoderConfig, rng: np.random.Generator, blocks: int, carry: bool = False) -> stimulus.Layer:
    """Results deep in BF16's subnormal range, where the adder's rounding point is 16 to 23 bits
    below its accumulator's top (the last stages of its shift and sticky tree): at offset -128 to
    -126, the products in ``[2^-138, 2^-127]`` whose fraction of the subnormal step is at least a
    half (the guard bit set: an exact tie or the sticky bit decides), picked for every value, plus
    a residual ``±j 2^-133``, ``j`` 0 to 31 (the fraction kept or mirrored; ``j`` 0: ``±0``).
    ``carry``: only exact ties in ``[2^-129, 2^-128)``, each with a residual of its sign, ``j`` up
    to 15, that carries the sum past ``2^-128`` when it can (the accumulator's top bit, a tie).
    Only the stimulus is chosen from golden's products: the expected words are golden's."""
    from sop.golden.decoder import decode_blocks

    lay = cfg.layout
    off = -128 + int(rng.integers(0, 3))
    luts = rng.integers(0, 1 << cfg.hif.bits, (lay.banks, 1 << lay.code_bits)).astype(np.int64)
    # every (scale code, bank) block's 16 products
    sc, bank = np.meshgrid(np.arange(1 << lay.scale.bits), np.arange(lay.banks), indexing="ij")
    hdr = lay.make_header(sc.ravel(), 0, bank.ravel() * lay.select_bit)
    codes = np.tile(np.arange(1 << lay.code_bits), (len(hdr), lay.group // (1 << lay.code_bits)))
    p = np.abs(decode_blocks(cfg.hif, luts, lay, off, hdr, codes, "exact"))[:, :1 << lay.code_bits]
    frac = (p / SUB) % 1.0
    good = (p >= 2.0 ** -138) & (p <= 2.0 ** -127) & (frac >= 0.5)
    tie = good & (frac == 0.5)
    if carry:
        good = tie = tie & (p >= 2.0 ** -129) & (p < 2.0 ** -128)
    rows = np.flatnonzero(good.any(axis=1))
    headers, out_codes = [], []
    for _ in range(blocks):
        r = int(rng.choice(rows))
        pool = np.flatnonzero(tie[r]) if tie[r].any() and rng.random() < 0.5 else np.flatnonzero(good[r])
        headers.append(int(lay.make_header(int(sc.ravel()[r]), int(rng.integers(0, 2)) * lay.signed_scale,
                                           int(bank.ravel()[r]) * lay.select_bit)))
        out_codes.append(rng.choice(pool, lay.group))
    headers, out_codes = stimulus.pad_to_beats(cfg, np.array(headers), np.array(out_codes))
    n = out_codes.size
    values = (rng.integers(0, 2, n) << 15) | rng.integers(0, 32, n)
    if carry:
        q = decode_blocks(cfg.hif, luts, lay, off, headers, out_codes, "exact").ravel() / SUB
        j = rng.integers(np.clip(np.ceil(32 - np.abs(q)), 0, 15).astype(np.int64), 16)
        values = (np.signbit(q).astype(np.int64) << 15) | j
    return stimulus.Layer(luts, off, headers, out_codes, f"adder-deep{off:+d}", np.arange(n, dtype=np.int64),
                          values.astype(np.int64))


def adder_edge_layers(cfg: DecoderConfig, rng: np.random.Generator, blocks: int) -> list[stimulus.Layer]:
    """The residual adder's corners (``edge_residuals``) on an entry at every value: one random
    layer at each of ``ADDER_EDGE_OFFSETS``, then a layer whose products are all zero (zero-scale
    headers) carrying every subnormal residual of both signs (the sum is the residual itself: its
    normalization, each leading-zero count, alone) and residuals of every exponent."""
    from sop.golden.decoder import decode_blocks

    lay = cfg.layout
    out = []
    for off in ADDER_EDGE_OFFSETS:
        layer = stimulus.random_layer(cfg, rng, blocks, offset=off)
        n = layer.codes.size
        p = decode_blocks(cfg.hif, layer.luts, lay, layer.offset, layer.headers, layer.codes, "exact").ravel()
        out.append(replace(layer, sparse_index=np.arange(n, dtype=np.int64), sparse_values=edge_residuals(p, rng),
                           name=f"adder-edges{off:+d}"))
    layer = stimulus.random_layer(cfg, rng, 2 * blocks, offset=int(rng.integers(-128, 128)))
    nb = len(layer.headers)
    layer = replace(layer, headers=lay.make_header(np.zeros(nb, dtype=np.int64), rng.integers(0, 2, nb) * lay.signed_scale,
                                                   rng.integers(0, 2, nb) * lay.select_bit))
    n = layer.codes.size
    sub = np.arange(1 << (BF16.mbits + 1))                    # every subnormal, both signs (and ±0)
    sub = (sub >> BF16.mbits << 15) | (sub & ((1 << BF16.mbits) - 1))
    rest = BF16.encode(rng.choice([-1.0, 1.0], n) * 2.0 ** rng.uniform(-133, 127.9, n)).astype(np.int64)
    values = np.concatenate([rng.permutation(sub), rest])[:n]
    out.append(replace(layer, sparse_index=np.arange(n, dtype=np.int64), sparse_values=values, name="adder-zero"))
    return out


def stage0_stalls(cfg: DecoderConfig, layers: list[stimulus.Layer], gaps: list[int]) -> tuple[int, list[int]]:
    """Stage 0's extra cycles (passes beyond one per chunk), and the cycle each sparse entry is
    taken (``sparse.ready``; counted from the first input beat's), for ``layers`` streamed back to
    back at full speed, output always ready, their sparse entries offered with ``gaps``: the merge's
    cycle model (hdl.sparse_merge.MergeModel) on the stage-0 schedule of sim.sparse_stalls.issue_cycles
    (which tests/test_sparse_stalls.py checks against the decoder)."""
    from sop.sim.sparse_stalls import issue_cycles

    res = issue_cycles(cfg, [(L.codes.size, L.sparse_index) for L in layers], gaps=gaps)
    return res["stalls"], res["entry_cycles"]


#: throughput: the entry patterns (sim.stimulus.with_sparse, and a density) of its layers, None:
#: no entries; the pages alternate, so a layer with entries follows one without and one with, on
#: either page
THROUGHPUT_LAYERS = (None, ("random", 0.3), None, ("burst", 0.05), ("ends", 0.05), None, None, ("swap", 0.05),
                     ("random", 0.1), ("random", 0.5), "far")


def throughput_layers(cfg: DecoderConfig, rng: np.random.Generator, blocks: int) -> list[stimulus.Layer]:
    """Layers for the throughput check (``THROUGHPUT_LAYERS``), each of ``blocks`` blocks: enough
    input beats to carry the next layer's table writes, so the host never idles between layers."""
    out = []
    for spec in THROUGHPUT_LAYERS:
        if spec == "far":
            # entries 50 to 62 chunks apart, about the merge's NEAR: each waits in the inbox until
            # it is near, and the next one is taken only then (``sparse.ready``)
            from sop.hdl.sparse_merge import NEAR

            layer = stimulus.random_layer(cfg, rng, 4 * blocks)
            step = cfg.lanes * rng.integers(NEAR - 10, NEAR + 3, layer.codes.size // (cfg.lanes * (NEAR - 10)))
            idx = np.cumsum(step) - rng.integers(0, cfg.lanes, len(step))
            idx = idx[idx < layer.codes.size].astype(np.int64)
            out.append(replace(layer, sparse_index=idx, sparse_values=BF16.encode(rng.normal(0, 1, len(idx))).astype(np.int64),
                               name="far"))
            continue
        layer = stimulus.random_layer(cfg, rng, blocks)
        out.append(layer if spec is None else stimulus.with_sparse(cfg, layer, rng, *spec))
    return out


def bad_layers(cfg: DecoderConfig, rng: np.random.Generator, bad: str, blocks: int, *, at: int | None = None,
               next_blocks: int | None = None, past: int = 5) -> list[stimulus.Layer]:
    """Two layers whose sparse stream has the fault ``bad`` (one of hdl.sparse_merge.ERRORS) in the
    first: ``order`` an index equal to the one before, ``not_finite`` an infinite value,
    ``past_layer`` a last index past the layer (the second layer's swap beat ends it), ``no_layer``
    no entries (the bench offers one before the first swap beat). ``past``: how far past the
    layer (far: the entry still waits in the merge's inbox, not its window, when the layer ends).
    ``at``: the fault on the first
    entry at or above that flat index (a long layer with 40 entries; default: a tenth of the
    values have entries, the fault halfway); ``next_blocks``: the second layer's blocks (default
    half)."""
    first = stimulus.random_layer(cfg, rng, blocks)
    n = first.codes.size
    if at is None:
        index = np.sort(rng.choice(n, size=max(3, n // 10), replace=False)).astype(np.int64)
        k = len(index) // 2
    else:
        index = np.unique(np.r_[rng.choice(n, size=40, replace=False), at, at + 1 + rng.choice(n - at - 1, 3)])
        k = int(np.searchsorted(index, at)) + 1
    values = BF16.encode(rng.normal(0, 1.0, len(index))).astype(np.int64)
    if bad == "order":
        index[k] = index[k - 1]
    elif bad == "not_finite":
        values[k] = BF16_INF
    elif bad == "past_layer":
        index, values = np.append(index, n + past), np.append(values, values[0])
    elif bad == "no_layer":
        index, values = index[:0], values[:0]
    else:
        raise ValueError(f"unknown sparse fault {bad!r}; valid: {', '.join(ERRORS)}")
    first = replace(first, sparse_index=index, sparse_values=values, name=f"bad-{bad}")
    return [first, stimulus.random_layer(cfg, rng, next_blocks or max(1, blocks // 2))]


def _scales_layer(cfg: DecoderConfig, rng: np.random.Generator) -> stimulus.Layer:
    """Every header (each scale code x sign x bank) once, in an order shuffled, with random codes:
    every lane meets every scale code, subnormal scales included (the corners have the scale
    codes' extremes only). Offset 0, random tables."""
    lay = cfg.layout
    sc, sign, sel = np.meshgrid(np.arange(1 << lay.scale.bits), np.arange(1 + lay.signed_scale),
                                np.arange(lay.banks if lay.select_bit else 1), indexing="ij")
    headers = rng.permutation(lay.make_header(sc.ravel(), sign.ravel(), sel.ravel()))
    codes = rng.integers(0, 1 << lay.code_bits, size=(len(headers), lay.group))
    luts = rng.integers(0, 1 << cfg.hif.bits, size=(lay.banks, 1 << lay.code_bits))
    headers, codes = stimulus.pad_to_beats(cfg, headers, codes)
    return stimulus.Layer(luts.astype(np.int64), 0, headers, codes, "scales")


def _table_layers(cfg: DecoderConfig, rng: np.random.Generator) -> list[stimulus.Layer]:
    """Every HIF code in some table (the codes shuffled, a table full per layer), each entry
    read once per bank by blocks of random scale and sign, at random offsets."""
    lay = cfg.layout
    n_codes, per = 1 << lay.code_bits, lay.banks << lay.code_bits
    codes_all = rng.permutation(1 << cfg.hif.bits)
    codes_all = np.concatenate([codes_all, codes_all[:-len(codes_all) % per]])     # whole tables
    rows = np.resize(np.arange(n_codes), (-(-n_codes // lay.group), lay.group))
    out = []
    for i in range(0, len(codes_all), per):
        luts = codes_all[i:i + per].reshape(lay.banks, n_codes)
        headers, codes = [], []
        for bank in range(lay.banks):
            for row in rows:
                headers.append(int(lay.make_header(int(rng.integers(0, 1 << lay.scale.bits)),
                                                   int(rng.integers(0, 2)) * lay.signed_scale, bank)))
                codes.append(row)
        headers, codes = stimulus.pad_to_beats(cfg, np.array(headers), np.array(codes))
        out.append(stimulus.Layer(luts.astype(np.int64), int(rng.integers(-40, 20)), headers, codes, "tables"))
    return out


BF16_M, BF16_BIAS = 7, 127


def _where(eb: np.ndarray) -> np.ndarray:
    """Where a result of biased exponent ``eb`` lands: 1 below eb = -40; 2 .. 42 each eb from -40
    to 0 (subnormal or flushed: the shift and what it drops); 43 .. 45 the lowest three exponents;
    46 .. 52 each eb from 250 to 256 (the largest normal, saturation); 53 above; 54 elsewhere
    (0 is zero, set by the caller)."""
    return np.select([eb < -40, eb <= 0, eb <= 3, eb > 256, eb >= 250],
                     [1, eb + 42, eb + 42, 53, eb - 204], 54)


def _round(sig, t, eb):
    """(guard, sticky, kept bits r, carry, dropped bits below the guard) of rounding ``sig`` (top
    bit ``t``) to BF16 at biased exponent ``eb``."""
    drop = t - BF16_M + np.maximum(0, 1 - eb)
    d = np.clip(drop, 1, 62)
    r = np.where(drop > 0, sig >> d, sig)
    guard = np.where(drop > 0, (sig >> (d - 1)) & 1, 0)
    below = np.where(drop > 1, sig & ((1 << (d - 1)) - 1), 0)
    sticky = (below != 0).astype(np.int64)
    up = guard & (sticky | (r & 1))
    carry = np.where(eb >= 1, (r + up) >> (BF16_M + 1), (r + up) >> BF16_M) & 1
    # where the one dropped 1 below the guard is, when there is exactly one (0: just below the
    # guard; 11 and further together); 12: none; 13: more than one
    hb = np.frexp(np.maximum(below, 1).astype(np.float64))[1] - 1
    single = (below != 0) & ((below & (below - 1)) == 0)
    gap = np.where(below == 0, 12, np.where(single, np.minimum(np.clip(d - 2, 0, 62) - hb, 11), 13))
    return guard, sticky, r, carry, gap


# Families of rounding cases, each a range of bin numbers: every product lands in one bin of each.
#   A  where (_where) x top x guard x sticky x kept LSB x carry
#   B  the exact biased exponent (-45 .. 260, clipped) x top x carry: every exponent field value,
#      and the rounding carry at each (a saturation test on some exponent bits)
#   C  at exponents 252 .. 256: which one bit of the kept mantissa is 0 (none, one of 7, more)
#      x guard x sticky x LSB (the "all ones, rounded up" test of the largest normal)
#   D  depth (subnormal 1 .. 14 binades, or normal with top 0 / 1) x where the one dropped 1 below
#      the guard is (or none, or several) x guard x LSB: each dropped bit alone makes the sticky bit
N_A, N_B, N_C, N_D = 55 * 32, 307 * 4, 1 + 5 * 9 * 8, 17 * 14 * 4
N_BINS = N_A + N_B + N_C + N_D


class RoundingCases:
    """The BF16 rounding cases (families A to D above) of every (HIF code, scale code) product,
    per offset: ``bins(offset)`` is an integer array (4, HIF codes, scale codes) of bin numbers in
    ``range(N_BINS)``, from golden's exact product fields (value = sig * 2^exp) and the product of
    the normalized significands (the formatter's ``top``). Only the stimulus is chosen with it:
    the expected values come from golden."""

    def __init__(self, cfg: DecoderConfig):
        lay, hif = cfg.layout, cfg.hif
        _, sh, xh = float_fields(hif, np.arange(1 << hif.bits))
        _, ss, xs = float_fields(lay.scale, np.arange(1 << lay.scale.bits))
        self.sig = sh[:, None] * ss[None, :]
        self.t = np.frexp(np.maximum(self.sig, 1).astype(np.float64))[1] - 1          # sig's top bit
        self.eb0 = xh[:, None] + xs[None, :] + self.t + BF16_BIAS                     # at offset 0
        th = np.frexp(np.maximum(sh, 1).astype(np.float64))[1] - 1
        ts = np.frexp(np.maximum(ss, 1).astype(np.float64))[1] - 1
        self.top = (((sh << (hif.mbits - th))[:, None] * (ss << (lay.scale.mbits - ts))[None, :])
                    >> (hif.mbits + lay.scale.mbits + 1)) & 1
        self.zero = self.sig == 0
        self.normal = self._fields(self.sig, self.t, np.ones_like(self.eb0))         # any normal exponent

    @staticmethod
    def _fields(sig, t, eb):
        g, st, r, carry, gap = _round(sig, t, eb)
        low = r & ((1 << BF16_M) - 1)
        zeros = BF16_M - np.array([bin(int(v)).count("1") for v in range(1 << BF16_M)])[low]
        zpos = np.where(zeros == 0, 0, np.where(zeros == 1, 1 + (np.frexp(((1 << BF16_M) - 1 - low)
                                                                         .astype(np.float64))[1] - 1), 8))
        return g, st, r & 1, carry, gap, zpos

    def bins(self, offset: int) -> np.ndarray:
        eb = self.eb0 + offset
        g, st, lsb, carry, gap, zpos = (f.copy() for f in self.normal)
        sub = (eb <= 0) & ~self.zero
        if sub.any():
            for f, v in zip((g, st, lsb, carry, gap, zpos), self._fields(self.sig[sub], self.t[sub], eb[sub])):
                f[sub] = v
        top, zero = self.top, self.zero
        where = np.where(zero, 0, _where(eb))
        a = ((((where * 2 + top) * 2 + g) * 2 + st) * 2 + lsb) * 2 + carry
        b = N_A + ((np.where(zero, 0, np.clip(eb, -45, 260) + 46) * 2 + top) * 2 + carry)
        hi = (eb >= 252) & (eb <= 256) & ~zero
        c = N_A + N_B + np.where(hi, 1 + (((np.clip(eb - 252, 0, 4) * 9 + zpos) * 2 + g) * 2 + st) * 2 + lsb, 0)
        depth = np.where(zero, 0, np.where(eb <= 0, np.minimum(1 - eb, 14), 15 + top))
        d = N_A + N_B + N_C + ((depth * 14 + gap) * 2 + g) * 2 + lsb
        return np.stack([a, b, c, d])


def rounding_layers(cfg: DecoderConfig, rng: np.random.Generator) -> list[stimulus.Layer]:
    """Layers that hit every reachable ``RoundingCases`` bin once in every lane (BF16 output only).

    Offsets are chosen greedily (the one that adds most missing bins first); at each, scale
    codes likewise (the block header whose column of products adds most), and per missing bin
    one random HIF code of that column (its other families' bins are then had too), in a table
    slot."""
    if cfg.output != "bf16":
        return []
    lay = cfg.layout
    cases = RoundingCases(cfg)
    offsets = range(-128, 128)
    present = np.stack([np.bincount(cases.bins(o).ravel(), minlength=N_BINS) > 0 for o in offsets])
    missing = present.any(axis=0)
    plan: list[tuple[int, np.ndarray]] = []
    while missing.any():
        i = int(np.argmax((present & missing).sum(axis=1)))
        plan.append((offsets[i], present[i] & missing))
        missing &= ~present[i]
    picks_by_offset = []
    for off, want in plan:
        bins = cases.bins(off)                               # (4, HIF codes, scale codes)
        picks: list[tuple[int, int]] = []                   # (HIF code, scale code)
        while want.any():
            gain = [want[np.unique(bins[:, :, sc])].sum() for sc in range(bins.shape[2])]
            sc = int(np.argmax(gain))
            col = bins[:, :, sc]
            for c in np.unique(col):
                if want[c]:
                    h = int(rng.choice(np.flatnonzero((col == c).any(axis=0))))
                    picks.append((h, sc))
                    want[col[:, h]] = False
        picks_by_offset.append((off, picks))
    n_codes, per_table = 1 << lay.code_bits, lay.banks << lay.code_bits
    out = []
    for off, picks in picks_by_offset:
        for start in range(0, len(picks), per_table):
            batch = picks[start:start + per_table]
            slots = list(dict.fromkeys(h for h, _ in batch))
            filler = rng.integers(0, 1 << cfg.hif.bits, per_table - len(slots)).tolist()
            luts = np.array(slots + filler, dtype=np.int64).reshape(lay.banks, n_codes)
            by_block: dict[tuple[int, int], list[int]] = {}
            for h, sc in batch:
                slot = slots.index(h)
                by_block.setdefault((slot // n_codes, sc), []).append(slot % n_codes)
            headers, codes = [], []
            N, g = cfg.lanes, lay.group
            for (bank, sc), idx in by_block.items():
                # every product in every lane: the q-th at flat position q * N + lane, which lane
                # `lane` decodes (block (q N + lane) // g, whole beats of them, code (q N + lane) % g)
                flat = rng.integers(0, n_codes, -(-len(idx) * N // g) * g)
                for q, code in enumerate(idx):
                    flat[q * N:(q + 1) * N] = code
                for row in flat.reshape(-1, g):
                    headers.append(int(lay.make_header(sc, int(rng.integers(0, 2)) * lay.signed_scale,
                                                       bank * lay.select_bit)))
                    codes.append(row)
            headers, codes = stimulus.pad_to_beats(cfg, np.array(headers), np.array(codes))
            out.append(stimulus.Layer(luts, off, headers, codes, f"rounding{off:+d}"))
    return out


class Part:
    """Layers streamed back to back: their input beats (swap on each first beat) and expected beats
    (none with ``check`` false: a faulty sparse stream has no expected output)."""

    def __init__(self, cfg: DecoderConfig, layers: list[stimulus.Layer], check: bool = True):
        self.layers = layers
        bits, lane_bits = cfg.beat_bits, reference.lane_word_bits(cfg)
        self.beats = [[b | (int(i == 0) << bits) for i, b in enumerate(reference.input_beats(cfg, L.headers, L.codes))]
                      for L in layers]
        self.expected = [sum(v << (i * lane_bits) for i, v in enumerate(beat))
                         for L in layers for beat in L.expected(cfg)] if check else []


class Scenario:
    """One scenario of the plan, built once for every mutant.

    ``kind``: ``stream`` (the layers back to back), ``timed`` (the same, and every output beat
    must leave in its cycle, ``latency`` after its input beat's handshake with no bubble, and
    every input beat be taken as soon as it may; give it no output stalls) or ``reset`` (the
    first layer cut after ``cut_after`` beats with the output stalled, a reset of
    ``reset_cycles`` cycles, then the other layers, the output stalled for their first
    ``stall_after_reset`` cycles)."""

    def __init__(self, cfg: DecoderConfig, spec: dict, rng: np.random.Generator):
        self.name = spec["name"]
        self.kind = spec.get("kind", "stream")
        layers = [layer for part in spec["layers"] for layer in _layers(cfg, part, rng)]
        self.p_idle = spec.get("p_idle", 0.2)
        self.p_stall = spec.get("p_stall", 0.2)
        self.stall_burst = spec.get("stall_burst", 1)
        self.cut_after = spec.get("cut_after", 5)
        self.reset_cycles = spec.get("reset_cycles", 2)
        self.stall_after_reset = spec.get("stall_after_reset", 0)
        self.write_while_stalled = spec.get("write_while_stalled", False)
        self.bad = spec.get("bad")                   # kind "error": the sparse fault (hdl.sparse_merge.ERRORS)
        self.gaps: list[int] | None = None           # kind "throughput": entry k offered gaps[k] cycles late
        self.entry_cycles: list[int] = []            # kind "throughput": the cycle the model takes each entry
        if self.kind == "reset":
            self.parts = [Part(cfg, layers[:1]), Part(cfg, layers[1:])]
        else:
            self.parts = [Part(cfg, layers, check=self.kind != "error")]
        self.layers = layers
        if self.kind == "throughput":
            # the residual path's throughput rule: stage 0's extra cycles (hdl.sparse_merge.MergeModel,
            # counted at full speed by sim.sparse_stalls, which tests/test_sparse_stalls.py checks
            # against the decoder)
            self.p_idle = self.p_stall = 0.0
            self.gaps = spec.get("gaps")
            if self.gaps is not None:
                # the sparse stream with gaps, drawn once: the window runs dry and the hold waits
                self.gaps = [int(g) for g in rng.choice(self.gaps, sum(len(L.sparse_index) for L in layers) + 1)]
            self.stalls, self.entry_cycles = stage0_stalls(cfg, layers, self.gaps or [0])


class HostPort:
    """The host side of one stream, cycle by cycle: ``Bench.host``'s beats and table writes, and
    (with residuals) the sparse entries it releases, each offered until taken.

    Per cycle: ``drive`` before the read-only phase, then, in it, ``edge(taken)``: the clock edge,
    after which the entry offered is gone if it was taken and the host has its next cycle."""

    def __init__(self, bench: Bench, host, entries: deque | None, gaps: list[int] | None = None):
        self.bench, self.host, self.entries = bench, host, entries
        self.entry = None                             # the entry offered and not yet taken
        # gaps: entry k offered gaps[k] cycles after it is due, instead of the random gaps
        self.gaps, self.k, self.wait = gaps, 0, gaps[0] if gaps else 0
        self.entry_cycles: list[int] = []             # the cycle each entry was taken (``edge``'s ``cycle``)
        self.valid, self.payload, self.write = next(host)
        self.done = False                             # the host has run out

    @property
    def owed(self) -> bool:
        """Sparse entries not yet taken."""
        return bool(self.entries) or self.entry is not None

    def drive(self, rng, p_idle: float) -> None:
        """This cycle's beat and write; a new entry unless one waits (a gap with probability
        ``p_idle``, drawn only when an entry is due, so the draws of a stream without entries do
        not change)."""
        self.bench._apply(self.valid, self.payload, self.write)
        if self.entries is not None:
            if self.gaps is not None:
                if self.entry is None and self.entries:
                    if self.wait:
                        self.wait -= 1
                    else:
                        self.entry = self.entries.popleft()
            elif self.entry is None and self.entries and rng.random() >= p_idle:
                self.entry = self.entries.popleft()
            self.bench._offer(self.entry)

    async def edge(self, taken: bool, cycle: int = 0) -> None:
        h = self.bench.h
        entry_taken = self.entry is not None and h["sparse__ready"].value == 1
        if entry_taken:
            self.entry_cycles.append(cycle)
        await RisingEdge(h["clk"])
        if entry_taken:
            self.entry = None
            if self.gaps is not None:
                self.k += 1
                self.wait = self.gaps[self.k % len(self.gaps)]
        if not self.done:
            try:
                self.valid, self.payload, self.write = self.host.send(taken)
            except StopIteration:
                self.done, self.valid, self.payload, self.write = True, 0, None, None


class Bench:
    def __init__(self, dut, cfg: DecoderConfig, plan: dict):
        self.dut, self.cfg, self.plan = dut, cfg, plan
        self.latency = plan["latency"]
        self.seed = plan["seed"]
        rng = np.random.default_rng(self.seed)
        self.scenarios = [sc for sc in (Scenario(cfg, s, rng) for s in plan["scenarios"]) if sc.layers]
        self.scrub_tables = self._scrub_values(rng)
        self.k = cfg.layout.code_bits
        # signal handles, and the last value written to each (a write only when it changes)
        names = ("clk", "rst", "mutsel", "blocks__valid", "blocks__payload", "blocks__ready", "load__valid",
                 "load__payload", "offset", "offset_we", "values__valid", "values__ready", "values__payload")
        if cfg.residuals:
            names += SPARSE_PINS
        self.h = {n: getattr(dut, n) for n in names}
        self.last: dict[str, int] = {}
        self.limits: dict[str, int] = {}

    def _scrub_values(self, rng) -> list:
        """Per page, table words and an offset unlike any the scenarios load at the same place."""
        lay, hif_codes = self.cfg.layout, 1 << self.cfg.hif.bits
        used = [set() for _ in range(lay.banks << lay.code_bits)]
        offsets = set()
        for sc in self.scenarios:
            for L in sc.layers:
                for b in range(L.luts.shape[0]):
                    for a in range(L.luts.shape[1]):
                        used[(b << lay.code_bits) + a].add(int(L.luts[b, a]))
                offsets.add(L.offset)
        pages = []
        for _ in range(2):
            words = []
            for i in range(lay.banks << lay.code_bits):
                v = int(rng.integers(0, hif_codes))
                while v in used[i]:
                    v = (v + 1) % hif_codes
                used[i].add(v)                     # the two pages differ too
                words.append(("lut", i >> lay.code_bits, i & ((1 << lay.code_bits) - 1), v))
            off = next(o for o in range(-128, 128) if o not in offsets)
            offsets.add(off)
            pages.append(words + [("offset", off)])
        return pages

    # -- pins ----------------------------------------------------------------------------------
    def _set(self, name: str, value: int) -> None:
        if self.last.get(name) != value:
            self.h[name].value = value
            self.last[name] = value

    def _apply(self, valid: int, payload: int | None, write) -> None:
        self._set("blocks__valid", valid)
        if payload is not None:
            self._set("blocks__payload", payload)
        if write is None:
            self._set("load__valid", 0)
            self._set("offset_we", 0)
        elif write[0] == "lut":
            _, bank, addr, value = write
            self._set("load__payload", bank | (addr << 1) | (value << (1 + self.k)))
            self._set("load__valid", 1)
            self._set("offset_we", 0)
        else:
            self._set("offset", write[1] & 0xFF)
            self._set("offset_we", 1)
            self._set("load__valid", 0)
            if self.cfg.residuals:                  # the layer's sparse flag, written with its offset
                self._set("layer_sparse", write[2] if len(write) > 2 else 0)

    def _offer(self, entry) -> None:
        """The sparse entry ``(index, value, last)`` offered this cycle, or none."""
        if entry is not None:
            index, value, last = entry
            self._set("sparse__payload", index | (value << 32) | (last << 48))
        self._set("sparse__valid", int(entry is not None))

    async def cycles(self, n: int, rst: int = 0, ready: int = 1) -> None:
        self._apply(0, None, None)
        if self.cfg.residuals:
            self._offer(None)
        self._set("rst", rst)
        self._set("values__ready", ready)
        for _ in range(n):
            await RisingEdge(self.h["clk"])
        self._set("rst", 0)

    async def reset(self, n: int = 2) -> None:
        await self.cycles(n, rst=1, ready=0)

    # -- the host side, one cycle at a time --------------------------------------------------------
    @staticmethod
    def host(sc: Scenario, part: Part, rng, cut: bool, self_bpb: int, entries: deque | None = None):
        """A generator: yields (valid, payload, write) for each cycle, is sent whether the beat was taken.

        As sim/tb_decoder.py drives: the first layer's tables are loaded, then each layer streams;
        once its first (swap) beat is taken, the next layer's table writes go out one per offered
        beat, and whatever is left before that layer's first beat. With ``write_while_stalled`` a
        write also goes out on each cycle a beat waits or the input idles. With residuals, once a
        layer's swap beat is taken its sparse entries join ``entries`` (``stream`` offers them
        from the next cycle on, beside the beats)."""
        layers = part.layers
        for w in layers[0].writes():
            yield 0, None, w
        pending: deque = deque()
        extra = sc.write_while_stalled
        for li in range(len(layers)):
            while pending:
                yield 0, None, pending.popleft()
            beats = part.beats[li][:sc.cut_after] if cut else part.beats[li]
            for bi, beat in enumerate(beats):
                while rng.random() < sc.p_idle:
                    yield 0, None, (pending.popleft() if pending and extra else None)
                taken = yield 1, beat, (pending.popleft() if pending else None)
                wait = 0
                while not taken:
                    wait += 1
                    if cut and wait > 4 * self_bpb:   # the output is stalled: the input fills, then stops
                        return
                    taken = yield 1, beat, (pending.popleft() if pending and extra else None)
                if bi == 0 and entries is not None:
                    entries.extend(layers[li].entries())
                if bi == 0 and li + 1 < len(layers):
                    pending = deque(layers[li + 1].writes())

    async def stream(self, sc: Scenario, part: Part, rng, *, limit: int | None, cut: bool = False,
                     stall: int = 0, beat_cycles: list[int] | None = None,
                     entry_cycles: list[int] | None = None) -> int:
        """Stream ``part`` and check every output beat; raises Killed. Returns the cycles it took.

        ``cut``: the output stays stalled and the input stops once a beat is refused (no check);
        ``beat_cycles``: the cycle of each output beat is appended to it; ``entry_cycles``: the
        cycle each sparse entry was taken, counted from the first input beat's."""
        timed = sc.kind == "timed"
        expected = deque() if cut else deque(part.expected)
        n_out = len(expected)
        if limit is None:                             # the original's run, which sets the limits
            limit = 100 * (n_out + sum(map(len, part.beats))) + 10_000
        entries: deque | None = deque() if self.cfg.residuals else None     # sparse entries owed
        port = HostPort(self, self.host(sc, part, rng, cut, self.cfg.beats_per_block, entries), entries, sc.gaps)
        h, cycles, out_count, stall_left = self.h, 0, 0, stall
        takes: list[int] = []                         # the cycle each input beat was taken
        offered = None                                # since when the beat in hand is offered
        bpb = self.cfg.beats_per_block
        while True:
            port.drive(rng, sc.p_idle)
            valid = port.valid
            if cut:
                ready = 0
            elif stall_left:
                ready, stall_left = 0, stall_left - 1
            elif sc.p_stall and rng.random() < sc.p_stall:
                ready, stall_left = 0, int(rng.integers(0, sc.stall_burst))
            else:
                ready = 1
            self._set("values__ready", ready)
            await ReadOnly()
            taken = valid and h["blocks__ready"].value == 1
            if timed and valid:
                if offered is None:
                    offered = cycles
                due = offered if not takes else max(offered, takes[-1] + bpb)
                if taken != (cycles == due):
                    raise Killed(f"{sc.name}: input beat {len(takes)} {'taken' if taken else 'refused'} in cycle "
                                 f"{cycles}; offered from cycle {offered}, it is due in cycle {due} (one beat "
                                 f"every {bpb} cycle(s) while the output is ready)")
            if ready and h["values__valid"].value == 1:
                if not expected:
                    raise Killed(f"{sc.name}: an output beat more than the {n_out} expected (cycle {cycles})")
                want = expected.popleft()
                try:
                    got = int(h["values__payload"].value)
                except ValueError:
                    raise Killed(f"{sc.name}: output beat {out_count} has X/Z bits") from None
                if got != want:
                    raise Killed(f"{sc.name}: output beat {out_count} differs from golden{self._lanes(got, want)}")
                if timed:
                    beat_in, k = divmod(out_count, bpb)
                    due = takes[beat_in] + self.latency + k if beat_in < len(takes) else None
                    if cycles != due:
                        raise Killed(f"{sc.name}: output beat {out_count} in cycle {cycles}, due in cycle {due} "
                                     f"(latency {self.latency} after its input beat's handshake, no bubble)")
                out_count += 1
                if beat_cycles is not None:
                    beat_cycles.append(cycles)
            if taken:
                takes.append(cycles)
                offered = None
            await port.edge(taken, cycles)
            cycles += 1
            if port.done and not expected and (cut or not port.owed):
                break
            if limit is not None and cycles > limit:
                if not port.done:
                    raise Killed(f"{sc.name}: input not taken within {limit} cycles (hang)")
                if not expected:
                    raise Killed(f"{sc.name}: sparse entries not taken within {limit} cycles")
                raise Killed(f"{sc.name}: {len(expected)} of {n_out} output beats missing after {limit} cycles")
        if entry_cycles is not None:
            entry_cycles.extend(c - takes[0] for c in port.entry_cycles)
        if not cut:                                   # nothing more may come out
            self._apply(0, None, None)
            self._set("values__ready", 1)
            for q in range(self.latency + 8):
                await ReadOnly()
                if h["values__valid"].value == 1:
                    raise Killed(f"{sc.name}: an output beat more than the {n_out} expected "
                                 f"({q + 1} cycles after the last)")
                await RisingEdge(h["clk"])
            if self.cfg.residuals:                    # a good stream sets no error bit
                await ReadOnly()
                err = h["sparse_error"].value
                if not err.is_resolvable or int(err):
                    raise Killed(f"{sc.name}: sparse_error {err} (order, past_layer, no_layer, not_finite "
                                 f"from bit 0) after a good stream")
                await RisingEdge(h["clk"])
        return cycles

    def _lanes(self, got: int, want: int) -> str:
        w = reference.lane_word_bits(self.cfg)
        m = (1 << w) - 1
        bad = [i for i in range(self.cfg.lanes) if (got >> (i * w)) & m != (want >> (i * w)) & m]
        return f" in lane(s) {bad[:4]}: got {(got >> (bad[0] * w)) & m:#x}, expected {(want >> (bad[0] * w)) & m:#x}"

    async def bad_stream(self, sc: Scenario, part: Part, rng, limit: int | None) -> int:
        """Stream ``part``, whose sparse stream has the fault ``sc.bad``, from a reset, the output
        always ready and not compared; then exactly that error bit must be set. Ends with a reset
        (the bits are sticky). Raises Killed; returns the cycles it took."""
        h = self.h
        await self.reset()
        entries: deque = deque()
        if sc.bad == "no_layer":                 # an entry before any layer's swap beat
            entries.append((0, 0x3F80, 1))
        port = HostPort(self, self.host(sc, part, rng, False, self.cfg.beats_per_block, entries), entries)
        cap = limit or 100 * sum(map(len, part.beats)) + 10_000
        cycles = 0
        while cycles < cap and not (port.done and not port.owed):
            port.drive(rng, 0.0)
            self._set("values__ready", 1)
            await ReadOnly()
            await port.edge(bool(port.valid) and h["blocks__ready"].value == 1)
            cycles += 1
        await self.cycles(self.latency + 8)
        await ReadOnly()
        err, want = h["sparse_error"].value, 1 << ERRORS.index(sc.bad)
        if not err.is_resolvable or int(err) != want:
            raise Killed(f"{sc.name}: sparse_error {err} after a stream with the fault {sc.bad}, expected "
                         f"{want:0{len(ERRORS)}b} (order, past_layer, no_layer, not_finite from bit 0)")
        await RisingEdge(h["clk"])
        await self.reset()
        return cycles

    async def scenario(self, sc: Scenario, rng, limit: int | None) -> int:
        if sc.kind == "error":
            return await self.bad_stream(sc, sc.parts[0], rng, limit)
        if sc.kind == "throughput":
            beats: list[int] = []
            entries: list[int] = []
            n = await self.stream(sc, sc.parts[0], rng, limit=limit, beat_cycles=beats, entry_cycles=entries)
            extra = beats[-1] - beats[0] + 1 - len(beats)
            if extra != sc.stalls:
                raise Killed(f"{sc.name}: the output beats took {extra} cycles more than one a cycle; the "
                             f"residual path's rule (hdl.sparse_merge.MergeModel) gives {sc.stalls}")
            if entries != sc.entry_cycles:
                k = next((i for i, (a, b) in enumerate(zip(entries, sc.entry_cycles)) if a != b),
                         min(len(entries), len(sc.entry_cycles)))
                raise Killed(f"{sc.name}: sparse entry {k} taken in cycle {entries[k] if k < len(entries) else None}, "
                             f"the merge's rule (hdl.sparse_merge.MergeModel: sparse.ready) takes it in cycle "
                             f"{sc.entry_cycles[k] if k < len(sc.entry_cycles) else None}")
            return n
        if sc.kind == "reset":
            await self.stream(sc, sc.parts[0], rng, limit=limit, cut=True)
            await self.reset(sc.reset_cycles)
            return await self.stream(sc, sc.parts[1], rng, limit=limit, stall=sc.stall_after_reset)
        return await self.stream(sc, sc.parts[0], rng, limit=limit)

    async def scrub(self) -> None:
        """The original design selected: fill both pages with values no scenario expects there."""
        self._set("mutsel", 0)
        await self.reset()
        for page, words in enumerate(self.scrub_tables):
            for w in words:
                self._apply(0, None, w)
                await RisingEdge(self.h["clk"])
            self._apply(1, self.scenarios[0].parts[0].beats[0][0], None)     # a swap beat: the other page next
            self._set("values__ready", 1)
            while True:
                await ReadOnly()
                taken = self.h["blocks__ready"].value == 1
                await RisingEdge(self.h["clk"])
                if taken:
                    break
        await self.cycles(self.latency + 8)

    async def run_design(self, index: int, calibrate: bool = False) -> dict:
        """Scrub, select design ``index``, reset, run every scenario; the verdict."""
        await self.scrub()
        self._set("mutsel", index)
        await self.reset()
        t0 = time.time()
        cycles = 0
        for i, sc in enumerate(self.scenarios):
            rng = np.random.default_rng([self.seed, i])
            limit = None if calibrate else self.limits[sc.name]
            try:
                n = await self.scenario(sc, rng, limit)
            except Killed as k:
                await RisingEdge(self.h["clk"])           # out of the read-only phase
                return {"mutant": index, "verdict": "killed", "by": sc.name, "reason": str(k),
                        "cycles": cycles, "seconds": round(time.time() - t0, 3)}
            cycles += n
            if calibrate:
                self.limits[sc.name] = 2 * n + 200
        return {"mutant": index, "verdict": "survived", "cycles": cycles, "seconds": round(time.time() - t0, 3)}


@cocotb.test()
async def mutants(dut):
    plan = read_plan(MUT_PLAN)
    cfg = DecoderConfig.from_description(plan["decoder"])
    bench = Bench(dut, cfg, plan)
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    for name in ("blocks__valid", "load__valid", "offset_we", "values__ready", "load__payload", "offset",
                 "blocks__payload", "mutsel") + (("sparse__valid", "sparse__payload", "layer_sparse")
                                                 if cfg.residuals else ()):
        bench._set(name, 0)
    results = results_path()
    with results.open("a") as out:
        def record(r: dict) -> None:
            out.write(json.dumps(r) + "\n")
            out.flush()

        first = await bench.run_design(0, calibrate=True)
        first["limits"] = dict(bench.limits)
        record(first)
        assert first["verdict"] == "survived", f"the original design fails the regression: {first}"
        for index in plan["mutants"]:
            record(await bench.run_design(index))
        last = await bench.run_design(0)
        last["final"] = True
        record(last)
        assert last["verdict"] == "survived", f"the original design fails after the mutants: {last}"
