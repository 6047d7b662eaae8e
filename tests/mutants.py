"""Deliberately broken decoder parts, to show that each checker catches a real bug.

Used by the amaranth.sim tests and by the cocotb regression test: a LUT bank
that stores one bit of one entry flipped, one whose two-cycle (LUT RAM) read
takes its word from the memory the *next* read addresses, a codebook mux with the selection
inverted, and a formatter that rounds BF16 ties away from zero.
"""

from amaranth.hdl import Module, Mux

from sop.hdl.codebook_mux import CodebookMux
from sop.hdl.hif_formatter import HifFormatter
from sop.hdl.lut_bank import LutBank


class FlippedLutBit(LutBank):
    """Entry 5 of every table is stored with bit 3 inverted."""

    def stored_word(self, addr, data):
        return Mux(addr == 5, data ^ (1 << 3), data)


class StalePartSelect(LutBank):
    """A two-cycle read picks its memory with the current address instead of its own."""

    def part_select(self, registered, current):
        return current


class InvertedSelect(CodebookMux):
    """The mux reads bank A when the selection bit says B."""

    def elaborate(self, platform):
        m = Module()
        for lane in range(self.lanes):
            m.d.comb += self.bank[lane].eq(~self.select[self.block_of(lane)])
        return m


class TiesAway(HifFormatter):
    """BF16 ties round away from zero instead of to even."""

    @staticmethod
    def round_up(r0, guard, sticky):
        return guard
