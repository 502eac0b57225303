"""``opd-jax align-prompts``: teacher-aligned prompt selection as the OPD paper means it.

The paper's recipe (arXiv 2604.13016, thunlp/OPD README "teacher-aligned prompt selection") is about
the *source* of the prompts: run OPD on prompts from the teacher's own post-training distribution
(DAPO-Math-17k, the data its teacher was RL-trained on) and compare against a control pool
de-duplicated from it (DeepMath minus exact matches and minus prompts whose all-mpnet-base-v2
cosine to a DAPO prompt is >= 0.6: ``scripts/infer/dedup_deepmath.py``). Given a sample of the
teacher's post-training prompts (``reference``) and a candidate ``pool``, this command:

1. reads both sets the way the reference does: the prompt field (nested keys, chat-message lists
   read as their first message's content), the DAPO instruction suffix removed, whitespace
   stripped (:mod:`.texts`; dedup_deepmath.py:8-33);
2. marks pool prompts whose text equals a reference prompt's (exact, dedup_deepmath.py:50-53);
3. embeds both sets (:mod:`.embedders`: hashed TF-IDF by default, an opd_jax model's mean-pooled
   hidden states, or precomputed vectors such as all-mpnet-base-v2's) and finds each pool
   prompt's nearest reference prompt by cosine (:mod:`.similarity`; the faiss top-1 search of
   dedup_deepmath.py:64-77);
4. writes the **aligned set** (pool prompts ranked by that similarity, cut by ``aligned.top_n`` /
   ``aligned.min_similarity``) and the **control set** (the pool minus exact and near duplicates,
   cosine >= ``threshold``; optionally ``control_n`` of them at random), and reports the
   similarity distribution of both, of the whole pool and of the reference against itself
   (leave-one-out): quantiles and a histogram in ``summary.json``, ``report.md`` and the printed
   table.

Outputs in ``out_dir``: ``aligned.jsonl`` / ``control.jsonl`` (the pool file's rows plus an
``align`` object: id, matching text, similarity, nearest reference id, rank), ``similarities.jsonl``
(every pool prompt: similarity, nearest reference prompt, exact / near duplicate, membership),
``summary.json``, ``report.md``. Train on either set with ``data.source: jsonl`` and the pool's
own ``prompt_key`` / ``answer_key``. ``--texts-only`` writes just the matching texts of both sets
(``reference_texts.jsonl``, ``pool_texts.jsonl``) for an external model to embed (e.g.
all-mpnet-base-v2 with sentence-transformers, as the reference) into ``precomputed`` vectors.

**The 0.6 threshold** was chosen by thunlp for all-mpnet-base-v2 sentence embeddings
(dedup_deepmath.py:57, :82); a cosine threshold means nothing outside the embedding it was set
for. With ``precomputed`` mpnet vectors it is the reference's rule. With the default TF-IDF,
cosine measures shared wording (the mean of a word-n-gram and a character-n-gram cosine): 0.6
removes prompts that reuse most of a reference prompt's text (templated variants, light edits),
but a paraphrase with different wording scores lower than under mpnet and is kept, so the
TF-IDF control set is a looser de-duplication. With ``model`` the cosine is between the reference-
centred mean hidden states of a language model, yet another scale. For anything but mpnet, read
the reported distributions first: the reference's own leave-one-out similarities show what "from
the same distribution" scores under that embedder; set ``threshold`` against that (``BUILD_NOTES.md``
lists measured values).

This is a different construct from ``opd-jax rank-prompts`` (:mod:`opd_jax.select_prompts`),
which ranks a pool by the teacher's confidence and correctness and the student-teacher
divergence on each prompt.

Modules: :mod:`.config` (the ``align:`` section), :mod:`.texts` (reading sets, exact match),
:mod:`.tfidf` (the default embedder), :mod:`.embedders` (the three kinds), :mod:`.similarity`
(nearest neighbour, distributions), :mod:`.pipeline` (the command), :mod:`.report` (outputs).
"""

from opd_jax.align_prompts.config import (
    DAPO_SUFFIX,
    AlignConfig,
    AlignedSpec,
    EmbedderSpec,
    PromptSetSpec,
    TfidfSpec,
    load_align_config,
)
from opd_jax.align_prompts.embedders import make_set_embedders
from opd_jax.align_prompts.pipeline import align_prompts, aligned_order, control_indices, write_texts
from opd_jax.align_prompts.report import format_report, format_table, write_outputs
from opd_jax.align_prompts.similarity import distribution, max_similarity, unit_rows
from opd_jax.align_prompts.texts import PromptSet, exact_matches, match_text, read_prompt_set
from opd_jax.align_prompts.tfidf import HashedTfidf

__all__ = ["DAPO_SUFFIX", "AlignConfig", "AlignedSpec", "EmbedderSpec", "PromptSetSpec",
           "TfidfSpec", "load_align_config", "make_set_embedders", "align_prompts",
           "aligned_order", "control_indices", "write_texts", "format_report", "format_table",
           "write_outputs", "distribution", "max_similarity", "unit_rows", "PromptSet",
           "exact_matches", "match_text", "read_prompt_set", "HashedTfidf"]
