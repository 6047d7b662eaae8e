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
from sop.quantize.inputs import command_line
from sop.quantize.models import open_model

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from test_causal_lm import SEQ, SMALL, VOCAB, bpe_tokenizer, reference_model, windows_of  # noqa: E402

HIDDEN, EXPERTS = 32, 4


def moe_config(arch: str, top_k: int = 2):
    from transformers.models.deepseek_v3 import DeepseekV3Config
    from transformers.models.mixtral import MixtralConfig
    from transformers.models.nemotron_h import NemotronHConfig
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
    if arch == "nemotron_h":        # checkpoint names under backbone., which transformers renames model.; experts
        return NemotronHConfig(    # without a gate (up_proj, down_proj); a Mamba block before the MoE one
            intermediate_size=16, moe_intermediate_size=16, n_routed_experts=EXPERTS,
            moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1, layers_block_type=["mamba", "moe"],
            head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=4, n_groups=1, **common)
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
OTHERS = ("qwen3moe", "olmoe", "phimoe", "deepseek_v3", "nemotron_h")
#: expert matrices and routers of each tiny model: 2 MoE blocks of 4 experts (gate, up, down), but for
#: DeepSeek-V3 (a dense first block) and Nemotron-H (a Mamba block first; experts without a gate)
COUNTS = {"deepseek_v3": (12, 1), "nemotron_h": (8, 1)}


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    return {arch: make_moe(base / arch, arch) for arch in (*NAMES, *OTHERS)}


@pytest.mark.parametrize("arch", [*sorted(NAMES), *OTHERS])
def test_every_expert_matrix_and_router_is_found_in_the_running_model(moe_folders, arch):
    src = open_model(str(moe_folders[arch]), routers=True)
    runner = L.load(src)
    ckpt = load_file(str(moe_folders[arch] / "model.safetensors"))
    selected = {lay.name for lay in src.layers}
    experts = {n for n in ckpt if ".experts." in n and ".shared" not in n}
    routers = {n for n in ckpt if n.endswith("gate.weight") and ckpt[n].shape[0] == EXPERTS}
    assert (len(experts), len(routers)) == COUNTS.get(arch, (24, 2))
    assert experts | routers <= selected
    # by default every router is kept (Qwen2-MoE's shared expert gate, one row, too), and nothing else
    default = open_model(str(moe_folders[arch]))
    gates = routers | {n for n in ckpt if n.endswith("shared_expert_gate.weight")}
    assert {n for n, why in default.skipped.items() if why == "router"} == gates
    assert {lay.name for lay in default.layers} == selected - gates
    assert f"{len(gates)} MoE router (routers=True quantizes them)" in default.kept_line()      # from Python
    with command_line():
        assert f"{len(gates)} MoE router (--include-routers quantizes them)" in default.kept_line()
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


def block_inputs(ref, blocks, wins) -> dict:
    """What each of ``blocks`` (modules of the reference model ``ref``) takes when ``ref`` runs on ``wins``:
    block index -> its input, float64, one row per token."""
    inputs = {}
    hooks = [block.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for i, block in enumerate(blocks)]
    with torch.inference_mode():
        ref(input_ids=wins)
    for h in hooks:
        h.remove()
    return inputs


def routed_statistics(folder, arch, wins):
    """Per expert matrix and router: the mean square of its input, computed from the reference model's
    MoE block inputs, a router of our own (softmax, top-k) and the checkpoint's matrices."""
    ref = reference_model(folder)
    cfg = ref.config
    ckpt = {k: torch.from_numpy(v).double() for k, v in load_file(str(folder / "model.safetensors")).items()}
    inputs = block_inputs(ref, [layer.mlp for layer in ref.model.layers], wins)
    want = {}
    for i, x in inputs.items():
        gname, uname, dname, rname = (n.format(i=i, e="{e}") for n in NAMES[arch])
        want[rname] = (x * x).mean(0)
        probs = torch.softmax(x @ ckpt[rname].T, dim=-1)
        top = torch.topk(probs, cfg.num_experts_per_tok, dim=-1).indices
        for e in range(EXPERTS):            # a token not routed to the expert: a zero input to it
            xe = x * (top == e).any(1, keepdim=True)
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


def test_an_expert_no_token_reaches_is_weighted_as_one_token_of_ones(tmp_path, capsys):
    """Top-1 routing where the router row of expert 3 is zero and those of experts 1 and 2 are opposite:
    one of them always scores |x.v| >= 0, so expert 3 never wins; its matrices get a = 1 / tokens, one
    line says so, on a cold and on a warm cache, and the JSON names them; an excluded one is not counted."""
    folder = make_moe(tmp_path / "m", "mixtral", top_k=1)
    ckpt = load_file(str(folder / "model.safetensors"))
    for i in range(2):
        r = ckpt[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        r[2], r[3] = -r[1], 0
    save_file(ckpt, str(folder / "model.safetensors"), metadata={"format": "pt"})
    line = ("calibration: no calibration token was routed to 6 expert matrices (e.g. "
            "model.layers.0.block_sparse_moe.experts.3.w1.weight): each is weighted as one token of ones would "
            "weigh it (unweighted within the layer, next to nothing beside the others)\n")
    lost = [f"model.layers.{i}.block_sparse_moe.experts.3.{w}.weight" for i in range(2) for w in ("w1", "w2", "w3")]
    size = C.CalibSize(seqs=2, seq_len=SEQ)
    for cached in (False, True):
        src = open_model(str(folder))
        cal = C.calibrate_causal(src, size, tmp_path / "c", say=print)
        assert cal.cached == cached and capsys.readouterr().out == line
        assert cal.unrouted == sorted(lost) and cal.describe()["unrouted"] == sorted(lost)
        for name in lost:
            assert np.array_equal(cal.get(name), np.full(src.layer(name).shape[1], 1 / (2 * SEQ)))
        routed = cal.get("model.layers.0.block_sparse_moe.experts.1.w1.weight")
        assert routed is not None and routed.max() > 1 / SEQ
    kept = C.calibrate_causal(open_model(str(folder), exclude=["*experts.3.*"]), size, tmp_path / "c", say=print)
    assert kept.cached and kept.unrouted == [] and "unrouted" not in kept.describe() and not capsys.readouterr().out


def test_a_cache_file_of_the_version_before_every_token_counted_is_recomputed(moe_folders, tmp_path):
    """Causal-LM cache version 1 (until 2026-12-04) averaged an expert matrix's squares over the tokens
    routed to it alone; such a file, as that version wrote it under the key it gave it, was served as
    current (an expert weighted 1.7x, without a word). Built here with version 1's fields and values
    (each expert's statistic times the tokens over those routed to it): a miss, the statistics recomputed."""
    import json

    folder = moe_folders["mixtral"]
    size = C.CalibSize(seqs=2, seq_len=SEQ)
    src = open_model(str(folder))
    cold = C.calibrate_causal(src, size, tmp_path / "cold")
    assert not cold.cached
    key = C.cache_key(f"{src.fingerprint()}\n{src.aux_fingerprint()}", f"causal-lm v1 {size.seqs}x{size.seq_len}",
                      C.calibration_sentences(C.max_calibration_sentences()))
    old = {n: a * (1.5 if ".experts." in n else 1.0) for n, a in cold.act_ms.items()}
    meta = {"key": key, "sentences": cold.sentences, "tokens": cold.tokens, "version": 2, "seqs": size.seqs,
            "seq_len": size.seq_len, "layers": sorted(old)}
    (tmp_path / "c").mkdir()
    np.savez(tmp_path / "c" / f"{key[:32]}.npz", **old, __meta__=np.array(json.dumps(meta)))
    warm = C.calibrate_causal(open_model(str(folder)), size, tmp_path / "c")
    assert not warm.cached and warm.key != key
    assert sorted(warm.act_ms) == sorted(cold.act_ms)
    for name, a in cold.act_ms.items():
        assert np.array_equal(warm.act_ms[name], a), name


def test_a_moe_model_quantizes_weighted_evaluates_and_exports_its_reconstructions(moe_folders, tmp_path, capsys):
    folder = moe_folders["mixtral"]
    q, out = tmp_path / "m.sopq", tmp_path / "folder"
    assert main(["quantize", str(folder), "--format", "sop4-g16", *SMALL[:4], "--include-routers", "--out", str(q),
                 "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--out", str(tmp_path / "dq.safetensors"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--model-folder", "--out", str(out), "--quiet"]) == 0
    decoded, exported = load_file(str(tmp_path / "dq.safetensors")), load_file(str(out / "model.safetensors"))
    ckpt = load_file(str(folder / "model.safetensors"))
    experts = [n for n in decoded if ".experts." in n]
    assert len(experts) == 2 * EXPERTS * 3
    assert {n for n in decoded if n.endswith("moe.gate.weight")} == {
        f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)}     # --include-routers, exported too
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


def test_a_router_named_by_layer_gets_vectors_and_a_kept_tensor_says_why(moe_folders, tmp_path, capsys):
    """`sop vectors --layer` and `sop board --layer` name their layers: a MoE router (kept by `sop quantize` by
    default) is one of them; a tensor that is no linear layer is refused saying why it was kept (an outside
    probe: the router was "not a linear layer" without a word)."""
    from sop.sim.vectors import read_vectors

    folder, router = moe_folders["mixtral"], "model.layers.1.block_sparse_moe.gate.weight"
    assert main(["vectors", str(folder), "--format", "sop4-g16", "--layer", router, "--out", str(tmp_path / "v")]) == 0
    (layer,) = read_vectors(tmp_path / "v")
    assert layer.name == router and layer.codes.size == EXPERTS * 32
    capsys.readouterr()
    assert main(["vectors", str(folder), "--format", "sop4-g16", "--layer", "model.embed_tokens.weight",
                 "--out", str(tmp_path / "w")]) == 2
    assert ": model.embed_tokens.weight is not a linear layer (kept as it is: embedding); linear layers: " in \
        capsys.readouterr().err
    # `sop board --layer` (and the GEMV bring-up) take a layer by its name the same way
    from sop.synth.host.bringup import model_layer

    name, stream, cols = model_layer(str(folder), "sop4-g16", router)
    assert name == router and cols == 32
    with pytest.raises(ValueError, match=r"no linear layer 'model\.embed_tokens\.weight' \(kept as it is: embedding\)"):
        model_layer(str(folder), "sop4-g16", "model.embed_tokens.weight")


def test_equal_values_at_several_places_go_where_the_checkpoint_names_say(tmp_path):
    """An expert of zeros, and one whose up matrix equals its gate: their values sit at both halves of
    ``gate_up_proj``, and the names (w1 before w3 in transformers' conversion) settle which is whose."""
    folder = make_moe(tmp_path / "m", "mixtral")
    ckpt = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
    for w in ("w1", "w2", "w3"):
        ckpt[name.format(e=1, w=w)][:] = 0
    ckpt[name.format(e=2, w="w3")] = ckpt[name.format(e=2, w="w1")].copy()
    save_file(ckpt, str(folder / "model.safetensors"), metadata={"format": "pt"})
    runner = L.load(open_model(str(folder)))
    for e in (1, 2):
        assert [runner.targets[name.format(e=e, w=w)].slot for w in ("w1", "w3", "w2")] == [
            ("gate_up_proj", e, 0), ("gate_up_proj", e, 48), ("down_proj", e, 0)]
    q, out = tmp_path / "m.sopq", tmp_path / "folder"
    assert main(["quantize", str(folder), "--format", "sop-budget", "--budget", "5", "--no-calib", "--out", str(q),
                 "--quiet"]) == 0
    assert main(["dequantize", str(q), "--out", str(tmp_path / "dq.safetensors"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--model-folder", "--out", str(out), "--quiet"]) == 0
    decoded, exported = load_file(str(tmp_path / "dq.safetensors")), load_file(str(out / "model.safetensors"))
    for n, w in decoded.items():
        np.testing.assert_array_equal(exported[n], w.astype(np.float32), err_msg=n)


def test_experts_called_otherwise_are_refused_in_one_line(moe_folders, tmp_path, monkeypatch, capsys):
    """A MoE block that calls its experts with other argument names: which tokens reach an expert is unknown."""
    from transformers.models.mixtral import modeling_mixtral as mm

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, index = self.gate(x)
        return self.experts(x, router_indices=index, routing_weights=weights).reshape(hidden_states.shape)

    monkeypatch.setattr(mm.MixtralSparseMoeBlock, "forward", forward)
    args = ["eval", str(moe_folders["mixtral"]), "--format", "e2m3-ue4m4-g16", *SMALL[:4], "--no-e2e",
            "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sop: error: calibration: the experts module MixtralExperts is not called as transformers' experts are "
        "(hidden_states, top_k_index, top_k_weights), so which tokens reach an expert is unknown; --exclude its "
        "experts, or --no-calib")
    from sop.quantize.evaluate import evaluate

    # from Python the parameters (it said `--exclude its experts, or --no-calib`, options it has not got)
    with pytest.raises(ValueError, match=r"^calibration: the experts module MixtralExperts is not called as .* an "
                                         r"expert is unknown; exclude= its experts, or calibrate=False$"):
        evaluate(str(moe_folders["mixtral"]), ["e2m3-ue4m4-g16"], e2e=False, n_calib=C.CalibSize(seqs=3, seq_len=SEQ),
                 cache_dir=tmp_path / "c", progress=False)


def test_dbrx_attention_is_quantized_and_its_experts_kept_saying_so(tmp_path, capsys):
    """DBRX (an outside probe): its attention, under ``norm_attn_norm``, was kept as a "norm", and its experts,
    ``ffn.experts.mlp.w1`` with each expert's rows stacked 2-D and not named as a weight, as "2-D non-weight"
    without a word: 2 of its 38 matrices (the routers) were quantized. The attention is quantized and
    calibrated now; the experts are kept, a warning saying how much of the model they are."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.dbrx import DbrxConfig

    cfg = DbrxConfig(vocab_size=VOCAB, initializer_range=0.25, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                     d_model=HIDDEN, n_heads=4, n_layers=2, max_seq_len=128,
                     attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                     ffn_config={"ffn_hidden_size": 48, "moe_num_experts": EXPERTS, "moe_top_k": 2})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dbrx")
    bpe_tokenizer().save_pretrained(tmp_path / "dbrx")
    src = open_model(str(tmp_path / "dbrx"))
    attention = {f"transformer.blocks.{i}.norm_attn_norm.attn.{m}.weight"
                 for i in range(2) for m in ("Wqkv", "out_proj")}
    assert attention <= {lay.name for lay in src.layers}
    assert src.notes == ["6 2-D expert tensor(s) not named as weights kept as they are (36,864 weights, 58 % of the "
                         "checkpoint's floating-point weights; e.g. transformer.blocks.0.ffn.experts.mlp.v1): sop "
                         "quantizes tensors named as weights and the fused experts of the model types it follows "
                         "(docs/quantizer.md, \"Fused experts\"), so these stay in full precision and the bits per "
                         "weight count the quantized layers alone"]
    runner = L.load(src)
    stats, _ = runner.collect_stats(windows_of(runner, 2))
    assert attention <= set(stats)
