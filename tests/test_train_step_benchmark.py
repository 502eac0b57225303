"""``benchmarks/train_step.py``: its ``--small --phases`` run goes end to end on the CPU (tiny
random models on SmolLM2's tokenizer, packed update) and reports real and computed tokens of the
packed rows (a packed batch carries no padded rows: the counts come from the packed ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
RESULT = ROOT / "benchmarks" / "results" / "train_step_small.json"


def test_small_run_with_phases_counts_the_packed_tokens():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPD_JAX_MALLOC": "0"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--no-trl", "--phases",
                           "--repeats", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    row = json.loads(RESULT.read_text())["rows"][0]
    assert row["impl"] == "opd_jax"
    # every trained token is a real one; packing computes at most a little padding on top
    assert 0 < row["real_tokens"] <= row["computed_tokens"] < 2 * row["real_tokens"]
    assert row["padding_ratio"] == row["computed_tokens"] / row["real_tokens"]
    assert row["trained_tokens"] > 0 and row["update_gflop_per_s"] > 0   # FLOP/s on real tokens
    assert all(row[f"phase_{k}_s"] >= 0 for k in ("prefill", "decode", "teacher_forward"))
    assert row["compiled_step_shapes"] >= 1


def test_profile_counts_each_dot_from_its_shapes():
    """``benchmarks/profile_step.parse_hlo`` reads a compiled module's text: a dot's FLOPs are
    ``2 * M * N * K`` (also with batch dimensions), a fusion inherits the dots of the computation
    it calls, and every instruction has an opcode; the ``--small`` profile runs end to end and
    its traced ops add up to about the step (events are leaves, nothing counted twice)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_step import aggregate, op_class, parse_hlo

    f = jax.jit(lambda a, b, c: (jnp.tanh(a @ b) + 1.0, jnp.einsum("bmk,bkn->bmn", c, c)))
    a, b, c = jnp.ones((48, 40)), jnp.ones((40, 24)), jnp.ones((3, 16, 16))
    info = parse_hlo(f.lower(a, b, c).compile().as_text())
    dots = sorted(m["flops"] for m in info.values() if m["dot"] and m["opcode"] != "fusion")
    fused = [m["flops"] for m in info.values() if m["opcode"] == "fusion" and m["dot"]]
    assert sorted(set(dots + fused)) == sorted({2.0 * 48 * 24 * 40, 2.0 * 3 * 16 * 16 * 16})
    assert all(m["opcode"] for m in info.values())
    assert {op_class(n, m) for n, m in info.items() if m["dot"]} == {"matmul"}
    # a dot inside a fusion's computation is nested: its own events are not counted again
    nested = [n for n, m in info.items() if m["nested"] and m["dot"]]
    outer = [n for n, m in info.items() if m["opcode"] == "fusion" and m["dot"]]
    assert nested and outer
    events = [{"ph": "X", "name": n, "dur": 1000.0} for n in nested + outer]
    rows = aggregate(events, info, steps=1)
    assert {r["op"] for r in rows} == set(outer)
    assert sum(r["s_per_step"] for r in rows) == 1e-3 * len(outer)

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPD_JAX_MALLOC": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"),
                           "--small", "--steps", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = json.loads((ROOT / "benchmarks" / "results" / "profile_step_small.json").read_text())
    assert out["classes"] and any(c["class"] == "matmul" for c in out["classes"])
    assert 0 < out["traced_s_per_step"] < 2 * out["step_wall_s"]
