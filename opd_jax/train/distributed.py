"""Multi-process glue: one process per host, every host sees the same global batch.

:func:`init_distributed` calls ``jax.distributed.initialize`` from ``cfg.mesh.distributed``; every
process reads its own shard of prompts (grain's ``ShardByJaxProcess``, ``batch_prompts /
process_count`` each, :func:`per_process_batch`) and :func:`gather_records` joins them into the
global batch on every host (prompts are small: one JSON all-gather a step), so host-side work
(tokenising, bucketing, filters) is identical everywhere and host arrays become global arrays with
``TrainMesh.place``. :func:`to_host` fetches global arrays (sampler outputs, metrics) back. Only
process 0 (:func:`is_primary`) writes ``metrics.jsonl`` / ``config.yaml`` / ``summary.json``;
Orbax writes and reads the sharded state from every process itself. In a single process every
function here is the identity (or a no-op).
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from opd_jax import sharding as shd

__all__ = ["init_distributed", "is_primary", "barrier", "to_host", "gather_records",
           "per_process_batch"]


def init_distributed(spec) -> bool:
    """``jax.distributed.initialize`` from a ``DistributedSpec`` (before any other JAX call);
    returns whether it initialised. A second call in the same process is a no-op."""
    if not spec.initialize or jax.distributed.is_initialized():
        return False
    shd.initialize_distributed(spec.coordinator_address, spec.num_processes, spec.process_id)
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (a no-op in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Arrays that span other processes gathered to every host (numpy); others unchanged.
    Identity in a single process."""
    if jax.process_count() == 1:
        return tree

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(one, tree)


def gather_records(records: Sequence[dict]) -> list[dict]:
    """Every process's prompt records, concatenated in process order, on every process
    (the global batch). Identity in a single process."""
    if jax.process_count() == 1:
        return list(records)
    data = np.frombuffer(json.dumps(list(records)).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
    sizes = np.asarray(sizes).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    out: list[dict] = []
    for row, n in zip(every, sizes):
        out.extend(json.loads(row[:int(n)].tobytes().decode()))
    return out


def per_process_batch(batch_prompts: int) -> int:
    """Prompts each process reads per step (``batch_prompts`` is the global batch)."""
    n = jax.process_count()
    if batch_prompts % n:
        raise ValueError(f"batch_prompts={batch_prompts} does not split over {n} processes; "
                         f"make it a multiple of {n}")
    return batch_prompts // n
