"""`sop dequantize --model-folder --dtype bfloat16` (quantize/hf_export.py): every quantized weight is golden's
exact decode rounded ONCE to BF16, every other tensor the reference's float32 value rounded to BF16, checked
against a rounding written here (numpy's frexp and round-half-even, no golden/, no ml_dtypes: ml_dtypes casts
float64 to bfloat16 through float32, rounding twice); the folder loads in transformers as bfloat16 and runs;
a layer whose exact value float32 rounds onto a BF16 tie shows the one rounding; bad values are one line."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.layout import LayerStream, Sparse, pack_layer
from sop.quantize import artifact as A
from sop.quantize import hf_export
from sop.quantize.artifact import open_artifact
from sop.quantize.hf_export import export_model_folder

pytest.importorskip("transformers")
from cli_run import run  # noqa: E402
from test_causal_lm import bpe_tokenizer, make_folder, reference_model  # noqa: E402

BF16_MAX = (2 - 2 ** -7) * 2.0 ** 127


def bf16_bits_oracle(x) -> np.ndarray:
    """The BF16 bit patterns of float64 values ``x`` rounded once, to nearest, ties to even: ``x = m 2^e``
    (frexp, exact), ``m 2^8`` rounded half to even (exact in float64), scaled back. Normal BF16 values only
    (these models have no weight below 2^-126 nor past BF16's largest: asserted, not assumed)."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    r = np.ldexp(np.rint(m * 256), e - 8)
    nonzero = r != 0
    assert np.all(np.abs(r[nonzero]) >= 2.0 ** -126) and np.all(np.abs(r) <= BF16_MAX)
    bits = r.astype(np.float32).view(np.uint32)                 # exact: an 8-bit significand
    assert not np.any(bits & 0xFFFF)
    return (bits >> 16).astype(np.uint16)


def saved_bits(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors as its BF16 bit patterns; each must be stored as bfloat16."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                assert t.dtype == torch.bfloat16, (k, t.dtype)
                out[k] = t.view(torch.int16).numpy().view(np.uint16)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("lm") / "llama", "llama", bpe_tokenizer())


def quantized(llama, tmp_path, fmt) -> Path:
    art = tmp_path / f"{fmt}.sopq"
    assert main(["quantize", str(llama), "--format", fmt, "--out", str(art), "--quiet", "--no-calib"]) == 0
    return art


def exact_values(art, e) -> np.ndarray:
    """A layer's exact decoded values (float64): golden's exact decode of its stream, an f32 record's values."""
    s = art.stream(e)
    if s is None:
        return np.frombuffer(bytes(art.record(e)), dtype="<f4").reshape(e.shape).astype(np.float64)
    return decode_layer(s, "exact")[:, :e.shape[1]]


@pytest.mark.parametrize("fmt", ["sop4-g16", "nf4-g64"], ids=["layer-streams", "f32-records"])
def test_a_bfloat16_folder_is_each_exact_value_rounded_once_and_loads_as_bfloat16(llama, tmp_path, capsys, fmt):
    art = quantized(llama, tmp_path, fmt)
    out = tmp_path / "bf16"
    assert main(["dequantize", str(art), "--model-folder", "--dtype", "bfloat16", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr()
    assert " a transformers model folder in bfloat16 (" in said.out and not said.err, said
    got = saved_bits(out)
    a = open_artifact(art)
    names = {e.name for e in a.layers}
    assert len(names) == 14 and {e.kind for e in a.layers} == {"sopl" if fmt.startswith("sop") else "f32"}
    for e in a.layers:
        want = bf16_bits_oracle(exact_values(a, e))
        np.testing.assert_array_equal(got[e.name], want, err_msg=e.name)
        np.testing.assert_array_equal(a.weights(e, "bf16").view(np.uint32) >> 16, want, err_msg=e.name)   # from Python
    ref = reference_model(llama).state_dict()
    others = [k for k in got if k not in names]
    assert "model.embed_tokens.weight" in others and "model.norm.weight" in others
    for k in others:                                # the reference's float32 values, rounded once
        np.testing.assert_array_equal(got[k], bf16_bits_oracle(ref[k].numpy()), err_msg=k)
    # rounding changed the embeddings (else this would not tell a rounding from a copy)
    assert not np.array_equal(bf16_bits_oracle(ref["model.embed_tokens.weight"].numpy()),
                              (ref["model.embed_tokens.weight"].numpy().view(np.uint32) >> 16).astype(np.uint16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    from transformers.models.auto import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()   # the folder's dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        ids = torch.tensor([[0, 5, 17, 42, 99]])
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and generated.shape == (1, 9)
    # the float32 export of the same artifact is unchanged: each weight the exact value rounded to float32
    f32 = tmp_path / "f32"
    assert main(["dequantize", str(art), "--model-folder", "--out", str(f32), "--quiet"]) == 0
    assert " a transformers model folder in float32 (" in capsys.readouterr().out
    sd = reference_model(f32).state_dict()
    for e in a.layers:
        np.testing.assert_array_equal(sd[e.name].numpy(), exact_values(a, e).astype(np.float32), err_msg=e.name)
    assert json.loads((f32 / "config.json").read_text())["dtype"] == "float32"


def with_record(art: Path, out: Path, name: str, record: bytes) -> Path:
    """A copy of the artifact ``art`` with layer ``name``'s record replaced (the offsets, lengths and CRCs of
    the header made anew), written by quantize/artifact.py's own container writer."""
    a = open_artifact(art)
    meta = json.loads(json.dumps(a.meta))
    spool, pos = io.BytesIO(), 0
    for e, d in zip(a.layers, meta["layers"]):
        data = record if e.name == name else bytes(a.record(e))
        d.update(offset=pos, length=len(data), crc32=int.from_bytes(data[-4:], "little"))
        spool.write(data)
        pos += len(data)
    meta["data_bytes"] = pos
    A.write_container(out, meta, spool)
    return out


def a_bf16_tie(stream: LayerStream) -> tuple[int, float]:
    """The flat index and value of the first exact decoded value that lies halfway between two BF16 values
    (9 significant bits, the last one set): float32 holds it exactly, and rounds a value beside it onto it."""
    x = decode_layer(stream, "exact").reshape(-1)
    m, _ = np.frexp(x)
    nine = m * 512
    tie = np.flatnonzero((nine == np.rint(nine)) & (np.rint(nine) % 2 == 1))
    assert tie.size, "no decoded value of the layer is a BF16 tie"
    return int(tie[0]), float(x[tie[0]])


def test_a_value_float32_rounds_onto_a_bf16_tie_is_rounded_once(llama, tmp_path, capsys):
    """Exact value = a BF16 tie t plus a sparse residual far below float32's ulp of t: float32 rounds it onto t,
    and BF16 then to the even neighbour (rounded twice); the one rounding goes to the side the residual is on.
    The residual is chosen towards the odd neighbour, so that the two roundings differ here."""
    art = quantized(llama, tmp_path, "sop4-g16")
    a = open_artifact(art)
    e = a.layers[0]
    s = a.stream(e)
    i, t = a_bf16_tie(s)
    m, ex = math.frexp(t)
    below = math.floor(abs(m) * 256)                       # the BF16 neighbour of |t| towards zero, in 2^(ex-8)
    towards = math.copysign(1.0, t) * (-1.0 if below % 2 else 1.0)    # the odd neighbour's side
    residual = towards * 2.0 ** (ex - 40)                  # 2^-16 of t's float32 ulp: a BF16 value
    code = int(np.float32(residual).view(np.uint32) >> 16)
    crafted = LayerStream(s.layout, s.hif, s.luts, s.offset, s.rows, s.cols, s.blocks,
                          Sparse(np.array([i], np.uint32), np.array([code], np.uint16)))
    art2 = with_record(art, tmp_path / "tie.sopq", e.name, pack_layer(crafted))
    a2 = open_artifact(art2)
    exact = exact_values(a2, a2.entry(e.name))
    assert exact.reshape(-1)[i] == t + residual            # float64 holds the sum
    once = bf16_bits_oracle(exact)
    twice = bf16_bits_oracle(exact.astype(np.float32))     # through float32 first
    assert once.reshape(-1)[i] != twice.reshape(-1)[i] and bin(int(once.reshape(-1)[i])).endswith("1")
    out = tmp_path / "folder"
    assert main(["dequantize", str(art2), "--model-folder", "--dtype", "bfloat16", "--out", str(out),
                 "--quiet", "--model", str(llama)]) == 0
    np.testing.assert_array_equal(saved_bits(out)[e.name], once)


def test_bf16_bits_keeps_non_finite_values_and_saturates_past_bf16s_largest():
    """A reference tensor may hold a NaN or an infinity (a NaN only in layers no one quantized costs nothing):
    golden's rounding refuses a NaN, and would make an infinity BF16's largest; kept as float32 keeps them."""
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8],
                 dtype=np.float32)
    bits = hf_export.bf16_bits(x)
    assert bits[0] & 0x7FFF == 0x7FC0 and bits[1] & 0x7FFF == 0x7FC0
    assert list(bits[2:]) == [0x7F80, 0xFF80, 0x7F7F, 0xFF7F, 0x8000, 0x3F80, 0x3F82]


@pytest.mark.parametrize("argv, says", [
    (["--model-folder", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--dtype", "bfloat16"], "--dtype applies with --model-folder only"),
])
def test_a_bad_dtype_is_one_line_before_any_output(llama, tmp_path, capsys, argv, says):
    art = quantized(llama, tmp_path, "sop4-g16")
    out = tmp_path / "out"
    assert run(["dequantize", art, "--out", out, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err and says in err and not out.exists(), err
    for bad in ("float16", torch.bfloat16, None):
        with pytest.raises(ValueError, match=r"^dtype=.*: the model folder is written in 'float32' or 'bfloat16'$"):
            export_model_folder(art, out, dtype=bad, progress=False)
    assert not out.exists()


def test_the_memory_estimate_of_a_bfloat16_export_counts_its_bf16_copy(llama, tmp_path, monkeypatch):
    """The BF16 export holds a BF16 copy of the model (2 bytes a parameter) beside the float32 one (4), and
    one decoded layer at a time: its float32 decode, a float32 copy in the module's layout and its BF16 bits
    (10 bytes a weight of the largest layer). The float32 export holds every decoded layer in float32 (4 bytes
    a quantized weight) beside the reference's (a review measured both exports of a 60M-parameter Llama: 0.22
    and 0.36 GB over the loaded model, against 0 and 0.12 estimated; the BF16 one then held every decoded
    layer too). Each refusal names what it counts."""
    from sop.quantize import causal_lm as L

    art = quantized(llama, tmp_path, "sop4-g16")
    seen, said = [], []

    def check_memory(src, **kw):
        seen.append(L.memory_needed(src, extra=kw["extra"]))
        said.append(kw["beside"])

    monkeypatch.setattr(L, "check_memory", check_memory)
    monkeypatch.setattr(L, "load", lambda src: (_ for _ in ()).throw(RuntimeError("stop")))
    for dtype in ("float32", "bfloat16"):
        with pytest.raises(RuntimeError, match="stop"):
            export_model_folder(art, tmp_path / dtype, dtype=dtype, progress=False)
    from safetensors.numpy import load_file

    tensors = load_file(str(llama / "model.safetensors"))
    params = sum(v.size for v in tensors.values())                          # the tied head once
    linear = [v.size for k, v in tensors.items() if ".layers." in k and v.ndim == 2]    # the 14 quantized layers
    assert len(linear) == 14 and max(linear) == 48 * 32                 # an MLP matrix (intermediate x hidden)
    assert seen == [4 * params + 4 * sum(linear), 6 * params + 10 * max(linear)]
    assert said == ["the decoded layers in float32", "a BF16 copy of the model and one decoded layer at a time"]


@pytest.mark.parametrize("fmt", ["sop4-g16", "nf4-g64"], ids=["layer-streams", "f32-records"])
def test_a_bfloat16_export_releases_each_decoded_layer_before_it_saves(llama, tmp_path, monkeypatch, fmt):
    """The BF16 export puts each decoded layer into the BF16 model as it is decoded: when a layer is decoded
    no other float32 decode is alive, nor when the folder is saved (it held all of them, 4 bytes a quantized
    weight, beside the BF16 copy); the float32 export substitutes them all at once, and holds every one."""
    import weakref

    from sop.quantize import causal_lm as L

    art = quantized(llama, tmp_path, fmt)
    decoded, alive, before = [], [], []
    weights, save_folder = A.Artifact.weights, L.CausalLM.save_folder

    def tracked(self, entry, out="exact"):
        before.append(sum(r() is not None for r in decoded))
        w = weights(self, entry, out)
        decoded.append(weakref.ref(w))
        return w

    def counted(self, *args, **kw):
        alive.append(sum(r() is not None for r in decoded))
        return save_folder(self, *args, **kw)

    monkeypatch.setattr(A.Artifact, "weights", tracked)
    monkeypatch.setattr(L.CausalLM, "save_folder", counted)
    for dtype, held in (("bfloat16", [0] * 14), ("float32", list(range(14)))):
        decoded.clear(), before.clear()
        export_model_folder(art, tmp_path / dtype, dtype=dtype, progress=False)
        assert before == held and len(decoded) == 14
    assert alive == [0, 14]
