"""Pure-functional decoder-only transformer (Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3).

``forward(params, config, tokens_BxT, ...)`` returns final-norm hidden states ``[B, T, D]`` (and the
updated KV cache); the unembedding ``[D, V]`` is separate (``unembed_matrix``) so losses can chunk
it and never build ``[B, T, V]`` logits. Layers are stacked on a leading axis and run with
``lax.scan`` so compile time does not grow with depth. Norms, RoPE and softmax run in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from opd_jax.losses.unembedding import TiedUnembedding, Unembedding
from opd_jax.model import bits, dense_attention, lean_ops
from opd_jax.model.cache_attention import attention_over_cache, cast_kv, write_kv
from opd_jax.model.config import ATTENTION_IMPLS, ModelConfig, param_shapes
from opd_jax.model.dtypes import cast_floating
from opd_jax.model.inputs import BlockedMask, StepInputs, step_inputs
from opd_jax.model.layers import (
    apply_rope,
    attention_blocked,
    rms_norm,
)
from opd_jax.model.platform_attention import PlatformMask, attention_platform
from opd_jax.sharding import constrain

Params = dict[str, Any]

# einsum subscripts per projection: (activation in, weight in-dims, weight out-dims)
PROJECTIONS = {
    "q": ("btd", "d", "he"), "k": ("btd", "d", "ge"), "v": ("btd", "d", "ge"),
    "o": ("bthe", "he", "d"), "gate": ("btd", "d", "f"), "up": ("btd", "d", "f"),
    "down": ("btf", "f", "d"),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Preallocated key/value cache.

    Attributes:
      k, v: ``[L, B, G, S, E]`` keys and values per slot, heads before slots: a decode step's
        attention reads each (row, head) block contiguously and a write touches one ``E`` run
        per head, with no per-step transpose of the whole cache. Or tuples of such arrays, chunks
        along ``S`` (the sampler's decode phases: new tokens go to the last chunk).
      valid: ``[B, S]`` bool, slot holds a real (non-padding) token.
      index: scalar int32, next slot to write (shared by all rows: prompts are left-padded).
      next_pos: ``[B]`` int32, RoPE position of each row's next real token.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @property
    def size(self) -> int:
        return self.valid.shape[1]


def init_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of ``size`` slots for ``batch`` rows."""
    shape = (config.n_layers, batch, config.n_kv_heads, size, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32),
                   next_pos=jnp.zeros((batch,), jnp.int32))


@flax.struct.dataclass
class Lora:
    """LoRA adapters: ``weights[name] = {"a": [L, *in, R], "b": [L, R, *out]}``; ``y += scale·(x a) b``."""

    weights: dict
    scale: float = flax.struct.field(pytree_node=False, default=1.0)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal, std 0.02; norms = 1; biases = 0) with the contract's shapes.

    One flat normal draw is cut into the leaves, so a new shape costs one compile, not one per leaf.
    """
    shapes = param_shapes(config)
    is_shape = lambda s: isinstance(s, tuple)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)
    sizes = [math.prod(shape) for _, shape in flat]
    draws = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for (path, shape), size in zip(flat, sizes):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(shape, dtype))
        elif "bias" in name:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append(draws[offset:offset + size].reshape(shape).astype(dtype))
        offset += size
    return jax.tree.unflatten(treedef, out)


def unembed_matrix(params: Params, config: ModelConfig) -> jax.Array:
    """The ``[D, V]`` unembedding (``embed.T`` when tied)."""
    return params["embed"].T if config.tie_embeddings else params["unembed"]


def loss_unembedding(params: Params, config: ModelConfig) -> Unembedding:
    """The unembedding as the chunked losses read it: the ``[D, V]`` matrix, or a tied model's
    ``[V, D]`` table as a :class:`~opd_jax.losses.unembedding.TiedUnembedding` (the chunks slice
    vocabulary blocks of the table itself: no transposed copy, and a gradient accumulates in the
    table's own layout)."""
    return TiedUnembedding(params["embed"]) if config.tie_embeddings else params["unembed"]


def _project(name: str, x: jax.Array, w: jax.Array, lora_l: dict | None, scale: float) -> jax.Array:
    x_sub, w_in, w_out = PROJECTIONS[name]
    out_sub = x_sub[:2] + w_out
    # one 2-D [B*T, K] @ [K, N] dot: XLA CPU's dot emitter runs it ~15% faster forward (~9%
    # forward + backward) than the 3-/4-D einsum, whose backward adds a transposing copy fusion
    # (benchmarks: BUILD_NOTES "2-D projections"); its custom VJP saves x and w as given (the
    # reshapes would otherwise be saved, stacked over the layer scan: copies of the weights)
    y = (lean_ops.project_out_major(x, w) if isinstance(w, lean_ops.OutMajor)
         else lean_ops.project(x, w, len(w_in)))
    if lora_l is not None and name in lora_l:
        a, b = lora_l[name]["a"], lora_l[name]["b"]
        xa = jnp.einsum(f"{x_sub},{w_in}r->{x_sub[:2]}r", x, a.astype(x.dtype))
        y = y + (scale * jnp.einsum(f"{x_sub[:2]}r,r{w_out}->{out_sub}", xa, b.astype(x.dtype))
                 ).astype(y.dtype)
    return y


def layer_weights(params: Params, lora: Lora | None) -> dict:
    """The stacked per-layer weights :func:`layer` takes: ``{"p": params["layers"], "lora": ...}``
    (every leaf has the layer axis first; index it for one layer)."""
    layers = {"p": params["layers"]}
    if lora is not None:
        layers["lora"] = lora.weights
    return layers


def out_major_layer(weights: dict) -> dict:
    """One layer of :func:`layer_weights` with its projections as
    :class:`~opd_jax.model.lean_ops.OutMajor` copies (the sampler's decode on one CPU device;
    :func:`layer` takes either form)."""
    p = dict(weights["p"])
    for name, (_, w_in, _) in PROJECTIONS.items():
        p[name] = lean_ops.out_major(p[name], len(w_in))
    return {**weights, "p": p}


def embed(params: Params, tokens_BxT: jax.Array) -> jax.Array:
    """The input embeddings ``[B, T, D]``."""
    return constrain(params["embed"][tokens_BxT], ("batch", "length", "embed"))


def final_norm(params: Params, config: ModelConfig, x_BxTxD: jax.Array) -> jax.Array:
    """The final RMS norm: the decoder's output hidden states."""
    return rms_norm(x_BxTxD, params["final_norm"], config.rms_eps)


def layer(config: ModelConfig, inputs: StepInputs, x_BxTxD: jax.Array, weights: dict,
          cache_kv: tuple[jax.Array, jax.Array] | None = None
          ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One transformer block: ``x`` ``[B, T, D]`` -> ``x``, plus the layer's cache ``(k, v)``
    (``[B, G, S, E]`` each) with the new keys/values written at ``inputs.write_index`` (``None``
    without a cache). ``weights``: one layer of :func:`layer_weights`."""
    inv_freq, scale, mask_BxTxS = inputs.inv_freq, inputs.lora_scale, inputs.mask_BxTxS
    positions_BxT, write_index = inputs.positions_BxT, inputs.write_index
    p, lora_l = weights["p"], weights.get("lora")
    h = rms_norm(x_BxTxD, p["attn_norm"], config.rms_eps)
    q = _project("q", h, p["q"], lora_l, scale)
    k = _project("k", h, p["k"], lora_l, scale)
    v = _project("v", h, p["v"], lora_l, scale)
    if config.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.rms_eps)
        k = rms_norm(k, p["k_norm"], config.rms_eps)
    q = apply_rope(q, positions_BxT, inv_freq)
    k = apply_rope(k, positions_BxT, inv_freq)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    if cache_kv is not None:
        # cache layout [B, G, S, E]: the T new rows go in as [B, G, T, E] at slot write_index;
        # a cache in chunks along S (the sampler's decode phases) takes them in its last chunk
        # (keys as ``cache_attention.SlotsLast`` in the sampler's CPU decode)
        new_kv = (write_kv(cache_kv[0], k, write_index), write_kv(cache_kv[1], v, write_index))
        k_all, v_all = (cast_kv(x, q.dtype) for x in new_kv)
        if isinstance(mask_BxTxS, BlockedMask):   # prefill: one transpose back per call
            attn = attention_blocked(q, k_all.transpose(0, 2, 1, 3), v_all.transpose(0, 2, 1, 3),
                                     mask_BxTxS.q_slot, mask_BxTxS.kv_valid,
                                     block_q=mask_BxTxS.block, block_k=mask_BxTxS.block)
        else:
            attn = attention_over_cache(q, k_all, v_all, mask_BxTxS)
    elif isinstance(mask_BxTxS, BlockedMask):
        attn = attention_blocked(q, k, v, mask_BxTxS.q_slot, mask_BxTxS.kv_valid,
                                 block_q=mask_BxTxS.block, block_k=mask_BxTxS.block,
                                 segments_BxS=mask_BxTxS.segments,
                                 segment_start_BxT=mask_BxTxS.segment_start)
        new_kv = None
    elif isinstance(mask_BxTxS, PlatformMask):
        attn, new_kv = attention_platform(q, k, v, mask_BxTxS), None
    else:
        # causal (no cache): query blocks over their key prefixes (dense_attention.query_blocks)
        attn = dense_attention.causal_attention(q, k, v, mask_BxTxS,
                                                dense_attention.query_blocks(q.shape[1]))
        new_kv = None
    x_BxTxD = x_BxTxD + _project("o", attn, p["o"], lora_l, scale)
    h = rms_norm(x_BxTxD, p["mlp_norm"], config.rms_eps)
    gate = _project("gate", h, p["gate"], lora_l, scale)
    up = _project("up", h, p["up"], lora_l, scale)
    if (lora_l is not None and "down" in lora_l) or isinstance(p["down"], lean_ops.OutMajor):
        # the adapter needs silu(gate) * up itself; an out-major weight is the sampler's decode
        down = _project("down", lean_ops.gated_mlp_input(gate, up), p["down"], lora_l, scale)
    else:   # saves gate and up only; silu(gate) * up is recomputed for the backward pass
        down = lean_ops.swiglu_down(gate, up, p["down"])
    x_BxTxD = x_BxTxD + down
    return constrain(x_BxTxD, ("batch", "length", "embed")), new_kv


def forward(params: Params, config: ModelConfig, tokens_BxT: jax.Array,
            positions_BxT: jax.Array | None = None, *, valid_BxT: jax.Array | None = None,
            cache: KVCache | None = None, lora: Lora | None = None,
            remat: str = "none", attention: str | None = None,
            segment_ids_BxT: jax.Array | None = None,
            compute_dtype=None, differentiable: bool = True) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder.

    Args:
      params: parameter tree (see ``opd_jax.model.config``).
      config: the architecture.
      tokens_BxT: int token ids.
      positions_BxT: RoPE positions; default: count of real tokens before each one (left padding
        aware), continuing from ``cache.next_pos`` when a cache is given.
      valid_BxT: bool, False for padding tokens (they are never attended to). Default all True.
      cache: a ``KVCache``; the ``T`` new keys/values are written at slots
        ``[cache.index, cache.index + T)`` and queries attend causally over the whole cache.
      lora: adapters added to the projections; ``None`` runs the base weights alone.
      remat: rematerialisation policy per layer: ``"none" | "full" | "dots" | "dots_no_batch"``.
      attention: one of ``ATTENTION_IMPLS``; ``None`` = ``config.attention``. Blocked attention
        (block ``config.attention_block``) never builds the ``[B, T, S]`` mask or scores; a
        one-token step (``T == 1``, decoding over a cache) always runs dense. ``"platform*"``
        runs ``jax.nn.dot_product_attention`` without a cache and dense with one.
      segment_ids_BxT: packed rows (several sequences per row, no cache): attention stays inside
        each segment; ``positions_BxT`` must restart at 0 per segment (``train.packing``).
      compute_dtype: mixed precision over parameters kept in their own dtype (float32 master
        weights): run in this dtype, casting the other parameters up front and each layer's
        weights inside the layer scan (the projections inside their VJP), so a gradient comes
        back per layer in the parameters' dtype, never as a stack of ``compute_dtype`` ones
        (XLA CPU writes those at O(layers^2) cost: BUILD_NOTES "Session 21").
      differentiable: ``False`` when nothing differentiates through ``params`` (a teacher, a
        sampler): 2-byte float weights then cross the layer scan as ``uint16`` bits, which XLA
        CPU slices in place (it converts a whole bfloat16 stack to float32 first otherwise).

    Returns:
      ``(hidden_BxTxD, new_cache)``: final-norm hidden states and the updated cache (or ``None``).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    attention = config.attention if attention is None else attention
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention {attention!r}; expected one of {ATTENTION_IMPLS}")
    T = tokens_BxT.shape[1]
    platform = attention if attention.startswith("platform") and cache is None else None
    inputs = step_inputs(config, tokens_BxT, valid_BxT=valid_BxT, positions_BxT=positions_BxT,
                         cache=cache, lora=lora, blocked=attention == "blocked" and T > 1,
                         segment_ids_BxT=segment_ids_BxT, platform=platform)

    if compute_dtype is not None:
        params = {k: v if k == "layers" else cast_floating(v, compute_dtype) for k, v in params.items()}
    weights = layer_weights(params, lora)
    kv = (cache.k, cache.v) if cache is not None else None
    dtypes = jax.tree.map(lambda a: a.dtype, (weights, kv))
    # 2-byte floats cross the scan as uint16 bits where no gradient needs them: XLA CPU would
    # convert a whole bfloat16 stack to float32 to slice it, and rebuild a stacked cache per layer
    if not differentiable:
        weights = jax.tree.map(bits.to_bits, weights)
    xs = (weights, jax.tree.map(bits.to_bits, kv))

    def step(x, xs_bits):
        weights, kv = jax.tree.map(bits.from_bits, xs_bits, dtypes)
        if compute_dtype is not None:   # the projections cast their weights themselves
            weights = {**weights, "p": {k: v if k in PROJECTIONS else cast_floating(v, compute_dtype)
                                        for k, v in weights["p"].items()}}
        x, new_kv = layer(config, inputs, x, weights, kv)
        return x, jax.tree.map(bits.to_bits, new_kv)

    policy = REMAT_POLICIES[remat]
    if remat != "none":
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    x, new_kv = jax.lax.scan(step, embed(params, tokens_BxT), xs)
    if new_kv is not None:
        new_kv = jax.tree.map(bits.from_bits, new_kv, dtypes[1])
    hidden = final_norm(params, config, x)

    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=inputs.kv_valid_BxS,
                            index=cache.index + T, next_pos=inputs.next_pos_B)
    return hidden, new_cache


def logits(params: Params, config: ModelConfig, hidden_BxTxD: jax.Array) -> jax.Array:
    """``hidden @ unembed`` in float32: ``[B, T, V]``. Only for small inputs; losses chunk this."""
    return jnp.einsum("btd,dv->btv", hidden_BxTxD, unembed_matrix(params, config),
                      preferred_element_type=jnp.float32)


def hidden_states(params: Params, config: ModelConfig, tokens_BxT: jax.Array, valid_BxT: jax.Array,
                  *, lora: Lora | None = None, cache: KVCache | None = None,
                  differentiable: bool = True) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states ``[B, T, D]`` of (left-padded) sequences, and the filled cache.

    The one forward both the sampler's prefill and :func:`score` use: padding tokens are masked
    out of attention and RoPE positions count real tokens only (position 0 is each row's first
    real token), so a row's values do not depend on how much padding it got.
    """
    return forward(params, config, tokens_BxT, None, valid_BxT=valid_BxT, cache=cache, lora=lora,
                   differentiable=differentiable)


def next_token_logits(params: Params, config: ModelConfig, hidden_BxD: jax.Array) -> jax.Array:
    """``[B, V]`` float32 logits of one position per row (the unembedding of the decode step)."""
    if config.tie_embeddings:
        return jnp.einsum("bd,vd->bv", hidden_BxD, params["embed"],
                          preferred_element_type=jnp.float32)
    return jnp.einsum("bd,dv->bv", hidden_BxD, params["unembed"],
                      preferred_element_type=jnp.float32)
