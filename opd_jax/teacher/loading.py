"""The teacher of a run config, loaded once for a process that serves or caches it (no student):
:func:`load_teacher`, and :func:`teacher_fingerprint`, the name a served or cached teacher's
scores carry."""

from __future__ import annotations

import dataclasses
from typing import Any

from opd_jax.model.config import ModelConfig
from opd_jax.model.fingerprint import params_fingerprint
from opd_jax.model.loading import Model

__all__ = ["load_teacher", "teacher_fingerprint"]

_EXECUTION = ("attention", "attention_block")   # how the model runs, not what it computes


def teacher_fingerprint(model: Model) -> str:
    """:func:`~opd_jax.model.fingerprint.params_fingerprint` of a loaded teacher (weights as
    scored, after any ``precision`` cast), its config's execution settings (attention
    implementation and block) set to the defaults: they do not change the scores."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in _EXECUTION}
    return params_fingerprint(model.config.replace(**defaults), model.params)


def load_teacher(cfg: Any) -> Model:
    """The run config's teacher as ``build_models`` makes it (source, derive, execution
    settings, ``precision`` cast), without the student; ``ValueError`` when it has no
    tokenizer."""
    from opd_jax.teacher.source import source_kind
    from opd_jax.train.models import load_teacher_model

    spec = cfg.teacher
    if source_kind(spec.source) != "model":
        raise ValueError(f"teacher.source={spec.source!r} is a {source_kind(spec.source)}, not a "
                         "model: serve-teacher and cache-teacher run the teacher's weights in this "
                         "process; set teacher.source to the model (default, a HF folder or a .gguf)")
    model = load_teacher_model(spec, cfg.seed)
    if model.tokenizer is None:
        raise ValueError("the teacher came without a tokenizer; set teacher.tokenizer to a "
                         "tokenizer.json / .model / .gguf path")
    return model
