"""The ``loss:`` section: :class:`LossSpec`, the objective and how it is estimated and reduced.

Null fields resolve to the defaults of the objective's source (thunlp/OPD for ``topk_reward`` /
``sampled_token_rkl``, GKD / TRL / OPSD for the divergences); a field the objective ignores is
an error, not silence.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from opd_jax.config.schema import Objective, Support, need, need_positive

__all__ = ["LossSpec", "PG_OBJECTIVES", "REDUCTIONS"]

#: Objectives whose advantage is thunlp/OPD's (per-token reward, policy-gradient update).
PG_OBJECTIVES = ("topk_reward", "sampled_token_rkl")
REDUCTIONS = ("token_mean", "sequence_mean", "sequence_sum_token_mean", "sequence_sum_mean",
              "sequence_sum_norm")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Distillation objective and how it is estimated and reduced.

    A field the chosen ``objective`` does not use must stay null (an error names it otherwise);
    null fields resolve to the defaults of the objective's source (the ``resolved_*``
    properties):

    * ``top_k``: ids kept per position; null = the full vocabulary (dense). ``topk_reward``
      needs a number (16 in the paper); ``sampled_token_rkl`` scores the sampled token only.
    * ``support``: whose top-k ids (null = "student"); intersection / symmetric_difference are
      topk_reward only. ``tail``: the rest of the vocabulary renormalised away (null =
      "renormalize") or kept as one "bucket" (top-k divergences only).
    * ``weights`` (topk_reward; null = "student_p"): "none" is ``1/|valid_t|``;
      ``normalize_weights`` null = thunlp/OPD's choice (renormalised over the valid support,
      raw probabilities / weight 1 on symmetric_difference).
    * ``beta`` (generalized_jsd; null = 0.5: 0 = KL(T||S), 1 = KL(S||T)); ``alpha`` (skew KLs;
      null = 0.1); ``pointwise_clip`` (divergences: clip each per-element term, OPSD 0.05).
    * ``temperature`` divides the student's logits; ``teacher_temperature`` the teacher's. Null
      follows the objective's source: 1.0 for topk_reward / sampled_token_rkl (thunlp/OPD's
      ``TEACHER_TEMPERATURE``), ``temperature`` for the divergences (GKD / TRL / OPSD).
    * ``pg_loss`` (sampled_token_rkl; null = "plain"): the surrogate; ``importance_sampled`` /
      ``ppo_clip`` divide by ``old_logprobs`` (null = "learner": the learner's own detached
      log-prob, ratio exactly 1 on-policy as thunlp/verl; "sampler": the sampler's recorded
      log-prob at ``temperature``, untruncated). ``clip_low`` / ``clip_high`` (null = 0.2) and
      ``clip_ratio_c`` (verl's dual clip, null = 3.0; ``.inf`` = off) are ppo_clip's.
    * ``grpo_outcome_weight``: add thunlp's GRPO outcome advantage (``token_reward_direct_plus_
      grpo``: the answer's reward normalised over the prompt's ``n_samples``; null = off) with
      ``grpo_norm_by_std`` (null = true).
    * ``estimator``: sampled-token KL estimator of the logged ``sampled_kl_*`` metric.
    * ``reduction``: token_mean / sequence_mean (verl seq-mean-token-mean) /
      sequence_sum_token_mean / sequence_sum_mean (seq-mean-token-sum) / sequence_sum_norm
      (seq-mean-token-sum-norm, horizon = the sampler's max_new_tokens).
    * ``lambda_on_policy``: GKD fraction of on-policy batches (the rest are teacher-generated,
      seq-KD). ``chunk_size``: tokens per chunk of the memory-bounded loss.
    """

    objective: Objective = "reverse_kl"
    beta: Optional[float] = None
    alpha: Optional[float] = None
    top_k: Optional[int] = None
    support: Optional[Support] = None
    weights: Optional[Literal["student_p", "teacher_p", "none"]] = None
    normalize_weights: Optional[bool] = None
    tail: Optional[Literal["renormalize", "bucket"]] = None
    pointwise_clip: Optional[float] = None
    temperature: float = 1.0
    teacher_temperature: Optional[float] = None
    estimator: Literal["k1", "k2", "k3"] = "k1"
    pg_loss: Optional[Literal["plain", "importance_sampled", "ppo_clip"]] = None
    old_logprobs: Optional[Literal["learner", "sampler"]] = None
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    clip_ratio_c: Optional[float] = None
    grpo_outcome_weight: Optional[float] = None
    grpo_norm_by_std: Optional[bool] = None
    reduction: Literal["token_mean", "sequence_mean", "sequence_sum_token_mean",
                       "sequence_sum_mean", "sequence_sum_norm"] = "token_mean"
    lambda_on_policy: float = 1.0
    chunk_size: int = 512

    @property
    def resolved_support(self) -> Optional[str]:
        if self.objective == "sampled_token_rkl" or (self.top_k is None and
                                                     self.objective != "topk_reward"):
            return None
        return self.support or "student"

    @property
    def resolved_weights(self) -> Optional[str]:
        return (self.weights or "student_p") if self.objective == "topk_reward" else None

    @property
    def resolved_tail(self) -> str:
        return self.tail or "renormalize"

    @property
    def resolved_beta(self) -> float:
        return 0.5 if self.beta is None else self.beta

    @property
    def resolved_alpha(self) -> float:
        return 0.1 if self.alpha is None else self.alpha

    @property
    def resolved_teacher_temperature(self) -> float:
        if self.teacher_temperature is not None:
            return self.teacher_temperature
        return 1.0 if self.objective in PG_OBJECTIVES else self.temperature

    @property
    def resolved_pg_loss(self) -> str:
        return self.pg_loss or "plain"

    @property
    def resolved_old_logprobs(self) -> str:
        return self.old_logprobs or "learner"

    @property
    def resolved_clip(self) -> tuple[float, float, float]:
        """``(clip_low, clip_high, clip_ratio_c)`` of ppo_clip (verl: 0.2, 0.2, 3.0)."""
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return pick(self.clip_low, 0.2), pick(self.clip_high, 0.2), pick(self.clip_ratio_c, 3.0)

    def _unused(self) -> dict[str, str]:
        """Fields the objective ignores, each with why."""
        obj, out = self.objective, {}
        if obj != "generalized_jsd":
            out["beta"] = "beta is the generalized_jsd mixture"
        if not obj.startswith("skew_"):
            out["alpha"] = "alpha is the skew of skew_forward_kl / skew_reverse_kl"
        if obj == "sampled_token_rkl":
            out["top_k"] = "sampled_token_rkl scores the sampled token only"
            out["support"] = "sampled_token_rkl scores the sampled token only"
        if obj != "topk_reward":
            out["weights"] = "weights apply to objective topk_reward only"
            out["normalize_weights"] = "normalize_weights applies to objective topk_reward only"
        if obj in PG_OBJECTIVES or self.top_k is None:
            out["tail"] = ("tail applies to a top-k divergence (top_k set, objective not "
                           "topk_reward / sampled_token_rkl)")
        if obj in PG_OBJECTIVES:
            out["pointwise_clip"] = f"{obj} has no per-element divergence terms to clip"
        if obj != "sampled_token_rkl":
            why = ("the surrogate is topk_reward's own on-policy -sum_k A_k log S(x_k) (the "
                   "reference's top-k PPO ratio is exactly 1, verl core_algos.py:1109-1117)"
                   if obj == "topk_reward" else f"{obj} is not a policy-gradient objective")
            out["pg_loss"] = why
        if self.resolved_pg_loss == "plain" or obj != "sampled_token_rkl":
            out["old_logprobs"] = "old_logprobs is the denominator of importance_sampled / ppo_clip"
        if self.resolved_pg_loss != "ppo_clip" or obj != "sampled_token_rkl":
            for name in ("clip_low", "clip_high", "clip_ratio_c"):
                out[name] = f"{name} applies to pg_loss ppo_clip only"
        if obj not in PG_OBJECTIVES:
            out["grpo_outcome_weight"] = "the GRPO outcome advantage is added to a policy gradient"
        if self.grpo_outcome_weight is None:
            out["grpo_norm_by_std"] = "grpo_norm_by_std needs grpo_outcome_weight"
        return out

    def validate(self) -> None:
        obj = self.objective
        for name, why in self._unused().items():
            need(getattr(self, name) is None, name, getattr(self, name),
                 f"null (or absent) for objective {obj}: {why}")
        if obj not in PG_OBJECTIVES:
            need(self.support in (None, "student", "teacher", "union"), "support", self.support,
                 f"one of student / teacher / union for {obj} (intersection and "
                 "symmetric_difference are topk_reward supports)")
            need(self.support is None or self.top_k is not None, "support", self.support,
                 "null with top_k null (the full vocabulary has no top-k support; set top_k)")
        need(self.beta is None or 0 <= self.beta <= 1, "beta", self.beta, "a number in [0, 1]")
        need(self.alpha is None or 0 < self.alpha < 1, "alpha", self.alpha, "a number in (0, 1)")
        need(self.top_k is None or self.top_k >= 1, "top_k", self.top_k,
             "an integer >= 1, or null for the full vocabulary")
        need(self.top_k is not None or obj != "topk_reward", "top_k", self.top_k,
             "an integer >= 1 for topk_reward (the paper uses 16)")
        need(self.pointwise_clip is None or self.pointwise_clip > 0, "pointwise_clip",
             self.pointwise_clip, "null or a positive number")
        need(self.temperature > 0, "temperature", self.temperature, "a positive number")
        need(self.teacher_temperature is None or self.teacher_temperature > 0,
             "teacher_temperature", self.teacher_temperature, "null or a positive number")
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            need(value is None or value > 0, name, value, "a positive number")
        need(self.clip_ratio_c is None or self.clip_ratio_c > 1, "clip_ratio_c",
             self.clip_ratio_c, "a number > 1 (verl uses 3.0; .inf turns the dual clip off)")
        need(self.grpo_outcome_weight is None or self.grpo_outcome_weight > 0,
             "grpo_outcome_weight", self.grpo_outcome_weight, "null (off) or a positive number")
        need(0 <= self.lambda_on_policy <= 1, "lambda_on_policy", self.lambda_on_policy,
             "a fraction in [0, 1] (1 = always on-policy)")
        need_positive(self, "chunk_size")
