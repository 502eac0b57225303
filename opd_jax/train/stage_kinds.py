"""The train-stage kinds: per kind, which teacher scores the batch, how many samples a prompt
gets, which objective trains on it, what is sampled off-policy, which rows are kept and where its
batches come from (:data:`STAGE_KINDS`; :func:`kind_of` picks a stage's); OPSD's teacher modes are
the :data:`SELF_TEACHERS` table. The loop that runs every kind is
:func:`opd_jax.train.stages.run_train_stage`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from opd_jax.model.tokenizer import pad_id_of
from opd_jax.sampling.sampler import Sampler
from opd_jax.train import gkd_mix, remote_teacher, rollout, sft_batches
from opd_jax.train.objectives import make_chunk_fn, sft_chunk_fn
from opd_jax.train.placement import TrainMesh
from opd_jax.train.stage_context import RunContext, make_sampler, prompt_batches, separate_teacher
from opd_jax.train.step import TeacherSpec

__all__ = ["SelfTeacher", "SELF_TEACHERS", "StageKind", "STAGE_KINDS", "kind_of"]


# --- OPSD's teacher modes ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelfTeacher:
    """OPSD's teacher (the student's own weights on the privileged prompt) in one mode:
    ``mode`` is the ``TeacherSpec`` mode, ``weights(state, teacher_args)`` the trainable tree
    that samples the seq-KD (off-policy) rollouts, ``fixed_copy`` whether the step's
    ``teacher_args`` is a copy of the stage's initial trainable tree."""

    mode: str
    weights: Callable[[Any, Any], Any]
    fixed_copy: bool = False


SELF_TEACHERS = {
    "fixed": SelfTeacher("student_fixed", lambda state, args: args, fixed_copy=True),
    "ema": SelfTeacher("student_ema", lambda state, args: state.ema),
    "live": SelfTeacher("student_live", lambda state, args: state.trainable),
}


# --- the stage kinds --------------------------------------------------------------------------


def _separate(ctx: RunContext, stage, trainable) -> tuple[TeacherSpec, Any]:
    if ctx.models.teacher_source is not None:
        return remote_teacher.scores_teacher(ctx, stage, trainable)
    return separate_teacher(ctx), ctx.models.teacher.params


def _no_teacher(ctx: RunContext, stage, trainable) -> tuple[TeacherSpec, Any]:
    return TeacherSpec("none"), None


def _self_teacher(ctx: RunContext, stage, trainable) -> tuple[TeacherSpec, Any]:
    mode = SELF_TEACHERS[stage.teacher_mode]
    return TeacherSpec(mode.mode), (jax.tree.map(lambda x: x.copy(), trainable)
                                    if mode.fixed_copy else None)


def _sample_teacher(run: Any, state, prompts, key):
    """Rollouts of the separate teacher on the student's prompt (cold start, seq-KD)."""
    return rollout.sample(run.teacher_sampler, run.ctx.models.teacher.params, prompts, key)


def _sample_self_teacher(run: Any, state, prompts, key):
    """Seq-KD from the privileged teacher: the student's weights of the teacher mode on the
    teacher's prompt."""
    m = run.ctx.models
    weights = SELF_TEACHERS[run.stage.teacher_mode].weights(state, run.teacher_args)
    tp, tl = m.student.params_and_lora(weights, m.frozen)
    return rollout.sample(run.teacher_sampler, tp, prompts, key, lora=tl, from_teacher_prompt=True)


def _encode_prompts(run: Any, records: list[dict]) -> rollout.Prompts:
    """Prompt records through the run's template, ``n_samples`` rows each."""
    tok = run.ctx.models.tokenizer
    return rollout.encode_prompts(records, tok, run.ctx.template,
                                  max_prompt_len=run.stage.data.max_prompt_len,
                                  n_samples=run.n_samples,
                                  privileged_teacher=run.kind.privileged_teacher,
                                  pad_id=pad_id_of(tok))


def _keep_all(run: Any, out) -> tuple[None, dict]:
    return None, {}


def _filter_rows(run: Any, out):
    """Cold start's rejection filters on the decoded samples."""
    return rollout.filter_sampled(run.ctx.models.tokenizer, out, run.stage.filters,
                                  run.stage.name)


def _teacher_sampler(ctx: RunContext, tm: TrainMesh, sspec, student_sampler: Sampler):
    if ctx.models.teacher is None:   # a served / cached teacher samples nothing here
        return None
    return make_sampler(ctx.models.teacher.config, sspec, ctx.models.tokenizer, mesh=tm.mesh,
                        rules=tm.teacher_rules)


def _student_sampler(ctx: RunContext, tm: TrainMesh, sspec, student_sampler: Sampler) -> Sampler:
    return student_sampler


def _encode_mixed(run: Any, records: list[dict]) -> rollout.Prompts:
    """A GKD stage's batch: dataset examples (off-policy steps) or prompt records."""
    if sft_batches.is_dataset_batch(records):
        return sft_batches.stage_prompts(run, records)
    return _encode_prompts(run, records)


@dataclasses.dataclass(frozen=True)
class StageKind:
    """How one train-stage kind builds its batches and what it trains on them.

    ``teacher(ctx, stage, trainable)`` -> the step's ``(TeacherSpec, teacher_args)``;
    ``n_samples(stage)`` rollouts per prompt; ``chunk_fn(loss_spec)`` the objective;
    ``on_policy``: whether it samples the student (with probability ``lambda_on_policy``);
    otherwise ``off_policy(run, state, prompts, key)`` samples; ``keep_rows(run, out)`` ->
    ``(row keep mask or None, counts)``; ``privileged_teacher``: the teacher reads its own
    prompt; ``teacher_sampler(...)`` what samples off-policy rollouts; ``encode(run, records)``
    the batch's ``Prompts``; ``data(ctx, index, stage)`` -> ``(stage with its steps, iterator of
    per-process record batches)``."""

    teacher: Callable[..., tuple[TeacherSpec, Any]]
    n_samples: Callable[[Any], int]
    chunk_fn: Callable[[Any], Callable]
    on_policy: bool
    off_policy: Callable[..., Any]
    keep_rows: Callable[..., tuple[Any, dict]]
    privileged_teacher: bool
    teacher_sampler: Callable[..., Sampler]
    encode: Callable[..., rollout.Prompts] = _encode_prompts
    data: Callable[..., tuple[Any, Any]] = prompt_batches


STAGE_KINDS = {
    "cold_start": StageKind(_no_teacher, lambda stage: stage.num_teacher_samples,
                            lambda lspec: sft_chunk_fn, on_policy=False,
                            off_policy=_sample_teacher, keep_rows=_filter_rows,
                            privileged_teacher=False, teacher_sampler=_teacher_sampler),
    # cold_start with `dataset:` (kind_of picks it): SFT on the file's examples, no sampling
    "cold_start_dataset": StageKind(_no_teacher, lambda stage: 1, lambda lspec: sft_chunk_fn,
                                    on_policy=False, off_policy=sft_batches.stage_completions,
                                    keep_rows=sft_batches.stage_keep_rows,
                                    privileged_teacher=False, teacher_sampler=_student_sampler,
                                    encode=sft_batches.stage_prompts,
                                    data=sft_batches.stage_data),
    # cold_start with `dataset:` and `distill: true`: the stage's loss against the teacher's
    # distribution on the file's examples (in-process teacher, or its cached scores)
    "cold_start_distill": StageKind(_separate, lambda stage: 1, make_chunk_fn, on_policy=False,
                                    off_policy=sft_batches.stage_completions,
                                    keep_rows=sft_batches.stage_keep_rows,
                                    privileged_teacher=False, teacher_sampler=_student_sampler,
                                    encode=sft_batches.stage_prompts, data=sft_batches.stage_data),
    "opd": StageKind(_separate, lambda stage: stage.sampler.n_samples, make_chunk_fn,
                     on_policy=True, off_policy=_sample_teacher, keep_rows=_keep_all,
                     privileged_teacher=False, teacher_sampler=_teacher_sampler),
    # opd with `offpolicy_dataset:` (kind_of picks it): GKD's off-policy batches are the file's
    # examples instead of the teacher's samples (opd_jax.train.gkd_mix)
    "opd_mixed": StageKind(_separate, lambda stage: stage.sampler.n_samples, make_chunk_fn,
                           on_policy=True, off_policy=sft_batches.stage_completions,
                           keep_rows=gkd_mix.mixed_keep_rows, privileged_teacher=False,
                           teacher_sampler=_student_sampler, encode=_encode_mixed,
                           data=functools.partial(gkd_mix.mixed_data,
                                                  prompt_batches=prompt_batches)),
    "opsd": StageKind(_self_teacher, lambda stage: stage.sampler.n_samples, make_chunk_fn,
                      on_policy=True, off_policy=_sample_self_teacher, keep_rows=_keep_all,
                      privileged_teacher=True, teacher_sampler=_student_sampler),
}


def kind_of(stage) -> StageKind:
    """The :class:`StageKind` a (resolved) stage runs as."""
    if getattr(stage, "offpolicy_dataset", None):
        return STAGE_KINDS["opd_mixed"]
    if getattr(stage, "dataset", None):
        return STAGE_KINDS["cold_start_distill" if stage.distill else "cold_start_dataset"]
    return STAGE_KINDS[stage.kind]
