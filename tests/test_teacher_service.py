"""The teacher service: wire format, batching, a real server process on localhost, the client.

One server process (a tiny random teacher) serves the whole module; the restart test kills it and
starts it again on the same port while a client is retrying. Response validation and 5xx retries
use a tiny in-process fake server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.teacher import server as server_mod
from opd_jax.teacher import wire
from opd_jax.teacher.batcher import ScoreBatcher, ScoringFailed, bucket_length, bucket_rows
from opd_jax.teacher.client import (
    TeacherClient,
    TeacherMismatch,
    TeacherRequestError,
    TeacherResponseError,
    TeacherUnavailable,
    check_response,
)
from opd_jax.teacher.scoring import score_completions

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=64, max_position=128, n_layers=2, d_model=32, ffn_dim=64,
                     n_heads=4, n_kv_heads=2, head_dim=8)
TOKENIZER = "sha256:test-tokenizer"
TOKEN = "s3cret-token"
TOKEN_ENV = "OPD_JAX_TEST_TEACHER_TOKEN"
K_MAX, MAX_BYTES = 8, 1 << 16
FIELDS = ("topk_ids", "topk_logprobs", "logsumexp", "query_ids", "query_logprobs")

SERVER_SCRIPT = f"""
import sys, jax, jax.numpy as jnp
from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig
from opd_jax.model.fingerprint import params_fingerprint
from opd_jax.teacher.server import TeacherServer, serve
config = ModelConfig(vocab_size=64, max_position=128, n_layers=2, d_model=32, ffn_dim=64,
                     n_heads=4, n_kv_heads=2, head_dim=8)
params = decoder.init_params(config, jax.random.key(0), jnp.float32)
serve(TeacherServer(params, config, tokenizer_fingerprint={TOKENIZER!r},
                    teacher_fingerprint=params_fingerprint(config, params), port=int(sys.argv[1]),
                    token_env={TOKEN_ENV!r}, k_max={K_MAX}, max_request_bytes={MAX_BYTES},
                    batch_wait_s=0.05))
"""


class ServerProcess:
    """The module's server process; :meth:`restart` kills it and starts it on the same port."""

    def __init__(self):
        self.port, self.proc = 0, None
        self.log = tempfile.TemporaryFile()

    def start(self) -> None:
        env = {**os.environ, TOKEN_ENV: TOKEN, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(self.port)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        line = self.proc.stdout.readline()     # the one line serve() prints when ready
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.log.seek(0)
            raise RuntimeError(f"server did not start: {line!r}\n{self.log.read().decode()[-3000:]}")
        self.port = int(match.group(1))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served():
    server = ServerProcess()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def params():
    return decoder.init_params(CONFIG, jax.random.key(0), jnp.float32)


def make_batch(seed: int, B: int, T: int, n: int, Q: int = 3):
    """Rows ``[left-padded prompt | right-padded completion]`` with different prompt lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    for b in range(B):
        valid[b, :b % (T - n - 1)] = False           # prompt left padding
        valid[b, T - (b % n):] = False               # completion right padding
    query = rng.integers(0, CONFIG.vocab_size, (B, n, Q)).astype(np.int32)
    return tokens, valid, query


def client(url: str, **kwargs) -> TeacherClient:
    return TeacherClient(url, token=TOKEN, vocab_size=CONFIG.vocab_size,
                         tokenizer_fingerprint=TOKENIZER, **kwargs)


def assert_same(got, want) -> None:
    for f in FIELDS:
        np.testing.assert_allclose(np.asarray(getattr(got, f)), np.asarray(getattr(want, f)),
                                   rtol=1e-5, atol=1e-5, err_msg=f)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def post(url: str, body: bytes, token: str | None = TOKEN, path: str = "/score"):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=body, headers=headers),
                                    timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def request_body(meta=None, arrays=None, B=2, T=12, n=4) -> bytes:
    tokens, valid, query = make_batch(1, B, T, n)
    base = {"n": n, "k": 4, "temperature": 1.0, "vocab_size": 64, "tokenizer": TOKENIZER}
    return wire.encode({**base, **(meta or {})},
                       {"tokens": tokens, "valid": valid, "query_ids": query, **(arrays or {})})


# -- wire ---------------------------------------------------------------------------------------

def test_wire_round_trip():
    arrays = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": np.float32([[0.5, -np.inf]]),
              "c": np.array([True, False]), "empty": np.zeros((0, 4), np.int32),
              "scalar": np.float32(3.0), "big_endian": np.arange(3, dtype=">i4")}
    meta, out = wire.decode(wire.encode({"n": 3, "s": "x"}, arrays))
    assert meta == {"n": 3, "s": "x"} and set(out) == set(arrays)
    for name, x in arrays.items():
        assert out[name].shape == np.shape(x) and out[name].dtype.kind == np.asarray(x).dtype.kind
        np.testing.assert_array_equal(out[name], x)
    assert wire.encoded_size({"n": 1}, {"a": ((2, 3), "int32")}) == len(
        wire.encode({"n": 1}, {"a": np.zeros((2, 3), np.int32)}))
    assert wire.bytes_per_scored_token(k=16, q=17) == 8 * 16 + 8 * 17 + 9


def _raw(header, body: bytes = b"", magic: bytes = wire.MAGIC) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return magic + struct.pack("<I", len(h)) + h + body


@pytest.mark.parametrize("data, match", [
    (b"OPD", "shorter"),
    (_raw({"meta": {}, "arrays": []}, magic=b"NOTOPDJX"), "bad magic"),
    (wire.MAGIC + struct.pack("<I", 100) + b"{}", "runs past"),
    (wire.MAGIC + struct.pack("<I", wire.MAX_HEADER_BYTES + 1), "exceeds the limit"),
    (_raw(b"{not json"), "not UTF-8 JSON"),
    (_raw(b"\xff\xfe"), "not UTF-8 JSON"),
    (_raw(b'{"meta": {"x": NaN}, "arrays": []}'), "NaN"),
    (_raw([1, 2]), "exactly the keys"),
    (_raw({"meta": {}, "arrays": [], "extra": 1}), "exactly the keys"),
    (_raw({"meta": [], "arrays": []}), "must be an object"),
    (_raw({"meta": {}, "arrays": {}}), "must be a list"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32"}]}), "exactly"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int64", "shape": [1]}]}, b"\0" * 8),
     "dtype 'int64'"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32", "shape": [-1]}]}), "non-negative"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32", "shape": [1.5]}]}), "non-negative"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32", "shape": [True]}]}),
     "non-negative"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32", "shape": [1] * 9}]}, b"\0" * 4),
     "at most 8"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "bool", "shape": [1]}] * 2}, b"\0\0"),
     "unique"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32", "shape": [2]}]}, b"\0" * 7),
     "truncated"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32", "shape": [2]}]}, b"\0" * 9),
     "trailing"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "int32",
                                   "shape": [1 << 40, 1 << 40]}]}), "truncated"),
    (_raw({"meta": {}, "arrays": [{"name": "a", "dtype": "bool", "shape": [2]}]}, b"\0\2"),
     "other than 0 and 1"),
])
def test_wire_rejects(data, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(data)


def test_wire_rejects_limits_and_bad_inputs():
    data = wire.encode({}, {"a": np.zeros(100, np.int32)})
    with pytest.raises(wire.WireError, match="exceeds the limit of 100"):
        wire.decode(data, max_bytes=100)
    assert wire.decode(data, max_bytes=len(data))[1]["a"].shape == (100,)
    for bad in (np.zeros(2, np.int64), np.zeros(2, np.float64), np.array(["a"])):
        with pytest.raises(wire.WireError, match="cast to one of"):
            wire.encode({}, {"a": bad})
    with pytest.raises(wire.WireError, match="JSON"):
        wire.encode({"x": float("nan")}, {})
    with pytest.raises(wire.WireError, match="dict"):
        wire.encode([], {})


# -- batching (no model) ----------------------------------------------------------------------

def test_buckets():
    assert [bucket_length(t) for t in (1, 16, 17, 1024, 1025)] == [16, 16, 32, 1024, 2048]
    assert [bucket_rows(b, 64) for b in (1, 2, 3, 33, 64)] == [1, 2, 4, 64, 64]
    assert bucket_rows(7, 6) == 6


def test_batcher_splits_and_merges_rows_in_order():
    """A request bigger than max_batch_rows is cut into pieces; rows come back in order with
    their own k; every call sees left-padded rows of a bucketed length and row count."""
    calls = []

    def fake_score(tokens_RxT, valid_RxT, query_RxNxQ, *, n, temperature):
        calls.append(tokens_RxT.shape)
        last_RxN = tokens_RxT[:, -n:]
        R = tokens_RxT.shape[0]
        return {"topk_ids": np.repeat(last_RxN[..., None], 5, -1),
                "topk_logprobs": np.broadcast_to(-np.arange(5, dtype=np.float32), (R, n, 5)),
                "logsumexp": last_RxN.astype(np.float32),
                "query_logprobs": -query_RxNxQ.astype(np.float32)}

    batcher = ScoreBatcher(fake_score, k_max=5, max_batch_rows=4, batch_wait_s=0.0).start()
    try:
        tokens, valid, query = make_batch(0, 7, 10, 3)
        out = batcher.submit(tokens, valid, query, n=3, k=2, temperature=1.0)
        np.testing.assert_array_equal(out["topk_ids"], np.repeat(tokens[:, -3:, None], 2, -1))
        np.testing.assert_array_equal(out["query_logprobs"], -query)
        assert calls == [(4, 16), (4, 16)] and batcher.stats()["padded_rows"] == 1
    finally:
        batcher.stop()


def test_batcher_survives_a_failing_scorer():
    def fail(*args, **kwargs):
        raise ValueError("bad batch")

    batcher = ScoreBatcher(fail, k_max=2, batch_wait_s=0.0).start()
    try:
        for _ in range(2):                   # the worker is still there for the second one
            with pytest.raises(ScoringFailed, match="ValueError: bad batch"):
                batcher.submit(*make_batch(0, 1, 8, 3), n=3, k=2, temperature=1.0)
    finally:
        batcher.stop()
    with pytest.raises(ScoringFailed, match="not running"):
        batcher.submit(*make_batch(0, 1, 8, 3), n=3, k=2, temperature=1.0)


# -- the real server ----------------------------------------------------------------------------

def test_scores_equal_in_process(served, params):
    c = client(served.url)
    h = c.check(CONFIG.vocab_size, TOKENIZER, K_MAX)
    assert h["version"] == wire.VERSION and h["k_max"] == K_MAX
    tokens, valid, query = make_batch(2, 3, 14, 5)
    got = c.score(tokens, valid, query, n=5, k=4, temperature=1.3)
    assert got.topk_ids.shape == (3, 5, 4) and got.topk_ids.dtype == np.int32
    assert_same(got, score_completions(params, CONFIG, tokens, valid, query, n=5, k=4,
                                       temperature=1.3))


def test_repeated_calls_compile_nothing_new(served):
    c = client(served.url)
    tokens, valid, query = make_batch(3, 2, 12, 4)
    c.score(tokens, valid, query, n=4, k=3)
    before = health(served.url)
    for pad in (0, 1, 4):                # more left padding, one length bucket: no new shape
        c.score(np.pad(tokens, ((0, 0), (pad, 0))), np.pad(valid, ((0, 0), (pad, 0))), query,
                n=4, k=2)
    after = health(served.url)
    assert after["shapes"] == before["shapes"]
    assert after["batches"] == before["batches"] + 3 and after["requests"] == before["requests"] + 3


def test_concurrent_clients_are_batched(served, params):
    """Two clients with different row lengths send at once: their rows share batches (left-padded
    to one length) and each gets exactly its in-process scores."""
    inputs = [make_batch(10, 2, 12, 4), make_batch(11, 2, 21, 4)]
    refs = [score_completions(params, CONFIG, *x, n=4, k=4) for x in inputs]
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(i):
        try:
            c = client(served.url)
            for r in range(3):
                barrier.wait(timeout=30)
                results[i, r] = c.score(*inputs[i], n=4, k=4)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    before = health(served.url)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    after = health(served.url)
    for (i, _), got in results.items():
        assert_same(got, refs[i])
    assert after["requests"] - before["requests"] == 6
    assert after["merged_batches"] > before["merged_batches"]
    assert after["batches"] - before["batches"] < 6


def test_client_splits_large_requests(served, params):
    c = client(served.url)
    c.check(CONFIG.vocab_size, TOKENIZER, 8)            # learns max_request_bytes = 64 KiB
    tokens, valid, query = make_batch(4, 40, 60, 40, Q=4)
    before = health(served.url)
    got = c.score(tokens, valid, query, n=40, k=8)
    assert health(served.url)["requests"] - before["requests"] > 1
    assert_same(got, score_completions(params, CONFIG, tokens, valid, query, n=40, k=8))


@pytest.mark.parametrize("body, status, match", [
    (b"XXXXXXXX" + request_body()[8:], 400, "bad magic"),
    (request_body()[:-3], 400, "truncated"),
    (request_body(arrays={"tokens": np.zeros((2, 12), np.float32)}), 400, "tokens.*int32"),
    (request_body(arrays={"valid": np.ones((2, 13), bool)}), 400, "inconsistent shapes"),
    (request_body(arrays={"query_ids": np.zeros((2, 5, 3), np.int32)}), 400, "inconsistent"),
    (request_body(arrays={"tokens": np.full((2, 12), 64, np.int32)}), 400, r"outside \[0, 64\)"),
    (request_body(arrays={"query_ids": np.full((2, 4, 3), -1, np.int32)}), 400, "outside"),
    (request_body(meta={"k": K_MAX + 1}), 400, "meta.k"),
    (request_body(meta={"n": 12}), 400, "meta.n"),
    (request_body(meta={"temperature": 0}), 400, "temperature"),
    (request_body(arrays={"extra": np.zeros(1, np.int32)}), 400, "unexpected arrays"),
    (request_body(meta={"tokenizer": "sha256:other"}), 409, "sha256:other"),
    (request_body(meta={"vocab_size": 65}), 409, "vocab_size 65"),
    (request_body(B=1, T=20000, n=2), 413, "max_request_bytes"),
])
def test_bad_requests_are_refused_and_server_lives(served, body, status, match):
    got_status, message = post(served.url, body)
    assert got_status == status and re.search(match, message), (got_status, message)
    if status == 409:
        assert TOKENIZER in message
    assert health(served.url)["status"] == "ok"


@pytest.mark.parametrize("token", [None, "wrong"])
def test_token_is_required(served, token):
    status, message = post(served.url, request_body(), token=token)
    assert status == 401 and "token" in message
    with pytest.raises(TeacherRequestError, match="HTTP 401"):
        TeacherClient(served.url, token=token, token_env="OPD_JAX_TEST_UNSET", vocab_size=64,
                      tokenizer_fingerprint=TOKENIZER).score(*make_batch(0, 1, 8, 3), n=3, k=2)
    assert post(served.url, b"", path="/nowhere")[0] == 404
    assert health(served.url)["status"] == "ok"


def test_check_names_what_differs(served):
    with pytest.raises(TeacherMismatch, match="tokenizer: served .*test-tokenizer.*trainer "
                                              "sha256:x.*vocab_size: served 64, trainer 65"):
        client(served.url).check(65, "sha256:x", 4)
    with pytest.raises(TeacherMismatch, match="k_max=8"):
        client(served.url).check(64, TOKENIZER, 9)
    with pytest.raises(TeacherMismatch, match="HTTP 409"):
        TeacherClient(served.url, token=TOKEN, vocab_size=64, tokenizer_fingerprint="sha256:y",
                      ).score(*make_batch(0, 1, 8, 3), n=3, k=2)


def test_restart_while_client_retries(served, params):
    """The server dies; a client keeps retrying; the server comes back on the same port; the
    call succeeds with the right scores."""
    tokens, valid, query = make_batch(5, 2, 10, 3)
    ref = score_completions(params, CONFIG, tokens, valid, query, n=3, k=2)
    served.kill()
    out, errors = {}, []

    def call():
        try:
            out["scores"] = client(served.url, max_wait_s=90, backoff_base_s=0.05,
                                   backoff_cap_s=0.5).score(tokens, valid, query, n=3, k=2)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()                     # retrying against a closed port
    served.start()
    thread.join(timeout=90)
    assert not errors, errors
    assert_same(out["scores"], ref)


def test_never_comes_back_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]               # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=f"{url}.*serve-teacher"):
        client(url, max_wait_s=1.0, backoff_base_s=0.05).score(*make_batch(0, 1, 8, 3), n=3, k=2)
    assert time.monotonic() - start < 2.0


# -- the server in-process: a failing scorer, config loading --------------------------------------

def test_scoring_error_is_500_and_server_keeps_serving(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server_mod, "score_completions", boom)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with server_mod.TeacherServer(None, CONFIG, tokenizer_fingerprint=TOKENIZER,
                                  teacher_fingerprint="t", port=0, token_env=TOKEN_ENV,
                                  k_max=K_MAX) as srv:
        for _ in range(2):
            status, message = post(srv.url, request_body())
            assert status == 500 and "RuntimeError: boom" in message
            assert health(srv.url)["errors"] >= 1
        with pytest.raises(TeacherUnavailable, match="HTTP 500.*boom"):
            client(srv.url, max_wait_s=0.3, backoff_base_s=0.05).score(
                *make_batch(0, 1, 8, 3), n=3, k=2)


def test_server_from_config_loads_the_teacher():
    from opd_jax.config.run import RunConfig
    from opd_jax.config.schema import DeriveSpec, ModelSpec
    from opd_jax.model.byte_tokenizer import ByteTokenizer
    from opd_jax.model.fingerprint import tokenizer_fingerprint

    cfg = RunConfig(teacher=ModelSpec(source="random", derive=DeriveSpec(
        n_layers=1, d_model=16, ffn_dim=32, n_heads=2, n_kv_heads=1, head_dim=8)))
    srv = server_mod.server_from_config(cfg, port=0, k_max=1000)
    try:
        h = srv.start().health()
        assert h["tokenizer"] == tokenizer_fingerprint(ByteTokenizer())
        assert h["vocab_size"] == 259 and h["k_max"] == 259 and h["teacher"].startswith("sha256:")
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.shutdown()


def test_config_and_port_errors(served):
    from opd_jax.config.run import RunConfig
    from opd_jax.config.schema import ModelSpec

    with pytest.raises(ValueError, match="is a service, not a model"):
        server_mod.server_from_config(RunConfig(teacher=ModelSpec(source="http://host:1")))
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{served.port}.*--port"):
        server_mod.TeacherServer(None, CONFIG, tokenizer_fingerprint=TOKENIZER,
                                 teacher_fingerprint="t", port=served.port)
    with pytest.raises(ValueError, match="B >= 1"):
        client(served.url).score(np.zeros((0, 8)), np.zeros((0, 8)), np.zeros((0, 3, 1)), n=3,
                                 k=2)


# -- the client's checks of responses (a fake server) ----------------------------------------

B, N, K, Q = 2, 3, 4, 2


def good_response() -> dict:
    return {"topk_ids": np.tile(np.arange(K, dtype=np.int32), (B, N, 1)),
            "topk_logprobs": np.tile(-np.arange(1, K + 1, dtype=np.float32), (B, N, 1)),
            "logsumexp": np.zeros((B, N), np.float32),
            "query_logprobs": np.full((B, N, Q), -2.0, np.float32)}


class FakeTeacher:
    """Answers /health like a teacher and /score with ``replies`` (status, body) in turn."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                fake.calls += 1
                status, body = fake.replies[min(fake.calls, len(fake.replies)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def corrupt(**changes) -> bytes:
    arrays = {**good_response(), **changes}
    return wire.encode({}, {k: v for k, v in arrays.items() if v is not None})


def _with(name, index, value):
    x = good_response()[name].copy()
    x[index] = value
    return x


@pytest.mark.parametrize("body, match", [
    (b"<html>not wire</html>", "malformed body"),
    (corrupt(topk_ids=np.zeros((B, N, K + 1), np.int32)), "topk_ids is int32 .*expected"),
    (corrupt(topk_logprobs=np.zeros((B, N, K), np.int32)), "topk_logprobs is int32"),
    (corrupt(logsumexp=None), "expected"),
    (corrupt(topk_ids=_with("topk_ids", (0, 0, 0), 99)), "outside"),
    (corrupt(topk_logprobs=_with("topk_logprobs", (1, 1, 0), np.nan)), "non-finite"),
    (corrupt(query_logprobs=_with("query_logprobs", (0, 1, 1), 0.5)), "positive"),
    (corrupt(topk_logprobs=_with("topk_logprobs", (0, 0, 3), -0.1)), "not sorted"),
    (corrupt(logsumexp=_with("logsumexp", (1, 0), np.inf)), "logsumexp"),
])
def test_client_rejects_malformed_responses(body, match):
    fake = FakeTeacher([(200, body)])
    try:
        with pytest.raises(TeacherResponseError, match=match):
            client(fake.url, max_wait_s=1).score(*make_batch(0, B, 8, N, Q), n=N, k=K)
        assert fake.calls == 1                       # a bad answer is not retried
    finally:
        fake.close()


def test_client_retries_5xx_then_succeeds():
    fake = FakeTeacher([(503, b'{"error": "busy"}'), (502, b"gateway"), (200, corrupt())])
    try:
        got = client(fake.url, backoff_base_s=0.01).score(*make_batch(0, B, 8, N, Q), n=N, k=K)
        np.testing.assert_array_equal(got.topk_ids, good_response()["topk_ids"])
        assert fake.calls == 3
    finally:
        fake.close()


def test_response_check_ignores_padding():
    arrays = good_response()
    arrays["topk_logprobs"][1, 2] = np.nan           # a padding position: not checked
    mask = np.ones((B, N), bool)
    mask[1, 2] = False
    check_response(arrays, B=B, n=N, k=K, q=Q, vocab_size=64, mask_BxN=mask)
    with pytest.raises(TeacherResponseError):
        check_response(arrays, B=B, n=N, k=K, q=Q, vocab_size=64, mask_BxN=np.ones((B, N), bool))
