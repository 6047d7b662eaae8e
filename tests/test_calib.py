"""quantize.calib and the plain-torch BERT of quantize.e2e: the offline text, the forward pass
against sentence-transformers, statistics with the padding masked, the cache, and the fallback."""

import errno
import json
import os
import re
import shutil
from typing import Any, cast

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sop.quantize import calib as C
from sop.quantize.e2e import Bert, embedding_fidelity
from sop.quantize.models import minilm_folder, open_model

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Quantization maps each weight to a nearby value on a small grid.",
             "A short one."]


@pytest.fixture(scope="module")
def bert():
    return Bert(minilm_folder())


def test_text_is_offline_deterministic_and_disjoint():
    cal, held = C.calibration_sentences(256), C.heldout_sentences(64)
    assert len(cal) == 256 and len(held) == 64 and not set(cal) & set(held)
    assert len(C.corpus()) > 1000 and all(40 <= len(s) <= 250 for s in cal + held)
    C.corpus.cache_clear()
    assert C.calibration_sentences(256) == cal                        # same after a rebuild
    with pytest.raises(ValueError, match="held-out"):
        C.heldout_sentences(len(C.corpus()))


def test_bert_matches_sentence_transformers(bert):
    try:
        from sentence_transformers import SentenceTransformer
        # called through Any: pyright evaluating this constructor binds every model transformers
        # ships, 20 s of tests/test_imports.py's check (quantize/causal_lm.py's docstring)
        ref = cast(Any, SentenceTransformer)(str(minilm_folder()), device="cpu")
    except Exception as err:                                            # pragma: no cover
        pytest.skip(f"sentence-transformers cannot load the model offline: {err}")
    # a sentence of 201 tokens and one of 301: sentence-transformers cuts at its max_seq_length (256), not
    # at tokenizer.json's 128 (the first was run cut at 128: a cosine of 0.978 with its reference)
    longer = [" ".join(["the"] * 199), " ".join(["dog"] * 299)]
    assert [sum(e.attention_mask) for e in bert.tokenizer.encode_batch(longer)] == [201, 256]
    expect = ref.encode(SENTENCES + longer, convert_to_numpy=True)
    got = bert.embed(SENTENCES + longer)
    np.testing.assert_allclose(got, expect, atol=2e-6)


@pytest.mark.parametrize("text, says", [("[256]", "not a sentence-transformers configuration"),
                                         ('{"max_seq_length": 0}', "max_seq_length 0 is no positive whole number"),
                                         ('{"max_seq_length": 4096}', None)])
def test_a_sentence_transformers_length_is_read_and_checked(tmp_path, text, says):
    folder = tmp_path / "m"
    shutil.copytree(minilm_folder(), folder)
    (folder / "sentence_bert_config.json").write_text(text)
    if says is None:                                # past the model's positions: cut at them
        assert Bert(folder).tokenizer.truncation["max_length"] == 512
        return
    with pytest.raises(ValueError, match=says):
        Bert(folder)


def test_padding_does_not_change_embeddings_or_statistics(bert):
    """A batch padded to its longest sentence gives the same embeddings and the same
    token-weighted statistics as sentences run alone (no padding at all)."""
    batched, tokens = C.collect_stats(bert, SENTENCES)
    sums, count = {}, 0
    for s in SENTENCES:
        st, n = C.collect_stats(bert, [s])
        count += n
        for k, v in st.items():
            sums[k] = sums.get(k, 0) + v * (n if "pooler" not in k else 1)
    assert tokens == count
    for k in batched:
        div = count if "pooler" not in k else len(SENTENCES)
        np.testing.assert_allclose(batched[k], sums[k] / div, rtol=1e-5, atol=1e-9, err_msg=k)
    alone = np.concatenate([bert.embed([s]) for s in SENTENCES])
    np.testing.assert_allclose(bert.embed(SENTENCES), alone, atol=1e-6)


def test_statistics_cover_every_linear_and_are_the_inputs_mean_square(bert):
    stats, tokens = C.collect_stats(bert, SENTENCES)
    assert set(stats) == {l.name for l in open_model("minilm").layers}
    q, k, v = (stats[f"encoder.layer.3.attention.self.{n}.weight"] for n in ("query", "key", "value"))
    np.testing.assert_array_equal(q, k)
    np.testing.assert_array_equal(q, v)                                 # one input, three projections
    assert stats["encoder.layer.0.output.dense.weight"].shape == (1536,)
    # layer 0's query input is LayerNorm(word + position + type embeddings), recomputed here
    P = bert.params
    ids, mask = bert.tokenize(SENTENCES)
    e = (P["embeddings.word_embeddings.weight"][ids] + P["embeddings.position_embeddings.weight"][:ids.shape[1]]
         + P["embeddings.token_type_embeddings.weight"][0])
    x = torch.nn.functional.layer_norm(e, (384,), P["embeddings.LayerNorm.weight"],
                                       P["embeddings.LayerNorm.bias"], 1e-12)[mask.bool()].double()
    assert tokens == x.shape[0]
    np.testing.assert_allclose(stats["encoder.layer.0.attention.self.query.weight"],
                               (x ** 2).mean(0).numpy(), rtol=1e-5)


def test_weight_override_moves_the_embedding(bert):
    name = "encoder.layer.2.intermediate.dense.weight"
    ref = bert.embed(SENTENCES)
    same = bert.embed(SENTENCES, weights={name: bert.params[name].numpy()})
    assert embedding_fidelity(ref, same)["cos_min"] > 1 - 1e-6
    noisy = bert.params[name].numpy() + np.random.default_rng(0).normal(0, 0.05, (1536, 384))
    f = embedding_fidelity(ref, bert.embed(SENTENCES, weights={name: noisy}))
    assert f["cos_min"] <= f["cos_mean"] < 0.9999 and f["sentences"] == 3


def test_calibration_is_cached_by_model_and_text(tmp_path):
    src = open_model("minilm")
    first = C.calibrate(src, n_sentences=12, cache_dir=tmp_path)
    assert first.weighted and not first.cached and first.sentences == 12
    assert (tmp_path / f"{first.key[:32]}.npz").is_file()
    again = C.calibrate(src, n_sentences=12, cache_dir=tmp_path)
    assert again.cached and again.key == first.key and again.tokens == first.tokens
    for k, v in first.act_ms.items():
        np.testing.assert_array_equal(again.act_ms[k], v)
    other = C.calibrate(src, n_sentences=13, cache_dir=tmp_path)
    assert other.key != first.key and not other.cached
    assert C.cache_key("model-b", "", C.calibration_sentences(12)) != first.key


def test_a_cache_file_of_another_key_with_the_same_name_is_a_miss(tmp_path):
    """The file is named by the key's first 32 hex digits and records the whole key: a file whose key differs
    after them (another model or text, by a collision) is never served."""
    src = open_model("minilm")
    first = C.calibrate(src, n_sentences=12, cache_dir=tmp_path)
    path = tmp_path / f"{first.key[:32]}.npz"
    other = first.key[:32] + ("0" if first.key[32] != "0" else "1") + first.key[33:]
    fake = {k: v * 2 for k, v in first.act_ms.items()}
    C._save(path, C.Calibration(True, first.note, fake, other, first.sentences, first.tokens), None)
    again = C.calibrate(src, n_sentences=12, cache_dir=tmp_path)
    assert not again.cached
    for k, v in first.act_ms.items():
        np.testing.assert_array_equal(again.act_ms[k], v)


def _minilm_copy(dest, config_edit=None):
    """MiniLM's folder, its weights hard-linked (90 MB), every other file copied; ``config_edit``
    changes config.json."""
    dest.mkdir()
    for f in minilm_folder().iterdir():
        if f.is_file():
            (os.link if f.suffix == ".safetensors" else shutil.copyfile)(f, dest / f.name)
    if config_edit:
        cfg = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**cfg, **config_edit}))
    return dest


def test_a_bert_folder_with_another_config_or_tokenizer_is_another_calibration(tmp_path):
    """The forward pass reads config.json (its LayerNorm epsilon, heads) and tokenizer.json beside the
    weights: a folder with the same weights and another of either was served the first folder's cached
    statistics. Both files are in the key."""
    a = open_model(str(_minilm_copy(tmp_path / "a")))
    b = open_model(str(_minilm_copy(tmp_path / "b", {"layer_norm_eps": 0.5})))
    c = _minilm_copy(tmp_path / "c")
    tok = json.loads((c / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (c / "tokenizer.json").write_text(json.dumps(tok))
    cache = tmp_path / "cache"
    first = C.calibrate(a, n_sentences=4, cache_dir=cache)
    for other in (b, open_model(str(c))):
        assert a.fingerprint() == other.fingerprint()                    # the same weights
        cal = C.calibrate(other, n_sentences=4, cache_dir=cache)
        assert cal.key != first.key and not cal.cached
        assert any(not np.array_equal(cal.act_ms[n], first.act_ms[n]) for n in first.act_ms)


def test_calibration_runs_the_weights_the_quantizer_reads_not_a_stray_file_beside_them(tmp_path):
    """The forward pass loaded every *.safetensors of the folder: a stray one beside model.safetensors
    (which the quantizer does not read) replaced real tensors in calibration and the e2e reference."""
    folder = _minilm_copy(tmp_path / "m")
    clean = C.calibrate(open_model(str(folder)), n_sentences=4, cache_dir=tmp_path / "c1")
    save_file({"embeddings.LayerNorm.weight": torch.full((384,), 5.0)}, str(folder / "zz-stray.safetensors"))
    src = open_model(str(folder))
    assert [f.name for f in src.files] == ["model.safetensors"]
    stray = C.calibrate(src, n_sentences=4, cache_dir=tmp_path / "c2")
    for n, v in clean.act_ms.items():
        np.testing.assert_array_equal(stray.act_ms[n], v)


def test_a_bert_forward_pass_runs_the_layers_as_the_nan_policy_reads_them(tmp_path):
    """A NaN in a quantized layer: --nan-policy zero calibrates the model with it 0 (the statistics
    of the same model with that weight 0 written in the file), and the default names it (row and
    column) instead of the NaN statistics it spread into the layers after it."""
    from safetensors.torch import load_file

    name = "encoder.layer.0.intermediate.dense.weight"
    models = {}
    for what, value in (("nan", float("nan")), ("zero", 0.0)):
        folder = _minilm_copy(tmp_path / what)
        sd = load_file(str(folder / "model.safetensors"))
        sd[name][7, 11] = value
        (folder / "model.safetensors").unlink()          # a hard link to the installed weights: not through it
        save_file(sd, str(folder / "model.safetensors"))
        models[what] = open_model(str(folder))
    models["nan"].nan_policy = "zero"
    got, want = (C.calibrate(models[k], n_sentences=4, use_cache=False) for k in ("nan", "zero"))
    assert sorted(got.act_ms) == sorted(want.act_ms)
    for n, v in want.act_ms.items():
        np.testing.assert_array_equal(got.act_ms[n], v)
    models["nan"].nan_policy = "error"
    with pytest.raises(ValueError, match=f"{name}: non-finite weight nan at row 7, column 11 \\(1 in the layer\\)"):
        C.calibrate(models["nan"], n_sentences=4, use_cache=False)


def test_a_bert_reference_that_is_not_finite_is_one_line(tmp_path, capsys):
    """A NaN in a LayerNorm no quantized layer owns: the end-to-end check printed a cosine of nan."""
    from safetensors.torch import load_file

    from sop.cli import main

    folder = _minilm_copy(tmp_path / "m")
    sd = load_file(str(folder / "model.safetensors"))
    sd["encoder.layer.0.output.LayerNorm.weight"][3] = float("nan")
    (folder / "model.safetensors").unlink()              # a hard link to the installed weights: not through it
    save_file(sd, str(folder / "model.safetensors"))
    out = tmp_path / "e.json"
    assert main(["eval", str(folder), "--format", "nf4-g64", "--no-calib", "--quiet", "--json", str(out),
                 "--include", "encoder.layer.1.attention.self.query.weight"]) == 2
    err = capsys.readouterr().err
    assert err == (f"sop: error: {folder}: the end-to-end check: the model's own sentence embeddings are not "
                   f"finite (a non-finite weight outside the layers quantized, or activations that overflow); "
                   f"--no-e2e skips it\n") and not out.exists()


DAMAGE = {   # how a cache file is damaged: what the one-line note says is wrong with it
    "truncated": "unreadable: BadZipFile", "empty": "unreadable: EOFError",
    "byte flipped": "unreadable: BadZipFile: Bad CRC-32",
    "negative statistic": "the statistic of {layer} is not a vector of finite, non-negative floats",
    # re-saved with the right key (a valid zip): once an OverflowError traceback, and statistics of
    # the wrong length once served, then refused far later without naming the cache
    "metadata count 1e400": "its 'sentences' is not a whole number >= 0",
    "statistic too short": "the statistic of {layer} has 100 values for 384 input channels",
    # re-saved with its key and metadata but one layer's statistic gone: that layer was quantized
    # unweighted under a calibration said to weight every layer
    "statistic gone": "its statistics are not the layers it lists",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_file_is_rebuilt_not_an_error(tmp_path, damage):
    """Only a cache: a file cut short, emptied or altered is recomputed and replaced, never a
    traceback (BadZipFile, EOFError, OverflowError) and never statistics served from it; the
    progress printer gets one line naming the file and what is wrong."""
    src = open_model("minilm")
    first = C.calibrate(src, n_sentences=12, cache_dir=tmp_path)
    path = tmp_path / f"{first.key[:32]}.npz"
    data = path.read_bytes()
    layer = next(iter(first.act_ms))
    if damage == "negative statistic":
        stats = {**first.act_ms, layer: -first.act_ms[layer]}
        C._save(path, C.Calibration(True, first.note, stats, first.key, first.sentences, first.tokens), None)
    elif damage == "statistic too short":
        stats = {**first.act_ms, layer: first.act_ms[layer][:100]}
        C._save(path, C.Calibration(True, first.note, stats, first.key, first.sentences, first.tokens), None)
    elif damage == "statistic gone":
        meta, stats = C._read_cache(path)
        del stats[layer]
        np.savez(path, **stats, **{C._META: np.array(json.dumps(meta))})
    elif damage == "metadata count 1e400":
        meta = '{"key": "%s", "sentences": 1e400, "tokens": 5, "version": 1}' % first.key
        np.savez(path, **first.act_ms, **{C._META: np.array(meta)})
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                          "byte flipped": data[:200] + bytes([data[200] ^ 1]) + data[201:]}[damage])
    said = []
    again = C.calibrate(src, n_sentences=12, cache_dir=tmp_path, say=said.append)
    assert not again.cached and path.read_bytes() == data
    for k, v in first.act_ms.items():
        np.testing.assert_array_equal(again.act_ms[k], v)
    assert len(said) == 1 and said[0].startswith(f"calibration cache {path} is damaged (") and \
        DAMAGE[damage].format(layer=layer) in said[0] and "\n" not in said[0], said
    assert said[0].endswith("): recomputing it, the file will be replaced")
    assert C.calibrate(src, n_sentences=12, cache_dir=tmp_path, say=said.append).cached and len(said) == 1


@pytest.mark.parametrize("fault", ["disk full", "a folder in the way", "a symbolic link in the way"])
def test_a_cache_that_cannot_be_saved_is_said_and_the_run_goes_on(tmp_path, monkeypatch, fault):
    """The cache only saves the next run's time: a full disk or a folder where the cache file goes
    costs that, not the statistics just computed (the run once failed after calibrating). A symbolic
    link in its place is not written through: the file it named (in an outside test, the very model
    being quantized) was replaced by the cache."""
    src = open_model("minilm")
    ref = C.calibrate(src, n_sentences=12, use_cache=False)
    path = tmp_path / f"{C.calibrate(src, n_sentences=12, cache_dir=tmp_path / 'probe').key[:32]}.npz"
    if fault == "disk full":
        def no_room(target, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        monkeypatch.setattr(C, "write_atomic", no_room)
    elif fault == "a symbolic link in the way":
        precious = tmp_path / "model.safetensors"
        precious.write_bytes(b"the user's model")
        path.symlink_to(precious)
    else:
        (path / "x").mkdir(parents=True)
    said = []
    cal = C.calibrate(src, n_sentences=12, cache_dir=tmp_path, say=said.append)
    assert cal.weighted and not cal.cached and cal.act_ms.keys() == ref.act_ms.keys()
    for k, v in ref.act_ms.items():
        np.testing.assert_array_equal(cal.act_ms[k], v)
    saved = [line for line in said if "not saved" in line]
    assert len(saved) == 1 and saved[0].startswith(f"calibration cache {path} not saved (") and \
        "going on without it" in saved[0], said
    assert {"disk full": "No space left on device", "a folder in the way": "folder",
            "a symbolic link in the way": "a symbolic link"}[fault] in saved[0]
    if fault == "a symbolic link in the way":
        assert path.is_symlink() and (tmp_path / "model.safetensors").read_bytes() == b"the user's model"
    else:
        assert (path / "x").is_dir() if fault != "disk full" else not path.exists()


def test_models_without_a_forward_pass_fall_back_to_unweighted(tmp_path):
    save_file({"l.0.fc.weight": torch.ones(4, 4)}, tmp_path / "m.safetensors")
    cal = C.calibrate(open_model(str(tmp_path / "m.safetensors")), cache_dir=tmp_path)
    assert not cal.weighted and "unweighted" in cal.note and cal.get("l.0.fc.weight") is None
    assert not list(tmp_path.glob("*.npz"))


# -- calibration and the held-out end-to-end sentences never overlap -------------------------------

MAX_CALIB = C.max_calibration_sentences()


@pytest.mark.parametrize("n", [1, 12, C.N_CALIB, MAX_CALIB])
def test_calibration_never_overlaps_the_heldout_sentences(n):
    corpus = C.corpus()
    cal = C.calibration_sentences(n)
    held = corpus[len(corpus) - C.N_HELDOUT:]                   # what the end-to-end check embeds
    assert len(cal) == n == len(set(cal)) and not set(cal) & set(held)
    assert not set(cal) & set(C.heldout_sentences(C.HELDOUT_RESERVE))
    assert C.heldout_sentences() == list(held)


def test_the_largest_calibration_set_and_the_reserve_are_the_whole_corpus():
    assert (sorted(C.calibration_sentences(MAX_CALIB) + C.heldout_sentences(C.HELDOUT_RESERVE))
            == sorted(C.corpus()))
    assert MAX_CALIB > 1000                                     # room for far more than the default 256


@pytest.mark.parametrize("n", [0, -1, MAX_CALIB + 1, len(C.corpus()), 10 ** 9, 2.5, True])
def test_calib_sentences_out_of_range_is_refused_naming_the_argument_and_the_maximum(n):
    """Named as the caller gave the count (a review: each said `--calib-sentences`, an option no Python
    caller has): `n`, `n_sentences`, `evaluate`'s and `quantize_model`'s `n_calib` (a CalibSize's as
    `n_calib.sentences`), before any work; inside the command line, `--calib-sentences`."""
    from sop.quantize.artifact import quantize_model
    from sop.quantize.evaluate import evaluate
    from sop.quantize.inputs import command_line

    said = rf"must be an integer from 1 to {MAX_CALIB} \(the pydoc_data"
    with pytest.raises(ValueError, match=rf"^n {said}"):
        C.calibration_sentences(n)
    src = type("Src", (), {"bert_folder": None, "kind": "toy"})()   # refused before any model runs
    with pytest.raises(ValueError, match=rf"^n_sentences {said}"):
        C.calibrate(src, n_sentences=n)
    gone = "no-such-model"                                          # before the model is even looked for
    with pytest.raises(ValueError, match=rf"^n_calib {said}"):
        evaluate(gone, ["nf4-g64"], n_calib=n, progress=False)
    with pytest.raises(ValueError, match=rf"^n_calib\.sentences {said}"):
        quantize_model(gone, "nf4-g64", "q.sopq", n_calib=C.CalibSize(n), progress=False)
    with command_line(), pytest.raises(ValueError, match=rf"^--calib-sentences {said}"):
        C.calibrate(src, n_sentences=n)


def test_the_window_shape_is_named_as_the_caller_gave_it():
    """`CalibSize(seqs=0)` said `--calib-seqs must be ...`, `seq_len=2` `--seq-len ...`: Python's names from
    Python; the command line's inside it (its parser refuses these values first: `sop eval --calib-seqs 0`)."""
    from sop.quantize.inputs import command_line

    for kw, said in (({"seqs": 0}, "seqs must be a positive integer, got 0"),
                     ({"seq_len": 2.5}, "seq_len must be a positive integer, got 2.5"),
                     ({"seq_len": 2}, "seq_len must be at least 4 tokens, got 2")):
        with pytest.raises(ValueError, match=f"^{re.escape(said)}$"):
            C.CalibSize(**kw)
        flag = "--calib-seqs" if "seqs" in kw else "--seq-len"
        with command_line(), pytest.raises(ValueError, match=f"^{flag} {re.escape(said.split(' ', 1)[1])}$"):
            C.CalibSize(**kw)


@pytest.mark.parametrize("n", [0, C.HELDOUT_RESERVE + 1])
def test_heldout_count_beyond_the_reserve_is_refused(n):
    with pytest.raises(ValueError, match="held-out"):
        C.heldout_sentences(n)


def test_cli_refuses_too_many_calibration_sentences_with_exit_2(tmp_path, capsys):
    from sop.cli import main

    save_file({"l.0.fc.weight": torch.ones(4, 16)}, tmp_path / "m.safetensors")
    out = tmp_path / "m.sopq"
    args = ["quantize", str(tmp_path / "m.safetensors"), "--format", "nf4-g64", "--out", str(out), "--quiet",
            "--cache-dir", str(tmp_path)]
    assert main([*args, "--calib-sentences", str(MAX_CALIB + 1)]) == 2
    assert capsys.readouterr().err.startswith(f"sop: error: --calib-sentences must be an integer from 1 to "
                                              f"{MAX_CALIB} (the pydoc_data")
    assert not out.exists()
