"""The GEMV engine's side of the board protocol: hdl.gemv.GemvEngine, a y FIFO, counters, status.

Role: what ``ProtocolEngine`` (synth/gateware/protocol.py) drives for the GEMV_*
commands of docs/board-protocol.md on a board that has the engine (the ULX3S
core, beside the decoder; the iCEBreaker's GEMV-only core, ``icebreaker-gemv``);
the parser there cuts frames into these streams, this module holds the engine and
what the protocol needs around it. Nothing here knows about frames or bytes but
``status_payload`` (the GEMV_STATUS reply bytes).

Ports (``sync`` domain):

* ``load`` (in stream, hdl.gemv_config.load_layout): table writes, straight to the engine;
* ``layer`` (in stream, ``wire_layer_layout``: rows and blocks per row as the
  wire's u16, offset): into the engine's layer registers, each field saturated
  to its width (a value too large for the engine is then still one it flags:
  its ``layer`` error bit, never a silently truncated shape), and ``sparse``: the
  layer's tiles are followed by their residual entries;
* ``x`` (in stream, hdl.gemv_config.x_layout), ``w`` (in stream, a packed block): to the
  engine, counted;
* ``sparse`` (in stream, ``wire_entry_layout``: row, column and BF16 value as the
  wire's u16, the row's ``last``): sparse residual entries into a queue of
  ``entry_depth`` entries, which feeds the engine's ``sparse`` stream at its
  pace (it takes a tile's entries after the tile's blocks). A row or column too
  large for the engine's fields becomes the row ``2^n - 1``, which is in no tile:
  the engine flags it (its ``sparse`` error bit), never a silently truncated
  entry;
* ``y`` (out stream, 32 bits): the engine's y words through a FIFO of
  ``y_depth`` words (a layer's rows: the engine never waits for the UART within
  a pass), ``y_level`` the words in it;
* ``y_none`` (out): the FIFO is empty and no y word is owed: no vector was
  loaded since the last word was read (GEMV_Y answers NO_Y). Owed words are
  counted from the x beats: a vector's last beat owes its layer's rows (the
  rows the host wrote for the page that beat uses);
* ``clear`` (in): clears the engine's sticky error bits and the counters, and drops
  the entries left in the sparse entry queue (a host clears before a run, with no
  vector loaded: the engine takes entries only within a pass);
* ``x_loaded``, ``errors`` (out): the engine's status.

Counters (32 bits, wrapping; reset and ``clear`` zero them): ``blocks`` (W
blocks taken), ``offered`` (cycles a W block was offered, taken or held off:
blocks * g / offered is the engine's MACs per active cycle, g when it is never
held off), ``pass_cycles`` (cycles with a vector loaded: the pass's span on the
board, set by how fast the wire brings the blocks).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from sop.hdl.gemv import GemvEngine, drive_layer_shape
from sop.hdl.gemv_config import GemvConfig, error_layout, load_layout, sparse_layout, x_layout

#: The sparse entry queue's depth (entries): more than one GEMV_SPARSE frame of the default payload.
DEFAULT_ENTRY_DEPTH = 64


def wire_layer_layout() -> data.StructLayout:
    """GEMV_LAYER's fields as the wire carries them (wire.GEMV_LAYER_FORMAT and its flags' ``sparse``)."""
    return data.StructLayout({"rows": unsigned(16), "blocks_per_row": unsigned(16), "offset": signed(8),
                              "sparse": unsigned(1)})


def wire_entry_layout() -> data.StructLayout:
    """A GEMV_SPARSE entry as the wire carries it (wire.GEMV_ENTRY_FORMAT): row, column, BF16 value,
    and ``last`` (its flags' ENTRY_LAST: the row's last entry)."""
    return data.StructLayout({"row": unsigned(16), "col": unsigned(16), "value": unsigned(16), "last": unsigned(1)})


class GemvPort(wiring.Component):
    def __init__(self, config: GemvConfig, *, y_depth: int | None = None, entry_depth: int = DEFAULT_ENTRY_DEPTH,
                 engine=None):
        self.config = config
        self.y_depth = config.max_rows if y_depth is None else y_depth
        self.entry_depth = entry_depth
        if not 1 <= self.y_depth <= 0xFFFF or not 1 <= config.max_rows <= 0xFFFF or config.max_cols > 0xFFFF:
            raise ValueError(f"engine {config.name}: max_rows, max_cols and the y FIFO must fit the wire's u16")
        if entry_depth < 2:
            raise ValueError(f"the sparse entry queue needs at least 2 entries, got {entry_depth}")
        self.engine = engine if engine is not None else GemvEngine(config)
        super().__init__({
            "load": In(stream.Signature(load_layout(config))),
            "layer": In(stream.Signature(wire_layer_layout())),
            "x": In(stream.Signature(x_layout(config))),
            "w": In(stream.Signature(unsigned(config.layout.block_bits))),
            "sparse": In(stream.Signature(wire_entry_layout())),
            "y": Out(stream.Signature(32)),
            "y_level": Out(range(self.y_depth + 1)),
            "y_none": Out(1),
            "clear": In(1),
            "x_loaded": Out(1),
            "errors": Out(error_layout()),
            "blocks": Out(32), "offered": Out(32), "pass_cycles": Out(32),
        })

    def status_payload(self) -> list:
        """The GEMV_STATUS reply (wire.GEMV_STATUS_FORMAT) as byte values, LSB first."""
        cfg = self.config

        def le(value, n):
            return [value[8 * i:8 * i + 8] for i in range(n)]

        def const(v, n):
            return [(v >> 8 * i) & 0xFF for i in range(n)]

        # flags: bit 0 x_loaded, bit 1 the engine has no residual path (wire.GemvStatus.residuals)
        flags = self.x_loaded if cfg.sparse else Cat(self.x_loaded, Const(1, 1))
        return ([flags, self.errors.as_value(), cfg.group, cfg.tile] + const(cfg.max_cols, 2)
                + const(cfg.max_rows, 2) + le(self.y_level, 2) + const(self.y_depth, 2)
                + le(self.blocks, 4) + le(self.offered, 4) + le(self.pass_cycles, 4))

    def y_word(self, value):
        """A y word as it goes into the FIFO: the engine's (tests break this)."""
        return value

    def entry_queue(self, m, eng):
        """The sparse entry queue between ``sparse`` and the engine's ``sparse`` stream."""
        entry = self.engine_entry(m, self.sparse.payload)
        m.submodules.entry_queue = queue = SyncFIFOBuffered(width=len(entry.as_value()), depth=self.entry_depth)
        # ``clear`` also drops the entries an earlier, broken run left in the queue (read out until empty)
        flush = Signal()
        with m.If(self.clear):
            m.d.sync += flush.eq(1)
        with m.Elif(~queue.r_stream.valid):
            m.d.sync += flush.eq(0)
        m.d.comb += [queue.w_stream.valid.eq(self.sparse.valid), queue.w_stream.payload.eq(entry),
                     self.sparse.ready.eq(queue.w_stream.ready),
                     eng.sparse.valid.eq(queue.r_stream.valid & ~flush), eng.sparse.payload.eq(queue.r_stream.payload),
                     queue.r_stream.ready.eq(eng.sparse.ready | flush)]

    def engine_entry(self, m, entry):
        """A wire entry as the engine's ``sparse`` payload (hdl.gemv_config.sparse_layout): a row or column
        beyond the engine's fields gives the row ``2^n - 1``, in no tile (the engine flags it)."""
        out = Signal(sparse_layout(self.config))
        row_top, col_top = (1 << len(out.row)) - 1, self.config.max_cols - 1
        wide = (entry.row > row_top) | (entry.col > col_top)
        m.d.comb += [out.row.eq(Mux(wide, row_top, entry.row)), out.col.eq(entry.col[:len(out.col)]),
                     out.value.eq(entry.value), out.last.eq(entry.last)]
        return out

    def elaborate(self, platform):
        m = Module()
        eng = self.engine
        m.submodules.engine = eng
        m.submodules.y_fifo = fifo = SyncFIFOBuffered(width=32, depth=self.y_depth)

        wiring.connect(m, wiring.flipped(self.load), eng.load)
        wiring.connect(m, wiring.flipped(self.x), eng.x)
        wiring.connect(m, wiring.flipped(self.w), eng.w)
        wiring.connect(m, fifo.r_stream, wiring.flipped(self.y))

        # sparse entries: into the queue (fitted to the engine's fields), the queue into the engine (an
        # engine without the residual path has no queue: the protocol answers GEMV_SPARSE UNKNOWN_CMD)
        if self.config.sparse:
            self.entry_queue(m, eng)

        # the layer registers, each field saturated to the engine's width
        lw, ew = self.layer.payload, eng.layer.payload
        m.d.comb += [eng.layer.valid.eq(self.layer.valid), self.layer.ready.eq(eng.layer.ready),
                     ew.offset.eq(lw.offset), ew.sparse.eq(lw.sparse)]
        drive_layer_shape(m, self.config, ew, lw.rows, lw.blocks_per_row)

        # y: the engine's words into the FIFO (``last`` is not kept: the host counts rows)
        m.d.comb += [fifo.w_stream.valid.eq(eng.y.valid), fifo.w_stream.payload.eq(self.y_word(eng.y.payload.value)),
                     eng.y.ready.eq(fifo.w_stream.ready), self.y_level.eq(fifo.level)]

        # words owed: a vector's last x beat owes its page's rows, each word into the FIFO pays one
        rows_next, rows_now = Signal(16), Signal(16)
        owed = Signal(18)
        with m.If(self.layer.valid & self.layer.ready):
            m.d.sync += rows_next.eq(lw.rows)
        x_take = self.x.valid & self.x.ready
        swap, last = self.x.payload.swap, self.x.payload.last
        with m.If(x_take & swap):
            m.d.sync += rows_now.eq(rows_next)
        owes = Mux(x_take & last, Mux(swap, rows_next, rows_now), 0)
        paid = fifo.w_stream.valid & fifo.w_stream.ready
        m.d.sync += owed.eq(owed + owes - paid)
        m.d.comb += self.y_none.eq((fifo.level == 0) & (owed == 0))

        # status and counters
        m.d.comb += [eng.clear.eq(self.clear), self.x_loaded.eq(eng.status.x_loaded),
                     self.errors.eq(eng.status.errors)]
        with m.If(self.clear):
            m.d.sync += [self.blocks.eq(0), self.offered.eq(0), self.pass_cycles.eq(0)]
        with m.Else():
            m.d.sync += [self.blocks.eq(self.blocks + (eng.w.valid & eng.w.ready)),
                         self.offered.eq(self.offered + eng.w.valid),
                         self.pass_cycles.eq(self.pass_cycles + eng.status.x_loaded)]
        return m
