"""Cold-start rejection filters (opd_jax.eval.filters) against thunlp/OPD's own code.

The ``ref_*`` functions below are thunlp/OPD ``scripts/infer/vllm_rollout.py`` (commit 0a44395),
lines 17-73, copied literally (only renamed); every comparison runs them, not our code, as the
reference. Strings only: nothing here is floating point.
"""

import random
from collections import Counter

import pytest

from opd_jax.config import ConfigError, load_config
from opd_jax.config.schema import FilterSpec
from opd_jax.eval import filters as F

# ---------------------------------------------------------------- the reference, verbatim


def ref_has_boxed(text: str) -> bool:
    """Check if output contains \\boxed{}."""
    return "\\boxed" in text


def ref_detect_repeated_lines(text: str, min_len: int = 20, threshold: int = 5) -> bool:
    """Detect if any line (len >= min_len) appears >= threshold times."""
    lines = [line.strip() for line in text.split("\n") if len(line.strip()) >= min_len]
    if not lines:
        return False
    counter = Counter(lines)
    return counter.most_common(1)[0][1] >= threshold


def ref_detect_ngram_repetition(text: str, n: int = 100, threshold: int = 3) -> bool:
    """Detect if any n-char substring appears >= threshold times (sliding window)."""
    if len(text) < n * threshold:
        return False
    seen = {}
    for i in range(0, len(text) - n + 1, 10):
        chunk = text[i : i + n]
        seen[chunk] = seen.get(chunk, 0) + 1
        if seen[chunk] >= threshold:
            return True
    return False


def ref_detect_consecutive_repeat(text: str, block_size: int = 50, threshold: int = 3) -> bool:
    """Detect if a consecutive block of text (>= block_size) repeats >= threshold times in a row."""
    if len(text) < block_size * threshold:
        return False
    for i in range(len(text) - block_size * threshold + 1):
        block = text[i : i + block_size]
        count = 1
        pos = i + block_size
        while pos + block_size <= len(text) and text[pos : pos + block_size] == block:
            count += 1
            pos += block_size
            if count >= threshold:
                return True
    return False


def ref_is_valid_output(text: str) -> tuple[bool, str]:
    """
    Returns (is_valid, reason).
    Reject outputs that are missing \\boxed{} or contain repetitive text.
    """
    if not ref_has_boxed(text):
        return False, "no_boxed"
    if ref_detect_repeated_lines(text):
        return False, "repeated_lines"
    if ref_detect_ngram_repetition(text):
        return False, "ngram_repetition"
    if len(text) > 5000 and ref_detect_consecutive_repeat(text):
        return False, "consecutive_repeat"
    return True, "ok"


# the reference's reason names -> ours
REASON = {"ok": None, "no_boxed": F.NO_FINAL_ANSWER, "repeated_lines": F.REPEATED_LINES,
          "ngram_repetition": F.REPEATED_WINDOWS, "consecutive_repeat": F.CONSECUTIVE_REPEAT}


def ours(text: str, config: F.FilterConfig = F.FilterConfig()) -> str | None:
    return F.filter_completion(text, config)


# ---------------------------------------------------------------- texts

BOX = r"so the answer is \boxed{42}."


def words(rng: random.Random, n: int) -> str:
    vocab = ["alpha", "beta", "x", "=", "+", "2", "3", "the", "so", "we", "get", "\\frac{1}{2}"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def random_text(rng: random.Random) -> str:
    """Prose with planted structures near every threshold: repeated lines (with padding
    whitespace, 18-22 chars, 3-6 copies), periodic stretches (periods that do and do not divide
    the window stride), block runs of 2-4 copies, lengths around 300 and 5,000 characters."""
    parts = []
    for _ in range(rng.randint(1, 14)):
        kind = rng.randrange(6)
        if kind == 0:
            parts.append(words(rng, rng.randint(1, 60)) + "\n")
        elif kind == 1:
            line = "".join(rng.choice("ab c") for _ in range(rng.randint(17, 23)))
            pad = rng.choice(["", " ", "\t", "  "])
            parts.append("".join(f"{pad}{line}{rng.choice(['', ' '])}\n"
                                 for _ in range(rng.randint(2, 6))))
        elif kind == 2:
            unit = "".join(rng.choice("xyz") for _ in range(rng.choice([5, 7, 10, 20, 33])))
            parts.append(unit * rng.randint(2, 40))
        elif kind == 3:
            block = "".join(rng.choice("pqrs ") for _ in range(rng.choice([49, 50, 51])))
            parts.append(block * rng.randint(2, 4))
        elif kind == 4:
            parts.append("".join(rng.choice("abcdefghij \n") for _ in range(rng.randint(50, 3000))))
        else:
            parts.append(rng.choice(["\r\n", "\x0b", "\u2028", "\n\n", " "]))
    text = "".join(parts)
    if rng.random() < 0.8:
        text = text[:rng.randint(0, len(text))] + BOX + text[rng.randint(0, len(text)):]
    return text


RANDOM_TEXTS = [random_text(random.Random(seed)) for seed in range(400)]


# ---------------------------------------------------------------- each check vs the reference


@pytest.mark.parametrize("seed", range(len(RANDOM_TEXTS)))
def test_random_texts_match_reference(seed):
    text = RANDOM_TEXTS[seed]
    assert ours(text) == REASON[ref_is_valid_output(text)[1]]


def test_random_texts_hit_every_reason():
    reasons = Counter(ref_is_valid_output(t)[1] for t in RANDOM_TEXTS)
    assert set(reasons) == set(REASON), reasons   # the comparison above covers every branch
    assert sum(len(t) > 5000 for t in RANDOM_TEXTS) > 20


@pytest.mark.parametrize("min_len,threshold", [(1, 2), (5, 3), (20, 5), (21, 5), (19, 4)])
def test_repeated_lines_match_reference(min_len, threshold):
    for text in RANDOM_TEXTS:
        got = F.max_line_count(text, min_len) >= threshold
        assert got == ref_detect_repeated_lines(text, min_len, threshold)


@pytest.mark.parametrize("n,threshold", [(100, 3), (20, 2), (33, 3), (7, 4), (100, 2)])
def test_windows_match_reference(n, threshold):
    for text in RANDOM_TEXTS:
        assert F.has_repeated_window(text, n, threshold) == \
            ref_detect_ngram_repetition(text, n, threshold)


@pytest.mark.parametrize("block,threshold", [(50, 3), (50, 2), (49, 4), (3, 3), (1, 2), (10, 5)])
def test_consecutive_repeat_matches_reference(block, threshold):
    for text in RANDOM_TEXTS[:150]:
        assert F.has_consecutive_repeat(text, block, threshold) == \
            ref_detect_consecutive_repeat(text, block, threshold)


LINE20 = "abcdefghijklmnopqrst"     # 20 characters


def noise(seed: int, n: int = 6000, alphabet: str = "abcdefgh \n") -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


BLOCK = noise(9, 50, "ABCDEFGHIJKLMNOP")


@pytest.mark.parametrize("text", [
    # lines: 4 vs 5 copies, 19 vs 20 characters after strip, padding stripped, \r stripped
    BOX + ("\n" + LINE20) * 4,
    BOX + ("\n" + LINE20) * 5,
    BOX + ("\n  " + LINE20[:19] + "  ") * 9,
    BOX + ("\n\t" + LINE20 + " \r") * 5,
    # only "\n" splits lines: other separators keep the copies on one line
    BOX + ("\x0b" + LINE20) * 6, BOX + ("\u2028" + LINE20) * 6, BOX + ("\r" + LINE20) * 6,
    # windows: the early return under n * threshold chars, and a period that is not a multiple
    # of the stride (windows at multiples of 10 differ)
    BOX + "z" * (300 - len(BOX) - 1), BOX + "z" * (300 - len(BOX)),
    BOX + "abcdefg" * 60, BOX + "abcde" * 60,
    # consecutive blocks: only for texts over 5,000 characters (strictly), 2 vs 3 copies
    (BOX + words(random.Random(1), 2000))[:5000 - 150] + "Q" * 50 + "R" * 50 + "S" * 50,
    (BOX + noise(2))[:5000 - 150] + BLOCK * 3, (BOX + noise(2))[:5001 - 150] + BLOCK * 3,
    BOX + noise(3) + BLOCK * 2 + "!", BOX + noise(3) + BLOCK * 3 + "!",
    BOX + noise(4) + BLOCK[:25] + BLOCK * 3, BOX + noise(4) + "0123456789" * 15,
    # an answer without \boxed, an empty text, a text that is only the marker
    "Answer: 42", "", "\\boxed",
])
def test_threshold_edges_match_reference(text):
    assert ours(text) == REASON[ref_is_valid_output(text)[1]]


def test_edge_cases_decide_both_ways():
    """The crafted edges above are really on both sides of each threshold."""
    assert ours(BOX + ("\n" + LINE20) * 4) is None
    assert ours(BOX + ("\n" + LINE20) * 5) == F.REPEATED_LINES
    assert ours(BOX + "z" * (300 - len(BOX) - 1)) is None
    assert ours(BOX + "z" * (300 - len(BOX))) == F.REPEATED_WINDOWS
    text = (BOX + noise(2))[:5000 - 150] + BLOCK * 3
    assert len(text) == 5000 and ours(text) is None           # 5,000 chars: not checked
    assert ours((BOX + noise(2))[:5001 - 150] + BLOCK * 3) == F.CONSECUTIVE_REPEAT
    assert ours(BOX + noise(3) + BLOCK * 2 + "!") is None     # two in a row are allowed


# ---------------------------------------------------------------- options and the config


def test_answer_formats_and_legacy_ngram_rule():
    marked = F.FilterConfig(answer_format="marked")
    assert ours("3 + 4 = 7\nAnswer: 7", marked) is None
    assert ours("3 + 4 = 7", marked) == F.NO_FINAL_ANSWER
    assert ours("3 + 4 = 7", F.FilterConfig(answer_format="any_number")) is None
    assert ours("no digits", F.FilterConfig(answer_format="any_number")) == F.NO_FINAL_ANSWER
    assert ours("#### 7", F.FilterConfig(answer_marker="####")) is None
    assert ours("3 + 4 = 7", F.FilterConfig(no_answer=False)) is None
    # this library's earlier word n-gram rule: off by default, on with ngram_n
    text = BOX + " the cat sat on the mat" * 5
    assert ours(text) is None
    assert ours(text, F.FilterConfig(ngram_n=4, ngram_max_repeats=3)) == F.REPEATED_NGRAMS
    assert F.max_ngram_count("a b a b a b", 2) == 3


def test_switches_turn_each_filter_off():
    text = BOX + ("\n" + LINE20) * 5
    assert ours(text, F.FilterConfig(repeated_lines=False)) is None
    assert ours(BOX + "z" * 400) == F.REPEATED_WINDOWS
    assert ours(BOX + "z" * 400, F.FilterConfig(repeated_windows=False)) is None
    long = BOX + noise(5) + BLOCK * 3
    assert ours(long) == F.CONSECUTIVE_REPEAT
    assert ours(long, F.FilterConfig(consecutive_repeat=False)) is None
    assert ours(long, F.FilterConfig(block_text_over=10_000)) is None


def test_batch_counts_per_reason():
    items = [{"t": BOX}, {"t": "none"}, {"t": BOX + ("\n" + LINE20) * 5}, {"t": BOX + "z" * 400}]
    res = F.filter_completions(items, text_of=lambda x: x["t"])
    assert res.kept == [items[0]]
    assert res.counts == {"kept": 1, F.NO_FINAL_ANSWER: 1, F.REPEATED_LINES: 1,
                          F.REPEATED_WINDOWS: 1, F.CONSECUTIVE_REPEAT: 0, F.REPEATED_NGRAMS: 0}
    assert list(res.counts)[1:] == list(F.REASONS)


def test_filter_config_checks_and_spec_defaults_match():
    assert F.FilterConfig.from_spec(FilterSpec()) == F.FilterConfig()
    for bad in (dict(line_reject_count=1), dict(block_reject_run=1), dict(window_stride=0),
                dict(ngram_n=0), dict(answer_format="boxed"), dict(answer_marker="")):
        with pytest.raises(ValueError):
            F.FilterConfig(**bad)
    with pytest.raises(ValueError, match=">= 2"):
        F.has_consecutive_repeat("aaaa", 1, 1)
    assert F.marker_warning(F.FilterConfig(), "Give the answer as 'Answer: <value>'")
    assert F.marker_warning(F.FilterConfig(), r"put it within \boxed{}") is None
    assert F.marker_warning(F.FilterConfig(answer_format="marked"), "anything") is None


@pytest.mark.parametrize("override,match", [
    ("stages.0.filters.repeated_lines=false stages.0.filters.line_reject_count=3",
     "repeated_lines is false"),
    ("stages.0.filters.answer_format=marked stages.0.filters.answer_marker=ANSWER",
     'answer_format "marker"'),
    ("stages.0.filters.ngram_max_repeats=5", "ngram_n is null"),
    ("stages.0.filters.window_reject_count=1", ">= 2"),
    ("stages.0.filters.no_answer=false stages.0.filters.answer_format=any_number",
     "no_answer is false"),
])
def test_filter_spec_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/tiny_test.yaml", override.split())


def test_filter_spec_keeps_earlier_fields():
    """Configs written before the reference filters (demo, study) still load and mean what they
    meant for the answer and n-gram rules."""
    cfg = load_config("configs/demo.yaml")
    f = F.FilterConfig.from_spec(cfg.stages[0].filters)
    assert (f.answer_format, f.ngram_n, f.ngram_max_repeats) == ("any_number", 4, 3)
    assert ours("2 + 3 = 5", f) is None
    assert ours("go go go go go go go go go 5", f) == F.REPEATED_NGRAMS
