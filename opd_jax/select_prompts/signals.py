"""The per-prompt signals of a pool: student rollouts and teacher greedy answers, batch by batch,
scored by the trainer's chunked ``loss_and_metrics`` (never ``[B, T, V]`` logits) and graded."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from opd_jax.eval import is_correct, is_reasoning_gym
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.select_prompts.config import SIGNALS
from opd_jax.train import rollout
from opd_jax.train.evaluate import SUMMARY_KEYS, full_vocab_scorer
from opd_jax.train.stage_context import make_sampler
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec


@functools.lru_cache(maxsize=8)
def make_batch_scorer(student: StudentSpec, teacher: TeacherSpec, n_samples: int,
                      chunk_size: int, metrics_k: int):
    """Jitted ``fn(trainable, frozen, teacher_args, student_batch, teacher_batch, student_hidden=None,
    teacher_hidden=None) -> {signal: [P]}``.

    ``student_batch``: ``P * n_samples`` student rollouts (prompt-major); ``teacher_batch``: ``P``
    teacher greedy answers. Both go through the trainer's chunked ``loss_and_metrics`` (full-vocab
    reverse KL, resp. forward KL, plus mechanism metrics); outputs are per-prompt token means.
    ``student_hidden`` / ``teacher_hidden``: each sampler's hidden states on its own rollouts
    (``return_hidden``), which stand in for that model's forward.
    """
    rkl = full_vocab_scorer(student, teacher, "reverse_kl", chunk_size, metrics_k)
    fkl = full_vocab_scorer(student, teacher, "forward_kl", chunk_size, metrics_k)

    def per_prompt(x_BxN, mask_BxN, n):
        x = jnp.where(mask_BxN, x_BxN, 0.0).reshape(-1, n * x_BxN.shape[1])
        count = mask_BxN.reshape(-1, n * x_BxN.shape[1]).sum(1)
        return x.sum(1) / jnp.maximum(count, 1)

    def fn(trainable, frozen, teacher_args, s_batch, t_batch, s_hidden=None, t_hidden=None):
        _, s = rkl(trainable, frozen, teacher_args, s_batch, student_hidden=s_hidden)
        _, t = fkl(trainable, frozen, teacher_args, t_batch, teacher_hidden=t_hidden)
        sm, tm = s_batch.mask, t_batch.mask
        out = {"reverse_kl": per_prompt(s["loss"], sm, n_samples)}
        # the mechanism metrics that are signals, as held-out evaluation reports them
        for k in (k for k in SUMMARY_KEYS if k in SIGNALS):
            out[k] = per_prompt(s[k], sm, n_samples)
        out["teacher_logprob"] = per_prompt(t["teacher_token_logprob"], tm, 1)
        out["teacher_answer_entropy"] = per_prompt(t["teacher_entropy"], tm, 1)
        out["forward_kl_teacher"] = per_prompt(t["loss"], tm, 1)
        out["student_len"] = sm.sum(1).reshape(-1, n_samples).mean(1).astype(jnp.float32)
        out["teacher_len"] = tm.sum(1).astype(jnp.float32)
        return out

    return jax.jit(fn)


def _checkable(record) -> bool:
    return record.get("answer") is not None or is_reasoning_gym(record)


def score_pool(records, models, template, *, sampler_spec, max_prompt_len: int, seed: int,
               batch_prompts: int, chunk_size: int, metrics_k: int, progress: bool = False
               ) -> list[dict]:
    """Per-prompt signals of ``records`` (streamed in batches); one dict per record, plus the
    teacher's greedy completion under ``"teacher_completion"``."""
    tok, m = models.tokenizer, models
    n = sampler_spec.n_samples
    # both record their hidden states: the scorer runs neither model on its own rollouts
    s_sampler = make_sampler(m.student.config, sampler_spec, tok, return_hidden=True)
    t_sampler = make_sampler(m.teacher.config, sampler_spec, tok, greedy=True, return_hidden=True)
    teacher = TeacherSpec("separate", m.teacher.config)
    fn = make_batch_scorer(m.student, teacher, n, chunk_size, metrics_k)
    s_params, s_lora = m.student.params_and_lora(m.trainable, m.frozen)
    key = jax.random.key(seed)
    out: list[dict] = []
    bar = tqdm(total=len(records), desc="select: scoring", disable=not progress,
               dynamic_ncols=True)
    for b, start in enumerate(range(0, len(records), batch_prompts)):
        real = list(records[start:start + batch_prompts])
        recs = real + [real[-1]] * (batch_prompts - len(real))  # static shapes: no recompile
        ro = rollout.sample_student_and_teacher(
            recs, tok, template, max_prompt_len=max_prompt_len, n_samples=n,
            key=jax.random.fold_in(key, 20_000 + b), student_sampler=s_sampler,
            student_params=s_params, student_lora=s_lora, teacher_sampler=t_sampler,
            teacher_params=m.teacher.params, pad_id=pad_id_of(tok))
        vals = jax.device_get(fn(m.trainable, m.frozen, m.teacher.params, ro.student, ro.teacher,
                                 ro.student_hidden, ro.teacher_hidden))
        s_texts, t_texts = ro.student_texts, ro.teacher_texts
        for i, rec in enumerate(real):
            row = {k: float(v[i]) for k, v in vals.items()}
            if _checkable(rec):
                row["teacher_correct"] = float(is_correct(rec, t_texts[i]))
                row["student_accuracy"] = float(np.mean([is_correct(rec, c)
                                                         for c in s_texts[i * n:(i + 1) * n]]))
            else:
                row["teacher_correct"] = row["student_accuracy"] = None
            row["teacher_completion"] = t_texts[i]
            out.append(row)
        bar.update(len(real))
    bar.close()
    return out
