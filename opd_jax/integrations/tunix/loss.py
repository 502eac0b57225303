"""The OPD loss of a tunix batch (pure JAX: no tunix needed): labels, the loss spec and
:func:`distillation_loss`, exactly the opd_jax trainer's per-chunk objective and reduction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from opd_jax import losses
from opd_jax.config.loss import LossSpec
from opd_jax.integrations.tunix.forward import HiddenAndUnembed
from opd_jax.train.objectives import make_chunk_fn

# Metrics of the opd_jax chunk function that need the sampler's log-probs (absent here).
_SAMPLER_METRICS = ("logprob_gap", "abs_logprob_gap")


def make_loss_spec(objective: str = "reverse_kl", *, top_k: int | None = None,
                   skew_alpha: float = 0.1, **fields: Any) -> LossSpec:
    """A validated :class:`~opd_jax.config.loss.LossSpec` (the trainer's ``loss:`` section).

    ``top_k`` defaults to ``None`` (full vocabulary). ``skew_alpha`` is ``LossSpec.alpha`` of
    the skew objectives (renamed here: ``alpha`` is the distillation/task weight of tunix's
    strategies). ``old_logprobs="sampler"`` is refused: tunix batches carry no sampler log-probs
    (the default, the learner's own detached log-probs, works).
    """
    alpha = skew_alpha if objective.startswith("skew_") else None
    spec = LossSpec(objective=objective, top_k=top_k, alpha=alpha, **fields)
    spec.validate()
    if spec.old_logprobs == "sampler":
        raise ValueError("old_logprobs='sampler' needs sampler log-probs, which tunix batches "
                         "do not carry; leave old_logprobs unset (the learner's own)")
    if spec.grpo_outcome_weight is not None:
        raise ValueError("grpo_outcome_weight grades sampled answers, which tunix batches do "
                         "not carry; leave it unset")
    return spec


def labels_to_tokens(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(tokens [B, T] int32, mask [B, T] bool)`` from tunix labels.

    Accepts tunix's convention -- one-hot ``[B, T, V]`` labels multiplied by the target mask
    (masked rows are all zero) -- or int ids ``[B, T]`` with negative ids masked (see
    :func:`next_token_labels`, which avoids a ``[B, T, V]`` label buffer). Masked tokens are 0.
    """
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.ndim != 2:
            raise ValueError(f"int labels must be [B, T] token ids, got shape {labels.shape}")
        mask = labels >= 0
        return jnp.where(mask, labels, 0).astype(jnp.int32), mask
    if labels.ndim != 3:
        raise ValueError(f"float labels must be one-hot [B, T, V], got shape {labels.shape}")
    mask = jnp.sum(labels, axis=-1) > 0
    return jnp.where(mask, jnp.argmax(labels, axis=-1), 0).astype(jnp.int32), mask


def next_token_labels(input_tokens: jax.Array, input_mask: jax.Array, **unused: Any) -> jax.Array:
    """A tunix ``labels_fn``: ``[B, T-1]`` int32 next-token ids, ``-1`` where masked.

    Aligned with :func:`forward_hidden` / :func:`forward_logits` (position ``t`` predicts token
    ``t + 1``); to train on completions only, pass an ``input_mask`` that is False on prompts.
    """
    del unused
    mask = jnp.asarray(input_mask)[:, 1:].astype(bool)
    return jnp.where(mask, jnp.asarray(input_tokens)[:, 1:], -1).astype(jnp.int32)


def task_logprobs(student_output, tokens, mask, chunk_size: int) -> jax.Array:
    """Student log-probs ``[B, T]`` of ``tokens`` (chunked from :class:`HiddenAndUnembed`)."""
    if isinstance(student_output, HiddenAndUnembed):
        return losses.chunked_token_logprobs(student_output.hidden, student_output.unembed,
                                             tokens, chunk_size=chunk_size, where=mask)
    return losses.token_logprobs(student_output, tokens, where=mask)


def distillation_loss(student_output: jax.Array | HiddenAndUnembed,
                      teacher_output: jax.Array | HiddenAndUnembed, labels: jax.Array, *,
                      spec: LossSpec, alpha: float = 1.0, metrics_k: int = 16
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""``(loss, metrics)`` of one batch: what ``OPDStrategy.compute_loss`` returns to tunix.

    .. math::
       L = \alpha\, \mathrm{reduce}_t\, \ell_t(S, T) + (1 - \alpha)\, \mathrm{token\_mean}_t
           \big(-\log S(x_t)\big)

    with :math:`\ell_t` the opd_jax trainer's per-token objective ``spec`` (the same function,
    :func:`opd_jax.train.objectives.make_chunk_fn`) and ``reduce`` = ``spec.reduction``.

    Args:
      student_output, teacher_output: ``[B, T, V]`` logits, or :class:`HiddenAndUnembed` (both the
        same kind; the chunked path never builds ``[B, T, V]``).
      labels: tunix one-hot ``[B, T, V]`` (masked rows zero) or int ``[B, T]`` (negative = masked).
      spec: from :func:`make_loss_spec`.
      alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy on labels.
      metrics_k: top-k of the mechanism metrics (0 = none).

    Returns:
      scalar loss and ``distill/*`` scalar metrics (token means over unmasked positions).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    chunked = isinstance(student_output, HiddenAndUnembed)
    if chunked != isinstance(teacher_output, HiddenAndUnembed):
        raise ValueError("student and teacher outputs must be of the same kind: both [B, T, V] "
                         "logits or both HiddenAndUnembed")
    tokens, mask = labels_to_tokens(labels)
    chunk_fn = make_chunk_fn(spec, metrics_k=max(metrics_k, 1), with_metrics=metrics_k > 0)
    extras = {"tokens": tokens, "mask": mask,
              "sampler_logprobs": jnp.zeros(tokens.shape, jnp.float32)}
    teacher_output = jax.lax.stop_gradient(teacher_output)
    if chunked:
        out = losses.chunked_logits_map(
            chunk_fn, (student_output.hidden, teacher_output.hidden),
            (student_output.unembed, teacher_output.unembed), extras,
            chunk_size=min(spec.chunk_size, tokens.size))
    else:
        out = chunk_fn(student_output, teacher_output, extras)
    distill = getattr(losses, spec.reduction)(out["loss"], mask)
    metrics = {"distill/loss": distill}
    total = distill
    if alpha < 1.0:
        task = -losses.token_mean(task_logprobs(student_output, tokens, mask, spec.chunk_size),
                                  mask)
        total = alpha * distill + (1.0 - alpha) * task
        metrics["distill/hard_loss"] = task
    for name, per_token in out.items():
        if name != "loss" and name not in _SAMPLER_METRICS:
            metrics[f"distill/{name}"] = losses.token_mean(jax.lax.stop_gradient(per_token), mask)
    return total, metrics
