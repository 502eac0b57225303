"""Give the teacher a capability it lacks: SFT on verified solutions of its task family, as a
run of this library whose *student* is the teacher model itself.

1. The training prompts (the first ``teacher_training.prompts`` of ``data``'s training split:
   "the teacher's post-training data") get worked solutions verified by the task's grader
   (:mod:`.solutions`), written as a cold-start dataset (``<out>/teacher/sft.jsonl``).
2. A run (``<out>/teacher``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/sft/<step>``)
   trains the teacher's weights on it: one ``cold_start`` stage with ``dataset:``
   (:mod:`opd_jax.train.sft_batches`), ``teacher_training.steps`` steps. Its checkpoint is kept:
   ``opd-jax export <out>/teacher --to hf DIR`` exports the post-trained teacher, and with
   ``teacher_training.export`` the study writes ``<out>/teacher_hf`` itself (a folder
   ``teacher.source`` loads).
3. Before and after: the teacher's greedy accuracy on ``teacher_training.eval_prompts`` held-out
   prompts of the family (per prompt, for bootstrap intervals).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.checkpoint import StageCheckpointer, stage_dir
from opd_jax.config.core import from_dict, to_dict
from opd_jax.config.run import RunConfig
from opd_jax.study.capability.config import CapabilityConfig
from opd_jax.study.capability.heldout import Evaluator
from opd_jax.study.capability.solutions import verified_solutions, write_sft_dataset
from opd_jax.train.metrics_log import MetricsLog
from opd_jax.train.models import Models
from opd_jax.train.run import make_template, run
from opd_jax.train.state import StudentSpec

STAGE = "sft"


def teacher_run_config(cfg: RunConfig, study: CapabilityConfig, run_dir: Path, dataset: Path
                       ) -> RunConfig:
    """The post-training run: ``cfg`` with the teacher as its student and one dataset
    ``cold_start`` stage (checkpoint at its end only, kept)."""
    t = study.teacher_training
    raw = to_dict(cfg)
    raw.update(name="teacher_post_training", out_dir=str(run_dir), student=to_dict(cfg.teacher),
               stages=[{"kind": "cold_start", "name": STAGE, "dataset": str(dataset),
                        "steps": t.steps, "batch_prompts": t.batch_prompts,
                        "optim": {"lr": t.lr, "schedule": t.schedule,
                                  "warmup_steps": t.warmup_steps,
                                  "final_lr_ratio": t.final_lr_ratio}}])
    raw["checkpoint"] = {**raw["checkpoint"], "every_n_steps": 0, "keep_last_n": 1}
    return from_dict(RunConfig, raw)


def final_trainable(run_dir: Path, stage: str, step: int | None = None) -> Any:
    """The ``trainable`` tree a run's ``stage`` saved at ``step`` (default: its latest)."""
    with StageCheckpointer(stage_dir(run_dir, stage), keep_last_n=100, async_save=False) as ck:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{stage_dir(run_dir, stage)} holds no checkpoint")
        state = ck.restore_as_saved(step)
    return jax.tree.map(jnp.asarray, state["trainable"])


def post_train_teacher(cfg: RunConfig, study: CapabilityConfig, out: Path, base: Models,
                       train: list[dict], evaluator: Evaluator, *, progress: bool = True
                       ) -> tuple[Any, dict[str, Any]]:
    """``(post-trained teacher Model, summary)``; resumes (a finished run is read back)."""
    t0 = time.perf_counter()
    t = study.teacher_training
    run_dir = out / "teacher"
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "post_training.json"
    earlier = json.loads(record.read_text()) if record.exists() else None   # a resumed study
    prompts = train[:t.prompts] if t.prompts else list(train)
    pairs, counts = verified_solutions(prompts)
    if not pairs:
        raise ValueError(f"no verified solution for any of {len(prompts)} post-training prompts "
                         f"({counts}); the capability study needs a reasoning-gym arithmetic "
                         "family whose entries carry an expression (e.g. chain_sum)")
    dataset = run_dir / "sft.jsonl"
    template = make_template(cfg)
    write_sft_dataset(dataset, pairs, base.tokenizer, template,
                      max_prompt_len=cfg.data.max_prompt_len)
    tcfg = teacher_run_config(cfg, study, run_dir, dataset)
    teacher = base.teacher
    models = Models(StudentSpec(teacher.config), teacher.params, None, teacher, base.tokenizer)
    run(tcfg, progress=progress, models=models, data=(train, evaluator.records))
    post = teacher.replace(params=final_trainable(run_dir, STAGE))
    t_train = time.perf_counter() - t0

    n = t.eval_prompts
    before = evaluator.teacher_answers("base", teacher, n)
    after = evaluator.teacher_answers("post", post, n)
    rows = [r for r in MetricsLog(run_dir).read(STAGE) if "loss" in r]
    exported = None
    if t.export:
        exported = export_teacher(run_dir, out / "teacher_hf")
    ex = [{"prompt": r["prompt"], "answer": r.get("answer"), "before": b, "after": a}
          for r, b, a in zip(evaluator.records[:3], before.texts, after.texts)]
    summary = {"method": t.method, "prompts": len(prompts), "solutions": counts,
               "example_solution": pairs[0][1], "steps": t.steps, "batch_prompts": t.batch_prompts,
               "lr": t.lr, "schedule": t.schedule, "loss": [r["loss"] for r in rows],
               "run_dir": str(run_dir), "checkpoint": str(stage_dir(run_dir, STAGE)),
               "exported": exported, "eval_prompts": n,
               "before": {"correct": before.correct[:n]}, "after": {"correct": after.correct[:n]},
               "examples": ex, "seconds": (earlier["seconds"] if earlier else
                                           {"train": t_train, "total": time.perf_counter() - t0})}
    record.write_text(json.dumps(summary, indent=2))
    return post, summary


def export_teacher(run_dir: Path, target: Path) -> str:
    """Write the post-trained teacher of ``run_dir`` as a Hugging Face folder at ``target``
    (:func:`opd_jax.export.export_run`; skipped when it exists); returns its path."""
    from opd_jax.export import export_run

    if not (target / "config.json").exists():
        export_run(run_dir, target, to="hf", force=True)
    return str(target)
