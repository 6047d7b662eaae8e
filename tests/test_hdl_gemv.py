"""The GEMV engine (hdl/gemv.py) in amaranth.sim, bit for bit against golden.dot.gemv.

A host driver streams layers the way docs/dot.md section 8 says: the next layer's
tables and layer registers into the inactive page while the current layer runs,
each vector's x beats (the first of a new layer with ``swap``), then its blocks in
``golden.dot.tile_order`` and its sparse entries in ``golden.dot.tile_residuals``'
order; random idle cycles on every input and random stalls on ``y``. Checked:
hand-sized layers (one block per row, a single tile, rows not a multiple of the
tile), random layers over every code, table swaps, LUT RAM tables, sparse residuals
(terms that saturate or are subnormal; the term unit alone), a real MiniLM layer
quantized to sop4-g16, without and with sparse residuals, with real E4M3
activations (the layer's inputs in the BERT forward pass on a sentence, rounded to
E4M3), throughput (one block a cycle) and latency, the error bits (an event not on ``status``
yet kept through ``clear``; the words a flagged sparse entry changes), the Verilog; and
that injected bugs (a wrong slot, a wrong x word, the wrong table page, an inverted
bank select, a flipped table bit, a term without x's sign, a block order that
reverses each row) are caught.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Mux
from amaranth.sim import Simulator

from sop.golden import dot
from sop.golden.layout import LayerStream, Sparse, pack_blocks
from sop.golden.points import get_point
from sop.hdl import gemv, gemv_config
from sop.hdl.fp32_acc import RowAccumulator
from sop.hdl.block_dot_folded import BlockDotFolded
from sop.hdl.gemv import GemvEngine
from sop.hdl.gemv_config import GemvConfig, gemv_configs
from sop.hdl.gemv_sequencer import BlockSequencer
from sop.hdl.gemv_term import ResidualTerm
from sop.quantize.weights import QUERY_LAYER

import mutants

E4M3 = dot.ACT_FORMATS["e4m3"]
SOP4 = get_point("sop4-g16")
FP6 = get_point("e2m3-ue4m4-g16")
SMALL = dict(max_cols=256, max_rows=255)        # small buffers: a faster simulation


def config(point=SOP4, **kw) -> GemvConfig:
    return GemvConfig(f"test-{point.name}", point.layout, point.hif, **{**SMALL, **kw})


# -- layers and activations -------------------------------------------------------------------------------

def random_layer(point, rows, cols, rng, *, offset=None) -> LayerStream:
    """A layer over every code, header and both banks, with random tables (HIF codes of both
    signs, zeros) and an offset that keeps most results normal."""
    lay = point.layout
    n = rows * cols // lay.group
    codes = rng.integers(0, 1 << lay.code_bits, (n, lay.group))
    scale = rng.integers(0, 1 << lay.scale.bits, n)
    sign = rng.integers(0, 2, n) if lay.signed_scale else np.zeros(n, np.int64)
    select = rng.integers(0, 2, n) if lay.select_bit else np.zeros(n, np.int64)
    blocks = pack_blocks(lay, lay.make_header(scale, sign, select), codes)
    luts = rng.integers(0, 1 << point.hif.bits, (lay.banks, 1 << lay.code_bits))
    luts[:, 0] = 0
    off = int(rng.integers(-20, 21)) if offset is None else offset
    return LayerStream(lay, point.hif, luts, off, rows, cols, blocks)


BF16 = dot.FORMATS["bf16"]


def with_residuals(layer: LayerStream, rng, n: int) -> LayerStream:
    """``layer`` with ``n`` sparse entries at random places (rows with none, rows with several), BF16
    values of every magnitude: terms that saturate, go subnormal, or are exact normal products."""
    index = np.sort(rng.choice(layer.rows * layer.cols, n, replace=False)).astype(np.uint32)
    mag = np.exp2(rng.choice([-132, -8, 121], n) + rng.uniform(0, 6.9, n))   # tiny, plain, huge
    value = BF16.encode(BF16.quantize(mag * rng.choice([-1, 1], n))).astype(np.uint16)
    return LayerStream(layer.layout, layer.hif, layer.luts, layer.offset, layer.rows, layer.cols, layer.blocks,
                       Sparse(index, value))


def act_vectors(rng, batch, cols):
    """Gaussian activations with a few outlier channels, rounded to E4M3 (test_hdl_block_dot's)."""
    x = rng.standard_normal((batch, cols)) * rng.choice([0.05, 1, 20], size=(batch, 1))
    x[:, rng.integers(0, cols, 4)] *= 50
    return E4M3.quantize(np.clip(x, -E4M3.max, E4M3.max)).astype(np.float32)


# -- the host driver --------------------------------------------------------------------------------------

@dataclass
class Job:
    """One layer and its activation vectors; ``w_order`` replaces the blocks' order (a mutant host)."""
    layer: LayerStream
    x: np.ndarray                      # (batch, cols) float32, values of the engine's activation format
    w_order: np.ndarray | None = None


@dataclass
class Trace:
    y: list = field(default_factory=list)          # (pattern, last)
    y_cycles: list = field(default_factory=list)
    w_cycles: list = field(default_factory=list)   # the cycle of each block taken
    status: list = field(default_factory=list)     # the status at the end


def host_items(cfg: GemvConfig, jobs: list[Job]):
    """Per layer: its table and layer writes; per vector: its x beats and w beats."""
    out = []
    for job in jobs:
        lay, s = job.layer.layout, job.layer
        loads = [("load", b, a, int(s.luts[b][a])) for b in range(lay.banks) for a in range(1 << lay.code_bits)]
        loads.append(("layer", s.rows, s.cols // lay.group, s.offset, int(len(s.sparse) > 0)))
        w = gemv_config.w_beats(cfg, s)
        if job.w_order is not None:
            nb = lay.block_bytes
            raw = np.frombuffer(s.blocks, np.uint8).reshape(-1, nb)[job.w_order]
            w = [int.from_bytes(raw[i].tobytes(), "little") for i in range(len(raw))]
        sp = gemv_config.sparse_beats(cfg, s) if len(s.sparse) else []
        vectors = [(gemv_config.x_beats(cfg, dot.activation_codes(v, cfg.act_format)), w, sp) for v in job.x]
        out.append((loads, vectors))
    return out


def run_engine(dut: GemvEngine, jobs: list[Job], *, seed=0, p_idle=0.2, p_stall=0.3, max_cycles=100_000,
               w_before_x=0, x_ahead=True, edit=None, stop_at=None) -> Trace:
    """Drive ``jobs`` through ``dut``: the next layer's writes once the current layer has swapped in,
    each vector's x beats once its layer's writes are done and (``x_ahead``) as soon as the vector
    before's x is taken (the engine holds them while both x pages are in use, and a layer's first
    vector until no vector is loaded), else once the vector before's blocks are all taken; its
    blocks once its x is taken (with ``w_before_x`` > 0, the first vector's blocks are offered that
    many cycles before its x). ``edit(items)`` changes ``host_items``' beats (a host's bad entries).
    ``stop_at``: the expected y words; the run ends at the first that differs (``rows_wrong``)."""
    cfg = dut.config
    rng = np.random.default_rng(seed)
    items = host_items(cfg, jobs)
    if edit is not None:
        edit(items)
    vectors = [(j, v) for j, (_, vs) in enumerate(items) for v in range(len(vs))]
    n_y = sum(j.layer.rows * len(j.x) for j in jobs)
    tr = Trace()

    async def bench(ctx):
        load_layer, load_pos = 0, 0          # the layer whose writes go out, the next write
        swapped = -1                         # the last layer whose swap beat was taken
        loads_done_at = {}                   # layer -> the cycle after its last write
        xv, x_pos = 0, 0                     # the vector whose x beats go out, the next beat
        wv, w_pos, s_pos = 0, 0, 0           # the vector whose blocks and entries go out
        cycle = 0
        while len(tr.y) < n_y:
            assert cycle < max_cycles, f"the engine stopped: {len(tr.y)} of {n_y} rows"
            # table and layer writes: layer L once layer L - 1 has swapped in
            write = None
            if load_layer < len(items) and swapped >= load_layer - 1 and rng.random() >= p_idle:
                write = items[load_layer][0][load_pos]
            ctx.set(dut.load.valid, int(write is not None and write[0] == "load"))
            ctx.set(dut.layer.valid, int(write is not None and write[0] == "layer"))
            if write is not None and write[0] == "load":
                ctx.set(dut.load.payload.bank, write[1])
                ctx.set(dut.load.payload.addr, write[2])
                ctx.set(dut.load.payload.data, write[3])
            elif write is not None:
                ctx.set(dut.layer.payload.rows, write[1])
                ctx.set(dut.layer.payload.blocks_per_row, write[2])
                ctx.set(dut.layer.payload.offset, write[3])
                ctx.set(dut.layer.payload.sparse, write[4])
            # x of vector xv; w and sparse of vector wv (once its x is taken)
            x_offer = w_offer = s_offer = False
            if xv < len(vectors) and (x_ahead or xv == wv):
                job, vec = vectors[xv]
                xs = items[job][1][vec][0]
                ready_to_swap = vec > 0 or loads_done_at.get(job, max_cycles) <= cycle
                x_offer = ready_to_swap and rng.random() >= p_idle
                ctx.set(dut.x.valid, int(x_offer))
                if x_offer:
                    ctx.set(dut.x.payload.codes.as_value(), xs[x_pos])
                    ctx.set(dut.x.payload.last, int(x_pos == len(xs) - 1))
                    ctx.set(dut.x.payload.swap, int(vec == 0 and x_pos == 0))
            else:
                ctx.set(dut.x.valid, 0)
            if wv < len(vectors):
                job, vec = vectors[wv]
                _, ws, ss = items[job][1][vec]
                early = wv == 0 and w_before_x and cycle < w_before_x
                w_offer = w_pos < len(ws) and (xv > wv or early) and rng.random() >= p_idle
                ctx.set(dut.w.valid, int(w_offer))
                if w_offer:
                    ctx.set(dut.w.payload, ws[w_pos])
                # the pass's residual entries, offered beside the blocks (the engine takes them by tile)
                s_offer = s_pos < len(ss) and xv > wv and rng.random() >= p_idle
                ctx.set(dut.sparse.valid, int(s_offer))
                if s_offer:
                    for name, v in ss[s_pos].items():
                        ctx.set(getattr(dut.sparse.payload, name), v)
            else:
                ctx.set(dut.w.valid, 0)
                ctx.set(dut.sparse.valid, 0)
            ctx.set(dut.y.ready, int(rng.random() >= p_stall))
            # sample the handshakes before the edge
            x_took = x_offer and ctx.get(dut.x.ready)
            w_took = w_offer and ctx.get(dut.w.ready)
            s_took = s_offer and ctx.get(dut.sparse.ready)
            if ctx.get(dut.y.valid) and ctx.get(dut.y.ready):
                tr.y.append((ctx.get(dut.y.payload.value), ctx.get(dut.y.payload.last)))
                tr.y_cycles.append(cycle)
                if stop_at is not None and tr.y[-1] != stop_at[len(tr.y) - 1]:
                    break
            await ctx.tick()
            cycle += 1
            if write is not None:
                load_pos += 1
                if load_pos == len(items[load_layer][0]):
                    loads_done_at[load_layer] = cycle + 1
                    load_layer, load_pos = load_layer + 1, 0
            if x_took:
                job, vec = vectors[xv]
                if vec == 0 and x_pos == 0:
                    swapped = job
                x_pos += 1
                if x_pos == len(items[job][1][vec][0]):
                    xv, x_pos = xv + 1, 0
            s_pos += s_took
            if w_took:
                tr.w_cycles.append(cycle - 1)
                w_pos += 1
            if wv < len(vectors) and w_pos == len(ws) and s_pos == len(ss):
                wv, w_pos, s_pos = wv + 1, 0, 0
        for _ in range(4):
            await ctx.tick()
        tr.status.append(ctx.get(dut.status.as_value()))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return tr


def expected(cfg: GemvConfig, jobs: list[Job]) -> list[tuple[int, int]]:
    out = []
    for job in jobs:
        y = gemv.model(cfg, job.layer, job.x).view(np.uint32)
        for v in y:
            out += [(int(w), int(r == len(v) - 1)) for r, w in enumerate(v)]
    return out


def check(dut, jobs, **kw) -> Trace:
    tr = run_engine(dut, jobs, **kw)
    want = expected(dut.config, jobs)
    bad = [i for i, (a, b) in enumerate(zip(tr.y, want)) if a != b]
    assert len(tr.y) == len(want) and not bad, [(i, tr.y[i], want[i]) for i in bad[:5]]
    assert tr.status[-1] & ~1 == 0, f"error bits set: {tr.status[-1]:#x}"
    return tr


# -- hand-sized and random layers ---------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,batch", [(5, 16, 2), (17, 48, 1), (20, 32, 2), (1, 64, 1)],
                         ids=["one-block-per-row", "one-full-tile", "a-tile-and-3-rows", "one-row"])
def test_hand_sized_layers(rows, cols, batch):
    rng = np.random.default_rng(rows * cols)
    cfg = config()
    job = Job(random_layer(SOP4, rows, cols, rng), act_vectors(rng, batch, cols))
    check(GemvEngine(cfg), [job], seed=rows)


def test_lut_ram_tables():
    """Tables built from 16-word LUT RAM memories (a two-cycle read: the x word waits a cycle)."""
    rng = np.random.default_rng(8)
    cfg = config(lutram_depth=16)
    dut = GemvEngine(cfg)
    assert dut.read_latency == 2
    check(dut, [Job(random_layer(SOP4, 20, 48, rng), act_vectors(rng, 2, 48))], seed=5)


def test_tile_order_keeps_each_rows_order():
    order = dot.tile_order(40, 3, 17)
    assert sorted(order) == list(range(120))
    for r in range(40):
        mine = [int(i) for i in order if i // 3 == r]
        assert mine == [3 * r, 3 * r + 1, 3 * r + 2]
    # the sequencer's tags: slot = row mod tile, first / last block of the row, the pass's end
    tags = BlockSequencer.model(40, 3, 17)
    assert list(tags["slot"][:18]) == list(range(17)) + [0] and list(tags["slot"][-6:]) == list(range(6)) * 1
    assert tags["end"].sum() == 1 and tags["end"][-1] == 1


def test_tile_residuals_keep_each_rows_entries_and_end_rows_in_order():
    rng = np.random.default_rng(17)
    layer = with_residuals(random_layer(SOP4, 40, 32, rng), rng, 70)
    tiles = dot.tile_residuals(layer, 17)
    assert len(tiles) == 3
    flat = {k: np.concatenate([t[k] for t in tiles]) for k in tiles[0]}
    real = flat["value"] != 0                          # the entries; the rest is +0 padding
    index = flat["row"][real] * layer.cols + flat["col"][real]
    assert sorted(index) == list(layer.sparse.index) and (flat["col"][~real] == 0).all()
    for t in tiles:
        rows = np.unique(t["row"])
        # every row of the tile once per round; its entries in ascending column, its last one last
        assert (t["row"].reshape(-1, len(rows)) == rows).all()
        assert (t["last"].reshape(-1, len(rows))[-1] == 1).all() and t["last"].sum() == len(rows)
        for r in rows:
            cols = t["col"][(t["row"] == r) & (t["value"] != 0)]
            assert (np.diff(cols) > 0).all()


def test_table_swap_between_two_layers_and_both_points():
    """Two layers back to back (the second's tables loaded while the first runs, then swapped in),
    then an e2m3-ue4m4-g16 engine (one bank, 6-bit codes, unsigned scales)."""
    rng = np.random.default_rng(7)
    cfg = config()
    jobs = [Job(random_layer(SOP4, 19, 32, rng), act_vectors(rng, 2, 32)),
            Job(random_layer(SOP4, 6, 64, rng), act_vectors(rng, 1, 64)),
            Job(random_layer(SOP4, 18, 16, rng), act_vectors(rng, 1, 16))]
    check(GemvEngine(cfg), jobs, seed=1)
    fp6 = config(FP6)
    check(GemvEngine(fp6), [Job(random_layer(FP6, 18, 32, rng), act_vectors(rng, 2, 32))], seed=2)


# -- sparse residuals -----------------------------------------------------------------------------------------

def run_terms(dut, rho, xc, col, stall_seed: int) -> np.ndarray:
    """A term unit alone (``ResidualTerm`` or ``ResidualTermBF16``): entries ``(col, rho)`` offered back
    to back, terms taken with random stalls, the x word holding code ``xc[i]`` in entry i's lane
    supplied two cycles after its read, as the x buffer's port does. Returns the terms' patterns."""
    cfg, n = dut.config, len(rho)
    bits = cfg.act_format.bits
    got = []

    async def bench(ctx):
        i, stall, word = 0, np.random.default_rng(stall_seed), None
        while len(got) < n:
            ctx.set(dut.entries.valid, int(i < n))
            if i < n:
                ctx.set(dut.entries.payload.col, int(col[i]))
                ctx.set(dut.entries.payload.value, int(rho[i]))
            ctx.set(dut.terms.ready, int(stall.random() < 0.7))
            took = i < n and ctx.get(dut.entries.ready)
            if ctx.get(dut.terms.valid) and ctx.get(dut.terms.ready):
                got.append(ctx.get(dut.terms.payload.value))
            latched = word                  # read at the last edge: into the output register at this one
            word = int(xc[i]) << (bits * (int(col[i]) % cfg.group)) if took else None
            await ctx.tick()
            if latched is not None:         # the x buffer's word, two cycles after the read
                ctx.set(dut.x_data, latched)
            if took:
                i += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return np.array(got, np.uint32)


def test_residual_term_unit_bit_exact():
    """rho (BF16) x x_j (E4M3) into binary32: exact, or saturated; subnormal terms and signed zeros."""
    cfg = config()
    dut = ResidualTerm(cfg)
    rng = np.random.default_rng(14)
    n = 1500
    rho = rng.integers(0, 1 << 16, n)
    rho = np.where(((rho >> 7) & 0xFF) == 0xFF, rho & ~(1 << 14), rho)         # finite values only
    xc = rng.integers(0, 256, n)
    xc = np.where((xc & 0x7F) == 0x7F, xc & ~1, xc)                           # no NaN code
    col = rng.integers(0, cfg.max_cols, n)
    want = ResidualTerm.model(rho, xc)
    v = want.view(np.float32)
    assert (np.abs(v) == np.finfo(np.float32).max).any() and ((v == 0) & np.signbit(v)).any()
    assert ((v != 0) & (np.abs(v) < np.finfo(np.float32).tiny)).any()
    np.testing.assert_array_equal(run_terms(dut, rho, xc, col, stall_seed=1), want)


def test_sparse_residuals_after_each_tile():
    """Random layers with entries (rows without any, rows with several, terms that saturate or are
    subnormal), two tiles and a short one; a sparse layer and a plain one back to back."""
    rng = np.random.default_rng(16)
    cfg = config()
    a = with_residuals(random_layer(SOP4, 40, 32, rng), rng, 60)
    b = random_layer(SOP4, 18, 16, rng)
    xa = act_vectors(rng, 2, 32)
    rows, terms = dot.residual_terms(a, xa)
    t = np.abs(terms.reshape(-1))
    assert (t == np.finfo(np.float32).max).any() and ((t > 0) & (t < np.finfo(np.float32).tiny)).any()
    assert 0 < len(np.unique(rows)) < a.rows
    check(GemvEngine(cfg), [Job(a, xa), Job(b, act_vectors(rng, 1, 16))], seed=9)


def test_a_flagged_sparse_entry_goes_to_its_tiles_first_row():
    """docs/dot.md's ``sparse`` row: an entry whose row is outside its tile is flagged and goes to slot 0,
    the tile's first row: its term is added there (row 0: golden's with the entry moved to it, the
    entry's own row without it); with ``last`` (the tile's last round) it closes that sum again, and
    that word takes the place of the row whose last entry it stood for, whatever the term (a +0
    padding entry: row 0's word again; a term: row 17's sum plus it, row 17's own word right). Every
    other word, and the next pass (the entries good), golden's."""
    rng = np.random.default_rng(21)
    cfg = config()
    rho = [int(v) for v in BF16.encode(np.array([1.5, -2.25, 1.5, 0.75]))]
    # row 3: columns 5 and 9 (two rounds in tile 0), row 5: column 7; row 20: column 3 (tile 1, one round)
    at = [(3, 5), (3, 9), (5, 7), (20, 3)]
    base = random_layer(SOP4, 34, 16, rng)

    def layer(entries):
        keep = sorted(entries)
        return LayerStream(base.layout, base.hif, base.luts, base.offset, base.rows, base.cols, base.blocks,
                           Sparse(np.array([r * 16 + c for r, c, _ in keep], np.uint32),
                                  np.array([v for *_, v in keep], np.uint16)))

    good = [(r, c, v) for (r, c), v in zip(at, rho)]
    x = act_vectors(rng, 2, 16)
    assert all(x[0, c] != 0 for _, c in at)                # every term is not 0
    beats = gemv_config.sparse_beats(cfg, layer(good))
    find = {(b["row"], b["col"], b["last"]): i for i, b in enumerate(beats)}
    # tile 0: (3, 5) in round 1 and row 7's +0 padding in round 2 (last) moved to row 30; tile 1: (20, 3) to row 5
    moved = {find[3, 5, 0]: 30, find[7, 0, 1]: 30, find[20, 3, 1]: 5}

    def bad_entries(items):
        xs, ws, sp = items[0][1][0]
        items[0][1][0] = (xs, ws, [{**b, "row": moved.get(i, b["row"])} for i, b in enumerate(sp)])

    tr = run_engine(GemvEngine(cfg), [Job(layer(good), x)], p_idle=0, p_stall=0, edit=bad_entries)
    g1 = gemv.model(cfg, layer([(0, 5, rho[0])] + good[1:3]), x[:1]).view(np.uint32)[0]
    g2 = gemv.model(cfg, layer(good[:3] + [(17, 3, rho[3])]), x[:1]).view(np.uint32)[0]
    want = [int(w) for w in g1]
    want[7], want[20] = want[0], int(g2[17])
    assert [w for w, _ in tr.y[:34]] == want
    assert tr.y[34:] == expected(cfg, [Job(layer(good), x)])[34:]
    assert tr.status[-1] == ERR["sparse"]


def test_the_checks_catch_a_broken_residual_path():
    class UnsignedTerm(ResidualTerm):
        @staticmethod
        def sign(rho_sign, x_sign):
            return rho_sign

    rng = np.random.default_rng(16)
    cfg = config()
    job = Job(with_residuals(random_layer(SOP4, 18, 32, rng), rng, 30), act_vectors(rng, 1, 32))
    assert rows_wrong(GemvEngine(cfg, term=UnsignedTerm), [job]) > 0


# -- a real layer -------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def minilm_query():
    """The first 40 rows of MiniLM's layer-0 query (two full tiles and 6 rows), quantized to sop4-g16,
    without and with sparse residuals, and that layer's real inputs: the BERT forward pass's input to it for the tokens of a sentence,
    rounded to E4M3."""
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    from sop.quantize.sparse import add_sparse

    w = minilm_linear_weights()[QUERY_LAYER][:40].astype(np.float32)
    res = get_quant_format("sop4-g16").quantize(w)
    # and with sparse residuals at the knapsack's SOP4 density, 2 % (quantize/sparse.py)
    return res.stream, add_sparse(res.stream, w, res.recon, int(0.02 * w.size))[0], real_inputs()


def real_inputs() -> np.ndarray:
    """The layer's inputs in the BERT forward pass (quantize/e2e.py, the calibration's forward) for
    each token of a sentence, rounded to E4M3: (tokens, 384)."""
    from sop.quantize.weights import layer_inputs

    return E4M3.quantize(layer_inputs(QUERY_LAYER)).astype(np.float32)         # saturating: +-448


@pytest.mark.long
def test_whole_minilm_query_layer():
    """All 384 rows (22 full tiles and 10 rows) of the layer-0 query, real inputs of two tokens.

    Out of `make test` (a minute of its 20-minute budget): `make sim` runs the same layer through
    the engine's Verilog (gemv_runner's full plan), and `make mutate` runs this."""
    from sop.quantize.schemes import get_quant_format
    from sop.quantize.weights import minilm_linear_weights

    layer = get_quant_format("sop4-g16").quantize(minilm_linear_weights()[QUERY_LAYER].astype(np.float32)).stream
    x = real_inputs()
    check(GemvEngine(config(max_cols=512, max_rows=1023)), [Job(layer, x[[2, 7]])], seed=6, p_idle=0.1,
          p_stall=0.1, max_cycles=400_000)


def test_real_minilm_layer_with_real_activations_under_stalls(minilm_query):
    layer, sparse_layer, x = minilm_query
    assert not len(layer.sparse) and x.shape[1] == layer.cols == 384
    cfg = config(max_cols=512)
    tr = check(GemvEngine(cfg), [Job(layer, x[[1, 5]]), Job(sparse_layer, x[[3]])], seed=3, p_idle=0.3,
               p_stall=0.3)
    assert len(tr.y) == 120


# -- throughput and latency -----------------------------------------------------------------------------------

class FreeRing(RowAccumulator):
    """The row accumulator before: its ring turns freely, so a pass's first block waits for slot 0."""

    def turns(self, empty, offered):
        return 1


class OnePage(BlockSequencer):
    """The sequencer before: one x page in use at a time, so the next vector loads after the pass."""

    def x_ready(self, x_loaded, x_both, swap):
        return ~x_loaded


def pass_cycles(dut: GemvEngine, rows: int, cols: int, batch: int, seed=11, **kw):
    """Run ``batch`` vectors of a random ``rows`` x ``cols`` layer with nothing idle and ``y`` always
    ready; the cycles of the blocks taken and of the y words, per vector."""
    rng = np.random.default_rng(seed)
    job = Job(random_layer(SOP4 if dut.config.layout == SOP4.layout else FP6, rows, cols, rng),
              act_vectors(rng, batch, cols))
    tr = check(dut, [job], p_idle=0, p_stall=0, **kw)
    n = rows * cols // dut.config.group
    return np.array(tr.w_cycles).reshape(batch, n), np.array(tr.y_cycles).reshape(batch, rows)


def no_bubble(dut: GemvEngine, rows: int, cols: int, batch: int = 3, x_ahead=True) -> list[str]:
    """What is wrong with the passes' timing: each vector's ``rows cols / g`` blocks must be taken in
    as many cycles and its last row's y ``latency`` cycles after its last block; with the next
    vector's x sent as soon as the vector before's (``x_ahead``: it loads into the other x page
    during the pass) its first block must follow the last one's at once, else ``cols / g + 1``
    cycles after it (its x beats, in the other page, then the block)."""
    w, y = pass_cycles(dut, rows, cols, batch, x_ahead=x_ahead)
    n, beats = w.shape[1], cols // dut.config.group
    bad = []
    for v in range(batch):
        if (w[v] - w[v, 0] != np.arange(n)).any():
            bad.append(f"vector {v}: {n} blocks in {w[v, -1] - w[v, 0] + 1} cycles")
        if y[v, -1] - w[v, -1] != dut.latency:
            bad.append(f"vector {v}: last y {y[v, -1] - w[v, -1]} cycles after its last block, not {dut.latency}")
        want = 1 if x_ahead else beats + 1
        if v and w[v, 0] - w[v - 1, -1] != want:
            bad.append(f"vector {v}: first block {w[v, 0] - w[v - 1, -1]} cycles after the last one, not {want}")
    return bad


@pytest.mark.parametrize("point", [SOP4, FP6], ids=lambda p: p.name)
def test_one_block_a_cycle_and_the_stated_latency(point):
    """Two full tiles of 8 blocks per row, three vectors, nothing idle and y always ready, each
    vector's x sent as soon as the one before's: 3 x 272 blocks (16 MACs each) in 816 cycles from
    the first block (the ring holds at slot 0 between passes; the next vector's x loads into
    the other page during the pass), each pass's last row's y ``latency`` cycles after its last
    block. A host that sends x only after the blocks: ``cols / g`` cycles without a block between."""
    assert no_bubble(GemvEngine(config(point)), 34, 128) == []
    if point is SOP4:
        assert no_bubble(GemvEngine(config(point)), 34, 128, x_ahead=False) == []


def test_the_cycle_check_catches_the_ring_alignment_wait_and_one_x_page():
    """The designs before: the free-turning ring (a pass's first block waits for slot 0, the FIFO
    behind it fills, the last row is late) and one x page in use at a time (the next vector's x
    waits for the pass, then blocks wait for it)."""
    bad = no_bubble(GemvEngine(config(), acc=FreeRing), 34, 128)
    assert any("blocks in" in b for b in bad) and any("last y" in b for b in bad), bad
    bad = no_bubble(GemvEngine(config(), sequencer=OnePage), 34, 128)
    assert bad == [f"vector {v}: first block 10 cycles after the last one, not 1" for v in (1, 2)], bad


# -- the error bits --------------------------------------------------------------------------------------------

ERR = {name: 1 << (1 + f.offset) for name, f in gemv_config.error_layout()}       # status bits: x_loaded, then errors
X_LOADED = 1


def test_error_bits():
    """Each bit on its own: a bad layer write, an x vector too long and one too short, a NaN code;
    ``clear`` clears them, ``x_loaded`` follows the vector; a block offered before x waits."""
    cfg = config()
    dut = GemvEngine(cfg)
    seen = {}

    async def bench(ctx):
        async def tick(n=1):
            for _ in range(n):
                await ctx.tick()

        def status():
            return ctx.get(dut.status.as_value())

        async def clear():
            ctx.set(dut.clear, 1)
            await tick()
            ctx.set(dut.clear, 0)

        async def layer(rows, bpr):
            ctx.set(dut.layer.payload.rows, rows)
            ctx.set(dut.layer.payload.blocks_per_row, bpr)
            ctx.set(dut.layer.valid, 1)
            await tick()
            ctx.set(dut.layer.valid, 0)

        async def vector(codes_per_beat, swap):
            for i, c in enumerate(codes_per_beat):
                ctx.set(dut.x.payload.codes.as_value(), c)
                ctx.set(dut.x.payload.last, int(i == len(codes_per_beat) - 1))
                ctx.set(dut.x.payload.swap, int(swap and i == 0))
                ctx.set(dut.x.valid, 1)
                assert ctx.get(dut.x.ready)
                await tick()
            ctx.set(dut.x.valid, 0)
            await tick()

        async def blocks(n):
            ctx.set(dut.w.valid, 1)
            ctx.set(dut.w.payload, 0)
            taken = 0
            while taken < n:
                taken += ctx.get(dut.w.ready)
                await tick()
            ctx.set(dut.w.valid, 0)
            await tick(2)

        ctx.set(dut.y.ready, 1)
        # a block before any vector: it waits (not taken), the bit says so
        ctx.set(dut.w.valid, 1)
        for _ in range(5):
            assert not ctx.get(dut.w.ready)
            await tick()
        ctx.set(dut.w.valid, 0)
        await tick()
        seen["w_before_x"] = status()
        await clear()
        seen["cleared"] = status()
        # layer writes: 0 rows, 0 blocks per row, more blocks per row than the buffer holds
        for rows, bpr in ((0, 2), (3, 0), (3, cfg.max_blocks + 1)):
            await layer(rows, bpr)
            await tick()
            seen[f"layer {rows}x{bpr}"] = status()
            await clear()
        await layer(3, 2)                                  # 3 rows, 2 blocks per row: 6 blocks a pass
        await tick()
        seen["good layer"] = status()
        ONE = int(sum(0x38 << (8 * j) for j in range(16)))  # sixteen 1.0 codes
        await vector([ONE] * 3, swap=True)                 # one beat too many
        seen["x too long"] = status()
        await blocks(6)
        seen["after the pass"] = status()
        await clear()
        await vector([ONE], swap=False)                    # one beat too few
        seen["x too short"] = status()
        await blocks(6)
        await clear()
        await vector([ONE, ONE | 0x7F << 40], swap=False)  # a NaN code (0x7F) in column 21
        seen["x nan"] = status()
        await blocks(6)
        await clear()
        await vector([ONE, ONE | 0xFF << 40], swap=False)  # -NaN
        seen["x -nan"] = status()
        await blocks(6)
        await clear()
        await vector([ONE, ONE | 0x7E << 40], swap=False)  # 448, the largest finite: no error
        seen["x 448"] = status()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen["w_before_x"] == ERR["w_before_x"] and seen["cleared"] == 0
    for k in ("layer 0x2", "layer 3x0", f"layer 3x{cfg.max_blocks + 1}"):
        assert seen[k] == ERR["layer"], (k, seen[k])
    assert seen["good layer"] == 0
    assert seen["x too long"] == ERR["x_length"] | X_LOADED and seen["after the pass"] == ERR["x_length"]
    assert seen["x too short"] == ERR["x_length"] | X_LOADED
    assert seen["x nan"] == seen["x -nan"] == ERR["x_nan"] | X_LOADED
    assert seen["x 448"] == X_LOADED


def test_an_error_in_the_cycle_of_clear_is_kept():
    """``clear`` clears the bits ``status`` shows in its cycle; an error event not on ``status`` yet (in
    the cycle of ``clear``, or the cycle before, the bit then in ``error_seen``) is kept, set wins
    over clear, as the shell's bits do. Until 2026-12-07 such an event was dropped: a host that
    reads status and clears could lose the error of a pass gone wrong (silently wrong ``y``)."""
    cfg = config()
    dut = GemvEngine(cfg)
    seen = {}

    async def bench(ctx):
        def status():
            return ctx.get(dut.status.as_value())

        async def cycle(*, clear=0, rows=None, x=None, last=0, swap=0):
            """One edge: ``clear``, a layer write of ``rows`` rows (2 blocks a row), an x beat."""
            ctx.set(dut.clear, clear)
            ctx.set(dut.layer.valid, rows is not None)
            ctx.set(dut.layer.payload.rows, rows or 0)
            ctx.set(dut.layer.payload.blocks_per_row, 2)
            ctx.set(dut.x.valid, x is not None)
            ctx.set(dut.x.payload.codes.as_value(), x or 0)
            ctx.set(dut.x.payload.last, last)
            ctx.set(dut.x.payload.swap, swap)
            assert x is None or ctx.get(dut.x.ready)
            await ctx.tick()

        async def after(n=4):
            """``status`` in each of the next ``n`` cycles (nothing sent)."""
            out = []
            for _ in range(n):
                await cycle()
                out.append(status())
            return out

        await cycle(rows=0, clear=1)                      # a bad layer word in the cycle of clear
        seen["event with clear"] = await after()
        await cycle(clear=1)
        seen["cleared"] = await after()
        await cycle(rows=0)                                # the event, then clear in the next cycle
        await cycle(clear=1)
        seen["event a cycle before clear"] = await after()
        await cycle(clear=1)                               # clear in the first cycle the bit shows
        await cycle(rows=0)
        await cycle()
        shows = status()
        await cycle(clear=1)
        seen["shown, then cleared"] = (shows, await after())
        ONE = int(sum(0x38 << (8 * j) for j in range(16)))
        await cycle(rows=3)
        await cycle()
        # x_length: its check comes a cycle after the beat, straight into the sticky bits; clear then
        await cycle(x=ONE, swap=1)
        await cycle(x=ONE)
        await cycle(x=ONE, last=1)                         # one beat too many
        await cycle(clear=1)
        seen["x_length a cycle after its beat, with clear"] = status()
        await cycle(clear=1)                               # clear in the first cycle it shows: gone for good
        seen["x_length cleared"] = await after(6)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    layer, xl = ERR["layer"], ERR["x_length"] | X_LOADED
    assert seen["event with clear"] == [layer] * 4, seen
    assert seen["cleared"] == [0] * 4, seen
    assert seen["event a cycle before clear"] == [layer] * 4, seen
    assert seen["shown, then cleared"] == (layer, [0] * 4), seen
    assert seen["x_length a cycle after its beat, with clear"] == xl, seen
    assert seen["x_length cleared"] == [X_LOADED] * 6, seen


def test_blocks_offered_before_x_wait_and_are_flagged():
    rng = np.random.default_rng(12)
    cfg = config()
    job = Job(random_layer(SOP4, 18, 32, rng), act_vectors(rng, 1, 32))
    tr = run_engine(GemvEngine(cfg), [job], w_before_x=200, seed=4)
    assert tr.y == expected(cfg, [job])
    assert tr.status[-1] == ERR["w_before_x"]


# -- the checks catch injected bugs --------------------------------------------------------------------------

class SharedSlot(BlockSequencer):
    """The second row of each tile adds into the first row's running sum."""

    def tag(self, slot, first, last, end):
        return super().tag(Mux(slot == 1, 0, slot), first, last, end)


class WrongXWord(GemvEngine):
    """Block column 1 reads x word 0."""

    def x_address(self, col):
        return Mux(col == 1, 0, col)


class SwapNotHeld(BlockSequencer):
    """A new layer's first x beat is taken while the layer before still runs (its swap then changes
    the tables and layer registers under that pass)."""

    def x_ready(self, x_loaded, x_both, swap):
        return ~x_both


class XPageOverrun(BlockSequencer):
    """An x beat is taken while both x pages hold a vector (it overwrites the page of the pass)."""

    def x_ready(self, x_loaded, x_both, swap):
        return ~(swap & x_loaded)


class OtherTablePage(GemvEngine):
    """Blocks read the page the host is writing, not the one they were taken with."""

    def table_page(self, page):
        return ~page


def reversed_rows(rows, bpr, tile):
    """``tile_order`` with each row's blocks in reverse (what a host with the wrong order sends)."""
    order = dot.tile_order(rows, bpr, tile)
    return (order // bpr) * bpr + (bpr - 1 - order % bpr)


def rows_wrong(dut, jobs) -> int:
    """0 if every y word is golden's, else at least 1: the run stops at the first that differs (what the
    checks of a broken engine need; the rest of its run was amaranth.sim time spent on nothing); all of
    them if the engine hangs (a swap under a running pass, say, can leave it waiting for a row that
    never comes)."""
    want = expected(dut.config, jobs)
    # the intact engines run two_layers, the largest jobs given here, in 591 cycles (P = 1) and 1,207
    # (P = 4): 5,000 is well past either, and a mutant that hangs before a wrong word is given up 15,000
    # cycles of amaranth.sim sooner than at the 20,000 of before (swap-not-held ran them all: 12 CPU-s)
    try:
        tr = run_engine(dut, jobs, p_idle=0.1, p_stall=0.1, max_cycles=5_000, stop_at=want)
    except AssertionError as e:
        assert "the engine stopped" in str(e)
        return len(want)
    return sum(a != b for a, b in zip(tr.y, want))


@pytest.fixture(scope="module")
def two_layers():
    rng = np.random.default_rng(13)
    return [Job(random_layer(SOP4, 18, 64, rng), act_vectors(rng, 3, 64)),
            Job(random_layer(SOP4, 17, 32, rng), act_vectors(rng, 1, 32))]


@pytest.mark.parametrize("build", [lambda c: GemvEngine(c, sequencer=SharedSlot), WrongXWord, OtherTablePage,
                                   lambda c: GemvEngine(c, mux=mutants.InvertedSelect),
                                   lambda c: GemvEngine(c, bank=mutants.FlippedLutBit),
                                   lambda c: GemvEngine(c, sequencer=SwapNotHeld),
                                   lambda c: GemvEngine(c, sequencer=XPageOverrun)],
                         ids=["shared-slot", "wrong-x-word", "other-table-page", "inverted-select", "flipped-lut-bit",
                              "swap-not-held", "x-page-overrun"])
def test_the_checks_catch_a_broken_engine(build, two_layers):
    assert rows_wrong(build(config()), two_layers) > 0


class NextXChunk(GemvEngine):
    """Folded: a block's chunk c reads the activations of chunk c + 1 (mod g / P)."""

    def x_chunk(self, chunk):
        return chunk + 1


@pytest.mark.parametrize("build", [NextXChunk, WrongXWord, lambda c: GemvEngine(c, mux=mutants.InvertedSelect),
                                   lambda c: GemvEngine(c, bank=mutants.FlippedLutBit)],
                         ids=["next-x-chunk", "wrong-x-word", "inverted-select", "flipped-lut-bit"])
def test_the_checks_catch_a_broken_folded_front_end(build, two_layers):
    """The folded front end (P = 4: a chunk of codes a cycle, P table copies) under the same checks."""
    assert rows_wrong(build(config(dot_lanes=4)), two_layers) > 0


def test_the_checks_catch_a_block_order_that_reverses_rows(two_layers):
    cfg = config()
    jobs = [Job(j.layer, j.x, reversed_rows(j.layer.rows, j.layer.cols // 16, cfg.tile)) for j in two_layers]
    assert rows_wrong(GemvEngine(cfg), jobs) > 0


# -- the Verilog -------------------------------------------------------------------------------------------------

def test_named_configurations_elaborate_to_verilog():
    configs = gemv_configs()
    assert {"gemv-sop4-g16", "gemv-e2m3-ue4m4-g16"} <= set(configs)
    cfg = configs["gemv-sop4-g16"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dut = GemvEngine(cfg)
        text = verilog.convert(dut, name=gemv.module_name(cfg), emit_src=False)
    assert f"module {gemv.module_name(cfg)}" in text
    doc = gemv.describe(cfg, dut)
    assert doc["latency_cycles"] == sum(doc["latency_stages"].values())
    assert {p["name"] for p in doc["ports"]} >= {"x__payload", "w__payload", "y__payload", "status"}


def test_bad_activation_formats_are_refused_in_one_line():
    """BF16 and E4M3 engines are built (BF16: tests/test_hdl_gemv_bf16.py); any other ``act`` is refused
    in one line that names the valid ones."""
    cfg = gemv_configs()["gemv-sop4-g16"]
    assert GemvConfig(**{**vars(cfg), "act": "bf16"}).act_format is dot.ACT_FORMATS["bf16"]
    for bad in ("fp16", "E4M3", "", None):
        with pytest.raises(ValueError) as err:
            GemvConfig(**{**vars(cfg), "act": bad})
        msg = str(err.value)
        assert "\n" not in msg and msg == (f"engine config 'gemv-sop4-g16': act must be one of 'bf16', 'e4m3', "
                                           f"got {bad!r}")


# -- a folded block dot unit (GemvConfig.dot_lanes, hdl.block_dot_folded) ----------------------------------------

@pytest.mark.parametrize("lanes,tail,acc", [(4, "pipelined", {}), (1, "serial", {}),
                                            (1, "serial", {"acc_adder": "compact", "tile": 4})])
def test_engine_with_a_folded_block_dot_unit(lanes, tail, acc):
    """``dot_lanes`` P: the front end folded too (a chunk of P codes a cycle, P table copies, a chunk of
    the x word), bit-exact on random layers with residual entries and a table swap under idles and
    stalls; with nothing idle exactly one block every ``g / P`` cycles, from the first block on, the next
    vector's first block ``g / P`` cycles after the last, and the last row's y ``latency`` cycles after
    its last block, plus at most the ring's wait for its slot (values come every ``g / P`` cycles).
    The last case is the iCEBreaker's engine: the compact FP32 adder, tiles of 4 rows."""
    rng = np.random.default_rng(31)
    cfg = config(dot_lanes=lanes, dot_tail=tail, **acc)
    dut = GemvEngine(cfg)
    assert isinstance(dut.dot, BlockDotFolded) and dut.dot.chunked and cfg.macs_per_cycle == lanes
    assert dut.bank.lanes == lanes and len(dut.x_buffer.read_data) == 8 * lanes
    assert cfg.describe()["dot_lanes"] == lanes and "dot_lanes" not in config().describe()
    assert dut.latencies()["fold"] == 16 // lanes - 1
    jobs = [Job(with_residuals(random_layer(SOP4, 20, 32, rng), rng, 12), act_vectors(rng, 2, 32)),
            Job(random_layer(SOP4, 6, 48, rng), act_vectors(rng, 1, 48))]
    check(dut, jobs, seed=3)
    step = SOP4.layout.group // lanes
    w, y = pass_cycles(GemvEngine(cfg), 34, 64, 2)
    assert (np.diff(w, axis=1) == step).all() and w[1, 0] - w[0, -1] == step, np.diff(w)
    late = y[:, -1] - w[:, -1] - dut.latency
    assert ((0 <= late) & (late < cfg.tile)).all(), (late, dut.latency)


def test_engine_without_the_residual_path():
    """``sparse=False`` (the iCEBreaker's engine: folded, the compact adder, no residual path): no term
    unit; bit-exact on layers without residual entries and a table swap under idles and stalls; a layer
    written with ``sparse`` set is the ``layer`` error (on an engine with the path the same write is
    not), and its blocks wait (no pass starts with the error set: the host has cleared nothing)."""
    rng = np.random.default_rng(44)
    cfg = config(dot_lanes=1, dot_tail="serial", acc_adder="compact", tile=4, sparse=False)
    dut = GemvEngine(cfg)
    assert cfg.describe()["sparse"] is False and "sparse" not in config().describe()
    assert not isinstance(dut.term, ResidualTerm)
    check(dut, [Job(random_layer(SOP4, 10, 32, rng), act_vectors(rng, 2, 32)),
                Job(random_layer(SOP4, 5, 48, rng), act_vectors(rng, 1, 48))], seed=5)

    def layer_error(engine):
        seen = []

        async def bench(ctx):
            lw = engine.layer.payload
            ctx.set(lw.rows, 3)
            ctx.set(lw.blocks_per_row, 2)
            ctx.set(lw.sparse, 1)
            ctx.set(engine.layer.valid, 1)
            await ctx.tick()
            ctx.set(engine.layer.valid, 0)
            await ctx.tick().repeat(3)
            seen.append(ctx.get(engine.status.as_value()))

        sim = Simulator(engine)
        sim.add_clock(1e-8)
        sim.add_testbench(bench)
        sim.run()
        return seen[0]

    assert layer_error(GemvEngine(cfg)) == ERR["layer"]
    assert layer_error(GemvEngine(config(dot_lanes=1, dot_tail="serial"))) == 0


def test_folded_engine_configs_are_checked():
    """``dot_lanes`` a power of two below g, E4M3 only; ``dot_tail`` 'serial' only with it; ``acc_adder`` and the
    tile it allows: one line each."""
    for kw, words in [(dict(dot_lanes=3), "dot_lanes must be 0"), (dict(dot_lanes=16), "dot_lanes must be 0"),
                      (dict(dot_lanes=4, act="bf16"), "E4M3 activations only"),
                      (dict(dot_tail="serial"), "dot_tail must be"), (dict(dot_lanes=4, dot_tail="x"), "dot_tail must be"),
                      (dict(acc_adder="x"), "acc_adder must be one of 'full', 'compact'"),
                      (dict(acc_adder="compact", tile=3), "tile must be at least 4 rows"),
                      (dict(tile=16), "tile must be at least 17 rows")]:
        with pytest.raises(ValueError, match=words) as err:
            config(**kw)
        assert "\n" not in str(err.value)
