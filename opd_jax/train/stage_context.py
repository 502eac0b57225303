"""What every train stage shares: the run context, the sampler of a sampler section, the mesh,
the separate teacher's step view, and the endless prompt batches of a stage."""

from __future__ import annotations

import dataclasses
from typing import Any

from opd_jax.data import PromptTemplate, make_prompt_dataset, make_prompt_iterator
from opd_jax.model.tokenizer import eos_ids_of
from opd_jax.sampling.sampler import Sampler
from opd_jax.sampling.strategies import Sampling
from opd_jax.sharding import rules_key
from opd_jax.train import distributed
from opd_jax.train.metrics_log import MemoryLog, MetricsLog
from opd_jax.train.models import Models
from opd_jax.train.packing import ShapeMemory
from opd_jax.train.placement import TrainMesh, single_device_mesh
from opd_jax.train.step import TeacherSpec

__all__ = ["RunContext", "make_sampler", "stage_mesh", "separate_teacher", "prompt_batches"]


@dataclasses.dataclass
class RunContext:
    """What every stage shares: the config, models, data splits, template, the metrics log and
    the device mesh (``None``: one device)."""

    cfg: Any
    models: Models
    train_records: list
    heldout_records: list
    template: PromptTemplate
    log: MetricsLog | MemoryLog
    progress: bool = True
    mesh: TrainMesh | None = None
    # kept across the run's eval stages: the teacher's held-out answers by sampler settings (a
    # greedy teacher with fixed weights answers the same prompts the same way every time) and
    # the eval scorer's packed shapes (sticky: later evaluations reuse the shapes compiled)
    eval_teacher_answers: dict = dataclasses.field(default_factory=dict)
    eval_packed_shapes: tuple[ShapeMemory, ShapeMemory] = dataclasses.field(
        default_factory=lambda: (ShapeMemory(), ShapeMemory()))


def make_sampler(config, spec, tokenizer, *, greedy: bool = False, return_topk=None, mesh=None,
                 rules="fsdp", score_temperature: float = 1.0,
                 return_hidden: bool = False) -> Sampler:
    """The sampler of ``spec``; ``score_temperature``: the temperature of the recorded
    log-probs (a training stage passes its loss temperature, see ``Sampling``);
    ``return_hidden``: it records its final hidden states (a scorer of its samples reuses them)."""
    sampling = Sampling(temperature=0.0 if greedy else spec.temperature, top_k=spec.top_k or None,
                        top_p=spec.top_p if spec.top_p < 1 else None,
                        min_p=spec.min_p or None, score_temperature=score_temperature)
    eos = eos_ids_of(tokenizer, spec.extra_eos_ids) if spec.stop_at_eos else ()
    return Sampler(config, sampling, spec.max_new_tokens, eos_ids=eos,
                   pad_id=getattr(tokenizer, "pad_id", 0) or 0, return_topk=return_topk,
                   mesh=mesh, rules=rules, slots=spec.slots, cache_windows=spec.cache_windows,
                   return_hidden=return_hidden)


def stage_mesh(ctx: RunContext) -> TrainMesh:
    """The run's mesh (one device when the run gave none)."""
    return ctx.mesh if ctx.mesh is not None else single_device_mesh()


def separate_teacher(ctx: RunContext) -> TeacherSpec:
    """The step's view of the run's separate teacher (its config and mesh rules)."""
    tm = stage_mesh(ctx)
    rules = rules_key(tm.teacher_rules) if tm.teacher_rules != tm.rules else None
    return TeacherSpec("separate", ctx.models.teacher.config, rules=rules)


def prompt_batches(ctx: RunContext, index: int, stage) -> tuple[Any, Any]:
    """``(stage, endless iterator of shuffled per-process prompt-record batches)`` of train stage
    ``index``."""
    batch_size = distributed.per_process_batch(stage.batch_prompts)
    it = make_prompt_iterator(make_prompt_dataset(ctx.train_records, batch_size=batch_size,
                                                  seed=ctx.cfg.seed + index, num_epochs=None,
                                                  source=stage.data.name or stage.data.path))
    return stage, it
