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
3. differentiates through a custom VJP that recomputes the chunk's logits in the backward
   pass (or, for :func:`chunked_divergence_loss`, forms the gradient during the forward pass)
   and accumulates the unembedding gradient in place (see :mod:`opd_jax.losses._chunk_engine`).

So no ``[B, T, V]`` buffer exists in the forward or in the backward pass: the live logit-sized
memory is one to a few ``[C, V]`` float32 buffers.  Values and gradients equal the dense forms
(same per-chunk math, up to float32 summation order).  Gradients flow to the student hidden
states and unembedding only: teacher inputs, masks, ids, weights and hyper-parameters (a traced
temperature, ``beta``) are constants.

The teacher side can also arrive precomputed as :class:`TeacherTopK` (its top-k ids and
log-probs plus its full-vocabulary logsumexp, produced by :func:`chunked_teacher_topk` in the
teacher's scoring job); the divergence is then taken over the teacher's top-k support with a
tail bucket (or renormalised) through :func:`opd_jax.losses.topk.support_divergence`.  That
path needs only the student's log-probs at the K ids, so a chunk holds a single ``[C, V]``
logit buffer plus its gradient.

Shape letters follow :mod:`opd_jax` (``C`` = chunk of token rows, ``N`` = number of chunks).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opd_jax.losses import _checks
from opd_jax.losses import _chunk_engine as engine
from opd_jax.losses.divergences import DIVERGENCES, LOGPROB_DIVERGENCES, mask_tokens
from opd_jax.losses.topk import support_divergence, topk_policy_gradient_loss, topk_reward

__all__ = [
    "TeacherTopK",
    "chunked_divergence",
    "chunked_divergence_loss",
    "chunked_logits_map",
    "chunked_logprobs_at_ids",
    "chunked_student_logits_map",
    "chunked_teacher_topk",
    "chunked_token_logprobs",
    "chunked_token_logprobs_and_entropy",
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


def _valid_mask(where: jax.Array | None, batch: int, time: int) -> jax.Array:
    if where is None:
        return jnp.ones((batch, time), dtype=bool)
    if where.shape != (batch, time):
        raise ValueError(f"where must be [B, T] = {(batch, time)}, got shape {where.shape}")
    return where.astype(bool)


def _inv_temperature(temperature) -> jax.Array:
    _checks.check_positive("temperature", temperature)
    return 1.0 / jnp.asarray(temperature, jnp.float32)


class _ChunkLoss(NamedTuple):
    """A per-token function of one model's logits, ready for the chunk engine.

    ``y_C = fn(head.features(z_CxV, head_extras_C, head_consts), loss_extras_C, loss_consts)``;
    extras are ``[B, T, ...]`` pytrees sliced per chunk, consts are shared by every chunk.
    """

    head: engine.Head
    fn: Callable[..., Any]
    head_extras: Any
    loss_extras: Any
    head_consts: Any = None
    loss_consts: Any = None


def _chunks(loss: _ChunkLoss, chunk_size: int):
    to = lambda x: engine.to_chunks(x, chunk_size)  # noqa: E731
    return (jax.tree.map(to, loss.head_extras), jax.tree.map(to, loss.loss_extras))


def _run_per_token(loss: _ChunkLoss, hidden, unembed, chunk_size: int):
    """``[B, T, ...]`` outputs of ``loss`` (remat backward pass)."""
    batch, time = hidden.shape[:2]
    chunks = _chunks(loss, chunk_size)
    fn, consts = engine.convert_closure(
        loss.head, loss.fn, chunk_size, unembed.shape[1], chunks,
        (loss.head_consts, loss.loss_consts),
    )
    out = engine.per_token(
        loss.head, fn, engine.vocab_blocks(unembed.shape[1]),
        engine.to_chunks(hidden, chunk_size), unembed, chunks, consts,
    )
    return jax.tree.map(lambda y: engine.from_chunks(y, batch, time), out)


def _run_weighted(loss: _ChunkLoss, hidden, unembed, weights, chunk_size: int):
    """``(sum_t w_t y_t, y [B, T])`` with the gradient formed in the forward pass."""
    batch, time = hidden.shape[:2]
    chunks = _chunks(loss, chunk_size)
    fn, consts = engine.convert_closure(
        loss.head, loss.fn, chunk_size, unembed.shape[1], chunks,
        (loss.head_consts, loss.loss_consts),
    )
    w_chunks = engine.to_chunks(lax.stop_gradient(weights.astype(jnp.float32)), chunk_size)
    total, per_NxC = engine.weighted_sum(
        loss.head, fn, engine.vocab_blocks(unembed.shape[1]),
        engine.to_chunks(hidden, chunk_size), unembed, (chunks, w_chunks), consts,
    )
    return total, lax.stop_gradient(engine.from_chunks(per_NxC, batch, time))


def _scan(body: Callable, xs: Any, *, remat: bool) -> Any:
    fn = jax.checkpoint(body, prevent_cse=False) if remat else body

    def step(carry, x):
        return carry, fn(x)

    return lax.scan(step, None, xs)[1]


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

    The general tool: for chunk ``n`` it computes ``logits_i = hiddens[i][chunk] @ unembeds[i]``
    (``[C, V]`` each, float32) and returns the ``[B, T, ...]`` stack of
    ``fn(*logits, extras[chunk])``.  It differentiates through anything (every model, extras,
    closures) by ``jax.checkpoint`` on the chunk; the price is one more ``[D, V]`` float32
    temporary per differentiated unembedding in the backward pass (XLA adds ``h^T G`` into the
    accumulator through a temporary).  The losses below use leaner custom VJPs instead.

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
    h_chunks = tuple(engine.to_chunks(h, chunk_size) for h in hiddens)
    e_chunks = jax.tree.map(lambda x: engine.to_chunks(x, chunk_size), extras)

    def body(xs):
        hs, ex = xs
        logits = tuple(engine.logits(h, w) for h, w in zip(hs, unembeds))
        return fn(*logits, ex)

    ys = _scan(body, (h_chunks, e_chunks), remat=remat)
    return jax.tree.map(lambda y: engine.from_chunks(y, batch, time), ys)


def chunked_student_logits_map(
    fn: Callable[..., Any],
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array | None = None,
    teacher_unembed: jax.Array | None = None,
    extras: Any = None,
    *,
    chunk_size: int = 512,
) -> Any:
    """:func:`chunked_logits_map` for a student + frozen teacher, on the lean custom VJP.

    Returns the ``[B, T, ...]`` stack of ``fn(student_logits_CxV, teacher_logits_CxV,
    extras_chunk)`` (``teacher_logits_CxV`` is ``None`` without a teacher).  Gradients flow to
    ``student_hidden`` and ``student_unembed`` only: the teacher is under ``stop_gradient``
    and ``extras`` and values ``fn`` closes over are constants.  In exchange the backward pass
    needs no second ``[D, V]`` buffer and skips the unembedding matmul when the unembedding
    is frozen.  Outputs ``fn`` computes under ``stop_gradient`` (metrics) cost nothing in the
    backward pass.

    Args:
      fn: ``fn(student_logits_CxV, teacher_logits_CxV | None, extras_chunk) -> pytree of
        [C, ...]`` float arrays.
      student_hidden, student_unembed: ``[B, T, D]``, ``[D, V]``.
      teacher_hidden, teacher_unembed: ``[B, T, D']``, ``[D', V]``, or both ``None``.
      extras: pytree of ``[B, T, ...]`` per-token arrays, or ``None`` (padded rows get zeros).
      chunk_size: token rows per chunk ``C``.

    Returns:
      The pytree returned by ``fn``, leaves ``[B, T, ...]``.
    """
    _check_head(student_hidden, student_unembed, "student")
    _check_positive_int("chunk_size", chunk_size)
    if (teacher_hidden is None) != (teacher_unembed is None):
        raise ValueError("teacher_hidden and teacher_unembed must be given together")
    if teacher_hidden is not None:
        _check_head(teacher_hidden, teacher_unembed, "teacher")
        if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
            raise ValueError(
                f"teacher hidden [B, T] {teacher_hidden.shape[:2]} != student "
                f"{student_hidden.shape[:2]}"
            )
        teacher_hidden = lax.stop_gradient(teacher_hidden)
        teacher_unembed = lax.stop_gradient(teacher_unembed)

    def loss_fn(student_logits_CxV, loss_extras, teacher_unembed_DxV):
        teacher_hidden_CxD, extras_C = loss_extras
        teacher_logits_CxV = (
            None if teacher_hidden_CxD is None
            else engine.logits(teacher_hidden_CxD, teacher_unembed_DxV)
        )
        return fn(student_logits_CxV, teacher_logits_CxV, extras_C)

    loss = _ChunkLoss(
        engine.DENSE_HEAD, loss_fn, None, (teacher_hidden, extras), loss_consts=teacher_unembed
    )
    return _run_per_token(loss, student_hidden, student_unembed, chunk_size)


# --------------------------------------------------------------------------------------------
# divergences
# --------------------------------------------------------------------------------------------


def _resolve(divergence: str | Callable, registry: dict, what: str) -> Callable:
    if callable(divergence):
        return divergence
    if divergence not in registry:
        raise ValueError(f"unknown divergence {divergence!r}{what}; known: {sorted(registry)}")
    return registry[divergence]


def _prepare_loss(
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, teacher_topk, where, *,
    divergence, temperature, chunk_size, divergence_kwargs,
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

    return _ChunkLoss(
        engine.DENSE_HEAD, fn, None, (lax.stop_gradient(teacher_hidden), valid_BxT),
        loss_consts=lax.stop_gradient(teacher_unembed),
    )


def _prepare_topk_loss(
    student_unembed, teacher_topk: TeacherTopK, valid_BxT, *, divergence, temperature,
    tail: str = "bucket", pointwise_clip: float | None = None, **div_params: Any,
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
    return _ChunkLoss(
        engine.SPARSE_HEAD, fn,
        head_extras=(ids_BxTxK.astype(jnp.int32), valid_BxT),
        loss_extras=(teacher_logp_BxTxK, valid_BxT),
        head_consts=_inv_temperature(temperature),
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

    >>> import jax, jax.numpy as jnp
    >>> from opd_jax.losses import reverse_kl
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
    return _run_per_token(loss, student_hidden, student_unembed, chunk_size)


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
    return _run_weighted(loss, student_hidden, student_unembed, weights, chunk_size)


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
    _check_head(hidden, unembed, "model")
    _check_positive_int("chunk_size", chunk_size)
    batch, time = hidden.shape[:2]
    if ids.shape[:2] != (batch, time) or ids.ndim not in (2, 3):
        raise ValueError(f"ids must be [B, T] or [B, T, K] with [B, T] = {(batch, time)}")
    squeeze = ids.ndim == 2
    ids_BxTxK = (ids[..., None] if squeeze else ids).astype(jnp.int32)
    loss = _ChunkLoss(
        engine.SPARSE_HEAD, _identity_logp,
        head_extras=(ids_BxTxK, jnp.ones((batch, time), bool)), loss_extras=None,
        head_consts=_inv_temperature(temperature),
    )
    out = _run_per_token(loss, hidden, unembed, chunk_size)
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
    _check_head(hidden, unembed, "model")
    _check_positive_int("chunk_size", chunk_size)
    batch, time = hidden.shape[:2]
    if tokens.shape != (batch, time):
        raise ValueError(f"tokens must be [B, T] = {(batch, time)}, got {tokens.shape}")
    valid_BxT = _valid_mask(where, batch, time)
    ids_BxTx1 = jnp.where(valid_BxT, tokens, 0).astype(jnp.int32)[..., None]
    loss = _ChunkLoss(
        engine.SPARSE_HEAD, _masked_token_logp,
        head_extras=(ids_BxTx1, valid_BxT), loss_extras=valid_BxT,
        head_consts=_inv_temperature(temperature),
    )
    return _run_per_token(loss, hidden, unembed, chunk_size)


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
    _check_positive_int("chunk_size", chunk_size)
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"tokens must be [B, T] = {hidden.shape[:2]}, got {tokens.shape}")
    loss = _ChunkLoss(
        engine.DENSE_HEAD, _logprob_and_entropy, None, tokens.astype(jnp.int32),
        loss_consts=_inv_temperature(temperature),
    )
    return _run_per_token(loss, hidden, unembed, chunk_size)
