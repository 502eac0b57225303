"""``opd_jax.train.host_memory.release_free_memory``: on glibc it returns freed heap pages that
``free`` alone keeps resident (holes below live chunks); elsewhere it is a no-op that says so."""

from __future__ import annotations

import ctypes
import sys

import pytest

from opd_jax.train import host_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._malloc_trim() is None,
                    reason="glibc only")
def test_freed_heap_holes_go_back_to_the_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 96 * 1024, 2000             # below the mmap threshold: from the heap
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, size)          # touch: resident
    for b in blocks[::2]:                  # holes between live chunks: free() keeps them
        libc.free(b)
    before = _rss_bytes()
    assert host_memory.release_free_memory() is True
    released = before - _rss_bytes()
    for b in blocks[1::2]:
        libc.free(b)
    assert released > 0.5 * size * n / 2, released   # most of the ~94 MB of holes


def test_without_malloc_trim_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    assert host_memory.release_free_memory() is False
