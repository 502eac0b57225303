"""Small pure building blocks of the decoder: RMSNorm, RoPE (incl. Llama 3 scaling), attention."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.model import dense_attention
from opd_jax.model.config import RopeScaling

# Finite "minus infinity" for masked attention scores: a fully masked row (a padding query) then
# gives a uniform softmax instead of NaN, and NaN can never reach the gradients.
MASK_VALUE = dense_attention.MASK_VALUE


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
    Its backward saves ``q``, ``k``, ``v`` and the probabilities once
    (:mod:`opd_jax.model.dense_attention`).

    .. math:: o_t = \\sum_s \\mathrm{softmax}_s(q_t \\cdot k_s / \\sqrt{E} + m_{ts})\\, v_s
    """
    return dense_attention.attention(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, mask_BxTxS)


# --- blocked (flash-style) attention ----------------------------------------------------------
#
# Same result as ``attention`` with ``mask[b, t, s] = (s <= q_slot[t]) & kv_valid[b, s]`` (the
# decoder's causal + per-slot validity mask, with or without a KV cache) for every query that may
# attend to at least one key. Queries are cut into blocks of ``block_q`` and keys into blocks of
# ``block_k``; each query block runs over its key blocks with a running max / sum (online
# softmax) in float32, so no ``[T, S]`` scores exist: temporaries are O(B * H * block_q * block_k)
# and the saved residuals O(B * T * H * E). Key blocks entirely after a query block's last slot
# (causal) or before the first valid slot of every row (left padding) are skipped (the loops run
# over ``[lo, hi)`` only). The gradient is a custom VJP that recomputes the probabilities block by
# block from the saved log-sum-exp (flash attention's backward), never the scan's residuals.
# A query with no key to attend to (a left-padding position) gets output 0 here, where the dense
# path returns the mean of all values; those positions are padding and are masked downstream.


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocked_layout(q, k, v, q_slot_T, kv_valid_BxS, block_q, block_k):
    """Pad T and S to whole blocks; returns the padded arrays and the block geometry."""
    B, T, H, E = q.shape
    S, G = k.shape[1], k.shape[2]
    bq, bk = max(1, min(block_q, T)), max(1, min(block_k, S))
    nq, nk = _cdiv(T, bq), _cdiv(S, bk)
    qp = jnp.pad(q, ((0, 0), (0, nq * bq - T), (0, 0), (0, 0)))
    qp = qp.reshape(B, nq * bq, G, H // G, E)
    kp = jnp.pad(k, ((0, 0), (0, nk * bk - S), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, nk * bk - S), (0, 0), (0, 0)))
    # padded queries sit at slot -1 (they attend to nothing); padded keys are invalid
    slot = jnp.pad(q_slot_T.astype(jnp.int32), (0, nq * bq - T), constant_values=-1)
    valid = jnp.pad(kv_valid_BxS.astype(bool), ((0, 0), (0, nk * bk - S)))
    # first key block holding a valid key in any row (left padding: earlier blocks are skipped)
    any_valid_S = jnp.any(valid, axis=0)
    first = jnp.where(jnp.any(any_valid_S), jnp.argmax(any_valid_S), nk * bk)
    lo = (first // bk).astype(jnp.int32)
    return qp, kp, vp, slot, valid, lo, (B, T, H, E, G, bq, bk, nq, nk)


def _block_hi(slot_q, bk, nk):
    """One past the last key block a query block needs: its largest slot's block (causal)."""
    return jnp.clip(jnp.floor_divide(jnp.max(slot_q), bk) + 1, 0, nk).astype(jnp.int32)


def _segment_layout(segments_BxT, segment_start_BxT, geo):
    """Packed rows (``T == S``): segment ids padded to whole query / key blocks (-2 / -1 in the
    padding) and each query block's first needed key block ``[nq]`` (its earliest segment's);
    ``(None, None, None)`` for unpacked rows, which pay nothing for segments."""
    if segments_BxT is None:
        return None, None, None
    B, T, H, E, G, bq, bk, nq, nk = geo
    seg_q = jnp.pad(segments_BxT, ((0, 0), (0, nq * bq - T)), constant_values=-2)
    seg_k = jnp.pad(segments_BxT, ((0, 0), (0, nk * bk - T)), constant_values=-1)
    start = jnp.pad(segment_start_BxT, ((0, 0), (0, nq * bq - T)), constant_values=nk * bk)
    lo_q = (jnp.min(start.reshape(B, nq, bq), axis=(0, 2)) // bk).astype(jnp.int32)
    return seg_q, seg_k, lo_q


def _segment_blocks(seg_q, seg_k, lo_q, lo, i, bq):
    """One query block's segment ids (None unpacked) and its first key block."""
    if seg_q is None:
        return None, lo
    return jax.lax.dynamic_slice_in_dim(seg_q, i * bq, bq, axis=1), jnp.maximum(lo, lo_q[i])


def _key_segments(seg_k, j, bk):
    return None if seg_k is None else jax.lax.dynamic_slice_in_dim(seg_k, j * bk, bk, axis=1)


def _block_scores(q_i, k_j, slot_q, valid_j, j, bk, scale, seg_q=None, seg_j=None):
    """Scaled float32 scores ``[B, G, R, bq, bk]`` of one (query, key) block pair and its mask."""
    s = jnp.einsum("bqgre,bkge->bgrqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
    slots_k = j * bk + jnp.arange(bk)
    mask = (slots_k[None, :] <= slot_q[:, None])[None, None, None] & valid_j[:, None, None, None, :]
    if seg_q is not None:   # packed rows: only keys of the query's own segment
        mask = mask & (seg_q[:, :, None] == seg_j[:, None, :])[:, None, None]
    return s, mask


def _blocked_forward(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT, block_q,
                     block_k):
    qp, kp, vp, slot, valid, lo, geo = _blocked_layout(q, k, v, q_slot_T, kv_valid_BxS,
                                                       block_q, block_k)
    B, T, H, E, G, bq, bk, nq, nk = geo
    R = H // G
    scale = 1.0 / math.sqrt(E)
    seg_q, seg_k, lo_q = _segment_layout(segments_BxS, segment_start_BxT, geo)

    def q_block(_, i):
        q_i = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)      # [B, bq, G, R, E]
        slot_q = jax.lax.dynamic_slice_in_dim(slot, i * bq, bq)          # [bq]
        seg_qi, lo_i = _segment_blocks(seg_q, seg_k, lo_q, lo, i, bq)     # [B, bq] or None

        def kv_block(j, carry):
            m, l, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)  # [B, bk, G, E]
            v_j = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)
            valid_j = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)
            seg_j = _key_segments(seg_k, j, bk)
            s, mask = _block_scores(q_i, k_j, slot_q, valid_j, j, bk, scale, seg_qi, seg_j)
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bgrqk,bkge->bgrqe", p.astype(v_j.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (jnp.full((B, G, R, bq), MASK_VALUE, jnp.float32),
                jnp.zeros((B, G, R, bq), jnp.float32), jnp.zeros((B, G, R, bq, E), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo_i, _block_hi(slot_q, bk, nk), kv_block, init)
        seen = l > 0
        o_i = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (o_i, lse_i)

    _, (o, lse) = jax.lax.scan(q_block, None, jnp.arange(nq))     # [nq, B, G, R, bq, (E)]
    o = jnp.moveaxis(o, 0, 1).transpose(0, 1, 4, 2, 3, 5).reshape(B, nq * bq, H, E)[:, :T]
    return o.astype(q.dtype), lse                                  # lse: [nq, B, G, R, bq]


def _blocked_backward(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT, o, lse,
                      do, block_q, block_k):
    qp, kp, vp, slot, valid, lo, geo = _blocked_layout(q, k, v, q_slot_T, kv_valid_BxS,
                                                       block_q, block_k)
    B, T, H, E, G, bq, bk, nq, nk = geo
    seg_q, seg_k, lo_q = _segment_layout(segments_BxS, segment_start_BxT, geo)
    R = H // G
    scale = 1.0 / math.sqrt(E)
    pad_t = ((0, 0), (0, nq * bq - T), (0, 0), (0, 0))
    dop = jnp.pad(do, pad_t).reshape(B, nq * bq, G, R, E)
    # D_t = sum_e dO_te O_te = sum_s P_ts dP_ts (float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = jnp.pad(delta, ((0, 0), (0, nq * bq - T), (0, 0))).reshape(B, nq * bq, G, R)

    def q_block(carry, i):
        dk, dv = carry
        q_i = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)
        do_i = jax.lax.dynamic_slice_in_dim(dop, i * bq, bq, axis=1)     # [B, bq, G, R, E]
        slot_q = jax.lax.dynamic_slice_in_dim(slot, i * bq, bq)
        seg_qi, lo_i = _segment_blocks(seg_q, seg_k, lo_q, lo, i, bq)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=1).transpose(0, 2, 3, 1)
        lse_i = lse[i]                                                   # [B, G, R, bq]

        def kv_block(j, carry):
            dq_i, dk, dv = carry
            k_j = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)
            valid_j = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)
            seg_j = _key_segments(seg_k, j, bk)
            s, mask = _block_scores(q_i, k_j, slot_q, valid_j, j, bk, scale, seg_qi, seg_j)
            p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)       # [B, G, R, bq, bk]
            dv_j = jnp.einsum("bgrqk,bqgre->bkge", p.astype(do_i.dtype), do_i,
                              preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqgre,bkge->bgrqk", do_i, v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q_i.dtype)
            dq_i = dq_i + jnp.einsum("bgrqk,bkge->bqgre", ds, k_j,
                                     preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bgrqk,bqgre->bkge", ds, q_i, preferred_element_type=jnp.float32)
            at = j * bk
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, at, bk, axis=1) + dk_j, at, axis=1)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, at, bk, axis=1) + dv_j, at, axis=1)
            return dq_i, dk, dv

        dq_i = jnp.zeros((B, bq, G, R, E), jnp.float32)
        dq_i, dk, dv = jax.lax.fori_loop(lo_i, _block_hi(slot_q, bk, nk), kv_block,
                                         (dq_i, dk, dv))
        return (dk, dv), dq_i

    zeros_kv = jnp.zeros((B, nk * bk, G, E), jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros_kv, zeros_kv), jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 1).reshape(B, nq * bq, H, E)[:, :T]
    S = k.shape[1]
    return dq.astype(q.dtype), dk[:, :S].astype(k.dtype), dv[:, :S].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention_blocked(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT,
                       block_q, block_k):
    return _blocked_forward(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT,
                            block_q, block_k)[0]


def _attention_blocked_fwd(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT,
                           block_q, block_k):
    o, lse = _blocked_forward(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT,
                              block_q, block_k)
    return o, (q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT, o, lse)


def _attention_blocked_bwd(block_q, block_k, res, do):
    q, k, v, q_slot_T, kv_valid_BxS, segments_BxS, segment_start_BxT, o, lse = res
    dq, dk, dv = _blocked_backward(q, k, v, q_slot_T, kv_valid_BxS, segments_BxS,
                                   segment_start_BxT, o, lse, do, block_q, block_k)
    return dq, dk, dv, None, None, None, None


_attention_blocked.defvjp(_attention_blocked_fwd, _attention_blocked_bwd)


def attention_blocked(q_BxTxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array,
                      q_slot_T: jax.Array, kv_valid_BxS: jax.Array, *, block_q: int = 512,
                      block_k: int = 512, segments_BxS: jax.Array | None = None,
                      segment_start_BxT: jax.Array | None = None) -> jax.Array:
    """Memory-efficient grouped-query attention (online softmax over key blocks; float32 math).

    Query ``t`` may attend to key slot ``s`` when ``s <= q_slot_T[t]`` and ``kv_valid_BxS[b, s]``
    (without a cache ``q_slot_T = arange(T)``; with one, ``cache.index + arange(T)``). Equal to
    :func:`attention` with that mask wherever a query has a key to attend to; a query with none
    gets 0. ``T`` and ``S`` need not be multiples of the block sizes (blocks are clamped to
    ``T`` / ``S`` and the tail is padded). Differentiable (custom VJP, O(T) residuals).

    Packed rows (no cache, ``T == S``): ``segments_BxS`` (int) also requires
    ``segments[b, t] == segments[b, s]``, and ``segment_start_BxT`` (each query's segment's first
    slot) lets a query block skip every key block before the earliest segment it holds (blocks
    after it are skipped by causality), so a packed row costs about its segments' own blocks.
    """
    if segments_BxS is not None:
        T, S = q_BxTxHxE.shape[1], k_BxSxGxE.shape[1]
        if T != S or segment_start_BxT is None:
            raise ValueError(f"segments are for packed rows: T == S (got {T}, {S}) and "
                             "segment_start_BxT given")
        segments_BxS = segments_BxS.astype(jnp.int32)
        segment_start_BxT = segment_start_BxT.astype(jnp.int32)
    return _attention_blocked(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, q_slot_T, kv_valid_BxS,
                              segments_BxS, segment_start_BxT, int(block_q), int(block_k))
