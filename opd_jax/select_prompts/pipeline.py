"""The whole ``rank-prompts`` command: de-duplicate the pool, score what is left, apply the
rule, write the outputs."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.config.run import RunConfig
from opd_jax.data import load_jsonl
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.select_prompts.config import SIGNALS, STATUSES, SelectConfig
from opd_jax.select_prompts.dedup import exact_duplicates, near_duplicates
from opd_jax.select_prompts.report import write_outputs
from opd_jax.select_prompts.rule import apply_rule
from opd_jax.select_prompts.signals import score_pool
from opd_jax.train.models import build_models
from opd_jax.train.run import load_data, make_template


def _means(rows: list[dict]) -> dict[str, float | None]:
    out = {}
    for k in SIGNALS:
        xs = [r["scores"].get(k) for r in rows]
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        out[k] = float(np.mean(xs)) if xs else None
    return out


def load_heldout(cfg: RunConfig, sel: SelectConfig, run_heldout: list) -> list[dict]:
    """Held-out records to de-duplicate against: the run's split and/or ``dedup.heldout_path``."""
    d = sel.dedup
    out = list(run_heldout) if d.include_run_heldout else []
    if d.heldout_path:
        out += load_jsonl(d.heldout_path, prompt_key=d.heldout_prompt_key, answer_key=None)
    return out


def select_prompts(cfg: RunConfig, sel: SelectConfig, *, models=None, pool=None, heldout=None,
                   progress: bool = True) -> dict[str, Any]:
    """Score, de-duplicate and select; writes the outputs and returns the summary (with the
    selected records under ``"selected"``). ``models`` / ``pool`` / ``heldout`` default to what
    ``cfg`` builds and loads (``heldout`` then also gets ``dedup.heldout_path``)."""
    t0 = time.perf_counter()
    if pool is None or heldout is None:
        train, run_heldout = load_data(cfg)
        pool = train if pool is None else pool
        heldout = load_heldout(cfg, sel, run_heldout) if heldout is None else heldout
    pool = list(pool[:sel.pool_size] if sel.pool_size else pool)
    models = models or build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    template, tok = make_template(cfg), models.tokenizer
    rows = [{"record": r, "scores": {}, "status": None} for r in pool]

    if sel.dedup.exact:
        exact_duplicates(rows, heldout)
    if sel.dedup.near and heldout:
        near_duplicates(rows, heldout, models.teacher, tok, template, sel.dedup,
                        max_len=cfg.data.max_prompt_len, batch_prompts=sel.batch_prompts,
                        pad_id=pad_id_of(tok))
    t_dedup = time.perf_counter()

    live = [r for r in rows if r["status"] is None]
    scores = score_pool([r["record"] for r in live], models, template, sampler_spec=cfg.sampler,
                        max_prompt_len=cfg.data.max_prompt_len, seed=cfg.seed,
                        batch_prompts=sel.batch_prompts, chunk_size=sel.chunk_size,
                        metrics_k=sel.metrics_k, progress=progress) if live else []
    for r, s in zip(live, scores):
        r["teacher_completion"] = s.pop("teacher_completion")
        r["scores"].update(s)
    apply_rule(rows, sel.rule, seed=cfg.seed)
    t_score = time.perf_counter()

    selected = sorted((r for r in rows if r["status"] == "selected"), key=lambda r: r["rank"])
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    summary = {
        "pool": len(pool), "heldout": len(heldout), "scored": len(live),
        "selected_count": len(selected), "counts": counts,
        "means": {"pool": _means(live), "eligible": _means(
            [r for r in live if r["status"] in ("selected", "below_cutoff")]),
            "selected": _means(selected)},
        "rule": dataclasses.asdict(sel.rule), "dedup": dataclasses.asdict(sel.dedup),
        "seconds": {"dedup": t_dedup - t0, "scoring": t_score - t_dedup},
    }
    out_dir = Path(sel.out_dir.replace("{name}", cfg.name))
    write_outputs(out_dir, rows, selected, summary)
    summary["out_dir"] = str(out_dir)
    summary["selected"] = [r["record"] for r in selected]
    return summary
