"""HIF formatter: one lane's LUT value (HIF) times the block scale, into the output format.

Pipelined; every register advances on ``en`` (the decoder's global pipeline
enable), so the datapath holds its state while the output is stalled.

Stage 1 (all outputs): split the HIF code into sign, significand ``Sh`` (hidden
bit included) and exponent; ``sig = Sh * Ss``, ``exp = Xh + Xs`` (the scale's
``Xs`` already carries the per-layer offset), ``sign = sign_h ^ sign_block``.
This is golden.decoder.product_fields; for ``output="exact"`` it is the output.

For ``output="bf16"`` two more stages round the exact value once, to nearest
with ties to even, saturating, subnormals kept (golden.formats' rule):

Stage 2: find the leading one ``L`` of ``sig``; the BF16 biased exponent is
``Eb = exp + L + 127``; with ``E1 = max(Eb, 1)`` the BF16 quantum is
``2^(E1 - 134)``, and ``R0, guard, sticky`` are ``sig`` aligned to it.
Stage 3: ``R = R0 + (guard & (sticky | R0[0]))`` and the BF16 bits are
``((E1 - 1) << 7) + R`` (a mantissa carry walks into the exponent by itself,
and a subnormal that rounds up becomes the smallest normal); at or past
``0x7F80`` the result saturates to ``0x7F7F``; the sign goes on top.
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
        self.latency = 1 if config.output == "exact" else 3
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
        cfg, hif = self.config, self.config.hif
        M, E = hif.mbits, hif.ebits
        mant, expf, sign_h = self.hif[:M], self.hif[M:M + E], self.hif[M + E]
        normal = expf != 0

        sig = Signal(unsigned(cfg.sig_bits))
        exp = Signal(cfg.exp_shape)
        sign = Signal()
        with m.If(self.en):
            m.d.sync += [
                sig.eq(Cat(mant, normal) * self.scale_sig),
                exp.eq(Mux(normal, expf, 1) - (hif.bias + M) + self.scale_exp),
                sign.eq(sign_h ^ self.block_sign),
            ]
        if cfg.output == "exact":
            m.d.comb += [self.out.sig.eq(sig), self.out.exp.eq(exp), self.out.sign.eq(sign)]
            return m
        self._bf16(m, sig, exp, sign)
        return m

    @staticmethod
    def round_up(r0, guard, sticky):
        """Round to nearest, ties to even: up when past the half, or at it with R0 odd."""
        return guard & (sticky | r0[0])

    def _bf16(self, m: Module, sig: Signal, exp: Signal, sign: Signal):
        P = self.config.sig_bits
        # Stage 2: leading one, BF16 exponent, alignment to the BF16 quantum.
        lead = Signal(range(P))
        for i in range(P):                           # priority encoder: the highest set bit wins
            with m.If(sig[i]):
                m.d.comb += lead.eq(i)
        lo, hi = self.config.exp_range
        eb_shape = signed(_signed_width(lo + BF16_BIAS, hi + P + BF16_BIAS) + 1)
        eb = Signal(eb_shape)
        m.d.comb += eb.eq(exp + lead + BF16_BIAS)
        e1 = Signal(eb_shape)
        m.d.comb += e1.eq(Mux(eb >= 1, eb, 1))
        # shift d = exp - (E1 - 134): left by d when d >= 0 (never past bit 7), else right by -d
        d = Signal(signed(eb_shape.width + 2))
        m.d.comb += d.eq(exp - e1 + (BF16_BIAS + BF16_M))
        wide = P + BF16_M + 2                        # room for sig << 7 and two rounding bits
        aligned = Signal(unsigned(wide + P))
        # Place sig at bit P (leaving P bits below for guard and sticky), then shift.
        placed = Cat(Const(0, P), sig)
        shift_left = Signal(range(BF16_M + 1))
        shift_right = Signal(range(P + 2))
        m.d.comb += [
            shift_left.eq(Mux(d >= 0, d, 0)),
            shift_right.eq(Mux(d >= 0, 0, Mux(-d > P + 1, P + 1, -d))),
            aligned.eq((placed << shift_left) >> shift_right),
        ]
        r0, guard, sticky = Signal(BF16_M + 2), Signal(), Signal()
        e1_r, sign_r, zero_r = Signal(eb_shape), Signal(), Signal()
        with m.If(self.en):
            m.d.sync += [
                r0.eq(aligned[P:P + BF16_M + 2]),
                guard.eq(aligned[P - 1]),
                sticky.eq(aligned[:P - 1].any()),
                e1_r.eq(e1), sign_r.eq(sign), zero_r.eq(sig == 0),
            ]
        # Stage 3: round to nearest even, assemble, saturate.
        rounded = Signal(BF16_M + 3)
        m.d.comb += rounded.eq(r0 + self.round_up(r0, guard, sticky))
        mag = Signal(signed(eb_shape.width + BF16_M + 2))
        m.d.comb += mag.eq(((e1_r - 1) << BF16_M) + rounded)
        out = Signal(16)
        with m.If(self.en):
            with m.If(zero_r):
                m.d.sync += out.eq(Cat(Const(0, 15), sign_r))
            with m.Elif(mag >= 0x7F80):
                m.d.sync += out.eq(Cat(Const(0x7F7F, 15), sign_r))
            with m.Else():
                m.d.sync += out.eq(Cat(mag[:15], sign_r))
        m.d.comb += self.out.eq(out)
