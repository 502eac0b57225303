"""Benchmark on one accelerator: the OPD train step, the sampler and the chunked loss at real shapes.

Random models with real shapes: a Qwen3-1.7B-shaped student (28 layers, d 2048, 16 / 8 heads of
128, ffn 6144) and a Qwen3-4B-shaped teacher (36 layers, d 2560, 32 / 8 heads, ffn 9728), vocab
151936, tied embeddings, ``attention="platform"`` (cuDNN flash attention on a CUDA GPU, the
Pallas splash kernel on a TPU; each is first checked against XLA, values and gradients). The
student trains under the mixed-precision policy (float32 master weights and AdamW state, bfloat16
compute: ``StudentSpec(compute_dtype="bfloat16")``); the teacher, the sampler and the loss inputs
are bfloat16. Sections, each timed after a compile / warm-up call:

* ``train``: one jitted OPD step (student forward + backward, teacher forward, thunlp/OPD top-16
  reward loss in 1024-token chunks, AdamW + clipping): tokens/s and MFU = model FLOPs / s / the
  device's dense bf16 peak. Model FLOPs per step: ``3 x`` the student's forward and ``1 x`` the
  teacher's over every token (attention over the causal average context ``T / 2``) plus the
  unembeddings over the completion tokens only (rematerialisation not counted).
* ``sampler``: :class:`opd_jax.sampling.Sampler`, batch 64 and 256, 1024 new tokens after a
  256-token prompt, no EOS: new tokens/s against the memory-bandwidth bound (every step reads the
  weights once and the average filled KV cache, ``P + N / 2`` slots a row).
* ``losses``: reverse KL and its gradient over 4096 tokens, chunked
  (:func:`opd_jax.losses.chunked_divergence`) vs dense ``[n, V]`` float32 logits.

The FLOP / byte counts and a time estimate per section are printed first; a section whose
estimate no longer fits ``--budget-s`` is skipped (recorded). Peak memory: the device's
``memory_stats()`` (cumulative over the run) where it reports one. Prints tables and writes JSON
(``benchmarks/results/device.json``; ``--out``). Sized for < 8 minutes on one H100/H200::

    PYTHONUNBUFFERED=1 timeout 560 python benchmarks/device.py --budget-s 420
    python benchmarks/device.py --smoke      # the same code path at tiny shapes, CPU, seconds

Exit codes: 0 done (a section that failed or was skipped is recorded in the JSON, not fatal);
3 no accelerator (JAX sees only the CPU) and no ``--smoke``: one line says so, nothing measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    compile_with_memory,
    fmt_bytes,
    machine_info,
    print_table,
    results_path,
    time_calls,
    write_json,
)

from opd_jax import losses  # noqa: E402
from opd_jax.config.loss import LossSpec  # noqa: E402
from opd_jax.config.schema import OptimSpec  # noqa: E402
from opd_jax.model.config import ModelConfig, param_shapes  # noqa: E402
from opd_jax.model.platform_attention import (  # noqa: E402
    PLATFORM_MODES,
    attention_platform,
    choose_implementation,
    platform_mask,
)
from opd_jax.sampling import Sampler, Sampling  # noqa: E402
from opd_jax.train.batch import RolloutBatch  # noqa: E402
from opd_jax.train.objectives import make_chunk_fn  # noqa: E402
from opd_jax.train.state import StudentSpec, init_state, make_optimizer  # noqa: E402
from opd_jax.train.step import TeacherSpec, make_train_step  # noqa: E402

EXIT_NO_ACCELERATOR = 3
PRECISION_NOTE = ("student: float32 master weights + AdamW state, bfloat16 compute (mixed "
                  "precision); teacher, sampler and loss inputs: bfloat16 weights")
#: ``device_kind`` substring -> (dense bf16 TFLOP/s, HBM GB/s), vendor data sheets; first match
DEVICES = (("H200", 989.0, 4800.0), ("H100 PCIe", 756.0, 2000.0), ("H100", 989.0, 3350.0),
           ("A100-SXM4-40GB", 312.0, 1555.0), ("A100", 312.0, 2039.0),
           ("TPU v6 lite", 918.0, 1640.0), ("TPU v6e", 918.0, 1640.0),
           ("TPU v5 lite", 197.0, 819.0), ("TPU v5e", 197.0, 819.0), ("TPU v5p", 459.0, 2765.0),
           ("TPU v5", 459.0, 2765.0), ("TPU v4", 275.0, 1200.0))
ASSUMED = (100.0, 1000.0)   # estimates only, for a device not in the table
QWEN3 = dict(family="qwen3", vocab_size=151936, tie_embeddings=True, qk_norm=True,
             rope_theta=1e6, rms_eps=1e-6, max_position=40960, attention="platform")


def plan(smoke: bool) -> dict:
    """Shapes and sizes of every section (``smoke``: tiny shapes for a CPU run)."""
    if smoke:
        tiny = dict(QWEN3, vocab_size=512, max_position=256)
        return dict(student=ModelConfig(**tiny, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                        head_dim=16, ffn_dim=128),
                    teacher=ModelConfig(**tiny, d_model=96, n_layers=3, n_heads=4, n_kv_heads=2,
                                        head_dim=16, ffn_dim=192),
                    rows=2, prompt=8, completion=16, repeats=2, chunk=16, remat="none",
                    sampler_batches=(4, 8), sampler_prompt=8, sampler_new=8, loss_tokens=64,
                    sampler_dtype=jnp.bfloat16, precision=PRECISION_NOTE)
    return dict(student=ModelConfig(**QWEN3, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8,
                                    head_dim=128, ffn_dim=6144),
                teacher=ModelConfig(**QWEN3, d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8,
                                    head_dim=128, ffn_dim=9728),
                rows=16, prompt=256, completion=1024, repeats=5, chunk=1024, remat="dots_no_batch",
                sampler_batches=(64, 256), sampler_prompt=256, sampler_new=1024, loss_tokens=4096,
                sampler_dtype=jnp.bfloat16, precision=PRECISION_NOTE)


def device_facts() -> dict:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    match = next((row for row in DEVICES if row[0].lower() in kind.lower()), None)
    return {"platform": d.platform, "kind": kind, "count": jax.device_count(),
            "bf16_peak_tflops": match[1] if match else None,
            "hbm_gb_s": match[2] if match else None}


def train_flops(p: dict) -> float:
    """Model FLOPs of one train step (see the module docstring)."""
    s, t = p["student"], p["teacher"]
    T, n_real = p["prompt"] + p["completion"], p["rows"] * (p["prompt"] + p["completion"])
    body = lambda c: c.flops_per_token(context=T / 2) - 2.0 * c.d_model * c.vocab_size
    unembed = 3 * 2.0 * s.d_model * s.vocab_size + 2.0 * t.d_model * t.vocab_size
    return n_real * (3 * body(s) + body(t)) + p["rows"] * p["completion"] * unembed


def sampler_bytes_per_step(p: dict, batch: int) -> float:
    """Bytes one decode step must read: every weight once, the average filled KV cache."""
    s = p["student"]
    width = jnp.dtype(p["sampler_dtype"]).itemsize
    kv_per_token = 2 * s.n_layers * s.n_kv_heads * s.head_dim * width     # k and v
    return s.n_params * width + batch * (p["sampler_prompt"] + p["sampler_new"] / 2) * kv_per_token


def loss_flops(p: dict) -> float:
    s, t, n = p["student"], p["teacher"], p["loss_tokens"]
    return n * (3 * 2.0 * s.d_model * s.vocab_size + 2.0 * t.d_model * t.vocab_size)


def estimates(p: dict, dev: dict) -> dict:
    """Seconds per section at 40% of the bf16 peak / 50% of the bandwidth, plus compile guesses."""
    peak, bw = (dev["bf16_peak_tflops"] or ASSUMED[0]), (dev["hbm_gb_s"] or ASSUMED[1])
    step_s = train_flops(p) / (0.4 * peak * 1e12)
    sample_s = {b: 2 * p["sampler_new"] * sampler_bytes_per_step(p, b) / (0.5 * bw * 1e9)
                for b in p["sampler_batches"]}
    return {"train_step_s": step_s, "train_s": 90 + (p["repeats"] + 1) * step_s,
            "sampler_s": {b: 45 + v for b, v in sample_s.items()},
            "losses_s": 40 + 8 * 2 * loss_flops(p) / (0.4 * peak * 1e12)}


def random_params(config: ModelConfig, seed: int, dtype=jnp.bfloat16) -> dict:
    """Random weights leaf by leaf (normal std 0.02, norms 1) on the device: one draw per leaf, as
    ``decoder.init_params``' single flat draw would exceed 2**31 elements for the teacher."""
    draw = jax.jit(lambda key, shape: 0.02 * jax.random.normal(key, shape, dtype),
                   static_argnums=1)
    paths, treedef = jax.tree_util.tree_flatten_with_path(
        param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    leaves = [jnp.ones(shape, dtype) if "norm" in jax.tree_util.keystr(path)
              else draw(jax.random.fold_in(jax.random.key(seed), i), shape)
              for i, (path, shape) in enumerate(paths)]
    return jax.tree.unflatten(treedef, leaves)


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def attention_used(config: ModelConfig, dtype, length: int, masked: bool = True) -> str:
    impl, why = choose_implementation(PLATFORM_MODES[config.attention], dtype=dtype,
                                      length=length, head_dim=config.head_dim, masked=masked)
    return impl if why in ("requested", "platform default on a CUDA GPU",
                           "platform default on a TPU") else f"{impl} ({why})"


def check_attention(dtype, modes=("platform_cudnn", "platform_xla"), shape=(2, 256, 16, 8, 128)
                    ) -> dict:
    """``modes[0]`` vs ``modes[1]`` platform attention on this device (values and q/k/v gradients
    of a loss over the queries that attend to something; causal, left padding, packed segments;
    GQA): max |a - b| / max |b| of each gradient per case, or the error that stops ``modes[0]`` (on a GPU the
    sections below then run ``platform_xla``)."""
    B, T, H, G, E = shape
    ks = jax.random.split(jax.random.key(5), 4)
    q, w = (jax.random.normal(k, (B, T, H, E), dtype) for k in ks[:2])
    k, v = (jax.random.normal(k, (B, T, G, E), dtype) for k in ks[2:])
    pos = jnp.arange(T)
    valid = pos[None, :] >= jnp.array([0, T // 7] + [0] * (B - 2))[:, None]
    seg = jnp.where(pos < T // 3, 1, jnp.where(pos < 7 * T // 8, 2, 0))[None].repeat(B, 0)
    cases = {"causal": (None, None), "left_padding": (valid, None), "segments": (seg > 0, seg)}
    out = {}
    for name, (kv_valid, segments) in cases.items():
        live = jnp.ones((B, T), bool) if kv_valid is None else kv_valid
        w_live = jnp.where(live[:, :, None, None], w, 0).astype(jnp.float32)

        def grads(mode):
            mask = platform_mask(mode, kv_valid, segments)
            loss = lambda q, k, v: jnp.sum(attention_platform(q, k, v, mask) * w_live)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
        try:
            a, b = grads(modes[0]), grads(modes[1])
        except Exception as e:  # noqa: BLE001 - recorded; the benchmark then runs XLA
            return {"ok": False, "case": name, **_error("attention", e)}
        f32 = lambda x: x.astype(jnp.float32)
        rel = [float(jnp.max(jnp.abs(f32(x) - f32(y))) / jnp.max(jnp.abs(f32(y))))
               for x, y in zip(a[1], b[1])]
        out[name] = {"rel_diff_dq_dk_dv": rel, "loss": [float(a[0]), float(b[0])]}
    return {"ok": True, "modes": list(modes), **out}


def bench_train(p: dict, dev: dict) -> dict:
    s_cfg, t_cfg = p["student"], p["teacher"]
    B, P, N = p["rows"], p["prompt"], p["completion"]
    student, teacher = random_params(s_cfg, 0, jnp.float32), random_params(t_cfg, 1)
    tokens = jax.random.randint(jax.random.key(2), (B, P + N), 0, s_cfg.vocab_size)
    valid = jnp.ones((B, P + N), bool)
    batch = RolloutBatch(student_tokens=tokens, student_valid=valid, teacher_tokens=tokens,
                         teacher_valid=valid, completion=tokens[:, P:], mask=valid[:, P:],
                         sampler_logprobs=jnp.full((B, N), -1.0, jnp.float32))
    opt = make_optimizer(OptimSpec(lr=1e-6, weight_decay=0.01, grad_clip_norm=1.0), 100)
    step = make_train_step(student=StudentSpec(s_cfg, remat=p["remat"], compute_dtype="bfloat16"),
                           teacher=TeacherSpec("separate", t_cfg), optimizer=opt,
                           chunk_fn=make_chunk_fn(LossSpec(objective="topk_reward", top_k=16)),
                           reduction=losses.token_mean, chunk_size=p["chunk"])
    state = init_state(student, opt, 0)
    del student
    t0 = time.perf_counter()
    state, m = step(state, batch, None, teacher)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        state, m = step(state, batch, None, teacher)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s, flops = float(np.median(times)), train_flops(p)
    peak = dev["bf16_peak_tflops"]
    return {"section": "train", "rows": B, "tokens_per_row": P + N, "remat": p["remat"],
            "attention_student": attention_used(s_cfg, jnp.bfloat16, P + N),
            "attention_teacher": attention_used(t_cfg, jnp.bfloat16, P + N),
            "step_s": step_s, "first_call_s": first, "repeats": p["repeats"],
            "tokens_per_s": B * (P + N) / step_s, "model_tflop_per_step": flops / 1e12,
            "tflop_per_s": flops / step_s / 1e12,
            "mfu": None if peak is None else flops / step_s / (peak * 1e12),
            "loss": float(m["scalars"]["loss"]), "update_ok": bool(m["scalars"]["update_ok"]),
            "peak_bytes": peak_memory()}


def bench_sampler(p: dict, dev: dict, batch: int, params: dict) -> dict:
    cfg, P, N = p["student"], p["sampler_prompt"], p["sampler_new"]
    sampler = Sampler(cfg, Sampling(temperature=1.0), N, eos_ids=())
    tokens = jax.random.randint(jax.random.key(3), (batch, P), 0, cfg.vocab_size)
    valid = jnp.ones((batch, P), bool)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, tokens, valid, jax.random.key(0)).tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = sampler(params, tokens, valid, jax.random.key(1))
    jax.block_until_ready(out.tokens)
    total = time.perf_counter() - t0
    new = int(np.asarray(out.mask).sum())
    bw = dev["hbm_gb_s"]
    per_step = sampler_bytes_per_step(p, batch)
    bound = None if bw is None else batch / (per_step / (bw * 1e9))
    return {"section": "sampler", "batch": batch, "prompt": P, "new_tokens": N,
            "s": total, "first_call_s": first, "new_tokens_per_s": new / total,
            "bytes_per_step": per_step, "bound_tokens_per_s": bound,
            "fraction_of_bound": None if bound is None else new / total / bound,
            "peak_bytes": peak_memory()}


def bench_losses(p: dict, dev: dict) -> list[dict]:
    s, t, n = p["student"], p["teacher"], p["loss_tokens"]
    ks = jax.random.split(jax.random.key(4), 4)
    dt = jnp.bfloat16
    hs = jax.random.normal(ks[0], (1, n, s.d_model), dt)
    ws = 0.02 * jax.random.normal(ks[1], (s.d_model, s.vocab_size), dt)
    ht = jax.random.normal(ks[2], (1, n, t.d_model), dt)
    wt = 0.02 * jax.random.normal(ks[3], (t.d_model, t.vocab_size), dt)
    where = jnp.ones((1, n), bool)
    args = (hs, ws, ht, wt, where)   # arguments, not closed-over constants of the executable
    logits = lambda h, w: jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)

    def dense(hs, ws, ht, wt, where):
        per = losses.reverse_kl(logits(hs, ws), jax.lax.stop_gradient(logits(ht, wt)), where=where)
        return losses.token_mean(per, where)

    def chunked(hs, ws, ht, wt, where):
        per = losses.chunked_divergence(hs, ws, ht, wt, where=where, chunk_size=p["chunk"])
        return losses.token_mean(per, where)

    rows, flops, peak = [], loss_flops(p), dev["bf16_peak_tflops"]
    for name, fn in (("chunked", chunked), ("dense", dense)):
        try:
            compiled, mem = compile_with_memory(jax.value_and_grad(fn, argnums=(0, 1)), *args)
            timing = time_calls(lambda: compiled(*args), warmup=1, repeats=3)
            value = float(compiled(*args)[0])
        except Exception as e:  # noqa: BLE001 - dense may not fit: record it, keep the rest
            rows.append({"section": "losses", "method": name, "error": f"{type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}"})
            continue
        sec = timing["median_s"]
        rows.append({"section": "losses", "method": name, "tokens": n, "s": sec,
                     "tokens_per_s": n / sec, "tflop_per_s": flops / sec / 1e12,
                     "mfu": None if peak is None else flops / sec / (peak * 1e12),
                     "loss": value, "compiled_peak_bytes": mem["peak_estimate"],
                     "temp_bytes": mem["temp"]})
    return rows


def _error(section: str, e: Exception) -> dict:
    return {"section": section, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def run(args) -> dict:
    p, dev = plan(args.smoke), device_facts()
    est = estimates(p, dev)
    s, t = p["student"], p["teacher"]
    print(f"device: {dev['kind']} x{dev['count']} ({dev['platform']}); bf16 peak "
          f"{dev['bf16_peak_tflops'] or 'unknown'} TFLOP/s, HBM {dev['hbm_gb_s'] or 'unknown'} GB/s")
    print(f"precision: {p['precision']}")
    print(f"student {s.n_params / 1e9:.2f}B params (L{s.n_layers} d{s.d_model}), teacher "
          f"{t.n_params / 1e9:.2f}B (L{t.n_layers} d{t.d_model}), vocab {s.vocab_size}")
    print(f"plan: train {p['rows']} x {p['prompt'] + p['completion']} tokens, "
          f"{train_flops(p) / 1e12:.1f} model TFLOP/step, ~{est['train_step_s']:.2f} s/step at 40% "
          f"MFU, {p['repeats']} timed steps, ~{est['train_s']:.0f} s with compile; sampler "
          + ", ".join(f"B={b}: {sampler_bytes_per_step(p, b) / 1e9:.1f} GB/step, ~{v:.0f} s"
                      for b, v in est["sampler_s"].items())
          + f"; losses {loss_flops(p) / 1e12:.2f} TFLOP/call, ~{est['losses_s']:.0f} s; "
          f"budget {args.budget_s:.0f} s")
    out = {"benchmark": "device", "smoke": args.smoke, "precision": p["precision"],
           "device": dev, "machine": machine_info(), "estimates": est,
           "plan": {k: (dataclasses.asdict(v) if isinstance(v, ModelConfig) else v)
                    for k, v in p.items() if k != "sampler_dtype"}
           | {"sampler_dtype": jnp.dtype(p["sampler_dtype"]).name},
           "train": None, "sampler": [], "losses": [], "skipped": []}
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)
    save = lambda: write_json(args.out, out)
    if dev["platform"] in ("gpu", "tpu"):   # the platform's kernel vs XLA before timing it
        kernel = "platform_cudnn" if dev["platform"] == "gpu" else "platform_splash"
        out["attention_check"] = check = check_attention(jnp.bfloat16, (kernel, "platform_xla"))
        print(f"{kernel} vs XLA attention: {check}")
        if not check["ok"]:
            p.update({k: p[k].replace(attention="platform_xla") for k in ("student", "teacher")})

    if "train" in args.sections:
        for remat in (p["remat"], "full"):   # out of memory: once more, keeping layer inputs only
            if est["train_s"] > left():
                out["skipped"].append(f"train remat={remat} (time budget)")
                break
            try:
                out["train"] = bench_train({**p, "remat": remat}, dev)
                break
            except Exception as e:  # noqa: BLE001 - an OOM must not hide the other sections
                out["train"] = {**_error("train", e), "remat": remat}
                if remat == "full" or "RESOURCE_EXHAUSTED" not in str(e):
                    break
        save()
    if "sampler" in args.sections:
        params = random_params(s, 0, p["sampler_dtype"])   # the compute weights it samples with
        for b in p["sampler_batches"]:
            if est["sampler_s"][b] > left():
                out["skipped"].append(f"sampler B={b} (time budget)")
                continue
            try:
                out["sampler"].append(bench_sampler(p, dev, b, params))
            except Exception as e:  # noqa: BLE001
                out["sampler"].append({**_error("sampler", e), "batch": b})
            save()
        del params
    if "losses" in args.sections:
        if est["losses_s"] <= left():
            out["losses"] = bench_losses(p, dev)
        else:
            out["skipped"].append("losses (time budget)")
    out["elapsed_s"] = time.perf_counter() - start
    save()
    return out


def report(out: dict) -> None:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    num = lambda x, f="{:.0f}": "-" if x is None else f.format(x)
    tr = out["train"]
    if tr and "error" not in tr:
        print_table([{**tr, "step_s": f"{tr['step_s']:.3f}", "tok": num(tr["tokens_per_s"]),
                      "tf": num(tr["tflop_per_s"], "{:.1f}"), "mfu": pct(tr["mfu"]),
                      "peak": fmt_bytes(tr["peak_bytes"])}],
                    [("section", "train step"), ("step_s", "s/step"), ("tok", "tokens/s"),
                     ("tf", "TFLOP/s"), ("mfu", "MFU"), ("peak", "peak mem"),
                     ("attention_student", "attention")])
    rows = [{**r, "tok": num(r.get("new_tokens_per_s")), "bound": num(r.get("bound_tokens_per_s")),
             "frac": pct(r.get("fraction_of_bound")), "peak": fmt_bytes(r.get("peak_bytes"))}
            for r in out["sampler"]]
    if rows:
        print_table(rows, [("batch", "sampler batch"), ("tok", "new tok/s"),
                           ("bound", "bandwidth bound"), ("frac", "of bound"), ("peak", "peak mem"),
                           ("error", "error")])
    rows = [{**r, "s": num(r.get("s"), "{:.4f}"), "tf": num(r.get("tflop_per_s"), "{:.1f}"),
             "mem": fmt_bytes(r.get("compiled_peak_bytes")), "loss": num(r.get("loss"), "{:.5f}")}
            for r in out["losses"]]
    if rows:
        print_table(rows, [("method", "loss"), ("s", "s (fwd+grad)"), ("tf", "TFLOP/s"),
                           ("mem", "compiled peak"), ("loss", "value"), ("error", "error")])
    for item in ([tr] if tr and "error" in tr else []):
        print(f"train step failed: {item['error']}")
    for item in out["skipped"]:
        print(f"skipped: {item}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip a section whose estimate no longer fits (seconds, whole run)")
    ap.add_argument("--sections", default="train,sampler,losses")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = ap.parse_args(argv)
    args.sections = tuple(args.sections.split(","))
    args.out = results_path("device_smoke" if args.smoke else "device", out=args.out)
    if jax.default_backend() == "cpu" and not args.smoke:
        print("device.py: no accelerator (JAX sees only the CPU); nothing measured "
              "(--smoke runs tiny shapes on the CPU)")
        return EXIT_NO_ACCELERATOR
    out = run(args)
    report(out)
    print(f"wrote {args.out} in {out['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
