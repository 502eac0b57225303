"""Training against a teacher served by a real ``opd-jax serve-teacher`` process on localhost:
the run's losses and mechanism metrics equal the in-process teacher's; a server killed mid-run
and restarted loses no step; a server that never comes back stops the run with a clear error
and a checkpoint it resumes from; stages a served teacher cannot run are refused up front."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from opd_jax.config import load_config
from opd_jax.train.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")
OPD = ["stages=[{kind: opd, steps: 4, batch_prompts: 2}]", "checkpoint.every_n_steps=0"]
KEYS = ("loss", "overlap", "student_p_sum_intersection", "teacher_p_sum_intersection",
        "token_reverse_kl", "student_token_logprob", "teacher_token_logprob", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``opd-jax serve-teacher`` of the tiny config in a subprocess."""

    def __init__(self, port: int):
        self.port, self.proc = port, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Server":
        env = {k: v for k, v in os.environ.items() if k != "OPD_JAX_TEACHER_TOKEN"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opd_jax.cli", "serve-teacher", TINY, "--port",
             str(self.port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        if wait:
            deadline = time.time() + 90
            while time.time() < deadline:
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                        if json.loads(r.read())["status"] == "ok":
                            return self
                except OSError:
                    time.sleep(0.3)
            raise RuntimeError(f"server did not start: {self.stop()}")
        return self

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.kill()
        out = self.proc.communicate()[0]
        self.proc = None
        return out


@pytest.fixture(scope="module")
def server():
    s = Server(_free_port()).start()
    yield s
    s.stop()


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "opd"]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=2e-4, abs=2e-5), (ra["step"], k)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc")
    run(load_config(TINY, [f"out_dir={out}/run", *OPD]), progress=False)
    return _metrics(out / "run")


def test_served_teacher_trains_like_the_in_process_one(server, in_process, tmp_path):
    cfg = load_config(TINY, [f"out_dir={tmp_path}/run", *OPD, f"teacher.source={server.url}"])
    run(cfg, progress=False)
    served = _metrics(tmp_path / "run")
    _same(in_process, served)
    assert all(r["teacher_query_miss"] == 0 for r in served)
    assert all(r["teacher_s"] > 0 for r in served)


def test_server_killed_and_restarted_mid_run_loses_no_step(in_process, tmp_path):
    srv = Server(_free_port()).start()
    run_dir = tmp_path / "run"

    def bounce():   # kill the server once step 1 is logged, bring it back 2 s later
        log = run_dir / "metrics.jsonl"
        while not (log.exists() and log.read_text().strip()):
            time.sleep(0.05)
        srv.stop()
        time.sleep(2.0)
        srv.start(wait=False)

    t = threading.Thread(target=bounce, daemon=True)
    t.start()
    try:
        run(load_config(TINY, [f"out_dir={run_dir}", *OPD, f"teacher.source={srv.url}",
                               "teacher.service_wait_s=120"]), progress=False)
    finally:
        t.join(timeout=30)
        srv.stop()
    _same(in_process, _metrics(run_dir))


def test_server_gone_for_good_stops_with_a_checkpoint_then_resumes(in_process, tmp_path,
                                                                   monkeypatch):
    from opd_jax.teacher.client import TeacherUnavailable
    from opd_jax.train import metrics_log

    srv = Server(_free_port()).start()
    run_dir = tmp_path / "run"
    over = [f"out_dir={run_dir}", *OPD, f"teacher.source={srv.url}", "teacher.service_wait_s=2"]
    write = metrics_log.MetricsLog.write

    def write_then_kill_after_two_steps(self, record):
        # the server dies right as step 2 is logged, inside the train loop: no race with a
        # watcher thread (fast steps used to finish all 4 before a watcher's kill landed)
        write(self, record)
        if record.get("stage") == "opd" and record.get("step") == 2:
            srv.stop()

    monkeypatch.setattr(metrics_log.MetricsLog, "write", write_then_kill_after_two_steps)
    with pytest.raises(TeacherUnavailable, match="serve-teacher"):
        run(load_config(TINY, over), progress=False)
    monkeypatch.setattr(metrics_log.MetricsLog, "write", write)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints" / "opd").iterdir()
                   if p.name.isdigit())
    assert steps and 2 <= steps[-1] < 4        # what was done is kept
    srv.start()
    try:   # resumes from that checkpoint (a fresh server compiles first: wait longer)
        run(load_config(TINY, [*over, "teacher.service_wait_s=120"]), progress=False)
    finally:
        srv.stop()
    _same(in_process, _metrics(run_dir))


@pytest.mark.parametrize("overrides, words", [
    (["loss.objective=reverse_kl", "loss.top_k=null"], "full-vocabulary"),
    (["loss.lambda_on_policy=0.5"], "lambda_on_policy"),
    (["stages=[{kind: cold_start, steps: 1, batch_prompts: 2}]"], "on-the-fly cold start"),
    (["stages=[{kind: eval, n_prompts: 2}]"], "eval stage"),
])
def test_stages_a_served_teacher_cannot_run_are_refused_before_any_work(tmp_path, overrides,
                                                                       words):
    cfg = load_config(TINY, [f"out_dir={tmp_path}/run", "stages=[{kind: opd, steps: 1}]",
                             "teacher.source=http://127.0.0.1:9", *overrides])
    with pytest.raises(ValueError, match=words):
        run(cfg, progress=False)
