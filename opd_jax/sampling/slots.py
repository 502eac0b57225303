"""Continuous batching, the device side: ``B`` decode slots over one ring KV cache.

Three jitted programs (module-level ``jax.jit`` objects, the :class:`~opd_jax.sampling.loop.DecodeSettings`
static, so calls reuse one compiled program per shape):

* :func:`init_slots` -- an empty :class:`SlotState` (every slot done, cache zeros);
* :func:`admit` -- prefill ``U`` new prompts once, copy each prompt's keys/values into the slots
  that take one of its rows (several samples of one prompt share one prefill) and draw their
  token 0;
* :func:`decode_chunk` (state donated) -- up to ``max_steps`` decode steps of every slot in a
  ``lax.while_loop``; it stops early once every slot is done, or once ``refill_at`` slots are done
  (the host then refills them).

The cache (``[B, G, S, E]`` per layer, ``S = P + N - 1`` for prompt bucket ``P`` and
``N = max_new_tokens``) is a ring with **one** write index shared by all slots, advanced by every
decode step (``index = (index + 1) mod S``). A row admitted when the index is ``i`` gets its
left-padded prompt at ring slots ``[i - P, i)`` (mod ``S``; every other slot of its row is marked
invalid) and writes its ``N - 1`` fed tokens at ``i, i + 1, ...``: its whole life fits the ``S``
slots of its own ring row, so no slot of another row, and no stale slot of its own, is ever read.
A decode step attends to every *valid* slot of its row (``mask = valid``): unlike the plain loop's
``slot <= index`` there is no causal test, because everything valid in a row is in its past.
RoPE positions come from the per-slot ``next_pos`` (real tokens so far), as in the plain loop;
the step key of a row's token ``s`` is ``fold_in(row_key, s)`` with the slot's own step counter
``s``. So a row's tokens and log-probs are those of :mod:`opd_jax.sampling.loop` for the same key
(up to float32 rounding: keys sit at other cache slots, so attention sums in another order).

Shapes: ``B`` decode slots, ``U`` prompts prefilled by one :func:`admit`, ``P`` prompt bucket,
``S`` ring cache slots, ``N`` max new tokens, ``K`` recorded top-k, ``V`` vocabulary.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.compile_options import memory_jit
from opd_jax.model import bits
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
)
from opd_jax.model.inputs import step_inputs
from opd_jax.sampling.loop import TRACE_COUNTS, DecodeSettings, LayerCaches, mesh_context, split_layers
from opd_jax.sampling.strategies import draw, top_logprobs, uniforms
from opd_jax.sharding import constrain

__all__ = ["SlotState", "init_slots", "admit", "decode_chunk"]


@flax.struct.dataclass
class SlotState:
    """The decode slots between host decisions.

    Attributes:
      cache: the ring KV cache (:class:`~opd_jax.model.decoder.KVCache` for
        ``layer_loop="scan"``, :class:`~opd_jax.sampling.loop.LayerCaches` for ``"unroll"``):
        ``k``/``v`` ``[B, G, S, E]`` per layer, ``valid [B, S]``, ``index`` the shared ring write
        slot, ``next_pos [B]`` the RoPE position of each slot's next token.
      step: ``[B]`` int32 tokens drawn by each slot's current row (the column of its next token
        and the ``fold_in`` index of its next key).
      last_token: ``[B]`` int32 fed at the next decode step.
      done: ``[B]`` bool, the slot's row finished (EOS or ``N`` tokens) or the slot is empty.
      keys: ``[B]`` typed keys of the slots' rows.
      eos_ids: ``[E]`` int32 (``-1`` never matches).
      tokens, mask, logprobs, logprobs_full: ``[B, N]`` the current rows' outputs so far
        (``pad_id`` / False / 0 where nothing was drawn).
      topk_ids, topk_logprobs: ``[B, N, K]`` (``K = 0`` when not recorded).
      hidden: ``[B, N, H]`` the final hidden state each token was drawn from (``H = D`` with
        ``return_hidden``, else 0).
      decode_steps: scalar int32, decode steps run since :func:`init_slots`.
      live_slot_steps: scalar int32, the sum over those steps of the slots that were live.
    """

    cache: KVCache | LayerCaches
    step: jax.Array
    last_token: jax.Array
    done: jax.Array
    keys: jax.Array
    eos_ids: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    logprobs_full: jax.Array
    topk_ids: jax.Array
    topk_logprobs: jax.Array
    hidden: jax.Array
    decode_steps: jax.Array
    live_slot_steps: jax.Array


def _rows(x: jax.Array) -> jax.Array:
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


@memory_jit(static_argnums=(0, 1, 2, 3, 4))
def init_slots(st: DecodeSettings, slots: int, prompt_len: int, dtype: str, key_impl: str,
               eos_E: jax.Array) -> SlotState:
    """``slots`` empty (done) slots over a ring cache of ``prompt_len + N - 1`` slots, the cache
    in ``dtype``, placeholder keys of implementation ``key_impl``."""
    TRACE_COUNTS["slot_init"] += 1
    c, N, K = st.config, st.max_new_tokens, st.return_topk
    B = slots
    with mesh_context(st):
        cache = init_cache(c, B, prompt_len + N - 1, jnp.dtype(dtype))
        kv_axes = ("layers", "batch", "kv_heads", "length", "head_dim")
        cache = cache.replace(k=constrain(cache.k, kv_axes), v=constrain(cache.v, kv_axes))
        if st.layer_loop == "unroll":
            cache = LayerCaches.from_stacked(cache)
        zeros = lambda shape, dt: _rows(jnp.zeros(shape, dt))
        return SlotState(
            cache=cache, step=zeros((B,), jnp.int32), last_token=zeros((B,), jnp.int32),
            done=_rows(jnp.ones((B,), bool)),
            keys=jax.random.split(jax.random.key(0, impl=key_impl), B), eos_ids=eos_E.astype(jnp.int32),
            tokens=_rows(jnp.full((B, N), st.pad_id, jnp.int32)), mask=zeros((B, N), bool),
            logprobs=zeros((B, N), jnp.float32), logprobs_full=zeros((B, N), jnp.float32),
            topk_ids=zeros((B, N, K), jnp.int32), topk_logprobs=zeros((B, N, K), jnp.float32),
            hidden=zeros((B, N, c.d_model if st.return_hidden else 0), jnp.dtype(dtype)),
            decode_steps=jnp.zeros((), jnp.int32), live_slot_steps=jnp.zeros((), jnp.int32))


def _emit(st: DecodeSettings, state: SlotState, logits_BxV: jax.Array, hidden_BxD: jax.Array,
          draw_B: jax.Array) -> SlotState:
    """Draw token ``state.step[b]`` of every slot with ``draw_B[b]`` (``logits_BxV``, unembedded
    from ``hidden_BxD``) and record it in column ``state.step[b]`` (the other slots are left as
    they are)."""
    N, B = st.max_new_tokens, draw_B.shape[0]
    step_keys = jax.vmap(jax.random.fold_in)(state.keys, state.step)
    d = draw(logits_BxV, uniforms(step_keys), st.sampling)
    col_B = jnp.where(draw_B, state.step, N)  # column N is out of range: the write is dropped
    rows_B = jnp.arange(B)

    def put(buf, x):
        return bits.scatter_set(buf, (rows_B, col_B), x, mode="drop")

    new = dict(tokens=put(state.tokens, d.token), mask=put(state.mask, jnp.ones((B,), bool)),
               logprobs=put(state.logprobs, d.logprob),
               logprobs_full=put(state.logprobs_full, d.logprob_full))
    if st.return_topk:
        ids, lps = top_logprobs(logits_BxV, st.return_topk)
        new["topk_ids"] = put(state.topk_ids, ids)
        new["topk_logprobs"] = put(state.topk_logprobs, lps)
    if st.return_hidden:
        new["hidden"] = put(state.hidden, hidden_BxD)
    step = state.step + draw_B.astype(jnp.int32)
    hit_eos = jnp.any(d.token[:, None] == state.eos_ids[None, :], axis=-1)
    return state.replace(
        **new, step=step, last_token=jnp.where(draw_B, d.token, state.last_token),
        done=state.done | (draw_B & (hit_eos | (step >= N))))


def _place_prompts(buf_BxGxSxE: jax.Array, new_UxGxPxE: jax.Array, src_B: jax.Array,
                   ring_P: jax.Array) -> jax.Array:
    """Copy prompt ``src_B[b]``'s keys (or values) into ring slots ``ring_P`` of slot ``b``, for
    every slot with ``src_B[b] >= 0``; one scatter, the other slots untouched."""
    B = buf_BxGxSxE.shape[0]
    target_B = jnp.where(src_B >= 0, jnp.arange(B), B)  # row B is out of range: dropped
    new_BxPxGxE = new_UxGxPxE[jnp.maximum(src_B, 0)].transpose(0, 2, 1, 3)
    return bits.scatter_set(buf_BxGxSxE, (target_B[:, None], slice(None), ring_P[None, :]),
                            new_BxPxGxE, mode="drop")


@memory_jit(static_argnums=(0, 1), donate_argnums=2)
def admit(st: DecodeSettings, key_impl: str, state: SlotState, params: Params, lora: Lora | None,
          tokens_UxP: jax.Array, valid_UxP: jax.Array, src_B: jax.Array, key_data_Bx2: jax.Array
          ) -> SlotState:
    """Start new rows: slot ``b`` with ``src_B[b] >= 0`` takes a row whose (left-padded) prompt is
    ``tokens_UxP[src_B[b]]`` and whose key is ``wrap_key_data(key_data_Bx2[b], impl=key_impl)``;
    slots with ``src_B[b] < 0`` are untouched. Each of the ``U`` prompts is prefilled once (the
    last position unembedded only); token 0 of every new row is drawn here."""
    TRACE_COUNTS["slot_admit"] += 1
    c = st.config
    U, P = tokens_UxP.shape
    with mesh_context(st):
        prompt_cache = init_cache(c, U, P, params["embed"].dtype)
        hidden_UxPxD, prompt_cache = hidden_states(params, c, tokens_UxP, valid_UxP, lora=lora,
                                                   cache=prompt_cache, differentiable=False)
        logits_UxV = next_token_logits(params, c, hidden_UxPxD[:, -1])
        cache = state.cache
        S = cache.valid.shape[1]
        start = cache.index - P  # the prompt ends just before the shared write index
        ring_P = jnp.mod(start + jnp.arange(P), S)
        if isinstance(cache, LayerCaches):
            place = lambda bufs, new: tuple(_place_prompts(b, new[i], src_B, ring_P)
                                            for i, b in enumerate(bufs))
        else:
            stacked = jax.vmap(_place_prompts, in_axes=(0, 0, None, None))
            place = lambda bufs, new: stacked(bufs, new, src_B, ring_P)
        k, v = place(cache.k, prompt_cache.k), place(cache.v, prompt_cache.v)
        new_B = src_B >= 0
        src = jnp.maximum(src_B, 0)
        offset_S = jnp.mod(jnp.arange(S) - start, S)  # ring slot -> column of the prompt window
        window_BxS = jnp.take(valid_UxP.astype(bool)[src], jnp.minimum(offset_S, P - 1), axis=1)
        window_BxS = window_BxS & (offset_S < P)[None, :]
        cache = cache.replace(
            k=k, v=v, valid=jnp.where(new_B[:, None], window_BxS, cache.valid),
            next_pos=jnp.where(new_B, prompt_cache.next_pos[src], cache.next_pos))
        keys = jnp.where(new_B, jax.random.wrap_key_data(key_data_Bx2, impl=key_impl), state.keys)
        reset = lambda buf, value: jnp.where(new_B.reshape((-1,) + (1,) * (buf.ndim - 1)),
                                             jnp.asarray(value, buf.dtype), buf)
        state = state.replace(
            cache=cache, keys=keys, step=jnp.where(new_B, 0, state.step),
            done=state.done & ~new_B, tokens=reset(state.tokens, st.pad_id),
            mask=reset(state.mask, False), logprobs=reset(state.logprobs, 0.0),
            logprobs_full=reset(state.logprobs_full, 0.0), topk_ids=reset(state.topk_ids, 0),
            topk_logprobs=reset(state.topk_logprobs, 0.0), hidden=reset(state.hidden, 0.0))
        return _emit(st, state, logits_UxV[src], hidden_UxPxD[src, -1], new_B)


def _ring_step(c: ModelConfig, params: Params, layers: list[dict] | None, lora: Lora | None,
               token_B: jax.Array, cache: KVCache | LayerCaches
               ) -> tuple[jax.Array, KVCache | LayerCaches]:
    """One decode step of every slot over the ring cache: ``(hidden [B, D], cache)``. The
    decoder's :func:`~opd_jax.model.decoder.layer` on :func:`~opd_jax.model.inputs.step_inputs`
    with the mask replaced by the row's validity (see the module docstring); ``layers`` are the
    per-layer weights for the unrolled loop, ``None`` for the layer scan."""
    tokens_Bx1 = token_B[:, None]
    inputs = step_inputs(c, tokens_Bx1, cache=cache, lora=lora)
    inputs = inputs._replace(mask_BxTxS=inputs.kv_valid_BxS[:, None, :])
    x = embed(params, tokens_Bx1)
    if layers is not None:
        ks, vs = [], []
        for weights, k, v in zip(layers, cache.k, cache.v):
            x, (k, v) = layer(c, inputs, x, weights, (k, v))
            ks.append(k)
            vs.append(v)
        k_all, v_all = tuple(ks), tuple(vs)
    else:
        def one(x, xs):
            weights, kv = xs
            return layer(c, inputs, x, weights, kv)

        x, (k_all, v_all) = jax.lax.scan(one, x, (layer_weights(params, lora), (cache.k, cache.v)))
    S = cache.valid.shape[1]
    new_cache = cache.replace(k=k_all, v=v_all, valid=inputs.kv_valid_BxS,
                              index=jnp.mod(cache.index + 1, S), next_pos=inputs.next_pos_B)
    return final_norm(params, c, x)[:, 0], new_cache


@memory_jit(static_argnums=0, donate_argnums=1)
def decode_chunk(st: DecodeSettings, state: SlotState, params: Params, lora: Lora | None,
                 max_steps: jax.Array, refill_at: jax.Array) -> SlotState:
    """Decode steps of every live slot until ``max_steps`` steps ran, every slot is done, or at
    least ``refill_at`` slots are done (both scalars are traced: changing them does not
    recompile)."""
    TRACE_COUNTS["slot_decode"] += 1
    c = st.config
    with mesh_context(st):
        layers = split_layers(params, lora, c.n_layers) if st.layer_loop == "unroll" else None

        def cond(carry):
            t, s = carry
            n_done = jnp.sum(s.done.astype(jnp.int32))
            return (t < max_steps) & (n_done < s.done.shape[0]) & (n_done < refill_at)

        def body(carry):
            t, s = carry
            live_B = ~s.done
            hidden_BxD, cache = _ring_step(c, params, layers, lora, s.last_token, s.cache)
            s = s.replace(cache=cache, decode_steps=s.decode_steps + 1,
                          live_slot_steps=s.live_slot_steps + jnp.sum(live_B.astype(jnp.int32)))
            return t + 1, _emit(st, s, next_token_logits(params, c, hidden_BxD), hidden_BxD, live_B)

        _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
        return state


def key_impl_of(keys: jax.Array) -> str:
    """The PRNG implementation name of typed ``keys`` (the static argument of :func:`admit`)."""
    return str(jax.random.key_impl(keys))


def dtype_name(params: Params) -> str:
    """The cache dtype :func:`init_slots` takes: the embedding's, as a string."""
    return np.dtype(params["embed"].dtype).name
