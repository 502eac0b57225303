"""The pluggable embedders of ``align-prompts``: each turns a prompt set into unit vectors, a batch
of rows at a time (``fn(start, stop) -> [stop - start, D]`` float32), so the pool streams.

* ``tfidf`` (default): :class:`~opd_jax.align_prompts.tfidf.HashedTfidf`, fitted on both sets'
  matching texts; no model, no download.
* ``model``: an opd_jax model (``embedder.model``, any ``ModelSpec``: the embedded SmolLM2 by
  default, a HF folder, a GGUF) through the library's decoder: the unit mean of its final-norm
  hidden states over the tokens of the bare matching text (no chat template), padding masked
  out (:func:`opd_jax.select_prompts.mean_pooled_hidden`, the embedding of ``rank-prompts``'
  near-duplicate rule).
* ``precomputed``: each set's ``embeddings`` ``.npy`` file (memory-mapped), L2-normalised on
  read; e.g. the reference's all-mpnet-base-v2 sentence vectors, computed elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from opd_jax.align_prompts.config import AlignConfig, EmbedderSpec, TfidfSpec
from opd_jax.align_prompts.similarity import unit_rows
from opd_jax.align_prompts.texts import PromptSet
from opd_jax.align_prompts.tfidf import HashedTfidf

SetEmbedder = Callable[[int, int], np.ndarray]


def tfidf_embedders(spec: TfidfSpec, reference: PromptSet, pool: PromptSet
                    ) -> tuple[SetEmbedder, SetEmbedder, str]:
    """TF-IDF fitted on the matching texts of both sets (document frequencies over their union)."""
    tf = HashedTfidf(spec.word_ngrams, spec.char_ngrams, spec.dim, spec.sublinear_tf)
    tf.fit(reference.texts + pool.texts)
    desc = (f"hashed TF-IDF: word {spec.word_ngrams[0]}-{spec.word_ngrams[1]}-grams + char "
            f"{spec.char_ngrams[0]}-{spec.char_ngrams[1]}-grams, 2 x {spec.dim} features, idf over "
            f"{tf.n_docs} prompts")
    return (lambda a, b: tf.embed(reference.texts[a:b]),
            lambda a, b: tf.embed(pool.texts[a:b]), desc)


def model_embedders(spec: EmbedderSpec, reference: PromptSet, pool: PromptSet, *, seed: int
                    ) -> tuple[SetEmbedder, SetEmbedder, str]:
    """Mean-pooled final hidden states of the model ``spec.model`` (loaded here)."""
    from opd_jax.model.tokenizer import pad_id_of
    from opd_jax.select_prompts.dedup import embed_records
    from opd_jax.train.models import derive, load_source, with_execution

    m = spec.model
    model = with_execution(derive(load_source(m, seed), m, seed), m)
    if model.tokenizer is None:
        raise ValueError(f"embedder.model {m.source!r} has no tokenizer; set embedder.model."
                         "tokenizer to its tokenizer file or folder")
    kw = dict(mode="problem", max_len=spec.max_len, batch_prompts=spec.model_batch,
              pad_id=pad_id_of(model.tokenizer))

    def embed(prompts: PromptSet) -> SetEmbedder:
        return lambda a, b: embed_records(model, [{"prompt": t} for t in prompts.texts[a:b]],
                                          model.tokenizer, None, **kw)

    c = model.config
    desc = (f"model {m.source}{' (derived)' if m.derive else ''}: mean of final-norm hidden "
            f"states (D={c.d_model}, {c.n_layers} layers) over <= {spec.max_len} tokens")
    return embed(reference), embed(pool), desc


def load_vectors(path: str, rows: int, name: str) -> np.ndarray:
    """The first ``rows`` rows of a ``[N, D]`` ``.npy`` file (memory-mapped; ``N >= rows``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}.embeddings: no file {path}")
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2 or arr.shape[0] < rows:
        raise ValueError(f"{name}.embeddings {path} has shape {arr.shape}; expected [rows, D] "
                         f"with one row per prompt of {name} ({rows} read)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}.embeddings {path} holds {arr.dtype}, not floating-point vectors")
    return arr[:rows]


def precomputed_embedders(cfg: AlignConfig, reference: PromptSet, pool: PromptSet
                          ) -> tuple[SetEmbedder, SetEmbedder, str]:
    """Each set's ``.npy`` vectors, normalised on read."""
    r = load_vectors(cfg.reference.embeddings, len(reference), "reference")
    p = load_vectors(cfg.pool.embeddings, len(pool), "pool")
    if r.shape[1] != p.shape[1]:
        raise ValueError(f"reference.embeddings are {r.shape[1]}-dimensional but pool.embeddings "
                         f"{p.shape[1]}-dimensional; both sets need the same embedding model")
    desc = (f"precomputed: {cfg.reference.embeddings} / {cfg.pool.embeddings} (D={r.shape[1]}), "
            "L2-normalised")
    return (lambda a, b: unit_rows(r[a:b]), lambda a, b: unit_rows(p[a:b]), desc)


def make_set_embedders(cfg: AlignConfig, reference: PromptSet, pool: PromptSet
                       ) -> tuple[SetEmbedder, SetEmbedder, str]:
    """``(embed reference rows, embed pool rows, description)`` for ``cfg.embedder.kind``."""
    e = cfg.embedder
    if e.kind == "tfidf":
        return tfidf_embedders(e.tfidf, reference, pool)
    if e.kind == "model":
        return model_embedders(e, reference, pool, seed=cfg.seed)
    return precomputed_embedders(cfg, reference, pool)
