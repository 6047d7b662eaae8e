"""The host side of the board protocol (docs/board-protocol.md), in plain Python.

This module is the one definition of the protocol's numbers (start byte,
commands, error codes, the CRC) that the gateware (synth/protocol.py) imports
too, plus the host:

* ``encode_frame`` / ``read_frame``: frames ``0x55 | cmd | len u16 LE | payload |
  crc32 LE``, the CRC being zlib's CRC-32 (golden.artifact.crc32) over
  ``cmd``, ``len`` and ``payload``.
* ``BoardLink(transport)``: the commands (status, LUT load, offset, blocks,
  checksum of the decoded values) over any byte transport, request then reply.
  A transport has ``write(data: bytes)`` and ``read(n: int, timeout: float) ->
  bytes`` (at most ``n`` bytes; fewer when ``timeout`` seconds pass without the
  rest), which a pyserial ``Serial`` wrapped in ``SerialTransport`` provides, and
  the amaranth.sim bridge of synth/simboard.py too.
* ``values_checksum``: the (count, CRC-32) the board must report for a list of
  expected output beats (hdl.reference.expected_beats).

Errors: ``BoardTimeout`` when no (complete) reply comes within the timeout,
with what was received; ``BoardError`` for an error reply from the board
(bad CRC, unknown command, oversized length, bad length, byte-gap timeout,
garbage) or a reply that is itself corrupt; ``resync()`` drains the line after one.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass

from sop.golden.artifact import crc32

PROTOCOL_VERSION = 1
START = 0x55
CRC_BYTES = 4
HEADER_BYTES = 4                       # start, cmd, len (u16 LE)
REPLY_BIT = 0x80                       # an OK reply's cmd is the request's cmd | 0x80
ERROR_REPLY = 0xFF                     # an error reply's cmd
LOAD_ENTRY_BYTES = 3                   # {bank << 7 | addr}, HIF data u16 LE
SWAP_FLAG = 0x01                       # BLOCKS flags: the frame's first beat carries swap
CLEAR_FLAG = 0x01                      # CHECKSUM flags: restart count and CRC after the reply
DEFAULT_MAX_PAYLOAD = 256


class Cmd(enum.IntEnum):
    STATUS = 0x01
    LOAD = 0x02
    OFFSET = 0x03
    BLOCKS = 0x04
    CHECKSUM = 0x05


class Err(enum.IntEnum):
    BAD_CRC = 1
    UNKNOWN_CMD = 2
    OVERSIZE = 3
    BAD_LENGTH = 4
    TIMEOUT = 5            # byte gap inside a frame: the half-received frame is dropped
    GARBAGE = 6            # bytes outside a frame (reported once per run of them)


class BoardError(RuntimeError):
    """The board answered with an error reply, or sent a corrupt reply."""

    def __init__(self, message: str, code: Err | None = None, cmd: int | None = None):
        super().__init__(message)
        self.code, self.cmd = code, cmd


class BoardTimeout(TimeoutError):
    """No complete reply within the timeout."""


@dataclass(frozen=True)
class Status:
    version: int
    lanes: int
    code_bits: int
    group: int
    beat_bytes: int
    lane_bytes: int
    hif_bits: int
    banks: int
    max_payload: int
    errors: int            # error replies the board has sent since reset (mod 2^16)


STATUS_FORMAT = "<8BHH"


def encode_frame(cmd: int, payload: bytes = b"") -> bytes:
    body = bytes([cmd]) + struct.pack("<H", len(payload)) + bytes(payload)
    return bytes([START]) + body + struct.pack("<I", crc32(body))


def crc32_update_byte(crc: int, byte: int) -> int:
    """One byte into the raw (reflected, not inverted) CRC-32 register, as the gateware does it."""
    crc ^= byte
    for _ in range(8):
        crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc


def lane_bytes(lane_bits: int) -> int:
    return (lane_bits + 7) // 8


def values_checksum(beats: list[list[int]], lane_bits: int) -> tuple[int, int]:
    """(number of lane words, CRC-32 of the words in order, each ``lane_bytes`` bytes LE)."""
    nb = lane_bytes(lane_bits)
    data = b"".join(int(w).to_bytes(nb, "little") for beat in beats for w in beat)
    return sum(len(b) for b in beats), crc32(data)


class SerialTransport:
    """A pyserial port as a transport; ``OSError`` naming the port when it cannot be opened."""

    def __init__(self, port: str, baud: int = 115200):
        import serial                  # noqa: PLC0415  (only real boards need it: imported on use)
        try:
            self.port = serial.Serial(port, baud, timeout=0.05)
        except (serial.SerialException, ValueError) as err:   # ValueError: a baud it cannot set
            raise OSError(f"cannot open serial port {port} at {baud} Bd: {err}; check the port name "
                          f"(ls /dev/ttyUSB* /dev/ttyACM*), that the board is plugged in and that "
                          f"you may use the port (the dialout group)") from None

    def write(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def read(self, n: int, timeout: float) -> bytes:
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += self.port.read(n - len(out))
        return bytes(out)

    def close(self) -> None:
        self.port.close()


class BoardLink:
    """The protocol's commands over a byte transport; each waits for its reply.

    ``timeout``: seconds without a byte of the reply before ``BoardTimeout``.
    ``max_payload``: the board's (``status().max_payload``); frames are cut to fit.
    """

    def __init__(self, transport, *, timeout: float = 1.0, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.transport, self.timeout, self.max_payload = transport, timeout, max_payload

    # -- frames ------------------------------------------------------------------------
    def send(self, cmd: int, payload: bytes = b"") -> None:
        self.transport.write(encode_frame(cmd, payload))

    def _read(self, n: int, what: str, got: bytes) -> bytes:
        data = self.transport.read(n, self.timeout)
        if len(data) < n:
            raise BoardTimeout(f"no reply from the board within {self.timeout} s while waiting for "
                               f"{what} ({len(got) + len(data)} reply bytes received: "
                               f"{(got + data).hex() or 'none'}); check the port, the baud rate "
                               f"and that the bitstream is loaded")
        return data

    def read_frame(self) -> tuple[int, bytes]:
        """The next reply frame as (cmd, payload); bytes before a start byte are skipped."""
        skipped = b""
        while True:
            b = self._read(1, "a start byte", skipped)
            if b[0] == START:
                break
            skipped += b
        head = self._read(3, "the reply header", skipped + b)
        cmd, length = head[0], struct.unpack("<H", head[1:])[0]
        rest = self._read(length + CRC_BYTES, f"{length} payload bytes and the CRC",
                          skipped + b + head)
        payload, crc = rest[:length], struct.unpack("<I", rest[length:])[0]
        if crc32(head + payload) != crc:
            raise BoardError(f"corrupt reply from the board (CRC {crc:#010x}, expected "
                             f"{crc32(head + payload):#010x}): {(head + rest).hex()}")
        return cmd, payload

    def reply(self, cmd: int) -> bytes:
        """Wait for the reply to ``cmd``; raises ``BoardError`` for an error reply."""
        rcmd, payload = self.read_frame()
        if rcmd == ERROR_REPLY:
            code = Err(payload[0]) if payload and payload[0] in Err._value2member_map_ else None
            seen = payload[1] if len(payload) > 1 else None
            name = code.name if code else f"code {payload[:1].hex()}"
            raise BoardError(f"the board replied {name} (frame command {seen:#04x}) to "
                             f"{Cmd(cmd).name if cmd in Cmd._value2member_map_ else hex(cmd)}",
                             code, seen)
        if rcmd != cmd | REPLY_BIT:
            raise BoardError(f"reply {rcmd:#04x} to command {cmd:#04x}: out of step (call resync())")
        return payload

    def command(self, cmd: int, payload: bytes = b"") -> bytes:
        self.send(cmd, payload)
        return self.reply(cmd)

    def error_reply(self) -> Err:
        """Wait for an error reply (after bad input was sent on purpose) and return its code."""
        rcmd, payload = self.read_frame()
        if rcmd != ERROR_REPLY:
            raise BoardError(f"expected an error reply, got command {rcmd:#04x} {payload.hex()}")
        return Err(payload[0])

    def resync(self, quiet: float | None = None) -> bytes:
        """Discard whatever arrives until the line is quiet for ``quiet`` seconds; returns it."""
        quiet = self.timeout / 4 if quiet is None else quiet
        out = b""
        while chunk := self.transport.read(4096, quiet):
            out += chunk
        return out

    # -- commands ------------------------------------------------------------------------
    def status(self) -> Status:
        return Status(*struct.unpack(STATUS_FORMAT, self.command(Cmd.STATUS)))

    def load(self, words) -> None:
        """LUT words ``(bank, addr, data)`` into the inactive page, as many frames as needed."""
        entries = [bytes([bank << 7 | addr]) + struct.pack("<H", data) for bank, addr, data in words]
        per = self.max_payload // LOAD_ENTRY_BYTES
        for i in range(0, len(entries), per):
            self.command(Cmd.LOAD, b"".join(entries[i:i + per]))

    def set_offset(self, offset: int) -> None:
        self.command(Cmd.OFFSET, struct.pack("<b", offset))

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
        count, crc = struct.unpack("<II", self.command(Cmd.CHECKSUM, bytes([CLEAR_FLAG if clear else 0])))
        return count, crc

    def load_layer(self, luts, offset: int) -> None:
        """A layer's tables (``luts[bank][addr]``) and offset, into the inactive page."""
        self.load([(b, a, int(luts[b][a])) for b in range(len(luts)) for a in range(len(luts[b]))])
        self.set_offset(offset)


def beat_bytes_of(beats: list[int], beat_bytes: int) -> list[bytes]:
    """Input beats as integers (hdl.reference.input_beats) to their bytes on the wire."""
    return [int(b).to_bytes(beat_bytes, "little") for b in beats]
