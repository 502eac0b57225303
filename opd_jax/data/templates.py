"""Prompt templates: the student's context and OPSD's privileged teacher context.

Both are chat-message lists (``[{"role": "system"|"user", "content": str}, ...]``); a
tokenizer implementing :class:`ChatTokenizer` turns them into token ids via
:func:`tokenize_prompts`, which checks every prompt's length before anything expensive runs.
``PromptTemplate.chat_template_kwargs`` (config ``data.chat_template_kwargs``, e.g.
``{enable_thinking: false}`` for Qwen3) are passed to every chat-template render
(:func:`render_prompt`).

``OPSD_STUDENT_TEMPLATE`` / ``OPSD_TEACHER_TEMPLATE`` are siyan-zhao/OPSD's prompts character for
character (``data_collator.py:28,52,82-87``, the default ``reason_first=False`` path); the shipped
``configs/qwen3_opsd.yaml`` uses them.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from opd_jax.data.records import PromptRecord
from opd_jax.model.chat_template import check_template_kwargs

Message = dict[str, str]

DEFAULT_INSTRUCTION = 'End with "Answer: <value>" on the last line.'
DEFAULT_STUDENT_TEMPLATE = "{problem}\n\n{instruction}"
# what the privileged teacher reads in place of the bare problem
REFERENCE_BLOCK = (
    "{problem}\n\nHere is a reference solution:\n{solution}\n\n"
    "After reading the reference solution, solve the problem yourself in your own words."
)


def teacher_template_for(student_template: str) -> str:
    r"""The privileged teacher's template for a student template: the student's own prompt with
    the reference solution after the problem, so both are asked for the same answer format.

    >>> teacher_template_for("{problem}\nAnswer with a number.").endswith(
    ...     "in your own words.\nAnswer with a number.")
    True
    """
    if "{problem}" not in student_template:
        raise ValueError(f"student template {student_template!r} has no {{problem}} placeholder")
    return student_template.replace("{problem}", REFERENCE_BLOCK, 1)


DEFAULT_TEACHER_TEMPLATE = teacher_template_for(DEFAULT_STUDENT_TEMPLATE)

# siyan-zhao/OPSD data_collator.py:52 (student) and :82-87 with the transition prompt of :28
# (teacher; its problem has no "Problem: " prefix there). Literal braces doubled for str.format.
OPSD_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{{}}."
OPSD_STUDENT_TEMPLATE = "Problem: {problem}\n\n" + OPSD_BOXED_INSTRUCTION
OPSD_TEACHER_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n"
    "\n\nAfter understanding the reference solution and the rationale behind each step, now "
    "articulate your own step-by-step reasoning that derives the same final answer to the problem "
    "below:\n\n" + OPSD_BOXED_INSTRUCTION)

_FIELDS = {"problem", "solution", "answer", "instruction"}


class ChatTokenizer(Protocol):
    """What :func:`tokenize_prompts` needs from a tokenizer."""

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str: ...

    def encode(self, text: str) -> list[int]: ...


def _check_template(name: str, template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{name} {template!r} is not a valid format string ({e}); "
                         "write literal braces as {{ and }}.") from e
    unknown = fields - _FIELDS
    if unknown:
        raise ValueError(f"{name} uses unknown placeholders {sorted(unknown)}; "
                         f"allowed: {sorted(_FIELDS)} (literal braces: {{{{ and }}}}).")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Student and privileged-teacher prompt formats.

    Templates are ``str.format`` strings over ``{problem}``, ``{solution}``, ``{answer}`` and
    ``{instruction}``. In the teacher template ``{solution}`` falls back to the record's
    answer when it has no solution (reasoning-gym arithmetic ships none).
    ``chat_template_kwargs``: extra variables of the tokenizer's chat template for both prompts
    (e.g. ``{"enable_thinking": False}``); see :func:`render_prompt`.

    >>> rec = {"id": "0", "prompt": "2+3?", "answer": "5", "solution": None}
    >>> PromptTemplate().student(rec)[-1]["content"]
    '2+3?\\n\\nEnd with "Answer: <value>" on the last line.'
    >>> "reference solution:\\n5" in PromptTemplate().teacher(rec)[-1]["content"]
    True
    """

    system: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    student_template: str = DEFAULT_STUDENT_TEMPLATE
    teacher_template: str = DEFAULT_TEACHER_TEMPLATE
    chat_template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_template("student_template", self.student_template)
        _check_template("teacher_template", self.teacher_template)
        check_template_kwargs(self.chat_template_kwargs)
        object.__setattr__(self, "chat_template_kwargs", dict(self.chat_template_kwargs))

    def _messages(self, user: str) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": user}]

    def student(self, record: Mapping[str, Any]) -> list[Message]:
        """Chat messages the student sees: optional system + problem + instruction."""
        answer = record.get("answer")
        return self._messages(self.student_template.format(
            problem=record["prompt"], instruction=self.instruction,
            answer="" if answer is None else answer, solution=record.get("solution") or ""))

    def teacher(self, record: Mapping[str, Any]) -> list[Message]:
        """OPSD's privileged context: the problem plus the reference solution."""
        solution, answer = record.get("solution"), record.get("answer")
        if solution is None and answer is None:
            raise ValueError(
                f"Record {record.get('id')!r} has neither a solution nor an answer, so the "
                "privileged teacher context cannot be built. Fix: set solution_key/answer_key.")
        return self._messages(self.teacher_template.format(
            problem=record["prompt"], instruction=self.instruction,
            solution=answer if solution is None else solution,
            answer="" if answer is None else answer))


def render_prompt(tokenizer: ChatTokenizer, messages: Sequence[Message],
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
    **chat_template_kwargs)`` (no kwargs are passed when there are none, so tokenizers without
    ``**kwargs`` keep working)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         **dict(chat_template_kwargs or {}))


class TokenizedPrompts(NamedTuple):
    """Output of :func:`tokenize_prompts`.

    ``token_ids[i]`` is the prompt of ``records[i]`` (ragged ``list[list[int]]``, each of
    length <= max_prompt_len); ``dropped`` maps the id of each dropped record to its length.
    """

    token_ids: list[list[int]]
    records: list[PromptRecord]
    dropped: dict[str, int]


def tokenize_prompts(
    records: Sequence[PromptRecord],
    tokenizer: ChatTokenizer,
    template: Callable[[PromptRecord], list[Message]],
    max_prompt_len: int,
    *,
    on_too_long: Literal["raise", "drop"] = "raise",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedPrompts:
    """Renders and tokenises prompts; checks all lengths before returning anything.

    Args:
      records: prompt records.
      tokenizer: implements ``apply_chat_template(messages, add_generation_prompt=True)``
        and ``encode(text)``.
      template: record -> chat messages, e.g. ``PromptTemplate().student`` or ``.teacher``.
      max_prompt_len: the most prompt tokens allowed.
      on_too_long: ``"raise"`` a ValueError naming the first too-long prompt (id, length,
        limit, fix) or ``"drop"`` such records (their ids and lengths in ``dropped``).
      chat_template_kwargs: extra chat-template variables (``PromptTemplate.chat_template_kwargs``).
    """
    if on_too_long not in ("raise", "drop"):
        raise ValueError(f"on_too_long must be 'raise' or 'drop', got {on_too_long!r}.")
    ids = [tokenizer.encode(render_prompt(tokenizer, template(r), chat_template_kwargs))
           for r in records]
    over = [len(t) > max_prompt_len for t in ids]
    too_long = {r["id"]: len(t) for r, t, o in zip(records, ids, over) if o}
    if too_long and on_too_long == "raise":
        first = next(iter(too_long))
        raise ValueError(
            f"Prompt {first!r} is {too_long[first]} tokens, over max_prompt_len={max_prompt_len} "
            f"({len(too_long)} of {len(records)} prompts are too long, the longest "
            f"{max(too_long.values())}). Fix: raise max_prompt_len to >= {max(too_long.values())}, "
            "shorten the template, or pass on_too_long='drop'.")
    kept = [(r, t) for r, t, o in zip(records, ids, over) if not o]
    return TokenizedPrompts([t for _, t in kept], [r for r, _ in kept], too_long)
