"""Continuous batching (``Sampler(..., slots=B)``): every row's tokens, masks and log-probs equal
the plain sampler's for the same keys -- ragged prompts, several max lengths, EOS on, greedy and
sampled strategies, ``n_samples`` 1 and > 1, more rows than slots, LoRA and both layer loops, a
mesh of 8 fake devices -- and the compiled programs do not grow with the number of rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from opd_jax.model.lora import init_lora
from opd_jax.sampling.generation import generate
from opd_jax.sampling.loop import TRACE_COUNTS
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import Greedy, TopK
from tests.test_sampler import CFG, MODEL, PARAMS

# ragged prompts (1 to 12 tokens): rows get different left padding and different ring windows
PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [42], [7, 7, 7, 7, 7],
           [200, 13], [11, 12, 13, 14, 15, 16, 17]]


def ragged_eos(out, n_ids: int = 3) -> list[int]:
    """EOS ids that end rows of ``out`` (a run without EOS) at different lengths: the tokens
    some rows drew at steps 1, 2, 3 ..."""
    eos = []
    for r, toks in enumerate(out.tokens):
        t = toks[min(1 + r % 3, len(toks) - 1)]
        if t not in eos:
            eos.append(t)
        if len(eos) == n_ids:
            break
    return eos


def assert_same_rows(plain, slotted):
    assert slotted.tokens == plain.tokens
    np.testing.assert_array_equal(slotted.mask, plain.mask)
    np.testing.assert_array_equal(slotted.completion, plain.completion)
    np.testing.assert_array_equal(slotted.lengths, plain.lengths)
    np.testing.assert_allclose(slotted.logprobs, plain.logprobs, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(slotted.logprobs_full, plain.logprobs_full, rtol=1e-5, atol=2e-5)
    assert (slotted.topk_ids is None) == (plain.topk_ids is None)
    if plain.topk_ids is not None:
        np.testing.assert_array_equal(slotted.topk_ids, plain.topk_ids)
        np.testing.assert_allclose(slotted.topk_logprobs, plain.topk_logprobs, rtol=1e-5,
                                   atol=2e-5)
    assert int(slotted.raw.num_steps) == int(plain.raw.num_steps)


CASES = {  # name: (sampling kwargs, max_new_tokens, n_samples, slots, return_topk)
    "greedy": (dict(temperature=0.0), 9, 1, 4, 4),
    "temperature": (dict(temperature=1.0), 9, 3, 4, None),
    "top_k": (dict(temperature=0.8, top_k=20), 5, 2, 3, None),
    "top_p": (dict(temperature=1.0, top_p=0.9), 12, 2, 5, None),
    "top_k_top_p_min_p": (dict(temperature=1.2, top_k=30, top_p=0.95, min_p=0.01), 1, 3, 4, 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_match_the_plain_sampler(case):
    kw_sampling, N, n_samples, slots, topk = CASES[case]
    kw = dict(max_new_tokens=N, n_samples=n_samples, seed=7, return_topk=topk, **kw_sampling)
    eos = ragged_eos(generate(MODEL, PROMPTS, eos_ids=[], **kw))
    plain = generate(MODEL, PROMPTS, eos_ids=eos, **kw)
    slotted = generate(MODEL, PROMPTS, eos_ids=eos, slots=slots, **kw)
    assert len(slotted.tokens) == len(PROMPTS) * n_samples > slots
    if N > 2:
        assert len(set(plain.lengths.tolist())) > 1, "EOS should make the lengths ragged"
    assert_same_rows(plain, slotted)
    if kw_sampling["temperature"] and N > 2 and n_samples > 1:
        assert slotted.tokens[0] != slotted.tokens[1], "samples of one prompt should differ"


def test_stats_account_for_every_token_and_shared_prefills():
    sampler = Sampler(CFG, TopK(20, 1.0), 8, eos_ids=[], slots=4)
    rows = [p for p in PROMPTS for _ in range(3)]  # 3 samples of each prompt, prompt-major
    P = max(map(len, rows))
    tokens = np.array([[0] * (P - len(p)) + p for p in rows], np.int32)
    valid = np.array([[False] * (P - len(p)) + [True] * len(p) for p in rows])
    out = sampler(PARAMS, tokens, valid, jax.random.key(1))
    stats = sampler.last_slot_stats
    lengths = np.asarray(out.lengths)
    assert stats.rows == len(rows) and stats.slots == 4
    # token 0 of a row is drawn by its admit, the others by decode steps of a live slot
    assert stats.live_slot_steps == int((lengths - 1).sum())
    assert stats.live_slot_steps <= stats.decode_steps * stats.slots
    # no EOS: the slots take 4 rows at a time (18 rows: 5 rounds of N - 1 = 7 decode steps)
    assert stats.decode_steps == 5 * 7 and stats.utilization == 18 * 7 / (5 * 7 * 4)
    # the samples of a prompt admitted together share one prefill: rows 0-3 are prompts
    # 0, 0, 0, 1 (2 prefills), then 1, 1, 2, 2 / 2, 3, 3, 3 / 4, 4, 4, 5 / 5, 5
    assert stats.prefilled_prompts == 2 + 2 + 2 + 2 + 1 and stats.admits == 5


def test_compiled_programs_do_not_grow_with_the_number_of_rows():
    sampler = Sampler(CFG, TopK(8, 0.9), 6, eos_ids=[1, 2], slots=4)
    rng = np.random.default_rng(0)
    before = dict(TRACE_COUNTS)

    def call(rows: int, length: int, params=PARAMS):
        tokens = rng.integers(3, CFG.vocab_size, (rows, length))
        valid = np.ones((rows, length), bool)
        valid[0, :length // 2] = False  # some left padding
        return sampler(params, tokens, valid, jax.random.key(rows))

    for rows, length in [(5, 9), (9, 16), (13, 3), (20, 12), (4, 7), (11, 10)]:
        call(rows, length)
    call(7, 8, jax.tree.map(lambda x: x * 1.01, PARAMS))
    traced = {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ("slot_init", "slot_decode",
                                                                "slot_admit")}
    # one ring size (prompt bucket 16), four slots: one init and one decode program; one admit
    # program per bucket of distinct prompts per admit (1, 2, 4)
    assert traced["slot_init"] == 1 and traced["slot_decode"] == 1, traced
    assert 1 <= traced["slot_admit"] <= 3, traced
    assert TRACE_COUNTS["decode"] == before.get("decode", 0), "the plain loop never ran"


def test_lora_and_both_layer_loops_match_the_plain_sampler():
    lora = init_lora(CFG, jax.random.PRNGKey(2), rank=2, alpha=4.0)
    lora = lora.replace(weights=jax.tree.map(lambda x: x + 0.2, lora.weights))
    rows = PROMPTS[:5]
    P = max(map(len, rows))
    tokens = np.array([[0] * (P - len(p)) + p for p in rows], np.int32)
    valid = np.array([[False] * (P - len(p)) + [True] * len(p) for p in rows])
    key = jax.random.key(4)
    for mode in ("unroll", "scan"):
        plain = Sampler(CFG, TopK(20, 0.9), 6, eos_ids=[3], layer_loop=mode)(
            PARAMS, tokens, valid, key, lora=lora)
        slotted = Sampler(CFG, TopK(20, 0.9), 6, eos_ids=[3], layer_loop=mode, slots=2,
                          chunk_steps=3)(PARAMS, tokens, valid, key, lora=lora)
        np.testing.assert_array_equal(np.asarray(slotted.tokens), np.asarray(plain.tokens))
        np.testing.assert_array_equal(np.asarray(slotted.mask), np.asarray(plain.mask))
        np.testing.assert_allclose(np.asarray(slotted.logprobs_full),
                                   np.asarray(plain.logprobs_full), rtol=1e-5, atol=2e-5)


def test_rows_that_end_at_token_zero_and_fewer_rows_than_slots():
    base = generate(MODEL, PROMPTS, max_new_tokens=4, eos_ids=[])
    firsts = sorted({t[0] for t in base.tokens})[:2]  # some rows end on their first token
    for slots in (3, 16):
        plain = generate(MODEL, PROMPTS, max_new_tokens=4, eos_ids=firsts)
        slotted = generate(MODEL, PROMPTS, max_new_tokens=4, eos_ids=firsts, slots=slots)
        assert_same_rows(plain, slotted)
    assert any(len(t) == 1 for t in slotted.tokens)


@pytest.mark.parametrize("kw, match", [(dict(slots=0), "slots"), (dict(slots=2, chunk_steps=0),
                                                                    "chunk_steps"),
                                       (dict(slots=2, refill_at=-1), "refill_at")])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampler(CFG, Greedy(), 4, **kw)


EIGHT_DEVICES = textwrap.dedent("""
    import os, json, types
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import sys; sys.path.insert(0, {path!r})
    import jax
    from tests.test_sampler import CFG, PARAMS
    from tests.test_continuous_batching import PROMPTS
    from opd_jax.sampling.generation import generate
    from opd_jax.sharding import make_mesh
    assert len(jax.devices()) == 8
    m = types.SimpleNamespace(config=CFG, params=PARAMS)
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=40, eos_ids=[7, 100], n_samples=3, seed=5)
    one = generate(m, PROMPTS, **kw)
    mesh = generate(m, PROMPTS, mesh=make_mesh((2, 4, 1)), slots=8, **kw)
    print("RESULT" + json.dumps([one.tokens, mesh.tokens, one.logprobs.tolist(),
                                 mesh.logprobs.tolist()]))
""")


def test_eight_fake_devices_match_one_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES.format(path=root)],
                          capture_output=True, text=True, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_tokens, mesh_tokens, one_lp, mesh_lp = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert mesh_tokens == one_tokens
    np.testing.assert_allclose(mesh_lp, one_lp, rtol=1e-5, atol=2e-5)
