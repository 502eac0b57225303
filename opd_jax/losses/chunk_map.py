"""Chunk maps: per-token functions of ``hidden @ unembed`` logits, one chunk of tokens at a time.

A language-model head maps hidden states ``hidden_BxTxD`` through an unembedding
``unembed_DxV`` to logits ``[B, T, V]``.  With a 150k vocabulary that logit tensor is the
largest buffer of a training step (B=64, T=8192: 300+ GB in float32), and a dense loss and
its gradient hold several of them at once.  Every chunked form of :mod:`opd_jax.losses`
(:mod:`~opd_jax.losses.chunked_divergences`, :mod:`~opd_jax.losses.chunked_scoring`) instead

1. flattens the ``B*T`` token rows and pads them to a multiple of ``chunk_size`` (``C``) with
   masked rows,
2. runs a :func:`jax.lax.scan` over the ``N = ceil(B*T / C)`` chunks, computing
   ``logits_CxV = hidden_CxD @ unembed_DxV`` (float32 accumulation) for one chunk at a time and
   calling the *dense* per-token function of :mod:`opd_jax.losses` on it, and
3. differentiates through a custom VJP that recomputes the chunk's logits in the backward
   pass (or, for a fixed weighted sum, forms the gradient during the forward pass) and
   accumulates the unembedding gradient in place (see :mod:`opd_jax.losses.chunk_engine`).

So no ``[B, T, V]`` buffer exists in the forward or in the backward pass: the live logit-sized
memory is one to a few ``[C, V]`` float32 buffers.  Values and gradients equal the dense forms
(same per-chunk math, up to float32 summation order).  Gradients flow to the student hidden
states and unembedding only: teacher inputs, masks, ids, weights and hyper-parameters (a traced
temperature, ``beta``) are constants.

This module holds the two public maps (:func:`chunked_logits_map`, the general one
differentiated by ``jax.checkpoint``; :func:`chunked_student_logits_map`, student + frozen
teacher on the lean custom VJP) and :class:`ChunkLoss` with its runners, which the chunked
losses build on.  Shape letters follow :mod:`opd_jax` (``C`` = chunk of token rows, ``N`` =
number of chunks).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from opd_jax.losses import checks
from opd_jax.losses import chunk_engine as engine
from opd_jax.losses import chunk_layout as layout

# the maps; ChunkLoss, run_per_token, run_weighted and inv_temperature serve the chunked losses
__all__ = ["chunked_logits_map", "chunked_student_logits_map"]


def inv_temperature(temperature) -> jax.Array:
    """``1 / temperature`` as a float32 array, after checking a concrete value is > 0."""
    checks.check_positive("temperature", temperature)
    return 1.0 / jnp.asarray(temperature, jnp.float32)


class ChunkLoss(NamedTuple):
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


def _chunks(loss: ChunkLoss, chunk_size: int):
    to = lambda x: layout.to_chunks(x, chunk_size)  # noqa: E731
    return (jax.tree.map(to, loss.head_extras), jax.tree.map(to, loss.loss_extras))


def _prepare(loss: ChunkLoss, unembed, chunk_size: int):
    """Chunked extras, and ``fn`` / consts with closed-over values hoisted into the consts."""
    chunks = _chunks(loss, chunk_size)
    fn, consts = engine.convert_closure(
        loss.head, loss.fn, chunk_size, unembed.shape[1], chunks,
        (loss.head_consts, loss.loss_consts),
    )
    return chunks, fn, consts


def run_per_token(loss: ChunkLoss, hidden, unembed, chunk_size: int, where=None):
    """``[B, T, ...]`` outputs of ``loss`` (remat backward pass), in chunks of at most
    ``chunk_size`` rows split evenly (:func:`~opd_jax.losses.chunk_layout.balanced_chunk_size`).

    ``where`` (``[B, T]`` bool): only these rows are computed (:func:`_live_rows_first`); the
    outputs elsewhere are zeros."""
    batch, time = hidden.shape[:2]
    chunk_size = layout.balanced_chunk_size(batch * time, chunk_size)
    live_N, restore = None, None
    if where is not None:
        (hidden, loss), live_N, restore = _live_rows_first(hidden, loss, where, chunk_size)
    chunks, fn, consts = _prepare(loss, unembed, chunk_size)
    out = engine.per_token(
        loss.head, fn, layout.vocab_blocks(unembed.shape[1]),
        layout.to_chunks(hidden, chunk_size), unembed, chunks, consts, live_N,
    )
    out = jax.tree.map(lambda y: layout.from_chunks(y, *hidden.shape[:2]), out)
    return out if restore is None else restore(out)


def _live_rows_first(hidden, loss: ChunkLoss, where, chunk_size: int):
    """Put the ``where`` rows first (a stable permutation of the ``B T`` rows into one row of
    ``[1, B T]``), so that every chunk after the last such row holds none and is skipped.

    Returns ``((hidden, loss) permuted, live_N [N] bool, restore)``: ``restore`` takes the
    ``[1, B T, ...]`` outputs back to ``[B, T, ...]`` in the original order, zero outside
    ``where``. A chunk's cost does not depend on what it holds, so with ``R`` rows in ``where``
    this computes ``ceil(R / C)`` chunks instead of ``ceil(B T / C)``: a batch of completions
    padded to the longest one skips the padding's chunks."""
    batch, time = where.shape
    if hidden.shape[:2] != (batch, time):
        raise ValueError(f"where has shape {where.shape}; it must be the rows' [B, T] "
                         f"{hidden.shape[:2]}")
    valid = where.reshape(-1).astype(jnp.bool_)
    order = jnp.argsort(~valid, stable=True)      # where-rows first, each group in order
    inverse = jnp.argsort(order)

    def first(x):
        return x.reshape((batch * time,) + x.shape[2:])[order][None]

    moved = (first(hidden), loss._replace(head_extras=jax.tree.map(first, loss.head_extras),
                                          loss_extras=jax.tree.map(first, loss.loss_extras)))
    live_N = layout.to_chunks(valid[order][None], chunk_size, fill=False).any(axis=1)

    def restore(out):
        def back(y):
            y = y[0][inverse].reshape((batch, time) + y.shape[2:])
            keep = where.reshape((batch, time) + (1,) * (y.ndim - 2))
            return jnp.where(keep, y, jnp.zeros((), y.dtype))
        return jax.tree.map(back, out)

    return moved, live_N, restore


def run_weighted(loss: ChunkLoss, hidden, unembed, weights, chunk_size: int):
    """``(sum_t w_t y_t, y [B, T])`` with the gradient formed in the forward pass (chunks as
    :func:`run_per_token`'s)."""
    batch, time = hidden.shape[:2]
    chunk_size = layout.balanced_chunk_size(batch * time, chunk_size)
    chunks, fn, consts = _prepare(loss, unembed, chunk_size)
    w_chunks = layout.to_chunks(lax.stop_gradient(weights.astype(jnp.float32)), chunk_size)
    total, per_NxC = engine.weighted_sum(
        loss.head, fn, layout.vocab_blocks(unembed.shape[1]),
        layout.to_chunks(hidden, chunk_size), unembed, (chunks, w_chunks), consts,
    )
    return total, lax.stop_gradient(layout.from_chunks(per_NxC, batch, time))


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
    accumulator through a temporary).  The chunked losses use leaner custom VJPs instead.

    Args:
      fn: ``fn(*logits_CxV, extras_chunk) -> pytree of [C, ...]`` arrays; ``extras_chunk`` has
        the structure of ``extras`` with every leaf sliced to the chunk's rows.
      hiddens: tuple of ``[B, T, D_i]`` hidden states (one per model).
      unembeds: tuple of ``[D_i, V]`` unembeddings, same order.
      extras: pytree of ``[B, T, ...]`` per-token arrays (masks, ids, ...), or ``None``.
        Padded rows get zeros (``False`` for masks), so ``fn`` must give finite values there.
      chunk_size: ``C``, token rows per chunk at most (the ``B T`` rows are split evenly over
        the fewest chunks this allows, :func:`~opd_jax.losses.chunk_layout.balanced_chunk_size`).
      remat: recompute the chunk in the backward pass (``jax.checkpoint``); turn off only for
        functions that are never differentiated.

    Returns:
      The pytree returned by ``fn`` with leaves reshaped from ``[N, C, ...]`` to ``[B, T, ...]``.
    """
    checks.positive_int("chunk_size", chunk_size)
    if len(hiddens) != len(unembeds) or not hiddens:
        raise ValueError("hiddens and unembeds must be non-empty tuples of the same length")
    batch, time = hiddens[0].shape[:2]
    for h, w in zip(hiddens, unembeds):
        checks.check_head(h, w, "model")
        if h.shape[:2] != (batch, time):
            raise ValueError(f"all hiddens must share [B, T]; got {h.shape[:2]} vs {(batch, time)}")
    chunk_size = layout.balanced_chunk_size(batch * time, chunk_size)
    h_chunks = tuple(layout.to_chunks(h, chunk_size) for h in hiddens)
    e_chunks = jax.tree.map(lambda x: layout.to_chunks(x, chunk_size), extras)

    def body(xs):
        hs, ex = xs
        logits = tuple(engine.logits(h, w) for h, w in zip(hs, unembeds))
        return fn(*logits, ex)

    ys = _scan(body, (h_chunks, e_chunks), remat=remat)
    return jax.tree.map(lambda y: layout.from_chunks(y, batch, time), ys)


def chunked_student_logits_map(
    fn: Callable[..., Any],
    student_hidden: jax.Array,
    student_unembed: jax.Array,
    teacher_hidden: jax.Array | None = None,
    teacher_unembed: jax.Array | None = None,
    extras: Any = None,
    *,
    chunk_size: int = 512,
    where: jax.Array | None = None,
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
      student_hidden, student_unembed: ``[B, T, D]``, ``[D, V]`` (or a tied model's table as a
        :class:`~opd_jax.losses.unembedding.TiedUnembedding`: no transposed copy).
      teacher_hidden, teacher_unembed: ``[B, T, D']``, ``[D', V]`` (or tied), or both ``None``.
      extras: pytree of ``[B, T, ...]`` per-token arrays, or ``None`` (padded rows get zeros).
      chunk_size: token rows per chunk ``C``.
      where: ``[B, T]`` bool, or ``None``: the rows to compute. The others are never computed
        (chunks holding none of them are skipped in both passes, after a permutation that puts
        these rows first) and their outputs are zeros.

    Returns:
      The pytree returned by ``fn``, leaves ``[B, T, ...]``.
    """
    checks.check_head(student_hidden, student_unembed, "student")
    checks.positive_int("chunk_size", chunk_size)
    if (teacher_hidden is None) != (teacher_unembed is None):
        raise ValueError("teacher_hidden and teacher_unembed must be given together")
    if teacher_hidden is not None:
        checks.check_head(teacher_hidden, teacher_unembed, "teacher")
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

    loss = ChunkLoss(
        engine.DENSE_HEAD, loss_fn, None, (teacher_hidden, extras), loss_consts=teacher_unembed
    )
    return run_per_token(loss, student_hidden, student_unembed, chunk_size, where=where)

