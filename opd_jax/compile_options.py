"""XLA compile options of opd_jax's programs: which instruction scheduler XLA CPU uses, and
JAX's persistent compilation cache (:func:`compilation_cache`).

XLA CPU's default scheduler orders a program for concurrency: independent instructions run on
several cores at once, which keeps more temporaries alive at the same time. The memory-optimized
scheduler orders for the smallest live set. On ``make demo`` (2 cores) it gives the train step
1.38 GiB of temporaries instead of 1.60, and the run (every program scheduled that way, see
:func:`memory_scheduler_env`) peaks at 3.52-3.56 GiB resident instead of 3.86-4.04, in the same
wall time (BUILD_NOTES "Session 15"). The train step takes the stage's
``optim.cpu_scheduler``; the sampler and the evaluation scorer are compiled with
:func:`memory_jit` (the memory scheduler on the CPU, XLA's default elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import itertools
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

__all__ = ["CPU_SCHEDULERS", "cpu_scheduler_options", "jit_compiler_options", "memory_jit", "LazyJit",
           "memory_scheduler_env", "SCHEDULER_FLAG_SINCE", "compilation_cache",
           "CACHE_MIN_COMPILE_SECS"]

#: the first jaxlib known to accept ``--xla_cpu_scheduler_type`` in ``XLA_FLAGS`` (0.7.0 aborts
#: the process on it: an unknown flag there is fatal, unlike a per-program option)
SCHEDULER_FLAG_SINCE = (0, 10, 2)

#: ``optim.cpu_scheduler`` -> XLA CPU's ``xla_cpu_scheduler_type``
CPU_SCHEDULERS = {"memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                  "concurrency": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}


@functools.lru_cache(maxsize=None)
def cpu_scheduler_options(scheduler: str) -> tuple[tuple[str, str], ...]:
    """``jax.jit(compiler_options=dict(...))`` items that pick XLA CPU's instruction scheduler:
    "memory" (smallest live set) or "concurrency" (independent instructions on several cores at
    once: XLA's default). Empty where it cannot apply: another backend, or a jaxlib without the
    option (jax 0.7.0; checked once by compiling a scalar program)."""
    if scheduler not in CPU_SCHEDULERS:
        raise ValueError(f"unknown cpu_scheduler {scheduler!r}; expected one of "
                         f"{sorted(CPU_SCHEDULERS)}")
    if jax.default_backend() != "cpu":
        return ()
    items = (("xla_cpu_scheduler_type", CPU_SCHEDULERS[scheduler]),)
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(1.0).compile()
    except Exception:   # noqa: BLE001 - an older jaxlib: XLA's default scheduler
        return ()
    return items


def jit_compiler_options(scheduler: str) -> dict[str, str] | None:
    """:func:`cpu_scheduler_options` as ``jax.jit``'s ``compiler_options`` argument (``None``
    where they are empty)."""
    return dict(cpu_scheduler_options(scheduler)) or None


class LazyJit:
    """``jax.jit(fn, compiler_options=..., **jit_kwargs)`` made on first use, so a module-level
    program can take options that depend on the backend (known only once jax runs). Calls and
    attributes (``lower``, ``trace``, ...) go to the jitted function."""

    def __init__(self, fn: Callable, scheduler: str, jit_kwargs: dict[str, Any]):
        self._fn, self._scheduler, self._jit_kwargs = fn, scheduler, jit_kwargs
        self._jitted = None
        functools.update_wrapper(self, fn)

    def jitted(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fn, compiler_options=jit_compiler_options(self._scheduler),
                                   **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self.jitted()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.jitted(), name)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts)


def memory_scheduler_env(environ: Mapping[str, str], jaxlib_version: str | None = None
                         ) -> dict | None:
    """``environ`` with ``--xla_cpu_scheduler_type=<memory>`` appended to ``XLA_FLAGS`` (every
    program of the process, jax's own small ones included: ``make demo`` peaks at 3.52-3.56 GiB
    with it against 3.86 GiB with the per-program options alone), or ``None`` when it does not apply:
    ``XLA_FLAGS`` already picks a scheduler (the user's wins), ``OPD_JAX_MALLOC=0`` (the host
    memory policy is off), or a jaxlib older than :data:`SCHEDULER_FLAG_SINCE`. Only for a
    program's entry point, before jax starts its backend (the ``opd-jax`` command)."""
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("OPD_JAX_MALLOC", "1") == "0" or "xla_cpu_scheduler_type" in flags:
        return None
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return None
    if _version(jaxlib_version) < SCHEDULER_FLAG_SINCE:
        return None
    flag = f"--xla_cpu_scheduler_type={CPU_SCHEDULERS['memory']}"
    return {**environ, "XLA_FLAGS": f"{flags} {flag}".strip()}


def memory_jit(**jit_kwargs) -> Callable[[Callable], LazyJit]:
    """Decorator: ``jax.jit(**jit_kwargs)`` compiled with XLA CPU's memory-optimized scheduler
    (the smallest live set; other backends: XLA's default)."""
    return lambda fn: LazyJit(fn, "memory", jit_kwargs)


#: programs that compile faster than this are not written to the persistent cache
CACHE_MIN_COMPILE_SECS = 0.5


@contextlib.contextmanager
def compilation_cache(path: str | None, min_compile_secs: float | None = None):
    """JAX's persistent compilation cache in ``path`` for the duration (JAX's settings restored
    afterwards); ``None`` / empty: no change.

    A program that took at least ``min_compile_secs`` (default :data:`CACHE_MIN_COMPILE_SECS`)
    to compile is written there, keyed by its HLO, compile options, ``XLA_FLAGS`` and backend;
    a later compilation of the same program, in this process or another, loads it instead.
    ``make demo`` compiles 70 programs in ~46 s on 2 CPU cores; run again, it loads them
    (BUILD_NOTES "Session 18"). The study's segments, each a new jit of the same step, reuse one
    compilation the same way.
    """
    if not path:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(Path(path).expanduser()))
    jax.config.update(keys[1], CACHE_MIN_COMPILE_SECS if min_compile_secs is None
                      else min_compile_secs)
    jax_cache.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        jax_cache.reset_cache()
