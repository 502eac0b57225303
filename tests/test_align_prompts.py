"""align-prompts (issue 14, "Teacher-aligned prompt selection, as the paper means it"): cosine
nearest neighbours and de-duplication against float64 brute force written from the definition,
the exact-match rule against a port of thunlp's dedup_deepmath.py, the TF-IDF embedder against a
plain-Python re-implementation of its definition, the model embedder's padding mask, and the
command end to end on tiny files; rank-prompts keeps the old select-prompts name working."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import unicodedata
import zlib
from collections import Counter

import numpy as np
import pytest
import yaml

from opd_jax.align_prompts import (
    DAPO_SUFFIX,
    AlignConfig,
    EmbedderSpec,
    HashedTfidf,
    PromptSetSpec,
    align_prompts,
    exact_matches,
    load_align_config,
    make_set_embedders,
    max_similarity,
    read_prompt_set,
    unit_rows,
)
from opd_jax.align_prompts.similarity import distribution, histogram_edges
from opd_jax.config import ConfigError, ModelSpec
from opd_jax.config.schema import DeriveSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- references

def cosine_bruteforce(q, r):
    """float64 cosine matrix from the definition x.y / (|x| |y|) (0 for a zero vector)."""
    q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
    out = np.zeros((len(q), len(r)))
    for i, x in enumerate(q):
        for j, y in enumerate(r):
            nx, ny = math.sqrt(float(x @ x)), math.sqrt(float(y @ y))
            out[i, j] = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else 0.0
    return out


def extract_dapo_question(prompt_list):
    """thunlp/OPD scripts/infer/dedup_deepmath.py:8-17, ported verbatim."""
    if isinstance(prompt_list, (list, np.ndarray)) and len(prompt_list) > 0:
        content = prompt_list[0].get('content', '')
        suffix = " Please reason step by step, and put your final answer within \\boxed{}."
        if content.endswith(suffix):
            return content[:-len(suffix)].strip()
        return content.strip()
    return ""


def extract_deepmath_question(row):
    """dedup_deepmath.py:19-33, ported verbatim (the fallback's suffix has literal ``{{}}``)."""
    extra_info = row.get('extra_info', {})
    if isinstance(extra_info, dict) and 'question' in extra_info:
        return str(extra_info['question']).strip()
    prompt_list = row.get('prompt', [])
    if isinstance(prompt_list, (list, np.ndarray)) and len(prompt_list) > 0:
        content = prompt_list[0].get('content', '')
        suffix = " Please reason step by step, and put your final answer within \\boxed{{}}."
        if content.endswith(suffix):
            return content[:-len(suffix)].strip()
        return content.strip()
    return ""


def tfidf_reference(fit_texts, texts, word=(1, 2), char=(3, 5), dim=64, sublinear=True):
    """The TF-IDF definition of opd_jax.align_prompts.tfidf in plain Python, float64."""
    M = 2 ** 64

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
        return z ^ (z >> 31)

    def grams(seq, lo, hi):
        out = []
        for n in range(lo, hi + 1):
            for i in range(len(seq) - n + 1):
                h = n
                for k in range(n):
                    h = (h * 0x100000001B3 + seq[i + k]) % M
                out.append(mix(h) % dim)
        return out

    def tfs(t):
        a = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", t).casefold()).strip()
        words = [zlib.crc32(w.encode()) for w in re.findall(r"\w+", a)]
        return [Counter(grams(words, *word)), Counter(grams([ord(c) for c in a], *char))]

    df = [Counter(), Counter()]
    for t in fit_texts:
        for b, c in enumerate(tfs(t)):
            df[b].update(set(c))
    n = len(fit_texts)
    rows = []
    for t in texts:
        blocks = []
        for b, c in enumerate(tfs(t)):
            v = np.zeros(dim)
            for f, tf in c.items():
                v[f] = ((1 + math.log(tf)) if sublinear else tf) * (
                    math.log((1 + n) / (1 + df[b][f])) + 1)
            norm = math.sqrt(float(v @ v))
            blocks.append(v / norm if norm > 0 else v)
        e = np.concatenate(blocks)
        norm = math.sqrt(float(e @ e))
        rows.append(e / norm if norm > 0 else e)
    return np.array(rows)


# ----------------------------------------------------------------------------- similarity

def _vectors(seed, n, d=12):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=(n, 1))
    x[3] = 0.0             # a zero vector: cosine 0 with everything
    x[5] = x[4] * 2.5      # a scaled duplicate: cosine 1
    return x


def test_max_similarity_matches_float64_bruteforce():
    q, r = _vectors(0, 37), _vectors(1, 53)
    q[7] = r[11] * 0.3     # a query parallel to a reference row
    ref = cosine_bruteforce(q, r)
    for block in (7, 53, 1000):    # several reference blocks, exactly one, fewer rows than one
        sim, idx = max_similarity(unit_rows(q), unit_rows(r), block=block)
        np.testing.assert_allclose(sim, ref.max(1), atol=2e-6)
        np.testing.assert_allclose(ref[np.arange(len(q)), idx], ref.max(1), atol=2e-6)
    assert idx[7] == 11 and sim[7] == pytest.approx(1.0, abs=1e-6)
    # leave-one-out within one set, starting mid-set and with blocks that split it
    self_ref = cosine_bruteforce(r, r)
    np.fill_diagonal(self_ref, -np.inf)
    for start, block in ((0, 53), (10, 8), (40, 5)):
        sim, idx = max_similarity(unit_rows(r)[start:start + 13], unit_rows(r),
                                  exclude_offset=start, block=block)
        want = self_ref[start:start + 13].max(1)
        np.testing.assert_allclose(sim, want, atol=2e-6)
        assert (idx != np.arange(start, start + len(idx))).all()
    assert max_similarity(unit_rows(r[:1]), unit_rows(r[:1]), exclude_offset=0)[1].tolist() == [-1]


def test_near_duplicate_flags_match_bruteforce():
    q, r = _vectors(2, 200, d=6), _vectors(3, 40, d=6)
    want = cosine_bruteforce(q, r).max(1)
    sim, _ = max_similarity(unit_rows(q), unit_rows(r), block=16)
    for thr in (0.3, 0.6, 0.9):
        clear = np.abs(want - thr) > 1e-5   # float32 vs float64 can only differ at the boundary
        assert clear.sum() > 150
        assert ((sim >= thr) == (want >= thr))[clear].all()


def test_distribution_quantiles_and_histogram():
    v = np.array([0.1, 0.5, 0.55, 0.95, 1.0000001, np.nan])
    edges = histogram_edges([v, np.array([-0.25])], bins=13)
    assert edges[0] == pytest.approx(-0.3) and edges[-1] == 1.0 and len(edges) == 14
    d = distribution(v, edges)
    finite = v[:5].astype(np.float64)
    assert d["count"] == 5 and d["nan"] == 1 and d["mean"] == pytest.approx(finite.mean())
    assert d["quantiles"]["p50"] == pytest.approx(np.quantile(finite, 0.5))
    assert d["quantiles"]["p05"] == pytest.approx(np.quantile(finite, 0.05))
    assert sum(d["histogram"]["counts"]) == 5 and d["histogram"]["counts"][-1] == 2


# ----------------------------------------------------------------------------- exact match

DAPO_ROWS = [  # DAPO-Math-17k's layout: the question in a one-message list, instruction appended
    {"prompt": [{"content": "Find $x$ if $2x = 4$." + DAPO_SUFFIX, "role": "user"}]},
    {"prompt": [{"content": "  How many primes are below 20?" + DAPO_SUFFIX, "role": "user"}]},
    {"prompt": [{"content": "Compute 3+4.\n", "role": "user"}]},
    {"prompt": [{"content": "Ünïcode ﬁnd y." + DAPO_SUFFIX, "role": "user"}]},
]
DEEPMATH_ROWS = [  # DeepMath's verl layout: the raw question under extra_info.question
    {"extra_info": {"question": "Find $x$ if $2x = 4$."}},        # exact
    {"extra_info": {"question": "How many primes are below 20? "}},  # exact after strip
    {"extra_info": {"question": "how many primes are below 20?"}},  # case differs: not exact
    {"extra_info": {"question": "Compute  3+4."}},                 # inner whitespace: not exact
    {"extra_info": {"question": "Compute 3+4."}},                  # exact
    {"extra_info": {"question": "Ünïcode ﬁnd y."}},                # exact (no NFKC either side)
    {"extra_info": {"question": "Unicode find y."}},               # not exact
    {"extra_info": {"question": "Find $x$ if $2x = 4$." + DAPO_SUFFIX}},  # suffix stripped: exact
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_exact_match_is_the_references_rule(tmp_path):
    dapo = [extract_dapo_question(r["prompt"]) for r in DAPO_ROWS]
    deepmath = [extract_deepmath_question(r) for r in DEEPMATH_ROWS]
    dapo_set = set(dapo)
    want = [q in dapo_set for q in deepmath]        # dedup_deepmath.py:51-52
    ref = read_prompt_set(PromptSetSpec(path=_jsonl(tmp_path / "d.jsonl", DAPO_ROWS)),
                          [DAPO_SUFFIX], "reference")
    pool = read_prompt_set(PromptSetSpec(path=_jsonl(tmp_path / "m.jsonl", DEEPMATH_ROWS),
                                         prompt_key="extra_info.question"), [DAPO_SUFFIX], "pool")
    assert ref.texts == dapo
    # the reference strips no suffix from extra_info.question; ours strips the DAPO suffix from
    # every prompt, which differs only on the last row
    assert pool.texts[:-1] == deepmath[:-1] and pool.texts[-1] == dapo[0]
    got = exact_matches(pool.texts, ref.texts).tolist()
    assert got[:-1] == want[:-1] == [True, True, False, False, True, True, False]
    assert got[-1] and not want[-1]


def test_prompt_sets_read_parquet_nested_fields_and_fail_clearly(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "uid": f"u{i}"} for i, r in enumerate(DAPO_ROWS)]),
                   path)
    s = read_prompt_set(PromptSetSpec(path=str(path), id_key="uid", limit=3), [DAPO_SUFFIX], "r")
    assert s.ids == ["u0", "u1", "u2"]
    assert s.texts == [extract_dapo_question(r["prompt"]) for r in DAPO_ROWS[:3]]
    with pytest.raises(ValueError, match=r"no field 'extra_info.question' \(the row has \['prompt'"):
        read_prompt_set(PromptSetSpec(path=str(path), prompt_key="extra_info.question"), [], "r")


# ----------------------------------------------------------------------------- embedders

TEXTS = ["Find $x$ if $2x = 4$.", "Find x if 2x=4", "FIND   the value of y if 3y = 9.",
         "How many primes are below 20?", "Let ABC be a triangle with area 10.", "", "++",
         "Ünïcode ﬁnd y.", "x"]


@pytest.mark.parametrize("word, char, dim, sublinear", [((1, 2), (3, 5), 64, True),
                                                         ((1, 1), (2, 2), 7, False)])
def test_tfidf_matches_its_definition(word, char, dim, sublinear):
    tf = HashedTfidf(word, char, dim, sublinear).fit(TEXTS[:6], batch_size=4)
    got = tf.embed(TEXTS)
    want = tfidf_reference(TEXTS[:6], TEXTS, word, char, dim, sublinear)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 2 * dim)
    np.testing.assert_allclose(got, want, atol=1e-6)
    norms = np.linalg.norm(got, axis=1)
    empty = [5, 6] if char[0] > 2 else [5]      # "" has no n-gram; "++" no word, 2 characters
    assert (norms[empty] == 0).all() and np.allclose(np.delete(norms, empty), 1, atol=1e-6)
    assert float(got[0] @ got[1]) > float(got[0] @ got[4])    # shared wording scores higher


def test_model_embedder_masks_padding():
    """The model embedding of a prompt is the same alone or batched with longer prompts (padding
    masked), and equals the float64 mean of its unpadded hidden states."""
    import jax.numpy as jnp

    from opd_jax.model.decoder import hidden_states
    from opd_jax.train.models import load_source

    spec = ModelSpec(source="random", derive=DeriveSpec(
        random_init=True, n_layers=2, d_model=32, ffn_dim=64, n_heads=2, n_kv_heads=1,
        head_dim=16))
    texts = ["short", "a much longer prompt than the first one, with more tokens", "mid length"]
    ref = read_prompt_set_from(texts[:1])
    pool = read_prompt_set_from(texts)
    cfg = AlignConfig(embedder=EmbedderSpec(kind="model", model=spec, model_batch=2))
    embed_ref, embed_pool, desc = make_set_embedders(cfg, ref, pool)
    assert desc.startswith("model random")
    together = embed_pool(0, 3)
    alone = np.concatenate([embed_pool(i, i + 1) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(embed_ref(0, 1), together[:1], atol=1e-5)
    model = load_source(spec, cfg.seed)
    for i, t in enumerate(texts):
        ids = jnp.asarray([model.tokenizer.encode(t)], jnp.int32)
        h, _ = hidden_states(model.params, model.config, ids, jnp.ones(ids.shape, bool))
        m = np.asarray(h[0], np.float64).mean(0)
        np.testing.assert_allclose(together[i], m / np.linalg.norm(m), atol=1e-5)


def read_prompt_set_from(texts):
    from opd_jax.align_prompts import PromptSet

    return PromptSet("s", [f"s:{i}" for i in range(len(texts))], list(texts),
                     [{"prompt": t} for t in texts])


# ----------------------------------------------------------------------------- end to end

def _write_config(tmp_path, align):
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump({"align": align}))
    return str(path)


def test_align_prompts_precomputed_against_bruteforce(tmp_path):
    """kind: precomputed — the command's similarities, near duplicates, control and aligned sets
    equal float64 brute force and the reference's rule (exact OR cosine >= threshold)."""
    rng = np.random.default_rng(5)
    r_vec, p_vec = rng.normal(size=(9, 8)), rng.normal(size=(30, 8))
    p_vec[4] = r_vec[2] * 3 + 0.01 * rng.normal(size=8)    # a near duplicate
    np.save(tmp_path / "r.npy", r_vec.astype(np.float32))
    np.save(tmp_path / "p.npy", p_vec)                        # float64 is read too
    ref_rows = [{"q": f"reference {i}"} for i in range(9)]
    pool_rows = [{"q": f"pool {i}", "answer": i} for i in range(30)]
    pool_rows[7]["q"] = "reference 3"                         # an exact duplicate
    cfg = load_align_config(_write_config(tmp_path, {
        "out_dir": str(tmp_path / "out"), "threshold": 0.5, "batch_size": 4,
        "embedder": {"kind": "precomputed"}, "aligned": {"top_n": 5},
        "reference": {"path": _jsonl(tmp_path / "r.jsonl", ref_rows), "prompt_key": "q",
                      "embeddings": str(tmp_path / "r.npy")},
        "pool": {"path": _jsonl(tmp_path / "p.jsonl", pool_rows), "prompt_key": "q",
                 "embeddings": str(tmp_path / "p.npy")}}))
    summary = align_prompts(cfg)
    cos = cosine_bruteforce(p_vec, r_vec)
    want_sim = cos.max(1)
    exact = np.zeros(30, bool)
    exact[7] = True
    removed = exact | (want_sim >= 0.5)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "similarities.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["similarity"] for r in rows], want_sim, atol=2e-6)
    assert [r["nearest_id"] for r in rows] == [f"reference:{j}" for j in cos.argmax(1)]
    assert [r["exact_dup"] for r in rows] == exact.tolist()
    assert [r["control"] for r in rows] == (~removed).tolist()
    assert rows[4]["near_dup"] and rows[4]["nearest_id"] == "reference:2"
    control = [json.loads(x) for x in (out / "control.jsonl").read_text().splitlines()]
    assert [c["q"] for c in control] == [pool_rows[i]["q"] for i in np.flatnonzero(~removed)]
    assert control[0]["answer"] == pool_rows[int(np.flatnonzero(~removed)[0])]["answer"]
    aligned = [json.loads(x) for x in (out / "aligned.jsonl").read_text().splitlines()]
    assert [a["align"]["id"] for a in aligned] == [f"pool:{i}" for i in
                                                   np.argsort(-want_sim, kind="stable")[:5]]
    assert [a["align"]["rank"] for a in aligned] == [0, 1, 2, 3, 4]
    c = summary["counts"]
    assert (c["exact_dup"], c["control"], c["aligned"]) == (1, int((~removed).sum()), 5)
    assert c["near_dup"] == int(((want_sim >= 0.5) & ~exact).sum())
    d = summary["distributions"]
    assert d["control"]["quantiles"]["p50"] == pytest.approx(
        np.quantile(want_sim[~removed], 0.5), abs=2e-6)
    self_cos = cosine_bruteforce(r_vec, r_vec)
    np.fill_diagonal(self_cos, -np.inf)
    assert d["reference_self"]["max"] == pytest.approx(self_cos.max(), abs=2e-6)
    assert json.loads((out / "summary.json").read_text())["counts"] == c


def test_align_prompts_cli_end_to_end_tfidf(tmp_path, capsys):
    from opd_jax.cli import main

    ref_rows = DAPO_ROWS + [{"prompt": [{"role": "user", "content": q + DAPO_SUFFIX}]} for q in (
        "Let $f(x) = x^2 + 3x$. Find $f(2)$.", "A circle has radius 3. What is its area?",
        "Solve for $n$: $3n + 5 = 20$.")]
    pool_rows = DEEPMATH_ROWS + [{"extra_info": {"question": q}} for q in (
        "Let $f(x) = x^2 + 3x$. Find $f(5)$.",          # a templated variant
        "A circle has radius 7. What is its area?",      # a templated variant
        "Name the capital city of the country with the largest population in Europe.",
        "Write a haiku about autumn leaves falling.")]
    cfg = _write_config(tmp_path, {
        "out_dir": str(tmp_path / "out"),
        "reference": {"path": _jsonl(tmp_path / "dapo.jsonl", ref_rows)},
        "pool": {"path": _jsonl(tmp_path / "deepmath.jsonl", pool_rows),
                 "prompt_key": "extra_info.question"},
        "embedder": {"tfidf": {"dim": 512}}, "aligned": {"top_n": 4}, "control_n": 3})
    assert main(["align-prompts", cfg, "align.threshold=0.6", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for part in ("max cosine to the reference", "reference_self", "histogram", "control.jsonl",
                 "hashed TF-IDF: word 1-2-grams + char 3-5-grams, 2 x 512 features"):
        assert part in printed, part
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "similarities.jsonl").read_text().splitlines()]
    by_text = {r["text"]: r for r in rows}
    assert by_text["Find $x$ if $2x = 4$."]["exact_dup"]
    assert by_text["Let $f(x) = x^2 + 3x$. Find $f(5)$."]["near_dup"]
    assert not by_text["Write a haiku about autumn leaves falling."]["near_dup"]
    assert by_text["Write a haiku about autumn leaves falling."]["similarity"] < 0.3
    aligned = [json.loads(x) for x in (out / "aligned.jsonl").read_text().splitlines()]
    assert len(aligned) == 4 and aligned[0]["align"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert aligned[0]["extra_info"]["question"]                  # the pool's own row
    control = [json.loads(x) for x in (out / "control.jsonl").read_text().splitlines()]
    assert len(control) == 3 == summary["counts"]["control"]
    assert not any(by_text[c["align"]["text"]]["exact_dup"] or
                   by_text[c["align"]["text"]]["near_dup"] for c in control)
    for k in ("aligned", "control", "pool", "reference_self"):
        h = summary["distributions"][k]["histogram"]
        assert sum(h["counts"]) == summary["distributions"][k]["count"]
    assert summary["distributions"]["reference_self"]["count"] == len(ref_rows)
    report = (out / "report.md").read_text()
    assert "## Similarity to the reference (max cosine)" in report and "| control (" in report
    # --texts-only: the matching texts, for an external embedding model
    assert main(["align-prompts", cfg, "--texts-only", "align.out_dir=" + str(tmp_path / "t")]) == 0
    texts = [json.loads(x) for x in (tmp_path / "t" / "reference_texts.jsonl").read_text()
             .splitlines()]
    assert texts[0] == {"id": "reference:0", "text": "Find $x$ if $2x = 4$."}


def test_align_config_errors(tmp_path):
    base = {"reference": {"path": "r.jsonl"}, "pool": {"path": "p.jsonl"}}
    with pytest.raises(ConfigError, match=r"reference\.embeddings=None .*precomputed"):
        load_align_config(_write_config(tmp_path, {**base, "embedder": {"kind": "precomputed"}}))
    with pytest.raises(ConfigError, match=r"pool\.format=None .*'p\.txt'"):
        load_align_config(_write_config(tmp_path, {**base, "pool": {"path": "p.txt"}}))
    with pytest.raises(ConfigError, match=r"pool\.path=None"):
        load_align_config(_write_config(tmp_path, {"reference": {"path": "r.jsonl"}}))
    with pytest.raises(ConfigError, match=r"align: section \(align\.key=value\)"):
        load_align_config(_write_config(tmp_path, base), ["threshold=0.5"])
    with pytest.raises(ConfigError, match=r"align\.embedder\.kind='mpnet' is not allowed"):
        load_align_config(_write_config(tmp_path, base), ["align.embedder.kind=mpnet"])
    cfg = load_align_config(_write_config(tmp_path, base), ["align.threshold=0.5"])
    assert cfg.threshold == 0.5 and cfg.strip_suffixes == (DAPO_SUFFIX,)
    assert not cfg.embedder.resolved_center
    assert EmbedderSpec(kind="model").resolved_center
    shipped = load_align_config(os.path.join(ROOT, "configs", "teacher_aligned_dapo_deepmath.yaml"))
    assert (shipped.threshold, shipped.strip_suffixes, shipped.exact) == (0.6, (DAPO_SUFFIX,), True)
    assert shipped.pool.prompt_key == "extra_info.question" and shipped.embedder.kind == "tfidf"


def test_precomputed_rows_must_match_the_sets(tmp_path):
    np.save(tmp_path / "r.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "p.npy", np.ones((1, 3), np.float32))
    cfg = AlignConfig(
        out_dir=str(tmp_path / "o"), embedder=EmbedderSpec(kind="precomputed"),
        reference=PromptSetSpec(path=_jsonl(tmp_path / "r.jsonl", [{"prompt": "a"}]),
                                embeddings=str(tmp_path / "r.npy")),
        pool=PromptSetSpec(path=_jsonl(tmp_path / "p.jsonl", [{"prompt": "b"}] * 2),
                           embeddings=str(tmp_path / "p.npy")))
    with pytest.raises(ValueError, match=r"pool\.embeddings .* shape \(1, 3\).*\(2 read\)"):
        align_prompts(cfg)


# ----------------------------------------------------------------------------- rank-prompts

def test_rank_prompts_and_the_select_prompts_alias(monkeypatch, capsys):
    import opd_jax.select_prompts as sp
    from opd_jax import compile_options
    from opd_jax.cli import main, parse_args

    calls, caches = [], []   # the compilation cache each command ran in
    monkeypatch.setattr(compile_options, "compilation_cache", lambda path: caches.append(path)
                        or contextlib.nullcontext())
    monkeypatch.setattr(sp, "select_prompts", lambda cfg, sel, progress: calls.append(sel) or {
        "selected_count": 2, "pool": 5, "out_dir": "x"})
    assert parse_args(["rank-prompts"]).config == "configs/select_demo.yaml"
    demo = os.path.join(ROOT, "configs", "select_demo.yaml")
    assert main(["rank-prompts", demo, "select.rule.top_n=2", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "selected 2 of 5 prompts" in out.out and "select-prompts" not in out.err
    assert main(["select-prompts", demo, "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "selected 2 of 5 prompts" in out.out
    assert out.err.count("\n") == 1 and "select-prompts is now rank-prompts" in out.err
    assert calls[0].rule.top_n == 2 and len(calls) == 2
    assert caches == ["~/.cache/opd_jax/xla"] * 2
