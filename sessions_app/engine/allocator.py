"""glibc malloc settings for a worker whose large allocations come and go.

RocksDB allocates memtable memory in blocks of a few MiB from the thread
that writes, which here is the worker's main thread, and frees them when a
memtable is flushed. glibc serves a block that size with mmap at first, but
each freed mmap raises its threshold (up to 32 MiB), so later blocks come
from the main heap, and once freed they leave holes that glibc keeps: at 1M
sessions half of the main heap was free memory still resident. Fixing the
threshold turns off that adjustment, so every block that size is mapped
and unmapped and the worker's RSS stays with its budget.
"""

from __future__ import annotations

import ctypes

# mallopt's parameter number for the mmap threshold, from glibc's malloc.h.
M_MMAP_THRESHOLD = -3
# RocksDB's memtable blocks are larger; Python's own objects and RocksDB's cached blocks
# are much smaller and stay on the heap.
MMAP_THRESHOLD_BYTES = 256 * 1024


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; return False where the C library has no such setting."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
