"""The ``select:`` section (:class:`SelectConfig`), the signal names and the prompt statuses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional, Sequence

from opd_jax.config.core import load_yaml
from opd_jax.config.run import RunConfig
from opd_jax.config.schema import need, need_positive
from opd_jax.config.sections import split_sections

SIGNALS = {
    "reverse_kl": "KL(S||T), full vocabulary, on the student's samples",
    "overlap": "top-k overlap |S ∩ T| / k on the student's samples",
    "student_shared_mass": "student mass on the shared top-k",
    "teacher_shared_mass": "teacher mass on the shared top-k",
    "student_entropy": "student entropy on its samples",
    "teacher_entropy": "teacher entropy on the student's samples",
    "teacher_logprob": "teacher mean log-prob of its own greedy answer",
    "teacher_answer_entropy": "teacher mean entropy along its greedy answer",
    "forward_kl_teacher": "KL(T||S) on the teacher's greedy answer",
    "teacher_correct": "teacher greedy answer correct (1/0; none if uncheckable)",
    "student_accuracy": "fraction of the student's samples correct",
    "student_len": "student completion tokens",
    "teacher_len": "teacher completion tokens",
    "heldout_similarity": "max cosine similarity to a held-out prompt",
}
STATUSES = ("exact_dup", "near_dup", "uncheckable", "teacher_incorrect", "teacher_unconfident",
            "below_cutoff", "selected")


@dataclasses.dataclass(frozen=True)
class DedupSpec:
    """De-duplication against held-out prompts. ``exact``: normalised-text equality. ``near``:
    cosine of mean-pooled teacher hidden states >= ``threshold`` (``embed``: "problem" or
    "prompt", see :mod:`opd_jax.select_prompts`; ``center``: subtract the mean embedding first).
    Held-out prompts: the run's held-out split (``include_run_heldout``) plus the jsonl
    ``heldout_path`` (field ``heldout_prompt_key``)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.95
    embed: Literal["problem", "prompt"] = "problem"
    heldout_path: Optional[str] = None
    heldout_prompt_key: str = "prompt"
    include_run_heldout: bool = True
    center: bool = True

    def validate(self) -> None:
        need(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "a cosine in [-1, 1]")


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """Which scored prompts are kept, in order: drop uncheckable ones (``uncheckable: drop``),
    those the teacher gets wrong (``teacher_correct``), those where it is unconfident
    (``min_teacher_logprob`` / ``max_teacher_entropy``, null = off); rank the rest by ``rank_by``
    (a signal name, "score" = ``sum_k weights[k] * zscore(signal_k)``, or "random"), ``descending``
    or not, and keep the first ``top_n`` or ``fraction`` of them (neither = all)."""

    teacher_correct: bool = True
    uncheckable: Literal["keep", "drop"] = "keep"
    min_teacher_logprob: Optional[float] = None
    max_teacher_entropy: Optional[float] = None
    rank_by: str = "reverse_kl"
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    descending: bool = True
    top_n: Optional[int] = None
    fraction: Optional[float] = None

    def validate(self) -> None:
        need(self.rank_by in (*SIGNALS, "score", "random"), "rank_by", self.rank_by,
             f"a signal ({', '.join(SIGNALS)}), 'score' or 'random'")
        bad = [k for k in self.weights if k not in SIGNALS]
        need(not bad, "weights", dict(self.weights), f"signal names only (unknown: {bad})")
        need(self.rank_by != "score" or bool(self.weights), "weights", dict(self.weights),
             "a non-empty {signal: weight} mapping for rank_by: score")
        need_positive(self, "top_n", optional=True)
        need(self.fraction is None or 0 < self.fraction <= 1, "fraction", self.fraction,
             "null or a number in (0, 1]")
        need(self.top_n is None or self.fraction is None, "fraction", self.fraction,
             "null when top_n is set (choose one)")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """The ``select:`` section. ``out_dir`` (``{name}`` = the run name); ``pool_size``: score at
    most this many pool prompts (null = the whole training split of ``data``); ``batch_prompts``
    prompts per batch; ``chunk_size`` token rows per logit chunk; ``metrics_k`` top-k of the
    overlap / shared-mass metrics."""

    out_dir: str = "runs/{name}/select"
    pool_size: Optional[int] = None
    batch_prompts: int = 8
    chunk_size: int = 256
    metrics_k: int = 16
    dedup: DedupSpec = DedupSpec()
    rule: RuleSpec = RuleSpec()

    def validate(self) -> None:
        need_positive(self, "pool_size", optional=True)
        need_positive(self, "batch_prompts", "chunk_size", "metrics_k")


def split_config(raw: dict, overrides: Sequence[str] = (), *, where: str = "config"
                 ) -> tuple[RunConfig, SelectConfig]:
    """``(RunConfig, SelectConfig)`` from a raw mapping with a ``select:`` section."""
    cfg, (sel,) = split_sections(raw, overrides, {"select": SelectConfig}, where=where)
    return cfg, sel


def load_select_config(path: str | Path, overrides: Sequence[str] = ()
                       ) -> tuple[RunConfig, SelectConfig]:
    """The run config and the ``select:`` section of a YAML file, with overrides applied (a
    ``study:`` section, see :mod:`opd_jax.study`, is ignored)."""
    raw = load_yaml(path)
    raw.pop("study", None)
    return split_config(raw, overrides, where=str(path))
