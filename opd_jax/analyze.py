"""``opd-jax analyze RUN_DIR``: PNG plots of the mechanism metrics and a markdown summary."""

from __future__ import annotations

import json
from pathlib import Path

from opd_jax.checks import agg_pyplot
from opd_jax.train.metrics_log import MetricsLog
from opd_jax.train.run import format_summary

PANELS = [
    ("loss", "loss"),
    ("token_reverse_kl", "sampled-token reverse KL (log S - log T)"),
    ("overlap", "top-k overlap |S ∩ T| / k"),
    ("student_shared_mass", "student mass on shared top-k"),
    ("teacher_shared_mass", "teacher mass on shared top-k"),
    ("student_entropy", "student entropy"),
    ("teacher_entropy", "teacher entropy"),
    ("completion_len", "completion length"),
]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Per-step curves of each train stage and per-position curves of its last step."""
    plt = agg_pyplot("opd-jax analyze's plots")
    run_dir = Path(run_dir)
    rows = [r for r in MetricsLog(run_dir).read() if "loss" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps to plot; run "
                         "`opd-jax train` first")
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    out = []

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=80)
        plt.close(fig)
        return run_dir / name

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    offset = 0
    for stage in stages:
        srows = [r for r in rows if r["stage"] == stage]
        steps = [offset + r["step"] for r in srows]
        for ax, (key, title) in zip(axes.flat, PANELS):
            ys = [r.get(key) for r in srows]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], label=stage)
            ax.set_title(title, fontsize=10)
        offset = steps[-1]
    for ax in axes.flat:
        ax.set_xlabel("step (all stages)")
        if ax.get_legend_handles_labels()[0]:  # panels with no data for any stage stay empty
            ax.legend(fontsize=8)
    out.append(save(fig, "mechanism_metrics.png"))

    last = next((r for r in reversed(rows) if r.get("curves")), None)
    if last is not None:
        fig, axes = plt.subplots(1, len(last["curves"]), figsize=(4.5 * len(last["curves"]), 3.5))
        axes = [axes] if len(last["curves"]) == 1 else axes
        for ax, (key, ys) in zip(axes, last["curves"].items()):
            ax.plot([float("nan") if y is None else y for y in ys])
            ax.set_title(f"{key} by position ({last['stage']} step {last['step']})", fontsize=9)
            ax.set_xlabel("completion position")
        out.append(save(fig, "per_position.png"))
    return out


def write_report(run_dir: str | Path) -> Path:
    """``summary.md``: the run summary table and links to the plots."""
    run_dir = Path(run_dir)
    plots = plot_run(run_dir)
    summary_path = run_dir / "summary.json"
    text = ["# opd_jax run report", ""]
    if summary_path.exists():
        text += ["```", format_summary(json.loads(summary_path.read_text())).strip(), "```", ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    path = run_dir / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path
