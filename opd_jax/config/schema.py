"""Run schema, part 1: model, data, sampler, loss, optimizer and filter specs.

Frozen dataclasses of plain values, read once at the entry point; stages and the whole run are in
:mod:`opd_jax.config.run`. Load with :func:`opd_jax.config.load_config`; the generic parsing and
error messages live in :mod:`opd_jax.config`.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Literal, Optional

from opd_jax.config.core import FieldError

__all__ = [
    "DeriveSpec", "LoraSpec", "ModelSpec", "DataSpec", "SamplerSpec", "LossSpec", "OptimSpec",
    "FilterSpec", "OBJECTIVES", "PROJECTIONS", "ATTENTION", "REMAT", "need", "need_positive",
    "placeholders",
]

OBJECTIVES = ("sampled_token_rkl", "topk_reward", "reverse_kl", "forward_kl", "generalized_jsd",
              "skew_forward_kl", "skew_reverse_kl")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("dense", "blocked")
REMAT = ("none", "full", "dots", "dots_no_batch")

Objective = Literal["sampled_token_rkl", "topk_reward", "reverse_kl", "forward_kl",
                    "generalized_jsd", "skew_forward_kl", "skew_reverse_kl"]
Support = Literal["student", "teacher", "union", "intersection", "symmetric_difference"]


def need(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raise :class:`~opd_jax.config.FieldError` (``field`` had ``value``; ``expected``) unless ok."""
    if not ok:
        raise FieldError(field, value, expected)


def need_positive(spec: Any, *names: str, optional: bool = False) -> None:
    """:func:`need` ``value >= 1`` for each field ``name`` of ``spec`` (``optional``: or null)."""
    for name in names:
        value = getattr(spec, name)
        if optional:
            need(value is None or value >= 1, name, value, "null or an integer >= 1")
        else:
            need(value >= 1, name, value, "an integer >= 1")


def placeholders(template: str) -> set[str]:
    """Names of the ``{placeholders}`` in a ``str.format`` template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclasses.dataclass(frozen=True)
class DeriveSpec:
    """Derive a smaller model from the loaded one. At most one of ``keep_layers`` (indices to
    keep), ``keep_every`` (keep layers 0, n, 2n, ...), ``drop_layers``. ``random_init`` re-initialises
    the weights on the same vocabulary; the size overrides (``n_layers``, ``d_model``, ``ffn_dim``,
    ``n_heads``, ``n_kv_heads``, ``head_dim``; None = keep) need it."""

    keep_layers: Optional[tuple[int, ...]] = None
    keep_every: Optional[int] = None
    drop_layers: Optional[tuple[int, ...]] = None
    random_init: bool = False
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    ffn_dim: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None

    def validate(self) -> None:
        chosen = [n for n in ("keep_layers", "keep_every", "drop_layers")
                  if getattr(self, n) is not None]
        need(len(chosen) <= 1, chosen[-1] if chosen else "", getattr(self, chosen[-1]) if chosen
              else None, f"set at most one of keep_layers / keep_every / drop_layers (got {chosen})")
        for name in ("keep_layers", "drop_layers"):
            layers = getattr(self, name)
            if layers is not None:
                need(len(layers) > 0 and min(layers) >= 0 and len(set(layers)) == len(layers),
                      name, list(layers), "a non-empty list of distinct layer indices >= 0")
        need(self.keep_every is None or self.keep_every >= 1, "keep_every", self.keep_every,
              "an integer >= 1")
        for name in ("n_layers", "d_model", "ffn_dim", "n_heads", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None:
                need(value >= 1, name, value, "a positive integer or null")
                need(self.random_init, name, value,
                      "size overrides need random_init: true (pretrained weights keep their shape)")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters: ``rank`` 0 = off (full fine-tuning); scale is ``alpha / rank``;
    ``targets`` are projection names from the parameter tree (q k v o gate up down)."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = PROJECTIONS

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self) -> None:
        need(self.rank >= 0, "rank", self.rank, "an integer >= 0 (0 = LoRA off)")
        need(self.alpha > 0, "alpha", self.alpha, "a positive number")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        need(not bad and len(self.targets) > 0, "targets", list(self.targets),
              f"a non-empty list of projection names from {list(PROJECTIONS)}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which weights to load. ``source``: "default" (embedded SmolLM2-135M-Instruct GGUF), a path
    to a Hugging Face folder or a ``.gguf`` file, or "random" (tiny random model; ``derive`` sizes
    it). ``tokenizer``: optional path overriding the tokenizer that comes with ``source``.

    How the model runs (same values either way): ``attention`` "dense" builds ``[B, H, T, T]``
    float32 scores, "blocked" runs an online softmax over ``attention_block``-token query / key
    blocks (memory O(T x block): long responses need it). ``remat`` (student only: the teacher
    runs no backward pass) recomputes each layer's activations in the backward pass: "none",
    "full" (keep only each layer's input), "dots" (keep matmul outputs), "dots_no_batch"."""

    source: str = "default"
    dtype: Literal["float32", "bfloat16"] = "float32"
    tokenizer: Optional[str] = None
    derive: Optional[DeriveSpec] = None
    lora: LoraSpec = LoraSpec()
    attention: Literal["dense", "blocked"] = "dense"
    attention_block: int = 512
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"

    def validate(self) -> None:
        need(bool(self.source), "source", self.source,
              '"default", "random" or a path to a HF folder / .gguf file')
        need(self.attention in ATTENTION, "attention", self.attention,
             f"one of {list(ATTENTION)}")
        need(self.remat in REMAT, "remat", self.remat, f"one of {list(REMAT)}")
        need(self.attention_block >= 1, "attention_block", self.attention_block,
             "an integer >= 1 (query / key block size of blocked attention)")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Prompts. ``source`` "reasoning_gym" uses generator ``name`` with ``kwargs``; "jsonl" and
    "parquet" read ``path`` with fields ``prompt_key`` / ``answer_key`` / ``solution_key``.
    ``instruction`` formats the student prompt from ``{problem}``; ``teacher_template`` is the
    privileged OPSD teacher context (``{problem}``, ``{solution}``, ``{answer}``). ``size`` training
    prompts and ``heldout_size`` evaluation prompts are drawn with ``seed``; prompts longer than
    ``max_prompt_len`` tokens are dropped."""

    source: Literal["reasoning_gym", "jsonl", "parquet"] = "reasoning_gym"
    name: Optional[str] = "basic_arithmetic"
    path: Optional[str] = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompt_key: str = "question"
    answer_key: str = "answer"
    solution_key: Optional[str] = None
    size: int = 1000
    heldout_size: int = 100
    seed: int = 0
    max_prompt_len: int = 256
    system_prompt: Optional[str] = None
    instruction: str = "{problem}\nGive the final answer on the last line as 'Answer: <value>'."
    teacher_template: Optional[str] = None

    @property
    def has_solutions(self) -> bool:
        return self.solution_key is not None

    def validate(self) -> None:
        if self.source == "reasoning_gym":
            need(bool(self.name), "name", self.name, "a reasoning-gym generator name, e.g. "
                  "basic_arithmetic")
        else:
            need(bool(self.path), "path", self.path, f"a {self.source} file path")
        need_positive(self, "size", "max_prompt_len")
        need(self.heldout_size >= 0, "heldout_size", self.heldout_size, "an integer >= 0")
        need("problem" in placeholders(self.instruction) and
              placeholders(self.instruction) <= {"problem"}, "instruction", self.instruction,
              "a template with {problem} and no other placeholder")
        if self.teacher_template is not None:
            fields = placeholders(self.teacher_template)
            need("problem" in fields and fields <= {"problem", "solution", "answer"},
                  "teacher_template", self.teacher_template,
                  "a template with {problem} and optionally {solution} / {answer}")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Rollout sampling. temperature 0 = greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are off;
    ``n_samples`` rollouts per prompt; generation stops at the tokenizer's EOS ids (plus
    ``extra_eos_ids``) when ``stop_at_eos``."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    n_samples: int = 1
    stop_at_eos: bool = True
    extra_eos_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        need_positive(self, "max_new_tokens", "n_samples")
        need(self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        need(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        need(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        need(0 <= self.min_p < 1, "min_p", self.min_p, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Distillation objective and how it is estimated and reduced.

    ``objective``: see ``OBJECTIVES``. ``beta``: generalized JSD mixture (0 = KL(T||S), 1 =
    KL(S||T)). ``alpha``: skew of the skew KLs. ``top_k``: ids kept per position (null = the full
    vocabulary, dense; topk_reward needs a number). ``support``: whose top-k ids (null = "student";
    must stay null for sampled_token_rkl; intersection / symmetric_difference are topk_reward only);
    the rest of the vocabulary is renormalised away or kept as one ``tail`` bucket. ``weights``
    (topk_reward only; null = "student_p"). ``pointwise_clip``: clip each per-element term at this
    value (OPSD 0.05). ``temperature`` divides both models' logits. ``estimator``: sampled-token KL
    estimator. ``pg_loss`` with ``clip_low`` / ``clip_high``: the policy-gradient surrogate.
    ``lambda_on_policy``: GKD fraction of on-policy batches (the rest are teacher-generated,
    seq-KD). ``chunk_size``: tokens per chunk of the memory-bounded loss.
    """

    objective: Objective = "reverse_kl"
    beta: float = 0.5
    alpha: float = 0.1
    top_k: Optional[int] = 16
    support: Optional[Support] = None
    weights: Optional[Literal["student_p", "teacher_p", "none"]] = None
    tail: Literal["renormalize", "bucket"] = "renormalize"
    pointwise_clip: Optional[float] = None
    temperature: float = 1.0
    estimator: Literal["k1", "k2", "k3"] = "k1"
    pg_loss: Literal["plain", "importance_sampled", "ppo_clip"] = "plain"
    clip_low: float = 0.2
    clip_high: float = 0.2
    reduction: Literal["token_mean", "sequence_mean", "sequence_sum_token_mean"] = "token_mean"
    lambda_on_policy: float = 1.0
    chunk_size: int = 512

    @property
    def resolved_support(self) -> Optional[str]:
        if self.objective == "sampled_token_rkl":
            return None
        return self.support or "student"

    @property
    def resolved_weights(self) -> Optional[str]:
        return (self.weights or "student_p") if self.objective == "topk_reward" else None

    def validate(self) -> None:
        obj = self.objective
        if obj == "sampled_token_rkl":
            need(self.support is None, "support", self.support,
                  "null: sampled_token_rkl scores only the sampled token")
        elif obj != "topk_reward":
            need(self.support in (None, "student", "teacher", "union"), "support", self.support,
                  f"one of student / teacher / union for {obj} (intersection and "
                  "symmetric_difference are topk_reward supports)")
        need(self.weights is None or obj == "topk_reward", "weights", self.weights,
              f"null for {obj}: weights apply to objective topk_reward only")
        need(0 <= self.beta <= 1, "beta", self.beta, "a number in [0, 1]")
        need(0 < self.alpha < 1, "alpha", self.alpha, "a number in (0, 1)")
        need(self.top_k is None or self.top_k >= 1, "top_k", self.top_k,
             "an integer >= 1, or null for the full vocabulary")
        need(self.top_k is not None or obj != "topk_reward", "top_k", self.top_k,
             "an integer >= 1 for topk_reward")
        need(self.pointwise_clip is None or self.pointwise_clip > 0, "pointwise_clip",
              self.pointwise_clip, "null or a positive number")
        need(self.temperature > 0, "temperature", self.temperature, "a positive number")
        need(self.clip_low > 0 and self.clip_high > 0, "clip_low" if self.clip_low <= 0
              else "clip_high", min(self.clip_low, self.clip_high), "a positive number")
        need(0 <= self.lambda_on_policy <= 1, "lambda_on_policy", self.lambda_on_policy,
              "a fraction in [0, 1] (1 = always on-policy)")
        need_positive(self, "chunk_size")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """Optimizer. ``schedule`` decays from ``lr`` to ``lr * final_lr_ratio`` after
    ``warmup_steps`` of linear warm-up; ``grad_clip_norm`` null = no clipping; ``b1`` is SGD
    momentum for "sgd". ``pack``: the update runs on packed rows (several sequences per row,
    ``opd_jax.train.packing``; same loss and gradients to float32 rounding) of at most
    ``pack_max_length`` tokens (or the longest sequence) instead of one padded row per sequence."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-5
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: Optional[float] = 1.0
    grad_accum_steps: int = 1
    pack: bool = True
    pack_max_length: int = 4096

    def validate(self) -> None:
        need(self.lr > 0, "lr", self.lr, "a positive number")
        need_positive(self, "pack_max_length")
        need(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        need(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", self.final_lr_ratio,
              "a number in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        need(self.weight_decay == 0 or self.optimizer == "adamw", "weight_decay",
              self.weight_decay, f"0 for optimizer {self.optimizer!r} (use adamw for decay)")
        need(0 <= self.b1 < 1, "b1", self.b1, "a number in [0, 1)")
        need(0 <= self.b2 < 1, "b2", self.b2, "a number in [0, 1)")
        need(self.eps > 0, "eps", self.eps, "a positive number")
        need(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm",
              self.grad_clip_norm, "null or a positive number")
        need_positive(self, "grad_accum_steps")


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """Cold-start rejection filters on teacher rollouts: drop samples with no final answer
    (``answer_format`` "marked": ``Answer:`` / ``\\boxed{}`` / ``####``; "any_number": a last
    number counts too), with a
    repeated line, or with an ``ngram_n``-gram occurring more than ``ngram_max_repeats`` times
    (``ngram_n`` null = off)."""

    no_answer: bool = True
    answer_format: Literal["marked", "any_number"] = "marked"
    repeated_lines: bool = True
    ngram_n: Optional[int] = 4
    ngram_max_repeats: int = 3

    def validate(self) -> None:
        need_positive(self, "ngram_n", optional=True)
        need_positive(self, "ngram_max_repeats")

