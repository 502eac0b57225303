"""Compatibility path: ``opd_jax.sampler.Sampler`` (the sampler lives in :mod:`opd_jax.sampling`)."""

from opd_jax.sampling.generation import GenerateOutput, generate
from opd_jax.sampling.sampler import SampleOutput, Sampler

__all__ = ["Sampler", "SampleOutput", "generate", "GenerateOutput"]
