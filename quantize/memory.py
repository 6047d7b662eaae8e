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
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3           # glibc's mallopt parameter number
MMAP_THRESHOLD = 4 << 20        # bytes: above the row-chunk temporaries (2 MiB of float64)


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError, TypeError):
        return False
