"""The process's memory policy: large freed blocks go back to the operating system.

The quantizer works through a layer in row chunks of a few MB and allocates a
few arrays of the layer's size (a reconstruction, per-block tables). glibc
serves a block of at least ``M_MMAP_THRESHOLD`` bytes by ``mmap``, and gives it
back on ``free``; but by default it *raises* that threshold to the size of the
largest such block freed (up to 32 MiB), after which blocks of up to that size
come from the heap, where freed memory mostly stays resident. On an 8192 x 8192
layer this left 3 to 5 bytes per weight of dead memory under the next stage's
peak (docs/benchmarks.md, "Memory"). ``release_freed_memory`` fixes the
threshold at ``MMAP_THRESHOLD``: blocks that large are always mapped and
returned when freed; the row-chunk temporaries below it stay on the heap and are
reused. `sop` calls it once at start; it does nothing off glibc.

``available_memory`` is what a forward pass may use: psutil's available memory
(``/proc/meminfo`` MemAvailable without psutil), capped by the environment
variable ``SOP_MEMORY_LIMIT`` (bytes, or with a binary suffix: ``512M``, ``8G``),
which also lets a test stand for a small machine. ``check_fits(need, what, hint)``
refuses, before any work, a pass that would need more: one line naming the
estimate, what is available and how to skip the pass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from pathlib import Path

M_MMAP_THRESHOLD = -3           # glibc's mallopt parameter number
MMAP_THRESHOLD = 4 << 20        # bytes: above the row-chunk temporaries (2 MiB of float64)
LIMIT_ENV = "SOP_MEMORY_LIMIT"
#: the bound on the peak of `sop quantize`, `dequantize` and `eval`, in bytes per weight of the largest
#: layer (the target that bench/memory.py and bench/llm_scale.py measure against)
PEAK_BYTES_PER_WEIGHT = 16.0
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False


def memory_limit() -> int | None:
    """``SOP_MEMORY_LIMIT`` in bytes (None when unset); a value that is no size is an error."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{LIMIT_ENV}={text!r}: not a size (bytes, or a number with K, M, G or T)")
    return int(float(m[1]) * _SUFFIX[m[2].upper()])


def available_memory() -> int | None:
    """Bytes of memory a pass may use now: psutil's available memory (else /proc/meminfo's
    MemAvailable), capped by ``SOP_MEMORY_LIMIT``; None when neither can be read and no limit is set."""
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    limit = memory_limit()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def gib(n: int) -> str:
    """Bytes as GiB, two decimals below 10 GiB; in MiB below 0.005 GiB (which would read 0.00)."""
    if n < 2**30 / 200:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.{2 if n < 10 * 2**30 else 1}f} GiB"


def check_fits(need: int, what: str, hint: str) -> None:
    """Refuse, before any work, a pass that needs about ``need`` bytes when less is available:
    ``ValueError`` naming ``what`` (the pass and what it holds), the estimate, what is available
    (and the limit that set it) and ``hint`` (how to skip the pass)."""
    avail = available_memory()
    if avail is None or need <= avail:                    # unknown: nothing to refuse on
        return
    limit = memory_limit()
    capped = f" ({LIMIT_ENV}={os.environ[LIMIT_ENV].strip()})" if limit is not None and limit <= avail else ""
    raise ValueError(f"{what} needs about {gib(need)}, {gib(avail)} are available{capped}: {hint}")
