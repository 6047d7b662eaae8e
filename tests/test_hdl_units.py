"""Unit tests of each decoder component in amaranth.sim, against golden/."""

import dataclasses

import numpy as np
import pytest
from amaranth.sim import Simulator

from sop.golden.decoder import decode_blocks, product_fields
from sop.golden.formats import FORMATS
from sop.golden.layout import named_layouts
from sop.hdl.codebook_mux import CodebookMux
from sop.hdl.config import DecoderConfig
from sop.hdl.hif_formatter import HifFormatter
from sop.hdl.lut_bank import LutBank
from sop.hdl.reference import lane_words
from sop.hdl.scale_decoder import ScaleDecoder

LAY = named_layouts()


def simulate(dut, bench, clocked=True):
    sim = Simulator(dut)
    if clocked:
        sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_lut_bank_pages_and_synchronous_reads():
    dut = LutBank(code_bits=4, width=10, lanes=3)
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 1 << 10, (2, 16))

    async def bench(ctx):
        for page in (0, 1):
            ctx.set(dut.write_page, page)
            for addr in range(16):
                ctx.set(dut.write.payload.addr, addr)
                ctx.set(dut.write.payload.data, int(pages[page, addr]))
                ctx.set(dut.write.valid, 1)
                await ctx.tick()
        ctx.set(dut.write.valid, 0)
        ctx.set(dut.read_en, 1)
        for page in (0, 1):
            for start in range(16):
                addrs = [(start + 5 * lane) % 16 for lane in range(3)]
                ctx.set(dut.read_page, page)
                for lane, a in enumerate(addrs):
                    ctx.set(dut.read_addr[lane], a)
                await ctx.tick()
                assert [ctx.get(dut.read_data[lane]) for lane in range(3)] == \
                    [int(pages[page, a]) for a in addrs]
        # read_en low: the words stay while the address changes (a stalled pipeline)
        held = [ctx.get(dut.read_data[lane]) for lane in range(3)]
        ctx.set(dut.read_en, 0)
        ctx.set(dut.read_addr[0], 3)
        await ctx.tick()
        assert [ctx.get(dut.read_data[lane]) for lane in range(3)] == held

    simulate(dut, bench)


@pytest.mark.parametrize("lanes,group", [(8, 16), (32, 16), (64, 8)])
def test_codebook_mux_every_select_pattern(lanes, group):
    dut = CodebookMux(width=10, lanes=lanes, group=group)
    rng = np.random.default_rng(lanes)
    a, b = rng.integers(0, 1024, lanes), rng.integers(0, 1024, lanes)
    blocks = dut.blocks

    async def bench(ctx):
        for i in range(lanes):
            ctx.set(dut.a[i], int(a[i]))
            ctx.set(dut.b[i], int(b[i]))
        for pattern in range(1 << blocks):
            for blk in range(blocks):
                ctx.set(dut.select[blk], (pattern >> blk) & 1)
            await ctx.delay(1e-9)
            for i in range(lanes):
                sel = (pattern >> (i // group)) & 1
                assert ctx.get(dut.out[i]) == int(b[i] if sel else a[i])

    simulate(dut, bench, clocked=False)


def _unit_hif():
    """A one-entry "HIF" whose code 1 is exactly 1.0 (significand 1, exponent 0), so that
    golden's product fields for it are the block scale's own fields."""
    from sop.golden.formats import FloatFormat
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
def test_scale_decoder_every_header(layout):
    lay = LAY[layout]
    dut = ScaleDecoder(lay)
    headers = np.arange(1 << lay.header_bits)
    scale_code, sign, select = lay.split_header(headers)
    offsets = [-128, -1, 0, 7, 127]

    async def bench(ctx):
        for o in offsets:
            ctx.set(dut.offset, o)
            sig, exp = scale_fields(lay, scale_code, np.full(len(headers), o))
            for h in headers:
                ctx.set(dut.header, int(h))
                await ctx.delay(1e-9)
                assert ctx.get(dut.sign) == sign[h] and ctx.get(dut.select) == select[h]
                assert ctx.get(dut.sig) == sig[h] and ctx.get(dut.exp) == exp[h]

    simulate(dut, bench, clocked=False)


def formatter_vectors(cfg: DecoderConfig, offsets, rng):
    """Every HIF code x every scale code x both signs, at several offsets."""
    lay = cfg.layout
    hifs = np.arange(1 << cfg.hif.bits)
    scales = np.arange(1 << lay.scale.bits)
    h, c, s = (a.ravel() for a in np.meshgrid(hifs, scales, [0, 1], indexing="ij"))
    o = rng.choice(offsets, len(h))
    return h, c, s, o


@pytest.mark.parametrize("output", ["exact", "bf16"])
def test_hif_formatter_exhaustive(output):
    cfg = DecoderConfig("t", 1, LAY["sop4-g16"], output=output)
    lay = cfg.layout
    rng = np.random.default_rng(1)
    h, c, s, o = formatter_vectors(cfg, [-128, -100, -20, 0, 20, 100, 127], rng)
    luts = np.arange(1 << cfg.hif.bits)[None, :]           # a "LUT" holding every HIF code
    want = np.concatenate([
        lane_words(cfg, luts, int(off), lay.make_header(c[o == off], s[o == off], 0), h[o == off][:, None])
        for off in np.unique(o)])
    order = np.concatenate([np.flatnonzero(o == off) for off in np.unique(o)])
    dut = HifFormatter(cfg)
    ss, xs = scale_fields(lay, c, o)
    got = np.zeros(len(h), dtype=np.int64)

    async def bench(ctx):
        ctx.set(dut.en, 1)
        n, lat = len(h), dut.latency
        for i in range(n + lat):
            if i < n:
                j = order[i]
                ctx.set(dut.hif, int(h[j]))
                ctx.set(dut.block_sign, int(s[j]))
                ctx.set(dut.scale_sig, int(ss[j]))
                ctx.set(dut.scale_exp, int(xs[j]))
            await ctx.tick()
            if i >= lat - 1 and i - lat + 1 < n:
                got[i - lat + 1] = ctx.get(dut.out.as_value()) if output == "exact" else ctx.get(dut.out)

    simulate(dut, bench)
    np.testing.assert_array_equal(got, want)


def test_formatter_check_catches_ties_away():
    """The exhaustive comparison above would catch a rounding bug: golden's BF16 differs
    from ties-away rounding on these vectors."""
    cfg = DecoderConfig("t", 1, LAY["sop4-g16"], output="bf16")
    luts = np.arange(1 << cfg.hif.bits)[None, :]
    hdr = cfg.layout.make_header(np.arange(64), 0, 0)
    codes = np.tile(np.arange(1 << cfg.hif.bits), (64, 1))
    exact = decode_blocks(cfg.hif, luts, cfg.layout, -20, hdr, codes)
    bf16 = FORMATS["bf16"]
    f32 = exact.astype(np.float32).view(np.uint32).astype(np.int64)
    ties_away = ((f32 + 0x8000) >> 16) & 0xFFFF
    assert (ties_away != bf16.encode(exact).astype(np.int64)).any()


def test_config_refuses_invalid_combinations():
    with pytest.raises(ValueError, match="power of two"):
        DecoderConfig("bad", 3, LAY["sop4-g16"])
    with pytest.raises(ValueError, match="NaN/Inf"):
        from sop.golden.formats import get_format
        from sop.golden.layout import BlockLayout
        DecoderConfig("bad", 8, BlockLayout(4, 16, get_format("ue8m0")))
    with pytest.raises(ValueError, match="output"):
        DecoderConfig("bad", 8, LAY["sop4-g16"], output="fp32")
    assert dataclasses.replace(DecoderConfig("ok", 64, LAY["sop4-g16"])).blocks_per_beat == 4
