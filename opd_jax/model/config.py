"""Model configuration and the parameter-tree contract shared by every loader and the decoder.

Parameter tree (layers stacked on a leading ``L`` axis, run with ``lax.scan``)::

    params = {
      "embed":      [V, D]                       ("vocab", "embed")
      "layers": {
        "attn_norm": [L, D]                      ("layers", "embed")
        "q":         [L, D, H, E]                ("layers", "embed", "heads", "head_dim")
        "k":         [L, D, G, E]                ("layers", "embed", "kv_heads", "head_dim")
        "v":         [L, D, G, E]                ("layers", "embed", "kv_heads", "head_dim")
        "o":         [L, H, E, D]                ("layers", "heads", "head_dim", "embed")
        "q_bias":    [L, H, E]   (qkv_bias only) ("layers", "heads", "head_dim")
        "k_bias":    [L, G, E]   (qkv_bias only) ("layers", "kv_heads", "head_dim")
        "v_bias":    [L, G, E]   (qkv_bias only) ("layers", "kv_heads", "head_dim")
        "q_norm":    [L, E]      (qk_norm only)  ("layers", "head_dim")
        "k_norm":    [L, E]      (qk_norm only)  ("layers", "head_dim")
        "mlp_norm":  [L, D]                      ("layers", "embed")
        "gate":      [L, D, F]                   ("layers", "embed", "mlp")
        "up":        [L, D, F]                   ("layers", "embed", "mlp")
        "down":      [L, F, D]                   ("layers", "mlp", "embed")
      },
      "final_norm": [D]                          ("embed",)
      "unembed":    [D, V]  (untied only)        ("embed", "vocab")
    }

Hugging Face Llama/Qwen weights map onto it as ``q = q_proj.weight.T.reshape(D, H, E)``,
``o = o_proj.weight.T.reshape(H, E, D)``, ``gate = gate_proj.weight.T`` and so on; RMSNorm weights are
stored as-is (HF multiplies by ``weight``, not ``1 + weight``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3")
ATTENTION_IMPLS = ("dense", "blocked", "platform", "platform_xla", "platform_cudnn",
                   "platform_splash")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_type == "llama3"`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3).

    Attributes:
      family: one of ``FAMILIES``; informational (the switches below drive the math).
      vocab_size: V.  d_model: D.  n_layers: L.  n_heads: H.  n_kv_heads: G.  head_dim: E.
      ffn_dim: F.  rope_theta: RoPE base.  rms_eps: RMSNorm epsilon.
      tie_embeddings: unembedding is ``embed.T`` (no ``"unembed"`` leaf).
      qkv_bias: q/k/v projections have biases (Qwen2).  qk_norm: per-head RMSNorm on q and k (Qwen3).
      rope_scaling: Llama 3 frequency scaling or ``None``.
      max_position: longest sequence the model was trained for (prompt + completion check).
      attention: how full-sequence attention is computed (not part of the architecture: same
        values either way): ``"dense"`` materialises ``[B, H, T, S]`` float32 scores;
        ``"blocked"`` runs an online softmax over ``attention_block``-sized query and key blocks
        (``layers.attention_blocked``: O(T * block) memory, for long sequences);
        ``"platform"`` calls ``jax.nn.dot_product_attention`` (cuDNN flash attention on a CUDA
        GPU where it can take the call, the Pallas splash kernel on a TPU, XLA elsewhere;
        ``"platform_xla"`` / ``"platform_cudnn"`` / ``"platform_splash"`` force one:
        :mod:`opd_jax.model.platform_attention`). One-token decode steps over the KV cache always
        use the dense form, and so does the platform mode's cached prefill.
      attention_block: query / key block size of ``"blocked"`` attention.
    """

    family: str = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    max_position: int = 2048
    attention: str = "dense"
    attention_block: int = 512

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of "
                             f"{ATTENTION_IMPLS}")
        if self.attention_block < 1:
            raise ValueError(f"attention_block must be positive, got {self.attention_block}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def n_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        D, F, H, G, E, L, V = (self.d_model, self.ffn_dim, self.n_heads, self.n_kv_heads,
                               self.head_dim, self.n_layers, self.vocab_size)
        per_layer = 2 * D + D * (H + 2 * G) * E + H * E * D + 3 * D * F
        per_layer += (H + 2 * G) * E if self.qkv_bias else 0
        per_layer += 2 * E if self.qk_norm else 0
        return V * D * (1 if self.tie_embeddings else 2) + L * per_layer + D

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs per token: 2 * matmul params (+ unembedding) + attention over ``context``."""
        D, F, H, G, E, L, V = (self.d_model, self.ffn_dim, self.n_heads, self.n_kv_heads,
                               self.head_dim, self.n_layers, self.vocab_size)
        matmul = L * (D * (H + 2 * G) * E + H * E * D + 3 * D * F) + D * V
        return 2.0 * matmul + 4.0 * L * H * E * context


# Logical axis names of every parameter leaf (see module docstring); "lora" leaves are added by lora.py.
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "unembed": ("embed", "vocab"),
    "layers": {
        "attn_norm": ("layers", "embed"),
        "q": ("layers", "embed", "heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "heads", "head_dim", "embed"),
        "q_bias": ("layers", "heads", "head_dim"),
        "k_bias": ("layers", "kv_heads", "head_dim"),
        "v_bias": ("layers", "kv_heads", "head_dim"),
        "q_norm": ("layers", "head_dim"),
        "k_norm": ("layers", "head_dim"),
        "mlp_norm": ("layers", "embed"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    },
}


def param_shapes(config: ModelConfig) -> dict:
    """The shape of every parameter leaf, as the nested dict described in the module docstring."""
    c = config
    L, D, H, G, E, F, V = (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim,
                           c.ffn_dim, c.vocab_size)
    layers = {
        "attn_norm": (L, D), "q": (L, D, H, E), "k": (L, D, G, E), "v": (L, D, G, E),
        "o": (L, H, E, D), "mlp_norm": (L, D), "gate": (L, D, F), "up": (L, D, F),
        "down": (L, F, D),
    }
    if c.qkv_bias:
        layers.update(q_bias=(L, H, E), k_bias=(L, G, E), v_bias=(L, G, E))
    if c.qk_norm:
        layers.update(q_norm=(L, E), k_norm=(L, E))
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not c.tie_embeddings:
        shapes["unembed"] = (D, V)
    return shapes


def param_axes(config: ModelConfig) -> dict:
    """Logical axis names for exactly the leaves ``param_shapes(config)`` has."""
    shapes = param_shapes(config)
    axes = {k: PARAM_AXES[k] for k in shapes if k != "layers"}
    axes["layers"] = {k: PARAM_AXES["layers"][k] for k in shapes["layers"]}
    return axes
