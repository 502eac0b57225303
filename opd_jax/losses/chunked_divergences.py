"""Memory-bounded (chunked) divergences between a student and a teacher, from hidden states.

The chunked forms of :mod:`opd_jax.losses.divergences` and of the OPD top-k objective: each
chunk of ``C`` token rows computes ``hidden_CxD @ unembed_DxV`` (float32) and calls the dense
per-token function on it (see :mod:`opd_jax.losses.chunk_map` for the layout and memory), so
no ``[B, T, V]`` buffer exists in the forward or in the backward pass.  Gradients flow to the
student hidden states and unembedding only.

The teacher side can also arrive precomputed as
:class:`~opd_jax.losses.chunked_scoring.TeacherTopK` (its top-k ids and log-probs plus its
full-vocabulary logsumexp, produced by
:func:`~opd_jax.losses.chunked_scoring.chunked_teacher_topk` in the teacher's scoring job); the
divergence is then taken over the teacher's top-k support with a tail bucket (or renormalised)
through :func:`opd_jax.losses.topk.support_divergence`.  That path needs only the student's
log-probs at the K ids, so a chunk holds a single ``[C, V]`` logit buffer plus its gradient.

Shape letters follow :mod:`opd_jax` (``C`` = chunk of token rows, ``N`` = number of chunks).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opd_jax.losses import checks
from opd_jax.losses import chunk_engine as engine
from opd_jax.losses.chunk_map import ChunkLoss, inv_temperature, run_per_token, run_weighted
from opd_jax.losses.chunked_scoring import TeacherTopK
from opd_jax.losses.divergences import DIVERGENCES, LOGPROB_DIVERGENCES, mask_tokens
from opd_jax.losses.topk import support_divergence, topk_policy_gradient_loss, topk_reward

__all__ = [
    "chunked_divergence",
    "chunked_divergence_loss",
    "chunked_topk_policy_gradient_loss",
]


def _resolve(divergence: str | Callable, registry: dict, what: str) -> Callable:
    if callable(divergence):
        return divergence
    if divergence not in registry:
        raise ValueError(f"unknown divergence {divergence!r}{what}; known: {sorted(registry)}")
    return registry[divergence]


def _prepare_loss(
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, teacher_topk, where, *,
    divergence, temperature, chunk_size, divergence_kwargs,
) -> ChunkLoss:
    """Check the inputs and build the per-chunk loss shared by the two chunked drivers."""
    checks.check_head(student_hidden, student_unembed, "student")
    checks.positive_int("chunk_size", chunk_size)
    batch, time = student_hidden.shape[:2]
    valid_BxT = checks.valid_mask(where, batch, time)
    dense = teacher_hidden is not None or teacher_unembed is not None
    if dense == (teacher_topk is not None):
        raise ValueError(
            "give either teacher_hidden and teacher_unembed (dense teacher), or teacher_topk "
            "(precomputed teacher top-k), not both and not neither"
        )
    if teacher_topk is not None:
        return _prepare_topk_loss(
            student_unembed, teacher_topk, valid_BxT,
            divergence=divergence, temperature=temperature, **divergence_kwargs,
        )
    if teacher_hidden is None or teacher_unembed is None:
        raise ValueError("teacher_hidden and teacher_unembed must be given together")
    checks.check_head(teacher_hidden, teacher_unembed, "teacher")
    if teacher_hidden.shape[:2] != (batch, time):
        raise ValueError(
            f"teacher hidden [B, T] {teacher_hidden.shape[:2]} != student {(batch, time)}"
        )
    if teacher_unembed.shape[1] != student_unembed.shape[1]:
        raise ValueError(
            f"vocabularies differ: student {student_unembed.shape[1]}, "
            f"teacher {teacher_unembed.shape[1]}"
        )
    div_fn = _resolve(divergence, DIVERGENCES, "")

    def fn(student_logits_CxV, extras, teacher_unembed_DxV):
        teacher_hidden_CxD, valid_C = extras
        return div_fn(
            student_logits_CxV,
            engine.logits(teacher_hidden_CxD, teacher_unembed_DxV),
            where=valid_C,
            temperature=temperature,
            **divergence_kwargs,
        )

    return ChunkLoss(
        engine.DENSE_HEAD, fn, None, (lax.stop_gradient(teacher_hidden), valid_BxT),
        loss_consts=lax.stop_gradient(teacher_unembed),
    )


def _prepare_topk_loss(
    student_unembed, teacher_topk: TeacherTopK, valid_BxT, *, divergence, temperature,
    tail: str = "bucket", pointwise_clip: float | None = None, **div_params: Any,
) -> ChunkLoss:
    if div_params.pop("teacher_temperature", None) is not None:
        raise ValueError(
            "teacher_temperature does not apply to a precomputed teacher_topk: its log-probs are "
            "already at the temperature it was scored at (chunked_teacher_topk(temperature=...))"
        )
    batch, time = valid_BxT.shape
    ids_BxTxK = teacher_topk.ids
    if ids_BxTxK.ndim != 3 or ids_BxTxK.shape[:2] != (batch, time):
        raise ValueError(
            f"teacher_topk.ids has shape {ids_BxTxK.shape}; it must be [B, T, K] with "
            f"[B, T] = {(batch, time)} (the student's token positions)"
        )
    if teacher_topk.logprobs.shape != ids_BxTxK.shape:
        raise ValueError(
            f"teacher_topk.logprobs has shape {teacher_topk.logprobs.shape}; it must match "
            f"teacher_topk.ids {ids_BxTxK.shape}"
        )
    div_fn = _resolve(divergence, LOGPROB_DIVERGENCES, " for teacher_topk")
    if div_params:  # beta=, alpha=: bound as the dense path forwards them
        div_fn = functools.partial(div_fn, **div_params)
    uniform = -float(np.log(student_unembed.shape[1]))

    def fn(student_logp_CxK, extras, consts):
        del consts
        teacher_logp_CxK, valid_C = extras
        # masked rows: the sparse head zeroes the student's logits (log-probs -log V); the
        # teacher's filler gets the same value, so they give 0 with zero gradient
        teacher_logp_CxK = jnp.where(valid_C[:, None], teacher_logp_CxK, uniform)
        out_C = support_divergence(
            student_logp_CxK, teacher_logp_CxK, jnp.ones(student_logp_CxK.shape, jnp.bool_),
            divergence=div_fn, tail=tail, pointwise_clip=pointwise_clip,
        )
        return mask_tokens(out_C, valid_C)

    teacher_logp_BxTxK = lax.stop_gradient(teacher_topk.logprobs.astype(jnp.float32))
    return ChunkLoss(
        engine.SPARSE_HEAD, fn,
        head_extras=(ids_BxTxK.astype(jnp.int32), valid_BxT),
        loss_extras=(teacher_logp_BxTxK, valid_BxT),
        head_consts=inv_temperature(temperature),
    )


def chunked_divergence(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array | None = None,
    teacher_unembed: jax.Array | None = None,
    *,
    teacher_topk: TeacherTopK | None = None,
    divergence: str | Callable = "reverse_kl",
    where: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
    **divergence_kwargs: Any,
) -> jax.Array:
    r"""Per-token divergence between student and teacher, without ``[B, T, V]`` logits.

    Dense-teacher form (``teacher_hidden`` and ``teacher_unembed`` given): for every token
    :math:`t` it returns exactly what the dense loss returns on that token's logits,

    .. math::
        \ell_t = \mathrm{div}\big(h^S_t W^S,\; h^T_t W^T\big)

    with ``div`` one of :data:`opd_jax.losses.divergences.DIVERGENCES` (``"forward_kl"``,
    ``"reverse_kl"``, ``"generalized_jsd"`` with ``beta=``, ``"skew_forward_kl"`` with
    ``alpha=``, ...), or any callable with the dense signature ``div(student_logits,
    teacher_logits, *, where, temperature, **kwargs) -> [...]``; e.g.
    :func:`opd_jax.losses.topk.topk_divergence` with ``k=16, support="union"`` gives the
    chunked top-k-support divergence, and :func:`chunked_topk_policy_gradient_loss` the OPD
    top-k reward objective.

    Precomputed-teacher form (``teacher_topk`` given, from
    :func:`~opd_jax.losses.chunked_scoring.chunked_teacher_topk`): the student's full-vocabulary
    log-probs :math:`\log S_t = \log\mathrm{softmax}(h^S_t W^S/\tau)` are gathered at the
    teacher's top-k ids :math:`\mathcal{K}_t` and compared with the teacher's top-k log-probs by
    :func:`opd_jax.losses.topk.support_divergence`:

    .. math::
        \ell_t = \mathrm{div}\Big(\big[S_t(\mathcal{K}_t),\, 1 - S_t(\mathcal{K}_t)\big],\;
                               \big[T_t(\mathcal{K}_t),\, 1 - T_t(\mathcal{K}_t)\big]\Big)

    with ``tail="bucket"`` (the default here: one tail bucket holding the rest of each
    distribution's mass; a lower bound of the full-vocabulary divergence), or both sides
    renormalised on :math:`\mathcal{K}_t` with ``tail="renormalize"``.  ``divergence`` is then
    a name of :data:`opd_jax.losses.divergences.LOGPROB_DIVERGENCES` (or a log-prob-level
    callable), and ``tail=`` / ``pointwise_clip=`` pass through ``divergence_kwargs``.
    ``temperature`` scales the student only: compute ``teacher_topk`` at the teacher's
    temperature (``teacher_temperature=`` is for the dense form).

    Args:
      student_hidden: ``[B, T, D]`` student final hidden states (after the final norm).
      student_unembed: ``[D, V]`` student unembedding (the transposed tied embedding).
      teacher_hidden: ``[B, T, D']`` teacher hidden states, or ``None`` with ``teacher_topk``.
      teacher_unembed: ``[D', V]`` teacher unembedding, or ``None`` with ``teacher_topk``.
      teacher_topk: precomputed :class:`~opd_jax.losses.chunked_scoring.TeacherTopK`
        (``[B, T, K]`` ids / log-probs).
      divergence: registry name or dense per-token callable (see above).
      where: ``[B, T]`` bool mask of positions that count; ``None`` = all.
      temperature: softmax temperature :math:`\tau` applied to the logits.
      chunk_size: token rows per chunk ``C``; peak extra memory is a few ``[C, V]`` float32
        buffers.
      **divergence_kwargs: forwarded to the divergence (``beta=``, ``alpha=``,
        ``pointwise_clip=``, ``teacher_temperature=`` (dense form), ``k=``/``support=`` for
        a top-k callable, ``tail=`` with
        ``teacher_topk``).

    Returns:
      ``[B, T]`` float32 unreduced per-token divergence, exactly ``0`` where ``where`` is False.
      Differentiable w.r.t. ``student_hidden`` and ``student_unembed``; the teacher gets no
      gradient.

    >>> import jax, jax.numpy as jnp
    >>> from opd_jax.losses import chunked_teacher_topk, reverse_kl
    >>> h = jax.random.normal(jax.random.key(0), (1, 5, 4))
    >>> w = jax.random.normal(jax.random.key(1), (4, 11))
    >>> per_token = chunked_divergence(h, w, 2 * h, w, chunk_size=2)  # 3 chunks, 1 padded row
    >>> bool(jnp.allclose(per_token, reverse_kl(h @ w, 2 * h @ w), atol=1e-5))
    True
    >>> top = chunked_teacher_topk(2 * h, w, k=11, chunk_size=2)  # K = V: the bucket is empty
    >>> bool(jnp.allclose(chunked_divergence(h, w, teacher_topk=top, chunk_size=2), per_token,
    ...                   atol=1e-4))
    True
    """
    loss = _prepare_loss(
        student_hidden, student_unembed, teacher_hidden, teacher_unembed, teacher_topk, where,
        divergence=divergence, temperature=temperature, chunk_size=chunk_size,
        divergence_kwargs=divergence_kwargs,
    )
    return run_per_token(loss, student_hidden, student_unembed, chunk_size)


def chunked_divergence_loss(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array | None = None,
    teacher_unembed: jax.Array | None = None,
    *,
    weights: jax.Array,
    teacher_topk: TeacherTopK | None = None,
    divergence: str | Callable = "reverse_kl",
    where: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
    **divergence_kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    r"""Fused chunked loss: :math:`L = \sum_t w_t \ell_t` with its gradient built in the forward pass.

    The same per-token divergence :math:`\ell_t` as :func:`chunked_divergence` (all arguments
    mean the same), reduced with caller-chosen per-token ``weights`` :math:`w_t` -- every
    reduction of :mod:`opd_jax.losses.reductions` is such a weighted sum, e.g. token-mean is
    ``w = where / max(sum(where), 1)``.  Because the cotangent of each token is then known in
    the forward pass, each chunk computes its logits once and immediately forms
    :math:`\partial L/\partial h = G W^\top` and accumulates :math:`\partial L/\partial W
    \mathrel{+}= h^\top G` with :math:`G = \partial L/\partial z` (``[C, V]``); the backward
    pass only scales these by the incoming scalar cotangent.  That is 3 student matmuls
    (``[C, D] x [D, V]`` sized) per chunk instead of 4 for the rematerialised per-token form
    (and no teacher recompute), with the same bounded memory: a few ``[C, V]`` buffers, the
    ``[D, V]`` gradient accumulator and the ``[B, T, D]`` hidden-state gradient.

    Prefer this for training when the reduction is fixed; use :func:`chunked_divergence` when
    the per-token losses feed further differentiable arithmetic.

    Args:
      weights: ``[B, T]`` per-token weights :math:`w_t` (treated as constants).
      others: as :func:`chunked_divergence`.

    Returns:
      ``(loss, per_token)``: the scalar float32 :math:`L` (differentiable w.r.t.
      ``student_hidden`` and ``student_unembed``) and the ``[B, T]`` per-token
      :math:`\ell_t` under ``stop_gradient`` (for logging; ``0`` where masked).
    """
    loss = _prepare_loss(
        student_hidden, student_unembed, teacher_hidden, teacher_unembed, teacher_topk, where,
        divergence=divergence, temperature=temperature, chunk_size=chunk_size,
        divergence_kwargs=divergence_kwargs,
    )
    batch, time = student_hidden.shape[:2]
    if weights.shape != (batch, time):
        raise ValueError(f"weights must be [B, T] = {(batch, time)}, got shape {weights.shape}")
    return run_weighted(loss, student_hidden, student_unembed, weights, chunk_size)



def _topk_pg_per_token(
    student_logits, teacher_logits, *, where, temperature, k, support, weights,
    teacher_temperature=None, normalize=None,
):
    """Dense OPD top-k surrogate for one chunk: reward (stop-gradient) then the PG loss."""
    reward = topk_reward(
        student_logits,
        teacher_logits,
        k=k,
        support=support,
        weights=weights,
        normalize=normalize,
        where=where,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
    )
    return topk_policy_gradient_loss(student_logits, reward, where=where, temperature=temperature)


def chunked_topk_policy_gradient_loss(
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array,
    teacher_unembed: jax.Array,
    *,
    k: int = 16,
    support: str = "student",
    weights: str = "student_p",
    normalize: bool | None = None,
    where: jax.Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    chunk_size: int = 512,
) -> jax.Array:
    r"""OPD's top-k reward objective (thunlp/OPD), chunk by chunk over tokens.

    Per token, with :math:`\mathcal{K}_t` the support built from both models' top-k ids,

    .. math::
        A_{t,k} = -\big(\log S_t(x_k) - \log T_t(x_k)\big)\,w_{t,k}, \qquad
        \ell_t = -\sum_{x_k\in\mathcal{K}_t} \mathrm{sg}(A_{t,k})\,\log S_t(x_k),

    exactly :func:`opd_jax.losses.topk.topk_reward` followed by
    :func:`opd_jax.losses.topk.topk_policy_gradient_loss` on each chunk's logits.

    Args:
      student_hidden, student_unembed: ``[B, T, D]``, ``[D, V]`` (differentiated).
      teacher_hidden, teacher_unembed: ``[B, T, D']``, ``[D', V]`` (stop-gradient).
      k: top-k size (16 in the paper).
      support: a name of :data:`opd_jax.losses.topk.SUPPORTS`.
      weights, normalize: as :func:`opd_jax.losses.topk.topk_reward`.
      where: ``[B, T]`` bool mask; ``None`` = all.
      temperature, teacher_temperature: as :func:`opd_jax.losses.topk.topk_reward`.
      chunk_size: token rows per chunk ``C``.

    Returns:
      ``[B, T]`` float32 per-token surrogate loss, ``0`` where masked.
    """
    return chunked_divergence(
        student_hidden,
        student_unembed,
        teacher_hidden,
        teacher_unembed,
        divergence=_topk_pg_per_token,
        where=where,
        temperature=temperature,
        chunk_size=chunk_size,
        k=k,
        support=support,
        weights=weights,
        normalize=normalize,
        teacher_temperature=teacher_temperature,
    )
