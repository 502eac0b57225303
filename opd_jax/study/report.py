"""The study's plots (held-out evals and training steps per arm) and its markdown report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from opd_jax.checks import agg_pyplot
from opd_jax.config.core import to_dict
from opd_jax.config.run import RunConfig
from opd_jax.study.arms import HELDOUT, TRAIN
from opd_jax.study.findings import all_finite

ARM_TITLES = {"compatible": "1. OPD, compatible student", "incompatible": "2. OPD, incompatible student",
              "cold_start": "3. cold start (SFT) then OPD, incompatible student",
              "aligned": "4a. OPD on teacher-aligned (selected) prompts",
              "random": "4b. OPD on as many random prompts"}
LOG_SCALE = ("onpolicy_reverse_kl", "teacher_samples_forward_kl", "loss", "cold_start_loss")


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def plot_study(out: Path, arms: dict[str, dict]) -> list[Path]:
    """``heldout.png`` (held-out metrics at each eval, by OPD step) and ``train_steps.png`` (the
    mechanism metrics of every OPD step; cold-start SFT loss in the last panel)."""
    plt = agg_pyplot("the study's plots")

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
    return "-" if not all_finite(x) else f"{x:.4g}"


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
    """Write the plots and ``report.md`` into ``out``; returns the report's path."""
    plots = plot_study(out, summary["arms"])
    path = out / "report.md"
    path.write_text(format_study_report(cfg, summary, plots))
    return path
