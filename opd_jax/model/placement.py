"""The Hugging Face tensor layout mapped onto the parameter-tree contract, and per-leaf sharded
placement: what ``hf_loader`` and ``gguf_loader`` (whose tensors are dequantized into the HF
layout) share.

``check_tensor_names`` refuses a checkpoint whose tensors do not match the config;
``stacked_leaf_fn`` builds each contract leaf (layers stacked) from tensors read by name; and
``place_params`` puts each leaf straight into its sharding with ``jax.make_array_from_callback``, so
each device receives only its own shard. See ``hf_loader``'s module docstring for the mapping.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from opd_jax.model.config import ModelConfig, param_axes, param_shapes
from opd_jax.sharding import get_rules, make_mesh, named_sharding

__all__ = ["DTYPES", "np_dtype", "default_mesh", "place_params", "hf_shape", "hf_to_leaf",
           "leaf_to_hf", "tensor_names", "check_tensor_names", "stacked_leaf_fn", "place_checkpoint"]

DTYPES = ("float32", "bfloat16")


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



def tensor_names(config: ModelConfig, top_names: Mapping[str, str], layer_names: Mapping[str, str]
                 ) -> dict[str, tuple[str, ...]]:
    """Contract leaf (``"embed"``, ``"layers/q"`` …) -> the checkpoint tensor names it is built from
    (one per layer for stacked leaves; ``{i}`` in ``layer_names`` is the layer index)."""
    shapes = param_shapes(config)
    out = {leaf: (top_names[leaf],) for leaf in shapes if leaf != "layers"}
    for leaf in shapes["layers"]:
        out["layers/" + leaf] = tuple(layer_names[leaf].format(i=i) for i in range(config.n_layers))
    return out


# --- checks and placement -------------------------------------------------------------------------

def check_tensor_names(config: ModelConfig, found: Mapping[str, tuple[int, ...]],
                       expected: Mapping[str, tuple[str, ...]], *,
                       shape_fn: Callable[[str, str], tuple[int, ...]] | None = None,
                       source: str = "checkpoint", ignore: Callable[[str], bool] = lambda n: False
                       ) -> None:
    """Refuse missing, unexpected or wrongly shaped tensors with a message naming each one.

    ``found``: tensor name -> shape; ``expected``: contract leaf -> tensor names (see
    ``hf_loader.expected_hf_names``); ``shape_fn(leaf, name)``: the wanted shape (default: the HF
    layout's, :func:`hf_shape`); ``ignore(name)``: extra tensors to tolerate.
    """
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


def stacked_leaf_fn(config: ModelConfig, get: Callable[[str], np.ndarray], dtype: str,
                    expected: Mapping[str, tuple[str, ...]]) -> Callable[[str], np.ndarray]:
    """``leaf_fn`` for :func:`place_params` reading HF-layout tensors by name with ``get``
    (``expected``: contract leaf -> tensor names); layers are stacked into one host buffer of the
    target dtype (one leaf in host memory at a time)."""
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


def place_checkpoint(config: ModelConfig, found: Mapping[str, tuple[int, ...]],
                     get: Callable[[str], np.ndarray], expected: Mapping[str, tuple[str, ...]],
                     dtype="float32", *, mesh=None, rules="fsdp", source: str = "checkpoint",
                     ignore: Callable[[str], bool] = lambda n: False) -> dict:
    """:func:`check_tensor_names` on ``found`` (name -> shape), then :func:`place_params` with the
    HF-layout tensors ``get(name)`` stacked per leaf: the params of a checkpoint."""
    check_tensor_names(config, found, expected, source=source, ignore=ignore)
    return place_params(config, stacked_leaf_fn(config, get, dtype, expected), dtype, mesh=mesh,
                        rules=rules)
