r"""opd_jax <-> tunix (``google-tunix`` 0.1.7): OPD losses in tunix's ``DistillationTrainer``, tunix
models as opd_jax teachers / students.

Install: ``pip install "opd_jax[tunix]"`` (``google-tunix==0.1.7`` and ``safetensors<0.8``). ``import
opd_jax.integrations.tunix`` works without tunix (and imports it when installed); without it,
constructing an ``OPDStrategy`` or converting to a tunix module raises an ``ImportError`` naming
the extra.

Submodules: :mod:`~opd_jax.integrations.tunix.loss` (labels, loss spec, ``distillation_loss``;
pure JAX), :mod:`~opd_jax.integrations.tunix.forward` (forward functions for tunix decoders),
:mod:`~opd_jax.integrations.tunix.strategy` (``OPDStrategy``),
:mod:`~opd_jax.integrations.tunix.qwen3` (Qwen3 converters) and
:mod:`~opd_jax.integrations.tunix.extra` (the missing-extra error). Everything public is
re-exported here.

**Switch a tunix distillation to an opd_jax loss with one line**::

    from opd_jax.integrations.tunix import OPDStrategy
    # was: strategy = strategies.LogitStrategy(model_forward_fn, model_forward_fn, labels_fn)
    strategy = OPDStrategy(model_forward_fn, model_forward_fn, labels_fn, "generalized_jsd", beta=0.5)
    trainer = distillation_trainer.DistillationTrainer(student, teacher, strategy, optimizer, config)

``OPDStrategy`` takes the same three callables as tunix's ``LogitStrategy`` (forward functions
returning ``[B, T, V]`` logits, a ``labels_fn`` returning tunix's masked one-hot labels or
:func:`next_token_labels`' int ids) and any objective of the opd_jax trainer, with the trainer's
config vocabulary (:class:`opd_jax.config.loss.LossSpec`): ``"reverse_kl"``, ``"forward_kl"``,
``"generalized_jsd"`` (``beta``), ``"skew_forward_kl"`` / ``"skew_reverse_kl"`` (``alpha`` of the
skew is ``skew_alpha`` here), the OPD top-k shared support (``top_k=16, support="union", tail=
"bucket"``), ``"topk_reward"`` (the OPD paper's policy-gradient surrogate) and
``"sampled_token_rkl"``. The loss is *exactly* the opd_jax trainer's (same per-chunk function,
same reduction), masked per token, and the OPD mechanism metrics (top-k overlap, shared mass,
entropies) are returned as ``distill/*`` metrics. With :func:`forward_hidden` as the forward
functions the loss is computed chunk by chunk from hidden states and the unembedding
(:func:`opd_jax.losses.chunked_logits_map`): no ``[B, T, V]`` logits, for 150k vocabularies.

tunix's trainer distils on the batches it is given; for *on-policy* distillation feed it the
student's own rollouts (``opd_jax.generate`` on the converted student, or tunix's sampler) and
mask the prompt tokens out of the labels.

**tunix Qwen3 models in opd_jax**: :func:`from_tunix_qwen3` converts a tunix ``Qwen3`` (dense) into an
opd_jax :class:`~opd_jax.model.loading.Model` (config + parameter tree of
:mod:`opd_jax.model.config`), usable as a teacher or a student by ``opd_jax.generate``,
``opd_jax.train.run.run(cfg, models=...)`` and the chunked losses; :func:`to_tunix_qwen3` converts
back (e.g. a distilled student) into a tunix ``Qwen3`` module.

BUILD NOTES (measured on this project's CPU machines, tunix 0.1.7, jax 0.10.2, flax 0.12.8):

* ``google-tunix`` is the PyPI name; ``tunix`` on PyPI is an unrelated 0.0.0 placeholder with no
  code. tunix 0.1.7 needs ``safetensors<0.8`` and pulls transformers, datasets,
  tensorflow-datasets, kagglehub, numba, qwix, ...: its virtualenv is 1.6 GB, which is why it
  stays an optional extra. This module and its tests import far less: CI (``make test``) installs
  ``google-tunix==0.1.7`` with ``--no-deps`` plus jaxtyping, wadler-lindig, google-metrax, clu,
  tensorboardX, perfetto, wrapt and pandas (``TUNIX_LEAN`` in the Makefile, ≈30 s).
* tunix 0.1.7's Qwen3 (and Llama3) attention calls ``apply_rope`` without the config's
  ``rope_theta``: its RoPE base is always ``1_000_000`` whatever ``ModelConfig.rope_theta`` says.
  :func:`from_tunix_qwen3` therefore defaults to ``rope_theta="tunix"`` (``1e6``, reproducing
  tunix's own logits bit for bit); pass ``rope_theta="config"`` to use the checkpoint's true base
  (what Hugging Face computes; differs for e.g. Qwen3-4B-2507, base ``5e6``). Tests use
  ``rope_theta=1_000_000`` so both agree.
* tunix initialises Qwen3 MLP kernels to zeros; tests randomise every parameter before comparing.
* Gemma3's normalisation ``(1 + w)``, embedding scaling and sliding windows are not in opd_jax's
  decoder, so Gemma3 has no parameter converter; :func:`forward_hidden` / :func:`hidden_states`
  run any tunix decoder with ``embedder`` / ``layers`` / ``final_norm`` (Qwen3, Qwen2, Llama3,
  Gemma3 text) and return hidden states + unembedding for the chunked losses.
"""

from opd_jax.integrations.tunix.extra import EXTRA, require_tunix
from opd_jax.integrations.tunix.forward import (
    HiddenAndUnembed,
    forward_hidden,
    forward_logits,
    hidden_states,
    unembedding,
)
from opd_jax.integrations.tunix.loss import (
    distillation_loss,
    labels_to_tokens,
    make_loss_spec,
    next_token_labels,
    task_logprobs,
)
from opd_jax.integrations.tunix.qwen3 import (
    TUNIX_ROPE_THETA,
    from_tunix_qwen3,
    params_from_tunix_qwen3,
    qwen3_config_from_tunix,
    to_tunix_qwen3,
)
from opd_jax.integrations.tunix.strategy import TUNIX_MISSING, OPDStrategy

__all__ = [
    "EXTRA",
    "TUNIX_MISSING",
    "TUNIX_ROPE_THETA",
    "HiddenAndUnembed",
    "OPDStrategy",
    "require_tunix",
    "make_loss_spec",
    "labels_to_tokens",
    "next_token_labels",
    "task_logprobs",
    "distillation_loss",
    "hidden_states",
    "unembedding",
    "forward_hidden",
    "forward_logits",
    "qwen3_config_from_tunix",
    "params_from_tunix_qwen3",
    "from_tunix_qwen3",
    "to_tunix_qwen3",
]
