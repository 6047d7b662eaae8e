"""A model held in memory, quantized in place (quantize/in_memory.py): the statistics against inputs
recomputed here and against calibration on disk, the layers and bits against the checkpoint path
(`artifact.quantize_model` on the same model saved), sop-budget, what is kept, and bad input."""

import contextlib
import copy
import re

import numpy as np
import pytest
import torch

from sop.golden.formats import to_float32
from sop.quantize import causal_lm as L
from sop.quantize.artifact import open_artifact, quantize_model
from sop.quantize.in_memory import _TIED, quantize_module
from sop.quantize.inputs import command_line
from sop.quantize.models import linear_reason, open_model
from sop.quantize.schemes import get_quant_format

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from test_causal_lm import bpe_tokenizer, make_folder, windows_of  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(10, 40)
        self.up = torch.nn.Linear(40, 24)
        self.down = torch.nn.Linear(24, 8, bias=False)
        self.unused = torch.nn.Linear(8, 8)         # no token reaches it

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_statistics_are_the_inputs_mean_squares_and_the_weights_their_formats_bits():
    model = MLP().double()
    x = [torch.randn(3, 5, 40, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64) * 3]
    w_up, w_down, w_unused = (m.weight.detach().numpy().copy() for m in (model.up, model.down, model.unused))
    # the inputs recomputed here: x itself for up, relu(up(x)) for down; 22 tokens
    rows = np.concatenate([t.numpy().reshape(-1, 40) for t in x])
    hidden = np.maximum(rows @ w_up.T + model.up.bias.detach().numpy(), 0)
    want = {"up.weight": (rows ** 2).mean(0), "down.weight": (hidden ** 2).mean(0),
            "unused.weight": np.full(8, 1 / 22)}
    res = quantize_module(model, "sop4-g16", x)
    assert res.tokens == 22 and list(res.layers) == ["down.weight", "unused.weight", "up.weight"]   # names' order
    for name in want:
        np.testing.assert_allclose(res.act_ms[name], want[name], rtol=1e-12)
    assert res.kept == {"emb.weight": "an embedding"} and res.unreached == ["unused.weight"]
    fmt = get_quant_format("sop4-g16")
    for name, w in (("up.weight", w_up), ("down.weight", w_down), ("unused.weight", w_unused)):
        ref = fmt.quantize(w, act_ms=res.act_ms[name], name=name)
        got = dict(model.named_parameters())[name].detach().numpy()
        assert np.array_equal(got, ref.recon) and not np.array_equal(got, w)
        assert res.layers[name].bits == ref.bits and res.layers[name].stream.blocks == ref.stream.blocks
    assert res.bits == sum(r.bits for r in res.layers.values()) and model.training   # its mode restored


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("lm") / "qwen2", "qwen2", bpe_tokenizer())     # an untied head


def fresh(folder):
    from transformers.models.auto import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)


def test_the_statistics_equal_calibration_on_disk(qwen2):
    """The same windows through the checkpoint path's runner (causal_lm.collect_stats) and through a
    model held in memory: the same statistic for every layer, bit for bit."""
    runner = L.load(open_model(str(qwen2)))
    win = windows_of(runner)
    disk, _ = runner.collect_stats(win)
    res = quantize_module(fresh(qwen2), "nf4-g64", [{"input_ids": win, "use_cache": False}])
    assert set(res.act_ms) == set(disk) - {"lm_head.weight"} and len(res.act_ms) == 14   # the head kept
    for name, s in res.act_ms.items():
        assert np.array_equal(disk[name], s), name


@pytest.mark.parametrize("fmt", ["sop4-g16", "e2m3-ue4m4-g16", "mxfp4", "fp8-e4m3-pot"])
def test_unweighted_the_same_layers_and_weights_as_the_checkpoint_path(qwen2, tmp_path, fmt):
    out = tmp_path / "m.sopq"
    quantize_model(str(qwen2), fmt, out, calibrate=False, progress=False)
    art = open_artifact(out)
    model = fresh(qwen2)
    res = quantize_module(model, fmt)
    params = dict(model.named_parameters())
    assert sorted(e.name for e in art.layers) == sorted(res.layers) and len(res.layers) == 14
    for entry in art.layers:
        assert np.array_equal(params[entry.name].detach().numpy(), art.weights(entry)), entry.name
    assert res.kept["lm_head.weight"] == "lm_head" and "model.embed_tokens.weight" in res.kept


def test_gpt2_conv1d_is_quantized_as_its_transpose(tmp_path):
    folder = make_folder(tmp_path / "gpt2", "gpt2", bpe_tokenizer())
    out = tmp_path / "m.sopq"
    quantize_model(str(folder), "sop4-g16", out, calibrate=False, progress=False)
    art = open_artifact(out)
    from transformers.models.auto import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    quantize_module(model, "sop4-g16")
    params = dict(model.named_parameters())
    assert len(art.layers) == 8
    for entry in art.layers:                      # Conv1D stores (in, out): the artifact holds (out, in)
        assert np.array_equal(params[entry.name].detach().numpy().T, art.weights(entry)), entry.name


def test_sop_budget_chooses_as_the_checkpoint_path(qwen2, tmp_path):
    out = tmp_path / "b.sopq"
    quantize_model(str(qwen2), "sop-budget", out, budget=5.0, calibrate=False, progress=False)
    art = open_artifact(out)
    model = fresh(qwen2)
    res = quantize_module(model, "sop-budget", budget=5.0)
    params = dict(model.named_parameters())
    assert {e.name: e.choice for e in art.layers} == {n: f"{res.budget.choice[n]}: {r.choice}"
                                                      for n, r in res.layers.items()}
    assert len(set(res.budget.choice.values())) > 1          # promotions happened: the test can see them
    for entry in art.layers:
        assert np.array_equal(params[entry.name].detach().numpy(), art.weights(entry)), entry.name


def test_a_tied_head_is_quantized_once_with_its_embedding(tmp_path):
    folder = make_folder(tmp_path / "llama", "llama", bpe_tokenizer())      # tie_word_embeddings
    model = fresh(folder)
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    kept = quantize_module(fresh(folder), "sop4-g16").kept
    assert kept["lm_head.weight"].startswith("a head tied to the input embedding model.embed_tokens.weight")
    res = quantize_module(model, "sop4-g16", lm_head=True, include=["model.embed_tokens.weight"])
    assert list(res.layers) == ["model.embed_tokens.weight"]           # the checkpoint's name, as on disk
    ref = get_quant_format("sop4-g16").quantize(fresh(folder).lm_head.weight.detach().numpy())
    assert np.array_equal(emb.detach().numpy(), ref.recon)
    assert res.kept["model.layers.0.mlp.up_proj.weight"] == "not selected (include/exclude)"


def test_a_reconstruction_past_float16_is_refused_and_the_model_unchanged():
    """65504 is float16's largest; a power-of-two scale makes it 256 x 256 = 65536 in E4M3."""
    model = MLP().half()
    with torch.no_grad():
        model.down.weight[0, 0] = 65504.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer down.weight: its reconstruction does not fit the parameter's "
                                         r"torch.float16 \(largest magnitude 65536.0, the dtype's 65504.0\)"):
        quantize_module(model, "fp8-e4m3-pot")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("fmt", ["fp8-e4m3-pot", "sop4-g16", "int8-ch"])
def test_a_float32_weight_near_its_largest_takes_the_float32_output_rule(fmt):
    """float32's largest times a power-of-two scale reconstructs to 2^128: `sop dequantize` saturates it
    (golden.formats.to_float32), and quantize_module refused it as a reconstruction float32 cannot hold
    (an outside probe). Now the parameter is what `sop dequantize` writes, finite."""
    model = MLP()
    with torch.no_grad():
        model.down.weight[0, 0] = float(np.finfo(np.float32).max)
    w = model.down.weight.detach().numpy().astype(np.float64)
    ref = get_quant_format(fmt).quantize(w).recon
    quantize_module(model, fmt)
    got = model.down.weight.detach().numpy()
    assert np.abs(ref).max() > np.finfo(np.float32).max          # the case: a reconstruction past float32
    assert np.isfinite(got).all() and np.array_equal(got, to_float32(ref))


def test_bad_input_is_one_value_error():
    model = MLP()
    with pytest.raises(ValueError, match="unknown format"):
        quantize_module(model, "nf5")
    with pytest.raises(ValueError, match="budget is for sop-budget, not sop4-g16"):
        quantize_module(model, "sop4-g16", budget=4.0)
    with pytest.raises(ValueError, match="sop-budget needs budget=B, the average bits per weight"):
        quantize_module(model, "sop-budget")
    with pytest.raises(ValueError, match="got '5'"):
        quantize_module(model, "sop-budget", budget="5")
    for bad in (0, -1.0, float("nan")):                  # refused before calibration, named as the API names it
        with pytest.raises(ValueError, match=r"^budget must be a number above 0, got"):
            quantize_module(model, "sop-budget", budget=bad)
    with pytest.raises(ValueError, match=r"^budget is too small: it buys .* give budget=\d+\.\d{4} or more$"):
        quantize_module(model, "sop-budget", budget=0.5)   # no --budget here: there is no command line
    with pytest.raises(ValueError, match="batches is an iterable of batches, got a Tensor: for one batch, pass"):
        quantize_module(model, "sop4-g16", torch.zeros(2, 40))
    with pytest.raises(ValueError, match="calibration batch 0 is a str: each batch is a dict"):
        quantize_module(model, "sop4-g16", ["some text"])
    with pytest.raises(ValueError, match=r"reached no linear layer \(none given\)$"):
        quantize_module(model, "sop4-g16", [])
    with pytest.raises(ValueError, match=r"no linear layer to quantize \(exclude \['\*'\]\): .*; kept: up.weight, "
                                         r"not selected \(include/exclude\) \(and 3 more\)"):
        quantize_module(model, "sop4-g16", exclude=["*"])
    with pytest.raises(ValueError, match="layer up.weight: its input's mean square is not finite"):
        quantize_module(model, "sop4-g16", [torch.full((2, 40), float("inf"))])
    with torch.no_grad():
        model.up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="up.weight"):
        quantize_module(model, "sop4-g16")


def test_a_glob_given_as_a_string_is_one_glob():
    """A string was iterated character by character: include='up.*' held '*', which matched every layer."""
    assert set(quantize_module(MLP(), "sop4-g16", include="up.*").layers) == {"up.weight"}
    assert set(quantize_module(MLP(), "sop4-g16", exclude="up.*").layers) == {"down.weight", "unused.weight"}
    assert set(quantize_module(MLP(), "sop4-g16", include=("up.*", "down.*")).layers) == {"up.weight", "down.weight"}
    assert [lay.name for lay in open_model("minilm", include="encoder.layer.0.*").layers] == \
        [lay.name for lay in open_model("minilm", include=["encoder.layer.0.*"]).layers] != []
    for bad, what in (([None], "include: each glob is a string, got None"), (3, "include is a glob or a list")):
        with pytest.raises(ValueError, match=what):
            quantize_module(MLP(), "sop4-g16", include=bad)
        with pytest.raises(ValueError, match=what):
            open_model("minilm", include=bad)


def test_a_glob_that_matches_no_parameter_is_one_user_warning():
    """``exclude='up'`` (not ``up.weight`` or ``up.*``) quantized the layer it meant to keep without a word."""
    with pytest.warns(UserWarning, match=r"^exclude 'up' matches no parameter of the model: it changes nothing "
                                         r"\(a glob matches a whole name, such as (up|down|unused)\.weight, "
                                         r"case-sensitive\)$") as said:
        res = quantize_module(MLP(), "nf4-g64", exclude=["up", "emb.*"])
    assert set(res.layers) == {"up.weight", "down.weight", "unused.weight"} and len(said) == 1
    with pytest.warns(UserWarning, match=r"^include 'dwn\.\*' matches no parameter of the model: it selects "
                                         r"nothing"):
        assert set(quantize_module(MLP(), "nf4-g64", include=["up.*", "dwn.*"]).layers) == {"up.weight"}


def test_what_no_batch_or_model_can_be_is_one_value_error_and_the_model_unchanged():
    """A numpy batch passed the batch check (it has a shape) and stopped in the package's own hook
    (AttributeError: ... no attribute 'detach'); an error of the model's own (an id past its vocabulary)
    came out of torch naming no batch; a model that is no module, lm_head=True with no head, or an FP8
    weight (torch's isfinite has no float8) each came out as whatever Python raised."""
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"calibration batch 0 is a numpy.ndarray: .* a torch tensor "
                                         r"\(torch.as_tensor makes one of it\)"):
        quantize_module(model, "sop4-g16", [np.zeros((2, 40), np.float32)])
    with pytest.raises(ValueError, match=r"^calibration batch 1: the model cannot run it \(RuntimeError: mat1 and "
                                         r"mat2 shapes cannot be multiplied") as err:
        quantize_module(model, "sop4-g16", [torch.zeros(2, 40), torch.zeros(2, 39)])
    assert isinstance(err.value.__cause__, RuntimeError)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="^model is the torch.nn.Module to quantize, got OrderedDict$"):
        quantize_module(model.state_dict(), "sop4-g16")
    with pytest.raises(ValueError, match="^lm_head=True: the model has no output head"):
        quantize_module(model, "sop4-g16", lm_head=True)
    fp8 = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 8))
    fp8[0].weight.data = fp8[0].weight.data.to(torch.float8_e4m3fn)
    res = quantize_module(fp8, "sop4-g16")
    assert set(res.layers) == {"1.weight"} and res.kept["0.weight"].startswith("stored in FP8 (float8_e4m3fn)")
    with pytest.raises(ValueError, match=r"no linear layer to quantize.*; kept: 0.weight, stored in FP8"):
        quantize_module(fp8[:1], "sop4-g16")


def test_sop_budget_under_calibration_weighs_each_layer_by_its_statistics(qwen2):
    runner = L.load(open_model(str(qwen2)))
    model = fresh(qwen2)
    ref_model = fresh(qwen2)
    res = quantize_module(model, "sop-budget", [{"input_ids": windows_of(runner)}], budget=5.0)
    layers = {n: (dict(ref_model.named_parameters())[n].detach().double().numpy(), res.act_ms[n]) for n in res.layers}
    ref = get_quant_format("sop-budget").solve_budget(layers, 5.0)
    assert ref.choice == res.budget.choice
    assert ref.choice != quantize_module(fresh(qwen2), "sop-budget", budget=5.0).budget.choice   # the weights matter
    params = dict(model.named_parameters())
    for n in res.layers:
        assert np.array_equal(params[n].detach().numpy(), ref.results[n].recon.astype(np.float32)), n


# -- what an outside probe found (each failed before its fix) ---------------------------------------------

class Tokens(torch.nn.Module):
    """ids -> embedding -> up -> relu -> down; a tokenizer's keywords."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb = torch.nn.Embedding(50, 32)
        self.up = torch.nn.Linear(32, 16)
        self.down = torch.nn.Linear(16, 32)

    def forward(self, input_ids, attention_mask=None):
        return self.down(torch.relu(self.up(self.emb(input_ids))))


class PerHead(torch.nn.Module):
    """ids -> embedding -> 4 heads of 8 -> a projection applied per head (DeepSeek-V4's ``o_a_proj``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(50, 32)
        self.per_head = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.per_head(self.emb(input_ids).unflatten(-1, (4, 8)))


@pytest.mark.parametrize("batch, tokens", [
    ({"input_ids": torch.ones(2, 5, dtype=torch.long)}, 10),
    ({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2])},
     8),
    (torch.ones(3, 5, dtype=torch.long), 15),
    ((torch.ones(1, 7, dtype=torch.long),), 7),
], ids=["ids", "mask", "tensor", "tuple"])
def test_the_tokens_are_the_batches_not_the_rows_a_layer_applied_per_head_sees(batch, tokens):
    """A layer applied per head sees a row per head and token: the calibration's token count was the most
    rows any layer saw (4 times the tokens here; 512 where 64 tokens ran DeepSeek-V4, an outside probe)."""
    res = quantize_module(PerHead(), "sop4-g16", [batch])
    assert res.tokens == tokens


def test_padded_positions_are_left_out_and_a_tokenizer_output_is_keywords():
    """Section 2's rule (every non-padding token): the padded positions of a batch's attention_mask
    counted as tokens (a tokenizer's padded batch: statistics off by up to 2.7e3 relative), and a
    ``BatchEncoding`` (a UserDict, no dict) was passed as one positional input."""
    from transformers.tokenization_utils_base import BatchEncoding

    model = Tokens()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    emb = model.emb.weight.detach().double().numpy()
    real = emb[ids.numpy()[mask.numpy().astype(bool)]]                 # the 12 real positions' inputs of up
    res = quantize_module(model, "sop4-g16", [BatchEncoding({"input_ids": ids, "attention_mask": mask})])
    np.testing.assert_allclose(res.act_ms["up.weight"], (real ** 2).mean(0), rtol=1e-12)
    assert res.tokens == 12


def test_batches_whose_every_position_is_masked_say_so():
    """Every position of the batches masked: `reached no linear layer (none given, or the model ran
    none)`, neither of which was the case (an outside probe)."""
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match=r"reached no linear layer \(every position masked: each batch's "
                                         r"attention_mask is all 0\)$"):
        quantize_module(Tokens(), "nf4-g64", [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


def test_a_mask_of_another_shape_than_its_inputs_is_one_value_error():
    """An attention_mask (2, 8) for input_ids (2, 16): transformers ran it, reading the missing positions as
    masked, while the statistics counted every row and the tokens as the mask's ones (16 of 32 rows: an
    outside probe). One ValueError naming the batch, the model unchanged; a batch carrying a cache is not
    checked (its mask covers the cached positions too), and its tokens are its own positions (the cached ones
    were counted too: a second probe)."""
    from transformers.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16))
    for key, value, mask, said in (("input_ids", ids, torch.ones(2, 8), "(2, 8) and its input_ids (2, 16)"),
                                   ("input_ids", ids, torch.ones(2, 20), "(2, 20) and its input_ids (2, 16)"),
                                   ("inputs_embeds", torch.randn(2, 16, 32), torch.ones(2, 15),
                                    "(2, 15) and its inputs_embeds (2, 16)")):
        with pytest.raises(ValueError, match=rf"^calibration batch 1: its attention_mask is {re.escape(said)} "
                                             r"positions: a mask gives one entry per position$"):
            quantize_module(model, "nf4-g64", [{"input_ids": ids}, {key: value, "attention_mask": mask}])
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    res = quantize_module(model, "nf4-g64", [{"input_ids": ids, "attention_mask": torch.ones(2, 16)}])
    assert res.tokens == 32
    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True).cache
    res = quantize_module(model, "nf4-g64", [{"input_ids": ids[:, 8:], "attention_mask": torch.ones(2, 16),
                                              "cache": cache}])
    assert res.layers and res.tokens == 16          # the batch's own 2 x 8 positions, not the cached ones too
    mask = torch.ones(2, 16)
    mask[1, 15] = 0                                 # a padded position of the batch's own
    res = quantize_module(model, "nf4-g64", [{"input_ids": ids[:, 8:], "attention_mask": mask, "cache": cache}])
    assert res.tokens == 15


def test_a_batch_on_the_meta_device_is_one_value_error():
    """input_ids on the meta device: torch's embedding of them on CPU weights returns uninitialized memory
    (values such as 6.9e24, other at every run), which the statistics took in without a word (an outside
    probe). One ValueError naming the batch and the input, the model unchanged, for every kind of batch."""
    model = Tokens()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 50, (2, 6))
    for batch, what in (({"input_ids": ids.to("meta")}, "input_ids"), ((ids.to("meta"),), "input 0"),
                        (ids.to("meta"), "input"), ({"input_ids": ids, "attention_mask": ids.to("meta")},
                                                    "attention_mask")):
        with pytest.raises(ValueError, match=rf"^calibration batch 1: its {what} is on the meta device \(no "
                                             r"values\); give it on the model's device$"):
            quantize_module(model, "nf4-g64", [ids, batch])
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_heads_tied_to_an_embedding_by_any_name_are_kept_with_it():
    """BERT's MLM decoder (``cls.predictions.decoder``) is the word embedding's parameter: it was
    quantized by default, the embedding with it, without a word."""
    from transformers.models.bert import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=48))
    emb = model.bert.embeddings.word_embeddings.weight
    before = emb.detach().clone()
    res = quantize_module(model, "sop4-g16")
    assert torch.equal(emb, before) and len(res.layers) == 7
    assert res.kept["cls.predictions.decoder.weight"] == (
        "a head tied to the input embedding bert.embeddings.word_embeddings.weight: kept (lm_head=True quantizes "
        "the shared matrix, under that name)")


def test_weights_applied_without_a_module_call_or_computed_at_each_call_are_kept():
    """nn.MultiheadAttention applies ``out_proj.weight`` without calling ``out_proj``: its statistic
    was the no-token fallback (0.05 in every column, against 0.6 to 2.5); a weight_norm Linear was
    reported quantized and its weight never changed."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                                weight_norm(torch.nn.Linear(16, 16)))
    res = quantize_module(model, "sop4-g16", [torch.randn(2, 5, 16)])
    assert sorted(res.layers) == ["0.linear1.weight", "0.linear2.weight"] and res.unreached == []
    assert res.kept["0.self_attn.out_proj.weight"].startswith("nn.MultiheadAttention's") == \
        res.kept["0.self_attn.in_proj_weight"].startswith("nn.MultiheadAttention's") is True
    assert res.kept["1.weight"].startswith("computed at each call (a parametrization such as weight_norm)")


class TwoUses(torch.nn.Module):
    """One weight applied by two modules (to different inputs), and an expert called on no row."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Linear(16, 16, bias=False)
        self.b = torch.nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight
        self.expert = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.b(3 * x) + self.a(x) + self.expert(x[:0]).sum()


def test_a_shared_weight_counts_both_inputs_and_an_expert_called_on_no_row_is_unreached():
    """The statistic of a weight two modules apply came from the first module's input only; an expert
    called on a (0, d) slice was refused as 'not finite' (0/0) instead of the 1/tokens rule."""
    x = torch.randn(10, 16, dtype=torch.float64)
    model = TwoUses().double()
    res = quantize_module(model, "sop4-g16", [x])
    xs = x.numpy()
    np.testing.assert_allclose(res.act_ms["a.weight"], ((xs ** 2).sum(0) * 10) / 20, rtol=1e-12)
    assert list(res.layers) == ["a.weight", "expert.weight"] and res.unreached == ["expert.weight"]
    assert res.tokens == 10                         # the batch's rows, not the 20 the shared weight saw
    assert np.array_equal(res.act_ms["expert.weight"], np.full(16, 1 / 10))
    assert model.b.weight is model.a.weight


def test_every_submodule_keeps_its_mode_and_inference_tensors_are_written():
    model = MLP()
    model.down.eval()
    quantize_module(model, "sop4-g16", [torch.randn(4, 40)])
    assert model.training and model.up.training and not model.down.training   # only the top was restored
    with torch.inference_mode():                     # its parameters are inference tensors
        frozen = MLP()
    before = frozen.up.weight.clone()
    quantize_module(frozen, "sop4-g16")              # a RuntimeError after the first layer was written
    assert not torch.equal(frozen.up.weight, before)


def test_a_model_on_the_meta_device_is_one_value_error():
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(ValueError, match=r"layer up.weight: its weight is on the meta device \(not loaded\)"):
        quantize_module(model, "sop4-g16")


def meta_in_the_middle():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8, bias=False),
                                torch.nn.Linear(8, 8))
    model[2].to("meta")                             # kept (excluded), before a layer the statistics read
    return model


def test_a_kept_module_on_the_meta_device_is_one_value_error_under_calibration():
    """A module kept as it is but on the meta device, in the middle of the forward pass: torch computes a
    CPU input against its meta weight into uninitialized memory (no bias to complain), and the next layer's
    statistics took that in without a word (an outside probe: 21 % off on a tiny Llama with a meta
    ``down_proj``; values such as 6e72 here, other at every run). One ValueError naming it, the model
    unchanged; without batches it is quantized, and a module accelerate offloads (its weights loaded at
    each call) is calibrated."""
    model = meta_in_the_middle()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    with pytest.raises(ValueError, match=r"^calibration: the model's 2.weight is on the meta device \(not loaded\): "
                                         r"the forward pass would compute with no values"):
        quantize_module(model, "sop4-g16", [torch.ones(3, 16)], exclude=["2.weight"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if not p.is_meta)
    assert list(quantize_module(model, "sop4-g16", exclude=["2.weight"]).layers) == ["0.weight", "3.weight"]
    accelerate = pytest.importorskip("accelerate")
    model, x = meta_in_the_middle(), torch.randn(3, 16)
    model[2] = torch.nn.Linear(12, 8, bias=False)
    want = quantize_module(copy.deepcopy(model), "sop4-g16", [x], exclude=["2.weight"]).act_ms
    accelerate.cpu_offload(model[2], execution_device="cpu")
    assert model[2].weight.is_meta
    got = quantize_module(model, "sop4-g16", [x], exclude=["2.weight"]).act_ms
    assert all(np.array_equal(want[n], got[n]) for n in want)


def test_a_lazy_modules_uninitialized_weight_is_one_value_error_naming_it():
    """torch's `Attempted to use an uninitialized parameter in <method 'untyped_storage' ...>`, from deep
    inside, naming no layer (an outside probe)."""
    model = torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"^layer 0.weight: its weight is not initialized yet \(a lazy module, "
                                         r"LazyLinear: run the model once on a batch first\)$"):
        quantize_module(model, "sop4-g16", [torch.randn(2, 32)])


def test_moe_routers_are_kept_or_quantized_as_on_disk(tmp_path):
    """A router (transformers 5 builds it as a module of its own, no nn.Linear) is kept by default, as the
    checkpoint path keeps it, and with ``routers=True`` quantized as that path quantizes it with
    ``--include-routers`` (the experts: tests/test_in_memory_moe.py)."""
    from transformers.models.mixtral import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2))
    model.save_pretrained(tmp_path / "mixtral")
    before = model.model.layers[0].mlp.gate.weight.detach().clone()
    kept = quantize_module(copy.deepcopy(model), "sop4-g16")
    assert kept.kept["model.layers.0.mlp.gate.weight"] == "a MoE router: kept (routers=True quantizes it), as on disk"
    assert "model.layers.0.mlp.experts.3.w3.weight" in kept.layers
    assert open_model(str(tmp_path / "mixtral")).skipped["model.layers.0.block_sparse_moe.gate.weight"] == "router"
    # a router named alone: the error names it and why it was kept (not the first parameter kept)
    with pytest.raises(ValueError, match=r"\(quantize/models\.py\); kept: model\.layers\.0\.mlp\.gate\.weight, a MoE "
                                         r"router: kept \(routers=True quantizes it\), as on disk \(and 18 more\)$"):
        quantize_module(copy.deepcopy(model), "sop4-g16", include="model.layers.0.mlp.gate.weight")
    for flag, context in (("routers=True", contextlib.nullcontext()), ("--include-routers", command_line())):
        with pytest.raises(ValueError, match=r"; model\.layers\.0\.block_sparse_moe\.gate\.weight is a MoE router, "
                                             rf"kept unless {flag}\)$"), context:
            open_model(str(tmp_path / "mixtral"), include="*.gate.weight")
    quantize_model(str(tmp_path / "mixtral"), "sop4-g16", tmp_path / "m.sopq", calibrate=False, progress=False,
                   routers=True)
    art = open_artifact(tmp_path / "m.sopq")
    router = next(e for e in art.layers if e.name.endswith("gate.weight"))
    res = quantize_module(model, "sop4-g16", routers=True)
    assert "model.layers.0.mlp.gate.weight" in res.layers
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, before)
    assert np.array_equal(model.model.layers[0].mlp.gate.weight.detach().numpy(), art.weights(router))
    assert "model.layers.0.mlp.experts.3.w3.weight" in res.layers


def test_routers_asked_of_a_model_with_none_warn_as_the_command_line_does():
    """``routers=True`` on a dense model quantizes what it would without it, and says the model has no
    router (``sop quantize --include-routers`` notes it: tests/test_causal_lm.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    plain = quantize_module(copy.deepcopy(model), "sop4-g16")
    with pytest.warns(UserWarning, match=r"^routers=True: the model has no MoE router \(a router or an experts "
                                         r"block's gate: docs/quantizer\.md"):
        asked = quantize_module(model, "sop4-g16", routers=True)
    assert list(asked.layers) == list(plain.layers) == ["0.weight", "2.weight"]


def test_kept_names_every_parameter_left_as_it_is_once():
    """A tied head kept left the embedding out of ``kept`` (its parameter was 'decided'); a weight two
    kept modules share, or a tied head outside the include globs, got the wrong reason or none."""
    model = Tokens()
    model.head = torch.nn.Linear(32, 50, bias=False)
    model.head.weight = model.emb.weight                      # tied, not named lm_head
    model.twin = torch.nn.Linear(16, 32)
    model.twin.weight = model.down.weight                     # shares down's weight
    res = quantize_module(model, "sop4-g16", exclude=["down.weight"])
    assert list(res.layers) == ["up.weight"]
    assert res.kept == {"emb.weight": "an embedding",
                        "down.weight": "not selected (include/exclude)",
                        "head.weight": _TIED.format("emb.weight"),
                        "twin.weight": "the weight of down.weight, kept"}
    model = Tokens()
    model.head = torch.nn.Linear(32, 50, bias=False)
    model.head.weight = model.emb.weight
    res = quantize_module(model, "sop4-g16", lm_head=True, include=["up.weight"])
    assert res.kept == {"emb.weight": "not selected (include/exclude)", "down.weight": "not selected (include/exclude)",
                        "head.weight": "the weight of emb.weight, kept"}


# -- a second outside probe (each failed before its fix) ----------------------------------------------

def test_an_encoder_decoder_masks_each_side_with_its_own_mask():
    """The encoder's attention_mask was applied to decoder layers whose input happened to have as many
    rows (BART's decoder self-attention statistic off by up to 47 %). The decoder's first q_proj reads
    the decoder's own embeddings: the encoder's padding must not change its statistic."""
    from transformers.models.bart import BartConfig, BartForConditionalGeneration

    import copy

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
    model = BartForConditionalGeneration(cfg)
    ids, dec = torch.randint(3, 64, (2, 6)), torch.randint(3, 64, (2, 6))
    mask, dmask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3]), torch.tensor([[1] * 6, [1] * 2 + [0] * 4])

    def stats(**batch):
        return quantize_module(copy.deepcopy(model), "sop4-g16", [{"input_ids": ids, "decoder_input_ids": dec,
                                                                   **batch}]).act_ms

    padded, plain, both = stats(attention_mask=mask), stats(), stats(attention_mask=mask, decoder_attention_mask=dmask)
    q, enc = "model.decoder.layers.0.self_attn.q_proj.weight", "model.encoder.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(padded[q], plain[q])
    assert not np.array_equal(padded[enc], plain[enc])                   # the encoder's mask still applies
    assert not np.array_equal(both[q], plain[q])                         # the decoder's own mask


@pytest.mark.parametrize("dec_len", [6, 4])
def test_cross_attentions_key_and_value_take_the_encoders_positions(dec_len):
    """BART's cross-attention k_proj and v_proj take the encoder's output: their statistic is over the
    source positions attention_mask keeps. They were masked with decoder_attention_mask (equal lengths:
    the encoder's padding counted, real source tokens dropped) or with none (another length)."""
    from transformers.models.bart import BartConfig, BartForConditionalGeneration

    import copy

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
    model = BartForConditionalGeneration(cfg).eval()
    mask, dmask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3]), torch.tensor([[1] * 6, [1] * 2 + [0] * 4])[:, :dec_len]
    batch = {"input_ids": torch.randint(3, 64, (2, 6)), "attention_mask": mask,
             "decoder_input_ids": torch.randint(3, 64, (2, dec_len)), "decoder_attention_mask": dmask}
    attn, seen = model.model.decoder.layers[0].encoder_attn, {}
    for name in ("k_proj", "q_proj"):
        getattr(attn, name).register_forward_pre_hook(lambda _m, a, name=name: seen.update({name: a[0].double()}))
    with torch.no_grad():
        model(**batch)
    stats = quantize_module(copy.deepcopy(model), "sop4-g16", [batch]).act_ms
    pre = "model.decoder.layers.0.encoder_attn."
    for name, keep in (("k_proj", mask), ("v_proj", mask), ("q_proj", dmask)):
        x = seen["q_proj" if name == "q_proj" else "k_proj"][keep.bool()]
        np.testing.assert_allclose(stats[f"{pre}{name}.weight"], (x * x).mean(0).numpy(), rtol=1e-12, err_msg=name)


def test_a_sequence_first_cross_attention_takes_the_encoders_positions():
    """FSMT's decoder gives its cross-attention the encoder's output transposed, (source, batch, d), a view
    of the same memory: it was taken for a decoder input and masked with the decoder's mask, or none (the
    source's padding counted; an outside review). Its statistic is over the source positions kept."""
    from transformers.models.fsmt import FSMTConfig, FSMTForConditionalGeneration

    import copy

    torch.manual_seed(0)
    cfg = FSMTConfig(langs=["en", "de"], src_vocab_size=100, tgt_vocab_size=100, d_model=32, encoder_layers=1,
                     decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                     decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1)
    model = FSMTForConditionalGeneration(cfg).eval()
    src, mask = torch.randint(4, 100, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:], src[1, 6:] = 0, 1
    batch = {"input_ids": src, "attention_mask": mask, "decoder_input_ids": torch.randint(4, 100, (2, 7))}
    seen = {}
    attn = model.model.decoder.layers[0].encoder_attn
    attn.k_proj.register_forward_pre_hook(lambda _m, a: seen.update(x=a[0].double()))
    with torch.no_grad():
        model(**batch)
    assert seen["x"].shape == (9, 2, 32)                                  # sequence first
    stats = quantize_module(copy.deepcopy(model), "sop4-g16", [batch]).act_ms
    x = seen["x"].transpose(0, 1)[mask.bool()]                            # the 15 source positions kept
    for name in ("k_proj", "v_proj"):
        np.testing.assert_allclose(stats[f"model.decoder.layers.0.encoder_attn.{name}.weight"],
                                   (x * x).mean(0).numpy(), rtol=1e-12, err_msg=name)


class SeqFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids).transpose(0, 1))             # (seq, batch, hidden), as XLNet runs


def test_a_sequence_first_layer_masks_the_right_positions():
    """XLNet's layers take (seq, batch, hidden): the batch-first mask was applied to its flattened rows."""
    model = SeqFirst()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    res = quantize_module(model, "sop4-g16", [{"input_ids": ids, "attention_mask": mask}])
    real = model.emb.weight.detach().double().numpy()[ids.numpy()[mask.numpy().astype(bool)]]
    np.testing.assert_allclose(res.act_ms["lin.weight"], (real ** 2).mean(0), rtol=1e-12)


def test_weights_that_share_memory_are_one_tensor_or_kept():
    """A head tied the old way (``head.weight.data = emb.weight.data``: another Parameter, the same memory)
    was quantized as a plain layer and changed the embedding; a Linear over rows of another's weight
    (q taken from a fused qkv) was written after it, so qkv no longer held its own record."""
    model = Tokens()
    model.head = torch.nn.Linear(32, 50, bias=False)
    model.head.weight.data = model.emb.weight.data
    emb = model.emb.weight.detach().clone()
    res = quantize_module(model, "sop4-g16")
    assert torch.equal(model.emb.weight, emb) and res.kept["head.weight"] == _TIED.format("emb.weight")
    fused = torch.nn.Module()
    fused.qkv, fused.q = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
    fused.q.weight = torch.nn.Parameter(fused.qkv.weight.data[:16])
    fused.other = torch.nn.Linear(16, 16)
    before = fused.qkv.weight.detach().clone()
    res = quantize_module(fused, "sop4-g16")
    assert list(res.layers) == ["other.weight"] and torch.equal(fused.qkv.weight, before)
    assert res.kept["qkv.weight"].startswith("shares memory with q.weight")
    assert res.kept["q.weight"].startswith("shares memory with qkv.weight")
    halves = torch.nn.Module()                  # adjacent rows of one tensor touch but do not overlap
    halves.a, halves.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    big = torch.randn(32, 16)
    halves.a.weight, halves.b.weight = torch.nn.Parameter(big[:16]), torch.nn.Parameter(big[16:])
    assert sorted(quantize_module(halves, "sop4-g16").layers) == ["a.weight", "b.weight"]


def test_a_weight_whose_elements_share_memory_is_kept_and_nothing_half_written():
    """An ``expand``ed weight (a stride of 0): torch's ``copy_`` refused it (`more than one element of the
    written-to tensor refers to a single memory location`) after the layers before it had been written,
    a model half quantized (an outside probe). Kept with its reason, before any work."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
    model[2].weight = torch.nn.Parameter(torch.randn(1, 16).expand(8, 16))
    expanded = model[2].weight.detach().clone()
    res = quantize_module(model, "sop4-g16", [torch.randn(3, 32)])
    assert list(res.layers) == ["0.weight", "1.weight"] and torch.equal(model[2].weight, expanded)
    assert res.kept["2.weight"].startswith("its elements share memory (an expanded view, a stride of 0)")


def test_a_head_tied_to_several_embeddings_takes_the_first_name():
    """T5 shares one matrix as `shared`, `encoder.embed_tokens` and `decoder.embed_tokens`: the layer was
    named after the last (the checkpoint stores `shared.weight`)."""
    model = torch.nn.Module()
    model.shared = torch.nn.Embedding(40, 16)
    model.encoder, model.decoder = torch.nn.Module(), torch.nn.Module()
    for side in (model.encoder, model.decoder):                     # modules of their own, one Parameter
        side.embed_tokens = torch.nn.Embedding(40, 16)
        side.embed_tokens.weight = model.shared.weight
    model.lm_head = torch.nn.Linear(16, 40, bias=False)
    model.lm_head.weight = model.shared.weight
    assert list(quantize_module(model, "sop4-g16", lm_head=True).layers) == ["shared.weight"]


def test_a_nan_weight_is_named_before_calibration_blames_a_later_layer():
    model = MLP()
    with torch.no_grad():
        model.up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer up.weight: its weight holds a NaN or an Inf: nothing is quantized"):
        quantize_module(model, "sop4-g16", [torch.randn(2, 40)])


def test_a_masked_lms_vocabulary_projection_is_the_head_on_both_paths(tmp_path):
    """An untied BERT MLM with lm_head=True: the disk path took the word embedding for a tied head
    (no tensor named lm_head) and quantized it; ``cls.predictions.decoder`` is the head now."""
    from transformers.models.bert import BertConfig, BertForMaskedLM

    assert linear_reason("cls.predictions.decoder.weight", (64, 32), True) == "lm_head"
    assert linear_reason("distilbert.vocab_projector.weight", (64, 32), True) == "lm_head"
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=48, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "bert")
    disk = [lay.name for lay in open_model(str(tmp_path / "bert"), lm_head=True).layers]
    assert "cls.predictions.decoder.weight" in disk and "bert.embeddings.word_embeddings.weight" not in disk
    assert "cls.predictions.decoder.weight" not in [lay.name for lay in open_model(str(tmp_path / "bert")).layers]
    assert sorted(quantize_module(model, "sop4-g16", lm_head=True).layers) == sorted(disk)


class _Spy:
    """A format that records each matrix it is handed, then quantizes it as the format ``name`` does."""

    def __init__(self, name):
        self.fmt, self.seen = get_quant_format(name), {}

    def __getattr__(self, attr):
        return getattr(self.fmt, attr)

    def quantize(self, w, act_ms=None, name="layer"):
        self.seen[name] = (w.dtype, w.flags.c_contiguous, w.flags.writeable, w.copy())
        return self.fmt.quantize(w, act_ms=act_ms, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_each_layer_is_handed_to_its_format_as_the_disk_path_reads_it(tmp_path, monkeypatch, dtype):
    """Held in memory, a layer went to its format as float64 (8 bytes a weight, 4 more than the disk
    path's float32 of a bf16, float16 or float32 layer: an outside probe measured the peak at about
    twice the disk path's). Now the matrix the format gets is the one the disk path reads (``read_weight``:
    dtype, values, C order), a Conv1D's as its ``(out, in)`` transpose; a float32 one on the CPU is the
    parameter itself, read-only. The model then holds each reconstruction cast to its dtype."""
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    from sop.quantize import in_memory
    from sop.quantize.layer_loop import read_weight

    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.down_proj, mlp.c_fc = torch.nn.Linear(48, 32, bias=False), Conv1D(24, 48)    # Conv1D holds (in, out)
    model = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"mlp": mlp})])})}).to(dtype)
    if dtype == torch.float64:                          # weights float32 cannot hold: read as float64
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-9)
    name = "model.layers.0.mlp.down_proj.weight"
    w_fc = mlp.c_fc.weight.detach().clone()
    save_file({name: mlp.down_proj.weight.detach().contiguous()}, str(tmp_path / "m.safetensors"))
    disk, _ = read_weight(open_model(str(tmp_path / "m.safetensors")), name)
    spy = _Spy("fp8-e4m3-pot")
    monkeypatch.setattr(in_memory, "get_quant_format", lambda fmt: spy)
    quantize_module(model, "fp8-e4m3-pot")
    got_dtype, c_order, writeable, w = spy.seen[name]
    assert got_dtype == disk.dtype and c_order and np.array_equal(w, disk)
    assert disk.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    assert writeable == (dtype != torch.float32)            # a view of the parameter is never written through
    fc_dtype, fc_c_order, _, w = spy.seen["model.layers.0.mlp.c_fc.weight"]
    assert fc_c_order and np.array_equal(w, w_fc.double().numpy().T) and fc_dtype == disk.dtype
    ref = get_quant_format("fp8-e4m3-pot").quantize(w_fc.double().numpy().T).recon.T
    assert torch.equal(mlp.c_fc.weight.detach(), torch.from_numpy(np.ascontiguousarray(ref)).to(dtype))


def test_a_non_finite_weight_or_cast_in_any_row_chunk_is_found(monkeypatch):
    """The finite checks of a weight and of its cast copy run in row chunks (``torch.isfinite`` of a whole
    bfloat16 layer holds 5 bytes a weight): with chunks of one row, a NaN or an overflow in the last row is
    still found, and the model is unchanged."""
    from sop.quantize import in_memory

    monkeypatch.setattr(in_memory, "_FINITE_CHUNK", 1)
    model = MLP().half()
    with torch.no_grad():
        model.down.weight[-1, -1] = 65504.0                  # E4M3 with a power-of-two scale: 65536
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer down.weight: its reconstruction does not fit"):
        quantize_module(model, "fp8-e4m3-pot")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        model.up.weight[-1, -1] = float("nan")
    with pytest.raises(ValueError, match="layer up.weight: its weight holds a NaN or an Inf"):
        quantize_module(model, "fp8-e4m3-pot")
