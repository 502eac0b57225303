"""``opd_jax.model.dense_attention``: the training forward's attention VJP against float64
references (numpy forward from the definition, float64 autodiff of the plain formula), with
padding rows, fully masked rows and grouped heads; and what it saves (four tensors, 2-byte
floats as ``uint16`` bits, no float32 probabilities)."""

from __future__ import annotations

import contextlib
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_ref import assert_grads_match_float64
from jax.ad_checkpoint import print_saved_residuals

from opd_jax.model import dense_attention, layers

B, T, H, G, E = 2, 10, 6, 2, 8


def _inputs(dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, s, jnp.float32).astype(dtype)
               for kk, s in zip(ks, [(B, T, H, E), (B, T, G, E), (B, T, G, E)]))
    valid = np.ones((B, T), bool)
    valid[0, :3] = False                                    # left padding: fully masked queries
    mask = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
    cot = jax.random.normal(ks[3], (B, T, H, E), jnp.float32)
    return q, k, v, jnp.asarray(mask), cot


def _numpy_attention(q, k, v, mask):
    """float64, from the definition: o_t = sum_s softmax_s(q_t . k_s / sqrt(E) + m_ts) v_s."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            s = q[b, :, h] @ k[b, :, g].T / math.sqrt(E)
            s = np.where(mask[b], s, dense_attention.MASK_VALUE)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 4e-2)])
def test_values_and_gradients_match_float64_references(dtype, tol):
    q, k, v, mask, cot = _inputs(dtype)
    out = dense_attention.attention(q, k, v, mask)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float64), _numpy_attention(q, k, v, mask),
                               atol=tol)
    grads = jax.grad(lambda *a: jnp.sum(dense_attention.attention(*a, mask).astype(jnp.float32)
                                        * cot), (0, 1, 2))(q, k, v)
    assert_grads_match_float64(grads, q, k, v, mask, cot, tol)


def test_fully_masked_rows_get_no_gradient():
    q, k, v, mask, cot = _inputs(jnp.float32)
    dq = jax.grad(lambda q: jnp.sum(dense_attention.attention(q, k, v, mask) * cot))(q)
    assert float(jnp.abs(dq[0, :3]).max()) == 0.0          # padding queries: exactly 0
    assert float(jnp.abs(dq[0, 3:]).max()) > 0.0


def test_layers_attention_is_the_vjp():
    q, k, v, mask, _ = _inputs(jnp.float32)
    np.testing.assert_array_equal(np.asarray(layers.attention(q, k, v, mask)),
                                  np.asarray(dense_attention.attention(q, k, v, mask)))


@pytest.mark.parametrize("dtype,saved_dtype", [(jnp.float32, "f32"), (jnp.bfloat16, "u16")])
def test_saves_q_k_v_and_probabilities_once(dtype, saved_dtype):
    q, k, v, mask, _ = _inputs(dtype)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(lambda q, k, v: dense_attention.attention(q, k, v, mask), q, k, v)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    shapes = sorted(ln.split(" ")[0] for ln in lines if not ln.startswith("bool"))
    want = sorted([f"{saved_dtype}[{B},{T},{H},{E}]", f"{saved_dtype}[{B},{T},{G},{E}]",
                   f"{saved_dtype}[{B},{T},{G},{E}]",
                   f"{saved_dtype}[{B},{G},{H // G},{T},{T}]"])
    assert shapes == want, buf.getvalue()


def test_mixed_dtypes_are_refused():
    q, k, v, mask, _ = _inputs(jnp.float32)
    with pytest.raises(TypeError, match="one dtype"):
        dense_attention.attention(q.astype(jnp.bfloat16), k, v, mask)
