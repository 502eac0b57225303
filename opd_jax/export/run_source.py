"""Find a trained student in a run directory and rebuild it: which stage, which step, what weights.

A run directory (``opd_jax.train.run``) holds the resolved ``config.yaml`` and
``checkpoints/<stage>/<step>/state``; the state's ``trainable`` subtree is the student's full
parameter tree, or its LoRA adapters over the untrained base (rebuilt here from the recorded config
exactly as training built it: same source, derivation and seed). Everything is checked before any
weight is read: the stage exists and trains, the step was saved, no trainer is still writing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import jax
import numpy as np

from opd_jax.checkpoint import (
    RUNNING_MARKER,
    CheckpointStructureError,
    StageCheckpointer,
    check_structure,
    stage_dir,
)
from opd_jax.config.run import RunConfig, load_config
from opd_jax.model.decoder import PROJECTIONS, Lora
from opd_jax.model.loading import Model
from opd_jax.model.lora import merge_lora

__all__ = ["ExportSource", "RunLockedError", "locate", "load_student",
           "running_owner"]


class RunLockedError(ValueError):
    """The run directory is being written by a live trainer."""


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """Where the exported weights come from: ``run_dir/checkpoints/<stage>/<step>``; ``done``:
    the stage finished (its last save); ``steps``: every step saved for the stage."""

    run_dir: Path
    cfg: RunConfig
    stage: str
    step: int
    done: bool
    steps: tuple[int, ...]


def running_owner(run_dir: str | os.PathLike) -> dict | None:
    """The live trainer writing ``run_dir`` (``{"pid", "host", ...}`` from its marker), or None
    when no marker exists or its process on this host is gone (an interrupted run)."""
    marker = Path(run_dir) / RUNNING_MARKER
    try:
        owner = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return None
        except (PermissionError, KeyError, ValueError):
            pass
    return owner


def locate(run_dir: str | os.PathLike, stage: str | None = None,
           step: int | None = None) -> ExportSource:
    """Resolve ``stage`` (default: the last train stage of the config with a checkpoint) and
    ``step`` (default: the stage's latest); ``ValueError`` naming what exists when either is
    missing, :class:`RunLockedError` while a trainer writes the run."""
    run_dir = Path(run_dir).expanduser()
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml); pass the directory "
                         "`opd-jax train` wrote, e.g. runs/demo")
    owner = running_owner(run_dir)
    if owner is not None:
        raise RunLockedError(
            f"{run_dir} is still being written (trainer pid {owner.get('pid')} on "
            f"{owner.get('host')}); wait for it to finish or stop it (an interrupted run exports "
            f"its last saved step); if that process is gone, delete {run_dir / RUNNING_MARKER}")
    cfg = load_config(config, [f"out_dir={run_dir}"])
    trains = [s.name for s in (cfg.resolve_stage(i) for i in range(len(cfg.stages))) if s.trains]
    saved = {name: _saved_steps(run_dir, name) for name in trains}
    if stage is None:
        with_steps = [name for name in trains if saved[name]]
        if not with_steps:
            raise ValueError(f"{run_dir} has no saved training step yet (train stages: "
                             f"{trains or 'none'}); run `opd-jax train` first")
        stage = with_steps[-1]
    elif stage not in trains:
        raise ValueError(f"no train stage {stage!r} in {config}; its train stages are {trains}")
    steps = saved[stage]
    if not steps:
        raise ValueError(f"stage {stage!r} of {run_dir} has no saved step; stages with steps: "
                         f"{[n for n in trains if saved[n]]}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"stage {stage!r} has no saved step {step}; saved steps: {list(steps)} "
                         "(checkpoint.keep_last_n keeps only the newest)")
    with StageCheckpointer(stage_dir(run_dir, stage), keep_last_n=max(len(steps), 1),
                           async_save=False) as ck:
        done = bool(ck.restore(step, None).extra.get("done"))
    return ExportSource(run_dir, cfg, stage, step, done, tuple(steps))


def _saved_steps(run_dir: Path, stage: str) -> tuple[int, ...]:
    # read the directory instead of opening a manager: finalized steps are plain integer names
    # (orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames when complete)
    where = stage_dir(run_dir, stage)
    if not where.is_dir():
        return ()
    return tuple(sorted(int(p.name) for p in where.iterdir()
                        if p.name.isdigit() and (p / "state").is_dir()))


def load_student(source: ExportSource, *, merge: bool = True) -> tuple[Model, Lora | None]:
    """The student at ``source`` as a :class:`Model` (float32 or the run's dtype) and, for a LoRA
    run with ``merge=False``, its adapters (the model then holds the untrained base).

    ``merge=True`` folds LoRA adapters into the base (``W + alpha/r · A B``)."""
    from opd_jax.train.models import student_base  # the training code's own builder

    cfg = source.cfg
    base = student_base(cfg.teacher, cfg.student, seed=cfg.seed)
    trainable = _restore_trainable(source)
    lora_spec = cfg.student.lora
    if not lora_spec.enabled:
        _check_same_tree("parameters", trainable, base.params, source)
        return base.replace(params=trainable), None
    adapters = Lora(weights=trainable, scale=float(lora_spec.alpha) / lora_spec.rank)
    expected = {}
    for name in lora_spec.targets:
        shape, n_in = base.params["layers"][name].shape, len(PROJECTIONS[name][1])
        expected[name] = {
            "a": jax.ShapeDtypeStruct((*shape[:1 + n_in], lora_spec.rank), np.float32),
            "b": jax.ShapeDtypeStruct((shape[0], lora_spec.rank, *shape[1 + n_in:]), np.float32)}
    _check_same_tree("LoRA adapters", trainable, expected, source)
    if merge:
        return base.replace(params=merge_lora(base.params, adapters)), None
    return base, adapters


def _restore_trainable(source: ExportSource) -> Any:
    with StageCheckpointer(stage_dir(source.run_dir, source.stage),
                           keep_last_n=max(len(source.steps), 1), async_save=False) as ck:
        state = ck.restore_as_saved(source.step)
    if not isinstance(state, dict) or "trainable" not in state:
        raise ValueError(f"checkpoint {source.stage}/{source.step} of {source.run_dir} holds no "
                         "'trainable' tree (not a train-stage checkpoint)")
    return jax.tree.map(np.asarray, state["trainable"])


def _check_same_tree(what: str, got: Any, want: Any, source: ExportSource) -> None:
    try:
        check_structure(f"{source.stage}/{source.step}", got, want)
    except CheckpointStructureError as e:
        raise CheckpointStructureError(
            f"the {what} saved in {source.stage}/{source.step} do not match the student that "
            f"{source.run_dir / 'config.yaml'} builds ({e}); the config was changed after "
            "training, or the checkpoint belongs to another run") from e
