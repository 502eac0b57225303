r"""pass@k, Avg@k and :func:`evaluate` over many prompts with several completions each."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from opd_jax.eval.extract import extract_answer
from opd_jax.eval.grading import is_correct


def _check_nck(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}: sample at least k completions.")


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    .. math:: \mathrm{pass@}k = 1 - \binom{n-c}{k} \Big/ \binom{n}{k}
              = 1 - \prod_{i=n-c+1}^{n} \left(1 - \frac{k}{i}\right)

    the probability that a uniformly random size-``k`` subset of the ``n`` samples holds at
    least one correct one (computed as the numerically stable product).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(5, 0, 3)
    (0.25, 1.0, 0.0)
    """
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(n: int, c: int, k: int) -> float:
    r"""Avg@k for one prompt: expected accuracy over ``k`` samples, estimated as ``c / n``.

    The mean of ``k`` samples' correctness has expectation ``p``; ``c / n`` is its unbiased
    estimate from all ``n >= k`` samples (like :func:`pass_at_k`, it uses every sample).
    """
    _check_nck(n, c, k)
    return c / n


def evaluate(
    records: Sequence[Mapping[str, Any]],
    completions_per_record: Sequence[Sequence[str]],
    ks: Sequence[int] = (1,),
    *,
    correct_fn: Callable[[Mapping[str, Any], str], bool] = is_correct,
) -> dict[str, Any]:
    """Grades ``completions_per_record[i]`` (n_i strings) against ``records[i]``.

    Returns a JSON-able dict::

      {"num_prompts", "num_completions", "accuracy" (over all completions),
       "no_answer_rate", "avg@k", "pass@k" (means over prompts, for each k in ks),
       "per_source": {source: {"num_prompts", "num_completions", "accuracy",
                               "avg@k", "pass@k"}},
       "per_prompt": [{"id", "source", "n", "num_correct"}]}

    Every prompt needs at least ``max(ks)`` completions.
    """
    if len(records) != len(completions_per_record):
        raise ValueError(f"{len(records)} records but {len(completions_per_record)} completion "
                         "lists: pass one list of completions per record.")
    if not records:
        raise ValueError("evaluate() got no records: nothing to evaluate.")
    per_prompt, no_answer = [], 0
    for rec, comps in zip(records, completions_per_record):
        if len(comps) < max(ks):
            raise ValueError(f"Prompt {rec['id']!r} has {len(comps)} completions but k={max(ks)} "
                             "was requested: sample at least max(ks) completions per prompt.")
        no_answer += sum(extract_answer(c) is None for c in comps)
        c = sum(bool(correct_fn(rec, comp)) for comp in comps)
        per_prompt.append({"id": rec["id"], "source": rec.get("source", "?"), "n": len(comps),
                           "num_correct": c})

    def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_prompts": len(rows),
            "num_completions": sum(r["n"] for r in rows),
            "accuracy": sum(r["num_correct"] for r in rows) / sum(r["n"] for r in rows),
        }
        for k in ks:
            out[f"avg@{k}"] = float(np.mean([avg_at_k(r["n"], r["num_correct"], k) for r in rows]))
            out[f"pass@{k}"] = float(np.mean([pass_at_k(r["n"], r["num_correct"], k) for r in rows]))
        return out

    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in per_prompt:
        by_source[row["source"]].append(row)
    result = summarise(per_prompt)
    result["no_answer_rate"] = no_answer / result["num_completions"]
    result["per_source"] = {s: summarise(rows) for s, rows in sorted(by_source.items())}
    result["per_prompt"] = per_prompt
    return result
