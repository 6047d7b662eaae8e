"""`sop gemv`: y = W x of one layer of a .sopq artifact by the golden dot-product engine (golden/dot.py),
1-D and batched, BF16 and E4M3 activations, the padding of a width that is not a whole number of
blocks; every bad input one line `sop: error: ...` (exit 2) naming what is wrong, with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli_run import run
from sop.cli import main
from sop.golden import dot
from sop.golden.formats import FORMATS
from sop.quantize.artifact import open_artifact

BF16, E4M3 = FORMATS["bf16"], FORMATS["e4m3"]
# a width that is not a multiple of 16 (padded to 48 in the stream) and a plain one
SHAPES = {"blk.0.fc.weight": (24, 40), "blk.1.proj.weight": (16, 32)}
PADDED = "blk.0.fc.weight"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemv")
    rng = np.random.default_rng(5)
    ckpt = d / "toy.safetensors"
    save_file({n: torch.from_numpy((rng.standard_normal(s) * 0.1).astype(np.float32)) for n, s in SHAPES.items()},
              str(ckpt))
    out = {}
    for fmt in ("sop4-g16", "fp8-e4m3-pot"):
        out[fmt] = d / f"toy-{fmt}.sopq"
        assert main(["quantize", str(ckpt), "--format", fmt, "--out", str(out[fmt]), "--quiet", "--no-calib"]) == 0
    return out


def one_error_line(capsys, argv) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def vectors(rng, shape, fmt=BF16) -> np.ndarray:
    return fmt.quantize(rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("fmt", [BF16, E4M3])
@pytest.mark.parametrize("batch", [None, 3])
def test_gemv_is_the_golden_engine_on_the_layer(artifacts, tmp_path, capsys, fmt, batch):
    art = open_artifact(artifacts["sop4-g16"])
    entry = art.entry(PADDED)
    stream = art.stream(entry)
    assert stream is not None and stream.cols == 48 and entry.shape == (24, 40)
    shape = (40,) if batch is None else (batch, 40)
    x = vectors(np.random.default_rng(1), shape, fmt)
    np.save(tmp_path / "x.npy", x)
    argv = ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", tmp_path / "x.npy", "--out", tmp_path / "y.npy"]
    assert run(argv + ["--x-format", fmt.name]) == 0
    assert "wrote" in capsys.readouterr().out
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == ((24,) if batch is None else (batch, 24))
    padded = np.concatenate([x, np.zeros((*x.shape[:-1], 8), np.float32)], axis=-1)
    assert np.array_equal(y.view(np.uint32), dot.gemv(stream, padded, fmt.name).view(np.uint32))
    # and it is W x: the dequantized weights (padding cropped) in float64, within FP32 rounding
    w = art.weights(entry).astype(np.float64)
    assert np.allclose(y, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-6)


def test_bf16_is_the_default_activation_format(artifacts, tmp_path):
    x = vectors(np.random.default_rng(2), (32,))
    np.save(tmp_path / "x.npy", x)
    base = ["gemv", artifacts["sop4-g16"], "--layer", "blk.1.proj.weight", "--x", tmp_path / "x.npy"]
    assert run(base + ["--out", tmp_path / "a.npy"]) == 0
    assert run(base + ["--out", tmp_path / "b.npy", "--x-format", "bf16"]) == 0
    assert np.load(tmp_path / "a.npy").tobytes() == np.load(tmp_path / "b.npy").tobytes()


def bad_x(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


CASES = {
    # name: (X content, or a callable writing it; what the error says)
    "wrong length": (np.zeros(39, np.float32), "has 39 entries per vector; layer blk.0.fc.weight takes 40"),
    "nan": (np.where(np.arange(40) == 7, np.nan, 0).astype(np.float32), "x[7] = nan is not finite"),
    "inf in a batch": (np.where(np.arange(80).reshape(2, 40) == 45, -np.inf, 1).astype(np.float32),
                       "x[1, 5] = -inf is not finite"),
    "not bf16": (np.where(np.arange(40) == 3, 1 + 2.0 ** -12, 0).astype(np.float32),
                 "x[3] = 1.000244140625 is not exactly representable in bf16"),
    "float64": (np.zeros(40), "must be float32, got float64"),
    "int": (np.zeros(40, np.int32), "must be float32, got int32"),
    "3-D": (np.zeros((1, 2, 40), np.float32), "1-D (in,) or 2-D (batch, in)"),
    "empty batch": (np.zeros((0, 40), np.float32), "nonempty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_activations_are_refused_naming_the_element(artifacts, tmp_path, capsys, case):
    content, said = CASES[case]
    x = bad_x(tmp_path, "x.npy", content)
    out = tmp_path / "y.npy"
    err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", x, "--out", out])
    assert said in err and str(x) in err, err
    assert not out.exists()


def test_e4m3_refuses_what_e4m3_does_not_hold(artifacts, tmp_path, capsys):
    x = bad_x(tmp_path, "x.npy", np.full(40, 500.0, np.float32))       # beyond E4M3's 448
    err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", x, "--x-format", "e4m3",
                                  "--out", tmp_path / "y.npy"])
    assert "x[0] = 500.0 is not exactly representable in e4m3" in err


def test_files_that_are_not_one_npy_array(artifacts, tmp_path, capsys):
    text = tmp_path / "x.txt"
    text.write_text("1 2 3\n")
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros(40, np.float32))
    for path, said in ((text, "not a .npy array (no .npy header"), (npz, "an .npz archive"),
                       (tmp_path / "missing.npy", "no such --x file"), (tmp_path, "is a folder")):
        err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", path,
                                      "--out", tmp_path / "y.npy"])
        assert said in err, err


def test_a_npy_header_claiming_terabytes_is_refused_naming_the_file(artifacts, tmp_path, capsys):
    """The header is trusted for nothing: 10**12 claimed float32 values in a 200-byte file are a
    truncated file, not a 4 TB allocation (an out-of-memory error that names no file)."""
    x = tmp_path / "x.npy"
    with open(x, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        f.write(bytes(40 * 4))
    err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", x,
                                  "--out", tmp_path / "y.npy"])
    assert str(x) in err and "truncated" in err, err


def test_an_unknown_layer_lists_valid_ones_and_a_float32_layer_is_refused(artifacts, tmp_path, capsys):
    x = bad_x(tmp_path, "x.npy", np.zeros(40, np.float32))
    err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", "blk.9.nope", "--x", x,
                                  "--out", tmp_path / "y.npy"])
    assert "'blk.9.nope' is not a layer" in err and "blk.0.fc.weight" in err and "blk.1.proj.weight" in err
    err = one_error_line(capsys, ["gemv", artifacts["fp8-e4m3-pot"], "--layer", PADDED, "--x", x,
                                  "--out", tmp_path / "y.npy"])
    assert "stored decoded as float32" in err
    err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--x", x, "--out", tmp_path / "y.npy"])
    assert "--layer" in err
    err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", x, "--x-format", "fp16",
                                  "--out", tmp_path / "y.npy"])
    assert "--x-format" in err


def test_the_output_never_replaces_an_input_and_a_failed_run_keeps_the_old_output(artifacts, tmp_path, capsys):
    x = bad_x(tmp_path, "x.npy", np.ones(40, np.float32))
    before_x, before_art = x.read_bytes(), artifacts["sop4-g16"].read_bytes()
    for out in (x, artifacts["sop4-g16"]):
        err = one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", x, "--out", out])
        assert "refusing to overwrite an input" in err
    assert x.read_bytes() == before_x and artifacts["sop4-g16"].read_bytes() == before_art
    out = tmp_path / "y.npy"
    out.write_bytes(b"old")
    bad = bad_x(tmp_path, "bad.npy", np.full(40, np.nan, np.float32))
    one_error_line(capsys, ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", bad, "--out", out])
    assert out.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".sop-tmp")]


@pytest.mark.parametrize("name", ["y.sopq", "y.safetensors", "y.GGUF", "y.bin", "y.pt", "y.pth"])
def test_an_output_named_as_a_model_or_an_artifact_is_refused(artifacts, tmp_path, capsys, name):
    """`sop gemv --out y.sopq` wrote the .npy array there, and every model reader takes a file by its name's
    ending (`sop vectors y.sopq`: a damaged artifact), where `sop quantize` / `dequantize` refuse an output
    named as the other's (an outside walk through the options); another name is written, numpy reads it."""
    x = bad_x(tmp_path, "x.npy", vectors(np.random.default_rng(2), 40))
    argv = ["gemv", artifacts["sop4-g16"], "--layer", PADDED, "--x", x, "--out"]
    err = one_error_line(capsys, [*argv, tmp_path / name])
    assert err.endswith(f"name it {tmp_path / 'y.npy'}") and not (tmp_path / name).exists()
    assert run([*argv, tmp_path / "y.out"]) == 0 and run([*argv, tmp_path / "y.npy"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.out"), np.load(tmp_path / "y.npy"))


@pytest.mark.parametrize("option", ["--layer", "--x", "--x-format", "--out"])
def test_an_option_given_twice_is_refused_not_the_last_taken(artifacts, tmp_path, capsys, option):
    """`sop gemv --layer A --layer B` computed B alone and said nothing (`sop vectors` takes several
    --layer, so a user may think two run): each option of `sop gemv`, and `sop board`'s --layer and --x,
    is refused when given twice, with nothing written."""
    x1, x2 = (bad_x(tmp_path, name, vectors(np.random.default_rng(1), 40, E4M3)) for name in ("x1.npy", "x2.npy"))
    values = {"--layer": [PADDED, "blk.1.proj.weight"], "--x": [x1, x2], "--x-format": ["bf16", "e4m3"],
              "--out": [tmp_path / "y1.npy", tmp_path / "y2.npy"]}
    argv = ["gemv", artifacts["sop4-g16"]]
    for opt, (first, second) in values.items():
        argv += [opt, first, opt, second] if opt == option else [opt, second]
    err = one_error_line(capsys, argv)
    assert f"argument {option}: given twice" in err
    assert not list(tmp_path.glob("y*"))
    if option in ("--layer", "--x"):                          # refused before the port is opened
        first, second = values[option]
        err = one_error_line(capsys, ["board", "--port", tmp_path / "no-port", artifacts["sop4-g16"], "--format",
                                      "sop4-g16", "--gemv", option, first, option, second])
        assert f"argument {option}: given twice" in err
