"""A ``.sopq`` written from a model held in memory (``quantize_module(..., out=path)``): the records, bits,
choices and error summary of the checkpoint path's file for the same model saved (``artifact.quantize_model``),
only the header's source and calibration differing; the file written before the model, so that a refused
or failed write leaves both as they were."""

import json

import numpy as np
import pytest
import torch

from sop.cli import main
from sop.golden.files import OutputError
from sop.quantize import causal_lm as L
from sop.quantize.artifact import open_artifact, quantize_model
from sop.quantize.in_memory import quantize_module

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from test_causal_lm import bpe_tokenizer, make_folder, reference_model  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    return {arch: make_folder(base / arch, arch, bpe_tokenizer()) for arch in ("qwen2", "gpt2")}


def same_records(a, b) -> None:
    """Every layer's entry and record byte for byte (the file from memory in the model's module order, the
    checkpoint's in its tensors' order), and the summary."""
    assert sorted(e.name for e in a.layers) == sorted(e.name for e in b.layers)
    for x in a.layers:
        y = b.entry(x.name)
        assert (x.shape, x.padded_shape, x.transposed, x.kind, x.bits, x.choice, x.crc32) == \
               (y.shape, y.padded_shape, y.transposed, y.kind, y.bits, y.choice, y.crc32), x.name
        assert bytes(a.record(x)) == bytes(b.record(y)), x.name
    sa, sb = a.meta["summary"], b.meta["summary"]
    assert (sa["bits"], sa["weights"]) == (sb["bits"], sb["weights"]) and a.meta["format"] == b.meta["format"]
    # the same layers' error sums added in another order: equal to the last bits of a float64
    assert sa == pytest.approx(sb, rel=1e-13, abs=0)


@pytest.mark.parametrize(("arch", "fmt"), [("qwen2", "sop4-g16"), ("qwen2", "nf4-g64"), ("gpt2", "e2m3-ue4m4-g16"),
                                           ("qwen2", "sop-budget")])
def test_the_file_holds_the_checkpoint_paths_records(folders, tmp_path, arch, fmt):
    budget = {"budget": 5.0} if fmt == "sop-budget" else {}
    quantize_model(str(folders[arch]), fmt, tmp_path / "disk.sopq", calibrate=False, progress=False, **budget)
    model = reference_model(folders[arch])
    res = quantize_module(model, fmt, out=tmp_path / "mem.sopq", **budget)
    disk, mem = open_artifact(tmp_path / "disk.sopq"), open_artifact(tmp_path / "mem.sopq")
    same_records(mem, disk)
    assert mem.meta.get("budget_report") == disk.meta.get("budget_report")
    assert mem.meta["model"]["kind"] == "in-memory" and mem.meta["model"]["spec"] == ""
    assert mem.meta["model"]["fingerprint"] == "" and mem.meta["calibration"]["weighted"] is False
    assert sorted(res.layers) == sorted(e.name for e in mem.layers)
    params = dict(model.named_parameters())
    for e in mem.layers:                            # the model holds what the file decodes to
        w = params[e.name].detach().numpy()
        assert np.array_equal(w.T if e.transposed else w, mem.weights(e)), e.name
    assert [e.transposed for e in mem.layers] == [arch == "gpt2"] * len(mem.layers)
    assert main(["dequantize", str(tmp_path / "mem.sopq"), "--out", str(tmp_path / "dq.safetensors"), "--quiet"]) == 0


def test_a_calibrated_file_records_the_batches_tokens(folders, tmp_path):
    model = reference_model(folders["qwen2"])
    ids = torch.randint(2, 64, (2, 16))
    res = quantize_module(model, "sop4-g16", [{"input_ids": ids}], out=tmp_path / "m.sopq")
    cal = open_artifact(tmp_path / "m.sopq").meta["calibration"]
    assert cal["weighted"] is True and cal["tokens"] == res.tokens == 32 and "unreached" not in cal


def test_a_refused_or_failed_write_leaves_the_model_and_the_target_as_they_were(folders, tmp_path, capsys,
                                                                                 monkeypatch):
    model = reference_model(folders["qwen2"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def unchanged():
        return all(torch.equal(before[n], p) for n, p in model.named_parameters())

    (tmp_path / "dir.sopq").mkdir()
    with pytest.raises(OutputError, match="dir.sopq"):
        quantize_module(model, "sop4-g16", out=tmp_path / "dir.sopq")
    assert unchanged()
    target = tmp_path / "old.sopq"
    target.write_bytes(b"the user's file")
    with torch.no_grad():                           # float16 cannot hold E4M3's 256 x 256 = 65536
        model.half().model.layers[0].mlp.down_proj.weight[0, 0] = 65504.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="down_proj.weight: its reconstruction does not fit"):
        quantize_module(model, "fp8-e4m3-pot", out=target)
    assert unchanged() and target.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.sopq", "old.sopq"]     # no temporary file left
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 0.5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def full(*_a):
        raise OSError(28, "No space left on device")

    from sop.quantize import artifact
    with monkeypatch.context() as m:                # the container fails after every layer was quantized
        m.setattr(artifact, "write_container", full)
        with pytest.raises(OutputError, match="No space left on device; nothing was written"):
            quantize_module(model, "sop4-g16", out=target)
    assert unchanged() and target.read_bytes() == b"the user's file"
    quantize_module(model, "sop4-g16", out=target)
    assert open_artifact(target).meta["model"]["class"] == "Qwen2ForCausalLM" and not unchanged()
    # no source recorded: exporting a model folder asks for it
    assert main(["dequantize", str(target), "--model-folder", "--out", str(tmp_path / "f")]) == 2
    assert "the artifact names no source model; give --model" in capsys.readouterr().err
    header = json.loads(target.read_bytes()[12:12 + int.from_bytes(target.read_bytes()[8:12], "little")])
    assert header["model"]["files"] == [] and header["model"]["aux_files"] == {}
