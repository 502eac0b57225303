"""The whole capability study: post-train the teacher, build the control pool, run every arm at
every seed (resumable), judge the findings, write the report."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

from opd_jax.align_prompts import AlignConfig, PromptSetSpec, align_prompts
from opd_jax.compile_options import compilation_cache
from opd_jax.config.core import to_dict
from opd_jax.config.run import RunConfig
from opd_jax.data import read_jsonl
from opd_jax.study.arms import with_student
from opd_jax.study.capability.arms import Student, read_or_run, run_seed
from opd_jax.study.capability.config import ARM_SPECS, CAPABILITY_ARMS, CapabilityConfig
from opd_jax.study.capability.findings import Judge, arm_intervals, judge_capability
from opd_jax.study.capability.heldout import Evaluator
from opd_jax.study.capability.report import write_capability_report
from opd_jax.study.capability.teacher import post_train_teacher
from opd_jax.study.workdir import prepare_out_dir
from opd_jax.train.models import build_models
from opd_jax.train.run import load_data, make_template


def run_capability_study(cfg: RunConfig, study: CapabilityConfig, *, progress: bool = True,
                         fresh: bool = False) -> dict[str, Any]:
    """Run the study into ``study.out_dir`` (``fresh``: delete it first; otherwise finished
    pieces are read back); returns the summary (also ``study_summary.json``) with ``out_dir``."""
    out = Path(study.out_dir.replace("{name}", cfg.name))
    resolved = {"run": to_dict(cfg), "study": to_dict(study)}
    for section in ("study", "run"):   # where programs are cached never changes results
        resolved[section].pop("compilation_cache")
    prepare_out_dir(out, resolved, fresh=fresh)
    with compilation_cache(study.compilation_cache):
        summary = _run(cfg, study, out, progress=progress)
    write_capability_report(out, cfg, summary)
    (out / "study_summary.json").write_text(json.dumps(summary, indent=2))
    summary["out_dir"] = str(out)
    return summary


def control_pool(cfg: RunConfig, study: CapabilityConfig, out: Path, aligned: list[dict]
                 ) -> tuple[list[dict], dict[str, Any]]:
    """The control prompts (``study.control.data`` minus exact and near duplicates of the
    ``aligned`` prompts, by :func:`opd_jax.align_prompts.align_prompts` in ``<out>/align``) and
    a summary of the de-duplication."""
    spec = study.control
    candidates, _ = load_data(dataclasses.replace(cfg, data=spec.data))
    d = out / "align"
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (("reference", aligned), ("pool", candidates)):
        (d / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in rows))
    acfg = AlignConfig(out_dir=str(d), strip_suffixes=(), exact=spec.exact,
                       threshold=spec.threshold, embedder=spec.embedder, seed=cfg.seed,
                       reference=PromptSetSpec(path=str(d / "reference.jsonl"), id_key="id"),
                       pool=PromptSetSpec(path=str(d / "pool.jsonl"), id_key="id"),
                       control_n=len(aligned) if spec.equal_size else None)
    summary = align_prompts(acfg)
    by_id = {r["id"]: r for r in candidates}
    control = [by_id[r["id"]] for r in read_jsonl(d / "control.jsonl")]
    return control, {"source": f"{spec.data.source}:{spec.data.name or spec.data.path}",
                     "counts": summary["counts"], "threshold": spec.threshold,
                     "embedder": spec.embedder.kind}


def _run(cfg: RunConfig, study: CapabilityConfig, out: Path, *, progress: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    t = study.teacher_training
    train, heldout = load_data(cfg)
    if len(heldout) < t.eval_prompts:
        raise ValueError(f"study.teacher_training.eval_prompts={t.eval_prompts} but "
                         f"data.heldout_size gives {len(heldout)} held-out prompts; raise "
                         "data.heldout_size")
    base = build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    ev = Evaluator(heldout[:t.eval_prompts], base.tokenizer, make_template(cfg),
                   max_prompt_len=cfg.data.max_prompt_len, batch_prompts=study.eval_batch_prompts,
                   chunk_size=cfg.loss.chunk_size, sampler_spec=cfg.sampler,
                   temperature=study.eval_temperature, seed=cfg.seed, progress=progress)
    post, teacher = post_train_teacher(cfg, study, out, base, train, ev, progress=progress)
    t_teacher = time.perf_counter() - t_start
    aligned = train[:t.prompts] if t.prompts else list(train)
    pools: dict[str, Any] = {"aligned": len(aligned)}
    pool_records = {"aligned": aligned}
    if any(ARM_SPECS[a][2] == "control" for a in study.arms):
        pool_records["control"], pools["control"] = control_pool(cfg, study, out, aligned)

    students = {"compatible": Student("compatible", cfg.student, base.student, base.trainable)}
    if any(ARM_SPECS[a][1] == "incompatible" for a in study.arms):
        m = with_student(base, cfg.teacher, study.incompatible_student, cfg.seed)
        students["incompatible"] = Student("incompatible", study.incompatible_student,
                                           m.student, m.trainable)
    teachers = {"base": base.teacher, "post": post}

    def evaluate(teacher_name: str, spec, trainable) -> dict:
        return ev.student(spec, trainable, None, teacher_name, teachers[teacher_name],
                          study.eval_prompts)

    arms: dict[str, dict] = {}
    for arm in [a for a in CAPABILITY_ARMS if a in study.arms]:
        tname, sname, pool, cold = ARM_SPECS[arm]
        student, records = students[sname], pool_records[pool]
        score = functools.partial(evaluate, tname)
        initial = None if cold else read_or_run(
            out / "initial" / f"{sname}-{tname}.json", False,
            functools.partial(score, student.student, student.trainable))
        seeds = {}
        for seed in study.seeds:
            run_dir = out / arm / f"seed{seed}"
            seeds[str(seed)] = read_or_run(run_dir / "result.json", False, functools.partial(
                run_seed, cfg, study, arm, seed, run_dir, student=student,
                teacher=teachers[tname], tokenizer=base.tokenizer, records=records,
                heldout=ev.records, evaluate=score, initial=initial, progress=progress))
        arms[arm] = {"teacher": tname, "student": sname, "prompts": pool,
                     "train_prompts": len(records), "seeds": seeds}
    b = study.bootstrap
    kw = {"samples": b.samples, "level": b.level, "seed": b.seed}
    j = Judge(**kw)
    teacher_iv = {k: j.teacher(teacher[k]["correct"], k) for k in ("before", "after")}
    return {"kind": "capability", "arms": arms, "teacher": teacher,
            "teacher_intervals": {k: v.as_dict() for k, v in teacher_iv.items() if v},
            "pools": pools, "eval_steps": study.eval_steps(),
            "intervals": arm_intervals(arms, **kw),
            "findings": judge_capability(arms, teacher, **kw), "study": to_dict(study),
            "seconds": {"teacher": t_teacher, "total": time.perf_counter() - t_start}}
