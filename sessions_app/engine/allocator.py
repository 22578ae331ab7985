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

CPython's cyclic collector runs every 700 new container objects and scans
the young ones still alive. A batch keeps its tens of thousands of
fragments, states and records alive until it is done, so the collector
scanned them again and again and moved them to the oldest generation, whose
full scans then came every other batch: 6.4 s of a 54 s run, full scans of
12-27 ms each. Held off while a batch is applied, the collector runs between
batches, when their objects are gone: 0.6 s in the same run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator

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


class _Holders:
    """The holders of `collector_held_off` inside, and whether the collector ran before."""

    depth = 0
    was_running = False


@contextlib.contextmanager
def collector_held_off() -> Iterator[None]:
    """Hold CPython's cyclic garbage collector off inside; it runs again, if it ran, after.

    It stays off across the batch's awaits too (the broker's acknowledgements), which
    last at most the producer's request timeout before the batch fails. Nested or
    overlapping holders turn it back on only when the last one leaves.
    """
    if _Holders.depth == 0:
        _Holders.was_running = gc.isenabled()
        gc.disable()
    _Holders.depth += 1
    try:
        yield
    finally:
        _Holders.depth -= 1
        if _Holders.depth == 0 and _Holders.was_running:
            gc.enable()
