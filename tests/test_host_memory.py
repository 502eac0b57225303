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


def test_huge_pages_env_adds_the_tunable_once_and_respects_the_switch():
    from opd_jax.train.host_memory import HUGE_PAGES_TUNABLE, huge_pages_env

    on = dict(glibc_ok=True, thp_ok=True)
    env = huge_pages_env({"PATH": "/bin"}, **on)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    kept = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **on)
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + HUGE_PAGES_TUNABLE
    # a restarted process (tunable present, any value) never restarts again
    assert huge_pages_env(env, **on) is None
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **on) is None
    assert huge_pages_env({"OPD_JAX_HUGE_PAGES": "0"}, **on) is None
    assert huge_pages_env({}, glibc_ok=False, thp_ok=True) is None
    assert huge_pages_env({}, glibc_ok=True, thp_ok=False) is None


def test_reexec_restarts_the_process_with_the_tunable_where_it_helps():
    import os
    import subprocess
    import sys

    from opd_jax.train.host_memory import huge_pages_env

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OPD_JAX_HUGE_PAGES")}
    code = ("import os, sys; print('start', flush=True); "
            "from opd_jax.train.host_memory import reexec_with_huge_pages; "
            "reexec_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if huge_pages_env(env) is None:        # not glibc >= 2.35 with THP: nothing happens
        assert out[:2] == ["start", "None ['x', '--y']"]
    else:                                  # restarted once (two "start"), same arguments
        assert out[:3] == ["start", "start", "glibc.malloc.hugetlb=1 ['x', '--y']"]
    off = subprocess.run([sys.executable, "-c", code], env={**env, "OPD_JAX_HUGE_PAGES": "0"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert off[:2] == ["start", "None []"]
