"""Placement on a device mesh: the train state, the models and the batch, by rules tables.

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

Inside a traced step on the active mesh (``TrainMesh.scope``), :func:`teacher_scope`,
:func:`replicate_embedding` and :func:`map_rows_per_device` adjust activation placement.
Host arrays become global arrays with :meth:`TrainMesh.place` (multi-process: see
``opd_jax.train.distributed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax import sharding as shd
from opd_jax.model.config import param_axes
from opd_jax.model.decoder import Lora
from opd_jax.model.lora import lora_axes
from opd_jax.teacher.scores import TeacherScores
from opd_jax.train.batch import PackedRows, RolloutBatch

__all__ = ["TrainMesh", "build_mesh", "single_device_mesh", "place_models", "teacher_scope",
           "map_rows_per_device", "replicate_embedding"]


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
        return shd.batch_shards(self.mesh, self.rules)

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

    def batch_shardings(self, packed: bool = False, outcome: bool = False, scores: bool = False,
                        routes: bool = False):
        """A ``RolloutBatch`` of row shardings (every field ``[B, ...]`` 2-D, ``outcome``: with
        ``outcome_advantage``; ``scores``: with ``teacher_scores`` (``[B, N, K]`` 3-D); with
        ``packed``, the ``PackedRows`` fields ``[G, ...]`` 3-D, split by group)."""
        s = self.rows(2)
        rows = RolloutBatch(**{f.name: s for f in dataclasses.fields(RolloutBatch)
                               if f.default is dataclasses.MISSING})
        if outcome:
            rows = rows.replace(outcome_advantage=s)
        if scores:
            s3 = self.rows(3)
            rows = rows.replace(teacher_scores=TeacherScores(s3, s3, s, s3, s3))
        if routes:   # several teachers: which one scored each row, [B]
            rows = rows.replace(teacher_route=self.rows(1))
        if not packed:
            return rows
        p = self.rows(3)
        return rows.replace(student_packed=PackedRows(p, p, p, p, p),
                            teacher_packed=PackedRows(p, p, p, p, p))

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

    def train_shardings(self, student, trainable, frozen, teacher, teacher_args, init_fn, *,
                        packed: bool = False, outcome: bool = False, scores: bool = False,
                        routes: bool = False):
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
        return abstract, {"state": state_sh, "batch": self.batch_shardings(packed, outcome, scores,
                                                                     routes),
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
    t = models.teacher   # None: a served or cached teacher (no weights here)
    teacher = t if t is None else t.replace(params=tm.place(
        t.params, tm.params_shardings(t.config, t.params, teacher=True)))
    return dataclasses.replace(models, trainable=trainable, frozen=frozen, teacher=teacher)


@contextlib.contextmanager
def teacher_scope(rules: tuple | None):
    """Inside a traced step: switch activation constraints to the teacher's ``rules`` on the
    active mesh (no-op without an active mesh or rules)."""
    active = shd.active_mesh_rules()
    if rules is None or active is None:
        yield
        return
    with shd.use_mesh_rules(active[0], dict(rules)):
        yield


def replicate_embedding(params):
    """Inside a traced step on the active mesh: a parameter tree whose ``embed`` table is
    constrained to whole rows (``("vocab", None)``: gathered over ``fsdp`` like one layer's
    weights, still split by vocabulary under ``fsdp_tp``), so token lookups run locally on each
    device's rows. Left FSDP-sharded, XLA instead gathers the ``[B, T, D]`` embeddings of every
    row (and, in the backward pass, their gradients) onto every device. Trees without ``embed``
    (LoRA adapters, ``None``) and calls without an active mesh pass through."""
    if shd.active_mesh_rules() is None or not isinstance(params, dict) or "embed" not in params:
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
    active = shd.active_mesh_rules()
    if active is None:
        return fn(rows, shared)
    mesh, rules = active
    axes = tuple(a for a in shd.batch_axes(mesh, rules) if mesh.shape[a] > 1)
    n = shd.batch_shards(mesh, rules)
    b = jax.tree.leaves(rows)[0].shape[0]
    if n == 1 or b % n:
        return fn(rows, shared)
    spec = P(axes if len(axes) > 1 else axes[0])
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, P()), out_specs=spec,
                         axis_names=frozenset(axes), check_vma=False)(rows, shared)
