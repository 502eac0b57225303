"""tunix Qwen3 (dense) <-> opd_jax: config and parameter conversion both ways."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.integrations.tunix.extra import require_tunix
from opd_jax.model.config import ModelConfig
from opd_jax.model.loading import Model

#: The RoPE base tunix 0.1.7's Qwen3 / Llama3 attention uses, whatever its config says.
TUNIX_ROPE_THETA = 1_000_000.0


# opd_jax layer leaf -> path inside a tunix Qwen3 DecoderLayer.
_QWEN3_LAYER = {
    "attn_norm": ("input_layernorm", "w"),
    "q": ("attn", "q_proj", "w"),
    "k": ("attn", "k_proj", "w"),
    "v": ("attn", "v_proj", "w"),
    "o": ("attn", "o_proj", "w"),
    "q_norm": ("attn", "q_norm", "w"),
    "k_norm": ("attn", "k_norm", "w"),
    "mlp_norm": ("post_attention_layernorm", "w"),
    "gate": ("mlp", "gate_proj", "kernel"),
    "up": ("mlp", "up_proj", "kernel"),
    "down": ("mlp", "down_proj", "kernel"),
}


def _get(obj: Any, path: tuple[str, ...]) -> jax.Array:
    for name in path:
        obj = getattr(obj, name)
    return obj[...]


def qwen3_config_from_tunix(tunix_config: Any, *, rope_theta: str | float = "tunix"
                            ) -> ModelConfig:
    """opd_jax ``ModelConfig`` of a tunix Qwen3 ``ModelConfig`` (dense models only).

    ``rope_theta``: ``"tunix"`` (1e6, what tunix 0.1.7 computes), ``"config"`` (the tunix
    config's value, what the checkpoint was trained with) or a number.
    """
    c = tunix_config
    if getattr(c, "num_experts", None):
        raise ValueError("Qwen3 mixture-of-experts models are not supported by opd_jax's decoder "
                         f"(num_experts={c.num_experts})")
    if rope_theta == "tunix":
        theta = TUNIX_ROPE_THETA
    elif rope_theta == "config":
        theta = float(c.rope_theta)
    elif isinstance(rope_theta, (int, float)) and not isinstance(rope_theta, bool):
        theta = float(rope_theta)
    else:
        raise ValueError(f'rope_theta must be "tunix", "config" or a number, got {rope_theta!r}')
    return ModelConfig(family="qwen3", vocab_size=c.vocab_size, d_model=c.embed_dim,
                       n_layers=c.num_layers, n_heads=c.num_heads, n_kv_heads=c.num_kv_heads,
                       head_dim=c.head_dim, ffn_dim=c.hidden_dim, rope_theta=theta,
                       rms_eps=float(c.norm_eps), tie_embeddings=bool(c.use_tied_embedding),
                       qkv_bias=False, qk_norm=True, max_position=40960)


def params_from_tunix_qwen3(model: Any, config: ModelConfig, dtype=None) -> dict:
    """The opd_jax parameter tree (layers stacked on a leading axis) of a tunix ``Qwen3``."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    layers = {name: cast(jnp.stack([_get(layer, path) for layer in model.layers]))
              for name, path in _QWEN3_LAYER.items()}
    params = {"embed": cast(model.embedder.input_embedding[...]), "layers": layers,
              "final_norm": cast(model.final_norm.w[...])}
    if not config.tie_embeddings:
        params["unembed"] = cast(model.lm_head.w[...])
    return params


def from_tunix_qwen3(model: Any, tokenizer: Any = None, *, rope_theta: str | float = "tunix",
                     dtype=None):
    """An opd_jax :class:`~opd_jax.model.loading.Model` with a tunix ``Qwen3``'s weights.

    Use it as ``teacher=`` / the student of ``opd_jax.train.run.run(cfg, models=...)``, with
    ``opd_jax.generate`` or the chunked losses. ``tokenizer``: an opd_jax tokenizer (e.g.
    ``opd_jax.load_tokenizer(hf_folder)``), needed only for text in / out. ``rope_theta``: see
    :func:`qwen3_config_from_tunix` (default reproduces tunix's logits).
    """
    config = qwen3_config_from_tunix(model.config, rope_theta=rope_theta)
    return Model(config, params_from_tunix_qwen3(model, config, dtype), tokenizer)


def to_tunix_qwen3(config: ModelConfig, params: dict, *, dtype=jnp.float32) -> Any:
    """A tunix ``Qwen3`` module holding an opd_jax Qwen3 parameter tree (e.g. a distilled student).

    tunix 0.1.7 computes RoPE with base 1e6 whatever its config says: a model with another
    ``rope_theta`` converts, with a warning, but tunix will not reproduce opd_jax's logits.
    """
    qwen3 = require_tunix("tunix.models.qwen3.model")
    if not config.qk_norm or config.qkv_bias or config.rope_scaling is not None:
        raise ValueError("to_tunix_qwen3 needs a Qwen3 architecture (qk_norm, no qkv bias, no "
                         f"rope scaling); got {config}")
    if config.rope_theta != TUNIX_ROPE_THETA:
        warnings.warn(f"rope_theta={config.rope_theta:g}: tunix 0.1.7's Qwen3 always uses "
                      f"{TUNIX_ROPE_THETA:g}, so its logits will differ from opd_jax's",
                      stacklevel=2)
    tcfg = qwen3.ModelConfig(num_layers=config.n_layers, vocab_size=config.vocab_size,
                             embed_dim=config.d_model, hidden_dim=config.ffn_dim,
                             num_heads=config.n_heads, head_dim=config.head_dim,
                             num_kv_heads=config.n_kv_heads, rope_theta=int(config.rope_theta),
                             norm_eps=config.rms_eps, use_tied_embedding=config.tie_embeddings,
                             dtype=dtype, param_dtype=dtype)
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3(tcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    layers = {}
    for i in range(config.n_layers):
        layer: dict = {}
        for name, path in _QWEN3_LAYER.items():
            node = layer
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = cast(params["layers"][name][i])
        layers[i] = layer
    pure = {"embedder": {"input_embedding": cast(params["embed"])}, "layers": layers,
            "final_norm": {"w": cast(params["final_norm"])}}
    if not config.tie_embeddings:
        pure["lm_head"] = {"w": cast(params["unembed"])}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
