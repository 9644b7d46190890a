"""Process-level tuning of the host (CPU) side, applied once at start-up by entry points.

XLA:CPU allocates an executable's temporary buffers afresh on every run. glibc serves an
allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free,
and trims freed memory at the top of the heap; either way the next train step page-faults
and zeroes all of its temporaries again. For the Shakespeare model (56 MB of temporaries)
that cost 40% of the step. Serving everything from the heap (M_MMAP_MAX = 0) and keeping
freed memory mapped (large M_TRIM_THRESHOLD / M_TOP_PAD) removes it: 35.5 -> 21.5 ms/step
(README, Performance). Set LMSTACK_MALLOC_TUNING=0 to opt out. No effect off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


def tune_malloc(pad_bytes: int = 256 << 20) -> bool:
    """Heap-only allocation that keeps up to ~`pad_bytes` of freed memory mapped.

    Returns True if glibc accepted every setting (False off glibc or when opted out).
    """
    if os.environ.get("LMSTACK_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    results = [mallopt(M_MMAP_MAX, 0), mallopt(M_TOP_PAD, pad_bytes), mallopt(M_TRIM_THRESHOLD, 4 * pad_bytes)]
    return all(r == 1 for r in results)
