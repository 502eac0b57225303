"""``opd_jax.model.lean_ops``: the projections' and the SwiGLU MLP's custom VJPs give the values and
gradients of the plain formulas (float64 autodiff of the textbook expressions as the reference),
in float32 and bfloat16, under every remat policy; and a decoder layer saves what they promise
(two ``[B, T, F]`` tensors, no copies of the weights)."""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _compat import enable_x64
from jax.ad_checkpoint import print_saved_residuals

from opd_jax.model import decoder, lean_ops
from opd_jax.model.config import ModelConfig
from opd_jax.model.inputs import step_inputs


def _plain_project(x, w, n_in):
    k = int(np.prod(w.shape[:n_in]))
    return (x.reshape(*x.shape[:2], k) @ w.reshape(k, -1)).reshape(*x.shape[:2], *w.shape[n_in:])


def _plain_swiglu(g, u, w):
    return (g / (1 + jnp.exp(-g)) * u) @ w


def _rand(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _reference(fn, args, cot):
    """Value and gradients of ``sum(fn(*args) * cot)`` in float64 (plain autodiff)."""
    with enable_x64():
        a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        c64 = jnp.asarray(np.asarray(cot, np.float64))
        loss = lambda *a: jnp.sum(fn(*a) * c64)
        return np.asarray(fn(*a64)), [np.asarray(g) for g in jax.grad(loss, range(len(a64)))(*a64)]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("x_shape,w_shape,n_in", [((2, 3, 8), (8, 4, 5), 1),     # q: d -> h e
                                                  ((2, 3, 4, 5), (4, 5, 8), 2)])  # o: h e -> d
def test_project_values_and_gradients(dtype, tol, x_shape, w_shape, n_in):
    x, w = _rand(x_shape, 0, dtype), _rand(w_shape, 1, dtype)
    y = lean_ops.project(x, w, n_in)
    cot = _rand(y.shape, 2)
    ref_y, ref_g = _reference(lambda a, b: _plain_project(a, b, n_in), (x, w), cot)
    assert y.dtype == dtype and y.shape == ref_y.shape
    grads = jax.grad(lambda a, b: jnp.sum(lean_ops.project(a, b, n_in).astype(jnp.float32) * cot),
                     (0, 1))(x, w)
    scale = lambda r: max(1.0, float(np.abs(r).max()))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, atol=tol * scale(ref_y))
    for g, r, a in zip(grads, ref_g, (x, w)):
        assert g.dtype == a.dtype and g.shape == a.shape
        np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=tol * scale(r))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("x_shape,w_shape,n_in", [((2, 3, 8), (8, 4, 5), 1),     # q: d -> h e
                                                  ((2, 3, 4, 5), (4, 5, 8), 2),   # o: h e -> d
                                                  ((3, 1, 8), (8, 6), 1)])        # one decode step
def test_out_major_projection_equals_the_plain_formula(dtype, tol, x_shape, w_shape, n_in):
    """The sampler's out-major weight (``[N, K]`` row-major copy) gives the projection's values
    (float64 reference), in ``x``'s dtype, from one ``[M, K] x [N, K]^T`` dot with float32 sums."""
    x, w = _rand(x_shape, 0, dtype), _rand(w_shape, 1, dtype)
    om = lean_ops.out_major(w, n_in)
    k = int(np.prod(w_shape[:n_in]))
    assert om.w_NxK.shape == (int(np.prod(w_shape[n_in:])), k) and om.out_shape == w_shape[n_in:]
    np.testing.assert_array_equal(np.asarray(om.w_NxK, np.float32),
                                  np.asarray(w, np.float32).reshape(k, -1).T)
    y = lean_ops.project_out_major(x, om)
    ref = _reference(lambda a, b: _plain_project(a, b, n_in), (x, w), _rand(y.shape, 2))[0]
    assert y.dtype == dtype and y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=tol * max(1.0, np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(lean_ops.project(x, w, n_in), np.float32),
                               atol=tol * max(1.0, np.abs(ref).max()))
    text = jax.jit(lean_ops.project_out_major).lower(x, om).as_text()
    assert re.findall(r"contracting_dims = \[(\d)\] x \[(\d)\]", text) == [("1", "1")]
    assert re.findall(r"dot_general.*?->\s*tensor<[0-9x]+(\w+)>", text) == ["f32"]


def test_bfloat16_projection_dots_return_float32_sums():
    """A bfloat16 projection's forward dot returns its float32 sums (then cast): XLA CPU's fast
    bfloat16 path (AMX) takes only that form, and the sums keep float32 precision; float32
    operands lower to the same single dot as before."""
    for dtype, out in ((jnp.bfloat16, "f32"), (jnp.float32, "f32")):
        x, w = _rand((2, 3, 8), 0, dtype), _rand((8, 4, 5), 1, dtype)
        text = jax.jit(lambda a, b: lean_ops.project(a, b, 1)).lower(x, w).as_text()
        dots = re.findall(r"dot_general.*?->\s*tensor<([0-9x]+)(\w+)>", text)
        assert dots and all(t == out for _, t in dots), (dtype, dots)
    # the backward's dots too, as row-major [M, K] @ [K, N] (transposed operands copied first)
    x, w = _rand((2, 3, 8), 0, jnp.bfloat16), _rand((8, 4, 5), 1, jnp.bfloat16)
    grad = jax.grad(lambda a, b: jnp.sum(lean_ops.project(a, b, 1).astype(jnp.float32)), (0, 1))
    text = jax.jit(grad).lower(x, w).as_text()
    dims = re.findall(r"contracting_dims = \[(\d)\] x \[(\d)\]", text)
    assert len(dims) == 2 and set(dims) == {("1", "0")}, dims   # dx and dw
    # 4096 products of 1 x 1: a bfloat16 running sum would stop at 256; float32 sums give 4096
    y = lean_ops.project(jnp.ones((1, 1, 4096), jnp.bfloat16), jnp.ones((4096, 2), jnp.bfloat16), 1)
    assert y.dtype == jnp.bfloat16 and np.asarray(y, np.float32).tolist() == [[[4096.0, 4096.0]]]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
def test_swiglu_down_values_and_gradients(dtype, tol):
    g, u, w = _rand((2, 5, 16), 3, dtype), _rand((2, 5, 16), 4, dtype), _rand((16, 8), 5, dtype)
    g = g.at[0, 0, :4].set(jnp.asarray([-30.0, -8.0, 8.0, 30.0], dtype))   # saturated sigmoids
    y = lean_ops.swiglu_down(g, u, w)
    cot = _rand(y.shape, 6)
    ref_y, ref_g = _reference(_plain_swiglu, (g, u, w), cot)
    grads = jax.grad(lambda *a: jnp.sum(lean_ops.swiglu_down(*a).astype(jnp.float32) * cot),
                     (0, 1, 2))(g, u, w)
    scale = lambda r: max(1.0, float(np.abs(r).max()))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, atol=tol * scale(ref_y))
    for got, r in zip(grads, ref_g):
        assert np.isfinite(np.asarray(got, np.float64)).all()
        np.testing.assert_allclose(np.asarray(got, np.float64), r, atol=tol * scale(r))


def test_bfloat16_swiglu_rounds_once():
    """``silu(g) * u`` and the SwiGLU's input gradients in bfloat16 are the float64 values rounded
    once (within half a bfloat16 ulp, plus float32 noise): the chain runs in
    float32. A bfloat16 chain rounds after every op and misses this bound on many elements."""
    g = _rand((4, 64, 96), 7, jnp.bfloat16) * 3
    u, dh = _rand((4, 64, 96), 8, jnp.bfloat16), _rand((4, 64, 96), 9, jnp.bfloat16)
    g64, u64, dh64 = (np.asarray(x, np.float64) for x in (g, u, dh))
    sig = 1 / (1 + np.exp(-g64))
    def half_ulp(r):   # half a bfloat16 ulp at r (8 significant bits), and float32 noise
        return np.ldexp(1.0, np.frexp(r)[1] - 9) * (1 + 1e-4) + 1e-30
    h = np.asarray(lean_ops.gated_mlp_input(g, u), np.float64)
    assert (np.abs(h - g64 * sig * u64) <= half_ulp(g64 * sig * u64)).all()
    # the backward's elementwise part: vjp of silu(g) * u at the recomputed input
    _, vjp = jax.vjp(lean_ops.gated_mlp_input, g, u)
    dg, du = (np.asarray(x, np.float64) for x in vjp(dh))
    w = jnp.eye(96, dtype=jnp.bfloat16)   # the custom VJP's path: dh through an identity down
    _, vjp_down = jax.vjp(lean_ops.swiglu_down, g, u, w)
    dg2, du2, _ = (np.asarray(x, np.float64) for x in vjp_down(dh))
    ref_du, ref_dg = dh64 * g64 * sig, dh64 * u64 * sig * (1 + g64 * (1 - sig))
    assert (np.abs(du2 - ref_du) <= half_ulp(ref_du)).all()
    assert (np.abs(dg2 - ref_dg) <= half_ulp(ref_dg)).all()
    np.testing.assert_allclose(du, ref_du, rtol=2 ** -7, atol=1e-6)   # plain autodiff of it
    np.testing.assert_allclose(dg, ref_dg, rtol=2 ** -7, atol=1e-6)


CFG = ModelConfig(vocab_size=64, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_dim=48)


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_decoder_gradients_match_plain_autodiff_under_every_remat(remat, monkeypatch):
    params = decoder.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.vocab_size)

    def loss(p):
        return jnp.sum(decoder.forward(p, CFG, tokens, remat=remat)[0] ** 2)

    lean = jax.grad(loss)(params)
    monkeypatch.setattr(lean_ops, "project", lambda x, w, n: _plain_project(x, w, n))
    monkeypatch.setattr(lean_ops, "swiglu_down", _plain_swiglu)
    plain = jax.grad(loss)(params)
    for a, b in zip(jax.tree.leaves(lean), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                   atol=2e-5 * float(np.abs(np.asarray(b)).max()))


def test_a_layer_saves_two_mlp_tensors_and_no_weight_copies():
    params = decoder.init_params(CFG, jax.random.key(0))
    weights = jax.tree.map(lambda x: x[0], decoder.layer_weights(params, None))
    tokens = jnp.zeros((2, 7), jnp.int32)
    inputs = step_inputs(CFG, tokens)
    x = _rand((2, 7, CFG.d_model), 1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):   # the public API prints them
        print_saved_residuals(lambda w, x: jnp.sum(decoder.layer(CFG, inputs, x, w)[0]),
                              weights, x)
    res = out.getvalue().splitlines()
    shape = lambda line: tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", line).group(1)
                               .split(",") if d)
    computed = [shape(line) for line in res if "from the argument" not in line]
    assert len([s for s in computed if s == (2, 7, CFG.ffn_dim)]) == 2, res   # gate and up
    weight_shapes = {w.shape for w in jax.tree.leaves(weights)}
    # the 2-D views of q/k/v/o weights are not saved (they were, stacked over the layer scan)
    flat = {(int(np.prod(s[:1])), int(np.prod(s[1:]))) for s in weight_shapes if len(s) > 1}
    flat |= {(int(np.prod(s[:2])), int(np.prod(s[2:]))) for s in weight_shapes if len(s) > 2}
    assert not [s for s in computed if s in weight_shapes or s in flat], res
