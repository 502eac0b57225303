r"""Pure per-token losses for on-policy distillation, importable by any JAX trainer.

Conventions (optax style): a loss is a pure function of arrays returning the *unreduced*
per-token array ``[...]`` for logits ``[..., V]``; masks are ``where=`` (bool, per-token,
broadcastable) and masked positions are exactly 0 with zero gradient; ``temperature=``
divides logits before the log-softmax; math runs in float32 whatever the input dtype (bf16 in,
float32 out; float64 stays float64). Reduction is a separate helper the caller picks
(:mod:`~opd_jax.losses.reductions`).

Modules:

* :mod:`~opd_jax.losses.elementwise` -- per-vocabulary divergence terms from log-probs,
  float32 log-softmax with masking, the point-wise-clipped vocabulary sum.
* :mod:`~opd_jax.losses.divergences` -- full-vocabulary KL / reverse KL / generalized JSD /
  skew KLs at log-prob and logit level, with OPSD's point-wise clip; name registries.
* :mod:`~opd_jax.losses.support` -- OPD top-k shared supports (static size + validity mask)
  and divergences over a support (renormalised or with a tail bucket).
* :mod:`~opd_jax.losses.topk` -- top-k divergence from logits, the OPD top-k reward and its
  policy-gradient surrogate.
* :mod:`~opd_jax.losses.estimators` -- sampled-token KL estimators (k1, k2, k3), the OPD
  advantage, policy-gradient / importance-sampling / PPO-clip surrogates, token log-probs.
* :mod:`~opd_jax.losses.reductions` -- verl ``loss_agg_mode`` reductions.
* :mod:`~opd_jax.losses.chunked` -- memory-bounded forms over hidden states and the
  unembedding that call the functions above per chunk of tokens.
"""

from opd_jax.losses.chunked import (
    TeacherTopK,
    chunked_divergence,
    chunked_divergence_loss,
    chunked_logits_map,
    chunked_logprobs_at_ids,
    chunked_teacher_topk,
    chunked_token_logprobs,
    chunked_token_logprobs_and_entropy,
    chunked_topk_policy_gradient_loss,
)
from opd_jax.losses.divergences import (
    DIVERGENCES,
    LOGPROB_DIVERGENCES,
    forward_kl,
    forward_kl_from_logprobs,
    forward_kl_terms,
    generalized_jsd,
    generalized_jsd_from_logprobs,
    generalized_jsd_terms,
    kl_terms,
    mask_tokens,
    mixture_logprobs,
    normalized_logprobs,
    reverse_kl,
    reverse_kl_from_logprobs,
    reverse_kl_terms,
    skew_forward_kl,
    skew_forward_kl_from_logprobs,
    skew_forward_kl_terms,
    skew_reverse_kl,
    skew_reverse_kl_from_logprobs,
    skew_reverse_kl_terms,
    sum_terms,
)
from opd_jax.losses.estimators import (
    KL_ESTIMATORS,
    importance_sampled_pg_loss,
    opd_advantage,
    policy_gradient_loss,
    ppo_clip_loss,
    reverse_kl_k1,
    reverse_kl_k2,
    reverse_kl_k3,
    token_logprobs,
)
from opd_jax.losses.reductions import (
    REDUCTIONS,
    sequence_mean,
    sequence_sum_mean,
    sequence_sum_norm,
    sequence_sum_token_mean,
    token_mean,
)
from opd_jax.losses.topk import (
    SUPPORTS,
    TAILS,
    WEIGHTS,
    TopKReward,
    TopKSupport,
    gather_logprobs,
    renormalized_logprobs,
    support_advantages,
    support_divergence,
    support_from_ids,
    support_policy_gradient_loss,
    tail_bucket_logprobs,
    tail_logprob,
    topk_divergence,
    topk_policy_gradient_loss,
    topk_reward,
    topk_support,
)

__all__ = [
    # chunked (memory-bounded forms over hidden states + unembedding)
    "TeacherTopK",
    "chunked_divergence",
    "chunked_divergence_loss",
    "chunked_logits_map",
    "chunked_logprobs_at_ids",
    "chunked_teacher_topk",
    "chunked_token_logprobs",
    "chunked_token_logprobs_and_entropy",
    "chunked_topk_policy_gradient_loss",
    # divergences
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
    # estimators
    "KL_ESTIMATORS",
    "importance_sampled_pg_loss",
    "opd_advantage",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "reverse_kl_k1",
    "reverse_kl_k2",
    "reverse_kl_k3",
    "token_logprobs",
    # reductions
    "REDUCTIONS",
    "sequence_mean",
    "sequence_sum_mean",
    "sequence_sum_norm",
    "sequence_sum_token_mean",
    "token_mean",
    # top-k
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
