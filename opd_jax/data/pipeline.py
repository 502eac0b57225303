"""grain pipelines over prompt records: shard per process, shuffle, repeat, batch, resume.

Order of operations (each process runs the same code)::

    records ──► shard (strided, per JAX process) ──► shuffle(seed) ──► repeat(epochs)
            ──► batch(batch_size) into ``list[record]`` ──► iterator (get_state/set_state)

Sharding happens first, so processes read disjoint records; shuffling is re-seeded each
epoch by grain. Batches are plain lists of record dicts (tokenisation happens later, see
:func:`opd_jax.data.templates.tokenize_prompts`). The iterator state is a small JSON-able
dict (``{"next_index": n}``); restoring it into a fresh iterator of the same dataset
yields exactly the batches the saved one would have produced next.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import grain

from opd_jax.data.records import PromptRecord, describe_sources, require_nonempty


def default_shard_options() -> grain.sharding.ShardOptions:
    """One shard per JAX process, equal sizes (``drop_remainder=True``) so no process idles."""
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def shard_records(
    records: Sequence[PromptRecord], shard_options: grain.sharding.ShardOptions
) -> list[PromptRecord]:
    """Records of shard ``shard_index`` of ``shard_count``: ``records[index::count]``.

    With ``drop_remainder`` the list is first cut to a multiple of ``shard_count`` so all
    shards have equal length. Shards are pairwise disjoint and (without drop) cover all.
    """
    n = len(records)
    if shard_options.drop_remainder:
        n -= n % shard_options.shard_count
    return list(records[shard_options.shard_index : n : shard_options.shard_count])


def make_prompt_dataset(
    records: Sequence[PromptRecord],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    source: str | None = None,
) -> grain.MapDataset:
    """A ``grain.MapDataset`` whose elements are batches: ``list[record]`` of ``batch_size``.

    Args:
      records: prompt records (already de-duplicated / split).
      batch_size: records per batch *per process*.
      seed: shuffle seed (same on every process; each epoch is shuffled differently).
      num_epochs: passes over the data; ``None`` repeats forever.
      shuffle: shuffle within each epoch.
      drop_remainder: drop the final partial batch (batches may span epoch boundaries).
      shard_options: ``grain.sharding.ShardOptions``; default: one shard per JAX process.
      source: name of the data in error messages (default: the records' sources), so an
        empty split still names where it came from.

    Each batch holds deep copies, so callers may mutate them freely.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sources = source or describe_sources(records)
    require_nonempty(records, source=sources, stage="filtering/splitting",
                     fix="check the source config (path, generator size, heldout fraction).")
    shard_options = shard_options or default_shard_options()
    shard = shard_records(records, shard_options)
    require_nonempty(
        shard, source=sources, stage=f"sharding into {shard_options.shard_count} shards",
        fix=f"provide at least {shard_options.shard_count} records (one per process).",
    )
    ds = grain.MapDataset.source(shard)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(copy.deepcopy)
    total = len(shard) * (num_epochs or 1)
    if drop_remainder and num_epochs is not None and total < batch_size:
        raise ValueError(
            f"{sources}: {total} records on this process ({len(shard)} x {num_epochs} epochs) "
            f"make no full batch of {batch_size}. Fix: lower batch_size, add epochs or data, "
            f"or pass drop_remainder=False."
        )
    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)


def make_prompt_iterator(
    dataset: grain.MapDataset, state: dict[str, Any] | None = None, *, num_threads: int = 0
) -> grain.DatasetIterator:
    """Iterator over ``dataset``; ``state`` from a previous ``iterator.get_state()`` resumes it.

    ``num_threads=0`` reads in the calling thread (records live in memory: no GIL contention).
    """
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=0 if num_threads == 0 else 16)
    iterator = dataset.to_iter_dataset(options).__iter__()
    if state is not None:
        iterator.set_state(state)
    return iterator
