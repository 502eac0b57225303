"""Run schema, part 1: model, data, sampler, optimizer and filter specs (the loss:
:mod:`opd_jax.config.loss`).

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
    "DeriveSpec", "LoraSpec", "ModelSpec", "DataSpec", "SamplerSpec", "OptimSpec",
    "FilterSpec", "OBJECTIVES", "PROJECTIONS", "ATTENTION", "REMAT", "need", "need_positive",
    "placeholders",
]

OBJECTIVES = ("sampled_token_rkl", "topk_reward", "reverse_kl", "forward_kl", "generalized_jsd",
              "skew_forward_kl", "skew_reverse_kl")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("dense", "blocked", "platform", "platform_xla", "platform_cudnn", "platform_splash")
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


# the variables opd_jax.model.chat_template.render_chat_template sets itself (RESERVED_CONTEXT
# there; repeated because config imports nothing of the model package)
CHAT_TEMPLATE_RESERVED = ("messages", "add_generation_prompt", "bos_token", "eos_token")
PLAIN_SCALARS = (bool, int, float, str, type(None))


def plain_type_error(value: Any) -> Optional[str]:
    """The type name of the first value inside ``value`` that is not a bool / number / string /
    null or a list / string-keyed mapping of these (``None`` when there is none).

    >>> plain_type_error({"a": [1, "x", None]}) is None
    True
    >>> plain_type_error([1, {2, 3}])
    'set'
    """
    if isinstance(value, PLAIN_SCALARS):
        return None
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            return f"{type(bad[0]).__name__} mapping key"
        items = list(value.values())
    else:
        return type(value).__name__
    return next((e for e in map(plain_type_error, items) if e is not None), None)


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

    The teacher's ``source`` may also be a service, ``http://host:port`` of ``opd-jax
    serve-teacher`` (no teacher weights in the trainer; a request unanswered for
    ``service_wait_s`` seconds is retried with backoff, then the run stops with a checkpoint), or
    a cache directory of ``opd-jax cache-teacher`` (off-policy ``distill`` stages only). Either
    one gives the teacher's top-k and its log-probs at the student's top-k ids and sampled tokens:
    objectives that read its whole distribution (``loss.top_k: null``) are refused.

    How the model runs (same values either way): ``attention`` "dense" builds ``[B, H, T, T]``
    float32 scores, "blocked" runs an online softmax over ``attention_block``-token query / key
    blocks (memory O(T x block): long responses need it), "platform" calls
    ``jax.nn.dot_product_attention`` (cuDNN flash attention on a CUDA GPU with bfloat16 weights,
    the Pallas splash kernel on a TPU, XLA elsewhere; "platform_xla" / "platform_cudnn" /
    "platform_splash" force one; the sampler's cached steps stay dense). ``remat`` (student
    only: the teacher runs no backward pass) recomputes each layer's activations in the backward
    pass: "none", "full" (keep only each layer's input), "dots" (keep matmul outputs),
    "dots_no_batch".

    ``precision``: the compute dtype (null = ``dtype``). ``dtype: float32`` with ``precision:
    bfloat16`` is mixed precision: float32 parameters and optimizer state (master weights),
    matmuls and activations in bfloat16, norms / softmax / RoPE / losses / log-probs in float32;
    the student's sampler and a teacher (no master weights) hold bfloat16 copies only."""

    source: str = "default"
    dtype: Literal["float32", "bfloat16"] = "float32"
    precision: Optional[Literal["float32", "bfloat16"]] = None
    tokenizer: Optional[str] = None
    derive: Optional[DeriveSpec] = None
    lora: LoraSpec = LoraSpec()
    attention: Literal["dense", "blocked", "platform", "platform_xla", "platform_cudnn",
                       "platform_splash"] = "dense"
    attention_block: int = 512
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    service_wait_s: float = 300.0

    def validate(self) -> None:
        need(bool(self.source), "source", self.source,
              '"default", "random" or a path to a HF folder / .gguf file (the teacher also: an '
              'http://host:port of opd-jax serve-teacher, or a directory of opd-jax cache-teacher)')
        need(self.service_wait_s > 0, "service_wait_s", self.service_wait_s, "seconds > 0")
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
    ``max_prompt_len`` tokens are dropped. ``chat_template_kwargs``: extra variables of the
    tokenizer's chat template, passed to every render of the student's and the teacher's prompts
    (``{enable_thinking: false}`` for Qwen3's non-thinking mode; a template ignores the ones it
    does not read). Values: bool, number, string, null, or lists / mappings of these."""

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
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

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
        for key, value in self.chat_template_kwargs.items():
            where = f"chat_template_kwargs.{key}"
            need(key.isidentifier() and key not in CHAT_TEMPLATE_RESERVED, where, value,
                 "a chat-template variable name (an identifier, not one of "
                 f"{', '.join(CHAT_TEMPLATE_RESERVED)}, which the renderer sets)")
            bad = plain_type_error(value)
            need(bad is None, where, value, "a bool, number, string or null, or a list / "
                 f"mapping of these (found a {bad})")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Rollout sampling. temperature 0 = greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are off;
    ``n_samples`` rollouts per prompt; generation stops at the tokenizer's EOS ids (plus
    ``extra_eos_ids``) when ``stop_at_eos``. ``slots``: continuous batching over this many decode
    slots (a finished row's slot takes the next pending row; a prompt's samples share one
    prefill; same tokens for the same keys); null = one batch of all rows, decoded until its
    longest row ends. ``cache_windows``: decode phases, each attending over the part of the KV
    cache its steps can have filled (null = ``sampling.sampler.default_cache_windows``: 4 from
    256 new tokens, one per 128 from 512, at most 8; 1 = the whole cache every step; see
    ``Sampler``)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    n_samples: int = 1
    stop_at_eos: bool = True
    extra_eos_ids: tuple[int, ...] = ()
    slots: Optional[int] = None
    cache_windows: Optional[int] = None

    def validate(self) -> None:
        need_positive(self, "max_new_tokens", "n_samples")
        need_positive(self, "slots", optional=True)
        need_positive(self, "cache_windows", optional=True)
        need(self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        need(self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        need(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        need(0 <= self.min_p < 1, "min_p", self.min_p, "a number in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """Optimizer. ``schedule`` decays from ``lr`` to ``lr * final_lr_ratio`` after
    ``warmup_steps`` of linear warm-up; ``grad_clip_norm`` null = no clipping; ``b1`` is SGD
    momentum for "sgd". ``mu_dtype``: the dtype of Adam(W)'s first moment (null = the
    parameters'; "bfloat16" halves its memory, optax's ``mu_dtype``; the second moment stays
    float32). ``pack``: the update runs on packed rows (several sequences per row,
    ``opd_jax.train.packing``; same loss and gradients to float32 rounding) of at most
    ``pack_max_length`` tokens (or the longest sequence) instead of one padded row per sequence;
    ``pack_reuse``: a batch takes a packed shape the stage already compiled when that costs at
    most ``1 + pack_reuse`` times the FLOPs of the cheapest new shape (0: only when as cheap).
    ``cpu_scheduler``: how XLA CPU orders the train step's instructions: "memory" (the smallest
    live set: the demo's step keeps 0.22 GiB fewer temporaries, at most a few % slower) or "concurrency"
    (independent instructions on several cores at once: XLA's default); other backends ignore
    it."""

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
    mu_dtype: Optional[Literal["bfloat16", "float32"]] = None
    grad_accum_steps: int = 1
    pack: bool = True
    pack_max_length: int = 4096
    pack_reuse: float = 0.25
    cpu_scheduler: Literal["memory", "concurrency"] = "memory"

    def validate(self) -> None:
        need(self.lr > 0, "lr", self.lr, "a positive number")
        need_positive(self, "pack_max_length")
        need(self.pack_reuse >= 0, "pack_reuse", self.pack_reuse,
             "a number >= 0 (0: reuse a compiled packed shape only when it is as cheap)")
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
        need(self.mu_dtype is None or self.optimizer != "sgd", "mu_dtype", self.mu_dtype,
             'null for optimizer "sgd" (its momentum follows the parameters\' dtype)')


# FilterSpec: the thresholds each switch governs (they must keep their defaults when it is off)
_FILTER_SWITCHES = (
    ("no_answer", ("answer_format", "answer_marker")),
    ("repeated_lines", ("line_min_chars", "line_reject_count")),
    ("repeated_windows", ("window_chars", "window_stride", "window_reject_count")),
    ("consecutive_repeat", ("block_chars", "block_reject_run", "block_text_over")),
)


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """Cold-start rejection filters on teacher rollouts (``opd_jax.eval.filters``; defaults =
    thunlp/OPD ``scripts/infer/vllm_rollout.py``:17-73). Each filter has a switch and thresholds;
    a threshold of a switched-off filter must keep its default.

    ``no_answer``: reject text without a final answer; ``answer_format`` "marker" (the text
    contains ``answer_marker``, default ``\\boxed`` as in the reference), "marked" (``Answer:`` /
    ``\\boxed{}`` / ``####``) or "any_number" (a last number counts too). ``repeated_lines``: a
    stripped line of >= ``line_min_chars`` characters occurring >= ``line_reject_count`` times.
    ``repeated_windows``: a ``window_chars``-character window (every ``window_stride``
    characters) occurring >= ``window_reject_count`` times. ``consecutive_repeat``: a
    ``block_chars``-character block repeated ``block_reject_run`` times in a row, checked only in
    texts longer than ``block_text_over`` characters. ``ngram_n``: this library's earlier rule,
    a word ``ngram_n``-gram occurring more than ``ngram_max_repeats`` times (null = off, the
    default: it rejects most long solutions)."""

    no_answer: bool = True
    answer_format: Literal["marker", "marked", "any_number"] = "marker"
    answer_marker: str = "\\boxed"
    repeated_lines: bool = True
    line_min_chars: int = 20
    line_reject_count: int = 5
    repeated_windows: bool = True
    window_chars: int = 100
    window_stride: int = 10
    window_reject_count: int = 3
    consecutive_repeat: bool = True
    block_chars: int = 50
    block_reject_run: int = 3
    block_text_over: int = 5000
    ngram_n: Optional[int] = None
    ngram_max_repeats: int = 3

    def validate(self) -> None:
        need_positive(self, "ngram_n", optional=True)
        need_positive(self, "ngram_max_repeats", "window_chars", "window_stride", "block_chars")
        for name in ("line_reject_count", "window_reject_count", "block_reject_run"):
            need(getattr(self, name) >= 2, name, getattr(self, name),
                 "an integer >= 2 (a repeat needs at least two occurrences)")
        for name in ("line_min_chars", "block_text_over"):
            need(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        defaults = FilterSpec()
        for switch, names in _FILTER_SWITCHES:
            for name in names:
                need(getattr(self, switch) or getattr(self, name) == getattr(defaults, name),
                     name, getattr(self, name), f"leave unset: {switch} is false")
        need(self.answer_format == "marker" or self.answer_marker == defaults.answer_marker,
             "answer_marker", self.answer_marker,
             f'leave unset: it applies to answer_format "marker" (this is {self.answer_format!r})')
        need(bool(self.answer_marker), "answer_marker", self.answer_marker,
             "a non-empty string the final answer is marked with, e.g. \\boxed")
        need(self.ngram_n is not None or self.ngram_max_repeats == defaults.ngram_max_repeats,
             "ngram_max_repeats", self.ngram_max_repeats, "leave unset: ngram_n is null")

