"""Evaluation: answer extraction, grading, pass@k / Avg@k, cold-start rejection filters."""

from opd_jax.eval.aggregate import avg_at_k, evaluate, pass_at_k
from opd_jax.eval.extract import extract_answer, normalize_answer, parse_number
from opd_jax.eval.filters import (
    CONSECUTIVE_REPEAT,
    NO_FINAL_ANSWER,
    REASONS,
    REPEATED_LINES,
    REPEATED_NGRAMS,
    REPEATED_WINDOWS,
    FilterConfig,
    FilterResult,
    filter_completion,
    filter_completions,
    has_consecutive_repeat,
    has_final_answer,
    has_repeated_window,
    max_line_count,
    max_ngram_count,
)
from opd_jax.eval.grading import (
    answers_match,
    is_correct,
    is_reasoning_gym,
    reasoning_gym_score,
    score_completion,
)

__all__ = [
    "CONSECUTIVE_REPEAT", "FilterConfig", "FilterResult", "NO_FINAL_ANSWER", "REASONS",
    "REPEATED_LINES", "REPEATED_NGRAMS", "REPEATED_WINDOWS", "answers_match", "avg_at_k",
    "evaluate", "extract_answer", "filter_completion", "filter_completions",
    "has_consecutive_repeat", "has_final_answer", "has_repeated_window", "is_correct",
    "is_reasoning_gym", "max_line_count", "max_ngram_count", "normalize_answer", "parse_number",
    "pass_at_k", "reasoning_gym_score", "score_completion",
]
