"""LLM inputs that would be read silently wrong or not run: a GGUF in the other byte order holding BF16 or
quantized blocks, one part of a split GGUF, a Falcon GGUF whose own output head transformers would
tie to the input embedding, a Mamba GGUF's 2-D convolution, a tokenizer that is not the model's. Each is
refused in one line or read as the file means it (tiny files built here, offline)."""

import numpy as np
import pytest
import torch

from sop.cli import main
from sop.quantize import causal_lm as L
from sop.quantize.checkpoint_files import CheckpointError
from sop.quantize.models import open_model
from test_causal_lm import SMALL, VOCAB, add_gguf_tokenizer, bpe_tokenizer, finish_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
L.quiet_transformers()


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def one_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err, err
    return err


def matrix(rows, cols, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def write_gguf(path, tensors, endian=None, **kw):
    """``tensors``: name -> float32 array, or (raw bytes array, GGML type)."""
    w = gguf.GGUFWriter(str(path), "llama", **({"endianess": endian} if endian is not None else {}), **kw)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    return finish_gguf(w, path)


# -- byte order ------------------------------------------------------------------------------------------

def big_endian_blocks(a, kind):
    """``a`` as GGML ``kind`` blocks in a big-endian file, as gguf_convert_endian.py writes them: each
    Q8_0 block's f16 scale and each BF16 value byte-swapped (GGUFWriter leaves raw uint8 data as is)."""
    raw = gguf.quants.quantize(a, kind).copy()
    if kind == T.BF16:
        raw.view(np.uint16).byteswap(inplace=True)
    elif kind == T.Q8_0:
        blocks = raw.reshape(-1, 34)
        blocks[:, :2] = blocks[:, 1::-1].copy()
    return raw, kind


@pytest.mark.parametrize("kind", [T.Q8_0, T.BF16], ids=["Q8_0", "BF16"])
def test_a_big_endian_gguf_with_quantized_or_bf16_blocks_is_refused_not_misread(tmp_path, capsys, kind):
    a = matrix(4, 32)
    p = write_gguf(tmp_path / "be.gguf", {"blk.0.attn_q.weight": a,
                                          "blk.0.attn_v.weight": big_endian_blocks(a, kind)},
                   endian=gguf.GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match=f"big-endian GGUF holding {kind.name} tensors "
                                              r"\(blk.0.attn_v.weight\).*would be misread") as err:
        open_model(str(p), include=["blk.0.attn_q.weight"])      # the file is refused, whatever is selected
    assert str(err.value).startswith(f"{p}: ")
    out = tmp_path / "m.sopq"
    msg = one_error(capsys, ["quantize", str(p), "--format", "nf4-g64", "--out", str(out), "--quiet", "--no-calib"])
    assert "big-endian" in msg and not out.exists()


def test_a_big_endian_gguf_of_float_tensors_reads_as_stored(tmp_path):
    """gguf reads F32, F16 and F64 of the other byte order right: such a file is read, value for value."""
    want = {"blk.0.attn_q.weight": matrix(4, 32), "blk.0.attn_k.weight": matrix(3, 8, 1).astype(np.float16),
            "blk.0.attn_v.weight": matrix(5, 2, 2).astype(np.float64)}
    p = write_gguf(tmp_path / "be.gguf", {k: v.copy() for k, v in want.items()}, endian=gguf.GGUFEndian.BIG)
    assert gguf.GGUFReader(str(p)).byte_order == "S"
    src = open_model(str(p))
    assert {lay.name for lay in src.layers} == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(src.load(name), w.astype(np.float64))


# -- split files ----------------------------------------------------------------------------------------

def test_one_part_of_a_split_gguf_is_refused(tmp_path, capsys):
    """A GGUF split by gguf-split: a part holds some of the layers; quantizing it would leave the
    others out without a word."""
    tensors = {f"blk.{i}.{n}.weight": matrix(4, 32, i) for i in range(2) for n in ("attn_q", "attn_k")}
    write_gguf(tmp_path / "m.gguf", tensors, split_max_tensors=2)
    parts = sorted(tmp_path.glob("m-*.gguf"))
    assert [p.name for p in parts] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    for i, p in enumerate(parts):
        with pytest.raises(CheckpointError, match=f"part {i + 1} of a GGUF model split into 2 files "
                                                  r"\(split.count\) \(2 of its 4 tensors\).*merge"):
            open_model(str(p))
    out = tmp_path / "m.sopq"
    msg = one_error(capsys, ["quantize", str(parts[0]), "--format", "nf4-g64", "--out", str(out), "--quiet",
                             "--no-calib"])
    assert "split into 2 files" in msg and not out.exists()


# -- a GGUF head transformers would tie ---------------------------------------------------------------------

def gguf_of_config(path, arch: str, cfg: dict, tokenizer):
    """A GGUFWriter for ``path`` with the metadata transformers reads back as ``cfg`` (its GGUF config
    mapping's numbers) and ``tokenizer``."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    w = gguf.GGUFWriter(str(path), arch)
    for key, hf in GGUF_CONFIG_MAPPING[arch].items():
        v = cfg.get(hf) if hf else None
        if isinstance(v, float):
            w.add_float32(f"{arch}.{key}", v)
        elif isinstance(v, int):
            w.add_uint32(f"{arch}.{key}", v)
    add_gguf_tokenizer(w, tokenizer)
    return w


def falcon_gguf(path, tokenizer):
    """A tiny random Falcon (untied head) as a GGUF, with its tokenizer; returns the HF model."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.falcon import FalconConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.25,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)).eval()
    cfg = model.config.to_dict()
    w = gguf_of_config(path, "falcon", cfg, tokenizer)
    back = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor(config=cfg)).items()}
    for name, t in model.state_dict().items():
        w.add_tensor(back[name], t.numpy())
    return finish_gguf(w, model)


def test_a_falcon_gguf_runs_its_own_output_head_not_one_tied_over_the_embedding(tmp_path, tokenizer):
    """transformers ties Falcon's (and BLOOM's) head to the input embedding for any GGUF: loaded
    tied, output.weight overwrote token_embd.weight, and the reference, the calibration and the
    exported folder were another model's."""
    p = tmp_path / "falcon.gguf"
    hf = falcon_gguf(p, tokenizer)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert not np.array_equal(sd["lm_head.weight"], sd["transformer.word_embeddings.weight"])
    src = open_model(str(p))
    assert src.forward == "causal-lm" and "output.weight" in src.lm_head
    runner = L.load(src)
    m = runner.model
    np.testing.assert_array_equal(m.get_input_embeddings().weight.detach().numpy(),
                                  sd["transformer.word_embeddings.weight"])
    np.testing.assert_array_equal(m.get_output_embeddings().weight.detach().numpy(), sd["lm_head.weight"])
    ids = torch.tensor([[0, 5, 9, 100, 200, 7, 8, 9, 310, 2]])
    with torch.inference_mode():
        np.testing.assert_array_equal(m(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy())
    # --include-lm-head: the file's head is a layer of its own, substituted into the head alone
    head = open_model(str(p), lm_head=True)
    r = L.load(head)
    t = r.targets["output.weight"]
    assert t.module == r.head_module and not t.tied
    with r.substituted({"output.weight": np.zeros_like(head.load("output.weight"))}):
        assert not r.model.get_output_embeddings().weight.any()
        assert r.model.get_input_embeddings().weight.any()


# -- a tokenizer that is not the model's ----------------------------------------------------------------------

def test_a_tokenizer_with_ids_past_the_models_vocabulary_is_one_line(tmp_path, tokenizer, capsys):
    """A folder whose tokenizer.json gives ids past the embedding (another model's tokenizer): an
    IndexError deep in torch once (exit 70, an "internal error"); now one line naming the folder."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.llama import LlamaConfig

    torch.manual_seed(0)
    d = tmp_path / "m"
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "r.json"
    err = one_error(capsys, ["eval", str(d), "--format", "nf4-g64", "--json", str(out), "--quiet",
                             "--cache-dir", str(tmp_path / "c"), *SMALL])
    assert err.startswith(f"sop: error: {d}: its tokenizer gives token id ") and \
        "the model has 200 input embeddings (0 to 199): the tokenizer is not this model's" in err
    assert not out.exists()


# -- a GGUF with a 2-D convolution ---------------------------------------------------------------------------

def mamba_gguf(path, tokenizer):
    """A tiny random Mamba as llama.cpp writes it (its depthwise convolution ``ssm_conv1d`` 2-D, ``ssm_a``
    as -exp(A_log)), with its tokenizer; returns the HF model."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.mamba import MambaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=4, time_step_rank=4,
        intermediate_size=64, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)).eval()
    cfg = model.config.to_dict()
    w = gguf_of_config(path, "mamba", cfg, tokenizer)
    names = get_gguf_hf_weights_map(model, TENSOR_PROCESSORS["mamba"](config=cfg), model_type="mamba")
    back = {hf: g for g, hf in names.items()}
    for name, t in model.state_dict().items():
        g, a = back[name], t.numpy()
        if g.endswith("ssm_conv1d.weight"):
            a = a[:, 0, :]                      # (channels, 1, kernel) -> (channels, kernel)
        w.add_tensor(g, -np.exp(a) if g.endswith("ssm_a") else a)
    return finish_gguf(w, model)


def test_a_mamba_ggufs_2d_convolution_is_kept_and_the_model_runs(tmp_path, tokenizer, capsys):
    """llama.cpp stores Mamba's depthwise convolution (channels, kernel), 2-D, named as a weight: it was selected
    as a linear layer and `sop eval` stopped on 'layer blk.0.ssm_conv1d.weight is the weight of no linear
    module of the MambaForCausalLM' (LFM2's shortconv.conv too; an outside probe). Now it is kept as a
    convolution, and the model runs its own weights."""
    p = tmp_path / "mamba.gguf"
    hf = mamba_gguf(p, tokenizer)
    src = open_model(str(p))
    assert src.skipped["blk.0.ssm_conv1d.weight"] == "convolution"
    assert "blk.1.ssm_in.weight" in {lay.name for lay in src.layers}
    runner = L.load(src)
    ids = torch.tensor([[0, 5, 9, 100, 200, 7, 8, 9, 310, 2]])
    with torch.inference_mode():
        np.testing.assert_allclose(runner.model(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert main(["eval", str(p), "--format", "sop4-g16", *SMALL, "--quiet", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "2 convolution" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_a_gguf_only_transformers_newer_loader_reads_says_so(tmp_path, arch):
    """Qwen3.5's GGUFs transformers 5.24 reads through its newer GGUF loader, which reorders the file's value
    heads as it loads them: no forward pass here, and the note said it was 'no causal LM that transformers
    reads'. It says which loader now; the layers are quantized unweighted."""
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_qkv.weight", matrix(8, 32))
    src = open_model(str(finish_gguf(w, tmp_path / "m.gguf")))
    assert (src.forward, src.forward_note) == (None, f"GGUF architecture {arch!r}: transformers reads it through "
                                               f"its newer GGUF loader (its own reorders of the file's tensors), "
                                               f"which the forward pass here does not follow")
    assert [lay.name for lay in src.layers] == ["blk.0.attn_qkv.weight"]
