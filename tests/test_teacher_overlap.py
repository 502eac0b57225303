"""Teacher scoring that overlaps sampling (:mod:`opd_jax.train.overlap`): rows scored in groups
of their own completion length equal one whole-batch request; requests run in the background and
in order; a failed request's exception reaches the trainer unchanged; the sampler's
``on_rows_done`` reports every row once without changing the draws; a run against a real
``opd-jax serve-teacher`` with ``sampler.slots`` trains like the in-process teacher."""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future

import jax
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.model.config import ModelConfig
from opd_jax.sampling.continuous import SlotResult, SlotStats
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import TopK
from opd_jax.teacher.client import TeacherUnavailable
from opd_jax.teacher.router import TeacherRouter
from opd_jax.teacher.scores import query_ids
from opd_jax.teacher.scoring import score_completions
from opd_jax.teacher.source import LocalTeacher
from opd_jax.train.overlap import OverlappedScoring
from opd_jax.train.rollout import completion_length
from opd_jax.train.run import run
from tests.test_sampler import peaky_params
from tests.test_teacher_training import KEYS, TINY, Server, _free_port, _metrics, _same

CFG = ModelConfig(vocab_size=64, n_layers=1, d_model=32, ffn_dim=64, n_heads=2, n_kv_heads=1,
                  head_dim=16, max_position=64)
TEACHER = peaky_params(CFG.replace(n_layers=2), seed=1, scale=4.0)
B, P, N, KS, K = 6, 5, 40, 3, 4   # rows, prompt, max new tokens, student top-k, teacher top-k


class Recording:
    """A source that records each request's rows and ``n`` (and can fail or block)."""

    def __init__(self, inner, fail_at: int | None = None, gate: threading.Event | None = None):
        self.inner, self.fail_at, self.gate, self.calls = inner, fail_at, gate, []
        self.routes = getattr(inner, "routes", None)

    def score(self, tokens, valid, q, *, n, k, temperature, **kw):
        self.calls.append((tokens.shape[0], n, kw.get("records")))
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if len(self.calls) == self.fail_at:
            raise TeacherUnavailable("teacher gone")
        return self.inner.score(tokens, valid, q, n=n, k=k, temperature=temperature, **kw)


class Inline(Executor):
    def submit(self, fn, *args, **kwargs):
        f = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - a future holds any exception
            f.set_exception(e)
        return f


def _batch(seed: int = 0):
    """Teacher prompts and a SlotResult with ragged lengths: rows 0-2 end by 16 tokens, rows
    3-5 run to 20..40 (so groups have completion lengths 16, 32 and 40)."""
    rng = np.random.default_rng(seed)
    t_tok = rng.integers(1, 64, (B, P)).astype(np.int32)
    t_val = np.ones((B, P), bool)
    t_val[0, :3] = t_val[4, :2] = False
    lengths = np.array([3, 16, 9, 20, 40, 30])
    mask = np.arange(N)[None] < lengths[:, None]
    res = SlotResult(np.where(mask, rng.integers(1, 64, (B, N)), 0).astype(np.int32), mask,
                     np.zeros((B, N), np.float32), np.zeros((B, N), np.float32),
                     rng.integers(0, 64, (B, N, KS + 1)).astype(np.int32),
                     np.zeros((B, N, KS + 1), np.float32), SlotStats(rows=B, slots=2))
    return t_tok, t_val, res


def _whole_batch(params, config, t_tok, t_val, res, n):
    comp, mask = res.tokens[:, :n], res.mask[:, :n]
    q = query_ids(comp, res.topk_ids[:, :n, :KS])
    return score_completions(params, config, np.concatenate([t_tok, comp], 1),
                             np.concatenate([t_val, mask], 1), q, n=n, k=K)


def _assert_scores(got, ref):
    for name in ("topk_ids", "query_ids"):
        np.testing.assert_array_equal(getattr(got, name), np.asarray(getattr(ref, name)), name)
    for name in ("topk_logprobs", "logsumexp", "query_logprobs"):
        np.testing.assert_allclose(getattr(got, name), np.asarray(getattr(ref, name)),
                                   rtol=1e-5, atol=1e-5, err_msg=name)


def test_groups_scored_at_their_own_length_equal_one_whole_batch_request():
    t_tok, t_val, res = _batch()
    src = Recording(LocalTeacher(TEACHER, CFG.replace(n_layers=2)))
    gate = threading.Event()
    src.gate = gate
    scoring = OverlappedScoring(src, t_tok, t_val, k=K, temperature=1.0, student_k=KS)
    for rows in ([2, 0], [1], [5, 3], [4]):     # rounds of finished rows, in any row order
        scoring.on_rows_done(np.array(rows), res)   # returns while the teacher is blocked
    assert len(src.calls) <= 1, "requests run in the background, one at a time"
    gate.set()
    n = completion_length(res.mask)
    scores, stats = scoring.collect(n)
    assert [c[:2] for c in src.calls] == [(2, 16), (1, 16), (2, 32), (1, 40)]   # in order
    _assert_scores(scores, _whole_batch(TEACHER, CFG.replace(n_layers=2), t_tok, t_val, res, n))
    assert stats["teacher_requests"] == 4 and stats["teacher_s"] > 0
    assert 0.0 <= stats["teacher_hidden"] <= 1.0 and stats["teacher_wait_s"] >= 0


def test_small_rounds_merge_and_a_router_gets_each_groups_records():
    t_tok, t_val, res = _batch(1)
    c1, c2 = CFG, CFG.replace(n_layers=2)
    p1 = peaky_params(c1, seed=3, scale=4.0)
    router = TeacherRouter([("one", ("a",), LocalTeacher(p1, c1)),
                            ("two", ("b",), LocalTeacher(TEACHER, c2))])
    records = [{"id": str(i), "source": "f", "metadata": {"source": "ab"[i % 2]}}
               for i in range(B)]
    src = Recording(router)
    scoring = OverlappedScoring(src, t_tok, t_val, k=K, temperature=1.0, student_k=KS,
                                records=records, min_rows=2)
    for rows in ([0], [1, 2], [3], [4], [5]):
        scoring.on_rows_done(np.array(rows), res)
    n = completion_length(res.mask)
    scores, stats = scoring.collect(n)
    assert [c[0] for c in src.calls] == [3, 2, 1]   # {0, 1, 2}, {3, 4}, then {5} at collect
    assert [r["id"] for r in src.calls[1][2]] == ["3", "4"]
    for i, (params, config) in enumerate(((p1, c1), (TEACHER, c2))):
        ref = _whole_batch(params, config, t_tok, t_val, res, n)
        rows = np.arange(i, B, 2)
        _assert_scores(jax.tree.map(lambda x: x[rows], scores),
                       jax.tree.map(lambda x: np.asarray(x)[rows], ref))


def test_a_failed_request_stops_sampling_and_collect_raises_it_unchanged():
    t_tok, t_val, res = _batch()
    src = Recording(LocalTeacher(TEACHER, CFG.replace(n_layers=2)), fail_at=1)
    scoring = OverlappedScoring(src, t_tok, t_val, k=K, temperature=1.0, student_k=KS)
    scoring.on_rows_done(np.array([0, 1, 2]), res)   # in the background; fails
    with pytest.raises(TeacherUnavailable, match="teacher gone"):
        scoring.collect(N)
    # inline: the next round raises the same exception; later requests are skipped
    src = Recording(LocalTeacher(TEACHER, CFG.replace(n_layers=2)), fail_at=1)
    scoring = OverlappedScoring(src, t_tok, t_val, k=K, temperature=1.0, student_k=KS,
                                executor=Inline())
    scoring.on_rows_done(np.array([0]), res)
    with pytest.raises(TeacherUnavailable) as again:
        scoring.on_rows_done(np.array([1]), res)
    with pytest.raises(TeacherUnavailable) as last:
        scoring.collect(N)
    assert again.value is last.value and len(src.calls) == 1
    with pytest.raises(ValueError, match="never reported"):
        OverlappedScoring(src, t_tok, t_val, k=K, temperature=1.0, student_k=0).collect(N)


@pytest.mark.parametrize("slots", [2, None])
def test_sampler_reports_every_row_once_and_draws_the_same_tokens(slots):
    sampler = Sampler(CFG, TopK(20, 1.0), 24, eos_ids=[3, 7, 11], return_topk=KS, slots=slots,
                      chunk_steps=4)
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 64, (7, 6)).astype(np.int32)
    valid = np.ones((7, 6), bool)
    valid[1, :4] = False
    params, key = peaky_params(CFG, seed=5, scale=3.0), jax.random.key(3)
    seen = []
    t_val = np.concatenate([valid, np.ones((7, 1), bool)], 1)   # teacher prompts: one longer
    t_tok = np.concatenate([tokens, np.full((7, 1), 9, np.int32)], 1)
    scoring = OverlappedScoring(LocalTeacher(TEACHER, CFG.replace(n_layers=2)), t_tok, t_val,
                                k=K, temperature=1.0, student_k=KS)

    def hook(rows, result):
        seen.append(rows.tolist())
        scoring.on_rows_done(rows, result)

    out = sampler(params, tokens, valid, key, on_rows_done=hook)
    ref = sampler(params, tokens, valid, key)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    assert sorted(r for rows in seen for r in rows) == list(range(7))
    assert len(seen) > 1 if slots else seen == [list(range(7))]
    assert len(set(np.asarray(out.mask).sum(1).tolist())) > 1, "EOS should make rows ragged"
    res = SlotResult(*(np.asarray(x) for x in (out.tokens, out.mask, out.logprobs,
                                               out.logprobs_full, out.topk_ids,
                                               out.topk_logprobs)), None)
    n = completion_length(res.mask)
    _assert_scores(scoring.collect(n)[0],
                   _whole_batch(TEACHER, CFG.replace(n_layers=2), t_tok, t_val, res, n))


def test_served_teacher_with_slots_overlaps_and_trains_like_the_in_process_one(tmp_path):
    over = ["stages=[{kind: opd, steps: 3, batch_prompts: 4}]", "checkpoint.every_n_steps=0",
            "sampler.slots=2"]
    run(load_config(TINY, [f"out_dir={tmp_path}/inproc", *over]), progress=False)
    srv = Server(_free_port()).start()
    try:
        run(load_config(TINY, [f"out_dir={tmp_path}/served", *over,
                               f"teacher.source={srv.url}"]), progress=False)
    finally:
        srv.stop()
    inproc, served = _metrics(tmp_path / "inproc"), _metrics(tmp_path / "served")
    assert len(served) == 3 and all(k in served[0] for k in KEYS)
    _same(inproc, served)
    for r in served:
        assert 0.0 <= r["teacher_hidden"] <= 1.0 and r["teacher_s"] > 0, r
        assert r["teacher_wait_s"] >= 0 and r["teacher_requests"] >= 2, r   # 4 rows, 2 slots
        assert r["teacher_query_miss"] == 0
    assert "teacher_hidden" not in inproc[0]
