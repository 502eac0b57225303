r"""Token supports of static size and distributions over them (thunlp/OPD, arXiv 2604.13016).

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
``union-intersection``.) Over a support, :func:`support_divergence` takes any divergence of
:data:`~opd_jax.losses.divergences.LOGPROB_DIVERGENCES`, either renormalising both
distributions on it or adding one tail bucket with the rest of each distribution's mass. It
needs only log-probs gathered at the ids, so it also serves a teacher given as precomputed
top-k ids + log-probs. Re-exported by :mod:`opd_jax.losses.topk`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax.losses import checks
from opd_jax.losses.divergences import LOGPROB_DIVERGENCES

Array = jax.Array

__all__ = [
    "SUPPORTS",
    "TAILS",
    "TopKSupport",
    "gather_logprobs",
    "member",
    "renormalized_logprobs",
    "support_divergence",
    "support_from_ids",
    "tail_bucket_logprobs",
    "tail_logprob",
    "top_k",
    "topk_support",
]


class TopKSupport(NamedTuple):
    """A static-size token set per position: ``ids [..., M]`` int32, ``valid [..., M]`` bool."""

    ids: Array
    valid: Array


# ------------------------------------------------------------------------------------------
# supports
# ------------------------------------------------------------------------------------------


#: Block width of :func:`top_k`'s first pass (ids are cut into blocks of this many).
TOPK_BLOCK = 128


def top_k(x_xV: Array, k: int) -> tuple[Array, Array]:
    """``jax.lax.top_k(x, k)`` -- ``(values [..., k], ids [..., k])`` -- exactly, in two passes.

    The one top-k of the package (losses, metrics, teacher scoring, the sampler). XLA CPU runs
    ``lax.top_k`` over a vocabulary row serially (33 ms for ``[512, 49152]``, k = 16, where one
    read of the array takes 5 ms). So for ``V`` a multiple of :data:`TOPK_BLOCK` with at least
    ``4 k`` blocks, the ids are cut into blocks of ``TOPK_BLOCK``: one pass takes each block's
    max, ``lax.top_k`` picks the ``k`` blocks with the largest maxima, and a second ``lax.top_k``
    runs over those ``k * TOPK_BLOCK`` candidates only. Exact: each of the ``k`` largest values
    lies in a block whose max is at least the ``k``-th largest value, and at most ``k`` blocks
    hold such a value. The chosen blocks are put back in id order, so ties resolve as
    ``lax.top_k`` resolves them (lower id first); ``tests/test_losses_topk.py`` checks values and
    ids against ``lax.top_k`` with ties, ``-inf`` and narrow dtypes.

    Both results sit behind an optimization barrier: without it XLA CPU folds the slice of the
    decomposed top-k's sorted output into later gathers and fusions, no longer recognises sort +
    slice as a top-k, and runs a full ``O(V log V)`` sort of the vocabulary (about 100x slower
    at V = 152k); see openxla/xla#25487. The barrier changes no value.
    """
    *lead, V = x_xV.shape
    blocks = V // TOPK_BLOCK
    if V % TOPK_BLOCK or blocks < 4 * k:
        return jax.lax.optimization_barrier(jax.lax.top_k(x_xV, k))
    x_xBxW = x_xV.reshape(*lead, blocks, TOPK_BLOCK)
    _, best_xK = jax.lax.optimization_barrier(
        jax.lax.top_k(jax.lax.stop_gradient(jnp.max(x_xBxW, axis=-1)), k))
    best_xK = jnp.sort(best_xK, axis=-1)       # id order: ties break as in lax.top_k
    cand_xC = jnp.take_along_axis(x_xBxW, best_xK[..., None], axis=-2).reshape(
        *lead, k * TOPK_BLOCK)
    top_xK, pos_xK = jax.lax.top_k(cand_xC, k)
    ids_xK = (jnp.take_along_axis(best_xK, pos_xK // TOPK_BLOCK, axis=-1) * TOPK_BLOCK
              + pos_xK % TOPK_BLOCK)
    return jax.lax.optimization_barrier((top_xK, ids_xK.astype(jnp.int32)))


def member(ids_a_xA: Array, ids_b_xB: Array) -> Array:
    """``[..., A]`` bool: is ``ids_a[..., i]`` among ``ids_b[..., :]`` (O(A*B), A, B = K).

    >>> import jax.numpy as jnp
    >>> print(member(jnp.array([1, 2, 3]), jnp.array([3, 9, 1])))
    [ True False  True]
    """
    return jnp.any(ids_a_xA[..., :, None] == ids_b_xB[..., None, :], axis=-1)


def _all(ids):
    return jnp.ones(ids.shape, jnp.bool_)


_SUPPORT_BUILDERS: dict[str, Callable[[Array, Array], TopKSupport]] = {
    "student": lambda s, t: TopKSupport(s, _all(s)),
    "teacher": lambda s, t: TopKSupport(t, _all(t)),
    "union": lambda s, t: TopKSupport(
        jnp.concatenate([s, t], -1), jnp.concatenate([_all(s), ~member(t, s)], -1)
    ),
    "intersection": lambda s, t: TopKSupport(s, member(s, t)),
    "symmetric_difference": lambda s, t: TopKSupport(
        jnp.concatenate([s, t], -1), jnp.concatenate([~member(s, t), ~member(t, s)], -1)
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
    checks.check_choice("support", support, SUPPORTS)
    return _SUPPORT_BUILDERS[support](student_ids_xK, teacher_ids_xK)


def topk_support(student_scores: Array, teacher_scores: Array, *, k: int, support: str) -> TopKSupport:
    """Top-k support from student / teacher scores ``[..., V]`` (logits or log-probs).

    Ties are broken as :func:`jax.lax.top_k` does (lower id first). Returns ids ``[..., M]``.
    """
    checks.check_top_k(k, jnp.shape(student_scores)[-1])
    _, s_ids = top_k(jax.lax.stop_gradient(student_scores), k)
    _, t_ids = top_k(jax.lax.stop_gradient(teacher_scores), k)
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
    checks.check_same_shape(
        student_logp_xM=student_logp_xM, teacher_logp_xM=teacher_logp_xM, valid_xM=valid_xM
    )
    checks.check_choice("tail", tail, TAILS)
    if isinstance(divergence, str):
        checks.check_choice("divergence", divergence, LOGPROB_DIVERGENCES)
        divergence = LOGPROB_DIVERGENCES[divergence]
    s = jnp.asarray(student_logp_xM)
    s = s.astype(checks.compute_dtype(s))
    t = jnp.asarray(teacher_logp_xM)
    t = t.astype(checks.compute_dtype(t))
    if tail == "bucket":
        s = tail_bucket_logprobs(s, valid_xM, student_tail_logp)
        t = tail_bucket_logprobs(t, valid_xM, teacher_tail_logp)
    elif student_tail_logp is not None or teacher_tail_logp is not None:
        raise ValueError("tail log-probs were given with tail='renormalize'; pass tail='bucket'")
    else:
        s, t = renormalized_logprobs(s, valid_xM), renormalized_logprobs(t, valid_xM)
    return divergence(s, t, pointwise_clip=pointwise_clip)
