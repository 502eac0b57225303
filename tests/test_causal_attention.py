"""``dense_attention.causal_attention``: causal query blocks against float64 references and the
one-block dense attention (values, gradients, what is saved), ``query_blocks``' ranges, and the
decoder's packed forward and gradient with several blocks against one."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attention_ref import assert_grads_match_float64, plain_attention
from _compat import enable_x64
from jax.ad_checkpoint import print_saved_residuals

from opd_jax.model import decoder, dense_attention
from opd_jax.model.config import ModelConfig

B, T, H, G, E = 2, 40, 6, 2, 8
BLOCKS = ((0, 16), (16, 24), (24, 40))          # uneven, as query_blocks may cut them


def _inputs(dtype):
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(kk, s, jnp.float32).astype(dtype)
               for kk, s in zip(ks, [(B, T, H, E), (B, T, G, E), (B, T, G, E)]))
    valid = np.ones((B, T), bool)
    valid[0, :5] = False                              # left padding: queries that see no key
    valid[1, -3:] = False                             # trailing padding of a packed row
    seg = np.ones((B, T), int)
    seg[1, 13:] = 2                                   # two sequences in row 1
    seg[1, -3:] = 0
    mask = (np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
            & (seg[:, :, None] == seg[:, None, :]))
    sees = mask.any(-1)                               # [B, T]: queries with a visible key
    cot = jax.random.normal(ks[3], (B, T, H, E), jnp.float32) * sees[:, :, None, None]
    return q, k, v, jnp.asarray(mask), cot, sees


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 4e-2)])
def test_values_and_gradients_match_float64(dtype, tol):
    q, k, v, mask, cot, sees = _inputs(dtype)
    out = dense_attention.causal_attention(q, k, v, mask, BLOCKS)
    assert out.dtype == dtype and out.shape == (B, T, H, E)
    grads = jax.grad(lambda *a: jnp.sum(dense_attention.causal_attention(*a, mask, BLOCKS)
                                        .astype(jnp.float32) * cot), (0, 1, 2))(q, k, v)
    with enable_x64():
        a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v)]
        ref_out = np.asarray(plain_attention(*a64, mask))
    np.testing.assert_allclose(np.asarray(out, np.float64)[sees], ref_out[sees], atol=tol)
    assert_grads_match_float64(grads, q, k, v, mask, cot, tol)


def test_equals_the_one_block_attention():
    q, k, v, mask, cot, sees = _inputs(jnp.float32)
    dense = dense_attention.attention(q, k, v, mask)
    one = dense_attention.causal_attention(q, k, v, mask, ((0, T),))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(dense))
    blocked = dense_attention.causal_attention(q, k, v, mask, BLOCKS)
    np.testing.assert_allclose(np.asarray(blocked)[sees], np.asarray(dense)[sees], atol=1e-6)

    def grads(f):
        return jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v)
    for g, r in zip(grads(lambda *a: dense_attention.causal_attention(*a, mask, BLOCKS)),
                    grads(lambda *a: dense_attention.attention(*a, mask))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


def test_saves_each_blocks_probabilities_over_its_key_prefix():
    q, k, v, mask, _, _ = _inputs(jnp.bfloat16)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(lambda q, k, v: dense_attention.causal_attention(q, k, v, mask,
                                                                               BLOCKS), q, k, v)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    shapes = sorted(ln.split(" ")[0] for ln in lines if not ln.startswith("bool"))
    want = sorted([f"u16[{B},{T},{H},{E}]", f"u16[{B},{T},{G},{E}]", f"u16[{B},{T},{G},{E}]"]
                  + [f"u16[{B},{G},{H // G},{b - a},{b}]" for a, b in BLOCKS])
    assert shapes == want, buf.getvalue()


@pytest.mark.parametrize("T_", [1, 8, 16, 100, 168, 176, 352, 704, 1000, 4096, 32768])
def test_query_blocks_cover_the_queries(T_):
    blocks = dense_attention.query_blocks(T_)
    assert blocks[0][0] == 0 and blocks[-1][1] == T_
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(blocks, blocks[1:]))
    assert all(a < b for a, b in blocks) and all(b % 8 == 0 for _, b in blocks[:-1])
    n = min(dense_attention.MAX_QUERY_BLOCKS, max(1, round(T_ / dense_attention.QUERY_BLOCK)))
    assert len(blocks) == n
    assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 16


def test_query_blocks_examples():
    assert dense_attention.query_blocks(96) == ((0, 96),)
    assert dense_attention.query_blocks(352) == ((0, 120), (120, 240), (240, 352))
    assert dense_attention.query_blocks(100, block=50) == ((0, 56), (56, 100))


@pytest.mark.parametrize("blocks", [((0, 16), (24, 40)), ((0, 16), (16, 32)), ((8, 40),),
                                    ((0, 16), (16, 16), (16, 40))])
def test_bad_blocks_are_refused(blocks):
    q, k, v, mask, _, _ = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="query_blocks"):
        dense_attention.causal_attention(q, k, v, mask, blocks)


def test_decoder_packed_forward_and_gradient_match_one_block(monkeypatch):
    """Packed rows (two segments, trailing padding), float32: hidden states at real tokens
    and the parameters' gradient of a masked loss agree between 3 query blocks and 1."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, ffn_dim=48, max_position=128)
    params = decoder.init_params(cfg, jax.random.key(0))
    Tp = 48
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, Tp)), jnp.int32)
    seg = np.ones((2, Tp), np.int32)
    seg[:, 20:] = 2
    seg[1, 44:] = 0
    pos = np.concatenate([np.arange(20), np.arange(Tp - 20)])[None].repeat(2, 0)
    valid = seg > 0
    w = jnp.asarray(valid, jnp.float32)[..., None]

    def run(block):
        monkeypatch.setattr(dense_attention, "QUERY_BLOCK", block)

        def loss(p):
            h, _ = decoder.forward(p, cfg, tokens, jnp.asarray(pos), valid_BxT=jnp.asarray(valid),
                                   segment_ids_BxT=jnp.asarray(seg))
            return jnp.sum(jnp.sin(h) * w), h
        (val, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return val, np.asarray(h)[valid], g
    assert len(dense_attention.query_blocks(Tp, 16)) == 3
    v3, h3, g3 = run(16)
    v1, h1, g1 = run(10_000)
    np.testing.assert_allclose(h3, h1, atol=1e-5)
    np.testing.assert_allclose(float(v3), float(v1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
