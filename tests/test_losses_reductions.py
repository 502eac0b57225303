"""verl-style reductions vs float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_jax import losses

SETTINGS = settings(max_examples=25, deadline=None)


def np_token_mean(x, m):
    return (x * m).sum() / m.sum() if m.sum() > 0 else 0.0


def np_seq_mean_token_mean(x, m):
    n = m.sum(-1)
    has = n > 0
    if not has.any():
        return 0.0
    return np.mean((x * m).sum(-1)[has] / n[has])


def np_seq_mean_token_sum(x, m):
    has = m.sum(-1) > 0
    return np.mean((x * m).sum(-1)[has]) if has.any() else 0.0


def np_seq_mean_token_sum_norm(x, m, horizon=None):
    h = x.shape[-1] if horizon is None else horizon
    return (x * m).sum() / (x.shape[0] * h)


REFS = {
    "token-mean": np_token_mean,
    "seq-mean-token-mean": np_seq_mean_token_mean,
    "seq-mean-token-sum": np_seq_mean_token_sum,
    "seq-mean-token-sum-norm": np_seq_mean_token_sum_norm,
}


def data(seed, shape=(4, 7)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    m = rng.random(shape) > 0.4
    m[1] = False  # one empty sequence
    return x, m


@pytest.mark.parametrize("name", list(REFS))
def test_matches_reference_and_ignores_garbage(name):
    x, m = data(0)
    x_bad = x.copy()
    x_bad[~m] = np.nan  # masked entries never reach the result
    out = losses.REDUCTIONS[name](x_bad, jnp.asarray(m))
    np.testing.assert_allclose(out, REFS[name](x.astype(np.float64), m), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda v: losses.REDUCTIONS[name](v, jnp.asarray(m)))(x_bad)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~m] == 0.0)


@pytest.mark.parametrize("name", list(REFS))
def test_empty_mask_is_zero_with_finite_grad(name):
    x, _ = data(1)
    m = np.zeros_like(x, bool)
    out = losses.REDUCTIONS[name](x, jnp.asarray(m))
    g = jax.grad(lambda v: losses.REDUCTIONS[name](v, jnp.asarray(m)))(x)
    assert float(out) == 0.0 and np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("name", list(REFS))
def test_no_mask_and_bf16(name):
    x, _ = data(2)
    ones = np.ones_like(x, bool)
    out = losses.REDUCTIONS[name](jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.float32
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(out, REFS[name](x16, ones), rtol=1e-5, atol=1e-6)


def test_named_conventions_on_a_worked_example():
    x = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]], np.float32)
    m = np.array([[True, True, True, True], [True, False, False, False]])
    w = jnp.asarray(m)
    assert float(losses.token_mean(x, w)) == pytest.approx(8 / 5)  # long sequence weighs more
    assert float(losses.sequence_sum_token_mean(x, w)) == pytest.approx(8 / 5)
    assert float(losses.sequence_mean(x, w)) == pytest.approx((1 + 4) / 2)
    assert float(losses.sequence_sum_mean(x, w)) == pytest.approx((4 + 4) / 2)
    assert float(losses.sequence_sum_norm(x, w)) == pytest.approx(8 / (2 * 4))
    assert float(losses.sequence_sum_norm(x, w, horizon=16)) == pytest.approx(8 / (2 * 16))


def test_leading_batch_dims_and_broadcast_mask():
    x, m = data(3, (2, 3, 5))
    out = losses.sequence_mean(x, jnp.asarray(m))
    np.testing.assert_allclose(out, np_seq_mean_token_mean(x.reshape(6, 5).astype(np.float64),
                                                           m.reshape(6, 5)), rtol=1e-5)
    t_mask = np.array([True, True, False, True, False])
    out = losses.token_mean(x, jnp.asarray(t_mask))
    np.testing.assert_allclose(out, x[..., t_mask].mean(), rtol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), c=st.floats(-3, 3))
def test_constant_loss_properties(seed, c):
    """A constant per-token loss c: token/seq means give c; seq sums give c * mean length."""
    _, m = data(seed)
    x = np.full(m.shape, c, np.float32)
    w = jnp.asarray(m)
    expect = c if m.any() else 0.0
    assert float(losses.token_mean(x, w)) == pytest.approx(expect, abs=1e-5)
    assert float(losses.sequence_mean(x, w)) == pytest.approx(expect, abs=1e-5)
    n = m.sum(-1)
    mean_len = n[n > 0].mean() if m.any() else 0.0
    assert float(losses.sequence_sum_mean(x, w)) == pytest.approx(c * mean_len, abs=1e-4)


def test_jit_traces_once():
    traces = []

    @jax.jit
    def agg(x, m):
        traces.append(1)
        return sum(fn(x, m) for fn in losses.REDUCTIONS.values())

    for seed in range(3):
        x, m = data(seed)
        agg(x, jnp.asarray(m)).block_until_ready()
    assert len(traces) == 1


def test_bad_inputs():
    x, m = data(0)
    with pytest.raises(ValueError, match="boolean"):
        losses.token_mean(x, jnp.asarray(m, jnp.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.sequence_mean(x, jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="scalar"):
        losses.token_mean(jnp.float32(1.0))
    with pytest.raises(ValueError, match="horizon"):
        losses.sequence_sum_norm(x, horizon=0)
