"""Packed update rows: the layout's invariants, attention that never crosses a segment (dense,
blocked and platform), and a train step whose loss, metrics and gradients equal the unpacked step's (float32
rounding) for every teacher mode, LoRA, grad accumulation and several objectives."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses
from opd_jax.config.loss import LossSpec
from opd_jax.config.schema import OptimSpec
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.model.lora import init_lora
from opd_jax.train import packing
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.objectives import make_chunk_fn, sft_chunk_fn
from opd_jax.train.packing import ShapeMemory, first_fit, pack_rows, row_count_bucket, row_length_bucket
from opd_jax.train.rollout import pack_batch
from opd_jax.train.state import StudentSpec, init_state, make_optimizer
from opd_jax.train.step import TeacherSpec, loss_and_metrics, make_train_step

CS = ModelConfig(vocab_size=64, n_layers=2, d_model=32, ffn_dim=64, n_heads=4, n_kv_heads=2,
                 head_dim=8, attention_block=8)
CT = ModelConfig(vocab_size=64, n_layers=2, d_model=48, ffn_dim=64, n_heads=4, n_kv_heads=2,
                 head_dim=12, attention_block=8)


def _ragged(seed, B=8, P=12, N=10, min_prompt=2):
    """``[left-padded prompt | completion]`` rows with ragged prompts and completions (one row
    fully masked, one of full length)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, 64, (B, P + N)).astype(np.int32)
    plen = rng.integers(min_prompt, P + 1, B)
    clen = rng.integers(1, N + 1, B)
    clen[0], clen[1] = N, 0
    valid = np.zeros((B, P + N), bool)
    for b in range(B):
        valid[b, P - plen[b]:P] = True
        valid[b, P:P + clen[b]] = True
    return toks, valid, P, N


def _batch(seed=0, teacher_prompt=False, **kw):
    toks, valid, P, N = _ragged(seed, **kw)
    t_toks, t_valid = toks, valid
    if teacher_prompt:   # OPSD: another (longer) prompt, the same completion
        t_prompt, t_pvalid, _, _ = _ragged(seed + 100, B=toks.shape[0], P=P + 4, N=1,
                                           min_prompt=3)
        t_prompt, t_pvalid = t_prompt[:, :P + 4], t_pvalid[:, :P + 4]
        t_toks = np.concatenate([t_prompt, toks[:, P:]], 1)
        t_valid = np.concatenate([t_pvalid, valid[:, P:]], 1)
    B = toks.shape[0]
    return RolloutBatch(jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(t_toks),
                        jnp.asarray(t_valid), jnp.asarray(toks[:, P:]), jnp.asarray(valid[:, P:]),
                        jnp.asarray(np.random.default_rng(seed).normal(-3, 1, (B, N)),
                                    jnp.float32))


# --- the layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2, 4])
def test_layout_holds_every_real_token_once_and_gathers_each_predictor(groups):
    toks, valid, P, N = _ragged(1, B=8)
    pk = jax.tree.map(np.asarray, pack_rows(toks, valid, N, groups=groups, config=CS,
                                            max_length=64))
    G, M, R = pk.tokens.shape
    assert G == groups and M == row_count_bucket(M)
    per = 8 // groups
    for b in range(8):
        g, i = divmod(b, per)
        c = int(valid[b, P:].sum())
        flat_t, flat_s, flat_p = (x[g].reshape(-1) for x in (pk.tokens, pk.segments,
                                                             pk.positions))
        if c == 0:   # no completion: not packed, nothing gathered
            assert not pk.gather[g, i].any()
            continue
        seq = toks[b][valid[b]]
        at = pk.gather[g, i, :c]
        # the predictor of completion token j sits right before it, in the same segment
        np.testing.assert_array_equal(flat_t[at + 1], toks[b, P:P + c])
        assert len(set(flat_s[np.r_[at, at + 1]])) == 1
        start = at[0] - (len(seq) - c - 1)
        np.testing.assert_array_equal(flat_t[start:start + len(seq)], seq)
        np.testing.assert_array_equal(flat_p[start:start + len(seq)], np.arange(len(seq)))
    # every real token of a packed row is exactly once in the rows; padding is segment 0
    packed_rows = [b for b in range(8) if valid[b, P:].any()]
    assert pk.valid.sum() == sum(valid[b].sum() for b in packed_rows)
    assert ((pk.segments > 0) == pk.valid).all()


def test_first_fit_and_row_buckets():
    rows = first_fit([7, 1, 6, 2, 3], 8)
    assert sorted(sum(([7, 1, 6, 2, 3][i] for i in r), 0) <= 8 for r in rows)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4] and len(rows) == 3
    assert [row_count_bucket(m) for m in range(1, 10)] == [1, 2, 3, 4, 6, 6, 8, 8, 12]


def test_compiled_shapes_stay_few_over_many_batches():
    shapes = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        N = int(rng.integers(4, 64))
        toks, valid, P, N = _ragged(seed, B=16, P=24, N=N)
        pk = pack_rows(toks, valid, N, groups=1, config=CS, max_length=512)
        shapes.add(pk.tokens.shape)
    # rows and lengths come from the bucket sets only: 60 batches of ragged lengths compile at
    # most 16 step shapes (13 measured; the unpacked layout: 4 completion buckets x 1 prompt)
    assert all(R == row_length_bucket(R) and M == row_count_bucket(M) for _, M, R in shapes)
    assert len(shapes) <= 16, sorted(shapes)


def _flops(shape, config=CS, weight=packing.TRAIN_ATTENTION_WEIGHT):
    """The packer's cost model of a ``[G, M, R]`` dense-attention layout (written out here)."""
    _, M, R = shape
    return M * R * (packing.token_flops(config) + 4.0 * config.n_heads * config.head_dim * weight * R)


def test_sticky_shapes_reuse_a_compiled_shape_within_the_slack_only():
    toks, valid, P, N = _ragged(3, B=8)
    fresh = pack_rows(toks, valid, N, groups=1, config=CS).tokens.shape
    _, M, R = fresh
    bigger = (row_count_bucket(M + 1), R)                  # one row bucket more: same length
    for reuse, expect in ((0.0, fresh), (10.0, (1,) + bigger)):
        memory = ShapeMemory(reuse)
        memory.remember(*bigger)
        pk = pack_rows(toks, valid, N, groups=1, config=CS, shapes=memory)
        assert pk.tokens.shape == expect
        assert set(memory.shapes) == {bigger, expect[1:]}
    # the reused layout is the same sequences with empty rows after them: the same real tokens
    # and each completion token's predictor in the same place
    memory = ShapeMemory(10.0)
    memory.remember(*bigger)
    a = jax.tree.map(np.asarray, pack_rows(toks, valid, N, groups=1, config=CS))
    b = jax.tree.map(np.asarray, pack_rows(toks, valid, N, groups=1, config=CS, shapes=memory))
    np.testing.assert_array_equal(b.tokens[:, :M], a.tokens)
    np.testing.assert_array_equal(b.gather, a.gather)
    assert not b.valid[:, M:].any() and not b.segments[:, M:].any()
    # a remembered shape the batch does not fit (rows too short) is never taken
    memory = ShapeMemory(10.0)
    memory.remember(64, 16)
    assert pack_rows(toks, valid, N, groups=1, config=CS, shapes=memory).tokens.shape == fresh
    with pytest.raises(ValueError, match="reuse must be a number >= 0"):
        ShapeMemory(-1)


def test_sticky_shapes_compile_fewer_shapes_at_bounded_extra_cost():
    memory, plain, sticky = ShapeMemory(0.25), set(), set()
    for seed in range(60):
        N = int(np.random.default_rng(seed).integers(4, 64))
        toks, valid, P, N = _ragged(seed, B=16, P=24, N=N)
        alone = pack_rows(toks, valid, N, groups=2, config=CS, max_length=512).tokens.shape
        kept = pack_rows(toks, valid, N, groups=2, config=CS, max_length=512,
                         shapes=memory).tokens.shape
        plain.add(alone)
        sticky.add(kept)
        assert _flops(kept) <= 1.25 * _flops(alone) + 1e-6, (seed, kept, alone)
    assert sorted(s[1:] for s in sticky) == sorted(memory.shapes)
    assert len(sticky) < len(plain), (sorted(sticky), sorted(plain))


def test_teacher_takes_the_students_rows_only_for_the_same_sequences():
    """Without a privileged prompt the teacher's sequences are the student's: it gets the very
    same rows (one layout keys the step's compilation) and its shape memory stays untouched; with
    OPSD's own prompt, or another attention implementation, it is packed on its own."""
    memories = (ShapeMemory(), ShapeMemory())
    same = pack_batch(_batch(3), groups=1, student_config=CS, teacher_config=CT, max_length=64,
                      shapes=memories)
    assert same.teacher_packed is same.student_packed
    assert memories[0].shapes and not memories[1].shapes
    opsd = pack_batch(_batch(3, teacher_prompt=True), groups=1, student_config=CS,
                      teacher_config=CT, max_length=64)
    assert opsd.teacher_packed is not opsd.student_packed
    assert not np.array_equal(np.asarray(opsd.teacher_packed.tokens[opsd.teacher_packed.valid]),
                              np.asarray(opsd.student_packed.tokens[opsd.student_packed.valid]))
    other = pack_batch(_batch(3), groups=1, student_config=CS,
                       teacher_config=CT.replace(attention="blocked"), max_length=64)
    assert other.teacher_packed is not other.student_packed


def test_bad_groups_and_missing_prompt_fail_clearly():
    toks, valid, P, N = _ragged(2, B=6)
    with pytest.raises(ValueError, match="6 rows do not split into 4 packing groups"):
        pack_rows(toks, valid, N, groups=4, config=CS)
    valid[2, :P] = False
    with pytest.raises(ValueError, match="no prompt token"):
        pack_rows(toks, valid, N, groups=1, config=CS)


# --- attention stays inside a segment ---------------------------------------------------------

@pytest.mark.parametrize("attention", ["dense", "blocked", "platform"])
def test_segments_see_only_themselves(attention):
    config = CS.replace(attention=attention, attention_block=4)
    params = dec.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    lens = [7, 5, 9]
    seqs = [rng.integers(1, 64, n).astype(np.int32) for n in lens]
    R = 24
    tokens = np.zeros((1, R), np.int32)
    seg = np.zeros((1, R), np.int32)
    pos = np.zeros((1, R), np.int32)
    off = 0
    for i, s in enumerate(seqs):
        tokens[0, off:off + len(s)], seg[0, off:off + len(s)] = s, i + 1
        pos[0, off:off + len(s)] = np.arange(len(s))
        off += len(s)
    valid = seg > 0
    run = jax.jit(lambda t: dec.forward(params, config, t, jnp.asarray(pos),
                                        valid_BxT=jnp.asarray(valid),
                                        segment_ids_BxT=jnp.asarray(seg))[0])
    h = np.asarray(run(jnp.asarray(tokens)))
    off = 0
    for s in seqs:   # each segment equals the sequence run on its own
        alone = np.asarray(dec.forward(params, config, jnp.asarray(s[None]))[0])[0]
        np.testing.assert_allclose(h[0, off:off + len(s)], alone, atol=2e-5, rtol=2e-5)
        off += len(s)
    changed = tokens.copy()
    changed[0, lens[0]:lens[0] + lens[1]] = 1   # rewrite segment 2 only
    h2 = np.asarray(run(jnp.asarray(changed)))
    np.testing.assert_array_equal(h2[0, :lens[0]], h[0, :lens[0]])
    np.testing.assert_array_equal(h2[0, lens[0] + lens[1]:off], h[0, lens[0] + lens[1]:off])


# --- the train step: packed == unpacked -------------------------------------------------------

def _grads(batch, *, student, teacher, trainable, frozen, teacher_args, chunk_fn):
    fn = jax.jit(jax.value_and_grad(functools.partial(
        loss_and_metrics, student=student, teacher=teacher, chunk_fn=chunk_fn,
        reduction=losses.token_mean, chunk_size=8), has_aux=True))
    (loss, out), g = fn(trainable, frozen, teacher_args, batch)
    mask = batch.mask
    metrics = {k: float(losses.token_mean(v, mask)) for k, v in out.items()}
    return float(loss), metrics, g


CASES = {
    "separate_topk_dense": ("separate", LossSpec(objective="topk_reward", top_k=4), "dense", False),
    "separate_rkl_blocked": ("separate", LossSpec(objective="reverse_kl", top_k=None), "blocked",
                             False),
    "separate_jsd_lora": ("separate", LossSpec(objective="generalized_jsd", beta=0.5, top_k=None),
                          "dense", True),
    "opsd_fixed_clip": ("student_fixed", LossSpec(objective="generalized_jsd", beta=0.0,
                                                  top_k=None, pointwise_clip=0.05), "dense",
                        False),
    "opsd_live_blocked": ("student_live", LossSpec(objective="reverse_kl", top_k=None), "blocked",
                          False),
    "sft_no_teacher": ("none", None, "dense", False),
    "separate_topk_platform": ("separate", LossSpec(objective="topk_reward", top_k=4), "platform",
                               False),
}


def _assert_same_step(batch, packed, kw):
    """The packed batch's loss, metrics and gradients equal the padded batch's (float32)."""
    l1, m1, g1 = _grads(batch, **kw)
    l2, m2, g2 = _grads(packed, **kw)
    np.testing.assert_allclose(l2, l1, rtol=2e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, atol=2e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert float(jnp.abs(a - b).max()) <= 1e-4 * (float(jnp.abs(a).max()) + 1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_step_equals_unpacked(case):
    mode, lspec, attention, lora = CASES[case]
    cs, ct = CS.replace(attention=attention), CT.replace(attention=attention)
    params = dec.init_params(cs, jax.random.key(0))
    trainable, frozen, scale = params, None, None
    if lora:
        adapters = init_lora(cs, jax.random.key(5), rank=2, alpha=4.0)
        # nonzero B so the adapters change the forward and get gradients through it
        adapters = adapters.replace(weights=jax.tree.map(
            lambda x: x + 0.01 * jax.random.normal(jax.random.key(6), x.shape), adapters.weights))
        trainable, frozen, scale = adapters.weights, params, adapters.scale
    student = StudentSpec(cs, lora_scale=scale)
    if mode == "separate":
        teacher, teacher_args = TeacherSpec("separate", ct), dec.init_params(ct,
                                                                            jax.random.key(1))
    elif mode == "student_fixed":
        teacher = TeacherSpec("student_fixed")
        teacher_args = jax.tree.map(lambda x: x * 1.5, trainable)
    else:
        teacher, teacher_args = TeacherSpec(mode), None
    chunk_fn = sft_chunk_fn if mode == "none" else make_chunk_fn(lspec)
    batch = _batch(3, teacher_prompt=mode.startswith("student"))
    packed = pack_batch(batch, groups=1, student_config=cs,
                        teacher_config=ct if mode == "separate" else cs, max_length=64)
    assert packed.student_packed.tokens.size < batch.student_tokens.size   # real savings
    kw = dict(student=student, teacher=teacher, trainable=trainable, frozen=frozen,
              teacher_args=teacher_args, chunk_fn=chunk_fn)
    _assert_same_step(batch, packed, kw)


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_step_on_a_reused_larger_packed_shape_equals_unpacked(attention):
    """Sticky shapes: rows packed into a remembered shape with more and longer rows than the
    batch needs (empty rows, longer padding tails) give the unpacked step's loss, metrics and
    gradients."""
    cs, ct = CS.replace(attention=attention), CT.replace(attention=attention)
    batch = _batch(5)
    fresh = pack_batch(batch, groups=1, student_config=cs, teacher_config=ct, max_length=64)
    memories = []
    for pk in (fresh.student_packed, fresh.teacher_packed):
        _, M, R = pk.tokens.shape
        memory = ShapeMemory(100.0)
        memory.remember(row_count_bucket(M + 2), row_length_bucket(2 * R))
        memories.append(memory)
    packed = pack_batch(batch, groups=1, student_config=cs, teacher_config=ct, max_length=64,
                        shapes=tuple(memories))
    for big, small in ((packed.student_packed, fresh.student_packed),
                       (packed.teacher_packed, fresh.teacher_packed)):
        assert big.tokens.shape[1] > small.tokens.shape[1]
        assert big.tokens.shape[2] > small.tokens.shape[2]
    assert packed.student_tokens.shape == (batch.student_tokens.shape[0], 0)   # rows dropped
    kw = dict(student=StudentSpec(cs), teacher=TeacherSpec("separate", ct),
              trainable=dec.init_params(cs, jax.random.key(0)), frozen=None,
              teacher_args=dec.init_params(ct, jax.random.key(1)),
              chunk_fn=make_chunk_fn(LossSpec(objective="reverse_kl", top_k=None)))
    _assert_same_step(batch, packed, kw)


@pytest.mark.parametrize("accum", [1, 2])
def test_jitted_step_with_grad_accumulation_packed(accum):
    opt = make_optimizer(OptimSpec(lr=1e-3), 10)
    student = StudentSpec(CS)
    teacher = TeacherSpec("separate", CT)
    ps, pt = dec.init_params(CS, jax.random.key(0)), dec.init_params(CT, jax.random.key(1))
    step = make_train_step(student=student, teacher=teacher, optimizer=opt,
                           chunk_fn=make_chunk_fn(LossSpec(objective="topk_reward", top_k=4)),
                           reduction=losses.token_mean, chunk_size=8, grad_accum=accum)
    batch = _batch(4)
    packed = pack_batch(batch, groups=accum, student_config=CS, teacher_config=CT,
                        max_length=64)
    s1, m1 = step(init_state(ps, opt, 0), batch, None, pt)
    s2, m2 = step(init_state(ps, opt, 0), packed, None, pt)
    for k in ("loss", "grad_norm", "overlap", "completion_tokens"):
        np.testing.assert_allclose(float(m2["scalars"][k]), float(m1["scalars"][k]), rtol=2e-5)
    # Adam divides each gradient by its own scale: near-zero entries amplify rounding, so the
    # updated weights agree to 1% of one lr-sized step (the gradients themselves: test above)
    for a, b in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s2.trainable)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    # a second packed batch of the same bucketed shapes reuses the compiled step
    again = pack_batch(_batch(4), groups=accum, student_config=CS, teacher_config=CT,
                       max_length=64)
    assert again.student_packed.tokens.shape == packed.student_packed.tokens.shape
    before = step._cache_size()
    step(init_state(ps, opt, 0), again, None, pt)
    assert step._cache_size() == before
