"""Decoder core: cache consistency, padding invariance, causality, LoRA, remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig, RopeScaling, param_shapes
from opd_jax.model.layers import rope_inv_freq
from opd_jax.model.lora import init_lora, merge_lora

FAMILIES = {
    "llama": ModelConfig(family="llama"),
    "llama3_scaled": ModelConfig(family="llama", rope_scaling=RopeScaling(original_max_position=16)),
    "qwen2": ModelConfig(family="qwen2", qkv_bias=True),
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, tie_embeddings=True),
}


def _setup(config, B=2, T=9, seed=0):
    params = dec.init_params(config, jax.random.key(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (B, T), 0, config.vocab_size)
    return params, tokens


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_incremental_decode_with_cache_matches_full_forward(name):
    config = FAMILIES[name]
    params, tokens = _setup(config)
    full, _ = dec.forward(params, config, tokens)
    cache = dec.init_cache(config, 2, 16)
    h, cache = dec.forward(params, config, tokens[:, :5], cache=cache)
    parts = [h]
    for t in range(5, 9):
        h, cache = dec.forward(params, config, tokens[:, t:t + 1], cache=cache)
        parts.append(h)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), full, atol=2e-5)
    assert int(cache.index) == 9 and cache.next_pos.tolist() == [9, 9]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_left_padding_does_not_change_real_tokens(name):
    config = FAMILIES[name]
    params, tokens = _setup(config, B=1)
    ref, _ = dec.forward(params, config, tokens)
    padded = jnp.concatenate([jnp.full((1, 4), 7, jnp.int32), tokens], 1)
    valid = jnp.concatenate([jnp.zeros((1, 4), bool), jnp.ones_like(tokens, bool)], 1)
    out, _ = dec.forward(params, config, padded, valid_BxT=valid)
    np.testing.assert_allclose(out[:, 4:], ref, atol=2e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_causality_future_tokens_do_not_leak():
    config = FAMILIES["llama"]
    params, tokens = _setup(config)
    h1, _ = dec.forward(params, config, tokens)
    h2, _ = dec.forward(params, config, tokens.at[:, 6].set((tokens[:, 6] + 1) % config.vocab_size))
    np.testing.assert_array_equal(h1[:, :6], h2[:, :6])
    assert float(jnp.abs(h1[:, 6:] - h2[:, 6:]).max()) > 1e-4


def test_rope_llama3_scaling_matches_reference_formula():
    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    ours = rope_inv_freq(128, 500000.0, s)
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    ref = []
    for f in base:  # the Llama 3.1 reference implementation, written as a scalar loop
        wavelen = 2 * np.pi / f
        if wavelen < 8192 / 4.0:
            ref.append(f)
        elif wavelen > 8192 / 1.0:
            ref.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            ref.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_allclose(ours, np.array(ref), rtol=1e-6)


def test_lora_fresh_is_noop_and_merge_matches_adapter():
    config = FAMILIES["qwen2"]
    params, tokens = _setup(config)
    lora = init_lora(config, jax.random.key(5), rank=4, alpha=8.0)
    base, _ = dec.forward(params, config, tokens)
    fresh, _ = dec.forward(params, config, tokens, lora=lora)
    np.testing.assert_array_equal(base, fresh)
    lora = lora.replace(weights=jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(9), x.shape), lora.weights))
    adapted, _ = dec.forward(params, config, tokens, lora=lora)
    merged, _ = dec.forward(merge_lora(params, lora), config, tokens)
    np.testing.assert_allclose(adapted, merged, atol=1e-4)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        init_lora(config, jax.random.key(0), rank=2, alpha=2.0, targets=("qkv",))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_value_and_grad(remat):
    config = FAMILIES["llama"]
    params, tokens = _setup(config)

    def loss(p, remat):
        h, _ = dec.forward(p, config, tokens, remat=remat)
        return jnp.mean(dec.logits(p, config, h) ** 2)

    g0 = jax.grad(loss)(params, "none")
    g1 = jax.grad(loss)(params, remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g0, g1)


def test_bfloat16_params_give_finite_float32_logits():
    config = FAMILIES["qwen3"]
    params = dec.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, config.vocab_size)
    h, _ = dec.forward(params, config, tokens)
    out = dec.logits(params, config, h)
    assert h.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_param_count_matches_tree():
    for config in FAMILIES.values():
        params = dec.init_params(config, jax.random.key(0))
        assert sum(x.size for x in jax.tree.leaves(params)) == config.n_params
        shapes = jax.tree.map(lambda x: x.shape, params)
        assert shapes == jax.tree.map(tuple, param_shapes(config), is_leaf=lambda s: isinstance(s, tuple))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model family"):
        ModelConfig(family="gpt2")
    with pytest.raises(ValueError, match="unknown remat"):
        c = FAMILIES["llama"]
        p, t = _setup(c)
        dec.forward(p, c, t, remat="some")


def test_attention_over_cache_layout_matches_float64_reference():
    # the KV cache stores keys/values [B, G, S, E]; decode attention reads them in that layout
    from opd_jax.model.cache_attention import attention_over_cache
    from opd_jax.model.layers import attention

    rng = np.random.default_rng(0)
    B, T, S, H, G, E = 2, 3, 7, 6, 2, 4
    q = rng.standard_normal((B, T, H, E))
    k = rng.standard_normal((B, S, G, E))
    v = rng.standard_normal((B, S, G, E))
    mask = rng.random((B, T, S)) < 0.6
    mask[..., 0] = True                      # every query has a key
    got = attention_over_cache(*(jnp.asarray(x, jnp.float32) for x in (
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))), jnp.asarray(mask))
    same = attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    # float64 reference: head h uses kv head h // (H // G)
    kh, vh = (np.repeat(x, H // G, axis=2) for x in (k, v))
    s = np.einsum("bthe,bshe->bhts", q, kh) / np.sqrt(E)
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bshe->bthe", p, vh)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(same), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keys_last", [False, True])
@pytest.mark.parametrize("multiply_reduce", [True, False])
def test_one_query_attention_matches_float64_and_ignores_masked_slots(monkeypatch, multiply_reduce,
                                                                      keys_last):
    # a decode step (T = 1) runs as multiply-reduces on the CPU (``ONE_QUERY_MULTIPLY_REDUCE``),
    # as the batched einsum elsewhere: both against the float64 definition, with the keys as
    # stored ([B, G, S, E]) or re-laid [B, G, E, S] (``SlotsLast``, the sampler's CPU decode);
    # masked slots holding huge finite garbage change nothing (their probabilities are exactly 0)
    from opd_jax.model import cache_attention

    monkeypatch.setattr(cache_attention, "ONE_QUERY_MULTIPLY_REDUCE", multiply_reduce)
    rng = np.random.default_rng(1)
    B, S, H, G, E = 3, 9, 6, 2, 8
    q = rng.standard_normal((B, 1, H, E))
    k = rng.standard_normal((B, G, S, E))
    v = rng.standard_normal((B, G, S, E))
    mask = rng.random((B, 1, S)) < 0.6
    mask[..., 0] = True
    kh, vh = (np.repeat(x, H // G, axis=1) for x in (k, v))          # [B, H, S, E]
    s = np.einsum("bthe,bhse->bhts", q, kh) / np.sqrt(E)
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bhse->bthe", p, vh)
    def f(q, k, v, m):   # a fresh trace per flag
        k = cache_attention.slots_last(k) if keys_last else k
        return cache_attention.attention_over_cache(q, k, v, m)
    f = jax.jit(f)
    got = np.asarray(f(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    garbage = np.where(mask[:, :, :, None], 0.0, 1e6)               # [B, 1, S, 1] over G
    k2, v2 = k + garbage, v - garbage
    got2 = np.asarray(f(*(jnp.asarray(x, jnp.float32) for x in (q, k2, v2)), jnp.asarray(mask)))
    np.testing.assert_allclose(got2, got, rtol=1e-6, atol=1e-6)
    text = f.lower(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask)).as_text()
    assert ("dot_general" not in text) == multiply_reduce


def test_cache_layout_is_heads_before_slots():
    config = FAMILIES["llama"]
    cache = dec.init_cache(config, batch=2, size=11)
    assert cache.k.shape == (config.n_layers, 2, config.n_kv_heads, 11, config.head_dim)
    assert cache.size == 11
