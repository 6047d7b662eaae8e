"""Decoder top: a stream of packed blocks in, a stream of N decoded values per beat out.

Implements golden.decoder for one ``DecoderConfig`` (docs/hardware.md)::

    blocks ──▶ [hold] ──▶ LUT read (bank A, bank B) ──▶ codebook mux ─▶ HIF formatter ──▶ values
                 │           ▲ {page, code}                 ▲ select       ▲ scale, sign
                 └─ header ──┴────────────▶ scale decoder ──┴──────────────┘ (+ offset[page])
    load ──▶ LUT bank A/B, offset (the inactive page)

Interfaces
* ``blocks``: stream of ``{blocks, swap}``; ``blocks`` is one block (``N <= g``)
  or ``N / g`` blocks (``N > g``) exactly as golden.layout packs them, LSB first.
  ``swap`` makes this beat, and all after it, use the other page of the tables
  and offset: the page the host has just loaded. The swap costs no cycle.
* ``load``: stream of LUT writes (``ready`` is tied high) ``{bank, addr, data}`` into the
  inactive page; ``offset``/``offset_we`` write the inactive page's per-layer offset.
* ``values``: stream of ``N`` lanes (BF16 or the exact product fields).

Timing. One global enable, ``advance = ~values.valid | values.ready``, moves
every pipeline register, so a stalled output freezes the pipeline and nothing
is lost or duplicated; while both sides are ready, ``N`` values leave every
cycle with no bubble (a block of ``g > N`` codes is issued over ``g / N``
cycles while the next one is already accepted). ``latency`` is the number of
cycles from a beat's handshake to its first output beat (4 exact, 10 BF16).

Reset (synchronous) clears every valid bit, the block in hand and the page
pointer (page 0 active). LUT RAM is not cleared: after reset the host loads the
tables (they go to page 1) and sends the first beat with ``swap`` set.
The host must not write a page while beats that read it are in flight: load the
next layer only after the current layer's first (swap) beat has been accepted.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .codebook_mux import CodebookMux
from .config import DecoderConfig
from .hif_formatter import HifFormatter
from .lut_bank import LutBank
from .scale_decoder import ScaleDecoder


class Decoder(wiring.Component):
    def __init__(self, config: DecoderConfig, *, formatter=HifFormatter, mux=CodebookMux, bank=LutBank):
        # formatter / mux / bank: the component classes used, replaceable so that tests can
        # show that a broken one (wrong rounding, inverted selection, a flipped LUT bit) is caught.
        self.config = config
        self._formatter_cls, self._mux_cls, self._bank_cls = formatter, mux, bank
        self.latency = 2 + formatter.stages(config)
        super().__init__({
            "blocks": In(stream.Signature(config.beat_layout)),
            "load": In(stream.Signature(config.load_layout)),
            "offset": In(signed(8)),
            "offset_we": In(1),
            "values": Out(stream.Signature(data.ArrayLayout(config.lane_layout, config.lanes))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, lay = self.config, self.config.layout
        N, g, k, H = cfg.lanes, lay.group, lay.code_bits, lay.header_bits
        B = cfg.blocks_per_beat                 # blocks per beat
        C = cfg.beats_per_block                 # cycles spent per block (chunks)

        m.d.comb += self.load.ready.eq(1)         # LUT writes are always accepted

        advance = Signal()
        out_valid = Signal()
        m.d.comb += [advance.eq(~out_valid | self.values.ready), self.values.valid.eq(out_valid)]

        # -- double-buffered page pointer and per-layer offsets --------------------------
        active = Signal()
        offsets = Array([Signal(signed(8), name=f"offset_page{p}") for p in range(2)])
        with m.If(self.offset_we):
            m.d.sync += offsets[~active].eq(self.offset)

        # -- stage 0: the beat in hand, issued chunk by chunk ---------------------------------
        hold = Signal(unsigned(cfg.beat_bits))
        hold_valid = Signal()
        hold_page = Signal()
        chunk = Signal(range(C)) if C > 1 else None        # which N codes of the block issue now
        last_chunk = chunk == C - 1 if C > 1 else 1
        m.d.comb += self.blocks.ready.eq(advance & (~hold_valid | last_chunk))
        with m.If(advance):
            with m.If(self.blocks.ready):
                m.d.sync += [hold.eq(self.blocks.payload.blocks), hold_valid.eq(self.blocks.valid)]
                if C > 1:
                    m.d.sync += chunk.eq(0)
                with m.If(self.blocks.valid):
                    page = active ^ self.blocks.payload.swap
                    m.d.sync += [hold_page.eq(page), active.eq(page)]
            if C > 1:
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)

        # Headers of the beat's blocks and the codes of the chunk being issued.
        block_bits = lay.block_bits
        headers = [hold[b * block_bits:b * block_bits + H] for b in range(B)]
        if C == 1:
            codes = [hold[(i // g) * block_bits + H + (i % g) * k:][:k] for i in range(N)]
        else:
            chunk_words = Array([hold[H + c * N * k:H + (c + 1) * N * k] for c in range(C)])
            word = chunk_words[chunk]
            codes = [word[i * k:(i + 1) * k] for i in range(N)]

        # -- stage 1: LUT read; header and offset registered beside it -------------------------
        banks = []
        for b in range(lay.banks):
            bank = self._bank_cls(code_bits=k, width=cfg.hif.bits, lanes=N)
            m.submodules[f"bank_{'ab'[b]}"] = bank
            m.d.comb += [
                bank.write.payload.addr.eq(self.load.payload.addr),
                bank.write.payload.data.eq(self.load.payload.data),
                bank.write.valid.eq(self.load.valid & (self.load.payload.bank == b)),
                bank.write_page.eq(~active),
                bank.read_en.eq(advance),
                bank.read_page.eq(hold_page),
            ]
            m.d.comb += [bank.read_addr[i].eq(codes[i]) for i in range(N)]
            banks.append(bank)

        s1_valid = Signal()
        s1_headers = [Signal(unsigned(H), name=f"s1_header{b}") for b in range(B)]
        s1_offset = Signal(signed(8))
        with m.If(advance):
            m.d.sync += [s1_valid.eq(hold_valid), s1_offset.eq(offsets[hold_page])]
            m.d.sync += [s1_headers[b].eq(headers[b]) for b in range(B)]

        scales = []
        for b in range(B):
            sd = ScaleDecoder(lay)
            m.submodules[f"scale_{b}"] = sd
            m.d.comb += [sd.header.eq(s1_headers[b]), sd.offset.eq(s1_offset)]
            scales.append(sd)

        if lay.banks == 2:
            m.submodules.mux = mux = self._mux_cls(width=cfg.hif.bits, lanes=N, group=g)
            m.d.comb += [mux.a.eq(banks[0].read_data), mux.b.eq(banks[1].read_data)]
            m.d.comb += [mux.select[b].eq(scales[b].select) for b in range(B)]
            entries = mux.out
        else:
            entries = banks[0].read_data

        # -- stages 2..: one formatter per lane ------------------------------------------------
        valid = s1_valid
        fmt_latency = 0
        for i in range(N):
            sd = scales[i // g if B > 1 else 0]
            fmt = self._formatter_cls(cfg)
            m.submodules[f"lane_{i}"] = fmt
            m.d.comb += [fmt.en.eq(advance), fmt.hif.eq(entries[i]), fmt.block_sign.eq(sd.sign),
                         fmt.scale_sig.eq(sd.sig), fmt.scale_exp.eq(sd.exp),
                         self.values.payload[i].eq(fmt.out)]
            fmt_latency = fmt.latency
        for stage in range(fmt_latency):
            nxt = Signal(name=f"valid_s{stage + 2}")
            with m.If(advance):
                m.d.sync += nxt.eq(valid)
            valid = nxt
        m.d.comb += out_valid.eq(valid)
        return m
