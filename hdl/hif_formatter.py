"""HIF formatter: one lane's LUT value (HIF) times the block scale, into the output format.

Pipelined; every register advances on ``en`` (the decoder's global pipeline
enable), so the datapath holds its state while the output is stalled. Each
stage is short (a few LUT levels or one small multiply), for Fmax.

Exact output (golden.decoder.product_fields), 2 stages:

1. register the HIF code and the block's scale fields;
2. ``sig = Sh * Ss``, ``exp = Xh + Xs`` (``Xs`` already carries the per-layer
   offset), ``sign = sign_h ^ sign_block``.

BF16 output (round to nearest, ties to even, saturating, subnormals kept:
golden.formats' rule), 8 stages:

1. register the inputs;
2. normalize both operands: a subnormal HIF significand or scale significand is
   shifted up to its leading one (its exponent down by as much), so that each
   significand has its top bit set (or is zero);
3. multiply the normalized significands (the product's leading one is then at
   one of its two top bits) and, beside it, add the exponents;
4. select that leading one (a 1-bit normalize), take the 8 bits from it down
   (``R0``), the next bit (``guard``) and the OR of the rest (``sticky``), and
   form the BF16 biased exponent ``Eb`` and the subnormal shift ``1 - Eb``;
4b. clamp the shift, form the exponent field and the saturation flag;
5. for a subnormal result (``Eb < 1``) shift ``R0, guard`` right by ``1 - Eb``
   (at most 10), folding what falls off into ``sticky``;
6. ``R = R0 + (guard & (sticky | R0[0]))``;
7. the BF16 bits are ``((max(Eb, 1) - 1) << 7) + R`` (a mantissa carry walks
   into the exponent by itself and a subnormal that rounds up becomes the
   smallest normal); at or past ``0x7F80`` the result saturates to ``0x7F7F``;
   the sign goes on top.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import DecoderConfig, _signed_width, scale_exp_shape

BF16_BIAS, BF16_M = 127, 7


class HifFormatter(wiring.Component):
    def __init__(self, config: DecoderConfig):
        self.config = config
        hif, scale = config.hif, config.scale
        self.latency = self.stages(config)
        super().__init__({
            "en": In(1),
            "hif": In(unsigned(hif.bits)),
            "block_sign": In(1),
            "scale_sig": In(unsigned(scale.mbits + 1)),
            "scale_exp": In(scale_exp_shape(config.layout)),
            "out": Out(config.lane_layout),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, hif, scale = self.config, self.config.hif, self.config.scale
        M, E = hif.mbits, hif.ebits

        def stage(*pairs):
            """Registers loaded from ``pairs`` (name, value, shape) when ``en`` is high."""
            regs = []
            for name, value, shape in pairs:
                r = Signal(shape, name=name)
                with m.If(self.en):
                    m.d.sync += r.eq(value)
                regs.append(r)
            return regs

        # 1: the inputs
        h, bsign, ss, xs = stage(("h1", self.hif, unsigned(hif.bits)), ("bsign1", self.block_sign, 1),
                                 ("ss1", self.scale_sig, unsigned(scale.mbits + 1)),
                                 ("xs1", self.scale_exp, scale_exp_shape(cfg.layout)))
        mant, expf, sign_h = h[:M], h[M:M + E], h[M + E]
        normal = expf != 0
        if cfg.output == "exact":
            sig, exp, sign = stage(("sig", Cat(mant, normal) * ss, unsigned(cfg.sig_bits)),
                                   ("exp", Mux(normal, expf, 1) - (hif.bias + M) + xs, cfg.exp_shape),
                                   ("sign", sign_h ^ bsign, 1))
            m.d.comb += [self.out.sig.eq(sig), self.out.exp.eq(exp), self.out.sign.eq(sign)]
            return m

        # 2: normalize both significands to a set top bit (exponents adjusted separately)
        a_raw = Cat(mant, normal)                         # M + 1 bits
        lz_a = self._leading_zeros(m, a_raw, "lz_a")
        lz_s = self._leading_zeros(m, ss, "lz_s")
        lo, hi = cfg.exp_range
        x_shape = signed(_signed_width(lo - M - scale.mbits - 2, hi) + 1)
        a, b, xh, xs, sign, zero = stage(
            ("a2", a_raw << lz_a, unsigned(M + 1)), ("b2", ss << lz_s, unsigned(scale.mbits + 1)),
            ("xh2", Mux(normal, expf, 1) - lz_a, signed(E + 2)), ("xs2", xs - lz_s, x_shape),
            ("sign2", sign_h ^ bsign, 1), ("zero2", (a_raw == 0) | (ss == 0), 1))

        # 3: multiply; beside it, the product's exponent
        P = cfg.sig_bits
        p, x, sign, zero = stage(("p3", a * b, unsigned(P)), ("x3", xh + xs - (hif.bias + M), x_shape),
                                 ("sign3", sign, 1), ("zero3", zero, 1))

        # 4: select the leading one (bit P-1 or P-2: a 1-bit normalize); the 8 bits from it down
        #    (R0), the next (guard), the OR of the rest (sticky); the BF16 biased exponent Eb and
        #    the subnormal shift 1 - Eb
        Q = max(P, BF16_M + 3)                           # room for R0, guard and one sticky bit
        top = p[P - 1]
        n = Signal(unsigned(Q), name="n4")
        m.d.comb += n.eq(Cat(Const(0, Q - P), Mux(top, p, p << 1)))
        eb_shape = signed(x_shape.width + 2)
        r0, guard, sticky, eb, back, sign, zero = stage(
            ("r0_4", n[Q - 8:], unsigned(8)), ("guard4", n[Q - 9], 1), ("sticky4", n[:Q - 9].any(), 1),
            ("eb4", Mux(top, x + (P - 1 + BF16_BIAS), x + (P - 2 + BF16_BIAS)), eb_shape),
            ("back4", Mux(top, (2 - P - BF16_BIAS) - x, (3 - P - BF16_BIAS) - x), eb_shape),
            ("sign4", sign, 1), ("zero4", zero, 1))

        # 4b: clamp the shift (from 9 on everything rounds to 0), the exponent field, saturation
        r0, guard, sticky, shift, e1, sat, sign, zero = stage(
            ("r0_4b", r0, unsigned(8)), ("guard4b", guard, 1), ("sticky4b", sticky, 1),
            ("shift4b", Mux(back <= 0, 0, Mux(back > 10, 10, back)), range(11)),
            ("e1m1_4b", Mux(eb >= 1, eb - 1, 0), unsigned(8)),    # sat4b: it does not fit 8 bits
            ("sat4b", eb >= 256, 1), ("sign4b", sign, 1), ("zero4b", zero, 1))

        # 5: subnormal results: shift right by 1 - Eb (clamped: from 9 on everything rounds to 0)
        ext = Signal(unsigned(19), name="ext5")
        m.d.comb += ext.eq(Cat(Const(0, 10), guard, r0) >> shift)
        r0, guard, sticky, e1, sat, sign, zero = stage(
            ("r0_5", ext[11:], unsigned(8)), ("guard5", ext[10], 1), ("sticky5", sticky | ext[:10].any(), 1),
            ("e1m1_5", e1, unsigned(8)), ("sat5", sat, 1), ("sign5", sign, 1), ("zero5", zero, 1))

        # 6: round to nearest even
        rounded, e1, sat, sign, zero = stage(
            ("rounded6", r0 + self.round_up(r0, guard, sticky), unsigned(BF16_M + 2)),
            ("e1m1_6", e1, unsigned(8)), ("sat6", sat, 1), ("sign6", sign, 1), ("zero6", zero, 1))

        # 7: assemble: (E1 - 1) * 128 + R = {E1 - 1 + R[8:7], R[6:0]}; saturate at 0x7F80
        exp_field = Signal(unsigned(9), name="exp7")
        m.d.comb += exp_field.eq(e1 + rounded[BF16_M:])
        # biased exponent 255 (Inf/NaN in BF16) or beyond: saturate
        word = Mux(zero, 0, Mux(sat | exp_field[8] | (exp_field == 255),
                               0x7F7F, Cat(rounded[:BF16_M], exp_field[:8])))
        (out,) = stage(("out7", Cat(word, sign), unsigned(16)))
        m.d.comb += self.out.eq(out)
        return m

    @staticmethod
    def stages(config: DecoderConfig) -> int:
        """Pipeline stages (= cycles of latency) for ``config``'s output format."""
        return 2 if config.output == "exact" else 8

    @staticmethod
    def _leading_zeros(m: Module, value, name: str):
        """Leading zeros of ``value`` within its width (priority encoder; 0 for a zero value)."""
        w = len(value)
        lz = Signal(range(w + 1), name=name)
        for i in range(w):                    # the highest set bit wins
            with m.If(value[i]):
                m.d.comb += lz.eq(w - 1 - i)
        return lz

    @staticmethod
    def round_up(r0, guard, sticky):
        """Round to nearest, ties to even: up when past the half, or at it with R0 odd."""
        return guard & (sticky | r0[0])
