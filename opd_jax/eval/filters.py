"""Rejection filters for the off-policy cold start (SFT on teacher rollouts, OPD paper recipe).

The four reference filters are thunlp/OPD's rejection sampling, ``scripts/infer/vllm_rollout.py``
(commit 0a44395), with the same semantics and, by default, the same thresholds:

=====================  ===================================================  ====================
reason                 rejects a completion when                            reference
=====================  ===================================================  ====================
``no_final_answer``    ``answer_marker`` (``\\boxed``) is not a substring     ``has_boxed``, :17-19
``repeated_lines``     a line, stripped, of >= 20 chars occurs >= 5 times   :22-28
``repeated_windows``   a 100-char window (stride 10) occurs >= 3 times      :31-41 (its
                       (never for texts under 100 x 3 chars)                ``ngram_repetition``)
``consecutive_repeat`` a 50-char block repeats >= 3 times in a row; only    :44-57, :71
                       for texts longer than 5,000 chars
``repeated_ngrams``    a whitespace-word ``ngram_n``-gram occurs more than  none (this library's
                       ``ngram_max_repeats`` times (off by default)         earlier rule)
=====================  ===================================================  ====================

:func:`filter_completion` checks them in this order (the reference's ``is_valid_output``,
:60-73) and returns the first failing reason, or None to keep the text;
:func:`filter_completions` counts rejections per reason over a batch. Texts are the decoded
completions without special tokens (vLLM's ``output.text``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from opd_jax.eval.extract import extract_answer

NO_FINAL_ANSWER = "no_final_answer"
REPEATED_LINES = "repeated_lines"
REPEATED_WINDOWS = "repeated_windows"
CONSECUTIVE_REPEAT = "consecutive_repeat"
REPEATED_NGRAMS = "repeated_ngrams"
REASONS = (NO_FINAL_ANSWER, REPEATED_LINES, REPEATED_WINDOWS, CONSECUTIVE_REPEAT, REPEATED_NGRAMS)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    r"""Which filters run and their thresholds (field names and defaults = ``FilterSpec``'s).

    Attributes:
      no_answer: run the final-answer filter. ``answer_format``: ``"marker"`` (the text contains
        ``answer_marker``; the reference's ``"\\boxed" in text``), ``"marked"`` (an ``Answer:``,
        ``\boxed{}`` or ``####`` answer that :func:`~opd_jax.eval.extract.extract_answer` can
        read) or ``"any_number"`` (a last number counts too).
      repeated_lines: reject when a line, ``str.strip``-ped, of at least ``line_min_chars``
        characters occurs ``line_reject_count`` or more times (lines split on ``"\n"`` only).
      repeated_windows: reject when a ``window_chars``-character window, taken every
        ``window_stride`` characters, occurs ``window_reject_count`` or more times; texts shorter
        than ``window_chars * window_reject_count`` pass (the reference's early return).
      consecutive_repeat: reject when a ``block_chars``-character block is followed by copies of
        itself, ``block_reject_run`` blocks in a row; only for texts longer than
        ``block_text_over`` characters.
      ngram_n: word n-gram size of the earlier n-gram rule (None = off); reject when one occurs
        more than ``ngram_max_repeats`` times.
    """

    no_answer: bool = True
    answer_format: Literal["marker", "marked", "any_number"] = "marker"
    answer_marker: str = "\\boxed"
    repeated_lines: bool = True
    line_min_chars: int = 20
    line_reject_count: int = 5
    repeated_windows: bool = True
    window_chars: int = 100
    window_stride: int = 10
    window_reject_count: int = 3
    consecutive_repeat: bool = True
    block_chars: int = 50
    block_reject_run: int = 3
    block_text_over: int = 5000
    ngram_n: int | None = None
    ngram_max_repeats: int = 3

    def __post_init__(self):
        for name, low in (("line_min_chars", 0), ("line_reject_count", 2), ("window_chars", 1),
                          ("window_stride", 1), ("window_reject_count", 2), ("block_chars", 1),
                          ("block_reject_run", 2), ("block_text_over", 0),
                          ("ngram_max_repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"FilterConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.ngram_n is not None and (not isinstance(self.ngram_n, int) or self.ngram_n < 1):
            raise ValueError(f"FilterConfig.ngram_n must be None or an integer >= 1, got "
                             f"{self.ngram_n!r}")
        if self.answer_format not in ("marker", "marked", "any_number"):
            raise ValueError(f"FilterConfig.answer_format must be 'marker', 'marked' or "
                             f"'any_number', got {self.answer_format!r}")
        if self.no_answer and self.answer_format == "marker" and not self.answer_marker:
            raise ValueError("FilterConfig.answer_marker must be a non-empty string")

    @classmethod
    def from_spec(cls, spec: Any) -> FilterConfig:
        """The filters of a config's ``FilterSpec`` (same field names)."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(cls)})


# --- the checks ---------------------------------------------------------------------------------


def has_final_answer(text: str, config: FilterConfig = FilterConfig()) -> bool:
    """Whether ``text`` states a final answer in ``config.answer_format``."""
    if config.answer_format == "marker":
        return config.answer_marker in text
    return extract_answer(text, fallback_to_last_number=config.answer_format == "any_number") \
        is not None


def max_line_count(text: str, min_chars: int = 1) -> int:
    r"""Most occurrences of one ``"\n"``-separated line, stripped, of at least ``min_chars``
    characters (0 when there is none); vllm_rollout.py:24-28.

    >>> max_line_count("  same line  \nsame line\r\nx", 4)
    2
    """
    counts = Counter(s for s in (line.strip() for line in text.split("\n")) if len(s) >= min_chars)
    return max(counts.values(), default=0)


def has_repeated_window(text: str, n: int = 100, threshold: int = 3, stride: int = 10) -> bool:
    """Whether a ``n``-character window starting at a multiple of ``stride`` occurs ``threshold``
    or more times; False for texts shorter than ``n * threshold`` (vllm_rollout.py:31-41).

    >>> has_repeated_window("ab" * 200, n=20), has_repeated_window("ab" * 20, n=20)
    (True, False)
    """
    if len(text) < n * threshold:
        return False
    seen: Counter[str] = Counter()
    for i in range(0, len(text) - n + 1, stride):
        chunk = text[i:i + n]
        seen[chunk] += 1
        if seen[chunk] >= threshold:
            return True
    return False


def has_consecutive_repeat(text: str, block: int = 50, threshold: int = 3) -> bool:
    """Whether some ``block``-character substring is followed by ``threshold - 1`` copies of itself
    (``threshold >= 2``).

    The reference (vllm_rollout.py:44-57) compares blocks at every start ``i``; ``threshold``
    equal blocks from ``i`` means ``text[j] == text[j + block]`` for every ``j`` in
    ``[i, i + (threshold - 1) * block)``, so this looks for a run of that many positions where the
    text equals itself shifted by ``block``: O(len) instead of O(len x block), same answer
    (``tests/test_cold_start_filters.py`` checks it against the reference's loop).

    >>> has_consecutive_repeat("x" + "abc" * 3, block=3), has_consecutive_repeat("abcabcab", 3)
    (True, False)
    """
    if threshold < 2:
        raise ValueError(f"threshold must be >= 2 (a block followed by a copy), got {threshold}")
    need = (threshold - 1) * block
    if len(text) < block * threshold:
        return False
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    same_N = codes[block:] == codes[:-block]          # N = len - block
    cum = np.concatenate([[0], np.cumsum(same_N)])
    return bool(np.any(cum[need:] - cum[:-need] == need))


def max_ngram_count(text: str, n: int) -> int:
    """Most occurrences of one whitespace-word ``n``-gram in ``text`` (0 when there is none)."""
    words = text.split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def filter_completion(text: str, config: FilterConfig = FilterConfig()) -> str | None:
    r"""The first rejection reason for ``text`` (one of :data:`REASONS`), or None to keep it.

    >>> filter_completion(r"2 + 3 = 5, so \boxed{5}") is None
    True
    >>> filter_completion("2 + 3 = 5\nAnswer: 5")
    'no_final_answer'
    >>> filter_completion("Answer: 5", FilterConfig(answer_format="marked")) is None
    True
    >>> filter_completion("the same line, again and again\n" * 5 + r"\boxed{1}")
    'repeated_lines'
    """
    c = config
    if c.no_answer and not has_final_answer(text, c):
        return NO_FINAL_ANSWER
    if c.repeated_lines and max_line_count(text, c.line_min_chars) >= c.line_reject_count:
        return REPEATED_LINES
    if c.repeated_windows and has_repeated_window(text, c.window_chars, c.window_reject_count,
                                                  c.window_stride):
        return REPEATED_WINDOWS
    if (c.consecutive_repeat and len(text) > c.block_text_over
            and has_consecutive_repeat(text, c.block_chars, c.block_reject_run)):
        return CONSECUTIVE_REPEAT
    if c.ngram_n is not None and max_ngram_count(text, c.ngram_n) > c.ngram_max_repeats:
        return REPEATED_NGRAMS
    return None


def marker_warning(config: FilterConfig, prompt_text: str) -> str | None:
    """A warning when the answer filter looks for a marker the prompt never asks for (every
    rollout would then be rejected), else None."""
    if not config.no_answer or config.answer_format != "marker":
        return None
    if config.answer_marker in prompt_text:
        return None
    return (f"filters.answer_marker {config.answer_marker!r} does not occur in the prompt the "
            "teacher sees, so most rollouts may be rejected as no_final_answer; ask for it in "
            "data.instruction (the reference asks for \\boxed{}) or set filters.answer_format to "
            "'marked' / 'any_number' (or answer_marker to what the prompt asks for)")


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
    counts = {"kept": 0, **{r: 0 for r in REASONS}}
    kept = []
    for item in items:
        reason = filter_completion(text_of(item) if text_of else item, config)
        if reason is None:
            kept.append(item)
            counts["kept"] += 1
        else:
            counts[reason] += 1
    return FilterResult(kept, counts)
