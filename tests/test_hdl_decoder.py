"""The decoder top in amaranth.sim, bit-exact against golden/ (hdl.reference).

Random streams with random input idles and output stalls, table swaps between
layers mid-stream, every code / bank / sign / scale extreme, subnormal and
saturated outputs, reset mid-stream, the latency measured handshake to handshake,
the one-bank load; and the checks shown to catch bugs injected into the device
(tests/mutants.py), never into its input.
"""

import numpy as np
import pytest
from amaranth.hdl import Fragment
from amaranth.sim import Simulator
from hdl_harness import Layer, corner_layer, random_layer, run_decoder

import mutants

from sop.golden.codebooks import get_codebook
from sop.golden.layout import BlockLayout, named_layouts, unpack_blocks
from sop.hdl import reference
from sop.hdl.config import DecoderConfig, named_configs
from sop.hdl.decoder import Decoder
from sop.hdl.generate import manifest
from sop.quantize.blockwise import encode_layer
from sop.quantize.weights import minilm_linear_weights

LAY = named_layouts()
CONFIGS = {
    "sop4-x8-bf16": DecoderConfig("t", 8, LAY["sop4-g16"]),
    "sop4-x1-bf16": DecoderConfig("t", 1, LAY["sop4-g16"]),
    "sop4-x32-exact": DecoderConfig("t", 32, LAY["sop4-g16"], output="exact"),
    "fp6-x4-bf16": DecoderConfig("t", 4, LAY["e2m3-ue4m4-g16"]),
    "fp6-x16-exact": DecoderConfig("t", 16, LAY["e2m3-ue4m4-g16"], output="exact"),
    # tables from LUT RAM memories (hdl/lut_bank.py): a two-cycle read
    "sop4-x8-bf16-lutram16": DecoderConfig("t", 8, LAY["sop4-g16"], lutram_depth=16),
    "fp6-x16-exact-lutram32": DecoderConfig("t", 16, LAY["e2m3-ue4m4-g16"], output="exact", lutram_depth=32),
    # a wide decoder (more than 8 lanes, hdl/config.py): inputs registered per region, BF16, LUT RAM
    "sop4-x16-bf16-lutram16": DecoderConfig("t", 16, LAY["sop4-g16"], lutram_depth=16),
    # wide, a block over four cycles (blocks of 64: the input register's beat issued in chunks)
    "sop4g64-x16-bf16-lutram16": DecoderConfig("t", 16, BlockLayout(4, 64, LAY["sop4-g16"].scale, True, True),
                                               lutram_depth=16),
    # the shallow pipeline (hdl/config.py): no skid, combinational stall, four-stage formatter
    "sop4-x8-bf16-shallow": DecoderConfig("t", 8, LAY["sop4-g16"], pipeline="shallow"),
    "sop4-x16-bf16-shallow": DecoderConfig("t", 16, LAY["sop4-g16"], pipeline="shallow"),
    "fp6-x4-bf16-shallow": DecoderConfig("t", 4, LAY["e2m3-ue4m4-g16"], pipeline="shallow"),
    "fp6-x16-exact-lutram32-shallow": DecoderConfig("t", 16, LAY["e2m3-ue4m4-g16"], output="exact",
                                                    lutram_depth=32, pipeline="shallow"),
}


def expected(cfg, layers):
    return [beat for layer in layers for beat in layer.expected(cfg)]


@pytest.mark.parametrize("name", CONFIGS)
def test_random_layers_with_stalls_and_table_swaps(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(1)
    layers = [random_layer(cfg, rng, n_blocks=6) for _ in range(3)]
    assert run_decoder(cfg, layers, seed=2) == expected(cfg, layers)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_code_bank_sign_and_scale_extreme(name):
    cfg = CONFIGS[name]
    # offsets at both ends: subnormal / underflowing outputs and saturated ones
    layers = [corner_layer(cfg, offset) for offset in (-128, 0, 127)]
    assert run_decoder(cfg, layers, seed=3, p_idle=0.1, p_stall=0.1) == expected(cfg, layers)


def test_subnormal_and_saturated_bf16_outputs_are_exercised():
    cfg = CONFIGS["sop4-x8-bf16"]
    words = np.array(expected(cfg, [corner_layer(cfg, -128), corner_layer(cfg, 127)])).ravel()
    mag = words & 0x7FFF
    assert ((mag > 0) & (mag < 0x0080)).any()           # BF16 subnormals
    assert (mag == 0x7F7F).any()                         # saturated at the largest finite value
    assert (words == 0x8000).any()                       # negative zero


@pytest.mark.parametrize("name", ["sop4-x8-bf16", "sop4-x1-bf16", "sop4-x32-exact", "sop4-x8-bf16-lutram16",
                                  "sop4-x8-bf16-shallow", "sop4-x16-bf16-lutram16"])
def test_full_throughput_without_stalls(name):
    """No bubble: with both sides always ready, one output beat leaves every cycle,
    across blocks (g > N: a block over several cycles) and across a table swap."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(4)
    # The first layer is long enough for the host to load all of the next layer's
    # tables (one word per cycle) while it streams.
    layers = [random_layer(cfg, rng, n_blocks=80), random_layer(cfg, rng, n_blocks=8)]
    cycles = []
    # the second layer's tables are loaded while the first streams; its first beat swaps pages
    assert run_decoder(cfg, layers, seed=5, p_idle=0.0, p_stall=0.0, beat_cycles=cycles) == \
        expected(cfg, layers)
    assert np.all(np.diff(cycles) == 1)


def run_one_layer(cfg, layer, *, dut=None, bank_bit=None, cycles=200):
    """Load ``layer``'s tables and offset, send its beats back to back (the first with ``swap``)
    into an always-ready output; returns (output beats, cycles of the input handshakes, cycles
    of the output handshakes). ``bank_bit`` forces ``load.bank`` of every table write."""
    dut = dut or Decoder(cfg)
    beats = reference.input_beats(cfg, layer.headers, layer.codes)
    got, t_in, t_out = [], [], []

    async def bench(ctx):
        for w in layer.writes():
            if w[0] == "lut":
                _, bank, addr, value = w
                ctx.set(dut.load.payload, {"bank": bank if bank_bit is None else bank_bit, "addr": addr,
                                           "data": value})
                ctx.set(dut.load.valid, 1)
            else:
                ctx.set(dut.offset, w[1])
                ctx.set(dut.offset_we, 1)
            await ctx.tick()
            ctx.set(dut.load.valid, 0)
            ctx.set(dut.offset_we, 0)
        ctx.set(dut.values.ready, 1)
        sent = 0
        for cycle in range(cycles):
            if sent < len(beats):
                ctx.set(dut.blocks.payload, {"blocks": beats[sent], "swap": int(sent == 0)})
            ctx.set(dut.blocks.valid, int(sent < len(beats)))
            _, _, iv, ir, ov, orr, payload = await ctx.tick().sample(
                dut.blocks.valid, dut.blocks.ready, dut.values.valid, dut.values.ready, dut.values.payload.as_value())
            if iv and ir:
                t_in.append(cycle)
                sent += 1
            if ov and orr:
                t_out.append(cycle)
                got.append(reference.split_lanes(cfg, payload))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return got, t_in, t_out


@pytest.mark.parametrize("name", ["sop4-x8-bf16", "fp6-x4-bf16", "sop4-x32-exact", "sop4-x8-bf16-lutram16",
                                  "fp6-x16-exact-lutram32", "sop4-x8-bf16-shallow", "fp6-x4-bf16-shallow",
                                  "fp6-x16-exact-lutram32-shallow", "sop4-x16-bf16-lutram16"])
def test_latency_is_what_the_manifest_says(name):
    """Cycles from a beat's handshake to its first output beat's handshake (the output always
    ready), measured; it is the sum of the components' latencies, which each component takes from
    the stages it builds, and the manifest's ``latency_cycles``."""
    cfg = CONFIGS[name]
    layer = random_layer(cfg, np.random.default_rng(13), n_blocks=cfg.blocks_per_beat)
    dut = Decoder(cfg)
    got, t_in, t_out = run_one_layer(cfg, layer, dut=dut, cycles=40)
    assert got == expected(cfg, [layer])
    assert t_out[0] - t_in[0] == dut.latency
    assert dut.latency == dut.issue.latency + dut.lanes.latency + dut.output.latency
    assert dut.issue.latency == (2 if cfg.wide else 1)          # a wide decoder's input stage
    assert dut.lanes.latency == dut.lanes.bank.read_latency + dut.lanes.formatters[0].latency
    assert manifest(cfg, dut)["latency_cycles"] == dut.latency


def test_one_bank_configuration_ignores_the_load_bank_bit():
    """docs/hardware.md: a layout without a selection bit has one table per page; ``load.bank``
    is not decoded, so a write with bank 1 lands in that table as one with bank 0 does."""
    cfg = CONFIGS["fp6-x4-bf16"]
    assert cfg.layout.banks == 1
    layer = random_layer(cfg, np.random.default_rng(15), n_blocks=4)
    want = expected(cfg, [layer])
    assert run_one_layer(cfg, layer, bank_bit=1)[0] == want == run_one_layer(cfg, layer, bank_bit=0)[0]


@pytest.mark.parametrize("name", ["sop4-x8-bf16", "sop4-x8-bf16-lutram16", "sop4-x8-bf16-shallow",
                                  "sop4-x16-bf16-lutram16"])
def test_reset_mid_stream_leaves_no_stale_data(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(6)
    first, second = random_layer(cfg, rng, 8), random_layer(cfg, rng, 4)
    got = run_decoder(cfg, [first, second], seed=7, reset_after_beats=5)
    assert got == second.expected(cfg)


def test_real_minilm_layer():
    cfg = named_configs()["sop4-g16"]
    w = minilm_linear_weights()["encoder.layer.0.attention.self.query.weight"][:8].astype(np.float64)
    stream = encode_layer(w, LAY["sop4-g16"], [get_codebook("nf4"), get_codebook("sh4")])
    headers, codes = unpack_blocks(stream.layout, stream.blocks)
    layer = Layer(stream.luts, stream.offset, headers, codes)
    assert run_decoder(cfg, [layer], seed=8) == expected(cfg, [layer])


# -- the checks catch injected bugs -------------------------------------------------------

def test_check_catches_a_flipped_bit_in_the_lut_ram():
    cfg = CONFIGS["sop4-x8-bf16"]
    layer = corner_layer(cfg, 0)
    got = run_decoder(cfg, [layer], seed=12, p_idle=0, p_stall=0, dut=Decoder(cfg, bank=mutants.FlippedLutBit))
    assert got != expected(cfg, [layer])


def test_check_catches_an_inverted_selection_bit():
    cfg = CONFIGS["sop4-x8-bf16"]
    layer = corner_layer(cfg, 0)
    got = run_decoder(cfg, [layer], seed=10, p_idle=0, p_stall=0, dut=Decoder(cfg, mux=mutants.InvertedSelect))
    assert got != expected(cfg, [layer])


def test_check_catches_wrong_rounding():
    cfg = CONFIGS["sop4-x8-bf16"]
    layer = random_layer(cfg, np.random.default_rng(11), n_blocks=16, offset=-10)
    got = run_decoder(cfg, [layer], seed=11, p_idle=0, p_stall=0, dut=Decoder(cfg, formatter=mutants.TiesAway))
    assert got != expected(cfg, [layer])


def test_check_catches_a_stale_part_select_in_the_lut_ram():
    cfg = CONFIGS["sop4-x8-bf16-lutram16"]
    layer = corner_layer(cfg, 0)
    got = run_decoder(cfg, [layer], seed=14, dut=Decoder(cfg, bank=mutants.StalePartSelect))
    assert got != expected(cfg, [layer])


def test_shallow_latency_is_two_stages_shorter():
    """The shallow pipeline's latency: the deep one's less the two formatter stages it merges
    (the enable has no register levels, the output stage none either way)."""
    deep, shallow = Decoder(CONFIGS["sop4-x8-bf16"]), Decoder(CONFIGS["sop4-x8-bf16-shallow"])
    for dut in (deep, shallow):
        Fragment.get(dut, None)              # elaborated: each component checks its stages against its latency
    assert (deep.latency, shallow.latency) == (8, 6)
    assert shallow.control.latency == shallow.output.levels == 0


def test_check_catches_an_extra_stage_in_the_shallow_formatter():
    """An off-by-one stage (the formatter builds one register more than its latency says) in the
    shallow pipeline: the words leave a beat late, and the stream check sees it."""
    cfg = CONFIGS["sop4-x8-bf16-shallow"]
    layer = random_layer(cfg, np.random.default_rng(16), n_blocks=4)
    got = run_decoder(cfg, [layer], seed=16, dut=Decoder(cfg, formatter=mutants.ExtraStage))
    assert got != expected(cfg, [layer])
