"""The stages of a run: ``cold_start``, ``opd``, ``opsd`` (train) and ``eval``.

Each stage has its own Orbax checkpoint directory ``<run_dir>/checkpoints/<stage>/``: the train
state plus the grain iterator state every ``checkpoint.every_n_steps`` steps and at the end (marked
done). A stage restarts from its latest readable checkpoint; rollout keys depend only on
``(seed, stage, step)``, so a resumed run reproduces an uninterrupted one step for step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from opd_jax import losses
from opd_jax.checkpoint import StageCheckpointer, graceful_stop, stage_dir
from opd_jax.data import PromptTemplate, make_prompt_dataset, make_prompt_iterator
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import Sampling
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import rollout
from opd_jax.train.evaluate import evaluate_student
from opd_jax.train.metrics_log import MetricsLog, to_python
from opd_jax.train.models import Models
from opd_jax.train.objectives import make_chunk_fn, sft_chunk_fn
from opd_jax.train.state import init_state, make_optimizer
from opd_jax.train.step import TeacherSpec, make_train_step

FAULT_ENV = "OPD_JAX_FAULT_KILL_AFTER_STEP"  # test hook: SIGKILL self after this global step
_TEACHER_MODES = {"fixed": "student_fixed", "ema": "student_ema", "live": "student_live"}


@dataclasses.dataclass
class RunContext:
    """What every stage shares: the config, models, data splits, template, the metrics log and
    the device mesh (``None``: one device)."""

    cfg: Any
    models: Models
    train_records: list
    heldout_records: list
    template: PromptTemplate
    log: MetricsLog
    progress: bool = True
    mesh: mesh_lib.TrainMesh | None = None


def make_sampler(config, spec, tokenizer, *, greedy: bool = False, return_topk=None, mesh=None,
                 rules="fsdp") -> Sampler:
    sampling = Sampling(temperature=0.0 if greedy else spec.temperature, top_k=spec.top_k or None,
                        top_p=spec.top_p if spec.top_p < 1 else None,
                        min_p=spec.min_p or None)
    eos = rollout.eos_ids(tokenizer, spec.extra_eos_ids) if spec.stop_at_eos else ()
    return Sampler(config, sampling, spec.max_new_tokens, eos_ids=eos,
                   pad_id=getattr(tokenizer, "pad_id", 0) or 0, return_topk=return_topk,
                   mesh=mesh, rules=rules)


def _mesh(ctx: RunContext) -> mesh_lib.TrainMesh:
    return ctx.mesh if ctx.mesh is not None else mesh_lib.single_device_mesh()


def _separate_teacher(ctx: RunContext) -> TeacherSpec:
    tm = _mesh(ctx)
    rules = mesh_lib.rules_key(tm.teacher_rules) if tm.teacher_rules != tm.rules else None
    return TeacherSpec("separate", ctx.models.teacher.config, rules=rules)


def _teacher_for(ctx: RunContext, kind: str, teacher_mode: str, trainable):
    if kind == "cold_start":
        return TeacherSpec("none"), None
    if kind == "opd":
        return _separate_teacher(ctx), ctx.models.teacher.params
    mode = _TEACHER_MODES[teacher_mode]
    return TeacherSpec(mode), (jax.tree.map(lambda x: x.copy(), trainable)
                               if mode == "student_fixed" else None)


def run_train_stage(ctx: RunContext, index: int, trainable) -> Any:
    """Run (or resume) train stage ``index``; returns the student's trainable tree at its end."""
    cfg, m = ctx.cfg, ctx.models
    stage = cfg.resolve_stage(index)
    kind, lspec, sspec, dspec = stage.kind, stage.loss, stage.sampler, stage.data
    teacher, teacher_args = _teacher_for(ctx, kind, stage.teacher_mode, trainable)
    optimizer = make_optimizer(stage.optim, stage.steps)
    tm = _mesh(ctx)
    n_samples = stage.num_teacher_samples if kind == "cold_start" else sspec.n_samples
    tm.check_rows(stage.batch_prompts * n_samples, stage.optim.grad_accum_steps,
                  f"stage {stage.name!r}'s batch (batch_prompts x n_samples)")
    init_fn = functools.partial(init_state, optimizer=optimizer, seed=cfg.seed + index,
                                with_ema=(kind == "opsd" and stage.teacher_mode == "ema"))
    abstract, shardings = tm.train_shardings(m.student, trainable, m.frozen, teacher,
                                             teacher_args, init_fn)
    it = make_prompt_iterator(make_prompt_dataset(ctx.train_records,
                                                  batch_size=mesh_lib.per_process_batch(
                                                      stage.batch_prompts),
                                                  seed=cfg.seed + index, num_epochs=None,
                                                  source=dspec.name or dspec.path))
    ck = StageCheckpointer(stage_dir(cfg.run_dir, stage.name), keep_last_n=cfg.checkpoint.keep_last_n,
                           every_n_steps=cfg.checkpoint.every_n_steps,
                           async_save=cfg.checkpoint.async_save)
    start = 0
    restored = ck.restore_latest(abstract)
    if restored is not None:
        state, start = restored.state, restored.step
        it.set_state(restored.extra["data"])
        if restored.extra.get("done"):
            ck.close()
            return state.trainable
    else:
        state = tm.init_state(init_fn, trainable, shardings["state"])
    ctx.log.truncate(stage.name, start)

    chunk_fn = sft_chunk_fn if kind == "cold_start" else make_chunk_fn(lspec)
    step_fn = make_train_step(student=m.student, teacher=teacher, optimizer=optimizer,
                              chunk_fn=chunk_fn, reduction=getattr(losses, lspec.reduction),
                              chunk_size=lspec.chunk_size,
                              grad_accum=stage.optim.grad_accum_steps,
                              ema_decay=stage.ema_decay if stage.teacher_mode == "ema" else None,
                              shardings=shardings)
    tok = m.tokenizer
    student_sampler = make_sampler(m.student.config, sspec, tok, mesh=tm.mesh, rules=tm.rules)
    teacher_sampler = (make_sampler(m.teacher.config, sspec, tok, mesh=tm.mesh,
                                    rules=tm.teacher_rules) if kind != "opsd" else student_sampler)
    fault = int(os.environ.get(FAULT_ENV, "-1"))
    bar = tqdm(total=stage.steps, initial=start, desc=f"{stage.name}",
               disable=not ctx.progress or not mesh_lib.is_primary(), dynamic_ncols=True)
    with graceful_stop() as stop:
        for step in range(start, stage.steps):
            t0 = time.perf_counter()
            records = mesh_lib.gather_records(next(it))  # the global batch on every process
            key = rollout.rollout_key(cfg.seed, index, step)
            prompts = rollout.encode_prompts(records, tok, ctx.template,
                                             max_prompt_len=dspec.max_prompt_len,
                                             n_samples=n_samples,
                                             privileged_teacher=(kind == "opsd"),
                                             pad_id=rollout.pad_id_of(tok))
            on_policy = kind != "cold_start" and (
                lspec.lambda_on_policy >= 1.0 or
                float(jax.random.uniform(jax.random.fold_in(key, 1))) < lspec.lambda_on_policy)
            extra_metrics: dict[str, Any] = {"on_policy": on_policy}
            s_params, s_lora = m.student.params_and_lora(state.trainable, m.frozen)
            if on_policy:
                out = tm.sample(student_sampler, s_params, prompts, key, lora=s_lora)
            elif kind == "opsd":  # seq-KD from the privileged teacher (the student's weights)
                tw = state.trainable if stage.teacher_mode == "live" else (
                    state.ema if stage.teacher_mode == "ema" else teacher_args)
                tp, tl = m.student.params_and_lora(tw, m.frozen)
                out = tm.sample(teacher_sampler, tp, prompts, key, lora=tl,
                                from_teacher_prompt=True)
            else:
                out = tm.sample(teacher_sampler, m.teacher.params, prompts, key)
            keep = None
            if kind == "cold_start":
                texts = rollout.decode_rows(tok, out.tokens, out.mask)
                keep, counts = rollout.filter_rows(texts, stage.filters)
                extra_metrics.update({f"filter_{k}": v for k, v in counts.items()})
            batch = tm.place(rollout.assemble(prompts, out.tokens, out.mask, out.logprobs_full,
                                              keep), shardings["batch"])
            jax.block_until_ready(batch)
            t1 = time.perf_counter()
            with tm.scope():
                state, metrics = step_fn(state, batch, m.frozen, teacher_args)
            metrics = mesh_lib.to_host(metrics)
            scalars = to_python(jax.device_get(metrics["scalars"]))
            t2 = time.perf_counter()
            gen_tokens = int(np.asarray(out.mask).sum())
            record = {"stage": stage.name, "kind": kind, "step": step + 1, **scalars,
                      **extra_metrics, "gen_tokens": gen_tokens, "gen_s": t1 - t0,
                      "train_s": t2 - t1, "tokens_per_s": gen_tokens / max(t2 - t0, 1e-9),
                      "curves": to_python(jax.device_get(metrics["curves"]))}
            ctx.log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                            overlap=f"{scalars.get('overlap', float('nan')):.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            done = step + 1 == stage.steps
            ck.save(step + 1, state, {"data": it.get_state()}, done=done)
            if fault == step + 1 + sum(cfg.stages[j].steps for j in range(index)):
                os.kill(os.getpid(), signal.SIGKILL)
            if stop.requested and not done:
                ck.save(step + 1, state, {"data": it.get_state()}, force=True)
                ck.wait()
                bar.close()
                raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    bar.close()
    ck.wait()
    ck.close()
    return state.trainable


def run_eval_stage(ctx: RunContext, index: int, trainable, *, name: str | None = None,
                   with_teacher: bool = True) -> dict:
    """Evaluate the student (and, ``with_teacher``, the teacher) on held-out prompts; the result
    is stored as a JSON-only checkpoint so a resumed run does not evaluate twice."""
    cfg, m = ctx.cfg, ctx.models
    stage = cfg.resolve_stage(index)
    name = name or stage.name
    ck = StageCheckpointer(stage_dir(cfg.run_dir, name), keep_last_n=1, async_save=False)
    if ck.is_done():
        result = ck.restore_latest(None).extra["result"]
        ck.close()
        return result
    records = ctx.heldout_records[:stage.n_prompts]
    if not records:
        raise ValueError("the eval stage has no held-out prompts: set data.heldout_size > 0")
    sspec = stage.sampler
    greedy = sspec.temperature == 0.0
    tok = m.tokenizer
    tm = _mesh(ctx)
    s_sampler = make_sampler(m.student.config, sspec, tok, greedy=greedy, mesh=tm.mesh,
                             rules=tm.rules)
    t_sampler = make_sampler(m.teacher.config, sspec, tok, greedy=True, mesh=tm.mesh,
                             rules=tm.teacher_rules) if with_teacher else None
    with tm.scope():
        result = evaluate_student(
            records=records, tokenizer=tok, template=ctx.template,
            max_prompt_len=stage.data.max_prompt_len, student=m.student,
            teacher=_separate_teacher(ctx), trainable=trainable, frozen=m.frozen,
            teacher_args=m.teacher.params, student_sampler=s_sampler, teacher_sampler=t_sampler,
            ks=stage.ks, batch_prompts=stage.batch_prompts,
            key=jax.random.fold_in(jax.random.key(cfg.seed), 10_000 + index),
            chunk_size=stage.loss.chunk_size, teacher_params_for_sampling=m.teacher.params,
            pad_id=rollout.pad_id_of(tok), sample=tm.sample, place=tm.place_rows)
    ctx.log.write({"stage": name, "kind": "eval", "step": 0,
                   **{k: v for k, v in result.items() if k != "samples"}})
    ck.save(0, None, {"result": result}, done=True)
    ck.wait()
    ck.close()
    return result
