"""The ``eval`` stage: held-out accuracy of the student (and teacher) and their KLs, stored as a
JSON-only checkpoint so a resumed run does not evaluate twice."""

from __future__ import annotations

import time

import jax

from opd_jax.checkpoint import StageCheckpointer, stage_dir
from opd_jax.model.tokenizer import pad_id_of
from opd_jax.train import rollout
from opd_jax.train.evaluate import EvalModels, EvalSettings, evaluate_student
from opd_jax.train.stage_context import RunContext, make_sampler, separate_teacher, stage_mesh

__all__ = ["run_eval_stage", "eval_packer"]


def run_eval_stage(ctx: RunContext, index: int, trainable, *, name: str | None = None,
                   with_teacher: bool = True) -> dict:
    """Evaluate the student (and, ``with_teacher``, the teacher) on held-out prompts; the result
    is stored as a JSON-only checkpoint so a resumed run does not evaluate twice."""
    cfg, m = ctx.cfg, ctx.models
    stage = cfg.resolve_stage(index)
    name = name or stage.name
    ck = StageCheckpointer(stage_dir(cfg.run_dir, name), keep_last_n=1, async_save=False)
    if ck.is_done():
        result = ck.restore_latest(None).extra["result"]
        ck.close()
        return result
    t0 = time.perf_counter()
    records = ctx.heldout_records[:stage.n_prompts]
    if not records:
        raise ValueError("the eval stage has no held-out prompts: set data.heldout_size > 0")
    sspec = stage.sampler
    greedy = sspec.temperature == 0.0
    tok = m.tokenizer
    tm = stage_mesh(ctx)
    # both samplers record their hidden states: the scorer reuses them on their own samples
    s_sampler = make_sampler(m.student.config, sspec, tok, greedy=greedy, mesh=tm.mesh,
                             rules=tm.rules, return_hidden=True)
    t_sampler = make_sampler(m.teacher.config, sspec, tok, greedy=True, mesh=tm.mesh,
                             rules=tm.teacher_rules, return_hidden=True) if with_teacher else None
    with tm.scope():
        settings = EvalSettings(tok, ctx.template, stage.data.max_prompt_len, ks=tuple(stage.ks),
                                batch_prompts=stage.batch_prompts,
                                chunk_size=stage.loss.chunk_size, pad_id=pad_id_of(tok),
                                place=tm.place_rows, pack=eval_packer(ctx, stage, tm))
        models = EvalModels(m.student, separate_teacher(ctx), m.frozen, m.teacher.params,
                            s_sampler, t_sampler, teacher_params=m.teacher.params,
                            teacher_memo=ctx.eval_teacher_answers.setdefault(repr(sspec), {}))
        key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000 + index)
        result = evaluate_student(records, trainable, key, settings, models)
    ctx.log.write({"stage": name, "kind": "eval", "step": 0,
                   **{k: v for k, v in result.items() if k != "samples"},
                   "eval_s": round(time.perf_counter() - t0, 2)})
    ck.save(0, None, {"result": result}, done=True)
    ck.wait()
    ck.close()
    return result


def eval_packer(ctx: RunContext, stage, tm):
    """The eval scorer's packing (the stage's ``optim.pack`` settings, as a train stage packs;
    ``None`` when off): one packing group per data-parallel shard when the batch's rows split
    over them, else one group (the rows are then replicated, as unpacked ones are). ``tm``: the
    stage's ``TrainMesh`` (only its ``batch_shards`` is read)."""
    if not stage.optim.pack:
        return None
    shards, m = tm.batch_shards, ctx.models
    for memory in ctx.eval_packed_shapes:
        memory.reuse = stage.optim.pack_reuse

    def pack(batch):
        rows = batch.completion.shape[0]
        return rollout.pack_batch(batch, groups=shards if rows % shards == 0 else 1,
                                  student_config=m.student.config,
                                  teacher_config=m.teacher.config,
                                  max_length=stage.optim.pack_max_length,
                                  shapes=ctx.eval_packed_shapes)
    return pack
