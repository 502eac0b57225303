"""Write a student as a Hugging Face folder, or its LoRA adapters in PEFT's format.

A folder holds what ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
read: ``config.json`` (``hf_loader.to_hf_config``), ``model.safetensors`` (sharded as
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above ``max_shard_bytes``),
``generation_config.json`` and the tokenizer the student was trained with (``tokenizer.json`` or
SentencePiece's ``tokenizer.model``, ``tokenizer_config.json`` with the chat template). Weights go
through ``hf_loader.to_hf_state_dict``, the inverse of the loader's mapping, so
``opd_jax.load_model(folder)`` reads the same numbers back.

PEFT adapter layout (peft ``tuners/lora/layer.py``: ``delta = (B @ A) * lora_alpha / r``, keys
``base_model.model.<module>.lora_{A,B}.weight``; ours is ``W + alpha/r · A B`` on ``x W``), per
layer ``i`` and projection ``p``::

    lora_A = a[i].reshape(in, r).T      # [r, in_features]
    lora_B = b[i].reshape(r, out).T     # [out_features, r]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from opd_jax.model.config import ModelConfig
from opd_jax.model.decoder import Lora
from opd_jax.model.hf_loader import LAYER_NAMES, to_hf_config, to_hf_state_dict
from opd_jax.model.loading import Model
from opd_jax.model.tokenizer import HFTokenizer, SentencePieceTokenizer

__all__ = ["DTYPES", "write_hf_folder", "write_peft_adapter", "write_tokenizer", "hf_dtype"]

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_dtype(params: Any) -> str:
    """The dtype name of the parameter tree's matrices (``float32`` / ``bfloat16``)."""
    return str(np.dtype(jax.tree.leaves(params)[0].dtype))


def write_hf_folder(out_dir: str | Path, model: Model, *, dtype: str = "float32",
                    max_shard_bytes: int = 2 * 1024**3,
                    metadata: Mapping[str, str] | None = None) -> dict:
    """Write ``model`` (merged weights) into the existing empty folder ``out_dir``; returns
    ``{"files": [...], "tokenizer": kind or None, "bytes": n}``."""
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    config = model.config
    state = to_hf_state_dict(config, model.params)
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # transformers re-ties it (save_pretrained drops it too)
    state = {k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in state.items()}
    total = sum(v.nbytes for v in state.values())
    shards = _shard(state, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}
    files = []
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata=meta)
        files.append("model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / name, metadata=meta)
            weight_map.update({k: name for k in shard})
            files.append(name)
        _write_json(out_dir / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.append("model.safetensors.index.json")
    tok = model.tokenizer
    special = _special_ids(tok)
    _write_json(out_dir / "config.json", {**to_hf_config(config), "torch_dtype": dtype,
                                          **special})
    _write_json(out_dir / "generation_config.json", {**special, "do_sample": False})
    files += ["config.json", "generation_config.json"]
    kind = write_tokenizer(out_dir, tok, config)
    if kind is not None:
        files += sorted(p.name for p in out_dir.iterdir() if p.name.startswith(("tokenizer",
                                                                                "special_")))
    return {"files": files, "tokenizer": kind, "bytes": total}


def _shard(state: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    if max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in state.items():
        if shards[-1] and size + x.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    return shards


def _special_ids(tok: Any) -> dict:
    if tok is None:
        return {}
    eos = list(getattr(tok, "eos_ids", ()) or ())
    out = {"pad_token_id": int(tok.pad_id)}
    if getattr(tok, "bos_id", None) is not None:
        out["bos_token_id"] = int(tok.bos_id)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def write_tokenizer(out_dir: Path, tok: Any, config: ModelConfig) -> str | None:
    """Write the tokenizer files transformers reads; returns the kind written, or None when the
    tokenizer has no Hugging Face form (opd_jax's byte tokenizer for random test models)."""
    if isinstance(tok, HFTokenizer):
        tok.backend.save(str(out_dir / "tokenizer.json"))
        names = {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                 "pad_token": tok.id_to_token(tok.pad_id)}
        cls = "PreTrainedTokenizerFast"
        kind = "tokenizers"
    elif isinstance(tok, SentencePieceTokenizer):
        (out_dir / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
        piece = lambda i: None if i is None or i < 0 else tok.sp.id_to_piece(int(i))
        names = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.sp.eos_id()),
                 "pad_token": piece(tok.pad_id), "unk_token": piece(tok.sp.unk_id())}
        cls = "LlamaTokenizer"
        kind = "sentencepiece"
    else:
        return None
    names = {k: v for k, v in names.items() if v is not None}
    tok_config = {"tokenizer_class": cls, **names, "add_bos_token": False,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": config.max_position}
    if getattr(tok, "chat_template", None):
        tok_config["chat_template"] = tok.chat_template
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / "special_tokens_map.json", names)
    return kind


def write_peft_adapter(out_dir: str | Path, config: ModelConfig, lora: Lora, *, alpha: float,
                       base_model: str, dtype: str = "float32") -> dict:
    """Write ``lora`` as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's LoRA
    format) for the base model at ``base_model``."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    rank = None
    state = {}
    for name, ab in lora.weights.items():
        a = np.asarray(jax.device_get(ab["a"]), np.float32)   # [L, *in, r]
        b = np.asarray(jax.device_get(ab["b"]), np.float32)   # [L, r, *out]
        rank = a.shape[-1]
        module = LAYER_NAMES[name].rsplit(".weight", 1)[0]
        for i in range(config.n_layers):
            prefix = "base_model.model." + module.format(i=i)
            state[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
                a[i].reshape(-1, rank).T.astype(DTYPES[dtype]))
            state[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
                b[i].reshape(rank, -1).T.astype(DTYPES[dtype]))
    if rank is None:
        raise ValueError("the LoRA tree is empty: nothing to export")
    save_file(state, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    _write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(LAYER_NAMES[n].split(".")[-2] for n in lora.weights),
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None})
    return {"files": ["adapter_model.safetensors", "adapter_config.json"]}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
