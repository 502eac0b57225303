"""``opd-jax build-cold-start``: the OPD paper's off-policy cold-start dataset, built offline.

What thunlp/OPD ``scripts/infer/vllm_rollout.py`` (commit 0a44395) does, with the config's teacher
and the library's sampler:

* each training prompt gets ``num_teacher_samples`` slots (the reference's ``num_rollouts``, 1 in
  its run, :395), every slot one teacher rollout drawn with the stage's ``sampler`` (the
  reference: temperature 1.0, top-p 0.95, ``max_tokens`` 7168, :375-380; the first two are this
  stage's defaults, ``opd_jax.config.run.COLD_START_SAMPLER``);
* a rollout the ``filters`` reject (:60-73, :275) is counted under its reason and its slot goes
  back to the end of the queue with one more attempt, while ``attempt + 1 < max_attempts``
  (:279-285, :306-307); ``max_attempts`` (default 3, :12) counts every draw of a slot, the first
  one included, so a slot gets at most ``max_attempts - 1`` re-samples (the reference's messages
  call ``max_attempts`` "retries", :186, :290; its code is what we follow);
* a slot rejected ``max_attempts`` times stays empty (:286-291);
* the kept rollouts are written sorted by (prompt, slot) (:502).

Each draw's key is ``row_keys(base, prompt index, slot * max_attempts + attempt)``: the dataset
depends on the seed, the prompts and the config, not on how draws are batched. Every call pads
its prompts to one length (the longest prompt's bucket) and runs ``batch_rows`` rows (a short
last batch is filled with copies, then dropped), so the sampler compiles once. The output is the
JSONL of :mod:`opd_jax.data.cold_start_file` and a summary (:func:`format_summary`) beside it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from opd_jax.config.core import to_dict
from opd_jax.data.cold_start_file import ColdStartExample, summary_path, write_cold_start
from opd_jax.data.padding import pad_left
from opd_jax.eval.filters import REASONS, FilterConfig, filter_completion, marker_warning
from opd_jax.model.tokenizer import eos_ids_of, pad_id_of
from opd_jax.sampling.sampler import bucket_length, row_keys
from opd_jax.teacher.router import record_source
from opd_jax.train import distributed, rollout
from opd_jax.train.models import build_models
from opd_jax.train.placement import build_mesh
from opd_jax.train.run import load_data, make_template
from opd_jax.train.stage_context import make_sampler

__all__ = ["BUILD_KEY", "Slot", "build_cold_start", "encode_all", "format_summary", "pick_stage",
           "split_completion"]

BUILD_KEY = 0xC01D   # folded into key(seed): the builder's draws differ from any training step's


class Slot(NamedTuple):
    """One rollout slot of the queue: ``prompt`` (index into the records), ``slot`` (which of the
    prompt's samples), ``attempt`` (0-based draw)."""

    prompt: int
    slot: int
    attempt: int


def pick_stage(cfg, name: str | None = None) -> int:
    """Index of the cold_start stage to build for: the one called ``name``, else the first with
    a ``dataset``, else the first cold_start stage."""
    stages = list(cfg.stages)
    if name is not None:
        found = [i for i, s in enumerate(stages) if s.name == name]
        if not found or stages[found[0]].kind != "cold_start":
            raise ValueError(f"--stage {name!r}: not a cold_start stage of the config (stages: "
                             f"{[s.name for s in stages]})")
        return found[0]
    for want_dataset in (True, False):
        for i, s in enumerate(stages):
            if s.kind == "cold_start" and (s.dataset is not None or not want_dataset):
                return i
    raise ValueError("the config has no cold_start stage to build a dataset for; add one, e.g. "
                     "stages: [{kind: cold_start, dataset: runs/cold_start.jsonl, epochs: 2}, ...]")


def encode_all(records: list[dict], tokenizer, template, max_prompt_len: int,
               chunk: int = 256) -> list[list[int]]:
    """Each record's student prompt token ids, through the trainer's own encoding (chat template
    and its kwargs); raises before any sampling when a prompt is over ``max_prompt_len``."""
    out: list[list[int]] = []
    for i in range(0, len(records), chunk):
        p = rollout.encode_prompts(records[i:i + chunk], tokenizer, template,
                                   max_prompt_len=max_prompt_len, pad_id=pad_id_of(tokenizer))
        out += [row[valid].tolist() for row, valid in zip(p.student_tokens, p.student_valid)]
    return out


def split_completion(tokens_N: np.ndarray, mask_N: np.ndarray, eos: set[int], tokenizer
                     ) -> tuple[str, str | None, int]:
    """``(text without special tokens, stop token written out or None, completion tokens)`` of
    one sampled row (the EOS, when drawn, is the last masked token)."""
    ids = tokens_N[mask_N].tolist()
    stop = ids[-1] if ids and ids[-1] in eos else None
    body = ids[:-1] if stop is not None else ids
    return (tokenizer.decode(body),
            None if stop is None else tokenizer.decode([stop], skip_special=False), len(ids))


def build_cold_start(cfg, *, stage: str | None = None, out: str | None = None,
                     force: bool = False, batch_rows: int | None = None, progress: bool = True,
                     models=None, records: list[dict] | None = None) -> dict[str, Any]:
    """Build the dataset of cold_start stage ``stage`` (:func:`pick_stage`) into ``out`` (default:
    the stage's ``dataset``) and its summary beside it; returns the summary.

    ``batch_rows``: rollouts per sampler call (default ``batch_prompts x num_teacher_samples``).
    ``models`` / ``records``: what ``cfg`` builds / its training prompts, unless given.
    Raises ``FileExistsError`` when ``out`` exists and not ``force``."""
    t0 = time.perf_counter()
    index = pick_stage(cfg, stage)
    spec = cfg.resolve_stage(index)
    path = Path(out or spec.dataset or "")
    if not (out or spec.dataset):
        raise ValueError(f"stage {spec.name!r} has no dataset path: set stages.{index}.dataset="
                         "path.jsonl (the stage then trains on it) or pass --out path.jsonl")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to build it again")
    distributed.init_distributed(cfg.mesh.distributed)
    records = list(load_data(cfg)[0] if records is None else records)
    if not records:
        raise ValueError("no training prompts to build a cold-start dataset from")
    models = models or build_models(cfg.teacher, cfg.student, seed=cfg.seed)
    tok, template, teacher = models.tokenizer, make_template(cfg), models.teacher
    tm = build_mesh(cfg.mesh)
    params = tm.place(teacher.params, tm.params_shardings(teacher.config, teacher.params,
                                                          teacher=True))
    sampler = make_sampler(teacher.config, spec.sampler, tok, mesh=tm.mesh, rules=tm.teacher_rules)
    fconfig = FilterConfig.from_spec(spec.filters)
    ids = encode_all(records, tok, template, spec.data.max_prompt_len)
    prompt_texts = [tok.decode(t, skip_special=False) for t in ids]
    warning = marker_warning(fconfig, prompt_texts[0]) if prompt_texts else None
    eos = set(eos_ids_of(tok, spec.sampler.extra_eos_ids)) if spec.sampler.stop_at_eos else set()
    pad = pad_id_of(tok)
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), BUILD_KEY), index)
    k, attempts = spec.num_teacher_samples, spec.max_attempts
    rows = batch_rows or spec.batch_prompts * k
    width = bucket_length(max(map(len, ids)))   # one prompt shape for every call: one compile

    pending = [Slot(p, s, 0) for p in range(len(records)) for s in range(k)]
    kept: dict[tuple[int, int], ColdStartExample] = {}
    rejected: Counter[str] = Counter({r: 0 for r in REASONS})
    draws, empty, gen_tokens = 0, 0, 0
    bar = tqdm(total=len(pending), desc="cold-start slots", dynamic_ncols=True,
               disable=not progress or not distributed.is_primary())
    while pending:
        batch, pending = pending[:rows], pending[rows:]
        full = batch + [batch[0]] * (rows - len(batch))   # a short batch: same shape, rows dropped
        tokens, valid = pad_left([ids[s.prompt] for s in full], width, pad)
        prompts = rollout.Prompts([records[s.prompt] for s in full], tokens, valid, tokens, valid)
        keys = row_keys(base, np.array([s.prompt for s in full]),
                        np.array([s.slot * attempts + s.attempt for s in full]))
        sampled = rollout.sample(sampler, params, prompts, keys)
        out_tokens, out_mask = np.asarray(sampled.tokens), np.asarray(sampled.mask, bool)
        retry = []
        for row, s in enumerate(batch):
            text, stop, n = split_completion(out_tokens[row], out_mask[row], eos, tok)
            draws, gen_tokens = draws + 1, gen_tokens + n
            reason = filter_completion(text, fconfig)
            if reason is not None:
                rejected[reason] += 1
                if s.attempt + 1 < attempts:
                    retry.append(s._replace(attempt=s.attempt + 1))
                else:
                    empty += 1
                    bar.update(1)
                continue
            rec = records[s.prompt]
            kept[(s.prompt, s.slot)] = ColdStartExample(
                prompt=prompt_texts[s.prompt], completion=text, stop=stop, id=rec["id"],
                slot=s.slot, attempt=s.attempt, problem=rec["prompt"], answer=rec.get("answer"),
                source=record_source(rec),
                messages=[*template.student(rec), {"role": "assistant", "content": text}])
            bar.update(1)
        pending.extend(retry)
    bar.close()

    examples = [kept[key] for key in sorted(kept)]
    by_attempt = Counter(ex.attempt for ex in examples)
    summary = {
        "dataset": str(path), "stage": spec.name, "prompts": len(records),
        "slots": len(records) * k, "kept": len(examples), "empty_slots": empty,
        "draws": draws, "retries": draws - len(records) * k,
        "rejected": dict(rejected), "kept_at_attempt": [by_attempt[a] for a in range(attempts)],
        "truncated_kept": sum(ex.stop is None for ex in examples),
        "mean_completion_chars": (float(np.mean([len(ex.completion) for ex in examples]))
                                  if examples else None),
        "generated_tokens": gen_tokens, "seconds": round(time.perf_counter() - t0, 2),
        "settings": {"num_teacher_samples": k, "max_attempts": attempts, "seed": cfg.seed,
                     "teacher": to_dict(cfg.teacher), "sampler": to_dict(spec.sampler),
                     "filters": to_dict(spec.filters),
                     "max_prompt_len": spec.data.max_prompt_len},
        "warning": warning,
    }
    if distributed.is_primary():
        write_cold_start(path, examples)
        summary_path(path).write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    s = summary
    lines = [f"cold-start dataset {s['dataset']} (stage {s['stage']!r}): kept {s['kept']} of "
             f"{s['slots']} slots ({s['prompts']} prompts); {s['empty_slots']} slots stayed empty "
             f"after {s['settings']['max_attempts']} draws each",
             f"draws {s['draws']} (retries {s['retries']}), kept at attempt 1..n: "
             f"{s['kept_at_attempt']}, kept but cut at max_new_tokens: {s['truncated_kept']}",
             "rejected: " + ", ".join(f"{k} {v}" for k, v in s["rejected"].items()),
             f"summary: {summary_path(s['dataset'])}"]
    if s.get("warning"):
        lines.append(f"warning: {s['warning']}")
    return "\n".join(lines)
