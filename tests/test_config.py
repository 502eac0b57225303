"""Config loading: typed parsing, error messages, overrides, round trips, the shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import pytest

from opd_jax.config import (
    ConfigError,
    FieldError,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    save_config,
    to_dict,
    validate_tree,
)
from opd_jax.config.loss import LossSpec
from opd_jax.config.run import RunConfig, StageSpec
from opd_jax.config.schema import OptimSpec

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
MIN = {"stages": [{"kind": "opd", "steps": 2}]}


def _err(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(RunConfig, data)
    return str(info.value)


# --- generic mechanism on a toy schema -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    x: float = 1.0
    mode: Literal["a", "b"] = "a"

    def validate(self):
        if self.x < 0:
            raise FieldError("x", self.x, "a number >= 0")


@dataclasses.dataclass(frozen=True)
class Root:
    n: int
    leaf: Leaf = Leaf()
    maybe: Optional[Leaf] = None
    leaves: tuple[Leaf, ...] = ()
    ids: list[int] = dataclasses.field(default_factory=list)
    pair: tuple[int, str] = (0, "")
    table: dict[str, float] = dataclasses.field(default_factory=dict)


def test_generic_nested_types_and_coercion():
    root = from_dict(Root, {"n": 3.0, "leaf": {"x": 2}, "maybe": {"mode": "b"},
                            "leaves": [{"x": "1e-3"}, {}], "ids": [1, 2], "pair": [1, "p"],
                            "table": {"a": 1}})
    assert root.n == 3 and isinstance(root.n, int)
    assert root.leaf.x == 2.0 and isinstance(root.leaf.x, float)
    assert root.maybe == Leaf(mode="b")
    assert root.leaves == (Leaf(x=1e-3), Leaf())
    assert root.ids == [1, 2] and root.pair == (1, "p") and root.table == {"a": 1.0}
    assert from_dict(Root, to_dict(root)) == root


@pytest.mark.parametrize("data, match", [
    ({}, "missing required key 'n'"),
    ({"n": "3"}, r"n: expected int, got str '3'"),
    ({"n": True}, "n: expected int, got bool"),
    ({"n": 1.5}, "n: expected int, got float"),
    ({"n": 1, "leaf": {"mode": "c"}}, r"leaf.mode='c' is not allowed; choose one of: 'a', 'b'"),
    ({"n": 1, "leaves": [{}, {"x": -1}]}, r"leaves.1.x=-1.0 is invalid: a number >= 0"),
    ({"n": 1, "leaf": 3}, "leaf: expected a mapping for Leaf"),
    ({"n": 1, "pair": [1]}, "pair: expected 2 items"),
    ({"n": 1, "ids": 5}, "ids: expected a list"),
    ({"n": 1, "leaf": {"y": 1}}, r"unknown key 'leaf.y'\. Valid keys of leaf: x, mode"),
])
def test_generic_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Root, data)


# --- the run schema --------------------------------------------------------------------------


def test_unknown_key_top_level_lists_keys_and_suggests():
    msg = _err({**MIN, "optimm": {}}, "unknown key 'optimm'")
    assert "did you mean 'optim'?" in msg
    assert "Valid keys of <root>:" in msg and "stages" in msg and "checkpoint" in msg


def test_unknown_key_nested_lists_keys_and_suggests():
    msg = _err({**MIN, "optim": {"lrr": 1e-3}}, r"unknown key 'optim\.lrr'")
    assert "did you mean 'lr'?" in msg and "warmup_steps" in msg
    msg = _err({"stages": [{"kind": "opd", "steps": 1, "stepz": 3}]}, r"'stages\.0\.stepz'")
    assert "did you mean 'steps'?" in msg


def test_wrong_type_and_bad_literal():
    _err({**MIN, "optim": {"lr": "fast"}}, r"optim\.lr: expected float, got str 'fast'")
    _err({**MIN, "log": {"tensorboard": "yes please"}}, r"log\.tensorboard: expected bool")
    msg = _err({**MIN, "loss": {"objective": "reverse_kll"}}, r"loss\.objective='reverse_kll'")
    assert "choose one of" in msg and "did you mean 'reverse_kl'?" in msg
    _err({"stages": [{"kind": "distill", "steps": 1}]},
         r"stages\.0\.kind='distill' is not allowed; choose one of: 'cold_start', 'opd'")


def test_yaml_exponent_without_dot_is_a_float():
    cfg = from_dict(RunConfig, {**MIN, "optim": {"lr": "1e-6"}})
    assert cfg.optim.lr == 1e-6


@pytest.mark.parametrize("data, match", [
    ({"stages": []}, r"stages=\[\] is invalid: at least one stage"),
    ({}, r"stages=\[\] is invalid"),
    ({**MIN, "loss": {"lambda_on_policy": 1.5}}, r"loss\.lambda_on_policy=1\.5 .*\[0, 1\]"),
    ({**MIN, "loss": {"objective": "reverse_kl", "weights": "teacher_p"}},
     r"loss\.weights='teacher_p' is invalid: null \(or absent\) for objective reverse_kl"),
    ({**MIN, "loss": {"objective": "forward_kl", "support": "intersection"}},
     r"loss\.support='intersection'.*topk_reward supports"),
    ({**MIN, "loss": {"objective": "sampled_token_rkl", "support": "student"}},
     r"loss\.support='student'.*sampled_token_rkl"),
    ({**MIN, "loss": {"objective": "topk_reward", "top_k": None}}, r"loss\.top_k=None"),
    ({"stages": [{"kind": "opd"}]}, r"stages\.0\.steps=0 is invalid: an integer >= 1"),
    ({"stages": [{"kind": "eval", "teacher_mode": "ema"}]},
     r"stages\.0\.teacher_mode='ema' is invalid: leave unset: it applies to opsd"),
    ({"stages": [{"kind": "opd", "steps": 1, "name": "a"}, {"kind": "eval", "name": "a"}]},
     r"stages\.0\.name='a' is invalid: a unique stage name"),
    ({"stages": [{"kind": "opsd", "steps": 1}]}, r"data\.teacher_template=None.*opsd stage"),
    ({"data": {"teacher_template": "{problem} {solution}"}, "stages": [{"kind": "opsd", "steps": 1}]},
     r"data\.solution_key=None .*has no solutions"),
    ({"stages": [{"kind": "opsd", "steps": 1,
                  "data": {"teacher_template": "{problem} {solution}"}}]},
     r"stages\.0\.data\.solution_key=None"),
    ({**MIN, "mesh": {"shape": {"tensor": 2}}}, r"mesh\.rules='fsdp'.*fsdp_tp"),
    ({**MIN, "student": {"derive": {"keep_every": 3, "drop_layers": [1]}}},
     r"student\.derive\.drop_layers=\[1\].*at most one"),
    ({**MIN, "student": {"derive": {"d_model": 64}}}, r"student\.derive\.d_model=64.*random_init"),
    ({**MIN, "optim": {"optimizer": "adam", "weight_decay": 0.1}}, r"optim\.weight_decay=0\.1"),
    ({**MIN, "data": {"instruction": "no placeholder"}}, r"data\.instruction="),
])
def test_cross_field_validation(data, match):
    _err(data, match)


def test_opsd_ok_with_solutions_or_answer_only_template():
    for data in ({"teacher_template": "{problem}\n{solution}", "solution_key": "sol"},
                 {"teacher_template": "{problem}\nThe answer is {answer}."}):
        cfg = from_dict(RunConfig, {"data": data, "stages": [{"kind": "opsd", "steps": 1}]})
        assert cfg.stages[0].teacher_mode == "fixed"


def test_stage_overrides_merge_onto_run_level():
    cfg = from_dict(RunConfig, {"optim": {"lr": 1e-3, "weight_decay": 0.1},
                                "stages": [{"kind": "opd", "steps": 1, "optim": {"lr": 1e-6}},
                                           {"kind": "opd", "steps": 1}]})
    assert cfg.stages[0].optim == OptimSpec(lr=1e-6, weight_decay=0.1)
    assert cfg.resolve_stage(1).optim == cfg.optim and cfg.resolve_stage(1).loss == LossSpec()
    assert [s.name for s in cfg.stages] == ["opd_0", "opd_1"]


def test_overrides_nested_list_index_and_new_sections():
    raw = {"optim": {"lr": 1e-3}, "stages": [{"kind": "opd", "steps": 5}, {"kind": "eval"}]}
    out = apply_overrides(raw, ["optim.lr=2e-5", "stages.0.steps=10", "stages.1.ks=[1, 4]",
                                "student.derive.drop_layers=[1,2]", "data.kwargs.min_terms=3",
                                "stages.0.optim.warmup_steps=7", "loss.pointwise_clip=null"],
                          schema=RunConfig)
    assert raw["stages"][0]["steps"] == 5  # input untouched
    cfg = from_dict(RunConfig, out)
    assert cfg.optim.lr == 2e-5 and cfg.stages[0].steps == 10 and cfg.stages[1].ks == (1, 4)
    assert cfg.student.derive.drop_layers == (1, 2) and cfg.data.kwargs == {"min_terms": 3}
    assert cfg.stages[0].optim.warmup_steps == 7 and cfg.stages[0].optim.lr == 2e-5
    assert cfg.loss.pointwise_clip is None


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", r"unknown key 'optim\.lrr'; did you mean 'lr'\?"),
    ("optimm.lr=1", r"unknown key 'optimm'; did you mean 'optim'\?"),
    ("stages.5.steps=1", r"stages is a list of 1 items; '5' is not a valid index"),
    ("stages.x.steps=1", "not a valid index"),
    ("optim.lr.x=1", "optim.lr is a float"),
    ("optim.lr", "expected dotted.key=value"),
    ("optim.lr=[1", "not valid YAML"),
])
def test_override_errors(override, match):
    raw = {"optim": {"lr": 1e-3}, "stages": [{"kind": "opd", "steps": 5}]}
    with pytest.raises(ConfigError, match=match):
        apply_overrides(raw, [override], schema=RunConfig)


def test_override_without_schema_requires_existing_keys():
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2"]) == {"a": {"b": 2}}
    with pytest.raises(ConfigError, match=r"unknown key 'a\.c'"):
        apply_overrides({"a": {"b": 1}}, ["a.c=2"])


def test_round_trip_to_dict_and_yaml(tmp_path):
    cfg = load_config(CONFIGS[0], ["stages.0.steps=3"])
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert dump_config(cfg).startswith("name: ")


def test_validate_tree_on_code_built_config():
    cfg = RunConfig(stages=(StageSpec(kind="opd", name="x", steps=1),))
    validate_tree(cfg)
    bad = dataclasses.replace(cfg, loss=LossSpec(beta=2.0))
    with pytest.raises(ConfigError, match=r"loss\.beta=2\.0"):
        validate_tree(bad)


def test_load_config_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages: [{kind: opd, steps: 1}]\nsampler: {temprature: 1.0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'sampler\.temprature'"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def _load_shipped(path):
    """Each shipped config through the loader of the command that reads it."""
    raw = path.read_text()
    if "\nalign:" in raw:   # an align-prompts config, not a run: checked by its own loader
        from opd_jax.align_prompts import load_align_config

        load_align_config(path)
        pytest.skip("align-prompts config (loaded by load_align_config)")
    if "\nstudy:" in raw:
        from opd_jax.study import load_study_config

        return load_study_config(path)[0]
    if "\nselect:" in raw:
        from opd_jax.select_prompts import load_select_config

        return load_select_config(path)[0]
    return load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = _load_shipped(path)
    assert cfg.stages and cfg.run_dir.name == cfg.name
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    for i in range(len(cfg.stages)):
        stage = cfg.resolve_stage(i)
        assert stage.optim is not None and stage.data is not None


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "qwen3_1p7b_opd.yaml", "qwen3_opsd.yaml", "tiny_test.yaml"} <= names


def test_recipe_values():
    opd = load_config(CONFIGS[0].parent / "qwen3_1p7b_opd.yaml")
    assert (opd.optim.lr, opd.stages[0].batch_prompts, opd.sampler.n_samples) == (1e-6, 64, 4)
    assert (opd.loss.objective, opd.loss.top_k, opd.loss.resolved_support,
            opd.loss.resolved_weights, opd.sampler.max_new_tokens) == (
        "topk_reward", 16, "student", "student_p", 7168)
    opsd = load_config(CONFIGS[0].parent / "qwen3_opsd.yaml")
    assert (opsd.loss.objective, opsd.loss.beta, opsd.loss.pointwise_clip,
            opsd.loss.temperature) == ("generalized_jsd", 0.0, 0.05, 1.1)
    assert (opsd.student.lora.rank, opsd.student.lora.alpha, opsd.stages[0].teacher_mode) == (
        64, 128.0, "fixed")
