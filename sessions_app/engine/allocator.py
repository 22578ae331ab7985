"""glibc malloc settings for a worker whose large allocations come and go.

RocksDB allocates memtable memory in blocks of a few MiB from the thread
that writes, which here is the worker's main thread, and frees them when a
memtable is flushed. glibc serves a block that size with mmap at first, but
each freed mmap raises its threshold (up to 32 MiB), so later blocks come
from the main heap, and once freed they leave holes that glibc keeps: at 1M
sessions half of the main heap was free memory still resident. Fixing the
threshold turns off that adjustment, so every block that size is mapped
and unmapped and the worker's RSS stays with its budget.

glibc also gives each thread that allocates an arena of its own, up to eight
per core. RocksDB's flush and compaction threads build whole files in memory
and free it afterwards, and what they free stays resident in their arenas:
the first compactions, between 100k and 1M sessions, left two new arenas of
3-4 MiB each. Two arenas for the whole worker (the common setting for Python
services with native thread pools, MALLOC_ARENA_MAX=2) let that memory serve
the next allocation of any thread instead.
"""

from __future__ import annotations

import ctypes

# mallopt's parameter numbers, from glibc's malloc.h.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# RocksDB's memtable blocks are larger; Python's own objects and RocksDB's cached blocks
# are much smaller and stay on the heap.
MMAP_THRESHOLD_BYTES = 256 * 1024
ARENAS = 2


def _mallopt(parameter: int, value: int) -> bool:
    """Set one of glibc's malloc parameters; return False where the C library has none."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(parameter, value))


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; return False where the C library has no such setting."""
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap the arenas threads allocate from; those that already have one keep it.

    Takes effect for threads started afterwards: call it before RocksDB opens.
    """
    return _mallopt(M_ARENA_MAX, arenas)
