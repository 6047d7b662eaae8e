"""Calibration: per-layer input-activation statistics from real forward passes on offline text.

For each linear layer ``y = x W^T + b`` the statistic is the per-input-channel
mean square of ``x``, ``act_ms[j] = mean over tokens of x_j^2``, over every
non-padding token of the calibration sentences. The activation-weighted
metrics (quantize/metrics.py) weight input column ``j`` by
``a_j = sqrt(act_ms[j])``; the SOP search may use it to weight its choices.

* Text: English prose from Python's own ``pydoc_data.topics`` (no download):
  split into sentences, kept when 40..250 characters long and mostly letters,
  de-duplicated, shuffled with a fixed seed. The last ``HELDOUT_RESERVE`` (256)
  sentences of that list are reserved for the end-to-end check
  (``heldout_sentences`` takes its ``n`` from the very end); calibration takes
  its ``n`` from the front of the rest (``calibration_sentences``). The two sets
  are disjoint by construction for every count: a calibration count above
  ``max_calibration_sentences()`` (1188 with Python 3.11's pydoc_data), or below 1,
  is refused with a ``ValueError`` naming ``--calib-sentences`` and the maximum,
  as is a held-out count beyond the reserve.
* Forward pass: for ``minilm`` and any BERT folder (``config.json`` with
  ``model_type: bert`` and ``tokenizer.json``), the real model with its shipped
  tokenizer (quantize/e2e.py), padding masked out of the statistics.
* Causal LMs (any ``transformers`` causal LM folder, a GGUF of an architecture
  ``transformers`` reads, ``smollm2``; quantize/causal_lm.py): forward hooks on
  every ``nn.Linear`` / ``Conv1D``, keyed by checkpoint tensor name. The text is
  the calibration part of the corpus (every sentence outside the reserve, in
  order) joined by spaces and tokenized once; its first ``seqs x seq_len``
  tokens, cut into ``seqs`` windows of ``seq_len`` (``--calib-seqs``,
  ``--seq-len``; default 32 x 256), are run. A text shorter than that is refused
  with a ``ValueError`` before any layer is quantized. ``--calib-sentences``
  applies to sentence encoders only.
* A causal LM's own text (``--calib-text FILE``, ``calib_text=``; ``read_calib_text``): a UTF-8 file of at
  most ``MAX_CALIB_TEXT_BYTES`` (4 MiB), tokenized whole with the model's tokenizer and cut into windows as
  the built-in text is; the key covers its bytes' SHA-256 (never its path or time), the note names it and
  says that the end-to-end check keeps the built-in held-out text, or which file it measures on instead.
  Refused (``ValueError``, one line) before any layer is quantized: absent, a folder or no regular file, too
  large, not UTF-8 or holding a NUL byte (the byte offset named), empty or whitespace only, one of the model's
  files or an output, given with calibration off, too short for the windows, or given to a model that is no
  causal LM (a sentence encoder: which lines are its sentences would be a guess).
* A causal LM's own held-out text (`sop eval --eval-text FILE`, ``eval_text=``; ``with_eval_text``): read and
  refused by the same functions, each message naming ``--eval-text`` (``TEXT_ROLES``; given with the
  end-to-end check off, ``eval_text_used``), its ``--e2e-windows`` x ``--seq-len`` windows cut as the built-in
  held-out text's (``text_windows``). No cache covers the held-out text (the reference logits are computed
  each run; the calibration's key is the calibration text's). The calibration text again (the same bytes, the
  same text but for whitespace, or one of the two beginning with the whole of the other: ``text_overlap``) is
  one warning line (``same_text_warning``).
* Cache: ``<cache_dir>/<key[:32]>.npz`` (the key's first 32 hex digits; the file records the whole
  key, and another is a miss; default ``build/calib/``), written
  atomically; ``key`` is a SHA-256 of the procedure version, the checkpoint
  files' contents and the configuration and tokenizer files beside them (a BERT
  or causal-LM forward pass reads both), the window shape and the calibration
  text, so a changed model or text is never served stale statistics; a cache
  hit loads no model. The forward pass runs the files the quantizer reads
  (``ModelSource.files``), never a stray checkpoint beside them. A damaged cache
  file (truncated, emptied, altered: the zip's CRC-32 catches it; every count
  must be a whole number >= 0, every statistic a finite, non-negative float
  vector as long as its layer's input channels, and the statistics the layers
  the file lists) is a miss: recomputed and
  replaced atomically, never an error and never a figure; ``say`` (when given)
  gets one line naming the file and what is wrong with it. A cache file that
  cannot be written (a full disk, a read-only folder) is said the same way and
  the run goes on: the cache only saves the next run's time.
* Any other model has no forward pass here: ``Calibration.weighted`` is False,
  every error is unweighted (``a = 1``), and ``note`` says so, with the reason
  (`sop eval` prints it and writes it to the JSON).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from sop.golden.files import OutputError, write_atomic
from sop.quantize.causal_lm import DEFAULT_CALIB_SEQS, DEFAULT_SEQ_LEN
from sop.quantize.inputs import (boolean, cache_folder, no_calib, no_e2e, nan_zero, on_command_line, option,
                                 path_argument)

CALIB_VERSION = 2            # 2: the key covers a BERT folder's config and tokenizer; the file lists its layers
#: a part of the causal-LM cache key: bumped whenever what a causal LM's statistics hold changes, or a file
#: written before is served as current. 2: an expert matrix counts every token its MoE block takes (one not
#: routed to it a zero input; an unrouted one 1 / tokens), where 1 averaged over the routed tokens only
CAUSAL_VERSION = 2
N_CALIB = 256
N_HELDOUT = 64
#: Sentences at the end of the corpus kept for the end-to-end check, never for calibration.
HELDOUT_RESERVE = 256
DEFAULT_CACHE = Path("build/calib")
SEED = 0
_META = "__meta__"


@cache
def corpus() -> tuple[str, ...]:
    """Every usable sentence of pydoc_data.topics, de-duplicated, in a fixed shuffled order."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    seen, out = set(), []
    for s in re.split(r"(?<=[.!?])\s+", text):
        if 40 <= len(s) <= 250 and sum(c.isalpha() for c in s) / len(s) > 0.75 and s not in seen:
            seen.add(s)
            out.append(s)
    order = np.random.default_rng(SEED).permutation(len(out))
    return tuple(out[i] for i in order)


def max_calibration_sentences() -> int:
    """The most calibration sentences there are: the corpus less the held-out reserve."""
    return len(corpus()) - HELDOUT_RESERVE


def _count(n, what: str, most: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= most:
        raise ValueError(f"{what} must be an integer from 1 to {most} (the pydoc_data.topics corpus has "
                         f"{len(corpus())} sentences, {HELDOUT_RESERVE} of them reserved for the "
                         f"held-out end-to-end check), got {n!r}")
    return int(n)


def calibration_sentences(n: int = N_CALIB) -> list[str]:
    """The first ``n`` sentences of the corpus outside the held-out reserve."""
    n = _count(n, _sentences("n"), max_calibration_sentences())
    return list(corpus()[:n])


def _sentences(keyword: str) -> str:
    """The calibration sentence count as its caller named it: ``--calib-sentences`` on the command line, the
    Python keyword that took it (``n_calib``, ``n_sentences``) from Python (``inputs.option``)."""
    return option(keyword, flag="--calib-sentences")


def heldout_sentences(n: int = N_HELDOUT) -> list[str]:
    """The last ``n`` sentences of the corpus, all inside the held-out reserve: disjoint
    from every calibration set."""
    c = corpus()
    n = _count(n, "the number of held-out sentences", HELDOUT_RESERVE)
    return list(c[len(c) - n:])


#: The largest calibration text file read (``--calib-text``, ``calib_text=``): it is read, decoded and tokenized
#: whole, as the built-in text is, so a larger one is refused before it is read. Tokenizing costs some 330 bytes
#: of memory a token (measured: 7 MiB of text, 5.2 million tokens of the tests' small BPE, 1.7 GB and 10 s; 16 MiB
#: of one line of "x", a token a byte, 3.6 GB and 28 s), so 4 MiB is at most about 1.4 GB: of English, about a
#: million tokens with a real model's tokenizer, four times a 128 x 2048 calibration (the default takes 8,192).
#: Whole, never a prefix: a tokenizer may tokenize a text's start otherwise as the text grows (a BPE with no
#: pre-tokenizer, as Llama 2's, chains its merges over the whole text: the first tokens of 42 characters can differ
#: from those of its prefixes cut at each line end, which agree), so no prefix is proven to give the file's windows.
MAX_CALIB_TEXT_BYTES = 4 << 20


@dataclass(frozen=True)
class CalibText:
    """A text file's contents (``read_calib_text``: calibration's, ``--calib-text``, or the end-to-end check's,
    ``--eval-text``): ``path`` as the caller gave it, the decoded ``text`` and the SHA-256 of its bytes (the
    cache key's: the contents, never the path or the time)."""

    path: str
    text: str = field(repr=False)
    sha256: str = ""


@dataclass(frozen=True)
class CalibSize:
    """How much calibration text: ``sentences`` for sentence encoders (BERT), ``seqs`` windows of
    ``seq_len`` tokens for causal LMs; ``text``: a causal LM's own calibration text (a ``CalibText``), whose
    windows are cut as the built-in text's are, or None for the built-in text; ``eval_text``: a causal LM's own
    held-out text for `sop eval`'s end-to-end check (``--eval-text``, ``with_eval_text``), or None for the
    built-in held-out text (it is no part of the calibration or its key: the calibration's note names it)."""

    sentences: int = N_CALIB
    seqs: int = DEFAULT_CALIB_SEQS
    seq_len: int = DEFAULT_SEQ_LEN
    text: CalibText | None = None
    eval_text: CalibText | None = None

    def __post_init__(self):
        # named as the caller gave them: CalibSize's seqs= and seq_len= from Python, --calib-seqs and --seq-len
        # from the command line
        for what, v in ((option("seqs", flag="--calib-seqs"), self.seqs), (option("seq_len"), self.seq_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        if self.seq_len < 4:
            raise ValueError(f"{option('seq_len')} must be at least 4 tokens, got {self.seq_len}")


def calib_size(n: "int | CalibSize", keyword: str, sentences: bool = True) -> CalibSize:
    """``n``, a sentence count or a ``CalibSize``, as a CalibSize; with ``sentences`` (calibration reads them)
    its sentence count is checked first, named ``keyword`` (the Python parameter that took ``n``; a
    CalibSize's count as ``keyword.sentences``) or ``--calib-sentences`` on the command line."""
    if isinstance(n, CalibSize):
        if sentences:
            _count(n.sentences, _sentences(f"{keyword}.sentences"), max_calibration_sentences())
        return n
    return CalibSize(_count(n, _sentences(keyword), max_calibration_sentences()) if sentences else n)


def _mib() -> str:
    """``MAX_CALIB_TEXT_BYTES`` in MiB, as a refusal says it."""
    return f"{MAX_CALIB_TEXT_BYTES / (1 << 20):g} MiB"


#: What a text file option's refusals call the file and what it is given for: ``--calib-text`` (``calib_text=``)
#: a causal LM calibrates on, ``--eval-text`` (``eval_text=``) its end-to-end check measures on.
TEXT_ROLES = {"calib_text": ("a calibration text", "calibrate on"),
              "eval_text": ("a held-out text", "measure the end-to-end check on")}


def text_option(path, keyword: str = "calib_text") -> str:
    """``--calib-text FILE`` or ``calib_text='FILE'`` (``keyword``: ``eval_text`` gives ``--eval-text FILE``), as
    the caller gave it (``inputs.option``; the empty name quoted, ``--calib-text ''``)."""
    return option(keyword, str(path) or "''") if on_command_line() else f"{keyword}={str(path)!r}"


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (a link, another spelling); False where either is absent."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_regular(what: str, mode: int) -> None:
    """A ``ValueError`` unless ``mode`` (a stat's) is a regular file's: a folder, a pipe or a device is refused."""
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what}: a folder; give a UTF-8 text file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what}: not a regular file (a pipe or a device); give a UTF-8 text file")


def _open_nonblocking(path, flags: int) -> int:
    """``os.open`` without waiting: a FIFO put in the file's place since its stat opens at once (the ``fstat``
    after it refuses it) where a plain open would wait for a writer forever."""
    return os.open(path, flags | os.O_NONBLOCK)


def calib_text_file(path, model: str, outputs=(), keyword: str = "calib_text") -> Path:
    """The text file ``path`` of the option ``keyword`` (``TEXT_ROLES``: ``calib_text``, ``eval_text``) checked
    before anything is read or written: it must be a regular file (not absent, not a folder, not a pipe that
    would block the read) of at most ``MAX_CALIB_TEXT_BYTES``, and neither one of ``model``'s own files
    (``models.model_inputs``) nor one of ``outputs`` (the output would be written over the text, or the text
    read as the model's); a ``ValueError`` naming the option and saying which."""
    from sop.quantize.models import model_inputs

    path_argument(option(keyword), path)
    what, p, (role, _) = text_option(path, keyword), Path(path), TEXT_ROLES[keyword]
    if not os.fspath(path):             # pathlib's '.', the working folder: "a folder" would name none given
        raise ValueError(f"{what}: an empty name; give a UTF-8 text file")
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except OSError as err:
        raise ValueError(f"{what}: cannot be read ({err.strerror or type(err).__name__})") from None
    _check_regular(what, st.st_mode)
    if st.st_size > MAX_CALIB_TEXT_BYTES:
        raise ValueError(f"{what}: {st.st_size:,} bytes, more than the {MAX_CALIB_TEXT_BYTES:,} ({_mib()}) {role} "
                         f"may have; give a shorter excerpt")
    for own in model_inputs(model):
        if _same_file(p, own):
            raise ValueError(f"{what}: the model's own file {own}, not {role}")
    for out in outputs:
        if out is not None and _same_file(p, Path(out)):
            raise ValueError(f"{what}: the output {out} would be written over it; give another output")
    return p


def read_calib_text(path, model: str, outputs=(), keyword: str = "calib_text") -> CalibText:
    """The text file ``path`` of the option ``keyword`` (``calib_text``, ``eval_text``) read
    (``calib_text_file``'s checks first): UTF-8 (a byte order mark dropped) with no NUL byte, not empty or
    whitespace only; a ``ValueError`` naming the option, the file and, for a byte that is not UTF-8 or a NUL, its
    offset."""
    p = calib_text_file(path, model, outputs, keyword)
    what, (role, purpose) = text_option(path, keyword), TEXT_ROLES[keyword]
    try:
        with open(p, "rb", opener=_open_nonblocking) as fh:
            _check_regular(what, os.fstat(fh.fileno()).st_mode)   # the file opened: another since its stat?
            data = fh.read(MAX_CALIB_TEXT_BYTES + 1)       # bounded: the file may have grown since its stat
    except OSError as err:
        raise ValueError(f"{what}: cannot be read ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_CALIB_TEXT_BYTES:
        raise ValueError(f"{what}: more than the {MAX_CALIB_TEXT_BYTES:,} bytes ({_mib()}) {role} may have; "
                         f"give a shorter excerpt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: not UTF-8 text (at byte offset {err.start:,}: byte 0x{data[err.start]:02x}, "
                         f"{err.reason}); save it as UTF-8") from None
    nul = data.find(b"\0")
    if nul >= 0:        # UTF-8, but no text: UTF-16 saved without its byte order mark ("a\0b\0"), or binary data
        raise ValueError(f"{what}: a NUL byte at byte offset {nul:,}: not text (UTF-16 without a byte order mark, or "
                         f"binary data); save it as UTF-8")
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"{what}: {'empty' if not text else 'whitespace only'}; give a file of text to "
                         f"{purpose}")
    return CalibText(str(path), text, hashlib.sha256(data).hexdigest())


def with_calib_text(size: CalibSize, calib_text, calibrate: bool, model: str, outputs=()) -> CalibSize:
    """``size`` with the calibration text file ``calib_text`` (None: the built-in text) read into it; refused
    (``ValueError``) where calibration is off, since the text would go unused."""
    if calib_text is None:
        return size
    calib_text_used(calib_text, calibrate)
    return dataclasses.replace(size, text=read_calib_text(calib_text, model, outputs))


def with_eval_text(size: CalibSize, eval_text, e2e: bool, model: str, outputs=()) -> CalibSize:
    """``size`` with the end-to-end check's held-out text file ``eval_text`` (None: the built-in held-out text)
    read into it (``read_calib_text``'s checks, named ``eval_text``); refused (``ValueError``) where the
    end-to-end check is off, since the text would go unused."""
    if eval_text is None:
        return size
    eval_text_used(eval_text, e2e)
    return dataclasses.replace(size, eval_text=read_calib_text(eval_text, model, outputs, "eval_text"))


def check_text_model(src, size: CalibSize) -> None:
    """A ``ValueError`` where ``size`` holds a text file (calibration's or the end-to-end check's) and ``src``
    (a ModelSource) is no causal LM: a sentence encoder calibrates and is measured on sentences, and which
    lines of a file are one is a guess not made here; a model with no forward pass reads no text.
    (``evaluate``, ``quantize_model``: once the model is opened, before the calibration's progress line.)"""
    if getattr(src, "forward", None) == "causal-lm":
        return
    kind = "a sentence encoder" if src.bert_folder is not None else "no causal LM"
    for keyword, own, does in (("calib_text", size.text, "calibrates on"),
                               ("eval_text", size.eval_text, "measures its end-to-end check on")):
        if own is not None:
            raise ValueError(f"{text_option(own.path, keyword)}: only a causal LM {does} a text file; "
                             f"{src.spec} is {kind}: leave {option(keyword)} out")


def _text_unread(keyword: str, path, switch: str, check: str) -> ValueError:
    """The refusal of the text file ``path`` of option ``keyword`` given with ``switch``, which turns off the
    ``check`` that would read it."""
    return ValueError(f"{text_option(path, keyword)} given with {switch}: no {check} runs to read it; leave one "
                      f"of the two out")


def calib_text_used(calib_text, calibrate: bool) -> None:
    """A ``ValueError`` where a calibration text file is given and calibration is off: it would go unread."""
    if not calibrate:
        raise _text_unread("calib_text", calib_text, no_calib(), "calibration")


def eval_text_used(eval_text, e2e: bool) -> None:
    """A ``ValueError`` where a held-out text file is given and the end-to-end check is off: it would go unread."""
    if not e2e:
        raise _text_unread("eval_text", eval_text, no_e2e(), "end-to-end check")


def _as_read(text: str) -> str:
    """``text`` as a reader reads it: every run of whitespace (line ends, CRLF or LF, spacing) one space, none at
    either end (a leading byte order mark is already dropped: ``read_calib_text``)."""
    return " ".join(text.split())


def text_overlap(size: CalibSize) -> tuple[str, str] | None:
    """How the held-out text file (``--eval-text``) is the calibration text file (``--calib-text``), or None:
    (the warning's subject, the calibration note's few words). Both cut their windows from their text's start, so
    the end-to-end windows are calibration windows, not held out, where the two hold the same bytes, the same text
    but for whitespace and a byte order mark (a CRLF copy), or where one of them begins with the whole of the
    other (a calibration file grown by a line): the SHA-256 alone told only the first."""
    cal, held = size.text, size.eval_text
    if cal is None or held is None:
        return None
    e, c = text_option(held.path, "eval_text"), text_option(cal.path)
    if cal.sha256 == held.sha256:
        return f"{e} and {c} are the same bytes (SHA-256 {held.sha256})", "the same bytes"
    a, b = _as_read(held.text), _as_read(cal.text)
    aside = "(whitespace and a byte order mark aside)"
    if a == b:
        return f"{e} and {c} are the same text {aside}", "the same text"
    if a.startswith(b):
        return f"{e} begins with the whole text of {c} {aside}", "the calibration text's start"
    if b.startswith(a):
        return f"{c} begins with the whole text of {e} {aside}", "the calibration text's start"
    return None


def same_text_warning(size: CalibSize) -> str | None:
    """The warning where the held-out text file is the calibration text file (``text_overlap``): the end-to-end
    figures are then measured on the text the statistics came from, not on held-out text; None otherwise."""
    overlap = text_overlap(size)
    if overlap is None:
        return None
    return f"{overlap[0]}: the end-to-end figures are measured on the calibration text, not held out"


def text_windows(runner, own: CalibText, n: int, seq_len: int, keyword: str, count: str):
    """``n`` windows of ``seq_len`` tokens cut from the text file ``own`` of option ``keyword`` (tokenized whole,
    as the built-in text is; ``CausalLM.windows``: BOS first where the tokenizer adds one); too short a text is
    a ``ValueError`` naming the option, ``count`` x ``seq_len`` (``count``: the window count's option as the
    caller gave it) and how many windows fit."""
    ids = runner.token_ids([own.text])          # (one text: token_ids joins nothing to it)
    shape = f"{count} x {option('seq_len')}"
    fit = len(ids) // seq_len
    return runner.windows(ids, n, seq_len, f"{text_option(own.path, keyword)} (its {shape} windows)",
                          f"give a longer text, or fewer or shorter windows ({shape}; "
                          f"{fit} window{'' if fit == 1 else 's'} of {seq_len} tokens fit)")


@dataclass
class Calibration:
    weighted: bool
    note: str
    act_ms: dict[str, np.ndarray] = field(default_factory=dict)
    key: str | None = None
    sentences: int = 0
    tokens: int = 0
    cached: bool = False
    seqs: int = 0                   # causal LMs: windows x tokens
    seq_len: int = 0
    #: MoE expert matrices no calibration token was routed to: 1 / tokens in every column
    #: (quantize/causal_lm.py); in the calibration a run reports, only its selected layers
    unrouted: list[str] = field(default_factory=list)
    #: a causal LM calibrated on a text file (``--calib-text``): its path as given, and its bytes' SHA-256
    text: dict | None = None

    def get(self, name: str) -> np.ndarray | None:
        """The layer's per-input-channel mean square, or None (unweighted)."""
        return self.act_ms.get(name) if self.weighted else None

    def describe(self) -> dict:
        d = {"weighted": self.weighted, "note": self.note, "key": self.key,
             "sentences": self.sentences, "tokens": self.tokens, "cached": self.cached}
        if self.seqs:
            d.update(seqs=self.seqs, seq_len=self.seq_len)
        if self.unrouted:
            d["unrouted"] = list(self.unrouted)
        if self.text:
            d["text"] = dict(self.text)
        return d


def unweighted(note: str) -> Calibration:
    return Calibration(False, note)


def cache_key(fingerprint: str, prefix: str, sentences: list[str]) -> str:
    h = hashlib.sha256(f"sop-calib v{CALIB_VERSION}\n{fingerprint}\n{prefix}\n".encode())
    h.update("\n".join(sentences).encode())
    return h.hexdigest()


def collect_stats(bert, sentences: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Per-input-channel mean square of every linear's input over non-padding tokens."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook(name, x):
        sums[name] = sums.get(name, 0.0) + np.einsum("ti,ti->i", x, x)
        counts[name] = counts.get(name, 0) + x.shape[0]

    bert.embed(sentences, hook=hook)
    tokens = counts.get(bert.linear_names()[0], 0)
    return {n: sums[n] / counts[n] for n in sums}, tokens


#: What reading a damaged cache file raises: truncated, emptied or altered (the zip's CRC-32 fails,
#: BadZipFile, EOFError, zlib.error), a member of another kind (ValueError: allow_pickle is off, an
#: encrypted or unknown compression: RuntimeError, NotImplementedError), a metadata record that is
#: not the JSON ``_save`` writes (KeyError, TypeError, AttributeError; nested: RecursionError).
_DAMAGED = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RuntimeError,
            zipfile.BadZipFile, zlib.error)
#: The metadata's counts (whole numbers >= 0) and their value when absent (None: required; a file
#: written before causal LMs has no window shape).
_COUNTS = {"sentences": None, "tokens": None, "seqs": 0, "seq_len": 0}


class _Damaged(Exception):
    """A cache file that cannot be what ``_save`` wrote; the message says why, in a few words."""


def _read_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(metadata, statistics)`` of a cache file as ``_save`` writes it; ``_Damaged`` otherwise."""
    try:
        # opened here: np.load leaves its own file open when the zip is damaged
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            meta = json.loads(str(z[_META]))
            if not isinstance(meta, dict):
                raise TypeError(f"metadata is a JSON {type(meta).__name__}")
            stats = {n: z[n] for n in z.files if n != _META}
    except _DAMAGED as err:
        said = (str(err).splitlines() or [""])[0][:120]
        raise _Damaged(f"unreadable: {type(err).__name__}{': ' + said if said else ''}") from None
    return meta, stats


def _check_cache(meta: dict, stats: dict[str, np.ndarray], widths: dict[str, int]) -> None:
    """``_Damaged`` unless every count is a whole number >= 0 and every statistic a finite, non-negative
    float vector, as long as its layer's input channels (``widths``: layer -> columns) where it has one."""
    for k, absent in _COUNTS.items():
        v = meta.get(k, absent)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _Damaged(f"its {k!r} is not a whole number >= 0")
    layers = meta.get("layers")
    if not isinstance(layers, list) or sorted(stats) != sorted(x for x in layers if isinstance(x, str)):
        # a statistic gone would quantize its layer unweighted under a calibration said to weight it
        raise _Damaged("its statistics are not the layers it lists")
    for name, a in stats.items():
        if not (a.dtype.kind == "f" and a.ndim == 1 and np.isfinite(a).all() and (a >= 0).all()):
            raise _Damaged(f"the statistic of {name} is not a vector of finite, non-negative floats")
        if name in widths and a.shape[0] != widths[name]:
            raise _Damaged(f"the statistic of {name} has {a.shape[0]} values for {widths[name]} input channels")
    unrouted = meta.get("unrouted", [])
    if not isinstance(unrouted, list) or not all(isinstance(x, str) and x in stats for x in unrouted):
        raise _Damaged("its unrouted experts are not layers it lists")


def _load_cached(path: Path, key: str, note: str, widths: dict[str, int]) -> tuple[Calibration | None, str]:
    """``(the calibration cached at path, "")``, or ``(None, why)``: ``why`` is "" when the file is
    absent or another key's, else what is damaged. A damaged file is a miss like any other (it is
    only a cache): recomputed, and replaced atomically by ``_save``."""
    if not path.is_file():
        return None, ""
    try:
        meta, stats = _read_cache(path)
        if meta.get("key") != key:
            return None, ""
        _check_cache(meta, stats, widths)
    except _Damaged as err:
        return None, str(err)
    return Calibration(True, note, stats, key, meta["sentences"], meta["tokens"], cached=True,
                       seqs=meta.get("seqs", 0), seq_len=meta.get("seq_len", 0),
                       unrouted=meta.get("unrouted", [])), ""


def _cached(path: Path, key: str, note: str, src, say) -> Calibration | None:
    """The cache hit for ``src``, or None; a damaged file is said in one line (``say``), not raised."""
    hit, why = _load_cached(path, key, note, {lay.name: lay.shape[1] for lay in src.layers})
    if why and say is not None:
        say(f"calibration cache {path} is damaged ({why}): recomputing it, the file will be replaced")
    if hit is not None and src.forward == "causal-lm" and any(lay.name not in hit.act_ms for lay in src.layers):
        # a causal LM refuses a selected layer its forward pass gives no statistic: the run without the
        # cache says why, where this hit would quantize it unweighted under "weighted". (A BERT model
        # runs its encoder only: a head layer is unweighted, cold or warm.)
        return None
    return hit


def _save(path: Path, cal: Calibration, say) -> None:
    """The cache file written atomically. One that cannot be written (a full disk, a read-only
    folder, a symbolic link in its place) costs only the next run's calibration: the run goes on,
    ``say`` told why."""
    buf = io.BytesIO()
    meta = {"key": cal.key, "sentences": cal.sentences, "tokens": cal.tokens, "version": CALIB_VERSION,
            "seqs": cal.seqs, "seq_len": cal.seq_len, "layers": sorted(cal.act_ms), "unrouted": sorted(cal.unrouted)}
    np.savez(buf, **cal.act_ms, **{_META: np.array(json.dumps(meta))})
    try:
        if path.is_symlink():               # written through, it would replace the file it names (a model?)
            raise OutputError(f"{path}: a symbolic link; the cache replaces only its own files")
        write_atomic(path, buf.getvalue())
    except (OSError, OutputError) as err:
        if say is not None:
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err).removeprefix(f"{path}: ")
            why = " ".join(why.split())
            say(f"calibration cache {path} not saved ({why}): going on without it; the next run calibrates again")


def _sentences_used(runner, sentences: list[str], n_tokens: int) -> int:
    """How many of the joined sentences the first ``n_tokens`` tokens reach into."""
    text = " ".join(sentences)
    try:
        offsets = runner.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        end = offsets[min(n_tokens, len(offsets)) - 1][1]
    except (NotImplementedError, KeyError, IndexError, TypeError, ValueError):
        return len(sentences)
    starts = np.cumsum([0] + [len(s) + 1 for s in sentences[:-1]])
    return int(np.searchsorted(starts, end, side="left"))


def calibrate_causal(src, size: CalibSize, cache_dir=DEFAULT_CACHE, use_cache: bool = True,
                     say=None) -> Calibration:
    """Activation statistics of a causal LM (quantize/causal_lm.py), cached on disk (``say``: as
    ``calibrate``)."""
    from sop.quantize import causal_lm

    own = size.text
    # a text file is keyed by its bytes' digest (the contents, never its path or time), the built-in text by
    # its sentences; "file" keeps the two apart
    sentences = [f"file sha256 {own.sha256}"] if own else calibration_sentences(max_calibration_sentences())
    key = cache_key(f"{src.fingerprint()}\n{src.aux_fingerprint()}",
                    f"causal-lm v{CAUSAL_VERSION} {size.seqs}x{size.seq_len}" + (" file" if own else ""), sentences)
    path = Path(cache_dir) / f"{key[:32]}.npz"
    note = _causal_note(size)
    if use_cache:
        hit = _cached(path, key, note, src, say)
        if hit is not None:
            hit.text = text_record(own)
            return _selected_unrouted(hit, src, say)
    runner = causal_lm.load(src)
    count = option("seqs", flag="--calib-seqs")
    if own:
        windows = text_windows(runner, own, size.seqs, size.seq_len, "calib_text", count)
    else:
        windows = runner.windows(runner.token_ids(sentences), size.seqs, size.seq_len,
                                 f"calibration text ({count} x {option('seq_len')})")
    stats, tokens = runner.collect_stats(windows)
    stats, dropped = _finite_selected(src, stats)
    cal = Calibration(True, note, stats, key, 0 if own else _sentences_used(runner, sentences, tokens), tokens,
                      seqs=size.seqs, seq_len=size.seq_len, unrouted=list(runner.unrouted), text=text_record(own))
    if use_cache:
        _save_unless_partial(path, cal, say, runner.cleaned, dropped)
    return _selected_unrouted(cal, src, say)


def _causal_note(size: CalibSize) -> str:
    """The calibration's note (`sop eval`'s calibration line, the JSON's and the .sopq's note): the text its
    windows were cut from, and, for a text file, the end-to-end check's text: the built-in held-out text, or
    the held-out text file (``--eval-text``) where one is given."""
    if size.text is None:
        return (f"mean square of each linear's input over {size.seqs} x {size.seq_len} tokens of pydoc_data.topics "
                f"text (transformers forward pass, hooks on every linear)")
    held, overlap = size.eval_text, text_overlap(size)
    if held is None:
        e2e = "keeps the built-in pydoc_data.topics held-out text"
    else:
        again = f": {overlap[1]}, not held out" if overlap else ""
        e2e = f"measures on {held.path} instead of the built-in held-out text{again}"
    return (f"mean square of each linear's input over {size.seqs} windows of {size.seq_len} tokens of "
            f"{size.text.path} (transformers forward pass, hooks on every linear); the end-to-end check, where "
            f"one runs, {e2e}")


def text_record(own: CalibText | None) -> dict | None:
    """What ``Calibration.text`` (and a causal LM's ``e2e.text``) records of a text file: its path as given and
    its bytes' SHA-256; None for the built-in text."""
    return None if own is None else {"path": own.path, "sha256": own.sha256}


def _selected_unrouted(cal: Calibration, src, say) -> Calibration:
    """``cal`` with ``unrouted`` narrowed to the layers ``src`` quantizes, said in one line (cold or cached)."""
    selected = {lay.name for lay in src.layers}
    cal.unrouted = [n for n in cal.unrouted if n in selected]
    if cal.unrouted and say is not None:
        say(f"calibration: no calibration token was routed to {len(cal.unrouted)} expert matrices (e.g. "
            f"{cal.unrouted[0]}): each is weighted as one token of ones would weigh it (unweighted within "
            f"the layer, next to nothing beside the others)")
    return cal


def _finite_selected(src, stats: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """The statistics less those of unselected layers that are not finite (they weigh nothing here),
    and whether any were dropped. A selected layer's that is not finite is refused, naming the cause:
    a selected layer's non-finite weight with the error every command gives for it (under
    ``--nan-policy error``), else the first selected layer whose input is not finite (a non-finite
    weight elsewhere, or activations that overflow)."""
    bad = [name for name, a in stats.items() if not np.isfinite(a).all()]
    selected = {lay.name for lay in src.layers}
    first = next((name for name in bad if name in selected), None)
    if first is not None:
        if src.nan_policy == "error":
            from sop.quantize.layer_loop import read_weight

            for lay in src.layers:              # only on this error path: one more read of the layers
                read_weight(src, lay.name, "error")
        raise ValueError(f"{src.spec}: calibration: the forward pass gives non-finite activations at the input "
                         f"of {first} (a non-finite weight outside the layers quantized, or activations that "
                         f"overflow); {no_calib()} quantizes without a forward pass")
    return {name: a for name, a in stats.items() if name not in bad}, bool(bad)


def _save_unless_partial(path: Path, cal: Calibration, say, cleaned: int, dropped: bool) -> None:
    """``_save``, unless the statistics are not the whole model's: weights replaced under
    ``--nan-policy zero`` (another selection would run another model under the same key), or
    unselected layers' statistics dropped as not finite (a run selecting them must meet the error)."""
    why = [w for w, on in ((f"non-finite weights replaced under {nan_zero()}", cleaned),
                           ("statistics of unquantized layers are not finite", dropped)) if on]
    if not why:
        _save(path, cal, say)
    elif say is not None:
        say(f"calibration not cached: {'; '.join(why)}")


def no_forward_note(src) -> str:
    why = getattr(src, "forward_note", "") or f"a {src.kind} checkpoint"
    return f"no forward pass for this model ({why}); errors are unweighted (a = 1)"


def calibrate(src, n_sentences: "int | CalibSize" = N_CALIB, cache_dir=DEFAULT_CACHE,
              use_cache: bool = True, say=None) -> Calibration:
    """Activation statistics for a ModelSource (quantize/models.py), cached on disk.

    ``n_sentences``: the sentence count (sentence encoders), or a ``CalibSize`` that also gives
    the causal-LM window shape. ``say`` (a progress printer, or None) gets one line when a
    damaged cache file is recomputed."""
    size = calib_size(n_sentences, "n_sentences")         # refused for any model
    cache_folder(cache_dir)
    use_cache = boolean("use_cache", use_cache)
    if getattr(src, "forward", None) == "causal-lm":
        return calibrate_causal(src, size, cache_dir, use_cache, say)
    check_text_model(src, size)
    if src.bert_folder is None:
        return unweighted(no_forward_note(src))
    n_sentences = size.sentences
    from sop.quantize.evaluate import bert_forward

    sentences = calibration_sentences(n_sentences)
    # the weights and the files the forward pass reads beside them (config.json's heads and epsilon,
    # the tokenizer): a changed tokenizer is another calibration
    key = cache_key(f"{src.fingerprint()}\n{src.aux_fingerprint()}", src.bert_prefix, sentences)
    path = Path(cache_dir) / f"{key[:32]}.npz"
    note = f"mean square of each linear's input over {len(sentences)} pydoc_data.topics sentences"
    if use_cache:
        hit = _cached(path, key, note, src, say)
        if hit is not None:
            return hit
    bert = bert_forward(src)
    stats, tokens = collect_stats(bert, sentences)
    stats, dropped = _finite_selected(src, stats)
    cal = Calibration(True, note, stats, key, len(sentences), tokens)
    if use_cache:
        _save_unless_partial(path, cal, say, bert.cleaned, dropped)
    return cal
