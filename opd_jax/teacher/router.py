"""Several teachers, each scoring the rows of its own data sources (``teachers:``).

:class:`TeacherRouter` is a :class:`~opd_jax.teacher.source.TeacherSource` over named members
(in-process :class:`~opd_jax.teacher.source.LocalTeacher`\\ s or served teachers): each batch row
goes to the first member whose ``route`` patterns (shell-style, :func:`fnmatch.fnmatchcase`)
match its prompt record's source, else to the member with an empty route; every member scores its
rows in one request, and the answers are put back in row order. The trainer logs each member's
metrics under its name (``RolloutBatch.teacher_route``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import numpy as np

from opd_jax.teacher.scores import TeacherScores
from opd_jax.teacher.source import score_examples

__all__ = ["TeacherRouter", "record_source"]


def record_source(record: dict) -> str:
    """The source a prompt record is routed by: a JSONL / parquet row's own ``source`` column
    (kept in its ``metadata``) when it has one, else the record's ``source`` (the loader's)."""
    meta = record.get("metadata") or {}
    return str(meta.get("source") or record.get("source") or "")


@dataclasses.dataclass
class TeacherRouter:
    """Named teachers with their routes.

    ``routes``: ``(name, patterns, source)`` per member, in priority order; empty ``patterns``:
    the catch-all (at most one)."""

    routes: Sequence[tuple[str, tuple[str, ...], Any]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.routes)

    def route_index(self, records: Sequence[dict]) -> np.ndarray:
        """``[B]`` int32 member index of each record (``ValueError`` naming an unclaimed source
        and the routes)."""
        catch_all = next((i for i, (_, pats, _) in enumerate(self.routes) if not pats), None)
        out = np.empty(len(records), np.int32)
        for b, record in enumerate(records):
            src = record_source(record)
            hit = next((i for i, (_, pats, _) in enumerate(self.routes)
                        if any(fnmatch.fnmatchcase(src, p) for p in pats)), catch_all)
            if hit is None:
                routes = {name: list(pats) for name, pats, _ in self.routes}
                raise ValueError(f"prompt {record.get('id')!r} comes from source {src!r}, which "
                                 f"no teacher's route matches ({routes}); add a pattern for it, "
                                 "or give one teacher an empty route to take every other source")
            out[b] = hit
        return out

    def score(self, tokens_BxT, valid_BxT, query_ids_BxNxQ, *, n: int, k: int,
              temperature: float, records: Sequence[dict]) -> TeacherScores:
        """:class:`TeacherScores` of every row from its own teacher (one request per member
        that has rows); a cache member cannot score fresh rows (``ValueError``)."""
        query_ids_BxNxQ = np.asarray(query_ids_BxNxQ)

        def ask(source, rows):
            if not hasattr(source, "score"):
                raise ValueError("a teacher cache in teachers: scores the dataset it was built "
                                 "from, not fresh rollouts: route on-policy data to an "
                                 "in-process or served teacher")
            return source.score(np.asarray(tokens_BxT)[rows], np.asarray(valid_BxT)[rows],
                                query_ids_BxNxQ[rows], n=n, k=k, temperature=temperature)

        return self._gather(records, n, k, query_ids_BxNxQ.shape[-1], ask)

    def score_examples(self, indices, tokens_BxT, valid_BxT, completion_BxN, mask_BxN, *,
                       n: int, k: int, temperature: float, records: Sequence[dict]
                       ) -> TeacherScores:
        """A dataset batch's scores (``records`` carry each example's source), every row from
        its own teacher: a cache by example index, a model or a service from the tokens."""
        idx = np.asarray(indices)
        arrays = [np.asarray(x) for x in (tokens_BxT, valid_BxT, completion_BxN, mask_BxN)]
        return self._gather(records, n, k, 1, lambda source, rows: score_examples(
            source, idx[rows].tolist(), *(x[rows] for x in arrays), n=n, k=k,
            temperature=temperature, records=[records[i] for i in rows]))

    def _gather(self, records, n: int, k: int, q: int, ask) -> TeacherScores:
        route_B = self.route_index(records)
        B = len(records)
        out = TeacherScores(np.zeros((B, n, k), np.int32), np.zeros((B, n, k), np.float32),
                            np.zeros((B, n), np.float32), np.zeros((B, n, q), np.int32),
                            np.zeros((B, n, q), np.float32))
        for i, (_, _, source) in enumerate(self.routes):
            rows = np.flatnonzero(route_B == i)
            if rows.size == 0:
                continue
            part = ask(source, rows)
            for field in dataclasses.fields(TeacherScores):
                getattr(out, field.name)[rows] = np.asarray(getattr(part, field.name))
        return out
