"""Training engine: every objective, step properties, every stage kind, resume after kill -9."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.config import ConfigError, load_config
from opd_jax.config.loss import LossSpec
from opd_jax.config.schema import OptimSpec
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.train import rollout
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.run import run
from opd_jax.train.state import StudentSpec, init_state, make_optimizer
from opd_jax.train.step import TeacherSpec, make_train_step

TINY = "configs/tiny_test.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OBJECTIVES = [
    dict(objective="reverse_kl", top_k=None),
    dict(objective="forward_kl", top_k=4, support="teacher", tail="bucket"),
    dict(objective="generalized_jsd", top_k=None, beta=0.0, pointwise_clip=0.05),
    dict(objective="skew_forward_kl", top_k=None),
    dict(objective="skew_reverse_kl", top_k=4, support="union"),
    dict(objective="topk_reward", top_k=4, support="intersection", weights="teacher_p"),
    dict(objective="sampled_token_rkl", pg_loss="plain", estimator="k3"),
    dict(objective="sampled_token_rkl", pg_loss="importance_sampled"),
    dict(objective="sampled_token_rkl", pg_loss="ppo_clip"),
]


def _models():
    cs, ct = ModelConfig(n_layers=1, vocab_size=64), ModelConfig(n_layers=2, vocab_size=64)
    ps = dec.init_params(cs, jax.random.key(0))
    pt = jax.tree.map(lambda x: 20 * x if x.ndim >= 2 else x, dec.init_params(ct, jax.random.key(1)))
    return cs, ps, ct, pt


def _batch(B=4, P=5, N=6, seed=2):
    toks = jax.random.randint(jax.random.key(seed), (B, P + N), 0, 64)
    valid = jnp.ones((B, P + N), bool).at[0, :2].set(False)
    mask = jnp.ones((B, N), bool).at[1, 3:].set(False)
    return RolloutBatch(toks, valid, toks, valid, toks[:, P:], mask, jnp.full((B, N), -4.0))


def _step(spec, cs, ct, *, accum=1, lr=1e-2):
    opt = make_optimizer(OptimSpec(lr=lr), 10)
    return opt, make_train_step(student=StudentSpec(cs), teacher=TeacherSpec("separate", ct),
                                optimizer=opt, chunk_fn=make_chunk_fn(LossSpec(**spec), metrics_k=4),
                                reduction=losses.token_mean, chunk_size=7, grad_accum=accum)


@pytest.mark.parametrize("spec", OBJECTIVES, ids=lambda s: s["objective"] + s.get("pg_loss", ""))
def test_every_objective_trains_finite_without_recompiling(spec):
    cs, ps, ct, pt = _models()
    opt, step = _step(spec, cs, ct)
    state = init_state(ps, opt, 0)
    batch = _batch()
    for _ in range(3):
        state, m = step(state, batch, None, pt)
        assert np.isfinite(float(m["scalars"]["loss"])) and bool(m["scalars"]["update_ok"])
    assert step._cache_size() == 1
    assert int(state.step) == 3
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.trainable, ps))


def test_reverse_kl_matches_dense_reference_and_decreases():
    cs, ps, ct, pt = _models()
    opt, step = _step(dict(objective="reverse_kl", top_k=None), cs, ct)
    batch = _batch()
    # independent reference: dense logits, numpy float64 reverse KL at the completion positions
    hs, _ = dec.forward(ps, cs, batch.student_tokens, valid_BxT=batch.student_valid)
    ht, _ = dec.forward(pt, ct, batch.teacher_tokens, valid_BxT=batch.teacher_valid)
    P = batch.student_tokens.shape[1] - batch.completion.shape[1]
    ls = np.asarray(dec.logits(ps, cs, hs)[:, P - 1:-1], np.float64)
    lt = np.asarray(dec.logits(pt, ct, ht)[:, P - 1:-1], np.float64)
    logs = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
    logt = lt - np.log(np.exp(lt).sum(-1, keepdims=True))
    kl = (np.exp(logs) * (logs - logt)).sum(-1)
    m = np.asarray(batch.mask)
    ref = (kl * m).sum() / m.sum()
    state = init_state(ps, opt, 0)
    state, metrics = step(state, batch, None, pt)
    np.testing.assert_allclose(float(metrics["scalars"]["loss"]), ref, rtol=1e-4)
    first = float(metrics["scalars"]["loss"])
    for _ in range(5):
        state, metrics = step(state, batch, None, pt)
    assert float(metrics["scalars"]["loss"]) < first


def test_grad_accumulation_equals_full_batch():
    cs, ps, ct, pt = _models()
    spec = dict(objective="forward_kl", top_k=None)
    batch = _batch(B=4)
    batch = batch.replace(mask=jnp.ones_like(batch.mask))  # equal token counts per micro-batch
    out = []
    for accum in (1, 2):
        opt, step = _step(spec, cs, ct, accum=accum, lr=1e-3)
        state, _ = step(init_state(ps, opt, 0), batch, None, pt)
        out.append(state.trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), *out)


def test_non_finite_update_is_skipped_and_counted():
    cs, ps, ct, pt = _models()
    opt, step = _step(dict(objective="reverse_kl", top_k=None), cs, ct)
    state = init_state(ps, opt, 0)
    bad = jax.tree.map(lambda x: x, pt)
    bad["final_norm"] = bad["final_norm"].at[0].set(jnp.nan)
    before = jax.tree.map(np.asarray, state.trainable)
    state, m = step(state, _batch(), None, bad)
    assert not bool(m["scalars"]["update_ok"]) and int(state.skipped) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.trainable))


def test_masked_rows_contribute_nothing():
    cs, ps, ct, pt = _models()
    opt, step = _step(dict(objective="reverse_kl", top_k=None), cs, ct)
    batch = _batch()
    m1 = step(init_state(ps, opt, 0), batch, None, pt)[1]["scalars"]["loss"]
    # change the tokens of a fully masked row: loss must not move
    mask = batch.mask.at[2].set(False)
    a = batch.replace(mask=mask)
    b = a.replace(completion=a.completion.at[2].set(7))
    la = step(init_state(ps, opt, 0), a, None, pt)[1]["scalars"]["loss"]
    lb = step(init_state(ps, opt, 0), b, None, pt)[1]["scalars"]["loss"]
    assert float(la) == float(lb) and float(m1) != float(la)


def _cfg(tmp_path, *overrides):
    return load_config(os.path.join(ROOT, TINY), [f"out_dir={tmp_path}/run", *overrides])


def test_tiny_run_all_stage_kinds(tmp_path, monkeypatch):
    import inspect

    from opd_jax.train import rollout

    sample, eval_teacher_calls = rollout.sample, []

    def counting(*args, from_teacher_prompt=False, **kwargs):
        if from_teacher_prompt and any(f.function == "evaluate_student" for f in inspect.stack()):
            eval_teacher_calls.append(1)
        return sample(*args, from_teacher_prompt=from_teacher_prompt, **kwargs)

    monkeypatch.setattr(rollout, "sample", counting)
    cfg = _cfg(tmp_path)
    summary = run(cfg, progress=False)
    assert set(summary["evals"]) == {"eval_initial", "eval"}
    # the greedy teacher answers the 4 held-out prompts (2 batches) once: the second eval stage
    # reuses its answers, and finds the same teacher accuracy
    assert len(eval_teacher_calls) == 2
    assert (summary["evals"]["eval"]["teacher_accuracy"]
            == summary["evals"]["eval_initial"]["teacher_accuracy"])
    assert summary["stages"]["opd"]["steps"] == 3
    assert "teacher_accuracy" in summary["evals"]["eval"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cold = [r for r in rows if r["stage"] == "cold_start"]
    assert all("filter_kept" in r for r in cold)
    # each record counts the XLA compilations of its step (rollout + update) and their seconds
    # (how many depends on what this process compiled before: see the compile_totals test)
    steps = [r for r in rows if "train_s" in r]
    assert {r["stage"] for r in steps} == {"cold_start", "opd"}
    assert all(isinstance(r["compiles"], int) and r["compiles"] >= 0 for r in steps)
    assert all((r["compile_s"] > 0) == (r["compiles"] > 0) for r in steps)
    evals = [r for r in rows if r["kind"] == "eval"]   # each records its seconds
    assert [r["stage"] for r in evals] == ["eval_initial", "eval"]
    assert all(r["eval_s"] > 0 for r in evals)
    # a second call resumes: nothing is retrained, the summary is the same
    again = run(cfg, progress=False)
    assert again["stages"] == summary["stages"]


@pytest.mark.parametrize("mode", ["fixed", "ema", "live"])
def test_opsd_stage_teacher_modes(tmp_path, mode):
    cfg = _cfg(tmp_path, "data.teacher_template='{problem} (the answer is {answer})'",
               "loss.objective=generalized_jsd", "loss.beta=0.0", "loss.top_k=null",
               "loss.pointwise_clip=0.05",
               f"stages=[{{kind: opsd, steps: 2, batch_prompts: 2, teacher_mode: {mode}}}]")
    summary = run(cfg, progress=False)
    assert summary["stages"]["opsd"]["steps"] == 2


def test_lora_student_and_seq_kd(tmp_path):
    cfg = _cfg(tmp_path, "student.lora.rank=4", "student.lora.alpha=8", "loss.lambda_on_policy=0.5",
               "stages=[{kind: opd, steps: 3, batch_prompts: 2}]")
    run(cfg, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["on_policy"] for r in rows} == {True, False}  # seed 0 draws both kinds


# ``opd-jax`` in a subprocess that dies (SIGKILL, no clean-up) right after the checkpointer's
# ``save`` call at step ``argv[1]``: the fault is injected here by wrapping ``StageCheckpointer.save``,
# the trainer carries no test hook.
KILLED_CLI = """
import os, signal, sys
from opd_jax import checkpoint, cli
after = int(sys.argv[1])
save = checkpoint.StageCheckpointer.save
def save_then_die(self, step, *args, **kwargs):
    out = save(self, step, *args, **kwargs)
    if step == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
checkpoint.StageCheckpointer.save = save_then_die
sys.exit(cli.main(sys.argv[2:]))
"""


def _cli(args, kill_after_step=None):
    head = (["-m", "opd_jax.cli"] if kill_after_step is None else
            ["-c", KILLED_CLI, str(kill_after_step)])
    return subprocess.run([sys.executable, *head, *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          timeout=600)


def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path):
    stages = "stages=[{kind: opd, steps: 5, batch_prompts: 2}]"
    common = [TINY, stages, "checkpoint.every_n_steps=2", "checkpoint.async_save=true",
              "--no-progress"]
    ref = _cli(["train", *common, f"out_dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _cli(["train", *common, f"out_dir={tmp_path}/res"], kill_after_step=3)
    assert killed.returncode == -9
    resumed = _cli(["train", *common, f"out_dir={tmp_path}/res"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    keys = ("step", "loss", "overlap", "token_reverse_kl", "grad_norm", "gen_tokens")
    read = lambda d: [{k: r[k] for k in keys} for r in map(json.loads, (tmp_path / d / "metrics.jsonl")
                                                         .read_text().splitlines())]
    assert read("res") == read("ref")


def test_bad_inputs_fail_early_with_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        _cfg(tmp_path, "optim.lrr=1")
    with pytest.raises(ValueError, match="over max_prompt_len"):
        run(_cfg(tmp_path, "data.max_prompt_len=8"), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="No prompt records left from empty.jsonl"):
        run(_cfg(tmp_path, "data.source=jsonl", f"data.path={empty}", "data.prompt_key=prompt"),
            progress=False)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        from opd_jax.train.models import build_models
        cfg = _cfg(tmp_path)
        import dataclasses
        other = dataclasses.replace(cfg.student, source="random")
        from opd_jax.model.loading import Model
        from opd_jax.train import models as M
        orig = M.load_source
        M.load_source = lambda spec, seed: (orig(spec, seed) if seed == 0 else
                                            Model(ModelConfig(vocab_size=300), {}, None))
        try:
            build_models(cfg.teacher, dataclasses.replace(other, derive=None), seed=0)
        finally:
            M.load_source = orig
    res = _cli(["train", TINY, "stages=[]"])
    assert res.returncode == 2 and "at least one stage" in res.stderr


@pytest.mark.parametrize("spec", [dict(objective="reverse_kl"), dict(objective="topk_reward", top_k=4)])
def test_trimmed_completion_gives_the_same_loss_metrics_and_gradients(spec):
    """``rollout.assemble`` drops completion columns after every row's EOS: the step on the
    trimmed batch equals the step on the full one (those columns are masked everywhere)."""

    cs, ps, ct, pt = _models()
    B, P, N = 4, 5, 40
    key = jax.random.key(3)
    toks = np.asarray(jax.random.randint(key, (B, P + N), 1, 64), np.int32)
    lengths = np.array([5, 12, 1, 9])
    mask = np.arange(N)[None, :] < lengths[:, None]
    logp = np.full((B, N), -4.0, np.float32)
    prompts = rollout.Prompts([{}] * B, toks[:, :P], np.ones((B, P), bool), toks[:, :P],
                              np.ones((B, P), bool))
    trimmed = rollout.assemble(prompts, toks[:, P:], mask, logp)
    assert trimmed.completion.shape[1] == 16
    full = RolloutBatch(jnp.asarray(toks), jnp.concatenate([jnp.ones((B, P), bool), mask], 1),
                        jnp.asarray(toks), jnp.concatenate([jnp.ones((B, P), bool), mask], 1),
                        jnp.asarray(toks[:, P:]), jnp.asarray(mask), jnp.asarray(logp))
    opt, step = _step(spec, cs, ct)
    outs = []
    for batch in (full, trimmed):
        state = init_state(jax.tree.map(jnp.copy, ps), opt, 0)
        new, metrics = step(state, batch, None, pt)
        outs.append((new.trainable, metrics["scalars"]))
    for k in ("loss", "grad_norm", "completion_tokens", "token_reverse_kl"):
        if k in outs[0][1]:
            np.testing.assert_allclose(float(outs[1][1][k]), float(outs[0][1][k]), rtol=2e-5, atol=1e-6)
    # Adam at lr 1e-2 turns float32 rounding of tiny gradients into ~1e-6 parameter differences
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                         atol=1e-5), outs[0][0], outs[1][0])


def test_continuous_batching_run_matches_plain(tmp_path):
    """``sampler.slots`` (fewer decode slots than rows): the same rollouts, so the same training
    run to float32 rounding (log-probs differ only in summation order)."""
    runs = {}
    for name, extra in (("plain", []), ("slots", ["sampler.slots=3"])):
        cfg = _cfg(tmp_path / name, "sampler.n_samples=2",
                   "stages=[{kind: opd, steps: 2, batch_prompts: 2}]", *extra)
        run(cfg, progress=False)
        runs[name] = [json.loads(line) for line in
                      (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
    for a, b in zip(runs["plain"], runs["slots"], strict=True):
        assert a["completion_len"] == b["completion_len"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b["overlap"], a["overlap"], rtol=1e-5, atol=1e-6)


def test_stages_hold_one_copy_of_the_student(tmp_path, monkeypatch):
    """A run that loaded its own student hands each train stage the only reference to the
    previous weights: once the stage's state holds its copy, they are freed (no second copy of
    the student beside the training state; ``make demo``'s peak). A caller's models, and weights
    a teacher shares with the student (``derive``), stay intact."""
    from opd_jax.train import stages
    from opd_jax.train.models import build_models

    seen = []
    original = stages.make_train_step

    def spying_step(**kw):   # counts at each stage's first step, after the stage set up
        step_fn = original(**kw)

        def step(state, *args):
            if state.step == 0:
                big = max(jax.tree.leaves(state.trainable), key=lambda x: x.size)
                seen.append(sum(1 for a in jax.live_arrays()
                                if a.shape == big.shape and a.dtype == big.dtype))
            return step_fn(state, *args)
        return step

    monkeypatch.setattr(stages, "make_train_step", spying_step)
    run(_cfg(tmp_path), progress=False)
    # cold start and opd: the state's params + AdamW's mu and nu (the tiny teacher's embedding
    # has another shape); before: 4 in cold start, 5 in opd
    assert seen == [3, 3]

    seen.clear()
    cfg = _cfg(tmp_path, "out_dir=" + str(tmp_path / "run2"))
    models = build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    run(cfg, progress=False, models=models)
    assert seen == [4, 4]   # the caller's own copy stays alive (and usable) beside each state
    assert not any(x.is_deleted() for x in jax.tree.leaves(models.trainable))


def test_a_student_sharing_the_teachers_arrays_trains_and_the_teacher_survives(tmp_path,
                                                                              monkeypatch):
    """``student.derive: {drop_layers: ...}`` shares arrays with the teacher (the embedding, as
    make demo's student does); releasing the student's starting weights must leave the teacher's
    usable for every later stage (a donated start deleted the teacher's embedding once)."""
    from opd_jax.train import run as run_module
    from opd_jax.train.models import build_models

    def sharing(teacher_spec, student_spec, **kw):
        m = build_models(teacher_spec, student_spec, **kw)
        trainable = {**m.trainable, "embed": m.teacher.params["embed"]}   # one array, two users
        return dataclasses.replace(m, trainable=trainable)

    monkeypatch.setattr(run_module, "build_models", sharing)
    cfg = _cfg(tmp_path, "student.derive.d_model=64", "student.derive.head_dim=16",
               "student.derive.n_heads=4", "student.derive.n_kv_heads=2")
    summary = run(cfg, progress=False)   # cold start, opd, eval: the teacher scores throughout
    assert summary["stages"]["opd"]["steps"] == 3
    assert "teacher_accuracy" in summary["evals"]["eval"]


@pytest.mark.parametrize("can_unregister", [True, False])
def test_compile_totals_count_backend_compilations_not_cache_hits(monkeypatch, can_unregister):
    """``host_memory.compile_totals`` (what each metrics record's ``compiles`` / ``compile_s``
    come from): a program never seen before adds one compilation and its seconds; calling it
    again adds nothing. A new watch counts again after something dropped every listener (tunix's
    metrics logger clears them; in the full suite the counter had gone silent), and several
    watches never count a compilation twice, also on a jax without
    ``unregister_event_duration_listener`` (jax 0.7.0, CI's oldest pins)."""
    from opd_jax.train.host_memory import CompileWatch, compile_totals

    if not can_unregister:
        monkeypatch.delattr(jax.monitoring, "unregister_event_duration_listener", raising=False)
    CompileWatch()
    jax.monitoring.clear_event_listeners()
    CompileWatch(), CompileWatch(), CompileWatch()
    unique = float(np.random.default_rng().integers(1, 2**30))   # no cache can hold this program
    f = jax.jit(lambda x: x * unique + 1.0)
    x = jax.block_until_ready(jnp.ones(3))
    n0, s0 = compile_totals()
    jax.block_until_ready(f(x))
    n1, s1 = compile_totals()
    assert n1 == n0 + 1 and s1 > s0
    jax.block_until_ready(f(x))
    assert compile_totals() == (n1, s1)


def test_kept_heap_releases_around_steps_compiles_and_saves(tmp_path, monkeypatch):
    """With the kept heap (host_memory), a stage hands free pages back once its state exists,
    before every step and after a step that compiled (keeping the heap's top chunk, so a step
    does not re-fault its block), all of them before a synchronous save and at its end (its
    optimizer state freed)."""
    from opd_jax.train import stages

    calls = []

    class FirstCallCompiles:      # each stage's first phase compiles, nothing after it
        def __init__(self):
            self.first = True

        def compiled(self):
            first, self.first = self.first, False
            return first

    monkeypatch.setattr(stages, "keeps_freed_memory", lambda: True)
    monkeypatch.setattr(stages, "CompileWatch", FirstCallCompiles)
    def release(keep_top=False):
        calls.append(keep_top)
        live.append(sum(x.nbytes for x in jax.live_arrays()))
        return True

    live = []
    monkeypatch.setattr(stages, "release_free_memory", release)
    # after a compilation: glibc's form (keep the top; tcmalloc releases all, tests/test_host_memory)
    monkeypatch.setattr(stages, "release_compile_leftovers", lambda: release(keep_top=True))
    run(_cfg(tmp_path), progress=False)
    # cold start (2 steps, a save at step 2) then OPD (3 steps, saves at 2 and 3): per stage a full
    # release once its state exists (the previous stage's weights are gone), one keeping the top
    # before each step and after the step that compiled (the first), a full one before each save
    # and one at the end
    assert calls == ([False, True, True, True, False, False]
                     + [False, True, True, True, False, True, False, False]), calls
    # the end-of-stage release comes after the stage's optimizer state is freed
    assert live[5] < live[4] and live[13] < live[12], live


def test_kept_heap_releases_the_holes_before_every_step(tmp_path, monkeypatch):
    """With the kept heap, each train step is preceded by a release that keeps the heap's top
    (the rollout's host work and compilations leave holes a step's temporaries may not fit),
    placed after the rollout and before the step: exactly one per step, whatever the rows."""
    from opd_jax.train import rollout, stages

    calls, packs = [], []

    class NeverCompiles:
        def compiled(self):
            return False

    pack = rollout.pack_batch
    monkeypatch.setattr(rollout, "pack_batch", lambda batch, **kw: packs.append(1) or pack(batch, **kw))
    monkeypatch.setattr(stages, "keeps_freed_memory", lambda: True)
    monkeypatch.setattr(stages, "CompileWatch", NeverCompiles)
    monkeypatch.setattr(stages, "release_free_memory",
                        lambda keep_top=False: calls.append((len(packs), keep_top)))
    run(_cfg(tmp_path, "stages.2.optim.pack=false"), progress=False)   # only the train steps pack
    # cold start: 2 steps, then OPD: 3; each kept-top release follows that step's packing
    assert [n for n, keep in calls if keep] == [1, 2, 3, 4, 5], calls


def test_adam_first_moment_in_bfloat16_halves_it_and_tracks_float32():
    """``optim.mu_dtype: bfloat16`` stores Adam(W)'s first moment in bfloat16 (optax ``mu_dtype``),
    the second in float32. The first step stores exactly the float32 moment rounded; five steps
    keep the moment within a bfloat16 ulp of the float32 run's scale and the weights within 1% of
    its displacement."""
    import optax

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)} for _ in range(5)]
    spec = OptimSpec(lr=1e-2, weight_decay=0.1, grad_clip_norm=None)
    runs = {}
    for dtype in (None, "bfloat16"):
        opt = make_optimizer(dataclasses.replace(spec, mu_dtype=dtype), 10)
        p, s = params, opt.init(params)
        mus = []
        for g in grads:
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            mus.append(s[0].mu["w"])
        runs[dtype] = (p, s, mus)
    (p32, _, mu32), (p16, s16, mu16) = runs[None], runs["bfloat16"]
    assert mu16[0].dtype == jnp.bfloat16 and s16[0].nu["w"].dtype == jnp.float32
    assert mu32[0].dtype == jnp.float32 and mu16[0].nbytes * 2 == mu32[0].nbytes
    np.testing.assert_array_equal(np.asarray(mu16[0]), np.asarray(mu32[0].astype(jnp.bfloat16)))
    scale = float(np.abs(np.asarray(mu32[-1])).max())
    assert float(np.abs(np.asarray(mu16[-1], np.float32) - np.asarray(mu32[-1])).max()) \
        <= 2.0 ** -7 * scale
    moved = np.abs(np.asarray(p32["w"] - params["w"])).mean()
    gap = np.abs(np.asarray(p16["w"] - p32["w"])).mean()
    assert gap < 0.01 * moved, (gap, moved)


def test_mu_dtype_is_refused_for_sgd():
    with pytest.raises(ConfigError, match="mu_dtype"):
        load_config(os.path.join(ROOT, TINY), ["optim.optimizer=sgd", "optim.mu_dtype=bfloat16"])


@pytest.mark.parametrize("scheduler", ["memory", "concurrency"])
def test_stage_compiles_its_step_with_the_configured_cpu_scheduler(tmp_path, monkeypatch, scheduler):
    """``optim.cpu_scheduler`` reaches the train step's ``jax.jit`` (its compiler options), and
    the run trains the same either way (the scheduler orders instructions, not the math)."""
    from opd_jax.compile_options import cpu_scheduler_options
    from opd_jax.train import stages

    seen = []

    def recording(**kwargs):
        seen.append(kwargs.get("compiler_options"))
        return make_step(**kwargs)

    make_step = stages.make_train_step
    monkeypatch.setattr(stages, "make_train_step", recording)
    cfg = _cfg(tmp_path, f"optim.cpu_scheduler={scheduler}",
               "stages=[{kind: opd, steps: 2, batch_prompts: 2}]")
    summary = run(cfg, progress=False)
    assert summary["stages"]["opd"]["steps"] == 2
    assert seen == [dict(cpu_scheduler_options(scheduler)) or None]
