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
* :mod:`~opd_jax.losses.chunk_map` -- memory-bounded maps of per-token functions over hidden
  states and the unembedding, one chunk of tokens at a time (engine:
  :mod:`~opd_jax.losses.chunk_engine`; chunks and vocabulary blocks:
  :mod:`~opd_jax.losses.chunk_layout`); the chunked forms below build on it.
* :mod:`~opd_jax.losses.chunked_divergences` -- the divergences above and the OPD top-k objective
  from hidden states (dense teacher or precomputed teacher top-k).
* :mod:`~opd_jax.losses.chunked_scoring` -- top-k ids / log-probs, log-probs of given ids and
  entropy from hidden states (a scoring job's outputs).
* :mod:`~opd_jax.losses.unembedding` -- the chunked losses' unembedding operand: a ``[D, V]``
  matrix, or a tied model's ``[V, D]`` table (``TiedUnembedding``: no transposed copy).
* :mod:`~opd_jax.losses.checks` -- the input checks shared by all of the above.

The package namespace re-exports every module's ``__all__``.
"""

from opd_jax.losses import (
    chunk_map,
    chunked_divergences,
    chunked_scoring,
    divergences,
    estimators,
    reductions,
    topk,
    unembedding,
)
from opd_jax.losses.chunk_map import *  # noqa: F403
from opd_jax.losses.chunked_divergences import *  # noqa: F403
from opd_jax.losses.chunked_scoring import *  # noqa: F403
from opd_jax.losses.divergences import *  # noqa: F403
from opd_jax.losses.estimators import *  # noqa: F403
from opd_jax.losses.reductions import *  # noqa: F403
from opd_jax.losses.topk import *  # noqa: F403
from opd_jax.losses.unembedding import *  # noqa: F403

__all__ = [
    *chunk_map.__all__,
    *chunked_divergences.__all__,
    *chunked_scoring.__all__,
    *divergences.__all__,
    *estimators.__all__,
    *reductions.__all__,
    *topk.__all__,
    *unembedding.__all__,
]
