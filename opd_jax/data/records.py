"""Prompt records: construction, validation, de-duplication, train/held-out split.

A *prompt record* is a plain, JSON-able dict (so it can travel through grain, be
checkpointed with the iterator state and be written to logs)::

    {
      "id": str,                # unique within a run
      "prompt": str,            # the problem text shown to the student
      "answer": str | None,     # reference final answer (graded by opd_jax.eval)
      "solution": str | None,   # reference solution: OPSD's privileged teacher context
      "source": str,            # where it came from, e.g. "reasoning_gym:chain_sum"
      "metadata": dict,         # JSON-able extras (reasoning-gym entry data lives here)
    }
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

RECORD_KEYS = ("id", "prompt", "answer", "solution", "source", "metadata")


class PromptRecord(TypedDict):
    """Type of a prompt record (a plain dict at run time)."""

    id: str
    prompt: str
    answer: str | None
    solution: str | None
    source: str
    metadata: dict[str, Any]


def to_jsonable(value: Any) -> Any:
    """Returns ``value`` as plain JSON types (tuples -> lists, unknown objects -> str)."""
    return json.loads(json.dumps(value, default=str))


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def make_record(
    id: str,
    prompt: str,
    *,
    source: str,
    answer: Any = None,
    solution: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> PromptRecord:
    """Builds a validated prompt record; numbers given as answers become strings.

    >>> make_record("a/0", "1+1?", source="demo", answer=2)["answer"]
    '2'
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{source}: record {id!r} has an empty or non-string prompt: {prompt!r}")
    return PromptRecord(
        id=str(id),
        prompt=prompt,
        answer=_opt_str(answer),
        solution=_opt_str(solution),
        source=str(source),
        metadata=to_jsonable(dict(metadata or {})),
    )


def require_nonempty(records: Sequence[Any], *, source: str, stage: str, fix: str) -> None:
    """Raises a ``ValueError`` naming the source, the stage and the fix when ``records`` is empty."""
    if len(records) == 0:
        raise ValueError(f"No prompt records left from {source} after {stage}. Fix: {fix}")


def describe_sources(records: Iterable[Mapping[str, Any]]) -> str:
    """A short human string naming the distinct sources of ``records`` (for error messages)."""
    names = sorted({str(r.get("source")) for r in records})
    if not names:
        return "<no records>"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def dedupe_records(
    records: Sequence[PromptRecord], *, key: str = "prompt"
) -> tuple[list[PromptRecord], int]:
    """Removes exact duplicates of ``record[key]``, keeping the first occurrence.

    Returns ``(kept_records, num_removed)``; order of the kept records is preserved.
    Duplicate ``id`` values with *different* prompts are an error (ids must be unique).

    >>> recs = [make_record(str(i), p, source="s") for i, p in enumerate("aba")]
    >>> [r["prompt"] for r in dedupe_records(recs)[0]], dedupe_records(recs)[1]
    (['a', 'b'], 1)
    """
    seen: set[str] = set()
    ids: dict[str, str] = {}
    kept: list[PromptRecord] = []
    for rec in records:
        value = json.dumps(rec[key], sort_keys=True)
        if value in seen:
            continue
        if rec["id"] in ids and ids[rec["id"]] != value:
            raise ValueError(
                f"Duplicate record id {rec['id']!r} (source {rec['source']}) with a different "
                f"{key}. Fix: give records unique ids (set id_key, or drop id_key to number rows)."
            )
        seen.add(value)
        ids[rec["id"]] = value
        kept.append(rec)
    return kept, len(records) - len(kept)


def hash_unit(value: str, salt: str = "") -> float:
    """Deterministic pseudo-uniform number in ``[0, 1)`` from a string (SHA-256 based)."""
    digest = hashlib.sha256(f"{salt}\x00{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_records(
    records: Sequence[PromptRecord],
    *,
    heldout_fraction: float | None = None,
    heldout_size: int | None = None,
    key: str = "prompt",
    salt: str = "opd_jax",
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Deterministic train / held-out split by hashing ``record[key]`` (default: the prompt).

    Each record gets ``u = hash_unit(record[key], salt)``. With ``heldout_fraction`` a record
    is held out iff ``u < heldout_fraction`` (stable when records are added or removed);
    with ``heldout_size`` the ``heldout_size`` records of smallest ``u`` are held out (exact
    size). Records with equal keys always land on the same side, so the splits never share
    a prompt. Input order is preserved within each split. Returns ``(train, heldout)``.
    """
    if (heldout_fraction is None) == (heldout_size is None):
        raise ValueError("split_records: pass exactly one of heldout_fraction or heldout_size.")
    units = [hash_unit(json.dumps(r[key], sort_keys=True), salt) for r in records]
    if heldout_fraction is not None:
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
        held = [u < heldout_fraction for u in units]
    else:
        if not 0 <= heldout_size <= len(records):
            raise ValueError(
                f"heldout_size={heldout_size} must be in [0, {len(records)}] "
                f"(the number of records from {describe_sources(records)})."
            )
        cutoff = sorted(units)[heldout_size - 1] if heldout_size else -1.0
        held = [u <= cutoff for u in units]
        if sum(held) != heldout_size:  # tied hashes = duplicate keys: dedupe first.
            raise ValueError("split_records(heldout_size=...) needs unique keys; dedupe first.")
    train = [r for r, h in zip(records, held) if not h]
    heldout = [r for r, h in zip(records, held) if h]
    return train, heldout
