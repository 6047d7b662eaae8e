"""Sparse residuals in the datapath: the merge at stage 0, the residual adders, the lane override.

A layer that carries sparse entries (golden.layout ``Sparse``: flat index
``row * cols + col``, strictly increasing, a BF16 value) decodes, by
golden.decoder, to ``round_bf16(product + residual)``: the exact product plus
the residual, rounded once (``+0`` where the layer has no entry, so a -0
product becomes +0; docs/formats.md section 9). Three components implement it
beside the decoder's lanes (docs/hardware.md, "Sparse residuals"):

* ``SparseMerge`` (stage 0): takes the ``sparse`` stream, one layer's entries
  after that layer's first (swap) beat, ``last`` on its last entry; keeps a
  window of ``window`` entries and, for the chunk of ``N`` values that stage 0
  presents, hands up to ``R`` entries that fall in it to the residual adders.
  A chunk with more than ``R`` entries is presented again (``hold``: the beat
  issue keeps its chunk, the pass is a bubble in the valid chain) until all its
  entries have been applied; so is a chunk whose entries the window cannot yet
  prove complete. Bad input sets sticky ``error`` bits (``ERRORS``).
* ``ResidualAdder``: one lane's product, recomputed from the lane's table word
  and block fields, plus one BF16 residual, rounded once to BF16 (exactly:
  alignment with a sticky bit jammed into the LSB, then one rounding).
* ``ResidualPath``: R adders, each fed by a mux that picks its entry's lane's
  word and block; every lane's output delayed to meet them; a merge register
  that puts each adder's result in its lane (lanes hit in the earlier passes of a
  chunk are kept in an override register until its last pass).

Each has a ``latency`` property and a bit-exact ``model`` (golden/ for the values,
the documented rule for the control).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden.decoder import sum_rounded_to_odd
from sop.golden.formats import get_format

from . import SPARSE_ERRORS, hif_formatter, lut_word, replica as rep, scale_decoder
from .arith import PipelinedMultiplier, Stages, delay, leading_zeros_tree
from .config import SPARSE_INDEX_BITS, DecoderConfig
from .hif_formatter import HifFormatter
from .pipeline import EnableSignature

BF16 = get_format("bf16")
SATURATED = hif_formatter.SATURATED
GUARD = 3                   # exact bits kept below the larger operand (>= 2 for the one rounding)
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


# -- the adder --------------------------------------------------------------------------------------
def window(config: DecoderConfig) -> tuple[int, int]:
    """(T, WA): the larger operand's reference bit sits at bit T of a WA-bit accumulator."""
    P = config.sig_bits
    T = max(P - 2, BF16.mbits) + GUARD
    return T, T + 3


def shift_right_sticky(value, amount, step: int = 1):
    """``(value >> (amount * step), any bit shifted out)`` for a Value ``amount``: a mux over the
    amounts a ``value`` can be shifted by (at most its width), each with its shifted-out bits
    ORed beforehand, so the sticky bit costs no mask decoder."""
    w = len(value)
    n = min(1 << len(amount), w // step + 1)
    shifted = Array((value >> (a * step))[:w] if a * step < w else Const(0, w) for a in range(n))
    lost = Array(value[:a * step].any() if a else Const(0) for a in range(n))
    if (1 << len(amount)) > n:           # amounts past the width: everything shifted out
        big = amount >= n
        return Mux(big, 0, shifted[amount]), Mux(big, value.any(), lost[amount])
    return shifted[amount], lost[amount]


def leading_one(m: Module, value, name: str):
    """The position of ``value``'s leading one (0 for a zero value): a tree of halves of a
    power-of-two width, whose upper half's position is the lower one's with a bit set (no adder)."""
    w = 1 << (len(value) - 1).bit_length()
    v = Cat(value, Const(0, w - len(value)))

    def pos(v):
        if len(v) == 1:
            return Const(0, 0), v[0]
        half = len(v) // 2
        (p_hi, nz_hi), (p_lo, nz_lo) = pos(v[half:]), pos(v[:half])
        return Mux(nz_hi, Cat(p_hi, 1), Cat(p_lo, 0)), nz_hi | nz_lo

    p, _ = pos(v)
    out = Signal(max(1, len(p)), name=name)
    m.d.comb += out.eq(p)
    return out


def adder_model(config: DecoderConfig, words, block: dict, residuals) -> np.ndarray:
    """``ResidualAdder``'s output words: golden's exact sum of the product and the BF16
    residual, rounded once to BF16 (golden.decoder.sum_rounded_to_odd, then golden's BF16)."""
    r = BF16.decode(np.asarray(residuals, dtype=np.int64))
    return BF16.encode(sum_rounded_to_odd(hif_formatter.product_values(config, words, block), r)).astype(np.int64)


class ResidualAdder(wiring.Component):
    """``round_bf16(word x block + residual)``, the exact sum rounded once (one lane's value).

    Ports: ``en`` (in), ``word`` (in, ``lut_word.word(config)``), ``block`` (in,
    ``scale_decoder.block(config)``), ``residual`` (in, a BF16 code), ``out`` (out, BF16).
    Latency ``latency`` enabled edges (``stages(config)``).

    The arithmetic (each step a register stage, one carry chain or a few LUT levels):

    1. the lane's product as the formatter computes it (hdl.hif_formatter: ``p`` of
       ``P`` bits, leading one at bit ``P - 1`` or ``P - 2``, ``e0 = word.exp + kb``; bit
       ``P - 2`` weighs ``2^(e0 + 1 - 127)``); the residual's significand normalized to
       8 bits (``rn``, leading one at bit 7) with its biased exponent ``Er``;
    2. ``d0 = e0 + 1 - Er``: the product's reference bit against the residual's MSB;
    3. the larger operand ``A`` (the product when ``d0 >= 0``) is placed with that bit
       at bit ``T`` of a ``WA = T + 3``-bit accumulator (``T = max(P - 2, 7) + 3``:
       three exact bits below either operand), the other, ``B``, ``|d0|`` bits lower;
    4-5. ``B`` shifted right, every bit shifted out ORed into its LSB (jammed): ``B``
       rounded to odd at the accumulator's LSB;
    6-7. ``S = |A +- B|`` and its sign: with ``A`` exact this is the exact sum rounded to
       odd at the LSB, and a rounding to nearest two or more bits higher (any BF16
       result: ``A`` has at least 8 + 3 bits above it) is the exact sum's;
    8. the leading one ``m`` of ``S``;
    9. ``k = max(m, 1 - (E_A - T))``: the bit below which ``S`` rounds (BF16's 8 bits
       below ``m``, or the subnormal grid); ``E_S = E_A - T + m`` the exponent;
    10-11. ``S`` (padded with 8 zero bits) shifted right by ``k``: 8 bits, guard, sticky;
    12. round to nearest even on ``{exponent, mantissa}`` (a carry walks into the
       exponent); saturation detected as in the formatter;
    13. ``0x7F7F`` on saturation; an exact zero is ``+0`` unless both terms are ``-0``.
    """

    model = staticmethod(adder_model)

    #: the bits shifted out of the smaller operand are ORed into its LSB (tests break this)
    jam = True
    round_up = staticmethod(HifFormatter.round_up)

    def __init__(self, config: DecoderConfig):
        if config.output != "bf16":
            raise ValueError("the residual adder produces BF16")
        self.config = config
        self.multiplier_stages = PipelinedMultiplier.stages(config.scale.mbits + 1)
        super().__init__({
            "en": In(1),
            "word": In(lut_word.word(config)),
            "block": In(scale_decoder.block(config)),
            "residual": In(16),
            "out": Out(16),
        })

    @staticmethod
    def stages(config: DecoderConfig) -> int:
        return max(PipelinedMultiplier.stages(config.scale.mbits + 1), 2) + 11

    @property
    def latency(self) -> int:
        """Enabled edges from the inputs to ``out``: ``stages(config)``."""
        return self.stages(self.config)

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        M, Ms, P = cfg.hif.mbits, cfg.scale.mbits, cfg.sig_bits
        T, WA = window(cfg)
        stage = Stages(m, self.en)

        kmax = WA + 8                               # a rounding point past S's bits: all sticky
        kbits = kmax.bit_length()
        word, blk, r = self.word, self.block, self.residual
        m.submodules.mul = mul = PipelinedMultiplier(M + 1, Ms + 1)
        m.d.comb += [mul.en.eq(self.en), mul.a.eq(Cat(word.frac, 1)), mul.b.eq(Cat(blk.frac, 1))]

        # 1: the product's exponent, zero and sign; the residual's fields
        e0_shape = signed(max(len(blk.kb), len(word.exp) + 1) + 1)
        re, rm = r[BF16.mbits:15], r[:BF16.mbits]
        rlz = leading_zeros_tree(m, rm, "rlz")
        er_shape = signed(10)
        e0, pzero, psign, er, rnorm, rlz1, rm1, rs, rzero = stage(
            ("e0_1", word.exp + blk.kb, e0_shape), ("pzero1", (word.exp == 0) | blk.zero, 1),
            ("psign1", word.sign ^ blk.sign, 1),
            ("er1", Mux(re != 0, re, -rlz), er_shape), ("rnorm1", re != 0, 1), ("rlz1", rlz, len(rlz)),
            ("rm1", rm, BF16.mbits), ("rs1", r[15], 1), ("rzero1", (re == 0) & (rm == 0), 1))

        # 2: the exponent differences (both signs) and the terms the later stages need
        d_shape = signed(max(len(e0), len(er)) + 3)
        rn = Mux(rnorm, Cat(rm1, 1), (rm1 << (rlz1 + 1))[:BF16.mbits + 1])
        d0, nd0, eat_p, eat_r, mmin_p, mmin_r, rn, pzero, psign, rs, rzero = stage(
            ("d0_2", e0 + 1 - er, d_shape), ("nd0_2", er - e0 - 1, d_shape),
            ("eat_p2", e0 + 1 - T, d_shape), ("eat_r2", er - T, d_shape),
            ("mmin_p2", T - e0, d_shape), ("mmin_r2", T + 1 - er, d_shape),
            ("rn2", rn, BF16.mbits + 1), ("pzero2", pzero, 1), ("psign2", psign, 1), ("rs2", rs, 1),
            ("rzero2", rzero, 1))
        align = max(mul.latency, 2)
        d0, nd0, eat_p, eat_r, mmin_p, mmin_r, rn, pzero, psign, rs, rzero = (
            delay(m, self.en, s, align - 2, s.name)
            for s in (d0, nd0, eat_p, eat_r, mmin_p, mmin_r, rn, pzero, psign, rs, rzero))
        p = delay(m, self.en, mul.p, align - mul.latency, "p")
        stage.depth += align - 2

        # 3: which operand is larger, the accumulator's A and the unshifted B, the shift
        # (each shift clamped beside the choice, not after it: a negative one is never used)
        prod_a = ~pzero & (rzero | ~d0[-1])
        p_acc = Cat(Const(0, T - (P - 2)), p)
        r_acc = Cat(Const(0, T - BF16.mbits), rn)

        def clamp(v):
            return Mux(v[-1] | (v >= WA), WA, v[:kbits])

        a_acc, b_pre, shc, s_a, sub, eat, mmin, zero_neg = stage(
            ("a_acc3", Mux(prod_a, p_acc, r_acc), unsigned(WA)),
            ("b_pre3", Mux(prod_a, Mux(rzero, 0, r_acc), Mux(pzero, 0, p_acc)), unsigned(WA)),
            ("sh3", Mux(prod_a, clamp(d0), clamp(nd0)), unsigned(kbits)),
            ("sa3", Mux(prod_a, psign, rs), 1), ("sub3", psign ^ rs, 1),
            ("eat3", Mux(prod_a, eat_p, eat_r), d_shape), ("mmin3", Mux(prod_a, mmin_p, mmin_r), d_shape),
            ("zneg3", pzero & rzero & psign & rs, 1))

        # 4-5: B shifted right, the lost bits jammed into its LSB; the rounding point's lower bound clamped
        b1, lost1 = shift_right_sticky(b_pre, shc[:2])
        b1, st1, shc, a_acc, s_a, sub, eat, mminc, zero_neg = stage(
            ("b4", b1, unsigned(WA)), ("st4", lost1, 1), ("sh4", shc, unsigned(kbits)), ("a4", a_acc, unsigned(WA)),
            ("sa4", s_a, 1), ("sub4", sub, 1), ("eat4", eat, d_shape),
            ("mmin4", Mux(mmin[-1], 0, Mux(mmin >= kmax, kmax, mmin[:kbits])), unsigned(kbits)),
            ("zneg4", zero_neg, 1))
        b2, lost2 = shift_right_sticky(b1, shc[2:], 4)
        b_acc, a_acc, s_a, sub, eat, mminc, zero_neg = stage(
            ("b5", b2 | ((lost2 | st1) if self.jam else 0), unsigned(WA)), ("a5", a_acc, unsigned(WA)), ("sa5", s_a, 1),
            ("sub5", sub, 1), ("eat5", eat, d_shape), ("mmin5", mminc, unsigned(kbits)), ("zneg5", zero_neg, 1))

        # 6-7: |A +- B| and its sign
        s1, s2, s_a, sub, eat, mminc, zero_neg = stage(
            ("s1_6", Mux(sub, a_acc - b_acc, a_acc + b_acc), signed(WA + 1)),
            ("s2_6", b_acc - a_acc, unsigned(WA)), ("sa6", s_a, 1), ("sub6", sub, 1),
            ("eat6", eat, d_shape), ("mmin6", mminc, unsigned(kbits)), ("zneg6", zero_neg, 1))
        neg = sub & s1[-1]
        s, sign, eat, mminc, zero_neg = stage(
            ("s7", Mux(neg, s2, s1[:WA]), unsigned(WA)), ("sign7", s_a ^ neg, 1),
            ("eat7", eat, d_shape), ("mmin7", mminc, unsigned(kbits)), ("zneg7", zero_neg, 1))

        # 8: the leading one
        msb, szero, s, sign, eat, mminc, zero_neg = stage(
            ("msb8", leading_one(m, s, "s_msb"), unsigned(kbits)), ("szero8", s == 0, 1), ("s8", s, unsigned(WA)),
            ("sign8", sign, 1), ("eat8", eat, d_shape), ("mmin8", mminc, unsigned(kbits)), ("zneg8", zero_neg, 1))

        # 9: where S rounds, and its exponent
        normal = msb >= mminc
        k, es, normal, szero, s, sign, zero_neg = stage(
            ("k9", Mux(normal, msb, mminc), unsigned(kbits)), ("es9", eat + msb, d_shape), ("normal9", normal, 1),
            ("szero9", szero, 1), ("s9", s, unsigned(WA)), ("sign9", sign, 1), ("zneg9", zero_neg, 1))

        # 10-11: 8 bits, guard and sticky: {S, 8 zeros} shifted right by k
        s_ext = Cat(Const(0, 8), s)
        y1, lost1 = shift_right_sticky(s_ext, k[:2])
        y1, st1, k, ef, sat, szero, sign, zero_neg = stage(
            ("y10", y1, unsigned(WA + 8)), ("st10", lost1, 1), ("k10", k, unsigned(kbits)),
            ("ef10", Mux(normal, es[:8], 0), unsigned(8)), ("sat10", normal & (es >= 255), 1),
            ("szero10", szero, 1), ("sign10", sign, 1), ("zneg10", zero_neg, 1))
        y2, lost2 = shift_right_sticky(y1, k[2:], 4)
        r0, guard, sticky, ef, sat, szero, sign, zero_neg = stage(
            ("r0_11", y2[1:9], unsigned(8)), ("guard11", y2[0], 1), ("sticky11", st1 | lost2, 1),
            ("ef11", ef, unsigned(8)), ("sat11", sat, 1), ("szero11", szero, 1), ("sign11", sign, 1),
            ("zneg11", zero_neg, 1))

        # 12: round to nearest even; whether the result reaches exponent 255 (as hdl.hif_formatter)
        up = self.round_up(r0, guard, sticky)
        word15, sat, szero, sign, zero_neg = stage(
            ("word12", Cat(r0[:BF16.mbits], ef) + up, unsigned(15)),
            ("sat12", sat | ef.all() | (ef[1:].all() & r0[:BF16.mbits].all() & up), 1),
            ("szero12", szero, 1), ("sign12", sign, 1), ("zneg12", zero_neg, 1))

        # 13: saturate to 0x7F7F; an exact zero is +0 unless both terms were -0
        (out,) = stage(("out13", Mux(szero, Cat(Const(0, 15), zero_neg),
                                      Cat(Mux(sat, SATURATED, word15), sign)), unsigned(16)))
        m.d.comb += self.out.eq(out)
        assert stage.depth == self.latency, (stage.depth, self.latency)
        return m


# -- the merge at stage 0 -------------------------------------------------------------------------
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
        """One cycle: ``cy`` holds that cycle's inputs (``present``, ``present_next``, ``taken``, ``swap``, ``page``, ``write_page``, ``en``, ``offset_we``, ``layer_sparse``, ``valid``,
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
        cfg, R, K = self.config, self.R, self.window
        n = lane_bits(cfg)
        BW = SPARSE_INDEX_BITS - n                      # the chunk part of an index
        L = NEAR_BITS
        iss, en = self.issue, self.en
        kb = max(1, (K - 1).bit_length())

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
        H = BW // 2
        near_parts = Signal(data.StructLayout({"hi_lt": 1, "hi_eq": 1, "lo_lt": 1}), name="inbox_near")
        near = near_parts.hi_lt | (near_parts.hi_eq & near_parts.lo_lt)
        last_index = Signal(unsigned(SPARSE_INDEX_BITS), name="last_index", reset_less=True)
        have_last = Signal(name="have_last")
        err = Signal(error_layout(), name="errors")

        def rel(i, what):
            """``what`` (a list per slot) of the slot ``i`` places after ``head``."""
            return Array(what)[(head + i)[:kb]]

        with m.If(self.offset_we):
            m.d.sync += flags[iss.write_page].eq(self.layer_sparse)

        # this cycle: the pass (if one executes) applies the first entries of chunk c; whether
        # it is a chunk's last is a register decided with ``hold``
        last_pass = Signal(name="last_pass")
        m.d.sync += last_pass.eq(iss.present_next & ~iss.hold_next)
        adv = en & iss.present
        fin = en & last_pass
        newlayer = iss.taken & iss.swap
        apply = []
        for j in range(R):
            a = Signal(name=f"apply{j}")
            m.d.comb += a.eq(adv & (count > j) & order[j].eq0 & (apply[-1] if apply else 1))
            apply.append(a)
        used = Signal(range(R + 1), name="used")
        m.d.comb += used.eq(sum(apply[j] for j in range(R)))
        with m.If(en):
            m.d.sync += self.final.eq(~hold)
            for j in range(R):
                slot = rel(j, slots)
                m.d.sync += [self.entries[j].valid.eq(apply[j]), self.entries[j].lane.eq(slot.lane),
                             self.entries[j].value.eq(slot.value)]

        # the inbox lands at head + count when it is near and the window has room before this
        # cycle's pass (so that neither the move nor ``sparse.ready`` waits for the pass); a new
        # layer flushes the window and the inbox whatever moves: ``ready`` does not wait for it
        left = Signal(range(K + 1), name="left")
        m.d.comb += left.eq(count - used)
        moves = inbox.valid & near & (count < K)
        m.d.comb += self.sparse.ready.eq(~inbox.valid | moves)
        tail = (head + count)[:kb]
        in_eq = [inbox.beat[:L] == b for b in c_lo]
        for i in range(K):
            with m.If(moves & (tail == i)):
                m.d.sync += [slots[i].lane.eq(inbox.lane), slots[i].value.eq(inbox.value)]
        # the ordered flags: shifted by this pass's entries, the inbox appended at ``left``
        for i in range(K):
            nxt = Signal(flag_layout, name=f"pos{i}_next")
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
            m.d.sync += [count.eq(left + moves), head.eq((head + used)[:kb])]

        # the chunk counter
        with m.If(newlayer):
            m.d.sync += [c_near.eq(NEAR)] + [lo.eq(j) for j, lo in enumerate(c_lo)]
        with m.Elif(fin):
            m.d.sync += [c_near.eq(c_near + 1), c_lo[0].eq(c_lo[1]), c_lo[1].eq(c_lo[2]), c_lo[2].eq(c_lo[2] + 1)]

        # the stream into the inbox; the checks on the way
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
            m.d.sync += getattr(near_parts, part).eq(Mux(take, x(cut(e.index[n:]), cut(c_near)),
                                                            x(cut(inbox.beat), cut(c_near))))
        with m.If(moves | newlayer):
            m.d.sync += inbox.valid.eq(0)
        with m.If(take):
            with m.If(expected):
                m.d.sync += [inbox.valid.eq(1), inbox.beat.eq(e.index[n:]), inbox.lane.eq(e.index[:max(1, n)] if n else 0),
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
            m.d.sync += [in_layer.eq(1), closed.eq(~flags[iss.page]), have_last.eq(0)]
            with m.If(take):            # an entry at the swap edge: the old layer's (past it) or no layer's
                m.d.sync += inbox.valid.eq(0)

        # hold for next cycle: not provably the chunk's last pass. The entries after this pass:
        # the window from head + used, then the inbox; their flags for the next chunk (c + 1
        # after a last pass, else c): eq1 or eq0; the inbox's from its low bits (a far one is
        # beyond it).
        def after(i, flag):
            out = Signal(name=f"after{i}_{flag}")
            for u in range(R + 1):
                with m.If(used == u):
                    m.d.comb += out.eq(getattr(order[u + i], flag) if u + i < K else 0)
            return out

        inbox_in = inbox.valid & near & Mux(fin, in_eq[1], in_eq[0])

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
        done = closed & ~inbox.valid
        safe = Mux(newlayer, ~flags[iss.page], Cat(*beyond).any() | (done & ~in_r))
        # (never while stage 0 will be empty: a beat must be taken to consume the entries)
        m.d.comb += iss.hold_next.eq(self.hold_rule(iss.present_next & ~safe))
        m.d.sync += hold.eq(iss.hold_next)
        m.d.comb += self.error.eq(err)
        return m


# -- the adders beside the lanes, and the override -------------------------------------------------
def delay_ram(m: Module, en, value, stages: int, name: str):
    """``value`` delayed by ``stages`` enabled edges (as ``arith.delay`` builds it from registers)
    through a memory of ``stages - 1`` words and its registered read: a ring whose slot is read
    (the old word) and written in the same enabled edge. LUT RAM where the FPGA has it: 16 bits
    of 7 words are four DPR16X4 on ECP5 instead of 128 flip-flops."""
    from amaranth.lib.memory import Memory

    if stages <= 2:
        return delay(m, en, value, stages, name)
    depth = stages - 1
    m.submodules[name] = mem = Memory(shape=len(value), depth=depth, init=[])
    wr, rd = mem.write_port(), mem.read_port(domain="sync")
    ptr = Signal(range(depth), name=f"{name}_ptr", reset_less=True)
    with m.If(en):
        m.d.sync += ptr.eq(Mux(ptr == depth - 1, 0, ptr + 1))
    m.d.comb += [wr.addr.eq(ptr), wr.data.eq(value), wr.en.eq(en), rd.addr.eq(ptr), rd.en.eq(en)]
    return rd.data


def path_model(config: DecoderConfig, passes) -> list[list[int]]:
    """``ResidualPath``'s output per pass: ``passes`` is a list of ``(lanes, words, block,
    entries, final)``: the formatters' outputs, the table words and block fields (dict of
    per-lane arrays) of the pass, its entries ``[(valid, lane, value)] * R`` and ``final``.
    Each pass's output: a lane an entry hits takes ``adder_model`` of its word, block and
    value; a lane hit earlier in the chunk (passes since the last ``final`` one) keeps that
    result; other lanes pass through."""
    outs, kept = [], {}
    for lanes, words, block, entries, final in passes:
        row = [int(v) for v in lanes]
        hits = {}
        for valid, lane, value in entries:
            if valid:
                b = {k: np.asarray(v)[lane] for k, v in block.items()}
                hits[lane] = int(adder_model(config, [words[lane]], {k: [v] for k, v in b.items()}, [value])[0])
        for lane in range(len(row)):
            row[lane] = hits.get(lane, kept.get(lane, row[lane]))
        kept = {} if final else {**kept, **hits}
        outs.append(row)
    return outs


class ResidualPath(wiring.Component):
    """R adders beside the lanes; each lane's output delayed to meet them; the override.

    Ports
    * ``enable`` (in, hdl.pipeline.EnableSignature): lane ``i``'s registers move on its copy,
      adder ``j``'s on lane ``j mod N``'s;
    * ``entries`` (in, per adder ``entry_layout``) and ``final`` (in): the pass's entries, in
      step with the lanes' table words (as ``SparseMerge`` gives them, delayed by the table
      read's extra cycles);
    * ``word`` (in, per lane ``lut_word.word(config)``) and ``block`` (in, per lane
      ``scale_decoder.block(config)``): what each lane's formatter takes this cycle;
    * ``lanes`` (in, per lane BF16): the formatters' outputs;
    * ``out`` (out, per lane BF16).

    Adder ``j`` takes its entry's lane's word and block through a mux (one register
    stage), then ``ResidualAdder.latency`` stages. Each lane's output is delayed by
    ``delay`` = 1 + adder - formatter stages, to meet the adders' results (in a small
    memory and its read register, ``delay_ram``), and ``out``
    is one more register: a lane an adder hits this pass takes its result; a lane hit
    in an earlier pass of the same chunk (a pass with ``final`` low) takes the result
    kept for it in its override register; any other lane its own output. A pass with
    ``final`` high clears the override registers.

    Latency: ``latency`` = ``delay + 1`` enabled edges from ``lanes`` to ``out``; the
    adders' results meet the lanes' outputs of the same pass. ``model`` gives ``out``
    per pass from golden/ (``adder_model``) and the override rule.
    """

    model = staticmethod(path_model)

    #: an adder's result goes to lane ``entry.lane + lane_offset`` (tests break this)
    lane_offset = 0
    #: the adder class (tests replace it with a broken one)
    adder_cls = ResidualAdder

    def __init__(self, config: DecoderConfig):
        self.config, self.R = config, config.residuals
        self.adders = [self.adder_cls(config) for _ in range(self.R)]
        self.formatter_latency = HifFormatter.stages(config)
        self.delay = 1 + self.adders[0].latency - self.formatter_latency
        assert self.delay >= 0, "the adder is not shorter than the formatter"
        N = config.lanes
        super().__init__({
            "enable": In(EnableSignature(N)),
            "entries": In(data.ArrayLayout(entry_layout(config), self.R)),
            "final": In(1),
            "word": In(data.ArrayLayout(lut_word.word(config), N)),
            "block": In(data.ArrayLayout(scale_decoder.block(config), N)),
            "lanes": In(data.ArrayLayout(16, N)),
            "out": Out(data.ArrayLayout(16, N)),
        })

    @property
    def latency(self) -> int:
        """Edges from the lanes' outputs to ``out``: the delay and the override register."""
        return self.delay + 1

    def elaborate(self, platform):
        m = Module()
        cfg, N = self.config, self.config.lanes
        en_lane = self.enable.lane
        U = self.adders[0].latency
        results = []
        for j, adder in enumerate(self.adders):
            m.submodules[f"adder{j}"] = adder
            en = en_lane[j % N]
            e = self.entries[j]
            # the mux: the entry's lane's word and block, one register stage
            w = Signal(lut_word.word(cfg), name=f"word{j}", reset_less=True)
            b = Signal(scale_decoder.block(cfg), name=f"block{j}", reset_less=True)
            r = Signal(16, name=f"residual{j}", reset_less=True)
            with m.If(en):
                m.d.sync += [w.eq(Array(self.word[i] for i in range(N))[e.lane] if N > 1 else self.word[0]),
                             b.eq(Array(self.block[i] for i in range(N))[e.lane] if N > 1 else self.block[0]),
                             r.eq(e.value)]
            m.d.comb += [adder.en.eq(en), adder.word.eq(w), adder.block.eq(b), adder.residual.eq(r)]
            hit = delay(m, en, Cat(e.valid, (e.lane + self.lane_offset)[:len(e.lane)]), 1 + U, f"hit{j}")
            results.append((hit[0], hit[1:], adder.out))
        final = delay(m, en_lane[0], self.final, 1 + U, "final")
        for i in range(N):
            en = en_lane[i]
            lane = delay_ram(m, en, self.lanes[i], self.delay, f"lane{i}")
            ovr = Signal(16, name=f"override{i}", reset_less=True)
            ovr_valid = Signal(name=f"override_valid{i}")
            hit, value = Const(0), Const(0, 16)
            for valid, at, result in reversed(results):        # adder 0 first where two hit (never)
                here = valid & (at == i) if N > 1 else valid
                hit, value = here | hit, Mux(here, result, value)
            out = Signal(16, name=f"out{i}", reset_less=True)
            with m.If(en):
                m.d.sync += out.eq(Mux(hit, value, Mux(ovr_valid, ovr, lane)))
                with m.If(final):
                    m.d.sync += ovr_valid.eq(0)
                with m.Elif(hit):
                    m.d.sync += [ovr_valid.eq(1), ovr.eq(value)]
            m.d.comb += self.out[i].eq(out)
        return m


# -- the decoder's expected output with sparse entries ---------------------------------------------
def expected_words(cfg: DecoderConfig, luts, offset: int, headers, codes, index=(), values=()) -> np.ndarray:
    """golden.decoder's BF16 output word of every code of a layer with sparse entries at flat
    ``index`` (strictly increasing, within the blocks given) with BF16 ``values``: the layer's
    residual (its entries' values, +0 elsewhere) added to the exact products and rounded once.
    Without entries: hdl.reference.lane_words."""
    from sop.golden.decoder import decode_blocks

    from .reference import lane_words

    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0:
        return lane_words(cfg, luts, offset, headers, codes)
    codes = np.asarray(codes)
    dense = np.zeros(codes.size)
    dense[index] = BF16.decode(np.asarray(values, dtype=np.int64))
    out = decode_blocks(cfg.hif, luts, cfg.layout, offset, headers, codes, "bf16", dense.reshape(codes.shape))
    return BF16.encode(out).astype(np.int64).reshape(-1)
