r"""Final-answer extraction and normalisation.

Precedence in :func:`extract_answer`: the last ``\boxed{...}`` (nested braces allowed), then
the last ``#### value``, then the last ``Answer: value``, then (optionally) the last number.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_ANSWER_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is)?\s*[:：]", re.IGNORECASE)
_HASH_RE = re.compile(r"####")
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_FRACTION_RE = re.compile(r"^([-+]?\d+)\s*/\s*(\d+)$")


def _last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``), else None."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def _rest_of_line(text: str, pos: int) -> str:
    """Text after ``pos`` up to the end of line; the next non-empty line if that is empty."""
    for line in text[pos:].split("\n"):
        if _clean(line):
            return line
    return ""


def _clean(value: str) -> str:
    """Strips markdown/LaTeX wrappers and trailing punctuation around an answer."""
    value = value.strip()
    prev = None
    while value != prev:
        prev = value
        value = value.strip().strip("*_`").strip()
        if len(value) >= 2 and value[0] == value[-1] == "$":
            value = value[1:-1]
        value = re.sub(r"^\\\(|\\\)$", "", value).strip()
        value = value.rstrip(".;,").strip()
    return value


def extract_answer(text: str, *, fallback_to_last_number: bool = True) -> str | None:
    r"""Returns the normalised final answer in ``text``, or None when nothing is found.

    >>> extract_answer(r"so \boxed{\frac{1}{2}} and later \boxed{1,234.50}")
    '1234.5'
    >>> extract_answer("work...\n#### 42")
    '42'
    >>> extract_answer("Answer: 3\nwait, Answer: **7.0**.")
    '7'
    >>> extract_answer("I think it is 12 or maybe 13") , extract_answer("no idea")
    ('13', None)
    """
    if not text:
        return None
    candidates: list[str] = []
    boxed = _last_boxed(text)
    if boxed is not None:
        candidates.append(boxed)
    for pattern in (_HASH_RE, _ANSWER_RE):
        matches = list(pattern.finditer(text))
        if matches:
            candidates.append(_rest_of_line(text, matches[-1].end()))
    for candidate in candidates:
        value = _clean(candidate)
        if value:
            return normalize_answer(value)
    if fallback_to_last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return normalize_answer(numbers[-1])
    return None


def _canonical_decimal(d: Decimal) -> str:
    if d == 0:
        return "0"
    s = format(d.normalize(), "f")
    return s.lstrip("+")


def normalize_answer(value: str) -> str:
    """Canonical form of an answer: numbers lose commas/spaces/trailing zeros, text is trimmed.

    >>> [normalize_answer(s) for s in ["1,000", " -3.50 ", "+7", "2.0", "1 000", "-0", "Yes  sir"]]
    ['1000', '-3.5', '7', '2', '1000', '0', 'Yes sir']
    """
    value = _clean(value)
    compact = re.sub(r"(?<=[-+])\s+", "", value)
    if _THOUSANDS_RE.match(compact):
        compact = compact.replace(",", "").replace(" ", "")
    if _PLAIN_NUMBER_RE.match(compact):
        try:
            return _canonical_decimal(Decimal(compact))
        except InvalidOperation:  # pragma: no cover - regex guards this
            pass
    return re.sub(r"\s+", " ", value)


def parse_number(value: str | None) -> float | None:
    """Float value of a normalised numeric answer (plain, thousands-grouped or ``a/b``), else None."""
    if value is None:
        return None
    value = normalize_answer(value)
    if _PLAIN_NUMBER_RE.match(value):
        x = float(value)
        return x if math.isfinite(x) else None
    m = _FRACTION_RE.match(value)
    if m and int(m.group(2)) != 0:
        return float(Fraction(int(m.group(1)), int(m.group(2))))
    return None
