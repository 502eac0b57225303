"""The command line's conventions: a config positionally or as ``--config`` on every command that
takes one, overrides anywhere after it, ``--version``; parsed without running anything."""

from __future__ import annotations

import pytest

from opd_jax.cli import parse_args

DEMO = "configs/demo.yaml"


@pytest.mark.parametrize("command", ["train", "eval", "sample", "select-prompts", "study", "demo"])
def test_config_positional_or_option(command):
    extra = ["--prompt", "hi"] if command == "sample" else []
    a = parse_args([command, DEMO, "seed=3", *extra])
    b = parse_args([command, "--config", DEMO, "seed=3", *extra])
    c = parse_args([command, "seed=3", "--config", DEMO, *extra])
    assert a.config == b.config == c.config == DEMO
    assert a.overrides == b.overrides == c.overrides == ["seed=3"]


def test_defaults_and_errors(capsys):
    assert parse_args(["study"]).config == "configs/study_demo.yaml"
    assert parse_args(["select-prompts", "select.rule.top_n=4"]).overrides == ["select.rule.top_n=4"]
    with pytest.raises(SystemExit) as e:
        parse_args(["train"])
    assert e.value.code == 2 and "train needs a config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["train", DEMO, "--config", "configs/tiny_test.yaml"])
    assert "two configs given" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("opd-jax ")


def test_export_arguments():
    a = parse_args(["export", "runs/demo", "--to", "hf", "out", "--stage", "opd", "--step", "4"])
    assert (a.run_dir, a.out, a.to, a.stage, a.step) == ("runs/demo", "out", "hf", "opd", 4)


def test_config_show_prints_the_resolved_config(capsys):
    import yaml

    from opd_jax.cli import main

    assert main(["config", "show", DEMO, "optim.lr=0.125"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 0.125 and shown["stages"][0]["kind"] == "cold_start"
    assert main(["config", "show"]) == 0
    defaults = yaml.safe_load(capsys.readouterr().out)
    assert defaults["seed"] == 0 and defaults["stages"] == []
    assert main(["config", "show", DEMO, "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_a_missing_extra_is_one_clear_line(monkeypatch, tmp_path, capsys):
    from opd_jax.checks import MissingExtraError, require
    from opd_jax.cli import main

    monkeypatch.setitem(__import__("sys").modules, "reasoning_gym", None)   # import fails
    with pytest.raises(MissingExtraError, match=r"pip install 'opd_jax\[data\]'"):
        require("reasoning_gym", "data", "data.source=reasoning_gym")
    assert main(["train", "configs/tiny_test.yaml", f"out_dir={tmp_path}/r", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'reasoning_gym' package" in err and "Traceback" not in err
