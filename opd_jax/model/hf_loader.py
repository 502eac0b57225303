"""Hugging Face folders (``config.json`` + ``*.safetensors``) to ``(ModelConfig, params)`` and back.

Supported architectures: ``LlamaForCausalLM`` (incl. ``rope_type == "llama3"`` scaling and SmolLM2's
tied embeddings), ``Qwen2ForCausalLM`` (q/k/v biases), ``Qwen3ForCausalLM`` (per-head q/k RMSNorm,
``head_dim`` from the config). Both the transformers 4.x (``rope_scaling`` + ``rope_theta``) and the
5.x (``rope_parameters``) config layouts are read.

Weights are memory-mapped, transposed/reshaped onto the parameter-tree contract of
``opd_jax.model.config`` one leaf at a time, cast to the requested dtype, and placed straight into
their sharding with ``jax.make_array_from_callback`` (``opd_jax.model.placement``, shared with
``gguf_loader``): each device receives only its own shard and the whole model never sits on one
device. The HF ⇄ contract mapping (``placement.hf_to_leaf``) is::

    q = q_proj.weight.T.reshape(D, H, E)      q_bias = q_proj.bias.reshape(H, E)
    k = k_proj.weight.T.reshape(D, G, E)      (same for v)
    o = o_proj.weight.T.reshape(H, E, D)
    gate, up, down = {gate,up,down}_proj.weight.T
    unembed = lm_head.weight.T                (untied only)

``to_hf_state_dict`` is the inverse (used to run transformers on identical weights).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from opd_jax.model.config import ModelConfig, RopeScaling
from opd_jax.model.placement import leaf_to_hf, place_checkpoint, tensor_names

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Per-layer leaves: contract name -> HF tensor name (``{i}`` = layer index).
LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
             "unembed": "lm_head.weight"}
# Tensors some checkpoints carry that hold nothing we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --- config -------------------------------------------------------------------------------------

def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """``ModelConfig`` from a parsed HF ``config.json``; ``ValueError`` for anything unsupported."""
    archs = cfg.get("architectures") or []
    family = None
    for a in archs:
        family = ARCHITECTURES.get(a)
        if family:
            break
    if family is None:
        family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(cfg.get("model_type"))
    if family is None:
        raise ValueError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
            f"{sorted(ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} (only 'silu' is implemented)")
    if cfg.get("mlp_bias"):
        raise ValueError("unsupported config: mlp_bias=True (the decoder has no MLP biases)")
    attention_bias = bool(cfg.get("attention_bias", False))
    if family == "llama" and attention_bias:
        raise ValueError("unsupported config: Llama attention_bias=True (o_proj bias not implemented)")
    if family == "qwen3" and attention_bias:
        raise ValueError("unsupported config: Qwen3 attention_bias=True")
    if cfg.get("use_sliding_window"):
        raise ValueError("unsupported config: use_sliding_window=True (only full attention)")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported layer_types {sorted(set(layer_types))} (only full_attention)")

    rope = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    if legacy:
        rope.update(legacy)
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", None):
        raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("unsupported config: partial_rotary_factor != 1")

    d_model = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or d_model // n_heads
    return ModelConfig(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        ffn_dim=int(cfg["intermediate_size"]),
        rope_theta=rope_theta,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
        max_position=int(cfg.get("max_position_embeddings", 2048)),
    )


def to_hf_config(config: ModelConfig) -> dict:
    """A transformers ``config.json`` dict for ``config`` (both 4.x and 5.x rope keys)."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[config.family]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    out = {
        "architectures": [arch], "model_type": config.family,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta, "rope_parameters": rope,
        "rope_scaling": rope if config.rope_scaling is not None else None,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position, "attention_bias": False,
    }
    if config.family == "qwen2":
        out["use_sliding_window"] = False
    return out


# --- HF tensor names ----------------------------------------------------------------------------

def expected_hf_names(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Contract leaf -> the HF tensor names it is built from (one per layer for stacked leaves)."""
    return tensor_names(config, TOP_NAMES, LAYER_NAMES)


def to_hf_state_dict(config: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params as a HF Llama/Qwen2/Qwen3 ``state_dict`` of float32 numpy arrays (writable,
    C-contiguous copies).

    ``{k: torch.from_numpy(v) for k, v in ...}`` loads into ``LlamaForCausalLM`` & co. built from
    ``to_hf_config(config)``. Tied models also get ``lm_head.weight`` (= the embedding), which
    transformers expects to find or re-ties.
    """
    out: dict[str, np.ndarray] = {}
    for leaf, names in expected_hf_names(config).items():
        if leaf.startswith("layers/"):
            name = leaf.split("/", 1)[1]
            stacked = np.asarray(jax.device_get(params["layers"][name]), np.float32)
            for i, hf_name in enumerate(names):
                out[hf_name] = np.array(leaf_to_hf(config, name, stacked[i]), order="C")
        else:
            x = np.asarray(jax.device_get(params[leaf]), np.float32)
            out[names[0]] = np.array(leaf_to_hf(config, leaf, x), order="C")
    if config.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    return out


# --- safetensors ----------------------------------------------------------------------------------

_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class SafetensorsFolder:
    """All tensors of a folder's ``*.safetensors`` (single file or sharded with an index), lazily.

    ``get(name)`` returns a memory-mapped numpy array (``safe_open(framework="numpy")``; BF16/F8,
    which numpy lacks, are memory-mapped directly with ml_dtypes).
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open  # third-party: imported when a HF folder is read

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise ValueError(f"{index} lists shard files that are missing: {missing}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise ValueError(f"no *.safetensors files in {self.folder}")
        self._where: dict[str, str] = {}
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._handles = {}
        for f in files:
            try:
                h = safe_open(str(self.folder / f), framework="numpy")
            except Exception as e:  # truncated / corrupt header
                raise ValueError(f"{self.folder / f} is not a readable safetensors file "
                                 f"({type(e).__name__}: {e})") from e
            self._handles[f] = h
            for k in h.keys():
                if k in self._where:
                    raise ValueError(f"tensor {k!r} appears in both {self._where[k]} and {f}")
                sl = h.get_slice(k)
                self._where[k] = f
                self._info[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        self._headers: dict[str, tuple[int, dict]] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def get(self, name: str) -> np.ndarray:
        file = self._where[name]
        dtype, shape = self._info[name]
        try:
            if dtype in _RAW_DTYPES:
                return self._raw(file, name, dtype, shape)
            return self._handles[file].get_tensor(name)
        except ValueError:
            raise
        except Exception as e:  # data region truncated / unreadable
            raise ValueError(f"{self.folder / file}: cannot read tensor {name!r} "
                             f"({type(e).__name__}: {e})") from e

    def _raw(self, file: str, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if file not in self._headers:
            with open(self.folder / file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
        base, header = self._headers[file]
        start, end = header[name]["data_offsets"]
        np_dt = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[dtype]))
        count = (end - start) // np_dt.itemsize
        if count != math.prod(shape):
            raise ValueError(f"{file}: tensor {name!r} has {count} elements, header shape {shape}")
        return np.memmap(self.folder / file, dtype=np_dt, mode="r", offset=base + start,
                         shape=shape)


def _hf_ignored(config: ModelConfig) -> Callable[[str], bool]:
    def ignore(name: str) -> bool:
        if name.endswith(IGNORED_SUFFIXES):
            return True
        return config.tie_embeddings and name == "lm_head.weight"
    return ignore


def read_hf_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ValueError(f"{folder} has no config.json (not a Hugging Face model folder)")
    return config_from_hf(json.loads(path.read_text()))


def load_hf(folder: str | os.PathLike, dtype: str = "float32", *, mesh=None, rules="fsdp"
            ) -> tuple[ModelConfig, dict]:
    """Load a HF folder as ``(config, params)`` with params placed on ``mesh`` (default 1 device)."""
    config = read_hf_config(folder)
    st = SafetensorsFolder(folder)
    found = {n: st.shape(n) for n in st.names()}
    params = place_checkpoint(config, found, st.get, expected_hf_names(config), dtype, mesh=mesh,
                              rules=rules, source=str(folder), ignore=_hf_ignored(config))
    return config, params
