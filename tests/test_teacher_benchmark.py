"""``benchmarks/teacher_service.py``: its ``--small`` run goes end to end on the CPU (tiny random
models, a real ``opd-jax serve-teacher`` subprocess, a real teacher cache) and writes JSON with
the three sections; its wire counts put top-k scores far below full-vocabulary logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "teacher_service.py"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_small_run_writes_the_three_sections(tmp_path):
    out = tmp_path / "teacher_service.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "wire k" in done.stdout and "scored tok/s" in done.stdout
    data = json.loads(out.read_text())
    assert data["small"] is True and data["load"]["cores"] >= 1 and data["machine"]["jax"]

    # wire: measured bytes per completion token; k=16 is hundreds of times under float32 logits
    wire = {r["k"]: r for r in data["wire"]}
    assert sorted(wire) == [16, 64, 256]
    for k, r in wire.items():
        assert r["q"] == k + 1 and r["full_f32_bytes_per_token"] == 4 * 49152
        # the arrays' 8K + 8Q + 9 bytes, plus the prompt columns and headers (under 10% more)
        assert r["array_bytes_per_token"] == 8 * k + 8 * (k + 1) + 9
        assert r["array_bytes_per_token"] < r["bytes_per_token"] < 1.1 * r["array_bytes_per_token"]
        assert r["x_smaller_than_f32"] == pytest.approx(4 * 49152 / r["bytes_per_token"])
    assert wire[16]["bytes_per_token"] < 300 and wire[16]["x_smaller_than_f32"] > 500
    assert wire[16]["bytes_per_token"] < wire[64]["bytes_per_token"] < wire[256]["bytes_per_token"]
    assert wire[256]["bytes_per_token"] < wire[256]["full_bf16_bytes_per_token"] / 10

    # iteration: on-policy OPD in-process / served, off-policy distill in-process / cached
    it = data["iteration"]
    assert all("error" not in r for r in it), it
    assert [(r["setting"], r["teacher"]) for r in it] == [
        ("on-policy OPD", "in-process"), ("on-policy OPD", "served (localhost)"),
        ("on-policy OPD", "served, slots=4 (overlap)"),
        ("off-policy distill", "in-process"), ("off-policy distill", "cached (disk)")]
    for r in it:
        assert r["steps"] == 3 and r["timed_steps"] == 2
        assert r["step_s"] > 0 and r["gen_s"] > 0 and r["train_s"] > 0
    assert it[0]["teacher_s"] is None and it[1]["teacher_s"] > 0 and it[4]["teacher_s"] > 0
    assert 0 <= it[2]["teacher_hidden"] <= 1 and it[1]["teacher_hidden"] == 0
    assert it[1]["loss_rel_diff_vs_in_process"] < 1e-3     # the same teacher, wherever it is
    assert it[4]["loss_rel_diff_vs_in_process"] < 1e-3
    cache = data["cache"]
    assert cache["tokens"] > 0 and cache["k"] == 16 and cache["bytes_per_token_on_disk"] > 0
    assert 140 < cache["record_bytes_per_token"] < 141        # 8k + 12, plus a header an example

    # server: 1, 2, 4 concurrent clients; every request answered; concurrent ones merged
    server = data["server"]
    assert all("error" not in r for r in server), server
    assert [r["clients"] for r in server] == [1, 2, 4]
    for r in server:
        assert r["requests"] == r["server_requests"] == 3 * r["clients"]
        assert r["scored_tokens"] == r["server_scored_tokens"] == r["requests"] * 8 * 32
        assert r["tokens_per_s"] > 0 and r["gflop_per_s"] > 0 and r["batches"] >= 1
        assert r["merged_batches"] <= r["batches"]
    assert server[0]["merged_batches"] == 0
    assert data["flops"]["flops_per_scored_token"] > data["flops"]["rule_2n_per_token"] > 0
