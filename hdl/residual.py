"""Sparse residuals in the datapath: the merge at stage 0, the residual adders, the lane override.

A layer that carries sparse entries (golden.layout ``Sparse``: flat index
``row * cols + col``, strictly increasing, a BF16 value) decodes, by
golden.decoder, to ``round_bf16(product + residual)``: the exact product plus
the residual, rounded once (``+0`` where the layer has no entry, so a -0
product becomes +0; docs/formats.md section 9). Three components implement it
beside the decoder's lanes (docs/hardware.md, "Sparse residuals"), each in its
own module:

* ``SparseMerge`` (stage 0; hdl.sparse_merge, with the layouts of what it drives):
  takes the ``sparse`` stream and, for the chunk of ``N`` values that stage 0
  presents, hands up to ``R`` entries that fall in it to the residual adders,
  holding a chunk that has more (or whose entries it cannot yet prove complete);
  bad input sets sticky ``error`` bits.
* ``ResidualAdder`` (hdl.residual_adder): one lane's product, recomputed from
  the lane's table word and block fields, plus one BF16 residual, rounded once
  to BF16 (exactly: alignment with a sticky bit jammed into the LSB, then one
  rounding).
* ``ResidualPath`` (here): R adders, each fed by a mux that picks its entry's
  lane's word and block; every lane's output delayed to meet them; a merge
  register that puts each adder's result in its lane (lanes hit in the earlier
  passes of a chunk are kept in an override register until its last pass).

Each has a ``latency`` property and a bit-exact ``model`` (golden/ for the values,
the documented rule for the control).

This module holds ``ResidualPath`` and its model ``path_model`` (with ``delay_ram``, each lane's
delay ring). Ports: ``enable`` (in); ``entries`` and ``final`` (in, as hdl.sparse_merge's
``SparseMerge`` gives them, delayed by the table read's extra cycles); per lane ``word``,
``block`` and ``lanes`` (in); per lane ``out`` (out, BF16). Latency: ``ResidualPath.latency`` =
``delay + 1`` enabled edges from ``lanes`` to ``out`` (``delay`` = 1 + the adder's stages - the
formatter's). And ``expected_words``: golden.decoder's output words of a layer with sparse
entries (the AXI4-Stream shell's model and sim/ use it).
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from . import lut_word, scale_decoder
from .arith import delay
from .config import DecoderConfig
from .hif_formatter import HifFormatter
from .pipeline import EnableSignature
from .residual_adder import ResidualAdder, adder_model
from .scale_decoder import BF16
from .sparse_merge import entry_layout


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
