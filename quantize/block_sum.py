"""The quantizer's one summation: a block's g terms added in a fixed order, on every device.

``block_sum(x, axis)`` is ``np.sum`` over ``axis`` laid out last and contiguous, bit for bit,
written as a fixed sequence of elementwise additions of slices (numpy's pairwise order), so that
numpy, torch on the CPU and torch on CUDA perform the same additions and give the same bits
(quantize/device.py; docs/quantizer.md, section 5, "`--device D`"). ``sum_order(g)`` and
``halved_sum`` are the same additions on terms laid out so that every addition is one call on
contiguous halves: what the candidate search (quantize/blockwise.py, ``Prepared.transposed``)
uses for g a multiple of 8 up to 128. Nothing here is summed by BLAS or a library reduction,
whose order is its own.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _part(x, axis: int, index):
    at = [slice(None)] * x.ndim
    at[axis] = index
    return x[tuple(at)]


def _pairwise(x, axis: int, lo: int, n: int):
    """numpy's pairwise summation (``pairwise_sum`` in its loops) of ``x[lo:lo + n]`` along ``axis``:
    below 8 terms one after the other; up to 128, eight running sums of every eighth term, added
    as ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the rest one by one; above 128, the
    two halves (the first a multiple of 8) summed so and added."""
    if n < 8:
        res = _part(x, axis, lo)
        for i in range(lo + 1, lo + n):
            res = res + _part(x, axis, i)
        return res
    if n <= 128:
        r = _part(x, axis, slice(lo, lo + 8))             # the 8 running sums, side by side
        i = 8
        while i < n - n % 8:
            r = r + _part(x, axis, slice(lo + i, lo + i + 8))
            i += 8
        r = _part(r, axis, slice(0, 8, 2)) + _part(r, axis, slice(1, 8, 2))
        r = _part(r, axis, slice(0, 4, 2)) + _part(r, axis, slice(1, 4, 2))
        res = _part(r, axis, 0) + _part(r, axis, 1)
        for i in range(lo + n - n % 8, lo + n):
            res = res + _part(x, axis, i)
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise(x, axis, lo, n2) + _pairwise(x, axis, lo + n2, n - n2)


def block_sum(x, axis: int = -1):
    """The sum over ``axis`` of a float64 array with the bits of ``np.sum`` over that axis laid
    out last and contiguous (``np.ascontiguousarray(np.moveaxis(x, axis, -1)).sum(-1)``; numpy
    adds a non-contiguous axis in another order), as a fixed sequence of elementwise additions of
    slices (numpy's pairwise order, ``_pairwise``, then ``0.0 +``, which only turns a sum of -0s
    into +0), on numpy arrays and torch tensors alike.

    Every per-block sum of the quantizer's search is this one: an order fixed by the block size
    alone, which numpy, torch on the CPU and torch on CUDA all follow (IEEE additions, no library
    choosing the order). A matrix-vector product (BLAS) sums in an order of its own kernel's,
    which depends on the CPU and the number of rows; ``np.sum`` over a short last axis costs about
    five elementwise passes, these slices about two where the axis is not the last."""
    axis = axis % x.ndim
    n = x.shape[axis]
    if n == 0:
        raise ValueError("block_sum of an empty axis")
    return _pairwise(x, axis, 0, n) + 0.0


@lru_cache(maxsize=16)
def sum_order(g: int) -> np.ndarray | None:
    """The order to lay a block's g terms out in so that ``block_sum`` becomes halvings of
    contiguous slices (``halved_sum``), for g a multiple of 8 up to 128; None for other g.

    numpy's pairwise sum of g terms adds them into 8 running sums ``r_i`` (every eighth term, in
    turn), then ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``. With each group of 8 laid
    out as terms 0, 4, 2, 6, 1, 5, 3, 7, the running sums come out in that order, and each level
    of the tree adds the first half to the second: (r0 + r1, r4 + r5, r2 + r3, r6 + r7), then
    ((r0 + r1) + (r2 + r3), (r4 + r5) + (r6 + r7)), then their sum. The same additions, every one
    a single elementwise call on contiguous data (the strided pairs of ``block_sum`` cost several
    times more per element)."""
    if g % 8 or not 8 <= g <= 128:
        return None
    order = np.concatenate([base + np.array([0, 4, 2, 6, 1, 5, 3, 7]) for base in range(0, g, 8)])
    order.flags.writeable = False
    return order


def halved_sum(x: np.ndarray, axis: int) -> np.ndarray:
    """``block_sum(x, axis)`` of terms laid out in ``sum_order(g)``, bit for bit (g = x.shape[axis])."""
    if axis < 0 or axis > 1:
        x, axis = np.moveaxis(x, axis, 0) if isinstance(x, np.ndarray) else x.movedim(axis, 0), 0
    y = x if axis == 0 else x.swapaxes(0, 1)                # a view: the terms on the first axis
    g = y.shape[0]
    r = y[0:8]
    for i in range(8, g, 8):                                # the running sums, group by group
        r = r + y[i:i + 8]
    r = r[:4] + r[4:]
    r = r[:2] + r[2:]
    r = r[0] + r[1]
    r += 0.0
    return r
