"""② Sampling: the student's rollouts.

``strategies`` (greedy / temperature / top-k / top-p / min-p as small frozen dataclasses, and the
one-uniform-per-row inverse-CDF draw), ``loop`` (the jitted prefill and ``lax.while_loop`` decode
over a KV cache), ``slots`` and ``continuous`` (opt-in continuous batching: the jitted programs
over decode slots and a ring KV cache, and the host loop that refills finished slots),
``sampler`` (:class:`Sampler`, what a trainer calls: bucketed shapes, device arrays out) and
``generation`` (:func:`generate`, the user API: token-id lists in and out).
"""

from opd_jax.sampling.generation import GenerateOutput, generate
from opd_jax.sampling.sampler import SampleOutput, Sampler
from opd_jax.sampling.strategies import Greedy, MinP, Sampling, Temperature, TopK, TopP

__all__ = ["Sampling", "Greedy", "Temperature", "TopK", "TopP", "MinP", "Sampler", "SampleOutput",
           "generate", "GenerateOutput"]
