"""The figures bench/lane_sweep.py and bench/fmax_seeds.py write into docs/synthesis.md and
docs/fmax64.md, computed from hand-made tool results (no yosys or nextpnr): the slope over N >= 4, the
floor's cost model, the per-lane and marginal figures, the median over seeds, the seeds placed. Each
expected value is worked out by hand in the test (an outside mutation run found every one of these
computations unchecked: a mean for the median, the fit's intercept for its slope, a seed dropped)."""

import importlib
import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(monkeypatch, name):
    """A bench script as a module (bench/ is not a package: on the path for the test only)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module(name)


@pytest.fixture
def lane_sweep(monkeypatch):
    return bench_module(monkeypatch, "lane_sweep")


@pytest.fixture
def fmax_seeds(monkeypatch):
    return bench_module(monkeypatch, "fmax_seeds")


def test_the_slope_is_the_least_squares_fit_over_four_lanes_and_more(lane_sweep):
    import numpy as np

    # (4, 1000), (8, 1800), (16, 3500): mean x 28/3, Sxy = 15600, Sxx = 224/3; N = 1, 2 left out
    got = lane_sweep.slope(np.array([1, 2, 4, 8, 16.0]), np.array([500, 510, 1000, 1800, 3500.0]))
    assert got == pytest.approx(15600 / (224 / 3))
    assert lane_sweep.slope(np.array([1, 2, 4.0]), np.array([1, 2, 3.0])) is None      # one N >= 4: no slope
    assert lane_sweep.slope(np.array([4, 4.0]), np.array([1, 2.0])) is None


def test_the_floors_cost_model_on_ecp5(lane_sweep):
    """At 16 lanes the enable has two register levels (hdl.replica), so the skid is a 3:1 mux: ceil(3/2) =
    2 LUT4 a bit on ECP5 (PFUMX free), 32 for the 16-bit word; the sop4 table is 2 banks x 2 pages x 1
    row of 16 LUT RAM words, a 4:1 row select at 2 LUT4 a stored bit (the E3M6 HIF's pre-normalized word
    is 11 bits, hdl/lut_word.py: 22). iCE40 has neither."""
    cfg = lane_sweep.sweep_config(16)
    ecp5 = {name: lut for name, lut, _ in lane_sweep.floor_terms(cfg, "ecp5")}
    assert ecp5["stall skid: the 3:1 output mux"] == 32
    assert ecp5["table row select: a rows:1 mux per stored bit"] == 22
    ice40 = {name: lut for name, lut, _ in lane_sweep.floor_terms(cfg, "ice40")}
    assert ice40["stall skid: the 3:1 output mux"] == 0 and ice40["table row select: a rows:1 mux per stored bit"] == 0


def _sweep_results(lane_sweep, lanes):
    """Tool records of a design of 100 N + 200 LUT4, 50 N FF and 3 N RAM a target."""
    out = {}
    for t in lane_sweep.SWEEP_TARGETS:
        for n in lanes:
            name = lane_sweep.sweep_config(n, pipeline=lane_sweep.PIPELINE[t]).name
            out.setdefault(name, {})[t] = {"luts": 100 * n + 200, "ffs": 50 * n, "lutram": 3 * n, "brams": 3 * n,
                                           "dsps": 0, "fmax_mhz": 100.0, "wall_s": 1}
    return out


def test_the_summary_per_lane_and_marginal_figures(lane_sweep):
    lanes = [1, 2, 4, 8, 16]
    s = lane_sweep.summarize(_sweep_results(lane_sweep, lanes), lanes)
    for t in lane_sweep.SWEEP_TARGETS:
        assert s[t]["slope_per_lane"] == {"luts": 100.0, "ffs": 50.0, "ram": 3.0}
        row4 = next(r for r in s[t]["rows"] if r["lanes"] == 4)
        assert (row4["luts_per_lane"], row4["ffs_per_lane"]) == (150.0, 50.0)
        # the floor's marginal cost: the slope of N x floor(N) over N = 4, 8, 16, by the closed form
        per_lane = {n: lane_sweep.floor(lane_sweep.sweep_config(n, pipeline=lane_sweep.PIPELINE[t]))[t]
                    for n in (4, 8, 16)}
        for key, design in (("luts", 100.0), ("ffs", 50.0), ("ram", 3.0)):
            ys = {n: n * per_lane[n][key] for n in per_lane}
            mx, my = 28 / 3, sum(ys.values()) / 3
            fl = sum((n - mx) * (ys[n] - my) for n in ys) / sum((n - mx) ** 2 for n in ys)
            assert s[t]["floor_slope_per_lane"][key] == pytest.approx(fl, abs=0.05)
            assert s[t]["slope_over_floor"][key] == pytest.approx(design / fl, abs=0.005)


def test_a_sweep_without_two_lane_counts_of_four_or_more_writes_no_nan(lane_sweep):
    """`--lanes 1 2` wrote NaN into lane_sweep.json (not JSON: strict readers refuse it) and "nan LUT4
    (nanx floor)" into the table; it is null and "-" now."""
    s = lane_sweep.summarize(_sweep_results(lane_sweep, [1, 2]), [1, 2])
    text = json.dumps(s, allow_nan=False)
    assert '"slope_per_lane": {"luts": null' in text
    assert "Marginal cost of a lane (slope over N >= 4): - LUT4 (-x floor)" in lane_sweep.markdown(s)


def test_fmax_seeds_places_each_seed_and_reports_the_median(fmax_seeds, monkeypatch, tmp_path, capsys):
    """Seeds 1 to 3 of each variant: min, median and max of each, and the ratio of the medians."""
    fake = {"lutram": [190.0, 230.0, 200.0], "one-memory": [150.0, 170.0, 160.0]}
    placed = []

    def fmax_for_seed(work, seed, placer="default"):
        placed.append((work.parent.name, seed, placer))
        return {"fmax_mhz": fake[work.parent.name.split("sop4-g16-")[1]][seed - 1]}

    monkeypatch.setattr(fmax_seeds, "run_design", lambda *a, **k: None)
    monkeypatch.setattr(fmax_seeds, "Decoder", lambda cfg: None)     # (one never elaborated warns when freed)
    monkeypatch.setattr(fmax_seeds, "fmax_for_seed", fmax_for_seed)
    monkeypatch.setattr(fmax_seeds.toolenv, "apply", lambda: None)
    monkeypatch.setattr(fmax_seeds, "OUT", tmp_path)
    fmax_seeds.main(["--config", "sop4-g16", "--seeds", "3", "--jobs", "1"])
    assert sorted(placed) == sorted((f"sop4-g16-{v}", s, "default") for v in fake for s in (1, 2, 3))
    text = (tmp_path / "fmax_seeds-sop4-g16-lutram-one-memory-default.md").read_text()
    assert re.search(r"\| sop4-g16 \| lutram \(lutram_depth \d+\) \| default \| 190\.0 / 230\.0 / 200\.0 \| "
                     r"190\.0 \| 200\.0 \| 230\.0 \|", text), text
    assert "| 150.0 / 170.0 / 160.0 | 150.0 | 160.0 | 170.0 |" in text
    assert "sop4-g16: median Fmax lutram / one-memory = 1.250" in text          # 200 / 160
    doc = json.loads((tmp_path / "fmax_seeds-sop4-g16-lutram-one-memory-default.json").read_text())
    assert doc["sop4-g16-lutram"]["median"] == 200.0 and doc["sop4-g16-lutram"]["fmax_mhz"] == fake["lutram"]


def test_fmax_for_seed_places_again_except_the_flows_own_run(fmax_seeds, monkeypatch, tmp_path):
    """Seed 1 with the flow's settings is the synthesis run's own placement; any other seed, or another
    placer, places the netlist again in its own folder with that seed and the placer's settings."""
    calls = []
    monkeypatch.setattr(fmax_seeds, "place_and_route", lambda run, target, freq, seed: calls.append(
        (run.name, seed, target.pnr[-len(fmax_seeds.PLACERS["timing40"]):])))
    monkeypatch.setattr(fmax_seeds, "read_pnr", lambda run: {"fmax_mhz": run.name})
    (tmp_path / "netlist.json").write_text("{}")
    assert fmax_seeds.fmax_for_seed(tmp_path, 1)["fmax_mhz"] == tmp_path.name and calls == []
    assert fmax_seeds.fmax_for_seed(tmp_path, 2)["fmax_mhz"] == "seed2"
    assert calls[-1][:2] == ("seed2", 2)
    assert fmax_seeds.fmax_for_seed(tmp_path, 1, "timing40")["fmax_mhz"] == "timing40-seed1"
    assert calls[-1] == ("timing40-seed1", 1, fmax_seeds.PLACERS["timing40"])
