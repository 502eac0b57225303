"""Map a ``LossSpec`` to one per-token function of a chunk of student and teacher logits.

Every objective of :mod:`opd_jax.losses` is reachable from config: the per-chunk function receives
``student_logits_CxV``, ``teacher_logits_CxV`` and the chunk's extras (sampled ``tokens_C``,
``mask_C``, ``sampler_logprobs_C``) and returns the per-token loss ``[C]`` plus the mechanism
metrics of the same logits (stop-gradient), so one chunked pass gives both.

Objectives:

* ``reverse_kl``, ``forward_kl``, ``generalized_jsd`` (``beta``), ``skew_forward_kl`` /
  ``skew_reverse_kl`` (``alpha``): full-vocabulary divergence (``top_k: null``) or restricted to a
  top-k ``support`` with ``tail`` renormalisation / bucket; ``pointwise_clip`` clips each element
  before the vocabulary sum (OPSD).
* ``topk_reward``: the OPD paper's per-(token, k) rewards ``-(log S - log T)·w`` with a
  policy-gradient surrogate ``-Σ_k sg(A_k) log S(x_k)``.
* ``sampled_token_rkl``: thunlp / Tinker: advantage ``-(log S(x) - log T(x))`` of the sampled token
  (k1 estimator; ``estimator`` picks k1/k2/k3 for the logged value) with the ``pg_loss`` surrogate
  ``plain`` (``-A log S``), ``importance_sampled`` (``-exp(log S - log S_old) A``) or
  ``ppo_clip`` (dual clip ``clip_ratio_c``); old log-probs are the learner's own, detached
  (ratio 1 on-policy, as verl) or the sampler's at the loss temperature.
* with ``grpo_outcome_weight`` the batch carries ``outcome_advantage`` ``[B, N]`` (weight x the
  GRPO advantage of each sample's graded answer): added to the sampled token's advantage
  (thunlp ``token_reward_direct_plus_grpo``), or as ``-A log S(x_t)`` next to the top-k surrogate.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from opd_jax import losses
from opd_jax.config.loss import LossSpec
from opd_jax.metrics import mechanism_metrics_from_logits, mechanism_metrics_from_logprobs
from opd_jax.teacher.scores import dense_teacher_logits, query_misses

DIVERGENCE_OBJECTIVES = ("reverse_kl", "forward_kl", "generalized_jsd", "skew_forward_kl",
                         "skew_reverse_kl")
ChunkFn = Callable[[jax.Array, jax.Array, dict], dict]


def _divergence_kwargs(spec: LossSpec) -> dict:
    kw = {"teacher_temperature": spec.resolved_teacher_temperature}
    if spec.objective == "generalized_jsd":
        kw["beta"] = spec.resolved_beta
    if spec.objective.startswith("skew_"):
        kw["alpha"] = spec.resolved_alpha
    if spec.pointwise_clip is not None:
        kw["pointwise_clip"] = spec.pointwise_clip
    return kw


def _divergence_loss(spec: LossSpec, s_logits, t_logits, ex):
    if spec.top_k is None:
        return _shared_divergence(spec, s_logits, t_logits, ex)[0]
    kw = _divergence_kwargs(spec)
    t_temp = kw.pop("teacher_temperature")
    fn = functools.partial(losses.DIVERGENCES[spec.objective], **kw) if kw else spec.objective
    return losses.topk_divergence(
        s_logits, t_logits, k=spec.top_k, support=spec.resolved_support, divergence=fn,
        tail=spec.resolved_tail, where=ex["mask"], temperature=spec.temperature,
        teacher_temperature=t_temp)


def _outcome_term(spec: LossSpec, s_logits, ex):
    """``-A_outcome log S(x_t)`` of the sampled token: the GRPO part of thunlp's
    ``token_reward_direct_plus_grpo`` next to the top-k surrogate (0 without the outcome)."""
    if "outcome_advantage" not in ex:
        return 0.0
    s_lp = losses.token_logprobs(s_logits, ex["tokens"], temperature=spec.temperature)
    return losses.policy_gradient_loss(s_lp, ex["outcome_advantage"], where=ex["mask"])


def _topk_reward_loss(spec: LossSpec, s_logits, t_logits, ex):
    reward = losses.topk_reward(s_logits, t_logits, k=spec.top_k, support=spec.resolved_support,
                                weights=spec.resolved_weights, normalize=spec.normalize_weights,
                                where=ex["mask"], temperature=spec.temperature,
                                teacher_temperature=spec.resolved_teacher_temperature)
    return losses.topk_policy_gradient_loss(s_logits, reward, where=ex["mask"],
                                            temperature=spec.temperature) + _outcome_term(
                                                spec, s_logits, ex)


def _sampled_token_loss(spec: LossSpec, s_logits, t_logits, ex):
    mask = ex["mask"]
    s_lp = losses.token_logprobs(s_logits, ex["tokens"], temperature=spec.temperature)
    t_lp = losses.token_logprobs(jax.lax.stop_gradient(t_logits), ex["tokens"],
                                 temperature=spec.resolved_teacher_temperature)
    adv = losses.opd_advantage(s_lp, t_lp, where=mask)
    if "outcome_advantage" in ex:  # token_reward_direct_plus_grpo: direct + weight * GRPO
        adv = adv + jnp.where(mask, ex["outcome_advantage"], 0.0)
    pg = spec.resolved_pg_loss
    if pg == "plain":
        return losses.policy_gradient_loss(s_lp, adv, where=mask)
    # old log-probs: the learner's own (detached; ratio exactly 1 on-policy, as verl recomputes
    # old_log_prob with the rollout's weights) or the sampler's, recorded at spec.temperature
    old = (jax.lax.stop_gradient(s_lp) if spec.resolved_old_logprobs == "learner"
           else ex["sampler_logprobs"])
    if pg == "importance_sampled":
        return losses.importance_sampled_pg_loss(s_lp, old, adv, where=mask)
    low, high, c = spec.resolved_clip
    return losses.ppo_clip_loss(s_lp, old, adv, clip_low=low, clip_high=high,
                                dual_clip=None if c == float("inf") else c, where=mask)


_OBJECTIVES = {
    **{name: _divergence_loss for name in DIVERGENCE_OBJECTIVES},
    "topk_reward": _topk_reward_loss,
    "sampled_token_rkl": _sampled_token_loss,
}


def _shares_logprobs(spec: LossSpec) -> bool:
    """Objectives whose loss computes both full-vocabulary log-probs: the metrics reuse them."""
    return spec.objective in DIVERGENCE_OBJECTIVES and spec.top_k is None


def _shared_divergence(spec: LossSpec, s_logits, t_logits, ex):
    """``(loss [C], student_logp [C, V], teacher_logp [C, V])``: the full-vocabulary divergence
    (``top_k: null``) from one pair of log-softmaxes (:func:`~opd_jax.losses.pair_logprobs`,
    masked rows zeroed first), as :func:`~opd_jax.losses.reverse_kl` and its twins compute it;
    :func:`_divergence_loss` uses its loss, the metrics its log-probs."""
    kw = _divergence_kwargs(spec)
    s_lp, t_lp = losses.pair_logprobs(s_logits, t_logits, where=ex["mask"],
                                      temperature=spec.temperature,
                                      teacher_temperature=kw.pop("teacher_temperature"))
    per_token = losses.LOGPROB_DIVERGENCES[spec.objective](s_lp, t_lp, **kw)
    return losses.mask_tokens(per_token, ex["mask"]), s_lp, t_lp


def make_chunk_fn(spec: LossSpec, *, metrics_k: int = 16, with_metrics: bool = True) -> ChunkFn:
    """The per-chunk function for ``opd_jax.losses.chunk_map.chunked_student_logits_map``.

    Returns ``fn(student_logits_CxV, teacher_logits_CxV, extras) -> {"loss": [C], ...metrics}``
    where extras holds ``tokens`` [C] (the token each position predicted), ``mask`` [C] bool and
    ``sampler_logprobs`` [C]; loss is 0 where ``mask`` is False. Full-vocabulary divergences hand
    their two log-softmaxes to the metrics (two ``[C, V]`` passes fewer per chunk).
    """
    objective = _OBJECTIVES[spec.objective]
    k = min(metrics_k, spec.top_k or metrics_k)
    shared = with_metrics and _shares_logprobs(spec)

    def fn(s_logits, t_logits, ex):
        t_logits = jax.lax.stop_gradient(t_logits)
        kk = min(k, s_logits.shape[-1])
        if shared:
            loss, s_lp, t_lp = _shared_divergence(spec, s_logits, t_logits, ex)
            out = {"loss": loss, **mechanism_metrics_from_logprobs(
                s_lp, t_lp, ex["tokens"], k=kk, where=ex["mask"],
                sampler_logprobs=ex["sampler_logprobs"])}
        else:
            out = {"loss": objective(spec, s_logits, t_logits, ex)}
        if with_metrics and not shared:   # the other objectives: metrics from the logits
            out.update(mechanism_metrics_from_logits(
                s_logits, t_logits, ex["tokens"], k=kk, where=ex["mask"],
                temperature=spec.temperature,
                teacher_temperature=spec.resolved_teacher_temperature,
                sampler_logprobs=ex["sampler_logprobs"]))
        if with_metrics:
            out["sampled_kl_" + spec.estimator] = jax.lax.stop_gradient(
                losses.KL_ESTIMATORS[spec.estimator](out["student_token_logprob"],
                                                     out["teacher_token_logprob"],
                                                     where=ex["mask"]))
        return out

    return fn


def with_teacher_scores(chunk_fn: ChunkFn, *, teacher_temperature: float,
                        student_k: int = 0) -> ChunkFn:
    """``chunk_fn`` fed by a served or cached teacher: the chunk's ``extras["teacher_scores"]``
    (top-k and the log-probs at the queried ids, ``[C, K]`` / ``[C, Q]``) become ``[C, V]``
    teacher logits (:func:`~opd_jax.teacher.scores.dense_teacher_logits`: exact at every id the
    teacher was asked about, the rest of its mass spread evenly), so the objective and its metrics
    run unchanged. With ``student_k`` (the student's top-k ids were queried, first in
    ``query_ids``) it also returns ``teacher_query_miss``: how many of the student's top-k ids,
    recomputed from its logits in the step, the teacher was not asked about (0 unless a near tie
    flipped between the sampler's pass and the step's)."""

    def fn(s_logits, t_logits, ex):
        del t_logits   # None: the step runs no teacher
        sc = ex["teacher_scores"]
        ids = jnp.concatenate([sc.topk_ids, sc.query_ids], axis=-1)
        lps = jnp.concatenate([sc.topk_logprobs, sc.query_logprobs], axis=-1)
        z = dense_teacher_logits(ids, lps, s_logits.shape[-1], teacher_temperature)
        out = chunk_fn(s_logits, z, ex)
        if student_k:
            miss = query_misses(jax.lax.stop_gradient(s_logits), sc.query_ids, student_k)
            out["teacher_query_miss"] = jnp.where(ex["mask"], miss, 0.0)
        return out

    return fn


def sft_chunk_fn(s_logits, t_logits, ex):
    """Cross-entropy on the given tokens (cold start): ``-log S(x_t)``, 0 where masked."""
    del t_logits
    lp = losses.token_logprobs(s_logits, ex["tokens"])
    return {"loss": jnp.where(ex["mask"], -lp, 0.0), "student_token_logprob": jnp.where(
        ex["mask"], jax.lax.stop_gradient(lp), 0.0)}


def reduction_fn(spec: LossSpec, max_new_tokens: int) -> Callable:
    """``fn(per_token_BxN, mask_BxN) -> scalar`` of ``spec.reduction``; ``sequence_sum_norm``
    (verl seq-mean-token-sum-norm) divides by the constant horizon ``max_new_tokens``."""
    fn = getattr(losses, spec.reduction)
    if spec.reduction == "sequence_sum_norm":
        return functools.partial(fn, horizon=max_new_tokens)
    return fn
