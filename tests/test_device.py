"""``--device`` (quantize/device.py): the SOP search on a torch device gives numpy's bits.

* ``block_sum.block_sum`` is ``np.sum`` over a contiguous axis, bit for bit, on numpy arrays and
  on torch tensors (the one order every device follows);
* the search on torch's CPU device gives the numpy search's streams, reconstructions and
  per-pair scores on layers with every hard case (zeros of both signs, exact ties, subnormal
  weights, a table whose midpoint is zero, float16 and float64 weights, weighted and not);
* ``sop quantize`` / ``sop eval`` with ``--device cpu`` (also with ``--jobs 2``) write the
  ``.sopq`` bytes and eval JSON of the default on MiniLM layers, for sop4-g16, e2m3-ue4m4-g16
  and sop-budget;
* ``--device cuda`` without CUDA, and a name that is no device, are one error line before any
  work; nothing is written.

Nothing here needs a GPU. Where torch sees one, ``test_the_search_on_cuda_is_numpys`` runs the
layers of the second item on it.
"""

import json

import numpy as np
import pytest
import torch

from cli_run import run
from test_quantize_speedpaths import layer32
from sop.golden.codebooks import Codebook, get_codebook
from sop.golden.points import get_point
from sop.quantize import device
from sop.quantize.block_sum import block_sum, halved_sum, sum_order
from sop.quantize.blockwise import encode
from sop.quantize.sop_search import quantize_fp6, quantize_sop4

LAYER0 = "encoder.layer.0.*"           # MiniLM's first block: 6 layers, 1.77 M weights


def bits(x) -> bytes:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    return x.view(np.int64).tobytes()


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 64, 100, 128, 129, 200, 256, 1000])
def test_block_sum_is_numpy_sum_over_a_contiguous_axis(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n, 7)) * np.exp(rng.uniform(-30, 30, (3, n, 7)))
    x[0, :, 0] = -0.0                                          # a sum of -0s is +0, as np.sum's
    for axis in (0, 1, 2):
        want = np.ascontiguousarray(np.moveaxis(x, axis, -1)).sum(axis=-1)
        assert bits(block_sum(x, axis)) == bits(want)
        assert bits(block_sum(torch.from_numpy(x), axis).numpy()) == bits(want)


@pytest.mark.parametrize("g", [8, 16, 24, 32, 64, 128])
def test_halved_sum_of_the_sum_order_is_block_sum(g):
    """The numpy search lays a block's terms out in ``sum_order`` and sums by halving: the same
    additions as ``block_sum`` (np.sum's order) of the terms in their own order."""
    rng = np.random.default_rng(g)
    x = rng.standard_normal((3, g, 5)) * np.exp(rng.uniform(-30, 30, (3, g, 5)))
    want = np.ascontiguousarray(np.moveaxis(x, 1, -1)).sum(axis=-1)
    order = sum_order(g)
    assert sorted(order) == list(range(g))
    assert bits(halved_sum(x[:, order], 1)) == bits(want)
    assert bits(np.asarray(halved_sum(torch.from_numpy(x[:, order]), 1))) == bits(want)
    assert sum_order(12) is None and sum_order(4) is None and sum_order(136) is None
    zeros = np.full((2, g, 3), -0.0)                    # np.sum of -0s starts from +0: +0, as halving must
    assert bits(halved_sum(zeros[:, order], 1)) == bits(np.ascontiguousarray(np.moveaxis(zeros, 1, -1)).sum(-1))


def hard_layer(dtype=np.float32) -> np.ndarray:
    """``layer32``'s zeros of both signs, subnormal weights and exact ties, and more: blocks
    mixing table values with zeros, rows of small scales."""
    w = layer32()[:40]
    w[4, :48] = np.tile([1.0, -1.0, 0.5, -0.5, 0.0, -0.0, 0.25, 0.75], 6)
    w[5:8] *= 1e-3
    return w.astype(dtype)


def same_result(a, b) -> None:
    assert a.choice == b.choice and a.bits == b.bits
    assert a.stream.blocks == b.stream.blocks and a.stream.offset == b.stream.offset
    assert bits(a.recon) == bits(b.recon)
    for key, val in a.extra.items():
        if isinstance(val, np.ndarray):
            assert bits(val) == bits(b.extra[key]), key
        else:
            assert val == b.extra[key], key        # the pair scores: floats compared exactly


def search_cases():
    act = np.random.default_rng(8).uniform(0, 2, 256)
    act[:4] = 0.0
    for dtype in (np.float32, np.float64, np.float16):
        for a in (None, act):
            yield dtype, a


def compare_on(dev: str) -> None:
    for dtype, a in search_cases():
        w = hard_layer(dtype)
        for fn in (quantize_sop4, quantize_fp6):
            want = fn(w, a)
            with device.use(dev):
                got = fn(w, a)
            same_result(got, want)


def test_the_search_on_torch_cpu_is_numpys():
    compare_on("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_the_search_on_cuda_is_numpys():
    compare_on("cuda")


def test_a_table_without_zero_on_torch():
    """A table without a zero entry, symmetric: 0 is a midpoint (a tie between -1/8 and +1/8)
    that golden decides by the sign of the zero, and every other midpoint is a tie too: the
    device's table of integer quotients gives numpy's errors and choices."""
    cb = Codebook.from_values("nz", (2 * np.arange(-8, 8) + 1) / 8)
    lay = get_point("sop4-g16").layout
    w = hard_layer()[:8]
    w[6, :16] = np.where(np.arange(16) % 2, -0.0, 0.0)
    w[6, 16] = 1.0
    for a in (None, np.linspace(0, 1, 256)):
        want = encode(w, lay, [cb, get_codebook("nf4")], 1, col_weight=a)
        with device.use("cpu"):
            got = encode(w, lay, [cb, get_codebook("nf4")], 1, col_weight=a)
        assert got.stream.blocks == want.stream.blocks
        assert bits(got.err) == bits(want.err) and bits(got.qq) == bits(want.qq)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A calibration cache made once, so that every artifact says ``cached: true``."""
    d = tmp_path_factory.mktemp("calib")
    assert run(["quantize", "minilm", "--format", "nf4-g64", "--out", d / "warm.sopq", "--quiet",
                "--include", LAYER0, "--cache-dir", d]) == 0
    return d


def quantize(tmp_path, calib, fmt: str, name: str, *extra) -> bytes:
    out = tmp_path / f"{name}.sopq"
    argv = ["quantize", "minilm", "--format", fmt, "--out", out, "--quiet", "--include", LAYER0,
            "--cache-dir", calib, *extra]
    if fmt == "sop-budget":
        argv += ["--budget", "5"]
    assert run(argv) == 0
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["sop4-g16", "e2m3-ue4m4-g16", "sop-budget"])
def test_minilm_sopq_bytes_are_the_same_on_torch_cpu(tmp_path, calib, fmt):
    """Calibrated (activation-weighted) MiniLM layers: the artifact's bytes with --device cpu,
    alone and with --jobs 2, are the default's."""
    want = quantize(tmp_path, calib, fmt, "numpy")
    assert quantize(tmp_path, calib, fmt, "cpu", "--device", "cpu") == want
    assert quantize(tmp_path, calib, fmt, "cpu-jobs", "--device", "cpu", "--jobs", "2") == want


def test_minilm_eval_json_is_the_same_on_torch_cpu(tmp_path):
    docs = []
    for extra in ([], ["--device", "cpu"]):
        out = tmp_path / f"eval{len(extra)}.json"
        assert run(["eval", "minilm", "--format", "sop4-g16", "--format", "e2m3-ue4m4-g16", "--format",
                    "sop-budget", "--budget", "5", "--include", LAYER0, "--no-calib", "--no-e2e", "--quiet",
                    "--json", out, *extra]) == 0
        doc = json.loads(out.read_text())
        for f in doc["formats"].values():
            f.pop("seconds")
        docs.append(doc)
    assert docs[0] == docs[1]


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "x.sopq"
    for argv in (["quantize", "minilm", "--format", "sop4-g16", "--out", out],
                 ["eval", "minilm", "--format", "sop4-g16", "--json", tmp_path / "x.json"],
                 ["quantize", "minilm", "--format", "sop4-g16", "--out", out, "--jobs", "2"]):
        assert run([*argv, "--cache-dir", tmp_path / "calib", "--device", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sop: error: --device {name}: ") and err.count("\n") == 1, err
        assert "CUDA" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []            # no calibration, no output


def test_a_name_that_is_no_device_is_one_error_line(tmp_path, capsys):
    assert run(["quantize", "minilm", "--format", "sop4-g16", "--out", tmp_path / "x.sopq",
                "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sop: error: --device gpu: not a device") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="^device 'tpu'"):       # Python's wording (test_api_inputs.py)
        with device.use("tpu"):
            pass
    assert device.active() == device.NUMPY
