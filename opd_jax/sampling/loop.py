"""The sampler's jitted program: one prefill call, then a ``lax.while_loop`` decode over a KV cache.

:func:`prefill` runs the left-padded prompts through the decoder into a cache of
``P + max_new_tokens - 1`` slots (the first decode phase's window of them with
``cache_windows > 1``), unembeds the last position only and draws token 0; :func:`decode` (state
donated) steps a :class:`DecodeState` until every row is done, phase by phase. Both are
module-level ``jax.jit`` objects keyed on a hashable :class:`DecodeSettings`, so calls in one shape bucket
reuse one compiled program. :class:`opd_jax.sampling.sampler.Sampler` is the public face; see its module
docstring for the design (layer loop, cache layout, keys).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from opd_jax.compile_options import memory_jit
from opd_jax.model import bits, cache_attention
from opd_jax.model.cache_attention import add_slots, slots_last
from opd_jax.model.config import ModelConfig
from opd_jax.model.decoder import (
    KVCache,
    Lora,
    Params,
    embed,
    final_norm,
    hidden_states,
    init_cache,
    layer,
    layer_weights,
    next_token_logits,
    out_major_layer,
)
from opd_jax.model.inputs import step_inputs
from opd_jax.sampling.strategies import Sampling, draw, top_logprobs, uniforms
from opd_jax.sharding import constrain, use_mesh_rules

__all__ = ["DecodeSettings", "DecodeState", "LayerCaches", "TRACE_COUNTS", "prefill", "decode",
           "mesh_context", "split_layers", "decode_windows", "add_chunk",
           "slots_last_decode", "out_major_decode",
           "WINDOW_MULTIPLE"]

# Incremented (in Python, so only while tracing) by the jitted prefill / decode: a test can assert
# that repeated calls in one bucket do not recompile.
TRACE_COUNTS: collections.Counter = collections.Counter()


@flax.struct.dataclass
class LayerCaches:
    """The KV cache as per-layer arrays (``layer_loop="unroll"``): ``k[l], v[l]: [B, G, S, E]``;
    ``valid``, ``index``, ``next_pos`` as in :class:`opd_jax.model.decoder.KVCache`."""

    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @classmethod
    def from_stacked(cls, cache: KVCache) -> "LayerCaches":
        L = cache.k.shape[0]
        return cls(k=tuple(cache.k[i] for i in range(L)), v=tuple(cache.v[i] for i in range(L)),
                   valid=cache.valid, index=cache.index, next_pos=cache.next_pos)


@flax.struct.dataclass
class DecodeState:
    """The ``lax.while_loop`` carry: the cache, the step counter and the growing outputs."""

    cache: KVCache | LayerCaches
    step: jax.Array           # scalar int32: tokens generated so far
    last_token: jax.Array     # [B] int32: fed at the next step
    done: jax.Array           # [B] bool
    keys: jax.Array           # [B] per-row keys
    eos_ids: jax.Array        # [E] int32 (E may be 0)
    tokens: jax.Array         # [B, N]
    mask: jax.Array           # [B, N]
    logprobs: jax.Array       # [B, N]
    logprobs_full: jax.Array  # [B, N]
    topk_ids: jax.Array       # [B, N, K] (K = 0 when not requested)
    topk_logprobs: jax.Array  # [B, N, K]
    hidden: jax.Array         # [B, N, H]: the final hidden state each token was drawn from
                              # (H = D with ``return_hidden``, else 0)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Everything the compiled program depends on besides array shapes (hashable: the ``jit``
    static argument)."""

    config: ModelConfig
    sampling: Sampling
    max_new_tokens: int
    return_topk: int
    pad_id: int
    mesh: Mesh | None
    rules: tuple
    layer_loop: str = "unroll"
    cache_windows: int = 1
    return_hidden: bool = False


def mesh_context(st: DecodeSettings):
    """The mesh and rules of ``st`` as the active ones (a no-op without a mesh)."""
    if st.mesh is None:
        return contextlib.nullcontext()
    return use_mesh_rules(st.mesh, dict(st.rules))


# ----------------------------------------------------------------------------------------------
# the jitted program
# ----------------------------------------------------------------------------------------------


def _emit(st: DecodeSettings, state: DecodeState, logits_BxV: jax.Array, hidden_BxD: jax.Array
          ) -> DecodeState:
    """Draw token ``state.step`` for every row (``logits_BxV``, unembedded from ``hidden_BxD``)
    and record it."""
    step = state.step
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, step)
    d = draw(logits_BxV, uniforms(step_keys), st.sampling)
    live = ~state.done
    token = jnp.where(live, d.token, st.pad_id)
    def put(buf, x):   # column ``step``; a bfloat16 buffer (hidden states) written as bits
        return bits.update_slice(buf, x[:, None], (0, step) + (0,) * (buf.ndim - 2))
    new = dict(
        step=step + 1,
        last_token=token,
        tokens=put(state.tokens, token),
        mask=put(state.mask, live),
        logprobs=put(state.logprobs, jnp.where(live, d.logprob, 0.0)),
        logprobs_full=put(state.logprobs_full, jnp.where(live, d.logprob_full, 0.0)),
    )
    if st.return_topk:
        ids, lps = top_logprobs(logits_BxV, st.return_topk)
        new["topk_ids"] = put(state.topk_ids, jnp.where(live[:, None], ids, 0))
        new["topk_logprobs"] = put(state.topk_logprobs, jnp.where(live[:, None], lps, 0.0))
    if st.return_hidden:
        new["hidden"] = put(state.hidden, jnp.where(live[:, None], hidden_BxD, 0))
    hit_eos = jnp.any(d.token[:, None] == state.eos_ids[None, :], axis=-1)
    new["done"] = state.done | (live & hit_eos)
    return state.replace(**new)


@memory_jit(static_argnums=0)
def prefill(st: DecodeSettings, params: Params, lora: Lora | None, tokens_BxP: jax.Array,
             valid_BxP: jax.Array, keys_B: jax.Array, active_B: jax.Array, eos_E: jax.Array
             ) -> DecodeState:
    TRACE_COUNTS["prefill"] += 1
    c, N, K = st.config, st.max_new_tokens, st.return_topk
    B, P = tokens_BxP.shape
    with mesh_context(st):
        dtype = params["embed"].dtype
        cache = init_cache(c, B, decode_windows(P, N, st.cache_windows)[0][1], dtype)
        kv_axes = ("layers", "batch", "kv_heads", "length", "head_dim")
        cache = cache.replace(k=constrain(cache.k, kv_axes), v=constrain(cache.v, kv_axes))
        hidden_BxPxD, cache = hidden_states(params, c, tokens_BxP, valid_BxP, lora=lora,
                                            cache=cache, differentiable=False)
        logits_BxV = next_token_logits(params, c, hidden_BxPxD[:, -1])
        H = hidden_BxPxD.shape[-1] if st.return_hidden else 0
        if st.layer_loop == "unroll":
            cache = LayerCaches.from_stacked(cache)
        def zeros(shape, dt):
            return constrain(jnp.zeros(shape, dt), ("batch",) + (None,) * (len(shape) - 1))

        state = DecodeState(
            cache=cache, step=jnp.zeros((), jnp.int32), last_token=jnp.zeros((B,), jnp.int32),
            done=~active_B.astype(bool), keys=keys_B, eos_ids=eos_E.astype(jnp.int32),
            tokens=zeros((B, N), jnp.int32), mask=zeros((B, N), bool),
            logprobs=zeros((B, N), jnp.float32), logprobs_full=zeros((B, N), jnp.float32),
            topk_ids=zeros((B, N, K), jnp.int32), topk_logprobs=zeros((B, N, K), jnp.float32),
            hidden=zeros((B, N, H), hidden_BxPxD.dtype))
        return _emit(st, state, logits_BxV, hidden_BxPxD[:, -1])


# Windows are multiples of 64 slots (a phase shorter than 32 steps merges into the next one).
WINDOW_MULTIPLE = 64


def decode_windows(prompt_len: int, max_new_tokens: int, phases: int) -> list[tuple[int, int]]:
    """``[(last_step, window)]``: the decode loop's phases for a prompt bucket ``P`` and ``N``
    new tokens. A step with ``state.step = s`` (``1 <= s < N``) writes slot ``P + s - 1`` and
    attends over slots ``[0, P + s)``, so phase ``j`` runs the steps ``s <= last_step_j`` over a
    cache of ``window_j = P + last_step_j`` slots. ``phases`` phases of about equal length,
    windows rounded up to multiples of ``WINDOW_MULTIPLE``, the last one the whole cache
    ``S = P + N - 1``; one phase (or small ``N``): ``[(N - 1, S)]``.

    >>> decode_windows(128, 256, 4)
    [(64, 192), (128, 256), (192, 320), (255, 383)]
    >>> decode_windows(100, 32, 4)
    [(31, 131)]
    """
    P, N = prompt_len, max_new_tokens
    S, m = P + N - 1, WINDOW_MULTIPLE
    out: list[tuple[int, int]] = []
    for j in range(1, max(phases, 1) + 1):
        window = min(S, -(-(P + -(-j * (N - 1) // phases)) // m) * m)
        # a phase before the last one of fewer than m / 2 steps is not worth its compiled loop
        if window < S and S - window < m // 2:
            window = S
        if not out or window > out[-1][1]:
            out.append((window - P, window))
    return out


def add_chunk(cache: KVCache | LayerCaches, size: int) -> KVCache | LayerCaches:
    """``cache`` with ``size`` empty slots more, as a new chunk of keys / values (zeros, ``valid``
    False) in their own layout: the slots written so far stay where they are (no copy)."""
    if isinstance(cache, LayerCaches):
        k = tuple(add_slots(x, size) for x in cache.k)
        v = tuple(add_slots(x, size) for x in cache.v)
    else:
        k, v = add_slots(cache.k, size), add_slots(cache.v, size)
    valid = jnp.pad(cache.valid, ((0, 0), (0, size)))
    return cache.replace(k=k, v=v, valid=valid)


def slots_last_decode(st: DecodeSettings) -> bool:
    """Whether :func:`decode` re-lays the cached keys as
    :class:`~opd_jax.model.cache_attention.SlotsLast` (float32 ``[B, G, E, S]``) before its steps: on
    the CPU with per-layer caches (``layer_loop="unroll"``), where a step's scores run as
    multiply-reduces (``cache_attention.ONE_QUERY_MULTIPLY_REDUCE``) that vectorise over the
    slots. One transposing copy of the keys per call (the prompt's slots; later phases' chunks
    are made in that layout), against a faster cache read every step."""
    return (st.layer_loop == "unroll" and jax.default_backend() == "cpu"
            and cache_attention.ONE_QUERY_MULTIPLY_REDUCE)


@memory_jit(static_argnums=(0, 1), donate_argnums=2)
def decode(st: DecodeSettings, prompt_len: int, state: DecodeState, params: Params,
           lora: Lora | None) -> DecodeState:
    """Steps ``state`` (from :func:`prefill` of ``prompt_len``-slot prompts) until every row is
    done or ``N`` tokens are drawn: one ``while_loop`` per phase of :func:`decode_windows`
    (``st.cache_windows`` phases). The prefill's cache holds the first phase's window; each
    later phase adds a chunk of empty slots (:func:`add_chunk`) and attends over all chunks so
    far, so early steps read the filled part of the cache only and nothing is copied. (Slicing
    one whole-size cache per phase instead made XLA CPU copy the cache every step.) A phase
    whose rows are all done runs no step."""
    TRACE_COUNTS["decode"] += 1
    c, N = st.config, st.max_new_tokens

    with mesh_context(st):
        if st.layer_loop == "unroll":
            layers = split_layers(params, lora, c.n_layers, out_major=out_major_decode(st, params))
            if slots_last_decode(st):
                cache = state.cache
                state = state.replace(cache=cache.replace(k=tuple(slots_last(k) for k in cache.k)))

            def step(s: DecodeState):
                return _unrolled_step(c, params, layers, lora, s.last_token, s.cache)
        else:
            def step(s: DecodeState):
                B = s.last_token.shape[0]
                hidden_Bx1xD, cache = hidden_states(params, c, s.last_token[:, None],
                                                    jnp.ones((B, 1), bool), lora=lora,
                                                    cache=s.cache)
                return hidden_Bx1xD[:, 0], cache

        def cond(s: DecodeState, last_step: int):
            return (s.step <= last_step) & ~jnp.all(s.done)

        def body(s: DecodeState):
            hidden_BxD, cache = step(s)
            s = s.replace(cache=cache)
            return _emit(st, s, next_token_logits(params, c, hidden_BxD), hidden_BxD)

        for last_step, window in decode_windows(prompt_len, N, st.cache_windows):
            if window > state.cache.valid.shape[1]:
                state = state.replace(cache=add_chunk(state.cache,
                                                      window - state.cache.valid.shape[1]))
            state = jax.lax.while_loop(functools.partial(cond, last_step=last_step), body, state)
        return state


def split_layers(params: Params, lora: Lora | None, n_layers: int, *,
                 out_major: bool = False) -> list[dict]:
    """Per-layer weight trees (:func:`opd_jax.model.decoder.layer_weights` of one layer), sliced
    once outside the loop; ``out_major``: with the projections as out-major copies
    (:func:`opd_jax.model.decoder.out_major_layer`), made once per call."""
    stacked = layer_weights(params, lora)
    layers = [jax.tree.map(lambda x: x[i], stacked) for i in range(n_layers)]
    return [out_major_layer(w) for w in layers] if out_major else layers


def out_major_decode(st: DecodeSettings, params: Params) -> bool:
    """Whether :func:`decode` runs on out-major projection weights
    (:class:`~opd_jax.model.lean_ops.OutMajor`): on the CPU without a mesh of several devices
    (the copy is a flattened transpose, which would gather a sharded weight), for 2-byte layer
    weights, or float32 ones from 128 new tokens on. The copy costs once per call what it saves
    a few steps later (27-layer student: ≈57 ms more than the plain
    per-layer slices in bfloat16, ≈6 ms saved a step at B = 8 and ≈8 ms at B = 32; float32 copies
    twice the bytes for ≈1-2 ms a step at B = 8). The slots' decode (``slots.decode_chunk``),
    called every few steps, keeps the stored layout."""
    if jax.default_backend() != "cpu" or (st.mesh is not None and st.mesh.devices.size > 1):
        return False
    return params["layers"]["q"].dtype.itemsize <= 2 or st.max_new_tokens >= 128


def _unrolled_step(c: ModelConfig, params: Params, layers: list[dict], lora: Lora | None,
                   token_B: jax.Array, cache: LayerCaches) -> tuple[jax.Array, LayerCaches]:
    """One decode step through the decoder's :func:`~opd_jax.model.decoder.layer`, layer by
    layer (per-layer caches updated in place). Same math as ``decoder.forward(..., cache=...)``
    for one real token."""
    tokens_Bx1 = token_B[:, None]
    inputs = step_inputs(c, tokens_Bx1, cache=cache, lora=lora)
    x = embed(params, tokens_Bx1)
    ks, vs = [], []
    for weights, k, v in zip(layers, cache.k, cache.v):
        x, (k, v) = layer(c, inputs, x, weights, (k, v))
        ks.append(k)
        vs.append(v)
    hidden_BxD = final_norm(params, c, x)[:, 0]
    return hidden_BxD, LayerCaches(k=tuple(ks), v=tuple(vs), valid=inputs.kv_valid_BxS,
                                   index=cache.index + 1, next_pos=inputs.next_pos_B)
