"""GKD's mixed batches with a fixed off-policy dataset: an ``opd`` stage with
``loss.lambda_on_policy < 1`` and ``offpolicy_dataset:``.

GKD (Agarwal et al. 2024, Algorithm 1) trains each step either on the student's own samples
(probability lambda) or on a fixed dataset of (prompt, output) pairs. TRL 1.16's ``GKDTrainer``
(``trl/experimental/gkd/gkd_trainer.py:416-431``) draws per batch: with probability ``lmbda``
the student generates; else ``seq_kd=True`` makes the teacher generate; else the dataset's own
completion is used (supervised KD). Without ``offpolicy_dataset`` an opd stage's off-policy
batches are the teacher's samples (``seq_kd``); with it they are the file's examples (a
cold-start JSONL: ``opd-jax build-cold-start`` output, or any prompt / completion pairs), read in
epochs as a dataset cold start reads them (:class:`~opd_jax.train.sft_batches.EpochBatches`,
seed ``seed + stage index``), and nothing samples the teacher. The teacher scores those rows in
the step (in-process), through its service, or, with ``offpolicy_cache:`` (``opd-jax
cache-teacher`` over the same file), from disk while the service scores the on-policy batches.

Which steps are on-policy depends only on ``(seed, stage, step)`` (:func:`on_policy_step`), so
the iterator (:class:`MixedBatches`) knows where each batch comes from before it is drawn, and a
resumed stage continues both sources where they were.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np

from opd_jax.data.cold_start_file import file_sha256
from opd_jax.train import rollout
from opd_jax.train.sft_batches import DatasetRows, EpochBatches, dataset_batches

__all__ = ["on_policy_step", "MixedBatches", "mixed_data", "mixed_keep_rows",
           "OffPolicyCache", "offpolicy_source"]


def on_policy_step(seed: int, index: int, step: int, lambda_on_policy: float) -> bool:
    """Whether step ``step`` of train stage ``index`` samples the student: always at
    ``lambda_on_policy >= 1``, else when ``U(fold_in(rollout_key, 1)) < lambda_on_policy``
    (a draw of the step's own rollout key: the same on every process and on a resumed run)."""
    if lambda_on_policy >= 1.0:
        return True
    key = rollout.rollout_key(seed, index, step)
    return float(jax.random.uniform(jax.random.fold_in(key, 1))) < lambda_on_policy


class MixedBatches:
    """Iterator of a GKD stage's record batches: step ``s``'s comes from ``prompts`` (prompt
    records, sampled by the student) when ``on_policy(s)``, else from ``dataset`` (its examples,
    with ``prompt_ids`` / ``completion_ids`` / ``index``). ``get_state`` / ``set_state`` hold
    ``{"step", "prompts", "dataset"}``: both sources' states."""

    def __init__(self, prompts: Iterator, dataset: EpochBatches, on_policy: Callable[[int], bool]):
        self.prompts, self.dataset, self.on_policy, self.step = prompts, dataset, on_policy, 0

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        source = self.prompts if self.on_policy(self.step) else self.dataset
        self.step += 1
        return next(source)

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "prompts": self.prompts.get_state(),
                "dataset": self.dataset.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "dataset" not in state or "prompts" not in state:
            raise ValueError("the stage's checkpoint was written without offpolicy_dataset (its "
                             "off-policy batches were the teacher's samples); keep the stage as "
                             "it was, or start the run over (--fresh)")
        self.dataset.set_state(state["dataset"])
        self.prompts.set_state(state["prompts"])
        self.step = int(state["step"])


def mixed_data(ctx: Any, index: int, stage: Any, prompt_batches: Callable) -> tuple[Any, Any]:
    """The data hook of the mixed kind: ``(stage, MixedBatches)`` over the stage's prompts
    (``prompt_batches(ctx, index, stage)``) and its ``offpolicy_dataset``."""
    stage, prompts = prompt_batches(ctx, index, stage)
    dataset = dataset_batches(ctx, index, stage.offpolicy_dataset, stage.batch_prompts,
                              max_prompt_len=stage.data.max_prompt_len)
    lam = stage.loss.lambda_on_policy
    return stage, MixedBatches(prompts, dataset,
                               lambda step: on_policy_step(ctx.cfg.seed, index, step, lam))


def mixed_keep_rows(run: Any, out: Any) -> tuple[np.ndarray | None, dict]:
    """Every sampled row; a dataset batch's real rows (its short last batch is padded)."""
    return (out.keep, {}) if isinstance(out, DatasetRows) else (None, {})


class OffPolicyCache:
    """A served teacher for the on-policy batches and a cache of the off-policy dataset's scores:
    ``score`` (fresh rollouts) goes to ``service``, ``score_examples`` (dataset rows, by index)
    to ``cache`` (a :class:`~opd_jax.teacher.source.CachedTeacher`)."""

    def __init__(self, service: Any, cache: Any):
        self.service, self.cache = service, cache

    def score(self, *args, **kwargs):
        return self.service.score(*args, **kwargs)

    def score_examples(self, *args, **kwargs):
        return self.cache.score_examples(*args, **kwargs)


def offpolicy_source(models: Any, stage: Any) -> Any:
    """The teacher source of a train stage: the run's (``models.teacher_source``), or with
    ``offpolicy_cache:`` an :class:`OffPolicyCache` of it and that cache, checked to hold the
    same teacher (fingerprints), tokenizer, vocabulary and the stage's ``offpolicy_dataset``
    (SHA-256) before anything trains."""
    path = getattr(stage, "offpolicy_cache", None)
    if not path:
        return models.teacher_source
    from opd_jax.model.fingerprint import tokenizer_fingerprint
    from opd_jax.teacher.cache import TeacherCache
    from opd_jax.teacher.source import CachedTeacher

    service = models.teacher_source
    cache = TeacherCache(path)
    cache.check(teacher=service.health().get("teacher"),
                tokenizer=tokenizer_fingerprint(models.tokenizer),
                vocab_size=models.student.config.vocab_size,
                dataset_sha256=file_sha256(stage.offpolicy_dataset))
    return OffPolicyCache(service, CachedTeacher(cache))
