"""Profile: where the demo train step's time goes, op by op, against the float32 matmul peak.

Runs the demo setting of ``benchmarks/train_step.py`` (SmolLM2-135M-Instruct teacher, 27-layer
student, 8 prompts, 32 new tokens, packed rows, reverse KL with the mechanism metrics), traces
``--steps`` train steps with ``jax.profiler`` and aggregates the trace's events by HLO
instruction of the compiled step (each instruction's opcode, and for a fusion the dots it
contains, come from the compiled module's text). Per instruction: seconds per step, share of
the step, GFLOP per step (dots: ``2 * prod(out) * prod(contracted)``) and GFLOP/s; per class
(matmul, copy / transpose, broadcast / fill, reduce, elementwise fusion, other): the totals.

    python benchmarks/profile_step.py --steps 3 --top 40      # quiet machine
    python benchmarks/profile_step.py --small                 # tiny random models (smoke)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    load_report,
    machine_info,
    matmul_peak_gflops,
    print_table,
    write_results,
)

_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")
_CONTROL = {"while", "call", "conditional", "parameter", "tuple", "get-tuple-element",
            "constant", "bitcast"}


def _split_shape(rest: str) -> tuple[str, str]:
    """``'<shape> <opcode>(...)...'`` -> (shape text, remainder from the opcode on)."""
    if rest.startswith("("):                      # tuple shape: skip to its closing parenthesis
        depth = 0
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _dims(shape_text: str) -> list[int]:
    m = _SHAPE.search(shape_text)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(shape: str, tail: str, shapes: dict[str, list[int]]) -> float:
    """``2 * prod(out) * prod(lhs contracted)`` of an HLO dot line (``shapes``: every
    instruction's dimensions, to look the operands up)."""
    lhs_name = re.match(r"\w+\(\s*%?([\w.\-]+)", tail)
    lhs = shapes.get(lhs_name.group(1), []) if lhs_name else []
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", tail)
    contracted = [lhs[int(d)] for d in m.group(1).split(",") if d] if m and lhs else []
    return 2.0 * float(np.prod(_dims(shape) or [1])) * float(np.prod(contracted or [1]))


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> ``{"opcode", "flops", "dot", "comp", "nested"}`` for every instruction
    of a compiled module's text; a fusion's ``flops`` / ``dot`` cover the dots inside the
    computation it calls, and ``nested`` marks the instructions of such a callee (the profiler
    also reports some of them as events; the fusion's own event already holds their time)."""
    lines, comp = [], None
    for line in text.splitlines():
        if (c := _COMP.match(line)) and "=" not in line.split("(")[0]:
            comp = c.group(1)
        elif m := _INSTR.match(line):
            name, rest = m.groups()
            lines.append((comp, name, *_split_shape(rest)))
    shapes = {name: _dims(shape) for _, name, shape, _ in lines}
    calls, own = {}, collections.defaultdict(float)
    info: dict[str, dict] = {}
    for comp, name, shape, tail in lines:
        opcode = tail.split("(", 1)[0].strip()
        flops = _dot_flops(shape, tail, shapes) if opcode in ("dot", "convolution") else 0.0
        own[comp] += flops
        info[name] = {"opcode": opcode, "flops": flops, "dot": flops > 0, "comp": comp}
        if opcode == "fusion" and (k := re.search(r"calls=%?([\w.\-]+)", tail)):
            calls[name] = k.group(1)
    for name, callee in calls.items():
        info[name]["flops"] = own.get(callee, 0.0)
        info[name]["dot"] = info[name]["flops"] > 0
    callees = set(calls.values())
    for meta in info.values():
        meta["nested"] = meta["comp"] in callees
    return info


def op_class(name: str, meta: dict) -> str:
    if meta["dot"]:
        return "matmul"
    op = meta["opcode"]
    if "copy" in name or "transpose" in name or op in ("copy", "transpose"):
        return "copy / transpose"
    if "broadcast" in name or op == "broadcast":
        return "broadcast / fill"
    if "reduce" in name or op.startswith("reduce"):
        return "reduce"
    if op == "fusion":
        return "elementwise fusion"
    return op


def aggregate(trace_events: list[dict], info: dict[str, dict], steps: int) -> list[dict]:
    """Complete events named like a top-level instruction of the step (not one inside a fusion:
    the fusion's event covers it), summed per instruction, per step."""
    total, count = collections.defaultdict(float), collections.defaultdict(int)
    for e in trace_events:
        meta = info.get(e.get("name"))
        if e.get("ph") == "X" and meta and meta["opcode"] not in _CONTROL and not meta["nested"]:
            total[e["name"]] += e.get("dur", 0.0) * 1e-6
            count[e["name"]] += 1
    rows = []
    for name, s in total.items():
        meta = info[name]
        per = s / steps
        rows.append({"op": name, "class": op_class(name, meta), "s_per_step": per,
                     "calls_per_step": count[name] / steps,
                     "gflop_per_step": meta["flops"] * count[name] / steps / 1e9,
                     "gflops": meta["flops"] * count[name] / s / 1e9 if meta["flops"] else None})
    return sorted(rows, key=lambda r: -r["s_per_step"])


def _trace_events(log_dir: str) -> list[dict]:
    files = sorted(Path(log_dir).rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no trace written under {log_dir} (jax.profiler)")
    with gzip.open(files[-1], "rt") as f:
        return json.load(f)["traceEvents"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--no-metrics", action="store_true")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype of both models (bfloat16: mixed precision, as "
                        "train_step.py --precision); percentages read against this machine's "
                        "measured matmul speed in that dtype")
    args = p.parse_args()
    from opd_jax.train.host_memory import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()   # the allocator the opd-jax command runs under
    import jax
    from train_step import build, demo_step_and_batch, prompts

    load = load_report()
    teacher, student = build(args.small)
    if args.precision != "float32":   # a teacher keeps no master weights
        import dataclasses

        import jax.numpy as jnp

        from opd_jax.model.dtypes import cast_floating

        teacher = dataclasses.replace(teacher, params=cast_floating(teacher.params,
                                                                     jnp.dtype(args.precision)))
    peak = matmul_peak_gflops(args.precision)
    ids, _ = prompts(teacher.tokenizer, 2 if args.small else 8)
    step, state, batch = demo_step_and_batch(teacher, student, ids, 8 if args.small else 32,
                                             no_metrics=args.no_metrics,
                                             precision=args.precision)
    hlo = step.lower(state, batch, None, teacher.params).compile().as_text()
    info = parse_hlo(hlo)
    for _ in range(2):   # compile, then one warm step
        state, m = step(state, batch, None, teacher.params)
        jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch, None, teacher.params)
            jax.block_until_ready(m)
        wall = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        rows = aggregate(_trace_events(log_dir), info, args.steps)
    traced = sum(r["s_per_step"] for r in rows)
    by_class = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        by_class[r["class"]][0] += r["s_per_step"]
        by_class[r["class"]][1] += r["gflop_per_step"]
    classes = [{"class": k, "s_per_step": round(s, 3), "share": f"{s / wall:.1%}",
                "gflop": round(g, 1), "pct_of_peak": f"{g / s / peak:.1%}"
                if g else ""} for k, (s, g) in sorted(by_class.items(), key=lambda kv: -kv[1][0])]
    print(f"step wall {wall:.3f} s, ops traced {traced:.3f} s/step; {args.precision} matmul "
          f"{peak:.0f} GFLOP/s here; load {load}")
    print_table(classes, [("class", "class"), ("s_per_step", "s / step"), ("share", "of step"),
                          ("gflop", "GFLOP"), ("pct_of_peak", "of peak")])
    top = [{**r, "s_per_step": round(r["s_per_step"], 4), "share": f"{r['s_per_step'] / wall:.1%}",
            "gflop_per_step": round(r["gflop_per_step"], 2),
            "pct_of_peak": f"{r['gflops'] / peak:.0%}" if r["gflops"] else ""}
           for r in rows[:args.top]]
    print_table(top, [("op", "instruction"), ("class", "class"), ("s_per_step", "s / step"),
                      ("share", "of step"), ("calls_per_step", "calls"),
                      ("gflop_per_step", "GFLOP"), ("pct_of_peak", "of peak")])
    write_results("profile_step", {"machine": machine_info(), "load": load, "step_wall_s": wall,
                                   "precision": args.precision, "matmul_peak_gflops": peak,
                                   "traced_s_per_step": traced, "classes": classes, "ops": rows},
                  small=args.small)


if __name__ == "__main__":
    main()
