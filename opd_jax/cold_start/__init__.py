"""The OPD paper's off-policy cold start, built offline: ``opd-jax build-cold-start CONFIG``
samples the teacher on the training prompts, rejects rollouts with the reference's filters
(:mod:`opd_jax.eval.filters`), re-samples rejected slots, and writes a JSONL dataset
(:mod:`opd_jax.data.cold_start_file`) that a ``cold_start`` stage with ``dataset:`` trains on for
``epochs`` (:mod:`opd_jax.train.sft_batches`).

Modules: :mod:`.build` (the command: queue, retries, summary).
"""

from opd_jax.cold_start.build import (
    BUILD_KEY,
    Slot,
    build_cold_start,
    encode_all,
    format_summary,
    pick_stage,
    split_completion,
)

__all__ = ["BUILD_KEY", "Slot", "build_cold_start", "encode_all", "format_summary", "pick_stage",
           "split_completion"]
