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

Components, joined by ``wiring.connect`` and a little glue (the FIFOs'
handshakes)::

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
  the way in); the error bits reach ``status`` a cycle after the event.
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
* ``BlockDot`` (hdl.block_dot), ``ResidualTerm`` (below), ``RowAccumulator(tile)``
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
* ``clear`` (in): clears the sticky error bits.
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
  the layer). Reset and ``clear`` clear them.

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

``model`` is golden.dot.gemv; ``gemv_configs`` the named configurations and
``describe`` their manifests; ``w_beats``, ``x_beats``, ``sparse_beats`` the host side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from amaranth.hdl import Array, Cat, ClockSignal, Const, Instance, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot
from sop.golden.formats import FORMATS, FloatFormat, to_float32
from sop.golden.layout import BlockLayout, LayerStream

from .arith import PipelinedMultiplier, Stages, delay, leading_zeros, stage_reg, trailing_zeros
from .block_dot import BlockDot, block_layout, output_pipeline
from .block_dot_folded import BlockDotFolded, chunk_layout
from .codebook_mux import CodebookMux
from .fp32_acc import STAGINGS, RowAccumulator, min_slots
from .lut_bank import LutBank

#: The fewest rows a tile can have: one running sum per stage of the FP32 adder's loop (the full,
#: 16-stage adder's; ``GemvConfig.acc_adder`` "compact": ``min_slots("compact")``).
MIN_TILE = min_slots()
#: Entries of the FIFO between the block dot unit and the row accumulator. Once the ring has missed
#: a slot (a gap in the blocks inside a tile) it waits a whole turn: the FIFO fills while it waits,
#: and covers the gaps the front end's and the block dot unit's restarts leave (their enables are
#: decided ahead: a cycle each). The throughput test (no gap, the ring held at slot 0 for each
#: pass) keeps one block a cycle with 3 entries, not with 2 (the buffered FIFO cannot stream); 8
#: leave a margin for gaps.
VALUE_FIFO_DEPTH = 8
#: lib.fifo.SyncFIFOBuffered: a word written in cycle t (its handshake) is read from cycle t + 2
VALUE_FIFO_LATENCY = 2
#: How the x buffer is built (``GemvConfig.x_ram``): ``memory``, a ``lib.memory`` read port and a
#: register after it (what yosys infers, and what amaranth.sim runs); ``dp16kd``, ECP5 DP16KD block
#: RAMs instantiated with their output register (``REGMODE_B = "OUTREG"``), the same behaviour: yosys
#: infers a DP16KD only without it, and then its 5.8 ns clock to output sets the clock.
X_RAMS = ("memory", "dp16kd")


@dataclass(frozen=True)
class GemvConfig:
    """One engine: the block layout and HIF of an operating point, the activation format, the row
    tile, the largest layer it takes, the table RAM's shape (hdl.lut_bank), and the block dot unit's
    products a cycle: ``dot_lanes`` 0 builds ``BlockDot`` (``g`` a cycle, a block a cycle), ``P < g``
    builds ``BlockDotFolded`` (hdl.block_dot_folded: a block every ``g / P`` cycles, with ``dot_tail``
    ``"pipelined"`` or ``"serial"``; E4M3 activations), for FPGAs too small for ``g`` lanes: the front
    end then folds too (module docstring). ``acc_adder``: the row accumulator's FP32 adder,
    ``"full"`` (16 stages, ``tile`` >= 17) or ``"compact"`` (3 stages, ``tile`` >= 4; hdl.fp32_acc).
    ``sparse`` False builds no residual path (no term unit; a layer written with ``sparse`` set is the
    ``layer`` error and its entries are never taken): for the smallest FPGAs."""

    name: str
    layout: BlockLayout
    hif: FloatFormat
    act: str = "e4m3"
    tile: int = MIN_TILE
    max_cols: int = 16384
    max_rows: int = 65535
    lutram_depth: int = 0
    x_ram: str = "memory"
    dot_lanes: int = 0
    dot_tail: str = "pipelined"
    acc_adder: str = "full"
    sparse: bool = True

    def __post_init__(self):
        problems = []
        if self.x_ram not in X_RAMS:
            problems.append(f"x_ram must be one of {X_RAMS}, got {self.x_ram!r}")
        g = self.layout.group
        if self.acc_adder not in STAGINGS:
            problems.append(f"acc_adder must be one of {', '.join(map(repr, STAGINGS))}, got {self.acc_adder!r}")
        elif self.tile < min_slots(self.acc_adder):
            problems.append(f"tile must be at least {min_slots(self.acc_adder)} rows (the FP32 adder's loop), "
                            f"got {self.tile}")
        blocks = self.max_cols // g
        if self.max_cols % g or blocks < 1 or blocks & (blocks - 1):
            problems.append(f"max_cols must be {g} times a power of two, got {self.max_cols}")
        if self.max_rows < 1:
            problems.append(f"max_rows must be at least 1, got {self.max_rows}")
        if not isinstance(self.act, str) or self.act not in dot.ACT_FORMATS:
            problems.append(f"act must be one of {', '.join(map(repr, dot.ACT_FORMATS))}, got {self.act!r}")
        P = self.dot_lanes
        if P and (P < 0 or P & (P - 1) or P >= g):
            problems.append(f"dot_lanes must be 0 (the block dot unit's g = {g} lanes) or a power of two "
                            f"below {g} (a folded unit), got {P}")
        elif P and self.act != "e4m3":
            problems.append(f"a folded block dot unit (dot_lanes {P}) takes E4M3 activations only, got {self.act!r}")
        if self.dot_tail not in ("pipelined", "serial") or (self.dot_tail == "serial" and not P):
            problems.append(f"dot_tail must be 'pipelined', or 'serial' with dot_lanes set, got {self.dot_tail!r}")
        if problems:
            raise ValueError(f"engine config {self.name!r}: " + "; ".join(problems))

    @property
    def group(self) -> int:
        return self.layout.group

    @property
    def max_blocks(self) -> int:
        """Blocks per row (x words) the buffer holds."""
        return self.max_cols // self.layout.group

    @property
    def act_format(self) -> FloatFormat:
        return dot.act_format(self.act)

    @property
    def macs_per_cycle(self) -> int:
        """Products the block dot unit takes a cycle: ``g``, or ``dot_lanes`` when folded."""
        return self.dot_lanes or self.layout.group

    def describe(self) -> dict:
        lay = self.layout
        return {"name": self.name, "code_bits": lay.code_bits, "group": lay.group, "scale": lay.scale.name,
                "signed_scale": lay.signed_scale, "select_bit": lay.select_bit, "banks": lay.banks,
                "block_bits": lay.block_bits, "hif": self.hif.name, "act": self.act_format.name,
                "accumulator_bits": dot.accumulator(self.hif, self.act_format, lay.group).bits,
                "tile": self.tile, "max_cols": self.max_cols, "max_rows": self.max_rows,
                "lutram_depth": self.lutram_depth, "x_ram": self.x_ram, "macs_per_cycle": self.macs_per_cycle,
                **({"dot_lanes": self.dot_lanes, "dot_tail": self.dot_tail} if self.dot_lanes else {}),
                **({"acc_adder": self.acc_adder} if self.acc_adder != "full" else {}),
                **({} if self.sparse else {"sparse": False})}


#: What folds an engine for the smallest FPGAs (the iCEBreaker's iCE40UP5K at 12 MHz): one MAC a cycle
#: (the folded block dot unit with its serial tail, the front end in chunks) and the compact FP32 adder
#: with tiles of 4 rows (docs/dot.md 7.2). The iCEBreaker's GEMV core adds ``sparse=False``
#: (synth/gateware/board.py); ``small_fpga_config`` applies it.
SMALL_FPGA = (("dot_lanes", 1), ("dot_tail", "serial"), ("acc_adder", "compact"), ("tile", 4))


def small_fpga_config(config: GemvConfig, **fields) -> GemvConfig:
    """``config`` folded for the smallest FPGAs (``SMALL_FPGA``), with ``fields`` changed too."""
    return replace(config, **dict(SMALL_FPGA), **fields)


def gemv_configs() -> dict[str, GemvConfig]:
    """The named engines: ``gemv-<point>`` for each operating point with E4M3 activations, and
    ``gemv-sop4-g16-bf16`` (sop4-g16, BF16 activations)."""
    from sop.golden.points import get_point

    configs = {f"gemv-{name}": GemvConfig(f"gemv-{name}", get_point(name).layout, get_point(name).hif)
               for name in ("sop4-g16", "e2m3-ue4m4-g16")}
    # and sop4-g16 with BF16 activations: the block dot unit's window and fallback (hdl.block_dot_bf16),
    # the term unit's rounding (ResidualTermBF16), x words of 16 bits an activation
    p = get_point("sop4-g16")
    configs["gemv-sop4-g16-bf16"] = GemvConfig("gemv-sop4-g16-bf16", p.layout, p.hif, act="bf16")
    return configs


# -- payloads ------------------------------------------------------------------------------------------------

def x_layout(config: GemvConfig) -> data.StructLayout:
    return data.StructLayout({"codes": data.ArrayLayout(unsigned(config.act_format.bits), config.group),
                              "last": unsigned(1), "swap": unsigned(1)})


def layer_layout(config: GemvConfig) -> data.StructLayout:
    """A layer's registers: its shape, offset, and ``sparse``: its tiles are followed by residual entries."""
    return data.StructLayout({"rows": unsigned(config.max_rows.bit_length()),
                              "blocks_per_row": unsigned(config.max_blocks.bit_length()), "offset": signed(8),
                              "sparse": unsigned(1)})


def sparse_layout(config: GemvConfig) -> data.StructLayout:
    """One residual entry (``golden.dot.tile_residuals``): its row in the layer, its column, its BF16
    value, and ``last``: the row's last entry."""
    return data.StructLayout({"row": unsigned(config.max_rows.bit_length()), "col": range(config.max_cols),
                              "value": unsigned(16), "last": unsigned(1)})


def load_layout(config: GemvConfig) -> data.StructLayout:
    """One LUT write: bank (0 = A, 1 = B), entry address, HIF code (the decoder's load word)."""
    return data.StructLayout({"bank": unsigned(1), "addr": unsigned(config.layout.code_bits),
                              "data": unsigned(config.hif.bits)})


def table_word(config: GemvConfig) -> data.StructLayout:
    """A LUT word as the table RAM holds it: the HIF code itself (hdl.lut_word's exact form)."""
    return data.StructLayout({"hif": unsigned(config.hif.bits)})


def y_layout() -> data.StructLayout:
    return data.StructLayout({"value": unsigned(32), "last": unsigned(1)})


def error_layout() -> data.StructLayout:
    return data.StructLayout({"w_before_x": unsigned(1), "x_length": unsigned(1), "x_nan": unsigned(1),
                              "layer": unsigned(1), "sparse": unsigned(1)})


def status_layout() -> data.StructLayout:
    return data.StructLayout({"x_loaded": unsigned(1), "errors": error_layout()})


def tag_layout(config: GemvConfig) -> data.StructLayout:
    """What a block (or a residual term) carries to the row accumulator: its row's slot, first / last
    value of the row, last value of the pass."""
    return data.StructLayout({"slot": range(config.tile), "first": unsigned(1), "last": unsigned(1),
                              "end": unsigned(1)})


def front_layout(config: GemvConfig) -> data.StructLayout:
    """What the front end hands the block dot unit: the block (``block_dot.block_layout``), or with a
    folded unit one chunk of it (``block_dot_folded.chunk_layout``), its tag, padding to a whole number
    of lanes (the front end's output buffers split it by lane)."""
    if config.dot_lanes:
        block = chunk_layout(config.hif, config.act_format, config.layout, config.dot_lanes)
    else:
        block = block_layout(config.hif, config.act_format, config.layout)
    used = block.size + tag_layout(config).size
    pad = -used % config.macs_per_cycle          # (none where it would be 0 bits: Verilog's [-1:0])
    return data.StructLayout({"block": block, "tag": tag_layout(config), **({"pad": unsigned(pad)} if pad else {})})


def entry_layout(config: GemvConfig) -> data.StructLayout:
    """A residual entry as the term unit takes it: its column, BF16 value and tag."""
    return data.StructLayout({"col": range(config.max_cols), "value": unsigned(16), "tag": tag_layout(config)})


class IssueSignature(wiring.Signature):
    """Stage 0 (the block in hand) to the table and x reads: its bits, page, block column, the
    layer's offset and its tag."""

    def __init__(self, config: GemvConfig):
        super().__init__({"valid": Out(1), "block": Out(unsigned(config.layout.block_bits)), "page": Out(1),
                          "col": Out(range(config.max_blocks)), "x_page": Out(1), "offset": Out(signed(8)),
                          "tag": Out(tag_layout(config))})


class XWriteSignature(wiring.Signature):
    def __init__(self, config: GemvConfig):
        super().__init__({"en": Out(1), "addr": Out(range(2 * config.max_blocks)),
                          "data": Out(unsigned(config.act_format.bits * config.group))})


# -- the x buffer ---------------------------------------------------------------------------------------------

class XBuffer(wiring.Component):
    """Two activation vectors: two pages of ``max_blocks`` words of ``g`` codes (``8 g`` bits for E4M3,
    ``16 g`` for BF16; the page the top
    address bit), written through ``write`` (lands at the clock edge), read in two steps: at an edge
    where ``read_en`` is high the word at ``read_addr`` is read into the RAM's latch; at an edge
    where ``out_en`` is high the latch goes into the output register, ``read_data`` (``latency`` 2
    when both are high). Each holds while its enable is low. As ``GemvConfig.x_ram`` says: a
    ``lib.memory`` read port and a register, or ECP5 DP16KDs with their output register (``CEB`` and
    ``OCEB``): a block RAM's output register is fast to its output, its plain read is not. Not
    transparent: a read and a write in one cycle that matter are at different pages (a vector loads
    into the page no pass reads).

    With a folded block dot unit (``dot_lanes`` P) a read returns one chunk of the word: ``P`` codes,
    chunk ``read_chunk`` (in, beside ``read_addr``, latched with the read). ``lib.memory``: picked
    before the output register, so that register and everything after it are ``P`` codes wide, not
    ``g``; DP16KDs: after their output registers."""

    latency = 2

    def __init__(self, config: GemvConfig):
        self.config = config
        self.chunks = config.group // config.macs_per_cycle       # 1 unless folded
        width = config.act_format.bits * config.macs_per_cycle
        self.depth = 2 * config.max_blocks
        chunk = {"read_chunk": In(range(self.chunks))} if self.chunks > 1 else {}
        super().__init__({"write": In(XWriteSignature(config)), "read_en": In(1), "out_en": In(1),
                          "read_addr": In(range(self.depth)), **chunk, "read_data": Out(unsigned(width))})

    def elaborate(self, platform):
        m = Module()
        if self.config.x_ram == "dp16kd":
            return self.dp16kd(m)
        # (folded, for the smallest FPGAs: yosys's no_rw_check, the contract above, as hdl.lut_bank's, so
        # that iCE40 synthesis builds no read-during-write bypass, a word of flip-flops; the unfolded
        # engines keep the Verilog their figures were measured with)
        attrs = {"no_rw_check": 1} if self.chunks > 1 else None
        m.submodules.mem = mem = memory.Memory(shape=unsigned(len(self.write.data)), depth=self.depth, init=[],
                                               attrs=attrs)
        wp, rp = mem.write_port(), mem.read_port()
        m.d.comb += [wp.en.eq(self.write.en), wp.addr.eq(self.write.addr), wp.data.eq(self.write.data),
                     rp.en.eq(self.read_en), rp.addr.eq(self.read_addr)]
        word = rp.data
        if self.chunks > 1:
            word = word.word_select(self.chunk_latch(m), len(self.read_data))
        out = stage_reg(m, self.out_en, "out", word, self.read_data.shape())
        m.d.comb += self.read_data.eq(out)
        return m

    def chunk_latch(self, m):
        """``read_chunk`` as the read latched it (folded only)."""
        return stage_reg(m, self.read_en, "chunk_latch", self.read_chunk, self.read_chunk.shape())

    def dp16kd(self, m):
        """Columns of DP16KDs, each 512 x 36 (write port A, read port B; as yosys maps a memory to a
        pseudo-dual-port block RAM), ``2 max_blocks / 512`` deep, with the output register
        (``REGMODE`` OUTREG on both ports: at 36 bits the read word leaves on both ports' outputs,
        and nextpnr times each port's outputs by its own mode)."""
        width, depth = len(self.write.data), self.depth
        rows = -(-depth // 512)
        cols = -(-width // 36)
        abits = max(1, (depth - 1).bit_length())
        wdata = Cat(self.write.data, Const(0, cols * 36 - width))
        outs = []
        for r in range(rows):
            sel_w = (self.write.addr >> 9) == r if rows > 1 else Const(1)
            col_out = []
            for c in range(cols):
                do = Signal(36, name=f"do_r{r}_c{c}")
                wa = Cat(Const(0xF, 4), Const(0, 1), self.write.addr[:min(9, abits)])
                ra = Cat(Const(0, 5), self.read_addr[:min(9, abits)])
                ports = {"i_CLKA": ClockSignal(), "i_CEA": self.write.en & sel_w, "i_OCEA": self.out_en, "i_WEA": Const(1),
                         "i_RSTA": Const(0), "i_CLKB": ClockSignal(), "i_CEB": self.read_en, "i_OCEB": self.out_en,
                         "i_WEB": Const(0), "i_RSTB": Const(0)}
                for i in range(3):
                    ports[f"i_CSA{i}"] = ports[f"i_CSB{i}"] = Const(0)
                for i in range(14):
                    ports[f"i_ADA{i}"] = wa[i] if i < len(wa) else Const(0)
                    ports[f"i_ADB{i}"] = ra[i] if i < len(ra) else Const(0)
                di = wdata[c * 36:(c + 1) * 36]
                for i in range(18):
                    ports[f"i_DIA{i}"], ports[f"i_DIB{i}"] = di[i], di[18 + i]
                    ports[f"o_DOA{i}"], ports[f"o_DOB{i}"] = do[i], do[18 + i]
                m.submodules[f"ram_r{r}_c{c}"] = Instance(
                    "DP16KD", p_DATA_WIDTH_A=36, p_DATA_WIDTH_B=36, p_REGMODE_A="OUTREG", p_REGMODE_B="OUTREG",
                    p_RESETMODE="SYNC", p_ASYNC_RESET_RELEASE="SYNC", p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
                    p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL", p_GSR="DISABLED", **ports)
                col_out.append(do)
            outs.append(Cat(*col_out)[:width])
        if rows == 1:
            word = outs[0]
        else:           # the row of the word in the output registers (its address, two reads ago)
            row_l = stage_reg(m, self.read_en, "row_latch", self.read_addr >> 9, range(rows))
            row_o = stage_reg(m, self.out_en, "row_out", row_l, range(rows))
            word = Array(outs)[row_o]
        if self.chunks > 1:    # the chunk picked after the block RAMs' output registers
            chunk = stage_reg(m, self.out_en, "chunk_out", self.chunk_latch(m), self.read_chunk.shape())
            word = word.word_select(chunk, len(self.read_data))
        m.d.comb += self.read_data.eq(word)
        return m

    @staticmethod
    def model(words, addr) -> np.ndarray:
        """The word each read returns: the last written at its address."""
        return np.asarray(words)[np.asarray(addr)]


# -- the residual term ---------------------------------------------------------------------------------------------

BF16 = FORMATS["bf16"]


def _bf16_fields(code):
    """(sign, significand with its hidden bit, X + 134) of a BF16 code: X = max(e, 1) - 127 - 7."""
    e = code[7:15]
    return code[15], Cat(code[:7], e.any()), Mux(e.any(), e, 1)


def term_signature(config: GemvConfig) -> wiring.Signature:
    """The term unit's ports (``ResidualTerm``; an engine without the residual path has the same
    signals, created and left at 0)."""
    g, bits = config.group, config.act_format.bits
    return wiring.Signature({
        "entries": In(stream.Signature(entry_layout(config))),
        "x_en": Out(1), "x_out_en": Out(1), "x_addr": Out(range(config.max_blocks)),
        # (with a folded unit the x buffer returns a chunk of P codes: ``x_chunk`` picks it)
        **({"x_chunk": Out(range(g // config.macs_per_cycle))} if config.dot_lanes else {}),
        "x_data": In(unsigned(config.macs_per_cycle * bits)),
        "terms": Out(stream.Signature(data.StructLayout({"value": unsigned(32), "tag": tag_layout(config)}))),
        "busy": Out(1),
    })


class ResidualTerm(wiring.Component):
    """One sparse entry's term ``T = RNE_fp32(rho * x_j)`` with E4M3 activations (golden.dot step 4),
    ``latency`` (11) cycles (BF16 activations: ``ResidualTermBF16``).

    The product of a BF16 significand (8 bits) and an E4M3 one (4 bits) is 12 bits at an exponent
    ``X >= -133 - 9 = -142``: every such value at or above 2^-149 is a binary32 value, subnormal or
    normal, so ``T`` is the exact product, or +-FLT_MAX where it is beyond (``X + 11 >= 128``): no
    rounding. A zero product keeps the IEEE sign. Stages, a pipeline that never stalls (its terms wait
    in a FIFO of ``latency + 2`` at its end; an entry is taken only while there is room for it and
    every one inside: a credit register, so no outside ``ready`` reaches the x buffer), each one mux
    or one short chain: 1 the x word read into the RAM's latch (the entry's block column; the engine
    lends the port only while no block is inside); 2 the word in the x buffer's output register (the
    block RAM's own: ``x_out_en``); 3 the word in a register of its own (after the x buffer's
    row mux); 4 the entry's code out of the word (and rho's fields, the
    constant part of the exponent sum); 5 both significands, the exponent sum and the sign; 6-7 the
    product (hdl.arith's LUT multiplier); 8 its leading zeros; 9 the biased exponent and the
    subnormal shift; 10 the candidates, normal (the leading one dropped) and subnormal (P at the
    2^-149 quantum), and the conditions; 11 the binary32 pattern: one of those, saturated, or a
    signed zero.

    Ports: ``entries`` (in stream: ``col``, ``value`` (BF16), ``tag``), ``x_en``, ``x_out_en`` (the
    next cycle), ``x_addr`` (out) and ``x_data`` (in, two cycles later): the x buffer's read port; ``terms`` (out stream: ``value``,
    ``tag``), ``busy`` (out, a register: an entry or a term is inside, or was a cycle ago). ``model`` is
    golden.dot.residual_terms' rounding."""

    def __init__(self, config: GemvConfig):
        self.config = config
        self.multiplier = PipelinedMultiplier(BF16.mbits + 1, config.act_format.mbits + 1)
        self.latency = 4 + self.multiplier.latency + 5
        super().__init__(term_signature(config))

    def front(self, m, rho_exponent):
        """The part both term units share: the credits and the FIFO at the end, and stages 1-4 (the x
        word read, in the x buffer's output register, registered, and the entry's code out of it beside
        rho's sign, significand and ``rho_exponent(er)``, a ``(name, value, shape)`` stage field: what a
        unit keeps of rho's biased exponent). Returns ``(stage, carry, code, sr, Sr, e, tag, finish)``:
        ``tag`` delayed to stage 4, ``finish(stage, out, tag)`` queues the last stage's pattern."""
        cfg = self.config
        bits, lane_bits = cfg.act_format.bits, (cfg.group - 1).bit_length()
        sel_bits = (cfg.macs_per_cycle - 1).bit_length()        # the code's place in an x read: its lane
        ent = self.entries
        # The pipeline never stalls (its enable is 1): its terms wait in a FIFO at its end, and an entry
        # is taken only while that FIFO has room for it and every one inside (a credit register), so
        # that no ``ready`` from outside reaches the x buffer's read enable.
        depth = self.latency + 2
        m.submodules.queue = queue = fifo.SyncFIFOBuffered(width=32 + tag_layout(cfg).size, depth=depth)
        room = Signal(range(depth + 1), init=depth, name="room")
        busy = Signal(name="busy")      # room != depth, or was (a register: high a cycle longer at most)
        v = [Signal(name=f"valid{i}") for i in range(self.latency)]
        en = Const(1)
        take = Signal(name="take")
        pop = self.terms.valid & self.terms.ready
        room_next = room - take + pop
        m.d.comb += [ent.ready.eq(room != 0), take.eq(ent.valid & ent.ready), self.busy.eq(busy)]
        m.d.sync += [v[0].eq(take), room.eq(room_next), busy.eq((room != depth) | take)]
        m.d.sync += [v[i + 1].eq(v[i]) for i in range(self.latency - 1)]
        stage = Stages(m, en)

        def carry(value, n, name):
            return delay(m, en, value, n, name)

        # 1: the x word (read at this edge); the entry's lane, value and tag
        m.d.comb += [self.x_en.eq(take), self.x_out_en.eq(v[0]), self.x_addr.eq(ent.payload.col >> lane_bits)]
        if cfg.dot_lanes:      # folded: the chunk of the word with the code (read with the word)
            m.d.comb += self.x_chunk.eq(ent.payload.col[sel_bits:lane_bits])
        lane, rho, tag = stage(("lane", ent.payload.col[:sel_bits] if sel_bits else 0, unsigned(max(1, sel_bits))),
                               ("rho", ent.payload.value, unsigned(16)), ("tag1", ent.payload.tag, tag_layout(cfg)))
        # 2: the x word in the x buffer's output register (``x_out_en``, a cycle after the read);
        # 3: the word registered; 4: the activation code out of it (a 16:1 mux); beside it rho's fields.
        #    The word is registered first: with two x pages in DP16KDs the x buffer's output is a row
        #    mux (4:1 at 16384 columns) after the block RAMs' registers, too slow in front of the 16:1
        #    code mux in one cycle (7.8 ns on ECP5).
        word, lane, rho = stage(("x_word", self.x_data, self.x_data.shape()), ("lane2", carry(lane, 1, "lane"), lane.shape()),
                                ("rho2", carry(rho, 1, "rho"), unsigned(16)))
        sr, Sr, er = _bf16_fields(rho)
        code, sr, Sr, e = stage(("code", word.word_select(lane, bits) if sel_bits else word[:bits], unsigned(bits)),
                                ("sr2", sr, 1), ("Sr2", Sr, 8), rho_exponent(er))
        tag = carry(tag.as_value(), 3, "tag")

        def finish(stage, out, tag):
            assert 1 + stage.depth + self.multiplier.latency == self.latency, (stage.depth, self.latency)  # 1: the RAM's register
            m.d.comb += [queue.w_en.eq(v[-1]), queue.w_data.eq(Cat(out, tag)),
                         self.terms.valid.eq(queue.r_rdy), self.terms.payload.as_value().eq(queue.r_data),
                         queue.r_en.eq(pop)]
        return stage, carry, code, sr, Sr, e, tag, finish

    def product(self, m, stage, carry, sign, Sr, Sx, eb, tag):
        """Stage 5 (the sign, both significands and ``eb``, a ``(name, value, shape)`` stage field: the
        two units' exponent sums differ) and the multiplier's stages after it, with the sign, ``eb``
        and ``tag`` carried beside. Returns ``(sign, eb, tag, P)``."""
        sign, Sr, Sx, eb = stage(("sign3", sign, 1), ("sr3", Sr, 8), ("sx3", Sx, len(Sx)), eb)
        tag = carry(tag, 1, "tag3")
        m.submodules.multiplier = mul = self.multiplier
        m.d.comb += [mul.en.eq(stage.en), mul.a.eq(Sr), mul.b.eq(Sx)]
        sign, eb, tag = (carry(x, mul.latency, n) for x, n in ((sign, "sign"), (eb, "eb"), (tag, "tag_m")))
        return sign, eb, tag, mul.p

    def elaborate(self, platform):
        m = Module()
        act = self.config.act_format
        bits = act.bits
        # stages 1-4; beside the code er + 138 - 134 - bias - M (the constant part of eb below)
        stage, carry, code, sr, Sr, erk, tag, finish = self.front(
            m, lambda er: ("erk", er + (138 - 134 - act.bias - act.mbits), signed(10)))
        en = stage.en
        # 5: both significands, the sign, eb = X + 138: the biased binary32 exponent of P * 2^X if P's
        #    leading one were at bit 11 (X = (er - 134) + (ex - bias - M)); the result's is eb - lz(P)
        e_x = code[act.mbits:bits - 1]
        sx, Sx, ex = code[bits - 1], Cat(code[:act.mbits], e_x.any()), Mux(e_x.any(), e_x, 1)
        # 6-7: the product, exact
        sign, eb, tag, p = self.product(m, stage, carry, self.sign(sr, sx), Sr, Sx, ("eb3", erk + ex, signed(10)), tag)
        # 8-9: the leading zeros, the biased exponent, the subnormal shift P << (X + 149) = P << (eb + 11)
        #    (7 .. 22 where it applies): the leading zeros in a stage of their own, then the rest
        lz = leading_zeros(m, p, "lz")
        lz, eb, p, sign, tag = stage(("lz5", lz, lz.shape()), ("eb5", eb, signed(10)), ("p5", p, unsigned(12)),
                                     ("sign5", sign, 1), ("tag5", tag, len(tag)))
        biased, shift, p, sign, tag = stage(("biased", eb - lz, signed(10)), ("sub_shift", (eb + 11)[:5], unsigned(5)),
                                            ("p6", p, unsigned(12)), ("sign6", sign, 1), ("tag6", tag, len(tag)))
        lz = stage_reg(m, en, "lz6", lz, lz.shape())
        # 10: the candidates (normal: the leading one dropped; subnormal: P at the 2^-149 quantum) and
        #    the conditions; 11: the pattern
        normal, sub, zero, sat, norm, biased8, sign, tag = stage(
            ("normal", (p << lz)[:11], unsigned(11)), ("sub", (p << shift)[:23], unsigned(23)),
            ("zero8", p == 0, 1), ("sat8", biased >= 255, 1), ("norm8", biased >= 1, 1),
            ("biased8", biased[:8], unsigned(8)), ("sign8", sign, 1), ("tag8", tag, len(tag)))
        mag = Mux(zero, 0, Mux(sat, 0x7F7FFFFF, Mux(norm, Cat(Const(0, 12), normal, biased8), sub)))
        out, tag = stage(("out", Cat(mag[:31], sign), unsigned(32)), ("tag7", tag, len(tag)))
        finish(stage, out, tag)
        return m

    @staticmethod
    def sign(rho_sign, x_sign):
        """The product's sign (tests override it to inject a bug)."""
        return rho_sign ^ x_sign

    @staticmethod
    def model(rho_bf16, x_codes) -> np.ndarray:
        """The terms (binary32 patterns) of BF16 values ``rho_bf16`` times E4M3 codes ``x_codes``."""
        rho = BF16.decode(np.asarray(rho_bf16, np.int64))
        x = dot.ACT_FORMATS["e4m3"].decode(np.asarray(x_codes, np.int64))
        return to_float32(rho * x).view(np.uint32)


class ResidualTermBF16(ResidualTerm):
    """One sparse entry's term ``T = RNE_fp32(rho * x_j)`` with BF16 activations (golden.dot step 4),
    ``latency`` (14) cycles; the ports, the never-stalling pipeline, its credits and its FIFO are
    ``ResidualTerm``'s.

    The product of two BF16 significands (8 bits each) is ``P < 2^16`` at ``X = er + ex - 268``
    (``er``, ``ex`` the biased exponents, 1 for a subnormal), ``-266 <= X <= 240``: wider than
    binary32's range both ways, so the term must be rounded. Write ``eb = er + ex`` and ``lz`` for
    P's leading zeros in 16 bits. Its binary32 exponent field would be ``E = eb - 126 - lz``:

    * ``E >= 255``: beyond FLT_MAX, **saturated** to +-FLT_MAX (0x7F7FFFFF; golden.formats.to_float32);
    * ``1 <= E <= 254``: a normal value whose 16 significant bits fit in 24: **exact**, the pattern
      ``{E, P << lz}`` with the leading one dropped, no rounding;
    * ``E <= 0``: below 2^-126, in units of the 2^-149 quantum ``P * 2^(eb - 119) = (P << 22) >> s``
      with ``s = 141 - eb >= 0`` (``E <= 0`` means ``eb <= 126 + lz <= 141``). The one rounding of the
      term happens here: ``(P << 23) >> min(s, 63)`` gives the 23 kept bits above its bit 0, the
      round bit; the sticky bit (any bit of ``P << 22`` below the round bit) is ``tz(P) + 22 < s - 1``,
      i.e. ``tz(P) + eb < 118`` (``tz``: P's trailing zeros); to nearest, ties to even: ``kept + (round
      & (sticky | kept[0]))``. Bits are dropped only where ``s >= 23``, i.e. the product's LSB is below
      2^-149; then ``kept <= P / 2 < 2^15``, so a rounded term never reaches 2^-126 (the carry into the
      exponent field that a wider significand would need cannot happen), and one whose round bit is
      beyond P (``s >= 39``) is zero. Where ``s < 23`` the shift drops only zeros: the subnormal is exact.
    * ``P = 0``: a zero.

    The sign is always ``sign(rho) xor sign(x)``: a zero product, a product that underflows to zero
    and a saturated one keep the IEEE sign, as float64's product and its rounding into binary32 do.

    Stages (each one mux or one short chain): 1 the x word read into the RAM's latch; 2 the x buffer's
    output register; 3 the word in a register of its own; 4 the entry's code (a 16:1 mux of 16-bit
    codes) and rho's fields; 5 both significands, ``eb`` and the sign; 6-8 the product (hdl.arith's
    LUT multiplier); 9 ``lz`` and ``tz``; 10 ``E``, the shift ``s`` (clamped to 0 .. 63) and the sticky
    bit; 11-12 the subnormal shift (3 bits of ``s`` a stage) beside the normal candidate; 13 the
    rounding increment and the conditions; 14 the binary32 pattern."""

    def __init__(self, config: GemvConfig):
        super().__init__(config)
        assert config.act_format is BF16, config.act
        self.latency = 4 + self.multiplier.latency + 7

    def elaborate(self, platform):
        m = Module()
        # stages 1-4, ResidualTerm's: the x word, then the entry's code beside rho's fields
        stage, carry, code, sr, Sr, er, tag, finish = self.front(m, lambda er: ("er2", er, 8))
        # 5: both significands, the sign, eb = er + ex (the product is P * 2^(eb - 268))
        sx, Sx, ex = _bf16_fields(code)
        # 6-8: the product, exact
        sign, eb, tag, p = self.product(m, stage, carry, self.sign(sr, sx), Sr, Sx, ("eb3", er + ex, unsigned(9)), tag)
        # 9: P's leading and trailing zeros (16 for P = 0)
        lz, tz = leading_zeros(m, p, "lz"), trailing_zeros(p)
        lz, tz, eb, p, sign, tag = stage(("lz5", lz, lz.shape()), ("tz5", tz, range(17)), ("eb5", eb, unsigned(9)),
                                         ("p5", p, unsigned(16)), ("sign5", sign, 1), ("tag5", tag, len(tag)))
        # 10: the exponent field E = eb - 126 - lz, the subnormal shift s = 141 - eb (clamped to 0 .. 63:
        #     s < 0 only where E >= 1, s > 38 leaves nothing), the sticky bit tz + eb < 118
        s = Const(141, unsigned(9)) - eb
        shift = Mux(eb >= 141, 0, Mux(eb <= 141 - 63, 63, s[:6]))
        biased, shift, sticky, lz, p, sign, tag = stage(
            ("biased", eb - 126 - lz, signed(11)), ("sub_shift", shift, unsigned(6)),
            ("sticky", self.sticky(tz, eb), 1), ("lz6", lz, lz.shape()), ("p6", p, unsigned(16)),
            ("sign6", sign, 1), ("tag6", tag, len(tag)))
        # 11-12: (P << 23) >> s, three bits of s a stage; beside it the normal candidate (the leading
        #     one dropped) and the conditions
        wide = Cat(Const(0, 23), p)
        wide, fine, normal, zero, sat, norm, biased8, sign, tag = stage(
            ("sub_wide", wide >> Cat(Const(0, 3), shift[3:]), unsigned(39)), ("sub_fine", shift[:3], unsigned(3)),
            ("normal", (p << lz)[:15], unsigned(15)), ("zero8", p == 0, 1), ("sat8", biased >= 255, 1),
            ("norm8", biased >= 1, 1), ("biased8", biased[:8], unsigned(8)), ("sign7", sign, 1),
            ("tag7", tag, len(tag)))
        sticky = carry(sticky, 1, "sticky7")
        wide, sticky, normal, zero, sat, norm, biased8, sign, tag = stage(
            ("sub_wide8", (wide >> fine)[:24], unsigned(24)), ("sticky8", sticky, 1), ("normal8", normal, 15),
            ("zero9", zero, 1), ("sat9", sat, 1), ("norm9", norm, 1), ("biased9", biased8, 8),
            ("sign8", sign, 1), ("tag8", tag, len(tag)))
        # 13: round to nearest, ties to even (bit 0 the round bit, bits 1-23 the kept ones)
        kept, round_bit = wide[1:], wide[0]
        sub, normal, zero, sat, norm, biased8, sign, tag = stage(
            ("sub", kept + self.round_up(round_bit, sticky, kept[0]), unsigned(24)), ("normal9", normal, 15),
            ("zero10", zero, 1), ("sat10", sat, 1), ("norm10", norm, 1), ("biased10", biased8, 8),
            ("sign9", sign, 1), ("tag9", tag, len(tag)))
        # 14: the pattern: a zero, saturated, normal (exact) or subnormal (rounded); the sign on top
        mag = Mux(zero, 0, Mux(sat, 0x7F7FFFFF, Mux(norm, Cat(Const(0, 8), normal, biased8), sub)))
        out, tag = stage(("out", Cat(mag[:31], sign), unsigned(32)), ("tag10", tag, len(tag)))
        finish(stage, out, tag)
        return m

    @staticmethod
    def sticky(tz, eb):
        """Whether a bit of ``P << 22`` below the round bit (bit ``140 - eb``) is set (tests override it
        to inject a bug)."""
        return (tz + eb) < 118

    @staticmethod
    def round_up(round_bit, sticky, lsb):
        """To nearest, ties to even (tests override it to inject a bug)."""
        return round_bit & (sticky | lsb)

    @staticmethod
    def model(rho_bf16, x_codes) -> np.ndarray:
        """The terms (binary32 patterns) of BF16 values ``rho_bf16`` times BF16 codes ``x_codes``."""
        rho = BF16.decode(np.asarray(rho_bf16, np.int64))
        x = BF16.decode(np.asarray(x_codes, np.int64))
        return to_float32(rho * x).view(np.uint32)


def residual_term_class(config: GemvConfig) -> type[ResidualTerm]:
    """The term unit of the engine's activation format."""
    return ResidualTermBF16 if config.act_format is BF16 else ResidualTerm


# -- the sequencer: handshakes, block counters, pages, status -------------------------------------------------

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

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        S, B = cfg.tile, cfg.max_blocks
        rows_shape, bpr_shape = unsigned(cfg.max_rows.bit_length()), range(B)
        errors = Signal(error_layout(), name="errors")
        error_now = Signal(error_layout(), name="error_now")
        # the errors found now, registered before they join the sticky bits (a cycle later on status);
        # the x length check (error_late) is worked out on registers already, a cycle after the beat
        # (every bit of error_now is driven by an expression: a comb process that only assigns a
        # constant never runs in a 4-state simulator such as Icarus, and leaves its bit X)
        error_seen = Signal(error_layout(), name="error_seen")
        x_length_late = Signal(name="x_length_late")
        with m.If(self.clear):
            m.d.sync += [errors.eq(0), error_seen.eq(0)]
        with m.Else():
            m.d.sync += [errors.eq(errors.as_value() | error_seen.as_value() | (x_length_late << 1)),
                         error_seen.eq(error_now)]

        # -- the layer registers, two pages; the host writes the inactive one --------------------
        active = Signal(name="active")
        rows_m1 = Array(Signal(rows_shape, name=f"rows_m1_p{p}", reset_less=True) for p in range(2))
        bpr_m1 = Array(Signal(bpr_shape, name=f"bpr_m1_p{p}", reset_less=True) for p in range(2))
        offset = Array(Signal(signed(8), name=f"offset_p{p}", reset_less=True) for p in range(2))
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

        # -- x: two pages of the buffer, a vector each; the swap beat flips the layer page ----------
        # A vector loads into the free x page while the other's pass runs; a swap beat (a new layer:
        # it changes the layer registers and tables the pass uses) only while no vector is loaded.
        x_held = Signal(range(3), name="x_held")     # vectors loaded and their passes not done
        x_loaded = Signal(name="x_loaded")          # x_held != 0
        x_both = Signal(name="x_both")              # x_held == 2: no page free
        x_wpage = Signal(name="x_wpage")            # the x page the next beat writes
        x_rpage = Signal(name="x_rpage")            # the x page of the pass whose blocks come now
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
        bpr_now = Signal(bpr_shape, name="xl_bpr", reset_less=True)       # the beat's page's blocks per row - 1
        m.d.sync += [xl_take.eq(x_take), xl_last.eq(xp.last), xl_count.eq(x_count), bpr_now.eq(bpr_m1[page_now])]
        m.d.comb += [x_length_late.eq(xl_take & ((xl_count > bpr_now) | (xl_last & (xl_count != bpr_now)))),
                     error_now.x_length.eq(x_length_late)]
        with m.If(x_take):
            m.d.sync += active.eq(page_now)
            m.d.comb += error_now.x_nan.eq(Cat(self.not_finite(c) for c in xp.codes).any())
            with m.If(xp.last):
                m.d.sync += [x_count.eq(0), x_wpage.eq(~x_wpage)]
            with m.Elif(~x_count[-1]):
                m.d.sync += x_count.eq(x_count + 1)

        # -- blocks: the counters of tile_order -----------------------------------------------------
        col = Signal(bpr_shape, name="col")                   # block column of the next block
        slot = Signal(range(S), name="slot")                  # its row's slot (row - tile base)
        row = Signal(rows_shape, name="row")
        tile_base = Signal(rows_shape, name="tile_base")
        end_taken = Signal(name="end_taken")                  # the pass's last block is taken
        terms = Signal(name="terms")                          # the tile's residual entries come now
        # the active page's registers copied every cycle (a cycle late: the flags see a swap two
        # cycles after its beat, and no block is taken in the two cycles after a swap beat)
        rows_last = stage_reg(m, 1, "rows_last", rows_m1[active], rows_shape)
        cols_last = stage_reg(m, 1, "cols_last", bpr_m1[active], bpr_shape)
        rows_last_m1 = stage_reg(m, 1, "rows_last_m1", rows_m2[active], rows_shape)
        cols_last_m1 = stage_reg(m, 1, "cols_last_m1", bpr_m2[active], bpr_shape)
        with_terms = sparse[active]
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
        m.d.comb += swap_take.eq(x_take & xp.swap)
        m.d.sync += [swap_took.eq(swap_take), settled.eq(~swap_take & ~swap_took)]
        column_done = last_slot | at_last_row                 # the tile's last row of this column
        w_take = Signal(name="w_take")
        # a vector whose blocks may come: the oldest one's, until its last block is taken, then the
        # next one's if it is loaded (its page is the other: x_rpage flips at that last block)
        pass_open = Mux(end_taken, x_both, x_loaded) & settled & ~terms & ~self.term_busy
        m.d.comb += [self.w.ready.eq(self.en & pass_open), w_take.eq(self.w.valid & self.w.ready),
                     self.offer.eq(self.w.valid & pass_open)]
        m.d.comb += error_now.w_before_x.eq(self.w.valid & ~x_loaded)

        valid0 = Signal(name="valid0")
        # stage 0 loads on every enabled edge, a block taken or not (valid0 says which): the enable
        # is a register, where the take is logic with a hundred loads
        block0 = stage_reg(m, self.en, "block0", self.w.payload, unsigned(cfg.layout.block_bits))
        page0 = stage_reg(m, self.en, "page0", active, 1)
        xpage0 = stage_reg(m, self.en, "xpage0", x_rpage, 1)
        col0 = stage_reg(m, self.en, "col0", col, bpr_shape)
        offset0 = stage_reg(m, self.en, "offset0", offset[active], signed(8))
        # with residual entries a row's last value is its last entry's term, not its last block's
        tag0 = stage_reg(m, self.en, "tag0", self.tag(slot, col_first, row_done & ~with_terms,
                                                      column_done & row_done & at_last_row & ~with_terms),
                         tag_layout(cfg))
        with m.If(self.en):
            m.d.sync += valid0.eq(w_take)
        terms_base = Signal(rows_shape, name="terms_base")    # the tile whose entries come
        terms_top = Signal(rows_shape, name="terms_top")      # its last row
        terms_last = Signal(range(S), name="terms_last")      # its last row's slot
        terms_end = Signal(name="terms_end")                  # it is the pass's last tile
        terms_rows = Signal(range(S), name="terms_rows")      # its rows whose last entry has come in
        terms_in = Signal(name="terms_in")                    # its last entry has come in
        terms_page = Signal(name="terms_page")                # the x page its entries read
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
                m.d.sync += [terms.eq(1), terms_base.eq(tile_base), terms_top.eq(row), terms_last.eq(slot),
                             terms_end.eq(at_last_row), terms_rows.eq(0), terms_in.eq(0), terms_page.eq(x_rpage)]
        with m.Else():
            m.d.sync += [last_slot.eq(slot == S - 1), at_last_row.eq(row == rows_last),
                         row_done.eq(col == cols_last), col_first.eq(col == 0)]

        # -- residual entries: after each tile's blocks, once the blocks' values are all out ------------
        # An entry register between ``sparse`` and ``entries``: it takes the tile's entries (while
        # ``terms``, until the tile's last one is in) and works out their slot, whether they are
        # outside the tile and whether they are the tile's last on the way in; it hands them on
        # once the tile's blocks are out (``drained``)
        sp, ent = self.sparse.payload, self.entries
        e_valid = Signal(name="entry_valid")
        e_col = Signal.like(sp.col, name="entry_col", reset_less=True)
        e_value = Signal.like(sp.value, name="entry_value", reset_less=True)
        e_last, e_final, e_outside = (Signal(name=f"entry_{n}", reset_less=True) for n in ("last", "final", "outside"))
        e_slot = Signal(range(S), name="entry_slot", reset_less=True)
        entry_slot = sp.row - terms_base
        outside = (sp.row < terms_base) | (sp.row > terms_top) | (sp.col >> (cfg.group - 1).bit_length() > cols_last)
        final = sp.last & (terms_rows == terms_last)           # the tile's last row's last entry
        ent_take = Signal(name="entry_take")
        m.d.comb += [ent.valid.eq(e_valid & self.drained), ent_take.eq(ent.valid & ent.ready),
                     self.sparse.ready.eq(terms & ~terms_in & (~e_valid | ent_take)),
                     ent.payload.col.eq(e_col), ent.payload.value.eq(e_value),
                     ent.payload.tag.eq(self.tag(Mux(e_outside, 0, e_slot), 0, e_last, e_final & terms_end))]
        terms_done = Signal(name="terms_done")                # the pass's last entry is taken
        with m.If(self.sparse.ready):             # (loaded taken or not: e_valid says which)
            m.d.sync += [e_col.eq(sp.col), e_value.eq(sp.value), e_last.eq(sp.last), e_final.eq(final),
                         e_outside.eq(outside), e_slot.eq(entry_slot[:len(e_slot)])]
        with m.If(self.sparse.valid & self.sparse.ready):
            m.d.sync += e_valid.eq(1)
            with m.If(sp.last):
                m.d.sync += terms_rows.eq(terms_rows + 1)
                with m.If(final):
                    m.d.sync += terms_in.eq(1)
        with m.Elif(ent_take):
            m.d.sync += e_valid.eq(0)
        with m.If(ent_take):
            m.d.comb += error_now.sparse.eq(e_outside)
            with m.If(e_final):
                m.d.sync += [terms.eq(0), terms_done.eq(terms_end)]

        # the pass's last block leaves stage 0, or its last entry the term unit (their x words are read
        # by then): its x page is free. (A block of the next pass may be taken at that edge: its last
        # block then sets end_taken again.)
        freed = (self.en & valid0 & tag0.end) | (terms_done & ~self.term_busy)
        x_in = x_take & xp.last                               # a vector loaded
        x_held_next = x_held + x_in - freed
        m.d.sync += [x_held.eq(x_held_next), x_loaded.eq(x_held_next != 0), x_both.eq(x_held_next == 2)]
        with m.If(freed):
            m.d.sync += [end_taken.eq(0), terms_done.eq(0)]
        with m.If(w_take & column_done & row_done & at_last_row):
            m.d.sync += end_taken.eq(1)

        m.d.comb += [self.issue.valid.eq(valid0), self.issue.block.eq(block0), self.issue.page.eq(page0),
                     self.issue.col.eq(col0), self.issue.x_page.eq(xpage0), self.issue.offset.eq(offset0),
                     self.issue.tag.eq(tag0), self.term_page.eq(terms_page),
                     self.status.x_loaded.eq(x_loaded), self.status.errors.eq(errors)]
        return m

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

    @staticmethod
    def model(rows: int, blocks_per_row: int, tile: int) -> dict[str, np.ndarray]:
        """Per block in stream order (``golden.dot.tile_order``): ``col``, ``slot``, ``first``, ``last``,
        ``end``."""
        order = dot.tile_order(rows, blocks_per_row, tile)
        row, col = order // blocks_per_row, order % blocks_per_row
        end = np.zeros(len(order), np.int64)
        end[-1] = 1
        return {"col": col, "slot": row % tile, "first": (col == 0).astype(np.int64),
                "last": (col == blocks_per_row - 1).astype(np.int64), "end": end}


# -- the engine --------------------------------------------------------------------------------------------------

class GemvEngine(wiring.Component):
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
        cfg, lay = self.config, self.config.layout
        g, H, k = lay.group, lay.header_bits, lay.code_bits
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

        # -- the front end: stage 0 (the sequencer) and the reads, a pipeline of 1 + R stages that moves
        #    on an enable decided ahead (hdl.pipeline, hdl.output_buffer: one copy per lane, skid
        #    buffers at its end), so that no ready reaches the table RAM's enables
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
        drained = Signal(name="drained")      # no block past stage 0 (below)
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

        # -- the block dot unit; its tags wait in a FIFO beside it -------------------------------------
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

        # -- the row accumulator; y --------------------------------------------------------------------------
        value, tag = vals.r_data[:32], data.View(tag_shape, vals.r_data[32:])
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
        return m

    def table_page(self, page):
        """The table page a block reads: the page it was taken with (tests override it to inject a bug)."""
        return page

    def x_address(self, col):
        """The x word a block reads: its block column (tests override it to inject a bug)."""
        return col

    def x_chunk(self, chunk):
        """Folded: the chunk of the x word a block's chunk reads, its own (tests override it)."""
        return chunk

    def model(self, stream_: LayerStream, x) -> np.ndarray:
        return model(self.config, stream_, x)


def model(config: GemvConfig, layer: LayerStream, x) -> np.ndarray:
    """``y`` (float32, (rows,) or (batch, rows)) of ``layer`` and activations ``x`` (values of ``config.act``):
    golden.dot.gemv."""
    return dot.gemv(layer, x, config.act)


# -- the host side ---------------------------------------------------------------------------------------------

def w_beats(config: GemvConfig, layer: LayerStream) -> list[int]:
    """The ``w`` beats of one pass: the layer's blocks in ``tile_order``, each as an integer (LSB first)."""
    nb = layer.layout.block_bytes
    raw = dot.tiled_blocks(layer, config.tile)
    return [int.from_bytes(raw[i:i + nb], "little") for i in range(0, len(raw), nb)]


def sparse_beats(config: GemvConfig, layer: LayerStream) -> list[dict[str, int]]:
    """The ``sparse`` beats of one pass (a layer with residual entries): each tile's entries in
    ``golden.dot.tile_residuals``' order, tile after tile; the engine takes a tile's after its blocks."""
    return [{"row": int(r), "col": int(c), "value": int(v), "last": int(k)}
            for t in dot.tile_residuals(layer, config.tile)
            for r, c, v, k in zip(t["row"], t["col"], t["value"], t["last"])]


def x_beats(config: GemvConfig, codes) -> list[int]:
    """The ``codes`` fields of one vector's ``x`` beats (``g`` codes of ``config.act`` each), as integers."""
    g, bits = config.group, config.act_format.bits
    words = np.asarray(codes, np.int64).reshape(-1, g)
    return [sum(int(c) << (j * bits) for j, c in enumerate(w)) for w in words]


def describe(config: GemvConfig, engine: GemvEngine) -> dict:
    """The manifest of ``engine`` (built from ``config``, and elaborated: the one converted to Verilog):
    module name, parameters, ports (as the Verilog names them), latency and its shares, error bits."""
    from .generate import ports

    return {"module": module_name(config), "parameters": config.describe(), "latency_cycles": engine.latency,
            "latency_stages": engine.latencies(), "ports": ports(engine),
            "error_bits": [name for name, _ in error_layout()], "block_order": "golden.dot.tile_order",
            "tile": config.tile}


def module_name(config: GemvConfig) -> str:
    return "sop_" + config.name.replace("-", "_")
