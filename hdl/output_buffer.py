"""Output buffer: skid storage that lets the pipeline's enable be a register.

The decoder's pipeline advances only when its last stage's beat can go
somewhere, so the enable depends on the consumer's ``ready``. Computed
combinationally, it is one net from ``values.ready`` to every register of every
lane: thousands of loads at 64 lanes. Instead the enable is decided ``levels``
cycles ahead and reaches the lanes through ``levels`` levels of register copies
(hdl.replica). The cost of deciding early is ``levels`` beats of skid storage
here: a beat that leaves the last stage while the consumer stalls goes into it.

The rule: with ``S`` the beats held (skid entries plus the last stage's beat),
the enable ``levels`` cycles from now is high when ``S`` next cycle is at most 1.
At most ``levels - 1`` beats can arrive in between, so ``S`` never exceeds
``levels`` when the pipeline advances, and the skid (``levels`` entries) never
overflows. While both sides are ready, ``S`` stays 1 and a beat leaves every
cycle; after a stall the output may pause ``levels - 1`` cycles while the
pipeline restarts.

``levels = 0`` (the shallow pipeline, ``DecoderConfig.shallow``): no skid and
no decision ahead; ``en_next`` is the enable of this very cycle, high unless
the last stage holds a beat the consumer does not take (``~last_valid |
values.ready``), so ``values.ready`` reaches the pipeline's enables
combinationally: what a low clock on a LUT4 FPGA allows, and ``levels`` beats
of skid fewer per lane. ``en`` must then be ``en_next`` itself (hdl.pipeline
with no levels).

A decoder with many lanes uses one buffer per group of lanes, each with its
own copy of the (identical) control state, so that no control register drives
the whole output.

``OutputBuffer`` ports
* ``en`` (in): the pipeline enable this cycle;
* ``en_upcoming`` (in): the enable of the next cycle (what ``en``'s register is
  loaded with); the contract: ``en_upcoming`` now is ``en`` next cycle;
* ``entering_valid`` (in): the valid bit of the beat that enters the last stage when ``en`` is high;
* ``last`` (in): the last stage's registers, valid when the buffer's ``last_valid``;
* ``values`` (out stream): its payload is the oldest skid entry while the skid
  holds any (they are older), else the last stage;
* ``en_next`` (out): the enable decided now, for ``levels`` cycles later.

Latency 0: a beat in the last stage is on ``values`` in the same cycle while the
skid is empty. ``model`` is the cycle model of the rule above (a FIFO, not the
ring and thermometer code the hardware uses).

``OutputStage`` is the decoder's output: one ``OutputBuffer`` per
``replica.LANES_PER_BUFFER`` lanes (all with the same control state, so the first one's
``valid`` is everyone's), their payloads side by side as one ``values`` stream,
and their enable ports gathered in one ``control`` interface
(hdl.pipeline.OutputControlSignature) for the pipeline control.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from . import replica as rep
from .pipeline import OutputControlSignature, buffers


def model(levels: int, en, entering_valid, last, ready) -> dict[str, np.ndarray]:
    """Cycle model of an ``OutputBuffer`` (or an ``OutputStage``: its buffers side by side).

    Inputs per cycle ``t``: ``en[t]`` (``en_upcoming[t]`` is ``en[t + 1]``), ``entering_valid[t]``,
    the last stage's payload ``last[t]`` (an integer) and ``values.ready`` ``ready[t]``. Returns per
    cycle ``valid``, ``payload`` (0 where not valid) and ``en_next``. The rule: the output is the
    oldest beat held; a beat that leaves the last stage (``en`` high) without being sent waits in
    a FIFO of at most ``levels`` entries; ``en_next`` is high when at most one beat (FIFO plus last
    stage) will be held next cycle. With ``levels`` 0 ``en_next`` is this cycle's enable (``en[t]``
    must equal it): high when the last stage is empty or its beat is taken now."""
    n = len(en)
    out = {k: np.zeros(n, dtype=object) for k in ("valid", "payload", "en_next")}
    fifo: list[int] = []
    last_valid = False
    for t in range(n):
        valid = bool(fifo) or last_valid
        payload = fifo[0] if fifo else int(last[t])
        pop = valid and bool(ready[t])
        pop_fifo, pop_last = pop and bool(fifo), pop and not fifo
        if pop_fifo:
            fifo.pop(0)
        if en[t] and last_valid and not pop_last:
            fifo.append(int(last[t]))
        if len(fifo) > levels:
            raise AssertionError(f"cycle {t}: {len(fifo)} beats in a skid of {levels}")
        moves = not last_valid or pop_last                  # levels 0: the enable of this cycle
        last_valid = bool(entering_valid[t]) if en[t] else (last_valid and not pop_last)
        out["valid"][t], out["payload"][t] = int(valid), payload if valid else 0
        out["en_next"][t] = int(moves if levels == 0 else len(fifo) + last_valid <= 1)
    return {k: v.astype(np.int64) if k != "payload" else v for k, v in out.items()}


class OutputBuffer(wiring.Component):
    latency = 0                         # a beat in the last stage is on ``values`` in its cycle (skid empty)
    model = staticmethod(model)

    def __init__(self, payload_shape, *, levels: int = 1):
        self.levels = levels
        super().__init__({
            "en": In(1),
            "en_upcoming": In(1),
            "entering_valid": In(1),
            "last": In(payload_shape),
            "values": Out(stream.Signature(payload_shape)),
            "en_next": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        D = self.levels
        if D == 0:
            return self._no_skid(m)
        # Control state: replicas, because every group's buffer has the same. The skid's fill is
        # a thermometer code (more[j]: more than j entries hold beats still to be sent), so that
        # the next state and the enable are a few LUTs, with no adder.
        last_valid = rep.replica(1, name="last_valid")
        more = [rep.replica(1, name=f"held_gt{j}") for j in range(D)]
        if D > 1:           # the skid is a ring: write pointer, and the oldest beat still to be sent
            wp, rp = rep.replica(range(D), name="wp"), rep.replica(range(D), name="rp")
        else:
            wp = rp = Const(0)
        skid = Array(Signal.like(self.last, name=f"skid{i}", reset_less=True) for i in range(D))

        held = more[0]
        pop = self.values.valid & self.values.ready
        pop_skid, pop_last = pop & held, pop & ~held
        m.d.comb += [self.values.valid.eq(held | last_valid),
                     self.values.payload.eq(Mux(held, skid[rp], self.last))]

        # Every beat that leaves the last stage (en high) is written into the skid, taken now or
        # not: the skid's write enable then depends on registers only, not on values.ready, and
        # only the fill counts what is still to be sent (the newest entries of the ring).
        # capture == en & last_valid, kept in a register of its own (loaded from the next cycle's
        # values) so that the skid's write enable is a flip-flop beside the skid, not logic.
        capture = rep.replica(1, name="capture")
        stays = capture & ~pop_last
        with m.If(capture):
            m.d.sync += skid[wp].eq(self.last)

        # Next state as plain expressions, no comb processes: a 4-state simulator such as Icarus
        # never evaluates a process whose inputs do not change after time 0.
        last_next = Signal(name="last_next")
        nxt = [Signal(name=f"held_gt{j}_next") for j in range(D)]
        m.d.comb += last_next.eq(Mux(self.en, self.entering_valid, last_valid & ~pop_last))
        for j in range(D):
            below = more[j - 1] if j else Const(1)
            above = more[j + 1] if j + 1 < D else Const(0)
            # more than j next: more than j now and not one fewer, or exactly j now and one more
            m.d.comb += nxt[j].eq((more[j] & (stays | ~pop_skid | above)) |
                                  (below & ~more[j] & stays & ~pop_skid))
        # at most one beat held next cycle (skid entries plus the last stage)
        m.d.comb += self.en_next.eq(~(nxt[0] & last_next) & (~nxt[1] if D > 1 else 1))
        m.d.sync += [last_valid.eq(last_next), capture.eq(self.en_upcoming & last_next)]
        m.d.sync += [r.eq(n) for r, n in zip(more, nxt)]
        if D > 1:
            assert D == 2, "the ring's read pointer below is written for two entries"
            wp_next = wp ^ capture
            m.d.sync += [wp.eq(wp_next), rp.eq(wp_next ^ (nxt[0] & ~nxt[1]))]   # oldest = wp - fill
        return m

    def _no_skid(self, m):
        """``levels`` 0: the last stage is the output; the pipeline moves when it is empty or taken."""
        last_valid = Signal(name="last_valid")
        m.d.comb += [self.values.valid.eq(last_valid), self.values.payload.eq(self.last),
                     self.en_next.eq(~last_valid | self.values.ready)]
        with m.If(self.en):
            m.d.sync += last_valid.eq(self.entering_valid)
        return m


class OutputStage(wiring.Component):
    model = staticmethod(model)

    def __init__(self, lane_shape, lanes: int, *, levels: int = 1):
        self.lane_shape, self.lanes, self.levels = lane_shape, lanes, levels
        self.n_buffers = buffers(lanes, levels)
        super().__init__({
            "last": In(data.ArrayLayout(lane_shape, lanes)),
            "values": Out(stream.Signature(data.ArrayLayout(lane_shape, lanes))),
            "control": Out(OutputControlSignature(self.n_buffers)),
        })

    @property
    def latency(self) -> int:
        """Cycles from the last stage to ``values`` (with the skid empty): none."""
        return 0

    def elaborate(self, platform):
        m = Module()
        per = self.lanes // self.n_buffers
        outs = [OutputBuffer(data.ArrayLayout(self.lane_shape, per), levels=self.levels)
                for _ in range(self.n_buffers)]
        for j, ob in enumerate(outs):
            m.submodules[f"output_buffer{j}"] = ob
            m.d.comb += [ob.en.eq(self.control.en[j]), ob.en_upcoming.eq(self.control.en_upcoming[j]),
                         ob.entering_valid.eq(self.control.entering_valid[j]),
                         self.control.en_next[j].eq(ob.en_next), ob.values.ready.eq(self.values.ready)]
            m.d.comb += [ob.last[i].eq(self.last[j * per + i]) for i in range(per)]
        m.d.comb += [self.values.valid.eq(outs[0].values.valid),
                     self.values.payload.eq(Cat(ob.values.payload for ob in outs))]
        return m
