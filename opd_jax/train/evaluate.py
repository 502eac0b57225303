"""Held-out evaluation: accuracy (Avg@k / pass@k) and the two KLs DESIGN.md asks for together.

* on-policy reverse KL: KL(S‖T) over the full vocabulary at the positions of the student's own
  samples (what OPD minimises);
* forward KL on teacher samples: KL(T‖S) at the positions of the teacher's greedy answers. On
  degenerate text the teacher also predicts the repetition, so reverse KL on the student's
  samples alone can look good while the student is broken; this one cannot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax

from opd_jax import losses
from opd_jax.compile_options import jit_compiler_options
from opd_jax.config.loss import LossSpec
from opd_jax.data import PromptTemplate
from opd_jax.eval import evaluate
from opd_jax.metrics import intersection_means
from opd_jax.train import rollout
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec, loss_and_metrics

SUMMARY_KEYS = ("overlap", "topk_intersects", "student_shared_mass", "teacher_shared_mass",
                "student_entropy", "teacher_entropy")


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
    return jax.jit(full_vocab_scorer(student, teacher, objective, chunk_size),
                   compiler_options=jit_compiler_options("memory"))


def score_rollouts(student: StudentSpec, teacher: TeacherSpec, trainable, frozen, teacher_args,
                   batch, objective: str, chunk_size: int = 512, *, student_hidden=None,
                   teacher_hidden=None) -> dict[str, float]:
    """Token-mean full-vocabulary ``objective`` plus mechanism metrics on given rollouts.
    ``student_hidden`` / ``teacher_hidden`` (``[B, N, D]``, placed like the batch): a model's
    hidden states at the completion positions when known (its sampler's ``return_hidden`` on
    its own samples); that model's forward is then skipped."""
    fn = _scorer(student, teacher, objective, chunk_size)
    loss, outs = fn(trainable, frozen, teacher_args, batch, student_hidden=student_hidden,
                    teacher_hidden=teacher_hidden)
    out = {objective: float(loss), "tokens": int(batch.mask.sum())}
    for k in SUMMARY_KEYS:
        out[k] = float(losses.token_mean(outs[k], batch.mask))
    return out


def _weighted(parts: list[dict]) -> dict[str, float]:
    total = sum(p["tokens"] for p in parts) or 1
    keys = [k for k in parts[0] if k != "tokens"]
    means = {k: sum(p[k] * p["tokens"] for p in parts) / total for k in keys}
    return {**means, **{k: float(v) for k, v in intersection_means(means).items()}}


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSettings:
    """How held-out evaluation encodes, batches and scores prompts (built once per eval stage).

    ``place`` puts a scoring batch on the mesh (``TrainMesh.place_rows``; identity on one
    device). ``pack`` (``RolloutBatch -> RolloutBatch``, e.g. :func:`~opd_jax.train.rollout.
    pack_batch` with the stage's settings): the scorer runs on packed rows (several sequences per
    row, as the train step does) instead of one padded row per sequence; ``None`` scores the
    padded rows. Both give the same figures up to float32 rounding."""

    tokenizer: Any
    template: PromptTemplate
    max_prompt_len: int
    ks: tuple[int, ...] = (1,)
    batch_prompts: int = 8
    chunk_size: int = 512
    privileged_teacher: bool = False
    pad_id: int = 0
    place: Callable = lambda x: x
    pack: Callable | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class EvalModels:
    """The student and teacher evaluation samples from and scores with (``teacher_args``: the
    teacher's weights as the scorer takes them; ``teacher_params``: as the teacher sampler takes
    them). Without ``teacher_sampler`` the teacher only scores the student's samples.
    ``teacher_memo``: a dict kept across the evaluations of one run (its teacher and greedy
    teacher sampler): the teacher's answers to prompts it has answered before are reused
    (:func:`~opd_jax.train.rollout.sample_student_and_teacher`)."""

    student: StudentSpec
    teacher: TeacherSpec
    frozen: Any
    teacher_args: Any
    student_sampler: Any
    teacher_sampler: Any = None
    teacher_params: Any = None
    teacher_memo: dict | None = None


def evaluate_student(records: Sequence[dict], trainable, key: jax.Array, settings: EvalSettings,
                     models: EvalModels) -> dict[str, Any]:
    """Accuracy of the student (its ``trainable`` tree) on ``records`` and its held-out KLs to
    the teacher.

    With ``models.teacher_sampler`` the teacher's greedy answers are also graded (``teacher_*``
    keys) and the forward KL on them is reported.
    """
    st, m = settings, models
    ks, batch_prompts, chunk_size = st.ks, st.batch_prompts, st.chunk_size
    place = st.place if st.pack is None else (lambda batch: st.place(st.pack(batch)))
    hidden_of = lambda h: None if h is None else st.place(h)  # noqa: E731
    student, teacher, frozen, teacher_args = m.student, m.teacher, m.frozen, m.teacher_args
    teacher_sampler = m.teacher_sampler
    n = max(ks)
    s_params, s_lora = student.params_and_lora(trainable, frozen)
    completions: list[list[str]] = []
    teacher_texts: list[list[str]] = []
    rkl_parts, fkl_parts = [], []
    for start in range(0, len(records), batch_prompts):
        recs = list(records[start:start + batch_prompts])
        ro = rollout.sample_student_and_teacher(
            recs, st.tokenizer, st.template, max_prompt_len=st.max_prompt_len, n_samples=n,
            key=jax.random.fold_in(key, start), student_sampler=m.student_sampler,
            student_params=s_params, student_lora=s_lora, teacher_sampler=teacher_sampler,
            teacher_params=m.teacher_params, privileged_teacher=st.privileged_teacher,
            pad_id=st.pad_id, teacher_memo=m.teacher_memo)
        completions += [ro.student_texts[i * n:(i + 1) * n] for i in range(len(recs))]
        # each model's own samples: the hidden states its sampler recorded stand in for its
        # forward (half the scoring's matmuls)
        rkl_parts.append(score_rollouts(student, teacher, trainable, frozen, teacher_args,
                                        place(ro.student), "reverse_kl", chunk_size,
                                        student_hidden=hidden_of(ro.student_hidden)))
        if teacher_sampler is not None:
            teacher_texts += [[t] for t in ro.teacher_texts]
            fkl_parts.append(score_rollouts(student, teacher, trainable, frozen, teacher_args,
                                            place(ro.teacher), "forward_kl", chunk_size,
                                            teacher_hidden=hidden_of(ro.teacher_hidden)))
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
