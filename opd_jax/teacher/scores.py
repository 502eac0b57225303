"""A teacher's scores of completions, and the losses they can feed without the teacher's logits.

A teacher served from another process or read from a cache cannot hand the trainer its
``[B, N, V]`` logits; it hands, per completion position (the position that *predicts* completion
token ``j``), what the sparse objectives need (:class:`TeacherScores`):

* its own top-``K`` ids and full-vocabulary log-probs, and its logsumexp;
* its log-probs at ``Q`` caller-given ids: the student's top-k ids at that position and the
  sampled token (the OPD paper's default loss scores the teacher *at the student's top-k*, which
  an inference server's own top-k cannot give).

:func:`dense_teacher_logits` turns one chunk of those back into ``[C, V]`` log-probs that agree
with the teacher's at every known id, and spread the remaining mass ``1 - sum_known p`` evenly
over the unknown ids:

.. math::
    z_v = \\log p_T(v) \\;(v \\in \\mathcal{K}),\\qquad
    z_v = \\log\\frac{1 - \\sum_{u \\in \\mathcal{K}} p_T(u)}{V - |\\mathcal{K}|} \\;(v \\notin
    \\mathcal{K})

so ``softmax(z) = z`` exactly at the known ids, each unknown value is below the teacher's
``K``-th log-prob (an unknown id's probability is at most the ``K``-th), and the teacher's top-K
of ``z`` is its true top-K. Every objective that only reads the teacher at known ids (top-k
supports with ``renormalize`` or ``bucket`` tails, the top-k reward, the sampled-token forms)
gets exactly the in-process values; the teacher's entropy metric becomes an estimate with a
uniform tail (an upper bound). Full-vocabulary divergences need all ``V`` values and are refused
(:func:`check_objective`).

Shape letters follow :mod:`opd_jax`; ``Q`` = caller-given ids per position.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TeacherScores", "dense_teacher_logits", "check_objective", "query_ids",
           "SCORE_OBJECTIVES", "query_misses", "student_topk_needed"]

#: The objectives a served or cached teacher can train (all read the teacher at known ids only).
SCORE_OBJECTIVES = ("topk_reward", "sampled_token_rkl", "reverse_kl / forward_kl / "
                    "generalized_jsd / skew_* with loss.top_k set (any support, tail renormalize or "
                    "bucket)")


@flax.struct.dataclass
class TeacherScores:
    """What a teacher returns for ``B`` completions of ``N`` tokens.

    Position ``j`` is the one predicting completion token ``j`` (the teacher row's position
    ``Pt - 1 + j``). All log-probs are ``log softmax(logits / teacher_temperature)`` over the full
    vocabulary; masked positions hold zeros.

    Attributes:
      topk_ids: ``[B, N, K]`` int32 the teacher's most probable next tokens, most probable first.
      topk_logprobs: ``[B, N, K]`` float32 their log-probs.
      logsumexp: ``[B, N]`` float32 ``logsumexp(logits / teacher_temperature)``.
      query_ids: ``[B, N, Q]`` int32 the ids the caller asked about (student top-k, sampled token).
      query_logprobs: ``[B, N, Q]`` float32 the teacher's log-probs there.
    """

    topk_ids: jax.Array
    topk_logprobs: jax.Array
    logsumexp: jax.Array
    query_ids: jax.Array
    query_logprobs: jax.Array

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])

    def trim(self, n: int) -> "TeacherScores":
        """The first ``n`` completion positions."""
        return jax.tree.map(lambda x: x[:, :n], self)


def query_ids(completion_BxN, student_topk_BxNxK=None) -> np.ndarray:
    """The ids to ask a teacher about, ``[B, N, Q]`` int32: the student's top-k at each
    completion position (when given) and the sampled token, last."""
    tokens = np.asarray(completion_BxN, np.int32)[..., None]
    if student_topk_BxNxK is None:
        return tokens
    return np.concatenate([np.asarray(student_topk_BxNxK, np.int32), tokens], axis=-1)


def dense_teacher_logits(ids_CxM: jax.Array, logprobs_CxM: jax.Array, vocab_size: int,
                         teacher_temperature: float = 1.0) -> jax.Array:
    """``[C, V]`` float32 logits whose ``softmax(z / teacher_temperature)`` equals the teacher's
    distribution at the ``M`` known ids and spreads the rest of the mass evenly (module
    docstring). Repeated ids (the teacher's top-k and the student's overlap) must carry the same
    log-prob (they do: one pass scores both); rows with no known mass give a uniform row."""
    C = ids_CxM.shape[0]
    rows = jnp.arange(C)[:, None]
    known_CxV = jnp.zeros((C, vocab_size), bool).at[rows, ids_CxM].set(True)
    lp_CxV = jnp.full((C, vocab_size), -jnp.inf, jnp.float32).at[rows, ids_CxM].set(
        logprobs_CxM.astype(jnp.float32))
    p_known_C = jnp.sum(jnp.where(known_CxV, jnp.exp(lp_CxV), 0.0), axis=-1)
    n_unknown_C = vocab_size - jnp.sum(known_CxV, axis=-1)
    rest_C = jnp.clip(1.0 - p_known_C, jnp.finfo(jnp.float32).tiny, 1.0)
    fill_C = jnp.log(rest_C) - jnp.log(jnp.maximum(n_unknown_C, 1).astype(jnp.float32))
    z_CxV = jnp.where(known_CxV, lp_CxV, fill_C[:, None])
    return z_CxV * teacher_temperature


def query_misses(student_logits_CxV: jax.Array, query_ids_CxQ: jax.Array, k: int) -> jax.Array:
    """``[C]`` float32 number of the student's top-``k`` ids (recomputed from its logits in the
    step) the teacher was not asked about: 0 when the rollout's recorded top-k matches (a near
    tie can flip the k-th id between the sampler's pass and the step's)."""
    _, ids_CxK = jax.lax.top_k(student_logits_CxV, k)
    hit = jnp.any(ids_CxK[:, :, None] == query_ids_CxQ[:, None, :], axis=-1)
    return jnp.sum(~hit, axis=-1).astype(jnp.float32)


def check_objective(spec, where: str = "loss") -> None:
    """``ValueError`` unless objective ``spec`` (a ``LossSpec``) reads the teacher at known ids
    only: a served or cached teacher returns top-k and caller-given ids, not ``V`` logits."""
    obj = spec.objective
    if obj in ("topk_reward", "sampled_token_rkl"):
        return
    if spec.top_k is None:
        raise ValueError(
            f"{where}.objective={obj!r} with top_k: null needs the teacher's full-vocabulary "
            "distribution, which a served or cached teacher does not send; objectives that work: "
            + "; ".join(SCORE_OBJECTIVES) + ". Set loss.top_k (e.g. 16), or load the teacher "
            "in-process (teacher.source: a model)")


def student_topk_needed(spec) -> int:
    """How many of the student's top ids a teacher must be asked about for objective ``spec``:
    ``loss.top_k`` when the support involves the student's top-k (every support but
    ``teacher``), else 0 (the teacher's own top-k and the sampled token suffice)."""
    if spec.top_k is None or spec.resolved_support == "teacher":
        return 0
    return int(spec.top_k)
