"""The vector files are read with numpy (sim/vectors.py: ``_hex_matrix``, ``_fields``), line by line only
where a text is not of the expected form: the fast parse takes exactly the texts the slow one's whole-file
match takes (sparse.txt: the writer's form, the slow path reads any other), and both give the same arrays
or the same ``VectorError`` (the file, the line, what was expected, the text), on valid files and on files
with one character changed, inserted or deleted anywhere."""

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from sop.sim import vectors as V

PATH = Path("v") / "l.txt"
ENDS = st.sampled_from(["\n", "\r\n"])
#: what a corruption puts in: a digit, a separator or a character no vector file holds
CHARS = st.sampled_from([*"0123456789abcdefABCDEF", *" -\r\n" * 4, *"gx+\t\x0b\x85\u2028\u00b2\u0663\u3000"])


@contextmanager
def slow():
    """The readers' slow path alone (every text declined by the numpy parse): the reference."""
    with mock.patch.object(V, "_unix_bytes", lambda text: None):
        yield


def outcome(read, *args):
    """What a reader gives: its arrays (dtype, shape, bytes) or its VectorError's message."""
    try:
        got = read(*args)
    except V.VectorError as err:
        return "error", str(err)
    return "read", [(a.dtype.str, a.shape, a.tobytes()) if isinstance(a, np.ndarray) else a
                    for a in (got if isinstance(got, tuple) else (got,))]


@st.composite
def lines_text(draw, rows):
    """The lines ``rows`` draws, each ended by \n or \r\n, the last maybe by nothing; an empty layer's
    file (one empty line) for none."""
    rows = draw(rows)
    text = "".join(r + draw(ENDS) for r in rows)
    if rows and draw(st.booleans()):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text or "\n"


def hex_line(digits):
    return st.integers(0, 16 ** digits - 1).flatmap(
        lambda v: st.sampled_from([f"{v:0{digits}x}", f"{v:0{digits}X}", f"{v:0{digits}x}".capitalize()]))


def decimal(most, signed=False):
    """A decimal of at most ``most`` digits, maybe with leading zeros (the slow path takes them)."""
    return st.tuples(st.integers(0, 10 ** most - 1), st.integers(1, most), st.booleans()).map(
        lambda t: ("-" if signed and t[2] else "") + f"{t[0]:0{t[1]}d}")


@st.composite
def sparse_rows(draw):
    """Strictly increasing entries as the writer spaces them, or (one file in four) spaced by hand; an
    index maybe with leading zeros or past int64, a value maybe not finite."""
    index = sorted(draw(st.sets(st.integers(0, 10 ** 6), max_size=12)))
    hand = draw(st.integers(0, 3)) == 0
    rows = []
    for i in index:
        i = draw(st.sampled_from([str(i)] * 6 + [f"{i:018d}", f"{i:019d}", str(i + 2 ** 63)]))
        sep = draw(st.sampled_from([" ", "  ", "\t", "\u3000"])) if hand else " "
        value = draw(st.one_of(hex_line(4), st.sampled_from(["7f80", "FF81", "7f7f"])))
        rows.append(i + sep + value)
    return rows


# kind: (its rows, the reader's arguments after the text, the slow path's whole-file pattern)
KINDS = {
    "blocks": (hex_line(18), (9,), "[0-9a-fA-F]{18}"),
    "blocks1": (hex_line(2), (1,), "[0-9a-fA-F]{2}"),
    "bf16": (hex_line(4), (), "[0-9a-fA-F]{4}"),
    "exact": (st.tuples(st.sampled_from("01"), decimal(9, signed=True), decimal(18)).map(" ".join), (),
              "[01] -?[0-9]{1,9} [0-9]{1,18}"),
    "sparse": (None, None, "[0-9]{1,18} [0-9a-fA-F]{4}"),
}


def rows(kind, least=0):
    return sparse_rows() if kind == "sparse" else st.lists(KINDS[kind][0], min_size=least, max_size=12)


def reader(kind):
    return {"blocks": V._read_blocks, "blocks1": V._read_blocks, "bf16": V._read_bf16, "exact": V._read_exact,
            "sparse": V._read_sparse}[kind]


def fast_parse(kind, text):
    """The numpy parse alone: None where it declines the text."""
    if kind.startswith("blocks") or kind == "bf16":
        return V._hex_matrix(text, {"blocks": 18, "blocks1": 2, "bf16": 4}[kind])
    return V._fields(text, V.EXACT_FIELDS if kind == "exact" else V.SPARSE_FIELDS)


def corrupted(data, text):
    """``text`` with one character changed, inserted or deleted anywhere, or a separator (a space, a
    minus, a line break) made another or dropped."""
    how = data.draw(st.sampled_from(["set", "insert", "delete", "separator"]))
    marks = [k for k, c in enumerate(text) if c in " -\r\n"]
    if how == "separator" and marks:
        at = data.draw(st.sampled_from(marks))
        return text[:at] + data.draw(st.sampled_from([" ", "\n", "\r", "-", ""])) + text[at + 1:]
    at = data.draw(st.integers(0, len(text)))
    new = data.draw(CHARS)
    if how in ("insert", "separator") or at == len(text):
        return text[:at] + new + text[at:]
    return text[:at] + (new if how == "set" else "") + text[at + 1:]


def check_agree(kind, text, data):
    _, args, pattern = KINDS[kind]
    if args is None:                           # a sparse file: its count and the layer's size drawn near
        count = len(text.splitlines()) + data.draw(st.sampled_from([0, 0, 0, -1, 1]))
        args = ("layers[0]", count, data.draw(st.sampled_from([2 ** 62, 10 ** 6, 1000, 5])))
    got = outcome(reader(kind), PATH, text, *args)
    with slow():
        want = outcome(reader(kind), PATH, text, *args)
    assert got == want
    # the numpy parse takes exactly what the whole-file match takes (sparse: the writer's form)
    whole = re.fullmatch(f"(?:(?:{pattern})\r?\n)*(?:{pattern})?", text) is not None and bool(text.strip())
    assert (fast_parse(kind, text) is not None) == whole, text
    return got


@pytest.mark.fuzz
@fuzz(300)
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_the_numpy_parse_reads_a_valid_file_as_the_slow_path(kind, data):
    text = data.draw(lines_text(rows(kind)))
    got = check_agree(kind, text, data)
    if kind != "sparse":
        assert got[0] == "read"


@pytest.mark.fuzz
@pytest.mark.parametrize("kind", sorted(KINDS))
@fuzz(300)
@given(data=st.data())
def test_a_file_with_one_character_corrupted_is_read_or_refused_as_the_slow_path_does(kind, data):
    text = data.draw(lines_text(rows(kind, least=1)))
    check_agree(kind, corrupted(data, text), data)


EDGES = {   # texts at the edges of the fast parse: each read (or refused) as the slow path does
    "exact": ["1 -999999999 999999999999999999\n", "0 -0 0\n", "0 123456789 1\n", "0 1234567890 1\n",
              "0 -1234567890 1\n", "0 1 1000000000000000000\n", "0 1 9999999999999999999\n",
              "0 0000 000000000000000000000\n", "1 --1 5\n", "0 1 2", "0 1 2\r\n0 1 2\n0 1 2", "0 1 2\r\r\n",
              "0 1 2\n\r\n", "0 1  2\n", "0 1 2 \n", " 0 1 2\n", "0 1\n2\n", "0 1 2\n\n", "\n\n", " \n", "",
              "2 1 2\n", "0 - 2\n", "0 1 -2\n", "0 1\t2\n", "0 1 2\r"],
    "bf16": ["3f80\n", "3F80\r\n3f80", "3f80\n\n", "3f8\n", "3f800\n", "3f80\r", "\r\n", "3f8g\n", "+f80\n"],
    "sparse": ["999999999999999999 3f80\n", "0999999999999999999 3f80\n", "1 3f80\r", "1 3f80\n\n2 3f80\n",
               "1 3f80\n1 3f80\n", "5 3f80\n", "1 7f80\n", "1 ff81\n", "1  3f80", "\n", "", "1 3f80 \n"],
}


@pytest.mark.parametrize("kind, text", [(k, t) for k, texts in EDGES.items() for t in texts])
def test_the_edges_of_the_fast_parse(kind, text):
    _, args, pattern = KINDS[kind]
    if args is None:
        args = ("layers[0]", len(text.splitlines()), 6)   # a layer of 6 values
    got = outcome(reader(kind), PATH, text, *args)
    with slow():
        assert got == outcome(reader(kind), PATH, text, *args)
    whole = re.fullmatch(f"(?:(?:{pattern})\r?\n)*(?:{pattern})?", text) is not None and bool(text.strip())
    assert (fast_parse(kind, text) is not None) == whole


def test_a_vector_set_reads_the_same_fast_slow_and_with_crlf_line_ends(tmp_path):
    """A written set (sparse entries included), and the same set with every line ended by \\r\\n (its
    checksums made good): the same arrays whichever path reads them."""
    from dataclasses import replace

    from sop.golden.layout import Sparse

    s = V.quantize_layer("sop4-g16", np.random.default_rng(3).standard_normal((4, 40)).astype(np.float32), "a/b")
    s = replace(s, sparse=Sparse(np.array([0, 7, 100, 191], np.uint32), np.array([0x3F80, 0xBF80, 0x0001, 0x7F7F],
                                                                                np.uint16)))
    V.write_vectors(tmp_path / "v", {"a/b": s}, widths={"a/b": 40})
    with mock.patch.object(V, "_lines", side_effect=AssertionError("the slow path")), \
            mock.patch.object(V, "_read_sparse_slow", side_effect=AssertionError("the slow path")):
        (fast,) = V.read_vectors(tmp_path / "v")                # the numpy parse, every file
    with slow():
        (ref,) = V.read_vectors(tmp_path / "v")
    crlf = tmp_path / "crlf"
    shutil.copytree(tmp_path / "v", crlf)
    doc = json.loads((crlf / "vectors.json").read_text())
    (entry,) = doc["layers"]
    for kind in ("blocks", "bf16", "exact", "sparse"):
        data = (crlf / entry["files"][kind]).read_bytes().replace(b"\n", b"\r\n")
        (crlf / entry["files"][kind]).write_bytes(data)
        entry["sha256"][kind] = hashlib.sha256(data).hexdigest()
    (crlf / "vectors.json").write_text(json.dumps(doc))
    with mock.patch.object(V, "_lines", side_effect=AssertionError("the slow path")), \
            mock.patch.object(V, "_read_sparse_slow", side_effect=AssertionError("the slow path")):
        (windows,) = V.read_vectors(crlf)
    for f in ("luts", "headers", "codes", "expected_bf16", "expected_exact", "sparse_index", "sparse_values"):
        for other in (ref, windows):
            a, b = getattr(fast, f), getattr(other, f)
            assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), f
    assert fast.sparse_index.tolist() == [0, 7, 100, 191]


@pytest.mark.parametrize("edit, said", [
    (lambda d: d["layout"].update(block_bytes=8), "field 'layout.block_bytes' is 8; the layout gives 9"),
    (lambda d: d["layout"].update(header_bits=9), "field 'layout.header_bits' is 9; the layout gives 8"),
    (lambda d: d["axis"].update(load=31), "field 'axis' is {'load': 31"),
    (lambda d: d["axis"].update(exact_lane=99), "field 'axis' is"),
    (lambda d: d.update(format="e2m3-ue4m4-g16"), "field 'format' is 'e2m3-ue4m4-g16', whose layout and HIF"),
    (lambda d: d["hif"].update(bias=6), "field 'format' is 'sop4-g16', whose layout and HIF"),
    (lambda d: d.update(format=7), "field 'format' must be str, got int"),
])
def test_an_index_whose_derived_fields_contradict_its_layout_is_refused(tmp_path, edit, said):
    """``block_bytes``, ``header_bits`` and ``axis`` follow from the layout and HIF, and ``format`` names
    the point they are of; an integrator's testbench sizes its words from them (tests/test_axis.py's
    ``readmemh_testbench``). One edited alone was read as a good set (an outside probe)."""
    s = V.quantize_layer("sop4-g16", np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32), "w")
    V.write_vectors(tmp_path / "v", {"w": s}, {"model": "m", "format": "sop4-g16"})
    assert len(V.read_vectors(tmp_path / "v")) == 1
    doc = json.loads((tmp_path / "v" / "vectors.json").read_text())
    edit(doc)
    (tmp_path / "v" / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(V.VectorError, match=re.escape(said)):
        V.read_vectors(tmp_path / "v")


def _set_with_field(folder, key, value) -> None:
    """A sop4-g16 vector set of one small layer written into ``folder``, its index's ``key`` then set to ``value``."""
    s = V.quantize_layer("sop4-g16", np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32), "w")
    V.write_vectors(folder, {"w": s}, {"model": "m", "format": "sop4-g16"})
    doc = json.loads((folder / "vectors.json").read_text())
    doc[key] = value
    (folder / "vectors.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("version, said", [
    (0, "written by an older sop (this one reads version 1): run `sop vectors` again to write it anew"),
    (2, "written by a newer sop (this one reads version 1): read it with that sop, or run `sop vectors` again"),
])
def test_a_set_of_another_version_says_which_side_is_older_and_what_to_do(tmp_path, version, said):
    """A vector set of another version (its files and fields perhaps otherwise) is named so, with the command
    that writes it anew; it said "field 'version' is 0, expected 1"."""
    _set_with_field(tmp_path / "v", "version", version)
    with pytest.raises(V.VectorError) as refused:
        V.read_vectors(tmp_path / "v")
    assert str(refused.value).startswith(f"{tmp_path / 'v' / 'vectors.json'}: vector set version {version}, {said}")


@pytest.mark.parametrize("name", ["sop9-g99", "", "SOP4-G16", "sop4-g16-x1"])
def test_an_index_whose_format_names_no_operating_point_is_refused(tmp_path, name):
    """A ``format`` that named no operating point (a typo, a configuration's name) was read as a good set:
    only a point's name was checked against the layout (an outside probe). Refused in one line naming the
    field, the value and where the valid names come from."""
    _set_with_field(tmp_path / "v", "format", name)
    with pytest.raises(V.VectorError) as refused:
        V.read_vectors(tmp_path / "v")
    said = str(refused.value)
    assert said == (f"{tmp_path / 'v' / 'vectors.json'}: field 'format' is {name!r}, which names no operating "
                    f"point; valid: sop4-g16, e2m3-ue4m4-g16 (golden/points.py; `sop formats` lists them)"), said


@pytest.mark.parametrize("fmt", ["sop4-g16", "e2m3-ue4m4-g16"])
def test_a_layer_of_no_blocks_is_written_and_read_back_empty(tmp_path, fmt):
    """The files of a layer of no blocks are one empty line each (``_text``), and the reader takes them
    (``_lines``); but golden.layout's bit (un)packing asked numpy to infer a dimension of no values, and
    such a set, hand-made or written, ended in numpy's "cannot reshape array of size 0", naming nothing."""
    from sop.golden.layout import LayerStream, pack_blocks, unpack_blocks
    from sop.golden.points import get_point

    point = get_point(fmt)
    lay = point.layout
    assert pack_blocks(lay, np.zeros(0, np.int64), np.zeros((0, lay.group), np.int64)) == b""
    headers, codes = unpack_blocks(lay, b"")
    assert headers.shape == (0,) and codes.shape == (0, lay.group)
    luts = np.zeros((lay.banks, 1 << lay.code_bits), np.int64)
    V.write_vectors(tmp_path / "v", {"w": LayerStream(lay, point.hif, luts, 0, 0, 2 * lay.group, b"")},
                    {"model": "m", "format": fmt})
    (entry,) = json.loads((tmp_path / "v" / "vectors.json").read_text())["layers"]
    assert (entry["rows"], entry["n_blocks"]) == (0, 0)
    for kind in ("blocks", "bf16", "exact", "exact_hex"):
        assert (tmp_path / "v" / entry["files"][kind]).read_text() == "\n", kind
    (layer,) = V.read_vectors(tmp_path / "v")
    assert layer.headers.shape == (0,) and layer.codes.shape == (0, lay.group)
    assert layer.expected_bf16.shape == (0,) and layer.expected_exact.shape == (0, 3)


def test_a_vector_set_of_no_layers_is_refused_written_or_read(tmp_path):
    """``write_vectors`` of no layers ended in an AttributeError; an index whose ``layers`` is empty (edited)
    was read as a set of nothing, over which an integrator's testbench checks nothing and passes."""
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'e'}: no layers to write")):
        V.write_vectors(tmp_path / "e", {}, {"model": "m", "format": "sop4-g16"})
    assert not (tmp_path / "e").exists()
    s = V.quantize_layer("sop4-g16", np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32), "w")
    V.write_vectors(tmp_path / "v", {"w": s}, {"model": "m", "format": "sop4-g16"})
    doc = json.loads((tmp_path / "v" / "vectors.json").read_text())
    doc["layers"] = []
    (tmp_path / "v" / "vectors.json").write_text(json.dumps(doc))
    with pytest.raises(V.VectorError, match=re.escape("vectors.json: field 'layers' is empty; a vector set holds")):
        V.read_vectors(tmp_path / "v")
