"""The ``study:`` section (:class:`StudyConfig`), the ``--small`` settings and the loader of a
study config (run config + ``study:`` + ``select:``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from opd_jax.config.core import load_yaml
from opd_jax.config.run import RunConfig
from opd_jax.config.schema import DeriveSpec, FilterSpec, ModelSpec, need, need_positive
from opd_jax.config.sections import split_sections
from opd_jax.select_prompts.config import SelectConfig

if TYPE_CHECKING:
    from opd_jax.study.capability.config import CapabilityConfig

ARMS = ("compatible", "incompatible", "cold_start", "aligned", "random")


@dataclasses.dataclass(frozen=True)
class FindingRules:
    """Thresholds of the verdicts (see :func:`opd_jax.study.findings.judge`)."""

    rkl_drop: float = 0.3
    stall_drop: float = 0.3
    rescue_ratio: float = 0.5
    aligned_margin: float = 0.05


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The ``study:`` section. ``arms``: subset of ``ARMS``. ``opd_steps`` per arm in stages of
    ``eval_every``; ``eval_prompts`` held-out prompts per eval (``eval_temperature`` 0 = greedy);
    ``batch_prompts`` prompts per step; cold start: ``cold_start_steps`` SFT steps on teacher
    rollouts kept by ``cold_start_filters`` (``cold_start_lr`` null = run-level lr); arm 4:
    ``aligned_prompts`` prompts for ``aligned_student``. ``compilation_cache``: JAX persistent
    compilation cache directory (null = off): later stages reuse the compiled step.
    ``keep_checkpoints`` false deletes an arm's train-stage checkpoints once the arm is done."""

    out_dir: str = "runs/{name}"
    arms: tuple[str, ...] = ARMS
    incompatible_student: ModelSpec = ModelSpec(derive=DeriveSpec(keep_every=3))
    opd_steps: int = 20
    eval_every: int = 5
    eval_prompts: int = 16
    eval_temperature: float = 0.0
    batch_prompts: int = 8
    cold_start_steps: int = 40
    cold_start_lr: Optional[float] = None
    cold_start_filters: FilterSpec = FilterSpec(answer_format="any_number")
    aligned_prompts: int = 16
    aligned_student: Literal["compatible", "incompatible"] = "compatible"
    compilation_cache: Optional[str] = "~/.cache/opd_jax/xla"
    keep_checkpoints: bool = False
    rules: FindingRules = FindingRules()

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        need(not bad and len(self.arms) > 0, "arms", list(self.arms), f"a subset of {list(ARMS)}")
        need_positive(self, "opd_steps", "eval_every", "eval_prompts", "batch_prompts",
                      "aligned_prompts", "cold_start_steps")


SMALL = {  # --small: tiny random models, a few steps; the whole pipeline in seconds
    "teacher": {"source": "random", "derive": {"random_init": True, "n_layers": 2, "d_model": 64,
                                               "ffn_dim": 128, "n_heads": 4, "n_kv_heads": 2,
                                               "head_dim": 16}},
    "student": {"source": "random", "derive": {"random_init": True, "n_layers": 2, "d_model": 32,
                                               "ffn_dim": 64, "n_heads": 2, "n_kv_heads": 1,
                                               "head_dim": 16}},
    "study.incompatible_student": {"source": "random", "derive": {
        "random_init": True, "n_layers": 1, "d_model": 32, "ffn_dim": 64, "n_heads": 2,
        "n_kv_heads": 1, "head_dim": 16}},
    "data.size": 24, "data.heldout_size": 4, "data.max_prompt_len": 256,
    "sampler.max_new_tokens": 6, "sampler.n_samples": 1, "loss.chunk_size": 16,
    "optim.lr": 1.0e-3,
    "checkpoint": {"every_n_steps": 0, "keep_last_n": 1, "async_save": False},
    "study.opd_steps": 2, "study.eval_every": 1, "study.eval_prompts": 2, "study.batch_prompts": 2,
    "study.cold_start_steps": 1, "study.aligned_prompts": 2, "study.out_dir": "runs/{name}_small",
    "select.pool_size": 8, "select.batch_prompts": 4, "select.chunk_size": 16,
    "select.metrics_k": 4, "select.rule.teacher_correct": False,
    "select.rule.min_teacher_logprob": None,
}


def _set(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def load_study_config(path: str | Path, overrides: Sequence[str] = (), *, small: bool = False
                      ) -> tuple[RunConfig, StudyConfig | CapabilityConfig, SelectConfig | None]:
    """The run config and the ``study:`` / ``select:`` sections (``small`` applies ``SMALL``
    before the overrides). A config with ``study.kind: capability`` is a capability study
    (:func:`opd_jax.study.capability.load_capability_config`): its ``study:`` is a
    :class:`~opd_jax.study.capability.CapabilityConfig` and the third item is None."""
    from opd_jax.study.capability.config import is_capability, load_capability_config

    raw = load_yaml(path)
    if is_capability(raw, overrides):
        return (*load_capability_config(path, overrides, small=small), None)
    if small:
        for k, v in SMALL.items():
            _set(raw, k, json.loads(json.dumps(v)))
    cfg, (study, sel) = split_sections(raw, overrides, {"study": StudyConfig,
                                                        "select": SelectConfig}, where=str(path))
    return cfg, study, sel
