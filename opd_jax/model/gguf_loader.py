"""GGUF files (llama.cpp) to ``(ModelConfig, params, tokenizer)`` through the ``gguf`` package.

Tensors are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0 and the k-quants the package implements) into the Hugging Face layout, then go through the same
contract mapping and per-leaf sharded placement as ``hf_loader`` (``opd_jax.model.placement``).

GGUF stores dims in ``ne`` order (fastest first): a tensor listed as ``[576, 49152]`` is the numpy /
HF ``[49152, 576]`` matrix. llama.cpp's converter also permutes the rows of ``attn_q`` / ``attn_k``
of *llama* models for its interleaved ("GPT-J") RoPE::

    permute(w, n) = w.reshape(n, 2, E // 2, D).swapaxes(1, 2).reshape(n * E, D)

Our decoder uses HF's "rotate_half" RoPE, so the loader applies the inverse
(``w.reshape(n, E // 2, 2, D).swapaxes(1, 2)``) with ``n = H`` for q and ``n = G`` for k. Qwen2/Qwen3
GGUFs use NEOX RoPE and are stored unpermuted.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from opd_jax.model.config import ModelConfig, RopeScaling
from opd_jax.model.gguf_reader import field, numpy_shape, open_gguf
from opd_jax.model.layers import rope_inv_freq
from opd_jax.model.placement import place_checkpoint, tensor_names
from opd_jax.model.tokenizer import tokenizer_from_gguf

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK = ("llama",)

LAYER_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}
TOP_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
             "unembed": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"


def expected_gguf_names(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    return tensor_names(config, TOP_NAMES, LAYER_NAMES)


def _rope_scaling(reader, arch: str, head_dim: int, theta: float, tensors: dict) -> RopeScaling | None:
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none") and ROPE_FREQS not in tensors:
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r} (only llama3-style "
                         f"'{ROPE_FREQS}' factors are implemented)")
    if ROPE_FREQS not in tensors:
        return None
    import gguf  # third-party, optional: only GGUF files need it

    t = tensors[ROPE_FREQS]
    factors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"{ROPE_FREQS} has {factors.shape} entries, expected {head_dim // 2}")
    orig = int(field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
    base = rope_inv_freq(head_dim, theta, None).astype(np.float64)
    want = base / factors
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        cand = RopeScaling(factor=float(factors.max()), low_freq_factor=low, high_freq_factor=high,
                           original_max_position=orig)
        if np.allclose(rope_inv_freq(head_dim, theta, cand), want, rtol=1e-4, atol=0):
            return cand
    raise ValueError(f"{ROPE_FREQS} does not match Llama 3 frequency scaling (factor "
                     f"{factors.max():g}, original context {orig}); unsupported rope scaling")


def config_from_gguf(reader) -> ModelConfig:
    """``ModelConfig`` from GGUF metadata (``general.architecture`` in llama / qwen2 / qwen3)."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str):
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    d_model = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(field(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(field(reader, f"{arch}.attention.key_length", d_model // n_heads))
    rope_dims = int(field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dims} < head_dim={head_dim}) "
                         "is not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    embd_shape = numpy_shape(tensors["token_embd.weight"])
    vocab = int(field(reader, f"{arch}.vocab_size", embd_shape[0]))
    theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
    return ModelConfig(
        family=ARCHITECTURES[arch],
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(need("feed_forward_length")),
        rope_theta=theta,
        # stored as float32: take its shortest decimal (9.99999974e-06 -> 1e-05)
        rms_eps=float(str(np.float32(need("attention.layer_norm_rms_epsilon")))),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        rope_scaling=_rope_scaling(reader, arch, head_dim, theta, tensors),
        max_position=int(field(reader, f"{arch}.context_length", 2048)),
    )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(w, n_heads)`` on a ``[n_heads * E, D]`` q/k weight."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *, mesh=None, rules="fsdp",
              with_tokenizer: bool = True) -> tuple[ModelConfig, dict, Any]:
    """Load a ``.gguf`` as ``(config, params, tokenizer)``; the tokenizer is ``None`` when the file
    has no vocabulary or ``with_tokenizer`` is False."""
    import gguf  # third-party, optional: only GGUF files need it

    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tensors = {t.name: t for t in reader.tensors}
    expected = expected_gguf_names(config)
    permuted = field(reader, "general.architecture") in PERMUTED_QK
    q_names = set(expected["layers/q"])
    k_names = set(expected["layers/k"])

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"tensor {name!r}: GGUF type {t.tensor_type.name} cannot be "
                             f"dequantized by the installed gguf package ({e})") from e
        w = np.asarray(w).reshape(numpy_shape(t))
        if permuted and name in q_names:
            w = unpermute_qk(w, config.n_heads)
        elif permuted and name in k_names:
            w = unpermute_qk(w, config.n_kv_heads)
        return w

    params = place_checkpoint(config, {n: numpy_shape(t) for n, t in tensors.items()}, get,
                              expected, dtype, mesh=mesh, rules=rules, source=str(path),
                              ignore=lambda n: n == ROPE_FREQS)
    tokenizer = None
    if with_tokenizer and "tokenizer.ggml.tokens" in reader.fields:
        tokenizer = tokenizer_from_gguf(reader)
    return config, params, tokenizer
