"""The findings of the capability study, judged from bootstrap intervals.

Every finding is one or more comparisons of two intervals (:mod:`.stats`) with a claimed
direction. Verdicts:

* ``"reproduced"``: every comparison's intervals separate in the claimed direction;
* ``"not reproduced"``: some comparison's intervals overlap, or separate the other way (the
  finding's ``note`` says which);
* ``"not run"``: an arm or a number it needs is missing.

The rules are fixed before the numbers are seen (they read only the arms' held-out values); a
finding that does not reproduce is reported with its numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from opd_jax.study.capability.stats import Interval, compare, interval, ratio_interval

ACC, RKL, FKL = "accuracy", "onpolicy_reverse_kl", "teacher_samples_forward_kl"
# metric -> (per-prompt numerator, denominator or None)
VALUES = {ACC: ("correct", None), RKL: ("rkl", "rkl_tokens"), FKL: ("fkl", "fkl_tokens")}
LABELS = {ACC: "accuracy", RKL: "reverse KL", FKL: "forward KL"}


def seed_values(arm: dict | None, step: Any, metric: str) -> tuple[list, list | None] | None:
    """``(num [seeds][prompts], den or None)`` of ``metric`` at OPD step ``step`` (``"last"`` =
    the final point) over the arm's seeds; None when missing or not finite."""
    if not arm or not arm.get("seeds"):
        return None
    num_key, den_key = VALUES[metric]
    nums, dens = [], []
    for run in arm["seeds"].values():
        pts = run.get("points") or []
        pt = pts[-1] if step == "last" and pts else next(
            (p for p in pts if p["opd_step"] == step), None)
        per = (pt or {}).get("per_prompt") or {}
        if num_key not in per or (den_key and den_key not in per):
            return None
        nums.append(per[num_key])
        dens.append(per[den_key] if den_key else [1.0] * len(per[num_key]))
    flat = [x for row in nums + dens for x in row]
    if not flat or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in flat):
        return None
    return nums, (dens if den_key else None)


class Judge:
    """Builds intervals with the study's bootstrap settings (``samples``, ``level``, ``seed``)."""

    def __init__(self, samples: int, level: float, seed: int):
        self.kw = {"samples": samples, "level": level, "seed": seed}

    def at(self, arms: dict, arm: str, step: Any, metric: str) -> Interval | None:
        v = seed_values(arms.get(arm), step, metric)
        return None if v is None else interval(*v, label=f"{arm}/{step}/{metric}", **self.kw)

    def change(self, arms: dict, arm: str, metric: str) -> Interval | None:
        """``final / initial`` of ``metric`` in ``arm`` (paired over prompts)."""
        a, b = (seed_values(arms.get(arm), s, metric) for s in ("last", 0))
        if a is None or b is None:
            return None
        return ratio_interval(a[0], a[1], b[0], b[1], label=f"{arm}/ratio/{metric}", **self.kw)

    def teacher(self, correct: list[float] | None, name: str) -> Interval | None:
        if not correct:
            return None
        return interval([correct], label=f"teacher/{name}", **self.kw)


def _finding(fid: str, claim: str, rule: str,
             comparisons: list[tuple[str, Interval | None, str, Interval | None, str]]
             ) -> dict[str, Any]:
    rows, results = [], []
    for a_name, a, claim_dir, b_name, b in comparisons:
        result = None if a is None or b is None else compare(a, b, claim_dir)
        results.append(result)
        rows.append({"a": a_name, "a_interval": a.as_dict() if a else None, "claim": claim_dir,
                     "b": b_name, "b_interval": b.as_dict() if b else None, "result": result})
    if any(r is None for r in results):
        verdict, note = "not run", "an arm or a number is missing"
    elif all(r == "separate" for r in results):
        verdict, note = "reproduced", "every interval pair separates as claimed"
    else:
        verdict = "not reproduced"
        note = ("intervals separate the other way" if "reversed" in results
                else "intervals overlap")
    return {"id": fid, "finding": claim, "rule": rule, "comparisons": rows, "verdict": verdict,
            "note": note}


def judge_capability(arms: dict[str, dict], teacher: dict | None, *, samples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """The findings (T, F1-F5) from the arms (``{arm: {"seeds": {seed: {"points": [...]}}}}``)
    and the teacher's before / after correctness (``{"before": {"correct"}, "after": ...}``)."""
    j = Judge(samples, level, seed)
    pct = f"{level:.0%}"
    last: Callable[[str, str], Interval | None] = lambda arm, m: j.at(arms, arm, "last", m)
    first: Callable[[str, str], Interval | None] = lambda arm, m: j.at(arms, arm, 0, m)
    t = teacher or {}
    out = [_finding(
        "T", "post-training gives the teacher a capability it lacked (its task family)",
        f"post-trained teacher's held-out accuracy > the base teacher's ({pct} intervals "
        "separate; bootstrap over prompts)",
        [("teacher after", j.teacher((t.get("after") or {}).get("correct"), "after"), "greater",
          "teacher before", j.teacher((t.get("before") or {}).get("correct"), "before"))])]
    out.append(_finding(
        "F1", "OPD from a compatible student works",
        f"compatible arm: final held-out reverse KL < initial and final forward KL on teacher "
        f"samples < initial ({pct} intervals separate)",
        [("compatible final rKL", last("compatible", RKL), "less",
          "compatible initial rKL", first("compatible", RKL)),
         ("compatible final fKL", last("compatible", FKL), "less",
          "compatible initial fKL", first("compatible", FKL))]))
    out.append(_finding(
        "F2", "OPD from an incompatible student fails or stalls",
        "forward KL on teacher samples, final / initial: incompatible arm's ratio > compatible "
        f"arm's ({pct} intervals separate)",
        [("incompatible fKL final/initial", j.change(arms, "incompatible", FKL), "greater",
          "compatible fKL final/initial", j.change(arms, "compatible", FKL))]))
    out.append(_finding(
        "F3", "an off-policy cold start rescues the failing OPD",
        f"final forward KL on teacher samples: cold-start arm < incompatible arm ({pct} "
        "intervals separate)",
        [("cold_start final fKL", last("cold_start", FKL), "less",
          "incompatible final fKL", last("incompatible", FKL))]))
    out.append(_finding(
        "F4", "OPD on the teacher's post-training prompts beats a control pool deduplicated "
        "from them",
        "final held-out accuracy (teacher's task family), post-trained teacher: aligned-prompt "
        f"arm > control-pool arm ({pct} intervals separate)",
        [("post_aligned final acc", last("post_aligned", ACC), "greater",
          "post_control final acc", last("post_control", ACC))]))
    out.append(_finding(
        "F5", "OPD helps only when the teacher offers a capability the student has not seen",
        "on the same aligned prompts: the post-trained teacher's arm ends with higher held-out "
        "accuracy than its start and than the untouched teacher's (compatible) arm "
        f"({pct} intervals separate)",
        [("post_aligned final acc", last("post_aligned", ACC), "greater",
          "post_aligned initial acc", first("post_aligned", ACC)),
         ("post_aligned final acc", last("post_aligned", ACC), "greater",
          "compatible final acc", last("compatible", ACC))]))
    return out


def arm_intervals(arms: dict[str, dict], *, samples: int = 2000, level: float = 0.95,
                  seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Per arm, per evaluation step: the intervals of accuracy and both KLs (``None`` where a
    number is missing), and the mean over seeds of every held-out token mean."""
    j = Judge(samples, level, seed)
    out: dict[str, list[dict[str, Any]]] = {}
    for arm, r in arms.items():
        runs = list((r.get("seeds") or {}).values())
        if not runs:
            continue
        rows = []
        for p in runs[0]["points"]:
            step = p["opd_step"]
            row: dict[str, Any] = {"opd_step": step}
            for m in VALUES:
                iv = j.at(arms, arm, step, m)
                row[m] = iv.as_dict() if iv else None
            pts = [q for run in runs for q in run["points"] if q["opd_step"] == step]
            keys = {k for q in pts for k in q.get("means", {})}
            row["means"] = {k: _mean([q.get("means", {}).get(k) for q in pts]) for k in keys}
            rows.append(row)
        out[arm] = rows
    return out


def _mean(xs: list) -> float | None:
    ok = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(ok) / len(ok) if ok and len(ok) == len(xs) else None
