r"""Top-k shared support between student and teacher (thunlp/OPD, arXiv 2604.13016).

A *support* is a fixed-size id array ``ids [..., M]`` plus a validity mask ``valid [..., M]``
(``M = K`` or ``2K``), so every shape is static under :func:`jax.jit`:

====================  =====  ===============================================================
support               M      ids / valid
====================  =====  ===============================================================
student               K      student's top-k, all valid
teacher               K      teacher's top-k, all valid
union                 2K     student's top-k then teacher's; a teacher id already in the
                             student's top-k is invalid (no duplicates)
intersection          K      student's top-k; valid where also in the teacher's top-k
symmetric_difference  2K     student's then teacher's; valid where not in the other top-k
====================  =====  ===============================================================

(OPD's ``TOP_K_STRATEGY`` names: ``only_stu``, ``only_tch``, ``union``, ``intersection``,
``union-intersection``.) Two uses:

* **reward form** (OPD): :func:`topk_reward` gives per-(token, k) advantages
  :math:`A_k = -(\log S(x_k) - \log T(x_k))\,w_k` (stop-gradient); :func:`topk_policy_gradient_loss`
  is the surrogate :math:`-\sum_k A_k \log S(x_k)` whose gradient is the paper's update.
* **direct divergence**: :func:`topk_divergence` / :func:`support_divergence` take any
  divergence of :data:`~opd_jax.losses.divergences.LOGPROB_DIVERGENCES` over the support,
  either renormalising both distributions on it or adding one tail bucket with the rest of
  each distribution's mass. :func:`support_divergence` also serves a teacher given only as
  precomputed top-k ids + log-probs (gather the student's log-probs at those ids).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.losses import _checks
from opd_jax.losses.divergences import LOGPROB_DIVERGENCES, mask_tokens, normalized_logprobs

Array = jax.Array

__all__ = [
    "SUPPORTS",
    "TAILS",
    "WEIGHTS",
    "TopKReward",
    "TopKSupport",
    "gather_logprobs",
    "renormalized_logprobs",
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


class TopKSupport(NamedTuple):
    """A static-size token set per position: ``ids [..., M]`` int32, ``valid [..., M]`` bool."""

    ids: Array
    valid: Array


class TopKReward(NamedTuple):
    """OPD top-k rewards: ``advantages [..., M]`` float32 (stop-gradient, 0 where invalid),
    ``ids [..., M]`` int32 and ``valid [..., M]`` bool (already AND-ed with ``where``)."""

    advantages: Array
    ids: Array
    valid: Array


# ------------------------------------------------------------------------------------------
# supports
# ------------------------------------------------------------------------------------------


def _member(ids_a_xA: Array, ids_b_xB: Array) -> Array:
    """``[..., A]`` bool: is ``ids_a[..., i]`` among ``ids_b[..., :]`` (O(A*B), A, B = K)."""
    return jnp.any(ids_a_xA[..., :, None] == ids_b_xB[..., None, :], axis=-1)


def _all(ids):
    return jnp.ones(ids.shape, jnp.bool_)


_SUPPORT_BUILDERS: dict[str, Callable[[Array, Array], TopKSupport]] = {
    "student": lambda s, t: TopKSupport(s, _all(s)),
    "teacher": lambda s, t: TopKSupport(t, _all(t)),
    "union": lambda s, t: TopKSupport(
        jnp.concatenate([s, t], -1), jnp.concatenate([_all(s), ~_member(t, s)], -1)
    ),
    "intersection": lambda s, t: TopKSupport(s, _member(s, t)),
    "symmetric_difference": lambda s, t: TopKSupport(
        jnp.concatenate([s, t], -1), jnp.concatenate([~_member(s, t), ~_member(t, s)], -1)
    ),
}
#: Support names accepted by :func:`topk_support` / :func:`support_from_ids`.
SUPPORTS: tuple[str, ...] = tuple(_SUPPORT_BUILDERS)


def support_from_ids(student_ids_xK: Array, teacher_ids_xK: Array, support: str) -> TopKSupport:
    """Build a support from both models' top-k ids ``[..., K]`` (see the module table).

    >>> import jax.numpy as jnp
    >>> sup = support_from_ids(jnp.array([3, 1]), jnp.array([1, 2]), "union")
    >>> print(sup.ids, sup.valid)
    [3 1 1 2] [ True  True False  True]
    """
    _checks.check_choice("support", support, SUPPORTS)
    return _SUPPORT_BUILDERS[support](student_ids_xK, teacher_ids_xK)


def topk_support(student_scores: Array, teacher_scores: Array, *, k: int, support: str) -> TopKSupport:
    """Top-k support from student / teacher scores ``[..., V]`` (logits or log-probs).

    Ties are broken as :func:`jax.lax.top_k` does (lower id first). Returns ids ``[..., M]``.
    """
    _checks.check_top_k(k, jnp.shape(student_scores)[-1])
    _, s_ids = jax.lax.top_k(jax.lax.stop_gradient(student_scores), k)
    _, t_ids = jax.lax.top_k(jax.lax.stop_gradient(teacher_scores), k)
    return support_from_ids(s_ids.astype(jnp.int32), t_ids.astype(jnp.int32), support)


def gather_logprobs(logp_xV: Array, ids_xM: Array) -> Array:
    """``logp[..., ids]``: log-probs ``[..., V]`` gathered at ids ``[..., M]`` -> ``[..., M]``."""
    return jnp.take_along_axis(logp_xV, ids_xM, axis=-1)


# ------------------------------------------------------------------------------------------
# distributions over a support
# ------------------------------------------------------------------------------------------


def _masked_logsumexp(logp_xM: Array, valid_xM: Array) -> Array:
    """``log sum_{valid} exp(logp)`` ``[..., 1]``; ``-inf`` (zero gradient) if nothing valid."""
    any_live = jnp.any(valid_xM & (logp_xM > -jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(valid_xM, logp_xM, -jnp.inf)
    x = jnp.where(any_live, x, 0.0)  # double-where: all -inf rows never reach logsumexp
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    return jnp.where(any_live, lse, -jnp.inf)


def renormalized_logprobs(logp_xM: Array, valid_xM: Array) -> Array:
    r""":math:`\log p_k - \log\sum_{j\,\mathrm{valid}} p_j` on valid entries, ``-inf`` elsewhere.

    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([0.2, 0.2, 0.1]))
    >>> print(jnp.exp(renormalized_logprobs(lp, jnp.array([True, True, False]))))
    [0.5 0.5 0. ]
    """
    lse = _masked_logsumexp(logp_xM, valid_xM)
    lse = jnp.where(lse > -jnp.inf, lse, 0.0)
    return jnp.where(valid_xM, logp_xM - lse, -jnp.inf)


def tail_logprob(logp_xV: Array, ids_xM: Array, valid_xM: Array) -> Array:
    r"""Exact log-mass outside a support: :math:`\log\sum_{v \notin \mathcal{K}} p_v`, ``[...]``.

    From full-vocabulary log-probs ``[..., V]``; ``-inf`` (zero gradient) when the support
    holds all the mass. Unlike :math:`\log(1 - \sum_{k} p_k)` it keeps full relative precision
    for tiny tails. One extra pass over ``[..., V]``.

    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    >>> round(float(jnp.exp(tail_logprob(lp, jnp.array([0, 2]), jnp.array([True, True])))), 4)
    0.3
    """
    vocab = logp_xV.shape[-1]
    lead = logp_xV.shape[:-1]
    ids = jnp.where(valid_xM, ids_xM, vocab).reshape(-1, ids_xM.shape[-1])  # invalid -> dropped
    rows = jnp.arange(ids.shape[0])[:, None]
    in_support = jnp.zeros((ids.shape[0], vocab), jnp.bool_).at[rows, ids].set(True, mode="drop")
    outside = ~in_support.reshape(*lead, vocab)
    return _masked_logsumexp(logp_xV, outside)[..., 0]


def tail_bucket_logprobs(
    logp_xM: Array, valid_xM: Array, tail_logp: Array | None = None
) -> Array:
    r"""Valid entries plus one tail bucket :math:`\log(1 - \sum_{valid} p_k)`: ``[..., M+1]``.

    Invalid entries become ``-inf``. Given ``tail_logp`` ``[...]`` (e.g. from
    :func:`tail_logprob`), that exact value is the bucket. Otherwise the tail is
    :math:`1 - \sum p_k`, which float32 resolves only to about ``1e-7``; it is then floored at
    ``16 * eps`` of the dtype (``1.9e-6`` in float32), so rounding noise never makes one side's
    tail 0 (an infinite reverse KL) or a spurious ``1e-38``: two tails below the floor
    contribute exactly 0, and smaller tails are not resolved.

    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([0.5, 0.25]))
    >>> print(jnp.exp(tail_bucket_logprobs(lp, jnp.array([True, True]))).round(4))
    [0.5  0.25 0.25]
    """
    body = jnp.where(valid_xM, logp_xM, -jnp.inf)
    if tail_logp is not None:
        tail = jnp.asarray(tail_logp, body.dtype)[..., None]
        return jnp.concatenate([body, jnp.broadcast_to(tail, body.shape[:-1] + (1,))], axis=-1)
    lse = jnp.minimum(_masked_logsumexp(logp_xM, valid_xM), 0.0)
    near = lse > -0.6931472  # log(1 - e^x): expm1 branch near 0, log1p branch far from 0
    hi = jnp.where(near, lse, -1.0)
    lo = jnp.where(near, -1.0, lse)
    floor = 16 * jnp.finfo(logp_xM.dtype).eps
    tail = jnp.where(near, jnp.log(jnp.maximum(-jnp.expm1(hi), floor)), jnp.log1p(-jnp.exp(lo)))
    return jnp.concatenate([body, tail], axis=-1)


#: Tail treatments accepted by :func:`support_divergence`.
TAILS: tuple[str, ...] = ("renormalize", "bucket")


def support_divergence(
    student_logp_xM: Array,
    teacher_logp_xM: Array,
    valid_xM: Array,
    *,
    divergence: str | Callable[..., Array] = "reverse_kl",
    tail: str = "renormalize",
    pointwise_clip: float | None = None,
    student_tail_logp: Array | None = None,
    teacher_tail_logp: Array | None = None,
) -> Array:
    r"""A divergence over a support, from full-vocabulary log-probs gathered at its ids.

    ``tail="renormalize"``: :math:`\tilde p_k = p_k / \sum_{j \in \mathcal{K}} p_j` for both sides.
    ``tail="bucket"``: the support plus one bucket :math:`1 - \sum_{j\in\mathcal{K}} p_j`, so the
    result lower-bounds the full-vocabulary divergence (data processing inequality) and equals
    it when the support covers the vocabulary.

    Args:
      student_logp_xM: ``[..., M]`` student log-probs (normalised over the full vocabulary)
        at the support ids.
      teacher_logp_xM: ``[..., M]`` teacher log-probs at the same ids (e.g. precomputed
        teacher top-k log-probs with ``valid`` all True).
      valid_xM: ``[..., M]`` bool validity of each support slot.
      divergence: a name in :data:`LOGPROB_DIVERGENCES` or ``fn(student_logp, teacher_logp,
        *, pointwise_clip) -> [...]`` (e.g. ``functools.partial(generalized_jsd_from_logprobs,
        beta=0.9)``).
      tail: ``"renormalize"`` or ``"bucket"``.
      pointwise_clip: optional cap on each support element's term (OPSD).
      student_tail_logp, teacher_tail_logp: optional exact log tail masses ``[...]`` (see
        :func:`tail_logprob`) for ``tail="bucket"``; each side without one uses
        :math:`\log(1 - \sum_k p_k)` (float32-resolved to ~1e-6, see
        :func:`tail_bucket_logprobs`).

    Returns:
      ``[...]`` per-token divergence; 0 where the support is empty.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.log(jnp.array([0.6, 0.2])), jnp.log(jnp.array([0.3, 0.1]))
    >>> float(support_divergence(s, t, jnp.array([True, True]))) < 1e-6  # same shape on K
    True
    """
    _checks.check_same_shape(
        student_logp_xM=student_logp_xM, teacher_logp_xM=teacher_logp_xM, valid_xM=valid_xM
    )
    _checks.check_choice("tail", tail, TAILS)
    if isinstance(divergence, str):
        _checks.check_choice("divergence", divergence, LOGPROB_DIVERGENCES)
        divergence = LOGPROB_DIVERGENCES[divergence]
    s = jnp.asarray(student_logp_xM)
    s = s.astype(_checks.compute_dtype(s))
    t = jnp.asarray(teacher_logp_xM)
    t = t.astype(_checks.compute_dtype(t))
    if tail == "bucket":
        s = tail_bucket_logprobs(s, valid_xM, student_tail_logp)
        t = tail_bucket_logprobs(t, valid_xM, teacher_tail_logp)
    elif student_tail_logp is not None or teacher_tail_logp is not None:
        raise ValueError("tail log-probs were given with tail='renormalize'; pass tail='bucket'")
    else:
        s, t = renormalized_logprobs(s, valid_xM), renormalized_logprobs(t, valid_xM)
    return divergence(s, t, pointwise_clip=pointwise_clip)


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
      where, temperature: as :func:`~opd_jax.losses.forward_kl`.

    Returns:
      ``[...]`` float32 per-token loss.

    References: thunlp/OPD (arXiv 2604.13016); TRL GKD ``top_k`` (teacher support, renormalised).

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[2.0, 1.0, 0.0]])
    >>> from opd_jax.losses import reverse_kl
    >>> bool(jnp.allclose(topk_divergence(s, t, k=3), reverse_kl(s, t)))
    True
    """
    _checks.check_logit_pair(student_logits, teacher_logits)
    _checks.check_where(where, jnp.shape(student_logits)[:-1])
    _checks.check_positive("temperature", temperature)
    s_logp = normalized_logprobs(student_logits, temperature=temperature, where=where)
    t_logp = normalized_logprobs(teacher_logits, temperature=temperature, where=where)
    sup = topk_support(s_logp, t_logp, k=k, support=support)
    _checks.check_choice("tail", tail, TAILS)
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

_WEIGHTS: dict[str, Callable[[Array, Array, Array], Array]] = {
    "student_p": lambda s, t, valid: jnp.exp(renormalized_logprobs(s, valid)),
    "teacher_p": lambda s, t, valid: jnp.exp(renormalized_logprobs(t, valid)),
    "none": lambda s, t, valid: valid.astype(s.dtype),
}
#: Reward weightings accepted by :func:`topk_reward` (OPD's ``REWARD_WEIGHT_MODE``).
WEIGHTS: tuple[str, ...] = tuple(_WEIGHTS)


def support_advantages(
    student_logp_xM: Array, teacher_logp_xM: Array, valid_xM: Array, *, weights: str = "student_p"
) -> Array:
    r"""OPD per-(token, k) advantages :math:`A_k = -(\log S_k - \log T_k)\,w_k` (stop-gradient).

    :math:`w_k` is the student (``"student_p"``) or teacher (``"teacher_p"``) probability
    renormalised over the valid support, or 1 (``"none"``). Entries that are invalid, or where
    either log-prob is ``-inf`` (an infinite log-ratio), get 0.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.25]))
    >>> print(support_advantages(s, t, jnp.array([True, True]), weights="none").round(4))
    [-0.6931  0.    ]
    """
    _checks.check_choice("weights", weights, WEIGHTS)
    s = jax.lax.stop_gradient(jnp.asarray(student_logp_xM))
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logp_xM))
    s, t = s.astype(_checks.compute_dtype(s)), t.astype(_checks.compute_dtype(t))
    w = _WEIGHTS[weights](s, t, valid_xM)
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
    where: Array | None = None,
    temperature: float = 1.0,
) -> TopKReward:
    r"""OPD's top-k token rewards (advantage = reward, no return, gamma 0).

    .. math::
       A_k = -\big(\log S(x_k) - \log T(x_k)\big)\, w_k, \qquad x_k \in \mathcal{K}

    Everything is stop-gradient; feed the result to :func:`topk_policy_gradient_loss`.

    Args:
      student_logits, teacher_logits: ``[..., V]``.
      k: static top-k (16 in the paper). support: a name in :data:`SUPPORTS`.
      weights: a name in :data:`WEIGHTS`.
      where: optional bool ``[...]``; masked positions get no valid slot and 0 advantages.
      temperature: divides both logits before the softmax.

    Returns:
      :class:`TopKReward` with ``advantages``, ``ids``, ``valid`` of shape ``[..., M]``.

    References: thunlp/OPD (arXiv 2604.13016), ``LOG_PROB_TOP_K`` / ``TOP_K_STRATEGY`` /
    ``REWARD_WEIGHT_MODE``.

    >>> import jax.numpy as jnp
    >>> s, t = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[0.0, 1.0, 2.0]])
    >>> print(topk_reward(s, t, k=2).advantages)
    [[0. 0.]]
    """
    _checks.check_logit_pair(student_logits, teacher_logits)
    _checks.check_where(where, jnp.shape(student_logits)[:-1])
    _checks.check_positive("temperature", temperature)
    s_logp = jax.lax.stop_gradient(normalized_logprobs(student_logits, temperature=temperature, where=where))
    t_logp = jax.lax.stop_gradient(normalized_logprobs(teacher_logits, temperature=temperature, where=where))
    sup = topk_support(s_logp, t_logp, k=k, support=support)
    valid = sup.valid
    if where is not None:
        valid = valid & jnp.asarray(where)[..., None]
    adv = support_advantages(
        gather_logprobs(s_logp, sup.ids), gather_logprobs(t_logp, sup.ids), valid, weights=weights
    )
    return TopKReward(adv, sup.ids, valid)


def support_policy_gradient_loss(
    student_logp_xM: Array, advantages_xM: Array, valid_xM: Array
) -> Array:
    r"""Policy-gradient surrogate over a support: :math:`-\sum_k \mathrm{sg}(A_k) \log S(x_k)`.

    ``[..., M]`` -> ``[...]``; invalid slots and ``-inf`` log-probs contribute exactly 0.
    """
    lp = jnp.asarray(student_logp_xM)
    lp = lp.astype(_checks.compute_dtype(lp))
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
    _checks.check_logits("student_logits", student_logits)
    _checks.check_where(where, jnp.shape(student_logits)[:-1])
    _checks.check_positive("temperature", temperature)
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
