"""Qwen2-MoE, Qwen3-MoE and Mixtral GGUFs under calibration (quantize/causal_lm.py): tiny random models
written in llama.cpp's layout (``ffn_{gate,up,down}_exps`` of ``(experts, out, in)``, the router
``ffn_gate_inp``, a Qwen-MoE's experts' width in ``<arch>.expert_feed_forward_length``, a Mixtral as
architecture ``llama`` with ``llama.expert_count``). transformers 5.24 cannot load such a file itself: its
GGUF mapping has no ``moe_intermediate_size``, so it builds a Qwen-MoE's experts at their default width; its
tensor processor zeroes the half of ``gate_up_proj`` that a tensor does not fill; and it builds a Mixtral as
a dense Llama. The forward pass here runs the folder's own model, logit for logit; each expert is found at
its rows of the fused parameter, its statistic is the mean square over the tokens routed to it (recomputed
from the folder's checkpoint), and the exported folder holds the reconstructions there."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sop.cli import main
from sop.quantize import causal_lm as L
from sop.quantize.models import open_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
L.quiet_transformers()

from test_causal_lm import SEQ, SMALL, VOCAB, add_gguf_tokenizer, bpe_tokenizer, finish_gguf  # noqa: E402
from test_causal_lm import _permute, reference_model, windows_of  # noqa: E402
from test_causal_lm_moe import EXPERTS, moe_config, routed_statistics  # noqa: E402

ARCHS = ("qwen2moe", "qwen3moe", "mixtral")
INTER = {"qwen2moe": 16, "qwen3moe": 16, "mixtral": 48}       # an expert's width (test_causal_lm_moe's configs)

#: llama.cpp's tensor of each of transformers' per-block parameters (convert_hf_to_gguf's Qwen2MoeModel)
BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate",
         "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
         "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}


def make_folder(path, arch):
    """A tiny random MoE folder; Qwen3-MoE with ``norm_topk_prob`` (as Qwen3-30B-A3B, and as llama.cpp runs
    every Qwen3-MoE GGUF)."""
    from transformers.models.auto import AutoModelForCausalLM

    cfg = moe_config(arch)
    cfg.norm_topk_prob = arch == "qwen3moe"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


def write_gguf(path, folder, arch, drop=(), widths=True, top_k=None, split=False, count=True, gate_2d=False):
    """The model of ``folder`` as llama.cpp's converter writes a Qwen-MoE or Mixtral GGUF (each block's experts
    stacked ``(experts, out, in)``; a Qwen-MoE's shared expert's gate 1-D; a Mixtral as architecture ``llama``
    with Llama's Q/K row permutation, its experts as wide as ``feed_forward_length``), without the tensors in
    ``drop``, and without the experts' widths in the metadata unless ``widths``. ``top_k``: the
    ``expert_used_count`` written (the folder's by default; "none": none); ``split``: each expert's matrices
    2-D tensors of their own (``blk.0.ffn_gate.3.weight``, llama.cpp's layout before 2024); ``count``: the
    ``expert_count`` written; ``gate_2d``: the shared expert's gate ``(1, in)``."""
    cfg = json.loads((folder / "config.json").read_text())
    sd = {k: v.numpy() for k, v in reference_model(folder).state_dict().items()}
    mixtral = arch == "mixtral"
    w = gguf.GGUFWriter(str(path), "llama" if mixtral else arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(128)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    if widths and not mixtral:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in cfg:
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if count:
        w.add_expert_count(EXPERTS)
    if top_k != "none":
        w.add_uint32(f"{w.arch}.expert_used_count", cfg["num_experts_per_tok"] if top_k is None else top_k)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(VOCAB)
    add_gguf_tokenizer(w, bpe_tokenizer())
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for g, h in BLOCK.items():
            for suffix in ("weight", "bias"):
                if f"{p}{h}.{suffix}" in sd:
                    t = sd[f"{p}{h}.{suffix}"]
                    if mixtral and g in ("attn_q", "attn_k"):
                        t = _permute(t, cfg["num_attention_heads" if g == "attn_q" else "num_key_value_heads"])
                    tensors[f"blk.{i}.{g}.{suffix}"] = t.reshape(-1) if g == "ffn_gate_inp_shexp" and not gate_2d else t
        gate_up = sd[p + "mlp.experts.gate_up_proj"]            # (experts, 2 inter, hidden): gate over up
        inter = gate_up.shape[1] // 2
        stacks = {"gate": gate_up[:, :inter], "up": gate_up[:, inter:], "down": sd[p + "mlp.experts.down_proj"]}
        for part, t in stacks.items():
            if split:
                tensors.update((f"blk.{i}.ffn_{part}.{e}.weight", np.ascontiguousarray(t[e])) for e in range(EXPERTS))
            else:
                tensors[f"blk.{i}.ffn_{part}_exps.weight"] = np.ascontiguousarray(t)
    for name, t in tensors.items():
        if name not in drop:
            w.add_tensor(name, t)
    return finish_gguf(w, path)


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_gguf")
    out = {}
    for arch in ARCHS:
        folder = make_folder(base / arch, arch)
        out[arch] = (folder, write_gguf(base / f"{arch}.gguf", folder, arch))
    return out


def assert_runs_the_folders_model(runner, folder):
    """The GGUF's forward pass gives the logits of the folder's own model."""
    wins = windows_of(runner, 2)
    with torch.inference_mode():
        got = runner.model(input_ids=wins).logits
        want = reference_model(folder)(input_ids=wins).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_moe_gguf_runs_its_folders_model_with_each_expert_at_its_rows(moe_gguf, arch):
    folder, path = moe_gguf[arch]
    src = open_model(str(path))
    assert src.forward == "causal-lm" and not src.notes
    runner = L.load(src)
    assert_runs_the_folders_model(runner, folder)
    stacked = [lay for lay in src.layers if lay.stack is not None]
    assert len(stacked) == 2 * 3 * EXPERTS
    for lay in src.layers:                  # the matrix the model runs is the file's, value for value
        np.testing.assert_array_equal(runner.weight_of(runner.targets[lay.name]).detach().numpy(),
                                      runner.module_weight(lay.name, src.load(lay.name)), err_msg=lay.name)
    inter = INTER[arch]
    assert [runner.targets[f"blk.1.ffn_{w}_exps.weight[2]"].slot for w in ("gate", "up", "down")] == \
        [("gate_up_proj", 2, 0), ("gate_up_proj", 2, inter), ("down_proj", 2, 0)]
    assert runner.targets["blk.1.ffn_gate_inp.weight"].module == "model.layers.1.mlp.gate"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_moe_ggufs_expert_statistics_are_over_the_tokens_routed_to_it(moe_gguf, arch):
    folder, path = moe_gguf[arch]
    runner = L.load(open_model(str(path)))
    wins = windows_of(runner, 2)
    stats, tokens = runner.collect_stats(wins)
    assert tokens == 2 * SEQ and runner.unrouted == []
    # the folder's checkpoint names of Qwen3-MoE are Qwen2-MoE's; GGUF's of block i, expert e, below
    want = routed_statistics(folder, "mixtral" if arch == "mixtral" else "qwen2moe", wins)
    gguf_name = {"gate_proj": "ffn_gate_exps.weight[{e}]", "up_proj": "ffn_up_exps.weight[{e}]",
                 "down_proj": "ffn_down_exps.weight[{e}]", "w1": "ffn_gate_exps.weight[{e}]",
                 "w3": "ffn_up_exps.weight[{e}]", "w2": "ffn_down_exps.weight[{e}]"}
    checked = 0
    for name, w in want.items():
        parts = name.split(".")             # model.layers.I.mlp.experts.E.P.weight or model.layers.I.mlp.gate.weight
        i = parts[2]
        ours = f"blk.{i}.ffn_gate_inp.weight" if parts[4] == "gate" else \
            f"blk.{i}." + gguf_name[parts[6]].format(e=parts[5])
        np.testing.assert_allclose(stats[ours], w.numpy(), rtol=1e-5, err_msg=ours)
        checked += 1
    assert checked == 2 * (3 * EXPERTS + 1)


#: the exported folder's name of expert e's matrix w (gate, up, down) of block i, as transformers saves it
EXPORTED = {"qwen3moe": ("model.layers.{i}.mlp.experts.{e}.{w}_proj.weight", {}),
            "mixtral": ("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",
                        {"gate": "w1", "up": "w3", "down": "w2"})}


@pytest.mark.parametrize("arch", sorted(EXPORTED))
def test_a_moe_gguf_quantizes_weighted_evaluates_and_exports_its_reconstructions(moe_gguf, arch, tmp_path, capsys):
    _, path = moe_gguf[arch]
    q, out = tmp_path / "m.sopq", tmp_path / "folder"
    assert main(["quantize", str(path), "--format", "sop4-g16", *SMALL[:4], "--out", str(q),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    said = capsys.readouterr().err
    assert "calibrating on 3 x 32 tokens" in said and "no forward pass" not in said
    assert main(["eval", str(path), "--format", "sop4-g16", *SMALL, "--cache-dir", str(tmp_path / "c"),
                 "--json", str(tmp_path / "e.json")]) == 0
    e2e = json.loads((tmp_path / "e.json").read_text())["formats"]["sop4-g16"]["e2e"]
    assert e2e["kld"] > 0 and 0 < e2e["top1"] < 1
    assert main(["dequantize", str(q), "--out", str(tmp_path / "d.safetensors"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--model-folder", "--out", str(out), "--quiet"]) == 0
    decoded, exported = load_file(str(tmp_path / "d.safetensors")), load_file(str(out / "model.safetensors"))
    pattern, short = EXPORTED[arch]
    for i in range(2):                      # the exported folder holds each expert's reconstruction where it was
        for w in ("gate", "up", "down"):
            stack = decoded[f"blk.{i}.ffn_{w}_exps.weight"]
            assert stack.shape[0] == EXPERTS
            for e in range(EXPERTS):
                np.testing.assert_array_equal(exported[pattern.format(i=i, e=e, w=short.get(w, w))],
                                              stack[e].astype(np.float32))
    reloaded = reference_model(out).config
    assert reloaded.model_type == {"qwen3moe": "qwen3_moe"}.get(arch, arch)
    assert reloaded.num_experts_per_tok == 2
    if arch == "qwen3moe":
        assert reloaded.moe_intermediate_size == INTER[arch] and reloaded.norm_topk_prob
    else:
        assert reloaded.num_local_experts == EXPERTS


def test_a_moe_gguf_missing_a_half_or_its_experts_width_is_one_line(moe_gguf, tmp_path, capsys):
    """A file without one of the two halves of ``gate_up_proj`` would run the other as zeros (transformers'
    own loader does); a file without the experts' width would build the experts at transformers' default."""
    folder, _ = moe_gguf["qwen2moe"]
    args = ["--format", "sop4-g16", *SMALL, "--cache-dir", str(tmp_path / "c"), "--quiet"]
    half = write_gguf(tmp_path / "half.gguf", folder, "qwen2moe", drop={"blk.1.ffn_up_exps.weight"})
    assert main(["eval", str(half), *args]) == 2
    assert capsys.readouterr().err == (
        f"sop: error: {half}: does not match its metadata: the model it describes needs blk.1.ffn_up_exps.weight "
        f"beside the other part of model.layers.1.mlp.experts.gate_up_proj, which the file lacks (1 tensor "
        f"missing)\n")
    narrow = write_gguf(tmp_path / "narrow.gguf", folder, "qwen2moe", widths=False)
    assert main(["eval", str(narrow), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sop: error: {narrow}: does not match its metadata: tensor ") and err.count("\n") == 1
    assert "the model the metadata describes has it" in err


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
@pytest.mark.parametrize("top_k", ["none", 0, EXPERTS + 1])
def test_a_moe_ggufs_top_k_missing_or_out_of_range_is_one_line(moe_gguf, tmp_path, capsys, arch, top_k):
    """Without ``expert_used_count`` transformers ran its own default (Qwen3-MoE's 8, Mixtral's 2) and a count
    of 0 routed no token (or, for a Mixtral, became 2), each without a word, the export carrying that top-k;
    one past the experts stopped in the forward pass ('selected index k out of range'). llama.cpp refuses such
    a file; so does the forward pass here, naming the key, the export too."""
    folder, _ = moe_gguf[arch]
    path = write_gguf(tmp_path / "k.gguf", folder, arch, top_k=top_k)
    key = f"{'llama' if arch == 'mixtral' else arch}.expert_used_count"
    q = tmp_path / "m.sopq"
    assert main(["quantize", str(path), "--format", "sop4-g16", "--no-calib", "--out", str(q), "--quiet"]) == 0
    for args in (["eval", str(path), "--format", "sop4-g16", *SMALL, "--cache-dir", str(tmp_path / "c")],
                 ["dequantize", str(q), "--model-folder", "--out", str(tmp_path / "f")]):
        assert main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        want = (f"its metadata has no {key} (how many experts each token is routed to): the model it describes "
                f"cannot be run" if top_k == "none" else
                f"its metadata gives {key} {top_k} (how many experts each token is routed to): it must be 1 to "
                f"{key.replace('used_count', 'count')} ({EXPERTS})")
        assert err == f"sop: error: {path}: {want}\n", args[0]
    assert not (tmp_path / "f").exists()


def test_a_qwen2_moe_shared_expert_gate_stored_2d_runs(moe_gguf, tmp_path):
    """The shared expert's gate as (1, in), not 1-D: transformers' processor made it (1, 1, in) and the load
    stopped on 'is (1, 1, 32), the model ... has it (1, 32)', a shape the file does not have."""
    folder, _ = moe_gguf["qwen2moe"]
    path = write_gguf(tmp_path / "g.gguf", folder, "qwen2moe", gate_2d=True)
    src = open_model(str(path))
    assert src.tensor_shape("blk.0.ffn_gate_inp_shexp.weight") == (1, 32)
    assert_runs_the_folders_model(L.load(src), folder)


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
@pytest.mark.parametrize("count", [True, False])
def test_a_moe_gguf_of_one_tensor_per_expert_has_no_forward_pass(moe_gguf, tmp_path, arch, count):
    """llama.cpp's layout before 2024, ``blk.0.ffn_gate.3.weight``: a Qwen2-MoE was refused after a warning that
    the model runs without those tensors (it does not: 'needs model.layers.0.mlp.experts.gate_up_proj'), and a
    'llama' without an expert count built a dense Llama ('needs model.layers.0.mlp.gate_proj.weight'). Now no
    forward pass, saying why: quantized unweighted, each matrix a layer."""
    folder, _ = moe_gguf[arch]
    path = write_gguf(tmp_path / "s.gguf", folder, arch, split=True, count=count)
    src = open_model(str(path))
    ga = "llama" if arch == "mixtral" else arch
    what = f"{EXPERTS} experts" if count else "experts"
    tail = ("the forward pass here runs fused experts only" if count or arch != "mixtral" else
            "transformers reads it as a dense model, without its experts")
    assert src.forward is None and src.forward_note == (
        f"GGUF architecture {ga!r} with mixture-of-experts blocks ({what}, each a 2-D tensor of its own "
        f"(blk.0.ffn_gate.0.weight: llama.cpp's layout before 2024)): {tail}")
    assert "blk.1.ffn_up.3.weight" in {lay.name for lay in src.layers}
    assert src.skipped["blk.1.ffn_gate_inp.weight"] == "router"     # no experts tensor names it a MoE block


def test_an_expert_given_to_include_says_experts_go_with_their_tensor(moe_gguf, capsys):
    _, path = moe_gguf["qwen3moe"]
    assert main(["quantize", str(path), "--format", "sop4-g16", "--no-calib", "--include",
                 "blk.0.ffn_gate_exps.weight[3]", "--out", "/nonexistent/m.sopq"]) == 2
    assert capsys.readouterr().err.endswith(
        "no linear layer selected (14 candidates, check --include/--exclude; the experts of a fused tensor are "
        "selected by the tensor's name (blk.0.ffn_gate_exps.weight))\n")
