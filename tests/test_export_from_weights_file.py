"""A causal LM's weights file quantized alone (`sop quantize M/model.safetensors`: no forward pass), then
exported with its folder (`sop dequantize --model-folder --model M`, docs/quantizer.md): the refusal without
`--model`, the one warning with it, and the export checked against the artifact's golden decode, read from
the `.sopq` bytes here. The tiny random Llama of tests/test_causal_lm.py."""

import json
import struct

import numpy as np
import pytest

from sop.cli import main
from sop.golden.decoder import decode_layer
from sop.golden.layout import unpack_layer

pytest.importorskip("transformers")

from test_causal_lm import bpe_tokenizer, make_folder, one_error  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("export") / "llama", "llama", bpe_tokenizer())


def golden_layers(sopq) -> dict[str, np.ndarray]:
    """Each layer of a .sopq read from its bytes (the container's header, the records' offsets) and decoded by
    golden/ alone, rounded once to float32 (the export's rule)."""
    raw = sopq.read_bytes()
    size = struct.unpack("<I", raw[8:12])[0]
    meta, base = json.loads(raw[12:12 + size]), 16 + size
    out = {}
    for e in meta["layers"]:
        rows, cols = e["shape"]
        record = raw[base + e["offset"]: base + e["offset"] + e["length"]]
        out[e["name"]] = decode_layer(unpack_layer(record), "exact")[:rows, :cols].astype(np.float32)
    return out


def test_a_weights_file_quantized_alone_exports_with_its_folder(folder, tmp_path, capsys):
    """`sop quantize M/model.safetensors` (no forward pass: unweighted) then `--model-folder`: the refusal said
    "give its folder" with no word of how (`--model`); given it, every file beside the weights was warned of
    as "(new)", as if changed since quantizing, where sop quantize read none. Now the refusal names
    `--model M`, the warning says the artifact records none, and the folder holds the golden decode."""
    art, out = tmp_path / "q.sopq", tmp_path / "f"
    assert main(["quantize", str(folder / "model.safetensors"), "--format", "sop4-g16", "--out", str(art),
                 "--quiet"]) == 0
    capsys.readouterr()
    err = one_error(capsys, ["dequantize", str(art), "--model-folder", "--out", str(out)])
    assert err == (f"sop: error: {folder / 'model.safetensors'}: --model-folder needs a causal LM that transformers "
                   f"runs (a weights file alone: give its folder with --model {folder})")
    assert not out.exists()
    assert main(["dequantize", str(art), "--model-folder", "--model", str(folder), "--out", str(out),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "(new)" not in err
    assert err.splitlines() == [
        f"warning: {art} records no configuration or tokenizer file (sop quantize read none: it was given the "
        f"weights alone, and quantized without them); the folder is exported with those of {folder}: config.json, "
        f"generation_config.json, tokenizer.json, tokenizer_config.json"]
    from safetensors.numpy import load_file

    exported = load_file(str(out / "model.safetensors"))
    layers = golden_layers(art)
    assert len(layers) == 14
    for name, want in layers.items():
        assert np.array_equal(exported[name].view(np.uint32), want.view(np.uint32)), name


def test_export_model_folder_names_its_model_keyword(folder, tmp_path):
    """From Python the remedy is the keyword, `model='M'`, not the command line's flag."""
    from sop.quantize.artifact import quantize_model
    from sop.quantize.hf_export import export_model_folder

    art = tmp_path / "q.sopq"
    quantize_model(str(folder / "model.safetensors"), "nf4-g64", art, progress=False)
    with pytest.raises(ValueError) as e:
        export_model_folder(art, tmp_path / "f", progress=False)
    assert str(e.value).endswith(f"(a weights file alone: give its folder with model={str(folder)!r})")
