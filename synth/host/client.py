"""The host side of the board protocol (docs/board-protocol.md): the protocol client, in plain Python.

The protocol's numbers, frames and CRC are synth/wire.py's, which the gateware
(synth/gateware/) imports too; this module is the host:

* ``read_frame`` (in ``BoardLink``): the reply frames ``encode_frame``
  (synth/wire.py) writes, checked against zlib's CRC-32 (golden.files.crc32).
* ``BoardLink(transport)``: the commands (status, LUT load, offset, blocks,
  checksum of the decoded values; on a board with the residual path, sparse
  entries and the sparse status) over any byte transport, request then reply;
  ``sparse_layer`` streams a layer with sparse entries, its SPARSE and BLOCKS
  frames interleaved so that the board's entry queue never blocks; on a board
  with the GEMV engine, ``gemv_status`` / ``gemv_layer`` (GEMV_LOAD's tables through
  ``load(words, Cmd.GEMV_LOAD)``, then GEMV_LAYER) /
  ``gemv_x`` / ``gemv_w`` / ``gemv_sparse`` / ``gemv_y`` / ``read_y`` (a board
  without it answers them UNKNOWN_CMD: a ``BoardError`` with that code);
  ``gemv_pass`` streams a layer's blocks tile by tile, each tile's sparse
  entries after its blocks (GEMV_W and GEMV_SPARSE frames interleaved as the
  engine takes them).
  A transport has ``write(data: bytes)`` and ``read(n: int, timeout: float) ->
  bytes`` (at most ``n`` bytes; fewer when ``timeout`` seconds pass without the
  rest, and it blocks, not spins, while it waits), and optionally ``now()``
  (its clock, in the seconds of those timeouts), which a pyserial ``Serial``
  wrapped in ``SerialTransport`` provides, and the amaranth.sim bridge of
  synth/gateware/simboard.py too.
* ``beat_bytes_of``: input beats as integers to their bytes on the wire.

What the board must report for a layer is ``wire.values_checksum`` of the
expected output beats (hdl.reference.expected_beats).

Errors: ``BoardTimeout`` when no complete reply comes within the timeout, with
what was received; ``BoardError`` for an error reply from the board (bad CRC,
unknown command, oversized length, bad length, byte-gap timeout, garbage) or a
reply that is itself corrupt or malformed; ``resync()`` drains the line after one.

Contract (the host never hangs, never buffers without bound): ``read_frame``
waits at most ``timeout`` seconds for a whole reply (one deadline from the
moment the wait starts, not one per byte, so a line that keeps sending garbage
or start bytes that never make a frame still ends in ``BoardTimeout``), plus one
read granularity of the transport (50 ms for ``SerialTransport``); it keeps the
first ``GARBAGE_KEPT`` bytes of garbage for the message and only counts the
rest, and refuses a length field over ``min(max_payload, MAX_REPLY_PAYLOAD)``
at once. Every reply payload is length-checked before it is decoded (STATUS,
after its version byte: ``version_refusal`` names a board of another protocol
version; CHECKSUM, error replies), so a short or malformed reply is a ``BoardError``
naming what was wrong, never a ``struct.error`` or ``IndexError``. ``resync()``
gives up (``BoardTimeout``) when the line does not go quiet within
``timeout + quiet``. Time is the transport's: ``transport.now()`` when it has
one (simulated seconds for synth/gateware/simboard.py), else ``time.monotonic``.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import time

from sop.golden.files import crc32
import bisect

from sop.synth.wire import (CHECKSUM_FORMAT, CLEAR_FLAG, CRC_BYTES, DEFAULT_BAUD, DEFAULT_MAX_PAYLOAD, ENTRY_LAST,
                            ERROR_PAYLOAD_BYTES, ERROR_REPLY, GEMV_ENTRY_FORMAT, GEMV_LAYER_FORMAT,
                            GEMV_STATUS_FORMAT, HEADER_BYTES, LAST_FLAG, LOAD_ENTRY_BYTES, PROTOCOL_VERSION, REPLY_BIT,
                            REPLY_PAYLOAD_BYTES, SPARSE_ENTRY_BYTES, SPARSE_LAYER_FLAG,
                            SPARSE_STATUS_FORMAT, START, STATUS_FORMAT, SWAP_FLAG, X_LAST, X_SWAP, Y_MAX_WORDS,
                            Y_WORD_BYTES, Cmd, Err, GemvStatus, SparseStatus, Status, encode_frame)

# The host's bounds on what it reads (it never waits for, or keeps, more): a reply's payload (replies
# are at most 16 bytes in this version, GEMV_STATUS 24 and GEMV_Y 256; the cap stays below a bogus
# 64 KiB length field), the garbage
# bytes quoted in an error message (the rest are only counted), the bytes resync() hands back.
MAX_REPLY_PAYLOAD = DEFAULT_MAX_PAYLOAD
GARBAGE_KEPT = 64
RESYNC_KEPT = 4096


class BoardError(RuntimeError):
    """The board answered with an error reply, or sent a corrupt reply."""

    def __init__(self, message: str, code: Err | None = None, cmd: int | None = None):
        super().__init__(message)
        self.code, self.cmd = code, cmd


class BoardTimeout(TimeoutError):
    """No complete reply within the timeout."""


class SerialTransport:
    """A pyserial port (a device or a pyserial URL) as a transport; ``OSError`` naming the port
    when it cannot be opened (and what the path is when it exists but is no serial device).

    Reads wait in pyserial's 50 ms reads (the granularity of a timeout); writes give up after
    ``write_timeout`` (a stuck port must not hang the host either) with ``BoardTimeout``, and an
    I/O error of an open port (a board unplugged) is a ``BoardError``, not a usage error.
    """

    READ_GRANULARITY = 0.05

    def __init__(self, port: str, baud: int = DEFAULT_BAUD):
        import serial                  # noqa: PLC0415  (only real boards need it: imported on use)
        self.name, self.serial = port, serial
        # what an open port raises when the board goes away: pyserial's own, the OS's, and termios's from
        # flush() (tcdrain on a pty or USB adapter that vanished), which is neither
        try:
            import termios             # noqa: PLC0415  (POSIX only)
            self.io_errors = (serial.SerialException, OSError, termios.error)
        except ImportError:
            self.io_errors = (serial.SerialException, OSError)
        # the longest frame twice over on the wire (10 bits a byte), and a second for the OS
        self.write_timeout = 1.0 + 2 * 10 * (HEADER_BYTES + DEFAULT_MAX_PAYLOAD + CRC_BYTES) / max(baud, 1)
        try:
            # a device path, or a pyserial URL (loop:// in tests, socket:// or rfc2217:// for a remote port)
            self.port = serial.serial_for_url(port, baud, timeout=self.READ_GRANULARITY,
                                              write_timeout=self.write_timeout)
        except (ValueError, OverflowError) as err:       # a baud pyserial or the OS cannot set, or a bad URL
            if "URL" in str(err):                         # pyserial's "invalid URL, protocol 'x' not known"
                raise OSError(f"cannot open serial port {port}: not a port pyserial knows ({err}); give a "
                              f"device such as /dev/ttyUSB1 or a URL such as socket://HOST:PORT") from None
            raise OSError(f"cannot open serial port {port}: baud rate {baud} (--baud) is not one it "
                          f"accepts ({err})") from None
        except KeyError as err:                           # pyserial's loop:// with an option it lacks
            raise OSError(f"cannot open serial port {port}: pyserial refuses the URL's options (no {err})") from None
        except serial.SerialException as err:
            if kind := _not_a_port(port):
                # pyserial's own words for these ("Could not configure port: (25, 'Inappropriate ioctl
                # for device')") name no cause a bring-up can act on
                raise OSError(f"cannot open serial port {port}: it is {kind}, not a serial device; give the "
                              f"board's port (ls /dev/ttyUSB* /dev/ttyACM*)") from None
            raise OSError(f"cannot open serial port {port} at {baud} Bd: {err}; check the port name "
                          f"(ls /dev/ttyUSB* /dev/ttyACM*), that the board is plugged in and that "
                          f"you may use the port (the dialout group)") from None

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except self.serial.SerialTimeoutException:
            raise BoardTimeout(f"serial port {self.name} did not take {len(data)} bytes within "
                               f"{self.write_timeout:.3g} s; check the port and the board") from None
        except self.io_errors as err:
            raise BoardError(f"serial port {self.name} failed while writing: {err}") from None

    def read(self, n: int, timeout: float) -> bytes:
        out = bytearray()
        deadline = time.monotonic() + timeout
        try:
            while len(out) < n and time.monotonic() < deadline:     # each read blocks up to 50 ms
                out += self.port.read(n - len(out))
        except self.io_errors as err:
            raise BoardError(f"serial port {self.name} failed while reading: {err}") from None
        return bytes(out)

    def close(self) -> None:
        self.port.close()


def _not_a_port(port: str) -> str:
    """What the existing path ``port`` is when it cannot be a serial port (a regular file, a folder,
    a FIFO, a socket, a device that is not a terminal such as /dev/null), else ''."""
    try:
        mode = os.stat(port).st_mode
    except (OSError, ValueError):                 # absent, unreadable, or a pyserial URL
        return ""
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    if stat.S_ISCHR(mode):
        try:
            fd = os.open(port, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:                           # no access: pyserial's message says so
            return ""
        try:
            return "" if os.isatty(fd) else "a device that is not a terminal"
        finally:
            os.close(fd)
    return ""


def _check_seconds(what: str, value) -> float:
    """``value`` as seconds to wait: positive and finite (an infinite or NaN wait could hang)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value}")
    return value


def _quote(kept: bytes, total: int) -> str:
    """Bytes for an error message: the ones kept in hex, and how many more were only counted."""
    if not total:
        return "none"
    return kept.hex() + (f"... ({total - len(kept)} more)" if total > len(kept) else "")


def version_refusal(version: int) -> str:
    """The one line for a board that speaks another protocol version than this host."""
    return (f"the board speaks protocol version {version}, this host {PROTOCOL_VERSION}: its bitstream was "
            f"built from another checkout; rebuild the bitstream from this one and load it (make bitstream "
            f"BOARD=...)")


def _cmd_name(cmd: int) -> str:
    return Cmd(cmd).name if cmd in Cmd._value2member_map_ else f"{cmd:#04x}"


class BoardLink:
    """The protocol's commands over a byte transport; each waits for its reply.

    ``timeout``: seconds to wait for a whole reply (positive and finite) before ``BoardTimeout``.
    ``max_payload``: the board's (``status().max_payload``); frames are cut to fit.
    ``clock``: the time the timeout is measured in (default: ``transport.now`` if the transport
    has one, else ``time.monotonic``).
    """

    def __init__(self, transport, *, timeout: float = 1.0, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 clock=None):
        self.transport, self.timeout, self.max_payload = transport, timeout, max_payload
        self.clock = clock or getattr(transport, "now", time.monotonic)

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = _check_seconds("the reply timeout", value)

    # -- frames ------------------------------------------------------------------------
    def send(self, cmd: int, payload: bytes = b"") -> None:
        self.transport.write(encode_frame(cmd, payload))

    def read_frame(self) -> tuple[int, bytes]:
        """The next reply frame as (cmd, payload); bytes before a start byte are skipped.

        One deadline, ``timeout`` after the call, for the whole frame. Reads never go past the
        frame's end (the next frame, if any, stays in the transport): while hunting for a start
        byte at most a minimal frame's 8 bytes, then exactly the bytes the frame still lacks.
        """
        deadline = self.clock() + self.timeout
        limit = min(self.max_payload, MAX_REPLY_PAYLOAD)
        garbage, n_garbage = bytearray(), 0      # bytes before the start byte: the first kept, all counted
        frame = bytearray()                       # from the start byte on (at most 8 + limit bytes)
        length = 0
        while True:
            need = HEADER_BYTES + length + CRC_BYTES - len(frame)
            if need <= 0:
                break
            remaining = deadline - self.clock()
            if not remaining > 0:
                what = ("a start byte" if not frame else "the reply header" if len(frame) < HEADER_BYTES
                        else f"{length} payload bytes and the CRC")
                got = [_quote(bytes(garbage), n_garbage)] if n_garbage else []
                got += [_quote(bytes(frame[:GARBAGE_KEPT]), len(frame))] if frame else []
                raise BoardTimeout(f"no reply from the board within {self.timeout} s while waiting for "
                                   f"{what} ({n_garbage + len(frame)} reply bytes received: "
                                   f"{', then '.join(got) or 'none'}); check the port, the baud rate "
                                   f"and that the bitstream is loaded")
            data = self.transport.read(need, remaining)
            if not frame:
                at = data.find(START)
                junk = data if at < 0 else data[:at]
                garbage += junk[:max(GARBAGE_KEPT - len(garbage), 0)]
                n_garbage += len(junk)
                data = b"" if at < 0 else data[at:]
            had = len(frame)
            frame += data
            if had < HEADER_BYTES <= len(frame):
                length = struct.unpack_from("<H", frame, 2)[0]
                if length > limit:               # a bogus length: neither waited for nor buffered
                    raise BoardError(f"corrupt reply from the board: length {length} is over the "
                                     f"{limit}-byte limit of a reply (header "
                                     f"{frame[:HEADER_BYTES].hex()})")
        body = bytes(frame[1:HEADER_BYTES + length])             # cmd, len, payload: what the CRC covers
        crc = struct.unpack_from("<I", frame, HEADER_BYTES + length)[0]
        if crc32(body) != crc:
            raise BoardError(f"corrupt reply from the board (CRC {crc:#010x}, expected "
                             f"{crc32(body):#010x}): {_quote(bytes(frame[:GARBAGE_KEPT]), len(frame))}")
        return body[0], body[3:]

    def _error_payload(self, payload: bytes) -> tuple[Err | None, int]:
        """(code, the frame command the board saw) of an error reply; ``BoardError`` if malformed."""
        if len(payload) != ERROR_PAYLOAD_BYTES:
            raise BoardError(f"malformed error reply from the board: {len(payload)} payload bytes "
                             f"({payload.hex() or 'empty'}), expected {ERROR_PAYLOAD_BYTES} (code, command)")
        code = Err(payload[0]) if payload[0] in Err._value2member_map_ else None
        return code, payload[1]

    def reply(self, cmd: int) -> bytes:
        """Wait for the reply to ``cmd``; ``BoardError`` for an error reply or a malformed one."""
        return self._checked_length(cmd, self._ok_payload(cmd))

    def _ok_payload(self, cmd: int) -> bytes:
        """The payload of the OK reply to ``cmd``, its length not yet checked; ``BoardError`` for an
        error reply or the reply to another command."""
        rcmd, payload = self.read_frame()
        if rcmd == ERROR_REPLY:
            code, seen = self._error_payload(payload)
            name = code.name if code else f"unknown error code {payload[0]}"
            raise BoardError(f"the board replied {name} (frame command {seen:#04x}) to {_cmd_name(cmd)}",
                             code, seen)
        if rcmd != cmd | REPLY_BIT:
            raise BoardError(f"unexpected reply {rcmd:#04x} to {_cmd_name(cmd)} (expected "
                             f"{cmd | REPLY_BIT:#04x} or an error reply): out of step or not this "
                             f"protocol (is this project's bitstream on the board? BoardLink.resync() drops "
                             f"a stale reply)")
        return payload

    @staticmethod
    def _checked_length(cmd: int, payload: bytes) -> bytes:
        want = REPLY_PAYLOAD_BYTES.get(cmd)
        if want is not None and len(payload) != want:
            raise BoardError(f"malformed {_cmd_name(cmd)} reply from the board: {len(payload)} payload "
                             f"bytes ({payload.hex() or 'empty'}), expected {want}")
        return payload

    def command(self, cmd: int, payload: bytes = b"") -> bytes:
        self.send(cmd, payload)
        return self.reply(cmd)

    def error_reply(self) -> Err:
        """Wait for an error reply (after bad input was sent on purpose) and return its code."""
        rcmd, payload = self.read_frame()
        if rcmd != ERROR_REPLY:
            raise BoardError(f"expected an error reply, got command {rcmd:#04x} {payload.hex()}")
        code, _ = self._error_payload(payload)
        if code is None:
            raise BoardError(f"error reply with an unknown code {payload[0]}")
        return code

    def resync(self, quiet: float | None = None) -> bytes:
        """Discard whatever arrives until the line is quiet for ``quiet`` seconds (default ``timeout / 4``).

        Returns the first ``RESYNC_KEPT`` bytes discarded; ``BoardTimeout`` when the line has not
        been quiet for ``quiet`` seconds within ``timeout + quiet`` (a line that never stops).
        """
        quiet = _check_seconds("the quiet time", self.timeout / 4 if quiet is None else quiet)
        limit = self.timeout + quiet
        deadline = self.clock() + limit
        kept, total = bytearray(), 0
        while (remaining := deadline - self.clock()) > 0:
            wait = min(quiet, remaining)
            chunk = self.transport.read(RESYNC_KEPT, wait)
            if not chunk and wait >= quiet:
                return bytes(kept)
            kept += chunk[:max(RESYNC_KEPT - len(kept), 0)]
            total += len(chunk)
        raise BoardTimeout(f"the line from the board was not quiet for {quiet} s within {limit} s "
                           f"({total} bytes discarded: {_quote(bytes(kept[:GARBAGE_KEPT]), total)}); "
                           f"check the port, the baud rate and that the bitstream is loaded")

    # -- commands ------------------------------------------------------------------------
    def status(self) -> Status:
        self.send(Cmd.STATUS)
        return self.status_reply()

    def status_reply(self) -> Status:
        """STATUS's reply, decoded. Its first byte, the protocol version, is checked before its length:
        another version's STATUS may be of another length (version 1's had no format id: 12 bytes), and
        its board is named so, not taken for a malformed reply."""
        payload = self._ok_payload(Cmd.STATUS)
        if payload and payload[0] != PROTOCOL_VERSION:
            raise BoardError(version_refusal(payload[0]))
        return Status(*struct.unpack(STATUS_FORMAT, self._checked_length(Cmd.STATUS, payload)))

    def load(self, words, cmd: Cmd = Cmd.LOAD) -> None:
        """LUT words ``(bank, addr, data)`` into the inactive page, as many frames as needed
        (``cmd`` GEMV_LOAD: the GEMV engine's tables)."""
        entries = [bytes([bank << 7 | addr]) + struct.pack("<H", data) for bank, addr, data in words]
        per = self.max_payload // LOAD_ENTRY_BYTES
        for i in range(0, len(entries), per):
            self.command(cmd, b"".join(entries[i:i + per]))

    def set_offset(self, offset: int, *, sparse: bool = False) -> None:
        """The inactive page's offset; ``sparse``: its layer has sparse entries (the flags byte,
        sent only then: a board without the residual path takes the 1-byte form only)."""
        flags = bytes([SPARSE_LAYER_FLAG]) if sparse else b""
        self.command(Cmd.OFFSET, struct.pack("<b", offset) + flags)

    def blocks(self, beats: list[bytes], *, swap: bool) -> None:
        """Input beats (each ``beat_bytes`` bytes, golden.layout's packing); ``swap`` on the first."""
        if not beats:
            return
        per = (self.max_payload - 1) // len(beats[0])
        for i in range(0, len(beats), per):
            flags = SWAP_FLAG if swap and i == 0 else 0
            self.command(Cmd.BLOCKS, bytes([flags]) + b"".join(beats[i:i + per]))

    def checksum(self, *, clear: bool = False) -> tuple[int, int]:
        """(lane words decoded, CRC-32 of them) since reset or the last clear; waits for the pipeline."""
        reply = self.command(Cmd.CHECKSUM, bytes([CLEAR_FLAG if clear else 0]))   # length checked
        count, crc = struct.unpack(CHECKSUM_FORMAT, reply)
        return count, crc

    def load_layer(self, luts, offset: int, *, sparse: bool = False) -> None:
        """A layer's tables (``luts[bank][addr]``) and offset (and its sparse flag), into the inactive page."""
        self.load([(b, a, int(luts[b][a])) for b in range(len(luts)) for a in range(len(luts[b]))])
        self.set_offset(offset, sparse=sparse)

    def sparse_status(self) -> SparseStatus:
        """The residual path's status: adders, the decoder's sticky error bits, the entry queue's depth."""
        return SparseStatus(*struct.unpack(SPARSE_STATUS_FORMAT, self.command(Cmd.SPARSE_STATUS)))

    def sparse(self, entries, *, last: bool) -> None:
        """Sparse entries ``(index, bf16)`` into the board's queue, as many frames as needed;
        ``last``: the final entry is the layer's last. Nothing is checked here (``sparse_layer``
        streams a layer; the bring-up checks its table first)."""
        entries = list(entries)
        if not entries:
            return
        per = (self.max_payload - 1) // SPARSE_ENTRY_BYTES
        for i in range(0, len(entries), per):
            flags = LAST_FLAG if last and i + per >= len(entries) else 0
            self.command(Cmd.SPARSE, bytes([flags]) + b"".join(struct.pack("<IH", int(x), int(v))
                                                               for x, v in entries[i:i + per]))

    def sparse_layer(self, beats: list[bytes], entries, values_per_beat: int, queue: int) -> None:
        """A layer with sparse entries ``(index, bf16)`` (strictly increasing), its swap beat first.

        The swap beat goes alone (the entries may only follow it); then, before each BLOCKS
        frame, the entries its values need and the first one beyond them (the decoder holds a
        chunk until it knows all of its entries), the last one flagged. A frame is cut so that
        its entries and that one fit the board's ``queue``: the board queues every entry the
        host sent, the decoder drains the queue as it decodes the beats already sent, so a
        SPARSE frame never waits on beats that have not been sent.
        """
        entries = [(int(i), int(v)) for i, v in entries]
        if not beats or not entries:
            raise ValueError("a sparse layer needs at least one beat and one entry")
        index = [i for i, _ in entries]
        per = max(1, (self.max_payload - 1) // len(beats[0]))
        if queue < values_per_beat + 2:
            raise ValueError(f"the board's sparse queue of {queue} entries cannot hold one beat's "
                             f"{values_per_beat} entries and the one beyond")
        room = queue - 1                               # the frame's entries and the one beyond
        self.blocks(beats[:1], swap=True)
        sent, done = 0, 1                              # entries sent, beats sent
        while done < len(beats) or sent < len(entries):
            end = min(len(beats), done + per)
            # the entries below the frame's end not yet sent, and the one beyond, must fit the queue
            while end > done and bisect.bisect_left(index, end * values_per_beat) - sent + 1 > room:
                end -= 1
            need = min(len(entries), bisect.bisect_left(index, end * values_per_beat) + 1)
            if end == done and need == sent:          # cannot happen with the queue checked above
                raise ValueError(f"sparse entries from index {index[sent]} do not fit a queue of {queue}")
            if need > sent:
                self.sparse(entries[sent:need], last=need == len(entries))
                sent = need
            if end > done:
                self.blocks(beats[done:end], swap=False)
                done = end


    # -- the GEMV engine (GEMV_* commands; a board without it answers UNKNOWN_CMD) -----------------
    def gemv_status(self, *, clear: bool = False) -> GemvStatus:
        """The engine's status bits, its y FIFO and counters; ``clear``: then clear the sticky
        error bits and the counters."""
        reply = self.command(Cmd.GEMV_STATUS, bytes([CLEAR_FLAG]) if clear else b"")    # length checked
        return GemvStatus(*struct.unpack(GEMV_STATUS_FORMAT, reply))

    def gemv_layer(self, luts, rows: int, blocks_per_row: int, offset: int, *, sparse: bool = False) -> None:
        """A layer's tables (``luts[bank][addr]``) and registers into the engine's inactive page;
        ``sparse``: its tiles are followed by residual entries (the flags byte, sent only then)."""
        self.load([(b, a, int(luts[b][a])) for b in range(len(luts)) for a in range(len(luts[b]))],
                  Cmd.GEMV_LOAD)
        flags = bytes([SPARSE_LAYER_FLAG]) if sparse else b""
        self.command(Cmd.GEMV_LAYER, struct.pack(GEMV_LAYER_FORMAT, rows, blocks_per_row, offset) + flags)

    def gemv_x(self, codes, group: int, *, swap: bool) -> None:
        """One activation vector (E4M3 codes, ``group`` a beat: its length a multiple of it);
        ``swap``: its first beat starts the layer just written. Nothing is checked here."""
        data = bytes(int(c) & 0xFF for c in codes)
        per = (self.max_payload - 1) // group * group
        for i in range(0, len(data), per):
            flags = (X_SWAP if swap and i == 0 else 0) | (X_LAST if i + per >= len(data) else 0)
            self.command(Cmd.GEMV_X, bytes([flags]) + data[i:i + per])

    def gemv_w(self, blocks: bytes, block_bytes: int) -> None:
        """Packed blocks (``block_bytes`` each, golden.dot.tile_order), as many frames as needed."""
        per = self.max_payload // block_bytes * block_bytes
        for i in range(0, len(blocks), per):
            self.command(Cmd.GEMV_W, blocks[i:i + per])

    def gemv_sparse(self, entries) -> None:
        """Sparse entries ``(row, col, bf16, last)`` (golden.dot.tile_residuals' order; ``last``: the
        row's last) into the engine's queue, as many frames as needed. Nothing is checked here."""
        size = struct.calcsize(GEMV_ENTRY_FORMAT)
        data = [struct.pack(GEMV_ENTRY_FORMAT, int(r), int(c), int(v), ENTRY_LAST if k else 0)
                for r, c, v, k in entries]
        per = self.max_payload // size
        for i in range(0, len(data), per):
            self.command(Cmd.GEMV_SPARSE, b"".join(data[i:i + per]))

    def gemv_pass(self, tiles, block_bytes: int) -> None:
        """One pass of a layer: ``tiles``, per row tile of the engine, (its blocks' bytes in
        golden.dot.tile_order, its sparse entries or none). The engine takes a tile's entries only
        after the tile's last block, and the next tile's blocks only after those entries: so each
        tile's GEMV_W frames end at its last block and its GEMV_SPARSE frames follow. No frame waits
        on one not yet sent, whatever the depth of the board's entry queue."""
        for blocks, entries in tiles:
            self.gemv_w(blocks, block_bytes)
            self.gemv_sparse(entries)

    def gemv_y(self, count: int) -> list[int]:
        """The y words (FP32 bit patterns) the board has, at most ``count`` (one GEMV_Y)."""
        count = min(count, Y_MAX_WORDS, self.max_payload // Y_WORD_BYTES)
        reply = self.command(Cmd.GEMV_Y, struct.pack("<H", count))
        if len(reply) % Y_WORD_BYTES or len(reply) > Y_WORD_BYTES * count:
            raise BoardError(f"malformed GEMV_Y reply from the board: {len(reply)} payload bytes for at "
                             f"most {count} words of {Y_WORD_BYTES} bytes")
        return list(struct.unpack(f"<{len(reply) // Y_WORD_BYTES}I", reply))

    def read_y(self, n: int) -> list[int]:
        """``n`` y words; ``BoardTimeout`` when none comes for ``timeout`` seconds, ``BoardError``
        (code NO_Y) when the board owes none (no vector loaded: y read before x)."""
        out: list[int] = []
        deadline = self.clock() + self.timeout
        while len(out) < n:
            try:
                got = self.gemv_y(n - len(out))
            except BoardError as err:
                if err.code == Err.NO_Y:
                    raise BoardError(f"the board has no y to read after {len(out)} of {n} words: no "
                                     f"vector is loaded (y read before x, or x refused)", err.code,
                                     err.cmd) from None
                raise
            if got:
                out += got
                deadline = self.clock() + self.timeout
            elif self.clock() > deadline:
                raise BoardTimeout(f"the board's GEMV engine gave {len(out)} of {n} y words and no more "
                                   f"within {self.timeout} s")
        return out


def beat_bytes_of(beats: list[int], beat_bytes: int) -> list[bytes]:
    """Input beats as integers (hdl.reference.input_beats) to their bytes on the wire."""
    return [int(b).to_bytes(beat_bytes, "little") for b in beats]
