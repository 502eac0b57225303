"""The teacher cache: a dataset's teacher scores on disk, read back with no teacher loaded.

``opd-jax cache-teacher CONFIG`` (:func:`opd_jax.teacher.cache_build.build_cache`) scores every
example of a cold-start dataset once; off-policy stages then read :class:`TeacherScores` from
here. A cache is a directory::

    manifest.json                              what was scored, by what, and which shards exist
    scores-00000-of-00003.array_record         one record per example, examples [0, 1024)
    scores-00001-of-00003.array_record         examples [1024, 2048)  ...

``manifest.json`` (:data:`FORMAT`, ``version`` :data:`VERSION`): ``teacher`` (``fingerprint``
= :func:`~opd_jax.model.fingerprint.params_fingerprint`, ``description`` = the readable spec),
``tokenizer`` (:func:`~opd_jax.model.fingerprint.tokenizer_fingerprint`), ``vocab_size``, ``k``,
``temperature``, ``dataset`` (``path``, ``sha256``, ``examples``), ``shard_examples``, ``shards``
(``file``, ``start``, ``stop``, ``records``, ``tokens``, ``sha256`` each) and ``complete``.
Shards cover ``[0, examples)`` in order, so grain's ArrayRecord data source over the shard list
reads example ``i`` at record key ``i``.

A record (:func:`encode_record`) holds one example's ``n`` completion tokens (``K`` = ``k``):
a 24-byte little-endian header (:data:`MAGIC`, example index int64, ``n`` int32, ``K`` int32)
then ``topk_ids [n, K]`` int32, ``topk_logprobs [n, K]`` float32, ``logsumexp [n]`` float32,
``token_ids [n]`` int32 (the completion itself) and ``token_logprobs [n]`` float32 (the teacher's
log-prob of each completion token). Position ``j`` predicts completion token ``j``, as in
:class:`~opd_jax.teacher.scores.TeacherScores`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from opd_jax.data.cold_start_file import file_sha256
from opd_jax.teacher.scores import TeacherScores

__all__ = ["TeacherCache", "CacheMismatch", "CachedExample", "encode_record", "decode_record",
           "write_shard", "read_manifest", "write_manifest", "mismatches", "shard_name",
           "FORMAT", "VERSION", "MANIFEST"]

FORMAT = "opd_jax.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
MAGIC = b"OPDTC\x01\x00\x00"
_HEADER = struct.Struct("<8sqii")
FINISH = "run `opd-jax cache-teacher CONFIG` again to finish it"
REBUILD = ("rebuild the cache for this setup (`opd-jax cache-teacher CONFIG --force`), or point "
           "to the cache that was made for it")
#: The fields that say what a cache's scores are of, in the order errors name them.
IDENTITY = ("teacher", "tokenizer", "vocab_size", "k", "temperature", "dataset_sha256")


class CacheMismatch(ValueError):
    """A teacher cache made with another teacher / tokenizer / k / temperature / dataset."""


class CachedExample(NamedTuple):
    """One decoded record: example ``index`` with ``n`` completion tokens.

    Attributes:
      index: the example's index in the dataset.
      topk_ids: ``[n, K]`` int32 the teacher's top-K ids, most probable first.
      topk_logprobs: ``[n, K]`` float32 their log-probs.
      logsumexp: ``[n]`` float32.
      token_ids: ``[n]`` int32 the completion tokens.
      token_logprobs: ``[n]`` float32 the teacher's log-prob of each completion token.
    """

    index: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    logsumexp: np.ndarray
    token_ids: np.ndarray
    token_logprobs: np.ndarray


def shard_name(i: int, count: int) -> str:
    """``scores-0000i-of-count.array_record``."""
    return f"scores-{i:05d}-of-{count:05d}.array_record"


def encode_record(index: int, topk_ids_NxK, topk_logprobs_NxK, logsumexp_N, token_ids_N,
                  token_logprobs_N) -> bytes:
    """The bytes of one example's record (module docstring); raises on inconsistent shapes."""
    ids = np.ascontiguousarray(topk_ids_NxK, "<i4")
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [n, K], got shape {ids.shape}")
    n, k = ids.shape
    parts = [(ids, (n, k)), (np.ascontiguousarray(topk_logprobs_NxK, "<f4"), (n, k)),
             (np.ascontiguousarray(logsumexp_N, "<f4"), (n,)),
             (np.ascontiguousarray(token_ids_N, "<i4"), (n,)),
             (np.ascontiguousarray(token_logprobs_N, "<f4"), (n,))]
    for name, (x, shape) in zip(CachedExample._fields[1:], parts):
        if x.shape != shape:
            raise ValueError(f"example {index}: {name} has shape {x.shape}, expected {shape}")
    return _HEADER.pack(MAGIC, int(index), n, k) + b"".join(x.tobytes() for x, _ in parts)


def decode_record(data: bytes, *, k: int | None = None, where: str = "record") -> CachedExample:
    """The :class:`CachedExample` of :func:`encode_record`'s bytes; ``ValueError`` (naming
    ``where``) on a wrong magic, size or ``K``."""
    if len(data) < _HEADER.size:
        raise ValueError(f"{where}: {len(data)} bytes is shorter than a record header")
    magic, index, n, kk = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{where}: not a teacher-cache record (magic {magic!r})")
    if n < 0 or kk < 1 or (k is not None and kk != k):
        raise ValueError(f"{where}: header says n={n}, K={kk} (the manifest says K={k})")
    size = _HEADER.size + 4 * (2 * n * kk + 3 * n)
    if len(data) != size:
        raise ValueError(f"{where}: {len(data)} bytes, expected {size} for n={n}, K={kk}")
    out, offset = [], _HEADER.size
    for dtype, shape in (("<i4", (n, kk)), ("<f4", (n, kk)), ("<f4", (n,)), ("<i4", (n,)),
                         ("<f4", (n,))):
        count = int(np.prod(shape))
        native = np.int32 if dtype == "<i4" else np.float32
        out.append(np.frombuffer(data, dtype, count, offset).reshape(shape).astype(native))
        offset += 4 * count
    return CachedExample(int(index), *out)


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> tuple[int, str]:
    """Write ``records`` as an ArrayRecord file at ``path`` (group size 1: grain's random access)
    through a temporary file; returns ``(record count, hex sha256 of the file)``."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for rec in records:
            writer.write(rec)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return count, file_sha256(path)


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """``manifest.json`` in ``directory``, atomically (temporary file + ``os.replace``)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache in ``directory``; clear errors when there is none or it is not
    one this version reads."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"teacher cache {directory} does not exist: build it with "
                                "`opd-jax cache-teacher CONFIG --out DIR` (or fix the path)")
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a teacher cache (build one "
                                "with `opd-jax cache-teacher CONFIG --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}); rebuild the cache with --force") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a teacher-cache manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: cache format version {manifest.get('version')}, this "
                         f"opd_jax reads version {VERSION}; rebuild it with --force")
    return manifest


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :data:`IDENTITY` fields of a manifest."""
    return {"teacher": manifest["teacher"]["fingerprint"], "tokenizer": manifest["tokenizer"],
            "vocab_size": manifest["vocab_size"], "k": manifest["k"],
            "temperature": manifest["temperature"],
            "dataset_sha256": manifest["dataset"]["sha256"]}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


def mismatches(manifest: dict[str, Any], *, k_at_least: bool = False,
               **expected: Any) -> list[str]:
    """``"field: cache X, expected Y"`` for each :data:`IDENTITY` field given (not ``None``) in
    ``expected`` that differs from the manifest's; ``k_at_least``: a larger cached ``k`` is no
    mismatch (its first ``k`` ids are the teacher's top-``k``)."""
    have = identity(manifest)
    unknown = set(expected) - set(have)
    if unknown:
        raise TypeError(f"unknown cache fields {sorted(unknown)}; known: {list(IDENTITY)}")
    out = []
    for name in IDENTITY:
        want = expected.get(name)
        if want is None:
            continue
        if name == "k" and k_at_least:
            if have["k"] < want:
                out.append(f"k: cache {have['k']!r}, expected at least {want!r}")
        elif not _same(have[name], want):
            out.append(f"{name}: cache {have[name]!r}, expected {want!r}")
    return out


class TeacherCache:
    """A finished teacher cache, read through grain's ``ArrayRecordDataSource``.

    Opening checks the manifest, that the cache is complete, that the shards cover every example
    and (``verify``) that each shard file still has the sha256 the manifest recorded.

    Raises:
      FileNotFoundError: no directory, no manifest, or a listed shard is missing.
      ValueError: an incomplete cache, a corrupted shard (named), a malformed manifest.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        import grain

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        shards, total = m.get("shards", []), m["dataset"]["examples"]
        if not m.get("complete"):
            raise ValueError(f"teacher cache {self.path} is incomplete ({len(shards)} shards of "
                             f"{-(-total // m['shard_examples'])} written): {FINISH}")
        start = 0
        for s in shards:
            file = self.path / s["file"]
            if s["start"] != start or s["stop"] - s["start"] != s["records"]:
                raise ValueError(f"{self.path / MANIFEST}: shard {s['file']} covers examples "
                                 f"[{s['start']}, {s['stop']}) with {s['records']} records after "
                                 f"example {start}; rebuild the cache with --force")
            if not file.is_file():
                raise FileNotFoundError(f"teacher cache {self.path}: shard {s['file']} is "
                                        f"missing; {FINISH}")
            if verify and file_sha256(file) != s["sha256"]:
                raise ValueError(f"teacher cache {self.path}: shard {s['file']} does not match "
                                 "its sha256 in the manifest (corrupted or changed); delete it "
                                 f"and {FINISH}")
            start = s["stop"]
        if start != total:
            raise ValueError(f"teacher cache {self.path}: shards cover {start} of {total} "
                             f"examples; {FINISH}")
        self.source = grain.sources.ArrayRecordDataSource([str(self.path / s["file"])
                                                           for s in shards])
        if len(self.source) != total:
            raise ValueError(f"teacher cache {self.path}: the shards hold {len(self.source)} "
                             f"records, the manifest says {total}; rebuild it with --force")

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return int(self.manifest["dataset"]["examples"])

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}, examples={len(self)}, k={self.k}, "
                f"temperature={self.temperature})")

    def check(self, *, teacher: str | None = None, tokenizer: str | None = None,
              vocab_size: int | None = None, k: int | None = None,
              temperature: float | None = None, dataset_sha256: str | None = None) -> None:
        """``CacheMismatch`` naming every given field (``None`` = not checked) that differs from
        what the cache was made with: ``teacher`` / ``tokenizer`` fingerprints
        (:mod:`opd_jax.model.fingerprint`), ``vocab_size``, ``k`` (the top-k the caller needs:
        a cache with a larger ``k`` serves it, see :meth:`scores`), ``temperature`` (the
        teacher temperature), ``dataset_sha256``."""
        bad = mismatches(self.manifest, k_at_least=True, teacher=teacher, tokenizer=tokenizer,
                         vocab_size=vocab_size, k=k, temperature=temperature,
                         dataset_sha256=dataset_sha256)
        if bad:
            raise CacheMismatch(f"teacher cache {self.path} was made with another "
                                + "; another ".join(bad) + f". {REBUILD}")

    def examples(self, indices: Sequence[int]) -> list[CachedExample]:
        """The decoded records of dataset examples ``indices`` (``IndexError`` out of range)."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"example {i} is not in teacher cache {self.path} "
                                 f"(examples 0..{len(self) - 1})")
        out = []
        for i, data in zip(indices, self.source.__getitems__(indices)):
            ex = decode_record(data, k=self.k, where=f"teacher cache {self.path}, example {i}")
            if ex.index != i:
                raise ValueError(f"teacher cache {self.path}: record {i} holds example "
                                 f"{ex.index}; rebuild it with --force")
            out.append(ex)
        return out

    def scores(self, indices: Sequence[int], n: int, *,
               lengths: Sequence[int] | None = None,
               completion_ids: Sequence[Sequence[int]] | None = None,
               k: int | None = None) -> TeacherScores:
        """The cached :class:`TeacherScores` of examples ``indices`` as numpy arrays ``[B, n,
        ...]``, right-padded with zeros past each example's length; ``query_ids`` ``[B, n, 1]``
        are the completion tokens and ``query_logprobs`` their teacher log-probs.

        ``lengths`` / ``completion_ids``: what the caller trains on, checked against the cache
        (``ValueError`` naming the example when they differ). ``n`` must cover every length.
        ``k``: keep the teacher's top-``k`` of the cached top-``K`` (default all ``K``)."""
        K = self.k if k is None else int(k)
        if not 1 <= K <= self.k:
            raise CacheMismatch(f"k={K}: teacher cache {self.path} holds the top-{self.k} only; "
                                f"rebuild it with `opd-jax cache-teacher CONFIG --k {K} --force`")
        exs = self.examples(indices)
        for name, want in (("lengths", lengths), ("completion_ids", completion_ids)):
            if want is not None and len(want) != len(exs):
                raise ValueError(f"{len(want)} {name} for {len(exs)} indices")
        B = len(exs)
        ids = np.zeros((B, n, K), np.int32)
        top = np.zeros((B, n, K), np.float32)
        lse = np.zeros((B, n), np.float32)
        q_ids = np.zeros((B, n, 1), np.int32)
        q_lp = np.zeros((B, n, 1), np.float32)
        for b, ex in enumerate(exs):
            m = len(ex.token_ids)
            expect = (len(completion_ids[b]) if completion_ids is not None
                      else None if lengths is None else int(lengths[b]))
            if expect is not None and expect != m:
                raise ValueError(f"example {ex.index}: the cache holds {m} completion tokens, "
                                 f"the batch has {expect}: the dataset or its tokenization "
                                 f"changed since the cache was built; {REBUILD}")
            if completion_ids is not None and not np.array_equal(completion_ids[b], ex.token_ids):
                raise ValueError(f"example {ex.index}: the batch's completion tokens differ from "
                                 f"the cached ones (another tokenizer or dataset?); {REBUILD}")
            if m > n:
                raise ValueError(f"example {ex.index} has {m} completion tokens, over n={n}")
            ids[b, :m], top[b, :m] = ex.topk_ids[:, :K], ex.topk_logprobs[:, :K]
            lse[b, :m] = ex.logsumexp
            q_ids[b, :m, 0], q_lp[b, :m, 0] = ex.token_ids, ex.token_logprobs
        return TeacherScores(ids, top, lse, q_ids, q_lp)
