"""The grouped-query masked softmax attention from its definition, in plain ``jax.numpy`` (any
float dtype; run under ``enable_x64`` for a float64 reference), shared by the attention tests."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from _compat import enable_x64

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


def assert_grads_match_float64(grads, q, k, v, mask, cot, tol: float) -> None:
    """``grads`` (of ``sum(attention(q, k, v) * cot)`` w.r.t. q, k, v) are finite, in the
    operands' dtypes, and within ``tol`` (relative to each reference's largest entry) of float64
    autodiff of :func:`plain_attention`."""
    with enable_x64():
        a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v)]
        c64 = jnp.asarray(np.asarray(cot, np.float64))
        ref = jax.grad(lambda *a: jnp.sum(plain_attention(*a, mask) * c64), (0, 1, 2))(*a64)
    for g, r, a in zip(grads, ref, (q, k, v)):
        assert g.dtype == a.dtype and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g, np.float64), r,
                                   atol=tol * max(1.0, float(np.abs(r).max())))
