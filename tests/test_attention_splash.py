"""TPU splash attention (``attention: platform_splash``; Pallas interpret mode on CPU) vs the
dense reference: values and q / k / v gradients at every real query for causal rows, left
padding, packed segments and grouped-query heads; the decoder's forward; when the platform mode
picks it (TPU, rows of 128 tokens or more; any length is padded to whole blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import decoder as dec
from opd_jax.model import layers
from opd_jax.model.config import ModelConfig
from opd_jax.model.platform_attention import (
    attention_platform,
    choose_implementation,
    platform_mask,
)
from opd_jax.model.splash_attention import splash_blockers
from tests.test_attention_platform import _dense_mask

CASES = {   # (T, H, G, left pads per row or None, packed lengths per row or None)
    "causal_gqa_two_blocks": (256, 4, 2, None, None),
    "causal_mqa": (128, 2, 1, None, None),
    "left_padding_mha_padded_to_a_block": (100, 2, 2, [0, 77], None),
    "packed_segments_gqa": (128, 4, 2, None, [[40, 30, 50], [128]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_equal_dense_at_real_queries(case):
    T, H, G, pads, packed = CASES[case]
    B, E = 2, 16
    kq, kk, kv, kw = jax.random.split(jax.random.key(T + H + G), 4)
    q = jax.random.normal(kq, (B, T, H, E))
    k, v = (jax.random.normal(key, (B, T, G, E)) for key in (kk, kv))
    valid = jnp.ones((B, T), bool)
    segments = None
    if pads is not None:
        valid = jnp.asarray(np.arange(T)[None, :] >= np.asarray(pads)[:, None])
    if packed is not None:
        seg = np.zeros((B, T), np.int32)
        for b, lens in enumerate(packed):
            seg[b, :sum(lens)] = np.repeat(np.arange(1, len(lens) + 1), lens)
        segments = jnp.asarray(seg)
        valid = segments > 0
    # padding queries carry no weight: their outputs differ by design (module docstring)
    w = jax.random.normal(kw, (B, T, H, E)) * valid[:, :, None, None]
    all_real = pads is None and packed is None
    pmask = platform_mask("platform_splash", None if all_real else valid, segments)
    dmask = _dense_mask(valid, segments)

    def run(fn):
        loss = lambda q, k, v: (jnp.sum(fn(q, k, v) * w), fn(q, k, v))
        (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return o, g

    od, gd = run(lambda q, k, v: layers.attention(q, k, v, dmask))
    os_, gs = run(lambda q, k, v: attention_platform(q, k, v, pmask))
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(os_)[real], np.asarray(od)[real], rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", gs, gd):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f"d{name}")


def test_decoder_forward_equals_dense():
    cfg = ModelConfig(n_layers=2, vocab_size=64, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                      head_dim=8, max_position=256)
    params = dec.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 144), 0, 64)    # 2 blocks after padding
    valid = jnp.ones((2, 144), bool).at[1, :20].set(False)
    out = {a: np.asarray(jax.jit(lambda p, c=cfg.replace(attention=a): dec.forward(
        p, c, tokens, valid)[0])(params)) for a in ("dense", "platform_splash")}
    real = np.asarray(valid)
    np.testing.assert_allclose(out["platform_splash"][real], out["dense"][real], rtol=1e-4,
                               atol=1e-4)


def test_when_splash_is_chosen():
    kw = dict(dtype=jnp.bfloat16, head_dim=128, masked=True, compute_capability=None,
              device_count=1)
    assert choose_implementation(None, length=2048, platform="tpu", **kw) == (
        "splash", "platform default on a TPU")
    assert choose_implementation(None, length=200, platform="tpu", **kw)[0] == "splash"
    impl, why = choose_implementation(None, length=96, platform="tpu", **kw)
    assert impl == "xla" and "fit one block" in why
    assert choose_implementation(None, length=256, platform="cpu", **kw)[0] == "xla"
    assert choose_implementation("splash", length=96, platform="cpu", **kw)[0] == "splash"
    with pytest.raises(ValueError, match="platform_cudnn.*CUDA GPUs only"):
        choose_implementation("cudnn", length=256, platform="tpu", **kw)
    assert splash_blockers(length=256, platform="gpu") == [
        "splash attention is a TPU kernel (platform 'gpu')"]
    assert not splash_blockers(length=8, platform="gpu", forced=True)
    impl, why = choose_implementation(None, length=2048, platform="tpu", **{**kw, "device_count": 8})
    assert impl == "xla" and "shard_map" in why
