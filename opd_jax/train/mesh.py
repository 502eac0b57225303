"""The trainer on a device mesh: placement, explicit step shardings, multi-process glue.

One code path for one CPU, an 8-GPU node and a TPU pod: a single device is the mesh
``(1, 1, 1)``. :func:`build_mesh` reads ``cfg.mesh`` (shape, student ``rules``, ``teacher_rules``);
:class:`TrainMesh` then answers every placement question the stages ask:

* student params (or LoRA adapters + the frozen base) by the student rules table, the teacher by
  its own table (it runs no backward pass, so e.g. ``fsdp_tp`` for the teacher with ``fsdp`` for the
  student on the same mesh is fine);
* the optimizer state mirrors the parameter shardings: ``jax.eval_shape(optimizer.init)`` over the
  abstract trainable tree, each optimizer leaf whose tree path ends in a parameter's path (and has
  its shape) takes that parameter's sharding, everything else (step counts, scalars) is replicated;
* the batch is split over the rules' ``batch`` axes (``("data", "fsdp")``) on its leading axis
  (rows must divide: :meth:`TrainMesh.check_rows` says so before the first step);
* the abstract state (``ShapeDtypeStruct`` with ``sharding=``) that Orbax restores into, and the
  initial state built directly in its shardings (no full copy on one device).

Multi-process (one process per host): :func:`init_distributed` calls ``jax.distributed.initialize``
from ``cfg.mesh.distributed``; every process reads its own shard of prompts (grain's
``ShardByJaxProcess``, ``batch_prompts / process_count`` each) and :func:`gather_records` joins them
into the global batch on every host (prompts are small: one JSON all-gather a step), so host-side
work (tokenising, bucketing, filters) is identical everywhere and host arrays become global arrays
with :meth:`TrainMesh.place`. :func:`to_host` fetches global arrays (sampler outputs, metrics) back.
Only process 0 writes ``metrics.jsonl`` / ``config.yaml`` / ``summary.json`` (:func:`make_log`);
Orbax writes and reads the sharded state from every process itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax import sharding as shd
from opd_jax.model.config import param_axes
from opd_jax.model.decoder import Lora
from opd_jax.model.lora import lora_axes
from opd_jax.train.batch import RolloutBatch

__all__ = ["TrainMesh", "build_mesh", "init_distributed", "is_primary", "barrier", "to_host",
           "gather_records", "per_process_batch", "make_log", "place_models", "teacher_scope",
           "map_rows_per_device", "replicate_embedding", "rules_key", "MemoryLog"]


def rules_key(rules: dict) -> tuple:
    """A hashable form of a rules table (for static dataclass fields)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


@dataclasses.dataclass(frozen=True, eq=False)
class TrainMesh:
    """A mesh plus the student's and the teacher's rules tables."""

    mesh: Mesh
    rules: dict
    teacher_rules: dict

    # --- shapes of the mesh ---------------------------------------------------------------------
    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def batch_shards(self) -> int:
        """Ways the batch's leading axis is split (product of the ``batch`` rule's mesh axes)."""
        return _shards(self.mesh, self.rules)

    def scope(self, teacher: bool = False):
        """``use_mesh_rules`` for activation constraints (student or teacher table)."""
        return shd.use_mesh_rules(self.mesh, self.teacher_rules if teacher else self.rules)

    # --- shardings ------------------------------------------------------------------------------
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def rows(self, ndim: int, shape: Sequence[int] | None = None) -> NamedSharding:
        """Leading axis over the ``batch`` axes, the rest replicated (replicated where ``shape``
        is given and its rows do not divide)."""
        return shd.named_sharding(self.mesh, ("batch",) + (None,) * (ndim - 1), self.rules, shape)

    def batch_shardings(self):
        """A ``RolloutBatch`` of row shardings (every field is ``[B, ...]`` 2-D)."""

        s = self.rows(2)
        return RolloutBatch(*([s] * len(dataclasses.fields(RolloutBatch))))

    def params_shardings(self, config, params, teacher: bool = False):
        """Shardings of a parameter tree of ``config`` by the student's (or teacher's) rules."""
        if params is None:
            return None
        rules = self.teacher_rules if teacher else self.rules
        return shd.tree_shardings(self.mesh, param_axes(config), rules, _shapes(params))

    def trainable_shardings(self, student, trainable):
        """Shardings of the student's trainable tree: params, or LoRA adapters (``lora_axes``)."""
        if student.lora_scale is None:
            return self.params_shardings(student.config, trainable)
        axes = lora_axes(student.config, Lora(weights=trainable, scale=student.lora_scale))
        return shd.tree_shardings(self.mesh, axes, self.rules, _shapes(trainable))

    def mirror_shardings(self, abstract_tree, params_abstract, params_shardings):
        """Shardings for ``abstract_tree`` (e.g. an optimizer state): a leaf whose tree path ends
        with a parameter's path and has that parameter's shape gets its sharding; the rest
        (counts, scalars, anything unmatched) is replicated."""
        by_path = {}
        for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                                   jax.tree.leaves(params_shardings)):
            by_path[_path_key(path)] = (tuple(leaf.shape), s)

        def pick(path, leaf):
            key = _path_key(path)
            for i in range(len(key)):
                hit = by_path.get(key[i:])
                if hit is not None and hit[0] == tuple(leaf.shape):
                    return hit[1]
            return self.replicated()

        return jax.tree_util.tree_map_with_path(pick, abstract_tree)

    def state_shardings(self, abstract_state, trainable_shardings):
        """Shardings of a ``TrainState``: trainable and EMA as the params, optimizer state
        mirrored, step / rng / counters replicated."""
        rep = self.replicated()
        return abstract_state.replace(
            step=rep, rng=rep, skipped=rep, trainable=trainable_shardings,
            opt_state=self.mirror_shardings(abstract_state.opt_state, abstract_state.trainable,
                                            trainable_shardings),
            ema=None if abstract_state.ema is None else trainable_shardings)

    # --- the train state --------------------------------------------------------------------------
    def abstract_state(self, init_fn, trainable, trainable_shardings):
        """``(abstract_state, shardings)``: ``ShapeDtypeStruct`` leaves with ``sharding=`` (what
        Orbax restores into) for the state ``init_fn(trainable)`` would build."""
        shapes = jax.eval_shape(init_fn, trainable)
        shardings = self.state_shardings(shapes, trainable_shardings)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                shapes, shardings)
        return abstract, shardings

    def train_shardings(self, student, trainable, frozen, teacher, teacher_args, init_fn):
        """``(abstract_state, shardings)`` for a train stage: ``shardings`` is the
        ``{"state", "batch", "frozen", "teacher"}`` dict ``make_train_step(shardings=)`` takes.
        ``teacher`` is the step's ``TeacherSpec``: a separate teacher is placed by the teacher
        rules, OPSD's fixed teacher (a copy of the trainable tree) like the trainable tree."""
        trainable_sh = self.trainable_shardings(student, trainable)
        abstract, state_sh = self.abstract_state(init_fn, trainable, trainable_sh)
        if teacher.mode == "separate":
            teacher_sh = self.params_shardings(teacher.config, teacher_args, teacher=True)
        else:
            teacher_sh = trainable_sh if teacher_args is not None else None
        return abstract, {"state": state_sh, "batch": self.batch_shardings(),
                          "frozen": self.params_shardings(student.config, frozen),
                          "teacher": teacher_sh}

    def init_state(self, init_fn, trainable, shardings):
        """``init_fn(trainable)`` built directly in ``shardings``."""
        return jax.jit(init_fn, out_shardings=shardings)(trainable)

    # --- placement ------------------------------------------------------------------------------
    def place(self, tree, shardings):
        """Host / local / global arrays of ``tree`` as global arrays with ``shardings``.

        One process: ``jax.device_put``. Several: host and process-local arrays (identical on every
        process by construction) are cut into this process's shards with
        ``make_array_from_callback``; global arrays are resharded with ``device_put``.
        """
        if jax.process_count() == 1:
            return jax.device_put(tree, shardings)

        def one(x, s):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return jax.device_put(x, s)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(one, tree, shardings)

    def place_rows(self, batch):
        """A ``RolloutBatch`` (or any tree of ``[B, ...]`` arrays) split over the batch axes;
        rows that do not divide are replicated (eval batches of any size)."""
        return self.place(batch, jax.tree.map(lambda x: self.rows(np.ndim(x), np.shape(x)), batch))

    def sample(self, sampler, params, prompts, key, *, lora=None,
               from_teacher_prompt: bool = False):
        """``rollout.sample`` on the mesh; the output is on the host in a multi-process run.

        The sampler places its rows (and its per-row keys, as key data) as global arrays on the
        mesh itself, so this only fetches the outputs that span other processes."""
        from opd_jax.train import rollout

        out = rollout.sample(sampler, params, prompts, key, lora=lora,
                             from_teacher_prompt=from_teacher_prompt)
        return to_host(out)

    def check_rows(self, rows: int, grad_accum: int = 1, what: str = "the batch") -> None:
        """``ValueError`` unless ``rows`` (and each grad-accum micro-batch) splits evenly over the
        batch shards."""
        n = self.batch_shards
        if n == 1:
            return
        micro = rows // grad_accum if rows % grad_accum == 0 else rows
        if rows % n or micro % n:
            raise ValueError(
                f"{what} has {rows} rows ({rows // grad_accum if rows % grad_accum == 0 else rows} "
                f"per micro-batch with grad_accum_steps={grad_accum}) but the mesh {self.shape} "
                f"splits rows {n} ways (rules batch -> {self.rules.get('batch')}); make "
                f"batch_prompts x n_samples / grad_accum_steps a multiple of {n}, or use a mesh "
                f"with fewer data/fsdp devices")


def _shards(mesh: Mesh, rules: dict) -> int:
    target = rules.get("batch")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return math.prod(mesh.shape[a] for a in axes)


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _path_key(path) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


def build_mesh(spec, devices: Sequence | None = None) -> TrainMesh:
    """A :class:`TrainMesh` from a ``MeshSpec`` (``shape``, ``rules``, ``teacher_rules``)."""
    mesh = shd.make_mesh(dataclasses.asdict(spec.shape), devices=devices)
    rules = shd.get_rules(spec.rules)
    teacher = shd.get_rules(spec.teacher_rules) if spec.teacher_rules else rules
    return TrainMesh(mesh, rules, teacher)


def single_device_mesh() -> TrainMesh:
    """The ``(1, 1, 1)`` mesh on the first device with pure FSDP rules."""
    return TrainMesh(shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]), shd.RULES_FSDP,
                     shd.RULES_FSDP)


def place_models(models, tm: TrainMesh):
    """``Models`` with the student (trainable, frozen base) and the teacher on the mesh."""
    student = models.student
    trainable = tm.place(models.trainable, tm.trainable_shardings(student, models.trainable))
    frozen = (None if models.frozen is None else
              tm.place(models.frozen, tm.params_shardings(student.config, models.frozen)))
    t = models.teacher
    teacher = t.replace(params=tm.place(t.params, tm.params_shardings(t.config, t.params,
                                                                      teacher=True)))
    return dataclasses.replace(models, trainable=trainable, frozen=frozen, teacher=teacher)


@contextlib.contextmanager
def teacher_scope(rules: tuple | None):
    """Inside a traced step: switch activation constraints to the teacher's ``rules`` on the
    active mesh (no-op without an active mesh or rules)."""
    if rules is None or not shd._ACTIVE:
        yield
        return
    with shd.use_mesh_rules(shd._ACTIVE[-1][0], dict(rules)):
        yield


def replicate_embedding(params):
    """Inside a traced step on the active mesh: a parameter tree whose ``embed`` table is
    constrained to whole rows (``("vocab", None)``: gathered over ``fsdp`` like one layer's
    weights, still split by vocabulary under ``fsdp_tp``), so token lookups run locally on each
    device's rows. Left FSDP-sharded, XLA instead gathers the ``[B, T, D]`` embeddings of every
    row (and, in the backward pass, their gradients) onto every device. Trees without ``embed``
    (LoRA adapters, ``None``) and calls without an active mesh pass through."""
    if not shd._ACTIVE or not isinstance(params, dict) or "embed" not in params:
        return params
    return {**params, "embed": shd.constrain(params["embed"], ("vocab", None))}


def map_rows_per_device(fn, rows, shared):
    """``fn(rows, shared)`` on each device's own rows of ``rows`` (trees of ``[B, ...]`` arrays),
    ``shared`` (e.g. unembeddings) whole on every device.

    Inside a traced step on the active mesh (``use_mesh_rules``) this is a ``shard_map`` over the
    rules' batch axes (the other axes, e.g. ``tensor``, stay automatic), so a loss that scans over
    chunks of the flattened ``[B * N]`` tokens stays data-parallel: without it XLA gathers every
    chunk of every row onto every device and each device computes the whole batch's loss.
    Without an active mesh, with one batch shard, or when ``B`` does not split, ``fn`` runs as is.
    """
    if not shd._ACTIVE:
        return fn(rows, shared)
    mesh, rules = shd._ACTIVE[-1]
    target = rules.get("batch")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    b = jax.tree.leaves(rows)[0].shape[0]
    if n == 1 or b % n:
        return fn(rows, shared)
    spec = P(axes if len(axes) > 1 else axes[0])
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, P()), out_specs=spec,
                         axis_names=frozenset(axes), check_vma=False)(rows, shared)


# --- multi-process ----------------------------------------------------------------------------


def init_distributed(spec) -> bool:
    """``jax.distributed.initialize`` from a ``DistributedSpec`` (before any other JAX call);
    returns whether it initialised. A second call in the same process is a no-op."""
    if not spec.initialize:
        return False
    from jax._src import distributed as _dist

    if _dist.global_state.client is not None:
        return False
    shd.initialize_distributed(spec.coordinator_address, spec.num_processes, spec.process_id)
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Arrays that span other processes gathered to every host (numpy); others unchanged.
    Identity in a single process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

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
    from jax.experimental import multihost_utils

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


class MemoryLog:
    """The ``MetricsLog`` interface kept in memory: what non-primary processes log to."""

    def __init__(self):
        self.rows: list[dict] = []

    def read(self, stage: str | None = None) -> list[dict]:
        return [r for r in self.rows if stage is None or r.get("stage") == stage]

    def truncate(self, stage: str, step: int) -> None:
        self.rows = [r for r in self.rows
                     if not (r.get("stage") == stage and r.get("step", 0) > step)]

    def write(self, record: dict) -> None:
        from opd_jax.train.metrics_log import to_python

        self.rows.append(to_python(record))


def make_log(run_dir: str | Path, tensorboard: bool = False):
    """``MetricsLog`` on process 0, an in-memory log elsewhere (one writer per file)."""
    from opd_jax.train.metrics_log import MetricsLog

    return MetricsLog(run_dir, tensorboard) if is_primary() else MemoryLog()
