"""Continuous batching, the host side: many rows through a fixed number of decode slots.

:func:`run_slots` is what ``Sampler(..., slots=B)`` runs. The ``Q`` requested rows wait in a
queue (in row order); ``B`` decode slots (the programs of :mod:`opd_jax.sampling.slots`) work
on them:

1. **admit**: free slots take the next queued rows. Rows with the same (padded) prompt -- the
   ``n_samples`` copies of a prompt -- are prefilled once per admit and their cache is copied
   into each of their slots; the ``U`` distinct prompts are padded to a batch bucket, so few
   admit shapes compile.
2. **decode a chunk**: :func:`~opd_jax.sampling.slots.decode_chunk` steps every live slot until
   ``chunk_steps`` steps ran or ``refill_at`` slots are done (while rows are queued), or until
   every slot is done (once the queue is empty: the tail runs in one call).
3. **harvest**: the host reads the slots' ``done`` flags; finished rows' outputs are copied into
   the ``[Q, N]`` results and their slots freed; ``on_rows_done(rows, result)`` (optional) hears
   which rows are final (e.g. to send them to a teacher while the rest decode,
   :mod:`opd_jax.train.overlap`). Back to 1 until the queue and the slots are empty.

Shapes stay static over a run (``B`` slots, the prompt bucket ``P``, ``N``), so a run compiles
one decode program, one init and one admit program per ``U`` bucket (``1, 2, 4, 8, 16, ...``),
whatever ``Q`` is. A row's tokens and log-probs equal the plain sampler's for the same key (see
:mod:`opd_jax.sampling.slots`).

Shapes: ``Q`` queued rows, ``B`` decode slots, ``U`` distinct prompts of one admit, ``P`` prompt
bucket, ``N`` max new tokens, ``K`` recorded top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from opd_jax.model.decoder import Lora, Params
from opd_jax.sampling.loop import DecodeSettings
from opd_jax.sampling.slots import admit, decode_chunk, dtype_name, init_slots, key_impl_of

__all__ = ["SlotStats", "SlotResult", "RowsDone", "run_slots", "fetch", "host_copy",
           "host_result"]


@dataclasses.dataclass
class SlotStats:
    """What one :func:`run_slots` did.

    Attributes:
      rows: ``Q``, rows generated.
      slots: ``B``, decode slots used.
      chunks: :func:`~opd_jax.sampling.slots.decode_chunk` calls (host round trips).
      admits: :func:`~opd_jax.sampling.slots.admit` calls.
      prefilled_prompts: prompts prefilled (``< rows`` when samples of a prompt shared one).
      decode_steps: decode steps run (each steps all ``B`` slots).
      live_slot_steps: slot-steps spent on a live row (``<= decode_steps * slots``).
    """

    rows: int
    slots: int
    chunks: int = 0
    admits: int = 0
    prefilled_prompts: int = 0
    decode_steps: int = 0
    live_slot_steps: int = 0

    @property
    def utilization(self) -> float:
        """Share of the decode steps' slot-rows that worked on a live row."""
        return self.live_slot_steps / max(self.decode_steps * self.slots, 1)


class SlotResult(NamedTuple):
    """:func:`run_slots`' outputs as host arrays (``N`` = max new tokens), in row order; the
    fields mean what :class:`opd_jax.sampling.sampler.SampleOutput`'s do."""

    tokens: np.ndarray         # [Q, N] int32
    mask: np.ndarray           # [Q, N] bool
    logprobs: np.ndarray       # [Q, N] float32
    logprobs_full: np.ndarray  # [Q, N] float32
    topk_ids: np.ndarray       # [Q, N, K] int32 (K = 0 when not recorded)
    topk_logprobs: np.ndarray  # [Q, N, K] float32
    stats: SlotStats
    hidden: np.ndarray | None = None  # [Q, N, D] with ``return_hidden``


#: ``on_rows_done(rows_R, result)``: rows ``rows_R`` of ``result`` are final (:func:`run_slots`)
RowsDone = Callable[[np.ndarray, SlotResult], None]


def host_result(out, stats: SlotStats) -> SlotResult:
    """A :class:`~opd_jax.sampling.sampler.SampleOutput`'s rows as a :class:`SlotResult` of host
    arrays (``K = 0`` top-k when not recorded): what the plain sampler hands ``on_rows_done``."""
    tokens, mask, lp, lp_full, ids, tlp, hidden = fetch((
        out.tokens, out.mask, out.logprobs, out.logprobs_full, out.topk_ids, out.topk_logprobs,
        out.hidden))
    if ids is None:
        ids = np.zeros(tokens.shape + (0,), np.int32)
        tlp = np.zeros(tokens.shape + (0,), np.float32)
    return SlotResult(tokens, mask, lp, lp_full, ids, tlp, stats, hidden)


def fetch(x):
    """A device array (or a tree of them) as numpy on this host; arrays spanning other
    processes are gathered from every process first."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


def host_copy(x):
    """A multi-process input on the host: global arrays gathered from every process (typed keys
    as key data, re-wrapped locally); anything else as is."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = multihost_utils.process_allgather(jax.random.key_data(x), tiled=True)
        return jax.random.wrap_key_data(np.asarray(data), impl=jax.random.key_impl(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _prompt_ids(tokens_QxP: np.ndarray, valid_QxP: np.ndarray) -> np.ndarray:
    """``[Q]`` id of each row's prompt: rows with equal (tokens, valid) share an id."""
    seen: dict[bytes, int] = {}
    ids = np.empty(tokens_QxP.shape[0], np.int64)
    for q in range(tokens_QxP.shape[0]):
        key = tokens_QxP[q].tobytes() + valid_QxP[q].tobytes()
        ids[q] = seen.setdefault(key, len(seen))
    return ids


def run_slots(st: DecodeSettings, params: Params, lora: Lora | None, tokens_QxP: np.ndarray,
              valid_QxP: np.ndarray, keys_Q: jax.Array, eos_E: np.ndarray, *, slots: int,
              chunk_steps: int, refill_at: int, bucket: Callable[[int], int],
              place: Callable[[np.ndarray], jax.Array] = lambda x: x,
              on_rows_done: RowsDone | None = None) -> SlotResult:
    """Generate ``Q`` rows through ``slots`` decode slots (the module docstring's loop).

    Args:
      st: the sampler's static settings.
      params, lora: the model, as placed by the caller.
      tokens_QxP, valid_QxP: left-padded prompts (``P`` already a length bucket), host arrays.
      keys_Q: ``[Q]`` typed row keys; row ``q``'s token ``s`` draws with ``fold_in(keys_Q[q], s)``.
      eos_E: int32 EOS ids (``-1`` never matches).
      slots: ``B`` decode slots (a multiple of the mesh's batch shards).
      chunk_steps: decode steps per host round trip at most while rows are queued.
      refill_at: a chunk ends early once this many slots are done (while rows are queued).
      bucket: the batch bucket of ``U`` distinct prompts per admit (a multiple of the shards).
      place: puts a ``[B, ...]`` / ``[U, ...]`` host array on the mesh (identity without one).
      on_rows_done: called as ``on_rows_done(rows_R, result)`` after each harvest that finished
        rows: ``rows_R`` (int64, ascending) are the rows whose outputs in ``result`` (the
        :class:`SlotResult` being filled, later returned) are final; every row is reported
        exactly once. It must not write into ``result``; what it raises ends the run.

    Returns:
      :class:`SlotResult`.
    """
    tokens_QxP = np.asarray(tokens_QxP, np.int32)
    valid_QxP = np.asarray(valid_QxP, bool)
    Q, P = tokens_QxP.shape
    B, N, K = slots, st.max_new_tokens, st.return_topk
    key_impl = key_impl_of(keys_Q)
    key_data_Qx2 = fetch(jax.random.key_data(keys_Q))
    prompt_Q = _prompt_ids(tokens_QxP, valid_QxP)
    out = SlotResult(
        tokens=np.full((Q, N), st.pad_id, np.int32), mask=np.zeros((Q, N), bool),
        logprobs=np.zeros((Q, N), np.float32), logprobs_full=np.zeros((Q, N), np.float32),
        topk_ids=np.zeros((Q, N, K), np.int32), topk_logprobs=np.zeros((Q, N, K), np.float32),
        stats=SlotStats(rows=Q, slots=B),
        hidden=(np.zeros((Q, N, st.config.d_model), jnp.dtype(dtype_name(params)))
                if st.return_hidden else None))
    stats = out.stats

    state = init_slots(st, B, P, dtype_name(params), key_impl, np.asarray(eos_E, np.int32))
    row_B = np.full(B, -1, np.int64)  # the row each slot works on; -1: free
    queued = 0                        # rows [0, queued) have been admitted
    while True:
        free = np.flatnonzero(row_B < 0)
        take = min(free.size, Q - queued)
        if take:
            rows = np.arange(queued, queued + take)
            queued += take
            targets = free[:take]
            distinct, first, src = np.unique(prompt_Q[rows], return_index=True,
                                             return_inverse=True)
            U = bucket(distinct.size)
            tok_UxP = np.full((U, P), st.pad_id, np.int32)
            val_UxP = np.zeros((U, P), bool)
            val_UxP[:, -1] = True  # padding prompts: one real token, never taken by a slot
            tok_UxP[:distinct.size] = tokens_QxP[rows[first]]
            val_UxP[:distinct.size] = valid_QxP[rows[first]]
            src_B = np.full(B, -1, np.int32)
            src_B[targets] = src.reshape(-1)
            key_data_Bx2 = np.zeros((B,) + key_data_Qx2.shape[1:], key_data_Qx2.dtype)
            key_data_Bx2[targets] = key_data_Qx2[rows]
            state = admit(st, key_impl, state, params, lora, place(tok_UxP), place(val_UxP),
                          place(src_B), place(key_data_Bx2))
            row_B[targets] = rows
            stats.admits += 1
            stats.prefilled_prompts += int(distinct.size)
        if (row_B < 0).all():
            break
        waiting = queued < Q
        state = decode_chunk(st, state, params, lora,
                             np.int32(chunk_steps if waiting else N),
                             np.int32(refill_at if waiting else B + 1))
        stats.chunks += 1
        finished = np.flatnonzero(fetch(state.done) & (row_B >= 0))
        if finished.size:
            got = fetch((state.tokens, state.mask, state.logprobs, state.logprobs_full,
                         state.topk_ids, state.topk_logprobs)
                        + ((state.hidden,) if st.return_hidden else ()))
            done_R = row_B[finished]
            for dst, src in zip(out[:6] + out[7:8], got):
                dst[done_R] = src[finished]
            row_B[finished] = -1
            if on_rows_done is not None:
                on_rows_done(np.sort(done_R), out)
    stats.decode_steps = int(fetch(state.decode_steps))
    stats.live_slot_steps = int(fetch(state.live_slot_steps))
    return out
