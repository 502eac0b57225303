"""Bridges between opd_jax and other JAX training libraries (optional extras).

* :mod:`opd_jax.integrations.tunix` -- ``pip install "opd_jax[tunix]"``: opd_jax losses as a tunix
  ``DistillationTrainer`` strategy, tunix Qwen3 models as opd_jax teachers / students and back,
  and a hidden-state forward for memory-bounded (chunked) losses on any tunix decoder.

Nothing here is imported by ``import opd_jax``; each integration imports without its library
(the pure-JAX parts keep working) and names the extra to install when a part needs it.
"""
