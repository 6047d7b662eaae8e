"""A ``.sopq`` written from a model held in memory (``quantize_module(..., out=path)``): the records, bits,
choices and error summary of the checkpoint path's file for the same model saved (``artifact.quantize_model``),
only the header's source and calibration differing; the file written before the model, so that a refused
or failed write leaves both as they were."""

import json
import shutil

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
from test_causal_lm_moe import make_moe  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    out = {arch: make_folder(base / arch, arch, bpe_tokenizer()) for arch in ("qwen2", "gpt2", "neox")}
    out["mixtral"] = make_moe(base / "mixtral", "mixtral")
    return out


def same_records(a, b) -> None:
    """Every layer's entry, under the same name and in the same order, record byte for byte, and the
    summary."""
    assert [e.name for e in a.layers] == [e.name for e in b.layers]
    for x, y in zip(a.layers, b.layers):
        assert (x.shape, x.padded_shape, x.transposed, x.kind, x.bits, x.choice, x.crc32) == \
               (y.shape, y.padded_shape, y.transposed, y.kind, y.bits, y.choice, y.crc32), x.name
        assert bytes(a.record(x)) == bytes(b.record(y)), x.name
    assert a.meta["summary"] == b.meta["summary"] and a.meta["format"] == b.meta["format"]


@pytest.mark.parametrize(("arch", "fmt", "head"), [("qwen2", "sop4-g16", False), ("qwen2", "nf4-g64", False),
                                                   ("gpt2", "e2m3-ue4m4-g16", False), ("qwen2", "sop-budget", False),
                                                   ("mixtral", "sop4-g16", False), ("mixtral", "sop-budget", False),
                                                   ("neox", "nf4-g64", True)])
def test_the_file_holds_the_checkpoint_paths_records(folders, tmp_path, arch, fmt, head):
    """Mixtral's layers are named on disk after ``block_sparse_moe`` (``mlp`` in the running model), its
    experts after their own tensors, in the records and in the sop-budget report (an outside probe: the
    report named them as the running model does); GPT-NeoX's head is ``embed_out`` on disk (``lm_head``
    running)."""
    budget = {"budget": 5.0} if fmt == "sop-budget" else {}
    quantize_model(str(folders[arch]), fmt, tmp_path / "disk.sopq", calibrate=False, progress=False, lm_head=head,
                   **budget)
    model = reference_model(folders[arch])
    res = quantize_module(model, fmt, out=tmp_path / "mem.sopq", lm_head=head, **budget)
    disk, mem = open_artifact(tmp_path / "disk.sopq"), open_artifact(tmp_path / "mem.sopq")
    same_records(mem, disk)
    assert mem.meta.get("budget_report") == disk.meta.get("budget_report")
    if arch == "mixtral" and fmt == "sop-budget":     # the report names promoted layers, so renamed ones
        assert "block_sparse_moe" in mem.meta["budget_report"]
    assert mem.meta["model"]["kind"] == "in-memory" and mem.meta["model"]["spec"] == ""
    assert mem.meta["model"]["fingerprint"] == "" and mem.meta["calibration"]["weighted"] is False
    assert mem.meta["model"]["files"] == [str(f) for f in sorted(folders[arch].iterdir())]
    assert len(res.layers) == len(mem.layers)
    renamed = {"mixtral": ("block_sparse_moe", "mlp"), "neox": ("embed_out", "lm_head")}.get(arch, ("", ""))
    assert sorted(res.layers) == sorted(e.name.replace(*renamed) for e in mem.layers)
    if arch == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in [e.name for e in mem.layers]
    params = dict(model.named_parameters())
    for e in mem.layers if arch != "mixtral" else ():   # the model holds what the file decodes to
        w = params[e.name.replace(*renamed)].detach().numpy()
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
    with pytest.raises(OutputError, match=r"quantize_module\(\) writes a \.sopq artifact, .* read as a \.safetensors "
                                          r"checkpoint; name it .*m\.sopq$"):
        quantize_module(model, "sop4-g16", out=tmp_path / "m.safetensors")
    assert unchanged() and not (tmp_path / "m.safetensors").exists()
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
    assert header["model"]["files"] == [str(f) for f in sorted(folders["qwen2"].iterdir())]
    assert header["model"]["aux_files"] == {}


def test_no_output_replaces_a_file_the_model_was_loaded_from(folders, tmp_path, capsys):
    """An outside probe: ``out=`` the model's own model.safetensors turned the checkpoint into a .sopq,
    and ``sop dequantize`` of a file from memory wrote over the checkpoint's weights (no source recorded).
    The files of transformers' ``name_or_path`` are inputs now, and the file records them."""
    ckpt = folders["qwen2"] / "model.safetensors"
    before = ckpt.read_bytes()
    model = reference_model(folders["qwen2"])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(OutputError, match="the output is the input .*model.safetensors; refusing to overwrite"):
        quantize_module(model, "sop4-g16", out=ckpt)
    assert ckpt.read_bytes() == before and all(torch.equal(params[n], p) for n, p in model.named_parameters())
    quantize_module(model, "sop4-g16", out=tmp_path / "m.sopq")
    assert main(["dequantize", str(tmp_path / "m.sopq"), "--out", str(ckpt)]) == 2
    assert "refusing to overwrite an input" in capsys.readouterr().err and ckpt.read_bytes() == before
    for bad in (b"/tmp/m.sopq", 3):
        with pytest.raises(ValueError, match="out is the .sopq file's path"):
            quantize_module(reference_model(folders["qwen2"]), "sop4-g16", out=bad)


def test_the_files_are_recorded_absolute_so_dequantize_elsewhere_knows_them(folders, tmp_path, capsys, monkeypatch):
    """A model loaded from a relative path (``from_pretrained("m")``) was recorded as ``m/...``: `sop
    dequantize` run from another folder found no such file and wrote over the checkpoint (an outside
    probe; the file records no fingerprint to find it by its contents)."""
    shutil.copytree(folders["qwen2"], tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    quantize_module(reference_model("m"), "sop4-g16", out="q.sopq")
    assert open_artifact("q.sopq").meta["model"]["files"] == [str(f) for f in sorted((tmp_path / "m").iterdir())]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert main(["dequantize", "../q.sopq", "--out", "../m/model.safetensors", "--quiet"]) == 2
    assert "refusing to overwrite an input" in capsys.readouterr().err
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_a_second_file_into_the_models_own_folder_replaces_the_first(tmp_path):
    """An outside probe: every file of the model's folder was an input, the .sopq written there before
    too, so a second run into it was refused as 'the input'. A .sopq is no model's input (models.folder_inputs),
    and the header lists only the model's files."""
    folder = make_folder(tmp_path / "qwen2", "qwen2", bpe_tokenizer())
    model_files = [str(f) for f in sorted(folder.iterdir())]
    for fmt in ("sop4-g16", "nf4-g64"):
        quantize_module(reference_model(folder), fmt, out=folder / "q.sopq")
        art = open_artifact(folder / "q.sopq")
        assert art.format == fmt and art.meta["model"]["files"] == model_files


def test_a_model_folder_from_a_file_made_in_memory_says_nothing_checks_its_model(folders, tmp_path, capsys):
    """No fingerprint to check ``--model`` against: the export says so (it said that files 'sop quantize read'
    had changed: no sop quantize ran), and with the model's own folder gives the model held in memory."""
    model = reference_model(folders["qwen2"])
    quantize_module(model, "sop4-g16", out=tmp_path / "m.sopq")
    out = tmp_path / "folder"
    assert main(["dequantize", str(tmp_path / "m.sopq"), "--model-folder", "--model", str(folders["qwen2"]),
                 "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "was quantized from a model held in memory (Qwen2ForCausalLM): nothing checks that" in err
    assert "differ from those sop quantize read" not in err
    exported = reference_model(out)
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(exported.named_parameters())[n]), n


def test_an_interrupt_while_the_model_is_written_lands_after_the_last_parameter(folders, monkeypatch):
    """An outside probe: an interrupt during the write-back left 4 of 14 parameters quantized. Signals are
    held while the parameters are written: a SIGINT sent in the middle arrives after the last one."""
    import os
    import signal
    import threading

    model = reference_model(folders["qwen2"])
    calls = {"n": 0}
    real = torch.Tensor.is_inference

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are the main thread's")
    monkeypatch.setattr(torch.Tensor, "is_inference", interrupting)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Python's own Ctrl-C handler (a pytest-xdist worker ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize_module(model, "sop4-g16")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert calls["n"] == 14
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) == 14 and all(n.endswith("proj.weight") for n in changed)
