"""The board host never hangs and never misreads: synth/host/client.py against hostile serial lines.

Role: the robustness contract of ``BoardLink`` (docs/board-protocol.md, "Host
behaviour"): one deadline a reply, bounded buffers, every reply payload checked
before it is decoded. Three kinds of line, none of them the simulated board:

* ``FakeLine``: an in-memory transport with its own clock (a byte arrives
  every ``BYTE_TIME`` seconds), so endless garbage and exact timing checks run
  in milliseconds;
* a pseudo-terminal (a real serial port to pyserial) whose far end a thread
  feeds with garbage forever, timed with the wall clock;
* pyserial's ``loop://`` port, into which a malformed reply is written.

The fuzz tests (hypothesis, tests/fuzzing.py) feed arbitrary bytes as replies:
the outcome is the correct result (only when a valid frame is there) or
``BoardError`` / ``BoardTimeout``, never another exception, never longer than
the timeout.
"""

import itertools
import os
import re
import struct
import time

import pytest
from fuzzing import fuzz
from serial_lines import GARBAGE, fed_pty
from hypothesis import given
from hypothesis import strategies as st

from sop.synth import wire
from sop.synth.host.client import BoardError, BoardLink, BoardTimeout, SerialTransport
from sop.synth.wire import Cmd, Err, Status, encode_frame

BYTE_TIME = 1e-4               # FakeLine: seconds a byte (about 100 kBd)
TIMEOUT = 0.05                 # FakeLine: the host's reply timeout (500 byte times)
MESSAGE_MAX = 600              # characters: an error message quotes a bounded part of what came
STATUS = Status(wire.PROTOCOL_VERSION, 2, 4, 16, 9, 2, 10, 2, 256, 0xC5ABA8EA, 0)
STATUS_PAYLOAD = struct.pack(wire.STATUS_FORMAT, *(getattr(STATUS, f) for f in Status.__dataclass_fields__))
CHECKSUM_PAYLOAD = struct.pack(wire.CHECKSUM_FORMAT, 1234, 0xDEADBEEF)
SPARSE_STATUS = wire.SparseStatus(1, 0b0001, 64)
SPARSE_STATUS_PAYLOAD = struct.pack(wire.SPARSE_STATUS_FORMAT, 1, 0b0001, 64)


class FakeLine:
    """A transport whose bytes come from ``source`` (any iterable, endless ones too), one every
    ``BYTE_TIME`` seconds of its own clock; ``read`` advances the clock as a serial port would."""

    def __init__(self, source=b""):
        self.source, self.t, self.written, self.reads = iter(source), 0.0, bytearray(), []

    def now(self) -> float:
        return self.t

    def write(self, data: bytes) -> None:
        self.written += data

    def read(self, n: int, timeout: float) -> bytes:
        self.reads.append(n)
        out = bytes(itertools.islice(self.source, min(n, int(timeout / BYTE_TIME))))
        self.t += len(out) * BYTE_TIME if len(out) == n else timeout
        return out


def fake_link(source, timeout=TIMEOUT) -> BoardLink:
    return BoardLink(FakeLine(source), timeout=timeout)


# -- one deadline a reply, bounded buffers ---------------------------------------------------
def test_endless_garbage_ends_in_a_timeout_within_the_timeout():
    """Today's bug: each garbage byte restarted the timer and was kept; now one deadline, 64 bytes kept."""
    link = fake_link(itertools.cycle(GARBAGE))
    with pytest.raises(BoardTimeout, match=r"no reply from the board within 0.05 s while waiting for "
                                           r"a start byte \(\d+ reply bytes received: 0001.*more\)") as err:
        link.status()
    assert link.transport.t <= TIMEOUT + BYTE_TIME
    assert len(str(err.value)) < MESSAGE_MAX
    assert max(link.transport.reads) <= wire.HEADER_BYTES + wire.CRC_BYTES     # never past a minimal frame


@pytest.mark.parametrize("source, error, match", [
    # a start byte, then silence: waits for the header until the deadline
    (b"\x55\x81", BoardTimeout, r"waiting for the reply header \(2 reply bytes received: 5581\)"),
    (b"\x00\x55\x81\x0c\x00\x01", BoardTimeout,
     r"waiting for 12 payload bytes and the CRC \(6 reply bytes received: 00, then 55810c0001\)"),
    # endless starts that never make a frame: the next start is read as payload, the CRC fails
    (itertools.cycle(b"\x55\x81\x0c\x00"), BoardError, "corrupt reply from the board [(]CRC"),
    # endless start bytes: the length field reads 0x5555, over the limit, refused at once
    (itertools.repeat(0x55), BoardError, "length 21845 is over the 256-byte limit"),
], ids=["start-then-silence", "header-then-silence", "endless-frame-starts", "endless-start-bytes"])
def test_frame_starts_that_never_complete_end_in_a_clean_error(source, error, match):
    link = fake_link(source)
    with pytest.raises(error, match=match) as err:
        link.status()
    assert link.transport.t <= TIMEOUT + BYTE_TIME and len(str(err.value)) < MESSAGE_MAX


def test_a_bogus_huge_length_is_neither_waited_for_nor_buffered():
    link = fake_link(itertools.chain(b"\x55\x81\xff\xff", itertools.cycle(GARBAGE)))
    with pytest.raises(BoardError, match="length 65535 is over the 256-byte limit") as err:
        link.status()
    assert sum(link.transport.reads) <= 8 and link.transport.t < 10 * BYTE_TIME
    assert len(str(err.value)) < MESSAGE_MAX
    link.max_payload = 16                                    # a board's smaller max payload bounds it too
    with pytest.raises(BoardError, match="length 17 is over the 16-byte limit"):
        BoardLink(FakeLine(b"\x55\x81\x11\x00" + bytes(21)), timeout=TIMEOUT, max_payload=16).status()


def test_a_valid_reply_after_garbage_is_read_and_nothing_past_it():
    after = encode_frame(Cmd.CHECKSUM | wire.REPLY_BIT, CHECKSUM_PAYLOAD)
    link = fake_link(bytes(GARBAGE[:100]) + encode_frame(Cmd.STATUS | wire.REPLY_BIT, STATUS_PAYLOAD) + after)
    assert link.status() == STATUS
    assert link.checksum() == (1234, 0xDEADBEEF)             # the second frame was left in the line


def test_resync_drains_a_line_and_gives_up_on_one_that_never_goes_quiet():
    assert fake_link(GARBAGE[:10]).resync() == GARBAGE[:10]
    link = fake_link(itertools.cycle(GARBAGE))
    with pytest.raises(BoardTimeout, match=r"not quiet for 0.0125 s within 0.0625 s "
                                           r"\(\d+ bytes discarded") as err:
        link.resync()
    assert link.transport.t <= TIMEOUT + TIMEOUT / 4 + BYTE_TIME and len(str(err.value)) < MESSAGE_MAX


class SlowBytes:
    """A simulated clock: a byte every 0.2 s until 1.1 s, then silence."""

    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def write(self, data):
        pass

    def read(self, n, timeout):
        if self.t < 1.1:
            step = min(0.2, timeout)
            self.t += step
            return b"\x00" if step >= 0.2 or self.t >= 1.1 else b""
        self.t += timeout
        return b""


def test_resync_needs_the_whole_quiet_time_before_its_deadline():
    """Quiet from 1.1 s; the deadline (timeout 1 s + quiet 0.25 s) comes at 1.25 s, before 0.25 s of quiet:
    not quiet in time, though the last read found nothing (a resync that ended on any empty read said so)."""
    link = BoardLink(SlowBytes(), timeout=1.0)
    with pytest.raises(BoardTimeout, match=r"not quiet for 0.25 s within 1.25 s"):
        link.resync(quiet=0.25)


def test_y_words_that_keep_coming_are_read_whatever_the_total_time():
    """The deadline is per word, not per read: one word every 0.6 s with a 1 s timeout is progress (3 s in
    all), not a timeout after the first second."""
    clock = [0.0]
    link = BoardLink(object(), timeout=1.0, clock=lambda: clock[0])
    calls = [0]

    def gemv_y(count):
        clock[0] += 0.2
        calls[0] += 1
        return [calls[0]] if calls[0] % 3 == 0 else []
    link.gemv_y = gemv_y
    assert link.read_y(5) == [3, 6, 9, 12, 15]


def test_a_gemv_y_reply_with_more_words_than_asked_is_malformed():
    link = BoardLink(object())
    link.command = lambda cmd, payload=b"": struct.pack("<3I", 1, 2, 3)
    with pytest.raises(BoardError, match="malformed GEMV_Y reply"):
        link.gemv_y(2)
    link.command = lambda cmd, payload=b"": struct.pack("<2I", 1, 2)
    assert link.gemv_y(2) == [1, 2]


def test_a_board_that_flagged_sparse_errors_does_not_pass():
    from sop.synth.host.bringup import BoardResult

    good = BoardResult("x", "sop4-g16", 1, 16, None, (16, 5), (16, 5), 1.0, 10, 1, ())
    assert good.ok
    assert not BoardResult("x", "sop4-g16", 1, 16, None, (16, 5), (16, 5), 1.0, 10, 1, ("order",)).ok


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0.0, -1.0, "soon"])
def test_a_timeout_that_could_hang_is_refused(timeout):
    with pytest.raises(ValueError, match="the reply timeout must be a"):
        BoardLink(FakeLine(), timeout=timeout)
    link = BoardLink(FakeLine())
    with pytest.raises(ValueError, match="the reply timeout must be a"):
        link.timeout = timeout


# -- short and malformed replies -----------------------------------------------------------
def ok(cmd, payload=b""):
    return encode_frame(cmd | wire.REPLY_BIT, payload)


def err_frame(payload):
    return encode_frame(wire.ERROR_REPLY, payload)


MALFORMED = {   # name: (command, its reply bytes, message)
    "status-short": (Cmd.STATUS, ok(Cmd.STATUS, STATUS_PAYLOAD[:11]),
                     "malformed STATUS reply from the board: 11 payload bytes .*expected 16"),
    "status-long": (Cmd.STATUS, ok(Cmd.STATUS, STATUS_PAYLOAD + b"\x00"), "malformed STATUS reply.*17 payload"),
    "status-empty": (Cmd.STATUS, ok(Cmd.STATUS), r"malformed STATUS reply.*0 payload bytes \(empty\)"),
    "checksum-short": (Cmd.CHECKSUM, ok(Cmd.CHECKSUM, CHECKSUM_PAYLOAD[:7]),
                       "malformed CHECKSUM reply.*7 payload bytes .*expected 8"),
    "checksum-long": (Cmd.CHECKSUM, ok(Cmd.CHECKSUM, CHECKSUM_PAYLOAD + b"\x00"),
                      "malformed CHECKSUM.*9 payload"),
    "offset-with-payload": (Cmd.OFFSET, ok(Cmd.OFFSET, b"\x01"), "malformed OFFSET reply.*expected 0"),
    "sparse-status-short": (Cmd.SPARSE_STATUS, ok(Cmd.SPARSE_STATUS, SPARSE_STATUS_PAYLOAD[:3]),
                            "malformed SPARSE_STATUS reply from the board: 3 payload bytes .*expected 4"),
    "sparse-status-long": (Cmd.SPARSE_STATUS, ok(Cmd.SPARSE_STATUS, SPARSE_STATUS_PAYLOAD + b"\x00"),
                           "malformed SPARSE_STATUS reply.*5 payload"),
    "sparse-with-payload": (Cmd.SPARSE, ok(Cmd.SPARSE, b"\x01"), "malformed SPARSE reply.*expected 0"),
    "stalled-to-sparse": (Cmd.SPARSE, err_frame(bytes([Err.STALLED, Cmd.SPARSE])),
                          r"the board replied STALLED \(frame command 0x06\) to SPARSE"),
    "error-empty": (Cmd.STATUS, err_frame(b""),
                    r"malformed error reply from the board: 0 payload bytes \(empty\)"),
    "error-1-byte": (Cmd.STATUS, err_frame(b"\x01"),
                     r"malformed error reply.*1 payload bytes \(01\), expected 2"),
    "error-3-bytes": (Cmd.STATUS, err_frame(b"\x01\x01\x00"), "malformed error reply.*3 payload bytes"),
    "error-unknown-code": (Cmd.STATUS, err_frame(b"\x09\x01"),
                           r"the board replied unknown error code 9 \(frame command 0x01\) to STATUS"),
    "unknown-reply-type": (Cmd.STATUS, encode_frame(0x42, b"abc"),
                           "unexpected reply 0x42 to STATUS [(]expected 0x81 or an error reply[)]"),
    "reply-to-another-command": (Cmd.STATUS, ok(Cmd.CHECKSUM, CHECKSUM_PAYLOAD),
                                 "unexpected reply 0x85 to STATUS"),
    "request-echoed": (Cmd.CHECKSUM, encode_frame(Cmd.CHECKSUM, b"\x00"), "unexpected reply 0x05 to CHECKSUM"),
}


def call(link, cmd):
    """The command as bringup.run_board uses it (decoded), its request already sent."""
    if cmd == Cmd.STATUS:
        return link.status_reply()
    if cmd == Cmd.CHECKSUM:
        return struct.unpack(wire.CHECKSUM_FORMAT, link.reply(cmd))
    if cmd == Cmd.SPARSE_STATUS:
        return wire.SparseStatus(*struct.unpack(wire.SPARSE_STATUS_FORMAT, link.reply(cmd)))
    return link.reply(cmd)


@pytest.fixture
def loop_link():
    """pyserial's loop:// port (what is written comes back) behind the real SerialTransport."""
    transport = SerialTransport("loop://")
    yield BoardLink(transport, timeout=0.2)
    transport.close()


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_reply_is_a_board_error_naming_it(name, loop_link):
    cmd, reply, match = MALFORMED[name]
    link = fake_link(reply)
    with pytest.raises(BoardError, match=match):
        call(link, cmd)
    loop_link.transport.write(reply)                         # over a serial port: the same error
    with pytest.raises(BoardError, match=match):
        call(loop_link, cmd)


def test_the_typed_commands_check_their_reply_length():
    with pytest.raises(BoardError, match="malformed STATUS reply"):
        fake_link(ok(Cmd.STATUS, STATUS_PAYLOAD[:3])).status()
    with pytest.raises(BoardError, match="malformed CHECKSUM reply"):
        fake_link(ok(Cmd.CHECKSUM, b"")).checksum()
    with pytest.raises(BoardError, match="malformed SPARSE_STATUS reply"):
        fake_link(ok(Cmd.SPARSE_STATUS, b"\x01")).sparse_status()
    assert fake_link(ok(Cmd.SPARSE_STATUS, SPARSE_STATUS_PAYLOAD)).sparse_status() == SPARSE_STATUS


def test_sparse_entries_go_out_in_frames_the_board_takes():
    """SPARSE frames: flags (last on the final frame only), 6-byte entries, cut to the max payload;
    a sparse layer: the swap beat alone, then each frame's entries and the one beyond before it."""
    line = FakeLine(itertools.cycle(ok(Cmd.SPARSE)))
    link = BoardLink(line, timeout=TIMEOUT, max_payload=64)            # 10 entries a frame
    link.sparse([(i * 3, 0x3F80 + i) for i in range(25)], last=True)
    frames = [encode_frame(Cmd.SPARSE, bytes([last]) + b"".join(struct.pack("<IH", i * 3, 0x3F80 + i)
                                                                 for i in range(a, min(a + 10, 25))))
              for a, last in ((0, 0), (10, 0), (20, wire.LAST_FLAG))]
    assert bytes(line.written) == b"".join(frames)

    class Recorder(BoardLink):
        def command(self, cmd, payload=b""):
            sent.append((Cmd(cmd).name, payload[0], (len(payload) - 1) // (9 if cmd == Cmd.BLOCKS else 6)))
            return b""
    sent = []
    beats = [bytes(9)] * 20                                            # 16 values a beat, 7 beats a frame
    link = Recorder(FakeLine(), timeout=TIMEOUT, max_payload=64)
    link.sparse_layer(beats, [(5, 1), (40, 1), (300, 1), (301, 1)], 16, 18)
    assert sent == [("BLOCKS", wire.SWAP_FLAG, 1), ("SPARSE", 0, 3), ("BLOCKS", 0, 7), ("BLOCKS", 0, 7),
                    ("SPARSE", wire.LAST_FLAG, 1), ("BLOCKS", 0, 5)]
    sent.clear()                                # every value an entry: frames cut to the queue (17 + 1)
    link.sparse_layer(beats[:4], [(i, 1) for i in range(64)], 16, 18)
    assert sent == [("BLOCKS", wire.SWAP_FLAG, 1), ("SPARSE", 0, 10), ("SPARSE", 0, 7),      # beat 0's, 1 beyond
                    ("SPARSE", 0, 10), ("SPARSE", 0, 6), ("BLOCKS", 0, 1),                 # beat 1's
                    ("SPARSE", 0, 10), ("SPARSE", 0, 6), ("BLOCKS", 0, 1),
                    ("SPARSE", 0, 10), ("SPARSE", wire.LAST_FLAG, 5), ("BLOCKS", 0, 1)]
    with pytest.raises(ValueError, match="queue of 17 entries cannot hold one beat's 16 entries"):
        link.sparse_layer(beats, [(1, 1)], 16, 17)


def test_error_reply_checks_its_payload():
    assert fake_link(err_frame(b"\x06\x00")).error_reply() == Err.GARBAGE
    for payload, match in [(b"", "malformed error reply"), (b"\x06", "malformed error reply"),
                           (b"\x63\x00", "unknown code 99")]:
        with pytest.raises(BoardError, match=match):
            fake_link(err_frame(payload)).error_reply()


def test_a_loop_port_that_echoes_the_request_is_out_of_step(loop_link):
    """Over loop:// the host reads its own STATUS request back: a clean error, not a hang."""
    with pytest.raises(BoardError, match="unexpected reply 0x01 to STATUS"):
        loop_link.status()


# -- a real pseudo-terminal fed forever -------------------------------------------------------
@pytest.mark.parametrize("chunks, error, match", [
    (itertools.repeat(GARBAGE[:64]), BoardTimeout, r"no reply from the board within 0.3 s .*more\)"),
    (itertools.chain([b"\x55\x81\xff\xff"], itertools.repeat(GARBAGE[:64])), BoardError, "length 65535"),
], ids=["garbage-forever", "huge-length-then-garbage"])
def test_a_serial_port_sending_forever_ends_within_the_timeout(chunks, error, match):
    with fed_pty(chunks) as (port, start):
        transport = SerialTransport(port)
        try:
            link = BoardLink(transport, timeout=0.3)
            start()
            t0 = time.monotonic()
            with pytest.raises(error, match=match) as err:
                link.status()
            took = time.monotonic() - t0
        finally:
            transport.close()
    assert took < 0.3 + SerialTransport.READ_GRANULARITY + 0.25         # slack for a loaded machine
    assert len(str(err.value)) < MESSAGE_MAX


@pytest.mark.parametrize("baud", [2**31, 10**30, -5])
def test_a_baud_the_port_refuses_is_an_os_error_naming_it(baud):
    master, slave = os.openpty()
    try:
        with pytest.raises(OSError, match=rf"cannot open serial port .*: baud rate {baud} \(--baud\)"):
            SerialTransport(os.ttyname(slave), baud)
    finally:
        os.close(slave)
        os.close(master)


def test_a_board_unplugged_between_write_and_flush_is_a_board_error():
    """pyserial's flush() is termios.tcdrain: on a port whose other end is gone it raises termios.error,
    neither a SerialException nor an OSError, and `sop board` printed 'internal error ... This is a bug
    in sop' (exit 70), about 1 run in 25 of an unplugged board (an outside probe)."""
    master, slave = os.openpty()
    transport = SerialTransport(os.ttyname(slave), 115200)
    write = transport.port.write

    def write_then_unplug(data):
        n = write(data)
        os.close(master)                # the board goes away once the bytes are with the OS
        return n

    transport.port.write = write_then_unplug
    try:
        with pytest.raises(BoardError, match=rf"^serial port {os.ttyname(slave)} failed while writing: "):
            BoardLink(transport, timeout=1.0).status()
    finally:
        transport.close()
        os.close(slave)


# -- fuzz: arbitrary bytes as replies ---------------------------------------------------------
REPLIES = {Cmd.STATUS: (STATUS_PAYLOAD, STATUS), Cmd.CHECKSUM: (CHECKSUM_PAYLOAD, (1234, 0xDEADBEEF)),
           Cmd.OFFSET: (b"", None), Cmd.SPARSE_STATUS: (SPARSE_STATUS_PAYLOAD, SPARSE_STATUS)}


def run_command(link, cmd):
    if cmd == Cmd.STATUS:
        return link.status()
    if cmd == Cmd.CHECKSUM:
        return link.checksum()
    if cmd == Cmd.SPARSE_STATUS:
        return link.sparse_status()
    return link.set_offset(-3)


def outcome(data: bytes, cmd, endless: bool):
    """What the host makes of ``data`` as the reply to ``cmd`` (repeated forever when ``endless``)."""
    line = FakeLine(itertools.cycle(data) if endless and data else data)
    link = BoardLink(line, timeout=TIMEOUT)
    try:
        result = ("ok", run_command(link, cmd))
    except (BoardError, BoardTimeout) as err:
        assert str(err) and len(str(err)) < MESSAGE_MAX and "\n" not in str(err)
        result = ("error", type(err).__name__)
    assert line.t <= TIMEOUT + BYTE_TIME                     # never longer than the timeout
    return result


@pytest.mark.fuzz
@fuzz(1500)
@given(data=st.binary(max_size=80), cmd=st.sampled_from(list(REPLIES)), endless=st.booleans())
def test_fuzz_arbitrary_bytes_as_a_reply(data, cmd, endless):
    kind, value = outcome(data, cmd, endless)
    if kind == "ok":                                         # only a valid frame gives a result, the right one
        payload, expected = REPLIES[cmd]
        assert value == expected and ok(cmd, payload) in data


@pytest.mark.fuzz
@fuzz(1500)
@given(cmd=st.sampled_from(list(REPLIES)), garbage=st.binary(max_size=40), tail=st.binary(max_size=20),
       cut=st.integers(0, 30), flip=st.tuples(st.integers(0, 30), st.integers(1, 255)) | st.none(),
       endless=st.booleans())
def test_fuzz_damaged_replies_never_give_a_different_result(cmd, garbage, tail, cut, flip, endless):
    """The right reply after garbage, then cut short or with one byte changed: the right result or
    a clean error; a clean line (no start byte in the garbage, the frame intact) gives the right result."""
    payload, expected = REPLIES[cmd]
    frame = bytearray(ok(cmd, payload))
    if flip is not None:
        frame[flip[0] % len(frame)] ^= flip[1]
    frame = bytes(frame[:len(frame) - cut % len(frame)] if cut else frame)
    kind, value = outcome(garbage + frame + tail, cmd, endless)
    intact = frame == ok(cmd, payload)
    if kind == "ok":
        assert value == expected
    if intact and wire.START not in garbage:                 # a clean line: it must be read right
        assert (kind, value) == ("ok", expected)


def _no_port(folder, what: str) -> str:
    """A path that exists and is no serial port (``what``: file, fifo, folder or dev-null)."""
    if what == "file":
        (folder / "port.txt").write_bytes(b"")
        return str(folder / "port.txt")
    if what == "fifo":
        os.mkfifo(folder / "fifo")
        return str(folder / "fifo")
    return {"folder": str(folder), "dev-null": "/dev/null"}[what]


@pytest.mark.parametrize("what, kind", [("file", "a regular file"), ("folder", "a folder"),
                                        ("fifo", r"a FIFO \(named pipe\)"),
                                        ("dev-null", "a device that is not a terminal")])
def test_a_path_that_is_no_serial_device_is_named_so(tmp_path, what, kind):
    """A bring-up's natural slip: a port path that exists but is no serial port. pyserial said only
    "Could not configure port: (25, 'Inappropriate ioctl for device')" (an empty FIFO the same: it
    is refused at once, not waited on)."""
    port = _no_port(tmp_path, what)
    with pytest.raises(OSError, match=rf"^cannot open serial port {re.escape(port)}: it is {kind}, not a serial "
                                      r"device; give the board's port") as err:
        SerialTransport(port)
    assert "\n" not in str(err.value)
