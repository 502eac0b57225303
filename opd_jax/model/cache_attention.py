"""Attention over the KV cache, and the cache's layouts and writes.

The cache stores keys and values ``[B, G, S, E]`` (heads before slots; stacked caches add a
leading layer axis), or as a tuple of chunks along ``S`` (the sampler's decode phases grow the
cache chunk by chunk without copying it). The sampler's CPU decode re-lays the keys once per call
as :class:`SlotsLast` (float32 ``[B, G, E, S]`` chunks): a decode step's scores
``s_bgrs = sum_e q_bgre k_bgse`` then reduce over ``E`` with the slot axis innermost, which XLA
CPU's multiply-reduce loops vectorise (27-layer student, bfloat16, B = 32, 256 new tokens: the
score reductions 39.7 -> ≈16 ms a step in a profile; BUILD_NOTES "Session 25"). Values keep
``[B, G, S, E]``: the weighted sum over ``S`` already reads contiguous ``E`` runs.
"""

from __future__ import annotations

import functools
import math
import operator

import flax.struct
import jax
import jax.numpy as jnp

from opd_jax.model import bits, dense_attention
from opd_jax.sharding import constrain

__all__ = ["SlotsLast", "slots_last", "kv_chunks", "cast_kv", "write_kv", "add_slots",
           "attention_over_cache", "ONE_QUERY_MULTIPLY_REDUCE"]

MASK_VALUE = dense_attention.MASK_VALUE


@flax.struct.dataclass
class SlotsLast:
    """One layer's cached keys with the slot axis last, in float32: ``chunks``, a tuple of
    ``[B, G, E, S_c]`` arrays whose slots together make the cache's ``S`` (in order).

    Float32 whatever the model's dtype: a 2-byte float chunk is written either through
    ``uint16`` bits (a bitcast at the write fusion's root, and XLA CPU then loops over the whole
    chunk, slot axis innermost: ≈0.5 ms a layer at B = 32, 192 slots) or on the float32
    detour; and XLA CPU's multiply-reduce reads float32 keys faster (≈0.4 ms against ≈0.6 a
    layer, same shapes). It costs the keys' bytes once more (values stay as stored)."""

    chunks: tuple


def slots_last(k) -> SlotsLast:
    """Keys ``[B, G, S, E]`` (an array or a tuple of chunks along ``S``) as :class:`SlotsLast`:
    each chunk transposed and cast once (a copy)."""
    if isinstance(k, SlotsLast):
        return k
    return SlotsLast(tuple(jnp.swapaxes(c, -1, -2).astype(jnp.float32) for c in kv_chunks(k)))


def kv_chunks(x) -> tuple:
    """Keys or values as a tuple of chunks along the slot axis (one array: a 1-tuple;
    :class:`SlotsLast` keys: their float32 ``[B, G, E, S_c]`` chunks)."""
    if isinstance(x, SlotsLast):
        return tuple(x.chunks)
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def cast_kv(x, dtype):
    """Cached keys or values (any of the layouts above) in ``dtype`` (:class:`SlotsLast` keys
    stay float32: the attention reads them in float32 on the CPU)."""
    if isinstance(x, SlotsLast):
        return x
    if isinstance(x, tuple):
        return tuple(c.astype(dtype) for c in x)
    return x.astype(dtype)


def write_kv(buf, x_BxTxGxE: jax.Array, write_index: jax.Array | int):
    """``buf`` (one layer's keys or values in any layout above) with the ``T`` new rows ``x``
    written at slots ``[write_index, write_index + T)``, in place. A chunked buffer takes them in
    its last chunk (the caller guarantees the slots lie there); the earlier chunks are returned
    untouched."""
    if isinstance(buf, SlotsLast):
        before = sum(c.shape[-1] for c in buf.chunks[:-1])
        update = x_BxTxGxE.transpose(0, 2, 3, 1).astype(jnp.float32)
        last = jax.lax.dynamic_update_slice(buf.chunks[-1], update, (0, 0, 0, write_index - before))
        return SlotsLast(tuple(buf.chunks[:-1]) + (last,))
    if isinstance(buf, tuple):
        before = sum(c.shape[2] for c in buf[:-1])
        return buf[:-1] + (write_kv(buf[-1], x_BxTxGxE, write_index - before),)
    return bits.update_slice(buf, x_BxTxGxE.transpose(0, 2, 1, 3), (0, 0, write_index, 0))


def add_slots(x, size: int):
    """Keys or values (per layer ``[B, G, ...]`` or stacked ``[L, B, G, ...]``, any layout above)
    with ``size`` empty (zero) slots more, as a new last chunk in the same layout: the slots so
    far stay where they are (no copy)."""
    chunks = kv_chunks(x)
    last = chunks[-1]
    axes = ("layers",) * (last.ndim - 4) + ("batch", "kv_heads")
    if isinstance(x, SlotsLast):
        new = jnp.zeros(last.shape[:-1] + (size,), last.dtype)
        return SlotsLast(chunks + (constrain(new, axes + ("head_dim", "length")),))
    new = jnp.zeros(last.shape[:-2] + (size, last.shape[-1]), last.dtype)
    return chunks + (constrain(new, axes + ("length", "head_dim")),)


def _gqa_attention(q_BxTxHxE: jax.Array, ks: tuple, vs: tuple, mask_BxTxS: jax.Array,
                   k_spec: str) -> jax.Array:
    """Masked grouped-query attention over key chunks laid out as ``k_spec`` (``"bgse"`` or
    ``"bges"``) and value chunks ``"bgse"``: the einsums read those layouts directly (no
    transpose), one softmax over all chunks."""
    B, T, H, E = q_BxTxHxE.shape
    G = vs[0].shape[1]
    q_BxTxGxRxE = q_BxTxHxE.reshape(B, T, G, H // G, E)
    probs = dense_attention.probabilities(q_BxTxGxRxE, ks, mask_BxTxS, k_spec)
    out = dense_attention.weighted_values(probs.astype(vs[0].dtype), vs, "bgse")
    return out.astype(q_BxTxHxE.dtype)


def attention_over_cache(q_BxTxHxE: jax.Array, k_BxGxSxE, v_BxGxSxE,
                         mask_BxTxS: jax.Array) -> jax.Array:
    """Grouped-query attention of ``T`` queries over the cache:
    ``o_t = sum_s softmax_s(q_t . k_s / sqrt(E) + m_ts) v_s`` (float32 softmax).
    Keys / values in the cache's ``[B, G, S, E]`` layout (heads before slots, so a decode step
    reads each (row, head) block in place), as tuples of chunks ``[B, G, S_c, E]`` that together
    make the mask's ``S`` slots in order, or keys as :class:`SlotsLast`.

    On the CPU, bfloat16 / float16 operands are upcast to float32 first: XLA CPU's dot thunk has
    no ``BF16 x BF16 = F32`` kernel for this layout's contraction (a bfloat16 model could not
    sample there), and the CPU computes in float32 anyway; accelerators keep the narrow inputs
    with float32 accumulation. The result has ``q``'s dtype either way."""
    dtype = q_BxTxHxE.dtype
    keys_last = isinstance(k_BxGxSxE, SlotsLast)
    ks, vs = kv_chunks(k_BxGxSxE), kv_chunks(v_BxGxSxE)
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and dtype != jnp.float32:
        f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731
        q_BxTxHxE, ks, vs = q_BxTxHxE.astype(jnp.float32), f32(ks), f32(vs)
    if on_cpu and q_BxTxHxE.shape[1] == 1 and ONE_QUERY_MULTIPLY_REDUCE:
        return _one_query_attention(q_BxTxHxE, ks, vs, mask_BxTxS, keys_last).astype(dtype)
    return _gqa_attention(q_BxTxHxE, ks, vs, mask_BxTxS, "bges" if keys_last else "bgse"
                          ).astype(dtype)


# A decode step's attention (one query per row) on the CPU as broadcast multiply-reduces instead
# of batched dots: XLA CPU runs the ``B * G`` tiny ``[R, E] x [E, S]`` dots of the einsum at
# 4-6 GB/s and the fused multiply-reduce loops at 11-14 GB/s (B = 32, S = 191 / 386, SmolLM2
# shapes: 1.49 -> 0.82 ms and 4.31 -> 1.38 ms a layer; BUILD_NOTES "Session 10").
# On an H200 the einsum won (session 9, ``benchmarks/device_decode.py``), so accelerators keep it.
ONE_QUERY_MULTIPLY_REDUCE = True


def _scores(q_BxGxRxE: jax.Array, k, keys_last: bool) -> jax.Array:
    """``s_bgrs = sum_e q_bgre k_bgse / sqrt(E)`` ``[B, G, R, S_c]`` as one multiply-reduce over
    a key chunk ``[B, G, S_c, E]`` (or ``[B, G, E, S_c]`` with ``keys_last``)."""
    E = q_BxGxRxE.shape[-1]
    if keys_last:
        prod = q_BxGxRxE[..., None] * k[:, :, None, :, :]
        return jnp.sum(prod, axis=-2) / math.sqrt(E)
    return jnp.sum(q_BxGxRxE[:, :, :, None, :] * k[:, :, None, :, :], axis=-1) / math.sqrt(E)


def _one_query_attention(q_Bx1xHxE: jax.Array, ks: tuple, vs: tuple, mask_Bx1xS: jax.Array,
                         keys_last: bool = False) -> jax.Array:
    """:func:`attention_over_cache` for ``T = 1`` as multiply-reduces (same math, float32), over
    the cache chunks ``ks`` / ``vs`` (``[B, G, S_c, E]`` each; keys ``[B, G, E, S_c]`` with
    ``keys_last``): ``o_bgre = sum_s softmax_s(s_bgrs + m_bs) v_bgse``.
    Several chunks are combined as in flash decoding: each chunk's unnormalised sums with its own
    max, rescaled to the common max."""
    B, _, H, E = q_Bx1xHxE.shape
    G = vs[0].shape[1]
    q_BxGxRxE = q_Bx1xHxE.reshape(B, G, H // G, E).astype(jnp.float32)
    if len(ks) == 1:
        scores_BxGxRxS = _scores(q_BxGxRxE, ks[0], keys_last)
        scores_BxGxRxS = jnp.where(mask_Bx1xS[:, None, :, :], scores_BxGxRxS, MASK_VALUE)
        probs_BxGxRxS = jax.nn.softmax(scores_BxGxRxS, axis=-1)
        out_BxGxRxE = jnp.sum(probs_BxGxRxS[..., None] * vs[0][:, :, None, :, :], axis=-2)
        return out_BxGxRxE.reshape(B, 1, H, E)
    parts = []
    for k, v, m in zip(ks, vs, dense_attention.split_slots(mask_Bx1xS, [v.shape[2] for v in vs])):
        # a barrier per chunk: XLA CPU would otherwise share (and materialise) the broadcast of
        # q between chunks of equal size (6.6 ms instead of 0.7 a layer at B = 32, S = 2 x 128)
        q_c, k = jax.lax.optimization_barrier((q_BxGxRxE, k))
        s_ = jnp.where(m[:, None, :, :], _scores(q_c, k, keys_last), MASK_VALUE)
        mx = jnp.max(s_, axis=-1)
        p = jnp.exp(s_ - mx[..., None])
        parts.append((mx, jnp.sum(p, axis=-1), jnp.sum(p[..., None] * v[:, :, None, :, :], axis=-2)))
    top = functools.reduce(jnp.maximum, [mx for mx, _, _ in parts])
    scale = [jnp.exp(mx - top) for mx, _, _ in parts]
    total = functools.reduce(operator.add, [c * l for c, (_, l, _) in zip(scale, parts)])
    out_BxGxRxE = functools.reduce(operator.add, [c[..., None] * o
                                                  for c, (_, _, o) in zip(scale, parts)])
    return (out_BxGxRxE / total[..., None]).reshape(B, 1, H, E)
