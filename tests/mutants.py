"""Deliberately broken decoder parts, to show that each checker catches a real bug.

Used by the amaranth.sim tests (tests/test_hdl_units.py, tests/test_hdl_decoder.py)
and by the cocotb regression test: a LUT bank that stores one bit of one entry
flipped, one whose two-cycle (LUT RAM) read takes its word from the memory the
*next* read addresses, a codebook mux with the selection inverted, a formatter
that rounds BF16 ties away from zero; and, each wrapping the real component
behind its own ports, a scale decoder whose subnormal scales are one binade too
large, block fields that take the other page's layer offset, and an output
buffer whose enable decision arrives a cycle late, and a formatter that builds one
stage more than it declares (an off-by-one stage, shown on the shallow pipeline).
For the GEMV engine's cocotb bench: a block sequencer that still says a vector is
loaded in the cycle after a pass has freed its x page, and one whose ``sparse`` error bit
misses a residual entry below its tile's first row; for the folded (small-FPGA) engine, two whose
front end's skid changes the chunk it hands on (a tag's slot, a block's sign).
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream

from sop.hdl.block_fields import BlockFields
from sop.hdl.codebook_mux import CodebookMux
from sop.hdl.gemv import GemvEngine
from sop.hdl.gemv_sequencer import BlockSequencer
from sop.hdl.hif_formatter import HifFormatter
from sop.hdl.lut_bank import LutBank
from sop.hdl.output_buffer import OutputBuffer
from sop.hdl.scale_decoder import ScaleDecoder


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


class SubnormalScaleOffByOne(ScaleDecoder):
    """A subnormal scale (exponent field 0) gets an exponent one too large."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.real = real = ScaleDecoder(self.config)
        scale = self.config.scale
        m.d.comb += [real.header.eq(self.header), self.select.eq(real.select), self.fields.eq(real.fields)]
        with m.If(self.header[scale.mbits:scale.bits] == 0):
            m.d.comb += self.fields.exp.eq(real.fields.exp + 1)
        return m


class OtherPageOffset(BlockFields):
    """Each block takes the layer offset of the page it does not read."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.real = real = BlockFields(self.config, read_latency=self.read_latency)
        m.d.comb += [real.enable.en.eq(self.enable.en), real.enable.lane.eq(self.enable.lane),
                     real.issue.write_page.eq(self.issue.write_page), real.offset.eq(self.offset),
                     real.offset_we.eq(self.offset_we), self.block.eq(real.block)]
        for g, f in enumerate(self.issue.fields):
            m.d.comb += [real.issue.fields[g].fields.eq(f.fields), real.issue.fields[g].page.eq(~f.page)]
        return m


class LateEnable(OutputBuffer):
    """The enable decision leaves a cycle late (an extra register level without a larger skid)."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.real = real = OutputBuffer(self.last.shape(), levels=self.levels)
        late = Signal(init=1)
        m.d.sync += late.eq(real.en_next)
        m.d.comb += [real.en.eq(self.en), real.en_upcoming.eq(self.en_upcoming),
                     real.entering_valid.eq(self.entering_valid), real.last.eq(self.last),
                     real.values.ready.eq(self.values.ready), self.values.valid.eq(real.values.valid),
                     self.values.payload.eq(real.values.payload), self.en_next.eq(late)]
        return m


class ExtraStage(HifFormatter):
    """One enabled register more on the output than ``latency`` says: the word arrives a stage
    after the valid bit that announces it."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.real = real = HifFormatter(self.config)
        late = Signal.like(real.out, name="late")
        with m.If(self.en):
            m.d.sync += late.eq(real.out)
        m.d.comb += [real.en.eq(self.en), real.word.eq(self.word), real.block.eq(self.block),
                     self.out.eq(late)]
        return m


class LateFreedPage(BlockSequencer):
    """``x_loaded`` stays high for the cycle after a pass's last block frees the only loaded x page (the
    mutation run's survivor 107 of gemv-sop4-g16, a bit of ``x_held``'s adder, did exactly this): a
    block offered in that cycle is taken with no vector loaded, and ``w_before_x`` not flagged."""

    def _free_x_page(self, m, x_pages, cnt, s0, w_take, terms_done):
        super()._free_x_page(m, x_pages, cnt, s0, w_take, terms_done)
        freed = (self.en & s0.valid & s0.tag.end) | (terms_done & ~self.term_busy)
        x_in = x_pages.take & self.x.payload.last
        with m.If(freed & ~x_in & (x_pages.held == 1)):          # (the last assignment wins)
            m.d.sync += x_pages.loaded.eq(1)


class EntryBelowTileUnflagged(BlockSequencer):
    """The ``sparse`` error bit without its compare of an entry's row with its tile's first row (``row <
    terms_base`` tied to 0, as a mutation of that compare would leave it): an entry below its tile's
    first row is not flagged. Only the flag: the entry still goes to slot 0, as a flagged one does
    (so that ``status`` is the one place where the bug shows)."""

    def _entry_register(self, m, cnt, tile, error_now):
        terms_done = super()._entry_register(m, cnt, tile, error_now)
        sp, group_bits = self.sparse.payload, (self.config.group - 1).bit_length()
        # the other two compares, registered as the entry register registers its ``outside``
        rest = Signal(name="entry_outside_rest", reset_less=True)
        with m.If(self.sparse.ready):
            m.d.sync += rest.eq((sp.row > tile.top) | (sp.col >> group_bits > cnt.cols_last))
        with m.If(self.entries.valid & self.entries.ready):      # (the last assignment wins)
            m.d.comb += error_now.sparse.eq(rest)
        return terms_done


class _SkidPopped(GemvEngine):
    """A folded engine whose front end's output buffer changes a chunk as it leaves the skid (``skid``,
    to override): the chunk stream into the block dot unit goes through a copy that, while the
    buffer's skid holds a chunk (the payload is then the skid's), hands on ``skid(payload)`` instead.
    The skid's fill is worked out beside the buffer from its control ports, as hdl.output_buffer does
    for one entry (``held_gt0``: a beat that leaves the last stage, ``capture``, and is not taken
    stays; one taken from the skid leaves it). What the mutation runs' yosys mutants of the skid's
    output bits do, on the folded engine's one skid entry (the drawn mutants themselves are sites in
    the flattened design, not components to build)."""

    def skid(self, m, payload, out):
        raise NotImplementedError

    def _block_dot(self, m, fifos, front, leaves, drained):
        ctl = m.submodules.out.control          # the front end's output stage (the unit's is inside it)
        assert len(ctl.en) == 1 and self.fold, "one output buffer, one skid entry: the folded engine's"
        en, upcoming, entering = ctl.en[0], ctl.en_upcoming[0], ctl.entering_valid[0]
        last_valid, held, capture = Signal(name="m_last_valid"), Signal(name="m_held"), Signal(name="m_capture")
        pop = front.valid & front.ready
        pop_last = pop & ~held
        last_next = Mux(en, entering, last_valid & ~pop_last)
        stays = capture & ~pop_last
        m.d.sync += [last_valid.eq(last_next), capture.eq(upcoming & last_next),
                     held.eq(Mux(held, stays | ~pop, stays))]
        mutated = stream.Signature(front.payload.shape()).create(path=("front_mutated",))
        m.d.comb += [mutated.valid.eq(front.valid), front.ready.eq(mutated.ready), mutated.payload.eq(front.payload)]
        with m.If(held):
            self.skid(m, front.payload, mutated.payload)
        super()._block_dot(m, fifos, mutated, leaves, drained)


class SkidSlotFlip(_SkidPopped):
    """The skid's ``tag.slot`` bit 0 XORed with its ``tag.first`` (the small-FPGA engine's survivor 10):
    a row's first block whose last chunk waited in the skid starts its sum in the next slot."""

    def skid(self, m, payload, out):
        m.d.comb += out.tag.slot[0].eq(payload.tag.slot[0] ^ payload.tag.first)


class SkidSignSet(_SkidPopped):
    """The skid's ``block.sign`` held at 1 (the small-FPGA engine's survivor 67): a positive block whose
    chunk before the last waited in the skid (the folded unit reads the sign there) comes out negated."""

    def skid(self, m, payload, out):
        m.d.comb += out.block.sign.eq(1)
