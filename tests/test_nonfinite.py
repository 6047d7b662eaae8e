"""No silent non-finite or wrong numbers: a finite weight never becomes Inf or NaN in any output of any
format (float32 files saturate, like BF16), the metrics are right at the ends of float64's range, and
never report a failure as a success (docs/formats.md section 4, docs/robustness.md)."""

import math
from fractions import Fraction

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cli_run import run
from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.formats import FLOAT32_MAX, to_float32
from sop.quantize import artifact as A
from sop.quantize.schemes import quant_formats
from sop.quantize.metrics import ErrorStats, aggregate

LAYER = "blk.0.fc.weight"
FORMATS = list(quant_formats())


@pytest.fixture(scope="module")
def near_max(tmp_path_factory):
    """A float32 layer whose largest weights are within 3 % of float32's maximum, both signs."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 64))
    w = w / np.abs(w).max() * 0.97 * FLOAT32_MAX
    w[0, :4] = [FLOAT32_MAX, -FLOAT32_MAX, np.nextafter(FLOAT32_MAX, 0), 0.0]
    path = tmp_path_factory.mktemp("max") / "max.safetensors"
    save_file({LAYER: w.astype(np.float32)}, str(path))
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_near_the_float32_maximum_stay_finite_in_every_format(near_max, tmp_path, capsys, fmt):
    budget = ["--budget", "5"] if fmt == "sop-budget" else []
    art, out = tmp_path / "q.sopq", tmp_path / "w.safetensors"
    assert main(["quantize", str(near_max), "--format", fmt, "--out", str(art), "--quiet", *budget]) == 0
    said = capsys.readouterr().out
    sqnr = float(said.split("SQNR ")[1].split(" dB")[0])
    assert math.isfinite(sqnr) and sqnr > 5, said                  # a real figure, not nan or inf
    assert main(["dequantize", str(art), "--out", str(out), "--quiet"]) == 0
    w = load_file(str(out))[LAYER]
    assert np.isfinite(w).all()
    assert np.abs(w).max() <= FLOAT32_MAX
    a = A.open_artifact(art)
    for e in a.layers:                                   # the hardware's BF16 output saturates too
        if (s := a.stream(e)) is not None:
            assert np.isfinite(decode_layer(s, "bf16")).all() and np.isfinite(decode_layer(s, "exact")).all()


def test_the_float32_output_rule_rounds_to_nearest_and_saturates():
    big = float(np.nextafter(np.float32(FLOAT32_MAX), np.float32(0)))     # the float32 below the maximum
    half_ulp = (FLOAT32_MAX - big) / 2
    x = np.array([FLOAT32_MAX + half_ulp * 0.99, FLOAT32_MAX * 2, -1e300, 1e-50, -0.0, 1.0 + 2.0 ** -24,
                  1.0 + 3 * 2.0 ** -24, np.nan])
    y = to_float32(x)
    assert y.dtype == np.float32
    assert y[0] == FLOAT32_MAX and y[1] == FLOAT32_MAX and y[2] == -FLOAT32_MAX
    assert y[3] == 0 and np.signbit(y[4])
    assert y[5] == np.float32(1.0) and y[6] == np.float32(1.0 + 2.0 ** -22)      # ties to even
    assert np.isnan(y[7])
    with np.errstate(over="ignore"):
        plain = x.astype(np.float32)                        # the check catches a cast that does not saturate
    assert np.isinf(plain[1])


# -- the metrics --------------------------------------------------------------------------------------------

def exact_sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    """SQNR from exact rational sums: the reference, free of overflow and underflow."""
    sig = sum(Fraction(float(v)) ** 2 for v in w.ravel())
    noise = sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(w.ravel(), q.ravel()))
    return 10 * (math.log10(sig.numerator) - math.log10(sig.denominator)
                 - math.log10(noise.numerator) + math.log10(noise.denominator))


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1.0, 1e150, 1e300])
def test_sqnr_is_right_across_the_float64_range(scale):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((6, 16)) * scale
    q = w * (1 + rng.standard_normal(w.shape) * 1e-3)
    s = ErrorStats.of(w, q)
    assert s.sqnr_db == pytest.approx(exact_sqnr_db(w, q), abs=1e-9)
    assert 0.999 < s.acos <= 1.0
    total = aggregate([s, ErrorStats.of(w / scale, q / scale)])        # layers of very different scales add
    assert total.sqnr_db == pytest.approx(exact_sqnr_db(np.concatenate([w / scale, w]),
                                                         np.concatenate([q / scale, q])), abs=1e-9)


def test_an_all_zero_reconstruction_of_a_nonzero_layer_is_0_db_not_inf():
    w = np.full((2, 16), 1e-300)
    s = ErrorStats.of(w, np.zeros_like(w))
    assert s.sqnr_db == 0.0 and s.acos == 0.0 and s.rel_mse == 1.0
    unscaled = float((w * w).sum()), float(((w - 0) ** 2).sum())        # what squaring directly gives
    assert unscaled == (0.0, 0.0)                                          # ... the old "inf dB"


def test_a_non_finite_reconstruction_is_a_bug_not_a_figure():
    w = np.ones((2, 16))
    q = w.copy()
    q[1, 3] = np.inf
    with pytest.raises(RuntimeError, match="not finite"):
        ErrorStats.of(w, q)
    # a NaN in the reconstruction (not in the weight) gave SQNR nan and max_abs_err 0.0 without a word: the
    # peak was Python's max(finite, nan), which keeps the first (an outside probe)
    q[1, 3] = np.nan
    with pytest.raises(RuntimeError, match="not finite"):
        ErrorStats.of(w, q)
    with pytest.raises(RuntimeError, match="not finite"):
        ErrorStats.of(q, w)


# -- a float64 checkpoint: the same numbers, refusals and results from torch as from safetensors ------------

def float64_checkpoints(tmp_path, w: np.ndarray) -> list:
    """The float64 layer ``w`` as safetensors, a torch zip (read memory-mapped) and a legacy torch pickle."""
    import torch

    files = [tmp_path / "w.safetensors", tmp_path / "w.pt", tmp_path / "w.bin"]
    save_file({LAYER: w}, str(files[0]))
    torch.save({LAYER: torch.from_numpy(w)}, files[1])
    torch.save({LAYER: torch.from_numpy(w)}, files[2], _use_new_zipfile_serialization=False)
    return files


def out_of_float32(case: str) -> np.ndarray:
    w = np.random.default_rng(4).standard_normal((16, 32))
    if case == "1e300":
        w[2, 3] = 1e300
    elif case == "-1e300 and a NaN":
        w[2, 3], w[0, 0] = -1e300, np.nan
    elif case == "one ulp past FLT_MAX":                 # said to full precision, not as FLT_MAX itself
        w[2, 3] = np.nextafter(float(np.finfo(np.float32).max), np.inf)
    else:                                                # a float64 subnormal everywhere: float32's 0
        w = np.full((16, 32), 1e-320)
    return w


REFUSED = {("1e300", "error"): "weight 1e+300 at row 2, column 3 is beyond float32's range",
           ("1e300", "zero"): "weight 1e+300 at row 2, column 3 is beyond float32's range",
           ("-1e300 and a NaN", "error"): "non-finite weight nan at row 0, column 0 (1 in the layer)",
           ("-1e300 and a NaN", "zero"): "weight -1e+300 at row 2, column 3 is beyond float32's range",
           ("one ulp past FLT_MAX", "error"): "weight 3.402823466385289e+38 at row 2, column 3 is beyond "
                                               "float32's range (+-3.4028234663852886e+38)",
           ("1e-320 everywhere", "error"): "every weight lies below float32's smallest normal number",
           ("1e-320 everywhere", "zero"): "every weight lies below float32's smallest normal number"}


@pytest.mark.parametrize("case, policy", list(REFUSED))
@pytest.mark.parametrize("cmd", ["eval", "quantize"])
def test_a_float64_checkpoint_is_refused_alike_from_torch_and_safetensors(tmp_path, capsys, case, policy, cmd):
    """A finite float64 weight that float32 cannot hold is refused from every file kind with the same
    line, naming the file: never read as Inf (which --nan-policy zero would zero) or as a layer of
    zeros."""
    files = float64_checkpoints(tmp_path, out_of_float32(case))
    lines = []
    for f in files:
        out = ["--json", tmp_path / "e.json"] if cmd == "eval" else ["--out", tmp_path / "q.sopq"]
        assert run([cmd, f, "--format", "sop4-g16", "--nan-policy", policy, "--quiet", *out]) == 2, f
        err = capsys.readouterr().err
        assert err.startswith(f"sop: error: {f}: {LAYER}: ") and err.count("\n") == 1, err
        lines.append(err.replace(str(f), "FILE"))
    assert REFUSED[case, policy] in lines[0] and lines[1:] == lines[:-1], lines
    assert sorted(tmp_path.iterdir()) == sorted(files)                    # nothing written


@pytest.mark.parametrize("fmt", ["sop4-g16", "fp8-e4m3-pot", "nvfp4"])
def test_a_float64_torch_checkpoint_quantizes_bit_for_bit_like_its_safetensors(tmp_path, capsys, fmt):
    """Weights that are no float32 (read unrounded from every kind): the same records, choices and
    measured error, whether the layer comes from safetensors or torch."""
    files = float64_checkpoints(tmp_path, np.random.default_rng(8).standard_normal((32, 48)) * 0.05)
    made = []
    for f in files:
        art = tmp_path / f"{f.suffix[1:]}.sopq"
        assert run(["quantize", f, "--format", fmt, "--out", art, "--quiet"]) == 0
        a = A.open_artifact(art)
        made.append((a.meta["summary"], [e.as_dict() for e in a.layers], [a.record(e) for e in a.layers]))
    capsys.readouterr()
    assert made[1] == made[0] and made[2] == made[0]


# -- a crafted artifact: an f32 record holding NaN or Inf, every CRC good ------------------------------------

BASELINE_LAYERS = {"blk.0.fc.weight": (16, 48), "h.0.attn.c_attn.weight": (32, 96)}   # the second transposed


@pytest.fixture(scope="module")
def baseline_sopq(tmp_path_factory):
    """An fp8-e4m3-pot artifact: its layers are f32 records."""
    d = tmp_path_factory.mktemp("f32")
    rng = np.random.default_rng(12)
    save_file({n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in BASELINE_LAYERS.items()},
              str(d / "m.safetensors"))
    assert main(["quantize", str(d / "m.safetensors"), "--format", "fp8-e4m3-pot", "--out", str(d / "b.sopq"),
                 "--quiet"]) == 0
    return d / "b.sopq"


def with_f32_value(sopq, dest, layer: int, r: int, c: int, value: float) -> tuple:
    """``sopq`` with ``value`` at row r, column c of layer ``layer``'s f32 record, written to ``dest`` with
    every CRC recomputed; (the layer's name, the value as float32 prints it)."""
    from test_fuzz_files import container, f32_record_edit, split

    meta, body = split(sopq.read_bytes())
    e = meta["layers"][layer]
    dest.write_bytes(container(meta, f32_record_edit(meta, body, layer, {r * e["shape"][1] + c: value})))
    return e["name"], str(np.float32(value))


@pytest.mark.parametrize("layer, value", [(0, np.nan), (1, np.inf), (1, -np.inf)])
def test_a_non_finite_float32_record_is_refused_not_written(baseline_sopq, tmp_path, capsys, layer, value):
    """sop never writes one (its float32 rule saturates), so the CRCs prove nothing: the record is
    refused where it is read, naming the file and the layer, and no output file is left."""
    bad = tmp_path / "x.sopq"
    name, said = with_f32_value(baseline_sopq, bad, layer, 3, 5, value)
    art = A.open_artifact(bad)                           # the CRCs are good: the refusal is the record's own
    with pytest.raises(A.ArtifactError) as info:
        art.weights(art.layers[layer])
    assert str(info.value).startswith(f"{bad}: layer {name}: float32 record holds 1 non-finite value "
                                      f"(the first, {said}, at row 3, column 5)"), info.value
    assert np.isfinite(art.weights(art.layers[1 - layer])).all()           # the other layer reads
    assert run(["dequantize", bad, "--out", tmp_path / "w.safetensors", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"sop: error: {info.value}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.sopq"]        # no output, no temporary file
    with_f32_value(baseline_sopq, bad, layer, 3, 5, 0.5)                   # the control: a finite value
    assert run(["dequantize", bad, "--out", tmp_path / "w.safetensors", "--quiet"]) == 0


def test_a_non_finite_float32_record_is_refused_by_the_model_folder_export(tmp_path, capsys):
    """`sop dequantize --model-folder` reads the records through the same check: one line, no folder."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

    from sop.quantize import calib as C
    from test_causal_lm import make_folder

    tk = Tokenizer(models.BPE())                        # test_causal_lm's tokenizer, trained on less text
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(C.corpus()[:50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = make_folder(tmp_path / "llama", "llama",
                         PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>"))
    good, bad, out = tmp_path / "g.sopq", tmp_path / "x.sopq", tmp_path / "out"
    assert main(["quantize", str(folder), "--format", "fp8-e4m3-pot", "--out", str(good), "--quiet",
                 "--no-calib", "--include", "model.layers.0.mlp.*"]) == 0
    name, _ = with_f32_value(good, bad, 1, 2, 7, np.nan)
    assert run(["dequantize", bad, "--model-folder", "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sop: error: {bad}: layer {name}: float32 record holds 1 non-finite value (the "
                          f"first, nan, at row 2, column 7)") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with_f32_value(good, bad, 1, 2, 7, 0.5)                                # the control: a finite value
    assert run(["dequantize", bad, "--model-folder", "--out", out, "--quiet"]) == 0
