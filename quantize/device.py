"""``--device``: where the candidate search of the block encoder runs, numpy or a torch device.

Role: the SOP points' encoder (quantize/blockwise.py: every table's candidate search for
``sop4-g16``, ``e2m3-ue4m4-g16``, the SOP options of ``sop-budget``) does its heavy arithmetic
here on a torch device (``cpu``, ``cuda``, ``cuda:N``) instead of numpy (``numpy``, the
default), **with the same output bits**: the same ``.sopq`` bytes and eval JSON, whatever the
device (tests/test_device.py).

Why the bits are the same. Per block and candidate the search forms the quotients ``w / d``, the
table value of each (golden's nearest-entry rule), the decoded products ``q = value x scale``,
the error ``block_sum((w - q)^2 * a)``, the first least error, and ``block_sum(q^2 * a)`` of the
chosen candidate (``BankEvaluator.chunk``). Every step is one of

* an IEEE operation that is correctly rounded on every device (``+ - * /`` in float64,
  comparisons, ``floor``, ``where``), each its own kernel (torch never fuses two of them into
  one rounding here: no ``addcmul``, no compiled graphs);
* a gather from a table (no arithmetic);
* a sum of a block's g terms, always ``block_sum``'s additions (quantize/block_sum.py): a fixed sequence of
  elementwise additions of slices, the order numpy's ``np.sum`` takes over a contiguous axis of
  g terms, written out so that numpy and torch perform the same additions (both on the terms
  laid out as ``Prepared.transposed`` lays them: ``Prepared.block_sum``). No BLAS product, no
  library reduction (``torch.sum``, ``np.sum`` over a whole array) whose order the library
  chooses;
* the first minimum over the candidates, by comparisons.

The table value of a quotient ``t = w / d`` (float64, exact division) is looked up as numpy's
``FastTable.values_t`` defines it: the cell ``floor(t)`` of the table's grid holds one value
(``lut_values``), except where ``t`` is exactly an integer that is a midpoint of two entries (a
tie), whose value golden's rule gives: those are tabled too, per cell (the edge values). One
tie is decided by the sign of the zero: ``t = +-0`` on a midpoint at zero (a table without a
zero entry); it lies between ``-v`` and ``+v``, so either gives the error and ``qq`` of ``w = 0``
bit for bit, and the device takes ``+0``'s. numpy reaches the same values another way (the
float32 quotient, float64 only where it is an integer, ``FastTable.cells_div``), proved equal
there. The error weights ``a``, the scale values and the divisors come from the same numpy
arrays. So each number the device returns (per block: the least error, its ``qq``, the candidate
index) is the number numpy computes, and everything after it (the pair scores, the knapsack, the
stream) is numpy's own code on those numbers.

One input is outside this: a float64 layer with weights beyond about 1e154 in magnitude,
whose squared differences overflow to Inf, which a zero activation weight turns into NaN; numpy
and torch may then choose differently (and the search's scores are NaN on every device). No
float32, float16 or bfloat16 layer can reach it.

What stays numpy on every device: the covering scales (``searchsorted``), the pair scores
(``sop_search.StreamSums``), the DD4 fit's Lloyd steps, the stream assembly (codes, packing), the
sparse residuals and the baselines (fp8, MX, NVFP4, IF4, NF4: single passes already faster than
their torch peers, docs/benchmarks.md). A table without an exact fast grid
(``FastTable.exact`` false, which no built-in table is) is searched by numpy.

Choosing: ``use(name)`` (a context manager) or ``set_default(name)`` sets the device of this
process; ``check(name)`` validates a name before any work (``--device cuda`` where torch sees no
CUDA device is one ``ValueError``: ``sop: error: --device cuda: ...``). torch is imported only
when a torch device is chosen. ``--jobs N`` workers get the parent's device.
"""

from __future__ import annotations

import contextlib
import re
import threading

import numpy as np

from sop.quantize.inputs import on_command_line

#: The default: numpy on the CPU, no torch.
NUMPY = "numpy"
#: Candidate weights per row chunk of the search on a torch device (``Prepared.eval_chunks``):
#: on the CPU about what stays in its caches, on a GPU enough to keep it busy.
TORCH_CPU_WEIGHTS = 1 << 18
TORCH_GPU_WEIGHTS = 1 << 23

_active = NUMPY
_NAME = re.compile(r"^(numpy|cpu|cuda(:\d+)?)$")


def _given(name) -> str:
    """Device ``name`` as its caller gave it: ``--device cuda`` on the command line, ``device 'cuda'`` from
    Python (``use``, ``set_default`` and ``check`` take it; a Python caller has no ``--device``)."""
    return f"--device {name}" if on_command_line() else f"device {str(name)!r}"


def parse(name) -> str:
    """``name`` as a device name (``numpy``, ``cpu``, ``cuda``, ``cuda:N``), or a ValueError."""
    text = str(name).strip().lower()
    if not _NAME.match(text):
        raise ValueError(f"{_given(name)}: not a device; numpy (the default), cpu (torch on the CPU), "
                         f"cuda or cuda:N (torch on a GPU)")
    return text


def check(name) -> str:
    """``parse(name)``, and for a torch device that torch can use it here (CUDA present, the index
    in range): else one ValueError naming the device as its caller gave it (``_given``), raised before any
    work."""
    name = parse(name)
    if name == NUMPY:
        return name
    try:
        import torch
    except ImportError as err:                       # pragma: no cover - torch is a dependency
        raise ValueError(f"{_given(name)}: torch cannot be imported ({err}); {_given(NUMPY)} needs no "
                         f"torch") from None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise ValueError(f"{_given(name)}: {why} (torch {torch.__version__}); "
                             f"use {_given('cpu')} or {'numpy' if on_command_line() else repr(NUMPY)}")
        index = int(name.split(":")[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"{_given(name)}: torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return name


def active() -> str:
    """The device of this process's searches."""
    return _active


def set_default(name) -> None:
    """Set this process's device (checked)."""
    global _active
    _active = check(name)


@contextlib.contextmanager
def use(name):
    """Run the searches inside on device ``name`` (checked), then restore the previous one."""
    global _active
    previous, _active = _active, check(name)
    try:
        yield
    finally:
        _active = previous


def on_torch() -> bool:
    return _active != NUMPY


def chunk_weights(numpy_weights: int) -> int:
    """Candidate weights per row chunk of the search on the active device."""
    if _active == NUMPY:
        return numpy_weights
    return TORCH_CPU_WEIGHTS if _active == "cpu" else TORCH_GPU_WEIGHTS


# -- the torch search ------------------------------------------------------------------------------

_tables: dict = {}        # (table key, device) -> the FastTable's look-up tables on the device
_local = threading.local()   # per thread (SOP_THREADS): its current rows, their weights and quotients


def _torch():
    import torch

    return torch


def _table(ft, dev):
    """(values by cell, then values of integer quotients by cell; 2K) on ``dev``."""
    key = (id(ft), ft.cb.values.tobytes(), str(dev))
    if key not in _tables:
        torch = _torch()
        K = ft.K
        edge = ft.lut_values.copy()
        mid = np.flatnonzero(ft.on_mid)                      # cells whose left edge is a tie
        if mid.size:
            edge[mid] = ft.values_table[ft.cb.encode((mid - K) / ft.mul)]
        both = torch.from_numpy(np.concatenate([ft.lut_values, edge])).to(dev)
        if len(_tables) > 64:
            _tables.clear()
        _tables[key] = (both, 2 * K)
    return _tables[key]


def _rows_on(prep, r0: int, r1: int, dev):
    """The weights of rows r0:r1 as (g, rows, bpr) float64 on ``dev`` and the error weights
    (g, 1, bpr) or None, laid out as numpy lays them out (``Prepared.transposed``, ``aT``), kept
    for the rows last asked for (every table evaluates them in turn)."""
    key = (prep.token, r0, r1, str(dev))
    rows = getattr(_local, "rows", None)
    if rows is None or rows.get("key") != key:
        torch = _torch()
        aT = prep.aT
        rows = _local.rows = {"key": key, "w": torch.from_numpy(prep.transposed(slice(r0, r1))[1]).to(dev),
                              "a": None if aT is None else torch.from_numpy(aT).to(dev)}
    return rows


def evaluate(ev, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``ev.chunk(sl)`` on the active torch device: (err, qq, k, idx) as numpy arrays, the bits
    numpy computes (see the module docstring). On the CPU torch runs on ``SOP_THREADS`` threads
    (default one, as the numpy search: cores are used by ``--jobs``; torch's default of every core
    ran 7 times slower on the shared 2-core machine), restored after the call (the forward passes
    keep theirs)."""
    torch = _torch()
    from . import blockwise

    if _active != "cpu" or torch.get_num_threads() == blockwise.THREADS:
        return _evaluate(ev, sl, torch)
    saved = torch.get_num_threads()
    torch.set_num_threads(blockwise.THREADS)
    try:
        return _evaluate(ev, sl, torch)
    finally:
        torch.set_num_threads(saved)


def _evaluate(ev, sl, torch):
    dev = torch.device(_active)
    ft = ev.ft
    idx, cdiv, cmul, _ = ev._candidates(sl)
    rows = _rows_on(ev.prep, sl.start, sl.stop, dev)
    w, a = rows["w"], rows["a"]
    both, two_k = _table(ft, dev)
    # the quotients and their floors depend on the divisors only: shared by the tables of one
    # grid and covers (NF4, BOF4, Split87, SH4), kept for these rows
    qkey = ("t", ev._div_key)
    if qkey not in rows:
        d = torch.from_numpy(np.ascontiguousarray(cdiv)).to(dev)[:, None]      # (C, 1, rows, bpr)
        t = w[None] / d                                                          # IEEE division
        f = torch.floor(t)
        rows[qkey] = (t, f, t == f)
    t, f, hit = rows[qkey]
    K = two_k // 2
    cell = torch.clamp(f, -K, K - 1).to(torch.int32)    # the cell, its table index (int32: fast)
    cell += K
    cell = torch.where(hit, cell + two_k, cell)          # an integer quotient: the edge value
    q = torch.index_select(both, 0, cell.reshape(-1)).reshape(cell.shape)
    q.mul_(torch.from_numpy(np.ascontiguousarray(cmul, dtype=np.float64)).to(dev)[:, None])
    d = torch.sub(w[None], q)
    d.mul_(d)
    if a is not None:
        d.mul_(a)
    errs = ev.prep.block_sum(d, axis=1)                  # numpy's additions, on torch tensors
    best, k = errs[0], torch.zeros(errs.shape[1:], dtype=torch.int64, device=dev)
    for c in range(1, errs.shape[0]):                    # the first least error
        better = errs[c] < best
        best = torch.where(better, errs[c], best)
        k = torch.where(better, torch.full_like(k, c), k)
    qk = torch.gather(q, 0, k[None, None].expand(1, *q.shape[1:]))[0]
    qk.mul_(qk)
    if a is not None:
        qk.mul_(a)
    qq = ev.prep.block_sum(qk, axis=0)
    return best.cpu().numpy(), qq.cpu().numpy(), k.cpu().numpy(), idx
