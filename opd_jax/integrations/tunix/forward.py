"""Forward functions for tunix decoders: hidden states + unembedding (:class:`HiddenAndUnembed`,
for the chunked losses, no ``[B, T, V]`` logits) or the model's own logits."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class HiddenAndUnembed(NamedTuple):
    """A forward output for memory-bounded losses: final-norm ``hidden`` ``[B, T, D]`` and the
    ``unembed`` ``[D, V]`` with ``logits = hidden @ unembed`` (a pytree: passes through
    ``nnx.jit`` and ``stop_gradient`` as is)."""

    hidden: jax.Array
    unembed: jax.Array


def _positions_and_mask(input_mask: jax.Array, positions, attention_mask):
    mask = jnp.asarray(input_mask).astype(bool)
    if positions is None:
        count = jnp.cumsum(mask, axis=-1)
        positions = count - (count >= 1)  # tunix.generate.utils.build_positions_from_mask
    if attention_mask is None:
        t = mask.shape[-1]
        attention_mask = mask[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
    return positions, attention_mask


def hidden_states(model: Any, input_tokens: jax.Array, positions: jax.Array,
                  attention_mask: jax.Array) -> jax.Array:
    """Final-norm hidden states ``[B, T, D]`` of a tunix decoder, without its ``[B, T, V]`` logits.

    Works for tunix models built as ``embedder`` -> ``layers`` -> ``final_norm`` (Qwen3, Qwen2,
    Llama3, Gemma3 text); ``attention_mask`` is tunix's ``[B, T, T]`` bool mask.
    """
    x = model.embedder.encode(input_tokens)
    for layer in model.layers:
        _, x = layer(x, positions, None, attention_mask)
    return model.final_norm(x)


def unembedding(model: Any) -> jax.Array:
    """The ``[D, V]`` unembedding of a tunix decoder (``lm_head`` or the tied embedding)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head.w[...]
    return model.embedder.input_embedding[...].T


def forward_hidden(model: Any, input_tokens: jax.Array, input_mask: jax.Array,
                   positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   **unused: Any) -> HiddenAndUnembed:
    """A tunix ``student_forward_fn`` / ``teacher_forward_fn`` for the chunked loss.

    Returns :class:`HiddenAndUnembed` at positions ``[0, T-1)`` (each predicting the next token,
    like tunix's examples that return ``logits[:, :-1]``). ``positions`` / ``attention_mask``
    default to tunix's left-padding-aware positions and causal mask from ``input_mask``.
    """
    del unused
    positions, attention_mask = _positions_and_mask(input_mask, positions, attention_mask)
    hidden = hidden_states(model, input_tokens, positions, attention_mask)
    return HiddenAndUnembed(hidden[:, :-1], unembedding(model))


def forward_logits(model: Any, input_tokens: jax.Array, input_mask: jax.Array,
                   positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   **unused: Any) -> jax.Array:
    """The dense counterpart of :func:`forward_hidden`: the model's own ``[B, T-1, V]`` logits."""
    del unused
    positions, attention_mask = _positions_and_mask(input_mask, positions, attention_mask)
    logits, _ = model(input_tokens, positions, None, attention_mask)
    return logits[:, :-1]
