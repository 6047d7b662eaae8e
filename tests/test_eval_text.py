"""A held-out text of the user's own for a causal LM's end-to-end check (`sop eval --eval-text FILE`,
``eval_text=``; quantize/evaluate.py, quantize/calib.py): perplexity, KLD and top-1 are those of windows cut
from the file here and scored by plain torch and numpy (tests/test_causal_lm.py's ``independent_e2e``); the
report, the JSON's ``e2e.text`` and the calibration note name the file and its SHA-256; the same bytes as the
calibration text are one warning line; every bad file is one ``sop: error:`` line, exit 2, before any layer
(tests/test_calib_text.py's table, of ``--eval-text``); a sentence encoder and a model with no forward pass
refuse it."""

import hashlib
import json

import numpy as np
import pytest
import torch

from sop.quantize import causal_lm as L
from sop.quantize.calib import CalibSize
from sop.quantize.evaluate import evaluate

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from cli_run import run  # noqa: E402
from test_calib_text import SEQ, TEXT, WINDOWS, _bad_inputs, _text, refused_in_one_line  # noqa: E402
from test_calib_text import llama, tokenizer  # noqa: E402,F401 - the fixtures
from test_causal_lm import bpe_tokenizer, independent_e2e, make_folder  # noqa: E402

#: a held-out text that is neither the calibration text of these tests nor the built-in one
HELD = "".join(f"Row {i}: a bird flew over hill {i * 3} and the river ran north past the old mill.\n"
               for i in range(40))
Q_PROJ = ["--include", "*q_proj*"]


def _windows(tokenizer, text, bos: bool = False) -> torch.Tensor:
    """WINDOWS x SEQ tokens of ``text`` as docs/quantizer.md cuts them: tokenized whole without special tokens,
    its first tokens in order, the first of each window replaced by BOS where the tokenizer adds one."""
    assert (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) == bos
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    wins = torch.tensor(ids[:WINDOWS * SEQ]).view(WINDOWS, SEQ)
    if bos:
        wins[:, 0] = tokenizer.bos_token_id
    return wins


def _evaluated(folder, path, **kw) -> tuple[dict, dict]:
    """``evaluate`` of q_proj in nf4-g64 on ``path``'s windows: (the document, the reconstructions scored)."""
    recons = {}
    doc = evaluate(str(folder), ["nf4-g64"], include=["*q_proj*"], calibrate=False, e2e_windows=WINDOWS,
                   n_calib=CalibSize(seqs=WINDOWS, seq_len=SEQ), progress=False, eval_text=path,
                   on_format=lambda name, runner, r: recons.update(r), **kw)
    return doc, recons


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_the_figures_are_those_of_the_files_windows_computed_independently(llama, tmp_path_factory, tmp_path,
                                                                            bos):
    tok = bpe_tokenizer()
    folder = llama
    if bos:                                 # a tokenizer that adds a BOS: it takes each window's first place
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
        folder = make_folder(tmp_path_factory.mktemp("lm") / "llama-bos", "llama", tok)
    path = _text(tmp_path, "held.txt", HELD)
    doc, recons = _evaluated(folder, path)
    got = doc["formats"]["nf4-g64"]["e2e"]
    ppl, ppl_ref, kl_pq, _, top1, n = independent_e2e(folder, _windows(tok, HELD, bos), recons)
    assert got["tokens"] == n == WINDOWS * (SEQ - 1 - SEQ // 2) and got["windows"] == WINDOWS
    assert got["ppl"] == pytest.approx(ppl, rel=1e-6) and got["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-6)
    assert got["kld"] == pytest.approx(kl_pq, rel=1e-5) and got["top1"] == top1 and got["kld"] > 0
    # the built-in held-out text gives other figures: the file's were measured, not the built-in text's
    builtin = evaluate(str(folder), ["nf4-g64"], include=["*q_proj*"], calibrate=False, e2e_windows=WINDOWS,
                       n_calib=CalibSize(seqs=WINDOWS, seq_len=SEQ), progress=False)["formats"]["nf4-g64"]["e2e"]
    assert builtin["ppl_ref"] != pytest.approx(ppl_ref, rel=1e-3)


def test_json_table_and_note_name_the_file_and_its_sha256(llama, tokenizer, tmp_path, capsys):
    held, calib = _text(tmp_path, "held.txt", HELD), _text(tmp_path)
    digest = hashlib.sha256(HELD.encode()).hexdigest()
    js = tmp_path / "e.json"
    assert run(["eval", llama, "--format", "nf4-g64", "--format", "fp8-e4m3-pot", *Q_PROJ, "--calib-text", calib,
                "--eval-text", held, "--calib-seqs", WINDOWS, "--e2e-windows", WINDOWS, "--seq-len", SEQ,
                "--cache-dir", tmp_path / "c", "--json", js]) == 0
    cap = capsys.readouterr()
    assert not any(x.startswith("warning:") for x in cap.err.splitlines()), cap.err     # two texts: no overlap
    assert f"end-to-end reference: {WINDOWS} x {SEQ} held-out tokens of {held}" in cap.err.splitlines()
    doc = json.loads(js.read_text())
    for name in ("nf4-g64", "fp8-e4m3-pot"):
        assert doc["formats"][name]["e2e"]["text"] == {"path": str(held), "sha256": digest}
    assert doc["calibration"]["text"]["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    note = doc["calibration"]["note"]
    assert note.endswith(f"the end-to-end check, where one runs, measures on {held} instead of the built-in "
                         f"held-out text") and "keeps the built-in" not in note
    line = next(x for x in cap.out.splitlines() if x.startswith("e2e: next-token perplexity"))
    assert f" held-out tokens of {held} (SHA-256 {digest}) ({WINDOWS} windows of {SEQ}," in line
    # the figures are the file's, whatever the calibration (its cache holds no end-to-end figure)
    wins = _windows(tokenizer, HELD)
    ppl_ref = independent_e2e(llama, wins, {})[1]
    assert doc["formats"]["nf4-g64"]["e2e"]["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-6)


def test_the_same_bytes_as_the_calibration_text_are_one_warning_line(llama, tmp_path, capsys):
    calib, twin = _text(tmp_path), _text(tmp_path, "twin.txt")       # another name, the same bytes
    js = tmp_path / "e.json"
    assert run(["eval", llama, "--format", "nf4-g64", *Q_PROJ, "--calib-text", calib, "--eval-text", twin,
                "--calib-seqs", WINDOWS, "--e2e-windows", WINDOWS, "--seq-len", SEQ, "--cache-dir", tmp_path / "c",
                "--json", js, "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    digest = hashlib.sha256(TEXT.encode()).hexdigest()
    said = (f"warning: --eval-text {twin} and --calib-text {calib} are the same bytes (SHA-256 {digest}): the "
            f"end-to-end figures are measured on the calibration text, not held out")
    assert err == [said]
    doc = json.loads(js.read_text())
    assert said.removeprefix("warning: ") in doc["source"]["notes"]
    assert doc["calibration"]["note"].endswith(f"measures on {twin} instead of the built-in held-out text: the same "
                                               f"bytes, not held out")
    assert doc["formats"]["nf4-g64"]["e2e"]["text"] == {"path": str(twin), "sha256": digest}


#: the calibration text again in other bytes: (the held-out file's bytes, the warning's subject with {e} the
#: held-out file and {c} the calibration file, the calibration note's last words)
ASIDE = "(whitespace and a byte order mark aside)"
AGAIN = {
    "crlf": (TEXT.replace("\n", "\r\n").encode(), "{e} and {c} are the same text " + ASIDE, "the same text"),
    "bom": (b"\xef\xbb\xbf" + TEXT.encode(), "{e} and {c} are the same text " + ASIDE, "the same text"),
    "grown": ((TEXT + "One more line, written after the calibration.\n").encode(),
              "{e} begins with the whole text of {c} " + ASIDE, "the calibration text's start"),
    "cut": (TEXT[:len(TEXT) // 2].encode(), "{c} begins with the whole text of {e} " + ASIDE,
            "the calibration text's start"),
}


@pytest.mark.parametrize("case", AGAIN)
def test_the_calibration_text_in_other_bytes_is_one_warning_line_too(llama, tmp_path, capsys, case):
    """Both texts' windows are cut from their start: a CRLF or BOM copy of the calibration text measures the
    calibration text again, and the text grown by a line or cut in half gives the calibration's own windows
    (their SHA-256s differ: those runs said nothing); said as the same bytes are, in one warning line."""
    data, subject, last = AGAIN[case]
    calib, held = _text(tmp_path), tmp_path / "held.txt"
    held.write_bytes(data)
    js = tmp_path / "e.json"
    assert run(["eval", llama, "--format", "nf4-g64", *Q_PROJ, "--calib-text", calib, "--eval-text", held,
                "--calib-seqs", WINDOWS, "--e2e-windows", WINDOWS, "--seq-len", SEQ, "--cache-dir", tmp_path / "c",
                "--json", js, "--quiet"]) == 0
    said = (subject.format(e=f"--eval-text {held}", c=f"--calib-text {calib}")
            + ": the end-to-end figures are measured on the calibration text, not held out")
    assert capsys.readouterr().err.splitlines() == [f"warning: {said}"]
    doc = json.loads(js.read_text())
    assert said in doc["source"]["notes"]
    assert doc["calibration"]["note"].endswith(f"measures on {held} instead of the built-in held-out text: {last}, "
                                               f"not held out")


BAD = ["missing", "folder", "pipe", "not-utf8", "nul", "empty", "bom-only", "empty-name", "blank", "short",
       "no-e2e", "model-file", "output"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_held_out_text_is_one_line_exit_2_before_any_layer(llama, tokenizer, tmp_path, capsys, case):
    args, said = _bad_inputs(tmp_path, llama, tokenizer, "--eval-text")[case]
    out = tmp_path / "out.json"
    lines = refused_in_one_line(["eval", llama, "--format", "nf4-g64", "--calib-seqs", WINDOWS, "--e2e-windows",
                                 WINDOWS, "--seq-len", SEQ, "--cache-dir", tmp_path / "c", "--json", out, *args],
                                tmp_path, out, said, capsys)
    assert not any(x.startswith("calibrating") for x in lines)          # before the calibration too


def test_a_sentence_encoder_and_a_model_without_a_forward_pass_refuse_it_in_one_line(tmp_path, capsys):
    from safetensors.numpy import save_file

    path = _text(tmp_path)
    assert run(["eval", "minilm", "--format", "nf4-g64", "--no-calib", "--eval-text", path]) == 2
    assert capsys.readouterr().err == (f"sop: error: --eval-text {path}: only a causal LM measures its end-to-end "
                                       f"check on a text file; minilm is a sentence encoder: leave --eval-text out\n")
    weights = tmp_path / "w.safetensors"
    save_file({"layer.weight": np.ones((8, 16), np.float32)}, str(weights))
    assert run(["eval", weights, "--format", "nf4-g64", "--no-calib", "--eval-text", path]) == 2
    assert capsys.readouterr().err == (f"sop: error: --eval-text {path}: only a causal LM measures its end-to-end "
                                       f"check on a text file; {weights} is no causal LM: leave --eval-text out\n")


def test_a_held_out_text_above_the_size_limit_is_refused_unread_naming_eval_text(llama, tmp_path, monkeypatch):
    from sop.quantize import calib as C

    path = _text(tmp_path, "held.txt", HELD)
    monkeypatch.setattr(C, "MAX_CALIB_TEXT_BYTES", len(HELD.encode()) - 1)

    def no_read(*args, **kwargs):
        raise AssertionError(f"opened {args}: a file above the limit must be refused unread")

    monkeypatch.setattr("builtins.open", no_read)
    with pytest.raises(ValueError, match=f"^eval_text='{path}': {len(HELD.encode()):,} bytes, more than the "
                                         f"{len(HELD.encode()) - 1:,} .* a held-out text may have; give a shorter"):
        evaluate(str(llama), ["nf4-g64"], eval_text=path, progress=False)


def test_a_name_with_a_line_break_and_an_escape_prints_the_report_lines_whole(llama, tmp_path, capsys):
    """The table names the held-out file (and the calibration note both files): a name holding a line break or an
    escape sequence is printed on its report line, escaped as the progress lines escape it, not run or split."""
    odd = _text(tmp_path, "held\n\x1b[2Jtext.txt", HELD)
    assert run(["eval", llama, "--format", "nf4-g64", *Q_PROJ, "--calib-text", _text(tmp_path), "--eval-text", odd,
                "--calib-seqs", WINDOWS, "--e2e-windows", WINDOWS, "--seq-len", SEQ, "--cache-dir", tmp_path / "c",
                "--quiet"]) == 0
    out = capsys.readouterr().out
    shown = f"{tmp_path}/held \\x1b[2Jtext.txt"
    e2e = [x for x in out.splitlines() if x.startswith("e2e: ")]
    assert len(e2e) == 1 and f" held-out tokens of {shown} (SHA-256 " in e2e[0], out
    cal = [x for x in out.splitlines() if x.startswith("calibration: ")]
    assert len(cal) == 1 and cal[0].endswith(f"measures on {shown} instead of the built-in held-out text"), out
    assert "\x1b" not in out
