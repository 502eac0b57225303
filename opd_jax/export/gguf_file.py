"""Write a student as a single ``.gguf`` (llama.cpp and the tools built on it) with ``gguf``.

The inverse of ``opd_jax.model.gguf_loader``: Hugging Face-layout tensors (``hf_loader``'s
``to_hf_state_dict``) renamed to llama.cpp's names, llama-family ``attn_q`` / ``attn_k`` rows
permuted for its interleaved RoPE (llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``)::

    permute(w, n) = w.reshape(n, 2, E // 2, D).swapaxes(1, 2).reshape(n * E, D)

Matrices are stored as F16 or Q8_0 (``gguf.quants.quantize``, rows a multiple of 32) or F32; norms
and biases stay F32 as llama.cpp's converter keeps them. Llama 3 RoPE scaling is written as the
``rope_freqs.weight`` factors the loader matches. The tokenizer goes in as GGUF metadata
(``tokenizer.ggml.*``: byte-level BPE tokens, merges, token types, special ids, chat template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from opd_jax.model.config import ModelConfig
from opd_jax.model.gguf_loader import LAYER_NAMES, ROPE_FREQS, TOP_NAMES
from opd_jax.model.hf_loader import LAYER_NAMES as HF_LAYER_NAMES
from opd_jax.model.hf_loader import TOP_NAMES as HF_TOP_NAMES
from opd_jax.model.hf_loader import to_hf_state_dict
from opd_jax.model.layers import rope_inv_freq
from opd_jax.model.loading import Model
from opd_jax.model.tokenizer import HFTokenizer, gguf_pre_name

__all__ = ["GGUF_TYPES", "write_gguf", "permute_qk"]

# our name -> (gguf.GGMLQuantizationType name, gguf.LlamaFileType name)
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``permute(w, n_heads)`` of a ``[n_heads * E, D]`` q/k weight (inverse of
    ``gguf_loader.unpermute_qk``)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_names(config: ModelConfig) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name."""
    out = {HF_TOP_NAMES[k]: v for k, v in TOP_NAMES.items()}
    for i in range(config.n_layers):
        out.update({HF_LAYER_NAMES[k].format(i=i): v.format(i=i) for k, v in LAYER_NAMES.items()})
    return out


def write_gguf(path: str | Path, model: Model, *, gguf_type: str = "f16") -> dict:
    """Write ``model`` (merged weights) to ``path``; returns ``{"files", "tokenizer", "bytes"}``."""
    import gguf  # third-party: only GGUF export / loading needs it

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r} is not one of {sorted(GGUF_TYPES)}")
    config, path = model.config, Path(path)
    qname, ftype = GGUF_TYPES[gguf_type]
    qtype = gguf.GGMLQuantizationType[qname]
    arch = config.family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("opd_jax student")
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_position)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType[ftype]))
    if config.rope_scaling is not None:
        s = config.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_orig_ctx_len(s.original_max_position)
    kind = _add_tokenizer(w, model.tokenizer, config)

    state = to_hf_state_dict(config, model.params)
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    names = _gguf_names(config)
    q_rows = {HF_LAYER_NAMES["q"].format(i=i): config.n_heads for i in range(config.n_layers)}
    k_rows = {HF_LAYER_NAMES["k"].format(i=i): config.n_kv_heads for i in range(config.n_layers)}
    total = 0
    for hf_name, x in state.items():
        if arch == "llama" and hf_name in q_rows:
            x = permute_qk(x, q_rows[hf_name])
        elif arch == "llama" and hf_name in k_rows:
            x = permute_qk(x, k_rows[hf_name])
        data, raw = _encode(x, qtype, gguf)
        w.add_tensor(names[hf_name], data, raw_dtype=raw)
        total += data.nbytes
    if config.rope_scaling is not None:
        base = rope_inv_freq(config.head_dim, config.rope_theta, None).astype(np.float64)
        scaled = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        w.add_tensor(ROPE_FREQS, (base / np.asarray(scaled, np.float64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"files": [path.name], "tokenizer": kind, "bytes": total, "gguf_type": gguf_type}


def _encode(x: np.ndarray, qtype, gguf) -> tuple[np.ndarray, Any]:
    """``(data, raw_dtype)`` for ``add_tensor``: 1-D tensors and Q8_0 matrices whose rows are not
    a multiple of the 32-wide block stay F32 (as llama.cpp's converter does)."""
    x = np.ascontiguousarray(x, np.float32)
    F32 = gguf.GGMLQuantizationType.F32
    if x.ndim < 2 or qtype == F32:
        return x, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return x.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if x.shape[-1] % block:
        return x, None
    return gguf.quants.quantize(x, qtype), qtype


def _add_tokenizer(w, tok: Any, config: ModelConfig) -> str | None:
    if not isinstance(tok, HFTokenizer):
        return None
    spec = json.loads(tok.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        return None
    tokens: list[str | None] = [None] * config.vocab_size
    for t, i in model["vocab"].items():
        if i < config.vocab_size:
            tokens[i] = t
    types = [1] * config.vocab_size   # NORMAL
    for i, added in tok.backend.get_added_tokens_decoder().items():
        if i < config.vocab_size:
            tokens[i] = added.content
            types[i] = 3 if added.special else 4   # CONTROL / USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", 5   # UNUSED: embedding rows past the vocabulary
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(gguf_pre_name(tok.backend) or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tid = tok.backend.token_to_id
    if tok.bos_token and tid(tok.bos_token) is not None:
        w.add_bos_token_id(tid(tok.bos_token))
    if tok.eos_token and tid(tok.eos_token) is not None:
        w.add_eos_token_id(tid(tok.eos_token))
    w.add_pad_token_id(int(tok.pad_id))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    return "gguf-bpe"
