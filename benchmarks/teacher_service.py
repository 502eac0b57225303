"""Benchmark: the teacher anywhere -- in-process, served over HTTP (localhost) and cached on disk.

Three sections, in one run (``configs/demo.yaml``'s setting: teacher the embedded SmolLM2-135M
"default", student = it minus layers 10, 15, 20; ``--small``: ``configs/tiny_test.yaml``'s tiny
random models):

* ``wire``: bytes on the wire per scored completion token for ``k`` = 16 / 64 / 256 (``Q = k + 1``
  query ids per position: the student's top-k plus the sampled token), measured as the real
  ``wire.encode`` request + response of a batch of 8 rows x (64 prompt + 32 completion) tokens,
  divided by its 256 completion tokens (prompt columns and JSON headers included), against
  full-vocabulary logits (``V = 49152``: float32 and bfloat16, response only). Pure counts.
* ``iteration``: one training step with the teacher in each place, side by side, from the
  runs' ``metrics.jsonl`` (median over the steps after step 1, which compiles; 7 timed steps,
  as the packed update's row shapes may change once more early on; ``--small``: 2, unpacked,
  ``optim.pack=false``, so that only step 1 compiles): ``gen_s`` (the
  batch: rollouts, or reading the dataset, plus the served / cached teacher's scores:
  ``teacher_s``) and ``train_s`` (the jitted update; with the teacher in-process its forward is
  in there).

  - **on-policy OPD** (``loss.objective=topk_reward loss.top_k=16``, 8 prompts, 32 new tokens):
    teacher in-process vs served by an ``opd-jax serve-teacher`` subprocess on localhost;
  - **off-policy distill** (a ``distill: true`` dataset cold start: ``forward_kl``, top-16,
    ``support=teacher``, ``tail=bucket``, 8 examples a step, from a JSONL of the task's prompts
    with ~30-token "The answer is N." completions): teacher in-process vs a teacher cache built
    with ``build_cache`` (a cache cannot score fresh rollouts, so it has no OPD row). The cache's
    build time and bytes per completion token on disk (ArrayRecord shard files: compressed,
    rounded up to 64 KiB blocks, so a small cache's figure is mostly padding) and in its records
    (``8k + 12`` bytes a token plus a header an example) are reported too.

  The served and cached runs' losses are compared with the in-process ones (they must agree).
* ``server``: the served teacher's scored completion tokens per second with 1, 2 and 4
  concurrent client threads (``TeacherClient``), each sending requests of 8 rows x (64 + 32)
  tokens, ``k=16``, ``Q=17`` (the same subprocess; its 8/16/32-row batch shapes are compiled by
  warm-up requests first), with the server's ``/health`` ``batches`` / ``merged_batches`` deltas;
  model FLOPs (teacher forward over the real prompt + completion tokens, unembedding over the
  completion only, attention over the causal average context) against the 315 GFLOP/s float32
  matmul peak (``_common``).

    python benchmarks/teacher_service.py            # quiet machine, ~10 minutes on 2 cores
    python benchmarks/teacher_service.py --small    # tiny random models, about a minute

Writes ``benchmarks/results/teacher_service.json`` (``teacher_service_small.json`` with
``--small``; ``--out``). Exit 1 when a section failed (recorded in the JSON as ``error``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    F32_MATMUL_PEAK_GFLOPS,
    fmt_bytes,
    load_report,
    machine_info,
    print_table,
    results_path,
    write_json,
)

#: request shape of the wire and server sections: rows x (prompt + completion) tokens
ROWS, PROMPT, COMPLETION = 8, 64, 32
WIRE_KS = (16, 64, 256)
WIRE_VOCAB = 49152          # SmolLM2's vocabulary, the demo's
CLIENTS = (1, 2, 4)
TOP_K = 16
#: ``overrides``: the small plan updates one padded row per sequence (``optim.pack=false``): the
#: packed update's row shapes change between the first steps (a compile each), which the tiny
#: models' three steps cannot amortise; the full plan keeps the demo's packing and times 7 steps
PLANS = {
    False: dict(config="configs/demo.yaml", opd_steps=8, distill_steps=8, requests=6,
                overrides=[]),
    True: dict(config="configs/tiny_test.yaml", opd_steps=3, distill_steps=3, requests=3,
               overrides=["optim.pack=false"]),
}
COMMON = ["checkpoint.every_n_steps=0", "checkpoint.async_save=false", "log.every=1",
          f"sampler.max_new_tokens={COMPLETION}"]
OPD = ["loss.objective=topk_reward", f"loss.top_k={TOP_K}"]
DISTILL = ["loss.objective=forward_kl", f"loss.top_k={TOP_K}", "loss.support=teacher",
           "loss.tail=bucket"]


# -- counts -----------------------------------------------------------------------------------

def wire_rows(vocab: int = WIRE_VOCAB, rows: int = ROWS, prompt: int = PROMPT,
              completion: int = COMPLETION) -> list[dict]:
    """Measured ``wire.encode`` bytes per completion token of one scoring request + response, per
    ``k`` in :data:`WIRE_KS` (``Q = k + 1``), vs full-vocabulary logits."""
    from opd_jax.teacher import wire

    rng = np.random.default_rng(0)
    B, N, T = rows, completion, prompt + completion
    fp = "sha256:" + "0" * 64          # a fingerprint's length (the meta carries two)
    out = []
    for k in WIRE_KS:
        q = k + 1
        request = wire.encode(
            {"n": N, "k": k, "temperature": 1.0, "vocab_size": vocab, "tokenizer": fp},
            {"tokens": rng.integers(0, vocab, (B, T), dtype=np.int32),
             "valid": np.ones((B, T), bool),
             "query_ids": rng.integers(0, vocab, (B, N, q), dtype=np.int32)})
        response = wire.encode(
            {"teacher": fp},
            {"topk_ids": rng.integers(0, vocab, (B, N, k), dtype=np.int32),
             "topk_logprobs": -rng.random((B, N, k), dtype=np.float32),
             "logsumexp": rng.random((B, N), dtype=np.float32),
             "query_logprobs": -rng.random((B, N, q), dtype=np.float32)})
        per_token = (len(request) + len(response)) / (B * N)
        out.append({"k": k, "q": q, "request_bytes": len(request), "response_bytes": len(response),
                    "bytes_per_token": per_token,
                    "array_bytes_per_token": wire.bytes_per_scored_token(k, q),
                    "full_f32_bytes_per_token": 4 * vocab, "full_bf16_bytes_per_token": 2 * vocab,
                    "x_smaller_than_f32": 4 * vocab / per_token,
                    "x_smaller_than_bf16": 2 * vocab / per_token})
    return out


def teacher_flops(config, prompt: int = PROMPT, completion: int = COMPLETION) -> dict:
    """Model FLOPs of scoring one ``[prompt | completion]`` row (the forward over every real
    token with attention over the causal average context, the unembedding over the completion
    only), per scored completion token."""
    T = prompt + completion
    unembed = 2.0 * config.d_model * config.vocab_size
    body = config.flops_per_token(context=T / 2) - unembed
    per_row = T * body + completion * unembed
    return {"params": int(config.n_params), "flops_per_row": per_row,
            "flops_per_scored_token": per_row / completion,
            "rule_2n_per_token": 2.0 * config.n_params}


# -- helpers ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``opd-jax serve-teacher CONFIG --port P`` in a subprocess (output to a log file); it
    loads its teacher while this process goes on until :meth:`wait`."""

    def __init__(self, config: str, log_path: Path, wait_s: float = 300.0):
        self.port, self.log_path, self.wait_s = _free_port(), log_path, wait_s
        env = {k: v for k, v in os.environ.items() if k != "OPD_JAX_TEACHER_TOKEN"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opd_jax.cli", "serve-teacher", config, "--port",
             str(self.port)], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.t0, self.started_s = time.perf_counter(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self) -> float:
        """Seconds from the launch until ``/health`` answered (``RuntimeError`` with the server's
        output when it did not within ``wait_s``)."""
        while self.started_s is None and time.perf_counter() - self.t0 < self.wait_s:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        self.started_s = time.perf_counter() - self.t0
            except OSError:
                time.sleep(0.3)
        if self.started_s is not None:
            return self.started_s
        self.stop()
        raise RuntimeError(f"teacher server did not come up: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def _run(config: str, overrides: list[str]) -> list[dict]:
    """``run(load_config(config, overrides))``; the step records of its ``metrics.jsonl``."""
    from opd_jax.config import load_config
    from opd_jax.train.run import run

    cfg = load_config(config, overrides)
    run(cfg, progress=False)
    lines = (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "gen_s" in r and "train_s" in r]


def _steps(rows: list[dict], setting: str, teacher: str) -> dict:
    """Medians over the steps after the first (which compiles)."""
    timed = rows[1:] or rows
    med = lambda key: (statistics.median(r[key] for r in timed)
                       if all(key in r for r in timed) else None)
    return {"setting": setting, "teacher": teacher, "steps": len(rows), "timed_steps": len(timed),
            "step_s": statistics.median(r["gen_s"] + r["train_s"] for r in timed),
            "gen_s": med("gen_s"), "train_s": med("train_s"), "teacher_s": med("teacher_s"),
            "teacher_wait_s": med("teacher_wait_s"), "teacher_hidden": med("teacher_hidden"),
            "first_step_s": rows[0]["gen_s"] + rows[0]["train_s"],
            "gen_tokens": med("gen_tokens"), "losses": [r["loss"] for r in rows],
            "all_step_s": [r["gen_s"] + r["train_s"] for r in rows]}


def _same_losses(a: dict, b: dict, steps: int | None = None) -> float:
    """Largest relative difference of two runs' per-step losses (the first ``steps`` only).

    On-policy runs compare step 1 only: both start from the same weights and rollout keys, so
    step 1 sees the same rollouts, but the two teachers' float32 rounding (in-process logits vs
    logits rebuilt from scores) moves the weights by ~1e-7 and from step 2 on a T = 1 sample can
    flip, after which the runs see different rollouts. Off-policy runs read the same data at every
    step and compare every step."""
    pairs = list(zip(a["losses"], b["losses"]))[:steps]
    return max(abs(x - y) / max(abs(x), 1e-6) for x, y in pairs)


def _error(section: str, e: BaseException) -> dict:
    print(f"{section} failed: {type(e).__name__}: {e}")
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


# -- sections ---------------------------------------------------------------------------------

def distill_dataset(cfg, tokenizer, path: Path, n: int) -> dict:
    """``n`` cold-start examples: the config's task prompts (student template, the tokenizer's
    chat template) with short "The answer is N." completions; returns token counts."""
    from opd_jax.data.cold_start_file import ColdStartExample, write_cold_start
    from opd_jax.data.templates import render_prompt
    from opd_jax.train.run import load_data, make_template

    records, _ = load_data(cfg)
    template = make_template(cfg)
    records = [records[i % len(records)] for i in range(n)]
    examples = []
    for i, rec in enumerate(records):
        prompt = render_prompt(tokenizer, template.student(rec), template.chat_template_kwargs)
        answer = rec.get("answer")
        completion = (f"Let me work this out step by step and check the result once more. "
                      f"The answer is {answer}.\nAnswer: {answer}")
        examples.append(ColdStartExample(prompt=prompt, completion=completion, stop="<|im_end|>",
                                         id=str(i)))
    write_cold_start(path, examples)
    p = [len(tokenizer.encode(e.prompt)) for e in examples]
    c = [len(tokenizer.encode(e.completion)) for e in examples]
    return {"examples": n, "prompt_tokens_mean": float(np.mean(p)),
            "completion_tokens_mean": float(np.mean(c))}


def cache_stats(summary: dict, out: Path) -> dict:
    """Sizes of a built cache (``summary``: :func:`build_cache`'s): its shard files' bytes per
    completion token, and the records' own (``8k + 12`` a token plus a header an example)."""
    from opd_jax.teacher.cache import _HEADER

    files = [f for f in out.iterdir() if f.is_file()]
    shard_bytes = sum(f.stat().st_size for f in files if f.name.startswith("scores-"))
    tokens, k = summary["tokens"], summary["k"]
    records = summary["examples"] * _HEADER.size + tokens * (8 * k + 12)
    return {"build_s": summary["seconds"], "tokens": tokens, "k": k, "shards": summary["shards"],
            "shard_bytes": shard_bytes, "total_bytes": sum(f.stat().st_size for f in files),
            "record_bytes": records, "bytes_per_token_on_disk": shard_bytes / tokens,
            "record_bytes_per_token": records / tokens,
            "build_tokens_per_s": tokens / summary["seconds"]}


def bench_iteration(plan: dict, server: ServerProcess, tmp: Path, tokenizer) -> tuple[list, dict]:
    config, rows, cache = str(ROOT / plan["config"]), [], {}
    server.wait()
    opd = COMMON + plan["overrides"] + OPD + [f"stages=[{{kind: opd, steps: {plan['opd_steps']}, "
                          f"batch_prompts: {ROWS}}}]"]
    print(f"iteration: on-policy OPD, teacher in-process ({plan['opd_steps']} steps)", flush=True)
    inproc = _steps(_run(config, [f"out_dir={tmp}/opd_inproc", *opd]), "on-policy OPD",
                    "in-process")
    print("iteration: on-policy OPD, teacher served on localhost", flush=True)
    served = _steps(_run(config, [f"out_dir={tmp}/opd_served", *opd,
                                  f"teacher.source={server.url}"]), "on-policy OPD",
                    "served (localhost)")
    served["loss_rel_diff_vs_in_process"] = _same_losses(inproc, served, steps=1)
    # overlap: rows go to the teacher as they finish while the rest decode (needs slots)
    slots = [f"sampler.slots={ROWS // 2}"]
    print(f"iteration: on-policy OPD, served teacher, sampler.slots={ROWS // 2} (overlap)",
          flush=True)
    overlap = _steps(_run(config, [f"out_dir={tmp}/opd_overlap", *opd, *slots,
                                   f"teacher.source={server.url}"]), "on-policy OPD",
                     f"served, slots={ROWS // 2} (overlap)")
    rows += [inproc, served, overlap]

    from opd_jax.config import load_config
    from opd_jax.teacher.cache_build import build_cache

    data = tmp / "distill.jsonl"
    stage = (f"stages=[{{kind: cold_start, dataset: {data}, epochs: 1, batch_prompts: {ROWS}, "
             "distill: true}]")
    distill = COMMON + plan["overrides"] + DISTILL + [stage]
    cfg = load_config(config, [f"out_dir={tmp}/distill_inproc", *distill])
    cache["dataset"] = distill_dataset(cfg, tokenizer, data, ROWS * plan["distill_steps"])
    print(f"iteration: building the teacher cache of {cache['dataset']['examples']} examples",
          flush=True)
    cache.update(cache_stats(build_cache(cfg, out=tmp / "cache", k=TOP_K, progress=False),
                             tmp / "cache"))
    print("iteration: off-policy distill step, teacher in-process", flush=True)
    d_inproc = _steps(_run(config, [f"out_dir={tmp}/distill_inproc", *distill]),
                      "off-policy distill", "in-process")
    print("iteration: off-policy distill step, teacher from the cache", flush=True)
    d_cached = _steps(_run(config, [f"out_dir={tmp}/distill_cached", *distill,
                                    f"teacher.source={tmp / 'cache'}"]),
                      "off-policy distill", "cached (disk)")
    d_cached["loss_rel_diff_vs_in_process"] = _same_losses(d_inproc, d_cached)
    rows += [d_inproc, d_cached]
    return rows, cache


def bench_server(plan: dict, server: ServerProcess, flops: dict) -> list[dict]:
    from opd_jax.teacher import wire
    from opd_jax.teacher.client import TeacherClient

    server.wait()
    probe = TeacherClient(server.url)
    h = probe.health()
    vocab, k, q = h["vocab_size"], TOP_K, TOP_K + 1
    T = PROMPT + COMPLETION
    rng = np.random.default_rng(1)

    def request(rows: int):
        return (rng.integers(0, vocab, (rows, T), dtype=np.int32), np.ones((rows, T), bool),
                rng.integers(0, vocab, (rows, COMPLETION, q), dtype=np.int32))

    def client():
        c = TeacherClient(server.url)
        c.check(vocab_size=vocab, tokenizer_fingerprint=h["tokenizer"], k=k)
        return c

    # compile every batch shape concurrent clients can make: 8, 16 and 32 (padded) rows
    warm = client()
    t0 = time.perf_counter()
    for rows in sorted({ROWS * c for c in CLIENTS}):
        warm.score(*request(rows), n=COMPLETION, k=k)
    warmup_s = time.perf_counter() - t0
    body = wire.encode({"n": COMPLETION, "k": k, "temperature": 1.0, "vocab_size": vocab,
                        "tokenizer": h["tokenizer"]},
                       dict(zip(("tokens", "valid", "query_ids"), request(ROWS))))
    out = []
    for n_clients in CLIENTS:
        clients = [client() for _ in range(n_clients)]
        payloads = [[request(ROWS) for _ in range(plan["requests"])] for _ in clients]
        latencies: list[float] = []
        errors: list[str] = []
        barrier = threading.Barrier(n_clients + 1)
        lock = threading.Lock()

        def work(c, reqs):
            barrier.wait()
            for r in reqs:
                t = time.perf_counter()
                try:
                    c.score(*r, n=COMPLETION, k=k)
                except Exception as e:  # noqa: BLE001 - recorded
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    return
                with lock:
                    latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=work, args=(c, p), daemon=True)
                   for c, p in zip(clients, payloads)]
        for t in threads:
            t.start()
        before = probe.health()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = probe.health()
        if errors:
            raise RuntimeError(f"{n_clients} clients: {errors[0]}")
        tokens = len(latencies) * ROWS * COMPLETION
        delta = {key: after[key] - before[key]
                 for key in ("batches", "merged_batches", "rows", "padded_rows")}
        delta.update(server_requests=after["requests"] - before["requests"],
                     server_scored_tokens=after["scored_tokens"] - before["scored_tokens"])
        tok_s = tokens / wall
        out.append({"clients": n_clients, "requests": len(latencies), "scored_tokens": tokens,
                    "wall_s": wall, "tokens_per_s": tok_s, "tokens_per_s_per_client":
                    tok_s / n_clients, "latency_median_s": statistics.median(latencies),
                    "gflop_per_s": tok_s * flops["flops_per_scored_token"] / 1e9,
                    "pct_peak": 100 * tok_s * flops["flops_per_scored_token"] / 1e9
                    / F32_MATMUL_PEAK_GFLOPS, **delta, "shapes_compiled": after["shapes"],
                    "request_bytes": len(body), "warmup_s": warmup_s, "k_max": h["k_max"]})
        print(f"server: {n_clients} client(s): {tok_s:.0f} scored tokens/s", flush=True)
    return out


# -- main -------------------------------------------------------------------------------------

def report(out: dict) -> None:
    num = lambda x, f="{:.3f}": "-" if x is None else f.format(x)
    it = [r for r in out.get("iteration", []) if "error" not in r]
    if it:
        print_table([{**r, "s": num(r["step_s"]), "gen": num(r["gen_s"]), "train": num(r["train_s"]),
                      "teach": num(r["teacher_s"]), "first": num(r["first_step_s"], "{:.1f}"),
                      "wait": num(r.get("teacher_wait_s")),
                      "hid": num(r.get("teacher_hidden"), "{:.0%}"),
                      "n": f"{r['timed_steps']}/{r['steps']}",
                      "diff": num(r.get("loss_rel_diff_vs_in_process"), "{:.1e}")} for r in it],
                    [("setting", "step"), ("teacher", "teacher"),
                     ("s", "s/step"), ("gen", "gen_s"), ("train", "train_s"),
                     ("teach", "teacher_s"), ("wait", "wait_s"), ("hid", "hidden"),
                     ("first", "step 1 s"), ("n", "timed"),
                     ("diff", "loss rel diff")])
        print("loss rel diff: on-policy at step 1 (same rollouts; later steps sample from "
              "weights that differ by float32 rounding), off-policy over every step.")
        print("on-policy OPD = student rollouts scored by the teacher (topk_reward, top-16); "
              "off-policy distill = a distill: true dataset cold start (forward_kl, top-16, "
              "support teacher, tail bucket). In-process, the teacher forward is inside train_s; "
              "served / cached, its scores are fetched inside gen_s (teacher_s).")
    c = out.get("cache") or {}
    if "bytes_per_token_on_disk" in c:
        print(f"cache: {c['tokens']} completion tokens, k={c['k']}, {fmt_bytes(c['shard_bytes'])}"
              f" in {c['shards']} shard(s): {c['bytes_per_token_on_disk']:.0f} B/token on disk "
              f"(the records: {c['record_bytes_per_token']:.0f} B/token; ArrayRecord compresses "
              "them and rounds a file up to 64 KiB blocks); "
              f"built in {c['build_s']:.1f} s ({c['build_tokens_per_s']:.0f} tokens/s incl. "
              "teacher load and compile)")
    sv = [r for r in out.get("server", []) if "error" not in r]
    if sv:
        print_table([{**r, "tok": num(r["tokens_per_s"], "{:.0f}"),
                      "per": num(r["tokens_per_s_per_client"], "{:.0f}"),
                      "lat": num(r["latency_median_s"]), "gf": num(r["gflop_per_s"], "{:.1f}"),
                      "pct": num(r["pct_peak"], "{:.1f}%")} for r in sv],
                    [("clients", "clients"), ("requests", "requests"), ("tok", "scored tok/s"),
                     ("per", "per client"), ("lat", "latency s"), ("batches", "batches"),
                     ("merged_batches", "merged"), ("padded_rows", "padded rows"),
                     ("gf", "GFLOP/s"), ("pct", "% f32 peak")])
    for name in ("iteration", "server"):
        for r in out.get(name, []):
            if "error" in r:
                print(f"{name} failed: {r['error']}")


def counts(out: dict, config: str):
    """The FLOP and byte counts (``out["flops"]``, ``out["wire"]``), printed; returns the
    teacher's tokenizer."""
    from opd_jax.config import load_config
    from opd_jax.teacher.loading import load_teacher

    teacher = load_teacher(load_config(config))
    flops = out["flops"] = teacher_flops(teacher.config)
    wire = out["wire"] = wire_rows()
    print(f"counts: teacher {flops['params'] / 1e6:.1f} M params, "
          f"{flops['flops_per_scored_token'] / 1e9:.3f} GFLOP per scored completion token "
          f"({ROWS} x ({PROMPT} + {COMPLETION}) rows; 2N = {flops['rule_2n_per_token'] / 1e9:.3f}"
          f"); peak {F32_MATMUL_PEAK_GFLOPS:.0f} GFLOP/s float32")
    print_table([{**r, "b": f"{r['bytes_per_token']:.1f}", "a": r["array_bytes_per_token"],
                  "f32": f"{r['x_smaller_than_f32']:.0f}x", "bf16": f"{r['x_smaller_than_bf16']:.0f}x"}
                 for r in wire],
                [("k", "wire k"), ("q", "Q"), ("request_bytes", "request B"),
                 ("response_bytes", "response B"), ("b", "B/token"), ("a", "arrays B/token"),
                 ("full_f32_bytes_per_token", "f32 logits B/token"), ("f32", "vs f32"),
                 ("bf16", "vs bf16")])
    return teacher.tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny random models; about a minute")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    ap.add_argument("--sections", default="wire,iteration,server")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    args.out = results_path("teacher_service", small=args.small, out=args.out)
    plan = dict(PLANS[args.small])
    config = str(ROOT / plan["config"])
    start = time.perf_counter()
    load = load_report()
    out = {"benchmark": "teacher_service", "small": args.small, "config": plan["config"],
           "plan": {**plan, "rows": ROWS, "prompt": PROMPT, "completion": COMPLETION,
                    "top_k": TOP_K, "clients": list(CLIENTS), "wire_vocab": WIRE_VOCAB},
           "load": load, "machine": machine_info(), "flops": None, "wire": [],
           "iteration": [], "cache": {}, "server": []}
    save = lambda: write_json(args.out, out)
    server = None
    with tempfile.TemporaryDirectory(prefix="opd_teacher_bench_") as tmp:
        try:
            if sections & {"iteration", "server"}:   # it loads its teacher while we count
                print("starting opd-jax serve-teacher ...", flush=True)
                server = ServerProcess(config, Path(tmp) / "server.log")
            tokenizer = counts(out, config)
            save()
            if "iteration" in sections:
                try:
                    out["iteration"], out["cache"] = bench_iteration(plan, server, Path(tmp),
                                                                     tokenizer)
                except Exception as e:  # noqa: BLE001 - the server section still runs
                    out["iteration"] = [_error("iteration", e)]
                save()
            if "server" in sections:
                try:
                    out["server"] = bench_server(plan, server, out["flops"])
                except Exception as e:  # noqa: BLE001
                    out["server"] = [_error("server", e)]
        finally:
            if server is not None:
                out["server_start_s"] = server.started_s
                server.stop()
    out["load_end"] = load_report(warn=False)
    out["elapsed_s"] = time.perf_counter() - start
    save()
    report(out)
    print(f"wrote {args.out} in {out['elapsed_s']:.0f} s")
    failed = any("error" in r for name in ("iteration", "server") for r in out[name])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
