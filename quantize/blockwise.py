"""Block encoder: weights -> a golden LayerStream (headers, codes, LUT images, offset).

This is the exact encoder on which the SOP search builds: for a given layout and
codebook bank(s) it picks, per block, the bank, the scale sign and the scale code
that minimize the block's (optionally activation-weighted) squared error

    err(block) = sum_j a_j * (w_j - q_j)^2        (a_j = col_weight[j], the column's activation
                                                  mean square, or 1: docs/sop.md's a_j^2)

among

* every bank of the layout (1, or 2 with a selection bit),
* both signs where the header carries one,
* the scale code that just covers the block without clipping, and its
  ``scale_search`` neighbours on each side;

and assigns each weight the nearest codebook entry of ``w / s`` (golden.formats'
rule, ties to the even code: the codes are identical to ``Codebook.encode``).
The first candidate in that order wins ties (bank A before B, sign + before -,
smaller scale code before larger), so the result is deterministic.

The error of each candidate is computed on the exact product the decoder forms
(HIF entry x scale x 2^offset is exact in float64), so the reconstruction the
encoder reports (``Encoded.recon``) is, bit for bit, ``golden.decoder.decode_layer``'s
output for the stream (tests/test_sop_search.py checks it through pack/unpack).

Its arithmetic, fixed to the bit: per candidate ``q_j`` (the product), the error is
``block_sum(((w_j - q_j) * (w_j - q_j)) * a_j)`` in float64, and the chosen candidate's
``qq = block_sum((q_j * q_j) * a_j)``, where ``block_sum`` adds a block's g terms in the fixed order
``np.sum`` takes over a contiguous axis of g (numpy's pairwise summation), written out as
additions of slices (quantize/block_sum.py). Nothing is summed by BLAS (whose order is its
kernel's, which depends on the CPU and the number of rows) or by a library reduction: numpy and
torch on any device (``--device``, quantize/device.py) perform the same additions, so every
device gives the same bits, and a block's result does not depend on the chunk it is evaluated
in.

The error weights are held scaled by a power of two (``metrics.unit_scaled``: the largest in
[0.5, 1), ``Prepared.a_exp``): exact, so every choice is the unscaled weights' choice, and no sum
overflows or underflows whatever the size of ``col_weight`` (``Encoded.error`` is scaled back).

The per-layer power-of-two offset is the smallest that lets the largest block
fit under the scale format's maximum (over every bank and sign). Width must be a
multiple of the block size; NaN/Inf weights are refused.

Speed (the inner loop of the whole quantizer): ``FastTable`` (quantize/fast_table.py) replaces
``Codebook.encode``'s binary search by a look-up on a uniform grid fine enough that every
decision midpoint of the table is a grid point, so a weight's cell decides its code except
exactly on a midpoint (a tie) or on zero (the sign of zero); those go to ``Codebook.encode``
itself, so the codes are golden's by construction (and tested so). For a float32 layer the grid
coordinate ``w / s`` is the float32 quotient, redone in float64 only where it is an integer
(``FastTable.cells_div`` has the proof). The candidate search works on row chunks of about
``EVAL_WEIGHTS`` candidate weights with each block's g terms on a leading axis
(``Prepared.transposed``: the sums are whole-array additions, every per-block factor broadcasts
along a contiguous axis), in reused work arrays (``fast_table.work_array``), with ``qq`` formed
for the chosen candidate only; on ``THREADS`` threads (default one). The per-bank evaluation
(``evaluate_bank``) is reusable: a two-bank encode is the per-block minimum of two one-bank
evaluations, which is what lets the SOP pair search score every pair at the cost of one
evaluation per codebook.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from sop.golden.codebooks import Codebook
from sop.golden.layout import OFFSET_RANGE, BlockLayout, LayerStream, pack_blocks

from . import device
from .block_sum import block_sum, halved_sum, sum_order
from .fast_table import fast_table, work_array
from .metrics import unit_scaled

#: Weights per chunk: temporaries of this size (512 KB in float64) stay in L2.
CHUNK_WEIGHTS = 1 << 16
#: Candidate weights per row chunk of the candidate search (``BankEvaluator.chunks``): every
#: candidate's products of a chunk are one float64 array of about this many elements. A block's
#: results do not depend on the chunk, so this is a matter of speed alone (2^16 to 2^18 measured
#: within 5 % of each other on the 2-core machine, 2^15 slower).
EVAL_WEIGHTS = 1 << 17
#: Worker threads for the chunk loop; ``SOP_THREADS`` sets it, default 1 (inline). Threads
#: were the default once, but the loop is many short numpy calls that hold the GIL between
#: them: on the 2-CPU machine 2 threads ran the sop4-g16 search 16 % slower than one (4096 x
#: 2048: 6.35 s against 5.47 s; `sop eval minilm` 12.6 to 13.1 s against 12.1 to 12.2 s, most of
#: the difference system time). Cores are used by processes instead: ``--jobs N``
#: (quantize/jobs.py), layers in parallel, 2.3x at 2 jobs (docs/benchmarks.md).
THREADS_ENV = "SOP_THREADS"


def _threads_from_env() -> int:
    """``SOP_THREADS`` as a thread count: unset, empty or 0 is 1. A value that is no positive integer is said in
    one line and read as 1 (it is read at import, before any command could report an error, and the
    count changes the speed alone, never a bit of the output)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text.isascii() and text.isdigit():           # not str.isdigit alone: '²' is a digit int() refuses
        return max(1, int(text))
    if text:
        print(f"sop: warning: {THREADS_ENV}={text!r} is not a positive integer; using 1 thread", file=sys.stderr)
    return 1


THREADS = _threads_from_env()
_pool: tuple[int, ThreadPoolExecutor] | None = None
#: Per thread, what the tables evaluated on one row chunk share: its blocks transposed and the
#: float32 quotients' cells (BankEvaluator.chunk), of the chunk last evaluated.
_cells_memo = threading.local()
_tokens = itertools.count()


def float_weights(w) -> np.ndarray:
    """``w`` as a float array without a copy where it is one already: float16, float32 and
    float64 stay as they are (every consumer casts chunks to float64, which is exact),
    anything else becomes float64."""
    w = np.asarray(w)
    return w if w.dtype.kind == "f" and w.dtype.itemsize <= 8 else np.asarray(w, dtype=np.float64)


def block_reduce(m: np.ndarray, op=np.maximum) -> np.ndarray:
    """``op.reduce(m, axis=-1)`` for ``op`` np.maximum or np.minimum (exact in any order), by
    halving a power-of-two last axis: numpy's reduction over a short last axis costs about five
    elementwise passes, the halving about one and a half."""
    g = m.shape[-1]
    if g & (g - 1) or g < 2:
        return op.reduce(m, axis=-1)
    while g > 1:
        g //= 2
        m = op(m[..., :g], m[..., g:2 * g])
    return m[..., 0]


def _rows_memo(prep, sl) -> dict:
    """This thread's memo of rows ``sl`` of ``prep`` (emptied when other rows are asked for)."""
    rows = (prep.token, sl.start, sl.stop)
    memo = getattr(_cells_memo, "chunk", None)
    if memo is None or memo[0] != rows:
        memo = (rows, {})
        _cells_memo.chunk = memo
    return memo[1]


@lru_cache(maxsize=8)
def _grid_index(g: int, n: int) -> np.ndarray:
    idx = np.arange(g * n, dtype=np.intp).reshape(g, n)
    idx.flags.writeable = False
    return idx


def first_min(errs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, min) over the leading axis: the first index holding the least value (``np.argmin``'s
    documented tie order) and that value (errors are never NaN or -0, so no other bits tie)."""
    k = np.argmin(errs, axis=0)
    return k, np.minimum.reduce(errs, axis=0)


def row_slices(rows: int, cols: int, chunk: int = CHUNK_WEIGHTS) -> list[slice]:
    """Row slices of a ``rows x cols`` array, about ``chunk`` elements each (at least one row)."""
    step = max(1, chunk // max(1, cols))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def as_weights(name: str, w, group: int) -> np.ndarray:
    """``w`` as a 2-D float array whose values are finite and whose width is a multiple of
    ``group``, checked row chunk by row chunk (no float64 copy). A float32 or float16 layer stays so: callers cast
    each chunk to float64 (exact), so the results are those of the float64 copy."""
    w = float_weights(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight matrix, got shape {w.shape}")
    step = max(1, CHUNK_WEIGHTS // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        bad = ~np.isfinite(w[r0:r0 + step])
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name}: non-finite weight {float(w[r0 + r, c])} at row {r0 + r}, column {c}")
    if w.shape[1] % group:
        raise ValueError(f"{name}: {w.shape[1]} columns are not a multiple of the block size {group}")
    return w


def narrow_weights(w: np.ndarray) -> np.ndarray:
    """``w`` as float32 when every weight is exactly a float32 (a float32, float16 or bfloat16
    checkpoint read as float64), else ``w`` itself; checked chunk by chunk. Every consumer
    casts to float64 again, exactly, so results are unchanged while a layer held between
    steps costs 4 bytes per weight instead of 8."""
    w = np.asarray(w)
    if w.dtype == np.float32 or w.dtype.kind != "f" or w.ndim != 2:
        return w
    out = np.empty(w.shape, dtype=np.float32)
    step = max(1, CHUNK_WEIGHTS // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        c = w[r0:r0 + step]
        out[r0:r0 + step] = c
        if not np.array_equal(out[r0:r0 + step], c):    # rounded, overflowed or NaN: keep w
            return w
    return out


def check_col_weight(name: str, col_weight, cols: int) -> np.ndarray | None:
    """Validate a per-input-channel error weight (activation mean square): shape (cols,), finite, >= 0."""
    if col_weight is None:
        return None
    a = np.asarray(col_weight, dtype=np.float64)
    if a.shape != (cols,):
        raise ValueError(f"{name}: col_weight must have shape ({cols},), got {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name}: col_weight must be finite and non-negative")
    return a


def run_chunks(fn, chunks: list) -> None:
    """Call ``fn(chunk)`` for every chunk (they write disjoint slices), on THREADS threads."""
    global _pool
    if THREADS <= 1 or len(chunks) <= 1:
        for c in chunks:
            fn(c)
        return
    # a forked child inherits the pool object but not its threads: give it its own
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(THREADS, thread_name_prefix="sop-encode"))
    for _ in _pool[1].map(fn, chunks):   # re-raises a worker's exception here
        pass


# -- per-bank evaluation ----------------------------------------------------------------------

@dataclass
class Prepared:
    """A layer split into blocks: ``blocks`` (rows, blocks per row, g); ``a`` (blocks per row, g) or None,
    the error weights times ``2^-a_exp`` (``unit_scaled``)."""

    name: str
    layout: BlockLayout
    w: np.ndarray
    blocks: np.ndarray
    a: np.ndarray | None
    bmax: np.ndarray          # (rows, bpr) largest weight of each block
    bmin: np.ndarray          # (rows, bpr) smallest weight of each block
    ww: np.ndarray            # (rows, bpr) sum_j a_j w_j^2 of each block
    a_exp: int = 0            # ``a`` is ``col_weight`` times 2^-a_exp
    _cover: dict = field(default_factory=dict, repr=False)
    _batch_idx: dict = field(default_factory=dict, repr=False)     # BankEvaluator.prime
    #: never reused (unlike id()): names this layer in the per-thread memo of BankEvaluator.chunk
    token: int = field(default_factory=lambda: next(_tokens), repr=False)
    _aT: np.ndarray | None = field(default=None, repr=False)

    def cover(self, cb: Codebook, sign: int, offset: int, svals: np.ndarray) -> np.ndarray:
        """Index (into ``svals``, the ascending scale values at ``offset``) of each block's
        covering scale; cached by the table's end values, which are all it depends on
        (NF4, BOF4, Split87 and SH4 all end at -1 and +1)."""
        key = (float(cb.values.max()), float(cb.values.min()), sign, offset, self.layout.scale.name)
        if key not in self._cover:
            target = cover_targets(self.bmax, self.bmin, cb, sign)
            # at most len(svals) (<= 2^16 for scale formats of up to 16 bits): held as uint16
            idx = np.searchsorted(svals, target, side="left")
            self._cover[key] = idx.astype(np.uint16) if len(svals) < 1 << 16 else idx
        return self._cover[key]

    def chunks_for(self, candidates: int = 1) -> list[slice]:
        """Row slices of about CHUNK_WEIGHTS / candidates weights each."""
        return row_slices(self.blocks.shape[0], candidates * self.w.shape[1])

    def eval_chunks(self, candidates: int) -> list[slice]:
        """The row chunks of the candidate search: about EVAL_WEIGHTS / candidates weights each
        (on a torch device, its own size: quantize/device.py)."""
        return row_slices(self.blocks.shape[0], candidates * self.w.shape[1],
                          device.chunk_weights(EVAL_WEIGHTS))

    @property
    def aT(self) -> np.ndarray | None:
        """The error weights as (g, 1, bpr), beside ``transposed`` blocks (the same order of the
        g terms); None unweighted."""
        if self.a is None:
            return None
        if self._aT is None:
            order = sum_order(self.layout.group)
            a = self.a if order is None else self.a[:, order]
            self._aT = np.ascontiguousarray(a.T[:, None, :])
        return self._aT

    def transposed(self, sl) -> tuple[np.ndarray, np.ndarray]:
        """(blocks of rows ``sl`` as (g, rows, bpr) in their own dtype, the same in float64):
        every per-block array of the search then has the block's g terms on a leading axis, in
        ``sum_order`` where there is one, so the per-block sums are whole-array additions of
        contiguous halves (``halved_sum``) and the per-block factors broadcast along a contiguous
        last axis. Kept per thread for the rows last asked for (every table of the pair search
        evaluates the same rows in turn)."""
        memo = _rows_memo(self, sl)
        if "T" not in memo:
            blocks = self.blocks[sl]
            g = blocks.shape[-1]
            if sum_order(g) is None:
                view = blocks.transpose(2, 0, 1)
            else:
                # sum_order is the bit reversal of each term's place in its group of 8: one
                # transposition of the terms' bits (group, b2, b1, b0) to (group, b0, b1, b2)
                rows, bpr = blocks.shape[:2]
                view = blocks.reshape(rows, bpr, g // 8, 2, 2, 2).transpose(2, 5, 4, 3, 0, 1)
                view = view.reshape(g, rows, bpr)
            raw = np.ascontiguousarray(view)
            memo["T"] = raw, raw.astype(np.float64)
        return memo["T"]

    def block_sum(self, x: np.ndarray, axis: int) -> np.ndarray:
        """``block_sum`` over the g axis of arrays laid out as ``transposed``."""
        return block_sum(x, axis) if sum_order(self.layout.group) is None else halved_sum(x, axis)


def prepare(w, layout: BlockLayout, col_weight=None, name: str = "layer") -> Prepared:
    """The layer in blocks. A float32 (or float16) ``w`` is kept as it is, not copied to
    float64: every use casts a chunk of ``blocks`` to float64 first (exact), so the results
    are those of the float64 layer. The per-block statistics are computed in row chunks."""
    w = as_weights(name, w, layout.group)
    a, a_exp = check_col_weight(name, col_weight, w.shape[1]), 0
    if a is not None:
        a, a_exp = unit_scaled(a)
    g = layout.group
    blocks = w.reshape(w.shape[0], -1, g)
    a = None if a is None else a.reshape(-1, g)
    shape = blocks.shape[:2]
    bmax, bmin, ww = np.empty(shape), np.empty(shape), np.empty(shape)
    step = max(1, CHUNK_WEIGHTS // max(1, w.shape[1]))
    for r in range(0, shape[0], step):
        blk = np.asarray(blocks[r:r + step], dtype=np.float64)
        w2 = blk * blk
        ww[r:r + step] = (w2 if a is None else w2 * a).sum(axis=-1)
        bmax[r:r + step] = block_reduce(blk, np.maximum)
        bmin[r:r + step] = block_reduce(blk, np.minimum)
    return Prepared(name, layout, w, blocks, a, bmax, bmin, ww, a_exp=a_exp)


def _sorted_scales(layout: BlockLayout) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values) of the finite scale codes, ascending by value (NaN codes are never chosen)."""
    scale = layout.scale
    finite = np.flatnonzero(np.isfinite(scale.values))
    order = finite[np.argsort(scale.values[finite], kind="stable")]
    return order, scale.values[order]


def _signs(layout: BlockLayout) -> tuple[int, ...]:
    # Both signs even for a table that is its own mirror image: on an exact tie of w / s
    # the mirrored candidate can round the other way and be a hair better, and the
    # encoder promises the true per-block minimum over its candidates.
    return (1, -1) if layout.signed_scale else (1,)


def cover_targets(bmax: np.ndarray, bmin: np.ndarray, cb: Codebook, sign: int) -> np.ndarray:
    """Smallest scale magnitude per block (given its max and min) that maps it into
    ``sign * cb`` without clipping."""
    top, bottom = (cb.values.max(), cb.values.min()) if sign > 0 else (-cb.values.min(), -cb.values.max())
    hi = np.maximum(bmax, 0) / top if top > 0 else np.zeros(bmax.shape)
    lo = np.maximum(-bmin, 0) / -bottom if bottom < 0 else np.zeros(bmin.shape)
    return np.maximum(hi, lo)


def choose_offset(layout: BlockLayout, max_target: float) -> int:
    """Smallest per-layer power of two that puts ``max_target`` under the scale format's maximum."""
    if max_target <= 0:
        return 0
    smax = float(layout.scale.max)
    # Exactly, not by log2 of the quotient (which rounds: a target an ulp above smax * 2^k gave k, and
    # the block clipped): start from the binary exponents' difference, then step while target / 2^off,
    # exact by ldexp (the result lies near smax, a normal number), is above smax or fits one lower.
    off = math.frexp(max_target)[1] - math.frexp(smax)[1]
    while math.ldexp(max_target, -off) > smax:
        off += 1
    while math.ldexp(max_target, 1 - off) <= smax:
        off -= 1
    return int(np.clip(off, *OFFSET_RANGE))


def bank_offset(prep: Prepared, cb: Codebook) -> int:
    """The offset ``cb`` alone would need; a set of banks needs the largest of theirs."""
    signs = (1, -1) if prep.layout.signed_scale else (1,)
    # the largest target, row chunk by row chunk (a maximum is exact in any grouping)
    worst = max(float(cover_targets(prep.bmax[sl], prep.bmin[sl], cb, s).max())
                for s in signs for sl in prep.chunks_for(1) if sl.stop > sl.start) if prep.bmax.size else 0.0
    return choose_offset(prep.layout, worst)


@dataclass
class BankEval:
    """The best candidate of one bank for every block, at one offset.

    Held compactly (the pair search keeps many): per block the error and ``qq`` (float64),
    the index of the chosen scale among the ascending scale values (``sidx``) and its sign
    (``neg``), about 1.1 bytes per weight. ``scale_code``, ``sign``, ``sv`` and
    ``wq`` are computed from them on access (each a new (rows, bpr) array; ``sv_of`` / ``sdiv_of`` for a
    slice of rows). A *choice-only*
    evaluation (``err`` and ``qq`` None, 0.125 bytes per weight) is enough for ``assemble``
    when the caller gives the per-block bank selection (the SOP4 pair search does)."""

    cb: Codebook
    offset: int
    err: np.ndarray | None   # (rows, bpr) weighted squared error of the best candidate
    qq: np.ndarray | None    # (rows, bpr) sum_j a_j q_j^2
    sidx: np.ndarray         # (rows, bpr) index into the ascending finite scale values
    neg: np.ndarray          # (rows, bpr) bool: the scale is negative
    ww: np.ndarray           # (rows, bpr) the layer's sum_j a_j w_j^2 (Prepared.ww, shared)
    order: np.ndarray        # scale codes in ascending order of value (finite ones)
    svals: np.ndarray        # their values times 2^offset
    divs: np.ndarray         # what w is divided by: svals (1 for a zero scale) / 2^p
    _codes: np.ndarray | None = None

    @property
    def scale_code(self) -> np.ndarray:     # (rows, bpr) int64
        return self.order[self.sidx]

    @property
    def sign(self) -> np.ndarray:           # (rows, bpr) int64, 0 = +, 1 = -
        return self.neg.astype(np.int64)

    def sv_of(self, sl=slice(None)) -> np.ndarray:
        """The signed scale value (offset included) of the blocks of rows ``sl``."""
        si, neg = self.sidx[sl], self.neg[sl]
        return np.where(neg, -self.svals[si], self.svals[si])

    def sdiv_of(self, sl=slice(None)) -> np.ndarray:
        si, neg = self.sidx[sl], self.neg[sl]
        return np.where(neg, -self.divs[si], self.divs[si])

    @property
    def sv(self) -> np.ndarray:             # (rows, bpr) the signed scale value, offset included
        return self.sv_of()

    @property
    def wq(self) -> np.ndarray:             # (rows, bpr) sum_j a_j w_j q_j
        # err = ww - 2 wq + qq per block, so wq follows without another pass over the weights
        return (self.ww + self.qq - self.err) / 2

    def codes_of(self, prep: "Prepared", sl) -> np.ndarray:
        """(rc, bpr, g) uint8 codes of rows ``sl``, identical to Codebook.encode(w / sv)."""
        if self._codes is not None:
            return self._codes[sl]
        blk = np.asarray(prep.blocks[sl], dtype=np.float64)
        return fast_table(self.cb).encode_t(blk / self.sdiv_of(sl)[..., None])

    def codes(self, prep: "Prepared") -> np.ndarray:
        """(rows, bpr, g) uint8 codes of the chosen candidates, identical to Codebook.encode(w / sv);
        computed on first use and kept (the DD4 fit uses them; ``assemble`` works per chunk)."""
        if self._codes is None:
            codes = np.empty(prep.blocks.shape, dtype=np.uint8)

            def work(sl):
                codes[sl] = self.codes_of(prep, sl)

            run_chunks(work, prep.chunks_for(1))
            self._codes = codes
        return self._codes


class BankEvaluator:
    """The candidate search of one bank at one offset, row chunk by row chunk.

    ``chunk(sl)`` evaluates the blocks of rows ``sl``: every candidate (sign + then -,
    where the layout has a sign; for each the covering scale code and ``scale_search``
    neighbours each side, smaller first), keeping the first one of least error. A block's
    result depends on nothing but the block (elementwise arithmetic and ``block_sum``), so
    ``evaluate_bank``, the SOP4 pair search, any chunking and any ``--device`` give the same
    bits. ``cached``: take the covering scale indices from ``Prepared.cover`` (whole-layer
    arrays, kept) or compute them per chunk (the same values; nothing kept)."""

    def __init__(self, prep: Prepared, cb: Codebook, offset: int, scale_search: int = 1,
                 cached: bool = True):
        lay = prep.layout
        if cb.bits != lay.code_bits:
            raise ValueError(f"{cb.name} is a {cb.bits}-bit table; the layout needs {lay.code_bits}-bit codes")
        self.prep, self.cb, self.offset, self.cached = prep, cb, offset, cached
        self.ft = ft = fast_table(cb)
        order, svals = _sorted_scales(lay)
        self.order, self.svals = order, svals * 2.0 ** offset
        # A zero scale divides by 1 and reconstructs 0. Dividing by scale / 2^p gives
        # (w / scale) * 2^p exactly (a power of two commutes with rounding), the grid
        # coordinate FastTable looks up.
        self.divs = np.where(self.svals == 0, 1.0, self.svals) / ft.mul
        # the divisors as float32 where every one is exactly a float32 (FastTable.values_div)
        with np.errstate(over="ignore", under="ignore"):
            d32 = self.divs.astype(np.float32)
        self.divs32 = d32 if np.array_equal(d32.astype(np.float64), self.divs) else None
        self.signs = _signs(lay)
        sgn, deltas = [], []
        for c, s in enumerate(self.signs):
            for d in range(-scale_search, scale_search + 1):
                sgn.append(s)
                deltas.append((c, d))
        self.deltas = deltas
        self._delta_sign = np.array([c for c, _ in deltas], dtype=np.intp)
        self._delta_step = np.array([d for _, d in deltas], dtype=np.int64)[:, None, None]
        self.sgn = np.array(sgn, dtype=np.float64)[:, None, None]
        # Signed scales with a table whose ends are opposite (NF4, BOF4, Split87, SH4, FP4, INT4):
        # both signs have the same covering scale, so candidate h + i is candidate i negated
        # (sign + first, then -, the same scale steps: see the loop above)
        h = len(deltas) // 2
        self.mirrored = (self.signs == (1, -1) and float(cb.values.max()) == -float(cb.values.min())
                         and [d for _, d in deltas[:h]] == [d for _, d in deltas[h:]])
        # the candidates' scale indices depend on the table only through its end values
        self._idx_key = (float(cb.values.max()), float(cb.values.min()), offset, tuple(deltas))
        # and their divisors also on its grid
        self._div_key = ("div", self._idx_key, ft.mul, self.mirrored, self.divs32 is None)
        # and the float32 quotients' cells also on its grid (BankEvaluator.chunk)
        self._cells_key = (self._idx_key, ft.mul, ft.K, h if self.mirrored else len(deltas))
        self.sidx_dtype = np.uint8 if len(order) <= 256 else np.int64
        # per candidate, its sign's block of the signed tables below (one gather each)
        n = len(self.svals)
        self._sign_at = (np.array([c for c, _ in deltas], dtype=np.int64) * n)[:, None, None]
        signed = np.array(self.signs, dtype=np.float64)[:, None]
        self._sdivs, self._svals = (signed * self.divs).reshape(-1), (signed * self.svals).reshape(-1)
        self._sdivs32 = None if self.divs32 is None else (signed.astype(np.float32) * self.divs32).reshape(-1)

    @property
    def candidates(self) -> int:
        return len(self.deltas)

    def chunks(self) -> list[slice]:
        return self.prep.eval_chunks(self.candidates)

    def covers(self, sl) -> list[np.ndarray]:
        """Per sign, the index (into ``svals``) of each block's covering scale, rows ``sl``."""
        prep = self.prep
        if self.cached:
            return [prep.cover(self.cb, s, self.offset, self.svals)[sl] for s in self.signs]
        signs = self.signs[:1] if self.mirrored else self.signs     # mirrored: both signs cover alike
        out = [np.searchsorted(self.svals, cover_targets(prep.bmax[sl], prep.bmin[sl], self.cb, s), side="left")
               for s in signs]
        return out * (len(self.signs) // len(signs))


    def prime(self, r0: int, r1: int) -> None:
        """Compute the candidates' scale indices, divisors and multipliers of rows ``r0:r1`` (a
        batch of the pair search) in one go, for the chunks of those rows to slice: per chunk
        they cost more in numpy calls than in arithmetic. Kept in ``Prepared`` under the table's
        end values (and grid), so the tables that share them (NF4, BOF4, Split87 and SH4 all end
        at -1 and +1) share one computation; only the latest batch is kept. Call it outside
        ``run_chunks``."""
        memo = self.prep._batch_idx
        if memo.get("rows") != (r0, r1):
            memo.clear()
            memo["rows"] = (r0, r1)
        if self._idx_key not in memo:
            memo[self._idx_key] = self._compute_idx(slice(r0, r1))
        if self._div_key not in memo:
            memo[self._div_key] = self._divisors(memo[self._idx_key])

    def _idx(self, sl) -> np.ndarray:
        return self._candidates(sl)[0]

    @property
    def twin_key(self) -> tuple:
        """Evaluators of one layer with equal keys differ at most in their offset."""
        return (self.prep.token, id(self.cb), self.cb.values.tobytes(), tuple(self.deltas))

    def _candidates(self, sl) -> tuple:
        """(idx, cdiv, cmul, d32) of rows ``sl``, each (C, rows, bpr): every candidate's index
        into the ascending scale values, its signed divisor (``divs``), its signed scale value
        and the divisor as float32 (None where not every one is a float32; for a mirrored table
        only the + half)."""
        memo = self.prep._batch_idx
        rows = memo.get("rows")
        if rows is not None and rows[0] <= sl.start and sl.stop <= rows[1] and self._div_key in memo:
            part = slice(sl.start - rows[0], sl.stop - rows[0])
            return tuple(None if a is None else a[:, part]
                         for a in (memo[self._idx_key],) + memo[self._div_key])
        idx = self._compute_idx(sl)
        return (idx,) + self._divisors(idx)

    def _divisors(self, idx: np.ndarray) -> tuple:
        at = idx + self._sign_at
        cdiv, cmul = self._sdivs.take(at), self._svals.take(at)
        d32 = None
        if self._sdivs32 is not None:
            d32 = self._sdivs32.take(at[:len(self.deltas) // 2] if self.mirrored else at)
        return cdiv, cmul, d32

    def _compute_idx(self, sl) -> np.ndarray:
        covers = np.stack(self.covers(sl)).astype(np.int64)
        idx = covers[self._delta_sign] + self._delta_step      # (C, rc, bpr), one broadcast
        np.maximum(idx, 0, out=idx)                             # np.clip costs more in call overhead
        np.minimum(idx, len(self.order) - 1, out=idx)
        return idx

    def values(self, rawT: np.ndarray, blkT: np.ndarray, cdiv: np.ndarray, d32: np.ndarray | None,
               memo: dict | None = None) -> np.ndarray:
        """(C, g, ...): the table value nearest each weight of ``rawT`` (g, ...) over each
        candidate's divisor ``cdiv`` (C, ...) (``FastTable.values_t``'s bits), from the float32
        quotient where the weights and divisors allow it (``FastTable.cells_div``; the cells are
        kept in ``memo`` for the other tables of the same grid and covers: NF4, BOF4 and SH4),
        else from the float64 one."""
        C, g = cdiv.shape[0], rawT.shape[0]
        ft = self.ft
        if d32 is None or rawT.dtype.itemsize > 4 or not ft.exact:
            return ft.values_t(blkT / cdiv[:, None])
        h = self._cells_key[-1]
        cells = None if memo is None else memo.get(self._cells_key)
        if cells is None:
            # j in a work array of its own per grid (the memo of these rows holds it until the
            # next rows replace the memo)
            j = work_array(("j",) + self._cells_key, (h,) + rawT.shape, np.intp) if memo is not None else None
            cells = ft.cells_div(rawT, cdiv[:h, None], d32[:, None], out=j)
            if memo is not None:
                memo[self._cells_key] = cells
        out = work_array("q", (C, g) + cdiv.shape[1:], np.float64)
        if self.mirrored:
            # the - sign candidates are the + ones negated (same covers): one quotient for both
            ft.values_mirrored(cells, out)
        else:
            ft.values_into(cells, out)
        return out

    def chunk(self, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(err, qq, k, idx) of rows ``sl``: per block the least error, its ``qq``, the index
        ``k`` of its candidate and every candidate's scale index (C, rows, bpr).

        Every number is elementwise IEEE arithmetic and ``block_sum``, so a block's result does
        not depend on the chunk it is evaluated in, nor on the library that evaluates it
        (quantize/device.py does the same on a torch device): per candidate the exact decoded
        products ``q = value * scale``, the error ``block_sum((w - q)^2 * a)`` of each, the first
        least error, and ``qq = block_sum(q^2 * a)`` of that candidate only."""
        if device.on_torch() and self.ft.exact:
            return device.evaluate(self, sl)
        idx, cdiv, cmul, d32 = self._candidates(sl)
        rawT, blkT = self.prep.transposed(sl)
        return self._search(rawT, blkT, self.prep.aT, cdiv, cmul, d32, _rows_memo(self.prep, sl)) + (idx,)

    def _search(self, rawT, blkT, aT, cdiv, cmul, d32, memo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(err, qq, k) of the blocks whose weights are ``rawT``/``blkT`` (g, ...), error weights
        ``aT`` (broadcasting against them) or None, and candidates' divisors and products
        ``cdiv``, ``cmul``, ``d32`` (C, ...); see ``chunk``."""
        prep = self.prep
        C, g = cdiv.shape[0], rawT.shape[0]
        q = self.values(rawT, blkT, cdiv, d32, memo)          # (C, g, ...)
        np.multiply(q, cmul[:, None], out=q)                  # the exact decoded products
        d = np.subtract(blkT, q, out=work_array("d", q.shape, np.float64))
        np.multiply(d, d, out=d)
        if aT is not None:
            np.multiply(d, aT, out=d)
        errs = prep.block_sum(d, axis=1)
        if C == 1:                                            # one candidate: no choice to make
            k, err, qk = np.zeros(errs.shape[1:], dtype=np.intp), errs[0], q[0]
        else:
            k, err = first_min(errs)
            # the chosen candidate's products, one flat gather
            n = k.size
            at = np.add(_grid_index(g, n), k.reshape(1, n) * (g * n), out=work_array("at", (g, n), np.intp))
            qk = q.reshape(-1).take(at).reshape(q.shape[1:])
        qk *= qk
        if aT is not None:
            qk *= aT
        return err, prep.block_sum(qk, axis=0), k

    def reuse(self, other: "BankEvaluator", results: tuple, sl) -> tuple | None:
        """(err, qq, k) of rows ``sl`` from ``other``'s ``results`` there, where ``other`` is this
        table at another offset (``twin_key``): a block whose candidates are the same signed
        scale values in the same order has every input of the search the same (the divisors are
        the scale values over the table's grid step), so its results are ``other``'s, bit for bit.
        The other blocks are searched here, gathered. None where the two are no twins or where
        most blocks differ (then ``chunk`` is as fast)."""
        if self.twin_key != other.twin_key:
            return None
        idx, cdiv, cmul, d32 = self._candidates(sl)
        diff = (cmul != other._candidates(sl)[2]).any(axis=0)
        n = int(np.count_nonzero(diff))
        if n * 2 > diff.size:
            return None
        err, qq, k = (np.array(r) for r in results[:3])
        if n:
            r, c = np.nonzero(diff)
            rawT, blkT = self.prep.transposed(sl)
            aT = self.prep.aT
            sub = self._search(rawT[:, r, c][:, None], blkT[:, r, c][:, None],
                               None if aT is None else aT[:, 0, c][:, None], cdiv[:, r, c][:, None],
                               cmul[:, r, c][:, None], None if d32 is None else d32[:, r, c][:, None], None)
            err[r, c], qq[r, c], k[r, c] = (x[0] for x in sub)
        return err, qq, k

    def choice(self, k: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sidx, neg) of the candidates ``k`` among ``idx`` (as ``chunk`` returns them)."""
        return np.take_along_axis(idx, k[None], 0)[0], self.sgn.reshape(-1)[k] < 0

    def choice_of(self, sl, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sidx, neg) of rows ``sl`` whose candidates are ``k`` (kept from ``chunk``)."""
        return self.choice(np.asarray(k, dtype=np.int64), self._idx(sl))

    def bank_eval(self, err, qq, sidx, neg) -> BankEval:
        return BankEval(self.cb, self.offset, err, qq, sidx, neg, self.prep.ww, self.order, self.svals,
                        self.divs)

    def from_choices(self, k: np.ndarray) -> BankEval:
        """A choice-only BankEval (no ``err``/``qq``) from the candidate index of every block."""
        shape = self.prep.blocks.shape[:2]
        sidx, neg = np.empty(shape, dtype=self.sidx_dtype), np.empty(shape, dtype=bool)

        def work(sl):
            sidx[sl], neg[sl] = self.choice_of(sl, k[sl])

        # the choice is block by block: rows in slices of ~16 K blocks, not the evaluation's chunks
        run_chunks(work, row_slices(shape[0], shape[1], 1 << 14))
        return self.bank_eval(None, None, sidx, neg)


def evaluate_bank(prep: Prepared, cb: Codebook, offset: int, scale_search: int = 1) -> BankEval:
    """Per block, the best (sign, scale code) of ``cb`` at ``offset``.

    Candidates in order: sign + then - (where the layout has a sign), and for each
    the covering scale code plus ``scale_search`` neighbours each side, smaller first.
    """
    ev = BankEvaluator(prep, cb, offset, scale_search)
    shape = prep.blocks.shape[:2]
    sidx_all = np.empty(shape, dtype=ev.sidx_dtype)
    neg_all = np.empty(shape, dtype=bool)
    best_err = np.empty(shape)
    qq = np.empty(shape)

    def work(sl):
        best_err[sl], qq[sl], k, idx = ev.chunk(sl)
        sidx_all[sl], neg_all[sl] = ev.choice(k, idx)

    run_chunks(work, ev.chunks())
    return ev.bank_eval(best_err, qq, sidx_all, neg_all)


# -- assembling a stream ----------------------------------------------------------------------

def pack_blocks_fast(layout: BlockLayout, headers, codes) -> bytes:
    """``golden.layout.pack_blocks``, byte for byte, vectorized for byte-aligned headers with
    4-bit codes, or 6-bit codes in groups of four; any other layout goes to golden's packer."""
    headers = np.asarray(headers, dtype=np.int64).reshape(-1)
    codes = np.asarray(codes).reshape(len(headers), -1)
    H, k, g = layout.header_bits, layout.code_bits, layout.group
    if H % 8 or codes.shape[1] != g or not (k == 4 or (k == 6 and g % 4 == 0)):
        return pack_blocks(layout, headers, codes)
    if codes.size and (int(codes.max()) >= 1 << k or int(codes.min()) < 0):
        raise ValueError(f"codes out of range for {k}-bit codes")
    if headers.size and (int(headers.max()) >= 1 << H or int(headers.min()) < 0):
        raise ValueError(f"headers out of range for {H}-bit headers")
    hdr = ((headers[:, None] >> (8 * np.arange(H // 8))) & 0xFF).astype(np.uint8)
    c = codes.astype(np.uint32)
    if k == 4:
        body = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    else:
        v = c[:, 0::4] | (c[:, 1::4] << 6) | (c[:, 2::4] << 12) | (c[:, 3::4] << 18)
        body = np.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], axis=-1).reshape(len(headers), -1)
        body = body.astype(np.uint8)
    return np.concatenate([hdr, body], axis=1).tobytes()


@dataclass
class Encoded:
    """An encoded layer: the stream, its exact reconstruction and the per-block choices."""

    stream: LayerStream
    recon: np.ndarray          # (rows, cols) == golden.decoder.decode_layer(stream), bit for bit;
                               # float32 where that holds every product exactly (products_fit_float32)
    err: np.ndarray            # (rows, bpr) weighted squared error per block  (these three: times 2^-a_exp)
    select: np.ndarray         # (rows, bpr) bank chosen per block (0 = A)
    wq: np.ndarray             # (rows, bpr) sum_j a_j w_j q_j
    qq: np.ndarray             # (rows, bpr) sum_j a_j q_j^2
    a_exp: int = 0             # Prepared.a_exp

    @property
    def error(self) -> float:
        """The layer's weighted squared error, at the scale of the ``col_weight`` given (Inf past float64's
        range: the choices were made at the held scale, and the sop-budget knapsack refuses it)."""
        with np.errstate(over="ignore"):
            return float(np.ldexp(self.err.sum(), self.a_exp))


def merge_banks(evals: list[BankEval]) -> np.ndarray:
    """Per block, the bank with the smallest error; the earlier bank wins a tie."""
    select = np.zeros(evals[0].err.shape, dtype=np.int64)
    best = evals[0].err
    for t, ev in enumerate(evals[1:], start=1):
        better = ev.err < best
        select = np.where(better, t, select)
        best = np.where(better, ev.err, best)
    return select


def assemble(prep: Prepared, evals: list[BankEval], select: np.ndarray | None = None) -> Encoded:
    """The stream that picks, per block, the best of the given bank evaluations (same offset).

    ``select`` (rows, bpr), if given, is that per-block choice already made (``merge_banks``
    of the same evaluations); the evaluations may then be choice-only, and the returned
    ``err``, ``wq`` and ``qq`` are None where they are."""
    lay = prep.layout
    if len(evals) != lay.banks:
        raise ValueError(f"layout needs {lay.banks} codebook bank(s), got {len(evals)}")
    offset = evals[0].offset
    if any(ev.offset != offset for ev in evals):
        raise ValueError("every bank must be evaluated at the layer's offset")
    hif = evals[0].cb.hif
    if any(ev.cb.hif != hif for ev in evals):
        raise ValueError("every bank must be in one HIF format")
    if select is None:
        select = merge_banks(evals)
    full = all(ev.err is not None for ev in evals)

    def pick(attr):
        out = getattr(evals[0], attr)
        for t, ev in enumerate(evals[1:], start=1):
            m = select == t
            out = np.where(m[..., None] if getattr(ev, attr).ndim == 3 else m, getattr(ev, attr), out)
        return out

    def scale_codes(sl):
        out = evals[0].order[evals[0].sidx[sl]]
        for t, ev in enumerate(evals[1:], start=1):
            out = np.where(select[sl] == t, ev.order[ev.sidx[sl]], out)
        return out

    def signs(sl):
        out = evals[0].neg[sl]
        for t, ev in enumerate(evals[1:], start=1):
            out = np.where(select[sl] == t, ev.neg[sl], out)
        return out.astype(np.int64)

    def headers_of(sl):
        return lay.make_header(scale_codes(sl).reshape(-1), signs(sl).reshape(-1),
                               select[sl].reshape(-1) if lay.select_bit else 0)

    rows, cols = prep.w.shape
    g, bpr, bb = lay.group, cols // lay.group, lay.block_bytes
    used = [t == 0 or bool((select == t).any()) for t in range(len(evals))]
    # float32 holds every product exactly for the SOP layouts: then the reconstruction is float32
    recon = np.empty((rows, cols), dtype=np.float32 if products_fit_float32(evals) else np.float64)
    fast = lay.header_bits % 8 == 0 and (lay.code_bits == 4 or (lay.code_bits == 6 and g % 4 == 0))
    # the fast path makes each chunk's headers in the chunk (the same values, elementwise)
    headers = None if fast else headers_of(slice(None))
    packed = bytearray(rows * bpr * bb) if fast else None
    all_codes = None if fast else np.empty(prep.blocks.shape, dtype=np.uint8)

    def work(sl):
        # chunk by chunk, exactly as the whole layer: codes, values, products, packed blocks
        sel = select[sl]
        codes = evals[0].codes_of(prep, sl)
        for t, ev in enumerate(evals[1:], start=1):
            if used[t]:
                codes = np.where((sel == t)[..., None], ev.codes_of(prep, sl), codes)
        sv = evals[0].sv_of(sl)
        values = evals[0].cb.values[codes]
        for t, ev in enumerate(evals[1:], start=1):
            values = np.where((sel == t)[..., None], ev.cb.values[codes], values)
            sv = np.where(sel == t, ev.sv_of(sl), sv)
        recon[sl] = (values * sv[..., None]).reshape(-1, cols)
        if fast:
            b0, b1 = sl.start * bpr, min(sl.stop, rows) * bpr
            packed[b0 * bb:b1 * bb] = pack_blocks_fast(lay, headers_of(sl), codes.reshape(-1, g))
        else:
            all_codes[sl] = codes

    run_chunks(work, prep.chunks_for(1))
    blocks = bytes(packed) if fast else pack_blocks_fast(lay, headers, all_codes.reshape(-1, g))
    packed = all_codes = headers = None         # freed before the stream is built
    luts = np.stack([ev.cb.hif_codes.astype(np.int64) for ev in evals])
    stream = LayerStream(lay, hif, luts, offset, rows, cols, blocks)
    if not full:
        return Encoded(stream, recon, None, select, None, None, prep.a_exp)
    return Encoded(stream, recon, pick("err"), select, pick("wq"), pick("qq"), prep.a_exp)


def products_fit_float32(evals: list[BankEval]) -> bool:
    """Whether every product of a bank entry and a signed scale value (offset included) is
    exactly a float32: then a float32 reconstruction holds the exact products, bit for bit."""
    with np.errstate(over="ignore"):
        for ev in evals:
            p = ev.cb.values[:, None] * ev.svals[None, :]
            if not np.array_equal(p.astype(np.float32), p):
                return False
    return True


def encode(w, layout: BlockLayout, banks: list[Codebook], scale_search: int = 1,
           name: str = "layer", col_weight=None, offset: int | None = None) -> Encoded:
    """Encode and also return the exact reconstruction and per-block errors; see the module
    docstring. ``offset`` overrides the per-layer power of two (default: the smallest that fits)."""
    prep = prepare(w, layout, col_weight, name)
    if len(banks) != layout.banks:
        raise ValueError(f"layout needs {layout.banks} codebook bank(s), got {len(banks)}")
    hif = banks[0].hif
    if any(cb.hif != hif or cb.bits != layout.code_bits for cb in banks):
        raise ValueError(f"every bank must be a {layout.code_bits}-bit table in one HIF format")
    if offset is None:
        offset = max(bank_offset(prep, cb) for cb in banks)
    elif not OFFSET_RANGE[0] <= offset <= OFFSET_RANGE[1]:
        raise ValueError(f"offset {offset} outside {OFFSET_RANGE}")
    return assemble(prep, [evaluate_bank(prep, cb, offset, scale_search) for cb in banks])


def encode_layer(w, layout: BlockLayout, banks: list[Codebook], scale_search: int = 1,
                 name: str = "layer", col_weight=None) -> LayerStream:
    """Encode a (rows, cols) weight matrix into a LayerStream; see the module docstring.

    ``col_weight`` (cols,), if given, weights each input column's squared error
    (the per-input-channel activation mean square); ``None`` weights all equally.
    """
    return encode(w, layout, banks, scale_search, name, col_weight).stream
