"""``opd-jax rank-prompts`` (formerly ``select-prompts``): score a prompt pool with the signals
that predict whether OPD on a prompt will help, deduplicate it against held-out prompts, keep what
a configurable rule selects (the package keeps its ``select_prompts`` name).

This ranks prompts by teacher confidence / correctness and student-teacher divergence. It is not
the OPD paper's teacher-aligned prompt selection, which is about where prompts come from (the
teacher's own post-training data, against a de-duplicated control pool): that is
``opd-jax align-prompts`` (:mod:`opd_jax.align_prompts`).

Signals, per prompt (``SIGNALS``): on the student's own samples (``sampler`` section: its
temperature and ``n_samples``) the full-vocabulary reverse KL(S‖T), top-k overlap, the shared
probability mass of each model, both entropies; on the teacher's greedy answer the teacher's mean
log-prob of its own tokens and its entropy (confidence), the forward KL(T‖S) and whether the
answer is correct (``opd_jax.eval`` grading; ``None`` when the prompt has no checkable answer);
the student's accuracy on its samples.

De-duplication against held-out prompts (the run's held-out split, plus ``dedup.heldout_path``):
*exact* after normalising the text (Unicode NFKC, case-fold, whitespace collapsed) and *near*:
cosine similarity of the teacher's final-norm hidden states, mean-pooled over the valid tokens of
the prompt (``dedup.embed``: "problem" = the bare problem text, so the shared chat template and
instruction do not dominate the mean; "prompt" = the templated student prompt), centred on the
mean embedding (``dedup.center``), at least ``dedup.threshold``. A prompt is counted under the
first rule that removes it (exact first).

Memory: the pool streams through in batches of ``batch_prompts`` (the last one padded to the same
shape, so nothing recompiles); the jitted per-batch scorer runs the chunked path of the trainer
(``loss_and_metrics``: ``[chunk, V]`` logits at a time, never ``[B, T, V]``) and returns per-prompt
scalars only; only those (and one ``[D]`` embedding per held-out prompt) accumulate.

Config: a run config (``teacher`` / ``student`` / ``data`` / ``sampler`` / ``seed``; ``stages`` may
be omitted) plus a ``select:`` section read into :class:`SelectConfig` (``RunConfig`` is unchanged:
the section is split off before the run config is parsed). Overrides ``select.rule.top_n=50`` go to
the section, the others to the run config. Outputs in ``select.out_dir``: ``selected.jsonl`` (prompt
records with their ``scores`` and ``rank``), ``scores.jsonl`` (every pool prompt, its status and
scores), ``report.md`` and ``summary.json``.

Modules: :mod:`.config` (the ``select:`` section), :mod:`.dedup` (exact / near duplicates),
:mod:`.signals` (scoring the pool), :mod:`.rule` (filter, rank, cut), :mod:`.pipeline` (the
command), :mod:`.report` (outputs and markdown).
"""

from opd_jax.config.sections import split_sections
from opd_jax.select_prompts.config import (
                                           SIGNALS,
                                           STATUSES,
                                           DedupSpec,
                                           RuleSpec,
                                           SelectConfig,
                                           load_select_config,
                                           split_config,
)
from opd_jax.select_prompts.dedup import (
                                           embed_records,
                                           exact_duplicates,
                                           mean_pooled_hidden,
                                           near_duplicates,
                                           normalize_text,
)
from opd_jax.select_prompts.pipeline import load_heldout, select_prompts
from opd_jax.select_prompts.report import format_report, write_outputs
from opd_jax.select_prompts.rule import apply_rule
from opd_jax.select_prompts.signals import make_batch_scorer, score_pool

__all__ = ["SIGNALS", "STATUSES", "DedupSpec", "RuleSpec", "SelectConfig", "split_sections",
           "split_config", "load_select_config", "normalize_text", "exact_duplicates",
           "mean_pooled_hidden", "embed_records", "near_duplicates", "make_batch_scorer",
           "score_pool", "apply_rule", "load_heldout", "select_prompts",
           "write_outputs", "format_report"]
