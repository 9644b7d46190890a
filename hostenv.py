"""Process-level tuning of the host (CPU) side, applied once at start-up by entry points.

XLA:CPU allocates an executable's temporary buffers afresh on every run, from its worker
threads. glibc serves a large allocation with a fresh mmap (unmapped again on free), gives
threads their own arenas (whose heaps are shrunk when freed), and trims the main heap's free
top; each way the next train step page-faults and zeroes its temporaries again, a large share
of a step's time.
Serving everything from one heap (M_MMAP_MAX = 0, M_ARENA_MAX = 1) that is never trimmed
(M_TRIM_THRESHOLD at its maximum) removes every page fault from the steady state: see
README, Performance. The price: freed memory stays mapped (RSS stays at its peak), which is
what a training process wants. Set LMSTACK_MALLOC_TUNING=0 to opt out. No effect off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
INT_MAX = 2 ** 31 - 1


def tune_malloc(pad_bytes: int = 64 << 20) -> bool:
    """One heap, no mmap, never trimmed; grows in steps of at least `pad_bytes`.

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
    results = [mallopt(M_MMAP_MAX, 0), mallopt(M_ARENA_MAX, 1), mallopt(M_TRIM_THRESHOLD, INT_MAX),
               mallopt(M_TOP_PAD, pad_bytes)]
    return all(r == 1 for r in results)


def compile_cache(path: str) -> bool:
    """JAX's persistent compilation cache in `path` (config train.compile_cache_dir; '' = off).

    A resumed or repeated run then loads its compiled programs instead of compiling them again
    (the time a resume saves: README, Running; on accelerators compiles take minutes).
    Process-wide: JAX opens the cache at its first compile, so in a notebook the first
    run's directory stays in use. Every program is cached, however fast it compiled.
    """
    if not path:
        return False
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return True
