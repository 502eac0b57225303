"""The outputs of ``rank-prompts``: ``selected.jsonl``, ``scores.jsonl``, ``summary.json`` and
the markdown ``report.md``."""

from __future__ import annotations

import json
from pathlib import Path

from opd_jax.select_prompts.config import SIGNALS, STATUSES


def _jsonl(path: Path, items) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def write_outputs(out_dir: Path, rows: list[dict], selected: list[dict], summary: dict) -> None:
    """Write the selected records (with ``scores`` and ``rank``), every pool row's status and
    scores, the summary and the report into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _jsonl(out_dir / "selected.jsonl", ({**r["record"], "scores": r["scores"], "rank": r["rank"]}
                                        for r in selected))
    _jsonl(out_dir / "scores.jsonl", ({"id": r["record"]["id"], "prompt": r["record"]["prompt"],
                                       "answer": r["record"].get("answer"), "status": r["status"],
                                       "scores": r["scores"],
                                       "teacher_completion": r.get("teacher_completion")}
                                      for r in rows))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(format_report(summary))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_report(summary: dict) -> str:
    """The markdown report: dedup counts, the rule's funnel, signal means pool vs selected."""
    c, d, rule = summary["counts"], summary["dedup"], summary["rule"]
    lines = ["# Prompt selection report", "",
             f"Pool: {summary['pool']} prompts; held-out set: {summary['heldout']} prompts; "
             f"scored after de-duplication: {summary['scored']}; "
             f"selected: {summary['selected_count']}.", "",
             "## De-duplication against the held-out set", "",
             "| rule | removed |", "|---|---|",
             f"| exact (normalised text: NFKC, case-folded, whitespace collapsed)"
             f"{'' if d['exact'] else ' — off'} | {c['exact_dup']} |",
             f"| near duplicate (cosine of {'centred ' if d['center'] else ''}mean-pooled "
             f"teacher hidden states over the {d['embed']} tokens >= {d['threshold']})"
             f"{'' if d['near'] else ' — off'} | {c['near_dup']} |", "",
             "## Selection rule", ""]
    lines.append(f"- teacher's greedy answer must be correct: {rule['teacher_correct']}; "
                 f"prompts without a checkable answer: {rule['uncheckable']}")
    if rule["min_teacher_logprob"] is not None or rule["max_teacher_entropy"] is not None:
        lines.append(f"- teacher confident: mean log-prob of its answer >= "
                     f"{rule['min_teacher_logprob']}, mean entropy <= "
                     f"{rule['max_teacher_entropy']}")
    how = (f"weighted z-score {rule['weights']}" if rule["rank_by"] == "score" else
           rule["rank_by"])
    keep = (f"top {rule['top_n']}" if rule["top_n"] is not None else
            f"top {rule['fraction']:.0%}" if rule["fraction"] is not None else "all")
    lines += [f"- rank by {how}" + (", descending" if rule["descending"] and
                                    rule["rank_by"] != "random" else "") + f"; keep {keep}", "",
              "| step | prompts removed |", "|---|---|"]
    for s in STATUSES[2:-1]:
        lines.append(f"| {s} | {c[s]} |")
    lines += [f"| **selected** | **{c['selected']}** |", "",
              "## Signals: pool vs selected (means)", "",
              "| signal | pool (scored) | after filters | selected | selected − pool |",
              "|---|---|---|---|---|"]
    m = summary["means"]
    for k, desc in SIGNALS.items():
        p, e, s = m["pool"][k], m["eligible"][k], m["selected"][k]
        diff = None if p is None or s is None else s - p
        lines.append(f"| {k} ({_cell(desc)}) | {_fmt(p)} | {_fmt(e)} | {_fmt(s)} | {_fmt(diff)} |")
    sec = summary["seconds"]
    lines += ["", f"Time: de-duplication {sec['dedup']:.1f} s, scoring {sec['scoring']:.1f} s."]
    return "\n".join(lines) + "\n"
