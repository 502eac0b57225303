"""Run a config end to end: build models and data once, then each stage in order.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``checkpoints/<stage>/<step>/`` and ``summary.json``. ``run(cfg)`` resumes by default: completed
stages are skipped (their final checkpoint provides the student), an interrupted stage continues
from its latest readable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from typing import Any

from opd_jax.checkpoint import RUNNING_MARKER, StageCheckpointer, stage_dir
from opd_jax.config.core import save_config, to_dict
from opd_jax.config.run import RunConfig, load_config
from opd_jax.data import PromptTemplate, dedupe_records, load_records, split_records
from opd_jax.data.templates import teacher_template_for
from opd_jax.teacher.source import source_kind
from opd_jax.train import distributed
from opd_jax.train.eval_stage import run_eval_stage
from opd_jax.train.metrics_log import make_log
from opd_jax.train.models import build_models
from opd_jax.train.placement import build_mesh, place_models
from opd_jax.train.remote_teacher import check_stages
from opd_jax.train.sft_batches import check_datasets
from opd_jax.train.stage_context import RunContext
from opd_jax.train.stages import run_train_stage

INITIAL_EVAL = "eval_initial"


def load_data(cfg: RunConfig) -> tuple[list, list]:
    """Training and held-out prompt records from ``cfg.data`` (deduplicated, disjoint)."""
    d = cfg.data
    if d.source == "reasoning_gym":
        spec = {"type": "reasoning_gym", "name": d.name, "size": d.size + d.heldout_size,
                "seed": d.seed, "config": d.kwargs}
    else:
        spec = {"type": d.source, "path": d.path, "prompt_key": d.prompt_key,
                "answer_key": d.answer_key, "solution_key": d.solution_key}
    records, _ = dedupe_records(load_records(spec))
    train, heldout = split_records(records, heldout_size=min(d.heldout_size, len(records) - 1))
    if not train:
        raise ValueError(f"data source {d.source}:{d.name or d.path} left no training prompts "
                         f"after holding out {d.heldout_size}; raise data.size or lower "
                         "data.heldout_size")
    return train[:d.size], heldout


def make_template(cfg: RunConfig) -> PromptTemplate:
    """The student / privileged-teacher prompt template of ``cfg.data`` (with its chat-template
    kwargs)."""
    d = cfg.data
    return PromptTemplate(system=d.system_prompt, student_template=d.instruction,
                          teacher_template=d.teacher_template or teacher_template_for(d.instruction),
                          chat_template_kwargs=d.chat_template_kwargs)


def _stage_result(cfg: RunConfig, name: str) -> dict | None:
    ck = StageCheckpointer(stage_dir(cfg.run_dir, name), keep_last_n=1, async_save=False)
    try:
        if not ck.is_done():
            return None
        return ck.restore_latest(None).extra.get("result")
    finally:
        ck.close()


def run(cfg: RunConfig, *, progress: bool = True, models=None, mesh=None,
        data: tuple[list, list] | None = None, record: bool = True) -> dict[str, Any]:
    """Run every stage of ``cfg`` (resuming where a previous run stopped); returns the summary.

    Runs on the mesh ``cfg.mesh`` (multi-process: ``cfg.mesh.distributed`` initialises
    ``jax.distributed`` first; only process 0 writes the run directory's files). ``mesh``: a
    ``opd_jax.train.placement.TrainMesh`` to use instead of building one from ``cfg.mesh``.
    ``data``: ``(train, heldout)`` prompt records to use instead of :func:`load_data` (the
    study's arms train on selected prompts against one held-out set). ``record=False``: neither
    check nor write ``config.yaml`` (``opd-jax eval`` runs a partial config in a run directory).

    Raises ``ValueError`` before any work when the run directory already records a run whose
    config differs from ``cfg`` in anything that changes results (:func:`check_resumable`)."""
    distributed.init_distributed(cfg.mesh.distributed)
    check_datasets(cfg)   # a dataset cold start's file, before any stage runs
    if cfg.teachers:   # several teachers: each scores its rows, like a served one
        check_stages(cfg, "router")
    elif source_kind(cfg.teacher.source) != "model":   # what a served / cached teacher cannot do
        check_stages(cfg, source_kind(cfg.teacher.source))
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / RUNNING_MARKER
    fresh_record = check_resumable(cfg) if record else False
    if distributed.is_primary():
        if fresh_record:
            save_config(cfg, run_dir / "config.yaml")
        # "a trainer is writing this run" for readers such as `opd-jax export`; removed on exit
        # (a killed run leaves it behind, and readers check whether its pid is still alive)
        marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    try:
        return _run_stages(cfg, run_dir, progress=progress, models=models, mesh=mesh, data=data)
    finally:
        if distributed.is_primary():
            marker.unlink(missing_ok=True)


# Config keys that change how a run executes or what it records, never what it computes: a
# resumed run may change them (a preempted run resumed on another mesh, other logging).
EXECUTION_KEYS = ("name", "out_dir", "compilation_cache", "log.", "checkpoint.", "mesh.",
                  "teacher.attention", "teacher.service_wait_s", "student.attention",
                  "student.remat", "optim.pack", "sampler.slots")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out if out or not prefix else {prefix: tree}


def config_changes(recorded: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted key, recorded, new)`` for every difference that can change results (missing
    keys read as ``<absent>``); keys under :data:`EXECUTION_KEYS` are ignored."""
    a, b = _flat(recorded), _flat(new)
    absent = "<absent>"
    # a stage's own sections ("stages.<i>.optim.pack") are matched like the run-level ones
    section = lambda k: re.sub(r"^stages\.\d+\.", "", k)
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent) and not section(k).startswith(EXECUTION_KEYS)]


def check_resumable(cfg: RunConfig) -> bool:
    """Whether ``config.yaml`` should be written: True for a new run directory (or one that
    recorded nothing yet); False to resume one whose recorded config computes the same thing.

    Raises ``ValueError`` listing the differing keys when the directory holds a run of another
    config: resuming it would mix two configs' checkpoints and metrics under one record."""
    run_dir = cfg.run_dir
    path = run_dir / "config.yaml"
    metrics = run_dir / "metrics.jsonl"
    saved = any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*/*"))
    if not path.exists() or not (saved or (metrics.exists() and metrics.stat().st_size > 0)):
        return True   # nothing was computed under the recorded config (e.g. it failed early)
    try:   # through the current schema, so fields added since the run read as their defaults
        recorded = to_dict(load_config(path))
    except ValueError as e:
        raise ValueError(f"{path} (the run's recorded config) does not load in this opd_jax "
                         f"version ({e}); resume it with the version that wrote it, or start "
                         "over with --fresh") from e
    changes = config_changes(recorded, to_dict(cfg))
    if not changes:
        return False
    shown = "\n".join(f"  {k}: {old!r} (recorded) -> {new!r}" for k, old, new in changes[:12])
    more = f"\n  ... and {len(changes) - 12} more" if len(changes) > 12 else ""
    raise ValueError(
        f"{run_dir} holds a run of a different config ({path}); these keys differ:\n{shown}{more}\n"
        f"Resuming would mix two configs' checkpoints and metrics. Either keep the recorded "
        f"values, start over with --fresh (deletes {run_dir}), or write elsewhere with "
        f"name=<new name> / out_dir=<dir>. Keys that only change execution or logging "
        f"({', '.join(k.rstrip('.') for k in EXECUTION_KEYS)}) may differ.")


def _run_stages(cfg: RunConfig, run_dir, *, progress: bool, models, mesh, data) -> dict[str, Any]:
    train, heldout = data if data is not None else load_data(cfg)
    tm = mesh or build_mesh(cfg.mesh)
    # student.remat / attention and teacher.attention come from the specs (build_models)
    models = models or build_models(cfg.teacher, cfg.student, seed=cfg.seed,
                                    teachers=cfg.teachers)
    models = place_models(models, tm)
    # the student's weights live in `current` alone (the stages get the models without them), and
    # a train stage is handed the only reference: the previous weights are freed once its state
    # holds its copy, instead of staying alive beside it (a caller's own models keep theirs)
    current = {"trainable": models.trainable}
    models = dataclasses.replace(models, trainable=None)
    ctx = RunContext(cfg, models, train, heldout, make_template(cfg),
                     make_log(run_dir, cfg.log.tensorboard), progress, mesh=tm)
    evals: dict[str, dict] = {}
    first_eval = next((i for i, s in enumerate(cfg.stages) if s.kind == "eval"), None)
    trains_before = first_eval is not None and any(s.trains for s in cfg.stages[:first_eval])
    if trains_before:
        evals[INITIAL_EVAL] = run_eval_stage(ctx, first_eval, current["trainable"],
                                             name=INITIAL_EVAL)
    for i, stage in enumerate(cfg.stages):
        if stage.trains:
            current["trainable"] = run_train_stage(ctx, i, current.pop("trainable"))
        else:
            evals[stage.name] = run_eval_stage(ctx, i, current["trainable"])
    summary = summarize(cfg, ctx.log, evals)
    if distributed.is_primary():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(cfg: RunConfig, log, evals: dict[str, dict]) -> dict[str, Any]:
    """Before/after/teacher table and first-vs-last mechanism metrics of each train stage."""
    out: dict[str, Any] = {"run_dir": str(cfg.run_dir), "evals": evals, "stages": {}}
    for stage in cfg.stages:
        rows = [r for r in log.read(stage.name) if "loss" in r]
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        keys = ("loss", "overlap", "student_p_sum_intersection", "teacher_p_sum_intersection",
                "student_shared_mass", "teacher_shared_mass",
                "token_reverse_kl", "student_entropy", "teacher_entropy", "skipped")
        out["stages"][stage.name] = {"kind": stage.kind, "steps": len(rows),
                                     "first": {k: first.get(k) for k in keys if k in first},
                                     "last": {k: last.get(k) for k in keys if k in last}}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the run summary (student before / after, teacher; KLs; mechanism)."""
    evals = summary["evals"]
    lines = ["", f"run: {summary['run_dir']}"]
    cols = [(name, e) for name, e in evals.items()]
    if cols:
        lines.append(f"{'held-out':34s}" + "".join(f"{n:>16s}" for n, _ in cols) + f"{'teacher':>16s}")
        teacher = next((e for _, e in cols if "teacher_accuracy" in e), {})
        for key, label in [("accuracy", "accuracy"), ("onpolicy_reverse_kl", "reverse KL on own samples"),
                           ("teacher_samples_forward_kl", "forward KL on teacher samples"),
                           ("onpolicy_overlap", "top-k overlap (own samples)"),
                           ("onpolicy_student_p_sum_intersection",
                            "student shared mass (intersecting)")]:
            row = "".join(f"{e[key]:16.4f}" if isinstance(e.get(key), float) else f"{'-':>16s}"
                          for _, e in cols)
            t = teacher.get("teacher_accuracy") if key == "accuracy" else None
            lines.append(f"{label:34s}{row}{(f'{t:16.4f}' if t is not None else f'{chr(45):>16s}')}")
    for name, s in summary["stages"].items():
        lines.append(f"\nstage {name} ({s['kind']}, {s['steps']} steps): first -> last")
        for k in s["first"]:
            a, b = s["first"][k], s["last"].get(k)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                lines.append(f"  {k:28s}{a:12.4f} -> {b:12.4f}")
    return "\n".join(lines)
