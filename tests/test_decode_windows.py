"""The sampler's decode phases (``Sampler(cache_windows=)``): the phase schedule covers every
step, the chunked cache's attention equals the float64 definition, phased decoding gives the
one-phase tokens / log-probs (and a full forward's), writes land in the right slots, no
recompiles, validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.model import cache_attention, decoder
from opd_jax.model.config import ModelConfig
from opd_jax.sampling import loop
from opd_jax.sampling.loop import TRACE_COUNTS, WINDOW_MULTIPLE, decode_windows
from opd_jax.sampling.sampler import Sampler, default_cache_windows
from opd_jax.sampling.strategies import Greedy, Sampling, TopK

CFG = ModelConfig(max_position=256)
N = 160          # prompt bucket 16: S = 175, windows 64 / 128 / 175 with 4 phases


def _params():
    p = decoder.init_params(CFG, jax.random.PRNGKey(0))
    p["embed"] = p["embed"] * 10.0    # peaked next-token distributions: no near-ties to flip
    return p


PARAMS = _params()


@pytest.mark.parametrize("P", [16, 48, 128, 384])
@pytest.mark.parametrize("n_new", [1, 2, 31, 64, 100, 256, 1000])
def test_windows_cover_every_step(P, n_new):
    S = P + n_new - 1
    for phases in range(1, 11):
        w = decode_windows(P, n_new, phases)
        assert w[-1] == (n_new - 1, S) and 1 <= len(w) <= phases
        assert all(b[1] > a[1] for a, b in zip(w, w[1:]))        # strictly growing
        for last_step, window in w:
            assert window == P + last_step                        # step s reads slots < P + s
        assert all(window % WINDOW_MULTIPLE == 0 for _, window in w[:-1])
        if phases == 1:
            assert w == [(n_new - 1, S)]
    assert decode_windows(128, 256, 4) == [(64, 192), (128, 256), (192, 320), (255, 383)]
    assert [default_cache_windows(n) for n in (1, 32, 255, 256, 511, 512, 767, 1024, 4096)] == [
        1, 1, 1, 4, 4, 4, 5, 8, 8]


def _attention64(q, k, v, mask):
    """Float64 grouped-query attention over a ``[B, G, S, E]`` cache, from the definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, E = q.shape
    G = k.shape[1]
    out = np.zeros((B, T, H, E))
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            s = q[b, :, h] @ k[b, g].T / np.sqrt(E)
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, g]
    return out


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("sizes", [(40,), (16, 24), (8, 16, 16), (13, 13, 14)])
@pytest.mark.parametrize("multiply_reduce", [True, False])
@pytest.mark.parametrize("keys_last", [False, True])
def test_chunked_cache_attention_matches_float64(T, sizes, multiply_reduce, keys_last, monkeypatch):
    monkeypatch.setattr(cache_attention, "ONE_QUERY_MULTIPLY_REDUCE", multiply_reduce)
    rng = np.random.default_rng(0)
    B, G, H, E, S = 2, 2, 4, 8, sum(sizes)
    q = rng.normal(size=(B, T, H, E)).astype(np.float32)
    k = rng.normal(size=(B, G, S, E)).astype(np.float32)
    v = rng.normal(size=(B, G, S, E)).astype(np.float32)
    mask = rng.random((B, T, S)) < 0.6
    mask[:, :, 0] = True
    k[:, :, 5], v[:, :, 5] = 1e6, 1e6          # garbage in a slot masked for every query
    mask[:, :, 5] = False
    ref = _attention64(q, k, v, mask)
    cuts = np.cumsum((0,) + sizes)
    chunk = lambda x: tuple(jnp.asarray(x[:, :, a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    keys = cache_attention.slots_last(chunk(k)) if keys_last else chunk(k)   # [B, G, E, S_c]
    f = jax.jit(lambda *a: cache_attention.attention_over_cache(*a))   # a fresh trace per flag
    got = f(jnp.asarray(q), keys, chunk(v), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)


PROMPTS = np.array([[0, 0, 0, 5, 9, 17], [3, 1, 4, 1, 5, 9], [0, 0, 0, 0, 0, 42]], np.int32)
VALID = PROMPTS != 0


def _sample(windows, sampling, layer_loop="unroll", eos=()):
    sampler = Sampler(CFG, sampling, N, eos_ids=eos, layer_loop=layer_loop,
                      cache_windows=windows)
    out = sampler(PARAMS, PROMPTS, VALID, jax.random.key(3))
    return {k: np.asarray(getattr(out, k)) for k in ("tokens", "mask", "logprobs",
                                                      "logprobs_full")}


@pytest.mark.parametrize("layer_loop", ["unroll", "scan"])
def test_phases_give_the_one_phase_rollouts(layer_loop):
    assert len(decode_windows(16, N, 4)) == 3
    greedy = _sample(1, Greedy(), layer_loop)
    for sampling in (Greedy(), TopK(20, 1.0)):
        one = _sample(1, sampling, layer_loop)
        for windows in (2, 4):
            got = _sample(windows, sampling, layer_loop)
            np.testing.assert_array_equal(got["tokens"], one["tokens"])
            np.testing.assert_allclose(got["logprobs_full"], one["logprobs_full"], atol=1e-5)
            np.testing.assert_allclose(got["logprobs"], one["logprobs"], atol=1e-5)
    # an EOS that ends one row inside the first phase while the others run on
    eos = int(greedy["tokens"][1, 10])
    one, got = _sample(1, Greedy(), layer_loop, (eos,)), _sample(4, Greedy(), layer_loop, (eos,))
    np.testing.assert_array_equal(got["tokens"], one["tokens"])
    np.testing.assert_array_equal(got["mask"], one["mask"])
    assert got["mask"].sum(1).min() <= 11 and got["mask"].any(0).sum() > 64


def test_phased_greedy_logprobs_match_a_full_forward():
    got = _sample(4, Greedy())
    row, prompt = 1, PROMPTS[1].tolist()
    seq = prompt + got["tokens"][row].tolist()
    hidden, _ = decoder.forward(PARAMS, CFG, jnp.asarray([seq], jnp.int32))
    logits = np.asarray(decoder.logits(PARAMS, CFG, hidden)[0], np.float64)[len(prompt) - 1:-1]
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    np.testing.assert_array_equal(got["tokens"][row], lp.argmax(-1))
    np.testing.assert_allclose(got["logprobs_full"][row], lp[np.arange(N), seq[len(prompt):]],
                               atol=2e-4)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("layer_loop", ["unroll", "scan"])
def test_prefill_holds_the_first_window_and_decode_adds_chunks(layer_loop):
    """The phased cache, chunks put together, equals the one-phase cache slot for slot."""
    caches = {}
    for windows in (1, 4):
        st = Sampler(CFG, Greedy(), N, eos_ids=(), layer_loop=layer_loop,
                     cache_windows=windows)._static
        args = (jnp.asarray(PROMPTS[:, :]), jnp.asarray(VALID))
        tokens = jnp.pad(args[0], ((0, 1), (10, 0)))    # batch bucket 4, prompt bucket 16
        valid = jnp.pad(args[1], ((0, 1), (10, 0))).at[3, -1].set(True)
        keys = jax.random.split(jax.random.key(0), 4)
        state = loop.prefill(st, PARAMS, None, tokens, valid, keys, jnp.arange(4) < 3,
                             jnp.zeros((0,), jnp.int32))
        assert state.cache.valid.shape[1] == decode_windows(16, N, windows)[0][1]
        state = loop.decode(st, 16, state, PARAMS, None)
        k = state.cache.k[0] if layer_loop == "unroll" else state.cache.k
        # the CPU decode re-lays per-layer keys [B, G, E, S] (SlotsLast); compare them as stored
        assert isinstance(k, cache_attention.SlotsLast) == (layer_loop == "unroll")
        chunks = tuple(jnp.swapaxes(c, -1, -2) if isinstance(k, cache_attention.SlotsLast) else c
                       for c in cache_attention.kv_chunks(k))
        axis = chunks[0].ndim - 2
        assert [c.shape[axis] for c in chunks] == np.diff(
            [0] + [w for _, w in decode_windows(16, N, windows)]).tolist()
        caches[windows] = (np.concatenate([np.asarray(c) for c in chunks], axis),
                           np.asarray(state.cache.valid), np.asarray(state.tokens))
    np.testing.assert_array_equal(caches[4][1], caches[1][1])
    np.testing.assert_array_equal(caches[4][2], caches[1][2])
    # slots of left padding hold whatever a fully masked query computed (never attended to)
    valid = caches[1][1][:, None, :, None]
    np.testing.assert_allclose(np.where(valid, caches[4][0], 0), np.where(valid, caches[1][0], 0),
                               atol=1e-5)


def test_no_recompile_across_calls_with_phases():
    sampler = Sampler(CFG, Sampling(temperature=1.0), 130, eos_ids=(), cache_windows=2)
    before = dict(TRACE_COUNTS)
    for i in range(3):
        sampler(PARAMS, PROMPTS[:, 2:], VALID[:, 2:], jax.random.key(i))
    assert TRACE_COUNTS["decode"] - before.get("decode", 0) == 1


def test_cache_windows_validation_and_config():
    with pytest.raises(ValueError, match="cache_windows"):
        Sampler(CFG, Greedy(), 8, cache_windows=0)
    assert Sampler(CFG, Greedy(), 300)._static.cache_windows == default_cache_windows(300) == 4
    assert dataclasses.replace(Sampler(CFG, Greedy(), 8, cache_windows=5)._static).cache_windows == 5
    with pytest.raises(Exception, match="cache_windows"):
        load_config("configs/tiny_test.yaml", ["sampler.cache_windows=0"])
    cfg = load_config("configs/tiny_test.yaml", ["sampler.cache_windows=3"])
    assert cfg.sampler.cache_windows == 3


def test_benchmark_small_run(tmp_path):
    """``benchmarks/decode_windows.py --small`` runs end to end and reports every variant."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import decode_windows as bench

    out = bench.main(["--small", "--windows", "1,4", "--repeats", "1",
                      "--out", str(tmp_path / "w.json")])
    one, four = out["rows"]
    assert (one["phases"], four["phases"]) == (1, 2)
    assert four["mean_slots"] < one["mean_slots"] == 287.0
    assert one["same_tokens_as_first"] and one["x_first"] == 1.0
    assert (tmp_path / "w.json").exists() and four["min_s"] > 0
    assert bench.mean_slots(128, 256, 4) == np.mean([192] * 64 + [256] * 64 + [320] * 64
                                                    + [383] * 63)


EIGHT_DEVICES = """
import os, json, types, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {path!r})
import jax
from tests.test_decode_windows import CFG, PARAMS, PROMPTS, N
from opd_jax.sampling.generation import generate
from opd_jax.sharding import make_mesh
assert len(jax.devices()) == 8
m = types.SimpleNamespace(config=CFG, params=PARAMS)
prompts = [[int(t) for t in p if t] for p in PROMPTS]
res = {{}}
for name, mesh, w in [("one", None, 1), ("mesh_phases", make_mesh((2, 4, 1)), 4)]:
    o = generate(m, prompts, max_new_tokens=N, temperature=1.0, top_k=20, eos_ids=[], seed=2,
                 mesh=mesh, cache_windows=w)
    res[name] = [o.tokens, o.logprobs.tolist()]
print("RESULT" + json.dumps(res))
"""


def test_phases_on_eight_fake_devices_match_one_device():
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES.format(path=root)],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["mesh_phases"][0] == res["one"][0]
    np.testing.assert_allclose(res["mesh_phases"][1], res["one"][1], atol=1e-4)
