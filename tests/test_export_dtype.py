"""`sop dequantize --model-folder --dtype bfloat16` (quantize/hf_export.py): every quantized weight is golden's
exact decode rounded ONCE to BF16, every other tensor the reference's float32 value rounded to BF16, checked
against a rounding written here (numpy's frexp and round-half-even, no golden/, no ml_dtypes: ml_dtypes casts
float64 to bfloat16 through float32, rounding twice); the folder loads in transformers as bfloat16 and runs;
a layer whose exact value float32 rounds onto a BF16 tie shows the one rounding; bad values are one line; the
parameters transformers keeps in float32 in a bfloat16 model (a DeepSeek-V3 router) are float32 in the folder, as in
transformers' own bfloat16 folder, the reference's values or the exact decode rounded once to float32."""

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


@pytest.mark.parametrize("inputs", ["boundaries", "random"])
def test_bf16_bits_of_float64_values_are_the_tables_codes(inputs):
    """``bf16_bits``'s float64 path (a reference tensor in another type than float32) gives the codes of the table's
    ``encode`` (the specification; golden's rounding on the bits gives them faster) at every BF16 value, every
    midpoint between two, their float64 neighbours, the saturation threshold, and random float64 of every
    exponent: tests/test_formats.py's cases, with ``bf16_bits``'s own rule for an infinity."""
    from sop.golden.formats import FORMATS
    from test_formats import bf16_float64_boundaries, random_float64_of_every_exponent

    x = bf16_float64_boundaries() if inputs == "boundaries" else random_float64_of_every_exponent(1 << 16)
    finite = np.isfinite(x)
    got = hf_export.bf16_bits(x)
    want = FORMATS["bf16"].encode(x[finite])
    bad = np.flatnonzero(got[finite] != want)
    assert not bad.size, f"{len(bad)} differ, first {x[finite][bad[0]].hex()}: {got[finite][bad[0]]:#06x}, " \
                         f"table {want[bad[0]]:#06x}"
    assert list(got[~finite]) == [0xFF80 if v < 0 else 0x7F80 for v in x[~finite]]      # +-Inf, no NaN here


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A tiny DeepSeek-V3 folder in float32: its router's ``gate.weight`` is one transformers keeps in float32 in
    a bfloat16 model (``_keep_in_fp32_modules_strict``), its ``e_score_correction_bias`` a float32 buffer."""
    from test_causal_lm_moe import make_moe

    return make_moe(tmp_path_factory.mktemp("moe") / "deepseek_v3", "deepseek_v3")


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors, as stored."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out |= {k: st.get_tensor(k) for k in st.keys()}
    return out


def transformers_bfloat16_folder(folder: Path, out: Path) -> Path:
    """The folder transformers itself writes of the model loaded in bfloat16 (``from_pretrained(dtype=bfloat16)``,
    which keeps its float32 modules, then ``save_pretrained``)."""
    from transformers.models.auto import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, local_files_only=True).save_pretrained(out)
    return out


def float32_bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)


ROUTER = "model.layers.1.mlp.gate.weight"


@pytest.mark.parametrize("routers", [False, True], ids=["router-kept", "router-quantized"])
def test_what_transformers_keeps_in_float32_is_exported_in_float32(deepseek, tmp_path, routers):
    """A bfloat16 export holds each tensor in the type transformers' own bfloat16 folder of the model does:
    DeepSeek-V3's router weight in float32, the reference's values, or (quantized, --include-routers) golden's
    exact decode rounded once to float32, not to BF16 (transformers would load those as float32, BF16's precision
    lost for nothing); every other quantized weight its exact decode rounded once to BF16. The folder loads in
    transformers with the router in float32, those values, and everything else in bfloat16."""
    from safetensors.numpy import load_file
    from transformers.models.auto import AutoModelForCausalLM

    art = tmp_path / "m.sopq"
    assert main(["quantize", str(deepseek), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib",
                 *(["--include-routers"] if routers else [])]) == 0
    out = tmp_path / "bf16"
    assert export_model_folder(art, out, dtype="bfloat16", progress=False)["dtype"] == "bfloat16"
    got = saved_tensors(out)
    want = saved_tensors(transformers_bfloat16_folder(deepseek, tmp_path / "transformers"))
    assert {k: t.dtype for k, t in got.items()} == {k: t.dtype for k, t in want.items()}
    assert {k for k, t in want.items() if t.dtype == torch.float32} == {ROUTER, ROUTER.replace(
        "weight", "e_score_correction_bias")}                  # what the test is about: transformers keeps these
    a = open_artifact(art)
    layers = {e.name: e for e in a.layers}
    assert (ROUTER in layers) == routers and len(layers) > 12
    ref = load_file(str(deepseek / "model.safetensors"))
    router = exact_values(a, layers[ROUTER]).astype(np.float32) if routers else ref[ROUTER]
    # BF16 would differ (else this would not tell the float32 value from a BF16 one)
    assert not np.array_equal(float32_bits(router) >> 16 << 16, float32_bits(router))
    np.testing.assert_array_equal(float32_bits(got[ROUTER].numpy()), float32_bits(router))
    for name in ("model.layers.1.mlp.gate.e_score_correction_bias", "model.norm.weight"):
        stays = got[name].dtype == torch.float32
        np.testing.assert_array_equal(float32_bits(got[name].float().numpy()), float32_bits(ref[name]) if stays
                                      else bf16_bits_oracle(ref[name]).astype(np.uint32) << 16, err_msg=name)
    for name, e in layers.items():                  # every other quantized weight: its exact decode rounded to BF16
        if name != ROUTER:
            np.testing.assert_array_equal(got[name].view(torch.int16).numpy().view(np.uint16),
                                          bf16_bits_oracle(exact_values(a, e)), err_msg=name)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)   # the folder's dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    kept = model.get_parameter(ROUTER)
    assert kept.dtype == torch.float32
    np.testing.assert_array_equal(float32_bits(kept.detach().numpy()), float32_bits(router))
    assert {p.dtype for n, p in model.named_parameters() if n != ROUTER} == {torch.bfloat16}


def test_a_float16_only_keep_list_leaves_a_bfloat16_export_all_bfloat16(tmp_path):
    """GPT-OSS's ``_keep_in_fp32_modules`` (its norms) is kept in float32 by transformers in a float16 model only
    (the strict list is the one for bfloat16 too): its own bfloat16 folder holds every tensor in BF16, and so
    does the export, whose folder loads all bfloat16."""
    from test_causal_lm_fused_experts import make
    from transformers.models.auto import AutoModelForCausalLM

    folder = make(tmp_path / "gpt_oss", "gpt_oss")
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(folder), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib"]) == 0
    out = tmp_path / "bf16"
    export_model_folder(art, out, dtype="bfloat16", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    assert {"norm", "input_layernorm"} <= set(model._keep_in_fp32_modules) and not model._keep_in_fp32_modules_strict
    want = saved_tensors(transformers_bfloat16_folder(folder, tmp_path / "transformers"))
    assert {t.dtype for t in want.values()} == {torch.bfloat16} and "model.norm.weight" in want
    assert {k: t.dtype for k, t in saved_tensors(out).items()} == {k: t.dtype for k, t in want.items()}
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def model_state(model) -> dict:
    """Each parameter of ``model`` as ``(dtype, its data's address, a copy of its values)``, and the config's dtype:
    what an export must leave as it found it."""
    state = {n: (p.dtype, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    return state | {"config.dtype": getattr(model.config, "dtype", None)}


@pytest.mark.parametrize("arch", ["llama", "gpt_oss", "deepseek_v3"])
def test_a_bfloat16_export_leaves_the_loaded_model_as_it_was(tmp_path, monkeypatch, arch):
    """The model an export loads is cached on its ModelSource (``causal_lm.load``): after a bfloat16 export every
    parameter is again the reference's float32 tensor, its very data (a fused experts parameter's rows and a router
    kept in float32 written into copies, not into it), and the config's dtype is back; a second export of the same
    loaded model writes the same bytes. Llama (each layer a module's weight), GPT-OSS (fused experts), DeepSeek-V3
    (its router kept in float32, quantized with --include-routers)."""
    from sop.quantize import causal_lm as L

    if arch == "llama":
        folder = make_folder(tmp_path / arch, arch, bpe_tokenizer())
    else:
        from test_causal_lm_fused_experts import make
        from test_causal_lm_moe import make_moe

        folder = (make if arch == "gpt_oss" else make_moe)(tmp_path / arch, arch)
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(folder), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib",
                 "--include-routers"]) == 0
    load, runners = L.load, []

    def load_once(src):                      # every export in this test runs on the one loaded model
        if not runners:
            runners.append(load(src))
            runners.append(model_state(runners[0].model))
        return runners[0]

    monkeypatch.setattr(L, "load", load_once)
    folders = [tmp_path / "first", tmp_path / "second"]
    for out in folders:
        export_model_folder(art, out, dtype="bfloat16", progress=False)
        runner, before = runners
        after = model_state(runner.model)
        assert after.keys() == before.keys() and after["config.dtype"] == before["config.dtype"]
        for name, (dtype, ptr, values) in ((k, v) for k, v in before.items() if k != "config.dtype"):
            assert after[name][:2] == (dtype, ptr) == (torch.float32, ptr), name
            assert torch.equal(after[name][2].view(torch.int32), values.view(torch.int32)), name
    files = [{f.name: f.read_bytes() for f in sorted(d.iterdir())} for d in folders]
    assert files[0] == files[1] and any(k.endswith(".safetensors") for k in files[0])
