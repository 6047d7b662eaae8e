"""Codebook mux: the selection bit of each block picks bank A or bank B for all its lanes.

Combinational. ``lanes`` values come from each bank; ``select`` has one bit per
block of the beat (``ceil(lanes / group)`` blocks), and lane ``i`` belongs to
block ``i // group``. With one bank (no selection bit in the header) the
decoder does not instantiate it.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out


class CodebookMux(wiring.Component):
    def __init__(self, *, width: int, lanes: int, group: int):
        self.lanes, self.group = lanes, group
        self.blocks = max(1, lanes // group)
        super().__init__({
            "a": In(data.ArrayLayout(unsigned(width), lanes)),
            "b": In(data.ArrayLayout(unsigned(width), lanes)),
            "select": In(data.ArrayLayout(unsigned(1), self.blocks)),
            "out": Out(data.ArrayLayout(unsigned(width), lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        for lane in range(self.lanes):
            sel = self.select[min(lane // self.group, self.blocks - 1)]
            m.d.comb += self.out[lane].eq(Mux(sel, self.b[lane], self.a[lane]))
        return m
