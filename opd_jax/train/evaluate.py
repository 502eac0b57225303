"""Held-out evaluation: accuracy (Avg@k / pass@k) and the two KLs DESIGN.md asks for together.

* on-policy reverse KL: KL(S‖T) over the full vocabulary at the positions of the student's own
  samples (what OPD minimises);
* forward KL on teacher samples: KL(T‖S) at the positions of the teacher's greedy answers. On
  degenerate text the teacher also predicts the repetition, so reverse KL on the student's
  samples alone can look good while the student is broken; this one cannot.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax

from opd_jax import losses
from opd_jax.config.schema import LossSpec
from opd_jax.eval import evaluate
from opd_jax.train import rollout
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec, loss_and_metrics

SUMMARY_KEYS = ("overlap", "student_shared_mass", "teacher_shared_mass", "student_entropy",
                "teacher_entropy")


def full_vocab_scorer(student: StudentSpec, teacher: TeacherSpec, objective: str,
                     chunk_size: int, metrics_k: int = 16) -> Callable:
    """``fn(trainable, frozen, teacher_args, batch) -> (loss, per-token outputs)``, not jitted:
    the trainer's chunked ``loss_and_metrics`` with the full-vocabulary ``objective`` (token
    mean) and the mechanism metrics at top-``metrics_k``."""
    chunk_fn = make_chunk_fn(LossSpec(objective=objective, top_k=None), metrics_k=metrics_k)
    return functools.partial(loss_and_metrics, student=student, teacher=teacher,
                             chunk_fn=chunk_fn, reduction=losses.token_mean, chunk_size=chunk_size)


@functools.lru_cache(maxsize=8)
def _scorer(student: StudentSpec, teacher: TeacherSpec, objective: str, chunk_size: int):
    return jax.jit(full_vocab_scorer(student, teacher, objective, chunk_size))


def score_rollouts(student: StudentSpec, teacher: TeacherSpec, trainable, frozen, teacher_args,
                   batch, objective: str, chunk_size: int = 512) -> dict[str, float]:
    """Token-mean full-vocabulary ``objective`` plus mechanism metrics on given rollouts."""
    loss, outs = _scorer(student, teacher, objective, chunk_size)(trainable, frozen, teacher_args,
                                                                  batch)
    out = {objective: float(loss), "tokens": int(batch.mask.sum())}
    for k in SUMMARY_KEYS:
        out[k] = float(losses.token_mean(outs[k], batch.mask))
    return out


def _weighted(parts: list[dict]) -> dict[str, float]:
    total = sum(p["tokens"] for p in parts) or 1
    keys = [k for k in parts[0] if k != "tokens"]
    return {k: sum(p[k] * p["tokens"] for p in parts) / total for k in keys}


def evaluate_student(*, records: Sequence[dict], tokenizer, template, max_prompt_len: int,
                     student: StudentSpec, teacher: TeacherSpec, trainable, frozen, teacher_args,
                     student_sampler, teacher_sampler=None, ks: Sequence[int] = (1,),
                     batch_prompts: int = 8, key: jax.Array, chunk_size: int = 512,
                     privileged_teacher: bool = False, teacher_params_for_sampling=None,
                     pad_id: int = 0, sample: Callable = rollout.sample,
                     place: Callable = lambda x: x) -> dict[str, Any]:
    """Accuracy of the student on ``records`` and its held-out KLs to the teacher.

    With ``teacher_sampler`` the teacher's greedy answers are also graded (``teacher_*`` keys) and
    the forward KL on them is reported. ``sample`` runs a sampler (``rollout.sample``, or
    ``TrainMesh.sample`` on a mesh), ``place`` puts a scoring batch on the mesh.
    """
    n = max(ks)
    s_params, s_lora = student.params_and_lora(trainable, frozen)
    completions: list[list[str]] = []
    teacher_texts: list[list[str]] = []
    rkl_parts, fkl_parts = [], []
    for start in range(0, len(records), batch_prompts):
        recs = list(records[start:start + batch_prompts])
        ro = rollout.sample_student_and_teacher(
            recs, tokenizer, template, max_prompt_len=max_prompt_len, n_samples=n,
            key=jax.random.fold_in(key, start), student_sampler=student_sampler,
            student_params=s_params, student_lora=s_lora, teacher_sampler=teacher_sampler,
            teacher_params=teacher_params_for_sampling, privileged_teacher=privileged_teacher,
            pad_id=pad_id, sample_fn=sample)
        completions += [ro.student_texts[i * n:(i + 1) * n] for i in range(len(recs))]
        rkl_parts.append(score_rollouts(student, teacher, trainable, frozen, teacher_args,
                                        place(ro.student), "reverse_kl", chunk_size))
        if teacher_sampler is not None:
            teacher_texts += [[t] for t in ro.teacher_texts]
            fkl_parts.append(score_rollouts(student, teacher, trainable, frozen, teacher_args,
                                            place(ro.teacher), "forward_kl", chunk_size))
    result = evaluate(list(records), completions, ks=tuple(ks))
    summary = {k: v for k, v in result.items() if k not in ("per_prompt", "per_source")}
    summary["onpolicy_reverse_kl"] = _weighted(rkl_parts)["reverse_kl"]
    summary.update({f"onpolicy_{k}": v for k, v in _weighted(rkl_parts).items()
                    if k != "reverse_kl"})
    summary["samples"] = [{"prompt": r["prompt"], "answer": r.get("answer"), "completion": c[0]}
                          for r, c in list(zip(records, completions))[:5]]
    if teacher_sampler is not None:
        t_result = evaluate(list(records), teacher_texts, ks=(1,))
        summary["teacher_accuracy"] = t_result["accuracy"]
        summary["teacher_samples_forward_kl"] = _weighted(fkl_parts)["forward_kl"]
    return summary
