"""Benchmark: the sampler's decode phases (``Sampler(cache_windows=)``) side by side.

A decode step attends over its KV cache; with one phase every step reads all ``S = P + N - 1``
slots, most of them still empty early on. With ``k`` phases the cache grows chunk by chunk and a
step reads the slots its phase can have filled (``opd_jax.sampling.loop.decode_windows``). Each
variant is compiled once in this process, then the calls alternate (``--repeats`` rounds, same
prompts, same key, EOS off so every call runs all ``N`` steps). Reported per variant: the first
call (compile + run), the min / median of the timed calls, the cache slots a step reads on
average (``mean_slots``, the attention's bytes read scale with it) and whether its tokens equal
the one-phase variant's (sampled at T = 1: a rounding difference can flip a draw from the flat
tail of the distribution, after which the row differs; the log-probs before it agree to ≈1e-5).
Writes ``benchmarks/results/decode_windows.json``.

    python benchmarks/decode_windows.py --new-tokens 512 --windows 1,8   # student, B = 32
    python benchmarks/decode_windows.py --small                          # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_report, machine_info, print_table, write_results  # noqa: E402

from opd_jax.sampling.loop import decode_windows  # noqa: E402
from opd_jax.sampling.sampler import Sampler, bucket_length  # noqa: E402
from opd_jax.sampling.strategies import Sampling  # noqa: E402


def mean_slots(prompt_bucket: int, new_tokens: int, windows: int) -> float:
    """Cache slots a decode step reads, averaged over the ``N - 1`` steps."""
    steps, last = [], 0
    for last_step, window in decode_windows(prompt_bucket, new_tokens, windows):
        steps += [window] * (last_step - last)
        last = last_step
    return float(np.mean(steps)) if steps else 0.0


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny random model, seconds")
    ap.add_argument("--batch", type=int, default=None, help="rows (default 32; small 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="N (default 256; small 160)")
    ap.add_argument("--prompt-len", type=int, default=120, help="prompt tokens (bucket 128)")
    ap.add_argument("--windows", default="1,4", help="comma-separated cache_windows values")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; small 2)")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="the student's weights as given or cast (the train loop's mixed precision)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    B = args.batch or (4 if args.small else 32)
    N = args.new_tokens or (160 if args.small else 256)
    repeats = args.repeats or (2 if args.small else 3)
    variants = [int(w) for w in args.windows.split(",")]
    load = load_report()

    from sampler import load_models  # benchmarks/sampler.py: SmolLM2 and the 27-layer student

    models, prompt, _ = load_models(args.small)
    name, config, params = models[1]
    if args.precision != "float32":
        import jax.numpy as jnp

        from opd_jax.model.dtypes import cast_floating

        params = cast_floating(params, jnp.dtype(args.precision))
    P = min(args.prompt_len, config.max_position - N)
    tokens = np.tile(np.asarray((list(prompt) * (P // len(prompt) + 1))[:P], np.int32), (B, 1))
    valid = np.ones_like(tokens, bool)
    calls, drawn, rows = {}, {}, []
    for w in variants:
        sampler = Sampler(config, Sampling(temperature=1.0), N, eos_ids=(), cache_windows=w)
        calls[w] = lambda s=sampler: s(params, tokens, valid, jax.random.key(0))
        t0 = time.perf_counter()
        out = calls[w]()
        jax.block_until_ready(out.tokens)
        rows.append({"model": name, "batch": B, "new_tokens": N, "cache_windows": w,
                     "phases": len(decode_windows(bucket_length(P), N, w)),
                     "mean_slots": round(mean_slots(bucket_length(P), N, w), 1),
                     "first_call_s": round(time.perf_counter() - t0, 2)})
        drawn[w] = np.asarray(out.tokens)
    times: dict[int, list[float]] = {w: [] for w in variants}
    for _ in range(repeats):
        for w in variants:
            t0 = time.perf_counter()
            jax.block_until_ready(calls[w]().tokens)
            times[w].append(time.perf_counter() - t0)
    for row, w in zip(rows, variants):
        row.update(min_s=round(min(times[w]), 3), median_s=round(statistics.median(times[w]), 3),
                   each_s=[round(t, 3) for t in times[w]],
                   same_tokens_as_first=bool(np.array_equal(drawn[w], drawn[variants[0]])))
    for row in rows:
        row["x_first"] = round(rows[0]["min_s"] / row["min_s"], 3)
    print_table(rows, [("cache_windows", "windows"), ("phases", "phases"),
                       ("mean_slots", "mean slots"), ("first_call_s", "first call s"),
                       ("min_s", "min s"), ("median_s", "median s"), ("x_first", "x first"),
                       ("same_tokens_as_first", "same tokens")])
    if load["busy"]:
        print("WARNING: the machine was busy; timings are unreliable.")
    payload = {"benchmark": "decode_windows", "small": args.small, "machine": machine_info(),
               "load": load, "prompt_len": P, "precision": args.precision, "repeats": repeats, "rows": rows}
    write_results("decode_windows", payload, small=args.small, out=args.out)
    return payload


if __name__ == "__main__":
    main()
