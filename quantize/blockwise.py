"""Block encoder: weights -> a golden LayerStream (headers, codes, LUT images, offset).

This is the exact encoder on which the SOP search builds: for a given layout and
codebook bank(s) it picks, per block, the bank, the scale sign and the scale code
that minimize the block's (optionally activation-weighted) squared error

    err(block) = sum_j a_j * (w_j - q_j)^2        (a_j = col_weight[j], or 1)

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

The per-layer power-of-two offset is the smallest that lets the largest block
fit under the scale format's maximum (over every bank and sign). Width must be a
multiple of the block size; NaN/Inf weights are refused.

Speed (the inner loop of the whole quantizer): ``FastTable`` replaces
``Codebook.encode``'s binary search by a look-up on a uniform grid fine enough
that every decision midpoint of the table is a grid point, so a weight's cell
decides its code except exactly on a midpoint (a tie), on zero (the sign of
zero) or next to a midpoint between entries of opposite sign (where golden's
float64 differences round); those go to ``Codebook.encode`` itself, so the codes
are golden's by construction (and tested so). The work runs in chunks of
~64 K weights so that the temporaries stay in cache, on ``THREADS`` threads. The
per-bank evaluation (``evaluate_bank``) is reusable: a two-bank encode is the
per-block minimum of two one-bank evaluations, which is what lets the SOP pair
search score every pair at the cost of one evaluation per codebook.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from sop.golden.codebooks import Codebook
from sop.golden.formats import check_no_nan
from sop.golden.layout import OFFSET_RANGE, BlockLayout, LayerStream, pack_blocks

#: Weights per chunk: temporaries of this size (512 KB in float64) stay in L2.
CHUNK_WEIGHTS = 1 << 16
#: Worker threads for the chunk loop (numpy releases the GIL in its loops, so chunks of
#: one layer run in parallel); ``SOP_THREADS`` overrides, 1 runs everything inline.
THREADS = int(os.environ.get("SOP_THREADS", "0")) or min(8, os.cpu_count() or 1)
_pool: tuple[int, ThreadPoolExecutor] | None = None
#: Largest fast-path grid (entries per look-up table); finer tables use Codebook.encode.
_MAX_GRID = 1 << 20


def check_weights(name: str, w: np.ndarray, group: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight matrix, got shape {w.shape}")
    bad = ~np.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: non-finite weight {w[r, c]} at row {r}, column {c}")
    if w.shape[1] % group:
        raise ValueError(f"{name}: {w.shape[1]} columns are not a multiple of the block size {group}")
    return w


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


# -- exact fast nearest-entry look-up ------------------------------------------------------

class FastTable:
    """Nearest entry of a codebook by grid look-up; codes identical to ``Codebook.encode``.

    Let ``u`` be the sorted distinct table values and ``m`` the midpoints between
    neighbours. ``p`` is the smallest power of two with every ``m * 2^p`` an integer
    (HIF values have few significant bits, so ``p`` <= 11 for the default HIF). Then
    ``t = x * 2^p`` is exact, and every ``x`` with ``floor(t) = k`` and ``t != k``
    lies strictly inside one grid cell, which contains no midpoint: its nearest entry
    is that of the cell's centre, which the table stores (computed by
    ``Codebook.encode`` itself, so the tie and sign-of-zero rules are golden's).
    Where ``t == k`` exactly and ``k`` is a midpoint (a tie) or ``x`` is zero (whose
    code depends on its sign), ``Codebook.encode`` decides. Cells beyond both ends
    hold the end entries, which is saturation.
    """

    def __init__(self, cb: Codebook):
        self.cb = cb
        self.values_table = cb.values
        u = np.unique(cb.values)
        mids = (u[1:] + u[:-1]) / 2
        self.exact = bool(len(mids)) and bool(np.all(2 * mids - u[:-1] == u[1:]))
        p = 0
        while self.exact and p <= 40 and not np.all(np.floor(mids * 2.0 ** p) == mids * 2.0 ** p):
            p += 1
        span = int(np.ceil(np.abs(u).max() * 2.0 ** p)) + 2 if len(u) else 2
        self.mul = 1.0
        if not self.exact or p > 40 or 2 * span > _MAX_GRID:
            self.exact = False                      # fall back to Codebook.encode
            return
        self.p, self.K = p, span
        self.mul = 2.0 ** p
        cells = np.arange(-span, span, dtype=np.float64)        # cell k covers [k, k+1) / 2^p
        centres = (cells + 0.5) / self.mul
        self.lut_codes = cb.encode(centres).astype(np.uint8 if cb.bits <= 8 else np.uint16)
        self.lut_values = cb.values[self.lut_codes]
        grid = cells / self.mul
        self.on_mid = np.isin(grid, mids)                        # cells whose left edge is a tie
        # Codebook.encode measures x - lo and hi - x in float64. Between entries of one
        # sign both are exact near the midpoint, but across zero (a table without a zero
        # entry) a tiny x against large entries rounds them, so golden can see a tie
        # the exact midpoint test would not; the two cells around such a midpoint go to
        # Codebook.encode whole, so that its answer is the answer.
        straddle = mids[(u[:-1] < 0) & (u[1:] > 0)] * self.mul
        self.forced = [(float(m) - 1, float(m) + 1) for m in straddle]

    def _cells(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(cell index into the look-up tables, flat positions where t = x * 2^p is an
        integer, flat positions in forced cells or None)."""
        f = np.floor(t)
        hits = np.flatnonzero(t == f)
        forced = None
        if self.forced:
            mask = np.zeros(t.shape, dtype=bool)
            for lo, hi in self.forced:
                mask |= (t >= lo) & (t < hi)
            forced = np.flatnonzero(mask)
        f += self.K
        np.maximum(f, 0, out=f)                     # saturation; np.clip is 5x slower here
        np.minimum(f, 2 * self.K - 1, out=f)
        return f.astype(np.int32), hits, forced

    def values_t(self, t: np.ndarray) -> np.ndarray:
        """``values(t / 2^p)``: callers fold the power of two into their division (exact)."""
        if not self.exact:
            return self.values_table[self.cb.encode(t / self.mul)]
        j, hits, forced = self._cells(t)
        v = self.lut_values[j]
        fix = hits[self.on_mid[j.reshape(-1)[hits]]] if hits.size else hits
        if forced is not None:
            fix = np.union1d(fix, forced)
        if fix.size:
            v.reshape(-1)[fix] = self.values_table[self.cb.encode(t.reshape(-1)[fix] / self.mul)]
        return v

    def encode_t(self, t: np.ndarray) -> np.ndarray:
        """``encode(t / 2^p)``."""
        if not self.exact:
            return self.cb.encode(t / self.mul)
        j, hits, forced = self._cells(t)
        c = self.lut_codes[j]
        fix = hits[self.on_mid[j.reshape(-1)[hits]] | (t.reshape(-1)[hits] == 0)] if hits.size else hits
        if forced is not None:
            fix = np.union1d(fix, forced)
        if fix.size:
            c.reshape(-1)[fix] = self.cb.encode(t.reshape(-1)[fix] / self.mul)
        return c

    def values(self, x) -> np.ndarray:
        """The table value nearest each ``x`` (``cb.values[cb.encode(x)]`` up to the sign of zero)."""
        return self.values_t(np.asarray(x, dtype=np.float64) * self.mul)

    def encode(self, x) -> np.ndarray:
        """Codes identical to ``Codebook.encode(x)`` (tested over random inputs, ties and ±0)."""
        x = np.asarray(x, dtype=np.float64)
        check_no_nan(x, f"encode to {self.cb.name}")
        return self.encode_t(x * self.mul)


@lru_cache(maxsize=64)
def fast_table(cb: Codebook) -> FastTable:
    return FastTable(cb)


# -- per-bank evaluation ----------------------------------------------------------------------

@dataclass
class Prepared:
    """A layer split into blocks: ``blocks`` (rows, blocks per row, g); ``a`` (blocks per row, g) or None."""

    name: str
    layout: BlockLayout
    w: np.ndarray
    blocks: np.ndarray
    a: np.ndarray | None
    bmax: np.ndarray          # (rows, bpr) largest weight of each block
    bmin: np.ndarray          # (rows, bpr) smallest weight of each block
    ww: np.ndarray            # (rows, bpr) sum_j a_j w_j^2 of each block
    _cover: dict = field(default_factory=dict, repr=False)

    def cover(self, cb: Codebook, sign: int, offset: int, svals: np.ndarray) -> np.ndarray:
        """Index (into ``svals``, the ascending scale values at ``offset``) of each block's
        covering scale; cached by the table's end values, which are all it depends on
        (NF4, BOF4, Split87 and SH4 all end at -1 and +1)."""
        key = (float(cb.values.max()), float(cb.values.min()), sign, offset, self.layout.scale.name)
        if key not in self._cover:
            target = cover_targets(self.bmax, self.bmin, cb, sign)
            self._cover[key] = np.searchsorted(svals, target, side="left")
        return self._cover[key]

    def chunks_for(self, candidates: int = 1) -> list[slice]:
        """Row slices of about CHUNK_WEIGHTS / candidates weights each."""
        rows = self.blocks.shape[0]
        step = max(1, CHUNK_WEIGHTS // max(1, candidates * self.w.shape[1]))
        return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def prepare(w, layout: BlockLayout, col_weight=None, name: str = "layer") -> Prepared:
    w = check_weights(name, w, layout.group)
    a = check_col_weight(name, col_weight, w.shape[1])
    g = layout.group
    blocks = w.reshape(w.shape[0], -1, g)
    a = None if a is None else a.reshape(-1, g)
    w2 = blocks * blocks
    ww = (w2 if a is None else w2 * a).sum(axis=-1)
    return Prepared(name, layout, w, blocks, a, blocks.max(axis=-1), blocks.min(axis=-1), ww)


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
    off = int(np.ceil(np.log2(max_target / layout.scale.max)))
    return int(np.clip(off, *OFFSET_RANGE))


def bank_offset(prep: Prepared, cb: Codebook) -> int:
    """The offset ``cb`` alone would need; a set of banks needs the largest of theirs."""
    signs = (1, -1) if prep.layout.signed_scale else (1,)
    worst = max(float(cover_targets(prep.bmax, prep.bmin, cb, s).max()) for s in signs)
    return choose_offset(prep.layout, worst)


@dataclass
class BankEval:
    """The best candidate of one bank for every block, at one offset."""

    cb: Codebook
    offset: int
    err: np.ndarray          # (rows, bpr) weighted squared error of the best candidate
    scale_code: np.ndarray   # (rows, bpr) int64
    sign: np.ndarray         # (rows, bpr) 0 = +, 1 = -
    sv: np.ndarray           # (rows, bpr) the signed scale value, offset included
    sdiv: np.ndarray         # (rows, bpr) what w is divided by: sv (1 for a zero scale) / 2^p
    wq: np.ndarray           # (rows, bpr) sum_j a_j w_j q_j
    qq: np.ndarray           # (rows, bpr) sum_j a_j q_j^2
    _codes: np.ndarray | None = None

    def codes(self, prep: "Prepared") -> np.ndarray:
        """(rows, bpr, g) uint8 codes of the chosen candidates, identical to Codebook.encode(w / sv);
        computed on first use (the pair search needs them only for the winning pair)."""
        if self._codes is None:
            ft = fast_table(self.cb)
            codes = np.empty(prep.blocks.shape, dtype=np.uint8)

            def work(sl):
                codes[sl] = ft.encode_t(prep.blocks[sl] / self.sdiv[sl][..., None])

            run_chunks(work, prep.chunks_for(1))
            self._codes = codes
        return self._codes


def evaluate_bank(prep: Prepared, cb: Codebook, offset: int, scale_search: int = 1) -> BankEval:
    """Per block, the best (sign, scale code) of ``cb`` at ``offset``.

    Candidates in order: sign + then - (where the layout has a sign), and for each
    the covering scale code plus ``scale_search`` neighbours each side, smaller first.
    """
    lay = prep.layout
    if cb.bits != lay.code_bits:
        raise ValueError(f"{cb.name} is a {cb.bits}-bit table; the layout needs {lay.code_bits}-bit codes")
    ft = fast_table(cb)
    order, svals = _sorted_scales(lay)
    svals = svals * 2.0 ** offset
    # A zero scale divides by 1 and reconstructs 0. Dividing by scale / 2^p gives
    # (w / scale) * 2^p exactly (a power of two commutes with rounding), the grid
    # coordinate FastTable looks up.
    divs = np.where(svals == 0, 1.0, svals) / ft.mul
    idx = []
    sgn = []
    for s in _signs(lay):
        cover = prep.cover(cb, s, offset, svals)
        for d in range(-scale_search, scale_search + 1):
            idx.append(np.clip(cover + d, 0, len(order) - 1))
            sgn.append(s)
    idx = np.stack(idx)                                     # (C, rows, bpr) index into order
    sgn = np.array(sgn, dtype=np.float64)[:, None, None]
    cdiv = sgn * divs[idx]
    cmul = sgn * svals[idx]
    blocks, a, g = prep.blocks, prep.a, lay.group
    shape = blocks.shape[:2]
    best_k = np.empty(shape, dtype=np.int64)
    best_err = np.empty(shape)
    qq = np.empty(shape)
    ones = np.ones(g)

    def work(sl):
        blk = blocks[sl]
        rec = ft.values_t(blk[None] / cdiv[:, sl, :, None])   # (C, rc, bpr, g) table values
        rec *= cmul[:, sl, :, None]                           # the exact decoded products
        sq = rec * rec
        if a is not None:
            sq *= a
        # matrix-vector products sum the g terms ~5x faster than .sum(axis=-1)
        q2 = (sq.reshape(-1, g) @ ones).reshape(rec.shape[:3])
        np.subtract(blk[None], rec, out=rec)
        rec *= rec
        if a is not None:
            rec *= a
        errs = (rec.reshape(-1, g) @ ones).reshape(q2.shape)
        k = np.argmin(errs, axis=0)                           # first minimum: the documented tie order
        best_k[sl] = k
        best_err[sl] = np.take_along_axis(errs, k[None], 0)[0]
        qq[sl] = np.take_along_axis(q2, k[None], 0)[0]

    run_chunks(work, prep.chunks_for(len(sgn)))
    sidx = np.take_along_axis(idx, best_k[None], 0)[0]
    neg = sgn.reshape(-1)[best_k] < 0
    sv = np.where(neg, -svals[sidx], svals[sidx])
    sdiv = np.where(neg, -divs[sidx], divs[sidx])
    # err = ww - 2 wq + qq per block, so wq follows without another pass over the weights
    wq = (prep.ww + qq - best_err) / 2
    return BankEval(cb, offset, best_err, order[sidx], neg.astype(np.int64), sv, sdiv, wq, qq)


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
    recon: np.ndarray          # (rows, cols) == golden.decoder.decode_layer(stream), bit for bit
    err: np.ndarray            # (rows, bpr) weighted squared error per block
    select: np.ndarray         # (rows, bpr) bank chosen per block (0 = A)
    wq: np.ndarray             # (rows, bpr) sum_j a_j w_j q_j
    qq: np.ndarray             # (rows, bpr) sum_j a_j q_j^2

    @property
    def error(self) -> float:
        return float(self.err.sum())


def merge_banks(evals: list[BankEval]) -> np.ndarray:
    """Per block, the bank with the smallest error; the earlier bank wins a tie."""
    select = np.zeros(evals[0].err.shape, dtype=np.int64)
    best = evals[0].err
    for t, ev in enumerate(evals[1:], start=1):
        better = ev.err < best
        select = np.where(better, t, select)
        best = np.where(better, ev.err, best)
    return select


def assemble(prep: Prepared, evals: list[BankEval]) -> Encoded:
    """The stream that picks, per block, the best of the given bank evaluations (same offset)."""
    lay = prep.layout
    if len(evals) != lay.banks:
        raise ValueError(f"layout needs {lay.banks} codebook bank(s), got {len(evals)}")
    offset = evals[0].offset
    if any(ev.offset != offset for ev in evals):
        raise ValueError("every bank must be evaluated at the layer's offset")
    hif = evals[0].cb.hif
    if any(ev.cb.hif != hif for ev in evals):
        raise ValueError("every bank must be in one HIF format")
    select = merge_banks(evals)

    def pick(attr):
        out = getattr(evals[0], attr)
        for t, ev in enumerate(evals[1:], start=1):
            m = select == t
            out = np.where(m[..., None] if getattr(ev, attr).ndim == 3 else m, getattr(ev, attr), out)
        return out

    codes = evals[0].codes(prep)
    for t, ev in enumerate(evals[1:], start=1):
        if (select == t).any():
            codes = np.where((select == t)[..., None], ev.codes(prep), codes)
    sv = pick("sv")
    values = evals[0].cb.values[codes]
    for t, ev in enumerate(evals[1:], start=1):
        values = np.where((select == t)[..., None], ev.cb.values[codes], values)
    recon = (values * sv[..., None]).reshape(prep.w.shape)
    headers = lay.make_header(pick("scale_code").reshape(-1), pick("sign").reshape(-1),
                              select.reshape(-1) if lay.select_bit else 0)
    luts = np.stack([ev.cb.hif_codes.astype(np.int64) for ev in evals])
    stream = LayerStream(lay, hif, luts, offset, prep.w.shape[0], prep.w.shape[1],
                         pack_blocks_fast(lay, headers, codes.reshape(-1, lay.group)))
    return Encoded(stream, recon, pick("err"), select, pick("wq"), pick("qq"))


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
