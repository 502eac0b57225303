"""Top-k supports, OPD top-k rewards and support divergences vs float64 numpy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from opd_jax import losses
from tests._compat import enable_x64

SETTINGS = settings(max_examples=25, deadline=None)
SUPPORTS = ["student", "teacher", "union", "intersection", "symmetric_difference"]


# ------------------------------------------------------------------------------------------
# float64 numpy references
# ------------------------------------------------------------------------------------------


def np_log_softmax(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_topk(row, k):
    return list(np.argsort(-np.asarray(row, np.float64), kind="stable")[:k])


def np_support(s_row, t_row, k, support):
    """Ordered list of support ids for one token (sets built with python set algebra)."""
    a, b = np_topk(s_row, k), np_topk(t_row, k)
    if support == "student":
        return a
    if support == "teacher":
        return b
    if support == "union":
        return a + [i for i in b if i not in a]
    if support == "intersection":
        return [i for i in a if i in b]
    if support == "symmetric_difference":
        return [i for i in a if i not in b] + [i for i in b if i not in a]
    raise KeyError(support)


def np_kl(p, q):
    pos = p > 0
    return float(np.sum(p[pos] * (np.log(p[pos]) - np.log(q[pos]))))


def np_div(name, S, T):
    if name == "forward_kl":
        return np_kl(T, S)
    if name == "reverse_kl":
        return np_kl(S, T)
    if name == "generalized_jsd":  # beta 0.5
        M = 0.5 * S + 0.5 * T
        return 0.5 * np_kl(T, M) + 0.5 * np_kl(S, M)
    raise KeyError(name)


def np_support_divergence(name, S, T, ids, tail):
    s, t = S[ids], T[ids]
    if tail == "renormalize":
        if len(ids) == 0:
            return 0.0
        return np_div(name, s / s.sum(), t / t.sum())
    s = np.append(s, max(1 - s.sum(), 0.0))
    t = np.append(t, max(1 - t.sum(), 0.0))
    return np_div(name, s, t)


def rand_logits(seed, shape=(2, 3, 13), scale=2.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def rows(x):
    return np.asarray(x).reshape(-1, np.shape(x)[-1])


def valid_ids(out_ids, out_valid):
    return [list(i[v]) for i, v in zip(rows(out_ids), rows(out_valid))]


@functools.lru_cache(maxsize=None)
def _jitted(fn, static_items):
    return jax.jit(functools.partial(fn, **dict(static_items)))


def jcall(fn, *args, where=None, **static):
    """``fn(*args, where=where, **static)`` jitted once per static configuration."""
    if where is not None:
        return _jitted(fn, tuple(sorted(static.items())))(*args, where=jnp.asarray(where))
    return _jitted(fn, tuple(sorted(static.items())))(*args)


def _reward_pg_grad(s, t, *, k, support, weights):
    r = losses.topk_reward(s, t, k=k, support=support, weights=weights)
    g = jax.grad(lambda z: losses.topk_policy_gradient_loss(z, r).sum())(s)
    return r, g


def _div_and_grad(s, t, **kw):
    f = lambda a: losses.topk_divergence(a, t, **kw)
    return f(s), jax.grad(lambda a: f(a).sum())(s)


# ------------------------------------------------------------------------------------------
# supports
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("support", SUPPORTS)
def test_support_matches_reference(support):
    s, t, k = rand_logits(0), rand_logits(1), 4
    sup = losses.topk_support(jnp.asarray(s), jnp.asarray(t), k=k, support=support)
    m = 2 * k if support in ("union", "symmetric_difference") else k
    assert sup.ids.shape == (2, 3, m) and sup.valid.shape == (2, 3, m)
    got = valid_ids(sup.ids, sup.valid)
    want = [np_support(a, b, k, support) for a, b in zip(rows(s), rows(t))]
    assert [sorted(g) for g in got] == [sorted(int(i) for i in w) for w in want]


ids_pair = st.integers(0, 2**31 - 1).map(lambda seed: (rand_logits(seed, (5, 9)),
                                                       rand_logits(seed + 1, (5, 9))))


@SETTINGS
@given(pair=ids_pair, k=st.sampled_from([1, 4, 9]))
def test_support_set_algebra(pair, k):
    s, t = pair
    sups = {n: jcall(losses.topk_support, s, t, k=k, support=n) for n in SUPPORTS}
    sets = {n: [set(r) for r in valid_ids(*sups[n])] for n in SUPPORTS}
    for i in range(5):
        S, T = sets["student"][i], sets["teacher"][i]
        assert len(S) == len(T) == k
        assert sets["intersection"][i] <= S and sets["intersection"][i] <= T
        assert sets["union"][i] >= S and sets["union"][i] >= T
        assert sets["symmetric_difference"][i] == sets["union"][i] - sets["intersection"][i]
        assert sets["intersection"][i] == S & T and sets["union"][i] == S | T
    for n in SUPPORTS:  # valid slots never repeat an id
        for ids in valid_ids(*sups[n]):
            assert len(ids) == len(set(ids))


def test_support_from_ids_precomputed():
    sup = losses.support_from_ids(jnp.array([[5, 2, 7]]), jnp.array([[2, 9, 5]]),
                                  "symmetric_difference")
    assert valid_ids(sup.ids, sup.valid) == [[7, 9]]


# ------------------------------------------------------------------------------------------
# reward form
# ------------------------------------------------------------------------------------------


def np_reward(s_row, t_row, k, support, weights, temperature, teacher_temperature=None,
              normalize=None):
    """thunlp/OPD ``compute_distillation_reward`` (verl/verl/workers/actor/dp_actor.py:451-624),
    ported to float64 numpy for one token: ``{id: A}`` over the valid slots."""
    tt = temperature if teacher_temperature is None else teacher_temperature
    ls, lt = np_log_softmax(s_row, temperature), np_log_softmax(t_row, tt)
    a, b = np_topk(s_row, k), np_topk(t_row, k)
    # the reference's slot layout: only_stu -> S ids; only_tch -> T ids; intersection -> S ids
    # masked by the overlap; union -> [S ids, T ids] with T ids already in S masked out;
    # union-intersection -> [S ids, T ids] with the shared ones masked on both sides
    if support == "student":
        ids, valid = a, [True] * len(a)
    elif support == "teacher":
        ids, valid = b, [True] * len(b)
    elif support == "intersection":
        ids, valid = a, [i in b for i in a]
    elif support == "union":
        ids, valid = a + b, [True] * len(a) + [i not in a for i in b]
    else:  # symmetric_difference (union-intersection)
        ids, valid = a + b, [i not in b for i in a] + [i not in a for i in b]
    ids, valid = np.asarray(ids), np.asarray(valid)
    S_logp, T_logp = ls[ids], lt[ids]
    log_w = {"student_p": S_logp, "teacher_p": T_logp, "none": np.zeros(len(ids))}[weights]
    log_w = np.where(valid, log_w, -np.inf)
    if normalize is None:
        normalize = support != "symmetric_difference"  # dp_actor.py:615 normalize=False
    if normalize:
        if not valid.any():
            return {}
        w = np.exp(log_w - np.logaddexp.reduce(log_w))
    else:
        w = np.exp(log_w)
    rm = -(S_logp - T_logp) * w
    return {int(i): float(x) for i, x, v in zip(ids, rm, valid) if v}


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("weights", ["student_p", "teacher_p", "none"])
def test_topk_reward_matches_paper_formula(support, weights):
    s, t, k, temp = rand_logits(2), rand_logits(3), 5, 0.8
    r = losses.topk_reward(s, t, k=k, support=support, weights=weights, temperature=temp)
    assert r.advantages.dtype == jnp.float32
    for ids, valid, adv, a, b in zip(rows(r.ids), rows(r.valid), rows(r.advantages),
                                     rows(s), rows(t)):
        ref = np_reward(a, b, k, support, weights, temp)
        got = {int(i): float(x) for i, v, x in zip(ids, valid, adv) if v}
        assert set(got) == set(ref)
        for i in ref:
            np.testing.assert_allclose(got[i], ref[i], rtol=2e-5, atol=2e-6)
        assert np.all(adv[~valid] == 0.0)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("weights", ["student_p", "teacher_p", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_topk_reward_teacher_temperature_and_normalize(support, weights, normalize):
    """A separate teacher temperature and the explicit weight normalisation, both supports'
    defaults overridden, against the reference port."""
    s, t, k = rand_logits(21), rand_logits(22), 4
    r = losses.topk_reward(s, t, k=k, support=support, weights=weights, normalize=normalize,
                           temperature=1.3, teacher_temperature=0.7)
    for ids, valid, adv, a, b in zip(rows(r.ids), rows(r.valid), rows(r.advantages),
                                     rows(s), rows(t)):
        ref = np_reward(a, b, k, support, weights, 1.3, 0.7, normalize)
        got = {int(i): float(x) for i, v, x in zip(ids, valid, adv) if v}
        assert set(got) == set(ref)
        for i in ref:
            np.testing.assert_allclose(got[i], ref[i], rtol=2e-5, atol=2e-6)


def test_none_weights_are_uniform_over_the_valid_support():
    """``weights="none"``: 1/|valid_t| on renormalised supports, 1 on the symmetric difference."""
    s, t = rand_logits(31), rand_logits(32)
    lp_s = jax.nn.log_softmax(s, -1)
    for support in ("student", "union", "intersection"):
        r = losses.topk_reward(s, t, k=4, support=support, weights="none")
        sup = losses.topk_support(lp_s, jax.nn.log_softmax(t, -1), k=4, support=support)
        w = losses.reward_weights(lp_s[..., :sup.ids.shape[-1]], lp_s[..., :sup.ids.shape[-1]],
                                  sup.valid, weights="none")
        n = np.asarray(sup.valid).sum(-1, keepdims=True)
        want = np.where(np.asarray(sup.valid), 1.0 / np.maximum(n, 1), 0.0)
        np.testing.assert_allclose(np.asarray(w), want, rtol=1e-6)
        assert r.advantages.shape == sup.ids.shape
    w = losses.reward_weights(lp_s[..., :3], lp_s[..., :3], jnp.array([True, False, True]),
                              weights="none", normalize=False)
    np.testing.assert_array_equal(np.asarray(w)[0, 0], [1.0, 0.0, 1.0])


@pytest.mark.parametrize("support", ["student", "union", "intersection"])
def test_policy_gradient_surrogate_gives_paper_update(support):
    """grad_z of -sum_k A_k log S(x_k) = -(A_j [j in K] - S_j sum_k A_k) / tau."""
    s, t, k, temp = rand_logits(4), rand_logits(5), 4, 1.3
    r = losses.topk_reward(s, t, k=k, support=support, temperature=temp)
    g = jax.grad(lambda z: losses.topk_policy_gradient_loss(z, r, temperature=temp).sum())(s)
    for gi, a, b in zip(rows(g), rows(s), rows(t)):
        ref = np_reward(a, b, k, support, "student_p", temp)
        A = np.zeros(a.shape[-1])
        for i, x in ref.items():
            A[i] = x
        S = np.exp(np_log_softmax(a, temp))
        np.testing.assert_allclose(gi, -(A - S * A.sum()) / temp, rtol=2e-4, atol=1e-6)


def test_reward_is_stop_gradient():
    s, t = rand_logits(6), rand_logits(7)
    g = jax.grad(lambda z: losses.topk_reward(z, t, k=3).advantages.sum())(s)
    assert np.all(np.asarray(g) == 0.0)


def test_reward_and_pg_loss_masking():
    s, t = rand_logits(8), rand_logits(9)
    where = np.array([[True, False, True], [False, True, True]])
    s[0, 1] = np.nan
    t[1, 0] = -np.inf
    r = jcall(losses.topk_reward, s, t, k=3, support="union", where=where)
    assert np.all(np.asarray(r.valid)[~where] == False)  # noqa: E712
    assert np.all(np.asarray(r.advantages)[~where] == 0.0)
    f = jax.jit(lambda z: losses.topk_policy_gradient_loss(z, r, where=jnp.asarray(where)))
    out = f(s)
    g = jax.jit(jax.grad(lambda z: f(z).sum()))(s)
    assert np.all(np.asarray(out)[~where] == 0.0) and np.all(np.isfinite(out))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~where] == 0.0)


def test_reward_with_neg_inf_logits_is_finite():
    s, t = rand_logits(10), rand_logits(11)
    s[..., 8:] = -np.inf  # only 8 finite student logits, k = 10 reaches into -inf ones
    t[..., :2] = -np.inf
    combos = [(sup, "student_p") for sup in SUPPORTS] + [("union", "teacher_p"), ("union", "none")]
    for support, weights in combos:
        r, g = _reward_pg_grad(s, t, k=10, support=support, weights=weights)
        assert np.all(np.isfinite(r.advantages)) and np.all(np.isfinite(g)), (support, weights)


def test_empty_intersection():
    s = jnp.array([[5.0, 4.0, 0.0, 0.0, -1.0, -2.0]])
    t = jnp.array([[-2.0, -1.0, 0.0, 0.0, 4.0, 5.0]])
    r = jcall(losses.topk_reward, s, t, k=2, support="intersection")
    assert not np.any(r.valid) and np.all(np.asarray(r.advantages) == 0.0)
    d, g = jcall(_div_and_grad, s, t, k=2, support="intersection")
    assert np.asarray(d)[0] == 0.0 and np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------
# direct divergence over the support
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_divergence_matches_reference(support, tail):
    s, t, k, temp = rand_logits(12), rand_logits(13), 4, 0.9
    for divergence in ["reverse_kl", "forward_kl", "generalized_jsd"]:
        out = losses.topk_divergence(s, t, k=k, support=support, divergence=divergence,
                                     tail=tail, temperature=temp)
        assert out.shape == (2, 3) and out.dtype == jnp.float32
        for o, a, b in zip(np.asarray(out).reshape(-1), rows(s), rows(t)):
            S, T = np.exp(np_log_softmax(a, temp)), np.exp(np_log_softmax(b, temp))
            ids = [int(i) for i in np_support(a, b, k, support)]
            np.testing.assert_allclose(o, np_support_divergence(divergence, S, T, ids, tail),
                                       rtol=5e-5, atol=5e-6)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "generalized_jsd",
                                        "skew_forward_kl", "skew_reverse_kl"])
def test_full_support_equals_full_divergence(tail, divergence):
    s, t = rand_logits(14), rand_logits(15)
    out = losses.topk_divergence(s, t, k=13, support="teacher", divergence=divergence, tail=tail)
    np.testing.assert_allclose(out, losses.DIVERGENCES[divergence](s, t), rtol=1e-4, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("k",))
def _bucket_and_full(s, t, *, k):
    names = ["reverse_kl", "forward_kl", "generalized_jsd"]
    bucket = jnp.stack([
        jnp.stack([losses.topk_divergence(s, t, k=k, support=sup, divergence=n, tail="bucket")
                   for n in names])
        for sup in ("teacher", "union", "symmetric_difference")
    ])
    full = jnp.stack([losses.DIVERGENCES[n](s, t) for n in names])
    return bucket, full


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([3, 12]))
def test_bucket_lower_bounds_full_divergence(seed, k):
    """Merging the tail into one bucket is a coarse-graining: D(bucket) <= D(full)."""
    bucket, full = _bucket_and_full(rand_logits(seed), rand_logits(seed + 7), k=k)
    assert np.all(np.asarray(bucket) <= np.asarray(full)[None] + 2e-5)
    assert np.all(np.asarray(bucket) >= -1e-6)


def test_precomputed_teacher_topk_path():
    s, t, k = rand_logits(16), rand_logits(17), 5
    t_logp = jax.nn.log_softmax(t)
    t_vals, t_ids = jax.lax.top_k(t_logp, k)  # what a teacher scoring job would store
    s_logp = losses.normalized_logprobs(s)
    valid = jnp.ones(t_ids.shape, bool)
    s_at = losses.gather_logprobs(s_logp, t_ids)
    for tail in ["renormalize", "bucket"]:
        a = losses.support_divergence(s_at, t_vals, valid, divergence="reverse_kl", tail=tail)
        b = losses.topk_divergence(s, t, k=k, support="teacher", tail=tail)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # 1 - sum vs exact tails
    # with the student's exact tail (the chunked path has the student's logits) and the
    # teacher's exact tail given, the precomputed path equals the dense one
    exact = losses.support_divergence(
        s_at, t_vals, valid, tail="bucket",
        student_tail_logp=losses.tail_logprob(s_logp, t_ids, valid),
        teacher_tail_logp=losses.tail_logprob(t_logp, t_ids, valid))
    np.testing.assert_allclose(exact, losses.topk_divergence(s, t, k=k, support="teacher",
                                                             tail="bucket"), rtol=1e-6, atol=1e-7)


def test_tail_logprob_matches_one_minus_sum_and_is_precise():
    lp = jnp.log(jnp.array([0.7, 0.2999, 1e-4]))
    tail = losses.tail_logprob(lp, jnp.array([0, 1]), jnp.array([True, True]))
    np.testing.assert_allclose(tail, np.log(1e-4), rtol=1e-6)
    rough = losses.tail_bucket_logprobs(lp[:2], jnp.array([True, True]))[-1]
    np.testing.assert_allclose(rough, np.log(1e-4), rtol=1e-2)  # 1 - sum loses digits
    with pytest.raises(ValueError, match="tail='bucket'"):
        losses.support_divergence(lp[:2], lp[:2], jnp.array([True, True]),
                                  student_tail_logp=tail)


def test_callable_divergence_and_pointwise_clip():
    s, t = rand_logits(18), rand_logits(19)
    jsd9 = functools.partial(losses.generalized_jsd_from_logprobs, beta=0.9)
    a = losses.topk_divergence(s, t, k=13, divergence=jsd9, pointwise_clip=0.02)
    b = losses.generalized_jsd(s, t, 0.9, pointwise_clip=0.02)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("support", "tail"))
def _masked_jsd_value_and_grads(s, t, where, *, support, tail):
    f = lambda a, b: losses.topk_divergence(a, b, k=12, support=support, tail=tail,
                                            divergence="generalized_jsd", where=where)
    return f(s, t), jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(s, t)


@pytest.mark.parametrize("support,tail", [("student", "renormalize"), ("teacher", "bucket"),
                                          ("union", "bucket"), ("intersection", "renormalize"),
                                          ("symmetric_difference", "bucket")])
def test_topk_divergence_neg_inf_and_masking(support, tail):
    s, t = rand_logits(20), rand_logits(21)
    s[..., :3] = t[..., :3] = -np.inf  # padded vocabulary, k reaches into it
    where = np.array([[True, True, False], [True, False, True]])
    s[0, 2] = np.nan
    out, (gs, gt) = _masked_jsd_value_and_grads(s, t, jnp.asarray(where), support=support,
                                                 tail=tail)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out)[~where] == 0.0)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
    assert np.all(np.asarray(gs)[~where] == 0.0)


def test_bf16_inputs():
    s, t = jnp.asarray(rand_logits(22), jnp.bfloat16), jnp.asarray(rand_logits(23), jnp.bfloat16)
    r = losses.topk_reward(s, t, k=4)
    d = losses.topk_divergence(s, t, k=4, tail="bucket")
    assert r.advantages.dtype == jnp.float32 and d.dtype == jnp.float32
    d32 = losses.topk_divergence(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), k=4,
                                 tail="bucket")
    np.testing.assert_allclose(d, d32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_check_grads_float64(tail):
    with enable_x64(True):
        rng = np.random.default_rng(24)
        s = jnp.asarray(rng.standard_normal((2, 7)), jnp.float64)
        t = jnp.asarray(rng.standard_normal((2, 7)), jnp.float64)
        f = jax.jit(lambda a, b: losses.topk_divergence(a, b, k=3, support="union", tail=tail,
                                                        divergence="generalized_jsd",
                                                        temperature=1.2))
        check_grads(f, (s, t), order=1, modes=["rev"])
        if tail == "bucket":
            r = losses.topk_reward(s, t, k=3)
            g = jax.jit(lambda a: losses.topk_policy_gradient_loss(a, r))
            check_grads(g, (s,), order=1, modes=["rev"])


def test_jit_traces_once():
    traces = []

    @jax.jit
    def step(s, t):
        traces.append(1)
        r = losses.topk_reward(s, t, k=4, support="union")
        return (losses.topk_policy_gradient_loss(s, r).sum()
                + losses.topk_divergence(s, t, k=4, tail="bucket").sum())

    for seed in range(4):
        step(rand_logits(seed), rand_logits(seed + 1)).block_until_ready()
    assert len(traces) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(k=0), "k=0"), (dict(k=14), "1 <= k <= V"), (dict(k=2.0), "Python int"),
     (dict(support="only_stu"), "support"), (dict(tail="none"), "tail"),
     (dict(divergence="kl"), "divergence")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.topk_divergence(rand_logits(0), rand_logits(1), **{"k": 4, **kwargs})


def test_bad_weights_and_mismatched_reward():
    with pytest.raises(ValueError, match="weights"):
        losses.topk_reward(rand_logits(0), rand_logits(1), k=2, weights="student")
    r = losses.topk_reward(rand_logits(0), rand_logits(1), k=2)
    with pytest.raises(ValueError, match="same token positions"):
        losses.topk_policy_gradient_loss(rand_logits(0, (3, 2, 13)), r)


# --- the package's top-k: two exact passes over blocks of ids --------------------------------

def _plain_top_k(x, k):
    return jax.lax.top_k(x, k)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties", "neg_inf", "one_block"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_top_k_two_pass_equals_lax_top_k(dtype, kind, k):
    """Values and ids equal ``lax.top_k`` exactly, ties included (lower id first)."""
    from opd_jax.losses.support import TOPK_BLOCK, top_k

    rng = np.random.default_rng(k)
    V = TOPK_BLOCK * 4 * 16           # the two-pass path for every k here
    if kind == "normal":
        x = rng.standard_normal((3, 7, V))
    elif kind == "ties":              # a few distinct values: many ties inside and across blocks
        x = rng.integers(0, 4, (3, 7, V)).astype(np.float64)
    elif kind == "neg_inf":           # most ids impossible, some rows entirely
        x = np.where(rng.random((3, 7, V)) < 0.995, -np.inf, rng.standard_normal((3, 7, V)))
        x[0, 0] = -np.inf
    else:                             # the whole top-k inside one block
        x = rng.standard_normal((3, 7, V)) - 10.0
        x[..., 5 * TOPK_BLOCK:5 * TOPK_BLOCK + 20] += 20.0
    x = jnp.asarray(x, dtype)
    got_v, got_i = jax.jit(top_k, static_argnums=1)(x, k)
    ref_v, ref_i = _plain_top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(ref_i))
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(ref_v, np.float32))
    assert got_i.dtype == jnp.int32 and got_v.dtype == dtype


def test_top_k_small_or_ragged_vocab_uses_lax_top_k_and_gradients_match():
    """Vocabularies that are no multiple of the block (or too few blocks) take ``lax.top_k``
    as is; the two-pass values carry the same gradient as ``lax.top_k``'s."""
    from opd_jax.losses.support import TOPK_BLOCK, top_k

    rng = np.random.default_rng(0)
    for V in (TOPK_BLOCK * 4 * 3 + 1, TOPK_BLOCK * 3):
        x = jnp.asarray(rng.standard_normal((2, V)), jnp.float32)
        np.testing.assert_array_equal(np.asarray(top_k(x, 4)[1]), np.asarray(_plain_top_k(x, 4)[1]))
    x = jnp.asarray(rng.standard_normal((2, 5, TOPK_BLOCK * 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(w * jnp.exp(top_k(x, 8)[0])))(x)
    g_ref = jax.grad(lambda x: jnp.sum(w * jnp.exp(_plain_top_k(x, 8)[0])))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
