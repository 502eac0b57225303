"""The train stages of a run: ``cold_start``, ``opd``, ``opsd`` (``eval``:
:mod:`opd_jax.train.eval_stage`).

Each stage has its own Orbax checkpoint directory ``<run_dir>/checkpoints/<stage>/``: the train
state plus the grain iterator state every ``checkpoint.every_n_steps`` steps and at the end (marked
done). A stage restarts from its latest readable checkpoint; rollout keys depend only on
``(seed, stage, step)``, so a resumed run reproduces an uninterrupted one step for step.

The train-stage kinds differ only in data (:mod:`opd_jax.train.stage_kinds`); one loop
(:func:`run_train_stage`) runs every kind.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from opd_jax.checkpoint import WEIGHTS_ONLY, StageCheckpointer, graceful_stop, stage_dir
from opd_jax.compile_options import jit_compiler_options
from opd_jax.sampling.sampler import Sampler
from opd_jax.teacher.client import TeacherUnavailable
from opd_jax.teacher.scores import student_topk_needed
from opd_jax.train import distributed, gkd_mix, remote_teacher, rollout
from opd_jax.train.host_memory import (
    CompileWatch,
    compile_totals,
    keeps_freed_memory,
    release_compile_leftovers,
    release_free_memory,
)
from opd_jax.train.metrics_log import to_python
from opd_jax.train.objectives import reduction_fn, with_teacher_scores
from opd_jax.train.packing import ShapeMemory
from opd_jax.train.placement import TrainMesh
from opd_jax.train.stage_context import RunContext, make_sampler, stage_mesh
from opd_jax.train.stage_kinds import StageKind, kind_of
from opd_jax.train.state import init_state, make_optimizer
from opd_jax.train.step import TeacherSpec, make_train_step

__all__ = ["StageRun", "run_train_stage"]


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
    source: Any = None   # a served / cached teacher's source (gkd_mix.offpolicy_source)
    packed_shapes: tuple[ShapeMemory, ShapeMemory] | None = None   # (student, teacher): sticky

    def batch(self, state, records: list[dict], step: int):
        """Step ``step``'s ``(batch on the mesh, sampler output, extra metrics)`` from the global
        batch of prompt ``records``."""
        cfg, m, stage, kind = self.ctx.cfg, self.ctx.models, self.stage, self.kind
        lspec, tok = stage.loss, m.tokenizer
        key = rollout.rollout_key(cfg.seed, self.index, step)
        prompts = kind.encode(self, records)
        on_policy = kind.on_policy and gkd_mix.on_policy_step(cfg.seed, self.index, step,
                                                              lspec.lambda_on_policy)
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
            batch, waited = remote_teacher.add_teacher_scores(self.source, batch, out, lspec,
                                                              prompts.records, scoring)
            extra.update(waited)
        optim = stage.optim
        if optim.pack:   # one packing group per (micro-batch, data-parallel shard)
            teacher_config = self.teacher.config if self.teacher.mode == "separate" else None
            batch = rollout.pack_batch(batch, groups=optim.grad_accum_steps * self.tm.batch_shards,
                                       student_config=m.student.config,
                                       teacher_config=teacher_config,
                                       max_length=optim.pack_max_length,
                                       shapes=self.packed_shapes)
            extra["packed_tokens"] = int(batch.student_packed.tokens.size)   # student rows
        return self.tm.place(batch, self.batch_shardings), out, extra


def run_train_stage(ctx: RunContext, index: int, trainable) -> Any:
    """Run (or resume) train stage ``index``; returns the student's trainable tree at its end.

    The stage drops its reference to ``trainable`` once its state holds a copy: a caller that
    passes the only reference (``train.run`` does) frees the old weights for the stage's length,
    one copy of the student fewer (``make demo``: 0.5 GB), unless something else still uses them
    (a caller's models, a teacher derived from the same arrays)."""
    cfg, m = ctx.cfg, ctx.models
    stage = cfg.resolve_stage(index)
    kind = kind_of(stage)
    stage, it = kind.data(ctx, index, stage)   # a dataset stage's steps come from its size
    lspec = stage.loss
    source = gkd_mix.offpolicy_source(m, stage)   # checks an offpolicy_cache before compiling
    teacher, teacher_args = kind.teacher(ctx, stage, trainable)
    with_ema = teacher.mode == "student_ema"
    optimizer = make_optimizer(stage.optim, stage.steps)
    tm = stage_mesh(ctx)
    n_samples = kind.n_samples(stage)
    tm.check_rows(stage.batch_prompts * n_samples, stage.optim.grad_accum_steps,
                  f"stage {stage.name!r}'s batch (batch_prompts x n_samples)")
    if stage.kind == "opd" and stage.offpolicy_dataset:   # GKD's off-policy rows: one a prompt
        tm.check_rows(stage.batch_prompts, stage.optim.grad_accum_steps,
                      f"stage {stage.name!r}'s off-policy batch (batch_prompts)")
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
                           async_save=cfg.checkpoint.async_save,
                           save_concurrent_gb=cfg.checkpoint.save_concurrent_gb)
    ck.check_fits(abstract)   # a save bound below the largest array fails now, not at a save
    start = 0
    restored = ck.restore_latest(abstract, weights_only={"trainable": abstract.trainable})
    if restored is not None:
        state, start = restored.state, restored.step
        if restored.extra.get("done"):
            ck.close()
            return state["trainable"] if restored.extra.get(WEIGHTS_ONLY) else state.trainable
        it.set_state(restored.extra["data"])
    else:
        state = tm.init_state(init_fn, trainable, shardings["state"])
    del trainable
    # the previous stage's weights (and, freed on its return, its optimizer state) left holes the
    # new state only partly reuses: resident free pages under the first rollout (host_memory)
    release_free_memory()
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
                              shardings=shardings,
                              compiler_options=jit_compiler_options(stage.optim.cpu_scheduler))
    student_sampler = make_sampler(m.student.config, stage.sampler, m.tokenizer, mesh=tm.mesh,
                                   rules=tm.rules, score_temperature=lspec.temperature,
                                   return_topk=student_k)
    run = StageRun(ctx, index, stage, kind, tm, teacher, teacher_args, n_samples,
                   shardings["batch"], student_sampler,
                   kind.teacher_sampler(ctx, tm, stage.sampler, student_sampler), source,
                   tuple(ShapeMemory(stage.optim.pack_reuse) for _ in range(2)))
    bar = tqdm(total=stage.steps, initial=start, desc=f"{stage.name}",
               disable=not ctx.progress or not distributed.is_primary(), dynamic_ncols=True)
    trim_each_step = not keeps_freed_memory()
    compiles = CompileWatch()   # kept heap: drop what a compilation left behind (host_memory)
    compiled_before = compile_totals()
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
            # the rollout's host work and any compilation leave holes under the heap's top, and
            # a step whose temporaries fit none of them grows the heap: hand the holes back,
            # keep the top chunk the last step freed (``make demo``: 3.41-3.51 GiB instead of
            # 3.58-3.79 GiB peaks, BUILD_NOTES "Session 19")
            if not trim_each_step:
                release_free_memory(keep_top=True)
            t1 = time.perf_counter()
            with tm.scope():
                state, metrics = step_fn(state, batch, m.frozen, teacher_args)
            metrics = distributed.to_host(metrics)
            scalars = to_python(jax.device_get(metrics["scalars"]))
            t2 = time.perf_counter()
            gen_tokens = int(np.asarray(out.mask).sum())
            totals = compile_totals()   # XLA compilations in this step (rollout and update)
            n_compiled, compile_s = (a - b for a, b in zip(totals, compiled_before))
            compiled_before = totals
            record = {"stage": stage.name, "kind": stage.kind, "step": step + 1, **scalars,
                      **extra, "gen_tokens": gen_tokens, "gen_s": t1 - t0,
                      "train_s": t2 - t1, "tokens_per_s": gen_tokens / max(t2 - t0, 1e-9),
                      "compiles": n_compiled, "compile_s": round(compile_s, 3),
                      "curves": to_python(jax.device_get(metrics["curves"]))}
            ctx.log.write(record)
            if trim_each_step:   # glibc's defaults: hand the step's freed pages back now
                release_free_memory()
            elif compiles.compiled():
                release_compile_leftovers()
            bar.update(1)
            # only what the stage computes (a cold start has no teacher overlap)
            shown = {"loss": f"{scalars['loss']:.4f}"}
            if "overlap" in scalars:
                shown["overlap"] = f"{scalars['overlap']:.3f}"
            bar.set_postfix(**shown, tok_s=f"{record['tokens_per_s']:.0f}")
            done = step + 1 == stage.steps
            if not trim_each_step and not ck.async_save and (done or ck.should_save(step + 1)):
                release_free_memory()   # the save's buffers land on a trimmed heap (host_memory)
            if done and not cfg.checkpoint.final_optimizer_state:   # what a finished stage is read for
                ck.save(step + 1, {"trainable": state.trainable},
                        {"data": it.get_state(), WEIGHTS_ONLY: True}, done=True)
            else:
                ck.save(step + 1, state, {"data": it.get_state()}, done=done)
            if stop.requested and not done:
                ck.save(step + 1, state, {"data": it.get_state()}, force=True)
                ck.wait()
                bar.close()
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    bar.close()
    ck.wait()
    ck.close()
    # with the kept heap, freed host memory goes back between stages, not between steps: a step
    # re-faulting its returned temporaries costs more than it saves (host_memory, BUILD_NOTES)
    trainable = state.trainable
    del state   # the optimizer state's pages go back now, not as holes under the next stage
    release_free_memory()
    return trainable
