"""The naive GEMV path: the decoder's BF16 weights, one FP32 multiply per lane, FP32 sums (issue 15 s.4).

Role: the baseline the SOP dot-product engine (hdl.block_dot, hdl.fp32_acc, docs/dot.md) is
measured against in docs/benchmarks.md (bench/dot_vs_naive.py): what an accelerator does with
the decoder as it is, at the engine's throughput, ``lanes`` = ``g`` = 16 MACs a cycle. It is built
from the project's own units, each as fast as the engine's: the decoder (hdl.decoder, a
16-lane configuration: one block of 16 BF16 weights a cycle, its table load ports unchanged),
the same 16-stage FP32 adder (hdl.fp32_acc.Fp32Add) and ring of running sums, the same
enable tree and skid buffers (hdl.pipeline, hdl.output_buffer).

Datapath, per cycle one block's 16 weights ``w_j`` (BF16, from the decoder) joined with their
16 activations ``x_j`` (E4M3 codes, with the row's tags):

* **product**, per lane: ``p_j = w_j * x_j`` in binary32, an 8 x 4-bit significand product
  (12 bits) and an exponent add, normalized as hdl.block_dot normalizes (leading zeros against a
  barrier bit, so that a result below the normal range comes out on the 2^-149 quantum with
  exponent field 0) and packed by hdl.block_dot.round_fp32. Every product is exact in binary32:
  its quantum is at least 2^-133 * 2^-9 = 2^-142 and it has 12 significant bits, so the rounding
  tail's guard and sticky bits are constant 0 and synthesis folds the increment away; what is
  left of the rounding is the saturation at +-FLT_MAX (a product beyond it) and the sign of a
  zero product (the product's). The model is golden.dot.residual_terms' BF16 x activation
  term, ``RNE_fp32(w * x)``, saturating.
* **reduction**, one of two, both sustaining one block a cycle while 17 or more rows
  (``slots``) are interleaved, as hdl.fp32_acc.RowAccumulator needs:

  - ``"lanes"`` (the issue's wording, "one BF16 multiply-accumulate per lane"): each lane keeps
    ``slots`` running FP32 sums in a ring (RowAccumulator's ring: operand registers, the adder,
    ``slots - 17`` registers), ``s_j = (((+0 + p_j,0) + p_j,1) + ...)`` over the row's blocks in
    arrival order; at the row's last block the 16 lane sums go through a pipelined tree of
    15 Fp32Add, ``y = ((s_0 + s_1) + (s_2 + s_3)) + ...`` (adjacent pairs, level by level).
    31 FP32 adders.
  - ``"tree"`` (the cheaper one): the 16 products of each block through the tree of 15 Fp32Add,
    ``T_b = ((p_0 + p_1) + (p_2 + p_3)) + ...``, then one ring of running sums,
    ``y = (((+0 + T_0) + T_1) + ...)``. 16 FP32 adders for the same throughput: what a
    competent engineer builds when the rows interleave anyway; it is the baseline the
    benchmark's headline ratio uses (the conservative one).

  A cheaper reduction than ``"tree"`` at this rate has no FP32 adder to spare: every block's 16
  products must be reduced at one block a cycle, 15 additions a cycle, unless the sum is
  reassociated into something other than FP32 additions (the engine's exact block sum is that
  something).

The order of the roundings is each variant's own (``model``); neither equals golden.dot's
engine (one rounding per block), and that difference is the point of the comparison, not a
bug. Both are bit-exact against ``model``.

Handshake: ``blocks``, ``load``, ``offset``, ``offset_we`` are the decoder's (hdl.decoder:
tables loaded into the inactive page, ``swap`` on a layer's first beat). ``acts`` carries, per
block, its ``g`` activation codes and the row tags of hdl.fp32_acc (``slot``, ``first``,
``last``); a block's weights and its ``acts`` transfer are joined: both are taken in the same
cycle, and only while the ring is at the tagged slot (``slot == pos``, the ring turning every
enabled cycle), so consecutive blocks must go to consecutive slots for full rate (17 or more
rows interleaved; one row at a time takes a block per ``slots`` cycles, as RowAccumulator). One
enable moves everything after the join, decided ahead by the output buffers
(hdl.block_dot.output_pipeline's scheme, one enable copy per lane, the sum's bits spread over the
lanes' buffers). ``sums`` (out stream, ``sum_layout(slots)``: ``value``, ``slot``): a row's ``y``
when its ``last`` block has been through, in that order.

Latency: ``latency`` cycles from the join of a row's ``last`` block (its activations taken on
``acts``) to the row's sum on ``sums`` while ``sums`` is ready; ``weights_latency`` cycles from
a beat taken on ``blocks`` to its weights at the join (the decoder's latency and the FIFO's,
when the FIFO is empty). The weights wait in a FIFO of ``WEIGHT_FIFO_DEPTH`` blocks for their
slot: a decoder that restarts after a stall leaves a one-cycle gap after its skid entries, and
a gap at the join costs a whole turn of the ring (the engine's row accumulator has the same
rule, hdl.fp32_acc).

``model`` is numpy (golden.formats.to_float32 for the products, golden.dot.fp32_add for every
addition).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, Value, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot
from sop.golden.formats import FORMATS, to_float32
from sop.golden.points import get_point

from . import replica as rep
from .arith import PipelinedMultiplier, delay, leading_zeros_pipelined, shift_left, shift_stages, stage_reg
from .block_dot import code_fields, output_pipeline, round_fp32
from .config import OFFSET_SHAPE, DecoderConfig
from .decoder import Decoder
from .fp32_acc import ADD_LATENCY, Fp32Add, sum_layout

BF16 = FORMATS["bf16"]
REDUCTIONS = ("lanes", "tree")
#: the decoder's weights wait here for their slot: a decoder restarting after a stall leaves a
#: one-cycle gap after its skid entries, and a gap at the join costs a whole turn of the ring
#: (``NaiveDot.weight_fifo``; a power of two)
WEIGHT_FIFO_DEPTH = 4
WEIGHT_FIFO_LATENCY = 1         # a word written at an edge is read from the next cycle
#: the normalization window of a product: 12 significand bits and 5 bits of headroom above them,
#: so that ``kmax`` (the largest shift that keeps the result normal) is never negative (below)
PRODUCT_WINDOW = 17


def naive_config(point: str = "sop4-g16", *, lutram_depth: int = 0) -> DecoderConfig:
    """The decoder of the naive path: ``point``'s layout and HIF, one block (``g`` BF16 weights) a cycle."""
    p = get_point(point)
    return DecoderConfig(f"{point}-naive", p.layout.group, p.layout, p.hif, "bf16", lutram_depth)


def act_layout(lanes: int, slots: int) -> data.StructLayout:
    """One block's activations and row tags (hdl.fp32_acc.value_layout's ``slot``, ``first``, ``last``)."""
    return data.StructLayout({"act": data.ArrayLayout(unsigned(8), lanes), "slot": range(slots),
                              "first": unsigned(1), "last": unsigned(1)})


def products(weights, acts) -> np.ndarray:
    """``RNE_fp32(w * x)`` (float32, saturating) of BF16 codes and E4M3 codes: exact in float64, one rounding."""
    w = BF16.decode(np.asarray(weights, np.int64))
    x = dot.act_format("e4m3").decode(np.asarray(acts, np.int64))
    return to_float32(w * x)


def tree_sum(values: np.ndarray) -> np.ndarray:
    """The adder tree's sum along the last axis (a power of two): adjacent pairs, level by level."""
    while values.shape[-1] > 1:
        values = dot.fp32_add(values[..., 0::2], values[..., 1::2])
    return values[..., 0]


def model(weights, acts, slots, first, last, reduction: str = "tree") -> list[tuple[int, int]]:
    """NaiveDot's sums (binary32 pattern, slot) in the order they leave (its docstring's arithmetic), for
    the joined blocks in order: ``weights`` (n, g) BF16 codes (the decoder's output), ``acts`` (n, g)
    E4M3 codes, the tags (n,); ``reduction`` the unit's (``NaiveDot.reduction``)."""
    p = products(weights, acts)                                          # (n, g)
    terms = tree_sum(p)[:, None] if reduction == "tree" else p          # what each ring adds
    running: dict[int, np.ndarray] = {}
    out = []
    for i, (s, f, l) in enumerate(zip(slots, first, last)):
        acc = np.zeros(terms.shape[1], np.float32) if f else running.get(int(s), np.zeros(terms.shape[1], np.float32))
        running[int(s)] = acc = dot.fp32_add(acc, terms[i])
        if l:
            y = acc[0] if reduction == "tree" else tree_sum(acc)
            out.append((int(np.float32(y).view(np.uint32)), int(s)))
    return out


class NaiveDot(wiring.Component):
    def model(self, weights, acts, slots, first, last) -> list[tuple[int, int]]:
        return model(weights, acts, slots, first, last, self.reduction)

    def __init__(self, config: DecoderConfig, *, slots: int = ADD_LATENCY + 1, reduction: str = "tree",
                 adder=Fp32Add):
        # adder: the FP32 adder class, replaceable so that a test can show a broken one is caught
        g = config.layout.group
        problems = []
        if config.lanes != g or config.output != "bf16" or config.residuals:
            problems.append(f"the naive path needs a BF16 decoder of one block a cycle (lanes = g = {g}, "
                            f"no residual path), got {config.lanes} lanes, output {config.output}")
        if g & (g - 1):
            problems.append(f"the adder tree needs a power-of-two block, got g = {g}")
        if slots < ADD_LATENCY + 1:
            problems.append(f"{slots} slots: the ring needs at least {ADD_LATENCY + 1}")
        if reduction not in REDUCTIONS:
            problems.append(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if problems:
            self._MustUse__silence = True        # refused: never elaborated, no unused-component warning
            raise ValueError("naive dot: " + "; ".join(problems))
        self.config, self.slots, self.reduction, self.adder = config, slots, reduction, adder
        self.act = dot.act_format("e4m3")
        self.decoder = Decoder(config)
        self.product_latency = 1 + PipelinedMultiplier.stages(self.act.mbits + 1) + 3 + \
            shift_stages(2 ** Shape.cast(range(PRODUCT_WINDOW + 1)).width - 1) + 3
        self.tree_latency = (g.bit_length() - 1) * ADD_LATENCY
        self.weights_latency = self.decoder.latency + WEIGHT_FIFO_LATENCY
        super().__init__({
            "blocks": In(stream.Signature(config.beat_layout)),
            "load": In(stream.Signature(config.load_layout)),
            "offset": In(OFFSET_SHAPE),
            "offset_we": In(1),
            "acts": In(stream.Signature(act_layout(g, slots))),
            "sums": Out(stream.Signature(sum_layout(slots))),
        })

    @property
    def latency(self) -> int:
        """Cycles from the join of a row's last block to its sum (module docstring): the products, the
        adder tree, the ring's operand register and its adder."""
        return self.product_latency + self.tree_latency + 1 + ADD_LATENCY

    def elaborate(self, platform):
        m = Module()
        g, S = self.config.layout.group, self.slots
        m.submodules.decoder = dec = self.decoder
        wiring.connect(m, wiring.flipped(self.blocks), dec.blocks)
        wiring.connect(m, wiring.flipped(self.load), dec.load)
        m.d.comb += [dec.offset.eq(self.offset), dec.offset_we.eq(self.offset_we)]

        ctl, out = output_pipeline(m, self.latency, self.sums, g)
        last = Signal(Shape.cast(self.sums.payload.shape()).width, name="result")
        m.d.comb += Value.cast(out.last).eq(last)
        en0, en_lane = ctl.enable.en, [ctl.enable.lane[j] for j in range(g)]

        # -- the weights' FIFO (weight_fifo), then the join: a block's weights and activations, taken
        #    when the ring is at their slot
        held, pop, weights = self.weight_fifo(m, dec.values)
        pos = Signal(range(S), name="pos")              # the ring's slot at the join
        with m.If(en0):
            m.d.sync += pos.eq(Mux(pos == S - 1, 0, pos + 1))
        tags = self.acts.payload
        at_slot = tags.slot == pos
        take = Signal(name="take")
        m.d.comb += [self.acts.ready.eq(en0 & held & at_slot),
                     take.eq(en0 & self.acts.valid & held & at_slot),
                     pop.eq(take), ctl.valid.eq(take & tags.last)]

        products = [self.product(m, en_lane[j], weights[j], tags.act[j], f"p{j}") for j in range(g)]
        take, first = (delay(m, en0, v, self.product_latency - 1, n) for v, n in ((take, "take"), (tags.first, "first")))

        if self.reduction == "tree":
            block_sum = self.adder_tree(m, en_lane, products, "t")
            take, first = (delay(m, en0, v, self.tree_latency + 1, f"{v.name}_t") for v in (take, first))
            y = self.ring(m, en_lane[g - 1], block_sum, take, first, "ring")      # the copy no adder uses
        else:
            lane_sums = []
            for j in range(g):            # the tags' last stage copied per lane: each drives a ring's muxes
                take_j, first_j = (rep.replica(1, name=f"{v.name}{j}", reset_less=True) for v in (take, first))
                with m.If(en_lane[j]):
                    m.d.sync += [take_j.eq(take), first_j.eq(first)]
                lane_sums.append(self.ring(m, en_lane[j], products[j], take_j, first_j, f"ring{j}"))
            y = self.adder_tree(m, en_lane, lane_sums, "t")
        slot = delay(m, en0, pos, self.latency, "slot")
        m.d.comb += last.eq(Cat(y, slot))                   # sum_layout: value, then slot
        return m

    # -- the units --------------------------------------------------------------------------------------
    def weight_fifo(self, m: Module, values):
        """The decoder's weights in a FIFO of ``WEIGHT_FIFO_DEPTH`` blocks, one LUT RAM column per lane
        read combinationally, each lane with its own copy of both pointers (hdl.replica), so that a
        lane's read path stays in the lane. Takes ``values`` (the decoder's out stream); returns
        (``held``: a block is held, ``pop``: to be driven, the join takes the oldest, its ``g`` lane words)."""
        D, g = WEIGHT_FIFO_DEPTH, self.config.layout.group
        level = Signal(range(D + 1), name="fifo_level")
        held = Signal(name="fifo_held")
        pop = Signal(name="fifo_pop")
        push = Signal(name="fifo_push")
        m.d.comb += [values.ready.eq(level != D), push.eq(values.valid & values.ready), held.eq(level != 0)]
        with m.If(push & ~pop):
            m.d.sync += level.eq(level + 1)
        with m.If(pop & ~push):
            m.d.sync += level.eq(level - 1)
        words = []
        for j in range(g):
            wptr = rep.replica(range(D), name=f"fifo_wptr{j}")
            rptr = rep.replica(range(D), name=f"fifo_rptr{j}")
            m.submodules[f"fifo{j}"] = mem = memory.Memory(shape=unsigned(16), depth=D, init=[])
            wp, rp = mem.write_port(), mem.read_port(domain="comb")
            m.d.comb += [wp.addr.eq(wptr), wp.data.eq(values.payload[j]), wp.en.eq(push), rp.addr.eq(rptr)]
            with m.If(push):
                m.d.sync += wptr.eq(wptr + 1)               # D is a power of two: the pointers wrap
            with m.If(pop):
                m.d.sync += rptr.eq(rptr + 1)
            words.append(rp.data)
        return held, pop, words

    def product(self, m: Module, en, w, x, name: str) -> Value:
        """``w * x`` in binary32 (exact; saturating) of a BF16 code and an E4M3 code, ``product_latency``
        stages later."""
        sw, Sw, ew = code_fields(BF16, w)
        sx, Sx, ex = code_fields(self.act, x)
        Sw, Sx = stage_reg(m, en, f"{name}_sw", Sw, unsigned(8)), stage_reg(m, en, f"{name}_sx", Sx, unsigned(4))
        ew, ex = stage_reg(m, en, f"{name}_ew", ew, unsigned(8)), stage_reg(m, en, f"{name}_ex", ex, unsigned(4))
        neg = stage_reg(m, en, f"{name}_neg", sw ^ sx, 1)
        m.submodules[f"{name}_mul"] = mul = PipelinedMultiplier(8, 4)
        m.d.comb += [mul.en.eq(en), mul.a.eq(Sw), mul.b.eq(Sx)]
        # value = P * 2^E, E = e'w + e'x - 142; with the window's 17 bits the largest shift that keeps
        # the result normal is kmax = 16 + E + 126 = e'w + e'x (0 .. 267); the barrier bit at
        # 16 - kmax caps the leading-zero count there (hdl.block_dot's normalization)
        NQ = PRODUCT_WINDOW
        kmax = stage_reg(m, en, f"{name}_kmax", ew + ex, unsigned(9))
        barrier = stage_reg(m, en, f"{name}_barrier", Cat(kmax == NQ - 1 - i for i in range(NQ)), unsigned(NQ))
        kmax = stage_reg(m, en, f"{name}_kmax2", kmax, unsigned(9))
        neg = delay(m, en, neg, mul.latency, f"{name}_neg")
        q = mul.p                                        # 12 bits at the window's bottom
        qb = stage_reg(m, en, f"{name}_qb", q | barrier, unsigned(NQ))
        zero = stage_reg(m, en, f"{name}_zero", q == 0, 1)
        k = leading_zeros_pipelined(m, en, qb, f"{name}_k")
        q, neg, kmax = (delay(m, en, v, 3, f"{name}_{n}") for v, n in ((q, "q"), (neg, "negz"), (kmax, "kmaxz")))
        zero = delay(m, en, zero, 2, f"{name}_zeroz")
        ebm1 = stage_reg(m, en, f"{name}_ebm1", kmax - k, unsigned(9))
        qs = shift_left(m, en, Cat(q, Const(0, NQ - len(q))), k, NQ, f"{name}_norm")
        n_norm = shift_stages(2 ** len(k) - 1)
        zero, neg = delay(m, en, zero, n_norm, f"{name}_zeron"), delay(m, en, neg, n_norm, f"{name}_negn")
        ebm1 = delay(m, en, ebm1, n_norm - 1, f"{name}_ebm1")
        return round_fp32(m, en, qs, ebm1, zero, neg, neg, self.round_up, f"{name}_r")

    @staticmethod
    def round_up(lsb, guard, sticky):
        """Round to nearest, ties to even."""
        return guard & (sticky | lsb)

    def adder_tree(self, m: Module, en_lane, values, name: str) -> Value:
        """The sum of ``values`` (a power of two of binary32 patterns) by Fp32Add, adjacent pairs level
        by level, ``tree_latency`` stages later. Adder ``i`` of level ``l`` moves on lane
        ``(2 i + 1) 2^l - 1``'s enable copy: every copy drives at most one adder of the tree (lanes 0,
        2, .., 14; 1, 5, 9, 13; 3, 11; 7), and the last lane's copy none."""
        level = 0
        while len(values) > 1:
            sums = []
            for i in range(len(values) // 2):
                m.submodules[f"{name}{level}_{i}"] = add = self.adder()
                m.d.comb += [add.en.eq(en_lane[((2 * i + 1) << level) - 1]), add.a.eq(values[2 * i]),
                             add.b.eq(values[2 * i + 1])]
                sums.append(add.s)
            values, level = sums, level + 1
        return values[0]

    def ring(self, m: Module, en, value, take, first, name: str) -> Value:
        """``slots`` running sums (hdl.fp32_acc.RowAccumulator's ring): ``value`` added to the sum at the
        ring's input when ``take`` (to +0 when ``first``), +0 otherwise; the new sum ``1 + ADD_LATENCY``
        stages later."""
        m.submodules[f"{name}_add"] = add = self.adder()
        back = delay(m, en, add.s, self.slots - 1 - ADD_LATENCY, f"{name}_back")
        a = stage_reg(m, en, f"{name}_opa", Mux(take & first, 0, back), unsigned(32))
        b = stage_reg(m, en, f"{name}_opb", Mux(take, value, 0), unsigned(32))
        m.d.comb += [add.en.eq(en), add.a.eq(a), add.b.eq(b)]
        return add.s
