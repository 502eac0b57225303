"""The train stages of a run: ``cold_start``, ``opd``, ``opsd`` (``eval``:
:mod:`opd_jax.train.eval_stage`).

Each stage has its own Orbax checkpoint directory ``<run_dir>/checkpoints/<stage>/``: the train
state plus the grain iterator state every ``checkpoint.every_n_steps`` steps and at the end (marked
done). A stage restarts from its latest readable checkpoint; rollout keys depend only on
``(seed, stage, step)``, so a resumed run reproduces an uninterrupted one step for step.

The train-stage kinds differ only in data: :data:`STAGE_KINDS` says, per kind, which teacher
scores the batch, how many samples a prompt gets, which objective trains on it, what is sampled
off-policy and which rows are kept; OPSD's teacher modes are the :data:`SELF_TEACHERS` table.
One loop (:func:`run_train_stage`) runs every kind.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from opd_jax.checkpoint import StageCheckpointer, graceful_stop, stage_dir
from opd_jax.data import PromptTemplate, make_prompt_dataset, make_prompt_iterator
from opd_jax.model.tokenizer import eos_ids_of, pad_id_of
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import Sampling
from opd_jax.sharding import rules_key
from opd_jax.teacher.client import TeacherUnavailable
from opd_jax.teacher.scores import student_topk_needed
from opd_jax.train import distributed, remote_teacher, rollout, sft_batches
from opd_jax.train.metrics_log import MemoryLog, MetricsLog, to_python
from opd_jax.train.models import Models
from opd_jax.train.objectives import make_chunk_fn, reduction_fn, sft_chunk_fn, with_teacher_scores
from opd_jax.train.placement import TrainMesh, single_device_mesh
from opd_jax.train.state import init_state, make_optimizer
from opd_jax.train.step import TeacherSpec, make_train_step


@dataclasses.dataclass
class RunContext:
    """What every stage shares: the config, models, data splits, template, the metrics log and
    the device mesh (``None``: one device)."""

    cfg: Any
    models: Models
    train_records: list
    heldout_records: list
    template: PromptTemplate
    log: MetricsLog | MemoryLog
    progress: bool = True
    mesh: TrainMesh | None = None


def make_sampler(config, spec, tokenizer, *, greedy: bool = False, return_topk=None, mesh=None,
                 rules="fsdp", score_temperature: float = 1.0) -> Sampler:
    """The sampler of ``spec``; ``score_temperature``: the temperature of the recorded
    log-probs (a training stage passes its loss temperature, see ``Sampling``)."""
    sampling = Sampling(temperature=0.0 if greedy else spec.temperature, top_k=spec.top_k or None,
                        top_p=spec.top_p if spec.top_p < 1 else None,
                        min_p=spec.min_p or None, score_temperature=score_temperature)
    eos = eos_ids_of(tokenizer, spec.extra_eos_ids) if spec.stop_at_eos else ()
    return Sampler(config, sampling, spec.max_new_tokens, eos_ids=eos,
                   pad_id=getattr(tokenizer, "pad_id", 0) or 0, return_topk=return_topk,
                   mesh=mesh, rules=rules, slots=spec.slots)


def stage_mesh(ctx: RunContext) -> TrainMesh:
    """The run's mesh (one device when the run gave none)."""
    return ctx.mesh if ctx.mesh is not None else single_device_mesh()


def separate_teacher(ctx: RunContext) -> TeacherSpec:
    """The step's view of the run's separate teacher (its config and mesh rules)."""
    tm = stage_mesh(ctx)
    rules = rules_key(tm.teacher_rules) if tm.teacher_rules != tm.rules else None
    return TeacherSpec("separate", ctx.models.teacher.config, rules=rules)


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


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One train stage's fixed parts: its spec, mesh, teacher and samplers."""

    ctx: RunContext
    index: int
    stage: Any
    kind: StageKind
    tm: TrainMesh
    teacher: TeacherSpec
    teacher_args: Any
    n_samples: int
    batch_shardings: Any
    student_sampler: Sampler
    teacher_sampler: Sampler

    def batch(self, state, records: list[dict], step: int):
        """Step ``step``'s ``(batch on the mesh, sampler output, extra metrics)`` from the global
        batch of prompt ``records``."""
        cfg, m, stage, kind = self.ctx.cfg, self.ctx.models, self.stage, self.kind
        lspec, tok = stage.loss, m.tokenizer
        key = rollout.rollout_key(cfg.seed, self.index, step)
        prompts = kind.encode(self, records)
        on_policy = kind.on_policy and (
            lspec.lambda_on_policy >= 1.0 or
            float(jax.random.uniform(jax.random.fold_in(key, 1))) < lspec.lambda_on_policy)
        extra: dict[str, Any] = {"on_policy": on_policy}
        scoring = remote_teacher.overlapped_scoring(self, prompts) if on_policy else None
        if on_policy:   # (a served teacher with sampler.slots scores rows as they finish)
            s_params, s_lora = m.student.params_and_lora(state.trainable, m.frozen)
            sample = rollout.sample if scoring is None else scoring.sample
            out = sample(self.student_sampler, s_params, prompts, key, lora=s_lora)
        else:
            out = kind.off_policy(self, state, prompts, key)
        keep, counts = kind.keep_rows(self, out)
        extra.update({f"filter_{k}": v for k, v in counts.items()})
        batch = rollout.assemble(prompts, out.tokens, out.mask, out.logprobs_full, keep)
        if lspec.grpo_outcome_weight is not None:  # OPD + verifiable reward (thunlp)
            texts = rollout.decode_rows(tok, out.tokens, out.mask)
            batch, scores = rollout.outcome_advantages(
                batch, prompts, texts, n_samples=self.n_samples,
                weight=lspec.grpo_outcome_weight,
                norm_by_std=lspec.grpo_norm_by_std is not False)
            extra["outcome_reward"] = float(scores.mean())
        if self.teacher.mode == "scores":   # a served / cached teacher: its scores ride along
            batch, waited = remote_teacher.add_teacher_scores(m.teacher_source, batch, out, lspec,
                                                              prompts.records, scoring)
            extra.update(waited)
        optim = stage.optim
        if optim.pack:   # one packing group per (micro-batch, data-parallel shard)
            teacher_config = self.teacher.config if self.teacher.mode == "separate" else None
            batch = rollout.pack_batch(batch, groups=optim.grad_accum_steps * self.tm.batch_shards,
                                       student_config=m.student.config,
                                       teacher_config=teacher_config,
                                       max_length=optim.pack_max_length)
            extra["packed_tokens"] = int(batch.student_packed.tokens.size)   # student rows
        return self.tm.place(batch, self.batch_shardings), out, extra


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


def _sample_teacher(run: StageRun, state, prompts, key):
    """Rollouts of the separate teacher on the student's prompt (cold start, seq-KD)."""
    return rollout.sample(run.teacher_sampler, run.ctx.models.teacher.params, prompts, key)


def _sample_self_teacher(run: StageRun, state, prompts, key):
    """Seq-KD from the privileged teacher: the student's weights of the teacher mode on the
    teacher's prompt."""
    m = run.ctx.models
    weights = SELF_TEACHERS[run.stage.teacher_mode].weights(state, run.teacher_args)
    tp, tl = m.student.params_and_lora(weights, m.frozen)
    return rollout.sample(run.teacher_sampler, tp, prompts, key, lora=tl, from_teacher_prompt=True)


def _encode_prompts(run: StageRun, records: list[dict]) -> rollout.Prompts:
    """Prompt records through the run's template, ``n_samples`` rows each."""
    tok = run.ctx.models.tokenizer
    return rollout.encode_prompts(records, tok, run.ctx.template,
                                  max_prompt_len=run.stage.data.max_prompt_len,
                                  n_samples=run.n_samples,
                                  privileged_teacher=run.kind.privileged_teacher,
                                  pad_id=pad_id_of(tok))


def _prompt_data(ctx: RunContext, index: int, stage) -> tuple[Any, Any]:
    """The stage and its endless iterator of shuffled prompt-record batches."""
    batch_size = distributed.per_process_batch(stage.batch_prompts)
    it = make_prompt_iterator(make_prompt_dataset(ctx.train_records, batch_size=batch_size,
                                                  seed=ctx.cfg.seed + index, num_epochs=None,
                                                  source=stage.data.name or stage.data.path))
    return stage, it


def _keep_all(run: StageRun, out) -> tuple[None, dict]:
    return None, {}


def _filter_rows(run: StageRun, out):
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
    data: Callable[..., tuple[Any, Any]] = _prompt_data


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
    "opsd": StageKind(_self_teacher, lambda stage: stage.sampler.n_samples, make_chunk_fn,
                      on_policy=True, off_policy=_sample_self_teacher, keep_rows=_keep_all,
                      privileged_teacher=True, teacher_sampler=_student_sampler),
}


def kind_of(stage) -> StageKind:
    """The :class:`StageKind` a (resolved) stage runs as."""
    if getattr(stage, "dataset", None):
        return STAGE_KINDS["cold_start_distill" if stage.distill else "cold_start_dataset"]
    return STAGE_KINDS[stage.kind]


def run_train_stage(ctx: RunContext, index: int, trainable) -> Any:
    """Run (or resume) train stage ``index``; returns the student's trainable tree at its end."""
    cfg, m = ctx.cfg, ctx.models
    stage = cfg.resolve_stage(index)
    kind = kind_of(stage)
    stage, it = kind.data(ctx, index, stage)   # a dataset stage's steps come from its size
    lspec = stage.loss
    teacher, teacher_args = kind.teacher(ctx, stage, trainable)
    with_ema = teacher.mode == "student_ema"
    optimizer = make_optimizer(stage.optim, stage.steps)
    tm = stage_mesh(ctx)
    n_samples = kind.n_samples(stage)
    tm.check_rows(stage.batch_prompts * n_samples, stage.optim.grad_accum_steps,
                  f"stage {stage.name!r}'s batch (batch_prompts x n_samples)")
    with_outcome = lspec.grpo_outcome_weight is not None
    if with_outcome:
        rollout.check_outcome_records(stage, ctx.train_records)
    init_fn = functools.partial(init_state, optimizer=optimizer, seed=cfg.seed + index,
                                with_ema=with_ema)
    abstract, shardings = tm.train_shardings(m.student, trainable, m.frozen, teacher,
                                             teacher_args, init_fn, packed=stage.optim.pack,
                                             outcome=with_outcome,
                                             scores=teacher.mode == "scores",
                                             routes=bool(teacher.routes))
    ck = StageCheckpointer(stage_dir(cfg.run_dir, stage.name), keep_last_n=cfg.checkpoint.keep_last_n,
                           every_n_steps=cfg.checkpoint.every_n_steps,
                           async_save=cfg.checkpoint.async_save)
    start = 0
    restored = ck.restore_latest(abstract)
    if restored is not None:
        state, start = restored.state, restored.step
        if restored.extra.get("done"):
            ck.close()
            return state.trainable
        it.set_state(restored.extra["data"])
    else:
        state = tm.init_state(init_fn, trainable, shardings["state"])
    ctx.log.truncate(stage.name, start)

    chunk_fn, student_k = kind.chunk_fn(lspec), None
    if teacher.mode == "scores":
        student_k = student_topk_needed(lspec) or None
        chunk_fn = with_teacher_scores(chunk_fn, student_k=student_k or 0,
                                       teacher_temperature=lspec.resolved_teacher_temperature)
    step_fn = make_train_step(student=m.student, teacher=teacher, optimizer=optimizer,
                              chunk_fn=chunk_fn,
                              reduction=reduction_fn(lspec, stage.sampler.max_new_tokens),
                              chunk_size=lspec.chunk_size,
                              grad_accum=stage.optim.grad_accum_steps,
                              ema_decay=stage.ema_decay if with_ema else None,
                              shardings=shardings)
    student_sampler = make_sampler(m.student.config, stage.sampler, m.tokenizer, mesh=tm.mesh,
                                   rules=tm.rules, score_temperature=lspec.temperature,
                                   return_topk=student_k)
    run = StageRun(ctx, index, stage, kind, tm, teacher, teacher_args, n_samples,
                   shardings["batch"], student_sampler,
                   kind.teacher_sampler(ctx, tm, stage.sampler, student_sampler))
    bar = tqdm(total=stage.steps, initial=start, desc=f"{stage.name}",
               disable=not ctx.progress or not distributed.is_primary(), dynamic_ncols=True)
    with graceful_stop() as stop:
        for step in range(start, stage.steps):
            t0 = time.perf_counter()
            data_state = it.get_state()
            try:   # the global batch on every process
                batch, out, extra = run.batch(state, distributed.gather_records(next(it)), step)
            except TeacherUnavailable:   # a teacher service gone for good: keep what was done
                if step > start:
                    ck.save(step, state, {"data": data_state}, force=True)
                ck.wait()
                bar.close()
                raise
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            with tm.scope():
                state, metrics = step_fn(state, batch, m.frozen, teacher_args)
            metrics = distributed.to_host(metrics)
            scalars = to_python(jax.device_get(metrics["scalars"]))
            t2 = time.perf_counter()
            gen_tokens = int(np.asarray(out.mask).sum())
            record = {"stage": stage.name, "kind": stage.kind, "step": step + 1, **scalars,
                      **extra, "gen_tokens": gen_tokens, "gen_s": t1 - t0,
                      "train_s": t2 - t1, "tokens_per_s": gen_tokens / max(t2 - t0, 1e-9),
                      "curves": to_python(jax.device_get(metrics["curves"]))}
            ctx.log.write(record)
            bar.update(1)
            # only what the stage computes (a cold start has no teacher overlap)
            shown = {"loss": f"{scalars['loss']:.4f}"}
            if "overlap" in scalars:
                shown["overlap"] = f"{scalars['overlap']:.3f}"
            bar.set_postfix(**shown, tok_s=f"{record['tokens_per_s']:.0f}")
            done = step + 1 == stage.steps
            ck.save(step + 1, state, {"data": it.get_state()}, done=done)
            if stop.requested and not done:
                ck.save(step + 1, state, {"data": it.get_state()}, force=True)
                ck.wait()
                bar.close()
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    bar.close()
    ck.wait()
    ck.close()
    return state.trainable
