"""A board in amaranth.sim as a host transport: the far end of ``BoardLink`` without hardware.

Role: lets the host code a real board uses (synth/host/client.py,
synth/host/bringup.py, synth/host/gemv_bringup.py) drive the gateware in
simulation, for tests/test_protocol.py, tests/test_board_cli.py,
tests/test_board_gemv.py, ``python -m sop.synth.host.bringup --sim`` and
``python -m sop.synth.host.gemv_bringup --sim``. Gateware side: it imports no host
module; the host hands it bytes.

``SimSerial`` is a transport (``write(bytes)``, ``read(n, timeout)``) whose
bytes go through a queue into a running ``Simulator``; ``read`` advances the
simulation until the bytes arrive or ``timeout`` *simulated* seconds pass, and
``now()`` is the simulated time (a clock for throughput figures); ``close()``
does nothing, so it stands in for host.client.SerialTransport. Two bridges
connect the queues to a design:

* ``stream_port(engine)``: straight onto a ``ProtocolEngine``'s byte streams,
  one byte a cycle (fast; no UART);
* ``uart_port(core, divisor)``: onto the ``rx`` / ``tx`` pins of a
  ``BoardCore``, bit-banged by the testbench at ``divisor`` cycles a bit (an
  UART model independent of synth/gateware/uart.py), so the whole board design runs.

The host "sends" a frame at once while the wire needs ``10 * divisor`` cycles
a byte: ``uart_timeout`` gives a host timeout that covers a whole frame on the
wire and then the reply.
"""

from __future__ import annotations

import collections

from amaranth.sim import Simulator

DEFAULT_PERIOD = 1e-6          # simulated clock period, seconds (1 MHz)
REPLY_ALLOWANCE = 40           # bytes on the wire beyond the payload: headers, CRCs, the reply


class SimSerial:
    """A host transport whose far end is a simulated design (write / read(n, timeout) / now)."""

    def __init__(self, top, *, period: float = DEFAULT_PERIOD, step_cycles: int = 32):
        self.to_dev, self.from_dev = collections.deque(), collections.deque()
        self.sim = Simulator(top)
        self.sim.add_clock(period)
        self.period = period
        self.t = 0.0
        self.step = step_cycles * period

    def write(self, data: bytes) -> None:
        self.to_dev.extend(data)

    def read(self, n: int, timeout: float) -> bytes:
        deadline = self.t + timeout
        while len(self.from_dev) < n and self.t < deadline:
            self.t += self.step
            self.sim.run_until(self.t)
        return bytes(self.from_dev.popleft() for _ in range(min(n, len(self.from_dev))))

    def now(self) -> float:
        """Simulated seconds so far."""
        return self.t

    def close(self) -> None:
        """Nothing to release (a drop-in for host.client.SerialTransport)."""


def stream_port(engine, *, period: float = DEFAULT_PERIOD) -> SimSerial:
    """The engine's byte streams fed from / drained into the transport's queues, one byte a cycle."""
    port = SimSerial(engine, period=period)

    async def bridge(ctx):
        ctx.set(engine.tx.ready, 1)
        while True:
            offered = bool(port.to_dev)       # the host may write while the simulation is paused
            ctx.set(engine.rx.valid, offered)
            if offered:
                ctx.set(engine.rx.payload, port.to_dev[0])
            _, _, taken, valid, byte = await ctx.tick().sample(engine.rx.ready, engine.tx.valid,
                                                               engine.tx.payload)
            if offered and taken:
                port.to_dev.popleft()
            if valid:
                port.from_dev.append(byte)

    port.sim.add_testbench(bridge, background=True)
    return port


def uart_port(core, divisor: int, *, period: float = DEFAULT_PERIOD) -> SimSerial:
    """A ``BoardCore``'s rx / tx pins driven and sampled bit by bit (8N1) by a UART model."""
    port = SimSerial(core, period=period, step_cycles=10 * divisor)

    # plain ticks only: the simulation is left suspended when the host is done, and a testbench
    # parked inside tick().repeat() / until() (async generators) warns when it is collected
    async def tx_to_board(ctx):
        ctx.set(core.rx, 1)
        while True:
            if not port.to_dev:
                await ctx.tick()
                continue
            byte = port.to_dev.popleft()
            for bit in [0] + [(byte >> i) & 1 for i in range(8)] + [1]:
                ctx.set(core.rx, bit)
                for _ in range(divisor):
                    await ctx.tick()

    async def rx_from_board(ctx):
        while True:
            _, _, line = await ctx.tick().sample(core.tx)
            if line:
                continue
            for _ in range(divisor // 2):                  # to the middle of the start bit
                await ctx.tick()
            bits = []
            for _ in range(9):
                for _ in range(divisor):
                    await ctx.tick()
                bits.append(ctx.get(core.tx))
            if bits[8] != 1:
                raise AssertionError("stop bit from the board is 0")
            port.from_dev.append(sum(b << i for i, b in enumerate(bits[:8])))

    port.sim.add_testbench(tx_to_board, background=True)
    port.sim.add_testbench(rx_from_board, background=True)
    return port


def uart_timeout(max_payload: int, divisor: int, period: float = DEFAULT_PERIOD) -> float:
    """A host timeout (simulated seconds) covering the longest frame on the wire, then its reply."""
    return (max_payload + REPLY_ALLOWANCE) * 10 * divisor * period
