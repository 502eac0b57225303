"""Batches of a cold-start dataset (``cold_start`` stage with ``dataset:``): tokenized examples,
epochs, and the arrays one SFT step trains on.

Epoch ``e`` visits every example once, in the order ``default_rng((seed, e)).permutation(n)``;
step ``s`` takes the next ``batch_size`` examples of its epoch. The last batch of an epoch is
short: copies of its first example fill it and are masked out of the loss, so an epoch is
``ceil(n / batch_size)`` steps and every example weighs the same (LlamaFactory / the HF Trainer
also run a short last batch). The batch of a step depends only on ``(seed, step)``: a resumed
stage continues exactly, and the iterator's state names the file's SHA-256 so it refuses to
resume on another dataset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from opd_jax.data.cold_start_file import ColdStartExample, file_sha256, read_cold_start
from opd_jax.data.padding import pad_left
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.sampling.sampler import bucket_length
from opd_jax.train.rollout import Prompts

__all__ = ["tokenize_examples", "steps_per_epoch", "EpochBatches", "DatasetRows",
           "is_dataset_batch", "dataset_prompts", "dataset_completions", "dataset_batches",
           "stage_data", "stage_prompts", "stage_completions", "stage_keep_rows", "check_datasets"]


def tokenize_examples(examples: Sequence[ColdStartExample], tokenizer, *, max_prompt_len: int,
                      source: str) -> list[dict[str, Any]]:
    """``{"prompt_ids", "completion_ids", "real": True, "source"}`` per example (``source``: the
    example's data source, which routes it to its teacher under ``teachers:``): the rendered prompt as
    written (its special tokens become their ids), then the completion followed by its ``stop``
    token when it has one (the teacher's end of sequence is trained on, as in the on-the-fly
    mode, whose mask includes the EOS).

    Raises ``ValueError`` naming the first example whose prompt is over ``max_prompt_len``
    tokens (``source`` names the file)."""
    rows = []
    for i, ex in enumerate(examples):
        prompt = tokenizer.encode(ex.prompt)
        completion = tokenizer.encode(ex.completion) + (tokenizer.encode(ex.stop) if ex.stop
                                                        else [])
        if len(prompt) > max_prompt_len:
            raise ValueError(f"{source}: example {i + 1} (id {ex.id!r}) has a {len(prompt)}-token "
                             f"prompt, over data.max_prompt_len={max_prompt_len}; raise "
                             "data.max_prompt_len (the builder's limit was the same setting)")
        rows.append({"prompt_ids": prompt, "completion_ids": completion, "real": True,
                     "source": ex.source or ""})
    return rows


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one pass over ``n`` examples: ``ceil(n / batch_size)``."""
    return math.ceil(n / batch_size)


class EpochBatches:
    """Iterator of one process's share of each step's global batch of ``rows``.

    ``batch_size``: the global batch; process ``p`` of ``process_count`` gets rows
    ``[p * b, (p + 1) * b)`` with ``b = batch_size / process_count`` (``gather_records`` puts the
    global batch back together). ``get_state`` / ``set_state``: ``{"step", "examples",
    "sha256"}``, like the prompt iterators' states, for the stage checkpoints."""

    def __init__(self, rows: Sequence[dict], batch_size: int, seed: int, *, sha256: str,
                 process_index: int = 0, process_count: int = 1):
        if not rows:
            raise ValueError("a cold-start dataset needs at least one example")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} does not split over {process_count} "
                             "processes")
        self.rows, self.batch_size, self.seed, self.sha256 = list(rows), batch_size, seed, sha256
        self.process_index, self.process_count = process_index, process_count
        self.per_epoch = steps_per_epoch(len(self.rows), batch_size)
        self.step = 0

    def indices(self, step: int) -> tuple[list[int], int]:
        """``(example indices of global batch step, how many are real)``; the short last batch of
        an epoch repeats its first index."""
        epoch, j = divmod(step, self.per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
        idx = order[j * self.batch_size:(j + 1) * self.batch_size].tolist()
        return idx + [idx[0]] * (self.batch_size - len(idx)), len(idx)

    def batch(self, step: int) -> list[dict]:
        """The global batch of ``step`` (padding rows have ``"real": False``; ``"index"``: the
        example's position in the file, the key of a teacher cache)."""
        idx, real = self.indices(step)
        return [dict(self.rows[i], real=k < real, index=i) for k, i in enumerate(idx)]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        b = self.batch_size // self.process_count
        rows = self.batch(self.step)[self.process_index * b:(self.process_index + 1) * b]
        self.step += 1
        return rows

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "examples": len(self.rows), "sha256": self.sha256}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("sha256") != self.sha256:
            raise ValueError(
                f"the stage's checkpoint was trained on another cold-start dataset "
                f"({state.get('examples')} examples, sha256 {str(state.get('sha256'))[:12]}...; "
                f"now {len(self.rows)} examples, {self.sha256[:12]}...): restore that file, or "
                "start the run over (--fresh)")
        self.step = int(state["step"])


class DatasetRows(NamedTuple):
    """A dataset batch's completions, in the sampler output's fields (``N`` = longest completion
    rounded up to a length bucket): ``tokens`` ``[B, N]`` int32, ``mask`` ``[B, N]`` bool,
    ``logprobs_full`` ``[B, N]`` zeros (no sampler ran), ``keep`` ``[B]`` bool (False: padding
    rows of a short last batch)."""

    tokens: np.ndarray
    mask: np.ndarray
    logprobs_full: np.ndarray
    keep: np.ndarray


def is_dataset_batch(records: Sequence[dict]) -> bool:
    """Whether a batch's records are dataset examples (:meth:`EpochBatches.batch`: tokenized,
    with their file ``index``) rather than prompt records."""
    return bool(records) and "completion_ids" in records[0] and "index" in records[0]


def dataset_prompts(records: Sequence[dict], pad_id: int) -> Prompts:
    """The batch's prompts, left-padded to a length bucket (few shapes, few compiles); the
    teacher's slot holds the same rows (no teacher runs)."""
    prompts = [r["prompt_ids"] for r in records]
    tok_BxP, valid_BxP = pad_left(prompts, bucket_length(max(map(len, prompts))), pad_id)
    return Prompts(list(records), tok_BxP, valid_BxP, tok_BxP, valid_BxP)


def dataset_completions(records: Sequence[dict], pad_id: int) -> DatasetRows:
    """The batch's completions, right-padded to a length bucket."""
    n = bucket_length(max(len(r["completion_ids"]) for r in records))
    tokens_BxN = np.full((len(records), n), pad_id, np.int32)
    mask_BxN = np.zeros((len(records), n), bool)
    for i, r in enumerate(records):
        tokens_BxN[i, :len(r["completion_ids"])] = r["completion_ids"]
        mask_BxN[i, :len(r["completion_ids"])] = bool(r["real"])   # padding rows: no tokens
    keep_B = np.array([bool(r["real"]) for r in records])
    return DatasetRows(tokens_BxN, mask_BxN, np.zeros(mask_BxN.shape, np.float32), keep_B)


def check_datasets(cfg: Any) -> None:
    """Read and check every dataset stage's file (:func:`read_cold_start`) before a run trains
    anything, so a missing file or a bad line fails at once, not after the earlier stages."""
    for i, stage in enumerate(cfg.stages):
        for field in ("dataset", "offpolicy_dataset"):
            if getattr(stage, field, None):
                try:
                    read_cold_start(getattr(stage, field))
                except (OSError, ValueError) as e:
                    raise type(e)(f"stage {stage.name!r} (stages.{i}.{field}): {e}") from None


# --- the hooks of the cold_start_dataset stage kind (opd_jax.train.stage_kinds.STAGE_KINDS) -----


def dataset_batches(ctx: Any, index: int, path: str, batch_size: int, *,
                    max_prompt_len: int) -> EpochBatches:
    """The batches of cold-start file ``path`` for train stage ``index`` of run context ``ctx``:
    read and checked (:func:`~opd_jax.data.cold_start_file.read_cold_start`), tokenized, in
    epochs of seed ``seed + index``, this process's share of each global batch."""
    rows = tokenize_examples(read_cold_start(path), ctx.models.tokenizer,
                             max_prompt_len=max_prompt_len, source=str(path))
    return EpochBatches(rows, batch_size, ctx.cfg.seed + index, sha256=file_sha256(path),
                        process_index=jax.process_index(), process_count=jax.process_count())


def stage_data(ctx: Any, index: int, stage: Any) -> tuple[Any, EpochBatches]:
    """``(stage with its steps, iterator)`` for a dataset cold start (:func:`dataset_batches`):
    ``steps`` is the stage's, or ``epochs x ceil(n / batch_prompts)``."""
    it = dataset_batches(ctx, index, stage.dataset, stage.batch_prompts,
                         max_prompt_len=stage.data.max_prompt_len)
    return dataclasses.replace(stage, steps=stage.steps or stage.epochs * it.per_epoch), it


def stage_prompts(run: Any, records: Sequence[dict]) -> Prompts:
    """:func:`dataset_prompts` with the run's pad id."""
    return dataset_prompts(records, pad_id_of(run.ctx.models.tokenizer))


def stage_completions(run: Any, state: Any, prompts: Prompts, key: Any) -> DatasetRows:
    """:func:`dataset_completions` of the batch (in place of sampled rollouts)."""
    return dataset_completions(prompts.records, pad_id_of(run.ctx.models.tokenizer))


def stage_keep_rows(run: Any, out: DatasetRows) -> tuple[np.ndarray, dict]:
    """The real rows (a short last batch is padded with masked copies); no counts."""
    return out.keep, {}
