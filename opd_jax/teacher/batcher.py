"""Batching concurrent scoring requests into few jitted calls of few shapes (the teacher server).

Requests wait in a queue; one worker thread takes what is waiting (up to ``max_batch_rows`` rows,
waiting at most ``batch_wait_s`` for more after the first), groups requests with the same
``(n, Q, temperature)`` (static arguments / shapes of the jitted scorer), and per group:

* left-pads every row to one bucketed length ``T`` (:func:`bucket_length`): a row's scores do
  not depend on its left padding (RoPE positions count real tokens only);
* pads the row count to a power of two (:func:`bucket_rows`) with all-valid dummy rows;
* scores once with ``K = k_max`` (top-k is sorted, so request ``k`` is the first ``k`` columns);
* hands each request its rows back and wakes its thread.

A request larger than ``max_batch_rows`` is scored in several pieces. An exception while
scoring fails the requests of that batch (:class:`ScoringFailed`) and the worker carries on.
Shape letters: ``R`` padded rows, ``N`` completion tokens, ``Q`` caller-given ids per position.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable

import numpy as np

__all__ = ["ScoreBatcher", "ScoringFailed", "bucket_length", "bucket_rows"]

#: ``score_fn(tokens_RxT, valid_RxT, query_ids_RxNxQ, *, n, temperature) -> {"topk_ids":
#: [R, N, k_max], "topk_logprobs": [R, N, k_max], "logsumexp": [R, N], "query_logprobs":
#: [R, N, Q]}`` numpy arrays.
ScoreFn = Callable[..., dict]


class ScoringFailed(RuntimeError):
    """Scoring raised (or the batcher stopped) while a request waited; the text says why."""


def bucket_length(t: int, minimum: int = 16) -> int:
    """The padded row length for a longest row of ``t`` tokens: the next power of two (at least
    ``minimum``) up to 1024, then the next multiple of 1024 (bounded waste, few shapes).

    >>> [bucket_length(t) for t in (3, 17, 300, 1500)]
    [16, 32, 512, 2048]
    """
    if t > 1024:
        return -(-t // 1024) * 1024
    return max(minimum, 1 << max(0, int(t) - 1).bit_length())


def bucket_rows(b: int, max_rows: int) -> int:
    """The padded row count for ``b`` rows: the next power of two, at most ``max_rows``."""
    return min(max_rows, 1 << max(0, int(b) - 1).bit_length())


@dataclasses.dataclass(eq=False)
class _Job:
    tokens_BxT: np.ndarray
    valid_BxT: np.ndarray
    query_BxNxQ: np.ndarray
    n: int
    k: int
    temperature: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    parts: dict = dataclasses.field(default_factory=dict)
    filled: int = 0
    error: str | None = None

    @property
    def rows(self) -> int:
        return self.tokens_BxT.shape[0]

    @property
    def key(self) -> tuple:
        return (self.n, self.query_BxNxQ.shape[-1], self.temperature)

    def fail(self, message: str) -> None:
        if not self.done.is_set():
            self.error = self.error or message
            self.done.set()

    def put(self, start: int, arrays: dict) -> None:
        if self.error is not None:
            return
        self.parts[start] = arrays
        self.filled += next(iter(arrays.values())).shape[0]
        if self.filled == self.rows:
            self.done.set()

    def result(self) -> dict[str, np.ndarray]:
        starts = sorted(self.parts)
        return {name: np.concatenate([self.parts[s][name] for s in starts], axis=0)
                for name in self.parts[starts[0]]}


class ScoreBatcher:
    """The queue and the worker thread (module docstring).

    Args:
      score_fn: the scorer (:data:`ScoreFn`), called from the worker thread only.
      k_max: the top-k every call computes; requests take their first ``k``.
      max_batch_rows: rows per call at most (a power of two keeps the row buckets exact).
      batch_wait_s: how long the worker waits for more requests after the first.
    """

    def __init__(self, score_fn: ScoreFn, *, k_max: int, max_batch_rows: int = 64,
                 batch_wait_s: float = 0.005):
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows={max_batch_rows}; pass an integer >= 1")
        self.score_fn, self.k_max = score_fn, int(k_max)
        self.max_batch_rows, self.batch_wait_s = int(max_batch_rows), float(batch_wait_s)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shapes: set = set()
        self._counts = {"batches": 0, "merged_batches": 0, "rows": 0, "padded_rows": 0}

    def start(self) -> "ScoreBatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="opd-jax-teacher-batcher",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the worker; requests still queued fail with :class:`ScoringFailed`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        while True:
            try:
                self._queue.get_nowait().fail("the teacher server is shutting down")
            except queue.Empty:
                break

    def stats(self) -> dict:
        """Counters for ``/health``: ``batches`` (scorer calls), ``merged_batches`` (calls that
        served more than one request), ``rows`` (request rows scored), ``padded_rows``, ``shapes``
        (distinct ``(R, T, N, Q, temperature)`` the scorer saw: each one is a compile),
        ``queued``."""
        with self._lock:
            return {**self._counts, "shapes": len(self._shapes), "queued": self._queue.qsize()}

    def submit(self, tokens_BxT: np.ndarray, valid_BxT: np.ndarray, query_ids_BxNxQ: np.ndarray,
               *, n: int, k: int, temperature: float, timeout_s: float = 600.0
               ) -> dict[str, np.ndarray]:
        """Queue one validated request and block until it is scored: ``topk_ids`` /
        ``topk_logprobs`` ``[B, n, k]``, ``logsumexp`` ``[B, n]``, ``query_logprobs`` ``[B, n, Q]``.
        Raises :class:`ScoringFailed` when scoring raised, the batcher stopped or ``timeout_s``
        passed."""
        if self._stop.is_set() or self._thread is None:
            raise ScoringFailed("the teacher server's scoring worker is not running")
        job = _Job(tokens_BxT, valid_BxT, query_ids_BxNxQ, int(n), int(k), float(temperature))
        self._queue.put(job)
        if not job.done.wait(timeout_s):
            job.fail(f"no result after {timeout_s:.0f} s (the scoring worker is overloaded)")
        if job.error is not None:
            raise ScoringFailed(job.error)
        return job.result()

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs, rows = [first], first.rows
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                jobs.append(job)
                rows += job.rows
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                for batch in self._pack(group):
                    self._run(batch)
            for job in jobs:             # rows a failed batch left unset (never expected)
                job.fail("the scoring worker lost this request")

    def _pack(self, group: list[_Job]) -> list[list[tuple[_Job, int, int]]]:
        """Row ranges ``(job, start, stop)`` cut into batches of at most ``max_batch_rows``."""
        batches, current, used = [], [], 0
        for job in group:
            start = 0
            while start < job.rows:
                take = min(job.rows - start, self.max_batch_rows - used)
                current.append((job, start, start + take))
                start, used = start + take, used + take
                if used == self.max_batch_rows:
                    batches.append(current)
                    current, used = [], 0
        if current:
            batches.append(current)
        return batches

    def _run(self, batch: list[tuple[_Job, int, int]]) -> None:
        try:
            outputs = self._score(batch)
            row, parts = 0, []
            for job, start, stop in batch:
                m = stop - start
                parts.append((job, start, {
                    "topk_ids": outputs["topk_ids"][row:row + m, :, :job.k],
                    "topk_logprobs": outputs["topk_logprobs"][row:row + m, :, :job.k],
                    "logsumexp": outputs["logsumexp"][row:row + m],
                    "query_logprobs": outputs["query_logprobs"][row:row + m]}))
                row += m
        except Exception as e:  # noqa: BLE001 -- a failed batch must not stop the worker
            for job, _, _ in batch:
                job.fail(f"scoring failed: {type(e).__name__}: {e}")
            return
        for job, start, arrays in parts:
            job.put(start, arrays)

    def _score(self, batch: list[tuple[_Job, int, int]]) -> dict[str, np.ndarray]:
        job0 = batch[0][0]
        n, q, temperature = job0.key
        rows = sum(stop - start for _, start, stop in batch)
        T = bucket_length(max(job.tokens_BxT.shape[1] for job, _, _ in batch))
        R = bucket_rows(rows, self.max_batch_rows)
        tokens_RxT = np.zeros((R, T), np.int32)
        valid_RxT = np.zeros((R, T), bool)
        valid_RxT[rows:] = True          # dummy rows: all real tokens, so attention stays finite
        query_RxNxQ = np.zeros((R, n, q), np.int32)
        row = 0
        for job, start, stop in batch:
            m, t = stop - start, job.tokens_BxT.shape[1]
            tokens_RxT[row:row + m, T - t:] = job.tokens_BxT[start:stop]
            valid_RxT[row:row + m, T - t:] = job.valid_BxT[start:stop]
            query_RxNxQ[row:row + m] = job.query_BxNxQ[start:stop]
            row += m
        with self._lock:
            self._shapes.add((R, T, n, q, temperature))
        outputs = self.score_fn(tokens_RxT, valid_RxT, query_RxNxQ, n=n, temperature=temperature)
        with self._lock:
            self._counts["batches"] += 1
            self._counts["merged_batches"] += len({id(job) for job, _, _ in batch}) > 1
            self._counts["rows"] += rows
            self._counts["padded_rows"] += R - rows
        return outputs
