"""A run directory never lies: resuming refuses a config that would change what the run computes,
and the recorded ``config.yaml`` is never overwritten by a resume."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from opd_jax.checkpoint import stage_dir
from opd_jax.config import load_config
from opd_jax.train.run import config_changes, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.yaml")
BASE = ["checkpoint.every_n_steps=1", "stages=[{kind: opd, steps: 2, batch_prompts: 2}]"]


def _cfg(run_dir, *overrides):
    return load_config(TINY, [f"out_dir={run_dir}", *BASE, *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rec") / "run"
    run(_cfg(run_dir), progress=False)
    return run_dir


@pytest.mark.parametrize("change,key", [
    ("optim.lr=0.5", "optim.lr"),
    ("stages=[{kind: opd, steps: 3, batch_prompts: 2}]", "stages.0.steps"),
    ("teacher.derive.n_layers=3", "teacher.derive.n_layers"),
])
def test_a_finished_run_refuses_another_config(finished, change, key):
    recorded = (finished / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match=rf"(?s){key}.*--fresh.*name=<new name>"):
        run(_cfg(finished, change), progress=False)
    assert (finished / "config.yaml").read_bytes() == recorded


def test_execution_and_logging_changes_resume(finished):
    recorded = (finished / "config.yaml").read_bytes()
    lines = (finished / "metrics.jsonl").read_text()
    summary = run(_cfg(finished, "checkpoint.keep_last_n=5", "log.tensorboard=false",
                       "student.remat=full", "name=renamed"), progress=False)
    assert summary["stages"]["opd"]["steps"] == 2
    assert (finished / "config.yaml").read_bytes() == recorded
    assert (finished / "metrics.jsonl").read_text() == lines   # nothing retrained


def test_an_interrupted_run_refuses_too_and_resumes_unchanged(tmp_path):
    run_dir = tmp_path / "run"
    run(_cfg(run_dir), progress=False)
    shutil.rmtree(stage_dir(run_dir, "opd") / "2")    # as if killed after step 1's save
    with pytest.raises(ValueError, match="loss.top_k: 4 \\(recorded\\) -> 2"):
        run(_cfg(run_dir, "loss.top_k=2"), progress=False)
    summary = run(_cfg(run_dir), progress=False)
    assert summary["stages"]["opd"]["steps"] == 2


def test_cli_names_the_keys_and_exits_2(finished, capsys):
    from opd_jax.cli import main

    code = main(["train", TINY, f"out_dir={finished}", *BASE, "optim.lr=0.25", "--no-progress"])
    assert code == 2 and "optim.lr: 0.001 (recorded) -> 0.25" in capsys.readouterr().err


def test_config_changes_ignores_execution_keys():
    a = {"name": "x", "mesh": {"shape": {"fsdp": 1}}, "optim": {"lr": 1.0}, "stages": [{"k": 1}],
         "compilation_cache": "~/.cache/opd_jax/xla"}
    b = {"name": "y", "mesh": {"shape": {"fsdp": 8}}, "optim": {"lr": 2.0}, "stages": [{"k": 1},
                                                                                     {"k": 2}],
         "compilation_cache": None}
    assert config_changes(a, b) == [("optim.lr", 1.0, 2.0), ("stages.1.k", "<absent>", 2)]


def test_stage_sections_and_packing_are_execution_keys():
    a = {"optim": {"pack": True, "lr": 1.0}, "stages": [{"optim": {"pack": True, "lr": 1.0}}]}
    b = {"optim": {"pack": False, "lr": 1.0}, "stages": [{"optim": {"pack": False, "lr": 3.0}}]}
    assert config_changes(a, b) == [("stages.0.optim.lr", 1.0, 3.0)]


def _saved(run_dir, stage, step):
    from opd_jax.checkpoint import StageCheckpointer

    with StageCheckpointer(stage_dir(run_dir, stage), keep_last_n=10, async_save=False) as ck:
        return ck.restore_as_saved(step), ck.restore(step, None).extra


def test_a_finished_stage_saves_its_weights_only(finished):
    """The last checkpoint of a finished stage holds the trainable weights (what a later stage,
    a resumed run and `opd-jax export` read); the mid-stage one the whole state."""
    mid, mid_extra = _saved(finished, "opd", 1)
    last, extra = _saved(finished, "opd", 2)
    assert {"trainable", "opt_state", "rng", "step"} <= set(mid) and not mid_extra["done"]
    assert set(last) == {"trainable"} and extra["done"] and extra["weights_only"]
    assert jax.tree.structure(last["trainable"]) == jax.tree.structure(mid["trainable"])


def test_the_next_stage_starts_from_a_weights_only_checkpoint(tmp_path):
    """Two stages; the second's checkpoints removed (killed before it saved): the resumed run
    reads stage one's weights-only checkpoint and computes the second stage as before;
    ``checkpoint.final_optimizer_state=true`` keeps the whole state there."""
    two = ("stages=[{kind: opd, name: first, steps: 2, batch_prompts: 2}, "
           "{kind: opd, name: again, steps: 1, batch_prompts: 2}]")
    ref = run(_cfg(tmp_path / "ref", two), progress=False)
    res_dir = tmp_path / "res"
    run(_cfg(res_dir, two), progress=False)
    shutil.rmtree(stage_dir(res_dir, "again"))
    rows = (res_dir / "metrics.jsonl").read_text().splitlines()
    (res_dir / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    resumed = run(_cfg(res_dir, two), progress=False)
    assert resumed["stages"]["again"] == ref["stages"]["again"]
    again, _ = _saved(res_dir, "again", 1)
    want, _ = _saved(tmp_path / "ref", "again", 1)
    jax.tree.map(np.testing.assert_array_equal, again["trainable"], want["trainable"])
    full_dir = tmp_path / "full"
    run(_cfg(full_dir, two, "checkpoint.final_optimizer_state=true"), progress=False)
    full, extra = _saved(full_dir, "first", 2)
    assert "opt_state" in full and extra["done"] and not extra.get("weights_only")
    shutil.rmtree(stage_dir(full_dir, "again"))
    assert run(_cfg(full_dir, two, "checkpoint.final_optimizer_state=true"),
               progress=False)["stages"]["again"] == ref["stages"]["again"]
