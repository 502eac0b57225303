"""How a chunked loss lays out its token rows and vocabulary: chunks of ``C`` rows, blocks of ids.

``[B, T, ...]`` per-token arrays become ``[N, C, ...]`` chunks (:func:`to_chunks`, back with
:func:`from_chunks`) of :func:`balanced_chunk_size` rows, and the vocabulary is walked in
:func:`vocab_blocks` equal blocks (:data:`VOCAB_BLOCK` ids at most) by the LM-head gradients of
:mod:`opd_jax.losses.chunk_engine`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["CHUNK_ALIGN", "VOCAB_BLOCK", "balanced_chunk_size", "from_chunks", "num_chunks",
           "to_chunks", "vocab_blocks"]

VOCAB_BLOCK = 8192


def num_chunks(rows: int, chunk_size: int) -> int:
    return -(-rows // chunk_size)


#: a balanced chunk's rows are a multiple of this (sublane / register tiles on every backend)
CHUNK_ALIGN = 16


def balanced_chunk_size(rows: int, chunk_size: int) -> int:
    """The chunk length that covers ``rows`` token rows in as few chunks as ``chunk_size`` allows,
    split evenly: ``ceil(rows / n)`` rounded up to :data:`CHUNK_ALIGN` with ``n = ceil(rows /
    chunk_size)``, never above ``chunk_size``. Every chunk costs ``C x V`` whatever it holds, so
    704 rows at ``chunk_size=512`` become 2 chunks of 352 instead of 512 + a 192-row chunk padded
    to 512 (1,024 rows of work), and 100 rows one chunk of 112 instead of 512."""
    if rows <= 0:
        return chunk_size
    n = num_chunks(rows, chunk_size)
    size = -(-rows // n)
    return min(chunk_size, -(-size // CHUNK_ALIGN) * CHUNK_ALIGN)


def to_chunks(x: jax.Array, chunk_size: int, fill: Any = 0) -> jax.Array:
    """``[B, T, ...]`` -> ``[N, C, ...]``: flatten token rows, pad the last chunk with ``fill``."""
    rows = x.shape[0] * x.shape[1]
    flat = x.reshape((rows,) + x.shape[2:])
    pad = num_chunks(rows, chunk_size) * chunk_size - rows
    if pad:
        widths = [(0, pad)] + [(0, 0)] * (flat.ndim - 1)
        flat = jnp.pad(flat, widths, constant_values=fill)
    return flat.reshape((-1, chunk_size) + x.shape[2:])


def from_chunks(y: jax.Array, batch: int, time: int) -> jax.Array:
    """``[N, C, ...]`` -> ``[B, T, ...]``: drop the padded rows."""
    flat = y.reshape((-1,) + y.shape[2:])
    return flat[: batch * time].reshape((batch, time) + y.shape[2:])


def vocab_blocks(vocab: int, target: int | None = None) -> int:
    """Number of equal vocabulary blocks (a divisor of V) of at most ~``target`` ids each.

    ``target`` defaults to :data:`VOCAB_BLOCK`.  A V with no divisor near it (e.g. a prime)
    gets one block.
    """
    target = VOCAB_BLOCK if target is None else target
    if vocab <= target:
        return 1
    lo = -(-vocab // target)
    for n in range(lo, 8 * lo + 1):
        if vocab % n == 0:
            return n
    return 1  # no usable divisor (e.g. a prime V): one block
