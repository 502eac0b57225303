"""The ``align:`` section of ``opd-jax align-prompts`` (:class:`AlignConfig`) and its loader."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional, Sequence

from opd_jax.config.core import ConfigError, apply_overrides, from_dict, load_yaml
from opd_jax.config.schema import ModelSpec, need, need_positive

# thunlp/OPD scripts/infer/dedup_deepmath.py:13: the instruction DAPO-Math-17k appends to every
# question, removed before matching and embedding
DAPO_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class PromptSetSpec:
    """One prompt set: a jsonl or parquet file ``path`` (``format`` null = from the extension).
    ``prompt_key``: the field holding the prompt; dotted for nested fields (DeepMath's
    ``extra_info.question``); a list of chat messages (DAPO's ``prompt``) reads as its first
    message's ``content``, as dedup_deepmath.py:10-11. ``id_key``: a field naming each row (null =
    ``<set>:<row index>``). ``limit``: read only the first rows (null = all). ``embeddings``: a
    ``.npy`` file ``[rows, D]`` of this set's vectors, row ``i`` = the file's row ``i`` (embedder
    ``kind: precomputed``)."""

    path: Optional[str] = None
    format: Optional[Literal["jsonl", "parquet"]] = None
    prompt_key: str = "prompt"
    id_key: Optional[str] = None
    limit: Optional[int] = None
    embeddings: Optional[str] = None

    @property
    def resolved_format(self) -> str:
        return self.format or FORMATS[Path(self.path or "").suffix.lower()]

    def validate(self) -> None:
        need(bool(self.path), "path", self.path, "a .jsonl or .parquet file of prompts")
        need(self.format is not None or Path(self.path).suffix.lower() in FORMATS, "format",
             self.format, f"jsonl or parquet (the extension of {self.path!r} says neither)")
        need_positive(self, "limit", optional=True)
        need(self.embeddings is None or self.embeddings.endswith(".npy"), "embeddings",
             self.embeddings, "null or a .npy file of shape [rows, D]")


@dataclasses.dataclass(frozen=True)
class TfidfSpec:
    """The dependency-free embedder (:class:`opd_jax.align_prompts.tfidf.HashedTfidf`): word
    n-grams of lengths ``word_ngrams`` (inclusive range) and character n-grams ``char_ngrams``,
    each hashed into ``dim`` features (the embedding has ``2 * dim``), TF-IDF weighted (``1 + ln
    tf`` with ``sublinear_tf``, else raw counts)."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)
    dim: int = 2048
    sublinear_tf: bool = True

    def validate(self) -> None:
        for name in ("word_ngrams", "char_ngrams"):
            lo, hi = getattr(self, name)
            need(1 <= lo <= hi, name, [lo, hi], "[min, max] n-gram lengths with 1 <= min <= max")
        need_positive(self, "dim")


@dataclasses.dataclass(frozen=True)
class EmbedderSpec:
    """How prompts become vectors. ``kind``: "tfidf" (default; no model, no network), "model"
    (unit mean of the final-norm hidden states of ``model`` over the prompt's tokens, at most
    ``max_len`` of them, ``model_batch`` prompts per forward pass), "precomputed" (each set's
    ``embeddings`` file, e.g. all-mpnet-base-v2 vectors as the reference used). ``center``: subtract
    the reference set's mean vector before the cosine (null = on for "model" only: mean-pooled
    hidden states share one large direction, so raw cosines of unrelated prompts are near 1)."""

    kind: Literal["tfidf", "model", "precomputed"] = "tfidf"
    tfidf: TfidfSpec = TfidfSpec()
    model: ModelSpec = ModelSpec()
    max_len: int = 256
    model_batch: int = 16
    center: Optional[bool] = None

    @property
    def resolved_center(self) -> bool:
        return self.kind == "model" if self.center is None else self.center

    def validate(self) -> None:
        need_positive(self, "max_len", "model_batch")


@dataclasses.dataclass(frozen=True)
class AlignedSpec:
    """Which pool prompts form the teacher-aligned set: ranked by similarity to the reference
    (most similar first), those with similarity >= ``min_similarity`` (null = no floor), the first
    ``top_n`` (null = no cap)."""

    top_n: Optional[int] = None
    min_similarity: Optional[float] = None

    def validate(self) -> None:
        need_positive(self, "top_n", optional=True)


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """``opd-jax align-prompts``: rank a candidate ``pool`` by similarity to a sample of the
    teacher's post-training prompts (``reference``) and build the de-duplicated control set.

    Matching text: each prompt with the first matching suffix of ``strip_suffixes`` removed, then
    leading / trailing whitespace (dedup_deepmath.py:13-16). ``exact``: a pool prompt whose
    matching text equals a reference prompt's is a duplicate (dedup_deepmath.py:51-52).
    ``threshold``: a pool prompt whose cosine to its nearest reference prompt is >= this is a near
    duplicate (dedup_deepmath.py:82-83; 0.6 was set for all-mpnet-base-v2 vectors: see
    :mod:`opd_jax.align_prompts` for what it means with the other embedders). The control set is
    the pool minus both kinds (``control_n``: a random subset of that many, drawn with ``seed``;
    null = all). ``batch_size``: prompts embedded and compared per batch; ``bins``: histogram
    bins of the similarity report. Outputs go to ``out_dir``."""

    out_dir: str = "runs/align"
    reference: PromptSetSpec = PromptSetSpec()
    pool: PromptSetSpec = PromptSetSpec()
    strip_suffixes: tuple[str, ...] = (DAPO_SUFFIX,)
    exact: bool = True
    threshold: float = 0.6
    embedder: EmbedderSpec = EmbedderSpec()
    aligned: AlignedSpec = AlignedSpec()
    control_n: Optional[int] = None
    seed: int = 0
    batch_size: int = 256
    bins: int = 20

    def validate(self) -> None:
        need(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "a cosine in [-1, 1]")
        need_positive(self, "batch_size", "bins")
        need_positive(self, "control_n", optional=True)
        for name in ("reference", "pool"):   # an absent section is never validated on its own
            need(bool(getattr(self, name).path), f"{name}.path", None,
                 "a .jsonl or .parquet file of prompts")
        if self.embedder.kind == "precomputed":
            for name in ("reference", "pool"):
                need(getattr(self, name).embeddings is not None, f"{name}.embeddings", None,
                     "a .npy file of this set's vectors (embedder.kind: precomputed)")


@dataclasses.dataclass(frozen=True)
class AlignFile:
    """A config file's ``align:`` section (other top-level sections are ignored)."""

    align: AlignConfig = AlignConfig()


def load_align_config(path: str | Path, overrides: Sequence[str] = ()) -> AlignConfig:
    """The ``align:`` section of a YAML file with ``align.key=value`` overrides applied."""
    stray = [o for o in overrides if o.split(".")[0].split("=")[0] != "align"]
    if stray:
        raise ConfigError(f"{path}: align-prompts overrides set the align: section "
                          f"(align.key=value); got {stray}")
    raw = {"align": load_yaml(path).get("align") or {}}
    try:
        return from_dict(AlignFile, apply_overrides(raw, list(overrides), schema=AlignFile)).align
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
