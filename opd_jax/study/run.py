"""The whole study: models, the arm-4 prompt selection, every arm (resumable), the findings and
the report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.compile_options import compilation_cache
from opd_jax.config.core import to_dict
from opd_jax.config.run import RunConfig
from opd_jax.data import read_jsonl
from opd_jax.select_prompts import SelectConfig, select_prompts
from opd_jax.study.arms import arm_config, arm_series, arm_stages, run_arm, with_student
from opd_jax.study.config import ARMS, StudyConfig
from opd_jax.study.findings import judge
from opd_jax.study.report import write_study_report
from opd_jax.study.workdir import prepare_out_dir
from opd_jax.train.models import build_models
from opd_jax.train.run import load_data


def _selection(cfg, study, sel, out, models, pool, heldout, progress, fresh):
    """(selection summary, selected records, as many random records of the de-duplicated pool)
    of arm 4; a finished selection is read back from ``<out>/select``."""
    d = out / "select"
    sel = dataclasses.replace(sel, out_dir=str(d), rule=dataclasses.replace(
        sel.rule, top_n=study.aligned_prompts, fraction=None))
    pool = list(pool[:sel.pool_size] if sel.pool_size else pool)
    if fresh or not (d / "summary.json").exists():
        select_prompts(cfg, sel, models=models, pool=pool, heldout=heldout, progress=progress)
    by_id = {r["id"]: r for r in pool}
    selected = [by_id[r["id"]] for r in read_jsonl(d / "selected.jsonl")]  # in rank order
    status = {r["id"]: r["status"] for r in read_jsonl(d / "scores.jsonl")}
    clean = [r for r in pool if status.get(r["id"]) not in ("exact_dup", "near_dup")]
    n = min(len(selected), len(clean))
    pick = sorted(np.random.default_rng(cfg.seed).choice(len(clean), n, replace=False)) if n else []
    return json.loads((d / "summary.json").read_text()), selected, [clean[i] for i in pick]


def run_study(cfg: RunConfig, study: StudyConfig, sel: SelectConfig, *, progress: bool = True,
              fresh: bool = False) -> dict[str, Any]:
    """Run the arms, judge the findings, write ``report.md`` + plots; returns the summary.

    A capability study (``study`` a :class:`~opd_jax.study.capability.CapabilityConfig`, from a
    config with ``study.kind: capability``; ``sel`` unused) runs
    :func:`opd_jax.study.capability.run_capability_study`."""
    if getattr(study, "kind", None) == "capability":
        from opd_jax.study.capability.run import run_capability_study

        return run_capability_study(cfg, study, progress=progress, fresh=fresh)
    out = Path(study.out_dir.replace("{name}", cfg.name))
    resolved = {"run": to_dict(cfg), "study": to_dict(study), "select": to_dict(sel)}
    for section in ("study", "run"):   # where programs are cached never changes results
        resolved[section].pop("compilation_cache")
    prepare_out_dir(out, resolved, fresh=fresh)
    with compilation_cache(study.compilation_cache):
        summary = _run_arms(cfg, study, sel, out, progress=progress, fresh=fresh)
    write_study_report(out, cfg, summary)
    (out / "study_summary.json").write_text(json.dumps(summary, indent=2))
    summary["out_dir"] = str(out)
    return summary


def _run_arms(cfg, study, sel, out: Path, *, progress: bool, fresh: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    train, heldout = load_data(cfg)
    if len(heldout) < study.eval_prompts:
        raise ValueError(f"study.eval_prompts={study.eval_prompts} but data.heldout_size gives "
                         f"{len(heldout)} held-out prompts; raise data.heldout_size")
    base = build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    students = {"compatible": (base, cfg.student)}
    if {"incompatible", "cold_start"} & set(study.arms) or study.aligned_student == "incompatible":
        spec = study.incompatible_student
        students["incompatible"] = (with_student(base, cfg.teacher, spec, cfg.seed), spec)
    t_models = time.perf_counter() - t_start
    arms: dict[str, dict] = {}
    selection = aligned = rand = None
    for arm in [a for a in ARMS if a in study.arms]:
        run_dir = out / arm
        marker = run_dir / "arm.json"
        if marker.exists() and not fresh:
            arms[arm] = json.loads(marker.read_text())
            continue
        t0 = time.perf_counter()
        who = {"compatible": "compatible", "incompatible": "incompatible",
               "cold_start": "incompatible"}.get(arm, study.aligned_student)
        records = train
        if arm in ("aligned", "random"):
            if selection is None:
                selection, aligned, rand = _selection(cfg, study, sel, out, students[who][0],
                                                      train, heldout, progress, fresh)
            records = aligned if arm == "aligned" else rand
            if not records:
                arms[arm] = {"skipped": "the selection rule kept no prompt"}
                continue
        stages, at = arm_stages(study, cold_start=arm == "cold_start")
        acfg = arm_config(cfg, arm, run_dir, students[who][1], stages)
        evals = run_arm(acfg, students[who][0], records, heldout,
                        keep_checkpoints=study.keep_checkpoints, progress=progress)
        arms[arm] = {"student": who, "train_prompts": len(records),
                     **arm_series(run_dir, evals, at), "seconds": time.perf_counter() - t0}
        marker.write_text(json.dumps(arms[arm]))
    summary = {"arms": arms, "findings": judge(arms, study.rules),
               "study": to_dict(study), "seconds": {"models": t_models,
                                                   "total": time.perf_counter() - t_start}}
    if selection is None and (out / "select" / "summary.json").exists():  # resumed arms
        selection = json.loads((out / "select" / "summary.json").read_text())
    if selection is not None:
        summary["selection"] = {k: v for k, v in selection.items() if k != "selected"}
    return summary
