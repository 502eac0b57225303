"""Where a decode step's time goes on one accelerator: the sampler's parts timed alone.

``benchmarks/device.py`` measured the sampler at 5-6% of its bandwidth bound on an H200 (Qwen3-1.7B
shapes, bf16, B = 64 / 256, 1024 new tokens), with a time per row that barely depends on ``B`` --
the signature of a part whose cost grows with rows x cache slots, not with the weights. This script
times, at the same shapes (``B`` rows, a cache of ``S = P + N - 1`` slots, all valid):

* ``attn_*``: one layer's attention read over the cache, formulated as the sampler does it
  (:func:`opd_jax.model.cache_attention.attention_over_cache`, bf16 operands, f32 accumulation), upcast to
  f32 first, as a broadcast multiply-reduce, and as ``jax.nn.dot_product_attention`` over a
  ``[B, S, G, E]`` cache (XLA and, where it accepts the call, cuDNN);
* ``layer``: one :func:`opd_jax.model.decoder.layer` with the cache (T = 1), cache donated;
* ``unembed`` + ``draw``: the last norm, the vocabulary matmul and a temperature-1 draw;
* ``step_unroll`` / ``step_scan``: the sampler's whole decode step, from two sampler calls of
  ``N1`` and ``N2`` new tokens (difference / (N2 - N1)), both layer loops;

each against its own bandwidth bound (bytes it must read / HBM bandwidth), and prints which
kernels each attention variant's compiled program calls (cuBLAS / Triton / cuDNN / loop fusions).
Writes JSON (``--out``). Exit 3 without an accelerator unless ``--smoke`` (tiny shapes, CPU)::

    PYTHONUNBUFFERED=1 python benchmarks/device_decode.py --out /tmp/decode.json
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, results_path, time_calls, write_json  # noqa: E402
from device import EXIT_NO_ACCELERATOR, device_facts, plan, random_params  # noqa: E402

from opd_jax.model import cache_attention, layers  # noqa: E402
from opd_jax.model.decoder import layer, layer_weights, next_token_logits  # noqa: E402
from opd_jax.model.inputs import step_inputs  # noqa: E402
from opd_jax.sampling import Sampler, Sampling  # noqa: E402
from opd_jax.sampling.loop import LayerCaches  # noqa: E402
from opd_jax.sampling.strategies import draw, uniforms  # noqa: E402

KERNEL_PATTERNS = ("__cublas", "cublas", "triton", "cudnn", "__cudnn", "custom-call",
                   "kind=kLoop", "kind=kInput", "kind=kOutput", "kind=kCustom")


def kernels_of(compiled) -> dict:
    """Counts of the kernel kinds a compiled program's HLO names (a rough map of where dots go)."""
    text = compiled.as_text()
    return {p: len(re.findall(re.escape(p), text)) for p in KERNEL_PATTERNS if p in text}


def attn_variants(B: int, S: int, H: int, G: int, E: int, dtype) -> dict:
    """name -> (fn, args) for one layer's T = 1 attention read over an all-valid cache."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, 1, H, E), dtype)
    k = jax.random.normal(ks[1], (B, G, S, E), dtype)
    v = jax.random.normal(ks[2], (B, G, S, E), dtype)
    mask = jnp.ones((B, 1, S), bool)

    def einsum(q, k, v, m):
        return cache_attention.attention_over_cache(q, k, v, m)

    def upcast(q, k, v, m):
        f = jnp.float32
        return cache_attention.attention_over_cache(q.astype(f), k.astype(f), v.astype(f), m).astype(dtype)

    def mulsum(q, k, v, m):
        qg = q.reshape(B, G, H // G, E).astype(jnp.float32)                     # [B, G, R, E]
        s = jnp.sum(qg[:, :, :, None, :] * k[:, :, None, :, :], axis=-1) / math.sqrt(E)
        s = jnp.where(m[:, None, :, :], s, layers.MASK_VALUE)                   # [B, G, R, S]
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.sum(p[..., None] * v[:, :, None, :, :], axis=-2)                # [B, G, R, E]
        return o.reshape(B, 1, H, E).astype(dtype)

    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                   # [B, S, G, E]

    def dpa(impl):
        def f(q, k, v, m):
            return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], implementation=impl)
        return f

    return {"attn_einsum": (einsum, (q, k, v, mask)), "attn_upcast_f32": (upcast, (q, k, v, mask)),
            "attn_mulsum": (mulsum, (q, k, v, mask)),
            "attn_dpa_xla": (dpa("xla"), (q, kt, vt, mask)),
            "attn_dpa_cudnn": (dpa("cudnn"), (q, kt, vt, mask))}


def time_fn(name, fn, args, bound_bytes, bw, repeats, donate=()):
    row = {"part": name}
    try:
        jitted = jax.jit(fn, donate_argnums=donate)
        compiled = jitted.lower(*args).compile()
        row["kernels"] = kernels_of(compiled)
        if donate:   # a donated argument is consumed: feed the output back in
            state = {"args": list(args)}

            def call():
                out = compiled(*state["args"])
                state["args"][donate[0]] = out[1]
                return out
        else:
            call = lambda: compiled(*args)
        t = time_calls(call, warmup=1, repeats=repeats)
        row["ms"] = 1e3 * t["min_s"]
    except Exception as e:   # noqa: BLE001 - a variant the platform rejects is recorded
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    row["bound_ms"] = 1e3 * bound_bytes / (bw * 1e9)
    row["of_bound"] = row["bound_ms"] / row["ms"]
    return row


def sampler_step_ms(cfg, params, B, P, n1, n2, layer_loop) -> float:
    """Milliseconds per decode step from two samplers' calls (``n2 - n1`` more steps), min of 3
    calls each, both compiled first and timed interleaved; re-measured (up to 3 times) while the
    difference is not positive (tiny smoke shapes on a busy CPU: noise larger than the steps)."""
    tokens = jax.random.randint(jax.random.key(3), (B, P), 0, cfg.vocab_size)
    valid = jnp.ones((B, P), bool)
    samplers = {n: Sampler(cfg, Sampling(temperature=1.0), n, eos_ids=(), layer_loop=layer_loop)
                for n in (n1, n2)}
    for s in samplers.values():
        jax.block_until_ready(s(params, tokens, valid, jax.random.key(0)).tokens)
    ms = -math.inf
    for _ in range(3):
        best = {n: math.inf for n in samplers}
        for i in range(3):
            for n, s in samplers.items():
                t0 = time.perf_counter()
                jax.block_until_ready(s(params, tokens, valid, jax.random.key(i + 1)).tokens)
                best[n] = min(best[n], time.perf_counter() - t0)
        ms = 1e3 * (best[n2] - best[n1]) / (n2 - n1)
        if ms > 0:
            break
    return ms


def run(args) -> dict:
    dev = device_facts()
    p = plan(args.smoke)
    cfg = p["student"]
    dtype = p["sampler_dtype"]
    B, P, N = args.batch or p["sampler_batches"][0], p["sampler_prompt"], p["sampler_new"]
    S = P + N - 1
    H, G, E, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    bw = dev["hbm_gb_s"] or 100.0
    w = jnp.dtype(dtype).itemsize
    rows = []
    print(f"device {dev['kind']}; B={B} S={S} H={H} G={G} E={E} D={D} {jnp.dtype(dtype).name}")
    kv_layer = 2 * B * G * S * E * w
    for name, (fn, a) in attn_variants(B, S, H, G, E, dtype).items():
        rows.append(time_fn(name, fn, a, kv_layer, bw, args.repeats))
        print(rows[-1])

    params = random_params(cfg, 0, dtype)
    weights0 = jax.tree.map(lambda x: x[0], layer_weights(params, None))
    cache = LayerCaches(k=(jnp.zeros((B, G, S, E), dtype),), v=(jnp.zeros((B, G, S, E), dtype),),
                        valid=jnp.ones((B, S), bool), index=jnp.asarray(S // 2, jnp.int32),
                        next_pos=jnp.full((B,), S // 2, jnp.int32))
    x = jax.random.normal(jax.random.key(5), (B, 1, D), dtype)
    token = jnp.zeros((B,), jnp.int32)

    def one_layer(x, cache, weights):
        inputs = step_inputs(cfg, token[:, None], cache=cache)
        y, (k, v) = layer(cfg, inputs, x, weights, (cache.k[0], cache.v[0]))
        return y, cache.replace(k=(k,), v=(v,))

    layer_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(weights0)) + kv_layer
    rows.append(time_fn("layer", one_layer, (x, cache, weights0), layer_bytes, bw, args.repeats,
                        donate=(1,)))
    print(rows[-1])

    def head(h, key):
        logits = next_token_logits(params, cfg, h)
        keys = jax.random.split(key, B)
        return draw(logits, uniforms(keys), Sampling(temperature=1.0)).token

    h = jax.random.normal(jax.random.key(6), (B, D), dtype)
    rows.append(time_fn("unembed+draw", head, (h, jax.random.key(7)),
                        cfg.vocab_size * D * w, bw, args.repeats))
    print(rows[-1])

    n1, n2 = (4, 36) if args.smoke else (32, 160)
    for loop in ("unroll", "scan"):
        try:
            ms = sampler_step_ms(cfg, params, B, P, n1, n2, loop)
            step_bytes = cfg.n_params * w + B * (P + (n1 + n2) / 2) * 2 * cfg.n_layers * G * E * w
            bound = 1e3 * step_bytes / (bw * 1e9)
            rows.append({"part": f"step_{loop}", "ms": ms, "bound_ms": bound, "of_bound": bound / ms})
        except Exception as e:  # noqa: BLE001
            rows.append({"part": f"step_{loop}", "error": f"{type(e).__name__}: {e}"[:200]})
        print(rows[-1])
    return {"benchmark": "device_decode", "smoke": args.smoke, "device": dev, "batch": B,
            "slots": S, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if jax.default_backend() == "cpu" and not args.smoke:
        print("no accelerator: JAX sees only the CPU (use --smoke for the tiny CPU run)")
        return EXIT_NO_ACCELERATOR
    out = run(args)
    print_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()}
                 for r in out["rows"]],
                [("part", "part"), ("ms", "ms"), ("bound_ms", "bound ms"),
                 ("of_bound", "of bound"), ("error", "error")])
    print(write_json(results_path("device_decode", out=args.out), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
