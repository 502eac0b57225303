"""Casting parameter trees between float dtypes (mixed precision, bfloat16 teachers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cast_floating"]


def cast_floating(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype`` (others untouched; a no-op for
    leaves already in ``dtype``)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.tree.map(cast, tree)
