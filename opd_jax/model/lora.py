"""LoRA adapters for the decoder's projections (Hu et al. 2021).

``y = x W + (alpha / r) · (x A) B`` with ``A`` Gaussian and ``B`` zero at init, so a fresh adapter
leaves the model unchanged. ``forward(..., lora=None)`` runs the base weights alone: OPSD's fixed
teacher is the same parameters with the adapters switched off.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from opd_jax.model.config import ModelConfig, param_axes, param_shapes
from opd_jax.model.decoder import PROJECTIONS, Lora

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _in_out_dims(config: ModelConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = param_shapes(config)["layers"][name][1:]
    n_in = len(PROJECTIONS[name][1])
    return shape[:n_in], shape[n_in:]


def init_lora(config: ModelConfig, key: jax.Array, *, rank: int, alpha: float,
              targets: Sequence[str] = DEFAULT_TARGETS, dtype=jnp.float32) -> Lora:
    """Adapters on ``targets`` with ``A ~ N(0, 1/fan_in)`` and ``B = 0`` (stacked over layers)."""
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; valid: {sorted(PROJECTIONS)}")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    weights = {}
    for name, k in zip(targets, jax.random.split(key, len(targets))):
        ins, outs = _in_out_dims(config, name)
        fan_in = 1
        for d in ins:
            fan_in *= d
        a = jax.random.normal(k, (config.n_layers, *ins, rank), jnp.float32) / jnp.sqrt(fan_in)
        weights[name] = {"a": a.astype(dtype),
                         "b": jnp.zeros((config.n_layers, rank, *outs), dtype)}
    return Lora(weights=weights, scale=float(alpha) / rank)


def lora_axes(config: ModelConfig, lora: Lora) -> dict:
    """Logical axes of each adapter leaf (``lora_rank`` for the rank dim)."""
    axes = param_axes(config)["layers"]
    out = {}
    for name in lora.weights:
        full = axes[name][1:]
        n_in = len(PROJECTIONS[name][1])
        out[name] = {"a": ("layers", *full[:n_in], "lora_rank"),
                     "b": ("layers", "lora_rank", *full[n_in:])}
    return out


def merge_lora(params: dict, lora: Lora) -> dict:
    """Fold adapters into the base weights: ``W + scale · A B`` (for export / fast inference)."""
    layers = dict(params["layers"])
    for name, ab in lora.weights.items():
        _, w_in, w_out = PROJECTIONS[name]
        delta = jnp.einsum(f"l{w_in}r,lr{w_out}->l{w_in}{w_out}", ab["a"].astype(jnp.float32),
                           ab["b"].astype(jnp.float32))
        layers[name] = (layers[name].astype(jnp.float32) + lora.scale * delta).astype(layers[name].dtype)
    return {**params, "layers": layers}
