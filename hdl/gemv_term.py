"""The GEMV engine's residual term unit: one sparse entry's ``T = RNE_fp32(rho * x_j)`` (hdl.gemv).

Role: for each residual entry the sequencer passes on (``entry_layout``: its column, BF16 value
``rho`` and tag), read the entry's activation through the x buffer's read port and make the term
that follows the row's block values into its running sum (golden.dot step 4). Two units, one per
activation format: ``ResidualTerm`` (E4M3: the product is exact or saturated) and
``ResidualTermBF16`` (BF16: rounded where it falls below 2^-126); ``residual_term_class`` picks
the engine's. Both are pipelines that never stall, with a FIFO and credits at their end (no
outside ``ready`` reaches the x buffer). Ports (``term_signature``), stages and latency: the
classes' docstrings; ``model`` golden.dot.residual_terms' rounding.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from sop.golden import dot
from sop.golden.formats import FORMATS, to_float32

from .arith import PipelinedMultiplier, Stages, delay, leading_zeros, stage_reg, trailing_zeros
from .gemv_config import GemvConfig, entry_layout, tag_layout

BF16 = FORMATS["bf16"]


def _bf16_fields(code):
    """(sign, significand with its hidden bit, X + 134) of a BF16 code: X = max(e, 1) - 127 - 7."""
    e = code[7:15]
    return code[15], Cat(code[:7], e.any()), Mux(e.any(), e, 1)


def term_signature(config: GemvConfig) -> wiring.Signature:
    """The term unit's ports (``ResidualTerm``; an engine without the residual path has the same
    signals, created and left at 0)."""
    g, bits = config.group, config.act_format.bits
    return wiring.Signature({
        "entries": In(stream.Signature(entry_layout(config))),
        "x_en": Out(1), "x_out_en": Out(1), "x_addr": Out(range(config.max_blocks)),
        # (with a folded unit the x buffer returns a chunk of P codes: ``x_chunk`` picks it)
        **({"x_chunk": Out(range(g // config.macs_per_cycle))} if config.dot_lanes else {}),
        "x_data": In(unsigned(config.macs_per_cycle * bits)),
        "terms": Out(stream.Signature(data.StructLayout({"value": unsigned(32), "tag": tag_layout(config)}))),
        "busy": Out(1),
    })


def model(rho_bf16, x_codes, act: str) -> np.ndarray:
    """The terms (binary32 patterns) of BF16 values ``rho_bf16`` times codes ``x_codes`` of activation
    format ``act`` (a unit's ``ACT``): golden.dot.residual_terms' rounding."""
    rho = BF16.decode(np.asarray(rho_bf16, np.int64))
    x = dot.ACT_FORMATS[act].decode(np.asarray(x_codes, np.int64))
    return to_float32(rho * x).view(np.uint32)


class ResidualTerm(wiring.Component):
    """One sparse entry's term ``T = RNE_fp32(rho * x_j)`` with E4M3 activations (golden.dot step 4),
    ``latency`` (11) cycles (BF16 activations: ``ResidualTermBF16``).

    The product of a BF16 significand (8 bits) and an E4M3 one (4 bits) is 12 bits at an exponent
    ``X >= -133 - 9 = -142``: every such value at or above 2^-149 is a binary32 value, subnormal or
    normal, so ``T`` is the exact product, or +-FLT_MAX where it is beyond (``X + 11 >= 128``): no
    rounding. A zero product keeps the IEEE sign. Stages, a pipeline that never stalls (its terms wait
    in a FIFO of ``latency + 2`` at its end; an entry is taken only while there is room for it and
    every one inside: a credit register, so no outside ``ready`` reaches the x buffer), each one mux
    or one short chain: 1 the x word read into the RAM's latch (the entry's block column; the engine
    lends the port only while no block is inside); 2 the word in the x buffer's output register (the
    block RAM's own: ``x_out_en``); 3 the word in a register of its own (after the x buffer's
    row mux); 4 the entry's code out of the word (and rho's fields, the
    constant part of the exponent sum); 5 both significands, the exponent sum and the sign; 6-7 the
    product (hdl.arith's LUT multiplier); 8 its leading zeros; 9 the biased exponent and the
    subnormal shift; 10 the candidates, normal (the leading one dropped) and subnormal (P at the
    2^-149 quantum), and the conditions; 11 the binary32 pattern: one of those, saturated, or a
    signed zero.

    Ports: ``entries`` (in stream: ``col``, ``value`` (BF16), ``tag``), ``x_en``, ``x_out_en`` (the
    next cycle), ``x_addr`` (out) and ``x_data`` (in, two cycles later): the x buffer's read port; ``terms`` (out stream: ``value``,
    ``tag``), ``busy`` (out, a register: an entry or a term is inside, or was a cycle ago). ``model`` is
    golden.dot.residual_terms' rounding."""

    ACT = "e4m3"        #: the activation format the unit is built for (``model`` decodes it)
    TAIL = 5            #: the stages beside stages 1-4 and the product's: 5 and 8-11 above

    @classmethod
    def model(cls, rho_bf16, x_codes) -> np.ndarray:
        return model(rho_bf16, x_codes, cls.ACT)

    def __init__(self, config: GemvConfig):
        self.config = config
        self.multiplier = PipelinedMultiplier(BF16.mbits + 1, config.act_format.mbits + 1)
        super().__init__(term_signature(config))

    @property
    def latency(self) -> int:
        """Cycles from an entry taken to its term: stages 1-4, the product's and the ``TAIL``."""
        return 4 + self.multiplier.latency + self.TAIL

    def front(self, m, rho_exponent):
        """The part both term units share: the credits and the FIFO at the end, and stages 1-4 (the x
        word read, in the x buffer's output register, registered, and the entry's code out of it beside
        rho's sign, significand and ``rho_exponent(er)``, a ``(name, value, shape)`` stage field: what a
        unit keeps of rho's biased exponent). Returns ``(stage, carry, code, sr, Sr, e, tag, finish)``:
        ``tag`` delayed to stage 4, ``finish(stage, out, tag)`` queues the last stage's pattern."""
        cfg = self.config
        bits, lane_bits = cfg.act_format.bits, (cfg.group - 1).bit_length()
        sel_bits = (cfg.macs_per_cycle - 1).bit_length()        # the code's place in an x read: its lane
        ent = self.entries
        # The pipeline never stalls (its enable is 1): its terms wait in a FIFO at its end, and an entry
        # is taken only while that FIFO has room for it and every one inside (a credit register), so
        # that no ``ready`` from outside reaches the x buffer's read enable.
        depth = self.latency + 2
        m.submodules.queue = queue = fifo.SyncFIFOBuffered(width=32 + tag_layout(cfg).size, depth=depth)
        room = Signal(range(depth + 1), init=depth, name="room")
        busy = Signal(name="busy")      # room != depth, or was (a register: high a cycle longer at most)
        v = [Signal(name=f"valid{i}") for i in range(self.latency)]
        en = Const(1)
        take = Signal(name="take")
        pop = self.terms.valid & self.terms.ready
        room_next = room - take + pop
        m.d.comb += [ent.ready.eq(room != 0), take.eq(ent.valid & ent.ready), self.busy.eq(busy)]
        m.d.sync += [v[0].eq(take), room.eq(room_next), busy.eq((room != depth) | take)]
        m.d.sync += [v[i + 1].eq(v[i]) for i in range(self.latency - 1)]
        stage = Stages(m, en)

        def carry(value, n, name):
            return delay(m, en, value, n, name)

        # 1: the x word (read at this edge); the entry's lane, value and tag
        m.d.comb += [self.x_en.eq(take), self.x_out_en.eq(v[0]), self.x_addr.eq(ent.payload.col >> lane_bits)]
        if cfg.dot_lanes:      # folded: the chunk of the word with the code (read with the word)
            m.d.comb += self.x_chunk.eq(ent.payload.col[sel_bits:lane_bits])
        lane, rho, tag = stage(("lane", ent.payload.col[:sel_bits] if sel_bits else 0, unsigned(max(1, sel_bits))),
                               ("rho", ent.payload.value, unsigned(16)), ("tag1", ent.payload.tag, tag_layout(cfg)))
        # 2: the x word in the x buffer's output register (``x_out_en``, a cycle after the read);
        # 3: the word registered; 4: the activation code out of it (a 16:1 mux); beside it rho's fields.
        #    The word is registered first: with two x pages in DP16KDs the x buffer's output is a row
        #    mux (4:1 at 16384 columns) after the block RAMs' registers, too slow in front of the 16:1
        #    code mux in one cycle (7.8 ns on ECP5).
        word, lane, rho = stage(("x_word", self.x_data, self.x_data.shape()), ("lane2", carry(lane, 1, "lane"), lane.shape()),
                                ("rho2", carry(rho, 1, "rho"), unsigned(16)))
        sr, Sr, er = _bf16_fields(rho)
        code, sr, Sr, e = stage(("code", word.word_select(lane, bits) if sel_bits else word[:bits], unsigned(bits)),
                                ("sr2", sr, 1), ("Sr2", Sr, 8), rho_exponent(er))
        tag = carry(tag.as_value(), 3, "tag")

        def finish(stage, out, tag):
            assert 1 + stage.depth + self.multiplier.latency == self.latency, (stage.depth, self.latency)  # 1: the RAM's register
            m.d.comb += [queue.w_en.eq(v[-1]), queue.w_data.eq(Cat(out, tag)),
                         self.terms.valid.eq(queue.r_rdy), self.terms.payload.as_value().eq(queue.r_data),
                         queue.r_en.eq(pop)]
        return stage, carry, code, sr, Sr, e, tag, finish

    def product(self, m, stage, carry, sign, Sr, Sx, eb, tag):
        """Stage 5 (the sign, both significands and ``eb``, a ``(name, value, shape)`` stage field: the
        two units' exponent sums differ) and the multiplier's stages after it, with the sign, ``eb``
        and ``tag`` carried beside. Returns ``(sign, eb, tag, P)``."""
        sign, Sr, Sx, eb = stage(("sign3", sign, 1), ("sr3", Sr, 8), ("sx3", Sx, len(Sx)), eb)
        tag = carry(tag, 1, "tag3")
        m.submodules.multiplier = mul = self.multiplier
        m.d.comb += [mul.en.eq(stage.en), mul.a.eq(Sr), mul.b.eq(Sx)]
        sign, eb, tag = (carry(x, mul.latency, n) for x, n in ((sign, "sign"), (eb, "eb"), (tag, "tag_m")))
        return sign, eb, tag, mul.p

    def elaborate(self, platform):
        m = Module()
        act = self.config.act_format
        bits = act.bits
        # stages 1-4; beside the code er + 138 - 134 - bias - M (the constant part of eb below)
        stage, carry, code, sr, Sr, erk, tag, finish = self.front(
            m, lambda er: ("erk", er + (138 - 134 - act.bias - act.mbits), signed(10)))
        en = stage.en
        # 5: both significands, the sign, eb = X + 138: the biased binary32 exponent of P * 2^X if P's
        #    leading one were at bit 11 (X = (er - 134) + (ex - bias - M)); the result's is eb - lz(P)
        e_x = code[act.mbits:bits - 1]
        sx, Sx, ex = code[bits - 1], Cat(code[:act.mbits], e_x.any()), Mux(e_x.any(), e_x, 1)
        # 6-7: the product, exact
        sign, eb, tag, p = self.product(m, stage, carry, self.sign(sr, sx), Sr, Sx, ("eb3", erk + ex, signed(10)), tag)
        # 8-9: the leading zeros, the biased exponent, the subnormal shift P << (X + 149) = P << (eb + 11)
        #    (7 .. 22 where it applies): the leading zeros in a stage of their own, then the rest
        lz = leading_zeros(m, p, "lz")
        lz, eb, p, sign, tag = stage(("lz5", lz, lz.shape()), ("eb5", eb, signed(10)), ("p5", p, unsigned(12)),
                                     ("sign5", sign, 1), ("tag5", tag, len(tag)))
        biased, shift, p, sign, tag = stage(("biased", eb - lz, signed(10)), ("sub_shift", (eb + 11)[:5], unsigned(5)),
                                            ("p6", p, unsigned(12)), ("sign6", sign, 1), ("tag6", tag, len(tag)))
        lz = stage_reg(m, en, "lz6", lz, lz.shape())
        # 10: the candidates (normal: the leading one dropped; subnormal: P at the 2^-149 quantum) and
        #    the conditions; 11: the pattern
        normal, sub, zero, sat, norm, biased8, sign, tag = stage(
            ("normal", (p << lz)[:11], unsigned(11)), ("sub", (p << shift)[:23], unsigned(23)),
            ("zero8", p == 0, 1), ("sat8", biased >= 255, 1), ("norm8", biased >= 1, 1),
            ("biased8", biased[:8], unsigned(8)), ("sign8", sign, 1), ("tag8", tag, len(tag)))
        mag = Mux(zero, 0, Mux(sat, 0x7F7FFFFF, Mux(norm, Cat(Const(0, 12), normal, biased8), sub)))
        out, tag = stage(("out", Cat(mag[:31], sign), unsigned(32)), ("tag7", tag, len(tag)))
        finish(stage, out, tag)
        return m

    @staticmethod
    def sign(rho_sign, x_sign):
        """The product's sign (tests override it to inject a bug)."""
        return rho_sign ^ x_sign


class ResidualTermBF16(ResidualTerm):
    """One sparse entry's term ``T = RNE_fp32(rho * x_j)`` with BF16 activations (golden.dot step 4),
    ``latency`` (14) cycles; the ports, the never-stalling pipeline, its credits and its FIFO are
    ``ResidualTerm``'s.

    The product of two BF16 significands (8 bits each) is ``P < 2^16`` at ``X = er + ex - 268``
    (``er``, ``ex`` the biased exponents, 1 for a subnormal), ``-266 <= X <= 240``: wider than
    binary32's range both ways, so the term must be rounded. Write ``eb = er + ex`` and ``lz`` for
    P's leading zeros in 16 bits. Its binary32 exponent field would be ``E = eb - 126 - lz``:

    * ``E >= 255``: beyond FLT_MAX, **saturated** to +-FLT_MAX (0x7F7FFFFF; golden.formats.to_float32);
    * ``1 <= E <= 254``: a normal value whose 16 significant bits fit in 24: **exact**, the pattern
      ``{E, P << lz}`` with the leading one dropped, no rounding;
    * ``E <= 0``: below 2^-126, in units of the 2^-149 quantum ``P * 2^(eb - 119) = (P << 22) >> s``
      with ``s = 141 - eb >= 0`` (``E <= 0`` means ``eb <= 126 + lz <= 141``). The one rounding of the
      term happens here: ``(P << 23) >> min(s, 63)`` gives the 23 kept bits above its bit 0, the
      round bit; the sticky bit (any bit of ``P << 22`` below the round bit) is ``tz(P) + 22 < s - 1``,
      i.e. ``tz(P) + eb < 118`` (``tz``: P's trailing zeros); to nearest, ties to even: ``kept + (round
      & (sticky | kept[0]))``. Bits are dropped only where ``s >= 23``, i.e. the product's LSB is below
      2^-149; then ``kept <= P / 2 < 2^15``, so a rounded term never reaches 2^-126 (the carry into the
      exponent field that a wider significand would need cannot happen), and one whose round bit is
      beyond P (``s >= 39``) is zero. Where ``s < 23`` the shift drops only zeros: the subnormal is exact.
    * ``P = 0``: a zero.

    The sign is always ``sign(rho) xor sign(x)``: a zero product, a product that underflows to zero
    and a saturated one keep the IEEE sign, as float64's product and its rounding into binary32 do.

    Stages (each one mux or one short chain): 1 the x word read into the RAM's latch; 2 the x buffer's
    output register; 3 the word in a register of its own; 4 the entry's code (a 16:1 mux of 16-bit
    codes) and rho's fields; 5 both significands, ``eb`` and the sign; 6-8 the product (hdl.arith's
    LUT multiplier); 9 ``lz`` and ``tz``; 10 ``E``, the shift ``s`` (clamped to 0 .. 63) and the sticky
    bit; 11-12 the subnormal shift (3 bits of ``s`` a stage) beside the normal candidate; 13 the
    rounding increment and the conditions; 14 the binary32 pattern."""

    ACT = "bf16"
    TAIL = 7            #: the stages beside stages 1-4 and the product's: 5 and 9-14 above

    def __init__(self, config: GemvConfig):
        super().__init__(config)
        assert config.act_format is BF16, config.act

    def elaborate(self, platform):
        m = Module()
        # stages 1-4, ResidualTerm's: the x word, then the entry's code beside rho's fields
        stage, carry, code, sr, Sr, er, tag, finish = self.front(m, lambda er: ("er2", er, 8))
        # 5: both significands, the sign, eb = er + ex (the product is P * 2^(eb - 268))
        sx, Sx, ex = _bf16_fields(code)
        # 6-8: the product, exact
        sign, eb, tag, p = self.product(m, stage, carry, self.sign(sr, sx), Sr, Sx, ("eb3", er + ex, unsigned(9)), tag)
        # 9: P's leading and trailing zeros (16 for P = 0)
        lz, tz = leading_zeros(m, p, "lz"), trailing_zeros(p)
        lz, tz, eb, p, sign, tag = stage(("lz5", lz, lz.shape()), ("tz5", tz, range(17)), ("eb5", eb, unsigned(9)),
                                         ("p5", p, unsigned(16)), ("sign5", sign, 1), ("tag5", tag, len(tag)))
        # 10: the exponent field E = eb - 126 - lz, the subnormal shift s = 141 - eb (clamped to 0 .. 63:
        #     s < 0 only where E >= 1, s > 38 leaves nothing), the sticky bit tz + eb < 118
        s = Const(141, unsigned(9)) - eb
        shift = Mux(eb >= 141, 0, Mux(eb <= 141 - 63, 63, s[:6]))
        biased, shift, sticky, lz, p, sign, tag = stage(
            ("biased", eb - 126 - lz, signed(11)), ("sub_shift", shift, unsigned(6)),
            ("sticky", self.sticky(tz, eb), 1), ("lz6", lz, lz.shape()), ("p6", p, unsigned(16)),
            ("sign6", sign, 1), ("tag6", tag, len(tag)))
        # 11-12: (P << 23) >> s, three bits of s a stage; beside it the normal candidate (the leading
        #     one dropped) and the conditions
        wide = Cat(Const(0, 23), p)
        wide, fine, normal, zero, sat, norm, biased8, sign, tag = stage(
            ("sub_wide", wide >> Cat(Const(0, 3), shift[3:]), unsigned(39)), ("sub_fine", shift[:3], unsigned(3)),
            ("normal", (p << lz)[:15], unsigned(15)), ("zero8", p == 0, 1), ("sat8", biased >= 255, 1),
            ("norm8", biased >= 1, 1), ("biased8", biased[:8], unsigned(8)), ("sign7", sign, 1),
            ("tag7", tag, len(tag)))
        sticky = carry(sticky, 1, "sticky7")
        wide, sticky, normal, zero, sat, norm, biased8, sign, tag = stage(
            ("sub_wide8", (wide >> fine)[:24], unsigned(24)), ("sticky8", sticky, 1), ("normal8", normal, 15),
            ("zero9", zero, 1), ("sat9", sat, 1), ("norm9", norm, 1), ("biased9", biased8, 8),
            ("sign8", sign, 1), ("tag8", tag, len(tag)))
        # 13: round to nearest, ties to even (bit 0 the round bit, bits 1-23 the kept ones)
        kept, round_bit = wide[1:], wide[0]
        sub, normal, zero, sat, norm, biased8, sign, tag = stage(
            ("sub", kept + self.round_up(round_bit, sticky, kept[0]), unsigned(24)), ("normal9", normal, 15),
            ("zero10", zero, 1), ("sat10", sat, 1), ("norm10", norm, 1), ("biased10", biased8, 8),
            ("sign9", sign, 1), ("tag9", tag, len(tag)))
        # 14: the pattern: a zero, saturated, normal (exact) or subnormal (rounded); the sign on top
        mag = Mux(zero, 0, Mux(sat, 0x7F7FFFFF, Mux(norm, Cat(Const(0, 8), normal, biased8), sub)))
        out, tag = stage(("out", Cat(mag[:31], sign), unsigned(32)), ("tag10", tag, len(tag)))
        finish(stage, out, tag)
        return m

    @staticmethod
    def sticky(tz, eb):
        """Whether a bit of ``P << 22`` below the round bit (bit ``140 - eb``) is set (tests override it
        to inject a bug)."""
        return (tz + eb) < 118

    @staticmethod
    def round_up(round_bit, sticky, lsb):
        """To nearest, ties to even (tests override it to inject a bug)."""
        return round_bit & (sticky | lsb)


def residual_term_class(config: GemvConfig) -> type[ResidualTerm]:
    """The term unit of the engine's activation format."""
    return ResidualTermBF16 if config.act_format is BF16 else ResidualTerm

