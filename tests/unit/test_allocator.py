"""Allocation settings: freed large blocks go back, threads share two arenas, no scans mid-batch."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from sessions_app.engine.allocator import collector_held_off

# In a fresh interpreter: free a 4 MiB block (glibc then raises its threshold to that size
# unless it is fixed), allocate 1 MiB blocks, and print whether they were mapped.
PROBE = """
import ctypes, sys
from sessions_app.engine.allocator import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblkhd
blocks = [libc.malloc(1 << 20) for _ in range(8)]
print(libc.mallinfo2().hblkhd - before >= 8 << 20)
for block in blocks:
    libc.free(block)
"""


def mapped_after_a_large_free(mode: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def test_blocks_stay_mapped_once_the_threshold_is_fixed() -> None:
    assert mapped_after_a_large_free("fixed")


def test_glibc_moves_them_to_the_heap_otherwise() -> None:
    # What the fix is for: without it the same blocks land on the heap and leave holes there.
    assert not mapped_after_a_large_free("default")


# In a fresh interpreter: six threads allocate at once, each holding its block until all
# have one; print how many arenas glibc's malloc_info then reports.
ARENA_PROBE = """
import ctypes, sys, threading
from sessions_app.engine.allocator import limit_arenas

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "limited":
    assert limit_arenas()
all_in = threading.Barrier(7)

def allocate():
    block = libc.malloc(1 << 16)
    all_in.wait()
    all_in.wait()
    libc.free(block)

threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
all_in.wait()
text, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(text), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
all_in.wait()
for thread in threads:
    thread.join()
print(text.value.decode().count("<heap nr="))
"""


def arenas_of_six_threads(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_threads_share_two_arenas_once_limited() -> None:
    assert arenas_of_six_threads("limited") <= 2


def test_glibc_gives_threads_arenas_of_their_own_otherwise() -> None:
    # What the limit is for: RocksDB's threads would each keep what they free in their own.
    assert arenas_of_six_threads("default") > 2


def test_the_collector_is_off_while_a_batch_is_applied_and_on_after_even_a_failure() -> None:
    assert gc.isenabled()
    with collector_held_off():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_held_off():
        raise RuntimeError("the batch failed")
    assert gc.isenabled()


def test_a_collector_turned_off_elsewhere_stays_off() -> None:
    gc.disable()
    try:
        with collector_held_off():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_holders_turn_the_collector_on_only_when_the_last_leaves() -> None:
    first, second = collector_held_off(), collector_held_off()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the second holder is still inside
    second.__exit__(None, None, None)
    assert gc.isenabled()
