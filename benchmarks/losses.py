"""Benchmark: dense vs chunked distillation losses (loss + gradient), memory and speed.

For a Qwen3-sized vocabulary (V = 151936), B*T tokens and model width D, every method computes
a token-mean reverse KL and its gradient w.r.t. the student hidden states and unembedding:

=====================  =====================================================================
dense                  materialised ``[B*T, V]`` student and teacher logits, dense reverse KL
dense_topk             materialised student logits, precomputed teacher top-k (tail bucket)
chunked                :func:`chunked_divergence` (remat per chunk), dense teacher
chunked_fused          :func:`chunked_divergence_loss` (gradient in the forward pass)
chunked_topk           :func:`chunked_divergence` with precomputed :class:`TeacherTopK`
                       (sparse head: the student's log-probs at the K ids only)
chunked_topk_fused     :func:`chunked_divergence_loss` with precomputed :class:`TeacherTopK`
teacher_topk_scoring   :func:`chunked_teacher_topk` (the teacher's scoring job; forward only)
=====================  =====================================================================

Reported per method: compiled memory from ``memory_analysis()`` (temporary buffers, and the
peak estimate temp + arguments + outputs), median wall time per call after warm-up, tokens/s,
microseconds per token, matmul FLOPs (nominal: ``2*N*D*V`` per forward matmul, x3 for the
student's forward + backward; executed: including rematerialisation) and achieved GFLOP/s
against the 315 GFLOP/s float32 matmul peak of the reference CPU.  Ratios are against
``dense``.  Writes ``benchmarks/results/losses.json``.

    python benchmarks/losses.py                      # B=1, T=4096, V=151936, D=1024
    python benchmarks/losses.py --small              # seconds-long smoke run
    python benchmarks/losses.py --memory-only        # compile only: memory, no timing

Run timings on a quiet machine: the script prints a warning when the load average is high
(``--max-load-per-core``) and records the load in the JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    F32_MATMUL_PEAK_GFLOPS,
    available_memory_bytes,
    compile_with_memory,
    fmt_bytes,
    load_report,
    machine_info,
    print_table,
    results_path,
    time_calls,
    write_json,
)

from opd_jax.losses.chunked_divergences import chunked_divergence, chunked_divergence_loss  # noqa: E402
from opd_jax.losses.chunked_scoring import TeacherTopK, chunked_teacher_topk  # noqa: E402
from opd_jax.losses.divergences import normalized_logprobs, reverse_kl  # noqa: E402
from opd_jax.losses.topk import gather_logprobs, support_divergence  # noqa: E402

METHODS = (
    "dense",
    "dense_topk",
    "chunked",
    "chunked_fused",
    "chunked_topk",
    "chunked_topk_fused",
    "teacher_topk_scoring",
)


# ------------------------------------------------------------------------------------------
# the losses being compared (all: token-mean reverse KL, gradient w.r.t. student hidden + W)
# ------------------------------------------------------------------------------------------


def _token_mean(per_token_BxT, where_BxT):
    return jnp.sum(per_token_BxT) / jnp.maximum(jnp.sum(where_BxT), 1)


def dense_loss(hs, ws, ht, wt, where):
    per = reverse_kl(hs @ ws, jax.lax.stop_gradient(ht @ wt), where=where)
    return _token_mean(per, where)


def dense_topk_loss(hs, ws, topk: TeacherTopK, where):
    s_logp = normalized_logprobs(hs @ ws, where=where)
    per = support_divergence(
        gather_logprobs(s_logp, topk.ids), topk.logprobs, jnp.ones(topk.ids.shape, bool),
        divergence="reverse_kl", tail="bucket",
    )
    return _token_mean(jnp.where(where, per, 0.0), where)


def chunked_loss(chunk_size):
    def loss(hs, ws, ht, wt, where):
        return _token_mean(chunked_divergence(hs, ws, ht, wt, where=where, chunk_size=chunk_size), where)

    return loss


def chunked_fused_loss(chunk_size):
    def loss(hs, ws, ht, wt, where):
        weights = where / jnp.maximum(jnp.sum(where), 1)
        return chunked_divergence_loss(
            hs, ws, ht, wt, weights=weights, where=where, chunk_size=chunk_size
        )[0]

    return loss


def chunked_topk_loss(chunk_size):
    def loss(hs, ws, topk, where):
        per = chunked_divergence(hs, ws, teacher_topk=topk, where=where, chunk_size=chunk_size)
        return _token_mean(per, where)

    return loss


def chunked_topk_fused_loss(chunk_size):
    def loss(hs, ws, topk, where):
        weights = where / jnp.maximum(jnp.sum(where), 1)
        return chunked_divergence_loss(
            hs, ws, teacher_topk=topk, weights=weights, where=where, chunk_size=chunk_size
        )[0]

    return loss


def loss_and_grad(loss: Callable) -> Callable:
    return jax.value_and_grad(loss, argnums=(0, 1))


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def make_inputs(b, t, d, dt, v, k_max, seed=0):
    """Student/teacher hidden states and unembeddings with realistic logit scales (std ~2)."""
    ks = jax.random.split(jax.random.key(seed), 4)

    @jax.jit
    def build(ks):
        hs = jax.random.normal(ks[0], (b, t, d), jnp.float32)
        ws = jax.random.normal(ks[1], (d, v), jnp.float32) * (2.0 / math.sqrt(d))
        ht = jax.random.normal(ks[2], (b, t, dt), jnp.float32)
        wt = jax.random.normal(ks[3], (dt, v), jnp.float32) * (2.5 / math.sqrt(dt))
        return hs, ws, ht, wt

    hs, ws, ht, wt = jax.block_until_ready(build(ks))
    where = jnp.ones((b, t), bool).at[:, : max(1, t // 16)].set(False)  # a masked prompt part
    return hs, ws, ht, wt, where


def _abstract(x):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)


def run(args) -> dict[str, Any]:
    b, t, v, d = args.batch, args.seq, args.vocab, args.dim
    dt = args.teacher_dim or d
    n = b * t
    load = load_report(args.max_load_per_core)
    if load["busy"] and args.require_quiet and not args.memory_only:
        print("--require-quiet: not timing on a busy machine; try again later or use --memory-only")
        raise SystemExit(3)
    mem_avail = available_memory_bytes()
    print(
        f"B={b} T={t} (N={n} tokens) V={v} D={d} D_teacher={dt}  chunk sizes {args.chunk_sizes}"
        f"  top-k {args.topk}  repeats {args.repeats}  "
        f"{'memory only' if args.memory_only else ''}"
    )

    sds = jax.ShapeDtypeStruct
    hs_a, ws_a = sds((b, t, d), jnp.float32), sds((d, v), jnp.float32)
    ht_a, wt_a = sds((b, t, dt), jnp.float32), sds((dt, v), jnp.float32)
    where_a = sds((b, t), jnp.bool_)

    def topk_abstract(k):
        return TeacherTopK(sds((b, t, k), jnp.int32), sds((b, t, k), jnp.float32),
                           sds((b, t), jnp.float32))

    # (name, method, chunk, k, fn, abstract args, nominal flops, executed flops)
    fwd = 2.0 * n * d * v  # one student [N, D] x [D, V] matmul
    fwd_t = 2.0 * n * dt * v
    specs = []

    def padded(c):
        return math.ceil(n / c) * c / n

    if "dense" in args.methods:
        specs.append(("dense", "dense", None, None, loss_and_grad(dense_loss),
                      (hs_a, ws_a, ht_a, wt_a, where_a), 3 * fwd + fwd_t, 3 * fwd + fwd_t))
    for k in args.topk[:1]:  # one dense top-k reference (it needs several [N, V] buffers)
        if "dense_topk" in args.methods:
            specs.append((f"dense_topk[K={k}]", "dense_topk", None, k, loss_and_grad(dense_topk_loss),
                          (hs_a, ws_a, topk_abstract(k), where_a), 3 * fwd, 3 * fwd))
    for c in args.chunk_sizes:
        p = padded(c)
        if "chunked" in args.methods:
            specs.append((f"chunked[C={c}]", "chunked", c, None, loss_and_grad(chunked_loss(c)),
                          (hs_a, ws_a, ht_a, wt_a, where_a), 3 * fwd + fwd_t, p * (4 * fwd + 2 * fwd_t)))
        if "chunked_fused" in args.methods:
            specs.append((f"chunked_fused[C={c}]", "chunked_fused", c, None,
                          loss_and_grad(chunked_fused_loss(c)), (hs_a, ws_a, ht_a, wt_a, where_a),
                          3 * fwd + fwd_t, p * (3 * fwd + fwd_t)))
        for k in args.topk:
            if "chunked_topk" in args.methods:
                specs.append((f"chunked_topk[C={c},K={k}]", "chunked_topk", c, k,
                              loss_and_grad(chunked_topk_loss(c)),
                              (hs_a, ws_a, topk_abstract(k), where_a), 3 * fwd, p * 4 * fwd))
            if "chunked_topk_fused" in args.methods:
                specs.append((f"chunked_topk_fused[C={c},K={k}]", "chunked_topk_fused", c, k,
                              loss_and_grad(chunked_topk_fused_loss(c)),
                              (hs_a, ws_a, topk_abstract(k), where_a), 3 * fwd, p * 3 * fwd))
    if "teacher_topk_scoring" in args.methods:
        c, k = args.chunk_sizes[-1], args.topk[-1]
        specs.append((f"teacher_topk_scoring[C={c},K={k}]", "teacher_topk_scoring", c, k,
                      lambda h, w, m, c=c, k=k: chunked_teacher_topk(h, w, k=k, chunk_size=c, where=m),
                      (ht_a, wt_a, where_a), fwd_t, padded(c) * fwd_t))

    inputs = None
    topk_inputs: dict[int, TeacherTopK] = {}
    rows = []
    for name, method, c, k, fn, abstract, flops_nominal, flops_exec in specs:
        compiled, mem = compile_with_memory(fn, *abstract)
        row: dict[str, Any] = {
            "name": name, "method": method, "chunk_size": c, "k": k, "memory": mem,
            "flops_nominal": flops_nominal, "flops_executed": flops_exec,
        }
        if not args.memory_only:
            if mem_avail is not None and mem["peak_estimate"] > 0.85 * mem_avail:
                row["skipped"] = (f"needs ~{fmt_bytes(mem['peak_estimate'])}, "
                                  f"{fmt_bytes(mem_avail)} available")
            else:
                if inputs is None:
                    inputs = make_inputs(b, t, d, dt, v, max(args.topk))
                hs, ws, ht, wt, where = inputs
                if k is not None and k not in topk_inputs:
                    score = jax.jit(lambda h, w, m, k=k: chunked_teacher_topk(
                        h, w, k=k, chunk_size=max(args.chunk_sizes), where=m))
                    topk_inputs[k] = jax.block_until_ready(score(ht, wt, where))
                if method in ("dense", "chunked", "chunked_fused"):
                    call_args = (hs, ws, ht, wt, where)
                elif method == "teacher_topk_scoring":
                    call_args = (ht, wt, where)
                else:
                    call_args = (hs, ws, topk_inputs[k], where)
                timing = time_calls(lambda: compiled(*call_args), warmup=args.warmup,
                                    repeats=args.repeats)
                sec = timing["median_s"]
                row.update(
                    timing=timing,
                    tokens_per_s=n / sec,
                    us_per_token=1e6 * sec / n,
                    gflops_nominal_per_s=flops_nominal / sec / 1e9,
                    gflops_executed_per_s=flops_exec / sec / 1e9,
                    mfu_executed=flops_exec / sec / 1e9 / F32_MATMUL_PEAK_GFLOPS,
                )
        rows.append(row)
        _print_progress(row)

    _add_ratios(rows)
    result = {
        "benchmark": "losses",
        "config": {"batch": b, "seq": t, "tokens": n, "vocab": v, "dim": d, "teacher_dim": dt,
                   "chunk_sizes": args.chunk_sizes, "topk": args.topk, "repeats": args.repeats,
                   "warmup": args.warmup, "memory_only": args.memory_only, "small": args.small},
        "machine": machine_info(),
        "load_before": load,
        "load_after": load_report(args.max_load_per_core, warn=False),
        "f32_matmul_peak_gflops": F32_MATMUL_PEAK_GFLOPS,
        "one_logit_buffer_bytes": n * v * 4,
        "results": rows,
        "target": _target_check(rows),
    }
    _print_summary(result)
    path = write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


def _print_progress(row):
    msg = f"  {row['name']:<34} temp {fmt_bytes(row['memory']['temp']):>10}"
    if "timing" in row:
        msg += f"  {row['timing']['median_s'] * 1e3:9.1f} ms/call  {row['tokens_per_s']:9.0f} tok/s"
    elif "skipped" in row:
        msg += f"  skipped: {row['skipped']}"
    print(msg, flush=True)


def _add_ratios(rows):
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for r in rows:
        if dense is None:
            break
        r["dense_temp_over_temp"] = dense["memory"]["temp"] / max(r["memory"]["temp"], 1)
        r["dense_peak_over_peak"] = dense["memory"]["peak_estimate"] / max(r["memory"]["peak_estimate"], 1)
        if "timing" in r and "timing" in dense:
            r["time_over_dense"] = r["timing"]["median_s"] / dense["timing"]["median_s"]


def _target_check(rows) -> dict[str, Any]:
    """The lead's target: chunked top-k uses >= 20x less temp memory than dense, no slower."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    cands = [r for r in rows if r["method"] in ("chunked_topk", "chunked_topk_fused")]
    if dense is None or not cands:
        return {"checked": False, "reason": "needs the dense and a chunked_topk method"}
    out = {"checked": True, "candidates": []}
    for r in cands:
        entry = {"name": r["name"], "memory_ratio": r["dense_temp_over_temp"],
                 "memory_ok": r["dense_temp_over_temp"] >= 20.0}
        if "time_over_dense" in r:
            entry["time_over_dense"] = r["time_over_dense"]
            entry["speed_ok"] = r["time_over_dense"] <= 1.0
        out["candidates"].append(entry)
    return out


def _print_summary(result):
    rows = result["results"]
    table = []
    for r in rows:
        mem = r["memory"]
        row = {
            "name": r["name"],
            "temp": fmt_bytes(mem["temp"]),
            "peak": fmt_bytes(mem["peak_estimate"]),
            "mem_x": f"{r['dense_temp_over_temp']:.1f}x" if "dense_temp_over_temp" in r else "-",
            "gflop": f"{r['flops_executed'] / 1e9:.0f}",
        }
        if "timing" in r:
            row.update(
                ms=f"{r['timing']['median_s'] * 1e3:.1f}",
                tok_s=f"{r['tokens_per_s']:.0f}",
                us_tok=f"{r['us_per_token']:.2f}",
                gflops=f"{r['gflops_executed_per_s']:.0f}",
                mfu=f"{100 * r['mfu_executed']:.0f}%",
                t_x=f"{r['time_over_dense']:.2f}" if "time_over_dense" in r else "-",
            )
        elif "skipped" in r:
            row["ms"] = "skipped"
        table.append(row)
    print()
    print_table(table, [
        ("name", "method"), ("temp", "temp mem"), ("peak", "peak est"),
        ("mem_x", "dense/this temp"), ("gflop", "GFLOP exec"), ("ms", "ms/call"),
        ("tok_s", "tok/s"), ("us_tok", "us/tok"), ("gflops", "GFLOP/s"),
        ("mfu", f"of {F32_MATMUL_PEAK_GFLOPS:.0f}"), ("t_x", "time/dense"),
    ])
    print(f"\none [B*T, V] float32 logit buffer = {fmt_bytes(result['one_logit_buffer_bytes'])}")
    target = result["target"]
    if target.get("checked"):
        print("target (chunked top-k: >= 20x less temp memory than dense, no slower per token):")
        for c in target["candidates"]:
            speed = ("n/a" if "speed_ok" not in c else
                     f"{c['time_over_dense']:.2f}x dense time -> {'OK' if c['speed_ok'] else 'SLOWER'}")
            print(f"  {c['name']:<34} memory {c['memory_ratio']:.1f}x -> "
                  f"{'OK' if c['memory_ok'] else 'NOT MET'};  {speed}")
    if result["load_before"]["busy"] or result["load_after"]["busy"]:
        print("WARNING: the machine was busy during the run; timings are not representative.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--teacher-dim", type=int, default=None, help="default: --dim")
    p.add_argument("--chunk-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024])
    p.add_argument("--topk", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-only", action="store_true", help="compile only; report memory")
    p.add_argument("--small", action="store_true",
                   help="smoke run: T=512, V=32768, D=128, chunks 64,128, K=16, 2 repeats")
    p.add_argument("--max-load-per-core", type=float, default=0.25,
                   help="warn when the 1-min load average exceeds cores * this")
    p.add_argument("--require-quiet", action="store_true",
                   help="exit (status 3) instead of timing when the machine is busy")
    p.add_argument("--out", type=str, default=None, help="JSON path (default results/losses.json)")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if args.small:
        args.batch, args.seq, args.vocab, args.dim = 1, 512, 32768, 128
        args.teacher_dim = None
        args.chunk_sizes, args.topk, args.repeats = [64, 128], [16], 2
    args.out = str(results_path("losses", small=args.small, out=args.out))
    return args


if __name__ == "__main__":
    run(parse_args())
