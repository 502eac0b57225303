"""The outputs of ``align-prompts``: ``aligned.jsonl``, ``control.jsonl``, ``similarities.jsonl``,
``summary.json``, ``report.md``, and the plain-text table the command prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from opd_jax.align_prompts.texts import PromptSet

SETS = {
    "aligned": "aligned (pool, ranked by similarity)",
    "control": "control (pool minus duplicates)",
    "pool": "whole pool",
    "reference_self": "reference, leave-one-out",
}
COLUMNS = ("count", "mean", "p05", "p25", "p50", "p75", "p95", "max")


def _jsonl(path: Path, items) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for x in items:
            f.write(json.dumps(x, default=str) + "\n")


def write_outputs(out_dir: Path, ref: PromptSet, pool: PromptSet, *, sims: np.ndarray,
                  nearest: np.ndarray, exact: np.ndarray, near: np.ndarray, aligned: np.ndarray,
                  control: np.ndarray, summary: dict) -> None:
    """Write into ``out_dir``: the aligned rows (rank order) and control rows (pool order) as the
    pool file had them plus an ``align`` object (``id``, ``text`` = the matching text,
    ``similarity``, ``nearest_id``, ``rank`` in the similarity ranking), every pool prompt's
    similarity record, the summary and the markdown report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = np.empty(len(pool), np.int64)
    rank[np.argsort(-sims, kind="stable")] = np.arange(len(pool))
    in_aligned = np.zeros(len(pool), bool)
    in_aligned[aligned] = True
    in_control = np.zeros(len(pool), bool)
    in_control[control] = True

    def info(i: int) -> dict:
        return {"id": pool.ids[i], "text": pool.texts[i], "similarity": float(sims[i]),
                "nearest_id": ref.ids[nearest[i]], "rank": int(rank[i])}

    _jsonl(out_dir / "aligned.jsonl", ({**pool.rows[i], "align": info(i)} for i in aligned))
    _jsonl(out_dir / "control.jsonl", ({**pool.rows[i], "align": info(i)} for i in control))
    _jsonl(out_dir / "similarities.jsonl", (
        {**info(i), "nearest_text": ref.texts[nearest[i]], "exact_dup": bool(exact[i]),
         "near_dup": bool(near[i]), "aligned": bool(in_aligned[i]),
         "control": bool(in_control[i])} for i in range(len(pool))))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(format_report(summary))


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _cells(d: dict) -> list[str]:
    q = d["quantiles"]
    return [str(d["count"]), _num(d["mean"]), *(_num(q[k]) for k in COLUMNS[2:-1]),
            _num(d["max"])]


def format_table(summary: dict) -> str:
    """Plain-text summary: counts, the similarity quantiles of each set, the histogram."""
    c, dist = summary["counts"], summary["distributions"]
    lines = [f"reference {c['reference']} prompts; pool {c['pool']}: exact duplicates "
             f"{c['exact_dup']}, near duplicates (cosine >= {summary['threshold']}, not exact) "
             f"{c['near_dup']}; control {c['control']}; aligned {c['aligned']}",
             f"embedder: {summary['embedder']}"
             + ("; centred on the reference mean" if summary["center"] else ""), "",
             "max cosine to the reference"]
    rows = [["set", *COLUMNS]] + [[k, *_cells(dist[k])] for k in SETS]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
              for r in rows]
    edges = dist["pool"]["histogram"]["edges"]
    lines += ["", "histogram (prompts per similarity bin)",
              "bin            " + "".join(f"{k:>16}" for k in SETS)]
    for i in range(len(edges) - 1):
        lines.append(f"[{edges[i]:+.2f}, {edges[i + 1]:+.2f}) "
                     + "".join(f"{dist[k]['histogram']['counts'][i]:>16}" for k in SETS))
    return "\n".join(lines)


def format_report(summary: dict) -> str:
    """The markdown report: what was removed, the quantile table, the histogram, examples."""
    c, dist = summary["counts"], summary["distributions"]
    lines = ["# Teacher-aligned prompts", "",
             f"Reference (the teacher's post-training prompts): {c['reference']}; candidate pool: "
             f"{c['pool']}.", "", f"Embedder: {summary['embedder']}"
             + (" (centred on the reference mean)." if summary["center"] else "."), "",
             "## Control set: the pool de-duplicated against the reference", "",
             "| rule | removed |", "|---|---|",
             f"| exact (matching text: instruction suffix removed, whitespace stripped)"
             f"{'' if summary['exact'] else ' — off'} | {c['exact_dup']} |",
             f"| near duplicate (max cosine >= {summary['threshold']}; not exact) | "
             f"{c['near_dup']} |",
             f"| **control set** | **{c['control']}** of {c['pool'] - c['removed']} kept |", "",
             "## Aligned set", "",
             f"Pool prompts ranked by their max cosine to the reference; rule "
             f"{summary['aligned_rule']}: **{c['aligned']}** prompts.", "",
             "## Similarity to the reference (max cosine)", "",
             "| set | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {title} | " + " | ".join(_cells(dist[k])) + " |" for k, title in SETS.items()]
    edges = dist["pool"]["histogram"]["edges"]
    lines += ["", "| bin | " + " | ".join(SETS) + " |", "|---" * (len(SETS) + 1) + "|"]
    for i in range(len(edges) - 1):
        lines.append(f"| [{edges[i]:.2f}, {edges[i + 1]:.2f}) | " + " | ".join(
            str(dist[k]["histogram"]["counts"][i]) for k in SETS) + " |")
    if summary["examples"]:
        lines += ["", "## First near duplicates", ""]
        for e in summary["examples"]:
            lines += [f"- {e['similarity']:.4f}: pool `{e['pool_id']}` {e['pool']!r} ~ reference "
                      f"`{e['reference_id']}` {e['reference']!r}"]
    return "\n".join(lines) + "\n"
