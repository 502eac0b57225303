"""opd-jax study: stage schedule, config loading, verdict rules, and the whole pipeline on tiny
random models (report sections, findings table, plots, resume, same numbers on a rerun)."""

import json
import os

import pytest

from opd_jax.config import ConfigError, to_dict
from opd_jax.study import (
    ARMS,
    HELDOUT,
    TRAIN,
    FindingRules,
    StudyConfig,
    arm_series,
    arm_stages,
    judge,
    load_study_config,
    plot_study,
    run_study,
    write_study_report,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "study_demo.yaml")
R, F, O = "onpolicy_reverse_kl", "teacher_samples_forward_kl", "onpolicy_overlap"


def test_arm_stages_split_opd_with_evals_between():
    stages, at = arm_stages(StudyConfig(opd_steps=7, eval_every=3), cold_start=False)
    assert [s["name"] for s in stages] == ["eval_opd000", "opd_000-003", "eval_opd003",
                                           "opd_003-006", "eval_opd006", "opd_006-007",
                                           "eval_opd007"]
    assert [s.get("steps") for s in stages if s["kind"] == "opd"] == [3, 3, 1]
    assert at == {"eval_opd000": 0, "eval_opd003": 3, "eval_opd006": 6, "eval_opd007": 7}
    stages, at = arm_stages(StudyConfig(opd_steps=2, eval_every=5, cold_start_steps=4,
                                        cold_start_lr=1e-4), cold_start=True)
    assert [s["kind"] for s in stages] == ["eval", "cold_start", "eval", "opd", "eval"]
    cs = stages[1]
    assert cs["steps"] == 4 and cs["optim"] == {"lr": 1e-4}
    assert cs["filters"]["answer_format"] == "any_number"
    assert at["eval_pre_cold_start"] == "pre" and at["eval_opd002"] == 2


def test_load_study_config_demo_small_and_errors():
    cfg, study, sel = load_study_config(DEMO)
    assert cfg.teacher.source == "default" and cfg.student.derive.drop_layers == (10, 15, 20)
    assert study.incompatible_student.derive.keep_every == 3
    assert study.cold_start_filters.answer_format == "any_number"
    assert study.arms == ARMS and sel.rule.rank_by == "teacher_logprob"
    cfg, study, sel = load_study_config(DEMO, ["study.opd_steps=3", "select.pool_size=5",
                                               "optim.lr=1e-4"], small=True)
    assert cfg.teacher.source == cfg.student.source == "random" and cfg.optim.lr == 1e-4
    assert study.opd_steps == 3 and sel.pool_size == 5
    assert study.out_dir == "runs/{name}_small"  # never mixed with a real study's directory
    with pytest.raises(ConfigError, match="study.opd_stepz"):
        load_study_config(DEMO, ["study.opd_stepz=3"])
    with pytest.raises(ConfigError, match="study.arms"):
        load_study_config(DEMO, ["study.arms=[compatible, nope]"])


def test_arm_series_reads_evals_and_training_rows(tmp_path):
    rows = [{"stage": "cold_start", "kind": "cold_start", "step": 1, "loss": 2.5},
            {"stage": "eval_opd000", "kind": "eval", "step": 0, R: 9.0},
            {"stage": "opd_000-001", "kind": "opd", "step": 1, "loss": 1.5, "overlap": 0.25},
            {"stage": "opd_001-002", "kind": "opd", "step": 1, "loss": 1.0, "overlap": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    evals = {"eval_opd000": {R: 2.0, "teacher_accuracy": 0.5}, "eval_opd002": {R: 1.0}}
    s = arm_series(tmp_path, evals, {"eval_opd000": 0, "eval_opd002": 2})
    assert [(p["opd_step"], p[R], p["teacher_accuracy"]) for p in s["heldout"]] == [
        (0, 2.0, 0.5), (2, 1.0, None)]
    assert set(s["heldout"][0]) == {"opd_step", "teacher_accuracy", *(k for k, _ in HELDOUT)}
    assert [(t["opd_step"], t["loss"], t["overlap"], t["student_entropy"]) for t in s["train"]] == [
        (1, 1.5, 0.25, None), (2, 1.0, 0.5, None)]
    assert s["cold_start_loss"] == [2.5]


def _arm(points):
    return {"heldout": [{"opd_step": s, R: r, F: f, O: o} for s, r, f, o in points]}


def test_judge_verdicts_follow_the_rules():
    rules = FindingRules()
    works = _arm([(0, 1.0, 1.0, 0.5), (5, 0.6, 0.8, 0.7)])       # rkl -40 %, overlap up
    weak = _arm([(0, 1.0, 1.0, 0.5), (5, 0.8, 0.8, 0.7)])        # rkl only -20 %
    stall = _arm([(0, 1.0, 13.0, 0.1), (5, 0.9, 12.0, 0.1)])     # fkl -8 %
    learns = _arm([(0, 1.0, 13.0, 0.1), (5, 0.5, 5.0, 0.3)])     # fkl -62 %
    rescued = _arm([("pre", 1.0, 13.0, 0.1), (0, 1.0, 2.0, 0.4), (5, 0.5, 1.0, 0.6)])
    v = lambda arms: {f["id"]: f["verdict"] for f in judge(arms, rules)}
    assert v({"compatible": works, "incompatible": stall, "cold_start": rescued,
              "aligned": _arm([(0, 1, 1, .5), (5, 0.5, 0.9, .6)]),
              "random": _arm([(0, 1, 1, .5), (5, 0.6, 0.9, .6)])}) == {
        "F1": "reproduced", "F2": "reproduced", "F3": "reproduced", "F4": "reproduced"}
    assert v({"compatible": weak, "incompatible": learns, "cold_start": stall,
              "aligned": _arm([(0, 1, 1, .5), (5, 0.58, 0.9, .6)]),
              "random": _arm([(0, 1, 1, .5), (5, 0.6, 0.9, .6)])}) == {
        "F1": "not reproduced", "F2": "not reproduced", "F3": "not reproduced",
        "F4": "not reproduced"}
    none = _arm([(0, None, 1.0, 0.5), (5, 0.5, 1.0, 0.6)])
    assert v({"compatible": none}) == {"F1": "not run", "F2": "not run", "F3": "not run",
                                       "F4": "not run"}


def _expected_verdicts(arms, rules):
    """The rules of the report, re-derived independently from the held-out points."""
    def ends(arm, key):
        pts = [p for p in arms[arm]["heldout"] if p["opd_step"] != "pre"]
        return pts[0][key], pts[-1][key]
    word = lambda ok: "reproduced" if ok else "not reproduced"
    r0, r1 = ends("compatible", R)
    o0, o1 = ends("compatible", O)
    f0, f1 = ends("incompatible", F)
    return {"F1": word(r1 < (1 - rules.rkl_drop) * r0 and o1 > o0),
            "F2": word(f1 > (1 - rules.stall_drop) * f0),
            "F3": word(ends("cold_start", F)[1] < rules.rescue_ratio * f1
                       and ends("cold_start", O)[1] > ends("incompatible", O)[1]),
            "F4": word(ends("aligned", R)[1] < (1 - rules.aligned_margin) * ends("random", R)[1]
                       and ends("aligned", F)[1] <= ends("random", F)[1])}


REPORT_PARTS = ("# OPD study", "## Findings", "| # | paper finding | rule | numbers | verdict |",
                "## Held-out evaluations", "### 1. OPD, compatible student",
                "### 2. OPD, incompatible student", "### 3. cold start (SFT) then OPD",
                "### 4a. OPD on teacher-aligned", "### 4b. OPD on as many random prompts",
                "## Plots", "![heldout](heldout.png)", "![train_steps](train_steps.png)",
                "## Notes", "forward KL on teacher samples", "before cold start")


def test_report_sections_and_plots_from_numbers(tmp_path):
    """Report and plots from a synthetic summary (no models): every section, one findings row
    per finding with the verdict judge() gave, skipped arms and missing numbers shown."""
    import numpy as np

    rng = np.random.default_rng(0)
    arms = {}
    for arm in ARMS[:-1]:
        steps = (["pre"] if arm == "cold_start" else []) + [0, 5, 10]
        arms[arm] = {"student": "compatible", "train_prompts": 8, "seconds": 1.0,
                     "heldout": [{"opd_step": s, **{k: float(rng.uniform(0.1, 2))
                                                    for k, _ in HELDOUT}} for s in steps],
                     "train": [{"opd_step": i, **{k: float(rng.uniform(0.1, 2)) for k, _ in TRAIN}}
                               for i in range(1, 11)],
                     "cold_start_loss": [2.0, 1.5] if arm == "cold_start" else []}
    arms["compatible"]["heldout"][1]["accuracy"] = None
    arms["random"] = {"skipped": "the selection rule kept no prompt"}
    cfg, study, _ = load_study_config(DEMO)
    summary = {"arms": arms, "findings": judge(arms, study.rules),
               "study": to_dict(study),
               "seconds": {"models": 1.0, "total": 60.0}}
    report = write_study_report(tmp_path, cfg, summary).read_text()
    for part in REPORT_PARTS:
        assert part in report, part
    assert "skipped: the selection rule kept no prompt" in report
    assert summary["findings"][3]["verdict"] == "not run"
    for f in summary["findings"]:
        assert f"| {f['id']} | {f['finding']} | {f['rule']} |" in report
        assert f"**{f['verdict']}** |" in report
    assert all((tmp_path / p).stat().st_size > 1000 for p in ("heldout.png", "train_steps.png"))
    assert [p.name for p in plot_study(tmp_path, arms)] == ["heldout.png", "train_steps.png"]


@pytest.mark.slow  # ~2 min on 2 quiet cores (compiles of ~10 programs), ~5 min under load
def test_study_end_to_end_on_tiny_models(tmp_path):
    cache = f"study.compilation_cache={tmp_path}/xla"
    cfg, study, sel = load_study_config(DEMO, [f"study.out_dir={tmp_path}/study", cache],
                                        small=True)
    summary = run_study(cfg, study, sel, progress=False)
    out = tmp_path / "study"
    arms = summary["arms"]
    assert list(arms) == list(ARMS)
    for name, arm in arms.items():
        steps = [p["opd_step"] for p in arm["heldout"]]
        assert steps == (["pre", 0, 1, 2] if name == "cold_start" else [0, 1, 2]), (name, steps)
        assert [t["opd_step"] for t in arm["train"]] == [1, 2]
        for p in arm["heldout"]:
            assert all(isinstance(p[k], float) for k in (R, F, O, "accuracy")), p
        assert (out / name / "arm.json").exists() and (out / name / "metrics.jsonl").exists()
        # the arm is done: its train checkpoints are deleted, the eval results kept
        kept = sorted(d.name for d in (out / name / "checkpoints").iterdir())
        assert kept == sorted(f"eval_{x}" for x in (["pre_cold_start"] if name == "cold_start"
                                                    else []) + ["opd000", "opd001", "opd002"])
    assert len(arms["cold_start"]["cold_start_loss"]) == 1
    assert arms["aligned"]["train_prompts"] == arms["random"]["train_prompts"] == 2
    sel_ids = [json.loads(x)["id"] for x in (out / "select" / "selected.jsonl").read_text()
               .splitlines()]
    assert len(sel_ids) == 2

    findings = {f["id"]: f for f in summary["findings"]}
    assert list(findings) == ["F1", "F2", "F3", "F4"]
    expected = _expected_verdicts(arms, study.rules)
    assert {k: f["verdict"] for k, f in findings.items()} == expected

    report = (out / "report.md").read_text()
    for part in REPORT_PARTS + ("## Prompt selection (arm 4)",):
        assert part in report, part
    for k, f in findings.items():
        assert f"| {k} | {f['finding']} |" in report and f"**{f['verdict']}**" in report
    for png in ("heldout.png", "train_steps.png"):
        assert (out / png).stat().st_size > 1000
    saved = json.loads((out / "study_summary.json").read_text())
    assert saved["findings"] == summary["findings"]

    # a rerun without --fresh resumes: every arm is read back, the numbers are the same
    again = run_study(cfg, study, sel, progress=False)
    assert again["arms"] == arms and again["findings"] == summary["findings"]

    # a changed config in the same directory is refused (no silent mix of two studies)
    cfg3, study3, sel3 = load_study_config(DEMO, [f"study.out_dir={tmp_path}/study", cache,
                                                  "study.opd_steps=1"], small=True)
    with pytest.raises(ValueError, match="different config"):
        run_study(cfg3, study3, sel3, progress=False)

    # fixed seeds: a fresh run of one arm gives the same numbers on this machine
    cfg2, study2, sel2 = load_study_config(DEMO, [f"study.out_dir={tmp_path}/again", cache,
                                                  "study.arms=[compatible]"], small=True)
    one = run_study(cfg2, study2, sel2, progress=False, fresh=True)
    strip = lambda a: {k: v for k, v in a.items() if k != "seconds"}
    assert strip(one["arms"]["compatible"]) == strip(arms["compatible"])
    assert {f["id"]: f["verdict"] for f in one["findings"]}["F2"] == "not run"
