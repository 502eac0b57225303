"""Memory-bounded (chunked) forms of the token-level losses and of teacher scoring.

A language-model head maps hidden states ``hidden_BxTxD`` through an unembedding
``unembed_DxV`` to logits ``[B, T, V]``.  With a 150k vocabulary that logit tensor is the
largest buffer of a training step (B=64, T=8192: 300+ GB in float32), and a dense loss and
its gradient hold several of them at once.  Every function here instead

1. flattens the ``B*T`` token rows and pads them to a multiple of ``chunk_size`` (``C``) with
   masked rows,
2. runs a :func:`jax.lax.scan` over the ``N = ceil(B*T / C)`` chunks, computing
   ``logits_CxV = hidden_CxD @ unembed_DxV`` (float32 accumulation) for one chunk at a time and
   calling the *dense* per-token function of :mod:`opd_jax.losses` on it, and
3. wraps the per-chunk function in :func:`jax.checkpoint`, so the backward pass recomputes the
   chunk's logits instead of storing them.

So no ``[B, T, V]`` buffer exists in the forward or in the backward pass: the live logit-sized
memory is a few ``[C, V]`` buffers plus the ``[D, V]`` unembedding gradient.  Values and
gradients equal the dense forms (same per-chunk math, up to float32 summation order in the
matmul).  Teacher inputs always get :func:`jax.lax.stop_gradient`.

The teacher side can also arrive precomputed as :class:`TeacherTopK` (its top-k ids and
log-probs plus its full-vocabulary logsumexp, produced by :func:`chunked_teacher_topk` in the
teacher's scoring job); the divergence is then taken over the teacher's top-k support with a
tail bucket (or renormalised) through :func:`opd_jax.losses.topk.support_divergence`.

Shape letters follow :mod:`opd_jax` (``C`` = chunk of token rows, ``N`` = number of chunks).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opd_jax.losses.divergences import (
    DIVERGENCES,
    LOGPROB_DIVERGENCES,
    mask_tokens,
    normalized_logprobs,
)
from opd_jax.losses.estimators import token_logprobs
from opd_jax.losses.topk import (
    gather_logprobs,
    support_divergence,
    topk_policy_gradient_loss,
    topk_reward,
)

__all__ = [
    "TeacherTopK",
    "chunked_divergence",
    "chunked_divergence_loss",
    "chunked_teacher_topk",
    "chunked_token_logprobs",
    "chunked_token_logprobs_and_entropy",
    "chunked_logprobs_at_ids",
    "chunked_logits_map",
    "chunked_topk_policy_gradient_loss",
]


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


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_head(hidden: jax.Array, unembed: jax.Array, who: str) -> None:
    if hidden.ndim != 3:
        raise ValueError(f"{who} hidden must be [B, T, D], got shape {hidden.shape}")
    if unembed.ndim != 2:
        raise ValueError(f"{who} unembed must be [D, V], got shape {unembed.shape}")
    if hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"{who} hidden width {hidden.shape[-1]} does not match unembed rows {unembed.shape[0]}"
        )


def _num_chunks(rows: int, chunk_size: int) -> int:
    return -(-rows // chunk_size)


def _to_chunks(x: jax.Array, chunk_size: int, fill: Any = 0) -> jax.Array:
    """``[B, T, ...]`` -> ``[N, C, ...]``: flatten token rows, pad the last chunk with ``fill``."""
    rows = x.shape[0] * x.shape[1]
    flat = x.reshape((rows,) + x.shape[2:])
    pad = _num_chunks(rows, chunk_size) * chunk_size - rows
    if pad:
        widths = [(0, pad)] + [(0, 0)] * (flat.ndim - 1)
        flat = jnp.pad(flat, widths, constant_values=fill)
    return flat.reshape((-1, chunk_size) + x.shape[2:])


def _from_chunks(y: jax.Array, batch: int, time: int) -> jax.Array:
    """``[N, C, ...]`` -> ``[B, T, ...]``: drop the padded rows."""
    flat = y.reshape((-1,) + y.shape[2:])
    return flat[: batch * time].reshape((batch, time) + y.shape[2:])


def _valid_mask(where: jax.Array | None, batch: int, time: int) -> jax.Array:
    if where is None:
        return jnp.ones((batch, time), dtype=bool)
    if where.shape != (batch, time):
        raise ValueError(f"where must be [B, T] = {(batch, time)}, got shape {where.shape}")
    return where.astype(bool)


def _logits(hidden_CxD: jax.Array, unembed_DxV: jax.Array) -> jax.Array:
    """One chunk's logits, accumulated in float32 whatever the input dtype."""
    return jnp.dot(hidden_CxD, unembed_DxV, preferred_element_type=jnp.float32)


def _scan(body: Callable, xs: Any, *, remat: bool) -> Any:
    """Map ``body`` over the leading chunk axis of ``xs`` with ``lax.scan``.

    With ``remat`` the body is wrapped in ``jax.checkpoint`` (nothing saved but its inputs), so
    the backward pass recomputes each chunk's logits rather than keeping ``N`` of them.
    ``prevent_cse=False`` is safe inside ``scan`` (the loop already stops CSE) and keeps XLA's
    fusions intact.
    """
    fn = jax.checkpoint(body, prevent_cse=False) if remat else body

    def step(carry, x):
        return carry, fn(x)

    _, ys = lax.scan(step, None, xs)
    return ys


def chunked_logits_map(
    fn: Callable[..., Any],
    hiddens: tuple[jax.Array, ...],
    unembeds: tuple[jax.Array, ...],
    extras: Any = None,
    *,
    chunk_size: int,
    remat: bool = True,
) -> Any:
    """Apply a per-token function of one or more models' logits, one chunk of tokens at a time.

    The general tool the other functions here are built on: for chunk ``n`` it computes
    ``logits_i = hiddens[i][chunk] @ unembeds[i]`` (``[C, V]`` each, float32) and returns the
    ``[B, T, ...]`` stack of ``fn(*logits, extras[chunk])``.

    Args:
      fn: ``fn(*logits_CxV, extras_chunk) -> pytree of [C, ...]`` arrays; ``extras_chunk`` has
        the structure of ``extras`` with every leaf sliced to the chunk's rows.
      hiddens: tuple of ``[B, T, D_i]`` hidden states (one per model).
      unembeds: tuple of ``[D_i, V]`` unembeddings, same order.
      extras: pytree of ``[B, T, ...]`` per-token arrays (masks, ids, ...), or ``None``.
        Padded rows get zeros (``False`` for masks), so ``fn`` must give finite values there.
      chunk_size: ``C``, token rows per chunk.
      remat: recompute the chunk in the backward pass (``jax.checkpoint``); turn off only for
        functions that are never differentiated.

    Returns:
      The pytree returned by ``fn`` with leaves reshaped from ``[N, C, ...]`` to ``[B, T, ...]``.
    """
    _check_positive_int("chunk_size", chunk_size)
    if len(hiddens) != len(unembeds) or not hiddens:
        raise ValueError("hiddens and unembeds must be non-empty tuples of the same length")
    batch, time = hiddens[0].shape[:2]
    for h, w in zip(hiddens, unembeds):
        _check_head(h, w, "model")
        if h.shape[:2] != (batch, time):
            raise ValueError(f"all hiddens must share [B, T]; got {h.shape[:2]} vs {(batch, time)}")
    h_chunks = tuple(_to_chunks(h, chunk_size) for h in hiddens)
    e_chunks = jax.tree.map(lambda x: _to_chunks(x, chunk_size), extras)

    def body(xs):
        hs, ex = xs
        logits = tuple(_logits(h, w) for h, w in zip(hs, unembeds))
        return fn(*logits, ex)

    ys = _scan(body, (h_chunks, e_chunks), remat=remat)
    return jax.tree.map(lambda y: _from_chunks(y, batch, time), ys)


# --------------------------------------------------------------------------------------------
# divergences
# --------------------------------------------------------------------------------------------


def _resolve_divergence(divergence: str | Callable) -> Callable:
    if callable(divergence):
        return divergence
    try:
        return DIVERGENCES[divergence]
    except KeyError:
        raise ValueError(
            f"unknown divergence {divergence!r}; known: {sorted(DIVERGENCES)}"
        ) from None


class _ChunkLoss(NamedTuple):
    """A per-token loss prepared for chunking: ``fn(student_logits_CxV, extras_C, consts)``."""

    fn: Callable[..., jax.Array]
    extras: Any  # pytree of [B, T, ...] per-token arrays (sliced per chunk)
    consts: Any  # pytree of arrays shared by every chunk (the teacher unembedding)


def _prepare_loss(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    teacher_topk,
    where,
    *,
    divergence,
    temperature,
    chunk_size,
    divergence_kwargs,
) -> _ChunkLoss:
    """Check the inputs and build the per-chunk loss shared by the two chunked drivers."""
    _check_head(student_hidden, student_unembed, "student")
    _check_positive_int("chunk_size", chunk_size)
    batch, time = student_hidden.shape[:2]
    valid_BxT = _valid_mask(where, batch, time)
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
    _check_head(teacher_hidden, teacher_unembed, "teacher")
    if teacher_hidden.shape[:2] != (batch, time):
        raise ValueError(
            f"teacher hidden [B, T] {teacher_hidden.shape[:2]} != student {(batch, time)}"
        )
    if teacher_unembed.shape[1] != student_unembed.shape[1]:
        raise ValueError(
            f"vocabularies differ: student {student_unembed.shape[1]}, "
            f"teacher {teacher_unembed.shape[1]}"
        )
    div_fn = _resolve_divergence(divergence)

    def fn(student_logits_CxV, extras, teacher_unembed_DxV):
        teacher_hidden_CxD, valid_C = extras
        return div_fn(
            student_logits_CxV,
            _logits(teacher_hidden_CxD, teacher_unembed_DxV),
            where=valid_C,
            temperature=temperature,
            **divergence_kwargs,
        )

    return _ChunkLoss(
        fn, (lax.stop_gradient(teacher_hidden), valid_BxT), lax.stop_gradient(teacher_unembed)
    )


def _prepare_topk_loss(
    student_unembed,
    teacher_topk: TeacherTopK,
    valid_BxT,
    *,
    divergence,
    temperature,
    tail: str = "bucket",
    pointwise_clip: float | None = None,
    **div_params: Any,
) -> _ChunkLoss:
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
    if isinstance(divergence, str):
        if divergence not in LOGPROB_DIVERGENCES:
            raise ValueError(
                f"unknown divergence {divergence!r} for teacher_topk; known: "
                f"{sorted(LOGPROB_DIVERGENCES)}"
            )
        divergence = LOGPROB_DIVERGENCES[divergence]
    if div_params:  # beta=, alpha=: bind them as the dense path forwards them
        divergence = functools.partial(divergence, **div_params)
    uniform = -float(np.log(student_unembed.shape[1]))

    def fn(student_logits_CxV, extras, consts):
        del consts
        ids_CxK, teacher_logp_CxK, valid_C = extras
        # masked rows: the student's logits are zeroed (uniform log-probs -log V) and the
        # teacher's filler replaced by the same value, so they give 0 with zero gradient
        student_logp_CxV = normalized_logprobs(
            student_logits_CxV, temperature=temperature, where=valid_C
        )
        teacher_logp_CxK = jnp.where(valid_C[:, None], teacher_logp_CxK, uniform)
        out_C = support_divergence(
            gather_logprobs(student_logp_CxV, ids_CxK),
            teacher_logp_CxK,
            jnp.ones(ids_CxK.shape, jnp.bool_),
            divergence=divergence,
            tail=tail,
            pointwise_clip=pointwise_clip,
        )
        return mask_tokens(out_C, valid_C)

    extras = (
        ids_BxTxK.astype(jnp.int32),
        lax.stop_gradient(teacher_topk.logprobs.astype(jnp.float32)),
        valid_BxT,
    )
    return _ChunkLoss(fn, extras, None)


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

    Precomputed-teacher form (``teacher_topk`` given, from :func:`chunked_teacher_topk`): the
    student's full-vocabulary log-probs :math:`\log S_t = \log\mathrm{softmax}(h^S_t W^S/\tau)`
    are gathered at the teacher's top-k ids :math:`\mathcal{K}_t` and compared with the
    teacher's top-k log-probs by :func:`opd_jax.losses.topk.support_divergence`:

    .. math::
        \ell_t = \mathrm{div}\Big(\big[S_t(\mathcal{K}_t),\, 1 - S_t(\mathcal{K}_t)\big],\;
                               \big[T_t(\mathcal{K}_t),\, 1 - T_t(\mathcal{K}_t)\big]\Big)

    with ``tail="bucket"`` (the default here: one tail bucket holding the rest of each
    distribution's mass; a lower bound of the full-vocabulary divergence), or both sides
    renormalised on :math:`\mathcal{K}_t` with ``tail="renormalize"``.  ``divergence`` is then
    a name of :data:`opd_jax.losses.divergences.LOGPROB_DIVERGENCES` (or a log-prob-level
    callable), and ``tail=`` / ``pointwise_clip=`` pass through ``divergence_kwargs``.
    ``temperature`` scales the student only: compute ``teacher_topk`` at the same temperature.

    Args:
      student_hidden: ``[B, T, D]`` student final hidden states (after the final norm).
      student_unembed: ``[D, V]`` student unembedding (the transposed tied embedding).
      teacher_hidden: ``[B, T, D']`` teacher hidden states, or ``None`` with ``teacher_topk``.
      teacher_unembed: ``[D', V]`` teacher unembedding, or ``None`` with ``teacher_topk``.
      teacher_topk: precomputed :class:`TeacherTopK` (``[B, T, K]`` ids / log-probs).
      divergence: registry name or dense per-token callable (see above).
      where: ``[B, T]`` bool mask of positions that count; ``None`` = all.
      temperature: softmax temperature :math:`\tau` applied to the logits.
      chunk_size: token rows per chunk ``C``; peak extra memory is a few ``[C, V]`` float32
        buffers.
      **divergence_kwargs: forwarded to the divergence (``beta=``, ``alpha=``,
        ``pointwise_clip=``, ``k=``/``support=`` for a top-k callable, ``tail=`` with
        ``teacher_topk``).

    Returns:
      ``[B, T]`` float32 unreduced per-token divergence, exactly ``0`` where ``where`` is False.
      Differentiable w.r.t. ``student_hidden`` and ``student_unembed``; the teacher gets no
      gradient.
    """
    loss = _prepare_loss(
        student_hidden, student_unembed, teacher_hidden, teacher_unembed, teacher_topk, where,
        divergence=divergence, temperature=temperature, chunk_size=chunk_size,
        divergence_kwargs=divergence_kwargs,
    )
    batch, time = student_hidden.shape[:2]
    xs = (_to_chunks(student_hidden, chunk_size),
          jax.tree.map(lambda x: _to_chunks(x, chunk_size), loss.extras))

    def body(x):
        hidden_CxD, extras_C = x
        return loss.fn(_logits(hidden_CxD, student_unembed), extras_C, loss.consts)

    return _from_chunks(_scan(body, xs, remat=True), batch, time)


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
    chunks = (
        jax.tree.map(lambda x: _to_chunks(x, chunk_size), loss.extras),
        _to_chunks(lax.stop_gradient(weights.astype(jnp.float32)), chunk_size),
    )
    hidden_NxCxD = _to_chunks(student_hidden, chunk_size)
    total, per_token_NxC = _fused_weighted_sum(
        loss.fn, hidden_NxCxD, student_unembed, chunks, loss.consts
    )
    return total, lax.stop_gradient(_from_chunks(per_token_NxC, batch, time))


def _chunk_value_and_logit_grad(fn, logits_CxV, extras_C, weights_C, consts):
    def weighted(z):
        per_C = fn(z, extras_C, consts)
        return jnp.sum(weights_C * per_C), per_C

    (total, per_C), dlogits_CxV = jax.value_and_grad(weighted, has_aux=True)(logits_CxV)
    return total, per_C, dlogits_CxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_weighted_sum(fn, hidden_NxCxD, unembed_DxV, chunks, consts):
    def step(total, x):
        hidden_CxD, (extras_C, weights_C) = x
        per_C = fn(_logits(hidden_CxD, unembed_DxV), extras_C, consts)
        return total + jnp.sum(weights_C * per_C), per_C

    return lax.scan(step, jnp.zeros((), jnp.float32), (hidden_NxCxD, chunks))


def _fused_weighted_sum_fwd(fn, hidden_NxCxD, unembed_DxV, chunks, consts):
    d, v = unembed_DxV.shape

    def step(carry, x):
        total, dunembed_DxV = carry
        hidden_CxD, (extras_C, weights_C) = x
        logits_CxV = _logits(hidden_CxD, unembed_DxV)
        chunk_total, per_C, dlogits_CxV = _chunk_value_and_logit_grad(
            fn, logits_CxV, extras_C, weights_C, consts
        )
        # dL/dh = G W^T  ([C, V] x [D, V] contracting V);  dL/dW += h^T G  (contracting C)
        dhidden_CxD = lax.dot_general(
            dlogits_CxV, unembed_DxV.astype(dlogits_CxV.dtype), (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        dunembed_DxV = dunembed_DxV + lax.dot_general(
            hidden_CxD.astype(dlogits_CxV.dtype), dlogits_CxV, (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return (total + chunk_total, dunembed_DxV), (per_C, dhidden_CxD.astype(hidden_CxD.dtype))

    init = (jnp.zeros((), jnp.float32), jnp.zeros((d, v), jnp.float32))
    (total, dunembed_DxV), (per_NxC, dhidden_NxCxD) = lax.scan(step, init, (hidden_NxCxD, chunks))
    residuals = (dhidden_NxCxD, dunembed_DxV.astype(unembed_DxV.dtype))
    return (total, per_NxC), residuals


def _fused_weighted_sum_bwd(fn, residuals, cotangents):
    del fn
    dhidden_NxCxD, dunembed_DxV = residuals
    g = cotangents[0]  # the per-token output leaves under stop_gradient: its cotangent is unused
    # the teacher side, masks, ids and weights are constants: None is a zero cotangent
    return (
        (g * dhidden_NxCxD).astype(dhidden_NxCxD.dtype),
        (g * dunembed_DxV).astype(dunembed_DxV.dtype),
        None,
        None,
    )


_fused_weighted_sum.defvjp(_fused_weighted_sum_fwd, _fused_weighted_sum_bwd)


# --------------------------------------------------------------------------------------------
# scoring: top-k, log-probs of given ids, entropy
# --------------------------------------------------------------------------------------------


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
    _check_head(hidden, unembed, "model")
    _check_positive_int("k", k)
    if k > unembed.shape[1]:
        raise ValueError(f"k={k} exceeds the vocabulary size {unembed.shape[1]}")
    batch, time = hidden.shape[:2]
    valid_BxT = _valid_mask(where, batch, time)
    inv_temp = 1.0 / temperature

    def per_chunk(logits_CxV, valid_C):
        z_CxV = logits_CxV * inv_temp
        lse_C = jax.nn.logsumexp(z_CxV, axis=-1)
        top_CxK, ids_CxK = lax.top_k(z_CxV, k)
        logp_CxK = top_CxK - lse_C[:, None]
        keep = valid_C[:, None]
        return TeacherTopK(
            ids=jnp.where(keep, ids_CxK, 0).astype(jnp.int32),
            logprobs=jnp.where(keep, logp_CxK, 0.0),
            logsumexp=jnp.where(valid_C, lse_C, 0.0),
        )

    return chunked_logits_map(
        per_chunk,
        (lax.stop_gradient(hidden),),
        (lax.stop_gradient(unembed),),
        valid_BxT,
        chunk_size=chunk_size,
        remat=False,
    )


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
    _check_head(hidden, unembed, "model")
    batch, time = hidden.shape[:2]
    if ids.shape[:2] != (batch, time) or ids.ndim not in (2, 3):
        raise ValueError(f"ids must be [B, T] or [B, T, K] with [B, T] = {(batch, time)}")
    squeeze = ids.ndim == 2
    ids_BxTxK = ids[..., None] if squeeze else ids

    def per_chunk(logits_CxV, ids_CxK):
        return gather_logprobs(normalized_logprobs(logits_CxV, temperature=temperature), ids_CxK)

    out = chunked_logits_map(
        per_chunk, (hidden,), (unembed,), ids_BxTxK.astype(jnp.int32), chunk_size=chunk_size
    )
    return out[..., 0] if squeeze else out


def _topk_pg_per_token(
    student_logits, teacher_logits, *, where, temperature, k, support, weights
):
    """Dense OPD top-k surrogate for one chunk: reward (stop-gradient) then the PG loss."""
    reward = topk_reward(
        student_logits,
        teacher_logits,
        k=k,
        support=support,
        weights=weights,
        where=where,
        temperature=temperature,
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
    where: jax.Array | None = None,
    temperature: float = 1.0,
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
      weights: a name of :data:`opd_jax.losses.topk.WEIGHTS`.
      where: ``[B, T]`` bool mask; ``None`` = all.
      temperature: softmax temperature for both models.
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
    )


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

    Calls :func:`opd_jax.losses.estimators.token_logprobs` on each chunk's logits, so values
    equal the dense form.  Differentiable w.r.t. ``hidden`` and ``unembed``.

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
    _check_head(hidden, unembed, "model")
    batch, time = hidden.shape[:2]
    if tokens.shape != (batch, time):
        raise ValueError(f"tokens must be [B, T] = {(batch, time)}, got {tokens.shape}")
    valid_BxT = _valid_mask(where, batch, time)

    def per_chunk(logits_CxV, extras):
        tokens_C, valid_C = extras
        return token_logprobs(logits_CxV, tokens_C, temperature=temperature, where=valid_C)

    return chunked_logits_map(
        per_chunk,
        (hidden,),
        (unembed,),
        (tokens.astype(jnp.int32), valid_BxT),
        chunk_size=chunk_size,
    )


def _logprob_and_entropy(logits_CxV, tokens_C, inv_temp):
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
    _check_head(hidden, unembed, "model")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"tokens must be [B, T] = {hidden.shape[:2]}, got {tokens.shape}")
    inv_temp = 1.0 / temperature

    def per_chunk(logits_CxV, tokens_C):
        return _logprob_and_entropy(logits_CxV, tokens_C, inv_temp)

    return chunked_logits_map(
        per_chunk, (hidden,), (unembed,), tokens.astype(jnp.int32), chunk_size=chunk_size
    )
