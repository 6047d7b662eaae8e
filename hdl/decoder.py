"""Decoder top: a stream of packed blocks in, a stream of N decoded values per beat out.

Implements golden.decoder for one ``DecoderConfig`` (docs/hardware.md)::

    blocks ─▶ hold ─{page, bank, code}─▶ LUT RAM (per lane) ─▶ HIF formatter ─▶ output ─▶ values
               │  └ select ─▶ codebook mux ─┘                     ▲ (per lane)     buffer
               └ headers ─▶ scale decoder (+ offset[page]) ───────┘ block fields
    load ─▶ LUT word encoder ─▶ LUT RAM, offset (the inactive page)

Interfaces
* ``blocks``: stream of ``{blocks, swap}``; ``blocks`` is one block (``N <= g``)
  or ``N / g`` blocks (``N > g``) exactly as golden.layout packs them, LSB first.
  ``swap`` makes this beat, and all after it, use the other page of the tables
  and offset: the page the host has just loaded. The swap costs no cycle.
* ``load``: stream of table writes ``{bank, addr, data}`` (``data`` a HIF code;
  ``ready`` is tied high) into the inactive page; ``offset``/``offset_we`` write
  the inactive page's per-layer offset.
* ``values``: stream of ``N`` lanes (BF16 or the exact product fields).

Timing. Stage 0 (``hold``) takes a beat and issues it: a block of ``g > N``
codes over ``g / N`` cycles, each lane shifting its own codes out, while the
next beat is already accepted. Stage 1 reads each lane's table RAM and
registers the block fields (stages 1 and 2 where the tables are LUT RAM
memories, ``lutram_depth > 0``); the formatter's stages follow. ``latency`` is
the number of cycles from a beat's handshake to its first output beat
(4 exact, 8 BF16 for the sop4 layout; one more with ``lutram_depth > 0``). While both sides are ready, ``N`` values
leave every cycle with no bubble.

Stalls. One enable moves every pipeline register. It is a register, copied once
per lane and once for the control (hdl.replica): ``en`` for the next cycle is
decided from the output buffer's state (hdl.output_buffer), so ``values.ready``
reaches only that buffer, not every register of every lane; ``blocks.ready``
depends only on registers. Nothing is lost or duplicated under backpressure.

Tables. A table word written in cycle ``t`` is readable from cycle ``t + 2``
(hdl.lut_bank), and a beat accepted in cycle ``t`` reads its tables in cycle
``t + 1``: the beat with ``swap`` must come after the cycle of the page's last
write. The host must not write a page while beats that read it are in flight:
load the next layer only after the current layer's first (swap) beat has been
accepted. The per-layer offset is written at once.

Reset (synchronous) clears every valid bit, the block in hand and the page
pointer (page 0 active); the datapath registers have no reset. LUT RAM is not
cleared: after reset the host loads the tables (they go to page 1) and sends
the first beat with ``swap`` set.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from . import lut_word, replica as rep, scale_decoder
from .codebook_mux import CodebookMux
from .config import DecoderConfig
from .hif_formatter import HifFormatter
from .lut_bank import LutBank, read_latency
from .output_buffer import OutputBuffer
from .scale_decoder import ScaleDecoder


class Decoder(wiring.Component):
    def __init__(self, config: DecoderConfig, *, formatter=HifFormatter, mux=CodebookMux, bank=LutBank):
        # formatter / mux / bank: the component classes used, replaceable so that tests can
        # show that a broken one (wrong rounding, inverted selection, a flipped LUT bit) is caught.
        self.config = config
        self._formatter_cls, self._mux_cls, self._bank_cls = formatter, mux, bank
        self.latency = 1 + read_latency(config.lutram_depth) + formatter.stages(config)
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
        n_groups = rep.groups(N)
        per_group = N // n_groups

        # -- the pipeline enable, decided by the output buffers, copied to every lane ---------
        # One output buffer per OUT_GROUP lanes, all with the same state, each deciding the same
        # enable: values.ready is then the only net that reaches them all. The enable reaches the
        # lanes through one register level (up to REGION lanes) or two: a copy per region, taken
        # from one of its own buffers, then a copy per lane.
        levels, n_regions = rep.enable_levels(N), rep.groups(N, rep.REGION)
        per_region = N // n_regions
        n_outs = rep.groups(N, rep.OUT_GROUP)
        per_out = N // n_outs
        outs = [OutputBuffer(data.ArrayLayout(cfg.lane_layout, per_out), delay=levels) for _ in range(n_outs)]
        for j, ob in enumerate(outs):
            m.submodules[f"output_buffer{j}"] = ob
        if levels == 1:
            roots = [outs[0].en_next] * n_regions
        else:
            roots = [rep.replica(1, name=f"en_region{r}", init=1, reset_less=True) for r in range(n_regions)]
            m.d.sync += [root.eq(outs[r * per_region // per_out].en_next) for r, root in enumerate(roots)]
        region = lambda lane: roots[lane // per_region]     # noqa: E731
        # The copies have no reset: each follows the output buffers' (reset) state a fixed number
        # of cycles later, so they stay equal to one another through a reset, and the reset net
        # does not reach every lane.
        en = rep.replica(1, name="en_ctl", init=1, reset_less=True)
        en_lane = [rep.replica(1, name=f"en_lane{i}", init=1, reset_less=True) for i in range(N)]
        en_out = [rep.replica(1, name=f"en_out{j}", init=1, reset_less=True) for j in range(n_outs)]
        m.d.sync += [en.eq(roots[0])] + [e.eq(region(i)) for i, e in enumerate(en_lane)]
        # each buffer's own copy: from its own decision (one level) or its region's copy (two)
        upcoming = [ob.en_next if levels == 1 else region(j * per_out) for j, ob in enumerate(outs)]
        m.d.sync += [e.eq(u) for e, u in zip(en_out, upcoming)]
        m.d.comb += [self.values.valid.eq(outs[0].values.valid),
                     self.values.payload.eq(Cat(ob.values.payload for ob in outs))]
        for ob, e, u in zip(outs, en_out, upcoming):
            m.d.comb += [ob.en.eq(e), ob.en_upcoming.eq(u), ob.values.ready.eq(self.values.ready)]

        # -- tables: the write port, the double-buffered page pointer, per-layer offsets -------
        active = Signal()
        # per page: the layer offset plus the block exponent's constant part (hdl.scale_decoder),
        # one copy per lane group, beside the group's block-field registers
        layer_terms = [Array([rep.replica(scale_decoder.layer_term_shape(cfg), name=f"layer_term{p}_g{grp}",
                                          reset_less=True) for p in range(2)]) for grp in range(n_groups)]
        with m.If(self.offset_we):
            m.d.sync += [t[~active].eq(self.offset + scale_decoder.exp_constant(cfg)) for t in layer_terms]
        m.submodules.encoder = enc = lut_word.LutWordEncoder(cfg)
        m.submodules.bank = bank = self._bank_cls(code_bits=k, banks=lay.banks, word=lut_word.word(cfg), lanes=N,
                                             lutram_depth=cfg.lutram_depth)
        m.d.comb += [self.load.ready.eq(1), enc.hif.eq(self.load.payload.data),
                     bank.write.valid.eq(self.load.valid), bank.write_page.eq(~active),
                     bank.write.payload.bank.eq(self.load.payload.bank),
                     bank.write.payload.addr.eq(self.load.payload.addr),
                     bank.write.payload.data.eq(enc.word)]

        # -- stage 0: the beat in hand; each lane holds its own codes and page/bank bits -------
        hold_valid = Signal()
        decoders = [ScaleDecoder(cfg) for _ in range(B)]        # the beat's headers, decoded as it arrives
        # per lane group: its block's decoded header and the beat's page
        held = [rep.replica(scale_decoder.fields(cfg), name=f"fields_g{grp}", reset_less=True)
                for grp in range(n_groups)]
        held_page = [rep.replica(1, name=f"page_g{grp}", reset_less=True) for grp in range(n_groups)]
        block_of_group = [(grp * per_group) // g if B > 1 else 0 for grp in range(n_groups)]
        for b, (sd, h) in enumerate(zip(decoders, self._beat_headers(self.blocks.payload.blocks))):
            m.submodules[f"scale_{b}"] = sd
            m.d.comb += sd.header.eq(h)
        # ``take``: the beat in hand issues its last codes this cycle (or there is none), so a new
        # beat may be taken. A register, one copy per lane group and one for the control, decided a
        # cycle ahead, so that it does not fan out from the chunk counter's logic.
        chunk = Signal(range(C)) if C > 1 else None        # which N codes of the block issue now
        if C > 1:
            take, take_g = rep.replica(1, name="take_ctl", init=1), [rep.replica(1, name=f"take_g{grp}", init=1)
                                                                     for grp in range(n_groups)]
            take_next = Mux(take, ~self.blocks.valid, chunk == C - 2)
            for t in [take] + take_g:
                with m.If(en):
                    m.d.sync += t.eq(take_next)
        else:
            take, take_g = 1, [1] * n_groups
        m.d.comb += self.blocks.ready.eq(en & take)
        # the page of a beat taken now (where ready is high, a valid beat is an accepted one)
        page = active ^ (self.blocks.valid & self.blocks.payload.swap)
        with m.If(en):
            with m.If(take):
                m.d.sync += [hold_valid.eq(self.blocks.valid), active.eq(page)]
                if C > 1:
                    m.d.sync += chunk.eq(0)
            if C > 1:
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)

        for grp, b in enumerate(block_of_group):          # each group's copy moves on its own enable copy
            with m.If(en_lane[grp * per_group] & take_g[grp]):
                m.d.sync += [held[grp].eq(decoders[b].fields), held_page[grp].eq(page)]

        beat = self.blocks.payload.blocks
        if lay.banks == 2:
            m.submodules.mux = mux = self._mux_cls(lanes=N, group=g)
            for b, sd in enumerate(decoders):
                m.d.comb += mux.select[b].eq(sd.select)
        for i in range(N):
            # lane i issues codes i, i + N, ... of its block, one per cycle (a shift register)
            codes = rep.replica(unsigned(C * k), name=f"codes{i}", reset_less=True)
            lane_page = rep.replica(1, name=f"page{i}", reset_less=True)
            lane_bank = rep.replica(1, name=f"bank{i}", reset_less=True)
            block_base = (i // g) * lay.block_bits + H if B > 1 else H
            first = i % g if B > 1 else i
            with m.If(en_lane[i]):
                with m.If(take_g[i // per_group]):
                    m.d.sync += [codes.eq(Cat(beat[block_base + (first + c * N) * k:][:k] for c in range(C))),
                                 lane_page.eq(page)]
                    if lay.banks == 2:
                        m.d.sync += lane_bank.eq(mux.bank[i])
                if C > 1:
                    with m.Else():
                        m.d.sync += codes.eq(codes >> k)
            m.d.comb += [bank.read_en[i].eq(en_lane[i]), bank.read_page[i].eq(lane_page),
                         bank.read_bank[i].eq(lane_bank), bank.read_addr[i].eq(codes[:k])]

        # -- stage 1 (and 2 with a two-cycle table read): table read (in the bank); the block
        #    fields plus the layer's offset, registered per lane group ------------------------
        valid = hold_valid
        for r in range(read_latency(cfg.lutram_depth)):
            nxt = Signal(name=f"valid_r{r + 1}")
            with m.If(en):
                m.d.sync += nxt.eq(valid)
            valid = nxt
        # The scale significand goes into every partial product of a lane's multiplier: it gets
        # a register per lane; the rest of the block fields one per lane group.
        sig_name = "sig" if cfg.output == "exact" else "frac"
        block_regs = []
        for grp in range(n_groups):
            r = rep.replica(scale_decoder.block(cfg), name=f"block_g{grp}", reset_less=True)
            en_g = en_lane[grp * per_group]
            with m.If(en_g):
                term = layer_terms[grp][held_page[grp]]
                m.d.sync += [getattr(r, name).eq(value)
                             for name, value in scale_decoder.with_layer_term(cfg, held[grp], term).items()]
            sig_src = getattr(held[grp], sig_name)
            for d in range(read_latency(cfg.lutram_depth) - 1):     # keep pace with the table read
                r_next = rep.replica(scale_decoder.block(cfg), name=f"block{d + 2}_g{grp}", reset_less=True)
                with m.If(en_g):
                    m.d.sync += r_next.eq(r)
                r, sig_src = r_next, getattr(r, sig_name)
            for i in range(grp * per_group, (grp + 1) * per_group):
                lane_sig = rep.replica(len(sig_src), name=f"scale_{sig_name}{i}", reset_less=True)
                with m.If(en_lane[i]):
                    m.d.sync += lane_sig.eq(sig_src)
                lane_block = Signal(scale_decoder.block(cfg), name=f"block_lane{i}")
                m.d.comb += [getattr(lane_block, f).eq(getattr(r, f) if f != sig_name else lane_sig)
                             for f in lane_block.shape().members]
                block_regs.append(lane_block)

        # -- stages 2..: one formatter per lane ------------------------------------------------
        for i in range(N):
            fmt = self._formatter_cls(cfg)
            m.submodules[f"lane_{i}"] = fmt
            m.d.comb += [fmt.en.eq(en_lane[i]), fmt.word.eq(bank.read_data[i]),
                         fmt.block.eq(block_regs[i]),
                         outs[i // per_out].last[i % per_out].eq(fmt.out)]
        for stage in range(self._formatter_cls.stages(cfg) - 1):
            nxt = Signal(name=f"valid_f{stage + 2}")
            with m.If(en):
                m.d.sync += nxt.eq(valid)
            valid = nxt
        m.d.comb += [ob.entering_valid.eq(valid) for ob in outs]
        return m

    def _beat_headers(self, beat):
        lay = self.config.layout
        return [beat[b * lay.block_bits:][:lay.header_bits] for b in range(self.config.blocks_per_beat)]
