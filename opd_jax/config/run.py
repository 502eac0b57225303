"""Run schema, part 2: stages, checkpointing, mesh, logging and the whole :class:`RunConfig`.

A run is a list of stages (``cold_start`` -> ``opd`` / ``opsd`` -> ``eval``). The run-level
``data``, ``sampler``, ``loss`` and ``optim`` apply to every stage; a stage may override any of them
partially: the keys it gives replace the run-level ones (one level deep), so
``stages: [{kind: opd, optim: {lr: 1e-6}}]`` keeps every other run-level optimizer setting.
:meth:`RunConfig.resolve_stage` returns a stage with every section filled in.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal, Optional, Sequence

from opd_jax.config.core import load_typed
from opd_jax.config.loss import PG_OBJECTIVES, LossSpec
from opd_jax.config.schema import (
    DataSpec,
    FilterSpec,
    ModelSpec,
    OptimSpec,
    SamplerSpec,
    need,
    need_positive,
    placeholders,
)
from opd_jax.config.teachers import TeacherRoute, check_teachers

__all__ = ["STAGE_KINDS", "TRAIN_KINDS", "StageSpec", "CheckpointSpec", "MeshShape",
           "DistributedSpec", "MeshSpec", "LogSpec", "RunConfig", "load_config"]

STAGE_KINDS = ("cold_start", "opd", "opsd", "eval")
TRAIN_KINDS = ("cold_start", "opd", "opsd")
SECTIONS = ("data", "sampler", "loss", "optim")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Stage fields that apply to one kind only (must keep their defaults on other kinds).
_KIND_FIELDS = {
    "filters": "cold_start", "num_teacher_samples": "cold_start", "dataset": "cold_start",
    "epochs": "cold_start", "max_attempts": "cold_start", "distill": "cold_start",
    "offpolicy_dataset": "opd", "offpolicy_cache": "opd",
    "teacher_mode": "opsd", "ema_decay": "opsd",
    "ks": "eval", "n_prompts": "eval",
}

# A dataset cold start's sampler (the teacher rollouts of `opd-jax build-cold-start`) takes these
# where neither the stage nor the run level sets them: thunlp/OPD scripts/infer/vllm_rollout.py:375-380
# samples at temperature 1.0, top-p 0.95 (and max_tokens 7168, left to the config here: set
# sampler.max_new_tokens).
COLD_START_SAMPLER = {"temperature": 1.0, "top_p": 0.95}


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a run; its checkpoints live in ``<run_dir>/checkpoints/<name>/``.

    ``kind``: "cold_start" (SFT on filtered teacher rollouts), "opd" (on-policy distillation from
    the teacher), "opsd" (self-distillation: the model with privileged context is the teacher),
    "eval" (Avg@k / pass@k on held-out prompts). ``name`` defaults to the kind (``kind_<i>`` when
    repeated). ``steps`` optimizer steps (train kinds), ``batch_prompts`` prompts per step.
    ``data`` / ``sampler`` / ``loss`` / ``optim``: partial overrides of the run-level sections.
    cold_start, two modes. On the fly (no ``dataset``): each step samples ``num_teacher_samples``
    teacher rollouts per prompt, drops those ``filters`` reject, and trains on the rest for
    ``steps``. From a dataset (the OPD paper's recipe): ``dataset`` is a JSONL file written by
    ``opd-jax build-cold-start`` (teacher rollouts with ``filters``, ``num_teacher_samples`` slots
    per prompt, up to ``max_attempts`` draws per slot, sampled with the stage's ``sampler``, whose
    temperature / top_p default to the reference's 1.0 / 0.95); the stage trains on it for
    ``epochs`` passes (or ``steps``; set one), ``batch_prompts`` examples a step, by cross-entropy,
    or with ``distill: true`` by the stage's ``loss`` (a divergence) against the teacher's
    distribution on the same tokens (off-policy KD): the teacher in-process, or a cache of its
    scores (``teacher.source: <dir>`` from ``opd-jax cache-teacher``; ``loss.top_k`` with
    ``support: teacher``) with no teacher loaded.
    opd: with ``loss.lambda_on_policy < 1`` (GKD), the off-policy steps train on the teacher's
    samples (seq-KD), or with ``offpolicy_dataset`` (a cold-start JSONL) on the file's examples,
    as GKD's fixed dataset / TRL's ``GKDTrainer`` without ``seq_kd``; ``offpolicy_cache``: an
    ``opd-jax cache-teacher`` directory of that file's scores, read on those steps while a served
    teacher (``teacher.source: http://...``) scores the on-policy ones.
    opsd: ``teacher_mode`` "fixed" (initial weights / LoRA off), "ema" (``ema_decay``) or "live".
    eval: ``ks`` (k values for Avg@k and pass@k; max(ks) samples per prompt), ``n_prompts``.
    """

    kind: Literal["cold_start", "opd", "opsd", "eval"]
    name: str = ""
    steps: int = 0
    batch_prompts: int = 8
    data: Optional[DataSpec] = None
    sampler: Optional[SamplerSpec] = None
    loss: Optional[LossSpec] = None
    optim: Optional[OptimSpec] = None
    filters: FilterSpec = FilterSpec()
    num_teacher_samples: int = 1
    dataset: Optional[str] = None
    epochs: Optional[int] = None
    max_attempts: int = 3
    distill: bool = False
    offpolicy_dataset: Optional[str] = None
    offpolicy_cache: Optional[str] = None
    teacher_mode: Literal["fixed", "ema", "live"] = "fixed"
    ema_decay: float = 0.999
    ks: tuple[int, ...] = (1,)
    n_prompts: int = 40

    @property
    def trains(self) -> bool:
        return self.kind in TRAIN_KINDS

    def validate(self) -> None:
        need(bool(_NAME_RE.match(self.name)), "name", self.name,
             "a non-empty name of letters, digits, '_', '.', '-' (it names a directory)")
        if self.dataset is not None:
            self._validate_dataset()
        elif self.trains:
            need(self.steps >= 1, "steps", self.steps, f"an integer >= 1 for a {self.kind} stage")
        else:
            need(self.steps == 0, "steps", self.steps, "0 for an eval stage (use n_prompts)")
        need_positive(self, "batch_prompts")
        defaults = StageSpec(kind=self.kind)
        for field, kind in _KIND_FIELDS.items():
            value = getattr(self, field)
            need(kind == self.kind or value == getattr(defaults, field), field,
                 value, f"leave unset: it applies to {kind} stages, this one is {self.kind}")
        need_positive(self, "num_teacher_samples", "n_prompts")
        need(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "a number in (0, 1)")
        need(len(self.ks) > 0 and min(self.ks) >= 1, "ks", list(self.ks),
             "a non-empty list of integers >= 1")
        need(self.max_attempts >= 1, "max_attempts", self.max_attempts, "an integer >= 1")
        need(self.offpolicy_cache is None or self.offpolicy_dataset is not None, "offpolicy_cache",
             self.offpolicy_cache, "leave unset without offpolicy_dataset: the cache holds that "
             "file's teacher scores (opd-jax cache-teacher CONFIG --dataset FILE --out DIR)")
        if self.dataset is None:
            without = "leave unset without dataset: {} (set dataset: path.jsonl)"
            need(not self.distill, "distill", self.distill,
                 without.format("distill trains a cold-start dataset against the teacher"))
            need(self.epochs is None, "epochs", self.epochs,
                 without.format("epochs count passes over a cold-start dataset"))
            need(self.max_attempts == 3, "max_attempts", self.max_attempts,
                 without.format("retries are opd-jax build-cold-start's"))

    def _validate_dataset(self) -> None:
        need(bool(self.dataset.strip()), "dataset", self.dataset, "a JSONL file path")
        need(self.epochs is None or self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        need((self.steps != 0) != (self.epochs is not None), "epochs" if self.epochs else "steps",
             self.epochs if self.epochs else self.steps,
             "exactly one of steps / epochs for a dataset cold start (the reference's SFT runs 2 "
             "epochs: thunlp/OPD LlamaFactory/examples/train_full/qwen3_base_full_sft.yaml:39)")
        need(self.steps >= 0, "steps", self.steps, "an integer >= 1, or 0 with epochs")


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Orbax checkpoints per stage: every ``every_n_steps`` steps (0 = only at the end of a stage),
    keeping the ``keep_last_n`` most recent; ``async_save`` writes in the background.
    ``save_concurrent_gb``: at most this many GB of arrays in flight to storage at once (null =
    Orbax's default, 96): a save otherwise copies the whole state into write buffers first
    (+0.9 GB for ``make demo``'s 1.4 GB state; BUILD_NOTES "Session 12").
    ``final_optimizer_state``: a finished stage's last checkpoint also holds the optimizer state
    (AdamW's moments: twice the weights' bytes), the step, RNG and EMA; false (default): the
    trainable weights only, all that a later stage, ``opd-jax export`` or a resumed run reads
    back from a finished stage (its mid-stage checkpoints always hold the whole state)."""

    every_n_steps: int = 50
    keep_last_n: int = 2
    async_save: bool = True
    save_concurrent_gb: Optional[float] = None
    final_optimizer_state: bool = False

    def validate(self) -> None:
        need(self.every_n_steps >= 0, "every_n_steps", self.every_n_steps,
             "an integer >= 0 (0 = only at stage end)")
        need_positive(self, "keep_last_n")
        need(self.save_concurrent_gb is None or self.save_concurrent_gb > 0,
             "save_concurrent_gb", self.save_concurrent_gb, "null or a positive number of GB")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis; one axis may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        for axis, size in sizes.items():
            need(size >= 1 or size == -1, axis, size, "a positive integer or -1 (the rest)")
        need(list(sizes.values()).count(-1) <= 1, "fsdp", self.fsdp,
             f"at most one axis may be -1 (got {sizes})")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """Multi-host ``jax.distributed.initialize`` options; ``initialize`` false = single process.
    Leave the others null to auto-detect (TPU pods, SLURM); set all three to configure by hand."""

    initialize: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def validate(self) -> None:
        given = [self.coordinator_address, self.num_processes, self.process_id]
        need(all(v is None for v in given) or all(v is not None for v in given),
             "coordinator_address", self.coordinator_address,
             "set coordinator_address, num_processes and process_id together, or none of them")


RULES_TABLES = ("fsdp", "fsdp_tp", "replicated")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Device mesh and the logical-axis rules tables (``opd_jax.sharding``): "fsdp" (weights split
    over ``fsdp``, the default), "fsdp_tp" (also heads / mlp / vocab over ``tensor``) or
    "replicated" (whole weights on every device; the batch still split over ``data`` x ``fsdp``).
    ``teacher_rules`` null = the student's table. The teacher runs no backward pass, so it may use
    a different table on the same mesh: e.g. a student ``fsdp_tp`` with a teacher ``fsdp``
    (sharded over ``fsdp``, whole over ``tensor``), or a small teacher ``replicated`` (no per-layer
    gathers). With ``shape.tensor > 1`` at least one of the two tables must use the tensor axis
    (``fsdp_tp``); a model whose table does not use it repeats its work on every ``tensor``
    device."""

    shape: MeshShape = MeshShape()
    rules: Literal["fsdp", "fsdp_tp", "replicated"] = "fsdp"
    teacher_rules: Optional[Literal["fsdp", "fsdp_tp", "replicated"]] = None
    distributed: DistributedSpec = DistributedSpec()

    def validate(self) -> None:
        for field in ("rules", "teacher_rules"):
            value = getattr(self, field)
            need(value in RULES_TABLES or (field == "teacher_rules" and value is None), field,
                 value, f"one of {list(RULES_TABLES)}" + (" or null (= rules)"
                                                          if field == "teacher_rules" else ""))
        if self.shape.tensor != 1:
            teacher = self.teacher_rules or self.rules
            need("fsdp_tp" in (self.rules, teacher), "rules", self.rules,
                 f'"fsdp_tp" for the student or the teacher (teacher_rules={self.teacher_rules!r})'
                 f": shape.tensor={self.shape.tensor} but neither table uses the tensor axis, so "
                 "every device along it would repeat the same work; set shape.tensor: 1 or use "
                 "fsdp_tp")


@dataclasses.dataclass(frozen=True)
class LogSpec:
    """Log metrics every ``every`` steps (stdout + metrics.jsonl); ``tensorboard`` also writes
    TensorBoard event files."""

    every: int = 1
    tensorboard: bool = False

    def validate(self) -> None:
        need_positive(self, "every")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run. ``out_dir`` is the run directory (``{name}`` is replaced by ``name``): it gets
    ``config.yaml``, ``checkpoints/<stage>/<step>/`` and metrics. ``teacher`` is unused by opsd
    stages (the student with privileged context is its own teacher). ``teachers``: several
    teachers, each scoring the prompts of its data sources (:mod:`opd_jax.config.teachers`), in
    place of ``teacher``. ``compilation_cache``: the directory of JAX's persistent compilation
    cache for the ``opd-jax`` commands that run this config (``train``, ``demo``, ``eval``,
    ``sample``, ``serve-teacher``, ``cache-teacher``, ``build-cold-start``): a second run loads
    the programs the first compiled; null turns it off
    (:func:`opd_jax.compile_options.compilation_cache`; Python callers of ``train.run`` choose
    for themselves)."""

    name: str = "run"
    out_dir: str = "runs/{name}"
    compilation_cache: Optional[str] = "~/.cache/opd_jax/xla"
    seed: int = 0
    teacher: ModelSpec = ModelSpec()
    teachers: tuple[TeacherRoute, ...] = ()
    student: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    sampler: SamplerSpec = SamplerSpec()
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    mesh: MeshSpec = MeshSpec()
    log: LogSpec = LogSpec()
    stages: tuple[StageSpec, ...] = ()

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.replace("{name}", self.name))

    @classmethod
    def preprocess(cls, data: dict) -> dict:
        """Merge run-level sections into each stage's partial overrides (a dataset cold start's
        sampler over :data:`COLD_START_SAMPLER`); name unnamed stages."""
        stages = data.get("stages")
        if not isinstance(stages, list):
            return data
        kinds = [s.get("kind") for s in stages if isinstance(s, dict)]
        merged = []
        for i, stage in enumerate(stages):
            if isinstance(stage, dict):
                stage = dict(stage)
                if stage.get("kind") == "cold_start" and stage.get("dataset") is not None:
                    given = [data.get("sampler"), stage.get("sampler")]
                    stage["sampler"] = {**COLD_START_SAMPLER, **{k: v for d in given if
                                                                isinstance(d, dict)
                                                                for k, v in d.items()}}
                for section in SECTIONS:
                    base, over = data.get(section) or {}, stage.get(section)
                    if isinstance(over, dict) and isinstance(base, dict):
                        stage[section] = {**base, **over}
                if not stage.get("name") and isinstance(stage.get("kind"), str):
                    kind = stage["kind"]
                    stage["name"] = kind if kinds.count(kind) == 1 else f"{kind}_{i}"
            merged.append(stage)
        return {**data, "stages": merged}

    def resolve_stage(self, stage: StageSpec | int) -> StageSpec:
        """The stage with its data/sampler/loss/optim filled in from the run level where unset."""
        if isinstance(stage, int):
            stage = self.stages[stage]
        return dataclasses.replace(stage, **{s: getattr(stage, s) or getattr(self, s)
                                             for s in SECTIONS})

    def validate(self) -> None:
        need(len(self.stages) > 0, "stages", [], "at least one stage, e.g. "
             "[{kind: opd, steps: 100}]; kinds: " + ", ".join(STAGE_KINDS))
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            need(names.count(name) == 1, f"stages.{i}.name", name,
                 f"a unique stage name (names: {names}); it names the checkpoint directory")
        for i, stage in enumerate(self.stages):
            if stage.kind == "opsd":
                self._validate_opsd(i, stage)
            objective = self.resolve_stage(stage).loss.objective
            need(not stage.distill or objective not in PG_OBJECTIVES, f"stages.{i}.loss.objective",
                 objective, "a divergence (e.g. forward_kl) for a distill cold start: "
                 f"{' / '.join(PG_OBJECTIVES)} are policy gradients on the student's own samples")
            if stage.offpolicy_dataset is not None:
                self._validate_offpolicy(i, stage)
        if self.teachers:
            check_teachers(self.teachers, self.teacher)
        need(self.teacher.remat == "none", "teacher.remat", self.teacher.remat,
             '"none": the teacher runs no backward pass, so there is nothing to rematerialise '
             "(set student.remat)")

    def _validate_offpolicy(self, i: int, stage: StageSpec) -> None:
        loss = self.resolve_stage(stage).loss
        where = f"stages.{i}.loss" if stage.loss is not None else "loss"
        need(loss.lambda_on_policy < 1, f"{where}.lambda_on_policy", loss.lambda_on_policy,
             f"a fraction < 1 for stage {stage.name!r} to use its offpolicy_dataset (GKD draws "
             "that fraction of steps on-policy; e.g. 0.5)")
        need(loss.objective not in PG_OBJECTIVES, f"{where}.objective", loss.objective,
             f"a divergence (e.g. generalized_jsd) for stage {stage.name!r}'s offpolicy_dataset: "
             f"{' / '.join(PG_OBJECTIVES)} are policy gradients on the student's own samples")
        need(loss.grpo_outcome_weight is None, f"{where}.grpo_outcome_weight",
             loss.grpo_outcome_weight, "null with offpolicy_dataset (the file's completions get "
             "no rollout-group advantage)")
        need(stage.offpolicy_cache is None or self.teacher.source.startswith(("http://",
                                                                              "https://")),
             f"stages.{i}.offpolicy_cache", stage.offpolicy_cache,
             "unset unless teacher.source is a served teacher (http://host:port): an in-process "
             "teacher scores the off-policy rows in the step, a cache alone cannot score the "
             "on-policy ones")

    def _validate_opsd(self, i: int, stage: StageSpec) -> None:
        data = self.resolve_stage(stage).data
        where = f"stages.{i}.data" if stage.data is not None else "data"
        need(data.teacher_template is not None, f"{where}.teacher_template", None,
             f"opsd stage {stage.name!r} needs a privileged teacher context, e.g. "
             '"{problem}\\nReference solution: {solution}\\nAnswer: {answer}"')
        need("solution" not in placeholders(data.teacher_template) or data.has_solutions,
             f"{where}.solution_key", None,
             f"opsd stage {stage.name!r}: data source {data.source}:{data.name or data.path} has "
             "no solutions; set solution_key to the field holding reference solutions, or drop "
             "{solution} from teacher_template")


def load_config(path: str | Path | None, overrides: Sequence[str] = (), cls: type = RunConfig):
    """Load a :class:`RunConfig` (or ``cls``) from YAML plus ``key=value`` overrides.

    ``path=None`` starts from the schema defaults. Errors name the file and the dotted key::

        cfg = load_config("configs/demo.yaml", ["optim.lr=1e-5", "stages.1.steps=10"])
    """
    return load_typed(cls, path, overrides)
