"""The GEMV engine's block sequencer (hdl.gemv): stage 0, handshakes, block counters, pages, status.

Role: takes the engine's ``x``, ``w``, ``layer`` and ``sparse`` streams; writes x beats into the x
buffer's free page; gives each block its tag from the counters of ``golden.dot.tile_order`` and
holds it in stage 0 for the table and x reads (``issue``, ``IssueSignature``); holds the layer
registers of both pages; passes each tile's residual entries on to the term unit once the blocks
are drained; keeps the sticky error bits. Contract, timing and latency (1): ``BlockSequencer``'s
docstring; ``BlockSequencer.model`` the counters' values per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Array, Cat, Module, Mux, Signal, Value, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot

from .arith import stage_reg
from .config import OFFSET_SHAPE
from .gemv_config import (GemvConfig, entry_layout, error_layout, layer_layout, sparse_layout, status_layout,
                          tag_layout, x_layout)
from .gemv_x_buffer import XWriteSignature


class IssueSignature(wiring.Signature):
    """Stage 0 (the block in hand) to the table and x reads: its bits, page, block column, the
    layer's offset and its tag."""

    def __init__(self, config: GemvConfig):
        super().__init__({"valid": Out(1), "block": Out(unsigned(config.layout.block_bits)), "page": Out(1),
                          "col": Out(range(config.max_blocks)), "x_page": Out(1), "offset": Out(OFFSET_SHAPE),
                          "tag": Out(tag_layout(config))})


def model(rows: int, blocks_per_row: int, tile: int) -> dict[str, np.ndarray]:
    """Per block in stream order (``golden.dot.tile_order``): ``col``, ``slot``, ``first``, ``last``,
    ``end``."""
    order = dot.tile_order(rows, blocks_per_row, tile)
    row, col = order // blocks_per_row, order % blocks_per_row
    end = np.zeros(len(order), np.int64)
    end[-1] = 1
    return {"col": col, "slot": row % tile, "first": (col == 0).astype(np.int64),
            "last": (col == blocks_per_row - 1).astype(np.int64), "end": end}


@dataclass(frozen=True)
class _Pages:
    """The layer registers of both pages (``Array``s a page indexes) and the active page."""
    active: Signal
    rows_m1: Array
    bpr_m1: Array
    rows_m2: Array
    bpr_m2: Array
    offset: Array
    sparse: Array


@dataclass(frozen=True)
class _XPages:
    """The x pages' state that the blocks' side reads and frees."""
    held: Signal
    loaded: Signal
    both: Signal
    rpage: Signal
    take: Signal
    end_taken: Signal       # the last block of x_rpage's pass is taken (its page is not yet free)


@dataclass(frozen=True)
class _Counters:
    """The counters of tile_order, the active page's registers copied, and the flags on them."""
    col: Signal
    slot: Signal
    row: Signal
    tile_base: Signal
    rows_last: Signal
    cols_last: Signal
    rows_last_m1: Signal
    cols_last_m1: Signal
    with_terms: Value
    at_last_row: Signal
    last_slot: Signal
    row_done: Signal
    col_first: Signal
    settled: Signal
    column_done: Value


@dataclass(frozen=True)
class _Stage0:
    """Stage 0's registers, in the order of the ``issue`` port."""
    valid: Signal
    block: Signal
    page: Signal
    col: Signal
    x_page: Signal
    offset: Signal
    tag: Signal


@dataclass(frozen=True)
class _Tile:
    """The tile whose residual entries come after its blocks (the ``terms`` and ``terms_*`` registers):
    ``_step_counters`` loads it at the tile's last block, ``_entry_register`` takes its entries."""
    pending: Signal         # its entries come now (no block is taken meanwhile)
    base: Signal            # its first row
    top: Signal             # its last row
    top_slot: Signal        # its last row's slot
    pass_end: Signal        # it is the pass's last tile
    rows_in: Signal         # its rows whose last entry has come in
    all_in: Signal          # its last entry has come in
    page: Signal            # the x page its entries read


class BlockSequencer(wiring.Component):
    """Stage 0 of the engine. Takes x beats (into the x buffer) and blocks (into stage 0, with their
    tags from the counters of ``golden.dot.tile_order``), holds the layer registers of both pages
    and the status. ``en`` (in, the front end's pipeline enable) moves stage 0 into the reads: a
    block taken at edge ``t`` is on ``issue`` from cycle ``t + 1`` (``latency`` 1) until the first
    enabled edge after; ``offer`` (out) is ``w.valid`` where a block may be taken (the pipeline's
    input valid). After each tile's blocks of a layer with residual entries it takes the tile's
    entries (``sparse``, ``golden.dot.tile_residuals``' order) into an entry register and passes
    them on (``entries``, to the term unit) once ``drained`` (no block left in the front end or the
    block dot unit); the next tile's blocks wait for them to leave the term unit (``term_busy``).
    The counters' comparisons are registered flags, worked out a block ahead, against registered
    copies of the active page's registers; a block is taken the cycle after its vector's last x beat
    at the earliest, and not in the two cycles after a swap beat (the flags then see the page that
    beat swapped in). Two x pages: ``x`` beats go into the free one while the other's pass runs;
    ``issue.x_page`` is the page a block reads, ``term_page`` the one a tile's entries read."""

    latency = 1
    model = staticmethod(model)

    def __init__(self, config: GemvConfig):
        self.config = config
        super().__init__({
            "x": In(stream.Signature(x_layout(config))),
            "w": In(stream.Signature(unsigned(config.layout.block_bits))),
            "layer": In(stream.Signature(layer_layout(config))),
            "sparse": In(stream.Signature(sparse_layout(config))),
            "clear": In(1),
            "en": In(1),
            "offer": Out(1),
            "drained": In(1),
            "term_busy": In(1),
            "issue": Out(IssueSignature(config)),
            "entries": Out(stream.Signature(entry_layout(config))),
            "term_page": Out(1),
            "x_write": Out(XWriteSignature(config)),
            "write_page": Out(1),
            "status": Out(status_layout()),
        })

    @property
    def _rows_shape(self):
        """The shape of a row, a row count or a tile's base."""
        return unsigned(self.config.max_rows.bit_length())

    @property
    def _bpr_shape(self):
        """The shape of a block column or blocks per row - 1."""
        return range(self.config.max_blocks)

    def elaborate(self, platform):
        m = Module()
        errors, error_now, x_length_late = self._error_bits(m)
        pages = self._layer_pages(m, error_now)
        x_pages = self._x_pages(m, pages, error_now, x_length_late)
        cnt = self._counters(m, pages, x_pages)
        tile = self._tile()
        w_take = self._block_handshake(m, cnt, tile, x_pages, error_now)
        s0 = self._stage0(m, pages, x_pages, cnt, w_take)
        self._step_counters(m, cnt, tile, x_pages, w_take)
        terms_done = self._entry_register(m, cnt, tile, error_now)
        self._free_x_page(m, x_pages, cnt, s0, w_take, terms_done)
        # stage 0 on the issue port, the term unit's x page, the status
        m.d.comb += [self.issue.valid.eq(s0.valid), self.issue.block.eq(s0.block), self.issue.page.eq(s0.page),
                     self.issue.col.eq(s0.col), self.issue.x_page.eq(s0.x_page), self.issue.offset.eq(s0.offset),
                     self.issue.tag.eq(s0.tag), self.term_page.eq(tile.page),
                     self.status.x_loaded.eq(x_pages.loaded), self.status.errors.eq(errors)]
        return m

    def _error_bits(self, m):
        """The sticky error bits (``errors``), and ``error_now`` that the sections below drive."""
        errors = Signal(error_layout(), name="errors")
        error_now = Signal(error_layout(), name="error_now")
        # the errors found now, registered before they join the sticky bits (a cycle later on status);
        # the x length check (x_length_late) is worked out on registers already, a cycle after the
        # beat, and joins the sticky bits straight (error_seen leaves its bit out: else a clear in
        # the cycle it shows would see it come back a cycle later)
        # (every bit of error_now is driven by an expression: a comb process that only assigns a
        # constant never runs in a 4-state simulator such as Icarus, and leaves its bit X)
        error_seen = Signal(error_layout(), name="error_seen")
        x_length_late = Signal(name="x_length_late")
        # ``clear`` clears the bits status shows in its cycle; an event not on status yet (in the
        # cycle of clear, or the cycle before: in error_seen) is kept, set wins over clear: a host
        # that clears in the cycle it reads status loses no error it did not read (the shell's rule
        # too). Until 2026-12-07 clear dropped those events: a pass gone wrong then left no bit
        x_length, width = error_layout()["x_length"].offset, error_layout().size
        kept = Mux(self.clear, 0, errors.as_value())
        m.d.sync += [errors.eq(kept | error_seen.as_value() | (x_length_late << x_length)),
                     error_seen.eq(error_now.as_value() & ((1 << width) - 1 - (1 << x_length)))]
        return errors, error_now, x_length_late

    def _layer_pages(self, m, error_now) -> _Pages:
        """The layer registers, two pages; the host writes the inactive one."""
        cfg, B = self.config, self.config.max_blocks
        rows_shape, bpr_shape = self._rows_shape, self._bpr_shape
        active = Signal(name="active")
        rows_m1 = Array(Signal(rows_shape, name=f"rows_m1_p{p}", reset_less=True) for p in range(2))
        bpr_m1 = Array(Signal(bpr_shape, name=f"bpr_m1_p{p}", reset_less=True) for p in range(2))
        offset = Array(Signal(OFFSET_SHAPE, name=f"offset_p{p}", reset_less=True) for p in range(2))
        sparse = Array(Signal(name=f"sparse_p{p}", reset_less=True) for p in range(2))
        # rows - 2 and blocks per row - 2: what the counters' flags below compare with a block ahead
        rows_m2 = Array(Signal(rows_shape, name=f"rows_m2_p{p}", reset_less=True) for p in range(2))
        bpr_m2 = Array(Signal(bpr_shape, name=f"bpr_m2_p{p}", reset_less=True) for p in range(2))
        lw = self.layer.payload
        m.d.comb += self.layer.ready.eq(1)
        with m.If(self.layer.valid):
            m.d.sync += [rows_m1[~active].eq(lw.rows - 1), bpr_m1[~active].eq(lw.blocks_per_row - 1),
                         rows_m2[~active].eq(lw.rows - 2), bpr_m2[~active].eq(lw.blocks_per_row - 2),
                         offset[~active].eq(lw.offset), sparse[~active].eq(lw.sparse if cfg.sparse else 0)]
            # a bound the field's width already enforces is not compared (a constant compare,
            # which Verilator's lint refuses)
            too_many_rows = (lw.rows > cfg.max_rows) if cfg.max_rows < (1 << cfg.max_rows.bit_length()) - 1 else 0
            too_many_blocks = (lw.blocks_per_row > B) if B < (1 << len(lw.blocks_per_row)) - 1 else 0
            bad = (lw.rows == 0) | too_many_rows | (lw.blocks_per_row == 0) | too_many_blocks
            if not cfg.sparse:     # an engine without the residual path refuses a layer with entries
                bad = bad | lw.sparse
            m.d.comb += error_now.layer.eq(bad)
        m.d.comb += self.write_page.eq(~active)
        return _Pages(active, rows_m1, bpr_m1, rows_m2, bpr_m2, offset, sparse)

    def _x_pages(self, m, pages, error_now, x_length_late) -> _XPages:
        """x: two pages of the buffer, a vector each; the swap beat flips the layer page."""
        # A vector loads into the free x page while the other's pass runs; a swap beat (a new layer:
        # it changes the layer registers and tables the pass uses) only while no vector is loaded.
        B, active = self.config.max_blocks, pages.active
        x_held = Signal(range(3), name="x_held")     # vectors loaded and their passes not done
        x_loaded = Signal(name="x_loaded")          # x_held != 0
        x_both = Signal(name="x_both")              # x_held == 2: no page free
        x_wpage = Signal(name="x_wpage")            # the x page the next beat writes
        x_rpage = Signal(name="x_rpage")            # the x page of the pass whose blocks come now
        end_taken = Signal(name="end_taken")        # that pass's last block is taken
        x_count = Signal(range(2 * B), name="x_count")          # beats of the vector so far (saturates)
        xp = self.x.payload
        page_now = active ^ (self.x.valid & xp.swap)            # the page of a beat taken now
        x_take = Signal(name="x_take")
        wb = (B - 1).bit_length()                               # an x page's address bits
        m.d.comb += [self.x.ready.eq(self.x_ready(x_loaded, x_both, xp.swap)),
                     x_take.eq(self.x.valid & self.x.ready),
                     self.x_write.en.eq(x_take), self.x_write.addr.eq(Cat(x_count[:wb], x_wpage)),
                     self.x_write.data.eq(xp.codes.as_value())]
        # the length check a cycle later, on registered copies (the beat's page's blocks per row among them)
        xl_take, xl_last = Signal(name="xl_take"), Signal(name="xl_last", reset_less=True)
        xl_count = Signal.like(x_count, name="xl_count", reset_less=True)
        bpr_now = Signal(self._bpr_shape, name="xl_bpr", reset_less=True)       # the beat's page's blocks per row - 1
        m.d.sync += [xl_take.eq(x_take), xl_last.eq(xp.last), xl_count.eq(x_count),
                     bpr_now.eq(pages.bpr_m1[page_now])]
        m.d.comb += [x_length_late.eq(xl_take & ((xl_count > bpr_now) | (xl_last & (xl_count != bpr_now)))),
                     error_now.x_length.eq(x_length_late)]
        with m.If(x_take):
            m.d.sync += active.eq(page_now)
            m.d.comb += error_now.x_nan.eq(Cat(self.not_finite(c) for c in xp.codes).any())
            with m.If(xp.last):
                m.d.sync += [x_count.eq(0), x_wpage.eq(~x_wpage)]
            with m.Elif(~x_count[-1]):
                m.d.sync += x_count.eq(x_count + 1)
        return _XPages(x_held, x_loaded, x_both, x_rpage, x_take, end_taken)

    def _counters(self, m, pages, x_pages) -> _Counters:
        """The counters of tile_order (``_step_counters`` steps them), registered copies of the active
        page's registers, and the counters' comparisons: registered flags worked out a block ahead."""
        S, rows_shape, bpr_shape = self.config.tile, self._rows_shape, self._bpr_shape
        active = pages.active
        col = Signal(bpr_shape, name="col")                   # block column of the next block
        slot = Signal(range(S), name="slot")                  # its row's slot (row - tile base)
        row = Signal(rows_shape, name="row")
        tile_base = Signal(rows_shape, name="tile_base")
        # the active page's registers copied every cycle (a cycle late: the flags see a swap two
        # cycles after its beat, and no block is taken in the two cycles after a swap beat)
        rows_last = stage_reg(m, 1, "rows_last", pages.rows_m1[active], rows_shape)
        cols_last = stage_reg(m, 1, "cols_last", pages.bpr_m1[active], bpr_shape)
        rows_last_m1 = stage_reg(m, 1, "rows_last_m1", pages.rows_m2[active], rows_shape)
        cols_last_m1 = stage_reg(m, 1, "cols_last_m1", pages.bpr_m2[active], bpr_shape)
        with_terms = pages.sparse[active]
        # the counters' comparisons as flags, registers worked out a block ahead (from the counters
        # and rows - 2, blocks per row - 2) when a block is taken, else from the counters as they are:
        # no comparison lies between the counters and their next values. A block is taken only two
        # cycles after a swap beat (``settled``): a swap changes the layer registers the flags use.
        at_last_row = Signal(name="at_last_row")             # row == rows - 1
        last_slot = Signal(name="last_slot")                 # slot == tile - 1
        row_done = Signal(name="row_done")                   # col == blocks per row - 1
        col_first = Signal(name="col_first", init=1)          # col == 0
        settled = Signal(name="settled")
        swap_take, swap_took = Signal(name="swap_take"), Signal(name="swap_took")
        m.d.comb += swap_take.eq(x_pages.take & self.x.payload.swap)
        m.d.sync += [swap_took.eq(swap_take), settled.eq(~swap_take & ~swap_took)]
        column_done = last_slot | at_last_row                 # the tile's last row of this column
        return _Counters(col, slot, row, tile_base, rows_last, cols_last, rows_last_m1, cols_last_m1, with_terms,
                         at_last_row, last_slot, row_done, col_first, settled, column_done)

    def _tile(self) -> _Tile:
        """The registers of the tile whose residual entries come (loaded by ``_step_counters``)."""
        S, rows_shape = self.config.tile, self._rows_shape
        return _Tile(pending=Signal(name="terms"), base=Signal(rows_shape, name="terms_base"),
                     top=Signal(rows_shape, name="terms_top"), top_slot=Signal(range(S), name="terms_last"),
                     pass_end=Signal(name="terms_end"), rows_in=Signal(range(S), name="terms_rows"),
                     all_in=Signal(name="terms_in"), page=Signal(name="terms_page"))

    def _block_handshake(self, m, cnt, tile, x_pages, error_now):
        """The ``w`` handshake: whether a block may be taken now (``w_take``, returned)."""
        w_take = Signal(name="w_take")
        # a vector whose blocks may come: the oldest one's, until its last block is taken, then the
        # next one's if it is loaded (its page is the other: x_rpage flips at that last block)
        pass_open = (Mux(x_pages.end_taken, x_pages.both, x_pages.loaded) & cnt.settled & ~tile.pending
                     & ~self.term_busy)
        m.d.comb += [self.w.ready.eq(self.en & pass_open), w_take.eq(self.w.valid & self.w.ready),
                     self.offer.eq(self.w.valid & pass_open)]
        m.d.comb += error_now.w_before_x.eq(self.w.valid & ~x_pages.loaded)
        return w_take

    def _stage0(self, m, pages, x_pages, cnt, w_take) -> _Stage0:
        """Stage 0: the block in hand and its page, x page, column, offset and tag (the ``issue`` port)."""
        cfg, bpr_shape, active = self.config, self._bpr_shape, pages.active
        valid0 = Signal(name="valid0")
        # stage 0 loads on every enabled edge, a block taken or not (valid0 says which): the enable
        # is a register, where the take is logic with a hundred loads
        block0 = stage_reg(m, self.en, "block0", self.w.payload, unsigned(cfg.layout.block_bits))
        page0 = stage_reg(m, self.en, "page0", active, 1)
        xpage0 = stage_reg(m, self.en, "xpage0", x_pages.rpage, 1)
        col0 = stage_reg(m, self.en, "col0", cnt.col, bpr_shape)
        offset0 = stage_reg(m, self.en, "offset0", pages.offset[active], OFFSET_SHAPE)
        # with residual entries a row's last value is its last entry's term, not its last block's
        tag = self.tag(cnt.slot, cnt.col_first, cnt.row_done & ~cnt.with_terms,
                       cnt.column_done & cnt.row_done & cnt.at_last_row & ~cnt.with_terms)
        tag0 = stage_reg(m, self.en, "tag0", tag, tag_layout(cfg))
        with m.If(self.en):
            m.d.sync += valid0.eq(w_take)
        return _Stage0(valid0, block0, page0, col0, xpage0, offset0, tag0)

    def _step_counters(self, m, cnt, tile, x_pages, w_take):
        """The counters' next values as a block is taken, and ``tile`` loaded at a tile's last block."""
        S = self.config.tile
        slot, row, col, tile_base, x_rpage = cnt.slot, cnt.row, cnt.col, cnt.tile_base, x_pages.rpage
        last_slot, at_last_row, row_done, col_first = cnt.last_slot, cnt.at_last_row, cnt.row_done, cnt.col_first
        rows_last, cols_last, rows_last_m1 = cnt.rows_last, cnt.cols_last, cnt.rows_last_m1
        cols_last_m1, column_done, with_terms = cnt.cols_last_m1, cnt.column_done, cnt.with_terms
        rows_before_last = row == rows_last_m1               # row + 1 is the last row
        with m.If(w_take):
            with m.If(~column_done):
                m.d.sync += [slot.eq(slot + 1), row.eq(row + 1), last_slot.eq(slot == S - 2),
                             at_last_row.eq(rows_before_last)]
            with m.Elif(~row_done):
                m.d.sync += [slot.eq(0), row.eq(tile_base), col.eq(col + 1), last_slot.eq(0),
                             at_last_row.eq(tile_base == rows_last), row_done.eq(col == cols_last_m1),
                             col_first.eq(0)]
            with m.Elif(~at_last_row):                            # the next tile
                m.d.sync += [slot.eq(0), row.eq(row + 1), tile_base.eq(row + 1), col.eq(0), last_slot.eq(0),
                             at_last_row.eq(rows_before_last), row_done.eq(cols_last == 0), col_first.eq(1)]
            with m.Else():                                        # the pass's last block
                m.d.sync += [slot.eq(0), row.eq(0), tile_base.eq(0), col.eq(0), last_slot.eq(0), x_rpage.eq(~x_rpage),
                             at_last_row.eq(rows_last == 0), row_done.eq(cols_last == 0), col_first.eq(1)]
            with m.If(column_done & row_done & with_terms):       # the tile's last block: its entries next
                m.d.sync += [tile.pending.eq(1), tile.base.eq(tile_base), tile.top.eq(row), tile.top_slot.eq(slot),
                             tile.pass_end.eq(at_last_row), tile.rows_in.eq(0), tile.all_in.eq(0),
                             tile.page.eq(x_rpage)]
        with m.Else():
            m.d.sync += [last_slot.eq(slot == S - 1), at_last_row.eq(row == rows_last),
                         row_done.eq(col == cols_last), col_first.eq(col == 0)]

    def _entry_register(self, m, cnt, tile, error_now):
        """The entry register between ``sparse`` and ``entries``: each tile's residual entries, after its blocks."""
        # An entry register between ``sparse`` and ``entries``: it takes the tile's entries (while
        # ``tile.pending``, until the tile's last one is in) and works out their slot, whether they are
        # outside the tile and whether they are the tile's last on the way in; it hands them on
        # once the tile's blocks are out (``drained``)
        cfg, S, pending = self.config, self.config.tile, tile.pending
        sp, ent = self.sparse.payload, self.entries
        e_valid = Signal(name="entry_valid")
        e_col = Signal.like(sp.col, name="entry_col", reset_less=True)
        e_value = Signal.like(sp.value, name="entry_value", reset_less=True)
        e_last, e_final, e_outside = (Signal(name=f"entry_{n}", reset_less=True) for n in ("last", "final", "outside"))
        e_slot = Signal(range(S), name="entry_slot", reset_less=True)
        entry_slot = sp.row - tile.base
        outside = (sp.row < tile.base) | (sp.row > tile.top) | (sp.col >> (cfg.group - 1).bit_length() > cnt.cols_last)
        final = sp.last & (tile.rows_in == tile.top_slot)     # the tile's last row's last entry
        ent_take = Signal(name="entry_take")
        m.d.comb += [ent.valid.eq(e_valid & self.drained), ent_take.eq(ent.valid & ent.ready),
                     self.sparse.ready.eq(pending & ~tile.all_in & (~e_valid | ent_take)),
                     ent.payload.col.eq(e_col), ent.payload.value.eq(e_value),
                     ent.payload.tag.eq(self.tag(Mux(e_outside, 0, e_slot), 0, e_last, e_final & tile.pass_end))]
        terms_done = Signal(name="terms_done")                # the pass's last entry is taken
        with m.If(self.sparse.ready):             # (loaded taken or not: e_valid says which)
            m.d.sync += [e_col.eq(sp.col), e_value.eq(sp.value), e_last.eq(sp.last), e_final.eq(final),
                         e_outside.eq(outside), e_slot.eq(entry_slot[:len(e_slot)])]
        with m.If(self.sparse.valid & self.sparse.ready):
            m.d.sync += e_valid.eq(1)
            with m.If(sp.last):
                m.d.sync += tile.rows_in.eq(tile.rows_in + 1)
                with m.If(final):
                    m.d.sync += tile.all_in.eq(1)
        with m.Elif(ent_take):
            m.d.sync += e_valid.eq(0)
        with m.If(ent_take):
            m.d.comb += error_now.sparse.eq(e_outside)
            with m.If(e_final):
                m.d.sync += [pending.eq(0), terms_done.eq(tile.pass_end)]
        return terms_done

    def _free_x_page(self, m, x_pages, cnt, s0, w_take, terms_done):
        """The x pages held (``x_held``): one more as a vector loads, one fewer as its pass ends (``end_taken``)."""
        # the pass's last block leaves stage 0, or its last entry the term unit (their x words are read
        # by then): its x page is free. (A block of the next pass may be taken at that edge: its last
        # block then sets end_taken again.)
        freed = (self.en & s0.valid & s0.tag.end) | (terms_done & ~self.term_busy)
        x_in = x_pages.take & self.x.payload.last             # a vector loaded
        x_held_next = x_pages.held + x_in - freed
        m.d.sync += [x_pages.held.eq(x_held_next), x_pages.loaded.eq(x_held_next != 0),
                     x_pages.both.eq(x_held_next == 2)]
        with m.If(freed):
            m.d.sync += [x_pages.end_taken.eq(0), terms_done.eq(0)]
        with m.If(w_take & cnt.column_done & cnt.row_done & cnt.at_last_row):
            m.d.sync += x_pages.end_taken.eq(1)

    def x_ready(self, x_loaded, x_both, swap):
        """Whether an x beat may be taken: while an x page is free, and a new layer's first beat
        (``swap``) only while no vector is loaded (tests override it to inject a bug, or to use one
        page at a time, the design before)."""
        return ~x_both & ~(swap & x_loaded)

    def not_finite(self, code):
        """Whether an activation code is not a finite value (the ``x_nan`` error): E4M3's NaN
        (S.1111.111; E4M3 has no Inf), BF16's Inf and NaN (an exponent of all ones)."""
        fmt = self.config.act_format
        if fmt.specials == "ieee":
            return code[fmt.mbits:fmt.mbits + fmt.ebits] == (1 << fmt.ebits) - 1
        return code[:fmt.bits - 1] == (1 << (fmt.bits - 1)) - 1

    def tag(self, slot, first, last, end):
        """A block's tag (tests override it to inject a bug)."""
        return Cat(slot, first, last, end)

