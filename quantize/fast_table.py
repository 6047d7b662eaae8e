"""Exact fast nearest-entry look-up: ``FastTable``, codes identical to ``Codebook.encode``.

The inner loop of the quantizer (quantize/blockwise.py) looks each ``w / s`` up in a uniform grid
fine enough that every decision midpoint of the codebook is a grid point, instead of golden's
binary search; ties and zeros go to ``Codebook.encode`` itself, so the codes are golden's by
construction (the class docstring has the argument; tests/test_exactness.py and
tests/test_quantize_speedpaths.py check it). ``fast_table(cb)`` is the cached table of a
codebook. ``work_array`` is the per-thread pool of work arrays that the look-up and the
candidate search share.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np

from sop.golden.codebooks import Codebook
from sop.golden.formats import check_no_nan, table_midpoints

#: Largest fast-path grid (entries per look-up table); finer tables use Codebook.encode.
_MAX_GRID = 1 << 20
#: Per thread, the work arrays of ``work_array`` by name.
_work = threading.local()


def work_array(name, shape: tuple, dtype) -> np.ndarray:
    """This thread's work array ``name`` of that shape and dtype, reused from call to call (a
    fresh array of a megabyte costs about as much as a pass over it): a view of the front of a
    buffer that only grows; its contents are whatever the last user left."""
    bufs = getattr(_work, "arrays", None)
    if bufs is None:
        bufs = _work.arrays = {}
    size = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = bufs[name] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


class FastTable:
    """Nearest entry of a codebook by grid look-up; codes identical to ``Codebook.encode``.

    An acceleration of golden's rule, not a second rule: every code it returns was
    computed by ``Codebook.encode`` (``golden.formats.round_to_table``). Why that is
    exact: golden compares ``x`` with the exact midpoints ``m`` between neighbouring
    distinct table values ``u``, so every ``x`` strictly between two neighbouring
    midpoints gets the one entry between them, and ``x`` on a midpoint is a tie. Where
    every midpoint is a float64 (``table_midpoints``: HIF values have few significant
    bits), ``p`` is the smallest power of two with every ``m * 2^p`` an integer
    (``p`` <= 11 for the default HIF). Then ``t = x * 2^p`` is exact (scaling up by a
    power of two; an overflow to ±Inf saturates like ``x`` would), every midpoint is a
    grid point, and the half-open cell ``[k, k + 1) / 2^p`` contains a midpoint only at
    its left edge. So every ``x`` of a cell other than its left edge has one nearest
    entry, that of the cell's centre, which the table stores (computed by
    ``Codebook.encode``). Where ``t == k`` exactly and ``k`` is a midpoint (a tie) or
    ``x`` is zero (whose code depends on its sign), ``Codebook.encode`` decides. Cells
    beyond both ends hold the end entries, which is saturation. No other input needs
    golden: the grid never meets a rounded comparison (tests/test_exactness.py checks
    this against an exact rational reference, tables without a zero entry included).
    """

    def __init__(self, cb: Codebook):
        self.cb = cb
        self.values_table = cb.values
        u = np.unique(cb.values)
        mids, _, self.exact = table_midpoints(u)
        self.exact = self.exact and len(mids) > 0
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
        # at cell k (index k + K) the value of cell -k - 1 (index K - 1 - k): that of -t
        self.lut_values_mirror = self.lut_values[::-1].copy()
        grid = cells / self.mul
        self.on_mid = np.isin(grid, mids)                        # cells whose left edge is a tie

    def _cells(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cell index into the look-up tables, flat positions where t = x * 2^p is an integer)."""
        f = np.floor(t)
        hits = np.flatnonzero(t == f)
        f += self.K
        np.maximum(f, 0, out=f)                     # saturation; np.clip is 5x slower here
        np.minimum(f, 2 * self.K - 1, out=f)
        # intp, not int32: numpy's gather converts any other index type first (3x slower)
        return f.astype(np.intp), hits

    def values_t(self, t: np.ndarray) -> np.ndarray:
        """``values(t / 2^p)``: callers fold the power of two into their division (exact)."""
        if not self.exact:
            return self.values_table[self.cb.encode(t / self.mul)]
        t = np.ascontiguousarray(t)       # the fixes below write through flat views: a copy would lose them
        j, hits = self._cells(t)
        v = self.lut_values[j]
        fix = hits[self.on_mid[j.reshape(-1)[hits]]] if hits.size else hits
        if fix.size:
            v.reshape(-1)[fix] = self.values_table[self.cb.encode(t.reshape(-1)[fix] / self.mul)]
        return v

    def cells_div(self, w: np.ndarray, d: np.ndarray, d32: np.ndarray,
                  out: np.ndarray | None = None) -> tuple:
        """The grid cells of the quotients ``w / d`` (``w`` and ``d`` broadcast against each
        other) from their float32 copies, for a float32 or float16 ``w`` and divisors that are
        all exactly float32 (``d32``, shaped as ``d``): ``(j, again, t64)``, ``j`` the index into
        ``lut_values`` of each quotient's cell, ``again`` the flat positions whose float32
        quotient is an integer and ``t64`` their float64 quotients, which ``values_t`` decides
        (``j`` written into ``out`` if given).

        Why the float32 quotient decides the cell of every other one: the exact quotient
        ``q``, its float64 ``t64`` and its float32 ``t32`` are correctly rounded copies of one
        real number. If ``t32`` is not an integer, no integer lies between ``q`` and ``t32``
        (an integer below 2^24 is a float32 nearer to ``q``, and from 2^24 up every float32
        is an integer), nor between ``q`` and ``t64``, and ``q`` is none: all three have one
        floor, and neither quotient is a grid point. Every ``t32`` that is an integer (zero
        and underflows among them) is computed again in float64. Beyond the grid
        (``|t32| > K - 1/2``, Inf included) ``q`` and ``t64`` are too (rounding is monotone and
        ``K - 1/2`` is a float32), so both take the end cell."""
        shape = np.broadcast_shapes(np.shape(w), np.shape(d32))
        t = work_array("t32", shape, np.float32)
        with np.errstate(over="ignore"):            # beyond FLT_MAX: Inf, which saturates
            np.divide(w, d32, out=t, dtype=np.float32)
        # saturate to the end cells at half-integers, which the integer test cannot flag
        np.clip(t, 0.5 - self.K, self.K - 0.5, out=t)
        f = np.floor(t, out=work_array("f32", shape, np.float32))
        again = np.flatnonzero(np.equal(t, f, out=work_array("hit", shape, np.bool_)))
        f += self.K                                 # exact: integers below 2^24
        j = np.empty(shape, dtype=np.intp) if out is None else out
        np.copyto(j, f, casting="unsafe")           # exact: integers
        t64 = None
        if again.size:
            pos = np.unravel_index(again, shape)
            t64 = np.broadcast_to(w, shape)[pos].astype(np.float64) / np.broadcast_to(d, shape)[pos]
        return j, again, t64

    def values_div(self, w: np.ndarray, d: np.ndarray, d32: np.ndarray | None = None,
                   cells: tuple | None = None) -> np.ndarray:
        """``values_t(w / d)`` (``w`` and ``d`` broadcast against each other), the same bits, from
        the float32 quotient (``cells_div``; ``cells`` if already computed) where ``w`` is float32
        or float16 and ``d32`` is ``d`` as float32 (given only where every divisor is exactly one)."""
        if cells is None:
            if d32 is None or w.dtype.itemsize > 4 or not self.exact:
                return self.values_t(np.asarray(w, dtype=np.float64) / d)
            cells = self.cells_div(w, d, d32)
        j, again, t64 = cells
        v = np.take(self.lut_values, j, mode="clip")    # every index is in range: no check
        if again.size:
            v.reshape(-1)[again] = self.values_t(t64)
        return v

    def values_mirrored(self, cells: tuple, out: np.ndarray) -> None:
        """From the cells of ``h`` candidates' quotients ``t = w / d`` (``cells_div``, its first
        axis the candidates), ``out[:h] = values_t(t)`` and ``out[h:] = values_t(-t)``
        (``out`` is (2h, ...)): one quotient for both signs, since ``w / -d`` is exactly
        ``-(w / d)`` in float32 and float64 alike, and the cell of a non-integer ``-t`` is
        ``-floor(t) - 1``, which the mirrored table ``lut_values_mirror`` holds at ``floor(t)``.
        The quotients that are integers are the same for both signs and both go to ``values_t``
        in float64."""
        j, again, t64 = cells
        h = j.shape[0]
        # mode="clip": numpy buffers a take into ``out`` in its default mode (slow), not here;
        # both halves of ``out`` are contiguous, every index in range
        self.lut_values.take(j, out=out[:h], mode="clip")
        self.lut_values_mirror.take(j, out=out[h:], mode="clip")
        if again.size:
            flat = out.reshape(-1)
            both = self.values_t(np.concatenate([t64, -t64]))       # one call for both signs
            flat[again] = both[:again.size]
            flat[again + j.size] = both[again.size:]

    def values_into(self, cells: tuple, out: np.ndarray) -> None:
        """``out[...] = values_t(t)`` of the quotients whose cells are ``cells`` (``cells_div``)."""
        j, again, t64 = cells
        self.lut_values.take(j, out=out, mode="clip")
        if again.size:
            out.reshape(-1)[again] = self.values_t(t64)

    def encode_t(self, t: np.ndarray) -> np.ndarray:
        """``encode(t / 2^p)``."""
        if not self.exact:
            return self.cb.encode(t / self.mul)
        t = np.ascontiguousarray(t)       # as in values_t
        j, hits = self._cells(t)
        c = self.lut_codes[j]
        fix = hits[self.on_mid[j.reshape(-1)[hits]] | (t.reshape(-1)[hits] == 0)] if hits.size else hits
        if fix.size:
            c.reshape(-1)[fix] = self.cb.encode(t.reshape(-1)[fix] / self.mul)
        return c

    def values(self, x) -> np.ndarray:
        """The table value nearest each ``x`` (``cb.values[cb.encode(x)]`` up to the sign of zero)."""
        x = np.asarray(x, dtype=np.float64)
        check_no_nan(x, f"round to {self.cb.name}")
        with np.errstate(over="ignore"):            # beyond 2^1023 / 2^p: ±Inf, which saturates
            t = x * self.mul
        return self.values_t(t)

    def encode(self, x) -> np.ndarray:
        """Codes identical to ``Codebook.encode(x)`` (tested over random inputs, ties and ±0)."""
        x = np.asarray(x, dtype=np.float64)
        check_no_nan(x, f"encode to {self.cb.name}")
        with np.errstate(over="ignore"):            # beyond 2^1023 / 2^p: ±Inf, which saturates
            t = x * self.mul
        return self.encode_t(t)


@lru_cache(maxsize=64)
def fast_table(cb: Codebook) -> FastTable:
    return FastTable(cb)
