"""Platform attention (``jax.nn.dot_product_attention``) vs the dense reference: values and
gradients for causal rows, left padding, packed segments and grouped-query heads; the decoder's
forward, a packed train step, the sampler (unchanged), the implementation choice and the config.

On CPU the platform modes run XLA; the cuDNN path needs a CUDA GPU (``benchmarks/device.py``
runs it there). Its choice logic is pure and tested here with the device facts given.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.config.loss import LossSpec
from opd_jax.config.schema import ATTENTION
from opd_jax.model import decoder as dec
from opd_jax.model import layers
from opd_jax.model.config import ATTENTION_IMPLS, ModelConfig
from opd_jax.model.platform_attention import (
    attention_platform,
    choose_implementation,
    cudnn_blockers,
    platform_mask,
)

RTOL, ATOL = 1e-5, 1e-5


def _qkvw(seed, B, T, H, G, E):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, T, H, E)), jax.random.normal(kk, (B, T, G, E)),
            jax.random.normal(kv, (B, T, G, E)), jax.random.normal(kw, (B, T, H, E)))


def _dense_mask(valid_BxT, segments_BxT):
    T = valid_BxT.shape[1]
    m = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
    if segments_BxT is not None:
        m = m & (segments_BxT[:, :, None] == segments_BxT[:, None, :])
    return m


def _packed_segments(B, T, lengths):
    """Segment ids 1, 2, ... per row (``lengths`` per row), 0 in the padding tail."""
    seg = np.zeros((B, T), np.int32)
    for b, lens in enumerate(lengths):
        seg[b, :sum(lens)] = np.repeat(np.arange(1, len(lens) + 1), lens)
    return jnp.asarray(seg)


def _values_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o * w), o
    (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, g


CASES = {   # (T, H, G, left pads per row or None, packed lengths per row or None)
    "causal_mha": (16, 4, 4, None, None),
    "causal_gqa": (19, 8, 2, None, None),
    "causal_mqa": (12, 6, 1, None, None),
    "left_padding_gqa": (21, 4, 2, [0, 5, 18], None),
    "packed_segments_gqa": (24, 4, 2, None, [[7, 5, 9], [24], [3, 3]]),
}


@pytest.mark.parametrize("mode", ["platform", "platform_xla"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_equal_dense(case, mode):
    T, H, G, pads, packed = CASES[case]
    B, E = 3, 8
    q, k, v, w = _qkvw(T + H + G, B, T, H, G, E)
    valid = jnp.ones((B, T), bool)
    segments = None
    if pads is not None:
        valid = jnp.asarray(np.arange(T)[None, :] >= np.asarray(pads)[:, None])
    if packed is not None:
        segments = _packed_segments(B, T, packed)
        valid = segments > 0
    all_real = pads is None and packed is None
    pmask = platform_mask(mode, None if all_real else valid, segments)
    dmask = _dense_mask(valid, segments)
    od, gd = _values_and_grads(lambda q, k, v: layers.attention(q, k, v, dmask), q, k, v, w)
    op, gp = _values_and_grads(lambda q, k, v: attention_platform(q, k, v, pmask), q, k, v, w)
    assert op.shape == od.shape and op.dtype == od.dtype
    # on XLA even fully masked queries (padding) match: both give the mean of all values there
    np.testing.assert_allclose(np.asarray(op), np.asarray(od), RTOL, ATOL)
    for name, a, b in zip("qkv", gp, gd):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL * scale,
                                   err_msg=f"d{name}")


def test_segments_never_attend_across():
    # changing one segment's keys and values leaves every other segment's outputs unchanged
    B, T, H, G, E = 1, 20, 4, 2, 8
    q, k, v, _ = _qkvw(3, B, T, H, G, E)
    seg = _packed_segments(B, T, [[6, 8, 6]])
    pmask = platform_mask("platform", seg > 0, seg)
    out = attention_platform(q, k, v, pmask)
    k2, v2 = k.at[:, 6:14].multiply(-3.0), v.at[:, 6:14].add(5.0)
    out2 = attention_platform(q, k2, v2, pmask)
    np.testing.assert_array_equal(np.asarray(out2[:, :6]), np.asarray(out[:, :6]))
    np.testing.assert_array_equal(np.asarray(out2[:, 14:]), np.asarray(out[:, 14:]))
    assert not np.allclose(np.asarray(out2[:, 6:14]), np.asarray(out[:, 6:14]))


# --- which implementation runs ----------------------------------------------------------------

GPU = dict(platform="gpu", compute_capability="9.0")


def test_cudnn_chosen_on_a_cuda_gpu_with_bfloat16():
    kw = dict(dtype=jnp.bfloat16, length=2048, head_dim=128, masked=True)
    assert choose_implementation(None, **kw, **GPU)[0] == "cudnn"
    assert choose_implementation("cudnn", **kw, **GPU)[0] == "cudnn"
    assert choose_implementation("xla", **kw, **GPU)[0] == "xla"
    # Hopper takes head dim 256, Ampere 128 at most
    assert not cudnn_blockers(dtype=jnp.float16, length=8, head_dim=256, masked=False, **GPU)
    assert cudnn_blockers(dtype=jnp.float16, length=8, head_dim=256, masked=False,
                          platform="gpu", compute_capability="8.0")


@pytest.mark.parametrize("kw,reason", [
    (dict(dtype=jnp.float32, length=64, head_dim=64, masked=False, **GPU), "bfloat16 or float16"),
    (dict(dtype=jnp.bfloat16, length=64, head_dim=60, masked=False, **GPU), "multiple of 8"),
    (dict(dtype=jnp.bfloat16, length=63, head_dim=64, masked=True, **GPU), "even length"),
    (dict(dtype=jnp.bfloat16, length=64, head_dim=64, masked=False, platform="cpu",
          compute_capability=None), "CUDA GPUs only"),
])   # a TPU picks splash or XLA (tests/test_attention_splash.py)
def test_fallback_to_xla_with_a_reason_and_forced_cudnn_refuses(kw, reason):
    impl, why = choose_implementation(None, **kw)
    assert impl == "xla" and reason in why
    with pytest.raises(ValueError, match=f"platform_cudnn.*{reason}"):
        choose_implementation("cudnn", **kw)


def test_unmasked_odd_length_is_fine_for_cudnn():
    assert not cudnn_blockers(dtype=jnp.bfloat16, length=63, head_dim=64, masked=False, **GPU)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off a GPU")
def test_forced_cudnn_off_a_gpu_fails_at_trace_time():
    q, k, v, _ = _qkvw(0, 1, 8, 2, 1, 8)
    with pytest.raises(ValueError, match="platform_cudnn"):
        attention_platform(q, k, v, platform_mask("platform_cudnn", None, None))
    with pytest.raises(ValueError, match="unknown platform attention"):
        platform_mask("flash", None, None)


# --- the decoder, the train step, the sampler ---------------------------------------------------

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_dim=64, qk_norm=True)


def _tree_close(ga, gb, rtol=1e-4, atol=1e-5):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_decoder_forward_and_param_grads_equal_dense(remat):
    params = dec.init_params(CFG, jax.random.key(0))
    T = 23
    tokens = jax.random.randint(jax.random.key(1), (3, T), 0, CFG.vocab_size)
    valid = jnp.asarray(np.arange(T)[None, :] >= np.array([0, 6, 20])[:, None])
    w = jax.random.normal(jax.random.key(2), (3, T, CFG.d_model))

    def loss(params, attention):
        h, _ = dec.forward(params, CFG, tokens, valid_BxT=valid, remat=remat, attention=attention)
        return jnp.sum(jnp.where(valid[..., None], h * w, 0.0)), h

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ld, hd), gd = vg(params, "dense")
    (lp, hp), gp = vg(params, "platform")
    np.testing.assert_allclose(np.asarray(hp), np.asarray(hd), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(lp), float(ld), rtol=RTOL)
    _tree_close(gp, gd)
    # the config selects it too (same program as the argument)
    h_cfg, _ = jax.jit(lambda p: dec.forward(p, CFG.replace(attention="platform"), tokens,
                                             valid_BxT=valid))(params)
    np.testing.assert_array_equal(np.asarray(h_cfg), np.asarray(hp))


def test_packed_train_step_equals_dense():
    from opd_jax.train.batch import RolloutBatch
    from opd_jax.train.objectives import make_chunk_fn
    from opd_jax.train.rollout import pack_batch
    from opd_jax.train.state import StudentSpec
    from opd_jax.train.step import TeacherSpec, loss_and_metrics

    rng = np.random.default_rng(0)
    B, P, N = 6, 10, 8
    toks = rng.integers(1, CFG.vocab_size, (B, P + N)).astype(np.int32)
    valid = np.zeros((B, P + N), bool)
    for b, (p, c) in enumerate(zip(rng.integers(2, P + 1, B), rng.integers(1, N + 1, B))):
        valid[b, P - p:P + c] = True
    batch = RolloutBatch(*map(jnp.asarray, (toks, valid, toks, valid, toks[:, P:], valid[:, P:])),
                         jnp.asarray(rng.normal(-3, 1, (B, N)), jnp.float32))
    teacher_cfg = CFG.replace(d_model=48, n_layers=3)
    ps, pt = dec.init_params(CFG, jax.random.key(0)), dec.init_params(teacher_cfg,
                                                                       jax.random.key(1))
    out = {}
    for attention in ("dense", "platform"):
        cs, ct = CFG.replace(attention=attention), teacher_cfg.replace(attention=attention)
        packed = pack_batch(batch, groups=1, student_config=cs, teacher_config=ct, max_length=64)
        assert packed.student_packed.segments.max() > 1       # several sequences share a row
        fn = jax.jit(jax.value_and_grad(functools.partial(
            loss_and_metrics, student=StudentSpec(cs), teacher=TeacherSpec("separate", ct),
            chunk_fn=make_chunk_fn(LossSpec(objective="topk_reward", top_k=4)),
            reduction=losses.token_mean, chunk_size=8), has_aux=True))
        (loss, _), g = fn(ps, None, pt, packed)
        out[attention] = (float(loss), g)
    np.testing.assert_allclose(out["platform"][0], out["dense"][0], rtol=RTOL)
    _tree_close(out["platform"][1], out["dense"][1])


def test_sampler_unchanged_by_platform_mode():
    from opd_jax.data.padding import pad_left
    from opd_jax.sampling.sampler import Sampler
    from opd_jax.sampling.strategies import Sampling

    params = dec.init_params(CFG, jax.random.key(0))
    tok, val = pad_left([[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]])
    outs = [Sampler(cfg, Sampling(temperature=1.0), 6)(params, tok, val, jax.random.key(0))
            for cfg in (CFG, CFG.replace(attention="platform"))]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_array_equal(np.asarray(outs[0].logprobs_full),
                                  np.asarray(outs[1].logprobs_full))


def test_config_accepts_the_platform_modes():
    from opd_jax.config import load_config
    from opd_jax.config.schema import ModelSpec

    assert ATTENTION == ATTENTION_IMPLS
    for mode in ("platform", "platform_xla", "platform_cudnn"):
        assert CFG.replace(attention=mode).attention == mode
        ModelSpec(attention=mode).validate()
    cfg = load_config("configs/tiny_test.yaml", ["student.attention=platform",
                                                 "teacher.attention=platform_xla"])
    assert (cfg.student.attention, cfg.teacher.attention) == ("platform", "platform_xla")
    with pytest.raises(ValueError, match="unknown attention"):
        CFG.replace(attention="cudnn")
