"""Small pure building blocks of the decoder: RMSNorm, RoPE (incl. Llama 3 scaling), attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.model.config import RopeScaling

# Finite "minus infinity" for masked attention scores: a fully masked row (a padding query) then
# gives a uniform softmax instead of NaN, and NaN can never reach the gradients.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32: ``x / sqrt(mean(x^2) + eps) * weight``, cast back to ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/E)`` for i < E/2, with optional Llama 3 scaling (HF formula)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF "rotate_half" layout (first half / second half of the head dim)."""
    angles_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    cos = jnp.cos(angles_BxTxE2)[:, :, None, :]
    sin = jnp.sin(angles_BxTxE2)[:, :, None, :]
    x = x_BxTxNxE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxE.dtype)


def attention(q_BxTxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array,
              mask_BxTxS: jax.Array) -> jax.Array:
    """Grouped-query softmax attention with a boolean mask (True = may attend); float32 softmax.

    .. math:: o_t = \\sum_s \\mathrm{softmax}_s(q_t \\cdot k_s / \\sqrt{E} + m_{ts})\\, v_s
    """
    B, T, H, E = q_BxTxHxE.shape
    G = k_BxSxGxE.shape[2]
    q_BxTxGxRxE = q_BxTxHxE.reshape(B, T, G, H // G, E)
    scores = jnp.einsum("btgre,bsge->bgrts", q_BxTxGxRxE, k_BxSxGxE,
                        preferred_element_type=jnp.float32) / math.sqrt(E)
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxE.dtype)
    out = jnp.einsum("bgrts,bsge->btgre", probs, v_BxSxGxE, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, E).astype(q_BxTxHxE.dtype)
