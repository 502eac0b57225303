"""From a batch of prompt records to a ``RolloutBatch``: tokenize, left-pad to a bucket, sample.

Prompt lengths are padded to the sampler's buckets, so the jitted sampler and train step see a
handful of shapes over a whole run and never recompile per batch. Every row's randomness comes
from ``fold_in(key, row)`` with a key derived from ``(seed, stage, step)``: a resumed run draws
the same rollouts as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.data import PromptTemplate, tokenize_prompts
from opd_jax.data.padding import pad_left
from opd_jax.eval.filters import FilterConfig, filter_completions, marker_warning
from opd_jax.eval.grading import is_reasoning_gym, score_completion
from opd_jax.losses.estimators import grpo_advantages
from opd_jax.model.config import ModelConfig
from opd_jax.model.decoder import Lora
from opd_jax.sampling.sampler import Sampler, bucket_length
from opd_jax.train.batch import RolloutBatch
from opd_jax.train.distributed import to_host
from opd_jax.train.packing import FORWARD_ATTENTION_WEIGHT, TRAIN_ATTENTION_WEIGHT, ShapeMemory, pack_rows


@dataclasses.dataclass
class Prompts:
    """Tokenized, left-padded prompts of one batch, repeated ``n_samples`` times (prompt-major)."""

    records: list[dict]
    student_tokens: np.ndarray  # [B, Ps]
    student_valid: np.ndarray
    teacher_tokens: np.ndarray  # [B, Pt]
    teacher_valid: np.ndarray


def encode_prompts(records: Sequence[dict], tokenizer, template: PromptTemplate, *,
                   max_prompt_len: int, n_samples: int = 1, privileged_teacher: bool = False,
                   pad_id: int = 0) -> Prompts:
    """Chat-template and tokenize the student prompts (and the teacher's privileged prompts for
    OPSD; otherwise the teacher sees the student's prompt), left-padded to a length bucket."""
    kw = template.chat_template_kwargs
    student = tokenize_prompts(records, tokenizer, template.student, max_prompt_len,
                               chat_template_kwargs=kw).token_ids
    teacher = (tokenize_prompts(records, tokenizer, template.teacher, max_prompt_len,
                                chat_template_kwargs=kw).token_ids
               if privileged_teacher else student)
    rep = lambda xs: [x for x in xs for _ in range(n_samples)]
    s_tok, s_val = pad_left(rep(student), bucket_length(max(map(len, student))), pad_id)
    t_tok, t_val = pad_left(rep(teacher), bucket_length(max(map(len, teacher))), pad_id)
    return Prompts(rep(list(records)), s_tok, s_val, t_tok, t_val)


def rollout_key(seed: int, stage_index: int, step: int) -> jax.Array:
    """The key of one step's rollouts: ``fold_in(fold_in(key(seed), stage), step)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage_index), step)


def sample(sampler: Sampler, params, prompts: Prompts, key: jax.Array, *, lora: Lora | None = None,
           from_teacher_prompt: bool = False):
    """Run the sampler on the student's (or the teacher's) prompts.

    The sampler places its rows (and its per-row keys, as key data) as global arrays on its mesh
    itself; in a multi-process run the outputs that span other processes are fetched to every
    host (:func:`~opd_jax.train.distributed.to_host`, the identity in one process)."""
    tok, val = ((prompts.teacher_tokens, prompts.teacher_valid) if from_teacher_prompt
                else (prompts.student_tokens, prompts.student_valid))
    return to_host(sampler(params, tok, val, key, lora=lora))


def completion_length(mask_BxN: np.ndarray) -> int:
    """Completion columns a batch needs: its longest real completion, rounded up to a
    :func:`~opd_jax.sampling.sampler.bucket_length` bucket (so few step shapes compile), at most
    ``N``.

    >>> completion_length(np.array([[1, 1, 0, 0] + [0] * 28, [1] * 20 + [0] * 12], bool))
    32
    >>> completion_length(np.zeros((2, 64), bool))
    16
    """
    n_max = mask_BxN.shape[1]
    longest = int(mask_BxN.sum(axis=1).max()) if mask_BxN.size else 0
    return min(n_max, bucket_length(longest))


def assemble(prompts: Prompts, completion: Any, mask: Any, sampler_logprobs: Any,
             keep_rows: np.ndarray | None = None) -> RolloutBatch:
    """``[prompt | completion]`` for the student and for the teacher (same completion).

    The completion columns are trimmed to :func:`completion_length` (the longest real completion
    rounded up to a length bucket): columns after every row's EOS are padding the update would
    otherwise compute.

    ``keep_rows`` (bool ``[B]``) masks whole rows out of the loss (e.g. cold-start samples
    rejected by a filter) while keeping shapes static.
    """
    completion = np.asarray(completion)
    mask = np.asarray(mask, bool)
    n = completion_length(mask)
    completion = jnp.asarray(completion[:, :n], jnp.int32)
    sampler_logprobs = np.asarray(sampler_logprobs)[:, :n]
    mask = jnp.asarray(mask[:, :n])
    if keep_rows is not None:
        mask = mask & jnp.asarray(keep_rows, bool)[:, None]
    cat = lambda a, b: jnp.concatenate([jnp.asarray(a), b], axis=1)
    return RolloutBatch(
        student_tokens=cat(prompts.student_tokens, completion),
        student_valid=cat(prompts.student_valid, mask),
        teacher_tokens=cat(prompts.teacher_tokens, completion),
        teacher_valid=cat(prompts.teacher_valid, mask),
        completion=completion, mask=mask,
        sampler_logprobs=jnp.asarray(sampler_logprobs, jnp.float32))


def pack_batch(batch: RolloutBatch, *, groups: int, student_config: ModelConfig,
               teacher_config: ModelConfig | None = None, max_length: int = 4096,
               shapes: tuple[ShapeMemory, ShapeMemory] | None = None) -> RolloutBatch:
    """``batch`` with its student (and teacher) sequences packed several per row
    (:func:`~opd_jax.train.packing.pack_rows`, ``groups`` = grad-accumulation micro-batches x
    data-parallel shards). The teacher's rows are packed on their own (forward-only cost model;
    OPSD's privileged prompts) unless they hold the student's very sequences: then they are the
    student's rows (one layout keys the step's compilation, not two). ``shapes``: the run's
    (student, teacher) :class:`~opd_jax.train.packing.ShapeMemory` (sticky shapes: fewer
    compilations; the teacher's is untouched when it takes the student's rows). The padded
    ``[B, P + N]`` rows come back with zero columns (``[B, 0]``): the packed step never reads
    them, and the prompt length then keys no compilation."""
    n = batch.completion.shape[1]
    s_shapes, t_shapes = shapes or (None, None)
    # each array crosses from the device once (the teacher's are often the student's arrays)
    s_tokens, s_valid = np.asarray(batch.student_tokens), np.asarray(batch.student_valid)
    host = lambda t, s, s_host: s_host if t is s else np.asarray(t)
    t_tokens = host(batch.teacher_tokens, batch.student_tokens, s_tokens)
    t_valid = host(batch.teacher_valid, batch.student_valid, s_valid)
    pack = lambda tokens, valid, config, weight, memory: pack_rows(
        tokens, valid, n, groups=groups, config=config, max_length=max_length,
        blocked=config.attention == "blocked", attention_weight=weight, shapes=memory)
    student = pack(s_tokens, s_valid, student_config, TRAIN_ATTENTION_WEIGHT, s_shapes)
    t_config = teacher_config or student_config
    if (t_config.attention == student_config.attention
            and np.array_equal(t_tokens, s_tokens) and np.array_equal(t_valid, s_valid)):
        # the same sequences (no privileged prompt): the student's rows, so the step's shape is
        # keyed by one layout, not two (a new teacher shape compiles the whole step again)
        teacher = student
    else:   # the teacher only runs forward: its own layout (forward-pass attention is cheaper)
        teacher = pack(t_tokens, t_valid, t_config, FORWARD_ATTENTION_WEIGHT, t_shapes)
    # the step reads only the packed rows: the padded ones keep zero columns, so their prompt
    # bucket no longer keys a compilation (nor travels to the devices)
    empty = lambda x: jnp.zeros((x.shape[0], 0), x.dtype)
    return batch.replace(student_packed=student, teacher_packed=teacher,
                         student_tokens=empty(batch.student_tokens),
                         student_valid=empty(batch.student_valid),
                         teacher_tokens=empty(batch.teacher_tokens),
                         teacher_valid=empty(batch.teacher_valid))


class StudentAndTeacherRollouts(NamedTuple):
    """One batch's student rollouts and (optionally) the teacher's answers, assembled and decoded.

    ``student`` / ``student_texts``: ``n_samples`` rows per record (prompt-major); ``teacher`` /
    ``teacher_texts``: one row per record, ``None`` when no teacher sampler was given.
    ``student_hidden`` / ``teacher_hidden``: ``[B, N, D]`` each model's final hidden states at
    its own completion's positions (``N`` = the batch's completion columns), when its sampler
    records them (``Sampler(return_hidden=True)``), else ``None``: a scorer of these samples
    under the model that drew them needs no forward of that model."""

    student: RolloutBatch
    student_texts: list[str]
    teacher: RolloutBatch | None = None
    teacher_texts: list[str] | None = None
    student_hidden: jax.Array | None = None
    teacher_hidden: jax.Array | None = None


#: the teacher's hidden states a ``teacher_memo`` keeps at most (host bytes, all prompts);
#: answers memoised beyond it keep their tokens only (the scorer runs the teacher again)
MEMO_HIDDEN_BYTES = 1 << 30


def sampled_hidden(out, batch: RolloutBatch) -> jax.Array | None:
    """A sampler output's hidden states trimmed to ``batch``'s completion columns, or ``None``."""
    return None if out.hidden is None else out.hidden[:, :batch.completion.shape[1]]


def sample_student_and_teacher(records: Sequence[dict], tokenizer, template: PromptTemplate, *,
                               max_prompt_len: int, n_samples: int, key: jax.Array,
                               student_sampler: Sampler, student_params,
                               student_lora: Lora | None = None,
                               teacher_sampler: Sampler | None = None, teacher_params=None,
                               privileged_teacher: bool = False, pad_id: int = 0,
                               teacher_memo: dict | None = None) -> StudentAndTeacherRollouts:
    """``n_samples`` student rollouts per record drawn with ``key`` and, with ``teacher_sampler``,
    one teacher rollout per record (on the teacher's prompt) drawn with ``fold_in(key, 1)``: the
    batches held-out evaluation and prompt selection score.

    ``teacher_memo``: a dict that keeps the teacher's rollouts by their encoded prompts and hands
    them back on a later call with the same prompts instead of sampling again. Share one only
    between calls whose teacher answers depend on the prompts alone: the same teacher weights and
    a greedy teacher sampler with the same settings (held-out evaluation's teacher, evaluated
    again at every eval stage of a run). It keeps the teacher's hidden states too (samplers with
    ``return_hidden``) while they total at most :data:`MEMO_HIDDEN_BYTES`."""
    enc = dict(max_prompt_len=max_prompt_len, privileged_teacher=privileged_teacher, pad_id=pad_id)
    prompts = encode_prompts(records, tokenizer, template, n_samples=n_samples, **enc)
    out = sample(student_sampler, student_params, prompts, key, lora=student_lora)
    student = assemble(prompts, out.tokens, out.mask, out.logprobs_full)
    texts = decode_rows(tokenizer, out.tokens, out.mask)
    s_hidden = sampled_hidden(out, student)
    if teacher_sampler is None:
        return StudentAndTeacherRollouts(student, texts, student_hidden=s_hidden)
    single = encode_prompts(records, tokenizer, template, **enc)
    memo_key = tuple(x.tobytes() for x in (single.student_tokens, single.student_valid,
                                           single.teacher_tokens, single.teacher_valid))
    memo_key += (single.student_tokens.shape, single.teacher_tokens.shape)
    if teacher_memo is not None and memo_key in teacher_memo:
        teacher, teacher_texts, t_hidden = teacher_memo[memo_key]
        return StudentAndTeacherRollouts(student, texts, teacher, list(teacher_texts), s_hidden,
                                         t_hidden)
    t_out = sample(teacher_sampler, teacher_params, single, jax.random.fold_in(key, 1),
                   from_teacher_prompt=True)
    teacher = assemble(single, t_out.tokens, t_out.mask, t_out.logprobs_full)
    answers = (teacher, decode_rows(tokenizer, t_out.tokens, t_out.mask),
               sampled_hidden(t_out, teacher))
    if teacher_memo is not None:   # on the host: nothing held on a device between evaluations
        t_hidden = answers[2]
        if t_hidden is not None:
            kept = sum(v[2].nbytes for v in teacher_memo.values() if v[2] is not None)
            t_hidden = (np.asarray(t_hidden)
                        if kept + t_hidden.nbytes <= MEMO_HIDDEN_BYTES else None)
        teacher_memo[memo_key] = (jax.device_get(answers[0]), answers[1], t_hidden)
    return StudentAndTeacherRollouts(student, texts, answers[0], answers[1], s_hidden, answers[2])


def decode_rows(tokenizer, completion: np.ndarray, mask: np.ndarray) -> list[str]:
    """Completion texts (special tokens skipped) of each row."""
    completion, mask = np.asarray(completion), np.asarray(mask)
    return [tokenizer.decode(completion[i][mask[i]].tolist()) for i in range(len(completion))]


def filter_rows(texts: Sequence[str], spec) -> tuple[np.ndarray, dict[str, int]]:
    """Cold-start rejection filters (``FilterSpec``): keep mask ``[B]`` and counts per reason."""
    result = filter_completions(list(enumerate(texts)), FilterConfig.from_spec(spec),
                                text_of=lambda it: it[1])
    keep = np.zeros(len(texts), bool)
    keep[[i for i, _ in result.kept]] = True
    counts = {k: int(v) for k, v in result.counts.items()}
    return keep, counts




def filter_sampled(tokenizer, out, spec, stage_name: str) -> tuple[np.ndarray, dict[str, int]]:
    """:func:`filter_rows` on a sampler output's decoded rows, warning when none is kept because
    the answer marker occurs nowhere in the prompt (``stage_name`` names the stage)."""
    keep, counts = filter_rows(decode_rows(tokenizer, out.tokens, out.mask), spec)
    if counts["kept"] == 0:
        valid = np.asarray(out.prompt_valid[0], bool)
        prompt = tokenizer.decode(np.asarray(out.prompt_tokens[0])[valid].tolist())
        warning = marker_warning(FilterConfig.from_spec(spec), prompt)
        if warning:
            warnings.warn(f"stage {stage_name!r}: {warning}", stacklevel=3)
    return keep, counts


def outcome_advantages(batch: RolloutBatch, prompts: Prompts, texts: Sequence[str], *,
                       n_samples: int, weight: float,
                       norm_by_std: bool = True) -> tuple[RolloutBatch, np.ndarray]:
    """``batch`` with ``outcome_advantage`` ``[B, N]``: ``weight`` x the GRPO advantage
    (:func:`~opd_jax.losses.grpo_advantages`) of each sample's graded answer
    (:func:`~opd_jax.eval.grading.score_completion` against its record) over its prompt's
    ``n_samples`` rows, repeated over the completion (0 where masked), as thunlp's
    ``token_reward_direct_plus_grpo``. Returns it and the ``[B]`` scores."""
    scores_B = np.asarray([score_completion(r, t) for r, t in zip(prompts.records, texts)],
                          np.float32)
    adv_B = np.asarray(grpo_advantages(scores_B.reshape(-1, n_samples),
                                       norm_by_std=norm_by_std)).reshape(-1) * weight
    adv_BxN = jnp.where(batch.mask, jnp.asarray(adv_B, jnp.float32)[:, None], 0.0)
    return batch.replace(outcome_advantage=adv_BxN), scores_B


def check_outcome_records(stage, records: list) -> None:
    """``loss.grpo_outcome_weight`` grades the student's answers: an on-policy stage whose
    prompts all carry an answer (checked before anything runs)."""
    if stage.kind not in ("opd", "opsd"):
        raise ValueError(f"stage {stage.name!r}: loss.grpo_outcome_weight applies to opd / opsd "
                         f"stages (the student's own samples are graded), not {stage.kind}")
    missing = sum(1 for r in records if r.get("answer") in (None, "") and not is_reasoning_gym(r))
    if missing:
        raise ValueError(f"stage {stage.name!r}: loss.grpo_outcome_weight needs an answer for "
                         f"every prompt to grade; {missing} of {len(records)} have none (set "
                         "data.answer_key, or drop grpo_outcome_weight)")
