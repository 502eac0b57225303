"""``opd-jax analyze RUN_DIR``: PNG plots of the mechanism metrics and a markdown summary.

``summary.md`` opens with the held-out before / after / teacher table, then the plots:
``mechanism_metrics.png`` (per-step training metrics, raw values thin and a moving average bold,
stages in order on one step axis), ``heldout.png`` (every held-out evaluation of the run, in run
order, with the teacher's accuracy as a line) and ``per_position.png`` (the last step's metrics by
completion position).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from opd_jax.checks import agg_pyplot
from opd_jax.train.metrics_log import MetricsLog
from opd_jax.train.run import format_summary

# (metrics.jsonl key, title, y-axis label)
PANELS = [
    ("loss", "training loss", "loss (objective units)"),
    ("token_reverse_kl", "sampled-token reverse KL (log S - log T)", "nats / token"),
    ("overlap", "top-k overlap |S ∩ T| / k", "fraction"),
    ("student_p_sum_intersection", "student mass on shared top-k (intersecting positions)",
     "probability"),
    ("teacher_p_sum_intersection", "teacher mass on shared top-k (intersecting positions)",
     "probability"),
    ("student_entropy", "student entropy", "nats"),
    ("teacher_entropy", "teacher entropy", "nats"),
    ("completion_len", "completion length", "tokens"),
]
# held-out evaluation keys (summary.json "evals"), title, y-axis label
HELDOUT = [
    ("accuracy", "held-out accuracy (greedy / avg@1)", "fraction correct"),
    ("onpolicy_reverse_kl", "reverse KL on the student's samples", "nats / token"),
    ("teacher_samples_forward_kl", "forward KL on the teacher's samples", "nats / token"),
    ("onpolicy_overlap", "top-k overlap on the student's samples", "fraction"),
]
# the before / after table at the top of summary.md
TABLE = [("accuracy", "accuracy"), ("onpolicy_reverse_kl", "reverse KL, own samples (nats)"),
         ("teacher_samples_forward_kl", "forward KL, teacher samples (nats)"),
         ("onpolicy_overlap", "top-k overlap, own samples"),
         ("onpolicy_student_p_sum_intersection", "student shared mass (intersecting)")]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN until one is seen).

    >>> moving_average([1.0, 3.0, float("nan"), 5.0], 2)
    [1.0, 2.0, 2.0, 4.0]
    """
    out, recent = [], []
    for v in values:
        if not math.isnan(v):
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Per-step curves of each train stage, the held-out evaluations, and per-position curves of
    the last step; returns the PNG paths."""
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
    for i, stage in enumerate(stages):
        srows = [r for r in rows if r["stage"] == stage]
        steps = [offset + r["step"] for r in srows]
        color = f"C{i % 10}"
        window = max(1, len(srows) // 10)
        for ax, (key, title, ylabel) in zip(axes.flat, PANELS):
            ys = [float("nan") if r.get(key) is None else float(r[key]) for r in srows]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(steps, ys, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(steps, moving_average(ys, window), color=color, linewidth=2,
                    label=f"{stage} (mean of {window})" if window > 1 else stage)
        offset = steps[-1]
    for ax, (_, title, ylabel) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step (stages in order)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # panels with no data for any stage stay empty
            ax.legend(fontsize=8)
    out.append(save(fig, "mechanism_metrics.png"))

    heldout = _plot_heldout(plt, run_dir, save)
    if heldout is not None:
        out.append(heldout)

    last = next((r for r in reversed(rows) if r.get("curves")), None)
    if last is not None:
        fig, axes = plt.subplots(1, len(last["curves"]), figsize=(4.5 * len(last["curves"]), 3.5))
        axes = [axes] if len(last["curves"]) == 1 else axes
        for ax, (key, ys) in zip(axes, last["curves"].items()):
            ax.plot([float("nan") if y is None else y for y in ys])
            ax.set_title(f"{key} by position ({last['stage']} step {last['step']})", fontsize=9)
            ax.set_xlabel("completion position (tokens)")
            ax.grid(alpha=0.3)
        out.append(save(fig, "per_position.png"))
    return out


def _evals(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("evals", {}) if path.exists() else {}


def _plot_heldout(plt, run_dir: Path, save) -> Path | None:
    """``heldout.png``: each held-out metric at every evaluation of the run (run order)."""
    evals = _evals(run_dir)
    if not evals:
        return None
    names = list(evals)
    fig, axes = plt.subplots(1, len(HELDOUT), figsize=(4.5 * len(HELDOUT), 3.8))
    for ax, (key, title, ylabel) in zip(axes, HELDOUT):
        ys = [evals[n].get(key) for n in names]
        xs = range(len(names))
        ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label="student")
        if key == "accuracy":
            teacher = next((e["teacher_accuracy"] for e in evals.values()
                            if e.get("teacher_accuracy") is not None), None)
            if teacher is not None:
                ax.axhline(teacher, color="k", linestyle="--", label="teacher")
            ax.legend(fontsize=8)
        ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("evaluation (run order)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return save(fig, "heldout.png")


def heldout_table(evals: dict) -> list[str]:
    """The held-out before / after (/ teacher) table as markdown lines (empty without evals)."""
    if not evals:
        return []
    names = list(evals)
    teacher = next((e.get("teacher_accuracy") for e in evals.values()
                    if e.get("teacher_accuracy") is not None), None)
    head = ["held-out metric", *names] + (["teacher"] if teacher is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in TABLE:
        cells = [f"{evals[n][key]:.4f}" if isinstance(evals[n].get(key), (int, float)) else "-"
                 for n in names]
        if teacher is not None:
            cells.append(f"{teacher:.4f}" if key == "accuracy" else "-")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def write_report(run_dir: str | Path) -> Path:
    """``summary.md``: the held-out table first, then the plots and the full run summary."""
    run_dir = Path(run_dir)
    plots = plot_run(run_dir)
    summary_path = run_dir / "summary.json"
    text = ["# opd_jax run report", ""]
    table = heldout_table(_evals(run_dir))
    if table:
        text += ["## Held-out: before and after", "", *table, ""]
    text += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    if summary_path.exists():
        text += ["## Run summary", "", "```",
                 format_summary(json.loads(summary_path.read_text())).strip(), "```"]
    path = run_dir / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path
