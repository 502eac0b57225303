"""The training forward's dense attention, with a hand-written backward that saves four tensors.

Autodiff of the masked grouped-query softmax saves the float32 probabilities *and* their cast
copy beside ``q``, ``k`` and ``v``; inside the decoder's layer scan each is stacked over the
layers. This VJP saves ``q``, ``k``, ``v`` and the probabilities once, in the operands' dtype
(2-byte floats as ``uint16`` bits, :mod:`opd_jax.model.bits`, which XLA CPU stacks in place),
and recomputes nothing:

.. math:: S = Q K^\\top / \\sqrt{E}\\ (\\text{masked}),\\quad P = \\mathrm{softmax}(S),\\quad O = P V

.. math:: \\partial V = P^\\top \\partial O,\\quad \\partial P = \\partial O\\, V^\\top,\\quad
   \\partial S = P \\odot (\\partial P - \\textstyle\\sum_s \\partial P \\odot P)\\ (0\\text{ where masked}),

.. math:: \\partial Q = \\partial S\\, K / \\sqrt{E},\\quad \\partial K = \\partial S^\\top Q / \\sqrt{E}

Softmax and ``dS`` run in float32; the products take float32 sums. Same values as autodiff of
the plain formula (float32: to rounding; bfloat16: the softmax backward reads the bfloat16
probabilities the forward used); ``tests/test_dense_attention.py`` checks both against float64.
:func:`opd_jax.model.layers.attention` is this function.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from opd_jax.model import bits

__all__ = ["attention", "causal_attention", "query_blocks", "QUERY_BLOCK", "probabilities",
           "weighted_values", "split_slots", "MASK_VALUE"]

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def probabilities(q_BxTxGxRxE: jax.Array, ks: tuple, mask_BxTxS: jax.Array,
                  kv_spec: str = "bsge") -> jax.Array:
    """Softmax probabilities ``[B, G, R, T, S]`` (float32) of the masked scaled scores
    ``q_t . k_s / sqrt(E)``. ``ks``: the keys as a tuple of chunks along ``s`` in the layout
    ``kv_spec`` (``"bsge"``, or the KV cache's ``"bgse"``), each read in place; the chunks'
    slots together are the mask's ``S``."""
    E = q_BxTxGxRxE.shape[-1]
    parts = [jnp.einsum(f"btgre,{kv_spec}->bgrts", q_BxTxGxRxE, kc,
                        preferred_element_type=jnp.float32) for kc in ks]
    scores = (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)) / math.sqrt(E)
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def split_slots(x: jax.Array, sizes: list[int]) -> list[jax.Array]:
    """``x`` cut along its last (slot) axis into consecutive pieces of ``sizes`` (the KV cache's
    chunks); one size: ``[x]``."""
    if len(sizes) == 1:
        return [x]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + int(size))
    return [jax.lax.slice_in_dim(x, a, b, axis=x.ndim - 1)
            for a, b in zip(offsets[:-1], offsets[1:])]


def weighted_values(p_BxGxRxTxS: jax.Array, vs: tuple, kv_spec: str = "bsge") -> jax.Array:
    """``o_t = sum_s p_ts v_s`` as ``[B, T, G * R, E]`` float32 sums, over the value chunks ``vs``
    (layout ``kv_spec``; ``p``'s slots cut to match them)."""
    B, G, R, T, _ = p_BxGxRxTxS.shape
    ps = split_slots(p_BxGxRxTxS, [vc.shape[kv_spec.index("s")] for vc in vs])
    out = None
    for p, vc in zip(ps, vs):
        o = jnp.einsum(f"bgrts,{kv_spec}->btgre", p, vc, preferred_element_type=jnp.float32)
        out = o if out is None else out + o
    return out.reshape(B, T, G * R, -1)


@jax.custom_vjp
def attention(q_BxTxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array,
              mask_BxTxS: jax.Array) -> jax.Array:
    """Grouped-query softmax attention with a boolean mask (True = may attend): ``[B, T, H, E]``
    in ``q``'s dtype. ``o_t = sum_s softmax_s(q_t . k_s / sqrt(E) + m_ts) v_s``."""
    return _forward(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, mask_BxTxS)[0]


def _forward(q, k, v, mask):
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention takes q, k, v of one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}; cast them to the compute dtype first")
    B, T, H, E = q.shape
    G = k.shape[2]
    q5 = q.reshape(B, T, G, H // G, E)
    p = probabilities(q5, (k,), mask).astype(v.dtype)
    return weighted_values(p, (v,)).astype(q.dtype), p


def _fwd(q, k, v, mask):
    out, p = _forward(q, k, v, mask)
    return out, (bits.to_bits(q), bits.to_bits(k), bits.to_bits(v), bits.to_bits(p), mask)


def _grads(q, k, v, p, mask, do_BxTxHxE):
    """``(dq, dk, dv)`` in float32 from the forward's ``q``, ``k``, ``v`` and probabilities
    ``p`` (the module docstring's formulas); ``do`` in the operands' dtype."""
    dtype = do_BxTxHxE.dtype
    B, T, H, E = q.shape
    G = k.shape[2]
    q5 = q.reshape(B, T, G, H // G, E)
    do5 = do_BxTxHxE.reshape(B, T, G, H // G, E)
    dv = jnp.einsum("bgrts,btgre->bsge", p, do5, preferred_element_type=jnp.float32)
    dp = jnp.einsum("btgre,bsge->bgrts", do5, v, preferred_element_type=jnp.float32)
    p32 = p.astype(jnp.float32)
    ds = p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))
    ds = jnp.where(mask[:, None, None, :, :], ds, 0.0) / math.sqrt(E)
    ds = ds.astype(dtype)
    dq = jnp.einsum("bgrts,bsge->btgre", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bgrts,btgre->bsge", ds, q5, preferred_element_type=jnp.float32)
    return dq.reshape(B, T, H, E), dk, dv


def _bwd(res, do_BxTxHxE):
    dtype = do_BxTxHxE.dtype      # the output's dtype = q's
    q, k, v, p = (bits.from_bits(r, dtype) for r in res[:4])   # q, k, v share one dtype
    dq, dk, dv = _grads(q, k, v, p, res[4], do_BxTxHxE)
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype), None


attention.defvjp(_fwd, _bwd)


# --- causal query blocks ----------------------------------------------------------------------
#
# Under a causal mask (no query sees a later key) a block of queries ``[a, b)`` sees keys
# ``[0, b)`` only, so cutting the queries into blocks and attending each over its key prefix
# skips the ``[a, b) x [b, S)`` corner of the scores that the mask would zero: ``(n + 1) / 2n``
# of the dense work for ``n`` equal blocks. Each query's softmax runs over the same visible keys,
# so the values are the dense ones (a query that sees no key at all, padding, averages its
# block's key prefix instead of every key; nothing reads it). XLA CPU materialises the scores
# and runs the softmax as several passes over them: at ``[8, 352]`` rows of SmolLM2 the dense
# attention was 37% of the teacher's forward, and two blocks took the forward 1.57 -> 1.14 s
# (BUILD_NOTES "Session 27").

#: query rows per block (about): ``T`` queries run as ``round(T / QUERY_BLOCK)`` blocks, at most
#: :data:`MAX_QUERY_BLOCKS` (each block is its own ops, unrolled inside the layer scan). 88-128
#: measured alike at ``[8, 352]`` and ``[4, 704]`` (forward + gradient 63 -> 37-41 ms and 183 ->
#: 73-78 ms a layer); 176 and up lost part of the gain.
QUERY_BLOCK = 112
MAX_QUERY_BLOCKS = 16


def query_blocks(T: int, block: int | None = None) -> tuple[tuple[int, int], ...]:
    """The query ranges ``((a0, b0), (a1, b1), ...)`` covering ``[0, T)`` that
    :func:`causal_attention` runs: ``round(T / block)`` blocks (at least 1, at most
    :data:`MAX_QUERY_BLOCKS`) of near-equal length, inner boundaries on multiples of 8
    (``block`` default :data:`QUERY_BLOCK`)."""
    n = min(MAX_QUERY_BLOCKS, max(1, round(T / (QUERY_BLOCK if block is None else block))))
    cuts = sorted({min(T, -(-(i * T // n) // 8) * 8) for i in range(1, n)} - {0, T})
    edges = [0, *cuts, T]
    return tuple(zip(edges[:-1], edges[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q_BxTxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array,
                     mask_BxTxS: jax.Array, blocks: tuple[tuple[int, int], ...]) -> jax.Array:
    """:func:`attention` for a causal ``mask`` (``mask[b, t, s]`` False for every ``s > t``;
    ``S == T``), its queries run in ``blocks`` (:func:`query_blocks`), each over the keys up to
    its last query. Same values and gradients as :func:`attention` wherever a query sees a
    key; saves ``q``, ``k``, ``v`` and each block's probabilities ``[B, G, R, b - a, b]``; the
    backward sums the blocks' key and value gradients in float32 and rounds once."""
    return _causal_forward(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, mask_BxTxS, blocks)[0]


def _causal_forward(q, k, v, mask, blocks):
    if (blocks[0][0] != 0 or blocks[-1][1] != q.shape[1] or k.shape[1] != q.shape[1]
            or any(a >= b for a, b in blocks)
            or any(b0 != a1 for (_, b0), (a1, _) in zip(blocks, blocks[1:]))):
        raise ValueError(f"query blocks {blocks} must be consecutive non-empty ranges covering "
                         f"[0, T) of q {q.shape}, with keys {k.shape} at the same T (no cache); "
                         "use query_blocks(T)")
    outs, ps = [], []
    for a, b in blocks:
        out, p = _forward(q[:, a:b], k[:, :b], v[:, :b], mask[:, a:b, :b])
        outs.append(out)
        ps.append(p)
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)), ps


def _causal_fwd(q, k, v, mask, blocks):
    out, ps = _causal_forward(q, k, v, mask, blocks)
    return out, (bits.to_bits(q), bits.to_bits(k), bits.to_bits(v),
                 tuple(bits.to_bits(p) for p in ps), mask)


def _causal_bwd(blocks, res, do_BxTxHxE):
    dtype = do_BxTxHxE.dtype
    q, k, v = (bits.from_bits(r, dtype) for r in res[:3])
    mask = res[4]
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (a, b), p in zip(blocks, res[3]):
        dq_b, dk_b, dv_b = _grads(q[:, a:b], k[:, :b], v[:, :b], bits.from_bits(p, dtype),
                                  mask[:, a:b, :b], do_BxTxHxE[:, a:b])
        dqs.append(dq_b.astype(dtype))
        dk = dk.at[:, :b].add(dk_b)
        dv = dv.at[:, :b].add(dv_b)
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=1)
    return dq, dk.astype(dtype), dv.astype(dtype), None


causal_attention.defvjp(_causal_fwd, _causal_bwd)
