"""LUT bank: one loadable, double-buffered codebook table with one read port per lane.

The table holds ``2**code_bits`` HIF codes per page and two pages: the decoder
reads the *active* page while the host loads the next layer's table into the
other one, so a table swap between layers costs no cycle. The page of each
access is an address bit (``{page, code}``), chosen by the decoder.

It is ``lanes`` copies of a ``lib.memory.Memory`` of ``2 * 2**code_bits``
words, each with the shared write port and one synchronous read port: the
structure a multi-read-port table has in RAM anyway (ECP5 distributed RAM:
one DPR16X4 per 4 bits per page and read port), written out so that every
synthesis tool maps it to RAM, never to a flip-flop bank with a wide mux.
(One memory with 64 read ports made yosys's memory mapper fail.)

Ports
* ``write``: always-ready stream of ``{addr, data}``; the word goes to page
  ``write_page`` (the decoder drives the inactive page).
* ``read_en``, ``read_page``, ``read_addr[lanes]``: sampled at a clock edge
  with ``read_en`` high; ``read_data[lanes]`` holds the words from the next
  cycle on, and keeps them while ``read_en`` is low (a stalled pipeline).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out


class LutBank(wiring.Component):
    def __init__(self, *, code_bits: int, width: int, lanes: int):
        self.code_bits, self.width, self.lanes = code_bits, width, lanes
        super().__init__({
            "write": In(stream.Signature(data.StructLayout({"addr": unsigned(code_bits),
                                                            "data": unsigned(width)}),
                                         always_ready=True)),
            "write_page": In(1),
            "read_en": In(1),
            "read_page": In(1),
            "read_addr": In(data.ArrayLayout(unsigned(code_bits), lanes)),
            "read_data": Out(data.ArrayLayout(unsigned(width), lanes)),
        })

    def stored_word(self, addr, data):
        """The word the RAM stores for a write (the identity; tests override it to inject a bug)."""
        return data

    def elaborate(self, platform):
        m = Module()
        for lane in range(self.lanes):
            mem = memory.Memory(shape=unsigned(self.width), depth=2 << self.code_bits, init=[])
            m.submodules[f"mem{lane}"] = mem
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(Cat(self.write.payload.addr, self.write_page)),
                         wp.data.eq(self.stored_word(self.write.payload.addr, self.write.payload.data)),
                         wp.en.eq(self.write.valid)]
            rp = mem.read_port()          # not transparent: reads and writes never share a page
            m.d.comb += [rp.addr.eq(Cat(self.read_addr[lane], self.read_page)),
                         rp.en.eq(self.read_en),
                         self.read_data[lane].eq(rp.data)]
        return m
