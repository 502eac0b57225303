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

import math

import jax
import jax.numpy as jnp

from opd_jax.model import bits

__all__ = ["attention", "probabilities", "weighted_values", "split_slots", "MASK_VALUE"]

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


def _bwd(res, do_BxTxHxE):
    dtype = do_BxTxHxE.dtype      # the output's dtype = q's
    q, k, v, p = (bits.from_bits(r, dtype) for r in res[:4])   # q, k, v share one dtype
    mask = res[4]
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
    return dq.reshape(B, T, H, E).astype(dtype), dk.astype(dtype), dv.astype(dtype), None


attention.defvjp(_fwd, _bwd)
