"""``opd-jax select-prompts``: score a prompt pool with the signals that predict whether OPD on a
prompt will help, deduplicate it against held-out prompts, keep what a configurable rule selects.

Signals, per prompt (``SIGNALS``): on the student's own samples (``sampler`` section: its
temperature and ``n_samples``) the full-vocabulary reverse KL(S‖T), top-k overlap, the shared
probability mass of each model, both entropies; on the teacher's greedy answer the teacher's mean
log-prob of its own tokens and its entropy (confidence), the forward KL(T‖S) and whether the
answer is correct (``opd_jax.eval`` grading; ``None`` when the prompt has no checkable answer);
the student's accuracy on its samples.

De-duplication against held-out prompts (the run's held-out split, plus ``dedup.heldout_path``):
*exact* after normalising the text (Unicode NFKC, case-fold, whitespace collapsed) and *near*:
cosine similarity of the teacher's final-norm hidden states, mean-pooled over the valid tokens of
the prompt (``dedup.embed``: "problem" = the bare problem text, so the shared chat template and
instruction do not dominate the mean; "prompt" = the templated student prompt), centred on the
mean embedding (``dedup.center``), at least ``dedup.threshold``. A prompt is counted under the first rule that removes it (exact first).

Memory: the pool streams through in batches of ``batch_prompts`` (the last one padded to the same
shape, so nothing recompiles); the jitted per-batch scorer runs the chunked path of the trainer
(``loss_and_metrics``: ``[chunk, V]`` logits at a time, never ``[B, T, V]``) and returns per-prompt
scalars only; only those (and one ``[D]`` embedding per held-out prompt) accumulate.

Config: a run config (``teacher`` / ``student`` / ``data`` / ``sampler`` / ``seed``; ``stages`` may
be omitted) plus a ``select:`` section read into :class:`SelectConfig` (``RunConfig`` is unchanged:
the section is split off before the run config is parsed). Overrides ``select.rule.top_n=50`` go to
the section, the others to the run config. Outputs in ``select.out_dir``: ``selected.jsonl`` (prompt
records with their ``scores`` and ``rank``), ``scores.jsonl`` (every pool prompt, its status and
scores), ``report.md`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
import unicodedata
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from opd_jax import losses
from opd_jax.config import ConfigError, apply_overrides, from_dict, load_yaml
from opd_jax.config_run import RunConfig
from opd_jax.config_schema import LossSpec, need
from opd_jax.data import hash_unit, load_jsonl
from opd_jax.eval import is_correct, is_reasoning_gym
from opd_jax.model import decoder
from opd_jax.sampler import bucket_length
from opd_jax.scoring import pad_left
from opd_jax.train import rollout
from opd_jax.train.objectives import make_chunk_fn
from opd_jax.train.state import StudentSpec
from opd_jax.train.step import TeacherSpec, loss_and_metrics

SIGNALS = {
    "reverse_kl": "KL(S||T), full vocabulary, on the student's samples",
    "overlap": "top-k overlap |S ∩ T| / k on the student's samples",
    "student_shared_mass": "student mass on the shared top-k",
    "teacher_shared_mass": "teacher mass on the shared top-k",
    "student_entropy": "student entropy on its samples",
    "teacher_entropy": "teacher entropy on the student's samples",
    "teacher_logprob": "teacher mean log-prob of its own greedy answer",
    "teacher_answer_entropy": "teacher mean entropy along its greedy answer",
    "forward_kl_teacher": "KL(T||S) on the teacher's greedy answer",
    "teacher_correct": "teacher greedy answer correct (1/0; none if uncheckable)",
    "student_accuracy": "fraction of the student's samples correct",
    "student_len": "student completion tokens",
    "teacher_len": "teacher completion tokens",
    "heldout_similarity": "max cosine similarity to a held-out prompt",
}
STATUSES = ("exact_dup", "near_dup", "uncheckable", "teacher_incorrect", "teacher_unconfident",
            "below_cutoff", "selected")


@dataclasses.dataclass(frozen=True)
class DedupSpec:
    """De-duplication against held-out prompts. ``exact``: normalised-text equality. ``near``:
    cosine of mean-pooled teacher hidden states >= ``threshold`` (``embed``: "problem" or
    "prompt", see the module docstring; ``center``: subtract the mean embedding first). Held-out
    prompts: the run's held-out split (``include_run_heldout``) plus the jsonl ``heldout_path``
    (field ``heldout_prompt_key``)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.95
    embed: Literal["problem", "prompt"] = "problem"
    heldout_path: Optional[str] = None
    heldout_prompt_key: str = "prompt"
    include_run_heldout: bool = True
    center: bool = True

    def validate(self) -> None:
        need(-1.0 <= self.threshold <= 1.0, "threshold", self.threshold, "a cosine in [-1, 1]")


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """Which scored prompts are kept, in order: drop uncheckable ones (``uncheckable: drop``),
    those the teacher gets wrong (``teacher_correct``), those where it is unconfident
    (``min_teacher_logprob`` / ``max_teacher_entropy``, null = off); rank the rest by ``rank_by``
    (a signal name, "score" = ``sum_k weights[k] * zscore(signal_k)``, or "random"), ``descending``
    or not, and keep the first ``top_n`` or ``fraction`` of them (neither = all)."""

    teacher_correct: bool = True
    uncheckable: Literal["keep", "drop"] = "keep"
    min_teacher_logprob: Optional[float] = None
    max_teacher_entropy: Optional[float] = None
    rank_by: str = "reverse_kl"
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    descending: bool = True
    top_n: Optional[int] = None
    fraction: Optional[float] = None

    def validate(self) -> None:
        need(self.rank_by in (*SIGNALS, "score", "random"), "rank_by", self.rank_by,
             f"a signal ({', '.join(SIGNALS)}), 'score' or 'random'")
        bad = [k for k in self.weights if k not in SIGNALS]
        need(not bad, "weights", dict(self.weights), f"signal names only (unknown: {bad})")
        need(self.rank_by != "score" or bool(self.weights), "weights", dict(self.weights),
             "a non-empty {signal: weight} mapping for rank_by: score")
        need(self.top_n is None or self.top_n >= 1, "top_n", self.top_n, "null or an integer >= 1")
        need(self.fraction is None or 0 < self.fraction <= 1, "fraction", self.fraction,
             "null or a number in (0, 1]")
        need(self.top_n is None or self.fraction is None, "fraction", self.fraction,
             "null when top_n is set (choose one)")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """The ``select:`` section. ``out_dir`` (``{name}`` = the run name); ``pool_size``: score at
    most this many pool prompts (null = the whole training split of ``data``); ``batch_prompts``
    prompts per batch; ``chunk_size`` token rows per logit chunk; ``metrics_k`` top-k of the
    overlap / shared-mass metrics."""

    out_dir: str = "runs/{name}/select"
    pool_size: Optional[int] = None
    batch_prompts: int = 8
    chunk_size: int = 256
    metrics_k: int = 16
    dedup: DedupSpec = DedupSpec()
    rule: RuleSpec = RuleSpec()

    def validate(self) -> None:
        need(self.pool_size is None or self.pool_size >= 1, "pool_size", self.pool_size,
             "null or an integer >= 1")
        need(self.batch_prompts >= 1, "batch_prompts", self.batch_prompts, "an integer >= 1")
        need(self.chunk_size >= 1, "chunk_size", self.chunk_size, "an integer >= 1")
        need(self.metrics_k >= 1, "metrics_k", self.metrics_k, "an integer >= 1")


def split_sections(raw: dict, overrides: Sequence[str], sections: dict[str, type], *,
                   where: str = "config") -> tuple[RunConfig, list]:
    """``(RunConfig, [section objects])`` from a raw mapping holding extra top-level
    ``sections`` (``{key: dataclass}``); ``key.x=v`` overrides go to section ``key``, the rest to
    the run config. A missing ``stages`` list gets one eval stage (the run config needs one)."""
    raw = dict(raw)
    parsed = {k: raw.pop(k, None) or {} for k in sections}
    wrapper = dataclasses.make_dataclass(
        "Sections", [(k, cls, dataclasses.field(default_factory=cls)) for k, cls in sections.items()])
    own = [o for o in overrides if o.split(".")[0] in sections]
    run_over = [o for o in overrides if o.split(".")[0] not in sections]
    if not raw.get("stages"):
        raw["stages"] = [{"kind": "eval"}]
    try:
        cfg = from_dict(RunConfig, apply_overrides(raw, run_over, schema=RunConfig))
        parsed = apply_overrides(parsed, own, schema=wrapper)
        objs = [from_dict(cls, parsed[k], path=k) for k, cls in sections.items()]
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg, objs


def split_config(raw: dict, overrides: Sequence[str] = (), *, where: str = "config"
                 ) -> tuple[RunConfig, SelectConfig]:
    """``(RunConfig, SelectConfig)`` from a raw mapping with a ``select:`` section."""
    cfg, (sel,) = split_sections(raw, overrides, {"select": SelectConfig}, where=where)
    return cfg, sel


def load_select_config(path: str | Path, overrides: Sequence[str] = ()
                       ) -> tuple[RunConfig, SelectConfig]:
    """The run config and the ``select:`` section of a YAML file, with overrides applied (a
    ``study:`` section, see :mod:`opd_jax.study`, is ignored)."""
    raw = load_yaml(path)
    raw.pop("study", None)
    return split_config(raw, overrides, where=str(path))


# --------------------------------------------------------------------------------------------
# de-duplication
# --------------------------------------------------------------------------------------------


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
    h_BxTxD, _ = decoder.forward(params, config, tokens_BxT, valid_BxT=valid_BxT)
    w_BxTx1 = valid_BxT.astype(jnp.float32)[..., None]
    m_BxD = (h_BxTxD.astype(jnp.float32) * w_BxTx1).sum(1) / jnp.maximum(w_BxTx1.sum(1), 1.0)
    return m_BxD / jnp.maximum(jnp.linalg.norm(m_BxD, axis=-1, keepdims=True), 1e-12)


def _token_lists(records, tokenizer, template, mode: str, max_len: int) -> list[list[int]]:
    if mode == "prompt":  # the templated student prompt (its last max_len tokens)
        return [tokenizer.encode(tokenizer.apply_chat_template(
            template.student(r), add_generation_prompt=True))[-max_len:] for r in records]
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


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def make_batch_scorer(student: StudentSpec, teacher: TeacherSpec, n_samples: int,
                      chunk_size: int, metrics_k: int):
    """Jitted ``fn(trainable, frozen, teacher_args, student_batch, teacher_batch) -> {signal: [P]}``.

    ``student_batch``: ``P * n_samples`` student rollouts (prompt-major); ``teacher_batch``: ``P``
    teacher greedy answers. Both go through the trainer's chunked ``loss_and_metrics`` (full-vocab
    reverse KL, resp. forward KL, plus mechanism metrics); outputs are per-prompt token means.
    """
    def scorer(objective):
        return functools.partial(
            loss_and_metrics, student=student, teacher=teacher,
            chunk_fn=make_chunk_fn(LossSpec(objective=objective, top_k=None), metrics_k=metrics_k),
            reduction=losses.token_mean, chunk_size=chunk_size)

    rkl, fkl = scorer("reverse_kl"), scorer("forward_kl")

    def per_prompt(x_BxN, mask_BxN, n):
        x = jnp.where(mask_BxN, x_BxN, 0.0).reshape(-1, n * x_BxN.shape[1])
        count = mask_BxN.reshape(-1, n * x_BxN.shape[1]).sum(1)
        return x.sum(1) / jnp.maximum(count, 1)

    def fn(trainable, frozen, teacher_args, s_batch, t_batch):
        _, s = rkl(trainable, frozen, teacher_args, s_batch)
        _, t = fkl(trainable, frozen, teacher_args, t_batch)
        sm, tm = s_batch.mask, t_batch.mask
        out = {"reverse_kl": per_prompt(s["loss"], sm, n_samples)}
        for k in ("overlap", "student_shared_mass", "teacher_shared_mass", "student_entropy",
                  "teacher_entropy"):
            out[k] = per_prompt(s[k], sm, n_samples)
        out["teacher_logprob"] = per_prompt(t["teacher_token_logprob"], tm, 1)
        out["teacher_answer_entropy"] = per_prompt(t["teacher_entropy"], tm, 1)
        out["forward_kl_teacher"] = per_prompt(t["loss"], tm, 1)
        out["student_len"] = sm.sum(1).reshape(-1, n_samples).mean(1).astype(jnp.float32)
        out["teacher_len"] = tm.sum(1).astype(jnp.float32)
        return out

    return jax.jit(fn)


def _checkable(record) -> bool:
    return record.get("answer") is not None or is_reasoning_gym(record)


def score_pool(records, models, template, *, sampler_spec, max_prompt_len: int, seed: int,
               batch_prompts: int, chunk_size: int, metrics_k: int, progress: bool = False
               ) -> list[dict]:
    """Per-prompt signals of ``records`` (streamed in batches); one dict per record, plus the
    teacher's greedy completion under ``"teacher_completion"``."""
    from opd_jax.train.stages import make_sampler

    tok, m = models.tokenizer, models
    pad = int(getattr(tok, "pad_id", 0) or 0)
    n = sampler_spec.n_samples
    s_sampler = make_sampler(m.student.config, sampler_spec, tok)
    t_sampler = make_sampler(m.teacher.config, sampler_spec, tok, greedy=True)
    teacher = TeacherSpec("separate", m.teacher.config)
    fn = make_batch_scorer(m.student, teacher, n, chunk_size, metrics_k)
    s_params, s_lora = m.student.params_and_lora(m.trainable, m.frozen)
    key = jax.random.key(seed)
    out: list[dict] = []
    bar = tqdm(total=len(records), desc="select: scoring", disable=not progress,
               dynamic_ncols=True)
    for b, start in enumerate(range(0, len(records), batch_prompts)):
        real = list(records[start:start + batch_prompts])
        recs = real + [real[-1]] * (batch_prompts - len(real))  # static shapes: no recompile
        sub = jax.random.fold_in(key, 20_000 + b)
        prompts = rollout.encode_prompts(recs, tok, template, max_prompt_len=max_prompt_len,
                                         n_samples=n, pad_id=pad)
        s_out = rollout.sample(s_sampler, s_params, prompts, sub, lora=s_lora)
        single = rollout.encode_prompts(recs, tok, template, max_prompt_len=max_prompt_len,
                                        pad_id=pad)
        t_out = rollout.sample(t_sampler, m.teacher.params, single, jax.random.fold_in(sub, 1))
        s_batch = rollout.assemble(prompts, s_out.tokens, s_out.mask, s_out.logprobs_full)
        t_batch = rollout.assemble(single, t_out.tokens, t_out.mask, t_out.logprobs_full)
        vals = jax.device_get(fn(m.trainable, m.frozen, m.teacher.params, s_batch, t_batch))
        s_texts = rollout.decode_rows(tok, s_out.tokens, s_out.mask)
        t_texts = rollout.decode_rows(tok, t_out.tokens, t_out.mask)
        for i, rec in enumerate(real):
            row = {k: float(v[i]) for k, v in vals.items()}
            if _checkable(rec):
                row["teacher_correct"] = float(is_correct(rec, t_texts[i]))
                row["student_accuracy"] = float(np.mean([is_correct(rec, c)
                                                         for c in s_texts[i * n:(i + 1) * n]]))
            else:
                row["teacher_correct"] = row["student_accuracy"] = None
            row["teacher_completion"] = t_texts[i]
            out.append(row)
        bar.update(len(real))
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# the selection rule
# --------------------------------------------------------------------------------------------


def _zscores(values: list) -> list[float]:
    xs = np.array([np.nan if v is None else v for v in values], np.float64)
    ok = np.isfinite(xs)
    if not ok.any():
        return [0.0] * len(values)
    mu, sd = xs[ok].mean(), xs[ok].std()
    z = np.where(ok, (xs - mu) / sd if sd > 0 else 0.0, 0.0)
    return z.tolist()


def apply_rule(rows: list[dict], rule: RuleSpec, *, seed: int = 0) -> list[dict]:
    """Set ``status`` (and ``rank`` for selected rows) on ``rows`` (dicts with ``record``,
    ``scores`` and ``status`` None or a dedup status); returns ``rows``. Ties keep pool order."""
    eligible = []
    for r in rows:
        if r["status"] is not None:
            continue
        s = r["scores"]
        if s.get("teacher_correct") is None and rule.uncheckable == "drop":
            r["status"] = "uncheckable"
        elif rule.teacher_correct and s.get("teacher_correct") == 0.0:
            r["status"] = "teacher_incorrect"
        elif (rule.min_teacher_logprob is not None
              and s["teacher_logprob"] < rule.min_teacher_logprob) or (
                rule.max_teacher_entropy is not None
                and s["teacher_answer_entropy"] > rule.max_teacher_entropy):
            r["status"] = "teacher_unconfident"
        else:
            eligible.append(r)
    if rule.rank_by == "score":
        total = np.zeros(len(eligible))
        for name, w in rule.weights.items():
            total += w * np.asarray(_zscores([r["scores"].get(name) for r in eligible]))
        for r, v in zip(eligible, total.tolist()):
            r["scores"]["selection_score"] = v
        keys = total.tolist()
    elif rule.rank_by == "random":
        keys = [hash_unit(r["record"]["id"], salt=f"select{seed}") for r in eligible]
    else:
        keys = [r["scores"].get(rule.rank_by) for r in eligible]
    sign = -1.0 if rule.descending and rule.rank_by != "random" else 1.0
    order = sorted(range(len(eligible)), key=lambda i: (keys[i] is None or not math.isfinite(
        keys[i]), sign * keys[i] if keys[i] is not None and math.isfinite(keys[i]) else 0.0, i))
    n_keep = (min(rule.top_n, len(eligible)) if rule.top_n is not None else
              math.ceil(rule.fraction * len(eligible)) if rule.fraction is not None else
              len(eligible))
    for rank, i in enumerate(order):
        eligible[i]["status"] = "selected" if rank < n_keep else "below_cutoff"
        if rank < n_keep:
            eligible[i]["rank"] = rank
    return rows


# --------------------------------------------------------------------------------------------
# the whole command
# --------------------------------------------------------------------------------------------


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
    from opd_jax.train.models import build_models
    from opd_jax.train.run import load_data, make_template

    t0 = time.perf_counter()
    if pool is None or heldout is None:
        train, run_heldout = load_data(cfg)
        pool = train if pool is None else pool
        heldout = load_heldout(cfg, sel, run_heldout) if heldout is None else heldout
    pool = list(pool[:sel.pool_size] if sel.pool_size else pool)
    models = models or build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    template, tok = make_template(cfg), models.tokenizer
    pad = int(getattr(tok, "pad_id", 0) or 0)
    rows = [{"record": r, "scores": {}, "status": None} for r in pool]

    if sel.dedup.exact:
        exact_duplicates(rows, heldout)
    if sel.dedup.near and heldout:
        near_duplicates(rows, heldout, models.teacher, tok, template, sel.dedup,
                        max_len=cfg.data.max_prompt_len, batch_prompts=sel.batch_prompts,
                        pad_id=pad)
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


def _jsonl(path: Path, items) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def write_outputs(out_dir: Path, rows: list[dict], selected: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _jsonl(out_dir / "selected.jsonl", ({**r["record"], "scores": r["scores"], "rank": r["rank"]}
                                        for r in selected))
    _jsonl(out_dir / "scores.jsonl", ({"id": r["record"]["id"], "prompt": r["record"]["prompt"],
                                       "answer": r["record"].get("answer"), "status": r["status"],
                                       "scores": r["scores"],
                                       "teacher_completion": r.get("teacher_completion")}
                                      for r in rows))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.md").write_text(format_report(summary))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_report(summary: dict) -> str:
    """The markdown report: dedup counts, the rule's funnel, signal means pool vs selected."""
    c, d, rule = summary["counts"], summary["dedup"], summary["rule"]
    lines = ["# Prompt selection report", "",
             f"Pool: {summary['pool']} prompts; held-out set: {summary['heldout']} prompts; "
             f"scored after de-duplication: {summary['scored']}; "
             f"selected: {summary['selected_count']}.", "",
             "## De-duplication against the held-out set", "",
             "| rule | removed |", "|---|---|",
             f"| exact (normalised text: NFKC, case-folded, whitespace collapsed)"
             f"{'' if d['exact'] else ' — off'} | {c['exact_dup']} |",
             f"| near duplicate (cosine of {'centred ' if d['center'] else ''}mean-pooled "
             f"teacher hidden states over the {d['embed']} tokens >= {d['threshold']}){'' if d['near'] else ' — off'} "
             f"| {c['near_dup']} |", "",
             "## Selection rule", ""]
    lines.append(f"- teacher's greedy answer must be correct: {rule['teacher_correct']}; "
                 f"prompts without a checkable answer: {rule['uncheckable']}")
    if rule["min_teacher_logprob"] is not None or rule["max_teacher_entropy"] is not None:
        lines.append(f"- teacher confident: mean log-prob of its answer >= "
                     f"{rule['min_teacher_logprob']}, mean entropy <= "
                     f"{rule['max_teacher_entropy']}")
    how = (f"weighted z-score {rule['weights']}" if rule["rank_by"] == "score" else
           rule["rank_by"])
    keep = (f"top {rule['top_n']}" if rule["top_n"] is not None else
            f"top {rule['fraction']:.0%}" if rule["fraction"] is not None else "all")
    lines += [f"- rank by {how}" + (", descending" if rule["descending"] and
                                    rule["rank_by"] != "random" else "") + f"; keep {keep}", "",
              "| step | prompts removed |", "|---|---|"]
    for s in STATUSES[2:-1]:
        lines.append(f"| {s} | {c[s]} |")
    lines += [f"| **selected** | **{c['selected']}** |", "",
              "## Signals: pool vs selected (means)", "",
              "| signal | pool (scored) | after filters | selected | selected − pool |",
              "|---|---|---|---|---|"]
    m = summary["means"]
    for k, desc in SIGNALS.items():
        p, e, s = m["pool"][k], m["eligible"][k], m["selected"][k]
        diff = None if p is None or s is None else s - p
        lines.append(f"| {k} ({_cell(desc)}) | {_fmt(p)} | {_fmt(e)} | {_fmt(s)} | {_fmt(diff)} |")
    sec = summary["seconds"]
    lines += ["", f"Time: de-duplication {sec['dedup']:.1f} s, scoring {sec['scoring']:.1f} s."]
    return "\n".join(lines) + "\n"
