"""The board's GEMV engine through the protocol (synth/gateware/gemv_port.py, synth/host/gemv_bringup.py).

The ULX3S board's ``ProtocolEngine`` (its decoder and its GEMV engine, the
configuration ``make bitstream BOARD=ulx3s`` builds) runs in amaranth.sim on its
byte streams (synth/gateware/simboard.py's ``stream_port``: no UART, one byte a
cycle; the UART path is ``make sim``'s, python -m sop.synth.host.gemv_bringup
--sim). A real MiniLM layer slice (the layer-0 query, one tile of 17 rows, or one
row where the result does not matter) with its real input for a token (MiniLM's
forward pass, rounded to E4M3) goes through ``run_gemv``; the board's y words
must equal golden.dot.gemv's bit for bit. Checked too: that a board whose y words
are wrong, or whose engine reports an error bit, is caught; the bad inputs (y read
before x, a NaN code, a short vector: the host's one-line refusal, and the
engine's sticky bits when sent past it); the new commands' length checks and a
wait on the engine ending in STALLED; a board without the engine (the
iCEBreaker's core) named as such; ``sop board --gemv``'s output and exit codes.
"""

import re
import struct

import numpy as np
import pytest

from sop import cli
from sop.golden import dot
from sop.synth import wire
from sop.synth.gateware.board import BOARDS
from sop.synth.gateware.gemv_port import GemvPort
from sop.synth.gateware import protocol
from sop.synth.gateware.protocol import ProtocolEngine
from sop.synth.gateware.simboard import stream_port
from sop.synth.host import client, gemv_bringup
from sop.synth.host.bringup import BoardConfigError
from sop.synth.host.client import BoardError, BoardLink
from sop.synth.wire import Cmd, Err, encode_frame

LAYER = gemv_bringup.SIM_LAYER
FMT = "sop4-g16"
PERIOD = 1e-6
TIMEOUT = 3000 * PERIOD        # host timeout in simulated seconds: a frame and its reply, with room
ULX3S = BOARDS["ulx3s"]


def board_engine(port: GemvPort | None = None, **kw) -> ProtocolEngine:
    """The ULX3S board's protocol engine: its decoder and GEMV engine (or ``port``, a broken one)."""
    extra = {"gemv_port": port} if port is not None else {"gemv": ULX3S.gemv_config()}
    return ProtocolEngine(ULX3S.config(), stall_cycles=2048, **extra, **kw)


@pytest.fixture(scope="module")
def layer():
    """(name, 17-row stream, its first row, real x codes, where x comes from)."""
    name, stream = gemv_bringup.gemv_layer_stream("minilm", FMT, LAYER, 17)
    _, row = gemv_bringup.gemv_layer_stream("minilm", FMT, LAYER, 1)
    x, source = gemv_bringup.layer_activation(name, stream.cols)
    return name, stream, row, dot.activation_codes(x, "e4m3"), source


def run(engine, stream, codes, **kw):
    port = stream_port(engine, period=PERIOD)
    return gemv_bringup.run_gemv(port, stream, codes, FMT, timeout=TIMEOUT, clock=port.now, **kw)


def test_a_real_minilm_tile_is_bit_exact_through_the_protocol(layer):
    name, stream, _, codes, source = layer
    assert source.startswith("MiniLM's input")
    result = run(board_engine(), stream, codes, name=name, x_source=source)
    assert result.ok, "\n".join(result.lines())
    assert result.got.tolist() == dot.gemv(stream, dot.ACT_FORMATS["e4m3"].decode(codes).astype(np.float32),
                                           "e4m3").view(np.uint32).tolist()
    en = result.engine
    assert en.blocks == stream.rows * stream.cols // 16 and not en.x_loaded and en.y_waiting == 0
    assert en.offered_cycles >= en.blocks and en.pass_cycles > en.offered_cycles
    rel, _ = result.relative_error()
    assert 0 < rel < 1e-5                     # FP32 rounding against float64
    text = "\n".join(result.lines())
    assert "17 of 17 y words bit-exact" in text and "MACs per active cycle" in text and "bytes/s" in text


class WrongWord(GemvPort):
    """A board that flips the LSB of every y word on its way into the FIFO."""

    def y_word(self, value):
        return value ^ 1


class ReportsAnError(GemvPort):
    """A board whose GEMV_STATUS always reports the engine's ``x_length`` bit."""

    def status_payload(self):
        payload = super().status_payload()
        payload[1] = payload[1] | 0b10
        return payload


def test_a_wrong_y_word_and_an_engine_error_are_caught(layer):
    name, _, row, codes, _ = layer
    wrong = run(board_engine(WrongWord(ULX3S.gemv_config())), row, codes, name=name)
    assert not wrong.ok and not wrong.exact and "MISMATCH" in "\n".join(wrong.lines())
    flagged = run(board_engine(ReportsAnError(ULX3S.gemv_config())), row, codes, name=name)
    assert flagged.exact and not flagged.ok and flagged.errors == ["x_length"]
    assert "ENGINE ERROR" in "\n".join(flagged.lines())


def test_bad_x_is_refused_by_the_host_and_flagged_by_the_engine_past_it(layer):
    name, _, row, codes, _ = layer
    with pytest.raises(ValueError, match="length 368, the layer has 384 columns"):
        gemv_bringup.check_x(codes[:-16], row.cols)
    nan = codes.copy()
    nan[7] = 0xFF
    with pytest.raises(ValueError, match=r"x\[7\] is an E4M3 NaN"):
        gemv_bringup.check_x(nan, row.cols)
    engine = board_engine()
    port = stream_port(engine, period=PERIOD)
    link = BoardLink(port, timeout=TIMEOUT)
    with pytest.raises(BoardError, match="no vector is loaded") as err:       # y before x
        link.read_y(1)
    assert err.value.code == Err.NO_Y
    for bad, bit in ((nan, "x_nan"), (codes[:-16], "x_length")):
        result = gemv_bringup.run_gemv(port, row, bad, FMT, timeout=TIMEOUT, clock=port.now, check=False)
        assert result.errors == [bit] and not result.ok
    assert gemv_bringup.run_gemv(port, row, codes, FMT, timeout=TIMEOUT, clock=port.now).ok   # cleared, works


def test_the_new_commands_check_lengths_and_a_wait_ends_in_stalled():
    link = BoardLink(stream_port(board_engine(), period=PERIOD), timeout=TIMEOUT)
    for cmd, payload in [(Cmd.GEMV_LOAD, b"\x00\x00"), (Cmd.GEMV_LAYER, bytes(4)), (Cmd.GEMV_X, bytes(16)),
                         (Cmd.GEMV_X, bytes(18)), (Cmd.GEMV_W, bytes(10)), (Cmd.GEMV_Y, b"\x01"),
                         (Cmd.GEMV_STATUS, b"\x00\x00")]:
        link.send(cmd, payload)
        assert link.error_reply() == Err.BAD_LENGTH, cmd.name
    link.send(Cmd.GEMV_W, bytes(9))                  # a block with no vector loaded: the engine waits
    assert link.error_reply() == Err.STALLED
    st = link.gemv_status(clear=True)
    assert st.error_names() == ["w_before_x"] and (st.group, st.tile, st.max_cols, st.max_rows) == (16, 17, 2048, 1536)
    assert link.gemv_status().errors == 0
    with pytest.raises(BoardError, match="NO_Y"):
        link.gemv_y(4)
    assert link.status().version == wire.PROTOCOL_VERSION        # the decoder's commands still answer


def test_a_board_without_the_engine_is_named(layer):
    name, _, row, codes, _ = layer
    engine = ProtocolEngine(BOARDS["icebreaker"].config())
    assert engine.gemv is None and BOARDS["icebreaker"].gemv_config() is None
    with pytest.raises(BoardConfigError, match="this board has no GEMV engine.*iCEBreaker"):
        run(engine, row, codes, name=name)


def cli_board(monkeypatch, engine, *extra):
    port = stream_port(engine, period=PERIOD)
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: port)
    return cli.main(["board", "--port", "sim", "minilm", "--format", FMT, "--layer", LAYER, "--rows", "1",
                     "--gemv", "--timeout", str(TIMEOUT), *extra])


def test_sop_board_gemv_prints_ok_and_exits_0_else_1(monkeypatch, capsys):
    assert cli_board(monkeypatch, board_engine()) == 0
    out = capsys.readouterr().out
    assert "result: OK: 1 of 1 y words bit-exact" in out and "error against float64" in out
    assert cli_board(monkeypatch, board_engine(WrongWord(ULX3S.gemv_config()))) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert cli_board(monkeypatch, ProtocolEngine(BOARDS["icebreaker"].config())) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this board has no GEMV engine" in err[0]


def test_sop_board_gemv_refuses_a_layer_too_large_with_one_line(monkeypatch, capsys):
    big = struct.pack(wire.GEMV_STATUS_FORMAT, 0, 0, 16, 17, 256, 1536, 0, 1536, 0, 0, 0)
    status = bytes(protocol.status_bytes(ULX3S.config(), wire.DEFAULT_MAX_PAYLOAD) + [0, 0])
    replies = [encode_frame(Cmd.STATUS | wire.REPLY_BIT, status), encode_frame(Cmd.GEMV_STATUS | wire.REPLY_BIT, big)]

    class Canned:
        def __init__(self):
            self.out = bytearray(b"".join(replies))

        def write(self, data):
            pass

        def read(self, n, timeout):
            chunk, self.out[:n] = bytes(self.out[:n]), b""
            return chunk

        def close(self):
            pass

    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: Canned())
    assert cli.main(["board", "--port", "sim", "minilm", "--format", FMT, "--layer", LAYER, "--rows", "1",
                     "--gemv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sop: error: ") and "larger than the board's GEMV engine" in err[0]


@pytest.mark.parametrize("values, message", [
    (np.ones(368, np.float32), "X has 368 entries per vector; layer .* takes 384"),
    (np.where(np.arange(384) == 9, np.nan, 1).astype(np.float32), r"x\[9\] = nan is not finite"),
    (np.full(384, 0.3, np.float32), r"not exactly representable in e4m3"),
])
def test_sop_board_gemv_refuses_a_bad_x_with_one_line_before_the_port(tmp_path, monkeypatch, capsys, values,
                                                                       message):
    path = tmp_path / "x.npy"
    np.save(path, values)
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: pytest.fail("the port was opened"))
    assert cli.main(["board", "--port", "sim", "minilm", "--format", FMT, "--layer", LAYER, "--rows", "1",
                     "--gemv", "--x", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sop: error: ")
    assert re.search(message, err[0]), err[0]
