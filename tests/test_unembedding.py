"""A tied model's ``[V, D]`` table as the chunked losses' unembedding (``TiedUnembedding``): the
same values and gradients as handing them ``E.T``, and no transposed copy in the compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.config.loss import LossSpec
from opd_jax.losses import chunk_layout as layout
from opd_jax.losses.chunk_map import chunked_student_logits_map
from opd_jax.losses.chunked_divergences import chunked_divergence, chunked_divergence_loss
from opd_jax.losses.chunked_scoring import chunked_teacher_topk, chunked_token_logprobs
from opd_jax.losses.divergences import DIVERGENCES
from opd_jax.losses.unembedding import TiedUnembedding
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.model.decoder import loss_unembedding
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec, loss_and_metrics

B, T, D, DT, V = 2, 11, 8, 6, 40


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    hs, ht = f32(B, T, D), f32(B, T, DT)
    es, et = 1.5 * f32(V, D) / np.sqrt(D), 1.5 * f32(V, DT) / np.sqrt(DT)
    where = jnp.asarray(rng.random((B, T)) < 0.75)
    return hs, es, ht, et, where, f32(B, T)


def test_tied_unembedding_reads_as_d_by_v():
    e = jnp.zeros((V, D), jnp.bfloat16)
    u = TiedUnembedding(e)
    assert u.shape == (D, V) and u.ndim == 2 and u.dtype == jnp.bfloat16
    assert jax.tree.leaves(u) == [e]
    with pytest.raises(ValueError, match="does not match unembed rows"):
        chunked_token_logprobs(jnp.zeros((1, 2, D + 1)), u, jnp.zeros((1, 2), jnp.int32),
                               chunk_size=2)


@pytest.mark.parametrize("blocks", [1, 5])
def test_every_path_matches_the_transposed_table(monkeypatch, blocks):
    """Dense and sparse heads, both drivers, the metrics map: values equal, dL/dE = (dL/dW)^T."""
    monkeypatch.setattr(layout, "VOCAB_BLOCK", V // blocks)
    hs, es, ht, et, where, cot = _inputs()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)), jnp.int32)
    kw = dict(where=where, temperature=1.3, chunk_size=7)

    def paths(tied):
        def w(e):
            return TiedUnembedding(e) if tied else e.T

        def run(h, e):
            top = chunked_teacher_topk(ht, w(et), k=5, chunk_size=7)
            per = chunked_divergence(h, w(e), ht, w(et), divergence="generalized_jsd", beta=0.3,
                                     **kw)
            fused = chunked_divergence_loss(h, w(e), ht, w(et), weights=jnp.abs(cot), **kw)[0]
            sparse = chunked_divergence_loss(h, w(e), teacher_topk=top, weights=jnp.abs(cot),
                                             **kw)[0]
            logp = chunked_token_logprobs(h, w(e), ids, where=where, chunk_size=7)
            mapped = chunked_student_logits_map(
                lambda zs, zt, ex: {"d": jnp.sum(jax.nn.softmax(zs) * (zs - zt), -1) * ex},
                h, w(e), ht, w(et), where.astype(jnp.float32), chunk_size=7)["d"]
            return per, fused, sparse, logp, mapped

        return jax.jit(lambda h, e: jax.vjp(run, h, e)[0]), run

    want_fn, want_run = paths(False)
    got_fn, got_run = paths(True)
    cots = (cot, jnp.ones(()), jnp.ones(()), -cot, cot)
    for a, b in zip(want_run(hs, es), got_run(hs, es)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    want = jax.jit(lambda h, e: jax.vjp(want_run, h, e)[1](cots))(hs, es)
    got = jax.jit(lambda h, e: jax.vjp(got_run, h, e)[1](cots))(hs, es)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)   # both [V, D]
    assert float(jnp.abs(got[1]).max()) > 0


def test_frozen_tied_table_gets_no_gradient_work():
    """Gradient w.r.t. the hidden states only (LoRA's frozen table): equal to the transposed path."""
    hs, es, ht, et, where, cot = _inputs(seed=3)

    def loss(h, w):
        return chunked_divergence_loss(h, w, ht, et.T, weights=jnp.abs(cot), where=where,
                                       chunk_size=5)[0]

    got = jax.jit(jax.grad(lambda h: loss(h, TiedUnembedding(es))))(hs)
    want = jax.jit(jax.grad(lambda h: loss(h, es.T)))(hs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_tied_path_holds_no_transposed_copy():
    """Compiled scratch of a tied loss's gradient: the transposed table and the transposed
    gradient are gone (at least one [V, D] float32 buffer less)."""
    rows, d, v, c = 512, 64, 32768, 128
    head = d * v * 4
    sd = jax.ShapeDtypeStruct
    h, e, m = sd((1, rows, d), jnp.float32), sd((v, d), jnp.float32), sd((1, rows), jnp.bool_)

    def temp(tied):
        def loss(h, e, ht, et, m):
            w = (lambda x: TiedUnembedding(x)) if tied else (lambda x: x.T)
            return chunked_divergence_loss(h, w(e), ht, w(et), weights=m.astype(jnp.float32),
                                           where=m, chunk_size=c)[0]
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(h, e, h, e, m).compile().memory_analysis().temp_size_in_bytes

    tied, transposed = temp(True), temp(False)
    assert tied <= transposed - head, (tied / head, transposed / head)


def _tied_models():
    cs = ModelConfig(n_layers=1, vocab_size=64, tie_embeddings=True)
    ct = ModelConfig(n_layers=2, vocab_size=64, tie_embeddings=True)
    ps = dec.init_params(cs, jax.random.key(0))
    pt = jax.tree.map(lambda x: 20 * x if x.ndim >= 2 else x, dec.init_params(ct, jax.random.key(1)))
    return cs, ps, ct, pt


def test_train_loss_of_a_tied_student_matches_dense_autodiff():
    """The train step's loss and gradient (tied student and teacher, table passed untransposed)
    against plain autodiff through dense ``decoder.logits`` (which reads ``embed.T``)."""
    cs, ps, ct, pt = _tied_models()
    assert isinstance(loss_unembedding(ps, cs), TiedUnembedding)
    b, p, n = 3, 4, 5
    toks = jax.random.randint(jax.random.key(2), (b, p + n), 0, 64)
    valid = jnp.ones((b, p + n), bool).at[0, :2].set(False)
    mask = jnp.ones((b, n), bool).at[1, 3:].set(False)
    batch = RolloutBatch(toks, valid, toks, valid, toks[:, p:], mask, jnp.full((b, n), -4.0))

    def ours(params):
        return loss_and_metrics(params, None, pt, batch, student=StudentSpec(cs),
                                teacher=TeacherSpec("separate", ct),
                                chunk_fn=make_chunk_fn(LossSpec(objective="reverse_kl",
                                                                top_k=None)),
                                reduction=losses.token_mean, chunk_size=4)[0]

    def dense(params):
        hs, _ = dec.forward(params, cs, toks, valid_BxT=valid)
        ht, _ = dec.forward(pt, ct, toks, valid_BxT=valid)
        zs, zt = dec.logits(params, cs, hs)[:, p - 1:-1], dec.logits(pt, ct, ht)[:, p - 1:-1]
        return losses.token_mean(DIVERGENCES["reverse_kl"](zs, zt, where=mask), mask)

    (lo, go), (ld, gd) = jax.jit(jax.value_and_grad(ours))(ps), jax.jit(jax.value_and_grad(dense))(ps)
    np.testing.assert_allclose(lo, ld, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), go, gd)
