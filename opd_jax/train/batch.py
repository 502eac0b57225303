"""The batch types a train step consumes (no imports from :mod:`opd_jax.train`)."""

from __future__ import annotations

import flax.struct
import jax

from opd_jax.teacher.scores import TeacherScores

__all__ = ["RolloutBatch", "PackedRows"]


@flax.struct.dataclass
class PackedRows:
    """One model's sequences packed several per row (``opd_jax.train.packing``), in ``G`` groups
    of ``M`` rows of ``R`` tokens: ``tokens`` / ``valid`` / ``segments`` (1, 2, ... per sequence,
    0 = padding) / ``positions`` (restarting per segment) ``[G, M, R]``; ``gather`` ``[G, B/G, N]``:
    the index in the group's flattened ``[M * R]`` hidden states predicting each completion token
    (0 where masked)."""

    tokens: jax.Array
    valid: jax.Array
    segments: jax.Array
    positions: jax.Array
    gather: jax.Array


@flax.struct.dataclass
class RolloutBatch:
    """One step's sequences. ``student_tokens``/``student_valid``: ``[B, Ps + N]``;
    ``teacher_tokens``/``teacher_valid``: ``[B, Pt + N]`` (same completion, the teacher's own
    prompt); ``completion``/``mask``/``sampler_logprobs``: ``[B, N]``. ``student_packed`` /
    ``teacher_packed``: the same sequences packed (the step then runs on those rows instead of
    the padded ``[B, P + N]`` ones); ``None`` = unpacked. ``outcome_advantage``: optional
    ``[B, N]`` per-sample outcome advantage (GRPO over the prompt's samples, times its weight),
    repeated over the completion; ``None`` = none. ``teacher_scores``: a served or cached teacher's
    scores of the completion (:class:`~opd_jax.teacher.scores.TeacherScores`, ``[B, N, ...]``),
    used in place of the teacher's logits (``TeacherSpec("scores")``); ``None`` = none.
    ``teacher_route``: ``[B]`` int32, which of several teachers scored each row (``teachers:``),
    for per-teacher metrics; ``None`` = one teacher."""

    student_tokens: jax.Array
    student_valid: jax.Array
    teacher_tokens: jax.Array
    teacher_valid: jax.Array
    completion: jax.Array
    mask: jax.Array
    sampler_logprobs: jax.Array
    student_packed: PackedRows | None = None
    teacher_packed: PackedRows | None = None
    outcome_advantage: jax.Array | None = None
    teacher_scores: TeacherScores | None = None
    teacher_route: jax.Array | None = None
