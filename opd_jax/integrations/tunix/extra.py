"""What the tunix integration needs installed: :data:`EXTRA` and :func:`require_tunix`."""

from __future__ import annotations

import importlib
from typing import Any

#: How to install what this module needs.
EXTRA = ('pip install "opd_jax[tunix]"  (that is google-tunix==0.1.7 and safetensors<0.8; the '
         'PyPI package named plain "tunix" is an unrelated placeholder)')


def require_tunix(module: str = "tunix") -> Any:
    """Import ``module`` (a tunix module) or raise an ``ImportError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"opd_jax.integrations.tunix needs tunix ({module} failed to import: "
                          f"{e}). Install it with: {EXTRA}") from e
