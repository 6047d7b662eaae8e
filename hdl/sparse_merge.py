"""The sparse merge at stage 0: which sparse entries each pass applies, and when to hold a chunk.

Part of the sparse-residual path (hdl.residual, its overview; docs/hardware.md, "Sparse
residuals"). ``SparseMerge`` takes the ``sparse`` stream, one layer's entries after that
layer's first (swap) beat, ``last`` on its last entry; keeps a window of ``window`` entries
and, for the chunk of ``N`` values that stage 0 (hdl.beat_issue) presents, hands up to ``R``
entries that fall in it to the residual adders (hdl.residual_adder, through
hdl.residual's ``ResidualPath``).

Contract: every entry is applied once, in its chunk, at most ``R`` a pass. A chunk with more
than ``R`` entries is presented again (``hold``: the beat issue keeps its chunk, the pass is
a bubble in the valid chain) until all its entries have been applied; so is a chunk whose
entries the window cannot yet prove complete. Bad input sets sticky ``error`` bits
(``ERRORS``). The full rule is ``SparseMerge``'s docstring; ``model`` (``merge_model``, with
``MergeModel``) is its cycle model, checked against the RTL every cycle.

Ports: ``sparse`` (in stream, ``config.sparse_layout``), ``layer_sparse`` and ``offset_we``
(in), ``issue`` (in, ``MergeIssueSignature``: stage 0's state, ``hold_next`` back), ``en``
(in), ``entries`` (out, per adder ``entry_layout``) and ``final`` (out), ``error`` (out,
``error_layout``).

Latency: 1 (``entries`` and ``final`` are registered at the edge a pass executes, so they
arrive with the pass's table read).

The layouts of what the merge drives are defined here, beside it: ``entry_layout`` (what an
adder is handed for one pass; hdl.residual's ``ResidualPath`` takes it), ``error_layout``
and ``ERRORS`` (the decoder's ``sparse_error`` port), ``lane_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from . import SPARSE_ERRORS, replica as rep
from .config import SPARSE_INDEX_BITS, DecoderConfig
from .scale_decoder import BF16

#: The sticky error bits of ``SparseMerge.error``, LSB first (docs/hardware.md "Sparse residuals"):
#: hdl's ``SPARSE_ERRORS``, the one definition (synth/wire.py reads it too).
ERRORS = SPARSE_ERRORS


def lane_bits(config: DecoderConfig) -> int:
    return (config.lanes - 1).bit_length()


def entry_layout(config: DecoderConfig) -> data.StructLayout:
    """What the merge hands an adder for one pass: whether it applies an entry, the lane, the BF16 value."""
    return data.StructLayout({"valid": unsigned(1), "lane": unsigned(max(1, lane_bits(config))),
                              "value": unsigned(16)})


def error_layout() -> data.StructLayout:
    return data.StructLayout({name: unsigned(1) for name in ERRORS})


#: The window keeps entries fewer than NEAR chunks ahead of the one stage 0 presents (a farther
#: one waits in the inbox, and proves on its own that the chunks before it are complete), so
#: NEAR_BITS low bits of a chunk number tell c, c + 1 and c + 2 apart.
NEAR_BITS = 6
NEAR = (1 << NEAR_BITS) - 4


def default_window(residuals: int) -> int:
    """Window slots of the merge: the power of two at or above ``R + 2``."""
    return 1 << (residuals + 1).bit_length()


class MergeIssueSignature(wiring.Signature):
    """Stage 0 (hdl.beat_issue) to the merge: whether it presents a chunk now (``present``) and will
    next cycle (``present_next``), whether a beat is taken at this edge (``taken``) with ``swap``
    into ``page``, and the page the host writes (``write_page``); the merge's ``hold_next`` back."""

    def __init__(self):
        super().__init__({"present": Out(1), "present_next": Out(1), "taken": Out(1), "swap": Out(1),
                          "page": Out(1), "write_page": Out(1), "hold_next": In(1)})


class MergeModel:
    """Cycle model of ``SparseMerge``, one cycle a ``step``: the rule of the class docstring with
    Python lists (the window holds ``(chunk, lane, value)`` in order)."""

    def __init__(self, config: DecoderConfig, *, window: int | None = None):
        self.R, self.N = config.residuals, config.lanes
        self.K = window if window is not None else default_window(self.R)
        self.win: list[tuple[int, int, int]] = []
        self.inbox = None
        self.hold, self.in_layer, self.closed, self.have_last, self.last_index, self.c = 0, 0, 1, 0, 0, 0
        self.flags = [0, 0]
        self.entries, self.final = [(0, 0, 0)] * self.R, 0
        self.err = dict.fromkeys(ERRORS, 0)

    def comb(self, cy: dict) -> dict:
        """What the merge drives in a cycle before its edge: ``ready`` and ``hold_next``."""
        R, K, win = self.R, self.K, self.win
        adv = bool(cy["en"] and cy["present"])
        fin = adv and not self.hold
        used = 0
        while adv and used < min(R, len(win)) and win[used][0] == self.c:
            used += 1
        rest = win[used:]
        newlayer = bool(cy["taken"] and cy["swap"])
        inbox = self.inbox
        moves = inbox is not None and inbox[3] and len(win) < K
        if newlayer:
            safe = not self.flags[cy["page"]]
        else:
            cb = self.c + 1 if fin else self.c
            # the entries after this pass: the window's, then the inbox's (a far one: beyond)
            after = [e[0] == cb for e in rest] + ([bool(inbox[3]) and inbox[0] == cb] if inbox else [])
            beyond = any(not inside for inside in after[:R + 1])
            done = self.closed and inbox is None
            safe = beyond or (done and not (len(after) > R and after[R]))
        return {"ready": int(self.inbox is None or moves), "hold_next": int(bool(cy["present_next"]) and not safe),
                "used": used, "rest": rest, "moves": moves, "fin": fin, "newlayer": newlayer}

    def step(self, cy: dict) -> dict:
        """One cycle: ``cy`` holds that cycle's inputs (``present``, ``present_next``, ``taken``, ``swap``,
        ``page``, ``write_page``, ``en``, ``offset_we``, ``layer_sparse``, ``valid``,
        ``entry`` = ``(index, value, last)``). Returns ``ready`` and ``hold_next`` (before the edge),
        ``entries``, ``final`` and ``error`` (after it)."""
        cb = self.comb(cy)
        used, rest, moves, fin, newlayer = cb["used"], cb["rest"], cb["moves"], cb["fin"], cb["newlayer"]
        took = bool(cy["valid"]) and bool(cb["ready"])
        expected = self.in_layer and not self.closed
        old_inbox = self.inbox
        index = cy["entry"][0]
        near = int((index // self.N if took else (old_inbox or (0,))[0]) < self.c + NEAR)
        if cy["en"]:
            self.entries = [(int(j < used), self.win[j][1] if j < len(self.win) else 0,
                             self.win[j][2] if j < len(self.win) else 0) for j in range(self.R)]
            self.final = int(not self.hold)
        self.win = [] if newlayer else rest + ([self.inbox[:3]] if moves else [])
        if moves or newlayer:
            self.inbox = None
        if self.inbox is not None:
            self.inbox = (*self.inbox[:3], near)
        if took:
            index, value, last = cy["entry"]
            if expected:
                self.inbox = (index // self.N, index % self.N, value, near)
                self.err["order"] |= int(bool(self.have_last) and index <= self.last_index)
                self.err["not_finite"] |= int((value >> 7) & 0xFF == 0xFF)
                self.last_index, self.have_last = index, 1
                self.closed = self.closed or bool(last)
            else:
                self.err["no_layer"] = 1
        if newlayer:
            self.err["past_layer"] |= int(bool(expected or old_inbox is not None or rest))
            self.in_layer, self.closed, self.have_last = 1, int(not self.flags[cy["page"]]), 0
            if took:
                self.inbox = None
        if cy["offset_we"]:
            self.flags[cy["write_page"]] = int(cy["layer_sparse"])
        self.c = 0 if newlayer else self.c + 1 if fin else self.c
        self.hold = cb["hold_next"]
        return {"ready": cb["ready"], "hold_next": cb["hold_next"], "entries": list(self.entries),
                "final": self.final, "error": dict(self.err)}


def merge_model(config: DecoderConfig, cycles, *, window: int | None = None) -> list[dict]:
    """``SparseMerge``'s outputs per cycle from a list of each cycle's inputs (``MergeModel.step``)."""
    model = MergeModel(config, window=window)
    return [model.step(cy) for cy in cycles]


@dataclass(frozen=True)
class _MergeState:
    """``SparseMerge``'s registers and the values derived from them alone (``near``, ``inbox_eq``),
    shared by the sections of its ``elaborate``."""
    slots: list            # the window's ring: each entry's lane and value
    order: list            # in the window's order: each entry's chunk's low bits and flags
    flag_layout: data.StructLayout
    head: Signal
    count: Signal
    hold: Signal
    in_layer: Signal
    closed: Signal
    flags: Array           # each page's layer_sparse flag
    c_near: Signal
    c_lo: list
    inbox: Signal
    near_parts: Signal
    near: Value             # the inbox is near: its chunk below c + NEAR
    inbox_eq: list          # the inbox's chunk is c, c + 1, c + 2 (from its low bits)
    last_index: Signal
    have_last: Signal
    err: Signal

    @property
    def kb(self) -> int:
        """The ring's index bits."""
        return max(1, (len(self.slots) - 1).bit_length())

    def rel(self, i, what):
        """``what`` (a list per slot) of the slot ``i`` places after ``head``."""
        return Array(what)[(self.head + i)[:self.kb]]


class SparseMerge(wiring.Component):
    """The sparse stream merged into stage 0: which entries each pass applies, and when to hold.

    Ports
    * ``sparse`` (in stream, ``config.sparse_layout``): a layer's entries, strictly increasing
      flat indices, ``last`` on the layer's last one; offered only once the layer's first
      (swap) beat has been accepted (after that edge), one packet per layer whose
      ``layer_sparse`` flag was set.
    * ``layer_sparse`` (in) with ``offset_we`` (in): the flag of the inactive page's layer
      (written with its offset): the layer has a packet of entries.
    * ``issue`` (in, ``MergeIssueSignature``): stage 0's state; ``hold_next`` out.
    * ``en`` (in): the pipeline enable (stage 0's copy).
    * ``entries`` (out): per adder ``entry_layout``, and ``final``: registered on ``en`` at
      the edge a pass executes, so they arrive with the pass's table read (latency 1).
    * ``error`` (out, ``error_layout``): sticky until reset.

    The rule (``model`` is its cycle model). The chunk stage 0 presents holds flat
    indices ``[N c, N c + N)`` of its layer, ``c`` counted from the layer's swap beat.
    The merge keeps the entries taken so far in a window (``window`` slots, in order)
    and flags for each whether it falls in chunk ``c`` or ``c + 1``. A pass applies the
    window's first entries that fall in ``c``, at most ``R``. ``hold`` (a register,
    decided a cycle ahead from the window as it will be after this cycle's pass) makes
    the pass not the chunk's last: stage 0 presents the chunk again next cycle and this
    pass is a bubble of the valid chain. A pass is the last (``hold`` low) only when
    the entries after it prove that none of the chunk is left: an entry beyond the chunk
    among the first ``R + 1`` of the window followed by the inbox (an inbox entry
    ``NEAR`` or more chunks ahead is beyond), or the packet complete (``last`` taken, the
    inbox empty) with at most ``R`` entries of the chunk left. ``hold`` is never set for
    a cycle in which stage 0 will be empty (a beat must come in to use up the entries).
    The stream's entries go through an inbox register into the window, when fewer than
    ``NEAR`` chunks ahead of ``c`` and the window has a free slot before this cycle's
    pass (``sparse.ready``: the inbox is free or moves on).

    Errors: ``order`` (an index not above the previous one of its layer),
    ``not_finite`` (a value with exponent 255), ``no_layer`` (an entry offered while no
    layer's packet is open: after reset before a swap beat, in a layer without entries,
    after the packet's ``last``, or before the layer's swap beat: it is dropped),
    ``past_layer`` (a layer ends, the next swap beat is taken, while its entries are
    not all applied: an index past the layer; they are dropped).
    """

    model = staticmethod(merge_model)

    #: the error bits stay set until reset (tests break this)
    sticky = True

    def hold_rule(self, hold_next):
        """``hold`` for next cycle (tests replace it with a broken rule)."""
        return hold_next

    def __init__(self, config: DecoderConfig, *, window: int | None = None):
        if not config.residuals:
            raise ValueError("the sparse merge needs a configuration with residuals")
        self.config, self.R = config, config.residuals
        self.window = window if window is not None else default_window(self.R)
        if self.window < self.R + 1 or self.window & (self.window - 1):
            raise ValueError(f"the window must be a power of two of at least R + 1 = {self.R + 1} entries")
        super().__init__({
            "sparse": In(stream.Signature(config.sparse_layout)),
            "layer_sparse": In(1),
            "offset_we": In(1),
            "issue": In(MergeIssueSignature()),
            "en": In(1),
            "entries": Out(data.ArrayLayout(entry_layout(config), self.R)),
            "final": Out(1),
            "error": Out(error_layout()),
        })

    @property
    def latency(self) -> int:
        """Edges from the pass at stage 0 to ``entries``: one register."""
        return 1

    def elaborate(self, platform):
        m = Module()
        st = self._state()
        with m.If(self.offset_we):                      # each page's flag, written with its offset
            m.d.sync += st.flags[self.issue.write_page].eq(self.layer_sparse)
        newlayer = self.issue.taken & self.issue.swap   # a new layer's swap beat is taken at this edge
        fin, used = self._pass(m, st)
        left, moves = self._window(m, st, fin, newlayer, used)
        self._chunk_counter(m, st, fin, newlayer)
        self._inbox(m, st, newlayer, moves, left)
        self._hold(m, st, fin, newlayer, used, left)
        m.d.comb += self.error.eq(st.err)
        return m

    def _state(self) -> _MergeState:
        """The merge's state: the window, the inbox, the chunk counter, the layer's flags and the error bits,
        and the inbox's comparisons with the chunk counter."""
        cfg, K = self.config, self.window
        n = lane_bits(cfg)
        BW = SPARSE_INDEX_BITS - n                      # the chunk part of an index
        L = NEAR_BITS
        # The window: a ring of K slots holding each entry's lane and value (written once, where
        # the inbox lands), ``count`` of them valid from ``head``; beside it, in the window's
        # order (position 0: the oldest entry), the low L bits of each entry's chunk and its flags
        # "in chunk c" and "in chunk c + 1", shifted as entries leave, so that the decisions read
        # them without the ring's head mux. Every entry is fewer than NEAR chunks ahead of c, so
        # L bits tell c, c + 1 and c + 2 apart.
        data_layout = data.StructLayout({"lane": unsigned(max(1, n)), "value": unsigned(16)})
        slots = [Signal(data_layout, name=f"slot{i}", reset_less=True) for i in range(K)]
        flag_layout = data.StructLayout({"beat": unsigned(L), "eq0": 1, "eq1": 1})
        order = [Signal(flag_layout, name=f"pos{i}", reset_less=True) for i in range(K)]
        head, count = Signal(range(K), name="head"), Signal(range(K + 1), name="count")
        hold = Signal(name="hold")
        in_layer, closed = Signal(name="in_layer"), Signal(name="closed", init=1)
        flags = Array(rep.replica(1, name=f"layer_sparse{p}", reset_less=True) for p in range(2))
        c_near = Signal(unsigned(BW), name="chunk_near", reset_less=True)   # c + NEAR (c: the chunk presented)
        c_lo = [Signal(unsigned(L), name=f"chunk_lo{j}", reset_less=True) for j in range(3)]  # c, c + 1, c + 2
        inbox = Signal(data.StructLayout({"valid": 1, "beat": unsigned(BW), "lane": unsigned(max(1, n)),
                                          "value": unsigned(16)}), name="inbox")
        # the inbox is near (its chunk below c + NEAR): kept as the two halves' comparisons, so
        # that no carry chain spans the whole chunk number
        near_parts = Signal(data.StructLayout({"hi_lt": 1, "hi_eq": 1, "lo_lt": 1}), name="inbox_near")
        near = near_parts.hi_lt | (near_parts.hi_eq & near_parts.lo_lt)
        inbox_eq = [inbox.beat[:L] == b for b in c_lo]
        last_index = Signal(unsigned(SPARSE_INDEX_BITS), name="last_index", reset_less=True)
        have_last = Signal(name="have_last")
        err = Signal(error_layout(), name="errors")
        return _MergeState(slots, order, flag_layout, head, count, hold, in_layer, closed, flags, c_near, c_lo,
                           inbox, near_parts, near, inbox_eq, last_index, have_last, err)

    def _pass(self, m, st):
        """This cycle's pass: the entries of chunk c it applies, registered into ``entries`` and ``final``."""
        # this cycle: the pass (if one executes) applies the first entries of chunk c; whether
        # it is a chunk's last is a register decided with ``hold``
        R, iss, en = self.R, self.issue, self.en
        last_pass = Signal(name="last_pass")
        m.d.sync += last_pass.eq(iss.present_next & ~iss.hold_next)
        adv = en & iss.present
        fin = en & last_pass
        apply = []
        for j in range(R):
            a = Signal(name=f"apply{j}")
            m.d.comb += a.eq(adv & (st.count > j) & st.order[j].eq0 & (apply[-1] if apply else 1))
            apply.append(a)
        used = Signal(range(R + 1), name="used")
        m.d.comb += used.eq(sum(apply[j] for j in range(R)))
        with m.If(en):
            m.d.sync += self.final.eq(~st.hold)
            for j in range(R):
                slot = st.rel(j, st.slots)
                m.d.sync += [self.entries[j].valid.eq(apply[j]), self.entries[j].lane.eq(slot.lane),
                             self.entries[j].value.eq(slot.value)]
        return fin, used

    def _window(self, m, st, fin, newlayer, used):
        """The window after this cycle: its entries shifted by the pass, the inbox landed behind them."""
        # the inbox lands at head + count when it is near and the window has room before this
        # cycle's pass (so that neither the move nor ``sparse.ready`` waits for the pass); a new
        # layer flushes the window and the inbox whatever moves: ``ready`` does not wait for it
        R, K, L = self.R, self.window, NEAR_BITS
        slots, order, head, count, inbox = st.slots, st.order, st.head, st.count, st.inbox
        c_lo, in_eq = st.c_lo, st.inbox_eq
        left = Signal(range(K + 1), name="left")
        m.d.comb += left.eq(count - used)
        moves = inbox.valid & st.near & (count < K)
        m.d.comb += self.sparse.ready.eq(~inbox.valid | moves)
        tail = (head + count)[:st.kb]
        for i in range(K):
            with m.If(moves & (tail == i)):
                m.d.sync += [slots[i].lane.eq(inbox.lane), slots[i].value.eq(inbox.value)]
        # the ordered flags: shifted by this pass's entries, the inbox appended at ``left``
        for i in range(K):
            nxt = Signal(st.flag_layout, name=f"pos{i}_next")
            for u in range(R + 1):
                with m.If(used == u):
                    if i + u < K:
                        src = order[i + u]
                        m.d.comb += [nxt.beat.eq(src.beat), nxt.eq0.eq(Mux(fin, src.eq1, src.eq0)),
                                     nxt.eq1.eq(Mux(fin, src.beat == c_lo[2], src.eq1))]
            with m.If(moves & (left == i)):
                m.d.comb += [nxt.beat.eq(inbox.beat[:L]), nxt.eq0.eq(Mux(fin, in_eq[1], in_eq[0])),
                             nxt.eq1.eq(Mux(fin, in_eq[2], in_eq[1]))]
            m.d.sync += order[i].eq(nxt)
        with m.If(newlayer):
            m.d.sync += count.eq(0)
        with m.Else():
            m.d.sync += [count.eq(left + moves), head.eq((head + used)[:st.kb])]
        return left, moves

    def _chunk_counter(self, m, st, fin, newlayer):
        """The chunk counter: c + NEAR and the low bits of c, c + 1 and c + 2."""
        c_near, c_lo = st.c_near, st.c_lo
        with m.If(newlayer):
            m.d.sync += [c_near.eq(NEAR)] + [lo.eq(j) for j, lo in enumerate(c_lo)]
        with m.Elif(fin):
            m.d.sync += [c_near.eq(c_near + 1), c_lo[0].eq(c_lo[1]), c_lo[1].eq(c_lo[2]), c_lo[2].eq(c_lo[2] + 1)]

    def _inbox(self, m, st, newlayer, moves, left):
        """The stream into the inbox; the checks on the way (the error bits)."""
        n = lane_bits(self.config)
        H = (SPARSE_INDEX_BITS - n) // 2                # half the chunk part of an index
        inbox, err, c_near, in_layer, closed = st.inbox, st.err, st.c_near, st.in_layer, st.closed
        last_index, have_last = st.last_index, st.have_last
        if not self.sticky:
            m.d.sync += err.eq(0)              # (the settings below come later, so they win)
        take = self.sparse.valid & self.sparse.ready
        e = self.sparse.payload
        expected = in_layer & ~closed
        # near: fewer than NEAR chunks ahead of c (c grows by one at most by next cycle); the
        # comparisons of both candidates beside the handshake, which only picks one
        for part, (x, y) in {"hi_lt": (lambda a, b: a < b, "hi"), "hi_eq": (lambda a, b: a == b, "hi"),
                             "lo_lt": (lambda a, b: a < b, "lo")}.items():
            cut = (lambda v: v[H:]) if y == "hi" else (lambda v: v[:H])
            m.d.sync += getattr(st.near_parts, part).eq(Mux(take, x(cut(e.index[n:]), cut(c_near)),
                                                               x(cut(inbox.beat), cut(c_near))))
        with m.If(moves | newlayer):
            m.d.sync += inbox.valid.eq(0)
        with m.If(take):
            with m.If(expected):
                m.d.sync += [inbox.valid.eq(1), inbox.beat.eq(e.index[n:]),
                             inbox.lane.eq(e.index[:max(1, n)] if n else 0),
                             inbox.value.eq(e.value), last_index.eq(e.index), have_last.eq(1)]
                with m.If(e.last):
                    m.d.sync += closed.eq(1)
                with m.If(have_last & (e.index <= last_index)):
                    m.d.sync += err.order.eq(1)
                with m.If(e.value[BF16.mbits:15].all()):
                    m.d.sync += err.not_finite.eq(1)
            with m.Else():
                m.d.sync += err.no_layer.eq(1)
        with m.If(newlayer):
            # the old layer's entries must all have been applied by now
            with m.If((in_layer & ~closed) | inbox.valid | (left != 0)):
                m.d.sync += err.past_layer.eq(1)
            m.d.sync += [in_layer.eq(1), closed.eq(~st.flags[self.issue.page]), have_last.eq(0)]
            with m.If(take):            # an entry at the swap edge: the old layer's (past it) or no layer's
                m.d.sync += inbox.valid.eq(0)

    def _hold(self, m, st, fin, newlayer, used, left):
        """``hold`` for next cycle: set unless the entries after this pass prove the chunk done."""
        # hold for next cycle: not provably the chunk's last pass. The entries after this pass:
        # the window from head + used, then the inbox; their flags for the next chunk (c + 1
        # after a last pass, else c): eq1 or eq0; the inbox's from its low bits (a far one is
        # beyond it).
        R, K, iss, inbox = self.R, self.window, self.issue, st.inbox

        def after(i, flag):
            out = Signal(name=f"after{i}_{flag}")
            for u in range(R + 1):
                with m.If(used == u):
                    m.d.comb += out.eq(getattr(st.order[u + i], flag) if u + i < K else 0)
            return out

        inbox_in = inbox.valid & st.near & Mux(fin, st.inbox_eq[1], st.inbox_eq[0])

        def in_next(i):
            """(the entry i places after this pass exists, it falls in the next chunk)"""
            in_win = Mux(fin, after(i, "eq1"), after(i, "eq0"))
            return Mux(left > i, 1, (left == i) & inbox.valid), Mux(left > i, in_win, inbox_in)

        beyond, in_r = [], Const(0)
        for i in range(R + 1):
            exists, inside = in_next(i)
            beyond.append(exists & ~inside)
            if i == R:
                in_r = exists & inside
        done = st.closed & ~inbox.valid
        safe = Mux(newlayer, ~st.flags[iss.page], Cat(*beyond).any() | (done & ~in_r))
        # (never while stage 0 will be empty: a beat must be taken to consume the entries)
        m.d.comb += iss.hold_next.eq(self.hold_rule(iss.present_next & ~safe))
        m.d.sync += st.hold.eq(iss.hold_next)
