r"""Sampled-token estimators and policy-gradient surrogates, from per-token log-probs.

With :math:`x \sim S` the token the student sampled, :math:`\log S = \log S(x)` and
:math:`\log T = \log T(x)` (shape ``[...]``, e.g. ``[B, T]``):

* Schulman's estimators of :math:`\mathrm{KL}(S\|T)` ("Approximating KL divergence", 2020):
  :math:`k_1 = \log S - \log T` (unbiased), :math:`k_2 = \tfrac12(\log S - \log T)^2`,
  :math:`k_3 = e^{\log T - \log S} - 1 - (\log T - \log S)` (unbiased, :math:`\ge 0`).
* :func:`opd_advantage`: the OPD / Tinker per-token reward :math:`-(\log S - \log T)` used as
  the advantage directly (no return, gamma 0), stop-gradient.
* surrogates whose gradient is the policy-gradient update: plain, importance-sampled
  (Tinker), PPO-clip with dual clip (verl).

All take ``where=`` (bool, per-token, broadcastable): masked positions are exactly 0 with zero
gradient, and masked inputs are replaced before any arithmetic.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from opd_jax.losses import checks
from opd_jax.losses.divergences import mask_tokens, normalized_logprobs

Array = jax.Array

__all__ = [
    "KL_ESTIMATORS",
    "grpo_advantages",
    "importance_sampled_pg_loss",
    "opd_advantage",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "reverse_kl_k1",
    "reverse_kl_k2",
    "reverse_kl_k3",
    "token_logprobs",
]


def _prep(where: Array | None, **arrays: Array) -> list[Array]:
    """Check shapes, cast to float32 (f64 stays), zero masked entries (double-where)."""
    checks.check_same_shape(**arrays)
    shape = jnp.shape(next(iter(arrays.values())))
    checks.check_where(where, shape)
    out = []
    for a in arrays.values():
        a = jnp.asarray(a)
        a = a.astype(checks.compute_dtype(a))
        out.append(a if where is None else jnp.where(where, a, 0.0))
    return out


def token_logprobs(
    logits: Array, tokens: Array, *, temperature: float = 1.0, where: Array | None = None
) -> Array:
    r"""Log-prob of given token ids: :math:`\log\mathrm{softmax}(z/\tau)[x]`.

    Args:
      logits: ``[..., V]`` any float dtype.
      tokens: ``[...]`` integer ids in ``[0, V)`` wherever ``where`` is True (an
        out-of-range id gives NaN, as :func:`jax.numpy.take_along_axis` does).
      temperature: :math:`\tau > 0`.
      where: optional bool ``[...]``; masked positions (e.g. padding ids like -100) give 0.

    Returns:
      ``[...]`` float32 log-probs.

    >>> import jax.numpy as jnp
    >>> print(token_logprobs(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([1])).round(4))
    [-0.2877]
    """
    checks.check_logits("logits", logits)
    checks.check_token_ids(logits, tokens)
    checks.check_where(where, jnp.shape(tokens))
    checks.check_positive("temperature", temperature)
    logp = normalized_logprobs(logits, temperature=temperature, where=where)
    if where is not None:
        tokens = jnp.where(where, tokens, 0)
    out = jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
    return mask_tokens(out, where)


def reverse_kl_k1(student_logp: Array, teacher_logp: Array, *, where: Array | None = None) -> Array:
    r""":math:`k_1 = \log S(x) - \log T(x)`; unbiased for :math:`\mathrm{KL}(S\|T)`, can be < 0.

    >>> import jax.numpy as jnp
    >>> print(reverse_kl_k1(jnp.array([-1.0]), jnp.array([-2.0])))
    [1.]
    """
    s, t = _prep(where, student_logp=student_logp, teacher_logp=teacher_logp)
    return mask_tokens(s - t, where)


def reverse_kl_k2(student_logp: Array, teacher_logp: Array, *, where: Array | None = None) -> Array:
    r""":math:`k_2 = \tfrac12(\log S(x) - \log T(x))^2`; biased, low variance, :math:`\ge 0`.

    >>> import jax.numpy as jnp
    >>> print(reverse_kl_k2(jnp.array([-1.0]), jnp.array([-2.0])))
    [0.5]
    """
    s, t = _prep(where, student_logp=student_logp, teacher_logp=teacher_logp)
    return mask_tokens(0.5 * jnp.square(s - t), where)


def reverse_kl_k3(student_logp: Array, teacher_logp: Array, *, where: Array | None = None) -> Array:
    r""":math:`k_3 = r - 1 - \log r`, :math:`r = T(x)/S(x)`; unbiased and :math:`\ge 0`.

    (verl's ``low_var_kl`` additionally clamps to [-10, 10]; this does not.)

    >>> import jax.numpy as jnp
    >>> print(reverse_kl_k3(jnp.array([-1.0]), jnp.array([-1.0])))
    [0.]
    """
    s, t = _prep(where, student_logp=student_logp, teacher_logp=teacher_logp)
    log_r = t - s
    return mask_tokens(jnp.expm1(log_r) - log_r, where)


#: Sampled-token estimators of KL(S||T) by name: ``fn(student_logp, teacher_logp, *, where)``.
KL_ESTIMATORS: dict[str, Callable[..., Array]] = {
    "k1": reverse_kl_k1,
    "k2": reverse_kl_k2,
    "k3": reverse_kl_k3,
}


def opd_advantage(student_logp: Array, teacher_logp: Array, *, where: Array | None = None) -> Array:
    r"""OPD per-token advantage :math:`A = \mathrm{sg}\big(-(\log S(x) - \log T(x))\big)`.

    The negative sampled-token reverse KL, used as reward and as advantage directly
    (discount 0). References: thunlp/OPD; Thinking Machines "On-Policy Distillation" (Tinker).

    >>> import jax.numpy as jnp
    >>> print(opd_advantage(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0])))
    [-1.  1.]
    """
    s, t = _prep(where, student_logp=student_logp, teacher_logp=teacher_logp)
    return jax.lax.stop_gradient(mask_tokens(t - s, where))


def policy_gradient_loss(logp: Array, advantages: Array, *, where: Array | None = None) -> Array:
    r"""REINFORCE surrogate :math:`\ell = -\mathrm{sg}(A)\,\log\pi(x)`; :math:`\nabla\ell = -A\nabla\log\pi`.

    Args:
      logp: ``[...]`` log-probs of the sampled tokens under the trained policy.
      advantages: ``[...]`` (stop-gradient applied here).
      where: optional bool ``[...]``.

    >>> import jax, jax.numpy as jnp
    >>> print(jax.grad(lambda lp: policy_gradient_loss(lp, jnp.array([2.0])).sum())(jnp.array([-1.0])))
    [-2.]
    """
    lp, adv = _prep(where, logp=logp, advantages=advantages)
    return mask_tokens(-jax.lax.stop_gradient(adv) * lp, where)


def importance_sampled_pg_loss(
    logp: Array, sampler_logp: Array, advantages: Array, *, where: Array | None = None
) -> Array:
    r"""Importance-sampled surrogate (Tinker ``importance_sampling``).

    .. math::
       \ell = -\frac{\pi_\theta(x)}{q(x)} A
            = -\exp\big(\log\pi_\theta(x) - \mathrm{sg}(\log q(x))\big)\,\mathrm{sg}(A)

    with :math:`q` the sampler's policy (its log-probs recorded at sampling time), correcting
    for sampler/learner mismatch. Its gradient at :math:`\pi_\theta = q` equals
    :func:`policy_gradient_loss`'s.

    >>> import jax.numpy as jnp
    >>> print(importance_sampled_pg_loss(jnp.array([-1.0]), jnp.array([-1.0]), jnp.array([2.0])))
    [-2.]
    """
    lp, q, adv = _prep(where, logp=logp, sampler_logp=sampler_logp, advantages=advantages)
    ratio = jnp.exp(lp - jax.lax.stop_gradient(q))
    return mask_tokens(-ratio * jax.lax.stop_gradient(adv), where)


def ppo_clip_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    where: Array | None = None,
) -> Array:
    r"""PPO clipped surrogate with optional dual clip (verl ``compute_policy_loss``).

    .. math::
       r = \exp(\mathrm{clip}(\log\pi - \mathrm{sg}(\log\pi_{old}), -20, 20)), \quad
       \ell_1 = \max\big(-A r,\; -A\,\mathrm{clip}(r, 1-\epsilon_l, 1+\epsilon_h)\big)

    and with dual clip :math:`c > 1`: :math:`\ell = \min(\ell_1, -A c)` where :math:`A < 0`
    (bounds the loss for negative advantages), :math:`\ell = \ell_1` elsewhere.

    Args:
      logp, old_logp, advantages: ``[...]``.
      clip_low, clip_high: :math:`\epsilon_l, \epsilon_h` (DAPO's clip-higher uses 0.2 / 0.28).
      dual_clip: optional :math:`c > 1` (verl ``clip_ratio_c``, typically 3.0).
      where: optional bool ``[...]``.

    References: Schulman et al. 2017 (PPO); Ye et al. 2020 (dual clip); verl core_algos.

    >>> import jax.numpy as jnp
    >>> lp, old, a = jnp.array([0.0]), jnp.log(jnp.array([0.5])), jnp.array([1.0])
    >>> print(ppo_clip_loss(lp, old, a))  # ratio 2 clipped at 1.2
    [-1.2]
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip={dual_clip!r}; it must be > 1.0 (verl uses 3.0) or None")
    lp, old, adv = _prep(where, logp=logp, old_logp=old_logp, advantages=advantages)
    adv = jax.lax.stop_gradient(adv)
    log_ratio = jnp.clip(lp - jax.lax.stop_gradient(old), -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(loss1, loss2)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return mask_tokens(loss, where)


def grpo_advantages(scores_PxN: Array, *, norm_by_std: bool = True, eps: float = 1e-6) -> Array:
    r"""GRPO outcome advantages of ``N`` samples per prompt, ``[P, N]`` -> ``[P, N]``.

    .. math::
       A_{p,i} = \frac{r_{p,i} - \mathrm{mean}_j\, r_{p,j}}{\mathrm{std}_j\, r_{p,j} + \epsilon}

    with the unbiased (``N - 1``) standard deviation, or without the division when
    ``norm_by_std`` is False (Dr. GRPO); a prompt with one sample gets mean 0 and std 1 (its
    raw reward), as verl's ``compute_grpo_outcome_advantage``
    (thunlp/OPD ``verl/verl/trainer/ppo/core_algos.py:265-327``). thunlp's
    ``token_reward_direct_plus_grpo`` (``core_algos.py:883-925``) adds ``weight * A`` to every
    token's OPD advantage of the sample.

    >>> import jax.numpy as jnp
    >>> [round(float(a), 3) for a in grpo_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0]]))[0]]
    [0.866, -0.866, -0.866, 0.866]
    """
    r = jnp.asarray(scores_PxN, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"scores must be [P, N] (prompts x samples), got shape {r.shape}")
    n = r.shape[1]
    if n == 1:
        mean, std = jnp.zeros_like(r), jnp.ones_like(r)
    else:
        mean = jnp.mean(r, axis=1, keepdims=True)
        std = jnp.std(r, axis=1, keepdims=True, ddof=1)
    centred = r - mean
    return jax.lax.stop_gradient(centred / (std + eps) if norm_by_std else centred)
