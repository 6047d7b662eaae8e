"""The board protocol end to end: synth/host/client.py's BoardLink driving synth/gateware/protocol.py
(+ the decoder) in amaranth.sim.

The host code is the one a real board uses; its transport here is a byte
queue bridged into the simulation (synth/gateware/simboard.py's ``SimSerial``), either
straight onto the engine's byte streams (most tests: one byte per cycle) or
through the UART pins of ``BoardCore`` (bit-banged by the testbench, an
independent UART model). Timeouts are in simulated seconds. Expected values
come from golden/ only (hdl.reference); the board reports a CRC-32 and a count
of the decoded words, compared with the host's own over the expected words.
"""

import struct

import numpy as np
import pytest

import mutants

from sop.golden.layout import named_layouts
from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.hdl.decoder import Decoder
from sop.sim.stimulus import from_stream, random_layer
from sop.golden.files import crc32
from sop.synth import wire
from sop.synth.gateware.board import BOARDS, BoardCore, elaborate_for
from sop.synth.gateware.protocol import ProtocolEngine
from sop.synth.gateware.simboard import SimSerial, stream_port, uart_port, uart_timeout
from sop.synth.host.bringup import model_layer_stream
from sop.synth.host.client import BoardError, BoardLink, BoardTimeout, beat_bytes_of
from sop.synth.wire import Cmd, Err, encode_frame

CFG = DecoderConfig("board", 2, named_layouts()["sop4-g16"])
PERIOD = 1e-6                  # simulated clock: 1 MHz
GAP = 64                       # the engine's byte-gap timeout, cycles
MAX_PAYLOAD = 64


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
    name, stream = model_layer_stream("minilm", "sop4-g16", "encoder.layer.0.attention.self.query.weight", rows=8)
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


# -- through the byte streams -------------------------------------------------------------
def test_status_reports_the_configuration():
    link = stream_link(make_engine())
    st = link.status()
    assert (st.version, st.lanes, st.code_bits, st.group, st.beat_bytes, st.lane_bytes, st.hif_bits,
            st.banks, st.max_payload, st.errors) == (wire.PROTOCOL_VERSION, 2, 4, 16, 9, 2, 10, 2, 64, 0)


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


@pytest.mark.parametrize("board", BOARDS)
def test_board_tops_prepare_for_their_platforms(board):
    """The top elaborates against the platform (clock, UART and LED resources) and yields a build plan."""
    plan = elaborate_for(board)
    constraints = plan.files[f"sop_{board}.pcf" if board == "icebreaker" else f"sop_{board}.lpf"]
    for pin in PINS[board]:
        assert pin in constraints
    rtlil = plan.files[f"sop_{board}.il"]
    assert "decoder" in rtlil and "uart_rx" in rtlil and "uart_tx" in rtlil
    assert BOARDS[board].config().lanes == {"icebreaker": 2, "ulx3s": 8}[board]
