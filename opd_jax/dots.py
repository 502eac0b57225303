"""Matrix products in the one form XLA CPU runs fast in bfloat16.

XLA CPU runs a bfloat16 dot on its fast path (AMX where the CPU has it: ≈900-1,500 GFLOP/s on a
Sapphire Rapids VM) only as a row-major ``[M, K] @ [K, N]`` with a float32 result; every other
form (a transposed operand, a bfloat16 result, a batched einsum) is converted to float32 first
and runs at ≈210-250 GFLOP/s (BUILD_NOTES "Session 20"). :func:`dot` turns the ``NT`` and ``TN``
forms of the backward passes into that form with a row-major copy of the transposed operand, on
one CPU device only (flattening a sharded operand would gather it). Float32 operands, other
backends and meshes get the plain ``lax.dot_general``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["NN", "NT", "TN", "dot", "row_major_transpose"]

NN = (((1,), (0,)), ((), ()))   # [M, K] @ [K, N]
NT = (((1,), (1,)), ((), ()))   # [M, K] @ [N, K]^T
TN = (((0,), (0,)), ((), ()))   # [K, M]^T @ [K, N]


def dot(a: jax.Array, b: jax.Array, dims, out_dtype=None) -> jax.Array:
    """``dot_general(a, b, dims)`` (one of :data:`NN`, :data:`NT`, :data:`TN`) summed in float32
    and returned in ``out_dtype`` (default ``a``'s dtype)."""
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if (a.dtype == jnp.bfloat16 and dims != NN and jax.default_backend() == "cpu"
            and jax.device_count() == 1):
        if dims == NT:
            b = row_major_transpose(b)
        else:
            a = row_major_transpose(a)
        dims = NN
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


def row_major_transpose(x_MxN: jax.Array) -> jax.Array:
    """``x.T`` ``[N, M]`` as a row-major copy. A plain transpose feeding a dot is folded into the
    dot's dimensions (or given a column-major layout), which takes XLA CPU's bfloat16 dot off its
    fast path; flattened to one dimension behind an optimisation barrier, the copy is made
    (``[640, 1536] @ [576, 1536]^T``: 1.3 ms with the copy, 4.9 ms converted to float32)."""
    flat = lax.optimization_barrier(x_MxN.T.reshape(-1))
    return flat.reshape(x_MxN.shape[::-1])
