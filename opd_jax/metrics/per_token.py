r"""Per-token mechanism metrics of on-policy distillation and their reductions for logging.

Each function returns a ``[B, T]`` (or ``[...]``) float32 array, exactly ``0`` where masked;
:func:`summarize` reduces a dict of them to scalars (masked means) and :func:`per_position` to
a ``[T]`` curve for plots.  See :mod:`opd_jax.metrics` for the quantities and the paper.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from opd_jax.losses.divergences import mask_tokens
from opd_jax.losses.support import member

__all__ = ["entropy", "logprob_gap", "per_position", "shared_mass", "summarize", "topk_overlap"]


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
    in_teacher_xK = member(student_ids, teacher_ids)
    return mask_tokens(jnp.sum(in_teacher_xK, axis=-1, dtype=jnp.float32) / k, where)



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
    shared_xK = member(ids, other_ids)
    probs_xK = jnp.exp(logprobs.astype(jnp.float32))
    return mask_tokens(jnp.sum(jnp.where(shared_xK, probs_xK, 0.0), axis=-1), where)


def entropy(
    logits: jax.Array, *, temperature: float = 1.0, where: jax.Array | None = None
) -> jax.Array:
    r"""Full-vocabulary entropy :math:`H_t = -\sum_v p_{t,v}\log p_{t,v}`,
    :math:`p = \mathrm{softmax}(z/\tau)`.

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
    return mask_tokens(-jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1), where)


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
    return mask_tokens(gap, where)


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
