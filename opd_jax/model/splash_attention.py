"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) for the decoder's
full-sequence calls: the ``"splash"`` implementation of :mod:`opd_jax.model.platform_attention`.

Splash attention is Pallas's block-sparse flash attention for TPU: the causal mask is static
(blocks above the diagonal are never visited), and left padding and packed rows become segment
ids: query ``t`` attends slot ``s`` when ``s <= t`` and ``seg[t] == seg[s]``, with

* unpacked rows: ``seg = 0`` on real slots, ``-1`` on padding;
* packed rows: the row's segment ids on real slots, ``-1`` on padding.

Real queries therefore see exactly the dense decoder's keys; a padding query sees the padding
slots up to itself (never empty: its own slot), where the dense path returns the mean of all
values. Those positions are padding and are masked downstream.

Grouped-query attention runs the kernel's multi-query form once per key/value head (``R = H / G``
query heads share it) and batch row (``jax.vmap``). The kernel wants ``q`` pre-scaled (it applies
no ``1 / sqrt(E)``) and sequence blocks of 128 lanes: a row whose ``T`` is not a multiple of
:data:`BLOCK` is padded up to one with slots of segment ``-2`` that no real query can see, and the
output cut back (exact; at most 127 extra slots). Off TPU the same kernel runs in Pallas's
interpret mode (a slow reference used by the tests on CPU, never chosen automatically).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["BLOCK", "splash_blockers", "attention_splash"]

#: sequence block of the kernel (query and key blocks; the TPU's 128 lanes)
BLOCK = 128


def splash_blockers(*, length: int, platform: str, device_count: int = 1,
                    forced: bool = False) -> list[str]:
    """Why the platform mode should not pick splash attention for a call (empty: it should).
    ``forced``: the mode asked for splash explicitly: it then runs at any length, and off TPU in
    interpret mode, so nothing blocks it. Several devices block the automatic choice: the kernel
    is a Pallas call, which XLA's SPMD partitioner does not split over a mesh (it would need a
    ``shard_map`` around it, not wired yet)."""
    if forced:
        return []
    reasons = []
    if platform != "tpu":
        reasons.append(f"splash attention is a TPU kernel (platform {platform!r})")
    if device_count > 1:
        reasons.append(f"{device_count} devices: the splash kernel is not partitioned over a mesh "
                       "here (no shard_map around it yet); XLA's attention is")
    if length < BLOCK:
        reasons.append(f"rows of T = {length} < {BLOCK} tokens fit one block: XLA's attention "
                       "is as fast there")
    return reasons


@functools.lru_cache(maxsize=None)
def _kernel(length: int, heads_per_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    b = BLOCK
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads_per_kv)])
    # built once per shape and cached: its block tables must be concrete arrays, not tracers of
    # the trace that first asked for it
    with jax.ensure_compile_time_eval():
        kernel = sk.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)
    return kernel, sk


def attention_splash(q_BxTxHxE: jax.Array, k_BxTxGxE: jax.Array, v_BxTxGxE: jax.Array,
                     kv_valid_BxT: jax.Array | None, segments_BxT: jax.Array | None, *,
                     interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention of one call's own tokens (``T == S``) through the splash
    kernel; output ``[B, T, H, E]`` in ``q``'s dtype.

    .. math:: o_t = \\sum_{s \\le t,\\ seg_s = seg_t} \\mathrm{softmax}_s(q_t \\cdot k_s /
       \\sqrt{E})\\, v_s

    ``kv_valid_BxT``: real slots (``None``: all); ``segments_BxT``: packed rows' segment ids
    (``None``: unpacked). ``interpret``: run the Pallas kernel in interpret mode (off TPU)."""
    B, T, H, E = q_BxTxHxE.shape
    G = k_BxTxGxE.shape[2]
    R = H // G
    seg_BxT = (jnp.zeros((B, T), jnp.int32) if segments_BxT is None
               else segments_BxT.astype(jnp.int32))
    if kv_valid_BxT is not None:
        seg_BxT = jnp.where(kv_valid_BxT.astype(bool), seg_BxT, -1)
    Tp = -(-T // BLOCK) * BLOCK   # whole blocks; the extra slots form a segment of their own
    if Tp != T:
        pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))
        q_BxTxHxE, k_BxTxGxE, v_BxTxGxE = (pad(x) for x in (q_BxTxHxE, k_BxTxGxE, v_BxTxGxE))
        seg_BxT = jnp.pad(seg_BxT, ((0, 0), (0, Tp - T)), constant_values=-2)
    kernel, sk = _kernel(Tp, R, bool(interpret))
    q_BxGxRxTxE = (q_BxTxHxE * jnp.asarray(1.0 / math.sqrt(E), q_BxTxHxE.dtype)
                   ).reshape(B, Tp, G, R, E).transpose(0, 2, 3, 1, 4)
    k_BxGxTxE, v_BxGxTxE = (x.transpose(0, 2, 1, 3) for x in (k_BxTxGxE, v_BxTxGxE))

    def one_row(q_GxRxTxE, k_GxTxE, v_GxTxE, seg_T):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GxRxTxE, k_GxTxE,
                                                                           v_GxTxE)

    out_BxGxRxTxE = jax.vmap(one_row)(q_BxGxRxTxE, k_BxGxTxE, v_BxGxTxE, seg_BxT)
    out_BxTxHxE = out_BxGxRxTxE.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, E)
    return out_BxTxHxE[:, :T].astype(q_BxTxHxE.dtype)
