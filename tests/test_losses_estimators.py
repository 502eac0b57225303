"""Sampled-token estimators and policy-gradient surrogates vs float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from opd_jax import losses
from tests._compat import enable_x64

SETTINGS = settings(max_examples=25, deadline=None)


def np_log_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def rand(seed, shape=(3, 6), scale=1.0, loc=-2.0):
    return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def mask(seed, shape=(3, 6)):
    return np.random.default_rng(seed).random(shape) > 0.3


# ------------------------------------------------------------------------------------------
# token_logprobs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_matches_reference(temperature):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6, 17)).astype(np.float32)
    tokens = rng.integers(0, 17, (3, 6))
    out = losses.token_logprobs(logits, jnp.asarray(tokens), temperature=temperature)
    ref = np.take_along_axis(np_log_softmax(logits, temperature), tokens[..., None], -1)[..., 0]
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_token_logprobs_bf16_masked_padding_and_neg_inf():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 6, 17)).astype(np.float32)
    logits[..., 15:] = -np.inf  # padded vocabulary
    tokens = rng.integers(0, 15, (3, 6))
    where = mask(2)
    tokens[~where] = -100  # a padding id that is out of range
    logits[0, 0] = np.nan if not where[0, 0] else logits[0, 0]
    out = losses.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens),
                                where=jnp.asarray(where))
    assert out.dtype == jnp.float32
    assert np.all(np.asarray(out)[~where] == 0.0)
    l16 = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
    ref = np.take_along_axis(np_log_softmax(l16), np.where(where, tokens, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out)[where], ref[where], rtol=1e-4, atol=1e-5)
    g = jax.grad(lambda z: losses.token_logprobs(z, jnp.asarray(tokens),
                                                 where=jnp.asarray(where)).sum())(logits)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~where] == 0.0)


# ------------------------------------------------------------------------------------------
# KL estimators and the OPD advantage
# ------------------------------------------------------------------------------------------

NP_EST = {
    "k1": lambda s, t: s - t,
    "k2": lambda s, t: 0.5 * (s - t) ** 2,
    "k3": lambda s, t: np.exp(t - s) - 1 - (t - s),
}


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_estimators_match_reference_with_mask(name):
    s, t, where = rand(3), rand(4), mask(5)
    s[~where] = np.nan  # garbage in padding must not leak
    out = losses.KL_ESTIMATORS[name](s, t, where=jnp.asarray(where))
    ref = NP_EST[name](s.astype(np.float64), t.astype(np.float64))
    np.testing.assert_allclose(np.asarray(out)[where], ref[where], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[~where] == 0.0)
    gs, gt = jax.grad(lambda a, b: losses.KL_ESTIMATORS[name](a, b, where=jnp.asarray(where)).sum(),
                      argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(gs)) and np.all(np.asarray(gs)[~where] == 0.0)
    assert np.all(np.asarray(gt)[~where] == 0.0)


def test_estimators_bf16_to_float32():
    s, t = jnp.asarray(rand(6), jnp.bfloat16), jnp.asarray(rand(7), jnp.bfloat16)
    for fn in losses.KL_ESTIMATORS.values():
        assert fn(s, t).dtype == jnp.float32


def test_k1_k3_unbiased_for_reverse_kl():
    """E_{x~S}[k1] = E_{x~S}[k3] = KL(S||T), computed exactly by enumerating x."""
    rng = np.random.default_rng(8)
    ls, lt = np_log_softmax(rng.standard_normal(9)), np_log_softmax(rng.standard_normal(9))
    S = np.exp(ls)
    kl = np.sum(S * (ls - lt))
    for name in ["k1", "k3"]:
        est = np.asarray(losses.KL_ESTIMATORS[name](ls.astype(np.float32), lt.astype(np.float32)))
        np.testing.assert_allclose(np.sum(S * est), kl, rtol=1e-5)


@SETTINGS
@given(s=st.lists(st.floats(-30, 0), min_size=4, max_size=4),
       t=st.lists(st.floats(-30, 0), min_size=4, max_size=4))
def test_k2_k3_nonnegative(s, t):
    s, t = np.float32(s), np.float32(t)
    assert np.all(np.asarray(losses.reverse_kl_k3(s, t)) >= 0.0)
    assert np.all(np.asarray(losses.reverse_kl_k2(s, t)) >= 0.0)
    np.testing.assert_allclose(losses.reverse_kl_k3(s, s), 0.0, atol=0)


def test_opd_advantage():
    s, t, where = rand(9), rand(10), mask(11)
    a = losses.opd_advantage(s, t, where=jnp.asarray(where))
    np.testing.assert_allclose(np.asarray(a)[where], -(s - t)[where], rtol=1e-6)
    assert np.all(np.asarray(a)[~where] == 0.0)
    g = jax.grad(lambda x: losses.opd_advantage(x, t).sum())(s)
    assert np.all(np.asarray(g) == 0.0)  # stop-gradient


# ------------------------------------------------------------------------------------------
# surrogates
# ------------------------------------------------------------------------------------------


def test_policy_gradient_loss_value_and_grad():
    lp, adv, where = rand(12), rand(13, loc=0.0), mask(14)
    f = lambda x, a: losses.policy_gradient_loss(x, a, where=jnp.asarray(where))
    np.testing.assert_allclose(np.asarray(f(lp, adv))[where], (-adv * lp)[where], rtol=1e-6)
    g_lp, g_adv = jax.grad(lambda x, a: f(x, a).sum(), argnums=(0, 1))(lp, adv)
    np.testing.assert_allclose(g_lp, np.where(where, -adv, 0.0), rtol=1e-6)
    assert np.all(np.asarray(g_adv) == 0.0)


def test_importance_sampled_loss_value_and_grad():
    lp, q, adv, where = rand(15), rand(16), rand(17, loc=0.0), mask(18)
    f = lambda x, y: losses.importance_sampled_pg_loss(x, y, adv, where=jnp.asarray(where))
    ratio = np.exp(lp.astype(np.float64) - q)
    np.testing.assert_allclose(np.asarray(f(lp, q))[where], (-ratio * adv)[where], rtol=1e-5)
    g_lp, g_q = jax.grad(lambda x, y: f(x, y).sum(), argnums=(0, 1))(lp, q)
    np.testing.assert_allclose(g_lp, np.where(where, -ratio * adv, 0.0), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g_q) == 0.0)
    # on-policy (sampler == learner) the gradient equals plain REINFORCE's
    g_on = jax.grad(lambda x: losses.importance_sampled_pg_loss(x, x, adv).sum())(lp)
    g_pg = jax.grad(lambda x: losses.policy_gradient_loss(x, adv).sum())(lp)
    np.testing.assert_allclose(g_on, g_pg, rtol=1e-6)


def np_ppo(lp, old, adv, lo, hi, c):
    ratio = np.exp(np.clip(lp - old, -20, 20))
    l1 = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi))
    if c is None:
        return l1
    return np.where(adv < 0, np.minimum(l1, -adv * c), l1)


@pytest.mark.parametrize("clip_low,clip_high,dual", [(0.2, 0.2, None), (0.2, 0.28, 3.0),
                                                     (0.1, 0.3, 1.5)])
def test_ppo_clip_matches_reference(clip_low, clip_high, dual):
    lp, old = rand(19, scale=1.0), rand(20, scale=1.0)  # wide ratios: every branch is hit
    adv = rand(21, loc=0.0, scale=2.0)
    where = mask(22)
    out = losses.ppo_clip_loss(lp, old, adv, clip_low=clip_low, clip_high=clip_high,
                               dual_clip=dual, where=jnp.asarray(where))
    ref = np_ppo(lp.astype(np.float64), old, adv, clip_low, clip_high, dual)
    np.testing.assert_allclose(np.asarray(out)[where], ref[where], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[~where] == 0.0)


def test_ppo_clip_gradient_zero_outside_trust_region():
    old = np.zeros(4, np.float32)
    lp = np.log(np.array([2.0, 0.5, 1.1, 2.0], np.float32))
    adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    g = jax.grad(lambda x: losses.ppo_clip_loss(x, old, adv).sum())(lp)
    # ratio 2 with A>0 and ratio 0.5 with A<0 are clipped: no gradient; inside: -A * ratio
    np.testing.assert_allclose(g, [0.0, 0.0, -1.1, 2.0], rtol=1e-6)
    # dual clip bounds the loss for A<0 with a huge ratio: -A * c, no gradient
    g_dual = jax.grad(lambda x: losses.ppo_clip_loss(x, old, adv, dual_clip=1.5).sum())(lp)
    np.testing.assert_allclose(g_dual, [0.0, 0.0, -1.1, 0.0], rtol=1e-6)


def test_check_grads_float64():
    with enable_x64(True):
        rng = np.random.default_rng(23)
        lp = jnp.asarray(-1.0 + 0.1 * rng.standard_normal(5), jnp.float64)
        q = jnp.asarray(-1.0 + 0.1 * rng.standard_normal(5), jnp.float64)
        adv = jnp.asarray(rng.standard_normal(5), jnp.float64)
        check_grads(lambda x: losses.importance_sampled_pg_loss(x, q, adv), (lp,), 1, modes=["rev"])
        check_grads(lambda x: losses.ppo_clip_loss(x, q, adv, dual_clip=3.0), (lp,), 1,
                    modes=["rev"])
        check_grads(lambda a, b: losses.reverse_kl_k3(a, b), (lp, q), 1, modes=["rev"])
        logits = jnp.asarray(rng.standard_normal((2, 7)), jnp.float64)
        toks = jnp.array([1, 5])
        check_grads(lambda z: losses.token_logprobs(z, toks, temperature=0.9), (logits,), 1,
                    modes=["rev"])


def test_jit_traces_once():
    traces = []

    @jax.jit
    def step(logits, tokens, teacher_logp, where):
        traces.append(1)
        lp = losses.token_logprobs(logits, tokens, where=where)
        adv = losses.opd_advantage(lp, teacher_logp, where=where)
        return (losses.importance_sampled_pg_loss(lp, lp, adv, where=where).sum()
                + losses.ppo_clip_loss(lp, lp, adv, dual_clip=3.0, where=where).sum()
                + losses.reverse_kl_k3(lp, teacher_logp, where=where).sum())

    rng = np.random.default_rng(24)
    for _ in range(3):
        step(rng.standard_normal((2, 4, 9)).astype(np.float32), jnp.asarray(rng.integers(0, 9, (2, 4))),
             rand(25, (2, 4)), jnp.asarray(mask(26, (2, 4)))).block_until_ready()
    assert len(traces) == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.reverse_kl_k1(rand(0, (3, 6)), rand(0, (3, 5)))
    with pytest.raises(ValueError, match="integer token ids"):
        losses.token_logprobs(rand(0, (2, 5)), jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="without the vocabulary axis"):
        losses.token_logprobs(rand(0, (2, 5)), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="dual_clip"):
        losses.ppo_clip_loss(rand(0), rand(1), rand(2), dual_clip=0.5)
    with pytest.raises(ValueError, match="boolean"):
        losses.policy_gradient_loss(rand(0), rand(1), where=jnp.ones((3, 6)))
