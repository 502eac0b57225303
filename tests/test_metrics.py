"""OPD mechanism metrics against float64 numpy references; chunked == dense; no retraces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import metrics
from opd_jax.losses.chunked_scoring import chunked_teacher_topk

B, T, D, V, K = 3, 11, 8, 41, 5


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _inputs(seed=0):
    """Random inputs from numpy (cheap: no per-op compilation of jax.random on a busy CPU)."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    hs, ws = f32(B, T, D), 2.0 * f32(D, V) / np.sqrt(D)
    ht, wt = f32(B, T, D + 2), 2.0 * f32(D + 2, V) / np.sqrt(D + 2)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    where = rng.random((B, T)) < 0.7
    where[:, 0], where[:, -1] = True, False
    sampler = f32(B, T) - 3.0
    return hs, ws, ht, wt, tokens, jnp.asarray(where), sampler


def _reference(s_logits, t_logits, tokens, sampler, k, temp, teacher_temp=None):
    """Per-token metrics in float64 numpy, from first principles (sets, sums, logs)."""
    teacher_temp = temp if teacher_temp is None else teacher_temp
    sp = _softmax64(np.asarray(s_logits) / temp)
    tp = _softmax64(np.asarray(t_logits) / teacher_temp)
    s_ids = np.argsort(-sp, -1, kind="stable")[..., :k]
    t_ids = np.argsort(-tp, -1, kind="stable")[..., :k]
    lead = sp.shape[:-1]
    out = {n: np.zeros(lead) for n in (
        "overlap", "topk_intersects", "student_shared_mass", "teacher_shared_mass",
        "student_topk_mass", "teacher_topk_mass")}
    for idx in np.ndindex(*lead):
        shared = sorted(set(s_ids[idx]) & set(t_ids[idx]))
        out["overlap"][idx] = len(shared) / k
        out["topk_intersects"][idx] = float(len(shared) > 0)
        out["student_shared_mass"][idx] = sp[idx][shared].sum()
        out["teacher_shared_mass"][idx] = tp[idx][shared].sum()
        out["student_topk_mass"][idx] = sp[idx][s_ids[idx]].sum()
        out["teacher_topk_mass"][idx] = tp[idx][t_ids[idx]].sum()
    out["student_entropy"] = -(sp * np.log(sp)).sum(-1)
    out["teacher_entropy"] = -(tp * np.log(tp)).sum(-1)
    tok = np.asarray(tokens)[..., None]
    out["student_token_logprob"] = np.log(np.take_along_axis(sp, tok, -1)[..., 0])
    out["teacher_token_logprob"] = np.log(np.take_along_axis(tp, tok, -1)[..., 0])
    out["token_reverse_kl"] = out["student_token_logprob"] - out["teacher_token_logprob"]
    out["logprob_gap"] = np.asarray(sampler, np.float64) - out["student_token_logprob"]
    out["abs_logprob_gap"] = np.abs(out["logprob_gap"])
    return out


def test_known_sets():
    s_ids = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    t_ids = jnp.array([[4, 3, 9, 10], [1, 2, 3, 4], [4, 3, 2, 1]])
    np.testing.assert_allclose(metrics.topk_overlap(s_ids, t_ids), [0.5, 0.0, 1.0])
    s_logp = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 3))
    np.testing.assert_allclose(
        metrics.shared_mass(s_logp, s_ids, t_ids), [0.3, 0.0, 1.0], rtol=1e-6
    )
    where = jnp.array([True, False, True])
    np.testing.assert_array_equal(metrics.topk_overlap(s_ids, t_ids, where=where), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(
        metrics.entropy(jnp.log(jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))),
        [np.log(2.0), 0.0],
        atol=1e-6,
    )
    with pytest.raises(ValueError):
        metrics.topk_overlap(s_ids, t_ids[:, :3])


def test_dense_metrics_match_float64_reference():
    hs, ws, ht, wt, tokens, where, sampler = _inputs()
    s_logits, t_logits, temp = hs @ ws, ht @ wt, 1.1
    got = jax.jit(
        lambda *a: metrics.mechanism_metrics_from_logits(
            *a[:3], k=K, where=a[3], temperature=temp, sampler_logprobs=a[4]
        )
    )(s_logits, t_logits, tokens, where, sampler)
    want = _reference(s_logits, t_logits, tokens, sampler, K, temp)
    assert set(got) == set(want)
    m = np.asarray(where)
    for name, ref in want.items():
        x = np.asarray(got[name])
        assert x.shape == (B, T) and x.dtype == np.float32, name
        np.testing.assert_allclose(x[m], ref[m], rtol=1e-5, atol=2e-5, err_msg=name)
        assert np.all(x[~m] == 0.0), name
    # sanity of the mechanism quantities: shared mass <= own top-k mass <= 1
    for side in ("student", "teacher"):
        assert np.all(want[f"{side}_shared_mass"] <= want[f"{side}_topk_mass"] + 1e-12)


def test_metrics_from_logprobs_match_float64_reference():
    """What the train step's divergences hand over: log-probs at each side's temperature."""
    hs, ws, ht, wt, tokens, where, sampler = _inputs(seed=4)
    s_logits, t_logits, temp, t_temp = hs @ ws, ht @ wt, 1.1, 0.7
    got = jax.jit(lambda s, t: metrics.mechanism_metrics_from_logprobs(
        jax.nn.log_softmax(s / temp), jax.nn.log_softmax(t / t_temp), tokens, k=K, where=where,
        sampler_logprobs=sampler))(s_logits, t_logits)
    want = _reference(s_logits, t_logits, tokens, sampler, K, temp, t_temp)
    assert set(got) == set(want)
    m = np.asarray(where)
    for name, ref in want.items():
        x = np.asarray(got[name])
        np.testing.assert_allclose(x[m], ref[m], rtol=1e-5, atol=2e-5, err_msg=name)
        assert np.all(x[~m] == 0.0), name
    with pytest.raises(ValueError, match="must match"):
        metrics.mechanism_metrics_from_logprobs(s_logits, t_logits[..., :-1], tokens)


def test_teacher_temperature_and_intersection_means_match_reference():
    """A separate teacher temperature; the paper's shared mass averaged over intersecting
    positions only, against thunlp's formula (ray_trainer.py:1448-1467) on sets in numpy."""
    hs, ws, ht, wt, tokens, where, sampler = _inputs(seed=3)
    s_logits, t_logits = hs @ ws, 3.0 * (ht @ wt)   # a sharp teacher: some sets do not meet
    got = metrics.mechanism_metrics_from_logits(s_logits, t_logits, tokens, k=2, where=where,
                                                temperature=1.3, teacher_temperature=0.6)
    want = _reference(s_logits, t_logits, tokens, None, 2, 1.3, 0.6)
    m = np.asarray(where)
    for name in ("overlap", "topk_intersects", "student_shared_mass", "teacher_shared_mass",
                 "teacher_entropy", "teacher_token_logprob"):
        np.testing.assert_allclose(np.asarray(got[name])[m], want[name][m], rtol=1e-5, atol=2e-5,
                                   err_msg=name)
    assert 0 < want["topk_intersects"][m].mean() < 1   # both kinds of position occur
    # thunlp: student_p_sum[inter_positions].mean() over the valid tokens
    sp, tp = _softmax64(np.asarray(s_logits) / 1.3), _softmax64(np.asarray(t_logits) / 0.6)
    s_ids, t_ids = (np.argsort(-p, -1, kind="stable")[..., :2] for p in (sp, tp))
    inter_ids = [(idx, sorted(set(s_ids[idx]) & set(t_ids[idx]))) for idx in zip(*np.nonzero(m))]
    inter_ids = [(idx, ids) for idx, ids in inter_ids if ids]
    ref_s = np.mean([sp[idx][ids].sum() for idx, ids in inter_ids])
    ref_t = np.mean([tp[idx][ids].sum() for idx, ids in inter_ids])
    means = {k: float(np.asarray(got[k])[m].mean()) for k in got}
    out = metrics.intersection_means(means)
    np.testing.assert_allclose(float(out["student_p_sum_intersection"]), ref_s, rtol=1e-5)
    np.testing.assert_allclose(float(out["teacher_p_sum_intersection"]), ref_t, rtol=1e-5)
    # the all-positions mean stays under its own name, and is smaller
    assert means["student_shared_mass"] < float(out["student_p_sum_intersection"])
    assert float(metrics.intersection_means({"topk_intersects": 0.0,
                                             "student_shared_mass": 0.0})[
        "student_p_sum_intersection"]) == 0.0


def test_chunked_metrics_equal_dense_and_do_not_retrace():
    hs, ws, ht, wt, tokens, where, sampler = _inputs(seed=1)
    dense = metrics.mechanism_metrics_from_logits(
        hs @ ws, ht @ wt, tokens, k=K, where=where, sampler_logprobs=sampler
    )
    traces = []

    @jax.jit
    def run(hs, ws, ht, wt, tokens, where, sampler):
        traces.append(1)
        per_token = metrics.mechanism_metrics(
            hs, ws, ht, wt, tokens, k=K, where=where, chunk_size=7, sampler_logprobs=sampler
        )
        return per_token, metrics.summarize(per_token, where)

    got, summary = run(hs, ws, ht, wt, tokens, where, sampler)
    assert set(got) == set(dense)
    for name in dense:
        np.testing.assert_allclose(got[name], dense[name], rtol=1e-5, atol=1e-6, err_msg=name)
    m = np.asarray(where)
    for name, value in summary.items():
        assert value.shape == ()
        np.testing.assert_allclose(value, np.asarray(got[name])[m].mean(), rtol=1e-5, atol=1e-6)
    run(*_inputs(seed=2))
    assert len(traces) == 1
    # no sampler log-probs: no gap metrics
    no_gap = metrics.mechanism_metrics(hs, ws, ht, wt, tokens, k=K, where=where, chunk_size=64)
    assert "logprob_gap" not in no_gap and "overlap" in no_gap


def test_identical_models_have_full_overlap_and_zero_gap():
    hs, ws, _, _, tokens, where, _ = _inputs(seed=3)
    lp = jnp.log(jax.nn.softmax(hs @ ws))
    sampler = jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0]
    out = metrics.mechanism_metrics(
        hs, ws, hs, ws, tokens, k=K, where=where, chunk_size=8, sampler_logprobs=sampler
    )
    m = np.asarray(where)
    np.testing.assert_allclose(np.asarray(out["overlap"])[m], 1.0)
    np.testing.assert_allclose(out["student_shared_mass"], out["student_topk_mass"], rtol=1e-6)
    np.testing.assert_allclose(out["abs_logprob_gap"], 0.0, atol=1e-5)
    np.testing.assert_allclose(out["token_reverse_kl"], 0.0, atol=1e-6)


def test_summarize_and_per_position():
    x = jnp.array([[1.0, 2.0, 3.0], [5.0, 7.0, 11.0]])
    where = jnp.array([[True, True, False], [True, False, False]])
    out = metrics.summarize({"x": x, "y": 2 * x}, where)
    np.testing.assert_allclose(out["x"], (1 + 2 + 5) / 3)
    np.testing.assert_allclose(out["y"], 2 * (1 + 2 + 5) / 3)
    np.testing.assert_allclose(metrics.summarize({"x": x})["x"], x.mean())
    assert float(metrics.summarize({"x": x}, jnp.zeros_like(where))["x"]) == 0.0
    curve = metrics.per_position(x, where)
    np.testing.assert_allclose(curve[:2], [3.0, 2.0])
    assert np.isnan(curve[2])
    np.testing.assert_allclose(metrics.per_position(x), x.mean(0))


def test_logprob_gap_and_bad_shapes():
    s = jnp.array([[-1.0, -2.0]])
    l = jnp.array([[-1.5, -1.0]])
    np.testing.assert_allclose(metrics.logprob_gap(s, l), [[0.5, -1.0]])
    np.testing.assert_allclose(
        metrics.logprob_gap(s, l, where=jnp.array([[True, False]])), [[0.5, 0.0]]
    )
    with pytest.raises(ValueError):
        metrics.logprob_gap(s, l[:, :1])
    hs, ws, ht, wt, tokens, where, _ = _inputs()
    with pytest.raises(ValueError, match="tokens"):
        metrics.mechanism_metrics(hs, ws, ht, wt, tokens[:, :-1], k=K)
    with pytest.raises(ValueError, match="where"):
        metrics.mechanism_metrics_from_logits(hs @ ws, ht @ wt, tokens, k=K, where=where[:, :-1])


def test_metrics_carry_no_gradient():
    hs, ws, ht, wt, tokens, where, _ = _inputs(seed=4)

    def f(h):
        out = metrics.mechanism_metrics(h, ws, ht, wt, tokens, k=K, where=where, chunk_size=8)
        return sum(jnp.sum(v) for v in out.values())

    assert not np.any(np.asarray(jax.grad(f)(hs)))


def test_teacher_topk_metrics_match_dense_subset():
    hs, ws, ht, wt, tokens, where, sampler = _inputs(seed=5)
    temp = 0.9
    top = chunked_teacher_topk(ht, wt, k=K, chunk_size=8, temperature=temp, where=where)
    got = metrics.mechanism_metrics_from_teacher_topk(
        hs, ws, top, tokens, where=where, chunk_size=6, temperature=temp, sampler_logprobs=sampler
    )
    want = _reference(hs @ ws, ht @ wt, tokens, sampler, K, temp)
    m = np.asarray(where)
    for name in set(got) - {"token_in_teacher_topk"}:
        np.testing.assert_allclose(
            np.asarray(got[name])[m], want[name][m], rtol=1e-5, atol=2e-5, err_msg=name
        )
    t_ids = np.argsort(-np.asarray(ht @ wt), -1, kind="stable")[..., :K]
    inside = (t_ids == np.asarray(tokens)[..., None]).any(-1)
    np.testing.assert_array_equal(np.asarray(got["token_in_teacher_topk"])[m], inside[m])
    assert all(np.all(np.asarray(v)[~m] == 0.0) for v in got.values())
