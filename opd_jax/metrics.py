r"""Mechanism metrics of on-policy distillation (arXiv 2604.13016), cheap enough for every step.

"Rethinking On-Policy Distillation of LLMs" explains when OPD works by a handful of per-token
quantities.  With :math:`S_t, T_t` the student's and teacher's next-token distributions at
position :math:`t` and :math:`\mathcal{K}^S_t, \mathcal{K}^T_t` their top-k id sets:

* **overlap ratio** :math:`|\mathcal{K}^S_t \cap \mathcal{K}^T_t| / k`;
* **shared mass** of each model on the shared set,
  :math:`\sum_{i\in\mathcal{K}^S_t\cap\mathcal{K}^T_t} S_t(i)` and the same for :math:`T_t`
  (97-99 % when OPD works);
* **entropies** :math:`H(S_t)` and :math:`H(T_t)` over the full vocabulary;
* **teacher log-prob of the sampled token** :math:`\log T_t(x_t)`;
* **sampler-vs-learner gap** :math:`\log \pi_\text{sampler}(x_t) - \log S_t(x_t)` (the
  off-policyness introduced by a separate or stale sampler).

Design: per-token functions return ``[B, T]`` arrays (pure, jit-able, exactly ``0`` where
masked); :func:`summarize` reduces a dict of them to scalars (masked means) and
:func:`per_position` to a ``[T]`` curve for plots.  :func:`mechanism_metrics` computes them all
chunk by chunk from hidden states and unembeddings (no ``[B, T, V]`` logits);
:func:`mechanism_metrics_from_logits` does the same from logits for small inputs.  Nothing here
is differentiated: every input gets ``stop_gradient``.

Shape letters follow :mod:`opd_jax`.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "topk_overlap",
    "shared_mass",
    "entropy",
    "logprob_gap",
    "mechanism_metrics_from_logits",
    "mechanism_metrics",
    "mechanism_metrics_from_teacher_topk",
    "summarize",
    "per_position",
]


def _mask(x: jax.Array, where: jax.Array | None) -> jax.Array:
    return x if where is None else jnp.where(where, x, 0.0)


def topk_overlap(
    student_ids: jax.Array, teacher_ids: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
    r"""Overlap ratio of two top-k id sets, per token.

    .. math:: o_t = |\mathcal{K}^S_t \cap \mathcal{K}^T_t| / k

    Args:
      student_ids: ``[..., K]`` integer ids (distinct within a row).
      teacher_ids: ``[..., K]`` integer ids (distinct within a row), same ``K``.
      where: optional ``[...]`` bool mask; masked positions give ``0``.

    Returns:
      ``[...]`` float32 in ``[0, 1]``.

    >>> import jax.numpy as jnp
    >>> float(topk_overlap(jnp.array([1, 2, 3, 4]), jnp.array([4, 9, 1, 7])))
    0.5
    """
    if student_ids.shape != teacher_ids.shape:
        raise ValueError(
            f"student_ids {student_ids.shape} and teacher_ids {teacher_ids.shape} must match"
        )
    k = student_ids.shape[-1]
    in_teacher_xK = _member(student_ids, teacher_ids)
    return _mask(jnp.sum(in_teacher_xK, axis=-1, dtype=jnp.float32) / k, where)


def _member(ids: jax.Array, other_ids: jax.Array) -> jax.Array:
    """``[..., K]`` bool: is ``ids[..., i]`` among ``other_ids[..., :]`` (a ``K x K`` compare)."""
    return jnp.any(ids[..., :, None] == other_ids[..., None, :], axis=-1)


def shared_mass(
    logprobs: jax.Array,
    ids: jax.Array,
    other_ids: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""A model's probability mass on the ids it shares with another model's top-k, per token.

    With ``ids`` the model's own top-k set :math:`\mathcal{K}_t` and ``logprobs`` its
    (full-vocabulary normalised) log-probs there,

    .. math:: m_t = \sum_{i\in\mathcal{K}_t\cap\mathcal{K}'_t} p_t(i).

    The shared set is a subset of the model's own top-k, so its own top-k log-probs suffice.

    Args:
      logprobs: ``[..., K]`` log-probs at ``ids``.
      ids: ``[..., K]`` the model's top-k ids.
      other_ids: ``[..., K']`` the other model's top-k ids.
      where: optional ``[...]`` bool mask; masked positions give ``0``.

    Returns:
      ``[...]`` float32 in ``[0, 1]``.
    """
    if logprobs.shape != ids.shape:
        raise ValueError(f"logprobs {logprobs.shape} and ids {ids.shape} must match")
    shared_xK = _member(ids, other_ids)
    probs_xK = jnp.exp(logprobs.astype(jnp.float32))
    return _mask(jnp.sum(jnp.where(shared_xK, probs_xK, 0.0), axis=-1), where)


def entropy(
    logits: jax.Array, *, temperature: float = 1.0, where: jax.Array | None = None
) -> jax.Array:
    r"""Full-vocabulary entropy :math:`H_t = -\sum_v p_{t,v}\log p_{t,v}`, :math:`p = \mathrm{softmax}(z/\tau)`.

    ``-inf`` logits (masked vocabulary entries) contribute ``0``.

    Args:
      logits: ``[..., V]`` logits.
      temperature: softmax temperature :math:`\tau`.
      where: optional ``[...]`` bool mask; masked positions give ``0``.

    Returns:
      ``[...]`` float32 entropy in nats.

    >>> import jax.numpy as jnp
    >>> round(float(entropy(jnp.zeros(4))), 6) == round(float(jnp.log(4.0)), 6)
    True
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(logp)
    return _mask(-jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1), where)


def logprob_gap(
    sampler_logprobs: jax.Array,
    learner_logprobs: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""Sampler-vs-learner log-prob gap of the sampled tokens, per token (signed).

    .. math:: g_t = \log\pi_\text{sampler}(x_t) - \log\pi_\text{learner}(x_t)

    ``summarize`` of it is the mean difference; of ``jnp.abs`` of it the mean absolute gap.

    Args:
      sampler_logprobs: ``[B, T]`` log-probs recorded by the sampler.
      learner_logprobs: ``[B, T]`` log-probs recomputed by the learner.
      where: optional ``[B, T]`` bool mask; masked positions give ``0``.

    Returns:
      ``[B, T]`` float32.
    """
    if sampler_logprobs.shape != learner_logprobs.shape:
        raise ValueError(
            f"sampler_logprobs {sampler_logprobs.shape} and learner_logprobs "
            f"{learner_logprobs.shape} must match"
        )
    gap = sampler_logprobs.astype(jnp.float32) - learner_logprobs.astype(jnp.float32)
    return _mask(gap, where)


# --------------------------------------------------------------------------------------------
# all metrics at once
# --------------------------------------------------------------------------------------------


def _metrics_from_logits(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    sampler_logprobs: jax.Array | None,
    where: jax.Array,
    *,
    k: int,
    temperature: float,
) -> dict[str, jax.Array]:
    """Per-token metrics for logits ``[..., V]``; shared by the dense and the chunked entry."""
    inv_temp = 1.0 / temperature
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) * inv_temp, axis=-1)
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) * inv_temp, axis=-1)
    s_top, s_ids = lax.top_k(s_logp, k)
    t_top, t_ids = lax.top_k(t_logp, k)
    s_p, t_p = jnp.exp(s_logp), jnp.exp(t_logp)
    tok = tokens[..., None].astype(jnp.int32)
    s_tok = jnp.take_along_axis(s_logp, tok, axis=-1)[..., 0]
    t_tok = jnp.take_along_axis(t_logp, tok, axis=-1)[..., 0]
    out = {
        "overlap": topk_overlap(s_ids, t_ids, where=where),
        "student_shared_mass": shared_mass(s_top, s_ids, t_ids, where=where),
        "teacher_shared_mass": shared_mass(t_top, t_ids, s_ids, where=where),
        "student_topk_mass": _mask(jnp.sum(jnp.exp(s_top), axis=-1), where),
        "teacher_topk_mass": _mask(jnp.sum(jnp.exp(t_top), axis=-1), where),
        "student_entropy": _mask(-jnp.sum(s_p * jnp.where(s_p > 0, s_logp, 0.0), -1), where),
        "teacher_entropy": _mask(-jnp.sum(t_p * jnp.where(t_p > 0, t_logp, 0.0), -1), where),
        "student_token_logprob": _mask(s_tok, where),
        "teacher_token_logprob": _mask(t_tok, where),
        "token_reverse_kl": _mask(s_tok - t_tok, where),
    }
    if sampler_logprobs is not None:
        gap = logprob_gap(sampler_logprobs, s_tok, where=where)
        out["logprob_gap"] = gap
        out["abs_logprob_gap"] = jnp.abs(gap)
    return out


def _check_metric_inputs(tokens, where, sampler_logprobs, token_shape):
    if tokens.shape != token_shape:
        raise ValueError(f"tokens must have shape {token_shape}, got {tokens.shape}")
    if where is not None and where.shape != token_shape:
        raise ValueError(f"where must have shape {token_shape}, got {where.shape}")
    if sampler_logprobs is not None and sampler_logprobs.shape != token_shape:
        raise ValueError(
            f"sampler_logprobs must have shape {token_shape}, got {sampler_logprobs.shape}"
        )


def mechanism_metrics_from_logits(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    *,
    k: int = 16,
    where: jax.Array | None = None,
    temperature: float = 1.0,
    sampler_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""All per-token mechanism metrics from dense logits (small inputs, tests, notebooks).

    Args:
      student_logits: ``[B, T, V]`` student logits at the rollout positions.
      teacher_logits: ``[B, T, V]`` teacher logits at the same positions.
      tokens: ``[B, T]`` sampled token ids (``tokens[:, t]`` is what position ``t`` predicted).
      k: ``K``, size of the top-k sets.
      where: ``[B, T]`` bool mask of valid (completion) tokens; ``None`` = all.
      temperature: softmax temperature for both models.
      sampler_logprobs: optional ``[B, T]`` log-probs recorded by the sampler.

    Returns:
      dict of ``[B, T]`` float32 arrays, ``0`` where masked:
      ``overlap``, ``student_shared_mass``, ``teacher_shared_mass`` (mass on
      :math:`\mathcal{K}^S\cap\mathcal{K}^T`), ``student_topk_mass``, ``teacher_topk_mass``
      (mass on the own top-k), ``student_entropy``, ``teacher_entropy``,
      ``student_token_logprob``, ``teacher_token_logprob``, ``token_reverse_kl``
      (:math:`\log S(x_t) - \log T(x_t)`, the OPD per-token reward with a minus sign), and
      with ``sampler_logprobs`` also ``logprob_gap`` (sampler minus learner) and
      ``abs_logprob_gap``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits "
            f"{teacher_logits.shape} must match"
        )
    _check_metric_inputs(tokens, where, sampler_logprobs, student_logits.shape[:-1])
    valid = jnp.ones(tokens.shape, bool) if where is None else where.astype(bool)
    sg = lax.stop_gradient
    return _metrics_from_logits(
        sg(student_logits),
        sg(teacher_logits),
        tokens,
        None if sampler_logprobs is None else sg(sampler_logprobs),
        valid,
        k=k,
        temperature=temperature,
    )


def mechanism_metrics(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array,
    teacher_unembed: jax.Array,
    tokens: jax.Array,
    *,
    k: int = 16,
    where: jax.Array | None = None,
    chunk_size: int = 512,
    temperature: float = 1.0,
    sampler_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""All per-token mechanism metrics, chunk by chunk over tokens (no ``[B, T, V]`` logits).

    Same outputs as :func:`mechanism_metrics_from_logits` with
    ``student_logits = student_hidden @ student_unembed`` (and the teacher's likewise), computed
    one ``[C, V]`` chunk at a time.

    Args:
      student_hidden: ``[B, T, D]``; student_unembed: ``[D, V]``.
      teacher_hidden: ``[B, T, D']``; teacher_unembed: ``[D', V]``.
      tokens: ``[B, T]`` sampled token ids.
      k: ``K``, size of the top-k sets.
      where: ``[B, T]`` bool mask of valid tokens; ``None`` = all.
      chunk_size: token rows per chunk ``C``.
      temperature: softmax temperature for both models.
      sampler_logprobs: optional ``[B, T]`` sampler log-probs (adds the gap metrics).

    Returns:
      dict of ``[B, T]`` float32 arrays (see :func:`mechanism_metrics_from_logits`).
    """
    from opd_jax.losses.chunked import chunked_logits_map

    token_shape = student_hidden.shape[:2]
    _check_metric_inputs(tokens, where, sampler_logprobs, token_shape)
    valid = jnp.ones(token_shape, bool) if where is None else where.astype(bool)
    sg = lax.stop_gradient
    extras = (tokens.astype(jnp.int32), valid, None if sampler_logprobs is None else sg(sampler_logprobs))

    def per_chunk(s_logits_CxV, t_logits_CxV, ex):
        tok_C, valid_C, sampler_C = ex
        return _metrics_from_logits(
            s_logits_CxV, t_logits_CxV, tok_C, sampler_C, valid_C, k=k, temperature=temperature
        )

    return chunked_logits_map(
        per_chunk,
        (sg(student_hidden), sg(teacher_hidden)),
        (sg(student_unembed), sg(teacher_unembed)),
        extras,
        chunk_size=chunk_size,
        remat=False,
    )


def mechanism_metrics_from_teacher_topk(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_topk,
    tokens: jax.Array,
    *,
    where: jax.Array | None = None,
    chunk_size: int = 512,
    temperature: float = 1.0,
    sampler_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""Mechanism metrics when the teacher is only known by its precomputed top-k.

    With :class:`~opd_jax.losses.chunked.TeacherTopK` (``ids``/``logprobs`` ``[B, T, K]``,
    e.g. from the teacher's scoring job) the student side is computed chunk by chunk from
    hidden states (no ``[B, T, V]`` logits) with ``k = K``.  The teacher's entropy and its
    log-prob of tokens outside its top-k are unknown, so this returns the subset
    ``overlap``, ``student_shared_mass``, ``teacher_shared_mass``, ``student_topk_mass``,
    ``teacher_topk_mass``, ``student_entropy``, ``student_token_logprob`` (and the gap metrics
    with ``sampler_logprobs``), plus ``token_in_teacher_topk`` (1 where the sampled token is
    among the teacher's top-k).

    Args:
      student_hidden: ``[B, T, D]``; student_unembed: ``[D, V]``.
      teacher_topk: ``TeacherTopK`` at the same positions and ``temperature``.
      tokens: ``[B, T]`` sampled token ids.
      where: ``[B, T]`` bool mask; ``None`` = all.
      chunk_size: token rows per chunk ``C``.
      temperature: softmax temperature of the student (the teacher's was fixed when scoring).
      sampler_logprobs: optional ``[B, T]`` sampler log-probs.

    Returns:
      dict of ``[B, T]`` float32 arrays, ``0`` where masked.
    """
    from opd_jax.losses.chunked import chunked_logits_map

    token_shape = student_hidden.shape[:2]
    _check_metric_inputs(tokens, where, sampler_logprobs, token_shape)
    if teacher_topk.ids.shape[:2] != token_shape or teacher_topk.ids.ndim != 3:
        raise ValueError(
            f"teacher_topk.ids has shape {teacher_topk.ids.shape}; it must be [B, T, K] with "
            f"[B, T] = {token_shape}"
        )
    k = teacher_topk.ids.shape[-1]
    valid = jnp.ones(token_shape, bool) if where is None else where.astype(bool)
    sg = lax.stop_gradient
    extras = (
        tokens.astype(jnp.int32),
        valid,
        None if sampler_logprobs is None else sg(sampler_logprobs),
        teacher_topk.ids.astype(jnp.int32),
        sg(teacher_topk.logprobs.astype(jnp.float32)),
    )
    inv_temp = 1.0 / temperature

    def per_chunk(s_logits_CxV, ex):
        tok_C, valid_C, sampler_C, t_ids, t_top = ex
        s_logp = jax.nn.log_softmax(s_logits_CxV.astype(jnp.float32) * inv_temp, axis=-1)
        s_top, s_ids = lax.top_k(s_logp, k)
        s_p = jnp.exp(s_logp)
        s_tok = jnp.take_along_axis(s_logp, tok_C[:, None], axis=-1)[:, 0]
        out = {
            "overlap": topk_overlap(s_ids, t_ids, where=valid_C),
            "student_shared_mass": shared_mass(s_top, s_ids, t_ids, where=valid_C),
            "teacher_shared_mass": shared_mass(t_top, t_ids, s_ids, where=valid_C),
            "student_topk_mass": _mask(jnp.sum(jnp.exp(s_top), axis=-1), valid_C),
            "teacher_topk_mass": _mask(jnp.sum(jnp.exp(t_top), axis=-1), valid_C),
            "student_entropy": _mask(
                -jnp.sum(s_p * jnp.where(s_p > 0, s_logp, 0.0), -1), valid_C
            ),
            "student_token_logprob": _mask(s_tok, valid_C),
            "token_in_teacher_topk": _mask(
                jnp.any(t_ids == tok_C[:, None], axis=-1).astype(jnp.float32), valid_C
            ),
        }
        if sampler_C is not None:
            gap = logprob_gap(sampler_C, s_tok, where=valid_C)
            out["logprob_gap"] = gap
            out["abs_logprob_gap"] = jnp.abs(gap)
        return out

    return chunked_logits_map(
        per_chunk, (sg(student_hidden),), (sg(student_unembed),), extras,
        chunk_size=chunk_size, remat=False,
    )


# --------------------------------------------------------------------------------------------
# reductions for logging
# --------------------------------------------------------------------------------------------


def summarize(
    per_token: Mapping[str, jax.Array], where: jax.Array | None = None
) -> dict[str, jax.Array]:
    r"""Masked mean of every per-token metric: :math:`\sum_t w_t x_t / \max(1, \sum_t w_t)`.

    Args:
      per_token: dict of ``[B, T]`` arrays (e.g. from :func:`mechanism_metrics`).
      where: ``[B, T]`` bool mask of valid tokens; ``None`` = all.

    Returns:
      dict of float32 scalars with the same keys (``0`` when no token is valid).

    >>> import jax.numpy as jnp
    >>> out = summarize({"x": jnp.array([[1.0, 3.0, 9.0]])}, jnp.array([[True, True, False]]))
    >>> float(out["x"])
    2.0
    """
    out = {}
    for name, x in per_token.items():
        x = x.astype(jnp.float32)
        w = jnp.ones(x.shape, jnp.float32) if where is None else where.astype(jnp.float32)
        out[name] = jnp.sum(jnp.where(w > 0, x, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
    return out


def per_position(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    r"""Per-position curve: the masked mean over the batch at every position index.

    .. math:: c_t = \sum_b w_{b,t} x_{b,t} / \sum_b w_{b,t}

    Args:
      x: ``[B, T]`` per-token metric.
      where: ``[B, T]`` bool mask; ``None`` = all.

    Returns:
      ``[T]`` float32; ``NaN`` at positions with no valid token (plotting libraries skip it).

    >>> import jax.numpy as jnp
    >>> per_position(jnp.array([[1.0, 2.0], [3.0, 5.0]]), jnp.array([[True, False], [True, False]]))
    Array([ 2., nan], dtype=float32)
    """
    x = x.astype(jnp.float32)
    w = jnp.ones(x.shape, jnp.float32) if where is None else where.astype(jnp.float32)
    total = jnp.sum(jnp.where(w > 0, x, 0.0), axis=0)
    count = jnp.sum(w, axis=0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)
