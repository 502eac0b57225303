"""opd_jax.integrations.tunix: the strategy's loss, the Qwen3 converters, the hidden-state forward.

The pure-JAX parts (label handling, ``distillation_loss``, the missing-extra error) run everywhere;
everything touching tunix needs ``pip install "opd_jax[tunix]"`` and is skipped without it, unless
``OPD_JAX_REQUIRE_TUNIX=1`` (set by ``make test``, which installs tunix): then a missing or broken
tunix is an error, so CI cannot pass by skipping.

tunix 0.1.7's Qwen3 attention ignores ``config.rope_theta`` (always 1e6), so the tiny models here
use ``rope_theta=1_000_000`` and the converter's default ``rope_theta="tunix"``.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.integrations import tunix as integ

B, T, V = 2, 6, 40


@pytest.fixture(scope="module")
def tunix():
    if os.environ.get("OPD_JAX_REQUIRE_TUNIX") == "1":
        return importlib.import_module("tunix.distillation")   # fail, not skip
    return pytest.importorskip("tunix.distillation")


def _logits(seed, shape=(B, T, V), scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _mask():
    m = np.ones((B, T), bool)
    m[0, 4:] = False
    m[1, 0] = False
    return jnp.asarray(m)


def _tokens(seed=3):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(B, T)), jnp.int32)


# ----------------------------------------------------------------------------------------------
# pure JAX
# ----------------------------------------------------------------------------------------------


def test_missing_tunix_names_the_extra(monkeypatch):
    # hide tunix even where it is installed (a None entry in sys.modules makes the import fail)
    for name in ("tunix", "tunix.distillation", "tunix.distillation.strategies"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'opd_jax\[tunix\].*google-tunix==0\.1\.7'):
        integ.require_tunix("tunix.distillation.strategies")
    with pytest.raises(AttributeError):
        integ.NoSuchThing  # noqa: B018


def test_imports_without_tunix_and_strategy_names_the_extra():
    # a fresh interpreter with tunix hidden: the module imports, its pure-JAX part works and
    # constructing OPDStrategy raises the ImportError naming the extra
    code = textwrap.dedent("""
        import sys
        for name in ("tunix", "tunix.distillation", "tunix.distillation.strategies"):
            sys.modules[name] = None
        import jax.numpy as jnp
        from opd_jax.integrations.tunix import TUNIX_MISSING, OPDStrategy, labels_to_tokens
        assert TUNIX_MISSING
        tokens, mask = labels_to_tokens(jnp.array([[1, -1]]))
        assert tokens.tolist() == [[1, 0]] and mask.tolist() == [[True, False]]
        try:
            OPDStrategy(None, None, None)
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"ImportError:.*opd_jax\[tunix\].*google-tunix==0\.1\.7", out.stdout), out.stdout


def test_strategy_subclasses_tunix_base(tunix):
    from tunix.distillation import strategies

    assert not integ.TUNIX_MISSING
    assert issubclass(integ.OPDStrategy, strategies.BaseStrategy)


def test_labels_one_hot_and_ids_agree():
    tokens, mask = _tokens(), _mask()
    one_hot = jax.nn.one_hot(tokens, V) * mask[..., None]
    ids = jnp.where(mask, tokens, -1)
    for labels in (one_hot, ids):
        t, m = integ.labels_to_tokens(labels)
        np.testing.assert_array_equal(m, mask)
        np.testing.assert_array_equal(t, jnp.where(mask, tokens, 0))
    with pytest.raises(ValueError, match="one-hot"):
        integ.labels_to_tokens(jnp.zeros((B, T)))


def test_next_token_labels_shift_and_mask():
    tokens = jnp.arange(12).reshape(2, 6)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    labels = integ.next_token_labels(tokens, mask)
    np.testing.assert_array_equal(labels, [[1, 2, 3, -1, -1], [7, 8, 9, 10, 11]])


@pytest.mark.parametrize("objective,kwargs,reference", [
    ("reverse_kl", {}, losses.reverse_kl),
    ("forward_kl", {"temperature": 1.5}, functools.partial(losses.forward_kl, temperature=1.5)),
    ("generalized_jsd", {"beta": 0.3}, functools.partial(losses.generalized_jsd, beta=0.3)),
    ("skew_reverse_kl", {"skew_alpha": 0.2},
     functools.partial(losses.skew_reverse_kl, alpha=0.2)),
    ("reverse_kl", {"top_k": 4, "support": "union", "tail": "bucket"},
     functools.partial(losses.topk_divergence, k=4, support="union", tail="bucket")),
])
def test_distillation_loss_equals_opd_jax_losses(objective, kwargs, reference):
    s, t, mask, tokens = _logits(0), _logits(1), _mask(), _tokens()
    spec = integ.make_loss_spec(objective, **kwargs)
    loss, metrics = integ.distillation_loss(s, t, jnp.where(mask, tokens, -1), spec=spec)
    want = losses.token_mean(reference(s, t, where=mask), mask)
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-7)
    assert {"distill/loss", "distill/overlap", "distill/student_shared_mass",
            "distill/teacher_entropy"} <= set(metrics)
    assert "distill/logprob_gap" not in metrics  # needs sampler log-probs tunix does not have


def test_topk_reward_and_task_mix():
    s, t, mask, tokens = _logits(0), _logits(1), _mask(), _tokens()
    spec = integ.make_loss_spec("topk_reward", top_k=4)
    loss, _ = integ.distillation_loss(s, t, jnp.where(mask, tokens, -1), spec=spec, alpha=0.25)
    reward = losses.topk_reward(s, t, k=4, support="student", weights="student_p", where=mask)
    pg = losses.token_mean(losses.topk_policy_gradient_loss(s, reward, where=mask), mask)
    ce = -losses.token_mean(losses.token_logprobs(s, tokens, where=mask), mask)
    np.testing.assert_allclose(loss, 0.25 * pg + 0.75 * ce, rtol=1e-6)


def test_chunked_path_equals_dense_values_and_gradients():
    rng = np.random.default_rng(7)
    hs = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(8, V)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(B, T, 12)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(12, V)), jnp.float32)
    labels = jnp.where(_mask(), _tokens(), -1)
    spec = integ.make_loss_spec("generalized_jsd", beta=0.5, chunk_size=5)

    def dense(hs, ws):
        return integ.distillation_loss(hs @ ws, ht @ wt, labels, spec=spec, alpha=0.5)[0]

    def chunked(hs, ws):
        return integ.distillation_loss(integ.HiddenAndUnembed(hs, ws),
                                       integ.HiddenAndUnembed(ht, wt), labels, spec=spec,
                                       alpha=0.5)[0]

    (ld, gd), (lc, gc) = (jax.value_and_grad(f, argnums=(0, 1))(hs, ws) for f in (dense, chunked))
    np.testing.assert_allclose(lc, ld, rtol=1e-5)
    for a, b in zip(gc, gd):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_spec_and_argument_errors():
    with pytest.raises(ValueError, match="old_logprobs"):
        integ.make_loss_spec("sampled_token_rkl", pg_loss="ppo_clip", old_logprobs="sampler")
    # the learner's own old log-probs need nothing from the batch
    assert integ.make_loss_spec("sampled_token_rkl", pg_loss="ppo_clip").resolved_clip == (
        0.2, 0.2, 3.0)
    with pytest.raises(ValueError, match="pg_loss"):
        integ.make_loss_spec("reverse_kl", pg_loss="ppo_clip")
    with pytest.raises(ValueError, match="top_k"):
        integ.make_loss_spec("topk_reward")
    s = _logits(0)
    with pytest.raises(ValueError, match="same kind"):
        integ.distillation_loss(s, integ.HiddenAndUnembed(s, s[0]), _tokens(),
                                spec=integ.make_loss_spec())
    with pytest.raises(ValueError, match="alpha"):
        integ.distillation_loss(s, s, _tokens(), spec=integ.make_loss_spec(), alpha=1.5)


# ----------------------------------------------------------------------------------------------
# with tunix
# ----------------------------------------------------------------------------------------------


def _tiny_qwen3(tied: bool, seed: int = 0, num_layers: int = 2):
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3

    cfg = qwen3.ModelConfig(num_layers=num_layers, vocab_size=V, embed_dim=32, hidden_dim=48,
                            num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=1_000_000,
                            norm_eps=1e-6, use_tied_embedding=tied)
    model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(seed))
    # tunix zero-initialises the MLP kernels and sets norms to 1: randomise everything.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    new = [(1.0 + 0.1 * jax.random.normal(k, x.shape)) if x.ndim == 1 else
           0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def _inputs(left_pad: int = 0):
    tokens = _tokens(11)
    mask = np.ones((B, T), bool)
    mask[1, :left_pad] = False
    return tokens, jnp.asarray(mask)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_converter_logits_equal_tunix(tunix, tied):
    model = _tiny_qwen3(tied)
    tokens, mask = _inputs()
    want = integ.forward_logits(model, tokens, mask)                     # tunix's own logits
    converted = integ.from_tunix_qwen3(model)
    assert converted.config.rope_theta == integ.TUNIX_ROPE_THETA
    assert converted.config.tie_embeddings == tied
    got = converted.logits(tokens)[:, :-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the hidden-state forward gives the same logits without building them in the model
    out = integ.forward_hidden(model, tokens, mask)
    np.testing.assert_allclose(out.hidden @ out.unembed, want, rtol=1e-4, atol=1e-4)


def test_qwen3_converter_left_padding_matches_tunix(tunix):
    model = _tiny_qwen3(False, seed=1)
    tokens, mask = _inputs(left_pad=2)
    want = integ.forward_logits(model, tokens, mask)
    got = integ.from_tunix_qwen3(model).logits(tokens, mask)[:, :-1]
    valid = np.asarray(mask[:, :-1])
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid],
                               rtol=1e-4, atol=1e-4)


def test_qwen3_round_trip_to_tunix(tunix):
    model = _tiny_qwen3(False, seed=2)
    converted = integ.from_tunix_qwen3(model)
    back = integ.to_tunix_qwen3(converted.config, converted.params)
    again = integ.from_tunix_qwen3(back)
    jax.tree.map(np.testing.assert_array_equal, again.params, converted.params)
    tokens, mask = _inputs()
    np.testing.assert_allclose(integ.forward_logits(back, tokens, mask),
                               integ.forward_logits(model, tokens, mask), rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="rope_theta"):
        integ.to_tunix_qwen3(converted.config.replace(rope_theta=1e4), converted.params)


def test_qwen3_rope_theta_options(tunix):
    model = _tiny_qwen3(False)
    assert integ.from_tunix_qwen3(model, rope_theta="config").config.rope_theta == 1e6
    assert integ.from_tunix_qwen3(model, rope_theta=5e6).config.rope_theta == 5e6
    with pytest.raises(ValueError, match="rope_theta"):
        integ.from_tunix_qwen3(model, rope_theta="hf")


def test_strategy_loss_equals_opd_jax_losses(tunix):
    from tunix.distillation import strategies

    student, teacher = _tiny_qwen3(False, seed=3), _tiny_qwen3(False, seed=4)
    tokens, mask = _inputs()
    inputs = {"input_tokens": tokens, "input_mask": mask}
    s_logits = integ.forward_logits(student, tokens, mask)
    t_logits = integ.forward_logits(teacher, tokens, mask)
    valid = mask[:, 1:]

    strategy = integ.OPDStrategy(integ.forward_logits, integ.forward_logits,
                                 integ.next_token_labels, "generalized_jsd", beta=0.3)
    assert isinstance(strategy, strategies.BaseStrategy)
    t_out = strategy.get_teacher_outputs(teacher, inputs)
    loss, metrics = strategy.get_train_loss(student, t_out, inputs)
    want = losses.token_mean(losses.generalized_jsd(s_logits, t_logits, 0.3, where=valid), valid)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert 0.0 <= float(metrics["distill/overlap"]) <= 1.0

    # same loss from hidden states (chunked), with tunix's one-hot labels
    def one_hot_labels(input_tokens, input_mask, **_):
        return jax.nn.one_hot(input_tokens[:, 1:], V) * input_mask[:, 1:, None]

    chunked = integ.OPDStrategy(integ.forward_hidden, integ.forward_hidden, one_hot_labels,
                                "generalized_jsd", beta=0.3, chunk_size=4)
    loss_c, _ = chunked.get_train_loss(student, chunked.get_teacher_outputs(teacher, inputs),
                                       inputs)
    np.testing.assert_allclose(loss_c, want, rtol=1e-5)

    # forward KL at T=1 with alpha=1 is tunix LogitStrategy's KL term (no mask: all valid)
    logit = strategies.LogitStrategy(integ.forward_logits, integ.forward_logits, one_hot_labels,
                                     temperature=1.0, alpha=1.0)
    fkl = integ.OPDStrategy(integ.forward_logits, integ.forward_logits, one_hot_labels,
                            "forward_kl")
    ours, _ = fkl.compute_loss(s_logits, t_logits, one_hot_labels(tokens, mask))
    theirs, _ = logit.compute_loss(s_logits, t_logits, one_hot_labels(tokens, mask))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)

    eval_loss, _ = strategy.get_eval_loss(student, inputs)
    ce = -losses.token_mean(losses.token_logprobs(s_logits, tokens[:, 1:], where=valid), valid)
    np.testing.assert_allclose(eval_loss, ce, rtol=1e-5)


def test_distillation_trainer_runs_with_opd_strategy(tunix, tmp_path):
    import optax
    from tunix.distillation import distillation_trainer as dt

    student, teacher = _tiny_qwen3(False, seed=5, num_layers=1), _tiny_qwen3(False, seed=6)
    strategy = integ.OPDStrategy(integ.forward_hidden, integ.forward_hidden,
                                 integ.next_token_labels, "reverse_kl", top_k=8,
                                 support="union", tail="bucket", chunk_size=8)
    before = integ.distillation_loss(
        integ.forward_hidden(student, *_inputs()), integ.forward_hidden(teacher, *_inputs()),
        integ.next_token_labels(*_inputs()), spec=strategy.spec)[0]
    trainer = dt.DistillationTrainer(student, teacher, strategy, optax.adam(1e-2),
                                     dt.TrainingConfig(eval_every_n_steps=100, max_steps=6))
    tokens, mask = _inputs()
    batch = dt.TrainingInput(input_tokens=tokens, input_mask=mask.astype(jnp.int32))
    trainer.train([batch] * 6)
    trainer.close()
    after = integ.distillation_loss(
        integ.forward_hidden(trainer.model, *_inputs()), integ.forward_hidden(teacher, *_inputs()),
        integ.next_token_labels(*_inputs()), spec=strategy.spec)[0]
    assert float(after) < float(before)
