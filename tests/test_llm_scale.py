"""Large models (issue 13, section 5) at test size: a sharded bf16 folder of safetensors with an
index and no config.json is evaluated, quantized and dequantized without a forward pass; every
layer prints its progress line (name, shape, seconds) unless --quiet; an end-to-end check that
does not fit in memory (``SOP_MEMORY_LIMIT`` standing for a small machine) is refused before any
work, with nothing written. bench/llm_scale.py measures the same at 7B-class layer sizes."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cli_run import run

SHAPES = {"mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64), "mlp.down_proj": (64, 96),
          "self_attn.q_proj": (64, 64), "self_attn.o_proj": (64, 64)}
LINE = re.compile(r"^(?P<what>.+) \[(?P<i>\d+)/(?P<n>\d+)\] (?P<name>\S+) (?P<r>\d+)x(?P<c>\d+): \d+\.\d\d s$")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two blocks in two shards and an embedding, bf16, with model.safetensors.index.json."""
    d = tmp_path_factory.mktemp("sharded")
    g = torch.Generator().manual_seed(13)
    index = {}
    for block in range(2):
        shard = f"model-{block + 1:05d}-of-00002.safetensors"
        tensors = {f"model.layers.{block}.{k}.weight": (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
                   for k, s in SHAPES.items()}
        tensors[f"model.layers.{block}.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        if block == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(50, 64, generator=g).to(torch.bfloat16)
        save_file(tensors, str(d / shard))
        index.update({k: shard for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return d


def progress_lines(err: str, what: str) -> list[re.Match]:
    return [m for m in map(LINE.match, err.splitlines()) if m and m["what"] == what]


def test_a_sharded_folder_without_config_runs_and_prints_every_layer(sharded, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert run(["eval", str(sharded), "--format", "nf4-g64", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    doc = json.loads(out.read_text())
    f = doc["formats"]["nf4-g64"]
    assert len(f["layers"]) == 10 and doc["source"]["kept"]["embedding"] == 1
    assert "skipped" in f["e2e"] and "no config.json" in f["e2e"]["skipped"]       # no forward pass: said so
    lines = progress_lines(err, "nf4-g64")
    assert [int(m["i"]) for m in lines] == list(range(1, 11)) and {int(m["n"]) for m in lines} == {10}
    for m in lines:                                # name and (out, in) shape of each layer, in order
        assert tuple(f["layers"][m["name"]]["shape"]) == (int(m["r"]), int(m["c"]))

    sopq = tmp_path / "m.sopq"
    assert run(["quantize", str(sharded), "--format", "sop4-g16", "--out", str(sopq)]) == 0
    assert len(progress_lines(capsys.readouterr().err, "quantize sop4-g16")) == 10
    st = tmp_path / "m.safetensors"
    assert run(["dequantize", str(sopq), "--out", str(st)]) == 0
    assert len(progress_lines(capsys.readouterr().err, "dequantize")) == 10

    assert run(["quantize", str(sharded), "--format", "sop4-g16", "--out", str(tmp_path / "q.sopq"),
                "--quiet"]) == 0
    assert capsys.readouterr().err == ""          # --quiet: no progress at all


def test_sop_budget_prints_a_line_per_layer_while_building_its_options(sharded, tmp_path, capsys):
    assert run(["quantize", str(sharded), "--format", "sop-budget", "--budget", "5.0", "--out",
                str(tmp_path / "b.sopq")]) == 0
    err = capsys.readouterr().err
    assert len(progress_lines(err, "sop-budget options")) == 10
    assert len(progress_lines(err, "quantize sop-budget")) == 10


def one_error(capsys, argv) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sop: error: ") and "\n" not in err, err
    return err


def test_an_end_to_end_check_too_large_for_memory_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """MiniLM's BERT forward pass needs about 0.13 GiB for the end-to-end check: with 64 MiB
    available it is refused, naming the estimate, the limit and --no-e2e; nothing is written,
    not even the calibration cache."""
    monkeypatch.setenv("SOP_MEMORY_LIMIT", "64M")
    out, cache = tmp_path / "e.json", tmp_path / "calib"
    err = one_error(capsys, ["eval", "minilm", "--format", "nf4-g64", "--json", str(out), "--cache-dir", str(cache),
                                "--quiet"])
    assert "the end-to-end check" in err and "needs about 0.13 GiB" in err and "0.06 GiB are available" in err
    assert "SOP_MEMORY_LIMIT=64M" in err and "--no-e2e skips it" in err
    assert not out.exists() and not cache.exists()
    # calibration alone (the model in float32) still fits; --no-calib --no-e2e needs no forward pass
    monkeypatch.setenv("SOP_MEMORY_LIMIT", "1M")
    err = one_error(capsys, ["eval", "minilm", "--format", "nf4-g64", "--no-e2e", "--cache-dir", str(cache),
                                "--quiet"])
    assert "calibration" in err and "--no-calib skips it" in err
    assert run(["eval", "minilm", "--format", "nf4-g64", "--no-e2e", "--no-calib", "--include",
                "encoder.layer.0.attention.self.query.weight", "--quiet", "--json", str(out)]) == 0
    assert out.exists()


def test_a_bad_memory_limit_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setenv("SOP_MEMORY_LIMIT", "lots")
    err = one_error(capsys, ["eval", "minilm", "--format", "nf4-g64", "--quiet"])
    assert "SOP_MEMORY_LIMIT='lots': not a size" in err
