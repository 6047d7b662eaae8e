"""synth/gateware/uart.py in amaranth.sim: the line format bit by bit, TX to RX loopback of every byte, framing errors."""

import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from sop.synth.gateware.uart import UartRx, UartTx, divisor_for

CLK, BAUD = 8e6, 2e6          # 4 cycles per bit
D = 4


def simulate(top, bench, cycles_limit=20_000):
    sim = Simulator(top)
    sim.add_clock(1 / CLK)
    sim.add_testbench(bench)
    sim.run_until(cycles_limit / CLK)


def test_divisor_checks():
    assert divisor_for(12e6, 115200) == 104
    assert divisor_for(CLK, BAUD) == D
    with pytest.raises(ValueError, match="at least 4"):
        divisor_for(12e6, 4e6)
    with pytest.raises(ValueError, match="off by"):
        divisor_for(10e6, 2.2e6)          # 4.55 cycles per bit rounds to 5: 9 % off


def test_tx_line_format_and_back_to_back_timing():
    """Start bit, 8 data bits LSB first, stop bit, each D cycles; bytes follow with no idle bit."""
    dut = UartTx(clk_freq=CLK, baud=BAUD)
    sent = [0xA5, 0x00, 0xFF, 0x3C]
    line = []

    async def bench(ctx):
        assert ctx.get(dut.tx) == 1
        queue = list(sent)
        for _ in range(len(sent) * 10 * D + 8):
            ctx.set(dut.i.valid, bool(queue))
            if queue:
                ctx.set(dut.i.payload, queue[0])
            _, _, ready = await ctx.tick().sample(dut.i.ready)
            if queue and ready:
                queue.pop(0)
            line.append(ctx.get(dut.tx))
        ctx.set(dut.i.valid, 0)

    simulate(dut, bench)
    start = line.index(0)
    for n, byte in enumerate(sent):
        base = start + n * 10 * D
        bits = [line[base + b * D + D // 2] for b in range(10)]
        assert bits[0] == 0 and bits[9] == 1, (n, bits)
        assert sum(bit << i for i, bit in enumerate(bits[1:9])) == byte
        for b in range(10):                           # each bit holds for exactly D cycles
            assert len(set(line[base + b * D:base + (b + 1) * D])) == 1
    assert all(line[start + len(sent) * 10 * D:])     # idle high afterwards


def test_loopback_every_byte_value():
    tx, rx = UartTx(clk_freq=CLK, baud=BAUD), UartRx(clk_freq=CLK, baud=BAUD)
    m = Module()
    m.submodules.tx, m.submodules.rx = tx, rx
    m.d.comb += rx.rx.eq(tx.tx)
    got, errors = [], []

    async def bench(ctx):
        queue = list(range(256))
        ctx.set(rx.o.ready, 1)
        while len(got) < 256:
            ctx.set(tx.i.valid, bool(queue))
            if queue:
                ctx.set(tx.i.payload, queue[0])
            _, _, ready, valid, byte, ferr, ovr = await ctx.tick().sample(
                tx.i.ready, rx.o.valid, rx.o.payload, rx.frame_error, rx.overrun)
            if queue and ready:
                queue.pop(0)
            if valid:
                got.append(byte)
            if ferr or ovr:
                errors.append((len(got), ferr, ovr))

    simulate(m, bench, cycles_limit=256 * 10 * D + 1000)
    assert got == list(range(256))
    assert errors == []


async def drive_byte(ctx, rx, byte, stop=1, d=D):
    for bit in [0] + [(byte >> i) & 1 for i in range(8)] + [stop]:
        ctx.set(rx.rx, bit)
        await ctx.tick().repeat(d)


def test_rx_framing_error_drops_byte_and_recovers():
    dut = UartRx(clk_freq=CLK, baud=BAUD)
    got, ferrs = [], []

    async def monitor(ctx):
        ctx.set(dut.o.ready, 1)
        while True:
            _, _, valid, byte, ferr = await ctx.tick().sample(dut.o.valid, dut.o.payload, dut.frame_error)
            if valid:
                got.append(byte)
            if ferr:
                ferrs.append(len(got))

    async def bench(ctx):
        await ctx.tick().repeat(5)
        await drive_byte(ctx, dut, 0x5A)
        await drive_byte(ctx, dut, 0x81, stop=0)      # bad stop bit
        await ctx.tick().repeat(3 * D)                # the line stays low (a break)...
        ctx.set(dut.rx, 1)                            # ...then idles
        await ctx.tick().repeat(2 * D)
        ctx.set(dut.rx, 0)                            # a glitch shorter than half a bit
        await ctx.tick()
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(2 * D)
        await drive_byte(ctx, dut, 0xC3)
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(2 * D)

    sim = Simulator(dut)
    sim.add_clock(1 / CLK)
    sim.add_testbench(monitor, background=True)
    sim.add_testbench(bench)
    sim.run()
    assert got == [0x5A, 0xC3]
    assert ferrs == [1]


def test_rx_overrun_when_byte_not_taken():
    dut = UartRx(clk_freq=CLK, baud=BAUD)
    overruns = []

    async def monitor(ctx):
        while True:
            _, _, ovr = await ctx.tick().sample(dut.overrun)
            overruns.append(ovr)

    async def bench(ctx):
        ctx.set(dut.o.ready, 0)
        await drive_byte(ctx, dut, 0x11)
        await drive_byte(ctx, dut, 0x22)
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(D)
        assert ctx.get(dut.o.valid) and ctx.get(dut.o.payload) == 0x22

    sim = Simulator(dut)
    sim.add_clock(1 / CLK)
    sim.add_testbench(monitor, background=True)
    sim.add_testbench(bench)
    sim.run()
    assert sum(overruns) == 1
