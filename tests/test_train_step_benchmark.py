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
