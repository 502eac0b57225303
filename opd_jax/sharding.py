"""Mesh construction and the logical-axis rules tables.

Model code names *logical* axes only (``batch``, ``length``, ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``, ``layers``); one rules table maps each logical axis to mesh
axes (MaxText / Levanter style). The mesh has three named axes::

    data    pure data parallelism (params replicated)
    fsdp    data parallelism with params, grads and optimizer state sharded (ZeRO-3)
    tensor  tensor (model) parallelism over heads / mlp / vocab

A single device is the mesh ``(1, 1, 1)``: the same code path runs on 1 CPU, 8 GPUs or a pod.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Pure FSDP: params sharded along their model width; batch over every data-like axis.
RULES_FSDP: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": None,
    "mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "layers": None,
    "lora_rank": None,
}

# FSDP + tensor parallelism (Megatron-style column/row split over heads, mlp and vocab).
RULES_FSDP_TP: dict[str, Any] = {
    **RULES_FSDP,
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
}

# Whole weights on every device (pure data parallelism over data x fsdp): e.g. a small teacher
# next to an FSDP student, which then needs no per-layer gathers in its forward pass.
RULES_REPLICATED: dict[str, Any] = {name: None for name in RULES_FSDP} | {"batch": ("data", "fsdp")}

RULES = {"fsdp": RULES_FSDP, "fsdp_tp": RULES_FSDP_TP, "replicated": RULES_REPLICATED}


def get_rules(name_or_rules: str | Mapping[str, Any]) -> dict[str, Any]:
    """Return a rules table by name (``"fsdp"``, ``"fsdp_tp"``, ``"replicated"``) or pass a
    mapping through."""
    if isinstance(name_or_rules, Mapping):
        return dict(name_or_rules)
    if name_or_rules not in RULES:
        raise ValueError(f"unknown sharding rules {name_or_rules!r}; expected one of {sorted(RULES)}")
    return RULES[name_or_rules]


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """Build a ``Mesh`` with axes ``("data", "fsdp", "tensor")``.

    Args:
      shape: ``{"data": d, "fsdp": f, "tensor": t}`` (missing axes are 1; one axis may be -1 to
        absorb the remaining devices) or a 3-sequence. ``None``: all devices on ``fsdp``.
      devices: devices to use (default ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        sizes = [1, n, 1]
    elif isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != 3:
            raise ValueError(f"mesh shape needs 3 sizes for {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = n // rest
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {n} are "
            "available; change the mesh shape (one axis may be -1 to take the rest)"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Mapping[str, Any],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> P:
    """Map logical axis names to a ``PartitionSpec``.

    A mesh axis is used at most once per spec (later dims fall back to replication), and when
    ``shape`` and ``mesh`` are given a dim whose size is not divisible by its mesh axes is replicated
    (e.g. 3 kv heads on a tensor axis of 2).
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = None if name is None else rules.get(name)
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the rules table {sorted(rules)}")
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and mesh_axes:
            if shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return P(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Mapping[str, Any],
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """``NamedSharding`` for one array with logical ``axes`` (see ``logical_to_spec``)."""
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree: Any, rules: Mapping[str, Any], shapes_tree: Any = None):
    """Map a tree of logical-axes tuples (and optionally a matching tree of shapes) to shardings."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    if shapes_tree is None:
        return jax.tree.map(lambda a: named_sharding(mesh, a, rules), axes_tree, is_leaf=is_axes)
    return jax.tree.map(lambda a, s: named_sharding(mesh, a, rules, s), axes_tree, shapes_tree,
                        is_leaf=is_axes)


# --- activation constraints -------------------------------------------------------------------
_ACTIVE: list[tuple[Mesh, Mapping[str, Any]]] = []


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: str | Mapping[str, Any]):
    """Within this context ``constrain`` pins activations to the mesh with these rules."""
    _ACTIVE.append((mesh, get_rules(rules)))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_mesh_rules() -> tuple[Mesh, dict[str, Any]] | None:
    """The innermost ``use_mesh_rules`` context's ``(mesh, rules)``, or ``None`` outside one."""
    return _ACTIVE[-1] if _ACTIVE else None


def batch_axes(mesh: Mesh, rules: Mapping[str, Any]) -> tuple[str, ...]:
    """The mesh axes the logical ``batch`` axis is split over under ``rules`` (may be empty).

    >>> import numpy as np
    >>> batch_axes(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp")), get_rules("fsdp"))
    ('data', 'fsdp')
    """
    target = rules.get("batch")
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    return tuple(a for a in axes if a in mesh.shape)


def batch_shards(mesh: Mesh | None, rules: Mapping[str, Any]) -> int:
    """How many ways the batch axis is split (1 without a mesh)."""
    if mesh is None:
        return 1
    n = 1
    for a in batch_axes(mesh, rules):
        n *= mesh.shape[a]
    return n


def rules_key(rules: Mapping[str, Any]) -> tuple:
    """A hashable form of a rules table (for static dataclass fields and jit static arguments)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; a no-op outside ``use_mesh_rules``."""
    if not _ACTIVE:
        return x
    mesh, rules = _ACTIVE[-1]
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, rules, x.shape))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host start-up: ``jax.distributed.initialize`` from arguments or the environment.

    With no arguments, JAX auto-detects TPU pods, SLURM and Open MPI; for a localhost multi-process
    run give all three (or set ``OPD_JAX_COORDINATOR``, ``OPD_JAX_NUM_PROCESSES``,
    ``OPD_JAX_PROCESS_ID``). Safe to call once per process before any other JAX call.
    """
    coordinator_address = coordinator_address or os.environ.get("OPD_JAX_COORDINATOR")
    if num_processes is None and "OPD_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["OPD_JAX_NUM_PROCESSES"])
    if process_id is None and "OPD_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["OPD_JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
