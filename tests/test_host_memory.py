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


def test_tuned_malloc_env_adds_the_missing_tunables_once_and_respects_the_switch():
    from opd_jax.train.host_memory import KEEP_FREED_TUNABLES
    from opd_jax.train.host_memory import tuned_malloc_env as probed

    def tuned_malloc_env(environ, **kw):   # a machine without tcmalloc
        return probed(environ, tcmalloc=None, **kw)

    ours = ":".join(KEEP_FREED_TUNABLES)
    env = tuned_malloc_env({"PATH": "/bin"}, glibc_ok=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": ours}
    # a user's own setting of one of them wins; the others are appended after theirs
    kept = tuned_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_ibt=on"},
                            glibc_ok=True)
    assert kept["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=4:glibc.cpu.x86_ibt=on:"
                                      + ":".join(KEEP_FREED_TUNABLES[1:]))
    # a restarted process (every name present, any value) never restarts again
    assert tuned_malloc_env(env, glibc_ok=True) is None
    assert tuned_malloc_env(kept, glibc_ok=True) is None
    assert tuned_malloc_env({"OPD_JAX_MALLOC": "0"}, glibc_ok=True) is None
    assert tuned_malloc_env({}, glibc_ok=False) is None


def test_tuned_malloc_env_preloads_tcmalloc_only_when_asked_and_found():
    from opd_jax.train.host_memory import TCMALLOC_SETTINGS, tuned_malloc_env

    lib = "libtcmalloc_minimal.so.4"
    ask = {"OPD_JAX_MALLOC": "tcmalloc"}
    env = tuned_malloc_env({"PATH": "/bin", **ask}, tcmalloc=lib, glibc_ok=True)
    assert env == {"PATH": "/bin", **ask, "LD_PRELOAD": lib, **TCMALLOC_SETTINGS}
    # a user's preload stays (after ours), and a user's own tcmalloc setting wins
    env2 = tuned_malloc_env({**ask, "LD_PRELOAD": "/x/libfoo.so", "TCMALLOC_RELEASE_RATE": "2"},
                            tcmalloc=lib, glibc_ok=True)
    assert env2["LD_PRELOAD"] == f"{lib}:/x/libfoo.so" and env2["TCMALLOC_RELEASE_RATE"] == "2"
    # restarted (or an allocator the user preloads: jemalloc, mimalloc): nothing to change
    assert tuned_malloc_env(env, tcmalloc=lib, glibc_ok=True) is None
    assert tuned_malloc_env({**ask, "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, tcmalloc=lib,
                            glibc_ok=True) is None
    # asked but not on the machine: glibc with the tunables
    missing = tuned_malloc_env(ask, tcmalloc=None, glibc_ok=True)
    assert "LD_PRELOAD" not in missing and "GLIBC_TUNABLES" in missing
    # the default (unset, 1) and glibc: the tunables even where tcmalloc is found; 0: nothing
    for switch in ({}, {"OPD_JAX_MALLOC": "1"}, {"OPD_JAX_MALLOC": "glibc"}):
        glibc = tuned_malloc_env(switch, tcmalloc=lib, glibc_ok=True)
        assert "LD_PRELOAD" not in glibc and "GLIBC_TUNABLES" in glibc, switch
    assert tuned_malloc_env({"OPD_JAX_MALLOC": "0"}, tcmalloc=lib, glibc_ok=True) is None
    with pytest.raises(ValueError, match="OPD_JAX_MALLOC='tc' is not a choice.*tcmalloc"):
        tuned_malloc_env({"OPD_JAX_MALLOC": "tc"}, tcmalloc=lib)


def test_reexec_restarts_the_process_with_the_tunables_where_they_apply():
    import os
    import subprocess
    import sys

    from opd_jax.train.host_memory import KEEP_FREED_TUNABLES, tuned_malloc_env

    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "OPD_JAX_MALLOC", "LD_PRELOAD")}
    env["OPD_JAX_MALLOC"] = "glibc"
    code = ("import os, sys; print('start', flush=True); "
            "from opd_jax.train.host_memory import reexec_with_tuned_malloc; "
            "reexec_with_tuned_malloc(); print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    if tuned_malloc_env(env) is None:      # not Linux + glibc >= 2.26: nothing happens
        assert out[:2] == ["start", "None ['x', '--y']"]
    else:                                  # restarted once (two "start"), same arguments
        assert out[:3] == ["start", "start", ":".join(KEEP_FREED_TUNABLES) + " ['x', '--y']"]
    off = subprocess.run([sys.executable, "-c", code], env={**env, "OPD_JAX_MALLOC": "0"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert off[:2] == ["start", "None []"]


# the subprocess scripts' common start: resident bytes and glibc's malloc / free
_LIBC = """
import ctypes
from opd_jax.train.host_memory import heap_top_free_bytes, release_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""

_BIG_BLOCK = _LIBC + """
size = 256 << 20                       # far above glibc's largest mmap threshold (32 MiB)
b = libc.malloc(size)
ctypes.memset(b, 1, size)
before = rss()
libc.free(b)
kept = rss()
release_free_memory()
print((before - kept) >> 20, (before - rss()) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._malloc_trim() is None,
                    reason="glibc only")
def test_the_tunables_keep_a_freed_block_until_released():
    """What the policy is for: a block as large as a step's temporaries, freed, stays resident
    (the next step reuses it without faults) until ``release_free_memory``; glibc's default
    returns it at once (``munmap``)."""
    import os
    import subprocess

    from opd_jax.train.host_memory import KEEP_FREED_TUNABLES

    def freed_mib(tunables):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", _BIG_BLOCK], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    on_free, on_release = freed_mib(":".join(KEEP_FREED_TUNABLES))
    assert on_free < 16 and on_release > 200, (on_free, on_release)
    off_free, _ = freed_mib("")
    assert off_free > 200, off_free


def test_keeps_freed_memory_only_with_every_tunable_at_our_value():
    """Decides whether the train loop trims after every step (glibc's defaults) or per stage."""
    from opd_jax.train.host_memory import KEEP_FREED_TUNABLES, keeps_freed_memory

    ours = ":".join(KEEP_FREED_TUNABLES)
    assert keeps_freed_memory({"GLIBC_TUNABLES": ours})
    assert keeps_freed_memory({"GLIBC_TUNABLES": "glibc.cpu.x86_ibt=on:" + ours})
    assert not keeps_freed_memory({})
    assert not keeps_freed_memory({"GLIBC_TUNABLES": ours.replace("arena_max=1", "arena_max=4")})
    assert not keeps_freed_memory({"GLIBC_TUNABLES": ":".join(KEEP_FREED_TUNABLES[:2])})


_HOLE_AND_TOP = _LIBC + """
def block(size):
    b = libc.malloc(size)
    ctypes.memset(b, 1, size)
    return b
hole = block(128 << 20)                # freed below a live chunk: a hole
live = block(1 << 20)
top = block(256 << 20)                 # freed last: the heap's top free chunk
libc.free(hole)
libc.free(top)
start = rss()
top_bytes = heap_top_free_bytes()
release_free_memory(keep_top=True)
after_keep = rss()
release_free_memory()
print(top_bytes >> 20, (start - after_keep) >> 20, (start - rss()) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._malloc_trim() is None
                    or host_memory._mallinfo2() is None, reason="glibc >= 2.33 only")
def test_keep_top_releases_the_holes_and_keeps_the_top_chunk():
    """With the kept heap, ``release_free_memory(keep_top=True)`` returns a freed hole below a
    live chunk and keeps the top free chunk (where a step's temporaries are reused from)
    resident; a plain release returns both."""
    import os
    import subprocess

    from opd_jax.train.host_memory import KEEP_FREED_TUNABLES

    env = {**os.environ, "GLIBC_TUNABLES": ":".join(KEEP_FREED_TUNABLES)}
    out = subprocess.run([sys.executable, "-c", _HOLE_AND_TOP], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    top_mib, kept_release_mib, full_release_mib = map(int, out)
    assert top_mib >= 255, out
    assert 120 <= kept_release_mib <= 140, out          # the 128 MiB hole only
    assert full_release_mib >= 120 + 250, out           # the hole and the top chunk


def test_compile_watch_sees_compilations_not_cache_hits():
    """The train loop releases a compilation's leftovers only after a phase that compiled."""
    import jax
    import jax.numpy as jnp

    from opd_jax.train.host_memory import CompileWatch

    watch = CompileWatch()
    assert not watch.compiled()
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)
    f(jnp.ones((7, 3))).block_until_ready()
    assert watch.compiled()
    assert not watch.compiled()                          # asked again: nothing new
    f(jnp.ones((7, 3))).block_until_ready()              # same shape: a cache hit
    assert not watch.compiled()
    late = CompileWatch()                                # a new watch starts from now
    f(jnp.ones((5, 3))).block_until_ready()              # a new shape compiles
    assert watch.compiled() and late.compiled()


_UNDER_TCMALLOC = """
import ctypes, os
from opd_jax.train import host_memory as hm
print("start", flush=True)
hm.reexec_with_tuned_malloc()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
libc = ctypes.CDLL(None)                 # the process's malloc: tcmalloc's, preloaded
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
b = libc.malloc(size)
ctypes.memset(b, 1, size)
before = rss()
libc.free(b)
kept = rss()
top = hm.release_free_memory(keep_top=True)
after_top = rss()
full = hm.release_free_memory()
b = libc.malloc(size)
ctypes.memset(b, 1, size)
libc.free(b)
leftovers = hm.release_compile_leftovers()
print(hm.allocator(), hm.keeps_freed_memory(), top, full, (before - kept) >> 20,
      (before - after_top) >> 20, (before - rss()) >> 20, leftovers)
"""


@pytest.mark.skipif(host_memory.find_tcmalloc() is None,
                    reason="no tcmalloc here (Debian/Ubuntu: libtcmalloc-minimal4)")
def test_the_restart_preloads_tcmalloc_which_keeps_a_freed_block_until_released():
    """Asked for (``OPD_JAX_MALLOC=tcmalloc``) where the machine has it, the restart preloads
    tcmalloc; with our settings a freed block as large as a step's temporaries stays resident
    (``keep_top`` too: tcmalloc reuses it) until a full release hands it back, and so does
    :func:`release_compile_leftovers`."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "OPD_JAX_MALLOC", "LD_PRELOAD", "TCMALLOC_RELEASE_RATE")}
    out = subprocess.run([sys.executable, "-c", _UNDER_TCMALLOC],
                         env={**env, "OPD_JAX_MALLOC": "tcmalloc"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:2] == ["start", "start"], out                   # restarted once
    name, keeps, top, full, on_free, on_top, on_release, leftovers = out[2:]
    assert (name, keeps, top, full, leftovers) == ("tcmalloc", "True", "False", "True", "True"), out
    assert int(on_free) < 16 and int(on_top) < 16 and int(on_release) > 200, out
    # by default: no preload, glibc with the tunables
    glibc = subprocess.run([sys.executable, "-c", _UNDER_TCMALLOC.split("def rss")[0]
                            + "print(hm.allocator(), os.environ.get('LD_PRELOAD'))"],
                           env=env, capture_output=True, text=True, check=True).stdout.split()
    assert glibc[2:] == ["glibc", "None"], glibc
