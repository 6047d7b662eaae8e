"""Bad input at the command line: every class ends in one line `sop: error: ...` naming the option or
the file and what is wrong, exit 2, before any work and with nothing written; an unexpected internal
error says that it is a bug and how to report it (docs/robustness.md lists every class)."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from sop import cli
from cli_run import run
from sop.cli import main

LAYER = "blk.0.fc.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    path = d / "toy.safetensors"
    save_file({LAYER: (np.random.default_rng(3).standard_normal((16, 64)) * 0.02).astype(np.float32)}, str(path))
    return path


def one_error_line(capsys, argv, code=2) -> str:
    assert run(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# -- numeric options -----------------------------------------------------------------------------------

OPTIONS = {
    # name: (argv after the model, the option named, what is said)
    "budget inf": (["eval", "M", "--format", "sop-budget", "--budget", "inf"], "--budget", "finite number"),
    "budget nan": (["quantize", "M", "--format", "sop-budget", "--budget", "nan", "--out", "O"], "--budget",
                   "finite number"),
    "budget negative": (["eval", "M", "--format", "sop-budget", "--budget", "-4.5"], "--budget", "above 0"),
    "budget not a number": (["eval", "M", "--format", "sop-budget", "--budget", "four"], "--budget",
                            "not a finite number"),
    "calib-sentences zero": (["eval", "M", "--format", "nvfp4", "--calib-sentences", "0"], "--calib-sentences",
                             "integer above 0"),
    "calib-sentences negative": (["quantize", "M", "--format", "nvfp4", "--calib-sentences", "-5", "--out", "O"],
                                 "--calib-sentences", "integer above 0"),
    "calib-sentences above the corpus": (["eval", "M", "--format", "nvfp4", "--calib-sentences", "100000"],
                                         "--calib-sentences", "must be an integer from 1 to"),
    "vectors rows negative": (["vectors", "M", "--format", "sop4-g16", "--rows", "-1", "--out", "O"], "--rows",
                              "integer above 0"),
    "vectors rows zero": (["vectors", "M", "--format", "sop4-g16", "--rows", "0", "--out", "O"], "--rows",
                          "integer above 0"),
    "demo layers zero": (["demo", "--layers", "0"], "--layers", "integer above 0"),
    "report bpw-tol negative": (["report", "M", "--bpw-tol", "-0.1"], "--bpw-tol", "at least 0"),
    "report bpw-tol nan": (["report", "M", "--bpw-tol", "nan"], "--bpw-tol", "finite number"),
    "board timeout negative": (["board", "--port", "P", "M", "--format", "sop4-g16", "--timeout", "-1"],
                               "--timeout", "above 0"),
    "board timeout inf": (["board", "--port", "P", "M", "--format", "sop4-g16", "--timeout", "inf"], "--timeout",
                          "finite number"),
    "board rows negative": (["board", "--port", "P", "M", "--format", "sop4-g16", "--rows", "-3"], "--rows",
                            "integer above 0"),
    "board baud zero": (["board", "--port", "P", "M", "--format", "sop4-g16", "--baud", "0"], "--baud",
                        "integer above 0"),
    "unknown format": (["eval", "M", "--format", "nf5"], "nf5", "valid:"),
    "format in capitals": (["quantize", "M", "--format", "SOP4-G16", "--out", "O"], "'SOP4-G16'",
                           "names are lower case (sop4-g16); valid:"),
    "budget without sop-budget": (["eval", "M", "--format", "nvfp4", "--budget", "4"], "--budget",
                                  "budgeted format"),
    "sop-budget without budget": (["eval", "M", "--format", "sop-budget"], "sop-budget", "needs --budget"),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_a_bad_option_is_one_line_naming_it(ckpt, tmp_path, capsys, case):
    argv, option, said = OPTIONS[case]
    argv = [str(ckpt) if a == "M" else str(tmp_path / "out") if a == "O" else a for a in argv]
    err = one_error_line(capsys, argv)
    assert option in err and said in err, err
    assert list(tmp_path.iterdir()) == []                       # refused before anything was written


def test_an_options_documented_bounds_are_accepted(ckpt, tmp_path, capsys):
    """--seq-len 4 (its least) and --timeout 3600 (its most) are in range: an exclusive bound refused them."""
    assert run(["eval", str(ckpt), "--format", "nvfp4", "--seq-len", "4", "--quiet"]) == 0
    capsys.readouterr()
    run(["board", "--port", str(tmp_path / "no-such-port"), str(ckpt), "--format", "sop4-g16", "--timeout", "3600"])
    err = capsys.readouterr().err
    assert err.startswith("sop: error: ") and "--timeout" not in err, err        # the port, not the option


@pytest.fixture(scope="module")
def padded_ckpt(tmp_path_factory):
    """Two layers, one 40 wide: padded to 48 for the 16-wide SOP blocks (416 real weights, 448 coded)."""
    path = tmp_path_factory.mktemp("cli") / "padded.safetensors"
    rng = np.random.default_rng(5)
    save_file({"a.weight": rng.standard_normal((8, 32)).astype(np.float32),
               "b.weight": rng.standard_normal((4, 40)).astype(np.float32)}, str(path))
    return path


@pytest.mark.parametrize("model, buys", [("ckpt", 512), ("padded_ckpt", 208)])
@pytest.mark.parametrize("cmd", ["eval", "quantize"])
def test_any_budget_above_0_is_capped_or_refused_in_one_line(request, tmp_path, capsys, cmd, model, buys):
    """A finite --budget the parser accepts: 1e308 buys every layer's dearest option (it once
    overflowed into an internal error); one below the cheapest option is one line naming --budget and the
    least budget that runs. --budget counts bits per real weight: with a padded layer too (the least
    budget it named was once per padded weight, and itself refused)."""
    ckpt = request.getfixturevalue(model)
    out = tmp_path / ("r.json" if cmd == "eval" else "q.sopq")
    argv = [cmd, str(ckpt), "--format", "sop-budget", "--quiet", "--no-calib"] + \
        (["--no-e2e", "--json", str(out)] if cmd == "eval" else ["--out", str(out)])
    assert run(argv + ["--budget", "1e308"]) == 0 and out.is_file()
    out.unlink()
    err = one_error_line(capsys, argv + ["--budget", "0.5"])
    assert err.startswith(f"sop: error: --budget is too small: it buys {buys} bits, below the cheapest choice"), err
    assert list(tmp_path.iterdir()) == []
    least = float(err.split("give --budget ")[1].split()[0])        # the budget it names is the least that runs
    assert run(argv + ["--budget", f"{least - 1e-4:.4f}"]) == 2 and not out.exists()
    assert run(argv + ["--budget", f"{least:.4f}"]) == 0 and out.is_file()


# -- paths ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, said", [
    (["eval", "M", "--format", "sop4-g16", "--layers", "x"],
     "sop: error: sop eval: unrecognized arguments: --layers x (see sop eval --help)"),
    (["codebook", "nf4", "extra"], "sop: error: sop codebook: unrecognized arguments: extra (see sop codebook --help)"),
    (["nosuch"], "sop: error: argument COMMAND: invalid choice: 'nosuch'"),
    ([], "sop: error: the following arguments are required: COMMAND (see sop --help)"),
    (["codebook", "nf4", "--x\x1b[31m\nred"],                     # run by the terminal, split in two: escaped
     "sop: error: sop codebook: unrecognized arguments: --x\\x1b[31m red (see sop codebook --help)")])
def test_an_unknown_argument_points_at_its_commands_help(capsys, argv, said):
    """A mistyped option is the subcommand's, so its help is the one to read, not `sop --help`."""
    assert one_error_line(capsys, argv).startswith(said)


@pytest.mark.parametrize("argv", [
    ["quantize", "M", "--format", "sop4-g16", "--format", "nvfp4", "--out", "q.sopq"],
    ["quantize", "M", "--format", "sop-budget", "--budget", "5", "--budget=6", "--out", "q.sopq"],
    ["eval", "M", "--format", "sop-budget", "--budget", "5", "--budget", "6"],
    ["vectors", "M", "--format", "sop4-g16", "--format", "e2m3-ue4m4-g16", "--out", "v"],
    ["board", "M", "--format", "sop4-g16", "--format", "sop4-g16", "--port", "/dev/null"]])
def test_an_option_of_one_value_given_twice_is_refused(tmp_path, monkeypatch, capsys, argv):
    """`sop quantize --format A --format B` wrote B, silently (an outside probe: `sop eval` takes several
    --format); one line naming the option, before any work."""
    opt = "--budget" if "--budget" in argv else "--format"
    monkeypatch.chdir(tmp_path)
    assert one_error_line(capsys, argv).startswith(f"sop: error: sop {argv[0]}: argument {opt}: given twice; "
                                                   f"it takes one value")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,opt", [
    (["eval", "M", "--format", "nvfp4", "--json", "a.json", "--json", "b.json"], "--json"),
    (["eval", "M", "--format", "nvfp4", "--nan-policy", "zero", "--nan-policy=error"], "--nan-policy"),
    (["quantize", "M", "--format", "nvfp4", "--out", "a.sopq", "--out", "b.sopq"], "--out"),
    (["quantize", "M", "--format", "nvfp4", "--out", "a.sopq", "--jobs", "1", "--jobs", "2"], "--jobs"),
    (["dequantize", "q.sopq", "--out", "a.safetensors", "--out", "b.safetensors"], "--out"),
    (["report", "e.json", "--out", "a", "--out", "b"], "--out"),
    (["vectors", "M", "--format", "sop4-g16", "--out", "v", "--rows", "1", "--rows", "2"], "--rows"),
    (["board", "M", "--format", "sop4-g16", "--port", "/dev/a", "--port", "/dev/b"], "--port"),
    (["demo", "--layers", "1", "--layers", "2"], "--layers")])
def test_every_commands_option_of_one_value_given_twice_is_refused(tmp_path, monkeypatch, capsys, argv, opt):
    """Each command kept the last of an option given twice where its author had not marked the option
    (`sop eval --json a.json --json b.json` wrote b.json alone, `sop dequantize --out` twice the second):
    one rule for every option of one value of `sop` (sop.argtypes.ToolParser.options_once)."""
    monkeypatch.chdir(tmp_path)
    assert one_error_line(capsys, argv) == (f"sop: error: sop {argv[0]}: argument {opt}: given twice; it takes "
                                            f"one value (see sop {argv[0]} --help)")
    assert list(tmp_path.iterdir()) == []


def test_every_option_of_one_value_is_once_and_a_list_option_repeats(ckpt, tmp_path, capsys):
    """Every subcommand's option of one value refuses a repeat (an option added later too); --format of
    `sop eval`, --include, --exclude and --layer of `sop vectors` still take several."""
    import argparse

    from sop.argtypes import Once

    _, commands = cli._parser()
    for name, parser in commands.items():
        for action in parser._actions:
            if action.option_strings and action.nargs is None and type(action) is not argparse._HelpAction:
                assert isinstance(action, (Once, argparse._AppendAction)), (name, action.option_strings)
    assert main(["eval", str(ckpt), "--format", "nvfp4", "--format", "nf4-g64", "--include", "blk.*",
                 "--include", "x", "--exclude", "y", "--exclude", "z", "--no-calib", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "\nnvfp4 " in out and "\nnf4-g64 " in out


def test_a_missing_model_names_the_path(tmp_path, capsys):
    err = one_error_line(capsys, ["eval", str(tmp_path / "nope.safetensors"), "--format", "nvfp4"])
    assert "nope.safetensors" in err and "not found" in err


def test_an_artifact_given_where_a_checkpoint_goes_points_at_dequantize(ckpt, tmp_path, capsys):
    """`sop eval X.sopq` said "unsupported file type '.sopq'" (the options walk): an artifact is named as one,
    with the command that decodes it; that command's line counts one tensor as one."""
    art, w = tmp_path / "a.sopq", tmp_path / "w.safetensors"
    assert run(["quantize", str(ckpt), "--format", "nf4-g64", "--no-calib", "--quiet", "--out", str(art)]) == 0
    capsys.readouterr()
    for cmd in (["eval"], ["quantize", "--out", str(tmp_path / "b.sopq")]):
        err = one_error_line(capsys, [cmd[0], str(art), "--format", "nf4-g64", *cmd[1:]])
        assert err == (f"sop: error: {art}: a quantized artifact, not a checkpoint; `sop dequantize {art} --out "
                       f"W.safetensors` decodes it into one (with --model-folder --out DIR, a causal LM's model "
                       f"folder)"), err
    assert run(["dequantize", str(art), "--out", str(w), "--quiet"]) == 0
    assert ": 1 float32 tensor, 1,024 weights (nf4-g64" in capsys.readouterr().out
    assert run(["eval", str(w), "--format", "nf4-g64", "--no-calib", "--quiet"]) == 0


@pytest.mark.parametrize("cmd", ["quantize", "eval"])
def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch, cmd):
    """`sop quantize "$MODEL"` with $MODEL unset: Path('') is '.', and the model folder the command ran
    in was quantized without a word (an outside probe)."""
    save_file({"fc.weight": np.ones((16, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    out = {"quantize": ["--out", "q.sopq"], "eval": ["--json", "e.json"]}[cmd]
    err = one_error_line(capsys, [cmd, "", "--format", "sop4-g16", *out, "--quiet"])
    assert "model '' is an empty name" in err, err
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("argv, option", [
    (["gemv", "a.sopq", "--layer", "fc.weight", "--x", "", "--out", "y.npy"], "--x"),
    (["gemv", "", "--layer", "fc.weight", "--x", "x.npy", "--out", "y.npy"], "file"),
    (["gemv", "a.sopq", "--layer", "", "--x", "x.npy", "--out", "y.npy"], "--layer"),
    (["dequantize", "", "--out", "w.safetensors"], "file"),
    (["report", ""], "json"),
    (["vectors", "M", "--format", "sop4-g16", "--layer", "", "--out", "v"], "--layer"),
    (["board", "--port", "p", "M", "--format", "sop4-g16", "--layer", ""], "--layer"),
])
def test_an_empty_input_or_layer_name_is_refused_as_empty(tmp_path, capsys, monkeypatch, argv, option):
    """Path('') is '.': `sop gemv --x ''` was refused as a folder, `sop report ''` with a repr, `sop vectors
    --layer ''` as an unquoted blank name (an outside probe)."""
    monkeypatch.chdir(tmp_path)
    err = one_error_line(capsys, argv)
    assert f"argument {option}: '': an empty name; give " in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, said", [
    (["dequantize", "a.sopq", "--model-folder", "f"], "the following arguments are required: --out; "),
    (["dequantize", "a.sopq", "--model-folder", "f", "--out", "g"], "unrecognized arguments: f; "),
    (["dequantize", "a.sopq", "--model-folder=f", "--out", "g"], "argument --model-folder: ignored explicit "
                                                                   "argument 'f'; "),
])
def test_a_folder_given_to_model_folder_says_it_takes_no_value(tmp_path, capsys, monkeypatch, argv, said):
    """`sop dequantize A.sopq --model-folder DIR` reads as the folder given: it said only that --out is
    required, then, with one, that DIR is an unrecognized argument, and not why."""
    monkeypatch.chdir(tmp_path)
    err = one_error_line(capsys, argv)
    assert said + "--model-folder takes no value: the folder to write is --out DIR (see sop dequantize --help)" \
        in err, err
    assert os.listdir(tmp_path) == []
    err = one_error_line(capsys, ["dequantize", "a.sopq"])                 # no --model-folder: no hint
    assert err.endswith("the following arguments are required: --out (see sop dequantize --help)"), err
    err = one_error_line(capsys, ["dequantize", "a.sopq", "--model-folder", "--out", "g", "x"])   # not its value
    assert err.endswith("unrecognized arguments: x (see sop dequantize --help)"), err


def test_a_tensor_name_with_escape_sequences_is_printed_escaped(tmp_path, capsys):
    """A tensor name is any string: one holding a terminal's escape sequences (retitle, clear the screen)
    was printed raw in the progress and error lines, and the terminal ran them (an outside probe)."""
    name = "fc\x1b]0;title\x07\x1b[2J\x9b1m\u202e.weight"
    w = np.ones((16, 64), np.float32)
    w[0, 0] = np.nan
    save_file({name: w}, str(tmp_path / "m.safetensors"))
    argv = ["quantize", str(tmp_path / "m.safetensors"), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq")]
    err = one_error_line(capsys, [*argv, "--quiet"])
    assert "fc\\x1b]0;title\\x07\\x1b[2J\\x9b1m\\u202e.weight: non-finite weight" in err, err
    assert run([*argv, "--nan-policy", "zero"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] fc\\x1b]0;title\\x07\\x1b[2J\\x9b1m\\u202e.weight 16x64" in err, err
    assert not any(c in err for c in "\x1b\x07\x9b\u202e"), err
    # a warning naming the tensor, on stderr (`sop eval`'s table on stdout does not repeat it), escaped
    save_file({name: np.ones((16, 64), bool), "ok.weight": np.ones((16, 64), np.float32)},
              str(tmp_path / "b.safetensors"))
    assert run(["eval", str(tmp_path / "b.safetensors"), "--format", "sop4-g16", "--no-calib", "--no-e2e"]) == 0
    out, err = capsys.readouterr()
    assert "(e.g. fc\\x1b]0;title\\x07\\x1b[2J\\x9b1m\\u202e.weight, BOOL)" in err and "(e.g. fc" not in out, err
    for text in (out, err):
        assert not any(c in text for c in "\x1b\x07\x9b\u202e"), text


@pytest.mark.parametrize("cmd", ["dequantize", "report"])
@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "unreadable"])
def test_an_input_that_cannot_be_read_names_the_path(tmp_path, capsys, cmd, kind):
    path = tmp_path / ("x.sopq" if cmd == "dequantize" else "x.json")
    said = {"missing": "no such", "folder": "is a folder", "fifo": "is a FIFO",
            "unreadable": "cannot read"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)                                      # reading one would block forever
    elif kind == "unreadable":
        path = "/proc/self/mem"                              # a regular file whose read fails (EIO), even for root
    argv = {"dequantize": ["dequantize", str(path), "--out", str(tmp_path / "o.safetensors")],
            "report": ["report", str(path), "--out", str(tmp_path / "o")]}[cmd]
    err = one_error_line(capsys, argv)
    assert str(path) in err and said in err, err


@pytest.mark.parametrize("cmd", ["quantize", "vectors"])
def test_an_output_that_cannot_be_written_fails_before_any_work(ckpt, capsys, cmd):
    """/proc refuses new files even to root: the write probe finds it before quantizing."""
    argv = {"quantize": ["quantize", str(ckpt), "--format", "sop4-g16", "--out", "/proc/sop-test.sopq"],
            "vectors": ["vectors", str(ckpt), "--format", "sop4-g16", "--out", "/proc/sop-test"]}[cmd]
    err = one_error_line(capsys, argv)
    assert "/proc/sop-test" in err and "cannot" in err
    assert "linear layers" not in capsys.readouterr().out


def test_a_cache_dir_that_is_a_file_is_refused(ckpt, tmp_path, capsys):
    f = tmp_path / "cache"
    f.write_text("x")
    for cache in (f, f / "sub"):                   # under a file: refused before calibrating, not after
        err = one_error_line(capsys, ["eval", str(ckpt), "--format", "nvfp4", "--cache-dir", str(cache)])
        assert "--cache-dir" in err and f"{f} exists and is not a folder" in err, err


@pytest.mark.parametrize("cmd", ["eval", "quantize"])
def test_a_cache_dir_given_as_the_empty_name_is_refused(tmp_path, capsys, monkeypatch, cmd):
    """`--cache-dir ''` (pathlib's '.'): the calibration cache was written into the working folder, `(cache )`
    in the progress line, exit 0 (an outside probe), where every other empty folder name is refused."""
    monkeypatch.chdir(tmp_path)
    err = one_error_line(capsys, [cmd, "minilm", "--format", "sop4-g16", "--include", "*.0.attention.self.query*",
                                  {"eval": "--json", "quantize": "--out"}[cmd], "r.out", "--cache-dir", "",
                                  "--calib-sentences", "1", "--quiet"])
    assert err == "sop: error: --cache-dir '': an empty name; give the output folder's name ('.' for the working " \
                  "folder)"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", ["eval", "quantize"])
def test_a_cache_dir_in_the_outputs_place_is_refused_before_any_work(tmp_path, capsys, cmd):
    """`--json r.json --cache-dir r.json` (or `--cache-dir r.json/sub`): the output was checked, then the
    calibration made its folder there, and the output was refused after the whole run (an outside probe)."""
    out = tmp_path / "r.json"
    for cache in (out, out / "sub"):
        err = one_error_line(capsys, [cmd, "minilm", "--format", "sop4-g16", "--include", "*.0.attention.self.query*",
                                      {"eval": "--json", "quantize": "--out"}[cmd], str(out), "--cache-dir", str(cache),
                                      "--calib-sentences", "1", "--quiet"])
        assert "the calibration cache folder" in err and "would be made in the output's place" in err, err
        assert not out.exists()


def test_an_unknown_vector_layer_lists_the_layers(ckpt, tmp_path, capsys):
    err = one_error_line(capsys, ["vectors", str(ckpt), "--format", "sop4-g16", "--layer", "x.weight",
                                  "--out", str(tmp_path / "v")])
    assert "x.weight is not a linear layer" in err and LAYER in err


def test_an_unknown_model_layer_names_a_few_layers_and_their_count(tmp_path, capsys):
    """`sop vectors MODEL --layer` and `sop board MODEL --layer` listed every linear layer of a model in their
    one error line (SmolLM2's 210: 4.9 kB); now five and the count, as for an artifact's layer."""
    from sop.synth.host.bringup import model_layer

    path = tmp_path / "m.safetensors"
    rng = np.random.default_rng(4)
    save_file({f"blk.{i}.fc.weight": rng.standard_normal((16, 64)).astype(np.float32) for i in range(12)}, str(path))
    err = one_error_line(capsys, ["vectors", str(path), "--format", "sop4-g16", "--layer", "blk.0.fx.weight",
                                  "--out", str(tmp_path / "v")])
    first = ", ".join(f"blk.{i}.fc.weight" for i in range(5))
    assert err.endswith(f"blk.0.fx.weight is not a linear layer; linear layers: {first}, ... (12 in all)"), err
    with pytest.raises(ValueError) as refused:                                 # `sop board`'s layer
        model_layer(str(path), "sop4-g16", "blk.0.fx.weight")
    assert str(refused.value).endswith(f"no linear layer 'blk.0.fx.weight'; linear layers: {first}, ... (12 in all)")
    assert not (tmp_path / "v").exists()
    art = tmp_path / "m.sopq"                                                   # `sop board ART --layer`
    assert run(["quantize", str(path), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib"]) == 0
    with pytest.raises(ValueError) as refused:
        model_layer(str(art), "sop4-g16", "blk.0.fx.weight")
    assert str(refused.value).endswith(f"no layer 'blk.0.fx.weight'; layers: {first}, ... (12 in all)")


def test_a_vector_layer_naming_the_head_says_how_to_include_it(tmp_path, capsys):
    """`sop vectors` had no --include-lm-head: a head named by --layer was refused with no way to select it,
    and a tied head's matrix is the embedding's (an outside probe)."""
    path = tmp_path / "h.safetensors"
    rng = np.random.default_rng(5)
    save_file({"fc.weight": rng.standard_normal((16, 64)).astype(np.float32),
               "lm_head.weight": rng.standard_normal((32, 64)).astype(np.float32)}, str(path))
    argv = ["vectors", str(path), "--format", "sop4-g16", "--layer", "lm_head.weight", "--out", str(tmp_path / "v")]
    err = one_error_line(capsys, argv)
    assert "lm_head.weight is not a linear layer" in err and "--include-lm-head" in err, err
    assert run([*argv, "--include-lm-head"]) == 0
    assert sorted(f for f in os.listdir(tmp_path / "v") if f.endswith(".blocks.hex")) == ["lm_head.weight.blocks.hex"]
    tied = ["vectors", "smollm2", "--format", "sop4-g16", "--layer", "lm_head.weight", "--out", str(tmp_path / "t")]
    err = one_error_line(capsys, tied)
    assert "(the head is tied to token_embd.weight, one matrix under that name, a layer with --include-lm-head)" in err


def test_vector_layers_whose_files_would_collide_are_refused(tmp_path, capsys):
    path = tmp_path / "c.safetensors"
    w = np.ones((16, 16), np.float32)
    save_file({"a/b.weight": w, "a_b.weight": w}, str(path))
    err = one_error_line(capsys, ["vectors", str(path), "--format", "sop4-g16", "--out", str(tmp_path / "v")])
    assert "would share the vector files" in err


# -- weights that no output could hold --------------------------------------------------------------------

@pytest.mark.parametrize("scale, said", [(1e300, "beyond float32's range"), (1e-300, "below float32's smallest "
                                                                                     "normal number")])
@pytest.mark.parametrize("cmd", ["quantize", "eval", "vectors"])
@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_a_float64_layer_outside_float32_is_refused(tmp_path, capsys, cmd, scale, said, kind):
    """Every reader hands float64 on as float64: a torch file's 1e300 is no 'inf', its 1e-300 no 0."""
    w = np.random.default_rng(0).standard_normal((16, 32)) * scale
    path = tmp_path / f"f64.{kind}"
    if kind == "pt":
        import torch

        torch.save({LAYER: torch.from_numpy(w)}, str(path))
    else:
        save_file({LAYER: w}, str(path))
    out = str(tmp_path / "o")
    argv = {"quantize": ["quantize", str(path), "--format", "sop4-g16", "--out", out + ".sopq", "--quiet"],
            "eval": ["eval", str(path), "--format", "fp8-e4m3-pot", "--quiet"],
            "vectors": ["vectors", str(path), "--format", "sop4-g16", "--out", out]}[cmd]
    err = one_error_line(capsys, argv)
    assert f"{path}: {LAYER}: " in err and said in err


# -- what is not the user's fault ---------------------------------------------------------------------------

def test_an_internal_error_says_it_is_a_bug(monkeypatch, capsys):
    def broken(args):
        raise KeyError("an internal slip")
    monkeypatch.setattr(cli, "cmd_formats", broken)
    assert main(["formats"]) == 70
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: internal error: KeyError") and "This is a bug in sop" in err
    assert "SOP_DEBUG=1" in err and "\n" not in err
    monkeypatch.setenv("SOP_DEBUG", "1")
    with pytest.raises(KeyError):                          # the traceback, for the report
        main(["formats"])


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_formats", interrupted)
    assert main(["formats"]) == 130
    assert capsys.readouterr().err.strip() == "sop: interrupted (SIGINT); no partial file was left"


_CUT_SHORT_IN_A_CONSTRUCTOR = """
import sys
from amaranth.hdl import UnusedElaboratable
from sop import cli
from sop.hdl import block_fields
def cut(args):
    UnusedElaboratable._MustUse__silence = False      # as once a first design is elaborated (sop demo)
    part = object.__new__(block_fields.BlockFields)   # as if the signal stopped MustUse.__new__
    part._MustUse__used = False                       # between its two attributes
    raise KeyboardInterrupt
cli.cmd_demo = cut
sys.exit(cli.main(["demo"]))
"""


def test_ctrl_c_inside_a_parts_constructor_is_still_one_line():
    """Under load (CI, the generate tool) Ctrl-C landed inside Amaranth's constructor of a part: as the
    unwinding freed it its __del__ printed "Exception ignored ... has no attribute '_MustUse__context'"
    after the interrupt line. `sop demo` writes Verilog too."""
    r = subprocess.run([sys.executable, "-c", _CUT_SHORT_IN_A_CONSTRUCTOR], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130 and r.stderr == "sop: interrupted (SIGINT); no partial file was left\n", r.stderr


_CTRL_C_WHILE_IMPORTING = """
import sys
class Interrupt:                        # Ctrl-C lands while sop.cli's imports run
    def find_spec(self, name, path=None, target=None):
        if name == "sop.quantize.models":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from sop.cli import main
"""


def test_ctrl_c_while_the_command_line_starts_is_one_line(tmp_path):
    """A Ctrl-C in the first tenths of a second (the imports, before main runs) was a traceback; so is one
    while the console script (sop.launch) starts the --jobs workers' fork server, before those imports."""
    run = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_IMPORTING], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr) == (130, "sop: interrupted (SIGINT) while starting; nothing was written\n")
    launching = _CTRL_C_WHILE_IMPORTING.replace('"sop.quantize.models"', '"multiprocessing.forkserver"').replace(
        "from sop.cli import main", "sys.argv = ['sop', 'eval', 'minilm', '--jobs', '2']\n"
                                    "from sop.launch import entry\nentry()")
    run = subprocess.run([sys.executable, "-c", launching], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr) == (130, "sop: interrupted (SIGINT) while starting; nothing was written\n")


def test_an_early_start_that_fails_leaves_the_command_to_run(monkeypatch):
    """The console script's early start of the --jobs fork server (sop.launch) only saves time: one that
    fails (a temporary folder it cannot make its socket in: OSError) was a traceback before the command
    ran; now the command runs, and its pool starts the server itself (a failure there is one line)."""
    from sop import launch
    from sop.quantize import job_server

    def no_socket(argv):
        raise OSError(30, "Read-only file system")

    ran = []
    monkeypatch.setattr(job_server, "start_for", no_socket)
    monkeypatch.setattr(cli, "entry", lambda: ran.append(True))
    monkeypatch.setattr(sys, "argv", ["sop", "eval", "minilm", "--jobs", "2"])
    launch.entry()
    assert ran == [True]


_CTRL_C_AS_PYTHON_EXITS = """
import atexit, os, signal, sys, time
import sop.cli as cli
def finished():                         # the command is done; Ctrl-C lands in an atexit callback (torch's)
    print("the table")
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))
    return 0
cli.main = finished
cli.entry()
"""


def test_ctrl_c_while_python_exits_is_no_traceback():
    """A Ctrl-C after the command finished, while Python ran its atexit callbacks, printed ``Exception ignored
    in atexit callback ... KeyboardInterrupt`` and kept exit 0 (seen by an outside probe on `sop eval`); now
    the process ends as interrupted, its output whole."""
    run = subprocess.run([sys.executable, "-c", _CTRL_C_AS_PYTHON_EXITS], capture_output=True, text=True,
                         timeout=120)
    assert (run.returncode, run.stdout, run.stderr) == (-signal.SIGINT, "the table\n", "")


_FINISHED_WITH_OUTPUT = """
import os, sys
import sop.cli as cli
def finished():                         # a command done, its last output still in stdout's buffer
    if sys.argv[1] == "full":
        os.write(1, b"x" * 65536)       # a pipe's capacity: the buffered rest must wait for the reader
    print("y" * 100)
    sys.stderr.write("returning\\n")
    return 0
cli.main = finished
cli.entry()
"""


def _buffered():
    """The environment with standard output buffered as a user's is (this shell may set PYTHONUNBUFFERED)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_ctrl_c_while_the_last_output_waits_on_a_full_pipe_is_no_traceback():
    """A Ctrl-C while the finished command's last output waited on a full pipe (a stalled pager) was a
    KeyboardInterrupt traceback from entry's flush (an outside probe): SIGINT has its default action first."""
    proc = subprocess.Popen([sys.executable, "-c", _FINISHED_WITH_OUTPUT, "full"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_buffered())
    try:
        assert select.select([proc.stderr], [], [], 60)[0] and proc.stderr.readline() == b"returning\n"
        time.sleep(0.5)                                         # the pipe is full: the flush waits
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)           # read nothing first: room in the pipe would let the flush end first
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err, out) == (-signal.SIGINT, b"", b"x" * 65536)


def test_a_reader_gone_before_the_last_output_is_exit_141_and_no_message():
    """``sop quantize ... | true``: the output left in stdout's buffer when main returned met a closed pipe in
    Python's own flush at exit: 'Exception ignored ... BrokenPipeError', exit 120 (an outside probe)."""
    proc = subprocess.Popen([sys.executable, "-c", _FINISHED_WITH_OUTPUT, "short"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_buffered())
    proc.stdout.close()                                         # the reader is gone before sop writes
    code = proc.wait(timeout=60)                                # (its few bytes of stderr fit the pipe)
    with proc.stderr:
        assert (code, proc.stderr.read()) == (128 + signal.SIGPIPE, b"returning\n")


def test_ctrl_c_outside_mains_handler_is_one_line(monkeypatch, capsys):
    """A Ctrl-C while the command line is parsed (before main's handler) or as main returns."""
    def interrupted(argv=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)      # leave pytest's own SIGINT handler alone
    with pytest.raises(SystemExit) as exit_:
        cli.entry()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "sop: interrupted (SIGINT); no partial file was left\n"


def test_a_removed_current_folder_is_one_line(tmp_path):
    """Calibration in a removed working folder ended in torch's ``Intel oneMKL FATAL ERROR``, exit 2, no
    ``sop:`` line; a relative path gave ``[Errno 2] No such file or directory`` naming none."""
    gone = tmp_path / "gone"
    gone.mkdir()
    run = subprocess.run(["bash", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "{sys.executable}" -m sop.cli '
                          f'quantize minilm --format sop4-g16 --out x.sopq'], capture_output=True, text=True,
                         timeout=120)
    assert (run.returncode, run.stderr) == (2, "sop: error: the current folder was removed; change to an existing "
                                               "folder and run again\n")


def test_a_usage_error_is_one_line(capsys):
    err = one_error_line(capsys, ["eval"])
    assert err.startswith("sop: error: sop eval: ") and "required" in err


def test_a_tokenizer_the_library_cannot_load_is_one_line(tmp_path, capsys):
    """A BERT folder whose tokenizer.json is JSON but no tokenizer: the forward pass cannot start."""
    from sop.quantize.models import minilm_folder

    src = minilm_folder()
    for name in ("config.json", "model.safetensors"):
        os.symlink(src / name, tmp_path / name)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    err = one_error_line(capsys, ["eval", str(tmp_path), "--format", "nvfp4", "--quiet"])
    assert "tokenizer.json: not a tokenizer the `tokenizers` library can load" in err


def test_a_bert_tokenizer_json_that_is_a_folder_is_said_to_be_one(tmp_path, capsys):
    """A BERT folder whose tokenizer.json is a folder was taken for a causal LM without a tokenizer, and refused
    for its config.json ("needs cls.predictions.bias"); said to be a folder where the forward pass reads it, so
    that --no-calib --no-e2e, which reads no tokenizer, still quantizes the model."""
    from sop.quantize.models import minilm_folder

    src = minilm_folder()
    for name in ("config.json", "model.safetensors"):
        os.symlink(src / name, tmp_path / name)
    (tmp_path / "tokenizer.json").mkdir()
    one = ["--include", "*layer.0.attention.self.query*", "--quiet", "--cache-dir", str(tmp_path / "c")]
    for extra in ([], ["--no-calib"]):                   # calibration, then the end-to-end check, read it
        err = one_error_line(capsys, ["eval", str(tmp_path), "--format", "nf4-g64", *one, *extra])
        assert err == f"sop: error: {tmp_path / 'tokenizer.json'}: is a folder, not a file: the tokenizer the " \
                      f"BERT forward pass reads", err
    assert run(["eval", str(tmp_path), "--format", "nf4-g64", *one, "--no-calib", "--no-e2e"]) == 0


def test_vectors_into_the_source_models_own_folder_are_refused(tmp_path, capsys):
    """`sop vectors FOLDER --out FOLDER` wrote 5 files a layer into the model's folder, and its `.txt` and
    `vectors.json` became the model's configuration files (recorded by every later `.sopq`): refused as
    `sop dequantize --model-folder` refuses it, in one line; a folder inside the model's is no model folder."""
    model = tmp_path / "m"
    model.mkdir()
    save_file({LAYER: (np.random.default_rng(3).standard_normal((16, 64)) * 0.02).astype(np.float32)},
              str(model / "model.safetensors"))
    for out in (model, tmp_path / "." / "m"):
        err = one_error_line(capsys, ["vectors", str(model), "--format", "sop4-g16", "--rows", "1", "--out", str(out)])
        assert "the output folder is the source model's folder" in err and "--out" in err, err
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]
    assert run(["vectors", str(model), "--format", "sop4-g16", "--rows", "1", "--out", str(model / "v")]) == 0


def test_a_reader_gone_at_the_eval_table_still_leaves_the_json(tmp_path, capsys, monkeypatch):
    """`sop eval ... --json F | head -1`: the table's print met the gone reader (exit 141, as it should) before
    F was written, so the run's results were lost (an adversarial review). F is now written before the table."""
    from sop.quantize import evaluate

    def reader_gone(doc):
        raise BrokenPipeError(32, "Broken pipe")            # what the print of the table meets

    monkeypatch.setattr(evaluate, "format_table", reader_gone)
    out = tmp_path / "r.json"
    code = main(["eval", "minilm", "--format", "nf4-g64", "--include", "*layer.0.attention.self.query*",
                 "--no-e2e", "--no-calib", "--quiet", "--json", str(out)])
    assert code == 128 + signal.SIGPIPE and capsys.readouterr().err == ""
    assert list(json.loads(out.read_text())["formats"]) == ["nf4-g64"]


def test_a_json_that_cannot_be_written_after_the_eval_still_prints_the_table(tmp_path, capsys, monkeypatch):
    """F written before the table (above) lost the whole run's results when F could not be written at the end
    (a full disk): the table was no longer printed, only the error. The table comes, then the one error line."""
    import errno

    from sop.quantize import evaluate

    def disk_full(path, doc):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate, "write_json", disk_full)
    out = tmp_path / "r.json"
    code = main(["eval", "minilm", "--format", "nf4-g64", "--include", "*layer.0.attention.self.query*",
                 "--no-e2e", "--no-calib", "--quiet", "--json", str(out)])
    said = capsys.readouterr()
    assert code == 2 and said.out.splitlines()[0].startswith("model minilm "), said.out
    assert [line for line in said.out.splitlines() if line.startswith("nf4-g64 ")], said.out
    err = said.err.strip()
    assert err.startswith("sop: error: ") and "No space left on device" in err and "\n" not in err, err
