"""Argument checks shared across the package (stdlib only, so ``opd_jax.losses`` stays light)."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["positive_int"]


def positive_int(name: str, value: Any, hint: str = "") -> int:
    """``value`` as an ``int`` if it is a positive integer (not a bool), else ``ValueError`` naming
    ``name`` (``hint`` is appended, e.g. ``"(or None for no top-k)"``).

    >>> positive_int("k", 3)
    3
    >>> positive_int("k", 0)
    Traceback (most recent call last):
    ...
    ValueError: k=0; it must be a positive int
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}; it must be a positive int" + (f" {hint}" if hint else ""))
    return int(value)
