"""Benchmark: one on-policy distillation iteration (student rollouts + teacher scoring + student
update), opd_jax vs TRL's ``DistillationTrainer`` on identical weights, in one run.

Setting (the demo's): teacher SmolLM2-135M-Instruct (embedded GGUF, dequantised, float32), student
= teacher minus layers 10, 15, 20 (27 layers), 8 basic-arithmetic prompts per step, 32 new tokens
sampled at T=1, full-vocabulary reverse KL KL(S‖T) over the completion, AdamW lr 5e-5.

* opd_jax: ``Sampler`` (jitted prefill + while_loop decode) then the jitted, donated train step
  (student forward+backward, teacher forward, chunked loss; no [B, T, V] logits).
* TRL: ``DistillationTrainer.training_step`` with ``lmbda=1`` (always on-policy), ``beta=1`` (reverse
  KL), same generation settings, plus ``optimizer.step()``; torch float32, all cores.

Reported per side: median seconds per iteration (after warm-up, so compile time is excluded and
listed separately for opd_jax), generated tokens/s, trained tokens/s (prompt + completion tokens
through the student's backward pass), and the FLOP count of the update (6·N_student + 2·N_teacher
per trained token, plus attention) against the 315 GFLOP/s float32 matmul peak.

    python benchmarks/train_step.py            # quiet machine, both sides
    python benchmarks/train_step.py --small    # seconds-long smoke run on tiny random models
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    F32_MATMUL_PEAK_GFLOPS,
    load_report,
    machine_info,
    matmul_peak_gflops,
    print_table,
    write_results,
)


def build(small: bool, attention: str | None = None):
    import dataclasses

    import jax

    from opd_jax.model.config import ModelConfig
    from opd_jax.model.decoder import init_params
    from opd_jax.model.derive import derive_student
    from opd_jax.model.loading import Model

    if small:  # tiny random model on SmolLM2's real tokenizer (TRL needs an HF tokenizer)
        from opd_jax.model.assets import default_teacher_path
        from opd_jax.model.tokenizer import load_tokenizer

        tok = load_tokenizer(default_teacher_path())
        tcfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=4, max_position=4096,
                           tie_embeddings=True)
        teacher = Model(tcfg, init_params(tcfg, jax.random.key(0)), tok)
        drop = [1]
    else:
        from opd_jax.model.assets import default_teacher

        teacher, drop = default_teacher(), [10, 15, 20]
    scfg, sparams = derive_student(teacher.config, teacher.params, drop_layers=drop)
    if attention is not None:   # how full-sequence attention runs (both models; not the math)
        teacher = dataclasses.replace(
            teacher, config=dataclasses.replace(teacher.config, attention=attention))
        scfg = dataclasses.replace(scfg, attention=attention)
    return teacher, Model(scfg, sparams, teacher.tokenizer)


# setting 2 (issue 13): reasoning prompts of varying length, several samples each, EOS on
RAGGED = {"task": "chain_sum", "config": {"min_terms": 2, "max_terms": 6, "min_digits": 1,
                                         "max_digits": 3, "allow_negation": False},
          "instruction": "Think step by step, one operation per line, then end with "
                         '"Answer: <value>" on the last line.'}


def prompts(tok, n: int, seed: int = 0, ragged: bool = False
            ) -> tuple[list[list[int]], list[str]]:
    """``n`` chat-templated prompt token lists and their texts: the demo's 2-term arithmetic, or
    (``ragged``) :data:`RAGGED`'s chain sums of 2-6 terms asked to reason step by step."""
    from opd_jax.data import PromptTemplate, load_reasoning_gym

    if ragged:
        recs = load_reasoning_gym(RAGGED["task"], size=n, seed=seed, config=RAGGED["config"])
        tpl = PromptTemplate(instruction=RAGGED["instruction"])
    else:
        recs = load_reasoning_gym("basic_arithmetic", size=n, seed=seed, config={
            "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
            "operators": "+-*"})
        tpl = PromptTemplate()
    texts = [tok.apply_chat_template(tpl.student(r), add_generation_prompt=True) for r in recs]
    return [tok.encode(t) for t in texts], [tpl.student(r)[-1]["content"] for r in recs]


def length_stats(lengths: list[int]) -> dict:
    """min / median / p90 / max / mean of completion lengths (tokens, EOS included)."""
    a = np.asarray(lengths, float)
    return {"min": int(a.min()), "median": float(np.median(a)),
            "p90": float(np.percentile(a, 90)), "max": int(a.max()), "mean": float(a.mean())}


def _pack(batch, student, teacher, pack: bool, groups: int = 1, shapes=None):
    """``batch`` packed as the train loop packs it (``shapes``: the run's sticky
    ``(student, teacher)`` shape memories, when given)."""
    from opd_jax.train.rollout import pack_batch

    if not pack:
        return batch
    return pack_batch(batch, groups=groups, student_config=student.config,
                      teacher_config=teacher.config, shapes=shapes)


def opd_jax_parts(teacher, student, ids, args):
    """Our side's pieces for ``args``: prompts, sampler, train step (and its loss keywords),
    initial state."""
    from opd_jax import losses
    from opd_jax.config.loss import LossSpec
    from opd_jax.config.schema import OptimSpec
    from opd_jax.data.padding import pad_left
    from opd_jax.sampling.sampler import Sampler, bucket_length
    from opd_jax.sampling.strategies import Sampling
    from opd_jax.train.objectives import make_chunk_fn
    from opd_jax.train.rollout import Prompts
    from opd_jax.train.state import StudentSpec, init_state, make_optimizer
    from opd_jax.train.step import TeacherSpec, make_train_step

    tok = teacher.tokenizer
    tokens, valid = pad_left(ids, bucket_length(max(map(len, ids))), tok.pad_id)
    prompts_ = Prompts([{}] * len(ids), tokens, valid, tokens, valid)
    sampler = Sampler(student.config, Sampling(temperature=1.0), args.new_tokens,
                      eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    opt = make_optimizer(OptimSpec(lr=5e-5, grad_clip_norm=None), 100)
    compute = None if args.precision == "float32" else args.precision   # mixed precision
    loss_kw = dict(student=StudentSpec(student.config, remat=args.remat, compute_dtype=compute),
                   teacher=TeacherSpec("separate", teacher.config),
                   chunk_fn=make_chunk_fn(LossSpec(objective="reverse_kl", top_k=None),
                                          with_metrics=not args.no_metrics),
                   reduction=losses.token_mean, chunk_size=args.chunk_size)
    step = make_train_step(optimizer=opt, grad_accum=args.grad_accum, **loss_kw)
    return prompts_, tokens, valid, sampler, step, loss_kw, init_state(student.params, opt, 0)


def demo_step_and_batch(teacher, student, ids, new_tokens: int, no_metrics: bool = False,
                        precision: str = "float32"):
    """The demo's jitted train step, a fresh state and one packed rollout batch (seed 0)."""
    import jax

    from opd_jax.train.rollout import assemble

    args = argparse.Namespace(new_tokens=new_tokens, remat="none", no_metrics=no_metrics,
                              chunk_size=512, grad_accum=1, precision=precision)
    prompts_, tokens, valid, sampler, step, loss_kw, state = opd_jax_parts(teacher, student, ids,
                                                                           args)
    out = sampler(loss_kw["student"].params_and_lora(_params(state), None)[0], tokens, valid,
                  jax.random.key(0))
    batch = _pack(assemble(prompts_, out.tokens, out.mask, out.logprobs_full), student, teacher,
                  True)
    return step, state, batch


def bench_opd_jax(teacher, student, ids, args, pack: bool = True) -> dict:
    import jax

    from opd_jax.config.schema import OptimSpec
    from opd_jax.train.host_memory import CompileWatch
    from opd_jax.train.packing import ShapeMemory
    from opd_jax.train.rollout import assemble

    tok = teacher.tokenizer
    prompts_, tokens, valid, sampler, step, loss_kw, state = opd_jax_parts(teacher, student,
                                                                           ids, args)
    # sticky packed shapes, as the train loop keeps them (optim.pack_reuse's default)
    shapes = tuple(ShapeMemory(OptimSpec().pack_reuse) for _ in range(2))
    times, gen_tok, trained, compile_s, lengths, faults = [], [], [], None, [], []
    compiled, watch = [], CompileWatch()
    for i in range(args.warmup + args.repeats):
        watch.compiled()
        t0 = time.perf_counter()
        # the sampler runs the weights as the step does (cast to the compute dtype)
        out = sampler(loss_kw["student"].params_and_lora(_params(state), None)[0], tokens,
                      valid, jax.random.key(i))
        batch = _pack(assemble(prompts_, out.tokens, out.mask, out.logprobs_full), student,
                      teacher, pack, args.grad_accum, shapes)
        jax.block_until_ready(batch)
        t1, f1 = time.perf_counter(), _minor_faults()
        state, m = step(state, batch, None, teacher.params)
        jax.block_until_ready(m)
        t2 = time.perf_counter()
        faults.append(_minor_faults() - f1)
        if i == 0:
            compile_s = t2 - t0
        if i >= args.warmup:
            compiled.append(watch.compiled())
            times.append((t2 - t0, t1 - t0, t2 - t1))
            gen_tok.append(int(np.asarray(out.mask).sum()))
            trained.append(_real_tokens(batch))
            lengths += np.asarray(out.mask).sum(axis=1).astype(int).tolist()
    extra = {"first_iteration_s (incl. compile)": compile_s, "loss_last": float(m["scalars"]["loss"]),
             "compiled_step_shapes": step._cache_size(),
             "update_s_each": [round(t[2], 3) for t in times],
             # a timed iteration that compiled (a new packed shape) is not a steady-state one
             "timed_iterations_compiling": int(sum(compiled)),
             "packed_shapes": [list(s.shapes) for s in shapes] if pack else None,
             "update_minor_faults_each": faults[args.warmup:],
             "completion_lengths": length_stats(lengths)}
    if args.phases:
        extra.update(phases(teacher, student, (sampler, args.new_tokens, tok), prompts_, tokens,
                            valid, batch, state, (step, loss_kw), args.repeats, pack,
                            args.grad_accum))
    # the figures are steady-state ones: iterations that compiled a new packed shape are left
    # out of the medians (their times stay in update_s_each), unless every one compiled
    steady = [i for i, c in enumerate(compiled) if not c] or list(range(len(times)))
    pick = lambda xs: [xs[i] for i in steady]
    return _summary("opd_jax" if pack else "opd_jax unpacked", pick(times), pick(gen_tok),
                    pick(trained), student, teacher, extra=extra)


def _minor_faults() -> int:
    """This process's minor page faults so far (XLA CPU's fresh temporaries fault page by page)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _median_s(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile / warm
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def phases(teacher, student, sampler_spec, prompts_, tokens, valid, batch, state, step_spec,
           repeats, pack=True, groups=1) -> dict:
    """Where one iteration's time goes, each part jitted and timed on its own (medians):
    prefill (a 1-token sampler call), decode (the rest of generation), host assembly of the
    batch, teacher forward, student forward + backward + loss (the loss's gradient minus the
    teacher forward inside it), the mechanism metrics (the gradient with its per-token outputs
    kept minus the bare gradient, from which XLA drops them as dead code), optimizer and step
    bookkeeping (the step minus the gradient with its metrics); and real vs computed tokens (the
    padding ratio of the update's rows). With ``groups`` > 1 (gradient accumulation) the teacher
    forward and the gradients are timed on the first
    micro-batch and multiplied by ``groups``."""
    import jax

    from opd_jax.model import decoder
    from opd_jax.sampling.sampler import Sampler
    from opd_jax.sampling.strategies import Sampling
    from opd_jax.train.rollout import assemble
    from opd_jax.train.step import completion_hidden, loss_and_metrics

    sampler, _, tok = sampler_spec
    step, loss_kw = step_spec

    key = jax.random.key(0)
    params = state.trainable
    s_params = loss_kw["student"].params_and_lora(params, None)[0]   # as the sampler runs them
    gen = _median_s(lambda: sampler(s_params, tokens, valid, key).tokens, repeats)
    one = Sampler(student.config, Sampling(temperature=1.0), 1, eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    prefill = _median_s(lambda: one(s_params, tokens, valid, key).tokens, repeats)
    out = sampler(s_params, tokens, valid, key)
    host = _median_s(lambda: _pack(assemble(prompts_, out.tokens, out.mask, out.logprobs_full),
                                   student, teacher, pack, groups), repeats)
    full, batch = batch, _micro_batch(batch, groups)
    n = batch.completion.shape[1]
    run_teacher = lambda p: lambda t, v, pos, seg: decoder.forward(
        p, teacher.config, t, pos, valid_BxT=v, segment_ids_BxT=seg)[0]
    t_fwd = jax.jit(lambda p, b: completion_hidden(run_teacher(p), b.teacher_tokens,
                                                   b.teacher_valid, b.teacher_packed, n))
    teacher_s = groups * _median_s(lambda: t_fwd(teacher.params, batch), repeats)
    grad = jax.jit(jax.grad(lambda p, t, b: loss_and_metrics(p, None, t, b, **loss_kw)[0]))
    grad_s = groups * _median_s(lambda: grad(params, teacher.params, batch), repeats)
    # the same gradient with the per-token outputs kept: XLA drops the metrics from ``grad``
    # above as dead code, so their cost shows only here
    grad_m = jax.jit(jax.grad(lambda p, t, b: loss_and_metrics(p, None, t, b, **loss_kw),
                              has_aux=True))
    grad_m_s = groups * _median_s(lambda: grad_m(params, teacher.params, batch), repeats)
    holder = {"state": jax.tree.map(lambda x: x.copy(), state)}

    def run_step():
        holder["state"], m = step(holder["state"], full, None, teacher.params)
        return m
    step_s = _median_s(run_step, repeats)
    batch = full
    real = _real_tokens(batch)
    rows = batch.student_packed.tokens if batch.student_packed is not None else batch.student_tokens
    computed = int(np.prod(rows.shape))
    return {"phase_prefill_s": prefill, "phase_decode_s": gen - prefill, "phase_host_s": host,
            "phase_teacher_forward_s": teacher_s,
            "phase_student_fwd_bwd_loss_s": grad_s - teacher_s,
            "phase_metrics_s": grad_m_s - grad_s, "phase_optimizer_s": step_s - grad_m_s,
            "real_tokens": real, "computed_tokens": computed,
            "padding_ratio": computed / real}


def _real_tokens(batch) -> int:
    """Real tokens the update trains on: the packed rows' (packing drops the padded rows, and rows
    with no completion token), else the padded rows' valid tokens."""
    valid = batch.student_packed.valid if batch.student_packed is not None else batch.student_valid
    return int(np.asarray(valid).sum())


def _micro_batch(batch, groups: int):
    """The first of ``groups`` gradient-accumulation micro-batches: the first ``1 / groups`` of
    every array's leading axis (rows, or packed groups), as ``train.step``'s split takes them."""
    import jax

    return jax.tree.map(lambda x: x[: x.shape[0] // groups], batch)


def _params(state):
    return state.trainable


def _summary(name, times, gen_tok, trained, student, teacher, extra=None) -> dict:
    tot = float(np.median([t[0] for t in times]))
    gen = float(np.median([t[1] for t in times]))
    upd = float(np.median([t[2] for t in times]))
    g, tr = float(np.mean(gen_tok)), float(np.mean(trained))
    flops = tr * (3 * student.config.flops_per_token() + teacher.config.flops_per_token())
    return {"impl": name, "iter_s": tot, "gen_s": gen, "update_s": upd,
            "gen_tokens": g, "trained_tokens": tr, "gen_tok_per_s": g / gen,
            "trained_tok_per_s": tr / upd, "update_gflops": flops / 1e9,
            "update_gflop_per_s": flops / upd / 1e9,
            "update_pct_peak": 100 * flops / upd / 1e9 / F32_MATMUL_PEAK_GFLOPS, **(extra or {})}


def bench_trl(teacher, student, ids, texts, args) -> dict:
    import torch
    from datasets import Dataset
    from forward import _torch_twin
    from transformers import PreTrainedTokenizerFast
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    tok = teacher.tokenizer
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token,
                                     pad_token=tok.eos_token, bos_token=tok.bos_token)
    hf_tok.chat_template = tok.chat_template
    t_hf, s_hf = _torch_twin(teacher), _torch_twin(student).train()
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts])
    with tempfile.TemporaryDirectory() as out:
        # gradient accumulation as ours: one generation over every row, then grad_accum
        # micro-batches of len / grad_accum rows (TRL's own _prepare_inputs buffering)
        cfg = DistillationConfig(output_dir=out,
                                 per_device_train_batch_size=len(texts) // args.grad_accum,
                                 gradient_accumulation_steps=args.grad_accum,
                                 beta=1.0, temperature=1.0, max_completion_length=args.new_tokens,
                                 learning_rate=5e-5, use_cpu=True, report_to=[],
                                 gradient_checkpointing=args.remat != "none",
                                 bf16=args.precision == "bfloat16",
                                 fp16=False)
        trainer = DistillationTrainer(model=s_hf, teacher_model=t_hf, args=cfg, train_dataset=ds,
                                      processing_class=hf_tok)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = args.grad_accum  # set by trainer.train()
        inputs = next(iter(trainer.get_train_dataloader()))
        times, gen_tok, trained = [], [], []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.grad_accum):   # generates on the first, reuses the buffer after
                trainer.training_step(trainer.model, inputs, None)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            t1 = time.perf_counter()
            if i >= args.warmup:
                # TRL generates inside training_step: generation is not timed separately
                times.append((t1 - t0, float("nan"), t1 - t0))
                gen_tok.append(len(texts) * args.new_tokens)
                # upper bound: TRL generates up to max_completion_length tokens per row
                trained.append(sum(map(len, ids)) + len(texts) * args.new_tokens)
    row = _summary("trl DistillationTrainer", times, gen_tok, trained, student, teacher)
    row.update(gen_s=float("nan"), gen_tok_per_s=float("nan"))
    return row


#: GLIBC_TUNABLES of TRL's process by ``--trl-malloc`` (``None``: unset; "tcmalloc": glibc's
#: defaults, tcmalloc preloaded with ours, TCMALLOC_SETTINGS).
TRL_MALLOC = {"hugetlb": "glibc.malloc.hugetlb=1", "default": None, "keep": "keep",
              "tcmalloc": None}


def _trl_in_child(args) -> dict:
    """TRL's row, measured in a child process (same arguments, ``--side trl``) whose glibc malloc
    tunables are ``--trl-malloc``'s: an allocator setting is per process, and each side gets the
    one it runs fastest with."""
    import subprocess

    from opd_jax.train import host_memory as hm

    ours = ("GLIBC_TUNABLES", "LD_PRELOAD", *hm.TCMALLOC_SETTINGS)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env[hm.MALLOC_SWITCH] = "0"   # the child must not restart into our allocator
    tunables = TRL_MALLOC[args.trl_malloc]
    if tunables is not None:
        env["GLIBC_TUNABLES"] = ":".join(hm.KEEP_FREED_TUNABLES) if tunables == "keep" else tunables
    if args.trl_malloc == "tcmalloc":
        if hm.find_tcmalloc() is None:
            raise SystemExit("--trl-malloc tcmalloc: this machine has no tcmalloc "
                             "(Debian/Ubuntu: apt install libtcmalloc-minimal4)")
        env.update(LD_PRELOAD=hm.find_tcmalloc(), **hm.TCMALLOC_SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--side", "trl",
                        "--row-out", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def _announce(row: dict) -> dict:
    """Print one side's figures as soon as they exist (a later side may run out of memory)."""
    keys = ("iter_s", "gen_s", "update_s", "gen_tokens", "trained_tokens", "update_pct_peak")
    print(f"{row['impl']}: " + ", ".join(f"{k} {row[k]:.3f}" for k in keys if k in row)
          + (f", completion lengths {row['completion_lengths']}"
             if "completion_lengths" in row else "")
          + (f", update_s_each {row['update_s_each']}" if "update_s_each" in row else "")
          + (f", faults {row['update_minor_faults_each']}"
             if "update_minor_faults_each" in row else "")
          + (f", packed shapes {row['packed_shapes']} (timed iterations compiling: "
             f"{row['timed_iterations_compiling']})" if row.get("packed_shapes") else ""),
          flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--phases", action="store_true",
                   help="also time each part of an iteration on its own (prefill, decode, host, "
                        "teacher forward, student fwd+bwd+loss, optimizer) and the padding ratio")
    p.add_argument("--no-pack", action="store_true",
                   help="update on one padded row per sequence (optim.pack=false)")
    p.add_argument("--pack-ab", action="store_true",
                   help="also run the unpacked update in the same run (side by side)")
    p.add_argument("--no-metrics", action="store_true",
                   help="opd_jax step without the in-step mechanism metrics (loss only)")
    p.add_argument("--setting", choices=("demo", "ragged"), default="demo",
                   help="demo: 8 arithmetic prompts x 1 sample, 32 new tokens; ragged (issue 13's "
                        "setting 2): 8 step-by-step chain-sum prompts x 4 samples, up to 256 new "
                        "tokens, EOS on (--batch / --samples / --new-tokens override)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt")
    p.add_argument("--remat", default=None, choices=("none", "full", "dots", "dots_no_batch"),
                   help="student rematerialisation (both sides: TRL's gradient checkpointing when "
                        "not none); default none for demo, full for ragged")
    p.add_argument("--chunk-size", type=int, default=512,
                   help="token rows per chunk of our loss (loss.chunk_size; the config default 512)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per update, both sides (default 1 for demo, 4 for ragged)")
    p.add_argument("--side", default="both", choices=("both", "opd_jax", "trl"),
                   help="which side to run (both: TRL in a child process with its own allocator)")
    p.add_argument("--malloc", default=None, choices=("glibc", "tcmalloc"),
                   help="our side's allocator, as OPD_JAX_MALLOC picks it for the opd-jax command "
                        "(default: its fastest here, tcmalloc where the machine has it)")
    p.add_argument("--trl-malloc", default=None, choices=tuple(TRL_MALLOC),
                   help="allocator of TRL's process (default: its fastest here, tcmalloc where "
                        "the machine has it, else hugetlb): tcmalloc (preloaded as for ours; "
                        "TRL's demo iteration 5.2 s vs 6.6 with hugetlb, 6.3 with jemalloc), "
                        "hugetlb (glibc with transparent huge pages), default (glibc, no "
                        "tunables), keep (glibc with our tunables)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of both sides: bfloat16 is mixed precision (float32 master "
                        "weights and optimizer; ours: student.precision / teacher.precision, the "
                        "teacher's weights cast; TRL: bf16=True, torch autocast)")
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)   # child -> parent
    p.add_argument("--attention", default=None, choices=("dense", "blocked"),
                   help="our models' full-sequence attention (default: the config's, dense); TRL "
                        "keeps transformers' default (sdpa)")
    args = p.parse_args()
    from opd_jax.train.host_memory import MALLOC_SWITCH, allocator, find_tcmalloc, reexec_with_tuned_malloc

    if args.trl_malloc is None:
        args.trl_malloc = "tcmalloc" if find_tcmalloc() else "hugetlb"
    if args.malloc is None:
        args.malloc = "tcmalloc" if find_tcmalloc() else "glibc"
    # our side as the opd-jax command runs it with OPD_JAX_MALLOC=--malloc (glibc: freed memory
    # kept by tunables); TRL runs in a child process with its own allocator (our glibc tunables
    # slow torch's CPU allocator down 1.8x here)
    if args.side != "trl":
        os.environ.setdefault(MALLOC_SWITCH, args.malloc)
        reexec_with_tuned_malloc()
    ragged = args.setting == "ragged"
    if args.samples is None:
        args.samples = 4 if ragged else 1
    if ragged and args.new_tokens == 32:
        args.new_tokens = 256
    if args.remat is None:
        args.remat = "full" if ragged else "none"
    if args.grad_accum is None:
        args.grad_accum = 4 if ragged else 1
    if args.small:
        args.batch, args.new_tokens, args.repeats = 2, 8 if not ragged else 24, 2
    load = load_report()
    teacher, student = build(args.small, args.attention)
    if args.precision != "float32" and args.side != "trl":   # a teacher keeps no master weights
        import dataclasses

        import jax.numpy as jnp

        from opd_jax.model.dtypes import cast_floating

        teacher = dataclasses.replace(teacher, params=cast_floating(teacher.params,
                                                                     jnp.dtype(args.precision)))
    ids, texts = prompts(teacher.tokenizer, args.batch, ragged=ragged)
    # n samples of a prompt = n rows of it (each row draws its own tokens); TRL gets the same rows
    ids, texts = [x for x in ids for _ in range(args.samples)], [t for t in texts
                                                                 for _ in range(args.samples)]
    print(f"setting {args.setting}: {len(ids)} rows ({args.batch} prompts x {args.samples}), "
          f"up to {args.new_tokens} new tokens, remat {args.remat}, grad_accum {args.grad_accum}, "
          f"loss chunk {args.chunk_size}, "
          f"attention {student.config.attention}, allocator {allocator()} "
          f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}); "
          f"load {load}", flush=True)
    if args.side == "trl":   # the child: one row to the parent
        row = bench_trl(teacher, student, ids, texts, args)
        row["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
        row["allocator"] = allocator()
        Path(args.row_out).write_text(json.dumps(row))
        return
    # this machine's matmul speed in each dtype (the reference constant is float32 on another host)
    peaks = {dt: matmul_peak_gflops(dt) for dt in ("float32", "bfloat16")}
    print("measured matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()),
          flush=True)
    rows = [_announce(bench_opd_jax(teacher, student, ids, args, pack=not args.no_pack))]
    if args.pack_ab:
        rows.append(_announce(bench_opd_jax(teacher, student, ids, args, pack=False)))
    for r in rows:
        r["allocator"] = allocator()
    if not args.no_trl and args.side == "both":
        try:
            rows.append(_announce(_trl_in_child(args)))
        except Exception as e:  # noqa: BLE001 - a missing/changed TRL must not hide our numbers
            print(f"TRL side skipped: {type(e).__name__}: {e}")
    trl = next((r for r in rows if r["impl"].startswith("trl")), None)
    if trl is not None:
        for r in rows:
            r["speedup_vs_trl"] = trl["iter_s"] / r["iter_s"]
    for r in rows:   # against this machine's matmul speed in the run's compute dtype
        r["update_pct_measured_peak"] = 100 * r["update_gflop_per_s"] / peaks[args.precision]
    print_table(rows, [("impl", "impl"), ("iter_s", "s/iter"), ("gen_s", "gen s"),
                       ("update_s", "update s"), ("gen_tok_per_s", "gen tok/s"),
                       ("trained_tok_per_s", "trained tok/s"), ("update_gflop_per_s", "GFLOP/s"),
                       ("update_pct_peak", "% ref f32 peak"),
                       ("update_pct_measured_peak", f"% {args.precision} peak here"),
                       ("speedup_vs_trl", "x TRL"),
                       ("compiled_step_shapes", "step shapes")])
    for row in rows if args.phases else ():
        if "computed_tokens" not in row:
            continue
        ph = {k[len("phase_"):]: v for k, v in row.items() if k.startswith("phase_")}
        print_table([{"part": k, "s": v, "share": v / sum(ph.values())} for k, v in ph.items()],
                    [("part", f"{row['impl']} part"), ("s", "s"), ("share", "share")])
        print(f"update rows: {row['computed_tokens']} computed tokens for {row['real_tokens']} "
              f"real (padding ratio {row['padding_ratio']:.2f})")
    for row in rows:
        if "completion_lengths" in row:
            print(f"{row['impl']} completion lengths (tokens, over the timed iterations): "
                  f"{row['completion_lengths']}")
    write_results(f"train_step{'_ragged' if ragged else ''}",
                  {"load": load, "machine": machine_info(), "args": vars(args),
                   "matmul_peak_gflops": peaks, "rows": rows},
                  small=args.small)


if __name__ == "__main__":
    main()
