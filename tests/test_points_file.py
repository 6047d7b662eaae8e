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
from sop.golden.hif import DEFAULT_HIF, hif_format
from sop.golden.layout import BlockLayout, format_id, pack_layer, unpack_layer
from sop.quantize.artifact import open_artifact
from sop.quantize.schemes import get_quant_format

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


def test_a_points_file_edited_after_it_registered_registers_as_it_is_now(tmp_path, registry):
    """A file registered, then edited in the same process (a script adds a point and calls register_file
    again): the added point is registered, its table (unchanged) taken as it is, a table given other values
    refused, and a file made no file of points refused in one ValueError. Keyed by its path alone, the
    second call returned the new point's name and registered nothing, and the last was an AttributeError."""
    path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [POINT]})
    assert points.register_file(path) == ["tanh4-ue4m4-g16"]
    other = {**POINT, "name": "tanh4-ue4m4-g32", "layout": {**POINT["layout"], "group": 32}}
    _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [POINT, other]})
    assert points.register_file(path) == ["tanh4-ue4m4-g16", "tanh4-ue4m4-g32"]
    assert points.get_point("tanh4-ue4m4-g32").layout.group == 32
    assert points.register_file(path) == ["tanh4-ue4m4-g16", "tanh4-ue4m4-g32"]    # unchanged: once
    _write(tmp_path, {"codebooks": {"tanh4": TANH4[::-1]}, "points": [POINT]})
    with pytest.raises(ValueError, match="codebook 'tanh4' is already defined"):
        points.register_file(path)
    path.write_text("[1]")
    with pytest.raises(ValueError, match="not a file of tables and points"):
        points.register_file(path)


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
    "another key": ({"point": [POINT]}, "unknown key(s) point; a file of tables and points has codebooks, points"),
    "a taken table": ({"codebooks": {"nf4": TANH4}}, "codebook 'nf4' is already defined"),
    "a table of 3": ({"codebooks": {"t3": [0.0, 0.5, 1.0]}}, "codebook t3: 3 entries, need a power of two"),
    "a taken point": ({"points": [POINT | {"name": "sop4-g16", "codebooks": ["nf4"]}]},
                      "point 'sop4-g16': name(s) already registered: sop4-g16"),
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
    # an outside walk: each was registered as something else, or refused in Python's words
    "vectors as a string": ({"points": [POINT | {"codebooks": ["nf4"], "vectors": "false"}]},
                            "point 'tanh4-ue4m4-g16': vectors must be true or false, got 'false'"),
    "code_bits as a string": ({"points": [POINT | {"codebooks": ["nf4"],
                                                    "layout": POINT["layout"] | {"code_bits": "4"}}]},
                              "point 'tanh4-ue4m4-g16': layout: code_bits must be an integer, got '4'"),
    "a misspelt layout field": ({"points": [POINT | {"codebooks": ["nf4"], "layout": {"code_bit": 4, "group": 16,
                                                                                       "scale": "ue4m4"}}]},
                                "point 'tanh4-ue4m4-g16': layout: unknown field(s) code_bit; a layout has code_bits"),
    "a misspelt variant field": ({"points": [POINT | {"codebooks": ["nf4"], "variants": [{"sufix": "x1"}]}]},
                                 "point 'tanh4-ue4m4-g16': variant 0: unknown field(s) sufix; a variant has lanes"),
    "a table named twice": ('{"codebooks": {"t": %s, "t": %s}}' % (json.dumps(TANH4), json.dumps(TANH4[::-1])),
                            "'t' given twice in one JSON object"),
    "NaN": ('{"codebooks": {"t": [NaN%s]}}' % (", 0.5" * 15), "NaN in the file: not a JSON number"),
    "a point named twice": ({"codebooks": {"tanh4": TANH4}, "points": [POINT, POINT]},
                            "point 'tanh4-ue4m4-g16': named twice in the file"),
    "an unsigned HIF": ({"points": [POINT | {"codebooks": ["nf4"], "hif": "ue4m4"}]},
                        "point 'tanh4-ue4m4-g16': hif ue4m4 is not a HIF"),
    "a quantizer format's name": ({"points": [POINT | {"codebooks": ["nf4"], "name": "nvfp4"}]},
                                  "operating point(s) nvfp4: the name of a quantizer format"),
    "a built-in GEMV engine's name": ({"points": [POINT | {"codebooks": ["nf4"], "name": "sop4-g16-bf16"}]},
                                      "its GEMV engine would be named like"),
    # a file of nothing registered nothing without a word; a field of another JSON type was Python's words
    "an empty file": ({}, "holds no tables or points: nothing to register"),
    "empty tables and points": ({"codebooks": {}, "points": []}, "holds no tables or points"),
    "a scale's bits as a string": ({"points": [POINT | {"codebooks": ["nf4"], "layout": POINT["layout"] | {
        "scale": {"name": "ue4m4", "bits": "8", "signed": False, "ebits": 4, "mbits": 4, "bias": 7}}}]},
        "point 'tanh4-ue4m4-g16': scale: bits must be an integer, got '8'"),
    "a variant suffix as a list": ({"points": [POINT | {"codebooks": ["nf4"], "variants": [{"suffix": ["x1"]}]}]},
                                   "point 'tanh4-ue4m4-g16': variant 0: suffix must be a string, got ['x1']"),
    "a table entry as true": ({"codebooks": {"t": TANH4[:15] + [True]}},
                              "codebook t: entry 15 must be a number, got True"),
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


#: a format given as point_spec's JSON object (the scale's, the HIF's)
UE4M4 = {"name": "ue4m4", "bits": 8, "signed": False, "ebits": 4, "mbits": 4, "bias": 7, "specials": "finite"}
#: every field of a point, of its layout, of its formats given as objects and of a variant, by path
FIELDS = [("name",), ("description",), ("search",), ("codebooks",), ("codebooks", 0), ("hif",), ("lanes",),
          ("output",), ("variants",), ("variants", 0), ("vectors",), ("board",), ("layout",)] + \
         [("variants", 0, k) for k in ("suffix", "lanes", "output")] + \
         [("layout", k) for k in ("code_bits", "group", "scale", "signed_scale", "select_bit")] + \
         [(*f, k) for f in (("layout", "scale"), ("hif",)) for k in UE4M4]
#: each field's JSON types, by its last key (a variant's: ``variant KEY``)
JSON_TYPES = {"name": {str}, "description": {str}, "search": {str}, "codebooks": {list}, 0: {str}, "hif": {str, dict},
              "lanes": {int}, "output": {str}, "variants": {list}, "vectors": {bool}, "board": {bool},
              "layout": {dict}, "variant suffix": {str}, "variant lanes": {int, type(None)},
              "variant output": {str, type(None)}, "code_bits": {int}, "group": {int}, "scale": {str, dict},
              "signed_scale": {bool}, "select_bit": {bool}, "bits": {int}, "signed": {bool}, "ebits": {int},
              "mbits": {int}, "bias": {int}, "specials": {str}}
#: a value of each JSON type, one of them wrong for every field
WRONG = [["x1"], {"a": 1}, 3, 2.5, True, None, "s"]


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: ".".join(map(str, f)))
def test_every_field_of_a_wrong_json_type_is_named_in_the_files_words(tmp_path, registry, field):
    """Each field of a point fed each JSON type: registered as given, or refused naming the file and the
    point, never in Python's words (a variant's suffix as a list was ``unhashable type: 'list'``, a scale's
    ``ebits`` as a string ``unsupported operand type(s) for +``, its ``bias`` as a list or ``name`` as a
    number taken, a variant's ``suffix: null`` a configuration ``<point>-None``)."""
    python = ("unhashable", "unsupported operand", "int()", "__init__", "attribute", "NoneType", "not subscript",
              "object of type", "iterable")
    for wrong in WRONG:
        spec = json.loads(json.dumps(POINT | {"variants": [{"suffix": "x1", "lanes": 1}]}))
        spec["layout"]["scale"], spec["hif"] = dict(UE4M4), {**UE4M4, "name": "hif-e3m8b5", "bits": 12,
                                                              "signed": True, "ebits": 3, "mbits": 8, "bias": 5}
        *parents, key = (field[1:] if field[0] == "hif" and len(field) > 1 else field)
        where = spec["hif"] if field[0] == "hif" and len(field) > 1 else spec
        for k in parents:
            where = where[k]
        where[key] = wrong
        path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [spec]})
        try:
            points.register_file(path)
        except ValueError as err:
            said = str(err)
            assert said.startswith(f"{path}: point "), said
            assert not any(w in said for w in python), said
        else:           # taken: only a value of the field's JSON type (a name "s", a bias 3, a variant's lanes null)
            kind = f"variant {field[-1]}" if field[0] == "variants" and len(field) == 3 else field[-1]
            assert type(wrong) in JSON_TYPES[kind], (field, wrong)
            points._POINTS.pop(spec["name"], None)
            points._FILES_REGISTERED.clear()


def test_a_python_m_tool_refuses_a_point_it_cannot_list_in_one_line(tmp_path):
    """A point named like a built-in GEMV engine was a traceback in `python -m sop.hdl.generate --help`
    (hdl.gemv_config refuses it where the engines are listed, while argparse was built)."""
    path = _write(tmp_path, {"points": [POINT | {"codebooks": ["nf4"], "name": "sop4-g16-bf16"}]})
    run = subprocess.run([sys.executable, "-m", "sop.hdl.generate", "--help"], capture_output=True, text=True,
                         env={**os.environ, "SOP_POINTS": str(path)}, timeout=300)
    assert (run.returncode, run.stdout, run.stderr.count("\n")) == (2, "", 1), run.stderr
    assert run.stderr.startswith(f"python -m sop.hdl.generate: error: SOP_POINTS={path}: operating point(s) "
                                 f"sop4-g16-bf16: its GEMV engine"), run.stderr


def test_a_hif_by_name_is_the_hif_a_stream_reads_back(tmp_path, registry):
    """``hif`` as `sop formats` spells it (``hif-e3m8b5``) was an unknown format, and ``e3m8b5`` a format of
    that name, not the HIF ``hif_format`` names, which a layer stream reads back: `python -m sop.sim.runner`
    refused the point's own vectors (their format's HIF is not the set's)."""
    path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [
        POINT | {"name": "a-g16", "hif": "hif-e3m8b5"}, POINT | {"name": "b-g16", "hif": "e3m8b5"}]})
    assert points.register_file(path) == ["a-g16", "b-g16"]
    assert points.get_point("a-g16").hif == points.get_point("b-g16").hif == hif_format(8)
    w = np.random.default_rng(1).standard_normal((16, 32))
    stream = unpack_layer(pack_layer(get_quant_format("b-g16").quantize(w).stream))
    assert stream.hif == points.get_point("b-g16").hif


def test_a_points_file_registers_all_or_nothing(tmp_path, registry):
    """A file refused at its second point left its table and first point registered: the file, put right,
    was then refused (name already registered)."""
    good = POINT | {"name": "a-g16"}
    path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [good, POINT | {"lanes": 3}]})
    with pytest.raises(ValueError, match="point 'tanh4-ue4m4-g16': lanes must be a power of two"):
        points.register_file(path)
    assert "a-g16" not in points.operating_points() and "tanh4" not in codebooks.codebook_names()
    path = _write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [good, POINT]})
    assert points.register_file(path) == ["a-g16", "tanh4-ue4m4-g16"]


def test_registrations_written_to_a_file_register(tmp_path, registry):
    """docs/quantizer.md: ``json.dump(registrations(), f)`` writes a points file; it holds the built-in
    points too, which were refused as taken names."""
    with codebooks.registered_codebook("tanh4", TANH4):
        with points.registered(points.point_from_spec(POINT)) as pt:
            path = _write(tmp_path, points.registrations())
    assert points.register_file(path) == ["sop4-g16", "e2m3-ue4m4-g16", "tanh4-ue4m4-g16"]
    assert points.get_point("tanh4-ue4m4-g16") == pt
    path = _write(tmp_path, {"points": [{**points.point_spec(points.get_point("sop4-g16")), "lanes": 4}]}, "b.json")
    with pytest.raises(ValueError, match="point 'sop4-g16': name.s. already registered"):
        points.register_file(path)          # another definition under a taken name is still refused


def test_a_file_point_without_sop_budget_layers_runs_its_residual_configuration(tmp_path, registry):
    """sop-budget stores layers of two layouts: the -sp configuration of a point of another (`make sim`
    runs every point's) was a traceback in `python -m sop.sim.runner` (sparse_artifact's ValueError); it
    runs the plan's synthetic residual layers alone."""
    from sop.hdl.config import residual_configs
    from sop.sim import runner

    points.register_file(_write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [POINT]}))
    assert runner.sparse_artifact("tanh4-ue4m4-g16", missing_ok=True)[1] == []
    cfg = residual_configs()["tanh4-ue4m4-g16-sp"]
    assert runner.minilm_vectors(cfg, True) is None and runner.sparse_row_vectors(cfg) is None
    with pytest.raises(ValueError, match="no tanh4-ue4m4-g16 layer with sparse residuals"):
        runner.sparse_artifact("tanh4-ue4m4-g16")


def test_an_unknown_point_without_a_points_file_names_sop_points(tmp_path, monkeypatch, capsys, registry):
    """An artifact made with a file, read by a command run without it, met `unknown format` or argparse's
    `invalid choice` and no word of where a point of one's own comes from; with the file set, no hint."""
    monkeypatch.delenv("SOP_POINTS", raising=False)
    hint = "; a point of your own: name its file in SOP_POINTS (docs/quantizer.md)"
    assert main(["quantize", "minilm", "--format", "tanh4-ue4m4-g16", "--out", str(tmp_path / "q.sopq")]) == 2
    assert capsys.readouterr().err.rstrip().endswith(hint)
    with pytest.raises(SystemExit):
        main(["vectors", "minilm", "--format", "tanh4-ue4m4-g16", "--out", str(tmp_path / "v")])
    assert f"invalid choice: 'tanh4-ue4m4-g16' (choose from 'sop4-g16', 'e2m3-ue4m4-g16'){hint} (see" in \
        capsys.readouterr().err
    monkeypatch.setenv("SOP_POINTS", str(_write(tmp_path, {"codebooks": {"tanh4": TANH4}, "points": [POINT]})))
    with pytest.raises(SystemExit):
        main(["vectors", "minilm", "--format", "tanh5", "--out", str(tmp_path / "v")])
    assert "SOP_POINTS" not in capsys.readouterr().err
