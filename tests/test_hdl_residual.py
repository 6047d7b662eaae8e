"""The residual path's components in amaranth.sim, each against its model (hdl/residual.py,
hdl/residual_adder.py, hdl/sparse_merge.py).

* ``ResidualAdder``: random and adversarial products and BF16 residuals (ties broken by a
  residual 60 binades down, cancellation to +-0, sign flips, saturation, subnormal sums),
  random stalls; its model is golden's exact sum rounded once, and the model is checked
  against ``fractions.Fraction`` on the same cases.
* ``SparseMerge``: random streams of entries (bursts in one chunk, gaps, layers with and
  without entries, stalls, idles, every bad input) against its cycle model, every cycle.
* ``ResidualPath``: random passes with up to ``R`` entries, multi-pass chunks, against its model.

Each comparison is shown to catch a broken component (tests/residual_mutants.py).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import residual_mutants as mut
from amaranth.hdl import Shape, Value
from amaranth.lib import data
from amaranth.sim import Simulator

from sop.golden.formats import get_format
from sop.golden.layout import named_layouts
from sop.hdl import block_fields, hif_formatter, lut_word, residual, residual_adder, scale_decoder, sparse_merge
from sop.hdl.config import DecoderConfig
from sop.hdl.residual import ResidualPath
from sop.hdl.residual_adder import ResidualAdder
from sop.hdl.sparse_merge import SparseMerge

BF16 = get_format("bf16")
LAY = named_layouts()


def config(layout="sop4-g16", lanes=8, residuals=1):
    return DecoderConfig("t", lanes, LAY[layout], residuals=residuals)


def simulate(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def pack(shape, value) -> int:
    """The integer of ``value`` (dicts / lists / ints) in layout ``shape``."""
    if isinstance(shape, data.StructLayout):
        return sum(pack(f.shape, value[name]) << f.offset for name, f in shape)
    if isinstance(shape, data.ArrayLayout):
        w = Shape.cast(shape.elem_shape).width
        return sum(pack(shape.elem_shape, v) << (i * w) for i, v in enumerate(value))
    return int(value) & ((1 << Shape.cast(shape).width) - 1)


def row(fields: dict, n: int) -> dict:
    return {k: int(np.asarray(v)[n]) for k, v in fields.items()}


# -- the adder ------------------------------------------------------------------------------------------
def adder_vectors(cfg, seed, n):
    """Table words, block fields and residuals: a fifth each of ties broken 60 binades down,
    cancellations, sign flips, saturating sums and random residuals; products over every offset."""
    rng = np.random.default_rng(seed)
    lay = cfg.layout
    headers = lay.make_header(rng.integers(0, 1 << lay.scale.bits, n), rng.integers(0, 2, n) * lay.signed_scale,
                              rng.integers(0, 2, n) * lay.select_bit)
    offsets = rng.choice([-128, -120, -60, -10, 0, 10, 60, 110, 127], n)
    hif = rng.integers(0, 1 << cfg.hif.bits, n)
    hif[rng.random(n) < 0.05] = 0                                       # zero products
    words = lut_word.model(cfg, hif)
    blocks = block_fields.model(cfg, headers, offsets)
    p = hif_formatter.product_values(cfg, words, blocks)
    kind = rng.integers(0, 6, n)
    mag = np.where(p == 0, 1.0, np.abs(p))
    sgn = rng.choice([-1.0, 1.0], n)
    r = np.select([kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
                  [np.ldexp(sgn, np.frexp(mag)[1] - 61),                  # a tiny residual: tie breaker
                   -p,                                                   # cancellation (if representable)
                   -2.5 * p,                                             # sign flip
                   sgn * BF16.max,                                       # saturation
                   sgn * mag * 2.0 ** rng.integers(-12, 12, n)],         # close exponents
                  rng.standard_normal(n) * 2.0 ** rng.integers(-140, 128, n))
    r = BF16.quantize(np.clip(r, -BF16.max, BF16.max))
    r[rng.random(n) < 0.03] = -0.0
    return words, blocks, BF16.encode(r).astype(np.int64)


def stream_through(dut, inputs, latency: int, rng, p_en=0.8) -> list[int]:
    """Drive ``inputs`` (per item, a list of (port value, integer)) through a pipeline with
    enable ``dut.en`` stalled at random; returns ``dut.out`` of each item, ``latency`` enabled
    edges after it."""
    got, n = [], len(inputs)
    enables = iter(lambda: int(rng.random() < p_en), None)

    def offer(ctx, item: int) -> int:
        """Item ``item``'s inputs and a random enable on the ports; the enable."""
        for port, value in inputs[item % n] + [(dut.en, en := next(enables))]:
            ctx.set(port, value)
        return en

    async def bench(ctx):
        edges = 0                                      # enabled edges so far
        while len(got) < n:
            en = offer(ctx, edges)
            await ctx.tick()
            edges += en
            if en and edges >= latency:
                got.append(ctx.get(Value.cast(dut.out)))

    simulate(dut, bench)
    return got


def check_adder(cfg, cls=ResidualAdder, n=2500, seed=0):
    dut = cls(cfg)
    words, blocks, res = adder_vectors(cfg, seed, n)
    blay = scale_decoder.block(cfg)
    inputs = [[(dut.word.as_value(), int(words[i])), (dut.block.as_value(), pack(blay, row(blocks, i))),
               (dut.residual, int(res[i]))] for i in range(n)]
    got = stream_through(dut, inputs, dut.latency, np.random.default_rng(seed + 1))
    return np.array(got), residual_adder.adder_model(cfg, words, blocks, res), (words, blocks, res)


@pytest.mark.parametrize("layout", ["sop4-g16", "e2m3-ue4m4-g16"])
def test_adder_against_model(layout):
    got, want, _ = check_adder(config(layout))
    np.testing.assert_array_equal(got, want)


def fraction_bf16(p: float, r: float) -> int:
    """The BF16 code of round(p + r), exactly (Fraction), saturating; IEEE's zero signs."""
    x = Fraction(p) + Fraction(r)
    if x == 0:
        neg = math.copysign(1, p) < 0 and math.copysign(1, r) < 0
        return 0x8000 if neg else 0
    a, e = abs(x), 0
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    q = Fraction(2) ** (max(e, -126) - 7)
    k, rem = divmod(a, q)
    k += rem > q / 2 or (rem == q / 2 and k % 2 == 1)
    v = min(k * q, Fraction(BF16.max))
    return int(BF16.encode(np.array([math.copysign(float(v), float(x))]))[0])


def test_adder_model_is_the_exact_sum_rounded_once():
    cfg = config()
    words, blocks, res = adder_vectors(cfg, 5, 1500)
    p = hif_formatter.product_values(cfg, words, blocks)
    want = [fraction_bf16(a, b) for a, b in zip(p, BF16.decode(res))]
    np.testing.assert_array_equal(residual_adder.adder_model(cfg, words, blocks, res), want)
    # the cases reach what they are for: +0 from cancellation, saturation, subnormal sums
    got = residual_adder.adder_model(cfg, words, blocks, res)
    assert (got == 0).sum() > 50 and (got & 0x7FFF == 0x7F7F).sum() > 50
    assert ((got & 0x7F80) == 0).sum() > (got & 0x7FFF == 0).sum()


def test_adder_check_catches_ties_away_and_a_dropped_sticky_bit():
    for cls in (mut.AdderTiesAway, mut.AdderNoJam):
        got, want, _ = check_adder(config(), cls, n=1200)
        assert (got != want).any(), cls.__name__


# -- the merge ----------------------------------------------------------------------------------------
def merge_layers(cfg, rng, n_layers, chunks, density, burst=0.0):
    """Layers: (chunks, sorted entry indices, BF16 values); a fraction of layers without entries."""
    N, out = cfg.lanes, []
    for _ in range(n_layers):
        n = chunks * N
        if rng.random() < 0.25:
            idx = np.zeros(0, dtype=np.int64)
        else:
            idx = np.flatnonzero(rng.random(n) < density)
            if burst:                                   # whole chunks full of entries
                full = rng.choice(chunks, max(1, int(burst * chunks)), replace=False)
                idx = np.union1d(idx, (full[:, None] * N + np.arange(N)).ravel())
            if len(idx) == 0:
                idx = np.array([int(rng.integers(0, n))])
        vals = BF16.encode(rng.standard_normal(len(idx))).astype(np.int64)
        out.append((chunks, idx, vals))
    return out


def no_stale(entry):
    """An entry that applies nothing: its lane and value are don't-cares."""
    return entry if entry[0] else (0, 0, 0)


def merge_model(cfg, ins):
    return [{**o, "entries": [no_stale(e) for e in o["entries"]]} for o in sparse_merge.merge_model(cfg, ins)]


def drive_merge(cfg, layers, seed, *, cls=SparseMerge, bad=None, p_en=0.8, p_beat=0.8, p_entry=0.7,
                cycles_max=20000):
    """Run ``cls`` with a stage-0 stand-in that obeys ``hold`` and a host that streams each
    layer's entries after its swap beat. ``bad``: one of "order", "past", "orphan", "nan"
    (the host breaks its rule once). Returns (inputs per cycle, outputs per cycle, the passes:
    (layer, chunk, final, [(lane, value)] applied))."""
    rng = np.random.default_rng(seed)
    dut = cls(cfg)
    C = cfg.beats_per_block                       # chunks per beat
    N = cfg.lanes
    ins, outs, passes = [], [], []

    async def bench(ctx):
        active, hold = 0, 0
        cur = None                                # (layer, chunk) stage 0 presents
        li_next, beat_in_layer = 0, 0             # the next beat to offer
        stream: list = []                         # entries the host offers, in order
        written = False                           # the next layer's flag is written
        for t in range(cycles_max):
            if cur is None and li_next >= len(layers) and not stream:
                break
            # the host: the next layer's flag before its swap beat
            we = ls = 0
            if not written and li_next < len(layers) and beat_in_layer == 0:
                we, ls = 1, int(len(layers[li_next][1]) > 0)
                written = True
            offer = li_next < len(layers) and rng.random() < p_beat and not we
            swap = offer and beat_in_layer == 0
            en = int(rng.random() < p_en)
            present = cur is not None
            last_chunk = present and cur[1] % C == C - 1
            take_reg = (not present) or last_chunk
            taken = bool(en and take_reg and not hold and offer)
            page = active ^ int(offer and swap)
            valid = bool(stream) and rng.random() < p_entry
            entry = stream[0] if stream else (0, 0, 0)
            present_next = (offer if (en and take_reg and not hold) else present)
            cy = {"present": int(present), "present_next": int(present_next), "taken": int(taken),
                  "swap": int(swap), "page": page, "write_page": 1 - active, "en": en, "offset_we": we,
                  "layer_sparse": ls, "valid": int(valid), "entry": entry}
            for k in ("present", "present_next", "taken", "swap", "page", "write_page", "en", "offset_we",
                      "layer_sparse"):
                ctx.set(getattr(dut.issue, k) if hasattr(dut.issue, k) else getattr(dut, k), cy[k])
            ctx.set(dut.sparse.valid, cy["valid"])
            ctx.set(dut.sparse.payload.as_value(), pack(cfg.sparse_layout,
                                                        {"index": entry[0], "value": entry[1], "last": entry[2]}))
            ready, hold_next = ctx.get(dut.sparse.ready), ctx.get(dut.issue.hold_next)
            await ctx.tick()
            outs.append({"ready": ready, "hold_next": hold_next,
                         "entries": [no_stale(tuple(ctx.get(getattr(dut.entries[j], f))
                                                    for f in ("valid", "lane", "value")))
                                     for j in range(cfg.residuals)],
                         "final": ctx.get(dut.final), "error": {k: ctx.get(getattr(dut.error, k))
                                                                 for k in sparse_merge.ERRORS}})
            ins.append(cy)
            if en and present:
                applied = [(lane, value) for v, lane, value in outs[-1]["entries"] if v]
                passes.append((cur[0], cur[1], int(not hold), applied))
            if valid and ready:
                stream.pop(0)
            # stage 0 moves
            if en and present and not hold:
                cur = None if last_chunk else (cur[0], cur[1] + 1)
            if taken:
                if swap:
                    active ^= 1
                    idx, vals = layers[li_next][1], layers[li_next][2]
                    ent = [(int(i), int(v), int(k == len(idx) - 1)) for k, (i, v) in enumerate(zip(idx, vals))]
                    if bad == "order" and len(ent) > 2:
                        ent[1], ent[2] = ent[2], ent[1]
                    if bad == "past" and ent:
                        ent[-1] = (layers[li_next][0] * N + 3, ent[-1][1], 1)
                    if bad == "nan" and ent:
                        ent[0] = (ent[0][0], 0x7FC0, ent[0][2])
                    if bad == "orphan" and li_next == 1:
                        ent = [(5, 0x3F80, 1)]                 # an entry the layer did not declare
                    stream += ent
                cur = (li_next, beat_in_layer * C)
                beat_in_layer += 1
                if beat_in_layer * C >= layers[li_next][0]:
                    li_next, beat_in_layer, written = li_next + 1, 0, False
            hold = hold_next
        ctx.set(dut.en, 0)

    simulate(dut, bench)
    return ins, outs, passes


def check_passes(cfg, layers, passes):
    """The contract, from the trace alone: every entry applied once, in a pass of its chunk, at
    most R a pass; each chunk's last pass comes after all its entries."""
    N, R = cfg.lanes, cfg.residuals
    applied: dict = {}
    last_pass: dict = {}
    for li, chunk, final, entries in passes:
        assert len(entries) <= R
        for lane, value in entries:
            key = (li, chunk * N + lane)
            assert key not in applied, f"entry {key} applied twice"
            assert (li, chunk) not in last_pass, f"entry {key} applied after its chunk's last pass"
            applied[key] = value
        if final:
            last_pass[(li, chunk)] = True
    want = {(li, int(i)): int(v) for li, (_, idx, vals) in enumerate(layers) for i, v in zip(idx, vals)}
    assert applied == want


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("layout,lanes", [("sop4-g16", 8), ("sop4-g16", 1), ("sop4-g16", 32)])
def test_merge_against_model(R, layout, lanes):
    cfg = config(layout, lanes, R)
    rng = np.random.default_rng(R * 100 + lanes)
    layers = merge_layers(cfg, rng, 6, 24, 0.08, burst=0.1)
    ins, outs, passes = drive_merge(cfg, layers, seed=R + lanes)
    want = merge_model(cfg, ins)
    for t, (g, w) in enumerate(zip(outs, want)):
        assert g == w, f"cycle {t}: {g} != {w}"
    check_passes(cfg, layers, passes)
    assert not any(outs[-1]["error"].values())
    finals = sum(1 for p in passes if p[2])
    assert len(passes) > finals                      # some chunks took more than one pass


@pytest.mark.parametrize("bad", ["order", "past", "orphan", "nan"])
def test_merge_flags_bad_input(bad):
    cfg = config()
    rng = np.random.default_rng(7)
    layers = merge_layers(cfg, rng, 3, 16, 0.1)
    layers[1] = (16, np.array([3, 9, 20, 40]), BF16.encode(np.ones(4)).astype(np.int64))
    if bad == "orphan":                   # a layer without entries, and the host sends one
        layers[1] = (16, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    ins, outs, _ = drive_merge(cfg, layers, seed=3, bad=bad)
    assert outs == merge_model(cfg, ins)
    flag = {"order": "order", "past": "past_layer", "orphan": "no_layer", "nan": "not_finite"}[bad]
    err = outs[-1]["error"]
    assert err[flag] == 1, err                                  # that bit, still set at the end
    # and no other, but for an entry out of order, which is then past its chunk: never applied
    assert {k for k, v in err.items() if v} <= ({flag, "past_layer"} if bad == "order" else {flag}), err


def test_merge_check_catches_no_hold_and_forgetful_errors():
    cfg = config()
    rng = np.random.default_rng(11)
    layers = merge_layers(cfg, rng, 4, 24, 0.1, burst=0.1)
    ins, outs, passes = drive_merge(cfg, layers, seed=5, cls=mut.NeverHold)
    assert outs != merge_model(cfg, ins)
    with pytest.raises(AssertionError):
        check_passes(cfg, layers, passes)
    layers[1] = (16, np.array([3, 9, 20, 40]), BF16.encode(np.ones(4)).astype(np.int64))
    ins, outs, _ = drive_merge(cfg, layers, seed=3, bad="order", cls=mut.ForgetfulErrors)
    assert outs != merge_model(cfg, ins) and not outs[-1]["error"]["order"]


# -- the path -----------------------------------------------------------------------------------------
def path_passes(cfg, rng, chunks):
    """Random passes: chunks of 1 to 3 passes (the last ``final``), up to R entries a pass at
    distinct lanes of the chunk, random lane outputs, words and blocks."""
    N, R, lay = cfg.lanes, cfg.residuals, cfg.layout
    passes = []
    for _ in range(chunks):
        n_pass = int(rng.choice([1, 1, 2, 3]))
        lanes_hit = rng.permutation(N)
        k = 0
        for p in range(n_pass):
            headers = lay.make_header(rng.integers(0, 1 << lay.scale.bits, N), rng.integers(0, 2, N),
                                      rng.integers(0, 2, N))
            block = block_fields.model(cfg, headers, rng.integers(-130, 128, N))
            words = lut_word.model(cfg, rng.integers(0, 1 << cfg.hif.bits, N))
            entries = []
            for _ in range(R):
                if k < N and rng.random() < 0.7:
                    r = BF16.encode(rng.standard_normal(1) * 2.0 ** rng.integers(-130, 120))[0]
                    entries.append((1, int(lanes_hit[k]), int(r)))
                    k += 1
                else:
                    entries.append((0, 0, 0))
            passes.append((rng.integers(0, 1 << 16, N), words, block, entries, int(p == n_pass - 1)))
    return passes


def check_path(cfg, cls=ResidualPath, chunks=60, seed=0):
    rng = np.random.default_rng(seed)
    dut = cls(cfg)
    passes = path_passes(cfg, rng, chunks)
    want = residual.path_model(cfg, passes)
    F, n, got = dut.formatter_latency, len(passes), []
    lead = dut.adders[0].latency + 2                 # pass s's output: after step s + lead
    blay = scale_decoder.block(cfg)

    async def bench(ctx):
        s = 0
        while len(got) < n:
            p = passes[min(s, n - 1)]
            q = passes[s - F] if 0 <= s - F < n else passes[0]
            for i in range(cfg.lanes):
                ctx.set(dut.word[i].as_value(), int(p[1][i]))
                ctx.set(dut.block[i].as_value(), pack(blay, row(p[2], i)))
                ctx.set(dut.lanes[i], int(q[0][i]))
            for j, (v, lane, value) in enumerate(p[3]):
                ctx.set(dut.entries[j].as_value(), pack(sparse_merge.entry_layout(cfg),
                                                        {"valid": v, "lane": lane, "value": value}))
            ctx.set(dut.final, p[4])
            en = int(rng.random() < 0.8)
            for i in range(cfg.lanes):
                ctx.set(dut.enable.lane[i], en)
            ctx.set(dut.enable.en, en)
            await ctx.tick()
            s += en
            if en and s >= lead:
                got.append([ctx.get(dut.out[i]) for i in range(cfg.lanes)])

    simulate(dut, bench)
    return got, want


@pytest.mark.parametrize("R,lanes", [(1, 8), (2, 8), (1, 1), (3, 4)])
def test_path_against_model(R, lanes):
    got, want = check_path(config(lanes=lanes, residuals=R), seed=R)
    assert got == want


def test_path_check_catches_the_neighbour_lane():
    got, want = check_path(config(), mut.NeighbourLane)
    assert got != want
