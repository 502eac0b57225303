"""Autoregressive sampling: one jitted prefill, then a ``lax.while_loop`` decode over a KV cache.

Two layers (three files):

* :func:`opd_jax.sampling.generation.generate` (``opd_jax.generate``) -- the user API: token-id lists in,
  a ``GenerateOutput`` (completion lists plus the full arrays) out. Validates inputs, repeats
  each prompt ``n_samples`` times, derives one key per row from ``(seed, prompt index, sample
  index)``.
* :class:`Sampler` (this module) -- the jitted sampler a trainer calls in its loop:
  ``Sampler(config, sampling, max_new_tokens, ...)(params, prompt_tokens_BxP, prompt_valid_BxP,
  key) -> SampleOutput`` (device arrays). Its compiled program lives in
  :mod:`opd_jax.sampling.loop`.

How a call runs (the gemma-sampler pattern):

1. Prompts are left-padded (all rows end at the same slot, so the cache's write slot is shared)
   and their length is rounded up to a bucket (16, 32, 64, 128, then multiples of 128); the
   batch is rounded up to a bucket too (1, 2, 4, 8, then multiples of 8, and a multiple of the
   mesh's batch shards) with dummy rows that are dropped afterwards. Calls whose shapes fall in
   the same buckets reuse one compiled program (module-level ``jax.jit`` objects with the static
   settings as a hashable argument).
2. ``prefill`` (one jitted call) runs the prompt through the decoder, filling a cache of
   ``P + max_new_tokens - 1`` slots, unembeds the **last position only** and draws token 0.
3. ``decode`` (one jitted call, the state donated) steps a :class:`DecodeState` in a
   ``lax.while_loop`` until every row is done (EOS drawn, or ``max_new_tokens`` reached). With
   ``cache_windows > 1`` (the default from 256 new tokens on) it runs one loop per phase: the
   prefill's cache holds the first phase's slots, each later phase adds a chunk of empty slots,
   and a step attends over the chunks so far (``opd_jax.sampling.loop.decode_windows``), so the
   early steps of a long rollout do not read the empty end of the cache.

Decode is memory-bound: each step should read every weight once and touch the KV cache in place.
``layer_loop="unroll"`` (the default everywhere) runs the layers as a Python loop over per-layer
weight arrays (split once per call) and per-layer caches updated in place with
``dynamic_update_slice``. On one CPU device the split copies are out-major (``[out, in]``
row-major, ``opd_jax.model.lean_ops.OutMajor``): XLA CPU runs the step's small-M products
faster on them (``loop.out_major_decode``; the continuous-batching decode keeps the stored
layout, its program being called every few steps). The decoder's ``lax.scan`` over stacked
layers (``layer_loop="scan"``; faster to compile for deep models) makes XLA copy each layer's
weight and cache slices and rebuild the stacked cache every step: about 2.5x the memory traffic
of a step on XLA CPU, and 4.8x the step time on an H200 (Qwen3-1.7B shapes, B = 64, bf16: 14.5
vs 3.05 ms per step, ``benchmarks/device_decode.py``; BUILD_NOTES.md "Accelerator figures").
Both run the decoder's public ``decoder.layer`` on the masks / positions of
``inputs.step_inputs``, so they compute the same values. The cache is laid out ``[B, G, S, E]``
per layer (heads before slots, :class:`opd_jax.model.decoder.KVCache`) so the attention einsums
read it in place; the earlier ``[B, S, G, E]`` layout made XLA transpose
every layer's K and V once per step (≈1.7 ms per cache slot at B = 32, see BUILD_NOTES.md).
On the CPU the decode re-lays each layer's keys once per call as float32 ``[B, G, E, S]``
(:class:`opd_jax.model.cache_attention.SlotsLast`): a step's score multiply-reduces then run
with the slots innermost (BUILD_NOTES.md "Session 25").

Continuous batching (opt-in, ``Sampler(..., slots=B)``): instead of one batch that steps until
its longest row ends, the rows queue for ``B`` decode slots and a finished row's slot takes the
next queued row (:mod:`opd_jax.sampling.continuous` runs the host loop,
:mod:`opd_jax.sampling.slots` the jitted programs over a ring KV cache). Rows with the same
prompt (``n_samples``) share one prefill. Same outputs, same keys; compiled shapes depend on
``B``, the prompt bucket and ``N`` only, not on the number of rows.

Draws use one uniform per row and an inverse CDF (:mod:`opd_jax.sampling.strategies`); the key of step
``s`` of a row is ``fold_in(row_key, s)``, so a row's tokens depend only on its prompt, its key
and the weights -- not on the rest of the batch (left-padding is masked and RoPE positions count
real tokens only).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from opd_jax.checks import positive_int
from opd_jax.model.config import ModelConfig, param_axes
from opd_jax.model.decoder import Lora, Params
from opd_jax.sampling.continuous import RowsDone, SlotStats, host_copy, host_result, run_slots
from opd_jax.sampling.loop import TRACE_COUNTS, DecodeSettings, DecodeState, LayerCaches, decode, prefill
from opd_jax.sampling.strategies import Sampling
from opd_jax.sharding import batch_shards, get_rules, named_sharding, rules_key, tree_shardings

__all__ = ["Sampler", "SampleOutput", "DecodeState", "LayerCaches",
           "row_keys", "bucket_length", "bucket_batch", "TRACE_COUNTS", "default_cache_windows"]


# ----------------------------------------------------------------------------------------------
# state and outputs
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class SampleOutput:
    """What one sampler call returns (device arrays; ``N = max_new_tokens``).

    Attributes:
      tokens: ``[B, N]`` int32 completion ids; ``pad_id`` after a row's EOS.
      mask: ``[B, N]`` bool, True for generated tokens up to and including the EOS.
      logprobs: ``[B, N]`` float32 log-prob of each token under the distribution it was drawn
        from (temperature + truncation applied, renormalised; greedy: = ``logprobs_full``);
        0 where ``mask`` is False.
      logprobs_full: ``[B, N]`` float32 log-prob under the untruncated distribution
        ``log softmax(logits / sampling.score_temperature)`` (temperature 1 by default; what OPD /
        importance-sampling losses need).
      topk_ids: ``[B, N, K]`` int32 the sampling model's ``K`` most probable ids at each step
        (temperature 1), or ``None`` when not requested.
      topk_logprobs: ``[B, N, K]`` float32 their temperature-1 log-probs, or ``None``.
      lengths: ``[B]`` int32 number of generated tokens (``mask.sum(1)``).
      prompt_tokens: ``[B, P]`` the prompts as given (left-padded).
      prompt_valid: ``[B, P]`` bool.
      num_steps: scalar int32, tokens generated per row by the loop (``< N`` after an early
        exit, when every row hit EOS); with ``slots``: the longest row's length (the same number).
      hidden: ``[B, N, D]`` the final (normed) hidden state each token was drawn from (its
        logits are its unembedding; 0 where ``mask`` is False), with ``return_hidden``; else
        ``None``.
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    logprobs_full: jax.Array
    topk_ids: jax.Array | None
    topk_logprobs: jax.Array | None
    lengths: jax.Array
    prompt_tokens: jax.Array
    prompt_valid: jax.Array
    num_steps: jax.Array
    hidden: jax.Array | None = None

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """``[prompt; completion]`` as ``(tokens [B, P+N], valid [B, P+N])``, ready for scoring.

        The completion of row ``b`` starts at column ``P``; ``opd_jax.teacher.scoring.score`` of these
        gives at column ``P - 1 + i`` the log-prob of completion token ``i``.
        """
        tokens = jnp.concatenate([jnp.asarray(self.prompt_tokens, jnp.int32), self.tokens], 1)
        valid = jnp.concatenate([jnp.asarray(self.prompt_valid, bool), self.mask], 1)
        return tokens, valid


# ----------------------------------------------------------------------------------------------
# buckets and keys
# ----------------------------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def bucket_length(n: int, minimum: int = 16, per_octave: int = 8) -> int:
    """Length bucket: ``n`` rounded up to a multiple of ``max(minimum, 2**ceil(log2 n) / (2 per_octave))``.

    Tight (padding below ``max(minimum, n / per_octave)`` tokens: 12.5% at the default) and
    bounded (``per_octave`` buckets per doubling of the length above ``8 * minimum``, fewer
    below), so repeated calls reuse few compiled shapes.

    >>> [bucket_length(n) for n in (1, 16, 17, 45, 100, 129, 300, 1000)]
    [16, 16, 32, 48, 112, 144, 320, 1024]
    """
    n = max(int(n), 1)
    granule = max(minimum, (1 << (n - 1).bit_length()) // (2 * per_octave))
    return _round_up(n, granule)


def bucket_batch(n: int, multiple_of: int = 1, step: int = 8) -> int:
    """Batch bucket: 1, 2, 4, ... up to ``step``, then multiples of ``step``; a multiple of the
    number of batch shards ``multiple_of``."""
    b = 1
    while b < n and b < step:
        b *= 2
    b = b if b >= n else _round_up(n, step)
    return _round_up(b, multiple_of)


def default_cache_windows(max_new_tokens: int) -> int:
    """The decode phases ``Sampler(cache_windows=None)`` uses: one per 128 new tokens, 1 to 8,
    and 4 from 256 new tokens on (each phase is one more compiled loop body: ≈1.5-4.5 s of
    compilation for the 27-layer student on 2 CPU cores, against ≈6% of a 512-token decode
    saved per call; at 256 new tokens, bfloat16, B = 32, 4 windows ran 3-7% faster than 2:
    BUILD_NOTES "Session 27")."""
    n = max_new_tokens // 128
    return max(1, min(8, max(n, 4) if max_new_tokens >= 256 else n))


def row_keys(seed: int | jax.Array, prompt_index, sample_index) -> jax.Array:
    """``[B]`` typed keys ``fold_in(fold_in(key(seed), prompt_index), sample_index)``.

    A row's randomness depends on which prompt and which sample it is, not on its batch slot.
    """
    base = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    p = jnp.asarray(prompt_index, jnp.uint32)
    s = jnp.asarray(sample_index, jnp.uint32)
    return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base, a), b))(p, s)


def _as_row_keys(key: jax.Array, batch: int) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        typed = key
    else:  # raw uint32 keys: [2] or [B, 2]
        typed = jax.random.wrap_key_data(key)
    if typed.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(typed, i))(jnp.arange(batch, dtype=jnp.uint32))
    if typed.shape != (batch,):
        raise ValueError(f"key must be one key or one per row ({batch}); got shape {typed.shape}")
    return typed


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------


class Sampler:
    """A jitted sampler for one model architecture and one strategy.

    ``Sampler(config, sampling, max_new_tokens)(params, prompt_tokens_BxP, prompt_valid_BxP, key)``
    returns a :class:`SampleOutput` with ``B`` rows. Prompts must be left-padded (real tokens at
    the end; every row at least one). ``key``: one key (row ``b`` gets ``fold_in(key, b)``) or
    ``[B]`` keys, typed or raw.

    Args:
      config: the architecture.
      sampling: a :class:`opd_jax.sampling.Sampling` strategy.
      max_new_tokens: ``N``, tokens generated per row at most.
      eos_ids: ids that end a row (the EOS is kept in the completion); empty: never.
      return_topk: also record the model's top-``K`` ids and log-probs at every step.
      pad_id: id written after a row is done (and for padding).
      mesh, rules: shard the batch over the mesh's batch axes (``rules["batch"]``); params are
        used as placed by the caller (see :func:`shard_params`).
      layer_loop: ``"unroll"`` (per-layer decode step, least memory traffic; longer compile),
        ``"scan"`` (the decoder's layer scan) or ``"auto"`` (= ``"unroll"`` on every backend: the
        scan ran 4.8x slower per step on an H200).
      slots: ``None`` (default): one batch of all rows, decoded until its longest row ends.
        An int ``B``: continuous batching over ``B`` decode slots (rounded up to a multiple of
        the mesh's batch shards; fewer when a call has fewer rows): a slot whose row finished
        takes the next row, rows sharing a prompt share its prefill. Same tokens and log-probs
        for the same keys (to float32 rounding); worth it when rows outnumber slots or their
        lengths are ragged (EOS). Tested on one process and on a mesh of one process (several
        processes: untested). ``last_slot_stats`` holds the last call's
        :class:`~opd_jax.sampling.continuous.SlotStats`.
      chunk_steps: with ``slots``: decode steps per jitted call (host round trip) at most while
        rows are queued.
      refill_at: with ``slots``: a chunk ends early once this many slots are free while rows are
        queued (default ``max(1, B // 8)``).
      cache_windows: the decode loop runs in this many phases (``None``:
        :func:`default_cache_windows`), each attending over the part of the KV cache its
        steps can have filled (a chunk of empty slots is added per phase, nothing is copied):
        early steps of long rollouts do not read the empty end of the cache. 1 = one loop
        over the whole cache.
        More phases: more compiled loop bodies (≈1.5-4.5 s each for the 27-layer student on
        2 CPU cores, :func:`default_cache_windows`). Values agree with one phase to float32
        rounding. Not used with ``slots``.
      return_hidden: also record the final hidden state each token was drawn from
        (``SampleOutput.hidden``): a scorer of the samples under this model needs no forward.
    """

    def __init__(self, config: ModelConfig, sampling: Sampling, max_new_tokens: int, *,
                 eos_ids: Sequence[int] = (), return_topk: int | None = None, pad_id: int = 0,
                 mesh: Mesh | None = None, rules: str | dict = "fsdp",
                 layer_loop: str = "auto", slots: int | None = None, chunk_steps: int = 16,
                 refill_at: int | None = None, cache_windows: int | None = None,
                 return_hidden: bool = False):
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        if cache_windows is None:
            cache_windows = default_cache_windows(max_new_tokens)
        cache_windows = positive_int("cache_windows", cache_windows,
                                     "(or None: default_cache_windows)")
        if slots is not None:
            slots = positive_int("slots", slots, "(or None: no continuous batching)")
        chunk_steps = positive_int("chunk_steps", chunk_steps)
        if refill_at is not None:
            refill_at = positive_int("refill_at", refill_at, "(or None: slots // 8)")
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be an opd_jax.sampling.Sampling, got {sampling!r}")
        sampling.check_vocab(config.vocab_size)
        if return_topk is not None and (isinstance(return_topk, bool)
                                        or not isinstance(return_topk, (int, np.integer))
                                        or not 1 <= return_topk <= config.vocab_size):
            raise ValueError(f"return_topk={return_topk!r}; it must be an int in "
                             f"[1, V={config.vocab_size}] or None")
        eos = tuple(sorted({int(e) for e in eos_ids}))
        bad = [e for e in eos if not 0 <= e < config.vocab_size]
        if bad:
            raise ValueError(f"eos_ids {bad} are outside the vocabulary [0, {config.vocab_size})")
        rules_d = get_rules(rules)
        if layer_loop == "auto":
            layer_loop = "unroll"
        if layer_loop not in ("unroll", "scan"):
            raise ValueError(f"layer_loop={layer_loop!r}; expected 'auto', 'unroll' or 'scan'")
        self.config = config
        self.eos_ids = eos
        self.mesh = mesh
        self.rules = rules_d
        shards = batch_shards(mesh, rules_d)
        self.slots = None if slots is None else _round_up(slots, shards)
        self.chunk_steps = chunk_steps
        self.refill_at = refill_at
        self.last_slot_stats: SlotStats | None = None
        self._static = DecodeSettings(
            config=config, sampling=sampling, max_new_tokens=max_new_tokens,
            return_topk=int(return_topk or 0), pad_id=int(pad_id), mesh=mesh,
            rules=rules_key(rules_d), layer_loop=layer_loop, cache_windows=cache_windows,
            return_hidden=bool(return_hidden))

    @property
    def max_new_tokens(self) -> int:
        return self._static.max_new_tokens

    def shard_params(self, params: Params) -> Params:
        """Place ``params`` on the mesh as the rules table says (a no-op without a mesh)."""
        if self.mesh is None:
            return params
        shardings = tree_shardings(self.mesh, param_axes(self.config), self.rules,
                                   jax.tree.map(lambda x: x.shape, params))
        return jax.device_put(params, shardings)

    def _place_rows(self, x: jax.Array) -> jax.Array:
        """``x`` (``[B, ...]``, the same on every process) split over the mesh's batch axes as a
        global array. Typed PRNG keys travel as their key data and are re-wrapped: jax cannot
        place typed keys onto other processes' devices. One process: ``device_put``."""
        typed = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        data = jax.random.key_data(x) if typed else x
        sharding = named_sharding(self.mesh, ("batch",) + (None,) * (data.ndim - 1), self.rules,
                                  data.shape)
        if jax.process_count() == 1:
            placed = jax.device_put(data, sharding)
        else:
            host = np.asarray(data)
            placed = jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x)) if typed else placed

    def check_lengths(self, prompt_lengths: Sequence[int] | np.ndarray) -> None:
        """``ValueError`` naming the row when ``length + max_new_tokens > config.max_position``
        or a row is empty."""
        N, mp = self.max_new_tokens, self.config.max_position
        for i, n in enumerate(np.asarray(prompt_lengths).tolist()):
            if n < 1:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token "
                                 "(e.g. a BOS token)")
            if n + N > mp:
                raise ValueError(
                    f"prompt {i} has {n} tokens and max_new_tokens={N}: {n + N} positions exceed "
                    f"config.max_position={mp}; shorten that prompt to at most {mp - N} tokens or "
                    f"lower max_new_tokens to at most {mp - n}")

    def __call__(self, params: Params, prompt_tokens_BxP, prompt_valid_BxP, key, *,
                 lora: Lora | None = None, check: bool = True,
                 on_rows_done: RowsDone | None = None) -> SampleOutput:
        """Sample every row (class docstring). ``on_rows_done(rows_R, result)``: with ``slots``,
        called as rows finish (:func:`~opd_jax.sampling.continuous.run_slots`); without, once
        at the end with every row; ``result`` holds host arrays. It does not change the draws."""
        st = self._static
        if jax.process_count() > 1:
            # every process holds the same host batch; global inputs are gathered first
            prompt_tokens_BxP, prompt_valid_BxP, key = map(
                host_copy, (prompt_tokens_BxP, prompt_valid_BxP, key))
        tokens = jnp.asarray(prompt_tokens_BxP, jnp.int32)
        valid = jnp.asarray(prompt_valid_BxP, bool)
        if tokens.ndim != 2 or tokens.shape != valid.shape:
            raise ValueError(f"prompt tokens {tokens.shape} and valid {valid.shape} must both be "
                             "[B, P]")
        B, P = tokens.shape
        if B == 0 or P == 0:
            raise ValueError(f"empty prompt batch: shape {(B, P)}")
        if check:
            v = np.asarray(jax.device_get(valid))
            self.check_lengths(v.sum(1))
            if not v[:, -1].all():
                raise ValueError("prompts must be left-padded (every row's last token real); "
                                 "use opd_jax.data.padding.pad_left")
        keys = _as_row_keys(key, B)
        if self.slots is not None:
            return self._sample_slots(params, lora, tokens, valid, keys, on_rows_done)
        Pb = bucket_length(P)
        Bb = bucket_batch(B, batch_shards(self.mesh, self.rules))
        tokens = jnp.pad(tokens, ((0, Bb - B), (Pb - P, 0)), constant_values=st.pad_id)
        # padding rows: one real token (so no row is all padding), inactive from the start
        valid = jnp.pad(valid, ((0, Bb - B), (Pb - P, 0)))
        valid = valid.at[B:, -1].set(True)
        active = jnp.arange(Bb) < B
        if Bb > B:
            keys = jnp.concatenate([keys, jax.random.split(jax.random.key(0), Bb - B)])
        if self.mesh is not None:
            tokens, valid, active, keys = map(self._place_rows, (tokens, valid, active, keys))
        state = prefill(st, params, lora, tokens, valid, keys, active, self._eos_array())
        with warnings.catch_warnings():
            # with phases the prefill's [B, W] ``valid`` mask cannot be reused for the grown one
            warnings.filterwarnings("ignore", "Some donated buffers were not usable: bool")
            state = decode(st, tokens.shape[1], state, params, lora)
        K = st.return_topk
        out = SampleOutput(
            tokens=state.tokens[:B], mask=state.mask[:B], logprobs=state.logprobs[:B],
            logprobs_full=state.logprobs_full[:B],
            topk_ids=state.topk_ids[:B] if K else None,
            topk_logprobs=state.topk_logprobs[:B] if K else None,
            lengths=state.mask[:B].sum(1).astype(jnp.int32),
            prompt_tokens=jnp.asarray(prompt_tokens_BxP, jnp.int32),
            prompt_valid=jnp.asarray(prompt_valid_BxP, bool), num_steps=state.step,
            hidden=state.hidden[:B] if st.return_hidden else None)
        if on_rows_done is not None:   # no slots: every row is final at the end
            on_rows_done(np.arange(B), host_result(out, SlotStats(rows=B, slots=Bb)))
        return out

    def _eos_array(self) -> np.ndarray:
        """The EOS ids padded to a multiple of 4 with -1 (never drawn), so the EOS count rarely
        changes shapes."""
        eos = np.full(_round_up(max(len(self.eos_ids), 1), 4), -1, np.int32)
        eos[:len(self.eos_ids)] = self.eos_ids
        return eos

    def _sample_slots(self, params: Params, lora: Lora | None, tokens_BxP: jax.Array,
                      valid_BxP: jax.Array, keys_B: jax.Array,
                      on_rows_done: RowsDone | None = None) -> SampleOutput:
        """The ``slots`` path of :meth:`__call__` (inputs already checked; ``B`` rows queue for
        the decode slots)."""
        st = self._static
        tokens = np.asarray(jax.device_get(tokens_BxP), np.int32)
        valid = np.asarray(jax.device_get(valid_BxP), bool)
        B, P = tokens.shape
        Pb = bucket_length(P)
        shards = batch_shards(self.mesh, self.rules)
        bucket = lambda n: bucket_batch(n, shards)
        slots = self.slots if B >= self.slots else min(self.slots, bucket(B))
        refill_at = min(self.refill_at or max(1, slots // 8), slots)
        res = run_slots(
            st, params, lora, np.pad(tokens, ((0, 0), (Pb - P, 0)), constant_values=st.pad_id),
            np.pad(valid, ((0, 0), (Pb - P, 0))), keys_B, self._eos_array(), slots=slots,
            chunk_steps=self.chunk_steps, refill_at=refill_at, bucket=bucket,
            place=self._place_rows if self.mesh is not None else (lambda x: x),
            on_rows_done=on_rows_done)
        self.last_slot_stats = res.stats
        lengths = res.mask.sum(1).astype(np.int32)
        K = st.return_topk
        return SampleOutput(
            tokens=jnp.asarray(res.tokens), mask=jnp.asarray(res.mask),
            logprobs=jnp.asarray(res.logprobs), logprobs_full=jnp.asarray(res.logprobs_full),
            topk_ids=jnp.asarray(res.topk_ids) if K else None,
            topk_logprobs=jnp.asarray(res.topk_logprobs) if K else None,
            lengths=jnp.asarray(lengths), prompt_tokens=jnp.asarray(tokens_BxP, jnp.int32),
            prompt_valid=jnp.asarray(valid_BxP, bool),
            num_steps=jnp.asarray(lengths.max(initial=0), jnp.int32),
            hidden=None if res.hidden is None else jnp.asarray(res.hidden))
