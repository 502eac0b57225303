"""The batch types a train step consumes (no imports from :mod:`opd_jax.train`)."""

from __future__ import annotations

import flax.struct
import jax

__all__ = ["RolloutBatch"]


@flax.struct.dataclass
class RolloutBatch:
    """One step's sequences. ``student_tokens``/``student_valid``: ``[B, Ps + N]``;
    ``teacher_tokens``/``teacher_valid``: ``[B, Pt + N]`` (same completion, the teacher's own
    prompt); ``completion``/``mask``/``sampler_logprobs``: ``[B, N]``."""

    student_tokens: jax.Array
    student_valid: jax.Array
    teacher_tokens: jax.Array
    teacher_valid: jax.Array
    completion: jax.Array
    mask: jax.Array
    sampler_logprobs: jax.Array
