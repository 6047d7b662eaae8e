"""GEMV bring-up: one real MiniLM layer's ``y = W x`` on a board's GEMV engine, checked against golden/.

Role: the logic behind ``sop board --gemv`` (sop/cli.py holds only its argparse)
and behind ``python -m sop.synth.host.gemv_bringup --sim [--board B]``, which
runs the same host code against a board core with the engine (UART pins
included) in amaranth.sim: the ULX3S core (decoder and GEMV engine, the
default) or the iCEBreaker's GEMV-only core ``icebreaker-gemv``
(synth/gateware/board.py). The iCEBreaker's decoder core has no engine and
answers the GEMV_* commands UNKNOWN_CMD, which the host reports as "this board
has no GEMV engine".

* ``gemv_layer_stream(model, fmt, layer, rows)``: (name, golden layer stream, the
  layer's real input width) of one linear layer, ``bringup.model_layer``'s (default: a model's first;
  an artifact's first stored in ``fmt``'s layout with sparse residual entries,
  else its first in that layout), its sparse entries included (the engine adds
  them) and their table checked (``bringup.check_sparse``: ``ValueError``, one line).
* ``gemv_entries(stream, tile)``: per row tile of the engine, the layer's sparse
  entries as the engine takes them after the tile's blocks
  (``golden.dot.tile_residuals``: ``(row, col, bf16, last)``, padded with ``+0``
  terms); ``check_entries(tiles, stream, tile)``: the host's check of them (each
  row in its tile, each column in the layer, finite BF16 values, one entry per
  row of the tile in each round); ``ValueError`` with one line otherwise (the
  engine flags an entry outside its tile or the layer: its sticky ``sparse`` bit).
* ``layer_activation(name, cols)``: (E4M3 values, where they come from): the
  layer's real input in MiniLM's forward pass (quantize/e2e.py's hook, the
  calibration's forward) of ``quantize.weights.SENTENCE``, token ``TOKEN``, rounded to E4M3;
  for a layer the forward does not reach, a seeded random vector of E4M3 values.
* ``check_x(codes, cols)``: the host's check of a vector: ``cols`` codes, no E4M3
  NaN (S.1111.111); ``ValueError`` with one line otherwise (the engine also flags
  both: its sticky ``x_length`` and ``x_nan`` bits).
* ``run_gemv(transport, stream, codes)``: STATUS must describe the layer's
  point (bringup.check_point: the decoder's whole check on a board with one;
  a GEMV-only core reports 0 lanes); GEMV_STATUS must answer (else "no GEMV
  engine"), the layer must fit the engine (``max_cols``, ``max_rows``, the y FIFO)
  and no vector may be loaded; the sticky bits and counters are cleared; then the
  tables and layer registers (GEMV_LOAD, GEMV_LAYER with the sparse flag when the
  layer has entries), x with the swap (GEMV_X), the blocks in
  ``golden.dot.tile_order`` (GEMV_W), each tile's sparse entries after its blocks
  (GEMV_SPARSE, ``BoardLink.gemv_pass``), the rows' y words (GEMV_Y) and
  GEMV_STATUS again. ``GemvResult``: the words against
  ``golden.dot.gemv`` bit for bit, the engine's error bits (must be 0), the
  relative error of y against float64 (``golden.decoder.decode_layer(W) @ x``
  in float64), the wire throughput (GEMV_X to the last y word, timed by
  ``clock``) and the engine's MACs per cycle from its counters.
* ``sim_gemv_board(divisor, board=)``: a board's ``BoardCore`` (default ``SIM_BOARD``,
  the ULX3S) behind a bit-banged UART; ``gemv_boards()``: the boards with the engine.
* ``simulate`` / ``simulate_bad_input`` / ``main``: the ``--sim`` runs: a
  real layer's first rows bit-exact, then a sop-budget layer's first rows with
  their sparse entries (``SPARSE_ROWS``) bit-exact, then y read before x (NO_Y:
  one clear error), a NaN code, a short vector and a sparse entry beyond the
  layer sent past the host's check (the engine's ``x_nan``, ``x_length`` and
  ``sparse`` bits).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from sop.argtypes import ToolParser, number, positive
from sop.golden import dot
from sop.golden.layout import LayerStream
from sop.golden.points import board_points
from sop.quantize.weights import QUERY_LAYER, SENTENCE, layer_inputs
from sop.synth.wire import Err, GemvStatus, Status

from . import bringup, client
from .bringup import BOARD_FAILURES, BoardConfigError, MeteredTransport
from .client import BoardLink

E4M3 = dot.ACT_FORMATS["e4m3"]
TOKEN = 2                                                     # the token whose activations are x
X_SEED = 15
SIM_BOARD = "ulx3s"                                           # --sim's default board (gemv_boards())
# `make sim`'s rows: one tile of the ULX3S's engine (hdl.gemv_config.MIN_TILE, 17 rows: 4 tiles and one row
# of the iCEBreaker's, whose tiles are 4); two tiles took about 6 min of CPU
SIM_ROWS = 17
SIM_LAYER = QUERY_LAYER
SPARSE_ROWS = 3                                               # `make sim`'s sop-budget slice (6 entries, 15 sent)
NO_ENGINE = ("this board has no GEMV engine (it answers GEMV_STATUS with UNKNOWN_CMD): the ULX3S core has "
             "one beside its decoder, the iCEBreaker's decoder core has none (the iCE40UP5K cannot hold both: "
             "its GEMV-only core has it; docs/board-protocol.md, GEMV); load a bitstream with the engine "
             "(make bitstream BOARD=ulx3s or BOARD=icebreaker-gemv)")


@dataclass(frozen=True)
class GemvResult:
    layer: str
    fmt: str
    rows: int
    cols: int
    x_source: str
    status: Status
    got: np.ndarray                    # the board's y words (uint32)
    expected: np.ndarray | None        # golden.dot.gemv's (None: the x sent is no valid vector)
    reference: np.ndarray | None       # W x in float64
    seconds: float                     # GEMV_X's first frame to the last y word
    wire_bytes: int                    # bytes both ways in that phase
    engine: GemvStatus                 # GEMV_STATUS after the run
    sparse: int = 0                    # the layer's sparse residual entries
    entries_sent: int = 0              # GEMV_SPARSE entries sent (the padding of tile_residuals included)
    width: int | None = None           # the layer's real input width (``cols``: whole blocks; None: the same)

    @property
    def errors(self) -> list[str]:
        return self.engine.error_names()

    @property
    def exact(self) -> bool:
        return self.expected is not None and np.array_equal(self.got, self.expected)

    @property
    def ok(self) -> bool:
        return self.exact and not self.errors

    @property
    def macs(self) -> int:
        return self.rows * self.cols

    def relative_error(self) -> tuple[float, float]:
        """(||y - y64|| / ||y64||, max |y - y64|) of the board's y against float64."""
        y = self.got.astype(np.uint32).view(np.float32).astype(np.float64)
        ref = self.reference
        norm = float(np.linalg.norm(ref))
        return (float(np.linalg.norm(y - ref)) / norm if norm else float(np.linalg.norm(y)),
                float(np.abs(y - ref).max()))

    def lines(self) -> list[str]:
        st, en = self.status, self.engine
        out = [f"board: protocol {st.version}, format id {st.format_id:#010x}, GEMV engine: {en.group} MACs a "
               f"block, tile {en.tile}, up to {en.max_rows} x {en.max_cols}, y FIFO {en.y_depth} words",
               f"layer: {bringup.layer_text(self, 'x +0 there')}, x: {self.x_source}"]
        if self.expected is None:
            out.append(f"result: NOT CHECKED (the x sent is not a valid vector); {len(self.got)} y words read")
        else:
            bad = np.flatnonzero(self.got != self.expected)
            first = (f"; first at row {bad[0]}: board {int(self.got[bad[0]]):#010x}, golden "
                     f"{int(self.expected[bad[0]]):#010x}" if bad.size else "")
            out.append(f"result: {'OK' if self.ok else 'MISMATCH' if bad.size else 'ENGINE ERROR'}: "
                       f"{self.rows - bad.size:,} of {self.rows:,} y words bit-exact against "
                       f"golden.dot.gemv{first}")
            rel, worst = self.relative_error()
            out.append(f"error against float64 (W decoded @ x): relative {rel:.3g} (L2), largest {worst:.3g}")
        rate = (f"{self.wire_bytes / self.seconds:,.0f} bytes/s, {self.macs / self.seconds:,.0f} MACs/s"
                if self.seconds > 0 else "not measured")
        if self.sparse or self.entries_sent:
            out.append(f"sparse residuals: {self.sparse:,} entr{'y' if self.sparse == 1 else 'ies'} ({self.entries_sent:,} sent, with the +0 "
                       f"padding of golden.dot.tile_residuals), added by the board's GEMV engine")
        out.append(f"throughput: {rate} over the wire ({self.wire_bytes:,} bytes in {self.seconds:.3g} s)")
        blocks_macs = en.blocks * en.group
        per_active = blocks_macs / en.offered_cycles if en.offered_cycles else 0.0
        per_pass = blocks_macs / en.pass_cycles if en.pass_cycles else 0.0
        # (blocks * g / offered is g whenever the engine took each block as offered: a measure of how often
        # it held the wire off, not of its compute rate, which the folded engine's 1 MAC a cycle is below)
        out.append(f"engine: {blocks_macs:,} MACs, {per_active:.2f} per cycle with a block offered "
                   f"({en.offered_cycles:,} cycles; {en.group} when it never held a block off), {per_pass:.3g} "
                   f"per cycle of the pass ({en.pass_cycles:,} cycles: the wire's pace)")
        if self.errors:
            out.append(f"engine error: the board's GEMV engine flagged {', '.join(self.errors)} "
                       f"(docs/board-protocol.md, GEMV_STATUS)")
        return out


def gemv_layer_stream(model: str, fmt: str, layer: str | None = None,
                      rows: int | None = None) -> tuple[str, LayerStream, int]:
    """(name, stream, the layer's real input width) of one layer (``bringup.model_layer``), sparse
    entries included, its sparse table checked."""
    name, stream, width = bringup.model_layer(model, fmt, layer, rows)
    bringup.check_sparse(stream, name)
    return name, stream, width


def padded_x(codes, cols: int) -> np.ndarray:
    """An x of the layer's real width as the engine takes it, ``cols`` (whole blocks) codes: the
    columns that pad the layer get E4M3 +0 (code 0), so they add exactly 0, as ``sop gemv`` gives
    them (docs/dot.md). A longer x is left to ``check_x``."""
    codes = np.asarray(codes, np.int64)
    if codes.ndim != 1 or codes.size >= cols:
        return codes
    return np.concatenate([codes, np.zeros(cols - codes.size, np.int64)])


def gemv_entries(stream: LayerStream, tile: int) -> list[list[tuple[int, int, int, int]]]:
    """Per row tile of ``tile`` rows, the ``(row, col, bf16, last)`` entries the engine takes after the
    tile's blocks (golden.dot.tile_residuals); none (empty lists) for a layer without sparse entries."""
    if not len(stream.sparse):
        return [[] for _ in range(0, stream.rows, tile)]
    return [list(zip(*(t[k].tolist() for k in ("row", "col", "value", "last"))))
            for t in dot.tile_residuals(stream, tile)]


def check_entries(tiles, stream: LayerStream, tile: int) -> None:
    """The host's check of the entries ``tiles`` (``gemv_entries``' form) for the engine's row tiles of
    ``tile`` rows: one list per tile, all empty or none; each tile's entries whole rounds of one entry
    per row of the tile, rows ascending, the last round's flagged ``last`` (and no other); columns in
    the layer; finite BF16 values. ``ValueError`` (one line) naming the first bad entry."""
    count = -(-stream.rows // tile)
    if len(tiles) != count or (any(tiles) and not all(tiles)):
        raise ValueError(f"sparse entries for {len(tiles)} row tiles ({sum(map(bool, tiles))} not empty); the "
                         f"layer's {stream.rows} rows make {count} tiles of {tile}, each with entries or none; "
                         f"not sent to the board")
    for t, entries in enumerate(tiles):
        n = min(tile, stream.rows - t * tile)
        for k, (row, col, value, last) in enumerate(entries):
            final = k >= len(entries) // n * n - n
            problem = (f"row {row}, where its round needs row {t * tile + k % n}" if row != t * tile + k % n
                       else f"column {col} is outside the layer's {stream.cols} columns" if not 0 <= col < stream.cols
                       else f"value {value:#06x} is not a finite BF16 number"
                       if not 0 <= value <= 0xFFFF or (value >> 7) & 0xFF == 0xFF
                       else "its row's last entry is not in the tile's last round" if bool(last) != final
                       else None)
            if problem:
                raise ValueError(f"bad sparse entry {k} of row tile {t}: {problem}; not sent to the board")
        if len(entries) % n:
            raise ValueError(f"row tile {t} has {len(entries)} sparse entries, not whole rounds of its {n} rows; "
                             f"not sent to the board")


def layer_activation(name: str, cols: int) -> tuple[np.ndarray, str]:
    """(E4M3 values (cols,), where they come from): the layer's input in MiniLM's forward pass, else random."""
    seen: list[np.ndarray] = []
    if name.startswith("encoder.layer."):
        try:
            seen = [layer_inputs(name)]
        except (OSError, ImportError, ValueError):        # no MiniLM here, or no such layer: the random vector
            seen = []
    if seen and seen[0].shape[-1] == cols and seen[0].shape[0] > TOKEN:
        x = E4M3.quantize(seen[0][TOKEN])                 # saturating: +-448 at most
        return x.astype(np.float32), f"MiniLM's input to this layer, token {TOKEN} of {SENTENCE!r}, rounded to E4M3"
    rng = np.random.default_rng(X_SEED)
    x = E4M3.quantize(rng.normal(0, 1, cols))
    return x.astype(np.float32), f"seeded random N(0, 1) rounded to E4M3 (seed {X_SEED})"


def check_x(codes, cols: int) -> None:
    """The host's check of an x vector of E4M3 codes: ``cols`` of them, none a NaN."""
    codes = np.asarray(codes, np.int64)
    if codes.ndim != 1 or codes.size != cols:
        raise ValueError(f"activation vector of length {codes.size}, the layer has {cols} columns; not sent "
                         f"to the board")
    nan = np.flatnonzero((codes & 0x7F) == 0x7F)
    if nan.size:
        raise ValueError(f"activation x[{nan[0]}] is an E4M3 NaN (code {int(codes[nan[0]]):#04x}); the engine "
                         f"takes finite activations only; not sent to the board")


def engine_status(link: BoardLink, clear: bool = False) -> GemvStatus:
    """GEMV_STATUS; a board without the engine is a ``BoardConfigError`` saying so."""
    try:
        return link.gemv_status(clear=clear)
    except client.BoardError as err:
        if err.code == Err.UNKNOWN_CMD:
            raise BoardConfigError(NO_ENGINE) from None
        raise


def run_gemv(transport, stream: LayerStream, codes, fmt: str, *, name: str = "", x_source: str = "",
             timeout: float = 1.0, clock=time.monotonic, check: bool = True, entries=None,
             width: int | None = None) -> GemvResult:
    """``y = W x`` of ``stream`` (its sparse residuals included) and the E4M3 ``codes`` on the board's
    engine, against golden/. ``codes``: ``stream.cols`` of them (``padded_x``: +0 past the layer's real
    ``width``, which the result reports). ``entries`` (``gemv_entries``' form, for the board's tile): sent instead
    of the layer's own. ``check=False`` sends ``codes``, the sparse table and ``entries`` without the
    host's checks (``check_x``, ``bringup.check_sparse``, ``check_entries``), to show the engine's."""
    codes = np.asarray(codes, np.int64)
    if check:
        check_x(codes, stream.cols)            # before a byte is sent
        bringup.check_sparse(stream, name)
    meter = MeteredTransport(transport)
    link = BoardLink(meter, timeout=timeout)
    st = link.status()
    bringup.check_point(st, fmt)
    link.max_payload = st.max_payload
    en = engine_status(link)
    g = en.group
    if stream.layout.group != g or stream.cols % g:
        raise BoardConfigError(f"the board's GEMV engine takes blocks of {g}, the layer has {stream.layout.group}")
    if stream.cols > en.max_cols or stream.rows > min(en.max_rows, en.y_depth):
        raise ValueError(f"layer {name} ({stream.rows} x {stream.cols}) is larger than the board's GEMV engine "
                         f"takes ({min(en.max_rows, en.y_depth)} x {en.max_cols}); pass --rows")
    if en.x_loaded:
        raise BoardConfigError("the board's GEMV engine holds a vector of an earlier, unfinished run; reset the "
                               "board (power-cycle it or load the bitstream again)")
    tiles = gemv_entries(stream, en.tile) if entries is None else entries
    if any(tiles) and not en.residuals:        # (the engine would answer GEMV_SPARSE UNKNOWN_CMD)
        raise BoardConfigError(f"layer {name} has {len(stream.sparse)} sparse residual entries and the board's "
                               f"GEMV engine has no residual path (the iCEBreaker's GEMV core): use a layer "
                               f"without them, or the ULX3S")
    if check:
        check_entries(tiles, stream, en.tile)  # before the layer is sent
    if en.y_waiting:
        link.read_y(en.y_waiting)              # an earlier run's words nobody read
    engine_status(link, clear=True)            # the sticky bits and counters count this run only
    sparse = any(tiles)
    link.gemv_layer(stream.luts, stream.rows, stream.cols // g, stream.offset, sparse=sparse)
    t0, b0 = clock(), meter.bytes
    link.gemv_x(codes, g, swap=True)
    blocks, nb = dot.tiled_blocks(stream, en.tile), stream.cols // g * stream.layout.block_bytes
    if sparse:                                 # each tile's blocks, then its entries
        link.gemv_pass([(blocks[t0 * nb:(t0 + en.tile) * nb], tile) for t0, tile in
                        zip(range(0, stream.rows, en.tile), tiles)], stream.layout.block_bytes)
    else:
        link.gemv_w(blocks, stream.layout.block_bytes)
    got = np.array(link.read_y(stream.rows), np.uint32)
    seconds, wire_bytes = clock() - t0, meter.bytes - b0
    after = engine_status(link)
    expected = reference = None
    if codes.shape == (stream.cols,) and not ((codes & 0x7F) == 0x7F).any():
        from sop.golden.decoder import decode_layer

        x = E4M3.decode(codes)
        expected = dot.gemv(stream, x.astype(np.float32), "e4m3").view(np.uint32)
        reference = decode_layer(stream) @ x.astype(np.float64)
    return GemvResult(name, fmt, stream.rows, stream.cols, x_source, st, got, expected, reference, seconds,
                      wire_bytes, after, len(stream.sparse), sum(map(len, tiles)), width)


def gemv_boards() -> list[str]:
    """The boards (synth/gateware/board.py's ``BOARDS``) whose core has the GEMV engine."""
    from sop.synth.gateware.board import BOARDS

    return [name for name, b in BOARDS.items() if b.gemv]


def sim_gemv_board(divisor: int = bringup.SIM_DIVISOR, gemv_port=None, board: str = SIM_BOARD):
    """(transport, host timeout) of the simulated ``BoardCore`` of ``board`` (one of ``gemv_boards()``:
    the ULX3S's decoder and GEMV engine, or the iCEBreaker's GEMV-only core), its UART pins driven at
    ``divisor`` cycles a bit; ``gemv_port`` replaces its engine's port (tests)."""
    from sop.synth.gateware.board import BOARDS, BoardCore
    from sop.synth.gateware.simboard import uart_port, uart_timeout

    if board not in gemv_boards():
        raise ValueError(f"board {board!r} has no GEMV engine; boards with one: {', '.join(gemv_boards())}")
    b = BOARDS[board]
    clk = b.platform().default_clk_frequency
    extra = {"gemv_port": gemv_port} if gemv_port is not None else b.gemv_args()
    core = BoardCore(b.config(), clk_freq=clk, baud=clk / divisor, gap_cycles=40 * divisor,
                     stall_cycles=bringup.SIM_STALL, **extra)
    return uart_port(core, divisor, period=1 / clk), uart_timeout(core.engine.max_payload, divisor, 1 / clk)


def default_model() -> str:
    return "minilm"


def sim_residuals(board: str) -> bool:
    """Whether the simulated ``board``'s engine has the residual path (the iCEBreaker's GEMV core has
    none: its sparse run is skipped)."""
    from sop.synth.gateware.board import BOARDS

    return BOARDS[board].gemv_config().sparse


def simulate(model: str | None = None, fmt: str = "sop4-g16", layer: str | None = SIM_LAYER,
             rows: int | None = SIM_ROWS, divisor: int = bringup.SIM_DIVISOR, board: str = SIM_BOARD) -> GemvResult:
    """``run_gemv`` on a real layer's first ``rows`` rows against the simulated ``board``."""
    name, stream, width = gemv_layer_stream(model or default_model(), fmt, layer, rows)
    x, source = layer_activation(name, width)
    port, timeout = sim_gemv_board(divisor, board=board)
    return run_gemv(port, stream, padded_x(dot.activation_codes(x, "e4m3"), stream.cols), fmt, name=name,
                    x_source=source, timeout=timeout, clock=port.now, width=width)


def simulate_bad_input(model: str | None = None, fmt: str = "sop4-g16", layer: str | None = SIM_LAYER,
                       divisor: int = bringup.SIM_DIVISOR, board: str = SIM_BOARD) -> dict[str, str]:
    """On one simulated ``board``, the layer's first row: y read before x (the host's error), then a NaN
    code and a vector one beat short sent past the host's check, then the first row of the
    sop-budget layer (``bringup.sparse_model``) with its sparse entry moved beyond the layer's columns
    (``beyond_the_layer``) past the host's check (the engine's sticky bits). Returns what each case
    gave, by case."""
    name, stream, width = gemv_layer_stream(model or default_model(), fmt, layer, 1)
    x, _ = layer_activation(name, width)
    codes = padded_x(dot.activation_codes(x, "e4m3"), stream.cols)
    port, timeout = sim_gemv_board(divisor, board=board)
    link = BoardLink(port, timeout=timeout)
    seen = {}
    try:
        link.read_y(1)
        seen["y before x"] = "no error"
    except client.BoardError as err:
        seen["y before x"] = str(err)
    nan = codes.copy()
    nan[5] = 0x7F
    short = codes[:-stream.layout.group]
    for case, bad in (("NaN in x", nan), ("x one beat short", short)):
        result = run_gemv(port, stream, bad, fmt, name=name, timeout=timeout, clock=port.now, check=False)
        seen[case] = ", ".join(result.errors) or "nothing"
    name, stream, width = gemv_layer_stream(bringup.sparse_model(fmt), fmt, None, 1)
    x, _ = layer_activation(name, width)
    tiles = beyond_the_layer(gemv_entries(stream, link.gemv_status().tile), stream.cols)
    try:
        result = run_gemv(port, stream, padded_x(dot.activation_codes(x, "e4m3"), stream.cols), fmt, name=name,
                          timeout=timeout, clock=port.now, check=False, entries=tiles)
        seen["sparse entry beyond the layer"] = ", ".join(result.errors) or "nothing"
    except BoardConfigError as err:            # an engine without the residual path: the host refuses
        seen["sparse entry beyond the layer"] = f"refused: {err}"
    return seen


def beyond_the_layer(tiles, cols: int):
    """``tiles`` (``gemv_entries``' form) with the first entry's column moved past the layer's ``cols``
    (what ``check_entries`` refuses and the engine flags: its ``sparse`` bit)."""
    (row, col, value, last), *rest = tiles[0]
    return [[(row, cols + col, value, last), *rest], *tiles[1:]]


def main(argv=None) -> int:
    """``python -m sop.synth.host.gemv_bringup --sim [--board B]``: a real layer's y = W x on a simulated
    board core with the engine (default the ULX3S's)."""
    p = ToolParser(prog="python -m sop.synth.host.gemv_bringup",
                                description="a real MiniLM layer's y = W x through a board design's GEMV "
                                            "engine (UART pins included) in amaranth.sim, bit-exact against "
                                            "golden/dot.py; for a real board use `sop board --gemv --port PORT`")
    p.add_argument("--sim", action="store_true", required=True, help="run the simulated board")
    p.add_argument("--model", default=None, help="a model path, 'minilm' (default) or a .sopq artifact")
    p.add_argument("--format", default="sop4-g16", choices=board_points())
    p.add_argument("--layer", default=SIM_LAYER, help=f"a linear layer (default {SIM_LAYER})")
    p.add_argument("--rows", type=positive(int), default=SIM_ROWS,
                   help=f"first N rows of the layer (default {SIM_ROWS})")
    p.add_argument("--divisor", type=bringup.divisor_arg, default=bringup.SIM_DIVISOR, help=bringup.divisor_help())
    p.add_argument("--board", default=SIM_BOARD, choices=gemv_boards(),
                   help=f"the board whose core is simulated (default {SIM_BOARD}; icebreaker-gemv: the "
                        f"iCEBreaker's GEMV-only core)")
    p.add_argument("--sparse-rows", type=number(int, 0, inclusive=True), default=SPARSE_ROWS,
                   help=f"then the first N rows of the sop-budget artifact's first layer with sparse entries, "
                        f"with them (default {SPARSE_ROWS}; 0: skip)")
    args = p.parse_args(argv)
    from sop.sim.runner import interruptible          # (SIGTERM and SIGHUP too: one line, exit 128 + N)

    return interruptible(p.prog, lambda: _simulated(args, p.prog))


def _simulated(args, prog: str) -> int:
    t0 = time.monotonic()
    try:
        results = [simulate(args.model, args.format, args.layer, args.rows, args.divisor, args.board)]
        if args.sparse_rows and sim_residuals(args.board):
            results.append(simulate(bringup.sparse_model(args.format), args.format, None, args.sparse_rows,
                                    args.divisor, args.board))
        print(f"simulated {args.board} board core with the GEMV engine, UART at {args.divisor} cycles a bit "
              f"({time.monotonic() - t0:.0f} s wall; throughput in simulated time)")
        for result in results:
            print("\n".join(result.lines()))
        if not all(result.ok for result in results):
            return 1
        bad = simulate_bad_input(args.model, args.format, args.layer, args.divisor, args.board)
    except BOARD_FAILURES as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    for case, what in bad.items():
        print(f"bad input, {case}: {what}")
    caught = ("no vector is loaded" in bad["y before x"] and "x_nan" in bad["NaN in x"]
              and "x_length" in bad["x one beat short"]
              and "sparse" in bad["sparse entry beyond the layer"])     # the engine's bit, or the host's refusal
    print(f"bad input: {'each caught' if caught else 'NOT CAUGHT'}")
    return 0 if caught else 1


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.synth.host.gemv_bringup", main)
