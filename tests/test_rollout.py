"""Rollout helpers shared by held-out evaluation and prompt selection: the student + teacher
rollouts of one batch, the tokenizer's pad id, and the full-vocabulary scorer of given rollouts."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.data import make_record
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.train import rollout
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.evaluate import SUMMARY_KEYS, full_vocab_scorer, score_rollouts
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec

TINY = "configs/tiny_test.yaml"


def test_pad_id_of():
    assert pad_id_of(types.SimpleNamespace(pad_id=5)) == 5
    assert pad_id_of(types.SimpleNamespace(pad_id=None)) == 0
    assert pad_id_of(object()) == 0


def _same(a: RolloutBatch, b: RolloutBatch):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sample_student_and_teacher_equals_the_steps_it_replaces():
    from opd_jax.train.models import build_models
    from opd_jax.train.run import make_template
    from opd_jax.train.stage_context import make_sampler

    cfg = load_config(TINY, ["sampler.max_new_tokens=4"])
    m = build_models(cfg.teacher, cfg.student, seed=0)
    tok, template = m.tokenizer, make_template(cfg)
    recs = [make_record(f"p{i}", f"What is {i} + {i}?", source="t", answer=2 * i) for i in range(3)]
    s_sampler = make_sampler(m.student.config, cfg.sampler, tok)
    t_sampler = make_sampler(m.teacher.config, cfg.sampler, tok, greedy=True)
    s_params, s_lora = m.student.params_and_lora(m.trainable, m.frozen)
    key, pad, n = jax.random.key(3), pad_id_of(tok), 2
    ro = rollout.sample_student_and_teacher(
        recs, tok, template, max_prompt_len=192, n_samples=n, key=key, student_sampler=s_sampler,
        student_params=s_params, student_lora=s_lora, teacher_sampler=t_sampler,
        teacher_params=m.teacher.params, pad_id=pad)

    prompts = rollout.encode_prompts(recs, tok, template, max_prompt_len=192, n_samples=n,
                                     pad_id=pad)
    out = rollout.sample(s_sampler, s_params, prompts, key, lora=s_lora)
    _same(ro.student, rollout.assemble(prompts, out.tokens, out.mask, out.logprobs_full))
    assert ro.student_texts == rollout.decode_rows(tok, out.tokens, out.mask)
    single = rollout.encode_prompts(recs, tok, template, max_prompt_len=192, pad_id=pad)
    t_out = rollout.sample(t_sampler, m.teacher.params, single, jax.random.fold_in(key, 1))
    _same(ro.teacher, rollout.assemble(single, t_out.tokens, t_out.mask, t_out.logprobs_full))
    assert ro.teacher_texts == rollout.decode_rows(tok, t_out.tokens, t_out.mask)
    assert ro.student.mask.shape[0] == n * len(recs) and ro.teacher.mask.shape[0] == len(recs)

    alone = rollout.sample_student_and_teacher(
        recs, tok, template, max_prompt_len=192, n_samples=n, key=key, student_sampler=s_sampler,
        student_params=s_params, student_lora=s_lora, pad_id=pad)
    assert alone.teacher is None and alone.teacher_texts is None
    _same(alone.student, ro.student)


def _tiny(V=64):
    cs = ModelConfig(n_layers=1, vocab_size=V)
    toks = jax.random.randint(jax.random.key(2), (3, 11), 0, V)
    valid = jnp.ones(toks.shape, bool).at[0, :2].set(False)
    mask = jnp.ones((3, 6), bool).at[1, 3:].set(False)
    batch = RolloutBatch(toks, valid, toks, valid, toks[:, 5:], mask, jnp.full((3, 6), -4.0))
    return cs, dec.init_params(cs, jax.random.key(0)), batch


def test_full_vocab_scorer_is_zero_against_itself_and_matches_score_rollouts():
    cs, ps, batch = _tiny()
    student, teacher = StudentSpec(cs), TeacherSpec("separate", cs)
    for objective in ("reverse_kl", "forward_kl"):
        loss, outs = full_vocab_scorer(student, teacher, objective, 4, metrics_k=4)(
            ps, None, ps, batch)
        assert float(loss) == pytest.approx(0.0, abs=1e-5)
        m = np.asarray(batch.mask)
        np.testing.assert_allclose(np.asarray(outs["overlap"])[m], 1.0)
        assert set(SUMMARY_KEYS) <= set(outs)
    ct = ModelConfig(n_layers=2, vocab_size=64)
    pt = jax.tree.map(lambda x: 20 * x if x.ndim >= 2 else x, dec.init_params(ct, jax.random.key(1)))
    teacher = TeacherSpec("separate", ct)
    loss, _ = jax.jit(full_vocab_scorer(student, teacher, "reverse_kl", 4))(ps, None, pt, batch)
    ref = score_rollouts(student, teacher, ps, None, pt, batch, "reverse_kl", 4)
    assert float(loss) > 0 and float(loss) == pytest.approx(ref["reverse_kl"], rel=1e-6)


def test_assemble_trims_completion_to_longest_real_bucket():
    """Columns after every row's EOS are dropped (to a length bucket); values are unchanged."""
    B, P, N = 3, 4, 64
    tok = np.arange(B * P, dtype=np.int32).reshape(B, P) + 1
    prompts = rollout.Prompts([{}] * B, tok, np.ones((B, P), bool), tok, np.ones((B, P), bool))
    rng = np.random.default_rng(0)
    completion = rng.integers(1, 50, (B, N)).astype(np.int32)
    lengths = np.array([3, 20, 7])
    mask = np.arange(N)[None, :] < lengths[:, None]
    logp = -rng.random((B, N)).astype(np.float32)
    batch = rollout.assemble(prompts, completion, mask, logp)
    assert batch.completion.shape == (B, 32) and batch.student_tokens.shape == (B, P + 32)
    np.testing.assert_array_equal(np.asarray(batch.completion), completion[:, :32])
    np.testing.assert_array_equal(np.asarray(batch.mask), mask[:, :32])
    np.testing.assert_array_equal(np.asarray(batch.sampler_logprobs), logp[:, :32])
    assert int(np.asarray(batch.mask).sum()) == int(mask.sum())  # no real token dropped
    full = rollout.assemble(prompts, completion, np.ones((B, N), bool), logp)
    assert full.completion.shape == (B, N)  # never longer than what was sampled
