"""Long responses in the trainer: remat and blocked attention from the run config.

* a train step with ``remat="full"`` gives the loss and gradients of ``remat="none"`` and compiles
  to less temporary memory;
* ``student.remat`` / ``student.attention`` / ``teacher.attention`` are validated config fields
  that reach the decoder (the Qwen3 recipes set them);
* a tiny end-to-end run with blocked attention and full remat gives the per-step losses of the
  default (dense, no remat) run.
"""

import json

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
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.models import build_models
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.state import StudentSpec, init_state, make_optimizer
from opd_jax.train.step import TeacherSpec, make_train_step

TINY = "configs/tiny_test.yaml"


def _setup(cs, ct, B, P, N):
    ps, pt = dec.init_params(cs, jax.random.key(0)), dec.init_params(ct, jax.random.key(1))
    toks = jax.random.randint(jax.random.key(2), (B, P + N), 0, cs.vocab_size)
    valid = jnp.ones((B, P + N), bool).at[0, :5].set(False)          # a left-padded row
    mask = jnp.ones((B, N), bool).at[1, N // 2:].set(False)
    batch = RolloutBatch(toks, valid, toks, valid, toks[:, P:], mask, jnp.full((B, N), -4.0))
    return ps, pt, batch


def _step(cs, ct, remat, attention="dense"):
    cs = cs.replace(attention=attention)
    # SGD with lr 1 and no clipping: the update is exactly minus the gradient
    opt = make_optimizer(OptimSpec(optimizer="sgd", lr=1.0, b1=0.0, grad_clip_norm=None), 10)
    step = make_train_step(student=StudentSpec(cs, remat=remat),
                           teacher=TeacherSpec("separate", ct.replace(attention=attention)),
                           optimizer=opt, chunk_fn=make_chunk_fn(LossSpec(objective="reverse_kl",
                                                                          top_k=None)),
                           reduction=losses.token_mean, chunk_size=64)
    return opt, step


def test_remat_full_step_matches_none_and_needs_less_temp_memory():
    cs = ModelConfig(vocab_size=128, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=32, ffn_dim=512)
    ct = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                     head_dim=32, ffn_dim=128)
    ps, pt, batch = _setup(cs, ct, B=2, P=32, N=224)
    results = {}
    for remat in ("none", "full"):
        opt, step = _step(cs, ct, remat)
        state = init_state(ps, opt, 0)
        temp = step.lower(state, batch, None, pt).compile().memory_analysis().temp_size_in_bytes
        new, m = step(state, batch, None, pt)
        grads = jax.tree.map(lambda a, b: a - b, ps, new.trainable)  # = gradient (SGD, lr 1)
        results[remat] = (float(m["scalars"]["loss"]), grads, temp)
    (l0, g0, t0), (l1, g1, t1) = results["none"], results["full"]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)) > 0
    # remat keeps each layer's input instead of its attention probabilities / MLP activations
    assert t1 < 0.6 * t0, (t1, t0)


def test_blocked_attention_step_matches_dense_step():
    cs = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     ffn_dim=128, attention_block=16)
    ct = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     ffn_dim=128, attention_block=16)
    ps, pt, batch = _setup(cs, ct, B=2, P=20, N=37)
    out = {}
    for attention in ("dense", "blocked"):
        opt, step = _step(cs, ct, "full", attention)
        new, m = step(init_state(ps, opt, 0), batch, None, pt)
        out[attention] = (float(m["scalars"]["loss"]), jax.tree.map(lambda a, b: a - b, ps,
                                                                    new.trainable))
    np.testing.assert_allclose(out["blocked"][0], out["dense"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["blocked"][1]), jax.tree.leaves(out["dense"][1])):
        scale = float(jnp.max(jnp.abs(b)))
        # params - new params resolves a gradient to ~1e-9 (ulps of weights ~0.02): atol floor
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-4 * scale + 1e-8)


# --- config ------------------------------------------------------------------------------------


def test_attention_and_remat_config_fields_reach_the_models():
    cfg = load_config(TINY, ["student.remat=full", "student.attention=blocked",
                             "student.attention_block=8", "teacher.attention=blocked"])
    m = build_models(cfg.teacher, cfg.student, seed=0)
    assert m.student.remat == "full"
    assert (m.student.config.attention, m.student.config.attention_block) == ("blocked", 8)
    assert (m.teacher.config.attention, m.teacher.config.attention_block) == ("blocked", 512)
    default = build_models(*(lambda c: (c.teacher, c.student))(load_config(TINY)), seed=0)
    assert default.student.remat == "none" and default.student.config.attention == "dense"
    assert default.teacher.config.attention == "dense"


@pytest.mark.parametrize("override,pattern", [
    ("student.remat=everything", r"student\.remat=.*choose one of: 'none', 'full', 'dots', "
                                 r"'dots_no_batch'"),
    ("student.attention=flash", r"student\.attention=.*choose one of: 'dense', 'blocked'"),
    ("teacher.attention_block=0", r"teacher\.attention_block=0 is invalid: an integer >= 1"),
    ("teacher.remat=full", r"teacher\.remat='full' is invalid: \"none\": the teacher runs no "
                           r"backward pass"),
])
def test_bad_attention_and_remat_settings_fail_clearly(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, [override])


@pytest.mark.parametrize("path", ["configs/qwen3_1p7b_opd.yaml", "configs/qwen3_opsd.yaml"])
def test_qwen3_recipes_use_blocked_attention_and_full_remat(path):
    cfg = load_config(path)
    assert cfg.student.attention == "blocked" and cfg.student.remat == "full"
    assert cfg.student.attention_block == 512
    if cfg.name == "qwen3_1p7b_opd":
        assert cfg.teacher.attention == "blocked"


@pytest.mark.slow
def test_tiny_run_with_blocked_attention_and_remat_matches_default(tmp_path):
    from opd_jax.train.run import run

    stages = "stages=[{kind: opd, steps: 2, batch_prompts: 2}]"
    losses_ = {}
    for name, extra in [("default", []),
                        ("long", ["student.remat=full", "student.attention=blocked",
                                  "student.attention_block=16", "teacher.attention=blocked",
                                  "teacher.attention_block=16"])]:
        cfg = load_config(TINY, [f"out_dir={tmp_path}/{name}", stages] + extra)
        run(cfg, progress=False)
        rows = [json.loads(l) for l in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses_[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses_["default"]) == 2
    np.testing.assert_allclose(losses_["long"], losses_["default"], rtol=1e-4)
