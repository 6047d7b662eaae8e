"""AXI4-Stream shell: the decoder behind AMBA AXI4-Stream ports, with the table loads as a second stream.

``AxisDecoder(config)`` wraps one ``Decoder`` (hdl/decoder.py) in the ``sync``
domain; ``AxisTop(config)`` is what `make verilog` writes as ``NAME_axis.v``:
the same ports plus ``aclk`` and ``aresetn`` (AXI's clock and active-low reset,
sampled at the rising edge of ``aclk``), every port named as AMBA AXI4-Stream
names the signal (``s_axis_tdata``, ``m_axis_tready``, ...; docs/hardware.md,
"AXI4-Stream shell").

Ports (every TDATA a whole number of bytes, no TKEEP/TSTRB/TID/TDEST/TUSER: all
bytes of every beat are data bytes)

* ``s_axis`` (in): blocks. TDATA is one decoder input beat, exactly the bytes
  golden.layout.pack_blocks writes (``blocks_per_beat`` blocks, byte 0 in
  TDATA[7:0]): a layer's packed blocks are one AXI4-Stream packet, TLAST on
  its last beat. The first beat after reset or after a TLAST is the layer's
  first beat: the decoder's ``swap`` (it reads the page just loaded).
* ``s_axis_load`` (in): table and offset loads, one word per beat,
  ``load_bits(config)`` wide (32 for every named configuration), LSB first:
  byte 0 ``ctrl`` (bit 0: bank, bit 1: 1 = offset word, bit 2: on the offset
  word, the layer has sparse entries (``CTRL_SPARSE``; reserved without
  residuals), other bits reserved, send 0), then the ``addr`` field, whole bytes of table
  address (the code), then the ``data`` field, whole bytes of data (``load_fields(config)``
  places both): the HIF code (table word) or the layer offset,
  signed 8 bits in the low byte (offset word). One packet per layer: its table
  words in any order, then its one offset word with TLAST; the page is then complete.
* ``load_error`` (out): sticky, set by a load word taken with TLAST on a table
  word or an offset word taken without TLAST (a packet cut short, or one that
  runs on into the next layer's: the layer would decode with a page the host
  did not mean, with no other sign); cleared by reset only. The shell still
  frames packets by TLAST; after ``load_error`` it is out of step with the host,
  which resets it and starts again from a layer's load packet.
* ``s_axis_sparse`` (in; only with residuals, ``config.residuals`` > 0): a
  layer's sparse entries, one per beat, ``SPARSE_BITS`` = 48 bits: bytes 0-3
  the flat index within the layer (``row * cols + col``, little-endian u32),
  bytes 4-5 its BF16 residual; strictly increasing indices, TLAST on the
  layer's last entry. One packet per layer loaded with ``CTRL_SPARSE``, none
  for the others.
* ``m_axis`` (out): values. TDATA holds ``lanes`` lane words, lane ``i`` at
  bytes ``[i * lane_bytes, (i + 1) * lane_bytes)``, each the decoder's lane
  word (BF16, or the exact product ``{sig, exp, sign}``) zero-extended to
  ``lane_bytes = ceil(w / 8)`` bytes. TLAST on the last output beat of the
  input beat that had TLAST: one output packet per layer.
* ``sparse_error`` (out; only with residuals): the decoder's sticky error bits,
  LSB first ``order``, ``past_layer``, ``no_layer``, ``not_finite``
  (hdl.sparse_merge.ERRORS), cleared by reset; a plain status port, no handshake.

Sequencing in hardware (no timing rule left to the host). The shell keeps one
bit, ``loaded``: set by the load packet's TLAST, cleared when the layer's
first (swap) block beat is accepted. ``s_axis_load_tready = ~loaded``: the
next layer's load waits until the current layer's first beat is in (the
decoder's rule: never write a page that beats in flight read); a layer's first
beat waits (``s_axis_tready`` low) until its load packet is complete, and is
accepted at the earliest in the cycle after its TLAST word, as the decoder's
table-write timing needs. Every layer needs exactly one load packet; the
loads of layer ``L + 1`` may stream while layer ``L``'s blocks do.

Sparse packets (with residuals). The offset word's ``CTRL_SPARSE`` bit is the
decoder's ``layer_sparse`` (written with the offset); the shell keeps it
(``sparse_next``) for the layer's first beat. A second bit, ``sparse_open``, is
set to it when a layer's first (swap) beat is accepted and cleared by the
handshake of a sparse beat with TLAST: ``s_axis_sparse_tready = sparse_open &
the decoder's sparse.ready``, so a layer's entries are taken from the cycle
after its first beat on, as the decoder requires, and the ``k``-th sparse
packet belongs to the ``k``-th layer loaded with ``CTRL_SPARSE``. The host may
send every packet at once; entries wait for their layer. A layer loaded with
``CTRL_SPARSE`` must get a packet (the decoder holds its chunks until it knows
the entries), a layer without it must get none (its packet would wait for the
next flagged layer).

Handshake (AMBA AXI4-Stream): a beat transfers at a rising edge of ``aclk``
where TVALID and TREADY are high. ``m_axis_tvalid``, ``m_axis_tdata`` and
``m_axis_tlast`` come from registers and the TLAST FIFO only, never from
``m_axis_tready``, and hold while TVALID is high and TREADY low (the decoder's
output buffer, hdl.output_buffer). ``s_axis_tready``,
``s_axis_load_tready`` and ``s_axis_sparse_tready`` come from registers only.

TLAST through the pipeline. Every input beat gives ``beats_per_block`` output
beats, in order; a FIFO of ``tlast_depth`` bits takes each accepted input
beat's TLAST and gives it back on the last of its output beats. When the FIFO
is full, ``s_axis_tready`` is low (never reached with the depth chosen: the
pipeline holds fewer beats; tests/test_axis.py checks full throughput).

Latency: ``latency`` = the decoder's, handshake to handshake: a block beat
accepted at rising edge ``t`` has its first output beat's handshake at
``t + latency`` when ``m_axis_tready`` is high. With both sides ready, ``N``
values leave every cycle, across layers (with sparse entries, less: the
decoder's hold rule, docs/hardware.md "Sparse residuals"). Reset (``aresetn`` low, synchronous)
clears the decoder (hdl/decoder.py), ``loaded``, ``load_error``, the FIFO and the first-beat
flag (and ``sparse_open``, ``sparse_next``): the next block beat is a layer's
first beat and waits for a load packet. Without residuals nothing of the
sparse port is built: the Verilog is the same, byte for byte.

``model`` is the beat-level model (golden/ only, through hdl.reference and,
for entries, hdl.residual.expected_words): output beats ``(tdata, tlast)`` of a
sequence of layers; ``block_beats``, ``load_beats`` and ``sparse_beats`` are
the input beats a host sends for one layer.
"""

from __future__ import annotations

from amaranth.hdl import ClockDomain, Module, Shape, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from . import reference
from .config import DecoderConfig
from .decoder import Decoder

CTRL_BANK, CTRL_OFFSET, CTRL_SPARSE = 1, 2, 4      # bits of a load word's ctrl byte
SPARSE_INDEX_BYTES, SPARSE_VALUE_BYTES = 4, 2        # an s_axis_sparse beat: index, then BF16 value
SPARSE_BITS = 8 * (SPARSE_INDEX_BYTES + SPARSE_VALUE_BYTES)


def _bytes(bits: int) -> int:
    return -(-bits // 8)


class AxiStreamSignature(wiring.Signature):
    """An AMBA AXI4-Stream master: ``tdata`` (a whole number of bytes), ``tvalid``, ``tready``
    (in), and ``tlast`` where ``last``."""

    def __init__(self, data_bits: int, *, last: bool = True):
        if data_bits <= 0 or data_bits % 8:
            raise ValueError(f"TDATA must be a whole number of bytes, got {data_bits} bits")
        self.data_bits, self.last = data_bits, last
        members = {"tdata": Out(data_bits), "tvalid": Out(1), "tready": In(1)}
        if last:
            members["tlast"] = Out(1)
        super().__init__(members)

    def __eq__(self, other):
        return isinstance(other, AxiStreamSignature) and (self.data_bits, self.last) == (other.data_bits, other.last)

    def __repr__(self):
        return f"AxiStreamSignature({self.data_bits}, last={self.last})"


# -- widths ---------------------------------------------------------------------------------------
def lane_bytes(cfg: DecoderConfig) -> int:
    """Bytes of one lane on ``m_axis``: the lane word zero-extended to whole bytes."""
    return _bytes(reference.lane_word_bits(cfg))


def load_fields(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """The fields of a load word, ``name: (lsb, bits)``, LSB first, each whole bytes."""
    addr, dat = 8 * _bytes(cfg.layout.code_bits), 8 * _bytes(max(cfg.hif.bits, 8))
    return {"ctrl": (0, 8), "addr": (8, addr), "data": (8 + addr, dat)}


def load_bits(cfg: DecoderConfig) -> int:
    lsb, bits = load_fields(cfg)["data"]
    return lsb + bits


def widths(cfg: DecoderConfig) -> dict[str, int]:
    """TDATA bits of each stream (``s_axis_sparse`` only with residuals)."""
    assert cfg.beat_bits % 8 == 0, "golden blocks are whole bytes"
    out = {"s_axis": cfg.beat_bits, "s_axis_load": load_bits(cfg), "m_axis": cfg.lanes * 8 * lane_bytes(cfg)}
    if cfg.residuals:
        out["s_axis_sparse"] = SPARSE_BITS
    return out


# -- the beat-level model (golden/ only) ----------------------------------------------------------
def block_beats(cfg: DecoderConfig, headers, codes) -> list[tuple[int, int]]:
    """``s_axis`` beats ``(tdata, tlast)`` of one layer's blocks (whole beats: stimulus.pad_to_beats)."""
    beats = reference.input_beats(cfg, headers, codes)
    return [(b, int(i == len(beats) - 1)) for i, b in enumerate(beats)]


def load_word(cfg: DecoderConfig, *, bank: int = 0, addr: int = 0, data: int = 0, offset: bool = False,
              sparse: bool = False) -> int:
    if sparse and not (offset and cfg.residuals):
        raise ValueError("the sparse flag goes on the offset word of a configuration with residuals")
    f = load_fields(cfg)
    return (bank * CTRL_BANK | offset * CTRL_OFFSET | sparse * CTRL_SPARSE) | (addr << f["addr"][0]) \
        | (data << f["data"][0])


def load_beats(cfg: DecoderConfig, luts, offset: int, sparse: bool = False) -> list[tuple[int, int]]:
    """``s_axis_load`` beats ``(tdata, tlast)`` of one layer: every table word (bank, then
    address), then the offset word with TLAST (and ``CTRL_SPARSE`` when the layer has entries)."""
    words = [load_word(cfg, bank=b, addr=a, data=int(luts[b][a]))
             for b in range(len(luts)) for a in range(len(luts[b]))]
    words.append(load_word(cfg, data=int(offset) & 0xFF, offset=True, sparse=sparse))
    return [(w, int(i == len(words) - 1)) for i, w in enumerate(words)]


def sparse_beats(index, values) -> list[tuple[int, int]]:
    """``s_axis_sparse`` beats ``(tdata, tlast)`` of one layer's entries: the flat index in bytes
    0-3, the BF16 value in bytes 4-5, TLAST on the last (no beats for a layer without entries)."""
    n = len(index)
    return [((int(i) & 0xFFFF_FFFF) | (int(v) & 0xFFFF) << (8 * SPARSE_INDEX_BYTES), int(k == n - 1))
            for k, (i, v) in enumerate(zip(index, values))]


def tlast_words(beats, data_bits: int) -> list[int]:
    """Each beat ``(tdata, tlast)`` as one ``{tlast, tdata}`` word (TLAST in bit ``data_bits``): a
    testbench memory's line (``$readmemh``)."""
    return [int(last) << data_bits | int(d) for d, last in beats]


def pack_lanes(cfg: DecoderConfig, words) -> int:
    """``m_axis`` TDATA of one output beat: lane words, each zero-extended to ``lane_bytes``."""
    lb = 8 * lane_bytes(cfg)
    return sum(int(v) << (i * lb) for i, v in enumerate(words))


def model(cfg: DecoderConfig, layers) -> list[tuple[int, int]]:
    """``m_axis`` beats ``(tdata, tlast)`` owed for ``layers``, each ``(luts, offset, headers,
    codes)``, or ``(luts, offset, headers, codes, index, values)`` with sparse entries, loaded
    and streamed in turn: golden's values (hdl.reference; with entries
    hdl.residual.expected_words, golden.decoder's residual sum), TLAST on each layer's last beat."""
    out = []
    for luts, offset, headers, codes, *entries in layers:
        if entries and len(entries[0]):
            from .residual import expected_words

            words = expected_words(cfg, luts, offset, headers, codes, *entries)
            beats = [words[i:i + cfg.lanes] for i in range(0, len(words), cfg.lanes)]
        else:
            beats = reference.expected_beats(cfg, luts, offset, headers, codes)
        out += [(pack_lanes(cfg, b), int(i == len(beats) - 1)) for i, b in enumerate(beats)]
    return out


def to_bytes(beats, data_bits: int) -> bytes:
    """The bytes of a packet of beats (each ``(tdata, tlast)``), beat 0 first, byte 0 of each
    beat its TDATA[7:0]: what an AXI4-Stream BFM sends or receives."""
    return b"".join(int(d).to_bytes(data_bits // 8, "little") for d, _ in beats)


# -- the shell ------------------------------------------------------------------------------------
class AxisDecoder(wiring.Component):
    """The decoder behind AXI4-Stream interfaces, in the ``sync`` domain (see the module docstring)."""

    model = staticmethod(model)

    def __init__(self, config: DecoderConfig, *, decoder=None, tlast_depth: int | None = None):
        if config.shallow:               # (its values.ready reaches blocks.ready: TREADY to TREADY)
            self._MustUse__silence = True    # refused: never elaborated, no unused-component warning
            raise ValueError(f"decoder config {config.name!r}: the AXI4-Stream shell is built on the deep "
                             f"pipeline, whose TREADYs come from registers; the shallow one has no shell")
        self.config = config
        self.decoder = decoder if decoder is not None else Decoder(config)
        # input beats in flight: stage 0, the pipeline's stages, the skid; 4 to spare
        self.tlast_depth = tlast_depth or self.decoder.latency + 4
        w = widths(config)
        members = {
            "s_axis": In(AxiStreamSignature(w["s_axis"])),
            "s_axis_load": In(AxiStreamSignature(w["s_axis_load"])),
            "m_axis": Out(AxiStreamSignature(w["m_axis"])),
            "load_error": Out(1),
        }
        if config.residuals:
            members.update({"s_axis_sparse": In(AxiStreamSignature(w["s_axis_sparse"])),
                            "sparse_error": Out(Shape.cast(self.decoder.signature.members["sparse_error"].shape).width)})
        super().__init__(members)

    @property
    def latency(self) -> int:
        """Cycles from a block beat's handshake to its first output beat's: the decoder's."""
        return self.decoder.latency

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        m.submodules.decoder = dec = self.decoder
        m.submodules.tlast = tl = fifo.SyncFIFO(width=1, depth=self.tlast_depth)
        s, ld, o = self.s_axis, self.s_axis_load, self.m_axis

        # -- loads: ctrl, addr, data fields into the decoder's table write or offset write
        first = Signal(init=1)              # the next block beat is a layer's first (swap)
        loaded = Signal()                   # a page is loaded and waits for its layer's first beat
        f = load_fields(cfg)
        ctrl = ld.tdata[0:8]
        addr = ld.tdata[f["addr"][0]:f["addr"][0] + cfg.layout.code_bits]
        word = ld.tdata[f["data"][0]:f["data"][0] + cfg.hif.bits]
        load_take = ld.tvalid & ld.tready
        m.d.comb += [ld.tready.eq(~loaded),
                     dec.load.valid.eq(load_take & ~ctrl[1]),
                     dec.load.payload.bank.eq(ctrl[0]), dec.load.payload.addr.eq(addr),
                     dec.load.payload.data.eq(word),
                     dec.offset.eq(ld.tdata[f["data"][0]:f["data"][0] + 8]),
                     dec.offset_we.eq(load_take & ctrl[1])]

        # -- blocks: a layer's first beat waits for its page; TLAST into the FIFO
        gate = tl.w_rdy & (loaded | ~first)
        m.d.comb += [dec.blocks.payload.blocks.eq(s.tdata), dec.blocks.payload.swap.eq(first),
                     dec.blocks.valid.eq(s.tvalid & gate), s.tready.eq(dec.blocks.ready & gate),
                     tl.w_data.eq(s.tlast), tl.w_en.eq(s.tvalid & s.tready)]
        with m.If(s.tvalid & s.tready):
            m.d.sync += first.eq(s.tlast)
            with m.If(first):
                m.d.sync += loaded.eq(0)
        with m.If(load_take & ld.tlast):
            m.d.sync += loaded.eq(1)
        # a packet ends with its offset word and only there: TLAST anywhere else, or an offset
        # word without it, is a framing error the host must see (the page would be another's)
        with m.If(load_take & (ld.tlast != ctrl[1])):
            m.d.sync += self.load_error.eq(1)
        if cfg.residuals:
            self._sparse(m, dec, load_take & ctrl[1], ctrl[2], s.tvalid & s.tready & first)

        # -- values: lanes zero-extended to whole bytes; TLAST on the input beat's last output beat
        n, w, lb = cfg.lanes, reference.lane_word_bits(cfg), 8 * lane_bytes(cfg)
        for i in range(n):
            m.d.comb += o.tdata[i * lb:i * lb + w].eq(dec.values.payload.as_value()[i * w:(i + 1) * w])
        B = cfg.beats_per_block
        end = Signal()                      # this output beat is its input beat's last
        if B > 1:
            beat = Signal(range(B))
            m.d.comb += end.eq(beat == B - 1)
            with m.If(o.tvalid & o.tready):
                m.d.sync += beat.eq(beat + 1)
                with m.If(end):
                    m.d.sync += beat.eq(0)
        else:
            m.d.comb += end.eq(1)
        m.d.comb += [o.tvalid.eq(dec.values.valid), dec.values.ready.eq(o.tready),
                     o.tlast.eq(tl.r_data & end), tl.r_en.eq(o.tvalid & o.tready & end)]
        return m

    def _sparse(self, m: Module, dec, offset_take, flag, swap_take) -> None:
        """``s_axis_sparse`` into the decoder's ``sparse`` stream, ``layer_sparse`` from the offset
        word's ``CTRL_SPARSE`` bit, ``sparse_error`` out (see the module docstring)."""
        sp = self.s_axis_sparse
        sparse_next = Signal()              # the loaded layer has a sparse packet
        sparse_open = Signal()              # the current layer's packet is being taken
        i0 = 8 * SPARSE_INDEX_BYTES
        m.d.comb += [dec.layer_sparse.eq(flag),
                     dec.sparse.payload.index.eq(sp.tdata[:i0]),
                     dec.sparse.payload.value.eq(sp.tdata[i0:i0 + 16]),
                     dec.sparse.payload.last.eq(sp.tlast),
                     dec.sparse.valid.eq(sp.tvalid & sparse_open),
                     sp.tready.eq(dec.sparse.ready & sparse_open),
                     self.sparse_error.eq(dec.sparse_error)]
        with m.If(offset_take):
            m.d.sync += sparse_next.eq(flag)
        with m.If(swap_take):
            m.d.sync += sparse_open.eq(sparse_next)
        with m.Elif(sp.tvalid & sp.tready & sp.tlast):
            m.d.sync += sparse_open.eq(0)


def axi_ports(component: wiring.Component) -> dict:
    """``verilog.convert``'s ``ports`` for ``component``: each port under its AXI name (the member's
    path joined with ``_``: ``s_axis_tdata``, not Amaranth's ``s_axis__tdata``); the direction is
    the one the design gives it."""
    return {"_".join(map(str, path)): (value, None) for path, _, value in component.signature.flatten(component)}


class AxisTop(wiring.Component):
    """``AxisDecoder`` with AXI's ``aclk`` and ``aresetn`` (active low, synchronous) as ports: the
    top of ``NAME_axis.v``. ``ports()`` names its Verilog ports as AMBA does (``s_axis_tdata``)."""

    model = staticmethod(model)

    def __init__(self, config: DecoderConfig, *, core: AxisDecoder | None = None, **kwargs):
        # core: the shell used (tests put a broken one in); kwargs: AxisDecoder's
        self.config = config
        self.core = core if core is not None else AxisDecoder(config, **kwargs)
        super().__init__({"aclk": In(1), "aresetn": In(1), **dict(self.core.signature.members)})

    @property
    def latency(self) -> int:
        return self.core.latency

    def ports(self) -> dict:
        return axi_ports(self)

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd = ClockDomain("sync", local=True)
        m.d.comb += [cd.clk.eq(self.aclk), cd.rst.eq(~self.aresetn)]
        m.submodules.core = core = self.core
        for name in ("s_axis", "s_axis_load") + (("s_axis_sparse",) if self.config.residuals else ()):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(core, name))
        wiring.connect(m, core.m_axis, wiring.flipped(self.m_axis))
        m.d.comb += self.load_error.eq(core.load_error)
        if self.config.residuals:
            m.d.comb += self.sparse_error.eq(core.sparse_error)
        return m
