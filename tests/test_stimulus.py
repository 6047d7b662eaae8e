"""The shared host-sequence driver (sim/stimulus.py) and the transaction-level model (sim/model.py), in plain Python.

``host_sequence`` is what both the cocotb bench and the amaranth.sim harness
drive; here its cycles are checked against the host's rules (docs/hardware.md:
tables into the inactive page, loaded before their swap beat, the next
layer's only after the current swap beat is taken; every beat offered in order
until taken; the reset cut). ``DecoderModel`` fed with those cycles must give
hdl.reference's (golden's) output beats for every configuration shape, with
random refusals, and drop what a reset cuts off; a model with a wrong page
rule is shown to disagree.
"""

import ast
import random
from pathlib import Path

import numpy as np
import pytest

from sop.golden.layout import named_layouts
from sop.hdl import reference
from sop.hdl.config import DecoderConfig, named_configs
from sop.sim import stimulus
from sop.sim.model import DecoderModel
from sop.sim.stimulus import HostCycle, host_sequence, random_layer

LAY = named_layouts()
CONFIGS = {
    "sop4-x8-bf16": named_configs()["sop4-g16"],
    "sop4-x1-bf16": DecoderConfig("t", 1, LAY["sop4-g16"]),
    "sop4-x32-exact": DecoderConfig("t", 32, LAY["sop4-g16"], output="exact"),
    "fp6-x4-bf16": DecoderConfig("t", 4, LAY["e2m3-ue4m4-g16"]),
    "fp6-x16-exact": DecoderConfig("t", 16, LAY["e2m3-ue4m4-g16"], output="exact"),
    "sop4-x64-bf16": named_configs()["sop4-g16-x64"],
}
ROOT = Path(__file__).resolve().parent.parent


def run(seq, p_refuse=0.0, seed=0, model=None):
    """Drive a host sequence with a consumer that refuses beats at random; returns the cycles, which
    of them had their beat taken, and the model's output beats."""
    rng = random.Random(seed)
    cycles, took, outputs = [], [], []
    try:
        cycle = next(seq)
        while True:
            taken = cycle.beat is not None and not cycle.reset and rng.random() >= p_refuse
            cycles.append(cycle)
            took.append(taken)
            if model is not None:
                if cycle.reset:
                    model.reset()
                    outputs.clear()                # what was owed is lost
                else:
                    if taken:
                        outputs += model.beat(cycle.beat, cycle.swap)
                    if cycle.write and cycle.write[0] == "lut":
                        model.write(*cycle.write[1:])
                    elif cycle.write:
                        model.set_offset(cycle.write[1])
            cycle = seq.send(taken)
    except StopIteration:
        pass
    return cycles, took, outputs


def packed(cfg, layers):
    w = reference.lane_word_bits(cfg)
    return [sum(v << (i * w) for i, v in enumerate(beat)) for layer in layers for beat in layer.expected(cfg)]


def test_the_host_rules_hold_cycle_by_cycle():
    cfg = CONFIGS["sop4-x8-bf16"]
    rng = np.random.default_rng(1)
    layers = [random_layer(cfg, rng, n) for n in (40, 6, 30)]
    cycles, took, _ = run(host_sequence(cfg, layers, random.Random(2), p_idle=0.3), p_refuse=0.3, seed=3)
    n_writes = len(layers[0].writes())
    assert [c.write for c in cycles[:n_writes]] == layers[0].writes()            # layer 0 first, a word a cycle
    assert all(c.beat is None for c in cycles[:n_writes])
    per_layer = [reference.input_beats(cfg, layer.headers, layer.codes) for layer in layers]
    # the beats taken are every layer's beats in order, each once, the first of each with swap
    taken = [c for c, t in zip(cycles, took) if t]
    assert [c.beat for c in taken] == [b for beats in per_layer for b in beats]
    starts = np.cumsum([0] + [len(b) for b in per_layer])[:-1]
    assert [i for i, c in enumerate(taken) if c.swap] == list(starts)
    # a beat refused is offered again the next cycle (an idle cycle never comes between)
    for i, (c, t) in enumerate(zip(cycles[:-1], took)):
        if c.beat is not None and not t:
            assert (cycles[i + 1].beat, cycles[i + 1].swap) == (c.beat, c.swap)
    # layer li's writes: after layer li-1's swap beat is taken, before layer li's swap beat is offered
    swap_taken = [i for i, (c, t) in enumerate(zip(cycles, took)) if t and c.swap]
    swap_offered = [min(i for i, c in enumerate(cycles) if c.swap and c.beat == beats[0]) for beats in per_layer]
    writes = [(i, c.write) for i, c in enumerate(cycles) if c.write is not None]
    for li in (1, 2):
        mine = writes[li * n_writes:(li + 1) * n_writes]
        assert [w for _, w in mine] == layers[li].writes()
        assert swap_taken[li - 1] < mine[0][0] and mine[-1][0] < swap_offered[li]
    assert not any(c.write is not None and c.swap for c in cycles)             # never beside a swap beat
    assert not any(c.reset for c in cycles)


def test_the_reset_cut():
    cfg = CONFIGS["sop4-x8-bf16"]
    rng = np.random.default_rng(4)
    first, second = random_layer(cfg, rng, 16), random_layer(cfg, rng, 8)
    cycles, _, _ = run(host_sequence(cfg, [first, second], random.Random(5), cut_after=5), p_refuse=0.2, seed=6)
    resets = [i for i, c in enumerate(cycles) if c.reset]
    assert len(resets) == 1
    before, after = cycles[:resets[0]], cycles[resets[0] + 1:]
    first_beats = reference.input_beats(cfg, first.headers, first.codes)
    assert {c.beat for c in before if c.beat is not None} == set(first_beats[:5])
    assert cycles[resets[0]].beat == first_beats[4]                            # still offered during reset
    assert [c.write for c in after[:len(second.writes())]] == second.writes()   # a fresh, whole load
    assert [c.beat for c in after if c.beat is not None] == reference.input_beats(cfg, second.headers, second.codes)


def test_a_cut_layer_whose_beats_are_refused_ends_after_its_budget():
    cfg = CONFIGS["sop4-x1-bf16"]                                               # 16 cycles a block
    layer = random_layer(cfg, np.random.default_rng(7), 8)
    cycles, _, _ = run(host_sequence(cfg, [layer], random.Random(8), cut_after=2), p_refuse=1.0)
    offered = [c for c in cycles if c.beat is not None and not c.reset]
    assert len(offered) == 4 * 2 * cfg.beats_per_block and cycles[-1].reset


@pytest.mark.parametrize("name", CONFIGS)
def test_the_model_is_golden_through_the_host_sequence(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(9)
    layers = [random_layer(cfg, rng, 3 * cfg.blocks_per_beat) for _ in range(2)] + \
        [stimulus.corner_layer(cfg, off) for off in (-128, 127)]
    _, _, outputs = run(host_sequence(cfg, layers, random.Random(10), p_idle=0.2), p_refuse=0.3, seed=11,
                     model=DecoderModel(cfg))
    assert outputs == packed(cfg, layers)
    # after a reset cut, only the fresh layer's output
    first, second = random_layer(cfg, rng, 4 * cfg.blocks_per_beat), random_layer(cfg, rng, 2 * cfg.blocks_per_beat)
    _, _, outputs = run(host_sequence(cfg, [first, second], random.Random(12), cut_after=2), model=DecoderModel(cfg))
    assert outputs == packed(cfg, [second])


def test_a_model_reading_the_wrong_page_is_caught():
    """The check can fail: a model that decodes with the page the host is loading disagrees."""
    class WrongPage(DecoderModel):
        def beat(self, blocks, swap):
            self.active ^= 1                                  # read the inactive page
            try:
                return super().beat(blocks, swap)
            finally:
                self.active ^= 1

    cfg = CONFIGS["sop4-x8-bf16"]
    rng = np.random.default_rng(13)
    layers = [random_layer(cfg, rng, 8) for _ in range(2)]
    _, _, outputs = run(host_sequence(cfg, layers, random.Random(14)), model=WrongPage(cfg))
    assert outputs != packed(cfg, layers)


def test_the_cocotb_bench_and_the_amaranth_harness_share_the_driver():
    """Both consume stimulus.host_sequence and neither builds beats or table writes of its own."""
    for path in (ROOT / "sim" / "tb_decoder.py", ROOT / "tests" / "hdl_harness.py"):
        tree = ast.parse(path.read_text())
        calls = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
                 for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "host_sequence" in calls, path.name
        assert not {"input_beats", "writes"} & calls, path.name      # the sequence's job, not theirs


def test_an_idle_host_cycle_drives_nothing():
    assert HostCycle() == HostCycle(write=None, beat=None, swap=False, reset=False)


def test_a_layers_sparse_stream_marks_its_last_entry():
    """The sparse stream's `last` flag on the final entry only (the simulator tests saw a lost flag only as a
    minute-long stall)."""
    layer = stimulus.Layer(np.zeros((1, 16), np.int64), 0, np.zeros(1, np.int64), np.zeros((1, 16), np.int64), "x",
                           np.array([3, 7, 9]), np.array([0x3F80, 0x4000, 0xBF80]))
    assert layer.entries() == [(3, 0x3F80, 0), (7, 0x4000, 0), (9, 0xBF80, 1)]
    bare = stimulus.Layer(np.zeros((1, 16), np.int64), 0, np.zeros(1, np.int64), np.zeros((1, 16), np.int64))
    assert bare.entries() == []


def _packed(cfg, beats):
    w = reference.lane_word_bits(cfg)
    return [sum(int(v) << (i * w) for i, v in enumerate(b)) for b in beats]


def _load(model, cfg, luts, offset):
    for bank in range(luts.shape[0]):
        for addr in range(luts.shape[1]):
            model.write(bank, addr, int(luts[bank, addr]))
    model.set_offset(offset)


def test_the_model_tabulates_a_page_whose_blocks_are_wider_than_the_code_space():
    """4-bit codes in blocks of 32 (a layout the configuration space allows): the page's table holds
    every code although a block of the tabulation holds more codes than there are (it was empty:
    ``n_codes // g`` = 0 blocks, every predicted word 0)."""
    from sop.golden.formats import get_format
    from sop.golden.layout import BlockLayout

    cfg = DecoderConfig("g32", 4, BlockLayout(4, 32, get_format("ue4m4")))
    layer = random_layer(cfg, np.random.default_rng(5), 4)
    model = DecoderModel(cfg)
    _load(model, cfg, layer.luts, layer.offset)
    got = []
    for i, beat in enumerate(reference.input_beats(cfg, layer.headers, layer.codes)):
        got += model.beat(beat, swap=i == 0)
    assert got == _packed(cfg, reference.expected_beats(cfg, layer.luts, layer.offset, layer.headers, layer.codes))


def test_table_writes_without_an_offset_write_are_seen_by_the_next_beat():
    """A host that reloads a page's tables and keeps its offset: the model's tabulated page is rebuilt
    from the new entries (a table write alone must drop it, not only an offset write)."""
    cfg = named_configs()["sop4-g16"]
    rng = np.random.default_rng(6)
    a, b = random_layer(cfg, rng, 2), random_layer(cfg, rng, 2)
    beat = reference.input_beats(cfg, a.headers, a.codes)[0]
    model = DecoderModel(cfg)
    _load(model, cfg, a.luts, a.offset)
    model.beat(beat, swap=True)                        # page 1 active and tabulated
    _load(model, cfg, b.luts, b.offset)
    model.beat(beat, swap=True)                        # page 0 active; page 1 inactive, still tabulated
    for bank in range(b.luts.shape[0]):                # page 1's tables rewritten, its offset kept
        for addr in range(b.luts.shape[1]):
            model.write(bank, addr, int(b.luts[bank, addr]))
    first = (a.headers[:1], a.codes[:1])
    want = _packed(cfg, reference.expected_beats(cfg, b.luts, a.offset, *first))
    assert want != _packed(cfg, reference.expected_beats(cfg, a.luts, a.offset, *first))
    assert model.beat(beat, swap=True) == want
