r"""All mechanism metrics at once: from dense logits, or chunk by chunk from hidden states.

:func:`mechanism_metrics` computes every per-token metric of :mod:`opd_jax.metrics` one
``[C, V]`` chunk of logits at a time (no ``[B, T, V]`` logits, through
:func:`opd_jax.losses.chunk_map.chunked_logits_map`); :func:`mechanism_metrics_from_logits`
does the same from logits for small inputs, and :func:`mechanism_metrics_from_teacher_topk`
the subset available when the teacher is only known by its precomputed top-k.  Nothing here is
differentiated: every input gets ``stop_gradient``.

Shape letters follow :mod:`opd_jax`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from opd_jax.losses.chunk_map import chunked_logits_map
from opd_jax.losses.chunked_scoring import TeacherTopK
from opd_jax.losses.divergences import mask_tokens
from opd_jax.losses.elementwise import vocab_sum
from opd_jax.losses.support import top_k
from opd_jax.metrics.per_token import logprob_gap, shared_mass, topk_overlap

__all__ = [
    "intersection_means",
    "mechanism_metrics",
    "mechanism_metrics_from_logits",
    "mechanism_metrics_from_logprobs",
    "mechanism_metrics_from_teacher_topk",
]


class _Side(NamedTuple):
    """One model's per-token quantities at temperature ``1 / inv_temp``."""

    top_xK: jax.Array  # top-k log-probs
    ids_xK: jax.Array  # top-k ids
    token_logp: jax.Array  # log-prob of the sampled token
    entropy: jax.Array  # full-vocabulary entropy


def _side(logits_xV: jax.Array, tokens: jax.Array, inv_temp: float, k: int) -> _Side:
    return _side_from_logprobs(
        jax.nn.log_softmax(logits_xV.astype(jnp.float32) * inv_temp, axis=-1), tokens, k)


def _side_from_logprobs(logp: jax.Array, tokens: jax.Array, k: int) -> _Side:
    top, ids = top_k(logp, k)
    p = jnp.exp(logp)
    tok = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _Side(top, ids, tok, -vocab_sum(p * jnp.where(p > 0, logp, 0.0)))


def _topk_metrics(s_top, s_ids, t_top, t_ids, where) -> dict[str, jax.Array]:
    """Overlap of the two top-k sets and each model's mass on the shared set / its own top-k."""
    overlap = topk_overlap(s_ids, t_ids, where=where)
    return {
        "overlap": overlap,
        "topk_intersects": (overlap > 0).astype(jnp.float32),
        "student_shared_mass": shared_mass(s_top, s_ids, t_ids, where=where),
        "teacher_shared_mass": shared_mass(t_top, t_ids, s_ids, where=where),
        "student_topk_mass": mask_tokens(jnp.sum(jnp.exp(s_top), axis=-1), where),
        "teacher_topk_mass": mask_tokens(jnp.sum(jnp.exp(t_top), axis=-1), where),
    }


def _gap_metrics(sampler_logprobs, student_token_logp, where) -> dict[str, jax.Array]:
    """``logprob_gap`` and ``abs_logprob_gap`` (empty without sampler log-probs)."""
    if sampler_logprobs is None:
        return {}
    gap = logprob_gap(sampler_logprobs, student_token_logp, where=where)
    return {"logprob_gap": gap, "abs_logprob_gap": jnp.abs(gap)}


def _metrics_from_logits(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tokens: jax.Array,
    sampler_logprobs: jax.Array | None,
    where: jax.Array,
    *,
    k: int,
    temperature: float,
    teacher_temperature: float | None,
) -> dict[str, jax.Array]:
    """Per-token metrics for logits ``[..., V]``; shared by the dense and the chunked entry."""
    s = _side(student_logits, tokens, 1.0 / temperature, k)
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    t = _side(teacher_logits, tokens, 1.0 / t_temp, k)
    return _metrics_from_sides(s, t, sampler_logprobs, where)


def _metrics_from_sides(s: _Side, t: _Side, sampler_logprobs, where) -> dict[str, jax.Array]:
    return {
        **_topk_metrics(s.top_xK, s.ids_xK, t.top_xK, t.ids_xK, where),
        "student_entropy": mask_tokens(s.entropy, where),
        "teacher_entropy": mask_tokens(t.entropy, where),
        "student_token_logprob": mask_tokens(s.token_logp, where),
        "teacher_token_logprob": mask_tokens(t.token_logp, where),
        "token_reverse_kl": mask_tokens(s.token_logp - t.token_logp, where),
        **_gap_metrics(sampler_logprobs, s.token_logp, where),
    }


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
    teacher_temperature: float | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""All per-token mechanism metrics from dense logits (small inputs, tests, notebooks).

    Args:
      student_logits: ``[B, T, V]`` student logits at the rollout positions.
      teacher_logits: ``[B, T, V]`` teacher logits at the same positions.
      tokens: ``[B, T]`` sampled token ids (``tokens[:, t]`` is what position ``t`` predicted).
      k: ``K``, size of the top-k sets.
      where: ``[B, T]`` bool mask of valid (completion) tokens; ``None`` = all.
      temperature: softmax temperature of the student (and of the teacher by default).
      teacher_temperature: the teacher's own temperature (thunlp/OPD ``TEACHER_TEMPERATURE``);
        ``None`` = ``temperature``.
      sampler_logprobs: optional ``[B, T]`` log-probs recorded by the sampler.

    Returns:
      dict of ``[B, T]`` float32 arrays, ``0`` where masked:
      ``overlap``, ``topk_intersects`` (1 where the two top-k sets share an id),
      ``student_shared_mass``, ``teacher_shared_mass`` (mass on
      :math:`\mathcal{K}^S\cap\mathcal{K}^T`; their means over all positions; the paper's
      figure averages over intersecting positions only, see :func:`intersection_means`),
      ``student_topk_mass``, ``teacher_topk_mass``
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
        teacher_temperature=teacher_temperature,
    )


def mechanism_metrics_from_logprobs(
    student_logp: jax.Array,
    teacher_logp: jax.Array,
    tokens: jax.Array,
    *,
    k: int = 16,
    where: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""All per-token mechanism metrics from normalised log-probs (what a loss already computed).

    Same outputs as :func:`mechanism_metrics_from_logits` with
    ``student_logp = log_softmax(student_logits / temperature)`` (and the teacher's at its own
    temperature): a loss that has both log-probs in hand (the train step's chunk function) passes
    them here instead of paying two more vocabulary-wide log-softmaxes per position.

    Args:
      student_logp: ``[..., V]`` student log-probs; teacher_logp: ``[..., V]`` teacher log-probs.
      tokens: ``[...]`` sampled token ids.
      k: ``K``, size of the top-k sets.
      where: ``[...]`` bool mask of valid tokens; ``None`` = all.
      sampler_logprobs: optional ``[...]`` sampler log-probs (adds the gap metrics).

    Returns:
      dict of ``[...]`` float32 arrays, ``0`` where masked.
    """
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"student_logp {student_logp.shape} and teacher_logp {teacher_logp.shape} must match"
        )
    _check_metric_inputs(tokens, where, sampler_logprobs, student_logp.shape[:-1])
    valid = jnp.ones(tokens.shape, bool) if where is None else where.astype(bool)
    sg = lax.stop_gradient
    s = _side_from_logprobs(sg(student_logp).astype(jnp.float32), tokens, k)
    t = _side_from_logprobs(sg(teacher_logp).astype(jnp.float32), tokens, k)
    return _metrics_from_sides(s, t, None if sampler_logprobs is None else sg(sampler_logprobs),
                               valid)


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
    teacher_temperature: float | None = None,
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
      temperature, teacher_temperature: as :func:`mechanism_metrics_from_logits`.
      sampler_logprobs: optional ``[B, T]`` sampler log-probs (adds the gap metrics).

    Returns:
      dict of ``[B, T]`` float32 arrays (see :func:`mechanism_metrics_from_logits`).
    """
    token_shape = student_hidden.shape[:2]
    _check_metric_inputs(tokens, where, sampler_logprobs, token_shape)
    valid = jnp.ones(token_shape, bool) if where is None else where.astype(bool)
    sg = lax.stop_gradient
    extras = (tokens.astype(jnp.int32), valid, None if sampler_logprobs is None else sg(sampler_logprobs))

    def per_chunk(s_logits_CxV, t_logits_CxV, ex):
        tok_C, valid_C, sampler_C = ex
        return _metrics_from_logits(
            s_logits_CxV, t_logits_CxV, tok_C, sampler_C, valid_C, k=k, temperature=temperature,
            teacher_temperature=teacher_temperature,
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
    teacher_topk: TeacherTopK,
    tokens: jax.Array,
    *,
    where: jax.Array | None = None,
    chunk_size: int = 512,
    temperature: float = 1.0,
    sampler_logprobs: jax.Array | None = None,
) -> dict[str, jax.Array]:
    r"""Mechanism metrics when the teacher is only known by its precomputed top-k.

    With :class:`~opd_jax.losses.chunked_scoring.TeacherTopK` (``ids``/``logprobs`` ``[B, T, K]``,
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
        s = _side(s_logits_CxV, tok_C, inv_temp, k)
        in_teacher_C = jnp.any(t_ids == tok_C[:, None], axis=-1).astype(jnp.float32)
        return {
            **_topk_metrics(s.top_xK, s.ids_xK, t_top, t_ids, valid_C),
            "student_entropy": mask_tokens(s.entropy, valid_C),
            "student_token_logprob": mask_tokens(s.token_logp, valid_C),
            "token_in_teacher_topk": mask_tokens(in_teacher_C, valid_C),
            **_gap_metrics(sampler_C, s.token_logp, valid_C),
        }

    return chunked_logits_map(
        per_chunk, (sg(student_hidden),), (sg(student_unembed),), extras,
        chunk_size=chunk_size, remat=False,
    )


#: Scalar names of :func:`intersection_means`, from the per-token keys they average.
INTERSECTION_MEANS = {"student_p_sum_intersection": "student_shared_mass",
                      "teacher_p_sum_intersection": "teacher_shared_mass"}


def intersection_means(means: dict) -> dict:
    r"""The paper's shared-mass figures from token means of the per-token metrics.

    thunlp/OPD logs ``student_p_sum_intersection`` / ``teacher_p_sum_intersection``: each model's
    probability mass on :math:`\mathcal{K}^S_t\cap\mathcal{K}^T_t`, averaged over the positions
    whose top-k sets intersect only (``verl/verl/trainer/ppo/ray_trainer.py:1459-1467``; the
    paper's 97-99%). The per-token shared mass is 0 where the sets do not intersect, so with
    ``means`` holding token means over the same mask,

    .. math:: \bar m_\cap = \frac{\sum_t m_t}{\sum_t [\mathcal{K}^S_t\cap\mathcal{K}^T_t\neq\emptyset]}
              = \frac{\mathrm{mean}(m)}{\mathrm{mean}(\texttt{topk\_intersects})}

    (0 when no position intersects). ``student_shared_mass`` itself stays the mean over all
    positions. Returns ``{}`` without ``topk_intersects`` in ``means``.

    >>> out = intersection_means({"topk_intersects": 0.5, "student_shared_mass": 0.45,
    ...                           "teacher_shared_mass": 0.4})
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'student_p_sum_intersection': 0.9, 'teacher_p_sum_intersection': 0.8}
    """
    if "topk_intersects" not in means:
        return {}
    den = jnp.asarray(means["topk_intersects"], jnp.float32)
    safe = jnp.where(den > 0, den, 1.0)
    return {name: jnp.where(den > 0, jnp.asarray(means[key], jnp.float32) / safe, 0.0)
            for name, key in INTERSECTION_MEANS.items() if key in means}
