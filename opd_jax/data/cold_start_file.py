"""The cold-start dataset file (JSONL): one kept teacher rollout per line.

``opd-jax build-cold-start`` writes it (:mod:`opd_jax.cold_start`); a ``cold_start`` stage with
``dataset: <path>`` trains on it. One JSON object per line:

==============  =========================================================================
``id``          the prompt record's id
``slot``        which of the prompt's ``num_teacher_samples`` slots (the reference's
                ``rollout_index``)
``attempt``     the 0-based draw that was kept (``attempt + 1`` draws were made for the slot)
``problem``     the raw problem text
``prompt``      the rendered prompt the teacher saw: chat template applied, special tokens
                written out (``<|im_start|>user ...``); the stage tokenizes it as it is
``completion``  the teacher's completion without special tokens (the text the filters read)
``stop``        the end-of-sequence token that ended it, written out (``<|im_end|>``), or null
                when the rollout was cut at ``max_new_tokens``; trained on after the completion
``answer``      the record's reference answer, or null
``source``      the prompt record's data source (routes the example to its teacher when
                ``teachers:`` distils several), or null
``messages``    the conversation as chat messages ([system,] user, assistant), the reference's
                ShareGPT/OpenAI form (thunlp/OPD ``scripts/infer/vllm_rollout.py``:505-519), so
                LlamaFactory can read the same file
==============  =========================================================================

Only ``prompt`` and ``completion`` are required to train; other keys are carried along.
A summary of the build (counts per rejection reason, retries, empty slots) sits next to it in
:func:`summary_path`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["ColdStartExample", "read_cold_start", "write_cold_start", "summary_path",
           "file_sha256"]

BUILD_HINT = "write it with `opd-jax build-cold-start CONFIG` (or fix the stage's dataset path)"


@dataclasses.dataclass(frozen=True)
class ColdStartExample:
    """One line of the file (see the module docstring for the fields)."""

    prompt: str
    completion: str
    stop: str | None = None
    id: str | None = None
    slot: int = 0
    attempt: int = 0
    problem: str | None = None
    answer: str | None = None
    messages: list[dict[str, str]] | None = None
    source: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def summary_path(path: str | os.PathLike) -> Path:
    """Where the build summary of dataset ``path`` goes: ``x.jsonl`` -> ``x.summary.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem if path.suffix == '.jsonl' else path.name}.summary.json")


def write_cold_start(path: str | os.PathLike, examples: Iterable[ColdStartExample]) -> int:
    """Write ``examples`` to ``path`` (through a temporary file, so an interrupted write leaves
    no partial dataset); returns how many lines were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _check(where: str, row: Any) -> ColdStartExample:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (a cold-start line needs prompt "
                         f"and completion; has {sorted(row)})")
    for key, types, what in (("prompt", str, "a string"), ("completion", str, "a string"),
                             ("stop", (str, type(None)), "a string or null"),
                             ("answer", (str, type(None)), "a string or null"),
                             ("problem", (str, type(None)), "a string or null"),
                             ("source", (str, type(None)), "a string or null")):
        if key in row and not isinstance(row[key], types):
            raise ValueError(f"{where}: {key} must be {what}, got {row[key]!r:.80}")
    if not row["prompt"].strip():
        raise ValueError(f"{where}: empty prompt")
    if not row["completion"] and not row.get("stop"):
        raise ValueError(f"{where}: empty completion and no stop token: nothing to train on")
    known = {f.name for f in dataclasses.fields(ColdStartExample)}
    return ColdStartExample(**{k: v for k, v in row.items() if k in known})


def read_cold_start(path: str | os.PathLike) -> list[ColdStartExample]:
    """Every example of the file, checked line by line.

    Raises:
      FileNotFoundError: no file at ``path`` (the message says how to build one).
      ValueError: a line that is not a JSON object with a non-empty string ``prompt`` and a
        string ``completion`` (``path:line`` named), or a file without examples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cold-start dataset {path} does not exist: {BUILD_HINT}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            examples.append(_check(f"{path}:{i}", row))
    if not examples:
        raise ValueError(f"cold-start dataset {path} has no examples: {BUILD_HINT}")
    return examples


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (a resumed stage checks it trains on the same data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
