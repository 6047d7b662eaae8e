"""The GEMV engine's x buffer: two pages of activation words, one block column a word (hdl.gemv).

Role: holds the vector a pass reads and the next one, loading into the page no pass reads;
one write port (``write``, ``XWriteSignature``: the sequencer's x beats) and one read port in two
steps (the RAM's latch, then its output register), which the engine shares between the blocks'
reads and the residual term unit's. Built as ``GemvConfig.x_ram`` says: a ``lib.memory`` and a
register, or ECP5 DP16KDs with their output register. Contract and latency: ``XBuffer``'s
docstring; ``XBuffer.model`` the word each read returns.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, ClockSignal, Const, Instance, Module, Signal, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from .arith import stage_reg
from .gemv_config import GemvConfig


class XWriteSignature(wiring.Signature):
    """An x word written into the buffer: ``en``, ``addr`` (the page the top bit), ``data`` (``g`` codes)."""

    def __init__(self, config: GemvConfig):
        super().__init__({"en": Out(1), "addr": Out(range(2 * config.max_blocks)),
                          "data": Out(unsigned(config.act_format.bits * config.group))})


def model(words, addr) -> np.ndarray:
    """The word each read returns: the last written at its address."""
    return np.asarray(words)[np.asarray(addr)]


class XBuffer(wiring.Component):
    """Two activation vectors: two pages of ``max_blocks`` words of ``g`` codes (``8 g`` bits for E4M3,
    ``16 g`` for BF16; the page the top
    address bit), written through ``write`` (lands at the clock edge), read in two steps: at an edge
    where ``read_en`` is high the word at ``read_addr`` is read into the RAM's latch; at an edge
    where ``out_en`` is high the latch goes into the output register, ``read_data`` (``latency`` 2
    when both are high). Each holds while its enable is low. As ``GemvConfig.x_ram`` says: a
    ``lib.memory`` read port and a register, or ECP5 DP16KDs with their output register (``CEB`` and
    ``OCEB``): a block RAM's output register is fast to its output, its plain read is not. Not
    transparent: a read and a write in one cycle that matter are at different pages (a vector loads
    into the page no pass reads).

    With a folded block dot unit (``dot_lanes`` P) a read returns one chunk of the word: ``P`` codes,
    chunk ``read_chunk`` (in, beside ``read_addr``, latched with the read). ``lib.memory``: picked
    before the output register, so that register and everything after it are ``P`` codes wide, not
    ``g``; DP16KDs: after their output registers."""

    latency = 2
    model = staticmethod(model)

    def __init__(self, config: GemvConfig):
        self.config = config
        self.chunks = config.group // config.macs_per_cycle       # 1 unless folded
        width = config.act_format.bits * config.macs_per_cycle
        self.depth = 2 * config.max_blocks
        chunk = {"read_chunk": In(range(self.chunks))} if self.chunks > 1 else {}
        super().__init__({"write": In(XWriteSignature(config)), "read_en": In(1), "out_en": In(1),
                          "read_addr": In(range(self.depth)), **chunk, "read_data": Out(unsigned(width))})

    def elaborate(self, platform):
        m = Module()
        if self.config.x_ram == "dp16kd":
            return self.dp16kd(m)
        # (folded, for the smallest FPGAs: yosys's no_rw_check, the contract above, as hdl.lut_bank's, so
        # that iCE40 synthesis builds no read-during-write bypass, a word of flip-flops; the unfolded
        # engines keep the Verilog their figures were measured with)
        attrs = {"no_rw_check": 1} if self.chunks > 1 else None
        m.submodules.mem = mem = memory.Memory(shape=unsigned(len(self.write.data)), depth=self.depth, init=[],
                                               attrs=attrs)
        wp, rp = mem.write_port(), mem.read_port()
        m.d.comb += [wp.en.eq(self.write.en), wp.addr.eq(self.write.addr), wp.data.eq(self.write.data),
                     rp.en.eq(self.read_en), rp.addr.eq(self.read_addr)]
        word = rp.data
        if self.chunks > 1:
            word = word.word_select(self.chunk_latch(m), len(self.read_data))
        out = stage_reg(m, self.out_en, "out", word, self.read_data.shape())
        m.d.comb += self.read_data.eq(out)
        return m

    def chunk_latch(self, m):
        """``read_chunk`` as the read latched it (folded only)."""
        return stage_reg(m, self.read_en, "chunk_latch", self.read_chunk, self.read_chunk.shape())

    def dp16kd(self, m):
        """Columns of DP16KDs, each 512 x 36 (write port A, read port B; as yosys maps a memory to a
        pseudo-dual-port block RAM), ``2 max_blocks / 512`` deep, with the output register
        (``REGMODE`` OUTREG on both ports: at 36 bits the read word leaves on both ports' outputs,
        and nextpnr times each port's outputs by its own mode)."""
        width, depth = len(self.write.data), self.depth
        rows = -(-depth // 512)
        cols = -(-width // 36)
        abits = max(1, (depth - 1).bit_length())
        wdata = Cat(self.write.data, Const(0, cols * 36 - width))
        outs = []
        for r in range(rows):
            sel_w = (self.write.addr >> 9) == r if rows > 1 else Const(1)
            col_out = []
            for c in range(cols):
                do = Signal(36, name=f"do_r{r}_c{c}")
                wa = Cat(Const(0xF, 4), Const(0, 1), self.write.addr[:min(9, abits)])
                ra = Cat(Const(0, 5), self.read_addr[:min(9, abits)])
                ports = {"i_CLKA": ClockSignal(), "i_CEA": self.write.en & sel_w, "i_OCEA": self.out_en, "i_WEA": Const(1),
                         "i_RSTA": Const(0), "i_CLKB": ClockSignal(), "i_CEB": self.read_en, "i_OCEB": self.out_en,
                         "i_WEB": Const(0), "i_RSTB": Const(0)}
                for i in range(3):
                    ports[f"i_CSA{i}"] = ports[f"i_CSB{i}"] = Const(0)
                for i in range(14):
                    ports[f"i_ADA{i}"] = wa[i] if i < len(wa) else Const(0)
                    ports[f"i_ADB{i}"] = ra[i] if i < len(ra) else Const(0)
                di = wdata[c * 36:(c + 1) * 36]
                for i in range(18):
                    ports[f"i_DIA{i}"], ports[f"i_DIB{i}"] = di[i], di[18 + i]
                    ports[f"o_DOA{i}"], ports[f"o_DOB{i}"] = do[i], do[18 + i]
                m.submodules[f"ram_r{r}_c{c}"] = Instance(
                    "DP16KD", p_DATA_WIDTH_A=36, p_DATA_WIDTH_B=36, p_REGMODE_A="OUTREG", p_REGMODE_B="OUTREG",
                    p_RESETMODE="SYNC", p_ASYNC_RESET_RELEASE="SYNC", p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
                    p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL", p_GSR="DISABLED", **ports)
                col_out.append(do)
            outs.append(Cat(*col_out)[:width])
        if rows == 1:
            word = outs[0]
        else:           # the row of the word in the output registers (its address, two reads ago)
            row_l = stage_reg(m, self.read_en, "row_latch", self.read_addr >> 9, range(rows))
            row_o = stage_reg(m, self.out_en, "row_out", row_l, range(rows))
            word = Array(outs)[row_o]
        if self.chunks > 1:    # the chunk picked after the block RAMs' output registers
            chunk = stage_reg(m, self.out_en, "chunk_out", self.chunk_latch(m), self.read_chunk.shape())
            word = word.word_select(chunk, len(self.read_data))
        m.d.comb += self.read_data.eq(word)
        return m

