"""Block dot unit with BF16 activations: a window fast path and an exact serial fallback (docs/dot.md, section 7).

Role: ``BlockDot(layout, hif, act="bf16")`` builds this class (hdl.block_dot dispatches to it); the
ports, the stream handshake's output side and the result are those of the E4M3 unit:

    V_b = RNE_fp32( (-1)^s * A * Ss * 2^(L + Xs + offset) )

bit for bit as golden.dot defines it, for every block. ``A`` is section 2's exact block sum, whose
exact accumulator would be 279 bits for BF16; this unit never builds it in parallel.

Datapath (numbers for sop4-g16: ``P = 15``, ``F = 32``, window 52 bits, ``Q`` 55 bits):

* **front** (``front`` = log2 g + 5 stages, 9 for g = 16, that move on their own enable ``fen``, a
  stall of the whole front):
  the fields of each code; ``Sh * Sx`` (hdl.arith multiplier, 3 stages) beside the product's
  exponent ``t_j = Xh_j + Ex_j - L`` (0 for a zero product) and its trailing zeros; the block's
  largest ``T = max t_j`` (a max tree, one level a stage); ``d_j = T - t_j``; the product loses a
  nonzero bit to the window exactly when ``d_j > F + tz_j`` (``drop_j``); the block is *slow* when
  any product drops a bit or when ``kmax < 0`` (the result is below the normal range by more than
  ``Q`` holds; below), else *fast*;
* **fast path** (the main pipeline, one enable as the E4M3 unit's, hdl.pipeline): each signed
  product placed at ``(+-p_j << F) >> min(d_j, 63)`` (arithmetic, two bits of the shift a stage),
  a tree of signed adders to the window sum ``Wsum = A * 2^(F - T)`` (exact, since no product lost
  a bit), then the E4M3 unit's tail unchanged: ``|Wsum|``, ``Q = |Wsum| * Ss``, the barrier at
  ``kmax = NQ - 1 + E + 126`` with ``E = L + T - F + Xs + o``, leading zeros, the normalizing
  shift, ``round_fp32``;
* **slow path** (a serial unit beside the front's last stage, which stalls while it works, its lane
  registers shifting as a chain into lane 0, where the unit reads them, one lane a cycle): the
  exact ``A * Ss`` in a Kulisch accumulator of ``NL`` signed limbs of 32 bits (each limb a wider
  register, carries deferred), one product ``+-p_j * Ss << t_j`` added per cycle into two limbs;
  the carries resolved serially, limb by limb; the magnitude (a serial negation when negative); the
  top nonzero limb found by shifting up a limb at a time; the top two limbs and a sticky bit
  normalized one bit a cycle (left to the leading one, or right into the subnormal range) and
  rounded by the same ``round_fp32``. The result is handed to the main pipeline with the block
  and replaces the fast path's word at its end (a flag travels with the block), so values leave
  in order.

Cycles: a fast block enters every cycle (no bubbles while both sides are ready); a slow block
holds the front for ``1 + (g + 5 + mul)`` (accumulate; ``mul`` the ``p * Ss`` multiplier's stages)
``+ NL`` (carries) ``+ 1`` (the sign) ``+ NL`` (negation, when negative) ``+ <= 3 NL - 1`` (top
limb: a shift, then a cycle for the limbs' nonzero flags, then the decision) ``+ 1 + <= 67`` (bit
shifts, on kmax's registered flags) ``+ 5`` (rounding, hand-over) cycles: ``slow_cycles_max``, 142
for sop4-g16, then
enters the main pipeline like any block.

Latency: ``latency`` = ``front`` + the main pipeline's stages (9 + 21 = 30 for sop4-g16), for a fast
block while ``values`` is ready. ``blocks.ready`` is the front's enable: high while the front's last
stage is empty or is taken (the control's copy of the pipeline enable and two registers; no path
from ``values.ready``); each lane has its own copy of it, from its own registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import stream
from amaranth.lib.wiring import In, Out

from sop.golden import dot
from sop.golden.layout import OFFSET_RANGE

from . import replica as rep
from .arith import PipelinedMultiplier, shift_stages, stage_reg, trailing_zeros
from .arith import delay as arith_delay
from .config import OFFSET_SHAPE
from .block_dot import BlockDot, adder_tree, block_layout, code_fields, model, output_pipeline, round_fp32

#: Fraction bits of the window below the block's largest product (docs/dot.md section 7: no MiniLM
#: block with real BF16 activations drops a bit at F = 28; 32 leaves margin).
F_BITS = 32
LIMB = 32


def shift_right(m: Module, en, value, amount, name: str):
    """``value >> amount`` (arithmetic if ``value`` is signed), same width, two bits of ``amount``
    a stage: ``shift_stages(2^len(amount) - 1)`` stages."""
    shape = value.shape()
    for i in range(shift_stages(2 ** len(amount) - 1)):
        lo = 2 * i
        bits = amount[lo:lo + 2]
        choices = Array([value >> (j << lo) for j in range(1 << len(bits))])
        value = stage_reg(m, en, f"{name}{i}", choices[bits], shape)
        amount = stage_reg(m, en, f"{name}_amt{i}", amount, amount.shape())
    return value


@dataclass(frozen=True)
class _Front:
    """The front's enables (``fen``, the control's; ``fen_l``, each lane's) and valid chain ``vf``, with
    its registers: ``reg`` and ``delay`` move on ``en``, by default ``fen``."""
    m: Module
    fen: Signal
    fen_l: list
    vf: list

    def reg(self, name, value, shape, en=None):
        return stage_reg(self.m, self.fen if en is None else en, name, value, shape)

    def delay(self, value, n, name, en=None):
        return arith_delay(self.m, self.fen if en is None else en, value, n, name)


@dataclass(frozen=True)
class _Products:
    """Per lane at the max tree's end: the product ``p``, its sign ``s``, its exponent ``t``, the drop
    limit ``lim`` and the nonzero flag ``nz``; the block's largest ``T``."""
    p: list
    s: list
    t: list
    lim: list
    nz: list
    T: Value


@dataclass(frozen=True)
class _BlockFields:
    """The block's fields at the max tree's end: kmax's constant part, the scale, offset and sign."""
    eoc: Value
    es: Value
    off: Value
    ss: Value
    sb: Value


@dataclass(frozen=True)
class _LastStage:
    """The front's last stage: what the main pipeline and the slow path read."""
    slow9: Signal
    c9: list
    rot: list
    p9: list
    s9: list
    t9: list
    kmax9: Value
    ss9: Value
    sb9: Value
    es9: Value
    off9: Value


class _SlowState:
    """The slow path's states (``slow_state``): idle, accumulate, carries, sign, negation, a limb up, the
    limbs' flags settle, the top limb's decision, kmax's flags, bit shifts, rounding; ``ALL``, their range.

    Plain ints in a namespace, not an ``enum.IntEnum``: Amaranth casts an enum member to a constant of
    the enum's width (4 bits), not the value's own, which would change the state's compares and muxes."""
    ALL = range(11)
    IDLE, ACC, RES, SIGN, NEG, UP, CHECK, DECIDE, PREP, SHIFT, ROUND = ALL


@dataclass(frozen=True)
class _SlowRegs:
    """The slow path's registers: its state, the next state ``nxt`` and ``st`` (the state's copy per
    limb), the limbs (``digit``: their low 32 bits; ``nzl``: each digit nonzero, a cycle late), the
    counters ``cnt`` and ``jn`` (the lane fed), the carry, the sign ``neg`` and ``r`` (the shifts of the
    limbs up a limb)."""
    state: Signal
    nxt: Signal
    st: list
    limbs: list
    digit: list
    nzl: Signal
    cnt: Signal
    jn: Signal
    carry: Signal
    neg: Signal
    r: Signal


@dataclass(frozen=True)
class _SlowWindow:
    """The slow path's window: the constant part ``kbase`` of kmax, kmax and its flags, the window
    ``M``, its sticky bit, the zero flag, and the rounded ``word``."""
    kbase: int
    kmax: Signal
    kfar: Signal
    kneg: Signal
    kpos: Signal
    M: Signal
    sticky: Signal
    zero: Signal
    word: Signal


class BlockDotBF16(BlockDot):
    model = staticmethod(model)         # hdl.block_dot.model: BlockDot's value, bit for bit

    #: The slow result waits for the previous slow block to leave the pipeline (``since``) before it is
    #: handed over: the register that holds it is read at the pipeline's end (mutants clear it).
    HOLD_WORD = True

    @staticmethod
    def drops(nz, d, lim):
        """A product loses a nonzero bit to the window: nonzero, and shifted past its trailing zeros."""
        return nz & (d > lim)

    def __init__(self, layout, hif, act="bf16"):
        from amaranth.lib import wiring

        self.layout, self.hif = layout, hif
        self.act = dot.act_format(act)
        self.scale = layout.scale
        self.acc = dot.accumulator(self.hif, self.act, layout.group)
        g, Ms = layout.group, self.scale.mbits
        P = self.acc.product_bits
        self.F = F_BITS
        self.shift_bits = (P + self.F).bit_length()          # d clamped to 2^bits - 1 >= P + F
        self.window = P + 1 + self.F + int(g).bit_length() - 1 # signed: |Wsum| < g * 2^(P + F)
        self.nq = (self.window - 1) + (Ms + 1)
        s_lo, _ = dot.exponent_range(self.scale)
        self.s_lo = s_lo
        # kmax = NQ - 1 + (L + T - F + s_lo + es' + o) + 126 = T + es' + o + kconst
        self.kconst = self.nq - 1 + self.acc.lsb_exp - self.F + s_lo + 126
        # the slow path: NL limbs hold A * Ss in two's complement (|A * Ss| < 2^(W - 1 + Ms + 1))
        self.nl = -(-(self.acc.bits + Ms + 1) // LIMB)
        self.limb_bits = LIMB + int(g).bit_length() + 2         # g lows < 2^32 and g highs per limb
        self.mul_s = PipelinedMultiplier.stages(Ms + 1)
        # a slow block in the front's last stage to its hand-over: start 1, accumulate g + 5 + mul,
        # carries NL, negation NL, its decision 1, top limb <= 3 NL - 1, kmax's flags 1, bit shifts <= 67, rounding 4,
        # hand-over 1
        self.slow_cycles_max = 1 + (g + 5 + self.mul_s) + 2 * self.nl + 1 + (3 * self.nl - 1) + 1 + 67 + 4 + 1
        self.front = int(g).bit_length() - 1 + 5
        #: high in a cycle where a slow block enters the main pipeline (for the tests' path counts)
        self.took_slow = Signal(name="took_slow")
        wiring.Component.__init__(self, {
            "blocks": In(stream.Signature(block_layout(self.hif, self.act, layout))),
            "values": Out(stream.Signature(unsigned(32))),
        })

    @property
    def latency(self) -> int:
        """Cycles from a block taken to its value on the fast path: the front's, then ``stages``."""
        return self.front + self.stages()

    @property
    def _t_bits(self) -> int:
        """Bits of a product's exponent ``t`` (and of the block's largest, ``T``)."""
        return (self.acc.span + 1).bit_length()

    def stages(self) -> int:
        """Main pipeline stages (after the front) from a fast block taken to its value."""
        g = self.layout.group
        mul2 = PipelinedMultiplier.stages(self.scale.mbits + 1)
        return (1 + shift_stages(2 ** self.shift_bits - 1) + int(g).bit_length() - 1 + 1 + mul2 + 1 + 3
                + shift_stages(self.nq) + 3)

    # -- build ----------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        g = self.layout.group
        lanes = min(g, 32)
        depth_main = self.stages()
        ctl, out = output_pipeline(m, depth_main, self.values, lanes)
        inp = self.blocks.payload
        en_lane = [ctl.enable.lane[j * lanes // g] for j in range(g)]
        fr = self._front_control(m)
        prods = self._front_products(fr, inp)
        blk = self._front_block_fields(fr, inp)
        kmax7, slow8, c8 = self._front_window_check(fr, prods, blk)
        last = self._front_last_stage(fr, prods, blk, kmax7, slow8, c8)
        slow_word = self._hand_over(m, ctl, fr, last, slow8, en_lane, depth_main)
        A, depth = self._window_sum(m, en_lane, last)
        word, use_slow = self._scaled_tail(m, ctl.enable.en, A, depth, last, depth_main)
        m.d.comb += Value.cast(out.last).eq(Mux(use_slow, slow_word, word))
        return m

    # -- the front: its own enable, a stall of all its stages ------------------------------------
    def _front_control(self, m) -> _Front:
        """The front's enables (driven by the hand-over) and its valid chain."""
        # fen: the control's copy (the valid chain, the block's fields); fen_l[j]: lane j's (the same
        # signal, from the lane's copy of the pipeline enable: no net reaches every lane's registers)
        fen = Signal()
        fen_l = [Signal(name=f"fen{j}") for j in range(self.layout.group)]
        vf = [Signal(name=f"vf{i}") for i in range(self.front)]          # valid bits, reset 0
        with m.If(fen):
            m.d.sync += vf[0].eq(self.blocks.valid)
            m.d.sync += [vf[i + 1].eq(vf[i]) for i in range(self.front - 1)]
        m.d.comb += self.blocks.ready.eq(fen)
        return _Front(m, fen, fen_l, vf)

    def _front_products(self, fr, inp) -> _Products:
        """Stages 1 to 2 + log2 g: each lane's fields, product, exponent t and drop limit; the max tree's T."""
        g, hif, act = self.layout.group, self.hif, self.act
        P, F = self.acc.product_bits, self.F
        lg = int(g).bit_length() - 1
        m, freg, fdelay = fr.m, fr.reg, fr.delay
        tbits = self._t_bits
        mul1 = PipelinedMultiplier.stages(act.mbits + 1)
        assert 1 + mul1 <= 1 + lg + 1, "the product must be ready when T is"
        p_f, s_f, tm_f, lim_f, nz_f = [], [], [], [], []
        for j in range(g):
            e = fr.fen_l[j]
            sh, Sh, eh = code_fields(hif, inp.hif[j])
            sx, Sx, ex = code_fields(act, inp.act[j])
            Sh1, Sx1 = freg(f"fsh{j}", Sh, unsigned(len(Sh)), e), freg(f"fsx{j}", Sx, unsigned(len(Sx)), e)
            eh1, ex1 = freg(f"feh{j}", eh, unsigned(hif.ebits), e), freg(f"fex{j}", ex, unsigned(act.ebits), e)
            s1 = freg(f"fs{j}", sh ^ sx, 1, e)
            nz1 = freg(f"fnz{j}", Sh.any() & Sx.any(), 1, e)
            tzh = freg(f"ftzh{j}", trailing_zeros(Sh), unsigned(len(Sh).bit_length()), e)
            tzx = freg(f"ftzx{j}", trailing_zeros(Sx), unsigned(len(Sx).bit_length()), e)
            m.submodules[f"fmul{j}"] = mul = PipelinedMultiplier(hif.mbits + 1, act.mbits + 1)
            m.d.comb += [mul.en.eq(e), mul.a.eq(Sh1), mul.b.eq(Sx1)]
            tm2 = freg(f"ftm{j}", Mux(nz1, eh1 + ex1, 0), unsigned(tbits), e)
            lim2 = freg(f"flim{j}", F + tzh + tzx, unsigned((F + P).bit_length()), e)
            nz_f.append(fdelay(freg(f"fnz2_{j}", nz1, 1, e), lg, f"fnz{j}", e))
            s_f.append(fdelay(freg(f"fs2_{j}", s1, 1, e), lg, f"fs{j}", e))
            lim_f.append(fdelay(lim2, lg, f"flim{j}", e))
            tm_f.append(tm2)
            p_f.append(fdelay(mul.p, 1 + lg - mul1, f"fp{j}", e))
        # the max tree: one level a stage (stages 3 .. 2 + log2 g)
        level, terms = 0, list(tm_f)
        while len(terms) > 1:
            terms = [freg(f"fmax{level}_{i}", Mux(terms[2 * i] > terms[2 * i + 1], terms[2 * i], terms[2 * i + 1]),
                          unsigned(tbits), fr.fen_l[2 * i << level]) for i in range(len(terms) // 2)]
            level += 1
        (T,) = terms
        tm_f = [fdelay(t, lg, f"ftmd{j}", fr.fen_l[j]) for j, t in enumerate(tm_f)]
        return _Products(p_f, s_f, tm_f, lim_f, nz_f, T)

    def _front_block_fields(self, fr, inp) -> _BlockFields:
        """The block's fields: the scale, the offset, the sign and the exponent constant of kmax."""
        lg = int(self.layout.group).bit_length() - 1
        freg, fdelay = fr.reg, fr.delay
        _, Ss, es = code_fields(self.scale, inp.scale)
        ss1, es1 = freg("fss", Ss, unsigned(len(Ss))), freg("fes", es, unsigned(self.scale.ebits))
        off1, sb1 = freg("foff", inp.offset, OFFSET_SHAPE), freg("fsb", inp.sign, 1)
        eoc = freg("feoc", es1 + off1 + self.kconst, signed(12))
        eoc, es_b, off_b = fdelay(eoc, lg, "feoc"), fdelay(es1, 1 + lg, "fes"), fdelay(off1, 1 + lg, "foff")
        ss_b, sb_b = fdelay(ss1, 1 + lg, "fss"), fdelay(sb1, 1 + lg, "fsb")
        return _BlockFields(eoc, es_b, off_b, ss_b, sb_b)

    def _front_window_check(self, fr, prods, blk):
        """Stages 3 + log2 g and 4 + log2 g: ``d = T - t`` and kmax; the dropped bits (slow), the clamped shift."""
        g, fen_l, freg = self.layout.group, fr.fen_l, fr.reg
        tbits = self._t_bits
        T, tm_f, lim_f, nz_f = prods.T, prods.t, prods.lim, prods.nz
        # stage 3 + log2 g (7): d = T - t, kmax
        d7 = [freg(f"fd{j}", T - tm_f[j], unsigned(tbits), fen_l[j]) for j in range(g)]
        kmax7 = freg("fkmax", T + blk.eoc, signed(12))
        lim7 = [freg(f"flim7_{j}", lim_f[j], lim_f[j].shape(), fen_l[j]) for j in range(g)]
        nz7 = [freg(f"fnz7_{j}", nz_f[j], 1, fen_l[j]) for j in range(g)]
        # 8: the dropped bits, the clamped shift
        cmax = 2 ** self.shift_bits - 1
        # (ORed by groups of 4 lanes in the same stage: the block's flag is one LUT from them)
        groups = [range(i, min(i + 4, g)) for i in range(0, g, 4)]
        drop8 = freg("fdrop", Cat(Cat(self.drops(nz7[j], d7[j], lim7[j]) for j in grp).any() for grp in groups),
                     unsigned(len(groups)))
        c8 = [freg(f"fc{j}", Mux(d7[j] > cmax, cmax, d7[j]), unsigned(self.shift_bits), fen_l[j]) for j in range(g)]
        under8 = freg("funder", kmax7[-1], 1)
        slow8 = drop8.any() | under8                          # the block is slow
        return kmax7, slow8, c8

    def _front_last_stage(self, fr, prods, blk, kmax7, slow8, c8) -> _LastStage:
        """The front's last stage: everything the main pipeline and the slow path read."""
        g, m, fen_l, freg, fdelay = self.layout.group, fr.m, fr.fen_l, fr.reg, fr.delay
        # 9: the block is slow
        slow9 = freg("fslow", slow8, 1)
        c9 = [freg(f"fc9_{j}", c8[j], c8[j].shape(), fen_l[j]) for j in range(g)]
        # each lane's product, sign and t in the last stage: also a shift chain (lane j + 1 into lane j)
        # that hands the slow path one lane a cycle while ``rot`` (its copy per lane) is high; the
        # front is stalled then, and the fast path's result of a slow block is never used
        rot = [rep.replica(1, name=f"slow_rot{j}") for j in range(g)]
        last = [[fdelay(v, 2, f"f{n}8_{j}", fen_l[j]) for j, v in enumerate(vs)]
                for n, vs in (("p", prods.p), ("s", prods.s), ("t", prods.t))]
        p9, s9, t9 = ([Signal.like(v, name=f"f{n}9_{j}", reset_less=True) for j, v in enumerate(vs)]
                      for n, vs in zip("pst", last))
        for vs, v9s in zip(last, (p9, s9, t9)):
            for j in range(g):
                with m.If(fen_l[j]):
                    m.d.sync += v9s[j].eq(vs[j])
                with m.Elif(rot[j]):
                    m.d.sync += v9s[j].eq(v9s[j + 1] if j + 1 < g else 0)
        kmax9 = fdelay(kmax7, 2, "fkmax")
        ss9, sb9 = fdelay(blk.ss, 3, "fss9"), fdelay(blk.sb, 3, "fsb9")
        es9, off9 = fdelay(blk.es, 3, "fes9"), fdelay(blk.off, 3, "foff9")
        return _LastStage(slow9, c9, rot, p9, s9, t9, kmax9, ss9, sb9, es9, off9)

    # -- the slow path and the hand-over -----------------------------------------------------------
    def _hand_over(self, m, ctl, fr, last, slow8, en_lane, depth_main):
        """The slow path, the hand-over of its result (returned) and the front's enables that wait for it.
        ``slow8`` is stage 8's slow flag, the next value of ``last.slow9`` as the front moves."""
        g, en0, vf, slow9 = self.layout.group, ctl.enable.en, fr.vf, last.slow9
        v9 = vf[-1]
        sdone = Signal()                          # the slow result of the block in the front's last stage
        sres = Signal(32, reset_less=True)
        # enabled edges since a slow block entered the main pipeline, and whether they are depth + 1
        since = Signal(range(depth_main + 2), init=depth_main + 1)
        since_ok = Signal(init=1)
        ok = ~slow9 | (sdone & (since_ok if self.HOLD_WORD else 1))
        fen_c = ~v9 | (en0 & ok)                 # the front's enable, as logic (its registered form below)
        m.d.comb += ctl.valid.eq(v9 & ok)
        take_slow = en0 & v9 & slow9 & ok
        m.d.comb += self.took_slow.eq(take_slow)
        # each lane's copy of ~v9 and of ok, registers loaded with their next values, so that a lane's
        # front enable is one LUT from its own registers and its copy of the pipeline enable
        done_set = Signal(name="slow_done_set")
        v9_n = Mux(fen_c, vf[-2], v9)
        slow9_n = Mux(fen_c, slow8, slow9)
        sdone_n = Mux(take_slow, 0, sdone | done_set)
        since_ok_n = Mux(take_slow, 0, Mux(en0 & ~since_ok, since == depth_main, since_ok))
        ok_n = ~slow9_n | (sdone_n & (since_ok_n if self.HOLD_WORD else 1))
        idle_l = [rep.replica(1, name=f"fidle{j}", init=1) for j in range(g + 1)]   # ~v9 (the last: the control's)
        ok_l = [rep.replica(1, name=f"fok{j}", init=1) for j in range(g + 1)]       # ok
        m.d.sync += [c.eq(~v9_n) for c in idle_l] + [c.eq(ok_n) for c in ok_l]
        m.d.comb += [fr.fen_l[j].eq(idle_l[j] | (en_lane[j] & ok_l[j])) for j in range(g)]
        m.d.comb += fr.fen.eq(idle_l[g] | (en0 & ok_l[g]))
        slow_word = Signal(32, reset_less=True)
        with m.If(take_slow):
            m.d.sync += [slow_word.eq(sres), since.eq(0), since_ok.eq(0)]
        with m.Elif(en0 & ~since_ok):
            m.d.sync += [since.eq(since + 1), since_ok.eq(since == depth_main)]
        self._slow_path(m, v9 & slow9 & ~sdone, done_set, sres, last.rot, last.p9[0], last.s9[0], last.t9[0],
                        last.ss9, last.sb9, last.es9, last.off9)
        m.d.sync += sdone.eq(sdone_n)
        return slow_word

    # -- the main pipeline: negate, place in the window, sum ------------------------------------------------
    def _window_sum(self, m, en_lane, last):
        """Each lane's signed product placed in the window, and the adder tree: ``Wsum`` and its stages."""
        g, P, F = self.layout.group, self.acc.product_bits, self.F
        terms = []
        for j in range(g):
            en = en_lane[j]
            pn = stage_reg(m, en, f"pn{j}", self.negate(last.s9[j], last.p9[j]), signed(P + 1))
            c = stage_reg(m, en, f"c{j}", last.c9[j], last.c9[j].shape())
            terms.append(shift_right(m, en, Cat(Const(0, F), pn).as_signed(), c, f"al{j}_"))
        depth = 1 + shift_stages(2 ** self.shift_bits - 1)
        A, levels = adder_tree(m, en_lane, terms)
        depth += levels
        assert len(A) == self.window, (len(A), self.window)
        return A, depth

    def _scaled_tail(self, m, en0, A, depth, last, depth_main):
        """The block path beside the lanes, then the E4M3 unit's tail: the fast word and the slow flag."""
        tbits = self._t_bits
        # the block path: kmax (>= 0 on the fast path), Ss, the sign, the slow flag, delayed beside the lanes
        kbits = (self.kconst + (1 << tbits) + (1 << self.scale.ebits) + OFFSET_RANGE[1]).bit_length()
        kmax = arith_delay(m, en0, last.kmax9.as_unsigned()[:kbits], depth, "kmax")
        ss, sb = arith_delay(m, en0, last.ss9, depth, "ss"), arith_delay(m, en0, last.sb9, depth, "sb")
        use_slow = arith_delay(m, en0, last.slow9, depth, "slowf")

        # -- the E4M3 unit's tail: |A|, Q = |A| * Ss, barrier, normalize, round -----------------------------
        word, tail = self.scaled_word(m, en0, A, kmax, ss, sb)
        use_slow = arith_delay(m, en0, use_slow, tail, "slowf_t")
        depth += tail
        assert depth == depth_main, (depth, depth_main)
        return word, use_slow

    # -- the exact serial fallback ---------------------------------------------------------------------
    def _slow_path(self, m, start, done_set, sres, rot, p0, s0, t0, ss9, sb9, es9, off9):
        """``A * Ss`` exactly in ``NL`` limbs, rounded once: ``sres``, and ``done_set`` (a register) high
        in the cycle it is loaded.

        Written for the clock: every wide register's next value is a short mux chosen by registers
        (a copy of the state per limb, the limb selects of a product, the flags of ``kmax``), and
        every decision on wide data waits a cycle for its flags (``CHECK`` before ``DECIDE``)."""
        sl = self._slow_registers(m)
        addend, pipe = self._slow_addends(m, rot, p0, s0, t0, ss9)
        negpass, v = self._slow_limbs(m, sl, addend)
        win = self._slow_window(m, sl, sb9)
        m.d.sync += done_set.eq(0)

        with m.Switch(sl.state):
            self._slow_accumulate(m, sl, start, rot, pipe, negpass)
            self._slow_carries(m, sl, v, negpass)
            self._slow_top_limb(m, sl, win, es9, off9)
            self._slow_normalize(m, sl, win, done_set, sres)

    def _slow_registers(self, m) -> _SlowRegs:
        """The slow path's state (with its copy per limb), its limbs and their flags, its counters."""
        g, NL, LW = self.layout.group, self.nl, self.limb_bits
        state = Signal(_SlowState.ALL, name="slow_state", init=_SlowState.IDLE)
        nxt = Signal(_SlowState.ALL, name="slow_next")
        m.d.comb += nxt.eq(state)
        m.d.sync += state.eq(nxt)
        # a copy of the state per limb: each limb's mux decodes its own (hdl.replica)
        st = [rep.replica(_SlowState.ALL, name=f"slow_state_l{i}", init=_SlowState.IDLE) for i in range(NL)]
        m.d.sync += [c.eq(nxt) for c in st]
        limbs = [Signal(signed(LW), name=f"limb{i}", reset_less=True) for i in range(NL)]
        digit = [lmb[:LIMB] for lmb in limbs]
        nzl = Signal(NL, name="slow_nzl", reset_less=True)          # each limb's digit nonzero, a cycle late
        m.d.sync += nzl.eq(Cat(d.any() for d in digit))
        cnt = Signal(range(g + 16), name="slow_cnt")
        jn = Signal(range(g + 1), name="slow_j")
        carry = Signal(signed(LW - LIMB + 1), name="slow_carry", reset_less=True)
        neg = Signal(name="slow_neg", reset_less=True)
        r = Signal(range(NL), name="slow_r", reset_less=True)
        return _SlowRegs(state, nxt, st, limbs, digit, nzl, cnt, jn, carry, neg, r)

    def _slow_addends(self, m, rot, p0, s0, t0, ss9):
        """The product stream: each limb's registered addend, and the cycles from ``feed`` to the addends."""
        NL, P, Ms = self.nl, self.acc.product_bits, self.scale.mbits
        # the product stream: lane 0 of the shift chain (``rot``: lane jn there), p * Ss (pipelined),
        # << t % 32, negated, into limbs t // 32 (+1)
        feed = rot[0]
        pa = stage_reg(m, 1, "slow_pa", p0, unsigned(P))
        sa = stage_reg(m, 1, "slow_sa", s0, 1)
        ta = stage_reg(m, 1, "slow_ta", t0, t0.shape())
        va = stage_reg(m, 1, "slow_va", feed, 1)
        m.submodules.slow_mul = mul = PipelinedMultiplier(P, Ms + 1)
        m.d.comb += [mul.en.eq(1), mul.a.eq(pa), mul.b.eq(ss9)]
        sq, tq, vq = (arith_delay(m, 1, v, mul.latency, f"slow_{n}") for v, n in ((sa, "sq"), (ta, "tq"), (va, "vq")))
        vbits = P + Ms + 1 + LIMB - 1
        sh = stage_reg(m, 1, "slow_sh", mul.p << tq[:5], unsigned(vbits))
        s_s, t_s, v_s = (stage_reg(m, 1, f"slow_{n}", v, v.shape()) for v, n in ((sq, "s_s"), (tq, "t_s"), (vq, "v_s")))
        sv = stage_reg(m, 1, "slow_sv", Mux(s_s, -sh, sh), signed(vbits + 1))
        li = t_s[5:]
        sel_lo = stage_reg(m, 1, "slow_sel_lo", Cat(v_s & (li == i) for i in range(NL)), unsigned(NL))
        sel_hi = stage_reg(m, 1, "slow_sel_hi", Cat(v_s & (li + 1 == i) for i in range(NL)), unsigned(NL))
        lo, hi = sv[:LIMB], sv[LIMB:].as_signed()              # sv = hi * 2^32 + lo, lo >= 0
        # each limb's addend, registered: lo into limb t // 32, hi into the one above, else 0
        addend = [stage_reg(m, 1, f"slow_add{i}", Mux(sel_lo[i], lo, Mux(sel_hi[i], hi, 0)), signed(LIMB + 2))
                  for i in range(NL)]
        pipe = 1 + mul.latency + 3                             # from feed to the addends
        return addend, pipe

    def _slow_limbs(self, m, sl, addend):
        """Each limb's next value by its state: cleared, accumulated, shifted down a limb (RES, NEG) or up (UP)."""
        NL, LW, limbs, digit = self.nl, self.limb_bits, sl.limbs, sl.digit
        # the carry pass (RES) and the negation pass (NEG): limb 0 and the carry in, a digit out on top
        negpass = Signal(name="slow_negpass", reset_less=True)
        v = Signal(signed(LW + 1), name="slow_v")
        m.d.comb += v.eq(Mux(negpass, (~digit[0]).as_unsigned(), limbs[0]) + sl.carry)
        for i in range(NL):
            with m.Switch(sl.st[i]):
                with m.Case(_SlowState.IDLE):
                    m.d.sync += limbs[i].eq(0)
                with m.Case(_SlowState.ACC):
                    m.d.sync += limbs[i].eq(limbs[i] + addend[i])
                with m.Case(_SlowState.RES, _SlowState.NEG):
                    m.d.sync += limbs[i].eq(limbs[i + 1] if i < NL - 1 else v[:LIMB])
                with m.Case(_SlowState.UP):
                    m.d.sync += limbs[i].eq(limbs[i - 1] if i else 0)
        return negpass, v

    def _slow_window(self, m, sl, sb9) -> _SlowWindow:
        """The window ``M``, its sticky bit, kmax and its flags (stepped in SHIFT), and ``M`` rounded."""
        NL, state = self.nl, sl.state
        # the window M (64 bits) and the sticky bit; kmax = 63 + Ew + 126, its flags a cycle later
        kbase = (self.acc.lsb_exp + self.s_lo + LIMB * (NL - 2)) + 63 + 126
        kmax = Signal(signed(13), name="slow_kmax", reset_less=True)
        kfar, kneg, kpos = (Signal(name=f"slow_{n}", reset_less=True) for n in ("kfar", "kneg", "kpos"))
        M = Signal(2 * LIMB, name="slow_m", reset_less=True)
        sticky = Signal(name="slow_sticky", reset_less=True)
        zero = Signal(name="slow_zero", reset_less=True)
        knext = Signal(signed(13), name="slow_knext")
        m.d.comb += knext.eq(Mux(kfar, 0, Mux(kneg, kmax + 1, Mux(kpos & ~M[-1], kmax - 1, kmax))))
        with m.If(state == _SlowState.PREP):
            m.d.sync += [kfar.eq(kmax < -(2 * LIMB + 1)), kneg.eq(kmax < 0), kpos.eq(kmax > 0)]
        with m.If(state == _SlowState.SHIFT):
            # the flags of kmax + 1, kmax - 1 or 0 as compares of kmax itself (beside the adds)
            far, step_up, step_dn = -(2 * LIMB + 1), kneg, kpos & ~M[-1]
            m.d.sync += [kmax.eq(knext),
                         kfar.eq(~kfar & Mux(step_up, kmax < far - 1, Mux(step_dn, kmax < far + 1, kmax < far))),
                         kneg.eq(~kfar & Mux(step_up, kmax < -1, Mux(step_dn, kmax < 1, kmax < 0))),
                         kpos.eq(~kfar & Mux(step_up, kmax > -1, Mux(step_dn, kmax > 1, kmax > 0)))]
        word = round_fp32(m, 1, Cat(sticky, M), kmax.as_unsigned()[:10], zero, sl.neg ^ sb9, Const(0, 1),
                          self.round_up, "slow_r")
        return _SlowWindow(kbase, kmax, kfar, kneg, kpos, M, sticky, zero, word)

    def _slow_accumulate(self, m, sl, start, rot, pipe, negpass):
        """IDLE and ACC: start on a slow block, feed its lanes from the shift chain, add them into the limbs."""
        g, nxt, jn, cnt = self.layout.group, sl.nxt, sl.jn, sl.cnt
        with m.Case(_SlowState.IDLE):
            with m.If(start):
                m.d.comb += nxt.eq(_SlowState.ACC)
                m.d.sync += [jn.eq(0), cnt.eq(0)] + [c.eq(1) for c in rot]
        with m.Case(_SlowState.ACC):
            with m.If(jn < g):
                m.d.sync += jn.eq(jn + 1)
            with m.If(jn == g - 1):
                m.d.sync += [c.eq(0) for c in rot]
            m.d.sync += cnt.eq(cnt + 1)
            with m.If(cnt == g + pipe):
                m.d.comb += nxt.eq(_SlowState.RES)
                m.d.sync += [cnt.eq(0), sl.carry.eq(0), negpass.eq(0)]

    def _slow_carries(self, m, sl, v, negpass):
        """RES, SIGN and NEG: the carries resolved, the sum's sign, the negation of a negative sum."""
        NL, state, nxt, cnt, carry, digit = self.nl, sl.state, sl.nxt, sl.cnt, sl.carry, sl.digit
        with m.Case(_SlowState.RES, _SlowState.NEG):
            # one limb a cycle from the bottom: the carries (RES), then -S = ~S + 1 (NEG)
            m.d.sync += [carry.eq(v[LIMB:]), cnt.eq(cnt + 1)]
            with m.If(cnt == NL - 1):
                m.d.sync += [cnt.eq(0), sl.r.eq(0)]
                m.d.comb += nxt.eq(Mux(state == _SlowState.RES, _SlowState.SIGN, _SlowState.CHECK))
        with m.Case(_SlowState.SIGN):
            # the top digit's sign bit: S < 0 (decided on the register, a cycle after the carries)
            m.d.sync += sl.neg.eq(digit[NL - 1][LIMB - 1])
            m.d.comb += nxt.eq(_SlowState.CHECK)
            with m.If(digit[NL - 1][LIMB - 1]):
                m.d.comb += nxt.eq(_SlowState.NEG)
                m.d.sync += [carry.eq(1), negpass.eq(1)]

    def _slow_top_limb(self, m, sl, win, es9, off9):
        """UP, CHECK and DECIDE: the limbs shifted up to the top nonzero one; the window, sticky and kmax loaded."""
        NL, nxt, r, nzl, digit = self.nl, sl.nxt, sl.r, sl.nzl, sl.digit
        with m.Case(_SlowState.UP):
            m.d.comb += nxt.eq(_SlowState.CHECK)
            m.d.sync += r.eq(r + 1)
        with m.Case(_SlowState.CHECK):                        # the limbs settle; nzl follows them
            m.d.comb += nxt.eq(_SlowState.DECIDE)
        with m.Case(_SlowState.DECIDE):
            # the top nonzero limb: shift the limbs up (times 2^32) while the top one is zero
            with m.If(nzl[NL - 1]):
                m.d.comb += nxt.eq(_SlowState.PREP)
                m.d.sync += [win.M.eq(Cat(digit[NL - 2], digit[NL - 1])), win.zero.eq(0),
                             win.sticky.eq(nzl[:NL - 2].any()), win.kmax.eq(win.kbase + es9 + off9 - LIMB * r)]
            with m.Elif(r == NL - 1):
                m.d.comb += nxt.eq(_SlowState.ROUND)
                m.d.sync += [sl.cnt.eq(0), win.zero.eq(1), win.M.eq(0), win.sticky.eq(0), win.kmax.eq(0)]
            with m.Else():
                m.d.comb += nxt.eq(_SlowState.UP)

    def _slow_normalize(self, m, sl, win, done_set, sres):
        """PREP, SHIFT and ROUND: the window normalized one bit a cycle, then rounded into ``sres``."""
        nxt, cnt, M, sticky = sl.nxt, sl.cnt, win.M, win.sticky
        with m.Case(_SlowState.PREP):                         # kmax's flags
            m.d.comb += nxt.eq(_SlowState.SHIFT)
        with m.Case(_SlowState.SHIFT):
            # one bit a cycle: right into the subnormal range while kmax < 0 (the bits out go to
            # the sticky bit; far below, everything does), left to the leading one while kmax > 0
            with m.If(win.kfar):
                m.d.sync += [M.eq(0), sticky.eq(sticky | M.any())]
            with m.Elif(win.kneg):
                m.d.sync += [M.eq(M >> 1), sticky.eq(sticky | M[0])]
            with m.Elif(win.kpos & ~M[-1]):
                m.d.sync += M.eq(M << 1)
            with m.Else():
                m.d.comb += nxt.eq(_SlowState.ROUND)
                m.d.sync += cnt.eq(0)
        with m.Case(_SlowState.ROUND):
            m.d.sync += cnt.eq(cnt + 1)
            with m.If(cnt == 3):
                m.d.comb += nxt.eq(_SlowState.IDLE)
                m.d.sync += sres.eq(win.word)
            with m.If(cnt == 2):
                m.d.sync += done_set.eq(1)      # a register: high in the cycle sres is loaded


# -- the path a block takes, in numpy (the fallback rate; the tests' class counts) ---------------------------

def _fields(fmt, codes):
    """(significand, e' = X - min X) of ``fmt`` codes, as ``block_dot.code_fields``."""
    M, E = fmt.mbits, fmt.ebits
    mant, e = codes & ((1 << M) - 1), (codes >> M) & ((1 << E) - 1)
    if fmt.subnormals:
        nz = (e != 0).astype(np.int64)
        return mant | (nz << M), e - nz
    return mant | (1 << M), e


def _trailing_zeros(v):
    tz = np.zeros_like(v)
    for _ in range(64):
        step = (v > 0) & ((v & 1) == 0)
        if not step.any():
            break
        tz += step
        v = np.where(step, v >> 1, v)
    return tz


def takes_fallback(layout, hif, hif_codes, act_codes, scale, offset, act="bf16", f_bits=None) -> np.ndarray:
    """Whether each block (rows of ``hif_codes``, ``act_codes``: (n, g)) takes the slow path of
    ``BlockDot(layout, hif, act)``: a nonzero product shifted past its trailing zeros (more than
    ``F`` below the block's largest product exponent), or ``kmax < 0``. ``f_bits`` (default
    ``F_BITS``, the unit's) asks what a unit with another window would do."""
    F = F_BITS if f_bits is None else f_bits
    fmt = dot.act_format(act)
    hif_codes, act_codes = np.asarray(hif_codes, np.int64), np.asarray(act_codes, np.int64)
    Sh, eh = _fields(hif, hif_codes)
    Sx, ex = _fields(fmt, act_codes)
    nz = (Sh > 0) & (Sx > 0)
    t = np.where(nz, eh + ex, 0)
    T = t.max(axis=-1)
    drop = (nz & (T[..., None] - t > F + _trailing_zeros(Sh) + _trailing_zeros(Sx))).any(axis=-1)
    _, es = _fields(layout.scale, np.asarray(scale, np.int64))
    nl, lg = layout.group, int(layout.group).bit_length() - 1
    p_bits = (hif.mbits + 1) + (fmt.mbits + 1)
    nq = (p_bits + 1 + F + lg - 1) + (layout.scale.mbits + 1)
    kmax = T + es + np.asarray(offset, np.int64) + (nq - 1 + dot.accumulator(hif, fmt, nl).lsb_exp - F
                                                    + dot.exponent_range(layout.scale)[0] + 126)
    return drop | (kmax < 0)
