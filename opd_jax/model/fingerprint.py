"""Fingerprints that name a tokenizer and a model's weights: a served or cached teacher is refused
when it was made with another one (``opd_jax.teacher``)."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

__all__ = ["tokenizer_fingerprint", "params_fingerprint"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``"sha256:..."`` of a tokenizer's vocabulary (every id's token string, in id order), its
    size and its EOS / pad / BOS ids: two tokenizers with the same fingerprint map ids to the same
    tokens. Tokenizers without ``id_to_token`` hash their decoding of each id."""
    h = hashlib.sha256()
    size = int(tokenizer.vocab_size)
    h.update(repr((size, tuple(getattr(tokenizer, "eos_ids", ()) or ()),
                   getattr(tokenizer, "pad_id", None), getattr(tokenizer, "bos_id", None))).encode())
    name = getattr(tokenizer, "id_to_token", None)
    for i in range(size):
        tok = name(i) if name is not None else tokenizer.decode([i], skip_special=False)
        h.update(b"\x01" if tok is None else tok.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return "sha256:" + h.hexdigest()


def params_fingerprint(config: Any, params: Any) -> str:
    """``"sha256:..."`` of a model's config and every weight's path, dtype, shape and bytes."""
    h = hashlib.sha256(repr(config).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return "sha256:" + h.hexdigest()
