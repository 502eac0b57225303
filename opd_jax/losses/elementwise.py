r"""Element-level building blocks shared by every token-level divergence.

* :func:`normalized_logprobs` -- ``log_softmax(logits / temperature)`` in float32 with masked
  rows replaced before the softmax; :func:`mask_tokens` -- exact zeros at masked positions.
* :func:`vocab_sum` -- the sum over the last axis, as a matrix-vector product on the CPU, and
  :func:`logsumexp` / :func:`log_softmax` built on it (the latter forward and backward).
* ``*_terms(student_logp, teacher_logp)`` -> ``[..., V]``: the per-vocabulary summands of a
  divergence from normalised log-probs (``0 * log 0 = 0`` with zero gradient), and
  :func:`sum_terms`, the vocabulary sum with OPSD's point-wise clip.

They work on any last axis: the full vocabulary, a top-k support (``[..., M]``) or a support
plus a tail bucket (``[..., M+1]``), which is how the dense, chunked and top-k paths share one
implementation. Re-exported by :mod:`opd_jax.losses.divergences`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.losses import checks

Array = jax.Array

__all__ = [
    "forward_kl_terms",
    "generalized_jsd_terms",
    "kl_terms",
    "log_softmax",
    "logsumexp",
    "mask_tokens",
    "mixture_logprobs",
    "normalized_logprobs",
    "reverse_kl_terms",
    "skew_forward_kl_terms",
    "skew_reverse_kl_terms",
    "sum_terms",
    "vocab_sum",
]


# ------------------------------------------------------------------------------------------
# shared building blocks
# ------------------------------------------------------------------------------------------


def _wide(x: Array) -> Array:
    """float32 for bf16 / f16 inputs (no-op for float32 / float64)."""
    x = jnp.asarray(x)
    return x.astype(checks.compute_dtype(x))


def vocab_sum(x_xV: Array) -> Array:
    r""":math:`\sum_v x_v` over the last axis (``[..., V]`` -> ``[...]``), in ``x``'s dtype.

    On the CPU it is the product ``x @ 1`` with a ones column. XLA CPU fuses a reduction with
    the elementwise work that produces its input (an ``exp``, a product of two ``[C, V]``
    arrays) and runs that fusion at a fraction of the machine's speed, where a matrix-vector
    product reads the same input in parallel: ``sum(exp(s - m) * (s - t))`` over a
    ``[512, 49152]`` chunk takes 62 ms as a reduction and 17 ms as a product (BUILD_NOTES
    "Session 22"). Same value up to the order of the float sums; other backends reduce.
    """
    x_xV = jnp.asarray(x_xV)
    if jax.default_backend() != "cpu" or x_xV.ndim == 0:
        return jnp.sum(x_xV, axis=-1)
    ones_Vx1 = jnp.ones((x_xV.shape[-1], 1), x_xV.dtype)
    out = jax.lax.dot_general(x_xV, ones_Vx1, (((x_xV.ndim - 1,), (0,)), ((), ())),
                              precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=x_xV.dtype)
    return out[..., 0]


def logsumexp(x_xV: Array) -> Array:
    r""":math:`\log \sum_v e^{x_v}` over the last axis (``[..., V]`` -> ``[...]``), the sum taken
    by :func:`vocab_sum`. A row of ``-inf`` gives ``-inf`` (as ``jax.nn.logsumexp``). Not for
    differentiation through rows holding ``+inf``."""
    m = jax.lax.stop_gradient(jnp.max(x_xV, axis=-1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(vocab_sum(jnp.exp(x_xV - m[..., None])))


@jax.custom_vjp
def log_softmax(x_xV: Array) -> Array:
    r""":math:`\log \mathrm{softmax}(x)` over the last axis, as ``jax.nn.log_softmax``, with its
    vocabulary sums taken by :func:`vocab_sum`, forward and backward
    (:math:`\partial x = g - \mathrm{softmax}(x) \sum_v g_v`)."""
    shifted = x_xV - jax.lax.stop_gradient(jnp.max(x_xV, axis=-1, keepdims=True))
    return shifted - jnp.log(vocab_sum(jnp.exp(shifted)))[..., None]


def _log_softmax_fwd(x_xV):
    logp = log_softmax(x_xV)
    return logp, logp


def _log_softmax_bwd(logp_xV, g_xV):
    return (g_xV - jnp.exp(logp_xV) * vocab_sum(g_xV)[..., None],)


log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def normalized_logprobs(
    logits: Array, *, temperature: float | Array = 1.0, where: Array | None = None
) -> Array:
    r"""``log_softmax(logits / temperature)`` in float32 (float64 stays float64).

    Rows where ``where`` is False are replaced by zeros *before* the softmax (the double-where
    trick), so padding rows full of ``-inf`` or NaN cannot leak NaN into values or gradients.

    Args:
      logits: ``[..., V]`` any float dtype.
      temperature: scalar > 0 dividing the logits.
      where: optional bool ``[...]`` (broadcastable), True for positions to keep.

    Returns:
      ``[..., V]`` normalised log-probs.

    >>> import jax.numpy as jnp
    >>> print(jnp.exp(normalized_logprobs(jnp.array([0.0, jnp.log(3.0)]))))
    [0.25 0.75]
    """
    x = jnp.asarray(logits)
    x = x.astype(checks.compute_dtype(x))
    if where is not None:
        x = jnp.where(jnp.asarray(where)[..., None], x, 0.0)
    return log_softmax(x / temperature)


def mask_tokens(x: Array, where: Array | None) -> Array:
    """``x`` where ``where`` is True, exactly 0 elsewhere (zero gradient there too)."""
    if where is None:
        return x
    return jnp.where(where, x, jnp.zeros((), x.dtype))


def kl_terms(logp: Array, logq: Array) -> Array:
    r"""Element terms of :math:`\mathrm{KL}(P\|Q)`: :math:`p_v(\log p_v - \log q_v)`, 0 where p=0.

    Both inputs are replaced by 0 where :math:`p_v = 0` before the arithmetic, so ``-inf`` entries
    give a 0 term with a zero (not NaN) gradient. ``q_v = 0 < p_v`` gives ``+inf`` (the true KL).

    Args:
      logp: ``[..., V]`` log-probs of P.
      logq: ``[..., V]`` log-probs of Q.

    Returns:
      ``[..., V]`` element terms; their sum over V is :math:`\mathrm{KL}(P\|Q) \ge 0`.

    >>> import jax.numpy as jnp
    >>> print(kl_terms(jnp.log(jnp.array([1.0, 0.0])), jnp.log(jnp.array([0.5, 0.5]))))
    [0.6931472 0.       ]
    """
    logp, logq = _wide(logp), _wide(logq)
    live = logp > -jnp.inf
    lp = jnp.where(live, logp, 0.0)
    lq = jnp.where(live, logq, 0.0)
    return jnp.where(live, jnp.exp(lp) * (lp - lq), 0.0)


def mixture_logprobs(logp: Array, logq: Array, weight_p: float | Array) -> Array:
    r""":math:`\log(w\,p + (1-w)\,q)` elementwise from log-probs, stable and NaN-free.

    Where both ``p`` and ``q`` are 0 the result is ``-inf`` with zero gradient. ``weight_p`` in
    [0, 1].
    """
    logp, logq = _wide(logp), _wide(logq)
    dead = (logp == -jnp.inf) & (logq == -jnp.inf)
    lp = jnp.where(dead, 0.0, logp)
    lq = jnp.where(dead, 0.0, logq)
    mix = jnp.logaddexp(lp + jnp.log(weight_p), lq + jnp.log1p(-weight_p))
    return jnp.where(dead, -jnp.inf, mix)


def sum_terms(terms: Array, pointwise_clip: float | None = None) -> Array:
    r""":math:`\sum_v \min(\text{term}_v, c)` over the last axis (no clip when ``c`` is None).

    The point-wise clip of OPSD (siyan-zhao/OPSD, ``jsd_token_clip``): each vocabulary
    element's term is capped at ``c`` before the sum, so a few tokens cannot dominate. KL
    element terms are negative where :math:`p_v < q_v`, so a clipped sum can be below 0.
    """
    if pointwise_clip is not None:
        terms = jnp.minimum(terms, pointwise_clip)
    return vocab_sum(terms)


# ------------------------------------------------------------------------------------------
# element terms [..., V] from normalised log-probs
# ------------------------------------------------------------------------------------------


def forward_kl_terms(student_logp: Array, teacher_logp: Array) -> Array:
    r"""Element terms of :math:`\mathrm{KL}(T\|S)`: :math:`T_v(\log T_v - \log S_v)`."""
    return kl_terms(teacher_logp, student_logp)


def reverse_kl_terms(student_logp: Array, teacher_logp: Array) -> Array:
    r"""Element terms of :math:`\mathrm{KL}(S\|T)`: :math:`S_v(\log S_v - \log T_v)`."""
    return kl_terms(student_logp, teacher_logp)


def _jsd_interior_terms(student_logp: Array, teacher_logp: Array, beta: Any) -> Array:
    log_m = mixture_logprobs(teacher_logp, student_logp, beta)  # M = beta T + (1-beta) S
    return beta * kl_terms(teacher_logp, log_m) + (1.0 - beta) * kl_terms(student_logp, log_m)


def generalized_jsd_terms(
    student_logp: Array, teacher_logp: Array, beta: float | Array = 0.5
) -> Array:
    r"""Element terms of the generalized JSD (GKD / TRL convention).

    .. math::
       M = (1-\beta) S + \beta T, \qquad
       \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(T\|M) + (1-\beta)\,\mathrm{KL}(S\|M)

    with the endpoints defined as in TRL: :math:`\beta=0` is exactly :math:`\mathrm{KL}(T\|S)`,
    :math:`\beta=1` exactly :math:`\mathrm{KL}(S\|T)`. A Python ``beta`` picks the branch at
    trace time; a traced ``beta`` computes all three and selects (3x the work).
    """
    b = checks.static_float(beta)
    if b is not None:
        checks.check_unit_interval("beta", b)
        if b == 0.0:
            return forward_kl_terms(student_logp, teacher_logp)
        if b == 1.0:
            return reverse_kl_terms(student_logp, teacher_logp)
        return _jsd_interior_terms(student_logp, teacher_logp, b)
    beta = jnp.asarray(beta, student_logp.dtype)
    at_end = (beta == 0.0) | (beta == 1.0)
    interior = _jsd_interior_terms(student_logp, teacher_logp, jnp.where(at_end, 0.5, beta))
    fkl = forward_kl_terms(student_logp, teacher_logp)
    rkl = reverse_kl_terms(student_logp, teacher_logp)
    return jnp.where(beta == 0.0, fkl, jnp.where(beta == 1.0, rkl, interior))


def _skew_kl_terms(logp: Array, logq: Array, alpha: float | Array) -> Array:
    r"""Element terms of :math:`\mathrm{KL}(P \| \alpha P + (1-\alpha) Q)`; a static
    :math:`\alpha = 0` is exactly :math:`\mathrm{KL}(P\|Q)`."""
    a = checks.static_float(alpha)
    if a is not None:
        checks.check_unit_interval("alpha", a)
        if a == 0.0:
            return kl_terms(logp, logq)
    return kl_terms(logp, mixture_logprobs(logp, logq, alpha))


def skew_forward_kl_terms(
    student_logp: Array, teacher_logp: Array, alpha: float | Array = 0.1
) -> Array:
    r"""Element terms of :math:`\mathrm{KL}(T \| \alpha T + (1-\alpha) S)` (DistiLLM)."""
    return _skew_kl_terms(teacher_logp, student_logp, alpha)


def skew_reverse_kl_terms(
    student_logp: Array, teacher_logp: Array, alpha: float | Array = 0.1
) -> Array:
    r"""Element terms of :math:`\mathrm{KL}(S \| \alpha S + (1-\alpha) T)` (DistiLLM)."""
    return _skew_kl_terms(student_logp, teacher_logp, alpha)
