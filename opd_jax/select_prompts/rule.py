"""The selection rule: filter the scored prompts on the teacher, rank the rest, keep the top."""

from __future__ import annotations

import math

import numpy as np

from opd_jax.data import hash_unit
from opd_jax.select_prompts.config import RuleSpec


def _zscores(values: list) -> list[float]:
    xs = np.array([np.nan if v is None else v for v in values], np.float64)
    ok = np.isfinite(xs)
    if not ok.any():
        return [0.0] * len(values)
    mu, sd = xs[ok].mean(), xs[ok].std()
    z = np.where(ok, (xs - mu) / sd if sd > 0 else 0.0, 0.0)
    return z.tolist()


def apply_rule(rows: list[dict], rule: RuleSpec, *, seed: int = 0) -> list[dict]:
    """Set ``status`` (and ``rank`` for selected rows) on ``rows`` (dicts with ``record``,
    ``scores`` and ``status`` None or a dedup status); returns ``rows``. Ties keep pool order."""
    eligible = []
    for r in rows:
        if r["status"] is not None:
            continue
        s = r["scores"]
        if s.get("teacher_correct") is None and rule.uncheckable == "drop":
            r["status"] = "uncheckable"
        elif rule.teacher_correct and s.get("teacher_correct") == 0.0:
            r["status"] = "teacher_incorrect"
        elif (rule.min_teacher_logprob is not None
              and s["teacher_logprob"] < rule.min_teacher_logprob) or (
                rule.max_teacher_entropy is not None
                and s["teacher_answer_entropy"] > rule.max_teacher_entropy):
            r["status"] = "teacher_unconfident"
        else:
            eligible.append(r)
    if rule.rank_by == "score":
        total = np.zeros(len(eligible))
        for name, w in rule.weights.items():
            total += w * np.asarray(_zscores([r["scores"].get(name) for r in eligible]))
        for r, v in zip(eligible, total.tolist()):
            r["scores"]["selection_score"] = v
        keys = total.tolist()
    elif rule.rank_by == "random":
        keys = [hash_unit(r["record"]["id"], salt=f"select{seed}") for r in eligible]
    else:
        keys = [r["scores"].get(rule.rank_by) for r in eligible]
    sign = -1.0 if rule.descending and rule.rank_by != "random" else 1.0
    order = sorted(range(len(eligible)), key=lambda i: (keys[i] is None or not math.isfinite(
        keys[i]), sign * keys[i] if keys[i] is not None and math.isfinite(keys[i]) else 0.0, i))
    n_keep = (min(rule.top_n, len(eligible)) if rule.top_n is not None else
              math.ceil(rule.fraction * len(eligible)) if rule.fraction is not None else
              len(eligible))
    for rank, i in enumerate(order):
        eligible[i]["status"] = "selected" if rank < n_keep else "below_cutoff"
        if rank < n_keep:
            eligible[i]["rank"] = rank
    return rows
