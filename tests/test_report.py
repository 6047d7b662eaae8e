"""`sop report`: the markdown table and the SQNR-vs-bpw PNG of a real `sop eval --json` file, the
Pareto front on hand-made points, and bad input."""

import json
import math
import re
import struct
import zlib

import numpy as np
import pytest

from sop.cli import main
from sop.quantize.report import pareto_front, report

FORMATS = ["fp8-e4m3-pot", "nf4-g64", "mxfp4", "nvfp4", "mxfp6-e2m3", "e2m3-ue4m4-g16"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "eval.json"
    args = ["eval", "minilm", "--include", "encoder.layer.0.attention.self.*", "--no-calib", "--no-e2e",
            "--quiet", "--json", str(out)]
    assert main(args + sum((["--format", f] for f in FORMATS), [])) == 0
    return out


def table_rows(md: str) -> list[list[str]]:
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[1:]]     # after the head row


def check_png(data: bytes) -> tuple[int, int]:
    """Width and height of a well-formed PNG (signature, IHDR, IEND, every chunk's CRC)."""
    assert data[:8] == PNG_MAGIC
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND" and pos == len(data)
    return struct.unpack(">II", chunks[0][1][:8])


def brute_front(points, tol):
    """Pareto membership by the definition, one pair at a time."""
    out = []
    for i, (bi, si) in enumerate(points):
        dominated = any(bj - bi <= tol and sj >= si and (bj - bi < -tol or sj > si)
                        for j, (bj, sj) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def test_report_writes_the_table_and_the_plot(eval_json, capsys):
    assert main(["report", str(eval_json)]) == 0
    printed = capsys.readouterr().out
    md_path, png_path = eval_json.with_suffix(".md"), eval_json.with_suffix(".png")
    md = md_path.read_text()
    rows = table_rows(md)
    assert sorted(r[0] for r in rows) == sorted(FORMATS)               # one row per format
    assert table_rows(printed) == rows
    doc = json.loads(eval_json.read_text())["formats"]
    bpw = [float(r[1]) for r in rows]
    assert bpw == sorted(bpw)
    for r in rows:
        f = doc[r[0]]
        assert float(r[1]) == pytest.approx(f["bpw"], abs=5e-4)
        assert float(r[2]) == pytest.approx(f["sqnr_db"], abs=5e-3)
        assert float(r[3]) == pytest.approx(f["rel_mse"], rel=1e-3)
        assert float(r[4]) == pytest.approx(f["acos"], abs=1e-6)
    assert "e2e" not in md                                             # every e2e was skipped
    points = [(doc[r[0]]["bpw"], doc[r[0]]["sqnr_db"]) for r in rows]
    assert [r[-1] == "yes" for r in rows] == brute_front(points, 0.01)
    # on these layers the FP6 point beats FP8 with fewer bits: FP8 is dominated
    assert {r[0]: r[-1] for r in rows}["fp8-e4m3-pot"] == ""
    assert {r[0]: r[-1] for r in rows}["e2m3-ue4m4-g16"] == "yes"
    w, h = check_png(png_path.read_bytes())
    assert w > 600 and h > 400
    assert f"![SQNR against bpw]({png_path.name})" in md
    assert not list(eval_json.parent.glob(".*.tmp"))


def test_e2e_columns_and_exact_formats(eval_json, tmp_path, capsys):
    doc = json.loads(eval_json.read_text())
    doc["formats"]["nf4-g64"]["e2e"] = {"metric": "sentence-embedding cosine", "sentences": 64,
                                        "cos_mean": 0.97386, "cos_min": 0.96248}
    doc["formats"]["int8-ch"] = {**doc["formats"]["fp8-e4m3-pot"], "bpw": 8.0625, "sqnr_db": None}
    src = tmp_path / "e.json"
    src.write_text(json.dumps(doc))
    assert main(["report", str(src), "--out", str(tmp_path / "sub" / "r")]) == 0
    md = (tmp_path / "sub" / "r.md").read_text()
    head = [l for l in md.splitlines() if l.startswith("| format")][0]
    assert "e2e cos mean" in head and "e2e cos min" in head
    rows = {r[0]: r for r in table_rows(md)}
    assert rows["nf4-g64"][5:7] == ["0.97386", "0.96248"] and rows["mxfp4"][5:7] == ["-", "-"]
    assert rows["int8-ch"][2] == "inf" and rows["int8-ch"][-1] == "yes"     # exact: infinite SQNR
    check_png((tmp_path / "sub" / "r.png").read_bytes())


def test_causal_lm_columns_kld_front_and_panel(eval_json, tmp_path):
    """Hand-set causal-LM results: ppl / KLD / top-1 columns, the KLD front by the definition (fewer
    bits, lower KLD), a KLD of exactly 0 listed but kept off the log panel, two panels side by side."""
    doc = json.loads(eval_json.read_text())
    kld = {"fp8-e4m3-pot": 0.016, "nf4-g64": 0.25, "mxfp4": 0.47, "nvfp4": 0.21, "mxfp6-e2m3": 0.0,
           "e2m3-ue4m4-g16": 0.0053}
    for i, (name, k) in enumerate(kld.items()):
        doc["formats"][name]["e2e"] = {"metric": "causal-lm", "tokens": 2032, "ppl": 36.0 + 10 * k,
                                       "ppl_ref": 36.0, "kld": k, "top1": 1 - k / 2}
    src = tmp_path / "lm.json"
    src.write_text(json.dumps(doc))
    assert main(["report", str(src)]) == 0
    md = (tmp_path / "lm.md").read_text()
    head = [l for l in md.splitlines() if l.startswith("| format")][0]
    assert [c.strip() for c in head.strip("|").split("|")][-5:] == ["ppl", "KLD", "top-1", "Pareto", "KLD front"]
    rows = {r[0]: r for r in table_rows(md)}
    for name, k in kld.items():
        assert float(rows[name][6]) == pytest.approx(k, rel=1e-3) and float(rows[name][5]) == pytest.approx(36 + 10 * k)
    points = [(doc["formats"][n]["bpw"], -kld[n]) for n in rows]          # lower KLD is better
    assert [rows[n][-1] == "yes" for n in rows] == brute_front(points, 0.01)
    assert rows["mxfp6-e2m3"][-1] == "yes" and rows["fp8-e4m3-pot"][-1] == ""
    assert "KLD front (fewer bits, lower mean KL divergence" in md and "2,032 held-out tokens" in md
    w, h = check_png((tmp_path / "lm.png").read_bytes())
    assert w > 2 * h
    doc["formats"]["nvfp4"]["e2e"]["kld"] = -0.1                       # a KL divergence is never negative
    src.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"formats.nvfp4.e2e: field 'kld' must be 0 or a finite number from "
                                         r"1e-100 to 1e\+100, got -0.1$"):
        report(src)


def test_numbers_at_the_ends_of_their_ranges_make_a_whole_report(tmp_path):
    """Every number at an end of its ``FIELD_RANGES`` range: a report, no warning (they are errors
    here), a perplexity of exp(709) as a figure of a few characters, not 309 digits. Every row holds the largest
    token count (one `sop eval` run scores every format on the same tokens: rows of different counts are refused)."""
    def lm(kld, ppl, top1):
        return {"metric": "causal-lm", "tokens": 2 ** 53, "ppl": ppl, "ppl_ref": 1.0, "kld": kld, "top1": top1}
    doc = {"model": "m", "formats": {
        "a": {"bpw": 5e-324, "sqnr_db": -1000, "rel_mse": 0, "acos": -1, "e2e": lm(1e-100, 1.7976931348623157e308, 0)},
        "b": {"bpw": 1024, "sqnr_db": 1000, "rel_mse": 1e300, "acos": 1, "e2e": lm(1e100, 1.0, 1)},
        "c": {"bpw": 8, "sqnr_db": None, "rel_mse": 0, "acos": 1, "e2e": lm(0, 1e6, 1)},
        "d": {"bpw": 9, "sqnr_db": 1, "rel_mse": 1, "acos": 0, "e2e": lm(30, None, 0)}}}     # exp(NLL) past float64
    src = tmp_path / "ends.json"
    src.write_text(json.dumps(doc))
    assert main(["report", str(src)]) == 0
    rows = {r[0]: r for r in table_rows((tmp_path / "ends.md").read_text())}
    assert rows["a"][5:8] == ["1.7977e+308", "1.000e-100", "0.0000"]
    assert rows["b"][5:8] == ["1.000", "1.000e+100", "1.0000"]
    assert rows["c"][2] == "inf" and rows["c"][5:7] == ["1.0000e+06", "0.000e+00"]
    assert rows["d"][5] == "inf"
    check_png((tmp_path / "ends.png").read_bytes())


def test_the_eval_of_a_one_weight_model_makes_a_report(tmp_path):
    """A layer of one weight pays a whole block and its tables (752 bpw at e2m3-ue4m4-g16, 264 at
    mxfp8-e4m3): `sop report` refused the file `sop eval` had just written ('bpw' at most 64)."""
    from safetensors.numpy import save_file

    ckpt, out = tmp_path / "one.safetensors", tmp_path / "one.json"
    save_file({"fc.weight": np.array([[0.75]], np.float32)}, str(ckpt))
    formats = sum((["--format", f] for f in ("e2m3-ue4m4-g16", "mxfp8-e4m3", "sop4-g16")), [])
    assert main(["eval", str(ckpt), *formats, "--no-calib", "--no-e2e", "--quiet", "--json", str(out)]) == 0
    assert max(f["bpw"] for f in json.loads(out.read_text())["formats"].values()) == 752
    assert main(["report", str(out)]) == 0
    assert len(table_rows((tmp_path / "one.md").read_text())) == 3
    check_png((tmp_path / "one.png").read_bytes())


def test_a_format_name_with_a_pipe_or_a_newline_stays_one_table_cell(tmp_path):
    row = {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}
    src = tmp_path / "names.json"
    src.write_text(json.dumps({"model": "m", "formats": {"a|b": row, "c\nd": {**row, "bpw": 6.5}}}))
    assert main(["report", str(src)]) == 0
    lines = [l for l in (tmp_path / "names.md").read_text().splitlines() if l.startswith("| ")]
    assert [l.replace("\\|", "").count("|") for l in lines] == [7] * 3          # six columns on each line
    assert lines[1].startswith("| a\\|b | 4.500 |") and lines[2].startswith("| c d | 6.500 |")


def test_pareto_front_on_hand_made_points():
    #            bpw    SQNR
    pts = [(4.25, 18.6),     # 0 cheapest: on the front
           (4.5, 20.5),      # 1 dominated by 2 (same bpw, more SQNR)
           (4.5, 22.0),      # 2 on
           (6.25, 30.9),     # 3 on
           (6.5, 33.9),      # 4 on
           (6.5, 33.9),      # 5 equal to 4: both on
           (8.0, 31.5),      # 6 dominated by 4
           (8.25, 30.3),     # 7 dominated by 4 and 6
           (8.06, 40.0),     # 8 on
           (9.0, math.nan),  # 9 NaN: never on the front
           (3.0, math.nan)]  # 10 NaN dominates nothing
    want = [True, False, True, True, True, True, False, False, True, False, False]
    b, s = np.array(pts).T
    assert pareto_front(b, s).tolist() == want
    # a tolerance makes near-equal bit costs equal: 4.501 with more SQNR now dominates 4.5
    b2, s2 = [4.5, 4.501, 6.5], [22.0, 23.3, 33.0]
    assert pareto_front(b2, s2).tolist() == [True, True, True]
    assert pareto_front(b2, s2, bpw_tol=0.01).tolist() == [False, True, True]
    assert pareto_front([5.0, 4.0], [math.inf, 20.0]).tolist() == [True, True]
    assert pareto_front([4.0, 5.0], [math.inf, 20.0]).tolist() == [True, False]
    with pytest.raises(ValueError, match="one length"):
        pareto_front([1.0, 2.0], [1.0])


def test_pareto_front_against_the_definition_on_random_points():
    rng = np.random.default_rng(3)
    for _ in range(30):
        b = rng.choice([4.25, 4.5, 4.5005, 6.25, 6.5, 8.0], size=9)
        s = rng.integers(15, 35, size=9).astype(float)
        for tol in (0.0, 0.01):
            assert pareto_front(b, s, tol).tolist() == brute_front(list(zip(b, s)), tol)


@pytest.mark.parametrize("content, want", [
    (None, "no such eval JSON"),
    ("not json", "not valid JSON"),
    ('{"model": "m"}', "field 'formats' is missing"),
    ('{"formats": {"nf4-g64": {"bpw": "4.5", "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}',
     "'bpw' must be a number"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "rel_mse": 0.01, "acos": 0.99}}}', "'sqnr_db' is missing"),
    # numbers no eval writes: each refused naming the field, never a warning, an overflow or a 'nan' cell
    ('{"formats": {"nf4-g64": {"bpw": 1%s, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}' % ("0" * 400),
     "formats.nf4-g64: field 'bpw' must be a finite number above 0 and at most 1024, got an integer of 401 digits"),
    ('{"formats": {"nf4-g64": {"bpw": Infinity, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}',
     "field 'bpw' must be a finite number above 0 and at most 1024, got inf"),
    ('{"formats": {"nf4-g64": {"bpw": -4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}',
     "field 'bpw' must be a finite number above 0 and at most 1024, got -4.5"),
    ('{"formats": {"nf4-g64": {"bpw": 0, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}',
     "field 'bpw' must be a finite number above 0 and at most 1024, got 0"),          # the open end itself
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": NaN, "rel_mse": 0.01, "acos": 0.99}}}',
     "field 'sqnr_db' must be a finite number from -1000 to 1000, got nan"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": -1e308, "rel_mse": 0.01, "acos": 0.99}}}',
     "field 'sqnr_db' must be a finite number from -1000 to 1000, got -1e+308"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 1e308, "rel_mse": 0.01, "acos": 0.99}}}',
     "field 'sqnr_db' must be a finite number from -1000 to 1000, got 1e+308"),
    # past Python's 4300 digits: once "Exceeds the limit (4300 digits) ...", naming neither file nor field
    ('{"formats": {"nf4-g64": {"bpw": 1%s, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}' % ("0" * 5000),
     "formats.nf4-g64: field 'bpw' must be a finite number above 0 and at most 1024, got an integer of 5001 digits"),
    ('{"formats": {"nf4-g64": {"bpw": -1%s, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}' % ("0" * 5000),
     "field 'bpw' must be a finite number above 0 and at most 1024, got an integer of 5001 digits"),
    ('{"formats": {"nf4-g64": {"bpw": "%s", "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}}}' % ("4" * 5000),
     "field 'bpw' must be a number, got '444"),                      # cut short: one short line
    # a positive KLD the log panel cannot span (its padded limits left float64: an overflow warning)
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99, "e2e": {"metric": '
     '"causal-lm", "tokens": 2032, "ppl": 36.1, "ppl_ref": 36, "kld": 5e-324, "top1": 0.9}}}}',
     "formats.nf4-g64.e2e: field 'kld' must be 0 or a finite number from 1e-100 to 1e+100, got 5e-324"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99, "e2e": {"metric": '
     '"causal-lm", "tokens": 0.5, "ppl": 36.1, "ppl_ref": 36, "kld": 0.1, "top1": 0.9}}}}',
     "formats.nf4-g64.e2e: field 'tokens' must be a whole number from 1 to 9.0072e+15, got 0.5"),
    # an end-to-end metric the report does not know was left out of the table without a word
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99, "e2e": {"metric": '
     '"wikitext-ppl", "ppl": 7.1}}}}',
     "formats.nf4-g64.e2e: field 'metric' must be 'sentence-embedding cosine' or 'causal-lm'"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99, "e2e": {"cos_mean": 0.9}}}}',
     "(or the entry {\"skipped\": reason}), got none"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99, "e2e": {"metric": '
     '"sentence-embedding cosine", "sentences": 64, "cos_mean": 0.9}}}}',
     "formats.nf4-g64.e2e: field 'cos_min' is missing"),
    ('{"formats": {"nf4-g64": {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99, "e2e": [0.9]}}}',
     "formats.nf4-g64: field 'e2e' must be an object, got [0.9]"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, content, want):
    src = tmp_path / "e.json"
    if content is not None:
        src.write_text(content)
    assert main(["report", str(src)]) == 2
    err = capsys.readouterr().err
    assert want in err and err.startswith(f"sop: error: {src}" if content else "sop: error: ") and \
        err.count("\n") == 1 and len(err) < 300 + len(str(src)), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["e.json"])


def test_names_no_font_or_utf8_can_hold_and_dollar_signs_make_a_whole_report(tmp_path):
    """A model path that was no UTF-8 (`sop eval` writes its lone surrogate as \\udcff), a format name
    with a pair of $ (mathtext to matplotlib), a bad one, a newline and a name too long to lay out: a
    report with every name shown as written, one line each, and no warning (warnings are errors here)."""
    row = {"bpw": 4.5, "sqnr_db": 20, "rel_mse": 0.01, "acos": 0.99}
    names = ["$x^2$", "$\\notacommand$", "w\udcff", "L" * 3000]
    src = tmp_path / "odd.json"
    src.write_text(json.dumps({"model": "dir/w\udcff\nx.safetensors", "source": {"layers": 1, "weights": 64},
                               "formats": {n: {**row, "bpw": 4.5 + i} for i, n in enumerate(names)}}))
    assert main(["report", str(src)]) == 0
    md = (tmp_path / "odd.md").read_text(encoding="utf-8")
    assert md.startswith("# Quantization report: dir/w\\udcff x.safetensors\n")
    assert "dir/w\\udcff x.safetensors: 1 linear layer, 64 weights" in md
    cells = [r[0] for r in table_rows(md)]
    assert cells == ["$x^2$", "$\\notacommand$", "w\\udcff", "L" * 3000]
    check_png((tmp_path / "odd.png").read_bytes())


def test_many_formats_are_plotted_without_labels(monkeypatch):
    """Labels are spread apart by a quadratic relaxation (``_spread``): past MAX_LABELS points a panel
    has none, so a JSON of hundreds of formats is a report, not a long wait."""
    from sop.quantize import report as R

    spread, calls = R._spread, []
    monkeypatch.setattr(R, "_spread", lambda y, *a, **k: calls.append(len(y)) or spread(y, *a, **k))
    rows = [{"format": f"f{i}", "bpw": 4 + i / 100, "sqnr_db": 20 + (i % 7), "pareto": i % 5 == 0}
            for i in range(400)]
    check_png(R.plot_png(rows[:R.MAX_LABELS], "t"))
    check_png(R.plot_png(rows, "t"))
    assert calls == [R.MAX_LABELS]


def test_a_home_matplotlib_cannot_write_is_no_warning(eval_json, tmp_path):
    """Under a HOME where matplotlib can write no config or cache folder (read-only or missing: containers,
    CI), `sop report` printed matplotlib's 'mkdir -p failed for path ...' and 'Matplotlib created a temporary
    cache directory ...' and built its font cache again in a new temporary folder every run. Now one folder
    of sop's own in the temporary folder, kept between runs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME="/proc/self", TMPDIR=str(tmp_path))        # no folder can be made there, root or not
    own = tmp_path / f"sop-matplotlib-{os.getuid()}"
    for run in range(2):
        stem = tmp_path / f"r{run}"
        done = subprocess.run([sys.executable, "-m", "sop.cli", "report", str(eval_json), "--out", str(stem)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert stem.with_suffix(".png").is_file()
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [own.name]
        assert any(own.glob("fontlist-*.json")) and (own.stat().st_mode & 0o777) == 0o700


def test_a_sopq_given_for_its_eval_is_named_as_one(tmp_path, capsys):
    """`sop report X.sopq` said 'not valid JSON ('utf-8' codec can't decode ...)' (an outside probe)."""
    from sop.quantize.artifact import MAGIC

    src = tmp_path / "m.sopq"
    src.write_bytes(MAGIC + b"\x93\x00" + bytes(64))
    assert main(["report", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sop: error: {src}: a .sopq artifact, not an eval JSON: `sop report` reads what `sop eval")
    assert err.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m.sopq"]


def test_rows_are_sorted_by_the_exact_bpw_then_by_sqnr_highest_first():
    """docs/quantizer.md's order: bpw unrounded (4.5 before 4.5001, both printed 4.500), then, at one
    bpw, the higher SQNR first (nvfp4-46 above nvfp4 at their common cost); a name breaks a full tie."""
    from sop.quantize.report import load_rows

    row = {"rel_mse": 0.01, "acos": 0.99}
    formats = {"nvfp4": {**row, "bpw": 4.5001, "sqnr_db": 20.50}, "nf4-g64": {**row, "bpw": 4.5, "sqnr_db": 20.55},
               "nvfp4-46": {**row, "bpw": 4.5001, "sqnr_db": 21.24}, "b": {**row, "bpw": 6.0, "sqnr_db": 30.0},
               "if4": {**row, "bpw": 4.5001, "sqnr_db": 22.01}, "a": {**row, "bpw": 6.0, "sqnr_db": 30.0}}
    rows = load_rows({"model": "m", "formats": formats})
    assert [r["format"] for r in rows] == ["nf4-g64", "if4", "nvfp4-46", "nvfp4", "a", "b"]


def test_a_stem_named_as_one_of_its_files_is_refused(eval_json, tmp_path, capsys):
    """`sop report E.json --out figs/report.md` (or `.png`) wrote figs/report.md.md and figs/report.md.png, exit 0:
    the stem takes the suffixes after it. One line naming the stem to give, nothing written."""
    for name in ("report.md", "report.png", "report.MD"):
        assert main(["report", str(eval_json), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sop: error: ") and "\n" not in err, err
        assert f"({name}.md, {name}.png); give {tmp_path / 'report'}" in err, err
        with pytest.raises(ValueError, match=r"not the stem of the files to write"):
            report(eval_json, stem=tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    assert main(["report", str(eval_json), "--out", str(tmp_path / "report.v2")]) == 0   # another dot is the stem's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.v2.md", "report.v2.png"]


def test_the_kld_front_line_names_the_held_out_text_file(eval_json, tmp_path):
    """`sop eval --eval-text FILE` records ``e2e.text`` ``{"path", "sha256"}``: the report's KLD-front line names
    the file and its SHA-256 (it said only "N held-out tokens", as of the built-in text); formats measured on
    different texts (JSON merged by hand) are refused, and a malformed ``text`` is named."""
    doc = json.loads(eval_json.read_text())
    digest = "ab" * 32
    for name in doc["formats"]:
        doc["formats"][name]["e2e"] = {"metric": "causal-lm", "tokens": 2032, "ppl": 37.0, "ppl_ref": 36.0,
                                       "kld": 0.1, "top1": 0.9, "text": {"path": "my held.txt", "sha256": digest}}
    src = tmp_path / "lm.json"
    src.write_text(json.dumps(doc))
    report(src)
    md = (tmp_path / "lm.md").read_text()
    assert f"2,032 held-out tokens of `my held.txt` (SHA-256 {digest})): " in md
    first, *others = doc["formats"]
    del doc["formats"][first]["e2e"]["text"]                 # one format on the built-in text, the others on a file
    src.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"lm.json: the formats' end-to-end figures were measured on different "
                                         r"held-out texts"):
        report(src)
    doc["formats"][first]["e2e"]["text"] = "my held.txt"
    src.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"formats.{first}.e2e: field 'text' must be "):
        report(src)


def test_one_held_out_text_named_by_two_paths_is_one_text(eval_json, tmp_path):
    """Formats measured on one text file named from two folders (``held.txt``, ``/data/held.txt``: JSON documents
    of two runs merged by hand) are measured on one text, its SHA-256 the same: the report is written, naming the
    first row's path (it said they were "measured on different held-out texts"); another SHA-256 is refused."""
    doc = json.loads(eval_json.read_text())
    for i, name in enumerate(doc["formats"]):
        doc["formats"][name]["e2e"] = {"metric": "causal-lm", "tokens": 2032, "ppl": 37.0, "ppl_ref": 36.0,
                                       "kld": 0.1, "top1": 0.9,
                                       "text": {"path": "/data/held.txt" if i else "held.txt", "sha256": "ab" * 32}}
    assert len(doc["formats"]) > 1
    src = tmp_path / "lm.json"
    src.write_text(json.dumps(doc))
    report(src)
    md = (tmp_path / "lm.md").read_text()
    assert re.search(rf"2,032 held-out tokens of `(/data/)?held.txt` \(SHA-256 {'ab' * 32}\)\): ", md), md
    doc["formats"][name]["e2e"]["text"]["sha256"] = "cd" * 32
    src.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"lm.json: the formats' end-to-end figures were measured on different "):
        report(src)


def test_formats_measured_on_different_token_counts_are_refused(eval_json, tmp_path):
    """Two runs' JSON merged by hand, one with ``--e2e-windows 2`` (254 tokens) and one with the default 16 x 256
    (2,032), on the built-in held-out text: the report was written, its KLD front comparing figures of different
    tokens and its line saying "2,032 held-out tokens" for every row. Refused in one line naming both counts,
    nothing written; the same count in every row is written as before."""
    doc = json.loads(eval_json.read_text())
    assert len(doc["formats"]) > 1
    for i, name in enumerate(doc["formats"]):
        doc["formats"][name]["e2e"] = {"metric": "causal-lm", "tokens": 254 if i else 2032, "ppl": 37.0,
                                       "ppl_ref": 36.0, "kld": 0.1, "top1": 0.9}
    src = tmp_path / "lm.json"
    src.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"lm.json: the formats' end-to-end figures were measured on different "
                                         r"numbers of held-out tokens \(e2e.tokens: 254, 2,032\)"):
        report(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.json"]
    for name in doc["formats"]:
        doc["formats"][name]["e2e"]["tokens"] = 254
    src.write_text(json.dumps(doc))
    report(src)
    assert "(fewer bits, lower mean KL divergence of the next-token distributions against the unquantized model, " \
           "254 held-out tokens): " in (tmp_path / "lm.md").read_text()
