"""Sampler throughput: new tokens/s of ``opd_jax.sampling.sampler`` vs transformers ``generate`` vs tunix.

Models: SmolLM2-135M-Instruct (``default_teacher()``) and the derived student (layers 10, 15 and
20 dropped: 27 layers), float32, on identical weights for every framework (``to_hf_state_dict``).
Each row: batch ``B`` in {1, 8, 32}, 128 new tokens with EOS disabled (every row generates all
of them), greedy and temperature-1 sampling; the time of a whole call (prefill + decode) after a
warm-up call (compile excluded; reported separately for ours).

Next to the measured tokens/s it prints what one decode step must read (all weights once -- the
unembedding included -- plus the KV cache at the mean context) and the memory-bandwidth ceiling
``B * bandwidth / bytes_per_step`` (bandwidth default 15.6 GB/s: one core streaming reads on the
reference machine, DESIGN.md), and the FLOPs per step.

Usage::

    python benchmarks/sampler.py            # full run (quiet machine: ~15-30 min)
    python benchmarks/sampler.py --small    # smoke run on a tiny random model (~1-2 min)
    python benchmarks/sampler.py --tunix-python /tmp/tunix_venv/bin/python   # add tunix

tunix runs in its own virtualenv (it pins its own jax); give its python with ``--tunix-python``
(default: ``/tmp/tunix_venv/bin/python`` when it exists). Results: ``benchmarks/results/sampler.json``.

Continuous batching (``--slots 8,16,32``) runs a different comparison instead: ragged,
EOS-terminated generation (``--ragged-prompts`` chat questions x ``--samples`` samples each,
temperature-1 sampling by default, EOS on, up to ``--new-tokens``, default 256), once as one
plain batch of all rows and once per slot count (``Sampler(..., slots=B)``); tokens/s count the
real (generated, EOS included) tokens. It also reports the completion lengths, the slots' decode
steps and utilization, and whether every row matched the plain run token for token::

    python benchmarks/sampler.py --slots 8,16,32 --no-hf --tunix-python none
    python benchmarks/sampler.py --slots 4,8 --small      # smoke run

Results: ``benchmarks/results/sampler_slots.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from _common import load_report, machine_info, print_table, results_path, write_json  # noqa: E402

from opd_jax.data.padding import pad_left  # noqa: E402
from opd_jax.model.config import ModelConfig  # noqa: E402
from opd_jax.sampling.sampler import Sampler, row_keys  # noqa: E402
from opd_jax.sampling.strategies import Greedy, Sampling  # noqa: E402

QUESTION = "What is 7 times 8? Think step by step, then give the answer on the last line."
MODES = {"greedy": Greedy(), "sample": Sampling(temperature=1.0)}
# ragged lengths: questions that make the teacher reason for a varying number of tokens
RAGGED_QUESTIONS = [
    "What is 3 + 4?",
    "Think step by step: a farmer has 17 sheep and buys 26 more, then sells 9. How many are left?",
    "What is 12 times 11? Answer with the number only.",
    "Explain step by step how to compute 15% of 240.",
    "Think step by step: 5 + 9 + 2 + 8 + 7 + 3 = ?",
    "Name a prime number between 20 and 30.",
    "Think step by step: a train travels 60 km per hour for 2.5 hours. How far does it go?",
    "Think step by step: Tom has 3 boxes of 12 pencils and gives away 10. How many are left?",
]


# ----------------------------------------------------------------------------------------------
# models and accounting
# ----------------------------------------------------------------------------------------------


def load_models(small: bool) -> tuple[list[tuple[str, ModelConfig, dict]], list[int], Any]:
    """``[(name, config, params)]``, the prompt token ids and the tokenizer (``None`` with
    ``small``)."""
    from opd_jax.model.derive import derive_student

    if small:
        from opd_jax.model import decoder

        config = ModelConfig(vocab_size=4096, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                             head_dim=16, ffn_dim=128, tie_embeddings=True, rope_theta=1e5)
        params = decoder.init_params(config, jax.random.PRNGKey(0))
        prompt = [int(t) for t in np.random.default_rng(0).integers(1, 4096, 24)]
        s_config, s_params = derive_student(config, params, drop_layers=[1])
        return [("tiny", config, params), ("tiny-student", s_config, s_params)], prompt, None
    from opd_jax.model.assets import default_teacher

    teacher = default_teacher("float32")
    tok = teacher.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]))
    s_config, s_params = derive_student(teacher.config, teacher.params, drop_layers=[10, 15, 20])
    return [("SmolLM2-135M", teacher.config, teacher.params),
            ("student-27L", s_config, s_params)], prompt, tok


def step_cost(config: ModelConfig, params: dict, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step reads (weights once + KV cache at ``context``) and its FLOPs."""
    itemsize = np.dtype(params["embed"].dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(params)) * itemsize
    if not config.tie_embeddings:  # the input embedding is a gather of B rows, not a read of V x D
        weights -= params["embed"].size * itemsize
    kv = 2 * config.n_layers * batch * context * config.n_kv_heads * config.head_dim * itemsize
    return {"bytes_per_step": float(weights + kv), "weight_bytes": float(weights),
            "kv_bytes": float(kv), "flops_per_step": batch * config.flops_per_token(int(context))}


def median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# ----------------------------------------------------------------------------------------------
# the frameworks
# ----------------------------------------------------------------------------------------------


def bench_ours(config, params, prompt, batch, mode, new_tokens, repeats) -> dict[str, Any]:
    sampler = Sampler(config, MODES[mode], new_tokens, eos_ids=())
    tokens = np.tile(np.asarray(prompt, np.int32), (batch, 1))
    valid = np.ones_like(tokens, bool)
    run = lambda: jax.block_until_ready(sampler(params, tokens, valid, jax.random.key(0)).tokens)
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    seconds = median_time(run, repeats)
    return {"seconds": seconds, "tok_s": batch * new_tokens / seconds,
            "first_call_s": first, "compile_s_approx": max(first - seconds, 0.0)}


def ragged_setup(tokenizer, n_prompts: int, vocab_size: int) -> tuple[list[list[int]], tuple]:
    """Prompts and EOS ids for the ragged comparison: chat-templated questions and the
    tokenizer's EOS; without a tokenizer (``--small``, random weights) random prompts of 4-40
    tokens and 1 in 64 of the vocabulary as EOS (geometric lengths, mean ~64)."""
    if tokenizer is None:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(1, vocab_size, rng.integers(4, 41)).tolist()
                   for _ in range(n_prompts)]
        return prompts, tuple(range(1, vocab_size, 64))
    from opd_jax.model.tokenizer import eos_ids_of

    qs = [RAGGED_QUESTIONS[i % len(RAGGED_QUESTIONS)] for i in range(n_prompts)]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in qs]
    return prompts, eos_ids_of(tokenizer)


def bench_slots(config, params, prompts, eos, n_samples, mode, new_tokens, slots, repeats,
                chunk_steps, refill_at) -> dict[str, Any]:
    """One ragged run: ``len(prompts) * n_samples`` rows (prompt-major, keys by prompt and
    sample), plain (``slots=None``) or over ``slots`` decode slots; time of a whole call after a
    warm-up call."""
    sampler = Sampler(config, MODES[mode], new_tokens, eos_ids=eos, slots=slots,
                      chunk_steps=chunk_steps, refill_at=refill_at)
    rows = [p for p in prompts for _ in range(n_samples)]
    tokens, valid = pad_left(rows)
    keys = row_keys(0, np.repeat(np.arange(len(prompts)), n_samples),
                    np.tile(np.arange(n_samples), len(prompts)))
    run = lambda: jax.block_until_ready(sampler(params, tokens, valid, keys))
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    seconds = median_time(run, repeats)
    lengths = np.asarray(out.lengths)
    res = {"seconds": seconds, "first_call_s": first, "real_tokens": int(lengths.sum()),
           "tok_s": float(lengths.sum()) / seconds, "tokens": np.asarray(out.tokens),
           "lengths": lengths}
    st = sampler.last_slot_stats
    if st is not None:
        res.update(decode_steps=st.decode_steps, utilization=st.utilization, chunks=st.chunks,
                   admits=st.admits, prefilled_prompts=st.prefilled_prompts)
    else:
        res.update(decode_steps=int(out.num_steps) - 1, utilization=float(
            (lengths - 1).sum()) / max((int(out.num_steps) - 1) * len(rows), 1))
    return res


def main_slots(args, models, tokenizer) -> dict[str, Any]:
    """``--slots``: plain vs continuous batching on ragged, EOS-terminated generation."""
    load = load_report()
    slot_counts = [int(b) for b in args.slots.split(",") if b]
    N = args.new_tokens or (64 if args.small else 256)
    repeats = args.repeats or (1 if args.small else 2)
    modes = [m for m in (args.modes if args.modes != "greedy,sample" else "sample").split(",") if m]
    rows_out = []
    for name, config, params in models:
        prompts, eos = ragged_setup(tokenizer, args.ragged_prompts, config.vocab_size)
        for mode in modes:
            print(f"[{name}] {mode} plain ...", flush=True)
            plain = bench_slots(config, params, prompts, eos, args.samples, mode, N, None,
                                repeats, args.chunk_steps, args.refill_at)
            lengths = plain["lengths"]
            for slots in [None] + slot_counts:
                if slots is not None:
                    print(f"[{name}] {mode} slots={slots} ...", flush=True)
                r = plain if slots is None else bench_slots(
                    config, params, prompts, eos, args.samples, mode, N, slots, repeats,
                    args.chunk_steps, args.refill_at)
                rows_out.append({
                    "model": name, "mode": mode, "rows": len(lengths), "new_tokens": N,
                    "slots": slots or "-", "seconds": round(r["seconds"], 2),
                    "real_tokens": r["real_tokens"], "tok_s": round(r["tok_s"], 1),
                    "x_plain": round(r["tok_s"] / plain["tok_s"], 2),
                    "decode_steps": r["decode_steps"],
                    "utilization": round(r["utilization"], 2),
                    "prefills": r.get("prefilled_prompts", len(lengths)),
                    "same_tokens": bool(np.array_equal(r["tokens"], plain["tokens"])),
                    "first_call_s": round(r["first_call_s"], 1),
                    "lengths_p10_50_90_max": [int(np.percentile(lengths, q)) for q in
                                              (10, 50, 90, 100)]})
    print()
    print(f"real (generated) tokens/s, ragged EOS-terminated rows, up to {N} new tokens, "
          f"chunk_steps {args.chunk_steps}, refill_at {args.refill_at or 'slots // 8'}")
    print_table(rows_out, [("model", "model"), ("mode", "mode"), ("rows", "rows"),
                           ("slots", "slots"), ("tok_s", "tok/s"), ("x_plain", "x plain"),
                           ("seconds", "s"), ("real_tokens", "tokens"),
                           ("decode_steps", "steps"), ("utilization", "util"),
                           ("prefills", "prefills"), ("same_tokens", "same"),
                           ("lengths_p10_50_90_max", "len p10/50/90/max"),
                           ("first_call_s", "1st call s")])
    if load["busy"]:
        print("WARNING: the machine was busy during this run; the tokens/s above are unreliable.")
    payload = {"benchmark": "sampler_slots", "small": args.small, "machine": machine_info(),
               "load": load, "load_after": load_report(warn=False), "rows": rows_out}
    out = Path(args.out).with_name("sampler_slots_small.json" if args.small
                                   else "sampler_slots.json")
    print(f"wrote {write_json(out, payload)}")
    return payload


def build_hf(config: ModelConfig, params: dict):
    import torch
    import transformers

    from opd_jax.model.hf_loader import to_hf_config, to_hf_state_dict

    cfg = to_hf_config(config)
    cls = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[config.family]
    model = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**cfg))
    state = {k: torch.from_numpy(v) for k, v in to_hf_state_dict(config, params).items()}
    model.load_state_dict(state, strict=False)
    model.eval()
    model.generation_config.eos_token_id = None
    return model


def bench_hf(model, prompt, batch, mode, new_tokens, repeats) -> dict[str, Any]:
    import torch

    ids = torch.tensor([prompt] * batch)
    kw = dict(max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    if mode == "greedy":
        kw.update(do_sample=False)
    else:  # plain temperature-1 sampling (HF's default top_k=50 switched off)
        kw.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        assert out.shape[1] == len(prompt) + new_tokens, out.shape

    run()
    seconds = median_time(run, repeats)
    return {"seconds": seconds, "tok_s": batch * new_tokens / seconds}


TUNIX_RUNNER = r'''
import json, os, sys, time, statistics
import numpy as np
spec = json.loads(open(sys.argv[1]).read())
import jax, jax.numpy as jnp
from flax import nnx
from tunix.generate import sampler as tsampler
from tunix.models.llama3 import model as tmodel, params as tparams

c = spec["config"]
cfg = tmodel.ModelConfig(num_layers=c["n_layers"], vocab_size=c["vocab_size"], embed_dim=c["d_model"],
                         hidden_dim=c["ffn_dim"], num_heads=c["n_heads"], head_dim=c["head_dim"],
                         num_kv_heads=c["n_kv_heads"], rope_theta=int(c["rope_theta"]),
                         norm_eps=c["rms_eps"], weight_tying=c["tie_embeddings"])
mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
model = tparams.create_model_from_safe_tensors(spec["folder"], cfg, mesh)


class Tok:  # tunix tokenizes strings; hand it our ids through a trivial tokenizer
    def __init__(self, prompt):
        self.prompt = prompt
    def encode(self, s, **kw): return list(self.prompt)
    def decode(self, ids, **kw): return ""
    def bos_id(self): return self.prompt[0]
    def eos_id(self): return -1
    def pad_id(self): return 0


results = {}
P, N = len(spec["prompt"]), spec["new_tokens"]
P2 = 1 << (P - 1).bit_length()  # tunix left-pads prompts to a power of two
for batch in spec["batches"]:
    s = tsampler.Sampler(model, Tok(spec["prompt"]), tsampler.CacheConfig(
        cache_size=P2 + N + 8, num_layers=c["n_layers"], num_kv_heads=c["n_kv_heads"],
        head_dim=c["head_dim"]))
    for mode in spec["modes"]:
        kw = dict(max_generation_steps=N, echo=False, max_prompt_length=P2)
        if mode == "sample":
            kw.update(temperature=1.0, top_p=1.0, seed=0)
        run = lambda: s(["x"] * batch, **kw)
        t0 = time.perf_counter(); out = run(); first = time.perf_counter() - t0
        got = len(out.tokens[0])
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        results[f"{batch}/{mode}"] = {"seconds": sec, "tok_s": batch * N / sec,
                                      "first_call_s": first, "tokens_per_row": got}
print("TUNIX_RESULT" + json.dumps(results))
'''


def bench_tunix(python: str, config: ModelConfig, params: dict, prompt, batches, modes,
                new_tokens, repeats) -> dict[str, Any]:
    """Run tunix's Sampler in its own virtualenv on the same weights (HF safetensors folder)."""
    from safetensors.numpy import save_file

    from opd_jax.model.hf_loader import to_hf_config, to_hf_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        state = to_hf_state_dict(config, params)
        if config.tie_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        Path(tmp, "config.json").write_text(json.dumps(to_hf_config(config)))
        spec = {"config": {k: getattr(config, k) for k in (
            "n_layers", "vocab_size", "d_model", "ffn_dim", "n_heads", "head_dim", "n_kv_heads",
            "rope_theta", "rms_eps", "tie_embeddings")}, "folder": tmp, "prompt": list(prompt),
            "batches": list(batches), "modes": list(modes), "new_tokens": new_tokens,
            "repeats": repeats}
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        Path(tmp, "runner.py").write_text(TUNIX_RUNNER)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([python, os.path.join(tmp, "runner.py"), os.path.join(tmp, "spec.json")],
                              capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0 or "TUNIX_RESULT" not in proc.stdout:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(proc.stdout.split("TUNIX_RESULT", 1)[1])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="smoke run on a tiny random model")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (8 with --small)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (median)")
    ap.add_argument("--modes", default="greedy,sample")
    ap.add_argument("--models", default="teacher,student", help="teacher and/or student")
    ap.add_argument("--bandwidth-gbs", type=float, default=15.6,
                    help="read bandwidth for the ceiling (DESIGN.md: 15.6 GB/s, one core)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--tunix-python", default=None,
                    help="python of a virtualenv with tunix (default /tmp/tunix_venv/bin/python "
                         "if present); 'none' skips tunix")
    ap.add_argument("--out", default=str(results_path("sampler")))
    ap.add_argument("--slots", default=None,
                    help="comma-separated decode-slot counts: run the continuous-batching "
                         "comparison (ragged, EOS on) instead of the table above")
    ap.add_argument("--ragged-prompts", type=int, default=8, help="with --slots: prompts")
    ap.add_argument("--samples", type=int, default=4, help="with --slots: samples per prompt")
    ap.add_argument("--chunk-steps", type=int, default=16, help="with --slots: Sampler chunk_steps")
    ap.add_argument("--refill-at", type=int, default=None, help="with --slots: Sampler refill_at")
    args = ap.parse_args(argv)
    if args.slots:
        models, _, tokenizer = load_models(args.small)
        wanted = {m.strip() for m in args.models.split(",")}
        models = [m for m, role in zip(models, ("teacher", "student")) if role in wanted]
        return main_slots(args, models, tokenizer)

    load = load_report()
    small = args.small
    batches = [int(b) for b in (args.batches or ("1,2" if small else "1,8,32")).split(",")]
    N = args.new_tokens or (8 if small else 128)
    repeats = args.repeats or (1 if small else 3)
    modes = [m for m in args.modes.split(",") if m]
    bw = args.bandwidth_gbs * 1e9
    tunix_python = args.tunix_python
    if tunix_python is None and Path("/tmp/tunix_venv/bin/python").exists():
        tunix_python = "/tmp/tunix_venv/bin/python"
    if tunix_python == "none":
        tunix_python = None

    have_torch = False
    if not args.no_hf:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            have_torch = True
        except ImportError:
            print("note: torch/transformers not installed; skipping the transformers columns")

    models, prompt, _ = load_models(small)
    wanted = {m.strip() for m in args.models.split(",")}
    models = [m for m, role in zip(models, ("teacher", "student")) if role in wanted]
    P = len(prompt)
    rows, notes = [], []
    for name, config, params in models:
        hf = build_hf(config, params) if have_torch else None
        tunix = None
        if tunix_python:
            print(f"[{name}] tunix ...", flush=True)
            tunix = bench_tunix(tunix_python, config, params, prompt, batches, modes, N, repeats)
            if "error" in tunix:
                notes.append(f"tunix failed on {name}: {tunix['error'][-400:]}")
                tunix = None
        for B in batches:
            cost = step_cost(config, params, B, P + N / 2)
            ceiling = B * bw / cost["bytes_per_step"]
            for mode in modes:
                print(f"[{name}] B={B} {mode} ...", flush=True)
                ours = bench_ours(config, params, prompt, B, mode, N, repeats)
                row = {"model": name, "batch": B, "mode": mode, "prompt_len": P, "new_tokens": N,
                       "ours_tok_s": round(ours["tok_s"], 1),
                       "ours_first_call_s": round(ours["first_call_s"], 1),
                       "ceiling_tok_s": round(ceiling, 1),
                       "ours_pct_ceiling": round(100 * ours["tok_s"] / ceiling, 1),
                       "MB_per_step": round(cost["bytes_per_step"] / 1e6, 1),
                       "GFLOP_per_step": round(cost["flops_per_step"] / 1e9, 3),
                       "ours_GBs": round(cost["bytes_per_step"] * ours["tok_s"] / B / 1e9, 2)}
                if hf is not None:
                    h = bench_hf(hf, prompt, B, mode, N, repeats)
                    row["hf_tok_s"] = round(h["tok_s"], 1)
                    row["x_vs_hf"] = round(ours["tok_s"] / h["tok_s"], 2)
                if tunix is not None and f"{B}/{mode}" in tunix:
                    t = tunix[f"{B}/{mode}"]
                    row["tunix_tok_s"] = round(t["tok_s"], 1)
                    row["x_vs_tunix"] = round(ours["tok_s"] / t["tok_s"], 2)
                rows.append(row)
                print(f"    ours {row['ours_tok_s']} tok/s  hf {row.get('hf_tok_s', '-')}  "
                      f"tunix {row.get('tunix_tok_s', '-')}  ceiling {row['ceiling_tok_s']}",
                      flush=True)

    print()
    print(f"new tokens/s, {N} new tokens per row (EOS off), prompt {P} tokens, float32; ceiling = "
          f"B x {args.bandwidth_gbs} GB/s / bytes per decode step")
    print_table(rows, [("model", "model"), ("batch", "B"), ("mode", "mode"),
                       ("ours_tok_s", "ours"), ("hf_tok_s", "transformers"),
                       ("x_vs_hf", "x HF"), ("tunix_tok_s", "tunix"), ("x_vs_tunix", "x tunix"),
                       ("ceiling_tok_s", "ceiling"), ("ours_pct_ceiling", "% ceil"),
                       ("ours_GBs", "GB/s"), ("MB_per_step", "MB/step"),
                       ("GFLOP_per_step", "GFLOP/step"), ("ours_first_call_s", "1st call s")])
    if not tunix_python:
        notes.append("tunix skipped: no tunix virtualenv (pip install tunix into /tmp/tunix_venv "
                     "and pass --tunix-python)")
    for n in notes:
        print("note:", n)
    if load["busy"]:
        print("WARNING: the machine was busy during this run; the tokens/s above are unreliable.")
    payload = {"benchmark": "sampler", "small": small, "machine": machine_info(), "load": load,
               "load_after": load_report(warn=False), "bandwidth_gbs": args.bandwidth_gbs,
               "rows": rows, "notes": notes}
    path = write_json(args.out if not small else str(Path(args.out).with_name("sampler_small.json")),
                      payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
