"""Block dot unit: one block's exact dot product, scaled and rounded once into FP32 (docs/dot.md).

Role: the first stage of the GEMV engine (issue 15, section 2). Per block it takes
the ``g`` HIF table values of the block's weights (the codes already looked up in
the block's bank: the decoder's LUT front end, hdl.lanes, does that look-up and
its load protocol), the block header's scale code and sign, the layer offset and
the ``g`` activation codes, and gives

    V_b = RNE_fp32( (-1)^s * A * Ss * 2^(L + Xs + offset) )

bit for bit as golden.dot defines it: ``A`` the exact block sum in a two's
complement accumulator of ``golden.dot.accumulator(hif, act, g).bits`` bits (36 for
E3M6 HIF times E4M3), one round to nearest even into binary32, subnormals kept,
saturating at +-FLT_MAX; ``A * Ss = 0`` gives +0, a nonzero value that rounds to
zero keeps its sign.

Stages (each one carry chain or two to three LUT levels, as in hdl.hif_formatter;
numbers for sop4-g16 with E4M3, ``W = 36``, ``Q`` 39 bits):

* per lane: the significands ``Sh``, ``Sx`` (hidden bits), the exponents
  ``Xh - min Xh`` and ``Ex - min Ex`` and the product's sign, registered (one LUT
  level from the input);
* ``Sh * Sx`` in a pipelined multiplier (hdl.arith; 7 x 4 bits, 2 stages); beside
  its first stage the alignment shift ``t`` = the sum of the two exponents (0 .. 20);
* negate: the product in two's complement (a 12-bit chain);
* align: shift left by ``t``, two bits of ``t`` per stage (4:1 muxes; 3 stages);
* sum: a tree of two-input signed adders, one level per stage (``log2 g``
  stages), to ``A`` (W bits: exact, docs/dot.md section 2);
* magnitude: ``|A|`` (one W-bit chain) and the result's sign ``A < 0 xor s``;
  beside it the one-hot ``barrier`` of the block's exponent (below);
* scale: ``Q = |A| * Ss`` as two half-width products (17 x 4 and 18 x 4 bits in
  hdl.arith multipliers, 2 stages, each with its own copy of ``Ss``), then their
  sum (the low product's bottom 17 bits pass, its top adds to the high product:
  a 23-bit chain): 3 stages, no chain of 39 bits;
* normalize: ``Q | barrier``, then its leading zeros ``k`` (two stages: per
  8-bit chunk, then across chunks), and whether ``Q`` is zero. ``barrier`` is
  the bit at ``NQ - 1 - kmax``, with ``kmax = NQ - 1 + E + 126``
  (``E = L + Xs + offset``) the largest left shift that keeps the result at or
  above the smallest normal exponent, so ``k = min(lz(Q), kmax)``: a normal
  result is normalized, a subnormal one is shifted to the 2^-149 quantum, with
  no second shifter; ``kmax`` comes from the block's header and offset alone
  (two small adds after the input register, then delayed beside the lanes);
* shift ``Q`` left by ``k``, two bits of ``k`` per stage (3 stages); beside the
  first, ``kmax - k`` (the biased exponent minus one of a normal result; 0 for a
  subnormal one);
* round (``round_fp32``, 3 stages): the top 24 bits ``kept`` (the leading one,
  when normal, at bit 23), the guard bit, the sticky OR of the rest,
  ``ef = (kmax - k) + kept[23]`` and the increment ``guard & (sticky | kept[0])``;
  ``{ef, kept[22:0]} + up`` (a mantissa carry walks into the exponent by
  itself, a subnormal that rounds up becomes the smallest normal); an exponent
  field of 255 or more saturates to FLT_MAX (0x7F7FFFFF), a zero ``Q`` gives
  +0, the sign goes on top.

Latency 24 for sop4-g16 (25 for e2m3-ue4m4-g16: a 5-bit scale significand
takes a third multiplier level).

Stream handshake, as the decoder's (``output_pipeline``): the pipeline moves as a
whole on one enable, decided ahead by output buffers with skid storage
(hdl.output_buffer, the 32 result bits split over ``min(g, 32)`` lanes) and
carried by hdl.pipeline's enable tree, one copy per lane (for g = 16: two
register levels, two skid entries); ``blocks.ready`` is the control's copy, a
register, with no path from ``values.ready``; a block enters every cycle and a
value leaves every cycle while both sides are ready. The datapath registers
have no reset.

Ports: ``blocks`` (in stream, ``block_layout(...)``: ``hif``, ``act`` (arrays of
``g`` codes), ``scale`` (the header's scale code), ``sign``, ``offset`` (the
layer's, signed 8 bits)), ``values`` (out stream, 32 bits: the binary32 pattern).

Latency: ``latency`` cycles from a block taken on ``blocks`` to its value on
``values`` while ``values`` is ready (checked against the registers built).
``model`` computes the values through golden.dot.block_values.

Activation formats: E4M3 (``golden.dot.ACT_FORMATS``) is built here. BF16, whose
exact accumulator would be 279 bits (``MAX_ACC_BITS`` is the limit here), builds
``hdl.block_dot_bf16.BlockDotBF16`` instead (``BlockDot(..., act="bf16")`` returns
one): a window fast path and an exact serial fallback (docs/dot.md section 7);
another format past the limit is refused in the constructor. E4M3's NaN codes
(S.1111.111) are outside the contract (the host refuses non-finite
activations); the unit reads them as +-480.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot
from sop.golden.formats import FloatFormat
from sop.golden.layout import OFFSET_RANGE, BlockLayout, LayerStream, pack_blocks

from . import replica as rep
from .arith import PipelinedMultiplier, chunks, leading_zeros_pipelined, shift_left, shift_stages, stage_reg
from .arith import delay as arith_delay
from .config import OFFSET_SHAPE
from .output_buffer import OutputStage
from .pipeline import PipelineControl

#: The widest exact accumulator built: E4M3 needs 36 bits; BF16 (279) takes hdl.block_dot_bf16.
MAX_ACC_BITS = 64
FP32_MAX_BITS = 0x7F7FFFFF


def _float(fmt, what: str) -> FloatFormat:
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"{what} format {fmt.name} is not a float format")
    return fmt


def block_layout(hif: FloatFormat, act: FloatFormat, layout: BlockLayout) -> data.StructLayout:
    """One block's inputs: the HIF codes and activation codes of its ``g`` weights, the header's scale
    code and sign, the layer offset."""
    return data.StructLayout({
        "hif": data.ArrayLayout(unsigned(hif.bits), layout.group),
        "act": data.ArrayLayout(unsigned(act.bits), layout.group),
        "scale": unsigned(layout.scale.bits),
        "sign": unsigned(1),
        "offset": OFFSET_SHAPE,
    })


def code_fields(fmt: FloatFormat, code):
    """(sign, significand, biased exponent e' = X - min X) of a float code, as hardware."""
    M, E = fmt.mbits, fmt.ebits
    mant, e = code[:M], code[M:M + E]
    sign = code[M + E] if fmt.signed else Const(0, 1)
    if fmt.subnormals:
        nz = e != 0
        return sign, Cat(mant, nz), e - nz           # max(e, 1) - 1
    return sign, Cat(mant, Const(1, 1)), e


def _surrogate(layout: BlockLayout) -> BlockLayout:
    """A layout like ``layout`` whose table holds ``g`` entries: one block's HIF codes become its LUT."""
    if layout.group <= 1 << layout.code_bits:
        return layout
    return dataclasses.replace(layout, code_bits=6)


def model(layout: BlockLayout, hif: FloatFormat, act, hif_codes, act_codes, scale, sign, offset) -> np.ndarray:
    """``V_b`` (uint32 binary32 patterns, (n,)) of ``n`` blocks: ``hif_codes`` and ``act_codes`` (n, g),
    ``scale``, ``sign``, ``offset`` (n,), by golden.dot.block_values.

    Each block becomes a one-block layer stream whose LUT bank A holds the block's ``g`` HIF codes
    at entries ``0 .. g-1`` (codes ``0 .. g-1``, selection bit 0, the block's header and offset), with
    the block's activations: golden's exact sum and single rounding of exactly these products. One
    call per block (a loop over blocks, not weights)."""
    fmt = dot.act_format(act)
    hif_codes, act_codes = (np.asarray(a, dtype=np.int64) for a in (hif_codes, act_codes))
    scale, sign, offset = (np.broadcast_to(np.asarray(a, dtype=np.int64), (len(hif_codes),))
                           for a in (scale, sign, offset))
    lay = _surrogate(layout)
    g = lay.group
    x = fmt.decode(act_codes).astype(np.float32)
    codes = np.arange(g, dtype=np.int64)[None, :]
    out = np.empty(len(hif_codes), np.uint32)
    for b in range(len(hif_codes)):
        luts = np.zeros((lay.banks, 1 << lay.code_bits), np.int64)
        luts[0, :g] = hif_codes[b]
        header = lay.make_header(scale[b:b + 1], sign[b:b + 1], 0)
        s = LayerStream(lay, hif, luts, int(offset[b]), 1, g, pack_blocks(lay, header, codes))
        out[b] = dot.block_values(s, x[b], fmt).reshape(-1).view(np.uint32)[0]
    return out


class BlockDot(wiring.Component):
    model = staticmethod(model)

    def __new__(cls, layout=None, hif=None, act="e4m3", *args, **kwargs):
        # BF16 activations: the window fast path and its exact fallback (hdl.block_dot_bf16)
        if cls is BlockDot and dot.act_format(act) is dot.ACT_FORMATS["bf16"]:
            from .block_dot_bf16 import BlockDotBF16

            return super().__new__(BlockDotBF16, src_loc_at=1)
        return super().__new__(cls, src_loc_at=1)

    def __init__(self, layout: BlockLayout, hif: FloatFormat, act="e4m3"):
        self.layout, self.hif = layout, _float(hif, "HIF")
        self.act = dot.act_format(act)
        self.scale = _float(layout.scale, "scale")
        self.acc = dot.accumulator(self.hif, self.act, layout.group)
        if self.acc.bits > MAX_ACC_BITS:
            self._MustUse__silence = True        # refused: never elaborated, no unused-component warning
            raise ValueError(
                f"activation format {self.act.name} with HIF {self.hif.name} needs a {self.acc.bits}-bit exact "
                f"block accumulator (docs/dot.md section 2); this unit builds at most {MAX_ACC_BITS}. A wide "
                f"format needs a window fast path and an exact fallback, as act='bf16' has (hdl.block_dot_bf16, "
                f"docs/dot.md section 7); use act='e4m3' or act='bf16'")
        W, Ms = self.acc.bits, self.scale.mbits
        s_lo, _ = dot.exponent_range(self.scale)
        # Q = |A| * Ss: W - 1 + Ms + 1 bits, plus headroom at the top so that kmax >= 0 for every block
        nq = (W - 1) + (Ms + 1)
        e_min = self.acc.lsb_exp + s_lo + OFFSET_RANGE[0]
        self.headroom = max(0, -(nq - 1 + e_min + 126))
        self.nq = nq + self.headroom
        super().__init__({
            "blocks": In(stream.Signature(self.input_layout())),
            "values": Out(stream.Signature(unsigned(32))),
        })

    def input_layout(self) -> data.StructLayout:
        """The ``blocks`` payload: a whole block (``block_layout``)."""
        return block_layout(self.hif, self.act, self.layout)

    # -- pipeline shape ----------------------------------------------------------------------------
    @property
    def latency(self) -> int:
        """Cycles from a block taken on ``blocks`` to its value on ``values`` (``stages``)."""
        return self.stages()

    def stages(self) -> int:
        """Pipeline stages from a block taken to its value (the section list of the module docstring):
        the lanes, the adder tree, the tail."""
        return self.lane_stages() + int(np.log2(self.layout.group)) + self.tail_stages()

    def tail_stages(self) -> int:
        """``scaled_word``'s stages: ``|A|``, the scale multiplier and ``Q``, the barrier and leading
        zeros, the normalizing shift, the rounding."""
        mul2 = PipelinedMultiplier.stages(self.scale.mbits + 1)
        return 1 + mul2 + 1 + 3 + shift_stages(self.nq) + 3

    # -- build ----------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        g, W, scale, NQ = self.layout.group, self.acc.bits, self.scale, self.nq

        lanes = min(g, 32)                     # an enable copy per lane (per two lanes at g = 64)
        ctl, out = output_pipeline(m, self.latency, self.values, lanes)
        inp = self.blocks.payload
        m.d.comb += ctl.valid.eq(self.blocks.valid)
        m.d.comb += self.blocks.ready.eq(ctl.enable.en)      # a block enters on every enabled edge
        en0 = ctl.enable.en                    # the block path and everything after the tree
        en_lane = [ctl.enable.lane[j * lanes // g] for j in range(g)]

        def reg(en, name, value, shape):
            return stage_reg(m, en, name, value, shape)

        def delay(en, value, n, name):
            return arith_delay(m, en, value, n, name)

        # -- per lane: product, sign, alignment shift; negate; align ---------------------------------
        terms = [self.lane(m, en_lane[j], j, inp.hif[j], inp.act[j]) for j in range(g)]
        depth = self.lane_stages()

        # -- the exact sum: a tree of signed adders, one level per stage --------------------------------
        A, levels = adder_tree(m, en_lane, terms)
        depth += levels
        assert len(A) == W, (len(A), W)

        # -- the block path: scale significand, sign, kmax = NQ - 1 + E + 126 --------------------------------
        _, Ss, es = code_fields(scale, inp.scale)
        s_lo, s_hi = dot.exponent_range(scale)
        const = NQ - 1 + self.acc.lsb_exp + s_lo + 126
        kmax_top = const + (s_hi - s_lo) + OFFSET_RANGE[1]
        es, off = reg(en0, "es_1", es, unsigned(scale.ebits)), reg(en0, "off_1", inp.offset, OFFSET_SHAPE)
        ss = reg(en0, "ss_1", Ss, unsigned(len(Ss)))
        sb = reg(en0, "sb_1", inp.sign, 1)
        eo = reg(en0, "eo_2", es + off, signed(10))
        kmax = reg(en0, "kmax_3", eo + const, unsigned(kmax_top.bit_length()))
        ss, sb = delay(en0, ss, 2, "ss"), delay(en0, sb, 2, "sb")
        kmax, ss, sb = (delay(en0, v, depth - 3, n) for v, n in ((kmax, "kmax"), (ss, "ss"), (sb, "sb")))

        word, tail = self.scaled_word(m, en0, A, kmax, ss, sb)
        depth += tail
        assert depth == self.latency, (depth, self.latency)
        m.d.comb += Value.cast(out.last).eq(word)
        return m

    def lane_stages(self) -> int:
        """``lane``'s stages: the input register, the multiplier, negate, the alignment shift."""
        return 1 + PipelinedMultiplier.stages(self.act.mbits + 1) + 1 + shift_stages(self.acc.span)

    def lane(self, m: Module, en, j: int, hcode, xcode) -> Value:
        """Lane ``j``: the product of HIF code ``hcode`` and activation code ``xcode`` as a signed
        integer aligned to the accumulator's LSB (``P + D + 1`` bits), ``lane_stages()`` stages later,
        its registers on ``en``: the fields, ``Sh * Sx`` beside ``t`` = the exponents' sum, negate,
        the shift left by ``t``. (The folded unit, hdl.block_dot_folded, builds its lanes with it.)"""
        hif, act = self.hif, self.act
        P, D = self.acc.product_bits, self.acc.span

        def reg(en, name, value, shape):
            return stage_reg(m, en, name, value, shape)

        def delay(en, value, n, name):
            return arith_delay(m, en, value, n, name)

        mul1 = PipelinedMultiplier.stages(act.mbits + 1)
        sh, Sh, eh = code_fields(hif, hcode)
        sx, Sx, ex = code_fields(act, xcode)
        m.submodules[f"mul{j}"] = mul = PipelinedMultiplier(hif.mbits + 1, act.mbits + 1)
        Sh, Sx = reg(en, f"sh{j}_1", Sh, unsigned(len(Sh))), reg(en, f"sx{j}_1", Sx, unsigned(len(Sx)))
        m.d.comb += [mul.en.eq(en), mul.a.eq(Sh), mul.b.eq(Sx)]
        # the exponents registered at the input (a LUT each), added in the next stage
        eh, ex = reg(en, f"eh{j}_1", eh, unsigned(hif.ebits)), reg(en, f"ex{j}_1", ex, unsigned(act.ebits))
        t = reg(en, f"t{j}_2", eh + ex, unsigned(max(1, D.bit_length())))
        s = reg(en, f"s{j}_1", sh ^ sx, 1)
        t, s = delay(en, t, mul1 - 1, f"t{j}"), delay(en, s, mul1, f"s{j}")
        pn = reg(en, f"pn{j}", self.negate(s, mul.p), signed(P + 1))
        t = reg(en, f"t{j}_n", t, t.shape())
        return shift_left(m, en, pn, t, P + D + 1, f"al{j}_")

    def scaled_word(self, m: Module, en0, A, kmax, ss, sb) -> tuple[Value, int]:
        """Section 3's one rounding of a block, from its exact sum ``A`` (signed, ``self.acc.bits`` bits or
        a window of it), ``kmax``, the scale significand ``ss`` and the block sign ``sb``, all at one
        stage: the binary32 word and the stages it takes (``|A|``, ``Q = |A| * Ss`` and the barrier,
        leading zeros, the normalizing shift, ``round_fp32``). Both activation paths end here."""
        W, NQ, scale = len(A), self.nq, self.scale

        def reg(en, name, value, shape):
            return stage_reg(m, en, name, value, shape)

        def delay(en, value, n, name):
            return arith_delay(m, en, value, n, name)

        tail = 0
        # -- |A|, the sign, the barrier; Q = |A| * Ss ----------------------------------------------------------
        mag = reg(en0, "mag", Mux(A[-1], -A, A)[:W - 1], unsigned(W - 1))
        neg = reg(en0, "neg", A[-1] ^ sb, 1)
        barrier = reg(en0, "barrier", Cat(kmax == NQ - 1 - i for i in range(NQ)), unsigned(NQ))
        kmax = reg(en0, "kmax_m", kmax, kmax.shape())
        # Ss gates every partial product of both multipliers: a register copy for each (hdl.replica)
        ss_copy = [rep.replica(ss.shape(), name=f"ss_m{i}", reset_less=True) for i in range(2)]
        with m.If(en0):
            m.d.sync += [c.eq(ss) for c in ss_copy]
        # |A| * Ss as two half-width products (no carry chain longer than about W / 2 + Ms), then
        # their sum: the low half's bottom bits pass, its top bits add to the high half
        half = (W - 1) // 2
        m.submodules.scale_mul_lo = mul_lo = PipelinedMultiplier(half, scale.mbits + 1)
        m.submodules.scale_mul_hi = mul_hi = PipelinedMultiplier(W - 1 - half, scale.mbits + 1)
        m.d.comb += [mul_lo.en.eq(en0), mul_lo.a.eq(mag[:half]), mul_lo.b.eq(ss_copy[0]),
                     mul_hi.en.eq(en0), mul_hi.a.eq(mag[half:]), mul_hi.b.eq(ss_copy[1])]
        Q = reg(en0, "q", Cat(mul_lo.p[:half], mul_hi.p + mul_lo.p[half:]), unsigned(NQ))
        neg, barrier, kmax = (delay(en0, v, mul_lo.latency + 1, n) for v, n in
                              ((neg, "neg"), (barrier, "barrier"), (kmax, "kmax_q")))
        tail += 1 + mul_lo.latency + 1

        # -- normalize: k = leading zeros of Q | barrier = min(lz(Q), kmax) -------------------------------------
        qb = reg(en0, "qb", Q | barrier, unsigned(NQ))
        nzq = reg(en0, "nzq", Cat(Q[lo:hi].any() for lo, hi in chunks(NQ)), unsigned(len(chunks(NQ))))
        k = leading_zeros_pipelined(m, en0, qb, "k")                         # 2 stages
        zero = reg(en0, "zero_z", ~nzq.any(), 1)
        zero = reg(en0, "zero_z2", zero, 1)
        q2, neg, kmax = (delay(en0, v, 3, n) for v, n in ((Q, "q_z"), (neg, "neg_z"), (kmax, "kmax_z")))
        tail += 3

        # -- shift by k; beside the first stage, kmax - k ---------------------------------------------------
        n_norm = shift_stages(NQ)
        ebm1 = reg(en0, "ebm1", kmax - k, unsigned(len(kmax)))
        qs = shift_left(m, en0, q2, k, NQ, "norm")
        zero, neg = delay(en0, zero, n_norm, "zero_n"), delay(en0, neg, n_norm, "neg_n")
        ebm1 = delay(en0, ebm1, n_norm - 1, "ebm1")
        tail += n_norm

        # -- round: {ef, mantissa} + up; saturate, zero, sign --------------------------------------------------
        word = round_fp32(m, en0, qs, ebm1, zero, neg, Const(0, 1), self.round_up, "r")
        tail += 3
        return word, tail

    @staticmethod
    def negate(sign, p):
        """The product in two's complement: ``-p`` when its sign is set."""
        return Mux(sign, -p, p)

    @staticmethod
    def round_up(lsb, guard, sticky):
        """Round to nearest, ties to even: up when past the half, or at it with an odd significand."""
        return guard & (sticky | lsb)


# -- pipelined building blocks (also used by hdl.fp32_acc) ------------------------------------------------

def output_pipeline(m: Module, depth: int, port, lanes: int = 1) -> tuple[PipelineControl, OutputStage]:
    """The stream handshake of a pipeline of ``depth`` stages whose result drives ``port`` (an out
    stream): hdl.pipeline's control (the enable tree, one copy per lane, and the valid chain) and an
    hdl.output_buffer stage, the payload's bits split over ``lanes`` lanes of ``ceil(width / lanes)``
    bits (where ``lanes`` does not divide the width, the top ones carry constant 0), joined as the
    decoder joins them (two register levels of the enable and two skid entries above 8 lanes). The
    caller feeds ``ctl.valid``, moves its registers on ``ctl.enable`` and drives ``out.last`` (as a
    value) from its last stage."""
    width = Shape.cast(port.payload.shape()).width
    per = -(-width // lanes)
    m.submodules.ctl = ctl = PipelineControl(lanes, depth)
    m.submodules.out = out = OutputStage(unsigned(per), lanes, levels=rep.enable_levels(lanes))
    wiring.connect(m, control=ctl.buffers, output=out.control)
    words = Value.cast(out.values.payload)
    m.d.comb += [port.valid.eq(out.values.valid),
                 Value.cast(port.payload).eq(words if per * lanes == width else words[:width]),
                 out.values.ready.eq(port.ready)]
    return ctl, out


def adder_tree(m: Module, en_lane, terms) -> tuple[Value, int]:
    """The exact sum of ``terms`` (signed, one per lane, equal widths, a power of two of them): a tree
    of signed adders, one level a stage, each sum one bit wider than its operands (no overflow), level
    ``l``'s ``i``-th sum moving on lane ``2 i << l``'s enable. Returns the sum and the levels."""
    level, width = 0, len(terms[0])
    while len(terms) > 1:
        width += 1
        terms = [stage_reg(m, en_lane[2 * i << level], f"sum{level}_{i}", terms[2 * i] + terms[2 * i + 1],
                           signed(width)) for i in range(len(terms) // 2)]
        level += 1
    return terms[0], level


def round_fp32(m: Module, en, q, ebm1, zero, sign, zero_sign, round_up, name: str) -> Signal:
    """The binary32 pattern of a normalized ``q``, three stages later.

    ``q``'s top 24 bits are the significand at the result's quantum (its leading one at bit 23 for a
    normal result, below for a subnormal one), the rest below it; ``ebm1`` is the biased exponent minus
    one of a normal result, 0 for a subnormal one. Stages: the guard bit, the sticky OR of the rest,
    ``ef = ebm1 + kept[23]`` and the increment ``round_up(kept[0], guard, sticky)``; then
    ``{ef, kept[22:0]} + up`` (a mantissa carry walks into the exponent by itself, a subnormal that
    rounds up becomes the smallest normal); then an exponent field of 255 or more saturates to
    FLT_MAX, a ``zero`` gives ``zero_sign`` and zero, the sign goes on top."""
    qp = Cat(Const(0, max(0, 25 - len(q))), q)
    n = len(qp)
    kept, guard, rest = qp[n - 24:], qp[n - 25], qp[:n - 25]
    sticky = rest.any() if len(rest) else Const(0, 1)
    mant = stage_reg(m, en, f"{name}_mant", kept[:23], unsigned(23))
    ef = stage_reg(m, en, f"{name}_ef", ebm1 + kept[23], unsigned(len(ebm1) + 1))
    up = stage_reg(m, en, f"{name}_up", round_up(kept[0], guard, sticky), 1)
    zero, sign, zero_sign = (arith_delay(m, en, v, 2, f"{name}_{n}")
                             for v, n in ((zero, "zero"), (sign, "sign"), (zero_sign, "zsign")))
    word = stage_reg(m, en, f"{name}_word", Cat(mant, ef) + up, unsigned(23 + len(ef) + 1))
    sat = word[23:] >= 255
    return stage_reg(m, en, f"{name}_out", Mux(zero, Cat(Const(0, 31), zero_sign),
                                                 Cat(Mux(sat, FP32_MAX_BITS, word[:31]), sign)), unsigned(32))
