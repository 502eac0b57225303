"""split_sections: a run config with extra top-level sections (select:, study:)."""

import dataclasses

import pytest

from opd_jax.config import ConfigError
from opd_jax.config.sections import split_sections


@dataclasses.dataclass(frozen=True)
class Extra:
    size: int = 1
    name: str = "x"


def test_sections_are_split_off_and_overrides_routed():
    raw = {"seed": 3, "extra": {"size": 2}, "stages": [{"kind": "opd", "steps": 1}]}
    cfg, (extra, other) = split_sections(raw, ["extra.name=y", "seed=4", "other.size=5"],
                                         {"extra": Extra, "other": Extra})
    assert cfg.seed == 4 and [s.kind for s in cfg.stages] == ["opd"]
    assert extra == Extra(size=2, name="y") and other == Extra(size=5)
    assert "extra" in raw  # the caller's mapping is left as it was


def test_missing_stages_get_one_eval_and_errors_name_the_file():
    cfg, (extra,) = split_sections({}, [], {"extra": Extra})
    assert [s.kind for s in cfg.stages] == ["eval"] and extra == Extra()
    with pytest.raises(ConfigError, match=r"my\.yaml: .*extra\.sise"):
        split_sections({}, ["extra.sise=2"], {"extra": Extra}, where="my.yaml")
    with pytest.raises(ConfigError, match="my.yaml"):
        split_sections({"extra": {"size": "many"}}, [], {"extra": Extra}, where="my.yaml")
