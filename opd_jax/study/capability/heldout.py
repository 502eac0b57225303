"""Held-out evaluation with per-prompt values, for bootstrap intervals over prompts.

The eval stage (:func:`opd_jax.train.evaluate.evaluate_student`) reports token means over all
prompts; intervals need each prompt's share. This evaluator runs the same pieces (the trainer's
prompt encoding and samplers, :func:`~opd_jax.train.evaluate.full_vocab_scorer` for the
full-vocabulary KLs and the mechanism metrics, :func:`opd_jax.eval.is_correct` for grading) and
keeps, per prompt: ``correct`` (greedy or sampled answer graded), the summed on-policy reverse KL
and its token count (``rkl`` / ``rkl_tokens``), the summed forward KL on the teacher's answer
(``fkl`` / ``fkl_tokens``), and the summed mechanism metrics of the student's rollout. ``means``
holds the token means under the eval stage's names (``onpolicy_reverse_kl``,
``teacher_samples_forward_kl``, ``onpolicy_overlap``, ...).

A teacher's greedy answers to the held-out prompts are computed once per teacher
(:meth:`Evaluator.teacher_answers`: its accuracy before / after post-training) and reused by every
evaluation against that teacher. Every evaluation draws with the same keys (``seed``), so arms
and seeds are compared on the same prompts and the same draws.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from opd_jax.eval import is_correct
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.train import rollout
from opd_jax.train.evaluate import SUMMARY_KEYS, full_vocab_scorer
from opd_jax.train.stage_context import make_sampler
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec

MEANS = {"onpolicy_reverse_kl": ("rkl", "rkl_tokens"),
         "teacher_samples_forward_kl": ("fkl", "fkl_tokens"),
         **{f"onpolicy_{k}": (k, "rkl_tokens") for k in SUMMARY_KEYS}}


@functools.lru_cache(maxsize=8)
def row_scorer(student: StudentSpec, teacher: TeacherSpec, chunk_size: int):
    """Jitted ``fn(trainable, frozen, teacher_params, student_batch, teacher_batch,
    student_hidden=None, teacher_hidden=None) -> {key: [B]}``: per-row sums of the
    full-vocabulary reverse KL and mechanism metrics on the student's rollouts, of the forward KL
    on the teacher's answers, and both rows' token counts. The hidden states (``[B, N, D]``, each
    sampler's on its own rollouts) stand in for that model's forward."""
    rkl = full_vocab_scorer(student, teacher, "reverse_kl", chunk_size)
    fkl = full_vocab_scorer(student, teacher, "forward_kl", chunk_size)
    row_sum = lambda x, mask: jnp.where(mask, x, 0.0).sum(1)

    def fn(trainable, frozen, teacher_params, s_batch, t_batch, s_hidden=None, t_hidden=None):
        _, s = rkl(trainable, frozen, teacher_params, s_batch, student_hidden=s_hidden)
        _, t = fkl(trainable, frozen, teacher_params, t_batch, teacher_hidden=t_hidden)
        out = {"rkl": row_sum(s["loss"], s_batch.mask),
               "rkl_tokens": s_batch.mask.sum(1).astype(jnp.float32),
               "fkl": row_sum(t["loss"], t_batch.mask),
               "fkl_tokens": t_batch.mask.sum(1).astype(jnp.float32)}
        out.update({k: row_sum(s[k], s_batch.mask) for k in SUMMARY_KEYS})
        return out

    return jax.jit(fn)


@dataclasses.dataclass
class TeacherAnswers:
    """One teacher's greedy answers to the evaluator's prompts: the assembled rollout batch of
    each evaluation batch, the texts, per-prompt correctness and each batch's teacher hidden
    states at its answers' positions (``[B, N, D]``: the scorer runs no teacher forward on them)."""

    batches: list
    texts: list[str]
    correct: list[float]
    hidden: list


def token_means(per_prompt: dict[str, list[float]]) -> dict[str, float | None]:
    """The eval stage's token means (and ``accuracy``) of per-prompt sums.

    >>> token_means({"correct": [1, 0], "rkl": [2., 4.], "rkl_tokens": [1., 3.]})["accuracy"]
    0.5
    """
    out: dict[str, float | None] = {"accuracy": float(np.mean(per_prompt["correct"]))}
    for name, (num, den) in MEANS.items():
        if num in per_prompt and den in per_prompt:
            total = float(np.sum(per_prompt[den]))
            out[name] = float(np.sum(per_prompt[num]) / total) if total > 0 else None
    return out


class Evaluator:
    """Evaluates students and teachers on ``records`` (held-out prompts) in batches of
    ``batch_prompts`` (a short last batch is padded with copies and the copies dropped).

    ``sampler_spec``: the run's sampler section (``max_new_tokens``, EOS handling); students
    sample at ``temperature`` (0 = greedy), teachers answer greedily. ``chunk_size``: the
    scorer's token chunk. ``seed`` fixes every draw. ``progress``: a bar per evaluation."""

    def __init__(self, records: list[dict], tokenizer, template, *, max_prompt_len: int,
                 batch_prompts: int, chunk_size: int, sampler_spec, temperature: float,
                 seed: int, progress: bool = False):
        self.records, self.tok, self.template = list(records), tokenizer, template
        self.max_prompt_len, self.batch_prompts = max_prompt_len, batch_prompts
        self.chunk_size, self.seed, self.progress = chunk_size, seed, progress
        self.sampler_spec = dataclasses.replace(sampler_spec, temperature=temperature,
                                                n_samples=1)
        self.greedy = temperature == 0.0
        self.pad = pad_id_of(tokenizer)
        self._samplers: dict[tuple, Any] = {}
        self._answers: dict[str, TeacherAnswers] = {}

    def _sampler(self, config, greedy: bool):
        key = (config, greedy)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(config, self.sampler_spec, self.tok, greedy=greedy,
                                               return_hidden=True)
        return self._samplers[key]

    def _batches(self, n: int) -> list[tuple[list[dict], int]]:
        """``(records padded to batch_prompts, real count)`` of the first ``n`` prompts."""
        out: list[tuple[list[dict], int]] = []
        for start in range(0, n, self.batch_prompts):
            real = self.records[start:min(start + self.batch_prompts, n)]
            out.append((real + [real[-1]] * (self.batch_prompts - len(real)), len(real)))
        return out

    def _bar(self, batches: list, what: str):
        return tqdm(batches, desc=f"eval: {what}", disable=not self.progress, dynamic_ncols=True,
                    leave=False)

    def _encode(self, recs: list[dict]) -> rollout.Prompts:
        return rollout.encode_prompts(recs, self.tok, self.template,
                                      max_prompt_len=self.max_prompt_len, pad_id=self.pad)

    def teacher_answers(self, name: str, teacher, n: int | None = None) -> TeacherAnswers:
        """Greedy answers of ``teacher`` (a :class:`~opd_jax.model.loading.Model`) to the first
        ``n`` prompts (default all), computed once per ``name``; a later call for fewer prompts
        returns the cached answers (batches line up: the count must be a multiple of
        ``batch_prompts``)."""
        n = len(self.records) if n is None else n
        cached = self._answers.get(name)
        if cached is not None and len(cached.texts) >= n:
            return cached
        sampler = self._sampler(teacher.config, True)
        batches, texts, correct, hidden = [], [], [], []
        for b, (recs, real) in enumerate(self._bar(self._batches(n), f"teacher {name}")):
            prompts = self._encode(recs)
            out = rollout.sample(sampler, teacher.params, prompts,
                                 jax.random.fold_in(jax.random.key(self.seed), 2 * b + 1))
            batches.append(rollout.assemble(prompts, out.tokens, out.mask, out.logprobs_full))
            hidden.append(rollout.sampled_hidden(out, batches[-1]))
            got = rollout.decode_rows(self.tok, out.tokens, out.mask)[:real]
            texts += got
            correct += [float(is_correct(r, t)) for r, t in zip(recs, got)]
        self._answers[name] = TeacherAnswers(batches, texts, correct, hidden)
        return self._answers[name]

    def student(self, student: StudentSpec, trainable, frozen, teacher_name: str, teacher,
                n: int) -> dict[str, Any]:
        """The student (``trainable`` over ``frozen``) on the first ``n`` prompts against the
        teacher ``teacher_name`` (whose answers are computed first if needed): ``{"per_prompt":
        {key: [n]}, "means": {...}, "samples": [first three prompt / completion pairs]}``."""
        answers = self.teacher_answers(teacher_name, teacher, n)
        fn = row_scorer(student, TeacherSpec("separate", teacher.config), self.chunk_size)
        sampler = self._sampler(student.config, self.greedy)
        s_params, s_lora = student.params_and_lora(trainable, frozen)
        per: dict[str, list[float]] = {"correct": []}
        samples = []
        for b, (recs, real) in enumerate(self._bar(self._batches(n), "student")):
            prompts = self._encode(recs)
            out = rollout.sample(sampler, s_params, prompts,
                                 jax.random.fold_in(jax.random.key(self.seed), 2 * b),
                                 lora=s_lora)
            batch = rollout.assemble(prompts, out.tokens, out.mask, out.logprobs_full)
            texts = rollout.decode_rows(self.tok, out.tokens, out.mask)[:real]
            vals = jax.device_get(fn(trainable, frozen, teacher.params, batch,
                                     answers.batches[b], rollout.sampled_hidden(out, batch),
                                     answers.hidden[b]))
            for k, v in vals.items():
                per.setdefault(k, []).extend(float(x) for x in np.asarray(v)[:real])
            per["correct"] += [float(is_correct(r, t)) for r, t in zip(recs, texts)]
            samples += [{"prompt": r["prompt"], "answer": r.get("answer"), "completion": t}
                        for r, t in zip(recs[:real], texts)][:3 - len(samples)]
        return {"per_prompt": per, "means": token_means(per), "samples": samples}
