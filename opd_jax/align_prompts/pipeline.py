"""The whole ``align-prompts`` command: read both sets, mark exact duplicates, embed, find each pool
prompt's nearest reference prompt, build the aligned and control sets, summarise, write."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from opd_jax.align_prompts.config import AlignConfig
from opd_jax.align_prompts.embedders import make_set_embedders
from opd_jax.align_prompts.report import write_outputs
from opd_jax.align_prompts.similarity import distribution, histogram_edges, max_similarity, unit_rows
from opd_jax.align_prompts.texts import exact_matches, read_prompt_set


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[(0, size), (size, 2 size), ..., (.., n)]``.

    >>> spans(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def aligned_order(similarity: np.ndarray, *, top_n: int | None, min_similarity: float | None
                  ) -> np.ndarray:
    """Pool indices of the aligned set: most similar first (ties in pool order), those with
    similarity >= ``min_similarity`` (None = all), the first ``top_n`` (None = no cap).

    >>> aligned_order(np.array([0.2, 0.9, 0.5, 0.9]), top_n=3, min_similarity=0.3).tolist()
    [1, 3, 2]
    """
    order = np.argsort(-similarity, kind="stable")
    if min_similarity is not None:
        order = order[similarity[order] >= min_similarity]
    return order[:top_n] if top_n is not None else order


def control_indices(removed: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Pool indices of the control set: every prompt not ``removed``, or ``n`` of them drawn
    without replacement with ``seed`` (in pool order)."""
    keep = np.flatnonzero(~removed)
    if n is None or n >= len(keep):
        return keep
    return np.sort(np.random.default_rng(seed).choice(keep, n, replace=False))


def write_texts(cfg: AlignConfig) -> list[Path]:
    """Write ``<out_dir>/reference_texts.jsonl`` and ``pool_texts.jsonl`` (``{"id", "text"}`` per
    row, in file order): the matching texts an external model should embed for
    ``embedder.kind: precomputed`` (row ``i`` of each ``.npy`` = line ``i``). Returns the paths."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, spec in (("reference", cfg.reference), ("pool", cfg.pool)):
        s = read_prompt_set(spec, cfg.strip_suffixes, name)
        path = out / f"{name}_texts.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                for i, t in zip(s.ids, s.texts)))
        paths.append(path)
    return paths


def align_prompts(cfg: AlignConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run the command; writes ``cfg.out_dir`` and returns the summary (see
    :mod:`opd_jax.align_prompts` for the outputs). Raises ``ValueError`` on unreadable sets."""
    t0 = time.perf_counter()
    ref = read_prompt_set(cfg.reference, cfg.strip_suffixes, "reference")
    pool = read_prompt_set(cfg.pool, cfg.strip_suffixes, "pool")
    exact = exact_matches(pool.texts, ref.texts) if cfg.exact else np.zeros(len(pool), bool)
    embed_ref, embed_pool, described = make_set_embedders(cfg, ref, pool)
    t_read = time.perf_counter()

    bar = tqdm(total=len(ref) + len(pool), desc="align: embedding", disable=not progress,
               dynamic_ncols=True)
    reference_MxD = []
    for a, b in spans(len(ref), cfg.batch_size):
        reference_MxD.append(embed_ref(a, b))
        bar.update(b - a)
    reference_MxD = np.concatenate(reference_MxD)
    mean_D = reference_MxD.mean(0) if cfg.embedder.resolved_center else None
    center = (lambda x: unit_rows(x - mean_D)) if mean_D is not None else unit_rows
    reference_MxD = center(reference_MxD)
    self_sim = np.concatenate([max_similarity(reference_MxD[a:b], reference_MxD,
                                              exclude_offset=a)[0]
                               for a, b in spans(len(ref), cfg.batch_size)])
    sims, nearest = np.zeros(len(pool), np.float32), np.zeros(len(pool), np.int64)
    for a, b in spans(len(pool), cfg.batch_size):
        sims[a:b], nearest[a:b] = max_similarity(center(embed_pool(a, b)), reference_MxD)
        bar.update(b - a)
    bar.close()
    t_embed = time.perf_counter()

    near = sims >= cfg.threshold
    removed = exact | near
    control = control_indices(removed, cfg.control_n, cfg.seed)
    aligned = aligned_order(sims, top_n=cfg.aligned.top_n,
                            min_similarity=cfg.aligned.min_similarity)
    edges = histogram_edges([sims, self_sim], cfg.bins)
    summary = {
        "counts": {"reference": len(ref), "pool": len(pool), "exact_dup": int(exact.sum()),
                   "near_dup": int((near & ~exact).sum()), "removed": int(removed.sum()),
                   "control": int(len(control)), "aligned": int(len(aligned))},
        "embedder": described, "threshold": cfg.threshold, "exact": cfg.exact,
        "center": cfg.embedder.resolved_center, "strip_suffixes": list(cfg.strip_suffixes),
        "aligned_rule": dataclasses.asdict(cfg.aligned), "control_n": cfg.control_n,
        "distributions": {
            "aligned": distribution(sims[aligned], edges),
            "control": distribution(sims[control], edges),
            "pool": distribution(sims, edges),
            "reference_self": distribution(self_sim, edges)},
        # dedup_deepmath.py:96-104 prints the first five near duplicates for a look
        "examples": [{"similarity": float(sims[i]), "pool_id": pool.ids[i],
                      "pool": pool.texts[i][:150], "reference_id": ref.ids[nearest[i]],
                      "reference": ref.texts[nearest[i]][:150]} for i in np.flatnonzero(near)[:5]],
        "seconds": {"read": t_read - t0, "embed_and_search": t_embed - t_read},
    }
    out_dir = Path(cfg.out_dir)
    write_outputs(out_dir, ref, pool, sims=sims, nearest=nearest, exact=exact, near=near,
                  aligned=aligned, control=control, summary=summary)
    summary["out_dir"] = str(out_dir)
    return summary
