"""The teacher as a service: score completions over HTTP for trainers in other processes.

Standard library only on the HTTP side (``http.server.ThreadingHTTPServer``); bodies are
:mod:`opd_jax.teacher.wire` messages; concurrent requests are batched by
:class:`~opd_jax.teacher.batcher.ScoreBatcher` into few jitted shapes.

Endpoints:

* ``GET /health`` (no token needed): JSON ``{status, vocab_size, tokenizer, teacher, k_max,
  max_request_bytes, max_batch_rows, requests, errors, batches, merged_batches, rows,
  padded_rows, scored_tokens, shapes, queued, version, package}``.
* ``POST /score`` (``Authorization: Bearer <token>`` when the server's token variable is set):
  meta ``{n, k, temperature, vocab_size, tokenizer}``, arrays ``tokens [B, T]`` int32, ``valid
  [B, T]`` bool, ``query_ids [B, n, Q]`` int32 (rows ``[left-padded prompt | right-padded
  completion]``, the last ``n`` columns the completion) -> arrays ``topk_ids`` / ``topk_logprobs``
  ``[B, n, k]``, ``logsumexp [B, n]``, ``query_logprobs [B, n, Q]`` (as
  :func:`~opd_jax.teacher.scoring.score_completions`; meta ``{teacher}``).

Every request is checked before any compute. Errors are JSON ``{"error": "..."}``: 400 malformed,
401 missing / wrong token, 404 unknown path, 409 tokenizer or vocabulary mismatch, 411 / 413
missing / too large ``Content-Length`` (checked before the body is read), 500 scoring raised
(the server keeps serving), 503 shutting down.

>>> server = TeacherServer(params, config, tokenizer_fingerprint=tok_fp,  # doctest: +SKIP
...                        teacher_fingerprint=params_fp, port=0).start()
"""

from __future__ import annotations

import hmac
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax
import numpy as np

from opd_jax.teacher import wire
from opd_jax.teacher.batcher import ScoreBatcher, ScoringFailed
from opd_jax.teacher.scoring import score_completions

__all__ = ["TeacherServer", "serve", "serve_from_config", "server_from_config", "RequestError",
           "DEFAULT_PORT", "DEFAULT_TOKEN_ENV"]

DEFAULT_PORT = 8471
DEFAULT_TOKEN_ENV = "OPD_JAX_TEACHER_TOKEN"
_DRAIN_LIMIT = 64 << 20


class RequestError(Exception):
    """A request the server refuses: ``status`` and a message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _int(meta: dict, name: str, low: int, high: int | None = None) -> int:
    v = meta.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(400, f"meta.{name}={v!r}: need an integer in {span}")
    return v


def _array(arrays: dict, name: str, dtype: str, ndim: int) -> np.ndarray:
    x = arrays.get(name)
    if x is None:
        raise RequestError(400, f"array {name!r} is missing (send tokens, valid, query_ids)")
    if x.dtype != wire.DTYPES[dtype] or x.ndim != ndim:
        raise RequestError(400, f"array {name!r} is {x.dtype} with shape {list(x.shape)}; need "
                                f"{dtype} with {ndim} dimensions")
    return x


class TeacherServer:
    """An HTTP teacher over ``params`` / ``config`` (module docstring). The socket is bound on
    construction (``port=0`` picks a free port: see :attr:`url`); :meth:`start` serves from
    background threads, :func:`serve` from the calling one; :meth:`shutdown` stops both.

    Args:
      params, config: the teacher model (``score_completions``'s arguments).
      tokenizer_fingerprint, teacher_fingerprint: :mod:`opd_jax.model.fingerprint` strings;
        requests must name the same tokenizer (409 otherwise); the teacher's is reported.
      host, port: where to listen (127.0.0.1 by default: put a TLS proxy in front for a network).
      token_env: environment variable holding the shared secret (unset or empty: no token).
      k_max: the largest top-k a request may ask for (every batch computes ``k_max``).
      max_request_bytes: the largest request body (413 above it).
      max_batch_rows, batch_wait_s: batching (:class:`~opd_jax.teacher.batcher.ScoreBatcher`).
      chunk_size: token rows per unembedding chunk.
      quiet: no access log on stderr.
    """

    def __init__(self, params: Any, config: Any, *, tokenizer_fingerprint: str,
                 teacher_fingerprint: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 token_env: str = DEFAULT_TOKEN_ENV, k_max: int = 64,
                 max_request_bytes: int = 64 << 20, max_batch_rows: int = 64,
                 batch_wait_s: float = 0.005, chunk_size: int = 256, quiet: bool = True):
        self.params, self.config, self.chunk_size = params, config, chunk_size
        self.vocab_size = int(config.vocab_size)
        if not 1 <= k_max <= self.vocab_size:
            raise ValueError(f"k_max={k_max} with vocab_size={self.vocab_size}; pick 1 <= k_max "
                             "<= vocab_size")
        self.tokenizer_fingerprint, self.teacher_fingerprint = tokenizer_fingerprint, teacher_fingerprint
        self.k_max, self.max_request_bytes, self.quiet = int(k_max), int(max_request_bytes), quiet
        self._token = os.environ.get(token_env) or None
        self.batcher = ScoreBatcher(self._score, k_max=self.k_max, max_batch_rows=max_batch_rows,
                                    batch_wait_s=batch_wait_s)
        self._counts = {"requests": 0, "errors": 0, "scored_tokens": 0}
        self._lock = threading.Lock()
        self._serving = False
        self._thread: threading.Thread | None = None
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {host}:{port} ({e.strerror}); pick another "
                          "--port, or stop the process that holds it") from None
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        from opd_jax import __version__
        with self._lock:
            counts = dict(self._counts)
        return {"status": "ok", "vocab_size": self.vocab_size,
                "tokenizer": self.tokenizer_fingerprint, "teacher": self.teacher_fingerprint,
                "k_max": self.k_max, "max_request_bytes": self.max_request_bytes,
                "max_batch_rows": self.batcher.max_batch_rows, **counts, **self.batcher.stats(),
                "version": wire.VERSION, "package": __version__}

    def start(self) -> "TeacherServer":
        """Serve from a background thread (tests, notebooks); returns ``self``."""
        self.batcher.start()
        self._serving = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="opd-jax-teacher-http",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until :meth:`shutdown` (from another thread)."""
        self.batcher.start()
        self._serving = True
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop serving, fail queued requests, close the socket."""
        if self._serving:
            self._serving = False
            self.httpd.shutdown()
        self.batcher.stop()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- scoring ------------------------------------------------------------------------------

    def _score(self, tokens_RxT, valid_RxT, query_RxNxQ, *, n: int, temperature: float) -> dict:
        out = score_completions(self.params, self.config, tokens_RxT, valid_RxT, query_RxNxQ, n=n,
                                k=self.k_max, chunk_size=self.chunk_size, temperature=temperature)
        out = jax.device_get(out)
        return {"topk_ids": np.asarray(out.topk_ids, np.int32),
                "topk_logprobs": np.asarray(out.topk_logprobs, np.float32),
                "logsumexp": np.asarray(out.logsumexp, np.float32),
                "query_logprobs": np.asarray(out.query_logprobs, np.float32)}

    def check_request(self, meta: dict, arrays: dict) -> tuple:
        """``(tokens, valid, query_ids, n, k, temperature)`` of a decoded request, padding ids
        zeroed; :class:`RequestError` (400 / 409) naming the first problem."""
        vocab, tok = meta.get("vocab_size"), meta.get("tokenizer")
        if tok != self.tokenizer_fingerprint or vocab != self.vocab_size:
            raise RequestError(409, f"tokenizer mismatch: this teacher serves tokenizer "
                               f"{self.tokenizer_fingerprint} (vocab_size {self.vocab_size}), the "
                               f"request was made with tokenizer {tok} (vocab_size {vocab}); "
                               "serve a teacher with the student's tokenizer")
        k = _int(meta, "k", 1, self.k_max)
        temperature = meta.get("temperature")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise RequestError(400, f"meta.temperature={temperature!r}: need a finite number > 0")
        tokens = _array(arrays, "tokens", "int32", 2)
        valid = _array(arrays, "valid", "bool", 2)
        query = _array(arrays, "query_ids", "int32", 3)
        B, T = tokens.shape
        n = meta.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < T:
            raise RequestError(400, f"meta.n={n!r} with rows of T={T} tokens: need an integer "
                                    "1 <= n < T (the completion plus at least one prompt token)")
        if extra := set(arrays) - {"tokens", "valid", "query_ids"}:
            raise RequestError(400, f"unexpected arrays {sorted(extra)}")
        if B < 1 or valid.shape != (B, T) or query.shape[:2] != (B, n) or query.shape[2] < 1:
            raise RequestError(400, f"inconsistent shapes: tokens {list(tokens.shape)}, valid "
                               f"{list(valid.shape)}, query_ids {list(query.shape)}; need [B, T], "
                               "[B, T], [B, n, Q] with B >= 1, Q >= 1")
        tokens = np.where(valid, tokens, 0).astype(np.int32)
        query = np.where(valid[:, T - n:, None], query, 0).astype(np.int32)
        for name, x in (("tokens", tokens), ("query_ids", query)):
            if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
                raise RequestError(400, f"{name} holds ids outside [0, {self.vocab_size}) at valid "
                                   f"positions (min {x.min()}, max {x.max()})")
        return tokens, valid, query, n, k, float(temperature)

    def handle_score(self, body: bytes) -> bytes:
        """A ``/score`` body -> the response body; :class:`RequestError` on refusal."""
        try:
            meta, arrays = wire.decode(body, max_bytes=self.max_request_bytes)
        except wire.WireError as e:
            raise RequestError(400, f"malformed body: {e}") from None
        tokens, valid, query, n, k, temperature = self.check_request(meta, arrays)
        try:
            out = self.batcher.submit(tokens, valid, query, n=n, k=k, temperature=temperature)
        except ScoringFailed as e:
            raise RequestError(503 if "shutting down" in str(e) else 500, str(e)) from None
        with self._lock:
            self._counts["scored_tokens"] += int(valid[:, -n:].sum())
        return wire.encode({"teacher": self.teacher_fingerprint}, out)

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self._token.encode())

    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


def _handler_class(server: TeacherServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        server_version = "opd-jax-teacher/1"
        timeout = 120

        def log_message(self, format, *args):  # noqa: A002 -- the base class's signature
            if not server.quiet:
                super().log_message(format, *args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, drain: int = 0) -> None:
            server.count("errors")
            remaining = min(drain, _DRAIN_LIMIT)   # read what was sent, so the client sees us
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
            self._send(status, json.dumps({"error": message}).encode(), "application/json")

        def do_GET(self):
            if self.path.split("?")[0] != "/health":
                return self._error(404, f"no endpoint GET {self.path}; try GET /health or "
                                        "POST /score")
            self._send(200, json.dumps(server.health()).encode(), "application/json")

        def do_POST(self):
            length_header = self.headers.get("Content-Length")
            try:
                length = int(length_header) if length_header is not None else None
            except ValueError:
                return self._error(400, f"Content-Length {length_header!r} is not an integer")
            drain = max(0, length or 0)
            if self.path.split("?")[0] != "/score":
                return self._error(404, f"no endpoint POST {self.path}; try POST /score", drain)
            if not server.authorized(self.headers.get("Authorization")):
                return self._error(401, "missing or wrong token: send 'Authorization: Bearer "
                                        "<token>' with the server's shared secret", drain)
            if length is None or length < 0:
                return self._error(411, "a non-negative Content-Length is required")
            if length > server.max_request_bytes:
                return self._error(413, f"body of {length} bytes exceeds max_request_bytes="
                                        f"{server.max_request_bytes}; send fewer rows per "
                                        "request", drain)
            body = self.rfile.read(length)
            try:
                reply = server.handle_score(body)
            except RequestError as e:
                return self._error(e.status, str(e))
            except Exception as e:  # noqa: BLE001 -- nothing a request does may stop the server
                return self._error(500, f"internal error: {type(e).__name__}: {e}")
            server.count("requests")
            self._send(200, reply, "application/octet-stream")

    return Handler


def serve(server: TeacherServer) -> None:
    """Print the server's URL on one line and serve until Ctrl-C (or :meth:`shutdown`)."""
    print(f"opd-jax teacher serving at {server.url} (vocab_size {server.vocab_size}, k_max "
          f"{server.k_max}, teacher {server.teacher_fingerprint[:19]}...)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def server_from_config(cfg: Any, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                       token_env: str = DEFAULT_TOKEN_ENV, k_max: int = 64,
                       max_request_bytes: int = 64 << 20, **kwargs: Any) -> TeacherServer:
    """A :class:`TeacherServer` for the ``teacher:`` of run config ``cfg`` (a ``RunConfig``),
    loaded as training loads it (source, ``derive``, execution settings, ``precision``)."""
    from opd_jax.model.fingerprint import tokenizer_fingerprint
    from opd_jax.teacher.loading import load_teacher, teacher_fingerprint

    teacher = load_teacher(cfg)
    return TeacherServer(teacher.params, teacher.config,
                         tokenizer_fingerprint=tokenizer_fingerprint(teacher.tokenizer),
                         teacher_fingerprint=teacher_fingerprint(teacher),
                         host=host, port=port, token_env=token_env,
                         k_max=min(k_max, teacher.config.vocab_size),
                         max_request_bytes=max_request_bytes, **kwargs)


def serve_from_config(cfg: Any, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                      token_env: str = DEFAULT_TOKEN_ENV, k_max: int = 64,
                      max_request_bytes: int = 64 << 20) -> None:
    """Load ``cfg``'s teacher (:func:`server_from_config`) and serve it until Ctrl-C, printing
    one line with the URL when ready (``opd-jax serve-teacher CONFIG``)."""
    serve(server_from_config(cfg, host=host, port=port, token_env=token_env, k_max=k_max,
                             max_request_bytes=max_request_bytes))
