"""Chunked (memory-bounded) losses: same values and gradients as the dense forms, bounded memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.losses import chunk_layout as layout
from opd_jax.losses import topk as topk_lib
from opd_jax.losses.chunk_map import chunked_logits_map, chunked_student_logits_map
from opd_jax.losses.chunked_divergences import (
    chunked_divergence,
    chunked_divergence_loss,
    chunked_topk_policy_gradient_loss,
)
from opd_jax.losses.chunked_scoring import (
    TeacherTopK,
    chunked_logprobs_at_ids,
    chunked_teacher_topk,
    chunked_token_logprobs,
    chunked_token_logprobs_and_entropy,
    logprob_and_entropy,
)
from opd_jax.losses.divergences import DIVERGENCES, LOGPROB_DIVERGENCES, normalized_logprobs

B, T, D, DT, V = 2, 13, 8, 6, 37  # B*T = 26 is not a multiple of the chunk sizes used

# extra keyword arguments exercised per registered divergence (non-default where it matters)
DIV_KWARGS = {
    "forward_kl": {},
    "reverse_kl": {"pointwise_clip": 0.05},
    "generalized_jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.2},
}


@functools.lru_cache(maxsize=None)
def _inputs(seed=0, b=B, t=T, d=D, dt=DT, v=V, scale=1.5):
    """Random inputs from numpy (cheap: no per-op compilation of jax.random on a busy CPU)."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    hs = f32(b, t, d)
    ws = scale * f32(d, v) / np.sqrt(d)
    ht = f32(b, t, dt)
    wt = scale * f32(dt, v) / np.sqrt(dt)
    where = jnp.asarray(rng.random((b, t)) < 0.75)
    cot = f32(b, t)  # a generic upstream cotangent
    return hs, ws, ht, wt, where, cot


@functools.partial(jax.jit, static_argnums=0)
def _value_and_vjp(fn, cot, *args):
    """``fn(*args)`` and the gradient of ``sum(cot * fn(*args))`` in one compiled call."""
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot)


def test_every_registered_divergence_is_exercised():
    assert set(DIV_KWARGS) == set(DIVERGENCES)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunked_matches_dense_values_and_grads(name):
    hs, ws, ht, wt, where, cot = _inputs()
    kw = DIV_KWARGS[name]
    dense_fn, temp = DIVERGENCES[name], 0.7

    def dense(hs, ws, ht, wt):
        return dense_fn(hs @ ws, jax.lax.stop_gradient(ht @ wt), where=where, temperature=temp, **kw)

    def chunk(hs, ws, ht, wt):
        return chunked_divergence(
            hs, ws, ht, wt, divergence=name, where=where, temperature=temp, chunk_size=5, **kw
        )

    (want, gd), (got, gc) = _value_and_vjp(dense, cot, hs, ws, ht, wt), _value_and_vjp(
        chunk, cot, hs, ws, ht, wt
    )
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[~np.asarray(where)] == 0.0)
    for a, b in zip(gd[:2], gc[:2]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # masked rows get exactly zero hidden-state gradient; the teacher gets none at all
    assert np.all(np.asarray(gc[0])[~np.asarray(where)] == 0.0)
    assert not np.any(np.asarray(gc[2])) and not np.any(np.asarray(gc[3]))
    assert np.any(np.asarray(gc[0])) and np.any(np.asarray(gc[1]))


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunk_size_and_no_mask(chunk_size):
    hs, ws, ht, wt, _, _ = _inputs(seed=1)
    want = DIVERGENCES["reverse_kl"](hs @ ws, ht @ wt)
    got = chunked_divergence(hs, ws, ht, wt, chunk_size=chunk_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_callable_divergence_and_bf16_inputs():
    hs, ws, ht, wt, where, _ = _inputs(seed=2)
    fn = functools.partial(DIVERGENCES["generalized_jsd"], beta=0.5)
    want = fn(hs @ ws, ht @ wt, where=where)
    got = chunked_divergence(hs, ws, ht, wt, divergence=fn, where=where, chunk_size=8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    low = chunked_divergence(
        hs.astype(jnp.bfloat16), ws.astype(jnp.bfloat16), ht, wt, where=where, chunk_size=8
    )
    assert low.dtype == jnp.float32 and np.all(np.isfinite(low))


def test_bad_inputs_raise():
    hs, ws, ht, wt, where, _ = _inputs()
    with pytest.raises(ValueError, match="either"):
        chunked_divergence(hs, ws)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_divergence(hs, ws, ht, wt, divergence="nope")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="vocabularies"):
        chunked_divergence(hs, ws, ht, wt[:, :-1])
    with pytest.raises(ValueError, match="where"):
        chunked_divergence(hs, ws, ht, wt, where=where[:, :-1])
    with pytest.raises(ValueError, match="hidden"):
        chunked_divergence(hs[0], ws, ht, wt)


# ------------------------------------------------------------------------------------------
# precomputed teacher top-k
# ------------------------------------------------------------------------------------------


def _kl(p, q):
    p, q = np.asarray(p), np.asarray(q)
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0), -1)


NUMPY_DIVS = {  # float64 references on probability vectors over the last axis
    "forward_kl": lambda s, t, kw: _kl(t, s),
    "reverse_kl": lambda s, t, kw: _kl(s, t),
    "generalized_jsd": lambda s, t, kw: (
        kw["beta"] * _kl(t, (1 - kw["beta"]) * s + kw["beta"] * t)
        + (1 - kw["beta"]) * _kl(s, (1 - kw["beta"]) * s + kw["beta"] * t)
    ),
    "skew_forward_kl": lambda s, t, kw: _kl(t, kw["alpha"] * t + (1 - kw["alpha"]) * s),
    "skew_reverse_kl": lambda s, t, kw: _kl(s, kw["alpha"] * s + (1 - kw["alpha"]) * t),
}
TOPK_KWARGS = {
    "forward_kl": {},
    "reverse_kl": {},
    "generalized_jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.2},
}


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_topk_reference(hs, ws, ht, wt, k, temp, name, kw, tail):
    s_p = _softmax64(np.asarray(hs @ ws, np.float64) / temp)
    t_p = _softmax64(np.asarray(ht @ wt, np.float64) / temp)
    ids = np.argsort(-t_p, axis=-1, kind="stable")[..., :k]
    s_k, t_k = np.take_along_axis(s_p, ids, -1), np.take_along_axis(t_p, ids, -1)
    if tail == "bucket":
        s_k = np.concatenate([s_k, 1 - s_k.sum(-1, keepdims=True)], -1)
        t_k = np.concatenate([t_k, 1 - t_k.sum(-1, keepdims=True)], -1)
    else:
        s_k, t_k = s_k / s_k.sum(-1, keepdims=True), t_k / t_k.sum(-1, keepdims=True)
    return NUMPY_DIVS[name](s_k, t_k, kw)


@functools.lru_cache(maxsize=None)
def _cached_teacher_topk(seed, k, temp):
    _, _, ht, wt, where, _ = _inputs(seed=seed)
    return chunked_teacher_topk(ht, wt, k=k, chunk_size=5, temperature=temp, where=where)


def test_numpy_references_cover_the_registry():
    assert set(NUMPY_DIVS) == set(TOPK_KWARGS) == set(LOGPROB_DIVERGENCES)


TOPK_CASES = [(name, "bucket") for name in sorted(LOGPROB_DIVERGENCES)] + [
    ("reverse_kl", "renormalize"),
    ("generalized_jsd", "renormalize"),
]


@pytest.mark.parametrize("name,tail", TOPK_CASES)
def test_teacher_topk_path_matches_float64_reference(name, tail):
    hs, ws, ht, wt, where, _ = _inputs(seed=6)
    k, temp, kw = 6, 0.9, TOPK_KWARGS[name]
    teacher = _cached_teacher_topk(6, k, temp)
    got = chunked_divergence(
        hs, ws, teacher_topk=teacher, divergence=name, tail=tail,
        where=where, temperature=temp, chunk_size=7, **kw,
    )
    want = _numpy_topk_reference(hs, ws, ht, wt, k, temp, name, kw, tail)
    m = np.asarray(where)
    assert got.shape == (B, T)
    np.testing.assert_allclose(np.asarray(got)[m], want[m], rtol=2e-4, atol=2e-6)
    assert np.all(np.asarray(got)[~m] == 0.0)


def test_teacher_topk_bucket_lower_bounds_full_kl():
    """Data-processing inequality: the bucketed divergence never exceeds the full one."""
    hs, ws, ht, wt, where, _ = _inputs(seed=7)
    temp = 1.2
    teacher = chunked_teacher_topk(ht, wt, k=5, chunk_size=4, temperature=temp)
    got = chunked_divergence(hs, ws, teacher_topk=teacher, where=where, temperature=temp,
                             chunk_size=6)
    full = DIVERGENCES["reverse_kl"](hs @ ws, ht @ wt, where=where, temperature=temp)
    assert np.all(np.asarray(got) <= np.asarray(full) + 1e-5)
    assert np.all(np.asarray(got) >= -1e-6) and np.any(np.asarray(got) > 0)


def test_teacher_topk_bad_shapes_raise():
    hs, ws, ht, wt, _, _ = _inputs()
    teacher = chunked_teacher_topk(ht, wt, k=3, chunk_size=8)
    with pytest.raises(ValueError, match="teacher_topk.ids"):
        chunked_divergence(hs[:, :-1], ws, teacher_topk=teacher)
    with pytest.raises(ValueError, match="either"):
        chunked_divergence(hs, ws, ht, wt, teacher_topk=teacher)


def test_topk_support_divergence_and_policy_gradient_chunked_match_dense():
    hs, ws, ht, wt, where, cot = _inputs(seed=8)
    kw = dict(k=4, support="union")
    got = chunked_divergence(
        hs, ws, ht, wt, divergence=topk_lib.topk_divergence, where=where, chunk_size=5, **kw
    )
    want = topk_lib.topk_divergence(hs @ ws, ht @ wt, where=where, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def dense_pg(h, w):
        s, t = h @ w, ht @ wt
        r = topk_lib.topk_reward(s, t, k=4, support="student", weights="student_p", where=where)
        return topk_lib.topk_policy_gradient_loss(s, r, where=where)

    def chunk_pg(h, w):
        return chunked_topk_policy_gradient_loss(h, w, ht, wt, k=4, where=where, chunk_size=7)

    def two_job_pg(h, w):  # student ids -> teacher scores them -> student surrogate
        s_ids = chunked_teacher_topk(h, w, k=4, chunk_size=6).ids
        t_logp = chunked_logprobs_at_ids(ht, wt, s_ids, chunk_size=6)
        s_logp = chunked_logprobs_at_ids(h, w, s_ids, chunk_size=6)
        valid = jnp.broadcast_to(where[..., None], s_ids.shape)
        adv = topk_lib.support_advantages(s_logp, t_logp, valid, weights="student_p")
        return topk_lib.support_policy_gradient_loss(s_logp, adv, valid)

    want, gd = _value_and_vjp(dense_pg, cot, hs, ws)
    for fn in (chunk_pg, two_job_pg):
        got, gc = _value_and_vjp(fn, cot, hs, ws)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(gd, gc):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# fused weighted-sum loss (gradient formed in the forward pass)
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# vocabulary blocks, frozen unembedding
# ------------------------------------------------------------------------------------------


def test_vocab_blocks_divide_the_vocabulary():
    for v in (151936, 49152, 32000, 32768):
        n = layout.vocab_blocks(v)
        assert v % n == 0 and v // n <= layout.VOCAB_BLOCK and v // n > layout.VOCAB_BLOCK // 8
    assert layout.vocab_blocks(8192) == 1
    assert layout.vocab_blocks(49152) == 6 and layout.vocab_blocks(32000) == 4
    assert layout.vocab_blocks(65521) == 1  # prime: one block
    assert layout.vocab_blocks(40, target=8) == 5


def test_balanced_chunks_cover_the_rows_in_as_few_chunks_with_less_padding():
    assert layout.balanced_chunk_size(704, 512) == 352          # 2 x 352, not 512 + 512
    assert layout.balanced_chunk_size(2112, 512) == 432         # 5 chunks: 2,160 rows, not 2,560
    assert layout.balanced_chunk_size(100, 512) == 112
    assert layout.balanced_chunk_size(1024, 512) == 512
    assert layout.balanced_chunk_size(7, 4) == 4                # above chunk_size never
    for rows in range(1, 1200, 7):
        for cs in (1, 5, 16, 100, 128, 512):
            c = layout.balanced_chunk_size(rows, cs)
            n = layout.num_chunks(rows, c)
            assert c <= cs and n == layout.num_chunks(rows, cs) and n * c >= rows
            assert c == cs or c % layout.CHUNK_ALIGN == 0
            assert n * c - rows < n * layout.CHUNK_ALIGN or c == cs   # padding under one tile each


def test_balanced_chunks_scan_the_even_split():
    """The scan runs ``ceil(rows / chunk_size)`` chunks of the balanced length (no 512-row chunk
    for a 192-row remainder), and the values equal one chunk over every row."""
    rows, vocab, dim = 44, 64, 8
    h = jax.random.normal(jax.random.PRNGKey(0), (1, rows, dim))
    w = jax.random.normal(jax.random.PRNGKey(1), (dim, vocab))

    def fn(z, ex):
        del ex
        return jax.nn.logsumexp(z, axis=-1)

    jaxpr = jax.make_jaxpr(lambda h, w: chunked_logits_map(fn, (h,), (w,), chunk_size=32))(h, w)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert scans and scans[0].params["length"] == 2
    assert any(v.aval.shape[:2] == (2, 32) for v in scans[0].invars)   # 2 x 32 (>= 22, aligned)
    out = chunked_logits_map(fn, (h,), (w,), chunk_size=32)
    np.testing.assert_allclose(out, jax.nn.logsumexp(h @ w, axis=-1), rtol=1e-6)


def test_blockwise_gradients_match_dense(monkeypatch):
    """Several vocabulary blocks (V=40 in blocks of 8): dense and sparse heads, both drivers."""
    monkeypatch.setattr(layout, "VOCAB_BLOCK", 8)
    hs, ws, ht, wt, where, cot = _inputs(seed=12, v=40)
    top = chunked_teacher_topk(ht, wt, k=6, chunk_size=8)
    weights = jnp.where(where, jnp.abs(cot), 0.0)
    temp = 1.3

    def dense(h, w):
        rkl = DIVERGENCES["reverse_kl"](h @ w, ht @ wt, where=where, temperature=temp)
        s_logp = normalized_logprobs(h @ w, temperature=temp, where=where)
        sup = topk_lib.support_divergence(
            topk_lib.gather_logprobs(s_logp, top.ids), top.logprobs,
            jnp.ones(top.ids.shape, bool), divergence="reverse_kl", tail="bucket",
        )
        sup = jnp.where(where, sup, 0.0)
        return rkl, sup, rkl, jnp.sum(weights * sup), jnp.sum(weights * rkl)

    def chunk(h, w):
        kw = dict(where=where, temperature=temp, chunk_size=7)
        return (
            chunked_divergence(h, w, ht, wt, **kw),
            chunked_divergence(h, w, teacher_topk=top, **kw),
            chunked_divergence_loss(h, w, ht, wt, weights=weights, **kw)[1],
            chunked_divergence_loss(h, w, teacher_topk=top, weights=weights, **kw)[0],
            chunked_divergence_loss(h, w, ht, wt, weights=weights, **kw)[0],
        )

    cots = (cot, -cot, jnp.zeros_like(cot), jnp.ones(()), jnp.ones(()))
    (want, gd), (got, gc) = _value_and_vjp(dense, cots, hs, ws), _value_and_vjp(chunk, cots, hs, ws)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(gd, gc):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # undifferentiated call: the plain forward of the custom VJPs
    np.testing.assert_allclose(jax.jit(chunk)(hs, ws)[3], want[3], rtol=1e-5)


def test_frozen_unembedding_and_traced_temperature():
    """Gradient w.r.t. the hidden states only (LoRA-style frozen head); temperature traced."""
    hs, ws, ht, wt, where, cot = _inputs(seed=13)
    top = chunked_teacher_topk(ht, wt, k=4, chunk_size=8, temperature=0.9)

    @jax.jit
    def grads(h, tau):
        def dense_teacher(h):
            return chunked_divergence_loss(h, ws, ht, wt, weights=cot, where=where,
                                           temperature=tau, chunk_size=6)[0]

        def topk(h):
            return jnp.sum(cot * chunked_divergence(h, ws, teacher_topk=top, where=where,
                                                    temperature=tau, chunk_size=6))

        return jax.grad(dense_teacher)(h), jax.grad(topk)(h)

    g_dense_teacher, g_topk = grads(hs, 0.9)

    def ref_topk(h):
        s_logp = normalized_logprobs(h @ ws, temperature=0.9, where=where)
        out = topk_lib.support_divergence(
            topk_lib.gather_logprobs(s_logp, top.ids), top.logprobs,
            jnp.ones(top.ids.shape, bool), tail="bucket",
        )
        return jnp.sum(cot * jnp.where(where, out, 0.0))

    def ref_dense(h):
        return jnp.sum(cot * DIVERGENCES["reverse_kl"](h @ ws, ht @ wt, where=where, temperature=0.9))

    want_topk, want_dense = jax.jit(lambda h: (jax.grad(ref_topk)(h), jax.grad(ref_dense)(h)))(hs)
    np.testing.assert_allclose(g_topk, want_topk, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_dense_teacher, want_dense, rtol=1e-4, atol=1e-6)


def test_student_logits_map_matches_checkpoint_map():
    """The lean map equals chunked_logits_map (values, student gradients) on a loss+metrics fn."""
    hs, ws, ht, wt, where, cot = _inputs(seed=14)
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, V, (B, T)), jnp.int32)

    def fn(s_logits, t_logits, ex):
        t_logits = jax.lax.stop_gradient(t_logits)
        return {
            "loss": DIVERGENCES["forward_kl"](s_logits, t_logits, where=ex["mask"]),
            "logp": jax.lax.stop_gradient(jax.nn.log_softmax(s_logits))[
                jnp.arange(s_logits.shape[0]), ex["tokens"]
            ],
        }

    extras = {"tokens": tokens, "mask": where}

    def via_checkpoint(h, w):
        return chunked_logits_map(fn, (h, ht), (w, wt), extras, chunk_size=6)

    def via_lean(h, w):
        return chunked_student_logits_map(fn, h, w, ht, wt, extras, chunk_size=6)

    cots = {"loss": cot, "logp": jnp.zeros_like(cot)}
    (want, gw), (got, gl) = _value_and_vjp(via_checkpoint, cots, hs, ws), _value_and_vjp(
        via_lean, cots, hs, ws
    )
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(gw, gl):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_engine_per_token_dead_chunks_give_zeros_and_no_gradient():
    """``chunk_engine.per_token``'s ``live_N``: a chunk marked False is not computed (its
    outputs are 0, its hidden rows get no gradient, the unembedding none from it); live chunks
    equal the plain map's, values and gradients."""
    from opd_jax.losses import chunk_engine

    hs, ws, _, _, _, _ = _inputs(seed=22, b=1, t=12)
    h_NxCxD = hs.reshape(3, 4, D)
    live_N = jnp.asarray([True, False, True])
    cot = jnp.asarray(np.random.default_rng(22).standard_normal((3, 4)), jnp.float32)

    def fn(z, ex, consts):
        del ex, consts
        return jax.nn.logsumexp(z, axis=-1)

    def run(h, w, live):
        return chunk_engine.per_token(chunk_engine.DENSE_HEAD, fn, 1, h, w, (None, None),
                                      (None, None), live)

    got, (gh, gw) = _value_and_vjp(lambda h, w: run(h, w, live_N), cot, h_NxCxD, ws)
    want = jax.nn.logsumexp(h_NxCxD @ ws, axis=-1)
    np.testing.assert_allclose(got[0::2], want[0::2], rtol=1e-6)
    assert np.all(np.asarray(got[1]) == 0.0) and np.all(np.asarray(gh[1]) == 0.0)
    live_cot = cot * live_N[:, None]   # the reference: the dead chunk's cotangent dropped
    _, (wh, ww) = _value_and_vjp(lambda h, w: jax.nn.logsumexp(h @ w, axis=-1), live_cot,
                                 h_NxCxD, ws)
    np.testing.assert_allclose(gh, wh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, ww, rtol=1e-5, atol=1e-6)


def test_student_logits_map_where_skips_the_masked_rows_chunks():
    """``where``: the masked rows go behind the others and chunks holding none are never run
    (counted in both passes); values equal the unmasked map's at ``where`` and are exactly 0
    elsewhere; gradients equal the unmasked map's (whose loss is masked) to rounding."""
    b, t = 4, 12
    hs, ws, ht, wt, _, cot = _inputs(seed=21, b=b, t=t)
    lengths = np.array([12, 3, 0, 5])                     # ragged completions: 20 of 48 rows
    where = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
    tokens = jnp.asarray(np.random.default_rng(21).integers(0, V, (b, t)), jnp.int32)
    runs = []

    def fn(s_logits, t_logits, ex):
        jax.debug.callback(lambda: runs.append(1))
        t_logits = jax.lax.stop_gradient(t_logits)
        return {
            "loss": DIVERGENCES["reverse_kl"](s_logits, t_logits, where=ex["mask"]),
            "logp": jax.lax.stop_gradient(jax.nn.log_softmax(s_logits))[
                jnp.arange(s_logits.shape[0]), ex["tokens"]
            ] * ex["mask"],
        }

    extras = {"tokens": tokens, "mask": where}
    cots = {"loss": cot, "logp": jnp.zeros_like(cot)}

    def run(h, w, masked):
        return chunked_student_logits_map(fn, h, w, ht, wt, extras, chunk_size=8,
                                          where=where if masked else None)

    (want, g_want) = _value_and_vjp(lambda h, w: run(h, w, False), cots, hs, ws)
    jax.effects_barrier()
    assert len(runs) == 2 * 6, len(runs)                  # 6 chunks of 8, forward + backward
    runs.clear()
    (got, g_got) = _value_and_vjp(lambda h, w: run(h, w, True), cots, hs, ws)
    jax.effects_barrier()
    assert len(runs) == 2 * 3, len(runs)                  # ceil(20 / 8) = 3 chunks each pass
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(got[name])[~np.asarray(where)] == 0.0)
    for a, c in zip(g_want, g_got):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_got[0])[~np.asarray(where)] == 0.0)   # skipped rows: no gradient
    with pytest.raises(ValueError, match=r"where has shape \(4, 5\)"):
        chunked_student_logits_map(fn, hs, ws, ht, wt, extras, chunk_size=8,
                                   where=where[:, :5])


# ------------------------------------------------------------------------------------------
# scoring helpers
# ------------------------------------------------------------------------------------------


def test_teacher_topk_matches_dense():
    _, _, ht, wt, where, _ = _inputs(seed=3)
    k, temp = 5, 1.3
    got = jax.jit(
        lambda h, w, m: chunked_teacher_topk(h, w, k=k, chunk_size=7, temperature=temp, where=m)
    )(ht, wt, where)
    assert isinstance(got, TeacherTopK)
    assert got.ids.shape == (B, T, k) and got.ids.dtype == jnp.int32
    z = np.asarray(ht @ wt, np.float64) / temp
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ids = np.argsort(-z, axis=-1)[..., :k]
    logp = np.take_along_axis(z, ids, -1) - lse[..., None]
    m = np.asarray(where)
    np.testing.assert_array_equal(np.asarray(got.ids)[m], ids[m])
    np.testing.assert_allclose(np.asarray(got.logprobs)[m], logp[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.logsumexp)[m], lse[m], atol=1e-5)
    assert not np.any(np.asarray(got.ids)[~m]) and not np.any(np.asarray(got.logprobs)[~m])


def test_token_logprobs_entropy_and_ids_match_dense_with_grads():
    from opd_jax.losses.estimators import token_logprobs

    hs, ws, _, _, _, cot = _inputs(seed=4)
    rng = np.random.default_rng(9)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    ids = jnp.asarray(rng.integers(0, V, (B, T, 3)), jnp.int32)
    temp = 0.8

    def dense(h, w):
        logp = jax.nn.log_softmax((h @ w) / temp, axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        at = jnp.take_along_axis(logp, ids, -1)
        return token_logprobs(h @ w, tokens, temperature=temp), ent, at

    def chunk(h, w):
        lp, ent = chunked_token_logprobs_and_entropy(h, w, tokens, chunk_size=6, temperature=temp)
        lp2 = chunked_token_logprobs(h, w, tokens, chunk_size=5, temperature=temp)
        at = chunked_logprobs_at_ids(h, w, ids, chunk_size=9, temperature=temp)
        at1 = chunked_logprobs_at_ids(h, w, ids[..., 0], chunk_size=4, temperature=temp)
        return lp, ent, at, lp2, at1

    def dense5(h, w):
        lp, ent, at = dense(h, w)
        return lp, ent, at, lp, at[..., 0]

    cots = (cot, 0.3 * cot, jnp.ones((B, T, 3)), -cot, cot)
    (want, gd), (got, gc) = _value_and_vjp(dense5, cots, hs, ws), _value_and_vjp(chunk, cots, hs, ws)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(gd, gc):  # sums of many terms in another order: absolute slack 1e-5
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_entropy_finite_with_minus_inf_logits():
    logits = np.random.default_rng(5).standard_normal((6, V)).astype(np.float32)
    logits[:, :5] = -np.inf
    logits = jnp.asarray(logits)
    tokens = jnp.full((6,), 7)

    def ent(z):
        return logprob_and_entropy(z, tokens, 1.0)

    (lp, h), (g,) = _value_and_vjp(ent, (jnp.ones(6), jnp.ones(6)), logits)
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(h))
    assert np.all(np.isfinite(g)) and not np.any(np.asarray(g)[:, :5])


# ------------------------------------------------------------------------------------------
# memory: no [B*T, V] buffer in forward or backward
# ------------------------------------------------------------------------------------------

MEM_BT, MEM_V, MEM_D, MEM_C = 2048, 32768, 48, 128
LOGIT_BYTES = MEM_BT * MEM_V * 4  # one float32 [B*T, V] buffer: 256 MiB
CHUNK_BYTES = MEM_C * MEM_V * 4  # one float32 [C, V] buffer: 16 MiB
HEAD_BYTES = MEM_D * MEM_V * 4  # the float32 [D, V] unembedding (gradient): 6 MiB


def _temp_bytes(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _mem_inputs(k=None, rows=MEM_BT):
    sd = jax.ShapeDtypeStruct
    hs = sd((1, rows, MEM_D), jnp.float32)
    ws = sd((MEM_D, MEM_V), jnp.float32)
    where = sd((1, rows), jnp.bool_)
    if k is None:
        return hs, ws, hs, ws, where
    topk = TeacherTopK(
        ids=sd((1, rows, k), jnp.int32),
        logprobs=sd((1, rows, k), jnp.float32),
        logsumexp=sd((1, rows), jnp.float32),
    )
    return hs, ws, topk, where


def _token_mean_losses():
    """Loss functions (token mean) of every chunked path, keyed by path name."""

    def per_token(hs, ws, ht, wt, where):
        per = chunked_divergence(hs, ws, ht, wt, where=where, chunk_size=MEM_C)
        return jnp.sum(per) / jnp.maximum(jnp.sum(where), 1)

    def fused(hs, ws, ht, wt, where):
        w = where / jnp.maximum(jnp.sum(where), 1)
        return chunked_divergence_loss(hs, ws, ht, wt, weights=w, where=where, chunk_size=MEM_C)[0]

    def topk(hs, ws, top, where):
        per = chunked_divergence(hs, ws, teacher_topk=top, where=where, chunk_size=MEM_C)
        return jnp.sum(per) / jnp.maximum(jnp.sum(where), 1)

    def topk_fused(hs, ws, top, where):
        w = where / jnp.maximum(jnp.sum(where), 1)
        return chunked_divergence_loss(
            hs, ws, teacher_topk=top, weights=w, where=where, chunk_size=MEM_C
        )[0]

    # path -> (loss, topk K or None, bound on temp in [C, V] buffers)
    return {
        "dense_teacher": (per_token, None, 4),
        "dense_teacher_fused": (fused, None, 6),
        "teacher_topk": (topk, 16, 1.5),
        "teacher_topk_fused": (topk_fused, 16, 1.5),
    }


@pytest.mark.parametrize("path", sorted(_token_mean_losses()))
def test_loss_and_grad_memory_is_bounded(path):
    loss, k, max_chunks = _token_mean_losses()[path]
    grad = jax.grad(loss, argnums=(0, 1))
    temp = _temp_bytes(grad, *_mem_inputs(k=k))
    # a few [C, V] buffers at most (one for the top-k paths); never a second [D, V] buffer. The
    # dense paths hold 4: the CPU's vocabulary sums are products (``vocab_sum``), whose input is
    # materialised where a reduction fused it (3 before); the logits here are 16 chunks
    assert temp <= max_chunks * CHUNK_BYTES + HEAD_BYTES / 2, (temp / CHUNK_BYTES, path)
    assert temp < LOGIT_BYTES / 3, (temp, LOGIT_BYTES)
    if path in ("dense_teacher", "teacher_topk_fused"):
        # independent of B*T: 4x the tokens, the same scratch (up to small per-token arrays)
        assert _temp_bytes(grad, *_mem_inputs(k=k, rows=4 * MEM_BT)) <= temp + CHUNK_BYTES / 8


def test_dense_loss_holds_logit_buffers():
    """The property the chunked forms remove: dense loss + grad holds several [B*T, V] buffers."""

    def dense(hs, ws, ht, wt, where):
        per_tok = DIVERGENCES["reverse_kl"](hs @ ws, ht @ wt, where=where)
        return jnp.sum(per_tok) / jnp.maximum(jnp.sum(where), 1)

    dense_temp = _temp_bytes(jax.grad(dense, argnums=(0, 1)), *_mem_inputs())
    assert dense_temp >= 2 * LOGIT_BYTES
    loss, k, _ = _token_mean_losses()["teacher_topk"]
    assert dense_temp > 20 * _temp_bytes(jax.grad(loss, argnums=(0, 1)), *_mem_inputs(k=k))


def test_scoring_memory_is_bounded():
    hs, ws, _, _, where = _mem_inputs()
    temp = _temp_bytes(
        lambda h, w, m: chunked_teacher_topk(h, w, k=16, chunk_size=MEM_C, where=m), hs, ws, where
    )
    assert temp <= 1.5 * CHUNK_BYTES, (temp / CHUNK_BYTES)
    tokens = jax.ShapeDtypeStruct((1, MEM_BT), jnp.int32)
    temp = _temp_bytes(
        jax.grad(
            lambda h, w, x: jnp.sum(chunked_token_logprobs(h, w, x, chunk_size=MEM_C)),
            argnums=(0, 1),
        ),
        hs,
        ws,
        tokens,
    )
    assert temp <= 1.5 * CHUNK_BYTES, (temp / CHUNK_BYTES)


# ------------------------------------------------------------------------------------------
# tracing: repeated calls with the same shapes do not recompile
# ------------------------------------------------------------------------------------------


def test_no_retrace_on_repeated_calls():
    traces = []

    @jax.jit
    def step(hs, ws, ht, wt, where):
        traces.append(1)
        return jax.value_and_grad(
            lambda h, w: jnp.sum(chunked_divergence(h, w, ht, wt, where=where, chunk_size=8)),
            argnums=(0, 1),
        )(hs, ws)

    for seed in range(3):
        step(*_inputs(seed=seed)[:5])
    assert len(traces) == 1
