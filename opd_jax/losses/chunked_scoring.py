"""Chunked scoring: top-k ids and log-probs, log-probs of given ids, entropy, from hidden states.

What a model's scoring job keeps per token instead of its ``[B, T, V]`` logits: its top-k
(:class:`TeacherTopK`, :func:`chunked_teacher_topk`), the normalised log-probs of chosen ids
(:func:`chunked_logprobs_at_ids`, :func:`chunked_token_logprobs`) and the full-vocabulary
entropy (:func:`chunked_token_logprobs_and_entropy`), each computed one ``[C, V]`` chunk of
logits at a time (:mod:`opd_jax.losses.chunk_map`).  :func:`topk_logprobs` is the per-chunk
top-k + logsumexp shared with :func:`opd_jax.teacher.scoring.score`.

Shape letters follow :mod:`opd_jax` (``C`` = chunk of token rows).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from opd_jax.losses import checks
from opd_jax.losses import chunk_engine as engine
from opd_jax.losses.chunk_map import ChunkLoss, chunked_logits_map, inv_temperature, run_per_token
from opd_jax.losses.divergences import mask_tokens
from opd_jax.losses.support import top_k

__all__ = [
    "TeacherTopK",
    "chunked_logprobs_at_ids",
    "chunked_teacher_topk",
    "chunked_token_logprobs",
    "chunked_token_logprobs_and_entropy",
]  # plus the per-chunk helpers topk_logprobs and logprob_and_entropy


class TeacherTopK(NamedTuple):
    """A teacher's scores kept per token: its top-k ids and normalised log-probs.

    Attributes:
      ids: ``[B, T, K]`` int32 vocabulary ids, sorted by decreasing teacher probability.
      logprobs: ``[B, T, K]`` float32 ``log softmax(logits / temperature)`` at ``ids``
        (normalised over the full vocabulary, so ``sum(exp(logprobs)) <= 1``; the missing
        mass is the tail).
      logsumexp: ``[B, T]`` float32 ``logsumexp(logits / temperature)`` over the full
        vocabulary (lets a consumer recover the scaled logits ``logprobs + logsumexp``).

    A NamedTuple, hence a pytree: it passes through ``jit``, ``device_put`` and Orbax as is.
    """

    ids: jax.Array
    logprobs: jax.Array
    logsumexp: jax.Array


def topk_logprobs(
    z_CxV: jax.Array, k: int, valid_C: jax.Array, lse_C: jax.Array | None = None
) -> TeacherTopK:
    r"""One chunk's top-k ids, their log-probs and the logsumexp of scaled logits ``z = h W / tau``.

    :math:`\mathrm{ids} = \operatorname{top\text{-}k}(z)` (:func:`~opd_jax.losses.support.top_k`),
    :math:`\mathrm{logprobs} = z_{\mathrm{ids}} - \mathrm{lse}`, :math:`\mathrm{lse} =
    \log\sum_v e^{z_v}` (``lse_C`` when the caller has it already).  Rows where ``valid_C`` is
    False get ids ``0``, log-probs ``0`` and logsumexp ``0``.

    Returns:
      :class:`TeacherTopK` with ``ids [C, K]`` int32, ``logprobs [C, K]``, ``logsumexp [C]``.
    """
    if lse_C is None:
        lse_C = jax.nn.logsumexp(z_CxV, axis=-1)
    top_CxK, ids_CxK = top_k(z_CxV, k)
    keep = valid_C[:, None]
    return TeacherTopK(
        ids=jnp.where(keep, ids_CxK, 0).astype(jnp.int32),
        logprobs=jnp.where(keep, top_CxK - lse_C[:, None], 0.0),
        logsumexp=jnp.where(valid_C, lse_C, 0.0),
    )


def chunked_teacher_topk(
    hidden: jax.Array,
    unembed: jax.Array,
    *,
    k: int,
    chunk_size: int = 512,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> TeacherTopK:
    r"""Top-k ids and log-probs of a model's next-token distribution, chunk by chunk.

    The teacher's scoring job (and the student's, for its own top-k ids): for each token

    .. math::
        z_t = h_t W / \tau,\quad \mathrm{lse}_t = \log\sum_v e^{z_{t,v}},\quad
        \mathrm{ids}_t = \operatorname{top\text{-}k}(z_t),\quad
        \mathrm{logprobs}_t = z_{t,\mathrm{ids}_t} - \mathrm{lse}_t .

    No gradient flows (the inputs get ``stop_gradient``); no ``[B, T, V]`` buffer is built.

    Args:
      hidden: ``[B, T, D]`` hidden states.
      unembed: ``[D, V]`` unembedding.
      k: ``K``, number of ids kept per token (``1 <= K <= V``).
      chunk_size: token rows per chunk ``C``.
      temperature: softmax temperature :math:`\tau`.
      where: optional ``[B, T]`` mask; masked positions get ids ``0``, log-probs ``0`` and
        logsumexp ``0`` (consumers must pass the same mask).

    Returns:
      :class:`TeacherTopK` with ``ids [B, T, K]`` int32 (most probable first),
      ``logprobs [B, T, K]`` float32 and ``logsumexp [B, T]`` float32.
    """
    checks.check_head(hidden, unembed, "model")
    checks.check_top_k(k, unembed.shape[1])
    batch, time = hidden.shape[:2]
    valid_BxT = checks.valid_mask(where, batch, time)
    inv_temp = 1.0 / temperature

    def per_chunk(logits_CxV, valid_C):
        return topk_logprobs(logits_CxV * inv_temp, k, valid_C)

    return chunked_logits_map(
        per_chunk,
        (lax.stop_gradient(hidden),),
        (lax.stop_gradient(unembed),),
        valid_BxT,
        chunk_size=chunk_size,
        remat=False,
    )


def _identity_logp(logp_CxK, extras, consts):
    del extras, consts
    return logp_CxK


def chunked_logprobs_at_ids(
    hidden: jax.Array,
    unembed: jax.Array,
    ids: jax.Array,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> jax.Array:
    r"""Normalised log-probs of chosen ids, chunk by chunk: :math:`\log\mathrm{softmax}(h_t W/\tau)_{i}`.

    The building block of top-k objectives when the two models run in separate jobs.  The
    thunlp OPD update, with the teacher scoring the *student's* top-k ids, is three
    memory-bounded passes plus ``[B, T, K]`` arithmetic::

        s_ids = chunked_teacher_topk(s_hidden, s_unembed, k=16).ids          # no grad
        t_logp = chunked_logprobs_at_ids(t_hidden, t_unembed, s_ids)         # teacher job
        s_logp = chunked_logprobs_at_ids(s_hidden, s_unembed, s_ids)         # differentiable
        valid = jnp.broadcast_to(where[..., None], s_ids.shape)
        adv = topk.support_advantages(s_logp, t_logp, valid, weights="student_p")
        loss_BxT = topk.support_policy_gradient_loss(s_logp, adv, valid)

    (equal to :func:`opd_jax.losses.topk.topk_policy_gradient_loss` with
    ``support="student"``; :func:`chunked_topk_policy_gradient_loss` does it in one pass when
    both models' hidden states are at hand).  Differentiable w.r.t. ``hidden`` and
    ``unembed`` (chunks are recomputed in the backward pass).

    Args:
      hidden: ``[B, T, D]`` hidden states.
      unembed: ``[D, V]`` unembedding.
      ids: ``[B, T]`` or ``[B, T, K]`` integer vocabulary ids.
      chunk_size: token rows per chunk ``C``.
      temperature: softmax temperature :math:`\tau`.

    Returns:
      float32 log-probs with the shape of ``ids``.
    """
    checks.check_head(hidden, unembed, "model")
    checks.positive_int("chunk_size", chunk_size)
    batch, time = hidden.shape[:2]
    if ids.shape[:2] != (batch, time) or ids.ndim not in (2, 3):
        raise ValueError(f"ids must be [B, T] or [B, T, K] with [B, T] = {(batch, time)}")
    squeeze = ids.ndim == 2
    ids_BxTxK = (ids[..., None] if squeeze else ids).astype(jnp.int32)
    loss = ChunkLoss(
        engine.SPARSE_HEAD, _identity_logp,
        head_extras=(ids_BxTxK, jnp.ones((batch, time), bool)), loss_extras=None,
        head_consts=inv_temperature(temperature),
    )
    out = run_per_token(loss, hidden, unembed, chunk_size)
    return out[..., 0] if squeeze else out


def _masked_token_logp(logp_Cx1, valid_C, consts):
    del consts
    return mask_tokens(logp_Cx1[:, 0], valid_C)


def chunked_token_logprobs(
    hidden: jax.Array,
    unembed: jax.Array,
    tokens: jax.Array,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Per-token log-probs of the given tokens, chunk by chunk.

    .. math:: \log p_t = \log\mathrm{softmax}(h_t W / \tau)_{x_t}

    The same value as :func:`opd_jax.losses.estimators.token_logprobs` on the dense logits,
    computed from each chunk's logsumexp and the gathered logit (no ``[C, V]`` log-prob
    array).  Differentiable w.r.t. ``hidden`` and ``unembed``.

    Args:
      hidden: ``[B, T, D]`` hidden states (position ``t`` predicts ``tokens[:, t]``).
      unembed: ``[D, V]`` unembedding.
      tokens: ``[B, T]`` integer token ids.
      chunk_size: token rows per chunk ``C``.
      temperature: softmax temperature :math:`\tau`.
      where: optional ``[B, T]`` bool mask; masked positions (e.g. padding ids like -100)
        give exactly ``0``.

    Returns:
      ``[B, T]`` float32 log-probs.
    """
    checks.check_head(hidden, unembed, "model")
    checks.positive_int("chunk_size", chunk_size)
    batch, time = hidden.shape[:2]
    if tokens.shape != (batch, time):
        raise ValueError(f"tokens must be [B, T] = {(batch, time)}, got {tokens.shape}")
    valid_BxT = checks.valid_mask(where, batch, time)
    ids_BxTx1 = jnp.where(valid_BxT, tokens, 0).astype(jnp.int32)[..., None]
    loss = ChunkLoss(
        engine.SPARSE_HEAD, _masked_token_logp,
        head_extras=(ids_BxTx1, valid_BxT), loss_extras=valid_BxT,
        head_consts=inv_temperature(temperature),
    )
    return run_per_token(loss, hidden, unembed, chunk_size)


def logprob_and_entropy(
    logits_CxV: jax.Array, tokens_C: jax.Array, inv_temp
) -> tuple[jax.Array, jax.Array]:
    """Per-row ``log softmax(z)[token]`` and entropy of ``softmax(z)``, ``z = logits * inv_temp``.

    ``-inf`` logits contribute ``0`` to the entropy (finite values and gradients).
    """
    logp_CxV = jax.nn.log_softmax(logits_CxV * inv_temp, axis=-1)
    token_logp_C = jnp.take_along_axis(logp_CxV, tokens_C[:, None], axis=-1)[:, 0]
    p_CxV = jnp.exp(logp_CxV)
    entropy_C = -jnp.sum(p_CxV * jnp.where(p_CxV > 0, logp_CxV, 0.0), axis=-1)
    return token_logp_C, entropy_C


def chunked_token_logprobs_and_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    tokens: jax.Array,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    r"""Per-token log-probs of ``tokens`` and full-vocabulary entropy, chunk by chunk.

    .. math::
        \log p_t = \log\mathrm{softmax}(z_t)_{x_t},\qquad
        H_t = -\sum_v p_{t,v}\log p_{t,v},\qquad z_t = h_t W/\tau

    (entropy of ``-inf`` logits counts as ``0``).  Both outputs are differentiable w.r.t.
    ``hidden`` and ``unembed`` (an entropy bonus can be trained through it).

    Args:
      hidden: ``[B, T, D]`` hidden states.
      unembed: ``[D, V]`` unembedding.
      tokens: ``[B, T]`` integer token ids.
      chunk_size: token rows per chunk ``C``.
      temperature: softmax temperature :math:`\tau`.

    Returns:
      ``(logprobs [B, T], entropy [B, T])``, both float32.
    """
    checks.check_head(hidden, unembed, "model")
    checks.positive_int("chunk_size", chunk_size)
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"tokens must be [B, T] = {hidden.shape[:2]}, got {tokens.shape}")
    loss = ChunkLoss(
        engine.DENSE_HEAD, logprob_and_entropy, None, tokens.astype(jnp.int32),
        loss_consts=inv_temperature(temperature),
    )
    return run_per_token(loss, hidden, unembed, chunk_size)
