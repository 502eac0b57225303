"""Prompt sets as the reference reads them: the prompt field of each row (nested fields, chat
message lists), the matching text (instruction suffix removed, whitespace stripped) and exact
duplicates between two sets (thunlp/OPD scripts/infer/dedup_deepmath.py:8-33, :50-53)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from opd_jax.align_prompts.config import PromptSetSpec
from opd_jax.data.sources import read_jsonl, read_parquet


@dataclasses.dataclass
class PromptSet:
    """One set read from its file: ``ids[i]``, ``texts[i]`` (the matching text, also what is
    embedded) and ``rows[i]`` (the file's row, unchanged) of row ``i``."""

    name: str
    ids: list[str]
    texts: list[str]
    rows: list[dict]

    def __len__(self) -> int:
        return len(self.ids)


def field_value(row: Mapping[str, Any], dotted: str, *, where: str) -> Any:
    """``row[a][b]...`` for the key ``"a.b..."``; a missing key raises ``ValueError`` naming the
    keys that exist at that level.

    >>> field_value({"extra_info": {"question": "2+3?"}}, "extra_info.question", where="r")
    '2+3?'
    """
    node: Any = row
    for depth, part in enumerate(dotted.split(".")):
        if not isinstance(node, Mapping) or part not in node:
            seen = ".".join(dotted.split(".")[:depth]) or "the row"
            keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(f"{where}: no field {dotted!r} ({seen} has {keys}); set "
                             "prompt_key / id_key to one of them")
        node = node[part]
    return node


def prompt_text(value: Any) -> str:
    """The prompt of a field: a string as is; a list of chat messages as its first message's
    ``content`` (dedup_deepmath.py:10-11: DAPO's ``[{'content': ..., 'role': 'user'}]``);
    anything else as ``str(value)``.

    >>> prompt_text([{"role": "user", "content": "Find x."}])
    'Find x.'
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and isinstance(
            value[0], Mapping):
        return str(value[0].get("content", ""))
    return str(value)


def match_text(text: str, suffixes: Sequence[str] = ()) -> str:
    """The text two prompts are compared by: the first of ``suffixes`` that ends ``text`` removed,
    then surrounding whitespace (a port of ``extract_dapo_question``, dedup_deepmath.py:13-16,
    for any number of suffixes).

    >>> match_text("  Find x. Please reason step by step.", [" Please reason step by step."])
    'Find x.'
    """
    for suffix in suffixes:
        if suffix and text.endswith(suffix):
            return text[:-len(suffix)].strip()
    return text.strip()


def read_prompt_set(spec: PromptSetSpec, suffixes: Sequence[str], name: str) -> PromptSet:
    """The rows of ``spec.path`` (first ``spec.limit``) with their ids and matching texts."""
    reader = read_parquet if spec.resolved_format == "parquet" else read_jsonl
    rows = reader(spec.path)
    if spec.limit is not None:
        rows = rows[:spec.limit]
    if not rows:
        raise ValueError(f"{name} set {spec.path} has no rows")
    ids, texts = [], []
    for i, row in enumerate(rows):
        where = f"{name} set {spec.path} row {i}"
        value = field_value(row, spec.prompt_key, where=where)
        if value is None:
            raise ValueError(f"{where}: {spec.prompt_key!r} is null")
        texts.append(match_text(prompt_text(value), suffixes))
        ids.append(f"{name}:{i}" if spec.id_key is None
                   else str(field_value(row, spec.id_key, where=where)))
    return PromptSet(name, ids, texts, rows)


def exact_matches(texts: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """``[len(texts)]`` bool: ``texts[i]`` equals one of ``reference`` (string equality of the
    matching texts, dedup_deepmath.py:51-52).

    >>> exact_matches(["a", "b"], ["b", "c"]).tolist()
    [False, True]
    """
    known = set(reference)
    return np.array([t in known for t in texts], dtype=bool)
