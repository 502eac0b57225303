"""``opd-jax study``: the OPD paper's (arXiv 2604.13016) comparisons, in miniature, on one teacher.

Arms (each a run directory under ``study.out_dir``, run by ``opd_jax.train.run.run``):

1. ``compatible``: OPD from the run config's ``student`` (demo: SmolLM2 minus layers 10, 15, 20);
2. ``incompatible``: OPD from ``study.incompatible_student`` (demo: every 3rd layer);
3. ``cold_start``: the incompatible student after an off-policy cold start (SFT on filtered teacher
   rollouts, ``study.cold_start_*``), then the same OPD;
4. ``aligned`` / ``random``: OPD of the ``aligned_student`` on ``aligned_prompts`` prompts chosen by
   :mod:`opd_jax.select_prompts` (the ``select:`` section) vs as many random prompts of the same
   de-duplicated pool.

Every arm's OPD is split into stages of ``eval_every`` steps with a held-out eval stage before,
between and after them (no trainer change; each OPD stage starts a fresh optimizer state, so AdamW
moments restart every ``eval_every`` steps), giving per-step curves of both KLs the design asks
for together: on-policy reverse KL and forward KL on teacher samples. ``report.md`` holds the
tables, plots and a findings table whose verdicts follow the stated rules (``study.rules``) from
the numbers. Seeds are fixed: a rerun (``--fresh``) gives the same numbers on the same machine; a
rerun without it resumes (finished arms are read back from ``<arm>/arm.json``).

Config: a run config (teacher, student, data, sampler, loss, optim, checkpoint; ``stages`` unused)
plus ``study:`` (:class:`StudyConfig`) and ``select:`` (:class:`opd_jax.select_prompts.SelectConfig`)
sections. ``small=True`` (``--small``) swaps in tiny random models and a few steps (seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from opd_jax.config import from_dict, load_yaml, to_dict
from opd_jax.config_run import RunConfig
from opd_jax.config_schema import DeriveSpec, FilterSpec, ModelSpec, need
from opd_jax.select_prompts import SelectConfig, select_prompts, split_sections

ARMS = ("compatible", "incompatible", "cold_start", "aligned", "random")
ARM_TITLES = {"compatible": "1. OPD, compatible student", "incompatible": "2. OPD, incompatible student",
              "cold_start": "3. cold start (SFT) then OPD, incompatible student",
              "aligned": "4a. OPD on teacher-aligned (selected) prompts",
              "random": "4b. OPD on as many random prompts"}
HELDOUT = [("onpolicy_reverse_kl", "on-policy reverse KL"),
           ("teacher_samples_forward_kl", "forward KL on teacher samples"),
           ("onpolicy_overlap", "top-k overlap"), ("onpolicy_student_shared_mass", "student shared mass"),
           ("onpolicy_teacher_shared_mass", "teacher shared mass"),
           ("onpolicy_student_entropy", "student entropy"),
           ("onpolicy_teacher_entropy", "teacher entropy"), ("accuracy", "accuracy")]
TRAIN = [("loss", "reverse KL on rollouts (loss)"), ("overlap", "top-k overlap"),
         ("student_shared_mass", "student shared mass"), ("teacher_shared_mass", "teacher shared mass"),
         ("student_entropy", "student entropy"), ("teacher_entropy", "teacher entropy")]
LOG_SCALE = ("onpolicy_reverse_kl", "teacher_samples_forward_kl", "loss", "cold_start_loss")


@dataclasses.dataclass(frozen=True)
class FindingRules:
    """Thresholds of the verdicts (see :func:`judge`)."""

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
        for name in ("opd_steps", "eval_every", "eval_prompts", "batch_prompts", "aligned_prompts"):
            need(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        need(self.cold_start_steps >= 1, "cold_start_steps", self.cold_start_steps, "an integer >= 1")


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
                      ) -> tuple[RunConfig, StudyConfig, SelectConfig]:
    """The run config and the ``study:`` / ``select:`` sections (``small`` applies ``SMALL``
    before the overrides)."""
    raw = load_yaml(path)
    if small:
        for k, v in SMALL.items():
            _set(raw, k, json.loads(json.dumps(v)))
    cfg, (study, sel) = split_sections(raw, overrides, {"study": StudyConfig,
                                                        "select": SelectConfig}, where=str(path))
    return cfg, study, sel


# --------------------------------------------------------------------------------------------
# arms
# --------------------------------------------------------------------------------------------


def with_student(base, teacher_spec: ModelSpec, spec: ModelSpec, seed: int):
    """``base`` Models (same teacher and tokenizer) with the student ``spec`` describes."""
    from opd_jax.model.loading import check_same_vocab
    from opd_jax.train.models import Models, derive, load_source
    from opd_jax.train.state import StudentSpec

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
    from opd_jax.checkpoint import stage_dir
    from opd_jax.train.run import run

    evals = run(cfg, progress=progress, models=models, data=(train, heldout))["evals"]
    if not keep_checkpoints:
        for stage in cfg.stages:
            if stage.trains:
                shutil.rmtree(stage_dir(cfg.run_dir, stage.name), ignore_errors=True)
    return evals


def _series(run_dir: Path, evals: dict[str, dict], at: dict[str, Any]) -> dict[str, Any]:
    """Held-out points ``[{"opd_step", **metrics}]`` and OPD / cold-start training rows."""
    points = [{"opd_step": at[name], **{k: r.get(k) for k, _ in HELDOUT},
               "teacher_accuracy": r.get("teacher_accuracy")} for name, r in evals.items()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    opd = [r for r in rows if r.get("kind") == "opd" and "loss" in r]
    train = [{"opd_step": i + 1, **{k: r.get(k) for k, _ in TRAIN}} for i, r in enumerate(opd)]
    cold = [r.get("loss") for r in rows if r.get("kind") == "cold_start" and "loss" in r]
    return {"heldout": points, "train": train, "cold_start_loss": cold}


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def compilation_cache(path: str | None, min_compile_secs: float = 0.5):
    """JAX's persistent compilation cache in ``path`` for the duration (restored afterwards).

    Every OPD segment builds its train step anew (a new jit): with the cache, segments after the
    first load the compiled program instead of compiling it again (~30 s each on 2 CPU cores).
    """
    if not path:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(Path(path).expanduser()))
    jax.config.update(keys[1], min_compile_secs)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def _selection(cfg, study, sel, out, models, pool, heldout, progress, fresh):
    """(selection summary, selected records, as many random records of the de-duplicated pool)
    of arm 4; a finished selection is read back from ``<out>/select``."""
    d = out / "select"
    sel = dataclasses.replace(sel, out_dir=str(d), rule=dataclasses.replace(
        sel.rule, top_n=study.aligned_prompts, fraction=None))
    pool = list(pool[:sel.pool_size] if sel.pool_size else pool)
    if fresh or not (d / "summary.json").exists():
        select_prompts(cfg, sel, models=models, pool=pool, heldout=heldout, progress=progress)
    read = lambda name: [json.loads(x) for x in (d / name).read_text().splitlines() if x.strip()]
    by_id = {r["id"]: r for r in pool}
    selected = [by_id[r["id"]] for r in read("selected.jsonl")]  # in rank order
    status = {r["id"]: r["status"] for r in read("scores.jsonl")}
    clean = [r for r in pool if status.get(r["id"]) not in ("exact_dup", "near_dup")]
    n = min(len(selected), len(clean))
    pick = sorted(np.random.default_rng(cfg.seed).choice(len(clean), n, replace=False)) if n else []
    return json.loads((d / "summary.json").read_text()), selected, [clean[i] for i in pick]


def run_study(cfg: RunConfig, study: StudyConfig, sel: SelectConfig, *, progress: bool = True,
              fresh: bool = False) -> dict[str, Any]:
    """Run the arms, judge the findings, write ``report.md`` + plots; returns the summary."""
    out = Path(study.out_dir.replace("{name}", cfg.name))
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"run": to_dict(cfg), "study": to_dict(study), "select": to_dict(sel)}
    resolved["study"].pop("compilation_cache")
    saved = out / "study_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(resolved)):
        raise ValueError(f"{out} holds a study run with a different config; pass --fresh to "
                         "start over there, or set study.out_dir to another directory")
    saved.write_text(json.dumps(resolved, indent=2))
    with compilation_cache(study.compilation_cache):
        summary = _run_arms(cfg, study, sel, out, progress=progress, fresh=fresh)
    write_study_report(out, cfg, summary)
    (out / "study_summary.json").write_text(json.dumps(summary, indent=2))
    summary["out_dir"] = str(out)
    return summary


def _run_arms(cfg, study, sel, out: Path, *, progress: bool, fresh: bool) -> dict[str, Any]:
    from opd_jax.train.models import build_models
    from opd_jax.train.run import load_data

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
        arms[arm] = {"student": who, "train_prompts": len(records), **_series(run_dir, evals, at),
                     "seconds": time.perf_counter() - t0}
        marker.write_text(json.dumps(arms[arm]))
    summary = {"arms": arms, "findings": judge(arms, study.rules),
               "study": to_dict(study), "seconds": {"models": t_models,
                                                   "total": time.perf_counter() - t_start}}
    if selection is None and (out / "select" / "summary.json").exists():  # resumed arms
        selection = json.loads((out / "select" / "summary.json").read_text())
    if selection is not None:
        summary["selection"] = {k: v for k, v in selection.items() if k != "selected"}
    return summary


# --------------------------------------------------------------------------------------------
# findings
# --------------------------------------------------------------------------------------------


def _ends(arm: dict | None, key: str) -> tuple[float | None, float | None]:
    """(value at OPD step 0, value at the last eval) of a held-out metric, None if missing."""
    if not arm or "heldout" not in arm:
        return None, None
    pts = [p for p in arm["heldout"] if p["opd_step"] != "pre"]
    if not pts:
        return None, None
    return pts[0].get(key), pts[-1].get(key)


def _ok(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def judge(arms: dict[str, dict], rules: FindingRules) -> list[dict[str, Any]]:
    """The paper's findings with their rule, the numbers it reads and the verdict:
    ``"reproduced"``, ``"not reproduced"`` or ``"not run"`` (an arm or a number is missing)."""
    R, F, O = "onpolicy_reverse_kl", "teacher_samples_forward_kl", "onpolicy_overlap"
    out = []

    def add(name, finding, rule, values, needed, test):
        verdict = ("not run" if not _ok(*needed) else
                   "reproduced" if test() else "not reproduced")
        out.append({"id": name, "finding": finding, "rule": rule, "values": values,
                    "verdict": verdict})

    c = arms.get("compatible")
    r0, r1 = _ends(c, R)
    o0, o1 = _ends(c, O)
    add("F1", "OPD from a compatible student works",
        f"held-out on-policy reverse KL falls by more than {rules.rkl_drop:.0%} "
        f"(final < {1 - rules.rkl_drop:.2f} x initial) and held-out top-k overlap rises",
        {"rkl_initial": r0, "rkl_final": r1, "overlap_initial": o0, "overlap_final": o1},
        (r0, r1, o0, o1), lambda: r1 < (1 - rules.rkl_drop) * r0 and o1 > o0)
    i = arms.get("incompatible")
    f0, f1 = _ends(i, F)
    add("F2", "OPD from an incompatible student fails or stalls",
        f"its held-out forward KL on teacher samples falls by less than {rules.stall_drop:.0%} "
        f"or rises (final > {1 - rules.stall_drop:.2f} x initial)",
        {"fkl_initial": f0, "fkl_final": f1}, (f0, f1), lambda: f1 > (1 - rules.stall_drop) * f0)
    cs = arms.get("cold_start")
    _, g1 = _ends(cs, F)
    _, p1 = _ends(cs, O)
    _, q1 = _ends(i, O)
    add("F3", "an off-policy cold start rescues the failing OPD",
        f"final forward KL on teacher samples of the cold-start arm < {rules.rescue_ratio} x that "
        "of the incompatible OPD arm, and its final overlap is higher",
        {"fkl_final_cold_start": g1, "fkl_final_incompatible": f1,
         "overlap_final_cold_start": p1, "overlap_final_incompatible": q1},
        (g1, f1, p1, q1), lambda: g1 < rules.rescue_ratio * f1 and p1 > q1)
    _, a_r = _ends(arms.get("aligned"), R)
    _, b_r = _ends(arms.get("random"), R)
    _, a_f = _ends(arms.get("aligned"), F)
    _, b_f = _ends(arms.get("random"), F)
    add("F4", "OPD on teacher-aligned prompts beats as many random prompts",
        f"final held-out on-policy reverse KL of the aligned arm < {1 - rules.aligned_margin:.2f} x "
        "the random arm's, and its forward KL on teacher samples is not higher",
        {"rkl_final_aligned": a_r, "rkl_final_random": b_r, "fkl_final_aligned": a_f,
         "fkl_final_random": b_f}, (a_r, b_r, a_f, b_f),
        lambda: a_r < (1 - rules.aligned_margin) * b_r and a_f <= b_f)
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def plot_study(out: Path, arms: dict[str, dict]) -> list[Path]:
    """``heldout.png`` (held-out metrics at each eval, by OPD step) and ``train_steps.png`` (the
    mechanism metrics of every OPD step; cold-start SFT loss in the last panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {a: r for a, r in arms.items() if "heldout" in r}
    paths = []
    for fname, keys, title, rows_of in [
            ("heldout.png", HELDOUT, "held-out eval", lambda r: [p for p in r["heldout"]
                                                                 if p["opd_step"] != "pre"]),
            ("train_steps.png", TRAIN, "training rollouts", lambda r: r["train"])]:
        panels = keys + ([("cold_start_loss", "cold-start SFT loss")]
                         if fname == "train_steps.png" else [])
        cols = 4
        fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols,
                                 figsize=(4.6 * cols, 3.4 * math.ceil(len(panels) / cols)),
                                 squeeze=False)
        for ax, (key, label) in zip(axes.flat, panels):
            for arm, r in ran.items():
                if key == "cold_start_loss":
                    ys = r.get("cold_start_loss") or []
                    if ys:
                        ax.plot(range(1, len(ys) + 1), [_nan(y) for y in ys], label=arm)
                    ax.set_xlabel("cold-start step")
                    continue
                rows = rows_of(r)
                ax.plot([p["opd_step"] for p in rows], [_nan(p.get(key)) for p in rows],
                        marker="o" if fname == "heldout.png" else None, ms=3, label=arm)
                ax.set_xlabel("OPD step")
            ax.set_title(f"{label} ({'teacher rollouts' if key == 'cold_start_loss' else title})",
                         fontsize=9)
            ys = [y for line in ax.lines for y in line.get_ydata() if np.isfinite(y)]
            if key in LOG_SCALE and ys and min(ys) > 0:  # arms differ by orders of magnitude
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=80)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def _f(x) -> str:
    return "-" if not _ok(x) else f"{x:.4g}"


def describe_model(spec: dict) -> str:
    """A short description of a ModelSpec dict, e.g. ``default minus layers [10, 15, 20]``."""
    d = spec.get("derive") or {}
    name = "SmolLM2-135M-Instruct" if spec["source"] == "default" else spec["source"]
    if d.get("drop_layers"):
        return f"{name} minus layers {list(d['drop_layers'])}"
    if d.get("keep_every"):
        return f"{name}, keeping every layer i with i % {d['keep_every']} == 0"
    if d.get("keep_layers"):
        return f"{name}, layers {list(d['keep_layers'])}"
    sizes = {k: d[k] for k in ("n_layers", "d_model", "ffn_dim") if d.get(k)}
    return name + (f" ({', '.join(f'{k}={v}' for k, v in sizes.items())})" if sizes else "")


def format_study_report(cfg: RunConfig, summary: dict[str, Any], plots: Sequence[Path]) -> str:
    """The markdown report: setup, findings table, held-out tables per arm, plots, selection."""
    st, arms = summary["study"], summary["arms"]
    lines = ["# OPD study: the paper's findings in miniature", "",
             f"Teacher: {describe_model(to_dict(cfg.teacher))}; compatible student: "
             f"{describe_model(to_dict(cfg.student))}; incompatible student: "
             f"{describe_model(st['incompatible_student'])}. Data: {cfg.data.source}:"
             f"{cfg.data.name or cfg.data.path}; objective {cfg.loss.objective} "
             f"(top_k {cfg.loss.top_k}), lr {cfg.optim.lr}, {st['batch_prompts']} prompts x "
             f"{cfg.sampler.max_new_tokens} new tokens a step, T={cfg.sampler.temperature}; "
             f"{st['opd_steps']} OPD steps per arm, held-out eval on {st['eval_prompts']} prompts "
             f"every {st['eval_every']} steps (eval sampling T={st['eval_temperature']}); "
             f"cold start: {st['cold_start_steps']} SFT steps; seed {cfg.seed}. Wall time "
             f"{summary['seconds']['total'] / 60:.1f} min.", "",
             "## Findings", "",
             "Verdicts follow the rules from the numbers below (\"not run\": an arm or a number "
             "is missing). The held-out \"initial\" value is the eval at OPD step 0 (for the "
             "cold-start arm: after the cold start).", "",
             "| # | paper finding | rule | numbers | verdict |", "|---|---|---|---|---|"]
    for f in summary["findings"]:
        nums = ", ".join(f"{k}={_f(v)}" for k, v in f["values"].items())
        lines.append(f"| {f['id']} | {f['finding']} | {f['rule']} | {nums} | **{f['verdict']}** |")
    lines += ["", "Read the two KLs together: on repetitive junk the teacher predicts the "
              "repetition too, so a low reverse KL on the student's own samples alone can hide a "
              "broken student; the forward KL on the teacher's samples cannot.", "",
              "## Held-out evaluations", ""]
    cols = [k for k, _ in HELDOUT]
    for arm, r in arms.items():
        lines.append(f"### {ARM_TITLES[arm]}")
        if "heldout" not in r:
            lines += ["", f"skipped: {r.get('skipped', '?')}", ""]
            continue
        lines += ["", f"student: {r['student']}; training prompts: {r['train_prompts']}; "
                  f"wall time {r['seconds']:.0f} s.", "",
                  "| OPD step | " + " | ".join(lbl for _, lbl in HELDOUT) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for p in r["heldout"]:
            step = "before cold start" if p["opd_step"] == "pre" else p["opd_step"]
            lines.append(f"| {step} | " + " | ".join(_f(p.get(k)) for k in cols) + " |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    sel = summary.get("selection")
    if sel:
        c = sel["counts"]
        m = sel["means"]
        lines += ["## Prompt selection (arm 4)", "",
                  f"Pool {sel['pool']} prompts; removed as exact / near duplicates of held-out "
                  f"prompts: {c['exact_dup']} / {c['near_dup']}; teacher incorrect "
                  f"{c['teacher_incorrect']}, unconfident {c['teacher_unconfident']}; selected "
                  f"{sel['selected_count']} (rule: {sel['rule']['rank_by']}, top "
                  f"{sel['rule']['top_n']}). Full report: [select/report.md](select/report.md).", "",
                  "| signal | pool | selected |", "|---|---|---|"]
        for k in ("reverse_kl", "overlap", "teacher_logprob", "teacher_correct",
                  "student_accuracy"):
            lines.append(f"| {k} | {_f(m['pool'].get(k))} | {_f(m['selected'].get(k))} |")
        lines.append("")
    lines += ["## Notes", "",
              f"- Each arm's OPD runs as stages of {st['eval_every']} steps with an eval stage "
              "between them; each stage starts a fresh optimizer state (AdamW moments restart).",
              "- Training-step plots show the loss (full-vocabulary reverse KL on that step's "
              "rollouts) and mechanism metrics of the training rollouts; held-out plots show the "
              "eval stages.", ""]
    return "\n".join(lines)


def write_study_report(out: Path, cfg: RunConfig, summary: dict[str, Any]) -> Path:
    plots = plot_study(out, summary["arms"])
    path = out / "report.md"
    path.write_text(format_study_report(cfg, summary, plots))
    return path
