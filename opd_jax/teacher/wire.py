"""The teacher service's binary message format: a JSON header and raw little-endian arrays.

A message is::

    MAGIC (8 bytes, b"OPDJAXW1") | header length (4 bytes, little-endian uint32) |
    header (UTF-8 JSON: {"meta": {...}, "arrays": [{"name", "dtype", "shape"}, ...]}) |
    the arrays' raw C-order little-endian bytes, one after another in header order

Only ``int32``, ``float32`` and ``bool`` (one byte, 0 or 1) travel. :func:`decode` checks every
field before it builds an array and raises :class:`WireError` (a ``ValueError``) naming what is
wrong, so a server can answer a malformed request with a 400 instead of crashing.

>>> import numpy as np
>>> data = encode({"n": 2}, {"ids": np.arange(6, dtype=np.int32).reshape(2, 3)})
>>> meta, arrays = decode(data)
>>> meta, arrays["ids"].tolist()
({'n': 2}, [[0, 1, 2], [3, 4, 5]])
>>> bytes_per_scored_token(k=16, q=17)
273
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

__all__ = ["MAGIC", "VERSION", "DTYPES", "WireError", "encode", "decode", "encoded_size",
           "bytes_per_scored_token", "MAX_HEADER_BYTES", "MAX_ARRAYS", "MAX_NDIM"]

MAGIC = b"OPDJAXW1"
#: Protocol version (the digit in :data:`MAGIC`); reported by the server's ``/health``.
VERSION = 1
#: Wire dtype name -> numpy little-endian dtype.
DTYPES = {"int32": np.dtype("<i4"), "float32": np.dtype("<f4"), "bool": np.dtype("|b1")}
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 64
MAX_NDIM = 8
_PREFIX = len(MAGIC) + 4


class WireError(ValueError):
    """A message that does not follow the format (the text says which part and why)."""


def _dtype_name(x: np.ndarray) -> str:
    for name, dt in DTYPES.items():
        if x.dtype.kind == dt.kind and x.dtype.itemsize == dt.itemsize:
            return name
    raise WireError(f"dtype {x.dtype} cannot travel; cast to one of {sorted(DTYPES)} "
                    "(e.g. np.asarray(x, np.int32))")


def encode(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One message: ``meta`` (a JSON-serialisable dict) and named ``int32`` / ``float32`` /
    ``bool`` arrays (any other dtype is refused: cast first)."""
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a dict, got {type(meta).__name__}")
    specs, buffers = [], []
    for name, x in arrays.items():
        x = np.asarray(x)
        dtype = _dtype_name(x)
        specs.append({"name": str(name), "dtype": dtype, "shape": [int(s) for s in x.shape]})
        buffers.append(np.ascontiguousarray(x, DTYPES[dtype]).tobytes())
    try:
        header = json.dumps({"meta": meta, "arrays": specs}, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise WireError(f"meta is not JSON-serialisable without NaN/inf: {e}") from None
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}; keep meta small")
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *buffers])


def _reject_constant(name: str):
    raise WireError(f"header holds {name}, which JSON does not allow")


def _parse_header(data: bytes) -> tuple[dict, list, int]:
    if len(data) < _PREFIX:
        raise WireError(f"message of {len(data)} bytes is shorter than the {_PREFIX}-byte prefix "
                        "(magic + header length): truncated or not an opd-jax teacher message")
    if data[:len(MAGIC)] != MAGIC:
        raise WireError(f"bad magic {bytes(data[:len(MAGIC)])!r} (expected {MAGIC!r}): not an "
                        "opd-jax teacher message, or a client of another protocol version")
    (n_header,) = struct.unpack("<I", data[len(MAGIC):_PREFIX])
    if n_header > MAX_HEADER_BYTES:
        raise WireError(f"header length {n_header} exceeds the limit {MAX_HEADER_BYTES}")
    if _PREFIX + n_header > len(data):
        raise WireError(f"header length {n_header} runs past the end of the {len(data)}-byte "
                        "message: truncated")
    try:
        header = json.loads(bytes(data[_PREFIX:_PREFIX + n_header]).decode("utf-8"),
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"meta", "arrays"}:
        raise WireError('header must be a JSON object with exactly the keys "meta" and "arrays"')
    meta, specs = header["meta"], header["arrays"]
    if not isinstance(meta, dict):
        raise WireError(f'header "meta" must be an object, got {type(meta).__name__}')
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise WireError(f'header "arrays" must be a list of at most {MAX_ARRAYS} entries')
    return meta, specs, _PREFIX + n_header


def _check_spec(i: int, spec: Any, seen: set) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise WireError(f'arrays[{i}] must be an object with exactly "name", "dtype", "shape"')
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not name or name in seen:
        raise WireError(f"arrays[{i}] name {name!r} must be a non-empty string, unique")
    if dtype not in DTYPES:
        raise WireError(f"array {name!r} has dtype {dtype!r}; allowed: {sorted(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise WireError(f"array {name!r} shape {shape!r} must be a list of at most {MAX_NDIM} "
                        "non-negative integers")
    seen.add(name)
    return name, DTYPES[dtype], tuple(shape)


def decode(data: bytes, *, max_bytes: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, {name: array})`` of one message; :class:`WireError` on anything malformed (bad
    magic, truncated, header not JSON, unknown dtype, bad shape, body size not exactly the arrays'
    total, bool bytes other than 0/1, message longer than ``max_bytes``). Arrays are fresh
    native-endian copies."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    meta, specs, offset = _parse_header(data)
    seen: set = set()
    checked = [_check_spec(i, spec, seen) for i, spec in enumerate(specs)]
    need = sum(dt.itemsize * math.prod(shape) for _, dt, shape in checked)
    have = len(data) - offset
    if need != have:
        raise WireError(f"body holds {have} bytes but the header's arrays need {need}: "
                        + ("truncated" if have < need else "trailing bytes"))
    arrays = {}
    for name, dt, shape in checked:
        size = dt.itemsize * math.prod(shape)
        x = np.frombuffer(data, dtype=np.uint8 if dt.kind == "b" else dt, offset=offset,
                          count=math.prod(shape))
        if dt.kind == "b":
            if np.any(x > 1):
                raise WireError(f"bool array {name!r} holds bytes other than 0 and 1")
            x = x.astype(bool)
        arrays[name] = x.astype(dt.newbyteorder("="), copy=True).reshape(shape)
        offset += size
    return meta, arrays


def encoded_size(meta: dict, shapes: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """Bytes :func:`encode` would produce for ``{name: (shape, dtype name)}`` (no arrays built)."""
    specs = [{"name": n, "dtype": d, "shape": [int(s) for s in shape]}
             for n, (shape, d) in shapes.items()]
    header = json.dumps({"meta": meta, "arrays": specs}, allow_nan=False).encode()
    body = sum(DTYPES[d].itemsize * math.prod(shape) for shape, d in shapes.values())
    return _PREFIX + len(header) + body


def bytes_per_scored_token(k: int, q: int) -> int:
    """Array bytes one completion token costs on the wire, request and response together
    (headers and prompt columns excluded): request ``tokens`` int32 + ``valid`` bool +
    ``query_ids`` ``Q`` int32; response ``topk_ids`` / ``topk_logprobs`` ``K`` each (int32,
    float32), ``logsumexp`` float32, ``query_logprobs`` ``Q`` float32: ``8K + 8Q + 9``."""
    request = 4 + 1 + 4 * q
    response = 4 * k + 4 * k + 4 + 4 * q
    return request + response
