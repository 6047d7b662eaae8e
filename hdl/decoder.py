"""Decoder top: a stream of packed blocks in, a stream of N decoded values per beat out.

Implements golden.decoder for one ``DecoderConfig`` (docs/hardware.md) as five
components joined by ``wiring.connect``::

    blocks ─▶ BeatIssue ─{addr, bank, page} per lane─▶ Lanes ─out per lane─▶ OutputStage ─▶ values
    (stream)  (stage 0)  ─{fields, page} per group─▶ BlockFields ─block─┘    (skid buffers)   (stream)
                                       offset, offset_we ─┘
    load ─────────────────────────────────────────────▶ Lanes (LUT word encoder, LUT bank)
              PipelineControl: the enable tree (en_next ─▶ every copy) and the valid chain

* ``BeatIssue`` (hdl.beat_issue): takes a beat, decodes its headers, issues its
  codes over ``g / N`` cycles; the page pointer; latency 1.
* ``BlockFields`` (hdl.block_fields): the block's scale fields plus the page's
  layer offset, per lane group, in step with the table read.
* ``Lanes`` (hdl.lanes): the table write path, each lane's table read and HIF
  formatter; latency ``read_latency + formatter stages``.
* ``OutputStage`` (hdl.output_buffer): skid buffers that decide the enable ahead; latency 0.
* ``PipelineControl`` (hdl.pipeline): the enable copies and the valid chain, built there only.

Interfaces
* ``blocks``: stream of ``{blocks, swap}``; ``blocks`` is one block (``N <= g``)
  or ``N / g`` blocks (``N > g``) exactly as golden.layout packs them, LSB first.
  ``swap`` makes this beat, and all after it, use the other page of the tables
  and offset: the page the host has just loaded. The swap costs no cycle.
* ``load``: stream of table writes ``{bank, addr, data}`` (``data`` a HIF code;
  ``ready`` is tied high) into the inactive page; ``offset``/``offset_we`` write
  the inactive page's per-layer offset.
* ``values``: stream of ``N`` lanes (BF16 or the exact product fields).

Latency. ``latency`` is the sum of the components' latencies (each a property of
the instance built, checked against the registers it builds): the number of
cycles from a beat's handshake (the edge where ``blocks.valid & blocks.ready``)
to the edge where its first output beat is first offered, ``values.valid`` high
(4 exact, 8 BF16 for the sop4 layout; one more with ``lutram_depth > 0``; one
more in a wide decoder, below).
tests/test_hdl_decoder.py measures it. While both sides are ready, ``N`` values
leave every cycle with no bubble.

Stalls. One enable moves every pipeline register. It is a register, copied once
per lane and once for the control (hdl.replica, hdl.pipeline): ``en`` for the
next cycle is decided from the output buffer's state (hdl.output_buffer), so
``values.ready`` reaches only that buffer, not every register of every lane;
``blocks.ready`` depends only on registers. Nothing is lost or duplicated under
backpressure.

Shallow pipeline (``config.pipeline == "shallow"``, hdl.config: a low clock on a
LUT4 FPGA such as iCE40 at 50 MHz): the same function, bit for bit, built
smaller: no enable registers and no skid (``values.ready`` reaches every
enable, and ``blocks.ready``, combinationally), one output buffer, a
four-stage BF16 formatter (hdl.hif_formatter), the table memories marked
``no_rw_check`` (hdl.lut_bank). Latency 6 BF16 for the sop4
layout (one more with ``lutram_depth > 0``); exact output as deep.

Tables. A table word written in cycle ``t`` is readable from cycle ``t + 2``
(hdl.lut_bank), and a beat accepted in cycle ``t`` reads its tables in cycle
``t + 1``: the beat with ``swap`` must come after the cycle of the page's last
write. The host must not write a page while beats that read it are in flight:
load the next layer only after the current layer's first (swap) beat has been
accepted. The per-layer offset is written at once.

Wide decoders (``config.wide``: the deep pipeline with more than
``replica.REGION`` lanes and no residuals, hdl.config) register both inputs once
per region of ``REGION`` lanes before any logic: the beat issue's input stage
(hdl.beat_issue, latency 2: each region decodes its own headers and keeps its
own page pointer and stage 0 valid bit, which starts its region's valid chain in
hdl.pipeline) and the table write's region registers in front of one LUT word
encoder per region (hdl.lanes: a word written in cycle ``t`` is readable from
``t + 3``; the offset write is registered per region too, and lands an edge
later). The beat's reads are one cycle later too, so the rule above holds
as written; and since the input stage has no enable (``blocks.ready`` is
decided for the next edge), an accepted beat enters stage 0 at the next edge,
so the beat before it has made its reads before any write the host sends
after the acceptance lands. Up to ``REGION`` lanes neither input register is built.

Reset (synchronous) clears every valid bit, the block in hand and the page
pointer (page 0 active); the datapath registers have no reset. LUT RAM is not
cleared: after reset the host loads the tables (they go to page 1) and sends
the first beat with ``swap`` set.

Sparse residuals (``config.residuals`` = R > 0; docs/hardware.md "Sparse
residuals"): three more ports, ``sparse`` (in stream of ``{index, value, last}``:
a layer's entries, after its swap beat), ``layer_sparse`` (in, written with
``offset_we``: the loaded layer has entries) and ``sparse_error`` (out, sticky
bits), and two more components::

    sparse ─▶ SparseMerge ─hold─▶ BeatIssue          (stage 0 presents a chunk again)
              (stage 0)   ─entries─▶ ResidualPath ◀─ words, blocks, lane outputs
                                     (R adders, lane delay, override) ─▶ OutputStage

The latency grows by ``ResidualPath.latency`` (the adder is longer than the
formatter). Without residuals none of the three ports or two components is built.

``model`` is hdl.reference.expected_beats (golden/ only).
"""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from . import reference, replica as rep
from .arith import delay
from .beat_issue import BeatIssue
from .block_fields import BlockFields
from .codebook_mux import CodebookMux
from .config import OFFSET_SHAPE, DecoderConfig
from .hif_formatter import HifFormatter
from .lanes import Lanes
from .lut_bank import LutBank
from .output_buffer import OutputStage
from .pipeline import PipelineControl, levels_for


class Decoder(wiring.Component):
    model = staticmethod(reference.expected_beats)       # golden's output beats (hdl.reference)

    def __init__(self, config: DecoderConfig, *, formatter=HifFormatter, mux=CodebookMux, bank=LutBank,
                 merge=None, path=None):
        # formatter / mux / bank (and merge / path with residuals): the component classes used,
        # replaceable so that tests can show that a broken one (wrong rounding, inverted
        # selection, a flipped LUT bit, a merge that never holds) is caught.
        self.config = config
        self.issue = BeatIssue(config, mux=mux)
        self.lanes = Lanes(config, formatter=formatter, bank=bank)
        self.fields = BlockFields(config, read_latency=self.lanes.read_latency)
        levels = levels_for(config)          # the enable's register levels: 0 for the shallow pipeline
        self.output = OutputStage(config.lane_layout, config.lanes, levels=levels)
        members = {
            "blocks": In(stream.Signature(config.beat_layout)),
            "load": In(stream.Signature(config.load_layout)),
            "offset": In(OFFSET_SHAPE),
            "offset_we": In(1),
            "values": Out(stream.Signature(data.ArrayLayout(config.lane_layout, config.lanes))),
        }
        if config.residuals:
            from .residual import ResidualPath
            from .sparse_merge import SparseMerge, error_layout
            self.merge, self.residual = (merge or SparseMerge)(config), (path or ResidualPath)(config)
            assert self.merge.latency == self.issue.latency, "entries come with the pass's table read"
            members.update({"sparse": In(stream.Signature(config.sparse_layout)), "layer_sparse": In(1),
                            "sparse_error": Out(error_layout())})
        # the valid chain spans the stages after stage 0 up to the last one (hdl.pipeline)
        self.control = PipelineControl(config.lanes, depth=self.lanes.latency + self.residual_latency,
                                       levels=levels, valids=config.regions, upcoming=config.wide)
        assert self.control.latency == self.output.levels, "the skid must cover the enable's register levels"
        assert self.fields.latency == self.lanes.read_latency, "block fields must arrive with the table word"
        super().__init__(members)

    @property
    def residual_latency(self) -> int:
        """The residual path's stages after the lanes (0 without residuals)."""
        return self.residual.latency if self.config.residuals else 0

    @property
    def latency(self) -> int:
        """Cycles from a beat's handshake to its first output beat: the stages of the components
        on the way (stage 0, the lanes, the residual path, the output stage)."""
        return self.issue.latency + self.lanes.latency + self.residual_latency + self.output.latency

    def elaborate(self, platform):
        m = Module()
        m.submodules.control = control = self.control
        m.submodules.issue = issue = self.issue
        m.submodules.fields = fields = self.fields
        m.submodules.lanes = lanes = self.lanes
        m.submodules.output = output = self.output
        wiring.connect(m, wiring.flipped(self.blocks), issue.blocks)
        wiring.connect(m, wiring.flipped(self.load), lanes.load)
        wiring.connect(m, output.values, wiring.flipped(self.values))
        wiring.connect(m, control=control.enable, issue=issue.enable, fields=fields.enable, lanes=lanes.enable)
        wiring.connect(m, control=control.buffers, output=output.control)
        wiring.connect(m, issue=issue.lanes, lanes=lanes.issue)
        wiring.connect(m, issue=issue.groups, fields=fields.issue)
        m.d.comb += [control.valid.eq(issue.region_valid if self.config.wide else issue.valid),
                     fields.offset.eq(self.offset), fields.offset_we.eq(self.offset_we),
                     lanes.block.eq(fields.block)]
        if self.config.wide:
            m.d.comb += issue.enable_upcoming.eq(control.en_upcoming)
        if not self.config.residuals:
            m.d.comb += output.last.eq(lanes.out)
            return m
        m.submodules.merge = merge = self.merge
        m.submodules.residual_path = path = self.residual
        wiring.connect(m, wiring.flipped(self.sparse), merge.sparse)
        wiring.connect(m, issue=issue.merge, merge=merge.issue)
        wiring.connect(m, control=control.enable, residual=path.enable)
        # The merge's own copy of the enable, so that its registers do not load the control's:
        # the output buffers' decision through as many register levels as every copy has
        # (hdl.pipeline), hence the same signal.
        en_merge = output.control.en_next[0]
        for level in range(control.latency):
            r = rep.replica(1, name=f"en_merge{level}", init=1, reset_less=True)
            m.d.sync += r.eq(en_merge)
            en_merge = r
        # the pass's entries meet its table words: the table read's cycles after the first
        extra = self.lanes.read_latency - 1
        m.d.comb += [merge.en.eq(en_merge), merge.layer_sparse.eq(self.layer_sparse),
                     merge.offset_we.eq(self.offset_we), self.sparse_error.eq(merge.error),
                     fields.layer_sparse.eq(self.layer_sparse), lanes.plus0.eq(fields.plus0),
                     path.entries.eq(delay(m, control.enable.en, merge.entries.as_value(), extra, "entries")),
                     path.final.eq(delay(m, control.enable.en, merge.final, extra, "final")),
                     path.word.eq(lanes.word), path.block.eq(fields.block), path.lanes.eq(lanes.out),
                     output.last.eq(path.out)]
        return m
