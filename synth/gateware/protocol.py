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
size, HIF bits, banks): ``status_bytes``.

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
  built and the engine is the same as before): OFFSET takes an optional flags
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
"""


import struct

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

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
    """The constant part of the STATUS reply (host.Status without ``errors``) of a decoder; of a
    GEMV-only core (``config`` its engine's ``GemvConfig``) the engine's point with lanes, beat bytes
    and lane bytes 0: no decoder (docs/board-protocol.md, STATUS)."""
    lay = config.layout
    if isinstance(config, GemvConfig):
        decoder = [0, lay.code_bits, lay.group, 0, 0]
    else:
        decoder = [config.lanes, lay.code_bits, lay.group, config.blocks_per_beat * lay.block_bytes,
                   lane_bytes(lane_word_bits(config))]
    return [PROTOCOL_VERSION, *decoder, config.hif.bits, lay.banks, max_payload & 0xFF, max_payload >> 8]


class ProtocolEngine(wiring.Component):
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

    def elaborate(self, platform):
        m = Module()
        cfg, dec, G = self.config, self.decoder, self.gemv
        D = dec is not None                # the decoder's hardware and commands (else a GEMV-only core)
        if D:
            m.submodules.decoder = dec
        if G is not None:
            m.submodules.gemv = G
        bb = self.beat_bytes

        m.submodules.buffer = mem = Memory(shape=8, depth=self.max_payload, init=[])
        wp = mem.write_port()
        rp = mem.read_port()

        # -- reply writer ----------------------------------------------------------------
        r_go = Signal()
        r_cmd = Signal(8)
        # (with the engine: GEMV_STATUS's longer payload, and GEMV_Y's words streamed from its FIFO)
        held = REPLY_MAX_GEMV if G is not None else REPLY_MAX
        longest = max(held, Y_WORD_BYTES * self.y_max) if G is not None else held
        r_len = Signal(range(longest + 1))
        r_bytes = [Signal(8, name=f"reply{i}") for i in range(held)]
        r_idx = Signal(range(longest + 1))
        r_stream = Signal()           # the payload is GEMV_Y's words, from the engine's y FIFO
        r_crc = Signal(32)
        errors = Signal(16)
        sending = Signal()
        busy = Signal()               # a reply is requested or being written

        def reply(cmd, payload):
            m.d.sync += [r_cmd.eq(cmd), r_len.eq(len(payload)), r_go.eq(1)]
            m.d.sync += [r_bytes[i].eq(p) for i, p in enumerate(payload)]
            if G is not None:
                m.d.sync += r_stream.eq(0)

        def reply_words(cmd, n):
            """An OK reply whose payload is ``n`` words of the engine's y FIFO (GEMV_Y)."""
            m.d.sync += [r_cmd.eq(cmd), r_len.eq(n * Y_WORD_BYTES), r_go.eq(1), r_stream.eq(1)]

        def error(code, cmd_seen):
            reply(ERROR_REPLY, [int(code), cmd_seen])
            m.d.sync += errors.eq(errors + 1)

        def put(byte):
            """Offer ``byte`` on ``tx``; true when it is taken."""
            m.d.comb += [sending.eq(1), self.tx.valid.eq(1), self.tx.payload.eq(byte)]
            return self.tx.ready

        r_crc_bytes = Array(r_crc[8 * i:8 * i + 8] ^ 0xFF for i in range(4))
        # every byte from CMD to the payload's last goes into the CRC as ``tx`` takes it: one CRC
        # update on ``tx.payload`` (the parser's ``crc_next`` likewise), not one per state
        r_crc_in = Signal()
        with m.If(r_crc_in & self.tx.valid & self.tx.ready):
            m.d.sync += r_crc.eq(crc32_update(r_crc, self.tx.payload))
        with m.FSM(name="reply"):
            with m.State("IDLE"):
                with m.If(r_go):
                    m.d.sync += [r_go.eq(0), r_idx.eq(0), r_crc.eq(CRC_INIT)]
                    m.next = "START"
            with m.State("START"):                     # the start byte is not in the CRC
                with m.If(put(Const(START, 8))):
                    m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += r_crc_in.eq(1)
                with m.If(put(r_cmd)):
                    m.next = "LEN0"
            with m.State("LEN0"):
                m.d.comb += r_crc_in.eq(1)
                with m.If(put(r_len)):
                    m.next = "LEN1"
            with m.State("LEN1"):                      # replies are shorter than 256 bytes but GEMV_Y's
                m.d.comb += r_crc_in.eq(1)
                hi = r_len[8:] if G is not None else Const(0, 8)
                with m.If(put(hi)):
                    m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                m.d.comb += [sending.eq(1), r_crc_in.eq(1)]
                byte = Array(r_bytes)[r_idx]
                if G is not None:                      # GEMV_Y: the FIFO's head word, LSB first; popped
                    y_byte = Array(G.y.payload[8 * i:8 * i + 8] for i in range(Y_WORD_BYTES))[r_idx[:2]]
                    byte = Mux(r_stream, y_byte, byte)
                    with m.If(r_stream & self.tx.valid & self.tx.ready & (r_idx[:2] == Y_WORD_BYTES - 1)):
                        m.d.comb += G.y.ready.eq(1)
                with m.If(r_idx == r_len):
                    m.d.sync += r_idx.eq(0)
                    m.next = "CRC"
                with m.Else():
                    m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(byte)]
                    with m.If(self.tx.ready):
                        m.d.sync += r_idx.eq(r_idx + 1)
            with m.State("CRC"):
                with m.If(put(r_crc_bytes[r_idx[:2]])):
                    m.d.sync += r_idx.eq(r_idx + 1)
                    with m.If(r_idx == 3):
                        m.next = "IDLE"
        m.d.comb += busy.eq(sending | r_go)

        # -- decoded values: running CRC-32 and count (the decoder's) ---------------------------
        if D:
            v_crc, v_count, clear, pending = self.fold_values(m)

        # -- sparse entries (residual path only): SPARSE frames into a queue, the queue into the
        # decoder's stream at the decoder's pace; a wait without decoder progress ends in STALLED
        R = cfg.residuals if D else 0
        if R or G is not None:
            stall = Signal(range(self.stall_cycles + 1))
            m.d.sync += stall.eq(0)                    # counted up in a wait state only (``stalled``)
        if R:
            m.submodules.sparse_queue = queue = SyncFIFOBuffered(width=len(dec.sparse.payload.as_value()),
                                                                 depth=self.sparse_queue)
            m.d.comb += [dec.sparse.valid.eq(queue.r_stream.valid), dec.sparse.payload.eq(queue.r_stream.payload),
                         queue.r_stream.ready.eq(dec.sparse.ready)]

        # -- frame parser and executor --------------------------------------------------
        cmd = Signal(8)
        length = Signal(16)
        idx = Signal(16)              # payload bytes received / read
        crc = Signal(32)
        crc_n = Signal(range(4))
        quiet = Signal()              # an error was reported: no GARBAGE reply until a start byte
        gap = Signal(range(self.gap_cycles + 1))
        layer_bytes = struct.calcsize(GEMV_LAYER_FORMAT)        # and an optional flags byte
        gemv_entry = struct.calcsize(GEMV_ENTRY_FORMAT)
        if G is not None:
            g, wb = G.config.group, G.config.layout.block_bytes
        entry_max = max(LOAD_ENTRY_BYTES, bb, SPARSE_ENTRY_BYTES if R else 0,
                        *((g, wb, layer_bytes + 1, gemv_entry) if G is not None else ()))
        acc = Signal(8 * entry_max)
        sub = Signal(range(entry_max + 1))
        flags = Signal(8)
        first = Signal()
        byte = self.rx.payload
        take = self.rx.valid & self.rx.ready
        crc_next = crc32_update(crc, byte)
        m.d.comb += [rp.addr.eq(idx), wp.addr.eq(idx), wp.data.eq(byte)]

        # payload-length checks, counted as the payload arrives
        mod3 = Signal(range(LOAD_ENTRY_BYTES))
        modb = Signal(range(bb), name="modb") if D else None       # BLOCKS: flags, then whole beats
        mod6 = Signal(range(SPARSE_ENTRY_BYTES)) if R else None
        modx = Signal(range(g)) if G is not None else None          # GEMV_X: flags, then g-byte beats
        modw = Signal(range(wb)) if G is not None else None         # GEMV_W: whole blocks
        mode = Signal(range(gemv_entry)) if G is not None else None  # GEMV_SPARSE: whole entries
        with m.If(take):
            m.d.sync += gap.eq(0)
        with m.Elif(gap != self.gap_cycles):
            m.d.sync += gap.eq(gap + 1)
        timed_out = (gap == self.gap_cycles) & ~self.rx.valid

        def drop_half_frame():
            """A receiving state after a byte gap: TIMEOUT, back to hunting for a start byte."""
            error(Err.TIMEOUT, cmd)
            m.d.sync += [quiet.eq(1), gap.eq(0)]
            m.next = "HUNT"

        def finish(payload=()):
            """The command is done: its OK reply, then the next frame."""
            reply(cmd | REPLY_BIT, list(payload))
            m.next = "HUNT"

        def bad_length():
            error(Err.BAD_LENGTH, cmd)
            m.next = "HUNT"

        def stalled(progress):
            """A wait on the decoder (residual engine only) or the GEMV engine: STALLED after
            ``stall_cycles`` cycles without ``progress`` (a sparse layer whose entries never come, or
            blocks sent with no vector loaded, must not hang the engine)."""
            if not R and G is None:
                return
            with m.If(~progress):
                with m.If(stall == self.stall_cycles):
                    error(Err.STALLED, cmd)
                    m.next = "HUNT"
                with m.Else():
                    m.d.sync += stall.eq(stall + 1)

        def gather():
            """A ``*_USE`` state: the buffer's byte into the accumulator, the next address."""
            m.d.sync += [acc.eq(Cat(acc[8:], rp.data)), idx.eq(idx + 1), sub.eq(sub + 1)]

        with m.FSM(name="parser"):
            # -- receiving a frame: one byte a transfer, each state ends at a byte gap --------
            with m.State("HUNT"):
                m.d.comb += self.rx.ready.eq(~busy)
                with m.If(take):
                    with m.If(byte == START):
                        m.d.sync += [quiet.eq(0), crc.eq(CRC_INIT), cmd.eq(0)]
                        m.next = "CMD"
                    with m.Elif(~quiet):
                        error(Err.GARBAGE, 0)
                        m.d.sync += quiet.eq(1)
                with m.Elif(timed_out):
                    m.d.sync += [quiet.eq(0), gap.eq(0)]

            with m.State("CMD"):
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    m.d.sync += [cmd.eq(byte), crc.eq(crc_next)]
                    m.next = "LEN0"
                with m.Elif(timed_out):
                    drop_half_frame()

            with m.State("LEN0"):
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    m.d.sync += [length[:8].eq(byte), crc.eq(crc_next)]
                    m.next = "LEN1"
                with m.Elif(timed_out):
                    drop_half_frame()

            with m.State("LEN1"):
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    m.d.sync += [length[8:].eq(byte), crc.eq(crc_next), idx.eq(0), crc_n.eq(0), mod3.eq(0)]
                    if D:                                        # the first BLOCKS byte is the flags
                        m.d.sync += modb.eq(bb - 1)
                    if R:                                        # the first SPARSE byte is the flags
                        m.d.sync += mod6.eq(SPARSE_ENTRY_BYTES - 1)
                    if G is not None:                            # the first GEMV_X byte is the flags
                        m.d.sync += [modx.eq(g - 1), modw.eq(0), mode.eq(0)]
                    with m.If(Cat(length[:8], byte) > self.max_payload):
                        error(Err.OVERSIZE, cmd)
                        m.d.sync += quiet.eq(1)
                        m.next = "HUNT"
                    with m.Elif(Cat(length[:8], byte) == 0):
                        m.next = "CRC"
                    with m.Else():
                        m.next = "PAYLOAD"
                with m.Elif(timed_out):
                    drop_half_frame()

            with m.State("PAYLOAD"):
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    m.d.comb += wp.en.eq(1)
                    m.d.sync += [crc.eq(crc_next), idx.eq(idx + 1),
                                 mod3.eq(Mux(mod3 == LOAD_ENTRY_BYTES - 1, 0, mod3 + 1))]
                    if D:
                        m.d.sync += modb.eq(Mux(modb == bb - 1, 0, modb + 1))
                    if R:
                        m.d.sync += mod6.eq(Mux(mod6 == SPARSE_ENTRY_BYTES - 1, 0, mod6 + 1))
                    if G is not None:
                        m.d.sync += [modx.eq(Mux(modx == g - 1, 0, modx + 1)),
                                     modw.eq(Mux(modw == wb - 1, 0, modw + 1)),
                                     mode.eq(Mux(mode == gemv_entry - 1, 0, mode + 1))]
                    with m.If(idx == length - 1):
                        m.next = "CRC"
                with m.Elif(timed_out):
                    drop_half_frame()

            with m.State("CRC"):
                m.d.comb += self.rx.ready.eq(1)
                with m.If(take):
                    m.d.sync += [crc.eq(crc_next), crc_n.eq(crc_n + 1)]
                    with m.If(crc_n == 3):
                        with m.If(crc_next == CRC_RESIDUE):
                            m.d.sync += [idx.eq(0), sub.eq(0), first.eq(1)]
                            m.next = "EXEC"
                        with m.Else():
                            error(Err.BAD_CRC, cmd)
                            m.d.sync += quiet.eq(1)
                            m.next = "HUNT"
                with m.Elif(timed_out):
                    drop_half_frame()

            # -- a whole, checked frame: the length for the command, then its states ---------
            with m.State("EXEC"):
                with m.Switch(cmd):
                    with m.Case(Cmd.STATUS):
                        with m.If(length != 0):
                            bad_length()
                        with m.Else():
                            finish(self.status_bytes() + [errors[:8], errors[8:]])
                    if D:                                 # (a GEMV-only core: UNKNOWN_CMD)
                        with m.Case(Cmd.LOAD):
                            with m.If((length == 0) | (mod3 != 0)):
                                bad_length()
                            with m.Else():
                                m.next = "LOAD_FETCH"
                        with m.Case(Cmd.OFFSET):          # (with the residual path: and its flags)
                            with m.If(((length != 1) & (length != 2)) if R else (length != 1)):
                                bad_length()
                            with m.Else():
                                m.next = "OFFSET_FETCH"
                        with m.Case(Cmd.BLOCKS):
                            with m.If((length < 1 + bb) | (modb != 0)):
                                bad_length()
                            with m.Else():
                                m.next = "FLAGS_FETCH"
                        with m.Case(Cmd.CHECKSUM):
                            with m.If(length > 1):
                                bad_length()
                            with m.Else():
                                m.next = "CHECKSUM_FETCH"
                    if R:
                        with m.Case(Cmd.SPARSE):
                            with m.If((length < 1 + SPARSE_ENTRY_BYTES) | (mod6 != 0)):
                                bad_length()
                            with m.Else():
                                m.next = "FLAGS_FETCH"
                        with m.Case(Cmd.SPARSE_STATUS):
                            with m.If(length != 0):
                                bad_length()
                            with m.Else():
                                q = self.sparse_queue
                                finish([R, dec.sparse_error.as_value(), q & 0xFF, q >> 8])
                    if G is not None:
                        with m.Case(Cmd.GEMV_LOAD):
                            with m.If((length == 0) | (mod3 != 0)):
                                bad_length()
                            with m.Else():
                                m.next = "LOAD_FETCH"
                        with m.Case(Cmd.GEMV_LAYER):             # (and its optional flags byte)
                            with m.If((length != layer_bytes) & (length != layer_bytes + 1)):
                                bad_length()
                            with m.Else():
                                m.next = "G_FETCH"
                        with m.Case(Cmd.GEMV_X):
                            with m.If((length < 1 + g) | (modx != 0)):
                                bad_length()
                            with m.Else():
                                m.next = "G_FLAGS_FETCH"
                        with m.Case(Cmd.GEMV_W):
                            with m.If((length < wb) | (modw != 0)):
                                bad_length()
                            with m.Else():
                                m.next = "G_FETCH"
                        with m.Case(Cmd.GEMV_Y):
                            with m.If(length != 2):
                                bad_length()
                            with m.Else():
                                m.next = "G_FETCH"
                        with m.Case(Cmd.GEMV_STATUS):
                            with m.If(length > 1):
                                bad_length()
                            with m.Else():
                                m.next = "G_STATUS_FETCH"
                        if G.config.sparse:    # (an engine without the residual path: UNKNOWN_CMD)
                            with m.Case(Cmd.GEMV_SPARSE):
                                with m.If((length == 0) | (mode != 0)):
                                    bad_length()
                                with m.Else():
                                    m.next = "G_FETCH"
                    with m.Default():
                        error(Err.UNKNOWN_CMD, cmd)
                        m.next = "HUNT"

            # Reading the buffer: a *_FETCH state presents idx to the read port, the *_USE state
            # after it sees its byte.
            # LOAD: 3-byte entries, each one table word into the decoder's inactive page.
            with m.State("LOAD_FETCH"):
                m.next = "LOAD_USE"
            with m.State("LOAD_USE"):
                gather()
                with m.If(sub == LOAD_ENTRY_BYTES - 1):
                    m.d.sync += sub.eq(0)
                    m.next = "LOAD_ISSUE"
                with m.Else():
                    m.next = "LOAD_FETCH"
            with m.State("LOAD_ISSUE"):
                entry = acc[len(acc) - 8 * LOAD_ENTRY_BYTES:]
                targets = ([dec.load] if D else []) + ([G.load] if G is not None else [])
                if D and G is not None:                # GEMV_LOAD: the engine's tables, else the decoder's
                    m.d.comb += [dec.load.valid.eq(cmd != Cmd.GEMV_LOAD), G.load.valid.eq(cmd == Cmd.GEMV_LOAD)]
                else:                                  # the only tables there are
                    m.d.comb += targets[0].valid.eq(1)
                for target in targets:
                    m.d.comb += [target.payload.bank.eq(entry[7]), target.payload.addr.eq(entry[:7]),
                                 target.payload.data.eq(entry[8:24])]
                with m.If(idx == length):
                    finish()
                with m.Else():
                    m.next = "LOAD_FETCH"

            # The decoder's states (a core with the decoder only).
            if D:
                # OFFSET: one byte, the inactive page's per-layer offset; with the residual path an
                # optional flags byte, the page's ``layer_sparse`` (0 without it).
                with m.State("OFFSET_FETCH"):
                    m.next = "OFFSET_USE"
                def write_offset(offset, layer_sparse=None):
                    """``offset_we`` (and ``layer_sparse``) into the decoder's inactive page; the OK reply."""
                    m.d.comb += [dec.offset.eq(offset), dec.offset_we.eq(1)]
                    if layer_sparse is not None:
                        m.d.comb += dec.layer_sparse.eq(layer_sparse)
                    finish()

                with m.State("OFFSET_USE"):
                    if R:
                        with m.If(length == 2):
                            m.d.sync += [acc[:8].eq(rp.data), idx.eq(1)]
                            m.next = "OFFSET_FLAGS_FETCH"
                        with m.Else():
                            write_offset(rp.data)
                    else:
                        write_offset(rp.data)

                # BLOCKS: the flags byte, then whole beats into the decoder (swap on the first if flagged).
                # SPARSE (residual path) goes the same way, with 6-byte entries into the queue.
                with m.State("FLAGS_FETCH"):
                    m.next = "FLAGS_USE"
                with m.State("FLAGS_USE"):
                    m.d.sync += [flags.eq(rp.data), idx.eq(1)]
                    m.next = "BEAT_FETCH"
                with m.State("BEAT_FETCH"):
                    m.next = "BEAT_USE"
                with m.State("BEAT_USE"):
                    gather()
                    if R:
                        with m.If(cmd == Cmd.SPARSE):
                            with m.If(sub == SPARSE_ENTRY_BYTES - 1):
                                m.d.sync += sub.eq(0)
                                m.next = "ENTRY_ISSUE"
                            with m.Else():
                                m.next = "BEAT_FETCH"
                        with m.Elif(sub == bb - 1):
                            m.d.sync += sub.eq(0)
                            m.next = "BEAT_ISSUE"
                        with m.Else():
                            m.next = "BEAT_FETCH"
                    else:
                        with m.If(sub == bb - 1):
                            m.d.sync += sub.eq(0)
                            m.next = "BEAT_ISSUE"
                        with m.Else():
                            m.next = "BEAT_FETCH"
                with m.State("BEAT_ISSUE"):
                    m.d.comb += [dec.blocks.valid.eq(1), dec.blocks.payload.blocks.eq(acc[:cfg.beat_bits]),
                                 dec.blocks.payload.swap.eq(first & (flags & SWAP_FLAG).any())]
                    with m.If(dec.blocks.ready):
                        m.d.sync += first.eq(0)
                        with m.If(idx == length):
                            finish()
                        with m.Else():
                            m.next = "BEAT_FETCH"
                    stalled(dec.blocks.ready)

                # CHECKSUM: the optional flags byte, then wait until every owed output beat is folded in.
                with m.State("CHECKSUM_FETCH"):
                    m.next = "CHECKSUM_USE"
                with m.State("CHECKSUM_USE"):
                    with m.If(length == 1):
                        m.d.sync += flags.eq(rp.data)
                    with m.Else():
                        m.d.sync += flags.eq(0)
                    m.next = "CHECKSUM_WAIT"
                with m.State("CHECKSUM_WAIT"):
                    with m.If((pending == 0) & ~dec.values.valid):
                        final = ~v_crc
                        finish([v_count[8 * i:8 * i + 8] for i in range(4)] +
                               [final[8 * i:8 * i + 8] for i in range(4)])
                        m.d.comb += clear.eq((flags & CLEAR_FLAG).any())
                    stalled(dec.values.valid | (pending == 0))

            # Residual path only (R > 0: a decoder's; ``write_offset`` is above). OFFSET's flags byte:
            # the offset with the page's ``layer_sparse``. SPARSE (its flags and entry bytes read as
            # BLOCKS reads its own): one entry into the queue, ``last`` on the frame's last entry when
            # the flags say so.
            if R:
                with m.State("OFFSET_FLAGS_FETCH"):
                    m.next = "OFFSET_FLAGS_USE"
                with m.State("OFFSET_FLAGS_USE"):
                    write_offset(acc[:8], (rp.data & SPARSE_LAYER_FLAG).any())
                with m.State("ENTRY_ISSUE"):
                    entry = acc[len(acc) - 8 * SPARSE_ENTRY_BYTES:]
                    last = (flags & LAST_FLAG).any() & (idx == length)
                    m.d.comb += [queue.w_stream.valid.eq(1),
                                 queue.w_stream.payload.eq(self.sparse_word(entry, last))]
                    with m.If(queue.w_stream.ready):
                        with m.If(idx == length):
                            finish()
                        with m.Else():
                            m.next = "BEAT_FETCH"
                    stalled(queue.w_stream.ready)

            # GEMV_* (a board with the engine only). ``G_FETCH`` / ``G_USE`` gather an item (GEMV_LAYER's
            # fields and flags, an x beat of ``g`` codes, a block, a sparse entry, GEMV_Y's count) from the
            # buffer, ``G_ISSUE`` hands
            # it on; GEMV_X reads its flags first (``G_FLAGS_*``), GEMV_STATUS its optional flags
            # (``G_STATUS_*``); GEMV_LOAD shares LOAD's states. A wait on the engine ends in STALLED.
            if G is not None:
                need = Mux(cmd == Cmd.GEMV_X, g, Mux(cmd == Cmd.GEMV_W, wb, Mux(cmd == Cmd.GEMV_Y, 2,
                           Mux(cmd == Cmd.GEMV_SPARSE, gemv_entry, length))))      # GEMV_LAYER: 5 or 6 bytes

                def item(n):
                    return acc[len(acc) - 8 * n:]

                def handed_on(ready, more):
                    """The item waits for ``ready``: then the next item, or the OK reply after the last;
                    STALLED after the stall time without it."""
                    with m.If(ready):
                        with m.If(more):
                            m.next = "G_FETCH"
                        with m.Else():
                            finish()
                    stalled(ready)

                with m.State("G_FLAGS_FETCH"):
                    m.next = "G_FLAGS_USE"
                with m.State("G_FLAGS_USE"):
                    m.d.sync += [flags.eq(rp.data), idx.eq(1)]
                    m.next = "G_FETCH"
                with m.State("G_FETCH"):
                    m.next = "G_USE"
                with m.State("G_USE"):
                    gather()
                    with m.If(sub == need - 1):
                        m.d.sync += sub.eq(0)
                        m.next = "G_ISSUE"
                    with m.Else():
                        m.next = "G_FETCH"
                with m.State("G_ISSUE"):
                    more = idx != length
                    with m.Switch(cmd):
                        with m.Case(Cmd.GEMV_LAYER):             # the fields, then the flags if sent
                            flagged = length != layer_bytes
                            f = Mux(flagged, item(layer_bytes + 1)[:8 * layer_bytes], item(layer_bytes))
                            m.d.comb += [G.layer.valid.eq(1), G.layer.payload.rows.eq(f[:16]),
                                         G.layer.payload.blocks_per_row.eq(f[16:32]),
                                         G.layer.payload.offset.eq(f[32:40]),
                                         G.layer.payload.sparse.eq(flagged & (item(1) & SPARSE_LAYER_FLAG).any())]
                            finish()
                        if G.config.sparse:
                            with m.Case(Cmd.GEMV_SPARSE):            # one entry into the queue
                                f = item(gemv_entry)
                                m.d.comb += [G.sparse.valid.eq(1), G.sparse.payload.row.eq(f[:16]),
                                             G.sparse.payload.col.eq(f[16:32]), G.sparse.payload.value.eq(f[32:48]),
                                             G.sparse.payload.last.eq((f[48:56] & ENTRY_LAST).any())]
                                handed_on(G.sparse.ready, more)
                        with m.Case(Cmd.GEMV_X):
                            m.d.comb += [G.x.valid.eq(1), G.x.payload.codes.as_value().eq(item(g)),
                                         G.x.payload.swap.eq(first & (flags & X_SWAP).any()),
                                         G.x.payload.last.eq(~more & (flags & X_LAST).any())]
                            with m.If(G.x.ready):
                                m.d.sync += first.eq(0)
                            handed_on(G.x.ready, more)
                        with m.Case(Cmd.GEMV_W):
                            m.d.comb += [G.w.valid.eq(1), G.w.payload.eq(item(wb)[:G.config.layout.block_bits])]
                            handed_on(G.w.ready, more)
                        with m.Case(Cmd.GEMV_Y):                 # the words waiting, up to the count and y_max
                            count = item(2)
                            n = Mux(count < G.y_level, count, G.y_level)
                            n = Mux(n < self.y_max, n, self.y_max)
                            with m.If((n == 0) & G.y_none):
                                error(Err.NO_Y, cmd)
                                m.next = "HUNT"
                            with m.Else():
                                reply_words(cmd | REPLY_BIT, n)
                                m.next = "HUNT"

                with m.State("G_STATUS_FETCH"):
                    m.next = "G_STATUS_USE"
                with m.State("G_STATUS_USE"):
                    finish(G.status_payload())
                    m.d.comb += G.clear.eq((length == 1) & (rp.data & CLEAR_FLAG).any())
        return m
