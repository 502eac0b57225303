"""The ``study:`` section of the capability study (``study.kind: capability``):
:class:`CapabilityConfig` with its teacher post-training, control pool and bootstrap sections,
the ``--small`` settings and the loader.

Imports nothing of :mod:`opd_jax.study` outside this package (``opd_jax.study.config`` dispatches
here when a study config says ``kind: capability``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from opd_jax.align_prompts.config import EmbedderSpec
from opd_jax.config.core import load_yaml
from opd_jax.config.run import RunConfig
from opd_jax.config.schema import DataSpec, DeriveSpec, FilterSpec, ModelSpec, need, need_positive
from opd_jax.config.sections import split_sections

# arm -> (teacher, student, prompt pool, cold start first)
ARM_SPECS = {
    "compatible": ("base", "compatible", "aligned", False),
    "incompatible": ("base", "incompatible", "aligned", False),
    "cold_start": ("base", "incompatible", "aligned", True),
    "post_aligned": ("post", "compatible", "aligned", False),
    "post_control": ("post", "compatible", "control", False),
}
CAPABILITY_ARMS = tuple(ARM_SPECS)


@dataclasses.dataclass(frozen=True)
class TeacherTrainingSpec:
    """How the teacher gets its new capability: ``method`` "sft_verified" = supervised
    fine-tuning on worked solutions written from each training prompt's expression and kept only
    when the task's own grader scores them correct (:mod:`.solutions`). ``prompts``: how many of
    the training prompts (``data.size``) form its post-training data (null = all); ``steps`` SFT
    steps of ``batch_prompts`` examples at ``lr`` (``schedule`` with ``warmup_steps`` and
    ``final_lr_ratio``). ``eval_prompts``: held-out prompts its accuracy is measured on before and
    after (at least ``study.eval_prompts``; the arms use the first ``study.eval_prompts`` of
    them). ``export``: also write the post-trained teacher as a Hugging Face folder
    (``<out_dir>/teacher_hf``); its checkpoint (``<out_dir>/teacher``) is always kept."""

    method: Literal["sft_verified"] = "sft_verified"
    prompts: Optional[int] = None
    steps: int = 48
    batch_prompts: int = 8
    lr: float = 1.0e-4
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 4
    final_lr_ratio: float = 0.1
    eval_prompts: int = 128
    export: bool = True

    def validate(self) -> None:
        need_positive(self, "steps", "batch_prompts", "eval_prompts")
        need_positive(self, "prompts", optional=True)
        need(self.lr > 0, "lr", self.lr, "a positive number")


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """The control pool of arm ``post_control``: prompts of ``data`` (another distribution than
    the teacher's post-training prompts) minus those that match one of them exactly or whose
    embedding cosine to the nearest one is >= ``threshold`` (the paper's dedup, run by
    :func:`opd_jax.align_prompts.align_prompts` with ``embedder``); ``equal_size``: as many
    control prompts as post-training prompts (drawn at random from the de-duplicated pool)."""

    data: DataSpec = DataSpec(name="basic_arithmetic", heldout_size=0, seed=1)
    exact: bool = True
    threshold: float = 0.6
    embedder: EmbedderSpec = EmbedderSpec()
    equal_size: bool = True

    def validate(self) -> None:
        need(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "a cosine in [-1, 1]")


@dataclasses.dataclass(frozen=True)
class BootstrapSpec:
    """Percentile bootstrap intervals at ``level`` from ``samples`` resamples (seeds, then
    held-out prompts within each drawn seed), drawn with ``seed``."""

    samples: int = 2000
    level: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        need(self.samples >= 100, "samples", self.samples, "an integer >= 100")
        need(0.5 < self.level < 1.0, "level", self.level, "a number in (0.5, 1)")


@dataclasses.dataclass(frozen=True)
class CapabilityConfig:
    """``study:`` of the capability study. ``arms``: subset of :data:`CAPABILITY_ARMS`, each run
    once per seed of ``seeds`` (a seed sets the run's rollouts, prompt order and optimizer init;
    the models are built once with the run config's ``seed``). One OPD stage of ``opd_steps``
    steps per run, evaluated on the first ``eval_prompts`` held-out prompts at step 0, every
    ``eval_every`` steps and at the end, from checkpoints of that stage (the optimizer state runs
    on across evaluation points). ``eval_batch_prompts`` prompts per evaluation batch (divides
    ``eval_prompts``), ``eval_temperature`` 0 = greedy; ``batch_prompts`` prompts per OPD step.
    Cold start: ``cold_start_steps`` SFT steps on teacher rollouts kept by ``cold_start_filters``
    (``cold_start_lr`` null = run-level lr). ``compilation_cache``: JAX's persistent compilation
    cache (null = off). ``keep_checkpoints`` false deletes each run's train checkpoints once it is
    evaluated (the post-trained teacher's are always kept)."""

    kind: Literal["capability"] = "capability"
    out_dir: str = "runs/{name}"
    arms: tuple[str, ...] = CAPABILITY_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    incompatible_student: ModelSpec = ModelSpec(derive=DeriveSpec(keep_every=3))
    opd_steps: int = 12
    eval_every: int = 6
    eval_prompts: int = 64
    eval_batch_prompts: int = 16
    eval_temperature: float = 0.0
    batch_prompts: int = 8
    cold_start_steps: int = 20
    cold_start_lr: Optional[float] = None
    cold_start_filters: FilterSpec = FilterSpec(answer_format="any_number")
    teacher_training: TeacherTrainingSpec = TeacherTrainingSpec()
    control: ControlSpec = ControlSpec()
    bootstrap: BootstrapSpec = BootstrapSpec()
    compilation_cache: Optional[str] = "~/.cache/opd_jax/xla"
    keep_checkpoints: bool = False

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARM_SPECS]
        need(not bad and len(self.arms) > 0, "arms", list(self.arms),
             f"a subset of {list(CAPABILITY_ARMS)}")
        need(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
             list(self.seeds), "distinct integers (3 or more for intervals that count seeds)")
        need_positive(self, "opd_steps", "eval_every", "eval_prompts", "eval_batch_prompts",
                      "batch_prompts", "cold_start_steps")
        need(self.eval_prompts % self.eval_batch_prompts == 0, "eval_batch_prompts",
             self.eval_batch_prompts, f"a divisor of eval_prompts ({self.eval_prompts})")
        need(self.teacher_training.eval_prompts >= self.eval_prompts,
             "teacher_training.eval_prompts", self.teacher_training.eval_prompts,
             f">= eval_prompts ({self.eval_prompts}): the arms reuse the teacher's answers")
        need(self.teacher_training.eval_prompts % self.eval_batch_prompts == 0,
             "teacher_training.eval_prompts", self.teacher_training.eval_prompts,
             f"a multiple of eval_batch_prompts ({self.eval_batch_prompts})")
        need(self.eval_temperature >= 0, "eval_temperature", self.eval_temperature, ">= 0")

    def eval_steps(self) -> list[int]:
        """OPD steps with a held-out evaluation: 0, every ``eval_every``, the last.

        >>> CapabilityConfig(opd_steps=7, eval_every=3).eval_steps()
        [0, 3, 6, 7]
        """
        return sorted({*range(0, self.opd_steps, self.eval_every), self.opd_steps})


_TINY = {"random_init": True, "n_layers": 2, "d_model": 32, "ffn_dim": 64, "n_heads": 2,
         "n_kv_heads": 1, "head_dim": 16}
SMALL = {  # --small: tiny random models, a few steps; the whole pipeline in minutes
    "teacher": {"source": "random", "derive": {**_TINY, "d_model": 64, "ffn_dim": 128,
                                               "n_heads": 4, "n_kv_heads": 2}},
    "student": {"source": "random", "derive": _TINY},
    "study.incompatible_student": {"source": "random", "derive": {**_TINY, "n_layers": 1}},
    "data.size": 24, "data.heldout_size": 16, "data.max_prompt_len": 256,
    "sampler.max_new_tokens": 6, "sampler.n_samples": 1, "loss.chunk_size": 16,
    "optim.lr": 1.0e-3,
    "checkpoint": {"every_n_steps": 0, "keep_last_n": 1, "async_save": False},
    "study.opd_steps": 2, "study.eval_every": 1, "study.eval_prompts": 8,
    "study.eval_batch_prompts": 4, "study.batch_prompts": 2, "study.cold_start_steps": 1,
    "study.teacher_training.steps": 2, "study.teacher_training.batch_prompts": 4,
    "study.teacher_training.warmup_steps": 0, "study.teacher_training.eval_prompts": 16,
    "study.teacher_training.lr": 1.0e-3, "study.control.data.size": 24,
    "study.bootstrap.samples": 400, "study.out_dir": "runs/{name}_small",
}


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``dotted`` ``"a.b.c"`` (missing levels created).

    >>> d = {"a": {"x": 1}}; set_dotted(d, "a.b.c", 2); d
    {'a': {'x': 1, 'b': {'c': 2}}}
    """
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def is_capability(raw: dict, overrides: Sequence[str] = ()) -> bool:
    """Whether a raw study config (plus overrides) asks for the capability study."""
    kind = (raw.get("study") or {}).get("kind")
    for o in overrides:
        if o.replace(" ", "").startswith("study.kind="):
            kind = o.split("=", 1)[1].strip()
    return kind == "capability"


def load_capability_config(path: str | Path, overrides: Sequence[str] = (), *,
                           small: bool = False) -> tuple[RunConfig, CapabilityConfig]:
    """The run config and the ``study:`` section of a capability study (``small`` applies
    :data:`SMALL` before the overrides)."""
    raw = load_yaml(path)
    if small:
        for k, v in SMALL.items():
            set_dotted(raw, k, json.loads(json.dumps(v)))
    cfg, (study,) = split_sections(raw, overrides, {"study": CapabilityConfig}, where=str(path))
    return cfg, study
