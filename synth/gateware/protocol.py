"""The board protocol engine: framed bytes in, commands to ``hdl.decoder.Decoder``, replies out.

Role: the gateware end of docs/board-protocol.md, between a byte stream (a
UART, synth/gateware/board.py) and one decoder instance, which it contains
(``engine.decoder``), and the GEMV engine if the board has one (``engine.gemv``).
The numbers of the protocol come from synth/wire.py (never from the host
client, synth/host/).

Without a decoder (``config`` None, a GEMV-only core such as the iCEBreaker's
``icebreaker-gemv``: the GEMV engine is then required) none of the decoder's
hardware is built (no decoder, no values CRC, no sparse queue) and its commands
(LOAD, OFFSET, BLOCKS, CHECKSUM, SPARSE, SPARSE_STATUS) answer UNKNOWN_CMD, as
the commands of any part a core lacks do; STATUS then reports 0 lanes (no
decoder), 0 beat and lane bytes, and the GEMV engine's point (code bits, block
size, HIF bits, banks, format id): ``status_bytes``. The format id
(golden.layout.format_id of the layout and HIF the core was built for) is an
elaboration-time constant, as every other field but the error count.

Interfaces (``sync`` domain): ``rx`` (stream of bytes in), ``tx`` (stream of
bytes out). Nothing else: the decoder's ``values`` are consumed here, folded
into a running CRC-32 and a count that the CHECKSUM command reports.

Contract.
* A frame is ``0x55 | cmd | len u16 LE | payload | crc32 LE``; the payload goes
  to a ``max_payload``-byte buffer (a ``lib.memory.Memory``) and nothing is
  executed before the frame's CRC is checked. Every frame gets exactly one
  reply; every error gets an error reply ``0x55 | 0xFF | 2 | {code, cmd}``:
  a wrong CRC (BAD_CRC), an unknown command (UNKNOWN_CMD), a payload length
  over ``max_payload`` (OVERSIZE, sent right after the header), a length the
  command cannot take (BAD_LENGTH), a gap of ``gap_cycles`` cycles without a
  byte inside a frame (TIMEOUT: the half frame is dropped), bytes outside a
  frame (GARBAGE, once per run of them). After any error the parser hunts for
  the next start byte; it never waits for anything but bytes and its own reply.
* Replies are written to ``tx`` one byte per cycle while ``tx.ready``; ``rx``
  is not read while a reply is being written or a command executes, so a
  UART in front needs a FIFO when the host does not wait for replies.
* BLOCKS: each beat goes to ``decoder.blocks`` (swap on the first beat when the
  frame's flag says so); the reply is sent once all its beats are accepted.
  CHECKSUM waits until every output beat of the accepted beats is folded in.
* Decoded values are folded as each lane word's ``ceil(bits / 8)`` bytes, LSB
  first, lanes in order, one byte per cycle (``values.ready`` only on a beat's
  last byte); the CRC is zlib's CRC-32, the count is in lane words.
* With the residual path (``config.residuals`` = R > 0; else none of this is
  built: OFFSET takes no flags byte and SPARSE, SPARSE_STATUS are unknown commands): OFFSET takes an optional flags
  byte, the page's ``layer_sparse``; SPARSE writes its entries (flat index,
  BF16 value, ``last`` on the frame's last one if flagged) into a queue of
  ``sparse_queue`` entries, which feeds ``decoder.sparse`` at the decoder's
  pace, and is answered once they are all queued; SPARSE_STATUS reports R, the
  decoder's sticky ``sparse_error`` bits and the queue depth. A wait on the
  decoder (a beat, a queue slot, the pipeline for CHECKSUM) with no progress
  for ``stall_cycles`` cycles ends the command with a STALLED error reply
  (a sparse layer whose entries do not come would otherwise hang the engine).

Two FSMs, every state written out (docs/board-protocol.md, "Engine states"):

* ``parser``: ``HUNT`` (outside a frame: wait for 0x55, report garbage once),
  ``CMD``, ``LEN0``, ``LEN1``, ``PAYLOAD`` (into the buffer), ``CRC`` (the four
  CRC bytes through the CRC register), ``EXEC`` (check the length, dispatch);
  then per command, reading the buffer a byte at a time (a ``*_FETCH`` state
  presents the address, the ``*_USE`` state after it sees the byte):
  ``LOAD_FETCH``/``LOAD_USE``/``LOAD_ISSUE`` (one table word per entry),
  ``OFFSET_FETCH``/``OFFSET_USE``, ``FLAGS_FETCH``/``FLAGS_USE`` then
  ``BEAT_FETCH``/``BEAT_USE``/``BEAT_ISSUE`` (BLOCKS: one decoder beat per
  ``beat bytes``), ``CHECKSUM_FETCH``/``CHECKSUM_USE``/``CHECKSUM_WAIT``
  (until the pipeline is empty); with the residual path also
  ``OFFSET_FLAGS_FETCH``/``OFFSET_FLAGS_USE`` (OFFSET's flags byte) and
  ``ENTRY_ISSUE`` (SPARSE, read through ``FLAGS_*`` and ``BEAT_*`` as BLOCKS
  is: one queue entry per 6 bytes). Every command ends in ``HUNT`` with its reply
  requested. The receiving states (``CMD`` to ``CRC``) drop the half frame on
  a byte gap (TIMEOUT).
  With the GEMV engine (``gemv``, a ``GemvConfig``: the ULX3S core; else none
  of it is built), the GEMV_* commands: GEMV_LOAD through the ``LOAD_*``
  states into the engine's tables; ``G_FLAGS_FETCH``/``G_FLAGS_USE`` (GEMV_X's
  flags), ``G_FETCH``/``G_USE``/``G_ISSUE`` (one item: GEMV_LAYER's fields, an x
  beat of ``g`` codes, a block, a sparse entry, GEMV_Y's count) and
  ``G_STATUS_FETCH``/``G_STATUS_USE``.
* ``reply``: ``IDLE``, then ``START``, ``CMD``, ``LEN0``, ``LEN1``,
  ``PAYLOAD``, ``CRC``: one byte each per ``tx`` transfer, the CRC folded in
  from ``CMD`` to the end of the payload (GEMV_Y's payload: words of the
  engine's y FIFO, LSB first, popped as they leave).

The GEMV engine (synth/gateware/gemv_port.py: hdl.gemv.GemvEngine, its y FIFO,
counters and status) is ``engine.gemv``: GEMV_LAYER writes its inactive page's
layer registers (with the optional flags byte: ``sparse``), GEMV_X its x beats
(swap on the frame's first if flagged, ``last`` on the frame's last if flagged),
GEMV_W its blocks, GEMV_SPARSE its entries into the port's entry queue, each
waiting on the engine (STALLED after ``stall_cycles`` without progress: the
engine takes a tile's entries only after the tile's blocks, and the tile's next
blocks only after its entries); GEMV_Y answers with the
words in the FIFO, at most its count and ``Y_MAX_WORDS`` (none: an empty OK
reply while words are owed, NO_Y when none is); GEMV_STATUS with the engine's
bits, FIFO level and counters, then clears the sticky bits and counters if
flagged.

Code: ``ProtocolEngine.elaborate`` wires the parts, each built by its own
class or method: the payload buffer; ``_ReplyWriter``, the ``reply`` FSM and
the requests the parser makes of it (``send``, ``send_y_words``, ``error``);
``fold_values``, CHECKSUM's CRC of the decoder's values; ``stall_counter``;
``sparse_queue_into_decoder``; and ``_Parser``, the ``parser`` FSM, whose
``_fsm`` is the state table, each state's work in the method named after it
(``_load_use`` for ``LOAD_USE``), EXEC's dispatch in ``_exec``.
"""


import struct
from contextlib import contextmanager

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from sop.golden.layout import format_id
from sop.hdl.config import DecoderConfig
from sop.hdl.decoder import Decoder
from sop.hdl.gemv_config import GemvConfig
from sop.hdl.reference import lane_word_bits
from sop.synth.wire import (CLEAR_FLAG, CRC_INIT, CRC_RESIDUE, DEFAULT_MAX_PAYLOAD, DEFAULT_SPARSE_QUEUE,
                            ENTRY_LAST, ERROR_REPLY, GEMV_ENTRY_FORMAT, GEMV_LAYER_FORMAT, LAST_FLAG,
                            LOAD_ENTRY_BYTES, PROTOCOL_VERSION,
                            REPLY_BIT, REPLY_MAX, REPLY_MAX_GEMV, SPARSE_ENTRY_BYTES, SPARSE_LAYER_FLAG, START,
                            SWAP_FLAG, X_LAST, X_SWAP, Y_MAX_WORDS, Y_WORD_BYTES, Cmd, Err, crc32_update_byte,
                            lane_bytes)

from .gemv_port import GemvPort


def _crc_taps() -> list[tuple[list[int], list[int]]]:
    """Per output bit, the register bits and data bits it XORs (the byte update is linear over GF(2))."""
    taps = []
    for i in range(32):
        regs = [j for j in range(32) if crc32_update_byte(1 << j, 0) >> i & 1]
        data = [k for k in range(8) if crc32_update_byte(0, 1 << k) >> i & 1]
        taps.append((regs, data))
    return taps


CRC_TAPS = _crc_taps()


def crc32_update(crc: Value, byte: Value) -> Value:
    """The raw reflected CRC-32 register after one byte: one XOR per output bit (host.crc32_update_byte)."""
    byte = Cat(byte, Const(0, 8))[:8]                  # narrower values (a length) zero-extended
    return Cat(*(Cat(*[crc[j] for j in regs], *[byte[k] for k in data]).xor() for regs, data in CRC_TAPS))


def status_bytes(config: DecoderConfig | GemvConfig, max_payload: int) -> list[int]:
    """The constant part of the STATUS reply (wire.Status without ``errors``, which follows it) of a
    decoder; of a GEMV-only core (``config`` its engine's ``GemvConfig``) the engine's point with lanes,
    beat bytes and lane bytes 0: no decoder (docs/board-protocol.md, STATUS)."""
    lay = config.layout
    if isinstance(config, GemvConfig):
        decoder = [0, lay.code_bits, lay.group, 0, 0]
    else:
        decoder = [config.lanes, lay.code_bits, lay.group, config.blocks_per_beat * lay.block_bytes,
                   lane_bytes(lane_word_bits(config))]
    return [PROTOCOL_VERSION, *decoder, config.hif.bits, lay.banks,
            *struct.pack("<HI", max_payload, format_id(lay, config.hif))]


class ProtocolEngine(wiring.Component):
    """The engine (module docstring). ``elaborate`` wires its parts: the payload buffer, the reply
    writer (``_ReplyWriter``), the decoder's values CRC (``fold_values``), the stall counter, the sparse
    queue and the frame parser and executor (``_Parser``). Tests subclass it to break ``status_bytes``
    or ``sparse_word``."""

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))

    def __init__(self, config: DecoderConfig | None, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 gap_cycles: int = 1 << 16, decoder=None, sparse_queue: int = DEFAULT_SPARSE_QUEUE,
                 stall_cycles: int | None = None, gemv: GemvConfig | None = None, gemv_y_depth: int | None = None,
                 gemv_port=None):
        self._MustUse__silence = True            # until accepted: a refused one is never elaborated, no
        if not 16 <= max_payload <= 0xFFFF:      # unused-component warning
            raise ValueError(f"max_payload must be in 16..65535, got {max_payload}")
        if config is None and (gemv is None and gemv_port is None or decoder is not None):
            raise ValueError("a protocol engine without a decoder (config None) needs the GEMV engine "
                             "(gemv or gemv_port) and takes no decoder")
        residuals = config.residuals if config is not None else 0
        if residuals and not 2 <= sparse_queue <= 0xFFFF:
            raise ValueError(f"sparse_queue must be in 2..65535 entries, got {sparse_queue}")
        self.config = config
        self.max_payload, self.gap_cycles = max_payload, gap_cycles
        self.residuals = residuals                  # R, the decoder's residual adders (0: no residual path)
        self.sparse_queue = sparse_queue if residuals else 0
        self.stall_cycles = gap_cycles if stall_cycles is None else stall_cycles
        # the decoder (LOAD, OFFSET, BLOCKS, CHECKSUM, SPARSE*; none, config None: those commands are
        # UNKNOWN_CMD and nothing of it is built: no decoder, values CRC, sparse queue)
        if config is not None:
            self.beat_bytes = config.blocks_per_beat * config.layout.block_bytes
            if 1 + self.beat_bytes > max_payload:
                raise ValueError(f"max_payload {max_payload} cannot hold one beat of {self.beat_bytes} bytes")
            self.lane_bits = lane_word_bits(config)
            self.lane_bytes = lane_bytes(self.lane_bits)
            self.decoder = decoder if decoder is not None else Decoder(config)
        else:
            self.beat_bytes = self.lane_bits = self.lane_bytes = 0
            self.decoder = None
        # the GEMV engine (GEMV_* commands; none: they are UNKNOWN_CMD and nothing of it is built)
        self.gemv = (gemv_port if gemv_port is not None else GemvPort(gemv, y_depth=gemv_y_depth)
                     if gemv is not None else None)
        if self.gemv is not None:
            gcfg = self.gemv.config
            if max_payload < 1 + max(gcfg.group, gcfg.layout.block_bytes):
                raise ValueError(f"max_payload {max_payload} cannot hold one x beat or block of the engine")
        self.y_max = min(Y_MAX_WORDS, max_payload // Y_WORD_BYTES)     # y words a GEMV_Y reply carries
        self._MustUse__silence = False
        super().__init__()

    def status_bytes(self) -> list[int]:
        return status_bytes(self.config if self.config is not None else self.gemv.config, self.max_payload)

    def sparse_word(self, entry: Value, last: Value) -> Value:
        """A queue word, ``decoder.sparse``'s payload ``{index, value, last}`` (tests break this)."""
        return Cat(entry, last)

    def fold_values(self, m: Module):
        """The decoder's values folded into a running CRC-32 and a count of lane words (CHECKSUM),
        each lane word's bytes LSB first, one byte a cycle. Returns ``(v_crc, v_count, clear,
        pending)``: ``clear`` (comb) restarts the CRC and count, ``pending`` counts the output beats
        the decoder still owes for the beats it accepted."""
        cfg, dec = self.config, self.decoder
        N = cfg.lanes
        v_crc = Signal(32, init=CRC_INIT)
        v_count = Signal(32)
        nbytes = N * self.lane_bytes
        words = [dec.values.payload.as_value()[i * self.lane_bits:(i + 1) * self.lane_bits] for i in range(N)]
        v_bytes = Array(Cat(w, Const(0, 8 * self.lane_bytes - self.lane_bits))[8 * j:8 * j + 8]
                        for w in words for j in range(self.lane_bytes))
        v_idx = Signal(range(nbytes))
        clear = Signal()
        with m.If(clear):
            m.d.sync += [v_crc.eq(CRC_INIT), v_count.eq(0)]
        with m.Elif(dec.values.valid):
            m.d.sync += [v_crc.eq(crc32_update(v_crc, v_bytes[v_idx])), v_idx.eq(v_idx + 1)]
            with m.If(v_idx == nbytes - 1):
                m.d.comb += dec.values.ready.eq(1)
                m.d.sync += [v_idx.eq(0), v_count.eq(v_count + N)]

        # output beats still owed by the decoder for the beats it accepted
        pending = Signal(16)
        took = dec.blocks.valid & dec.blocks.ready
        gave = dec.values.valid & dec.values.ready
        m.d.sync += pending.eq(pending + Mux(took, cfg.beats_per_block, 0) - gave)
        return v_crc, v_count, clear, pending

    def stall_counter(self, m: Module) -> Signal | None:
        """``stall``: the cycles a wait on the decoder or the GEMV engine has gone without progress
        (``_Parser._stalled`` counts it up; 0 in every other cycle). None where no wait can stall: no
        residual path and no GEMV engine."""
        if not self.residuals and self.gemv is None:
            return None
        stall = Signal(range(self.stall_cycles + 1))
        m.d.sync += stall.eq(0)
        return stall

    def sparse_queue_into_decoder(self, m: Module) -> SyncFIFOBuffered | None:
        """The queue of SPARSE entries (``sparse_queue`` deep; the parser writes it): it feeds
        ``decoder.sparse`` at the decoder's pace, so a SPARSE frame is answered once its entries are
        queued, not once the decoder took them. None without the residual path."""
        if not self.residuals:
            return None
        dec = self.decoder
        m.submodules.sparse_queue = queue = SyncFIFOBuffered(width=len(dec.sparse.payload.as_value()),
                                                             depth=self.sparse_queue)
        m.d.comb += [dec.sparse.valid.eq(queue.r_stream.valid), dec.sparse.payload.eq(queue.r_stream.payload),
                     queue.r_stream.ready.eq(dec.sparse.ready)]
        return queue

    def elaborate(self, platform):
        m = Module()
        if self.decoder is not None:
            m.submodules.decoder = self.decoder
        if self.gemv is not None:
            m.submodules.gemv = self.gemv
        # the frame's payload, written as it arrives and read back a byte at a time by the commands
        m.submodules.buffer = mem = Memory(shape=8, depth=self.max_payload, init=[])
        wp = mem.write_port()                  # (the ports' signals are named after these variables)
        rp = mem.read_port()
        reply = _ReplyWriter(m, self.tx, self.gemv, self.y_max)
        reply.build()
        values = self.fold_values(m) if self.decoder is not None else None
        stall = self.stall_counter(m)
        queue = self.sparse_queue_into_decoder(m)
        _Parser(self, m, reply=reply, wp=wp, rp=rp, values=values, stall=stall, queue=queue).build()
        return m


class _ReplyWriter:
    """The ``reply`` FSM: one reply frame at a time onto ``tx``, a byte each transfer.

    The parser requests a reply with ``send`` (its payload held in the ``reply<i>`` registers),
    ``send_y_words`` (GEMV_Y: the payload streamed from the engine's y FIFO) or ``error`` (which also
    counts it in ``errors``, for STATUS). ``busy`` is high from a request until the reply's last byte
    has left: the parser reads no byte meanwhile, so requests and replies alternate.
    """

    def __init__(self, m: Module, tx, gemv: GemvPort | None, y_max: int):
        self.m, self.tx, self.gemv = m, tx, gemv
        # (the attribute names are the signals' names in the netlist)
        self.r_go = Signal()
        self.r_cmd = Signal(8)
        # (with the engine: GEMV_STATUS's longer payload, and GEMV_Y's words streamed from its FIFO)
        held = REPLY_MAX_GEMV if gemv is not None else REPLY_MAX
        longest = max(held, Y_WORD_BYTES * y_max) if gemv is not None else held
        self.r_len = Signal(range(longest + 1))
        self.r_bytes = [Signal(8, name=f"reply{i}") for i in range(held)]
        self.r_idx = Signal(range(longest + 1))
        self.r_stream = Signal()      # the payload is GEMV_Y's words, from the engine's y FIFO
        self.r_crc = Signal(32)
        self.errors = Signal(16)      # error replies so far (STATUS)
        self.sending = Signal()
        self.busy = Signal()          # a reply is requested or being written

    # -- requests (from the parser's states) ----------------------------------------------------
    def send(self, cmd, payload):
        """Request the reply ``cmd`` with ``payload`` (byte values, at most the registers held)."""
        m = self.m
        m.d.sync += [self.r_cmd.eq(cmd), self.r_len.eq(len(payload)), self.r_go.eq(1)]
        m.d.sync += [self.r_bytes[i].eq(p) for i, p in enumerate(payload)]
        if self.gemv is not None:
            m.d.sync += self.r_stream.eq(0)

    def send_y_words(self, cmd, n):
        """Request an OK reply whose payload is ``n`` words of the engine's y FIFO (GEMV_Y)."""
        self.m.d.sync += [self.r_cmd.eq(cmd), self.r_len.eq(n * Y_WORD_BYTES), self.r_go.eq(1),
                          self.r_stream.eq(1)]

    def error(self, code, cmd_seen):
        """Request the error reply ``{code, cmd_seen}`` and count it."""
        self.send(ERROR_REPLY, [int(code), cmd_seen])
        self.m.d.sync += self.errors.eq(self.errors + 1)

    # -- the FSM ----------------------------------------------------------------------------------
    def _put(self, byte):
        """Offer ``byte`` on ``tx``; true when it is taken."""
        self.m.d.comb += [self.sending.eq(1), self.tx.valid.eq(1), self.tx.payload.eq(byte)]
        return self.tx.ready

    def build(self):
        m, tx, put = self.m, self.tx, self._put
        r_idx, r_crc = self.r_idx, self.r_crc
        r_crc_bytes = Array(r_crc[8 * i:8 * i + 8] ^ 0xFF for i in range(4))
        # every byte from CMD to the payload's last goes into the CRC as ``tx`` takes it: one CRC
        # update on ``tx.payload`` (the parser's ``crc_next`` likewise), not one per state
        self.r_crc_in = Signal()
        with m.If(self.r_crc_in & tx.valid & tx.ready):
            m.d.sync += r_crc.eq(crc32_update(r_crc, tx.payload))
        with m.FSM(name="reply"):
            with m.State("IDLE"):
                with m.If(self.r_go):
                    m.d.sync += [self.r_go.eq(0), r_idx.eq(0), r_crc.eq(CRC_INIT)]
                    m.next = "START"
            with m.State("START"):                     # the start byte is not in the CRC
                with m.If(put(Const(START, 8))):
                    m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += self.r_crc_in.eq(1)
                with m.If(put(self.r_cmd)):
                    m.next = "LEN0"
            with m.State("LEN0"):
                m.d.comb += self.r_crc_in.eq(1)
                with m.If(put(self.r_len)):
                    m.next = "LEN1"
            with m.State("LEN1"):                      # replies are shorter than 256 bytes but GEMV_Y's
                m.d.comb += self.r_crc_in.eq(1)
                hi = self.r_len[8:] if self.gemv is not None else Const(0, 8)
                with m.If(put(hi)):
                    m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                self._payload()
            with m.State("CRC"):
                with m.If(put(r_crc_bytes[r_idx[:2]])):
                    m.d.sync += r_idx.eq(r_idx + 1)
                    with m.If(r_idx == 3):
                        m.next = "IDLE"
        m.d.comb += self.busy.eq(self.sending | self.r_go)

    def _payload(self):
        """PAYLOAD: ``r_len`` bytes, from the registers or (GEMV_Y) the y FIFO's head word, LSB
        first, the word popped as its last byte leaves; then the CRC."""
        m, tx, G, r_idx = self.m, self.tx, self.gemv, self.r_idx
        m.d.comb += [self.sending.eq(1), self.r_crc_in.eq(1)]
        byte = Array(self.r_bytes)[r_idx]
        if G is not None:
            y_byte = Array(G.y.payload[8 * i:8 * i + 8] for i in range(Y_WORD_BYTES))[r_idx[:2]]
            byte = Mux(self.r_stream, y_byte, byte)
            with m.If(self.r_stream & tx.valid & tx.ready & (r_idx[:2] == Y_WORD_BYTES - 1)):
                m.d.comb += G.y.ready.eq(1)
        with m.If(r_idx == self.r_len):
            m.d.sync += r_idx.eq(0)
            m.next = "CRC"
        with m.Else():
            m.d.comb += [tx.valid.eq(1), tx.payload.eq(byte)]
            with m.If(tx.ready):
                m.d.sync += r_idx.eq(r_idx + 1)


class _Parser:
    """The ``parser`` FSM: receives a frame into the payload buffer, checks its CRC, then executes
    its command and requests the reply (docs/board-protocol.md, "Engine states").

    ``_fsm`` is the state table; each state's work is the method named after it (``_load_use`` is
    LOAD_USE's). The commands read the buffer back a byte at a time: a ``*_FETCH`` state presents
    ``idx`` to the read port, the ``*_USE`` state after it sees the byte (``rp.data``) and gathers it
    into ``acc``; an ``*_ISSUE`` state hands the gathered item on (a table word, a beat, an entry...).
    Every command ends in ``HUNT`` with its reply requested (``_finish``, ``_fail``).
    """

    def __init__(self, engine: ProtocolEngine, m: Module, *, reply: _ReplyWriter, wp, rp, values, stall, queue):
        self.engine, self.m, self.reply = engine, m, reply
        self.rx, self.wp, self.rp = engine.rx, wp, rp
        self.values, self.stall, self.queue = values, stall, queue   # (fold_values, stall_counter, ...)
        self.dec, self.G = engine.decoder, engine.gemv
        self.D = self.dec is not None            # the decoder's hardware and commands (else a GEMV-only core)
        self.R = engine.residuals                # its residual path
        self.bb = bb = engine.beat_bytes
        G, R = self.G, self.R
        # (the attribute names are the signals' names in the netlist)
        self.cmd = Signal(8)
        self.length = Signal(16)
        self.idx = Signal(16)              # payload bytes received / read
        self.crc = Signal(32)
        self.crc_n = Signal(range(4))
        self.quiet = Signal()              # an error was reported: no GARBAGE reply until a start byte
        self.gap = Signal(range(engine.gap_cycles + 1))
        self.layer_bytes = struct.calcsize(GEMV_LAYER_FORMAT)        # and an optional flags byte
        self.gemv_entry = struct.calcsize(GEMV_ENTRY_FORMAT)
        if G is not None:
            self.g, self.wb = G.config.group, G.config.layout.block_bytes
        entry_max = max(LOAD_ENTRY_BYTES, bb, SPARSE_ENTRY_BYTES if R else 0,
                        *((self.g, self.wb, self.layer_bytes + 1, self.gemv_entry) if G is not None else ()))
        self.acc = Signal(8 * entry_max)   # the bytes gathered, the latest in the top byte
        self.sub = Signal(range(entry_max + 1))    # bytes of the current item gathered
        self.flags = Signal(8)             # the command's flags byte
        self.first = Signal()              # the frame's first beat is not yet taken (its swap flag)
        self.byte = self.rx.payload
        self.take = self.rx.valid & self.rx.ready
        self.crc_next = crc32_update(self.crc, self.byte)
        # payload-length remainders for the commands' length checks (those but LOAD's and BLOCKS'
        # have no name in the netlist: Amaranth's ``$signal``)
        self._remainders = []
        self.mod3 = self._remainder(LOAD_ENTRY_BYTES, name="mod3")
        self.modb = self._remainder(bb, skip=1, name="modb") if self.D else None   # BLOCKS: flags, then beats
        self.mod6 = self._remainder(SPARSE_ENTRY_BYTES, skip=1) if R else None     # SPARSE: flags, then entries
        self.modx = self._remainder(self.g, skip=1) if G is not None else None     # GEMV_X: flags, then g-byte beats
        self.modw = self._remainder(self.wb) if G is not None else None            # GEMV_W: whole blocks
        self.mode = self._remainder(self.gemv_entry) if G is not None else None    # GEMV_SPARSE: whole entries

    def _remainder(self, n: int, *, skip: int = 0, name: str = "$signal") -> Signal:
        """The payload length mod ``n``, counted as the payload arrives (0: whole items), after
        ``skip`` leading bytes (a flags byte): restarted in LEN1 at ``-skip mod n``, stepped in PAYLOAD."""
        remainder = Signal(range(n), name=name)
        self._remainders.append((remainder, n, -skip % n))
        return remainder

    def build(self):
        m = self.m
        m.d.comb += [self.rp.addr.eq(self.idx), self.wp.addr.eq(self.idx), self.wp.data.eq(self.byte)]
        self._count_gap()
        self._fsm()

    def _count_gap(self):
        """``gap``: cycles since the last byte, up to ``gap_cycles``; ``timed_out``: the gap is full."""
        m, gap, cycles = self.m, self.gap, self.engine.gap_cycles
        with m.If(self.take):
            m.d.sync += gap.eq(0)
        with m.Elif(gap != cycles):
            m.d.sync += gap.eq(gap + 1)
        self.timed_out = (gap == cycles) & ~self.rx.valid

    def _fsm(self):
        """The state table (every state written out, in the order docs/board-protocol.md lists them)."""
        m, D, R, G = self.m, self.D, self.R, self.G
        with m.FSM(name="parser"):
            # -- receiving a frame: one byte a transfer, each state ends at a byte gap -----------
            with m.State("HUNT"):
                self._hunt()
            with m.State("CMD"):
                with self._on_byte():
                    m.d.sync += [self.cmd.eq(self.byte), self.crc.eq(self.crc_next)]
                    m.next = "LEN0"
            with m.State("LEN0"):
                with self._on_byte():
                    m.d.sync += [self.length[:8].eq(self.byte), self.crc.eq(self.crc_next)]
                    m.next = "LEN1"
            with m.State("LEN1"):
                with self._on_byte():
                    self._len1()
            with m.State("PAYLOAD"):
                with self._on_byte():
                    self._payload()
            with m.State("CRC"):
                with self._on_byte():
                    self._crc()

            # -- a whole, checked frame: the length for the command, then its states -----------
            with m.State("EXEC"):
                self._exec()
            # LOAD and GEMV_LOAD: 3-byte entries, each one table word
            with m.State("LOAD_FETCH"):
                m.next = "LOAD_USE"
            with m.State("LOAD_USE"):
                self._load_use()
            with m.State("LOAD_ISSUE"):
                self._load_issue()

            if D:       # the decoder's commands (a core with the decoder only)
                # OFFSET: the offset byte (with the residual path, then its optional flags byte)
                with m.State("OFFSET_FETCH"):
                    m.next = "OFFSET_USE"
                with m.State("OFFSET_USE"):
                    self._offset_use()
                # BLOCKS: the flags byte, then whole beats into the decoder; SPARSE goes the same way,
                # with 6-byte entries into the queue (ENTRY_ISSUE)
                with m.State("FLAGS_FETCH"):
                    m.next = "FLAGS_USE"
                with m.State("FLAGS_USE"):
                    m.d.sync += [self.flags.eq(self.rp.data), self.idx.eq(1)]
                    m.next = "BEAT_FETCH"
                with m.State("BEAT_FETCH"):
                    m.next = "BEAT_USE"
                with m.State("BEAT_USE"):
                    self._beat_use()
                with m.State("BEAT_ISSUE"):
                    self._beat_issue()
                # CHECKSUM: the optional flags byte, then wait until every owed output beat is folded in
                with m.State("CHECKSUM_FETCH"):
                    m.next = "CHECKSUM_USE"
                with m.State("CHECKSUM_USE"):
                    self._checksum_use()
                with m.State("CHECKSUM_WAIT"):
                    self._checksum_wait()

            if R:       # the residual path (a decoder's): OFFSET's flags byte, SPARSE's entries
                with m.State("OFFSET_FLAGS_FETCH"):
                    m.next = "OFFSET_FLAGS_USE"
                with m.State("OFFSET_FLAGS_USE"):
                    self._write_offset(self.acc[:8], (self.rp.data & SPARSE_LAYER_FLAG).any())
                with m.State("ENTRY_ISSUE"):
                    self._entry_issue()

            if G is not None:   # GEMV_*: GEMV_X's flags first, then items (G_FETCH, G_USE, G_ISSUE)
                with m.State("G_FLAGS_FETCH"):
                    m.next = "G_FLAGS_USE"
                with m.State("G_FLAGS_USE"):
                    m.d.sync += [self.flags.eq(self.rp.data), self.idx.eq(1)]
                    m.next = "G_FETCH"
                with m.State("G_FETCH"):
                    m.next = "G_USE"
                with m.State("G_USE"):
                    self._g_use()
                with m.State("G_ISSUE"):
                    self._g_issue()
                with m.State("G_STATUS_FETCH"):
                    m.next = "G_STATUS_USE"
                with m.State("G_STATUS_USE"):
                    self._g_status_use()

    # -- endings shared by the states ---------------------------------------------------------------
    def _finish(self, payload=()):
        """The command is done: its OK reply, then the next frame."""
        self.reply.send(self.cmd | REPLY_BIT, list(payload))
        self.m.next = "HUNT"

    def _fail(self, code):
        """The command ends with the error reply ``code``, then the next frame."""
        self.reply.error(code, self.cmd)
        self.m.next = "HUNT"

    def _drop_frame(self, code, *also):
        """A frame given up while received (the error reply ``code``): hunt for the next start byte,
        quiet (its remaining bytes are not GARBAGE)."""
        self.reply.error(code, self.cmd)
        self.m.d.sync += [self.quiet.eq(1), *also]
        self.m.next = "HUNT"

    def _stalled(self, progress):
        """A wait on the decoder (residual engine only) or the GEMV engine: STALLED after
        ``stall_cycles`` cycles without ``progress`` (a sparse layer whose entries never come, or
        blocks sent with no vector loaded, must not hang the engine)."""
        m, stall = self.m, self.stall
        if stall is None:
            return
        with m.If(~progress):
            with m.If(stall == self.engine.stall_cycles):
                self._fail(Err.STALLED)
            with m.Else():
                m.d.sync += stall.eq(stall + 1)

    def _gather(self):
        """A ``*_USE`` state: the buffer's byte into the accumulator, the next address."""
        self.m.d.sync += [self.acc.eq(Cat(self.acc[8:], self.rp.data)), self.idx.eq(self.idx + 1),
                          self.sub.eq(self.sub + 1)]

    def _item(self, n):
        """The last ``n`` bytes gathered: an item, its first byte lowest."""
        return self.acc[len(self.acc) - 8 * n:]

    # -- receiving a frame ----------------------------------------------------------------------------
    def _hunt(self):
        """HUNT: once no reply is pending, a start byte begins a frame; any other byte gets one
        GARBAGE reply per run (none while ``quiet``); a byte gap ends ``quiet``."""
        m = self.m
        m.d.comb += self.rx.ready.eq(~self.reply.busy)
        with m.If(self.take):
            with m.If(self.byte == START):
                m.d.sync += [self.quiet.eq(0), self.crc.eq(CRC_INIT), self.cmd.eq(0)]
                m.next = "CMD"
            with m.Elif(~self.quiet):
                self.reply.error(Err.GARBAGE, 0)
                m.d.sync += self.quiet.eq(1)
        with m.Elif(self.timed_out):
            m.d.sync += [self.quiet.eq(0), self.gap.eq(0)]

    @contextmanager
    def _on_byte(self):
        """A receiving state (CMD to CRC): ``rx`` is read, the body runs on each byte taken; a byte
        gap drops the half frame (TIMEOUT)."""
        m = self.m
        m.d.comb += self.rx.ready.eq(1)
        with m.If(self.take):
            yield
        with m.Elif(self.timed_out):
            self._drop_frame(Err.TIMEOUT, self.gap.eq(0))

    def _len1(self):
        """LEN1: the length's high byte; the remainders restart. OVERSIZE at once over
        ``max_payload``; an empty payload goes straight to the CRC."""
        m, length, byte = self.m, self.length, self.byte
        m.d.sync += [length[8:].eq(byte), self.crc.eq(self.crc_next), self.idx.eq(0), self.crc_n.eq(0)]
        m.d.sync += [remainder.eq(start) for remainder, _, start in self._remainders]
        with m.If(Cat(length[:8], byte) > self.engine.max_payload):
            self._drop_frame(Err.OVERSIZE)
        with m.Elif(Cat(length[:8], byte) == 0):
            m.next = "CRC"
        with m.Else():
            m.next = "PAYLOAD"

    def _payload(self):
        """PAYLOAD: a byte into the buffer, the CRC and the remainders."""
        m, idx = self.m, self.idx
        m.d.comb += self.wp.en.eq(1)
        m.d.sync += [self.crc.eq(self.crc_next), idx.eq(idx + 1)]
        m.d.sync += [r.eq(Mux(r == n - 1, 0, r + 1)) for r, n, _ in self._remainders]
        with m.If(idx == self.length - 1):
            m.next = "CRC"

    def _crc(self):
        """CRC: the four CRC bytes through the CRC register, which must end at the residue."""
        m, crc_n = self.m, self.crc_n
        m.d.sync += [self.crc.eq(self.crc_next), crc_n.eq(crc_n + 1)]
        with m.If(crc_n == 3):
            with m.If(self.crc_next == CRC_RESIDUE):
                m.d.sync += [self.idx.eq(0), self.sub.eq(0), self.first.eq(1)]
                m.next = "EXEC"
            with m.Else():
                self._drop_frame(Err.BAD_CRC)

    # -- EXEC: the command's length check, then its first state ----------------------------------
    @contextmanager
    def _unless_bad_length(self, bad):
        """BAD_LENGTH when ``bad``, else the body (the command starts)."""
        with self.m.If(bad):
            self._fail(Err.BAD_LENGTH)
        with self.m.Else():
            yield

    def _exec(self):
        """EXEC: dispatch on the command; the commands of a part the core lacks are UNKNOWN_CMD."""
        m = self.m
        with m.Switch(self.cmd):
            with m.Case(Cmd.STATUS):
                with self._unless_bad_length(self.length != 0):
                    errors = self.reply.errors
                    self._finish(self.engine.status_bytes() + [errors[:8], errors[8:]])
            if self.D:
                self._decoder_cases()
            if self.R:
                self._residual_cases()
            if self.G is not None:
                self._gemv_cases()
            with m.Default():
                self._fail(Err.UNKNOWN_CMD)

    def _decoder_cases(self):
        m, length = self.m, self.length
        with m.Case(Cmd.LOAD):
            with self._unless_bad_length((length == 0) | (self.mod3 != 0)):
                m.next = "LOAD_FETCH"
        with m.Case(Cmd.OFFSET):          # (with the residual path: and its flags)
            with self._unless_bad_length(((length != 1) & (length != 2)) if self.R else (length != 1)):
                m.next = "OFFSET_FETCH"
        with m.Case(Cmd.BLOCKS):
            with self._unless_bad_length((length < 1 + self.bb) | (self.modb != 0)):
                m.next = "FLAGS_FETCH"
        with m.Case(Cmd.CHECKSUM):
            with self._unless_bad_length(length > 1):
                m.next = "CHECKSUM_FETCH"

    def _residual_cases(self):
        m, length = self.m, self.length
        with m.Case(Cmd.SPARSE):
            with self._unless_bad_length((length < 1 + SPARSE_ENTRY_BYTES) | (self.mod6 != 0)):
                m.next = "FLAGS_FETCH"
        with m.Case(Cmd.SPARSE_STATUS):
            with self._unless_bad_length(length != 0):
                q = self.engine.sparse_queue
                self._finish([self.R, self.dec.sparse_error.as_value(), q & 0xFF, q >> 8])

    def _gemv_cases(self):
        m, length, layer_bytes = self.m, self.length, self.layer_bytes
        with m.Case(Cmd.GEMV_LOAD):
            with self._unless_bad_length((length == 0) | (self.mod3 != 0)):
                m.next = "LOAD_FETCH"
        with m.Case(Cmd.GEMV_LAYER):             # (and its optional flags byte)
            with self._unless_bad_length((length != layer_bytes) & (length != layer_bytes + 1)):
                m.next = "G_FETCH"
        with m.Case(Cmd.GEMV_X):
            with self._unless_bad_length((length < 1 + self.g) | (self.modx != 0)):
                m.next = "G_FLAGS_FETCH"
        with m.Case(Cmd.GEMV_W):
            with self._unless_bad_length((length < self.wb) | (self.modw != 0)):
                m.next = "G_FETCH"
        with m.Case(Cmd.GEMV_Y):
            with self._unless_bad_length(length != 2):
                m.next = "G_FETCH"
        with m.Case(Cmd.GEMV_STATUS):
            with self._unless_bad_length(length > 1):
                m.next = "G_STATUS_FETCH"
        if self.G.config.sparse:    # (an engine without the residual path: UNKNOWN_CMD)
            with m.Case(Cmd.GEMV_SPARSE):
                with self._unless_bad_length((length == 0) | (self.mode != 0)):
                    m.next = "G_FETCH"

    # -- LOAD and GEMV_LOAD ---------------------------------------------------------------------------
    def _load_use(self):
        m, sub = self.m, self.sub
        self._gather()
        with m.If(sub == LOAD_ENTRY_BYTES - 1):
            m.d.sync += sub.eq(0)
            m.next = "LOAD_ISSUE"
        with m.Else():
            m.next = "LOAD_FETCH"

    def _load_issue(self):
        """LOAD_ISSUE: one table word into an inactive page: GEMV_LOAD's into the engine's tables,
        LOAD's into the decoder's (a core with one of them: the only tables there are)."""
        m, dec, G, cmd = self.m, self.dec, self.G, self.cmd
        entry = self._item(LOAD_ENTRY_BYTES)
        targets = ([dec.load] if self.D else []) + ([G.load] if G is not None else [])
        if self.D and G is not None:
            m.d.comb += [dec.load.valid.eq(cmd != Cmd.GEMV_LOAD), G.load.valid.eq(cmd == Cmd.GEMV_LOAD)]
        else:
            m.d.comb += targets[0].valid.eq(1)
        for target in targets:
            m.d.comb += [target.payload.bank.eq(entry[7]), target.payload.addr.eq(entry[:7]),
                         target.payload.data.eq(entry[8:24])]
        with m.If(self.idx == self.length):
            self._finish()
        with m.Else():
            m.next = "LOAD_FETCH"

    # -- the decoder's: OFFSET, BLOCKS, CHECKSUM --------------------------------------------------
    def _write_offset(self, offset, layer_sparse=None):
        """``offset_we`` (and ``layer_sparse``) into the decoder's inactive page; the OK reply."""
        m, dec = self.m, self.dec
        m.d.comb += [dec.offset.eq(offset), dec.offset_we.eq(1)]
        if layer_sparse is not None:
            m.d.comb += dec.layer_sparse.eq(layer_sparse)
        self._finish()

    def _offset_use(self):
        """OFFSET_USE: the offset; with the residual path and a flags byte, kept until OFFSET_FLAGS_USE."""
        m = self.m
        if self.R:
            with m.If(self.length == 2):
                m.d.sync += [self.acc[:8].eq(self.rp.data), self.idx.eq(1)]
                m.next = "OFFSET_FLAGS_FETCH"
            with m.Else():
                self._write_offset(self.rp.data)
        else:
            self._write_offset(self.rp.data)

    def _beat_use(self):
        """BEAT_USE: a byte of a beat (BLOCKS) or of an entry (SPARSE, residual path)."""
        m, sub = self.m, self.sub
        self._gather()
        if self.R:
            with m.If(self.cmd == Cmd.SPARSE):
                with m.If(sub == SPARSE_ENTRY_BYTES - 1):
                    m.d.sync += sub.eq(0)
                    m.next = "ENTRY_ISSUE"
                with m.Else():
                    m.next = "BEAT_FETCH"
            with m.Elif(sub == self.bb - 1):
                m.d.sync += sub.eq(0)
                m.next = "BEAT_ISSUE"
            with m.Else():
                m.next = "BEAT_FETCH"
        else:
            with m.If(sub == self.bb - 1):
                m.d.sync += sub.eq(0)
                m.next = "BEAT_ISSUE"
            with m.Else():
                m.next = "BEAT_FETCH"

    def _beat_issue(self):
        """BEAT_ISSUE: the beat on ``decoder.blocks`` until taken, ``swap`` on the frame's first if flagged."""
        m, blocks = self.m, self.dec.blocks
        # the beat's bytes are the last gathered (the accumulator is wider where GEMV items are longer)
        beat = self._item(self.bb)[:self.engine.config.beat_bits]
        m.d.comb += [blocks.valid.eq(1), blocks.payload.blocks.eq(beat),
                     blocks.payload.swap.eq(self.first & (self.flags & SWAP_FLAG).any())]
        with m.If(blocks.ready):
            m.d.sync += self.first.eq(0)
            with m.If(self.idx == self.length):
                self._finish()
            with m.Else():
                m.next = "BEAT_FETCH"
        self._stalled(blocks.ready)

    def _checksum_use(self):
        """CHECKSUM_USE: the flags byte if sent (clear), else 0."""
        m = self.m
        with m.If(self.length == 1):
            m.d.sync += self.flags.eq(self.rp.data)
        with m.Else():
            m.d.sync += self.flags.eq(0)
        m.next = "CHECKSUM_WAIT"

    def _checksum_wait(self):
        """CHECKSUM_WAIT: once no output beat is owed or in flight, the count and the CRC (then
        cleared if flagged)."""
        m, values = self.m, self.dec.values
        v_crc, v_count, clear, pending = self.values
        with m.If((pending == 0) & ~values.valid):
            final = ~v_crc
            self._finish([v_count[8 * i:8 * i + 8] for i in range(4)] + [final[8 * i:8 * i + 8] for i in range(4)])
            m.d.comb += clear.eq((self.flags & CLEAR_FLAG).any())
        self._stalled(values.valid | (pending == 0))

    # -- the residual path's: SPARSE ------------------------------------------------------------------
    def _entry_issue(self):
        """ENTRY_ISSUE: one entry into the sparse queue, ``last`` on the frame's last if flagged."""
        m, w_stream = self.m, self.queue.w_stream
        entry = self._item(SPARSE_ENTRY_BYTES)
        last = (self.flags & LAST_FLAG).any() & (self.idx == self.length)
        m.d.comb += [w_stream.valid.eq(1), w_stream.payload.eq(self.engine.sparse_word(entry, last))]
        with m.If(w_stream.ready):
            with m.If(self.idx == self.length):
                self._finish()
            with m.Else():
                m.next = "BEAT_FETCH"
        self._stalled(w_stream.ready)

    # -- the GEMV engine's: GEMV_LAYER, GEMV_X, GEMV_W, GEMV_SPARSE, GEMV_Y, GEMV_STATUS -----------
    def _g_use(self):
        """G_USE: a byte of the item; its size is the command's (GEMV_LAYER: the whole payload,
        5 or 6 bytes)."""
        m, cmd, sub = self.m, self.cmd, self.sub
        need = Mux(cmd == Cmd.GEMV_X, self.g, Mux(cmd == Cmd.GEMV_W, self.wb, Mux(cmd == Cmd.GEMV_Y, 2,
                   Mux(cmd == Cmd.GEMV_SPARSE, self.gemv_entry, self.length))))
        self._gather()
        with m.If(sub == need - 1):
            m.d.sync += sub.eq(0)
            m.next = "G_ISSUE"
        with m.Else():
            m.next = "G_FETCH"

    def _g_issue(self):
        """G_ISSUE: the item to the engine (each waits for its port, STALLED after the stall time),
        or GEMV_Y's reply."""
        m, G = self.m, self.G
        more = self.idx != self.length
        with m.Switch(self.cmd):
            with m.Case(Cmd.GEMV_LAYER):
                self._gemv_layer()
            if G.config.sparse:
                with m.Case(Cmd.GEMV_SPARSE):
                    self._gemv_sparse_entry(more)
            with m.Case(Cmd.GEMV_X):
                self._gemv_x_beat(more)
            with m.Case(Cmd.GEMV_W):
                m.d.comb += [G.w.valid.eq(1), G.w.payload.eq(self._item(self.wb)[:G.config.layout.block_bits])]
                self._handed_on(G.w.ready, more)
            with m.Case(Cmd.GEMV_Y):
                self._gemv_y()

    def _handed_on(self, ready, more):
        """The item waits for ``ready``: then the next item, or the OK reply after the last;
        STALLED after the stall time without it."""
        m = self.m
        with m.If(ready):
            with m.If(more):
                m.next = "G_FETCH"
            with m.Else():
                self._finish()
        self._stalled(ready)

    def _gemv_layer(self):
        """GEMV_LAYER: the layer registers into the inactive page (``sparse`` from the flags byte if sent)."""
        layer, layer_bytes = self.G.layer, self.layer_bytes
        flagged = self.length != layer_bytes
        f = Mux(flagged, self._item(layer_bytes + 1)[:8 * layer_bytes], self._item(layer_bytes))
        self.m.d.comb += [layer.valid.eq(1), layer.payload.rows.eq(f[:16]),
                          layer.payload.blocks_per_row.eq(f[16:32]), layer.payload.offset.eq(f[32:40]),
                          layer.payload.sparse.eq(flagged & (self._item(1) & SPARSE_LAYER_FLAG).any())]
        self._finish()

    def _gemv_sparse_entry(self, more):
        """GEMV_SPARSE: one entry into the port's entry queue."""
        sparse = self.G.sparse
        f = self._item(self.gemv_entry)
        self.m.d.comb += [sparse.valid.eq(1), sparse.payload.row.eq(f[:16]), sparse.payload.col.eq(f[16:32]),
                          sparse.payload.value.eq(f[32:48]), sparse.payload.last.eq((f[48:56] & ENTRY_LAST).any())]
        self._handed_on(sparse.ready, more)

    def _gemv_x_beat(self, more):
        """GEMV_X: an x beat of ``g`` codes, ``swap`` on the frame's first and ``last`` on its last if flagged."""
        m, x = self.m, self.G.x
        m.d.comb += [x.valid.eq(1), x.payload.codes.as_value().eq(self._item(self.g)),
                     x.payload.swap.eq(self.first & (self.flags & X_SWAP).any()),
                     x.payload.last.eq(~more & (self.flags & X_LAST).any())]
        with m.If(x.ready):
            m.d.sync += self.first.eq(0)
        self._handed_on(x.ready, more)

    def _gemv_y(self):
        """GEMV_Y: the words waiting in the y FIFO, at most the count asked and ``y_max``; NO_Y when none
        is waiting and none is owed."""
        G = self.G
        count = self._item(2)
        n = Mux(count < G.y_level, count, G.y_level)
        n = Mux(n < self.engine.y_max, n, self.engine.y_max)
        with self.m.If((n == 0) & G.y_none):
            self._fail(Err.NO_Y)
        with self.m.Else():
            self.reply.send_y_words(self.cmd | REPLY_BIT, n)
            self.m.next = "HUNT"

    def _g_status_use(self):
        """G_STATUS_USE: the engine's status; its sticky bits and counters cleared if flagged."""
        self._finish(self.G.status_payload())
        self.m.d.comb += self.G.clear.eq((self.length == 1) & (self.rp.data & CLEAR_FLAG).any())
