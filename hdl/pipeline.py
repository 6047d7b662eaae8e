"""Pipeline control: the enable tree and the valid chain, the one place that builds either.

The decoder's datapath is one pipeline that moves as a whole: every stage
register advances on one enable, ``en``, and a valid bit per stage says which
stages hold a beat. Both are built here and nowhere else.

Enable. The output buffers (hdl.output_buffer) decide the enable ``levels``
cycles ahead (``en_next``); it reaches the datapath through ``levels`` levels of
register copies (hdl.replica), so that ``values.ready`` reaches only the
buffers and no register drives more than a few loads:

* ``levels = 1`` (up to ``replica.REGION`` lanes): one copy per lane, one for
  the control (``enable.en``) and one per output buffer, each loaded from an
  output buffer's ``en_next``;
* ``levels = 2``: first one copy per region of ``REGION`` lanes (loaded from one
  of the region's own buffers), then the copies above, each from its region's.

* ``levels = 0`` (the shallow pipeline, ``DecoderConfig.shallow``: a low clock on a
  LUT4 FPGA): no registers; ``en_next`` (one output buffer, no skid) is every
  copy in the same cycle, so ``values.ready`` reaches every register's enable
  combinationally. ``en_upcoming`` is not defined then (0): a buffer with no
  skid does not use it.

Every buffer holds the same state and decides the same ``en_next``, so every
copy is the same signal, delayed by ``levels`` cycles. The copies have no reset:
each follows the buffers' (reset) state a fixed number of cycles later, so they
stay equal to one another through a reset and the reset net does not reach every
lane.

Valid chain. ``valid`` is the valid bit of the pipeline's stage 0 (the beat
issue stage, hdl.beat_issue); the chain carries it through ``depth - 1``
registers that advance on the enable: ``buffers.entering_valid[j]`` is the
valid bit of the beat that enters the last stage (stage ``depth`` after stage 0)
at the next enabled edge, one copy per output buffer; the output buffer keeps
the last stage's own valid bit. With two levels the chain is built once per
region, on the region's own enable copy, so that no chain register reaches
every output buffer (at 64 lanes one did, and set the clock).

Stage 0's valid bit may come as one copy per region (``valids`` = the
regions, a wide decoder's beat issue, hdl.config ``wide``): each region's chain
then starts from its own copy. The default (1) is one bit for every chain.

With ``upcoming`` (a wide decoder's beat issue, which decides ``blocks.ready``
for the next cycle's enable) one more output, ``en_upcoming``: the control's
enable of the next cycle, a register of its own loaded as region 0's copy (two
levels only). The default builds none.

Ports
* ``valid`` (in): stage 0 holds a beat (``valids`` bits: region ``r``'s copy in bit ``r``).
* ``enable`` (out, ``EnableSignature``): ``en`` (the control's copy) and
  ``lane[i]`` (lane ``i``'s copy); all equal.
* ``buffers`` (``OutputControlSignature``, flipped): each output buffer's
  ``en_next`` in; its ``en``, ``en_upcoming`` (the value its ``en`` takes
  next cycle) and ``entering_valid`` (its region's chain) out.

Latency: ``levels`` cycles (0 to 2) from ``en_next`` to every enable copy (the
``latency`` property, counted from the registers built); ``depth - 1`` enabled
edges from ``valid`` to ``entering_valid``. ``model`` is the cycle model.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from . import replica as rep


class EnableSignature(wiring.Signature):
    """The pipeline enable as the control drives it: ``en`` (control copy), ``lane[i]`` (lane copies)."""

    def __init__(self, lanes: int):
        self.lanes = lanes
        super().__init__({"en": Out(1), "lane": Out(data.ArrayLayout(1, lanes))})


class OutputControlSignature(wiring.Signature):
    """Between the output buffers (this side) and the pipeline control (flipped): per buffer its
    decision ``en_next`` out; its enable ``en``, the next cycle's ``en_upcoming`` and the valid bit
    of the beat entering the last stage (``entering_valid``, every buffer's the same) in."""

    def __init__(self, buffers: int):
        self.buffers = buffers
        super().__init__({"en_next": Out(data.ArrayLayout(1, buffers)),
                          "en": In(data.ArrayLayout(1, buffers)),
                          "en_upcoming": In(data.ArrayLayout(1, buffers)),
                          "entering_valid": In(data.ArrayLayout(1, buffers))})


def buffers(lanes: int, levels: int | None = None) -> int:
    """Output buffers of a decoder of ``lanes`` lanes: one per ``replica.LANES_PER_BUFFER`` lanes, or one
    where the enable has no register levels (``levels`` 0: no skid, so no state to copy)."""
    return 1 if levels == 0 else rep.groups(lanes, rep.LANES_PER_BUFFER)


def levels_for(config) -> int:
    """The enable's register levels for a decoder ``config`` (hdl.config.DecoderConfig): 0 for the
    shallow pipeline, else ``replica.enable_levels``."""
    return 0 if config.shallow else rep.enable_levels(config.lanes)


def model(lanes: int, depth: int, en_next, valid, levels: int | None = None) -> dict[str, np.ndarray]:
    """Cycle model: per cycle ``t`` the enable copies and ``entering_valid`` (per buffer), from the buffers'
    ``en_next[t]`` (the same for every buffer) and stage 0's ``valid[t]``.

    Every copy is ``en_next`` delayed by ``levels`` cycles (1 before that: the initial value;
    ``levels`` None: ``replica.enable_levels(lanes)``); ``en_upcoming`` is that delayed by one
    cycle less (0 with no levels); the valid chain is a shift register of ``depth - 1`` bits that
    shifts on enabled cycles."""
    en_next, valid = np.asarray(en_next, dtype=np.int64), np.asarray(valid, dtype=np.int64)
    levels = rep.enable_levels(lanes) if levels is None else levels

    def delayed(x, d):
        return np.concatenate([np.ones(d, dtype=np.int64), x[:len(x) - d]]) if d else x.copy()

    en = delayed(en_next, levels)
    chain = [0] * (depth - 1)                 # chain[s]: the valid bit of stage s + 1
    entering = np.zeros(len(valid), dtype=np.int64)
    for t in range(len(valid)):
        entering[t] = chain[-1] if chain else valid[t]
        if en[t]:
            chain = [int(valid[t])] + chain[:-1]
    per_buffer = lambda x: np.repeat(x[:, None], buffers(lanes, levels), axis=1)     # noqa: E731
    upcoming = delayed(en_next, levels - 1) if levels else np.zeros_like(en)
    return {"en": en, "lane": np.repeat(en[:, None], lanes, axis=1), "buffer_en": per_buffer(en),
            "en_upcoming": per_buffer(upcoming), "entering_valid": per_buffer(entering)}


class PipelineControl(wiring.Component):
    model = staticmethod(model)

    def __init__(self, lanes: int, depth: int, *, levels: int | None = None, valids: int = 1,
                 upcoming: bool = False):
        # levels: the enable's register levels; None: replica.enable_levels(lanes)
        # valids: copies of stage 0's valid bit, 1 or one per region (module docstring)
        if depth < 1:
            raise ValueError(f"pipeline depth {depth}: the datapath has at least one stage after stage 0")
        self.lanes, self.depth = lanes, depth
        self.levels = rep.enable_levels(lanes) if levels is None else levels
        if valids != 1 and not (self.levels == 2 and valids == rep.groups(lanes, rep.REGION)):
            raise ValueError(f"valids {valids}: 1, or one per region with two enable levels")
        if upcoming and self.levels != 2:
            raise ValueError("en_upcoming is built with two enable levels only")
        self.valids, self.upcoming = valids, upcoming
        super().__init__({
            "valid": In(valids),
            "enable": Out(EnableSignature(lanes)),
            "buffers": In(OutputControlSignature(buffers(lanes, self.levels))),
            **({"en_upcoming": Out(1)} if upcoming else {}),
        })

    @property
    def latency(self) -> int:
        """Cycles from ``en_next`` to the enable copies: the register levels of the tree."""
        return self.levels

    def elaborate(self, platform):
        m = Module()
        N, levels = self.lanes, self.levels
        if levels == 0:
            return self._combinational(m)
        n_regions, n_outs = rep.groups(N, rep.REGION), buffers(N)
        per_region, per_out = N // n_regions, N // n_outs
        en_next = self.buffers.en_next
        if levels == 1:
            roots = [en_next[0]] * n_regions
        else:                                         # a copy per region, from one of its own buffers
            roots = [rep.replica(1, name=f"en_region{r}", init=1, reset_less=True) for r in range(n_regions)]
            m.d.sync += [root.eq(en_next[r * per_region // per_out]) for r, root in enumerate(roots)]

        def region(lane):
            return roots[lane // per_region]

        if self.upcoming:           # the control's enable of the next cycle: region 0's copy, again
            en_up = rep.replica(1, name="en_upcoming", init=1, reset_less=True)
            m.d.sync += en_up.eq(en_next[0])
            m.d.comb += self.en_upcoming.eq(en_up)

        en = rep.replica(1, name="en_ctl", init=1, reset_less=True)
        en_lane = [rep.replica(1, name=f"en_lane{i}", init=1, reset_less=True) for i in range(N)]
        en_out = [rep.replica(1, name=f"en_out{j}", init=1, reset_less=True) for j in range(n_outs)]
        m.d.sync += [en.eq(roots[0])] + [e.eq(region(i)) for i, e in enumerate(en_lane)]
        # each buffer's own copy: from its own decision (one level) or its region's copy (two)
        upcoming = [en_next[j] if levels == 1 else region(j * per_out) for j in range(n_outs)]
        m.d.sync += [e.eq(u) for e, u in zip(en_out, upcoming)]
        m.d.comb += [self.enable.en.eq(en)] + [self.enable.lane[i].eq(e) for i, e in enumerate(en_lane)]
        m.d.comb += [self.buffers.en[j].eq(e) for j, e in enumerate(en_out)]
        m.d.comb += [self.buffers.en_upcoming[j].eq(u) for j, u in enumerate(upcoming)]

        # The valid chain: stage 0's valid bit through depth - 1 registers, once per region (one
        # region up to REGION lanes), each chain on an enable copy of its own; each buffer reads
        # its region's chain.
        ends = []
        for r in range(n_regions):
            if levels == 1:
                en_chain = en
            else:
                en_chain = rep.replica(1, name=f"en_valid{r}", init=1, reset_less=True)
                m.d.sync += en_chain.eq(roots[r])
            ends.append(self._valid_chain(m, en_chain, r if n_regions > 1 else None))
        m.d.comb += [self.buffers.entering_valid[j].eq(ends[j * per_out // per_region]) for j in range(n_outs)]
        return m

    def _combinational(self, m):
        """No register levels: the one buffer's ``en_next`` is every copy, and one valid chain."""
        en = self.buffers.en_next[0]
        m.d.comb += [self.enable.en.eq(en), self.buffers.en[0].eq(en), self.buffers.en_upcoming[0].eq(0)]
        m.d.comb += [self.enable.lane[i].eq(en) for i in range(self.lanes)]
        m.d.comb += self.buffers.entering_valid[0].eq(self._valid_chain(m, en))
        return m

    def _valid_chain(self, m, en, region=None):
        """Stage 0's valid bit through ``depth - 1`` registers that advance on ``en``; returns the
        last. ``region``: the chain of that region (its registers copies, hdl.replica)."""
        valid = self.valid if self.valids == 1 else self.valid[region]
        for stage in range(1, self.depth):
            nxt = Signal(name=f"valid{stage}") if region is None else rep.replica(1, name=f"valid{stage}_r{region}")
            with m.If(en):
                m.d.sync += nxt.eq(valid)
            valid = nxt
        return valid
