"""``OPDStrategy``: a tunix ``DistillationTrainer`` strategy computing opd_jax's OPD losses.

The class is defined at import time. Its base is tunix's ``BaseStrategy`` when tunix is importable;
without tunix the module still imports (the rest of :mod:`opd_jax.integrations.tunix` is pure JAX)
and constructing an ``OPDStrategy`` raises an ``ImportError`` naming the extra to install.
"""

from __future__ import annotations

from typing import Any, Callable

from opd_jax import losses
from opd_jax.integrations.tunix.extra import require_tunix
from opd_jax.integrations.tunix.loss import (
    distillation_loss,
    labels_to_tokens,
    make_loss_spec,
    task_logprobs,
)

try:
    from tunix.distillation.strategies import BaseStrategy
except ImportError:  # the optional extra is not installed
    BaseStrategy = object
#: True when tunix could not be imported (``OPDStrategy(...)`` then raises, naming the extra).
TUNIX_MISSING = BaseStrategy is object


class OPDStrategy(BaseStrategy):
    """tunix distillation strategy computing opd_jax's OPD losses (see :mod:`opd_jax.integrations.tunix`).

    Args:
      student_forward_fn, teacher_forward_fn: ``fn(model, **inputs)`` returning ``[B, T, V]``
        logits or :class:`HiddenAndUnembed` (:func:`forward_hidden`); both the same kind.
      labels_fn: ``fn(**inputs)`` returning tunix's masked one-hot labels or int ids
        (:func:`next_token_labels`).
      objective: an opd_jax objective (``LossSpec.objective``).
      alpha: weight of the distillation loss; ``1 - alpha`` weighs cross-entropy on the labels
        (tunix ``LogitStrategy`` semantics; default 1 = pure distillation). Unlike
        ``LogitStrategy``, the divergence is not multiplied by ``temperature**2``.
      metrics_k: top-k of the logged mechanism metrics (0 = none).
      **loss_fields: the rest of :func:`make_loss_spec` (``beta``, ``top_k``, ``support``,
        ``tail``, ``weights``, ``pointwise_clip``, ``temperature``, ``reduction``,
        ``chunk_size``, ``skew_alpha``, ``estimator``).
    """

    def __init__(self, student_forward_fn: Callable, teacher_forward_fn: Callable,
                 labels_fn: Callable, objective: str = "reverse_kl", *, alpha: float = 1.0,
                 metrics_k: int = 16, **loss_fields: Any):
        if TUNIX_MISSING:
            require_tunix("tunix.distillation.strategies")  # raises the ImportError naming the extra
        super().__init__(student_forward_fn, teacher_forward_fn, labels_fn)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.spec = make_loss_spec(objective, **loss_fields)
        self.alpha = float(alpha)
        self.metrics_k = int(metrics_k)

    def compute_loss(self, student_output, teacher_output, labels):
        return distillation_loss(student_output, teacher_output, labels, spec=self.spec,
                                 alpha=self.alpha, metrics_k=self.metrics_k)

    def compute_eval_loss(self, student_output, labels):
        tokens, mask = labels_to_tokens(labels)
        lp = task_logprobs(student_output, tokens, mask, self.spec.chunk_size)
        return -losses.token_mean(lp, mask), {}
