"""The arithmetic of the bench scripts that write the figures in docs/: bytes per weight, GMAC/s and
the naive / SOP ratios, the peers' speed ratios, bits per weight and SQNR, the --jobs speed-up, the HIF
loss and its cost model, the alpha sweep, the fallback rates. Each script runs on hand-made inputs with
its expensive calls (synthesis, quantization, simulation, child processes) replaced, and each expected
value is worked out by hand in the test (an outside mutation run found all of these unchecked: a
ratio inverted, a baseline not subtracted, a min for a max, a divisor from the wrong layer)."""

import builtins
import importlib
import io
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_bench_figures import bench_module


def _clock(*values):
    """A time.perf_counter (or process_time) that returns ``values`` in turn."""
    it = iter(values)
    return lambda: next(it)


# -- bench/memory.py -------------------------------------------------------------------------------

def test_memory_child_reports_peak_minus_baseline_per_weight(monkeypatch, capsys):
    """The child script's figure: (VmHWM after the command - VmRSS before it) in kB x 1024 bytes,
    divided by the weights; /proc/self/status is faked (900 kB VmHWM before the peak reset, 100 kB
    VmRSS; 700 kB VmHWM and 300 kB VmRSS after the command)."""
    mem = bench_module(monkeypatch, "memory")
    import sop.quantize.artifact as artifact
    import sop.quantize.memory as qmem

    monkeypatch.setattr(qmem, "release_freed_memory", lambda: True)
    ran = []
    monkeypatch.setattr(artifact, "quantize_model", lambda *a, **k: ran.append(a))
    state = {"reset": False}

    def fake_open(path, mode="r", *a, **k):
        if path == "/proc/self/clear_refs":
            assert "w" in mode
            state["reset"] = True
            return io.StringIO()
        assert path == "/proc/self/status"
        if state["reset"]:
            return io.StringIO("Name:\tpython\nVmHWM:\t     700 kB\nVmRSS:\t     300 kB\n")
        return io.StringIO("Name:\tpython\nVmHWM:\t     900 kB\nVmRSS:\t     100 kB\n")

    monkeypatch.setattr(sys, "argv", ["-c", "quantize", "m.safetensors", "nf4-g64", "o.sopq", "o.st", "-", "1024"])
    env = {"__name__": "__child__", "__builtins__": {**builtins.__dict__, "open": fake_open}}
    exec(mem.CHILD, env)
    assert len(ran) == 1
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["base"] == 100 * 1024                     # VmRSS before the command: 102400 bytes
    assert got["peak"] == 700 * 1024                     # VmHWM after it: 716800 bytes
    assert got["bpw"] == pytest.approx((700 - 100) * 1024 / 1024)     # 614400 / 1024 = 600.0


@pytest.mark.parametrize("cmd", ["module", "module-sopq"])
def test_memory_child_quantizes_the_layer_held_in_a_torch_model(monkeypatch, tmp_path, capsys, cmd):
    """The in-memory commands: the child loads the checkpoint's one layer into a torch model under its
    name on disk, before the baseline, and passes it to quantize_module (module-sopq: out= the .sopq)."""
    import torch

    mem = bench_module(monkeypatch, "memory")
    import sop.quantize.in_memory as in_memory

    mem.write_checkpoint(tmp_path / "m.safetensors", 8, "bf16")
    from safetensors.torch import load_file
    want = load_file(str(tmp_path / "m.safetensors"))[mem.LAYER]
    seen = []

    def quantize_module(model, fmt, budget=None, out=None):
        (name, p), = model.named_parameters()
        seen.append((name, p.dtype, torch.equal(p, want), fmt, budget, out))

    monkeypatch.setattr(in_memory, "quantize_module", quantize_module)
    monkeypatch.setattr(sys, "argv", ["-c", cmd, str(tmp_path / "m.safetensors"), "sop-budget", "o.sopq", "o.st",
                                      "5.0", "64"])
    exec(mem.CHILD, {"__name__": "__child__"})
    assert seen == [(mem.LAYER, torch.bfloat16, True, "sop-budget", 5.0, "o.sopq" if cmd == "module-sopq" else None)]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bpw"] >= 0


def test_memory_main_counts_size_squared_weights_and_meets_a_target_equalled(monkeypatch, tmp_path, capsys):
    """--size 32: 32 x 32 = 1024 weights passed to the child and written; a worst figure equal to the
    target (16 bytes/weight) meets it ("at most 16")."""
    mem = bench_module(monkeypatch, "memory")
    monkeypatch.setattr(mem, "write_checkpoint", lambda path, size, dtype: None)
    seen = []

    def run_child(cmd, model, fmt, work, budget, n):
        seen.append(n)
        return {"base": 0, "peak": 0, "bpw": mem.TARGET, "seconds": 1.0}

    monkeypatch.setattr(mem, "run_child", run_child)
    out = tmp_path / "m.json"
    assert mem.main(["--size", "32", "--format", "nf4-g64", "--command", "quantize",
                     "--workdir", str(tmp_path), "--json", str(out)]) == 0
    assert seen == [32 * 32]
    assert json.loads(out.read_text())["weights"] == 1024
    text = capsys.readouterr().out
    assert f"worst {mem.TARGET:.2f} bytes/weight: target <= {mem.TARGET:g} met" in text


def test_memory_with_a_relative_workdir_gives_its_children_paths_they_find(monkeypatch, tmp_path, capsys):
    """`bench/memory.py --workdir .`: each child runs in the temporary folder, and was given the checkpoint
    as `tmpXXXX/model.safetensors`, relative to the bench's folder (a RuntimeError traceback, "model ...
    not found": an outside probe). The paths a child gets name the files from its own folder."""
    mem = bench_module(monkeypatch, "memory")
    monkeypatch.chdir(tmp_path)
    seen = []

    def run(args, cwd, **kw):
        model, sopq = Path(cwd, args[4]), Path(cwd, args[6])
        seen.append((args[3], model.is_file(), sopq.parent == Path(cwd) and sopq.parent.is_dir()))
        return SimpleNamespace(returncode=0, stdout=json.dumps({"base": 0, "peak": 0, "bpw": 1.0, "seconds": 1.0}),
                               stderr="")

    monkeypatch.setattr(mem.subprocess, "run", run)
    assert mem.main(["--size", "4", "--format", "nf4-g64", "--command", "quantize", "--workdir", "."]) == 0
    assert seen == [("quantize", True, True)]
    assert list(tmp_path.iterdir()) == []                 # the temporary folder removed


# -- bench/dot_vs_naive.py -------------------------------------------------------------------------

def _dn_records(dn, monkeypatch):
    """Fake parts and tool records: the units are two parts at 180 and 120 MHz; the engines one part."""
    recs = {"u-a": {"luts": 100, "ffs": 50, "brams": 1, "dsps": 0, "fmax_mhz": 180.0},
            "u-b": {"luts": 30, "ffs": 20, "brams": 0, "dsps": 1, "fmax_mhz": 120.0},
            "engine": {"luts": 900, "ffs": 400, "brams": 2, "dsps": 0, "fmax_mhz": 150.0},
            "folded": {"luts": 300, "ffs": 100, "brams": 2, "dsps": 0, "fmax_mhz": 50.0}}
    monkeypatch.setattr(dn, "sop_units", lambda: ("units", [("u-a", None), ("u-b", None)]))
    monkeypatch.setattr(dn, "sop_engine", lambda target, folded=False:
                        ("engine", [("folded" if folded else "engine", None)]))
    monkeypatch.setattr(dn, "run_design", lambda dut, name, target, out, force=False:
                        {**recs[name], "note": "", "wall_s": 1, "critical_path": "p"})


def test_dot_vs_naive_takes_the_lower_fmax_and_computes_gmacs(monkeypatch, tmp_path):
    """Units synthesized apart: counts added (130 LUT4, 70 FF), the lower Fmax (120 MHz), GMAC/s =
    16 MACs x 120 MHz / 1000 = 1.92; the engine 16 x 150 / 1000 = 2.4; the folded engine does one MAC a
    cycle: 1 x 50 / 1000 = 0.05."""
    dn = bench_module(monkeypatch, "dot_vs_naive")
    _dn_records(dn, monkeypatch)
    units = dn.measure(dn.SOP_UNITS, "ecp5", tmp_path, dn.SEED, False)
    assert (units["luts"], units["ffs"], units["brams"], units["dsps"]) == (130, 70, 1, 1)
    assert units["fmax_mhz"] == 120.0 and units["macs_per_cycle"] == 16
    assert units["gmac_s"] == pytest.approx(1.92)
    engine = dn.measure(dn.SOP, "ecp5", tmp_path, dn.SEED, False)
    assert engine["macs_per_cycle"] == 16 and engine["gmac_s"] == pytest.approx(2.4)
    folded = dn.measure(dn.SOP_FOLDED, "ecp5", tmp_path, dn.SEED, False)
    assert folded["macs_per_cycle"] == 1 and folded["gmac_s"] == pytest.approx(0.05)


def test_dot_vs_naive_ratios_are_naive_over_sop(monkeypatch):
    """naive 3000 LUT4 / SOP 1000 = 3.0; FF 2000 / 500 = 4.0; Fmax 100 / 200 = 0.5; GMAC/s 1.6 / 3.2 = 0.5;
    a SOP figure of None gives None."""
    dn = bench_module(monkeypatch, "dot_vs_naive")
    results = {dn.SOP: {"ecp5": {"luts": 1000, "ffs": 500, "fmax_mhz": 200.0, "gmac_s": 3.2}},
               dn.SOP_UNITS: {"ecp5": {"luts": 1000, "ffs": 500, "fmax_mhz": None, "gmac_s": None}},
               "naive-tree": {"ecp5": {"luts": 3000, "ffs": 2000, "fmax_mhz": 100.0, "gmac_s": 1.6}}}
    r = dn.ratios(results)
    assert r["naive-tree"][dn.SOP]["ecp5"] == {"luts": 3.0, "ffs": 4.0, "fmax_mhz": 0.5, "gmac_s": 0.5}
    assert r["naive-tree"][dn.SOP_UNITS]["ecp5"] == {"luts": 3.0, "ffs": 4.0, "fmax_mhz": None, "gmac_s": None}
    assert "naive-lanes" not in r


def test_dot_vs_naive_reads_nextpnr_utilisation_as_used_then_available(monkeypatch, tmp_path):
    """nextpnr logs 'Info:  TRELLIS_COMB: 90000/ 83640 107%' before it gives up: used 90000, available
    83640, in that order; the last ERROR line is kept."""
    dn = bench_module(monkeypatch, "dot_vs_naive")

    def place_and_route(work, t, freq, seed=None):
        (work / "nextpnr.log").write_text(
            "Info: Device utilisation:\nInfo: \t    TRELLIS_COMB:  90000/ 83640   107%\n"
            "Info: \t          DP16KD:      3/   208     1%\nERROR: Unable to place cell 'x'\n")
        raise dn.ToolError("nextpnr failed")

    monkeypatch.setattr(dn, "place_and_route", place_and_route)
    got = dn.nextpnr_utilisation(tmp_path, "ecp5")
    assert got["utilisation"] == {"TRELLIS_COMB": [90000, 83640], "DP16KD": [3, 208]}
    assert got["error"] == "ERROR: Unable to place cell 'x'"


# -- bench/peer_speed.py ---------------------------------------------------------------------------

@pytest.fixture
def peer_speed(monkeypatch, tmp_path):
    """bench/peer_speed.py parses its command line and sets the thread variables on import: imported
    with --threads 2 and 3 repeats, its environment and torch's thread count restored after."""
    import torch

    importlib.import_module("sop.quantize.blockwise")        # reads SOP_THREADS before the script sets it

    threads = torch.get_num_threads()
    for var in ("SOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    monkeypatch.setattr(sys, "argv", ["peer_speed.py", "--threads", "2", "--repeats", "3", "--sop-repeats", "3",
                                      "--size", "2", "2", "--json", str(tmp_path / "peer.json")])
    sys.modules.pop("peer_speed", None)
    try:
        yield bench_module(monkeypatch, "peer_speed")
    finally:
        sys.modules.pop("peer_speed", None)
        torch.set_num_threads(threads)


def test_peer_speed_checks_the_releases_make_peers_installs(peer_speed):
    """The bench names a peer's release against its ``PINS``; `make peers` installs the peers: one
    release each in both (they were two lists kept by hand)."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\npeers:", 1)[1].split("\n\n", 1)[0]
    installed = dict(part.strip('"').split("==") for part in recipe.split() if "==" in part)
    assert installed == peer_speed.PINS


def test_peer_speed_best_of_keeps_each_functions_fastest_run(peer_speed, monkeypatch):
    """Three interleaved rounds of two functions taking (5, 7), (2, 9), (4, 8) s: the best are 2 and 7."""
    clock = _clock(0, 5, 10, 17, 20, 22, 30, 39, 40, 44, 50, 58)
    monkeypatch.setattr(peer_speed, "time", SimpleNamespace(perf_counter=clock))
    assert peer_speed.best_of([lambda: None, lambda: None], 3) == [2, 7]


def test_peer_speed_ratio_is_peer_time_over_ours(peer_speed, monkeypatch):
    """Ours 2 s, the peer 6 s on 4 weights: ours 4 / 2 / 1e6 = 2e-6 M w/s, the peer 4 / 6 / 1e6, and the
    ratio (ours / peer in speed) 6 / 2 = 3.0."""
    monkeypatch.setattr(peer_speed, "OURS", {"nf4-g64": lambda w: None})
    monkeypatch.setattr(peer_speed, "best_of", lambda fns, repeats: [2.0, 6.0])
    rows = peer_speed.run_matrix("m", np.zeros((2, 2), np.float32), {"nf4-g64": ("peer", lambda t: None, "codes")})
    assert len(rows) == 1
    assert rows[0]["ratio"] == pytest.approx(3.0)
    assert rows[0]["ours_mwps"] == pytest.approx(2e-6) and rows[0]["peer_mwps"] == pytest.approx(4 / 6 / 1e6)


def test_peer_speed_sop_search_figures_best_of_and_per_core(peer_speed, monkeypatch, capsys):
    """The sop4-g16 search on the 2 x 2 matrix, three runs of 4, 2 and 3 us wall (8, 4, 5 us CPU): the best
    is 2 us, 4 / 2e-6 / 1e6 = 2.0 M w/s, per core over --threads 2: 1.0; CPU best 4 us: 1.0 per CPU s."""
    monkeypatch.setattr(peer_speed, "peers", lambda: ({}, []))
    monkeypatch.setattr(peer_speed, "quantize_sop4", lambda w: None)
    wall = _clock(0, 4e-6, 1, 1 + 2e-6, 2, 2 + 3e-6)
    cpu = _clock(0, 8e-6, 1, 1 + 4e-6, 2, 2 + 5e-6)
    monkeypatch.setattr(peer_speed, "time", SimpleNamespace(perf_counter=wall, process_time=cpu))
    peer_speed.main()
    capsys.readouterr()
    sop = json.loads(Path(peer_speed.ARGS.json).read_text())["sop4-g16"]
    assert sop["seconds"] == pytest.approx(2e-6)
    assert sop["mwps"] == pytest.approx(2.0)
    assert sop["mwps_per_core"] == pytest.approx(1.0)
    assert sop["cpu_seconds"] == pytest.approx(4e-6) and sop["mwps_per_cpu_second"] == pytest.approx(1.0)


# -- bench/quantize_speed.py -----------------------------------------------------------------------

def _two_layers():
    """Layer a: [3, 4] (signal 25); layer b: [1, 2, 2] (signal 9); 5 weights."""
    return {"a": np.array([[3.0, 4.0]], np.float32), "b": np.array([[1.0, 2.0, 2.0]], np.float32)}


def test_quantize_speed_measure_bits_per_weight_and_sqnr(monkeypatch):
    """a quantized to [3, 3] in 9 bits (noise 1), b to [1, 2, 1] in 15 bits (noise 1): 24 bits / 5 weights
    = 4.8 bpw; per layer 10 log10(25 / 1) = 13.98 dB and 10 log10(9 / 1) = 9.54 dB; aggregate
    10 log10(34 / 2) = 12.30 dB."""
    qs = bench_module(monkeypatch, "quantize_speed")
    out = {2: ([[3.0, 3.0]], 9), 3: ([[1.0, 2.0, 1.0]], 15)}

    def fn(w):
        recon, bits = out[w.size]
        return SimpleNamespace(recon=np.array(recon), bits=bits, stream=None)

    r = qs.measure(_two_layers(), fn)
    assert r["bpw"] == pytest.approx(24 / 5)
    assert r["per_layer"]["a"] == pytest.approx(13.9794, abs=1e-4)
    assert r["per_layer"]["b"] == pytest.approx(9.5424, abs=1e-4)
    assert r["sqnr"] == pytest.approx(12.3045, abs=1e-4)


def test_quantize_speed_budget_time_includes_the_options_build(monkeypatch):
    """The options build takes 3 s wall (2 s CPU), the budget's solve 1 s (0.5 s CPU): the row's time is
    3 + 1 = 4 s, 2 + 0.5 = 2.5 s CPU; 5 weights / 4 s = 1.25 w/s, 5 / 2.5 = 2 per CPU second."""
    qs = bench_module(monkeypatch, "quantize_speed")
    weights = _two_layers()
    monkeypatch.setattr(qs, "layer_options", lambda layers: "prepared")
    recon = {"a": np.array([[3.0, 3.0]]), "b": np.array([[1.0, 2.0, 2.0]])}     # noise 1 + 0, signal 25 + 9

    def quantize_budget(layers, b, prepared):
        assert prepared == "prepared"
        return SimpleNamespace(results={k: SimpleNamespace(recon=recon[k], stream=None) for k in layers},
                               bpw=b, report="report")

    monkeypatch.setattr(qs, "quantize_budget", quantize_budget)
    monkeypatch.setattr(qs, "time", SimpleNamespace(perf_counter=_clock(0, 3, 10, 11),
                                                    process_time=_clock(0, 2, 10, 10.5)))
    rows, reports = qs.budget_rows(weights, [5.0])
    r = rows["sop-budget 5.0"]
    assert (r["wall"], r["cpu"]) == (4, 2.5)
    assert r["wps"] == pytest.approx(1.25) and r["cps"] == pytest.approx(2.0)
    assert r["sqnr"] == pytest.approx(15.3148, abs=1e-4)         # 10 log10(34 / 1): only a's 4 -> 3 is off
    assert reports == ["report"]


def test_quantize_speed_speed_is_relative_to_nf4(monkeypatch, capsys):
    """nf4-g64 at 2 M w/s, e2m3-ue4m4-g16 at 6 M w/s: 6 / 2 = 3.000 times nf4-g64 (and nf4 1.000)."""
    qs = bench_module(monkeypatch, "quantize_speed")
    monkeypatch.setattr(qs, "minilm_linear_weights", lambda: {"l": np.ones((1, 16))})
    wps = {"nf4-g64": 2e6, "e2m3-ue4m4-g16": 6e6, "fp8-e4m3-pot": 4e6}
    monkeypatch.setattr(qs, "FORMATS", {name: name for name in wps})
    monkeypatch.setattr(qs, "measure", lambda weights, name: {
        "sqnr": 20.0, "bpw": 4.5, "wall": 1.0, "cpu": 1.0, "wps": wps[name], "cps": wps[name],
        "per_layer": {"l": 1.0}, "prints": []})
    monkeypatch.setattr(sys, "argv", ["quantize_speed.py", "--device"])
    qs.main()
    speed = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 9 and cells[1] in wps:
            speed[cells[1]] = cells[8]
    assert speed == {"nf4-g64": "1.000", "e2m3-ue4m4-g16": "3.000", "fp8-e4m3-pot": "2.000"}


# -- bench/llm_scale.py ----------------------------------------------------------------------------

def test_llm_scale_dims_round_to_the_nearest_multiple_of_64(monkeypatch):
    """--scale 0.9: 4096 x 0.9 / 64 = 57.6 -> 58 x 64 = 3712; 14336 x 0.9 / 64 = 201.6 -> 202 x 64 = 12928;
    32000 x 0.9 / 64 = 450 -> 28800. A tiny scale keeps 64."""
    ls = bench_module(monkeypatch, "llm_scale")
    assert ls.dims(0.9) == (3712, 12928, 28800)
    assert ls.dims(0.001) == (64, 64, 64)


def test_llm_scale_bytes_per_weight_of_the_largest_layer(monkeypatch, tmp_path, capsys):
    """H = 64, I = 192, 2 blocks: the largest layer I x H = 12288 weights; linear weights
    2 x (4 x 64 x 64 + 3 x 64 x 192) = 2 x (16384 + 36864) = 106496. The model's peak is the tiny
    checkpoint's 1,000,000 bytes plus 10 x 12288: (1122880 - 1000000) / 12288 = 10.0 bytes/weight."""
    ls = bench_module(monkeypatch, "llm_scale")
    monkeypatch.setattr(ls, "make_checkpoint", lambda folder, scale, blocks: {
        "scale": scale, "blocks": blocks, "hidden": 64, "intermediate": 192, "vocab": 64})
    monkeypatch.setattr(ls, "write_shard", lambda *a, **k: 0)

    def run_sop(argv, cwd, env=None):
        tiny = Path(argv[1]).parent.name == "tiny"           # the one-layer 64 x 64 checkpoint's runs
        return {"rc": 0, "seconds": 1.0, "peak": 1_000_000 if tiny else 1_000_000 + 10 * 12288,
                "progress": ["x [1/1] l 1x1: 0.10 s"], "errors": [], "stdout": ""}

    monkeypatch.setattr(ls, "run_sop", run_sop)
    args = SimpleNamespace(blocks=2, scale=1.0, formats=["nf4-g64"], sop4=False, sop4_include=[])
    out = ls.memory_bench(args, tmp_path)
    capsys.readouterr()
    ck = out["checkpoint"]
    assert ck["largest_weights"] == 12288 and ck["largest_layer"] == [192, 64]
    assert ck["linear_weights"] == 106496
    for cmd in ("eval", "quantize", "dequantize"):
        assert out["formats"]["nf4-g64"][cmd]["bytes_per_weight"] == pytest.approx(10.0)


def test_llm_scale_jobs_speedup_is_one_job_over_two(monkeypatch, tmp_path, capsys):
    """--jobs 1 takes 10 s then 8 s, --jobs 2 6 s then 4 s: the best of each, 8 / 4 = 2.0x."""
    ls = bench_module(monkeypatch, "llm_scale")
    times = {"1": [10.0, 8.0], "2": [6.0, 4.0]}

    def run_sop(argv, cwd, env=None):
        jobs, out = argv[argv.index("--jobs") + 1], argv[argv.index("--json") + 1]
        Path(out).write_text(json.dumps({"formats": {"sop4-g16": {"seconds": 1, "sqnr": 30.0}}}))
        return {"rc": 0, "seconds": times[jobs].pop(0), "errors": []}

    monkeypatch.setattr(ls, "run_sop", run_sop)
    got = ls.jobs_bench(2, tmp_path)
    capsys.readouterr()
    assert got["seconds"] == {1: [10.0, 8.0], 2: [6.0, 4.0]}
    assert got["speedup"] == pytest.approx(2.0) and got["same_json"] is True


# -- bench/hif_sqnr.py -----------------------------------------------------------------------------

def test_hif_sqnr_loss_is_exact_minus_hif(monkeypatch):
    """The exact table's noise 1, the HIF-rounded one's 2: the loss is 10 log10(2) = 3.0103 dB (a loss,
    positive); a table the HIF refuses gets None."""
    hs = bench_module(monkeypatch, "hif_sqnr")
    monkeypatch.setattr(hs, "exact_nearest", lambda raw: "exact")
    monkeypatch.setattr(hs, "codebook_nearest", lambda cb: "hif")
    monkeypatch.setattr(hs, "squared_error", lambda blocks, smax, peak, nearest: 1.0 if nearest == "exact" else 2.0)

    def from_values(name, raw, hif):
        if name == "big":
            raise ValueError("beyond the HIF")
        return SimpleNamespace(peak=1.0)

    monkeypatch.setattr(hs, "Codebook", SimpleNamespace(from_values=from_values))
    blocks = np.array([[3.0, 4.0]])                                    # signal 25
    exact, loss = hs.measure(blocks, np.array([4.0]), {"t": np.array([0.0, 1.0]), "big": np.array([0.0, 1.0])})
    assert exact["t"] == pytest.approx(10 * np.log10(25.0))        # 13.98 dB
    for m in hs.MBITS:
        assert loss[m]["t"] == pytest.approx(3.0103, abs=1e-4)
        assert loss[m]["big"] is None


def test_hif_sqnr_recommend_accepts_a_loss_equal_to_the_limit(monkeypatch):
    """The rule is loss <= 0.05 dB and E2M1/E2M3 exact. E2M3 has 3 fraction bits (1.125 = 1.001b), so
    M = 2 cannot hold it and M = 3 is the first width (the E3 bias 5 exponents 2^-4 .. 2^2 cover
    E2M3's 0.125 .. 7.5). A loss of exactly 0.05 everywhere passes at M = 3; a loss just above it at
    M = 3 moves the choice to M = 4; a refused table (None) never passes."""
    hs = bench_module(monkeypatch, "hif_sqnr")
    assert hs.recommend({m: {"a": hs.MAX_LOSS_DB, "b": 0.0} for m in hs.MBITS}) == 3
    above = {m: {"a": hs.MAX_LOSS_DB + (1e-6 if m == 3 else 0.0)} for m in hs.MBITS}
    assert hs.recommend(above) == 4
    assert hs.recommend({m: {"a": None} for m in hs.MBITS}) is None


def test_hif_sqnr_cost_model(monkeypatch):
    """LUT storage 2 banks x 2 buffers x 16 entries x 12 bits = 768; the multiplier of M = 6 is
    (6 + 1) x (4 + 1) = 7 x 5, about 35 LUT4."""
    hs = bench_module(monkeypatch, "hif_sqnr")
    assert hs.lut_storage_bits(12) == 768
    assert hs.multiplier_size(6) == (7, 5)
    assert hs.multiplier_lut4(6) == 35


def test_hif_sqnr_signed_max_is_the_largest_magnitude_with_its_sign(monkeypatch):
    """[1, -3, 2]: |-3| is the largest, so -3 (not the largest value 2); [0.5, 0.25, -0.125]: 0.5."""
    hs = bench_module(monkeypatch, "hif_sqnr")
    got = hs.signed_max(np.array([[1.0, -3.0, 2.0], [0.5, 0.25, -0.125]]))
    assert got.tolist() == [-3.0, 0.5]


def test_hif_sqnr_report_max_loss_column_is_the_worst_table(monkeypatch):
    """Tables a and b lose 0.01 and 0.2 dB at every width: the 'max loss' column reads 0.200."""
    hs = bench_module(monkeypatch, "hif_sqnr")
    loss = {m: {"a": 0.01, "b": 0.2} for m in hs.MBITS}
    text = hs.report({"a": 20.0, "b": 18.0}, loss, 32, 2, np.zeros(16))
    rows = [line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and line.split(" | ")[1].startswith("E3M")]
    assert len(rows) == len(hs.MBITS)
    for cells in rows:
        assert cells[2:5] == ["0.010", "0.200", "0.200"]        # a, b, max loss


# -- bench/codebook_sqnr.py and bench/header_sqnr.py -----------------------------------------------

def test_codebook_sqnr_alpha_grid_and_best_alpha(monkeypatch):
    """The sweep is 0.0 .. 3.0 in steps of 0.1: 31 alphas. A data set whose SQNR peaks at alpha 1.3
    (-(a - 1.3)^2) has best alpha 1.3; one whose SQNR rises with alpha has best 3.0, the grid's end."""
    cs = bench_module(monkeypatch, "codebook_sqnr")
    assert len(cs.ALPHAS) == 31 and cs.ALPHAS[0] == 0.0 and cs.ALPHAS[-1] == 3.0
    monkeypatch.setattr(cs, "sh4_table", lambda a: a)
    peaked = SimpleNamespace(name="peaked", sqnr=lambda a: -(a - 1.3) ** 2)
    rising = SimpleNamespace(name="rising", sqnr=lambda a: a)
    text, best = cs.alpha_sweep([peaked, rising])
    assert best["peaked"] == pytest.approx(1.3) and best["rising"] == pytest.approx(3.0)
    assert "| 1.3 | -0.000 **best** |" in text


def test_header_sqnr_searches_one_scale_neighbour_each_side(monkeypatch):
    """Every candidate is encoded with the covering scale code and one neighbour each side
    (scale_search=1); [3, 4] decoded as [3, 3]: 10 log10(25 / 1) = 13.98 dB."""
    hs = bench_module(monkeypatch, "header_sqnr")
    calls = []

    def encode_layer(w, layout, banks, **kw):
        calls.append(kw)
        return w

    monkeypatch.setattr(hs, "encode_layer", encode_layer)
    monkeypatch.setattr(hs, "decode_layer", lambda stream: np.array([[3.0, 3.0]]))
    got = hs.aggregate_sqnr({"a": np.array([[3.0, 4.0]], np.float32)}, "layout", ["bank"])
    assert got == pytest.approx(13.9794, abs=1e-4)
    assert calls == [{"scale_search": 1, "name": "a"}]


# -- bench/sim_speed.py and bench/dot_bf16.py ------------------------------------------------------

def test_sim_speed_values_per_minute(monkeypatch, capsys):
    """Verilator checks 6,000,000 values in 60 s: 6e6 / 60 x 60 = 6.00 M a minute; Icarus 600,000 in 60 s:
    0.60 M; the ratio 10.00x."""
    sp = bench_module(monkeypatch, "sim_speed")
    checked = {"verilator": 6_000_000, "icarus": 600_000}
    monkeypatch.setattr(sp.runner, "run", lambda cfg, sim, build_dir: {
        "mismatches": 0, "checked": checked[sim], "seconds": 60.0})
    monkeypatch.setattr(sys, "argv", ["sim_speed.py", "--config", "sop4-g16"])
    sp.main()
    out = capsys.readouterr().out
    assert "| sop4-g16 | verilator | 6,000,000 | 60.0 | 6.00 M |" in out
    assert "| sop4-g16 | icarus | 600,000 | 60.0 | 0.60 M |" in out
    assert "| sop4-g16 | verilator / icarus | | | 10.00x |" in out


def test_dot_bf16_fallback_rates_per_layer_and_overall(monkeypatch, capsys):
    """Blocks of g = 2. Layer a: 2 rows x 4 columns (2 blocks a row, 4 blocks), 3 tokens: 3 x 4 = 12
    (token, block) pairs; layer b: 2 rows x 2 columns (1 block a row), 2 tokens: 2 x 2 = 4. The fake
    rule falls back on the first block of each token: a 3 / 12 = 25%, b 2 / 4 = 50%, all 5 / 16 = 31.25%."""
    db = bench_module(monkeypatch, "dot_bf16")
    import sop.quantize.calib as calib
    import sop.quantize.e2e as e2e
    import sop.quantize.models as models
    import sop.quantize.schemes as schemes

    g = 2
    shapes = {"encoder.layer.0.a.weight": (2, 4, 3), "encoder.layer.0.b.weight": (2, 2, 2)}   # rows, cols, tokens

    class Bert:
        def __init__(self, folder):
            pass

        def embed(self, sentences, hook):
            for name, (_, cols, tokens) in shapes.items():
                hook(name, np.ones((tokens, cols), np.float32))

        def linear_names(self):
            return [*shapes, "pooler.dense.weight"]

    def quantize(w):
        rows, cols = w.shape
        layout = SimpleNamespace(group=g, split_header=lambda h: (h, None, np.zeros(len(h), np.int64)))
        return SimpleNamespace(stream=SimpleNamespace(layout=layout, blocks=rows * cols // g, luts=[[0] * 16],
                                                      cols=cols, rows=rows, offset=0))

    monkeypatch.setattr(calib, "heldout_sentences", lambda n: ["s"] * n)
    monkeypatch.setattr(e2e, "Bert", Bert)
    monkeypatch.setattr(models, "minilm_folder", lambda: "folder")
    monkeypatch.setattr(models, "open_model", lambda spec: SimpleNamespace(
        load=lambda name: np.zeros(shapes[name][:2], np.float32)))
    monkeypatch.setattr(schemes, "get_quant_format", lambda name: SimpleNamespace(quantize=quantize))
    monkeypatch.setattr(db, "unpack_blocks", lambda lay, n: (np.zeros(n, np.int64), np.zeros((n, g), np.int64)))
    monkeypatch.setattr(db, "BF16", SimpleNamespace(quantize=lambda x: x))
    monkeypatch.setattr(db.dot, "activation_codes", lambda x, fmt: x)
    monkeypatch.setattr(db, "takes_fallback", lambda lay, hif_fmt, hif, act, scale, offs, f_bits:
                        np.arange(len(hif)) == 0)
    monkeypatch.setattr(sys, "argv", ["dot_bf16.py", "--windows", "16"])
    db.main()
    out = capsys.readouterr().out
    rows = ["| encoder.layer.0.a | 3 x 4 | 25.0000% (3) |", "| encoder.layer.0.b | 2 x 2 | 50.0000% (2) |",
            "| all | 16 | 31.2500% (5) |"]
    assert [row in out for row in rows] == [True] * 3, out
