"""Outputs never destroy inputs (golden.files): every writing command refuses, before any work,
a target that is one of its inputs (through symbolic and hard links) or that exists and is not a
regular file; a writer killed at any point leaves the old target intact, no partial file under the
final name, and no temporary file once the next write to that target has run."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sop.cli import main
from sop.golden import files as G
from sop.quantize.artifact import dequantize, open_artifact, quantize_model

LAYER = "blk.0.fc.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A toy checkpoint, its .sopq artifact and an eval JSON, made through the CLI."""
    d = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(7)
    ckpt = d / "toy.safetensors"
    save_file({LAYER: (rng.standard_normal((16, 64)) * 0.02).astype(np.float32)}, str(ckpt))
    sopq, js = d / "toy.sopq", d / "toy.json"
    assert main(["quantize", str(ckpt), "--format", "sop4-g16", "--out", str(sopq), "--quiet"]) == 0
    assert main(["eval", str(ckpt), "--format", "sop4-g16", "--json", str(js), "--quiet"]) == 0
    return {"ckpt": ckpt, "sopq": sopq, "json": js}


def snapshot(paths) -> dict:
    return {p: (Path(p).read_bytes(), os.stat(p).st_ino) for p in paths}


def commands(f, out):
    """Every writing command, with ``out`` as its output."""
    return {
        "quantize": ["quantize", str(f["ckpt"]), "--format", "sop4-g16", "--out", str(out), "--quiet"],
        "dequantize": ["dequantize", str(f["sopq"]), "--out", str(out), "--quiet"],
        "eval": ["eval", str(f["ckpt"]), "--format", "sop4-g16", "--json", str(out), "--quiet"],
        "report": ["report", str(f["json"]), "--out", str(out)],
    }


def refused(capsys, argv, *phrases) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err, err
    for p in phrases:
        assert p in err, err
    return err


# -- the output is an input ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "new folder/.."])
@pytest.mark.parametrize("cmd", ["quantize", "dequantize", "eval"])
def test_an_output_that_is_an_input_is_refused(files, tmp_path, capsys, cmd, how):
    src = {"quantize": files["ckpt"], "eval": files["ckpt"], "dequantize": files["sopq"]}[cmd]
    out = src
    if how == "new folder/..":                     # the writer would make 'new', then '..' leads back
        out = src.parent / f"new-{cmd}" / ".." / src.name
    elif how != "same path":
        out = tmp_path / f"alias{src.suffix}"
        (os.symlink if how == "symlink" else os.link)(src, out)
    before = snapshot([src])
    refused(capsys, commands(files, out)[cmd], "is the input", "refusing to overwrite an input")
    assert snapshot([src]) == before
    assert not (src.parent / f"new-{cmd}").exists()


def test_an_output_that_is_an_input_is_named_as_the_caller_gave_it(files, capsys):
    """From Python the refusal said `(choose another --out)`, an option that `quantize_model(..., out)` and
    `dequantize(..., out)` have not got: `out` there. The commands keep `--out`, and `sop eval` names its own
    `--json` (it said `--out`, which it has not got either)."""
    before = snapshot([files["ckpt"], files["sopq"]])
    for call in (lambda: quantize_model(str(files["ckpt"]), "sop4-g16", files["ckpt"], progress=False),
                 lambda: dequantize(str(files["sopq"]), files["sopq"], progress=False)):
        with pytest.raises(G.OutputError, match=r": the output is the input .*; refusing to overwrite an input "
                                                r"\(choose another out\)$"):
            call()
    for cmd, option in (("quantize", "--out"), ("dequantize", "--out"), ("eval", "--json")):
        src = files["sopq"] if cmd == "dequantize" else files["ckpt"]
        err = refused(capsys, commands(files, src)[cmd], "is the input")
        assert err.endswith(f"refusing to overwrite an input (choose another {option})"), err
    assert snapshot([files["ckpt"], files["sopq"]]) == before


def test_dequantize_never_writes_over_the_checkpoint_the_artifact_was_made_from(files, tmp_path, capsys):
    """The artifact names its source: decoding it over the source checkpoint would keep its quantized
    layers alone and lose every other tensor (a bias, the embeddings), so that is refused like an input;
    and so is the config.json the loader read beside it."""
    ckpt = tmp_path / "model.safetensors"
    save_file({LAYER: np.ones((16, 64), np.float32), "blk.0.fc.bias": np.ones(16, np.float32)}, str(ckpt))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    art = tmp_path / "q.sopq"
    assert main(["quantize", str(ckpt), "--format", "sop4-g16", "--out", str(art), "--quiet"]) == 0
    before = snapshot([ckpt, tmp_path / "config.json"])
    for out in (ckpt, tmp_path / "config.json"):
        refused(capsys, ["dequantize", str(art), "--out", str(out), "--quiet"], "is the input")
    assert snapshot([ckpt, tmp_path / "config.json"]) == before


def quantize_then_go_elsewhere(tmp_path, monkeypatch, spec: str) -> None:
    """`sop quantize SPEC --out q.sopq` run in tmp_path, then the working folder tmp_path/elsewhere."""
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", spec, "--format", "sop4-g16", "--out", "q.sopq", "--quiet"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")


@pytest.mark.parametrize("given", ["file", "folder"])
def test_dequantize_run_from_another_folder_never_writes_over_the_source(tmp_path, capsys, monkeypatch, given):
    """The header records the source as `sop quantize` was given it, relative to the folder it ran in:
    from another folder that path names nothing, and `sop dequantize --out ../model.safetensors` replaced
    the checkpoint with its quantized layers alone (an outside probe). The files are found by their
    contents (the model fingerprint); a copy under another name, or a new file, is written."""
    model = tmp_path / "m"
    model.mkdir()
    ckpt = model / "model.safetensors"
    save_file({LAYER: np.ones((16, 64), np.float32), "blk.0.fc.bias": np.ones(16, np.float32)}, str(ckpt))
    (model / "config.json").write_text("{}")
    quantize_then_go_elsewhere(tmp_path, monkeypatch, "m/model.safetensors" if given == "file" else "m")
    before = snapshot([ckpt, model / "config.json"])
    for out in ("../m/model.safetensors", "../m/config.json"):
        err = refused(capsys, ["dequantize", "../q.sopq", "--out", out, "--quiet"], "a file of the checkpoint q.sopq",
                      "refusing to overwrite an input")
        assert err.endswith("(choose another --out)"), err
        with pytest.raises(G.OutputError, match=r"a file of the checkpoint q\.sopq .* \(choose another out\)$"):
            dequantize("../q.sopq", out, progress=False)            # Python's name: it has no --out
    assert snapshot([ckpt, model / "config.json"]) == before
    (tmp_path / "copy.safetensors").write_bytes(ckpt.read_bytes())
    for out in ("../copy.safetensors", "model.safetensors"):
        assert main(["dequantize", "../q.sopq", "--out", out, "--quiet"]) == 0
    import sop.quantize.artifact as A                  # an earlier output of the checkpoint: its header tells,
    monkeypatch.setattr(A, "files_fingerprint", None)  # nothing is hashed (a model's GBs)
    assert main(["dequantize", "../q.sopq", "--out", "model.safetensors", "--quiet"]) == 0


@pytest.mark.parametrize("given", ["file", "folder"])
def test_dequantize_finds_a_linked_source_and_lets_a_copy_be_rewritten(tmp_path, capsys, monkeypatch, given):
    """A review: a checkpoint of symbolic links (a hub cache's ``snapshots/X/model.safetensors`` ->
    ``blobs/<sha>``) was looked for beside the blob, not found, and the write replaced the blob; and a
    second dequantize into a copy of the checkpoint's folder was refused as the checkpoint (after hashing
    it), the first run's output being a file of that name with the checkpoint's files beside it."""
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snap"
    blobs.mkdir(parents=True)
    snap.mkdir()
    save_file({LAYER: np.ones((16, 64), np.float32)}, str(blobs / "abc123"))
    (snap / "model.safetensors").symlink_to("../blobs/abc123")
    (snap / "config.json").write_text("{}")
    quantize_then_go_elsewhere(tmp_path, monkeypatch, "hub/snap/model.safetensors" if given == "file" else "hub/snap")
    before = (blobs / "abc123").read_bytes()
    refused(capsys, ["dequantize", "../q.sopq", "--out", "../hub/snap/model.safetensors", "--quiet"],
            "a file of the checkpoint q.sopq")
    assert (blobs / "abc123").read_bytes() == before
    shutil.copytree(snap, tmp_path / "copy", symlinks=False)
    for _ in range(2):                              # the second run replaces the first run's output
        assert main(["dequantize", "../q.sopq", "--out", "../copy/deq.safetensors", "--quiet"]) == 0


def test_dequantize_into_the_models_own_folder_a_second_time_replaces_the_first(files, tmp_path, capsys):
    """`sop dequantize M/q.sopq --out M/deq.safetensors` again, from the folder sop quantize ran in: every
    file of a model folder was an input, the first run's output too, and the second run was refused as
    "the output is the input" (an outside probe); from another folder it was written (the test above)."""
    folder = tmp_path / "model"
    folder.mkdir()
    os.link(files["ckpt"], folder / "model.safetensors")
    assert main(["quantize", str(folder), "--format", "sop4-g16", "--out", str(folder / "q.sopq"), "--quiet"]) == 0
    for _ in range(2):
        assert main(["dequantize", str(folder / "q.sopq"), "--out", str(folder / "deq.safetensors"),
                     "--quiet"]) == 0, capsys.readouterr().err
    refused(capsys, ["dequantize", str(folder / "q.sopq"), "--out", str(folder / "model.safetensors"), "--quiet"],
            "is the input")


@pytest.mark.parametrize("target", ["x", "out"])
def test_gemv_never_writes_over_its_inputs(files, tmp_path, capsys, target):
    x = tmp_path / "x.npy"
    np.save(x, np.ones(64, np.float32))
    dest = {"x": x, "out": files["sopq"]}[target]
    before = snapshot([x, files["sopq"]])
    refused(capsys, ["gemv", str(files["sopq"]), "--layer", LAYER, "--x", str(x),
                     "--out", str(dest.parent / "new" / ".." / dest.name)], "is the input")
    assert snapshot([x, files["sopq"]]) == before


def test_report_outputs_that_are_its_input_are_refused(files, tmp_path, capsys):
    alias = tmp_path / "r.md"
    os.link(files["json"], alias)                  # r.md would be written over the JSON
    before = snapshot([files["json"]])
    refused(capsys, ["report", str(files["json"]), "--out", str(tmp_path / "r")], "is the input")
    assert snapshot([files["json"]]) == before


@pytest.mark.parametrize("name", ["e.md", "E.PNG"])
def test_eval_json_under_a_report_output_name_is_refused(files, tmp_path, capsys, name):
    """`sop eval --json e.md` wrote JSON where `sop report e.md` then refuses to write its own table."""
    out = tmp_path / name
    refused(capsys, ["eval", str(files["ckpt"]), "--format", "sop4-g16", "--json", str(out), "--quiet"],
            f"--json {out}: `sop eval` writes JSON", f"give {out.with_suffix('.json')}")
    assert not out.exists()


def test_report_outputs_through_a_new_folder_are_checked_too(files, tmp_path, capsys):
    alias = tmp_path / "r.md"
    os.link(files["json"], alias)
    before = snapshot([files["json"]])
    refused(capsys, ["report", str(files["json"]), "--out", str(tmp_path / "new" / ".." / "r")], "is the input")
    assert snapshot([files["json"]]) == before


def test_vector_files_that_are_an_input_are_refused(files, tmp_path, capsys):
    out = tmp_path / "vec"
    out.mkdir()
    os.link(files["ckpt"], out / "vectors.json")
    before = snapshot([files["ckpt"]])
    refused(capsys, ["vectors", str(files["ckpt"]), "--format", "sop4-g16", "--out", str(out)],
            "vectors.json", "is the input")
    assert snapshot([files["ckpt"]]) == before


def test_a_refused_vector_run_leaves_no_output_folder(files, tmp_path, capsys):
    out = tmp_path / "vec"
    refused(capsys, ["vectors", str(files["ckpt"]), "--format", "sop4-g16", "--layer", "no.such.weight",
                     "--out", str(out)], "no.such.weight")
    assert not out.exists()


def test_an_interrupted_vector_rewrite_leaves_the_old_set_whole(files, tmp_path, monkeypatch):
    """Every file of a vector set and its index change together: a run that fails after writing some
    files (here: the index, the last one) leaves the earlier set readable, and no temporary file."""
    from sop.sim.vectors import read_vectors

    out = tmp_path / "vec"
    argv = ["vectors", str(files["ckpt"]), "--format", "sop4-g16", "--out", str(out)]
    assert main([*argv, "--rows", "4"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_temp = G.temp_file_in

    def interrupted_at_the_index(folder, name):
        if name == "vectors.json":
            raise KeyboardInterrupt
        return real_temp(folder, name)

    monkeypatch.setattr(G, "temp_file_in", interrupted_at_the_index)
    assert main([*argv, "--rows", "8"]) == 128 + signal.SIGINT
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_vectors(out)[0].headers.shape[0] == 4 * 64 // 16


def test_a_full_disk_names_the_target_and_leaves_no_file_or_folder(tmp_path):
    """ENOSPC's OSError names no file: said as the target's error; the folders made for it go too."""
    import errno

    target = tmp_path / "new" / "deep" / "w.safetensors"
    with pytest.raises(G.OutputError, match=r"new/deep/w.safetensors: No space left on device; nothing was "
                                            r"written"):
        with G.atomic_output(target) as f:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()                     # a folder that was there stays, even empty
    with pytest.raises(G.OutputError):
        with G.atomic_files() as out:
            out.write(tmp_path / "kept" / "a.hex", b"a")
            out.write(tmp_path / "vec" / "b.hex", b"b")
            with out.open(tmp_path / "vec" / "c.hex"):       # the disk fills up on the third file
                raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_a_full_disk_while_a_library_writes_a_model_folder_names_the_target(tmp_path):
    """transformers' save_pretrained into the staging folder of `sop dequantize --model-folder`: safetensors
    reports a full disk as its own SafetensorError (an outside probe on a 100 KB tmpfs: `sop: internal error`,
    exit 70); said as the target's full disk, the staging folder and the folders made for it removed. Any
    other error of the library passes unchanged."""
    from safetensors import SafetensorError

    target = tmp_path / "new" / "hf"
    with pytest.raises(G.OutputError, match=r"new/hf: No space left on device; nothing was written"):
        with G.staging_folder(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SafetensorError, match="header too large"):
        with G.staging_folder(target):
            raise SafetensorError("Error while deserializing header: header too large")
    assert list(tmp_path.iterdir()) == []


def test_an_output_in_the_input_folder_under_another_name_is_allowed(files, tmp_path, capsys):
    """The check is on the file, not the folder: a new name beside the input is fine, and so is a second
    run into it (a .sopq in the folder is no input of the model: it was refused as 'the input')."""
    folder = tmp_path / "model"
    folder.mkdir()
    os.link(files["ckpt"], folder / "model.safetensors")
    for fmt in ("sop4-g16", "nf4-g64"):
        assert main(["quantize", str(folder), "--format", fmt, "--out", str(folder / "q.sopq"), "--quiet"]) == 0, \
            capsys.readouterr().err
        assert open_artifact(folder / "q.sopq").format == fmt
    refused(capsys, commands({**files, "ckpt": folder}, folder / "model.safetensors")["quantize"], "is the input")


def test_an_eval_json_written_into_the_model_folder_is_no_input_of_the_model(files, tmp_path, capsys):
    """`sop eval M --json M/eval.json` a second time was refused as "the output is the input": every
    file of a model folder but a .sopq was one (for what it does to the calibration key:
    tests/test_causal_lm.py::test_an_eval_json_in_the_model_folder_leaves_the_calibration_key)."""
    from sop.quantize.models import model_inputs

    folder = tmp_path / "model"
    folder.mkdir()
    os.link(files["ckpt"], folder / "model.safetensors")
    (folder / "notes.json").write_text('{\n "model": "a file of the user\'s"}')   # not sop eval's: still an input
    for _ in range(2):
        assert main(["eval", str(folder), "--format", "sop4-g16", "--json", str(folder / "eval.json"),
                     "--quiet"]) == 0, capsys.readouterr().err
    assert folder / "eval.json" not in model_inputs(str(folder)) and folder / "notes.json" in model_inputs(str(folder))


# -- targets that are not regular files -----------------------------------------------------------------

def make_target(kind: str, tmp_path: Path):
    """(path, a check that the thing is still there as it was, something to close)."""
    if kind == "device":
        return Path("/dev/null"), lambda: stat.S_ISCHR(os.stat("/dev/null").st_mode), None
    path = tmp_path / f"target-{kind}"
    closer = None
    if kind == "fifo":
        os.mkfifo(path)
        check = lambda: stat.S_ISFIFO(os.lstat(path).st_mode)        # noqa: E731
    elif kind == "socket":
        closer = socket.socket(socket.AF_UNIX)
        closer.bind(str(path))
        check = lambda: stat.S_ISSOCK(os.lstat(path).st_mode)        # noqa: E731
    elif kind == "folder":
        path.mkdir()
        (path / "keep").write_text("x")
        check = lambda: path.is_dir() and (path / "keep").read_text() == "x"  # noqa: E731
    elif kind == "symlink to a device":
        os.symlink("/dev/null", path)
        check = lambda: path.is_symlink() and stat.S_ISCHR(os.stat(path).st_mode)  # noqa: E731
    return path, check, closer


@pytest.mark.parametrize("kind", ["device", "fifo", "socket", "folder", "symlink to a device"])
@pytest.mark.parametrize("cmd", ["quantize", "dequantize", "eval"])
def test_a_target_that_is_not_a_regular_file_is_never_replaced(files, tmp_path, capsys, cmd, kind):
    path, intact, closer = make_target(kind, tmp_path)
    try:
        what = {"device": "a character device", "fifo": "a FIFO", "socket": "a socket", "folder": "a folder",
                "symlink to a device": "a character device"}[kind]
        refused(capsys, commands(files, path)[cmd], f"exists and is {what}", "refusing to replace it")
        assert intact()
    finally:
        if closer is not None:
            closer.close()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_report_never_replaces_a_non_regular_file(files, tmp_path, capsys, kind):
    path, intact, _ = make_target(kind, tmp_path)
    md = path.with_name("r.md")
    os.rename(path, md)
    refused(capsys, ["report", str(files["json"]), "--out", str(tmp_path / "r")], "r.md", "refusing")
    assert md.is_dir() if kind == "folder" else stat.S_ISFIFO(os.lstat(md).st_mode)
    assert not (tmp_path / "r.png").exists()                  # refused before any output


def test_the_writer_itself_refuses_a_device(tmp_path):
    """Every writer of the project goes through atomic_output, which refuses too (not only the CLI)."""
    with pytest.raises(G.OutputError, match="character device"):
        G.write_atomic("/dev/null", b"data")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_symlinked_target_is_written_through_the_link(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    os.symlink(real, link)
    G.write_atomic(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_an_output_folder_through_a_link_to_a_folder_not_made_yet_is_made(files, tmp_path, capsys):
    """A folder output that is a symbolic link to a missing folder: the link's target is made, as a file
    output writes through a link to a missing file (mkdir on the link said "cannot write there: File
    exists", an outside probe); a failed write removes the folders it made, the link stays."""
    link = tmp_path / "vec"
    os.symlink(tmp_path / "made" / "here", link)
    assert main(["vectors", str(files["ckpt"]), "--format", "sop4-g16", "--out", str(link)]) == 0
    assert link.is_symlink() and (tmp_path / "made" / "here" / "vectors.json").is_file()
    for d in (tmp_path / "gone", tmp_path / "staged"):
        os.symlink(d / "a", d.with_name(d.name + ".link"))
    with pytest.raises(RuntimeError), G.temp_file_in(tmp_path / "gone.link", "x.bin"):
        raise RuntimeError
    with pytest.raises(RuntimeError), G.staging_folder(tmp_path / "staged.link" / "model"):
        raise RuntimeError
    assert not (tmp_path / "gone").exists() and not (tmp_path / "staged").exists()
    assert (tmp_path / "gone.link").is_symlink() and (tmp_path / "staged.link").is_symlink()


def test_a_failed_set_through_a_link_to_a_folder_not_made_yet_removes_the_folders_it_made(tmp_path):
    """A set of files (a vector set) through a link to a missing folder, failing after a file was staged: the
    folders made for it were left, empty (the set noted the link, not its target, as made)."""
    os.symlink(tmp_path / "made" / "here", tmp_path / "link")
    with pytest.raises(RuntimeError), G.atomic_files() as fs:
        fs.write(tmp_path / "link" / "a.bin", b"x")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"] and (tmp_path / "link").is_symlink()


def test_an_interrupted_run_leaves_the_warnings_of_the_process_as_they_were(monkeypatch, capsys):
    """An interrupted run's warnings are quiet (its objects cut short); a Python caller's warnings after it (a
    second sop.cli.main, quantize_module's) were silenced for the rest of the process."""
    import warnings

    import sop.cli

    def cut(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sop.cli, "cmd_formats", cut)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["formats"]) == 130
        warnings.warn("after the run")
    assert [str(w.message) for w in seen] == ["after the run"]
    assert capsys.readouterr().err == "sop: interrupted (SIGINT); no partial file was left\n"


def test_an_output_under_a_file_is_a_clear_error(files, capsys):
    refused(capsys, commands(files, files["ckpt"] / "x.sopq")["quantize"], str(files["ckpt"]))


def test_an_output_folder_that_is_a_file_is_refused(files, tmp_path, capsys):
    f = tmp_path / "plain"
    f.write_text("keep")
    refused(capsys, ["vectors", str(files["ckpt"]), "--format", "sop4-g16", "--out", str(f)], "not a folder")
    assert f.read_text() == "keep"


# -- killed writers --------------------------------------------------------------------------------------

WRITER = r"""
import signal, sys, time
from sop.golden.files import atomic_output, signals_as_interrupts
path, hold = sys.argv[1], sys.argv[2]
# SIGINT as in a terminal: a suite run as a background job inherits SIGINT ignored (and a
# process that ignores SIGINT rightly keeps running when it gets one)
signal.signal(signal.SIGINT, signal.default_int_handler)


def stage(name):                 # say where the writer is; wait there to be killed if asked to
    print(name, flush=True)
    if name == hold:
        # short sleeps: a signal caught between the print and one long sleep would run its Python
        # handler only when that sleep ends (the C handler has run, so the sleep is not cut short);
        # each pass of the loop runs pending handlers
        for _ in range(600):
            time.sleep(0.1)


with signals_as_interrupts():
    stage("open")
    with atomic_output(path) as f:
        for i in range(3):
            f.write(bytes([65 + i]) * 65536)
            f.flush()
            stage(f"chunk {i}")
print("done", flush=True)
"""


def run_writer(target: Path, hold: str = "") -> subprocess.Popen:
    """The writer, stopping for a minute at stage ``hold`` (none: it runs to the end)."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), hold], stdout=subprocess.PIPE,
                            text=True)


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob("*" + G.TEMP_SUFFIX))


def wait_for(proc: subprocess.Popen, line: str) -> None:
    for got in proc.stdout:                         # the writer prints each stage, then sleeps
        if got.strip() == line:
            return
    raise AssertionError(f"the writer ended before {line!r}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("stage", ["open", "chunk 0", "chunk 2"])
def test_a_killed_writer_never_leaves_a_partial_file(tmp_path, sig, stage):
    target = tmp_path / "out.bin"
    target.write_bytes(b"the old target")
    proc = run_writer(target, hold=stage)
    try:
        wait_for(proc, stage)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) != 0
    finally:
        proc.kill()
        proc.wait(timeout=20)                       # reaped here, not left to a later test's GC
        proc.stdout.close()
    assert target.read_bytes() == b"the old target"
    assert sorted(tmp_path.iterdir()) == sorted([target, *temps(tmp_path)])
    if sig == signal.SIGKILL:
        assert len(temps(tmp_path)) == (0 if stage == "open" else 1)   # nothing ran to remove it
    else:
        assert temps(tmp_path) == []                                      # removed on the way out
    proc = run_writer(target)                                              # the next write, to the end
    assert proc.wait(timeout=60) == 0
    proc.stdout.close()
    assert target.read_bytes() == b"A" * 65536 + b"B" * 65536 + b"C" * 65536
    assert temps(tmp_path) == []


def weakref_script(callback: str, before: str, inside: str = "") -> str:
    """A script that drops a weakref inside ``signals_as_interrupts`` (its ``callback`` body runs then),
    after ``before``; ``inside`` starts the block. It prints whether, and by what, it was interrupted."""
    return f"""
import os, signal, sys, threading, time, weakref
from sop.golden.files import Signalled, signals_as_interrupts


def slow_hook(info):             # an unraisable hook slow to run (the one before ours)
    time.sleep(0.5)


class Thing:
    pass


def callback(_ref):
{callback}


{before}
try:
    with signals_as_interrupts():
{inside}        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        for _ in range(50):
            time.sleep(0.1)
    print("not interrupted", flush=True)
except KeyboardInterrupt as e:
    print("interrupted", e.name if isinstance(e, Signalled) else "SIGINT", flush=True)
"""


#: the signal handled inside a weakref callback: its exception is dropped
SWALLOWED = weakref_script("""    os.kill(os.getpid(), signal.SIG{NAME})
    for _ in range(100000):      # the handler runs here, in a weakref callback: its exception is dropped
        pass""", "signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal (xdist's workers "
                 "ignore it)")
#: the signal handled inside the unraisable hook (while the hook before ours runs)
IN_THE_HOOK = weakref_script('    raise ValueError("an exception Python drops: the hooks run")',
                             "sys.unraisablehook = slow_hook",
                             "        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()"
                             "     # lands in slow_hook\n")


def test_a_signal_that_lands_in_the_unraisable_hook_still_interrupts():
    """A signal whose handler runs inside the unraisable hook (here while the hook before ours runs; in CI,
    the signal sent again landing there on a loaded machine): Python drops an exception raised in the hook
    without calling it again, so the hook catches it and sends the signal once more."""
    proc = subprocess.run([sys.executable, "-c", IN_THE_HOOK], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split("\n")[0] == "interrupted SIGTERM", (proc.stdout, proc.stderr)
    assert "Exception ignored in sys.unraisablehook" not in proc.stderr


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_a_signal_whose_exception_a_callback_drops_still_interrupts(name):
    """SIGTERM (or Ctrl-C's SIGINT) handled inside a weakref callback (as an import lock's was, once,
    in CI): Python drops the exception raised there ("Exception ignored"); the signal is sent again
    and interrupts."""
    script = SWALLOWED.replace("{NAME}", name)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split("\n")[0] == f"interrupted SIG{name}", (proc.stdout, proc.stderr)
    assert "Exception ignored" not in proc.stderr


def test_a_running_writers_temporary_file_is_left_alone(tmp_path):
    """Reclaiming removes only the files of dead processes: a concurrent writer keeps its own."""
    target = tmp_path / "out.bin"
    proc = run_writer(target, hold="chunk 0")
    try:
        wait_for(proc, "chunk 0")
        live = temps(tmp_path)
        assert len(live) == 1
        G.write_atomic(target, b"other")
        assert temps(tmp_path) == live and target.read_bytes() == b"other"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_the_cli_interrupted_by_sigterm_removes_its_temporary_files(files, tmp_path):
    """`sop quantize` on the real MiniLM, terminated mid-run: message, exit 143, no file left."""
    out = tmp_path / "m.sopq"
    proc = subprocess.Popen([sys.executable, "-m", "sop.cli", "quantize", "minilm", "--format", "sop4-g16",
                             "--out", str(out), "--no-calib"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not temps(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)                       # the records spool exists: the run is writing
        assert temps(tmp_path), "the run never started writing"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(timeout=20)
        proc.stderr.close()
    assert rc == 128 + signal.SIGTERM, err
    assert "sop: interrupted (SIGTERM)" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_stale_temporary_file_of_a_dead_process_is_reclaimed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.bin.{pid}-abc{G.TEMP_SUFFIX}"
    other = tmp_path / f".other.bin.{pid}-abc{G.TEMP_SUFFIX}"       # another target's: not ours to take
    stale.write_bytes(b"partial")
    other.write_bytes(b"partial")
    G.write_atomic(tmp_path / "out.bin", b"x")
    assert not stale.exists() and other.exists()


def test_a_killed_exports_staging_folder_is_reclaimed_and_a_failed_one_leaves_nothing(tmp_path):
    """A model folder export stages transformers' files in a folder beside its target: a run killed
    outright leaves it (GBs for an LLM), so the next write to the same target removes it, as it does a
    stale temporary file; a staging that raises removes its folder and the folders made for it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".out.{int(dead.stdout)}-abc{G.TEMP_SUFFIX}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"weights")
    with G.staging_folder(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.{os.getpid()}-") and not stale.exists()
        (tmp / "x").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt), G.staging_folder(tmp_path / "new" / "deeper" / "out") as tmp:
        (tmp / "x").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_file_output_written_as_a_folder_is_refused(files, tmp_path, capsys):
    """``--out d/`` names a folder; pathlib drops the slash, so it used to write (or replace) a file ``d``."""
    (tmp_path / "d").write_bytes(b"mine")
    for target in (tmp_path / "d", tmp_path / "e"):
        for argv in commands(files, f"{target}{os.sep}").values():
            refused(capsys, argv, "names a folder (it ends with /)")
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and (tmp_path / "d").read_bytes() == b"mine"


def test_a_file_output_written_as_a_folder_with_a_dot_or_empty_is_refused(files, tmp_path, capsys, monkeypatch):
    """``--out d/.`` names the folder d too: pathlib drops the ``/.``, and it replaced a file ``d`` (an
    outside probe; ``..`` as a report stem wrote ``...md``); ``--out ''`` is pathlib's ``.``: a message
    of pathlib's (``PosixPath('.') has an empty name``), and ``sop eval --json ''`` wrote nothing, exit 0."""
    (tmp_path / "d").write_bytes(b"mine")
    monkeypatch.chdir(tmp_path)
    for target, said in (("d/.", "names a folder (it ends with .)"), ("d/..", "names a folder (it ends with ..)"),
                         ("..", "names a folder (it ends with ..)"), ("", "'': an empty name")):
        for argv in commands(files, target).values():
            refused(capsys, argv, said)
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and (tmp_path / "d").read_bytes() == b"mine"


def test_an_empty_folder_output_or_model_is_refused(files, tmp_path, capsys, monkeypatch):
    """``sop vectors --out ''`` and ``sop dequantize --model-folder --out ''`` wrote into the working folder
    (``wrote :``); ``--model ''`` was taken for no --model (`the artifact names no source model; give
    --model`)."""
    monkeypatch.chdir(tmp_path)
    said = "'': an empty name; give the output folder's name"
    refused(capsys, ["vectors", str(files["ckpt"]), "--format", "sop4-g16", "--out", ""], said)
    refused(capsys, ["dequantize", str(files["sopq"]), "--model-folder", "--out", "", "--quiet"], said)
    refused(capsys, ["dequantize", str(files["sopq"]), "--model-folder", "--out", "m", "--model", "", "--quiet"],
            "--model '' is an empty name")
    assert list(tmp_path.iterdir()) == []


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    """A private file stays private: the new file takes the old one's mode, not the umask's 0644."""
    target = tmp_path / "private.bin"
    target.write_bytes(b"old")
    target.chmod(0o600)
    G.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    target.chmod(0o6755)                     # set-id bits are not permissions: the new file has none
    G.write_atomic(target, b"newer")
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    fresh = tmp_path / "fresh.bin"
    G.write_atomic(fresh, b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_an_output_over_the_config_or_tokenizer_beside_a_weights_file_is_refused(files, tmp_path, capsys):
    """Given one weights file, the loader reads the config.json and tokenizer.json beside it: they are
    inputs too, never replaced by the artifact or the eval JSON."""
    ckpt = tmp_path / "model.safetensors"
    os.link(files["ckpt"], ckpt)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    before = snapshot(tmp_path.iterdir())
    for sibling in ("config.json", "tokenizer.json"):
        out = tmp_path / sibling
        refused(capsys, ["quantize", str(ckpt), "--format", "sop4-g16", "--out", str(out), "--quiet"], "is the input")
        refused(capsys, ["eval", str(ckpt), "--format", "sop4-g16", "--json", str(out), "--quiet"], "is the input")
    assert snapshot(tmp_path.iterdir()) == before


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_output_that_is_a_standard_stream_redirected_to_a_file_is_refused(files, tmp_path, stream):
    """``--out /dev/stdout >> log``: /dev/stdout is a link to the log the shell opened, and the rename
    put a new file in its place; what the log held was lost (exit 0). Now refused in one line."""
    log = tmp_path / "keep.txt"
    log.write_bytes(b"precious\n")
    with open(log, "ab") as f:
        run = subprocess.run([sys.executable, "-m", "sop.cli", "dequantize", str(files["sopq"]), "--out",
                              f"/dev/{stream}", "--quiet"], stdout=f if stream == "stdout" else subprocess.PIPE,
                             stderr=f if stream == "stderr" else subprocess.PIPE, timeout=300)
    said = log.read_bytes() if stream == "stderr" else run.stderr
    assert run.returncode == 2 and log.read_bytes().startswith(b"precious\n"), (run, said)
    what = {"stdout": "output", "stderr": "error output"}[stream]
    assert f"sop: error: /dev/{stream}: the output is this command's standard {what}, ".encode() in said, said


def test_a_long_name_of_multibyte_characters_is_written(tmp_path):
    """A 247-byte name (legal: 255 is the limit) of 3-byte characters was refused as "File name too long":
    the temporary file kept 120 *characters* of it, 360 bytes."""
    target = tmp_path / ("漢" * 81 + ".sop")
    assert len(os.fsencode(target.name)) == 247
    G.write_atomic(target, b"data")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [target.name]


def test_a_target_that_cannot_be_replaced_is_named_not_its_temporary_file(tmp_path, monkeypatch):
    """An immutable target (``chattr +i``) fails at the rename: the error named the temporary file,
    already removed. It names the target now, which stays as it was, and no temporary file is left."""
    target = tmp_path / "imm.sopq"
    target.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
    monkeypatch.setattr(G.os, "replace", refuse)
    with pytest.raises(G.OutputError, match=f"^{target}: cannot replace it: Operation not permitted$"):
        G.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == [target.name]


def test_a_set_of_files_flushes_its_folders_after_the_renames(tmp_path, monkeypatch):
    """The files' data was flushed before the renames, the renames themselves never: after a power loss
    the folder could still name the old files. Each folder of the set is flushed once they are made."""
    synced = []
    real = G.os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(G.os, "fsync", fsync)
    with G.atomic_files() as files:
        files.write(tmp_path / "a" / "x.bin", b"x")
        files.write(tmp_path / "b" / "y.bin", b"y")
        assert not any(Path(p).is_dir() for p in synced)          # before the commit: the files' data only
    assert sorted(p for p in synced if Path(p).is_dir()) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_an_output_named_as_the_other_commands_file_is_refused(files, tmp_path, capsys):
    """Every command takes a model or an artifact by its name's ending (`.sopq`, `.safetensors`, ...), so an
    output is named by what it holds. `sop quantize --out m.safetensors`
    wrote a .sopq container under a checkpoint's name, which `sop eval`, `sop vectors` and `sop board` then
    read as a damaged checkpoint (`header length field claims 5659184979 bytes`), and `sop dequantize --out
    w.sopq` wrote safetensors that `sop vectors` read as a damaged artifact, and `--out m` a file no command
    reads. Refused before any work."""
    for name in ("m.safetensors", "m.BIN", "m.pt", "m.pth", "m.gguf"):
        refused(capsys, commands(files, tmp_path / name)["quantize"], "`sop quantize` writes a .sopq artifact",
                f"read as a {Path(name).suffix.lower()} checkpoint; name it {tmp_path / 'm.sopq'}")
    refused(capsys, commands(files, tmp_path / "w.sopq")["dequantize"], "`sop dequantize` writes decoded weights",
            f"name it {tmp_path / 'w.safetensors'}")
    # a name no reader takes (`sop vectors m`: "unsupported file type ''"): the ending added to the name
    refused(capsys, commands(files, tmp_path / "m")["quantize"], "read as no file type; name it "
            f"{tmp_path / 'm.sopq'}")
    refused(capsys, commands(files, tmp_path / "m.v2")["quantize"], "read as a .v2 file, which no reader takes; "
            f"name it {tmp_path / 'm.v2.sopq'}")
    refused(capsys, commands(files, tmp_path / "w")["dequantize"], f"name it {tmp_path / 'w.safetensors'}")
    assert list(tmp_path.iterdir()) == []
    assert main(commands(files, tmp_path / "m.sopq")["quantize"]) == 0                  # the names they document
    assert main(commands(files, tmp_path / "w.safetensors")["dequantize"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sopq", "w.safetensors"]
    # from Python the same refusals, naming the functions
    with pytest.raises(G.OutputError, match=r"quantize_model\(\) writes a \.sopq artifact"):
        quantize_model(str(files["ckpt"]), "sop4-g16", tmp_path / "x.safetensors", calibrate=False)
    with pytest.raises(G.OutputError, match=r"dequantize\(\) writes decoded weights"):
        dequantize(tmp_path / "m.sopq", tmp_path / "x.sopq")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.sopq").exists()
