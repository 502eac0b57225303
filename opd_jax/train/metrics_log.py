"""Metrics to ``<run_dir>/metrics.jsonl`` (one record per step) and optionally TensorBoard.

Only process 0 writes the file (:func:`make_log`); the other processes of a multi-process run
log to a :class:`MemoryLog` with the same interface."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.train.distributed import is_primary


def to_python(x: Any) -> Any:
    """JSON-able floats/ints/lists from jax/numpy values (NaN → None)."""
    if isinstance(x, dict):
        return {k: to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_python(v) for v in x]
    arr = np.asarray(x)
    if arr.ndim:
        return [to_python(v) for v in arr.tolist()]
    v = arr.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLog:
    """Append-only JSONL of ``{"stage", "step", ...}`` records; ``truncate`` drops records past a
    restored step so a resumed run's log equals an uninterrupted run's."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ValueError("log.tensorboard needs the tensorboardX package: "
                                 "pip install tensorboardX (or set log.tensorboard: false)") from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def read(self, stage: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if stage is None or r.get("stage") == stage]

    def truncate(self, stage: str, step: int) -> None:
        rows = [r for r in self.read() if not (r.get("stage") == stage and r.get("step", 0) > step)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, record: dict) -> None:
        record = to_python(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{record['stage']}/{k}", v, record.get("step", 0))
            self._tb.flush()


class MemoryLog:
    """The ``MetricsLog`` interface kept in memory: what non-primary processes log to."""

    def __init__(self):
        self.rows: list[dict] = []

    def read(self, stage: str | None = None) -> list[dict]:
        return [r for r in self.rows if stage is None or r.get("stage") == stage]

    def truncate(self, stage: str, step: int) -> None:
        self.rows = [r for r in self.rows
                     if not (r.get("stage") == stage and r.get("step", 0) > step)]

    def write(self, record: dict) -> None:
        self.rows.append(to_python(record))


def make_log(run_dir: str | Path, tensorboard: bool = False) -> MetricsLog | MemoryLog:
    """``MetricsLog`` on process 0, an in-memory log elsewhere (one writer per file)."""
    return MetricsLog(run_dir, tensorboard) if is_primary() else MemoryLog()
