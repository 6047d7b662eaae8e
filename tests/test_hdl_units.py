"""Unit tests of each decoder component in amaranth.sim, against golden/."""

import dataclasses

import mutants
import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module, Signal
from amaranth.sim import Simulator

from sop.golden.decoder import decode_blocks, product_fields
from sop.golden.formats import FORMATS, FloatFormat, get_format
from sop.golden.layout import BlockLayout, named_layouts
from sop.hdl import lut_word, scale_decoder
from sop.hdl.arith import PipelinedMultiplier
from sop.hdl.codebook_mux import CodebookMux
from sop.hdl.config import DecoderConfig
from sop.hdl.hif_formatter import HifFormatter
from sop.hdl.lut_bank import LutBank
from sop.hdl.output_buffer import OutputBuffer
from sop.hdl.reference import lane_words
from sop.hdl.scale_decoder import ScaleDecoder

LAY = named_layouts()


def simulate(dut, bench, clocked=True):
    sim = Simulator(dut)
    if clocked:
        sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def config(output="bf16", layout="sop4-g16", lanes=1):
    return DecoderConfig("t", lanes, LAY[layout], output=output)


# -- LUT word encoder ------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["bf16", "exact"])
def test_lut_word_encoder_every_hif_code(output):
    """The stored word of every HIF code, against the numpy model; the model's words decode
    to golden's HIF values (normalized: the leading one at bit M)."""
    cfg = config(output)
    hif, codes = cfg.hif, np.arange(1 << cfg.hif.bits)
    want = lut_word.encode(cfg, codes)
    if output == "bf16":
        M, eb = hif.mbits, lut_word.exp_bits(cfg)
        frac, exp, sign = want & ((1 << M) - 1), (want >> M) & ((1 << eb) - 1), want >> (M + eb)
        mag = np.where(exp == 0, 0.0, np.ldexp((frac + (1 << M)).astype(float), exp + lut_word.exp_base(cfg)))
        np.testing.assert_array_equal(np.where(sign == 1, -mag, mag), hif.values)
        assert (np.signbit(hif.values) == (sign == 1)).all()
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
    np.testing.assert_array_equal(got, (a * b)[:len(got)])


# -- LUT bank and codebook mux --------------------------------------------------------------

def check_lut_bank(lutram_depth, bank_cls=LutBank):
    """Reads of every page, bank and address on three lanes with their own random read
    enables: ``read_data`` is always the word of the read issued ``read_latency`` enabled
    edges ago (held while stalled); a word written in cycle t is read from cycle t + 2."""
    cfg = config("exact")
    lanes = 3
    dut = bank_cls(code_bits=4, banks=2, word=lut_word.word(cfg), lanes=lanes, lutram_depth=lutram_depth)
    assert dut.read_latency == (1 if lutram_depth == 0 else 2)
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
                    assert ctx.get(dut.read_data[lane].as_value()) == tables[page, bank, addr], (cycle, lane)
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
            for blk in range(dut.blocks):
                ctx.set(dut.select[blk], (pattern >> blk) & 1)
            await ctx.delay(1e-9)
            for i in range(lanes):
                assert ctx.get(dut.bank[i]) == (pattern >> (i // group)) & 1

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


@pytest.mark.parametrize("layout", ["sop4-g16", "e2m3-ue4m4-g16"])
@pytest.mark.parametrize("output", ["exact", "bf16"])
def test_scale_decoder_every_header(layout, output):
    """Exact: golden's fields. BF16: the same scale value, normalized (leading one at bit M).
    The per-layer offset is added to ``exp`` afterwards (golden's fields at offset 0)."""
    cfg = config(output, layout)
    lay = cfg.layout
    dut = ScaleDecoder(cfg)
    headers = np.arange(1 << lay.header_bits)
    scale_code, sign, select = lay.split_header(headers)
    sig, exp = scale_fields(lay, scale_code, np.zeros(len(headers), int))
    Ms = lay.scale.mbits

    async def bench(ctx):
        for h in headers:
            ctx.set(dut.header, int(h))
            await ctx.delay(1e-9)
            f = dut.fields
            assert ctx.get(f.sign) == sign[h] and ctx.get(dut.select) == select[h]
            if output == "exact":
                assert ctx.get(f.sig) == sig[h] and ctx.get(f.exp) + scale_decoder.exp_constant(cfg) == exp[h]
                continue
            assert ctx.get(f.zero) == (sig[h] == 0)
            if sig[h]:
                x = ctx.get(f.exp) - lay.scale.bias - Ms          # the exponent of the normalized sig
                assert (ctx.get(f.frac) + (1 << Ms)) * 2.0 ** x == sig[h] * 2.0 ** exp[h], h

    simulate(dut, bench, clocked=False)


# -- one lane: encoder, scale decoder and formatter together, exhaustive ------------------

class Lane(Elaboratable):
    """HIF code and header in, the lane's output word after the formatter's latency."""

    def __init__(self, cfg, formatter=HifFormatter):
        self.cfg = cfg
        self.hif, self.header = Signal(cfg.hif.bits), Signal(cfg.layout.header_bits)
        self.offset = Signal(range(-128, 128))
        self.fmt = formatter(cfg)

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


def run_lane(cfg, h, c, s, o, formatter=HifFormatter):
    lay = cfg.layout
    dut = Lane(cfg, formatter)
    headers = lay.make_header(c, s, 0)
    got = np.zeros(len(h), dtype=np.int64)

    async def bench(ctx):
        n, lat = len(h), dut.fmt.latency
        for i in range(n + lat):
            if i < n:
                ctx.set(dut.hif, int(h[i]))
                ctx.set(dut.header, int(headers[i]))
                ctx.set(dut.offset, int(o[i]))
            await ctx.tick()
            if i >= lat - 1 and i - lat + 1 < n:
                got[i - lat + 1] = ctx.get(dut.fmt.out.as_value()) if cfg.output == "exact" else ctx.get(dut.fmt.out)

    simulate(dut, bench)
    return got


def golden_words(cfg, h, c, s, o):
    luts = np.arange(1 << cfg.hif.bits)[None, :]           # a "LUT" holding every HIF code
    want = np.zeros(len(h), dtype=np.int64)
    for off in np.unique(o):
        sel = o == off
        want[sel] = lane_words(cfg, luts, int(off), cfg.layout.make_header(c[sel], s[sel], 0), h[sel][:, None])
    return want


@pytest.mark.parametrize("output", ["exact", "bf16"])
@pytest.mark.parametrize("layout", ["sop4-g16", "e2m3-ue4m4-g16"])
def test_lane_exhaustive(output, layout):
    """Every HIF code x every scale code x both signs, at offsets from subnormal to saturated."""
    cfg = config(output, layout)
    h, c, s, o = lane_vectors(cfg, [-128, -100, -20, 0, 20, 100, 127], np.random.default_rng(1))
    np.testing.assert_array_equal(run_lane(cfg, h, c, s, o), golden_words(cfg, h, c, s, o))


def test_lane_check_catches_ties_away():
    """The exhaustive lane comparison catches a rounding bug (ties away from zero)."""
    import mutants
    cfg = config("bf16")
    h, c, s, o = lane_vectors(cfg, [-20], np.random.default_rng(2))
    assert (run_lane(cfg, h, c, s, o, mutants.TiesAway) != golden_words(cfg, h, c, s, o)).any()


def test_formatter_check_catches_ties_away():
    """Golden's BF16 differs from ties-away rounding on the vectors the lane test uses."""
    cfg = config("bf16")
    luts = np.arange(1 << cfg.hif.bits)[None, :]
    hdr = cfg.layout.make_header(np.arange(64), 0, 0)
    codes = np.tile(np.arange(1 << cfg.hif.bits), (64, 1))
    exact = decode_blocks(cfg.hif, luts, cfg.layout, -20, hdr, codes)
    f32 = exact.astype(np.float32).view(np.uint32).astype(np.int64)
    ties_away = ((f32 + 0x8000) >> 16) & 0xFFFF
    assert (ties_away != FORMATS["bf16"].encode(exact).astype(np.int64)).any()


# -- output buffer --------------------------------------------------------------------------

class BufferedPipe(Elaboratable):
    """A 3-stage counter pipeline with the decoder's enable scheme: en is en_next through
    ``delay`` registers."""

    def __init__(self, delay):
        self.src_valid = Signal()
        self.buf = OutputBuffer(16, delay=delay)

    def elaborate(self, platform):
        m = Module()
        m.submodules.buf = buf = self.buf
        en = buf.en_next
        for i in range(self.buf.delay):
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
        m.d.comb += [buf.en.eq(en), buf.entering_valid.eq(stages[1][1]), buf.last.eq(stages[2][0])]
        return m


@pytest.mark.parametrize("delay", [1, 2])
@pytest.mark.parametrize("p_valid,p_ready", [(1.0, 1.0), (0.7, 0.5), (1.0, 0.2), (0.3, 0.9)])
def test_output_buffer_loses_and_duplicates_nothing(p_valid, p_ready, delay):
    dut = BufferedPipe(delay)
    rng = np.random.default_rng(int(p_valid * 10 + p_ready * 100))
    got, cycles = [], []

    async def bench(ctx):
        for cycle in range(600):
            ctx.set(dut.src_valid, int(rng.random() < p_valid))
            ctx.set(dut.buf.values.ready, int(rng.random() < p_ready))
            _, _, valid, ready, payload = await ctx.tick().sample(
                dut.buf.values.valid, dut.buf.values.ready, dut.buf.values.payload)
            if valid and ready:
                got.append(payload)
                cycles.append(cycle)

    simulate(dut, bench)
    assert len(got) > 50
    assert got == list(range(len(got)))                  # in order, none lost, none twice
    if p_valid == 1.0 and p_ready == 1.0:                # no bubble once the pipeline is full
        assert np.all(np.diff(cycles) == 1)


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
    assert DecoderConfig("ok", 8, LAY["e2m3-ue4m4-g16"], lutram_depth=64).table_depth == 128
    assert dataclasses.replace(DecoderConfig("ok", 64, LAY["sop4-g16"])).blocks_per_beat == 4
