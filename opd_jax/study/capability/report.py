"""The capability study's plots and ``report.md``: findings with intervals and verdicts, the
teacher before / after, the prompt pools, per-arm held-out tables.

Plots: ``intervals.png`` (accuracy and both KLs over OPD steps per arm: mean over seeds with the
bootstrap band), ``teacher.png`` (the teacher's accuracy before / after post-training), and the
mechanism study's ``heldout.png`` / ``train_steps.png`` (:func:`opd_jax.study.report.plot_study`)
on the means over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from opd_jax.checks import agg_pyplot
from opd_jax.config.core import to_dict
from opd_jax.config.run import RunConfig
from opd_jax.study.capability.arms import TRAIN_KEYS
from opd_jax.study.capability.config import ARM_SPECS
from opd_jax.study.capability.findings import ACC, FKL, LABELS, RKL
from opd_jax.study.report import describe_model, plot_study

ARM_TITLES = {
    "compatible": "1. OPD from the untouched teacher, compatible student, aligned prompts "
                  "(also: the no-new-capability arm)",
    "incompatible": "2. OPD from the untouched teacher, incompatible student",
    "cold_start": "3. cold start (SFT on teacher rollouts) then OPD, incompatible student",
    "post_aligned": "4. OPD from the post-trained teacher on its post-training prompts (aligned)",
    "post_control": "5. OPD from the post-trained teacher on the de-duplicated control pool",
}
MECHANISM = (("onpolicy_overlap", "overlap"), ("onpolicy_student_shared_mass", "student shared mass"),
             ("onpolicy_teacher_shared_mass", "teacher shared mass"))


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _iv(d: dict | None) -> str:
    return "-" if not d else f"{_f(d['estimate'])} [{_f(d['low'])}, {_f(d['high'])}]"


def mean_series(arms: dict[str, dict], intervals: dict[str, list]) -> dict[str, dict]:
    """Per arm, the mean over seeds in the mechanism study's series form (``heldout`` points,
    ``train`` rows, ``cold_start_loss``) for :func:`opd_jax.study.report.plot_study`."""
    out = {}
    for arm, rows in intervals.items():
        runs = list(arms[arm]["seeds"].values())
        steps = sorted({t["opd_step"] for run in runs for t in run["train"]})
        train = [{"opd_step": s, **{k: _avg([t.get(k) for run in runs for t in run["train"]
                                             if t["opd_step"] == s]) for k in TRAIN_KEYS}}
                 for s in steps]
        colds = [run.get("cold_start_loss") or [] for run in runs]
        n = min(map(len, colds)) if colds else 0
        cold = [_avg([c[i] for c in colds]) for i in range(n)]
        out[arm] = {"heldout": [{"opd_step": r["opd_step"], **r["means"]} for r in rows],
                    "train": train, "cold_start_loss": cold}
    return out


def _avg(xs: Sequence) -> float | None:
    ok = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(ok) / len(ok) if ok else None


def plot_capability(out: Path, summary: dict[str, Any]) -> list[Path]:
    """Write ``intervals.png``, ``teacher.png``, ``heldout.png``, ``train_steps.png``."""
    plt = agg_pyplot("the capability study's plots")
    intervals = summary["intervals"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), squeeze=False)
    for ax, metric in zip(axes.flat, (ACC, RKL, FKL)):
        for arm, rows in intervals.items():
            rows = [r for r in rows if r.get(metric)]
            if not rows:
                continue
            x = [r["opd_step"] for r in rows]
            est = [r[metric]["estimate"] for r in rows]
            line, = ax.plot(x, est, marker="o", ms=3, label=arm)
            ax.fill_between(x, [r[metric]["low"] for r in rows], [r[metric]["high"] for r in rows],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"held-out {LABELS[metric]} (mean over seeds, "
                     f"{summary['study']['bootstrap']['level']:.0%} interval)", fontsize=9)
        ax.set_xlabel("OPD step")
        if metric != ACC and any(ln.get_ydata().min() > 0 for ln in ax.lines):
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "intervals.png", dpi=80)
    plt.close(fig)
    paths = [out / "intervals.png"]
    t = summary.get("teacher_intervals") or {}
    if t:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        names = [n for n in ("before", "after") if t.get(n)]
        est = np.array([t[n]["estimate"] for n in names])
        err = np.array([[t[n]["estimate"] - t[n]["low"], t[n]["high"] - t[n]["estimate"]]
                        for n in names]).T
        ax.bar(names, est, yerr=err, capsize=6, color=["#999999", "#3b7dd8"][:len(names)])
        for i, n in enumerate(names):
            ax.text(i, min(t[n]["high"] + 0.03, 0.95), _iv(t[n]), ha="center", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("teacher held-out accuracy, before / after post-training", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "teacher.png", dpi=80)
        plt.close(fig)
        paths.append(out / "teacher.png")
    return paths + plot_study(out, mean_series(summary["arms"], intervals))


def _comparison(c: dict) -> str:
    return (f"{c['a']} {_iv(c['a_interval'])} vs {c['b']} {_iv(c['b_interval'])}: "
            f"{c['result'] or 'missing'}")


def _teacher_section(summary: dict[str, Any]) -> list[str]:
    t, ti = summary.get("teacher"), summary.get("teacher_intervals") or {}
    if not t:
        return ["## The teacher's new capability", "", "not run", ""]
    s = t["solutions"]
    loss = t.get("loss") or []
    lines = ["## The teacher's new capability", "",
             f"Method: {t['method']} (SFT on worked solutions written from each prompt's "
             f"expression, kept only when the task's grader scores them correct). Post-training "
             f"prompts: {t['prompts']} of the training split; solutions kept {s['kept']}, "
             f"not a chain {s['no_expression']}, graded wrong {s['wrong']}. {t['steps']} SFT "
             f"steps x {t['batch_prompts']} examples, lr {t['lr']} ({t['schedule']}); loss "
             f"{_f(loss[0]) if loss else '-'} -> {_f(loss[-1]) if loss else '-'}; "
             f"{t['seconds']['total'] / 60:.1f} min with the evaluations.", "",
             "A training example's completion:", "", "```", t["example_solution"], "```", "",
             f"| teacher | held-out accuracy on {t['eval_prompts']} prompts of its task family "
             "(95% bootstrap interval) |", "|---|---|",
             f"| before post-training | {_iv(ti.get('before'))} |",
             f"| after post-training | {_iv(ti.get('after'))} |", "",
             "| held-out prompt | answer | teacher before | teacher after |", "|---|---|---|---|"]
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ⏎ ")[:160]
    lines += [f"| {cell(e['prompt'])} | {cell(e['answer'])} | {cell(e['before'])} | "
              f"{cell(e['after'])} |" for e in t.get("examples", [])]
    lines += ["", f"Checkpoint (kept): `{t['checkpoint']}`; export it with `opd-jax export "
              f"{t['run_dir']} --to hf DIR`" + (f"; exported to `{t['exported']}` (a folder "
                                                 "`teacher.source` loads)." if t.get("exported")
                                                 else "."), ""]
    return lines


def format_capability_report(cfg: RunConfig, summary: dict[str, Any]) -> str:
    """The markdown report."""
    st, arms = summary["study"], summary["arms"]
    seeds = list(st["seeds"])
    lines = ["# Capability study: the OPD paper's two conditions, in miniature", "",
             f"Teacher: {describe_model(to_dict(cfg.teacher))}, post-trained here on "
             f"{cfg.data.source}:{cfg.data.name} {dict(cfg.data.kwargs)}; compatible student: "
             f"{describe_model(to_dict(cfg.student))}; incompatible student: "
             f"{describe_model(st['incompatible_student'])}. Objective {cfg.loss.objective} "
             f"(top_k {cfg.loss.top_k}), lr {cfg.optim.lr}, {st['batch_prompts']} prompts x "
             f"{cfg.sampler.max_new_tokens} new tokens a step, T={cfg.sampler.temperature}; "
             f"{st['opd_steps']} OPD steps per run, evaluated at steps "
             f"{summary['eval_steps']} on {st['eval_prompts']} held-out prompts of the teacher's "
             f"task family (eval T={st['eval_temperature']}); seeds {seeds} per arm. Wall time "
             f"{summary['seconds']['total'] / 60:.1f} min.", "",
             "## Findings", "",
             f"Each number: mean over {len(seeds)} seeds [{st['bootstrap']['level']:.0%} "
             f"bootstrap interval over seeds and held-out prompts, {st['bootstrap']['samples']} "
             "resamples]. A finding is **reproduced** only when every interval pair it compares "
             "separates in the claimed direction; **not reproduced** when one overlaps (or "
             "separates the other way); **not run** when an arm is missing.", "",
             "| # | paper's claim | rule | our numbers | verdict |", "|---|---|---|---|---|"]
    for f in summary["findings"]:
        nums = "; ".join(_comparison(c) for c in f["comparisons"])
        lines.append(f"| {f['id']} | {f['finding']} | {f['rule']} | {nums} | "
                     f"**{f['verdict']}** ({f['note']}) |")
    lines += [""] + _teacher_section(summary)
    pools = summary.get("pools") or {}
    ctl = pools.get("control")
    lines += ["## Prompt pools", "",
              f"- aligned: the teacher's {pools.get('aligned', '-')} post-training prompts "
              f"({cfg.data.name})."]
    if ctl:
        c = ctl["counts"]
        lines.append(f"- control: {ctl['source']}, {c['pool']} prompts minus {c['exact_dup']} "
                     f"exact and {c['near_dup']} near duplicates of the aligned prompts (embedding "
                     f"{ctl['embedder']}, cosine >= {ctl['threshold']}) -> {c['control']} "
                     f"(opd-jax align-prompts; details in [align/report.md](align/report.md)).")
    lines += ["", "## Held-out results per arm", ""]
    for arm, rows in summary["intervals"].items():
        teacher, student, pool, cold = ARM_SPECS[arm]
        secs = sum(r.get("seconds", 0) for r in arms[arm]["seeds"].values())
        lines += [f"### {ARM_TITLES[arm]}", "",
                  f"teacher: {teacher}; student: {student}; prompts: {pool} "
                  f"({arms[arm]['train_prompts']}); cold start: {cold}; {len(arms[arm]['seeds'])} "
                  f"seeds, wall time {secs:.0f} s.", "",
                  "| OPD step | accuracy | reverse KL | forward KL | "
                  + " | ".join(lbl for _, lbl in MECHANISM) + " |", "|---" * 7 + "|"]
        for r in rows:
            lines.append(f"| {r['opd_step']} | {_iv(r[ACC])} | {_iv(r[RKL])} | {_iv(r[FKL])} | "
                         + " | ".join(_f(r["means"].get(k)) for k, _ in MECHANISM) + " |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in summary.get("plots", [])] + [""]
    lines += ["## Notes", "",
              "- Each run trains one OPD stage: AdamW's moments persist across its evaluation "
              "points (the stage is checkpointed at each evaluation step and the held-out "
              "evaluations run on those checkpoints afterwards, never inside training).",
              "- Step 0 of the arms without a cold start is the untrained student: one "
              "evaluation shared by every seed (greedy decoding and fixed keys make it the same "
              "for each); the cold-start arm's step 0 is its own seed's cold-start result.",
              "- Reverse KL is on the student's own samples, forward KL on the teacher's greedy "
              "answers; on repetitive junk the first alone can look good. Both are token means "
              "over the full vocabulary; intervals resample prompts with their token counts.",
              "- Arm 3 of the issue (the untouched teacher on the same aligned prompts) is the "
              "compatible arm: same teacher, student and prompts.", ""]
    return "\n".join(lines)


def write_capability_report(out: Path, cfg: RunConfig, summary: dict[str, Any]) -> Path:
    """Write the plots and ``report.md`` into ``out``; returns the report's path."""
    summary["plots"] = [p.name for p in plot_capability(out, summary)]
    path = out / "report.md"
    path.write_text(format_capability_report(cfg, summary))
    return path
