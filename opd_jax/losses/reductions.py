r"""Reductions of an unreduced per-token loss ``x [..., T]`` with a mask ``where [..., T]``.

The last axis is time; every leading index is one sequence. Named after verl's
``loss_agg_mode`` (``verl/trainer/ppo/core_algos.py::agg_loss``), with :math:`m` the mask,
:math:`n_b = \sum_t m_{bt}` and :math:`\mathcal{B} = \{b : n_b > 0\}`:

========================  =========================  ==============================================
verl name                 function                   value
========================  =========================  ==============================================
token-mean                :func:`token_mean`         :math:`\sum_{bt} m x / \sum_{bt} m`
seq-mean-token-mean       :func:`sequence_mean`      :math:`\frac{1}{|\mathcal{B}|}\sum_{b\in\mathcal{B}} \frac{1}{n_b}\sum_t m x`
seq-mean-token-sum        :func:`sequence_sum_mean`  :math:`\frac{1}{|\mathcal{B}|}\sum_{b\in\mathcal{B}} \sum_t m x`
seq-mean-token-sum-norm   :func:`sequence_sum_norm`  :math:`\frac{1}{B\,H}\sum_{bt} m x` (Dr. GRPO)
========================  =========================  ==============================================

Differences from verl's literal code, on purpose: sequences with no valid token are left
out of the seq-mean averages (verl's ``torch.mean`` counts them, and ``seq-mean-token-mean``
gives NaN for them); ``seq-mean-token-sum-norm`` divides by the number of rows ``B`` as well as
the horizon ``H`` (verl divides a micro-batch's sum by ``H`` only and relies on its
gradient-accumulation scaling for the ``1/B``). Every reduction of an all-masked input is 0.
Masked entries are dropped with ``jnp.where``, so NaN/inf there never reaches the result.
"""  # noqa: E501 (the table's formulas)

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from opd_jax.losses import checks

Array = jax.Array

__all__ = [
    "REDUCTIONS",
    "sequence_mean",
    "sequence_sum_mean",
    "sequence_sum_norm",
    "sequence_sum_token_mean",
    "token_mean",
]


def _masked(x: Array, where: Array | None) -> tuple[Array, Array]:
    """``(x with masked entries 0, float mask)``, both of ``x``'s shape, float32 or wider."""
    x = jnp.asarray(x)
    if jnp.ndim(x) < 1:
        raise ValueError("x is a scalar; pass the unreduced per-token loss, shape [..., T]")
    x = x.astype(checks.compute_dtype(x))
    if where is None:
        return x, jnp.ones(x.shape, x.dtype)
    checks.check_where(where, x.shape)
    m = jnp.broadcast_to(jnp.asarray(where), x.shape)
    return jnp.where(m, x, 0.0), m.astype(x.dtype)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0 (finite gradients either way)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def token_mean(x: Array, where: Array | None = None) -> Array:
    r"""verl ``token-mean``: :math:`\sum_{b,t} m_{bt} x_{bt} / \sum_{b,t} m_{bt}` (0 if no token).

    Every valid token weighs the same, so long sequences weigh more.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [3.0, 9.0]])
    >>> print(token_mean(x, jnp.array([[True, True], [True, False]])))
    2.0
    """
    x, m = _masked(x, where)
    return _safe_div(jnp.sum(x), jnp.sum(m))


def sequence_sum_token_mean(x: Array, where: Array | None = None) -> Array:
    r"""Per-sequence sums, summed, divided by the total valid-token count.

    :math:`\sum_b (\sum_t m x) / \sum_{b,t} m` -- algebraically the same number as
    :func:`token_mean` (verl ``token-mean``); kept as a name for callers that think of it as
    "sum per sequence, normalise by tokens".

    >>> import jax.numpy as jnp
    >>> print(sequence_sum_token_mean(jnp.array([[1.0, 2.0], [3.0, 0.0]])))
    1.5
    """
    return token_mean(x, where)


def sequence_mean(x: Array, where: Array | None = None) -> Array:
    r"""verl ``seq-mean-token-mean``: mean over valid tokens of each sequence, then mean over
    the sequences that have at least one valid token (0 if none).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [3.0, 9.0], [5.0, 5.0]])
    >>> print(sequence_mean(x, jnp.array([[True, True], [True, False], [False, False]])))
    2.25
    """
    x, m = _masked(x, where)
    n_b = jnp.sum(m, axis=-1)
    per_seq = _safe_div(jnp.sum(x, axis=-1), n_b)
    has = (n_b > 0).astype(x.dtype)
    return _safe_div(jnp.sum(per_seq * has), jnp.sum(has))


def sequence_sum_mean(x: Array, where: Array | None = None) -> Array:
    r"""verl ``seq-mean-token-sum``: sum over valid tokens of each sequence, then mean over the
    sequences that have at least one valid token (0 if none).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [3.0, 9.0]])
    >>> print(sequence_sum_mean(x, jnp.array([[True, True], [True, False]])))
    3.0
    """
    x, m = _masked(x, where)
    n_b = jnp.sum(m, axis=-1)
    has = (n_b > 0).astype(x.dtype)
    return _safe_div(jnp.sum(x), jnp.sum(has))


def sequence_sum_norm(x: Array, where: Array | None = None, *, horizon: int | None = None) -> Array:
    r"""verl ``seq-mean-token-sum-norm`` (Dr. GRPO): :math:`\frac{1}{B H}\sum_{b,t} m x`.

    ``B`` is the number of sequences (all rows, constant) and ``H`` a constant horizon
    (``horizon``, default ``T = x.shape[-1]``, the padded length). Keep ``H`` fixed across steps
    (e.g. the max generation length) so the normaliser does not depend on the batch.

    References: Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO).

    >>> import jax.numpy as jnp
    >>> print(sequence_sum_norm(jnp.array([[1.0, 2.0], [3.0, 2.0]]), horizon=4))
    1.0
    """
    x, _ = _masked(x, where)
    h = x.shape[-1] if horizon is None else horizon
    if not h > 0:
        raise ValueError(f"horizon={horizon!r}; it must be > 0 (the max generation length)")
    rows = max(math.prod(x.shape[:-1]), 1)
    return jnp.sum(x) / (rows * h)


#: Reductions by verl ``loss_agg_mode`` name: ``fn(x [..., T], where [..., T]) -> scalar``.
REDUCTIONS: dict[str, Callable[..., Array]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": sequence_mean,
    "seq-mean-token-sum": sequence_sum_mean,
    "seq-mean-token-sum-norm": sequence_sum_norm,
}
