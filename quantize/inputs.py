"""What every quantizer accepts: the checks at the registry's door (quantize/schemes.py).

Role: the one place that turns a caller's weight matrix and activation statistics into what the
quantizers assume, or refuses them in one ``ValueError`` whose message starts with the layer's
name. The command line reads a layer through ``layer_loop.read_weight`` (which applies ``sanitize``
under ``--nan-policy``) and then calls the registry like any Python caller, so the two paths share
these rules:

* ``weight_matrix(w, name)``: a 2-D array of real numbers with at least one row and one column;
  a torch tensor (a ``Parameter`` that requires grad, BF16 or FP8, on any device) is read as
  numpy would be given it, float16/32/64 kept, other float types as float32 (which holds them), and
  so is an ml_dtypes array (``bfloat16``, ``float8_*``; its ``int4`` as int64);
  a meta tensor (no values), a complex one or a non-numeric array is refused. Never a copy where
  the caller's array is already one the quantizers take; the caller's array is never written.
* ``sanitize(name, w, policy)``: non-finite weights refused (``policy`` "error") or replaced by 0
  ("zero"); a weight beyond float32's range, or a nonzero layer below float32's smallest normal
  number, refused (``WeightError``): the outputs (float32 files, BF16 hardware values) could not
  hold it, and a finite weight must never come back as Inf or NaN.
* ``column_weights(act_ms, cols, name)``: the activation mean squares, one finite, non-negative
  value per input column (the error weights of the activation-weighted search), or None.
* ``option(keyword)``: how a refusal names a setting that both callers give: the Python keyword
  (``budget=B``) from Python, the option (``--budget B``) inside ``sop``'s ``command_line()``: the checks
  are shared, and each caller must read the name it typed.
* ``no_calib()``, ``no_e2e()``, ``nan_zero()``: the remedies many refusals name (``--no-calib``,
  ``calibrate=False``), spelt as ``option`` spells a setting.
* ``boolean(keyword, value)``, ``path_argument(keyword, value)``: an on/off or a path parameter of the
  Python API (``lm_head``, ``cache_dir``) refused in one ``TypeError`` naming it, before any work, when
  it is no bool (any truthy value was taken: ``lm_head="no"`` quantized the head) or no path;
  ``cache_folder(value, calibrate)``: ``cache_dir`` so, and refused as the empty name where calibration uses it.
"""

from __future__ import annotations

import contextlib
import math
import os
import reprlib
from contextvars import ContextVar

import numpy as np

from sop.golden.files import EMPTY_FOLDER_NAME, OutputError
from sop.golden.formats import FLOAT32_MAX, exact_numpy
from sop.quantize.metrics import abs_max

NAN_POLICIES = ("error", "zero")
FLOAT32_TINY = float(np.finfo(np.float32).tiny)      # the smallest normal float32, 2^-126


_COMMAND_LINE = ContextVar("sop_command_line", default=False)


@contextlib.contextmanager
def command_line():
    """Inside (sop/cli.py runs every command in it), ``option`` spells a setting as the command line's option."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """Whether this runs inside ``command_line()``: a message that ``option`` cannot spell (``--device cuda``
    against Python's ``device 'cuda'``) asks this."""
    return _COMMAND_LINE.get()


def option(keyword: str, value: str | None = None, flag: str | None = None) -> str:
    """``keyword`` (a Python parameter, ``e2e_windows``) as its caller gave it: ``e2e_windows`` from Python,
    ``--e2e-windows`` from the command line; with ``value``, as given with one (``e2e_windows=N``,
    ``--e2e-windows N``; ``""``: ``e2e_windows=``, ``--e2e-windows``). ``flag``: a switch named otherwise on
    the command line, given there alone (``lm_head=True``, ``--include-lm-head``). A Python caller told to
    give ``--budget`` has no such thing to give."""
    if on_command_line():
        if flag is not None:
            return flag
        flag = "--" + keyword.replace("_", "-")
        return f"{flag} {value}" if value else flag
    return keyword if value is None else f"{keyword}={value}"


def no_calib() -> str:
    """The switch that skips calibration (the remedy of a forward pass refused): ``--no-calib``, ``calibrate=False``."""
    return option("calibrate", "False", flag="--no-calib")


def no_e2e() -> str:
    """The switch that skips the end-to-end check: ``--no-e2e``, ``e2e=False``."""
    return option("e2e", "False", flag="--no-e2e")


def nan_zero() -> str:
    """The NaN policy that replaces non-finite weights: ``--nan-policy zero``, ``nan_policy='zero'`` (a string from
    Python, which ``option`` would leave unquoted)."""
    return "--nan-policy zero" if on_command_line() else "nan_policy='zero'"


def _shown(value) -> str:
    """``value`` for an error line: its repr, shortened (an array) and on one line, and its type."""
    return f"{' '.join(reprlib.repr(value).split())} ({type(value).__name__})"


def boolean(keyword: str, value) -> bool:
    """``value`` of the on/off parameter ``keyword`` (``lm_head``, ``calibrate``, ``progress``) as a bool: True
    or False, numpy's bool too; anything else is a ``TypeError`` naming ``keyword``, raised before any work.
    Every truthy value was taken as on (``lm_head="no"`` quantized the head, ``calibrate="no"`` calibrated): a
    string or a number there is a caller's mistake, which a guess would turn into another run than the one
    meant. (The command line's switches are bools: only a Python caller meets this.)"""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{keyword} must be True or False, got {_shown(value)}")


def path_argument(keyword: str, value):
    """``value`` of the path parameter ``keyword`` (``cache_dir``) as given, or a ``TypeError`` naming it when
    it is no ``str`` or ``os.PathLike`` (``cache_dir=3`` was pathlib's "expected str, bytes or os.PathLike
    object, not int", naming nothing, once calibration reached it)."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(os.fspath(value), bytes):
        raise TypeError(f"{keyword} must be a path (a str or os.PathLike), got {_shown(value)}")
    return value


def cache_folder(value, calibrate: bool = True):
    """``cache_dir`` as ``path_argument`` takes it, and refused as the empty name (an ``OutputError``, a
    ``ValueError``) where ``calibrate`` uses it: pathlib reads ``""`` as ``.``, and the cache went into the working
    folder, which the command line refuses as ``--cache-dir ''`` (sop/cli.py) before it gets here."""
    value = path_argument(option("cache_dir"), value)
    if calibrate and not os.fspath(value):
        raise OutputError(("--cache-dir " if on_command_line() else "cache_dir=") + EMPTY_FOLDER_NAME)
    return value


class WeightError(ValueError):
    """A weight that no output can hold (``sanitize``); the message starts with the layer's name."""


def _from_torch(w, name: str):
    """A torch tensor as numpy reads it (see the module docstring); anything else as it is."""
    if type(w).__module__.split(".")[0] != "torch" or not hasattr(w, "detach"):
        return w
    import torch

    if w.is_meta:
        raise ValueError(f"{name}: a meta tensor holds no values (load the weights first)")
    if w.is_complex():
        raise ValueError(f"{name}: weights must be real numbers, got a {w.dtype} tensor")
    w = w.detach().cpu()
    if w.layout != torch.strided:               # sparse: its zeros are weights too
        w = w.to_dense()
    if w.is_floating_point() and w.dtype not in (torch.float16, torch.float32, torch.float64):
        w = w.float()                           # BF16, FP8: numpy has no such type; float32 holds them
    return w.numpy()


def weight_matrix(w, name: str = "layer") -> np.ndarray:
    """``w`` as the quantizers take it, or ``ValueError`` (module docstring)."""
    a = exact_numpy(np.asarray(_from_torch(w, name)))
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: weights must be real numbers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight matrix (out, in), got shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"{name}: a weight matrix with no {'rows' if a.shape[0] == 0 else 'columns'} "
                         f"(shape {a.shape})")
    return a


def column_weights(act_ms, cols: int, name: str = "layer") -> np.ndarray | None:
    """``act_ms`` checked against a layer of ``cols`` input columns (module docstring)."""
    if act_ms is None:
        return None
    a = exact_numpy(np.asarray(_from_torch(act_ms, name)))
    if a.dtype.kind not in "biuf" or a.shape != (cols,):
        raise ValueError(f"{name}: act_ms must hold one number per input column ({cols}), got shape {a.shape} "
                         f"of {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not (np.isfinite(a).all() and (a >= 0).all()):
        raise ValueError(f"{name}: act_ms must be finite and non-negative (mean squares of the layer's inputs)")
    return a


#: what a refusal of a non-finite weight offers a caller of the registry, who has no NaN policy to give (the
#: commands and ``quantize_model`` are offered theirs: ``nan_zero``)
REGISTRY_NAN_HINT = "replace them (with 0, say) before quantizing"


def sanitize(name: str, w: np.ndarray, policy: str = "error", hint: str | None = None) -> tuple[np.ndarray, int]:
    """The weight with non-finite entries handled by ``policy``, and how many there were (refused
    with ``hint``; by default the policy that replaces them, as its caller gives it: ``nan_zero``).

    A weight beyond float32's range, or a nonzero layer whose every weight lies
    below float32's smallest normal number (a float64 layer, or a float32 one of
    subnormals alone), is refused (``WeightError``): the outputs (float32 files, BF16
    hardware values) could not hold it, the first as Inf, the second as all zeros."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"unknown NaN policy {policy!r}; valid: {', '.join(NAN_POLICIES)}")
    peak, n = abs_max(w), 0
    if not math.isfinite(peak):             # a NaN or an Inf somewhere (max |w| is finite otherwise): find them
        bad = ~np.isfinite(w)
        n = int(bad.sum())
        if policy == "error":
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise WeightError(f"{name}: non-finite weight {w[r, c]} at row {r}, column {c} ({n} in the layer); "
                              f"{hint or nan_zero() + ' replaces them with 0'}")
        w = np.where(bad, 0.0, w)
        peak = abs_max(w)
    if peak > FLOAT32_MAX:
        r, c = (int(i) for i in np.argwhere(np.abs(w) > FLOAT32_MAX)[0])
        # repr, not %g: a weight just past FLT_MAX would print as FLT_MAX itself
        raise WeightError(f"{name}: weight {float(w[r, c])!r} at row {r}, column {c} is beyond float32's range "
                          f"(+-{float(FLOAT32_MAX)!r}); the quantized outputs are float32 and BF16: rescale the "
                          f"checkpoint")
    if 0 < peak < FLOAT32_TINY:
        raise WeightError(f"{name}: every weight lies below float32's smallest normal number "
                          f"({float(FLOAT32_TINY)!r}; the largest is {float(peak)!r}): the layer would decode to "
                          f"zeros; rescale the checkpoint")
    return w, n
