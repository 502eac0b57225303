"""Train state, optimizer and the student/teacher application functions.

The state holds only what the optimizer owns (big_vision distill style): the student's trainable
parameters (full weights, or LoRA adapters over frozen base weights), the optimizer state, the
step, the rng and a count of skipped non-finite updates. The teacher is a frozen argument: it never
enters the optimizer state or the checkpoint. OPSD's EMA teacher is the one exception that must be
checkpointed to resume exactly, so it lives in ``ema`` (``None`` otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from opd_jax.config.schema import OptimSpec
from opd_jax.losses.unembedding import Unembedding
from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.model.dtypes import cast_floating


@flax.struct.dataclass
class TrainState:
    """``step`` int32; ``trainable`` params or LoRA weights; ``opt_state``; ``rng`` uint32 key data;
    ``skipped`` updates dropped for a non-finite loss/gradient; ``ema`` EMA of ``trainable`` or None."""

    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    ema: Any = None


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """Static description of how the student runs: its config, LoRA scale (``None`` = full
    fine-tuning, ``trainable`` is the whole parameter tree), remat policy and ``compute_dtype``
    (``None`` = the parameters' own; ``"bfloat16"`` over float32 parameters is mixed precision:
    every use of the weights -- forward, unembedding, sampling -- casts them, so matmuls and
    activations run in bfloat16 while the gradients, the optimizer and the master weights stay
    float32; norms, softmax, RoPE and losses compute in float32 inside the model and losses)."""

    config: ModelConfig
    lora_scale: float | None = None
    remat: str = "none"
    compute_dtype: str | None = None

    def params_and_lora(self, trainable, frozen, cast: bool = True):
        """``(params, lora)`` as the model runs them (cast to ``compute_dtype``; ``cast=False``:
        as stored, for ``decoder.forward(compute_dtype=)`` to cast)."""
        if self.compute_dtype is not None and cast:
            dtype = jnp.dtype(self.compute_dtype)
            trainable, frozen = cast_floating(trainable, dtype), cast_floating(frozen, dtype)
        if self.lora_scale is None:
            return trainable, None
        return frozen, decoder.Lora(weights=trainable, scale=self.lora_scale)

    def hidden(self, trainable, frozen, tokens_BxT, valid_BxT, positions_BxT=None,
               segment_ids_BxT=None):
        """Final hidden states ``[B, T, D]``; packed rows pass their positions and segments."""
        params, lora = self.params_and_lora(trainable, frozen, cast=False)
        h, _ = decoder.forward(params, self.config, tokens_BxT, positions_BxT, valid_BxT=valid_BxT,
                               lora=lora, remat=self.remat, segment_ids_BxT=segment_ids_BxT,
                               compute_dtype=self.compute_dtype)
        return h

    def unembed(self, trainable, frozen) -> Unembedding:
        """The unembedding the losses read; under mixed precision the float32 table itself (the
        losses take bfloat16 products of it, ``losses.unembedding.product_dtype``, and return
        its gradient in float32 without a bfloat16 round trip)."""
        params, _ = self.params_and_lora(trainable, frozen, cast=False)
        return decoder.loss_unembedding(params, self.config)


def make_schedule(spec: OptimSpec, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``lr`` then constant / cosine / linear decay to ``lr·final_lr_ratio``."""
    decay_steps = max(total_steps - spec.warmup_steps, 1)
    end = spec.lr * spec.final_lr_ratio
    if spec.schedule == "constant":
        main = optax.constant_schedule(spec.lr)
    elif spec.schedule == "cosine":
        main = optax.cosine_decay_schedule(spec.lr, decay_steps, alpha=spec.final_lr_ratio)
    else:
        main = optax.linear_schedule(spec.lr, end, decay_steps)
    if spec.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, spec.lr, spec.warmup_steps)
    return optax.join_schedules([warm, main], [spec.warmup_steps])


def make_optimizer(spec: OptimSpec, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping (global norm) followed by AdamW / Adam / SGD on the schedule (Adam's
    first moment stored in ``spec.mu_dtype`` when set)."""
    lr = make_schedule(spec, total_steps)
    mu_dtype = None if spec.mu_dtype is None else jnp.dtype(spec.mu_dtype)
    if spec.optimizer == "adamw":
        opt = optax.adamw(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps, mu_dtype=mu_dtype,
                          weight_decay=spec.weight_decay)
    elif spec.optimizer == "adam":
        opt = optax.adam(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps, mu_dtype=mu_dtype)
    else:
        opt = optax.sgd(lr, momentum=spec.b1 or None)
    if spec.grad_clip_norm is not None:
        opt = optax.chain(clip_by_global_norm(spec.grad_clip_norm), opt)
    return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``g · min(1, max_norm / ||g||)``: optax's ``clip_by_global_norm`` (same state, same
    values to float32 rounding) as one multiply by a scalar.

    optax writes ``(g / ||g||) · max_norm`` under a select; XLA counts a divide as expensive and
    will not repeat it inside each consumer, so the clipped gradients were materialised, a second
    gradient-sized buffer beside the gradients a step holds anyway (``make demo``'s step: 0.92 →
    0.68 GiB of temporaries, ``memory_analysis``). A multiply fuses into Adam's moment updates.
    A zero norm gives ``max_norm / 0 = inf`` and a factor of 1; a non-finite norm a non-finite
    factor (the train step skips such an update).
    """
    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_state(trainable, optimizer: optax.GradientTransformation, seed: int,
               with_ema: bool = False) -> TrainState:
    """A fresh state at step 0 (``ema`` starts as a copy of ``trainable`` when requested).

    ``trainable`` is copied: the jitted step donates the state, and must not delete the caller's
    arrays (e.g. the initial weights an OPSD fixed teacher keeps using).
    """
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=optimizer.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      skipped=jnp.zeros((), jnp.int32),
                      ema=jax.tree.map(jnp.copy, trainable) if with_ema else None)
