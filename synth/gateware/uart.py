"""A plain 8N1 UART: a transmitter and a receiver with ``lib.stream`` byte interfaces.

Both run in the ``sync`` domain and are parameterized by the clock frequency
and the baud rate; one bit lasts ``divisor = round(clk_freq / baud)`` cycles
(``divisor_for`` refuses a divisor under 4 or a baud error over 2 %).

``UartTx``
  ``i`` (stream of bytes in), ``tx`` (line out, idle high). A byte is taken
  when the line is idle or in the last cycle of a stop bit (``i.ready``) and sent as one start
  bit (0), eight data bits LSB first and one stop bit (1), each ``divisor``
  cycles; ``tx`` is a flip-flop output (no glitches). The next byte may start
  right after the stop bit: back-to-back bytes take ``10 * divisor`` cycles each.

``UartRx``
  ``rx`` (line in, any clock domain: two flip-flops synchronize it), ``o``
  (stream of bytes out), ``frame_error`` and ``overrun`` (one-cycle pulses).
  A falling edge starts a byte; the start bit is checked at its middle (a
  shorter low pulse is ignored), the data bits and the stop bit are sampled at
  their middles. A byte whose stop bit reads 0 is dropped with a
  ``frame_error`` pulse, and the receiver waits for the line to go high again
  (a break does not produce bytes). ``o`` holds one byte: the receiver cannot
  stall the line, so a byte that arrives while the previous one is still not
  taken replaces it, with an ``overrun`` pulse. A consumer that may stall
  longer than one byte time puts a FIFO behind ``o`` (synth/gateware/board.py does).
"""


from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

MIN_DIVISOR = 4
MAX_BAUD_ERROR = 0.02


def divisor_for(clk_freq: float, baud: float) -> int:
    """Clock cycles per bit; refuses rates the receiver could not sample reliably."""
    if clk_freq <= 0 or baud <= 0:
        raise ValueError(f"clock frequency and baud must be positive, got {clk_freq}, {baud}")
    divisor = round(clk_freq / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(f"{baud} Bd at {clk_freq} Hz is {clk_freq / baud:.2f} cycles per bit; "
                         f"the UART needs at least {MIN_DIVISOR}: lower the baud rate")
    error = abs(clk_freq / divisor - baud) / baud
    if error > MAX_BAUD_ERROR:
        raise ValueError(f"{baud} Bd at {clk_freq} Hz is off by {error:.1%} with divisor {divisor} "
                         f"(at most {MAX_BAUD_ERROR:.0%}): choose another baud rate")
    return divisor


class UartTx(wiring.Component):
    i: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, *, clk_freq: float, baud: float):
        self.clk_freq, self.baud = clk_freq, baud
        self.divisor = divisor_for(clk_freq, baud)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        shreg = Signal(10, init=0x3FF)          # bit 0 is on the line; ones shift in behind
        bits = Signal(range(11))                # bits still to send (0: idle)
        timer = Signal(range(d))
        m.d.comb += self.tx.eq(shreg[0])
        # the next byte is taken in the last cycle of the stop bit: no idle cycle between bytes
        m.d.comb += self.i.ready.eq((bits == 0) | ((bits == 1) & (timer == 0)))
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [shreg.eq(Cat(0, self.i.payload, 1)), bits.eq(10), timer.eq(d - 1)]
        with m.Elif(bits != 0):
            with m.If(timer == 0):
                m.d.sync += [shreg.eq(Cat(shreg[1:], 1)), bits.eq(bits - 1), timer.eq(d - 1)]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)
        return m


class UartRx(wiring.Component):
    rx: In(1, init=1)
    o: Out(stream.Signature(8))
    frame_error: Out(1)
    overrun: Out(1)

    def __init__(self, *, clk_freq: float, baud: float):
        self.clk_freq, self.baud = clk_freq, baud
        self.divisor = divisor_for(clk_freq, baud)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        meta = Signal(init=1)
        line = Signal(init=1)
        m.d.sync += [meta.eq(self.rx), line.eq(meta)]

        timer = Signal(range(d))
        shreg = Signal(8)
        nbit = Signal(range(8))
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(line):
                    m.next = "IDLE"                 # a glitch, not a start bit
                with m.Else():
                    m.d.sync += [timer.eq(d - 1), nbit.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    m.d.sync += [shreg.eq(Cat(shreg[1:], line)), timer.eq(d - 1), nbit.eq(nbit + 1)]
                    with m.If(nbit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(line):
                    m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                    m.d.comb += self.overrun.eq(self.o.valid & ~self.o.ready)
                    m.next = "IDLE"
                with m.Else():
                    m.d.comb += self.frame_error.eq(1)
                    m.next = "BREAK"
            with m.State("BREAK"):
                with m.If(line):
                    m.next = "IDLE"
        return m
