"""Rejection filters for the off-policy cold start (SFT on teacher rollouts, OPD paper recipe).

A teacher rollout is rejected when it has no explicit final answer, repeats a line, or
repeats a word n-gram. :func:`filter_completion` returns the first failing reason (or None);
:func:`filter_completions` applies it to a batch and counts rejections per reason.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from opd_jax.checks import positive_int
from opd_jax.eval.extract import extract_answer

NO_FINAL_ANSWER = "no_final_answer"
REPEATED_LINES = "repeated_lines"
REPEATED_NGRAMS = "repeated_ngrams"
REASONS = (NO_FINAL_ANSWER, REPEATED_LINES, REPEATED_NGRAMS)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the rejection filters.

    Attributes:
      require_final_answer: reject text without ``\\boxed{}``, ``####`` or ``Answer:``
        (a bare trailing number does not count unless ``allow_bare_number``).
      allow_bare_number: a last number counts as the final answer (short-answer tasks whose
        model states the result without a marker, e.g. SmolLM2 writing ``2 + 3 = 5``).
      max_line_repeats: reject when a line (stripped, >= ``min_line_chars`` characters)
        occurs more than this many times.
      min_line_chars: shorter lines (``}``, blank lines, ``---``) are not counted.
      ngram_n: word n-gram size for the n-gram filter.
      max_ngram_repeats: reject when a word ``ngram_n``-gram occurs more than this many times.
    """

    require_final_answer: bool = True
    allow_bare_number: bool = False
    max_line_repeats: int = 2
    min_line_chars: int = 4
    ngram_n: int = 4
    max_ngram_repeats: int = 4

    def __post_init__(self):
        for name in ("ngram_n", "max_ngram_repeats", "max_line_repeats"):
            positive_int(f"FilterConfig.{name}", getattr(self, name))


def max_line_count(text: str, min_line_chars: int = 1) -> int:
    """Largest number of occurrences of one stripped line of at least ``min_line_chars`` chars."""
    lines = [ln.strip() for ln in text.splitlines()]
    counts = Counter(ln for ln in lines if len(ln) >= min_line_chars)
    return max(counts.values(), default=0)


def max_ngram_count(text: str, n: int) -> int:
    """Largest number of occurrences of one whitespace-word ``n``-gram in ``text``."""
    words = text.split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def filter_completion(text: str, config: FilterConfig = FilterConfig()) -> str | None:
    """The first rejection reason for ``text`` (one of :data:`REASONS`), or None to keep it.

    >>> filter_completion("2 + 3 = 5\\nAnswer: 5")  is None
    True
    >>> filter_completion("2 + 3 = 5"), filter_completion("I I I I I I I I Answer: 1")
    ('no_final_answer', 'repeated_ngrams')
    """
    if config.require_final_answer and extract_answer(
            text, fallback_to_last_number=config.allow_bare_number) is None:
        return NO_FINAL_ANSWER
    if max_line_count(text, config.min_line_chars) > config.max_line_repeats:
        return REPEATED_LINES
    if max_ngram_count(text, config.ngram_n) > config.max_ngram_repeats:
        return REPEATED_NGRAMS
    return None


@dataclasses.dataclass(frozen=True)
class FilterResult(Generic[T]):
    """Kept items (input order) and counts: ``{"kept": int, <reason>: int for each reason}``."""

    kept: list[T]
    counts: dict[str, int]


def filter_completions(
    items: Sequence[T],
    config: FilterConfig = FilterConfig(),
    *,
    text_of: Callable[[T], str] | None = None,
) -> FilterResult[T]:
    """Applies :func:`filter_completion` to each item (``text_of(item)`` gives its text;
    by default items are the texts themselves) and counts rejections per reason."""
    counts: dict[str, Any] = {"kept": 0, **{r: 0 for r in REASONS}}
    kept = []
    for item in items:
        reason = filter_completion(text_of(item) if text_of else item, config)
        if reason is None:
            kept.append(item)
            counts["kept"] += 1
        else:
            counts[reason] += 1
    return FilterResult(kept, counts)
