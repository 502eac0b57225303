"""The teacher cache (`opd-jax cache-teacher`): a cold-start dataset's teacher scores written as
ArrayRecord shards and read back through grain equal the in-process `score_completions`; builds
resume shard by shard; a cache of another setup, a corrupted shard or an unfinished build is
refused by name. Tiny random teacher (configs/tiny_test.yaml), byte tokenizer."""

import dataclasses
import json
import os
import shutil

import grain
import numpy as np
import pytest

from opd_jax.config import load_config
from opd_jax.data.cold_start_file import (
    ColdStartExample,
    file_sha256,
    read_cold_start,
    write_cold_start,
)
from opd_jax.data.padding import pad_left
from opd_jax.model.fingerprint import tokenizer_fingerprint
from opd_jax.sampling.sampler import bucket_length
from opd_jax.teacher import cache_build
from opd_jax.teacher.cache import (
    MANIFEST,
    CacheMismatch,
    TeacherCache,
    decode_record,
    encode_record,
)
from opd_jax.teacher.cache_build import build_cache
from opd_jax.teacher.loading import load_teacher, teacher_fingerprint
from opd_jax.teacher.scoring import score_completions
from opd_jax.train.sft_batches import tokenize_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny_test.yaml")
WORDS = ["red", "green", "blue", "cyan", "pink", "gold", "teal", "plum", "navy", "rust"]
K = 8
BUILD = dict(k=K, batch_rows=4, shard_examples=4, progress=False)   # 10 examples: 3 shards


def config(tmp, dataset, *overrides):
    stage = f"{{kind: cold_start, dataset: {dataset}, epochs: 1, batch_prompts: 2}}"
    return load_config(TINY, [f"out_dir={tmp}/run", f"stages=[{stage}]", *overrides])


def write_examples(path, words=WORDS):
    """Chat prompts with completions of different lengths (several length buckets)."""
    write_cold_start(path, [
        ColdStartExample(prompt=f"<|im_start|>user\nsay {w} x{i}<|im_end|>\n<|im_start|>assistant\n",
                         completion=" ".join([w] * (1 + 3 * i)), stop="<|im_end|>" if i % 3 else None,
                         id=str(i)) for i, w in enumerate(words)])


def shard_hashes(out):
    return {s["file"]: s["sha256"] for s in json.loads((out / MANIFEST).read_text())["shards"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    data = tmp / "cold.jsonl"
    write_examples(data)
    cfg = config(tmp, data)
    summary = build_cache(cfg, out=tmp / "cache", **BUILD)
    return cfg, data, tmp / "cache", summary


def test_cached_scores_equal_score_completions(built):
    cfg, data, out, summary = built
    assert summary["examples"] == 10 and summary["shards"] == 3 and summary["built_shards"] == 3
    cache = TeacherCache(out)
    assert isinstance(cache.source, grain.sources.ArrayRecordDataSource) and len(cache) == 10
    assert cache.temperature == cfg.loss.resolved_teacher_temperature and cache.k == K
    teacher = load_teacher(cfg)
    rows = tokenize_examples(read_cold_start(data), teacher.tokenizer,
                             max_prompt_len=cfg.data.max_prompt_len, source="test")
    assert summary["tokens"] == sum(len(r["completion_ids"]) for r in rows)
    pad = teacher.tokenizer.pad_id
    for idx in ([9, 0, 5], [3], [1, 2, 4, 6, 7, 8]):   # other batches than the build's
        comp = [rows[i]["completion_ids"] for i in idx]
        n = bucket_length(max(map(len, comp))) + 16   # wider than any build bucket
        p_tok, p_valid = pad_left([rows[i]["prompt_ids"] for i in idx],
                                  bucket_length(max(len(rows[i]["prompt_ids"]) for i in idx)), pad)
        c_tok = np.full((len(idx), n), pad, np.int32)
        for b, c in enumerate(comp):
            c_tok[b, :len(c)] = c
        c_valid = np.arange(n)[None] < np.array([len(c) for c in comp])[:, None]
        want = score_completions(teacher.params, teacher.config,
                                 np.concatenate([p_tok, c_tok], 1),
                                 np.concatenate([p_valid, c_valid], 1), c_tok[..., None], n=n,
                                 k=K, chunk_size=cfg.loss.chunk_size,
                                 temperature=cache.temperature)
        got = cache.scores(idx, n, completion_ids=comp)
        assert got.topk_ids.shape == (len(idx), n, K) and got.query_ids.shape == (len(idx), n, 1)
        np.testing.assert_array_equal(got.topk_ids, np.asarray(want.topk_ids))
        np.testing.assert_array_equal(got.query_ids, np.asarray(want.query_ids))
        for field in ("topk_logprobs", "logsumexp", "query_logprobs"):
            np.testing.assert_allclose(getattr(got, field), np.asarray(getattr(want, field)),
                                       atol=1e-5, rtol=1e-5, err_msg=field)
        # zeros past each example's length; fewer top-k ids on request
        assert not got.logsumexp[~c_valid].any() and not got.topk_ids[~c_valid].any()
        np.testing.assert_array_equal(cache.scores(idx, n, k=3).topk_ids, got.topk_ids[..., :3])


def test_reader_checks_what_the_caller_trains_on(built):
    cfg, data, out, _ = built
    cache = TeacherCache(out, verify=False)
    teacher = load_teacher(cfg)
    cache.check(teacher=teacher_fingerprint(teacher),
                tokenizer=tokenizer_fingerprint(teacher.tokenizer),
                vocab_size=teacher.config.vocab_size, k=4, temperature=1.0,
                dataset_sha256=file_sha256(data))    # a smaller k is served by a larger cache
    for field, value in [("teacher", "sha256:other"), ("tokenizer", "sha256:other"),
                         ("vocab_size", 7), ("k", 16), ("temperature", 2.0),
                         ("dataset_sha256", "abc")]:
        with pytest.raises(CacheMismatch, match=rf"another {field}: cache .*, expected .*"
                                                r"cache-teacher CONFIG --force"):
            cache.check(**{field: value})
    with pytest.raises(CacheMismatch, match="another tokenizer.*another temperature"):
        cache.check(tokenizer="x", temperature=0.5)
    n = len(cache.examples([2])[0].token_ids)
    with pytest.raises(ValueError, match="example 2: the cache holds .* the batch has"):
        cache.scores([2], 64, lengths=[n + 1])
    with pytest.raises(ValueError, match="completion tokens differ"):
        cache.scores([2], 64, completion_ids=[[1] * n])
    with pytest.raises(ValueError, match=f"example 2 has {n} completion tokens, over n=1"):
        cache.scores([2], 1)
    with pytest.raises(IndexError, match=r"example 10 is not in .*examples 0\.\.9"):
        cache.scores([10], 64)
    with pytest.raises(CacheMismatch, match="holds the top-8 only.*--k 9"):
        cache.scores([0], 64, k=9)


def test_record_round_trip_and_errors():
    rng = np.random.default_rng(0)
    parts = (rng.integers(0, 100, (5, 3)), rng.normal(size=(5, 3)), rng.normal(size=5),
             rng.integers(0, 100, 5), rng.normal(size=5))
    ex = decode_record(encode_record(42, *parts), k=3)
    assert ex.index == 42
    for got, want in zip(ex[1:], parts):
        np.testing.assert_array_equal(got, np.asarray(want).astype(got.dtype))
    data = encode_record(1, *parts)
    with pytest.raises(ValueError, match="manifest says K=4"):
        decode_record(data, k=4)
    with pytest.raises(ValueError, match="expected"):
        decode_record(data[:-1])
    with pytest.raises(ValueError, match="not a teacher-cache record"):
        decode_record(b"x" * len(data))
    with pytest.raises(ValueError, match="logsumexp has shape"):
        encode_record(0, parts[0], parts[1], parts[2][:4], parts[3], parts[4])


def test_interrupted_build_resumes_with_only_the_missing_shards(built, tmp_path, monkeypatch):
    cfg, data, full, _ = built
    out = tmp_path / "cache"
    real, calls = cache_build.write_shard, []

    def stop_after_one(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cache_build, "write_shard", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, out=out, **BUILD)
    monkeypatch.setattr(cache_build, "write_shard", real)
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    with pytest.raises(ValueError, match=r"incomplete \(1 shards of 3 written\): run `opd-jax "
                                         "cache-teacher CONFIG` again"):
        TeacherCache(out)
    first = (out / manifest["shards"][0]["file"]).stat().st_mtime_ns
    summary = build_cache(cfg, out=out, **BUILD)
    assert (summary["built_shards"], summary["kept_shards"]) == (2, 1)
    assert (out / manifest["shards"][0]["file"]).stat().st_mtime_ns == first
    assert shard_hashes(out) == shard_hashes(full)          # byte-identical to a one-go build
    assert build_cache(cfg, out=out, **BUILD)["built_shards"] == 0   # finished: nothing to do

    # a corrupted shard: the reader names it; a re-run rebuilds just that one
    name = sorted(shard_hashes(out))[1]
    blob = bytearray((out / name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (out / name).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"shard {name} does not match its sha256"):
        TeacherCache(out)
    assert build_cache(cfg, out=out, **BUILD)["built_shards"] == 1
    assert shard_hashes(out) == shard_hashes(full)
    (out / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {name} is missing"):
        TeacherCache(out)


def test_build_refuses_another_setup_by_name(built, tmp_path, monkeypatch):
    cfg, data, full, _ = built
    out = tmp_path / "cache"
    shutil.copytree(full, out)
    before = (out / MANIFEST).read_text()
    other = tmp_path / "other.jsonl"
    write_examples(other, WORDS[::-1])
    cases = [(dict(cfg=config(tmp_path, data, "seed=1")), "teacher"),
             (dict(k=4), "k"), (dict(temperature=2.0), "temperature"),
             (dict(dataset=str(other)), "dataset_sha256"), (dict(shard_examples=5), "shard_examples")]
    for change, field in cases:
        args = {"cfg": cfg, **BUILD, **change}
        with pytest.raises(CacheMismatch, match=rf"another {field}: cache .* expected .*--force"):
            build_cache(args.pop("cfg"), out=out, **args)
    monkeypatch.setattr(cache_build, "tokenizer_fingerprint", lambda tok: "sha256:another")
    with pytest.raises(CacheMismatch, match="another tokenizer: cache 'sha256:"):
        build_cache(cfg, out=out, **BUILD)
    monkeypatch.undo()
    assert (out / MANIFEST).read_text() == before and shard_hashes(out) == shard_hashes(full)
    # force rebuilds for the new teacher
    summary = build_cache(config(tmp_path, data, "seed=1"), out=out, force=True, **BUILD)
    assert summary["built_shards"] == 3 and summary["teacher"]["seed"] == 1
    assert shard_hashes(out) != shard_hashes(full)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a teacher cache"):
        build_cache(cfg, out=tmp_path / "junk", **BUILD)
    with pytest.raises(ValueError, match="is a cache, not a model"):
        build_cache(config(tmp_path, data, f"teacher.source={full}"), out=tmp_path / "x", **BUILD)
    with pytest.raises(ValueError, match="no cold_start stage with a dataset"):
        build_cache(load_config(TINY), out=tmp_path / "none", **BUILD)


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: build it with `opd-jax "
                                                "cache-teacher"):
        TeacherCache(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="has no manifest.json: not a teacher cache"):
        TeacherCache(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a teacher-cache manifest"):
        TeacherCache(tmp_path)


def test_distill_cold_start_from_the_cache_trains_like_the_in_process_teacher(built, tmp_path):
    """A `distill: true` dataset cold start (forward KL on the teacher's top-4 with a tail
    bucket) with no teacher loaded, from the cache, gives the in-process teacher's losses and
    metrics; a support the cache cannot serve is refused by name."""
    from opd_jax.train.run import run

    _, data, cache, _ = built
    stage = f"{{kind: cold_start, dataset: {data}, epochs: 1, batch_prompts: 2, distill: true}}"
    common = [f"stages=[{stage}]", "loss.objective=forward_kl", "loss.top_k=4",
              "loss.support=teacher", "loss.tail=bucket"]
    rows = {}
    for name, extra in (("a", []), ("b", [f"teacher.source={cache}"])):
        run(load_config(TINY, [f"out_dir={tmp_path}/{name}", *common, *extra]), progress=False)
        log = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in log]
    assert len(rows["a"]) == len(rows["b"]) == 5          # 10 examples, 2 a step
    for ra, rb in zip(rows["a"], rows["b"]):
        for key in ("loss", "overlap", "teacher_p_sum_intersection", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=2e-4, abs=2e-5), key
    with pytest.raises(ValueError, match="support"):
        run(load_config(TINY, [f"out_dir={tmp_path}/c", *common[:-2], f"teacher.source={cache}"]),
            progress=False)


def test_distill_with_several_teachers_mixing_a_cache_and_an_in_process_one(built, tmp_path):
    """`teachers:` on a distill stage: examples routed by their `source` to the cache (by example
    index) or to the same teacher in-process (by tokens): the in-process teacher's numbers."""
    from opd_jax.train.run import run

    _, data, cache, _ = built
    mixed = tmp_path / "mixed.jsonl"     # the same examples, each with a source
    write_cold_start(mixed, [dataclasses.replace(ex, source="x" if i % 2 else "y")
                             for i, ex in enumerate(read_cold_start(data))])
    loss = ["loss.objective=forward_kl", "loss.top_k=4", "loss.support=teacher",
            "loss.tail=bucket"]
    stage = f"{{kind: cold_start, dataset: {mixed}, epochs: 1, batch_prompts: 2, distill: true}}"
    tiny = ("{source: random, name: live, route: [], derive: {random_init: true, n_layers: 2, "
            "d_model: 64, ffn_dim: 128, n_heads: 4, n_kv_heads: 2, head_dim: 16}}")
    run(load_config(TINY, [f"out_dir={tmp_path}/a", f"stages=[{stage}]", *loss]), progress=False)
    run(load_config(TINY, [f"out_dir={tmp_path}/b", f"stages=[{stage}]", *loss,
                           "teacher.source=default", "teacher.derive=null",
                           f"teachers=[{{source: '{cache}', name: cached, route: [x]}}, {tiny}]"]),
        progress=False)
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text()
                      .splitlines()]
    a, b = read("a"), read("b")
    for ra, rb in zip(a, b):
        for key in ("loss", "overlap", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=2e-4, abs=2e-5), key
        assert rb["cached/completion_tokens"] + rb["live/completion_tokens"] == \
            rb["completion_tokens"]
    assert sum(r["cached/completion_tokens"] for r in b) > 0
    assert sum(r["live/completion_tokens"] for r in b) > 0
