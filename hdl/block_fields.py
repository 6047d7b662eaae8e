"""Block fields: each block's decoded header plus the layer's offset, registered beside its lanes.

From stage 0 (hdl.beat_issue) each group of ``replica.LANES_PER_COPY`` lanes gets its
block's header fields (``scale_decoder.fields(config)``: the scale without its
constant exponent part) and the beat's page. This component adds the page's
*layer term*, the per-layer offset plus ``scale_decoder.exp_constant(config)``,
and delivers per lane the ``scale_decoder.block(config)`` values the lane's
formatter takes (hdl.hif_formatter), in step with the lane's table word: it
takes ``latency`` enabled edges, the table read's (1, or 2 with
``lutram_depth > 0``, hdl.lut_bank.read_latency).

Registers. Per lane group and page one layer term (``offset_we`` writes
``offset + exp_constant`` into the page ``issue.write_page``, the one the host
loads, at once; in a wide decoder, hdl.config, one cycle later: the write is
first registered per region of ``replica.REGION`` lanes with its region's copy of
``write_page``, so that the inputs reach no logic before a register), and
per group one register of the block's fields, plus one per extra cycle of the
table read. The scale significand, which gates every
partial product of a lane's multiplier, gets a register per lane instead
(its last stage). No register drives more than a group; none has a reset.

Ports
* ``enable`` (in, hdl.pipeline.EnableSignature): each group's registers move on
  its first lane's copy, each lane's on its own;
* ``issue`` (in, hdl.beat_issue.GroupIssueSignature): per group ``fields`` and
  ``page``; ``write_page`` (one bit per region in a wide decoder, hdl.config: each
  group takes its region's);
* ``offset`` (in, signed 8), ``offset_we`` (in);
* ``block`` (out): per lane its ``block(config)`` values.

Latency: ``latency`` (= ``read_latency``) enabled edges from ``issue`` to
``block``. ``model`` is hdl.scale_decoder.block_model (golden's scale fields
and the offset).

Sparse residuals (``config.residuals > 0``): ``layer_sparse`` (in), written with
``offset_we`` beside the offset, is the page's flag "the layer carries sparse
entries"; ``plus0`` (out, per lane) is the flag of the lane's block's page, in
step with ``block``: in such a layer the formatter turns a -0 product into +0
(the layer's residual is +0 where it has no entry, golden.decoder).
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from . import replica as rep, scale_decoder
from .arith import delay
from .beat_issue import GroupIssueSignature
from .config import OFFSET_SHAPE, DecoderConfig
from .lut_bank import read_latency as table_read_latency
from .pipeline import EnableSignature

model = scale_decoder.block_model       # ``block_fields.model``: the name tests and docs/hardware.md use


class BlockFields(wiring.Component):
    model = staticmethod(model)         # hdl.scale_decoder.block_model

    def __init__(self, config: DecoderConfig, *, read_latency: int | None = None):
        self.config = config
        self.read_latency = table_read_latency(config.lutram_depth) if read_latency is None else read_latency
        if self.read_latency < 1:
            raise ValueError(f"read latency {self.read_latency}: the block fields take at least one register")
        super().__init__({
            "enable": In(EnableSignature(config.lanes)),
            "issue": In(GroupIssueSignature(config)),
            "offset": In(OFFSET_SHAPE),
            "offset_we": In(1),
            "block": Out(data.ArrayLayout(scale_decoder.block(config), config.lanes)),
            **({"layer_sparse": In(1), "plus0": Out(data.ArrayLayout(1, config.lanes))} if config.residuals else {}),
        })

    @property
    def latency(self) -> int:
        """Register stages from ``issue`` to ``block``: the fields register and one per extra
        cycle of the table read."""
        return self.read_latency

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        N = cfg.lanes
        n_groups = rep.groups(N)
        per_group = N // n_groups
        en_lane = self.enable.lane
        sig_name = "sig" if cfg.output == "exact" else "frac"
        with_term = scale_decoder.with_layer_term
        writes = []             # a wide decoder: the offset write registered per region first
        for r in range(cfg.regions if cfg.wide else 0):
            w = rep.replica(data.StructLayout({"we": 1, "page": 1, "offset": OFFSET_SHAPE}), name=f"offset_r{r}",
                            reset_less=True)
            m.d.sync += [w.we.eq(self.offset_we), w.page.eq(self.issue.write_page[r]), w.offset.eq(self.offset)]
            writes.append(w)
        for grp in range(n_groups):
            held = self.issue.fields[grp]
            en_g = en_lane[grp * per_group]
            # per page: the layer offset plus the block exponent's constant part
            terms = Array(rep.replica(scale_decoder.layer_term_shape(cfg), name=f"layer_term{p}_g{grp}",
                                      reset_less=True) for p in range(2))
            if cfg.wide:        # the region's registered write (its copy of the page the host writes)
                w = writes[grp * cfg.regions // n_groups]
                offset, offset_we, write_page = w.offset, w.we, w.page
            else:
                offset, offset_we, write_page = self.offset, self.offset_we, self.issue.write_page
            with m.If(offset_we):
                m.d.sync += terms[write_page].eq(offset + scale_decoder.exp_constant(cfg))
            r = rep.replica(scale_decoder.block(cfg), name=f"block_g{grp}", reset_less=True)
            with m.If(en_g):
                m.d.sync += [getattr(r, name).eq(value)
                             for name, value in with_term(cfg, held.fields, terms[held.page]).items()]
            stages, sig_src = 1, getattr(held.fields, sig_name)
            if cfg.residuals:          # the page's sparse flag, per group, in step with the fields
                flags = Array(rep.replica(1, name=f"layer_sparse{p}_g{grp}", reset_less=True) for p in range(2))
                with m.If(self.offset_we):
                    m.d.sync += flags[self.issue.write_page].eq(self.layer_sparse)
                plus0 = delay(m, en_g, flags[held.page], self.read_latency, f"plus0_g{grp}")
                for i in range(grp * per_group, (grp + 1) * per_group):
                    m.d.comb += self.plus0[i].eq(plus0)
            for d in range(self.read_latency - 1):             # keep pace with the table read
                r_next = rep.replica(scale_decoder.block(cfg), name=f"block{d + 2}_g{grp}", reset_less=True)
                with m.If(en_g):
                    m.d.sync += r_next.eq(r)
                r, sig_src, stages = r_next, getattr(r, sig_name), stages + 1
            assert stages == self.latency
            for i in range(grp * per_group, (grp + 1) * per_group):
                lane_sig = rep.replica(len(sig_src), name=f"scale_{sig_name}{i}", reset_less=True)
                with m.If(en_lane[i]):
                    m.d.sync += lane_sig.eq(sig_src)
                lane_block = Signal(scale_decoder.block(cfg), name=f"block_lane{i}")
                m.d.comb += [getattr(lane_block, f).eq(getattr(r, f) if f != sig_name else lane_sig)
                             for f in lane_block.shape().members]
                m.d.comb += self.block[i].eq(lane_block)
        return m
