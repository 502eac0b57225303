"""``return_hidden``: the sampler records the final hidden state each token was drawn from.

Checked against an uncached ``decoder.forward`` of ``prompt + completion`` (the hidden state at
position ``len(prompt) - 1 + j`` predicts completion token ``j``), on every decode path (the
unrolled and scanned layer loops, several decode phases, continuous batching with shared
prefills, LoRA), with EOS-ragged rows (masked positions exactly 0), and without changing a
single draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.model.lora import init_lora
from opd_jax.sampling.generation import generate
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import Sampling

CFG = ModelConfig(max_position=256)
PARAMS = decoder.init_params(CFG, jax.random.PRNGKey(0))
PARAMS = {**PARAMS, "embed": PARAMS["embed"] * 10.0}
PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6], [42], [7, 7, 7, 7, 7]]


def _reference_hidden(seq, prompt_len, n, lora=None):
    """``[n, D]`` float64 hidden states predicting the ``n`` tokens after the prompt."""
    h, _ = decoder.forward(PARAMS, CFG, jnp.asarray([seq], jnp.int32), lora=lora)
    return np.asarray(h[0], np.float64)[prompt_len - 1:prompt_len - 1 + n]


def _check(out, prompts, n_max, lora=None):
    hidden = np.asarray(out.hidden)
    assert hidden.shape == (len(prompts), n_max, CFG.d_model)
    for r, prompt in enumerate(prompts):
        n = int(out.lengths[r])
        seq = list(prompt) + list(out.tokens[r])
        np.testing.assert_allclose(hidden[r, :n], _reference_hidden(seq, len(prompt), n, lora),
                                   atol=2e-4, rtol=2e-4)
        assert (hidden[r, n:] == 0).all(), "masked positions must hold exactly 0"
        # the recorded state is the one each token was drawn from: its unembedding scores it
        logits = np.asarray(decoder.logits(PARAMS, CFG, jnp.asarray(hidden[r, :n])[None]))[0]
        logits = logits.astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        np.testing.assert_allclose(out.logprobs_full[r, :n],
                                   logits[np.arange(n), out.tokens[r]] - lse, atol=2e-4)


@pytest.mark.parametrize("kw", [dict(), dict(slots=2), dict(cache_windows=3)],
                            ids=["plain", "slots", "phases"])
def test_hidden_matches_an_uncached_forward(kw):
    base = generate((m := _model()), PROMPTS, max_new_tokens=40, eos_ids=[], seed=1,
                    temperature=0.9, **kw)
    eos = base.tokens[1][3]   # ragged rows: EOS at one row's 4th token
    out = generate(m, PROMPTS, max_new_tokens=40, eos_ids=[eos], seed=1, temperature=0.9,
                   return_hidden=True, **kw)
    plain = generate(m, PROMPTS, max_new_tokens=40, eos_ids=[eos], seed=1, temperature=0.9, **kw)
    assert out.tokens == plain.tokens and plain.hidden is None
    np.testing.assert_array_equal(out.logprobs_full, plain.logprobs_full)
    assert len(set(out.lengths.tolist())) > 1
    _check(out, PROMPTS, 40)


def test_hidden_with_lora_and_both_layer_loops():
    lora = init_lora(CFG, jax.random.PRNGKey(2), rank=2, alpha=4.0)
    lora = lora.replace(weights=jax.tree.map(lambda x: x + 0.2, lora.weights))
    tokens = np.array([[0, 0, 5, 9, 17], [3, 1, 4, 1, 5]])
    valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    outs = [Sampler(CFG, Sampling(temperature=0.8), 6, layer_loop=loop, return_hidden=True)(
        PARAMS, tokens, valid, jax.random.key(4), lora=lora) for loop in ("unroll", "scan")]
    np.testing.assert_allclose(np.asarray(outs[0].hidden), np.asarray(outs[1].hidden),
                               atol=1e-5)
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5]]
    out = jax.device_get(outs[0])
    _check(out, prompts, 6, lora)


def test_slots_share_a_prefill_and_keep_the_hidden_states():
    kw = dict(max_new_tokens=12, eos_ids=[], seed=3, temperature=1.0, n_samples=3,
              return_hidden=True)
    one = generate(_model(), PROMPTS, **kw)
    slots = generate(_model(), PROMPTS, slots=4, **kw)
    assert slots.tokens == one.tokens
    np.testing.assert_allclose(slots.hidden, one.hidden, atol=1e-5)


def _model():
    import types
    return types.SimpleNamespace(config=CFG, params=PARAMS)
