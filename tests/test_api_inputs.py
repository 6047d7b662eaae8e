"""The quantizers called from Python (``get_quant_format(name).quantize``, ``quantize_model``) check
their input as the command line does (quantize/inputs.py). An outside probe found the registry
trusting its caller: float64 weights past float32's range came back as NaN or as nonsense (``nvfp4``:
6 for weights of 1e200), tiny ones as an OverflowError, a 1-D or empty matrix as an IndexError, a
``torch.nn.Parameter`` as torch's "requires grad" error, a BF16 tensor as a TypeError, a complex array
with its imaginary part dropped, and a misspelt keyword to a baseline silently ignored."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch

from sop.quantize.schemes import get_quant_format, quant_formats

PER_LAYER = [n for n, f in quant_formats().items() if not f.model_level]


def weights(rows=8, cols=48, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols))


@pytest.mark.parametrize("fmt", PER_LAYER)
@pytest.mark.parametrize("scale, said", [(1e200, "beyond float32's range"),
                                         (2.0 ** -1070, "below float32's smallest normal number")])
def test_weights_no_output_can_hold_are_refused_by_every_format(fmt, scale, said):
    with pytest.raises(ValueError, match=f"^my.layer: .*{said}"):
        get_quant_format(fmt).quantize(weights() * scale, name="my.layer")


@pytest.mark.parametrize("fmt", PER_LAYER)
@pytest.mark.parametrize("w, said", [(np.ones(64), r"expected a 2-D weight matrix \(out, in\), got shape \(64,\)"),
                                     (np.ones((0, 64)), "a weight matrix with no rows"),
                                     (np.ones((8, 0)), "a weight matrix with no columns"),
                                     (np.ones((4, 16), complex), "weights must be real numbers"),
                                     (np.full((4, 16), np.nan), r"non-finite weight nan at row 0, column 0 "
                                                                r"\(64 in the layer\); replace them \(with 0, say\) "
                                                                r"before quantizing$")])
def test_a_bad_matrix_is_one_error_naming_the_layer(fmt, w, said):
    with pytest.raises(ValueError, match=f"^my.layer: {said}"):
        get_quant_format(fmt).quantize(w, name="my.layer")


@pytest.mark.parametrize("fmt", ["sop4-g16", "e2m3-ue4m4-g16", "nvfp4"])
@pytest.mark.parametrize("act_ms, said", [(np.ones(16), r"one number per input column \(17\), got shape \(16,\)"),
                                          (-np.ones(17), "finite and non-negative"),
                                          (np.full(17, np.inf), "finite and non-negative")])
def test_act_ms_is_checked_against_the_real_columns(fmt, act_ms, said):
    """Said of ``act_ms`` and the layer's 17 columns, not of the padded 32 (``col_weight``)."""
    with pytest.raises(ValueError, match=f"^my.layer: act_ms must .*{said}"):
        get_quant_format(fmt).quantize(weights(cols=17), act_ms=act_ms, name="my.layer")


@pytest.mark.parametrize("fmt", ["sop4-g16", "nvfp4", "fp8-e4m3-pot"])
def test_torch_tensors_as_a_model_holds_them(fmt):
    """A Parameter that requires grad, and BF16, read as numpy reads them, with the same bits."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    q = get_quant_format(fmt).quantize
    assert np.array_equal(q(lin.weight).recon, q(lin.weight.detach().numpy()).recon)
    bf16 = lin.weight.detach().bfloat16()
    assert np.array_equal(q(bf16).recon, q(bf16.float().numpy()).recon)
    with pytest.raises(ValueError, match="^w: a meta tensor holds no values"):
        q(torch.empty(4, 16, device="meta"), name="w")
    with pytest.raises(ValueError, match="^w: weights must be real numbers"):
        q(torch.ones(4, 16, dtype=torch.complex64), name="w")


@pytest.mark.parametrize("fmt", ["sop4-g16", "nvfp4", "fp8-e4m3-pot"])
def test_ml_dtypes_arrays_are_read_as_the_numbers_they_hold(fmt):
    """An ml_dtypes ``bfloat16`` or ``float8_e4m3fn`` array (numpy's kind "V") was refused as "weights must be
    real numbers, got dtype bfloat16" (an outside probe): read as float32, as a torch BF16 tensor is."""
    import ml_dtypes

    q = get_quant_format(fmt).quantize
    w = weights(cols=40)
    for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        held = w.astype(t)
        res = q(held, act_ms=np.linspace(0.5, 2, 40).astype(t))
        want = q(held.astype(np.float32), act_ms=np.linspace(0.5, 2, 40).astype(t).astype(np.float32))
        assert np.array_equal(res.recon, want.recon) and res.bits == want.bits
    assert np.array_equal(q(np.ones((4, 16), ml_dtypes.int4)).recon, q(np.ones((4, 16), np.int8)).recon)
    with pytest.raises(ValueError, match="^layer: weights must be real numbers, got dtype"):
        q(np.zeros((4, 16), np.dtype([("a", np.float32)])))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "sop4-g16"])
def test_a_misspelt_keyword_is_an_error(fmt):
    with pytest.raises(TypeError, match="scale_serach"):
        get_quant_format(fmt).quantize(weights(), scale_serach=3)


def test_the_budget_quantizer_checks_each_layer_too():
    fmt = get_quant_format("sop-budget")
    with pytest.raises(ValueError, match="^big: .*beyond float32's range"):
        fmt.solve_budget({"ok": (weights(), None), "big": (weights() * 1e200, None)}, 6.0)


def test_the_budget_quantizer_names_its_budget_in_python_terms():
    """``solve_budget`` from Python refused a budget below every layer's cheapest option with the command
    line's ``give --budget 4.8204 or more``, a flag no Python caller has (an outside probe): ``budget=``
    here, as ``quantize_module`` says it; ``sop eval`` and ``sop quantize`` keep ``--budget``
    (tests/test_cli_errors.py)."""
    fmt, layers = get_quant_format("sop-budget"), {"a": (weights(), None)}
    with pytest.raises(ValueError, match=r"^budget is too small: it buys .* give budget=\d+\.\d{4} or more$") as e:
        fmt.solve_budget(layers, 0.5)
    least = float(str(e.value).split("give budget=")[1].split()[0])       # the least budget that runs
    assert set(fmt.solve_budget(layers, least).choice) == {"a"}
    for bad, said in [(None, r"^format sop-budget needs budget=B \(average bits per weight\)$"),
                      (0.0, r"^budget must be a number above 0, got 0\.0$")]:
        with pytest.raises(ValueError, match=said):
            fmt.solve_budget(layers, bad)


@pytest.mark.parametrize("budget", ["5", True, np.array(5.0)])
def test_solve_budget_refuses_a_budget_that_is_no_number_before_any_work(budget):
    """``solve_budget({...}, "5")`` was a TypeError ('>' between str and int) from the knapsack, after every
    layer's options were built; ``True`` ran as a budget of 1 bit per weight."""
    layers = {"a": (weights(), None)}
    with pytest.raises(ValueError, match=r"^budget must be a number \(average bits per weight\), got"):
        get_quant_format("sop-budget").solve_budget(layers, budget)


def test_solve_budget_refuses_layers_given_otherwise_than_name_to_pair():
    """A list of pairs was ``TypeError: list indices must be integers or slices, not tuple``, and a bare
    matrix for (w, act_ms) ``_checked_layer() takes 3 positional arguments but 9 were given``."""
    fmt, w = get_quant_format("sop-budget"), weights()
    with pytest.raises(ValueError, match=r"^sop-budget's layers are a mapping of name -> \(w, act_ms\), got list$"):
        fmt.solve_budget([("a", (w, None))], 6.0)
    with pytest.raises(ValueError, match=r"^sop-budget layer 'a': give a \(w, act_ms\) pair \(act_ms None for an "
                                         r"unweighted layer\), got ndarray$"):
        fmt.solve_budget({"a": w}, 6.0)
    assert fmt.solve_budget({"a": [w, None]}, 6.0).choice.keys() == {"a"}        # a list pair is a pair


def test_the_callers_arrays_are_not_written():
    w, act = weights(cols=17), np.arange(17.0)
    w0, act0 = w.copy(), act.copy()
    for fmt in PER_LAYER:
        get_quant_format(fmt).quantize(w, act_ms=act)
    assert np.array_equal(w, w0) and np.array_equal(act, act0)


@pytest.mark.parametrize("budget", ["5", True, [5.0]])
def test_a_budget_that_is_not_a_number_is_one_value_error(tmp_path, budget):
    """`quantize_model(..., budget="5")` raised TypeError ('>' between str and int) from the knapsack."""
    from sop.quantize.artifact import quantize_model

    with pytest.raises(ValueError, match=r"^budget must be a number \(average bits per weight\), got"):
        quantize_model("minilm", "sop-budget", tmp_path / "m.sopq", budget=budget, calibrate=False, progress=False)
    assert not (tmp_path / "m.sopq").exists()


def test_quantize_model_and_evaluate_name_the_budget_as_python_callers_give_it(tmp_path, capsys):
    """A review: `quantize_model` and `evaluate` said `--budget must be a number`, `needs --budget B`, `give
    --budget 4.8 or more`, options a Python caller has not got (the check is the command line's too): each
    says `budget` / `budget=B` from Python, as `quantize_module` does; `sop quantize` and `sop eval` keep
    `--budget`, and a Python call after a command in the same process is named as Python's again. A budget
    of 0, below 0 or NaN is refused before any work, not once the model is calibrated."""
    from safetensors.numpy import save_file

    from sop.cli import main
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate

    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    out = tmp_path / "q.sopq"
    kw = {"calibrate": False, "progress": False}
    calls = {"quantize_model": lambda fmt, **b: quantize_model(str(ckpt), fmt, out, **b, **kw),
             "evaluate": lambda fmt, **b: evaluate(str(ckpt), [fmt], e2e=False, **b, **kw)}
    cases = [("sop-budget", {"budget": "5"}, r"^budget must be a number \(average bits per weight\), got '5'$"),
             ("sop-budget", {}, r"^sop-budget needs budget=B \(average bits per weight\)$"),
             ("nvfp4", {"budget": 4.0}, r"^budget applies to a budgeted format \(sop-budget\) only$"),
             ("sop-budget", {"budget": 0}, r"^budget must be a number above 0, got 0$"),
             ("sop-budget", {"budget": -4.5}, r"^budget must be a number above 0, got -4\.5$"),
             ("sop-budget", {"budget": float("nan")}, r"^budget must be a number above 0, got nan$"),
             ("sop-budget", {"budget": 0.5}, r"^budget is too small: it buys 512 bits, .* give budget=\d+\.\d{4} "
                                             r"or more$")]
    for name, call in calls.items():
        for fmt, budget, said in cases:
            with pytest.raises(ValueError, match=said):
                call(fmt, **budget)
        for argv in (["quantize", str(ckpt), "--format", "sop-budget", "--budget", "0.5", "--out", str(out)],
                     ["eval", str(ckpt), "--format", "nvfp4", "--budget", "4"]):
            assert main(argv + ["--quiet", "--no-calib"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("sop: error: --budget ") and "budget=" not in err, err
        with pytest.raises(ValueError, match="^budget is too small: .* give budget="):     # Python's again
            call("sop-budget", budget=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_budget_any_real_number_above_0_runs_as_its_float(tmp_path):
    """`budget=Fraction(11, 2)` was TypeError (Fraction's format has no `.4f`) and `budget=10**400` (past every
    option, as inf is) OverflowError, from the knapsack: each runs as the float it is (10**400 capped at every
    layer's dearest option, as 1e308 is), with the header's budget that float."""
    from fractions import Fraction

    from safetensors.numpy import save_file

    from sop.quantize.artifact import open_artifact, quantize_model

    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    kw = {"calibrate": False, "progress": False}
    runs = {b: quantize_model(str(ckpt), "sop-budget", tmp_path / f"{i}.sopq", budget=b, **kw)
            for i, b in enumerate((Fraction(11, 2), 5.5, 10 ** 400, 1e308))}
    assert runs[Fraction(11, 2)]["bits"] == runs[5.5]["bits"] and runs[10 ** 400]["bits"] == runs[1e308]["bits"]
    assert open_artifact(runs[Fraction(11, 2)]["path"]).meta["budget"] == 5.5


@pytest.mark.parametrize("windows", [0, 2.5, True])
def test_evaluate_names_e2e_windows_as_python_callers_give_it(windows):
    """`evaluate(..., e2e_windows=0)` said `--e2e-windows must be a positive integer`: a keyword, not an option
    (the command line's parser refuses its bad values itself)."""
    from sop.quantize.evaluate import evaluate

    with pytest.raises(ValueError, match=rf"^e2e_windows must be a positive integer, got {windows!r}$"):
        evaluate("minilm", ["nvfp4"], e2e_windows=windows, progress=False)


def test_a_format_that_is_no_name_is_one_value_error(tmp_path):
    """`quantize_model(m, ["nf4-g64"], out)` (a list, as `evaluate` takes) was TypeError "unhashable type:
    'list'" from the registry's dict; a number or None, "unknown format 3": each says a format is one name."""
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate

    for bad in (["nf4-g64"], 3, None):
        with pytest.raises(ValueError, match=r"^a format is one name \(a string\), got \w+ .*; valid: .*nf4-g64"):
            quantize_model("minilm", bad, tmp_path / "q.sopq", calibrate=False, progress=False)
    with pytest.raises(ValueError, match=r"^a format is one name \(a string\), got list \['nf4-g64'\]"):
        evaluate("minilm", [["nf4-g64"]], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_takes_one_format_name_as_a_string(tmp_path):
    """`evaluate(path, "sop4-g16")` read the string as a list of its characters: `unknown format 's'`
    (include and exclude take a string as one glob); None is no format, as an empty list."""
    from safetensors.numpy import save_file

    from sop.quantize.evaluate import evaluate

    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    kw = {"calibrate": False, "e2e": False, "progress": False}
    assert list(evaluate(str(ckpt), "sop4-g16", **kw)["formats"]) == ["sop4-g16"]
    for none in (None, []):
        with pytest.raises(ValueError, match="^no format given$"):
            evaluate(str(ckpt), none, **kw)


def test_paths_given_as_no_path_are_one_value_error(tmp_path):
    """From Python, None or a number as a path was pathlib's TypeError (an output, an artifact) or read
    as the model 'None' (an outside probe): each is a ValueError naming what was given."""
    from safetensors.numpy import save_file

    from sop.quantize.artifact import dequantize, open_artifact, quantize_model
    from sop.quantize.evaluate import evaluate

    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    calls = [(lambda: quantize_model(str(ckpt), "sop4-g16", None, progress=False), "the output is given as NoneType"),
             (lambda: quantize_model(None, "sop4-g16", tmp_path / "q.sopq", progress=False),
              "model is given as NoneType"),
             (lambda: evaluate(3, ["sop4-g16"], progress=False), "model is given as int"),
             (lambda: open_artifact(None), "the .sopq file is given as NoneType"),
             (lambda: dequantize(None, tmp_path / "w.safetensors"), "the .sopq file is given as NoneType")]
    for call, said in calls:
        with pytest.raises(ValueError, match=f"^{re.escape(said)}, not a path|^{re.escape(said)}: give a path"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_an_artifacts_layer_given_as_no_entry_or_name_is_one_type_error(tmp_path):
    """`open_artifact(p).stream(0)` (an index, as into `.layers`) was AttributeError "'int' object has no
    attribute 'kind'" (an outside probe): a TypeError saying what a layer is given as; a name or an entry work."""
    from safetensors.numpy import save_file

    from sop.quantize.artifact import open_artifact, quantize_model

    ckpt = tmp_path / "m.safetensors"
    w = weights(16, 64).astype(np.float32)
    save_file({"fc.weight": w}, str(ckpt))
    art = open_artifact(quantize_model(str(ckpt), "sop4-g16", tmp_path / "q.sopq", calibrate=False,
                                       progress=False)["path"])
    for call in (art.stream, art.weights, art.record):
        for bad in (0, None, art.layers):
            with pytest.raises(TypeError, match=r"is given as its entry \(in \.layers\) or its name, got "):
                call(bad)
    by_name, by_entry = art.weights("fc.weight"), art.weights(art.layers[0])
    assert by_name.shape == w.shape and np.array_equal(by_name, by_entry)


def test_export_model_folder_names_its_model_argument_as_python_callers_give_it(tmp_path, capsys):
    """`export_model_folder(sopq, out, model="")` said `--model '' is an empty name`, and a source not found
    `give it with --model`: Python's `model` / `model=` there; `sop dequantize --model-folder` keeps --model."""
    from safetensors.numpy import save_file

    from sop.cli import main
    from sop.quantize.artifact import quantize_model
    from sop.quantize.hf_export import export_model_folder

    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    sopq = quantize_model(str(ckpt), "sop4-g16", tmp_path / "q.sopq", calibrate=False, progress=False)["path"]
    with pytest.raises(ValueError, match=r"^model '' is an empty name: give the source model"):
        export_model_folder(sopq, tmp_path / "out", model="")
    ckpt.rename(tmp_path / "moved.safetensors")
    with pytest.raises(ValueError, match=r"is not found from here; give it with model=$"):
        export_model_folder(sopq, tmp_path / "out", progress=False)
    assert main(["dequantize", sopq, "--model-folder", "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("is not found from here; give it with --model")
    assert not (tmp_path / "out").exists()


def test_lm_head_without_a_head_is_named_as_python_callers_give_it(tmp_path, capsys):
    """`quantize_model(..., lm_head=True)` on a checkpoint with no head said `--include-lm-head: the checkpoint
    has no output head`: `lm_head=True` from Python; `sop quantize --include-lm-head` keeps its option."""
    from safetensors.numpy import save_file

    from sop.cli import main
    from sop.quantize.artifact import quantize_model

    ckpt = tmp_path / "m.safetensors"
    save_file({"l.0.fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    with pytest.raises(ValueError, match=r": lm_head=True: the checkpoint has no output head \(lm_head\)"):
        quantize_model(str(ckpt), "nf4-g64", tmp_path / "q.sopq", lm_head=True, calibrate=False, progress=False)
    assert main(["quantize", str(ckpt), "--format", "nf4-g64", "--out", str(tmp_path / "q.sopq"),
                 "--include-lm-head", "--quiet"]) == 2
    assert ": --include-lm-head: the checkpoint has no output head (lm_head)" in capsys.readouterr().err
    assert not (tmp_path / "q.sopq").exists()


def test_quantize_model_from_python_never_writes_over_its_model(tmp_path):
    """A review: from Python the output was checked alone, and `quantize_model(p, fmt, p)` replaced the
    checkpoint with a .sopq (the command line checked it against the model's files)."""
    from safetensors.numpy import save_file

    from sop.golden.files import OutputError
    from sop.quantize.artifact import quantize_model
    from sop.quantize.in_memory import quantize_module

    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    (tmp_path / "config.json").write_text("{}")
    before = ckpt.read_bytes()
    # named as Python's `out` (it said `choose another --out`, the command line's option)
    said = r"the output is the input .*; refusing to overwrite an input \(choose another out\)$"
    for out in (ckpt, tmp_path / "config.json"):
        with pytest.raises(OutputError, match=said):
            quantize_model(str(ckpt), "sop4-g16", out, calibrate=False, progress=False)
    module = torch.nn.Sequential(torch.nn.Linear(64, 16))
    module.name_or_path = str(ckpt)                 # as transformers records where a model was loaded from
    with pytest.raises(OutputError, match=said):
        quantize_module(module, "sop4-g16", out=ckpt)
    assert ckpt.read_bytes() == before and (tmp_path / "config.json").read_text() == "{}"


def test_on_off_parameters_take_a_bool_only(tmp_path, capsys):
    """A review: every on/off parameter of the whole-model API took any truthy value (`lm_head="no"` quantized
    the head, `calibrate="no"` calibrated, `use_cache="no"` used the cache): anything but True or False is a
    TypeError naming it, before any work (the model and the artifact here do not even exist, and the module is
    left as it was); numpy's bool is one, and the command line's switches run as before."""
    from safetensors.numpy import save_file

    from sop.cli import main
    from sop.quantize import calib as C
    from sop.quantize.artifact import dequantize, quantize_model
    from sop.quantize.evaluate import evaluate
    from sop.quantize.hf_export import export_model_folder
    from sop.quantize.in_memory import quantize_module
    from sop.quantize.models import open_model

    gone, sopq, out = str(tmp_path / "no-model"), str(tmp_path / "no.sopq"), tmp_path / "q.sopq"
    module = torch.nn.Sequential(torch.nn.Linear(64, 16))
    before = module[0].weight.detach().clone()
    toy = type("Src", (), {"bert_folder": None, "kind": "toy"})()      # no forward pass: nothing to calibrate
    calls = [(k, lambda v, k=k: quantize_model(gone, "nf4-g64", out, **{k: v}))
             for k in ("calibrate", "progress", "lm_head", "routers")]
    calls += [(k, lambda v, k=k: evaluate(gone, ["nf4-g64"], **{k: v}))
              for k in ("calibrate", "e2e", "progress", "lm_head", "routers")]
    calls += [(k, lambda v, k=k: open_model(gone, **{k: v})) for k in ("lm_head", "routers")]
    calls += [(k, lambda v, k=k: quantize_module(module, "nf4-g64", **{k: v})) for k in ("lm_head", "routers")]
    calls += [("use_cache", lambda v: C.calibrate(toy, use_cache=v)),
              ("progress", lambda v: dequantize(sopq, tmp_path / "w.safetensors", progress=v)),
              ("progress", lambda v: export_model_folder(sopq, tmp_path / "folder", progress=v))]
    for keyword, call in calls:
        for bad, shown in (("no", "'no' (str)"), (1, "1 (int)"), (None, "None (NoneType)")):
            with pytest.raises(TypeError, match=f"^{keyword} must be True or False, got {re.escape(shown)}$"):
                call(bad)
    assert torch.equal(module[0].weight, before) and list(tmp_path.iterdir()) == []
    ckpt = tmp_path / "m.safetensors"
    save_file({"fc.weight": weights(16, 64).astype(np.float32)}, str(ckpt))
    assert open_model(str(ckpt), lm_head=np.False_, routers=np.bool_(False)).opened_with[3:5] == (False, False)
    assert quantize_model(str(ckpt), "nf4-g64", out, calibrate=np.False_, progress=np.bool_(False))["layers"] == 1
    assert main(["quantize", str(ckpt), "--format", "nf4-g64", "--out", str(tmp_path / "c.sopq"), "--quiet",
                 "--no-calib"]) == 0
    assert capsys.readouterr().err == ""


def test_a_cache_dir_that_is_no_path_is_one_type_error_naming_it(tmp_path):
    """`evaluate("minilm", ..., cache_dir=3)` ran until calibration, then raised pathlib's "argument should be a
    str or an os.PathLike object ..., not 'int'", naming no argument: refused first, naming `cache_dir`."""
    from sop.quantize import calib as C
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate

    toy = type("Src", (), {"bert_folder": None, "kind": "toy"})()
    for call in (lambda: evaluate("minilm", ["nf4-g64"], cache_dir=3, progress=False),
                 lambda: quantize_model("minilm", "nf4-g64", tmp_path / "q.sopq", cache_dir=3, progress=False),
                 lambda: C.calibrate(toy, cache_dir=b"bytes")):
        with pytest.raises(TypeError, match=r"^cache_dir must be a path \(a str or os\.PathLike\), got "
                                            r"(3 \(int\)|b'bytes' \(bytes\))$"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_a_device_is_named_as_its_caller_gave_it(tmp_path, capsys, monkeypatch):
    """`device.use("tpu")` said `--device tpu: not a device`, and a CUDA device torch cannot see `use --device
    cpu or numpy`: options a Python caller has not got. From Python `device 'tpu'`; `sop quantize --device`
    keeps its wording."""
    from sop.cli import main
    from sop.quantize import device
    from sop.quantize.inputs import command_line

    with pytest.raises(ValueError, match=r"^device 'tpu': not a device; numpy \(the default\), cpu"):
        with device.use("tpu"):
            pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda:1': .*\(torch [^)]*\); use device 'cpu' or 'numpy'$"):
        device.check("cuda:1")
    with command_line(), pytest.raises(ValueError, match=r"^--device cuda: .*\(torch [^)]*\); use --device cpu "
                                                         r"or numpy$"):
        device.check("cuda")
    assert main(["quantize", "minilm", "--format", "sop4-g16", "--out", str(tmp_path / "x.sopq"),
                 "--device", "gpu"]) == 2
    assert capsys.readouterr().err.startswith("sop: error: --device gpu: not a device; numpy (the default)")
    assert device.active() == device.NUMPY and list(tmp_path.iterdir()) == []


def test_a_refused_checkpoint_names_the_remedy_as_python_callers_give_it(tmp_path, capsys):
    """`quantize_model` on a NaN weight said `--nan-policy zero replaces them with 0`, `open_model` selecting
    nothing `check --include/--exclude`, and `export_model_folder` of a model with no forward pass
    `--model-folder needs a causal LM`: options a Python caller has not got. From Python `nan_policy='zero'`,
    `include/exclude`, `export_model_folder`; the commands keep their options."""
    from safetensors.numpy import save_file

    from sop.cli import main
    from sop.quantize.artifact import quantize_model
    from sop.quantize.hf_export import export_model_folder
    from sop.quantize.models import open_model

    w = weights(16, 64).astype(np.float32)
    save_file({"fc.weight": w}, str(tmp_path / "m.safetensors"))
    w[1, 2] = np.nan
    save_file({"fc.weight": w}, str(tmp_path / "nan.safetensors"))
    nan, ckpt, out = str(tmp_path / "nan.safetensors"), str(tmp_path / "m.safetensors"), tmp_path / "q.sopq"
    kw = {"calibrate": False, "progress": False}
    with pytest.raises(ValueError, match=r": fc\.weight: non-finite weight nan at row 1, column 2 \(1 in the layer\); "
                                         r"nan_policy='zero' replaces them with 0$"):
        quantize_model(nan, "sop4-g16", out, **kw)
    assert main(["quantize", nan, "--format", "sop4-g16", "--out", str(out), "--quiet", "--no-calib"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("; --nan-policy zero replaces them with 0")
    with pytest.raises(ValueError, match=r": no linear layer selected \(1 candidates, check include/exclude\)$"):
        open_model(ckpt, include="nothing*")
    assert main(["quantize", ckpt, "--format", "sop4-g16", "--out", str(out), "--quiet", "--no-calib",
                 "--include", "nothing*"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("(1 candidates, check --include/--exclude)")
    sopq = quantize_model(ckpt, "sop4-g16", out, **kw)["path"]
    with pytest.raises(ValueError, match=r"^\S+: export_model_folder needs a causal LM that transformers runs \("):
        export_model_folder(sopq, tmp_path / "f", progress=False)
    assert main(["dequantize", sopq, "--model-folder", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert ": --model-folder needs a causal LM that transformers runs (" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "nan.safetensors", "q.sopq"]


def test_a_forward_pass_too_large_names_the_switches_as_python_callers_give_them(monkeypatch):
    """A BERT forward pass past the memory available said `--no-calib skips it`, `--no-e2e skips it` from
    `quantize_model` and `evaluate`: from Python `calibrate=False`, `e2e=False`."""
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate

    monkeypatch.setenv("SOP_MEMORY_LIMIT", "1K")
    one = "*.0.attention.self.query*"
    with pytest.raises(ValueError, match=r"^minilm: the forward pass for calibration .*\(SOP_MEMORY_LIMIT=1K\): "
                                         r"calibrate=False skips it \(unweighted search\)$"):
        quantize_model("minilm", "nf4-g64", "never.sopq", include=one, progress=False)
    with pytest.raises(ValueError, match=r"^minilm: the end-to-end check .*\(SOP_MEMORY_LIMIT=1K\): e2e=False skips "
                                         r"it$"):
        evaluate("minilm", ["nf4-g64"], include=one, calibrate=False, progress=False)


def test_make_vectors_names_its_parameters_as_python_callers_give_them(tmp_path):
    """`make_vectors` said `--rows must be a positive number`, `choose another --out` and `write them to separate
    --out folders`: from Python its parameters, `rows` and `out_dir` (`sop vectors` keeps `--out`)."""
    from safetensors.numpy import save_file

    from sop.quantize.inputs import command_line
    from sop.sim.vectors import make_vectors

    ckpt = tmp_path / "m.safetensors"
    save_file({"a/b.weight": weights(16, 64).astype(np.float32), "a_b.weight": weights(16, 64).astype(np.float32)},
              str(ckpt))
    with pytest.raises(ValueError, match=r"^rows must be a positive number of rows, got 0$"):
        make_vectors(str(ckpt), "sop4-g16", None, tmp_path / "v", rows=0)
    for given, said in ((make_vectors, "out_dir"), (None, "--out")):
        with command_line() if given is None else contextlib.nullcontext():
            with pytest.raises(ValueError, match=rf"would share the vector files a_b\.weight\.\*; write them to "
                                                 rf"separate {said} folders$"):
                make_vectors(str(ckpt), "sop4-g16", None, tmp_path / "v")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "vectors.json").symlink_to(ckpt)
    with pytest.raises(ValueError, match=r"refusing to overwrite an input \(choose another out_dir\)$"):
        make_vectors(str(ckpt), "sop4-g16", ["a_b.weight"], tmp_path / "v")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.safetensors", "v", "vectors.json"]


def test_an_empty_cache_dir_is_refused_from_python_as_on_the_command_line(tmp_path, monkeypatch):
    """`quantize_model(..., cache_dir="")` (pathlib's '.') wrote the calibration cache into the working folder,
    where `sop quantize --cache-dir ''` is refused: a ValueError naming `cache_dir`, before any work; without
    calibration the cache is not used, and not refused (as `--no-calib --cache-dir ''` is not)."""
    from sop.quantize import calib as C
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    one = "*.0.attention.self.query*"
    toy = type("Src", (), {"bert_folder": None, "kind": "toy"})()
    for call in (lambda: quantize_model("minilm", "nf4-g64", "q.sopq", include=one, cache_dir="", n_calib=1,
                                        progress=False),
                 lambda: evaluate("minilm", ["nf4-g64"], include=one, e2e=False, cache_dir="", n_calib=1,
                                  progress=False),
                 lambda: C.calibrate(toy, cache_dir="")):
        with pytest.raises(ValueError, match=r"^cache_dir='': an empty name; give the output folder's name \('\.' "
                                             r"for the working folder\)$"):
            call()
    assert list(tmp_path.iterdir()) == []
    assert quantize_model("minilm", "nf4-g64", "q.sopq", include=one, cache_dir="", calibrate=False,
                          progress=False)["layers"] == 1
