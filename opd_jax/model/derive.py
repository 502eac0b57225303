"""Students derived from a teacher: a subset of its layers, or a smaller random model on the same
vocabulary (SmolLM2-135M has no smaller sibling).

``derive_student(config, params, drop_layers=[10, 15, 20])`` keeps 27 of SmolLM2's 30 layers;
``keep_every=3`` keeps layers 0, 3, …, 27 (10 layers). Both return ``(config, params)``; the teacher's
arrays are not modified.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.model import decoder
from opd_jax.model.config import ModelConfig, param_shapes


def select_layers(n_layers: int, *, keep_layers: Sequence[int] | None = None,
                  keep_every: int | None = None, drop_layers: Sequence[int] | None = None
                  ) -> list[int]:
    """The sorted layer indices kept by exactly one of the three selectors."""
    given = [s is not None for s in (keep_layers, keep_every, drop_layers)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of keep_layers=, keep_every=, drop_layers=")
    if keep_every is not None:
        if int(keep_every) < 1:
            raise ValueError(f"keep_every must be >= 1, got {keep_every}")
        return list(range(0, n_layers, int(keep_every)))
    ids = [int(i) for i in (keep_layers if keep_layers is not None else drop_layers)]
    bad = sorted(i for i in ids if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"layer ids {bad} out of range for a {n_layers}-layer model "
                         f"(valid: 0..{n_layers - 1})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate layer ids in {ids}")
    kept = sorted(ids) if keep_layers is not None else [i for i in range(n_layers) if i not in ids]
    if not kept:
        raise ValueError("the student would have no layers left")
    return kept


def derive_student(config: ModelConfig, params: dict, *, keep_layers: Sequence[int] | None = None,
                   keep_every: int | None = None, drop_layers: Sequence[int] | None = None
                   ) -> tuple[ModelConfig, dict]:
    """A student made of a subset of the teacher's layers (embedding, final norm and unembedding
    are shared values; arrays are new)."""
    kept = select_layers(config.n_layers, keep_layers=keep_layers, keep_every=keep_every,
                         drop_layers=drop_layers)
    idx = np.asarray(kept)
    layers = {k: jnp.take(v, idx, axis=0) for k, v in params["layers"].items()}
    return config.replace(n_layers=len(kept)), {**params, "layers": layers}


def _pca_projection(embed_VxD: np.ndarray, d_out: int) -> np.ndarray:
    """``[D, d_out]`` top principal directions of the teacher embedding (uncentred)."""
    cov = embed_VxD.T.astype(np.float64) @ embed_VxD.astype(np.float64)
    vals, vecs = np.linalg.eigh(cov)
    return vecs[:, ::-1][:, :d_out].astype(np.float32)


def _init_params(config: ModelConfig, key: jax.Array, dtype) -> dict:
    """Like ``decoder.init_params`` (normal std 0.02, norms 1, biases 0) but from a single
    ``jax.random.normal`` draw cut into leaves: one small compile instead of one per leaf."""
    shapes = param_shapes(config)
    flat = [("", k, s) for k, s in shapes.items() if k != "layers"]
    flat += [("layers", k, s) for k, s in shapes["layers"].items()]
    random = [(g, k, s) for g, k, s in flat if "norm" not in k and "bias" not in k]
    total = sum(math.prod(s) for _, _, s in random)
    draw = np.asarray(0.02 * jax.random.normal(key, (total,), jnp.float32))
    out: dict = {"layers": {}}
    offset = 0
    for group, name, shape in flat:
        if "norm" in name:
            leaf = jnp.ones(shape, dtype)
        elif "bias" in name:
            leaf = jnp.zeros(shape, dtype)
        else:
            n = math.prod(shape)
            leaf = jnp.asarray(draw[offset:offset + n].reshape(shape), dtype)
            offset += n
        (out["layers"] if group else out)[name] = leaf
    return out


def random_student(config: ModelConfig, key: jax.Array, *, n_layers: int | None = None,
                   d_model: int | None = None, ffn_dim: int | None = None,
                   n_heads: int | None = None, n_kv_heads: int | None = None,
                   head_dim: int | None = None, teacher_params: dict | None = None,
                   dtype=jnp.float32, **overrides: Any) -> tuple[ModelConfig, dict]:
    """A smaller random model on the teacher's vocabulary.

    Unspecified sizes default to the teacher's; ``head_dim`` defaults to ``d_model // n_heads`` when
    either changes, ``n_kv_heads`` to ``gcd(n_heads, teacher n_kv_heads)``. With
    ``teacher_params``, the embedding (and an untied unembedding) is copied when ``d_model``
    matches, else projected onto the teacher embedding's top ``d_model`` principal directions.
    """
    heads = n_heads or config.n_heads
    width = d_model or config.d_model
    if head_dim is None:
        head_dim = config.head_dim if (d_model is None and n_heads is None) else width // heads
    if n_kv_heads is None:
        n_kv_heads = math.gcd(heads, config.n_kv_heads)
    student = config.replace(n_layers=n_layers or config.n_layers, d_model=width,
                             ffn_dim=ffn_dim or config.ffn_dim, n_heads=heads,
                             n_kv_heads=n_kv_heads, head_dim=head_dim, **overrides)
    if student.vocab_size != config.vocab_size:
        raise ValueError("a student must keep the teacher's vocabulary "
                         f"({config.vocab_size}), got vocab_size={student.vocab_size}")
    params = _init_params(student, key, jnp.dtype(dtype))
    if teacher_params is not None:
        t_embed = np.asarray(jax.device_get(teacher_params["embed"]), np.float32)
        proj = None if width == config.d_model else _pca_projection(t_embed, width)
        params["embed"] = jnp.asarray(t_embed if proj is None else t_embed @ proj, dtype)
        if not student.tie_embeddings:
            t_unembed = np.asarray(jax.device_get(decoder.unembed_matrix(teacher_params, config)),
                                   np.float32)
            params["unembed"] = jnp.asarray(t_unembed if proj is None else proj.T @ t_unembed,
                                            dtype)
    return student, params
