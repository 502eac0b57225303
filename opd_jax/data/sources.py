"""Prompt sources: jsonl files, parquet files, reasoning-gym generators.

Every loader returns a ``list`` of prompt records (see :mod:`opd_jax.data.records`).
:func:`load_records` builds one from a config mapping such as
``{"type": "reasoning_gym", "name": "chain_sum", "size": 200, "seed": 0}``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from opd_jax.checks import require
from opd_jax.data.records import PromptRecord, make_record, require_nonempty, to_jsonable

RG_KEY = "reasoning_gym"  # metadata key holding what is needed to re-score an entry


def _field(row: Mapping[str, Any], key: str, what: str, source: str, row_index: int) -> Any:
    if key not in row:
        raise ValueError(
            f"{source}: row {row_index} has no field {key!r} (the {what}). "
            f"Available keys: {sorted(row)}. Fix: set {what}= to one of them."
        )
    return row[key]


def rows_to_records(
    rows: Sequence[Mapping[str, Any]],
    *,
    source: str,
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    solution_key: str | None = None,
    id_key: str | None = None,
) -> list[PromptRecord]:
    """Maps generic rows (dicts) to prompt records with configurable field names.

    ``answer_key`` / ``solution_key`` may be ``None`` (no answer / no solution). Without
    ``id_key`` ids are ``f"{source}:{row_index}"``. Fields not used become ``metadata``.
    A missing field raises a ``ValueError`` listing the row's available keys.
    """
    used = {k for k in (prompt_key, answer_key, solution_key, id_key) if k is not None}
    records = []
    for i, row in enumerate(rows):
        prompt = _field(row, prompt_key, "prompt_key", source, i)
        answer = None if answer_key is None else _field(row, answer_key, "answer_key", source, i)
        solution = (
            None if solution_key is None else _field(row, solution_key, "solution_key", source, i)
        )
        rid = f"{source}:{i}" if id_key is None else _field(row, id_key, "id_key", source, i)
        meta = {k: v for k, v in row.items() if k not in used}
        records.append(
            make_record(rid, str(prompt), source=source, answer=answer, solution=solution,
                        metadata=meta)
        )
    return records


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON-lines file (blank lines skipped) into a list of dicts."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg}).") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def read_parquet(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a parquet file into a list of dicts (needs ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow") from e
    return pq.read_table(path).to_pylist()


def _load_file(reader, path, source, **keys) -> list[PromptRecord]:
    path = os.fspath(path)
    source = source or os.path.basename(path)
    records = rows_to_records(reader(path), source=source, **keys)
    require_nonempty(records, source=f"{source} ({path})", stage="loading",
                     fix="the file has no rows; check the path.")
    return records


def load_jsonl(path: str | os.PathLike, *, source: str | None = None, prompt_key: str = "prompt",
               answer_key: str | None = "answer", solution_key: str | None = None,
               id_key: str | None = None) -> list[PromptRecord]:
    """Loads prompt records from a jsonl file (``source`` defaults to the file name)."""
    return _load_file(read_jsonl, path, source, prompt_key=prompt_key, answer_key=answer_key,
                      solution_key=solution_key, id_key=id_key)


def load_parquet(path: str | os.PathLike, *, source: str | None = None, prompt_key: str = "prompt",
                 answer_key: str | None = "answer", solution_key: str | None = None,
                 id_key: str | None = None) -> list[PromptRecord]:
    """Loads prompt records from a parquet file (``source`` defaults to the file name)."""
    return _load_file(read_parquet, path, source, prompt_key=prompt_key, answer_key=answer_key,
                      solution_key=solution_key, id_key=id_key)


def make_reasoning_gym_dataset(name: str, *, seed: int, size: int, config: Mapping[str, Any]):
    """``reasoning_gym.create_dataset`` with its errors turned into clear ``ValueError``s."""
    reasoning_gym = require("reasoning_gym", "data", f"data.source=reasoning_gym ({name!r})")
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"Unknown reasoning-gym dataset {name!r}. Available: {sorted(DATASETS)}.")
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **dict(config))
    except (AssertionError, TypeError) as e:
        raise ValueError(f"Invalid reasoning-gym config for {name!r} {dict(config)}: {e}") from e


def load_reasoning_gym(
    name: str,
    *,
    size: int,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    solution_key: str | None = "answer_cot",
) -> list[PromptRecord]:
    """Generates ``size`` records from the reasoning-gym generator ``name`` (deterministic per seed).

    ``config`` is passed to the generator's config (e.g. ``{"min_terms": 2, "max_terms": 2,
    "min_digits": 1, "max_digits": 1, "operators": "+-*"}`` for ``basic_arithmetic``).
    ``solution`` is the entry's ``metadata[solution_key]`` when present (``gsm_symbolic``
    ships ``answer_cot``), else ``None``. ``metadata["reasoning_gym"]`` keeps the name,
    config, seed, size, index and entry metadata so :func:`opd_jax.eval.grade` can call the
    generator's own ``score_answer``. Ids are ``"rg/{name}/s{seed}/{index}"``.
    """
    config = to_jsonable(dict(config or {}))
    ds = make_reasoning_gym_dataset(name, seed=seed, size=size, config=config)
    source = f"reasoning_gym:{name}"
    records = []
    for i in range(size):
        entry = ds[i]
        meta = entry.get("metadata", {}) or {}
        solution = meta.get(solution_key) if solution_key else None
        records.append(make_record(
            f"rg/{name}/s{seed}/{i}", entry["question"], source=source, answer=entry["answer"],
            solution=solution,
            metadata={RG_KEY: {"name": name, "config": config, "seed": seed, "size": size,
                               "index": i, "entry_metadata": meta}},
        ))
    require_nonempty(records, source=source, stage="generation", fix="pass size >= 1.")
    return records


_LOADERS = {"jsonl": load_jsonl, "parquet": load_parquet, "reasoning_gym": load_reasoning_gym}


def load_records(spec: Mapping[str, Any]) -> list[PromptRecord]:
    """Loads records from a config mapping with a ``"type"`` of jsonl | parquet | reasoning_gym.

    The other keys are the loader's keyword arguments (``path`` / ``name`` positional ones
    included), e.g. ``{"type": "jsonl", "path": "p.jsonl", "prompt_key": "question"}``.
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in _LOADERS:
        raise ValueError(f"Data source spec {spec} needs 'type' in {sorted(_LOADERS)}, got {kind!r}.")
    loader = _LOADERS[kind]
    try:
        inspect.signature(loader).bind(**spec)
    except TypeError as e:
        raise ValueError(f"Bad keys for a {kind!r} data source {spec}: {e}") from e
    return loader(**spec)
