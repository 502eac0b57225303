"""Two-byte floats as ``uint16`` bits, for buffers written in place.

XLA CPU has no bfloat16 (or float16) dynamic-update-slice or scatter: its float normalisation
converts the whole destination to float32 and back around every such write. A decode step that
writes one slot of a bfloat16 KV cache then rewrites all of it, and a layer scan that stacks a
bfloat16 residual rewrites the whole ``[L, ...]`` stack for every layer (O(L^2) traffic;
BUILD_NOTES "Session 21"). The same write on the ``uint16`` bits is done in place, and the
bitcasts are free on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["to_bits", "from_bits", "update_slice", "scatter_set"]


def _two_byte_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def to_bits(x: jax.Array) -> jax.Array:
    """``x`` as ``uint16`` bits when it is a 2-byte float; any other array unchanged."""
    return lax.bitcast_convert_type(x, jnp.uint16) if _two_byte_float(x.dtype) else x


def from_bits(x: jax.Array, dtype) -> jax.Array:
    """Inverse of :func:`to_bits`: ``x`` back in ``dtype`` (unchanged when already there)."""
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def update_slice(buf: jax.Array, update: jax.Array, start_indices) -> jax.Array:
    """``lax.dynamic_update_slice(buf, update.astype(buf.dtype), start_indices)``, in place."""
    out = lax.dynamic_update_slice(to_bits(buf), to_bits(update.astype(buf.dtype)), start_indices)
    return from_bits(out, buf.dtype)


def scatter_set(buf: jax.Array, index, update: jax.Array, mode: str | None = None) -> jax.Array:
    """``buf.at[index].set(update.astype(buf.dtype), mode=mode)``, in place."""
    out = to_bits(buf).at[index].set(to_bits(update.astype(buf.dtype)), mode=mode)
    return from_bits(out, buf.dtype)
