"""Train stages whose teacher is served (``teacher.source: http://...``) or cached
(``teacher.source: <cache dir>``): what each stage kind may do without the teacher's weights,
and the scores a step's batch carries instead of the teacher's logits.

The student's rollout records its own top-k ids at every decode step (``Sampler(return_topk=)``,
free next to the step's logits); the teacher is asked for its top-k, logsumexp and its log-probs
at those ids and at the sampled token (:func:`~opd_jax.teacher.scores.query_ids`), and the step
runs ``TeacherSpec("scores")`` (:func:`~opd_jax.train.objectives.with_teacher_scores`). The step
logs ``teacher_query_miss``: the student's top-k ids it recomputes that the teacher was not asked
about (a near tie between the sampler's pass and the step's; 0 in practice).

A served teacher scores a batch in one request once it is sampled, unless the stage's sampler
uses continuous batching (``sampler.slots``): then groups of finished rows are scored while the
rest still decode (:func:`overlapped_scoring`, :mod:`opd_jax.train.overlap`). The step logs
``teacher_s`` (the requests' own seconds), ``teacher_wait_s`` (seconds the trainer waited for
them after sampling), ``teacher_hidden`` (``1 - wait / teacher_s``: 0 without overlap) and
``teacher_requests``.
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from opd_jax.teacher.scores import TeacherScores, check_objective, query_ids, student_topk_needed
from opd_jax.teacher.source import score_examples, scores_k, source_kind
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.overlap import OverlappedScoring
from opd_jax.train.sft_batches import is_dataset_batch
from opd_jax.train.step import TeacherSpec

__all__ = ["check_stages", "scores_teacher", "add_teacher_scores", "overlapped_scoring",
           "TEACHERLESS_KINDS"]

#: stage kinds that never run the separate teacher
TEACHERLESS_KINDS = ("opsd",)


def check_stages(cfg: Any, kind: str) -> None:
    """``ValueError`` before anything runs when a stage needs the teacher's weights or full
    distribution and the teacher is a service or a cache (``kind``), naming the stage and the
    ways out. ``kind``: "service", "cache" or "router" (``teachers:``, whose members may be
    caches)."""
    cached = kind == "cache" or (kind == "router" and any(
        source_kind(t.source) == "cache" for t in cfg.teachers))
    for i, stage in enumerate(cfg.stages):
        where = f"stages.{i} ({stage.name!r})"
        resolved = cfg.resolve_stage(i)
        lspec = resolved.loss
        if stage.kind == "opd":
            if cached:
                raise ValueError(
                    f"{where}: an opd stage scores the student's fresh rollouts, which a teacher "
                    "cache cannot hold; serve the teacher "
                    "(opd-jax serve-teacher CONFIG, then teacher.source: http://host:port; its "
                    "off-policy GKD batches can still read a cache: offpolicy_cache: DIR) or "
                    "load it in-process (teacher.source: a model)")
            check_objective(lspec, where=f"{where} loss")
            if lspec.lambda_on_policy < 1.0 and not stage.offpolicy_dataset:
                raise ValueError(
                    f"{where}: loss.lambda_on_policy={lspec.lambda_on_policy} samples seq-KD "
                    "batches from the teacher, which a served teacher does not generate; give "
                    "the stage a fixed off-policy dataset (offpolicy_dataset: a cold-start "
                    "JSONL), set lambda_on_policy to 1.0, or load the teacher in-process")
            if stage.offpolicy_dataset and student_topk_needed(lspec):
                raise ValueError(
                    f"{where}: loss.support={lspec.resolved_support!r} reads the teacher at the "
                    "student's top-k ids, which the offpolicy_dataset's rows (not sampled by the "
                    "student) do not have; set loss.support: teacher")
        elif stage.kind == "cold_start" and stage.distill:
            check_objective(lspec, where=f"{where} loss")
            if student_topk_needed(lspec):
                raise ValueError(
                    f"{where}: loss.support={lspec.resolved_support!r} reads the teacher at the "
                    "student's top-k ids, which a teacher scoring the dataset once (a cache, a "
                    "service, several teachers) is not asked about; set loss.support: teacher")
        elif stage.kind == "cold_start" and not getattr(stage, "dataset", None):
            raise ValueError(
                f"{where}: an on-the-fly cold start samples the teacher's rollouts, which needs "
                "the teacher in-process; build the data once (opd-jax build-cold-start with the "
                "teacher in-process) and give the stage its dataset:")
        elif stage.kind == "eval":
            raise ValueError(
                f"{where}: an eval stage measures the teacher's accuracy and full-vocabulary KLs, "
                f"which needs the teacher in-process (teacher.source={cfg.teacher.source!r}); "
                "drop the eval stages and run opd-jax eval CONFIG teacher.source=<the model>")


def scores_teacher(ctx: Any, stage: Any, trainable: Any) -> tuple[TeacherSpec, None]:
    """The step's teacher when the run's teacher is a source: its scores ride in the batch
    (several teachers: their names, for per-teacher metrics)."""
    check_objective(stage.loss, where=f"stage {stage.name!r} loss")
    routes = tuple(getattr(ctx.models.teacher_source, "names", ()))
    return TeacherSpec("scores", routes=routes), None


def overlapped_scoring(run: Any, prompts: Any, min_rows: int = 1) -> OverlappedScoring | None:
    """The scoring of train stage ``run``'s on-policy batch of ``prompts`` that overlaps its
    sampling (:class:`~opd_jax.train.overlap.OverlappedScoring`; sample with its ``sample``),
    or ``None`` (score after sampling, :func:`add_teacher_scores`) unless the stage's teacher
    is a service (a cache answers by example, at once) and its sampler uses continuous batching
    (``sampler.slots``: rows finish in groups; the plain sampler finishes them all at the end).
    """
    source, sampler, lspec = run.ctx.models.teacher_source, run.student_sampler, run.stage.loss
    if (run.teacher.mode != "scores" or source is None or not hasattr(source, "score")
            or sampler.slots is None):
        return None
    return OverlappedScoring(source, prompts.teacher_tokens, prompts.teacher_valid,
                             k=scores_k(lspec.top_k),
                             temperature=lspec.resolved_teacher_temperature,
                             student_k=student_topk_needed(lspec), records=prompts.records,
                             min_rows=min_rows)


def add_teacher_scores(source: Any, batch: RolloutBatch, out: Any, lspec: Any,
                       records: list[dict], scoring: OverlappedScoring | None = None
                       ) -> tuple[RolloutBatch, dict]:
    """``batch`` with the teacher's :class:`~opd_jax.teacher.scores.TeacherScores` of its
    completions from ``source`` (``out``: the sampler output, with the student's top-k ids when
    the objective needs them; a cache answers by the ``records``' dataset ``index``), and
    ``{"teacher_s": seconds}`` (a service: also ``teacher_wait_s``, ``teacher_hidden``).
    ``scoring``: the batch's :func:`overlapped_scoring`, already fed by the sampler; its
    answers are collected instead of sending one request."""
    n = batch.completion.shape[1]
    routed = bool(getattr(source, "routes", None))   # several teachers: rows by data source
    if scoring is not None:
        scores, stats = scoring.collect(n)
        return _routed(_with_scores(batch, scores), source, records, routed), stats
    if is_dataset_batch(records):   # a dataset batch: the file's own tokens, by example
        t0 = time.perf_counter()
        scores = score_examples(source, [r["index"] for r in records], batch.teacher_tokens,
                                batch.teacher_valid, batch.completion, batch.mask, n=n,
                                k=scores_k(lspec.top_k),
                                temperature=lspec.resolved_teacher_temperature, records=records)
        return (_routed(_with_scores(batch, scores), source, records, routed),
                {"teacher_s": time.perf_counter() - t0})
    ks = student_topk_needed(lspec)
    s_top = None
    if ks:
        if out.topk_ids is None:
            raise ValueError("the objective reads the teacher at the student's top-k ids but the "
                             "sampler did not record them (Sampler(return_topk=loss.top_k))")
        s_top = np.asarray(out.topk_ids)[:, :n, :ks]
    q = query_ids(np.asarray(batch.completion), s_top)
    t0 = time.perf_counter()
    scores = source.score(np.asarray(batch.teacher_tokens), np.asarray(batch.teacher_valid), q,
                          n=n, k=scores_k(lspec.top_k),
                          temperature=lspec.resolved_teacher_temperature,
                          **({"records": records} if routed else {}))
    waited = time.perf_counter() - t0
    return (_routed(_with_scores(batch, scores), source, records, routed),
            {"teacher_s": waited, "teacher_wait_s": waited, "teacher_hidden": 0.0,
             "teacher_requests": 1})


def _routed(batch: RolloutBatch, source: Any, records: list[dict], routed: bool) -> RolloutBatch:
    """``batch`` with the teacher each row was routed to (several teachers), else as is."""
    if not routed:
        return batch
    return batch.replace(teacher_route=jnp.asarray(source.route_index(records), jnp.int32))


def _with_scores(batch: RolloutBatch, scores: TeacherScores) -> RolloutBatch:
    return batch.replace(teacher_scores=TeacherScores(*(jnp.asarray(x) for x in (
        scores.topk_ids, scores.topk_logprobs, scores.logsumexp, scores.query_ids,
        scores.query_logprobs))))
