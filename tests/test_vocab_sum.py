"""``losses.elementwise.vocab_sum`` / ``log_softmax``: the CPU's vocabulary sums as products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compat import enable_x64

from opd_jax.losses.elementwise import log_softmax, normalized_logprobs, vocab_sum


@pytest.mark.parametrize("shape", [(7,), (3, 513), (2, 4, 1000)])
def test_vocab_sum_matches_float64_sum(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = jax.jit(vocab_sum)(jnp.asarray(x))
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-5)


def test_vocab_sum_keeps_inf_and_nan_semantics_and_its_gradient_is_a_broadcast():
    x = jnp.array([[1.0, jnp.inf, 2.0], [1.0, -jnp.inf, 0.0], [jnp.inf, -jnp.inf, 0.0]])
    got = np.asarray(vocab_sum(x))
    assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])
    g = jax.grad(lambda x: jnp.sum(jnp.arange(1.0, 4.0) * vocab_sum(x)))(jnp.ones((3, 5)))
    np.testing.assert_array_equal(np.asarray(g), np.repeat(np.arange(1.0, 4.0)[:, None], 5, 1))


def test_vocab_sum_float64():
    with enable_x64():
        x = np.random.default_rng(1).standard_normal((4, 300))
        got = vocab_sum(jnp.asarray(x, jnp.float64))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), x.sum(-1), rtol=1e-13)


def _np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_log_softmax_values_and_gradient_against_float64():
    rng = np.random.default_rng(2)
    x = (3 * rng.standard_normal((5, 2000))).astype(np.float32)
    g = rng.standard_normal((5, 2000)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(log_softmax(jnp.asarray(x))), _np_log_softmax(x),
                               rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(jnp.asarray(g) * log_softmax(x)))(jnp.asarray(x))
    p = np.exp(_np_log_softmax(x))
    ref = g - p * g.astype(np.float64).sum(-1, keepdims=True)   # d/dx of sum g * log_softmax
    np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-4, atol=1e-5)
    ref_jax = jax.grad(lambda x: jnp.sum(jnp.asarray(g) * jax.nn.log_softmax(x)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_jax), rtol=1e-4, atol=1e-5)


def test_log_softmax_with_neg_inf_entries_and_masked_rows_is_finite():
    x = jnp.array([[0.0, -jnp.inf, 1.0, -jnp.inf], [jnp.nan, jnp.inf, 0.0, 1.0]])
    where = jnp.array([True, False])     # the second row is padding: replaced before the softmax
    lp = normalized_logprobs(x, where=where)
    assert np.asarray(lp)[0, 1] == -np.inf and np.isfinite(np.asarray(lp)[1]).all()
    np.testing.assert_allclose(np.exp(np.asarray(lp)).sum(-1), [1.0, 1.0], rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(lp := normalized_logprobs(x, where=where)),
                                             lp, 0.0)))(x)
    assert np.isfinite(np.asarray(g)).all()
    assert (np.asarray(g)[1] == 0).all()          # no gradient into a masked row


def test_no_recompile_on_repeated_calls():
    f = jax.jit(lambda x: vocab_sum(log_softmax(x)))
    x = jnp.ones((4, 256))
    f(x)
    n = f._cache_size()
    for _ in range(3):
        f(x + 1.0)
    assert f._cache_size() == n


def test_logsumexp_matches_float64_and_handles_neg_inf_rows():
    from opd_jax.losses.elementwise import logsumexp

    x = np.random.default_rng(3).standard_normal((4, 700)).astype(np.float32) * 5
    x[1, ::2] = -np.inf
    x[2] = -np.inf
    got = np.asarray(jax.jit(logsumexp)(jnp.asarray(x)))
    x64 = x.astype(np.float64)
    with np.errstate(divide="ignore"):
        ref = np.log(np.exp(x64).sum(-1))
    np.testing.assert_allclose(got[[0, 1, 3]], ref[[0, 1, 3]], rtol=1e-6)
    assert got[2] == -np.inf
    np.testing.assert_allclose(got, np.asarray(jax.nn.logsumexp(jnp.asarray(x), axis=-1)), rtol=1e-6)
