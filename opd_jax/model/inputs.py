"""What every layer of one decoder call shares: RoPE positions, the attention mask and the KV
cache's bookkeeping for the ``T`` new tokens (:func:`step_inputs`, built once per call by
:func:`opd_jax.model.decoder.forward` and by the samplers' decode steps)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.model.config import ModelConfig
from opd_jax.model.layers import rope_inv_freq
from opd_jax.model.platform_attention import PlatformMask, platform_mask

__all__ = ["BlockedMask", "StepInputs", "step_inputs"]


class BlockedMask(NamedTuple):
    """The attention mask in factored form for blocked attention: query ``t`` may attend to slot
    ``s`` when ``s <= q_slot[t]`` and ``kv_valid[b, s]`` (never built as ``[B, T, S]``)."""

    q_slot: jax.Array    # [T] int32
    kv_valid: jax.Array  # [B, S] bool
    block: int
    segments: jax.Array | None = None        # [B, S] int32: packed rows' segment ids (T == S)
    segment_start: jax.Array | None = None   # [B, T] int32: first slot of each query's segment



class StepInputs(NamedTuple):
    """What every layer of one decoder call shares; built once per call by :func:`step_inputs`."""

    positions_BxT: jax.Array              # int32 RoPE positions of the new tokens
    mask_BxTxS: jax.Array | BlockedMask | PlatformMask   # which keys each new token attends to
    inv_freq: Any                         # RoPE inverse frequencies (a host constant)
    lora_scale: float
    write_index: jax.Array | int          # first cache slot the new keys/values go to (0: no cache)
    kv_valid_BxS: jax.Array | None        # the cache's ``valid`` after the call (None: no cache)
    next_pos_B: jax.Array | None          # the cache's ``next_pos`` after the call (None: no cache)


def step_inputs(config: ModelConfig, tokens_BxT: jax.Array, *, valid_BxT: jax.Array | None = None,
                positions_BxT: jax.Array | None = None, cache: Any = None, lora: Any = None,
                blocked: bool = False, segment_ids_BxT: jax.Array | None = None,
                platform: str | None = None) -> StepInputs:
    """Positions, attention mask and cache bookkeeping for ``T`` new tokens per row.

    ``valid_BxT=None`` means every new token is real. ``cache``: a :class:`KVCache` or any object
    with its ``valid`` / ``index`` / ``next_pos`` fields (the sampler's per-layer caches); the new
    tokens take slots ``[cache.index, cache.index + T)`` and attend causally over the cache.
    ``lora``: a :class:`~opd_jax.model.decoder.Lora` (only its ``scale`` is read) or ``None``.
    ``blocked``: the mask as a :class:`BlockedMask` (blocked attention) instead of ``[B, T, S]``.
    ``segment_ids_BxT`` (packed rows, no cache): a token attends only to earlier tokens of its own
    segment; pass ``positions_BxT`` restarting at 0 per segment. ``platform`` (a
    ``"platform*"`` attention mode; ignored with a cache): the mask as a
    :class:`~opd_jax.model.platform_attention.PlatformMask` (``jax.nn.dot_product_attention``).
    """
    B, T = tokens_BxT.shape
    if segment_ids_BxT is not None and (cache is not None or positions_BxT is None):
        raise ValueError("segment_ids_BxT (packed rows) needs positions_BxT and no cache")
    all_real = valid_BxT is None
    valid_BxT = jnp.ones((B, T), bool) if all_real else valid_BxT.astype(bool)
    offset_B = cache.next_pos if cache is not None else jnp.zeros((B,), jnp.int32)
    if positions_BxT is None:
        if all_real:
            positions_BxT = offset_B[:, None] + np.arange(T, dtype=np.int32)[None, :]
        else:
            positions_BxT = offset_B[:, None] + jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
            positions_BxT = jnp.where(valid_BxT, positions_BxT, 0)
    positions_BxT = positions_BxT.astype(jnp.int32)

    kv_valid_BxS = next_pos_B = None
    if cache is not None:
        slots_S = jnp.arange(cache.valid.shape[1])
        kv_valid_BxS = jax.lax.dynamic_update_slice(cache.valid, valid_BxT, (0, cache.index))
        query_slot_T = cache.index + jnp.arange(T)
        if blocked:
            mask_BxTxS = BlockedMask(query_slot_T, kv_valid_BxS, config.attention_block)
        else:
            mask_BxTxS = ((slots_S[None, None, :] <= query_slot_T[None, :, None])
                          & kv_valid_BxS[:, None, :])
        n_new_B = T if all_real else valid_BxT.sum(axis=1).astype(jnp.int32)
        next_pos_B = cache.next_pos + n_new_B
    elif blocked:
        segments = start = None
        if segment_ids_BxT is not None:
            segments = segment_ids_BxT.astype(jnp.int32)
            # a segment's tokens are contiguous and all real: its first slot is t - position
            start = jnp.where(valid_BxT, jnp.arange(T)[None, :] - positions_BxT, T)
        mask_BxTxS = BlockedMask(jnp.arange(T), valid_BxT, config.attention_block, segments, start)
    elif platform is not None:
        mask_BxTxS = platform_mask(platform, None if all_real else valid_BxT, segment_ids_BxT)
    else:
        causal_TxT = jnp.tril(jnp.ones((T, T), bool))
        mask_BxTxS = causal_TxT[None] & valid_BxT[:, None, :]
        if segment_ids_BxT is not None:
            mask_BxTxS = mask_BxTxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
    return StepInputs(
        positions_BxT=positions_BxT, mask_BxTxS=mask_BxTxS,
        inv_freq=rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
        lora_scale=lora.scale if lora is not None else 0.0,
        write_index=cache.index if cache is not None else 0,
        kv_valid_BxS=kv_valid_BxS, next_pos_B=next_pos_B)
