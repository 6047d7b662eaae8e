"""A user's own tables and points from a file (``SOP_POINTS``: golden.points.register_file): a script's
``register`` reached no command line (`sop`, `make verilog`, `make sim` start a process of their own that
knew only golden/points.py); now the file names them for every command, and a file that cannot serve is
one line naming it, before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from sop.cli import main
from sop.golden import codebooks, points
from sop.golden.codebooks import get_codebook
from sop.golden.decoder import decode_layer
from sop.golden.formats import get_format
from sop.golden.hif import DEFAULT_HIF
from sop.golden.layout import BlockLayout, format_id
from sop.quantize.artifact import open_artifact

TANH4 = (np.tanh(np.linspace(-2, 2, 16)) / np.tanh(2)).tolist()
POINT = {"name": "tanh4-ue4m4-g16", "layout": {"code_bits": 4, "group": 16, "scale": "ue4m4"},
         "description": "tanh4 codes, UE4M4 scale, block 16", "codebooks": ["tanh4"]}


@pytest.fixture
def registry():
    """The registries as they were before the test (a file registers into this process's)."""
    saved = dict(points._POINTS), set(points._FILES_REGISTERED), dict(codebooks._REGISTERED)
    yield
    for live, old in zip((points._POINTS, points._FILES_REGISTERED, codebooks._REGISTERED), saved):
        live.clear()
        live.update(old)
    get_codebook.cache_clear()


def _write(tmp_path, doc, name="points.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_a_points_file_reaches_sop(tmp_path, monkeypatch, capsys, registry):
    """`sop formats` lists the file's point with its format id, `sop quantize` writes it, and its blocks
    decode (golden) with the file's table; a file named twice in one process registers once."""
    path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [POINT]})
    monkeypatch.setenv("SOP_POINTS", str(path))
    assert main(["formats", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["points"]}
    layout = BlockLayout(4, 16, get_format("ue4m4"))
    assert listed["tanh4-ue4m4-g16"]["format_id"] == format_id(layout, DEFAULT_HIF)
    assert listed["tanh4-ue4m4-g16"]["codebooks"] == ["tanh4"] and listed["tanh4-ue4m4-g16"]["lanes"] == 8
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    save_file({"l.weight": w}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "m.sopq"
    assert main(["quantize", str(tmp_path / "m.safetensors"), "--format", "tanh4-ue4m4-g16", "--no-calib",
                 "--quiet", "--out", str(out)]) == 0
    art = open_artifact(out)
    stream = art.stream(art.layers[0])
    assert stream.layout == layout and art.meta["format"]["name"] == "tanh4-ue4m4-g16"
    np.testing.assert_array_equal(stream.luts[0], get_codebook("tanh4").hif_codes)     # the file's table
    assert np.isfinite(decode_layer(stream)).all()
    assert points.register_file(path) == ["tanh4-ue4m4-g16"]        # again: nothing registered twice


def test_a_points_file_reaches_the_python_m_tools(tmp_path):
    """`python -m sop.hdl.generate` (what `make verilog` runs) writes the file's point's Verilog."""
    path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [POINT]})
    env = {**os.environ, "SOP_POINTS": str(path)}
    run = subprocess.run([sys.executable, "-m", "sop.hdl.generate", "--config", "tanh4-ue4m4-g16", "--out",
                          str(tmp_path / "v")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "module sop_decoder_tanh4_ue4m4_g16" in (tmp_path / "v" / "tanh4-ue4m4-g16.v").read_text()
    bad = {**env, "SOP_POINTS": str(tmp_path / "none.json")}
    run = subprocess.run([sys.executable, "-m", "sop.hdl.generate", "--help"], capture_output=True, text=True,
                         env=bad, timeout=300)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f"python -m sop.hdl.generate: error: SOP_POINTS={tmp_path / 'none.json'}: No such file " \
                         f"or directory\n"


BAD = {
    "not json": ("{", "not a JSON file"),
    "a list": ([POINT], "not a file of tables and points"),
    "another key": ({"point": [POINT]}, "not a file of tables and points"),
    "a taken table": ({"codebooks": {"nf4": TANH4}}, "codebook 'nf4' is already defined"),
    "a table of 3": ({"codebooks": {"t3": [0.0, 0.5, 1.0]}}, "codebook t3: 3 entries, need a power of two"),
    "a taken point": ({"points": [POINT | {"name": "sop4-g16", "codebooks": ["nf4"]}]},
                      "point 'sop4-g16': operating point 'sop4-g16': name(s) already registered: sop4-g16"),
    "no table": ({"points": [POINT]}, "point 'tanh4-ue4m4-g16': "),
    "no description": ({"points": [{k: v for k, v in POINT.items() if k != "description"} | {"codebooks": ["nf4"]}]},
                       "point 'tanh4-ue4m4-g16': no 'description' field"),
    "a misspelt field": ({"points": [POINT | {"codebooks": ["nf4"], "lane": 4}]},
                         "point 'tanh4-ue4m4-g16': unknown field(s) lane; a point has board, codebooks, description"),
    "codebooks as a string": ({"points": [POINT | {"codebooks": "nf4"}]},
                              "point 'tanh4-ue4m4-g16': codebooks must be a JSON list, got 'nf4'"),
    "an unknown scale": ({"points": [POINT | {"codebooks": ["nf4"], "layout": {"code_bits": 4, "group": 16,
                                                                                "scale": "ue9m9"}}]},
                         "point 'tanh4-ue4m4-g16': "),
    "lanes the decoder cannot build": ({"points": [POINT | {"codebooks": ["nf4"], "lanes": 3}]},
                                       "point 'tanh4-ue4m4-g16': "),
}


@pytest.mark.parametrize("case", BAD)
def test_a_points_file_that_cannot_serve_is_one_line(tmp_path, monkeypatch, capsys, registry, case):
    doc, said = BAD[case]
    path = _write(tmp_path, doc)
    monkeypatch.setenv("SOP_POINTS", str(path))
    assert main(["formats"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"sop: error: SOP_POINTS={path}: "), err
    assert said in err, err
