"""Benchmark: the matmul floor of one decode step -- how fast can *any* library here run it?

A decode step at batch ``B`` is, per layer, seven ``[B, D] x [D, *]`` projections (q, k, v, o,
gate, up, down) plus one unembedding ``[B, D] x [D, V]``. Those reads are the whole weight set, so
the step is memory-bound and its best time is ``bytes / bandwidth``. This script times exactly
those matmuls (random float32 weights with SmolLM2-135M's shapes; no attention, no sampling) in
XLA (``jax.jit``), numpy and torch (when installed), next to a plain streaming read of the same
bytes, and prints the step floor and the tokens/s it allows. A sampler can only beat its
competitors by a factor its floor leaves room for: divide a competitor's measured tokens/s into
``floor_tok_s``.

Reported per (library, B): ``layers_ms`` (the 7 x L projections, min of ``--repeats``), their
achieved GB/s, ``unembed_ms`` (XLA only: ``[B, D] x [V, D]^T``), ``floor_ms`` = layers + unembed
and ``floor_tok_s = B / floor``. Writes ``benchmarks/results/decode_floor.json``.

    python benchmarks/decode_floor.py             # SmolLM2-135M shapes, B = 1, 8, 32 (quiet machine)
    python benchmarks/decode_floor.py --small     # seconds-long smoke run on tiny shapes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_report, machine_info, print_table, write_results  # noqa: E402

SMOLLM2 = dict(d_model=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64, n_layers=30,
               vocab_size=49152)
SMALL = dict(d_model=64, ffn_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=2,
             vocab_size=512)


def layer_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """``[in, out]`` of the seven projections of one layer."""
    D, F, HE, GE = c["d_model"], c["ffn_dim"], c["n_heads"] * c["head_dim"], \
        c["n_kv_heads"] * c["head_dim"]
    return {"q": (D, HE), "k": (D, GE), "v": (D, GE), "o": (HE, D), "gate": (D, F), "up": (D, F),
            "down": (F, D)}


def layer_stack(weights: list[dict], x, matmul: Callable, concat: Callable, silu: Callable):
    """The projections of every layer in decode order; the residual keeps XLA from pruning."""
    for w in weights:
        q, k, v = matmul(x, w["q"]), matmul(x, w["k"]), matmul(x, w["v"])
        heads = q + concat([k, v] * (q.shape[1] // (2 * k.shape[1]) + 1))[:, :q.shape[1]]
        x = x + matmul(heads, w["o"])
        x = x + matmul(silu(matmul(x, w["gate"])) * matmul(x, w["up"]), w["down"])
    return x


def min_seconds(call: Callable[[], Any], repeats: int, sync: Callable = lambda r: r) -> float:
    sync(call())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(call())
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="smoke run on tiny shapes")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8,32)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (min); default 10")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    c = SMALL if args.small else SMOLLM2
    batches = [int(b) for b in (args.batches or ("1,2" if args.small else "1,8,32")).split(",")]
    repeats = args.repeats or (2 if args.small else 10)
    load = load_report()

    rng = np.random.default_rng(0)
    shapes = layer_shapes(c)
    host = [{n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}
            for _ in range(c["n_layers"])]
    layer_bytes = sum(w.nbytes for layer in host for w in layer.values())
    embed = jnp.asarray((rng.standard_normal((c["vocab_size"], c["d_model"])) * 0.02)
                        .astype(np.float32))
    dev = jax.tree.map(jnp.asarray, host)
    flat = jnp.asarray(rng.standard_normal(layer_bytes // 4).astype(np.float32))
    stream_s = min_seconds(lambda: jax.jit(jnp.sum)(flat), repeats, jax.block_until_ready)
    stream_gbs = layer_bytes / stream_s / 1e9

    xla_layers = jax.jit(lambda w, x: layer_stack(
        w, x, lambda a, b: a @ b, lambda xs: jnp.concatenate(xs, -1), jax.nn.silu))
    unembed = jax.jit(lambda e, x: jnp.einsum("bd,vd->bv", x, e))
    libs: list[tuple[str, Callable]] = [("xla", None), ("numpy", None)]
    try:
        import torch

        torch_w = [{n: torch.from_numpy(w) for n, w in layer.items()} for layer in host]
        libs.append(("torch", torch_w))
    except ImportError:
        torch = None

    rows = []
    for B in batches:
        x = rng.standard_normal((B, c["d_model"])).astype(np.float32)
        un_s = min_seconds(lambda: unembed(embed, x), repeats, jax.block_until_ready)
        for lib, extra in libs:
            if lib == "xla":
                xj = jnp.asarray(x)
                sec = min_seconds(lambda: xla_layers(dev, xj), repeats, jax.block_until_ready)
            elif lib == "numpy":
                silu = lambda a: a / (1.0 + np.exp(-np.clip(a, -60, 60)))
                with np.errstate(over="ignore", invalid="ignore"):  # random weights grow x
                    sec = min_seconds(lambda: layer_stack(host, x, np.matmul,
                                                          lambda xs: np.concatenate(xs, -1), silu),
                                      repeats)
            else:
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    sec = min_seconds(lambda: layer_stack(
                        extra, xt, torch.matmul, lambda xs: torch.cat(xs, -1),
                        torch.nn.functional.silu), repeats)
            floor = sec + un_s
            rows.append({"lib": lib, "batch": B, "layers_ms": round(sec * 1e3, 2),
                         "layers_GBs": round(layer_bytes / sec / 1e9, 2),
                         "unembed_ms": round(un_s * 1e3, 2), "floor_ms": round(floor * 1e3, 2),
                         "floor_tok_s": round(B / floor, 1),
                         "stream_floor_tok_s": round(
                             B / ((layer_bytes + embed.size * 4) / stream_gbs / 1e9), 1)})
    print(f"weights read per step: layers {layer_bytes / 1e6:.1f} MB + unembedding "
          f"{embed.size * 4 / 1e6:.1f} MB; streaming read {stream_gbs:.1f} GB/s")
    print_table(rows, [("lib", "lib"), ("batch", "B"), ("layers_ms", "layers ms"),
                       ("layers_GBs", "GB/s"), ("unembed_ms", "unembed ms"),
                       ("floor_ms", "floor ms"), ("floor_tok_s", "floor tok/s"),
                       ("stream_floor_tok_s", "stream-read tok/s")])
    if load["busy"]:
        print("WARNING: the machine was busy; timings are unreliable.")
    payload = {"benchmark": "decode_floor", "small": args.small, "machine": machine_info(),
               "load": load, "shapes": c, "layer_bytes": layer_bytes,
               "stream_read_GBs": round(stream_gbs, 2), "repeats": repeats, "rows": rows}
    write_results("decode_floor", payload, small=args.small, out=args.out)
    return payload


if __name__ == "__main__":
    main()
