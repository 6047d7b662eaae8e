"""Codebook mux: the selection bit of each block picks bank A or bank B for all its lanes.

Each lane's table RAM holds both banks (hdl.lut_bank); the mux does its job on
the read *address*: lane ``i`` reads bank ``select[i // group]``, the selection
bit of its block. Reading only the selected bank takes one RAM read port per
lane instead of two and leaves no data mux after the RAM.

Combinational: ``select`` has one bit per block of the beat
(``ceil(lanes / group)`` blocks), ``bank`` one bit per lane. With one bank (no
selection bit in the header) the decoder does not instantiate it.

Ports: ``select`` (in), ``bank`` (out). Latency 0. ``model`` gives each lane's
bank from the blocks' selection bits.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out


def model(lanes: int, group: int, select) -> np.ndarray:
    """Bank of each lane (..., lanes) from the selection bits (..., blocks) of the beat's blocks:
    lane ``i`` belongs to block ``i // group`` (the one block when lanes <= group)."""
    select = np.asarray(select, dtype=np.int64)
    return select[..., np.minimum(np.arange(lanes) // group, select.shape[-1] - 1)]


class CodebookMux(wiring.Component):
    latency = 0                         # combinational
    model = staticmethod(model)

    def __init__(self, *, lanes: int, group: int):
        self.lanes, self.group = lanes, group
        self.blocks = max(1, lanes // group)
        super().__init__({
            "select": In(data.ArrayLayout(unsigned(1), self.blocks)),
            "bank": Out(data.ArrayLayout(unsigned(1), lanes)),
        })

    def block_of(self, lane: int) -> int:
        return min(lane // self.group, self.blocks - 1)

    def elaborate(self, platform):
        m = Module()
        for lane in range(self.lanes):
            m.d.comb += self.bank[lane].eq(self.select[self.block_of(lane)])
        return m
