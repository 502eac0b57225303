"""Host memory policy: keep freed memory for reuse within a stage, hand it back between stages.

glibc's allocator keeps freed chunks of its heaps resident: XLA CPU's buffers, host copies of
batches and checkpoints, tokenizer work (``make demo``: 2.4 GB free inside the heaps at the end,
``mallinfo2``; BUILD_NOTES.md "make demo's memory"). ``malloc_trim(0)``
(:func:`release_free_memory`) releases the free pages of every heap. It is a no-op elsewhere
(musl, macOS, Windows: no ``malloc_trim``).

XLA CPU allocates each program's temporaries as one block (1.8 GB for ``make demo``'s train step,
0.4 GB for its decode loop) and frees it when the program ends. glibc serves blocks that large
with ``mmap`` and returns them with ``munmap`` (also from every thread's own arena, whatever
``M_MMAP_MAX`` says), so each step maps, faults in and zeroes its temporaries afresh. On a virtual
machine that reports free pages to its host (virtio-balloon page reporting, this project's CI
machines) the pages are gone two seconds later and faulting them back costs far more: the demo's
train step took 4.5 s after a sampler call vs 3.3 s back to back, 2.3 s of it kernel time, with
the same number of faults (BUILD_NOTES "Session 11"). :data:`KEEP_FREED_TUNABLES` keeps freed
memory in the process instead: one arena (``arena_max=1``), no ``mmap``'d chunks (``mmap_max=0``:
large blocks come from the heap and are reused) and no automatic trim; the train loop then hands
the freed pages back between stages (:func:`release_free_memory`; without the tunables, after
every step: :func:`keeps_freed_memory`), and inside a stage before every train step and after any
step during which XLA compiled (:class:`CompileWatch`): a compilation's own transient memory, a
new program's first placement and the rollout's host work leave free holes in the heap that a
step's temporaries may not fit (the heap then grows: ``make demo`` peaked anywhere between 3.58
and 3.79 GiB when only compilations and larger packed rows triggered this, 3.41-3.51 GiB now,
BUILD_NOTES "Session 19"; 5.75 GB of heap for 3.9 GB in use at a step's peak before any of it), so
those pages go back while the heap's top free chunk, where the last program's temporaries were
freed to and the next one's are taken from, stays resident
(``release_free_memory(keep_top=True)``), and all of them before a synchronous checkpoint save, so
its write buffers do not add to a step's resident peak. glibc reads tunables only at start-up, so
:func:`reexec_with_tuned_malloc` restarts the process (same pid, ``execv``) with them added; the
``opd-jax`` command does that first. ``OPD_JAX_MALLOC=0`` turns it off.

With ``OPD_JAX_MALLOC=tcmalloc``, where the machine has gperftools' tcmalloc (Debian/Ubuntu
``libtcmalloc-minimal4``), the restart preloads it instead (``LD_PRELOAD``,
:data:`TCMALLOC_SETTINGS`): its per-thread caches serve XLA's worker threads without the one
arena's lock, which costs the decode 20-30% here, and with ``TCMALLOC_RELEASE_RATE=0`` it keeps
freed spans for reuse as the tunables do (the demo's bf16 iteration 3.35 -> 3.04 s; setting 2's
generation 30.4 -> 25.4 s; BUILD_NOTES "Session 23"). Under it :func:`release_free_memory` hands
every free page back (``MallocExtension_ReleaseFreeMemory``) and ``keep_top`` releases nothing:
tcmalloc reuses freed spans of any size, so a step's temporaries need no kept top chunk. It is not
the default because it holds more: ``make demo`` from a cold compilation cache peaked at 4.29 GB
under it (with :func:`release_compile_leftovers`; 4.65 GB without) against 3.76 GB on glibc.
:func:`allocator` names the one running.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Mapping

__all__ = ["release_free_memory", "keeps_freed_memory", "tuned_malloc_env", "uses_tcmalloc",
           "reexec_with_tuned_malloc", "heap_top_free_bytes", "CompileWatch", "release_compile_leftovers",
           "compile_totals", "allocator", "find_tcmalloc", "KEEP_FREED_TUNABLES",
           "TCMALLOC_SETTINGS", "MALLOC_SWITCH"]

#: glibc malloc tunables (glibc >= 2.26) that keep freed memory in the process for reuse.
KEEP_FREED_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                       "glibc.malloc.trim_threshold=68719476736")
#: tcmalloc's environment when preloaded: freed spans are never handed back on tcmalloc's own
#: (the train loop releases between stages) and blocks over 1 GiB are not reported on stderr.
TCMALLOC_SETTINGS = {"TCMALLOC_RELEASE_RATE": "0",
                     "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
#: "0": never re-execute; unset / "1" / "glibc": glibc with the tunables; "tcmalloc": tcmalloc
#: preloaded where the machine has it (glibc with the tunables otherwise).
MALLOC_SWITCH = "OPD_JAX_MALLOC"
_TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


@functools.lru_cache(maxsize=None)
def find_tcmalloc() -> str | None:
    """The shared tcmalloc library's name as ``LD_PRELOAD`` takes it (``libtcmalloc_minimal.so.4``),
    ``None`` where the machine has none or is not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    for name in _TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _tcmalloc_release():
    """tcmalloc's ``MallocExtension_ReleaseFreeMemory`` when it is this process's malloc."""
    try:
        return ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        return None


def allocator() -> str:
    """The malloc this process runs on: ``"tcmalloc"`` (preloaded), ``"glibc"`` or ``"other"``."""
    if _tcmalloc_release() is not None:
        return "tcmalloc"
    return "glibc" if platform.libc_ver()[0] == "glibc" else "other"


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2   # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def heap_top_free_bytes() -> int:
    """Bytes of the main heap's top free chunk (glibc ``mallinfo2().keepcost``), 0 where unknown."""
    info = _mallinfo2()
    return int(info().keepcost) if info is not None else 0


def release_free_memory(keep_top: bool = False) -> bool:
    """Return the free pages of the C heaps to the OS; ``True`` if any memory was released.

    ``keep_top``: leave the main heap's top free chunk (:func:`heap_top_free_bytes`) resident and
    release the free pages below it only (``malloc_trim(pad)`` with ``pad`` = that chunk). With
    the kept heap a step's temporaries are freed into the top chunk and the next step takes them
    from there, so this drops the holes without making the next step fault its block back.
    Under tcmalloc every free page goes back, and ``keep_top`` releases nothing (module doc)."""
    tcmalloc_release = _tcmalloc_release()
    if tcmalloc_release is not None:
        if not keep_top:
            tcmalloc_release()
        return not keep_top
    trim = _malloc_trim()
    if trim is None:
        return False
    pad = heap_top_free_bytes() if keep_top else 0
    return bool(trim(ctypes.c_size_t(pad)))


def release_compile_leftovers() -> bool:
    """Hand back what an XLA compilation left free: on glibc the holes under the heap's top
    (``release_free_memory(keep_top=True)``); under tcmalloc every free page, since the compiler's
    freed memory sits in spans that a step's arrays do not reuse (``make demo`` from a cold
    compilation cache: 4.65 GB peak without it, 4.29 GB with it; the next step maps its
    temporaries afresh once). The train loop calls it after a step during which XLA compiled."""
    return release_free_memory(keep_top=_tcmalloc_release() is None)


class CompileWatch:
    """Whether XLA compiled a program (a backend compilation, counted through
    ``jax.monitoring``) since the last :meth:`compiled` call. A persistent-cache hit is not a
    compilation. One listener serves every watch in the process; each new watch (one per train
    stage) registers it again, because other code may drop every listener in the process
    (``jax.monitoring.clear_event_listeners()``: tunix's ``sft/metrics_logger.py`` does)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"
    _count = 0
    _seconds = 0.0
    _generation = 0          # only the newest registration counts (older ones may linger)
    _listener = None

    def __init__(self) -> None:
        import jax.monitoring

        # jax >= 0.7.1 can unregister; on older jax a lingering listener is made inert instead
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if CompileWatch._listener is not None and unregister is not None:
            try:
                unregister(CompileWatch._listener)
            except (AssertionError, ValueError):   # already dropped (cleared by other code)
                pass
        CompileWatch._generation += 1
        CompileWatch._listener = functools.partial(CompileWatch._on_event,
                                                   CompileWatch._generation)
        jax.monitoring.register_event_duration_secs_listener(CompileWatch._listener)
        self._seen = CompileWatch._count

    @staticmethod
    def _on_event(generation: int, event: str, duration: float, **kwargs) -> None:
        if generation == CompileWatch._generation and event == CompileWatch._EVENT:
            CompileWatch._count += 1
            CompileWatch._seconds += float(duration)

    def compiled(self) -> bool:
        """``True`` when a compilation finished since this watch was made or last asked."""
        before, self._seen = self._seen, CompileWatch._count
        return self._seen != before


def compile_totals() -> tuple[int, float]:
    """``(XLA compilations, seconds spent in them)`` in this process since the first
    :class:`CompileWatch` was made (the train loop logs each step's share)."""
    return CompileWatch._count, CompileWatch._seconds


def keeps_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with every one of :data:`KEEP_FREED_TUNABLES` at our value
    (glibc read ``GLIBC_TUNABLES`` at start-up), or with tcmalloc preloaded and
    ``TCMALLOC_RELEASE_RATE=0``. The train loop then returns free pages once per
    stage; otherwise (a notebook, a library caller, ``OPD_JAX_MALLOC=0``) after every step, where
    glibc's defaults would keep a growing, fragmented heap (BUILD_NOTES "make demo's memory")."""
    environ = os.environ if environ is None else environ
    if uses_tcmalloc(environ):
        return environ.get("TCMALLOC_RELEASE_RATE") == TCMALLOC_SETTINGS["TCMALLOC_RELEASE_RATE"]
    present = dict(t.split("=", 1) for t in environ.get("GLIBC_TUNABLES", "").split(":")
                   if "=" in t)
    return all(present.get(name) == value
               for name, value in (t.split("=", 1) for t in KEEP_FREED_TUNABLES))


def _glibc_with_tunables() -> bool:
    lib, version = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 26)
    except ValueError:
        return False


def uses_tcmalloc(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` preloads tcmalloc (``LD_PRELOAD``)."""
    return "tcmalloc" in _preloaded(environ)


def _preloaded(environ: Mapping[str, str]) -> str:
    return " ".join(os.path.basename(x) for x in
                    environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if x)


_PROBE = object()


def tuned_malloc_env(environ: Mapping[str, str], *, glibc_ok: bool | None = None,
                     tcmalloc=_PROBE) -> dict | None:
    """The environment to restart with, or ``None`` when there is nothing to change (so a
    restarted process never restarts again), off Linux, or with ``OPD_JAX_MALLOC=0``:

    * ``OPD_JAX_MALLOC=tcmalloc`` and tcmalloc found (:func:`find_tcmalloc`, or the
      ``tcmalloc`` argument in tests): ``environ`` with it first in ``LD_PRELOAD`` and
      :data:`TCMALLOC_SETTINGS` (a user's own value of each wins); nothing when ``LD_PRELOAD``
      already names an allocator (``*malloc*``: the user's choice, or a restarted process);
    * otherwise, on glibc >= 2.26 (``glibc_ok`` overrides the probe): ``environ`` with each of
      :data:`KEEP_FREED_TUNABLES` whose name ``GLIBC_TUNABLES`` does not already set appended
      to it (a user's own value wins)."""
    switch = environ.get(MALLOC_SWITCH, "1")
    if switch not in ("0", "1", "glibc", "tcmalloc"):
        raise ValueError(f"{MALLOC_SWITCH}={switch!r} is not a choice: set it to 1 or glibc (glibc "
                         "with tunables, the default), tcmalloc (preloaded where the machine has "
                         "it), or 0 (leave the allocator alone)")
    if switch == "0" or not sys.platform.startswith("linux") or "malloc" in _preloaded(environ):
        return None
    library = find_tcmalloc() if tcmalloc is _PROBE else tcmalloc
    if switch == "tcmalloc" and library:
        env = dict(environ)
        env["LD_PRELOAD"] = ":".join([library, *filter(None, [environ.get("LD_PRELOAD")])])
        for name, value in TCMALLOC_SETTINGS.items():
            env.setdefault(name, value)
        return env
    tunables = environ.get("GLIBC_TUNABLES", "")
    present = {t.split("=", 1)[0] for t in tunables.split(":") if t}
    missing = [t for t in KEEP_FREED_TUNABLES if t.split("=", 1)[0] not in present]
    if not missing or not (_glibc_with_tunables() if glibc_ok is None else glibc_ok):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([*([tunables] if tunables else []), *missing])
    return env


def reexec_with_tuned_malloc() -> None:
    """Restart this Python process with :func:`tuned_malloc_env` (``os.execv``: same pid, same
    command line) when it applies; returns without doing anything otherwise. Call it first thing
    in a program's entry point, never from library code or inside a test run."""
    try:
        env = tuned_malloc_env(os.environ)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if env is None or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
