"""MoE experts stored fused in the checkpoint, one ``(experts, ...)`` tensor per projection and block
(quantize/models.py, ``is_expert_stack``): tiny random GraniteMoE (``input_linear.weight`` stored
``(experts, out, in)``, run as transformers' ``gate_up_proj``), GPT-OSS (``gate_up_proj`` stored
``(experts, in, out)``, gate and up interleaved, with biases) and Llama 4 (``(experts, in, out)``, every
token sent to every expert times its router score) folders as transformers 5 saves them.
Each expert is a layer of its own (``tensor[e]``), read alone from the file; its statistic is the mean
square of what it takes over the tokens routed to it, recomputed here from the checkpoint's own router
and matrices; the decoded file holds each fused tensor again, and the exported folder the
reconstructions where the checkpoint had the experts."""

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from sop.cli import main
from sop.quantize import artifact as A
from sop.quantize import causal_lm as L
from sop.quantize.inputs import command_line
from sop.quantize.models import FILTERED, open_model

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from test_artifact import rebuild  # noqa: E402
from test_causal_lm import SEQ, SMALL, VOCAB, bpe_tokenizer, reference_model, windows_of  # noqa: E402
from test_causal_lm_moe import block_inputs  # noqa: E402

HIDDEN, INTER, EXPERTS = 32, 48, 4

#: per family: the fused tensors of block {i} (gate and up, down), the router's weight and bias (or None),
#: whether the checkpoint stores the experts (experts, in, out)
FUSED = {"granitemoe": ("model.layers.{i}.block_sparse_moe.input_linear.weight",
                        "model.layers.{i}.block_sparse_moe.output_linear.weight",
                        "model.layers.{i}.block_sparse_moe.router.layer.weight", None, False),
         "gpt_oss": ("model.layers.{i}.mlp.experts.gate_up_proj", "model.layers.{i}.mlp.experts.down_proj",
                     "model.layers.{i}.mlp.router.weight", "model.layers.{i}.mlp.router.bias", True),
         "llama4": ("model.layers.{i}.feed_forward.experts.gate_up_proj",
                    "model.layers.{i}.feed_forward.experts.down_proj",
                    "model.layers.{i}.feed_forward.router.weight", None, True)}


def make(path, arch: str):
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.gpt_oss import GptOssConfig
    from transformers.models.granitemoe import GraniteMoeConfig
    from transformers.models.llama4 import Llama4TextConfig

    common = {"vocab_size": VOCAB, "initializer_range": 0.25, "bos_token_id": 0, "eos_token_id": 1,
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_local_experts": EXPERTS, "num_experts_per_tok": 2}
    cfg = (GraniteMoeConfig(**common) if arch == "granitemoe" else GptOssConfig(head_dim=8, **common)
           if arch == "gpt_oss" else Llama4TextConfig(head_dim=8, intermediate_size_mlp=64, interleave_moe_layer_step=1,
                                                      pad_token_id=2, **common))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if arch == "gpt_oss":                   # random biases, so that a wrong orientation or bias shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_bias") or name.endswith("router.bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("fused")
    return {arch: make(base / arch, arch) for arch in FUSED}


def stored(folder) -> dict:
    """The checkpoint's tensors as float64 numpy (BF16 and all)."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k).double().numpy() for k in h.keys()}


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_each_expert_of_a_fused_tensor_is_a_layer_read_alone(folders, arch):
    gate_up, down, _, _, in_out = FUSED[arch]
    src = open_model(str(folders[arch]))
    ckpt = stored(folders[arch])
    for i in range(2):
        for tensor in (gate_up.format(i=i), down.format(i=i)):
            names = [f"{tensor}[{e}]" for e in range(EXPERTS)]
            assert [lay.name for lay in src.layers if lay.tensor == tensor] == names
            for e, name in enumerate(names):
                lay = src.layer(name)
                want = ckpt[tensor][e].T if in_out else ckpt[tensor][e]
                assert (lay.stack, lay.transposed, lay.shape) == ((tensor, e, EXPERTS), in_out, want.shape)
                np.testing.assert_array_equal(src.load(name), want, err_msg=name)
                assert src.file_of(name) == folders[arch] / "model.safetensors"
    assert src.layer(f"{gate_up.format(i=0)}[0]").shape == (2 * INTER, HIDDEN)
    assert src.notes == []                  # nothing of 3 dimensions is left unquantized
    # selected as one tensor: a glob on the tensor's name takes or leaves all its experts
    only = open_model(str(folders[arch]), exclude=[down.format(i="*")])
    assert [lay.stack[:2] for lay in only.layers if lay.stack] == [(gate_up.format(i=i), e) for i in range(2)
                                                                    for e in range(EXPERTS)]
    assert only.skipped[down.format(i=1)] == FILTERED and only.notes == []
    # the count of them says the settings as its caller names them
    assert "2 filtered out by include/exclude" in only.kept_line()
    with command_line():
        assert "2 filtered out by --include/--exclude" in only.kept_line()


def test_three_dimensional_tensors_that_are_no_experts_stay_with_a_warning(tmp_path, capsys):
    """A convolution's 3-D weight and FP8 fused experts are kept, and the warning says how much."""
    from safetensors.torch import save_file

    save_file({"blk.0.experts.gate_up_proj": torch.randn(4, 64, 96), "conv.weight": torch.randn(8, 4, 3),
               "blk.0.moe.experts.w13": torch.randn(2, 8, 8).to(torch.float8_e4m3fn),
               "blk.0.norm.weight": torch.ones(64)}, str(tmp_path / "m.safetensors"))
    src = open_model(str(tmp_path / "m.safetensors"))
    assert [lay.name for lay in src.layers] == [f"blk.0.experts.gate_up_proj[{e}]" for e in range(4)]
    (note,) = src.notes
    assert note.startswith("2 floating-point tensor(s) of 3 or more dimensions kept as they are (224 weights, "
                           "1 % of the checkpoint's floating-point weights; e.g. blk.0.moe.experts.w13)")
    assert main(["quantize", str(tmp_path / "m.safetensors"), "--format", "nf4-g64", "--no-calib",
                 "--out", str(tmp_path / "q.sopq"), "--quiet"]) == 0
    assert "warning: 2 floating-point tensor(s) of 3 or more dimensions" in capsys.readouterr().err


def routed_statistics(folder, arch, wins) -> dict:
    """Per expert layer: the mean square of its input, from the reference model's MoE block inputs, a
    router of our own (top-k of the checkpoint router's logits) and the checkpoint's own matrices (a
    token not routed to an expert a zero input to it)."""
    gate_up, down, router, bias, _ = FUSED[arch]
    ref = reference_model(folder)
    cfg = ref.config
    ckpt = {k: torch.from_numpy(v) for k, v in stored(folder).items()}
    blocks = [layer.block_sparse_moe if arch == "granitemoe" else layer.feed_forward if arch == "llama4" else layer.mlp
              for layer in ref.model.layers]
    inputs = block_inputs(ref, blocks, wins)
    want = {}
    for i, x in inputs.items():
        logits = x @ ckpt[router.format(i=i)].T + (ckpt[bias.format(i=i)] if bias else 0)
        top = torch.topk(logits, cfg.num_experts_per_tok, dim=-1).indices
        for e in range(EXPERTS):
            xe = x * (top == e).any(1, keepdim=True)
            w = ckpt[gate_up.format(i=i)][e]
            if arch == "granitemoe":        # (2 * inter, in): gate over up, silu
                h = xe @ w.T
                mid = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            elif arch == "llama4":          # every token, times its router score (sigmoid), 0 where not routed
                xe = xe * torch.sigmoid(logits[:, e:e + 1])
                h = xe @ w
                mid = torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:]
            else:                           # (in, 2 * inter): gate and up interleaved, clamped, biased
                h = xe @ w + ckpt[f"{gate_up.format(i=i)}_bias"][e]
                g, u = h[:, ::2].clamp(max=cfg.swiglu_limit), h[:, 1::2].clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
                mid = (u + 1) * g * torch.sigmoid(g * 1.702)
            want[f"{gate_up.format(i=i)}[{e}]"] = (xe * xe).mean(0)
            mid = mid * (top == e).any(1, keepdim=True)
            want[f"{down.format(i=i)}[{e}]"] = (mid * mid).mean(0)
    return want


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_each_expert_is_found_and_its_statistic_taken_over_the_tokens_routed_to_it(folders, arch):
    src = open_model(str(folders[arch]))
    runner = L.load(src)
    ckpt = stored(folders[arch])
    for lay in src.layers:                  # the matrix the model runs is the checkpoint's, value for value
        t = runner.targets[lay.name]
        held = runner.weight_of(t).detach().double().numpy()
        want = ckpt[lay.tensor][lay.stack[1]] if lay.stack else ckpt[lay.name]
        assert held.shape == want.shape and np.array_equal(held, want.astype(np.float32)), lay.name
    wins = windows_of(runner, 2)
    stats, tokens = runner.collect_stats(wins)
    assert tokens == 2 * SEQ and runner.unrouted == []
    want = routed_statistics(folders[arch], arch, wins)
    assert len(want) == 2 * 2 * EXPERTS and set(want) <= set(stats)
    for name, w in want.items():
        np.testing.assert_allclose(stats[name], w.numpy(), rtol=1e-5, atol=1e-12, err_msg=name)


def test_experts_the_model_holds_otherwise_are_refused_by_name(folders, monkeypatch):
    """A fused tensor whose experts the model holds in another order than the file (as a loading conversion
    that reorders them would leave it; here the file's reading is shifted by one expert) is no expert of
    the running model: refused, naming the layer and what to do; excluded, the rest runs."""
    from sop.quantize.models import ModelSource

    name = FUSED["granitemoe"][0].format(i=1)
    read = ModelSource.read_tensor
    monkeypatch.setattr(ModelSource, "read_tensor", lambda self, t, index=None: read(
        self, t, index if t != name or index is None else (index + 1) % EXPERTS))
    # the hint names the tensor: --exclude 'X[0]' would be a glob's character class, matching nothing; from
    # Python the parameters (it said `--exclude X, ..., or --no-calib ...`)
    with pytest.raises(ValueError, match=rf"layer {re.escape(name)}\[0\] is the weight of no linear module "
                                         rf".*; exclude= {re.escape(name)}, its experts' tensor, or "
                                         rf"calibrate=False quantizes it"):
        L.load(open_model(str(folders["granitemoe"])))
    with command_line(), pytest.raises(ValueError, match=rf"; --exclude {re.escape(name)}, its experts' tensor, "
                                                         rf"or --no-calib quantizes it"):
        L.load(open_model(str(folders["granitemoe"])))
    runner = L.load(open_model(str(folders["granitemoe"]), exclude=[name]))
    assert f"{FUSED['granitemoe'][0].format(i=0)}[3]" in runner.targets and f"{name}[0]" not in runner.targets


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_experts_quantize_decode_to_their_tensor_and_export(folders, arch, tmp_path, capsys):
    folder = folders[arch]
    gate_up, down, _, _, in_out = FUSED[arch]
    q, out = tmp_path / "m.sopq", tmp_path / "folder"
    assert main(["quantize", str(folder), "--format", "sop4-g16", *SMALL[:4], "--out", str(q),
                 "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    art = A.open_artifact(q)
    tensor = gate_up.format(i=1)
    assert [e.stack for e in art.layers if e.name.startswith(tensor)] == [(tensor, e, EXPERTS) for e in range(EXPERTS)]
    assert main(["dequantize", str(q), "--out", str(tmp_path / "dq.safetensors"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--model-folder", "--out", str(out), "--quiet"]) == 0
    decoded, exported = load_file(str(tmp_path / "dq.safetensors")), load_file(str(out / "model.safetensors"))
    ckpt = stored(folder)
    assert {n for n in decoded if n.startswith("model.layers.")} >= {gate_up.format(i=0), down.format(i=1)}
    for name, w in decoded.items():         # each fused tensor whole again, as the checkpoint stores it
        assert w.shape == ckpt[name].shape and not np.array_equal(w, ckpt[name]), name
        np.testing.assert_array_equal(exported[name], w, err_msg=name)
    for e in range(EXPERTS):                # expert by expert the layer's own reconstruction
        rec = art.weights(art.entry(f"{tensor}[{e}]"))
        np.testing.assert_array_equal(decoded[tensor][e], rec.T if in_out else rec)
    capsys.readouterr()
    args = ["eval", str(folder), "--format", "e2m3-ue4m4-g16", *SMALL, "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "ppl" in first and f"{len(open_model(str(folder)).layers)} linear layers" in first
    assert main(args) == 0                  # the reference is restored after the substitution
    assert capsys.readouterr().out.splitlines()[-4:] == first.splitlines()[-4:]


def _reorder(meta, body):
    layers = meta["layers"]
    i = next(k for k, e in enumerate(layers) if "stack" in e)
    a, b = layers[i], layers[i + 1]
    a["stack"], b["stack"] = b["stack"], a["stack"]
    a["name"], b["name"] = b["name"], a["name"]


@pytest.mark.parametrize("edit, said", [
    (_reorder, "are not its 4 experts in order"),
    (lambda m, b: next(e for e in m["layers"] if "stack" in e)["stack"].__setitem__(1, 9), "field 'stack' must be"),
    (lambda m, b: next(e for e in m["layers"] if "stack" in e).update(name="x[0]"), "field 'stack' must be"),
], ids=["out of order", "index past the count", "name not the tensor's"])
def test_a_header_whose_experts_do_not_make_their_tensor_is_refused(folders, tmp_path, capsys, edit, said):
    q = tmp_path / "m.sopq"
    assert main(["quantize", str(folders["granitemoe"]), "--format", "sop4-g16", "--no-calib", "--out", str(q),
                 "--quiet"]) == 0
    bad = tmp_path / "bad.sopq"
    bad.write_bytes(rebuild(q.read_bytes(), edit))
    assert main(["dequantize", str(bad), "--out", str(tmp_path / "w.safetensors"), "--quiet"]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()


#: the running model's names of GraniteMoE's checkpoint tensors (transformers renames them on loading)
RUNNING = {"granitemoe": (("input_linear.weight", "experts.gate_up_proj"),
                          ("output_linear.weight", "experts.down_proj"), ("router.layer.weight", "router.weight")),
           "gpt_oss": ()}


def running_name(arch: str, name: str) -> str:
    for disk, running in RUNNING[arch]:
        name = name.replace(disk, running)
    return name


@pytest.mark.parametrize("arch", ["gpt_oss", "granitemoe"])
def test_in_memory_the_experts_are_the_disk_paths_layers_records_and_statistics(folders, tmp_path, arch):
    """quantize_module on the loaded model: the same layers as on disk, under their names on disk in the
    .sopq (GraniteMoE's ``input_linear.weight[e]``), the same records, each expert's reconstruction in the
    model's fused parameter, and on the same windows the same statistics."""
    from sop.quantize.artifact import open_artifact, quantize_model
    from sop.quantize.in_memory import quantize_module
    from test_in_memory_sopq import same_records

    quantize_model(str(folders[arch]), "sop4-g16", tmp_path / "disk.sopq", calibrate=False, progress=False)
    model = reference_model(folders[arch])
    res = quantize_module(model, "sop4-g16", out=tmp_path / "mem.sopq")
    disk, mem = open_artifact(tmp_path / "disk.sopq"), open_artifact(tmp_path / "mem.sopq")
    same_records(mem, disk)
    assert [e.stack for e in mem.layers] == [e.stack for e in disk.layers]
    assert sum(e.stack is not None for e in mem.layers) == 2 * 2 * EXPERTS
    assert sorted(res.layers) == sorted(running_name(arch, e.name) for e in mem.layers)
    assert not [k for k in res.kept if ("experts" in k or "linear" in k) and not k.endswith("_bias")]
    params = dict(model.named_parameters())
    for e in mem.layers:                    # the model holds what the file decodes to
        name = running_name(arch, e.stack[0] if e.stack else e.name)
        w = params[name].detach()
        w = (w[e.stack[1]] if e.stack else w).numpy()
        assert np.array_equal(w.T if e.transposed else w, mem.weights(e)), e.name
    runner = L.load(open_model(str(folders[arch])))
    wins = windows_of(runner, 2)
    want, _ = runner.collect_stats(wins)
    got = quantize_module(reference_model(folders[arch]), "sop4-g16", [{"input_ids": wins}]).act_ms
    assert len(got) == len(disk.layers)
    for e in disk.layers:
        np.testing.assert_allclose(got[running_name(arch, e.name)], want[e.name], rtol=1e-12, err_msg=e.name)


def test_in_memory_llama4s_experts_are_kept_saying_why(folders):
    """Llama 4's experts module takes every token times its router score, with no routed indices for the
    masked positions to be taken out of: kept in memory, the reason says so (on disk they are quantized)."""
    from sop.quantize.in_memory import quantize_module

    res = quantize_module(reference_model(folders["llama4"]), "sop4-g16")
    fused = sorted(k for k in res.kept if k.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert fused == sorted(n.format(i=i) for i in range(2) for n in FUSED["llama4"][:2])
    assert all(res.kept[k].startswith("fused MoE experts of Llama4TextExperts, called with every token") for k in fused)
    assert "model.layers.0.feed_forward.shared_expert.up_proj.weight" in res.layers


def test_every_reader_reads_one_expert_as_the_whole_tensor_holds_it(tmp_path):
    """``Reader.get(name, index)`` is ``get(name)[index]``, value for value and type for type, in every
    format (safetensors F32 and BF16, torch zip and legacy pickle, GGUF F32, BF16 and Q8_0)."""
    import gguf
    from safetensors.torch import save_file

    from sop.quantize.tensor_readers import READERS

    rng = np.random.default_rng(3)
    stack = torch.from_numpy(rng.standard_normal((3, 8, 64)).astype(np.float32))
    save_file({"f": stack, "b": stack.bfloat16()}, str(tmp_path / "m.safetensors"))
    torch.save({"f": stack, "b": stack.bfloat16()}, str(tmp_path / "zip.pt"))
    torch.save({"f": stack, "b": stack.bfloat16()}, str(tmp_path / "legacy.pt"), _use_new_zipfile_serialization=False)
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("f", stack.numpy())
    w.add_tensor("b", gguf.quants.quantize(stack.numpy(), T.BF16), raw_dtype=T.BF16)
    w.add_tensor("q", gguf.quants.quantize(stack.numpy(), T.Q8_0), raw_dtype=T.Q8_0)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    for kind, f in (("safetensors", "m.safetensors"), ("torch", "zip.pt"), ("torch", "legacy.pt"), ("gguf", "m.gguf")):
        reader = READERS[kind]([tmp_path / f])
        for name in reader.names():
            whole = reader.get(name)
            for e in range(3):
                one = reader.get(name, e)
                assert one.dtype == whole.dtype and np.array_equal(one, whole[e]), (f, name, e)
            assert not np.array_equal(reader.get(name, 0), reader.get(name, 1))


def test_fused_experts_of_a_model_type_the_forward_pass_does_not_follow_are_kept(tmp_path):
    """JetMoE's attention experts (``self_attention.experts.input_linear.weight``: its experts module takes
    its tokens sorted by expert, which no hook here follows) stay as they are, with the warning, and the
    model calibrates (quantizing them would have refused it)."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.jetmoe import JetMoeConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(JetMoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_key_value_heads=2,
        kv_channels=8, num_local_experts=EXPERTS, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1)
    ).save_pretrained(tmp_path)
    bpe_tokenizer().save_pretrained(tmp_path)
    src = open_model(str(tmp_path))
    assert not [lay for lay in src.layers if lay.stack] and src.skipped[
        "model.layers.0.self_attention.experts.input_linear.weight"] == "3-D"
    (note,) = src.notes
    assert note.startswith("8 floating-point tensor(s) of 3 or more dimensions kept as they are")
    runner = L.load(src)
    assert runner.collect_stats(windows_of(runner, 1))[1] == SEQ


def test_in_memory_fused_experts_of_a_model_type_the_disk_path_keeps_are_kept(folders):
    """The in-memory path takes fused experts for the disk path's model types alone (``FUSED_EXPERTS``):
    GraniteMoE's experts, under a model type the disk path does not follow, are kept, saying why."""
    from sop.quantize.in_memory import quantize_module

    model = reference_model(folders["granitemoe"])
    model.config.model_type = "not-a-type-sop-follows"
    res = quantize_module(model, "sop4-g16")
    fused = [k for k in res.kept if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 4 and not [n for n in res.layers if "[" in n]
    assert all("of a model type whose fused experts are kept, as on disk" in res.kept[k] for k in fused)


def test_in_memory_the_sopq_records_the_experts_orientation_on_disk_not_the_models(folders, tmp_path):
    """A model type whose checkpoint stores its experts ``(experts, in, out)`` while the model holds them
    ``(experts, out, in)`` (Qwen3-VL-MoE: transformers transposes them on loading; here GraniteMoE's model
    under that type): the .sopq says transposed, as the disk path's would, and decodes to the stored layout."""
    from sop.quantize.artifact import dequantize, open_artifact
    from sop.quantize.in_memory import quantize_module

    model = reference_model(folders["granitemoe"])
    model.config.model_type = "qwen3_vl_moe"
    held = model.model.layers[0].block_sparse_moe.experts.gate_up_proj.detach().clone()
    quantize_module(model, "sop4-g16", out=tmp_path / "m.sopq")
    art = open_artifact(tmp_path / "m.sopq")
    experts = [e for e in art.layers if e.stack]
    assert len(experts) == 2 * 2 * EXPERTS and all(e.transposed for e in experts)
    assert all(not e.transposed for e in art.layers if not e.stack)
    dequantize(tmp_path / "m.sopq", tmp_path / "d.safetensors", progress=False)
    decoded = load_file(str(tmp_path / "d.safetensors"))
    name = "model.layers.0.block_sparse_moe.input_linear.weight"            # the model class's name on disk
    assert decoded[name].shape == (EXPERTS, HIDDEN, 2 * INTER) == held.transpose(1, 2).shape
    now = model.model.layers[0].block_sparse_moe.experts.gate_up_proj.detach()
    np.testing.assert_array_equal(decoded[name], now.transpose(1, 2).numpy())


def _moe_gguf(path, arch, expert_type=None):
    """A one-block GGUF of llama.cpp's MoE layout: ``blk.0.ffn_{gate,up,down}_exps.weight`` (experts, out, in),
    the router ``ffn_gate_inp`` and an attention matrix; the gate experts stored as ``expert_type`` (a GGML
    quantization type) when given. Returns the experts tensors as written, float32."""
    import gguf

    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    experts = {"blk.0.ffn_gate_exps.weight": rng.standard_normal((EXPERTS, 8, 32)).astype(np.float32),
               "blk.0.ffn_up_exps.weight": rng.standard_normal((EXPERTS, 8, 32)).astype(np.float32),
               "blk.0.ffn_down_exps.weight": rng.standard_normal((EXPERTS, 32, 8)).astype(np.float32)}
    for name, t in experts.items():
        if expert_type is not None and name == "blk.0.ffn_gate_exps.weight":
            w.add_tensor(name, gguf.quants.quantize(t, expert_type), raw_dtype=expert_type)
            experts[name] = gguf.quants.dequantize(gguf.quants.quantize(t, expert_type), expert_type)
        else:
            w.add_tensor(name, t)
    w.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((EXPERTS, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    return experts


def test_a_moe_gguf_quantizes_each_expert_read_alone(tmp_path, capsys):
    """A Qwen3-MoE GGUF (``ffn_*_exps``, numpy's (experts, out, in) of GGUF's ne = [in, out, experts]): each
    expert is a layer of its own, read alone (a Q8_0 tensor dequantized expert by expert), and the decoded
    file holds each fused tensor again (before this, its experts were kept in full precision, most of such a
    model). Its forward pass: tests/test_causal_lm_moe_gguf.py."""
    import gguf

    experts = _moe_gguf(tmp_path / "m.gguf", "qwen3moe", expert_type=gguf.GGMLQuantizationType.Q8_0)
    src = open_model(str(tmp_path / "m.gguf"))
    stacked = [lay for lay in src.layers if lay.stack]
    assert len(stacked) == 3 * EXPERTS and not src.notes[0].startswith("1 floating-point tensor(s) of 3")
    assert src.skipped["blk.0.ffn_gate_inp.weight"] == "router"            # llama.cpp's router, kept
    assert src.notes[0].endswith(f"{EXPERTS} of the {len(src.layers)} selected layers are already quantized in "
                                 f"the GGUF (Q8_0 x{EXPERTS}); the reference is the GGUF dequantized to float32, "
                                 f"not a full-precision model")
    for name, t in experts.items():
        for e in range(EXPERTS):
            lay = next(lay for lay in stacked if lay.name == f"{name}[{e}]")
            assert lay.shape == t.shape[1:] and not lay.transposed and lay.stack == (name, e, EXPERTS)
            np.testing.assert_array_equal(src.load(lay.name), t[e].astype(np.float64))
    assert main(["quantize", str(tmp_path / "m.gguf"), "--format", "sop4-g16", "--out", str(tmp_path / "m.sopq"),
                 "--no-calib", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["dequantize", str(tmp_path / "m.sopq"), "--out", str(tmp_path / "d.safetensors"), "--quiet"]) == 0
    decoded = load_file(str(tmp_path / "d.safetensors"))
    assert len(decoded) == 4 and f": 4 float32 tensors ({len(src.layers)} layers), " in capsys.readouterr().out
    for name, t in experts.items():
        assert decoded[name].shape == t.shape
        for e in range(EXPERTS):                 # each expert's reconstruction where the tensor held it
            err = np.mean((decoded[name][e] - t[e]) ** 2) / np.mean(t[e] ** 2)
            assert err < 0.02, (name, e, err)
        others = np.mean((decoded[name][1:] - t[:-1]) ** 2) / np.mean(t[:-1] ** 2)
        assert others > 1, name                  # a shifted expert order would not pass the loop above


def test_a_llama_gguf_with_fused_experts_and_no_expert_count_has_no_forward_pass(tmp_path):
    """A Mixtral GGUF is architecture 'llama' with ``llama.expert_count`` and fused experts; it runs as a
    Mixtral (tests/test_causal_lm_moe_gguf.py, with the layout of one tensor per expert). Without the count
    transformers would build a dense Llama and calibration stopped on 'does not match its metadata: the model
    it describes needs model.layers.0.mlp.gate_proj.weight'. No forward pass, saying why; the experts are
    quantized."""
    _moe_gguf(tmp_path / "m.gguf", "llama")
    src = open_model(str(tmp_path / "m.gguf"))
    assert src.forward is None and src.forward_note == (
        "GGUF architecture 'llama' with mixture-of-experts blocks (experts in blk.0.ffn_gate_exps.weight, no "
        "llama.expert_count): transformers reads it as a dense model, without its experts")
    assert len([lay for lay in src.layers if lay.stack]) == 3 * EXPERTS


@pytest.mark.parametrize("bias", [True, False])
def test_a_file_alone_is_read_as_its_experts_bias_says(tmp_path, bias):
    """A GPT-OSS weights file with no config.json (no model type to say how it stores its experts) was read
    ``(experts, out, in)``: each expert blocked along its outputs. A bias beside the tensor, ``(experts, out)``,
    tells the axes apart; with none the rule stays ``(experts, out, in)``."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(4)
    stack = {"model.layers.0.mlp.experts.gate_up_proj": rng.standard_normal((EXPERTS, HIDDEN, 2 * INTER)),
             "model.layers.0.mlp.experts.down_proj": rng.standard_normal((EXPERTS, INTER, HIDDEN))}
    tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in stack.items()}
    if bias:
        tensors["model.layers.0.mlp.experts.gate_up_proj_bias"] = torch.zeros(EXPERTS, 2 * INTER)
        tensors["model.layers.0.mlp.experts.down_proj_bias"] = torch.zeros(EXPERTS, HIDDEN)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    src = open_model(str(tmp_path / "m.safetensors"))
    for name, t in stack.items():
        lay = next(lay for lay in src.layers if lay.name == f"{name}[2]")
        want = t[2].T if bias else t[2]
        assert (lay.shape, lay.transposed) == (want.shape, bias)
        np.testing.assert_array_equal(src.load(lay.name), want.astype(np.float32).astype(np.float64))
