"""docs/hardware.md's two AXI4-Stream timing figures are the shell's own trace: each row and each cycle of
the figure against ``AxisDecoder`` run in amaranth.sim, fed as the figure says (the figures were drawn from a
trace, and nothing else kept them one)."""

import dataclasses
import re
from pathlib import Path

import numpy as np
from amaranth.sim import Simulator

from sop.hdl import axis
from sop.hdl.config import named_configs, residual_configs
from sop.sim import stimulus

ROOT = Path(__file__).resolve().parent.parent
CONFIGS, SPARSE = named_configs(), residual_configs()


def figure_rows(text: str, first_row: str) -> tuple[list[int], dict[str, dict[int, str]]]:
    """The figure of docs/hardware.md whose first row after ``cycle`` is ``first_row``: its cycle numbers
    and, per row, each cycle's 4-character cell, stripped (``‾‾‾‾`` high, ``____`` low, a label, or '')."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("cycle ") and
                 lines[i + 1].startswith(first_row))
    header = lines[start]
    cols = {int(m.group()): m.start() for m in re.finditer(r"\d+", header)}
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("```"):
            break
        name = line.split()[0]
        rows[name] = {c: line[at:at + 4].strip() for c, at in cols.items()}
    return sorted(cols), rows


def traced_shell(cfg, layers, paused, n_cycles):
    """Each cycle of an ``AxisDecoder`` fed as the figures are: every packet queued from cycle 0 (each
    TVALID high while its stream has beats), ``m_axis_tready`` low in the ``paused`` cycles. Per cycle,
    the figures' rows, data as their labels: load words ``a0``.., ``b0``.. by layer, block beats ``A0``..,
    sparse entries ``e0``.., output beats ``V0``.. (the data label only while TVALID is high)."""
    streams = {
        "s_axis_load": [(f"{chr(97 + n)}{i}", beat) for n, la in enumerate(layers)
                        for i, beat in enumerate(axis.load_beats(cfg, la.luts, la.offset, la.has_sparse))],
        "s_axis": [(f"{chr(65 + n)}{i}", beat) for n, la in enumerate(layers)
                   for i, beat in enumerate(axis.block_beats(cfg, la.headers, la.codes))],
        "s_axis_sparse": [(f"e{i}", beat) for i, beat in
                          enumerate(b for la in layers for b in axis.sparse_beats(la.sparse_index, la.sparse_values))],
    }
    dut = axis.AxisDecoder(cfg)
    trace = []

    async def host(ctx):
        at = dict.fromkeys(streams, 0)
        out = 0
        for cycle in range(n_cycles):
            row, shakes = {}, ""
            for name, beats in streams.items():
                port = getattr(dut, name, None)
                if port is None:
                    continue
                valid = at[name] < len(beats)
                label, (data, last) = beats[at[name]] if valid else ("", (0, 0))
                ctx.set(port.tdata, data)
                ctx.set(port.tlast, last)
                ctx.set(port.tvalid, valid)
                ready = ctx.get(port.tready)
                row.update({f"{name}_tvalid": valid, f"{name}_tdata": label, f"{name}_tlast": valid and last,
                            f"{name}_tready": ready})
                if valid and ready:
                    at[name] += 1
                    shakes += {"s_axis_load": "L", "s_axis": "S", "s_axis_sparse": "E"}[name]
            ready = cycle not in paused
            ctx.set(dut.m_axis.tready, ready)
            valid = ctx.get(dut.m_axis.tvalid)
            row.update({"m_axis_tvalid": valid, "m_axis_tdata": f"V{out}" if valid else "",
                        "m_axis_tlast": ctx.get(dut.m_axis.tlast), "m_axis_tready": ready})
            if valid and ready:
                out += 1
                shakes += "M"
            row["handshakes"] = "".join(sorted(shakes, key="LSEM".index))
            trace.append(row)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.run()
    return trace


def check_figure(first_row, cfg, layers, paused):
    text = ROOT.joinpath("docs", "hardware.md").read_text()
    cycles, rows = figure_rows(text, first_row)
    trace = traced_shell(cfg, layers, paused, max(cycles) + 1)
    wrong = []
    for name, cells in rows.items():
        for c in cycles:
            if name == "handshakes":
                want, got = cells[c], trace[c]["handshakes"]
            elif cells[c] in ("‾‾‾‾", "____"):
                want, got = cells[c] == "‾‾‾‾", bool(trace[c][name])
            else:
                want, got = cells[c], trace[c][name]
            if want != got:
                wrong.append(f"{name} in cycle {c}: the figure has {want!r}, the shell {got!r}")
    assert not wrong, "\n".join(wrong)


def test_the_shells_timing_figure_is_the_shells_trace():
    """docs/hardware.md's figure of sop4-g16's shell (layer A of two blocks, B's load streaming beside it,
    the consumer paused in cycles 44 and 45), cycle by cycle against the shell in amaranth.sim: every
    row and every handshake. The figure was drawn from a trace and nothing kept it one."""
    cfg = CONFIGS["sop4-g16"]
    rng = np.random.default_rng(1)
    layers = [stimulus.random_layer(cfg, rng, 2), stimulus.random_layer(cfg, rng, 2)]
    check_figure("s_axis_load_tvalid", cfg, layers, paused={44, 45})


def test_the_shells_sparse_timing_figure_is_the_shells_trace():
    """The same for the figure of sop4-g16-sp's shell: layer A's entries at 3, 17 and 20 (TLAST on the
    last), every packet queued from cycle 0, the consumer always ready."""
    cfg = SPARSE["sop4-g16-sp"]
    rng = np.random.default_rng(1)
    a = stimulus.random_layer(cfg, rng, 2)
    bf16_one = 0x3F80
    a = dataclasses.replace(a, sparse_index=np.array([3, 17, 20]), sparse_values=np.array([bf16_one] * 3))
    check_figure("s_axis_load_tdata", cfg, [a, stimulus.random_layer(cfg, rng, 2)], paused=set())
