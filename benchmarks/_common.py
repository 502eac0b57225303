"""Shared helpers for the benchmark scripts: machine load, compiled memory, timing, JSON output.

Timings are only meaningful on a quiet machine: every script calls :func:`load_report` first and
prints a warning (and records it in the JSON) when the 1-minute load average says other work is
running.  Compiled memory (``memory_analysis``) does not depend on load.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax

#: Jitted float32 2048^3 matmul measured on the reference 2-core AVX-512 machine (DESIGN.md).
F32_MATMUL_PEAK_GFLOPS = 315.0

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def matmul_peak_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """This machine's matmul speed: GFLOP/s of a jitted ``n^3`` matmul in ``dtype`` (float32
    accumulation), best of ``repeats``. On a CPU with AMX, XLA's bfloat16 dots run several times
    faster than float32 ones (a Sapphire Rapids VM: 263 vs ≈1,500 GFLOP/s)."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def load_report(max_load_per_core: float = 0.25, *, warn: bool = True) -> dict[str, Any]:
    """Load averages and whether the machine looks busy (1-min load > cores * threshold)."""
    cores = os.cpu_count() or 1
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:  # not available on this platform
        load1 = load5 = load15 = float("nan")
    busy = load1 > cores * max_load_per_core
    report = {
        "cores": cores,
        "load1": round(load1, 2),
        "load5": round(load5, 2),
        "load15": round(load15, 2),
        "busy": bool(busy),
    }
    if busy and warn:
        print(
            f"WARNING: machine is busy (load average {load1:.2f} on {cores} cores); "
            "timings will be unreliable. Memory figures are unaffected."
        )
    return report


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cores": os.cpu_count(),
        "mem_available_bytes": available_memory_bytes(),
    }


def compile_with_memory(fn: Callable, *args: Any) -> tuple[Any, dict[str, int]]:
    """``jax.jit(fn)`` compiled for ``args`` (arrays or ShapeDtypeStructs) and its memory.

    Returns the compiled executable and ``{"temp", "argument", "output", "alias",
    "peak_estimate"}`` in bytes; ``peak_estimate = temp + argument + output - alias`` is what
    the call holds at its peak (the inputs, the outputs and XLA's scratch buffers).
    """
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    mem = {
        "temp": int(m.temp_size_in_bytes),
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    mem["peak_estimate"] = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
    return compiled, mem


def time_calls(call: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Median / min / max wall seconds of ``call()`` (blocked until ready) after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        samples.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": repeats,
    }


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Print ``rows`` as a fixed-width table of ``(key, header)`` columns."""
    cells = [[h for _, h in columns]] + [[str(r.get(k, "-")) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def results_path(name: str, *, small: bool = False, out: str | os.PathLike | None = None) -> Path:
    """``out``, or ``RESULTS_DIR / "<name>[_small].json"`` (a ``--small`` run never overwrites
    the full run's figures)."""
    return Path(out) if out else RESULTS_DIR / (f"{name}_small.json" if small else f"{name}.json")


def write_results(name: str, payload: dict[str, Any], *, small: bool = False,
                  out: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` to :func:`results_path` and say where."""
    path = write_json(results_path(name, small=small, out=out), payload)
    print(f"wrote {path}")
    return path
