"""Mixed precision without float32 detours (session 21): what the compiled programs hold.

XLA CPU has no bfloat16 dynamic-slice / dynamic-update-slice: a bfloat16 array stacked over the
layer scan is converted whole to float32 around every per-layer read or write. So the compiled
mixed-precision gradient must hold no bfloat16 ``[L, ...]`` stack (residuals cross the scan as
``uint16`` bits, per-layer weight gradients come back in float32), a frozen bfloat16 model's
forward no float32 ``[L, ...]`` copy of its weights; and the values stay those of the plain
formulation (the weights cast before the scan).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.losses import unembedding as unemb
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.model.dtypes import cast_floating
from opd_jax.train.state import StudentSpec

L = 3
C = ModelConfig(n_layers=L, vocab_size=96, d_model=64, ffn_dim=128, n_heads=4, n_kv_heads=2,
                head_dim=16)


def _tokens(B=2, T=12):
    toks = jax.random.randint(jax.random.key(3), (B, T), 0, 96)
    return toks, jnp.ones((B, T), bool).at[0, :3].set(False)


def _stacks(hlo: str, dtype: str) -> list[str]:
    """Instructions of the compiled module whose result is a ``dtype[L, ...]`` array."""
    return re.findall(rf"= {dtype}\[{L},[\d,]*\]\S* \w+", hlo)


def _loss(spec, params, toks, valid):
    return jnp.sum(spec.hidden(params, None, toks, valid).astype(jnp.float32) ** 2)


def test_mixed_precision_gradient_holds_no_bfloat16_layer_stack():
    params = dec.init_params(C, jax.random.key(0))
    toks, valid = _tokens()
    spec = StudentSpec(C, compute_dtype="bfloat16")
    grad = jax.jit(jax.grad(lambda p: _loss(spec, p, toks, valid)))
    hlo = grad.lower(params).compile().as_text()
    assert _stacks(hlo, "bf16") == []
    assert _stacks(hlo, "u16")                     # the residuals, as bits
    g = grad(params)
    for leaf in jax.tree.leaves(g):
        assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))
    # the projections' weight gradients are float32 sums, not bfloat16-rounded ones
    q = np.asarray(g["layers"]["q"])
    assert np.mean(q != np.asarray(jnp.asarray(q).astype(jnp.bfloat16).astype(jnp.float32))) > 0.5


def test_mixed_precision_values_match_casting_before_the_scan():
    params = dec.init_params(C, jax.random.key(0))
    toks, valid = _tokens()
    spec = StudentSpec(C, compute_dtype="bfloat16")
    h_new = spec.hidden(params, None, toks, valid)
    h_old, _ = dec.forward(cast_floating(params, jnp.bfloat16), C, toks, valid_BxT=valid)
    np.testing.assert_array_equal(np.asarray(h_new, np.float32), np.asarray(h_old, np.float32))
    g_new = jax.grad(lambda p: _loss(spec, p, toks, valid))(params)
    g_old = jax.grad(lambda p: jnp.sum(dec.forward(cast_floating(p, jnp.bfloat16), C, toks,
                                                   valid_BxT=valid)[0].astype(jnp.float32) ** 2)
                     )(params)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
        b = np.asarray(b, np.float32)
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-2 * max(1.0, float(np.abs(b).max())))


def test_frozen_bfloat16_forward_slices_its_weights_in_place():
    params = cast_floating(dec.init_params(C, jax.random.key(0)), jnp.bfloat16)
    toks, valid = _tokens()

    def run(differentiable):
        return jax.jit(lambda p: dec.forward(p, C, toks, valid_BxT=valid,
                                             differentiable=differentiable)[0])

    frozen = run(False)
    assert _stacks(frozen.lower(params).compile().as_text(), "f32") == []
    np.testing.assert_array_equal(np.asarray(frozen(params), np.float32),
                                  np.asarray(run(True)(params), np.float32))
    # a bfloat16-parameter model stays differentiable by default
    g = jax.grad(lambda p: jnp.sum(dec.forward(p, C, toks, valid_BxT=valid)[0]
                                   .astype(jnp.float32)))(params)
    assert float(jnp.abs(g["layers"]["q"].astype(jnp.float32)).max()) > 0


def test_bfloat16_cache_prefill_rebuilds_no_float32_stack():
    params = cast_floating(dec.init_params(C, jax.random.key(0)), jnp.bfloat16)
    toks, valid = _tokens()
    cache = dec.init_cache(C, 2, 16, jnp.bfloat16)
    fill = jax.jit(lambda p, c: dec.hidden_states(p, C, toks, valid, cache=c,
                                                  differentiable=False))
    assert _stacks(fill.lower(params, cache).compile().as_text(), "f32") == []
    h, new = fill(params, cache)
    h_ref, ref = dec.hidden_states(params, C, toks, valid, cache=cache)
    assert new.k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new.k, np.float32), np.asarray(ref.k, np.float32))
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_ref, np.float32))


def test_unembedding_gradient_products_take_the_compute_dtype():
    h = jax.random.normal(jax.random.key(0), (8, 64))
    table = jax.random.normal(jax.random.key(1), (96, 64)) * 0.1
    g = jax.random.normal(jax.random.key(2), (8, 32)) * 1e-3
    f32 = jnp.float32
    bf = jnp.bfloat16
    assert unemb.product_dtype(h, unemb.TiedUnembedding(table)) == f32
    assert unemb.product_dtype(h, unemb.TiedUnembedding(table.astype(bf))) == f32
    assert unemb.product_dtype(h.astype(bf), unemb.TiedUnembedding(table.astype(bf))) == bf
    # mixed precision: bfloat16 hidden states over the float32 master table
    assert unemb.product_dtype(h.astype(bf), unemb.TiedUnembedding(table)) == bf
    z = unemb.logits(h.astype(bf), unemb.TiedUnembedding(table))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(unemb.logits(
        h.astype(bf), unemb.TiedUnembedding(table.astype(bf)))))
    block = table[:32]
    # float32: exactly the float32 products
    np.testing.assert_array_equal(np.asarray(unemb.hidden_grad(g, block, True)),
                                  np.asarray(jnp.dot(g, block, precision="highest")))
    np.testing.assert_array_equal(np.asarray(unemb.weight_grad(h, g, True)),
                                  np.asarray(jnp.dot(g.T, h, precision="highest")))
    # bfloat16 operands, float32 sums, close to the float64 products
    ref_dh = np.asarray(g, np.float64) @ np.asarray(block, np.float64)
    ref_dw = np.asarray(g, np.float64).T @ np.asarray(h, np.float64)
    dh = unemb.hidden_grad(g.astype(bf), block.astype(bf), True)
    dw = unemb.weight_grad(h.astype(bf), g.astype(bf), True)
    untied_dh = unemb.hidden_grad(g.astype(bf), block.T.astype(bf), False)
    untied_dw = unemb.weight_grad(h.astype(bf), g.astype(bf), False)
    for got, ref in ((dh, ref_dh), (dw, ref_dw), (untied_dh, ref_dh), (untied_dw, ref_dw.T)):
        assert got.dtype == f32
        np.testing.assert_allclose(np.asarray(got), ref, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_precision_unembedding_gradient_is_float32_without_bfloat16_rounding(tied):
    c = dataclasses.replace(C, tie_embeddings=tied)
    spec = StudentSpec(c, compute_dtype="bfloat16")
    params = dec.init_params(c, jax.random.key(0))
    w = spec.unembed(params, None)
    assert w.dtype == jnp.float32                  # the master table; products cast it
    h = jax.random.normal(jax.random.key(1), (2, 4, 64)).astype(jnp.bfloat16)
    toks = jax.random.randint(jax.random.key(2), (2, 4), 0, 96)
    def loss(p):
        return losses.chunked_token_logprobs(h, spec.unembed(p, None), toks, chunk_size=4).sum()

    g = jax.grad(loss)(params)["embed" if tied else "unembed"]
    assert g.dtype == jnp.float32 and float(jnp.abs(g).max()) > 0
    gb = np.asarray(g.astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(np.asarray(g) != gb) > 0.5
