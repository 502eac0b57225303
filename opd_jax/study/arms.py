"""One arm of the study: its student, its stages (OPD split by held-out evals), its run and the
series read back from its run directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from opd_jax.checkpoint import stage_dir
from opd_jax.config.core import from_dict, to_dict
from opd_jax.config.run import RunConfig
from opd_jax.config.schema import ModelSpec, need
from opd_jax.model.loading import check_same_vocab
from opd_jax.study.config import StudyConfig
from opd_jax.train.metrics_log import MetricsLog
from opd_jax.train.models import Models, derive, load_source
from opd_jax.train.run import run
from opd_jax.train.state import StudentSpec

HELDOUT = [("onpolicy_reverse_kl", "on-policy reverse KL"),
           ("teacher_samples_forward_kl", "forward KL on teacher samples"),
           ("onpolicy_overlap", "top-k overlap"), ("onpolicy_student_shared_mass", "student shared mass"),
           ("onpolicy_teacher_shared_mass", "teacher shared mass"),
           ("onpolicy_student_entropy", "student entropy"),
           ("onpolicy_teacher_entropy", "teacher entropy"), ("accuracy", "accuracy")]
TRAIN = [("loss", "reverse KL on rollouts (loss)"), ("overlap", "top-k overlap"),
         ("student_shared_mass", "student shared mass"), ("teacher_shared_mass", "teacher shared mass"),
         ("student_entropy", "student entropy"), ("teacher_entropy", "teacher entropy")]


def with_student(base, teacher_spec: ModelSpec, spec: ModelSpec, seed: int):
    """``base`` Models (same teacher and tokenizer) with the student ``spec`` describes."""
    need(not spec.lora.enabled, "incompatible_student.lora.rank", spec.lora.rank,
         "0: study students are fully fine-tuned")
    same = (spec.source == teacher_spec.source and spec.source != "random"
            and spec.dtype == teacher_spec.dtype and spec.tokenizer == teacher_spec.tokenizer
            and teacher_spec.derive is None)
    student = derive(base.teacher if same else load_source(spec, seed + 1), spec, seed + 1)
    check_same_vocab(base.teacher, student)
    return Models(StudentSpec(student.config), student.params, None, base.teacher, base.tokenizer)


def arm_stages(study: StudyConfig, *, cold_start: bool) -> tuple[list[dict], dict[str, Any]]:
    """Stage dicts of one arm and, per eval stage, the OPD step it follows (``"pre"`` for the
    eval before a cold start)."""
    ev = {"kind": "eval", "n_prompts": study.eval_prompts, "batch_prompts": study.batch_prompts,
          "ks": [1], "sampler": {"temperature": study.eval_temperature}}
    stages, at = [], {}
    if cold_start:
        stages += [{**ev, "name": "eval_pre_cold_start"},
                   {"kind": "cold_start", "name": "cold_start", "steps": study.cold_start_steps,
                    "batch_prompts": study.batch_prompts, "num_teacher_samples": 1,
                    "filters": to_dict(study.cold_start_filters),
                    **({"optim": {"lr": study.cold_start_lr}} if study.cold_start_lr else {})}]
        at["eval_pre_cold_start"] = "pre"
    done = 0
    stages.append({**ev, "name": "eval_opd000"})
    at["eval_opd000"] = 0
    while done < study.opd_steps:
        n = min(study.eval_every, study.opd_steps - done)
        stages.append({"kind": "opd", "name": f"opd_{done:03d}-{done + n:03d}", "steps": n,
                       "batch_prompts": study.batch_prompts})
        done += n
        stages.append({**ev, "name": f"eval_opd{done:03d}"})
        at[f"eval_opd{done:03d}"] = done
    return stages, at


def arm_config(cfg: RunConfig, name: str, run_dir: Path, student: ModelSpec,
               stages: list[dict]) -> RunConfig:
    """The run config of one arm: ``cfg`` with its name, directory, student and ``stages``
    (no periodic checkpoints: each stage is short)."""
    raw = to_dict(cfg)
    raw.update(name=name, out_dir=str(run_dir), student=to_dict(student), stages=stages)
    raw["checkpoint"] = {**raw["checkpoint"], "every_n_steps": 0}
    return from_dict(RunConfig, raw)


def run_arm(cfg: RunConfig, models, train: list, heldout: list, *, keep_checkpoints: bool,
            progress: bool = True) -> dict[str, dict]:
    """``run.run`` of one arm on the given records (resumes an interrupted arm); returns
    ``{eval stage name: result}``. Without ``keep_checkpoints`` the train stages' checkpoints
    (student + optimizer state, ~1.4 GB each for the 27-layer student) are deleted once the arm
    is done (the eval results stay: they are small JSON checkpoints)."""
    evals = run(cfg, progress=progress, models=models, data=(train, heldout))["evals"]
    if not keep_checkpoints:
        for stage in cfg.stages:
            if stage.trains:
                shutil.rmtree(stage_dir(cfg.run_dir, stage.name), ignore_errors=True)
    return evals


def arm_series(run_dir: Path, evals: dict[str, dict], at: dict[str, Any]) -> dict[str, Any]:
    """Held-out points ``[{"opd_step", **metrics}]`` (``at``: eval stage -> OPD step, from
    :func:`arm_stages`) and the OPD / cold-start training rows of ``run_dir/metrics.jsonl``."""
    points = [{"opd_step": at[name], **{k: r.get(k) for k, _ in HELDOUT},
               "teacher_accuracy": r.get("teacher_accuracy")} for name, r in evals.items()]
    rows = MetricsLog(run_dir).read()
    opd = [r for r in rows if r.get("kind") == "opd" and "loss" in r]
    train = [{"opd_step": i + 1, **{k: r.get(k) for k, _ in TRAIN}} for i, r in enumerate(opd)]
    cold = [r.get("loss") for r in rows if r.get("kind") == "cold_start" and "loss" in r]
    return {"heldout": points, "train": train, "cold_start_loss": cold}
