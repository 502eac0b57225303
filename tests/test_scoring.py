"""Scoring tests: chunked per-token log-probs / top-k / logsumexp vs float64 numpy, the shift,
padding invariance, and agreement with the sampler's own log-probs."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.data.padding import pad_left
from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.sampling.generation import generate
from opd_jax.teacher.scoring import score

CFG = ModelConfig(max_position=64, tie_embeddings=True)
PARAMS = decoder.init_params(CFG, jax.random.PRNGKey(3))
PARAMS["embed"] = PARAMS["embed"] * 10.0
SEQS = [[5, 9, 17, 33, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5], [42, 7]]


@functools.partial(jax.jit, static_argnums=1)
def _logits(params, config, tokens):
    hidden, _ = decoder.forward(params, config, tokens)
    return decoder.logits(params, config, hidden)


def ref_logprobs(seq, temperature=1.0):
    """Float64 log-softmax of every prefix's logits (unpadded forward)."""
    z = np.asarray(_logits(PARAMS, CFG, jnp.asarray([seq]))[0], np.float64) / temperature
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_matches_float64_reference(temperature):
    tokens, valid = pad_left(SEQS, length=12)
    out = score(PARAMS, CFG, jnp.asarray(tokens), valid_BxT=jnp.asarray(valid), k=4,
                chunk_size=7, temperature=temperature)
    for b, seq in enumerate(SEQS):
        lp = ref_logprobs(seq, temperature)
        n, off = len(seq), 12 - len(seq)
        # position t scores token t + 1: the sequence's own positions 0 .. n-2
        np.testing.assert_allclose(np.asarray(out.logprobs[b, off:off + n - 1]),
                                   lp[np.arange(n - 1), seq[1:]], atol=1e-4)
        assert np.asarray(out.mask[b]).tolist() == [False] * off + [True] * (n - 1) + [False]
        assert (np.asarray(out.logprobs[b])[~np.asarray(out.mask[b])] == 0).all()
        ids = np.asarray(out.topk_ids[b, off:])
        np.testing.assert_array_equal(ids, np.argsort(-lp, -1)[:, :4])
        np.testing.assert_allclose(np.asarray(out.topk_logprobs[b, off:]),
                                   np.take_along_axis(lp, ids, -1), atol=1e-4)
        z = np.asarray(_logits(PARAMS, CFG, jnp.asarray([seq]))[0], np.float64) / temperature
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        np.testing.assert_allclose(np.asarray(out.logsumexp[b, off:]), lse, rtol=1e-5)
        assert (np.asarray(out.topk_ids[b, :off]) == 0).all()


def score_call(tokens, valid, **kw):
    return score(PARAMS, CFG, jnp.asarray(tokens), valid_BxT=jnp.asarray(valid), **kw)


def test_score_without_topk_and_padding_invariance():
    a = score_call(*pad_left(SEQS, length=9), chunk_size=5)
    b = score_call(*pad_left(SEQS, length=16), chunk_size=64)
    assert a.topk_ids is None and a.logsumexp is None
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs)[:, 7:], atol=1e-5)


def test_score_agrees_with_sampler_logprobs():
    """The sampler's KV-cached log-probs equal scoring the finished sequences (no cache)."""
    m = types.SimpleNamespace(config=CFG, params=PARAMS)
    out = generate(m, SEQS, max_new_tokens=5, temperature=1.0, eos_ids=[], seed=1)
    tokens, valid = out.raw.sequences()
    sc = score(PARAMS, CFG, tokens, valid_BxT=valid)
    P = out.raw.prompt_tokens.shape[1]
    np.testing.assert_allclose(np.asarray(sc.logprobs[:, P - 1:-1]), out.logprobs_full, atol=1e-4)


def test_score_validation():
    tokens, valid = pad_left(SEQS)
    with pytest.raises(ValueError, match="k="):
        score_call(tokens, valid, k=CFG.vocab_size + 1)
    with pytest.raises(ValueError, match="temperature"):
        score_call(tokens, valid, temperature=0.0)
    with pytest.raises(ValueError, match="padded length"):
        pad_left(SEQS, length=3)


def test_score_keyword_only_valid():
    with pytest.raises(TypeError):
        score(PARAMS, CFG, jnp.asarray(pad_left(SEQS)[0]), jnp.asarray(pad_left(SEQS)[1]))
