"""Prompt data: sources (jsonl, parquet, reasoning-gym), grain pipelines, prompt templates.

Typical use::

    from opd_jax import data
    recs = data.load_reasoning_gym("basic_arithmetic", size=300, seed=0,
                                   config={"min_terms": 2, "max_terms": 2,
                                           "min_digits": 1, "max_digits": 1,
                                           "operators": "+-*"})
    recs, n_dup = data.dedupe_records(recs)
    train, heldout = data.split_records(recs, heldout_fraction=0.1)
    ds = data.make_prompt_dataset(train, batch_size=8, seed=0, num_epochs=None)
    it = data.make_prompt_iterator(ds)            # it.get_state() / it.set_state(s)
    batch = next(it)                              # list of 8 record dicts
    toks = data.tokenize_prompts(batch, tokenizer, data.PromptTemplate().student, 256)
"""

from opd_jax.data.padding import pad_left
from opd_jax.data.pipeline import (
    default_shard_options,
    make_prompt_dataset,
    make_prompt_iterator,
    shard_records,
)
from opd_jax.data.records import (
    PromptRecord,
    dedupe_records,
    hash_unit,
    make_record,
    require_nonempty,
    split_records,
)
from opd_jax.data.sources import (
    RG_KEY,
    load_jsonl,
    load_parquet,
    load_reasoning_gym,
    load_records,
    read_jsonl,
    read_parquet,
    rows_to_records,
)
from opd_jax.data.templates import (
    DEFAULT_INSTRUCTION,
    DEFAULT_STUDENT_TEMPLATE,
    DEFAULT_TEACHER_TEMPLATE,
    OPSD_STUDENT_TEMPLATE,
    OPSD_TEACHER_TEMPLATE,
    ChatTokenizer,
    PromptTemplate,
    TokenizedPrompts,
    render_prompt,
    tokenize_prompts,
)

__all__ = [
    "ChatTokenizer", "DEFAULT_INSTRUCTION", "DEFAULT_STUDENT_TEMPLATE", "DEFAULT_TEACHER_TEMPLATE",
    "OPSD_STUDENT_TEMPLATE", "OPSD_TEACHER_TEMPLATE", "render_prompt",
    "PromptRecord", "PromptTemplate", "RG_KEY", "TokenizedPrompts", "dedupe_records",
    "default_shard_options", "hash_unit", "load_jsonl", "load_parquet", "load_reasoning_gym",
    "load_records", "make_prompt_dataset", "make_prompt_iterator", "make_record", "read_jsonl",
    "read_parquet", "require_nonempty", "rows_to_records", "shard_records", "split_records",
    "pad_left", "tokenize_prompts",
]
