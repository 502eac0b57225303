"""Benchmark: the sampler's decode with and without its CPU layouts, A/B in one process.

On a noisy host two processes timed minutes apart differ by more than a layout change is worth,
so this script compiles the decode once per form in one process and calls the forms in turn
(``--repeats`` rounds), reporting min and median seconds a call per form and their ratio. Forms:

- ``stored``: keys as stored (``[B, G, S, E]``) and the layer weights as stored;
- ``slots_last``: keys re-laid as float32 ``[B, G, E, S]`` once per call
  (``sampling.loop.slots_last_decode``, ``model.cache_attention.SlotsLast``);
- ``out_major`` / ``both``: the projections on out-major copies (``loop.out_major_decode``),
  alone and with slots-last keys (``--forms`` picks; default ``stored,slots_last``).

Each form is a ``Sampler`` whose ``DecodeSettings`` differ only by an unused rule (a separate
compiled program); the flags are read while tracing. It also reports the fraction of greedy
tokens equal to the first form's (bfloat16 near-ties may flip a few). Writes
``benchmarks/results/decode_layouts.json``.

    python benchmarks/decode_layouts.py --batch 32 --new-tokens 256 --dtype bfloat16 --model student
    python benchmarks/decode_layouts.py --small      # seconds-long smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_report, machine_info, print_table, write_results  # noqa: E402
from sampler import load_models  # noqa: E402

from opd_jax.model.dtypes import cast_floating  # noqa: E402
from opd_jax.sampling import loop  # noqa: E402
from opd_jax.sampling.sampler import Sampler  # noqa: E402
from opd_jax.sampling.strategies import Greedy  # noqa: E402

#: form -> (slots-last keys, out-major weights)
FORMS = {"stored": (False, False), "slots_last": (True, False), "out_major": (False, True),
         "both": (True, True)}


def compiled_form(config, params, tokens, valid, new_tokens: int, form: str):
    """A sampler call compiled for ``form`` (its own program), and its greedy tokens."""
    slots_last, out_major = FORMS[form]
    sampler = Sampler(config, Greedy(), new_tokens, eos_ids=())
    st = sampler._static
    sampler._static = dataclasses.replace(st, rules=st.rules + ((f"ab_{form}", None),))
    plain = loop.slots_last_decode, loop.out_major_decode
    loop.slots_last_decode = lambda st: slots_last and plain[0](st)
    loop.out_major_decode = lambda st, p: out_major and jax.default_backend() == "cpu"
    try:
        out = np.asarray(sampler(params, tokens, valid, jax.random.key(0)).tokens)
    finally:
        loop.slots_last_decode, loop.out_major_decode = plain
    return (lambda: jax.block_until_ready(sampler(params, tokens, valid, jax.random.key(0)).tokens)), out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("teacher", "student"), default="student")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--forms", default="stored,slots_last")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    forms = args.forms.split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        ap.error(f"unknown form(s) {unknown}; choose from {sorted(FORMS)}")
    load = load_report()
    models, prompt, _ = load_models(args.small)
    name, config, params = models[0 if args.model == "teacher" else 1]
    if args.dtype == "bfloat16":
        params = cast_floating(params, jnp.bfloat16)
    B, N = (4, 16) if args.small else (args.batch, args.new_tokens)
    tokens = np.tile(np.asarray(prompt, np.int32), (B, 1))
    valid = np.ones_like(tokens, bool)
    calls, outs = {}, {}
    for form in forms:
        calls[form], outs[form] = compiled_form(config, params, tokens, valid, N, form)
        calls[form]()
    times: dict[str, list[float]] = {f: [] for f in forms}
    for _ in range(args.repeats):
        for form in forms:
            t0 = time.perf_counter()
            calls[form]()
            times[form].append(time.perf_counter() - t0)
    base = float(np.median(times[forms[0]]))
    rows = [{"form": f, "min_s": round(min(times[f]), 3),
             "median_s": round(float(np.median(times[f])), 3),
             "tok_s": round(B * N / float(np.median(times[f])), 1),
             "speedup": round(base / float(np.median(times[f])), 3),
             "same_tokens": round(float(np.mean(outs[f] == outs[forms[0]])), 4)} for f in forms]
    print(f"{name}, {args.dtype}, B = {B}, {N} new tokens, prompt {len(prompt)} tokens")
    print_table(rows, [("form", "form"), ("min_s", "min s"), ("median_s", "median s"),
                       ("tok_s", "tok/s"), ("speedup", f"x {forms[0]}"),
                       ("same_tokens", "same tokens")])
    if load["busy"]:
        print("WARNING: the machine was busy; timings are unreliable.")
    payload = {"benchmark": "decode_layouts", "small": args.small, "machine": machine_info(),
               "load": load, "model": name, "dtype": args.dtype, "batch": B, "new_tokens": N,
               "repeats": args.repeats, "rows": rows}
    write_results("decode_layouts", payload, small=args.small, out=args.out)
    return payload


if __name__ == "__main__":
    main()
