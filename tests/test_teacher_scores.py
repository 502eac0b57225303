"""A served or cached teacher's scores in place of its logits: the dense reconstruction against a
float64 reference, and a train step whose loss, metrics and gradients from ``TeacherScores`` equal
the in-process teacher's (float32 rounding) for every objective that reads the teacher at known
ids; the rest are refused by name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.config.loss import LossSpec
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.teacher import check_objective, dense_teacher_logits, query_ids
from opd_jax.teacher.scores import query_misses, student_topk_needed
from opd_jax.teacher.scoring import score, score_completions
from opd_jax.train.objectives import make_chunk_fn, with_teacher_scores
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec, loss_and_metrics

V = 64
CS = ModelConfig(vocab_size=V, n_layers=2, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                 head_dim=8)
CT = ModelConfig(vocab_size=V, n_layers=2, d_model=48, ffn_dim=64, n_heads=4, n_kv_heads=2,
                 head_dim=12)


def test_dense_teacher_logits_is_exact_at_known_ids_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, V))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-lp, -1)[:, :6]
    extra = rng.integers(0, V, (5, 3))
    ids = np.concatenate([top, extra, top[:, :2]], -1)       # repeats carry the same value
    known = np.take_along_axis(lp, ids, -1)
    for tau in (1.0, 0.7):
        z = np.asarray(dense_teacher_logits(jnp.asarray(ids), jnp.asarray(known, jnp.float32), V,
                                            tau), np.float64) / tau
        zl = z - np.log(np.exp(z).sum(-1, keepdims=True))
        np.testing.assert_allclose(np.take_along_axis(zl, ids, -1), known, atol=2e-6)
        # the teacher's top-k of the reconstruction is its true top-k
        np.testing.assert_array_equal(np.sort(np.argsort(-zl, -1)[:, :6], -1), np.sort(top, -1))
        # the unknown ids share the rest of the mass evenly
        mask = np.ones((5, V), bool)
        np.put_along_axis(mask, ids, False, -1)
        for r in range(5):
            rest = 1 - np.exp(lp[r][~mask[r]]).sum()
            np.testing.assert_allclose(np.exp(zl[r][mask[r]]), rest / mask[r].sum(), rtol=1e-4)


def test_query_misses_counts_unqueried_student_ids():
    logits = jnp.asarray([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert float(query_misses(logits, jnp.asarray([[0, 1, 2, 5]]), 3)[0]) == 0
    assert float(query_misses(logits, jnp.asarray([[0, 4, 5, 5]]), 3)[0]) == 2


def _batch(seed=0, B=6, P=7, N=9):
    from opd_jax.train.batch import RolloutBatch

    rng = np.random.default_rng(seed)
    toks = rng.integers(1, V, (B, P + N)).astype(np.int32)
    valid = np.zeros((B, P + N), bool)
    for b in range(B):
        valid[b, P - rng.integers(2, P + 1):P] = True
        valid[b, P:P + (N if b == 0 else rng.integers(1, N + 1))] = True
    return RolloutBatch(jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(toks),
                        jnp.asarray(valid), jnp.asarray(toks[:, P:]), jnp.asarray(valid[:, P:]),
                        jnp.asarray(rng.normal(-3, 1, (B, N)), jnp.float32)), P, N


def _loss_grads(batch, teacher, teacher_args, ps, chunk_fn):
    fn = jax.jit(jax.value_and_grad(functools.partial(
        loss_and_metrics, student=StudentSpec(CS), teacher=teacher, chunk_fn=chunk_fn,
        reduction=losses.token_mean, chunk_size=16), has_aux=True))
    (loss, out), g = fn(ps, None, teacher_args, batch)
    metrics = {k: float(losses.token_mean(v, batch.mask)) for k, v in out.items()}
    return float(loss), metrics, g


SUPPORTED = {
    "topk_reward_student": LossSpec(objective="topk_reward", top_k=4),
    "topk_reward_union_teacher_p": LossSpec(objective="topk_reward", top_k=4, support="union",
                                            weights="teacher_p"),
    "topk_reward_teacher_temp": LossSpec(objective="topk_reward", top_k=4, temperature=1.2,
                                         teacher_temperature=0.8),
    "topk_reward_intersection": LossSpec(objective="topk_reward", top_k=4,
                                         support="intersection"),
    "topk_reward_symdiff_none": LossSpec(objective="topk_reward", top_k=4,
                                         support="symmetric_difference", weights="none"),
    "sampled_token_ppo": LossSpec(objective="sampled_token_rkl", pg_loss="ppo_clip"),
    "rkl_topk_student_renorm": LossSpec(objective="reverse_kl", top_k=4),
    "fkl_topk_teacher_bucket": LossSpec(objective="forward_kl", top_k=4, support="teacher",
                                        tail="bucket"),
    "jsd_topk_union_clip": LossSpec(objective="generalized_jsd", beta=0.3, top_k=4,
                                    support="union", pointwise_clip=0.05, temperature=1.1),
}


@pytest.mark.parametrize("case", sorted(SUPPORTED))
def test_step_from_teacher_scores_equals_in_process_teacher(case):
    spec = SUPPORTED[case]
    check_objective(spec)
    ps, pt = dec.init_params(CS, jax.random.key(0)), dec.init_params(CT, jax.random.key(1))
    batch, P, N = _batch(2)
    tau_t = spec.resolved_teacher_temperature
    student_k = student_topk_needed(spec)
    s_top = None
    if student_k:   # the student's top-k at the completion positions (the sampler records them)
        s_top = score(ps, CS, batch.student_tokens, valid_BxT=batch.student_valid,
                      k=student_k).topk_ids[:, P - 1:P - 1 + N]
    q = query_ids(batch.completion, s_top)
    scores = score_completions(pt, CT, batch.teacher_tokens, batch.teacher_valid,
                               jnp.asarray(q), n=N, k=16, temperature=tau_t)
    chunk = make_chunk_fn(spec)
    l1, m1, g1 = _loss_grads(batch, TeacherSpec("separate", CT), pt, ps, chunk)
    served = with_teacher_scores(chunk, teacher_temperature=tau_t, student_k=student_k)
    l2, m2, g2 = _loss_grads(batch.replace(teacher_scores=scores), TeacherSpec("scores"), None,
                             ps, served)
    np.testing.assert_allclose(l2, l1, rtol=2e-5, atol=1e-6)
    for k in m1:
        if k == "teacher_entropy":   # a uniform tail: an upper bound of the true entropy
            assert m2[k] >= m1[k] - 1e-4
            continue
        np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=2e-6, err_msg=k)
    if student_k:
        assert m2["teacher_query_miss"] == 0.0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert float(jnp.abs(a - b).max()) <= 1e-4 * (float(jnp.abs(a).max()) + 1e-12), case


@pytest.mark.parametrize("spec, words", [
    (LossSpec(objective="reverse_kl"), "full-vocabulary"),
    (LossSpec(objective="generalized_jsd", beta=0.5), "loss.top_k"),
])
def test_objectives_that_need_all_logits_are_refused_by_name(spec, words):
    with pytest.raises(ValueError, match=words) as e:
        check_objective(spec)
    assert "topk_reward" in str(e.value) and "sampled_token_rkl" in str(e.value)
