"""The unembedding operand of the chunked losses: a ``[D, V]`` matrix, or a tied ``[V, D]`` table.

A model with tied embeddings unembeds with the transpose of its ``[V, D]`` embedding table,
``z = h E^T``.  Handing the losses ``E.T`` costs a transposed ``[D, V]`` copy per model per step
(the chunk engine slices vocabulary blocks out of it, which XLA cannot fold into the matmul) and,
for the student, a transpose of the ``[D, V]`` gradient back onto the table: ``make demo``'s train
step held two transposed copies (student and teacher, 108 MiB each) at its peak.
:class:`TiedUnembedding` wraps the table itself; the functions here compute logits, vocabulary
blocks and the gradient block for either layout, so a tied model's logits read ``E`` in place and
its unembedding gradient accumulates straight into a ``[V, D]`` buffer.

Both layouts expose ``shape == (D, V)``, ``ndim == 2`` and ``dtype``, so shape checks read the
same.  Blocks are ``size`` vocabulary ids starting at ``start``.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from opd_jax import dots

__all__ = ["TiedUnembedding", "Unembedding"]


class TiedUnembedding(NamedTuple):
    """The unembedding of a tied model, given as its embedding table ``embed_VxD`` (logits
    ``h @ embed_VxD.T``, computed without the transposed copy).  A pytree; its gradient is a
    ``TiedUnembedding`` holding ``dL/dE`` ``[V, D]``."""

    embed_VxD: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        v, d = self.embed_VxD.shape
        return (d, v)

    @property
    def ndim(self) -> int:
        return self.embed_VxD.ndim

    @property
    def dtype(self):
        return self.embed_VxD.dtype


Unembedding = Union[jax.Array, TiedUnembedding]


def is_tied(unembed: Unembedding) -> bool:
    return isinstance(unembed, TiedUnembedding)


def weights(unembed: Unembedding) -> jax.Array:
    """The array behind ``unembed``: ``[D, V]``, or ``[V, D]`` when tied."""
    return unembed.embed_VxD if is_tied(unembed) else unembed


def grad_accumulator(unembed: Unembedding) -> jax.Array:
    """Zeros for the float32 ``dL/dW`` accumulator, in :func:`weights`' layout (no transpose)."""
    return jnp.zeros(weights(unembed).shape, jnp.float32)


def as_cotangent(unembed: Unembedding, dw: jax.Array) -> Unembedding:
    """An accumulated ``dw`` (:func:`weights`' layout) as ``unembed``'s cotangent: its dtype,
    wrapped as ``unembed`` is."""
    dw = dw.astype(unembed.dtype)
    return TiedUnembedding(dw) if is_tied(unembed) else dw


def logits(hidden_CxD: jax.Array, unembed: Unembedding) -> jax.Array:
    """``[C, V]`` logits ``h W`` (``h E^T`` when tied), accumulated in float32, with operands in
    :func:`product_dtype`."""
    dt = product_dtype(hidden_CxD, unembed)
    h, w = hidden_CxD.astype(dt), weights(unembed).astype(dt)
    if is_tied(unembed):
        return lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def vocab_axis(unembed: Unembedding) -> int:
    """The vocabulary axis of :func:`weights` (and of the ``dL/dW`` accumulator): 1, or 0 when tied."""
    return 0 if is_tied(unembed) else 1


def block(unembed: Unembedding, start, size: int) -> jax.Array:
    """Vocabulary block ``[start, start + size)`` of :func:`weights` (``[D, B]`` or ``[B, D]``)."""
    return lax.dynamic_slice_in_dim(weights(unembed), start, size, axis=vocab_axis(unembed))


def product_dtype(hidden: jax.Array, unembed: Unembedding):
    """The dtype the logits and gradient products take their operands in: the hidden states'
    when they are a 2-byte float and the unembedding is too or is float32 (mixed precision's
    master weights; XLA CPU's fast bfloat16 path, as autocast does on accelerators), float32
    otherwise. Sums are float32 either way."""
    dt, w = jnp.dtype(hidden.dtype), jnp.dtype(unembed.dtype)
    narrow = jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 2 and w in (dt, jnp.float32)
    return dt if narrow else jnp.dtype(jnp.float32)


def hidden_grad(g_CxB: jax.Array, block_w: jax.Array, tied: bool) -> jax.Array:
    """A block's share of ``dL/dh = G W^T`` (``G E`` when tied), in ``G``'s dtype (see
    :func:`product_dtype`): ``[C, D]`` float32."""
    return dots.dot(g_CxB, block_w.astype(g_CxB.dtype), dots.NN if tied else dots.NT,
                    out_dtype=jnp.float32)


def weight_grad(hidden_CxD: jax.Array, g_CxB: jax.Array, tied: bool) -> jax.Array:
    """A block's ``dL/dW = h^T G`` (``[D, B]``), or ``dL/dE = G^T h`` (``[B, D]``) when tied;
    float32."""
    a, b = (g_CxB, hidden_CxD) if tied else (hidden_CxD, g_CxB)
    return dots.dot(a, b, dots.TN, out_dtype=jnp.float32)
