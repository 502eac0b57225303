"""The trainer's side of the teacher service (:mod:`opd_jax.teacher.server`): ``urllib`` only.

>>> client = TeacherClient("http://127.0.0.1:8471")                       # doctest: +SKIP
>>> client.check(vocab_size=49152, tokenizer_fingerprint=fp, k=16)         # doctest: +SKIP
>>> scores = client.score(tokens_BxT, valid_BxT, query_ids_BxNxQ, n=32, k=16)  # doctest: +SKIP

Connection errors, timeouts and 5xx answers are retried with jittered exponential backoff until
``max_wait_s`` have passed in total (a teacher that restarts is waited for), then
:class:`TeacherUnavailable`; 4xx answers are not retried (:class:`TeacherRequestError` with the
server's message; 409 is :class:`TeacherMismatch`). Every response is checked
(:class:`TeacherResponseError`). Large requests are split by rows.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request

import numpy as np

from opd_jax.teacher import wire
from opd_jax.teacher.scores import TeacherScores

__all__ = ["TeacherClient", "TeacherServiceError", "TeacherUnavailable", "TeacherRequestError",
           "TeacherMismatch", "TeacherResponseError", "DEFAULT_TOKEN_ENV"]

DEFAULT_TOKEN_ENV = "OPD_JAX_TEACHER_TOKEN"
#: Slack on "log-probs <= 0" (float32 rounding of ``z - logsumexp``).
LOGPROB_SLACK = 1e-4


class TeacherServiceError(RuntimeError):
    """Base of the teacher service errors."""


class TeacherUnavailable(TeacherServiceError):
    """The server did not answer (connection refused, timeouts, 5xx) for ``max_wait_s``."""


class TeacherRequestError(TeacherServiceError):
    """The server refused the request (a 4xx): ``status`` and its message."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TeacherMismatch(TeacherRequestError):
    """The served teacher does not fit the trainer (tokenizer, vocabulary, ``k`` too large)."""


class TeacherResponseError(TeacherServiceError):
    """A response that is not a well-formed scoring answer (dtypes, shapes, values)."""


class TeacherClient:
    """A client of one teacher server.

    Args:
      url: ``http://host:port`` of ``opd-jax serve-teacher``.
      token: the shared secret (default: environment variable ``token_env``, if set).
      timeout_s: seconds one HTTP attempt may take (the first request of a shape compiles).
      max_wait_s: total seconds to keep retrying an unanswered request.
      backoff_base_s, backoff_cap_s: retry delays ``min(cap, base * 2**attempt)``, jittered
        down by up to half.
      max_rows, max_request_bytes: split :meth:`score` requests above either (the byte limit
        also drops to the server's own after :meth:`check`).
      vocab_size, tokenizer_fingerprint: what the trainer's model uses (set by :meth:`check`
        too); every request carries them and the server refuses a mismatch.
    """

    def __init__(self, url: str, *, token: str | None = None, token_env: str = DEFAULT_TOKEN_ENV,
                 timeout_s: float = 300.0, max_wait_s: float = 300.0, backoff_base_s: float = 0.25,
                 backoff_cap_s: float = 10.0, max_rows: int = 256,
                 max_request_bytes: int = 32 << 20, vocab_size: int | None = None,
                 tokenizer_fingerprint: str | None = None):
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get(token_env) or None)
        self.timeout_s, self.max_wait_s = float(timeout_s), float(max_wait_s)
        self.backoff_base_s, self.backoff_cap_s = float(backoff_base_s), float(backoff_cap_s)
        self.max_rows, self.max_request_bytes = int(max_rows), int(max_request_bytes)
        self.vocab_size, self.tokenizer_fingerprint = vocab_size, tokenizer_fingerprint

    # -- transport ----------------------------------------------------------------------------

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        start, attempt, last = time.monotonic(), 0, "no attempt"
        while True:
            left = self.max_wait_s - (time.monotonic() - start)
            req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method="POST" if body is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=min(self.timeout_s, max(left, 0.5))) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                message = _error_text(e)
                if e.code < 500:
                    cls = TeacherMismatch if e.code == 409 else TeacherRequestError
                    raise cls(f"teacher at {self.url} refused {path} (HTTP {e.code}): {message}",
                              e.code) from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            attempt += 1
            elapsed = time.monotonic() - start
            delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)
            if elapsed + delay > self.max_wait_s:
                raise TeacherUnavailable(
                    f"teacher service at {self.url} did not answer {path} for {elapsed:.1f} s "
                    f"({attempt} attempts; last error: {last}). Start it with `opd-jax "
                    "serve-teacher CONFIG --port PORT` (CONFIG naming the teacher) on that host, "
                    "check the URL and token, or raise max_wait_s to wait longer")
            time.sleep(delay)

    def health(self) -> dict:
        """The server's ``/health`` JSON (retried like every request)."""
        try:
            data = json.loads(self._request("/health"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TeacherResponseError(f"{self.url}/health did not return JSON: {e}") from None
        if not isinstance(data, dict) or data.get("status") != "ok":
            raise TeacherResponseError(f"{self.url}/health returned {str(data)[:200]!r}")
        return data

    def check(self, vocab_size: int, tokenizer_fingerprint: str, k: int) -> dict:
        """:class:`TeacherMismatch` naming every difference between the served teacher and the
        trainer's ``vocab_size`` / tokenizer / needed ``k``; else remember them for
        :meth:`score` and return the health JSON."""
        h = self.health()
        problems = []
        if h.get("tokenizer") != tokenizer_fingerprint:
            problems.append(f"tokenizer: served {h.get('tokenizer')}, trainer "
                            f"{tokenizer_fingerprint}")
        if h.get("vocab_size") != vocab_size:
            problems.append(f"vocab_size: served {h.get('vocab_size')}, trainer {vocab_size}")
        if not isinstance(h.get("k_max"), int) or h["k_max"] < k:
            problems.append(f"k: trainer needs top-{k}, server k_max={h.get('k_max')} (restart "
                            "it with a larger k_max)")
        if problems:
            raise TeacherMismatch(f"teacher at {self.url} does not fit this run: "
                                  + "; ".join(problems))
        self.vocab_size, self.tokenizer_fingerprint = int(vocab_size), tokenizer_fingerprint
        if isinstance(h.get("max_request_bytes"), int):
            self.max_request_bytes = min(self.max_request_bytes, h["max_request_bytes"])
        return h

    # -- scoring ------------------------------------------------------------------------------

    def score(self, tokens_BxT, valid_BxT, query_ids_BxNxQ, *, n: int, k: int,
              temperature: float = 1.0) -> TeacherScores:
        """The teacher's :class:`TeacherScores` (numpy arrays, ``[B, n, ...]``) of the last ``n``
        columns of ``[left-padded prompt | right-padded completion]`` rows, as the in-process
        :func:`~opd_jax.teacher.scoring.score_completions` computes them."""
        if self.vocab_size is None or self.tokenizer_fingerprint is None:
            raise ValueError("the client does not know the trainer's tokenizer: call "
                             "check(vocab_size, tokenizer_fingerprint, k) first, or pass "
                             "vocab_size= and tokenizer_fingerprint= to TeacherClient")
        tokens = np.asarray(tokens_BxT, np.int32)
        valid = np.asarray(valid_BxT, bool)
        query = np.asarray(query_ids_BxNxQ, np.int32)
        if tokens.ndim != 2 or valid.shape != tokens.shape or query.ndim != 3 \
                or query.shape[:2] != (tokens.shape[0], n) or not 0 < n < tokens.shape[1] \
                or tokens.shape[0] < 1:
            raise ValueError(f"shapes tokens {tokens.shape}, valid {valid.shape}, query_ids "
                             f"{query.shape} with n={n}: need [B, T], [B, T], [B, n, Q], B >= 1, "
                             "0 < n < T")
        B, T = tokens.shape
        Q = query.shape[2]
        meta = {"n": int(n), "k": int(k), "temperature": float(temperature),
                "vocab_size": self.vocab_size, "tokenizer": self.tokenizer_fingerprint}
        row_bytes = max(T * 5 + n * Q * 4, n * (8 * k + 4 + 4 * Q))
        step = max(1, min(self.max_rows, (self.max_request_bytes - 4096) // row_bytes))
        parts = [self._score_rows(meta, tokens[a:a + step], valid[a:a + step],
                                  query[a:a + step]) for a in range(0, B, step)]
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        q_BxNxQ = np.where(valid[:, T - n:, None], query, 0).astype(np.int32)
        return TeacherScores(out["topk_ids"], out["topk_logprobs"], out["logsumexp"], q_BxNxQ,
                             out["query_logprobs"])

    def _score_rows(self, meta: dict, tokens, valid, query) -> dict[str, np.ndarray]:
        body = wire.encode(meta, {"tokens": tokens, "valid": valid, "query_ids": query})
        data = self._request("/score", body)
        try:
            _, arrays = wire.decode(data)
        except wire.WireError as e:
            raise TeacherResponseError(f"teacher at {self.url} sent a malformed body: {e}") from None
        B, n, Q = query.shape
        check_response(arrays, B=B, n=n, k=meta["k"], q=Q, vocab_size=meta["vocab_size"],
                       mask_BxN=valid[:, valid.shape[1] - n:])
        return arrays


def check_response(arrays: dict, *, B: int, n: int, k: int, q: int, vocab_size: int,
                   mask_BxN: np.ndarray) -> None:
    """:class:`TeacherResponseError` unless ``arrays`` is a scoring answer for ``B`` rows: the
    four arrays with their dtypes and shapes, ids in ``[0, V)``, finite log-probs ``<= 0`` and
    top-k sorted at valid positions, a finite logsumexp there."""
    want = {"topk_ids": ("int32", (B, n, k)), "topk_logprobs": ("float32", (B, n, k)),
            "logsumexp": ("float32", (B, n)), "query_logprobs": ("float32", (B, n, q))}
    if set(arrays) != set(want):
        raise TeacherResponseError(f"response arrays {sorted(arrays)}; expected {sorted(want)}")
    for name, (dtype, shape) in want.items():
        x = arrays[name]
        if x.dtype != np.dtype(dtype) or x.shape != shape:
            raise TeacherResponseError(f"response {name} is {x.dtype} {list(x.shape)}; expected "
                                       f"{dtype} {list(shape)}")
    m = np.asarray(mask_BxN, bool)
    ids = arrays["topk_ids"][m]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise TeacherResponseError(f"response topk_ids outside [0, {vocab_size})")
    for name in ("topk_logprobs", "query_logprobs"):
        x = arrays[name][m]
        if not np.all(np.isfinite(x)) or np.any(x > LOGPROB_SLACK):
            raise TeacherResponseError(f"response {name} holds non-finite or positive "
                                       "log-probs at valid positions")
    if np.any(np.diff(arrays["topk_logprobs"][m], axis=-1) > LOGPROB_SLACK):
        raise TeacherResponseError("response topk_logprobs are not sorted, most probable first")
    if not np.all(np.isfinite(arrays["logsumexp"][m])):
        raise TeacherResponseError("response logsumexp is not finite at valid positions")


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read()
    except (OSError, http.client.HTTPException):
        return str(e.reason)
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace") or str(e.reason)
