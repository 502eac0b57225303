"""``benchmarks/device.py``: its ``--smoke`` run goes end to end on the CPU and writes valid JSON;
without ``--smoke`` on the CPU it measures nothing and exits with its own code; its FLOP and byte
counts agree with the usual rules of thumb at the real shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device.py"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("device_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_valid_json(tmp_path):
    out = tmp_path / "device.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "precision:" in done.stdout and "train step" in done.stdout
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["skipped"] == []
    train = data["train"]
    assert "error" not in train, train
    assert train["tokens_per_s"] > 0 and train["update_ok"] and train["mfu"] is None  # CPU
    assert [r["batch"] for r in data["sampler"]] == [4, 8]
    assert all("error" not in r and r["new_tokens_per_s"] > 0 for r in data["sampler"])
    by_method = {r["method"]: r for r in data["losses"]}
    assert set(by_method) == {"chunked", "dense"}
    assert by_method["chunked"]["loss"] == pytest.approx(by_method["dense"]["loss"], rel=1e-4)


def test_cpu_without_smoke_exits_with_its_own_code(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no accelerator" in done.stdout and len(done.stdout.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_counts_at_real_shapes_and_device_table():
    dev = _module()
    p = dev.plan(smoke=False)
    s, t = p["student"], p["teacher"]
    assert round(s.n_params / 1e9, 2) == 1.72 and round(t.n_params / 1e9, 2) == 4.02
    tokens = p["rows"] * (p["prompt"] + p["completion"])
    # 6 N for the student and 2 N for the teacher per token, within the attention / unembedding
    # corrections (prompt tokens are not unembedded; causal attention over T / 2 is counted)
    rule = tokens * (6 * s.n_params + 2 * t.n_params)
    assert 0.9 < dev.train_flops(p) / rule < 1.1
    # a decode step reads the weights once (bf16 1.72B params: 3.4 GB) plus the KV cache (88 MB
    # for one row of 768 slots)
    assert dev.sampler_bytes_per_step(p, 1) == pytest.approx(2 * s.n_params, rel=0.05)
    assert dev.sampler_bytes_per_step(p, 256) > 5 * dev.sampler_bytes_per_step(p, 1)
    est = dev.estimates(p, {"bf16_peak_tflops": 989.0, "hbm_gb_s": 4800.0})
    assert est["train_s"] + sum(est["sampler_s"].values()) + est["losses_s"] < 420
    kinds = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v4": 275.0}
    for kind, peak in kinds.items():
        assert next(r for r in dev.DEVICES if r[0].lower() in kind.lower())[1] == peak, kind


def test_attention_check_compares_two_modes():
    dev = _module()
    check = dev.check_attention(jnp.float32, ("platform", "platform_xla"), (2, 16, 4, 2, 8))
    assert check["ok"] and set(check) >= {"causal", "left_padding", "segments"}
    if jax.default_backend() != "gpu":   # forced cuDNN off a GPU: refused, with the reason
        refused = dev.check_attention(jnp.float32, shape=(2, 16, 4, 2, 8))
        assert not refused["ok"] and "platform_cudnn" in refused["error"]


def test_decode_parts_smoke_run(tmp_path):
    """``benchmarks/device_decode.py --smoke``: every part is timed (cuDNN may be absent on the
    CPU) and each row reads against its bandwidth bound."""
    out = tmp_path / "decode.json"
    script = ROOT / "benchmarks" / "device_decode.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--repeats", "1", "--out",
                           str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["part"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"attn_einsum", "attn_mulsum", "layer", "unembed+draw", "step_unroll",
            "step_scan"} <= set(rows)
    for name, r in rows.items():
        if name != "attn_dpa_cudnn":
            assert "error" not in r, r
            assert r["ms"] > 0 and 0 < r["of_bound"] and r["bound_ms"] > 0
