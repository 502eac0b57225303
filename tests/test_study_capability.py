"""The capability study (``study.kind: capability``): verified solutions, bootstrap intervals and
the verdict rule on synthetic numbers, config loading, the OPD optimizer state persisting across
evaluation points, and (slow) the whole ``--small`` pipeline on tiny random models."""

import json
import os

import jax
import numpy as np
import pytest

from opd_jax.compile_options import compilation_cache
from opd_jax.config import ConfigError
from opd_jax.data import load_records
from opd_jax.study import load_study_config
from opd_jax.study.capability import (
    CAPABILITY_ARMS,
    CapabilityConfig,
    chain_solution,
    compare,
    interval,
    judge_capability,
    load_capability_config,
    ratio_interval,
    run_capability_study,
    verified_solutions,
)
from opd_jax.study.capability.arms import Student, run_seed
from opd_jax.study.capability.stats import Interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "study_capability.yaml")
DEMO = os.path.join(ROOT, "configs", "study_demo.yaml")


def _rg(name, size=12, **config):
    return load_records({"type": "reasoning_gym", "name": name, "size": size, "seed": 0,
                         "config": config})


def test_verified_solutions_are_graded_by_the_task():
    chain = _rg("chain_sum", min_terms=3, max_terms=3, min_digits=1, max_digits=1)
    pairs, counts = verified_solutions(chain)
    assert counts == {"kept": 12, "no_expression": 0, "wrong": 0} and len(pairs) == 12
    rec, text = pairs[0]
    assert text.splitlines()[-1] == f"Answer: {rec['answer']}" and len(text.splitlines()) == 3
    # a record whose reference answer disagrees with the worked solution is never trained on
    bad = json.loads(json.dumps(chain[0]))
    bad["answer"] = str(int(bad["answer"]) + 1)
    assert verified_solutions([bad])[1]["wrong"] == 1
    two = _rg("basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=1,
              operators=["+", "-", "*"], allow_parentheses=False, allow_negation=False)
    assert verified_solutions(two)[1]["kept"] == 12
    assert chain_solution("2 * 3 + 4") is None and chain_solution("(1 + 2)") is None
    assert verified_solutions([{"id": "x", "prompt": "p", "answer": "1", "metadata": {}}])[1] == {
        "kept": 0, "no_expression": 1, "wrong": 0}


def test_bootstrap_intervals_cover_and_repeat():
    rng = np.random.default_rng(0)
    acc = (rng.uniform(size=(3, 64)) < 0.4).astype(float)
    a = interval(acc, samples=1000, label="x")
    assert a == interval(acc, samples=1000, label="x")          # fixed per label: reruns agree
    assert a.low < a.estimate < a.high and a.seeds == 3 and a.prompts == 64
    assert abs(a.estimate - acc.mean()) < 1e-12
    # token-weighted KLs: the estimate is sum / sum per seed, averaged over seeds
    num, den = rng.uniform(1, 2, (3, 64)), rng.integers(1, 30, (3, 64)).astype(float)
    kl = interval(num, den, samples=500)
    assert abs(kl.estimate - np.mean(num.sum(1) / den.sum(1))) < 1e-12
    # a change within an arm is paired over prompts: final = 0.5 x initial is exactly 0.5 in every
    # resample, per seed or against one initial point shared by every seed
    half = ratio_interval(0.5 * num, den, num, den, samples=300)
    assert (half.estimate, half.low, half.high) == pytest.approx((0.5, 0.5, 0.5))
    shared = ratio_interval(0.5 * num[[0, 0, 0]], den[[0, 0, 0]], num[:1], den[:1], samples=300)
    assert (shared.estimate, shared.low, shared.high) == pytest.approx((0.5, 0.5, 0.5))
    same = ratio_interval(num, den, num, den, samples=300)
    assert same.estimate == pytest.approx(1.0) and same.high - same.low < 1e-9
    with pytest.raises(ValueError, match="seeds, prompts"):
        interval([[1.0, 2.0], [1.0]])


def test_compare_separated_overlapping_and_reversed():
    iv = lambda lo, hi: Interval((lo + hi) / 2, lo, hi, 0.95, 3, 64)
    assert compare(iv(0.5, 0.7), iv(0.1, 0.3), "greater") == "separate"
    assert compare(iv(0.5, 0.7), iv(0.1, 0.3), "less") == "reversed"
    assert compare(iv(0.2, 0.6), iv(0.1, 0.3), "greater") == "overlap"
    assert compare(iv(0.2, 0.3), iv(0.3, 0.4), "less") == "overlap"      # touching is overlap


def _point(step, acc, rkl, fkl, n=64, rng=None):
    """Per-prompt values whose means are ``acc`` / ``rkl`` / ``fkl`` (10 tokens a prompt)."""
    rng = rng or np.random.default_rng(step)
    correct = (np.arange(n) < round(acc * n)).astype(float)
    noise = lambda m: (m * 10 * (1 + 0.2 * rng.standard_normal(n))).tolist()
    return {"opd_step": step, "per_prompt": {"correct": correct.tolist(), "rkl": noise(rkl),
                                             "rkl_tokens": [10.0] * n, "fkl": noise(fkl),
                                             "fkl_tokens": [10.0] * n}}


def _arm(points):
    """Three seeds with the given ``(step, acc, rkl, fkl)`` points (small seed-to-seed noise)."""
    return {"seeds": {str(s): {"points": [_point(st, a, r, f, rng=np.random.default_rng(
        (s, st))) for st, a, r, f in points]} for s in range(3)}}


def _verdicts(arms, teacher):
    return {f["id"]: f["verdict"] for f in judge_capability(arms, teacher, samples=500)}


def test_verdicts_from_intervals_separated_vs_overlapping():
    teacher = {"before": {"correct": [1.0] * 16 + [0.0] * 112},
               "after": {"correct": [1.0] * 90 + [0.0] * 38}}
    paper = {"compatible": _arm([(0, .1, 2.0, 1.2), (12, .12, 0.6, 0.5)]),
             "incompatible": _arm([(0, 0, 4.0, 12.0), (12, 0, 2.0, 14.0)]),
             "cold_start": _arm([(0, 0, 1.5, 2.5), (12, 0, 0.8, 4.0)]),
             "post_aligned": _arm([(0, .1, 2.5, 1.5), (12, .6, 0.7, 0.6)]),
             "post_control": _arm([(0, .1, 2.5, 1.5), (12, .15, 0.9, 0.9)])}
    assert _verdicts(paper, teacher) == {f: "reproduced" for f in
                                         ("T", "F1", "F2", "F3", "F4", "F5")}
    # the same comparisons with differences well inside the intervals: nothing reproduces
    close = {"compatible": _arm([(0, .1, 1.0, 1.0), (12, .12, 0.98, 0.99)]),
             "incompatible": _arm([(0, 0, 1.0, 1.0), (12, 0, 0.98, 0.99)]),
             "cold_start": _arm([(0, 0, 1.0, 1.0), (12, 0, 0.99, 0.99)]),
             "post_aligned": _arm([(0, .1, 1.0, 1.0), (12, .14, 0.98, 0.98)]),
             "post_control": _arm([(0, .1, 1.0, 1.0), (12, .12, 0.98, 0.98)])}
    flat = {"before": {"correct": [1.0] * 40 + [0.0] * 88},
            "after": {"correct": [1.0] * 44 + [0.0] * 84}}
    found = judge_capability(close, flat, samples=500)
    assert {f["id"]: f["verdict"] for f in found} == {f: "not reproduced" for f in
                                                     ("T", "F1", "F2", "F3", "F4", "F5")}
    assert all(f["note"] == "intervals overlap" for f in found)
    # separated the wrong way is "not reproduced", and says so
    swapped = dict(paper, post_aligned=paper["post_control"], post_control=paper["post_aligned"])
    f4 = next(f for f in judge_capability(swapped, teacher, samples=500) if f["id"] == "F4")
    assert f4["verdict"] == "not reproduced" and "other way" in f4["note"]
    # a missing arm or teacher: "not run"
    v = _verdicts({"compatible": paper["compatible"]}, None)
    assert v == {"T": "not run", "F1": "reproduced", "F2": "not run", "F3": "not run",
                 "F4": "not run", "F5": "not run"}


def test_load_capability_config_full_and_small():
    cfg, study, sel = load_study_config(CONFIG)
    assert isinstance(study, CapabilityConfig) and sel is None
    assert cfg.teacher.source == "default" and cfg.data.name == "chain_sum"
    assert study.arms == CAPABILITY_ARMS and len(study.seeds) >= 3 and study.eval_prompts >= 64
    assert study.eval_steps() == [0, 6, 12]
    assert study.control.data.name == "basic_arithmetic"
    cfg, study, _ = load_study_config(CONFIG, ["study.seeds=[4, 5, 6]"], small=True)
    assert cfg.teacher.source == cfg.student.source == "random" and study.seeds == (4, 5, 6)
    assert study.out_dir == "runs/{name}_small"
    # the mechanism study's config still loads as before
    _, demo, demo_sel = load_study_config(DEMO)
    assert not isinstance(demo, CapabilityConfig) and demo_sel is not None
    for bad, key in ((["study.arms=[compatible, nope]"], "study.arms"),
                     (["study.eval_batch_prompts=5"], "study.eval_batch_prompts"),
                     (["study.teacher_training.eval_prompts=32"], "teacher_training.eval_prompts"),
                     (["study.seeds=[1, 1]"], "study.seeds")):
        with pytest.raises(ConfigError, match=key):
            load_capability_config(CONFIG, bad)


def _adam_counts(state):
    return [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
            if "count" in jax.tree_util.keystr(path)]


def test_optimizer_state_persists_across_evaluation_points(tmp_path):
    """One OPD stage per run: the state saved at each evaluation step before the last has the step
    count and the AdamW count of an uninterrupted run, the evaluations see those weights, and a run without
    intermediate evaluations ends with the very same weights."""
    from opd_jax.checkpoint import StageCheckpointer, stage_dir
    from opd_jax.train.models import build_models
    from opd_jax.train.run import load_data

    over = [f"study.out_dir={tmp_path}", "study.opd_steps=3", "study.eval_every=1",
            "study.keep_checkpoints=true"]
    cfg, study = load_capability_config(CONFIG, over, small=True)
    base = build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    train, heldout = load_data(cfg)
    student = Student("compatible", cfg.student, base.student, base.trainable)
    seen = []

    def evaluate(spec, trainable):
        seen.append(jax.tree.map(np.asarray, trainable))
        return {"per_prompt": {"correct": [0.0]}, "means": {}}

    kw = dict(student=student, teacher=base.teacher, tokenizer=base.tokenizer, records=train,
              heldout=heldout, evaluate=evaluate, progress=False)
    with compilation_cache(str(tmp_path / "xla")):
        res = run_seed(cfg, study, "compatible", 0, tmp_path / "every", initial={"x": 1}, **kw)
        assert [p["opd_step"] for p in res["points"]] == [0, 1, 2, 3]
        assert [t["opd_step"] for t in res["train"]] == [1, 2, 3]   # one stage, steps 1..3
        rows = [json.loads(x) for x in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines() if x]
        assert {r["stage"] for r in rows} == {"opd"}
        d = stage_dir(tmp_path / "every", "opd")
        with StageCheckpointer(d, keep_last_n=10, async_save=False) as ck:
            assert ck.all_steps() == [1, 2, 3]
            states = {s: ck.restore_as_saved(s) for s in (1, 2, 3)}
        for s, state in states.items():   # the finished stage's last step: its weights only
            assert s == 3 and set(state) == {"trainable"} or (
                int(state["step"]) == s and _adam_counts(state) and set(_adam_counts(state)) == {s})
            same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b),
                                state["trainable"], seen[s - 1])
            assert all(jax.tree.leaves(same)), s
        study1 = load_capability_config(CONFIG, [over[0], "study.opd_steps=3",
                                                 "study.eval_every=3"], small=True)[1]
        seen.clear()
        run_seed(cfg, study1, "compatible", 0, tmp_path / "once", initial={"x": 1}, **kw)
    assert len(seen) == 1   # evaluated only at the end
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), states[3]["trainable"],
                        seen[0])
    assert all(jax.tree.leaves(same)), "evaluation points changed the trained weights"


REPORT_PARTS = ("# Capability study", "## Findings", "| # | paper's claim | rule | our numbers |",
                "## The teacher's new capability", "| before post-training |",
                "| after post-training |", "## Prompt pools", "## Held-out results per arm",
                "## Plots", "![intervals.png](intervals.png)", "![teacher.png](teacher.png)",
                "![heldout.png](heldout.png)", "## Notes", "AdamW's moments persist")


@pytest.mark.slow  # ~2 min on 2 cores: 1 teacher SFT + 15 tiny runs (5 arms x 3 seeds)
def test_small_capability_study_end_to_end(tmp_path):
    over = [f"study.out_dir={tmp_path}/study", f"study.compilation_cache={tmp_path}/xla"]
    cfg, study = load_capability_config(CONFIG, over, small=True)
    summary = run_capability_study(cfg, study, progress=False)
    out = tmp_path / "study"
    arms = summary["arms"]
    assert list(arms) == list(CAPABILITY_ARMS)
    for name, arm in arms.items():
        assert list(arm["seeds"]) == ["0", "1", "2"]
        for seed, r in arm["seeds"].items():
            assert [p["opd_step"] for p in r["points"]] == [0, 1, 2]
            for p in r["points"]:
                assert len(p["per_prompt"]["correct"]) == study.eval_prompts
                assert all(isinstance(p["means"][k], float) for k in (
                    "accuracy", "onpolicy_reverse_kl", "teacher_samples_forward_kl"))
            assert (out / name / f"seed{seed}" / "result.json").exists()
            assert not (out / name / f"seed{seed}" / "checkpoints" / "opd").exists()  # deleted
    assert arms["post_control"]["train_prompts"] == summary["pools"]["control"]["counts"]["control"]
    # the teacher: before / after on its held-out prompts, checkpoint kept, exported
    t = summary["teacher"]
    assert len(t["before"]["correct"]) == len(t["after"]["correct"]) == 16
    assert t["solutions"]["kept"] == 24 and len(t["loss"]) == 2
    assert any((out / "teacher" / "checkpoints" / "sft").iterdir())
    assert (out / "teacher_hf" / "config.json").exists()
    # verdicts follow from the intervals, and the intervals' estimates from the per-prompt values
    for f in summary["findings"]:
        results = [c["result"] for c in f["comparisons"]]
        for c in f["comparisons"]:
            a, b = c["a_interval"], c["b_interval"]
            above, below = a["low"] > b["high"], a["high"] < b["low"]
            want = "separate" if (above and c["claim"] == "greater") or (
                below and c["claim"] == "less") else "reversed" if above or below else "overlap"
            assert c["result"] == want, (f["id"], c)
        want = "reproduced" if all(r == "separate" for r in results) else "not reproduced"
        assert f["verdict"] == want, f
    acc = lambda arm, i: np.mean([np.mean(r["points"][i]["per_prompt"]["correct"])
                                  for r in arms[arm]["seeds"].values()])
    f4 = next(f for f in summary["findings"] if f["id"] == "F4")["comparisons"][0]
    assert f4["a_interval"]["estimate"] == pytest.approx(acc("post_aligned", -1))
    assert f4["b_interval"]["estimate"] == pytest.approx(acc("post_control", -1))
    report = (out / "report.md").read_text()
    for part in REPORT_PARTS:
        assert part in report, part
    for f in summary["findings"]:
        assert f"| {f['id']} | {f['finding']} |" in report and f"**{f['verdict']}**" in report
    for png in ("intervals.png", "teacher.png", "heldout.png", "train_steps.png"):
        assert (out / png).stat().st_size > 1000
    # a rerun resumes: every run is read back, the findings are the same
    again = run_capability_study(cfg, study, progress=False)
    assert again["findings"] == summary["findings"] and again["arms"] == arms
    cfg2, study2 = load_capability_config(CONFIG, over + ["study.opd_steps=1"], small=True)
    with pytest.raises(ValueError, match="different config"):
        run_capability_study(cfg2, study2, progress=False)
