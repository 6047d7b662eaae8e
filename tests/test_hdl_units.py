"""Unit tests of each decoder component in amaranth.sim, against its numpy model.

Every component of hdl/ has a bit-exact ``model()`` beside it whose expectations
come from golden/ (the number formats) or from the component's documented
contract (the control); each test drives the RTL, with random stalls where it has
an enable, and compares every output with the model. The data models are in turn
checked against golden/'s decoder, and each comparison is shown to catch a broken
component (tests/mutants.py). The exhaustive lane check (every HIF code x every scale code x
both signs: a quarter of a million words for e2m3-ue4m4-g16) runs the lane's Verilog in Icarus,
which takes seconds where amaranth.sim took half a minute a configuration.
"""

import dataclasses
import shutil
import subprocess
from pathlib import Path

import mutants
import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Module, Shape, Signal, Value, unsigned
from amaranth.lib import data, wiring
from amaranth.sim import Simulator

from sop.golden.decoder import product_fields
from sop.golden.formats import FORMATS, FloatFormat, get_format
from sop.golden.layout import BlockLayout, named_layouts
from sop.hdl import (arith, beat_issue, block_fields, codebook_mux, hif_formatter, lanes as lanes_mod, lut_bank,
                     lut_word, output_buffer, pipeline, reference, replica, scale_decoder)
from sop.hdl.arith import PipelinedMultiplier
from sop.hdl.beat_issue import BeatIssue
from sop.hdl.block_fields import BlockFields
from sop.hdl.codebook_mux import CodebookMux
from sop.hdl.config import PIPELINES, DecoderConfig
from sop.hdl.hif_formatter import HifFormatter
from sop.hdl.lanes import Lanes
from sop.hdl.lut_bank import LutBank
from sop.hdl.output_buffer import OutputBuffer, OutputStage
from sop.hdl.pipeline import PipelineControl
from sop.hdl.reference import lane_words
from sop.hdl.scale_decoder import ScaleDecoder

LAY = named_layouts()


def simulate(dut, bench, clocked=True):
    sim = Simulator(dut)
    if clocked:
        sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def config(output="bf16", layout="sop4-g16", lanes=1, lutram_depth=0, pipeline="deep"):
    return DecoderConfig("t", lanes, LAY[layout], output=output, lutram_depth=lutram_depth, pipeline=pipeline)


def _width(shape) -> int:
    return Shape.cast(shape).width


def pack(shape, value) -> int:
    """The integer of ``value`` (nested dicts / lists / ints) in layout ``shape``."""
    if isinstance(shape, data.StructLayout):
        return sum(pack(f.shape, value[name]) << f.offset for name, f in shape)
    if isinstance(shape, data.ArrayLayout):
        w = _width(shape.elem_shape)
        return sum(pack(shape.elem_shape, v) << (i * w) for i, v in enumerate(value))
    return int(value) & ((1 << _width(shape)) - 1)


def unpack(shape, value: int):
    """Nested dicts / lists / ints (signed fields sign-extended) of an integer in layout ``shape``."""
    if isinstance(shape, data.StructLayout):
        return {name: unpack(f.shape, (value >> f.offset) & ((1 << f.width) - 1)) for name, f in shape}
    if isinstance(shape, data.ArrayLayout):
        w = _width(shape.elem_shape)
        return [unpack(shape.elem_shape, (value >> (i * w)) & ((1 << w) - 1)) for i in range(shape.length)]
    s = Shape.cast(shape)
    value &= (1 << s.width) - 1
    return value - (1 << s.width) if s.signed and value >> (s.width - 1) else value


def row(fields: dict, n: int) -> dict:
    """Element ``n`` of a dict of arrays, as ints."""
    return {k: int(v[n]) for k, v in fields.items()}


# -- LUT word encoder ------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["bf16", "exact"])
def test_lut_word_encoder_every_hif_code(output):
    """The stored word of every HIF code, against the numpy model; the model's words decode
    to golden's HIF values (normalized: the leading one at bit M)."""
    cfg = config(output)
    hif, codes = cfg.hif, np.arange(1 << cfg.hif.bits)
    want = lut_word.model(cfg, codes)
    if output == "bf16":
        M, eb = hif.mbits, lut_word.exp_bits(cfg)
        frac, exp, sign = want & ((1 << M) - 1), (want >> M) & ((1 << eb) - 1), want >> (M + eb)
        mag = np.where(exp == 0, 0.0, np.ldexp((frac + (1 << M)).astype(float), exp + lut_word.exp_base(cfg)))
        np.testing.assert_array_equal(np.where(sign == 1, -mag, mag), hif.values)
        assert (np.signbit(hif.values) == (sign == 1)).all()
        assert ((exp == 0) | (frac + (1 << M) >= 1 << M)).all()
    else:
        np.testing.assert_array_equal(want, codes)
    dut = lut_word.LutWordEncoder(cfg)

    async def bench(ctx):
        for c in codes:
            ctx.set(dut.hif, int(c))
            await ctx.delay(1e-9)
            assert ctx.get(dut.word.as_value()) == want[c], c

    simulate(dut, bench, clocked=False)


# -- pipelined multiplier -------------------------------------------------------------------

@pytest.mark.parametrize("a_bits,b_bits", [(7, 4), (7, 5), (3, 1), (4, 3)])
def test_pipelined_multiplier_every_product(a_bits, b_bits):
    dut = PipelinedMultiplier(a_bits, b_bits)
    a, b = (x.ravel() for x in np.meshgrid(np.arange(1 << a_bits), np.arange(1 << b_bits), indexing="ij"))
    rng = np.random.default_rng(a_bits * 10 + b_bits)
    en = rng.random(4 * len(a)) < 0.7                   # a stalled stage must hold its value
    got = []

    async def bench(ctx):
        queue, issued, in_flight = list(zip(a, b)), 0, []
        for e in en:
            if issued < len(a) and e:
                ctx.set(dut.a, int(queue[issued][0]))
                ctx.set(dut.b, int(queue[issued][1]))
            ctx.set(dut.en, int(e))
            await ctx.tick()
            if e:
                in_flight.append(issued < len(a))
                issued += issued < len(a)
                if len(in_flight) >= dut.latency and in_flight.pop(0):   # issued latency ticks ago
                    got.append(ctx.get(dut.p))

    simulate(dut, bench)
    assert len(got) > len(a) // 2
    np.testing.assert_array_equal(got, arith.model(a, b)[:len(got)])


# -- LUT bank and codebook mux --------------------------------------------------------------

def check_lut_bank(lutram_depth, bank_cls=LutBank):
    """Reads of every page, bank and address on three lanes with their own random read
    enables: ``read_data`` is always the model's word of the read issued ``read_latency``
    enabled edges ago (held while stalled); a word written in cycle t is read from cycle t + 2."""
    cfg = config("exact")
    lanes = 3
    dut = bank_cls(code_bits=4, banks=2, word=lut_word.word(cfg), lanes=lanes, lutram_depth=lutram_depth)
    assert dut.read_latency == lut_bank.read_latency(lutram_depth) == (1 if lutram_depth == 0 else 2)
    L = dut.read_latency
    rng = np.random.default_rng(0)
    tables = rng.integers(0, 1 << 10, (2, 2, 16))       # page, bank, addr
    reads = [(page, bank, addr) for page in (0, 1) for bank in (0, 1) for addr in range(16)]
    checked = []

    def write(ctx, page, bank, addr, value):
        ctx.set(dut.write_page, page)
        ctx.set(dut.write.payload.bank, bank)
        ctx.set(dut.write.payload.addr, addr)
        ctx.set(dut.write.payload.data.as_value(), int(value))
        ctx.set(dut.write.valid, 1)

    def issue(ctx, lane, page, bank, addr):
        ctx.set(dut.read_page[lane], page)
        ctx.set(dut.read_bank[lane], bank)
        ctx.set(dut.read_addr[lane], addr)

    async def bench(ctx):
        for page, bank, addr in reads:
            write(ctx, page, bank, addr, tables[page, bank, addr])
            await ctx.tick()
        ctx.set(dut.write.valid, 0)
        await ctx.tick()                                 # a write reaches the RAM one edge later
        issued = [[] for _ in range(lanes)]              # per lane: the reads its enabled edges took
        for cycle in range(3 * len(reads)):
            for lane in range(lanes):
                read = reads[(cycle + 37 * lane) % len(reads)]
                issue(ctx, lane, *read)
                en = rng.random() < 0.7
                ctx.set(dut.read_en[lane], en)
                if en:
                    issued[lane].append(read)
            await ctx.tick()
            for lane in range(lanes):
                if len(issued[lane]) >= L:
                    page, bank, addr = issued[lane][-L]
                    want = lut_bank.model(tables, page, bank, addr)
                    assert ctx.get(dut.read_data[lane].as_value()) == want, (cycle, lane)
                    checked.append(1)
        # write latency: issue a read of the written word in cycles t, t + 1, t + 2, t + 3
        ctx.set(dut.read_en[0], 1)
        issue(ctx, 0, 1, 0, 7)
        write(ctx, 1, 0, 7, 0x155)
        seen = []
        for cycle in range(4 + L):
            await ctx.tick()
            ctx.set(dut.write.valid, 0)
            if cycle >= L - 1:
                seen.append(ctx.get(dut.read_data[0].as_value()))
        assert seen[:4] == [int(tables[1, 0, 7])] * 2 + [0x155] * 2

    simulate(dut, bench)
    assert len(checked) > 2 * len(reads)


@pytest.mark.parametrize("lutram_depth", [0, 16, 32])
def test_lut_bank_pages_banks_stalls_and_write_latency(lutram_depth):
    check_lut_bank(lutram_depth)


def test_lut_bank_check_catches_a_stale_part_select():
    with pytest.raises(AssertionError):
        check_lut_bank(16, mutants.StalePartSelect)


@pytest.mark.parametrize("lanes,group", [(8, 16), (32, 16), (64, 8)])
def test_codebook_mux_every_select_pattern(lanes, group):
    dut = CodebookMux(lanes=lanes, group=group)

    async def bench(ctx):
        for pattern in range(1 << dut.blocks):
            select = [(pattern >> blk) & 1 for blk in range(dut.blocks)]
            for blk, s in enumerate(select):
                ctx.set(dut.select[blk], s)
            await ctx.delay(1e-9)
            want = codebook_mux.model(lanes, group, select)
            assert [ctx.get(dut.bank[i]) for i in range(lanes)] == list(want)

    simulate(dut, bench, clocked=False)


# -- scale decoder --------------------------------------------------------------------------

def _unit_hif():
    """A one-entry "HIF" whose code 1 is exactly 1.0 (significand 1, exponent 0), so that
    golden's product fields for it are the block scale's own fields."""
    return FloatFormat(name="one", bits=2, ebits=1, mbits=0, bias=1)


def scale_fields(lay, scale_codes, offsets):
    """(sig, exp) of each block scale, offset included, as golden.decoder computes them."""
    sig = np.empty(len(scale_codes), dtype=np.int64)
    exp = np.empty(len(scale_codes), dtype=np.int64)
    for off in np.unique(offsets):
        sel = offsets == off
        hdr = lay.make_header(scale_codes[sel], 0, 0)
        _, sg, ex, _ = product_fields(_unit_hif(), np.ones((2, 1), int), lay, int(off), hdr,
                                      np.zeros((sel.sum(), 1), int))
        sig[sel], exp[sel] = sg[:, 0], ex[:, 0]
    return sig, exp


def check_scale_decoder(cfg, decoder_cls=ScaleDecoder):
    lay = cfg.layout
    dut = decoder_cls(cfg)
    headers = np.arange(1 << lay.header_bits)
    want = scale_decoder.model(cfg, headers)

    async def bench(ctx):
        for h in headers:
            ctx.set(dut.header, int(h))
            await ctx.delay(1e-9)
            got = unpack(scale_decoder.fields(cfg), ctx.get(dut.fields.as_value()))
            assert {**got, "select": ctx.get(dut.select)} == row(want, h), h

    simulate(dut, bench, clocked=False)


@pytest.mark.parametrize("layout", ["sop4-g16", "e2m3-ue4m4-g16"])
@pytest.mark.parametrize("output", ["exact", "bf16"])
def test_scale_decoder_every_header(layout, output):
    """The RTL's fields of every header are the model's, bit for bit; the model's are golden's
    scale (exact) or the same value normalized (BF16: leading one at bit M), the per-layer offset
    added afterwards (golden's fields at offset 0)."""
    cfg = config(output, layout)
    lay = cfg.layout
    headers = np.arange(1 << lay.header_bits)
    scale_code, sign, select = lay.split_header(headers)
    sig, exp = scale_fields(lay, scale_code, np.zeros(len(headers), int))
    f = scale_decoder.model(cfg, headers)
    np.testing.assert_array_equal(f["sign"], sign)
    np.testing.assert_array_equal(f["select"], select)
    if output == "exact":
        np.testing.assert_array_equal(f["sig"], sig)
        np.testing.assert_array_equal(f["exp"] + scale_decoder.exp_constant(cfg), exp)
    else:
        Ms = lay.scale.mbits
        np.testing.assert_array_equal(f["zero"], sig == 0)
        value = np.ldexp((f["frac"] + (1 << Ms)).astype(float), f["exp"] - lay.scale.bias - Ms)
        np.testing.assert_array_equal(np.where(sig == 0, 0.0, value), np.ldexp(sig.astype(float), exp))
    check_scale_decoder(cfg)


def test_scale_decoder_check_catches_a_subnormal_scale_off_by_one():
    with pytest.raises(AssertionError):
        check_scale_decoder(config("bf16"), mutants.SubnormalScaleOffByOne)


# -- block fields ---------------------------------------------------------------------------

def random_headers(cfg, rng, n):
    lay = cfg.layout
    return lay.make_header(rng.integers(0, 1 << lay.scale.bits, n), rng.integers(0, 2, n) * lay.signed_scale,
                           rng.integers(0, 2, n) * lay.select_bit)


def test_block_fields_model_is_golden():
    """Through the formatter's model, the block fields' model gives golden's lane words."""
    rng = np.random.default_rng(3)
    for output in ("bf16", "exact"):
        for layout in ("sop4-g16", "e2m3-ue4m4-g16"):
            cfg = config(output, layout)
            lay, n = cfg.layout, 4000
            headers, offset = random_headers(cfg, rng, n), int(rng.integers(-128, 128))
            luts = rng.integers(0, 1 << cfg.hif.bits, (lay.banks, 1 << lay.code_bits))
            codes = rng.integers(0, 1 << lay.code_bits, (n, 1))
            _, _, select = lay.split_header(headers)
            words = lut_word.model(cfg, luts[select, codes[:, 0]])
            got = hif_formatter.model(cfg, words, block_fields.model(cfg, headers, offset))
            want = reference.lane_words(cfg, luts, offset, headers, np.repeat(codes, lay.group, axis=1))
            np.testing.assert_array_equal(got, want.reshape(n, lay.group)[:, 0])


def test_the_formatters_plus0_makes_a_zero_product_plus_zero():
    """With the residual path a lane adds golden's residual, +0 where the layer has no entry, and -0 + +0
    is +0 (IEEE 754): ``plus0`` set turns the -0 of a zero table entry (exp 0) with its sign bit set into
    0x0000; clear, the product keeps its sign, 0x8000."""
    cfg = dataclasses.replace(config(), residuals=1)
    M, eb = cfg.hif.mbits, lut_word.exp_bits(cfg)
    minus_zero = np.array([1 << (M + eb)])             # {frac 0, exp 0 (zero), sign 1}
    block = {"frac": np.array([0]), "kb": np.array([0]), "zero": np.array([0]), "sign": np.array([0])}
    assert hif_formatter.model(cfg, minus_zero, block, plus0=np.array([1])).tolist() == [0x0000]
    assert hif_formatter.model(cfg, minus_zero, block, plus0=np.array([0])).tolist() == [0x8000]
    assert hif_formatter.model(cfg, minus_zero, block).tolist() == [0x8000]


def check_block_fields(cfg, cls=BlockFields, seed=0, cycles=300):
    """Random per-group fields and pages with random stalls and offset writes: ``block[i]`` is the
    model's value of lane i's group's header at the offset its page held when the fields were
    loaded, ``latency`` enabled edges later."""
    dut = cls(cfg)
    rng = np.random.default_rng(seed)
    N, G = cfg.lanes, replica.groups(cfg.lanes)
    per = N // G
    L = dut.latency
    glay = data.ArrayLayout(beat_issue.group_layout(cfg), G)
    blay = data.ArrayLayout(scale_decoder.block(cfg), N)
    headers = random_headers(cfg, rng, cycles * G).reshape(cycles, G)
    pages = rng.integers(0, 2, (cycles, G))
    issued = []                                   # per enabled edge: the expected block of each lane
    checked = []

    async def bench(ctx):
        offsets = [int(o) for o in rng.integers(-128, 128, 2)]
        for p in (0, 1):                          # both pages' offsets
            ctx.set(dut.issue.write_page, p * ((1 << cfg.regions) - 1))     # every region's copy
            ctx.set(dut.offset, offsets[p])
            ctx.set(dut.offset_we, 1)
            await ctx.tick()
        ctx.set(dut.offset_we, 0)
        if cfg.wide:                              # the write lands an edge later (registered per region)
            await ctx.tick()
        pending = None
        for t in range(cycles):
            n = len(issued)
            fields = scale_decoder.model(cfg, headers[n])
            ctx.set(dut.issue.fields.as_value(), pack(glay, [
                {"fields": row(fields, g), "page": pages[n, g]} for g in range(G)]))
            en = int(rng.random() < 0.7)
            ctx.set(dut.enable.en, en)
            ctx.set(dut.enable.lane.as_value(), (1 << N) - 1 if en else 0)
            we, wp, off = int(rng.random() < 0.2), int(rng.integers(0, 2)), int(rng.integers(-128, 128))
            ctx.set(dut.offset_we, we)
            ctx.set(dut.issue.write_page, wp * ((1 << cfg.regions) - 1))
            ctx.set(dut.offset, off)
            await ctx.tick()
            if en:                                # loaded with the offsets as they were before this edge
                model = block_fields.model(cfg, headers[n], [offsets[p] for p in pages[n]])
                issued.append([row(model, i // per) for i in range(N)])
            if cfg.wide:                          # the write of the cycle before lands at this edge
                if pending is not None:
                    offsets[pending[0]] = pending[1]
                pending = (wp, off) if we else None
            elif we:
                offsets[wp] = off
            if len(issued) >= L:
                assert unpack(blay, ctx.get(dut.block.as_value())) == issued[-L], t
                checked.append(t)

    simulate(dut, bench)
    assert len(checked) > cycles // 2


@pytest.mark.parametrize("output,layout,lanes,lutram_depth", [
    ("bf16", "sop4-g16", 8, 0), ("exact", "e2m3-ue4m4-g16", 4, 0), ("bf16", "e2m3-ue4m4-g16", 16, 32),
    ("exact", "sop4-g16", 1, 16)])
def test_block_fields_against_model(output, layout, lanes, lutram_depth):
    check_block_fields(config(output, layout, lanes, lutram_depth))


def test_block_fields_check_catches_the_wrong_page():
    with pytest.raises(AssertionError):
        check_block_fields(config("bf16", "sop4-g16", 8), mutants.OtherPageOffset)


# -- HIF formatter --------------------------------------------------------------------------

def random_vectors(cfg, rng, n):
    """Table words of random HIF codes and the block fields of random headers and offsets."""
    headers = random_headers(cfg, rng, n)
    offsets = rng.integers(-128, 128, n)
    return lut_word.model(cfg, rng.integers(0, 1 << cfg.hif.bits, n)), block_fields.model(cfg, headers, offsets)


def check_formatter(cfg, formatter=HifFormatter, n=3000, seed=0):
    """Random words and blocks, random stalls: ``out`` is the model's word ``latency`` enabled
    edges after its inputs."""
    dut = formatter(cfg)
    rng = np.random.default_rng(seed)
    words, blocks = random_vectors(cfg, rng, n)
    want = hif_formatter.model(cfg, words, blocks)
    F = dut.latency
    assert F == HifFormatter.stages(cfg)
    got = []

    async def bench(ctx):
        k = 0                                     # enabled edges so far
        while len(got) < n:
            ctx.set(dut.word.as_value(), int(words[k % n]))
            ctx.set(dut.block.as_value(), pack(scale_decoder.block(cfg), row(blocks, k % n)))
            en = int(rng.random() < 0.75)
            ctx.set(dut.en, en)
            await ctx.tick()
            k += en
            if en and k >= F:
                got.append(ctx.get(Value.cast(dut.out)))

    simulate(dut, bench)
    return np.array(got), want


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("output", ["exact", "bf16"])
@pytest.mark.parametrize("layout", ["sop4-g16", "e2m3-ue4m4-g16"])
def test_formatter_against_model(output, layout, pipeline):
    got, want = check_formatter(config(output, layout, pipeline=pipeline))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_formatter_check_catches_ties_away(pipeline):
    got, want = check_formatter(config("bf16", pipeline=pipeline), mutants.TiesAway)
    assert (got != want).any()


def test_shallow_formatter_stages():
    """The shallow BF16 formatter is two stages shorter than the deep one (the stages it merges,
    hdl/hif_formatter.py); the exact output has the multiplier's stages in both."""
    for layout in ("sop4-g16", "e2m3-ue4m4-g16"):
        deep, shallow = (HifFormatter.stages(config("bf16", layout, pipeline=p)) for p in PIPELINES)
        assert shallow == deep - 2
        assert len({HifFormatter.stages(config("exact", layout, pipeline=p)) for p in PIPELINES}) == 1


# -- one lane: encoder, scale decoder and formatter together, exhaustive ------------------

class Lane(Elaboratable):
    """HIF code and header in, the lane's output word after the formatter's latency."""

    def __init__(self, cfg, formatter=HifFormatter):
        self.cfg = cfg
        self.hif, self.header = Signal(cfg.hif.bits, name="hif"), Signal(cfg.layout.header_bits, name="header")
        self.offset = Signal(range(-128, 128), name="offset")
        self.fmt = formatter(cfg)

    @property
    def out(self) -> Value:
        return Value.cast(self.fmt.out)

    def elaborate(self, platform):
        m = Module()
        m.submodules.enc = enc = lut_word.LutWordEncoder(self.cfg)
        m.submodules.sd = sd = ScaleDecoder(self.cfg)
        m.submodules.fmt = fmt = self.fmt
        m.d.comb += [enc.hif.eq(self.hif), sd.header.eq(self.header), fmt.word.eq(enc.word), fmt.en.eq(1)]
        term = self.offset + scale_decoder.exp_constant(self.cfg)
        m.d.comb += [getattr(fmt.block, k).eq(v)
                     for k, v in scale_decoder.with_layer_term(self.cfg, sd.fields, term).items()]
        return m


def lane_vectors(cfg, offsets, rng):
    """Every HIF code x every scale code x both signs, each at one of ``offsets``."""
    lay = cfg.layout
    h, c, s = (a.ravel() for a in np.meshgrid(np.arange(1 << cfg.hif.bits), np.arange(1 << lay.scale.bits),
                                              [0, 1] if lay.signed_scale else [0], indexing="ij"))
    return h, c, s, rng.choice(offsets, len(h))


def run_lane(cfg, h, c, s, o, work: Path, formatter=HifFormatter) -> np.ndarray:
    """The lane's output words for inputs ``(h, c, s, o)``, one a cycle, from its Verilog in Icarus
    (a quarter of a million vectors in seconds; amaranth.sim takes half a minute): a testbench reads
    them with ``$readmemh`` and writes each word ``latency`` cycles later."""
    lay = cfg.layout
    dut = Lane(cfg, formatter)
    ports = {"hif": (dut.hif, None), "header": (dut.header, None), "offset": (dut.offset, None),
             "out": (dut.out, None)}
    work.mkdir(parents=True, exist_ok=True)
    (work / "lane.v").write_text(verilog.convert(dut, name="lane", ports=ports))
    hb, H, n, lat = cfg.hif.bits, lay.header_bits, len(h), dut.fmt.latency
    W = hb + H + 8
    words = h.astype(np.int64) | lay.make_header(c, s, 0).astype(np.int64) << hb | (o.astype(np.int64) & 255) << hb + H
    (work / "in.hex").write_text("".join(f"{int(w):x}\n" for w in words))
    (work / "tb.v").write_text(f"""
module tb;
  reg clk = 0;
  reg [{W - 1}:0] mem [0:{n - 1}];
  reg [{W - 1}:0] in = 0;
  wire [{len(dut.out) - 1}:0] out;
  integer i, f;
  lane dut(.clk(clk), .rst(1'b0), .hif(in[{hb - 1}:0]), .header(in[{hb + H - 1}:{hb}]), .offset(in[{W - 1}:{hb + H}]),
           .out(out));
  initial begin
    $readmemh("in.hex", mem);
    f = $fopen("out.hex", "w");
    for (i = 0; i < {n + lat}; i = i + 1) begin
      if (i < {n}) in = mem[i];
      #1 clk = 1;
      #1 clk = 0;
      if (i >= {lat - 1} && i < {n + lat - 1}) $fwrite(f, "%h\\n", out);
    end
    $fclose(f);
    $finish;
  end
endmodule
""")
    assert shutil.which("iverilog") and shutil.which("vvp"), "iverilog not found: run `make setup`"
    for cmd in (["iverilog", "-g2005", "-o", "lane.vvp", "tb.v", "lane.v"], ["vvp", "-n", "lane.vvp"]):
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd[0]}: {r.stderr[-2000:]}{r.stdout[-2000:]}"
    got = np.array([int(w, 16) for w in (work / "out.hex").read_text().split()], dtype=np.int64)
    assert len(got) == n, f"{len(got)} words out of the lane for {n} in"
    return got


def golden_words(cfg, h, c, s, o):
    luts = np.arange(1 << cfg.hif.bits)[None, :]           # a "LUT" holding every HIF code
    want = np.zeros(len(h), dtype=np.int64)
    for off in np.unique(o):
        sel = o == off
        want[sel] = lane_words(cfg, luts, int(off), cfg.layout.make_header(c[sel], s[sel], 0), h[sel][:, None])
    return want


OFFSETS = [-128, -100, -20, 0, 20, 100, 127]


# The exact lane is the multiplier and an exponent add: exhaustive for the sop4 layout; the UE4M4
# scale's wider multiplier is exhaustive alone (test_pipelined_multiplier_every_product, 7 x 5 bits)
# and in the exact formatter under random words (test_formatter_against_model).
@pytest.mark.parametrize("output,pipeline,layout", [
    ("exact", "deep", "sop4-g16"), *((o, p, lay) for lay in ("sop4-g16", "e2m3-ue4m4-g16")
                                     for o, p in (("bf16", "deep"), ("bf16", "shallow")))])
def test_lane_exhaustive(output, layout, pipeline, tmp_path):
    """Every HIF code x every scale code x both signs, at offsets from subnormal to saturated:
    the RTL lane (its Verilog, in Icarus) and the models of its parts all give golden's words."""
    cfg = config(output, layout, pipeline=pipeline)
    h, c, s, o = lane_vectors(cfg, OFFSETS, np.random.default_rng(1))
    want = golden_words(cfg, h, c, s, o)
    headers = cfg.layout.make_header(c, s, 0)
    np.testing.assert_array_equal(hif_formatter.model(cfg, lut_word.model(cfg, h),
                                                      block_fields.model(cfg, headers, o)), want)
    np.testing.assert_array_equal(run_lane(cfg, h, c, s, o, tmp_path), want)


def test_lane_check_catches_ties_away(tmp_path):
    """The exhaustive lane comparison catches a rounding bug (ties away from zero)."""
    cfg = config("bf16")
    h, c, s, o = lane_vectors(cfg, [-20], np.random.default_rng(2))
    assert (run_lane(cfg, h, c, s, o, tmp_path, mutants.TiesAway) != golden_words(cfg, h, c, s, o)).any()


# -- lanes: table writes, reads and formatters ---------------------------------------------

def check_lanes(cfg, seed=0, reads=400, **parts):
    """Both pages of the tables loaded through ``load``; then per lane random reads of any page,
    bank and address with random blocks, random stalls: ``out[i]`` is the model's word of lane
    i's read ``latency`` enabled edges earlier (its block given ``read_latency`` edges after it)."""
    dut = Lanes(cfg, **parts)
    rng = np.random.default_rng(seed)
    lay, N = cfg.layout, cfg.lanes
    tables = rng.integers(0, 1 << cfg.hif.bits, (2, lay.banks, 1 << lay.code_bits))
    page, bank, addr = (rng.integers(0, hi, (reads, N)) for hi in (2, lay.banks, 1 << lay.code_bits))
    headers = random_headers(cfg, rng, reads * N).reshape(reads, N)
    blocks = block_fields.model(cfg, headers, rng.integers(-128, 128, (reads, N)))
    want = lanes_mod.model(cfg, tables, page, bank, addr, blocks)
    rlay = data.ArrayLayout(beat_issue.read_layout(cfg), N)
    blay = data.ArrayLayout(scale_decoder.block(cfg), N)
    olay = data.ArrayLayout(cfg.lane_layout, N)
    L, total = dut.read_latency, dut.latency
    got = []

    async def bench(ctx):
        for p in (0, 1):
            ctx.set(dut.issue.write_page, p * ((1 << cfg.regions) - 1))     # every region's copy
            for b in range(lay.banks):
                for a in range(1 << lay.code_bits):
                    ctx.set(dut.load.payload, {"bank": b, "addr": a, "data": int(tables[p, b, a])})
                    ctx.set(dut.load.valid, 1)
                    await ctx.tick()
        ctx.set(dut.load.valid, 0)
        for _ in range(dut.write_latency - 1):         # the last word is readable from then on
            await ctx.tick()
        k = 0
        while len(got) < reads:
            ctx.set(dut.issue.read.as_value(), pack(rlay, [
                {"addr": addr[k % reads, i], "bank": bank[k % reads, i], "page": page[k % reads, i]}
                for i in range(N)]))
            if k >= L:
                ctx.set(dut.block.as_value(), pack(blay, [
                    {f: v[(k - L) % reads, i] for f, v in blocks.items()} for i in range(N)]))
            en = int(rng.random() < 0.75)
            ctx.set(dut.enable.en, en)
            ctx.set(dut.enable.lane.as_value(), (1 << N) - 1 if en else 0)
            await ctx.tick()
            k += en
            if en and k >= total:
                got.append([pack(cfg.lane_layout, v) if isinstance(v, dict) else v
                            for v in unpack(olay, ctx.get(dut.out.as_value()))])

    simulate(dut, bench)
    return np.array(got), want


@pytest.mark.parametrize("output,layout,lanes,lutram_depth,pipeline", [
    ("bf16", "sop4-g16", 4, 0, "deep"), ("exact", "e2m3-ue4m4-g16", 2, 0, "deep"), ("bf16", "sop4-g16", 2, 16, "deep"),
    ("bf16", "e2m3-ue4m4-g16", 1, 32, "deep"), ("bf16", "sop4-g16", 4, 0, "shallow"),
    ("bf16", "e2m3-ue4m4-g16", 2, 32, "shallow"), ("bf16", "sop4-g16", 16, 16, "deep")])
def test_lanes_against_model(output, layout, lanes, lutram_depth, pipeline):
    got, want = check_lanes(config(output, layout, lanes, lutram_depth, pipeline))
    np.testing.assert_array_equal(got, want)


def test_only_the_shallow_bank_states_its_no_collision_contract():
    """The shallow pipeline's table memories carry yosys's ``no_rw_check`` (hdl/lut_bank.py: no
    read-during-write logic around each RAM); the deep build's Verilog has none, as before."""
    for kind, marked in (("deep", False), ("shallow", True)):
        text = verilog.convert(Lanes(config("bf16", "sop4-g16", 2, pipeline=kind)), name="lanes")
        assert ("no_rw_check" in text) == marked, kind


def test_lanes_check_catches_a_flipped_lut_bit():
    got, want = check_lanes(config("bf16", "sop4-g16", 2), bank=mutants.FlippedLutBit)
    assert (got != want).any()


# -- beat issue -----------------------------------------------------------------------------

def check_beat_issue(cfg, mux=CodebookMux, seed=0, cycles=400):
    """A stream of random beats (random idles, a random swap on some) under random stalls: every
    cycle, ``blocks.ready``, ``valid`` and ``write_page`` are the model's, and where stage 0 holds
    a beat so are each lane's read and each group's fields and page."""
    dut = BeatIssue(cfg, mux=mux)
    rng = np.random.default_rng(seed)
    lay, N = cfg.layout, cfg.lanes
    n_beats = cycles // cfg.beats_per_block
    headers = random_headers(cfg, rng, n_beats * cfg.blocks_per_beat)
    codes = rng.integers(0, 1 << lay.code_bits, (len(headers), lay.group))
    beats = reference.input_beats(cfg, headers, codes)
    swaps = rng.random(n_beats) < 0.2
    rec = {k: [] for k in ("beat", "swap", "valid", "en", "ready", "hold", "write_page", "read", "groups")}
    rlay = data.ArrayLayout(beat_issue.read_layout(cfg), N)
    glay = data.ArrayLayout(beat_issue.group_layout(cfg), replica.groups(N))

    # a wide decoder's beat issue takes the next cycle's enable too (hdl.beat_issue): drawn ahead
    ens = (rng.random(cycles) < 0.8).astype(int) if cfg.wide else None

    async def bench(ctx):
        nxt = 0
        for t in range(cycles):
            valid = int(nxt < n_beats and rng.random() < 0.8)
            beat, swap = (beats[nxt], int(swaps[nxt])) if nxt < n_beats else (0, 0)
            ctx.set(dut.blocks.payload, {"blocks": beat, "swap": swap})
            ctx.set(dut.blocks.valid, valid)
            if cfg.wide:
                en = int(ens[t])
                ctx.set(dut.enable_upcoming, int(ens[t + 1]) if t + 1 < cycles else 0)
            else:
                en = int(rng.random() < 0.8)
            ctx.set(dut.enable.en, en)
            ctx.set(dut.enable.lane.as_value(), (1 << N) - 1 if en else 0)
            _, _, ready, hold, wp, wp2, read, groups, region_valid = await ctx.tick().sample(
                dut.blocks.ready, dut.valid, dut.lanes.write_page, dut.groups.write_page,
                dut.lanes.read.as_value(), dut.groups.fields.as_value(),
                dut.region_valid if cfg.wide else dut.valid)
            ones = (1 << cfg.regions) - 1
            assert wp == wp2 and wp in (0, ones)              # one copy per region, all equal
            wp2 &= 1
            if cfg.wide:                                      # stage 0's valid bit, a copy per region
                assert region_valid == hold * ones
            for k, v in zip(rec, (beat, swap, valid, en, ready, hold, wp2, read, groups)):
                rec[k].append(v)
            nxt += valid and ready

    simulate(dut, bench)
    want = beat_issue.model(cfg, rec["beat"], rec["swap"], rec["valid"], rec["en"])
    for k, w in (("ready", "ready"), ("hold", "valid"), ("write_page", "write_page")):
        np.testing.assert_array_equal(rec[k], want[w], err_msg=k)
    assert sum(rec["ready"][t] and rec["valid"][t] for t in range(cycles)) > n_beats // 2
    field_names = list(scale_decoder.fields(cfg).members)
    for t in np.flatnonzero(want["valid"]):
        reads = unpack(rlay, rec["read"][t])
        assert reads == [{"addr": want["addr"][t, i], "bank": want["bank"][t, i], "page": want["page"][t, i]}
                         for i in range(N)], t
        groups = unpack(glay, rec["groups"][t])
        assert groups == [{"fields": {f: want[f"fields.{f}"][t, g] for f in field_names},
                           "page": want["group_page"][t, g]} for g in range(len(groups))], t


@pytest.mark.parametrize("output,layout,lanes", [
    ("bf16", "sop4-g16", 4), ("bf16", "sop4-g16", 16), ("exact", "sop4-g16", 64), ("bf16", "e2m3-ue4m4-g16", 8),
    ("exact", "e2m3-ue4m4-g16", 1)])
def test_beat_issue_against_model(output, layout, lanes):
    check_beat_issue(config(output, layout, lanes))


def test_beat_issue_check_catches_an_inverted_selection_bit():
    with pytest.raises(AssertionError):
        check_beat_issue(config("bf16", "sop4-g16", 8), mux=mutants.InvertedSelect)


# -- pipeline control, output buffer, output stage ----------------------------------------

@pytest.mark.parametrize("lanes,depth,levels", [(1, 2, None), (8, 6, None), (16, 9, None), (64, 4, None),
                                                 (8, 4, 0), (64, 6, 0)])
def test_pipeline_control_against_model(lanes, depth, levels):
    """Random decisions and stage-0 valid bits: every enable copy and the valid chain are the
    model's in every cycle (``levels`` 0: the shallow pipeline's combinational enable)."""
    up = levels is None and lanes > replica.REGION          # a wide decoder's en_upcoming (two levels)
    dut = PipelineControl(lanes, depth, levels=levels, upcoming=up)
    nb = pipeline.buffers(lanes, levels)
    rng = np.random.default_rng(lanes + depth)
    T = 300
    en_next, valid = (rng.random(T) < 0.6).astype(int), (rng.random(T) < 0.5).astype(int)
    want = pipeline.model(lanes, depth, en_next, valid, levels)
    assert dut.latency == ((1 if lanes <= replica.REGION else 2) if levels is None else levels)

    async def bench(ctx):
        for t in range(T):
            ctx.set(dut.buffers.en_next.as_value(), (1 << nb) - 1 if en_next[t] else 0)
            ctx.set(dut.valid, int(valid[t]))
            # sampled after the edge: with no levels the copies follow en_next in the same cycle
            _, _, en, lane, ben, upc, ev, ctl_up = await ctx.tick().sample(
                dut.enable.en, dut.enable.lane.as_value(), dut.buffers.en.as_value(),
                dut.buffers.en_upcoming.as_value(), dut.buffers.entering_valid.as_value(),
                dut.en_upcoming if up else dut.enable.en)
            if up:
                assert ctl_up == want["en_upcoming"][t, 0], t
            got = (en, [lane >> i & 1 for i in range(lanes)], [ben >> j & 1 for j in range(nb)],
                   [upc >> j & 1 for j in range(nb)], [ev >> j & 1 for j in range(nb)])
            assert got == (want["en"][t], list(want["lane"][t]), list(want["buffer_en"][t]),
                           list(want["en_upcoming"][t]), list(want["entering_valid"][t])), t

    simulate(dut, bench)


class BufferedPipe(Elaboratable):
    """A 3-stage counter pipeline with the decoder's enable scheme: en is en_next through
    ``levels`` registers."""

    def __init__(self, levels, buffer=OutputBuffer):
        self.src_valid = Signal()
        self.buf = buffer(16, levels=levels)
        self.entering_valid = Signal()

    def elaborate(self, platform):
        m = Module()
        m.submodules.buf = buf = self.buf
        en, upcoming = buf.en_next, 0          # levels 0: no register, en_upcoming unused
        for i in range(self.buf.levels):
            r = Signal(init=1, name=f"en{i}")
            m.d.sync += r.eq(en)
            upcoming, en = en, r
        m.d.comb += buf.en_upcoming.eq(upcoming)
        count = Signal(16)
        stages = [(Signal(16, name=f"d{i}"), Signal(name=f"v{i}")) for i in range(3)]
        with m.If(en):
            with m.If(self.src_valid):
                m.d.sync += count.eq(count + 1)
            m.d.sync += [stages[0][0].eq(count), stages[0][1].eq(self.src_valid)]
            for (d0, v0), (d1, v1) in zip(stages, stages[1:]):
                m.d.sync += [d1.eq(d0), v1.eq(v0)]
        m.d.comb += [buf.en.eq(en), buf.entering_valid.eq(stages[1][1]), buf.last.eq(stages[2][0]),
                     self.entering_valid.eq(stages[1][1])]
        return m


def check_output_buffer(levels, p_valid, p_ready, buffer=OutputBuffer, cycles=600):
    """The buffer in a pipeline that its own decision enables: every cycle its output and its
    decision are the cycle model's, and the beats leave in order, none lost or repeated."""
    dut = BufferedPipe(levels, buffer)
    rng = np.random.default_rng(int(p_valid * 10 + p_ready * 100) + levels)
    rec = {k: [] for k in ("en", "entering", "last", "ready", "valid", "payload", "en_next")}
    got, cycles_out = [], []

    async def bench(ctx):
        for cycle in range(cycles):
            ctx.set(dut.src_valid, int(rng.random() < p_valid))
            ctx.set(dut.buf.values.ready, int(rng.random() < p_ready))
            _, _, *sampled = await ctx.tick().sample(
                dut.buf.en, dut.entering_valid, dut.buf.last, dut.buf.values.ready, dut.buf.values.valid,
                dut.buf.values.payload, dut.buf.en_next)
            for k, v in zip(rec, sampled):
                rec[k].append(v)
            en, _, _, ready, valid, payload, _ = sampled
            if valid and ready:
                got.append(payload)
                cycles_out.append(cycle)

    simulate(dut, bench)
    want = output_buffer.model(levels, rec["en"], rec["entering"], rec["last"], rec["ready"])
    for k in ("valid", "en_next"):
        np.testing.assert_array_equal(rec[k], want[k], err_msg=k)
    valid = np.array(rec["valid"]) == 1
    np.testing.assert_array_equal(np.array(rec["payload"])[valid], want["payload"][valid].astype(np.int64))
    return got, cycles_out


@pytest.mark.parametrize("levels", [0, 1, 2])
@pytest.mark.parametrize("p_valid,p_ready", [(1.0, 1.0), (0.7, 0.5), (1.0, 0.2), (0.3, 0.9)])
def test_output_buffer_against_model(p_valid, p_ready, levels):
    got, cycles = check_output_buffer(levels, p_valid, p_ready)
    assert len(got) > 50
    assert got == list(range(len(got)))                  # in order, none lost, none twice
    if p_valid == 1.0 and p_ready == 1.0:                # no bubble once the pipeline is full
        assert np.all(np.diff(cycles) == 1)


def test_output_buffer_check_catches_a_late_decision():
    with pytest.raises(AssertionError):
        check_output_buffer(2, 1.0, 0.5, mutants.LateEnable)


class ControlledStage(Elaboratable):
    """The decoder's control loop alone: a pipeline of ``depth`` stages after stage 0 carrying a
    counter (lane i: counter + i), enabled by ``PipelineControl``, emptied by ``OutputStage``."""

    def __init__(self, lanes, depth=3, levels=None):
        self.lanes, self.depth, self.src_valid = lanes, depth, Signal()
        self.control = PipelineControl(lanes, depth, levels=levels)
        self.output = OutputStage(unsigned(16), lanes, levels=self.control.latency)

    def elaborate(self, platform):
        m = Module()
        m.submodules.control = control = self.control
        m.submodules.output = output = self.output
        wiring.connect(m, control.buffers, output.control)
        en = control.enable.en
        count, v0 = Signal(16), Signal()
        regs = [Signal(16, name=f"d{s}") for s in range(self.depth + 1)]
        with m.If(en):
            with m.If(self.src_valid):
                m.d.sync += count.eq(count + 1)
            m.d.sync += [v0.eq(self.src_valid), regs[0].eq(count)]
            m.d.sync += [b.eq(a) for a, b in zip(regs, regs[1:])]
        m.d.comb += [control.valid.eq(v0)] + [output.last[i].eq(regs[-1] + i) for i in range(self.lanes)]
        return m


@pytest.mark.parametrize("lanes,levels", [(8, None), (16, None), (16, 0)])
def test_output_stage_with_pipeline_control(lanes, levels):
    """The control loop (the enable tree and the output buffers; ``levels`` 0: the shallow
    pipeline's, no skid) under random input and output stalls: the output and decisions are the
    buffer model's, the enables the control model's, every lane's beats leave in order, none lost
    or repeated."""
    dut = ControlledStage(lanes, levels=levels)
    rng = np.random.default_rng(lanes)
    nb = pipeline.buffers(lanes, dut.control.levels)
    rec = {k: [] for k in ("en", "entering", "last", "ready", "valid", "payload", "en_next", "v0")}
    olay = data.ArrayLayout(unsigned(16), lanes)

    async def bench(ctx):
        for _ in range(500):
            ctx.set(dut.src_valid, int(rng.random() < 0.8))
            ctx.set(dut.output.values.ready, int(rng.random() < 0.6))
            _, _, *sampled = await ctx.tick().sample(
                dut.control.enable.en, dut.control.buffers.entering_valid[0], dut.output.last.as_value(),
                dut.output.values.ready, dut.output.values.valid, dut.output.values.payload.as_value(),
                dut.control.buffers.en_next.as_value(), dut.control.valid)
            for k, v in zip(rec, sampled):
                rec[k].append(v)

    simulate(dut, bench)
    assert set(rec["en_next"]) <= {0, (1 << nb) - 1}          # every buffer decides the same
    en_next = [int(x != 0) for x in rec["en_next"]]
    ctl = pipeline.model(lanes, 3, en_next, rec["v0"], dut.control.levels)
    np.testing.assert_array_equal(rec["en"], ctl["en"])
    np.testing.assert_array_equal(rec["entering"], ctl["entering_valid"][:, 0])
    want = output_buffer.model(dut.output.levels, rec["en"], rec["entering"], rec["last"], rec["ready"])
    np.testing.assert_array_equal(rec["valid"], want["valid"])
    np.testing.assert_array_equal(en_next, want["en_next"])
    sent = [unpack(olay, p) for p, v, r in zip(rec["payload"], rec["valid"], rec["ready"]) if v and r]
    assert len(sent) > 100
    assert sent == [[(j + i) & 0xFFFF for i in range(lanes)] for j in range(len(sent))]
    valid = np.array(rec["valid"]) == 1
    np.testing.assert_array_equal(np.array(rec["payload"], dtype=object)[valid], want["payload"][valid])


# -- configuration --------------------------------------------------------------------------

def test_config_refuses_invalid_combinations():
    with pytest.raises(ValueError, match="power of two"):
        DecoderConfig("bad", 3, LAY["sop4-g16"])
    with pytest.raises(ValueError, match="NaN/Inf"):
        DecoderConfig("bad", 8, BlockLayout(4, 16, get_format("ue8m0")))
    with pytest.raises(ValueError, match="output"):
        DecoderConfig("bad", 8, LAY["sop4-g16"], output="fp32")
    for depth in (12, 64, 1):        # not a power of two; a sop4 lane's whole table; a 1-word memory
        with pytest.raises(ValueError, match="lutram_depth"):
            DecoderConfig("bad", 8, LAY["sop4-g16"], lutram_depth=depth)
    with pytest.raises(ValueError, match="pipeline must be"):
        DecoderConfig("bad", 8, LAY["sop4-g16"], pipeline="fast")
    with pytest.raises(ValueError, match="shallow pipeline has no residual path"):
        DecoderConfig("bad", 8, LAY["sop4-g16"], residuals=1, pipeline="shallow")
    assert DecoderConfig("ok", 8, LAY["e2m3-ue4m4-g16"], lutram_depth=64).table_depth == 128
    assert dataclasses.replace(DecoderConfig("ok", 64, LAY["sop4-g16"])).blocks_per_beat == 4


def test_pipeline_knob_round_trips_and_leaves_the_default_description_alone():
    """``pipeline`` travels through ``describe`` / ``from_description`` (a sim plan carries it);
    the default's description has no such key, as before the knob."""
    deep, shallow = config(lanes=8), config(lanes=8, pipeline="shallow")
    assert "pipeline" not in deep.describe() and shallow.describe()["pipeline"] == "shallow"
    for cfg in (deep, shallow):
        assert DecoderConfig.from_description(cfg.describe()) == cfg


def test_duplicated_constants_come_from_golden():
    bf16 = FORMATS["bf16"]
    assert (scale_decoder.BF16_BIAS, scale_decoder.BF16_M, hif_formatter.BF16_M) == (bf16.bias, bf16.mbits,
                                                                                    bf16.mbits)
