"""Tests for opd_jax.eval: extraction, grading, pass@k / Avg@k, evaluate (the filters:
tests/test_cold_start_filters.py)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_jax import eval as ev

# ----------------------------------------------------------------------------- extraction

EXTRACTION_TABLE = [
    (r"The result is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{ {2} + {3} }", "{2} + {3}"),
    (r"\boxed{1,234.50}", "1234.5"),
    (r"broken \boxed{7 and later 9", "9"),  # unbalanced: falls back to the last number
    ("reasoning\n#### 1,000", "1000"),
    ("#### 5\nmore text\n#### -3.0", "-3"),
    ("Answer: 3\nActually... Answer: 4", "4"),
    ("answer: **12**.", "12"),
    ("Final Answer: $2.50$", "2.5"),
    ("Answer:\n\n  17\n", "17"),
    ("The answer is: yes", "yes"),
    ("Answer: Paris  France", "Paris France"),
    (r"\boxed{8} ... Answer: 9", "8"),  # boxed wins over Answer:
    ("#### 6\nAnswer: 7", "6"),  # #### wins over Answer:
    ("we get 3 apples and 1,250 pears.", "1250"),
    ("temperature -4 then +5", "5"),
    ("x = .5", "0.5"),
    ("Answer: 1 000", "1000"),
    ("Answer: -0", "0"),
    ("no numbers here", None),
    ("", None),
    ("Answer:", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_TABLE)
def test_extract_answer_table(text, expected):
    assert ev.extract_answer(text) == expected


def test_extract_without_number_fallback():
    assert ev.extract_answer("it is 12", fallback_to_last_number=False) is None
    assert ev.extract_answer("Answer: 12", fallback_to_last_number=False) == "12"


@pytest.mark.parametrize("a,b,same", [
    ("1,000", "1000", True), ("2.0", "2", True), ("0.5", "1/2", True), ("1/3", "0.333333333", True),
    ("3", "3.0001", False), ("-2", "2", False), ("abc", "abc", True), ("abc", "ABC", False),
    ("1e3", "1000", True), (None, "1", False),
])
def test_answers_match(a, b, same):
    assert ev.answers_match(a, b) is same


@given(st.integers(-10**12, 10**12))
@settings(max_examples=100, deadline=None)
def test_integers_round_trip_through_formats(x):
    ref = str(x)
    for text in (f"Answer: {x:,}", f"#### {x}.0", rf"\boxed{{{x}}}", f"so {x}"):
        assert ev.extract_answer(text) == ref, text


# ----------------------------------------------------------------------------- pass@k

def _brute_pass_at_k(n, c, k):
    """Fraction of size-k subsets of n samples (c correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert math.isclose(ev.pass_at_k(n, c, k), _brute_pass_at_k(n, c, k), abs_tol=1e-12)
            assert math.isclose(ev.pass_at_k(n, c, k), 1 - math.comb(n - c, k) / math.comb(n, k),
                                abs_tol=1e-12)


def test_pass_at_k_edges_and_errors():
    assert ev.pass_at_k(200, 0, 10) == 0.0 and ev.pass_at_k(200, 200, 1) == 1.0
    assert 0.0 < ev.pass_at_k(1000, 1, 1) < 0.0011  # stable for large n
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)
    assert ev.avg_at_k(8, 2, 4) == 0.25


# ----------------------------------------------------------------------------- evaluate

def _rec(i, answer, source="toy"):
    return {"id": f"{source}:{i}", "prompt": f"q{i}", "answer": answer, "solution": None,
            "source": source, "metadata": {}}


def test_evaluate_aggregates():
    records = [_rec(0, "4"), _rec(1, "10"), _rec(2, "7", "other")]
    comps = [
        ["Answer: 4", "Answer: 5", "#### 4.0", "nothing"],  # 2 correct, 1 without answer
        ["Answer: 11"] * 4,  # 0 correct
        [r"\boxed{7}", "Answer: 7", "Answer: 7", "Answer: 7"],  # 4 correct
    ]
    out = ev.evaluate(records, comps, ks=(1, 2, 4))
    json.dumps(out)
    assert out["num_prompts"] == 3 and out["num_completions"] == 12
    assert out["accuracy"] == pytest.approx(6 / 12)
    assert out["no_answer_rate"] == pytest.approx(1 / 12)
    assert out["avg@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    expect_p2 = (_brute_pass_at_k(4, 2, 2) + 0 + 1) / 3
    assert out["pass@2"] == pytest.approx(expect_p2) and out["pass@4"] == pytest.approx(2 / 3)
    assert out["per_source"]["toy"]["num_prompts"] == 2
    assert out["per_source"]["toy"]["accuracy"] == pytest.approx(2 / 8)
    assert out["per_source"]["other"]["pass@1"] == 1.0
    assert [p["num_correct"] for p in out["per_prompt"]] == [2, 0, 4]


def test_evaluate_errors():
    with pytest.raises(ValueError, match="one list of completions per record"):
        ev.evaluate([_rec(0, "1")], [])
    with pytest.raises(ValueError, match="'toy:0' has 1 completions but k=2"):
        ev.evaluate([_rec(0, "1")], [["Answer: 1"]], ks=(2,))
    with pytest.raises(ValueError, match="no reference answer"):
        ev.evaluate([_rec(0, None)], [["Answer: 1"]])


def test_evaluate_reasoning_gym_records():
    from opd_jax import data

    recs = data.load_reasoning_gym("chain_sum", size=3, seed=1)
    comps = [[f"Answer: {r['answer']}", "Answer: 99999"] for r in recs]
    out = ev.evaluate(recs, comps, ks=(1, 2))
    assert out["accuracy"] == 0.5 and out["pass@2"] == 1.0
    assert list(out["per_source"]) == ["reasoning_gym:chain_sum"]
    # reasoning-gym's own scorer decides; its partial credit is a score, not a correct answer.
    rec = data.load_reasoning_gym("letter_counting", size=1, seed=0)[0]
    completion = f"Answer: {rec['answer']} letters"
    assert 0.0 < ev.score_completion(rec, completion) < 1.0
    assert not ev.is_correct(rec, completion)


# filters (cold-start rejection sampling): tests/test_cold_start_filters.py
