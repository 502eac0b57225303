"""Argument checks shared across the package (stdlib only, so ``opd_jax.losses`` stays light)."""

from __future__ import annotations

import importlib
import numbers
from typing import Any

__all__ = ["positive_int", "MissingExtraError", "require", "agg_pyplot"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (the CLI prints it as one line, without a traceback)."""


def require(module: str, extra: str, what: str) -> Any:
    """``import module``, or :class:`MissingExtraError` saying which ``opd_jax[extra]`` to install.

    >>> require("json", "none", "a test").__name__
    'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{what} needs the {module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'opd_jax[{extra}]' (from a checkout: pip install -e '.[{extra}]')") from e


def agg_pyplot(what: str) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the ``plots`` extra)."""
    matplotlib = require("matplotlib", "plots", what)
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


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
