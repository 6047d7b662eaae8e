"""FP32 row accumulation: a pipelined binary32 adder and the row accumulator built on it (docs/dot.md).

Role: the GEMV engine's second stage (issue 15, section 2): the block values
``V_b`` of a row (hdl.block_dot) summed as golden.dot defines it,
``y_r = (((+0 + V_0) + V_1) + ...)``, each ``+`` an IEEE binary32 addition rounded
to nearest even, subnormals kept, saturating at +-FLT_MAX (``golden.dot.fp32_add``,
``accumulate_blocks``).

``Fp32Add``: ``s = a + b``, ``latency`` enabled edges later (every register
advances on ``en``; reset-less datapath). Finite operands by contract (the block
dot unit never makes Inf or NaN). Stages, each one carry chain or two to three
LUT levels:

1. unpack (``e' = max(e, 1)``, the hidden bit), ``|a| >= |b|`` (a 31-bit
   compare), both exponent differences;
2. swap: the larger magnitude ``big``, the smaller ``small`` (with three bits
   below it: guard, round, sticky), the shift ``d`` (clamped to 31: from 27 on
   everything is sticky), the result's sign (the larger's), the sign of an exact
   zero (``-`` only for ``-0 + -0``), and the normalization barrier (below);
3. - 5. ``small >> d``, two bits of ``d`` per stage, the bits shifted out into
   sticky, ORed into its bottom bit in the last;
6. ``-small`` for a subtraction (a 29-bit chain);
7. ``R = big + small`` (28 bits: a carry bit, 24, guard/round/sticky): exact but for sticky;
8. ``R | barrier``: the barrier bit at ``27 - e'_big`` makes the leading-zero count
   ``k = min(lz(R), e'_big)``, so a result below the smallest normal comes out
   aligned to the subnormal quantum (as hdl.block_dot);
9. - 10. ``k`` (hdl.arith.leading_zeros_pipelined);
11. - 13. ``R << k`` (two bits of ``k`` per stage); beside the first, ``e'_big - k``;
14. - 16. round to nearest even, saturate, sign (hdl.block_dot.round_fp32).

The 3 extra bits suffice for a correctly rounded sum: a shift of ``d >= 2`` leaves
at most one bit of normalization (guard and round stay exact, sticky is the OR
of the rest); ``d <= 1`` loses nothing.

``Fp32Add(stages)`` places the registers: ``"full"`` (the default, above: a
register after each of the 16 stages, 200 MHz on ECP5) or ``"compact"``: registers
after stages 4 (the second alignment step), 7 (the exact sum ``R``) and 13 (the
normalized sum), latency 3, the rest pass-through wires; the rounding (14-16) is
combinational after the last register, so ``s`` is a function of that register
(held while ``en`` is low). Why: on the iCEBreaker's iCE40UP5K the GEMV engine
runs at 12 MHz and takes a block value every 16 cycles, so the full adder's
registers (about 1000 of the row accumulator's 1219 FF) buy nothing, and the UP5K
has 5280 logic cells. The same stage code builds both (``STAGINGS``; a stage
without a register gets the shared helpers a stand-in module whose registers are
wires), so the sums are the same bits. ``RowAccumulator(4, adder="compact")`` on
the UP5K: 775 LUT4, 262 FF, 982 logic cells, 24.7 MHz (the full one, 17 slots:
833, 1219, 1712, 46.5 MHz; docs/dot.md). Every placement of 3 registers tried
tops out there, each with a segment of about 40 ns (the rounding and the ring's
operand mux here); 2 registers (3 slots) give 20 MHz.

``RowAccumulator``: ``slots`` running sums around a ring: the operand registers,
the adder and ``slots - latency`` more registers (``latency`` = the adder's + 1 =
17, 4 with the compact adder: ``min_slots(adder)``, the fewest slots), so that a
sum comes back to the adder's input exactly ``slots`` enabled edges after it
entered. The ring turns every enabled cycle, but while it is
empty (below) (a position counter, mod ``slots``); a value for slot ``j`` is taken when the ring
is at ``j`` (``values.ready = en & (slot == pos)``): it is added to the slot's sum
(to +0 when ``first``), and when ``last`` the new sum leaves on ``sums`` with its
slot. A turn with no value adds +0 (``x + (+0) = x``; a sum is never -0). Each
slot's additions happen in the order its values arrive, from +0: golden's order,
whatever the interleaving. While no running sum is open (every ``first`` taken
has had its ``last``: a count, ``empty`` a register) and no value is offered,
nothing in the ring is wanted and nothing is coming: the ring holds its position
(the datapath moves on: the finished sums leave). So the next value goes in at
once if it is for the slot after the last one taken: after reset (slot 0), a
pass after a pass of full tiles (the last took slot ``slots - 1``), a row of one
value after a gap. A stream that starts at another slot waits for the ring as
before (a pass after a short last tile of ``R`` rows: ``slots - R`` cycles).
The values' ``ready`` is the same logic as a free-turning ring's (``slot ==
pos``, no payload into the position).

Throughput: one value per cycle when consecutive values go to consecutive slots
(``slots >= 17`` rows interleaved, 4 with the compact adder: a batch of ``slots``
activation vectors against the same block, or ``slots`` rows' blocks in turn),
from the first value on when it is for the slot the ring holds; a single row
(every value slot 0) takes one value per ``slots`` cycles: the loop-carried add
cannot be one cycle at 200 MHz, and golden's order forbids reassociating a row's
sum. ``schedule``
gives the cycle each value is taken when they are offered back to back.

Stream handshake as hdl.block_dot: one enable, decided a cycle ahead by an output
buffer (hdl.pipeline, hdl.output_buffer), so no path from ``sums.ready`` to the
datapath. Ports: ``values`` (in stream, ``value_layout(slots)``: ``value``
(binary32), ``slot``, ``first``, ``last``), ``sums`` (out stream,
``sum_layout(slots)``: ``value``, ``slot``). Latency: ``latency`` cycles from the
``last`` value taken to its sum on ``sums``. ``model`` computes through
golden.dot.accumulate_blocks.
"""

from __future__ import annotations

import contextlib

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot

from .arith import delay, leading_zeros_pipelined, shift_left, shift_stages, stage_reg
from .block_dot import output_pipeline, round_fp32

EXTRA = 3                       # guard, round, sticky below the smaller operand's significand
R_BITS = 1 + 24 + EXTRA         # the sum: a carry bit, the significand, the extra bits
MAX_ALIGN = 31                  # the alignment shift, clamped: from 27 on every bit is sticky
#: Fp32Add's stages: unpack, swap, align, negate, add, barrier, leading zeros (2), normalize, round (3)
ADD_LATENCY = 2 + shift_stages(MAX_ALIGN) + 2 + 1 + 2 + shift_stages(R_BITS) + 3


def _unpack(x):
    """(sign, significand with its hidden bit, e' = max(e, 1)) of a binary32 pattern."""
    e = x[23:31]
    return x[31], Cat(x[:23], e.any()), Cat(x[23] | ~e.any(), x[24:31])


def _barrier(e_big):
    """The normalization barrier: a one at bit ``27 - e'_big`` of the sum's width (none if ``e'_big > 27``)."""
    return Cat(e_big == R_BITS - 1 - i for i in range(R_BITS))


#: Fp32Add's register placements: the stages (numbered as in the module docstring) that end in a
#: register; the others are pass-through wires. "full": all 16 (200 MHz on ECP5); "compact": after
#: stages 4, 7 and 13, four combinational segments around the row accumulator's ring (the iCE40UP5K
#: at 12 MHz: module docstring)
STAGINGS = {"full": frozenset(range(1, ADD_LATENCY + 1)), "compact": frozenset({4, 7, 13})}
#: the stages the shared helpers build as one group (leading zeros, normalize, round): all
#: registers, none, or only the last (one register after the helper's logic built as wires)
_GROUPS = ((9, 10), (11, 12, 13), (14, 15, 16))


def adder_latency(stages: str = "full") -> int:
    """The latency of ``Fp32Add(stages)``: its registered stages."""
    return len(_staging(stages))


def min_slots(adder: str = "full") -> int:
    """The fewest running sums ``RowAccumulator(slots, adder=adder)`` takes: the operand register and
    the adder's latency (17 full, 4 compact); the GEMV engine's smallest tile."""
    return adder_latency(adder) + 1


def _staging(stages: str) -> frozenset[int]:
    """``STAGINGS[stages]``, checked: stages 1 to 16, each helper group all, none or its last."""
    if stages not in STAGINGS:
        raise ValueError(f"adder stages {stages!r}: one of {', '.join(map(repr, STAGINGS))}")
    regd = STAGINGS[stages]
    if not regd <= set(range(1, ADD_LATENCY + 1)) or any(
            regd & set(g) not in (set(), set(g), {g[-1]}) for g in _GROUPS):
        raise ValueError(f"adder stages {stages!r}: registers after {sorted(regd)}: a stage is 1 to "
                         f"{ADD_LATENCY}, and of {_GROUPS} all, none or the last")
    return regd


class _Wires:
    """Stands in for the Module given to the shared stage helpers (hdl.arith's ``stage_reg``,
    ``delay``, ``shift_left``, ``leading_zeros_pipelined``; hdl.block_dot's ``round_fp32``) so the
    stages they build become pass-through wires: each helper writes ``with m.If(en): m.d.sync +=
    r.eq(value)``; here ``If`` is no condition and ``d.sync`` is the module's ``d.comb``, so the
    "register" ``r`` is a wire that carries ``value`` (its shape kept). The same stage code, fewer
    registers."""

    def __init__(self, m: Module):
        self.d = _CombDomains(m)

    @staticmethod
    def If(cond):                                                   # noqa: N802 (Module's name)
        return contextlib.nullcontext()


class _CombDomains:
    """``_Wires.d``: every domain is the wrapped module's ``comb``."""

    def __init__(self, m: Module):
        object.__setattr__(self, "_m", m)

    def __getattr__(self, name):
        return self._m.d.comb

    def __setattr__(self, name, value):             # ``d.sync += ...`` assigns the domain back: done
        pass


def add_model(a, b) -> np.ndarray:
    """``Fp32Add``'s sums (uint32 patterns) of patterns ``a``, ``b``: golden.dot.fp32_add."""
    a, b = (np.asarray(x, np.uint32).view(np.float32) for x in (a, b))
    return dot.fp32_add(a, b).view(np.uint32)


class Fp32Add(wiring.Component):
    """``s = a + b`` (binary32, finite operands), ``latency`` enabled edges after ``a``, ``b`` with
    ``en`` high. ``stages``: a name in ``STAGINGS``, which stages end in a register ("full": all 16;
    "compact": 3, its sum a combinational function of the last register, held while ``en`` is low)."""

    model = staticmethod(add_model)

    def __init__(self, stages: str = "full"):
        self.stages = stages
        self.registered = _staging(stages)
        super().__init__({"en": In(1), "a": In(unsigned(32)), "b": In(unsigned(32)), "s": Out(unsigned(32))})

    @property
    def latency(self) -> int:
        """Enabled edges from ``a``, ``b`` to ``s``: its registered stages (``adder_latency``)."""
        return len(self.registered)

    def elaborate(self, platform):
        m = Module()
        en, regd = self.en, self.registered
        wires = _Wires(m)

        def at(*stages):
            """The module the helpers build ``stages`` in: ``m`` (registers) if all end in one, else
            the pass-through stand-in (a group's last stage alone registered: ``cut`` after it)."""
            return m if regd.issuperset(stages) else wires

        def reg(stage, name, value, shape):
            return stage_reg(at(stage), en, name, value, shape)

        def pipe(value, stages, name):
            """``value`` carried through ``stages``: a register at each registered one."""
            return delay(m, en, value, len(regd.intersection(stages)), name)

        def cut(group, name, value):
            """A register after a helper built as wires when only the group's last stage has one."""
            alone = regd.intersection(group) == {group[-1]}
            return stage_reg(m, en, name, value, value.shape()) if alone else value

        # 1: unpack, compare magnitudes, both exponent differences
        (sa, ma, ea), (sb, mb, eb) = _unpack(self.a), _unpack(self.b)
        a_ge = reg(1, "a_ge", self.a[:31] >= self.b[:31], 1)
        sa, sb = reg(1, "sa", sa, 1), reg(1, "sb", sb, 1)
        ma, mb = reg(1, "ma", ma, unsigned(24)), reg(1, "mb", mb, unsigned(24))
        da, db = reg(1, "da", ea - eb, unsigned(8)), reg(1, "db", eb - ea, unsigned(8))   # the right one is >= 0
        ea, eb = reg(1, "ea", ea, unsigned(8)), reg(1, "eb", eb, unsigned(8))
        # 2: swap; the shift clamped; the barrier at 27 - e'_big (a function of e'_big: where stage 2
        #    has no register it is decoded at stage 8 instead, so no register carries its 28 bits)
        d = Mux(a_ge, da, db)
        big = reg(2, "big", Mux(a_ge, ma, mb), unsigned(24))
        small = reg(2, "small", Cat(Const(0, EXTRA), Mux(a_ge, mb, ma)), unsigned(24 + EXTRA))
        e_big = Mux(a_ge, ea, eb)
        dc = reg(2, "dc", Mux(d[5:].any(), MAX_ALIGN, d[:5]), unsigned(5))
        early = 2 in regd
        carried = ()
        if early:
            barrier = reg(2, "barrier", _barrier(e_big), unsigned(R_BITS))
            carried = (barrier,)
        e_big = reg(2, "e_big", e_big, unsigned(8))
        sign = reg(2, "sign", Mux(a_ge, sa, sb), 1)
        sub = reg(2, "sub", sa ^ sb, 1)
        zsign = reg(2, "zsign", sa & sb, 1)               # an exact zero is -0 only for -0 + -0
        # 3-5: align the smaller operand, the bits shifted out into sticky
        n_align = shift_stages(MAX_ALIGN)
        sticky = Const(0, 1)
        for i in range(n_align):
            lo = 2 * i
            bits = dc[lo:lo + 2]
            shifted = Array([small >> (j << lo) for j in range(1 << len(bits))])
            lost = Array([small[:j << lo].any() if j else Const(0, 1) for j in range(1 << len(bits))])
            if i + 1 < n_align:
                sticky = reg(3 + i, f"sticky{i}", sticky | lost[bits], 1)
                small = reg(3 + i, f"align{i}", shifted[bits], unsigned(24 + EXTRA))
            else:                                       # the last stage ORs sticky into the bottom bit
                small = reg(3 + i, f"align{i}", shifted[bits] | sticky | lost[bits], unsigned(24 + EXTRA))
            dc = reg(3 + i, f"dc{i}", dc, dc.shape())
        big, e_big, *carried, sign, sub, zsign = (
            pipe(v, range(3, 3 + n_align), v.name) for v in (big, e_big, *carried, sign, sub, zsign))
        # 6: the smaller operand (sticky at its bottom), negated for a subtraction; 7: the sum,
        #    exact but for sticky (|big| >= |small|: never negative)
        small = reg(6, "small_n", Mux(sub, -small, small), signed(R_BITS + 1))
        big, e_big, *carried, sign, zsign = (reg(6, f"{v.name}_n", v, v.shape())
                                             for v in (big, e_big, *carried, sign, zsign))
        r = reg(7, "r", Cat(Const(0, EXTRA), big) + small, unsigned(R_BITS))
        e_big, *carried, sign, zsign = (reg(7, f"{v.name}_s", v, v.shape())
                                        for v in (e_big, *carried, sign, zsign))
        # 8: the barrier; zero detection
        barrier = carried[0] if early else _barrier(e_big)
        rb = reg(8, "rb", r | barrier, unsigned(R_BITS))
        zero = reg(8, "zero", r == 0, 1)
        # 9-10: k = min(lz(R), e'_big)
        k = cut(_GROUPS[0], "k_cut", leading_zeros_pipelined(at(9, 10), en, rb, "k"))
        r, e_big, sign, zsign = (pipe(v, (8, 9, 10), f"{v.name}_k") for v in (r, e_big, sign, zsign))
        zero = pipe(zero, (9, 10), "zero_k")
        # 11-13: normalize; e'_big - k (the biased exponent minus one of a normal result, else 0)
        ebm1 = stage_reg(at(11, 12, 13), en, "ebm1", e_big - k, unsigned(8))
        n_norm = shift_stages(R_BITS)
        rs = cut(_GROUPS[1], "norm_cut", shift_left(at(11, 12, 13), en, r, k, R_BITS, "norm"))
        ebm1 = pipe(ebm1, range(12, 11 + n_norm), "ebm1")
        zero, sign, zsign = (pipe(v, range(11, 11 + n_norm), f"{v.name}_n") for v in (zero, sign, zsign))
        # 14-16: round, saturate, sign
        assert shift_stages(MAX_ALIGN) == n_align and ADD_LATENCY == 2 + n_align + 2 + 1 + 2 + n_norm + 3
        s = round_fp32(at(14, 15, 16), en, rs, ebm1, zero, sign, zsign, self.round_up, "r")
        m.d.comb += self.s.eq(cut(_GROUPS[2], "s_cut", s))
        return m

    @staticmethod
    def round_up(lsb, guard, sticky):
        """Round to nearest, ties to even."""
        return guard & (sticky | lsb)


def value_layout(slots: int) -> data.StructLayout:
    return data.StructLayout({"value": unsigned(32), "slot": range(slots), "first": unsigned(1),
                              "last": unsigned(1)})


def sum_layout(slots: int) -> data.StructLayout:
    return data.StructLayout({"value": unsigned(32), "slot": range(slots)})


def model(values, slots, first, last) -> list[tuple[int, int]]:
    """The sums (binary32 pattern, slot) in the order they leave: each slot's values summed from +0
    (at ``first``) in arrival order, one sum out at each ``last``, by golden.dot.accumulate_blocks."""
    values = np.asarray(values, np.uint32).view(np.float32)
    open_rows: dict[int, list[int]] = {}
    out = []
    for i, (s, f, l) in enumerate(zip(slots, first, last)):         # one pass over the values
        row = [i] if f else open_rows.get(int(s), []) + [i]
        open_rows[int(s)] = row
        if l:
            y = dot.accumulate_blocks(values[row][None, :])[0]
            out.append((int(np.float32(y).view(np.uint32)), int(s)))
    return out


class RowAccumulator(wiring.Component):
    """``slots`` running binary32 sums around a ring (module docstring); ``adder``: the ``Fp32Add``
    staging ("full" or "compact"), which sets ``latency`` (the adder's + 1) and the fewest slots
    (``min_slots(adder)``)."""

    model = staticmethod(model)

    def __init__(self, slots: int, adder: str = "full"):
        self._MustUse__silence = True            # until accepted: a refused one is never elaborated, no
        need = min_slots(adder)                  # unused-component warning
        if slots < need:
            raise ValueError(f"{slots} slots: the ring needs at least its operand register and the adder's "
                             f"latency, {need}")
        self._MustUse__silence = False
        self.slots, self.adder = slots, adder
        super().__init__({"values": In(stream.Signature(value_layout(slots))),
                          "sums": Out(stream.Signature(sum_layout(slots)))})

    @property
    def latency(self) -> int:
        """Cycles from a row's last value taken to its sum (the adder's + 1: ``min_slots``)."""
        return min_slots(self.adder)

    def elaborate(self, platform):
        m = Module()
        S, L = self.slots, self.latency
        ctl, out = output_pipeline(m, L, self.sums)
        en = ctl.enable.lane[0]
        m.submodules.add = add = Fp32Add(self.adder)
        v = self.values.payload
        # the ring's position: the slot at the adder's input. While no running sum is open (``empty``)
        # and no value is offered, nothing in the ring matters and nothing is coming: the ring holds
        # its position, so the next value, if it is for the slot after the last one taken (a new
        # pass after full tiles, a tile after a tile), goes in at once
        pos = Signal(range(S), name="pos")
        empty = Signal(name="empty", init=1)               # no running sum open (``open`` == 0, registered)
        open_ = Signal(range(S + 1), name="open")          # running sums open: a first taken, its last not
        take = Signal(name="take")
        m.d.comb += [self.values.ready.eq(ctl.enable.en & (v.slot == pos)),
                     take.eq(self.values.valid & self.values.ready)]
        # (the count and the flag as muxes of values worked out from the registers: the take, late in
        # the cycle, only selects)
        opens, closes = take & v.first & ~v.last, take & v.last & ~v.first
        with m.If(opens):
            m.d.sync += [open_.eq(open_ + 1), empty.eq(0)]
        with m.Elif(closes):
            m.d.sync += [open_.eq(open_ - 1), empty.eq(open_ == 1)]
        with m.If(ctl.enable.en & self.turns(empty, self.values.valid)):
            m.d.sync += pos.eq(Mux(pos == S - 1, 0, pos + 1))
        # the operands registered (the adder's compare then starts at a register), the adder, and
        # S - L - 1 more registers: a sum is back at the input S enabled edges after it entered
        ring = delay(m, en, add.s, S - L, "ring")
        a = stage_reg(m, en, "opa", Mux(take & v.first, 0, ring), unsigned(32))
        b = stage_reg(m, en, "opb", Mux(take, v.value, 0), unsigned(32))
        m.d.comb += [add.en.eq(en), add.a.eq(a), add.b.eq(b), ctl.valid.eq(take & v.last)]
        slot = delay(m, en, pos, L, "slot")
        m.d.comb += Value.cast(out.last).eq(Cat(add.s, slot))           # sum_layout: value, then slot
        return m

    def turns(self, empty, offered):
        """Whether the ring turns at an enabled edge: unless no running sum is open and no value is
        offered (tests override it to bring back the free-turning ring)."""
        return ~empty | offered

    def schedule(self, slots, *, start: int = 0) -> np.ndarray:
        """The cycle each value is taken when they are offered back to back from cycle ``start`` on
        (the ring held at slot 0 until then) and ``sums`` is always ready: a value goes in when the
        ring is at its slot; the ring turns every cycle a value is offered."""
        S = self.slots
        cycles, t, pos = [], start, 0
        for s in slots:
            t += (int(s) - pos) % S
            cycles.append(t)
            t, pos = t + 1, (int(s) + 1) % S
        return np.array(cycles, np.int64)
