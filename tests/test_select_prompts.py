"""select-prompts: the selection rule, config split, de-duplication against held-out prompts, the
end-to-end command on tiny random models (scores, jsonl, markdown) and bounded memory per batch."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.config import ConfigError, load_yaml
from opd_jax.data import make_record
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.select_prompts import (
    SIGNALS,
    DedupSpec,
    RuleSpec,
    apply_rule,
    exact_duplicates,
    load_select_config,
    make_batch_scorer,
    near_duplicates,
    normalize_text,
    select_prompts,
    split_config,
)
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.yaml")


def _rows(values):
    """Rows as apply_rule sees them: id i, scores from ``values[i]`` (a dict)."""
    return [{"record": {"id": f"p{i}"}, "scores": dict(v), "status": None}
            for i, v in enumerate(values)]


def _status(rows):
    return [r["status"] for r in rows]


def test_rule_filters_then_ranks_and_cuts():
    base = dict(teacher_logprob=-0.1, teacher_answer_entropy=0.5)
    rows = _rows([{**base, "teacher_correct": 1.0, "reverse_kl": 0.2},
                  {**base, "teacher_correct": 0.0, "reverse_kl": 9.0},
                  {**base, "teacher_correct": None, "reverse_kl": 5.0},
                  {**base, "teacher_correct": 1.0, "reverse_kl": 0.7, "teacher_logprob": -3.0},
                  {**base, "teacher_correct": 1.0, "reverse_kl": 0.9},
                  {**base, "teacher_correct": 1.0, "reverse_kl": 0.5}])
    rows[5]["status"] = "exact_dup"  # dedup statuses are kept
    apply_rule(rows, RuleSpec(min_teacher_logprob=-1.0, uncheckable="keep", top_n=2))
    assert _status(rows) == ["below_cutoff", "teacher_incorrect", "selected", "teacher_unconfident",
                             "selected", "exact_dup"]
    assert rows[2]["rank"] == 0 and rows[4]["rank"] == 1  # by reverse KL, descending
    rows = _rows([{**base, "teacher_correct": None, "reverse_kl": 1.0},
                  {**base, "teacher_correct": 0.0, "reverse_kl": 2.0}])
    apply_rule(rows, RuleSpec(uncheckable="drop", teacher_correct=False, descending=False))
    assert _status(rows) == ["uncheckable", "selected"]
    rows = _rows([{**base, "teacher_correct": 1.0, "reverse_kl": 0.1, "teacher_answer_entropy": e}
                  for e in (0.1, 2.0, 0.3)])
    apply_rule(rows, RuleSpec(max_teacher_entropy=1.0, rank_by="teacher_answer_entropy",
                              descending=False, fraction=0.5))
    assert _status(rows) == ["selected", "teacher_unconfident", "below_cutoff"]


def test_rule_weighted_score_random_and_missing_values():
    vals = [dict(reverse_kl=r, overlap=o, teacher_correct=1.0, teacher_logprob=0.0,
                 teacher_answer_entropy=0.0) for r, o in [(1.0, 0.9), (3.0, 0.1), (2.0, 0.5)]]
    rows = apply_rule(_rows(vals), RuleSpec(rank_by="score", weights={"reverse_kl": 1.0,
                                                                      "overlap": 0.5}, top_n=1))
    z = np.sqrt(1.5)  # z-scores: reverse_kl (-z, z, 0), overlap (z, -z, 0)
    assert [r["scores"]["selection_score"] for r in rows] == pytest.approx([-z / 2, z / 2, 0.0])
    assert _status(rows) == ["below_cutoff", "selected", "below_cutoff"]
    rows = apply_rule(_rows(vals), RuleSpec(rank_by="score", weights={"overlap": 2.0}, top_n=1))
    assert _status(rows) == ["selected", "below_cutoff", "below_cutoff"]
    order = lambda seed: [r.get("rank") for r in apply_rule(
        _rows(vals), RuleSpec(rank_by="random"), seed=seed)]
    assert order(0) == order(0) and sorted(order(0)) == [0, 1, 2]
    vals[0]["reverse_kl"] = None  # a missing value ranks last
    rows = apply_rule(_rows(vals), RuleSpec())
    assert [r["rank"] for r in rows] == [2, 0, 1]


def test_rule_and_config_validation():
    with pytest.raises(ConfigError, match="select.rule.rank_by"):
        split_config({"select": {"rule": {"rank_by": "nope"}}}, [])
    with pytest.raises(ConfigError, match="select.rule.fraction"):
        split_config({"select": {"rule": {"top_n": 3, "fraction": 0.5}}}, [])
    with pytest.raises(ConfigError, match="weights"):
        split_config({"select": {"rule": {"rank_by": "score"}}}, [])
    with pytest.raises(ConfigError, match="select.dedup.treshold"):
        split_config({}, ["select.dedup.treshold=0.5"])
    cfg, sel = load_select_config(os.path.join(ROOT, "configs", "select_demo.yaml"),
                                  ["select.rule.top_n=5", "seed=3"])
    assert sel.rule.top_n == 5 and cfg.seed == 3 and cfg.student.derive.drop_layers == (10, 15, 20)
    cfg, _ = load_select_config(os.path.join(ROOT, "configs", "study_demo.yaml"))  # study: ignored
    assert cfg.name == "study_demo"


def test_normalize_and_exact_duplicates():
    assert normalize_text(" Calculate\t4 +  1.\n") == normalize_text("CALCULATE 4 + 1.")
    assert normalize_text("ﬁ") == "fi"  # NFKC
    pool = [make_record(str(i), p, source="t") for i, p in enumerate(["a b", "c", "d"])]
    rows = [{"record": r, "scores": {}, "status": None} for r in pool]
    exact_duplicates(rows, [make_record("h", "  A\nB ", source="h")])
    assert _status(rows) == ["exact_dup", None, None]


def _pool_and_heldout():
    """12 distinct 1-digit sums (checkable answers) and a held-out set holding: case/whitespace
    variants of pool[0], pool[1] (exact duplicates after normalisation) and identical-text copies
    of pool[2], pool[3] under new ids."""
    pairs = [(a, b) for a in range(1, 5) for b in range(1, 4)]
    pool = [make_record(f"pool{i}", f"Calculate {a} + {b}.", source="sums", answer=a + b)
            for i, (a, b) in enumerate(pairs)]
    heldout = [dict(pool[0], id="h-case", prompt=pool[0]["prompt"].upper()),
               dict(pool[1], id="h-space", prompt="  " + pool[1]["prompt"].replace(" ", "\t ")),
               dict(pool[2], id="h-copy2"), dict(pool[3], id="h-copy3"),
               make_record("h-other", "Calculate 9 * 9.", source="h", answer=81)]
    return pool, heldout


def test_near_duplicates_of_identical_text(tmp_path):
    from opd_jax.config import load_config
    from opd_jax.train.models import build_models
    from opd_jax.train.run import make_template

    cfg = load_config(TINY)
    m = build_models(cfg.teacher, cfg.student, seed=0)
    pool, heldout = _pool_and_heldout()
    rows = [{"record": r, "scores": {}, "status": None} for r in pool]
    near_duplicates(rows, heldout, m.teacher, m.tokenizer, make_template(cfg),
                    DedupSpec(threshold=0.999), max_len=64, batch_prompts=4)
    sims = [r["scores"]["heldout_similarity"] for r in rows]
    assert all(math.isfinite(s) and -1.0001 <= s <= 1.0001 for s in sims)
    assert sims[2] == pytest.approx(1.0, abs=1e-5) and sims[3] == pytest.approx(1.0, abs=1e-5)
    assert rows[2]["status"] == rows[3]["status"] == "near_dup"
    assert all(r["status"] is None for r in rows[4:])  # distinct prompts stay


def test_select_end_to_end_on_tiny_models(tmp_path):
    pool, heldout = _pool_and_heldout()
    raw = load_yaml(TINY)
    raw["select"] = {"out_dir": str(tmp_path / "sel"), "batch_prompts": 4, "chunk_size": 8,
                     "metrics_k": 4, "dedup": {"threshold": 0.999},
                     "rule": {"teacher_correct": False, "top_n": 3}}
    cfg, sel = split_config(raw, [f"out_dir={tmp_path}/run", "sampler.n_samples=2",
                                  "sampler.max_new_tokens=4"])
    summary = select_prompts(cfg, sel, pool=pool, heldout=heldout, progress=False)
    c = summary["counts"]
    # exact first: the case/whitespace variants and the identical copies are all exact duplicates
    assert c["exact_dup"] == 4 and c["near_dup"] == 0
    assert summary["scored"] == 8 and summary["selected_count"] == 3 == len(summary["selected"])
    out = tmp_path / "sel"
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows[:4]] == ["exact_dup"] * 4
    scored = [r for r in rows if r["status"] not in ("exact_dup", "near_dup")]
    for r in scored:
        for k in SIGNALS:
            v = r["scores"][k]
            assert isinstance(v, float) and math.isfinite(v), (k, v)
        assert 0 <= r["scores"]["overlap"] <= 1 and r["scores"]["reverse_kl"] >= -1e-5
        assert r["scores"]["teacher_correct"] in (0.0, 1.0)
        assert r["teacher_completion"] is not None
    selected = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert [s["rank"] for s in selected] == [0, 1, 2]
    rkl = [s["scores"]["reverse_kl"] for s in selected]
    assert rkl == sorted(rkl, reverse=True)
    assert min(rkl) >= max(r["scores"]["reverse_kl"] for r in scored if r["status"] ==
                           "below_cutoff")
    assert {"id", "prompt", "answer", "source", "metadata"} <= set(selected[0])
    report = (out / "report.md").read_text()
    for part in ("## De-duplication against the held-out set", "## Selection rule",
                 "## Signals: pool vs selected (means)", "| exact (normalised text",
                 "| near duplicate", "| **selected** | **3** |"):
        assert part in report, part
    assert "| reverse_kl (" in report
    means = summary["means"]
    assert means["selected"]["reverse_kl"] == pytest.approx(np.mean(rkl))

    # near rule alone: the identical-text copies (new ids) are near duplicates (cosine 1)
    raw["select"]["dedup"]["exact"] = False
    raw["select"]["out_dir"] = str(tmp_path / "sel2")
    cfg, sel = split_config(raw, [f"out_dir={tmp_path}/run", "sampler.n_samples=2",
                                  "sampler.max_new_tokens=4"])
    summary = select_prompts(cfg, sel, pool=pool, heldout=heldout, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "sel2" / "scores.jsonl").read_text().splitlines()]
    assert summary["counts"]["exact_dup"] == 0
    assert rows[2]["status"] == rows[3]["status"] == "near_dup"
    assert all(r["status"] not in ("exact_dup", "near_dup") for r in rows[4:])


def test_batch_scorer_memory_is_bounded_by_a_chunk_not_the_batch():
    """The per-batch scorer's compiled temporaries stay below one batch of logits and grow with the
    batch by activations only, not logits (chunked: a few [chunk, V] buffers); it returns
    per-prompt scalars only, so the pool streams through it batch by batch with nothing else
    accumulating."""
    V, N, n, chunk = 8192, 32, 2, 16
    cs = ModelConfig(vocab_size=V, n_layers=1, d_model=32, ffn_dim=64, n_heads=2, n_kv_heads=1,
                     head_dim=16)
    ct = ModelConfig(vocab_size=V, n_layers=2, d_model=64, ffn_dim=128, n_heads=4, n_kv_heads=2,
                     head_dim=16)
    ps, pt = dec.init_params(cs, jax.random.key(0)), dec.init_params(ct, jax.random.key(1))

    def batch(rows):
        toks = jax.random.randint(jax.random.key(rows), (rows, 16 + N), 0, V)
        valid = jnp.ones(toks.shape, bool)
        return RolloutBatch(toks, valid, toks, valid, toks[:, 16:], valid[:, 16:],
                            jnp.zeros((rows, N)))

    fn = make_batch_scorer(StudentSpec(cs), TeacherSpec("separate", ct), n, chunk, 16)
    temps = {}
    for P in (8, 24):
        sb, tb = batch(P * n), batch(P)
        compiled = fn.lower(ps, None, pt, sb, tb).compile()
        temps[P] = compiled.memory_analysis().temp_size_in_bytes
        if P == 8:
            out = compiled(ps, None, pt, sb, tb)
            assert all(v.shape == (P,) for v in out.values())
            assert set(out) == set(SIGNALS) - {"teacher_correct", "student_accuracy",
                                               "heldout_similarity"}
    one_batch_of_logits = 8 * n * N * V * 4  # the student's alone, at P = 8
    assert temps[8] < one_batch_of_logits / 2, (temps, one_batch_of_logits)
    # what grows with the batch is activations ([B, T, D]-sized), not logits ([B, T, V])
    extra_tokens = (24 - 8) * (n + 1) * (16 + N)
    assert (temps[24] - temps[8]) / extra_tokens < V * 4 / 8, temps
