"""De-duplication of the pool against held-out prompts: exact (normalised text) and near (cosine
of the teacher's mean-pooled hidden states). Both mark pool rows ``{"record", "scores",
"status"}`` in place, only rows whose ``status`` is still None."""

from __future__ import annotations

import functools
import re
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.data.padding import pad_left
from opd_jax.data.templates import render_prompt
from opd_jax.model.decoder import hidden_states
from opd_jax.sampling.sampler import bucket_length
from opd_jax.select_prompts.config import DedupSpec


def normalize_text(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the key of exact de-duplication.

    >>> normalize_text("  What is 2 +\\t3?\\n") == normalize_text("what IS 2 + 3?")
    True
    """
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_duplicates(rows: list[dict], heldout) -> None:
    """Mark rows (status None) whose normalised prompt equals a held-out one (``"exact_dup"``)."""
    held = {normalize_text(r["prompt"]) for r in heldout}
    for r in rows:
        if r["status"] is None and normalize_text(r["record"]["prompt"]) in held:
            r["status"] = "exact_dup"


@functools.partial(jax.jit, static_argnames=("config",))
def mean_pooled_hidden(params, config, tokens_BxT, valid_BxT):
    """Unit-norm mean over valid tokens of the final-norm hidden states: ``[B, D]`` float32."""
    h_BxTxD, _ = hidden_states(params, config, tokens_BxT, valid_BxT)
    w_BxTx1 = valid_BxT.astype(jnp.float32)[..., None]
    m_BxD = (h_BxTxD.astype(jnp.float32) * w_BxTx1).sum(1) / jnp.maximum(w_BxTx1.sum(1), 1.0)
    return m_BxD / jnp.maximum(jnp.linalg.norm(m_BxD, axis=-1, keepdims=True), 1e-12)


def _token_lists(records, tokenizer, template, mode: str, max_len: int) -> list[list[int]]:
    if mode == "prompt":  # the templated student prompt (its last max_len tokens)
        return [tokenizer.encode(render_prompt(tokenizer, template.student(r),
                                               template.chat_template_kwargs))[-max_len:]
                for r in records]
    return [(tokenizer.encode(r["prompt"]) or [0])[:max_len] for r in records]


def embed_records(model, records, tokenizer, template, *, mode: str, max_len: int,
                  batch_prompts: int, pad_id: int = 0) -> np.ndarray:
    """``[len(records), D]`` unit embeddings (teacher mean-pooled hidden states), batch by batch."""
    out = []
    for start in range(0, len(records), batch_prompts):
        recs = list(records[start:start + batch_prompts])
        toks = _token_lists(recs, tokenizer, template, mode, max_len)
        toks += [toks[-1]] * (batch_prompts - len(toks))  # one shape per length bucket
        t, v = pad_left(toks, bucket_length(max(map(len, toks))), pad_id)
        out.append(np.asarray(mean_pooled_hidden(model.params, model.config, t, v))[:len(recs)])
    return np.concatenate(out) if out else np.zeros((0, model.config.d_model), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def near_duplicates(rows: list[dict], heldout, model, tokenizer, template, spec: DedupSpec, *,
                    max_len: int, batch_prompts: int, pad_id: int = 0) -> None:
    """Mark rows (status None) whose prompt embedding is within ``spec.threshold`` cosine of a
    held-out prompt's (``status = "near_dup"``; ``scores["heldout_similarity"]`` = the max).

    With ``spec.center`` the embeddings are centred on their mean over pool and held-out first
    (mean-pooled hidden states share a large common direction, so raw cosines of unrelated
    prompts are close to 1); the mean is accumulated in a first streamed pass over the pool.
    """
    kw = dict(mode=spec.embed, max_len=max_len, batch_prompts=batch_prompts, pad_id=pad_id)
    held = embed_records(model, heldout, tokenizer, template, **kw)
    live = [r for r in rows if r["status"] is None]
    batches = [live[i:i + batch_prompts] for i in range(0, len(live), batch_prompts)]
    embed = lambda part: embed_records(model, [r["record"] for r in part], tokenizer, template,
                                       **kw)
    mu = np.zeros(held.shape[1], np.float32)
    if spec.center:
        total, count = held.sum(0), len(held)
        for part in batches:
            total, count = total + embed(part).sum(0), count + len(part)
        mu = total / max(count, 1)
    held = _unit(held - mu)
    for part in batches:  # one batch of embeddings at a time; only the max similarity is kept
        sims = (_unit(embed(part) - mu) @ held.T).max(axis=1)
        for r, s in zip(part, sims.tolist()):
            r["scores"]["heldout_similarity"] = s
            if s >= spec.threshold:
                r["status"] = "near_dup"
