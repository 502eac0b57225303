"""Orbax checkpoints per stage: params + optimizer state + rng (one pytree) and a JSON extra.

Run layout: ``<run_dir>/checkpoints/<stage_name>/<step>/{state,data}``. ``state`` is any pytree of
arrays (typed PRNG keys from ``jax.random.key`` included); ``data`` is a JSON dict with the data
iterator state, metrics so far, etc. (``bytes`` values, e.g. a grain iterator state, and numpy
scalars / small arrays are encoded transparently). The last save of a stage carries
``"done": true`` so a multi-stage run knows where to resume (:func:`first_incomplete_stage`);
it may hold the weights alone (``"weights_only": true`` in its extra, :data:`WEIGHTS_ONLY`): a
finished stage's optimizer state is never read back, and :meth:`StageCheckpointer.restore` then
reads the tree its ``weights_only`` argument describes.
The teacher is never checkpointed (it is a frozen input, not training state).

Typical loop::

    ckpt = StageCheckpointer(stage_dir(run_dir, "opd"), keep_last_n=2, every_n_steps=50)
    start, state, extra = ckpt.restore_latest(abstract_state) or (0, init_state, {})
    with graceful_stop() as stop:
        for step in range(start + 1, n_steps + 1):
            state = train_step(state, ...)
            if stop:
                ckpt.save(step, state, extra, force=True); break
            ckpt.save(step, state, extra)             # saves every_n_steps only
        else:
            ckpt.save(n_steps, state, extra, done=True)
    ckpt.close()
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["StageCheckpointer", "Restored", "RUNNING_MARKER", "WEIGHTS_ONLY", "CheckpointStructureError",
           "check_structure", "stage_dir", "first_incomplete_stage", "graceful_stop", "StopFlag"]

_BYTES = "__bytes_b64__"
# ``<run_dir>/.running``: written by ``opd_jax.train.run.run`` while a trainer writes the run
# (``{"pid", "host", "started"}``), removed when it exits; readers (``opd-jax export``) refuse a run
# whose trainer is alive
RUNNING_MARKER = ".running"
#: extra key of a checkpoint whose state tree holds the weights alone (a finished stage's)
WEIGHTS_ONLY = "weights_only"


class CheckpointStructureError(ValueError):
    """The saved state tree does not match the tree it is restored into (not a corrupt file)."""


class Restored(NamedTuple):
    step: int
    state: Any
    extra: dict


def stage_dir(run_dir: str | os.PathLike, stage_name: str) -> Path:
    """``<run_dir>/checkpoints/<stage_name>``: where a stage's step directories live."""
    return Path(run_dir) / "checkpoints" / stage_name


def _encode(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(obj).tolist()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_BYTES}:
            return base64.b64decode(obj[_BYTES])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_shapes(tree: Any, leaf_shape) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): leaf_shape(leaf) for path, leaf in leaves}


def _stored_shape(leaf: Any) -> tuple:
    """Shape as written on disk: typed PRNG keys are stored as their key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data,
                                    jax.ShapeDtypeStruct(leaf.shape, dtype)).shape)
    return tuple(np.shape(leaf))


def check_structure(where: str, saved: Any, target: Any) -> None:
    """Raise :class:`CheckpointStructureError` naming every leaf path that is missing, extra or
    of another shape between ``saved`` (leaves with ``.shape``) and ``target``."""
    saved_shapes = _flat_shapes(saved, lambda m: tuple(getattr(m, "shape", None) or ()))
    target_shapes = _flat_shapes(target, _stored_shape)
    missing = sorted(set(saved_shapes) - set(target_shapes))
    extra = sorted(set(target_shapes) - set(saved_shapes))
    shapes = [f"{k}: saved {saved_shapes[k]} vs target {target_shapes[k]}"
              for k in sorted(set(saved_shapes) & set(target_shapes))
              if saved_shapes[k] != target_shapes[k]]
    if missing or extra or shapes:
        parts = [f"{label} ({len(items)}): {items[:8]}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("in the checkpoint but not in the target", missing),
                                      ("in the target but not in the checkpoint", extra),
                                      ("shape mismatches", shapes)) if items]
        raise CheckpointStructureError(
            f"checkpoint {where} does not match the state it is restored into: "
            + "; ".join(parts) + ". Was it written by a different model / optimizer config?")


class StageCheckpointer:
    """Checkpoints of one stage, over ``ocp.CheckpointManager``.

    Args:
      directory: the stage directory (see :func:`stage_dir`); created if missing.
      keep_last_n: most recent steps kept; older ones are deleted after each save.
      every_n_steps: :meth:`save` without ``force`` writes only when ``step % every_n_steps == 0``
        (0 = only forced / final saves).
      async_save: write in a background thread (:meth:`save` returns once arrays are copied to
        host); call :meth:`wait` or :meth:`close` before reading the files or exiting.
      save_concurrent_gb: bound on the GB of arrays being written at once (Orbax's
        ``save_concurrent_gb``; None = its default): a save's transient host buffers stay under it.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last_n: int = 2,
                 every_n_steps: int = 0, async_save: bool = True,
                 save_concurrent_gb: float | None = None):
        if keep_last_n < 1 or every_n_steps < 0:
            raise ValueError(f"keep_last_n must be >= 1 and every_n_steps >= 0, got "
                             f"{keep_last_n} and {every_n_steps}")
        self.directory = Path(directory).absolute()
        self.every_n_steps = every_n_steps
        self.async_save = async_save
        self.save_concurrent_gb = save_concurrent_gb
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep_last_n),
            enable_async_checkpointing=async_save, create=True)
        bound = {} if save_concurrent_gb is None else {"save_concurrent_gb": save_concurrent_gb}
        handlers = {"state": ocp.StandardCheckpointHandler(**bound),
                    "data": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def __enter__(self) -> "StageCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Saved steps, ascending (a step still being written asynchronously is included)."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """Most recent saved step, or None."""
        return self._mgr.latest_step()

    def check_fits(self, state: Any) -> None:
        """Raise ``ValueError`` (before any training) when ``save_concurrent_gb`` is below the
        largest array of ``state`` (arrays or ``ShapeDtypeStruct``s): Orbax would refuse to write
        that array at the first save."""
        if self.save_concurrent_gb is None or state is None:
            return
        sizes = [(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize,
                  "/".join(_key_name(entry) for entry in path))
                 for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
                 if hasattr(x, "shape") and hasattr(x, "dtype")
                 and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
        largest, name = max(sizes, default=(0, ""))
        if largest > self.save_concurrent_gb * 1e9:
            raise ValueError(
                f"checkpoint.save_concurrent_gb={self.save_concurrent_gb} is below the largest "
                f"array of the state ({name!r}: {largest / 1e9:.4g} GB), which Orbax cannot write "
                f"under that bound; set it to at least {np.ceil(largest / 1e7) / 100:.2f} or to "
                "null (no bound)")

    def should_save(self, step: int) -> bool:
        """Whether an unforced :meth:`save` at ``step`` writes."""
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def save(self, step: int, state: Any, extra: dict | None = None, *, force: bool = False,
             done: bool = False) -> bool:
        """Save ``state`` (pytree, or None for a JSON-only checkpoint) and ``extra`` at ``step``.

        Writes when ``force``, ``done`` or :meth:`should_save`. ``done=True`` marks the stage
        complete (``extra["done"] = True``) and replaces a checkpoint already saved at ``step``.
        Returns whether a checkpoint was written.
        """
        if not (force or done or self.should_save(step)):
            return False
        if step in self._mgr.all_steps():
            self._mgr.wait_until_finished()
            if not done or self._read_extra(step).get("done"):
                return False
            self._mgr.delete(step)
        items = {"data": ocp.args.JsonSave(_encode({**(extra or {}), "done": done}))}
        self.check_fits(state)
        if state is not None:
            items["state"] = ocp.args.StandardSave(state)
        return bool(self._mgr.save(step, args=ocp.args.Composite(**items), force=True))

    def _read_extra(self, step: int) -> dict:
        restored = self._mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return _decode(restored.data or {})

    def is_done(self) -> bool:
        """Whether the latest checkpoint marks the stage complete (False if none or unreadable)."""
        step = self.latest_step()
        if step is None:
            return False
        self._mgr.wait_until_finished()
        try:
            return bool(self._read_extra(step).get("done"))
        except Exception:  # noqa: BLE001 - a corrupt latest step means "not done"
            return False

    def restore(self, step: int, abstract_state: Any, *, weights_only: Any = None) -> Restored:
        """Restore ``step`` into ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with the
        target ``sharding``, or None to read only the JSON extra).

        ``weights_only``: the abstract tree to read instead when the step was saved with
        ``extra[WEIGHTS_ONLY]`` true (a finished stage's weights, e.g. ``{"trainable": ...}``).

        Raises:
          CheckpointStructureError: the saved tree differs from the tree it is read into.
        """
        self._mgr.wait_until_finished()
        if weights_only is not None and abstract_state is not None \
                and self._read_extra(step).get(WEIGHTS_ONLY):
            abstract_state = weights_only
        items = {"data": ocp.args.JsonRestore()}
        if abstract_state is not None:
            where = self.directory / str(step)
            if not (where / "state").is_dir():
                raise CheckpointStructureError(f"checkpoint {where} holds no state (JSON-only)")
            metadata = self._mgr.item_metadata(step)["state"]
            if metadata is None:  # orbax returns None when _METADATA is missing or unreadable
                raise FileNotFoundError(f"{where / 'state'}: tree metadata missing or unreadable")
            check_structure(str(where), metadata.tree, abstract_state)
            items["state"] = ocp.args.StandardRestore(abstract_state)
        restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
        state = restored.state if abstract_state is not None else None
        return Restored(step, state, _decode(restored.data or {}))

    def restore_as_saved(self, step: int) -> Any:
        """The state tree saved at ``step`` as written (nested dicts of arrays on the default
        device), without knowing its structure in advance (export reads a run this way)."""
        self._mgr.wait_until_finished()
        metadata = self._mgr.item_metadata(step)["state"]
        if metadata is None:
            raise FileNotFoundError(f"{self.directory / str(step) / 'state'}: tree metadata "
                                    "missing or unreadable")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                metadata.tree)
        restored = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
        return restored.state

    def restore_latest(self, abstract_state: Any, *, weights_only: Any = None) -> Restored | None:
        """Restore the newest readable step, or None when the stage has no checkpoint
        (``weights_only``: as for :meth:`restore`).

        A step that fails to read (truncated or missing file) is moved to ``<dir>/corrupt/`` with a
        warning naming it and the error, and the previous step is tried. A structure mismatch is
        raised at once (every step would fail the same way).
        """
        self._mgr.wait_until_finished()
        failures = []
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state, weights_only=weights_only)
            except CheckpointStructureError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means a corrupt step
                failures.append(f"step {step}: {type(e).__name__}: {e}")
                moved = self._quarantine(step)
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}: {str(e)[:300]}); moved it to {moved} and "
                              "falling back to the previous step", RuntimeWarning, stacklevel=2)
        if failures:
            raise RuntimeError(f"no readable checkpoint in {self.directory}: "
                               + " | ".join(failures))
        return None

    def _quarantine(self, step: int) -> Path:
        target = self.directory / "corrupt" / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"opd_jax_quarantine_{step}")
        self._mgr.reload()
        return target

    def reached_preemption(self, step: int) -> bool:
        """True when JAX's multi-host preemption notice asks to checkpoint at ``step``."""
        return self._mgr.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's threads."""
        self._mgr.wait_until_finished()
        self._mgr.close()


def first_incomplete_stage(run_dir: str | os.PathLike, stage_names: Sequence[str]) -> int:
    """Index of the first stage whose checkpoints are not marked done (``len`` if all are)."""
    for i, name in enumerate(stage_names):
        directory = stage_dir(run_dir, name)
        if not directory.is_dir():
            return i
        ckpt = StageCheckpointer(directory, async_save=False)
        try:
            if not ckpt.is_done():
                return i
        finally:
            ckpt.close()
    return len(stage_names)


class StopFlag:
    """Set when a stop signal arrives; truthy once set. ``signum`` is the signal received."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __bool__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def graceful_stop(signals: Sequence[int] = (signal.SIGTERM,)) -> Iterator[StopFlag]:
    """Turn ``signals`` into a :class:`StopFlag` the train loop polls, so it saves before exit.

    A second signal while the flag is set goes to the previous handler (the default SIGTERM
    handler terminates). Previous handlers are restored on exit. Outside the main thread (where
    Python cannot install handlers) the flag is returned unarmed, with a warning. On multi-host
    runs combine the flag across processes (or use :meth:`StageCheckpointer.reached_preemption`).
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        warnings.warn("graceful_stop: not in the main thread; signals will not set the flag",
                      RuntimeWarning, stacklevel=3)
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        if not flag.requested:
            flag.signum = signum
            return
        old = previous[signum]
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    try:
        for s in signals:
            signal.signal(s, handler)
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
