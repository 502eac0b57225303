"""Where the teacher lives: ``teacher.source`` names a model (in-process), a service URL or a
cache directory, and a :class:`TeacherSource` answers the trainer's one question.

The question (:meth:`TeacherSource.score`): for ``[prompt | completion]`` rows ``[B, T]`` whose
last ``n`` columns are the completion, and ``[B, n, Q]`` ids per completion position, return the
teacher's :class:`~opd_jax.teacher.scores.TeacherScores` (top-``k``, logsumexp, log-probs at the
ids) at ``temperature``. :class:`LocalTeacher` answers it in this process
(:func:`~opd_jax.teacher.scoring.score_completions`); ``opd_jax.teacher.client.TeacherClient``
asks an ``opd-jax serve-teacher`` process; a cache answers by example index instead
(``opd_jax.teacher.cache``), for off-policy data scored once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import numpy as np

from opd_jax.teacher.scores import TeacherScores, query_ids
from opd_jax.teacher.scoring import score_completions

__all__ = ["TeacherSource", "LocalTeacher", "CachedTeacher", "open_teacher_source", "source_kind",
           "SERVICE_PREFIXES", "scores_k", "score_examples"]

SERVICE_PREFIXES = ("http://", "https://")
#: a cache directory is one holding this file (``opd-jax cache-teacher`` writes it)
CACHE_MANIFEST = "manifest.json"


def source_kind(source: str) -> Literal["model", "service", "cache"]:
    """``"service"`` for an ``http(s)://`` URL, ``"cache"`` for a directory with a teacher-cache
    manifest, ``"model"`` otherwise (``"default"``, ``"random"``, a HF folder, a ``.gguf``)."""
    if source.startswith(SERVICE_PREFIXES):
        return "service"
    if (Path(source) / CACHE_MANIFEST).is_file():
        return "cache"
    return "model"


def scores_k(top_k: int | None, metrics_k: int = 16) -> int:
    """Teacher top-k ids a step needs: the loss's ``top_k`` (the mechanism metrics then use
    ``min(16, top_k)``), or the metrics' 16 without one."""
    return int(top_k) if top_k else metrics_k


class TeacherSource(Protocol):
    """What the trainer asks a teacher that is not one of its own arguments."""

    def score(self, tokens_BxT: np.ndarray, valid_BxT: np.ndarray, query_ids_BxNxQ: np.ndarray,
              *, n: int, k: int, temperature: float) -> TeacherScores: ...


@dataclasses.dataclass
class LocalTeacher:
    """A teacher in this process behind the :class:`TeacherSource` interface (the reference a
    served teacher is tested against, and a router's in-process member)."""

    params: Any
    config: Any
    chunk_size: int = 256

    def score(self, tokens_BxT, valid_BxT, query_ids_BxNxQ, *, n: int, k: int,
              temperature: float) -> TeacherScores:
        out = score_completions(self.params, self.config, np.asarray(tokens_BxT, np.int32),
                                np.asarray(valid_BxT, bool),
                                np.asarray(query_ids_BxNxQ, np.int32), n=n, k=k,
                                chunk_size=self.chunk_size, temperature=float(temperature))
        return jax.tree.map(np.asarray, out)


@dataclasses.dataclass
class CachedTeacher:
    """A teacher cache behind the trainer's interface: it answers by dataset example, for the
    tokens it scored once (``opd-jax cache-teacher``), not for fresh rollouts."""

    cache: Any

    def score_examples(self, indices, tokens_BxT, valid_BxT, completion_BxN, mask_BxN, *,
                       n: int, k: int, temperature: float, records=None) -> TeacherScores:
        """The cached scores of examples ``indices`` (``[B, n, ...]``), after checking ``k`` and
        ``temperature`` against the cache and the batch's completion tokens against the cached
        ones (rows with a mask); the rows' tokens are not needed."""
        del tokens_BxT, valid_BxT, records
        self.cache.check(k=k, temperature=temperature)
        scores = self.cache.scores(list(indices), n, k=k)
        completion_BxN, mask_BxN = np.asarray(completion_BxN), np.asarray(mask_BxN, bool)
        cached_BxN = scores.query_ids[..., 0]
        bad = np.nonzero((mask_BxN & (cached_BxN != completion_BxN)).any(axis=1))[0]
        if bad.size:
            raise ValueError(f"teacher cache {self.cache.path}: example {list(indices)[bad[0]]} "
                             "holds other completion tokens than the batch (another dataset or "
                             "tokenizer); rebuild it: opd-jax cache-teacher CONFIG --force")
        return scores


def score_examples(source: Any, indices, tokens_BxT, valid_BxT, completion_BxN, mask_BxN, *,
                   n: int, k: int, temperature: float, records=None) -> TeacherScores:
    """A dataset batch's scores from any source: a cache (or a router) by example index, a model
    or a service from the rows' tokens, queried at the dataset's own completion tokens."""
    if hasattr(source, "score_examples"):
        return source.score_examples(indices, tokens_BxT, valid_BxT, completion_BxN, mask_BxN,
                                     n=n, k=k, temperature=temperature, records=records)
    return source.score(np.asarray(tokens_BxT), np.asarray(valid_BxT),
                        query_ids(np.asarray(completion_BxN)), n=n, k=k, temperature=temperature)


def open_teacher_source(source: str, *, vocab_size: int, tokenizer: str, k: int = 16,
                        wait_s: float = 300.0):
    """The :class:`TeacherSource` (a ``TeacherClient``) or :class:`CachedTeacher` that
    ``teacher.source`` names, checked against the student's ``vocab_size`` and ``tokenizer``
    fingerprint (and a served teacher's ``k_max`` against ``k``). A service that does not answer
    is retried for ``wait_s`` seconds, then ``TeacherUnavailable``."""
    kind = source_kind(source)
    if kind == "service":
        from opd_jax.teacher.client import TeacherClient

        client = TeacherClient(source, max_wait_s=wait_s)
        client.check(vocab_size, tokenizer, k)
        return client
    if kind == "cache":
        from opd_jax.teacher.cache import TeacherCache

        cache = TeacherCache(source)
        cache.check(tokenizer=tokenizer, vocab_size=vocab_size)
        return CachedTeacher(cache)
    raise ValueError(f"teacher.source={source!r} is a model, not a service URL or a cache "
                     "directory: load it with opd_jax.train.models.build_models")
