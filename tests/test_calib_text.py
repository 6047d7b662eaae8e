"""A calibration text of the user's own (``--calib-text FILE``, ``calib_text=``; quantize/calib.py): a causal LM's
statistics are the mean squares of each linear's inputs over the windows cut from the file, recomputed here by
hooks; the cache is keyed by the file's bytes (a changed file a miss, the same bytes elsewhere a hit); the
report and the JSON name the file; every bad input is one ``sop: error:`` line, exit 2, before any layer is
quantized; a sentence encoder refuses it."""

import json
import os
import threading

import numpy as np
import pytest
import torch

from sop.quantize import calib as C
from sop.quantize import causal_lm as L
from sop.quantize.artifact import quantize_model
from sop.quantize.evaluate import evaluate
from sop.quantize.models import open_model

transformers = pytest.importorskip("transformers")
L.quiet_transformers()

from cli_run import run  # noqa: E402
from test_causal_lm import SEQ, make_folder, reference_model  # noqa: E402
from test_causal_lm import bpe_tokenizer as _bpe_tokenizer  # noqa: E402

WINDOWS = 2
#: a text that is not the built-in one: numbered lines, so that its windows are its own
TEXT = "".join(f"Line {i}: the cat sat on mat number {i * 7} while the dog barked twice.\n" for i in range(60))


@pytest.fixture(scope="module")
def tokenizer():
    return _bpe_tokenizer()


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer):
    return make_folder(tmp_path_factory.mktemp("lm") / "llama", "llama", tokenizer)


def _text(tmp_path, name="calib.txt", text=TEXT):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _size(path, model):
    return C.with_calib_text(C.CalibSize(seqs=WINDOWS, seq_len=SEQ), path, True, str(model))


def _hooked_mean_squares(folder, tokenizer, text, bos: bool = False) -> dict[str, np.ndarray]:
    """The mean square of each q/k/v projection's input (its block's input layer norm) over the file's windows:
    tokenized here, cut into WINDOWS x SEQ (``bos``: the tokenizer adds a BOS, which takes the place of each
    window's first token, as docs/quantizer.md says; else the windows are the text's own tokens) and run through
    transformers' own model with hooks."""
    assert (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id) == bos
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:WINDOWS * SEQ]
    wins = torch.tensor(ids).view(WINDOWS, SEQ)
    if bos:
        wins[:, 0] = tokenizer.bos_token_id
    ref = reference_model(folder)
    seen: dict[str, torch.Tensor] = {}
    hooks = [ref.model.layers[i].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(f"model.layers.{i}", args[0].detach()))
        for i in range(2)]
    with torch.inference_mode():
        ref(input_ids=wins)
    for h in hooks:
        h.remove()
    return {f"model.layers.{i}.self_attn.{p}_proj.weight": (seen[f"model.layers.{i}"].double() ** 2)
            .reshape(-1, 32).mean(0).numpy() for i in range(2) for p in "qkv"}


def test_statistics_are_the_hooked_mean_squares_over_the_files_windows(llama, tokenizer, tmp_path):
    path = _text(tmp_path)
    cal = C.calibrate(open_model(str(llama)), _size(path, llama), tmp_path / "c")
    assert cal.weighted and cal.tokens == WINDOWS * SEQ and cal.seqs == WINDOWS and cal.seq_len == SEQ
    want = _hooked_mean_squares(llama, tokenizer, TEXT)
    for name, ms in want.items():
        np.testing.assert_allclose(cal.act_ms[name], ms, rtol=1e-6, err_msg=name)
    builtin = C.calibrate(open_model(str(llama)), C.CalibSize(seqs=WINDOWS, seq_len=SEQ), tmp_path / "c")
    assert builtin.key != cal.key
    assert not np.allclose(builtin.act_ms[next(iter(want))], cal.act_ms[next(iter(want))])


def test_a_tokenizer_that_adds_a_bos_puts_it_first_in_each_window(llama, tmp_path_factory, tmp_path):
    from tokenizers import processors

    tokenizer = _bpe_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    folder = make_folder(tmp_path_factory.mktemp("lm") / "llama-bos", "llama", tokenizer)
    path = _text(tmp_path)
    # llama's weights, its tokenizer another: the same file's statistics cached for llama are not these
    assert (folder / "model.safetensors").read_bytes() == (llama / "model.safetensors").read_bytes()
    other = C.calibrate(open_model(str(llama)), _size(path, llama), tmp_path / "c")
    cal = C.calibrate(open_model(str(folder)), _size(path, folder), tmp_path / "c")
    assert not cal.cached and cal.key != other.key and cal.tokens == WINDOWS * SEQ
    for name, ms in _hooked_mean_squares(folder, tokenizer, TEXT, bos=True).items():
        np.testing.assert_allclose(cal.act_ms[name], ms, rtol=1e-6, err_msg=name)


def test_the_cache_is_keyed_by_the_files_bytes_not_its_path(llama, tmp_path):
    path = _text(tmp_path)
    first = C.calibrate(open_model(str(llama)), _size(path, llama), tmp_path / "c")
    assert not first.cached
    twin = _text(tmp_path, "elsewhere.txt")                   # the same bytes under another name: a hit
    again = C.calibrate(open_model(str(llama)), _size(twin, llama), tmp_path / "c")
    assert again.cached and again.key == first.key and str(twin) in again.note and str(path) not in again.note
    assert again.text == {"path": str(twin), "sha256": first.text["sha256"]}
    for name, ms in first.act_ms.items():
        np.testing.assert_array_equal(again.act_ms[name], ms)
    for seqs, seq_len in ((1, SEQ), (1, 2 * SEQ)):          # the same file and tokens, other windows: a miss
        shape = C.with_calib_text(C.CalibSize(seqs=seqs, seq_len=seq_len), path, True, str(llama))
        other = C.calibrate(open_model(str(llama)), shape, tmp_path / "c")
        assert not other.cached and other.key != first.key and other.tokens == seqs * seq_len
    stat = path.stat()
    path.write_bytes(TEXT.replace("cat", "cow").encode())       # the same size, path and time: another text
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = C.calibrate(open_model(str(llama)), _size(path, llama), tmp_path / "c")
    assert not changed.cached and changed.key != first.key


def test_eval_and_quantize_say_the_file_and_keep_the_held_out_text(llama, tmp_path, capsys):
    path = _text(tmp_path)
    js = tmp_path / "e.json"
    small = ["--calib-seqs", str(WINDOWS), "--seq-len", str(SEQ), "--cache-dir", tmp_path / "c", "--quiet"]
    assert run(["eval", llama, "--format", "nf4-g64", "--include", "*q_proj*", "--e2e-windows", "2",
                "--calib-text", path, "--json", js, *small]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("calibration:"))
    assert f"over {WINDOWS} windows of {SEQ} tokens of {path}" in line and "held-out" in line
    doc = json.loads(js.read_text())
    cal = doc["calibration"]
    assert str(path) in cal["note"] and cal["text"]["path"] == str(path)
    assert cal["text"]["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    held = evaluate(str(llama), ["nf4-g64"], include=["*q_proj*"], n_calib=C.CalibSize(seqs=WINDOWS, seq_len=SEQ),
                    cache_dir=tmp_path / "c", progress=False, e2e_windows=2)
    # the end-to-end reference is the built-in held-out text's, whatever the calibration text
    assert doc["formats"]["nf4-g64"]["e2e"]["ppl_ref"] == held["formats"]["nf4-g64"]["e2e"]["ppl_ref"]
    assert held["calibration"]["key"] != cal["key"]
    info = quantize_model(str(llama), "nf4-g64", tmp_path / "m.sopq", include=["*q_proj*"], progress=False,
                          n_calib=C.CalibSize(seqs=WINDOWS, seq_len=SEQ), cache_dir=tmp_path / "c",
                          calib_text=path)
    assert info["path"] == str(tmp_path / "m.sopq")
    from sop.quantize.artifact import open_artifact
    assert open_artifact(tmp_path / "m.sopq").meta["calibration"]["text"]["path"] == str(path)
    capsys.readouterr()
    assert run(["quantize", llama, "--format", "nf4-g64", "--include", "*q_proj*", "--calib-text", path,
                "--out", tmp_path / "p.sopq", *small[:-1]]) == 0           # with progress: the line names the file
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("calibrating on")]
    assert said == [f"calibrating on {WINDOWS} x {SEQ} tokens of {path} (cache {tmp_path / 'c'})"], said


#: each text option: the option that counts its windows, and the switch that turns off what reads it
TEXT_OPTIONS = {"--calib-text": ("--calib-seqs", "--no-calib"), "--eval-text": ("--e2e-windows", "--no-e2e")}


def _bad_inputs(tmp_path, llama, tokenizer, flag="--calib-text"):
    """(arguments after the model, the start of the error line after ``sop: error: ``), for the text option
    ``flag`` (``TEXT_OPTIONS``: tests/test_eval_text.py's table is this one of ``--eval-text``); each run gives
    ``WINDOWS`` windows of ``SEQ`` tokens. The case of the switch that turns the option off is named by it
    (``no-calib``, ``no-e2e``)."""
    count, off = TEXT_OPTIONS[flag]
    short = TEXT.splitlines(keepends=True)[0]             # one window's tokens, not two
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    assert SEQ <= n_short < WINDOWS * SEQ
    folder = tmp_path / "folder"
    folder.mkdir()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)                         # read, it would block until a writer came
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xc3\xa9 ok, then caf\xe9")
    utf16 = tmp_path / "utf16.txt"          # UTF-16 without its byte order mark: every byte is UTF-8, half are NUL
    utf16.write_bytes(TEXT.encode("utf-16-le"))
    return {
        "missing": ([flag, tmp_path / "nope.txt"], f"{flag} {tmp_path / 'nope.txt'}: no such file"),
        "folder": ([flag, folder], f"{flag} {folder}: a folder; give a UTF-8 text file"),
        "pipe": ([flag, pipe], f"{flag} {pipe}: not a regular file (a pipe or a device); "),
        "not-utf8": ([flag, latin], f"{flag} {latin}: not UTF-8 text (at byte offset 18: byte 0xe9, "),
        "nul": ([flag, utf16], f"{flag} {utf16}: a NUL byte at byte offset 1: not text (UTF-16 without a byte "
                                 f"order mark, or binary data); save it as UTF-8"),
        "empty": ([flag, _text(tmp_path, "empty.txt", "")], f"{flag} {tmp_path / 'empty.txt'}: empty;"),
        "bom-only": ([flag, _text(tmp_path, "bom.txt", "\ufeff")],       # the mark dropped, nothing left
                     f"{flag} {tmp_path / 'bom.txt'}: empty;"),
        "empty-name": ([flag, ""], f"{flag} '': an empty name; give a UTF-8 text file"),
        "blank": ([flag, _text(tmp_path, "blank.txt", " \n\t\n")],
                  f"{flag} {tmp_path / 'blank.txt'}: whitespace only;"),
        "short": ([flag, _text(tmp_path, "short.txt", short)],
                  f"{flag} {tmp_path / 'short.txt'} (its {count} x --seq-len windows): {WINDOWS} x {SEQ} "
                  f"= {WINDOWS * SEQ} tokens asked, the text gives {n_short} with this model's tokenizer; give a "
                  f"longer text, or fewer or shorter windows ({count} x --seq-len; 1 window of {SEQ} tokens fit)"),
        off[2:]: ([flag, _text(tmp_path), off], f"{flag} {tmp_path / 'calib.txt'} given with {off}: "),
        "model-file": ([flag, llama / "config.json"], f"{flag} {llama / 'config.json'}: the model's own file "),
        "output": ([flag, _text(tmp_path, "out.json", "{}")],
                   f"{flag} {tmp_path / 'out.json'}: the output {tmp_path / 'out.json'} would be written over"),
    }


def _open_and_close_writer(pipe) -> None:
    """A writer opened on ``pipe`` and closed (a reader blocked on it then reads the end); none without a reader."""
    try:
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:                         # no reader: nothing blocked
        pass


BAD = ["missing", "folder", "pipe", "not-utf8", "nul", "empty", "bom-only", "empty-name", "blank", "short",
       "no-calib", "model-file", "output"]


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("command", ["eval", "quantize"])
def test_a_bad_calibration_text_is_one_line_exit_2_before_any_layer(llama, tokenizer, tmp_path, capsys, case,
                                                                     command):
    args, said = _bad_inputs(tmp_path, llama, tokenizer)[case]
    out = tmp_path / ("out.json" if command == "eval" else "m.sopq")
    if case == "output" and command == "quantize":
        args = ["--calib-text", _text(tmp_path, "m.sopq", "some text")]
        said = f"--calib-text {out}: the output {out} would be written over"
    where = ["--json", out, "--no-e2e"] if command == "eval" else ["--out", out]
    refused_in_one_line([command, llama, "--format", "nf4-g64", "--calib-seqs", str(WINDOWS), "--seq-len", str(SEQ),
                         "--cache-dir", tmp_path / "c", *where, *args], tmp_path, out, said, capsys)


def refused_in_one_line(argv, tmp_path, out, said, capsys) -> list[str]:
    """`sop ARGV` refused: exit 2, its last stderr line ``sop: error: SAID...``, the only error, before any layer,
    ``out`` as it was; the stderr lines. A ``tmp_path / "pipe"`` the command would read gets a writer after 5 s,
    so that a read that blocks fails the test instead of hanging it."""
    before = out.read_bytes() if out.exists() else None
    writer = threading.Timer(5, _open_and_close_writer, (tmp_path / "pipe",))
    writer.start()
    try:
        code = run(argv)
    finally:
        writer.cancel()
    cap = capsys.readouterr()
    lines = cap.err.splitlines()            # progress lines, then the error, one line
    assert code == 2 and lines[-1].startswith(f"sop: error: {said}"), cap.err
    assert sum("error" in x for x in lines) == 1 and not any(" [1/" in x for x in lines)   # before any layer
    assert (out.read_bytes() if out.exists() else None) == before
    return lines


def test_a_file_above_the_size_limit_is_refused_unread(llama, tmp_path, capsys, monkeypatch):
    path = _text(tmp_path)
    monkeypatch.setattr(C, "MAX_CALIB_TEXT_BYTES", len(TEXT.encode()) - 1)
    def no_read(*args, **kwargs):
        raise AssertionError(f"opened {args}: a file above the limit must be refused unread")

    monkeypatch.setattr("builtins.open", no_read)
    with pytest.raises(ValueError, match=f"calib_text='{path}': {len(TEXT.encode()):,} bytes, more than the "):
        C.read_calib_text(path, str(llama))


@pytest.mark.parametrize("keyword, off", [("calib_text", "calibrate"), ("eval_text", "e2e")])
def test_python_names_the_keyword(llama, tmp_path, keyword, off):
    """From Python each refusal names the keyword as the call took it (``eval_text``: tests/test_eval_text.py)."""
    with pytest.raises(ValueError, match=rf"^{keyword}='[^']*nope.txt': no such file"):
        evaluate(str(llama), ["nf4-g64"], **{keyword: tmp_path / "nope.txt"}, progress=False)
    with pytest.raises(ValueError, match=rf"^{keyword}='[^']*calib.txt' given with {off}=False: no "):
        evaluate(str(llama), ["nf4-g64"], **{keyword: _text(tmp_path), off: False}, progress=False)
    if keyword == "calib_text":
        with pytest.raises(ValueError, match=r"given with calibrate=False"):
            quantize_model(str(llama), "nf4-g64", tmp_path / "m.sopq", calibrate=False, calib_text=_text(tmp_path),
                           progress=False)
    with pytest.raises(ValueError, match=rf"^{keyword}='': an empty name; give a UTF-8 text file$"):
        evaluate(str(llama), ["nf4-g64"], **{keyword: ""}, progress=False)
    with pytest.raises(TypeError, match=f"{keyword} must be a path"):
        evaluate(str(llama), ["nf4-g64"], **{keyword: 3}, progress=False)


def test_a_sentence_encoder_refuses_a_calibration_text_in_one_line(tmp_path, capsys):
    path = _text(tmp_path)
    assert run(["eval", "minilm", "--format", "nf4-g64", "--no-e2e", "--cache-dir", tmp_path / "c",
                "--calib-text", path]) == 2
    err = capsys.readouterr().err
    assert err == (f"sop: error: --calib-text {path}: only a causal LM calibrates on a text file; minilm is a "
                   f"sentence encoder: leave --calib-text out\n")


def test_a_file_swapped_for_a_pipe_after_its_check_is_refused_not_waited_on(llama, tmp_path, monkeypatch):
    path = _text(tmp_path)
    checked = C.calib_text_file

    def then_swapped(*args):
        """The checks pass on the regular file; a FIFO takes its place before the read opens it."""
        got = checked(*args)
        path.unlink()
        os.mkfifo(path)
        return got

    monkeypatch.setattr(C, "calib_text_file", then_swapped)
    said = []
    reader = threading.Thread(target=lambda: said.append(_raised(C.read_calib_text, path, str(llama))), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():                   # blocked in open(): a writer comes and goes so that the test ends
        _open_and_close_writer(path)
        reader.join(10)
        pytest.fail("the read waited for a writer on a FIFO put in the checked file's place")
    assert said == [f"calib_text='{path}': not a regular file (a pipe or a device); give a UTF-8 text file"]


def _raised(fn, *args) -> str:
    """The message of the ValueError ``fn(*args)`` raises (none raised: the test's failure)."""
    with pytest.raises(ValueError) as err:
        fn(*args)
    return str(err.value)
