"""Mixture-of-experts causal LMs under calibration (quantize/causal_lm.py): tiny random Mixtral and
Qwen2-MoE folders (and Qwen3-MoE, OLMoE, PhiMoE, DeepSeek-V3 for the mapping) as transformers 5
saves them (one 2-D matrix per expert, the router a tensor of its own), which transformers fuses on
loading into ``(experts, rows, in)`` parameters and router modules. Every expert matrix is found in
the running model, its statistics are the mean square of what it takes over the tokens routed to it
(recomputed here from the checkpoint's own matrices, not the fused ones), the model runs with the
reconstructions in place and exports a folder that holds them."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sop.cli import main
from sop.quantize import calib as C
from sop.quantize import causal_lm as L
from sop.quantize.models import open_model

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from test_causal_lm import SEQ, SMALL, VOCAB, bpe_tokenizer, reference_model, windows_of  # noqa: E402

HIDDEN, EXPERTS = 32, 4


def moe_config(arch: str, top_k: int = 2):
    from transformers.models.deepseek_v3 import DeepseekV3Config
    from transformers.models.mixtral import MixtralConfig
    from transformers.models.olmoe import OlmoeConfig
    from transformers.models.phimoe import PhimoeConfig
    from transformers.models.qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen3_moe import Qwen3MoeConfig

    common = {"vocab_size": VOCAB, "initializer_range": 0.25, "bos_token_id": 0, "eos_token_id": 1,
              "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_experts_per_tok": top_k}
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=48, num_local_experts=EXPERTS, **common)
    if arch == "qwen2moe":
        return Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                              num_experts=EXPERTS, **common)
    if arch == "qwen3moe":
        return Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=EXPERTS, head_dim=8, **common)
    if arch == "olmoe":
        return OlmoeConfig(intermediate_size=16, num_experts=EXPERTS, **common)
    if arch == "phimoe":
        return PhimoeConfig(intermediate_size=16, num_local_experts=EXPERTS, **common)
    # DeepSeek-V3: a dense first block, a shared expert beside the routed ones, a router with a score bias
    return DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=EXPERTS,
                            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16,
                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                            **(common | {"num_key_value_heads": 4}))


def make_moe(path, arch: str, top_k: int = 2):
    from transformers.models.auto import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config(arch, top_k)).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


#: the checkpoint's names of one expert's matrices: (gate, up, down), and of a block's router
NAMES = {"mixtral": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                     "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
                     "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
                     "model.layers.{i}.block_sparse_moe.gate.weight"),
         "qwen2moe": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                      "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                      "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
                      "model.layers.{i}.mlp.gate.weight")}


#: tiny models of more MoE families: each expert matrix and router found, each statistic taken
OTHERS = ("qwen3moe", "olmoe", "phimoe", "deepseek_v3")


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    return {arch: make_moe(base / arch, arch) for arch in (*NAMES, *OTHERS)}


@pytest.mark.parametrize("arch", [*sorted(NAMES), *OTHERS])
def test_every_expert_matrix_and_router_is_found_in_the_running_model(moe_folders, arch):
    src = open_model(str(moe_folders[arch]))
    runner = L.load(src)
    ckpt = load_file(str(moe_folders[arch] / "model.safetensors"))
    selected = {lay.name for lay in src.layers}
    experts = {n for n in ckpt if ".experts." in n and ".shared" not in n}
    routers = {n for n in ckpt if n.endswith("gate.weight") and ckpt[n].shape[0] == EXPERTS}
    assert len(experts) == 3 * EXPERTS * (1 if arch == "deepseek_v3" else 2) and len(routers) == len(experts) // 12
    assert experts | routers <= selected
    assert all(runner.targets[n].slot is not None for n in experts)
    assert all(runner.targets[n].slot is None for n in routers)
    for lay in src.layers:                  # the matrix the model runs is the checkpoint's, value for value
        np.testing.assert_array_equal(runner.weight_of(runner.targets[lay.name]).detach().numpy(), ckpt[lay.name],
                                      err_msg=lay.name)
    stats, _ = runner.collect_stats(windows_of(runner, 2))
    assert selected <= set(stats) and runner.unrouted == []
    if arch in NAMES:
        gate, up, down = (runner.targets[n.format(i=1, e=2)] for n in NAMES[arch][:3])
        rows = {"mixtral": 48, "qwen2moe": 16}[arch]           # an expert's intermediate width: gate over up
        assert (gate.slot, up.slot, down.slot) == (("gate_up_proj", 2, 0), ("gate_up_proj", 2, rows),
                                                   ("down_proj", 2, 0))


def routed_statistics(folder, arch, wins):
    """Per expert matrix and router: the mean square of its input, computed from the reference model's
    MoE block inputs, a router of our own (softmax, top-k) and the checkpoint's matrices."""
    ref = reference_model(folder)
    cfg = ref.config
    ckpt = {k: torch.from_numpy(v).double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    inputs = {}
    hooks = [ref.model.layers[i].mlp.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach().reshape(-1, HIDDEN).double()))
        for i in range(2)]
    with torch.inference_mode():
        ref(input_ids=wins)
    for h in hooks:
        h.remove()
    want = {}
    for i, x in inputs.items():
        gname, uname, dname, rname = (n.format(i=i, e="{e}") for n in NAMES[arch])
        want[rname] = (x * x).mean(0)
        probs = torch.softmax(x @ ckpt[rname].T, dim=-1)
        top = torch.topk(probs, cfg.num_experts_per_tok, dim=-1).indices
        for e in range(EXPERTS):
            xe = x[(top == e).any(1)]
            g, u = xe @ ckpt[gname.format(e=e)].T, xe @ ckpt[uname.format(e=e)].T
            mid = torch.nn.functional.silu(g) * u
            want[gname.format(e=e)] = want[uname.format(e=e)] = (xe * xe).mean(0)
            want[dname.format(e=e)] = (mid * mid).mean(0)
    return want


@pytest.mark.parametrize("arch", sorted(NAMES))
def test_expert_statistics_are_the_mean_square_over_the_tokens_routed_to_it(moe_folders, arch):
    src = open_model(str(moe_folders[arch]))
    runner = L.load(src)
    wins = windows_of(runner, 2)
    stats, tokens = runner.collect_stats(wins)
    assert tokens == 2 * SEQ and runner.unrouted == []
    want = routed_statistics(moe_folders[arch], arch, wins)
    assert set(want) <= set(stats)
    for name, w in want.items():
        np.testing.assert_allclose(stats[name], w.numpy(), rtol=1e-5, err_msg=name)


def test_an_expert_no_token_reaches_is_weighted_alike_in_every_column(tmp_path, capsys):
    """Top-1 routing where the router row of expert 3 is zero and those of experts 1 and 2 are opposite:
    one of them always scores |x.v| >= 0, so expert 3 never wins; its matrices get a = 1, one line says so."""
    folder = make_moe(tmp_path / "m", "mixtral", top_k=1)
    ckpt = load_file(str(folder / "model.safetensors"))
    for i in range(2):
        r = ckpt[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        r[2], r[3] = -r[1], 0
    save_file(ckpt, str(folder / "model.safetensors"), metadata={"format": "pt"})
    src = open_model(str(folder))
    cal = C.calibrate_causal(src, C.CalibSize(seqs=2, seq_len=SEQ), tmp_path / "c", say=print)
    lost = [f"model.layers.{i}.block_sparse_moe.experts.3.{w}.weight" for i in range(2) for w in ("w1", "w2", "w3")]
    assert sorted(L.load(src).unrouted) == sorted(lost)
    for name in lost:
        assert np.array_equal(cal.get(name), np.ones(src.layer(name).shape[1]))
    routed = cal.get("model.layers.0.block_sparse_moe.experts.1.w1.weight")
    assert routed is not None and not np.array_equal(routed, np.ones(HIDDEN))
    assert ("calibration: no calibration token was routed to 6 expert matrices (e.g. "
            "model.layers.0.block_sparse_moe.experts.3.w1.weight): their errors are unweighted (a = 1)"
            in capsys.readouterr().out)


def test_a_moe_model_quantizes_weighted_evaluates_and_exports_its_reconstructions(moe_folders, tmp_path, capsys):
    folder = moe_folders["mixtral"]
    q, out = tmp_path / "m.sopq", tmp_path / "folder"
    assert main(["quantize", str(folder), "--format", "sop4-g16", *SMALL[:4], "--out", str(q),
                 "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--out", str(tmp_path / "dq.safetensors"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--model-folder", "--out", str(out), "--quiet"]) == 0
    decoded, exported = load_file(str(tmp_path / "dq.safetensors")), load_file(str(out / "model.safetensors"))
    ckpt = load_file(str(folder / "model.safetensors"))
    experts = [n for n in decoded if ".experts." in n]
    assert len(experts) == 2 * EXPERTS * 3
    for name, w in decoded.items():         # the folder holds each reconstruction where the checkpoint had it
        np.testing.assert_array_equal(exported[name], w.astype(np.float32), err_msg=name)
        assert not np.array_equal(w, ckpt[name]), name
    # the reference runs again after the reconstructions were substituted: a second eval is unchanged
    capsys.readouterr()
    args = ["eval", str(folder), "--format", "e2m3-ue4m4-g16", *SMALL, "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "mean square of each linear's input" in first and "ppl" in first
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-4:] == first.splitlines()[-4:]
