"""The board protocol on the wire (docs/board-protocol.md): its numbers, frames and CRC.

Plain Python, no Amaranth and no I/O: the one definition that both ends
import, the gateware (synth/gateware/protocol.py builds its constants and its
CRC network from these) and the host (synth/host/client.py). Neither end
imports the other.

* constants: ``PROTOCOL_VERSION``, ``START``, the header and CRC sizes, the
  reply bit, the error reply's command, the LOAD and SPARSE entry sizes, the
  BLOCKS, CHECKSUM, OFFSET and SPARSE flags, the boards' default max payload
  and sparse entry queue;
* ``Cmd`` (request commands) and ``Err`` (error codes);
* ``Status`` and ``STATUS_FORMAT`` (the STATUS reply payload), ``SparseStatus`` and
  ``SPARSE_STATUS_FORMAT`` (the SPARSE_STATUS reply), ``SPARSE_ERRORS`` (the names of the
  decoder's sticky ``sparse_error`` bits, LSB first: imported from hdl, which defines them and builds
  the hardware's layout from them), ``CHECKSUM_FORMAT``,
  ``REPLY_PAYLOAD_BYTES`` (the OK reply payload of each command);
* ``encode_frame``: ``0x55 | cmd | len u16 LE | payload | crc32 LE``, the CRC
  being zlib's CRC-32 (golden.files.crc32) over ``cmd``, ``len`` and ``payload``;
* ``crc32_update_byte``: one byte into the raw CRC-32 register, as the gateware
  updates it (a frame followed by its own CRC leaves ``CRC_RESIDUE``);
* ``lane_bytes`` and ``values_checksum``: the (count, CRC-32) of decoded lane
  words that CHECKSUM reports;
* the GEMV engine's commands (a board with the engine only, docs/board-protocol.md
  "GEMV"): ``GEMV_LAYER_FORMAT`` (and its optional flags byte, ``SPARSE_LAYER_FLAG``:
  the layer has sparse residual entries), ``GEMV_ENTRY_FORMAT`` and ``ENTRY_LAST``
  (GEMV_SPARSE's entries), the ``X_SWAP`` / ``X_LAST`` flags of GEMV_X,
  ``Y_MAX_WORDS`` (the most FP32 words one GEMV_Y reply carries), ``GemvStatus``
  and ``GEMV_STATUS_FORMAT`` (the GEMV_STATUS reply), ``GEMV_ERRORS`` (the
  engine's sticky error bits, LSB first: imported from hdl, hdl.gemv_config.error_layout's names);
* ``DEFAULT_BAUD``: the serial line's rate, the boards' and the host's default.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from sop.golden.files import crc32
from sop.hdl import GEMV_ERRORS, SPARSE_ERRORS   # plain Python, the hardware's names

PROTOCOL_VERSION = 2                   # 2: STATUS carries the format id (version 1's STATUS was 12 bytes)
START = 0x55
CRC_BYTES = 4
HEADER_BYTES = 4                       # start, cmd, len (u16 LE)
REPLY_BIT = 0x80                       # an OK reply's cmd is the request's cmd | 0x80
ERROR_REPLY = 0xFF                     # an error reply's cmd
ERROR_PAYLOAD_BYTES = 2                # an error reply's payload: {code, cmd}
LOAD_ENTRY_BYTES = 3                   # {bank << 7 | addr}, HIF data u16 LE
SWAP_FLAG = 0x01                       # BLOCKS flags: the frame's first beat carries swap
CLEAR_FLAG = 0x01                      # CHECKSUM flags: restart count and CRC after the reply
SPARSE_LAYER_FLAG = 0x01               # OFFSET's (and GEMV_LAYER's) optional flags byte: the layer has sparse entries
SPARSE_ENTRY_BYTES = 6                 # SPARSE entries: flat index u32 LE, BF16 residual u16 LE
LAST_FLAG = 0x01                       # SPARSE flags: the frame's last entry is the layer's last
DEFAULT_SPARSE_QUEUE = 64              # the boards' queue of sparse entries (SPARSE_STATUS reports it)
DEFAULT_MAX_PAYLOAD = 256
DEFAULT_BAUD = 115200                  # the serial line's bit rate (8N1): the boards' and the host's default
CRC_INIT = 0xFFFFFFFF                  # the raw CRC-32 register before the first byte
CRC_RESIDUE = 0xDEBB20E3               # the raw register after data + its own CRC-32 (LE): ~0x2144DF1C


class Cmd(enum.IntEnum):
    STATUS = 0x01
    LOAD = 0x02
    OFFSET = 0x03
    BLOCKS = 0x04
    CHECKSUM = 0x05
    SPARSE = 0x06            # a board with the residual path only (else UNKNOWN_CMD)
    SPARSE_STATUS = 0x07     # idem
    GEMV_LOAD = 0x08         # a board with the GEMV engine only (else UNKNOWN_CMD): LOAD's entries, the engine's tables
    GEMV_LAYER = 0x09        # idem: the next layer's registers (GEMV_LAYER_FORMAT)
    GEMV_X = 0x0A            # idem: flags (X_SWAP, X_LAST), then E4M3 codes, one byte each, g a beat
    GEMV_W = 0x0B            # idem: packed blocks in golden.dot.tile_order, block_bytes each
    GEMV_Y = 0x0C            # idem: count u16; the reply: up to count FP32 words of y (u32 LE each)
    GEMV_STATUS = 0x0D       # idem: optional flags (CLEAR_FLAG); the reply: GEMV_STATUS_FORMAT
    GEMV_SPARSE = 0x0E       # idem: sparse residual entries (GEMV_ENTRY_FORMAT each) into the engine's queue


class Err(enum.IntEnum):
    BAD_CRC = 1
    UNKNOWN_CMD = 2
    OVERSIZE = 3
    BAD_LENGTH = 4
    TIMEOUT = 5            # byte gap inside a frame: the half-received frame is dropped
    GARBAGE = 6            # bytes outside a frame (reported once per run of them)
    STALLED = 7            # the decoder (or the GEMV engine) made no progress for the stall time
    NO_Y = 8               # GEMV_Y with no y word waiting and none owed: no vector was loaded (or all read)


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
    format_id: int         # what its decoder (or GEMV engine) decodes: golden.layout.format_id of its point
    errors: int            # error replies the board has sent since reset (mod 2^16)


STATUS_FORMAT = "<8BHIH"
CHECKSUM_FORMAT = "<II"


@dataclass(frozen=True)
class SparseStatus:
    adders: int            # residual adders of the decoder (R)
    errors: int            # its sticky sparse_error bits (SPARSE_ERRORS, LSB first); cleared by reset only
    queue: int             # entries the board's sparse queue holds

    def error_names(self) -> list[str]:
        return [name for i, name in enumerate(SPARSE_ERRORS) if self.errors >> i & 1]


SPARSE_STATUS_FORMAT = "<BBH"

# -- the GEMV engine (hdl/gemv.py) behind GEMV_* commands -----------------------------------------------
GEMV_LAYER_FORMAT = "<HHb"             # GEMV_LAYER: rows, blocks per row, offset; then optionally flags
                                       # (SPARSE_LAYER_FLAG: the layer has sparse entries; none: it has none)
GEMV_ENTRY_FORMAT = "<HHHB"            # GEMV_SPARSE: row, column, BF16 value, flags (ENTRY_LAST), per entry
ENTRY_LAST = 0x01                      # GEMV_SPARSE entry flags: the row's last entry (golden.dot.tile_residuals)
X_SWAP = 0x01                          # GEMV_X flags: the frame's first beat starts a new layer (table swap)
X_LAST = 0x02                          # GEMV_X flags: the frame's last beat is the vector's last
Y_MAX_WORDS = 64                       # the most y words one GEMV_Y reply carries (256 bytes)
Y_WORD_BYTES = 4


@dataclass(frozen=True)
class GemvStatus:
    flags: int             # bit 0: x_loaded (a vector is loaded and its pass not done); bit 1: the engine
                           # has no residual path (takes no GEMV_SPARSE: the iCEBreaker's GEMV core)
    errors: int            # the engine's sticky error bits (GEMV_ERRORS, LSB first); reset or CLEAR_FLAG
    group: int             # g: codes per x beat, MACs per block
    tile: int              # rows per tile of golden.dot.tile_order
    max_cols: int
    max_rows: int
    y_waiting: int         # y words in the board's FIFO
    y_depth: int           # the FIFO's size (y words)
    blocks: int            # W blocks the engine took (mod 2^32), since reset or CLEAR_FLAG
    offered_cycles: int    # cycles a W block was offered to it (taken or held off)
    pass_cycles: int       # cycles a vector was loaded (x_loaded)

    @property
    def x_loaded(self) -> bool:
        return bool(self.flags & 1)

    @property
    def residuals(self) -> bool:
        """The engine adds sparse residual entries (GEMV_SPARSE)."""
        return not self.flags & 2

    def error_names(self) -> list[str]:
        return [name for i, name in enumerate(GEMV_ERRORS) if self.errors >> i & 1]


GEMV_STATUS_FORMAT = "<4B4H3I"

# The OK reply payload of each command, in bytes (GEMV_Y's varies: a multiple of 4, see Y_MAX_WORDS).
REPLY_PAYLOAD_BYTES = {Cmd.STATUS: struct.calcsize(STATUS_FORMAT), Cmd.LOAD: 0, Cmd.OFFSET: 0, Cmd.BLOCKS: 0,
                       Cmd.CHECKSUM: struct.calcsize(CHECKSUM_FORMAT), Cmd.SPARSE: 0,
                       Cmd.SPARSE_STATUS: struct.calcsize(SPARSE_STATUS_FORMAT),
                       Cmd.GEMV_LOAD: 0, Cmd.GEMV_LAYER: 0, Cmd.GEMV_X: 0, Cmd.GEMV_W: 0,
                       Cmd.GEMV_STATUS: struct.calcsize(GEMV_STATUS_FORMAT), Cmd.GEMV_SPARSE: 0}
GEMV_COMMANDS = (Cmd.GEMV_LOAD, Cmd.GEMV_LAYER, Cmd.GEMV_X, Cmd.GEMV_W, Cmd.GEMV_Y, Cmd.GEMV_STATUS,
                 Cmd.GEMV_SPARSE)
#: The longest OK reply payload of a board without the engine (STATUS, 16 bytes): its reply buffer.
REPLY_MAX = max(n for c, n in REPLY_PAYLOAD_BYTES.items() if c not in GEMV_COMMANDS)
#: ... and with it: GEMV_STATUS's 24 bytes are held in the buffer (GEMV_Y's words stream from the FIFO).
REPLY_MAX_GEMV = max(REPLY_PAYLOAD_BYTES.values())


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
