"""Sampler tests: strategy distributions (chi-square), log-probs vs float64 numpy, EOS / masks,
early exit, no recompilation within a bucket, batch invariance, validation, 8 fake devices."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.sampling import strategies as S
from opd_jax.sampling.generation import generate
from opd_jax.sampling.loop import TRACE_COUNTS
from opd_jax.sampling.sampler import Sampler, bucket_batch, bucket_length, row_keys
from opd_jax.sampling.strategies import Greedy, MinP, Sampling, Temperature, TopK, TopP

CFG = ModelConfig(max_position=64)


def peaky_params(config: ModelConfig, seed: int = 0, scale: float = 10.0):
    """Random params with a larger (un)embedding so next-token distributions are peaked (no
    near-ties that float summation order could flip)."""
    p = decoder.init_params(config, jax.random.PRNGKey(seed))
    p["embed"] = p["embed"] * scale
    if "unembed" in p:
        p["unembed"] = p["unembed"] * scale
    return p


PARAMS = peaky_params(CFG)
MODEL = types.SimpleNamespace(config=CFG, params=PARAMS)


@functools.partial(jax.jit, static_argnums=1)
def _full_logits(params, config, tokens, lora=None):
    hidden, _ = decoder.forward(params, config, tokens, lora=lora)
    return decoder.logits(params, config, hidden)


def full_logits_np(params, config, seq, lora=None):
    """Float64 logits after every prefix of ``seq`` (one forward, no cache, no padding)."""
    return np.asarray(_full_logits(params, config, jnp.asarray([seq], jnp.int32), lora)[0],
                      np.float64)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# strategies on fixed logits
# ----------------------------------------------------------------------------------------------


def expected_probs(logits, s: Sampling):
    """Float64 reference of the truncated, renormalised distribution (HF semantics)."""
    z = np.asarray(logits, np.float64) / s.temperature
    keep = np.isfinite(z)
    if s.top_k is not None:
        kth = np.sort(z[keep])[::-1][s.top_k - 1]
        keep &= z >= kth
    zz = np.where(keep, z, -np.inf)
    p = np.exp(zz - zz.max())
    p /= p.sum()
    if s.top_p is not None:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kp = np.zeros_like(keep)
        kp[order] = before < s.top_p
        keep &= kp
    if s.min_p is not None:
        keep &= p >= s.min_p * p.max()
    p = np.where(keep, p, 0.0)
    return p / p.sum()


LOGITS8 = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
# Mass on a few ids spread over several inverse-CDF blocks (V=1000 -> block size 32).
LOGITS_SPREAD = np.full(1000, -np.inf, np.float32)
LOGITS_SPREAD[[3, 31, 32, 250, 517, 998, 999]] = [0.5, 1.0, 0.2, 1.3, -0.4, 0.8, 0.1]

STRATEGIES = [
    Temperature(1.0), Temperature(0.6), Temperature(2.0), TopK(3), TopK(4, 0.7), TopP(0.8),
    TopP(0.8, 1.5), Sampling(temperature=1.0, top_p=0.8, top_p_cap=2),  # forces the bisection
    MinP(0.2), MinP(0.3, 1.5), Sampling(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    Sampling(temperature=1.0, top_p=0.95, min_p=0.1, top_p_cap=3),
]


@pytest.mark.parametrize("logits", [LOGITS8, LOGITS_SPREAD], ids=["V8", "V1000"])
@pytest.mark.parametrize("s", STRATEGIES, ids=repr)
def test_draw_distribution_chi_square(logits, s):
    """Empirical frequencies of 40k draws vs the float64 reference; returned log-probs vs the
    reference; the extreme uniforms 0 and 1 - ulp still land inside the kept support."""
    from scipy import stats

    n = 40_000
    u = S.uniforms(jax.random.split(jax.random.key(123), n))
    u = jnp.concatenate([u, jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))])])
    logits_BxV = jnp.broadcast_to(jnp.asarray(logits), (n + 2, logits.shape[0]))
    d = jax.jit(S.draw, static_argnums=2)(logits_BxV, u, s)
    all_tokens = np.asarray(d.token)
    tokens, edges = all_tokens[:n], all_tokens[n:]
    expect = expected_probs(logits, s)
    assert (expect[edges] > 0).all(), edges
    counts = np.bincount(tokens, minlength=logits.shape[0])
    assert counts[expect == 0].sum() == 0, "drew a truncated token"
    support = expect > 0
    chi = stats.chisquare(counts[support], n * expect[support])
    assert chi.pvalue > 1e-3, (chi, counts[support], n * expect[support])
    # log-probs: drawn-from distribution and the temperature-1 untruncated one
    np.testing.assert_allclose(np.asarray(d.logprob), np.log(expect[all_tokens]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(d.logprob_full), log_softmax64(logits)[all_tokens],
                               atol=2e-5)


def test_greedy_draw_and_logprob():
    x = np.random.default_rng(0).normal(size=(5, 300)).astype(np.float32)
    d = S.draw(jnp.asarray(x), jnp.zeros(5), Greedy())
    np.testing.assert_array_equal(np.asarray(d.token), x.argmax(-1))
    ref = log_softmax64(x)[np.arange(5), x.argmax(-1)]
    np.testing.assert_allclose(np.asarray(d.logprob_full), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(d.logprob), np.asarray(d.logprob_full))


def test_top_logprobs():
    x = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    ids, lps = S.top_logprobs(jnp.asarray(x), 4)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-x, -1)[:, :4])
    np.testing.assert_allclose(np.asarray(lps), np.take_along_axis(log_softmax64(x),
                                                                   np.asarray(ids), -1), atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"),
    (dict(min_p=2.0), "min_p"), (dict(temperature=float("nan")), "temperature"),
])
def test_sampling_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kw)


def test_sampling_is_hashable_and_normalised():
    assert Sampling(top_p=1.0) == Sampling() and hash(TopK(3)) == hash(TopK(3))
    assert Sampling(min_p=0.0).min_p is None and Greedy().greedy


# ----------------------------------------------------------------------------------------------
# end to end on a tiny model
# ----------------------------------------------------------------------------------------------

PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6], [42], [7, 7, 7, 7, 7]]


def test_greedy_logprobs_topk_match_full_forward():
    out = generate(MODEL, PROMPTS, max_new_tokens=6, eos_ids=[], return_topk=5)
    assert out.completion.shape == (4, 6) and out.mask.all()
    for r, prompt in enumerate(PROMPTS):
        seq = prompt + out.tokens[r]
        lp = log_softmax64(full_logits_np(PARAMS, CFG, seq))[len(prompt) - 1:-1]
        toks = np.asarray(out.tokens[r])
        np.testing.assert_array_equal(toks, lp.argmax(-1))
        np.testing.assert_allclose(out.logprobs_full[r], lp[np.arange(6), toks], atol=2e-4)
        np.testing.assert_array_equal(out.logprobs[r], out.logprobs_full[r])
        np.testing.assert_array_equal(out.topk_ids[r], np.argsort(-lp, -1)[:, :5])
        np.testing.assert_allclose(out.topk_logprobs[r],
                                   np.take_along_axis(lp, out.topk_ids[r], -1), atol=2e-4)


def test_sampled_logprobs_match_truncated_reference():
    s = Sampling(temperature=0.8, top_k=20, top_p=0.9)
    out = generate(MODEL, PROMPTS, max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9,
                   eos_ids=[], seed=3)
    for r, prompt in enumerate(PROMPTS):
        seq = prompt + out.tokens[r]
        logits = full_logits_np(PARAMS, CFG, seq)[len(prompt) - 1:-1]
        for i, t in enumerate(out.tokens[r]):
            p = expected_probs(logits[i], s)
            assert p[t] > 0
            np.testing.assert_allclose(out.logprobs[r, i], np.log(p[t]), atol=2e-4)
            np.testing.assert_allclose(out.logprobs_full[r, i], log_softmax64(logits[i])[t],
                                       atol=2e-4)


def test_eos_mask_and_early_exit():
    base = generate(MODEL, PROMPTS, max_new_tokens=6, eos_ids=[])
    # EOS = prompt 0's 3rd greedy token: row 0 stops there (EOS kept), the others continue.
    eos = base.tokens[0][2]
    out = generate(MODEL, PROMPTS, max_new_tokens=6, eos_ids=[eos])
    for r in range(len(PROMPTS)):
        full = base.tokens[r]
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert out.tokens[r] == full[:cut]
        assert out.mask[r].tolist() == [True] * cut + [False] * (6 - cut)
        assert (out.completion[r, cut:] == 0).all() and (out.logprobs[r, cut:] == 0).all()
        assert out.lengths[r] == cut
    # every row hits an EOS on its first token -> the loop exits after one step
    firsts = sorted({t[0] for t in base.tokens})
    out = generate(MODEL, PROMPTS, max_new_tokens=6, eos_ids=firsts)
    assert all(len(t) == 1 for t in out.tokens) and int(out.raw.num_steps) == 1
    assert out.mask[:, 0].all() and not out.mask[:, 1:].any()


def test_no_recompile_within_buckets():
    sampler = Sampler(CFG, TopK(8, 0.9), 4, eos_ids=[1])
    shapes = [(3, 5), (4, 9), (3, 16), (4, 3)]  # batch bucket 4, prompt bucket 16
    before = dict(TRACE_COUNTS)
    rng = np.random.default_rng(0)
    for i, (b, p) in enumerate(shapes):
        tokens = rng.integers(0, CFG.vocab_size, (b, p))
        valid = np.ones((b, p), bool)
        valid[0, :p // 2] = False  # some left padding
        sampler(PARAMS, tokens, valid, jax.random.key(i))
    sampler(jax.tree.map(lambda x: x * 1.01, PARAMS), tokens, valid, jax.random.key(9))
    traced = {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode")}
    assert traced == {"prefill": 1, "decode": 1}, traced
    # a new bucket does compile (the counter is live)
    sampler(PARAMS, np.ones((5, 3), np.int32), np.ones((5, 3), bool), jax.random.key(0))
    assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 2


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 128, 129, 300)] == [16, 16, 32, 112, 128,
                                                                          144, 320]
    # tight (padding < max(16, n / 8)) and bounded (8 buckets per doubling)
    for n in range(1, 5000):
        b = bucket_length(n)
        assert n <= b < n + max(16, n / 8)
    assert len({bucket_length(n) for n in range(129, 257)}) == 8
    assert len({bucket_length(n) for n in range(1025, 2049)}) == 8
    assert [bucket_batch(n) for n in (1, 3, 8, 9, 17)] == [1, 4, 8, 16, 24]
    assert bucket_batch(3, multiple_of=8) == 8 and bucket_batch(12, multiple_of=8) == 16


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_invariance(temperature):
    """Prompt 0 alone, and as prompt 0 of a batch with longer and shorter prompts (so it gets
    more left padding and a different batch bucket), gives the same completion and log-probs."""
    kw = dict(max_new_tokens=6, temperature=temperature, top_k=50 if temperature else None,
              eos_ids=[], seed=11, n_samples=2)
    alone = generate(MODEL, [PROMPTS[0]], **kw)
    batch = generate(MODEL, [PROMPTS[0]] + [list(range(1, 21)), [8], [9, 9]], **kw)
    assert batch.tokens[:2] == alone.tokens
    np.testing.assert_allclose(batch.logprobs[:2], alone.logprobs, atol=1e-5)
    np.testing.assert_allclose(batch.logprobs_full[:2], alone.logprobs_full, atol=1e-5)
    if temperature:
        assert alone.tokens[0] != alone.tokens[1], "samples of one prompt should differ"


def test_row_keys_depend_on_prompt_and_sample_index():
    k = jax.random.key_data(row_keys(0, [0, 0, 1], [0, 1, 0]))
    assert len({tuple(np.asarray(x).tolist()) for x in k}) == 3
    again = jax.random.key_data(row_keys(0, [1], [0]))
    np.testing.assert_array_equal(np.asarray(k[2]), np.asarray(again[0]))


def test_generate_output_layout_and_sequences():
    out = generate(MODEL, PROMPTS[:2], max_new_tokens=6, temperature=1.0, top_k=50, n_samples=3,
                   eos_ids=[])
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert out.sample_index.tolist() == [0, 1, 2] * 2
    assert out.prompt_tokens[4] == PROMPTS[1]
    tokens, valid = out.raw.sequences()
    assert tokens.shape == (6, len(PROMPTS[1]) + 6)
    np.testing.assert_array_equal(np.asarray(tokens[:, -6:]), out.completion)
    assert np.asarray(valid).sum(1).tolist() == [len(p) + 6 for p in out.prompt_tokens]


@pytest.mark.parametrize("prompts, kw, match", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([1, 2, 3], {}, "list of token-id lists"),
    ([[1, 2], [300]], {}, "prompt 1 has ids"),
    ([[1], list(range(1, 61))], {}, r"prompt 1 has 60 tokens and max_new_tokens=8: 68 .*"
                                    r"max_position=64.*at most 56 tokens.*at most 4"),
    ([[1]], dict(top_p=1.5), "top_p"),
    ([[1]], dict(temperature=1.0, top_k=0), "top_k"),
    ([[1]], dict(temperature=1.0, top_k=1000), "exceeds the vocabulary"),
    ([[1]], dict(n_samples=0), "n_samples"),
    ([[1]], dict(return_topk=0), "return_topk"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens"),
])
def test_generate_validation(prompts, kw, match):
    kw = {"max_new_tokens": 8, **kw}
    with pytest.raises(ValueError, match=match):
        generate(MODEL, prompts, **kw)


def test_sampler_rejects_right_padding():
    sampler = Sampler(CFG, Greedy(), 2)
    with pytest.raises(ValueError, match="left-padded"):
        sampler(PARAMS, np.ones((1, 4), np.int32), np.array([[1, 1, 0, 0]], bool),
                jax.random.key(0))


def test_default_eos_from_tokenizer():
    base = generate(MODEL, [PROMPTS[1]], max_new_tokens=6, eos_ids=[])
    tok = types.SimpleNamespace(eos_ids=(base.tokens[0][1],), decode=lambda ids: f"<{len(ids)}>")
    m = types.SimpleNamespace(config=CFG, params=PARAMS, tokenizer=tok)
    out = generate(m, [PROMPTS[1]], max_new_tokens=6)
    assert out.tokens[0] == base.tokens[0][:2] and out.texts == ["<2>"]


EIGHT_DEVICES = textwrap.dedent("""
    import os, json, types
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    sys_path = {path!r}
    import sys; sys.path.insert(0, sys_path)
    from tests.test_sampler import CFG, PARAMS, PROMPTS
    from opd_jax.sampling.generation import generate
    from opd_jax.sharding import make_mesh
    assert len(jax.devices()) == 8
    m = types.SimpleNamespace(config=CFG, params=PARAMS)
    res = {{}}
    for name, mesh in [("one", None), ("data2fsdp4", make_mesh((2, 4, 1)))]:
        g = generate(m, PROMPTS, max_new_tokens=6, eos_ids=[], mesh=mesh)
        s = generate(m, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.9, eos_ids=[],
                     n_samples=2, seed=5, mesh=mesh)
        res[name] = [g.tokens, s.tokens, s.logprobs.tolist()]
    print("RESULT" + json.dumps(res))
""")


def test_eight_fake_devices_match_one_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = EIGHT_DEVICES.format(path=root)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("data2fsdp4",):
        assert res[name][0] == res["one"][0], name
        assert res[name][1] == res["one"][1], name
        np.testing.assert_allclose(res[name][2], res["one"][2], atol=1e-4)


def test_unrolled_and_scan_layer_loops_agree_with_lora():
    from opd_jax.model.lora import init_lora

    lora = init_lora(CFG, jax.random.PRNGKey(2), rank=2, alpha=4.0)
    lora = lora.replace(weights=jax.tree.map(lambda x: x + 0.2, lora.weights))
    tokens, valid = np.array([[0, 0, 5, 9, 17], [3, 1, 4, 1, 5]]), np.array([[0, 0, 1, 1, 1]] * 1
                                                                             + [[1] * 5], bool)
    outs = [Sampler(CFG, TopK(20, 0.9), 6, layer_loop=mode)(PARAMS, tokens, valid,
                                                           jax.random.key(4), lora=lora)
            for mode in ("unroll", "scan")]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs_full), np.asarray(outs[1].logprobs_full),
                               atol=1e-5)
    # the adapters are applied: log-probs equal a full (uncached) forward with the same LoRA
    seq = tokens[1].tolist() + np.asarray(outs[0].tokens[1]).tolist()
    lp = log_softmax64(full_logits_np(PARAMS, CFG, seq, lora))[4:-1]
    np.testing.assert_allclose(np.asarray(outs[0].logprobs_full[1]),
                               lp[np.arange(6), seq[5:]], atol=2e-4)
    no_lora = log_softmax64(full_logits_np(PARAMS, CFG, seq))[4:-1]
    assert np.abs(no_lora[np.arange(6), seq[5:]] - lp[np.arange(6), seq[5:]]).max() > 1e-3
    with pytest.raises(ValueError, match="layer_loop"):
        Sampler(CFG, Greedy(), 2, layer_loop="loop")


def test_auto_layer_loop_is_unroll_on_every_backend(monkeypatch):
    # the layer scan ran 4.8x slower per decode step on an H200 (BUILD_NOTES "Accelerator figures")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert Sampler(CFG, Greedy(), 2)._static.layer_loop == "unroll"


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_out_major_decode_weights_give_the_stored_layouts_tokens(dtype, atol, monkeypatch):
    """On one CPU device the decode runs its projections on out-major copies of the layer
    weights (``lean_ops.OutMajor``, made once per call): the same tokens and log-probs (to
    rounding: the dots sum in another order) as the stored ``[in, out]`` layout, also with LoRA
    on every projection."""
    from opd_jax.model.lora import init_lora
    from opd_jax.sampling import loop

    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    lora = init_lora(CFG, jax.random.PRNGKey(2), rank=2, alpha=4.0,
                     targets=tuple(decoder.PROJECTIONS))
    lora = lora.replace(weights=jax.tree.map(lambda x: (x + 0.2).astype(dtype), lora.weights))
    tokens = np.array([[0, 0, 5, 9, 17], [3, 1, 4, 1, 5]])
    valid = np.array([[0, 0, 1, 1, 1], [1] * 5], bool)
    st = Sampler(CFG, TopK(20, 0.9), 6)._static
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    assert loop.out_major_decode(st, bf16)
    assert not loop.out_major_decode(st, PARAMS)   # float32, few new tokens: the copy costs more
    assert loop.out_major_decode(Sampler(CFG, Greedy(), 128)._static, PARAMS)
    assert not loop.out_major_decode(
        st.__class__(**{**st.__dict__, "mesh": types.SimpleNamespace(devices=np.empty((2, 1)))}),
        bf16)
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(loop, "out_major_decode", lambda st, params, on=on: on)
        loop.decode.clear_cache()   # the flag is read while tracing: compile each form anew
        for with_lora in (None, lora):
            outs[on, with_lora is None] = Sampler(CFG, TopK(20, 0.9), 6)(
                params, tokens, valid, jax.random.key(4), lora=with_lora)
    for plain in (True, False):
        a, b = outs[True, plain], outs[False, plain]
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_allclose(np.asarray(a.logprobs_full, np.float32),
                                   np.asarray(b.logprobs_full, np.float32), atol=atol)
    assert not np.array_equal(np.asarray(outs[True, True].logprobs_full),
                              np.asarray(outs[True, False].logprobs_full))   # LoRA applied


def test_decode_program_multiplies_out_major_weights():
    """The compiled decode's layer dots contract both operands' last axes (``[M, K] x [N, K]^T``):
    the out-major copies reach the loop (XLA does not fold the copy back into the dot)."""
    from opd_jax.sampling import loop

    sampler = Sampler(CFG, Greedy(), 128)
    tokens, valid = jnp.array([[1, 2, 3, 4]] * 2), jnp.ones((2, 4), bool)
    st = sampler._static
    state = loop.prefill(st, PARAMS, None, tokens, valid, jax.random.split(jax.random.key(0), 2),
                         jnp.ones(2, bool), sampler._eos_array())
    text = loop.decode.lower(st, tokens.shape[1], state, PARAMS, None).compile().as_text()
    dims = re.findall(r"dot\(.*?lhs_contracting_dims=\{(\d)\}, rhs_contracting_dims=\{(\d)\}", text)
    n_proj = CFG.n_layers * len(decoder.PROJECTIONS)
    assert dims.count(("1", "1")) >= n_proj, (len(dims), dims[:10])


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_slots_last_keys_give_the_stored_layouts_tokens(dtype, atol, monkeypatch):
    """The CPU decode re-lays each layer's cached keys as float32 ``[B, G, E, S]`` chunks
    (``cache_attention.SlotsLast``, once per call): the same tokens and log-probs (to rounding:
    the scores sum in another order, and bfloat16 keys are read exactly as float32) as the
    stored layout, and the decode's output state holds float32 keys with the slots last.
    (``tests/test_decode_windows.py``: the same over several decode phases' chunks.)"""
    from opd_jax.model import cache_attention
    from opd_jax.sampling import loop

    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    tokens = np.array([[0, 0, 5, 9, 17], [3, 1, 4, 1, 5]])
    valid = np.array([[0, 0, 1, 1, 1], [1] * 5], bool)
    sampler = Sampler(CFG, Greedy(), 40)
    assert loop.slots_last_decode(sampler._static)
    assert not loop.slots_last_decode(Sampler(CFG, Greedy(), 40, layer_loop="scan")._static)
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(loop, "slots_last_decode", lambda st, on=on: on)
        loop.decode.clear_cache()   # the flag is read while tracing: compile each form anew
        outs[on] = Sampler(CFG, TopK(20, 0.9), 40)(params, tokens, valid, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(outs[True].tokens), np.asarray(outs[False].tokens))
    np.testing.assert_allclose(np.asarray(outs[True].logprobs_full, np.float32),
                               np.asarray(outs[False].logprobs_full, np.float32), atol=atol)
    monkeypatch.setattr(loop, "slots_last_decode", lambda st: True)
    loop.decode.clear_cache()
    st = sampler._static
    args = (jnp.asarray(tokens), jnp.asarray(valid))
    state = loop.prefill(st, params, None, *args, jax.random.split(jax.random.key(0), 2),
                         jnp.ones(2, bool), sampler._eos_array())
    out = loop.decode(st, tokens.shape[1], state, params, None)
    keys = out.cache.k[0]
    assert isinstance(keys, cache_attention.SlotsLast)
    G, E = CFG.n_kv_heads, CFG.head_dim
    assert [c.shape[:3] for c in keys.chunks] == [(2, G, E)] * len(keys.chunks)
    assert all(c.dtype == jnp.float32 for c in keys.chunks)
    assert sum(c.shape[3] for c in keys.chunks) == out.cache.valid.shape[1]


def test_decode_layouts_benchmark_small_run(tmp_path):
    """``benchmarks/decode_layouts.py --small`` compiles every form, reports each against the
    first, draws the same float32 greedy tokens in all of them, and leaves the loop's rules as
    they were."""
    import sys
    from pathlib import Path

    from opd_jax.sampling import loop

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import decode_layouts as bench

    rules = loop.slots_last_decode, loop.out_major_decode
    out = bench.main(["--small", "--dtype", "float32", "--repeats", "1",
                      "--forms", "stored,slots_last,out_major,both",
                      "--out", str(tmp_path / "d.json")])
    assert [r["form"] for r in out["rows"]] == ["stored", "slots_last", "out_major", "both"]
    assert all(r["same_tokens"] == 1.0 and r["min_s"] > 0 for r in out["rows"])
    assert out["rows"][0]["speedup"] == 1.0 and (tmp_path / "d.json").exists()
    assert (loop.slots_last_decode, loop.out_major_decode) == rules
    with pytest.raises(SystemExit):
        bench.main(["--small", "--forms", "stored,sideways"])
