r"""Full-vocabulary token-level divergences between a student S and a teacher T.

Three layers, each reusable on its own (chunked code and the top-k path share them):

* **element terms** ``*_terms(student_logp, teacher_logp)`` -> ``[..., V]``: the
  per-vocabulary summands of a divergence, from normalised log-probs (``0 * log 0`` is 0,
  with zero gradient); defined in :mod:`~opd_jax.losses.elementwise`, re-exported here.
* **log-prob level** ``*_from_logprobs(student_logp, teacher_logp, *, pointwise_clip)`` ->
  ``[...]``: ``sum_v min(term_v, c)`` over the last axis (OPSD's point-wise clip, applied to
  each element *before* the sum).
* **logit level** ``forward_kl(student_logits, teacher_logits, *, where, temperature,
  pointwise_clip)`` -> ``[...]``: ``log_softmax(logits / temperature)`` in float32, then the
  above; positions where ``where`` is False are exactly 0 with zero gradient.

A divergence between distributions that put mass where the other has none is infinite (e.g.
reverse KL with ``S(v) > 0 = T(v)``); every other case, including ``-inf`` logits on both
sides, gives finite values and finite gradients. The generalized JSD and the skew KLs are
always finite because their mixture covers both supports.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from opd_jax.losses import checks
from opd_jax.losses.elementwise import (  # re-exported: one import site for chunked / top-k
    forward_kl_terms,
    generalized_jsd_terms,
    kl_terms,
    mask_tokens,
    mixture_logprobs,
    normalized_logprobs,
    reverse_kl_terms,
    skew_forward_kl_terms,
    skew_reverse_kl_terms,
    sum_terms,
)

Array = jax.Array

__all__ = [
    "DIVERGENCES",
    "LOGPROB_DIVERGENCES",
    "forward_kl",
    "forward_kl_from_logprobs",
    "forward_kl_terms",
    "generalized_jsd",
    "generalized_jsd_from_logprobs",
    "generalized_jsd_terms",
    "kl_terms",
    "mask_tokens",
    "mixture_logprobs",
    "normalized_logprobs",
    "pair_logprobs",
    "reverse_kl",
    "reverse_kl_from_logprobs",
    "reverse_kl_terms",
    "skew_forward_kl",
    "skew_forward_kl_from_logprobs",
    "skew_forward_kl_terms",
    "skew_reverse_kl",
    "skew_reverse_kl_from_logprobs",
    "skew_reverse_kl_terms",
    "sum_terms",
]


# ------------------------------------------------------------------------------------------
# log-prob level: [..., V] log-probs -> [...]
# ------------------------------------------------------------------------------------------


def forward_kl_from_logprobs(student_logp, teacher_logp, *, pointwise_clip=None) -> Array:
    r""":math:`\sum_v \min(T_v(\log T_v - \log S_v), c)` from log-probs ``[..., V]`` -> ``[...]``."""
    return sum_terms(forward_kl_terms(student_logp, teacher_logp), pointwise_clip)


def reverse_kl_from_logprobs(student_logp, teacher_logp, *, pointwise_clip=None) -> Array:
    r""":math:`\sum_v \min(S_v(\log S_v - \log T_v), c)` from log-probs ``[..., V]`` -> ``[...]``."""
    return sum_terms(reverse_kl_terms(student_logp, teacher_logp), pointwise_clip)


def generalized_jsd_from_logprobs(
    student_logp, teacher_logp, beta=0.5, *, pointwise_clip=None
) -> Array:
    r"""Generalized JSD (see :func:`generalized_jsd_terms`) from log-probs, summed over V."""
    return sum_terms(generalized_jsd_terms(student_logp, teacher_logp, beta), pointwise_clip)


def skew_forward_kl_from_logprobs(
    student_logp, teacher_logp, alpha=0.1, *, pointwise_clip=None
) -> Array:
    r""":math:`\mathrm{KL}(T\|\alpha T + (1-\alpha)S)` from log-probs, summed over V."""
    return sum_terms(skew_forward_kl_terms(student_logp, teacher_logp, alpha), pointwise_clip)


def skew_reverse_kl_from_logprobs(
    student_logp, teacher_logp, alpha=0.1, *, pointwise_clip=None
) -> Array:
    r""":math:`\mathrm{KL}(S\|\alpha S + (1-\alpha)T)` from log-probs, summed over V."""
    return sum_terms(skew_reverse_kl_terms(student_logp, teacher_logp, alpha), pointwise_clip)


# ------------------------------------------------------------------------------------------
# logit level: [..., V] logits -> [...] per-token loss
# ------------------------------------------------------------------------------------------


def pair_logprobs(student_logits, teacher_logits, *, where, temperature,
                  teacher_temperature=None) -> tuple[Array, Array]:
    """Check a student / teacher logit pair ``[..., V]`` and return both normalised log-probs.

    The shared front of every logit-level loss: :func:`~opd_jax.losses.checks.check_logit_pair`,
    ``where`` and temperature checks, then :func:`normalized_logprobs` of each side: the
    student's logits divided by ``temperature``, the teacher's by ``teacher_temperature``
    (``None``: the same ``temperature``, the GKD / TRL convention; thunlp/OPD divides the teacher
    by its own ``TEACHER_TEMPERATURE``, default 1.0, ``verl/verl/workers/fsdp_workers.py:2015``).
    """
    checks.check_logit_pair(student_logits, teacher_logits)
    checks.check_where(where, jnp.shape(student_logits)[:-1])
    checks.check_positive("temperature", temperature)
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    checks.check_positive("teacher_temperature", t_temp)
    s = normalized_logprobs(student_logits, temperature=temperature, where=where)
    t = normalized_logprobs(teacher_logits, temperature=t_temp, where=where)
    return s, t


def _from_logits(fn: Callable, student_logits, teacher_logits, where, temperature,
                 teacher_temperature, **kw):
    s, t = pair_logprobs(student_logits, teacher_logits, where=where, temperature=temperature,
                         teacher_temperature=teacher_temperature)
    return mask_tokens(fn(s, t, **kw), where)


def forward_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    pointwise_clip: float | None = None,
) -> Array:
    r"""Forward KL :math:`\mathrm{KL}(T\|S)` per token (mode-covering; SFT-like).

    .. math::
       \ell = \sum_{v} \min\big(T_v (\log T_v - \log S_v),\; c\big), \quad
       S = \mathrm{softmax}(z_S/\tau),\; T = \mathrm{softmax}(z_T/\tau)

    Args:
      student_logits: ``[..., V]`` student logits (any float dtype; math in float32).
      teacher_logits: ``[..., V]`` teacher logits (pass them through ``stop_gradient``).
      where: optional bool ``[...]``; False positions are exactly 0 with zero gradient.
      temperature: :math:`\tau > 0`, divides the student's logits (and the teacher's, unless
        ``teacher_temperature`` is given).
      teacher_temperature: optional :math:`\tau_T > 0` dividing the teacher's logits (thunlp/OPD
        ``TEACHER_TEMPERATURE``); ``None`` = ``temperature``.
      pointwise_clip: optional :math:`c`, caps each vocabulary term before the sum (OPSD).

    Returns:
      ``[...]`` float32 unreduced per-token loss.

    References: Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD).

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> round(float(forward_kl(s, t)[0]), 4)
    1.1504
    """
    return _from_logits(
        forward_kl_from_logprobs, student_logits, teacher_logits, where, temperature,
        teacher_temperature,
        pointwise_clip=pointwise_clip,
    )


def reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    pointwise_clip: float | None = None,
) -> Array:
    r"""Reverse KL :math:`\mathrm{KL}(S\|T)` per token (mode-seeking; the OPD objective).

    .. math::
       \ell = \sum_{v} \min\big(S_v (\log S_v - \log T_v),\; c\big)

    Args and returns as :func:`forward_kl`. Infinite where :math:`S_v > 0 = T_v`.

    References: Gu et al. 2024 (MiniLLM); thunlp/OPD (arXiv 2604.13016).

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> print(reverse_kl(s, t, where=jnp.array([False])))
    [0.]
    """
    return _from_logits(
        reverse_kl_from_logprobs, student_logits, teacher_logits, where, temperature,
        teacher_temperature,
        pointwise_clip=pointwise_clip,
    )


def generalized_jsd(
    student_logits: Array,
    teacher_logits: Array,
    beta: float | Array = 0.5,
    *,
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    pointwise_clip: float | None = None,
) -> Array:
    r"""Generalized Jensen-Shannon divergence per token (GKD / TRL / OPSD convention).

    .. math::
       M = (1-\beta) S + \beta T, \qquad
       \ell = \sum_v \min\big(\beta T_v \log\tfrac{T_v}{M_v}
              + (1-\beta) S_v \log\tfrac{S_v}{M_v},\; c\big)

    :math:`\beta = 0` is exactly :math:`\mathrm{KL}(T\|S)` and :math:`\beta=1` exactly
    :math:`\mathrm{KL}(S\|T)` (special-cased as in TRL's ``generalized_jsd_loss``); at
    :math:`\beta=0.5` it is the symmetric JSD, bounded by :math:`\log 2`.

    Args:
      beta: mixture weight in [0, 1] (Python float, or a traced scalar).
      others: as :func:`forward_kl`.

    References: Agarwal et al. 2024 (GKD, Eq. 1); siyan-zhao/OPSD (point-wise clip 0.05).

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> bool(jnp.allclose(generalized_jsd(s, t, 0.0), forward_kl(s, t)))
    True
    """
    return _from_logits(
        generalized_jsd_from_logprobs, student_logits, teacher_logits, where, temperature,
        teacher_temperature,
        beta=beta, pointwise_clip=pointwise_clip,
    )


def skew_forward_kl(
    student_logits: Array,
    teacher_logits: Array,
    alpha: float | Array = 0.1,
    *,
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    pointwise_clip: float | None = None,
) -> Array:
    r"""Skew forward KL per token: :math:`\mathrm{KL}(T \,\|\, \alpha T + (1-\alpha) S)`.

    .. math::
       \ell = \sum_v \min\big(T_v \log\tfrac{T_v}{\alpha T_v + (1-\alpha) S_v},\; c\big)

    Finite for any :math:`\alpha > 0`; :math:`\alpha = 0` is :math:`\mathrm{KL}(T\|S)`.

    References: Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for LLMs".

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> bool(skew_forward_kl(s, t, 0.1)[0] < forward_kl(s, t)[0])
    True
    """
    return _from_logits(
        skew_forward_kl_from_logprobs, student_logits, teacher_logits, where, temperature,
        teacher_temperature,
        alpha=alpha, pointwise_clip=pointwise_clip,
    )


def skew_reverse_kl(
    student_logits: Array,
    teacher_logits: Array,
    alpha: float | Array = 0.1,
    *,
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    pointwise_clip: float | None = None,
) -> Array:
    r"""Skew reverse KL per token: :math:`\mathrm{KL}(S \,\|\, \alpha S + (1-\alpha) T)`.

    .. math::
       \ell = \sum_v \min\big(S_v \log\tfrac{S_v}{\alpha S_v + (1-\alpha) T_v},\; c\big)

    References: Ko et al. 2024 (DistiLLM).

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.0, 1.0, 2.0]])
    >>> print(skew_reverse_kl(s, s))
    [0.]
    """
    return _from_logits(
        skew_reverse_kl_from_logprobs, student_logits, teacher_logits, where, temperature,
        teacher_temperature,
        alpha=alpha, pointwise_clip=pointwise_clip,
    )


#: Logit-level losses by name: ``fn(student_logits, teacher_logits, *, where, temperature,
#: pointwise_clip) -> [...]``.
DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}

#: Log-prob-level forms by name: ``fn(student_logp, teacher_logp, *, pointwise_clip) -> [...]``
#: over the last axis (the vocabulary, a top-k support, or a support plus tail bucket).
LOGPROB_DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": forward_kl_from_logprobs,
    "reverse_kl": reverse_kl_from_logprobs,
    "generalized_jsd": generalized_jsd_from_logprobs,
    "skew_forward_kl": skew_forward_kl_from_logprobs,
    "skew_reverse_kl": skew_reverse_kl_from_logprobs,
}
