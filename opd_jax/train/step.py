"""The jitted training step: student + teacher forward, chunked loss, update, metrics.

Alignment: a row is ``[left-padded prompt (P) | completion (N)]`` (or, packed, several sequences
per row: :func:`completion_hidden` gathers each completion token's predicting hidden state back
into ``[B, N, D]`` and everything after is the same). The logits at position ``t``
score token ``t + 1``, so completion token ``j`` is predicted by the hidden state at
``P - 1 + j``: the step slices ``hidden[:, P-1 : P-1+N]`` for the student (and likewise for the
teacher with its own prompt length, which differs for OPSD's privileged context) and compares it
with ``completion[:, j]`` under ``mask[:, j]``. ``[B, T, V]`` logits never exist: the loss runs
chunk by chunk over tokens (``chunked_student_logits_map``, a custom VJP that recomputes each
chunk's logits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from opd_jax import losses
from opd_jax.losses.chunk_map import chunked_student_logits_map
from opd_jax.metrics import intersection_means, per_position
from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.train.batch import PackedRows, RolloutBatch
from opd_jax.train.placement import map_rows_per_device, replicate_embedding, teacher_scope
from opd_jax.train.state import StudentSpec, TrainState

CURVE_KEYS = ("overlap", "token_reverse_kl", "student_entropy", "teacher_entropy")
#: metrics logged per teacher when several score a batch (``TeacherSpec.routes``)
ROUTE_KEYS = ("overlap", "token_reverse_kl", "student_token_logprob", "teacher_token_logprob",
              "student_shared_mass", "teacher_shared_mass", "teacher_query_miss")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """How the teacher runs. ``mode``: "separate" (own config/params), "student_fixed" (the
    student's architecture with frozen trainable weights given as the teacher argument: OPSD's
    fixed teacher), "student_ema" (``state.ema``), "student_live" (the current student weights,
    stop-gradient), "scores" (a served or cached teacher: the batch's ``teacher_scores`` stand in
    for its logits, see :func:`opd_jax.train.objectives.with_teacher_scores`) or "none" (no
    teacher: SFT objectives; the student's own outputs stand in).
    ``rules``: the teacher's own rules table (``opd_jax.sharding.rules_key`` form) for the
    activation constraints of a separate teacher on the active mesh; ``None`` = the student's.
    ``routes``: the names of several teachers (``teachers:``, mode "scores"): the batch's
    ``teacher_route`` says which scored each row, and each gets its own metrics
    (``<name>/<metric>``, :data:`ROUTE_KEYS`)."""

    mode: str = "separate"
    config: ModelConfig | None = None
    rules: tuple | None = None
    routes: tuple[str, ...] = ()

    def __post_init__(self):
        modes = ("separate", "student_fixed", "student_ema", "student_live", "scores", "none")
        if self.mode not in modes:
            raise ValueError(f"unknown teacher mode {self.mode!r}; expected one of {modes}")


def _completion_slice(hidden_BxTxD, n):
    p = hidden_BxTxD.shape[1] - n
    return jax.lax.slice_in_dim(hidden_BxTxD, p - 1, p - 1 + n, axis=1)


def completion_hidden(hidden_fn: Callable, tokens, valid, packed: PackedRows | None, n: int):
    """Hidden states predicting the ``n`` completion tokens ``[B, N, D]``: the padded rows'
    slice, or ``hidden[gather]`` of the packed rows (``hidden_fn(tokens, valid, positions,
    segments)`` runs the model)."""
    if packed is None:
        return _completion_slice(hidden_fn(tokens, valid, None, None), n)
    G, M, R = packed.tokens.shape
    rows = lambda x: x.reshape(G * M, R)
    h = hidden_fn(rows(packed.tokens), rows(packed.valid), rows(packed.positions),
                  rows(packed.segments))
    h = h.reshape(G, M * R, h.shape[-1])
    idx = packed.gather.reshape(G, -1)                              # [G, B/G * N]
    out = jnp.take_along_axis(h, idx[..., None], axis=1)            # [G, B/G * N, D]
    return out.reshape(-1, n, out.shape[-1])


def teacher_hidden_and_unembed(teacher: TeacherSpec, student: StudentSpec, teacher_args: Any,
                               trainable: Any, frozen: Any, batch: RolloutBatch,
                               hidden: jax.Array | None = None):
    """Teacher hidden states at the completion positions ``[B, N, D']`` and its unembedding;
    ``hidden`` given (the same states, e.g. from the teacher's sampler): no forward."""
    n = batch.completion.shape[1]
    if teacher.mode in ("none", "scores"):
        return None, None
    if teacher.mode == "separate":
        def run(tokens, valid, positions, segments):
            with teacher_scope(teacher.rules):
                return decoder.forward(teacher_args, teacher.config, tokens, positions,
                                       valid_BxT=valid, segment_ids_BxT=segments,
                                       differentiable=False)[0]
        w = decoder.loss_unembedding(teacher_args, teacher.config)
    else:
        weights = trainable if teacher.mode == "student_live" else teacher_args
        weights = jax.lax.stop_gradient(weights)
        run = functools.partial(student.hidden, weights, frozen)
        w = student.unembed(weights, frozen)
    h = hidden if hidden is not None else completion_hidden(
        run, batch.teacher_tokens, batch.teacher_valid, batch.teacher_packed, n)
    return jax.lax.stop_gradient(h), jax.lax.stop_gradient(w)


def loss_and_metrics(trainable, frozen, teacher_args, batch: RolloutBatch, *,
                     student: StudentSpec, teacher: TeacherSpec, chunk_fn: Callable,
                     reduction: Callable, chunk_size: int, student_hidden: jax.Array | None = None,
                     teacher_hidden: jax.Array | None = None):
    """Scalar loss and per-token outputs (``[B, N]`` each) of one (micro-)batch.

    ``student_hidden`` / ``teacher_hidden`` (``[B, N, D]``, scoring only): that model's hidden
    states at the completion positions when they are already known (a sampler's
    ``return_hidden`` on its own samples), so its forward is skipped; the loss then has no
    gradient through the student's layers."""
    n = batch.completion.shape[1]
    # on a mesh: look tokens up in a gathered table (no [B, T, D] gathers across the batch)
    trainable, frozen, teacher_args = map(replicate_embedding, (trainable, frozen, teacher_args))
    hs = student_hidden if student_hidden is not None else completion_hidden(
        functools.partial(student.hidden, trainable, frozen), batch.student_tokens,
        batch.student_valid, batch.student_packed, n)
    ws = student.unembed(trainable, frozen)
    ht, wt = teacher_hidden_and_unembed(teacher, student, teacher_args, trainable, frozen, batch,
                                        teacher_hidden)
    extras = {"tokens": batch.completion, "mask": batch.mask,
              "sampler_logprobs": batch.sampler_logprobs}
    if batch.outcome_advantage is not None:
        extras["outcome_advantage"] = batch.outcome_advantage
    if batch.teacher_scores is not None:
        extras["teacher_scores"] = batch.teacher_scores

    def per_device(rows_, shared):
        hs_, ht_, extras_ = rows_
        rows = hs_.shape[0] * n  # a chunk longer than the input would only add padding
        # lean custom VJP: no second [D, V] buffer in the backward pass, metrics free in
        # backward; teacher None (SFT) skips the teacher's logits entirely; the completions'
        # padding (masked: every output 0 there) goes behind the real tokens, and its chunks
        # are skipped
        return chunked_student_logits_map(chunk_fn, hs_, shared[0], ht_, shared[1], extras_,
                                          chunk_size=min(chunk_size, rows),
                                          where=extras_["mask"])

    # on a mesh each device runs the chunks of its own rows (no gather of every row's tokens)
    out = map_rows_per_device(per_device, (hs, ht, extras), (ws, wt))
    return reduction(out["loss"], batch.mask), out


def _split(batch: RolloutBatch, parts: int) -> RolloutBatch:
    def split(x):
        if x.shape[0] % parts:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {parts} "
                             "grad_accum_steps micro-batches; make batch rows a multiple")
        return x.reshape(parts, x.shape[0] // parts, *x.shape[1:])
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: RolloutBatch, frozen, teacher_args, *,
               student: StudentSpec, teacher: TeacherSpec, optimizer: optax.GradientTransformation,
               chunk_fn: Callable, reduction: Callable, chunk_size: int, grad_accum: int = 1,
               ema_decay: float | None = None):
    """One optimizer step over ``grad_accum`` micro-batches; returns ``(state, metrics)``.

    A non-finite loss or gradient skips the update (params and optimizer state unchanged) and
    increments ``state.skipped``. Metrics are token means over the completion mask, plus
    per-position curves for ``CURVE_KEYS``.
    """
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    kw = dict(student=student, teacher=teacher, chunk_fn=chunk_fn, reduction=reduction,
              chunk_size=chunk_size)
    micro = _split(batch, grad_accum)

    if teacher.mode == "student_ema":
        teacher_args = state.ema

    def micro_grads(mb):
        (loss, out), g = grad_fn(state.trainable, frozen, teacher_args, mb, **kw)
        route = (mb.teacher_route if mb.teacher_route is not None
                 else jnp.zeros(mb.mask.shape[:1], jnp.int32))
        return loss, g, (out, mb.mask, route)

    def accumulate(carry, mb):
        g_sum, l_sum = carry
        loss, g, outputs = micro_grads(mb)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss), outputs

    if grad_accum == 1:   # no accumulator: one gradient-sized buffer fewer
        loss, grads, outputs = micro_grads(batch)
        outs, masks, routes = jax.tree.map(lambda x: x[None], outputs)
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, loss_sum), (outs, masks, routes) = jax.lax.scan(accumulate, (zeros, 0.0), micro)
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        loss = loss_sum / grad_accum

    # the global norm is finite iff every gradient entry is (or the squares overflow float32, a
    # gradient no update should take): one pass over the gradients serves the check and the metric
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(args):
        grads, opt_state, trainable = args
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), new_opt

    # a skipped update is a branch not taken, not a select between the new and the old state
    # (which keeps both alive; with the scan above removed: 2.61 -> 2.51 GB of temporaries on
    # make demo's step)
    new_trainable, new_opt = jax.lax.cond(ok, update, lambda args: (args[2], args[1]),
                                          (grads, state.opt_state, state.trainable))
    new_ema = state.ema
    if ema_decay is not None and state.ema is not None:
        new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema,
                               new_trainable)
    new_state = state.replace(step=state.step + 1, trainable=new_trainable, opt_state=new_opt,
                              skipped=state.skipped + (~ok).astype(jnp.int32), ema=new_ema)

    flat = lambda x: x.reshape(-1, *x.shape[2:])
    outs, mask = jax.tree.map(flat, outs), flat(masks)
    metrics = {k: losses.token_mean(v, mask) for k, v in outs.items() if k != "loss"}
    metrics.update(intersection_means(metrics))  # the paper's shared mass: intersecting positions
    metrics.update(loss=loss, grad_norm=grad_norm, skipped=new_state.skipped,
                   update_ok=ok, completion_tokens=mask.sum(),
                   completion_len=mask.sum(axis=1).astype(jnp.float32).mean())
    route = routes.reshape(-1)
    for i, name in enumerate(teacher.routes):   # several teachers: each one's own metrics
        mine = mask & (route == i)[:, None]
        metrics[f"{name}/completion_tokens"] = mine.sum()
        metrics.update({f"{name}/{k}": losses.token_mean(outs[k], mine) for k in ROUTE_KEYS
                        if k in outs})
    curves = {k: per_position(outs[k], mask) for k in CURVE_KEYS if k in outs}
    return new_state, {"scalars": metrics, "curves": curves}


def make_train_step(*, student: StudentSpec, teacher: TeacherSpec,
                    optimizer: optax.GradientTransformation, chunk_fn: Callable,
                    reduction: Callable, chunk_size: int, grad_accum: int = 1,
                    ema_decay: float | None = None, shardings: dict | None = None,
                    compiler_options: dict | None = None):
    """``train_step`` jitted once with the static parts bound and the state donated.

    ``compiler_options``: XLA options of the compiled step (``jax.jit``'s), e.g. the CPU
    scheduler's (``opd_jax.compile_options.jit_compiler_options``).

    ``shardings`` (optional): ``{"state": ..., "batch": ..., "frozen": ..., "teacher": ...}``
    explicit input shardings for a mesh run; outputs keep the state's sharding.
    """
    fn = functools.partial(train_step, student=student, teacher=teacher, optimizer=optimizer,
                           chunk_fn=chunk_fn, reduction=reduction, chunk_size=chunk_size,
                           grad_accum=grad_accum, ema_decay=ema_decay)
    if shardings is None:
        return jax.jit(fn, donate_argnums=(0,), compiler_options=compiler_options)
    s = shardings
    return jax.jit(fn, donate_argnums=(0,), compiler_options=compiler_options,
                   in_shardings=(s["state"], s["batch"], s["frozen"], s["teacher"]),
                   out_shardings=(s["state"], None))
