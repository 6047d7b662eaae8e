"""The board's GEMV engine through the protocol (synth/gateware/gemv_port.py, synth/host/gemv_bringup.py).

The ULX3S board's ``ProtocolEngine`` (its decoder and its GEMV engine, the
configuration ``make bitstream BOARD=ulx3s`` builds) runs in amaranth.sim on its
byte streams (synth/gateware/simboard.py's ``stream_port``: no UART, one byte a
cycle; the UART path is ``make sim``'s, python -m sop.synth.host.gemv_bringup
--sim). A real MiniLM layer slice (the layer-0 query, one tile of 17 rows, or one
row where the result does not matter) with its real input for a token (MiniLM's
forward pass, rounded to E4M3) goes through ``run_gemv``; the board's y words
must equal golden.dot.gemv's bit for bit. So must a sop-budget MiniLM layer's
first 18 rows (two row tiles) with their sparse residual entries (GEMV_SPARSE
frames after each tile's blocks). Checked too: that a board whose y words are
wrong, or whose engine reports an error bit, and a host that drops a sparse entry,
are caught; the bad inputs (y read before x, a NaN code, a short vector, a sparse
entry beyond the layer: the host's one-line refusal, and the engine's sticky bits
when sent past it); the new commands' length checks and waits on the engine
ending in STALLED (entries left in the queue dropped by GEMV_STATUS's clear); a
board without the engine (the iCEBreaker's core) named as such; ``sop board
--gemv``'s output and exit codes, a ``.sopq``'s default (sparse) layer included.

The iCEBreaker's GEMV-only core (``icebreaker-gemv``: no decoder, its own engine
configuration and y FIFO from synth/gateware/board.py): the same 17-row tile
bit-exact on its protocol engine, a wrong y word in it caught, one row through
its whole ``BoardCore`` (UART pins, ``sim_gemv_board(board=...)``), and ``sop
board --gemv`` on it OK (a decode run, ``sop board``, is refused: tests/test_board_cli.py);
its engine has no residual path: GEMV_STATUS's flags bit 1 says so, the host refuses a layer
with sparse entries in one line, GEMV_SPARSE is UNKNOWN_CMD.
"""

import re
import struct
from dataclasses import replace

import numpy as np
import pytest

from sop import cli
from sop.golden import dot
from sop.golden.layout import Sparse
from sop.synth import wire
from sop.synth.gateware.board import BOARDS
from sop.synth.gateware.gemv_port import GemvPort
from sop.synth.gateware import protocol
from sop.synth.gateware.protocol import ProtocolEngine
from sop.synth.gateware.simboard import stream_port
from sop.synth.host import bringup, client, gemv_bringup
from sop.synth.host.bringup import BoardConfigError
from sop.sim.vectors import crop_rows
from sop.synth.host.client import BoardError, BoardLink
from sop.synth.wire import Cmd, Err, encode_frame

LAYER = gemv_bringup.SIM_LAYER
FMT = "sop4-g16"
PERIOD = 1e-6
TIMEOUT = 3000 * PERIOD        # host timeout in simulated seconds: a frame and its reply, with room
ULX3S = BOARDS["ulx3s"]
ICE = BOARDS["icebreaker-gemv"]                 # the iCEBreaker's GEMV-only core


def board_engine(port: GemvPort | None = None, board=ULX3S, **kw) -> ProtocolEngine:
    """A board's protocol engine (default the ULX3S's: its decoder and GEMV engine; ``icebreaker-gemv``:
    its GEMV engine alone) with the board's engine and y FIFO, or ``port``, a broken one."""
    extra = {"gemv_port": port} if port is not None else board.gemv_args()
    return ProtocolEngine(board.config(), stall_cycles=2048, **extra, **kw)


@pytest.fixture(scope="module")
def layer():
    """(name, 17-row stream, its first row, real x codes, where x comes from)."""
    name, stream, _ = gemv_bringup.gemv_layer_stream("minilm", FMT, LAYER, 17)
    _, row, _ = gemv_bringup.gemv_layer_stream("minilm", FMT, LAYER, 1)
    x, source = gemv_bringup.layer_activation(name, stream.cols)
    return name, stream, row, dot.activation_codes(x, "e4m3"), source


@pytest.fixture(scope="module")
def sparse_layer():
    """(name, its first 18 rows: two row tiles, real x codes) of the sop-budget artifact's default layer
    (bringup.model_layer's: its first with sparse entries)."""
    name, stream, _ = gemv_bringup.gemv_layer_stream(bringup.sparse_model(FMT), FMT, None, 18)
    x, _ = gemv_bringup.layer_activation(name, stream.cols)
    return name, stream, dot.activation_codes(x, "e4m3")


def golden_y(stream, codes):
    return dot.gemv(stream, dot.ACT_FORMATS["e4m3"].decode(codes).astype(np.float32), "e4m3").view(np.uint32)


@pytest.fixture(scope="module")
def board():
    """One simulated ULX3S protocol engine on its byte streams, shared by the tests of correct runs and
    of bad input past the host (each run starts with GEMV_STATUS's clear: no run depends on another's
    state; building the engine once saves 3 s a test)."""
    return stream_port(board_engine(), period=PERIOD)


def run(engine, stream, codes, **kw):
    return on(stream_port(engine, period=PERIOD), stream, codes, **kw)


def on(port, stream, codes, **kw):
    return gemv_bringup.run_gemv(port, stream, codes, FMT, timeout=TIMEOUT, clock=port.now, **kw)


def test_a_real_minilm_tile_is_bit_exact_through_the_protocol(layer, board):
    name, stream, _, codes, source = layer
    assert source.startswith("MiniLM's input")
    result = on(board, stream, codes, name=name, x_source=source)
    assert result.ok, "\n".join(result.lines())
    assert result.got.tolist() == dot.gemv(stream, dot.ACT_FORMATS["e4m3"].decode(codes).astype(np.float32),
                                           "e4m3").view(np.uint32).tolist()
    en = result.engine
    assert en.blocks == stream.rows * stream.cols // 16 and not en.x_loaded and en.y_waiting == 0
    assert en.offered_cycles >= en.blocks and en.pass_cycles > en.offered_cycles
    rel, _ = result.relative_error()
    assert 0 < rel < 1e-5                     # FP32 rounding against float64
    text = "\n".join(result.lines())
    assert "17 of 17 y words bit-exact" in text and "bytes/s" in text
    # g a cycle offered means the engine never held the wire off, not that it computes g MACs a cycle
    assert f"{en.blocks * 16 / en.offered_cycles:.2f} per cycle with a block offered ({en.offered_cycles:,} " \
        f"cycles; 16 when it never held a block off)" in text


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


@pytest.fixture(scope="module")
def wrong_board():
    """A simulated board whose y words are wrong (``WrongWord``), shared as ``board`` is."""
    return stream_port(board_engine(WrongWord(ULX3S.gemv_config())), period=PERIOD)


def test_a_wrong_y_word_and_an_engine_error_are_caught(layer, wrong_board):
    name, _, row, codes, _ = layer
    wrong = on(wrong_board, row, codes, name=name)
    assert not wrong.ok and not wrong.exact and "MISMATCH" in "\n".join(wrong.lines())
    flagged = run(board_engine(ReportsAnError(ULX3S.gemv_config())), row, codes, name=name)
    assert flagged.exact and not flagged.ok and flagged.errors == ["x_length"]
    assert "ENGINE ERROR" in "\n".join(flagged.lines())


def test_bad_x_is_refused_by_the_host_and_flagged_by_the_engine_past_it(layer, board):
    name, _, row, codes, _ = layer
    with pytest.raises(ValueError, match="length 368, the layer has 384 columns"):
        gemv_bringup.check_x(codes[:-16], row.cols)
    nan = codes.copy()
    nan[7] = 0xFF
    with pytest.raises(ValueError, match=r"x\[7\] is an E4M3 NaN"):
        gemv_bringup.check_x(nan, row.cols)
    port = board                                          # every word of earlier runs read: none owed
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
    for cmd, payload in [(Cmd.GEMV_LOAD, b"\x00\x00"), (Cmd.GEMV_LAYER, bytes(4)), (Cmd.GEMV_LAYER, bytes(7)),
                         (Cmd.GEMV_SPARSE, b""), (Cmd.GEMV_SPARSE, bytes(8)), (Cmd.GEMV_X, bytes(16)),
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


def cli_board(monkeypatch, port, *extra):
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: port)
    return cli.main(["board", "--port", "sim", "minilm", "--format", FMT, "--layer", LAYER, "--rows", "1",
                     "--gemv", "--timeout", str(TIMEOUT), *extra])


def test_sop_board_gemv_prints_ok_and_exits_0_else_1(monkeypatch, capsys, board, wrong_board):
    assert cli_board(monkeypatch, board) == 0
    out = capsys.readouterr().out
    assert "result: OK: 1 of 1 y words bit-exact" in out and "error against float64" in out
    assert cli_board(monkeypatch, wrong_board) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert cli_board(monkeypatch, stream_port(ProtocolEngine(BOARDS["icebreaker"].config()), period=PERIOD)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this board has no GEMV engine" in err[0]


def test_a_layer_padded_to_whole_blocks_takes_an_x_of_its_own_width(tmp_path, monkeypatch, capsys, board):
    """A 3 x 40 layer is stored as 3 x 48 (whole blocks of 16): the board's GEMV takes x of 40, as
    `sop gemv` does, and sends +0 for the 8 padding columns, whose codes decode to nonzero weights
    under a block's scale; y and the float64 reference are then the layer's own W x (the host sent the
    padded width's x, random values on the padding included, and refused 40 entries)."""
    from safetensors.numpy import save_file

    from sop.golden.decoder import decode_layer

    rng = np.random.default_rng(8)
    ckpt = tmp_path / "odd.safetensors"
    save_file({"blk.w40.weight": rng.standard_normal((3, 40)).astype(np.float32)}, str(ckpt))
    name, stream, width = gemv_bringup.gemv_layer_stream(str(ckpt), FMT, "blk.w40.weight")
    assert (width, stream.cols) == (40, 48) and decode_layer(stream)[:, 40:].any()   # the padding is not zero
    x = dot.ACT_FORMATS["e4m3"].decode(rng.integers(0, 0x7E, 40)).astype(np.float32)
    codes = gemv_bringup.padded_x(dot.activation_codes(x, "e4m3"), stream.cols)
    assert codes.shape == (48,) and not codes[40:].any()
    result = on(board, stream, codes, name=name, width=width)
    assert result.ok
    np.testing.assert_allclose(result.reference, decode_layer(stream)[:, :40] @ x.astype(np.float64), rtol=1e-12)
    assert "layer: blk.w40.weight (3 x 40, sop4-g16; 48 columns with the padding" in "\n".join(result.lines())
    np.save(tmp_path / "x40.npy", x)
    np.save(tmp_path / "x48.npy", np.zeros(48, np.float32))
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: board)
    argv = ["board", "--port", "sim", str(ckpt), "--format", FMT, "--gemv", "--timeout", str(TIMEOUT), "--x"]
    assert cli.main([*argv, str(tmp_path / "x40.npy")]) == 0
    assert "result: OK: 3 of 3 y words bit-exact" in capsys.readouterr().out
    assert cli.main([*argv, str(tmp_path / "x48.npy")]) == 2
    assert "X has 48 entries per vector; layer blk.w40.weight takes 40" in capsys.readouterr().err


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
    assert len(err) == 1 and err[0].startswith(f"sop: error: {path}: ")          # the file, whatever is wrong
    assert re.search(message, err[0]), err[0]


# -- sparse residuals: GEMV_LAYER's flag, GEMV_SPARSE's entries after each tile's blocks -----------------
def test_a_real_sop_budget_slice_with_sparse_entries_is_bit_exact(sparse_layer, board):
    name, stream, codes = sparse_layer
    tiles = gemv_bringup.gemv_entries(stream, ULX3S.gemv_config().tile)
    assert len(tiles) == 2 and len(stream.sparse) >= 10 and all(tiles)
    result = on(board, stream, codes, name=name)
    assert result.ok, "\n".join(result.lines())
    assert result.got.tolist() == golden_y(stream, codes).tolist()
    assert result.got.tolist() != golden_y(replace(stream, sparse=Sparse()), codes).tolist()  # the entries count
    assert (result.sparse, result.entries_sent) == (len(stream.sparse), sum(map(len, tiles)))
    assert result.engine.blocks == stream.rows * stream.cols // 16 and not result.engine.x_loaded
    assert f"sparse residuals: {len(stream.sparse)} entries" in "\n".join(result.lines())


def test_a_bad_entry_is_refused_by_the_host_and_flagged_by_the_engine_past_it(sparse_layer, board):
    """An entry beyond the layer: refused by the host's check in one line, flagged by the engine
    (``sparse``) past it. Before that run, 64 entries left queued by a stalled GEMV_SPARSE: the run's
    clear drops them (else its tile would take one of them, in range, and nothing would be flagged)."""
    name, stream, codes = sparse_layer
    row = crop_rows(stream, 1)
    bad = gemv_bringup.beyond_the_layer(gemv_bringup.gemv_entries(row, 17), row.cols)
    with pytest.raises(ValueError, match=r"bad sparse entry 0 of row tile 0: column \d+ is outside the layer's "
                                         r"384 columns; not sent to the board"):
        gemv_bringup.check_entries(bad, row, 17)
    port = board
    link = BoardLink(port, timeout=TIMEOUT)
    junk = struct.pack(wire.GEMV_ENTRY_FORMAT, 0, 0, 0x3F80, wire.ENTRY_LAST) * 36
    link.command(Cmd.GEMV_SPARSE, junk)                   # 36 entries queued, no pass takes them
    link.send(Cmd.GEMV_SPARSE, junk)                      # the queue (64) fills: the wait ends
    assert link.error_reply() == Err.STALLED
    flagged = gemv_bringup.run_gemv(port, row, codes, FMT, timeout=TIMEOUT, clock=port.now, check=False,
                                    entries=bad)
    assert flagged.errors == ["sparse"] and not flagged.ok


@pytest.mark.parametrize("tiles, message", [
    ([[(0, 3, 0x3F80, 1)], []], "sparse entries for 2 row tiles [(]1 not empty[)]; the layer's 18 rows make 2 "
                                "tiles of 17, each with entries or none"),
    ([[(1, 3, 0x3F80, 1)] * 17, [(17, 0, 0, 1)]], "entry 0 of row tile 0: row 1, where its round needs row 0"),
    ([[(r, 3, 0x7F80 if r == 5 else 0, 1) for r in range(17)], [(17, 0, 0, 1)]],
     "entry 5 of row tile 0: value 0x7f80 is not a finite BF16 number"),
    ([[(r, 3, 0, 0) for r in range(17)], [(17, 0, 0, 1)]],
     "entry 0 of row tile 0: its row's last entry is not in the tile's last round"),
    ([[(r, 3, 0, 1) for r in range(17)], [(17, 0, 0, 1), (17, 0, 0, 1)]], "entry 0 of row tile 1: its row's last"),
    ([[(r, 3, 0, 1) for r in range(17)] + [(0, 3, 0, 1)], [(17, 0, 0, 1)]], "row tile 0 has 18 sparse entries, not "
                                                                            "whole rounds of its 17 rows"),
])
def test_the_host_refuses_bad_entries_with_one_line(sparse_layer, tiles, message):
    _, stream, _ = sparse_layer
    with pytest.raises(ValueError, match=message):
        gemv_bringup.check_entries(tiles, stream, 17)
    gemv_bringup.check_entries(gemv_bringup.gemv_entries(stream, 17), stream, 17)     # the layer's own pass


def test_sop_board_gemv_takes_a_sopq_default_sparse_layer_and_catches_a_dropped_entry(monkeypatch, capsys,
                                                                                     board):
    """The artifact's default layer (its first with sparse entries), 3 rows: OK. A host that drops a
    tile's first real entry that is not a row's last (the engine still gets every row's last): MISMATCH."""
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: board)
    args = ["board", "--port", "sim", bringup.sparse_model(FMT), "--format", FMT, "--rows", "3", "--gemv",
            "--timeout", str(TIMEOUT)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "layer: encoder.layer.0.attention.output.dense.weight (3 x 384" in out
    assert "result: OK: 3 of 3 y words bit-exact" in out and "sparse residuals: 6 entries (15 sent" in out
    send = BoardLink.gemv_sparse

    def drops_one(self, entries):
        entries = list(entries)
        k = next(i for i, (_, _, value, last) in enumerate(entries) if value and not last)
        return send(self, entries[:k] + entries[k + 1:])
    monkeypatch.setattr(BoardLink, "gemv_sparse", drops_one)
    assert cli.main(args) == 1
    assert "result: MISMATCH" in capsys.readouterr().out


# -- the iCEBreaker's GEMV-only core (icebreaker-gemv: no decoder) ----------------------------------------
@pytest.fixture(scope="module")
def ice_board():
    """One simulated ``icebreaker-gemv`` protocol engine on its byte streams, shared as ``board`` is."""
    return stream_port(board_engine(board=ICE), period=PERIOD)


def test_the_gemv_only_core_runs_a_real_minilm_tile_bit_exact(layer, ice_board):
    """Its STATUS says no decoder (0 lanes) and the engine's point; the layer-0 query's first tile
    (17 rows) is bit-exact against golden.dot.gemv with the board's engine configuration."""
    name, stream, _, codes, source = layer
    result = on(ice_board, stream, codes, name=name, x_source=source)
    assert result.ok, "\n".join(result.lines())
    assert result.got.tolist() == golden_y(stream, codes).tolist()
    assert (result.status.lanes, result.status.code_bits, result.status.group) == (0, 4, 16)
    en = result.engine
    cfg = ICE.gemv_config()
    assert (en.max_cols, en.max_rows, en.y_depth) == (cfg.max_cols, cfg.max_rows, ICE.gemv_y_depth)
    assert en.blocks == stream.rows * stream.cols // 16 and not en.x_loaded and en.y_waiting == 0
    assert "17 of 17 y words bit-exact" in "\n".join(result.lines())


def test_a_wrong_y_word_of_the_gemv_only_core_is_caught(layer):
    name, _, row, codes, _ = layer
    wrong = run(board_engine(WrongWord(ICE.gemv_config(), y_depth=ICE.gemv_y_depth), board=ICE), row, codes,
                name=name)
    assert not wrong.ok and not wrong.exact and "MISMATCH" in "\n".join(wrong.lines())


def test_the_gemv_only_core_through_its_uart_pins(layer):
    """``sim_gemv_board(board="icebreaker-gemv")``: the whole core (UARTs, FIFOs, engine), one row."""
    name, _, row, codes, _ = layer
    port, timeout = gemv_bringup.sim_gemv_board(board="icebreaker-gemv")
    result = gemv_bringup.run_gemv(port, row, codes, FMT, name=name, timeout=timeout, clock=port.now)
    assert result.ok, "\n".join(result.lines())
    assert result.status.lanes == 0 and result.engine.y_depth == ICE.gemv_y_depth
    with pytest.raises(ValueError, match="board 'icebreaker' has no GEMV engine; boards with one: ulx3s, "
                                         "icebreaker-gemv"):
        gemv_bringup.sim_gemv_board(board="icebreaker")


def test_sop_board_gemv_runs_on_the_gemv_only_core(monkeypatch, capsys, ice_board):
    """`sop board --gemv` takes a board without a decoder (tests/test_board_cli.py: `sop board` refuses it)."""
    assert cli_board(monkeypatch, ice_board) == 0
    assert "result: OK: 1 of 1 y words bit-exact" in capsys.readouterr().out


def test_the_gemv_only_core_has_no_residual_path_and_the_host_says_so(sparse_layer, layer, ice_board, board):
    """Its engine has no residual path (the UP5K's room): GEMV_STATUS flags bit 1 says so (the ULX3S's
    does not set it), the host refuses a layer with sparse entries in one line before the layer is
    sent, and GEMV_SPARSE is UNKNOWN_CMD; a layer without them still runs (the first test above)."""
    name, stream, codes = sparse_layer
    with pytest.raises(gemv_bringup.BoardConfigError, match=r"has \d+ sparse residual entries and the board's "
                                                            r"GEMV engine has no residual path") as err:
        on(ice_board, stream, codes, name=name)
    assert "\n" not in str(err.value)
    link = BoardLink(ice_board, timeout=1.0)
    assert not link.gemv_status().residuals and BoardLink(board, timeout=1.0).gemv_status().residuals
    with pytest.raises(BoardError, match="UNKNOWN_CMD"):
        link.gemv_sparse([(0, 0, 0x3F80, 1)])
    lname, _, row, lcodes, _ = layer
    assert on(ice_board, row, lcodes, name=lname).ok             # the board is left usable
