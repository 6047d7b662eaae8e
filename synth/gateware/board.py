"""Board tops: the decoder and/or the GEMV engine behind the serial protocol, on an iCEBreaker or a ULX3S.

``BoardCore`` is the board-independent part, simulated end to end by
tests/test_protocol.py::

    rx pin ─▶ UartRx ─▶ FIFO (rx_fifo bytes) ─▶ ProtocolEngine (+ Decoder) ─▶ FIFO ─▶ UartTx ─▶ tx pin

ports ``rx`` (in, idle high), ``tx`` (out), ``activity`` (out: high while a byte
is received or a reply is pending, for an LED). The RX FIFO absorbs bytes that
arrive while a command executes or a reply is written (the UART cannot stall
the line); the byte-gap timeout of the engine is ``gap_s`` seconds.

``BoardTop(board)`` requests the platform's default clock (the ``sync``
domain, created by the platform) and ``uart`` 0, and runs ``BoardCore`` with
the board's configuration (``BOARDS``, each core one entry, its FPGA board
``Board.kit``): the decoder with 2 lanes on the iCE40UP5K of the iCEBreaker
(``icebreaker``), 8 on the ECP5-85F of the ULX3S (``ulx3s``), both sop4-g16 with BF16
output and the sparse-residual path (R = 1 residual adder: the point's
``-sp`` configuration of ``hdl.config.residual_configs`` with the board's
lanes; ``residuals=0`` builds the decoder without the residual path and the core without its
SPARSE commands), at
synth.wire's ``DEFAULT_BAUD`` (115200 Bd).
``elaborate_for(board)`` checks a top against its platform with ``prepare()``
(no toolchain). The bitstream build (yowasp tools) is synth/flow/bitstream.py's.

The GEMV engine (hdl/gemv.py, the GEMV_* commands through
synth/gateware/gemv_port.py) is in two cores (``Board.gemv``), sized for MiniLM
(``gemv_config``: the board's point, ``max_cols`` 2048, ``max_rows`` 1536:
hdl.gemv_config's ``MINILM_COLS``, ``MINILM_ROWS``; a y FIFO of ``gemv_y_depth``
words, default ``max_rows``):

* ``ulx3s``: beside the decoder, the full engine (16 BlockDot lanes);
* ``icebreaker-gemv``: the iCEBreaker's second core, the GEMV engine **without
  the decoder** (``lanes`` 0: ``Board.decoder`` is false), as the iCE40UP5K
  (5,280 LC, 30 RAM40) cannot hold both: the full engine needs about 12,300 LC
  and 55 RAM40. Its engine (``gemv_engine``: hdl.gemv_config's
  ``small_engines()["gemv-sop4-g16-icebreaker"]``) is the folded one (hdl.gemv's
  ``dot_lanes`` 1, serial tail: 1 MAC a cycle, the front end in chunks), with
  the compact FP32 adder (tiles of 4 rows) and no residual path (``sparse``
  False: the term unit and entry queue do not fit beside the rest); its y FIFO
  ``gemv_y_depth`` 384 words (4 RAM40; 1536 would take 12). It builds at 5155
  of 5280 LC, 20 of 30 RAM40, 22.8 MHz (docs/board-protocol.md, "Boards"). Its
  decoder commands and GEMV_SPARSE answer UNKNOWN_CMD and its STATUS reports 0
  lanes (docs/board-protocol.md, "GEMV").

The iCEBreaker's decoder core (``icebreaker``) has no GEMV engine: it answers
the GEMV_* commands UNKNOWN_CMD. An iCEBreaker runs one core at a time: the
bitstream loaded (``make bitstream BOARD=icebreaker`` or ``BOARD=icebreaker-gemv``)
chooses which.
"""


from dataclasses import dataclass, replace

from amaranth.hdl import Module
from amaranth.lib import io, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from sop.golden.points import get_point
from sop.hdl.config import RESIDUAL_SUFFIX, DecoderConfig, residual_configs
from sop.hdl.gemv_config import MINILM_COLS, MINILM_ROWS, SMALL_ICEBREAKER, GemvConfig, small_engines
from sop.synth.wire import DEFAULT_BAUD

from .protocol import ProtocolEngine
from .uart import UartRx, UartTx


class BoardCore(wiring.Component):
    """UARTs, FIFOs and the ``ProtocolEngine`` (module docstring); ``config`` None: no decoder (a
    GEMV-only core: ``engine_args`` then give the GEMV engine)."""

    rx: In(1, init=1)
    tx: Out(1, init=1)
    activity: Out(1)

    def __init__(self, config: DecoderConfig | None, *, clk_freq: float, baud: float, gap_s: float = 0.01,
                 gap_cycles: int | None = None, rx_fifo: int = 64, tx_fifo: int = 32, **engine_args):
        self.config, self.clk_freq, self.baud = config, clk_freq, baud
        gap = gap_cycles if gap_cycles is not None else max(1, round(gap_s * clk_freq))
        self.uart_rx = UartRx(clk_freq=clk_freq, baud=baud)
        self.uart_tx = UartTx(clk_freq=clk_freq, baud=baud)
        self.engine = ProtocolEngine(config, gap_cycles=gap, **engine_args)
        self.rx_fifo, self.tx_fifo = rx_fifo, tx_fifo
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart_rx = urx = self.uart_rx
        m.submodules.uart_tx = utx = self.uart_tx
        m.submodules.engine = eng = self.engine
        m.submodules.rx_fifo = rxf = SyncFIFOBuffered(width=8, depth=self.rx_fifo)
        m.submodules.tx_fifo = txf = SyncFIFOBuffered(width=8, depth=self.tx_fifo)
        m.d.comb += urx.rx.eq(self.rx)
        m.d.comb += self.tx.eq(utx.tx)
        wiring.connect(m, urx.o, rxf.w_stream)
        wiring.connect(m, rxf.r_stream, eng.rx)
        wiring.connect(m, eng.tx, txf.w_stream)
        wiring.connect(m, txf.r_stream, utx.i)
        m.d.comb += self.activity.eq(rxf.r_stream.valid | txf.r_stream.valid | ~self.rx)
        return m


KITS = ("icebreaker", "ulx3s")          # the FPGA boards (amaranth-boards platforms) the cores run on


@dataclass(frozen=True)
class Board:
    """One core (a bitstream) for one FPGA board: its decoder, its GEMV engine, or both."""

    name: str
    lanes: int                          # the decoder's lanes; 0: no decoder (a GEMV-only core)
    baud: int = DEFAULT_BAUD
    activity_led: bool = True
    point: str = "sop4-g16"             # the operating point of its decoder and GEMV engine (golden/points.py)
    residuals: int = 1                  # residual adders of its decoder (0: no sparse-residual path)
    gemv: bool = False                  # the GEMV engine (GEMV_* commands)
    gemv_engine: str = ""               # which: a name of hdl.gemv_config.small_engines(), or "": the point's
                                        # full engine at MiniLM's size (MINILM_COLS x MINILM_ROWS)
    gemv_y_depth: int | None = None     # the y FIFO's words (32 bits each; None: the engine's max_rows, a whole layer)
    kit: str = ""                       # the FPGA board (KITS; default: the name)

    def __post_init__(self):
        object.__setattr__(self, "kit", self.kit or self.name)      # (frozen: the default set once)
        if self.kit not in KITS:
            raise ValueError(f"board {self.name}: unknown FPGA board {self.kit!r}; kits: {', '.join(KITS)}")
        if self.lanes < 0 or not (self.lanes or self.gemv):
            raise ValueError(f"board {self.name}: needs a decoder (lanes >= 1) or the GEMV engine (gemv)")
        engine = small_engines().get(self.gemv_engine) if self.gemv_engine else None
        if self.gemv_engine and not (self.gemv and engine and engine.layout == get_point(self.point).layout):
            raise ValueError(f"board {self.name}: gemv_engine {self.gemv_engine!r} needs gemv and an engine of "
                             f"its point {self.point} among {', '.join(small_engines())}")

    @property
    def decoder(self) -> bool:
        """The core has the decoder (LOAD, OFFSET, BLOCKS, CHECKSUM, SPARSE*); else it is GEMV-only."""
        return self.lanes > 0

    @property
    def top_name(self) -> str:
        """The top's name in the build (files, the Verilog top): ``sop_<name>``, '-' as '_'."""
        return "sop_" + self.name.replace("-", "_")

    def platform(self):
        if self.kit == "icebreaker":
            from amaranth_boards.icebreaker import ICEBreakerPlatform
            return ICEBreakerPlatform()
        from amaranth_boards.ulx3s import ULX3S_85F_Platform
        return ULX3S_85F_Platform()

    def config(self, residuals: int | None = None) -> DecoderConfig | None:
        """The board's decoder: the point's, with ``residuals`` adders (default the board's); None on a
        core without one (which takes no ``residuals``)."""
        if not self.decoder:
            if residuals:
                raise ValueError(f"board {self.name} has no decoder: residual adders ({residuals}) do not apply")
            return None
        r = self.residuals if residuals is None else residuals
        if r:        # the point's residual configuration (hdl.config.residual_configs), the board's lanes
            named = residual_configs(r)[f"{self.point}-{RESIDUAL_SUFFIX}"]
            return replace(named, name=f"board-{self.name}-{RESIDUAL_SUFFIX}", lanes=self.lanes)
        point = get_point(self.point)
        return DecoderConfig(f"board-{self.name}", self.lanes, point.layout, point.hif)


    def gemv_config(self) -> GemvConfig | None:
        """The board's GEMV engine, named ``board-<name>-gemv``: ``gemv_engine`` of hdl.gemv_config's
        ``small_engines``, else the point's layout and HIF with E4M3 activations at MiniLM's size;
        None without one."""
        if not self.gemv:
            return None
        name = f"board-{self.name}-gemv"
        if self.gemv_engine:
            return replace(small_engines()[self.gemv_engine], name=name)
        point = get_point(self.point)
        return GemvConfig(name, point.layout, point.hif, max_cols=MINILM_COLS, max_rows=MINILM_ROWS)

    def gemv_args(self) -> dict:
        """``BoardCore`` / ``ProtocolEngine`` keyword arguments of the board's GEMV engine ({} without one)."""
        if not self.gemv:
            return {}
        return {"gemv": self.gemv_config(), "gemv_y_depth": self.gemv_y_depth}


BOARDS = {
    "icebreaker": Board("icebreaker", 2),       # the iCEBreaker's decoder core (no GEMV engine: module docstring)
    "ulx3s": Board("ulx3s", 8, activity_led=False, gemv=True),
    # The iCEBreaker's GEMV-only core: its engine is hdl.gemv_config's small_engines() entry of that
    # name (MiniLM's size, the folded front end, the compact adder, no residual path), its y FIFO is
    # set here (384 x 32 bits = 4 of the UP5K's 30 RAM40). 97.6 % of its LCs (module docstring).
    "icebreaker-gemv": Board("icebreaker-gemv", 0, kit="icebreaker", gemv=True, gemv_engine=SMALL_ICEBREAKER,
                             gemv_y_depth=384),
}


class BoardTop(wiring.Component):
    """The whole design for one board (no ports: everything goes through platform resources)."""

    def __init__(self, board: str, residuals: int | None = None):
        if board not in BOARDS:
            raise ValueError(f"unknown board {board!r}; boards: {', '.join(BOARDS)}")
        self.board = BOARDS[board]
        self.config = self.board.config(residuals)
        self.gemv = self.board.gemv_config()
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        uart = platform.request("uart", 0, dir="-")
        m.submodules.rx_pin = rx_pin = io.Buffer("i", uart.rx)
        m.submodules.tx_pin = tx_pin = io.Buffer("o", uart.tx)
        core = BoardCore(self.config, clk_freq=platform.default_clk_frequency, baud=self.board.baud,
                         **self.board.gemv_args())
        m.submodules.core = core
        m.d.comb += [core.rx.eq(rx_pin.i), tx_pin.o.eq(core.tx)]
        if self.board.activity_led:
            # LED 0: serial activity. Not on the ULX3S: it was left out while that board's build
            # still used ABC9, which failed an internal assertion with it (synth/flow/bitstream.py).
            m.submodules.led0 = led0 = io.Buffer("o", platform.request("led", 0, dir="-"))
            m.d.comb += led0.o.eq(core.activity)
        return m


def elaborate_for(board: str, residuals: int | None = None):
    """Prepare the board top for its platform (no toolchain): the design and pins must be consistent."""
    top = BoardTop(board, residuals)
    platform = BOARDS[board].platform()
    return platform.prepare(top, name=BOARDS[board].top_name, debug_verilog=False)
