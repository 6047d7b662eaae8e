"""Beat issue: pipeline stage 0, the beat in hand, issued to the lanes over ``g / N`` cycles.

Takes one beat of the ``blocks`` stream (``DecoderConfig.beat_layout``: one block
when ``N <= g``, ``N / g`` blocks when ``N > g``, as golden.layout packs them) and
holds it as stage 0 of the decoder's pipeline:

* per lane ``i`` its table read (``lanes.read[i]``): the code it issues now, the
  block's bank (the selection bit, through the codebook mux, hdl.codebook_mux)
  and the beat's page. With ``N < g`` lane ``i`` issues codes ``i, i + N, ...``
  of the block, one per cycle (each lane's own shift register), so a block takes
  ``C = g / N`` cycles; with ``N >= g`` lane ``i`` issues code ``i mod g`` of block
  ``i // g`` in one cycle;
* per group of ``replica.LANES_PER_COPY`` lanes (``groups.fields[j]``) its block's header,
  decoded as the beat arrives (hdl.scale_decoder, ``fields(config)``), and the
  beat's page;
* ``valid``: stage 0 holds a beat.

Handshake. ``blocks.ready = en & take``: ``take`` (the beat in hand issues its
last codes this cycle, or there is none) is a register decided a cycle ahead,
one copy per lane group and one for the control, so ``blocks.ready`` depends on
registers only; the next beat is taken on the last cycle of the one in hand (no
bubble). Everything moves on the pipeline enable (``enable``, hdl.pipeline);
the lane and group registers each on their own copy.

Pages. ``swap`` on a beat makes it, and every beat after it, use the other page
of the tables and the offset: the page of a beat taken now is
``active ^ (valid & swap)`` (no ``ready`` in its logic). ``write_page`` (in both
output interfaces) is the other page, where the host's table and offset writes go.

Reset clears ``valid``, ``take``, the chunk counter and the page pointer
(``active = 0``); the lane and group registers have none.

Latency: 1 (``latency``): a beat whose handshake is at edge ``t`` issues its
first codes in the cycle after it.

Wide decoders (``config.wide``, hdl.config: more than ``replica.REGION``
lanes): an input stage in front of stage 0, one register per region of
``REGION`` lanes (``_wide``), so that no input bit reaches logic before a
register; ``write_page`` (to the lanes) is one bit per region and
``region_valid`` (out) is stage 0's valid bit per region. Latency 2; the
handshake (``blocks.ready = en & take``) is the same. ``model`` is the cycle model (golden.layout
unpacks the beats, ``scale_decoder.model`` decodes the headers).

Sparse residuals (``config.residuals > 0``): a ``merge`` interface
(hdl.sparse_merge.MergeIssueSignature) tells the merge what stage 0 does and takes
back ``hold_next``; ``hold`` (registers: one for the control, one per lane group,
all loaded with ``hold_next`` every cycle) makes stage 0 present its chunk again
next cycle: while ``hold`` is high nothing in stage 0 moves, no beat is taken
(``blocks.ready`` low) and ``valid`` is low (the pass is a bubble of
the valid chain; the lanes compute it all the same, for the residual adders).
Without residuals none of this is built.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden.layout import unpack_blocks

from . import replica as rep, scale_decoder
from .codebook_mux import CodebookMux
from .config import DecoderConfig
from .pipeline import EnableSignature
from .scale_decoder import ScaleDecoder


def read_layout(config: DecoderConfig) -> data.StructLayout:
    """One lane's table read: code (the entry address), bank, page."""
    return data.StructLayout({"addr": unsigned(config.layout.code_bits), "bank": unsigned(1), "page": unsigned(1)})


def group_layout(config: DecoderConfig) -> data.StructLayout:
    """One lane group's block: its decoded header and the beat's page."""
    return data.StructLayout({"fields": scale_decoder.fields(config), "page": unsigned(1)})


class LaneIssueSignature(wiring.Signature):
    """Stage 0 to the lanes (hdl.lanes): per lane its read; the page the host writes."""

    def __init__(self, config: DecoderConfig):
        # write_page: one copy per region (``config.regions``: 1 unless ``config.wide``)
        super().__init__({"read": Out(data.ArrayLayout(read_layout(config), config.lanes)),
                          "write_page": Out(config.regions)})


class GroupIssueSignature(wiring.Signature):
    """Stage 0 to the block fields (hdl.block_fields): per lane group its block; the page the host writes."""

    def __init__(self, config: DecoderConfig):
        super().__init__({"fields": Out(data.ArrayLayout(group_layout(config), rep.groups(config.lanes))),
                          "write_page": Out(config.regions)})


def model(config: DecoderConfig, beats, swap, valid, en) -> dict[str, np.ndarray]:
    """Cycle model: the outputs in every cycle ``t`` from the inputs of that cycle.

    Inputs per cycle: the offered beat ``beats[t]`` (an integer, as the payload's ``blocks``
    field), its ``swap[t]``, ``blocks.valid`` ``valid[t]`` and the enable ``en[t]``. Returns per
    cycle ``ready``, ``valid``, ``write_page``, per lane ``addr``, ``bank``, ``page`` (T, N) and per
    lane group the ``scale_decoder.model`` fields of its block and ``group_page`` (T, groups); lane
    and group values are 0 where ``valid`` is 0.

    The contract, without the hardware's ``take`` register: a beat is taken on an enabled
    cycle when stage 0 is empty or issues its block's last codes; a taken beat with ``swap``
    flips the active page; it then issues chunk ``c = 0 .. C - 1`` on successive enabled cycles.
    ``write_page`` is the other page than the newest taken beat's. A wide decoder (``config.wide``)
    holds a beat taken in cycle ``t`` in its input register in cycle ``t + 1``, and stage 0 takes it
    at that edge: ``ready[t]`` is ``en[t + 1]`` and the take of cycle ``t + 1`` (0 in the last cycle)."""
    cfg, lay = config, config.layout
    N, g, B, C = cfg.lanes, lay.group, cfg.blocks_per_beat, cfg.beats_per_block
    n_groups = rep.groups(N)
    per_group = N // n_groups
    T = len(valid)
    z = lambda *shape: np.zeros(shape, dtype=np.int64)        # noqa: E731
    out = {"ready": z(T), "valid": z(T), "write_page": z(T), "addr": z(T, N), "bank": z(T, N),
           "page": z(T, N), "group_page": z(T, n_groups)}
    fields = {name: z(T, n_groups) for name in scale_decoder.fields(cfg).members}
    lane_block = np.array([i // g if B > 1 else 0 for i in range(N)])
    group_block = lane_block[np.arange(n_groups) * per_group]
    cur, chunk, active, pre = None, 0, 0, None     # pre: the beat in the input register (``config.wide``)
    for t in range(T):
        take = cur is None or chunk == C - 1
        out["ready"][t], out["write_page"][t] = int(bool(en[t]) and take), 1 - active
        if cur is not None:
            headers, codes, page = cur
            _, _, select = lay.split_header(headers)
            index = [i % g if B > 1 else i + chunk * N for i in range(N)]
            out["valid"][t] = 1
            out["addr"][t] = codes[lane_block, index]
            out["bank"][t] = select[lane_block]
            out["page"][t] = page
            out["group_page"][t] = page
            for name, v in scale_decoder.model(cfg, headers[group_block]).items():
                if name in fields:
                    fields[name][t] = v
        if not cfg.wide:
            if en[t]:
                if take:
                    cur, chunk = None, 0
                    if valid[t]:
                        active ^= int(swap[t])
                        headers, codes = unpack_blocks(lay, int(beats[t]).to_bytes(cfg.beat_bits // 8, "little"))
                        cur = (headers, codes, active)
                else:
                    chunk += 1
            continue
        # wide: stage 0 takes the input register's beat; the ready of this cycle is for the next
        # edge (the enable and the take of the next cycle), so a beat taken now enters stage 0 then
        assert pre is None or (en[t] and take), "the input register's beat must enter stage 0"
        if en[t]:
            if take:
                cur, chunk = pre, 0
            else:
                chunk += 1
        take_next = cur is None or chunk == C - 1
        out["ready"][t] = int(t + 1 < T and bool(en[t + 1]) and take_next)
        pre = None
        if valid[t] and out["ready"][t]:
            active ^= int(swap[t])
            headers, codes = unpack_blocks(lay, int(beats[t]).to_bytes(cfg.beat_bits // 8, "little"))
            pre = (headers, codes, active)
    out.update({f"fields.{name}": v for name, v in fields.items()})
    return out


class BeatIssue(wiring.Component):
    model = staticmethod(model)

    def __init__(self, config: DecoderConfig, *, mux=CodebookMux):
        # mux: the codebook mux class (tests replace it with a broken one)
        self.config, self._mux_cls = config, mux
        members = {
            "blocks": In(stream.Signature(config.beat_layout)),
            "enable": In(EnableSignature(config.lanes)),
            "valid": Out(1),
            "lanes": Out(LaneIssueSignature(config)),
            "groups": Out(GroupIssueSignature(config)),
        }
        if config.residuals:
            from .sparse_merge import MergeIssueSignature
            members["merge"] = Out(MergeIssueSignature())
        if config.wide:
            members["region_valid"] = Out(config.regions)
            members["enable_upcoming"] = In(1)
        super().__init__(members)

    @property
    def latency(self) -> int:
        """Stage 0 is one register stage: the hold registers; a wide decoder's input stage one more."""
        return 2 if self.config.wide else 1

    def elaborate(self, platform):
        if self.config.wide:
            return self._wide()
        m = Module()
        cfg, lay = self.config, self.config.layout
        N, g, k, H = cfg.lanes, lay.group, lay.code_bits, lay.header_bits
        B, C = cfg.blocks_per_beat, cfg.beats_per_block
        n_groups = rep.groups(N)
        per_group = N // n_groups
        en, en_lane = self.enable.en, self.enable.lane
        beat = self.blocks.payload.blocks

        active = Signal()                                  # the page the beat in hand reads
        hold_valid = Signal()
        decoders = [ScaleDecoder(cfg) for _ in range(B)]   # the beat's headers, decoded as it arrives
        for b, sd in enumerate(decoders):
            m.submodules[f"scale_{b}"] = sd
            m.d.comb += sd.header.eq(beat[b * lay.block_bits:][:H])

        # ``take``: the beat in hand issues its last codes this cycle (or there is none), so a new
        # beat may be taken. A register, one copy per lane group and one for the control, decided a
        # cycle ahead, so that it does not fan out from the chunk counter's logic.
        # ``hold`` (sparse residuals only): stage 0 keeps its chunk this cycle, one copy for the
        # control and one per lane group, all loaded with the merge's ``hold_next``
        if cfg.residuals:
            hold = rep.replica(1, name="hold_ctl")
            hold_g = [rep.replica(1, name=f"hold_g{grp}") for grp in range(n_groups)]
            m.d.sync += [h.eq(self.merge.hold_next) for h in [hold] + hold_g]
            en_ctl = en & ~hold
        else:
            hold, hold_g, en_ctl = 0, [0] * n_groups, en
        if C > 1:
            chunk = Signal(range(C))                       # which N codes of the block issue now
            take = rep.replica(1, name="take_ctl", init=1)
            take_g = [rep.replica(1, name=f"take_g{grp}", init=1) for grp in range(n_groups)]
            take_next = Mux(take, ~self.blocks.valid, chunk == C - 2)
            with m.If(en_ctl):
                m.d.sync += [t.eq(take_next) for t in [take] + take_g]
        else:
            take, take_g = 1, [1] * n_groups
        m.d.comb += self.blocks.ready.eq(en_ctl & take)
        # the page of a beat taken now (where ready is high, a valid beat is an accepted one)
        page = active ^ (self.blocks.valid & self.blocks.payload.swap)
        with m.If(en_ctl):
            with m.If(take):
                m.d.sync += [hold_valid.eq(self.blocks.valid), active.eq(page)]
                if C > 1:
                    m.d.sync += chunk.eq(0)
            if C > 1:
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)
        m.d.comb += [self.valid.eq(hold_valid & ~hold if cfg.residuals else hold_valid),
                     self.lanes.write_page.eq(~active), self.groups.write_page.eq(~active)]
        if cfg.residuals:
            mg = self.merge
            m.d.comb += [mg.present.eq(hold_valid), mg.taken.eq(self.blocks.valid & self.blocks.ready),
                         mg.present_next.eq(Mux(en_ctl & take, self.blocks.valid, hold_valid)),
                         mg.swap.eq(self.blocks.payload.swap), mg.page.eq(page), mg.write_page.eq(~active)]

        # per lane group: its block's decoded header and the beat's page, each group's copy
        # on its own enable copy
        for grp in range(n_groups):
            self._group_fields(m, grp, en_lane[grp * per_group] & take_g[grp] & ~hold_g[grp] if cfg.residuals
                               else en_lane[grp * per_group] & take_g[grp],
                               decoders[(grp * per_group) // g if B > 1 else 0].fields, page)

        if lay.banks == 2:
            m.submodules.mux = mux = self._mux_cls(lanes=N, group=g)
            m.d.comb += [mux.select[b].eq(sd.select) for b, sd in enumerate(decoders)]
        for i in range(N):
            block_base = (i // g) * lay.block_bits + H if B > 1 else H
            first = i % g if B > 1 else i
            self._lane_codes(m, i, en_lane[i] & ~hold_g[i // per_group] if cfg.residuals else en_lane[i],
                             take_g[i // per_group], Cat(beat[block_base + (first + c * N) * k:][:k] for c in range(C)),
                             page, mux.bank[i] if lay.banks == 2 else None)
        return m

    def _group_fields(self, m, grp: int, load, fields, page) -> None:
        """Group ``grp``'s copy of its block's decoded header ``fields`` and of the beat's ``page``,
        loaded where ``load`` is high (the group's enable copy and ``take``), on ``groups.fields[grp]``."""
        held = rep.replica(scale_decoder.fields(self.config), name=f"fields_g{grp}", reset_less=True)
        held_page = rep.replica(1, name=f"page_g{grp}", reset_less=True)
        with m.If(load):
            m.d.sync += [held.eq(fields), held_page.eq(page)]
        m.d.comb += [self.groups.fields[grp].fields.eq(held), self.groups.fields[grp].page.eq(held_page)]

    def _lane_codes(self, m, i: int, en, take, codes_in, page, bank) -> None:
        """Lane ``i``'s shift register of codes: where ``en`` (its enable copy) and ``take`` (its
        group's) are high it loads ``codes_in`` (codes ``i``, ``i + N``, ... of its block) with the
        beat's ``page`` and the block's ``bank`` (None: one bank); each other enabled cycle it shifts
        to the next code. Its table read is the code in front."""
        k, C = self.config.layout.code_bits, self.config.beats_per_block
        codes = rep.replica(unsigned(C * k), name=f"codes{i}", reset_less=True)
        lane_page = rep.replica(1, name=f"page{i}", reset_less=True)
        lane_bank = rep.replica(1, name=f"bank{i}", reset_less=True)
        with m.If(en):
            with m.If(take):
                m.d.sync += [codes.eq(codes_in), lane_page.eq(page)]
                if bank is not None:
                    m.d.sync += lane_bank.eq(bank)
            if C > 1:
                with m.Else():
                    m.d.sync += codes.eq(codes >> k)
        rd = self.lanes.read[i]
        m.d.comb += [rd.addr.eq(codes[:k]), rd.bank.eq(lane_bank), rd.page.eq(lane_page)]

    def _wide(self):
        """``config.wide``: the beat first into an input register, one per region of
        ``replica.REGION`` lanes holding only the bits its lanes use (their codes, their blocks'
        headers), and whether a beat was taken, and its ``swap``. The register has no enable: a
        beat taken at edge ``t`` is in it for one cycle, and stage 0 takes it at edge ``t + 1``
        for certain, because ``blocks.ready`` is decided for that edge: ``en_upcoming`` (the
        enable of the next cycle, a register of the control's) and the ``take`` of the next
        cycle. So a beat's acceptance still means that the beat before it has left stage 0 by
        the next edge, as the host's page rule needs (docs/hardware.md). Each region decodes its
        own headers, selects its own banks and computes its own page bit from its own copies of
        ``active`` and the input register; stage 0's valid bit is a copy per region
        (``region_valid``, for the regions' valid chains, hdl.pipeline)."""
        m = Module()
        cfg, lay = self.config, self.config.layout
        N, g, k, H = cfg.lanes, lay.group, lay.code_bits, lay.header_bits
        B, C = cfg.blocks_per_beat, cfg.beats_per_block
        R = cfg.regions
        n_groups = rep.groups(N)
        per_group, per_region = N // n_groups, N // R
        en, en_lane = self.enable.en, self.enable.lane
        beat = self.blocks.payload.blocks

        def block_of(i):
            return i // g if B > 1 else 0

        def code_bits(i):
            """Beat bit positions of lane ``i``'s codes, chunk 0 first."""
            base = block_of(i) * lay.block_bits + H
            first = i % g if B > 1 else i
            return [base + (first + c * N) * k + j for c in range(C) for j in range(k)]

        taken = []                                     # per region: a beat was taken last cycle
        for r in range(R):
            taken.append(rep.replica(1, name=f"beat_valid_r{r}"))
        if C > 1:
            chunk = Signal(range(C))
            take = rep.replica(1, name="take_ctl", init=1)
            take_g = [rep.replica(1, name=f"take_g{grp}", init=1) for grp in range(n_groups)]
            take_next = Mux(take, ~taken[0], chunk == C - 2)
            with m.If(en):
                m.d.sync += [t.eq(take_next) for t in [take] + take_g]
                with m.If(take):
                    m.d.sync += chunk.eq(0)
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)
            take_upcoming = Mux(en, take_next, take)   # take of the next cycle
        else:
            take, take_g, take_upcoming = 1, [1] * n_groups, 1
        # stage 0 takes at the next edge: the beat taken now is in the input register then
        m.d.comb += self.blocks.ready.eq(self.enable_upcoming & take_upcoming)
        accepted = self.blocks.valid & self.blocks.ready

        pages = []
        for r in range(R):
            lanes_r = range(r * per_region, (r + 1) * per_region)
            en_r, take_r = en_lane[lanes_r[0]], take_g[lanes_r[0] // per_group]
            blocks_r = sorted({block_of(i) for i in lanes_r})
            bits = sorted({b * lay.block_bits + j for b in blocks_r for j in range(H)} |
                          {p for i in lanes_r for p in code_bits(i)})
            where = {p: n for n, p in enumerate(bits)}
            pre = rep.replica(len(bits), name=f"beat_r{r}", reset_less=True)
            pre_swap = rep.replica(1, name=f"beat_swap_r{r}", reset_less=True)
            active = rep.replica(1, name=f"active_r{r}")
            valid = rep.replica(1, name=f"valid_r{r}")
            m.d.sync += [pre.eq(Cat(beat[p] for p in bits)), taken[r].eq(accepted),
                         pre_swap.eq(self.blocks.payload.swap)]

            def at(start, width, pre=pre, where=where):
                return Cat(pre[where[start + j]] for j in range(width))

            # the page of the input register's beat (of the newest beat taken): writes go to the other
            page = active ^ (taken[r] & pre_swap)
            with m.If(en_r & take_r):
                m.d.sync += [valid.eq(taken[r]), active.eq(page)]
            m.d.comb += [self.lanes.write_page[r].eq(~page), self.groups.write_page[r].eq(~page),
                         self.region_valid[r].eq(valid)]
            pages.append(page)

            decoders = {}
            for b in blocks_r:
                decoders[b] = sd = ScaleDecoder(cfg)
                m.submodules[f"scale_r{r}_{b}"] = sd
                m.d.comb += sd.header.eq(at(b * lay.block_bits, H))
            if lay.banks == 2:
                m.submodules[f"mux_r{r}"] = mux = self._mux_cls(lanes=per_region, group=g)
                m.d.comb += [mux.select[n].eq(decoders[b].select) for n, b in enumerate(blocks_r)]
            for grp in range(lanes_r[0] // per_group, (lanes_r[-1] + 1) // per_group):
                self._group_fields(m, grp, en_lane[grp * per_group] & take_g[grp],
                                   decoders[block_of(grp * per_group)].fields, page)
            for i in lanes_r:
                self._lane_codes(m, i, en_lane[i], take_g[i // per_group], Cat(pre[where[p]] for p in code_bits(i)),
                                 page, mux.bank[i - lanes_r[0]] if lay.banks == 2 else None)
        m.d.comb += self.valid.eq(self.region_valid[0])
        return m
