"""The board protocol end to end: synth/host/client.py's BoardLink driving synth/gateware/protocol.py
(+ the decoder) in amaranth.sim.

Also the engine without a decoder (the iCEBreaker's GEMV-only core, ``icebreaker-gemv``): its STATUS
(0 lanes, the engine's point), every decoder command answered UNKNOWN_CMD, and its top prepared for
the iCEBreaker; its GEMV runs are tests/test_board_gemv.py's.

The host code is the one a real board uses; its transport here is a byte
queue bridged into the simulation (synth/gateware/simboard.py's ``SimSerial``), either
straight onto the engine's byte streams (most tests: one byte per cycle) or
through the UART pins of ``BoardCore`` (bit-banged by the testbench, an
independent UART model). Timeouts are in simulated seconds. Expected values
come from golden/ only (hdl.reference); the board reports a CRC-32 and a count
of the decoded words, compared with the host's own over the expected words.
"""

import struct
from dataclasses import replace

import numpy as np
import pytest

import mutants

from amaranth.hdl import Const

from sop.golden.layout import named_layouts
from sop.golden.points import get_point
from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.hdl import sparse_merge
from sop.hdl.decoder import Decoder
from sop.sim.stimulus import from_stream, random_layer, with_sparse
from sop.golden.files import crc32
from sop.synth import wire
from sop.synth.gateware.board import BOARDS, BoardCore, elaborate_for
from sop.synth.gateware.protocol import ProtocolEngine
from sop.synth.gateware.simboard import SimSerial, stream_port, uart_port, uart_timeout
from sop.synth.host.bringup import model_layer
from sop.synth.host.client import BoardError, BoardLink, BoardTimeout, beat_bytes_of
from sop.synth.wire import Cmd, Err, encode_frame

CFG = DecoderConfig("board", 2, named_layouts()["sop4-g16"])
PERIOD = 1e-6                  # simulated clock: 1 MHz
GAP = 64                       # the engine's byte-gap timeout, cycles
MAX_PAYLOAD = 64
SOP4_G16_FORMAT_ID = 0xC5ABA8EA  # golden.layout.format_id of sop4-g16 (tests/test_layout.py derives it)


def stream_link(engine):
    """The host on the engine's byte streams (one byte a cycle)."""
    return BoardLink(stream_port(engine, period=PERIOD), timeout=2000 * PERIOD, max_payload=MAX_PAYLOAD)


def uart_link(core, divisor):
    """The host on the BoardCore's UART pins, bit-banged by the testbench."""
    return BoardLink(uart_port(core, divisor, period=PERIOD),
                     timeout=uart_timeout(MAX_PAYLOAD, divisor, PERIOD), max_payload=MAX_PAYLOAD)


def make_engine(decoder=None):
    return ProtocolEngine(CFG, max_payload=MAX_PAYLOAD, gap_cycles=GAP, decoder=decoder)


def beats_of(layer):
    eng_bb = CFG.blocks_per_beat * CFG.layout.block_bytes
    return beat_bytes_of(reference.input_beats(CFG, layer.headers, layer.codes), eng_bb)


def expected_checksum(layers):
    beats = [beat for layer in layers for beat in layer.expected(CFG)]
    return wire.values_checksum(beats, reference.lane_word_bits(CFG))


def send_layers(link, layers):
    for layer in layers:
        link.load_layer(layer.luts, layer.offset)
        link.blocks(beats_of(layer), swap=True)


@pytest.fixture(scope="module")
def minilm_layer():
    name, stream, _ = model_layer("minilm", "sop4-g16", "encoder.layer.0.attention.self.query.weight", rows=8)
    return from_stream(CFG, stream, name)


# -- host-side frame code -------------------------------------------------------------
def test_frame_encoding_and_crc_residue():
    frame = encode_frame(Cmd.OFFSET, b"\xfe")
    assert frame[:4] == bytes([0x55, Cmd.OFFSET, 1, 0]) and len(frame) == 4 + 1 + 4
    assert struct.unpack("<I", frame[-4:])[0] == crc32(frame[1:-4])
    crc = 0xFFFFFFFF                               # the gateware's check: data + CRC leaves the residue
    for b in frame[1:]:
        crc = wire.crc32_update_byte(crc, b)
    assert crc == 0xDEBB20E3
    assert wire.values_checksum([[1, 2], [0x1234, 0]], 16) == (4, crc32(bytes.fromhex("0100020034120000")))


def test_a_lane_word_takes_whole_bytes_in_the_checksum():
    """A 21-bit exact lane (sop4-g16-exact) is 3 bytes, LE: its top bits are checked too, not dropped."""
    assert [wire.lane_bytes(b) for b in (1, 8, 9, 16, 21)] == [1, 1, 2, 2, 3]
    assert wire.values_checksum([[0x1FA240]], 21) == (1, crc32(bytes.fromhex("40a21f")))


# -- through the byte streams -------------------------------------------------------------
def test_status_reports_the_configuration():
    link = stream_link(make_engine())
    st = link.status()
    assert (st.version, st.lanes, st.code_bits, st.group, st.beat_bytes, st.lane_bytes, st.hif_bits,
            st.banks, st.max_payload, st.errors) == (wire.PROTOCOL_VERSION, 2, 4, 16, 9, 2, 10, 2, 64, 0)
    # what it decodes: sop4-g16's format id (golden.layout.format_id; tests/test_layout.py pins its value)
    assert st.format_id == get_point("sop4-g16").format_id == SOP4_G16_FORMAT_ID


def test_minilm_layer_and_random_layers_decode_bit_exact(minilm_layer):
    """A real MiniLM layer (8 rows) then two random layers, each with a table swap; checksums per layer."""
    link = stream_link(make_engine())
    rng = np.random.default_rng(5)
    layers = [minilm_layer, random_layer(CFG, rng, 6), random_layer(CFG, rng, 5)]
    assert len(minilm_layer.headers) == 8 * 384 // 16
    for layer in layers:
        send_layers(link, [layer])
        assert link.checksum(clear=True) == expected_checksum([layer]), layer.name
    assert link.checksum() == (0, 0)               # cleared: nothing since
    assert link.status().errors == 0


def test_next_layer_loads_while_the_current_one_streams():
    """Double buffering as a host uses it: layer B's tables go in after layer A's swap beat."""
    link = stream_link(make_engine())
    rng = np.random.default_rng(9)
    a, b = random_layer(CFG, rng, 12), random_layer(CFG, rng, 7)
    link.load_layer(a.luts, a.offset)
    beats = beats_of(a)
    link.blocks(beats[:2], swap=True)
    link.load_layer(b.luts, b.offset)              # into the page A's beats do not read
    link.blocks(beats[2:], swap=False)
    link.blocks(beats_of(b), swap=True)
    assert link.checksum() == expected_checksum([a, b])


def test_a_wrong_decoder_is_caught():
    """The checksum shows a decoder with one flipped LUT bit (tests/mutants.py)."""
    layer = random_layer(CFG, np.random.default_rng(6), 6)
    link = stream_link(make_engine(Decoder(CFG, bank=mutants.FlippedLutBit)))
    send_layers(link, [layer])
    assert link.checksum() != expected_checksum([layer])


def test_every_bad_input_gets_an_error_reply_and_the_next_command_works():
    link = stream_link(make_engine())
    good = random_layer(CFG, np.random.default_rng(7), 3)
    link.load_layer(good.luts, good.offset)
    cases = {
        "garbage": (b"\x00\x13\xaa\xff" * 5, Err.GARBAGE),
        "truncated": (encode_frame(Cmd.OFFSET, b"\x01")[:-2], Err.TIMEOUT),
        "bad crc": (encode_frame(Cmd.OFFSET, b"\x01")[:-1] + b"\x00", Err.BAD_CRC),
        # the rest of the oversized frame follows: dropped without a second (GARBAGE) reply
        "oversized": (bytes([0x55, Cmd.BLOCKS]) + struct.pack("<H", MAX_PAYLOAD + 1) + bytes(range(1, 71)),
                      Err.OVERSIZE),
        "unknown command": (encode_frame(0x42, b"abc"), Err.UNKNOWN_CMD),
        "load not whole entries": (encode_frame(Cmd.LOAD, b"\x00\x01"), Err.BAD_LENGTH),
        "blocks not whole beats": (encode_frame(Cmd.BLOCKS, b"\x01" + bytes(10)), Err.BAD_LENGTH),
        "offset too long": (encode_frame(Cmd.OFFSET, b"\x01\x02"), Err.BAD_LENGTH),
    }
    for n, (what, (raw, code)) in enumerate(cases.items(), start=1):
        link.transport.write(raw)
        assert link.error_reply() == code, what
        link.resync()
        assert link.status().errors == n, what
    # nothing bad reached the decoder: the layer decodes exactly
    link.blocks(beats_of(good), swap=True)
    assert link.checksum() == expected_checksum([good])


def test_truncated_frame_then_good_frame_without_waiting():
    """The good frame is swallowed by the half frame (BAD_CRC); after resync the link works."""
    link = stream_link(make_engine())
    link.transport.write(encode_frame(Cmd.OFFSET, b"\x01")[:5] + encode_frame(Cmd.STATUS))
    with pytest.raises(BoardError) as err:
        link.reply(Cmd.STATUS)
    assert err.value.code in (Err.BAD_CRC, Err.TIMEOUT)
    link.resync()
    assert link.status().lanes == 2


def test_error_replies_raise_board_error():
    link = stream_link(make_engine())
    with pytest.raises(BoardError, match="UNKNOWN_CMD"):
        link.command(0x33)
    with pytest.raises(BoardError, match="BAD_LENGTH"):
        link.command(Cmd.STATUS, b"\x00")


def test_host_times_out_with_a_clear_message_when_nothing_answers():
    engine = make_engine()
    port = SimSerial(engine, period=PERIOD)        # no bridge: the engine never sees a byte
    link = BoardLink(port, timeout=500 * PERIOD)
    with pytest.raises(BoardTimeout, match="no reply from the board .* check the port"):
        link.status()


# -- through the UART pins --------------------------------------------------------------
def test_end_to_end_through_the_uart_pins():
    divisor = 4
    core = BoardCore(CFG, clk_freq=1 / PERIOD, baud=1 / PERIOD / divisor, gap_cycles=40 * divisor,
                     max_payload=MAX_PAYLOAD)
    link = uart_link(core, divisor)
    assert link.status().beat_bytes == 9
    layer = random_layer(CFG, np.random.default_rng(8), 4)
    send_layers(link, [layer])
    assert link.checksum() == expected_checksum([layer])
    link.transport.write(encode_frame(Cmd.OFFSET, b"\x01")[:-1] + b"\x00")
    assert link.error_reply() == Err.BAD_CRC
    link.resync()
    assert link.status().errors == 1


# -- board tops --------------------------------------------------------------------------
PINS = {"icebreaker": ("set_io uart_0__rx__io 6", "set_io uart_0__tx__io 9"),
        "ulx3s": ('LOCATE COMP "uart_0__rx__io" SITE "M1"', 'LOCATE COMP "uart_0__tx__io" SITE "L4"')}
DECODER_BOARDS = [name for name, board in BOARDS.items() if board.decoder]     # icebreaker, ulx3s


@pytest.mark.parametrize("board", DECODER_BOARDS)
def test_board_tops_prepare_for_their_platforms(board):
    """The top elaborates against the platform (clock, UART and LED resources) and yields a build plan."""
    plan = elaborate_for(board)
    constraints = plan.files[f"sop_{board}.pcf" if board == "icebreaker" else f"sop_{board}.lpf"]
    for pin in PINS[board]:
        assert pin in constraints
    rtlil = plan.files[f"sop_{board}.il"]
    assert "decoder" in rtlil and "uart_rx" in rtlil and "uart_tx" in rtlil
    assert BOARDS[board].config().lanes == {"icebreaker": 2, "ulx3s": 8}[board]


def test_the_gemv_only_top_prepares_for_the_icebreaker():
    """``icebreaker-gemv``: the iCEBreaker's pins, the UART and the GEMV engine, nothing of the decoder
    (no decoder, values CRC or sparse queue) and no residual path (no term unit, no entry queue: the
    UP5K's room); its engine (folded, the compact adder) and y FIFO are the board entry's."""
    board = BOARDS["icebreaker-gemv"]
    assert (board.kit, board.decoder, board.config(), board.top_name) == ("icebreaker", False, None,
                                                                           "sop_icebreaker_gemv")
    plan = elaborate_for("icebreaker-gemv")
    constraints = plan.files["sop_icebreaker_gemv.pcf"]
    for pin in PINS["icebreaker"]:
        assert pin in constraints
    rtlil = plan.files["sop_icebreaker_gemv.il"]
    assert "uart_rx" in rtlil and "uart_tx" in rtlil and "y_fifo" in rtlil and "block_dot" in rtlil
    for part in ("decoder", "v_crc", "sparse_queue", "modb", "entry_queue", "residual_term"):
        assert part not in rtlil, part
    gemv = board.gemv_config()
    assert (gemv.max_cols, gemv.max_rows, gemv.dot_lanes, gemv.dot_tail, gemv.acc_adder, gemv.tile,
            gemv.sparse) == (2048, 1536, 1, "serial", "compact", 4, False)
    assert board.gemv_args() == {"gemv": gemv, "gemv_y_depth": 384}      # (GEMV_STATUS reports it: below)
    with pytest.raises(ValueError, match="board icebreaker-gemv has no decoder: residual adders"):
        board.config(1)


# -- an engine without the decoder (the iCEBreaker's GEMV-only core) -----------------------------
@pytest.fixture(scope="module")
def gemv_only_link():
    """The host on the byte streams of ``icebreaker-gemv``'s protocol engine (no decoder, its GEMV engine)."""
    return stream_link(ProtocolEngine(None, max_payload=MAX_PAYLOAD, gap_cycles=GAP,
                                      **BOARDS["icebreaker-gemv"].gemv_args()))


def test_a_core_without_the_decoder_answers_its_commands_unknown_cmd(gemv_only_link):
    """Every decoder command (well-formed for a decoder) gets UNKNOWN_CMD and executes nothing, and so
    does GEMV_SPARSE (this engine has no residual path); STATUS says 0 lanes (no decoder) with the
    engine's point, and counts the error replies; GEMV_STATUS answers."""
    link = gemv_only_link
    before = link.status()
    assert (before.version, before.lanes, before.code_bits, before.group, before.beat_bytes, before.lane_bytes,
            before.hif_bits, before.banks, before.max_payload) == (wire.PROTOCOL_VERSION, 0, 4, 16, 0, 0, 10, 2,
                                                                    MAX_PAYLOAD)
    assert before.format_id == SOP4_G16_FORMAT_ID           # its engine's point: sop4-g16
    decoder_commands = [(Cmd.LOAD, bytes(3)), (Cmd.OFFSET, b"\x00"), (Cmd.OFFSET, bytes([0, 1])),
                        (Cmd.BLOCKS, bytes(1 + 9)), (Cmd.CHECKSUM, b""), (Cmd.CHECKSUM, b"\x01"),
                        (Cmd.SPARSE, b"\x01" + bytes(6)), (Cmd.SPARSE_STATUS, b""),
                        (Cmd.GEMV_SPARSE, bytes(struct.calcsize(wire.GEMV_ENTRY_FORMAT)))]
    for cmd, payload in decoder_commands:
        with pytest.raises(BoardError, match=f"UNKNOWN_CMD .frame command {cmd:#04x}. to {cmd.name}") as err:
            link.command(cmd, payload)
        assert (err.value.code, err.value.cmd) == (Err.UNKNOWN_CMD, cmd)
    assert link.status().errors == before.errors + len(decoder_commands)
    assert link.gemv_status().group == 16 and link.gemv_status().y_depth == 384


def test_an_engine_without_the_decoder_needs_the_gemv_engine():
    with pytest.raises(ValueError, match="without a decoder .config None. needs the GEMV engine"):
        ProtocolEngine(None)
    with pytest.raises(ValueError, match="and takes no decoder"):
        ProtocolEngine(None, decoder=object(), gemv=BOARDS["icebreaker-gemv"].gemv_config())


# -- sparse residuals (a decoder with the residual path) ----------------------------------------
RCFG = replace(CFG, residuals=1)
QUEUE = 32                     # the engine's sparse queue in these tests (the boards have 64)
STALL = 2048                   # cycles without decoder progress before STALLED


def sparse_engine(engine_class=ProtocolEngine):
    return engine_class(RCFG, max_payload=MAX_PAYLOAD, gap_cycles=GAP, sparse_queue=QUEUE, stall_cycles=STALL)


def sparse_link(engine):
    return BoardLink(stream_port(engine, period=PERIOD), timeout=4 * STALL * PERIOD, max_payload=MAX_PAYLOAD)


def entries_of(layer):
    return list(zip(layer.sparse_index.tolist(), layer.sparse_values.tolist()))


def send_sparse_layer(link, layer, entries=None):
    link.load_layer(layer.luts, layer.offset, sparse=True)
    link.sparse_layer(beats_of(layer), entries_of(layer) if entries is None else entries,
                      RCFG.blocks_per_beat * RCFG.layout.group, QUEUE)


def test_the_sparse_numbers_are_the_decoders():
    assert RCFG.sparse_layout.size == 8 * wire.SPARSE_ENTRY_BYTES + 1      # index, value, last
    assert wire.SparseStatus(1, 0b1010, 64).error_names() == ["past_layer", "not_finite"]
    frame = encode_frame(Cmd.SPARSE, bytes([wire.LAST_FLAG]) + struct.pack("<IH", 383, 0x3F80))
    assert frame[1:4] == bytes([Cmd.SPARSE, 7, 0])


def test_the_error_bits_are_hdls_in_the_order_the_wire_docs_state():
    """The sticky error bits' names are defined once, in hdl (plain Python: the host needs no Amaranth);
    the hardware's layouts are built from them, bit ``i`` the ``i``-th name, the wire's replies name
    them the same, and docs/board-protocol.md states the same bit order for both replies."""
    from pathlib import Path

    from sop.hdl import GEMV_ERRORS, SPARSE_ERRORS, gemv_config

    assert (wire.SPARSE_ERRORS, wire.GEMV_ERRORS, sparse_merge.ERRORS) == (SPARSE_ERRORS, GEMV_ERRORS, SPARSE_ERRORS)
    for names, layout in ((SPARSE_ERRORS, sparse_merge.error_layout()), (GEMV_ERRORS, gemv_config.error_layout())):
        assert [(n, f.offset, f.width) for n, f in layout] == [(n, i, 1) for i, n in enumerate(names)]
    doc = (Path(__file__).resolve().parent.parent / "docs" / "board-protocol.md").read_text()
    for names in (SPARSE_ERRORS, GEMV_ERRORS):
        stated = "bit " + ", ".join(f"{i} `{n}`" for i, n in enumerate(names))
        assert stated in doc, stated


def test_a_decoder_without_the_residual_path_refuses_the_sparse_commands():
    """The old engine, unchanged: SPARSE and SPARSE_STATUS unknown, OFFSET 1 byte only."""
    link = stream_link(make_engine())
    for cmd, payload, code in [(Cmd.SPARSE, b"\x01" + bytes(6), Err.UNKNOWN_CMD),
                               (Cmd.SPARSE_STATUS, b"", Err.UNKNOWN_CMD),
                               (Cmd.OFFSET, bytes([0, wire.SPARSE_LAYER_FLAG]), Err.BAD_LENGTH)]:
        with pytest.raises(BoardError) as err:
            link.command(cmd, payload)
        assert err.value.code == code, cmd


def test_sparse_layers_decode_bit_exact_with_the_residuals():
    """Entries of every kind (random, bursts in one beat, block and beat boundaries, the layer's ends and
    its swap beat, every value), a layer without entries between, in frames cut to the queue: golden's
    values."""
    link = sparse_link(sparse_engine())
    assert link.sparse_status() == wire.SparseStatus(1, 0, QUEUE)
    rng = np.random.default_rng(11)
    for pattern, density in [("random", 0.1), ("burst", 0.1), ("boundaries", 0), ("ends", 0), (None, 0),
                             ("values", 0.25), ("random", 1.0)]:
        layer = random_layer(RCFG, rng, 10 if density < 1 else 4)
        if pattern is None:
            send_layers(link, [layer])
        else:
            layer = with_sparse(RCFG, layer, rng, pattern, density=density)
            send_sparse_layer(link, layer)
        assert link.checksum(clear=True) == expected_checksum([layer]), (pattern, density)
    assert link.sparse_status().errors == 0 and link.status().errors == 0


@pytest.mark.parametrize("payload, flags", [
    ("order", [(40, 0x3F80), (20, 0x3F80)]),              # not strictly increasing
    ("not_finite", [(3, 0x7F80), (9, 0x3F80)]),           # +Inf
    ("no_layer", None),                                   # entries for a layer loaded without its flag
])
def test_the_decoder_flags_bad_entries_and_the_host_reads_the_bits(payload, flags):
    link = sparse_link(sparse_engine())
    layer = random_layer(RCFG, np.random.default_rng(12), 4)
    if flags is None:
        link.load_layer(layer.luts, layer.offset)                   # layer_sparse 0
        link.blocks(beats_of(layer), swap=True)
        link.sparse([(5, 0x3F80)], last=True)
    else:
        send_sparse_layer(link, layer, flags)
    link.checksum(clear=True)
    assert link.sparse_status().error_names() == [payload]


def test_bad_sparse_frames_get_error_replies():
    link = sparse_link(sparse_engine())
    for cmd, payload in [(Cmd.SPARSE, b"\x01"), (Cmd.SPARSE, b"\x01" + bytes(7)), (Cmd.SPARSE, bytes(6)),
                         (Cmd.SPARSE_STATUS, b"\x00"), (Cmd.OFFSET, bytes(3))]:
        with pytest.raises(BoardError) as err:
            link.command(cmd, payload)
        assert err.value.code == Err.BAD_LENGTH, (cmd, payload)
    assert link.sparse_status().errors == 0 and link.status().errors == 5


def test_missing_entries_end_in_stalled_not_a_hang():
    """A sparse layer whose entries never come stops the decoder: BLOCKS is answered STALLED
    (within the stall time), the engine keeps answering, and the entries sent late finish it."""
    link = sparse_link(sparse_engine())
    layer = with_sparse(RCFG, random_layer(RCFG, np.random.default_rng(13), 8), np.random.default_rng(1), "ends")
    link.load_layer(layer.luts, layer.offset, sparse=True)
    beats = beats_of(layer)
    link.blocks(beats[:1], swap=True)
    with pytest.raises(BoardError) as err:
        link.blocks(beats[1:], swap=False)
    assert err.value.code == Err.STALLED
    assert link.status().errors == 1 and link.sparse_status().errors == 0
    link.sparse(entries_of(layer), last=True)                       # the decoder goes on
    assert link.checksum(clear=True)[0] >= 16                       # the beats it had taken
    link.load_layer(layer.luts, layer.offset, sparse=True)          # a `last` never sent: stalls too
    link.blocks(beats[:1], swap=True)
    link.sparse([(1, 0x3F80)], last=False)
    with pytest.raises(BoardError) as err:
        link.blocks(beats[1:], swap=False)
        link.checksum()
    assert err.value.code == Err.STALLED


class DropsLast(ProtocolEngine):
    """A broken engine: the queue loses ``last`` (the decoder never learns the layer's entries ended)."""

    def sparse_word(self, entry, last):
        return super().sparse_word(entry, Const(0, 1))


def test_an_engine_that_drops_last_is_caught():
    link = sparse_link(sparse_engine(DropsLast))
    layer = with_sparse(RCFG, random_layer(RCFG, np.random.default_rng(14), 6), np.random.default_rng(2), "random")
    with pytest.raises(BoardError, match="STALLED"):
        send_sparse_layer(link, layer)
        link.checksum()
