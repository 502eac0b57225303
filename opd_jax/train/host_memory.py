"""Hand freed host memory back to the operating system between training steps.

glibc's allocator keeps freed chunks of its heaps resident: XLA CPU's buffers, host copies of
batches and checkpoints, tokenizer work. Over a run they fragment the heap and the resident size
keeps growing although the memory is free (``make demo``: 2.4 GB free inside the heaps at the end,
``mallinfo2``; BUILD_NOTES.md "make demo's memory"). ``malloc_trim(0)`` releases the free pages of
every heap. It is a no-op elsewhere (musl, macOS, Windows: no ``malloc_trim``).

XLA CPU allocates each step's temporaries (1.8 GB on ``make demo``'s train step) as fresh
``mmap`` blocks: every 4 KiB page is faulted in and zeroed by the kernel on first touch, about
500,000 minor page faults per demo step. With glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc
2.35+) malloc asks for transparent huge pages (``madvise(MADV_HUGEPAGE)``): the same step takes
~2,700 faults and runs 5-10% faster alone, ~3% inside ``make demo`` (BUILD_NOTES "Session 10",
huge pages). glibc reads tunables only at start-up, so :func:`reexec_with_huge_pages` restarts
the process (same pid, ``execv``) with the tunable added; the ``opd-jax`` command does that first.
``OPD_JAX_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from typing import Mapping

__all__ = ["release_free_memory", "huge_pages_env", "reexec_with_huge_pages", "HUGE_PAGES_TUNABLE",
           "HUGE_PAGES_SWITCH"]

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_SWITCH = "OPD_JAX_HUGE_PAGES"   # "0": never re-execute with the tunable
_THP_MODES = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the free pages of the C heaps to the OS; ``True`` if any memory was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _glibc_with_hugetlb() -> bool:
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_usable(path: str = _THP_MODES) -> bool:
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_env(environ: Mapping[str, str], *, glibc_ok: bool | None = None,
                   thp_ok: bool | None = None) -> dict | None:
    """The environment to restart with (``environ`` plus :data:`HUGE_PAGES_TUNABLE` appended to
    ``GLIBC_TUNABLES``), or ``None`` when there is nothing to gain: not Linux + glibc >= 2.35,
    transparent huge pages set to ``never``, the tunable already set (so a restarted process never
    restarts again), or ``OPD_JAX_HUGE_PAGES=0``. ``glibc_ok`` / ``thp_ok`` override the probes
    (tests)."""
    if environ.get(HUGE_PAGES_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    if not (_glibc_with_hugetlb() if glibc_ok is None else glibc_ok):
        return None
    if not (_thp_usable() if thp_ok is None else thp_ok):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return env


def reexec_with_huge_pages() -> None:
    """Restart this Python process with :func:`huge_pages_env` (``os.execv``: same pid, same
    command line) when it helps; returns without doing anything otherwise. Call it first thing in
    a program's entry point, never from library code or inside a test run."""
    env = huge_pages_env(os.environ)
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
