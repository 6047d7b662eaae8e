"""Fuzz suite over the project's own files (tests/fuzzing.py): `.sopq` artifacts, golden layer
streams, RTL vector sets and `sop eval --json` results, each mutated with its checksums recomputed
(so that the structure checks, not the CRCs, are what is tested). The property: the reader raises its
documented clean error (a ValueError subclass naming what is wrong, which the CLI prints as one
`sop: error:` line, exit 2) or returns a result that is valid and used without error; never another
exception, a non-finite decoded value or a hang."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from sop.cli import main
from sop.golden.files import crc32
from sop.golden.decoder import decode_layer
from sop.golden.layout import LayoutError, pack_layer, unpack_layer
from sop.quantize import artifact as A
from sop.quantize.report import load_rows, markdown_table, report
from sop.sim.vectors import VectorError, read_vectors, write_vectors

pytestmark = pytest.mark.fuzz

LAYERS = {"blk.0.fc.weight": (16, 48), "h.0.attn.c_attn.weight": (32, 96)}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A checkpoint, its sop4 and fp8 artifacts, a vector set and an eval JSON (made once)."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(11)
    ckpt = d / "m.safetensors"
    save_file({n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in LAYERS.items()}, str(ckpt))
    out = {"dir": d}
    for fmt in ("sop4-g16", "fp8-e4m3-pot"):
        out[fmt] = (d / f"{fmt}.sopq")
        assert main(["quantize", str(ckpt), "--format", fmt, "--out", str(out[fmt]), "--quiet"]) == 0
    art = A.open_artifact(out["sop4-g16"])
    out["stream"] = pack_layer(art.stream(art.layers[0]))
    out["vectors"] = d / "vec"
    write_vectors(out["vectors"], {"l0": art.stream(art.layers[0])}, {"model": "m", "format": "sop4-g16"})
    out["json"] = d / "eval.json"
    assert main(["eval", str(ckpt), "--format", "sop4-g16", "--format", "nvfp4", "--json", str(out["json"]),
                 "--quiet"]) == 0
    return out


# -- JSON mutations ------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(node, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_edits(draw, doc):
    """``doc`` with one to three values replaced, deleted, or given a new key."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            parent.pop(path[-1])
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return doc


def container(meta: dict | bytes, body: bytes) -> bytes:
    """A .sopq container around ``meta`` and the records ``body``, every checksum right."""
    h = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    out = struct.pack("<4sHHI", b"SOPQ", 1, 0, len(h)) + h + struct.pack("<I", zlib.crc32(h)) + body
    return out + struct.pack("<I", zlib.crc32(out))


def split(data: bytes) -> tuple[dict, bytes]:
    hlen = struct.unpack_from("<I", data, 8)[0]
    return json.loads(data[12:12 + hlen]), data[16 + hlen:-4]


def check_artifact(path: Path, out: Path) -> None:
    """Open and dequantize: a clean ArtifactError, or a complete file of finite float32."""
    try:
        A.dequantize(path, out, progress=False)
    except A.ArtifactError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
        assert not out.exists()
        return
    from safetensors.numpy import load_file

    for w in load_file(str(out)).values():
        assert np.isfinite(w).all()


@pytest.mark.parametrize("fmt", ["sop4-g16", "fp8-e4m3-pot"])
@fuzz(60)
@given(data=st.data())
def test_artifact_header_mutations(made, tmp_path_factory, fmt, data):
    meta, body = split(made[fmt].read_bytes())
    d = tmp_path_factory.mktemp("a")
    bad = d / "x.sopq"
    bad.write_bytes(container(data.draw(json_edits(meta)), body))
    check_artifact(bad, d / "x.safetensors")


@fuzz(60)
@given(data=st.data())
def test_artifact_record_mutations(made, tmp_path_factory, data):
    """Bytes of a golden stream changed, the stream's own CRC and the record's CRC recomputed."""
    meta, body = split(made["sop4-g16"].read_bytes())
    e = meta["layers"][data.draw(st.integers(0, len(meta["layers"]) - 1))]
    rec = bytearray(body[e["offset"]:e["offset"] + e["length"]])
    for _ in range(data.draw(st.integers(1, 4))):
        rec[data.draw(st.integers(0, len(rec) - 5))] = data.draw(st.integers(0, 255))
    rec[-4:] = struct.pack("<I", crc32(bytes(rec[:-4])))
    e["crc32"] = struct.unpack("<I", rec[-4:])[0]      # the entry names a sopl record by its own CRC
    body = body[:e["offset"]] + bytes(rec) + body[e["offset"] + e["length"]:]
    d = tmp_path_factory.mktemp("r")
    bad = d / "x.sopq"
    bad.write_bytes(container(meta, body))
    check_artifact(bad, d / "x.safetensors")


def f32_record_edit(meta: dict, body: bytes, layer: int, values: dict) -> bytes:
    """``body`` with ``values`` ({flat index: float}) written into the f32 record of layer ``layer``, whose
    CRC in ``meta`` is made good (``container`` makes the header's and the file's good)."""
    e = meta["layers"][layer]
    assert e["record"] == "f32"
    rec = np.frombuffer(body, "<f4", e["length"] // 4, e["offset"]).copy()
    rec[list(values)] = list(values.values())
    e["crc32"] = crc32(rec.tobytes())
    return body[:e["offset"]] + rec.tobytes() + body[e["offset"] + e["length"]:]


@fuzz(40)
@given(data=st.data())
def test_artifact_float32_record_mutations(made, tmp_path_factory, data):
    """Values of a baseline layer's f32 record changed (NaN, Inf, subnormals, the float32 maxima among
    them), every CRC recomputed: refused naming the layer exactly when a value is not finite, else
    decoded to those values."""
    meta, body = split(made["fp8-e4m3-pot"].read_bytes())
    layer = data.draw(st.integers(0, len(meta["layers"]) - 1))
    n = meta["layers"][layer]["length"] // 4
    values = data.draw(st.dictionaries(st.integers(0, n - 1), st.floats(width=32), min_size=1, max_size=4))
    d = tmp_path_factory.mktemp("f")
    bad, out = d / "x.sopq", d / "x.safetensors"
    bad.write_bytes(container(meta, f32_record_edit(meta, body, layer, values)))
    check_artifact(bad, out)
    assert out.exists() == bool(np.isfinite(list(values.values())).all())
    if out.exists():                                     # the file holds them, in the checkpoint's orientation
        from safetensors.numpy import load_file

        e = A.open_artifact(bad).layers[layer]
        w = load_file(str(out))[e.name]
        got = (w.T if e.transposed else w).ravel()
        assert np.array_equal(got[list(values)], np.float32(list(values.values())))


# -- golden layer streams ------------------------------------------------------------------------------------

@fuzz(150)
@given(data=st.data())
def test_layer_stream_mutations(made, data):
    """Changed, inserted or deleted bytes with the CRC recomputed: LayoutError, or a stream that
    packs back to the same bytes and decodes to finite values in every output."""
    body = bytearray(made["stream"][:-4])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set" and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif at < len(body):
            del body[at:at + data.draw(st.integers(1, 4))]
    raw = bytes(body) + struct.pack("<I", crc32(bytes(body)))
    try:
        s = unpack_layer(raw)
    except LayoutError as err:
        assert "\n" not in str(err)
        return
    assert pack_layer(s) == raw
    for out in ("exact", "bf16"):
        assert np.isfinite(decode_layer(s, out)).all()


# -- vector sets ---------------------------------------------------------------------------------------------

@fuzz(60)
@given(data=st.data())
def test_vector_index_mutations(made, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("v")
    for f in made["vectors"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    doc = json.loads((d / "vectors.json").read_text())
    (d / "vectors.json").write_text(json.dumps(data.draw(json_edits(doc))))
    try:
        layers = read_vectors(d)
    except VectorError as err:
        assert "\n" not in str(err)
        return
    for lay in layers:                                  # whatever was accepted is usable
        assert lay.codes.shape == (len(lay.headers), lay.layout.group)


@fuzz(40)
@given(kind=st.sampled_from(["blocks", "bf16", "exact", "axis_load", "exact_hex"]), data=st.data())
def test_vector_file_mutations_are_caught_by_the_checksums(made, tmp_path_factory, kind, data):
    d = tmp_path_factory.mktemp("w")
    for f in made["vectors"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    suffix = {"blocks": "blocks.hex", "bf16": "bf16.hex", "exact": "exact.txt", "axis_load": "axis_load.hex",
              "exact_hex": "exact.hex"}[kind]
    target = next(d.glob(f"*.{suffix}"))
    raw = bytearray(target.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]))
    raw[at] = new
    target.write_bytes(bytes(raw))
    with pytest.raises(VectorError, match="SHA-256 does not match"):
        read_vectors(d)


EDITS = {   # (file, its first line replaced by): what the error says; each was an OverflowError, a bare
            # ValueError without the file, or accepted (a 5-digit BF16, a sign of 7)
    ("blocks", "1" + "0" * 18): "a block as 18 hex digits", ("blocks", "-1"): "a block as 18 hex digits",
    ("bf16", "zz"): "a BF16 value as 4 hex digits", ("bf16", "1bdc4"): "a BF16 value as 4 hex digits",
    ("bf16", "-1"): "a BF16 value as 4 hex digits", ("exact", "1 x 576"): "'sign exp sig' (decimal)",
    ("exact", "7 -3 5"): "'sign exp sig' (decimal)", ("exact", "0 1 " + "9" * 30): "'sign exp sig' (decimal)",
}


@pytest.mark.parametrize("kind,line", list(EDITS))
def test_a_vector_file_edited_with_its_checksum_is_one_line_naming_the_line(made, tmp_path, kind, line):
    """A vector set edited by hand or by another tool, its SHA-256 recomputed: each malformed line is a
    VectorError naming the file and the line."""
    import hashlib

    d = tmp_path / "v"
    d.mkdir()
    for f in made["vectors"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    doc = json.loads((d / "vectors.json").read_text())
    target = d / doc["layers"][0]["files"][kind]
    lines = target.read_text().split("\n")
    target.write_text("\n".join([line] + lines[1:]))
    doc["layers"][0]["sha256"][kind] = hashlib.sha256(target.read_bytes()).hexdigest()
    (d / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(VectorError) as info:
        read_vectors(d)
    assert str(info.value) == f"{target}: line 1: expected {EDITS[kind, line]}, got {line!r}"


SHAPE_EDITS = {   # a layer's rows / cols / width edited: read_vectors never looked at them (an outside review)
    "rows": ("bogus", "field 'rows' must be int, got str"),
    "cols": (-7, "field 'cols' must be a count, got -7"),
    "width": ([1], "field 'width' must be a count, got [1]"),
}


@pytest.mark.parametrize("key, edit", [*(("set", k) for k in SHAPE_EDITS), ("rows+1", "rows"), ("width-g", "width"),
                                       ("width+1", "width"), ("no width", "width")])
def test_a_layers_shape_fields_are_checked(made, tmp_path, key, edit):
    d = tmp_path / "v"
    d.mkdir()
    for f in made["vectors"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    doc = json.loads((d / "vectors.json").read_text())
    lay, g = doc["layers"][0], doc["layout"]["group"]
    said = {"rows+1": f"{lay['rows'] + 1} rows x {lay['cols']} columns is not {lay['n_blocks']} blocks of {g}",
            "width-g": f"field 'width' {lay['cols'] - g} must be the layer's width before padding",
            "width+1": f"field 'width' {lay['cols'] + 1} must be the layer's width before padding"}.get(key)
    if key == "set":
        lay[edit], said = SHAPE_EDITS[edit]
    elif key == "no width":
        del lay["width"]                                   # a set written before the field: read as cols
    else:
        lay[edit] = {"rows+1": lay["rows"] + 1, "width-g": lay["cols"] - g, "width+1": lay["cols"] + 1}[key]
    (d / "vectors.json").write_text(json.dumps(doc))
    if said is None:
        assert len(read_vectors(d)) == len(doc["layers"])
        return
    with pytest.raises(VectorError) as info:
        read_vectors(d)
    assert said in str(info.value) and "layers[0]" in str(info.value)


# -- eval results (the input of `sop report`) ----------------------------------------------------------------

def mutated_eval_json(made, tmp_path_factory, data) -> Path:
    src = tmp_path_factory.mktemp("j") / "e.json"
    src.write_text(json.dumps(data.draw(json_edits(json.loads(made["json"].read_text())))))
    return src


@fuzz(80)
@given(data=st.data())
def test_eval_json_mutations_read(made, tmp_path_factory, data):
    """The loader and the table of `sop report` (the plot is fuzzed below, fewer times: it is slow)."""
    src = mutated_eval_json(made, tmp_path_factory, data)
    try:
        rows = load_rows(json.loads(src.read_text()), str(src))
    except ValueError as err:
        assert str(err).startswith(str(src)) and "\n" not in str(err)
        return
    assert markdown_table(rows).count("\n") == len(rows) + 2


@fuzz(8)
@given(data=st.data())
def test_eval_json_mutations_report(made, tmp_path_factory, data):
    src = mutated_eval_json(made, tmp_path_factory, data)
    try:
        info = report(src)
    except ValueError as err:
        assert str(err).startswith(str(src)) and "\n" not in str(err)
        return
    assert info["md"].read_text().startswith("# Quantization report")
    assert info["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
