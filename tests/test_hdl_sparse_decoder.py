"""The decoder with the residual path in amaranth.sim, bit-exact against golden/.

Layers with sparse entries (sim.stimulus.with_sparse: random, bursts of a whole output
beat, block and beat boundaries, the first and last value of a layer, the swap beat,
residuals that cancel, flip the sign, saturate or break ties) mixed with layers without,
random input idles, entry gaps and output stalls, table swaps, a reset mid-stream, real
MiniLM rows with the residuals `sop-budget` gives them; the latency; the error bits for
each bad input; the Verilog of the configurations without residuals unchanged; and the
checks shown to catch broken residual parts (tests/residual_mutants.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import residual_mutants as mut
from amaranth.hdl import Fragment
from hdl_harness import run_decoder

from sop.golden.layout import named_layouts
from sop.hdl.config import DecoderConfig, named_configs, residual_configs
from sop.hdl.decoder import Decoder
from sop.hdl.sparse_merge import ERRORS
from sop.sim.stimulus import SPARSE_PATTERNS, Layer, random_layer, with_sparse

LAY = named_layouts()
CONFIGS = {
    "sop4-x8-r1": DecoderConfig("t", 8, LAY["sop4-g16"], residuals=1),
    "sop4-x8-r2": DecoderConfig("t", 8, LAY["sop4-g16"], residuals=2),
    "sop4-x1-r1": DecoderConfig("t", 1, LAY["sop4-g16"], residuals=1),
    "fp6-x4-r1": DecoderConfig("t", 4, LAY["e2m3-ue4m4-g16"], residuals=1),
    "sop4-x32-r1": DecoderConfig("t", 32, LAY["sop4-g16"], residuals=1),
    "sop4-x8-r1-lutram16": DecoderConfig("t", 8, LAY["sop4-g16"], residuals=1, lutram_depth=16),
}


def expected(cfg, layers):
    return [beat for layer in layers for beat in layer.expected(cfg)]


def sparse_layers(cfg, seed, n_blocks=8, patterns=SPARSE_PATTERNS):
    rng = np.random.default_rng(seed)
    layers = []
    for i, pattern in enumerate(patterns):
        layer = random_layer(cfg, rng, n_blocks)
        layers.append(with_sparse(cfg, layer, rng, pattern, density=0.1))
        if i % 2:
            layers.append(random_layer(cfg, rng, 2))           # a layer without entries between
    return layers


@pytest.mark.parametrize("name", CONFIGS)
def test_sparse_layers_with_stalls_and_table_swaps(name):
    cfg = CONFIGS[name]
    layers = sparse_layers(cfg, 1)
    errors = {}
    assert run_decoder(cfg, layers, seed=2, errors=errors) == expected(cfg, layers)
    assert errors == dict.fromkeys(ERRORS, 0)


def test_the_patterns_reach_what_they_claim():
    cfg = CONFIGS["sop4-x8-r1"]
    layers = sparse_layers(cfg, 1)
    plain = [dataclasses.replace(layer, sparse_index=np.zeros(0, np.int64)) for layer in layers]
    got = np.array(expected(cfg, layers)).ravel()
    base = np.array(expected(cfg, plain)).ravel()
    assert (got != base).sum() > 100                                 # the residuals change values
    assert ((got == 0) & (base != 0)).any()                          # cancelled to +0
    assert ((got & 0x7FFF) == 0x7F7F).any() and ((base & 0x7FFF) != 0x7F7F).any()   # saturated
    assert (((got ^ base) & 0x8000 != 0) & (base & 0x7FFF != 0)).any()             # sign flipped
    assert ((base == 0x8000) & (got == 0)).any()                     # -0 turned +0: the +0 residual
    burst = next(layer for layer in layers if layer.name.endswith("burst"))
    per_beat = np.bincount(burst.sparse_index // cfg.lanes)
    assert per_beat.max() == cfg.lanes                               # whole beats of entries


def test_full_throughput_and_the_hold_rule():
    """Both sides ready: one output beat a cycle while no beat has more than R entries; each
    beat with more costs one cycle per extra R; a sparse layer's first beat waits for its
    first entries (the host sends them after the swap beat)."""
    cfg = CONFIGS["sop4-x8-r1"]
    rng = np.random.default_rng(4)
    big = random_layer(cfg, rng, 80)
    n = big.codes.size
    one = dataclasses.replace(big, sparse_index=np.arange(3, n, 24), sparse_values=np.full(len(range(3, n, 24)), 0x3F80))
    cycles = []
    layers = [random_layer(cfg, rng, 40), one]
    assert run_decoder(cfg, layers, seed=5, p_idle=0.0, p_stall=0.0, beat_cycles=cycles) == expected(cfg, layers)
    gaps = np.diff(cycles)
    # one beat a cycle but at the sparse layer's start: its first entries come after its swap
    # beat (edge t): the first in the inbox after edge t + 1, in the window after t + 2, when
    # the second (beyond the first beat) is in the inbox: the hold it ends is decided in cycle
    # t + 3: three bubbles
    assert (gaps == 1).sum() == len(gaps) - 1 and gaps.max() == 4
    two = dataclasses.replace(big, sparse_index=np.sort(np.r_[np.arange(3, n, 24), np.arange(5, n, 24)]),
                              sparse_values=np.full(2 * len(range(3, n, 24)), 0x3F80))
    cycles2 = []
    layers2 = [random_layer(cfg, rng, 40), two]
    assert run_decoder(cfg, layers2, seed=5, p_idle=0.0, p_stall=0.0, beat_cycles=cycles2) == expected(cfg, layers2)
    extra = (cycles2[-1] - cycles2[0]) - (cycles[-1] - cycles[0])
    assert extra == pytest.approx(len(range(3, n, 24)), abs=4)      # one cycle per beat with 2 entries


def test_latency_is_the_components_sum():
    for cfg in CONFIGS.values():
        dut = Decoder(cfg)
        Fragment.get(dut, None)
        assert dut.latency == dut.issue.latency + dut.lanes.latency + dut.residual.latency + dut.output.latency
        assert dut.residual.latency == dut.residual.delay + 1
    cfg = CONFIGS["sop4-x8-r1"]
    rng = np.random.default_rng(6)
    layers = [random_layer(cfg, rng, 4)]
    cycles, dut = [], Decoder(cfg)
    run_decoder(cfg, layers, seed=7, p_idle=0.0, p_stall=0.0, beat_cycles=cycles, dut=dut)
    swap_edge = 2 * 16 + 1                # the 33 table and offset writes, then the swap beat's edge
    assert cycles[0] - swap_edge == dut.latency == 17


def test_reset_mid_stream_with_entries_owed():
    cfg = CONFIGS["sop4-x8-r1"]
    rng = np.random.default_rng(8)
    layers = [with_sparse(cfg, random_layer(cfg, rng, 16), rng, "random", 0.2),
              with_sparse(cfg, random_layer(cfg, rng, 8), rng, "burst")]
    errors = {}
    assert run_decoder(cfg, layers, seed=9, reset_after_beats=5, errors=errors) == expected(cfg, layers[1:])
    assert errors == dict.fromkeys(ERRORS, 0)


def test_real_minilm_rows_with_budget_residuals():
    """MiniLM rows quantized as sop4-g16 with the residuals the sop-budget knapsack stores
    (quantize.sparse at 2 %, its densest option), through the decoder."""
    from sop.quantize.sop_search import quantize_sop4
    from sop.quantize.sparse import add_sparse
    from sop.quantize.weights import minilm_linear_weights
    from sop.sim.stimulus import from_stream

    cfg = CONFIGS["sop4-x8-r1"]
    w = minilm_linear_weights()["encoder.layer.0.output.dense.weight"][:4]
    base = quantize_sop4(w, None)
    stream, _ = add_sparse(base.stream, w, base.recon, int(0.02 * w.size))
    layer = from_stream(cfg, stream, "minilm")
    assert len(layer.sparse_index) > 100
    assert run_decoder(cfg, [layer], seed=10, p_stall=0.1) == expected(cfg, [layer])


@dataclasses.dataclass
class BadLayer(Layer):
    """A layer whose sparse stream breaks a rule: its expected output is left undefined (the
    run only needs the number of beats), and ``declared`` is the flag the host writes."""
    declared: bool = True

    def expected(self, cfg):
        return dataclasses.replace(Layer(self.luts, self.offset, self.headers, self.codes)).expected(cfg)

    def writes(self):
        return [w if w[0] != "offset" else (w[0], w[1], int(self.declared)) for w in super().writes()]


@pytest.mark.parametrize("bad", ["order", "past_layer", "no_layer", "not_finite"])
def test_bad_sparse_input_sets_its_error_bit(bad):
    cfg = CONFIGS["sop4-x8-r1"]
    rng = np.random.default_rng(11)
    a = with_sparse(cfg, random_layer(cfg, rng, 4), rng, "random", 0.1)
    b = random_layer(cfg, rng, 4)
    idx, vals = a.sparse_index.copy(), a.sparse_values.copy()
    if bad == "order":
        idx[[0, 1]] = idx[[1, 0]]
    elif bad == "past_layer":
        idx[-1] = a.codes.size + 5
    elif bad == "not_finite":
        vals[0] = 0x7FC0
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(Layer)}
    layers = [BadLayer(**{**fields, "sparse_index": idx, "sparse_values": vals}), b]
    if bad == "no_layer":          # the second layer declares no entries and the host sends one
        layers = [a, BadLayer(**{**{f.name: getattr(b, f.name) for f in dataclasses.fields(Layer)},
                                 "sparse_index": np.array([2]), "sparse_values": np.array([0x3F80]),
                                 "declared": False})]
    errors = {}
    run_decoder(cfg, layers, seed=12, errors=errors, max_cycles=5000)
    assert errors[bad] == 1, errors
    # a good stream of the same layers sets none (test_sparse_layers_with_stalls_and_table_swaps)


def test_configurations_without_residuals_are_unchanged():
    """The residual path is a parameter: without it no port, no register and no latency more."""
    for name, cfg in named_configs().items():
        dut = Decoder(cfg)
        Fragment.get(dut, None)
        assert not hasattr(dut, "merge") and "sparse" not in dut.signature.members, name
    for name, cfg in residual_configs().items():
        with_r, without = Decoder(cfg), Decoder(dataclasses.replace(cfg, residuals=0))
        for d in (with_r, without):
            Fragment.get(d, None)
        assert cfg.residuals == 1 and with_r.latency == without.latency + with_r.residual.latency, name
        assert {"sparse", "layer_sparse", "sparse_error"} <= set(with_r.signature.members), name


@pytest.mark.parametrize("part", ["never hold", "neighbour lane", "ties away"])
def test_the_check_catches_broken_residual_parts(part):
    cfg = CONFIGS["sop4-x8-r1"]
    kw = {"never hold": {"merge": mut.NeverHold}, "neighbour lane": {"path": mut.NeighbourLane},
          "ties away": {"path": mut.path_with(mut.AdderTiesAway)}}[part]
    layers = sparse_layers(cfg, 13, patterns=("burst", "values", "random"))
    try:
        got = run_decoder(cfg, layers, seed=14, dut=Decoder(cfg, **kw), max_cycles=20000)
    except AssertionError:
        return                     # it lost or added beats: caught
    assert got != expected(cfg, layers)
