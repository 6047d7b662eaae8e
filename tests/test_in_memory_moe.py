"""A transformers 5 mixture-of-experts model held in memory, quantized in place (quantize/in_memory.py):
each expert's matrix inside the fused ``(experts, rows, in)`` parameters is a layer, named and weighted as
the checkpoint path names and weighs the tensor ``save_pretrained`` writes for it. The oracle is the disk
path on the same model saved: its runner finds each per-expert tensor in the running model by its values
(``causal_lm._expert_slots``), independently of the conversion table the in-memory path reads."""

import re

import numpy as np
import pytest
import torch

from sop.quantize import causal_lm as L
from sop.quantize.artifact import open_artifact, quantize_model
from sop.quantize.in_memory import quantize_module
from sop.quantize.models import open_model

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from test_causal_lm import bpe_tokenizer, reference_model, windows_of  # noqa: E402
from test_causal_lm_moe import EXPERTS, NAMES, OTHERS, make_moe, moe_config  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    return {arch: make_moe(base / arch, arch) for arch in (*NAMES, *OTHERS)}


def in_memory_name(runner, tname: str) -> str:
    """The name the in-memory path gives a checkpoint tensor: its module's, and for an expert's matrix the
    experts module's, the expert and the checkpoint's own name for it (``w1.weight``)."""
    t = runner.targets[tname]
    if t.slot is None:
        return f"{t.module}.weight"
    tail = re.search(r"experts\.\d+\.(.+)$", tname)[1]
    return f"{t.module}.{t.slot[1]}.{tail}"


def held(model, runner, tname: str) -> np.ndarray:
    """The matrix a checkpoint tensor is in ``model`` now, read at the place the runner found it."""
    t = runner.targets[tname]
    mod = dict(model.named_modules())[t.module]
    if t.slot is None:
        return mod.weight.detach().numpy()
    pname, e, r0 = t.slot
    return getattr(mod, pname).detach()[e, r0:r0 + runner.src.tensor_shape(tname)[0]].numpy()


@pytest.mark.parametrize(("arch", "fmt"), [(arch, "sop4-g16") for arch in (*sorted(NAMES), *OTHERS)]
                         + [(arch, "sop-budget") for arch in sorted(NAMES)])
def test_every_expert_matrix_is_a_layer_with_the_checkpoint_paths_bits(folders, tmp_path, arch, fmt):
    budget = {"budget": 5.5} if fmt == "sop-budget" else {}
    out = tmp_path / "m.sopq"
    quantize_model(str(folders[arch]), fmt, out, calibrate=False, progress=False, **budget)
    art = open_artifact(out)
    runner = L.load(open_model(str(folders[arch])))
    model = reference_model(folders[arch])
    res = quantize_module(model, fmt, **budget)
    names = {in_memory_name(runner, e.name): e for e in art.layers}
    assert sorted(names) == sorted(res.layers)
    experts = [n for n in names if names[n].name in runner.targets and runner.targets[names[n].name].slot]
    assert len(experts) == {"deepseek_v3": 12, "nemotron_h": 8}.get(arch, 24)
    for name, entry in names.items():
        assert np.array_equal(held(model, runner, entry.name), art.weights(entry)), name
        choice = f"{res.budget.choice[name]}: {res.layers[name].choice}" if budget else res.layers[name].choice
        assert res.layers[name].bits == entry.bits and choice == entry.choice, name
    assert not [k for k in res.kept if "experts" in k and "shared" not in k]     # no fused parameter kept
    if budget:
        assert len(set(res.budget.choice.values())) > 1       # promotions happened: the test can see them


@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe", "deepseek_v3", "nemotron_h"])
def test_expert_statistics_equal_calibration_on_disk(folders, arch):
    """The same windows through the checkpoint path's runner and through the model in memory: each expert
    matrix's statistic (over the tokens reaching its block, a token routed elsewhere a zero input) the
    same bit for bit."""
    runner = L.load(open_model(str(folders[arch]), routers=True))
    win = windows_of(runner, 2)
    disk, _ = runner.collect_stats(win)
    res = quantize_module(reference_model(folders[arch]), "nf4-g64", [{"input_ids": win, "use_cache": False}],
                          routers=True)
    want = {in_memory_name(runner, n): s for n, s in disk.items() if runner.targets[n].module != runner.head_module}
    assert sorted(want) == sorted(res.act_ms) and res.unreached == []
    for name, s in want.items():
        assert np.array_equal(res.act_ms[name], s), name


def test_an_expert_no_token_reaches_is_unreached_as_on_disk(tmp_path):
    """Top-1 routing with expert 3's router row zero and expert 2's the opposite of expert 1's: expert 3
    never wins; its matrices get 1 / tokens, as the disk path's ``unrouted``."""
    folder = make_moe(tmp_path / "m", "mixtral", top_k=1)
    model = reference_model(folder)
    for i in range(2):
        with torch.no_grad():
            r = model.model.layers[i].mlp.gate.weight
            r[2], r[3] = -r[1], 0
    model.save_pretrained(tmp_path / "zeroed")
    bpe_tokenizer().save_pretrained(tmp_path / "zeroed")
    runner = L.load(open_model(str(tmp_path / "zeroed"), routers=True))
    win = windows_of(runner, 2)
    disk, tokens = runner.collect_stats(win)
    res = quantize_module(model, "nf4-g64", [{"input_ids": win}], routers=True)
    lost = [f"model.layers.{i}.mlp.experts.3.{w}.weight" for i in range(2) for w in ("w1", "w2", "w3")]
    assert sorted(res.unreached) == lost == sorted(in_memory_name(runner, n) for n in runner.unrouted)
    for name in lost:
        assert np.array_equal(res.act_ms[name], np.full(res.layers[name].shape[1], 1 / tokens)), name
    for tname, s in disk.items():
        if runner.targets[tname].module != runner.head_module:
            assert np.array_equal(res.act_ms[in_memory_name(runner, tname)], s), tname


@pytest.mark.parametrize(("arch", "names"), [
    ("mixtral", ("model.layers.1.mlp.experts.2.w1.weight", "model.layers.1.mlp.experts.2.w2.weight",
                 "model.layers.0.mlp.experts.0.w3.weight")),
    # DeepSeek's latent attention applies kv_b_proj to a (batch, 1, seq, rank) input: its padded positions
    # were counted (an outside probe)
    ("deepseek_v3", ("model.layers.1.mlp.experts.1.gate_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                     "model.layers.1.self_attn.kv_b_proj.weight"))])
def test_padded_positions_reach_no_statistic(arch, names):
    """A padded batch: the experts module takes the flattened hidden states, the mask matched to them; the
    statistics are those of the real tokens run unpadded (right padding: a real token attends to none)."""
    from transformers.models.auto import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch)).eval()
    ids = torch.randint(2, 64, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    padded = quantize_module(model, "nf4-g64", [{"input_ids": ids, "attention_mask": mask}], include=list(names))
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(moe_config(arch)).eval()
    alone = quantize_module(fresh, "nf4-g64", [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :5]}],
                            include=list(names))
    assert padded.tokens == alone.tokens == 13
    for name in names:
        np.testing.assert_allclose(padded.act_ms[name], alone.act_ms[name], rtol=1e-5, err_msg=name)


def test_excluded_expert_matrices_are_kept_by_name_and_unsplit_experts_quantized_per_expert():
    """An ``exclude`` glob keeps one expert's matrices under their names (the rest of the fused parameter
    quantized, that expert's rows unchanged); experts no conversion splits (GraniteMoE stores them fused)
    and experts stored (in, out) (GPT-OSS) are quantized expert by expert, as on disk
    (tests/test_causal_lm_fused_experts.py checks them against the disk path), and a glob on the fused
    parameter's name keeps all its experts."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.granitemoe import GraniteMoeConfig
    from transformers.models.gpt_oss import GptOssConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("mixtral"))
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    res = quantize_module(model, "sop4-g16", exclude=["*.experts.1.*"])
    assert {k: v for k, v in res.kept.items() if "experts" in k} == {
        f"model.layers.{i}.mlp.experts.1.{w}.weight": "not selected (include/exclude)"
        for i in range(2) for w in ("w1", "w3", "w2")}
    after = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])
    assert len([n for n in res.layers if ".experts." in n]) == 2 * (EXPERTS - 1) * 3
    common = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
    for cfg, block in ((GraniteMoeConfig(**common), "block_sparse_moe"), (GptOssConfig(**common), "mlp")):
        res = quantize_module(AutoModelForCausalLM.from_config(cfg), "sop4-g16")
        assert not [k for k in res.kept if k.endswith(("gate_up_proj", "down_proj"))], res.kept
        assert sorted(n for n in res.layers if ".experts." in n) == [
            f"model.layers.0.{block}.experts.{p}[{e}]" for p in ("down_proj", "gate_up_proj") for e in range(4)]
        res = quantize_module(AutoModelForCausalLM.from_config(cfg), "sop4-g16", exclude=["*.gate_up_proj"])
        assert res.kept[f"model.layers.0.{block}.experts.gate_up_proj"] == "not selected (include/exclude)"
        assert len([n for n in res.layers if ".experts." in n]) == 4


def test_experts_of_a_module_that_does_not_say_how_it_stores_them_are_kept_naming_both_callers_settings():
    """Fused experts whose module says nothing of their layout (no ``is_transposed``: LongCat-Flash's) are
    kept, and the reason names what leaves them out of a checkpoint on disk for a Python caller too (it
    named the command line's ``--exclude`` alone)."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.granitemoe import GraniteMoeConfig

    model = AutoModelForCausalLM.from_config(GraniteMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    experts = model.model.layers[0].block_sparse_moe.experts
    del experts.is_transposed
    before = experts.down_proj.detach().clone()
    res = quantize_module(model, "sop4-g16")
    for p in ("gate_up_proj", "down_proj"):
        assert res.kept[f"model.layers.0.block_sparse_moe.experts.{p}"] == (
            "fused MoE experts of GraniteMoeExperts, which does not say how it stores them (is_transposed): kept "
            "(a checkpoint on disk with these experts is refused: quantize_model's exclude, or sop quantize's "
            "--exclude, leaves them out)")
    assert torch.equal(experts.down_proj.detach(), before) and not [n for n in res.layers if "[" in n]


def test_experts_called_otherwise_are_refused_with_what_a_python_caller_can_do(monkeypatch):
    """A MoE block that calls its experts with other argument names: one ValueError that names the
    arguments of quantize_module (it named the commands' flags), and the model unchanged."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.mixtral import modeling_mixtral as mm

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, index = self.gate(x)
        return self.experts(x, router_indices=index, routing_weights=weights).reshape(hidden_states.shape)

    monkeypatch.setattr(mm.MixtralSparseMoeBlock, "forward", forward)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("mixtral"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    with pytest.raises(ValueError, match=r"MixtralExperts is not called as transformers' experts are .*; "
                                         r"exclude= its experts, or give no batches$"):
        quantize_module(model, "sop4-g16", batch)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert quantize_module(model, "sop4-g16").layers          # no batches, as the message says: quantized


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sop_budget_breaks_exact_ties_as_the_checkpoint_path(folders, tmp_path, dtype):
    """An outside probe: on a bf16 / float16 Nemotron-H two promotions gained exactly the same, and the
    knapsack, which breaks such ties by layer order, promoted one layer in memory (module order, the
    experts last) and another on disk (the names' order). The layers are now taken in the checkpoint
    path's order."""
    from transformers.models.auto import AutoModelForCausalLM

    folder = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(str(folders["nemotron_h"]), dtype=dtype).save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    quantize_model(str(folder), "sop-budget", tmp_path / "m.sopq", budget=5.5, calibrate=False, progress=False)
    art = open_artifact(tmp_path / "m.sopq")
    runner = L.load(open_model(str(folder)))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    res = quantize_module(model, "sop-budget", budget=5.5)
    assert [in_memory_name(runner, e.name) for e in art.layers] == list(res.layers)
    assert {in_memory_name(runner, e.name): e.choice for e in art.layers} == {
        n: f"{res.budget.choice[n]}: {r.choice}" for n, r in res.layers.items()}
