"""quantize.models on bad checkpoints: every class of damage ends in one clean CheckpointError (a
ValueError whose one-line message starts with the file), never a traceback, a hang, unbounded memory
or a silently different result; and the fuzz suite over each loader kind (tests/fuzzing.py)."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import fuzz
from hypothesis import given, strategies as st
from safetensors.numpy import save as st_save, save_file

from sop.cli import main
from sop.quantize import models
from sop.quantize.models import CheckpointError, minilm_folder, open_model

RNG = np.random.default_rng(1)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def bad(spec, *, at=None, match=None, **kw) -> CheckpointError:
    """open_model + loading every layer raises CheckpointError naming ``at`` (default: spec) on one line."""
    with pytest.raises(CheckpointError) as info:
        m = open_model(str(spec), **kw)
        for lay in m.layers:
            m.load(lay.name)
    msg = str(info.value)
    assert msg.startswith(f"{at if at is not None else spec}: ") and "\n" not in msg, msg
    if match is not None:
        assert match in msg, msg
    return info.value


def read_all(spec) -> dict:
    m = open_model(str(spec))
    return {lay.name: m.load(lay.name) for lay in m.layers}


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape and np.array_equal(got[k], want[k], equal_nan=True), k


# -- every file: empty, a directory, not a regular file, unreadable ---------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ".gguf"])
def test_empty_file(tmp_path, suffix):
    p = tmp_path / f"m{suffix}"
    p.write_bytes(b"")
    bad(p, match="empty file (0 bytes)")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".gguf"])
def test_garbage_file_with_the_right_suffix(tmp_path, suffix):
    p = tmp_path / f"m{suffix}"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = bad(p)
    assert {".safetensors": "over the format's limit", ".pt": "not a torch checkpoint",
            ".gguf": "not a GGUF file"}[suffix] in str(err)


def test_a_directory_named_like_a_checkpoint(tmp_path):
    d = tmp_path / "x.safetensors"
    d.mkdir()
    with pytest.raises(ValueError, match="x.safetensors: is a directory, not a checkpoint file, and holds no"):
        open_model(str(d))
    # inside a model folder, a directory the glob finds is named
    outer = tmp_path / "model"
    (outer / "a.safetensors").mkdir(parents=True)
    bad(outer, at=outer / "a.safetensors", match="is a directory, not a checkpoint file")


def test_not_a_regular_file_is_never_opened(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)                                   # opening it would block for ever
    bad(fifo, match="not a regular file")


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    save_file({"l.weight": f32(4, 4)}, p)
    p.chmod(0)
    if os.geteuid() == 0:                             # root reads anything: let access() say what it would
        real = os.access
        monkeypatch.setattr(models.os, "access", lambda q, mode: False if Path(q) == p else real(q, mode))
    bad(p, match="not readable (permission denied)")


# -- safetensors ------------------------------------------------------------------------------------

def st_bytes() -> bytes:
    return st_save({"a.weight": f32(4, 8), "b.weight": f32(3, 5).astype(np.float16), "c.bias": f32(3)})


def st_header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def st_with_header(data: bytes, header: dict) -> bytes:
    n, _ = st_header(data)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


@pytest.mark.parametrize("claim,match", [(2 ** 63, "over the format's limit"), (2 ** 64 - 1, "over the format's limit"),
                                         (100_000_001, "over the format's limit"),
                                         (10_000, "truncated: the header length field claims 10000 bytes")])
def test_safetensors_header_length_claims(tmp_path, claim, match):
    """An enormous or too-long header length is refused from 8 bytes: nothing is allocated for it."""
    data = st_bytes()
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", claim) + data[8:])
    bad(p, match=match)
    p.write_bytes(struct.pack("<Q", len(data) - 7) + data[8:])     # one byte more than the file holds
    bad(p, match=f"truncated: the header length field claims {len(data) - 7} bytes")


def test_safetensors_truncated_at_every_length(tmp_path):
    data = st_bytes()
    p = tmp_path / "m.safetensors"
    for n in range(1, len(data)):
        p.write_bytes(data[:n])
        bad(p, match="truncated")


def test_safetensors_header_not_json(tmp_path):
    data = st_bytes()
    n, _ = st_header(data)
    p = tmp_path / "m.safetensors"
    p.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    bad(p, match="the header is not valid JSON")


def test_safetensors_byte_length_that_does_not_match_dtype_and_shape_is_refused(tmp_path):
    """F32 x [4, 7] in 128 bytes would be misread: refused, naming the tensor and both sizes."""
    data = st_bytes()
    _, h = st_header(data)
    h["a.weight"]["shape"] = [4, 7]
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_with_header(data, h))
    bad(p, match="tensor a.weight: F32 x [4, 7] needs 112 bytes, its data_offsets [0, 128] hold 128")


def test_safetensors_overlapping_tensors_and_trailing_bytes(tmp_path):
    data = st_bytes()
    _, h = st_header(data)
    p = tmp_path / "m.safetensors"
    h2 = json.loads(json.dumps(h))
    h2["c.bias"]["data_offsets"] = [0, 12]             # c.bias would read a.weight's bytes
    p.write_bytes(st_with_header(data, h2))
    bad(p, match="tensors overlap or leave a gap")
    p.write_bytes(data + b"\0" * 5)
    bad(p, match="5 bytes follow the last tensor's data")
    p.write_bytes(data + b"\0")                                  # the least: one byte
    bad(p, match="1 bytes follow the last tensor's data")


def test_safetensors_unsupported_float_dtype_of_a_selected_layer(tmp_path, capsys):
    data = st_save({"a.weight": np.zeros((4, 8), np.uint8)})
    _, h = st_header(data)
    h["a.weight"]["dtype"] = "F8_E8M0"
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_with_header(data, h))
    bad(p, match="layer a.weight has dtype F8_E8M0, which is not read (F16, F32, F64, BF16, F8_E4M3, F8_E5M2 are); "
                 "exclude= it")                              # from Python its parameter; the command's option:
    assert main(["quantize", str(p), "--format", "nf4-g64", "--out", str(tmp_path / "q.sopq"), "--no-calib"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("are); --exclude it") and not (tmp_path / "q.sopq").exists()
    with pytest.raises(ValueError, match="no linear layer selected"):    # excluded, it is no problem
        open_model(str(p), exclude=["a.*"])


@pytest.mark.parametrize("shape", [(0, 8), (8, 0)])
def test_zero_size_layer_is_named(tmp_path, shape):
    p = tmp_path / "m.safetensors"
    save_file({"ok.weight": f32(4, 4), "empty.weight": np.zeros(shape, np.float32)}, p)
    bad(p, match=f"layer empty.weight has shape {shape}: a linear layer needs at least one row and one column")
    assert list(read_all_excluding(p, "empty.*")) == ["ok.weight"]


def read_all_excluding(p, glob):
    m = open_model(str(p), exclude=[glob])
    return {lay.name: m.load(lay.name) for lay in m.layers}


def test_file_changed_after_open_is_an_error_not_a_misread(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a.weight": f32(4, 8)}, p)
    m = open_model(str(p))
    save_file({"a.weight": f32(2, 8)}, p)
    with pytest.raises(CheckpointError,
                       match=r"tensor a.weight was read as shape \(2, 8\), the file declares \(4, 8\)"):
        m.load("a.weight")


# -- torch ------------------------------------------------------------------------------------------

def torch_state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(4, 8), "b.weight": torch.randn(3, 5).half(), "c.bias": torch.randn(3)}


def torch_bytes(legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(torch_state(), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_truncated_at_every_length(tmp_path, legacy):
    data = torch_bytes(legacy)
    p = tmp_path / "m.pt"
    for n in range(1, len(data), 3):
        p.write_bytes(data[:n])
        bad(p)


def test_torch_legacy_storage_size_claim_is_bounded_by_the_file(tmp_path):
    """A legacy pickle that declares a huge storage is refused before torch allocates it."""
    sd = {"a.weight": torch.zeros(4, 8)}
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    # the element count is pickled as BININT1 32 after the storage's location 'cpu' (and its memo put)
    i = data.index(b"X\x03\x00\x00\x00cpu") + 10
    assert data[i:i + 2] == b"K\x20"
    p = tmp_path / "m.pt"
    p.write_bytes(data[:i] + b"\x8a\x08" + (2 ** 62).to_bytes(8, "little") + data[i + 2:])   # LONG1 2**62
    bad(p, match=f"elements, the pickle declares {2 ** 62})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_torch_zip_data_corruption_fails_the_crc(tmp_path, dtype):
    """The memory-mapped zip is CRC-checked on each read path: numpy's own type (float16, 32, 64) and
    torch's float32 conversion (bfloat16)."""
    torch.manual_seed(0)
    t = torch.randn(4, 8).to(dtype)
    p = tmp_path / "m.pt"
    torch.save({"a.weight": t, "c.bias": torch.randn(3)}, p)
    data = bytearray(p.read_bytes())
    i = bytes(data).index(t.view(torch.uint8).numpy().tobytes())
    data[i + 5] ^= 0x40
    p.write_bytes(bytes(data))
    bad(p, match="tensor a.weight: its data fails the zip archive's CRC-32 check")


def test_torch_zip_without_crcs_still_loads(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(torch_state(), tmp_path / "m.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert_same(read_all(tmp_path / "m.pt"), {k: v.float().numpy().astype(np.float64)
                                              for k, v in torch_state().items() if k.endswith("weight")})


def _torch_file(tmp_path, tensor, legacy=False):
    p = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # torch: sparse CSR support is "beta"
        torch.save({"ok.weight": torch.ones(2, 2), "x.weight": tensor}, p,
                   _use_new_zipfile_serialization=not legacy)
    return p


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_sparse_meta_and_quantized_tensors_are_refused(tmp_path, legacy):
    w = torch.randn(4, 8)
    p = _torch_file(tmp_path, w.to_sparse(), legacy)
    bad(p, match="layer x.weight is sparse (sparse_coo); only dense tensors are read")
    p = _torch_file(tmp_path, torch.empty(4, 8, device="meta"), legacy)
    bad(p, match="layer x.weight has no data (a meta tensor)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # torch: quantized tensors are deprecated
        q = torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)
    p = _torch_file(tmp_path, q, legacy)
    bad(p, match="layer x.weight is a quantized torch tensor (qint8)")
    p = _torch_file(tmp_path, torch.empty(0, 8), legacy)
    bad(p, match="layer x.weight has shape (0, 8)")


@pytest.mark.parametrize("tensor", [torch.ones(4, 8, dtype=torch.int64).to_sparse(),
                                    torch.empty(4, 8, dtype=torch.int64, device="meta")], ids=["sparse", "meta"])
def test_torch_sparse_or_meta_integer_tensors_are_no_layers(tmp_path, tensor):
    """An integer tensor is no linear layer whatever its layout: a sparse or meta one was taken for a
    floating-point layer and refused the whole checkpoint (an outside review)."""
    m = open_model(str(_torch_file(tmp_path, tensor)))
    assert [lay.name for lay in m.layers] == ["ok.weight"]


def test_torch_sparse_csr_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.randn(4, 8).to_sparse_csr()
    bad(_torch_file(tmp_path, csr), at=tmp_path / "m.pt")


@pytest.mark.parametrize("sd", [
    {"l.0.fc.weight": torch.ones(16, 32), "l.0": {"fc.weight": torch.full((16, 32), 2.0)}},
    {"model": {"l.0.fc.weight": torch.ones(16, 32), "l": {"0": {"fc": {"weight": torch.zeros(16, 32)}}}}},
    {"l": {0: {"fc.weight": torch.ones(16, 32)}, "0": {"fc.weight": torch.zeros(16, 32)}}}],
    ids=["dotted and nested", "under model", "int and str keys"])
def test_torch_nested_names_that_flatten_to_one_are_refused(tmp_path, sd):
    """Two tensors under one dotted name: the last one read was kept, the other quantized away
    without a word."""
    torch.save(sd, tmp_path / "m.pt")
    bad(tmp_path / "m.pt", match="two tensors are named l.0.fc.weight once its nested dicts are joined with dots")
    torch.save({"l": {"0": {"fc.weight": torch.ones(16, 32)}}, "l.1.fc.weight": torch.ones(8, 32)}, tmp_path / "ok.pt")
    assert [lay.name for lay in open_model(str(tmp_path / "ok.pt")).layers] == ["l.0.fc.weight", "l.1.fc.weight"]


def bits(a: np.ndarray) -> np.ndarray:
    """A float64 array's bit patterns: -0.0, subnormals and NaN payloads compared exactly."""
    return np.ascontiguousarray(a, np.float64).view(np.uint64)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_float64_and_float16_are_read_as_stored_like_safetensors(tmp_path, legacy):
    """A torch file's float64 reaches the loader unrounded, as a safetensors file's does: 1/3 is not
    float32's 1/3, 1e300 no Inf, 1e-320 (a float64 subnormal) no 0, and the range checks downstream
    see the same numbers from either file. Read-only: the array is a view of the reader's tensor."""
    w64 = np.array([[1 / 3, 1e300, -1e-320, -0.0], [np.pi, 2.0 ** -1074, -1e-300, -1.7e308]])
    w16 = f32(3, 5).astype(np.float16)
    p, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save({"a.weight": torch.from_numpy(w64), "b.weight": torch.from_numpy(w16)}, p,
               _use_new_zipfile_serialization=not legacy)
    save_file({"a.weight": w64, "b.weight": w16}, str(st))
    m, ref = open_model(str(p)), open_model(str(st))
    for name, want in (("a.weight", w64), ("b.weight", w16)):
        got = m.load(name)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)
        np.testing.assert_array_equal(bits(got), bits(ref.load(name)), err_msg=name)
        assert not m._reader.get(name).flags.writeable
        np.testing.assert_array_equal(bits(m.load(name)), bits(want), err_msg=name)      # read again: the same


def test_torch_non_contiguous_tensor_reads_correctly(tmp_path):
    w = torch.randn(8, 4)
    p = _torch_file(tmp_path, w.t())                    # a transposed view: strides (1, 4)
    np.testing.assert_array_equal(read_all(p)["x.weight"], w.t().numpy())


# -- GGUF -------------------------------------------------------------------------------------------

def gguf_file(path, tensors: dict):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_tensors():
    return {"blk.0.attn_q.weight": f32(4, 8), "blk.0.ffn_up.weight": f32(3, 4).astype(np.float16),
            "blk.0.attn_norm.weight": f32(8)}


@pytest.mark.parametrize("order", ["little", "big"])
def test_the_fast_gguf_parse_is_ggufs_own(tmp_path, order):
    """The reader parses a GGUF's metadata with gguf.GGUFReader's code, each value a view of a plain array
    rather than of the memmap (3x faster on a large vocabulary): every field and tensor as gguf's own parse
    gives it, in either byte order: offsets, types, the indices of the values and each part's dtype and
    values."""
    gguf = pytest.importorskip("gguf")
    from sop.quantize.tensor_readers import _fast_gguf_reader

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama", endianess=gguf.GGUFEndian.BIG if order == "big" else gguf.GGUFEndian.LITTLE)
    w.add_token_list([f"t{i}" for i in range(300)] + ["é", ""])
    w.add_token_scores([i / 7 for i in range(302)])
    w.add_token_types([1, 3] * 151)
    w.add_uint64("x.u64", 2**40 + 3)
    w.add_int8("x.i8", -5)
    w.add_bool("x.flag", True)
    w.add_float64("x.f64", -1.25)
    w.add_array("x.nested", [[1, 2], [3]])
    for k, v in gguf_tensors().items():
        w.add_tensor(k, v)
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(f32(4, 32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs, ours = gguf.GGUFReader(str(p)), _fast_gguf_reader()(str(p))
    assert type(ours).__mro__[1] is gguf.GGUFReader and ours.byte_order == theirs.byte_order
    assert list(ours.fields) == list(theirs.fields) and len(theirs.fields) > 10
    for name, want in theirs.fields.items():
        got = ours.fields[name]
        assert (got.offset, got.name, got.types, got.data) == (want.offset, want.name, want.types, want.data), name
        assert len(got.parts) == len(want.parts), name
        for a, b in zip(got.parts, want.parts):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    assert ours.fields["tokenizer.ggml.tokens"].contents()[-2:] == ["é", ""]
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == \
            (b.tensor_type, list(b.shape), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)


def test_gguf_truncated_at_every_length(tmp_path):
    src = tmp_path / "src.gguf"
    gguf_file(src, gguf_tensors())
    data = src.read_bytes()
    want = read_all(src)
    p = tmp_path / "m.gguf"
    for n in range(1, len(data)):
        p.write_bytes(data[:n])
        try:
            got = read_all(p)
        except CheckpointError as err:
            assert str(err).startswith(f"{p}: ") and "\n" not in str(err)
        else:                       # only the last tensor's alignment padding may go
            assert n >= len(data) - 31
            assert_same(got, want)


def test_gguf_huge_metadata_count_is_refused_at_once(tmp_path):
    """An array count that claims more than the file holds: refused from the header, nothing allocated."""
    src = tmp_path / "src.gguf"
    gguf_file(src, gguf_tensors())
    data = bytearray(src.read_bytes())
    i = bytes(data).index(b"general.architecture") + len("general.architecture")
    data[i:i + 4] = struct.pack("<I", 9)                # STRING -> ARRAY of INT32, 'llama...' as the count
    data[i + 4:i + 8] = struct.pack("<I", 5)
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(data))
    bad(p, match="metadata entry 'general.architecture' runs past the end of the file")


def test_gguf_overlapping_tensor_data(tmp_path):
    gguf = pytest.importorskip("gguf")
    src = tmp_path / "src.gguf"
    gguf_file(src, gguf_tensors())
    r = gguf.GGUFReader(str(src))
    q = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    off_at = int(q.field.offset) + sum(int(part.nbytes) for part in q.field.parts[:-1])
    del r
    data = bytearray(src.read_bytes())
    data[off_at:off_at + 8] = struct.pack("<Q", 0)    # ffn_up would read attn_q's bytes
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(data))
    bad(p, match="data overlaps tensor")


def test_gguf_zero_size_layer(tmp_path):
    p = tmp_path / "m.gguf"
    gguf_file(p, {"blk.0.attn_q.weight": np.zeros((0, 8), np.float32), "blk.0.attn_k.weight": f32(4, 8)})
    bad(p, match="layer blk.0.attn_q.weight has shape (0, 8)")


# -- HF folders: config.json against the weights -------------------------------------------------

def bert_state(H=8, inter=16, L=2):
    sd = {"embeddings.word_embeddings.weight": f32(30, H), "embeddings.position_embeddings.weight": f32(16, H),
          "embeddings.token_type_embeddings.weight": f32(2, H), "embeddings.LayerNorm.weight": f32(H),
          "embeddings.LayerNorm.bias": f32(H)}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for lin, (o, n) in (("attention.self.query", (H, H)), ("attention.self.key", (H, H)),
                            ("attention.self.value", (H, H)), ("attention.output.dense", (H, H)),
                            ("intermediate.dense", (inter, H)), ("output.dense", (H, inter))):
            sd[f"{p}{lin}.weight"], sd[f"{p}{lin}.bias"] = f32(o, n), f32(o)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = f32(H), f32(H)
    return sd


def bert_folder(tmp_path, sd, **cfg):
    d = tmp_path / "bert"
    d.mkdir(exist_ok=True)
    save_file(sd, d / "model.safetensors")
    shutil.copy(minilm_folder() / "tokenizer.json", d / "tokenizer.json")
    base = {"model_type": "bert", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "hidden_act": "gelu"}
    (d / "config.json").write_text(json.dumps(base | cfg))
    return d


def test_bert_folder_whose_config_matches_is_run(tmp_path):
    d = bert_folder(tmp_path, bert_state())
    assert open_model(str(d)).bert_folder == d


def test_a_bert_folder_of_torch_weights_says_it_runs_from_safetensors(tmp_path):
    """A BERT folder with pytorch_model.bin went to transformers' causal-LM loader (BertLMHeadModel) and was
    refused for a head it does not have (an outside review): it has no forward pass now, saying why."""
    d = bert_folder(tmp_path, bert_state())
    sd = {k: torch.from_numpy(v) for k, v in bert_state().items()}
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    src = open_model(str(d))
    assert src.forward is None and "runs its forward pass from safetensors weights only" in src.forward_note
    assert len(src.layers) == 12


@pytest.mark.parametrize("cfg,match", [
    ({"hidden_size": 384}, "model_type bert, hidden_size 384, intermediate_size 16, num_hidden_layers 2 gives "
                           "embeddings.word_embeddings.weight the shape ('*', 384), the weights have (30, 8)"),
    ({"intermediate_size": 32}, "encoder.layer.0.attention.self.query.weight the shape (8, 8)"),
    ({"num_hidden_layers": 3}, "needs tensor encoder.layer.2.attention.self.query.weight, which the weights lack"),
    ({"num_hidden_layers": 1}, "num_hidden_layers is 1, the weights hold encoder.layer.1 and more"),
    ({"num_attention_heads": 3}, "hidden_size 8 is not a multiple of num_attention_heads 3"),
    ({"hidden_size": "8"}, "hidden_size is '8', not a positive integer"),
    ({"hidden_act": "relu"}, "hidden_act 'relu': the BERT forward pass runs gelu only"),
])
def test_bert_config_that_does_not_match_its_weights(tmp_path, cfg, match):
    d = bert_folder(tmp_path, bert_state(), **cfg)
    if "intermediate_size" in cfg:
        match = "intermediate_size 32"
    bad(d, at=d / "config.json", match=match)


def test_bert_config_over_weights_of_another_architecture(tmp_path):
    d = bert_folder(tmp_path, {"model.layers.0.self_attn.q_proj.weight": f32(8, 8)})
    bad(d, at=d / "config.json", match="needs tensor embeddings.word_embeddings.weight, which the weights lack")


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object (a JSON list)"),
                                        ("\udcff", "not UTF-8 text")])
def test_config_json_that_is_not_json(tmp_path, text, match):
    d = tmp_path / "llama"
    d.mkdir()
    save_file({"l.weight": f32(4, 4)}, d / "model.safetensors")
    (d / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    bad(d, at=d / "config.json", match=match)


def test_tokenizer_json_that_is_not_json(tmp_path):
    d = bert_folder(tmp_path, bert_state())
    (d / "tokenizer.json").write_text("{")
    bad(d, at=d / "tokenizer.json", match="not valid JSON")


# -- the command line: one line, exit 2 ---------------------------------------------------------------

@pytest.mark.parametrize("name,content", [("m.safetensors", b"\xff" * 64), ("m.pt", b"PK\x03\x04junk"),
                                          ("m.gguf", b"GGUF\x03\x00\x00\x00"), ("m.bin", b"")],
                         ids=["safetensors", "torch-zip", "gguf", "empty"])
def test_cli_reports_one_line_and_exit_2(tmp_path, capsys, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    rc = main(["quantize", str(p), "--format", "sop4-g16", "--out", str(tmp_path / "o.sopq"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"sop: error: {p}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o.sopq").exists()


# -- sharded folders: what transformers loads, and every shard its index names --------------------------

SHARDS = {"model-00001-of-00002": {"l.0.fc.weight": (16, 32), "l.1.fc.weight": (16, 32)},
          "model-00002-of-00002": {"l.2.fc.weight": (32, 16)}}


def sharded(folder: Path, kind: str = "safetensors") -> dict[str, np.ndarray]:
    """A sharded checkpoint as transformers writes it (shards + index); its tensors."""
    folder.mkdir()
    ext, index = ("safetensors", "model.safetensors.index.json") if kind == "safetensors" else \
        ("bin", "pytorch_model.bin.index.json")
    tensors, weight_map = {}, {}
    for shard, shapes in SHARDS.items():
        part = {n: f32(*shape) for n, shape in shapes.items()}
        name = f"{shard}.{ext}" if kind == "safetensors" else f"pytorch_{shard}.{ext}"
        if kind == "safetensors":
            save_file(part, str(folder / name))
        else:
            torch.save({n: torch.from_numpy(w) for n, w in part.items()}, folder / name)
        tensors.update(part)
        weight_map.update(dict.fromkeys(part, name))
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_sharded_folder_reads_what_its_index_names(tmp_path, kind):
    """Every layer of every shard, and nothing else in the folder: a stray checkpoint beside the
    shards (Mistral ships a consolidated.safetensors in other names) is not what transformers loads."""
    tensors = sharded(tmp_path / "m", kind)
    save_file({"layers.0.attention.wq.weight": f32(16, 16)}, str(tmp_path / "m" / "consolidated.safetensors"))
    m = open_model(str(tmp_path / "m"))
    assert {lay.name for lay in m.layers} == set(tensors)
    for name, w in tensors.items():
        np.testing.assert_array_equal(m.load(name), w)


def test_a_folder_with_another_librarys_shard_index_reads_its_shards(tmp_path, capsys):
    """diffusers names its index diffusion_pytorch_model.safetensors.index.json: the shards it names
    are the model, checked as transformers' index is (a stale shard beside them was read too, and a
    missing one left its layers out without a word); two such indexes are refused."""
    tensors = sharded(tmp_path / "m")
    folder = tmp_path / "m"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    (folder / "model.safetensors.index.json").rename(index)
    save_file({"stale.fc.weight": f32(16, 16)}, str(folder / "old-00001-of-00001.safetensors"))
    m = open_model(str(folder))
    assert {lay.name for lay in m.layers} == set(tensors) and len(m.files) == 2
    (folder / "model-00002-of-00002.safetensors").unlink()
    bad(folder, at=index, match="names shard model-00002-of-00002.safetensors (1 tensor), which is missing")
    (folder / "other.safetensors.index.json").write_text(index.read_text())
    rc = main(["quantize", str(folder), "--format", "sop4-g16", "--out", str(tmp_path / "o.sopq"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"sop: error: {folder}: 2 shard indexes (diffusion_pytorch_model.safetensors"
                               ".index.json, other.safetensors.index.json); which model is meant is unclear: keep "
                               "one in the folder\n")


def test_a_single_model_file_wins_over_other_checkpoints_in_its_folder(tmp_path):
    """As transformers chooses: model.safetensors, not every *.safetensors beside it."""
    (tmp_path / "m").mkdir()
    w = f32(16, 32)
    save_file({"l.0.fc.weight": w}, str(tmp_path / "m" / "model.safetensors"))
    save_file({"adapter.fc.weight": f32(8, 32)}, str(tmp_path / "m" / "adapter_model.safetensors"))
    m = open_model(str(tmp_path / "m"))
    assert [lay.name for lay in m.layers] == ["l.0.fc.weight"] and m.files == [tmp_path / "m" / "model.safetensors"]


def test_a_dangling_model_file_link_is_refused_not_passed_over(tmp_path):
    """A Hugging Face cache snapshot whose model.safetensors link lost its blob (an interrupted
    download) is an error naming the link, not a quiet fall back to other files in the folder."""
    sharded(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    bad(tmp_path / "m", at=tmp_path / "m" / "model.safetensors", match="cannot be read (No such file or directory)")


def _damage_index(folder: Path, damage: str) -> str:
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    if damage == "missing shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
        return "names shard model-00002-of-00002.safetensors (1 tensor), which is missing: the checkpoint is incomplete"
    if damage == "shard is a folder":
        (folder / "model-00002-of-00002.safetensors").unlink()
        (folder / "model-00002-of-00002.safetensors").mkdir()
        return "which is not a regular file"
    if damage == "swapped shards":
        doc["weight_map"]["l.2.fc.weight"] = "model-00001-of-00002.safetensors"
        doc["weight_map"]["l.0.fc.weight"] = "model-00002-of-00002.safetensors"
        index.write_text(json.dumps(doc))
        return "puts tensor l.0.fc.weight in model-00002-of-00002.safetensors, which does not hold it " \
               "(model-00001-of-00002.safetensors does)"
    if damage == "a tensor no shard holds":
        doc["weight_map"]["l.9.fc.weight"] = "model-00002-of-00002.safetensors"
        index.write_text(json.dumps(doc))
        return "puts tensor l.9.fc.weight in model-00002-of-00002.safetensors, which does not hold it"
    if damage == "shard outside the folder":
        doc["weight_map"]["l.2.fc.weight"] = "../model-00002-of-00002.safetensors"
        index.write_text(json.dumps(doc))
        return "names shard '../model-00002-of-00002.safetensors', which is no file name in its folder"
    if damage == "weight_map a list":
        index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
        return "its weight_map is not an object of tensor names to shard files"
    index.write_text("{")
    return "not valid JSON"


@pytest.mark.parametrize("damage", ["missing shard", "shard is a folder", "swapped shards", "a tensor no shard holds",
                                    "shard outside the folder", "weight_map a list", "index not JSON"])
def test_a_sharded_folder_whose_index_and_shards_disagree_is_refused(tmp_path, capsys, damage):
    """A missing shard once quantized the other shards as the whole model, without a word."""
    sharded(tmp_path / "m")
    said = _damage_index(tmp_path / "m", damage)
    index = tmp_path / "m" / "model.safetensors.index.json"
    bad(tmp_path / "m", at=index, match=said)
    rc = main(["quantize", str(tmp_path / "m"), "--format", "sop4-g16", "--out", str(tmp_path / "o.sopq"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"sop: error: {index}: ") and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "o.sopq").exists()


# -- fuzz: mutated checkpoints of each kind ------------------------------------------------------------
#
# The property: open_model + loading every layer either raises CheckpointError naming the file, or
# returns a correct result. Truncation and insertion must give the original tensors exactly or the
# error. An overwrite is checked against what the damaged bytes say where the format cannot tell
# (no checksum): safetensors against an independent decoding of the damaged file; torch zip has CRCs,
# so original-or-error everywhere; in the legacy torch and GGUF formats an overwrite of tensor data
# must read as the overwritten bytes, and one of their headers may be a valid, different file.

@st.composite
def mutations(draw):
    """(kind, where as a fraction of the file, bytes): truncation, insertion or overwrite."""
    kind = draw(st.sampled_from(["truncate", "insert", "overwrite"]))
    return kind, draw(st.integers(0, 2 ** 20)), b"" if kind == "truncate" else draw(st.binary(min_size=1, max_size=12))


def mutate(data: bytes, m) -> bytes:
    kind, at, new = m
    pos = at % (len(data) + (kind == "insert"))
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + new + data[pos:]
    return data[:pos] + new[:len(data) - pos] + data[pos + len(new):]


def touches(data: bytes, m, lo: int, hi: int) -> bool:
    kind, at, new = m
    pos = at % len(data)
    return kind == "overwrite" and pos < hi and pos + len(new) > lo


def outcome(path: Path):
    """The tensors read, or None after a clean CheckpointError (any other exception fails the test)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return read_all(path)
    except CheckpointError as err:
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)
        return None
    except ValueError as err:                       # nothing left to read is the one other clean error
        assert str(err).startswith(f"{path}: no linear layer selected"), str(err)
        return None


def st_oracle(data: bytes) -> dict:
    """An independent reading of a safetensors file's F16/F32 2-D ``*weight`` tensors."""
    n = struct.unpack("<Q", data[:8])[0]
    body = data[8 + n:]
    out = {}
    for k, e in json.loads(data[8:8 + n]).items():
        if k != "__metadata__" and e["dtype"] in ("F16", "F32") and len(e["shape"]) == 2 and k.endswith("weight"):
            a, b = e["data_offsets"]
            dt = {"F16": "<f2", "F32": "<f4"}[e["dtype"]]
            with np.errstate(invalid="ignore"):              # a signalling NaN casts to NaN
                out[k] = np.frombuffer(body[a:b], dt).reshape(e["shape"]).astype(np.float64)
    return out


def data_spans(data: bytes, named: dict) -> dict:
    """Where each named array's bytes sit in the file."""
    out = {}
    for k, a in named.items():
        i = data.index(a.tobytes())
        out[k] = (i, i + a.nbytes, a.dtype.str, a.shape)
    return out


class Originals:
    def __init__(self, d: Path):
        self.dir = d
        self.st = st_bytes()
        (d / "o.safetensors").write_bytes(self.st)
        self.st_want = read_all(d / "o.safetensors")
        self.zip, self.legacy = torch_bytes(False), torch_bytes(True)
        named = {k: v.numpy() for k, v in torch_state().items() if k.endswith("weight")}
        self.torch_want = {k: v.astype(np.float64) for k, v in named.items()}
        self.legacy_spans = data_spans(self.legacy, named)
        t = gguf_tensors()
        gguf_file(d / "o.gguf", t)
        self.gguf = (d / "o.gguf").read_bytes()
        self.gguf_want = read_all(d / "o.gguf")
        self.gguf_spans = data_spans(self.gguf, {k: v for k, v in t.items() if v.ndim == 2})


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    return Originals(tmp_path_factory.mktemp("fuzz-models"))


def check_unchecksummed(p: Path, original: bytes, want: dict, spans: dict, m) -> None:
    """The property for a format without a checksum (legacy torch, GGUF): the clean error, the
    original tensors after a cut or an insertion, and after an overwrite of tensor data exactly
    the changed bytes read at their place (an overwrite elsewhere only has to end cleanly)."""
    mutated = mutate(original, m)
    p.write_bytes(mutated)
    got = outcome(p)
    if got is None:
        return
    if m[0] != "overwrite":
        assert_same(got, want)
    elif any(touches(original, m, lo, hi) for lo, hi, _, _ in spans.values()):
        check_overwrite(got, want, spans, mutated, m, original)


def check_overwrite(got: dict, want: dict, spans: dict, mutated: bytes, m, original: bytes):
    """Layers whose data bytes were overwritten read as those bytes; the others are unchanged."""
    assert list(got) == list(want)
    for k, (lo, hi, dt, shape) in spans.items():
        with np.errstate(invalid="ignore"):                  # a signalling NaN casts to NaN
            exp = np.frombuffer(mutated[lo:hi], dt).reshape(shape).astype(np.float64) \
                if touches(original, m, lo, hi) else want[k]
        np.testing.assert_array_equal(got[k], exp)


@pytest.mark.fuzz
@fuzz(500)
@given(m=mutations())
def test_fuzz_safetensors(orig, m):
    p = orig.dir / "m.safetensors"
    mutated = mutate(orig.st, m)
    p.write_bytes(mutated)
    got = outcome(p)
    if got is None:
        return
    if m[0] != "overwrite":
        assert_same(got, orig.st_want)
    else:                                           # no checksum: what the damaged file says, read right
        want = st_oracle(mutated)
        assert set(got) <= set(want)
        for k, v in got.items():
            np.testing.assert_array_equal(v, want[k])


@pytest.mark.fuzz
@fuzz(500)
@given(m=mutations())
def test_fuzz_torch_zip(orig, m):
    p = orig.dir / "z.pt"
    p.write_bytes(mutate(orig.zip, m))
    got = outcome(p)
    if got is not None:                             # the CRCs make any damage an error
        assert_same(got, orig.torch_want)


@pytest.mark.fuzz
@fuzz(500)
@given(m=mutations())
def test_fuzz_torch_legacy(orig, m):
    # an overwrite inside the pickle (no checksum) may be a valid, different state dict
    check_unchecksummed(orig.dir / "l.pt", orig.legacy, orig.torch_want, orig.legacy_spans, m)


@pytest.mark.fuzz
@fuzz(600)
@given(m=mutations())
def test_fuzz_gguf(orig, m):
    # an overwrite in the header (no checksum) may be a valid, different file
    check_unchecksummed(orig.dir / "m.gguf", orig.gguf, orig.gguf_want, orig.gguf_spans, m)


_TRUNCATED_WHILE_OPEN = """
import sys, numpy as np
from sop.quantize.models import CheckpointError, open_model
path, name = sys.argv[1], sys.argv[2]
m = open_model(path)
first = m.load(name)
total = float(first.sum())
with open(path, "r+b") as f:                # in place: the same inode, shorter
    f.truncate(64)
assert float(first.sum()) == total          # read before: a copy, out of the memory map
try:
    m.load(name)
except CheckpointError as err:
    print(err)
"""


@pytest.mark.parametrize("kind", ["torch-zip", "gguf"])
def test_a_memory_mapped_checkpoint_truncated_while_open(tmp_path, kind):
    """A torch zip (``torch.load(mmap=True)``) and a GGUF are memory-mapped: a layer handed out as a view
    of the map, then the file truncated, was a SIGBUS (exit 135, no line, a temporary file left). Now a
    layer read is a copy, and a read after the change is a ``CheckpointError``. In a child process, so
    that a regression fails this test instead of killing the test run."""
    if kind == "gguf":
        p, name = tmp_path / "m.gguf", "blk.0.attn_q.weight"
        gguf_file(p, {name: f32(64, 64)})
    else:
        p, name = tmp_path / "m.pt", "a.weight"
        torch.save({name: torch.randn(64, 64)}, p)
    run = subprocess.run([sys.executable, "-c", _TRUNCATED_WHILE_OPEN, str(p), name], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.startswith(f"{p}: tensor {name} cannot be read: the file changed since it was opened"), run
