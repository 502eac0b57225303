"""GKD's fixed off-policy dataset (opd stage ``offpolicy_dataset:``, ``opd_jax.train.gkd_mix``):
the steps' sources follow the on-policy draw and resume exactly; ``lambda_on_policy = 0`` trains
exactly like a distill cold start on the same file; a served teacher scoring the on-policy steps
with the off-policy steps read from a teacher cache trains like the in-process teacher; what
cannot work is refused by name before any work. Tiny random models (configs/tiny_test.yaml)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.teacher.cache_build import build_cache, dataset_of
from opd_jax.train.gkd_mix import MixedBatches, on_policy_step
from opd_jax.train.run import run
from opd_jax.train.sft_batches import EpochBatches
from tests.test_teacher_cache import write_examples
from tests.test_teacher_training import TINY, Server, _free_port

KEYS = ("loss", "token_reverse_kl", "student_token_logprob", "teacher_token_logprob", "grad_norm")
# forward KL on the teacher's top-4 (a divergence a cache can serve: support = teacher)
LOSS = ["loss.objective=forward_kl", "loss.top_k=4", "loss.support=teacher", "loss.tail=bucket"]


def _gkd(data, lam, steps=6, extra=""):
    return [f"stages=[{{kind: opd, steps: {steps}, batch_prompts: 2, offpolicy_dataset: {data}"
            f"{extra}, loss: {{lambda_on_policy: {lam}}}}}]", "checkpoint.every_n_steps=0", *LOSS]


def _rows(run_dir, kind):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


def _same(a, b, keys=KEYS, rel=2e-4):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=2e-5), (ra["step"], k)


class Counter:
    """A stand-in prompt iterator: batch ``i`` is ``[{"n": i}]``; grain-like state."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return [{"n": self.i - 1}]

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def test_sources_follow_the_draw_and_resume_exactly():
    rows = [{"prompt_ids": [1], "completion_ids": [2, 3], "real": True, "source": ""}] * 5
    draw = [on_policy_step(0, 1, s, 0.5) for s in range(40)]
    assert 8 < sum(draw) < 32                 # a real mixture at lambda = 0.5
    assert all(on_policy_step(0, 1, s, 1.0) for s in range(5))
    assert not any(on_policy_step(0, 1, s, 0.0) for s in range(5))

    def make():
        return MixedBatches(Counter(), EpochBatches(rows, 2, 7, sha256="x"),
                            lambda s: on_policy_step(0, 1, s, 0.5))

    it = make()
    seen = [next(it) for _ in range(40)]
    assert [("n" in b[0]) for b in seen] == draw
    assert [b[0]["n"] for b in seen if "n" in b[0]] == list(range(sum(draw)))   # no prompt lost
    idx = [r["index"] for b in seen if "index" in b[0] for r in b]
    assert len(idx) >= 12
    for e in range(len(idx) // 6):   # every example once an epoch (a short last batch pads)
        assert set(idx[e * 6:e * 6 + 6]) == set(range(5))
    part = make()
    for _ in range(17):
        next(part)
    resumed = make()
    resumed.set_state(json.loads(json.dumps(part.get_state())))
    assert [next(resumed) for _ in range(23)] == seen[17:]
    with pytest.raises(ValueError, match="without offpolicy_dataset"):
        make().set_state({"i": 3})


def test_lambda_zero_trains_like_a_distill_cold_start(tmp_path):
    data = tmp_path / "cold.jsonl"
    write_examples(data)
    cold = load_config(TINY, [f"out_dir={tmp_path}/cold", "checkpoint.every_n_steps=0", *LOSS,
                              f"stages=[{{kind: cold_start, dataset: {data}, steps: 4, "
                              "batch_prompts: 2, distill: true}]"])
    run(cold, progress=False)
    run(load_config(TINY, [f"out_dir={tmp_path}/gkd", *_gkd(data, 0.0, steps=4)]), progress=False)
    a, b = _rows(tmp_path / "cold", "cold_start"), _rows(tmp_path / "gkd", "opd")
    assert all(not r["on_policy"] for r in b)
    _same(a, b, keys=("loss", "grad_norm", "gen_tokens"), rel=1e-6)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A lambda = 0.5 GKD stage with the teacher in-process, its dataset and a cache of it."""
    tmp = tmp_path_factory.mktemp("gkd")
    data = tmp / "cold.jsonl"
    write_examples(data)
    cfg = load_config(TINY, [f"out_dir={tmp}/inproc", *_gkd(data, 0.5)])
    assert dataset_of(cfg)[0] == str(data)    # cache-teacher finds the stage's dataset
    run(cfg, progress=False)
    build_cache(cfg, out=tmp / "cache", k=4, batch_rows=4, shard_examples=4, progress=False)
    return tmp, data, _rows(tmp / "inproc", "opd")


def test_in_process_mixture_steps(mixed):
    tmp, data, rows = mixed
    flags = [r["on_policy"] for r in rows]
    assert flags == [on_policy_step(0, 0, s, 0.5) for s in range(6)] and 0 < sum(flags) < 6
    lengths = sorted(len(" ".join([w] * (1 + 3 * i)).encode())
                     for i, w in enumerate(["red", "green", "blue", "cyan", "pink", "gold",
                                            "teal", "plum", "navy", "rust"]))
    for r in rows:   # off-policy steps train the file's completions (+ stop tokens)
        if not r["on_policy"]:
            assert r["gen_tokens"] >= 2 * lengths[0]
        assert np.isfinite(r["loss"])


def test_a_resumed_mixed_stage_continues_both_sources(mixed):
    """Checkpoints at steps 2, 4, 6; the step-6 one deleted: the stage resumes at step 4 (its
    saved prompt and dataset iterators) and steps 5-6 repeat the uninterrupted run's."""
    tmp, data, rows = mixed
    overrides = [f"out_dir={tmp}/resume", *_gkd(data, 0.5), "checkpoint.every_n_steps=2",
                 "checkpoint.keep_last_n=3"]
    run(load_config(TINY, overrides), progress=False)
    ck = tmp / "resume" / "checkpoints" / "opd"
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2, 4, 6]
    shutil.rmtree(ck / "6")
    run(load_config(TINY, overrides), progress=False)
    resumed = _rows(tmp / "resume", "opd")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["on_policy"] for r in resumed] == [r["on_policy"] for r in rows]
    _same(rows, resumed, keys=KEYS + ("gen_tokens",), rel=1e-5)


def test_served_teacher_with_an_offpolicy_cache_trains_like_in_process(mixed):
    tmp, data, rows = mixed
    srv = Server(_free_port()).start()
    try:
        cfg = load_config(TINY, [f"out_dir={tmp}/served", f"teacher.source={srv.url}",
                                 *_gkd(data, 0.5, extra=f", offpolicy_cache: {tmp / 'cache'}")])
        run(cfg, progress=False)
    finally:
        srv.stop()
    served = _rows(tmp / "served", "opd")
    assert [r["on_policy"] for r in served] == [r["on_policy"] for r in rows]
    _same(rows, served)
    assert all(r["teacher_s"] >= 0 for r in served)


@pytest.mark.parametrize("overrides, match", [
    (["stages=[{kind: opd, steps: 2, offpolicy_dataset: D}]"], "lambda_on_policy"),
    (["stages=[{kind: opd, steps: 2, offpolicy_cache: C}]"], "without offpolicy_dataset"),
    (["stages=[{kind: cold_start, steps: 2, offpolicy_dataset: D}]"], "applies to opd"),
    (["stages=[{kind: opd, steps: 2, offpolicy_dataset: D, offpolicy_cache: C, "
      "loss: {lambda_on_policy: 0.5, objective: forward_kl}}]"], "served teacher"),
    (["stages=[{kind: opd, steps: 2, offpolicy_dataset: D, "
      "loss: {lambda_on_policy: 0.5, objective: topk_reward}}]"], "policy gradients"),
])
def test_bad_configs_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(TINY, overrides)


def test_served_teacher_needs_teacher_support_for_the_dataset_rows(tmp_path):
    data = tmp_path / "cold.jsonl"
    write_examples(data)
    cfg = load_config(TINY, [f"out_dir={tmp_path}/run", "teacher.source=http://127.0.0.1:9",
                             *_gkd(data, 0.5), "loss.support=student"])
    with pytest.raises(ValueError, match="support: teacher"):
        run(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
