"""Board bring-up: one real quantized layer through a board's decoder, checked against golden/.

Role: the logic behind ``sop board`` (sop/cli.py holds only its argparse) and
behind the board step of ``make sim``, ``python -m sop.synth.host.bringup --sim``,
which runs the same host code against the whole board design (UART pins
included) in amaranth.sim.

* ``model_layer_stream(model, fmt, layer, rows)``: (name, golden layer stream) of
  one linear layer (or its first ``rows`` rows), as ``sop vectors`` quantizes it.
* ``run_board(transport, stream, fmt)``: over any byte transport
  (client.SerialTransport for a board, gateware.simboard.SimSerial for its
  simulation):
  STATUS must report the protocol version and the decoder of ``fmt``
  (``BoardConfigError`` if not); then the LUT banks and offset are loaded,
  the layer's blocks streamed (table swap on the first beat), and the board's
  (count, CRC-32) of the decoded values compared with
  ``wire.values_checksum(hdl.reference.expected_beats(...))``. Returns a
  ``BoardResult`` with the throughput of the streaming phase (BLOCKS frames
  until the CHECKSUM reply) in values/s and bytes/s over the wire (both
  directions, frames included), timed by ``clock`` (simulated seconds in
  simulation).
* ``sim_board(board, divisor)``: a ``BoardCore`` with the board's decoder
  configuration behind a bit-banged UART at ``divisor`` clock cycles a bit
  (the gateware is imported there only: the rest is host code).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

from sop.golden.layout import LayerStream, Sparse
from sop.golden.points import board_points, get_point
from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.sim.stimulus import from_stream
from sop.synth import wire
from sop.synth.wire import Status

from . import client
from .client import BoardLink

SIM_DIVISOR = 4                                    # simulated UART: clock cycles a bit
SIM_ROWS = 96                                      # `make sim`: rows of the layer (about 2 min on one core)


class BoardConfigError(RuntimeError):
    """The board's STATUS does not describe the decoder the format needs."""


# A board that does not answer, answers wrong or runs another decoder: a failed check (exit 1),
# not a usage error, although BoardTimeout is an OSError.
BOARD_FAILURES = (client.BoardTimeout, client.BoardError, BoardConfigError)


@dataclass(frozen=True)
class BoardResult:
    layer: str
    fmt: str
    rows: int
    cols: int
    status: Status
    expected: tuple[int, int]          # (lane words, CRC-32) from golden/
    got: tuple[int, int]               # the board's
    seconds: float                     # streaming phase: first BLOCKS frame to the CHECKSUM reply
    wire_bytes: int                    # bytes both ways in that phase
    sparse: int = 0                    # sparse residuals of the stream (not applied: no residual path)

    @property
    def ok(self) -> bool:
        return self.got == self.expected

    @property
    def values(self) -> int:
        return self.expected[0]

    @property
    def values_per_s(self) -> float:
        return self.values / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.wire_bytes / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        st = self.status
        rate = (f"{self.values_per_s:,.0f} values/s, {self.bytes_per_s:,.0f} bytes/s" if self.seconds > 0
                else "not measured")
        out = [f"board: protocol {st.version}, {st.lanes} lanes, {st.code_bits}-bit codes in blocks of "
               f"{st.group}, {st.banks} LUT bank(s), {8 * st.lane_bytes}-bit values, max payload "
               f"{st.max_payload}",
               f"layer: {self.layer} ({self.rows} x {self.cols}, {self.fmt})",
               f"values checked: {self.values:,}",
               f"result: {'OK' if self.ok else 'MISMATCH'} (board: {self.got[0]:,} values, CRC "
               f"{self.got[1]:#010x}; golden: {self.expected[0]:,} values, CRC {self.expected[1]:#010x})",
               f"throughput: {rate} over the wire ({self.wire_bytes:,} bytes in {self.seconds:.3g} s)"]
        if self.sparse:
            out.append(f"note: {self.sparse} sparse residuals not applied: the board's decoder has no residual "
                       f"path (docs/hardware.md, Sparse residuals); checked: the values without them")
        return out


class _Metered:
    """A transport that counts the bytes going both ways (the throughput over the wire)."""

    def __init__(self, inner):
        self.inner, self.bytes = inner, 0
        self.now = getattr(inner, "now", time.monotonic)   # the inner transport's clock for BoardLink

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.inner.write(data)

    def read(self, n: int, timeout: float) -> bytes:
        data = self.inner.read(n, timeout)
        self.bytes += len(data)
        return data


def check_format(fmt: str) -> None:
    """``fmt`` is an operating point the board flow supports (golden/points.py)."""
    if fmt not in board_points():
        raise ValueError(f"format {fmt!r} has no hardware decoder; formats: {', '.join(board_points())}")


def format_config(fmt: str, lanes: int) -> DecoderConfig:
    """The decoder configuration a board with ``lanes`` lanes needs for ``fmt`` (BF16 output)."""
    check_format(fmt)
    point = get_point(fmt)
    return DecoderConfig(f"board-{fmt}", lanes, point.layout, point.hif)


def status_fields(cfg: DecoderConfig) -> dict[str, int]:
    """What STATUS reports for ``cfg`` (the lanes aside), by wire.Status field."""
    return {"version": wire.PROTOCOL_VERSION, "code_bits": cfg.layout.code_bits, "group": cfg.layout.group,
            "beat_bytes": cfg.blocks_per_beat * cfg.layout.block_bytes,
            "lane_bytes": wire.lane_bytes(reference.lane_word_bits(cfg)), "hif_bits": cfg.hif.bits,
            "banks": cfg.layout.banks}


def check_status(st: Status, fmt: str) -> DecoderConfig:
    """The board's decoder configuration for ``fmt``; ``BoardConfigError`` when STATUS disagrees."""
    if st.version != wire.PROTOCOL_VERSION:     # the other fields may mean something else
        raise BoardConfigError(f"the board speaks protocol version {st.version}, this host "
                               f"{wire.PROTOCOL_VERSION}; rebuild the bitstream from this checkout")
    try:
        cfg = format_config(fmt, st.lanes)
    except ValueError as err:                  # lanes the generator would refuse: not our decoder
        raise BoardConfigError(f"the board reports {st.lanes} lanes: {err}") from None
    wants = status_fields(cfg)
    wrong = [f"{field} {getattr(st, field)} (needs {want})" for field, want in wants.items()
             if getattr(st, field) != want]
    if wrong:
        raise BoardConfigError(f"the board's decoder does not match format {fmt}: {', '.join(wrong)}; "
                               f"pass the format of the loaded bitstream (--format) or load one built "
                               f"for {fmt}")
    if st.max_payload < 1 + wants["beat_bytes"]:      # a BLOCKS frame must hold its flags and a beat
        raise BoardConfigError(f"the board's max payload {st.max_payload} cannot hold one beat of "
                               f"{wants['beat_bytes']} bytes")
    return cfg


def model_layer_stream(model: str, fmt: str, layer: str | None = None,
                   rows: int | None = None) -> tuple[str, LayerStream]:
    """(name, golden stream) of ``layer`` of ``model`` (default: its first linear layer), first ``rows`` rows."""
    from sop.quantize.models import open_model
    from sop.sim.vectors import quantize_layer as quantize_weights

    check_format(fmt)                          # before any work
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    source = open_model(model)
    names = [lay.name for lay in source.layers]
    name = layer or names[0]
    if name not in names:
        raise ValueError(f"{model}: no linear layer {name!r}; linear layers: {', '.join(names)}")
    w = source.load(name)
    return name, quantize_weights(fmt, w if rows is None else w[:rows], name)


def run_board(transport, stream: LayerStream, fmt: str, *, name: str = "", timeout: float = 1.0,
              clock=time.monotonic) -> BoardResult:
    """Check STATUS, load the layer's tables, stream its blocks, compare the board's checksum with golden/."""
    meter = _Metered(transport)
    link = BoardLink(meter, timeout=timeout)
    st = link.status()
    cfg = check_status(st, fmt)
    link.max_payload = st.max_payload
    # padded to whole beats as the decoder takes them; without the sparse entries, which the
    # board's decoder (no residual path) does not apply
    layer = from_stream(cfg, dataclasses.replace(stream, sparse=Sparse()), name)
    beats = client.beat_bytes_of(reference.input_beats(cfg, layer.headers, layer.codes), st.beat_bytes)
    expected = wire.values_checksum(layer.expected(cfg), reference.lane_word_bits(cfg))
    link.checksum(clear=True)                  # count from zero, whatever ran before
    link.load_layer(layer.luts, layer.offset)
    t0, b0 = clock(), meter.bytes
    link.blocks(beats, swap=True)
    got = link.checksum(clear=True)
    return BoardResult(name, fmt, stream.rows, stream.cols, st, expected, got, clock() - t0,
                       meter.bytes - b0, len(stream.sparse))


def sim_board(board: str = "icebreaker", divisor: int = SIM_DIVISOR, decoder=None):
    """(transport, host timeout) of a simulated ``BoardCore`` with ``board``'s decoder, UART pins driven.

    The clock is the board's (12 MHz iCEBreaker, 25 MHz ULX3S) and the UART runs at ``divisor``
    cycles a bit (faster than the board's 115200 Bd, which would take ~100 cycles a bit);
    ``decoder`` replaces the decoder (a broken one, in tests).
    """
    from sop.synth.gateware.board import BOARDS, BoardCore
    from sop.synth.gateware.simboard import uart_port, uart_timeout

    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r}; boards: {', '.join(BOARDS)}")
    clk = BOARDS[board].platform().default_clk_frequency
    engine_args = {} if decoder is None else {"decoder": decoder}
    core = BoardCore(BOARDS[board].config(), clk_freq=clk, baud=clk / divisor,
                     gap_cycles=40 * divisor, **engine_args)
    return uart_port(core, divisor, period=1 / clk), uart_timeout(core.engine.max_payload, divisor, 1 / clk)


def simulate(model: str = "minilm", fmt: str = "sop4-g16", layer: str | None = None,
             rows: int | None = SIM_ROWS, board: str = "icebreaker", divisor: int = SIM_DIVISOR) -> BoardResult:
    """``run_board`` on a real layer against the simulated board (simulated time for the throughput)."""
    name, stream = model_layer_stream(model, fmt, layer, rows)
    port, timeout = sim_board(board, divisor)
    return run_board(port, stream, fmt, name=name, timeout=timeout, clock=port.now)


def main(argv=None) -> int:
    """``python -m sop.synth.host.bringup --sim``: a real layer through the simulated board; 1 on a mismatch."""
    p = argparse.ArgumentParser(prog="python -m sop.synth.host.bringup",
                                description="a real quantized layer through the whole board design "
                                            "(UART pins included) in amaranth.sim, checked against golden/; "
                                            "for a real board use `sop board --port PORT`")
    p.add_argument("--sim", action="store_true", required=True, help="run the simulated board")
    p.add_argument("--model", default="minilm", help="a model path or 'minilm' (default)")
    p.add_argument("--format", default="sop4-g16", choices=board_points())
    p.add_argument("--layer", default=None, help="a linear layer (default: the model's first)")
    p.add_argument("--rows", type=int, default=SIM_ROWS, help=f"first N rows of the layer (default {SIM_ROWS})")
    p.add_argument("--board", default="icebreaker", choices=("icebreaker", "ulx3s"),
                   help="the board whose core is simulated (default icebreaker)")
    p.add_argument("--divisor", type=int, default=SIM_DIVISOR, help="UART clock cycles a bit")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        result = simulate(args.model, args.format, args.layer, args.rows, args.board, args.divisor)
    except BOARD_FAILURES as err:
        print(f"bringup: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"bringup: error: {err}", file=sys.stderr)
        return 2
    print(f"simulated {args.board} board core, UART at {args.divisor} cycles a bit "
          f"({time.monotonic() - t0:.0f} s wall; throughput in simulated time)")
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
