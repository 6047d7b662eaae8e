"""Folded block dot unit: ``BlockDot``'s block value over ``g / P`` cycles, ``P`` products a cycle (docs/dot.md 7.2).

Role: the block dot unit for a small FPGA (the iCE40UP5K of the iCEBreaker, issue 15 section 5),
where ``BlockDot``'s ``g`` lanes, ``g``-input adder tree and wide datapath (6669 logic cells at
g = 16) do not fit. Same ports, same stream contract and the same value bit for bit:

    V_b = RNE_fp32( (-1)^s * A * Ss * 2^(L + Xs + offset) )

as golden.dot defines it (``A`` the exact block sum, one rounding, subnormals kept, saturating at
+-FLT_MAX, ``A * Ss = 0`` gives +0); ``model`` is ``hdl.block_dot.model``. E4M3 activations only
(the accumulator is ``golden.dot.accumulator``'s, 36 bits for E3M6 HIF times E4M3).

The fold. A block is taken in one ``blocks`` transfer; its ``g`` products go into the datapath
``P`` a cycle (``P`` a power of two, ``P < g``; ``P = g`` is ``BlockDot``), lanes ``cP .. cP + P - 1``
in cycle ``c`` (chunk ``c``). Chunk 0 goes in straight from the payload in the cycle the block is
taken; chunks 1 .. g/P - 1 wait in a register that shifts down a chunk a cycle (a 2:1 mux per bit,
no ``g/P``-to-1 mux). ``blocks.ready`` is low while it holds chunks still to go in, so a block is
taken every ``g / P`` cycles at most.

Per lane (P lanes), ``BlockDot.lane``: the code fields; ``Sh * Sx`` (hdl.arith multiplier); the
alignment shift ``t``; the product in two's complement (``BlockDot.negate``); the shift left by ``t``
into ``Pb + D + 1`` bits (``Pb``: the product's significand bits, ``D``: the alignment span). Then
``block_dot.adder_tree`` over the P lanes (``log2 P`` levels, none for P = 1), and the
**accumulator**: a ``W``-bit two's-complement register (``W = golden.dot.accumulator(...).bits``)
loaded with the chunk sum for a block's chunk 0 and with itself plus the chunk sum for the others.
Every partial sum of a block is below ``g * 2^(Pb + D)`` in magnitude, so it never overflows: after
the last chunk it holds the exact ``A`` of docs/dot.md section 2. Then ``BlockDot.scaled_word``:
``|A|``, ``Q = |A| * Ss``, the barrier at ``kmax``, leading zeros, the normalizing shift and
``round_fp32``, one stage each as in ``BlockDot``, reading the accumulator in the cycle it holds a
block's ``A`` (the tail moves every cycle; only every ``g/P``-th word is a block's value, and only
those are marked valid).

``tail="serial"`` (for ``g/P >= serial_steps()``: P = 1 at g = 16, about 15 cycles): the tail as
one register ``Q`` and a few steps instead of a pipeline (``serial_word``): ``Q = |A| * Ss`` by
Horner's rule a bit of ``Ss`` a cycle, the normalizing shift ``min(lz(Q), kmax)`` as 8-bit then
1-bit conditional shifts counted down on ``kmax``, then the same ``round_fp32``: the same word from
about half the tail's LUTs and a quarter of its flip-flops (docs/dot.md 7.2).

The block's scale significand, sign and ``kmax`` (from the header and offset) are registered when
the block is taken and reach the tail in **hops**: a register loaded when the block's last chunk
enters stage ``s`` holds its value while that chunk is in stages ``s .. s + g/P - 1`` (the next
block's last chunk comes ``g/P`` or more stages behind), so one register per ``g/P`` stages carries
them instead of one per stage (for P = 1 one hop covers the whole front end).

Stream handshake: the whole datapath moves on one enable decided ahead by an hdl.output_buffer
skid (``block_dot.output_pipeline``, one enable copy per lane, the 32 result bits over ``P`` lanes);
the pipeline's valid chain carries "a block's last chunk", so an output buffer counts blocks, not
chunks. ``blocks.ready`` is the control's enable copy and the fold's "nothing held" flag, both
registers: no path from ``values.ready`` or ``blocks.valid`` to it. The datapath registers have no
reset.

Chunked input (``chunked=True``, what the GEMV engine builds: hdl.gemv's folded front end looks
up ``P`` codes a cycle, so no stage before the unit carries a whole block). ``blocks`` then takes one
chunk a transfer (``chunk_layout``: ``P`` HIF and activation codes, the block's scale, sign and
offset, ``first`` / ``last`` chunk of the block): no fold register, ``blocks.ready`` is the control's
enable copy. A block's chunks come in order, ``g/P`` of them, gaps allowed between them: a valid
bit beside the chunk sum lets the accumulator add only chunks that are there. The header is
registered at each chunk (all of a block's chunks carry the same), so the hop at the last chunk
reads it from the chunk before: the same block's. The hops and the serial tail still see blocks'
last chunks ``g/P`` or more stages apart (a block is ``g/P`` transfers).

Parameters: ``BlockDotFolded(layout, hif, act="e4m3", *, lanes=P, tail="pipelined" | "serial",
chunked=False)``.

Ports: as ``BlockDot``: ``blocks`` (in stream, ``block_dot.block_layout(...)``, or ``chunk_layout``
when chunked), ``values`` (out stream, the binary32 pattern).

Latency: ``latency`` = ``g/P - 1 + depth`` cycles from a block taken on ``blocks`` to its value on
``values`` while ``values`` is ready (the block's last chunk enters the pipeline ``g/P - 1`` cycles
after the block is taken; ``depth``: the front end to the accumulator, ``front_stages``, plus the
tail); checked against the registers built. Chunked: ``depth`` from the block's last chunk taken.
Throughput: one block every ``cycles_per_block`` = ``g/P`` cycles, no further bubbles while both
sides are ready (``P`` products a cycle).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data

from sop.golden import dot
from sop.golden.formats import FloatFormat
from sop.golden.layout import OFFSET_RANGE, BlockLayout

from .arith import stage_reg
from .arith import delay as arith_delay
from .config import OFFSET_SHAPE
from .block_dot import MAX_ACC_BITS, BlockDot, adder_tree, code_fields, model, output_pipeline, round_fp32


def chunk_layout(hif: FloatFormat, act: FloatFormat, layout: BlockLayout, lanes: int) -> data.StructLayout:
    """One chunk of a block (the chunked unit's input): the HIF and activation codes of ``lanes`` of its
    weights, the block's scale code, sign and offset (as ``block_layout``), its first / last chunk."""
    return data.StructLayout({
        "hif": data.ArrayLayout(unsigned(hif.bits), lanes),
        "act": data.ArrayLayout(unsigned(act.bits), lanes),
        "scale": unsigned(layout.scale.bits),
        "sign": unsigned(1),
        "offset": OFFSET_SHAPE,
        "first": unsigned(1),
        "last": unsigned(1),
    })


class BlockDotFolded(BlockDot):
    model = staticmethod(model)         # hdl.block_dot.model: BlockDot's value, bit for bit

    def __init__(self, layout: BlockLayout, hif: FloatFormat, act="e4m3", *, lanes: int = 4,
                 tail: str = "pipelined", chunked: bool = False):
        g = layout.group
        fmt = dot.act_format(act)
        problem = None
        if tail not in ("pipelined", "serial"):
            problem = f"tail {tail!r}: 'pipelined' (BlockDot.scaled_word) or 'serial'"
        elif lanes < 1 or lanes & (lanes - 1) or lanes >= g:
            problem = (f"lanes {lanes}: the folded unit takes P products a cycle, P a power of two below the block "
                       f"size {g} (P = g is BlockDot)")
        elif isinstance(hif, FloatFormat) and dot.accumulator(hif, fmt, g).bits > MAX_ACC_BITS:
            problem = (f"activation format {fmt.name} needs a {dot.accumulator(hif, fmt, g).bits}-bit exact "
                       f"block accumulator; the folded unit builds E4M3 activations only (BF16: "
                       f"hdl.block_dot_bf16)")
        if problem:
            self._MustUse__silence = True        # refused: never elaborated, no unused-component warning
            raise ValueError(problem)
        self.lanes, self.cycles_per_block, self.tail, self.chunked = lanes, g // lanes, tail, chunked
        super().__init__(layout, hif, act)
        if tail == "serial" and self.serial_steps() > self.cycles_per_block:
            self._MustUse__silence = True
            raise ValueError(f"a serial tail takes {self.serial_steps()} cycles per block here; with lanes {lanes} a "
                             f"block comes every {self.cycles_per_block}: use fewer lanes or tail='pipelined'")

    # -- pipeline shape ----------------------------------------------------------------------------
    def front_stages(self) -> int:
        """Stages from a chunk in stage 0 (the payload or the fold register) to the accumulator:
        ``BlockDot.lane``'s (fields, the multiplier, negate, the alignment shift), the lanes' adder
        tree, the accumulator."""
        return self.lane_stages() + int(np.log2(self.lanes)) + 1

    def tail_stages(self) -> int:
        """Pipelined: ``BlockDot.scaled_word``'s stages (``|A|``, the scale multiplier and ``Q``, the
        barrier and leading zeros, the normalizing shift, the rounding). Serial: the load, the serial
        steps after it and ``round_fp32``'s 3 stages."""
        if self.tail == "serial":
            return self.serial_steps() + 3
        return super().tail_stages()

    def serial_steps(self) -> int:
        """The serial tail's cycles before the rounding: the load (``|A|`` and the scale's top bit),
        one per further scale significand bit, ``(NQ - 1) // 8`` coarse and 7 fine normalizing steps."""
        return (self.scale.mbits + 1) + (self.nq - 1) // 8 + self.FINE_STEPS

    #: The serial tail's fine normalizing steps: after the coarse ones fewer than 8 shifts are left.
    FINE_STEPS = 7

    @property
    def depth(self) -> int:
        """Pipeline stages from a block's last chunk in stage 0 to its value."""
        return self.front_stages() + self.tail_stages()

    def stages(self) -> int:
        """Cycles from a block taken to its value: its last chunk goes in ``g/P - 1`` cycles later
        (chunked: from its last chunk taken)."""
        return self.depth if self.chunked else self.cycles_per_block - 1 + self.depth

    def input_layout(self) -> data.StructLayout:
        """A whole block, or one chunk of it when chunked."""
        if self.chunked:
            return chunk_layout(self.hif, self.act, self.layout, self.lanes)
        return super().input_layout()

    # -- build ----------------------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        W, P, n = self.acc.bits, self.lanes, self.cycles_per_block
        scale, NQ = self.scale, self.nq
        K = self.front_stages()

        ctl, out = output_pipeline(m, self.depth, self.values, P)
        en0 = ctl.enable.en                    # the fold, the accumulator, the hops and the tail
        en_lane = [ctl.enable.lane[j] for j in range(P)]
        inp = self.blocks.payload

        def reg(en, name, value, shape):
            return stage_reg(m, en, name, value, shape)

        def delay(en, value, k, name):
            return arith_delay(m, en, value, k, name)

        # -- stage 0: the chunk going in (the fold's, or the payload's when chunked) ----------------------
        first0, last0 = Signal(name="first0"), Signal(name="last0")
        fold = self.chunk_in if self.chunked else self.fold
        codes, hdr_en, live = fold(m, en0, first0, last0)
        m.d.comb += ctl.valid.eq(last0)        # the valid chain counts blocks: their last chunks

        # -- per lane: BlockDot's lane (fields, product, sign, alignment shift; negate; align) ----------
        terms = [self.lane(m, en_lane[j], j, h, x) for j, (h, x) in enumerate(codes)]

        # -- the chunk's sum (P lanes), then the accumulator: exact, W bits ------------------------------
        chunk_sum, levels = adder_tree(m, en_lane, terms)
        first = delay(en0, first0, K - 1, "first")                   # beside the chunk sum
        acc = Signal(signed(W), name="acc", reset_less=True)
        # never overflows: every partial sum of a block fits
        with m.If(en0 if live is None else en0 & delay(en0, live, K - 1, "live")):
            m.d.sync += acc.eq(self.restart(first, acc) + chunk_sum)
        depth = self.lane_stages() + levels + 1
        assert depth == K, (depth, K)

        # -- the block path: header registered at the take, then hops to the accumulator's stage ---------
        _, Ss, es = code_fields(scale, inp.scale)
        s_lo, s_hi = dot.exponent_range(scale)
        const = NQ - 1 + self.acc.lsb_exp + s_lo + 126
        kmax_shape = unsigned((const + (s_hi - s_lo) + OFFSET_RANGE[1]).bit_length())
        hdr = [Signal(unsigned(scale.ebits), name="hdr_es", reset_less=True),
               Signal(OFFSET_SHAPE, name="hdr_off", reset_less=True),
               Signal(unsigned(len(Ss)), name="hdr_ss", reset_less=True),
               Signal(1, name="hdr_sb", reset_less=True)]
        with m.If(hdr_en):
            m.d.sync += [r.eq(v) for r, v in zip(hdr, (es, inp.offset, Ss, inp.sign))]
        es_r, off_r, ss, sb = hdr
        lasts = [last0]                        # lasts[s]: the chunk in stage s is a block's last

        def last_at(s):
            while len(lasts) <= s:
                lasts.append(reg(en0, f"last{len(lasts)}", lasts[-1], 1))
            return lasts[s]

        def hop(s, kmax, ss, sb):
            """Registers loaded as the last chunk enters stage ``s``: valid for stages ``s .. s + n - 1``."""
            regs = [Signal(v.shape() if isinstance(v, Signal) else kmax_shape, name=f"{name}_hop{s}",
                           reset_less=True) for name, v in (("kmax", kmax), ("ss", ss), ("sb", sb))]
            with m.If(en0 & last_at(s - 1)):
                m.d.sync += [r.eq(v) for r, v in zip(regs, (kmax, ss, sb))]
            return regs

        s, stride = 1, self.hop_stride()
        kmax, ss, sb = hop(s, es_r + off_r + const, ss, sb)
        while s + n - 1 < K:                   # the next hop reads this one while it still holds
            s = min(s + stride, K)
            kmax, ss, sb = hop(s, kmax, ss, sb)

        if self.tail == "serial":
            word, tail = self.serial_word(m, en0, en0 & last_at(K), acc, kmax, ss, sb)
        else:
            word, tail = self.scaled_word(m, en0, acc, kmax, ss, sb)
        depth += tail
        assert depth == self.depth and depth + (0 if self.chunked else n - 1) == self.latency, (depth, self.latency)
        m.d.comb += Value.cast(out.last).eq(word)
        return m

    def fold(self, m: Module, en0, first0, last0):
        """The fold: a whole block taken, chunk 0 from the payload in that cycle, chunks 1 .. n-1 held
        in a register shifted down a chunk a cycle. Drives ``blocks.ready``, ``first0`` / ``last0`` (the
        chunk in stage 0 is a block's first / last); returns the chunk's ``P`` (HIF, activation) codes,
        the header register's load enable and None (every enabled cycle's chunk sum counts)."""
        P, n, inp = self.lanes, self.cycles_per_block, self.blocks.payload
        busy = Signal(name="busy")             # the fold register holds chunks still to go in
        left = Signal(range(n), name="left")   # how many
        take = Signal(name="take")
        m.d.comb += [self.blocks.ready.eq(en0 & ~busy), take.eq(self.blocks.valid & self.blocks.ready)]
        held = [[(Signal(unsigned(self.hif.bits), name=f"fold{c}_h{j}", reset_less=True),
                  Signal(unsigned(self.act.bits), name=f"fold{c}_x{j}", reset_less=True)) for j in range(P)]
                for c in range(1, n)]
        # loaded from the payload while nothing is held (taken or not: only a taken block is ever read),
        # else shifted down; selected by the register ``busy``, so ``blocks.valid`` drives no wide mux
        with m.If(en0):
            for c, chunk in enumerate(held, start=1):
                for j, (h, x) in enumerate(chunk):
                    nh, nx = held[c][j] if c < n - 1 else (h, x)
                    m.d.sync += [h.eq(Mux(busy, nh, inp.hif[c * P + j])), x.eq(Mux(busy, nx, inp.act[c * P + j]))]
        with m.If(take):
            m.d.sync += [busy.eq(1), left.eq(n - 1)]
        with m.Elif(en0 & busy):
            m.d.sync += [busy.eq(left != 1), left.eq(left - 1)]
        m.d.comb += [first0.eq(take), last0.eq(busy & (left == 1))]   # n >= 2: the last chunk is a held one
        codes = [(Mux(busy, held[0][j][0], inp.hif[j]), Mux(busy, held[0][j][1], inp.act[j])) for j in range(P)]
        # the header as the fold register: loaded while nothing is held, so the taken block's stays
        return codes, en0 & ~busy, None

    def chunk_in(self, m: Module, en0, first0, last0):
        """Chunked input: a chunk taken on every enabled edge it is offered. Returns the payload's
        codes, the header's load enable (every chunk: the hop at a block's last chunk reads the chunk
        before's, the same block's) and ``live``, a chunk is taken (gaps between a block's chunks
        must not reach the accumulator)."""
        inp, take = self.blocks.payload, Signal(name="take")
        m.d.comb += [self.blocks.ready.eq(en0), take.eq(self.blocks.valid & self.blocks.ready),
                     first0.eq(take & inp.first), last0.eq(take & inp.last)]
        return [(inp.hif[j], inp.act[j]) for j in range(self.lanes)], take, take

    def serial_word(self, m: Module, en0, load, A, kmax, ss, sb) -> tuple[Value, int]:
        """``scaled_word``'s value, one register and a few steps instead of a pipeline: for a block every
        ``g/P`` cycles where ``g/P >= serial_steps()`` (P = 1 at g = 16). ``load`` (the block's ``A`` in
        the accumulator): ``M = |A|``, ``Q = |A|`` or 0 by the scale significand's top bit, the sign,
        ``kk = kmax``. Then, one an enabled cycle: ``Q = 2 Q + M`` or ``2 Q`` by each further bit of
        ``Ss`` (Horner: ``Q = |A| * Ss`` exactly); ``(NQ - 1) // 8`` coarse steps, each ``Q <<= 8, kk -= 8``
        when ``Q``'s top 8 bits are 0 and ``kk >= 8``; 7 fine steps, each ``Q <<= 1, kk -= 1`` when its top
        bit is 0 and ``kk > 0``. Greedy, so the shift is ``min(lz(Q), kmax)`` (``lz < 8`` or ``kk < 8``
        after the coarse steps, which cover ``lz <= NQ - 1``): the barrier's ``k`` of ``scaled_word``,
        and ``kk = kmax - k`` its ``ebm1``. Then ``round_fp32`` (3 stages) on the still ``Q`` and ``kk``.
        ``Q``, ``M`` and ``kk`` hold until the next load, ``g/P`` cycles on at the earliest, so the
        rounding stages read them after the last step. Returns the word and ``tail_stages()``."""
        W, NQ, nb = len(A), self.nq, self.scale.mbits + 1
        C = (NQ - 1) // 8
        M = Signal(unsigned(W - 1), name="st_m", reset_less=True)
        Q = Signal(unsigned(NQ), name="st_q", reset_less=True)
        kk = Signal(kmax.shape(), name="st_k", reset_less=True)
        sbits = Signal(unsigned(nb), name="st_ss", reset_less=True)     # Ss, the next bit on top
        neg = Signal(name="st_neg", reset_less=True)
        step = Signal(range(self.serial_steps() + 1), name="st_step", reset_less=True)
        mag = Mux(A[-1], -A, A)[:W - 1]
        with m.If(load):
            m.d.sync += [M.eq(mag), Q.eq(Mux(ss[-1], mag, 0)), kk.eq(kmax), sbits.eq(ss << 1),
                         neg.eq(A[-1] ^ sb), step.eq(1)]
        with m.Elif(en0):
            with m.If(step < nb):                                       # Horner: the next bit of Ss
                m.d.sync += [Q.eq((Q << 1) + Mux(sbits[-1], M, 0)), sbits.eq(sbits << 1)]
            with m.Elif(step < nb + C):                                 # coarse: 8 bits at a time
                with m.If((Q[NQ - 8:] == 0) & (kk >= 8)):
                    m.d.sync += [Q.eq(Q << 8), kk.eq(kk - 8)]
            with m.Elif(step < self.serial_steps()):                    # fine: a bit at a time
                with m.If(~Q[NQ - 1] & (kk != 0)):
                    m.d.sync += [Q.eq(Q << 1), kk.eq(kk - 1)]
            with m.If(step != self.serial_steps()):
                m.d.sync += step.eq(step + 1)
        word = round_fp32(m, en0, Q, kk, ~Q.any(), neg, Const(0, 1), self.round_up, "r")
        return word, self.serial_steps() + 3

    def hop_stride(self) -> int:
        """Stages between two hop registers of the block path: ``g/P`` (module docstring)."""
        return self.cycles_per_block

    @staticmethod
    def restart(first, acc):
        """What a chunk's sum adds to: 0 for a block's first chunk, else the running sum."""
        return Mux(first, 0, acc)
