"""FP8 checkpoints with scale tensors (quantize/fp8_scales.py): a layer stored in FP8 beside its
``weight_scale_inv`` (blocks) or ``weight_scale`` (tensor, row, column groups) is read as their product,
checked against torch's own broadcast; a checkpoint with power-of-two scales quantizes, calibrates and
evaluates exactly as the float32 checkpoint of the same weights; a scale that cannot be placed is one
error line, never the unscaled values."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sop.cli import main
from sop.quantize import fp8_scales
from sop.quantize.models import open_model

NAME = "model.layers.0.mlp.down_proj.weight"


def fp8_and_scale(w: torch.Tensor, block, pow2=False):
    """``w`` as FP8 values and a float32 scale per ``block`` (rows, cols), torch's computation."""
    R, C = w.shape
    b0, b1 = block
    pad = torch.zeros(-(-R // b0) * b0, -(-C // b1) * b1)
    pad[:R, :C] = w
    s = pad.reshape(pad.shape[0] // b0, b0, pad.shape[1] // b1, b1).abs().amax(dim=(1, 3)) / 448
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    full = s.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:R, :C]
    return (w / full).to(torch.float8_e4m3fn), s.float(), full


@pytest.mark.parametrize("block,suffix,shape", [
    ((128, 128), "_scale_inv", None), ((300, 200), "_scale", ()), ((300, 200), "_scale", (1,)),
    ((1, 200), "_scale", (300, 1)), ((1, 200), "_scale", (300,)), ((1, 50), "_scale", None)])
def test_an_fp8_layer_reads_as_its_values_times_its_scale(tmp_path, block, suffix, shape):
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.02                 # ragged against 128 x 128 blocks
    q, s, full = fp8_and_scale(w, block)
    if shape is not None:
        s = s.reshape(shape)
    save_file({NAME: q, NAME + suffix: s, "model.layers.0.mlp.down_proj.input_scale": torch.ones(())},
              str(tmp_path / "m.safetensors"))
    src = open_model(str(tmp_path / "m.safetensors"))
    want = q.double() * full.double()
    np.testing.assert_array_equal(src.load(NAME), want.numpy())
    assert src.layer(NAME).scale == fp8_scales.Fp8Scale(NAME + suffix, block)
    assert "1 FP8 scale (applied to its layer)" in src.kept_line()


@pytest.mark.parametrize("shape, block", [((64, 96), 32), ((192, 192), 96)])
def test_the_block_comes_from_config_json(tmp_path, shape, block):
    """The folder's config.json, or the one beside the weights file given alone: a 192 x 192 layer in
    blocks of 96 has a 2 x 2 scale, as 128 x 128 blocks would, and given alone (no tokenizer beside it) the
    config was not read and the default block applied, wrong weights without a word (an outside review)."""
    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.1
    q, s, full = fp8_and_scale(w, (block, block))
    save_file({NAME: q, NAME + "_scale_inv": s}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [block, block]}}))
    for spec in (tmp_path, tmp_path / "model.safetensors"):
        np.testing.assert_array_equal(open_model(str(spec)).load(NAME), (q.double() * full.double()).numpy())


@pytest.mark.parametrize("extra,why", [
    ({NAME + "_scale_inv": torch.ones(3, 1)}, "of shape (3, 1), which spreads over its 64 x 96 weights in no way"),
    ({NAME + "_scale": torch.ones(()), NAME + "_scale_inv": torch.ones(1, 1)}, "beside scale tensors this reader "
                                                                                "does not apply"),
    ({"model.layers.0.mlp.down_proj.qscale_weight": torch.ones(())}, "beside scale tensors this reader does not "
                                                                     "apply (model.layers.0.mlp.down_proj.qscale")])
def test_a_scale_that_cannot_be_placed_is_one_line(tmp_path, capsys, extra, why):
    q = (torch.randn(64, 96)).to(torch.float8_e4m3fn)
    save_file({NAME: q, **extra}, str(tmp_path / "m.safetensors"))
    assert main(["quantize", str(tmp_path / "m.safetensors"), "--format", "nf4-g64", "--out",
                 str(tmp_path / "o.sopq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sop: error: ") and why in err[0] and NAME in err[0]
    assert err[0].endswith("; --exclude it") and not (tmp_path / "o.sopq").exists()
    # from Python the parameter (it said `--exclude it`, an option a Python caller has not got)
    with pytest.raises(ValueError, match=rf"{re.escape(why)}.*; exclude= it$"):
        open_model(str(tmp_path / "m.safetensors"))


def test_e8m0_bytes_are_powers_of_two_and_other_types_are_refused(tmp_path, capsys):
    """MXFP8's scales as unsigned bytes of E8M0 exponents: 2 ** (byte - 127) (they were multiplied in as the
    byte itself); 255 (NaN), a NaN float scale and an integer scale are one line each."""
    torch.manual_seed(2)
    q = (torch.randn(256, 256) * 100).to(torch.float8_e4m3fn)
    e = torch.tensor([[119, 120], [127, 130]], dtype=torch.uint8)
    save_file({NAME: q, NAME + "_scale_inv": e}, str(tmp_path / "m.safetensors"))
    src = open_model(str(tmp_path / "m.safetensors"))
    full = torch.exp2(e.double() - 127).repeat_interleave(128, 0).repeat_interleave(128, 1)
    np.testing.assert_array_equal(src.load(NAME), (q.double() * full).numpy())
    bad = {"e8m0 NaN": e.clone().fill_(255), "float NaN": torch.tensor([[1.0, float("nan")], [1.0, 1.0]]),
           "integer": e.to(torch.int32)}
    for what, scale in bad.items():
        save_file({NAME: q, NAME + "_scale_inv": scale}, str(tmp_path / "b.safetensors"))
        assert main(["quantize", str(tmp_path / "b.safetensors"), "--format", "nf4-g64", "--out",
                     str(tmp_path / "o.sopq"), "--quiet"]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("sop: error: ") and NAME + "_scale_inv" in err, (what, err)
        assert ("of type I32, which this reader does not apply" if what == "integer" else "holds nan") in err
        assert err.endswith("; --exclude it") and not (tmp_path / "o.sopq").exists()
        with pytest.raises(ValueError, match=r"(does not apply|holds nan).*; exclude= it$"):     # Python's name
            open_model(str(tmp_path / "b.safetensors")).load(NAME)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float8_e8m0fnu])
def test_e8m0_scales_in_a_torch_checkpoint_are_read_as_in_safetensors(tmp_path, dtype):
    """A torch checkpoint's E8M0 scale (bytes or float8_e8m0fnu) was refused as a layer of a dtype not read,
    where the same tensors in safetensors were applied (an outside review)."""
    torch.manual_seed(2)
    q = (torch.randn(256, 256) * 100).to(torch.float8_e4m3fn)
    e = torch.tensor([[119, 120], [127, 130]], dtype=torch.uint8)
    scale = e if dtype == torch.uint8 else torch.exp2(e.float() - 127).to(dtype)
    torch.save({NAME: q, NAME + "_scale_inv": scale}, tmp_path / "m.pt")
    full = torch.exp2(e.double() - 127).repeat_interleave(128, 0).repeat_interleave(128, 1)
    np.testing.assert_array_equal(open_model(str(tmp_path / "m.pt")).load(NAME), (q.double() * full).numpy())


def test_a_plain_fp8_layer_without_a_scale_reads_as_its_values(tmp_path):
    q = (torch.randn(16, 32)).to(torch.float8_e4m3fn)
    save_file({NAME: q}, str(tmp_path / "m.safetensors"))
    src = open_model(str(tmp_path / "m.safetensors"))
    assert src.layer(NAME).scale is None
    np.testing.assert_array_equal(src.load(NAME), q.double().numpy())


def test_an_fp8_model_quantizes_calibrates_and_evaluates_as_its_float32_weights(tmp_path, capsys):
    """Power-of-two block scales, so that each product is a float32: the FP8 folder (config with transformers'
    fp8 quantization_config, which transformers dequantizes to run on the CPU) and the float32 folder of the
    same weights give the same reconstructions and the same end-to-end figures."""
    from test_causal_lm import SMALL

    f32, fp8_dir = fp8_folder(tmp_path, (16, 16), pow2=True)
    figures = []
    for d in (f32, fp8_dir):
        assert main(["eval", str(d), "--format", "e2m3-ue4m4-g16", "--format", "sop4-g16", *SMALL,
                     "--cache-dir", str(tmp_path / "c"), "--json", str(tmp_path / f"{d.name}.json")]) == 0
        assert main(["quantize", str(d), "--format", "sop4-g16", *SMALL[:4], "--cache-dir", str(tmp_path / "c"),
                     "--out", str(tmp_path / f"{d.name}.sopq"), "--quiet"]) == 0
        assert main(["dequantize", str(tmp_path / f"{d.name}.sopq"), "--out", str(tmp_path / f"{d.name}.safetensors"),
                     "--quiet"]) == 0
        res = json.loads((tmp_path / f"{d.name}.json").read_text())["formats"]
        figures.append([(f, r["sqnr_db"], r["e2e"]["kld"], r["e2e"]["ppl"]) for f, r in res.items()])
    capsys.readouterr()
    assert figures[0] == figures[1]
    a, b = load_file(str(tmp_path / "f32.safetensors")), load_file(str(tmp_path / "fp8.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def to_fp8(f32, fp8_dir, block, pow2, fp8_name):
    """A copy of model folder ``f32`` into ``fp8_dir`` whose 2-D tensors ``fp8_name`` picks are FP8 under
    block scales (transformers' ``fp8`` quantization config), and ``f32`` rewritten to the float32 weights
    those stand for (each product rounded to float32 once)."""
    import shutil

    shutil.copytree(f32, fp8_dir)
    sd, out = load_file(str(f32 / "model.safetensors")), {}
    for k, v in sd.items():
        if v.dim() == 2 and fp8_name(k):
            q, s, full = fp8_and_scale(v, block, pow2=pow2)
            out[k], out[k + "_scale_inv"] = q, s
            sd[k] = (q.double() * full.double()).float().contiguous()
        else:
            out[k] = v
    save_file(sd, str(f32 / "model.safetensors"), metadata={"format": "pt"})
    save_file(out, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((f32 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block),
                                  "activation_scheme": "dynamic"}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return f32, fp8_dir


def fp8_folder(tmp_path, block, pow2):
    """The tiny Llama of tests/test_causal_lm.py with every projection in FP8 (``to_fp8``)."""
    from test_causal_lm import bpe_tokenizer, make_folder

    f32 = make_folder(tmp_path / "f32", "llama", bpe_tokenizer())
    return to_fp8(f32, tmp_path / "fp8", block, pow2, lambda k: k.endswith("proj.weight"))


def test_the_forward_pass_runs_the_weights_the_quantizer_reads_or_is_refused(tmp_path, capsys):
    """Blocks of 16 divide every matrix: transformers' dequantized model holds exactly the products the
    quantizer reads (rounded to float32). Blocks of 32 leave the 48 x 32 gate_proj a grid of 2 x 1, which
    transformers reads as blocks of 24 rows: refused in one line, where --no-calib quantizes it."""
    from sop.quantize import causal_lm as L

    f32, fp8_dir = fp8_folder(tmp_path / "a", (16, 16), pow2=False)
    runner = L.load(open_model(str(fp8_dir)))
    ref = L.load(open_model(str(f32)))
    for t in runner.targets.values():
        assert torch.equal(runner.modules[t.module].weight, ref.modules[t.module].weight), t.name
    _, ragged = fp8_folder(tmp_path / "b", (32, 32), pow2=False)
    args = ["quantize", str(ragged), "--format", "e2m3-ue4m4-g16", "--calib-seqs", "2", "--seq-len", "16",
            "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r.sopq"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sop: error: ") and err[-1].endswith(
        "transformers runs the FP8 layer model.layers.0.mlp.gate_proj.weight with other weights than its values "
        "times its scale model.layers.0.mlp.gate_proj.weight_scale_inv in blocks of 32 x 32: the forward pass "
        "would not run this checkpoint's model; " + L.HINT)
    assert main([*args, "--no-calib"]) == 0


def test_excluded_fp8_experts_transformers_runs_otherwise_are_refused_too(tmp_path, capsys):
    """Blocks of 32 leave a Mixtral expert's 48 x 32 w1 a ragged grid, which transformers dequantizes otherwise:
    found nowhere by its values, the expert was no target, and with the experts excluded (as the refusal of
    the selected ones advised) the reference model ran weights that are not the checkpoint's, silently."""
    from sop.quantize import causal_lm as L
    from test_causal_lm_moe import make_moe

    _, fp8_dir = to_fp8(make_moe(tmp_path / "f32", "mixtral"), tmp_path / "fp8", (32, 32), False,
                        lambda k: ".experts." in k)
    args = ["quantize", str(fp8_dir), "--format", "e2m3-ue4m4-g16", "--exclude", "*.experts.*", "--calib-seqs", "2",
            "--seq-len", "16", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r.sopq"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sop: error: ") and err[0].endswith(
        "transformers runs the FP8 layer model.layers.0.block_sparse_moe.experts.0.w1.weight with other weights "
        "than its values times its scale model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv in blocks "
        "of 32 x 32: the forward pass would not run this checkpoint's model; " + L.HINT)
    assert not (tmp_path / "r.sopq").exists()
    selected = [a for a in args if a not in ("--exclude", "*.experts.*")]
    assert main(selected) == 2                    # selected, the same remedy (was: "--exclude it")
    assert capsys.readouterr().err.strip().splitlines() == err
    assert main([*args, "--no-calib"]) == 0


def test_an_fp8_moe_model_calibrates_as_its_float32_weights(tmp_path, capsys):
    """A Mixtral whose projections and per-expert matrices are FP8 under power-of-two block scales:
    transformers dequantizes the experts into its fused parameters, each found there by its values times
    its scale; the eval figures are those of the float32 folder of the same weights."""
    from test_causal_lm import SMALL
    from test_causal_lm_moe import make_moe

    f32, fp8_dir = to_fp8(make_moe(tmp_path / "f32", "mixtral"), tmp_path / "fp8", (16, 16), True,
                          lambda k: "proj" in k or ".experts." in k)
    figures = []
    for d in (f32, fp8_dir):
        assert main(["eval", str(d), "--format", "sop4-g16", *SMALL, "--cache-dir", str(tmp_path / "c"),
                     "--json", str(tmp_path / f"{d.name}.json"), "--quiet"]) == 0
        res = json.loads((tmp_path / f"{d.name}.json").read_text())["formats"]["sop4-g16"]
        figures.append((res["sqnr_db"], res["e2e"]["kld"], res["e2e"]["ppl"], res["e2e"]["top1"]))
    capsys.readouterr()
    assert figures[0] == figures[1]
