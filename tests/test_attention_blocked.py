"""Blocked (flash-style) attention vs the dense reference: values, gradients, the decoder, the
sampler's prefill, and compiled memory.

The reference is ``layers.attention`` with the explicit ``[B, T, S]`` mask the decoder builds
(causal over slots and per-slot validity). A query with no key to attend to (a left-padding
position) is padding: dense returns the mean of all values there, blocked returns 0, so values are
compared at the queries that attend to something and gradients of losses that ignore the others.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import decoder as dec
from opd_jax.model import layers
from opd_jax.model.config import ModelConfig


def _inputs(seed, B, T, S, H, G, E, dtype=jnp.float32):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, H, E), dtype)
    k = jax.random.normal(kk, (B, S, G, E), dtype)
    v = jax.random.normal(kv, (B, S, G, E), dtype)
    w = jax.random.normal(kw, (B, T, H, E), jnp.float32)
    return q, k, v, w


def _left_padding(B, S, pads):
    return jnp.asarray(np.arange(S)[None, :] >= np.asarray(pads)[:, None])


def _dense_mask(q_slot, kv_valid):
    S = kv_valid.shape[1]
    return (jnp.arange(S)[None, None, :] <= q_slot[None, :, None]) & kv_valid[:, None, :]


def _check(q, k, v, w, q_slot, kv_valid, block_q, block_k, rtol=1e-5, atol=1e-5):
    mask = _dense_mask(q_slot, kv_valid)
    attends = np.asarray(mask.any(-1))                       # [B, T]: query has a key
    live = jnp.asarray(attends)[:, :, None, None]

    def out_and_grads(fn):
        def loss(q, k, v):
            o = fn(q, k, v)
            return jnp.sum(jnp.where(live, o * w, 0.0)), o
        (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return o, g

    od, gd = out_and_grads(lambda q, k, v: layers.attention(q, k, v, mask))
    ob, gb = out_and_grads(lambda q, k, v: layers.attention_blocked(
        q, k, v, q_slot, kv_valid, block_q=block_q, block_k=block_k))
    assert ob.shape == od.shape and ob.dtype == od.dtype
    np.testing.assert_allclose(np.asarray(ob)[attends], np.asarray(od)[attends], rtol, atol)
    assert np.all(np.asarray(ob)[~attends] == 0)
    for name, a, b in zip("qkv", gb, gd):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol * scale,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("T,block,H,G", [
    (16, 8, 4, 4),    # T a multiple of the block, multi-head (G = H)
    (37, 8, 4, 2),    # T not a multiple of the block, GQA
    (29, 64, 6, 1),   # one block larger than T (clamped), multi-query (G = 1)
    (50, 7, 8, 2),    # odd block size, 4 query heads per kv head
])
def test_blocked_matches_dense_with_left_padding(T, block, H, G):
    B, E = 3, 16
    q, k, v, w = _inputs(T + H, B, T, T, H, G, E)
    valid = _left_padding(B, T, [0, 5, T - 3])           # row 2: only its last 3 tokens are real
    _check(q, k, v, w, jnp.arange(T), valid, block, block)


def test_blocked_matches_dense_with_different_query_and_key_blocks():
    B, T, H, G, E = 2, 45, 4, 2, 8
    q, k, v, w = _inputs(1, B, T, T, H, G, E)
    valid = _left_padding(B, T, [3, 20])
    _check(q, k, v, w, jnp.arange(T), valid, 16, 5)
    _check(q, k, v, w, jnp.arange(T), valid, 4, 32)


def test_blocked_matches_dense_over_a_kv_cache():
    # prefill of T queries into a cache of S > T slots (the sampler's first call) and a chunk
    # written after earlier slots (index > 0), with invalid slots in the middle of a row
    B, T, S, H, G, E = 2, 12, 40, 4, 2, 16
    q, k, v, w = _inputs(2, B, T, S, H, G, E)
    for index in (0, 9):
        valid = np.zeros((B, S), bool)
        valid[0, index: index + T] = True
        valid[1, index + 4: index + T] = True
        valid[1, 2:5] = index > 0                        # earlier tokens of row 1
        valid = jnp.asarray(valid)
        _check(q, k, v, w, index + jnp.arange(T), valid, 8, 8)


def test_blocked_bfloat16_close_to_dense():
    B, T, H, G, E = 2, 40, 4, 2, 16
    q, k, v, _ = _inputs(3, B, T, T, H, G, E, jnp.bfloat16)
    valid = _left_padding(B, T, [0, 7])
    mask = _dense_mask(jnp.arange(T), valid)
    od = jax.jit(layers.attention)(q, k, v, mask).astype(jnp.float32)
    ob = jax.jit(lambda q, k, v: layers.attention_blocked(q, k, v, jnp.arange(T), valid,
                                                          block_q=8, block_k=8))(q, k, v)
    assert ob.dtype == jnp.bfloat16
    live = np.asarray(mask.any(-1))
    np.testing.assert_allclose(np.asarray(ob.astype(jnp.float32))[live], np.asarray(od)[live],
                               atol=3e-2)


def test_loop_bounds_skip_causal_and_padding_blocks():
    # 4 rows whose first real token is at slot >= 20: key blocks 0 and 1 (block 8) are skipped
    B, T, H, G, E = 4, 40, 2, 1, 4
    q, k, v, _ = _inputs(4, B, T, T, H, G, E)
    valid = _left_padding(B, T, [20, 21, 30, 39])
    *_, slot, _, lo, geo = layers._blocked_layout(q, k, v, jnp.arange(T), valid, 8, 8)
    assert int(lo) == 2
    bq, bk, nk = geo[5], geo[6], geo[8]
    his = [int(layers._block_hi(slot[i * bq:(i + 1) * bq], bk, nk)) for i in range(geo[7])]
    assert his == [1, 2, 3, 4, 5]                         # causal: block i needs keys <= i
    # a padded query block (slots -1) needs no key block
    assert int(layers._block_hi(jnp.full((8,), -1), 8, 5)) == 0


# --- the decoder -------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_dim=64, qk_norm=True, attention_block=8)


def _batch(T, pads, seed=0):
    B = len(pads)
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)
    return tokens, _left_padding(B, T, pads)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_decoder_forward_and_param_grads_match_dense(remat):
    params = dec.init_params(CFG, jax.random.key(0))
    tokens, valid = _batch(37, [0, 6, 30])
    w = jax.random.normal(jax.random.key(1), (3, 37, CFG.d_model))

    def loss(params, attention):
        h, _ = dec.forward(params, CFG, tokens, valid_BxT=valid, remat=remat, attention=attention)
        return jnp.sum(jnp.where(valid[..., None], h * w, 0.0)), h

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ld, hd), gd = vg(params, "dense")
    (lb, hb), gb = vg(params, "blocked")
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(hb)[v], np.asarray(hd)[v], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(lb), float(ld), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gb), jax.tree.leaves(gd)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_config_selects_blocked_and_validates():
    params = dec.init_params(CFG, jax.random.key(0))
    tokens, valid = _batch(20, [0, 4])
    fwd = jax.jit(lambda p, cfg, attention: dec.forward(p, cfg, tokens, valid_BxT=valid,
                                                        attention=attention)[0],
                  static_argnums=(1, 2))
    h_cfg = fwd(params, CFG.replace(attention="blocked"), None)
    h_arg = fwd(params, CFG, "blocked")
    h_dense = fwd(params, CFG, None)
    np.testing.assert_array_equal(np.asarray(h_cfg), np.asarray(h_arg))
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(h_cfg)[v], np.asarray(h_dense)[v], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        CFG.replace(attention="flash")
    with pytest.raises(ValueError, match="attention_block"):
        CFG.replace(attention_block=0)
    with pytest.raises(ValueError, match="unknown attention"):
        dec.forward(params, CFG, tokens, attention="flash")


def test_prefill_into_cache_and_greedy_sampling_match_dense():
    from opd_jax.data.padding import pad_left
    from opd_jax.sampling.sampler import Sampler
    from opd_jax.sampling.strategies import Sampling

    params = dec.init_params(CFG, jax.random.key(0))
    blocked_cfg = CFG.replace(attention="blocked")
    tokens, valid = _batch(19, [0, 7])
    prefill = jax.jit(lambda p, cfg: dec.forward(p, cfg, tokens, valid_BxT=valid,
                                                 cache=dec.init_cache(cfg, 2, 30)),
                      static_argnums=1)
    for cfg in (CFG, blocked_cfg):
        h, c = prefill(params, cfg)
        if cfg is CFG:
            ref_h, ref_c = h, c
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(h)[v], np.asarray(ref_h)[v], rtol=1e-5, atol=1e-5)
    # keys / values of the real slots (padding slots hold padding positions' keys: never read)
    real = np.asarray(ref_c.valid)
    assert np.array_equal(np.asarray(c.valid), real)
    for a, b in ((c.k, ref_c.k), (c.v, ref_c.v)):
        # cache layout [L, B, G, S, E]: bring slots next to rows to select the real ones
        a, b = (np.moveaxis(np.asarray(x), 3, 2) for x in (a, b))
        np.testing.assert_allclose(a[:, real], b[:, real], rtol=1e-5, atol=1e-5)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3, 4, 5]]
    tok, val = pad_left(prompts)
    outs = [Sampler(cfg, Sampling(temperature=0.0), 12, layer_loop="scan")(
        params, tok, val, jax.random.key(0)) for cfg in (CFG, blocked_cfg)]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs_full),
                               np.asarray(outs[1].logprobs_full), atol=1e-5)


# --- memory ------------------------------------------------------------------------------------


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_blocked_below_dense():
    # T = 2048, 4 heads: dense scores alone are 4 x 2048^2 x 4 B = 64 MiB per row (x ~3 in the
    # backward pass); blocked (128) keeps O(T * block)
    B, T, H, G, E = 1, 2048, 4, 2, 32
    q, k, v, w = _inputs(5, B, T, T, H, G, E)
    valid = jnp.ones((B, T), bool)
    slot = jnp.arange(T)

    def dense_loss(q, k, v):
        mask = _dense_mask(slot, valid)
        return jnp.sum(layers.attention(q, k, v, mask) * w)

    def blocked_loss(q, k, v):
        return jnp.sum(layers.attention_blocked(q, k, v, slot, valid, block_q=128,
                                                block_k=128) * w)

    grad = lambda f: jax.grad(f, argnums=(0, 1, 2))
    dense_fwd, blocked_fwd = _temp_bytes(dense_loss, q, k, v), _temp_bytes(blocked_loss, q, k, v)
    dense_bwd = _temp_bytes(grad(dense_loss), q, k, v)
    blocked_bwd = _temp_bytes(grad(blocked_loss), q, k, v)
    scores = H * T * T * 4
    assert dense_fwd >= scores and dense_bwd >= scores, (dense_fwd, dense_bwd)
    assert blocked_fwd * 10 < dense_fwd, (blocked_fwd, dense_fwd)
    assert blocked_bwd * 10 < dense_bwd, (blocked_bwd, dense_bwd)
