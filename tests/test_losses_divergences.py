"""Full-vocabulary divergences vs independent float64 numpy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from opd_jax import losses
from opd_jax.losses import divergences as D
from tests._compat import enable_x64

SETTINGS = settings(max_examples=25, deadline=None)
NAMES = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl"]


# ------------------------------------------------------------------------------------------
# float64 numpy references (written from the definitions, not from the library)
# ------------------------------------------------------------------------------------------


def np_log_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    return z - m - np.log(e.sum(-1, keepdims=True))


def np_kl_elems(p, q):
    """p log(p/q) with 0 log 0 = 0."""
    out = np.zeros(np.broadcast(p, q).shape)
    pos = p > 0
    with np.errstate(divide="ignore"):
        out[pos] = p[pos] * (np.log(p[pos]) - np.log(q[pos]))
    return out


def np_elems(name, S, T, param):
    if name == "forward_kl":
        return np_kl_elems(T, S)
    if name == "reverse_kl":
        return np_kl_elems(S, T)
    if name == "generalized_jsd":
        b = param
        if b == 0.0:
            return np_kl_elems(T, S)
        if b == 1.0:
            return np_kl_elems(S, T)
        M = (1 - b) * S + b * T
        return b * np_kl_elems(T, M) + (1 - b) * np_kl_elems(S, M)
    if name == "skew_forward_kl":
        return np_kl_elems(T, param * T + (1 - param) * S)
    if name == "skew_reverse_kl":
        return np_kl_elems(S, param * S + (1 - param) * T)
    raise KeyError(name)


def np_divergence(name, s_logits, t_logits, param=None, temperature=1.0, clip=None):
    S = np.exp(np_log_softmax(s_logits, temperature))
    T = np.exp(np_log_softmax(t_logits, temperature))
    e = np_elems(name, S, T, param)
    if clip is not None:
        e = np.minimum(e, clip)
    return e.sum(-1)


DEFAULT_PARAM = {"generalized_jsd": 0.5, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.1}


def call(name, s, t, param=None, **kw):
    fn = losses.DIVERGENCES[name]
    if name in DEFAULT_PARAM:
        return fn(s, t, DEFAULT_PARAM[name] if param is None else param, **kw)
    return fn(s, t, **kw)


def rand_logits(seed, shape=(3, 5, 11), scale=2.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# values vs reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_matches_numpy_reference_with_mask(name, temperature, clip):
    s, t = rand_logits(0), rand_logits(1)
    where = np.random.default_rng(2).random((3, 5)) > 0.3
    out = call(name, s, t, where=jnp.asarray(where), temperature=temperature, pointwise_clip=clip)
    ref = np_divergence(name, s, t, DEFAULT_PARAM.get(name), temperature, clip)
    assert out.shape == (3, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[where], ref[where], rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(out)[~where] == 0.0)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_betas(beta):
    s, t = rand_logits(3), rand_logits(4)
    out = losses.generalized_jsd(s, t, beta)
    np.testing.assert_allclose(out, np_divergence("generalized_jsd", s, t, beta), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_alphas(name, alpha):
    s, t = rand_logits(5), rand_logits(6)
    out = call(name, s, t, alpha)
    np.testing.assert_allclose(out, np_divergence(name, s, t, alpha), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_float32(name):
    s, t = rand_logits(7), rand_logits(8)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    out = call(name, s16, t16)
    assert out.dtype == jnp.float32
    exact = np_divergence(name, np.asarray(s16, np.float64), np.asarray(t16, np.float64),
                          DEFAULT_PARAM.get(name))
    np.testing.assert_allclose(out, exact, rtol=1e-4, atol=1e-5)  # same (rounded) inputs
    loose = np_divergence(name, s, t, DEFAULT_PARAM.get(name))
    np.testing.assert_allclose(out, loose, rtol=0.05, atol=0.02)  # vs unrounded logits


@pytest.mark.parametrize("name", NAMES)
def test_logprob_forms_match_logit_forms(name):
    s, t = rand_logits(9), rand_logits(10)
    sl, tl = jax.nn.log_softmax(s / 0.8), jax.nn.log_softmax(t / 0.8)
    a = call(name, s, t, temperature=0.8, pointwise_clip=0.1)
    b = losses.LOGPROB_DIVERGENCES[name](sl, tl, pointwise_clip=0.1)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_logprob_forms_compute_bf16_in_float32():
    sl = jax.nn.log_softmax(rand_logits(24)).astype(jnp.bfloat16)
    tl = jax.nn.log_softmax(rand_logits(25)).astype(jnp.bfloat16)
    for name, fn in losses.LOGPROB_DIVERGENCES.items():
        out = fn(sl, tl)
        assert out.dtype == jnp.float32, name
        ref = fn(sl.astype(jnp.float32), tl.astype(jnp.float32))
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# -inf logits, masking, gradients
# ------------------------------------------------------------------------------------------


def _with_shared_neg_inf(x):
    x = np.array(x)
    x[..., :3] = -np.inf  # e.g. padded vocabulary entries, on both models
    x[0, 0, 5] = -np.inf
    return x


@pytest.mark.parametrize("name", NAMES)
def test_shared_neg_inf_logits_finite_values_and_grads(name):
    s, t = _with_shared_neg_inf(rand_logits(11)), _with_shared_neg_inf(rand_logits(12))
    t[0, 0, 5] = -np.inf
    out = call(name, s, t)
    ref = np_divergence(name, s, t, DEFAULT_PARAM.get(name))
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
    gs, gt = jax.grad(lambda a, b: call(name, a, b).sum(), argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_mixture_divergences_finite_with_one_sided_neg_inf(name):
    s, t = rand_logits(13), rand_logits(14)
    s[..., 0] = -np.inf  # student gives zero mass where the teacher does not
    t[..., 1] = -np.inf  # and vice versa
    out = call(name, s, t)
    np.testing.assert_allclose(out, np_divergence(name, s, t, DEFAULT_PARAM.get(name)),
                               rtol=2e-5, atol=2e-6)
    gs, gt = jax.grad(lambda a, b: call(name, a, b).sum(), argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))


def test_forward_kl_finite_when_only_teacher_has_zeros():
    s, t = rand_logits(15), rand_logits(16)
    t[..., 2] = -np.inf
    out = losses.forward_kl(s, t)
    g = jax.grad(lambda a: losses.forward_kl(a, t).sum())(s)
    np.testing.assert_allclose(out, np_divergence("forward_kl", s, t), rtol=2e-5, atol=2e-6)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("name", NAMES)
def test_masked_rows_are_exact_zero_with_zero_grad(name):
    s, t = rand_logits(17), rand_logits(18)
    where = np.ones((3, 5), bool)
    where[1, 2] = where[2, 4] = False
    s[1, 2] = np.nan  # garbage in padded rows must not leak
    t[1, 2] = -np.inf
    s[2, 4] = -np.inf
    f = lambda a, b: call(name, a, b, where=jnp.asarray(where)).sum()
    out = call(name, s, t, where=jnp.asarray(where))
    gs, gt = jax.grad(f, argnums=(0, 1))(s, t)
    assert np.asarray(out)[1, 2] == 0.0 and np.asarray(out)[2, 4] == 0.0
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
    assert np.all(np.asarray(gs)[~where] == 0.0) and np.all(np.asarray(gt)[~where] == 0.0)


def test_where_broadcasts_over_batch():
    s, t = rand_logits(19), rand_logits(20)
    where_T = np.array([True, False, True, True, False])
    out = losses.reverse_kl(s, t, where=jnp.asarray(where_T))
    assert np.all(np.asarray(out)[:, ~where_T] == 0.0)
    np.testing.assert_allclose(np.asarray(out)[:, where_T],
                               np_divergence("reverse_kl", s, t)[:, where_T], rtol=2e-5)


@pytest.mark.parametrize("name,param", [("forward_kl", None), ("reverse_kl", None),
                                        ("generalized_jsd", 0.3), ("skew_forward_kl", 0.2),
                                        ("skew_reverse_kl", 0.2)])
def test_check_grads_float64(name, param):
    with enable_x64(True):
        rng = np.random.default_rng(21)
        s = jnp.asarray(rng.standard_normal((2, 6)), jnp.float64)
        t = jnp.asarray(rng.standard_normal((2, 6)), jnp.float64)
        f = lambda a, b: call(name, a, b, param, temperature=1.3)
        check_grads(f, (s, t), order=1, modes=["rev"])
        assert f(s, t).dtype == jnp.float64


def test_pointwise_clip_zeroes_gradient_of_clipped_terms():
    s = jnp.array([[0.0, 0.0, 5.0]])
    t = jnp.array([[0.0, 0.0, 0.0]])
    # reverse KL element of the peaked entry is large; clip at a tiny value freezes it
    g = jax.grad(lambda a: losses.reverse_kl(a, t, pointwise_clip=1e-3).sum())(s)
    g_full = jax.grad(lambda a: losses.reverse_kl(a, t).sum())(s)
    assert np.all(np.isfinite(g))
    assert not np.allclose(g, g_full)


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------

logits_1d = st.integers(0, 2**31 - 1).map(lambda seed: rand_logits(seed, (4, 7), 3.0))


@functools.partial(jax.jit, static_argnames=("name",))
def _jit_call(s, t, *, name):
    return call(name, s, t)


@SETTINGS
@given(s=logits_1d, t=logits_1d)
def test_nonnegative(s, t):
    for name in NAMES:
        assert np.all(np.asarray(_jit_call(s, t, name=name)) >= -1e-6), name


@SETTINGS
@given(s=logits_1d)
def test_zero_when_equal(s):
    for name in NAMES:
        np.testing.assert_allclose(_jit_call(s, s, name=name), 0.0, atol=1e-6)


@SETTINGS
@given(s=logits_1d, t=logits_1d)
def test_jsd_symmetric_and_bounded_at_half(s, t):
    a = losses.generalized_jsd(s, t, 0.5)
    b = losses.generalized_jsd(t, s, 0.5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(a) <= np.log(2) + 1e-6)


@SETTINGS
@given(s=logits_1d, t=logits_1d)
def test_jsd_endpoints_are_exact_kls(s, t):
    np.testing.assert_array_equal(losses.generalized_jsd(s, t, 0.0), losses.forward_kl(s, t))
    np.testing.assert_array_equal(losses.generalized_jsd(s, t, 1.0), losses.reverse_kl(s, t))


@SETTINGS
@given(s=logits_1d, t=logits_1d, alpha=st.floats(0.0, 1.0))
def test_skew_kl_bounded_by_convexity(s, t, alpha):
    # KL(T || aT + (1-a)S) <= (1-a) KL(T || S)
    fkl, rkl = losses.forward_kl(s, t), losses.reverse_kl(s, t)
    assert np.all(np.asarray(losses.skew_forward_kl(s, t, alpha)) <= (1 - alpha) * fkl + 1e-5)
    assert np.all(np.asarray(losses.skew_reverse_kl(s, t, alpha)) <= (1 - alpha) * rkl + 1e-5)


def test_traced_beta_matches_static_beta_including_endpoints():
    s, t = rand_logits(22), rand_logits(23)
    f = jax.jit(lambda a, b, beta: losses.generalized_jsd(a, b, beta))
    for beta in [0.0, 0.25, 0.5, 1.0]:
        np.testing.assert_allclose(f(s, t, beta), losses.generalized_jsd(s, t, beta), rtol=1e-6,
                                   atol=1e-7)
    g = jax.grad(lambda a: f(a, t, jnp.float32(0.0)).sum())(s)
    assert np.all(np.isfinite(g))


def test_jit_traces_once():
    traces = []

    @jax.jit
    def step(s, t, where):
        traces.append(1)
        return sum(call(n, s, t, where=where, temperature=1.1, pointwise_clip=0.05).sum()
                   for n in NAMES)

    where = jnp.ones((3, 5), bool)
    for seed in range(4):
        step(rand_logits(seed), rand_logits(seed + 10), where).block_until_ready()
    assert len(traces) == 1


# ------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------


def test_vocab_mismatch_message():
    with pytest.raises(ValueError, match="student_logits has V=11, teacher_logits has V=7"):
        losses.forward_kl(rand_logits(0), rand_logits(0, (3, 5, 7)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(where=jnp.ones((3, 5), jnp.int32)), "boolean"),
        (dict(where=jnp.ones((4,), bool)), "does not broadcast"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.reverse_kl(rand_logits(0), rand_logits(1), **kwargs)


def test_bad_beta_and_shape():
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(rand_logits(0), rand_logits(1), 1.5)
    with pytest.raises(ValueError, match="same token positions"):
        losses.reverse_kl(rand_logits(0), rand_logits(1, (2, 5, 11)))


def test_registry_complete():
    assert set(losses.DIVERGENCES) == set(NAMES) == set(losses.LOGPROB_DIVERGENCES)
    assert losses.DIVERGENCES["reverse_kl"] is D.reverse_kl
