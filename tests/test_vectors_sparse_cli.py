"""`sop vectors` of a .sopq artifact: its layers as stored, sparse residuals included; bad requests end
in one line `sop: error: ...`."""

import json
import re

import numpy as np
import pytest
from cli_run import run

from sop.sim import runner
from sop.sim.vectors import read_vectors


def test_vectors_of_a_budget_artifact_carry_the_residuals(tmp_path, capsys):
    art, names = runner.sparse_artifact("sop4-g16")
    out = tmp_path / "v"
    assert run(["vectors", art, "--format", "sop4-g16", "--layer", names[0], "--out", out, "--rows", 8]) == 0
    doc = json.loads((out / "vectors.json").read_text())
    (entry,) = doc["layers"]
    assert entry["sparse"] > 0 and "sparse" in entry["files"] and entry["rows"] == 8
    (layer,) = read_vectors(out)
    assert len(layer.sparse_index) == entry["sparse"]
    # every layer stored in the layout, without --layer
    assert run(["vectors", art, "--format", "sop4-g16", "--out", tmp_path / "all", "--rows", 2]) == 0
    assert len(read_vectors(tmp_path / "all")) == len(
        [e for e in json.loads((tmp_path / "all" / "vectors.json").read_text())["layers"]])


@pytest.mark.parametrize("source", ["model", "sopq"])
def test_a_padded_layers_vectors_name_its_own_width(tmp_path, source):
    from safetensors.numpy import save_file

    model = tmp_path / "m.safetensors"
    save_file({"w40.weight": np.random.default_rng(4).standard_normal((3, 40)).astype(np.float32),
               "w32.weight": np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)}, str(model))
    src = model
    if source == "sopq":
        src = tmp_path / "m.sopq"
        assert run(["quantize", model, "--format", "sop4-g16", "--out", src, "--quiet"]) == 0
    assert run(["vectors", src, "--format", "sop4-g16", "--out", tmp_path / "v"]) == 0
    layers = {e["name"]: e for e in json.loads((tmp_path / "v" / "vectors.json").read_text())["layers"]}
    assert [(e["rows"], e["cols"], e["width"]) for e in (layers["w40.weight"], layers["w32.weight"])] == \
        [(3, 48, 40), (2, 32, 32)]


def test_include_lm_head_with_an_artifact_is_one_line_and_writes_nothing(tmp_path, capsys):
    """An artifact's layers are the ones `sop quantize` stored: `--include-lm-head` cannot add a head to
    them, and was passed over (vectors written, the head missing from them without a word)."""
    from safetensors.numpy import save_file

    from sop.sim.vectors import make_vectors

    model = tmp_path / "m.safetensors"
    save_file({"w.weight": np.random.default_rng(6).standard_normal((2, 32)).astype(np.float32)}, str(model))
    art = tmp_path / "m.sopq"
    assert run(["quantize", model, "--format", "sop4-g16", "--out", art, "--quiet"]) == 0
    capsys.readouterr()
    err = one_error_line(capsys, ["vectors", art, "--format", "sop4-g16", "--include-lm-head", "--out", tmp_path / "v"])
    assert err.endswith("--include-lm-head goes with a model, not a .sopq artifact, whose layers are the ones "
                        "`sop quantize` stored (quantize with --include-lm-head to store the head)"), err
    assert not (tmp_path / "v").exists()
    with pytest.raises(ValueError, match=r"lm_head=True goes with a model, .*\(quantize with lm_head=True"):
        make_vectors(str(art), "sop4-g16", None, tmp_path / "p", lm_head=True)
    assert run(["vectors", art, "--format", "sop4-g16", "--out", tmp_path / "v"]) == 0     # without it: written


def one_error_line(capsys, argv) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_artifact_requests_are_one_line(tmp_path, capsys):
    art, names = runner.sparse_artifact("sop4-g16")
    _, e2m3 = runner.sparse_artifact("e2m3-ue4m4-g16")
    err = one_error_line(capsys, ["vectors", art, "--format", "sop4-g16", "--layer", e2m3[0], "--out", tmp_path / "a"])
    assert err.endswith(f"layer {e2m3[0]} is in the e2m3-ue4m4-g16 layout, not in the sop4-g16 layout"), err
    err = one_error_line(capsys, ["vectors", art, "--format", "sop4-g16", "--layer", "nope", "--out", tmp_path / "b"])
    assert "no layer nope" in err
    from sop.golden.points import get_point
    from sop.quantize.artifact import open_artifact
    from sop.synth.host.bringup import artifact_layer_stream

    a = open_artifact(art)
    mine = [e.name for e in a.layers if (st := a.stream(e)) is not None and st.layout == get_point("sop4-g16").layout]
    assert len(mine) > 5
    with pytest.raises(ValueError) as refused:           # `sop board ART --layer`: five of the layout's, and the count
        artifact_layer_stream(str(art), "sop4-g16", e2m3[0])
    assert str(refused.value).endswith(f"; layers in it: {', '.join(mine[:5])}, ... ({len(mine)} in all)")
    bad = tmp_path / "bad.sopq"
    bad.write_bytes(b"not an artifact")
    assert "bad.sopq" in one_error_line(capsys, ["vectors", bad, "--format", "sop4-g16", "--out", tmp_path / "c"])


@pytest.fixture(scope="module")
def sparse_set(tmp_path_factory):
    """A vector set of one layer with sparse entries (the first rows of a sop-budget layer)."""
    art, names = runner.sparse_artifact("sop4-g16")
    out = tmp_path_factory.mktemp("v") / "v"
    assert run(["vectors", art, "--format", "sop4-g16", "--layer", names[0], "--out", out, "--rows", 8]) == 0
    return out


@pytest.mark.parametrize("edit, said", [
    (lambda lines, n: [lines[1], lines[0], *lines[2:]], "must be strictly increasing"),
    (lambda lines, n: [*lines[:-1], "99999999999999999999999 3f80"],
     "index 99999999999999999999999 is past the layer"),
    (lambda lines, n: [*lines[:-1], f"{n} 3f80"], "index {n} is past the layer's {n} values"),   # the first past
    (lambda lines, n: ["\u00b2 3f80", *lines[1:]], "line 1: expected 'index value' (decimal, 4 hex digits)"),
    (lambda lines, n: ["\u0663 3f80", *lines[1:]], "line 1: expected 'index value' (decimal, 4 hex digits)"),
    (lambda lines, n: [lines[0].split()[0] + " 7f80", *lines[1:]], "line 1: value 7f80 is not a finite BF16"),
], ids=["out of order", "past int64", "one past the end", "superscript digit", "arabic-indic digit", "infinite value"])
def test_a_sparse_file_with_a_bad_entry_is_one_vector_error_naming_the_line(sparse_set, tmp_path, edit, said):
    """The set's checksums made good, so that the entry itself is what is read: an index past int64 was an
    OverflowError, '²' a ValueError naming no file, and '٣' was read as 3 (an outside probe)."""
    import hashlib
    import shutil

    from sop.sim.vectors import VectorError

    d = tmp_path / "v"
    shutil.copytree(sparse_set, d)
    doc = json.loads((d / "vectors.json").read_text())
    (entry,) = doc["layers"]
    path = d / entry["files"]["sparse"]
    n = entry["rows"] * entry["cols"]
    said = said.format(n=n)
    data = ("\n".join(edit(path.read_text().splitlines(), n)) + "\n").encode()
    path.write_bytes(data)
    entry["sha256"]["sparse"] = hashlib.sha256(data).hexdigest()
    (d / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(VectorError, match=re.escape(said)) as err:
        read_vectors(d)
    assert str(path) in str(err.value)


def test_cropped_rows_keep_only_their_own_entries():
    """--rows N keeps the entries below N * cols: index 16 is row 1's first value, outside one row."""
    from dataclasses import replace

    from sop.golden.layout import Sparse
    from sop.sim.vectors import crop_rows, quantize_layer

    s = quantize_layer("sop4-g16", np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32), "x")
    s = replace(s, sparse=Sparse(np.array([3, 15, 16], np.uint32), np.full(3, 0x3F80, np.uint16)))
    c = crop_rows(s, 1)
    assert (c.rows, c.cols) == (1, 16) and c.sparse.index.tolist() == [3, 15]


def _rewrite(d, entry, kind, text):
    """Replace a layer's file of ``kind`` by ``text`` with its checksum made good."""
    import hashlib

    (d / entry["files"][kind]).write_text(text)
    entry["sha256"][kind] = hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("kind, line", [("axis_load", 1), ("axis_load", "last"), ("axis_sparse", 2),
                                        ("exact_hex", 7)])
def test_an_axi_file_that_is_not_the_layers_other_fields_is_one_vector_error_naming_the_line(
        sparse_set, tmp_path, kind, line):
    """The AXI files say again what vectors.json, sparse.txt and exact.txt say: one edited with its
    checksum made good (a table word, the offset word's CTRL_SPARSE, an entry, a lane word) is refused
    naming the file and the line, as a testbench would otherwise run with words the set's other files
    contradict."""
    import shutil

    from sop.sim.vectors import VectorError

    d = tmp_path / "v"
    shutil.copytree(sparse_set, d)
    doc = json.loads((d / "vectors.json").read_text())
    (entry,) = doc["layers"]
    lines = (d / entry["files"][kind]).read_text().splitlines()
    k = len(lines) if line == "last" else line
    # a table word's address bit; CTRL_SPARSE off the offset word (the -sp shell would not take the
    # entries); an entry's index bit; a lane word's exponent bit
    flip = {("axis_load", 1): 1 << 8, ("axis_load", "last"): 4, ("axis_sparse", 2): 1, ("exact_hex", 7): 1 << 11}
    lines[k - 1] = f"{int(lines[k - 1], 16) ^ flip[kind, line]:0{len(lines[k - 1])}x}"
    _rewrite(d, entry, kind, "\n".join(lines) + "\n")
    (d / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(VectorError, match=re.escape(f"{d / entry['files'][kind]}: line {k}: not ")):
        read_vectors(d)


def test_axi_files_are_all_or_none_and_a_sparse_packet_only_with_entries(sparse_set, tmp_path):
    """A set written before the AXI files (none listed) reads as before; one listed without the others,
    or a sparse packet for a layer without entries, is a VectorError."""
    import shutil

    from sop.sim.vectors import AXIS_KINDS, VectorError

    def edited(edit):
        d = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(sparse_set, d)
        doc = json.loads((d / "vectors.json").read_text())
        edit(doc["layers"][0])
        (d / "vectors.json").write_text(json.dumps(doc))
        return d

    def drop(*kinds):
        return lambda e: [(e["files"].pop(k), e["sha256"].pop(k)) for k in kinds]

    (whole,) = read_vectors(sparse_set)
    (old,) = read_vectors(edited(drop(*AXIS_KINDS)))
    assert (old.luts == whole.luts).all() and (old.sparse_index == whole.sparse_index).all()
    with pytest.raises(VectorError, match=r"layers\[0\]: files.axis_sparse is missing"):
        read_vectors(edited(drop("axis_sparse")))

    def no_entries(e):          # the sparse file gone, its packet left listed
        drop("sparse")(e)
        e["sparse"] = 0
    with pytest.raises(VectorError, match=r"files.axis_sparse is listed, but the layer has no sparse entries"):
        read_vectors(edited(no_entries))


def test_a_vector_file_that_is_not_text_is_one_vector_error_naming_it(sparse_set, tmp_path):
    """Its checksum made good: it was a UnicodeDecodeError that named no file."""
    import hashlib
    import shutil

    from sop.sim.vectors import VectorError

    d = tmp_path / "v"
    shutil.copytree(sparse_set, d)
    doc = json.loads((d / "vectors.json").read_text())
    (entry,) = doc["layers"]
    path = d / entry["files"]["bf16"]
    data = b"\xff" + path.read_bytes()[1:]
    path.write_bytes(data)
    entry["sha256"]["bf16"] = hashlib.sha256(data).hexdigest()
    (d / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(VectorError, match=re.escape(f"{path}: not UTF-8 text (byte 0: 0xff)")):
        read_vectors(d)


_HOLDER = """
import fcntl, sys, time
from pathlib import Path
path, hold_s = Path(sys.argv[1]), float(sys.argv[2])
with open(str(path) + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(hold_s)
    if len(sys.argv) > 3:
        path.write_bytes(sys.argv[3].encode())
"""


def _hold_lock(path, hold_s, writes=None):
    """Another process that takes ``path``'s build lock, holds it ``hold_s`` seconds, writes ``path``
    (when ``writes`` is given) and exits; returned once the lock is held."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(hold_s)] + ([writes] if writes else []),
                              stdout=subprocess.PIPE, text=True)
    said = holder.stdout.readline().strip()
    holder.stdout.close()
    assert said == "locked"
    return holder


def test_the_budget_artifact_is_built_by_one_process_while_another_waits(tmp_path, monkeypatch):
    """Two xdist workers asking for the sop-budget artifact at once: the second waits for the first's
    build and reads its file (it built a second copy beside it, 26 CPU-s on 2 cores)."""
    from sop.sim.vectors import minilm_budget_artifact

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "build" / "vectors" / "minilm-sop-budget-5.5.sopq"
    path.parent.mkdir(parents=True)
    holder = _hold_lock(path, 1.0, writes="the other process's build")
    try:
        assert minilm_budget_artifact(5.5) == path
        assert path.read_text() == "the other process's build"
    finally:
        assert holder.wait(timeout=30) == 0


def test_a_build_lock_held_too_long_is_a_timeout_naming_it(tmp_path):
    from sop.sim.vectors import _only_builder

    path = tmp_path / "artifact.sopq"
    holder = _hold_lock(path, 30.0)
    try:
        with pytest.raises(TimeoutError, match=r"artifact\.sopq\.lock: held by another process for over 1 s"):
            with _only_builder(path, wait_s=1.0):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
