"""`sop dequantize --gguf` (quantize/gguf_export.py): a quantized GGUF back as a GGUF file llama.cpp runs.
Tiny GGUFs in llama.cpp's layout (test_causal_lm's Llama with a Q8_0 embedding and Q8_0 layers, a metadata
value of each GGUF type and a custom alignment; test_causal_lm_moe_gguf's Qwen2-MoE with fused experts):
the output read back with gguf's own reader, every key and every tensor the artifact does not hold as the
source holds it, every layer golden's decode of its record (recomputed here from the layer stream through
golden's decoder, float32 and BF16), transformers' logits on the file those of the `--model-folder` export
of the same artifact, and every refusal one line with the files left as they were."""

import contextlib
import hashlib
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.formats import to_float32
from sop.quantize import causal_lm as L
from sop.quantize.artifact import open_artifact

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
L.quiet_transformers()

import test_causal_lm as T  # noqa: E402
from test_causal_lm import bpe_tokenizer, make_folder, one_error, reference_model  # noqa: E402

Q8_0, F32, BF16 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32,
                   gguf.GGMLQuantizationType.BF16)
ALIGNMENT = 64                              # not gguf's default 32: the output must keep the source's
QUIET = ["--quiet", "--no-calib"]


def _more_metadata(finish):
    """test_causal_lm's ``finish_gguf`` writing first what a real GGUF holds beside the test Llama's keys: the
    file type (llama.cpp's MOSTLY_Q8_0), a custom alignment, and a value of each GGUF type the Llama has not."""
    def more(w, result):
        w.add_file_type(7)
        w.add_custom_alignment(ALIGNMENT)
        for add, value in ((w.add_uint8, 7), (w.add_int8, -3), (w.add_uint16, 65535), (w.add_int16, -2),
                           (w.add_int32, -70000), (w.add_uint64, 2 ** 40 + 1), (w.add_int64, -(2 ** 40)),
                           (w.add_float64, 1 / 3), (w.add_bool, True), (w.add_float32, 0.1)):
            add(f"sop.test.{add.__name__[4:]}", value)
        w.add_array("sop.test.floats", [0.5, -1.25, 1e-30])
        w.add_array("sop.test.strings", ["a", "\u00fc", "x y"])
        return finish(w, result)
    return more


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny Llama as a GGUF (its embedding and ffn_gate/ffn_up Q8_0, the rest F32), and its artifact."""
    base = tmp_path_factory.mktemp("gguf_export")
    tok = bpe_tokenizer()
    folder = make_folder(base / "llama", "llama", tok)
    emb = reference_model(folder).state_dict()["model.embed_tokens.weight"].numpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "finish_gguf", _more_metadata(T.finish_gguf))
        src = T.write_llama_gguf(base / "tiny.gguf", folder, tok, embd_raw=(gguf.quants.quantize(emb, Q8_0), Q8_0))
    art = base / "tiny.sopq"
    assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), *QUIET]) == 0
    return SimpleNamespace(base=base, folder=folder, gguf=src, art=art, tokenizer=tok)


def golden_decode(art_path, tensor: str, dtype: str) -> np.ndarray:
    """The tensor ``tensor`` as the export must write it, from the artifact's layer streams through golden's
    decoder alone: float32 (the exact value rounded once) or the BF16 bit patterns (uint16); a fused tensor's
    experts stacked."""
    entries = [e for e in open_artifact(art_path).layers if (e.stack[0] if e.stack else e.name) == tensor]
    parts = []
    for e in entries:
        assert e.kind == "sopl" and not e.transposed
        rows, cols = e.shape
        w = decode_layer(open_artifact(art_path).stream(e), "exact" if dtype == "float32" else "bf16")[:rows, :cols]
        parts.append(to_float32(w) if dtype == "float32"
                     else (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16))
    return np.stack(parts) if entries[0].stack else parts[0]


def assert_the_sources_with_its_layers_decoded(src_path, out_path, art_path, dtype: str, file_type=None) -> None:
    """``out_path`` holds every key/value of ``src_path`` in order and as stored but ``general.file_type``
    (``file_type``; None: removed), its alignment, every tensor in order with its name and shape, the artifact's
    layers as golden decodes them and every other tensor byte for byte."""
    src, out = gguf.GGUFReader(str(src_path)), gguf.GGUFReader(str(out_path))
    keys = [k for k in src.fields if not k.startswith("GGUF.")]
    assert "general.file_type" in keys
    kept = keys if file_type is not None else [k for k in keys if k != "general.file_type"]
    assert [k for k in out.fields if not k.startswith("GGUF.")] == kept
    for k in kept:
        a, b = src.fields[k], out.fields[k]
        if k == "general.file_type":
            assert b.types == a.types and b.contents() == file_type != a.contents()
        else:
            assert a.types == b.types and [bytes(p) for p in a.parts] == [bytes(p) for p in b.parts], k
    assert int(out.alignment) == ALIGNMENT == int(src.alignment)
    layers = {e.stack[0] if e.stack else e.name for e in open_artifact(art_path).layers}
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for s, o in zip(src.tensors, out.tensors):
        assert list(o.shape) == list(s.shape) and (o.data_offset - out.data_offset) % ALIGNMENT == 0, s.name
        if s.name not in layers:
            assert o.tensor_type == s.tensor_type and bytes(o.data) == bytes(s.data), s.name
            continue
        want = golden_decode(art_path, s.name, dtype)
        order = "<" if out.endianess == gguf.GGUFEndian.LITTLE else ">"    # the file's, whatever this machine's
        if dtype == "float32":
            assert o.tensor_type == F32
            got = np.asarray(o.data).view(order + "u4")
        else:
            assert o.tensor_type == BF16
            got = np.asarray(o.data).view(order + "u2").reshape(want.shape)
        np.testing.assert_array_equal(got, want.view(got.dtype.newbyteorder("=")), err_msg=s.name)
    assert layers <= {t.name for t in src.tensors}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gguf_is_the_sources_with_each_layer_goldens_decode(llama, tmp_path, capsys, dtype):
    out = tmp_path / "q.gguf"
    assert main(["dequantize", str(llama.art), "--gguf", "--dtype", dtype, "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert re.fullmatch(re.escape(f"wrote {out}: a GGUF file of 14 decoded tensors in {dtype} (14 quantized layers, "
                                  f"sop4-g16) and 6 copied from {llama.gguf}, {out.stat().st_size:,} bytes (")
                        + r"\d+\.\d s\)\n", said.out), said.out
    assert said.err.count("\n") == 14 and "dequantize [14/14] blk.1.ffn_down.weight 32x48: " in said.err
    assert_the_sources_with_its_layers_decoded(llama.gguf, out, llama.art, dtype)     # the Q8_0 embedding stays
    assert gguf.GGUFReader(str(out)).tensors[0].tensor_type == Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]            # no temporary file left


def test_a_moe_ggufs_experts_are_decoded_into_their_fused_tensors(tmp_path):
    from test_causal_lm_moe_gguf import make_folder as moe_folder
    from test_causal_lm_moe_gguf import write_gguf

    with pytest.MonkeyPatch.context() as mp:
        import test_causal_lm_moe_gguf as M

        mp.setattr(M, "finish_gguf", _more_metadata(M.finish_gguf))
        src = write_gguf(tmp_path / "moe.gguf", moe_folder(tmp_path / "moe", "qwen2moe"), "qwen2moe")
    art, out = tmp_path / "moe.sopq", tmp_path / "out.gguf"
    assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), *QUIET]) == 0
    assert any(e.stack for e in open_artifact(art).layers)
    assert main(["dequantize", str(art), "--gguf", "--out", str(out), "--quiet"]) == 0
    # every tensor F32 now (the router and the embedding were F32): llama.cpp's ALL_F32
    assert_the_sources_with_its_layers_decoded(src, out, art, "float32", file_type=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_big_endian_gguf_goes_back_big_endian(llama, tmp_path, dtype):
    """A big-endian GGUF of float tensors (gguf_convert_endian.py's; sop reads it): the keys packed, the copied
    tensors kept and the decoded ones written in its byte order."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "finish_gguf", _more_metadata(T.finish_gguf))
        src = T.write_llama_gguf(tmp_path / "be.gguf", llama.folder, llama.tokenizer, quantize_ffn=False,
                                 big_endian=True)
    art, out = tmp_path / "be.sopq", tmp_path / "out.gguf"
    assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), *QUIET]) == 0
    assert main(["dequantize", str(art), "--gguf", "--dtype", dtype, "--out", str(out), "--quiet"]) == 0
    assert gguf.GGUFReader(str(out)).endianess == gguf.GGUFEndian.BIG
    # float32: every tensor F32 (ALL_F32); bfloat16: the F32 embedding beside BF16 layers, no one type
    assert_the_sources_with_its_layers_decoded(src, out, art, dtype, file_type=0 if dtype == "float32" else None)


def test_transformers_runs_the_gguf_with_the_model_folders_logits(llama, tmp_path):
    """Both exports of one artifact in float32 are one model: every parameter and every logit equal (transformers
    dequantizes the Q8_0 embedding as the folder export's reference does, through gguf, and un-permutes Q/K)."""
    from transformers.models.auto import AutoModelForCausalLM

    (tmp_path / "g").mkdir()
    out, folder = tmp_path / "g" / "q.gguf", tmp_path / "folder"
    assert main(["dequantize", str(llama.art), "--gguf", "--out", str(out), "--quiet"]) == 0
    assert main(["dequantize", str(llama.art), "--model-folder", "--out", str(folder), "--quiet"]) == 0
    ran = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32,
                                               local_files_only=True).eval()
    exported = reference_model(folder)
    ids = torch.tensor([llama.tokenizer("the model runs in llama.cpp as it ran here")["input_ids"]])
    with torch.inference_mode():
        got, want = ran(input_ids=ids).logits, exported(input_ids=ids).logits
    assert got.dtype == torch.float32 and ids.shape[1] > 5
    assert torch.equal(got, want)
    theirs = exported.state_dict()
    for name, value in ran.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    # and the quantized model is not the reference: the layers were replaced
    assert not torch.equal(got, reference_model(llama.folder)(input_ids=ids).logits)


def test_file_type_is_llama_cpps_one_type_or_none():
    """llama.h: LLAMA_FTYPE_ALL_F32 = 0 (every tensor F32), LLAMA_FTYPE_MOSTLY_BF16 = 32 (every matrix BF16,
    the norms F32, as llama.cpp's converter writes --outtype bf16); any mix has no single type."""
    from sop.quantize.gguf_export import file_type_of

    assert file_type_of([(F32, 2), (F32, 1), (F32, 3)]) == 0
    assert file_type_of([(BF16, 2), (F32, 1), (BF16, 3)]) == 32
    assert file_type_of([(F32, 2), (Q8_0, 2), (F32, 1)]) is None
    assert file_type_of([(BF16, 2), (F32, 2)]) is None


def test_an_all_f32_source_exported_in_float32_says_all_f32(llama, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "finish_gguf", _more_metadata(T.finish_gguf))
        src = T.write_llama_gguf(tmp_path / "f.gguf", llama.folder, llama.tokenizer, quantize_ffn=False)
    art, out = tmp_path / "f.sopq", tmp_path / "out.gguf"
    assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), *QUIET]) == 0
    assert main(["dequantize", str(art), "--gguf", "--out", str(out), "--quiet"]) == 0
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.file_type"].contents() == 0 and gguf.GGUFReader(str(src)).fields[
        "general.file_type"].contents() == 7
    assert list(fields).index("general.file_type") == list(gguf.GGUFReader(str(src)).fields).index("general.file_type")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_artifact_of_no_gguf_is_refused_naming_the_model_folder(llama, tmp_path, capsys):
    art, out = tmp_path / "f.sopq", tmp_path / "out.gguf"
    assert main(["quantize", str(llama.folder), "--format", "sop4-g16", "--out", str(art), *QUIET]) == 0
    err = one_error(capsys, ["dequantize", str(art), "--gguf", "--out", str(out)])
    assert err == (f"sop: error: {art}: --gguf writes a GGUF back from an artifact of a GGUF file; this one was "
                   f"quantized from '{llama.folder}' (safetensors): write the decoded layers alone as safetensors "
                   f"without --gguf, or, of a causal LM transformers runs, a model folder with --model-folder")
    assert not out.exists()


@pytest.mark.parametrize("target", ["gguf", "art"])
def test_the_gguf_export_never_writes_over_an_input(llama, capsys, target):
    path = getattr(llama, target)
    before = _digest(path)
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(path)])
    assert err == f"sop: error: {path}: the output is the input {path}; refusing to overwrite an input " \
                  f"(choose another --out)"
    assert _digest(path) == before


def test_the_gguf_export_refuses_a_folder_another_name_and_another_model(llama, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(tmp_path / "d")])
    assert err == f"sop: error: {tmp_path / 'd'}: the output exists and is a folder; refusing to replace it " \
                  f"with a regular file"
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(tmp_path / "q.safetensors")])
    assert err == f"sop: error: {tmp_path / 'q.safetensors'}: `sop dequantize --gguf` writes a GGUF file, which " \
                  f"every reader takes by its name's ending: this name would be read as a .safetensors checkpoint; " \
                  f"name it {tmp_path / 'q.gguf'}"          # (it said q.safetensors.gguf: read as a GGUF, misnamed)
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(tmp_path / "q")])
    assert err.endswith(f": this name would be read as no file type; name it {tmp_path / 'q.gguf'}")
    other = T.write_llama_gguf(tmp_path / "other.gguf", llama.folder, llama.tokenizer)
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(tmp_path / "q.gguf"),
                             "--model", str(other)])
    assert err == f"sop: error: {llama.art} was made from another checkpoint than {other} (the model " \
                  f"fingerprints differ); give the source with --model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "other.gguf"]


def test_gguf_with_model_folder_is_one_line(llama, tmp_path, capsys):
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--model-folder", "--out", str(tmp_path / "x")])
    assert err == "sop: error: --gguf and --model-folder are two outputs: give one (--gguf: a GGUF file llama.cpp " \
                  "runs, --model-folder: a transformers folder)"
    assert not (tmp_path / "x").exists()


def test_a_dtype_a_gguf_export_has_not_is_a_usage_error(llama, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    with pytest.raises(SystemExit) as stop:                 # a usage error: argparse's exit
        main(["dequantize", str(llama.art), "--gguf", "--dtype", "float16", "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("sop: error: sop dequantize: argument --dtype: invalid choice: 'float16'"), err
    assert not out.exists()
    assert main(["dequantize", str(llama.art), "--gguf", "--dtype", "bfloat16", "--out", str(out), "--quiet"]) == 0
    assert {t.tensor_type for t in gguf.GGUFReader(str(out)).tensors} == {Q8_0, F32, BF16}
    from sop.quantize.gguf_export import export_gguf

    with pytest.raises(ValueError, match=r"^dtype='float16': the GGUF file is written in 'float32' or 'bfloat16'$"):
        export_gguf(llama.art, tmp_path / "p.gguf", dtype="float16")        # (it said "the model folder")


@pytest.mark.parametrize("argv, said", [
    (["--gguf", "q.gguf"], "the following arguments are required: --out; "),
    (["--gguf", "q.gguf", "--out", "r.gguf"], "unrecognized arguments: q.gguf; "),
    (["--gguf=q.gguf", "--out", "r.gguf"], "argument --gguf: ignored explicit argument 'q.gguf'; ")])
def test_a_file_given_to_gguf_says_it_takes_no_value(llama, capsys, argv, said):
    """`--gguf OUT.gguf` reads as the file given, as `--model-folder DIR` does: the line says where it goes."""
    with pytest.raises(SystemExit) as stop:
        main(["dequantize", str(llama.art), *argv])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"sop: error: sop dequantize: {said}--gguf takes no value: the file to " \
                                      f"write is --out OUT.gguf (see sop dequantize --help)\n"


def test_an_export_stopped_halfway_leaves_the_earlier_file_and_no_other(llama, tmp_path, capsys, monkeypatch):
    """Ctrl-C at the fifth layer: the earlier OUT.gguf is as it was and no temporary file is left."""
    from sop.quantize import gguf_export

    out = tmp_path / "q.gguf"
    out.write_bytes(b"an earlier export")
    decoded, seen = gguf_export._decoded, []

    def stop_at_the_fifth(*args):
        seen.append(args)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return decoded(*args)

    monkeypatch.setattr(gguf_export, "_decoded", stop_at_the_fifth)
    assert main(["dequantize", str(llama.art), "--gguf", "--out", str(out), "--quiet"]) == 130
    assert len(seen) == 5 and out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]



@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes of a file fail as on a full disk (EFBIG, RLIMIT_FSIZE; SIGXFSZ ignored, whose
    default ends the process): the kernel's error, whatever writes (numpy's tofile too)."""
    import resource
    import signal

    before, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.0.attn_q.weight"])     # copied, decoded
def test_a_full_disk_is_one_line_naming_the_target(llama, tmp_path, capsys, tensor):
    """The disk fills up within a copied or a decoded tensor: the line names the target, which is as it was.
    numpy's tofile said `N requested and M written` (its OSError carries no errno: no full disk to golden.files)."""
    whole = tmp_path / "whole.gguf"
    assert main(["dequantize", str(llama.art), "--gguf", "--out", str(whole), "--quiet"]) == 0
    at = next(t.data_offset for t in gguf.GGUFReader(str(whole)).tensors if t.name == tensor)
    out = tmp_path / "q.gguf"
    out.write_bytes(b"an earlier export")
    with file_size_limit(int(at) + 100):
        err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(out), "--quiet"])
    assert err == f"sop: error: {out}: File too large; nothing was written (the target is as it was)"
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "whole.gguf"]


class _Raw(bytes):
    """A metadata value as the bytes a GGUF holds after its type (``_odd_metadata``): what gguf's writer
    refuses to write (an empty array) or re-packs (a NaN's payload), written as it is."""


def _odd_metadata(finish, alignment):
    """``finish_gguf`` writing first values other writers than gguf's Python one put in a GGUF (llama.cpp's
    C++ writes what it reads): an empty array, an array of arrays, strings that are not UTF-8, a signaling
    NaN; ``general.alignment`` where ``alignment`` is given (else GGUF's default 32)."""
    import struct

    V = gguf.GGUFValueType

    def more(w, result):
        pack = w._pack_val

        def raw_or_packed(val, vtype, add_vtype, sub_type=None):
            if isinstance(val, _Raw):
                return (struct.pack("<I", vtype) if add_vtype else b"") + bytes(val)
            return pack(val, vtype, add_vtype, sub_type)

        w._pack_val = raw_or_packed
        w.add_file_type(7)
        if alignment:
            w.add_custom_alignment(alignment)
        for key, vtype, value in (
                ("sop.test.empty", V.ARRAY, struct.pack("<IQ", V.INT32, 0)),
                ("sop.test.nested", V.ARRAY, struct.pack("<IQ", V.ARRAY, 2) + struct.pack("<IQi", V.INT32, 1, 5)
                 + struct.pack("<IQii", V.INT32, 2, 6, 7)),
                ("sop.test.latin1", V.STRING, struct.pack("<Q", 3) + b"\xfc\xe9x"),
                ("sop.test.bytes", V.ARRAY, struct.pack("<IQQ", V.STRING, 2, 1) + b"\xff" + struct.pack("<Q", 0)),
                ("sop.test.snan", V.FLOAT32, struct.pack("<I", 0x7F800001))):
            w.add_key_value(key, _Raw(value), vtype)
        return finish(w, result)
    return more


@pytest.mark.parametrize("alignment", [None, 256])
def test_every_key_is_copied_as_the_bytes_the_source_holds(llama, tmp_path, alignment):
    """An empty array and an array of arrays were refused (gguf's writer cannot write them), a signaling NaN
    came back quiet (re-packed through a Python float): every key/value is now the source's bytes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "finish_gguf", _odd_metadata(T.finish_gguf, alignment))
        src = T.write_llama_gguf(tmp_path / "odd.gguf", llama.folder, llama.tokenizer)
    art, out = tmp_path / "odd.sopq", tmp_path / "out.gguf"
    assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), "--include", "blk.1.*", *QUIET]) == 0
    assert main(["dequantize", str(art), "--gguf", "--out", str(out), "--quiet"]) == 0
    s, o = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert s.fields["sop.test.snan"].parts[-1].view(np.uint32)[0] == 0x7F800001     # the source is as meant
    assert [k for k in o.fields if k != "general.file_type"] == [k for k in s.fields if k != "general.file_type"]
    for k in o.fields:
        if not k.startswith("GGUF.") and k != "general.file_type":
            assert b"".join(map(bytes, o.fields[k].parts)) == b"".join(map(bytes, s.fields[k].parts)), k
    assert int(o.alignment) == (alignment or 32) == int(s.alignment)
    assert all((t.data_offset - o.data_offset) % (alignment or 32) == 0 for t in o.tensors)
    for a, b in zip(s.tensors, o.tensors, strict=True):       # blk.0 kept: its Q8_0 tensors' bytes too
        if not a.name.startswith("blk.1."):
            assert b.tensor_type == a.tensor_type and bytes(b.data) == bytes(a.data), a.name


@pytest.mark.parametrize("change", ["truncated", "rewritten"])
def test_a_source_changed_during_the_export_is_one_line(llama, tmp_path, capsys, monkeypatch, change):
    """The source GGUF truncated (or rewritten in place) while the export runs: it copied the bytes of the file
    as it now was (rewritten), or read the memory map past the file's end, which killed the process (SIGBUS),
    its temporary file left behind. Now the file is checked before each copy and at the end: one line."""
    from sop.quantize import gguf_export

    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / llama.gguf.name            # the same name: the same fingerprint
    src.write_bytes(llama.gguf.read_bytes())
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns - 10 ** 10))   # a rewrite's time differs
    later = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "blk.1.ffn_norm.weight")
    decoded = gguf_export._decoded

    def change_the_source(*args):
        if change == "truncated":
            os.truncate(src, int(later.data_offset))
        else:
            with open(src, "r+b") as f:
                f.seek(int(later.data_offset))
                f.write(bytes(int(later.n_bytes)))
        return decoded(*args)

    monkeypatch.setattr(gguf_export, "_decoded", change_the_source)
    out = tmp_path / "q.gguf"
    out.write_bytes(b"an earlier export")
    err = one_error(capsys, ["dequantize", str(llama.art), "--gguf", "--out", str(out), "--model", str(src),
                             "--quiet"])
    assert re.fullmatch(re.escape(f"sop: error: {src}: tensor ") + r"blk\.0\.\w+\.weight" + re.escape(
        " cannot be read: the file changed since it was opened (size, modification time or inode); run again on "
        "the file as it is now"), err), err
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "src"]
