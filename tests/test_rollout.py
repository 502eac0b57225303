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


class _Counting:
    """A sampler wrapper counting its calls."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.sampler(*args, **kwargs)


def _tiny_run(return_hidden: bool = False):
    from opd_jax.train.models import build_models
    from opd_jax.train.run import make_template
    from opd_jax.train.stage_context import make_sampler

    cfg = load_config(TINY, ["sampler.max_new_tokens=6"])
    m = build_models(cfg.teacher, cfg.student, seed=0)
    # prompts of unequal lengths (byte tokenizer): packing puts a short and a long one together
    recs = [make_record(f"p{i}", "Add. " * (1 + 40 * (i % 2)) + f"{i} + {i + 3}?", source="t",
                        answer=2 * i + 3) for i in range(4)]
    samplers = (make_sampler(m.student.config, cfg.sampler, m.tokenizer, greedy=True,
                             return_hidden=return_hidden),
                make_sampler(m.teacher.config, cfg.sampler, m.tokenizer, greedy=True,
                             return_hidden=return_hidden))
    return m, make_template(cfg), recs, samplers


def test_teacher_memo_hands_back_the_teachers_answers_without_sampling_again():
    m, template, recs, (s_sampler, t_sampler) = _tiny_run()
    tok, t_counting = m.tokenizer, _Counting(t_sampler)
    s_params, s_lora = m.student.params_and_lora(m.trainable, m.frozen)
    call = lambda recs_, memo, key: rollout.sample_student_and_teacher(
        recs_, tok, template, max_prompt_len=320, n_samples=1, key=jax.random.key(key),
        student_sampler=s_sampler, student_params=s_params, student_lora=s_lora,
        teacher_sampler=t_counting, teacher_params=m.teacher.params, pad_id=pad_id_of(tok),
        teacher_memo=memo)
    memo: dict = {}
    first = call(recs[:2], memo, 0)
    assert t_counting.calls == 1 and len(memo) == 1
    again = call(recs[:2], memo, 5)   # another key: a greedy teacher answers the same
    assert t_counting.calls == 1 and again.teacher_texts == first.teacher_texts
    fresh = call(recs[:2], None, 5)   # sampling again, without the memo
    assert t_counting.calls == 2
    _same(again.teacher, fresh.teacher)   # the kept answers (on the host) equal a new sample
    assert fresh.teacher_texts == first.teacher_texts
    call(recs[2:], memo, 0)   # other prompts: sampled and kept
    assert t_counting.calls == 3 and len(memo) == 2


def test_packed_evaluation_matches_padded_rows():
    """The eval scorer on packed rows gives the padded rows' figures (float32 rounding)."""
    import functools

    from opd_jax.train.evaluate import EvalModels, EvalSettings, evaluate_student
    from opd_jax.train.packing import ShapeMemory

    m, template, recs, (s_sampler, t_sampler) = _tiny_run()
    teacher = TeacherSpec("separate", m.teacher.config)
    models = EvalModels(m.student, teacher, m.frozen, m.teacher.params, s_sampler, t_sampler,
                        teacher_params=m.teacher.params)
    pack = functools.partial(rollout.pack_batch, groups=1, student_config=m.student.config,
                             teacher_config=m.teacher.config,
                             shapes=(ShapeMemory(), ShapeMemory()))
    packed_rows = []

    def packing(batch):
        out = pack(batch)
        packed_rows.append(out.student_packed.tokens.shape[1] < batch.student_tokens.shape[0])
        return out

    settings = dict(tokenizer=m.tokenizer, template=template, max_prompt_len=320,
                    batch_prompts=4, chunk_size=8, pad_id=pad_id_of(m.tokenizer))
    key = jax.random.key(1)
    padded = evaluate_student(recs, m.trainable, key, EvalSettings(**settings), models)
    packed = evaluate_student(recs, m.trainable, key, EvalSettings(**settings, pack=packing),
                              models)
    # one batch of four; the student's and the teacher's samples each fit in fewer rows
    assert packed_rows == [True, True]
    assert padded["samples"] == packed["samples"]
    for k, v in padded.items():
        if isinstance(v, float):
            assert packed[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert padded["onpolicy_reverse_kl"] > 0 and padded["teacher_samples_forward_kl"] > 0


def test_eval_packer_groups_by_shard_when_rows_split_and_follows_the_stage():
    """The eval stage's packing: one group per data-parallel shard when the rows split over
    them, else one group; off with ``optim.pack: false``; the run's sticky shapes take the
    stage's ``pack_reuse``."""
    from opd_jax.train.eval_stage import eval_packer
    from opd_jax.train.run import make_template
    from opd_jax.train.stage_context import RunContext

    cfg = load_config(TINY, ["stages.2.optim.pack_reuse=0.5"])
    m, template, recs, (s_sampler, _) = _tiny_run()
    ctx = RunContext(cfg, m, [], recs, make_template(cfg), log=None)
    stage = cfg.resolve_stage(2)
    two_shards = types.SimpleNamespace(batch_shards=2)
    pack = eval_packer(ctx, stage, two_shards)
    assert [s.reuse for s in ctx.eval_packed_shapes] == [0.5, 0.5]
    s_params, s_lora = m.student.params_and_lora(m.trainable, m.frozen)
    for rows, groups in ((4, 2), (3, 1)):
        batch = rollout.sample_student_and_teacher(
            recs[:rows], m.tokenizer, template, max_prompt_len=320, n_samples=1,
            key=jax.random.key(0), student_sampler=s_sampler, student_params=s_params,
            student_lora=s_lora, pad_id=pad_id_of(m.tokenizer)).student
        packed = pack(batch)
        assert packed.student_packed.tokens.shape[0] == groups
        assert packed.teacher_packed is packed.student_packed   # the teacher sees the same rows
        assert int(np.asarray(packed.student_packed.valid).sum()) == int(
            np.asarray(batch.student_valid).sum())   # every real token packed once
    off = load_config(TINY, ["stages.2.optim.pack=false"])
    assert eval_packer(ctx, off.resolve_stage(2), two_shards) is None


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_evaluation_reuses_the_samplers_hidden_states(packed, monkeypatch):
    """Samplers that record their hidden states give the scorer each model's states on its own
    samples (no forward of that model); the figures equal a scorer that runs both forwards, and
    the teacher's memoised answers keep theirs within ``MEMO_HIDDEN_BYTES``."""
    import functools

    from opd_jax.train.evaluate import EvalModels, EvalSettings, evaluate_student
    from opd_jax.train.packing import ShapeMemory

    teacher_spec = None
    results = {}
    for hidden in (False, True, "memo over budget"):
        m, template, recs, (s_sampler, t_sampler) = _tiny_run(return_hidden=bool(hidden))
        teacher_spec = TeacherSpec("separate", m.teacher.config)
        if hidden == "memo over budget":
            monkeypatch.setattr(rollout, "MEMO_HIDDEN_BYTES", 0)
        memo: dict = {}
        models = EvalModels(m.student, teacher_spec, m.frozen, m.teacher.params, s_sampler,
                            t_sampler, teacher_params=m.teacher.params, teacher_memo=memo)
        pack = None if not packed else functools.partial(
            rollout.pack_batch, groups=1, student_config=m.student.config,
            teacher_config=m.teacher.config, shapes=(ShapeMemory(), ShapeMemory()))
        settings = EvalSettings(m.tokenizer, template, 320, batch_prompts=2, chunk_size=8,
                                pad_id=pad_id_of(m.tokenizer), pack=pack)
        first = evaluate_student(recs, m.trainable, jax.random.key(1), settings, models)
        kept = [v[2] for v in memo.values()]
        assert len(kept) == 2
        if hidden is True:   # [B, N, D] host arrays, the completion's columns
            assert all(isinstance(h, np.ndarray) and h.shape[0] == 2 for h in kept)
        else:
            assert kept == [None, None]
        again = evaluate_student(recs, m.trainable, jax.random.key(1), settings, models)  # memo
        if hidden != "memo over budget":
            assert again == first
        results[hidden], results[(hidden, "again")] = first, again
    ref = results[False]
    for hidden in (True, "memo over budget", ("memo over budget", "again")):
        assert results[hidden]["samples"] == ref["samples"]
        for k, v in ref.items():
            if isinstance(v, float):
                assert results[hidden][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (hidden, k)
    assert ref["onpolicy_reverse_kl"] > 0 and ref["teacher_samples_forward_kl"] > 0


def test_scorer_skips_the_forward_of_a_model_whose_hidden_states_are_given(monkeypatch):
    """``loss_and_metrics(student_hidden=, teacher_hidden=)`` runs no forward of that model
    (counted while tracing) and scores with the given states."""
    from opd_jax.model import decoder
    from opd_jax.train.evaluate import full_vocab_scorer

    m, template, recs, (s_sampler, t_sampler) = _tiny_run(return_hidden=True)
    s_params, s_lora = m.student.params_and_lora(m.trainable, m.frozen)
    ro = rollout.sample_student_and_teacher(
        recs, m.tokenizer, template, max_prompt_len=320, n_samples=1, key=jax.random.key(0),
        student_sampler=s_sampler, student_params=s_params, student_lora=s_lora,
        teacher_sampler=t_sampler, teacher_params=m.teacher.params, pad_id=pad_id_of(m.tokenizer))
    assert ro.student_hidden.shape == ro.student.completion.shape + (m.student.config.d_model,)
    assert ro.teacher_hidden.shape == ro.teacher.completion.shape + (m.teacher.config.d_model,)
    forwards = []
    real_forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: forwards.append(1) or
                        real_forward(*a, **k))
    teacher = TeacherSpec("separate", m.teacher.config)
    args = (m.trainable, m.frozen, m.teacher.params)
    figures = {}
    for name, batch, kw in (("rkl", ro.student, {}),
                            ("rkl_hidden", ro.student, dict(student_hidden=ro.student_hidden)),
                            ("fkl", ro.teacher, {}),
                            ("fkl_hidden", ro.teacher, dict(teacher_hidden=ro.teacher_hidden))):
        objective = "reverse_kl" if name.startswith("rkl") else "forward_kl"
        forwards.clear()
        fn = jax.jit(full_vocab_scorer(m.student, teacher, objective, 8))
        loss, outs = fn(*args, batch, **kw)
        figures[name] = (float(loss), np.asarray(outs["overlap"]))
        assert len(forwards) == (1 if kw else 2), (name, len(forwards))
    for name in ("rkl", "fkl"):
        assert figures[name + "_hidden"][0] == pytest.approx(figures[name][0], rel=1e-5)
        np.testing.assert_allclose(figures[name + "_hidden"][1], figures[name][1], atol=1e-5)
