"""LUT bank: the loadable, double-buffered codebook tables, one RAM copy per lane.

Each lane has its own ``lib.memory.Memory`` holding every table word it may
read: ``2 pages x banks x 2**code_bits`` words, addressed ``{page, bank, code}``.
The decoder reads the *active* page while the host loads the next layer's
tables into the other one, so a table swap between layers costs no cycle; the
bank bit is the block's selection bit (hdl.codebook_mux). One read port per
lane is what a multi-read table is in RAM anyway (ECP5: 4-bit DPR16X4 cells
with one read port each; iCE40: one SB_RAM40_4K per lane, which holds a lane's
whole table), written out so that every tool maps it to RAM, never to a
flip-flop bank with a wide mux.

Write path. A write ``{bank, addr, data}`` into page ``write_page`` is
registered once per group of lanes (hdl.replica) and reaches the RAM on the
next clock edge: a word written in cycle ``t`` can be read from cycle ``t + 2``.

Read ports: ``read_en[lane]``, ``read_page[lane]``, ``read_bank[lane]``,
``read_addr[lane]`` are sampled at a clock edge with ``read_en`` high;
``read_data[lane]`` holds the word ``read_latency`` such edges later, and keeps
it while ``read_en`` is low (a stalled pipeline). Pages are never read and
written at the same time, so no read-during-write behavior is needed.

RAM shape (``lutram_depth``). With 0, a lane's table is one memory read
through its own output register (``read_latency`` 1): what block RAM is built
for (iCE40 SB_RAM40_4K). LUT RAM is shallow (ECP5 DPR16X4: 16 words) and reads
asynchronously, so a deeper memory becomes rows of LUT RAM and a row mux in
front of the read register, and that read is the longest path of the lane.
With ``lutram_depth = D`` the table is built from memories of ``D`` words:
each is read into its own register, and a second register takes the
addressed one (``read_latency`` 2; more flip-flops, a shorter path).

No collision check (``no_rw_check``, the shallow pipeline's bank, hdl.lanes):
each memory carries yosys's ``no_rw_check`` attribute, which states the
contract above (a read and a write never meet at one address) to synthesis.
Without it yosys cannot prove that, and on iCE40 builds the "read the old
word" behaviour around every SB_RAM40_4K in logic: a comparison of the two
addresses, a bypass register of the word and a mux per bit, measured at about
18 LUT4 and 17 flip-flops per lane (sop4, ``synth_ice40``; with it, under
1 LUT4 and 5 flip-flops per lane: the write port's copies). The simulation is
the same either way. The default (``False``) keeps the Verilog it always had.

Write regions (``regions`` R > 1, a wide decoder, hdl.config ``wide``): the
write comes as R copies, ``write_regions[r]`` = ``{en, page, bank, addr,
data}`` (each a register of the caller's, hdl.lanes), and each group's write
registers load from their region's copy; the timing from there is the same.
With R = 1 (the default) the ports are ``write`` and ``write_page`` as above.

Latency: ``read_latency`` enabled edges from a read to its word. ``model`` is
the table lookup the reads must return.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Module, Signal, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from . import replica as rep


def table_depth(code_bits: int, banks: int) -> int:
    """Words in one lane's table: 2 pages x ``banks`` x 2^``code_bits``."""
    return 2 * banks << code_bits


def lutram_depth_problem(lutram_depth: int, depth: int) -> str:
    """Why a table of ``depth`` words cannot be built from memories of ``lutram_depth`` words, or ""
    (the decoder's and the GEMV engine's configurations check it before any hardware is built). A
    depth that is no power of two would lose words: the part select takes whole address bits."""
    d = lutram_depth
    if d and (d & (d - 1) or not 2 <= d < depth):
        return (f"lutram_depth must be 0 (one memory per lane) or a power of two from 2 to half the lane's "
                f"table depth {depth}, got {d}")
    return ""


def load_layout(code_bits: int, hif_bits: int) -> data.StructLayout:
    """One table write as the host gives it (the decoder's and the GEMV engine's ``load`` word): bank
    (0 = A, 1 = B), entry address, HIF code."""
    return data.StructLayout({"bank": unsigned(1), "addr": unsigned(code_bits), "data": unsigned(hif_bits)})


def read_latency(lutram_depth: int) -> int:
    """Enabled clock edges from a read's address to its word: 1 for one memory, 2 for LUT RAM
    memories (their registers, then the row select)."""
    return 1 if lutram_depth == 0 else 2


def model(tables, page, bank, addr) -> np.ndarray:
    """The word each read ``(page, bank, addr)`` returns: ``tables[page, bank, addr]`` (the last
    word written there)."""
    return np.asarray(tables)[np.asarray(page), np.asarray(bank), np.asarray(addr)]


class LutBank(wiring.Component):
    model = staticmethod(model)

    def __init__(self, *, code_bits: int, banks: int, word, lanes: int, lutram_depth: int = 0,
                 no_rw_check: bool = False, regions: int = 1):
        self.code_bits, self.banks, self.lanes, self.regions = code_bits, banks, lanes, regions
        # the memories' attributes: yosys's no_rw_check where asked (module docstring)
        self.mem_attrs = {"no_rw_check": 1} if no_rw_check else None
        self.word = word
        self.depth = table_depth(code_bits, banks)
        why = lutram_depth_problem(lutram_depth, self.depth)
        if why:
            raise ValueError(why)
        self.part_depth = lutram_depth or self.depth
        self.read_latency = read_latency(lutram_depth)
        lanes_of = lambda shape: data.ArrayLayout(shape, lanes)    # noqa: E731
        if regions == 1:
            writes = {"write": In(stream.Signature(data.StructLayout({
                "bank": unsigned(1), "addr": unsigned(code_bits), "data": word}), always_ready=True)),
                "write_page": In(1)}
        else:
            writes = {"write_regions": In(data.ArrayLayout(data.StructLayout({
                "en": unsigned(1), "page": unsigned(1), "bank": unsigned(1), "addr": unsigned(code_bits),
                "data": word}), regions))}
        super().__init__({
            **writes,
            "read_en": In(lanes_of(1)),
            "read_page": In(lanes_of(1)),
            "read_bank": In(lanes_of(1)),
            "read_addr": In(lanes_of(unsigned(code_bits))),
            "read_data": Out(lanes_of(word)),
        })

    @property
    def latency(self) -> int:
        """Enabled edges from a read to its word on ``read_data``: ``read_latency``."""
        return self.read_latency

    def stored_word(self, addr, data):
        """The word the RAM stores for a write (the identity; tests override it to inject a bug)."""
        return data

    def part_select(self, registered, current):
        """Which memory a two-cycle read takes its word from: the one its address named a
        cycle earlier, ``registered`` (tests override it to inject a bug)."""
        return registered

    def _address(self, code, bank, page):
        return Cat(code, bank, page) if self.banks == 2 else Cat(code, page)

    def elaborate(self, platform):
        m = Module()
        depth, part_depth = self.depth, self.part_depth
        parts, part_bits = depth // part_depth, (part_depth - 1).bit_length()
        word_bits = data.Layout.cast(self.word).size
        copies = []
        n_groups = rep.groups(self.lanes)
        for g in range(n_groups):        # the write port, registered per lane group
            if self.regions == 1:
                w, page, valid = self.write.payload, self.write_page, self.write.valid
            else:
                w = self.write_regions[g * self.regions // n_groups]
                page, valid = w.page, w.en
            c = {"addr": rep.replica(range(depth), name=f"waddr_g{g}", reset_less=True),
                 "data": rep.replica(unsigned(word_bits), name=f"wdata_g{g}", reset_less=True),
                 # no reset: a write taken before a reset still lands, like the RAM keeps its words
                 "en": rep.replica(1, name=f"wen_g{g}", reset_less=True)}
            m.d.sync += [c["addr"].eq(self._address(w.addr, w.bank, page)),
                         c["data"].eq(self.stored_word(w.addr, w.data.as_value())),
                         c["en"].eq(valid)]
            copies.append(c)
        per_group = self.lanes // len(copies)
        for lane in range(self.lanes):
            c = copies[lane // per_group]
            addr = self._address(self.read_addr[lane], self.read_bank[lane], self.read_page[lane])
            part_data = []
            for p in range(parts):
                mem = memory.Memory(shape=unsigned(word_bits), depth=part_depth, init=[], attrs=self.mem_attrs)
                m.submodules[f"mem{lane}" if parts == 1 else f"mem{lane}_{p}"] = mem
                wp = mem.write_port()
                here = c["en"] if parts == 1 else c["en"] & (c["addr"][part_bits:] == p)
                m.d.comb += [wp.addr.eq(c["addr"][:part_bits]), wp.data.eq(c["data"]), wp.en.eq(here)]
                rp = mem.read_port()      # not transparent: reads and writes never share a page
                m.d.comb += [rp.addr.eq(addr[:part_bits]), rp.en.eq(self.read_en[lane])]
                part_data.append(rp.data)
            if parts == 1:
                m.d.comb += self.read_data[lane].eq(part_data[0])
                continue
            part = Signal(range(parts), name=f"part{lane}", reset_less=True)
            data_reg = Signal(unsigned(word_bits), name=f"read_data{lane}", reset_less=True)
            chosen = Array(part_data)[self.part_select(part, addr[part_bits:])]
            with m.If(self.read_en[lane]):
                m.d.sync += [part.eq(addr[part_bits:]), data_reg.eq(chosen)]
            m.d.comb += self.read_data[lane].eq(data_reg)
        return m
