"""Cosine similarity of prompt embeddings: the nearest reference prompt of each query (the
reference's faiss ``IndexFlatIP`` top-1 search on L2-normalised vectors, dedup_deepmath.py:64-77,
done as blocked matrix products) and the distribution summaries of the report."""

from __future__ import annotations

import numpy as np

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm, float32 (all-zero rows stay zero, as
    ``faiss.normalize_L2`` leaves them).

    >>> unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def max_similarity(queries_BxD: np.ndarray, reference_MxD: np.ndarray, *,
                   exclude_offset: int | None = None, block: int = 8192
                   ) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the largest cosine to a reference row and that row's index.

    Both inputs hold unit rows (:func:`unit_rows`), so the cosine is the inner product.
    ``exclude_offset``: the queries are reference rows ``exclude_offset ...`` themselves, and each
    one's own row is left out (leave-one-out similarity within a set). Reference rows are
    visited ``block`` at a time, so memory is ``B x block`` floats. Ties go to the lower index.
    Returns ``(similarity_B, index_B)``; with nothing to compare (an empty reference, or one row
    and ``exclude_offset``) the similarity is NaN and the index -1.
    """
    q = np.asarray(queries_BxD, np.float32)
    best = np.full(len(q), -np.inf, np.float32)
    arg = np.full(len(q), -1, np.int64)
    rows = np.arange(len(q))
    for start in range(0, len(reference_MxD), block):
        s_BxC = q @ np.asarray(reference_MxD[start:start + block], np.float32).T
        if exclude_offset is not None:
            own = exclude_offset + rows - start
            mine = (own >= 0) & (own < s_BxC.shape[1])
            s_BxC[rows[mine], own[mine]] = -np.inf
        if s_BxC.shape[1] == 0:
            continue
        j = s_BxC.argmax(axis=1)
        s = s_BxC[rows, j]
        better = s > best
        best[better], arg[better] = s[better], j[better] + start
    best[arg < 0] = np.nan
    return best, arg


def histogram_edges(arrays: list[np.ndarray], bins: int) -> np.ndarray:
    """``bins + 1`` shared edges from ``min(0, lowest value rounded down to 0.1)`` to 1."""
    finite = [a[np.isfinite(a)] for a in arrays]
    lows = [float(a.min()) for a in finite if a.size]
    lo = min([0.0] + [np.floor(v * 10) / 10 for v in lows])
    return np.linspace(lo, 1.0, bins + 1)


def distribution(values: np.ndarray, edges: np.ndarray) -> dict:
    """Summary of one set's similarities: count, mean, std, min, max, the :data:`QUANTILES`
    (linear interpolation, keys ``p01`` ... ``p99``) and histogram counts over ``edges`` (the
    last bin includes 1.0). NaN values (nothing to compare) are left out and counted apart."""
    v = np.asarray(values, np.float64)
    nan = int(np.isnan(v).sum())
    v = v[~np.isnan(v)]
    out: dict = {"count": int(v.size), "nan": nan}
    if v.size:
        out.update(mean=float(v.mean()), std=float(v.std()), min=float(v.min()),
                   max=float(v.max()))
        out["quantiles"] = {f"p{round(q * 100):02d}": float(x)
                            for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))}
    else:
        out.update(mean=None, std=None, min=None, max=None, quantiles={
            f"p{round(q * 100):02d}": None for q in QUANTILES})
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    out["histogram"] = {"edges": [float(e) for e in edges], "counts": counts.tolist()}
    return out
