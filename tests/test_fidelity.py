"""Issue 14, loss and config items: the trainer's objectives against float64 ports of thunlp/OPD
(verl) formulas, and the loss config refusing fields an objective ignores.

References (thunlp/OPD, read at /work/.mirror/thunlp+OPD): ``verl/verl/trainer/ppo/core_algos.py``
(``compute_grpo_outcome_advantage`` 265-327, ``token_reward_direct_plus_grpo`` 883-925,
``compute_policy_loss`` dual clip 1095-1160, ``agg_loss`` 942-978),
``verl/verl/workers/fsdp_workers.py:2015`` (teacher logits / ``teacher_temperature``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses, metrics
from opd_jax.config import ConfigError, RunConfig, from_dict, load_config
from opd_jax.config.loss import LossSpec
from opd_jax.sampling.strategies import Sampling, draw
from opd_jax.train import rollout
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.objectives import make_chunk_fn, reduction_fn

C, V = 12, 17


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.standard_normal((C, V)) * 2, jnp.float32)
    t = jnp.asarray(rng.standard_normal((C, V)) * 2, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, C), jnp.int32)
    mask = jnp.asarray(rng.random(C) < 0.8)
    sampler = jnp.asarray(rng.standard_normal(C) - 3.0, jnp.float32)
    return s, t, {"tokens": tokens, "mask": mask, "sampler_logprobs": sampler}


def _log_softmax64(z, temp):
    z = np.asarray(z, np.float64) / temp
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _grad(spec, s, t, ex):
    fn = make_chunk_fn(spec, with_metrics=False)
    return jax.grad(lambda z: fn(z, t, ex)["loss"].sum())(s)


# ------------------------------------------------------------------------------------------
# config: no silent fields, no hidden defaults
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"objective": "reverse_kl"},
    {"objective": "forward_kl", "temperature": 1.3, "teacher_temperature": 0.6},
    {"objective": "generalized_jsd", "beta": 0.3, "pointwise_clip": 0.05},
    {"objective": "skew_reverse_kl", "alpha": 0.2},
])
def test_divergences_share_their_log_softmax_with_the_metrics(fields):
    """The full-vocabulary path computes each side's log-softmax once for loss and metrics:
    loss, gradient and every metric equal the separate computations (float32 rounding)."""
    s, t, ex = _inputs(seed=7)
    ex = {**ex, "mask": ex["mask"].at[0].set(False)}
    s = s.at[0].set(jnp.nan)   # a masked row of garbage stays out of loss, gradient and metrics
    spec = LossSpec(**fields)
    fused = make_chunk_fn(spec, metrics_k=4)

    def loss(z):
        return fused(z, t, ex)["loss"].sum()

    got, grad = fused(s, t, ex), jax.grad(loss)(s)
    want_loss = make_chunk_fn(spec, with_metrics=False)(s, t, ex)["loss"]
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, _grad(spec, s, t, ex), rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(grad)) and np.all(grad[0] == 0.0)
    want = metrics.mechanism_metrics_from_logits(
        jnp.where(ex["mask"][:, None], s, 0.0), t, ex["tokens"], k=4, where=ex["mask"],
        temperature=spec.temperature, teacher_temperature=spec.resolved_teacher_temperature,
        sampler_logprobs=ex["sampler_logprobs"])
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    assert np.isfinite(got["sampled_kl_" + spec.estimator]).all()


@pytest.mark.parametrize("fields,field", [
    ({"objective": "topk_reward", "top_k": 16, "pg_loss": "ppo_clip"}, "pg_loss"),
    ({"objective": "topk_reward", "top_k": 16, "tail": "bucket"}, "tail"),
    ({"objective": "topk_reward", "top_k": 16, "pointwise_clip": 0.05}, "pointwise_clip"),
    ({"objective": "reverse_kl", "beta": 0.5}, "beta"),
    ({"objective": "generalized_jsd", "alpha": 0.1}, "alpha"),
    ({"objective": "sampled_token_rkl", "top_k": 16}, "top_k"),
    ({"objective": "sampled_token_rkl", "clip_ratio_c": 3.0}, "clip_ratio_c"),
    ({"objective": "sampled_token_rkl", "pg_loss": "plain", "old_logprobs": "sampler"},
     "old_logprobs"),
    ({"objective": "reverse_kl", "grpo_outcome_weight": 1.0}, "grpo_outcome_weight"),
    ({"objective": "topk_reward", "top_k": 4, "grpo_norm_by_std": False}, "grpo_norm_by_std"),
    ({"objective": "reverse_kl", "normalize_weights": True}, "normalize_weights"),
    ({"objective": "reverse_kl", "tail": "bucket"}, "tail"),   # full vocabulary: no tail
    ({"objective": "reverse_kl", "support": "teacher"}, "support"),  # no top_k: no support
])
def test_a_field_the_objective_ignores_is_an_error(fields, field):
    with pytest.raises(ConfigError, match=rf"loss\.{field}="):
        from_dict(RunConfig, {"stages": [{"kind": "opd", "steps": 1}], "loss": fields})


def test_defaults_resolve_per_source():
    assert LossSpec().top_k is None                       # no hidden top-16
    opd = LossSpec(objective="topk_reward", top_k=16, temperature=0.7)
    assert opd.resolved_teacher_temperature == 1.0        # thunlp TEACHER_TEMPERATURE
    gkd = LossSpec(objective="generalized_jsd", temperature=1.1)
    assert gkd.resolved_teacher_temperature == 1.1        # TRL / OPSD: one temperature
    assert LossSpec(objective="reverse_kl", teacher_temperature=2.0).resolved_teacher_temperature \
        == 2.0
    ppo = LossSpec(objective="sampled_token_rkl", pg_loss="ppo_clip")
    assert (ppo.resolved_clip, ppo.resolved_old_logprobs) == ((0.2, 0.2, 3.0), "learner")
    cfg = from_dict(RunConfig, {"stages": [{"kind": "opd", "steps": 1}],
                                "loss": {"objective": "sampled_token_rkl", "pg_loss": "ppo_clip",
                                         "clip_ratio_c": 2.5,
                                         "reduction": "sequence_sum_norm"}})
    assert cfg.loss.resolved_clip == (0.2, 0.2, 2.5)


def test_shipped_opd_config_is_the_reference_recipe():
    cfg = load_config("configs/qwen3_1p7b_opd.yaml")
    opd = cfg.resolve_stage(next(i for i, s in enumerate(cfg.stages) if s.kind == "opd"))
    lo = opd.loss
    assert (lo.objective, lo.top_k, lo.resolved_support, lo.resolved_weights,
            lo.resolved_teacher_temperature, lo.pg_loss) == (
        "topk_reward", 16, "student", "student_p", 1.0, None)


# ------------------------------------------------------------------------------------------
# reductions: verl agg_loss
# ------------------------------------------------------------------------------------------


def _agg_loss(loss_mat, mask, mode):
    """verl ``agg_loss`` (core_algos.py:942-978), float64; fully masked rows left out."""
    loss_mat, mask = np.asarray(loss_mat, np.float64), np.asarray(mask, np.float64)
    if mode == "seq-mean-token-sum":
        seq = (loss_mat * mask).sum(-1)
        has = mask.sum(-1) > 0
        return seq[has].mean()
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * mask).sum() / loss_mat.shape[-1]
    raise KeyError(mode)


@pytest.mark.parametrize("name,mode", [("sequence_sum_mean", "seq-mean-token-sum"),
                                       ("sequence_sum_norm", "seq-mean-token-sum-norm")])
def test_verl_reductions_are_selectable(name, mode):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6))
    mask = rng.random((4, 6)) < 0.7
    mask[2] = False
    spec = LossSpec(reduction=name)
    got = reduction_fn(spec, max_new_tokens=6)(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    want = _agg_loss(x, mask, mode)
    if name == "sequence_sum_norm":   # ours divides by the (constant) row count as well
        want = want / x.shape[0]
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # the horizon is the sampler's max_new_tokens, not the trimmed width
    wide = reduction_fn(LossSpec(reduction="sequence_sum_norm"), max_new_tokens=12)
    if name == "sequence_sum_norm":
        np.testing.assert_allclose(float(wide(jnp.asarray(x, jnp.float32), jnp.asarray(mask))),
                                   want / 2, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# temperatures and old log-probs
# ------------------------------------------------------------------------------------------


def test_teacher_temperature_reaches_every_objective():
    s, t, ex = _inputs(2)
    for fields in ({"objective": "reverse_kl"}, {"objective": "reverse_kl", "top_k": 5},
                   {"objective": "topk_reward", "top_k": 5},
                   {"objective": "sampled_token_rkl"}):
        base = LossSpec(temperature=1.4, **fields)
        a = make_chunk_fn(base, with_metrics=False)(s, t, ex)["loss"]
        b = make_chunk_fn(LossSpec(temperature=1.4, teacher_temperature=0.5, **fields),
                          with_metrics=False)(s, t, ex)["loss"]
        assert not np.allclose(a, b), fields
    # sampled_token_rkl's advantage: -(log S_T(x) - log T_1(x)), thunlp's default teacher at 1.0
    spec = LossSpec(objective="sampled_token_rkl", temperature=1.4)
    g = _grad(spec, s, t, ex)
    ls, lt = _log_softmax64(s, 1.4), _log_softmax64(t, 1.0)
    tok, m = np.asarray(ex["tokens"]), np.asarray(ex["mask"])
    adv = -(ls[np.arange(C), tok] - lt[np.arange(C), tok]) * m
    onehot = np.eye(V)[tok]
    want = -(adv[:, None] * (onehot - np.exp(ls))) / 1.4    # -A d log S(x)/dz
    np.testing.assert_allclose(g, want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("pg", ["importance_sampled", "ppo_clip"])
def test_learner_old_logprobs_make_the_ratio_one(pg):
    """thunlp/verl: the old log-prob is the learner's own, detached: on-policy the IS / PPO
    gradient equals the plain policy gradient whatever the sampler recorded."""
    s, t, ex = _inputs(3)
    ex = {**ex, "sampler_logprobs": ex["sampler_logprobs"] - 5.0}   # wildly off: ignored
    plain = _grad(LossSpec(objective="sampled_token_rkl", temperature=0.8), s, t, ex)
    got = _grad(LossSpec(objective="sampled_token_rkl", temperature=0.8, pg_loss=pg), s, t, ex)
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-7)


def _np_ppo(lp, old, adv, low, high, c):
    """verl compute_policy_loss (2-D), float64."""
    ratio = np.exp(np.clip(lp - old, -20, 20))
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high)
    clip1 = np.maximum(l1, l2)
    return np.where(adv < 0, np.minimum(-adv * c, clip1), clip1)


@pytest.mark.parametrize("c", [None, 1.5])
def test_sampler_old_logprobs_and_dual_clip(c):
    s, t, ex = _inputs(4)
    ls, lt = _log_softmax64(s, 1.0), _log_softmax64(t, 1.0)
    tok, m = np.asarray(ex["tokens"]), np.asarray(ex["mask"])
    lp = ls[np.arange(C), tok]
    old = lp + np.random.default_rng(5).normal(0, 0.5, C)     # stale sampler log-probs
    ex = {**ex, "sampler_logprobs": jnp.asarray(old, jnp.float32)}
    spec = LossSpec(objective="sampled_token_rkl", pg_loss="ppo_clip", old_logprobs="sampler",
                    clip_ratio_c=c)
    got = make_chunk_fn(spec, with_metrics=False)(s, t, ex)["loss"]
    adv = -(lp - lt[np.arange(C), tok])
    want = _np_ppo(lp, old, adv, 0.2, 0.2, 3.0 if c is None else c) * m
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sampler_records_logprobs_at_the_loss_temperature():
    """``Sampling.score_temperature``: the recorded log-prob is log softmax(z / T_loss)[x],
    untruncated, whatever the sampling temperature / top-k: the learner's own value."""
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.standard_normal((5, V)) * 2, jnp.float32)
    u = jnp.asarray(rng.random(5), jnp.float32)
    d = draw(logits, u, Sampling(temperature=0.7, top_k=4, score_temperature=1.3))
    want = _log_softmax64(logits, 1.3)[np.arange(5), np.asarray(d.token)]
    np.testing.assert_allclose(d.logprob_full, want, rtol=1e-5)
    learner = losses.token_logprobs(logits, d.token, temperature=1.3)
    np.testing.assert_allclose(d.logprob_full, learner, rtol=1e-6)
    same = draw(logits, u, Sampling(temperature=0.7, top_k=4))
    assert np.array_equal(same.token, d.token)               # sampling does not depend on it
    with pytest.raises(ValueError, match="score_temperature"):
        Sampling(score_temperature=0.0)


# ------------------------------------------------------------------------------------------
# OPD + GRPO (token_reward_direct_plus_grpo)
# ------------------------------------------------------------------------------------------


def _grpo_ref(scores, index, norm_by_std=True, eps=1e-6):
    """verl compute_grpo_outcome_advantage (core_algos.py:301-327), float64, torch.std unbiased."""
    scores = np.asarray(scores, np.float64).copy()
    groups: dict = {}
    for i, g in enumerate(index):
        groups.setdefault(g, []).append(scores[i])
    stats = {g: ((0.0, 1.0) if len(v) == 1 else (np.mean(v), np.std(v, ddof=1)))
             for g, v in groups.items()}
    out = np.empty_like(scores)
    for i, g in enumerate(index):
        mean, std = stats[g]
        out[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return out


@pytest.mark.parametrize("n,norm", [(4, True), (4, False), (1, True), (3, True)])
def test_grpo_advantages_match_verl(n, norm):
    rng = np.random.default_rng(n)
    scores = (rng.random(5 * n) < 0.5).astype(np.float64)
    scores[:n] = 1.0                                             # a group with std 0
    got = losses.grpo_advantages(jnp.asarray(scores.reshape(5, n)), norm_by_std=norm)
    want = _grpo_ref(scores, np.repeat(np.arange(5), n), norm)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-5, atol=1e-5)


def test_opd_plus_grpo_gradient_is_direct_plus_weighted_outcome():
    """sampled_token_rkl with an outcome advantage: -(A_direct + w A_grpo) d log S(x)."""
    s, t, ex = _inputs(7)
    out_adv = jnp.asarray(np.random.default_rng(8).normal(size=C), jnp.float32)
    ex2 = {**ex, "outcome_advantage": out_adv}
    for pg in (None, "ppo_clip"):
        g = _grad(LossSpec(objective="sampled_token_rkl", pg_loss=pg), s, t, ex2)
        ls, lt = _log_softmax64(s, 1.0), _log_softmax64(t, 1.0)
        tok, m = np.asarray(ex["tokens"]), np.asarray(ex["mask"])
        adv = (-(ls[np.arange(C), tok] - lt[np.arange(C), tok]) + np.asarray(out_adv)) * m
        want = -(adv[:, None] * (np.eye(V)[tok] - np.exp(ls)))
        np.testing.assert_allclose(g, want, rtol=2e-4, atol=1e-5)
    # top-k: the outcome enters as -A log S(x_t) beside the top-k surrogate
    spec = LossSpec(objective="topk_reward", top_k=4)
    base = make_chunk_fn(spec, with_metrics=False)(s, t, ex)["loss"]
    both = make_chunk_fn(spec, with_metrics=False)(s, t, ex2)["loss"]
    lp = losses.token_logprobs(s, ex["tokens"])
    np.testing.assert_allclose(both - base, np.where(ex["mask"], -out_adv * lp, 0.0), rtol=1e-5,
                               atol=1e-6)


def test_outcome_advantages_grade_each_sample():
    recs = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    prompts = rollout.Prompts([r for r in recs for _ in range(2)], *(np.zeros((4, 1)),) * 4)
    texts = ["Answer: 2", "Answer: 3", "Answer: 4", "Answer: 4"]
    mask = jnp.asarray(np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], bool))
    z = jnp.zeros((4, 3))
    batch = RolloutBatch(z, mask, z, mask, z.astype(jnp.int32), mask, z)
    out, scores = rollout.outcome_advantages(batch, prompts, texts, n_samples=2, weight=0.5)
    np.testing.assert_array_equal(scores, [1, 0, 1, 1])
    want = 0.5 * _grpo_ref(scores, [0, 0, 1, 1])
    np.testing.assert_allclose(np.asarray(out.outcome_advantage),
                               np.where(np.asarray(mask), want[:, None], 0.0), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# end to end on the tiny config
# ------------------------------------------------------------------------------------------


def _tiny(tmp_path, *overrides):
    import os
    root = os.path.join(os.path.dirname(__file__), "..")
    return load_config(os.path.join(root, "configs", "tiny_test.yaml"),
                       [f"out_dir={tmp_path}/run", *overrides])


def test_tiny_run_with_grpo_outcome_and_sampler_old_logprobs(tmp_path):
    import json

    from opd_jax.train.run import run
    cfg = _tiny(tmp_path, "loss.objective=sampled_token_rkl", "loss.top_k=null",
                "loss.pg_loss=ppo_clip", "loss.old_logprobs=sampler", "loss.temperature=0.8",
                "loss.grpo_outcome_weight=0.5", "sampler.n_samples=2",
                "stages=[{kind: opd, steps: 2, batch_prompts: 2}]")
    run(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines() if '"loss"' in line]
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= r["outcome_reward"] <= 1.0
        assert np.isfinite(r["loss"]) and r["update_ok"]
        assert "student_p_sum_intersection" in r and "student_shared_mass" in r
        # the sampler's log-probs are at the loss temperature: the train/inference gap is
        # float32 noise, not the T=1-vs-T=0.8 difference
        assert abs(r["logprob_gap"]) < 1e-3


def test_grpo_outcome_needs_an_on_policy_stage(tmp_path):
    from opd_jax.train.run import run
    cfg = _tiny(tmp_path, "stages=[{kind: cold_start, steps: 1, batch_prompts: 2, "
                          "loss: {objective: sampled_token_rkl, top_k: null, "
                          "grpo_outcome_weight: 1.0}}]")
    with pytest.raises(ValueError, match="grpo_outcome_weight applies to opd / opsd"):
        run(cfg, progress=False)
