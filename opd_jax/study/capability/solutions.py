"""The teacher's post-training data: a worked solution per training prompt, kept only when the
task's own grader scores it correct (SFT on verified solutions).

A reasoning-gym arithmetic entry carries its expression (``metadata.reasoning_gym.entry_metadata
.expression``, e.g. ``"0 - 4 - 8"``); :func:`chain_solution` writes it out one operation per line
and ends with the answer in the format the instruction asks for::

    0 - 4 = -4
    -4 - 8 = -12
    Answer: -12

Each solution is graded with :func:`opd_jax.eval.grading.score_completion` (the generator's own
``score_answer``) before it is written; an entry whose expression does not parse (other
operators after the first, parentheses) or whose solution is not scored 1 is left out and
counted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from opd_jax.data.cold_start_file import ColdStartExample, write_cold_start
from opd_jax.data.sources import RG_KEY
from opd_jax.eval.grading import score_completion
from opd_jax.model.tokenizer import eos_ids_of, pad_id_of
from opd_jax.train import rollout

_TOKEN = re.compile(r"\s*(-?\d+|[-+*])")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_chain(expression: str) -> tuple[list[int], list[str]] | None:
    """``(numbers, operators)`` of ``"a op b op c ..."``, or None when it is not such a chain.

    >>> parse_chain("0 - 4 - 8"), parse_chain("(1 + 2) * 3")
    (([0, 4, 8], ['-', '-']), None)
    """
    tokens, pos = [], 0
    while pos < len(expression.rstrip()):
        m = _TOKEN.match(expression, pos)
        if not m:
            return None
        tokens.append(m.group(1))
        pos = m.end()
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        return None
    nums, ops = tokens[0::2], tokens[1::2]
    if any(o not in _OPS for o in ops) or any(n in _OPS for n in nums):
        return None
    return [int(n) for n in nums], ops


def chain_solution(expression: str) -> str | None:
    """The worked solution of a chain of ``+`` / ``-`` (``*`` only as a single operation: left to
    right is the arithmetic value only without precedence), one operation per line, then
    ``Answer: <value>``; None when the expression is not such a chain.

    >>> print(chain_solution("0 - 4 - 8"))
    0 - 4 = -4
    -4 - 8 = -12
    Answer: -12
    >>> chain_solution("2 + 3 * 4") is None
    True
    """
    parsed = parse_chain(expression)
    if parsed is None:
        return None
    nums, ops = parsed
    if "*" in ops and len(ops) > 1:
        return None
    lines, value = [], nums[0]
    for op, n in zip(ops, nums[1:]):
        new = _OPS[op](value, n)
        lines.append(f"{value} {op} {n} = {new}")
        value = new
    return "\n".join(lines + [f"Answer: {value}"])


def expression_of(record: dict[str, Any]) -> str | None:
    """The arithmetic expression of a reasoning-gym record (None for other records)."""
    meta = ((record.get("metadata") or {}).get(RG_KEY) or {}).get("entry_metadata") or {}
    expr = meta.get("expression")
    return expr if isinstance(expr, str) else None


def verified_solutions(records: Sequence[dict]) -> tuple[list[tuple[dict, str]], dict[str, int]]:
    """``([(record, solution)], counts)``: the records whose written-out solution the task's
    grader scores 1; counts of ``kept``, ``no_expression`` (not a chain) and ``wrong`` (graded
    below 1: a solution that disagrees with the generator is never trained on)."""
    kept, counts = [], {"kept": 0, "no_expression": 0, "wrong": 0}
    for rec in records:
        expr = expression_of(rec)
        text = chain_solution(expr) if expr else None
        if text is None:
            counts["no_expression"] += 1
        elif score_completion(rec, text) < 1.0:
            counts["wrong"] += 1
        else:
            kept.append((rec, text))
            counts["kept"] += 1
    return kept, counts


def write_sft_dataset(path: Path, pairs: Sequence[tuple[dict, str]], tokenizer, template, *,
                      max_prompt_len: int) -> int:
    """Write ``(record, solution)`` pairs as a cold-start dataset file (the format a
    ``cold_start`` stage with ``dataset:`` trains on): the prompt rendered exactly as the trainer
    renders it (chat template, special tokens written out), the solution, then the tokenizer's
    end-of-sequence token so the teacher learns to stop. Returns the number of lines."""
    stop = end_of_turn(tokenizer)
    prompts = prompt_texts([r for r, _ in pairs], tokenizer, template, max_prompt_len)
    out = [ColdStartExample(
        prompt=prompt, completion=solution, stop=stop, id=rec["id"], problem=rec["prompt"],
        answer=None if rec.get("answer") is None else str(rec["answer"]),
        messages=[*template.student(rec), {"role": "assistant", "content": solution}])
        for (rec, solution), prompt in zip(pairs, prompts)]
    return write_cold_start(path, out)


def end_of_turn(tokenizer) -> str | None:
    """The end-of-sequence token a completion is trained to end with, written out: the chat
    template's ``<|im_end|>`` when it is one of the tokenizer's EOS ids (SmolLM2 also lists
    ``<|endoftext|>``), else its first EOS id; None without one."""
    texts = [tokenizer.decode([i], skip_special=False) for i in eos_ids_of(tokenizer)]
    return "<|im_end|>" if "<|im_end|>" in texts else (texts[0] if texts else None)


def prompt_texts(records: Sequence[dict], tokenizer, template, max_prompt_len: int) -> list[str]:
    """Each record's student prompt as text with its special tokens written out."""
    texts = []
    for i in range(0, len(records), 256):
        p = rollout.encode_prompts(records[i:i + 256], tokenizer, template,
                                   max_prompt_len=max_prompt_len, pad_id=pad_id_of(tokenizer))
        texts += [tokenizer.decode(row[valid].tolist(), skip_special=False)
                  for row, valid in zip(p.student_tokens, p.student_valid)]
    return texts
