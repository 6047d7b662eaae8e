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
``read_data[lane]`` holds the word from the next cycle on, and keeps it while
``read_en`` is low (a stalled pipeline). Pages are never read and written at
the same time, so no read-during-write behavior is needed.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from . import replica as rep


class LutBank(wiring.Component):
    def __init__(self, *, code_bits: int, banks: int, word, lanes: int):
        self.code_bits, self.banks, self.lanes = code_bits, banks, lanes
        self.word = word
        lanes_of = lambda shape: data.ArrayLayout(shape, lanes)    # noqa: E731
        super().__init__({
            "write": In(stream.Signature(data.StructLayout({
                "bank": unsigned(1), "addr": unsigned(code_bits), "data": word}), always_ready=True)),
            "write_page": In(1),
            "read_en": In(lanes_of(1)),
            "read_page": In(lanes_of(1)),
            "read_bank": In(lanes_of(1)),
            "read_addr": In(lanes_of(unsigned(code_bits))),
            "read_data": Out(lanes_of(word)),
        })

    def stored_word(self, addr, data):
        """The word the RAM stores for a write (the identity; tests override it to inject a bug)."""
        return data

    def _address(self, code, bank, page):
        return Cat(code, bank, page) if self.banks == 2 else Cat(code, page)

    def elaborate(self, platform):
        m = Module()
        w = self.write.payload
        depth = 2 * self.banks << self.code_bits
        word_bits = data.Layout.cast(self.word).size
        copies = []
        for g in range(rep.groups(self.lanes)):        # the write port, registered per lane group
            c = {"addr": rep.replica(range(depth), name=f"waddr_g{g}", reset_less=True),
                 "data": rep.replica(unsigned(word_bits), name=f"wdata_g{g}", reset_less=True),
                 "en": rep.replica(1, name=f"wen_g{g}")}
            m.d.sync += [c["addr"].eq(self._address(w.addr, w.bank, self.write_page)),
                         c["data"].eq(self.stored_word(w.addr, w.data.as_value())),
                         c["en"].eq(self.write.valid)]
            copies.append(c)
        per_group = self.lanes // len(copies)
        for lane in range(self.lanes):
            c = copies[lane // per_group]
            mem = memory.Memory(shape=unsigned(word_bits), depth=depth, init=[])
            m.submodules[f"mem{lane}"] = mem
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(c["addr"]), wp.data.eq(c["data"]), wp.en.eq(c["en"])]
            rp = mem.read_port()          # not transparent: reads and writes never share a page
            m.d.comb += [rp.addr.eq(self._address(self.read_addr[lane], self.read_bank[lane],
                                                  self.read_page[lane])),
                         rp.en.eq(self.read_en[lane]),
                         self.read_data[lane].eq(rp.data)]
        return m
