"""A served teacher scores finished rollouts while the rest are still decoding.

With continuous batching (``sampler.slots``) rows finish between decode chunks
(:func:`~opd_jax.sampling.continuous.run_slots` reports them through ``on_rows_done``). Instead
of one teacher request after the whole batch is sampled, :class:`OverlappedScoring` sends each
group of finished rows to the teacher from one background thread as soon as they are final (as
verl does), so the teacher's time hides behind the sampler's; :meth:`OverlappedScoring.collect`
waits for the last answers and puts the groups back into the batch's ``[B, n, ...]`` arrays.

A group of rows is scored with its own completion length ``n_g``
(:func:`~opd_jax.train.rollout.completion_length` of its rows; at most the batch's ``n``): the
scores of a row's real completion positions do not depend on the padding columns after them
(causal attention, padding masked), and positions past a row's mask hold zeros either way
(:func:`~opd_jax.teacher.scoring.score_completions`), so the scattered arrays equal one
whole-batch request's to float32 rounding.

Groups are deterministic (one request per sampler round that finished rows, small rounds
merged up to ``min_rows``): the same rollouts always make the same requests. Requests run in
order on one thread; after one fails the later ones are skipped, the next ``on_rows_done`` (the
sampler) or :meth:`~OverlappedScoring.collect` raises its exception unchanged.

Shapes: ``B`` rows of the batch, ``P`` teacher prompt bucket, ``N`` the sampler's max new
tokens, ``R`` rows of one group, ``n_g`` its completion columns, ``Q`` query ids per position.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from opd_jax.teacher.scores import TeacherScores, query_ids
from opd_jax.train.rollout import completion_length, sample

__all__ = ["OverlappedScoring"]

_FIELDS = ("topk_ids", "topk_logprobs", "logsumexp", "query_ids", "query_logprobs")


class OverlappedScoring:
    """One batch's teacher scores, requested group by group while the batch is sampled.

    Args:
      source: the teacher (``score(tokens_BxT, valid_BxT, query_ids_BxNxQ, *, n, k,
        temperature)``; a ``TeacherClient``, a ``LocalTeacher``, a several-teacher router with
        ``routes``, which also gets the group's ``records``).
      teacher_tokens_BxP, teacher_valid_BxP: the teacher's left-padded prompts of the batch's
        ``B`` rows (``Prompts.teacher_tokens`` / ``teacher_valid``).
      k: the teacher's top-k to return; temperature: the teacher's temperature.
      student_k: the student's top ids (recorded by the sampler, ``return_topk``) to ask the
        teacher about at each position; 0: the sampled token only.
      records: the ``B`` rows' prompt records (needed by a router only).
      executor: where requests run (one worker keeps them in order); default: a one-thread pool
        of this object's own, shut down by :meth:`collect`.
      min_rows: a round that finished fewer rows waits to be merged with the next ones (the
        rows left at the end go in :meth:`collect`).

    Use: ``sampler(..., on_rows_done=scoring.on_rows_done)`` (or :meth:`sample`), then
    ``scores, stats = scoring.collect(n)``.
    """

    def __init__(self, source: Any, teacher_tokens_BxP, teacher_valid_BxP, *, k: int,
                 temperature: float, student_k: int, records: list[dict] | None = None,
                 executor: Executor | None = None, min_rows: int = 1):
        self.source = source
        self.tokens_BxP = np.asarray(teacher_tokens_BxP, np.int32)
        self.valid_BxP = np.asarray(teacher_valid_BxP, bool)
        if self.tokens_BxP.ndim != 2 or self.tokens_BxP.shape != self.valid_BxP.shape:
            raise ValueError(f"teacher prompt tokens {self.tokens_BxP.shape} and valid "
                             f"{self.valid_BxP.shape} must both be [B, P]")
        B = self.tokens_BxP.shape[0]
        self.routed = bool(getattr(source, "routes", None))
        if self.routed and (records is None or len(records) != B):
            raise ValueError(f"a several-teacher source routes rows by their records: give the "
                             f"{B} rows' records (got {None if records is None else len(records)})")
        self.k, self.temperature, self.student_k = int(k), float(temperature), int(student_k)
        self.records, self.min_rows = records, max(1, int(min_rows))
        self._own_executor = executor is None
        self._executor = executor
        self._seen_B = np.zeros(B, bool)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._groups: list[tuple[np.ndarray, int, Future]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        """``B``, the batch's rows."""
        return self._seen_B.size

    # -- the sampler's side ---------------------------------------------------------------------

    def on_rows_done(self, rows_R: np.ndarray, result: Any) -> None:
        """Rows ``rows_R`` of ``result`` (a :class:`~opd_jax.sampling.continuous.SlotResult`:
        ``tokens``/``mask`` ``[B, N]``, ``topk_ids`` ``[B, N, K]``) are final: copy them and
        send them (with any rows held back) once ``min_rows`` are waiting. Raises the first
        failed request's exception, which ends the sampling early."""
        self._raise_if_failed()
        rows_R = np.asarray(rows_R, np.int64).reshape(-1)
        if rows_R.size == 0:
            return
        if rows_R.min() < 0 or rows_R.max() >= self.rows:
            raise ValueError(f"rows {rows_R.tolist()} outside the batch's {self.rows} rows")
        if self._seen_B[rows_R].any() or np.unique(rows_R).size != rows_R.size:
            raise ValueError(f"rows {rows_R[self._seen_B[rows_R]].tolist() or rows_R.tolist()} "
                             "were reported finished twice")
        self._seen_B[rows_R] = True
        topk = None
        if self.student_k:
            K = result.topk_ids.shape[-1]
            if K < self.student_k:
                raise ValueError(f"the objective reads the teacher at the student's top "
                                 f"{self.student_k} ids but the sampler recorded {K} "
                                 "(Sampler(return_topk=loss.top_k))")
            topk = np.asarray(result.topk_ids[rows_R, :, :self.student_k], np.int32)
        self._pending.append((rows_R, np.asarray(result.tokens[rows_R], np.int32),
                              np.asarray(result.mask[rows_R], bool), topk))
        if sum(p[0].size for p in self._pending) >= self.min_rows:
            self._submit()

    def sample(self, sampler, params, prompts, key, *, lora=None):
        """:func:`~opd_jax.train.rollout.sample` with this object as the sampler's
        ``on_rows_done``; pending requests are cancelled if sampling fails."""
        try:
            return sample(functools.partial(sampler, on_rows_done=self.on_rows_done), params,
                          prompts, key, lora=lora)
        except BaseException:
            self.close()
            raise

    def _submit(self) -> None:
        """One request for the pending rows: ``[teacher prompt | completion[:, :n_g]]``."""
        rows_R = np.concatenate([p[0] for p in self._pending])
        completion_RxN = np.concatenate([p[1] for p in self._pending])
        mask_RxN = np.concatenate([p[2] for p in self._pending])
        topk_RxNxK = (np.concatenate([p[3] for p in self._pending]) if self.student_k else None)
        self._pending = []
        n_g = completion_length(mask_RxN)
        tokens_RxT = np.concatenate([self.tokens_BxP[rows_R], completion_RxN[:, :n_g]], axis=1)
        valid_RxT = np.concatenate([self.valid_BxP[rows_R], mask_RxN[:, :n_g]], axis=1)
        q_RxNxQ = query_ids(completion_RxN[:, :n_g],
                            None if topk_RxNxK is None else topk_RxNxK[:, :n_g])
        extra = {"records": [self.records[i] for i in rows_R]} if self.routed else {}
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher")
        future = self._executor.submit(self._score, tokens_RxT, valid_RxT, q_RxNxQ, n_g, extra)
        self._groups.append((rows_R, n_g, future))

    def _score(self, tokens_RxT, valid_RxT, q_RxNxQ, n_g: int,
               extra: dict) -> tuple[TeacherScores, float] | None:
        """The worker: one request and its duration (skipped after an earlier one failed)."""
        if self._error is not None:
            return None
        t0 = time.perf_counter()
        try:
            scores = self.source.score(tokens_RxT, valid_RxT, q_RxNxQ, n=n_g, k=self.k,
                                       temperature=self.temperature, **extra)
        except BaseException as e:
            with self._lock:
                if self._error is None:
                    self._error = e
            raise
        return scores, time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self.close()
            raise self._error

    # -- the trainer's side ---------------------------------------------------------------------

    def collect(self, n: int) -> tuple[TeacherScores, dict[str, float]]:
        """Wait for every request and return the batch's scores ``[B, n, ...]`` (numpy; each
        group's ``n_g`` columns trimmed or zero-padded to ``n``) and ``{"teacher_s": the
        requests' own seconds, "teacher_wait_s": seconds this call blocked, "teacher_hidden":
        1 - wait / teacher_s in [0, 1], "teacher_requests": requests sent}``. Raises a failed
        request's exception unchanged, and ``ValueError`` when the sampler did not report every
        row."""
        self._raise_if_failed()   # (a failure the sampler already heard of)
        if self._pending:
            self._submit()
        if not self._seen_B.all():
            self.close()
            raise ValueError(f"rows {np.flatnonzero(~self._seen_B).tolist()} were never "
                             "reported finished (sample with on_rows_done=this.on_rows_done)")
        t0 = time.perf_counter()
        try:
            answers = [future.result() for _, _, future in self._groups]
        finally:
            self.close()
        waited = time.perf_counter() - t0
        scores = self._scatter(n, [(rows, n_g, a[0]) for (rows, n_g, _), a
                                   in zip(self._groups, answers)])
        teacher_s = float(sum(a[1] for a in answers))
        hidden = 1.0 - waited / teacher_s if teacher_s > 0 else 0.0
        return scores, {"teacher_s": teacher_s, "teacher_wait_s": waited,
                        "teacher_hidden": float(np.clip(hidden, 0.0, 1.0)),
                        "teacher_requests": len(answers)}

    def _scatter(self, n: int, groups: list[tuple[np.ndarray, int, TeacherScores]]
                 ) -> TeacherScores:
        """The groups' ``[R, n_g, ...]`` answers placed in ``[B, n, ...]`` zero arrays."""
        B, first = self.rows, groups[0][2]
        full = {}
        for name in _FIELDS:
            x = np.asarray(getattr(first, name))
            full[name] = np.zeros((B, n) + x.shape[2:], x.dtype)
        for rows_R, n_g, scores in groups:
            m = min(n_g, n)
            for name in _FIELDS:
                x = np.asarray(getattr(scores, name))
                if x.shape[:2] != (rows_R.size, n_g) or x.shape[2:] != full[name].shape[2:]:
                    raise ValueError(f"the teacher answered {name} of shape {x.shape} for a "
                                     f"request of {rows_R.size} rows x {n_g} positions")
                full[name][rows_R, :m] = x[:, :m]
        return TeacherScores(**full)

    def close(self) -> None:
        """Cancel requests not yet started and release this object's thread (idempotent)."""
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
