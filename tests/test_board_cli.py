"""`sop board` and synth/host/bringup.py without hardware: the board's whole design in amaranth.sim.

A real MiniLM layer slice (a row or two, so each test takes seconds) goes
through ``run_board`` into a simulated ``BoardCore`` (UART pins bit-banged by
synth/gateware/simboard.py) with the board's decoder configuration, and the board's
checksum must equal golden/'s. The CLI runs with ``client.SerialTransport``
replaced by that simulated board, or on a pseudo-terminal that nobody answers
(a real serial port for pyserial), or on a port that does not exist. Timeouts
of the simulated board are in simulated seconds. The host's robustness on a
hostile line (garbage forever, malformed replies, options that could hang it)
is checked here through the CLI and in tests/test_host_robust.py below it.
A core without a decoder (the iCEBreaker's GEMV-only ``icebreaker-gemv``,
STATUS with 0 lanes) is refused a decode run in one line; the point check a GEMV
run makes of its STATUS is the gateware's (tests/test_board_gemv.py runs it).
"""

import functools
import itertools
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

import mutants
from serial_lines import GARBAGE, fed_pty

from sop import cli
from sop.golden.layout import BlockLayout, Sparse
from sop.golden.points import OperatingPoint, board_points, get_point, registered
from sop.hdl import reference
from sop.hdl.decoder import Decoder
from sop.sim.stimulus import from_stream
from sop.synth import wire
from sop.synth.gateware import protocol
from sop.synth.gateware.board import BOARDS
from sop.synth.host import bringup, client, gemv_bringup

LAYER = "encoder.layer.0.attention.self.query.weight"


def board_args(port="sim", *extra, fmt="sop4-g16", rows=1):
    return ["board", "--port", port, "minilm", "--format", fmt, "--layer", LAYER, "--rows", str(rows),
            *extra]


@pytest.fixture
def sim_port(monkeypatch):
    """Make `sop board` talk to a simulated iCEBreaker core; returns the host timeout it needs."""
    def install(decoder=None):
        port, timeout = bringup.sim_board("icebreaker", decoder=decoder)
        monkeypatch.setattr(client, "SerialTransport", lambda name, baud: port)
        return timeout
    return install


@pytest.mark.parametrize("board", [name for name, board in BOARDS.items() if board.decoder])
def test_run_board_checks_a_real_minilm_layer_through_the_uart(board):
    # the ULX3S core (8 lanes and a GEMV engine beside them) simulates a third as fast: one row, its 48 beats
    rows = 2 if board == "icebreaker" else 1
    name, stream, _ = bringup.model_layer("minilm", "sop4-g16", LAYER, rows=rows)
    port, timeout = bringup.sim_board(board)
    result = bringup.run_board(port, stream, "sop4-g16", name=name, timeout=timeout, clock=port.now)
    assert result.ok and result.got == result.expected
    assert result.values == rows * 384 and (result.rows, result.cols) == (rows, 384)
    assert result.status.lanes == BOARDS[board].lanes
    assert result.wire_bytes > len(stream.blocks)          # the blocks plus frames and replies
    assert 0 < result.values_per_s and 0 < result.bytes_per_s
    text = "\n".join(result.lines())
    assert f"layer: {LAYER} ({rows} x 384, sop4-g16)" in text and f"values checked: {rows * 384}" in text
    assert "result: OK" in text and "bytes/s over the wire" in text


def test_a_padded_layer_names_its_own_width_and_the_padded_one(tmp_path):
    """A 2 x 40 layer goes to the board as 2 x 48 (whole blocks): the output says both widths, and that
    the 16 padding values are among those checked (it said 2 x 48 alone)."""
    from safetensors.numpy import save_file

    ckpt = tmp_path / "odd.safetensors"
    save_file({"w40.weight": np.random.default_rng(9).standard_normal((2, 40)).astype(np.float32)}, str(ckpt))
    name, stream, width = bringup.model_layer(str(ckpt), "sop4-g16")
    port, timeout = bringup.sim_board("icebreaker")
    result = bringup.run_board(port, stream, "sop4-g16", name=name, timeout=timeout, clock=port.now, width=width)
    assert result.ok and (width, result.cols) == (40, 48) and result.values == 96
    text = "\n".join(result.lines())
    assert "layer: w40.weight (2 x 40, sop4-g16; 48 columns with the padding to whole blocks, decoded and " \
           "checked too)" in text and "values checked: 96" in text


def test_cli_prints_ok_and_exits_0(sim_port, capsys):
    timeout = sim_port()
    assert cli.main(board_args("sim", "--timeout", str(timeout))) == 0
    out = capsys.readouterr().out
    assert "values checked: 384" in out and "result: OK" in out and "values/s" in out


def test_a_broken_decoder_gives_mismatch_and_exit_1(sim_port, capsys):
    """One flipped LUT bit (tests/mutants.py) changes the board's CRC: MISMATCH, exit status 1."""
    timeout = sim_port(Decoder(BOARDS["icebreaker"].config(), bank=mutants.FlippedLutBit))
    assert cli.main(board_args("sim", "--timeout", str(timeout))) == 1
    assert "result: MISMATCH" in capsys.readouterr().out


def test_the_make_sim_step_fails_on_a_mismatch(monkeypatch, capsys):
    """`python -m sop.synth.host.bringup --sim` (make sim) exits 1 when the board's checksum differs."""
    broken = Decoder(BOARDS["icebreaker"].config(), bank=mutants.FlippedLutBit)
    monkeypatch.setattr(bringup, "sim_board", functools.partial(bringup.sim_board, decoder=broken))
    assert bringup.main(["--sim", "--model", "minilm", "--rows", "1", "--layer", LAYER]) == 1
    out = capsys.readouterr().out
    assert "simulated icebreaker board core" in out and "result: MISMATCH" in out


@pytest.mark.parametrize("tool, builder, sig", [("bringup", "sim_board", signal.SIGINT),
                                                ("bringup", "sim_board", signal.SIGTERM),
                                                ("gemv_bringup", "sim_gemv_board", signal.SIGINT)])
def test_a_simulated_bring_up_interrupted_is_one_line(tmp_path, tool, builder, sig):
    """Ctrl-C in `python -m sop.synth.host.bringup --sim` (a run of minutes: make sim's last step) was a
    KeyboardInterrupt traceback out of amaranth.sim, SIGTERM ended it without a word (an outside probe):
    now one line, exit 128 + N; the GEMV engine's bring-up the same."""
    from safetensors.numpy import save_file

    model = tmp_path / "w.safetensors"             # 64 rows: a run far longer than the signal takes to come
    save_file({"w.weight": np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)}, str(model))
    # SIGINT as in a terminal: a suite run as a background job hands its children SIGINT ignored; a line on
    # standard output once the simulated board is built, so that the signal lands in the simulation
    child = "\n".join(["import signal, sys", "signal.signal(signal.SIGINT, signal.default_int_handler)",
                       f"from sop.synth.host import {tool} as tool", f"built = tool.{builder}",
                       "def board(*args, **kw):", "    port = built(*args, **kw)",
                       "    print('simulating', flush=True)", "    return port",
                       f"tool.{builder} = board", "sys.exit(tool.main(sys.argv[1:]))"])
    argv = ["--sim", "--model", str(model)] if tool == "bringup" else ["--sim"]      # (GEMV: MiniLM's own x)
    proc = subprocess.Popen([sys.executable, "-c", child, *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert first == "simulating\n", (first, err)
    assert (proc.returncode, err) == (128 + sig, f"python -m sop.synth.host.{tool}: interrupted ({sig.name}); no "
                                                 f"partial file was left\n"), err
    assert "result" not in out, out


@pytest.mark.parametrize("tool", [bringup, gemv_bringup], ids=["decoder", "engine"])
@pytest.mark.parametrize("divisor", ["218", "1" + "0" * 30])
def test_a_simulated_bring_ups_divisor_beyond_a_real_boards_is_refused(monkeypatch, capsys, tool, divisor):
    """`--sim --divisor` had no upper bound (an outside probe): the simulated time grows with it, and a huge
    one ran for as long as it was let. It goes up to the slowest real board's UART, the ULX3S's 25 MHz at
    115200 Bd (217 cycles a bit), and past it is a usage error before any work."""
    class Simulated(Exception):
        pass

    def simulate(*args):
        raise Simulated(args)

    monkeypatch.setattr(tool, "simulate", simulate)
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--sim", "--divisor", divisor])
    assert exit_.value.code == 2
    prog = tool.__name__.replace('sop.', 'python -m sop.')
    assert capsys.readouterr().err.splitlines() == [f"{prog}: error: argument --divisor: must be an integer at least 4 "
                                                    f"and at most 217, got {divisor} (see {prog} --help)"]
    with pytest.raises(Simulated) as ran:                # a real board's timing is still taken
        tool.main(["--sim", "--divisor", "217"])
    assert 217 in ran.value.args[0]
    assert bringup.board_divisor() == round(25e6 / wire.DEFAULT_BAUD) == 217


@pytest.mark.parametrize("tool", [bringup, gemv_bringup], ids=["decoder", "engine"])
def test_a_simulated_bring_ups_errors_name_the_tool_as_its_usage_errors_do(tmp_path, capsys, tool):
    """A bad input found after the command line was said as `bringup: error: ...` (`gemv bringup: ...`),
    a prefix that is neither the tool's name nor that of its own argparse errors and its interrupt line
    (a bring-up walk): one prefix, the tool's."""
    missing = tmp_path / "none.sopq"
    assert tool.main(["--sim", "--model", str(missing)]) == 2
    prog = tool.__name__.replace("sop.", "python -m sop.")
    assert capsys.readouterr().err.splitlines() == [f"{prog}: error: {missing}: no such .sopq file"]


def test_a_board_with_another_decoder_is_refused(sim_port, capsys):
    timeout = sim_port()
    assert cli.main(board_args("sim", "--timeout", str(timeout), fmt="e2m3-ue4m4-g16")) == 1
    err = capsys.readouterr().err
    ids = tuple(get_point(p).format_id for p in ("sop4-g16", "e2m3-ue4m4-g16"))
    assert (f"the board decodes sop4-g16 (format id {ids[0]:#010x}), not e2m3-ue4m4-g16 (format id "
            f"{ids[1]:#010x}): code_bits 4 (needs 6)") in err and "Traceback" not in err


def same_widths_point():
    """A point of sop4-g16's widths (4-bit codes, blocks of 16 in 9 bytes, two banks, a 10-bit HIF) and
    another header: a selection bit and an unsigned UE3M4 scale, no sign. STATUS's widths alone took it."""
    return OperatingPoint("sel-ue3m4-g16", BlockLayout(4, 16, "ue3m4", select_bit=True),
                          "sop4-g16's widths, another header", codebooks=("nf4", "e2m1"))


def test_a_board_of_another_format_of_the_same_widths_is_refused(sim_port, monkeypatch, capsys):
    """The simulated sop4-g16 board (its STATUS as the gateware sends it) is refused for a registered point
    of the same widths but another header, in one line naming both formats and their ids, before anything
    is loaded: it passed the check and was decoded as sop4-g16 (a MISMATCH; with a user's own data,
    wrong output). The GEMV-only core's STATUS (check_point) likewise."""
    with registered(same_widths_point()) as point:
        assert {f: getattr(point.layout, f) for f in ("code_bits", "group", "block_bytes", "banks")} == \
            {f: getattr(get_point("sop4-g16").layout, f) for f in ("code_bits", "group", "block_bytes", "banks")}
        assert point.format_id != get_point("sop4-g16").format_id
        said = (f"the board decodes sop4-g16 (format id {get_point('sop4-g16').format_id:#010x}), not "
                f"{point.name} (format id {point.format_id:#010x}): another block header or HIF; pass the format "
                f"of the loaded bitstream (--format)")
        timeout = sim_port()
        assert cli.main(board_args("sim", "--timeout", str(timeout), fmt=point.name)) == 1
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sop board: ") and said in lines[0] and "result" not in out
        port, timeout = bringup.sim_board("icebreaker-gemv")
        st = client.BoardLink(port, timeout=timeout).status()
        assert st.lanes == 0 and bringup.check_point(st, "sop4-g16") is None
        with pytest.raises(bringup.BoardConfigError, match=re.escape(said)):
            bringup.check_point(st, point.name)


@pytest.mark.parametrize("via", ["cli", "link"])
def test_a_board_of_the_previous_protocol_version_is_told_to_rebuild(monkeypatch, capsys, via):
    """A version-1 board's STATUS (12 bytes, no format id) is named as a board of another protocol
    version, what to do included, not taken for a malformed reply nor decoded."""
    old = wire.encode_frame(wire.Cmd.STATUS | wire.REPLY_BIT, bytes([1, 2, 4, 16, 9, 2, 10, 2]) +
                            struct.pack("<HH", 256, 0))
    said = "the board speaks protocol version 1, this host 2: "
    if via == "link":
        with pytest.raises(client.BoardError, match=f"^{said}.*rebuild the bitstream from this one"):
            client.BoardLink(Scripted([old]), timeout=0.2).status()
        return
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: Scripted([old]))
    assert cli.main(board_args("loop://", "--timeout", "0.2")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sop board: {said}") and "make bitstream" in err and "\n" not in err


class ReportsSixBitCodes(protocol.ProtocolEngine):
    """A broken engine: its STATUS says 6-bit codes while its decoder takes 4-bit ones."""

    def status_bytes(self):
        reply = super().status_bytes()
        reply[2] = 6                                     # version, lanes, code bits, ...
        return reply


def test_a_board_whose_status_is_wrong_is_refused(monkeypatch, capsys):
    """The device under test mutated, not the command line: the host refuses a board whose STATUS
    describes another decoder than the one the format needs, before it loads anything."""
    from sop.synth.gateware.simboard import stream_port

    engine = ReportsSixBitCodes(BOARDS["icebreaker"].config())
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: stream_port(engine))
    assert cli.main(board_args("sim", "--timeout", "0.01")) == 1       # simulated seconds: 10,000 cycles
    err = capsys.readouterr().err
    assert "does not match format sop4-g16: code_bits 6 (needs 4)" in err and "Traceback" not in err


def gateware_status(config, max_payload=wire.DEFAULT_MAX_PAYLOAD, errors=0) -> wire.Status:
    """The STATUS the gateware (synth/gateware/protocol.py) sends for ``config``, as the host decodes it."""
    payload = bytes(protocol.status_bytes(config, max_payload)) + struct.pack("<H", errors)
    return wire.Status(*struct.unpack(wire.STATUS_FORMAT, payload))


def test_status_checks_version_and_lanes():
    good = wire.Status(wire.PROTOCOL_VERSION, 2, 4, 16, 9, 2, 10, 2, 256, get_point("sop4-g16").format_id, 0)
    assert bringup.check_status(good, "sop4-g16").lanes == 2
    with pytest.raises(bringup.BoardConfigError, match="protocol version 7, this host 2: .*rebuild the bitstream"):
        bringup.check_status(replace(good, version=7), "sop4-g16")
    with pytest.raises(bringup.BoardConfigError, match="reports 3 lanes"):
        bringup.check_status(replace(good, lanes=3), "sop4-g16")
    with pytest.raises(bringup.BoardConfigError, match="beat_bytes 18 [(]needs 9[)]"):
        bringup.check_status(replace(good, beat_bytes=18), "sop4-g16")
    with pytest.raises(bringup.BoardConfigError, match="max payload 9 cannot hold one beat of 9 bytes"):
        bringup.check_status(replace(good, max_payload=9), "sop4-g16")
    with pytest.raises(bringup.BoardConfigError, match="^the board decodes a format of id 0x0badf00d, which no "
                       "operating point registered here has, not sop4-g16 [(]format id 0xc5aba8ea[)]: another block "
                       "header or HIF; pass the format"):
        bringup.check_status(replace(good, format_id=0x0BADF00D), "sop4-g16")


@pytest.mark.parametrize("fmt", board_points())
@pytest.mark.parametrize("lanes", [2, 8, 32])
def test_the_status_the_engine_reports_passes_the_check(fmt, lanes):
    """check_status's expectations are what the gateware's STATUS reply says for that decoder."""
    cfg = bringup.format_config(fmt, lanes)
    st = gateware_status(cfg)
    assert st.format_id == get_point(fmt).format_id and bringup.check_status(st, fmt) == cfg
    other = next(f for f in board_points() if f != fmt)
    with pytest.raises(bringup.BoardConfigError, match=f"the board decodes {fmt} [(]format id 0x[0-9a-f]{{8}}[)], "
                       f"not {other} "):
        bringup.check_status(st, other)


def test_a_board_without_a_decoder_is_refused_a_decode_run_with_one_line(monkeypatch, capsys):
    """The simulated ``icebreaker-gemv`` core (UART pins; its STATUS says 0 lanes): `sop board` exits 1
    with one ``sop board:`` line naming it, before anything is loaded."""
    port, timeout = bringup.sim_board("icebreaker-gemv")
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: port)
    assert cli.main(board_args("sim", "--timeout", str(timeout))) == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"sop board: {bringup.NO_DECODER}"] and "result" not in out
    assert "no decoder (its STATUS reports 0 lanes)" in err and "sop board --gemv" in err


@pytest.mark.parametrize("fmt", board_points())
def test_a_status_without_a_decoder_passes_the_point_check_only(fmt):
    """check_point (a GEMV run) takes what the gateware's STATUS says for a GEMV-only core of ``fmt``
    (0 lanes, the engine's point), check_status (a decode run) refuses it; another point, or decoder
    fields that are not 0, are refused."""
    from sop.hdl.gemv_config import GemvConfig

    point = get_point(fmt)
    engine = GemvConfig("probe", point.layout, point.hif, max_cols=2048, max_rows=16)
    st = gateware_status(engine)
    assert st.lanes == 0 and st.format_id == point.format_id and bringup.check_point(st, fmt) is None
    with pytest.raises(bringup.BoardConfigError, match="this board has no decoder"):
        bringup.check_status(st, fmt)
    other = next(f for f in board_points() if f != fmt)
    with pytest.raises(bringup.BoardConfigError, match=f"the board decodes {fmt} .*, not {other} "):
        bringup.check_point(st, other)
    with pytest.raises(bringup.BoardConfigError, match="the board's point does not match format .*beat_bytes 9 "
                       "[(]needs 0[)]"):
        bringup.check_point(replace(st, beat_bytes=9), fmt)
    decoder = gateware_status(bringup.format_config(fmt, 2), 256)
    assert bringup.check_point(decoder, fmt) == bringup.check_status(decoder, fmt)     # with one: its check


def test_a_board_that_never_answers_times_out_with_one_line(capsys):
    """A pseudo-terminal is a serial port pyserial opens; nobody answers on its other end."""
    master, slave = os.openpty()
    try:
        assert cli.main(board_args(os.ttyname(slave), "--timeout", "0.05")) == 1
    finally:
        os.close(slave)
        os.close(master)
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop board: no reply from the board within 0.05 s") and "check the port" in err
    assert "\n" not in err


def test_a_port_that_cannot_be_opened_is_a_usage_error(tmp_path, capsys):
    assert cli.main(board_args(str(tmp_path / "ttyNONE"))) == 2
    assert "cannot open serial port" in capsys.readouterr().err


def test_an_unknown_format_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(board_args("sim", fmt="nf4"))
    assert exit_.value.code == 2 and "invalid choice: 'nf4'" in capsys.readouterr().err


def test_an_unknown_layer_is_a_usage_error(capsys):
    args = board_args("sim")
    args[args.index(LAYER)] = "encoder.layer.9.nothing"
    assert cli.main(args) == 2
    assert "no linear layer 'encoder.layer.9.nothing'" in capsys.readouterr().err


@pytest.mark.parametrize("gemv", [False, True], ids=["decode", "gemv"])
def test_an_empty_layer_name_is_refused_not_taken_for_the_first_layer(capsys, gemv):
    """``--layer ''`` was taken for no ``--layer``: the board ran the model's first layer, which the user
    never named (an outside probe); `sop board` refuses it as a usage error, ``bringup.model_layer`` (which
    serves the bring-ups too) by itself."""
    args = board_args("loop://", *(["--gemv"] if gemv else []))
    args[args.index(LAYER)] = ""
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    assert "sop: error: sop board: argument --layer: '': an empty name; give a layer's name" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="no layer ''"):
        bringup.model_layer(bringup.sparse_model("sop4-g16"), "sop4-g16", "")


# -- a hostile line and options that could hang the host ---------------------------------------
def test_a_board_sending_garbage_forever_times_out_with_one_line(monkeypatch, capsys):
    """Garbage that never stops (a wrong baud rate looks like this) ends at --timeout, exit 1."""
    real, opened = client.SerialTransport, []

    with fed_pty(itertools.repeat(GARBAGE[:64])) as (port, start):
        def open_and_feed(name, baud):
            transport = real(name, baud)
            opened.append(time.monotonic())
            start()
            return transport
        monkeypatch.setattr(client, "SerialTransport", open_and_feed)
        assert cli.main(board_args(port, "--timeout", "0.3")) == 1
        took = time.monotonic() - opened[0]
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop board: no reply from the board within 0.3 s while waiting for a start byte")
    assert "more)" in err and "\n" not in err and len(err) < 600
    assert took < 0.3 + real.READ_GRANULARITY + 0.3


def status_reply():
    """The STATUS reply of the simulated iCEBreaker's decoder (as synth/gateware/protocol.py sends it)."""
    cfg = BOARDS["icebreaker"].config()
    return wire.encode_frame(wire.Cmd.STATUS | wire.REPLY_BIT,
                             bytes(protocol.status_bytes(cfg, wire.DEFAULT_MAX_PAYLOAD)) + b"\0\0")


def sparse_status_reply(payload=struct.pack(wire.SPARSE_STATUS_FORMAT, 1, 0, 64)):
    return wire.encode_frame(wire.Cmd.SPARSE_STATUS | wire.REPLY_BIT, payload)


class Scripted(client.SerialTransport):
    """pyserial's loop:// port whose every request is answered by the next scripted reply."""

    def __init__(self, replies):
        super().__init__("loop://")
        self.replies = list(replies)

    def write(self, data: bytes) -> None:
        super().write(self.replies.pop(0) if self.replies else b"")


@pytest.mark.parametrize("replies, message", [
    ([wire.encode_frame(0x81, bytes([wire.PROTOCOL_VERSION]) + bytes(10))],
     "malformed STATUS reply from the board: 11 payload bytes"),
    ([wire.encode_frame(wire.ERROR_REPLY, b"")], "malformed error reply from the board: 0 payload bytes"),
    ([wire.encode_frame(wire.ERROR_REPLY, b"\x01")], "malformed error reply from the board: 1 payload bytes"),
    ([wire.encode_frame(0x42, b"")], "unexpected reply 0x42 to STATUS"),
    ([b"\x55\x81\xff\xff" + bytes(64)], "length 65535 is over the 256-byte limit"),
    ([status_reply(), sparse_status_reply(), wire.encode_frame(0x85, bytes(7))],
     "malformed CHECKSUM reply from the board: 7 payload"),
    ([status_reply(), sparse_status_reply(bytes(3))], "malformed SPARSE_STATUS reply from the board: 3 payload"),
    # a board without the residual path (SPARSE_STATUS unknown) still checks a layer without entries
    ([status_reply(), wire.encode_frame(wire.ERROR_REPLY, bytes([wire.Err.UNKNOWN_CMD, wire.Cmd.SPARSE_STATUS])),
      wire.encode_frame(0x85, bytes(7))], "malformed CHECKSUM reply from the board: 7 payload"),
], ids=["status-short", "error-empty", "error-1-byte", "unknown-reply", "huge-length", "checksum-short",
        "sparse-status-short", "checksum-short-no-residual-path"])
def test_a_malformed_reply_exits_1_with_one_line(monkeypatch, capsys, replies, message):
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: Scripted(replies))
    assert cli.main(board_args("loop://", "--timeout", "0.2")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop board: ") and message in err and "\n" not in err


def test_a_baud_the_port_refuses_is_a_usage_error_naming_it(capsys):
    master, slave = os.openpty()
    try:
        assert cli.main(board_args(os.ttyname(slave), "--baud", str(2**31))) == 2
    finally:
        os.close(slave)
        os.close(master)
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: cannot open serial port") and "baud rate 2147483648 (--baud)" in err
    assert "\n" not in err


@pytest.mark.parametrize("port, said", [("bogus://x", "not a port pyserial knows (invalid URL"),
                                        ("loop://?x=1", "pyserial refuses the URL's options")])
def test_a_port_url_pyserial_does_not_take_is_not_blamed_on_the_baud(capsys, port, said):
    """An unknown protocol was said to be a bad --baud; a loop:// option pyserial lacks (its KeyError)
    was an internal error."""
    assert cli.main(board_args(port)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sop: error: cannot open serial port {port}: {said}"), err
    assert "--baud" not in err and "\n" not in err


@pytest.mark.parametrize("option, value", [("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "-1"),
                                           ("--timeout", "0"), ("--timeout", "1e999"), ("--timeout", "1e308"),
                                           ("--timeout", "3601"), ("--rows", "-1"),
                                           ("--rows", "0"), ("--baud", "-5"), ("--baud", "fast")])
def test_a_bad_number_is_a_one_line_usage_error_naming_the_option(capsys, option, value):
    """``--timeout inf`` would let the host wait forever: refused before anything runs."""
    args = board_args("/dev/null")
    if option in args:
        del args[args.index(option):args.index(option) + 2]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, option, value])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("sop: error:") and option in err and "\n" not in err


# -- sparse residuals: the entries go to the board, its decoder adds them ---------------------------
MODEL_LAYER = bringup.model_layer                   # (the tests below replace it in bringup)
ENTRIES = ([0, 17, 100, 383], [0x3F80, 0xBC00, 0x0001, 0x4120])      # a row's first and last value among them


def sparse_stream(index=ENTRIES[0], values=ENTRIES[1]):
    """One row of the MiniLM layer with sparse entries (as a sop-budget artifact stores them)."""
    name, stream, _ = MODEL_LAYER("minilm", "sop4-g16", LAYER, rows=1)
    return name, replace(stream, sparse=Sparse(np.array(index, np.uint32), np.array(values, np.uint16)))


def test_the_board_adds_the_sparse_residuals_bit_exact():
    """Through the ULX3S core's UART pins (8 lanes): golden's values with the residuals, which differ
    from the values without them; the host adds nothing."""
    name, stream = sparse_stream()
    port, timeout = bringup.sim_board("ulx3s")
    result = bringup.run_board(port, stream, "sop4-g16", name=name, timeout=timeout, clock=port.now)
    assert result.ok and result.sparse == 4 and result.sparse_errors == ()
    cfg = bringup.format_config("sop4-g16", 8)
    dense = from_stream(cfg, replace(stream, sparse=Sparse()))
    assert result.expected != wire.values_checksum(dense.expected(cfg), reference.lane_word_bits(cfg))
    assert "sparse residuals: 4 entries, added by the board's decoder" in "\n".join(result.lines())


def test_cli_sends_the_sparse_entries_and_exits_0(sim_port, monkeypatch, capsys):
    timeout = sim_port()
    monkeypatch.setattr(bringup, "model_layer", lambda *a: (*sparse_stream(), 384))
    assert cli.main(board_args("sim", "--timeout", str(timeout))) == 0
    out = capsys.readouterr().out
    assert "sparse residuals: 4 entries" in out and "result: OK" in out


def test_a_host_that_drops_the_last_entry_is_caught(sim_port, monkeypatch, capsys):
    """An injected host bug: the layer's last entry not sent (``last`` on the one before): MISMATCH."""
    timeout = sim_port()
    monkeypatch.setattr(bringup, "model_layer", lambda *a: (*sparse_stream(), 384))
    send = client.BoardLink.sparse

    def drops_last(self, entries, *, last):
        entries = list(entries)
        return send(self, entries[:-1] if last else entries, last=last)
    monkeypatch.setattr(client.BoardLink, "sparse", drops_last)
    assert cli.main(board_args("sim", "--timeout", str(timeout))) == 1
    assert "result: MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize("index, values, message", [
    ([17, 17, 30], [1, 2, 3], "entry 1 of 3: index 17 is not above the previous entry's 17: the indices must "
                              "be strictly increasing"),
    ([3, 384], [1, 2], "entry 1 of 2: index 384 is outside the layer's 384 values [(]1 x 384[)]"),
    ([3, 9], [0x3F80, 0xFF80], "entry 1 of 2: value 0xff80 at index 9 is not a finite BF16 number"),
])
def test_a_bad_sparse_table_is_refused_with_one_line_before_the_port(monkeypatch, capsys, index, values, message):
    monkeypatch.setattr(bringup, "model_layer", lambda *a: (*sparse_stream(index, values), 384))
    monkeypatch.setattr(client, "SerialTransport", lambda *a: pytest.fail("the port was opened"))
    assert cli.main(board_args("sim")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sop: error: layer {LAYER}: bad sparse table, ") and "\n" not in err
    assert re.search(message, err) and "not sent to the board" in err


def test_a_sparse_layer_on_a_board_without_the_residual_path_is_refused(monkeypatch, capsys):
    port, timeout = bringup.sim_board("icebreaker", residuals=0)
    monkeypatch.setattr(client, "SerialTransport", lambda name, baud: port)
    monkeypatch.setattr(bringup, "model_layer", lambda *a: (*sparse_stream(), 384))
    assert cli.main(board_args("sim", "--timeout", str(timeout))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop board: the board's decoder has no sparse-residual path") and "\n" not in err


def test_bad_entries_past_the_host_are_flagged_by_the_board():
    """A table whose indices go down, sent without the host's check: the board's decoder flags
    ``order``, the check fails and says so; a second run on that board is refused (sticky bits)."""
    name, stream = sparse_stream()
    port, timeout = bringup.sim_board("icebreaker")
    result = bringup.run_board(port, bringup.bad_entries_stream(stream), "sop4-g16", name=name,
                               timeout=timeout, clock=port.now, check_table=False)
    assert not result.ok and result.sparse_errors == ("order",)
    assert "sparse error: the board's decoder flagged order" in "\n".join(result.lines())
    with pytest.raises(bringup.BoardConfigError, match="flagged sparse errors before this run [(]order"):
        bringup.run_board(port, stream, "sop4-g16", name=name, timeout=timeout, clock=port.now)


@pytest.mark.slow
def test_the_make_sim_step_runs_a_sop_budget_layer_and_a_bad_table(capsys):
    """`python -m sop.synth.host.bringup --sim` as `make sim` runs it, on 3 rows (the fewest that
    hold more than one sparse entry: each row costs seconds of amaranth.sim): MiniLM's sop-budget
    artifact (built and cached by sim/runner.py if missing), its first layer with sparse entries."""
    assert bringup.main(["--sim", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert f"layer: {bringup.SIM_LAYER} (3 x 384, sop4-g16)" in out and "sparse residuals: 6 entries" in out
    assert "result: OK" in out and "the board flagged order" in out


@pytest.mark.parametrize("n_sparse, why", [(3, "it waits for sparse entries that did not come"),
                                           (0, "the layer has no sparse entries")])
def test_a_stall_is_blamed_on_the_entries_only_when_the_layer_has_some(n_sparse, why):
    """STALLED on a layer without sparse entries is no missing entry: the message says so."""
    class Link:
        def sparse_status(self):
            return wire.SparseStatus(adders=1, errors=0, queue=16)

    err = bringup._stalled(Link(), client.BoardError("BLOCKS: STALLED", wire.Err.STALLED, wire.Cmd.BLOCKS), n_sparse)
    assert str(err).startswith(f"BLOCKS: STALLED: the board's decoder made no progress ({why}")
    assert str(err).endswith("sparse error bits: none; reset the board") and err.code == wire.Err.STALLED


def test_an_empty_serial_port_is_a_usage_error_before_the_model_is_read(monkeypatch, capsys):
    """``sop board --port ''`` (an unset shell variable: ``--port "$PORT"``) read the layer, then printed
    pyserial's ``cannot open serial port  at 115200 Bd: ... No such file or directory: ''``, a port name
    that reads as nothing. It is now refused as the empty name it is, before the model is touched."""
    from sop.cli import main
    from sop.synth.host import bringup

    def never(*args, **kwargs):
        raise AssertionError("the model was read for a command line that names no port")

    monkeypatch.setattr(bringup, "model_layer", never)
    for extra in ([], ["--gemv"]):
        with pytest.raises(SystemExit) as stop:
            main(["board", "--port", "", "minilm", "--format", "sop4-g16", *extra])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith("sop: error: sop board: argument --port: '': an empty name; give the board's "
                              "serial port (for example /dev/ttyUSB1")
