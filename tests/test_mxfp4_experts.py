"""GPT-OSS's MXFP4 experts (quantize/tensor_readers.py, ``MXFP4``): a safetensors ``X_blocks`` /
``X_scales`` pair is read as the one tensor ``X`` that transformers dequantizes it into and runs, value for
value against transformers' own ``convert_moe_packed_tensors``; its experts are then layers like those of
a bf16 GPT-OSS (tests/test_causal_lm_fused_experts.py). Before, the pair was listed as two integer tensors
and kept, most of the model, without a warning."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from sop.cli import main
from sop.quantize import artifact as A
from sop.quantize.checkpoint_files import CheckpointError
from sop.quantize.models import open_model
from sop.quantize.tensor_readers import MXFP4, SafetensorsReader

transformers = pytest.importorskip("transformers")

from test_causal_lm import SMALL, VOCAB, bpe_tokenizer  # noqa: E402

HIDDEN, INTER, EXPERTS = 64, 64, 4
GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"


def transformers_dequantized(blocks, scales) -> np.ndarray:
    """The oracle: what transformers makes of an MXFP4 pair to run it (float32 holds every value here)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()


def random_pair(rng, experts, out, groups):
    """Every byte of codes, and scales from 2^-27 to 2^23."""
    return (rng.integers(0, 256, (experts, out, groups, 16), dtype=np.uint8),
            rng.integers(100, 151, (experts, out, groups), dtype=np.uint8))


def test_an_mxfp4_pair_reads_as_the_tensor_transformers_dequantizes(tmp_path):
    rng = np.random.default_rng(7)
    blocks, scales = random_pair(rng, 3, 8, 2)
    odd = rng.integers(0, 256, (3, 8, 2, 16), dtype=np.uint8)        # no scales of its shape: no pair
    save_file({"m.experts.down_proj_blocks": torch.from_numpy(blocks),
               "m.experts.down_proj_scales": torch.from_numpy(scales),
               "m.other_blocks": torch.from_numpy(odd), "m.other_scales": torch.from_numpy(scales[:, :4].copy())},
              str(tmp_path / "m.safetensors"))
    reader = SafetensorsReader([tmp_path / "m.safetensors"])
    assert sorted(reader.names()) == ["m.experts.down_proj", "m.other_blocks", "m.other_scales"]
    assert reader.info("m.experts.down_proj") == ((3, 64, 8), MXFP4, True)
    assert reader.where["m.experts.down_proj_blocks"] == tmp_path / "m.safetensors"      # a shard index's names
    want = transformers_dequantized(blocks, scales)
    got = reader.get("m.experts.down_proj")
    assert got.dtype == np.float32 and np.array_equal(got, want)
    for e in range(3):
        assert np.array_equal(reader.get("m.experts.down_proj", e), want[e])
    assert len(np.unique(want)) > 150                                 # many codes times many scales
    src = open_model(str(tmp_path / "m.safetensors"))                 # a file alone, no config.json: its
    lay = src.layers[1]                                               # orientation is the pair's own
    assert (lay.name, lay.shape, lay.transposed) == ("m.experts.down_proj[1]", (8, 64), True)
    np.testing.assert_array_equal(src.load(lay.name), want[1].T)


def test_an_mxfp4_scale_of_255_is_refused_naming_the_tensor(tmp_path):
    blocks, scales = random_pair(np.random.default_rng(8), 2, 4, 1)
    scales[1, 2, 0] = 255                                             # E8M0's NaN
    save_file({"e.experts.w_blocks": torch.from_numpy(blocks), "e.experts.w_scales": torch.from_numpy(scales)},
              str(tmp_path / "m.safetensors"))
    reader = SafetensorsReader([tmp_path / "m.safetensors"])
    reader.get("e.experts.w", 0)
    with pytest.raises(CheckpointError, match=r"tensor e\.experts\.w: an MXFP4 scale is 255 \(E8M0's NaN\)"):
        reader.get("e.experts.w", 1)


@pytest.mark.parametrize("scales", ["none", "int8", "another shape", "a float tensor of the name"])
def test_codes_no_scales_pair_with_are_kept_saying_so(tmp_path, scales):
    """MXFP4 codes the reader pairs with no scales (none, I8 ones, another shape, or a float tensor already
    named as the pair would be) were left out as 'integer' tensors, their experts missing without a warning
    (an outside probe). Now a warning names them; with no layer left, the error does."""
    blocks, good = random_pair(np.random.default_rng(9), 2, 4, 1)
    tensors = {"e.experts.w_blocks": torch.from_numpy(blocks), "e.attn.q.weight": torch.ones(4, 32)}
    if scales == "int8":
        tensors["e.experts.w_scales"] = torch.from_numpy(good.astype(np.int8))
    elif scales == "another shape":
        tensors["e.experts.w_scales"] = torch.from_numpy(good[:1].copy())
    elif scales == "a float tensor of the name":
        tensors["e.experts.w_scales"], tensors["e.experts.w"] = torch.from_numpy(good), torch.ones(2, 32, 4)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    said = ("1 MXFP4 code tensor(s) (e.g. e.experts.w_blocks, U8 (2, 4, 1, 16)) are kept as they are: no scales pair "
            "with them (X_blocks needs X_scales, U8, of its shape without the last axis of 16 bytes, and no other "
            "tensor named X), so their values cannot be read")
    assert said in open_model(str(tmp_path / "m.safetensors")).notes
    with pytest.raises(ValueError, match=re.escape(f"no linear layer selected (1 candidates, check include/"
                                                   f"exclude): {said}")):
        open_model(str(tmp_path / "m.safetensors"), include=["nothing"])


def mxfp4_gpt_oss(path):
    """A tiny random GPT-OSS saved as released: its experts MXFP4 (random codes and scales), the rest float,
    ``quantization_config`` saying mxfp4. Returns the experts as transformers dequantizes them."""
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.gpt_oss import GptOssConfig

    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                       num_experts_per_tok=2, head_dim=16, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    rng, experts = np.random.default_rng(0), {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        n, d_in, d_out = tensors.pop(name).shape
        blocks, scales = random_pair(rng, n, d_out, d_in // 32)
        scales = 115 + scales % 10                                    # weights of 2^-13 to 0.75
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        experts[name] = transformers_dequantized(blocks, scales)
    from safetensors.numpy import save_file as save_numpy

    save_numpy(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return experts


def test_gpt_oss_mxfp4_experts_are_quantized_calibrated_and_exported(tmp_path, capsys):
    """Each expert of the MXFP4 tensors is a layer, (out, in) of the tensor transformers runs; calibration
    finds it in the model transformers dequantizes (the value check of causal_lm's ``_stack_slots``), the
    decoded file and the exported folder hold each fused tensor again, float, and the folder loads without
    the MXFP4 configuration."""
    from transformers.models.auto import AutoModelForCausalLM

    folder = tmp_path / "gpt-oss"
    experts = mxfp4_gpt_oss(folder)
    src = open_model(str(folder))
    stacked = [lay for lay in src.layers if lay.stack]
    assert len(stacked) == 2 * 2 * EXPERTS and all(lay.dtype == MXFP4 and lay.transposed for lay in stacked)
    assert not [n for n in src.skipped if n.endswith(("_blocks", "_scales"))]
    assert src.notes == [f"{len(stacked)} of the {len(src.layers)} selected layers are MXFP4 in the checkpoint "
                         f"(4.25 bits per weight: E2M1 values, an E8M0 scale per 32); they are read as their exact "
                         f"values, which are the reference, and a format of more bits per weight makes them no "
                         f"smaller"]
    for lay in stacked:
        np.testing.assert_array_equal(src.load(lay.name), experts[lay.tensor][lay.stack[1]].T.astype(np.float64))
    q, out = tmp_path / "m.sopq", tmp_path / "folder"
    assert main(["quantize", str(folder), "--format", "sop4-g16", *SMALL[:4], "--out", str(q),
                 "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    art = A.open_artifact(q)
    assert sum(1 for e in art.layers if e.stack) == len(stacked)
    assert main(["dequantize", str(q), "--out", str(tmp_path / "dq.safetensors"), "--quiet"]) == 0
    assert main(["dequantize", str(q), "--model-folder", "--out", str(out), "--quiet"]) == 0
    decoded, exported = load_file(str(tmp_path / "dq.safetensors")), load_file(str(out / "model.safetensors"))
    for name, want in experts.items():
        assert decoded[name].shape == want.shape and not np.array_equal(decoded[name], want)
        np.testing.assert_array_equal(exported[name], decoded[name], err_msg=name)
        for e in range(EXPERTS):
            np.testing.assert_array_equal(decoded[name][e], art.weights(art.entry(f"{name}[{e}]")).T)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    held = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(held, decoded[GATE_UP.format(i=1)])


def test_a_gpt_oss_folder_with_codes_no_scales_pair_with_has_no_forward_pass(tmp_path, capsys):
    """transformers cannot build the model from MXFP4 codes without their scales: calibration ended in its
    'RuntimeError: We encountered some issues during automatic conversion of the weights. For details look
    at the `CONVERSION` entries of the above report!', a report sop hides. Now the folder has no forward
    pass, saying why, and quantizes unweighted as any such checkpoint does."""
    from safetensors.numpy import save_file as save_numpy

    folder = tmp_path / "gpt-oss"
    mxfp4_gpt_oss(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_numpy(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    why = ("MXFP4 codes with no scales to pair with (model.layers.1.mlp.experts.down_proj_blocks): transformers "
           "cannot build the model from them")
    src = open_model(str(folder))
    assert (src.forward, src.forward_note) == (None, why)
    assert main(["quantize", str(folder), "--format", "sop4-g16", *SMALL[:4], "--out", str(tmp_path / "m.sopq"),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert f"calibration: no forward pass for this model ({why}); errors are unweighted (a = 1)\n" in \
        capsys.readouterr().err


def test_an_mxfp4_value_past_float32_is_one_line_with_calibration_too(tmp_path, capsys):
    """A scale of 254 puts 6 x 2^127 past float32: the quantizer refuses the expert (its outputs are float32 and
    BF16). With calibration, the value check of the expert in transformers' float32 model printed numpy's
    'RuntimeWarning: overflow encountered in cast' and its source line first (an error under the suite's
    warnings). Now the one line, with or without calibration."""
    from safetensors.numpy import save_file as save_numpy

    folder = tmp_path / "gpt-oss"
    mxfp4_gpt_oss(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.down_proj_scales"][0, 0, 0] = 254
    save_numpy(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for calib in ([*SMALL[:4], "--cache-dir", str(tmp_path / "c")], ["--no-calib"]):
        assert main(["quantize", str(folder), "--format", "sop4-g16", *calib, "--out", str(tmp_path / "m.sopq"),
                     "--quiet"]) == 2
        err = capsys.readouterr().err.splitlines()
        layer = "model.layers.1.mlp.experts.down_proj[0]"
        assert err[-1].startswith(f"sop: error: {folder / 'model.safetensors'}: {layer}: weight ")
        assert "is beyond float32's range" in err[-1]
        assert all(line.startswith("warning: ") for line in err[:-1]), err
    assert not (tmp_path / "m.sopq").exists()


def test_in_memory_experts_packed_by_the_mxfp4_kernels_are_kept_saying_why():
    """A GPT-OSS held on transformers' MXFP4 kernels (``Mxfp4GptOssExperts``: uint8 codes, no values): its
    experts are kept, saying what they are and how to load them as values (the reason said the module did not
    say how it stores them, and that on disk they are refused)."""
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts
    from transformers.models.auto import AutoModelForCausalLM
    from transformers.models.gpt_oss import GptOssConfig

    from sop.quantize.in_memory import quantize_module

    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2,
                       head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    model.model.layers[0].mlp.experts = Mxfp4GptOssExperts(cfg)
    res = quantize_module(model, "sop4-g16")
    assert not [n for n in res.layers if "experts" in n]
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert res.kept[name] == (
            "fused MoE experts of Mxfp4GptOssExperts, packed as uint8 codes (MXFP4 as transformers' kernels hold "
            "them): kept; a model loaded dequantized (on the CPU, or with Mxfp4Config(dequantize=True)) has them "
            "as values, and on disk they are quantized")
