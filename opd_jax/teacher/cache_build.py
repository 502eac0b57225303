"""Build a teacher cache (``opd-jax cache-teacher CONFIG``): score a cold-start dataset with the
config's teacher once and write the scores as ArrayRecord shards (format:
:mod:`opd_jax.teacher.cache`).

The dataset is tokenized as the dataset cold start trains on it
(:func:`~opd_jax.train.sft_batches.tokenize_examples`), and each example is scored as a
``[left-padded prompt | right-padded completion]`` row by
:func:`~opd_jax.teacher.scoring.score_completions`, the function the trainer's teacher runs, so
the cached values are the in-process ones. Within a shard, examples are batched by length
(sorted) into ``batch_rows`` rows padded to length buckets: few compiled shapes.

**Resumable.** The manifest is written before the first shard and rewritten (atomically) after
each one; a re-run keeps every listed shard whose file still has its recorded sha256 and builds
the rest. A re-run with another teacher, tokenizer, ``k``, temperature, dataset or
``shard_examples`` refuses, naming each, unless ``force`` (which rebuilds from scratch).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from opd_jax.config.core import to_dict
from opd_jax.data.cold_start_file import file_sha256, read_cold_start
from opd_jax.data.padding import pad_left
from opd_jax.model.fingerprint import tokenizer_fingerprint
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.sampling.sampler import bucket_length
from opd_jax.teacher.cache import (
    FORMAT,
    MANIFEST,
    VERSION,
    CacheMismatch,
    encode_record,
    mismatches,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from opd_jax.teacher.loading import load_teacher, teacher_fingerprint
from opd_jax.teacher.scoring import score_completions

__all__ = ["build_cache", "load_teacher", "teacher_fingerprint", "describe_teacher",
           "dataset_of"]

def describe_teacher(spec: Any, seed: int) -> dict[str, Any]:
    """The readable part of the manifest's ``teacher``: the spec's source, dtype, precision,
    tokenizer and derive (plus the seed when weights are drawn at random)."""
    d = to_dict(spec)
    out = {key: d.get(key) for key in ("source", "dtype", "precision", "tokenizer", "derive")}
    if spec.source == "random" or (spec.derive is not None and spec.derive.random_init):
        out["seed"] = seed
    return out


def dataset_of(cfg: Any, dataset: str | None = None) -> tuple[str, int]:
    """``(dataset path, max_prompt_len)``: ``dataset`` (its stage's ``data.max_prompt_len`` when
    one names it, else the run's), or the config's cold_start stage's ``dataset`` / opd stage's
    ``offpolicy_dataset`` (``ValueError`` when there is none, or several different ones)."""
    named = [((s.dataset if s.kind == "cold_start" else None) or s.offpolicy_dataset,
              cfg.resolve_stage(i).data.max_prompt_len) for i, s in enumerate(cfg.stages)]
    named = [(path, n) for path, n in named if path]
    if dataset is not None:
        same = [n for path, n in named if Path(path) == Path(dataset)]
        return str(dataset), (same[0] if same else cfg.data.max_prompt_len)
    if not named:
        raise ValueError("the config has no cold_start stage with a dataset: (nor an opd stage "
                         "with an offpolicy_dataset:) to cache teacher scores of; pass the dataset "
                         "(--dataset PATH.jsonl) or add stages: "
                         "[{kind: cold_start, dataset: PATH.jsonl, epochs: 2}, ...]")
    paths = sorted({path for path, _ in named})
    if len(paths) > 1:
        raise ValueError(f"the config's stages name several datasets {paths}; pass "
                         "the one to cache (--dataset PATH.jsonl)")
    return named[0]


def _clear(out: Path) -> None:
    """Delete the cache files in ``out`` (manifest, shards, temporaries), nothing else."""
    for path in [out / MANIFEST, *out.glob("scores-*-of-*.array_record*"),
                 *out.glob(MANIFEST + ".tmp")]:
        path.unlink(missing_ok=True)


def _kept_shards(out: Path, manifest: dict) -> list[dict]:
    """The manifest's shards whose files still match their sha256."""
    return [s for s in manifest.get("shards", [])
            if (out / s["file"]).is_file() and file_sha256(out / s["file"]) == s["sha256"]]


def _score_rows(rows: Sequence[dict], params, config, tm, *, k: int, temperature: float,
                batch_rows: int, chunk_size: int, pad_id: int) -> list[tuple]:
    """Per row of ``rows`` (``prompt_ids``, ``completion_ids``): ``(topk_ids [n, K],
    topk_logprobs [n, K], logsumexp [n], token_logprobs [n])`` numpy, in ``rows``' order."""
    out: list[tuple | None] = [None] * len(rows)
    todo = sorted((i for i, r in enumerate(rows) if r["completion_ids"]),
                  key=lambda i: (len(rows[i]["completion_ids"]), len(rows[i]["prompt_ids"])))
    for i, r in enumerate(rows):
        if not r["completion_ids"]:
            out[i] = (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32),
                      np.zeros(0, np.float32), np.zeros(0, np.float32))
    for start in range(0, len(todo), batch_rows):
        batch = todo[start:start + batch_rows]
        full = [rows[i] for i in batch + [batch[0]] * (batch_rows - len(batch))]
        width = bucket_length(max(len(r["prompt_ids"]) for r in full))
        n = bucket_length(max(len(r["completion_ids"]) for r in full))
        p_tok, p_valid = pad_left([r["prompt_ids"] for r in full], width, pad_id)
        c_tok = np.full((len(full), n), pad_id, np.int32)
        c_valid = np.zeros((len(full), n), bool)
        for b, r in enumerate(full):
            c_tok[b, :len(r["completion_ids"])] = r["completion_ids"]
            c_valid[b, :len(r["completion_ids"])] = True
        tokens, valid = np.concatenate([p_tok, c_tok], 1), np.concatenate([p_valid, c_valid], 1)
        placed = tm.place_rows((tokens, valid, c_tok[..., None]))
        with tm.scope(teacher=True):
            scores = score_completions(params, config, *placed, n=n, k=k, chunk_size=chunk_size,
                                       temperature=temperature)
        s = jax.device_get(scores)
        for b, i in enumerate(batch):
            m = len(rows[i]["completion_ids"])
            out[i] = (s.topk_ids[b, :m], s.topk_logprobs[b, :m], s.logsumexp[b, :m],
                      s.query_logprobs[b, :m, 0])
    return out  # type: ignore[return-value]


def build_cache(cfg: Any, *, out: str | Path, dataset: str | None = None, k: int = 64,
                temperature: float | None = None, batch_rows: int = 16,
                shard_examples: int = 1024, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Score ``dataset`` (default: the config's cold_start ``dataset``, :func:`dataset_of`) with
    the config's teacher and write a teacher cache into directory ``out``; returns a summary.

    Args:
      cfg: a ``RunConfig`` (``teacher``, ``seed``, ``mesh``, ``loss.chunk_size``, the stages).
      k: teacher top-k ids kept per position.
      temperature: the teacher temperature (default ``cfg.loss.resolved_teacher_temperature``).
      batch_rows: rows per teacher call. shard_examples: examples per shard.
      force: delete the cache files in ``out`` and build from scratch.

    Raises:
      CacheMismatch: ``out`` holds (part of) a cache made with another teacher / tokenizer /
        k / temperature / dataset / shard_examples (each named), and not ``force``.
      FileExistsError: ``out`` holds other files but no cache manifest, and not ``force``.
    """
    from opd_jax.train.placement import build_mesh
    from opd_jax.train.sft_batches import tokenize_examples

    t0 = time.perf_counter()
    if jax.process_count() > 1:
        raise ValueError("cache-teacher runs in one process (one host, its devices); run it "
                         "without the multi-host launcher")
    for name, value in (("k", k), ("batch_rows", batch_rows), ("shard_examples", shard_examples)):
        if int(value) < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    temperature = float(cfg.loss.resolved_teacher_temperature if temperature is None
                        else temperature)
    path, max_prompt_len = dataset_of(cfg, dataset)
    examples = read_cold_start(path)
    sha = file_sha256(path)
    out = Path(out)
    n_shards = -(-len(examples) // shard_examples)

    old, bad = None, []
    if force and out.is_dir():
        _clear(out)
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        bad = mismatches(old, k=k, temperature=temperature, dataset_sha256=sha)
        if old["shard_examples"] != shard_examples:
            bad.append(f"shard_examples: cache {old['shard_examples']}, expected {shard_examples}")
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} holds files but no {MANIFEST}: not a teacher cache; choose "
                              "an empty or new directory (--out), or pass --force")
    _refuse(out, bad)

    teacher = load_teacher(cfg)
    tok = teacher.tokenizer
    fingerprint, tok_fingerprint = teacher_fingerprint(teacher), tokenizer_fingerprint(tok)
    if old is not None:
        _refuse(out, mismatches(old, teacher=fingerprint, tokenizer=tok_fingerprint,
                                vocab_size=teacher.config.vocab_size))
    rows = tokenize_examples(examples, tok, max_prompt_len=max_prompt_len, source=str(path))
    manifest = {
        "format": FORMAT, "version": VERSION,
        "teacher": {"fingerprint": fingerprint,
                    "description": describe_teacher(cfg.teacher, cfg.seed)},
        "tokenizer": tok_fingerprint, "vocab_size": int(teacher.config.vocab_size), "k": int(k),
        "temperature": temperature,
        "dataset": {"path": str(path), "sha256": sha, "examples": len(examples)},
        "shard_examples": int(shard_examples), "complete": False,
        "shards": [] if old is None else _kept_shards(out, old),
    }
    kept = {s["start"] for s in manifest["shards"]}
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)

    tm = build_mesh(cfg.mesh)
    params = tm.place(teacher.params, tm.params_shardings(teacher.config, teacher.params,
                                                          teacher=True))
    pad = pad_id_of(tok)
    bar = tqdm(total=len(examples), desc="teacher cache examples", dynamic_ncols=True,
               disable=not progress)
    bar.update(sum(s["records"] for s in manifest["shards"]))
    built = 0
    for i in range(n_shards):
        start, stop = i * shard_examples, min((i + 1) * shard_examples, len(examples))
        if start in kept:
            continue
        scored = _score_rows(rows[start:stop], params, teacher.config, tm, k=k,
                             temperature=temperature, batch_rows=batch_rows,
                             chunk_size=cfg.loss.chunk_size, pad_id=pad)
        records = (encode_record(start + j, ids, lps, lse, rows[start + j]["completion_ids"], tlp)
                   for j, (ids, lps, lse, tlp) in enumerate(scored))
        name = shard_name(i, n_shards)
        count, digest = write_shard(out / name, records)
        tokens = sum(len(r["completion_ids"]) for r in rows[start:stop])
        manifest["shards"] = sorted([*manifest["shards"], {
            "file": name, "start": start, "stop": stop, "records": count, "tokens": tokens,
            "sha256": digest}], key=lambda s: s["start"])
        write_manifest(out, manifest)
        built += 1
        bar.update(stop - start)
    bar.close()
    manifest["complete"] = True
    write_manifest(out, manifest)
    return {"out": str(out), "dataset": str(path), "examples": len(examples),
            "tokens": sum(len(r["completion_ids"]) for r in rows), "shards": n_shards,
            "built_shards": built, "kept_shards": n_shards - built, "k": int(k),
            "temperature": temperature, "teacher": manifest["teacher"]["description"],
            "seconds": round(time.perf_counter() - t0, 2)}


def _refuse(out: Path, bad: list[str]) -> None:
    if bad:
        raise CacheMismatch(f"{out} holds a teacher cache made with another "
                            + "; another ".join(bad) + ": pass --force (force=True) to rebuild "
                            "it, or choose another --out directory")
