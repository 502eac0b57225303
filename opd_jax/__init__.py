"""opd_jax: JAX-native on-policy distillation of language models.

Shape legend (used in every tensor name across the package, e.g. ``logits_BxTxV``):

====  ==========================================================
B     batch (rows / sequences)
T     time (token positions of the current call)
S     KV-cache slots (max sequence length held by the cache)
V     vocabulary
D     model width (``d_model``)
F     MLP hidden width (``ffn_dim``)
H     query heads
G     key/value heads (grouped-query attention)
E     head dimension
K     top-k
L     layers
C     chunk of tokens (memory-bounded loss / scoring)
R     LoRA rank
====  ==========================================================

Public entry points are imported lazily so ``import opd_jax.losses`` stays cheap
for users who only want the losses inside their own trainer.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "opd_jax.model.loading",
    "load_tokenizer": "opd_jax.model.tokenizer",
    "default_teacher": "opd_jax.model.assets",
    "generate": "opd_jax.sampling.generation",
    "losses": "opd_jax.losses",
    "metrics": "opd_jax.metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'opd_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
