"""Lanes: the table write path, each lane's table read and its HIF formatter.

The host's table writes (``load``: ``{bank, addr, data}``, ``data`` a HIF code,
``ready`` tied high) go through one LUT word encoder (hdl.lut_word) into the
LUT bank (hdl.lut_bank) at page ``issue.write_page``; a word written in cycle
``t`` is readable from cycle ``t + 2``. Each lane ``i`` reads its own table copy
at ``issue.read[i]`` (``{addr, bank, page}``, from stage 0, hdl.beat_issue) and
its formatter (hdl.hif_formatter) multiplies the word by ``block[i]`` (the
block's scale fields, hdl.block_fields, which arrive with the word) into the
output format: ``out[i]``.

Ports
* ``load`` (in stream, ``config.load_layout``);
* ``enable`` (in, hdl.pipeline.EnableSignature): lane ``i``'s read and
  formatter registers move on ``lane[i]``;
* ``issue`` (in, hdl.beat_issue.LaneIssueSignature): per lane ``read``; ``write_page``;
* ``block`` (in): per lane its ``scale_decoder.block(config)`` values, ``read_latency``
  enabled edges after its read (as hdl.block_fields delivers them);
* ``out`` (out): per lane its output word (``config.lane_layout``).

A wide decoder (``config.wide``, hdl.config) registers the write once per region
of ``replica.REGION`` lanes first (``{valid, page, bank, addr, hif}``, the page
``issue.write_page[r]``, the region's copy) and encodes it there, one encoder
per region, into the bank's write port (hdl.lut_bank ``write_regions``): the
``load`` input reaches registers only, and a word written in cycle ``t`` is
readable from cycle ``t + 3`` (``write_latency``); the beat issue's input stage
delays the reads by as much.

With ``config.shallow`` the bank's memories carry yosys's ``no_rw_check``
(hdl.lut_bank: the no-collision contract, no read-during-write logic).

Latency: ``latency`` = the bank's ``read_latency`` + the formatter's ``latency``
enabled edges from a read to its output word; both are properties of the
instances built. ``model`` composes the encoder's and the formatter's models.

Sparse residuals (``config.residuals > 0``): ``plus0`` (in, per lane, with
``block``) goes to each formatter; ``word`` (out, per lane) is the table word
each formatter takes this cycle, for the residual adders (hdl.residual_adder, through
hdl.residual's mux).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from . import hif_formatter, lut_word, replica as rep, scale_decoder
from .beat_issue import LaneIssueSignature
from .config import DecoderConfig
from .hif_formatter import HifFormatter
from .lut_bank import LutBank
from .pipeline import EnableSignature


def model(config: DecoderConfig, tables, page, bank, addr, block: dict) -> np.ndarray:
    """Output words of reads ``(page, bank, addr)`` (arrays) of ``tables[page, bank, addr]``
    (HIF codes) with the blocks' fields ``block`` (``scale_decoder.block(config)`` arrays)."""
    codes = np.asarray(tables, dtype=np.int64)[np.asarray(page), np.asarray(bank), np.asarray(addr)]
    return hif_formatter.model(config, lut_word.encode(config, codes), block)


class Lanes(wiring.Component):
    model = staticmethod(model)

    def __init__(self, config: DecoderConfig, *, formatter=HifFormatter, bank=LutBank):
        # formatter / bank: the component classes used (tests replace them with broken ones)
        self.config = config
        lay = config.layout
        # one encoder, or one per region (config.wide)
        self.encoders = [lut_word.LutWordEncoder(config) for _ in range(config.regions)]
        self.encoder = self.encoders[0]
        # the shallow pipeline's bank states its no-collision contract to synthesis (hdl.lut_bank)
        self.bank = bank(code_bits=lay.code_bits, banks=lay.banks, word=lut_word.word(config), lanes=config.lanes,
                         lutram_depth=config.lutram_depth, no_rw_check=config.shallow,
                         **({"regions": config.regions} if config.wide else {}))
        self.formatters = [formatter(config) for _ in range(config.lanes)]
        super().__init__({
            "load": In(stream.Signature(config.load_layout)),
            "enable": In(EnableSignature(config.lanes)),
            "issue": In(LaneIssueSignature(config)),
            "block": In(data.ArrayLayout(scale_decoder.block(config), config.lanes)),
            "out": Out(data.ArrayLayout(config.lane_layout, config.lanes)),
            **({"plus0": In(data.ArrayLayout(1, config.lanes)),
                "word": Out(data.ArrayLayout(lut_word.word(config), config.lanes))} if config.residuals else {}),
        })

    @property
    def read_latency(self) -> int:
        return self.bank.read_latency

    @property
    def write_latency(self) -> int:
        """A word written (``load``) in cycle ``t`` is readable from cycle ``t + write_latency``."""
        return 3 if self.config.wide else 2

    @property
    def latency(self) -> int:
        """The table read's stages plus the formatter's."""
        return self.bank.read_latency + self.formatters[0].latency

    def elaborate(self, platform):
        m = Module()
        if not self.config.wide:
            m.submodules.encoder = enc = self.encoder
        m.submodules.bank = bank = self.bank
        w = self.load.payload
        if not self.config.wide:
            m.d.comb += [self.load.ready.eq(1), enc.hif.eq(w.data),
                         bank.write.valid.eq(self.load.valid), bank.write_page.eq(self.issue.write_page),
                         bank.write.payload.bank.eq(w.bank), bank.write.payload.addr.eq(w.addr),
                         bank.write.payload.data.eq(enc.word)]
        else:
            m.d.comb += self.load.ready.eq(1)
        for r, enc in enumerate(self.encoders if self.config.wide else []):
            # the write, registered per region (no reset: a write taken before a reset still lands)
            reg = rep.replica(data.StructLayout({"en": 1, "page": 1, "bank": 1, "addr": len(w.addr),
                                                 "hif": len(w.data)}), name=f"load_r{r}", reset_less=True)
            m.d.sync += [reg.en.eq(self.load.valid), reg.page.eq(self.issue.write_page[r]), reg.bank.eq(w.bank),
                         reg.addr.eq(w.addr), reg.hif.eq(w.data)]
            m.submodules[f"encoder_r{r}"] = enc
            wr = bank.write_regions[r]
            m.d.comb += [enc.hif.eq(reg.hif), wr.en.eq(reg.en), wr.page.eq(reg.page), wr.bank.eq(reg.bank),
                         wr.addr.eq(reg.addr), wr.data.eq(enc.word)]
        for i, fmt in enumerate(self.formatters):
            m.submodules[f"lane_{i}"] = fmt
            read, en = self.issue.read[i], self.enable.lane[i]
            m.d.comb += [bank.read_en[i].eq(en), bank.read_page[i].eq(read.page),
                         bank.read_bank[i].eq(read.bank), bank.read_addr[i].eq(read.addr),
                         fmt.en.eq(en), fmt.word.eq(bank.read_data[i]), fmt.block.eq(self.block[i]),
                         self.out[i].eq(fmt.out)]
            if self.config.residuals:
                m.d.comb += [fmt.plus0.eq(self.plus0[i]), self.word[i].eq(bank.read_data[i])]
        return m
