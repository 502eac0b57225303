"""Benchmark: dense vs blocked (flash-style) attention: compiled memory, agreement, time.

For one attention call of Qwen3-1.7B's shape (16 query heads, 8 KV heads, head dim 128) over
``T`` causal tokens, reports the compiled temporary bytes (``memory_analysis()``) of the forward
pass and of forward + gradient w.r.t. q, k, v, for ``layers.attention`` (dense ``[B, H, T, T]``
float32 scores) and ``layers.attention_blocked`` (block ``--block``). Compile only at ``--T``
(default 8192: the 1024 + 7168 rows of configs/qwen3_1p7b_opd.yaml); at ``--check-T`` both run
and the script prints the largest output and gradient differences (float32, left-padded rows) and
the median wall time of each.

    python benchmarks/attention.py                 # T = 8192 memory, T = 1024 check
    python benchmarks/attention.py --small         # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from opd_jax.model import layers  # noqa: E402


def _inputs(B, T, H, G, E, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, E), dtype)
    k = jax.random.normal(ks[1], (B, T, G, E), dtype)
    v = jax.random.normal(ks[2], (B, T, G, E), dtype)
    w = jax.random.normal(ks[3], (B, T, H, E), jnp.float32)
    return q, k, v, w


def _fns(T, valid, block):
    slot = jnp.arange(T)
    mask = (slot[None, None, :] <= slot[None, :, None]) & valid[:, None, :]
    live = jnp.any(mask, -1)[:, :, None, None]
    dense = lambda q, k, v: layers.attention(q, k, v, mask)
    blocked = lambda q, k, v: layers.attention_blocked(q, k, v, slot, valid, block_q=block,
                                                       block_k=block)

    def with_grad(fn):
        def loss(q, k, v, w):
            return jnp.sum(jnp.where(live, fn(q, k, v).astype(jnp.float32) * w, 0.0))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    return {"dense": dense, "blocked": blocked}, {"dense": with_grad(dense),
                                                   "blocked": with_grad(blocked)}


def memory(B, T, H, G, E, block, dtype):
    q, k, v, w = jax.eval_shape(lambda: _inputs(B, T, H, G, E, dtype))
    valid = jax.ShapeDtypeStruct((B, T), bool)
    out = {}
    for name in ("dense", "blocked"):
        fwd = lambda q, k, v, valid: _fns(T, valid, block)[0][name](q, k, v)
        bwd = lambda q, k, v, w, valid: _fns(T, valid, block)[1][name](q, k, v, w)
        f = jax.jit(fwd).lower(q, k, v, valid).compile().memory_analysis()
        g = jax.jit(bwd).lower(q, k, v, w, valid).compile().memory_analysis()
        out[name] = {"forward_temp": f.temp_size_in_bytes, "grad_temp": g.temp_size_in_bytes}
    return out


def check(B, T, H, G, E, block, repeats):
    q, k, v, w = _inputs(B, T, H, G, E, jnp.float32)
    valid = jnp.asarray(np.arange(T)[None, :] >= np.array([0, T // 3][:B])[:, None])
    fwd, grad = _fns(T, valid, block)
    res, times = {}, {}
    for name in ("dense", "blocked"):
        f = jax.jit(grad[name])
        jax.block_until_ready(f(q, k, v, w))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res[name] = jax.block_until_ready(f(q, k, v, w))
            ts.append(time.perf_counter() - t0)
        times[name] = float(np.median(ts))
        res[name + "_out"] = jax.jit(fwd[name])(q, k, v)
    live = np.asarray(valid)  # left padding: a real query always has itself
    out_diff = float(np.max(np.abs(np.asarray(res["dense_out"])[live]
                                   - np.asarray(res["blocked_out"])[live])))
    gd, gb = res["dense"][1], res["blocked"][1]
    grad_rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(gd, gb))
    return {"max_abs_out_diff": out_diff, "max_rel_grad_diff": grad_rel,
            "loss_dense": float(res["dense"][0]), "loss_blocked": float(res["blocked"][0]),
            "value_and_grad_s": times, "load_avg": os.getloadavg()[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--check-T", type=int, default=1024)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    if a.small:
        a.T, a.check_T, a.block, a.heads, a.kv_heads, a.head_dim = 512, 128, 64, 4, 2, 32
    H, G, E = a.heads, a.kv_heads, a.head_dim
    result = {"shape": {"B": 1, "T": a.T, "H": H, "G": G, "E": E, "block": a.block}}
    for dtype in ("float32", "bfloat16"):
        result[f"memory_{dtype}"] = memory(1, a.T, H, G, E, a.block, jnp.dtype(dtype))
    result["check"] = {"T": a.check_T, "B": 2, **check(2, a.check_T, H, G, E, min(a.block,
                                                                                 a.check_T),
                                                       a.repeats)}
    print(json.dumps(result, indent=2))
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/attention.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
