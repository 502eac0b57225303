r"""Mechanism metrics of on-policy distillation (arXiv 2604.13016), cheap enough for every step.

"Rethinking On-Policy Distillation of LLMs" explains when OPD works by a handful of per-token
quantities.  With :math:`S_t, T_t` the student's and teacher's next-token distributions at
position :math:`t` and :math:`\mathcal{K}^S_t, \mathcal{K}^T_t` their top-k id sets:

* **overlap ratio** :math:`|\mathcal{K}^S_t \cap \mathcal{K}^T_t| / k`;
* **shared mass** of each model on the shared set,
  :math:`\sum_{i\in\mathcal{K}^S_t\cap\mathcal{K}^T_t} S_t(i)` and the same for :math:`T_t`
  (97-99 % when OPD works);
* **entropies** :math:`H(S_t)` and :math:`H(T_t)` over the full vocabulary;
* **teacher log-prob of the sampled token** :math:`\log T_t(x_t)`;
* **sampler-vs-learner gap** :math:`\log \pi_\text{sampler}(x_t) - \log S_t(x_t)` (the
  off-policyness introduced by a separate or stale sampler).

Design: per-token functions return ``[B, T]`` arrays (pure, jit-able, exactly ``0`` where
masked); :func:`summarize` reduces a dict of them to scalars (masked means) and
:func:`per_position` to a ``[T]`` curve for plots (:mod:`~opd_jax.metrics.per_token`).
:func:`mechanism_metrics` computes them all chunk by chunk from hidden states and unembeddings
(no ``[B, T, V]`` logits); :func:`mechanism_metrics_from_logits` does the same from logits for
small inputs (:mod:`~opd_jax.metrics.mechanism`).  Nothing here is differentiated: every input
gets ``stop_gradient``.

Shape letters follow :mod:`opd_jax`.
"""

from opd_jax.metrics import mechanism, per_token
from opd_jax.metrics.mechanism import *  # noqa: F403
from opd_jax.metrics.per_token import *  # noqa: F403

__all__ = [*per_token.__all__, *mechanism.__all__]
