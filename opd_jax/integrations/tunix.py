r"""opd_jax <-> tunix (``google-tunix`` 0.1.7): OPD losses in tunix's ``DistillationTrainer``, tunix
models as opd_jax teachers / students.

Install: ``pip install "opd_jax[tunix]"`` (``google-tunix==0.1.7`` and ``safetensors<0.8``). tunix is
imported lazily: ``import opd_jax.integrations.tunix`` works without it, and the first use of a
piece that needs it raises an ``ImportError`` naming the extra.

**Switch a tunix distillation to an opd_jax loss with one line**::

    from opd_jax.integrations.tunix import OPDStrategy
    # was: strategy = strategies.LogitStrategy(model_forward_fn, model_forward_fn, labels_fn)
    strategy = OPDStrategy(model_forward_fn, model_forward_fn, labels_fn, "generalized_jsd", beta=0.5)
    trainer = distillation_trainer.DistillationTrainer(student, teacher, strategy, optimizer, config)

``OPDStrategy`` takes the same three callables as tunix's ``LogitStrategy`` (forward functions
returning ``[B, T, V]`` logits, a ``labels_fn`` returning tunix's masked one-hot labels or
:func:`next_token_labels`' int ids) and any objective of the opd_jax trainer, with the trainer's
config vocabulary (:class:`opd_jax.config.schema.LossSpec`): ``"reverse_kl"``, ``"forward_kl"``,
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

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from opd_jax import losses
from opd_jax.config.schema import LossSpec
from opd_jax.model.config import ModelConfig

__all__ = [
    "EXTRA",
    "TUNIX_ROPE_THETA",
    "HiddenAndUnembed",
    "OPDStrategy",
    "require_tunix",
    "make_loss_spec",
    "labels_to_tokens",
    "next_token_labels",
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

#: How to install what this module needs.
EXTRA = ('pip install "opd_jax[tunix]"  (that is google-tunix==0.1.7 and safetensors<0.8; the '
         'PyPI package named plain "tunix" is an unrelated placeholder)')
#: The RoPE base tunix 0.1.7's Qwen3 / Llama3 attention uses, whatever its config says.
TUNIX_ROPE_THETA = 1_000_000.0
# Metrics of the opd_jax chunk function that need the sampler's log-probs (absent here).
_SAMPLER_METRICS = ("logprob_gap", "abs_logprob_gap")


def require_tunix(module: str = "tunix") -> Any:
    """Import ``module`` (a tunix module) or raise an ``ImportError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"opd_jax.integrations.tunix needs tunix ({module} failed to import: "
                          f"{e}). Install it with: {EXTRA}") from e


class HiddenAndUnembed(NamedTuple):
    """A forward output for memory-bounded losses: final-norm ``hidden`` ``[B, T, D]`` and the
    ``unembed`` ``[D, V]`` with ``logits = hidden @ unembed`` (a pytree: passes through
    ``nnx.jit`` and ``stop_gradient`` as is)."""

    hidden: jax.Array
    unembed: jax.Array


# ----------------------------------------------------------------------------------------------
# the loss (pure JAX: no tunix needed)
# ----------------------------------------------------------------------------------------------


def make_loss_spec(objective: str = "reverse_kl", *, top_k: int | None = None,
                   skew_alpha: float = 0.1, **fields: Any) -> LossSpec:
    """A validated :class:`~opd_jax.config.schema.LossSpec` (the trainer's ``loss:`` section).

    Unlike the config default, ``top_k`` defaults to ``None`` (full vocabulary). ``skew_alpha``
    is ``LossSpec.alpha`` (renamed here: ``alpha`` is the distillation/task weight of tunix's
    strategies). ``pg_loss`` must stay ``"plain"``: tunix batches carry no sampler log-probs.
    """
    spec = LossSpec(objective=objective, top_k=top_k, alpha=skew_alpha, **fields)
    spec.validate()
    if spec.pg_loss != "plain":
        raise ValueError(f"pg_loss={spec.pg_loss!r} needs sampler log-probs, which tunix batches "
                         "do not carry; use pg_loss='plain'")
    return spec


def labels_to_tokens(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(tokens [B, T] int32, mask [B, T] bool)`` from tunix labels.

    Accepts tunix's convention -- one-hot ``[B, T, V]`` labels multiplied by the target mask
    (masked rows are all zero) -- or int ids ``[B, T]`` with negative ids masked (see
    :func:`next_token_labels`, which avoids a ``[B, T, V]`` label buffer). Masked tokens are 0.
    """
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.ndim != 2:
            raise ValueError(f"int labels must be [B, T] token ids, got shape {labels.shape}")
        mask = labels >= 0
        return jnp.where(mask, labels, 0).astype(jnp.int32), mask
    if labels.ndim != 3:
        raise ValueError(f"float labels must be one-hot [B, T, V], got shape {labels.shape}")
    mask = jnp.sum(labels, axis=-1) > 0
    return jnp.where(mask, jnp.argmax(labels, axis=-1), 0).astype(jnp.int32), mask


def next_token_labels(input_tokens: jax.Array, input_mask: jax.Array, **unused: Any) -> jax.Array:
    """A tunix ``labels_fn``: ``[B, T-1]`` int32 next-token ids, ``-1`` where masked.

    Aligned with :func:`forward_hidden` / :func:`forward_logits` (position ``t`` predicts token
    ``t + 1``); to train on completions only, pass an ``input_mask`` that is False on prompts.
    """
    del unused
    mask = jnp.asarray(input_mask)[:, 1:].astype(bool)
    return jnp.where(mask, jnp.asarray(input_tokens)[:, 1:], -1).astype(jnp.int32)


def _task_logprobs(student_output, tokens, mask, chunk_size: int) -> jax.Array:
    if isinstance(student_output, HiddenAndUnembed):
        return losses.chunked_token_logprobs(student_output.hidden, student_output.unembed,
                                             tokens, chunk_size=chunk_size, where=mask)
    return losses.token_logprobs(student_output, tokens, where=mask)


def distillation_loss(student_output: jax.Array | HiddenAndUnembed,
                      teacher_output: jax.Array | HiddenAndUnembed, labels: jax.Array, *,
                      spec: LossSpec, alpha: float = 1.0, metrics_k: int = 16
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""``(loss, metrics)`` of one batch: what :class:`OPDStrategy` returns to tunix.

    .. math::
       L = \alpha\, \mathrm{reduce}_t\, \ell_t(S, T) + (1 - \alpha)\, \mathrm{token\_mean}_t
           \big(-\log S(x_t)\big)

    with :math:`\ell_t` the opd_jax trainer's per-token objective ``spec`` (the same function,
    :func:`opd_jax.train.objectives.make_chunk_fn`) and ``reduce`` = ``spec.reduction``.

    Args:
      student_output, teacher_output: ``[B, T, V]`` logits, or :class:`HiddenAndUnembed` (both the
        same kind; the chunked path never builds ``[B, T, V]``).
      labels: tunix one-hot ``[B, T, V]`` (masked rows zero) or int ``[B, T]`` (negative = masked).
      spec: from :func:`make_loss_spec`.
      alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy on labels.
      metrics_k: top-k of the mechanism metrics (0 = none).

    Returns:
      scalar loss and ``distill/*`` scalar metrics (token means over unmasked positions).
    """
    from opd_jax.train.objectives import make_chunk_fn

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    chunked = isinstance(student_output, HiddenAndUnembed)
    if chunked != isinstance(teacher_output, HiddenAndUnembed):
        raise ValueError("student and teacher outputs must be of the same kind: both [B, T, V] "
                         "logits or both HiddenAndUnembed")
    tokens, mask = labels_to_tokens(labels)
    chunk_fn = make_chunk_fn(spec, metrics_k=max(metrics_k, 1), with_metrics=metrics_k > 0)
    extras = {"tokens": tokens, "mask": mask,
              "sampler_logprobs": jnp.zeros(tokens.shape, jnp.float32)}
    teacher_output = jax.lax.stop_gradient(teacher_output)
    if chunked:
        out = losses.chunked_logits_map(
            chunk_fn, (student_output.hidden, teacher_output.hidden),
            (student_output.unembed, teacher_output.unembed), extras,
            chunk_size=min(spec.chunk_size, tokens.size))
    else:
        out = chunk_fn(student_output, teacher_output, extras)
    distill = getattr(losses, spec.reduction)(out["loss"], mask)
    metrics = {"distill/loss": distill}
    total = distill
    if alpha < 1.0:
        task = -losses.token_mean(_task_logprobs(student_output, tokens, mask, spec.chunk_size),
                                  mask)
        total = alpha * distill + (1.0 - alpha) * task
        metrics["distill/hard_loss"] = task
    for name, per_token in out.items():
        if name != "loss" and name not in _SAMPLER_METRICS:
            metrics[f"distill/{name}"] = losses.token_mean(jax.lax.stop_gradient(per_token), mask)
    return total, metrics


# ----------------------------------------------------------------------------------------------
# forward functions for tunix decoders
# ----------------------------------------------------------------------------------------------


def _positions_and_mask(input_mask: jax.Array, positions, attention_mask):
    mask = jnp.asarray(input_mask).astype(bool)
    if positions is None:
        count = jnp.cumsum(mask, axis=-1)
        positions = count - (count >= 1)  # tunix.generate.utils.build_positions_from_mask
    if attention_mask is None:
        t = mask.shape[-1]
        attention_mask = mask[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
    return positions, attention_mask


def hidden_states(model: Any, input_tokens: jax.Array, positions: jax.Array,
                  attention_mask: jax.Array) -> jax.Array:
    """Final-norm hidden states ``[B, T, D]`` of a tunix decoder, without its ``[B, T, V]`` logits.

    Works for tunix models built as ``embedder`` -> ``layers`` -> ``final_norm`` (Qwen3, Qwen2,
    Llama3, Gemma3 text); ``attention_mask`` is tunix's ``[B, T, T]`` bool mask.
    """
    x = model.embedder.encode(input_tokens)
    for layer in model.layers:
        _, x = layer(x, positions, None, attention_mask)
    return model.final_norm(x)


def unembedding(model: Any) -> jax.Array:
    """The ``[D, V]`` unembedding of a tunix decoder (``lm_head`` or the tied embedding)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head.w[...]
    return model.embedder.input_embedding[...].T


def forward_hidden(model: Any, input_tokens: jax.Array, input_mask: jax.Array,
                   positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   **unused: Any) -> HiddenAndUnembed:
    """A tunix ``student_forward_fn`` / ``teacher_forward_fn`` for the chunked loss.

    Returns :class:`HiddenAndUnembed` at positions ``[0, T-1)`` (each predicting the next token,
    like tunix's examples that return ``logits[:, :-1]``). ``positions`` / ``attention_mask``
    default to tunix's left-padding-aware positions and causal mask from ``input_mask``.
    """
    del unused
    positions, attention_mask = _positions_and_mask(input_mask, positions, attention_mask)
    hidden = hidden_states(model, input_tokens, positions, attention_mask)
    return HiddenAndUnembed(hidden[:, :-1], unembedding(model))


def forward_logits(model: Any, input_tokens: jax.Array, input_mask: jax.Array,
                   positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   **unused: Any) -> jax.Array:
    """The dense counterpart of :func:`forward_hidden`: the model's own ``[B, T-1, V]`` logits."""
    del unused
    positions, attention_mask = _positions_and_mask(input_mask, positions, attention_mask)
    logits, _ = model(input_tokens, positions, None, attention_mask)
    return logits[:, :-1]


# ----------------------------------------------------------------------------------------------
# the tunix strategy (built on first use: its base class comes from tunix)
# ----------------------------------------------------------------------------------------------

_STRATEGY_CLASS: type | None = None


def _build_strategy_class() -> type:
    strategies = require_tunix("tunix.distillation.strategies")

    class OPDStrategy(strategies.BaseStrategy):
        """tunix distillation strategy computing opd_jax's OPD losses (see the module docstring).

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
            lp = _task_logprobs(student_output, tokens, mask, self.spec.chunk_size)
            return -losses.token_mean(lp, mask), {}

    OPDStrategy.__module__ = __name__
    return OPDStrategy


def __getattr__(name: str) -> Any:
    global _STRATEGY_CLASS
    if name == "OPDStrategy":
        if _STRATEGY_CLASS is None:
            _STRATEGY_CLASS = _build_strategy_class()
        return _STRATEGY_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Qwen3 parameter conversion
# ----------------------------------------------------------------------------------------------

# opd_jax layer leaf -> path inside a tunix Qwen3 DecoderLayer.
_QWEN3_LAYER = {
    "attn_norm": ("input_layernorm", "w"),
    "q": ("attn", "q_proj", "w"),
    "k": ("attn", "k_proj", "w"),
    "v": ("attn", "v_proj", "w"),
    "o": ("attn", "o_proj", "w"),
    "q_norm": ("attn", "q_norm", "w"),
    "k_norm": ("attn", "k_norm", "w"),
    "mlp_norm": ("post_attention_layernorm", "w"),
    "gate": ("mlp", "gate_proj", "kernel"),
    "up": ("mlp", "up_proj", "kernel"),
    "down": ("mlp", "down_proj", "kernel"),
}


def _get(obj: Any, path: tuple[str, ...]) -> jax.Array:
    for name in path:
        obj = getattr(obj, name)
    return obj[...]


def qwen3_config_from_tunix(tunix_config: Any, *, rope_theta: str | float = "tunix"
                            ) -> ModelConfig:
    """opd_jax ``ModelConfig`` of a tunix Qwen3 ``ModelConfig`` (dense models only).

    ``rope_theta``: ``"tunix"`` (1e6, what tunix 0.1.7 computes), ``"config"`` (the tunix
    config's value, what the checkpoint was trained with) or a number.
    """
    c = tunix_config
    if getattr(c, "num_experts", None):
        raise ValueError("Qwen3 mixture-of-experts models are not supported by opd_jax's decoder "
                         f"(num_experts={c.num_experts})")
    if rope_theta == "tunix":
        theta = TUNIX_ROPE_THETA
    elif rope_theta == "config":
        theta = float(c.rope_theta)
    elif isinstance(rope_theta, (int, float)) and not isinstance(rope_theta, bool):
        theta = float(rope_theta)
    else:
        raise ValueError(f'rope_theta must be "tunix", "config" or a number, got {rope_theta!r}')
    return ModelConfig(family="qwen3", vocab_size=c.vocab_size, d_model=c.embed_dim,
                       n_layers=c.num_layers, n_heads=c.num_heads, n_kv_heads=c.num_kv_heads,
                       head_dim=c.head_dim, ffn_dim=c.hidden_dim, rope_theta=theta,
                       rms_eps=float(c.norm_eps), tie_embeddings=bool(c.use_tied_embedding),
                       qkv_bias=False, qk_norm=True, max_position=40960)


def params_from_tunix_qwen3(model: Any, config: ModelConfig, dtype=None) -> dict:
    """The opd_jax parameter tree (layers stacked on a leading axis) of a tunix ``Qwen3``."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    layers = {name: cast(jnp.stack([_get(layer, path) for layer in model.layers]))
              for name, path in _QWEN3_LAYER.items()}
    params = {"embed": cast(model.embedder.input_embedding[...]), "layers": layers,
              "final_norm": cast(model.final_norm.w[...])}
    if not config.tie_embeddings:
        params["unembed"] = cast(model.lm_head.w[...])
    return params


def from_tunix_qwen3(model: Any, tokenizer: Any = None, *, rope_theta: str | float = "tunix",
                     dtype=None):
    """An opd_jax :class:`~opd_jax.model.loading.Model` with a tunix ``Qwen3``'s weights.

    Use it as ``teacher=`` / the student of ``opd_jax.train.run.run(cfg, models=...)``, with
    ``opd_jax.generate`` or the chunked losses. ``tokenizer``: an opd_jax tokenizer (e.g.
    ``opd_jax.load_tokenizer(hf_folder)``), needed only for text in / out. ``rope_theta``: see
    :func:`qwen3_config_from_tunix` (default reproduces tunix's logits).
    """
    from opd_jax.model.loading import Model

    config = qwen3_config_from_tunix(model.config, rope_theta=rope_theta)
    return Model(config, params_from_tunix_qwen3(model, config, dtype), tokenizer)


def to_tunix_qwen3(config: ModelConfig, params: dict, *, dtype=jnp.float32) -> Any:
    """A tunix ``Qwen3`` module holding an opd_jax Qwen3 parameter tree (e.g. a distilled student).

    tunix 0.1.7 computes RoPE with base 1e6 whatever its config says: a model with another
    ``rope_theta`` converts, with a warning, but tunix will not reproduce opd_jax's logits.
    """
    from flax import nnx

    qwen3 = require_tunix("tunix.models.qwen3.model")
    if not config.qk_norm or config.qkv_bias or config.rope_scaling is not None:
        raise ValueError("to_tunix_qwen3 needs a Qwen3 architecture (qk_norm, no qkv bias, no "
                         f"rope scaling); got {config}")
    if config.rope_theta != TUNIX_ROPE_THETA:
        warnings.warn(f"rope_theta={config.rope_theta:g}: tunix 0.1.7's Qwen3 always uses "
                      f"{TUNIX_ROPE_THETA:g}, so its logits will differ from opd_jax's",
                      stacklevel=2)
    tcfg = qwen3.ModelConfig(num_layers=config.n_layers, vocab_size=config.vocab_size,
                             embed_dim=config.d_model, hidden_dim=config.ffn_dim,
                             num_heads=config.n_heads, head_dim=config.head_dim,
                             num_kv_heads=config.n_kv_heads, rope_theta=int(config.rope_theta),
                             norm_eps=config.rms_eps, use_tied_embedding=config.tie_embeddings,
                             dtype=dtype, param_dtype=dtype)
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3(tcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    layers = {}
    for i in range(config.n_layers):
        layer: dict = {}
        for name, path in _QWEN3_LAYER.items():
            node = layer
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = cast(params["layers"][name][i])
        layers[i] = layer
    pure = {"embedder": {"input_embedding": cast(params["embed"])}, "layers": layers,
            "final_norm": {"w": cast(params["final_norm"])}}
    if not config.tie_embeddings:
        pure["lm_head"] = {"w": cast(params["unembed"])}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
