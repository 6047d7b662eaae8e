"""GEMV engine: ``y = W x`` straight from the packed blocks (issue 15; docs/dot.md section 8).

Role: the SOP dot-product engine's top. The activation vector ``x`` (E4M3 or BF16
codes, ``GemvConfig.act``) is loaded once per vector into a page of a two-page
buffer (the next vector loads into the other page while the pass runs); the layer's packed blocks ``W`` stream
in, one block per beat, in ``golden.dot.tile_order``; each block's ``g`` codes
are looked up in the LUT bank its selection bit picks (the decoder's table RAM
with two pages, hdl.lut_bank, hdl.codebook_mux), its dot product with the
block's ``g`` activations is summed exactly, scaled and rounded once into FP32
(hdl.block_dot), and a row's block values, then its sparse residual terms, are
added in FP32 in golden's order (hdl.fp32_acc): ``y`` leaves as a stream of
FP32 words, bit for bit ``golden.dot.gemv``.

Components, each in a module of its own (hdl.gemv_sequencer, hdl.gemv_x_buffer, hdl.gemv_term;
the configuration and the ports' payloads in hdl.gemv_config), joined here by ``wiring.connect``
and a little glue (the FIFOs' handshakes)::

    x ─────▶ BlockSequencer ─x_write─▶ XBuffer ──────── x word (block column) ──┐
    w ─────▶ (stage 0: the block in hand and its tag;                           ▼
    layer ─▶  tile_order's counters; pages; status)  ─reads─▶ LutBank ─hif─▶ [front end out] ─▶ BlockDot ─┐
    sparse ─▶                  └─entries─▶ ResidualTerm (reads x when no block is inside) ───────────────┤
    load ─────────────────────────────────▶ LutBank                                                    ▼
                                          value FIFO (value, tag) ─▶ RowAccumulator ─▶ y (+ marks FIFO: y.last)

* ``BlockSequencer``: the x, ``w`` and ``sparse`` handshakes, the block counters
  of ``tile_order`` (column ``col``, the row's ``slot`` in its tile, ``first`` /
  ``last`` value of the row, ``end`` of the pass), the two pages of layer
  registers (rows, blocks per row, offset, sparse), the status bits; latency 1.
  Its comparisons (last row, last slot, last column, first column) are flags
  worked out a block ahead, so none lies between a counter and its next value; a
  register holds the residual entry in hand (its slot and checks worked out on
  the way in); the error bits reach ``status`` two cycles after the event (``error_seen``, then the
  sticky register).
* ``XBuffer``: two activation vectors, a page each, one word of ``g`` codes per
  block column, one read port (shared with the term unit) read into the RAM's latch, then its
  output register: latency 2. ``GemvConfig.x_ram``: ``lib.memory`` and a
  register, or ECP5 DP16KDs instantiated with their output register (yosys
  infers a DP16KD only without it, 5.8 ns from clock to output).
* ``LutBank``: every lane's copy (``P`` lanes when folded) of both banks of both pages, written through
  ``load`` into the inactive page; latency ``read_latency`` (1; 2 for LUT RAM).
* The front end (the sequencer's stage 0 and the reads) is one pipeline on an
  enable decided ahead (``block_dot.output_pipeline``: hdl.pipeline's enable
  tree, a copy per lane, and hdl.output_buffer's skid buffers at its end), so
  no ``ready`` reaches the table RAM's enables.
* ``BlockDot`` (hdl.block_dot), ``ResidualTerm`` (hdl.gemv_term), ``RowAccumulator(tile)``
  (hdl.fp32_acc); between them ``lib.fifo`` FIFOs: the blocks' tags beside
  BlockDot, the values (``VALUE_FIFO_DEPTH``) before the ring, each row sum's
  ``end`` flag beside the ring.

Block order (``golden.dot.tile_order``): row tiles of ``tile`` rows (``tile``
>= 17, the FP32 adder's loop); in a tile, for each block column, that block of
every row of the tile. A row's blocks still come in ascending order, so each
row's sum is golden's. Row ``r`` of a tile has the row accumulator's running
sum ``slot = r mod tile``; consecutive blocks go to consecutive slots, which is
what lets the adder take one value a cycle. The last tile may have fewer rows:
it is right, and slower (the ring waits ``tile - rows_in_tile`` cycles per later
block column, and at the next pass's start).

Sparse residuals (a layer written with ``sparse``): after each tile's blocks the
sequencer takes the tile's entries (``golden.dot.tile_residuals``: rounds of one
entry per row of the tile, each row's in ascending column, padded with ``+0``
terms so that every row's last entry is in the last round), once every block
value of the tile is out of BlockDot; ``ResidualTerm`` reads each entry's x code
through the x buffer's port and makes ``T = RNE_fp32(rho x_j)``, which follows
the row's block values into its running sum (golden.dot step 4): exact or
saturated with E4M3 activations (``ResidualTerm``), rounded where it falls below
2^-126 with BF16 ones (``ResidualTermBF16``). A row's
``last`` is then its last entry's, not its last block's.

Ports
* ``x`` (in stream, ``x_layout``): ``codes`` (``g`` codes of ``act``, E4M3 or
  BF16, columns ``k g .. k g + g - 1`` in beat ``k``), ``last`` (the vector's last beat),
  ``swap`` (this vector starts a new layer: its beat, and everything after it,
  uses the other page of tables and layer registers: the page the host has just
  loaded). ``x.ready`` is low while both x pages hold a vector whose pass is not
  done, and for a ``swap`` beat while any vector is loaded (a new layer's first
  vector waits until the layer before is done: its swap changes the tables and
  layer registers; ``x.ready`` looks at ``swap``).
* ``w`` (in stream, ``block_bits``): one packed block, LSB first, exactly the
  bytes golden.layout packs. Taken only while a vector is loaded.
* ``sparse`` (in stream, ``sparse_layout``): ``{row, col, value (BF16), last}``,
  a tile's entries after its blocks (``sparse_beats``).
* ``load`` (in stream, ``ready`` tied high, ``load_layout``): a table write
  ``{bank, addr, data}`` (``data`` a HIF code) into the inactive page.
* ``layer`` (in stream, ``ready`` tied high, ``layer_layout``): ``{rows,
  blocks_per_row, offset, sparse}`` of the next layer, into the inactive page.
* ``clear`` (in): clears the sticky error bits ``status`` shows in its cycle; an error event not
  on ``status`` yet (in that cycle or the one before: a bit reaches ``status`` two cycles after
  its event) is kept and shows after it (set wins over clear).
* ``y`` (out stream, ``y_layout``): ``value`` (binary32 pattern of ``y_r``),
  ``last`` (the pass's last row); rows in ascending order, one word per row per
  vector.
* ``status`` (out, ``status_layout``): ``x_loaded`` (a vector is loaded and its
  pass not done, one or two of them: what a host checks before it waits for
  ``y``), and the sticky
  ``errors`` (``error_layout``): ``w_before_x`` (a block was offered while no
  vector was loaded: it waits, nothing is lost; a host that sends x first never
  sets it), ``x_length`` (a vector with more or fewer beats than the layer's
  blocks per row), ``x_nan`` (a code that is not finite in x: E4M3's NaN,
  S.1111.111, which the block dot unit would read as +-480; BF16's Inf and
  NaN, an exponent of all ones), ``layer`` (a layer write with 0 rows, more
  than ``max_rows``, 0 blocks per row or more than ``max_cols / g``),
  ``sparse`` (an entry whose row is not in the tile or whose column is beyond
  the layer). Reset and ``clear`` clear them (``clear`` as above).

Host sequence per layer: write its tables (``load``) and ``layer`` into the
inactive page (while the previous layer runs, after that layer's swap); for
each vector, its x beats (the first vector's first beat with ``swap``), then
its ``rows * cols / g`` blocks in tile order (and, beside them, its sparse
beats). A word written at cycle ``t`` is read from cycle ``t + 2`` on
(hdl.lut_bank); the swap beat comes after the page's last write. Two x pages:
the next vector's x beats may go as soon as the current vector's are taken (the
engine takes them into the free page while the pass runs, or holds them until a
page is free); its blocks once its x is taken, as before. A layer's first vector
(its swap beat) is held until the layer before is done, so the host's rule for
the table writes is unchanged: after the swap beat is taken.

Latency: ``latency`` cycles from the handshake of a row's last block on ``w``
to its word on ``y`` with nothing stalled: the sequencer's 1 + the reads' 3 (the
x buffer's read and output register, then one more register on the way to the
lanes; the table words wait for it) + BlockDot's + the value FIFO's 2 + the row
accumulator's (47 for sop4-g16, 48 for e2m3-ue4m4-g16, 53 for gemv-sop4-g16-bf16:
the BF16 block dot unit's 30 for a block on its fast path; a block on its slow
path holds the front end, hdl.block_dot_bf16). The row accumulator's
ring holds its position while no running sum is open and no value is offered, so
after reset or a pass of full tiles (which leaves it at slot 0) a pass's first
block does not wait for the ring, and the FIFO holds no backlog; after a pass
whose last tile has ``R < tile`` rows it waits ``tile - R`` cycles. That wait holds
values at the ring, not blocks: the value FIFO and the skid buffers take the blocks
that come meanwhile, and ``w`` stalls once they are full, which after short passes
may be a pass or a layer later (a 3-row layer, then a tile of 2 blocks a row, then
two tiles of 8: the third layer's blocks stall for 5 cycles after its sixth, and its
last row comes 3 cycles late; with 24 blocks a row the x load between the layers
hides it).

Throughput: one block (``g`` MACs) per cycle while ``w`` is valid and ``y``
ready, for full tiles, from a pass's first block to its last: ``rows cols / g``
blocks in as many cycles, the last row's ``y`` ``latency`` cycles later. The
next vector of the layer, its x loaded during the pass, follows without a
cycle between (``batch rows cols / g`` blocks in as many cycles after the first
vector's load); a new layer's first vector loads after the layer before is
done (the pass's last block out of stage 0, or its last entry out of the term
unit), then ``cols / g`` beats; a block comes the cycle after its vector's last
beat at the earliest, and not in the two cycles after a swap beat. A gap in the
blocks inside a tile
costs up to a ring turn (the ring has passed the next value's slot; the value
FIFO queues what follows). A layer with residual entries spends, per tile, the
block dot unit's drain (about 30 cycles) and ``tile`` cycles per round of entries.

Folded (``dot_lanes`` P < g, for small FPGAs: the iCEBreaker's engine): the whole front end
works on chunks of ``P`` codes. Stage 0 holds its block for ``g / P`` enabled edges and sends one
chunk into the reads at each (a ``chunk`` counter; the sequencer moves on with the last chunk,
``leaves``); the table RAM has ``P`` copies, not ``g``; the x buffer returns the chunk's ``P``
codes of the word (``XBuffer.read_chunk``, the term unit's ``x_chunk`` for its entries); the
pipeline, its skid buffers and the block dot unit's input (``BlockDotFolded(chunked=True)``) carry
chunks with their first / last flags, and the tags FIFO takes a tag at a block's last chunk. A
block is taken every ``g / P`` cycles exactly while nothing is idle (``P`` MACs a cycle); ``latency``
adds the ``fold``'s ``g / P - 1`` cycles. With ``acc_adder`` "compact" the row accumulator's adder
is hdl.fp32_acc's 3-stage one (tiles of 4 rows or more), for a slow clock (12 MHz on the
iCEBreaker), where a value comes every ``g / P`` cycles anyway. ``sparse`` False builds no
residual path: no term unit (``term_signature``'s signals, created and never driven: no entry,
no term, never busy), the layer registers' ``sparse`` held at 0 (so the sequencer's entry logic
folds away in synthesis) and a layer written with it set is the ``layer`` error.

Activation formats (``GemvConfig.act``): ``e4m3`` (hdl.block_dot, ``ResidualTerm``, x words of
``8 g`` bits) and ``bf16`` (hdl.block_dot_bf16, ``ResidualTermBF16``, x words of ``16 g`` bits);
any other is refused in the constructor.

``model`` is golden.dot.gemv; ``describe`` an engine's manifest. The named engines
(``gemv_configs``) and the host side (``w_beats``, ``x_beats``, ``sparse_beats``) are
hdl.gemv_config's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot
from sop.golden.layout import LayerStream

from .arith import delay
from .block_dot import BlockDot, output_pipeline
from .block_dot_folded import BlockDotFolded
from .codebook_mux import CodebookMux
from .config import variant_suffix
from .fp32_acc import RowAccumulator
from .gemv_config import (GemvConfig, error_layout, front_layout, layer_layout, load_layout, sparse_layout,
                          status_layout, table_word, tag_layout, x_layout, y_layout)
from .gemv_sequencer import BlockSequencer
from .gemv_term import residual_term_class, term_signature
from .gemv_x_buffer import XBuffer
from .lut_bank import LutBank

#: Entries of the FIFO between the block dot unit and the row accumulator. Once the ring has missed
#: a slot (a gap in the blocks inside a tile) it waits a whole turn: the FIFO fills while it waits,
#: and covers the gaps the front end's and the block dot unit's restarts leave (their enables are
#: decided ahead: a cycle each). The throughput test (no gap, the ring held at slot 0 for each
#: pass) keeps one block a cycle with 3 entries, not with 2 (the buffered FIFO cannot stream); 8
#: leave a margin for gaps.
VALUE_FIFO_DEPTH = 8
#: lib.fifo.SyncFIFOBuffered: a word written in cycle t (its handshake) is read from cycle t + 2
VALUE_FIFO_LATENCY = 2


# -- the engine --------------------------------------------------------------------------------------------------

def model(config: GemvConfig, layer: LayerStream, x) -> np.ndarray:
    """``y`` (float32, (rows,) or (batch, rows)) of ``layer`` and activations ``x`` (values of ``config.act``):
    golden.dot.gemv."""
    return dot.gemv(layer, x, config.act)


@dataclass(frozen=True)
class _Fifos:
    """The engine's FIFOs beside its components (``GemvEngine._parts``) and the tag layout they carry."""
    tag_shape: data.StructLayout
    tags: fifo.SyncFIFOBuffered         # each block's tag beside the block dot unit
    values: fifo.SyncFIFOBuffered       # (value, tag) into the row accumulator
    marks: fifo.SyncFIFOBuffered        # each row sum's pass-end flag beside the ring (y.last)


class GemvEngine(wiring.Component):
    """The engine of ``config``: ports, host sequence, latency and throughput as the module docstring
    states; ``model`` is golden.dot.gemv, ``latencies`` the shares of ``latency``."""

    def model(self, stream_: LayerStream, x) -> np.ndarray:
        return model(self.config, stream_, x)

    def __init__(self, config: GemvConfig, *, sequencer=BlockSequencer, bank=LutBank, mux=CodebookMux,
                 term=None, acc=RowAccumulator):
        # sequencer / bank / mux / term / acc: the component classes used (tests replace them with broken ones)
        self.config = config
        lay = config.layout
        self.sequencer = sequencer(config)
        self.x_buffer = XBuffer(config)
        # (a folded engine looks up P codes a cycle: P table copies, a chunk of a block at a time)
        P = config.macs_per_cycle
        self.bank = bank(code_bits=lay.code_bits, banks=lay.banks, word=table_word(config),
                         lanes=P, lutram_depth=config.lutram_depth,
                         **({"no_rw_check": True} if config.dot_lanes else {}))
        self.mux = mux(lanes=P, group=lay.group) if lay.banks == 2 else None
        self.dot = (BlockDotFolded(lay, config.hif, config.act, lanes=P, tail=config.dot_tail, chunked=True)
                    if config.dot_lanes else BlockDot(lay, config.hif, config.act))
        self.acc = acc(config.tile, **({"adder": config.acc_adder} if config.acc_adder != "full" else {}))
        # (without the residual path: the term unit's signals, never driven: no entry, no term, never busy)
        self.term = ((term or residual_term_class(config))(config) if config.sparse
                     else term_signature(config).create(path=("no_terms",)))
        super().__init__({
            "x": In(stream.Signature(x_layout(config))),
            "w": In(stream.Signature(unsigned(lay.block_bits))),
            "sparse": In(stream.Signature(sparse_layout(config))),
            "load": In(stream.Signature(load_layout(config))),
            "layer": In(stream.Signature(layer_layout(config))),
            "clear": In(1),
            "y": Out(stream.Signature(y_layout())),
            "status": Out(status_layout()),
        })

    @property
    def read_latency(self) -> int:
        """The table read's stages (the x word is delayed to meet it)."""
        return self.bank.read_latency

    @property
    def reads(self) -> int:
        """The front end's stages after stage 0: the table read's, or the x buffer's read, its output
        register and one more register, whichever is longer."""
        return max(self.read_latency, self.x_buffer.latency + 1)

    @property
    def fold(self) -> int:
        """Cycles a block waits in stage 0 for its last chunk to go (``g / P - 1``; 0 unless folded)."""
        return self.config.group // self.config.macs_per_cycle - 1

    @property
    def latency(self) -> int:
        """Cycles from a row's last block taken on ``w`` to its ``y`` word, nothing stalled: the
        components on the way."""
        return sum(self.latencies().values())

    def latencies(self) -> dict[str, int]:
        return {"sequencer": self.sequencer.latency, **({"fold": self.fold} if self.fold else {}),
                "reads": self.reads, "block_dot": self.dot.latency, "fifo": VALUE_FIFO_LATENCY,
                "row_accumulator": self.acc.latency}

    def elaborate(self, platform):
        m = Module()
        fifos = self._parts(m)
        front, leaves, drained = self._front_end(m)
        self._block_dot(m, fifos, front, leaves, drained)
        self._row_accumulator(m, fifos)
        return m

    # -- the parts and their glue --------------------------------------------------------------------------
    def _parts(self, m) -> _Fifos:
        """The components, the FIFOs between them, and the ports joined to them (``load``, ``status``)."""
        cfg = self.config
        m.submodules.sequencer = seq = self.sequencer
        m.submodules.x_buffer = xbuf = self.x_buffer
        m.submodules.bank = bank = self.bank
        m.submodules.block_dot = bdot = self.dot
        m.submodules.row_accumulator = acc = self.acc
        term = self.term
        if cfg.sparse:
            m.submodules.residual_term = term
        tag_shape = tag_layout(cfg)
        # tags beside the block dot unit (in at its input, out with its value); values to the ring
        m.submodules.tags = tags = fifo.SyncFIFOBuffered(width=tag_shape.size, depth=bdot.latency + 4)
        m.submodules.values = vals = fifo.SyncFIFOBuffered(width=32 + tag_shape.size, depth=VALUE_FIFO_DEPTH)
        # the pass-end flag of each row sum inside the ring (y.last)
        m.submodules.marks = marks = fifo.SyncFIFOBuffered(width=1, depth=acc.latency + 4)

        wiring.connect(m, wiring.flipped(self.x), seq.x)
        wiring.connect(m, wiring.flipped(self.w), seq.w)
        wiring.connect(m, wiring.flipped(self.layer), seq.layer)
        wiring.connect(m, wiring.flipped(self.sparse), seq.sparse)
        if cfg.sparse:
            wiring.connect(m, seq.entries, term.entries)
        load = self.load.payload
        m.d.comb += [self.load.ready.eq(1), bank.write.valid.eq(self.load.valid), bank.write.payload.bank.eq(load.bank),
                     bank.write.payload.addr.eq(load.addr), bank.write.payload.data.hif.eq(load.data)]
        wiring.connect(m, seq.x_write, xbuf.write)
        m.d.comb += [seq.clear.eq(self.clear), self.status.eq(seq.status), bank.write_page.eq(seq.write_page)]
        return _Fifos(tag_shape, tags, vals, marks)

    def _front_end(self, m):
        """Stage 0 and the reads: the front end's pipeline, its stream into the block dot unit (``front``,
        returned with ``leaves``, stage 0 moving on, and ``drained``, no block past stage 0)."""
        cfg, lay = self.config, self.config.layout
        g, H, k = lay.group, lay.header_bits, lay.code_bits
        seq, xbuf, bank, term = self.sequencer, self.x_buffer, self.bank, self.term
        # The front end: stage 0 (the sequencer) and the reads, a pipeline of 1 + R stages that moves
        # on an enable decided ahead (hdl.pipeline, hdl.output_buffer: one copy per lane, skid
        # buffers at its end), so that no ready reaches the table RAM's enables
        R, RX = self.read_latency, self.reads
        wb = (cfg.max_blocks - 1).bit_length()          # an x page's address bits
        front = stream.Signature(front_layout(cfg)).create(path=("front",))
        P = cfg.macs_per_cycle
        ctl, out = output_pipeline(m, seq.latency + RX, front, P)
        en, en_lane = ctl.enable.en, ctl.enable.lane
        issue = seq.issue
        codes = issue.block[H:]
        if self.fold:
            # folded: stage 0 holds its block for g / P enabled edges, one chunk of P codes going into
            # the reads at each; the pipeline's valid chain counts chunks (a block's stay valid until
            # its last), and the sequencer moves on only with the last
            chunk = Signal(range(g // P), name="chunk")
            last_chunk = Signal(name="last_chunk")
            m.d.comb += last_chunk.eq(chunk == g // P - 1)
            with m.If(en & issue.valid):
                m.d.sync += chunk.eq(Mux(last_chunk, 0, chunk + 1))
            leaves = Signal(name="leaves")        # stage 0 moves on: after its block's last chunk
            m.d.comb += [leaves.eq(en & (last_chunk | ~issue.valid)), seq.en.eq(leaves),
                         ctl.valid.eq(Mux(issue.valid & ~last_chunk, 1, seq.offer)),
                         xbuf.read_chunk.eq(Mux(issue.valid, self.x_chunk(chunk), term.x_chunk))]
            codes = codes[:g * k].word_select(chunk, P * k)
        else:
            leaves = en
            m.d.comb += [ctl.valid.eq(seq.offer), seq.en.eq(en)]
        header = issue.block[:H]
        if self.mux is not None:
            m.submodules.mux = mux = self.mux
            m.d.comb += mux.select[0].eq(header[lay.select_position])
        for j in range(P):
            m.d.comb += [bank.read_en[j].eq(en_lane[j]), bank.read_page[j].eq(self.table_page(issue.page)),
                         bank.read_bank[j].eq(mux.bank[j] if self.mux is not None else 0),
                         bank.read_addr[j].eq(codes[j * k:][:k])]
        drained = Signal(name="drained")      # no block past stage 0 (driven by _block_dot)
        # the x buffer's one read port: a block's read, or (with no block in the engine) a residual
        # entry's. The front end reads on every enabled edge (stage 0 valid or not: its latch and output
        # register move with the pipeline) at stage 0's column while stage 0 holds a block, else at the
        # term unit's (a register selects: no handshake reaches the RAM's address). While the engine
        # is drained (no block past stage 0, so no read waits in the latch) it reads on every edge:
        # the term unit's reads among them, with no handshake on the RAM's enable either.
        m.d.comb += [xbuf.read_en.eq(en | drained), xbuf.out_en.eq(en | term.x_out_en),
                     xbuf.read_addr.eq(Mux(issue.valid, Cat(self.x_address(issue.col)[:wb], issue.x_page),
                                           Cat(term.x_addr, seq.term_page))),
                     term.x_data.eq(xbuf.read_data)]
        # the block's other fields wait for the reads
        sign = header[lay.sign_position] if lay.signed_scale else Const(0, 1)
        # (folded: the chunk's first / last flags after the offset, as chunk_layout has them)
        flags = [chunk == 0, last_chunk] if self.fold else []
        side = delay(m, en, Cat(header[:lay.scale.bits], sign, issue.offset, *flags, issue.tag), RX, "front")
        scale, rest = side[:lay.scale.bits], side[lay.scale.bits:]
        # the x word from the x buffer's output register (the block RAM's own) into one more register
        # (the block RAM sits apart from the lanes: the routing to them gets a cycle of its own), the
        # table words delayed to meet it
        m.d.comb += Value.cast(out.last).eq(Cat(delay(m, en, bank.read_data.as_value(), RX - R, "hif"),
                                                delay(m, en, xbuf.read_data, RX - xbuf.latency, "x_word"),
                                                scale, rest[0], rest[1:9], rest[9:]))
        return front, leaves, drained

    def _block_dot(self, m, fifos, front, leaves, drained):
        """The block dot unit, its tags in a FIFO beside it, and the value FIFO it fills (with residual terms)."""
        R, seq, bdot, term = self.read_latency, self.sequencer, self.dot, self.term
        tags, vals = fifos.tags, fifos.values
        # (the tags FIFO holds the tags of the blocks inside the block dot unit: at most its stages and
        # its two skid entries, fewer than its depth, so its w_rdy and r_rdy are left out of the
        # handshakes: front.ready is the block dot unit's enable copy, a register)
        blocks = bdot.blocks
        # (folded: a tag per block, at its last chunk)
        block_taken = blocks.valid & blocks.ready
        if self.fold:
            block_taken = block_taken & front.payload.block.last
        m.d.comb += [blocks.valid.eq(front.valid), front.ready.eq(blocks.ready),
                     blocks.payload.eq(front.payload.block),
                     tags.w_en.eq(block_taken), tags.w_data.eq(front.payload.tag)]
        # blocks taken and not yet out of the block dot unit: with none, residual entries may go (they
        # then reach the ring after every block value of their tile, and read x alone)
        block_in = bdot.values.valid & bdot.values.ready
        # (counted from the block's leaving stage 0, on registers: ``drained`` matters only while
        # the sequencer takes no block, and then a block is either in stage 0 or counted)
        inside = Signal(range(2 * (R + 1 + 2 + bdot.latency + 4)), name="blocks_inside")
        m.d.sync += inside.eq(inside + (leaves & seq.issue.valid) - block_in)
        # (drained, a register: a cycle late, which is early enough for the entries, which wait for it)
        m.d.sync += drained.eq((inside == 0) & ~seq.issue.valid)
        m.d.comb += [seq.drained.eq(drained), seq.term_busy.eq(term.busy)]
        # into the value FIFO: block values, or (only while no block is inside) residual terms
        m.d.comb += [bdot.values.ready.eq(vals.w_rdy), term.terms.ready.eq(vals.w_rdy),
                     vals.w_en.eq(block_in | (term.terms.valid & vals.w_rdy)),
                     vals.w_data.eq(Mux(term.terms.valid, term.terms.payload.as_value(),
                                        Cat(bdot.values.payload, tags.r_data))),
                     tags.r_en.eq(block_in)]

    def _row_accumulator(self, m, fifos):
        """The row accumulator from the value FIFO; ``y``, with each row sum's pass-end flag (the marks FIFO)."""
        acc, vals, marks = self.acc, fifos.values, fifos.marks
        value, tag = vals.r_data[:32], data.View(fifos.tag_shape, vals.r_data[32:])
        into = acc.values
        # (the marks FIFO holds a flag per row sum inside the ring and its output buffer: at most the
        # ring's latency and one skid entry, fewer than its depth, so its w_rdy and r_rdy are left
        # out of the handshakes)
        m.d.comb += [into.valid.eq(vals.r_rdy),
                     into.payload.value.eq(value), into.payload.slot.eq(tag.slot),
                     into.payload.first.eq(tag.first), into.payload.last.eq(tag.last),
                     vals.r_en.eq(into.valid & into.ready),
                     marks.w_en.eq(vals.r_en & tag.last), marks.w_data.eq(tag.end)]
        m.d.comb += [self.y.valid.eq(acc.sums.valid), self.y.payload.value.eq(acc.sums.payload.value),
                     self.y.payload.last.eq(marks.r_data), acc.sums.ready.eq(self.y.ready),
                     marks.r_en.eq(self.y.valid & self.y.ready)]

    def table_page(self, page):
        """The table page a block reads: the page it was taken with (tests override it to inject a bug)."""
        return page

    def x_address(self, col):
        """The x word a block reads: its block column (tests override it to inject a bug)."""
        return col

    def x_chunk(self, chunk):
        """Folded: the chunk of the x word a block's chunk reads, its own (tests override it)."""
        return chunk


def drive_layer_shape(m: Module, config: GemvConfig, layer, rows: Value, blocks_per_row: Value) -> None:
    """Drive the engine's ``layer`` payload's ``rows`` and ``blocks_per_row`` from a host's wider fields,
    each saturated to its register's largest value: a shape past the engine's limits then reaches it as
    one (its ``layer`` error), never cut to a small shape it would take (2052 blocks as 4 in 11 bits)."""
    for value, field, limit in ((rows, layer.rows, config.max_rows), (blocks_per_row, layer.blocks_per_row,
                                                                      config.max_blocks)):
        top = (1 << len(field)) - 1
        if len(value) <= len(field):                        # it fits: no comparison (a constant one lints)
            m.d.comb += field.eq(value)
            continue
        if top <= limit:                                    # the register cannot hold "past the limit"
            raise ValueError(f"{config.name}: a {len(value)}-bit host field cannot be saturated into the "
                             f"{len(field)}-bit register of a limit of {limit}")
        m.d.comb += field.eq(Mux(value > top, top, value))


def describe(config: GemvConfig, engine: GemvEngine) -> dict:
    """The manifest of ``engine`` (built from ``config``, and elaborated: the one converted to Verilog):
    module name, parameters, ports (as the Verilog names them), latency and its shares, error bits."""
    from .generate import ports

    return {"module": module_name(config), "parameters": config.describe(), "latency_cycles": engine.latency,
            "latency_stages": engine.latencies(), "ports": ports(engine),
            "error_bits": [name for name, _ in error_layout()], "block_order": "golden.dot.tile_order",
            "tile": config.tile}


def module_name(config: GemvConfig) -> str:
    """``sop_<name>``, plus ``config.variant_suffix`` for a LUT-RAM build."""
    return "sop_" + config.name.replace("-", "_") + variant_suffix(config.lutram_depth)
