"""A run config with extra top-level sections (``select:``, ``study:``) that ``RunConfig`` does
not know: they are split off before the run config is parsed, and the overrides are routed to
the section they name."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from opd_jax.config.core import ConfigError, apply_overrides, from_dict
from opd_jax.config.run import RunConfig


def split_sections(raw: dict, overrides: Sequence[str], sections: dict[str, type], *,
                   where: str = "config") -> tuple[RunConfig, list]:
    """``(RunConfig, [section objects])`` from a raw mapping holding extra top-level
    ``sections`` (``{key: dataclass}``); ``key.x=v`` overrides go to section ``key``, the rest to
    the run config. A missing ``stages`` list gets one eval stage (the run config needs one)."""
    raw = dict(raw)
    parsed = {k: raw.pop(k, None) or {} for k in sections}
    wrapper = dataclasses.make_dataclass(
        "Sections", [(k, cls, dataclasses.field(default_factory=cls)) for k, cls in sections.items()])
    own = [o for o in overrides if o.split(".")[0] in sections]
    run_over = [o for o in overrides if o.split(".")[0] not in sections]
    if not raw.get("stages"):
        raw["stages"] = [{"kind": "eval"}]
    try:
        cfg = from_dict(RunConfig, apply_overrides(raw, run_over, schema=RunConfig))
        parsed = apply_overrides(parsed, own, schema=wrapper)
        objs = [from_dict(cls, parsed[k], path=k) for k, cls in sections.items()]
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg, objs
