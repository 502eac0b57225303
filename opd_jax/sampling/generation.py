"""``opd_jax.generate``: token-id prompts in, completions (and every array the losses need) out.

A thin user layer over :class:`opd_jax.sampling.sampler.Sampler`: validates the prompts, repeats each one
``n_samples`` times, derives one key per row from ``(seed, prompt index, sample index)`` (so a
completion does not depend on the rest of the batch), left-pads, runs the sampler and returns
Python lists plus the full numpy arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from opd_jax.checks import positive_int
from opd_jax.data.padding import pad_left
from opd_jax.model.config import ModelConfig
from opd_jax.model.tokenizer import eos_ids_of
from opd_jax.sampling.sampler import SampleOutput, Sampler, row_keys
from opd_jax.sampling.strategies import Sampling

__all__ = ["generate", "GenerateOutput"]


@dataclasses.dataclass
class GenerateOutput:
    """:func:`generate`'s result: ``R = len(prompts) * n_samples`` rows, prompt-major
    (row ``r`` is sample ``r % n_samples`` of prompt ``r // n_samples``).

    Attributes:
      tokens: ``R`` completion id lists, up to and including the EOS.
      prompt_tokens: ``R`` prompt id lists.
      prompt_index, sample_index: ``[R]`` int arrays.
      completion: ``[R, N]`` int32 ids (``pad_id`` after EOS).
      mask: ``[R, N]`` bool, True up to and including the EOS.
      logprobs: ``[R, N]`` log-probs under the distribution sampled from (see
        :class:`SampleOutput`); ``logprobs_full``: under the temperature-1 untruncated one.
      topk_ids, topk_logprobs: ``[R, N, K]`` or ``None``.
      lengths: ``[R]`` completion lengths.
      texts: decoded completions when the model has a tokenizer with ``decode``, else ``None``.
      hidden: ``[R, N, D]`` the final hidden state each token was drawn from
        (``return_hidden=True``), else ``None``.
      raw: the device-side :class:`SampleOutput`.
    """

    tokens: list[list[int]]
    prompt_tokens: list[list[int]]
    prompt_index: np.ndarray
    sample_index: np.ndarray
    completion: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    logprobs_full: np.ndarray
    topk_ids: np.ndarray | None
    topk_logprobs: np.ndarray | None
    lengths: np.ndarray
    texts: list[str] | None = None
    hidden: np.ndarray | None = None
    raw: SampleOutput | None = dataclasses.field(default=None, repr=False)


def generate(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, seed: int = 0, eos_ids: Sequence[int] | None = None,
             n_samples: int = 1, return_topk: int | None = None, mesh: Mesh | None = None,
             rules: str | dict = "fsdp", pad_id: int = 0, slots: int | None = None,
             cache_windows: int | None = None, return_hidden: bool = False) -> GenerateOutput:
    """Generate completions for token-id prompts.

    Args:
      model: any object with ``.config`` (``ModelConfig``) and ``.params``; optional ``.lora``
        and ``.tokenizer`` (its ``eos_ids`` are the default EOS set; ``decode`` fills ``texts``).
      prompts: a non-empty list of non-empty token-id lists.
      max_new_tokens: tokens generated per row at most.
      temperature: ``0.0`` is greedy; top_k / top_p / min_p truncate (see
        :class:`opd_jax.sampling.Sampling`).
      seed: row ``(prompt i, sample j)`` draws with key ``fold_in(fold_in(key(seed), i), j)``.
      eos_ids: ids ending a completion (default: the tokenizer's; ``[]`` disables EOS).
      n_samples: completions per prompt.
      return_topk: also return the model's top-``K`` ids / log-probs at every step.
      mesh, rules: shard the batch (and params, as the rules table says) over a mesh.
      pad_id: id used for padding.
      slots: ``None``: all ``len(prompts) * n_samples`` rows decode as one batch until the
        longest ends. An int: continuous batching over that many decode slots (a finished row's
        slot takes the next row; the samples of a prompt share its prefill); same completions
        and log-probs (see :class:`opd_jax.sampling.Sampler`). Pays off when rows outnumber
        slots or end at ragged lengths (EOS).
      cache_windows: decode phases, each attending over the part of the KV cache its steps can
        have filled (``None``: :func:`~opd_jax.sampling.sampler.default_cache_windows`).
      return_hidden: also return the final (normed) hidden state each token was drawn from
        (``out.hidden``; the model's logits at that step are its unembedding).

    Returns:
      :class:`GenerateOutput` (``out.tokens`` is the list of completion id lists).
    """
    config: ModelConfig = model.config
    if isinstance(prompts, (str, bytes)) or any(
            isinstance(p, (str, bytes, int, np.integer)) for p in prompts):
        raise ValueError("prompts must be a list of token-id lists (tokenize text first; wrap a "
                         "single prompt in a list)")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty; pass at least one token-id list")
    n_samples = positive_int("n_samples", n_samples)
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has ids {bad[:5]} outside the vocabulary "
                             f"[0, {config.vocab_size})")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tok = getattr(model, "tokenizer", None)
    eos = eos_ids_of(tok) if eos_ids is None else tuple(eos_ids)
    sampler = Sampler(config, sampling, max_new_tokens, eos_ids=eos, return_topk=return_topk,
                      pad_id=pad_id, mesh=mesh, rules=rules, slots=slots,
                      cache_windows=cache_windows, return_hidden=return_hidden)
    sampler.check_lengths([len(p) for p in prompts])

    prompt_index = np.repeat(np.arange(len(prompts)), n_samples)
    sample_index = np.tile(np.arange(n_samples), len(prompts))
    rows = [prompts[i] for i in prompt_index]
    tokens, valid = pad_left(rows, pad_id=pad_id)
    keys = row_keys(seed, prompt_index, sample_index)
    params = sampler.shard_params(model.params)
    out = sampler(params, tokens, valid, keys, lora=getattr(model, "lora", None), check=False)

    host = jax.device_get(out)
    mask = np.asarray(host.mask)
    completion = np.asarray(host.tokens)
    lengths = mask.sum(1)
    token_lists = [completion[r, :lengths[r]].tolist() for r in range(len(rows))]
    texts = None
    if tok is not None and hasattr(tok, "decode"):
        texts = [tok.decode(t) for t in token_lists]
    return GenerateOutput(
        tokens=token_lists, prompt_tokens=rows, prompt_index=prompt_index,
        sample_index=sample_index, completion=completion, mask=mask,
        logprobs=np.asarray(host.logprobs), logprobs_full=np.asarray(host.logprobs_full),
        topk_ids=None if host.topk_ids is None else np.asarray(host.topk_ids),
        topk_logprobs=None if host.topk_logprobs is None else np.asarray(host.topk_logprobs),
        lengths=lengths, texts=texts,
        hidden=None if host.hidden is None else np.asarray(host.hidden), raw=out)
