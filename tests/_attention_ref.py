"""The grouped-query masked softmax attention from its definition, in plain ``jax.numpy`` (any
float dtype; run under ``enable_x64`` for a float64 reference), shared by the attention tests."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from opd_jax.model.dense_attention import MASK_VALUE


def plain_attention(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, mask_BxTxS):
    """``o_t = sum_s softmax_s(q_t . k_s / sqrt(E) + m_ts) v_s`` with query head ``h`` reading
    key / value head ``h // (H // G)``: ``[B, T, H, E]``."""
    B, T, H, E = q_BxTxHxE.shape
    G = k_BxSxGxE.shape[2]
    q5 = q_BxTxHxE.reshape(B, T, G, H // G, E)
    s = jnp.einsum("btgre,bsge->bgrts", q5, k_BxSxGxE) / math.sqrt(E)
    p = jax.nn.softmax(jnp.where(mask_BxTxS[:, None, None], s, MASK_VALUE), axis=-1)
    return jnp.einsum("bgrts,bsge->btgre", p, v_BxSxGxE).reshape(B, T, H, E)
