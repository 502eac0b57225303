"""Grading a completion against a prompt record.

* records from reasoning-gym (``metadata["reasoning_gym"]`` present) are scored by the
  generator's own ``score_answer(extracted_answer, entry)``;
* other records: exact match after :func:`normalize_answer`, or numeric equality within
  ``math.isclose(rel_tol, abs_tol)`` (``"1/2"`` equals ``"0.5"``).

A completion counts as *correct* when its score is 1 (reasoning-gym gives partial credit,
e.g. for an answer that merely contains the oracle; that is not counted as correct).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

from opd_jax.data.sources import RG_KEY, make_reasoning_gym_dataset
from opd_jax.eval.extract import extract_answer, normalize_answer, parse_number


def answers_match(predicted: str | None, reference: str, *, rel_tol: float = 1e-6,
                  abs_tol: float = 1e-9) -> bool:
    """Exact match after normalisation, or numeric equality within tolerance.

    >>> answers_match("1,000.0", "1000"), answers_match("0.5", "1/2"), answers_match("7", "8")
    (True, True, False)
    """
    if predicted is None:
        return False
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if p == r:
        return True
    xp, xr = parse_number(p), parse_number(r)
    return xp is not None and xr is not None and math.isclose(xp, xr, rel_tol=rel_tol,
                                                              abs_tol=abs_tol)


@functools.lru_cache(maxsize=64)
def _rg_scorer(name: str, config_json: str, seed: int, size: int):
    dataset = make_reasoning_gym_dataset(name, seed=seed, size=size,
                                         config=json.loads(config_json))
    return dataset.score_answer


def reasoning_gym_score(record: Mapping[str, Any], answer: str | None) -> float:
    """The reasoning-gym generator's own ``score_answer`` for ``answer`` (in [0, 1])."""
    info = record["metadata"][RG_KEY]
    scorer = _rg_scorer(info["name"], json.dumps(info["config"], sort_keys=True),
                        int(info["seed"]), int(info["size"]))
    entry = {"question": record["prompt"], "answer": record["answer"],
             "metadata": info.get("entry_metadata", {})}
    return float(scorer(answer, entry))


def is_reasoning_gym(record: Mapping[str, Any]) -> bool:
    """True when the record came from :func:`opd_jax.data.load_reasoning_gym`."""
    return RG_KEY in (record.get("metadata") or {})


def score_completion(record: Mapping[str, Any], completion: str, *, rel_tol: float = 1e-6,
                     abs_tol: float = 1e-9) -> float:
    """Score in [0, 1] of a model completion for ``record`` (0 when no answer is found).

    >>> score_completion({"id": "q", "answer": "12", "metadata": {}}, "3*4 = 12\\nAnswer: 12")
    1.0
    """
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    if is_reasoning_gym(record):
        return reasoning_gym_score(record, predicted)
    if record.get("answer") is None:
        raise ValueError(f"Record {record.get('id')!r} (source {record.get('source')}) has no "
                         "reference answer to grade against. Fix: set answer_key for its source.")
    return 1.0 if answers_match(predicted, record["answer"], rel_tol=rel_tol,
                                abs_tol=abs_tol) else 0.0


def is_correct(record: Mapping[str, Any], completion: str, **tolerances: float) -> bool:
    """True when :func:`score_completion` gives full credit (1.0)."""
    return score_completion(record, completion, **tolerances) >= 1.0 - 1e-9
