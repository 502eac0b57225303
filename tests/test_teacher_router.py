"""Several teachers (``teachers:``): rows routed by their prompt record's source, each teacher's
scores in place, per-teacher metrics; a run whose routes send every prompt to one teacher equals
the single-teacher run; bad routes are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.model import decoder as dec
from opd_jax.model.config import ModelConfig
from opd_jax.teacher.router import TeacherRouter, record_source
from opd_jax.teacher.scoring import score_completions
from opd_jax.teacher.source import LocalTeacher
from opd_jax.train.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")
C1 = ModelConfig(vocab_size=64, n_layers=1, d_model=32, ffn_dim=64, n_heads=2, n_kv_heads=1,
                 head_dim=16)
C2 = C1.replace(n_layers=2)


def _records(sources):
    return [{"id": str(i), "source": "file.jsonl", "metadata": {"source": s} if s else {}}
            for i, s in enumerate(sources)]


def test_route_index_patterns_catch_all_and_errors():
    a, b = object(), object()
    router = TeacherRouter([("math", ("arith*", "*sum"), a), ("rest", (), b)])
    got = router.route_index(_records(["arithmetic", "chain_sum", "words", None]))
    np.testing.assert_array_equal(got, [0, 0, 1, 1])
    assert record_source(_records([None])[0]) == "file.jsonl"
    strict = TeacherRouter([("math", ("arith*",), a), ("sums", ("*sum",), b)])
    with pytest.raises(ValueError, match="'words'.*empty route"):
        strict.route_index(_records(["words"]))


def test_router_scores_each_row_with_its_own_teacher():
    p1, p2 = dec.init_params(C1, jax.random.key(1)), dec.init_params(C2, jax.random.key(2))
    router = TeacherRouter([("one", ("a",), LocalTeacher(p1, C1)),
                            ("two", ("b",), LocalTeacher(p2, C2))])
    rng = np.random.default_rng(0)
    B, T, n = 5, 12, 6
    tokens = rng.integers(1, 64, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[:, :3] = False
    q = rng.integers(0, 64, (B, n, 3)).astype(np.int32)
    sources = ["a", "b", "b", "a", "b"]
    got = router.score(tokens, valid, q, n=n, k=4, temperature=1.0, records=_records(sources))
    for params, config, name in ((p1, C1, "a"), (p2, C2, "b")):
        ref = score_completions(params, config, tokens, valid, q, n=n, k=4)
        rows = [i for i, s in enumerate(sources) if s == name]
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(g)[rows], np.asarray(r)[rows], atol=1e-6)


TEACHER = ("{source: random, name: NAME, route: ROUTE, derive: {random_init: true, n_layers: 2, "
           "d_model: 64, ffn_dim: 128, n_heads: 4, n_kv_heads: 2, head_dim: 16}}")
OTHER = ("{source: random, name: NAME, route: ROUTE, derive: {random_init: true, n_layers: 1, "
         "d_model: 32, ffn_dim: 64, n_heads: 2, n_kv_heads: 1, head_dim: 16}}")


def _data(tmp_path) -> list[str]:
    path = tmp_path / "mixed.jsonl"
    rows = [{"question": f"{i} + {i}", "answer": str(2 * i),
             "source": "arith" if i % 2 else "words"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data.source=jsonl", f"data.path={path}", "data.name=null", "data.size=20",
            "data.heldout_size=4", "stages=[{kind: opd, steps: 2, batch_prompts: 4}]",
            "teacher.source=default", "teacher.derive=null"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_teachers_route_rows_and_log_their_own_metrics(tmp_path):
    common = _data(tmp_path)
    teachers = (TEACHER.replace("NAME", "big").replace("ROUTE", "[arith]") + ", "
                + OTHER.replace("NAME", "small").replace("ROUTE", "[]"))
    run(load_config(TINY, [f"out_dir={tmp_path}/run", *common, f"teachers=[{teachers}]"]),
        progress=False)
    rows = _rows(tmp_path / "run")
    for r in rows:
        assert r["big/completion_tokens"] + r["small/completion_tokens"] == r["completion_tokens"]
        assert 0 <= r["big/overlap"] <= 1 and 0 <= r["small/overlap"] <= 1
    assert sum(r["big/completion_tokens"] for r in rows) > 0     # both teachers had rows
    assert sum(r["small/completion_tokens"] for r in rows) > 0


def test_routes_sending_everything_to_one_teacher_equal_the_single_teacher_run(tmp_path):
    common = _data(tmp_path)
    single = [o for o in common if not o.startswith("teacher.")]
    run(load_config(TINY, [f"out_dir={tmp_path}/one", *single]), progress=False)
    teachers = (TEACHER.replace("NAME", "big").replace("ROUTE", "[]") + ", "
                + OTHER.replace("NAME", "small").replace("ROUTE", "[nothing]"))
    run(load_config(TINY, [f"out_dir={tmp_path}/two", *common, f"teachers=[{teachers}]"]),
        progress=False)
    for a, b in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two")):
        for key in ("loss", "overlap", "token_reverse_kl", "teacher_token_logprob", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=2e-5), key
        assert b["big/completion_tokens"] == a["completion_tokens"]
        assert b["small/completion_tokens"] == 0


@pytest.mark.parametrize("teachers, words", [
    ("[{source: random, name: a}, {source: random, name: a}]", "unique name"),
    ("[{source: random, name: a}, {source: random, name: b}]", "at most one"),
    ("[{source: random, name: a, route: ['']}, {source: random}]", "route"),
])
def test_bad_teachers_sections_are_refused_by_name(teachers, words):
    with pytest.raises(ValueError, match=words):
        load_config(TINY, [f"teachers={teachers}", "teacher.source=default",
                           "teacher.derive=null"])
