"""Input checks for :mod:`opd_jax.losses` (dense, top-k and chunked forms alike).

Each helper raises :class:`ValueError` with a message that names the problem and the fix.
They only look at static information (shapes, dtypes, Python numbers), so they cost nothing
under :func:`jax.jit`; a value that is a tracer is left unchecked.  Positive ints (chunk sizes)
go through the package-wide :func:`opd_jax.checks.positive_int`.
"""

from __future__ import annotations

from typing import Any, Collection

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.checks import positive_int

__all__ = [
    "check_choice",
    "check_head",
    "check_logit_pair",
    "check_logits",
    "check_positive",
    "check_same_shape",
    "check_token_ids",
    "check_top_k",
    "check_unit_interval",
    "check_where",
    "compute_dtype",
    "positive_int",
    "static_float",
    "valid_mask",
]


def static_float(value: Any) -> float | None:
    """``float(value)`` when ``value`` is a concrete number, ``None`` when it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 for low-precision inputs (bf16, f16, ints); float64 stays float64."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def check_logits(name: str, logits: jax.Array) -> None:
    """``logits`` must be a floating array with a trailing vocabulary axis."""
    if jnp.ndim(logits) < 1:
        raise ValueError(
            f"{name} is a scalar; pass logits with a trailing vocabulary axis, shape [..., V]"
        )
    if not jnp.issubdtype(jnp.asarray(logits).dtype, jnp.floating):
        raise ValueError(
            f"{name} has dtype {jnp.asarray(logits).dtype}; pass floating-point logits "
            "(token ids go to token_logprobs)"
        )


def check_logit_pair(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
    """Student and teacher logits must share the vocabulary and the per-token shape."""
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
    if s_shape[-1] != t_shape[-1]:
        raise ValueError(
            f"student_logits has V={s_shape[-1]}, teacher_logits has V={t_shape[-1]}; "
            "token-level losses need a shared vocabulary (map or pad the teacher's vocabulary "
            "onto the student's, padding with -inf logits)"
        )
    if s_shape != t_shape:
        raise ValueError(
            f"student_logits has shape {s_shape}, teacher_logits has shape {t_shape}; "
            "score the same token positions with both models (same [..., V] shape)"
        )


def check_same_shape(**arrays: jax.Array) -> None:
    """All named arrays must have one shape (e.g. per-token log-probs and advantages)."""
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; pass per-token arrays of one shape")


def check_where(where: jax.Array | None, token_shape: tuple[int, ...]) -> None:
    """``where`` must be boolean and broadcast to the per-token shape ``token_shape``."""
    if where is None:
        return
    dtype = jnp.asarray(where).dtype
    if dtype != jnp.bool_:
        raise ValueError(
            f"where has dtype {dtype}; pass a boolean per-token mask (e.g. `mask == 1`)"
        )
    try:
        out = np.broadcast_shapes(jnp.shape(where), tuple(token_shape))
    except ValueError:
        out = None
    if out != tuple(token_shape):
        raise ValueError(
            f"where has shape {jnp.shape(where)}, which does not broadcast to the per-token "
            f"shape {tuple(token_shape)}; pass one flag per token (logits [..., V] -> where [...])"
        )


def check_positive(name: str, value: Any) -> None:
    """A concrete ``value`` must be > 0 (e.g. a temperature)."""
    v = static_float(value)
    if v is not None and not v > 0:
        raise ValueError(f"{name}={value!r}; it must be > 0 (use 1.0 for no scaling)")


def check_unit_interval(name: str, value: Any) -> None:
    """A concrete ``value`` must lie in [0, 1] (a mixture weight)."""
    v = static_float(value)
    if v is not None and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={value!r}; it must lie in [0, 1]")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """``value`` must be one of the registered names ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {sorted(choices)}")


def check_top_k(k: Any, vocab: int) -> None:
    """``k`` must be a Python int with 1 <= k <= V (a static shape)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k={k!r}; pass a Python int (it fixes the static support size)")
    if not 1 <= int(k) <= vocab:
        raise ValueError(f"k={k} with V={vocab}; it must satisfy 1 <= k <= V")


def check_token_ids(logits: jax.Array, tokens: jax.Array) -> None:
    """``tokens`` must be integer ids with shape ``logits.shape[:-1]``."""
    if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
        raise ValueError(f"tokens has dtype {jnp.asarray(tokens).dtype}; pass integer token ids")
    if jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"tokens has shape {jnp.shape(tokens)}, logits has shape {jnp.shape(logits)}; "
            "tokens must have the logits' shape without the vocabulary axis"
        )


# --------------------------------------------------------------------------------------------
# chunked forms: hidden states [B, T, D] and an unembedding [D, V]
# --------------------------------------------------------------------------------------------


def check_head(hidden: jax.Array, unembed: jax.Array, who: str) -> None:
    """``hidden [B, T, D]`` and ``unembed [D, V]`` of one model (``who`` names it)."""
    if hidden.ndim != 3:
        raise ValueError(f"{who} hidden must be [B, T, D], got shape {hidden.shape}")
    if unembed.ndim != 2:
        raise ValueError(f"{who} unembed must be [D, V], got shape {unembed.shape}")
    if hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"{who} hidden width {hidden.shape[-1]} does not match unembed rows {unembed.shape[0]}"
        )


def valid_mask(where: jax.Array | None, batch: int, time: int) -> jax.Array:
    """``where`` as a ``[B, T]`` bool mask (all True when ``None``)."""
    if where is None:
        return jnp.ones((batch, time), dtype=bool)
    if where.shape != (batch, time):
        raise ValueError(f"where must be [B, T] = {(batch, time)}, got shape {where.shape}")
    return where.astype(bool)
