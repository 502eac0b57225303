"""Scoring given sequences: per-token log-probs, top-k and logsumexp, chunked over tokens.

The teacher's job in OPD (and the student's re-scoring): run the decoder over whole sequences
``[prompt; completion]`` and keep, per position, what the losses need -- never the ``[B, T, V]``
logits. The forward pass is the sampler's prefill (:func:`hidden_states`, same left-padding,
``valid`` and RoPE-position construction), and the unembedding runs chunk by chunk through
:func:`opd_jax.losses.chunk_map.chunked_logits_map` (top-k and logsumexp per chunk by
:func:`opd_jax.losses.chunked_scoring.topk_logprobs`, as in the losses' own scoring).

**Shift.** Everything is aligned with the *predicting* position: the logits at position ``t``
score token ``t + 1``. So ``logprobs[:, t] = log p(tokens[:, t+1] | tokens[:, :t+1])``,
``topk`` at ``t`` is the distribution of the token *after* ``t``, and ``mask[:, t] =
valid[:, t] & valid[:, t+1]``; the last column has no next token (mask ``False``, values 0).
To line the log-probs up with the tokens they score, use ``logprobs[:, :-1]`` against
``tokens[:, 1:]``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.losses import checks
from opd_jax.losses.chunk_map import chunked_logits_map
from opd_jax.losses.chunked_scoring import topk_logprobs
from opd_jax.model.config import ModelConfig
from opd_jax.model.decoder import Lora, Params, hidden_states, loss_unembedding
from opd_jax.teacher.scores import TeacherScores

__all__ = ["ScoreOutput", "score", "score_completions"]


class ScoreOutput(NamedTuple):
    """Per-position scores; position ``t`` scores token ``t + 1`` (see the module docstring).

    Attributes:
      logprobs: ``[B, T]`` float32 ``log softmax(logits_t / temperature)[tokens_{t+1}]``; 0 where
        ``mask`` is False.
      mask: ``[B, T]`` bool, ``valid[t] & valid[t+1]`` (last column False).
      topk_ids: ``[B, T, K]`` int32 most probable next tokens (``None`` unless ``k``); defined
        at every real position ``valid[t]`` (the last one included), 0 at padding.
      topk_logprobs: ``[B, T, K]`` float32 their log-probs (full-vocabulary normalised).
      logsumexp: ``[B, T]`` float32 ``logsumexp(logits_t / temperature)`` (``None`` unless ``k``).
    """

    logprobs: jax.Array
    mask: jax.Array
    topk_ids: jax.Array | None = None
    topk_logprobs: jax.Array | None = None
    logsumexp: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("config", "k", "chunk_size", "temperature"))
def score(params: Params, config: ModelConfig, tokens_BxT: jax.Array, *, valid_BxT: jax.Array,
          k: int | None = None, chunk_size: int = 256, temperature: float = 1.0,
          lora: Lora | None = None) -> ScoreOutput:
    """Score given sequences, chunked over tokens (no ``[B, T, V]`` buffer).

    Args:
      params, config: the model (``config`` static).
      tokens_BxT: int token ids, left- or right-padded.
      valid_BxT: bool, False at padding.
      k: also return each position's top-``k`` ids / log-probs and logsumexp (the teacher's job).
      chunk_size: token rows per unembedding chunk.
      temperature: softmax temperature of every returned quantity.
      lora: optional adapters.

    Returns:
      :class:`ScoreOutput`; ``logprobs[:, t]`` scores ``tokens[:, t+1]``.
    """
    checks.check_positive("temperature", temperature)
    if k is not None:
        checks.check_top_k(k, config.vocab_size)
    valid_BxT = valid_BxT.astype(bool)
    hidden_BxTxD, _ = hidden_states(params, config, tokens_BxT, valid_BxT, lora=lora)
    next_BxT = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros_like(tokens_BxT[:, :1])], axis=1)
    mask_BxT = valid_BxT & jnp.concatenate([valid_BxT[:, 1:], jnp.zeros_like(valid_BxT[:, :1])],
                                           axis=1)
    inv_temp = 1.0 / temperature

    def per_chunk(logits_CxV, extras):
        next_C, mask_C, valid_C = extras
        z_CxV = logits_CxV * inv_temp
        lse_C = jax.nn.logsumexp(z_CxV, axis=-1)
        lp_C = jnp.take_along_axis(z_CxV, next_C[:, None], axis=-1)[:, 0] - lse_C
        out = {"logprobs": jnp.where(mask_C, lp_C, 0.0)}
        if k is not None:
            out["topk"] = topk_logprobs(z_CxV, k, valid_C, lse_C)
        return out

    out = chunked_logits_map(per_chunk, (hidden_BxTxD,), (loss_unembedding(params, config),),
                             (next_BxT.astype(jnp.int32), mask_BxT, valid_BxT), chunk_size=chunk_size)
    if k is None:
        return ScoreOutput(out["logprobs"], mask_BxT)
    top = out["topk"]
    return ScoreOutput(out["logprobs"], mask_BxT, top.ids, top.logprobs, top.logsumexp)


@functools.partial(jax.jit, static_argnames=("config", "n", "k", "chunk_size", "temperature"))
def score_completions(params: Params, config: ModelConfig, tokens_BxT: jax.Array,
                      valid_BxT: jax.Array, query_ids_BxNxQ: jax.Array, *, n: int, k: int,
                      chunk_size: int = 256, temperature: float = 1.0,
                      lora: Lora | None = None) -> TeacherScores:
    """A teacher's :class:`~opd_jax.teacher.scores.TeacherScores` of the last ``n`` tokens of
    each row (the completion of ``[prompt (left-padded) | completion (right-padded)]`` rows, the
    layout of ``RolloutBatch.teacher_tokens``), chunked over tokens.

    Position ``j`` of the output is row position ``T - n - 1 + j`` (the one predicting completion
    token ``j``), the same hidden states the in-process train step slices, so served / cached
    scores equal in-process ones to float32 rounding. Per position: the top-``k`` ids and
    log-probs, the logsumexp, and the log-probs at ``query_ids`` (``[B, N, Q]``). Positions whose
    completion token is padding (``valid`` False) hold zeros.
    """
    checks.check_positive("temperature", temperature)
    checks.check_top_k(k, config.vocab_size)
    valid_BxT = valid_BxT.astype(bool)
    T = tokens_BxT.shape[1]
    if not 0 < n < T:
        raise ValueError(f"n={n} completion tokens do not fit rows of {T} tokens with a prompt")
    hidden_BxTxD, _ = hidden_states(params, config, tokens_BxT, valid_BxT, lora=lora)
    hidden_BxNxD = jax.lax.slice_in_dim(hidden_BxTxD, T - n - 1, T - 1, axis=1)
    mask_BxN = valid_BxT[:, T - n:]
    inv_temp = 1.0 / temperature

    def per_chunk(logits_CxV, extras):
        q_CxQ, mask_C = extras
        z_CxV = logits_CxV * inv_temp
        lse_C = jax.nn.logsumexp(z_CxV, axis=-1)
        top = topk_logprobs(z_CxV, k, mask_C, lse_C)
        q_lp = jnp.take_along_axis(z_CxV, q_CxQ, axis=-1) - lse_C[:, None]
        return top, jnp.where(mask_C[:, None], q_lp, 0.0)

    q_BxNxQ = jnp.where(mask_BxN[..., None], query_ids_BxNxQ, 0).astype(jnp.int32)
    top, q_lp = chunked_logits_map(per_chunk, (hidden_BxNxD,), (loss_unembedding(params, config),),
                                   (q_BxNxQ, mask_BxN), chunk_size=chunk_size, remat=False)
    return TeacherScores(top.ids, top.logprobs, top.logsumexp, q_BxNxQ, q_lp)
