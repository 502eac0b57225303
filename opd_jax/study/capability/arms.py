"""One run of one arm (an arm at one seed): its stages, its run, and its held-out evaluation
points read from checkpoints of its single OPD stage.

The OPD of a run is **one** ``opd`` stage of ``opd_steps`` steps, so AdamW's moments (and the
step count of its schedule) run on from the first step to the last. The stage saves its state
at every evaluation step (``checkpoint.every_n_steps = eval_every``, all of them kept), and the
held-out evaluations run afterwards on those checkpoints' weights: evaluating never touches
the training state, so the trained weights are those of an uninterrupted run. (The mechanism
study, :mod:`opd_jax.study.arms`, splits OPD into stages between eval stages instead, and each
stage starts a fresh optimizer.)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from opd_jax.checkpoint import stage_dir
from opd_jax.config.core import from_dict, to_dict
from opd_jax.config.run import RunConfig
from opd_jax.config.schema import ModelSpec
from opd_jax.study.capability.config import ARM_SPECS, CapabilityConfig
from opd_jax.study.capability.teacher import final_trainable
from opd_jax.train.metrics_log import MetricsLog
from opd_jax.train.models import Models
from opd_jax.train.run import run
from opd_jax.train.state import StudentSpec

OPD_STAGE = "opd"
COLD_STAGE = "cold_start"
TRAIN_KEYS = ("loss", "overlap", "student_shared_mass", "teacher_shared_mass", "student_entropy",
              "teacher_entropy")


@dataclasses.dataclass(frozen=True)
class Student:
    """A student of the study: its spec (as the run config records it), its architecture and
    its initial weights."""

    name: str
    spec: ModelSpec
    student: StudentSpec
    trainable: Any


def run_stages(study: CapabilityConfig, *, cold_start: bool) -> list[dict]:
    """Stage dicts of one run: an optional cold start, then one OPD stage.

    >>> [(s["kind"], s["steps"]) for s in run_stages(CapabilityConfig(opd_steps=12),
    ...                                                cold_start=True)]
    [('cold_start', 20), ('opd', 12)]
    """
    stages = []
    if cold_start:
        stages.append({"kind": "cold_start", "name": COLD_STAGE, "steps": study.cold_start_steps,
                       "batch_prompts": study.batch_prompts, "num_teacher_samples": 1,
                       "filters": to_dict(study.cold_start_filters),
                       **({"optim": {"lr": study.cold_start_lr}} if study.cold_start_lr else {})})
    stages.append({"kind": "opd", "name": OPD_STAGE, "steps": study.opd_steps,
                   "batch_prompts": study.batch_prompts})
    return stages


def seed_config(cfg: RunConfig, study: CapabilityConfig, arm: str, seed: int, run_dir: Path,
                student: ModelSpec) -> RunConfig:
    """The run config of ``arm`` at ``seed``: ``cfg`` with its name, directory, seed, student,
    stages, and a checkpoint at every evaluation step (all kept)."""
    steps = study.eval_steps()
    raw = to_dict(cfg)
    raw.update(name=f"{arm}_seed{seed}", out_dir=str(run_dir), seed=seed, student=to_dict(student),
               stages=run_stages(study, cold_start=ARM_SPECS[arm][3]))
    raw["checkpoint"] = {**raw["checkpoint"], "async_save": False,
                         "every_n_steps": study.eval_every if len(steps) > 2 else 0,
                         "keep_last_n": max(1, len(steps) - 1)}
    return from_dict(RunConfig, raw)


def train_series(run_dir: Path) -> tuple[list[dict], list[float]]:
    """The OPD training rows (``{"opd_step", loss and mechanism metrics}``) and the cold-start
    losses of a run's ``metrics.jsonl``."""
    rows = MetricsLog(run_dir).read()
    opd = [r for r in rows if r.get("stage") == OPD_STAGE and "loss" in r]
    train = [{"opd_step": int(r["step"]), **{k: r.get(k) for k in TRAIN_KEYS}} for r in opd]
    cold = [r["loss"] for r in rows if r.get("stage") == COLD_STAGE and "loss" in r]
    return train, cold


def run_seed(cfg: RunConfig, study: CapabilityConfig, arm: str, seed: int, run_dir: Path, *,
             student: Student, teacher: Any, tokenizer, records: list[dict],
             heldout: list[dict], evaluate: Callable[..., dict], initial: dict | None,
             progress: bool = True) -> dict[str, Any]:
    """Train ``arm`` at ``seed`` and evaluate it at :meth:`CapabilityConfig.eval_steps`.

    ``evaluate(student_spec, trainable) -> point`` scores weights against the arm's teacher;
    ``initial``: the step-0 point when it is shared by every seed (the student before training
    is the same for all), else None (a cold start's result differs per seed). Returns
    ``{"points": [{"opd_step", **point}], "train", "cold_start_loss", "seconds"}``; the train
    checkpoints are deleted afterwards unless ``study.keep_checkpoints``."""
    t0 = time.perf_counter()
    scfg = seed_config(cfg, study, arm, seed, run_dir, student.spec)
    models = Models(student.student, student.trainable, None, teacher, tokenizer)
    run(scfg, progress=progress, models=models, data=(records, heldout))
    points = []
    for step in study.eval_steps():
        if step == 0 and initial is not None:
            point = initial
        elif step == 0:   # the cold start's end
            point = evaluate(student.student, final_trainable(run_dir, COLD_STAGE))
        else:
            point = evaluate(student.student, final_trainable(run_dir, OPD_STAGE, step))
        points.append({"opd_step": step, **point})
    train, cold = train_series(run_dir)
    if not study.keep_checkpoints:
        for stage in scfg.stages:
            shutil.rmtree(stage_dir(run_dir, stage.name), ignore_errors=True)
    return {"points": points, "train": train, "cold_start_loss": cold,
            "seconds": time.perf_counter() - t0}


def read_or_run(path: Path, fresh: bool, fn: Callable[[], dict]) -> dict:
    """The JSON at ``path`` when it exists (a finished piece of a resumed study), else ``fn()``
    written there."""
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    result = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result
