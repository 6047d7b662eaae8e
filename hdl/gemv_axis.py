"""AXI4-Stream shell of the GEMV engine: ``y = W x`` behind AMBA AXI4-Stream ports (issue 15; docs/dot.md).

Role: ``GemvAxis(config)`` wraps one ``GemvEngine`` (hdl/gemv.py) in the
``sync`` domain and gives it the decoder shell's conventions (hdl/axis.py: its
``AxiStreamSignature``, load-word fields and ctrl bits, port naming);
``GemvAxisTop(config)`` is what `make verilog` writes as ``gemv-<point>_axis.v``:
the same ports plus ``aclk`` and ``aresetn`` (synchronous, active low).

Ports (every TDATA a whole number of bytes, LSB first, no TKEEP/TSTRB/TID/TDEST/TUSER)

* ``s_axis_x`` (in): activations, one beat of ``g`` codes of the engine's
  activation format, E4M3 or BF16 (column ``k g + j`` of beat ``k`` in byte
  ``j``, or bytes ``2j, 2j + 1`` for BF16); a vector is one packet, TLAST on its
  last beat (the engine's ``x.last``: a vector of another length than the
  layer's blocks per row sets ``x_length``).
* ``s_axis_w`` (in): one packed block per beat, exactly golden.layout's bytes
  (TDATA ``widths(cfg)["s_axis_w"]`` bits: the block's bytes), in ``golden.dot.tile_order``; a vector's
  pass is one packet, TLAST on its last block. The shell counts the pass
  (``rows * blocks_per_row`` of the layer) and sets ``w_tlast`` where TLAST is
  missing on that block or set on another one; the engine frames the pass by
  its own counters either way.
* ``s_axis_sparse`` (in): the engine's residual entries (``gemv_config.sparse_beats``,
  ``golden.dot.tile_residuals``' order), ``sparse_fields(cfg)``: row (u16), column
  (u16), BF16 value, a flags byte (bit 0: the row's last entry); TLAST on the
  pass's last entry (for the host's framing; the engine takes a tile's entries
  after its blocks, whatever TLAST says). Only for layers loaded with
  ``CTRL_SPARSE``, one packet per vector.
* ``s_axis_load`` (in): a layer's load packet, 64-bit words: table words as the
  decoder shell's (``axis.load_fields``: ctrl byte, bit 0 the bank; the
  address; the HIF code), then the layer word (ctrl bit 1, ``CTRL_LAYER``; bit 2
  ``CTRL_SPARSE``: the layer has residual entries) with TLAST: ``layer_fields(cfg)``,
  the offset (s8), rows (u16), blocks per row (u16) and ``vectors`` (u16): how
  many vectors use the layer. Everything lands in the engine's inactive page.
  A packet whose TLAST word is not a layer word, or a layer word without TLAST,
  sets ``load_tlast``; a layer word with 0 vectors sets the engine's ``layer``
  bit (and counts as 1).
* ``m_axis_y`` (out): one FP32 word (binary32 pattern of ``y_r``) per beat, rows
  in ascending order; TLAST on the pass's last row: one packet per vector.
* ``status`` (out, plain, ``status_layout``): ``x_loaded`` and the engine's
  sticky errors (gemv_config.error_layout), then the shell's: ``w_tlast``,
  ``load_tlast``. ``clear`` (in, plain): clears every sticky bit ``status`` shows in its
  cycle (an event not on ``status`` yet is kept and shows after it: set wins over clear, the
  engine's rule). Reset too. After
  ``layer``, ``load_tlast`` or ``x_length`` the shell is out of step with the host
  (``clear`` does not mend that): the host resets and starts every stream again at a
  layer's load packet, tables included (docs/dot.md, section 9, "After an error").

Sequencing, all in hardware (no timing rule left to the host: it may queue
every packet of every layer at once on each stream). Two registers, as the
decoder shell's ``loaded`` bit: ``loaded`` (a load packet is complete and waits
for its layer's first vector: set by the load packet's TLAST, cleared when that
vector's first beat is taken) and ``left`` (vectors of the current layer still
to start, from the layer word's ``vectors``). A vector's first beat with
``left == 0`` starts a new layer: it is the engine's ``swap`` beat, and waits
(``s_axis_x_tready`` low) until ``loaded``; it is taken at the earliest in the
cycle after the load packet's TLAST word (the engine's table-write rule: a
word written at cycle ``t`` is read from ``t + 2`` on, and blocks come two
cycles after the last x beat). ``s_axis_load_tready = ~loaded``: the next
layer's packet waits until this one's swap (the engine writes the inactive
page, which is the one the waiting layer will read). The engine itself holds
two vectors (two x pages: the next loads during the current pass; its swap
beat waits until no vector is loaded), and w and the sparse entries wait for
their vector. After reset, the first vector waits for a load packet.

Handshake (AMBA AXI4-Stream): ``m_axis_y_tvalid``, TDATA and TLAST are the
engine's ``y`` stream, which does not depend on ``m_axis_y_tready`` and holds
while TVALID is high and TREADY low (tests/test_gemv_axis.py probes it every
cycle); every TREADY comes from registers and the engine's enable.

Latency: ``latency`` = the engine's (47 cycles for gemv-sop4-g16): from the
handshake of a row's last block on ``s_axis_w`` to its word's on ``m_axis_y``,
nothing stalled. Throughput: the engine's (one block a
cycle).

``model`` is the beat-level model (golden.dot.gemv through gemv.model): the
``m_axis_y`` beats ``(tdata, tlast)`` of a sequence of layers, each with its
vectors; ``load_beats``, ``x_beats``, ``w_beats``, ``sparse_beats`` are what a
host sends, ``stream_beats`` all of it for a sequence of layers.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import ClockDomain, Module, Mux, Shape, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sop.golden.layout import LayerStream

from . import axis, gemv, gemv_config
from .axis import CTRL_BANK, CTRL_SPARSE, AxiStreamSignature, load_fields
from .gemv import GemvEngine
from .gemv_config import GemvConfig

CTRL_LAYER = axis.CTRL_OFFSET            # ctrl bit 1: the layer word (the decoder shell's offset word)
VECTORS_BITS = 16                        # the layer word's ``vectors`` field
Y_BITS = 32


def _bytes(bits: int) -> int:
    return -(-bits // 8)


def _fields(widths: dict[str, int], lsb: int = 0) -> dict[str, tuple[int, int]]:
    """``name: (lsb, bits)`` of fields laid LSB first from ``lsb``, each a whole number of bytes."""
    out = {}
    for name, bits in widths.items():
        out[name] = (lsb, 8 * _bytes(bits))
        lsb += out[name][1]
    return out


def _width(layout: data.StructLayout, name: str) -> int:
    return Shape.cast(layout.members[name]).width


def layer_fields(cfg: GemvConfig) -> dict[str, tuple[int, int]]:
    """The layer word's fields after its ctrl byte: offset, rows, blocks per row, vectors."""
    lay = gemv_config.layer_layout(cfg)
    return {"ctrl": (0, 8), **_fields({"offset": 8, "rows": _width(lay, "rows"),
                                       "blocks_per_row": _width(lay, "blocks_per_row"), "vectors": VECTORS_BITS}, 8)}


def sparse_fields(cfg: GemvConfig) -> dict[str, tuple[int, int]]:
    """An ``s_axis_sparse`` beat's fields: row, column, BF16 value, flags (bit 0: the row's last)."""
    sp = gemv_config.sparse_layout(cfg)
    return _fields({"row": _width(sp, "row"), "col": _width(sp, "col"), "value": 16, "flags": 8})


def _end(fields: dict[str, tuple[int, int]]) -> int:
    return max(lsb + bits for lsb, bits in fields.values())


def widths(cfg: GemvConfig) -> dict[str, int]:
    """TDATA bits of each stream."""
    return {"s_axis_x": 8 * _bytes(cfg.act_format.bits * cfg.group), "s_axis_w": 8 * _bytes(cfg.layout.block_bits),
            "s_axis_sparse": _end(sparse_fields(cfg)),
            "s_axis_load": max(_end(load_fields(cfg)), _end(layer_fields(cfg))), "m_axis_y": Y_BITS}


def shell_error_layout() -> data.StructLayout:
    return data.StructLayout({"w_tlast": unsigned(1), "load_tlast": unsigned(1)})


def status_layout() -> data.StructLayout:
    """``status``: the engine's (``x_loaded``, ``errors``), then the shell's own sticky bits."""
    return data.StructLayout({"x_loaded": unsigned(1), "errors": gemv_config.error_layout(),
                              "shell": shell_error_layout()})


def _field(word, fields, name):
    lsb, bits = fields[name]
    return word[lsb:lsb + bits]


# -- the beat-level model and the host side (golden/ only) ----------------------------------------------------
def _framed(words) -> list[tuple[int, int]]:
    """``(tdata, tlast)`` of one packet: TLAST on its last word."""
    return [(int(w), int(i == len(words) - 1)) for i, w in enumerate(words)]


def layer_word(cfg: GemvConfig, layer: LayerStream, vectors: int) -> int:
    """The layer word of ``layer``, used by ``vectors`` vectors."""
    f = layer_fields(cfg)
    values = {"ctrl": CTRL_LAYER | CTRL_SPARSE * int(len(layer.sparse) > 0), "offset": layer.offset & 0xFF,
              "rows": layer.rows, "blocks_per_row": layer.cols // cfg.group, "vectors": vectors}
    return sum((int(v) & ((1 << f[k][1]) - 1)) << f[k][0] for k, v in values.items())


def load_beats(cfg: GemvConfig, layer: LayerStream, vectors: int) -> list[tuple[int, int]]:
    """``s_axis_load`` beats of one layer: every table word (bank, then address; the decoder
    shell's words), then the layer word with TLAST."""
    words = [axis.load_word(cfg, bank=b, addr=a, data=int(layer.luts[b][a]))
             for b in range(len(layer.luts)) for a in range(len(layer.luts[b]))]
    return _framed(words + [layer_word(cfg, layer, vectors)])


def x_beats(cfg: GemvConfig, codes) -> list[tuple[int, int]]:
    """``s_axis_x`` beats of one vector (codes of the engine's activation format)."""
    return _framed(gemv_config.x_beats(cfg, codes))


def w_beats(cfg: GemvConfig, layer: LayerStream) -> list[tuple[int, int]]:
    """``s_axis_w`` beats of one pass: the blocks in tile order, TLAST on the last."""
    return _framed(gemv_config.w_beats(cfg, layer))


def sparse_beats(cfg: GemvConfig, layer: LayerStream) -> list[tuple[int, int]]:
    """``s_axis_sparse`` beats of one pass (none without entries), TLAST on the last."""
    f = sparse_fields(cfg)
    if not len(layer.sparse):
        return _framed([])
    return _framed([(e["row"] << f["row"][0]) | (e["col"] << f["col"][0]) | (e["value"] << f["value"][0])
                    | (e["last"] << f["flags"][0]) for e in gemv_config.sparse_beats(cfg, layer)])


def stream_beats(cfg: GemvConfig, layers) -> dict[str, list[tuple[int, int]]]:
    """Every input stream's beats for ``layers`` (each ``(layer, vectors)``), in order: what a host
    may queue at once (a load packet per layer; per vector an x, a w and a sparse packet)."""
    out = {"s_axis_load": [], "s_axis_x": [], "s_axis_w": [], "s_axis_sparse": []}
    for layer, vectors in layers:
        out["s_axis_load"] += load_beats(cfg, layer, len(vectors))
        for v in vectors:
            out["s_axis_x"] += x_beats(cfg, v)
            out["s_axis_w"] += w_beats(cfg, layer)
            out["s_axis_sparse"] += sparse_beats(cfg, layer)
    return out


def vector_y(cfg: GemvConfig, layer: LayerStream, vectors) -> np.ndarray:
    """``y`` words (uint32, (vectors, rows)) of ``layer`` and activation code vectors (the engine's
    format, ``cfg.act``): golden.dot.gemv."""
    x = cfg.act_format.decode(np.asarray(vectors, np.int64).reshape(-1, layer.cols)).astype(np.float32)
    return gemv.model(cfg, layer, x).reshape(-1, layer.rows).view(np.uint32)


def model(cfg: GemvConfig, layers) -> list[tuple[int, int]]:
    """``m_axis_y`` beats ``(tdata, tlast)`` owed for ``layers``, each ``(layer, vectors)`` (activation
    codes), loaded and streamed in turn: one packet per vector, TLAST on its last row."""
    return [b for layer, vectors in layers for y in vector_y(cfg, layer, vectors) for b in _framed(y)]


class GemvAxis(wiring.Component):
    """The GEMV engine behind AXI4-Stream interfaces, in the ``sync`` domain (module docstring)."""

    def model(self, layers) -> list[tuple[int, int]]:
        return model(self.config, layers)

    def __init__(self, config: GemvConfig, *, engine: GemvEngine | None = None):
        # engine: the engine used (tests put a broken one in)
        self.config = config
        self.engine = engine if engine is not None else GemvEngine(config)
        w = widths(config)
        super().__init__({
            "s_axis_x": In(AxiStreamSignature(w["s_axis_x"])),
            "s_axis_w": In(AxiStreamSignature(w["s_axis_w"])),
            "s_axis_sparse": In(AxiStreamSignature(w["s_axis_sparse"])),
            "s_axis_load": In(AxiStreamSignature(w["s_axis_load"])),
            "m_axis_y": Out(AxiStreamSignature(w["m_axis_y"])),
            "clear": In(1),
            "status": Out(status_layout()),
        })

    @property
    def latency(self) -> int:
        """Cycles from a row's last block taken on ``s_axis_w`` to its word's handshake: the engine's."""
        return self.engine.latency

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        m.submodules.engine = eng = self.engine
        xs, ws, sps, ld, ys = self.s_axis_x, self.s_axis_w, self.s_axis_sparse, self.s_axis_load, self.m_axis_y
        rows_shape = eng.layer.payload.rows.shape()
        bpr_shape = eng.layer.payload.blocks_per_row.shape()

        # -- loads: table words into the engine's load stream, the layer word into its layer stream
        loaded = Signal(name="loaded")            # a page is complete and waits for its layer's first vector
        lf, yf = load_fields(cfg), layer_fields(cfg)
        ctrl = ld.tdata[:8]
        is_layer, bank, sparse = (ctrl[bit.bit_length() - 1] for bit in (CTRL_LAYER, CTRL_BANK, CTRL_SPARSE))
        load_take = ld.tvalid & ld.tready
        layer_take = load_take & is_layer
        vectors = _field(ld.tdata, yf, "vectors")
        m.d.comb += [ld.tready.eq(~loaded),
                     eng.load.valid.eq(load_take & ~is_layer), eng.load.payload.bank.eq(bank),
                     eng.load.payload.addr.eq(_field(ld.tdata, lf, "addr")),
                     eng.load.payload.data.eq(_field(ld.tdata, lf, "data")),
                     eng.layer.valid.eq(layer_take),
                     eng.layer.payload.offset.eq(_field(ld.tdata, yf, "offset")),
                     eng.layer.payload.sparse.eq(sparse)]
        gemv.drive_layer_shape(m, self.config, eng.layer.payload, _field(ld.tdata, yf, "rows"),
                               _field(ld.tdata, yf, "blocks_per_row"))
        # the waiting layer's vectors, rows and blocks per row (minus one), copied at its swap
        next_left = Signal(range(1 << VECTORS_BITS), name="next_left", reset_less=True)
        next_rows = Signal(rows_shape, name="next_rows_m1", reset_less=True)
        next_bpr = Signal(bpr_shape, name="next_bpr_m1", reset_less=True)
        with m.If(layer_take):
            m.d.sync += [next_left.eq(Mux(vectors == 0, 0, vectors - 1)),
                         next_rows.eq(eng.layer.payload.rows - 1), next_bpr.eq(eng.layer.payload.blocks_per_row - 1)]
        with m.If(load_take & ld.tlast):
            m.d.sync += loaded.eq(1)

        # -- x: a vector's first beat with no vector of the layer left starts the next layer (swap)
        x_first = Signal(init=1, name="x_first")      # the next x beat is a vector's first
        left = Signal(range(1 << VECTORS_BITS), name="left")          # vectors of the layer still to start
        left_zero = Signal(init=1, name="left_zero")                  # left == 0
        swap = x_first & left_zero
        gate = ~swap | loaded
        x_take = xs.tvalid & xs.tready
        m.d.comb += [eng.x.payload.codes.as_value().eq(xs.tdata), eng.x.payload.last.eq(xs.tlast),
                     eng.x.payload.swap.eq(swap), eng.x.valid.eq(xs.tvalid & gate), xs.tready.eq(eng.x.ready & gate)]
        cur_rows = Signal(rows_shape, name="cur_rows_m1", reset_less=True)
        cur_bpr = Signal(bpr_shape, name="cur_bpr_m1", reset_less=True)
        with m.If(x_take):
            m.d.sync += x_first.eq(xs.tlast)
            with m.If(swap):
                m.d.sync += [loaded.eq(0), left.eq(next_left), left_zero.eq(next_left == 0),
                             cur_rows.eq(next_rows), cur_bpr.eq(next_bpr)]
            with m.Elif(x_first):
                m.d.sync += [left.eq(left - 1), left_zero.eq(left == 1)]

        # -- w: blocks into the engine; the pass counted to check TLAST
        w_take = ws.tvalid & ws.tready
        col = Signal(bpr_shape, name="w_col")
        row = Signal(rows_shape, name="w_row")
        row_end, pass_end = col == cur_bpr, (col == cur_bpr) & (row == cur_rows)
        # (offered only while a vector is loaded: a host queues its blocks at once, which the engine
        # would flag as ``w_before_x``)
        m.d.comb += [eng.w.payload.eq(ws.tdata), eng.w.valid.eq(ws.tvalid & eng.status.x_loaded),
                     ws.tready.eq(eng.w.ready & eng.status.x_loaded)]
        with m.If(w_take):
            m.d.sync += col.eq(Mux(row_end, 0, col + 1))
            with m.If(pass_end):
                m.d.sync += row.eq(0)
            with m.Elif(row_end):
                m.d.sync += row.eq(row + 1)

        # -- sparse entries: fields into the engine's entry
        sf, sp = sparse_fields(cfg), eng.sparse.payload
        m.d.comb += [sp.row.eq(_field(sps.tdata, sf, "row")), sp.col.eq(_field(sps.tdata, sf, "col")),
                     sp.value.eq(_field(sps.tdata, sf, "value")), sp.last.eq(_field(sps.tdata, sf, "flags")[0]),
                     eng.sparse.valid.eq(sps.tvalid), sps.tready.eq(eng.sparse.ready)]

        # -- y: the engine's stream (its valid and payload never depend on ready)
        m.d.comb += [ys.tdata.eq(eng.y.payload.value), ys.tlast.eq(eng.y.payload.last), ys.tvalid.eq(eng.y.valid),
                     eng.y.ready.eq(ys.tready)]

        # -- status: the engine's, and the shell's sticky bits (registered a cycle, as the engine's).
        # ``clear`` clears what status shows in its cycle; an event not on it yet (in ``seen``, or
        # in the cycle of clear) is kept, set wins over clear, as in the engine's bits: a host that
        # clears in the cycle it reads status loses no error it did not read
        shell = Signal(shell_error_layout(), name="shell_errors")
        seen = Signal(shell_error_layout(), name="shell_seen")
        zero_vectors = Signal(name="zero_vectors")
        m.d.sync += [seen.w_tlast.eq(w_take & (ws.tlast != pass_end)),
                     # a packet is table words then its layer word with TLAST: TLAST on a table word
                     # cuts it short, a layer word without TLAST runs it into the next layer's packet
                     # (whose tables then overwrite the waiting page, silently when the shapes agree)
                     seen.load_tlast.eq(load_take & (ld.tlast != is_layer)),
                     zero_vectors.eq(Mux(self.clear, 0, zero_vectors) | (layer_take & (vectors == 0))),
                     shell.eq(Mux(self.clear, 0, shell.as_value()) | seen.as_value())]
        m.d.comb += [eng.clear.eq(self.clear), self.status.x_loaded.eq(eng.status.x_loaded),
                     self.status.errors.eq(eng.status.errors), self.status.shell.eq(shell)]
        m.d.comb += self.status.errors.layer.eq(eng.status.errors.layer | zero_vectors)
        return m


class GemvAxisTop(wiring.Component):
    """``GemvAxis`` with AXI's ``aclk`` and ``aresetn`` (active low, synchronous) as ports: the top of
    ``gemv-<point>_axis.v``; ``ports()`` names its Verilog ports as AMBA does (``s_axis_x_tdata``)."""

    def model(self, layers) -> list[tuple[int, int]]:
        return model(self.config, layers)

    def __init__(self, config: GemvConfig, *, core: GemvAxis | None = None, **kwargs):
        # core: the shell used (tests put a broken one in); kwargs: GemvAxis's
        self.config = config
        self.core = core if core is not None else GemvAxis(config, **kwargs)
        # (status as a plain vector: a Verilog port is a signal)
        super().__init__({"aclk": In(1), "aresetn": In(1), **dict(self.core.signature.members),
                          "status": Out(status_layout().size)})

    @property
    def latency(self) -> int:
        return self.core.latency

    def ports(self) -> dict:
        return axis.axi_ports(self)

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd = ClockDomain("sync", local=True)
        m.d.comb += [cd.clk.eq(self.aclk), cd.rst.eq(~self.aresetn)]
        m.submodules.core = core = self.core
        for name in ("s_axis_x", "s_axis_w", "s_axis_sparse", "s_axis_load"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(core, name))
        wiring.connect(m, core.m_axis_y, wiring.flipped(self.m_axis_y))
        m.d.comb += [core.clear.eq(self.clear), self.status.eq(core.status)]
        return m


def module_name(config: GemvConfig) -> str:
    return gemv.module_name(config) + "_axis"
