"""Causal LMs through transformers (quantize/causal_lm.py): tiny random models built from a config
in the test (Llama, GPT-2, GPTBigCode, GPT-NeoX, Qwen2, Gemma 2; single and sharded safetensors; a GGUF), the checkpoint
name map, calibration by hooks against the inputs recomputed here, perplexity / KL divergence /
top-1 against an independent computation, the layer policy (lm_head, tied weights), `sop eval`'s
JSON and table, `sop report`'s KLD panel, the dequantized model folder, and bad input."""

import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sop.cli import main
from sop.quantize import calib as C
from sop.quantize import causal_lm as L
from sop.golden.files import OutputError
from sop.quantize.artifact import open_artifact, quantize_model
from sop.quantize.evaluate import evaluate
from sop.quantize.hf_export import export_model_folder
from sop.quantize.checkpoint_files import CheckpointError
from sop.quantize.models import linear_reason, open_model

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

VOCAB = 320
SEQ = 32                       # tokens per window in these tests (the CLI default is 256)
SMALL = ["--calib-seqs", "3", "--seq-len", str(SEQ), "--e2e-windows", "3"]


def configs():
    from transformers.models.gemma2 import Gemma2Config
    from transformers.models.gpt2 import GPT2Config
    from transformers.models.gpt_bigcode import GPTBigCodeConfig
    from transformers.models.gpt_neox import GPTNeoXConfig
    from transformers.models.llama import LlamaConfig
    from transformers.models.qwen2 import Qwen2Config

    common = {"vocab_size": VOCAB, "initializer_range": 0.25, "bos_token_id": 0, "eos_token_id": 1}
    return {
        "llama": LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True, **common),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
        # StarCoder's names (c_attn, c_proj, c_fc) on nn.Linear modules, stored (out, in)
        "bigcode": GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
        # Pythia's layout: its head is stored as embed_out, which transformers renames lm_head on loading
        "neox": GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              tie_word_embeddings=False, **common),
        "qwen2": Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=False, **common),
        "gemma2": Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=8, **common),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def bpe_tokenizer():
    """A byte-level BPE of 320 tokens trained on the calibration part of the corpus (offline, ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(C.corpus()[:300], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def make_folder(path, arch, tokenizer, shard=None, dtype=None):
    """A tiny random model of ``arch`` saved with save_pretrained (safetensors), with the tokenizer."""
    from transformers.models.auto import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[arch])
    if dtype is not None:
        model = model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("lm")
    out = {arch: make_folder(base / arch, arch, tokenizer) for arch in configs()}
    out["sharded"] = make_folder(base / "sharded", "llama", tokenizer, shard="20KB")
    out["bf16"] = make_folder(base / "bf16", "qwen2", tokenizer, dtype=torch.bfloat16)
    return out


def reference_model(folder):
    from transformers.models.auto import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()


def windows_of(runner, n=3, seq=SEQ):
    return runner.windows(runner.token_ids(C.heldout_sentences(C.HELDOUT_RESERVE)), n, seq, "held-out text")


# -- models, names, layer policy ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "bigcode", "neox", "qwen2", "gemma2", "sharded", "bf16"])
def test_every_linear_of_the_blocks_is_selected_and_mapped_to_its_module(folders, arch):
    src = open_model(str(folders[arch]))
    if arch == "bf16":
        assert {l.dtype for l in src.layers} == {"BF16"}
    assert src.forward == "causal-lm" and src.folder == folders[arch]
    runner = L.load(src)
    model = runner.model
    head = runner.head_module
    linears = {n for n, m in model.named_modules() if L._is_linear(m)}
    # the map is complete: every nn.Linear / Conv1D module, head included, comes from a checkpoint tensor
    assert {t.module for t in runner.targets.values()} == linears
    # the quantized layers are exactly the block linears: not the head, no embedding
    selected = {lay.name for lay in src.layers}
    assert selected == {t.name for t in runner.targets.values() if t.module != head}
    assert all(linear_reason(n, (2, 2), True) is None for n in selected)
    if arch == "sharded":
        assert len(src.files) > 1 and (folders[arch] / "model.safetensors.index.json").is_file()
    for lay in src.layers:                      # the checkpoint tensor is the module's weight, value for value
        t = runner.targets[lay.name]
        w = model.get_submodule(t.module).weight.detach().numpy()
        np.testing.assert_array_equal(runner.module_weight(lay.name, src.load(lay.name)), w)
        assert t.conv1d == (arch == "gpt2") == lay.transposed


def test_lm_head_policy_tied_and_untied(folders):
    tied = open_model(str(folders["llama"]))
    assert "model.embed_tokens.weight" not in {l.name for l in tied.layers}
    assert "tied to model.embed_tokens.weight" in tied.lm_head and "--include-lm-head" in tied.lm_head
    assert tied.kept()["embedding"] == 1 and "lm_head" in tied.kept_line()
    with_head = open_model(str(folders["llama"]), lm_head=True)
    assert "model.embed_tokens.weight" in {l.name for l in with_head.layers}
    assert with_head.tied_to == "model.embed_tokens.weight" and len(with_head.layers) == len(tied.layers) + 1
    runner = L.load(with_head)
    t = runner.targets["model.embed_tokens.weight"]
    assert t.tied and t.module == runner.head_module
    untied = open_model(str(folders["qwen2"]))
    assert untied.skipped["lm_head.weight"] == "lm_head" and "lm_head.weight" not in {l.name for l in untied.layers}
    assert "lm_head.weight" in {l.name for l in open_model(str(folders["qwen2"]), lm_head=True).layers}
    assert linear_reason("output.weight", (4, 4), True) == "lm_head"               # GGUF
    assert linear_reason("gpt_neox.embed_out.weight", (4, 4), True) == "lm_head"   # GPT-NeoX
    assert linear_reason("blk.0.attn_output.weight", (4, 4), True) is None


def test_an_include_naming_a_tied_head_says_which_name_and_option_select_it(folders):
    """A tied head is one layer under its embedding's name (kept without --include-lm-head): an --include of
    either name said only `check --include/--exclude` (an outside probe), where an untied head's says why."""
    from sop.quantize.inputs import command_line

    for include, lm_head, hint in (
            ("model.embed_tokens.weight", False, "model.embed_tokens.weight is the matrix lm_head is tied to, kept "
                                                 "unless --include-lm-head)"),
            ("lm_head*", False, "lm_head is tied to model.embed_tokens.weight: the shared matrix is one layer "
                                "under that name (with --include-lm-head))"),
            ("lm_head.weight", True, "lm_head is tied to model.embed_tokens.weight: the shared matrix is one layer "
                                     "under that name)")):
        with pytest.raises(ValueError, match="no linear layer selected") as err, command_line():
            open_model(str(folders["llama"]), include=include, lm_head=lm_head)
        assert str(err.value).endswith(hint), str(err.value)
        # a Python caller reads its own keyword (it read the command's flag)
        with pytest.raises(ValueError, match="no linear layer selected") as err:
            open_model(str(folders["llama"]), include=include, lm_head=lm_head)
        assert str(err.value).endswith(hint.replace("--include-lm-head", "lm_head=True")), str(err.value)
    assert [l.name for l in open_model(str(folders["llama"]), include="model.embed_tokens.weight",
                                       lm_head=True).layers] == ["model.embed_tokens.weight"]


def test_a_tied_head_quantized_changes_the_embedding_lookup_too(folders):
    src = open_model(str(folders["llama"]), lm_head=True)
    runner = L.load(src)
    w = src.load("model.embed_tokens.weight")
    model = runner.model
    with runner.substituted({"model.embed_tokens.weight": np.zeros_like(w)}):
        assert not model.get_input_embeddings().weight.any() and not model.get_output_embeddings().weight.any()
    np.testing.assert_array_equal(model.get_input_embeddings().weight.detach().numpy(), w)


def stored_twice(folders, d, config=None):
    """The tied Llama as torch.save(model.state_dict()) writes it: lm_head.weight beside the embedding, equal;
    ``config``: edits config.json (a key given None is removed)."""
    d.mkdir()
    for f in folders["llama"].iterdir():
        if f.suffix == ".json":
            shutil.copy(f, d / f.name)
    torch.save(reference_model(folders["llama"]).state_dict(), d / "pytorch_model.bin")
    if config:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return d


@pytest.mark.parametrize("tie", [True, None])
def test_a_tied_head_stored_twice_and_quantized_is_said_to_be_the_embeddings_matrix_too(folders, tmp_path, tie):
    """A review: with --include-lm-head the kept line of a tied model storing lm_head.weight beside its
    embedding said `1 embedding` kept, while the forward pass (and the model folder export) runs the quantized
    head's matrix as the embedding too: the line says so, and counts no embedding kept. Without
    tie_word_embeddings in config.json, Llama's default (untied) is what the model runs: one embedding kept.
    The forward pass's own tie (``Target.tied``) is the reference; kept, the head is said kept either way."""
    d = stored_twice(folders, tmp_path / "m", config={"tie_word_embeddings": tie})
    src = open_model(str(d), lm_head=True)
    runs_tied = L.load(src).targets["lm_head.weight"].tied
    assert runs_tied is (tie is True)
    line = src.kept_line()
    if runs_tied:
        assert "embedding" not in src.kept() and src.skipped["model.embed_tokens.weight"] != "embedding", line
        assert line.endswith("lm_head quantized (--include-lm-head) as lm_head.weight, tied to "
                             "model.embed_tokens.weight: the embedding lookup uses the quantized matrix too"), line
    else:
        assert src.kept()["embedding"] == 1 and line.endswith("; lm_head quantized (--include-lm-head)"), line
    kept = open_model(str(d))
    assert kept.kept()["embedding"] == 1 and kept.kept()["lm_head"] == 1, kept.kept_line()
    assert kept.kept_line().endswith("lm_head (lm_head.weight) kept (--include-lm-head quantizes it)")


@pytest.mark.parametrize("arch, exclude", [("qwen2", "lm_head*"), ("llama", "model.embed_tokens*")])
def test_a_head_the_exclude_leaves_out_is_said_kept_not_quantized(folders, arch, exclude):
    """--include-lm-head with an --exclude of the head (or of the tied matrix) said `lm_head quantized` /
    `quantized once, the embedding lookup uses it too`, while no head layer was selected."""
    src = open_model(str(folders[arch]), lm_head=True, exclude=exclude)
    assert not any("lm_head" in lay.name or "embed" in lay.name for lay in src.layers)
    assert "quantized" not in src.lm_head and src.lm_head.endswith("--include/--exclude leaves it out"), src.lm_head


def test_a_tied_head_stored_twice_is_quantized_weighted_whatever_the_cache_holds(folders, tmp_path, capsys):
    """torch.save(model.state_dict()) of a tied model stores lm_head.weight beside the embedding. With
    --include-lm-head the head was "the weight of no linear module" on a cold cache, and quantized
    unweighted under a calibration said to weight it on a cache filled by a run without the option."""
    d = stored_twice(folders, tmp_path / "m")
    src = open_model(str(d), lm_head=True)
    assert "lm_head.weight" in {lay.name for lay in src.layers}
    t = L.load(src).targets["lm_head.weight"]
    assert t.tied and t.module == L.load(src).head_module
    run = ["--format", "sop4-g16", "--quiet", *SMALL[:4]]
    cold, warm = tmp_path / "cold.sopq", tmp_path / "warm.sopq"
    assert main(["quantize", str(d), *run, "--include-lm-head", "--cache-dir", str(tmp_path / "c1"), "--out",
                 str(cold)]) == 0
    assert main(["quantize", str(d), *run, "--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "x.sopq")]) == 0
    assert main(["quantize", str(d), *run, "--include-lm-head", "--cache-dir", str(tmp_path / "c2"), "--out",
                 str(warm)]) == 0
    assert cold.read_bytes() == warm.read_bytes()                  # the header says nothing of the cache
    doc = tmp_path / "e.json"
    assert main(["eval", str(d), *run, "--include-lm-head", "--cache-dir", str(tmp_path / "c2"), "--no-e2e",
                 "--json", str(doc)]) == 0
    assert json.loads(doc.read_text())["formats"]["sop4-g16"]["layers"]["lm_head.weight"]["weighted"]
    capsys.readouterr()


# -- calibration ---------------------------------------------------------------------------------------

def test_a_cache_without_a_selected_layers_statistic_is_a_miss(folders, tmp_path):
    """A causal LM refuses a selected layer its forward pass gives no statistic; a cache whose layer list
    is whole but lacks one (another run's statistics) is recomputed, so the run meets that refusal or
    the statistic, never an unweighted layer under a calibration said to weight it."""
    src = open_model(str(folders["llama"]))
    size = C.CalibSize(seqs=2, seq_len=SEQ)
    first = C.calibrate(src, size, cache_dir=tmp_path)
    path = tmp_path / f"{first.key[:32]}.npz"
    layer = src.layers[0].name
    stats = {k: v for k, v in first.act_ms.items() if k != layer}
    C._save(path, C.Calibration(True, first.note, stats, first.key, first.sentences, first.tokens,
                                seqs=first.seqs, seq_len=first.seq_len), None)
    again = C.calibrate(src, size, cache_dir=tmp_path)
    assert not again.cached
    np.testing.assert_array_equal(again.act_ms[layer], first.act_ms[layer])
    assert C.calibrate(src, size, cache_dir=tmp_path).cached


def test_calibrations_memory_estimate_is_the_model_alone(folders, monkeypatch):
    """Calibration's head hook stops the pass before any logits, but its estimate held one batch's
    (0.5 GB with Llama 3's vocabulary): a model that fits was refused (an outside review)."""
    src = open_model(str(folders["llama"]))
    params = sum(math.prod(src.tensor_shape(n)) for n in src.tensor_names())
    assert L.memory_needed(src) == 4 * params
    assert L.memory_needed(src, windows=2) > 4 * params                # the end-to-end check's logits
    monkeypatch.setenv("SOP_MEMORY_LIMIT", str(4 * params + 1024))
    L.check_memory(src)                                          # the model fits: calibration runs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_statistics_are_the_mean_square_of_each_linears_input(folders, arch):
    src = open_model(str(folders[arch]))
    runner = L.load(src)
    wins = windows_of(runner, 2)
    stats, tokens = runner.collect_stats(wins)
    assert tokens == 2 * SEQ and set(stats) == set(runner.targets)
    ref = reference_model(folders[arch])
    with torch.inference_mode():
        hs = ref(input_ids=wins, output_hidden_states=True).hidden_states
    for i in range(2):
        with torch.inference_mode():
            if arch == "llama":
                x = ref.model.layers[i].input_layernorm(hs[i])
                names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
            else:
                x = ref.transformer.h[i].ln_1(hs[i])
                names = [f"transformer.h.{i}.attn.c_attn.weight"]
        want = (x.double() ** 2).reshape(-1, 32).mean(0).numpy()
        for n in names:
            np.testing.assert_allclose(stats[n], want, rtol=1e-6, err_msg=n)
    head = next(t.name for t in runner.targets.values() if t.module == runner.head_module)
    np.testing.assert_allclose(stats[head], (hs[-1].double() ** 2).reshape(-1, 32).mean(0).numpy(), rtol=1e-6)


def test_an_eval_json_in_the_model_folder_leaves_the_calibration_key(folders, tmp_path, capsys):
    """`sop eval M --json M/eval.json`: the JSON counted among the files beside the weights, so the next
    run calibrated again (another cache key) and an export warned of it (`eval.json (new)`)."""
    d = tmp_path / "m"
    shutil.copytree(folders["llama"], d)
    src = open_model(str(d))
    before = src.aux_files(), src.aux_fingerprint()
    assert main(["eval", str(d), "--format", "nf4-g64", "--no-calib", "--no-e2e", "--quiet",
                 "--json", str(d / "eval.json")]) == 0, capsys.readouterr().err
    assert (src.aux_files(), src.aux_fingerprint()) == before
    (d / "chat.json").write_text("{}")                 # any other JSON beside the weights still counts
    assert "chat.json" in open_model(str(d)).aux_files()


def test_calibration_is_cached_by_model_text_and_window_shape(folders, tmp_path, tokenizer):
    d = make_folder(tmp_path / "m", "llama", tokenizer)
    size = C.CalibSize(seqs=2, seq_len=SEQ)
    first = C.calibrate(open_model(str(d)), size, tmp_path / "c")
    assert first.weighted and not first.cached and first.tokens == 2 * SEQ and first.seqs == 2
    assert 0 < first.sentences < 20 and len(first.act_ms) == 15           # 14 block linears and the head
    again = C.calibrate(open_model(str(d)), size, tmp_path / "c")
    assert again.cached and again.key == first.key
    for k, v in first.act_ms.items():
        np.testing.assert_array_equal(again.act_ms[k], v)
    assert C.calibrate(open_model(str(d)), C.CalibSize(seqs=2, seq_len=SEQ + 1), tmp_path / "c").key != first.key
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"model_max_length": 77}))
    assert C.calibrate(open_model(str(d)), size, tmp_path / "c").key != first.key   # tokenizer files count


def test_a_calibration_size_of_the_other_kind_of_model_is_one_warning_line(folders, tmp_path, capsys):
    """``--calib-sentences 64`` on a causal LM (``n_calib=64`` from Python) calibrated on the default 32 x 256
    tokens, and ``--calib-seqs`` / ``--seq-len`` on a sentence encoder on 256 sentences, without a word."""
    out, cache = tmp_path / "m.sopq", tmp_path / "c"
    assert main(["quantize", str(folders["llama"]), "--format", "nf4-g64", "--out", str(out), "--calib-sentences",
                 "64", "--calib-seqs", "2", "--seq-len", str(SEQ), "--cache-dir", str(cache), "--quiet"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --calib-sentences 64 counts a sentence encoder's (BERT) calibration sentences, unused here: a "
        f"causal LM calibrates on --calib-seqs x --seq-len tokens (2 x {SEQ})"]
    quantize_model(str(folders["llama"]), "nf4-g64", out, n_calib=64, cache_dir=cache, progress=False)
    assert "warning: n_calib=64 counts a sentence encoder's (BERT) calibration sentences, unused here: a causal " \
        "LM calibrates on n_calib=CalibSize(seqs=, seq_len=) tokens (32 x 256)" in capsys.readouterr().err
    quantize_model(str(folders["llama"]), "nf4-g64", out, n_calib=C.CalibSize(seqs=2, seq_len=SEQ), cache_dir=cache,
                   progress=False)
    assert "warning" not in capsys.readouterr().err                    # the causal LM's own size: nothing to say
    from sop.quantize.layer_loop import unused_size_warning          # a BERT model, without its calibration

    unused_size_warning(open_model("minilm"), C.CalibSize(seqs=4))
    assert capsys.readouterr().err == ("warning: n_calib=CalibSize(seqs=4, seq_len=256) sets a causal LM's "
                                       "calibration windows, unused here: a sentence encoder (BERT) calibrates on "
                                       "n_calib sentences (256)\n")
    unused_size_warning(open_model("minilm"), C.CalibSize(sentences=64))
    assert capsys.readouterr().err == ""


# -- end to end: perplexity, KL divergence, top-1 ----------------------------------------------------------

def independent_e2e(folder, wins, weights):
    """ppl, ppl_ref, KL(p||q), KL(q||p), top-1 with plain torch and numpy: full logits, no shortcut."""
    from transformers.models.auto import AutoModelForCausalLM

    ref = reference_model(folder)
    quant = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    sd = quant.state_dict()
    for name, w in weights.items():
        sd[name] = torch.from_numpy(np.asarray(w, np.float32))
    quant.load_state_dict(sd)
    T = wins.shape[1]
    with torch.inference_mode():
        lp_all = ref(input_ids=wins).logits[:, T // 2:T - 1].double().numpy()
        lq_all = quant(input_ids=wins).logits[:, T // 2:T - 1].double().numpy()

    def log_softmax(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    lp, lq = log_softmax(lp_all), log_softmax(lq_all)
    tgt = wins[:, T // 2 + 1:].numpy()
    nll_p = -np.take_along_axis(lp, tgt[..., None], -1).mean()
    nll_q = -np.take_along_axis(lq, tgt[..., None], -1).mean()
    kl_pq = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    kl_qp = (np.exp(lq) * (lq - lp)).sum(-1).mean()
    top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
    return math.exp(nll_q), math.exp(nll_p), kl_pq, kl_qp, top1, tgt.size


def test_ppl_kld_top1_match_an_independent_computation(folders):
    src = open_model(str(folders["llama"]))
    runner = L.load(src)
    wins = windows_of(runner)
    runner.reference(wins)
    rng = np.random.default_rng(5)
    noisy = {l.name: src.load(l.name) * (1 + 0.3 * rng.standard_normal(l.shape)) for l in src.layers}
    got = runner.score(noisy)
    ppl, ppl_ref, kl_pq, kl_qp, top1, n = independent_e2e(folders["llama"], wins, noisy)
    assert got["metric"] == "causal-lm" and got["tokens"] == n == 3 * (SEQ - 1 - SEQ // 2)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-6) and got["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-6)
    assert got["kld"] == pytest.approx(kl_pq, rel=1e-5)
    assert abs(kl_pq - kl_qp) > 1e-3 * kl_pq                 # the direction is told apart: KL(p || q)
    assert got["top1"] == top1 and 0 < top1 < 1 and got["kld"] > 0.01
    # the model's own weights are back after the check
    for l in src.layers:
        t = runner.targets[l.name]
        np.testing.assert_array_equal(runner.model.get_submodule(t.module).weight.detach().numpy(),
                                      runner.module_weight(l.name, src.load(l.name)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "neox"])
def test_the_reference_itself_has_kld_exactly_zero(folders, arch):
    src = open_model(str(folders[arch]))
    runner = L.load(src)
    runner.reference(windows_of(runner, 2))
    same = runner.score({l.name: src.load(l.name).astype(np.float32) for l in src.layers})
    assert same["kld"] == 0.0 and same["top1"] == 1.0 and same["ppl"] == same["ppl_ref"]
    assert runner.score(None) == same


def test_a_kld_of_logits_that_differ_by_ulps_is_never_negative():
    """Small logits (a near-uniform model) moved by float32 ulps: the float64 rounding of the two
    log-softmaxes gave a KLD of -5e-17 in `sop eval`'s table and JSON, which `sop report` then refused."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(64, VOCAB, generator=gen) * 1e-3
    moved = torch.where(torch.rand(ref.shape, generator=gen) < 0.3, torch.nextafter(ref, ref - 1), ref)
    sums = np.array([L.next_token_sums(ref[i:i + 4], moved[i:i + 4], torch.zeros(4))[0] for i in range(0, 64, 4)])
    assert (sums >= 0).all() and sums.max() > 0
    assert L.next_token_sums(ref, ref, torch.zeros(64))[0] == 0.0


# -- GGUF ----------------------------------------------------------------------------------------------------

def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf Q/K row permutation (the inverse of transformers' reverse_permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, folder, tokenizer, quantize_ffn=True, extra=None, name=None, big_endian=False,
                     kv_heads=None, embd_raw=None):
    """The tiny Llama of ``folder`` as a GGUF file, the way llama.cpp's converter lays it out (``general.name``
    ``name`` where given; ``kv_heads`` in the metadata in place of the model's; ``embd_raw``: the embedding's
    bytes and GGUF type in place of its values)."""
    gguf = pytest.importorskip("gguf")
    cfg = json.loads((folder / "config.json").read_text())
    sd = {k: v.numpy() for k, v in reference_model(folder).state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    if name is not None:
        w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(128)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(kv_heads or cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    add_gguf_tokenizer(w, tokenizer)
    T = gguf.GGMLQuantizationType
    if embd_raw is None:
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    else:
        w.add_tensor("token_embd.weight", embd_raw[0], raw_dtype=embd_raw[1])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names = {"attn_q": _permute(sd[p + "self_attn.q_proj.weight"], heads),
                 "attn_k": _permute(sd[p + "self_attn.k_proj.weight"], kv),
                 "attn_v": sd[p + "self_attn.v_proj.weight"], "attn_output": sd[p + "self_attn.o_proj.weight"],
                 "ffn_gate": sd[p + "mlp.gate_proj.weight"], "ffn_up": sd[p + "mlp.up_proj.weight"],
                 "ffn_down": sd[p + "mlp.down_proj.weight"]}
        for n, t in names.items():
            if quantize_ffn and n.startswith("ffn_") and t.shape[1] % 32 == 0:
                w.add_tensor(f"blk.{i}.{n}.weight", gguf.quants.quantize(t, T.Q8_0), raw_dtype=T.Q8_0)
            else:
                w.add_tensor(f"blk.{i}.{n}.weight", t)
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    return finish_gguf(w, path)


def add_gguf_tokenizer(w, tokenizer) -> None:
    """``tokenizer`` (``bpe_tokenizer``) as a GGUF's gpt2-style tokenizer metadata."""
    vocab = tokenizer.backend_tokenizer.get_vocab()
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    w.add_token_types([3, 3] + [1] * (VOCAB - 2))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def finish_gguf(w, result):
    """A GGUFWriter's header, metadata and tensors written and the file closed; ``result`` back."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return result


def assert_logits_of(runner, folder) -> None:
    """The runner's logits on two held-out windows are those of the model saved in ``folder``."""
    wins = windows_of(runner, 2)
    with torch.inference_mode():
        got = runner.model(input_ids=wins).logits
        want = reference_model(folder)(input_ids=wins).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_gguf_runs_with_the_folders_logits_and_one_warning_line(folders, tokenizer, tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", folders["llama"], tokenizer, quantize_ffn=False)
    src = open_model(str(path))
    assert src.forward == "causal-lm" and not src.notes                  # float tensors: nothing to warn
    runner = L.load(src)
    assert_logits_of(runner, folders["llama"])                      # Q/K un-permuted right
    for lay in src.layers:                                          # and the channel order of every layer
        t = runner.targets[lay.name]
        np.testing.assert_array_equal(runner.module_weight(lay.name, src.load(lay.name)),
                                      runner.model.get_submodule(t.module).weight.detach().numpy())
    q = open_model(str(write_llama_gguf(tmp_path / "q.gguf", folders["llama"], tokenizer)))
    assert len(q.notes) == 1 and "4 of the 14 selected layers are already quantized" in q.notes[0] \
        and "Q8_0 x4" in q.notes[0]


def test_a_ggufs_tokenizer_is_its_metadatas_whatever_lies_beside_it(folders, tokenizer, tmp_path):
    """transformers takes a tokenizer.json beside a GGUF over the file's own; the calibration key (no files
    beside a GGUF) did not see it, so an edited neighbour was a stale hit. The GGUF's metadata is the source."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = write_llama_gguf(tmp_path / "tiny.gguf", folders["llama"], tokenizer, quantize_ffn=False)
    text = C.calibration_sentences(3)
    alone = L.load(open_model(str(path))).token_ids(text)
    assert alone == tokenizer(" ".join(text), add_special_tokens=False)["input_ids"]     # the GGUF's BPE
    other = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    runner = L.load(open_model(str(path)))
    assert runner.token_ids(text) == alone
    assert runner.model.config.num_hidden_layers == reference_model(folders["llama"]).config.num_hidden_layers


def test_a_ggufs_model_is_built_once_without_random_init_and_its_metadata_read_once(folders, tokenizer, tmp_path,
                                                                                    monkeypatch):
    """Every tensor of a GGUF's model is the file's: transformers' random initialisation (a minute of a 7B's
    load) is skipped, so the global RNG is left as it was; the head stays tied, and the buffers outside the
    state dict (RoPE's) are what transformers' own build gives. transformers parsed the file's metadata for its
    config and again for its tokenizer (4 s apiece for SmolLM2): it reads the parse of the project's reader."""
    import gguf
    from transformers.models.auto import AutoModelForCausalLM

    path = write_llama_gguf(tmp_path / "tiny.gguf", folders["llama"], tokenizer, quantize_ffn=False)
    src = open_model(str(path))
    reads, init = [], gguf.GGUFReader.__init__

    def counted(self, *a, **kw):
        reads.append(a)
        init(self, *a, **kw)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    runner = L.load(src)
    assert torch.equal(torch.get_rng_state(), before)
    assert reads == []
    model = runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    built = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    assert dict(built.named_buffers()).keys() == dict(model.named_buffers()).keys() != set()
    for name, b in built.named_buffers():
        np.testing.assert_array_equal(model.get_buffer(name).numpy(), b.numpy(), err_msg=name)
    assert_logits_of(runner, folders["llama"])


def test_a_big_endian_gguf_has_no_forward_pass_saying_why(folders, tokenizer, tmp_path, capsys):
    """transformers reads little-endian GGUFs only: a big-endian one (gguf_convert_endian.py) had a forward
    pass, which stopped on 'transformers cannot build a causal LM from its metadata (ValueError: ... is GGUF
    v50331648; this reader handles v2 and v3.)'. It is quantized unweighted now, saying why."""
    path = write_llama_gguf(tmp_path / "be.gguf", folders["llama"], tokenizer, quantize_ffn=False, big_endian=True)
    src = open_model(str(path))
    assert src.forward is None and src.forward_note == ("a big-endian GGUF: transformers' GGUF reader reads "
                                                        "little-endian files only")
    little = open_model(str(write_llama_gguf(tmp_path / "le.gguf", folders["llama"], tokenizer, quantize_ffn=False)))
    np.testing.assert_array_equal(src.load(src.layers[0].name), little.load(little.layers[0].name))
    assert main(["quantize", str(path), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"),
                 *SMALL[:4], "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr()
    assert "a big-endian GGUF: transformers' GGUF reader reads little-endian files only" in out.out + out.err


def test_a_gguf_whose_tensors_its_metadata_cannot_lay_out_is_one_line(folders, tokenizer, tmp_path):
    """llama.attention.head_count_kv 3 for K rows of 2 heads: transformers' processor un-permutes K by the
    metadata's head count, and numpy's 'cannot reshape array of size 512 into shape (3,2,2,32)' came out
    naming no file or tensor."""
    path = write_llama_gguf(tmp_path / "kv.gguf", folders["llama"], tokenizer, quantize_ffn=False, kv_heads=3)
    with pytest.raises(CheckpointError, match=r"kv.gguf: does not match its metadata: tensor blk.0.attn_k.weight "
                                              r"\(16, 32\) cannot be laid out as the metadata describes the model "
                                              r"\(ValueError: cannot reshape"):
        L.load(open_model(str(path)))


def test_a_gguf_tensor_only_the_forward_pass_reads_names_the_remedy_that_works(folders, tokenizer, tmp_path):
    """An embedding of a GGUF type gguf cannot dequantize (Q8_K) is no layer: `--exclude` it, as the message
    said, did nothing; without the forward pass (--no-calib) the file quantizes (an outside review)."""
    gguf = pytest.importorskip("gguf")
    raw = (np.zeros((VOCAB, 292), np.uint8), gguf.GGMLQuantizationType.Q8_K)     # a row: one 256-value block
    path = write_llama_gguf(tmp_path / "q8k.gguf", folders["llama"], tokenizer, embd_raw=raw)
    src = open_model(str(path))
    assert "token_embd.weight" not in {lay.name for lay in src.layers}
    with pytest.raises(CheckpointError, match=r"q8k.gguf: tensor token_embd.weight has GGUF type Q8_K, which the "
                                              r"gguf package cannot dequantize, and the forward pass needs it; "
                                              r"calibrate=False quantizes it"):      # Python's, not --no-calib
        L.load(src)


def test_a_llama_gguf_transformers_builds_as_a_mistral_runs(folders, tokenizer, tmp_path):
    """transformers builds a Llama GGUF named 'mistral' as a MistralForCausalLM, a model type gguf's name tables
    do not know: 'transformers cannot build a causal LM from its metadata (NotImplementedError: Unknown gguf
    model_type: mistral ...)'. The file's own architecture names its tensors now."""
    path = write_llama_gguf(tmp_path / "m.gguf", folders["llama"], tokenizer, quantize_ffn=False, name="mistral")
    runner = L.load(open_model(str(path)))
    assert type(runner.model).__name__ == "MistralForCausalLM"
    assert_logits_of(runner, folders["llama"])


def test_gguf_eval_prints_the_warning_once(folders, tokenizer, tmp_path, capsys):
    path = write_llama_gguf(tmp_path / "q.gguf", folders["llama"], tokenizer)
    assert main(["eval", str(path), "--format", "fp8-e4m3-pot", "--quiet", "--no-calib", *SMALL[2:],
                 "--cache-dir", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "Q8_0 x4" in err


def test_a_gguf_tensor_the_transformers_model_has_no_place_for_is_a_warning(folders, tokenizer, tmp_path, capsys):
    """A Llama GGUF with attention biases: llama.cpp runs them, the model transformers builds from the
    metadata has none, so the reference silently differed from the file's model. Now said once, in
    the warning lines and the JSON; llama.cpp's RoPE table is no parameter and is not mentioned."""
    cols = json.loads((folders["llama"] / "config.json").read_text())["hidden_size"]
    extra = {"blk.0.attn_q.bias": np.ones(cols, np.float32), "rope_freqs.weight": np.ones(4, np.float32)}
    path = write_llama_gguf(tmp_path / "b.gguf", folders["llama"], tokenizer, quantize_ffn=False, extra=extra)
    out = tmp_path / "e.json"
    assert main(["eval", str(path), "--format", "fp8-e4m3-pot", "--quiet", *SMALL, "--json", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    said = ("1 tensor of the GGUF (blk.0.attn_q.bias) has no place in the model transformers builds from its "
            "metadata: calibration and the end-to-end check run that model without it")
    assert err.count("warning:") == 1 and f"warning: {said}\n" in err and "rope_freqs" not in err, err
    assert json.loads(out.read_text())["source"]["notes"] == [said]
    plain = write_llama_gguf(tmp_path / "p.gguf", folders["llama"], tokenizer, quantize_ffn=False,
                             extra={"rope_freqs.weight": np.ones(4, np.float32)})
    assert main(["eval", str(plain), "--format", "fp8-e4m3-pot", "--quiet", *SMALL, "--json", str(out),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert "warning" not in capsys.readouterr().err and "notes" not in json.loads(out.read_text())["source"]


# -- the command line ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_doc(folders, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "e.json"
    assert main(["eval", str(folders["gpt2"]), "--format", "nf4-g64", "--format", "fp8-e4m3-pot", "--json",
                 str(out), "--quiet", "--cache-dir", str(tmp / "c"), *SMALL]) == 0
    return out


def test_eval_json_has_the_causal_lm_e2e_entry(eval_doc):
    doc = json.loads(eval_doc.read_text())
    assert doc["calibration"]["weighted"] and doc["calibration"]["seqs"] == 3
    assert doc["calibration"]["seq_len"] == SEQ and doc["calibration"]["tokens"] == 3 * SEQ
    assert doc["source"]["forward"] == "causal-lm" and "lm_head" in doc["source"]["lm_head"]
    for name in ("nf4-g64", "fp8-e4m3-pot"):
        e = doc["formats"][name]["e2e"]
        assert {"metric", "tokens", "ppl", "ppl_ref", "kld", "top1"} <= set(e) and e["metric"] == "causal-lm"
        assert isinstance(e["tokens"], int) and e["tokens"] == 3 * (SEQ - 1 - SEQ // 2)
        assert all(isinstance(e[k], float) for k in ("ppl", "ppl_ref", "kld", "top1"))
        assert e["kld"] > 0 and 0 < e["top1"] <= 1 and e["ppl_ref"] > 1
        assert all(l["weighted"] for l in doc["formats"][name]["layers"].values())
    nf4, fp8 = (doc["formats"][n]["e2e"] for n in ("nf4-g64", "fp8-e4m3-pot"))
    assert nf4["ppl_ref"] == fp8["ppl_ref"] and nf4["kld"] > fp8["kld"]   # 4.5 bits lose more than 8


def test_report_adds_the_kld_columns_and_panel(eval_doc, capsys):
    assert main(["report", str(eval_doc)]) == 0
    out = capsys.readouterr().out
    assert "| KLD |" in out and "| top-1 |" in out and "KLD front" in out
    md = eval_doc.with_suffix(".md").read_text()
    assert "KLD front (fewer bits, lower mean KL divergence" in md
    png = eval_doc.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (n,) = struct.unpack(">I", png[8:12])
    assert png[12:16] == b"IHDR" and zlib.crc32(png[12:16 + n]) == struct.unpack(">I", png[16 + n:20 + n])[0]
    width, height = struct.unpack(">II", png[16:24])
    assert width > 2 * height                                             # two panels side by side


def test_eval_table_shows_ppl_kld_top1(folders, tmp_path, capsys):
    assert main(["eval", str(folders["qwen2"]), "--format", "mxfp4", "--quiet", "--no-calib",
                 "--cache-dir", str(tmp_path), *SMALL[2:]]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "KLD" in out and "top-1" in out and "reference ppl" in out
    assert "lm_head (lm_head.weight) kept" in out and "unweighted" in out


@pytest.mark.parametrize("ppl", [1.5, 9999.9996, 12345.678, 99999.9994, 100000.0, 25302975577445.875, 1.234e100])
def test_a_perplexity_of_any_size_keeps_its_column_apart(eval_doc, ppl):
    """The table's max err and ppl cells stay apart (a ppl of 100000 or more filled its column and ran
    into max err's: '0.110125302975577445.875', an outside probe); each cell reads back as its value."""
    from sop.quantize.evaluate import format_table

    doc = json.loads(eval_doc.read_text())
    scored = {n: f for n, f in doc["formats"].items() if "kld" in f["e2e"]}
    for f in scored.values():
        f["e2e"]["ppl"] = ppl
    rows = {line.split()[0]: line.split() for line in format_table(doc).splitlines() if line.split()[:1] and
            line.split()[0] in scored}
    assert rows.keys() == scored.keys()
    for name, cells in rows.items():
        assert float(cells[-4]) == pytest.approx(scored[name]["max_abs_err"], rel=1e-3)
        assert float(cells[-3]) == pytest.approx(ppl, rel=1e-3 if ppl < 1e8 else 5e-2)
    from sop.quantize.evaluate import _ppl_cell
    assert len(_ppl_cell(ppl)) == 9                                  # its column's width, at 1e5 too


def test_eval_table_without_e2e_keeps_the_causal_lm_columns(folders, tmp_path, capsys):
    assert main(["eval", str(folders["qwen2"]), "--format", "mxfp4", "--quiet", "--no-calib", "--no-e2e",
                 "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("format"))
    assert head.split()[-3:] == ["ppl", "KLD", "top-1"] and "cos" not in out
    assert out.splitlines()[-1] == "e2e: skipped (disabled)"


@pytest.mark.parametrize("head", [False, True], ids=["blocks", "with-tied-head"])
def test_quantize_then_a_model_folder_transformers_loads(folders, tmp_path, capsys, head):
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(folders["llama"]), "--format", "sop4-g16", "--out", str(art), "--quiet",
                 "--cache-dir", str(tmp_path / "c"), "--calib-seqs", "2", "--seq-len", str(SEQ),
                 *(["--include-lm-head"] if head else [])]) == 0
    out = tmp_path / "folder"
    assert main(["dequantize", str(art), "--model-folder", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr()
    assert "a transformers model folder" in said.out and not said.err

    a = open_artifact(art)
    loaded = reference_model(out)
    ref = reference_model(folders["llama"]).state_dict()
    sd = loaded.state_dict()
    quantized = {e.name for e in a.layers}
    assert len(quantized) == 14 + head and ("model.embed_tokens.weight" in quantized) == head
    for e in a.layers:
        np.testing.assert_array_equal(sd[e.name].numpy(), a.weights(e))
    if head:                                                   # the tied head is the quantized matrix too
        np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), sd["model.embed_tokens.weight"].numpy())
        quantized.add("lm_head.weight")
    for k, v in ref.items():                                   # everything else is the reference's
        if k not in quantized:
            np.testing.assert_array_equal(sd[k].numpy(), v.numpy(), err_msg=k)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".folder.*"))
    if not head:                   # the artifact against another checkpoint: one line, no folder made
        err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(tmp_path / "other"),
                                 "--model", str(folders["sharded"])])
        assert "was made from another checkpoint" in err and not (tmp_path / "other").exists()
        err = one_error(capsys, ["dequantize", str(art), "--out", str(tmp_path / "w.safetensors"),
                                 "--model", str(folders["llama"])])
        assert "--model applies with --model-folder only" in err


def test_a_model_folder_export_prints_a_progress_line_a_layer_unless_quiet(folders, tmp_path, capsys):
    """`sop dequantize --model-folder` printed no progress line, so its --quiet changed nothing (an outside walk
    through the options): it prints the lines of `sop dequantize` (README: one a layer, unless --quiet)."""
    art = tmp_path / "two.sopq"
    assert main(["quantize", str(folders["llama"]), "--format", "sop4-g16", "--out", str(art), "--quiet",
                 "--no-calib", "--include", "model.layers.0.mlp.*_proj.weight"]) == 0
    capsys.readouterr()

    def lines(args):
        assert main(["dequantize", str(art), *args]) == 0
        return [line.rsplit(": ", 1)[0] for line in capsys.readouterr().err.splitlines()]    # less the seconds
    plain = lines(["--out", str(tmp_path / "w.safetensors")])
    assert plain == [f"dequantize [{i}/3] model.layers.0.mlp.{name}_proj.weight {shape}"
                     for i, (name, shape) in enumerate([("down", "32x48"), ("gate", "48x32"), ("up", "48x32")], 1)]
    assert lines(["--model-folder", "--out", str(tmp_path / "f")]) == plain
    assert lines(["--model-folder", "--out", str(tmp_path / "g"), "--quiet"]) == []


def test_a_model_folder_of_a_partial_artifact_says_the_rest_is_the_reference(folders, tmp_path, capsys):
    """An artifact of one layer (sop quantize --include) exports a working model whose other 13 linear
    weights are the reference's: the closing line said "1 quantized layers ... over the reference" and
    nothing of the 13, so a partial artifact's folder read as the quantized model."""
    art = tmp_path / "one.sopq"
    name = "model.layers.0.mlp.down_proj.weight"
    assert main(["quantize", str(folders["llama"]), "--format", "sop4-g16", "--out", str(art), "--quiet",
                 "--no-calib", "--include", name]) == 0
    capsys.readouterr()
    out = tmp_path / "folder"
    assert main(["dequantize", str(art), "--model-folder", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr()
    assert " 1 quantized layer (sop4-g16) over the reference " in said.out and not said.err, said.out
    assert "its other 13 linear weights, not in the artifact, are the reference's" in said.out, said.out
    sd, ref = reference_model(out).state_dict(), reference_model(folders["llama"]).state_dict()
    a = open_artifact(art)
    np.testing.assert_array_equal(sd[name].numpy(), a.weights(a.layers[0]))
    assert not np.array_equal(sd[name].numpy(), ref[name].numpy())
    for k, v in ref.items():                                   # a working model: the rest the reference's
        if k != name:
            np.testing.assert_array_equal(sd[k].numpy(), v.numpy(), err_msg=k)


def test_an_export_against_a_model_of_other_layer_names_says_it_is_another_checkpoint(folders, tokenizer,
                                                                                      tmp_path, capsys):
    """--model a checkpoint that holds none of the artifact's layer names (a folder's artifact against a GGUF,
    a GGUF's against a folder): the error was the selection's `no linear layer selected (14 candidates, check
    --include/--exclude)`, options never given (an outside probe); it is the fingerprint's line, no folder made."""
    gguf = write_llama_gguf(tmp_path / "tiny.gguf", folders["llama"], tokenizer, quantize_ffn=False)
    for src, other in ((folders["llama"], gguf), (gguf, folders["llama"])):
        art = tmp_path / f"{Path(src).stem}.sopq"
        assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib"]) == 0
        out = tmp_path / f"out-{Path(src).stem}"
        err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(out), "--model", str(other)])
        assert err == f"sop: error: {art} was made from another checkpoint than {other} (the model fingerprints " \
                      f"differ); give the source with --model"
        assert not out.exists()


def test_a_model_folder_export_warns_when_the_config_changed_since_quantizing(folders, tmp_path, capsys):
    """config.json edited after sop quantize (another rms_norm_eps): the export ran that other model
    without a word; it is one warning line (printed under --quiet too), the folder written with it."""
    d = _copy(folders["llama"], tmp_path / "m")
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(d), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib"]) == 0
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 0.125}))
    capsys.readouterr()
    assert main(["dequantize", str(art), "--model-folder", "--out", str(tmp_path / "f"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err == (f"warning: {d}: files beside the weights (.json, .model, .txt, .tiktoken) differ from those sop "
                   f"quantize read for {art}: config.json (changed); the folder is exported with the current ones\n")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["rms_norm_eps"] == 0.125


def test_a_generation_config_transformers_cannot_read_is_one_line_naming_it_before_any_output(folders,
                                                                                            tmp_path, capsys):
    """A generation_config.json that is no JSON was left out by transformers' loader without a word, and the
    export wrote a default one in its place: the source's generation settings lost (an outside probe). As an
    unreadable config.json or tokenizer, it is refused in one line naming it, by the export and by every
    forward pass, before any output; the source is left as it was."""
    d = _copy(folders["llama"], tmp_path / "m")
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(d), "--format", "nf4-g64", "--out", str(art), "--quiet", "--no-calib",
                 "--include", "model.layers.0.mlp.*"]) == 0
    gen = d / "generation_config.json"
    for bad, what in ((b'{"eos_token_id": [1, 2],', "not valid JSON"), (b"[1, 2]", "not a JSON object"),
                      (b'{"eos_token_id": "\xe9"}', "not UTF-8 text"),
                      (b'{"max_new_tokens": "seven"}', "transformers cannot read it")):
        gen.write_bytes(bad)
        source = {f.name: f.read_bytes() for f in d.iterdir()}
        err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(tmp_path / "f")])
        assert err.startswith(f"sop: error: {gen}: {what}") and err.endswith("; fix it, or remove it for "
                                                                             "transformers' default"), err
        assert not (tmp_path / "f").exists() and {f.name: f.read_bytes() for f in d.iterdir()} == source
    err = one_error(capsys, ["quantize", str(d), "--format", "nf4-g64", "--out", str(tmp_path / "q.sopq"),
                             "--quiet", "--cache-dir", str(tmp_path / "c"), *SMALL[:4]])
    assert err.startswith(f"sop: error: {gen}: transformers cannot read it") and not (tmp_path / "q.sopq").exists()


def test_a_model_folder_export_never_writes_over_its_source_or_half_a_folder(folders, tmp_path, capsys):
    art = tmp_path / "m.sopq"
    src = _copy(folders["llama"], tmp_path / "src")
    assert main(["quantize", str(src), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib",
                 "--include", "model.layers.0.mlp.*"]) == 0
    source = {f.name: f.read_bytes() for f in src.iterdir()}
    for out in (src, tmp_path / "new" / ".." / "src"):
        err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(out)])
        assert "source model's folder" in err and err.endswith("(choose another --out)"), err
        with pytest.raises(OutputError, match=r"source model's folder .*\(choose another out\)$"):
            export_model_folder(art, out, progress=False)       # Python's name (it said --out, as the command)
    linked = tmp_path / "linked"                                # a file of the export there is the source's
    linked.mkdir()
    (linked / "config.json").symlink_to(src / "config.json")
    with pytest.raises(OutputError, match=r"config\.json: the output is the input .*\(choose another out\)$"):
        export_model_folder(art, linked, progress=False)
    assert {f.name: f.read_bytes() for f in src.iterdir()} == source and not (tmp_path / "new").exists()
    # a folder whose config.json is the user's and whose tokenizer.json is a FIFO: refused before any
    # file is written, so config.json stays the user's (not a new config beside an old tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("mine")
    os.mkfifo(out / "tokenizer.json")
    err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(out), "--quiet"])
    assert "tokenizer.json" in err and "FIFO" in err
    assert (out / "config.json").read_text() == "mine" and sorted(f.name for f in out.iterdir()) == \
        ["config.json", "tokenizer.json"]


def test_a_model_folder_export_refuses_a_folder_holding_another_models_files(folders, tmp_path, capsys):
    """transformers reads the whole folder: a file an earlier export left (an old chat template, a
    single model.safetensors beside new shards) would be loaded with the new model. Such a folder is
    refused and left as it was; the same export again (the same files) replaces them."""
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(folders["llama"]), "--format", "sop4-g16", "--out", str(art), "--quiet",
                 "--no-calib", "--include", "model.layers.0.mlp.*"]) == 0
    out = tmp_path / "exp"
    export = ["dequantize", str(art), "--model-folder", "--out", str(out), "--quiet"]
    assert main(export) == 0
    written = sorted(f.name for f in out.iterdir())
    assert main(export) == 0 and sorted(f.name for f in out.iterdir()) == written
    assert "chat_template.jinja" not in written
    (out / "chat_template.jinja").write_text("{{ stale }}")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs")      # hidden: not read as the model
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    err = one_error(capsys, export)
    assert f"{out}: holds chat_template.jinja, which this export does not write" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not list(tmp_path.glob(".exp.*"))


def test_an_export_from_elsewhere_names_the_artifacts_relative_source_and_asks_for_model(folders, tmp_path,
                                                                                          capsys, monkeypatch):
    """The artifact records the model path as `sop quantize` was given it: from another folder a relative
    one is not found, and the line says which path it tried and that --model gives it."""
    art = tmp_path / "m.sopq"
    monkeypatch.chdir(folders["llama"].parent)
    assert main(["quantize", folders["llama"].name, "--format", "sop4-g16", "--out", str(art), "--quiet",
                 "--no-calib", "--include", "model.layers.0.mlp.*"]) == 0
    monkeypatch.chdir(tmp_path)
    err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", "exp", "--quiet"])
    assert f"its source model '{folders['llama'].name}' (the path sop quantize was given) is not found from " \
           f"here; give it with --model" in err
    assert main(["dequantize", str(art), "--model-folder", "--out", "exp", "--quiet",
                 "--model", str(folders["llama"])]) == 0 and (tmp_path / "exp" / "config.json").is_file()


def test_perplexity_past_float64_is_inf_not_an_overflow():
    """A broken model's mean NLL can pass 709 nats: exp() of it is no float64 (an OverflowError once)."""
    assert L.perplexity(2 * 100.0, 2) == math.exp(100.0)
    assert L.perplexity(L.MAX_LOG_PPL * 3, 3) < math.inf
    assert L.perplexity(1000.0 * 7, 7) == math.inf


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------------

def one_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err, err
    return err


def _copy(folder, dest):
    import shutil

    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("case", ["no tokenizer", "tokenizer folder", "bad tokenizer", "mismatch", "missing", "unused",
                                  "bad config"])
def test_bad_folders_are_one_line_before_any_work(folders, tmp_path, capsys, case):
    """"tokenizer folder": a tokenizer.json that is a folder was said to be no tokenizer at all."""
    d = _copy(folders["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    expect = {"no tokenizer": "has no tokenizer", "bad tokenizer": "cannot load its tokenizer",
              "tokenizer folder": f"{d / 'tokenizer.json'}: is a folder, not a file",
              "mismatch": "config.json: does not match the weights: model.layers.0.mlp.down_proj.weight is",
              "missing": "config.json: does not match the weights: the model config.json describes needs model.layers.2",
              "unused": "config.json: does not match the weights: the checkpoint holds model.layers.1",
              "bad config": "transformers cannot load it as a causal LM"}[case]
    if case == "no tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).unlink()
    elif case == "bad tokenizer":
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    elif case == "tokenizer folder":
        (d / "tokenizer.json").unlink()
        (d / "tokenizer.json").mkdir()
    elif case == "mismatch":
        (d / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 40}))
    elif case == "missing":
        (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))
    elif case == "unused":
        (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 1}))
    else:
        (d / "config.json").write_text(json.dumps(cfg | {"hidden_act": "no-such-activation"}))
    out = tmp_path / "r.json"
    err = one_error(capsys, ["eval", str(d), "--format", "nf4-g64", "--json", str(out), "--quiet",
                             "--cache-dir", str(tmp_path / "c"), *SMALL])
    assert expect in err and (case in ("no tokenizer", "tokenizer folder", "bad tokenizer", "bad config") or
                              "config.json" in err)
    assert not out.exists() and not (tmp_path / "c").exists()
    art = tmp_path / "m.sopq"                                  # quantize refuses it the same way
    one_error(capsys, ["quantize", str(d), "--format", "nf4-g64", "--out", str(art), "--quiet",
                       "--cache-dir", str(tmp_path / "c"), *SMALL[:4]])
    assert not art.exists()


def test_quantize_says_when_no_forward_pass_can_calibrate(folders, tmp_path, capsys):
    """A folder whose config.json names no model transformers runs (a typo), or its weights file alone:
    `sop quantize` says that its errors are unweighted, as `sop eval` says it (an outside probe: it wrote an
    unweighted artifact without a word); with --no-calib, asked for, nothing."""
    d = _copy(folders["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "lama"}))
    for model, why in ((d, "config.json model_type 'lama'"), (folders["llama"] / "model.safetensors",
                                                               "a single weights file")):
        assert main(["quantize", str(model), "--format", "nf4-g64", "--out", str(tmp_path / "q.sopq"),
                     "--cache-dir", str(tmp_path / "c"), *SMALL[:4]]) == 0
        err = capsys.readouterr().err
        assert f"\ncalibration: no forward pass for this model ({why}" in err, err
        assert "errors are unweighted (a = 1)" in err
        assert open_artifact(tmp_path / "q.sopq").meta["calibration"]["weighted"] is False
    assert main(["quantize", str(d), "--format", "nf4-g64", "--out", str(tmp_path / "q.sopq"), "--no-calib"]) == 0
    assert "calibration" not in capsys.readouterr().err


def test_a_sequence_classifier_folder_is_no_causal_lm_and_its_head_no_tied_one(tokenizer, tmp_path, capsys):
    """A Llama classifier (config.json model_type llama, architectures LlamaForSequenceClassification, head
    score.weight): `sop quantize` printed `lm_head is tied to model.embed_tokens.weight` (it has no lm_head),
    then failed in the forward pass on score.weight, `the model config.json describes has no place for` it (an
    outside probe). It is a model with no causal-LM forward pass, as a T5 folder: one reason, no tie, the
    classifier's layers quantized unweighted, and an export refused in one line naming the class."""
    from transformers.models.llama import LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = configs()["llama"]
    cfg.pad_token_id = 1
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    src = open_model(str(tmp_path / "cls"))
    why = "config.json names LlamaForSequenceClassification, a model with no causal-LM head"
    assert (src.forward, src.forward_note, src.tied_to, src.lm_head) == (None, why, None, "")
    assert "score.weight" in {lay.name for lay in src.layers}
    art = tmp_path / "q.sopq"
    assert main(["quantize", str(tmp_path / "cls"), "--format", "nf4-g64", "--out", str(art), "--include",
                 "score.*", "--cache-dir", str(tmp_path / "c"), *SMALL[:4]]) == 0
    err = capsys.readouterr().err
    assert "tied" not in err and f"\ncalibration: no forward pass for this model ({why}); errors are unweighted" in err
    assert open_artifact(art).meta["calibration"]["weighted"] is False
    err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(tmp_path / "f")])
    assert err == f"sop: error: {tmp_path / 'cls'}: --model-folder needs a causal LM that transformers runs ({why})"
    assert not (tmp_path / "f").exists()


def test_include_lm_head_on_a_tied_models_weights_file_alone_says_what_it_needs(folders, tmp_path, capsys):
    """The weights file of a tied model (no head tensor, an input embedding) without its folder: whether
    the head is tied only a model that runs tells (the message said the file had no input embedding)."""
    err = one_error(capsys, ["quantize", str(folders["llama"] / "model.safetensors"), "--format", "nf4-g64",
                             "--include-lm-head", "--out", str(tmp_path / "q.sopq"), "--quiet"])
    assert ("stores no output head; whether its head is tied to the input embedding model.embed_tokens.weight "
            "only a causal LM that runs can tell, and this checkpoint runs none: a single weights file") in err
    assert not (tmp_path / "q.sopq").exists()
    assert main(["quantize", str(folders["llama"]), "--format", "nf4-g64", "--include-lm-head", "--no-calib",
                 "--out", str(tmp_path / "q.sopq"), "--quiet"]) == 0           # its folder: the tie is known


@pytest.mark.parametrize("flag,n,what", [("--calib-seqs", "1000", "calibration text"),
                                        ("--e2e-windows", "100", "held-out text")])
def test_text_shorter_than_asked_is_refused(folders, tmp_path, capsys, flag, n, what):
    out = tmp_path / "r.json"
    sizes = {"--calib-seqs": "2", "--e2e-windows": "2"} | {flag: n}        # each option once (sop refuses a repeat)
    args = ["eval", str(folders["llama"]), "--format", "nf4-g64", "--json", str(out), "--quiet",
            "--cache-dir", str(tmp_path / "c"), "--seq-len", "512", *(a for kv in sizes.items() for a in kv)]
    err = one_error(capsys, args)
    assert what in err and "tokens asked, the text gives" in err and "ask for fewer" in err
    assert not out.exists() and not list(tmp_path.glob("c/*.npz"))


@pytest.mark.parametrize("cmd", ["eval", "quantize"])
def test_windows_past_a_learned_position_table_are_refused(folders, tmp_path, capsys, cmd):
    """GPT-2 here has 128 positions: the default --seq-len 256 was an IndexError inside torch, exit 70."""
    out = tmp_path / ("r.json" if cmd == "eval" else "r.sopq")
    err = one_error(capsys, [cmd, str(folders["gpt2"]), "--format", "nf4-g64", "--quiet", "--cache-dir",
                             str(tmp_path / "c"), "--calib-seqs", "2",
                             "--json" if cmd == "eval" else "--out", str(out)])
    text = "held-out text (--e2e-windows x --seq-len)" if cmd == "eval" else \
        "calibration text (--calib-seqs x --seq-len)"
    assert f"{text}: windows of 256 tokens, and the model has 128 positions (max_position_embeddings): " \
           "give --seq-len 128 or less" in err
    # from Python, the names it took them by (they were the options above): CalibSize's, evaluate's
    said = r": windows of 256 tokens, and the model has 128 positions \(max_position_embeddings\): give " \
           r"seq_len=128 or less$"
    size = C.CalibSize(seqs=2)
    with pytest.raises(ValueError, match=r"^held-out text \(e2e_windows x seq_len\)" + said):
        evaluate(str(folders["gpt2"]), ["nf4-g64"], n_calib=size, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"^calibration text \(seqs x seq_len\)" + said):
        quantize_model(str(folders["gpt2"]), "nf4-g64", tmp_path / "q.sopq", n_calib=size, cache_dir=tmp_path / "c",
                       progress=False)
    assert not out.exists() and not (tmp_path / "q.sopq").exists()


def test_windows_past_gptjs_rotary_table_are_refused_naming_seq_len(tokenizer, tmp_path, capsys):
    """GPT-J and CodeGen make their rotary table once, for max_position_embeddings rows: past it the run warned
    that a rotary model computes any position, then stopped on `transformers cannot run the model's forward
    pass (IndexError ...); --no-calib ...`, a remedy that was not the one (an outside probe)."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.gptj import GPTJConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                n_positions=16)).save_pretrained(tmp_path / "gptj")
    tokenizer.save_pretrained(tmp_path / "gptj")
    err = one_error(capsys, ["quantize", str(tmp_path / "gptj"), "--format", "nf4-g64", "--quiet", "--cache-dir",
                             str(tmp_path / "c"), "--calib-seqs", "2", "--seq-len", "32", "--out", str(tmp_path / "q.sopq")])
    assert "windows of 32 tokens, and the model has 16 positions (max_position_embeddings): " \
           "give --seq-len 16 or less" in err and "warning" not in err


def _with_weight(folders, dest, name, value, at=(3, 5)):
    """A copy of the tiny Llama with one entry of tensor ``name`` set to ``value``."""
    from safetensors.numpy import load_file, save_file

    d = _copy(folders["llama"], dest)
    sd = load_file(str(d / "model.safetensors"))
    sd[name][at] = value
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


UP = "model.layers.0.mlp.up_proj.weight"


def test_a_nan_in_a_layer_is_named_before_calibration_spreads_it(folders, tmp_path, capsys):
    """The forward pass ran the raw weights: the NaN reached the next layer's statistics, and the
    error named that layer (down_proj) in internal words, with or without --nan-policy zero."""
    d = _with_weight(folders, tmp_path / "nan", UP, np.nan)
    err = one_error(capsys, ["quantize", str(d), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"),
                             "--quiet", "--cache-dir", str(tmp_path / "c"), *SMALL[:4]])
    assert err == f"sop: error: {d / 'model.safetensors'}: {UP}: non-finite weight nan at row 3, column 5 " \
                  f"(1 in the layer); --nan-policy zero replaces them with 0"
    assert not (tmp_path / "q.sopq").exists() and not list(tmp_path.glob("c/*.npz"))


def test_nan_policy_zero_runs_the_cleaned_model_end_to_end(folders, tmp_path):
    """--nan-policy zero measures against the cleaned weight, the end-to-end reference too: the same
    reference perplexity and statistics as the model with that weight set to 0 by hand (the reference
    once kept the NaN: KLD nan, top-1 0, reference perplexity inf, exit 0)."""
    docs = {}
    for what, value in (("nan", np.nan), ("zero", 0.0)):
        d = _with_weight(folders, tmp_path / what, UP, value)
        out = tmp_path / f"{what}.json"
        assert main(["eval", str(d), "--format", "sop4-g16", "--quiet", "--cache-dir", str(tmp_path / f"c-{what}"),
                     "--nan-policy", "zero", "--json", str(out), *SMALL]) == 0
        docs[what] = json.loads(out.read_text())
    # statistics of a cleaned model are not cached: another selection would run another model
    assert not list((tmp_path / "c-nan").glob("*.npz")) and list((tmp_path / "c-zero").glob("*.npz"))
    nan, zero = (docs[k]["formats"]["sop4-g16"] for k in ("nan", "zero"))
    assert nan["layers"][UP]["nonfinite_replaced"] == 1 and "nonfinite_replaced" not in zero["layers"][UP]
    assert nan["e2e"] == zero["e2e"] and math.isfinite(nan["e2e"]["kld"]) and nan["e2e"]["top1"] > 0.5
    assert {k: v for k, v in nan["layers"].items() if k != UP} == {k: v for k, v in zero["layers"].items() if k != UP}


def test_a_nan_that_reaches_only_unquantized_layers_costs_nothing(folders, tmp_path, capsys):
    """A NaN in the final norm reaches only the head's input, and the head is kept: the run quantizes as
    before (it was refused over a statistic no selected layer uses), and that statistic is not cached."""
    d = _with_weight(folders, tmp_path / "m", "model.norm.weight", np.nan, at=3)
    assert main(["quantize", str(d), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"),
                 "--cache-dir", str(tmp_path / "c"), *SMALL[:4]]) == 0
    assert "calibration not cached: statistics of unquantized layers are not finite" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*.npz"))


def test_a_calibration_not_cached_names_the_nan_policy_as_its_caller_gave_it(folders, tmp_path, capsys):
    """`quantize_model(..., nan_policy="zero")` said its calibration was not cached for weights `replaced under
    --nan-policy zero`: from Python `nan_policy='zero'`; `sop quantize` keeps its option."""
    d = _with_weight(folders, tmp_path / "nan", UP, np.nan)
    quantize_model(str(d), "sop4-g16", tmp_path / "q.sopq", nan_policy="zero", n_calib=C.CalibSize(seqs=3, seq_len=SEQ),
                   cache_dir=tmp_path / "c")
    assert "calibration not cached: non-finite weights replaced under nan_policy='zero'\n" in capsys.readouterr().err
    assert main(["quantize", str(d), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"), "--cache-dir",
                 str(tmp_path / "c"), "--nan-policy", "zero", *SMALL[:4]]) == 0
    assert "calibration not cached: non-finite weights replaced under --nan-policy zero\n" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("*.npz"))


def test_an_artifact_made_under_nan_policy_zero_exports(folders, tmp_path, capsys):
    """The export loads the source model, NaN and all, and replaces every quantized layer: it reads them
    under the policy the artifact was made with (it refused the NaN its own artifact had replaced)."""
    d = _with_weight(folders, tmp_path / "nan", UP, np.nan)
    art = tmp_path / "q.sopq"
    assert main(["quantize", str(d), "--format", "sop4-g16", "--out", str(art), "--quiet", "--no-calib",
                 "--nan-policy", "zero"]) == 0
    assert main(["dequantize", str(art), "--model-folder", "--out", str(tmp_path / "f"), "--quiet"]) == 0
    from safetensors.numpy import load_file

    assert np.isfinite(load_file(str(tmp_path / "f" / "model.safetensors"))[UP]).all()
    capsys.readouterr()


def test_activations_that_are_not_finite_are_one_line(folders, tmp_path, capsys):
    """A NaN outside the quantized layers (a norm's weight) made every statistic after it NaN: the
    error named the next layer's "col_weight"; without calibration the end-to-end check printed nan."""
    d = _with_weight(folders, tmp_path / "norm", "model.layers.0.post_attention_layernorm.weight", np.nan, at=3)
    err = one_error(capsys, ["quantize", str(d), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"),
                             "--quiet", "--cache-dir", str(tmp_path / "c"), *SMALL[:4]])
    assert err == f"sop: error: {d}: calibration: the forward pass gives non-finite activations at the input " \
                  f"of model.layers.0.mlp.gate_proj.weight (a non-finite weight outside the layers quantized, or " \
                  f"activations that overflow); --no-calib quantizes without a forward pass"
    err = one_error(capsys, ["eval", str(d), "--format", "sop4-g16", "--quiet", "--no-calib",
                             "--json", str(tmp_path / "e.json"), *SMALL[2:]])
    assert err == f"sop: error: {d}: the end-to-end check: the model's own logits are not finite (a non-finite " \
                  f"weight outside the layers quantized, or activations that overflow); --no-e2e skips it"
    # from Python the parameters (they said `--no-calib`, `--no-e2e`, options a Python caller has not got)
    size = C.CalibSize(seqs=3, seq_len=SEQ)
    with pytest.raises(ValueError, match=r"overflow\); calibrate=False quantizes without a forward pass$"):
        quantize_model(str(d), "sop4-g16", tmp_path / "q.sopq", n_calib=size, cache_dir=tmp_path / "c",
                       progress=False)
    with pytest.raises(ValueError, match=r"overflow\); e2e=False skips it$"):
        evaluate(str(d), ["sop4-g16"], calibrate=False, n_calib=size, e2e_windows=3, progress=False)
    assert not (tmp_path / "q.sopq").exists() and not (tmp_path / "e.json").exists()


def test_a_rotary_model_runs_past_its_max_position_embeddings_with_a_warning(folders, tmp_path, capsys):
    """Llama computes any position (rotary): windows past max_position_embeddings run, as before (only a
    learned position table refuses them), now with one warning line, even quiet, and in the JSON's notes
    (they ran without a word: an outside probe)."""
    d = _copy(folders["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": SEQ // 2}))
    assert main(["quantize", str(d), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"), "--quiet",
                 "--cache-dir", str(tmp_path / "c"), *SMALL[:4]]) == 0
    said = f"windows of {SEQ} tokens run past the model's {SEQ // 2} positions (max_position_embeddings)"
    err = capsys.readouterr().err
    assert err.count(said) == 1 and err.startswith("warning: "), err
    assert main(["eval", str(d), "--format", "nf4-g64", "--json", str(tmp_path / "e.json"), "--quiet",
                 "--cache-dir", str(tmp_path / "c"), *SMALL]) == 0
    assert capsys.readouterr().err.count(said) == 1
    assert [n for n in json.loads((tmp_path / "e.json").read_text())["source"]["notes"] if said in n]
    assert main(["eval", str(folders["llama"]), "--format", "nf4-g64", "--json", str(tmp_path / "f.json"),
                 "--quiet", "--cache-dir", str(tmp_path / "c"), *SMALL]) == 0
    assert "max_position_embeddings" not in capsys.readouterr().err          # within its positions: no word


def test_a_model_transformers_builds_but_cannot_run_is_one_line(tokenizer, tmp_path, capsys):
    """Phi with 40-wide heads of 4 (a rotary width of 5): transformers builds it and fails inside its
    forward pass; that was reported as a bug of sop's (exit 70)."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.phi import PhiConfig

    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                    num_attention_heads=4)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    err = one_error(capsys, ["quantize", str(tmp_path / "m"), "--format", "sop4-g16", "--out",
                             str(tmp_path / "q.sopq"), "--quiet", "--cache-dir", str(tmp_path / "c"), *SMALL[:4]])
    assert err.startswith(f"sop: error: {tmp_path / 'm'}: transformers cannot run the model's forward pass "
                          f"(RuntimeError: The size of tensor a (5) must match") and err.endswith(L.HINT), err
    with pytest.raises(CheckpointError) as info:         # from Python: its parameters, not the commands' options
        quantize_model(str(tmp_path / "m"), "sop4-g16", tmp_path / "q.sopq", n_calib=C.CalibSize(seqs=2, seq_len=SEQ),
                       cache_dir=tmp_path / "c", progress=False)
    assert str(info.value).endswith("; calibrate=False quantizes it without a forward pass (evaluate: with e2e=False "
                                    "too), into a .sopq; a model folder (export_model_folder) needs the forward "
                                    "pass's model in any case"), info.value
    assert not (tmp_path / "q.sopq").exists()


def test_an_error_of_sops_own_code_in_the_forward_pass_stays_a_bug(folders):
    """Only errors raised in torch's or transformers' code are the checkpoint's; one raised in this
    package's code (a statistics hook) passes through as itself, a bug to report (exit 70)."""
    runner = L.load(open_model(str(folders["llama"])))
    ns = {"__name__": "sop.quantize.a_hook"}
    exec("def hook(module, args):\n    raise KeyError('a bug of ours')\n", ns)
    handle = runner.model.get_input_embeddings().register_forward_pre_hook(ns["hook"])
    try:
        with pytest.raises(KeyError, match="a bug of ours"):
            runner._run(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    finally:
        handle.remove()


def test_a_model_too_large_for_memory_is_refused(folders, monkeypatch, tmp_path, capsys):
    import psutil

    class Tiny:
        available = 1000
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    err = one_error(capsys, ["eval", str(folders["llama"]), "--format", "nf4-g64", "--quiet", "--cache-dir",
                             str(tmp_path), *SMALL])
    assert "needs about" in err and "0.0 MiB are available" in err and "--no-e2e" in err
    with pytest.raises(ValueError, match=r"needs about .*, 0\.0 MiB are available: e2e=False skips it$"):
        evaluate(str(folders["llama"]), ["nf4-g64"], cache_dir=tmp_path, progress=False)     # Python's switch
    with pytest.raises(ValueError, match=r"0\.0 MiB are available: calibrate=False skips it \(unweighted search\)$"):
        quantize_model(str(folders["llama"]), "nf4-g64", tmp_path / "q.sopq", cache_dir=tmp_path, progress=False)


def test_a_model_folder_too_large_for_memory_names_a_remedy_dequantize_has(folders, tmp_path, capsys, monkeypatch):
    """The export's refusal said "--no-calib skips it (unweighted search)", an option sop dequantize lacks, and
    "needs about 0.00 GiB, 0.00 GiB are available" for a tiny model."""
    art = tmp_path / "m.sopq"
    assert main(["quantize", str(folders["llama"]), "--format", "nf4-g64", "--out", str(art), "--quiet",
                 "--no-calib"]) == 0
    monkeypatch.setenv("SOP_MEMORY_LIMIT", "1K")
    err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(tmp_path / "f"), "--quiet"])
    assert err.startswith(f"sop: error: {folders['llama']}: the forward pass for the model folder (the model in "
                          f"float32, the decoded layers in float32) needs about ") and " MiB, 0.0 MiB are available (SOP_MEMORY_LIMIT=1K): " in err
    assert err.endswith(": " + L.EXPORT[1]) and "--no-calib" not in err and not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match=r"0\.0 MiB are available \(SOP_MEMORY_LIMIT=1K\): dequantize writes the "
                                         r"quantized layers alone \(a \.safetensors\)$"):     # Python's function
        export_model_folder(art, tmp_path / "f", progress=False)
    assert not (tmp_path / "f").exists()


def test_the_lm_head_option_without_a_head(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"l.0.fc.weight": torch.ones(4, 16)}, tmp_path / "m.safetensors")
    err = one_error(capsys, ["eval", str(tmp_path / "m.safetensors"), "--format", "nf4-g64", "--include-lm-head",
                             "--quiet"])
    assert "--include-lm-head" in err and "no output head" in err


def test_the_routers_option_on_a_dense_model_warns_and_quantizes_as_without_it(tmp_path, capsys):
    from safetensors.torch import save_file

    # a gate with no experts beside it is an ordinary linear layer, with or without --include-routers
    save_file({"l.0.fc.weight": torch.ones(4, 16), "l.0.gate.weight": torch.ones(4, 16)},
              tmp_path / "m.safetensors")
    args = ["eval", str(tmp_path / "m.safetensors"), "--format", "nf4-g64", "--quiet"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--include-routers"]) == 0
    routed = capsys.readouterr()
    warning = ("warning: --include-routers: the checkpoint has no MoE router (a router or an experts block's gate: "
               "docs/quantizer.md, \"Mixture-of-experts models\")")
    assert ": 2 linear layers, 128 weights\nkept as they are: nothing\n" in plain.out and plain.err == ""
    assert routed.err.splitlines() == [warning] and routed.out.replace(warning + "\n", "") == plain.out
    # from Python the note names the keyword the caller gave
    assert open_model(str(tmp_path / "m.safetensors"), routers=True).notes == \
        [warning.replace("warning: --include-routers", "routers=True")]


def test_other_configs_run_unweighted_with_the_reason(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"encoder.block.0.fc.weight": torch.ones(8, 16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert main(["eval", str(tmp_path), "--format", "nf4-g64", "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "config.json model_type 't5' is no causal LM that transformers runs" in out and "unweighted" in out


def test_env_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
