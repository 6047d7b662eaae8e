"""`sop report`: the table and the Pareto picture of a `sop eval --json` result.

``report(json_path, stem=None)`` reads the JSON that ``quantize.evaluate``
writes (its schema is in that module's docstring), and writes, next to it
(or at ``stem``):

* ``<stem>.md``: a markdown table, one row per format sorted by bits per weight
  (then by SQNR, best first): format, bpw, aggregate SQNR (dB), relative MSE,
  ACos, the end-to-end embedding cosine mean and minimum when any format has
  them, and whether the format is on the Pareto front;
* ``<stem>.png``: a scatter of aggregate SQNR (dB) against bpw, every point
  labeled with its format (up to ``MAX_LABELS``, 60 formats; past that the points alone and a note
  under the plot: the table names them), the Pareto front drawn as the staircase of the best
  SQNR reachable at each bpw (matplotlib, Agg canvas, no display needed).

For a causal LM (formats whose ``e2e`` has ``"metric": "causal-lm"``) the table
also gives perplexity, the mean KL divergence against the unquantized model
(nats per token), top-1 agreement and whether the format is on the KLD front
(fewer bits, lower KLD; the line naming it says how many held-out tokens, and of which ``--eval-text`` file,
``e2e.text``), and the PNG has a second panel beside the SQNR one:
KLD against bpw on a logarithmic axis, with its own front (the staircase of the
lowest KLD reachable at each bpw). A KLD of exactly 0 (a lossless format) cannot
sit on a log axis: it is listed and left out of that panel, with a note.

Both files are written atomically (golden.files.write_atomic).

**Pareto front** (``pareto_front``): a format is on it when no other format has
fewer-or-equal bits per weight *and* greater-or-equal SQNR with at least one of
the two strictly better. Equal points are all on it. The report compares bit
costs with a tolerance, ``BPW_TOL`` = 0.01 bpw by default (``bpw_tol``; 0.2 % of
4.5 bpw): formats of one nominal cost differ by a few thousandths of a bit per
weight through their per-layer tables and scales (on MiniLM ``nf4-g64`` 4.5
exactly, ``nvfp4`` 4.5001 (an FP32 scale per layer), ``sop4-g16`` 4.5011 with its two LUT images per
layer), and a user choosing a format sees them as one cost. A null SQNR in the JSON
is an exact reconstruction (the evaluator writes infinity as null) and counts as
+infinity: it is listed as ``inf`` and left out of the plot (noted under it).

Bad input (a missing file, not JSON, a missing or mistyped field, a number outside its
``FIELD_RANGES`` range: NaN, Infinity, a negative bpw, an integer of any length past float64's,
a positive KLD the log panel cannot span, an ``e2e`` entry of a metric it does not know) raises ``ValueError``
naming the file and the field;
every number checked there, once, so the table and the plot never meet a NaN, an overflow or a
warning.
"""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sop.golden.files import OutputError, input_file, refuse_folder_name, write_atomic
from sop.quantize.models import linear_layers

BPW_TOL = 0.01          # default: bit costs this close count as equal on the Pareto front
#: the endings of the files ``report`` writes: a stem that ends so, or an eval JSON named so, is refused
REPORT_SUFFIXES = (".md", ".png")


def pareto_front(bpw, sqnr, bpw_tol: float = 0.0) -> np.ndarray:
    """Boolean mask: which points are not dominated (minimize bpw, maximize SQNR).

    Point j dominates i when ``bpw_j <= bpw_i``, ``sqnr_j >= sqnr_i`` and one of
    them is strict, where bit costs within ``bpw_tol`` of each other count as
    equal. NaN coordinates are never on the front and dominate nothing."""
    b = np.asarray(bpw, dtype=np.float64)
    s = np.asarray(sqnr, dtype=np.float64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"bpw and SQNR must be 1-D of one length, got {b.shape} and {s.shape}")
    if not bpw_tol >= 0:
        raise ValueError(f"bpw tolerance must be >= 0, got {bpw_tol}")
    ok = ~(np.isnan(b) | np.isnan(s))
    # dom[j, i]: point j dominates point i
    db = b[:, None] - b[None, :]                  # bpw_j - bpw_i
    le, ge = db <= bpw_tol, s[:, None] >= s[None, :]
    strict = (db < -bpw_tol) | (s[:, None] > s[None, :])
    dom = le & ge & strict & ok[:, None] & ok[None, :]
    return ok & ~dom.any(axis=0)


# -- reading the eval JSON ------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """The values one number of an eval result may take: finite, from ``low`` to ``high`` (``low``
    itself excluded when ``open_low``), or exactly 0 besides when ``zero``; whole when ``integer``."""

    low: float
    high: float
    open_low: bool = False
    zero: bool = False
    integer: bool = False

    def holds(self, x: float) -> bool:
        if self.zero and x == 0:
            return True
        inside = (self.low < x if self.open_low else self.low <= x) and x <= self.high    # NaN fails both
        return inside and (not self.integer or x.is_integer())

    def __str__(self) -> str:
        span = f"above {self.low:g} and at most {self.high:g}" if self.open_low else \
            f"from {self.low:g} to {self.high:g}"
        return f"{'0 or ' if self.zero else ''}{'a whole' if self.integer else 'a finite'} number {span}"


#: What each number of an eval result may be. What ``sop eval`` can write lies inside; the bounds
#: keep a hand-edited file from printing NaN, overflowing, or drawing a plot whose axis limits
#: leave float64 (a bpw of 10**400 is no float, 1e308 dB no axis, and the KLD panel's log axis
#: pads its range by 12 % of the decades it spans: 1e-100 .. 1e100 keeps 10**limit a normal float).
FIELD_RANGES = {
    # a weight costs something; a layer of one weight pays a whole block and its tables: 752 bpw at
    # e2m3-ue4m4-g16, the most `sop eval` writes (the bound was 64, and a tiny model's own eval was refused)
    "bpw": Range(0.0, 1024.0, open_low=True),
    "sqnr_db": Range(-1000.0, 1000.0),       # exact is null; 1000 dB is far past float64's precision
    "rel_mse": Range(0.0, 1e300),
    "acos": Range(-1.0, 1.0),                # a cosine (activation-weighted)
    "cos_mean": Range(-1.0, 1.0),
    "cos_min": Range(-1.0, 1.0),
    "ppl": Range(1.0, sys.float_info.max),   # exp(mean NLL): 1 or more, up to exp(709)
    "ppl_ref": Range(1.0, sys.float_info.max),
    "kld": Range(1e-100, 1e100, zero=True),  # 0 exactly (lossless), else far from float64's ends
    "top1": Range(0.0, 1.0),
    "tokens": Range(1.0, 2.0 ** 53, integer=True),
}


class _LongInt(float):
    """A JSON integer of more digits than any float64 (Python would refuse past 4300 digits, in
    words that name neither the file nor the field): infinity with its sign, and its length."""

    digits: int


def _json_int(text: str) -> int | float:
    """``json.loads``' ``parse_int``: the integer, or a ``_LongInt`` past 308 digits."""
    digits = len(text.lstrip("-"))
    if digits <= 308:                        # below 1e308: a float64 holds it
        return int(text)
    big = _LongInt(-math.inf if text.startswith("-") else math.inf)
    big.digits = digits
    return big


def _shown(v) -> str:
    """``v`` for a one-line message: an integer too long to print as its length, anything long cut."""
    if isinstance(v, _LongInt):
        return f"an integer of {v.digits} digits"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**20:
        return f"an integer of {len(str(abs(v)))} digits"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(d: dict, key: str, where: str, nullable: bool = False) -> float:
    """Field ``key`` of ``d`` as a float in its ``FIELD_RANGES`` range; ``ValueError`` naming the
    file, the field and the value otherwise (NaN, Infinity and numbers too big for a float too)."""
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: field {key!r} is missing")
    v = d[key]
    if v is None and nullable:
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: field {key!r} must be a number, got {_shown(v)}")
    try:
        x = float(v)
    except OverflowError:                   # an integer of 400 digits, from a caller's dict
        x = math.inf
    if not FIELD_RANGES[key].holds(x):
        raise ValueError(f"{where}: field {key!r} must be {FIELD_RANGES[key]}, got {_shown(v)}")
    return x


#: the end-to-end metrics `sop eval` writes (quantize/e2e.py, quantize/causal_lm.py)
E2E_METRICS = ("sentence-embedding cosine", "causal-lm")


def _e2e_cells(e2e, where: str) -> tuple[tuple[float, float] | None, dict | None]:
    """A format's ``e2e`` entry as (cosine mean and minimum, the causal LM's numbers), each None
    where absent: no entry and a skipped one (``{"skipped": reason}``) give neither. A metric this
    report does not know is refused, not dropped from the table without a word."""
    if e2e is None or (isinstance(e2e, dict) and "skipped" in e2e and "metric" not in e2e):
        return None, None
    if not isinstance(e2e, dict):
        raise ValueError(f"{where}: field 'e2e' must be an object, got {_shown(e2e)}")
    where, metric = f"{where}.e2e", e2e.get("metric")
    if metric == "sentence-embedding cosine":
        return (_num(e2e, "cos_mean", where), _num(e2e, "cos_min", where)), None
    if metric == "causal-lm":
        # a null perplexity is one past float64 (a mean NLL over 709 nats: causal_lm.perplexity)
        cells = {k: _num(e2e, k, where, nullable=k in ("ppl", "ppl_ref"))
                 for k in ("ppl", "ppl_ref", "kld", "top1", "tokens")}
        cells["text"] = _text_file(e2e.get("text"), where)
        return None, cells
    known = " or ".join(repr(m) for m in E2E_METRICS)
    raise ValueError(f"{where}: field 'metric' must be {known} (or the entry {{\"skipped\": reason}}), "
                     f"got {_shown(metric) if 'metric' in e2e else 'none'}")


def _text_file(text, where: str) -> tuple[str, str] | None:
    """A causal LM's ``e2e.text`` (`sop eval --eval-text`: ``{"path", "sha256"}``) as (path, SHA-256), None where
    absent (the built-in held-out text); anything else a ``ValueError`` naming the field."""
    if text is None:
        return None
    if not (isinstance(text, dict) and isinstance(text.get("path"), str) and isinstance(text.get("sha256"), str)):
        raise ValueError(f"{where}: field 'text' must be {{\"path\": str, \"sha256\": str}} (sop eval --eval-text), "
                         f"got {_shown(text)}")
    return text["path"], text["sha256"]


def _held_out(rows: list[dict], where: str) -> str:
    """What the causal-LM rows' figures were measured on, for the report's KLD-front line: ``N held-out tokens``
    (the rows' one count) and, from a file (``--eval-text``), ``of `FILE` (SHA-256 ...)``; rows measured on
    different texts, or on different counts of tokens of one text (JSON documents merged by hand: another
    ``--e2e-windows`` or ``--seq-len``), a ``ValueError``: their figures do not compare, and the line would
    name the first row's count for all. A text is told by its SHA-256, not its path: one file named from two
    folders (``held.txt``, ``/data/held.txt``) is one text, and the line names the first row's path."""
    measured = [r["llm"] for r in rows if r.get("llm")]
    if len({m["text"] and m["text"][1] for m in measured}) > 1:
        raise ValueError(f"{where}: the formats' end-to-end figures were measured on different held-out texts "
                         f"(e2e.text): one `sop eval` run measures every format on one")
    counts = sorted({int(m["tokens"]) for m in measured})
    if len(counts) > 1:
        raise ValueError(f"{where}: the formats' end-to-end figures were measured on different numbers of "
                         f"held-out tokens (e2e.tokens: {', '.join(f'{n:,}' for n in counts)}): one `sop eval` "
                         f"run measures every format on the same tokens")
    tokens, text = int(measured[0]["tokens"]), measured[0]["text"]
    if text is None:
        return f"{tokens:,} held-out tokens"
    path = shown_text(text[0])
    span = f"`` {path} ``" if "`" in path else f"`{path}`"      # a code span its own backticks cannot end
    return f"{tokens:,} held-out tokens of {span} (SHA-256 {text[1]})"


def load_rows(doc: dict, where: str = "eval JSON", bpw_tol: float = BPW_TOL) -> list[dict]:
    """One row per format: name, bpw, sqnr_db, rel_mse, acos, e2e (mean, min) or None; sorted by bpw."""
    if not isinstance(doc, dict) or not isinstance(doc.get("formats"), dict) or not doc["formats"]:
        raise ValueError(f"{where}: field 'formats' is missing or empty (is this `sop eval --json` output?)")
    rows = []
    for name, f in doc["formats"].items():
        w = f"{where}: formats.{name}"
        cos, llm = _e2e_cells(f.get("e2e") if isinstance(f, dict) else None, w)
        rows.append({"format": shown_text(name), "bpw": _num(f, "bpw", w),
                     "sqnr_db": _num(f, "sqnr_db", w, nullable=True), "rel_mse": _num(f, "rel_mse", w),
                     "acos": _num(f, "acos", w), "e2e": cos, "llm": llm})
    rows.sort(key=lambda r: (r["bpw"], -r["sqnr_db"], r["format"]))
    front = pareto_front([r["bpw"] for r in rows], [r["sqnr_db"] for r in rows], bpw_tol)
    kld = [-r["llm"]["kld"] if r["llm"] else math.nan for r in rows]          # lower KLD is better
    kfront = pareto_front([r["bpw"] for r in rows], kld, bpw_tol)
    for r, on, kon in zip(rows, front, kfront):
        r["pareto"] = bool(on)
        r["kld_front"] = bool(kon)
    return rows


def _ppl_cell(ppl: float) -> str:
    """A perplexity may be as large as exp(709): past a million in exponent form, not 300 digits."""
    return f"{ppl:.3f}" if ppl < 1e6 else f"{ppl:.4e}"


def shown_text(text) -> str:
    """A name from the JSON as text the outputs can hold: on one line, and a lone surrogate (a
    file name that was no UTF-8, written by `sop eval` as ``\\udcff``) shown as that escape, since
    neither UTF-8 nor the plot's font takes it."""
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def _plot_text(text: str) -> str:
    """``text`` drawn as it is: a ``$`` pair would be parsed as mathtext (and a bad one fail)."""
    return text.replace("$", "\\$")


def _cell_text(text: str) -> str:
    """A name as one markdown table cell: on one line, its pipes escaped (a JSON key may hold both)."""
    return shown_text(text).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    has_e2e = any(r["e2e"] is not None for r in rows)
    has_llm = any(r.get("llm") is not None for r in rows)
    head = ["format", "bpw", "SQNR dB", "rel MSE", "ACos"] + (["e2e cos mean", "e2e cos min"] if has_e2e else [])
    head += ["ppl", "KLD", "top-1"] if has_llm else []
    head.append("Pareto")
    head += ["KLD front"] if has_llm else []
    centered = 2 if has_llm else 1
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1 - centered) + ":---:|" * centered]
    for r in rows:
        sq = "inf" if math.isinf(r["sqnr_db"]) else f"{r['sqnr_db']:.2f}"
        cells = [_cell_text(r["format"]), f"{r['bpw']:.3f}", sq, f"{r['rel_mse']:.3e}", f"{r['acos']:.6f}"]
        if has_e2e:
            cells += [f"{r['e2e'][0]:.5f}", f"{r['e2e'][1]:.5f}"] if r["e2e"] else ["-", "-"]
        if has_llm:
            m = r.get("llm")
            cells += [_ppl_cell(m["ppl"]), f"{m['kld']:.3e}", f"{m['top1']:.4f}"] if m else ["-", "-", "-"]
        cells.append("yes" if r["pareto"] else "")
        if has_llm:
            cells.append("yes" if r.get("kld_front") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- the plot -----------------------------------------------------------------------------------------

MAX_LABELS = 60                 # formats a panel labels; past it, points alone (the table names them)


def _spread(y: np.ndarray, x: np.ndarray, min_gap: float, x_near: float) -> np.ndarray:
    """Label heights: ``y`` pushed apart to at least ``min_gap`` among labels whose x are near
    (a few relaxation sweeps over the formats; there are only a handful)."""
    out = np.asarray(y, dtype=np.float64).copy()
    for _ in range(100):
        moved = False
        order = np.argsort(out, kind="stable")
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                gap = out[b] - out[a]
                if abs(x[a] - x[b]) < x_near and gap < min_gap * (1 - 1e-9):
                    push = (min_gap - gap) / 2
                    out[a] -= push
                    out[b] += push
                    moved = True
        if not moved:
            break
    return out


def _panel(ax, pts: list[dict], v: np.ndarray, on: np.ndarray, higher_better: bool, label) -> None:
    """One scatter panel: points at (bpw, v), labeled, the front as a staircase of the best value
    reachable at each bpw; ``v`` is in the axis' own units (log10 for a log axis)."""
    x = np.array([r["bpw"] for r in pts])
    xr = max(x.max() - x.min(), 1.0)
    vr = max(v.max() - v.min(), 1.0 if higher_better else 0.5)
    lo, hi = v.min() - 0.12 * vr, v.max() + 0.12 * vr
    log = ax.get_yscale() == "log"
    shown = (lambda t: 10.0 ** t) if log else (lambda t: t)
    ax.set_xlim(x.min() - 0.08 * xr, x.max() + 0.30 * xr)
    ax.set_ylim(shown(lo), shown(hi))
    fx, fv = x[on], v[on]
    k = np.lexsort((-fv if higher_better else fv, fx))
    fx, fv = fx[k], fv[k]
    if len(fx):
        sx = np.append(fx, x.max() + 0.30 * xr)
        sv = np.append(fv, fv[-1])
        best = np.maximum.accumulate(sv) if higher_better else np.minimum.accumulate(sv)
        ax.step(sx, shown(best), where="post", color="tab:red", lw=1.5, alpha=0.8, label="Pareto front", zorder=2)
    ax.scatter(x[~on], shown(v[~on]), s=36, facecolors="white", edgecolors="tab:gray", lw=1.4, label="dominated",
               zorder=3)
    ax.scatter(x[on], shown(v[on]), s=44, color="tab:red", label="on the front", zorder=4)
    # past MAX_LABELS, points alone: labels would be unreadable, and _spread is quadratic
    lv = _spread(v, x, min_gap=0.045 * (hi - lo), x_near=0.25 * xr) if len(pts) <= MAX_LABELS else []
    for r, xi, vi, li in zip(pts, x, v, lv):
        ax.annotate(_plot_text(label(r)), (xi, shown(vi)), xytext=(xi + 0.035 * xr, shown(li)), textcoords="data",
                    fontsize=8, va="center", arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6}, zorder=5)
    _finish_panel(ax, higher_better)


def _finish_panel(ax, higher_better: bool) -> None:
    ax.legend(loc="lower right" if higher_better else "upper right", fontsize=8)
    ax.set_xlabel("bits per weight")
    ax.grid(True, alpha=0.3)


def _matplotlib_folder() -> None:
    """Before matplotlib's import: where its default config and cache folders (``XDG_CONFIG_HOME`` or
    ``~/.config``, ``XDG_CACHE_HOME`` or ``~/.cache``, each ``/matplotlib``) cannot be written (a read-only
    or missing HOME: containers, CI), ``MPLCONFIGDIR`` is a folder of sop's own in the temporary folder,
    ``sop-matplotlib-<uid>``, kept between runs for its font cache. Matplotlib would otherwise print two
    warning lines and build its font cache again in a new temporary folder every run. Left to matplotlib
    where ``MPLCONFIGDIR`` is set, and where that folder is not a private one of this user's."""
    import os
    import stat
    import tempfile

    if os.environ.get("MPLCONFIGDIR") or "matplotlib" in sys.modules:
        return
    try:
        home = Path.home()
    except RuntimeError:                    # no HOME and no password entry
        home = None
    for var, default in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache")):
        base = os.environ.get(var) or (str(home / default) if home is not None else "")
        folder = Path(base) / "matplotlib" if base else None
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                if os.access(folder, os.W_OK | os.X_OK):
                    continue
        except OSError:
            pass
        break
    else:
        return                              # both defaults work
    own = Path(tempfile.gettempdir()) / f"sop-matplotlib-{os.getuid()}"
    try:
        own.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(own)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
        os.environ["MPLCONFIGDIR"] = str(own)


def plot_png(rows: list[dict], title: str) -> bytes:
    """The SQNR-vs-bpw scatter with labels and the Pareto staircase, and for a causal LM the
    KLD-vs-bpw one beside it, as PNG bytes."""
    _matplotlib_folder()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [r for r in rows if math.isfinite(r["sqnr_db"])]
    left_out = [r["format"] for r in rows if not math.isfinite(r["sqnr_db"])]
    llm = [r for r in rows if r.get("llm") is not None and r["llm"]["kld"] > 0]
    zero_kld = [r["format"] for r in rows if r.get("llm") is not None and r["llm"]["kld"] == 0]
    two = any(r.get("llm") is not None for r in rows)
    fig = Figure(figsize=(15, 5.6) if two else (8, 5.2), dpi=130)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if two else 1, 1)
    if pts:
        _panel(ax, pts, np.array([r["sqnr_db"] for r in pts]), np.array([r["pareto"] for r in pts]), True,
               lambda r: f"{r['format']}  ({r['sqnr_db']:.2f} dB)")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("aggregate SQNR (dB)")
    ax.set_title(_plot_text(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    notes = []
    if len(pts) > MAX_LABELS or len(llm) > MAX_LABELS:
        notes.append(f"points not labelled: more than {MAX_LABELS} formats (the table names them)")
    if left_out:
        notes.append(f"not plotted (exact, infinite SQNR): {', '.join(left_out)}")
    if two:
        kx = fig.add_subplot(1, 2, 2)
        kx.set_yscale("log")
        if llm:
            _panel(kx, llm, np.log10([r["llm"]["kld"] for r in llm]), np.array([r["kld_front"] for r in llm]), False,
                   lambda r: f"{r['format']}  ({r['llm']['kld']:.2e})")
        kx.set_xlabel("bits per weight")
        kx.set_ylabel("mean KL divergence vs the unquantized model (nats/token, log)")
        tokens = next((int(r["llm"]["tokens"]) for r in rows if r.get("llm")), 0)
        kx.set_title(f"next-token KLD against bits per weight ({tokens:,} held-out tokens)", fontsize=10)
        kx.grid(True, alpha=0.3, which="both")
        if zero_kld:
            notes.append(f"not on the KLD panel (KLD exactly 0): {', '.join(zero_kld)}")
    if notes:
        fig.text(0.01, 0.01, _plot_text("; ".join(notes)), fontsize=7)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # A name with a character the font lacks (from a user's JSON) is drawn as a box, not a warning.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        # A very long name leaves no room to lay out: the figure is drawn as it is.
        warnings.filterwarnings("ignore", message="Tight layout not applied", category=UserWarning)
        fig.tight_layout()
        fig.savefig(buf, format="png")
    return buf.getvalue()


# -- the command ----------------------------------------------------------------------------------------

def output_paths(json_path: str | Path, stem: str | Path | None = None) -> tuple[Path, Path]:
    """(``<stem>.md``, ``<stem>.png``); the stem defaults to the JSON's path without its suffix."""
    if stem is not None:
        refuse_folder_name(stem, "the stem of the files to write (STEM.md, STEM.png)")
        given = Path(stem)
        if given.suffix.lower() in REPORT_SUFFIXES:     # `--out report.md` wrote report.md.md and report.md.png
            raise OutputError(f"{stem}: a file's name, not the stem of the files to write, which takes .md and .png "
                              f"after it ({given.name}.md, {given.name}.png); give {given.with_suffix('')}")
    stem = Path(stem) if stem is not None else Path(json_path).with_suffix("")
    return stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".png")


def report(json_path: str | Path, stem: str | Path | None = None, bpw_tol: float = BPW_TOL) -> dict:
    """Write ``<stem>.md`` and ``<stem>.png`` for an eval JSON; returns paths, markdown and rows."""
    json_path = input_file(json_path, "eval JSON (write one with `sop eval ... --json FILE`)")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"), parse_int=_json_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        from sop.quantize.artifact import MAGIC

        with open(json_path, "rb") as f:                  # an artifact given for its eval: a natural mistake
            is_artifact = f.read(len(MAGIC)) == MAGIC
        if is_artifact:
            raise ValueError(f"{json_path}: a .sopq artifact, not an eval JSON: `sop report` reads what `sop eval "
                             f"MODEL --format F --json FILE` writes (`sop dequantize` reads an artifact)") from None
        raise ValueError(f"{json_path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{json_path}: JSON nested too deeply to be an eval result") from None
    except OSError as err:
        raise ValueError(f"{json_path}: cannot read: {err.strerror or err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{json_path}: not a `sop eval --json` result (a JSON {type(doc).__name__})")
    rows = load_rows(doc, str(json_path), bpw_tol)
    md_path, png_path = output_paths(json_path, stem)
    src = doc.get("source") if isinstance(doc.get("source"), dict) else {}
    cal = doc.get("calibration") if isinstance(doc.get("calibration"), dict) else {}
    model = shown_text(doc.get("model", "?"))
    layers = src.get("layers")
    desc = f"{model}: {linear_layers(layers) if isinstance(layers, int) else '? linear layers'}, " \
           f"{src['weights']:,} weights" if isinstance(src.get("weights"), int) else f"{model}"
    weighted = "calibrated, activation-weighted" if cal.get("weighted") else "uncalibrated, unweighted"
    table = markdown_table(rows)
    front = ", ".join(r["format"] for r in rows if r["pareto"])
    md = (f"# Quantization report: {model}\n\n{desc}; {weighted}. Source: `{json_path.name}`.\n\n{table}\n"
          f"Pareto front (fewer bits, more SQNR; bit costs within {bpw_tol:g} bpw count as equal): "
          f"{front}.\n")
    if any(r.get("llm") for r in rows):
        kfront = ", ".join(r["format"] for r in rows if r.get("kld_front"))
        md += (f"\nKLD front (fewer bits, lower mean KL divergence of the next-token distributions against the "
               f"unquantized model, {_held_out(rows, str(json_path))}): {kfront}.\n")
    md += f"\n![SQNR against bpw]({png_path.name})\n"
    png = plot_png(rows, f"{model}: aggregate SQNR against bits per weight ({weighted})")
    write_atomic(png_path, png)
    write_atomic(md_path, md.encode("utf-8", "surrogateescape"))   # a file name's undecoded bytes as they were
    return {"md": md_path, "png": png_path, "markdown": table, "rows": rows}
