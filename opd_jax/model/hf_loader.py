"""Hugging Face folders (``config.json`` + ``*.safetensors``) to ``(ModelConfig, params)`` and back.

Supported architectures: ``LlamaForCausalLM`` (incl. ``rope_type == "llama3"`` scaling and SmolLM2's
tied embeddings), ``Qwen2ForCausalLM`` (q/k/v biases), ``Qwen3ForCausalLM`` (per-head q/k RMSNorm,
``head_dim`` from the config). Both the transformers 4.x (``rope_scaling`` + ``rope_theta``) and the
5.x (``rope_parameters``) config layouts are read.

Weights are memory-mapped, transposed/reshaped onto the parameter-tree contract of
``opd_jax.model.config`` one leaf at a time, cast to the requested dtype, and placed straight into
their sharding with ``jax.make_array_from_callback``: each device receives only its own shard and
the whole model never sits on one device. The HF ⇄ contract mapping is::

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
import numpy as np

from opd_jax.model.config import ModelConfig, RopeScaling, param_axes, param_shapes
from opd_jax.sharding import get_rules, make_mesh, named_sharding

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = ("float32", "bfloat16")

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


# --- HF layout <-> contract layout ---------------------------------------------------------------

def hf_shape(config: ModelConfig, leaf: str) -> tuple[int, ...]:
    c = config
    D, H, G, E, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size
    return {
        "embed": (V, D), "final_norm": (D,), "unembed": (V, D),
        "attn_norm": (D,), "mlp_norm": (D,), "q_norm": (E,), "k_norm": (E,),
        "q": (H * E, D), "k": (G * E, D), "v": (G * E, D), "o": (D, H * E),
        "q_bias": (H * E,), "k_bias": (G * E,), "v_bias": (G * E,),
        "gate": (F, D), "up": (F, D), "down": (D, F),
    }[leaf]


def hf_to_leaf(config: ModelConfig, leaf: str, w: np.ndarray) -> np.ndarray:
    """One HF tensor (one layer) in the contract's layout (no leading layer axis)."""
    c = config
    D, H, G, E = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    if leaf == "q":
        return w.T.reshape(D, H, E)
    if leaf in ("k", "v"):
        return w.T.reshape(D, G, E)
    if leaf == "o":
        return w.T.reshape(H, E, D)
    if leaf in ("gate", "up", "down", "unembed"):
        return w.T
    if leaf == "q_bias":
        return w.reshape(H, E)
    if leaf in ("k_bias", "v_bias"):
        return w.reshape(G, E)
    return w


def leaf_to_hf(config: ModelConfig, leaf: str, x: np.ndarray) -> np.ndarray:
    """Inverse of ``hf_to_leaf``."""
    c = config
    D, H, G, E = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    if leaf == "q":
        return x.reshape(D, H * E).T
    if leaf in ("k", "v"):
        return x.reshape(D, G * E).T
    if leaf == "o":
        return x.reshape(H * E, D).T
    if leaf in ("gate", "up", "down", "unembed"):
        return x.T
    if leaf in ("q_bias", "k_bias", "v_bias"):
        return x.reshape(-1)
    return x


def expected_hf_names(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Contract leaf -> the HF tensor names it is built from (one per layer for stacked leaves)."""
    shapes = param_shapes(config)
    out: dict[str, tuple[str, ...]] = {}
    for leaf in shapes:
        if leaf != "layers":
            out[leaf] = (TOP_NAMES[leaf],)
    for leaf in shapes["layers"]:
        out["layers/" + leaf] = tuple(LAYER_NAMES[leaf].format(i=i) for i in range(config.n_layers))
    return out


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


# --- placement ------------------------------------------------------------------------------------

def np_dtype(dtype: str | Any) -> np.dtype:
    """Numpy dtype for ``"float32"`` / ``"bfloat16"`` (bf16 via ml_dtypes, as JAX uses)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")
    return np.dtype(jax.numpy.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def default_mesh():
    """The single-device mesh ``(1, 1, 1)`` on the first local device."""
    return make_mesh((1, 1, 1), devices=[jax.local_devices()[0]])


def place_params(config: ModelConfig, leaf_fn: Callable[[str], np.ndarray], dtype="float32", *,
                 mesh=None, rules="fsdp") -> dict:
    """Build every contract leaf with ``leaf_fn(path)`` (``"embed"``, ``"layers/q"`` …, a host
    array in contract layout) and put it straight into its sharding, one leaf at a time.

    Each device's callback slices only its shard out of the host array, so no device ever holds
    more than its share.
    """
    mesh = default_mesh() if mesh is None else mesh
    rules = get_rules(rules)
    target = np_dtype(dtype)
    shapes, axes = param_shapes(config), param_axes(config)

    def place(path: str, shape: tuple[int, ...], leaf_axes) -> jax.Array:
        host = leaf_fn(path)
        if tuple(host.shape) != tuple(shape):
            raise ValueError(f"{path}: built shape {tuple(host.shape)} but the contract expects "
                             f"{tuple(shape)}")
        host = np.asarray(host).astype(target, copy=False)
        sharding = named_sharding(mesh, leaf_axes, rules, shape)
        return jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])

    params: dict[str, Any] = {}
    for key, shape in shapes.items():
        if key == "layers":
            params["layers"] = {name: place("layers/" + name, s, axes["layers"][name])
                                for name, s in shape.items()}
        else:
            params[key] = place(key, shape, axes[key])
    return params


# --- safetensors ----------------------------------------------------------------------------------

_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class SafetensorsFolder:
    """All tensors of a folder's ``*.safetensors`` (single file or sharded with an index), lazily.

    ``get(name)`` returns a memory-mapped numpy array (``safe_open(framework="numpy")``; BF16/F8,
    which numpy lacks, are memory-mapped directly with ml_dtypes).
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

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
        import ml_dtypes

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


def check_tensor_names(config: ModelConfig, found: Mapping[str, tuple[int, ...]],
                       expected: Mapping[str, tuple[str, ...]] | None = None,
                       shape_fn: Callable[[str, str], tuple[int, ...]] | None = None,
                       source: str = "checkpoint", ignore: Callable[[str], bool] = lambda n: False
                       ) -> None:
    """Refuse missing, unexpected or wrongly shaped tensors with a message naming each one."""
    expected = expected_hf_names(config) if expected is None else expected
    shape_fn = shape_fn or (lambda leaf, _name: hf_shape(config, leaf.split("/")[-1]))
    wanted = {n: leaf for leaf, names in expected.items() for n in names}
    missing = sorted(set(wanted) - set(found))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source} is missing tensor(s) {missing[:5]}{more} required by {config}")
    unexpected = sorted(n for n in set(found) - set(wanted) if not ignore(n))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{source} has unexpected tensor(s) {unexpected[:5]}{more}: the "
                         f"architecture {config.family!r} (as configured) has no such weights")
    for name, leaf in wanted.items():
        want = tuple(shape_fn(leaf, name))
        if tuple(found[name]) != want:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(found[name])}, expected "
                             f"{want} for {config}")


def _hf_ignored(config: ModelConfig) -> Callable[[str], bool]:
    def ignore(name: str) -> bool:
        if name.endswith(IGNORED_SUFFIXES):
            return True
        return config.tie_embeddings and name == "lm_head.weight"
    return ignore


def stacked_leaf_fn(config: ModelConfig, get: Callable[[str], np.ndarray], dtype="float32",
                    expected: Mapping[str, tuple[str, ...]] | None = None
                    ) -> Callable[[str], np.ndarray]:
    """``leaf_fn`` for ``place_params`` reading HF-layout tensors by name with ``get``; layers are
    stacked into one host buffer of the target dtype (one leaf in host memory at a time)."""
    expected = expected_hf_names(config) if expected is None else expected
    target = np_dtype(dtype)

    def leaf_fn(path: str) -> np.ndarray:
        leaf = path.split("/")[-1]
        names = expected[path]
        if path.startswith("layers/"):
            first = hf_to_leaf(config, leaf, get(names[0]))
            out = np.empty((len(names), *first.shape), target)
            out[0] = first
            for i, n in enumerate(names[1:], 1):
                out[i] = hf_to_leaf(config, leaf, get(n))
            return out
        return np.asarray(hf_to_leaf(config, leaf, get(names[0]))).astype(target)

    return leaf_fn


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
    check_tensor_names(config, found, source=str(folder), ignore=_hf_ignored(config))
    params = place_params(config, stacked_leaf_fn(config, st.get, dtype), dtype, mesh=mesh, rules=rules)
    return config, params
