"""The .sopq artifact: `sop quantize` / `sop dequantize` round trips bit for bit, the container
layout as documented, every truncation and byte flip a clear error, and no partial output
file after an interrupted run."""

import dataclasses
import os
import re
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.layout import pack_layer, unpack_layer
from sop.quantize import artifact as A
from sop.quantize import schemes as F
from sop.quantize.models import open_model

MINILM_LAYERS = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight"]
SOP_FORMATS = ["sop4-g16", "e2m3-ue4m4-g16"]


# -- an independent reader of the documented container (docs/quantizer.md) ---------------------------

def parse_container(data: bytes):
    """(header dict, {layer name: record bytes}) read by the documented byte layout."""
    magic, version, reserved, hlen = struct.unpack_from("<4sHHI", data, 0)
    assert (magic, version, reserved) == (b"SOPQ", 1, 0)
    header = data[12:12 + hlen]
    assert struct.unpack_from("<I", data, 12 + hlen)[0] == zlib.crc32(header)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])
    meta = json.loads(header)
    start = 16 + hlen
    assert len(data) == start + meta["data_bytes"] + 4
    records = {}
    for e in meta["layers"]:
        rec = data[start + e["offset"]:start + e["offset"] + e["length"]]
        if e["record"] == "sopl":       # the record ends in its own CRC: the whole's is the residue
            assert zlib.crc32(rec) == 0x2144DF1C and e["crc32"] == struct.unpack("<I", rec[-4:])[0]
        else:
            assert zlib.crc32(rec) == e["crc32"]
        records[e["name"]] = rec
    return meta, records


def load_safetensors(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# -- a small checkpoint: a padded width and an HF Conv1D (stored transposed) ---------------------------

TOY_SHAPES = {"blk.0.fc.weight": (16, 48), "blk.1.proj.weight": (8, 40), "h.0.attn.c_attn.weight": (32, 96)}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    tensors = {n: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for n, s in TOY_SHAPES.items()}
    tensors["blk.0.norm.weight"] = torch.ones(48)                 # not a linear layer: not quantized
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def toy_sop4(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "toy.sopq"
    assert main(["quantize", str(toy), "--format", "sop4-g16", "--out", str(out), "--quiet"]) == 0
    return out


def expected_recons(model, fmt: str) -> dict:
    src = open_model(str(model))
    q = F.get_quant_format(fmt)
    return {lay.name: q.quantize(src.load(lay.name), act_ms=None, name=lay.name) for lay in src.layers}


# -- round trips ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SOP_FORMATS)
def test_minilm_round_trip_is_bit_exact(tmp_path, fmt):
    art, out = tmp_path / "m.sopq", tmp_path / "w.safetensors"
    inc = sum((["--include", n] for n in MINILM_LAYERS), [])
    assert main(["quantize", "minilm", "--format", fmt, "--out", str(art), "--no-calib", "--quiet", *inc]) == 0
    assert main(["dequantize", str(art), "--out", str(out), "--quiet"]) == 0
    got = load_safetensors(out)
    assert list(got) == MINILM_LAYERS                      # the source names, in the source order
    meta, records = parse_container(art.read_bytes())
    assert meta["format"]["name"] == fmt and not meta["calibration"]["weighted"]
    assert len(meta["model"]["fingerprint"]) == 64
    src = open_model("minilm", include=MINILM_LAYERS)
    q = F.get_quant_format(fmt)
    for name in MINILM_LAYERS:
        res = q.quantize(src.load(name), act_ms=None, name=name)
        assert same_bits(got[name], res.recon.astype(np.float32)), name
        # the record is exactly the golden stream, and decoding it gives the same bits
        assert records[name] == pack_layer(res.stream)
        assert same_bits(got[name], decode_layer(unpack_layer(records[name])).astype(np.float32)), name
        e = next(e for e in meta["layers"] if e["name"] == name)
        assert e["record"] == "sopl" and e["shape"] == list(src.layer(name).shape)
        assert e["bits"] == res.bits == res.stream.bits and e["choice"] == res.choice


def test_padding_transpose_and_baselines_round_trip(toy, toy_sop4, tmp_path):
    art_nf4 = tmp_path / "nf4.sopq"
    assert main(["quantize", str(toy), "--format", "nf4-g64", "--out", str(art_nf4), "--quiet"]) == 0
    for art, fmt, kind in ((toy_sop4, "sop4-g16", "sopl"), (art_nf4, "nf4-g64", "f32")):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["dequantize", str(art), "--out", str(out), "--quiet"]) == 0
        meta, _ = parse_container(art.read_bytes())
        entries = {e["name"]: e for e in meta["layers"]}
        assert {e["record"] for e in entries.values()} == {kind}
        got = load_safetensors(out)
        assert set(got) == set(TOY_SHAPES)                  # linear layers only: no norm
        for name, res in expected_recons(toy, fmt).items():
            stored = TOY_SHAPES[name]
            assert got[name].shape == stored                # the checkpoint's orientation
            want = res.recon.T if name.startswith("h.0") else res.recon
            assert same_bits(got[name], want.astype(np.float32)), (fmt, name)
        # width 40 is padded to a whole block in the stream and cropped on the way out
        assert entries["blk.1.proj.weight"]["padded_shape"] == ([8, 48] if kind == "sopl" else [8, 40])
        assert entries["h.0.attn.c_attn.weight"]["transposed"] is True
        # the output opens as a model with the source's layers
        back = open_model(str(out))
        assert [(l.name, l.shape) for l in back.layers] == [(l.name, l.shape) for l in open_model(str(toy)).layers]


def test_same_input_gives_the_same_bytes(toy, toy_sop4, tmp_path):
    again = tmp_path / "again.sopq"
    assert main(["quantize", str(toy), "--format", "sop4-g16", "--out", str(again), "--quiet"]) == 0
    assert again.read_bytes() == toy_sop4.read_bytes()


def test_sop_budget_stores_each_layer_as_chosen(toy, tmp_path):
    art, out = tmp_path / "b.sopq", tmp_path / "b.safetensors"
    assert main(["quantize", str(toy), "--format", "sop-budget", "--budget", "7", "--out", str(art),
                 "--quiet"]) == 0
    assert main(["dequantize", str(art), "--out", str(out), "--quiet"]) == 0
    src = open_model(str(toy))
    want = F.quantize_sop_budget({l.name: (src.load(l.name), None) for l in src.layers}, 7.0)
    meta, _ = parse_container(art.read_bytes())
    got = load_safetensors(out)
    assert meta["budget"] == 7.0 and "budget" in meta["budget_report"]
    for e in meta["layers"]:
        res = want.results[e["name"]]
        assert e["record"] == ("sopl" if res.stream is not None else "f32")
        assert e["choice"].startswith(want.choice[e["name"]] + ":")
        w = res.recon.T if e["transposed"] else res.recon
        assert same_bits(got[e["name"]], w.astype(np.float32)), e["name"]
    assert sum(e["bits"] for e in meta["layers"]) <= 7.0 * sum(a * b for a, b in TOY_SHAPES.values())


# -- bad input: every truncation, every byte flip ----------------------------------------------------------

def regions(data: bytes) -> dict:
    hlen = struct.unpack_from("<I", data, 8)[0]
    meta = json.loads(data[12:12 + hlen])
    start = 16 + hlen
    return {"hlen": hlen, "start": start, "layers": meta["layers"], "size": len(data)}


def test_every_truncation_is_a_clear_error(toy_sop4, tmp_path):
    data = toy_sop4.read_bytes()
    bad = tmp_path / "t.sopq"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(A.ArtifactError) as err:
            A.open_artifact(bad)
        msg = str(err.value)
        assert ("not a SOPQ artifact" in msg) if n < 4 else ("truncated" in msg), (n, msg)
    bad.write_bytes(data + b"\0")
    with pytest.raises(A.ArtifactError, match="trailing bytes"):
        A.open_artifact(bad)


def test_every_byte_flip_is_caught_and_named(toy_sop4, tmp_path):
    data = toy_sop4.read_bytes()
    r = regions(data)
    bad = tmp_path / "f.sopq"
    for i in range(len(data)):
        for mask in (0x01 << (i % 8), 0xFF):
            flipped = bytearray(data)
            flipped[i] ^= mask
            bad.write_bytes(bytes(flipped))
            with pytest.raises(A.ArtifactError) as err:
                A.open_artifact(bad)
            msg = str(err.value)
            if i < 4:
                want = "not a SOPQ artifact"
            elif i < 6:
                want = "version"
            elif i < 8:
                want = "reserved"
            elif i < 12:
                want = "header"                               # the header length: no fit, or its CRC fails
            elif i < r["start"]:
                want = "header checksum mismatch"
            elif i < r["size"] - 4:
                off = i - r["start"]
                e = next(e for e in r["layers"] if e["offset"] <= off < e["offset"] + e["length"])
                want = f"layer {e['name']}: record checksum mismatch"
            else:
                want = "whole-file checksum mismatch"
            assert want in msg, (i, mask, msg)


def test_two_records_of_one_length_trading_places_are_caught(tmp_path, capsys):
    """A sopl record ends in its own CRC, so the CRC of every intact one is the same residue, and the
    whole-file CRC does not change when two records of one length trade places: such a file decoded
    each layer as the other's without a word (an outside probe, 2026-12-06). The header names a sopl
    record by its own CRC; a file written before, whose entries hold the residue, still opens."""
    art = tmp_path / "m.sopq"
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"]
    assert main(["quantize", "minilm", "--format", "sop4-g16", "--out", str(art), "--no-calib", "--quiet",
                 "--include", names[0], "--include", names[1]]) == 0
    capsys.readouterr()
    data = art.read_bytes()
    meta, records = parse_container(data)
    a, b = meta["layers"]
    assert a["length"] == b["length"] and records[a["name"]] != records[b["name"]]
    start = 16 + struct.unpack_from("<I", data, 8)[0]
    swapped = data[:start] + records[b["name"]] + records[a["name"]] + data[-4:]
    assert zlib.crc32(swapped[:-4]) == zlib.crc32(data[:-4])           # the whole-file CRC cannot see it
    bad, out = tmp_path / "swapped.sopq", tmp_path / "w.safetensors"
    bad.write_bytes(swapped)
    assert main(["dequantize", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sop: error: ") and err.count("\n") == 1 and not out.exists()
    assert f"{bad}: layer {a['name']}: record checksum mismatch" in err
    # a file written before the fix: its sopl entries hold the residue; it opens and decodes as it did
    old = tmp_path / "old.sopq"
    old.write_bytes(rebuild(data, lambda m, body: [e.update(crc32=zlib.crc32(records[e["name"]]))
                                                   for e in m["layers"]]))
    for e in meta["layers"]:
        assert same_bits(A.open_artifact(old).weights(e["name"]), A.open_artifact(art).weights(e["name"]))


def rebuild(data: bytes, edit) -> bytes:
    """The container with its header changed by ``edit(meta)`` and every checksum recomputed."""
    hlen = struct.unpack_from("<I", data, 8)[0]
    meta = json.loads(data[12:12 + hlen])
    body = data[16 + hlen:-4]
    changed = edit(meta, body)
    body = changed if isinstance(changed, bytes) else body
    h = json.dumps(meta).encode()
    out = struct.pack("<4sHHI", b"SOPQ", 1, 0, len(h)) + h + struct.pack("<I", zlib.crc32(h)) + body
    return out + struct.pack("<I", zlib.crc32(out))


def _empty_first_record(meta, body):
    """Layer 0's record cut to 0 bytes, the later offsets and data_bytes moved to match."""
    e = meta["layers"][0]
    for later in meta["layers"][1:]:
        later["offset"] -= e["length"]
    meta["data_bytes"] -= e["length"]
    rest = body[e["length"]:]
    e.update(length=0, crc32=0)
    return rest


def _swap_kind(meta, body):
    e = meta["layers"][0]                                    # 16 x 48, no padding: passes the shape check
    e["record"] = "f32"


def _wrong_padded(meta, body):
    meta["layers"][1]["padded_shape"] = [8, 64]


def _bad_stream(meta, body):
    e = meta["layers"][0]
    rec = bytearray(body[e["offset"]:e["offset"] + e["length"]])
    rec[30] ^= 0x10                                          # inside the golden stream: its own CRC fails
    e["crc32"] = zlib.crc32(bytes(rec))
    return body[:e["offset"]] + bytes(rec) + body[e["offset"] + e["length"]:]


def _nonfinite_f32(meta, body):
    """Layer 0 (16 x 48) replaced by an f32 record holding a NaN and an Inf; every CRC made good."""
    e = meta["layers"][0]
    w = np.zeros((16, 48), "<f4")
    w[3, 5], w[7, 1] = np.nan, np.inf
    rec = w.tobytes()
    start, end = e["offset"], e["offset"] + e["length"]
    for later in meta["layers"][1:]:
        later["offset"] += len(rec) - e["length"]
    meta["data_bytes"] += len(rec) - e["length"]
    e.update(record="f32", padded_shape=[16, 48], length=len(rec), crc32=zlib.crc32(rec))
    return body[:start] + rec + body[end:]


INCONSISTENT = {
    "missing field": (lambda m, b: m["layers"][1].pop("crc32"), "field 'crc32' is missing"),
    "mistyped field": (lambda m, b: m["layers"][0].update(shape="16x48"), "must be list"),
    "overlapping records": (lambda m, b: m["layers"][1].update(offset=0), "does not follow"),
    "an empty record": (_empty_first_record, "does not follow"),
    "wrong data size": (lambda m, b: m.update(data_bytes=m["data_bytes"] - 1), "data_bytes"),
    "unknown record kind": (lambda m, b: m["layers"][0].update(record="zip"), "unknown record kind"),
    "not a sopq header": (lambda m, b: m.update(container="zip"), "container"),
    "duplicate layer": (lambda m, b: m["layers"][1].update(name=m["layers"][0]["name"]), "appears twice"),
    "record kind swapped": (_swap_kind, "float32 record of"),
    "padded shape": (_wrong_padded, "stream is 8 x 48"),
    "shape cropped by a block": (lambda m, b: m["layers"][0].update(shape=[m["layers"][0]["shape"][0],
                                                                          m["layers"][0]["shape"][1] - 16]),
                                 "padded to"),
    # the entry's crc32 that of the corrupt record: a sopl record's whole CRC must be the residue
    "corrupt stream, good crc": (_bad_stream, "layer blk.0.fc.weight: record checksum mismatch"),
    "layer named __metadata__": (lambda m, b: m["layers"][0].update(name="__metadata__"),
                                 "layer name '__metadata__' cannot be written to safetensors"),
    "empty layer name": (lambda m, b: m["layers"][0].update(name=""), "cannot be written"),
    "lone surrogate in a layer name": (lambda m, b: m["layers"][0].update(name="a\udc80b"),
                                       "not valid Unicode: a lone surrogate"),
    "model of the wrong type": (lambda m, b: m.update(model=["x"]), "field 'model' must be dict, got list"),
    "fingerprint of the wrong type": (lambda m, b: m["model"].update(fingerprint=7), "'fingerprint' must be str"),
    "negative bits": (lambda m, b: m["layers"][2].update(bits=-5), "'bits' is negative"),
    "hif bias out of range": (lambda m, b: _edit_stream(m, b, 0, 16, -3), "HIF bias -3 out of range"),
    "non-finite float32 record": (_nonfinite_f32, "holds 2 non-finite values (the first, nan, at row 3, column 5)"),
}


def _edit_stream(meta, body, layer: int, at: int, value: int) -> bytes:
    """Set byte ``at`` of a layer's golden stream (a signed value) and recompute both its CRCs."""
    e = meta["layers"][layer]
    rec = bytearray(body[e["offset"]:e["offset"] + e["length"]])
    rec[at] = value & 0xFF
    rec[-4:] = struct.pack("<I", zlib.crc32(bytes(rec[:-4])))
    e["crc32"] = zlib.crc32(bytes(rec))
    return body[:e["offset"]] + bytes(rec) + body[e["offset"] + e["length"]:]


def test_a_deeply_nested_header_is_a_clear_error(toy_sop4, tmp_path, capsys):
    data = toy_sop4.read_bytes()
    hlen = struct.unpack_from("<I", data, 8)[0]
    deep = b"[" * 200_000 + b"]" * 200_000                   # beyond any JSON parser's recursion limit
    h = data[12:12 + hlen].rstrip()[:-1] + b', "x": ' + deep + b"}"
    body = data[16 + hlen:-4]
    out = struct.pack("<4sHHI", b"SOPQ", 1, 0, len(h)) + h + struct.pack("<I", zlib.crc32(h)) + body
    bad = tmp_path / "deep.sopq"
    bad.write_bytes(out + struct.pack("<I", zlib.crc32(out)))
    assert main(["dequantize", str(bad), "--out", str(tmp_path / "w.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "header JSON is nested too deeply" in err and "Traceback" not in err


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_inconsistent_content_with_good_checksums_is_refused(toy_sop4, tmp_path, case, capsys):
    edit, want = INCONSISTENT[case]
    bad = tmp_path / "x.sopq"
    bad.write_bytes(rebuild(toy_sop4.read_bytes(), edit))
    out = tmp_path / "w.safetensors"
    assert main(["dequantize", str(bad), "--out", str(out), "--quiet"]) == 2
    assert want in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.sopq"]      # nothing written, no temp file


@pytest.mark.parametrize("version, said", [
    (0, "written by an older sop (this one reads version 1): run `sop quantize` again to write it anew"),
    (2, "written by a newer sop (this one reads version 1): read it with that sop, or run `sop quantize` again"),
    (0xFFFF, "written by a newer sop"),
])
def test_another_container_version_is_refused_with_good_checksums(toy_sop4, tmp_path, version, said):
    """A file of another container version says which side is older and what to do (it said 'version 0 not
    supported (expected 1)'), before any checksum: another version may check its bytes otherwise."""
    data = bytearray(toy_sop4.read_bytes()[:-4])
    struct.pack_into("<H", data, 4, version)
    bad = tmp_path / "v.sopq"
    bad.write_bytes(bytes(data) + struct.pack("<I", zlib.crc32(data)))
    with pytest.raises(A.ArtifactError, match=re.escape(f"{bad}: .sopq container version {version}, {said}")):
        A.open_artifact(bad)
    bad.write_bytes(bytes(data) + b"\0\0\0\0")                # its checksums not this version's
    with pytest.raises(A.ArtifactError, match=re.escape(f"{bad}: .sopq container version {version}, {said}")):
        A.open_artifact(bad)


def test_a_float32_records_finite_check_holds_no_copy_of_the_layer():
    """The check that refuses a NaN or Inf in an f32 record reads the record in place: a
    byte-a-weight mask of the whole layer took ``sop dequantize`` from 4 to 5 bytes a weight."""
    rows, cols = 512, 1024
    data = np.linspace(-3, 3, rows * cols, dtype="<f4").tobytes()
    entry = A.LayerEntry("l", (rows, cols), (rows, cols), False, "f32", 0, len(data), 0, 32 * rows * cols, "f32")
    tracemalloc.start()
    try:
        w = A.decode_record(entry, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.shares_memory(w, np.frombuffer(data, np.uint8)) and w.shape == (rows, cols)
    assert peak < rows * cols // 8, peak                  # a mask would be rows * cols bytes


def test_rebuild_without_edit_is_accepted(toy_sop4, tmp_path):
    """The control for the test above: the rebuilt file itself is fine."""
    good = tmp_path / "g.sopq"
    good.write_bytes(rebuild(toy_sop4.read_bytes(), lambda m, b: None))
    art = A.open_artifact(good)
    assert [e.name for e in art.layers] == list(TOY_SHAPES)
    assert art.stream(art.layers[0]) is not None


def test_a_layer_is_read_by_its_entry_or_its_name(toy_sop4):
    """``weights("name")`` was an AttributeError (an outside probe): the methods took entries alone."""
    art = A.open_artifact(toy_sop4)
    for e in art.layers:
        assert same_bits(art.weights(e.name), art.weights(e)) and art.record(e.name) == art.record(e)
        by_name, by_entry = art.stream(e.name), art.stream(e)
        assert (by_name is None) == (by_entry is None)
        if by_entry is not None:
            assert by_name.blocks == by_entry.blocks and by_name.offset == by_entry.offset
    with pytest.raises(KeyError, match="nope is not a layer of"):
        art.weights("nope")


def test_an_unknown_layer_names_a_few_layers_and_their_count(toy_sop4):
    """`sop vectors --layer nope` listed every layer in its one error line (hundreds for an LLM; a docs
    walkthrough); now it names five and the count, as `sop gemv` does, through one helper."""
    art = A.open_artifact(toy_sop4)
    many = dataclasses.replace(art, layers=[dataclasses.replace(art.layers[0], name=f"blk.{i}.w") for i in range(12)])
    assert many.some_layer_names() == "blk.0.w, blk.1.w, blk.2.w, blk.3.w, blk.4.w, ... (12 in all)"
    assert art.some_layer_names(shown=len(art.layers)) == ", ".join(e.name for e in art.layers)
    with pytest.raises(KeyError, match=r"blk.9.x is not a layer of .*blk.4.w, \.\.\. \(12 in all\)"):
        many.entry("blk.9.x")


def test_not_an_artifact(tmp_path, capsys):
    assert main(["dequantize", str(tmp_path / "missing.sopq"), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "no such .sopq file" in capsys.readouterr().err
    p = tmp_path / "w.json"
    p.write_text("{}")
    with pytest.raises(A.ArtifactError, match="not a SOPQ artifact"):
        A.open_artifact(p)


# -- interrupted runs leave nothing behind -------------------------------------------------------------------

@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_quantize_leaves_no_file(toy, tmp_path, monkeypatch, exc):
    real = F.get_quant_format("sop4-g16")
    calls = []

    def failing(w, act_ms=None, name="layer", **kw):
        calls.append(name)
        if name == "blk.1.proj.weight":                      # the second layer
            raise exc("interrupted on the second layer")
        return real.quantize(w, act_ms=act_ms, name=name, **kw)

    monkeypatch.setattr(A, "get_quant_format", lambda n: dataclasses.replace(real, quantize=failing))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.sopq").write_bytes(b"the previous artifact")
    with pytest.raises(exc):
        A.quantize_model(str(toy), "sop4-g16", out_dir / "new.sopq", progress=False)
    with pytest.raises(exc):
        A.quantize_model(str(toy), "sop4-g16", out_dir / "old.sopq", progress=False)
    assert len(calls) == 4                                   # it did start writing, twice
    assert sorted(p.name for p in out_dir.iterdir()) == ["old.sopq"]
    assert (out_dir / "old.sopq").read_bytes() == b"the previous artifact"


def test_interrupted_dequantize_leaves_no_file(toy_sop4, tmp_path, monkeypatch):
    calls = []
    real = A.decode_layer

    def failing(stream, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(stream, *a, **kw)

    monkeypatch.setattr(A, "decode_layer", failing)
    out = tmp_path / "w.safetensors"
    with pytest.raises(OSError, match="disk full"):
        A.dequantize(toy_sop4, out, progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_bad_arguments_fail_before_any_work(toy, tmp_path, capsys):
    out = tmp_path / "x.sopq"
    assert main(["quantize", str(toy), "--format", "nf5", "--out", str(out), "--quiet"]) == 2
    assert "unknown format 'nf5'" in capsys.readouterr().err
    assert main(["quantize", str(toy), "--format", "sop-budget", "--out", str(out), "--quiet"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["quantize", str(toy), "--format", "nvfp4", "--budget", "4", "--out", str(out), "--quiet"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_what_it_wrote(toy, tmp_path, capsys):
    out = tmp_path / "x.sopq"
    assert main(["quantize", str(toy), "--format", "fp8-e4m3-pot", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: fp8-e4m3-pot, 3 layers" in text and "stored decoded, as float32" in text
    assert [p.name for p in tmp_path.iterdir()] == ["x.sopq"]          # no temporary file left
    art = A.open_artifact(out)
    assert art.format == "fp8-e4m3-pot" and art.meta["summary"]["weights"] == sum(
        a * b for a, b in TOY_SHAPES.values())
    assert art.stream(art.layers[0]) is None


@pytest.mark.parametrize("name, said", [("a" * (A.MAX_NAME + 1) + ".weight", f"over {A.MAX_NAME} characters"),
                                        ("x\udc80y.weight", "not valid Unicode: a lone surrogate")])
def test_a_layer_name_no_artifact_can_hold_is_refused_before_any_work(tmp_path, capsys, name, said):
    """A torch checkpoint's key may be any string: one that a decoded .sopq could not name (its reader
    refuses it; safetensors cannot load it) is refused by `sop quantize` before quantizing, naming the
    file, instead of writing an artifact that no reader takes."""
    ckpt = tmp_path / "w.pt"
    torch.save({name: torch.randn(16, 32)}, ckpt)
    assert main(["quantize", str(ckpt), "--format", "sop4-g16", "--no-calib", "--out", str(tmp_path / "q.sopq")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"sop: error: {ckpt}: layer ") and err.count("\n") == 1 and said in err, err
    assert "a .sopq cannot hold it" in err and out == "" and sorted(tmp_path.iterdir()) == [ckpt]


def test_a_checkpoint_whose_file_name_is_no_utf8_quantizes(tmp_path, capsys):
    """A file name is bytes: one that is no UTF-8 (Python holds it with a lone surrogate) once failed the
    fingerprint after every layer was quantized, with a message naming neither file nor cause."""
    ckpt = Path(os.fsdecode(bytes(tmp_path) + b"/w\xff.safetensors"))
    save_file({"l.weight": torch.randn(16, 32)}, str(ckpt))
    art = tmp_path / "q.sopq"
    assert main(["quantize", str(ckpt), "--format", "sop4-g16", "--no-calib", "--quiet", "--out", str(art)]) == 0
    assert A.open_artifact(art).meta["model"]["fingerprint"] == open_model(str(ckpt)).fingerprint()
    assert main(["dequantize", str(art), "--out", str(tmp_path / "w.safetensors"), "--quiet"]) == 0


@pytest.mark.parametrize("kind", ["f32", "sopl"])
@pytest.mark.parametrize("out", ["e4m3", "fp16"])
def test_decode_record_takes_golden_decoder_outputs_only_for_either_record_kind(toy, toy_sop4, tmp_path, kind, out):
    """``decode_record(out=)`` (``Artifact.weights``) is the decoder's output, ``"exact"`` or ``"bf16"``: an ``f32``
    record took any format's name (``"e4m3"`` returned the layer rounded to e4m3 as if the decoder emitted it,
    ``"fp16"`` was a KeyError) where a layer stream's decode refused it; both are the decoder's ValueError now."""
    art = toy_sop4 if kind == "sopl" else tmp_path / "f32.sopq"
    if kind == "f32":
        assert main(["quantize", str(toy), "--format", "nf4-g64", "--out", str(art), "--quiet"]) == 0
    a = A.open_artifact(art)
    e = a.layers[0]
    assert e.kind == kind
    with pytest.raises(ValueError, match=rf"^.*unknown output format '{out}'; valid: exact, bf16$"):
        a.weights(e, out)
