"""Board bring-up: one real quantized layer through a board's decoder, checked against golden/.

Role: the logic behind ``sop board`` (sop/cli.py holds only its argparse) and
behind the board step of ``make sim``, ``python -m sop.synth.host.bringup --sim``,
which runs the same host code against the whole board design (UART pins
included) in amaranth.sim.

* ``model_layer(model, fmt, layer, rows)``: (name, golden layer stream, the layer's
  own input width; ``stream.cols`` is it in whole blocks) of one linear layer (or
  its first ``rows`` rows), as ``sop vectors`` quantizes it; for a ``.sopq``
  artifact (`sop quantize`) the layer's stream as stored, its sparse residuals
  included (default layer: the first stored in ``fmt``'s layout with sparse
  entries, else the first in that layout).
* ``check_sparse(stream, name)``: the layer's sparse table is one the decoder
  can take (indices strictly increasing and inside the layer, finite BF16
  values); ``ValueError`` with one line naming the first bad entry otherwise.
* ``run_board(transport, stream, fmt)``: over any byte transport
  (client.SerialTransport for a board, gateware.simboard.SimSerial for its
  simulation):
  STATUS must report the protocol version and the decoder of ``fmt``, its
  format id (golden.layout.format_id) included (``BoardConfigError`` if not,
  naming the format the board decodes; 0 lanes: a core without a decoder, such as
  the iCEBreaker's GEMV-only ``icebreaker-gemv``, refused with
  ``NO_DECODER``); a layer with sparse entries needs a board with the residual path (SPARSE_STATUS; a board without it, or whose decoder
  flagged sparse errors before the run, is refused); then the LUT banks and
  offset (and the sparse flag) are loaded, the layer's blocks streamed (table
  swap on the first beat) with its sparse entries between them
  (``BoardLink.sparse_layer``), and the board's (count, CRC-32) of the decoded
  values compared with ``wire.values_checksum`` of golden's values, the
  residuals included (the host adds nothing); the decoder's sticky sparse
  error bits, read after the run, must be 0. Returns a ``BoardResult`` with the
  throughput of the streaming phase (BLOCKS and SPARSE frames until the
  CHECKSUM reply) in values/s and bytes/s over the wire (both directions,
  frames included), timed by ``clock`` (simulated seconds in simulation).
* ``check_point(st, fmt)``: the check a GEMV run makes of STATUS (the board's
  point: ``check_status`` on a board with a decoder; without one, the version
  and the point's fields, its format id included, lanes 0).
* ``sim_board(board, divisor)``: a ``BoardCore`` as the board's bitstream builds
  it (its decoder configuration, none on a GEMV-only core, and its GEMV engine
  where it has one) behind a bit-banged UART at
  ``divisor`` clock cycles a bit (the gateware is imported there only: the
  rest is host code).
* ``simulate`` / ``simulate_bad_entries``: the ``--sim`` runs of ``main``: a
  real sop-budget MiniLM layer with sparse entries, and a table that is not
  strictly increasing sent past the host's check, which the board must flag.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from sop.argtypes import ToolParser, number, positive
from sop.golden.layout import LayerStream, Sparse, format_id
from sop.golden.points import board_points, get_point, operating_points
from sop.hdl import reference
from sop.hdl.config import DecoderConfig
from sop.quantize.weights import ATTENTION_OUT_LAYER
from sop.sim.stimulus import from_stream
from sop.synth import wire
from sop.synth.wire import Status
from sop.terminal import some_names

from . import client
from .client import BoardLink

SIM_DIVISOR = 4                                    # simulated UART: clock cycles a bit
SIM_STALL = 4096                                   # simulated board: cycles without decoder progress
SIM_ROWS = 96                                      # `make sim`: rows of the layer (about 3.5 min of CPU)
SIM_LAYER = ATTENTION_OUT_LAYER                    # sop-budget stores it with sparse entries


class BoardConfigError(RuntimeError):
    """The board's STATUS does not describe the decoder the format needs."""


NO_DECODER = ("this board has no decoder (its STATUS reports 0 lanes): it is a GEMV-only core (the iCEBreaker's "
              "icebreaker-gemv), which runs `sop board --gemv` only (docs/board-protocol.md, GEMV); for a decode "
              "run load a decoder bitstream (make bitstream BOARD=icebreaker or BOARD=ulx3s)")


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
    sparse: int = 0                    # sparse entries of the layer, applied by the board's decoder
    sparse_errors: tuple[str, ...] = ()   # the decoder's sticky sparse error bits set after the run
    width: int | None = None           # the layer's own input width (``cols``: whole blocks; None: the same)

    @property
    def ok(self) -> bool:
        return self.got == self.expected and not self.sparse_errors

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
               f"{st.max_payload}, format id {st.format_id:#010x}",
               f"layer: {layer_text(self, 'decoded and checked too')}",
               f"values checked: {self.values:,}",
               f"result: {self._verdict()} (board: {self.got[0]:,} values, CRC "
               f"{self.got[1]:#010x}; golden: {self.expected[0]:,} values, CRC {self.expected[1]:#010x})",
               f"throughput: {rate} over the wire ({self.wire_bytes:,} bytes in {self.seconds:.3g} s)"]
        if self.sparse:
            out.insert(3, f"sparse residuals: {self.sparse:,} entr{'y' if self.sparse == 1 else 'ies'}, added by the board's decoder")
        if self.sparse_errors:
            out.append(f"sparse error: the board's decoder flagged {', '.join(self.sparse_errors)} "
                       f"(docs/hardware.md, Sparse residuals: the values after it are not defined); "
                       f"reset the board before the next run")
        return out

    def _verdict(self) -> str:
        if self.got != self.expected:
            return "MISMATCH"
        return "SPARSE ERROR" if self.sparse_errors else "OK"


def layer_text(result, padding: str) -> str:
    """``name (rows x width, fmt)`` of a run's layer, and where the stream pads it to whole blocks, the
    padded width and what the run did with the padding (``padding``)."""
    pad = (f"; {result.cols} columns with the padding to whole blocks, {padding}"
           if result.width and result.width != result.cols else "")
    return f"{result.layer} ({result.rows} x {result.width or result.cols}, {result.fmt}{pad})"


class MeteredTransport:
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
    return point_fields(cfg.layout, cfg.hif, beat_bytes=cfg.blocks_per_beat * cfg.layout.block_bytes,
                        lane_bytes=wire.lane_bytes(reference.lane_word_bits(cfg)))


def point_fields(layout, hif, *, beat_bytes: int = 0, lane_bytes: int = 0) -> dict[str, int]:
    """What STATUS reports for a point's ``layout`` and ``hif`` (the lanes aside), by wire.Status field:
    ``beat_bytes`` and ``lane_bytes`` describe the decoder (0: a core without one)."""
    return {"version": wire.PROTOCOL_VERSION, "code_bits": layout.code_bits, "group": layout.group,
            "beat_bytes": beat_bytes, "lane_bytes": lane_bytes, "hif_bits": hif.bits, "banks": layout.banks,
            "format_id": format_id(layout, hif)}


def _check_version(st: Status) -> None:
    if st.version != wire.PROTOCOL_VERSION:     # the other fields may mean something else
        raise BoardConfigError(client.version_refusal(st.version))


def _check_fields(st: Status, wants: dict[str, int], what: str, fmt: str) -> None:
    """``BoardConfigError`` naming each field of STATUS that is not the one ``wants``; where the format id
    differs, first the format the board decodes (a registered point of that id, if any) and ``fmt``'s: a
    point of ``fmt``'s widths but another header passes every other field."""
    again = f"pass the format of the loaded bitstream (--format) or load one built for {fmt}"
    wrong = [f"{field} {getattr(st, field)} (needs {want})" for field, want in wants.items()
             if field != "format_id" and getattr(st, field) != want]
    if st.format_id != wants["format_id"]:
        theirs = [name for name, p in operating_points().items() if p.format_id == st.format_id]
        board = (f"{' or '.join(theirs)} (format id {st.format_id:#010x})" if theirs else
                 f"a format of id {st.format_id:#010x}, which no operating point registered here has")
        raise BoardConfigError(f"the board decodes {board}, not {fmt} (format id {wants['format_id']:#010x})"
                               + (f": {', '.join(wrong)}" if wrong else ": another block header or HIF")
                               + f"; {again}")
    if wrong:
        raise BoardConfigError(f"the board's {what} does not match format {fmt}: {', '.join(wrong)}; {again}")


def check_status(st: Status, fmt: str) -> DecoderConfig:
    """The board's decoder configuration for ``fmt``; ``BoardConfigError`` when STATUS disagrees
    (``NO_DECODER`` when it reports none)."""
    _check_version(st)
    if st.lanes == 0:
        raise BoardConfigError(NO_DECODER)
    try:
        cfg = format_config(fmt, st.lanes)
    except ValueError as err:                  # lanes the generator would refuse: not our decoder
        raise BoardConfigError(f"the board reports {st.lanes} lanes: {err}") from None
    wants = status_fields(cfg)
    _check_fields(st, wants, "decoder", fmt)
    if st.max_payload < 1 + wants["beat_bytes"]:      # a BLOCKS frame must hold its flags and a beat
        raise BoardConfigError(f"the board's max payload {st.max_payload} cannot hold one beat of "
                               f"{wants['beat_bytes']} bytes")
    return cfg


def check_point(st: Status, fmt: str) -> DecoderConfig | None:
    """STATUS for a run on the board's GEMV engine: the board's point must be ``fmt``'s. With a decoder,
    ``check_status`` (its configuration returned); without one (0 lanes: a GEMV-only core), the version
    and the point's fields (code bits, block size, HIF bits, banks, format id), None returned."""
    if st.lanes:
        return check_status(st, fmt)
    _check_version(st)
    check_format(fmt)
    point = get_point(fmt)
    _check_fields(st, point_fields(point.layout, point.hif), "point", fmt)
    return None


def check_sparse(stream: LayerStream, name: str = "") -> None:
    """The layer's sparse table is one the decoder takes; ``ValueError`` naming the first bad entry."""
    index = np.asarray(stream.sparse.index, dtype=np.int64)
    value = np.asarray(stream.sparse.value_bf16, dtype=np.int64)
    where = f"layer {name}: " if name else ""
    if index.shape != value.shape or index.ndim != 1:
        raise ValueError(f"{where}bad sparse table: {index.size} indices and {value.size} values")
    n = stream.rows * stream.cols
    problems = [(np.flatnonzero(index[1:] <= index[:-1]) + 1, lambda k: f"index {index[k]} is not above the "
                 f"previous entry's {index[k - 1]}: the indices must be strictly increasing"),
                (np.flatnonzero((index < 0) | (index >= n)), lambda k: f"index {index[k]} is outside the "
                 f"layer's {n:,} values ({stream.rows} x {stream.cols})"),
                (np.flatnonzero((value < 0) | (value > 0xFFFF) | ((value >> 7) & 0xFF == 0xFF)),
                 lambda k: f"value {value[k]:#06x} at index {index[k]} is not a finite BF16 number")]
    bad = [(int(at[0]), say) for at, say in problems if at.size]
    if bad:
        k, say = min(bad, key=lambda b: b[0])
        raise ValueError(f"{where}bad sparse table, entry {k} of {index.size}: {say(k)}; not sent to the board")


def artifact_layer_stream(path: str, fmt: str, layer: str | None = None,
                          rows: int | None = None) -> tuple[str, LayerStream, int]:
    """(name, stored stream, real input width) of ``layer`` of a ``.sopq`` artifact, its sparse entries
    included."""
    from sop.quantize.artifact import open_artifact
    from sop.sim.vectors import crop_rows, not_in_layout

    art, layout = open_artifact(path), get_point(fmt).layout
    stored = {e.name: (e, art.stream(e)) for e in art.layers}
    mine = [n for n, (_, st) in stored.items() if st is not None and st.layout == layout]
    name = layer if layer is not None else \
        next((n for n in mine if len(stored[n][1].sparse)), mine[0] if mine else None)   # '' is no layer
    if name is None:
        raise ValueError(f"{path}: no layer is stored in the {fmt} layout")
    if name not in stored:
        raise ValueError(f"{path}: no layer {name!r}; layers: {art.some_layer_names()}")
    entry, st = stored[name]
    if name not in mine:
        raise ValueError(f"{not_in_layout(path, entry, st, fmt)}; layers in it: {some_names(mine) or 'none'}")
    return name, st if rows is None else crop_rows(st, rows), entry.shape[1]


def model_layer(model: str, fmt: str, layer: str | None = None,
                rows: int | None = None) -> tuple[str, LayerStream, int]:
    """(name, golden stream, real input width) of ``layer`` of ``model`` (default: its first linear
    layer), first ``rows`` rows; a ``.sopq`` artifact gives its stored stream
    (``artifact_layer_stream``). The width is the layer's own: ``stream.cols`` is it rounded up to
    whole blocks, the padding columns' codes decoding to whatever the block's scale gives them.
    With ``rows``, a model's first rows are quantized as a layer of their own (their own tables and
    offset, as ``sop vectors --rows`` does), an artifact's stored layer is cropped."""
    from sop.quantize.models import is_artifact, open_model
    from sop.sim.vectors import quantize_layer as quantize_weights

    check_format(fmt)                          # before any work
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if is_artifact(model):
        return artifact_layer_stream(model, fmt, layer, rows)
    source = open_model(model, routers=layer is not None)     # a MoE router named by --layer is one
    names = [lay.name for lay in source.layers]
    name = layer if layer is not None else names[0]          # --layer '' names no layer: not the first
    if name not in names:
        why = source.skipped.get(name)
        raise ValueError(f"{model}: no linear layer {name!r}{f' (kept as it is: {why})' if why else ''}; "
                         f"linear layers: {some_names(names)}")
    w = source.load(name)
    return name, quantize_weights(fmt, w if rows is None else w[:rows], name), w.shape[1]


def sparse_status(link: BoardLink, entries: int) -> wire.SparseStatus | None:
    """The board's residual path (None: it has none); refused if the layer's ``entries`` need one it
    lacks, or if its decoder flagged sparse errors before this run (sticky until reset)."""
    try:
        ss = link.sparse_status()
    except client.BoardError as err:
        if err.code != wire.Err.UNKNOWN_CMD:
            raise
        if entries:
            raise BoardConfigError(f"the board's decoder has no sparse-residual path (SPARSE_STATUS is "
                                   f"unknown to it) and the layer has {entries:,} sparse entries; load a "
                                   f"bitstream built with the residual path (make bitstream)") from None
        return None
    if ss.errors:
        raise BoardConfigError(f"the board's decoder flagged sparse errors before this run "
                               f"({', '.join(ss.error_names())}; sticky until reset): reset the board "
                               f"(power-cycle it or load the bitstream again)")
    return ss


def _stalled(link: BoardLink, err: client.BoardError, n_sparse: int) -> client.BoardError:
    """A STALLED error reply as one line with the decoder's sparse error bits. A layer with sparse
    entries stalls when the entries a beat needs do not come; one without them has no such wait
    (nothing the decoder waits for is missing: a fault of the board, not of the layer)."""
    try:
        flagged = ", ".join(link.sparse_status().error_names()) or "none"
    except (client.BoardError, client.BoardTimeout) as again:
        flagged = f"unknown ({again})"
    why = ("it waits for sparse entries that did not come" if n_sparse else
           "the layer has no sparse entries, so nothing it waits for is missing: a fault of the board")
    return client.BoardError(f"{err}: the board's decoder made no progress ({why}); sparse error bits: "
                             f"{flagged}; reset the board", err.code, err.cmd)


def run_board(transport, stream: LayerStream, fmt: str, *, name: str = "", timeout: float = 1.0,
              clock=time.monotonic, check_table: bool = True, width: int | None = None) -> BoardResult:
    """Check STATUS, load the layer's tables, stream its blocks and sparse entries, compare the board's
    checksum and sparse error bits with golden/. ``check_table=False`` sends a sparse table without
    the host's check (``check_sparse``), to show the board's own."""
    if check_table:
        check_sparse(stream, name)             # before a byte is sent
    meter = MeteredTransport(transport)
    link = BoardLink(meter, timeout=timeout)
    st = link.status()
    cfg = check_status(st, fmt)
    link.max_payload = st.max_payload
    n_sparse = len(stream.sparse)
    ss = sparse_status(link, n_sparse)
    # padded to whole beats as the decoder takes them; the expected values are golden's with the
    # residuals added (the board's decoder adds them: the host adds nothing)
    layer = from_stream(cfg, stream, name)
    beats = client.beat_bytes_of(reference.input_beats(cfg, layer.headers, layer.codes), st.beat_bytes)
    expected = wire.values_checksum(layer.expected(cfg), reference.lane_word_bits(cfg))
    link.checksum(clear=True)                  # count from zero, whatever ran before
    link.load_layer(layer.luts, layer.offset, sparse=n_sparse > 0)
    t0, b0 = clock(), meter.bytes
    try:
        if n_sparse:
            link.sparse_layer(beats, zip(stream.sparse.index, stream.sparse.value_bf16),
                              cfg.blocks_per_beat * cfg.layout.group, ss.queue)
        else:
            link.blocks(beats, swap=True)
        got = link.checksum(clear=True)
    except client.BoardError as err:
        if err.code == wire.Err.STALLED:
            raise _stalled(link, err, n_sparse) from None
        raise
    seconds, wire_bytes = clock() - t0, meter.bytes - b0
    flagged = tuple(link.sparse_status().error_names()) if ss is not None else ()
    return BoardResult(name, fmt, stream.rows, stream.cols, st, expected, got, seconds, wire_bytes,
                       n_sparse, flagged, width)


def sim_board(board: str = "icebreaker", divisor: int = SIM_DIVISOR, decoder=None, residuals: int | None = None):
    """(transport, host timeout) of a simulated ``BoardCore`` as ``board``'s bitstream builds it (its
    decoder, and its GEMV engine where it has one), UART pins driven.

    The clock is the board's (12 MHz iCEBreaker, 25 MHz ULX3S) and the UART runs at ``divisor``
    cycles a bit (faster than the board's 115200 Bd, which would take ~100 cycles a bit);
    ``decoder`` replaces the decoder (a broken one, in tests); ``residuals``: the decoder's residual
    adders (default the board's; 0: a core built without the sparse-residual path).
    """
    from sop.synth.gateware.board import BOARDS, BoardCore
    from sop.synth.gateware.simboard import uart_port, uart_timeout

    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r}; boards: {', '.join(BOARDS)}")
    b = BOARDS[board]
    clk = b.platform().default_clk_frequency
    # the core as its bitstream builds it: with the board's GEMV engine where it has one (the ULX3S's
    # decoder once read stale bytes as its beats beside it, in no simulation that left the engine out)
    engine_args = ({} if decoder is None else {"decoder": decoder}) | b.gemv_args()
    core = BoardCore(b.config(residuals), clk_freq=clk, baud=clk / divisor,
                     gap_cycles=40 * divisor, stall_cycles=SIM_STALL, **engine_args)
    return uart_port(core, divisor, period=1 / clk), uart_timeout(core.engine.max_payload, divisor, 1 / clk)


def sparse_model(fmt: str = "sop4-g16") -> str:
    """MiniLM quantized with sop-budget (sim/runner.py's ``sparse_artifact``, cached under build/):
    the ``.sopq`` whose ``fmt`` layers carry sparse entries."""
    from sop.sim.runner import sparse_artifact

    return str(sparse_artifact(fmt)[0])


def simulate(model: str | None = None, fmt: str = "sop4-g16", layer: str | None = None,
             rows: int | None = SIM_ROWS, board: str = "icebreaker", divisor: int = SIM_DIVISOR) -> BoardResult:
    """``run_board`` on a real layer against the simulated board (simulated time for the throughput);
    ``model`` None: MiniLM's sop-budget artifact and its first layer with sparse entries."""
    name, stream, width = model_layer(model or sparse_model(fmt), fmt, layer, rows)
    port, timeout = sim_board(board, divisor)
    return run_board(port, stream, fmt, name=name, timeout=timeout, clock=port.now, width=width)


def bad_entries_stream(stream: LayerStream) -> LayerStream:
    """``stream`` cut to its first two rows, with two sparse entries whose indices go down."""
    from dataclasses import replace

    from sop.sim.vectors import crop_rows

    small = crop_rows(stream, 2)
    n = small.rows * small.cols
    return replace(small, sparse=Sparse(np.array([n // 2, n // 4], np.uint32), np.array([0x3F80, 0x3F80], np.uint16)))


def simulate_bad_entries(model: str | None = None, fmt: str = "sop4-g16", layer: str | None = None,
                         board: str = "icebreaker", divisor: int = SIM_DIVISOR) -> BoardResult:
    """A sparse table that is not strictly increasing, sent past the host's check: the simulated
    board's decoder must flag it (``order``); the result is not ``ok``."""
    name, stream, _ = model_layer(model or sparse_model(fmt), fmt, layer, 2)
    port, timeout = sim_board(board, divisor)
    return run_board(port, bad_entries_stream(stream), fmt, name=f"{name} (bad entries)", timeout=timeout,
                     clock=port.now, check_table=False)


def decoder_boards() -> list[str]:
    """The boards (synth/gateware/board.py's ``BOARDS``) whose core has a decoder: what ``--sim`` runs."""
    from sop.synth.gateware.board import BOARDS

    return [name for name, b in BOARDS.items() if b.decoder]


def board_divisor() -> int:
    """The most UART clock cycles a bit of a board's own core, its bitstream's clock over its baud rate:
    217, the ULX3S's 25 MHz at 115200 Bd (the iCEBreaker's 12 MHz: 104)."""
    from sop.synth.gateware.board import BOARDS
    from sop.synth.gateware.uart import divisor_for

    return max(divisor_for(b.platform().default_clk_frequency, b.baud) for b in BOARDS.values())


def divisor_arg(text: str) -> int:
    """``--divisor`` of a simulated board: whole UART clock cycles a bit, at least the receiver's
    ``MIN_DIVISOR`` (said here, not as a baud rate the user never gave) and at most ``board_divisor()``,
    a real board's timing: the simulation's time grows with it (217 takes about 54 times the default's),
    and a huge one ran as long as it was let."""
    from sop.synth.gateware.uart import MIN_DIVISOR

    return number(int, MIN_DIVISOR, inclusive=True, maximum=board_divisor())(text)


def divisor_help() -> str:
    """``--divisor``'s help: its range and what the bounds are."""
    from sop.synth.gateware.uart import MIN_DIVISOR

    return (f"UART clock cycles a bit (default {SIM_DIVISOR}): at least {MIN_DIVISOR}, the receiver's minimum, and "
            f"at most {board_divisor()}, a real board's timing (the ULX3S's 25 MHz at 115200 Bd; the simulation "
            f"takes longer in proportion)")


def main(argv=None) -> int:
    """``python -m sop.synth.host.bringup --sim``: a real layer through the simulated board; 1 on a mismatch."""
    p = ToolParser(prog="python -m sop.synth.host.bringup",
                                description="a real quantized layer through the whole board design "
                                            "(UART pins included) in amaranth.sim, checked against golden/; "
                                            "for a real board use `sop board --port PORT`")
    p.add_argument("--sim", action="store_true", required=True, help="run the simulated board")
    p.add_argument("--model", default=None,
                   help="a model path, 'minilm' or a .sopq artifact (default: MiniLM quantized with sop-budget, "
                        "whose layers carry sparse entries; built and cached under build/vectors/)")
    p.add_argument("--format", default="sop4-g16", choices=board_points())
    p.add_argument("--layer", default=None,
                   help="a linear layer (default: the model's first; of an artifact, its first with sparse entries)")
    p.add_argument("--rows", type=positive(int), default=SIM_ROWS,
                   help=f"first N rows of the layer (default {SIM_ROWS})")
    p.add_argument("--board", default="icebreaker", choices=decoder_boards(),
                   help="the board whose core is simulated (default icebreaker)")
    p.add_argument("--divisor", type=divisor_arg, default=SIM_DIVISOR, help=divisor_help())
    args = p.parse_args(argv)
    from sop.sim.runner import interruptible          # (SIGTERM and SIGHUP too: one line, exit 128 + N)

    return interruptible(p.prog, lambda: _simulated(args, p.prog))


def _simulated(args, prog: str) -> int:
    t0 = time.monotonic()
    try:
        result = simulate(args.model, args.format, args.layer, args.rows, args.board, args.divisor)
        print(f"simulated {args.board} board core, UART at {args.divisor} cycles a bit "
              f"({time.monotonic() - t0:.0f} s wall; throughput in simulated time)")
        print("\n".join(result.lines()))
        if not result.ok:
            return 1
        if not result.sparse:
            return 0
        bad = simulate_bad_entries(args.model, args.format, args.layer, args.board, args.divisor)
    except BOARD_FAILURES as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"bad entries (indices going down, past the host's check): the board flagged "
          f"{', '.join(bad.sparse_errors) or 'nothing'}")
    return 0 if "order" in bad.sparse_errors else 1


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.synth.host.bringup", main)
