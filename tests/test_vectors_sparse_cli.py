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
