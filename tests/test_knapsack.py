"""quantize.knapsack: the DP against brute force, the Lagrangian bound, and the budgeted quantizer."""

import itertools
import math

import numpy as np
import pytest

from sop.golden.decoder import decode_layer
from sop.quantize.knapsack import (DEFAULT_OPTIONS, budget_bits, lagrangian_bound, layer_options, parse_option,
                                   quantize_budget, solve_mckp)


def random_case(seed, layers=5, max_opts=4):
    rng = np.random.default_rng(seed)
    opts = []
    for _ in range(layers):
        n = int(rng.integers(1, max_opts + 1))
        bits = rng.integers(50, 400, n)
        err = rng.random(n) * 10
        opts.append([(int(b), float(e)) for b, e in zip(bits, err)])
    lo = sum(min(b for b, _ in o) for o in opts)
    hi = sum(max(b for b, _ in o) for o in opts)
    return opts, int(rng.integers(lo, hi + 1))


def brute_force(opts, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in opts]):
        bits = sum(opts[l][i][0] for l, i in enumerate(combo))
        err = sum(opts[l][i][1] for l, i in enumerate(combo))
        if bits <= budget and (best is None or err < best[0]):
            best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_dp_is_the_brute_force_optimum(seed):
    opts, budget = random_case(seed)
    sol = solve_mckp(opts, budget)                 # all extra bits fit the resolution: unit 1, exact
    err, _ = brute_force(opts, budget)
    assert sol.unit == 1
    assert sol.bits <= budget
    assert sol.error == pytest.approx(err, abs=1e-12)
    assert sol.lower_bound <= err + 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_coarse_discretization_stays_feasible_and_bounded(seed):
    opts, budget = random_case(100 + seed, layers=6)
    sol = solve_mckp(opts, budget, resolution=7)   # units of many bits, costs rounded up
    err, _ = brute_force(opts, budget)
    least = sum(min(o, key=lambda x: x[1])[0] for o in opts)
    # a budget that buys every layer's least-error option gets it without the DP: the optimum, exactly
    assert (sol.unit > 1) if least > budget else (sol.unit == 1 and sol.error == err)
    assert sol.bits <= budget
    assert sol.error >= err - 1e-12                # it can lose, but never beats the true optimum
    assert sol.lower_bound <= err + 1e-9 and sol.gap >= -1e-9


@pytest.mark.parametrize("seed", range(10))
def test_more_budget_never_gives_more_error(seed):
    """Every budget from the cheapest choice to the dearest, in coarse units: the error never rises.
    The unit grew with the budget, and a choice that fitted in finer units could be lost one bit
    later (an outside probe: 18 of MiniLM's 383 unit steps, up to 0.19 % more error for the bit)."""
    opts, _ = random_case(200 + seed, layers=6)
    lo = sum(min(b for b, _ in o) for o in opts)
    hi = sum(max(b for b, _ in o) for o in opts)
    errors = [solve_mckp(opts, b, resolution=7).error for b in range(lo, hi + 1)]
    assert all(b <= a for a, b in zip(errors, errors[1:]))
    assert solve_mckp(opts, lo, resolution=7).unit > 1                    # coarse units, rounded costs


def test_lagrangian_bound_by_hand():
    # one layer, options (0 bits, err 10) and (10 bits, err 0), budget 5: the LP mixes
    # half of each (error 5); the integer optimum is 10
    assert lagrangian_bound([[(0, 10.0), (10, 0.0)]], 5) == pytest.approx(5.0)
    sol = solve_mckp([[(0, 10.0), (10, 0.0)]], 5)
    assert sol.error == 10.0 and sol.gap == pytest.approx(5.0)


def test_infeasible_budget_is_refused():
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_mckp([[(100, 1.0)], [(50, 2.0), (80, 1.0)]], 149)


def test_option_names():
    assert parse_option("sop4-g16+sp0.5%") == ("sop4-g16", 0.005)
    assert parse_option("e2m3-ue4m4-g16") == ("e2m3-ue4m4-g16", 0.0)
    with pytest.raises(ValueError, match="unknown budget option"):
        parse_option("nf4+sp1%")


def test_quantize_budget_promotes_within_the_budget():
    rng = np.random.default_rng(7)
    layers = {f"l{i}": (rng.standard_t(5, (32, 128)) * s, None) for i, s in enumerate((0.02, 0.2, 0.05))}
    layers["l3"] = (rng.standard_normal((32, 128)) * 0.1, rng.random(128) * 4)      # activation-weighted
    n = sum(w.size for w, _ in layers.values())
    opts = ("sop4-g16", "sop4-g16+sp1%", "e2m3-ue4m4-g16", "fp8-e4m3-pot")
    prep = layer_options(layers, opts)                   # every option quantized once
    low = quantize_budget(layers, 4.6, options=opts)
    high = quantize_budget(layers, 9.0, prepared=prep)
    mid = quantize_budget(layers, 5.6, prepared=prep)
    assert quantize_budget(layers, 4.6, prepared=prep).choice == low.choice
    for res, budget in ((low, 4.6), (mid, 5.6), (high, 9.0)):
        assert res.solution.bits <= budget * n
        assert sum(r.bits for r in res.results.values()) == res.solution.bits
        for name, r in res.results.items():
            if r.stream is not None:
                assert np.array_equal(decode_layer(r.stream), r.recon)
    # with room for everything each layer takes its least-error option
    for row in high.table:
        assert row["error"] == min(o["error"] for o in row["options"].values())
    # more budget, less error; the loudest layer (largest weights) is promoted first
    assert high.solution.error < mid.solution.error < low.solution.error
    assert mid.choice["l1"] != "sop4-g16"
    assert "l1" in mid.report and "promoted" in mid.report
    errs = {row["layer"]: row["error"] for row in mid.table}
    w3, a3 = layers["l3"]
    assert errs["l3"] == pytest.approx(((w3 - mid.results["l3"].recon) ** 2 * a3).sum())
    # any finite budget works: past every layer's dearest option it buys what 9 bpw buys (1e308 bpw
    # times the weights overflowed to inf and then an integer)
    for huge in (1e308, 1e30):
        assert quantize_budget(layers, huge, prepared=prep).choice == high.choice


def test_a_budget_past_every_option_is_capped_and_one_below_every_option_is_refused():
    """Any budget above 0: past the dearest options it is capped there (and the report says so),
    below the cheapest it is refused naming --budget; 0, a negative and NaN never buy anything."""
    rng = np.random.default_rng(11)
    layers = {f"l{i}": (rng.standard_normal((16, 64)) * s, None) for i, s in enumerate((0.02, 0.3))}
    n = sum(w.size for w, _ in layers.values())
    prep = layer_options(layers, ("sop4-g16", "e2m3-ue4m4-g16"))
    cheapest = sum(min(b for b, _ in row) for row in prep.costs)
    dearest = sum(max(b for b, _ in row) for row in prep.costs)
    for huge in (1e308, 1.7976931348623157e308, dearest / n + 1):
        res = quantize_budget(layers, huge, prepared=prep)
        assert res.solution.budget_bits == dearest and res.solution.bits == dearest
        assert f"= {dearest:,} bits (capped at every layer's dearest option) over" in res.report
    exact = quantize_budget(layers, dearest / n, prepared=prep)
    assert exact.solution.budget_bits == dearest and "capped" not in exact.report
    with pytest.raises(ValueError, match=rf"^budget is too small: it buys {(cheapest - 1):,} bits, below the "
                                         rf"cheapest choice, {cheapest:,} bits \(every layer in its cheapest") as e:
        quantize_budget(layers, (cheapest - 0.5) / n, prepared=prep)        # (Python: budget=, not --budget)
    advised = float(str(e.value).split("give budget=")[1].split()[0])       # the budget it advises runs
    assert quantize_budget(layers, advised, prepared=prep).solution.bits >= cheapest
    assert budget_bits([[(10, 5.0), (20, 1.0)]], 1.0, 10) == 10               # exactly the cheapest: bought
    for bad in (0.0, -4.5, math.nan):
        with pytest.raises(ValueError, match=r"^budget must be a number above 0, got"):
            quantize_budget(layers, bad, prepared=prep)


def test_the_cheapest_option_is_known_from_the_shape_and_a_budget_under_it_refused_before_any_work(tmp_path, capsys):
    """A budget below every layer's cheapest option was refused only after every layer's options were built
    (12 s of MiniLM, hours of a large model's): ``least_bits`` gives each layer's cheapest option from its
    shape, exactly the bits the options measure (FP8 the cheapest on the smallest layers), and
    ``quantize_model``, ``evaluate`` and ``quantize_module`` refuse before reading a layer, in the words
    and with the least budget the knapsack gives."""
    import torch
    from safetensors.numpy import save_file

    from sop.quantize import schemes
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate
    from sop.quantize.in_memory import quantize_module

    # the commands: no layer read, no option built (a NaN weight, read first, would be the error otherwise)
    rng = np.random.default_rng(5)
    w = {"a.weight": rng.standard_normal((16, 64)).astype(np.float32), "b.weight": np.full((16, 32), np.nan, "f4")}
    save_file(w, str(tmp_path / "m.safetensors"))
    said = r"^budget is too small: it buys 3,072 bits, below the cheapest choice, 7,568 bits \(every layer in its " \
           r"cheapest option\): give budget=4\.9271 or more$"
    with pytest.raises(ValueError, match=said):
        quantize_model(str(tmp_path / "m.safetensors"), "sop-budget", tmp_path / "m.sopq", budget=2.0)
    with pytest.raises(ValueError, match=said):
        evaluate(str(tmp_path / "m.safetensors"), ["nf4-g64", "sop-budget"], budget=2.0)
    assert "options" not in capsys.readouterr().err and not (tmp_path / "m.sopq").exists()
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(16, 32))
    with pytest.raises(ValueError, match=r"^budget is too small: .* give budget=4\.\d{4} or more$"):
        quantize_module(model, "sop-budget", [torch.zeros(2, 3)], budget=2.0)     # before the batch (cannot run)

    # each layer's cheapest option from its shape: exactly what the options measure
    from sop.quantize.knapsack import check_budget_shapes, least_bits

    shapes = [(1, 1), (1, 16), (2, 5), (5, 91), (1, 100), (16, 17), (7, 33), (40, 24), (3, 160)]
    layers = {f"l{i}": (rng.standard_normal(s), None) for i, s in enumerate(shapes)}
    for opts in (DEFAULT_OPTIONS, ("sop4-g16", "fp8-e4m3-pot"), ("e2m3-ue4m4-g16",)):
        rows = [schemes.budget_row(n, w, a, options=opts)[0] for n, (w, a) in layers.items()]   # padded as it pads
        assert [least_bits(r, c, opts) for r, c in shapes] == [min(b for b, _ in row.costs) for row in rows]
    assert least_bits(1, 1) == 16 and least_bits(40, 24) == 40 * 2 * 72 + 328    # FP8; SOP4 + 2 LUTs + offset
    cheapest, n = sum(least_bits(r, c) for r, c in shapes), sum(r * c for r, c in shapes)
    with pytest.raises(ValueError, match=rf"^--budget is too small: .* cheapest choice, {cheapest:,} bits"):
        check_budget_shapes(shapes, (cheapest - 1) / n, "--budget")
    check_budget_shapes(shapes, cheapest / n)                                   # exactly the cheapest: runs


@pytest.mark.parametrize("chunk", [5, 64, 1 << 18])
@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_error_is_the_whole_layer_expression_with_the_entries_added(monkeypatch, chunk, weighted):
    """Row chunk by row chunk, entries included without building the corrected layer: the
    same bits as the whole-layer numpy expression on ``apply_sparse``'s result."""
    from sop.quantize import knapsack
    from sop.quantize.sparse import apply_sparse, sparse_residuals

    monkeypatch.setattr(knapsack, "CHUNK_WEIGHTS", chunk)
    rng = np.random.default_rng(chunk)
    w = (rng.standard_normal((23, 48)) * 0.1).astype(np.float32)
    recon = np.round(w.astype(np.float64) * 8) / 8
    recon[0, :3] = -0.0                                   # -0 in the reconstruction: + 0.0 in apply_sparse
    act = rng.random(48) * 3 if weighted else None
    sp = sparse_residuals(w, recon, 40, act)
    q = apply_sparse(recon, sp)
    d = (w.astype(np.float64) - q) ** 2
    want = (d * act).sum(axis=1).sum() if weighted else d.sum()
    assert knapsack.weighted_error(w, recon, act, sparse=sp) == want
    d0 = (w.astype(np.float64) - recon) ** 2
    assert knapsack.weighted_error(w, recon, act) == ((d0 * act).sum(axis=1).sum() if weighted else d0.sum())


def test_the_budgeted_quantizer_reads_each_layer_once_and_builds_results_one_at_a_time():
    """LazyLayers: every layer loaded once to measure its options (an FP8 choice once more);
    the results are built when asked for and equal what the eager path gives."""
    from sop.quantize.knapsack import LazyLayers

    rng = np.random.default_rng(9)
    data = {f"l{i}": (rng.standard_t(5, (16, 64)) * s, None) for i, s in enumerate((0.02, 0.3))}
    loads = []

    def load(name):
        loads.append(name)
        return data[name]

    opts = ("sop4-g16", "sop4-g16+sp1%", "e2m3-ue4m4-g16")
    lazy = quantize_budget(LazyLayers(list(data), load), 6.0, options=opts)
    assert loads == ["l0", "l1"]                          # SOP results rebuilt from the kept streams
    eager = quantize_budget(data, 6.0, options=opts)
    assert lazy.choice == eager.choice and lazy.solution.bits == eager.solution.bits
    for name in data:
        a, b = lazy.results.pop(name), eager.results[name]
        assert np.array_equal(a.recon, b.recon) and a.stream.sparse.index.tolist() == b.stream.sparse.index.tolist()
    assert len(lazy.results) == 0 and loads == ["l0", "l1"]


@pytest.mark.parametrize("jobs", [False, True], ids=["here", "as a worker measures it"])
def test_the_fp8_option_of_a_padded_layer_costs_what_it_stores(jobs):
    """sop-budget pads a layer to the 16-wide SOP block; the SOP options store that padding (a stream
    is whole blocks), FP8 stores none: 8 bits a real weight and its scale byte, as fp8-e4m3-pot costs
    the layer alone (the padding was charged, 32 bits on a 4 x 15 layer, and the least budget named
    was far above an FP8 that fits). The values are FP8's own, the padding cropped."""
    from sop.quantize import schemes
    from sop.quantize.baselines import fp8_e4m3_pot

    rng = np.random.default_rng(3)
    layers = {"a": (rng.standard_normal((4, 15)), None), "b": (rng.standard_normal((8, 33)), None)}
    opts = ("fp8-e4m3-pot", "sop4-g16")
    rows = [schemes.budget_row(n, w, a, options=opts) for n, (w, a) in layers.items()] if jobs else None
    res = schemes.quantize_sop_budget(layers, 1e9, rows=rows, options=opts)     # every layer's dearest: FP8
    for name, (w, _) in layers.items():
        r, c = w.shape
        assert res.choice[name] == "fp8-e4m3-pot"
        got = res.results[name]
        assert got.bits == 8 * r * c + 8 == fp8_e4m3_pot(w).bits
        np.testing.assert_array_equal(got.recon, fp8_e4m3_pot(w).recon)
    assert res.solution.bits == sum(8 * w.size + 8 for w, _ in layers.values())


@pytest.mark.parametrize("jobs", [False, True], ids=["here", "as a worker measures it"])
def test_a_sparse_density_counts_the_real_weights_not_the_padding(jobs):
    """``+sp0.5%`` of a 16 x 40 layer keeps round(0.005 * 640) = 3 entries: the layer is padded to 48
    columns (three 16-wide blocks), and 0.5 % of the padded 768 would be 4 (which the option did)."""
    from sop.quantize import schemes

    rng = np.random.default_rng(5)
    layers = {"a": (rng.standard_normal((16, 40)), None), "b": (rng.standard_normal((8, 96)), None)}
    opts = ("sop4-g16", "sop4-g16+sp0.5%")
    rows = [schemes.budget_row(n, w, a, options=opts) for n, (w, a) in layers.items()] if jobs else None
    res = schemes.quantize_sop_budget(layers, 1e9, rows=rows, options=opts)     # the dearer option
    for name, (w, _) in layers.items():
        assert res.choice[name] == "sop4-g16+sp0.5%"
        assert len(res.results[name].stream.sparse) == round(0.005 * w.size), name   # 3 and 4 (3.84)


@pytest.mark.parametrize("jobs", [False, True], ids=["here", "as a worker measures it"])
def test_the_table_bits_per_weight_count_the_real_weights(jobs):
    """The per-layer table's bpw is the layer's bits over its real weights, as its QuantResult and the
    budget count them: an 8 x 20 layer stored padded to 32 columns (it was bits / 256)."""
    from sop.quantize import schemes

    rng = np.random.default_rng(6)
    layers = {"a": (rng.standard_normal((8, 20)), None)}
    opts = ("sop4-g16", "e2m3-ue4m4-g16")
    rows = [schemes.budget_row(n, w, a, options=opts) for n, (w, a) in layers.items()] if jobs else None
    res = schemes.quantize_sop_budget(layers, 100.0, rows=rows, options=opts)
    (row,) = res.table
    assert row["option"] == "e2m3-ue4m4-g16" and row["bpw"] == row["bits"] / 160 == res.results["a"].bits / 160


def test_a_layer_whose_error_is_below_the_totals_last_bit_still_takes_its_better_option():
    """An earlier layer's error 1e18 times larger absorbed the later layer's in the float total, and
    the tie went to the earlier (cheaper, worse) option, even with bits to spare (an outside probe:
    a MiniLM layer scaled by 1e10 placed first left the next two on sop4-g16)."""
    opts = [[(100, 1e12), (200, 5e11)], [(100, 1e-6), (110, 1e-7)]]
    assert solve_mckp(opts, 210).choice == [0, 1]            # only layer 1's promotion fits
    sol = solve_mckp(opts, 10 ** 6)                          # every least-error option fits
    assert sol.choice == [1, 1] and sol.unit == 1 and sol.bits == 310


def test_the_bound_is_never_above_the_solution():
    """Errors 1e300 apart: the bound's float sums came out at 3e284 for an optimum of 3.0 (gap -3e284)."""
    sol = solve_mckp([[(5, 2.0)], [(0, 1e300), (2, 1.0)]], 7)
    assert sol.error == 3.0 and sol.lower_bound <= 3.0 and sol.gap >= 0


def test_the_report_gives_the_budget_as_typed_and_every_layer_off_the_base():
    """5.38088 and 5.38098 both printed as 5.381; a layer in a cheaper option than the base (FP8 on a
    layer too small for the LUT tables' cost) was left out ('promoted above sop4-g16: (none)')."""
    from types import SimpleNamespace

    from sop.quantize.knapsack import Solution, budget_report

    opts = {"sop4-g16": {}, "fp8-e4m3-pot": {}, "e2m3-ue4m4-g16": {}}
    table = [{"layer": "a", "option": "sop4-g16", "extra_bits": 0, "error_reduction": 0.0, "reduction_per_bit": 0.0,
              "options": opts},
             {"layer": "b", "option": "fp8-e4m3-pot", "extra_bits": -152, "error_reduction": 0.5,
              "reduction_per_bit": 0.0, "options": opts},
             {"layer": "c", "option": "e2m3-ue4m4-g16", "extra_bits": 100, "error_reduction": 1.0,
              "reduction_per_bit": 0.01, "options": opts},
             {"layer": "d", "option": "e2m3-ue4m4-g16", "extra_bits": 100, "error_reduction": 2.0,
              "reduction_per_bit": 0.02, "options": opts}]
    text = budget_report(SimpleNamespace(solution=Solution([0, 1, 2], 900, 3.0, 2.5, 1, 1076), table=table),
                         5.38088, 200)
    lines = text.splitlines()
    assert lines[0].startswith("budget 5.38088 bpw = 1,076 bits")
    assert [ln.split()[0] for ln in lines[3:]] == ["d", "c", "b"]          # the most reduction per bit first
    assert lines[4].endswith("+100 bits  error -1 (0.01/bit)") and lines[5].endswith("-152 bits  error -0.5")


@pytest.mark.parametrize(("act", "where"), [(1e308, "layer a's weighted error overflows"),
                                           (1e305, "the weighted errors overflow")])
def test_weighted_errors_past_float64_are_refused_not_chosen_by(act, where):
    """act_ms of 1e308 from Python: a layer's errors came out Inf (its own search holds them at a power of
    two, the knapsack at their true scale) and sop-budget chose by them, its report saying 'total weighted
    error inf (gap nan); at 1e305 the errors were finite but the Lagrangian bound's products overflowed.
    At 1e285 it quantizes."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    layers = {n: (w * k, np.full(64, act)) for n, k in (("a", 1.0), ("b", 0.9), ("c", 0.8))}
    with pytest.raises(ValueError, match=f"^sop-budget: {where} float64 in the knapsack's sums .* divide every "
                                         f"layer's act_ms by one factor$"):
        quantize_budget(layers, 5.0)
    res = quantize_budget({n: (x, a / 1e20) for n, (x, a) in layers.items()}, 5.0)
    assert math.isfinite(res.solution.error) and "inf" not in res.report and "nan" not in res.report
