"""sim.sparse_stalls: the stall count of the residual rule, and the same count from the decoder itself.

The bench counts stage 0's cycles with hdl.sparse_merge.MergeModel; here the real decoder runs the
same layers in amaranth.sim at full speed and its output beats' cycles must show exactly that
many extra cycles: on hand-made layers (none, one and two entries per beat, bursts) and on
MiniLM rows with the residuals the quantizer keeps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hdl_harness import run_decoder

from sop.golden.layout import named_layouts
from sop.hdl.config import DecoderConfig
from sop.sim.sparse_stalls import issue_cycles
from sop.sim.stimulus import random_layer

LAY = named_layouts()
CFG = DecoderConfig("t", 8, LAY["sop4-g16"], residuals=1)
START = 3                   # a sparse layer's first beat waits for its first two entries


def with_entries(layer, idx):
    idx = np.asarray(idx, dtype=np.int64)
    return dataclasses.replace(layer, sparse_index=idx, sparse_values=np.full(len(idx), 0x3F80))


def rtl_extra_cycles(cfg, layers) -> int:
    """Cycles the decoder's output takes beyond one beat a cycle, after the first layer's first beat."""
    cycles = []
    want = [b for layer in layers for b in layer.expected(cfg)]
    assert run_decoder(cfg, layers, seed=1, p_idle=0.0, p_stall=0.0, beat_cycles=cycles) == want
    return (cycles[-1] - cycles[0] + 1) - len(cycles)


@pytest.mark.parametrize("case", ["none", "one per beat", "two per beat", "bursts"])
def test_stall_count_is_the_decoders(case):
    rng = np.random.default_rng(3)
    lead, layer = random_layer(CFG, rng, 40), random_layer(CFG, rng, 60)
    n = layer.codes.size
    idx = {"none": [], "one per beat": np.arange(2, n, 8),
           "two per beat": np.sort(np.r_[np.arange(1, n, 16), np.arange(6, n, 16)]),
           "bursts": np.flatnonzero(rng.random(n) < 0.1)}[case]
    layers = [lead, with_entries(layer, idx)]
    model = issue_cycles(CFG, [(lay.codes.size, lay.sparse_index) for lay in layers])
    assert model["stalls"] == rtl_extra_cycles(CFG, layers)
    want = {"none": 0, "one per beat": START, "two per beat": START + n // 16}.get(case)
    if want is not None:
        assert model["stalls"] == want


def test_stall_count_on_minilm_rows_with_budget_residuals():
    from sop.quantize.sop_search import quantize_sop4
    from sop.quantize.sparse import add_sparse
    from sop.quantize.weights import minilm_linear_weights
    from sop.sim.stimulus import from_stream

    w = minilm_linear_weights()["encoder.layer.0.attention.self.value.weight"][:32]
    base = quantize_sop4(w, None)
    stream, _ = add_sparse(base.stream, w, base.recon, int(0.02 * w.size))
    layers = [random_layer(CFG, np.random.default_rng(4), 40), from_stream(CFG, stream, "value")]
    model = issue_cycles(CFG, [(lay.codes.size, lay.sparse_index) for lay in layers])
    assert model["stalls"] > START and model["stalls"] == rtl_extra_cycles(CFG, layers)


def test_the_measurements_figures(monkeypatch):
    """What `python -m sop.sim.sparse_stalls` writes for a point: two sparse layers of 1 x 64 at 8 lanes
    (8 output beats each) and a dense one. By the rule above, a sparse layer's first beat waits START
    cycles, and a beat of E > R entries waits E - R more: x = [0, 1, 2 | 40] stalls 3 + 2 = 5, y = [5]
    stalls 3. So 16 beats, 8 stalls, a rate of 8 / 16 = 0.5, the worst layer x at 5 / 8; densities 4 and
    1 of 64 values (6.25 % and 1.5625 %, shown to two decimals), at most 3 entries in a beat (x's first),
    three layers in all."""
    from types import SimpleNamespace

    from sop.golden.layout import Sparse
    from sop.sim import sparse_stalls

    def layer(index):
        return SimpleNamespace(layout=CFG.layout, rows=1, cols=64,
                               sparse=Sparse(np.array(index, np.uint32), np.full(len(index), 0x3F80, np.uint16)))

    streams = {"x": layer([0, 1, 2, 40]), "d": layer([]), "y": layer([5])}
    monkeypatch.setattr(sparse_stalls, "budget_streams", lambda budget: streams)
    model = issue_cycles(CFG, [(64, np.array([0, 1, 2, 40])), (64, np.array([5]))])
    assert model["stalls_per_layer"] == [START + 2, START]                  # the rule, before the figures
    doc = sparse_stalls.measure([5.0], [8], [1])
    (row,) = doc["rows"]
    assert doc["all_layers"] == 3
    assert {k: row[k] for k in ("point", "lanes", "residuals", "layers", "entries", "chunks", "stalls",
                                "max_entries_in_a_beat", "densities")} == {
        "point": "sop4-g16", "lanes": 8, "residuals": 1, "layers": 2, "entries": 5, "chunks": 16, "stalls": 8,
        "max_entries_in_a_beat": 3, "densities": [1.56, 6.25]}
    assert (row["density_min"], row["density_max"]) == (1 / 64, 4 / 64)
    assert row["stall_rate"] == 0.5 and row["worst_layer"] == 5 / 8


def test_one_residual_adder_is_a_valid_choice(monkeypatch, tmp_path):
    from sop.sim import sparse_stalls

    seen = []
    monkeypatch.setattr(sparse_stalls, "measure", lambda b, n, r: seen.append((n, r)) or {"rows": [], "all_layers": 0})
    assert sparse_stalls.main(["--residuals", "1", "--budget", "5", "--out", str(tmp_path / "s.json")]) == 0
    assert seen == [([8], [1])]
