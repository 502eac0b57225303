"""The paper's findings judged from the arms' held-out numbers by the stated rules."""

from __future__ import annotations

import math
from typing import Any

from opd_jax.study.config import FindingRules


def _ends(arm: dict | None, key: str) -> tuple[float | None, float | None]:
    """(value at OPD step 0, value at the last eval) of a held-out metric, None if missing."""
    if not arm or "heldout" not in arm:
        return None, None
    pts = [p for p in arm["heldout"] if p["opd_step"] != "pre"]
    if not pts:
        return None, None
    return pts[0].get(key), pts[-1].get(key)


def all_finite(*xs) -> bool:
    """True when every argument is a finite int or float (not None, NaN or inf).

    >>> all_finite(1, 2.5), all_finite(1, None), all_finite(float("nan"))
    (True, False, False)
    """
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def judge(arms: dict[str, dict], rules: FindingRules) -> list[dict[str, Any]]:
    """The paper's findings with their rule, the numbers it reads and the verdict:
    ``"reproduced"``, ``"not reproduced"`` or ``"not run"`` (an arm or a number is missing)."""
    R, F, O = "onpolicy_reverse_kl", "teacher_samples_forward_kl", "onpolicy_overlap"
    out = []

    def add(name, finding, rule, values, needed, test):
        verdict = ("not run" if not all_finite(*needed) else
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
