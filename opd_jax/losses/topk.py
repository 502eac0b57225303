r"""Top-k losses of OPD (thunlp/OPD, arXiv 2604.13016) over a student/teacher shared support.

Supports (``student`` / ``teacher`` / ``union`` / ``intersection`` / ``symmetric_difference``)
and distributions over them live in :mod:`opd_jax.losses.support` (re-exported here). Two uses:

* **reward form** (OPD): :func:`topk_reward` gives per-(token, k) advantages
  :math:`A_k = -(\log S(x_k) - \log T(x_k))\,w_k` (stop-gradient);
  :func:`topk_policy_gradient_loss` is the surrogate :math:`-\sum_k A_k \log S(x_k)` whose
  gradient is the paper's update.
* **direct divergence**: :func:`topk_divergence` takes any divergence over the support,
  renormalised or with a tail bucket (:func:`~opd_jax.losses.support.support_divergence` is
  the log-prob-level core, also for a teacher given as precomputed top-k log-probs).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.losses import checks
from opd_jax.losses.divergences import mask_tokens, normalized_logprobs, pair_logprobs
from opd_jax.losses.support import (  # re-exported
    SUPPORTS,
    TAILS,
    TopKSupport,
    gather_logprobs,
    renormalized_logprobs,
    support_divergence,
    support_from_ids,
    tail_bucket_logprobs,
    tail_logprob,
    topk_support,
)

Array = jax.Array

__all__ = [
    "SUPPORTS",
    "TAILS",
    "WEIGHTS",
    "TopKReward",
    "default_normalize",
    "TopKSupport",
    "gather_logprobs",
    "renormalized_logprobs",
    "reward_weights",
    "support_advantages",
    "support_divergence",
    "support_from_ids",
    "support_policy_gradient_loss",
    "tail_bucket_logprobs",
    "tail_logprob",
    "topk_divergence",
    "topk_policy_gradient_loss",
    "topk_reward",
    "topk_support",
]


class TopKReward(NamedTuple):
    """OPD top-k rewards: ``advantages [..., M]`` float32 (stop-gradient, 0 where invalid),
    ``ids [..., M]`` int32 and ``valid [..., M]`` bool (already AND-ed with ``where``)."""

    advantages: Array
    ids: Array
    valid: Array


def topk_divergence(
    student_logits: Array,
    teacher_logits: Array,
    *,
    k: int = 16,
    support: str = "teacher",
    divergence: str | Callable[..., Array] = "reverse_kl",
    tail: str = "renormalize",
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    pointwise_clip: float | None = None,
) -> Array:
    r"""A divergence restricted to a top-k support, per token.

    .. math::
       \ell = D\big(\tilde S_{\mathcal{K}} \,\|\, \tilde T_{\mathcal{K}}\big), \quad
       \mathcal{K} = \text{support}(\mathrm{top}_k S, \mathrm{top}_k T)

    where :math:`\tilde\cdot` renormalises on :math:`\mathcal{K}` or appends a tail bucket
    (see :func:`support_divergence`; here the bucket is the exact :func:`tail_logprob`).
    Gradients flow through the gathered log-probs (which depend on the full-vocabulary
    normaliser) and the tail; the ids carry none.

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      k: static top-k size. support: a name in :data:`SUPPORTS`.
      divergence, tail, pointwise_clip: as :func:`support_divergence`.
      where, temperature, teacher_temperature: as :func:`~opd_jax.losses.forward_kl`.

    Returns:
      ``[...]`` float32 per-token loss.

    References: thunlp/OPD (arXiv 2604.13016); TRL GKD ``top_k`` (teacher support, renormalised).

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> from opd_jax.losses import reverse_kl
    >>> bool(jnp.allclose(topk_divergence(s, t, k=3), reverse_kl(s, t)))
    True
    """
    s_logp, t_logp = pair_logprobs(student_logits, teacher_logits, where=where,
                                   temperature=temperature, teacher_temperature=teacher_temperature)
    sup = topk_support(s_logp, t_logp, k=k, support=support)
    checks.check_choice("tail", tail, TAILS)
    exact = tail == "bucket"  # the full vocabulary is at hand: exact tails, not 1 - sum
    out = support_divergence(
        gather_logprobs(s_logp, sup.ids),
        gather_logprobs(t_logp, sup.ids),
        sup.valid,
        divergence=divergence,
        tail=tail,
        pointwise_clip=pointwise_clip,
        student_tail_logp=tail_logprob(s_logp, sup.ids, sup.valid) if exact else None,
        teacher_tail_logp=tail_logprob(t_logp, sup.ids, sup.valid) if exact else None,
    )
    return mask_tokens(out, where)


# ------------------------------------------------------------------------------------------
# OPD reward form
# ------------------------------------------------------------------------------------------

#: Reward weightings accepted by :func:`topk_reward` (OPD's ``REWARD_WEIGHT_MODE``).
WEIGHTS: tuple[str, ...] = ("student_p", "teacher_p", "none")


def reward_weights(
    student_logp_xM: Array, teacher_logp_xM: Array, valid_xM: Array, *, weights: str = "student_p",
    normalize: bool = True,
) -> Array:
    r"""OPD's per-slot reward weights :math:`w_k` over a support, ``[..., M]`` (0 where invalid).

    With :math:`\ell_k` the student's log-prob (``"student_p"``), the teacher's
    (``"teacher_p"``) or 0 (``"none"``) on valid slots and :math:`-\infty` elsewhere:

    .. math::
       w_k = \frac{e^{\ell_k}}{\sum_{j\,\mathrm{valid}} e^{\ell_j}} \ (\texttt{normalize}),
       \qquad w_k = e^{\ell_k} \ (\text{raw})

    so ``"none"`` is :math:`1/|\mathrm{valid}_t|` normalised and 1 raw. A position with no
    valid slot gets 0 everywhere. This is ``compute_reward_weights`` of thunlp/OPD
    (``verl/verl/workers/actor/dp_actor.py:522-556``), which normalises for every support but
    the symmetric difference (``union-intersection``, ``dp_actor.py:615``).

    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    >>> print(reward_weights(lp, lp, jnp.array([True, True, False]), weights="none"))
    [0.5 0.5 0. ]
    >>> print(reward_weights(lp, lp, jnp.array([True, True, False]), normalize=False))
    [0.5  0.25 0.  ]
    """
    checks.check_choice("weights", weights, WEIGHTS)
    s, t = jnp.asarray(student_logp_xM), jnp.asarray(teacher_logp_xM)
    logw = {"student_p": s, "teacher_p": t, "none": jnp.zeros_like(s)}[weights]
    if normalize:
        return jnp.exp(renormalized_logprobs(logw, valid_xM))  # 0 off the valid set
    return jnp.where(valid_xM, jnp.exp(logw), 0.0)


def default_normalize(support: str) -> bool:
    """thunlp/OPD's choice: renormalised weights on every support but ``symmetric_difference``
    (raw probabilities, weight 1 for ``"none"``; ``dp_actor.py:593`` vs ``:615``)."""
    return support != "symmetric_difference"


def support_advantages(
    student_logp_xM: Array, teacher_logp_xM: Array, valid_xM: Array, *, weights: str = "student_p",
    normalize: bool = True,
) -> Array:
    r"""OPD per-(token, k) advantages :math:`A_k = -(\log S_k - \log T_k)\,w_k` (stop-gradient).

    :math:`w_k` is :func:`reward_weights` (student / teacher probability or uniform, renormalised
    over the valid support unless ``normalize`` is False). Entries that are invalid, or where
    either log-prob is ``-inf`` (an infinite log-ratio), get 0.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.25]))
    >>> print(support_advantages(s, t, jnp.array([True, True]), weights="none").round(4))
    [-0.3466  0.    ]
    """
    s = jax.lax.stop_gradient(jnp.asarray(student_logp_xM))
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logp_xM))
    s, t = s.astype(checks.compute_dtype(s)), t.astype(checks.compute_dtype(t))
    w = reward_weights(s, t, valid_xM, weights=weights, normalize=normalize)
    live = valid_xM & (s > -jnp.inf) & (t > -jnp.inf)
    adv = (jnp.where(live, t, 0.0) - jnp.where(live, s, 0.0)) * w  # -(log S - log T) w
    return jnp.where(live, adv, 0.0)


def topk_reward(
    student_logits: Array,
    teacher_logits: Array,
    *,
    k: int = 16,
    support: str = "student",
    weights: str = "student_p",
    normalize: bool | None = None,
    where: Array | None = None,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
) -> TopKReward:
    r"""OPD's top-k token rewards (advantage = reward, no return, gamma 0).

    .. math::
       A_k = -\big(\log S(x_k) - \log T(x_k)\big)\, w_k, \qquad x_k \in \mathcal{K}

    Everything is stop-gradient; feed the result to :func:`topk_policy_gradient_loss`.

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      k: static top-k (16 in the paper). support: a name in :data:`SUPPORTS`.
      weights: a name in :data:`WEIGHTS`.
      normalize: renormalise the weights over the valid support (:func:`reward_weights`);
        ``None`` = thunlp/OPD's choice, :func:`default_normalize` (all supports but
        ``symmetric_difference``).
      where: optional bool ``[...]``; masked positions get no valid slot and 0 advantages.
      temperature: divides the student's logits (the rollout temperature in thunlp/OPD).
      teacher_temperature: divides the teacher's logits; ``None`` = ``temperature``
        (thunlp/OPD's ``TEACHER_TEMPERATURE`` defaults to 1.0, independent of the rollout's).

    Returns:
      :class:`TopKReward` with ``advantages``, ``ids``, ``valid`` of shape ``[..., M]``.

    References: thunlp/OPD (arXiv 2604.13016), ``LOG_PROB_TOP_K`` / ``TOP_K_STRATEGY`` /
    ``REWARD_WEIGHT_MODE``.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[0.0, 1.0, 2.0]])
    >>> print(topk_reward(s, t, k=2).advantages)
    [[0. 0.]]
    """
    checks.check_choice("weights", weights, WEIGHTS)
    s_logp, t_logp = jax.lax.stop_gradient(
        pair_logprobs(student_logits, teacher_logits, where=where, temperature=temperature,
                      teacher_temperature=teacher_temperature)
    )
    sup = topk_support(s_logp, t_logp, k=k, support=support)
    valid = sup.valid
    if where is not None:
        valid = valid & jnp.asarray(where)[..., None]
    adv = support_advantages(
        gather_logprobs(s_logp, sup.ids), gather_logprobs(t_logp, sup.ids), valid, weights=weights,
        normalize=default_normalize(support) if normalize is None else bool(normalize),
    )
    return TopKReward(adv, sup.ids, valid)


def support_policy_gradient_loss(
    student_logp_xM: Array, advantages_xM: Array, valid_xM: Array
) -> Array:
    r"""Policy-gradient surrogate over a support: :math:`-\sum_k \mathrm{sg}(A_k) \log S(x_k)`.

    ``[..., M]`` -> ``[...]``; invalid slots and ``-inf`` log-probs contribute exactly 0.
    """
    lp = jnp.asarray(student_logp_xM)
    lp = lp.astype(checks.compute_dtype(lp))
    live = valid_xM & (lp > -jnp.inf)
    adv = jax.lax.stop_gradient(advantages_xM)
    terms = -jnp.where(live, adv, 0.0) * jnp.where(live, lp, 0.0)
    return jnp.sum(terms, axis=-1)


def topk_policy_gradient_loss(
    student_logits: Array,
    reward: TopKReward,
    *,
    where: Array | None = None,
    temperature: float = 1.0,
) -> Array:
    r"""OPD top-k surrogate per token: :math:`\ell = -\sum_k \mathrm{sg}(A_k)\,\log S(x_k)`.

    Its gradient :math:`-\sum_k A_k \nabla\log S(x_k)` is the paper's top-k OPD update
    (``reward`` from :func:`topk_reward` on the same positions, same ``temperature``).

    Args:
      student_logits: ``[..., V]`` (the differentiated input).
      reward: :class:`TopKReward` with ``[..., M]`` fields.
      where, temperature: as :func:`topk_reward`.

    Returns:
      ``[...]`` float32 per-token surrogate loss.

    >>> import jax, jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> r = topk_reward(s, t, k=2)
    >>> g = jax.grad(lambda z: topk_policy_gradient_loss(z, r).sum())(s)
    >>> bool(g[0, 2] > 0)  # descent lowers the logit the teacher dislikes
    True
    """
    checks.check_logits("student_logits", student_logits)
    checks.check_where(where, jnp.shape(student_logits)[:-1])
    checks.check_positive("temperature", temperature)
    if jnp.shape(reward.ids)[:-1] != jnp.shape(student_logits)[:-1]:
        raise ValueError(
            f"reward.ids has shape {jnp.shape(reward.ids)}, student_logits has shape "
            f"{jnp.shape(student_logits)}; compute the reward on the same token positions"
        )
    s_logp = normalized_logprobs(student_logits, temperature=temperature, where=where)
    loss = support_policy_gradient_loss(
        gather_logprobs(s_logp, reward.ids), reward.advantages, reward.valid
    )
    return mask_tokens(loss, where)
