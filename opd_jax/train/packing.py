"""Packed update rows: several ``[prompt | completion]`` sequences per row, computed on the host.

A batch row ``b`` of the unpacked layout is ``[left-padded prompt (P) | completion (N)]``; its real
tokens are ``L_b = p_b + c_b`` (prompt tokens, completion tokens up to EOS). Packing concatenates
sequences into ``M`` rows of ``R`` tokens with

* ``segments``: 1, 2, ... per sequence in a row, 0 for the row's padding tail; attention never
  crosses a segment (``decoder.forward(segment_ids_BxT=...)``);
* ``positions``: RoPE positions restarting at 0 per segment (the unpacked layout's positions count
  real tokens too, so a sequence's hidden states are the same numbers either way);
* ``gather [B, N]``: where the hidden state predicting completion token ``j`` of row ``b`` sits in
  the flattened ``[M * R]`` rows (``offset_b + p_b + j - 1``); 0 where ``j >= c_b`` (masked).

The step gathers ``hidden[gather]`` back into ``[B, N, D]``, so the chunked loss, the metrics and
everything after them run unchanged. Rows with no completion token (rejected by a filter) are not
packed at all.

Groups: rows are packed within ``groups`` contiguous blocks of the batch (``B / groups`` sequences
each, arrays ``[groups, ...]``), one per (grad-accumulation micro-batch x data-parallel shard), so
each micro-batch and each device gathers from its own rows only.

Row length: greedy first-fit-decreasing into rows of each candidate length ``R`` (the
:func:`row_length_bucket` lengths from the longest sequence up to ``max_length``), keeping the
cheapest by a FLOP count: ``M R (mm + w 4 R H E)`` for dense attention (``mm``: the per-token
matmul FLOPs; ``4 R H E``: scores and values over the whole row; ``w``: what an attention FLOP
costs relative to a matmul FLOP, measured), ``M R mm`` for blocked attention (it skips other
segments' key blocks). ``R`` and the bucketed ``M`` come from small sets, so repeated steps reuse
few compiled shapes.

Sticky shapes (:class:`ShapeMemory`): a run remembers the ``(M, R)`` it has packed into; a batch
that fits a remembered shape at most ``1 + reuse`` times the cheapest new shape's FLOP count takes
the remembered one. Each new shape is a compilation (seconds to tens of seconds for a model
step) and a new temporary-buffer size for the host allocator to place (``make demo``'s heap
grew whenever one fitted no hole: BUILD_NOTES "Session 14").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opd_jax.model.config import ModelConfig
from opd_jax.sampling.sampler import bucket_length
from opd_jax.train.batch import PackedRows

__all__ = ["pack_rows", "ShapeMemory", "first_fit", "row_count_bucket", "row_length_bucket", "token_flops",
           "TRAIN_ATTENTION_WEIGHT", "FORWARD_ATTENTION_WEIGHT", "ROW_LENGTHS_PER_OCTAVE"]


def row_count_bucket(m: int) -> int:
    """Rows per group rounded to 1, 2, 3, 4, 6, 8, 12, 16, ... (two buckets per doubling).

    >>> [row_count_bucket(m) for m in (1, 2, 3, 5, 7, 9, 13)]
    [1, 2, 3, 6, 8, 12, 16]
    """
    return bucket_length(m, minimum=1, per_octave=2)


def token_flops(config: ModelConfig) -> float:
    """Forward matmul FLOPs per token and layer outside attention's scores (projections + MLP)."""
    D, H, G, E, F = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                     config.ffn_dim)
    return 2.0 * (D * H * E + 2 * D * G * E + H * E * D + 3 * D * F)


def first_fit(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Greedy first-fit-decreasing: item indices per row (each row's lengths sum to <= row_len).

    >>> first_fit([5, 3, 4, 2], 7)
    [[0, 3], [2, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_len - n)
    return rows


#: Packed row lengths per doubling (:func:`row_length_bucket`).
ROW_LENGTHS_PER_OCTAVE = 8


def row_length_bucket(n: int) -> int:
    """Packed row lengths: multiples of 16 up to 256, then :data:`ROW_LENGTHS_PER_OCTAVE` per
    doubling (at most 12.5% over ``n``). Fine enough that a few sequences fill a row (the demo's
    8 sequences of 55-85 tokens: 4 rows of 160, 640 tokens, against 8 rows of 96 with two
    lengths per doubling, 768: a 12% faster step, BUILD_NOTES "Session 16"); the run's
    :class:`ShapeMemory` keeps the number of compiled shapes small.

    >>> [row_length_bucket(n) for n in (10, 70, 100, 150, 300, 600)]
    [16, 80, 112, 160, 320, 640]
    """
    return bucket_length(n, minimum=16, per_octave=ROW_LENGTHS_PER_OCTAVE)


class ShapeMemory:
    """The packed shapes ``(M, R)`` a run has used (so compiled), in first-use order.

    ``reuse``: how much more computation a remembered shape may cost than the cheapest new one
    and still be taken (0.25: up to 25% more FLOPs to skip a compilation; 0: only an equally cheap
    one). One memory per packed program input (the student's rows, the teacher's)."""

    def __init__(self, reuse: float = 0.25):
        if not reuse >= 0:
            raise ValueError(f"reuse must be a number >= 0, got {reuse!r}")
        self.reuse = float(reuse)
        self.shapes: list[tuple[int, int]] = []

    def remember(self, rows: int, length: int) -> None:
        if (rows, length) not in self.shapes:
            self.shapes.append((rows, length))


def _choose(lengths_by_group: list[list[int]], config: ModelConfig, max_length: int,
            blocked: bool, attention_weight: float, memory: ShapeMemory | None = None
            ) -> tuple[int, int, list[list[list[int]]]]:
    """``(M, R, layout)``: the cheapest bucketed shape, or a remembered one within ``reuse``."""
    longest = max((n for g in lengths_by_group for n in g), default=1)
    cap = max(row_length_bucket(longest), row_length_bucket(min(max_length, max(
        (sum(g) for g in lengths_by_group), default=1))))
    mm, attn = token_flops(config), 4.0 * config.n_heads * config.head_dim * attention_weight
    cost = lambda m, r: m * r * (mm + (0.0 if blocked else attn * r))
    best = None
    r = row_length_bucket(longest)
    while r <= cap:
        layout = [first_fit(g, r) for g in lengths_by_group]
        m = row_count_bucket(max((len(rows) for rows in layout), default=1))
        if best is None or cost(m, r) < best[0]:
            best = (cost(m, r), m, r, layout)
        r = row_length_bucket(r + 1)
    if memory is not None:
        # the cheapest remembered shape the batch fits, if it costs at most 1 + reuse times more
        reused = None
        for m, r in memory.shapes:
            if r < longest or cost(m, r) > (1 + memory.reuse) * best[0]:
                continue
            if reused is not None and cost(m, r) >= reused[0]:
                continue
            layout = [first_fit(g, r) for g in lengths_by_group]
            if max((len(rows) for rows in layout), default=1) <= m:
                reused = (cost(m, r), m, r, layout)
        best = reused or best
        memory.remember(best[1], best[2])
    return best[1], best[2], best[3]


# Dense attention's FLOPs cost more time than matmul FLOPs (masking, softmax, exp are memory
# bound): measured on the demo (2-core CPU, SmolLM2 sizes), ~2.4x in a forward + backward pass
# (student, 640-token packed row vs 8 x 96 padded rows) and well under 1x in a forward pass (the
# teacher's packed forward ran 1.7x faster on 17% fewer tokens). BUILD_NOTES "packed update".
TRAIN_ATTENTION_WEIGHT = 3.0
FORWARD_ATTENTION_WEIGHT = 0.5


def pack_rows(tokens_BxT: np.ndarray, valid_BxT: np.ndarray, n_completion: int, *, groups: int,
              config: ModelConfig, max_length: int = 4096, blocked: bool = False,
              attention_weight: float = TRAIN_ATTENTION_WEIGHT,
              shapes: ShapeMemory | None = None) -> PackedRows:
    """Pack the ``[prompt | completion]`` rows ``tokens_BxT`` (``valid_BxT``: real tokens; the last
    ``n_completion`` columns are the completion, real tokens a prefix of it) into a
    :class:`~opd_jax.train.batch.PackedRows` of ``groups`` groups. ``attention_weight``: time of
    a dense-attention FLOP relative to a matmul FLOP in the row-length choice (training vs a
    forward-only teacher). ``shapes``: the run's :class:`ShapeMemory` (updated in place), so a
    batch that fits an already compiled shape at little extra cost reuses it."""
    tokens_BxT, valid_BxT = np.asarray(tokens_BxT), np.asarray(valid_BxT, bool)
    B, T = tokens_BxT.shape
    if B % groups:
        raise ValueError(f"{B} rows do not split into {groups} packing groups (grad_accum_steps x "
                         "data-parallel shards); make batch rows a multiple")
    P, N = T - n_completion, n_completion
    p_B = valid_BxT[:, :P].sum(axis=1)
    c_B = valid_BxT[:, P:].sum(axis=1)
    if np.any((c_B > 0) & (p_B == 0)):
        raise ValueError("a row with a completion has no prompt token: nothing predicts its first "
                         "completion token")
    per = B // groups
    lengths = [[int(p_B[b] + c_B[b]) if c_B[b] > 0 else 0 for b in range(g * per, (g + 1) * per)]
               for g in range(groups)]
    packed_idx = [[i for i, n in enumerate(g) if n > 0] for g in lengths]
    M, R, layouts = _choose([[g[i] for i in idx] for g, idx in zip(lengths, packed_idx)], config,
                            max_length, blocked, attention_weight, shapes)
    tokens = np.zeros((groups, M, R), np.int32)
    valid = np.zeros((groups, M, R), bool)
    segments = np.zeros((groups, M, R), np.int32)
    positions = np.zeros((groups, M, R), np.int32)
    gather = np.zeros((groups, per, N), np.int32)
    for g, (idx, rows) in enumerate(zip(packed_idx, layouts)):
        for r, row in enumerate(rows):
            offset = 0
            for seg, k in enumerate(row, start=1):
                b = g * per + idx[k]
                seq = tokens_BxT[b][valid_BxT[b]]
                n, p, c = len(seq), int(p_B[b]), int(c_B[b])
                tokens[g, r, offset:offset + n] = seq
                valid[g, r, offset:offset + n] = True
                segments[g, r, offset:offset + n] = seg
                positions[g, r, offset:offset + n] = np.arange(n)
                gather[g, idx[k], :c] = r * R + offset + p - 1 + np.arange(c)
                offset += n
    return PackedRows(tokens=tokens, valid=valid, segments=segments, positions=positions,
                      gather=gather)
