"""`sop eval` end to end: minilm with calibration and embedding fidelity against the published
figures, the JSON schema, bad input (NaN, odd widths, unknown formats), the format registry."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.layout import pack_layer
from sop.quantize import schemes as F
from sop.quantize.evaluate import evaluate, to_json

# all-MiniLM-L6-v2, all 37 linear weights, aggregate SQNR: figures measured independently of this code
# (the reference check of docs/quantizer.md section 3)
MINILM_SQNR = {"fp8-e4m3-pot": 31.5, "nf4-g64": 20.6}
LAYER_KEYS = {"bpw", "sqnr_db", "rel_mse", "acos", "choice"}


@pytest.fixture(scope="module")
def minilm_eval(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "x.json"
    assert main(["eval", "minilm", "--format", "fp8-e4m3-pot", "--format", "nf4-g64", "--json", str(out),
                 "--quiet", "--cache-dir", str(tmp / "calib")]) == 0
    return json.loads(out.read_text())


def test_minilm_eval_json_schema_and_figures(minilm_eval):
    doc = minilm_eval
    assert doc["model"] == "minilm" and set(doc["formats"]) == set(MINILM_SQNR)
    assert doc["calibration"]["weighted"] and doc["calibration"]["sentences"] == 256
    for name, ref in MINILM_SQNR.items():
        f = doc["formats"][name]
        assert {"bpw", "sqnr_db", "rel_mse", "acos", "layers", "e2e"} <= set(f)
        assert abs(f["sqnr_db"] - ref) < 0.1, (name, f["sqnr_db"])
        assert f["rel_mse"] == pytest.approx(10 ** (-f["sqnr_db"] / 10))
        assert len(f["layers"]) == 37
        assert all(LAYER_KEYS <= set(l) and l["weighted"] for l in f["layers"].values())
        assert 0.9 < f["e2e"]["cos_min"] <= f["e2e"]["cos_mean"] < 1.0
        assert f["e2e"]["sentences"] == 64
    fp8, nf4 = doc["formats"]["fp8-e4m3-pot"], doc["formats"]["nf4-g64"]
    assert fp8["bits"] == 8 * 10_764_288 + 8 * 37 and fp8["bpw"] == pytest.approx(8.0, abs=1e-4)
    assert nf4["bpw"] == 4.5
    # more error, less fidelity: the order holds in every measure
    assert fp8["acos"] > nf4["acos"] and fp8["e2e"]["cos_mean"] > nf4["e2e"]["cos_mean"]
    assert fp8["e2e"]["cos_mean"] > 0.995


def test_eval_prints_the_table(capsys, tmp_path):
    assert main(["eval", "minilm", "--format", "mxfp4", "--include", "encoder.layer.0.*", "--no-calib",
                 "--no-e2e", "--quiet", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mxfp4" in out and "6 linear layers" in out and "unweighted" in out and "SQNR" in out


def test_e2e_windows_on_a_sentence_encoder_is_one_warning_line(tmp_path, capsys):
    """`--e2e-windows` counts a causal LM's held-out windows: on MiniLM, whose end-to-end check embeds held-out
    sentences, it changed nothing without a word (an outside walk through the options), where the calibration
    size of the other kind of model is a warning line (layer_loop.unused_size_warning); printed under --quiet."""
    base = ["eval", "minilm", "--format", "nf4-g64", "--include", "encoder.layer.0.attention.self.query.weight",
            "--no-calib", "--quiet"]
    assert main([*base, "--e2e-windows", "2"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["warning: --e2e-windows 2 counts a causal LM's held-out windows, unused here: a "
                                "sentence encoder's (BERT) end-to-end check compares the embeddings of 64 held-out "
                                "sentences"]
    assert main(base) == 0                                          # the default: nothing to say, the same result
    again = capsys.readouterr()
    assert again.err == "" and again.out == out
    # with --no-e2e no end-to-end check runs at all: it changed nothing without a word (a researcher's walk)
    assert main([*base, "--no-e2e", "--e2e-windows", "2"]) == 0
    assert capsys.readouterr().err.splitlines() == ["warning: --e2e-windows 2 unused: --no-e2e skips the "
                                                    "end-to-end check"]


def test_a_calibration_size_with_no_calib_is_one_warning_line(capsys):
    """`--calib-sentences` or `--calib-seqs` beside `--no-calib` counted a calibration that never runs, and the
    run said nothing (the options walk); `--seq-len` alone is no warning (a causal LM's held-out windows)."""
    base = ["eval", "minilm", "--format", "nf4-g64", "--include", "encoder.layer.0.attention.self.query.weight",
            "--no-calib", "--no-e2e", "--quiet"]
    assert main([*base, "--calib-sentences", "8", "--calib-seqs", "3"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["warning: --calib-sentences 8 --calib-seqs 3 unused: --no-calib skips the "
                                "calibration"]
    assert main([*base, "--seq-len", "64"]) == 0
    again = capsys.readouterr()
    assert again.err == "" and again.out == out


@pytest.mark.parametrize("cmd", ["eval", "quantize"])
@pytest.mark.parametrize("fmt", ["sop4-g16", "sop-budget"])
def test_progress_lines_stay_one_line_whatever_a_layer_is_called(tmp_path, capsys, cmd, fmt):
    """A tensor name is any string: one holding line breaks still gives one progress line a layer,
    so a reader (or a log parser) never sees a line that starts inside a name."""
    names = ["a\nFAKE: line.weight", "b\r\nFAKE\u2028FAKE.weight"]
    save_file({n: torch.ones(16, 32) * (i + 1) for i, n in enumerate(names)}, tmp_path / "m.safetensors")
    out = ["--json", str(tmp_path / "e.json")] if cmd == "eval" else ["--out", str(tmp_path / "q.sopq")]
    budget = ["--budget", "6"] if fmt == "sop-budget" else []
    assert main([cmd, str(tmp_path / "m.safetensors"), "--format", fmt, *budget, *out]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert not any(line.startswith("FAKE") for line in lines), lines
    assert any("a FAKE: line.weight 16x32" in line for line in lines), lines
    assert any("b FAKE FAKE.weight 16x32" in line for line in lines), lines
    assert any("m.safetensors: 2 linear layers, 1,024 weights" in line for line in lines), lines


def test_one_layer_is_one_linear_layer(tmp_path, capsys):
    save_file({"l.0.fc.weight": torch.ones(16, 32)}, tmp_path / "m.safetensors")
    assert main(["eval", str(tmp_path / "m.safetensors"), "--format", "sop4-g16"]) == 0
    out, err = capsys.readouterr()
    assert "m.safetensors: 1 linear layer, 512 weights\n" in err and "(safetensors): 1 linear layer, 512 weights\n" in out


def test_a_model_without_a_forward_pass_has_no_end_to_end_columns(tmp_path, capsys):
    """A weights file alone runs no model: its table showed a sentence encoder's dashed 'e2e cos mean' and
    'e2e cos min' columns (a MoE GGUF's too, an outside probe); the line under the table says why none."""
    save_file({"l.0.fc.weight": torch.ones(16, 32)}, tmp_path / "m.safetensors")
    assert main(["eval", str(tmp_path / "m.safetensors"), "--format", "sop4-g16", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(line for line in out if line.startswith("format "))
    row = next(line for line in out if line.startswith("sop4-g16 "))
    assert head.split()[-2:] == ["max", "err"] and len(row) == len(head) and "-" not in row.split()
    assert out[-1].startswith("e2e: skipped (no forward pass for this model (")


@pytest.mark.parametrize("scale, shown", [(1e36, "e+"), (1e-9, "e-")])
def test_the_tables_max_error_keeps_its_column_at_any_scale(tmp_path, capsys, scale, shown):
    """The max error of a layer near float32's top printed 40 digits into the next column (.4f); of a
    tiny layer, 0.0000: it is shown to 4 significant digits in its 10 characters."""
    w = np.random.default_rng(1).standard_normal((16, 32)) * scale
    save_file({"l.fc.weight": torch.from_numpy(w.astype(np.float32))}, tmp_path / "m.safetensors")
    assert main(["eval", str(tmp_path / "m.safetensors"), "--format", "sop4-g16", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(l for l in out if l.startswith("format "))
    row = next(l for l in out if l.startswith("sop4-g16 "))
    end = head.index("max err") + len("max err")
    cell = row[end - 10:end]
    assert len(row) == len(head) and shown in cell and float(cell) > 0, (head, row)


def _toy(tmp_path, w):
    save_file({"l.0.fc.weight": torch.from_numpy(w.astype(np.float32)),
               "l.1.fc.weight": torch.ones(8, 64)}, tmp_path / "m.safetensors")
    return str(tmp_path / "m.safetensors")


def test_non_bert_model_is_unweighted_and_says_so(tmp_path):
    path = _toy(tmp_path, np.random.default_rng(0).standard_normal((8, 70)))
    out = tmp_path / "r.json"
    assert main(["eval", path, "--format", "nf4-g64", "--json", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert not doc["calibration"]["weighted"] and "unweighted" in doc["calibration"]["note"]
    f = doc["formats"]["nf4-g64"]
    assert "skipped" in f["e2e"]
    # width 70 pads to 128: 8 rows x (128 x 4 + 2 x 32) bits, counted against 8 x 70 weights
    assert f["layers"]["l.0.fc.weight"]["bpw"] == 8 * (128 * 4 + 2 * 32) / (8 * 70)
    assert f["layers"]["l.1.fc.weight"]["sqnr_db"] is None          # exact: infinite SQNR as null


def test_nan_is_an_error_naming_layer_and_position_unless_a_policy_is_given(tmp_path, capsys):
    w = np.ones((8, 64))
    w[2, 5] = np.nan
    path = _toy(tmp_path, w)
    assert main(["eval", path, "--format", "int8-ch", "--quiet"]) == 2
    assert "l.0.fc.weight: non-finite weight nan at row 2, column 5" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main(["eval", path, "--format", "int8-ch", "--nan-policy", "zero", "--json", str(out), "--quiet"]) == 0
    lay = json.loads(out.read_text())["formats"]["int8-ch"]["layers"]["l.0.fc.weight"]
    assert lay["nonfinite_replaced"] == 1 and lay["sqnr_db"] > 60


def test_unknown_format_lists_the_valid_names(capsys):
    assert main(["eval", "minilm", "--format", "nf5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown format 'nf5'" in err and "nf4-g64" in err and "sop4-g16" in err


def test_budget_needs_a_budgeted_format():
    with pytest.raises(ValueError, match="^budget applies to a budgeted format"):     # Python's name, not --budget
        evaluate("minilm", ["nvfp4"], budget=4.5)


def test_formats_lists_every_quantizer_with_its_bpw(capsys):
    assert main(["formats", "--json"]) == 0
    q = {f["name"]: f["bpw"] for f in json.loads(capsys.readouterr().out)["quantizers"]}
    assert q == {"fp8-e4m3-pot": 8.0, "int8-ch": 8.0, "mxfp8-e4m3": 8.25, "mxfp6-e2m3": 6.25,
                 "mxfp6-e3m2": 6.25, "mxfp4": 4.25, "nvfp4": 4.5, "nvfp4-46": 4.5, "if4": 4.5,
                 "nf4-g64": 4.5, "e2m3-ue4m4-g16": 6.5, "sop4-g16": 4.5, "sop-budget": None}


def test_json_has_no_nan_or_infinity():
    doc = {"model": "m", "formats": {"f": {"sqnr_db": float("inf"), "x": [np.float64("nan")]}}}
    assert json.loads(to_json(doc)) == {"model": "m", "formats": {"f": {"sqnr_db": None, "x": [None]}}}


# -- the SOP points through the registry ----------------------------------------------------------------

def test_fp6_point_pads_and_decodes_to_its_reconstruction():
    w = np.random.default_rng(1).standard_normal((4, 70))
    r = F.get_quant_format("e2m3-ue4m4-g16").quantize(w)
    assert r.recon.shape == (4, 70) and r.stream.cols == 80
    decoded = decode_layer(r.stream)
    np.testing.assert_array_equal(decoded[:, :70], r.recon)
    assert not decoded[:, 70:].any()                               # the padding decodes to zero
    assert r.bits == r.stream.bits and r.bpw == r.stream.bits / 280
    sqnr = 10 * np.log10((w ** 2).sum() / ((w - r.recon) ** 2).sum())
    assert sqnr > 31.5                                             # beats the FP8 figure on Gaussian data


def test_sop4_point_through_the_registry():
    w = np.random.default_rng(2).standard_normal((8, 64))
    r = F.get_quant_format("sop4-g16").quantize(w, act_ms=np.linspace(0.5, 2, 64))
    np.testing.assert_array_equal(decode_layer(r.stream), r.recon)
    assert 4.5 < r.bpw < 6.5


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_a_padded_layer_is_quantized_as_if_its_padding_had_no_activation(weighted):
    """The padding columns are stored but cropped on decode: not data. A 40-wide layer is quantized
    as the 48-wide layer of its weights and 8 zero columns of activation 0, bit for bit. (Padded at
    the mean activation, as it was, the zeros pulled the DD4 levels and the block choices toward
    themselves: about 0.03 dB on random layers. The FP6 point encodes zeros exactly, so its padding
    never had an error to weigh: sop4-g16's tables, DD4 among them, are what this guards.)"""
    name = "sop4-g16"
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 40))
    a = rng.uniform(0.1, 2.0, 40) if weighted else None
    fmt = F.get_quant_format(name)
    got = fmt.quantize(w, act_ms=a)
    ref = fmt.quantize(np.pad(w, ((0, 0), (0, 8))), act_ms=np.concatenate([np.ones(40) if a is None else a,
                                                                           np.zeros(8)]))
    assert pack_layer(got.stream) == pack_layer(ref.stream)
    np.testing.assert_array_equal(got.recon, ref.recon[:, :40])


def test_a_layers_reported_figures_are_weighted_by_its_calibration(tmp_path):
    """quantize_layer's statistics are those of the activations it was given: the reported ACos is the
    weighted cosine of the weights and the reconstruction, not the unweighted one (which differs here)."""
    from sop.quantize.layer_loop import quantize_layer
    from sop.quantize.metrics import ErrorStats
    from sop.quantize.models import open_model

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    save_file({"l.0.proj.weight": torch.from_numpy(w)}, tmp_path / "m.safetensors")
    src = open_model(str(tmp_path / "m.safetensors"))
    act = np.linspace(0.01, 100, 64)
    res, stats, _ = quantize_layer(src, "l.0.proj.weight", F.get_quant_format("sop4-g16"), act, "error")
    weighted, plain = ErrorStats.of(w, res.recon, act), ErrorStats.of(w, res.recon)
    assert stats.acos == weighted.acos != plain.acos and stats.sqnr_db == weighted.sqnr_db


def test_sop_budget_without_a_budget_is_refused():
    with pytest.raises(ValueError, match=r"sop-budget needs budget=B \(average"):
        evaluate("minilm", ["sop-budget"])


def test_sop_budget_runs_the_knapsack_under_the_budget(tmp_path):
    rng = np.random.default_rng(3)
    sd = {f"l.{i}.fc.weight": torch.from_numpy((rng.standard_t(3, (16, 64 + 3 * i)) * 0.05).astype(np.float32))
          for i in range(3)}                                         # widths 64, 67, 70: padded
    save_file(sd, tmp_path / "m.safetensors")
    doc = evaluate(str(tmp_path / "m.safetensors"), ["sop-budget", "sop4-g16"], budget=6.0, progress=False)
    f, sop4 = doc["formats"]["sop-budget"], doc["formats"]["sop4-g16"]
    assert sop4["bpw"] < f["bpw"] <= 6.0 and "report" in f["budget"]
    assert f["sqnr_db"] >= sop4["sqnr_db"]          # the extra bits buy accuracy over plain SOP4
    assert all(":" in l["choice"] for l in f["layers"].values())
