"""The decoder's projections and SwiGLU MLP with lean saved residuals (custom VJPs).

Autodiff of ``x.reshape(-1, K) @ w.reshape(K, N)`` saves the *reshaped* ``x`` and ``w`` for the
backward pass; inside the decoder's layer ``lax.scan`` every saved value is stacked over the
layers, so the reshapes become copies: a second copy of the q/k/v/o weights and of their inputs.
Autodiff of ``(silu(g) * u) @ w_down`` saves ``silu(g)``, its pieces and the product beside ``g``
and ``u``: six ``[B, T, F]`` tensors a layer where two carry the information. On ``make demo``'s
student (27 layers, 8 x 96 tokens, F = 1536) those are ~0.6 GB of the train step's 2.5 GB of
temporaries (``BUILD_NOTES.md`` "make demo's memory").

:func:`project` saves the operands as given (``x [B, T, *in]``, ``w [*in, *out]``: the scan's own
inputs, which it forwards without a copy) and redoes the free reshapes in the backward pass.
:func:`swiglu_down` saves ``g`` and ``u`` only and recomputes ``silu(g) * u`` (elementwise) for
the weight gradient. Same dots, same FLOPs as before (bfloat16 on the CPU: see :func:`_dot`):

.. math:: y = x W,\\quad \\partial x = \\partial y\\, W^\\top,\\quad \\partial W = x^\\top \\partial y

.. math:: h = \\mathrm{silu}(g) \\odot u,\\ \\ \\partial u = \\mathrm{silu}(g) \\odot \\partial h,
   \\ \\ \\partial g = u \\odot \\partial h \\odot \\sigma(g)\\,(1 + g\\,(1 - \\sigma(g)))
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from opd_jax.sharding import constrain

__all__ = ["project", "swiglu_down", "gated_mlp_input"]

_NN = (((1,), (0,)), ((), ()))   # [M, K] @ [K, N]
_NT = (((1,), (1,)), ((), ()))   # [M, N] @ [K, N]^T
_TN = (((0,), (0,)), ((), ()))   # [M, K]^T @ [M, N]


def _dot(a, b, dims, out_dtype=None):
    """``dot_general(a, b, dims)`` summed and returned in float32, then cast to ``out_dtype``
    (default ``a``'s dtype).

    The same single dot for float32 operands. For bfloat16 ones XLA CPU runs only a row-major
    ``[M, K] @ [K, N]`` dot with a float32 result on its fast bfloat16 path (AMX where the CPU
    has it: ≈900-1,400 GFLOP/s on a Sapphire Rapids VM, against ≈210-250 for every other form,
    which it converts to float32 first; BUILD_NOTES "Session 20"), so on the CPU the backward's
    transposed operands are made row-major copies first (:func:`_row_major_transpose`; on one
    device only: flattening a sharded operand would gather it)."""
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if (a.dtype == jnp.bfloat16 and dims != _NN and jax.default_backend() == "cpu"
            and jax.device_count() == 1):
        if dims == _NT:
            b = _row_major_transpose(b)
        else:   # _TN
            a = _row_major_transpose(a)
        dims = _NN
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


def _saved(x: jax.Array) -> jax.Array:
    """A residual as the layer scan stacks it: 2-byte floats as ``uint16`` bits. XLA CPU has no
    bfloat16 dynamic-update-slice: it converts the whole ``[L, ...]`` stack to float32 and back
    for every layer's write (O(L^2) traffic: ≈0.45 s of the demo's 2.4 s mixed-precision step,
    BUILD_NOTES "Session 21"); integer bits are written in place. Free on every backend."""
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _restored(x: jax.Array, dtype) -> jax.Array:
    """Inverse of :func:`_saved`."""
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _row_major_transpose(x_MxN: jax.Array) -> jax.Array:
    """``x.T`` ``[N, M]`` as a row-major copy. A plain transpose feeding a dot is folded into the
    dot's dimensions (or given a column-major layout), which takes XLA CPU's bfloat16 dot off its
    fast path; flattened to one dimension behind an optimisation barrier, the copy is made
    (``[640, 1536] @ [576, 1536]^T``: 1.3 ms with the copy, 4.9 ms converted to float32)."""
    flat = lax.optimization_barrier(lax.optimization_barrier(x_MxN).T.reshape(-1))
    return flat.reshape(x_MxN.shape[::-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x_BxTxI: jax.Array, w_IxO: jax.Array, n_in: int) -> jax.Array:
    """``x`` ``[B, T, *in]`` times ``w`` ``[*in, *out]`` (``n_in`` = len(in)) -> ``[B, T, *out]``,
    as one 2-D ``[B*T, K] @ [K, N]`` dot (XLA CPU runs it faster than the 3-/4-D einsum), in
    ``x``'s dtype: a float32 ``w`` under bfloat16 activations (mixed precision's master weights)
    is cast here, inside the VJP, so the saved operand is the layer scan's own weight slice and
    ``dw`` comes back in float32 (no bfloat16 gradient stacked over the layers)."""
    k = math.prod(w_IxO.shape[:n_in])
    y = _dot(x_BxTxI.reshape(-1, k), w_IxO.reshape(k, -1).astype(x_BxTxI.dtype), _NN)
    return y.reshape(*x_BxTxI.shape[:2], *w_IxO.shape[n_in:])


def _project_fwd(x, w, n_in):
    return project(x, w, n_in), (_saved(x), w)


def _project_bwd(n_in, res, dy):
    x, w = res
    x = _restored(x, dy.dtype)      # y (so dy) has x's dtype
    k = math.prod(w.shape[:n_in])
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype)
    dy2 = dy.reshape(x2.shape[0], -1).astype(x.dtype)
    dx = _dot(dy2, w2, _NT).reshape(x.shape)
    return dx, _dot(x2, dy2, _TN, out_dtype=w.dtype).reshape(w.shape)


project.defvjp(_project_fwd, _project_bwd)


def gated_mlp_input(g_BxTxF: jax.Array, u_BxTxF: jax.Array) -> jax.Array:
    """``silu(g) * u``, the down projection's input (the LoRA path calls it: its adapter needs
    the product itself)."""
    return constrain(jax.nn.silu(g_BxTxF) * u_BxTxF, ("batch", "length", "mlp"))


@jax.custom_vjp
def swiglu_down(g_BxTxF: jax.Array, u_BxTxF: jax.Array, w_FxD: jax.Array) -> jax.Array:
    """``(silu(g) * u) @ w_down``: ``[B, T, F]``, ``[B, T, F]``, ``[F, D]`` -> ``[B, T, D]``."""
    return project(gated_mlp_input(g_BxTxF, u_BxTxF), w_FxD, 1)


def _swiglu_fwd(g, u, w):
    return swiglu_down(g, u, w), (_saved(g), _saved(u), w)


def _swiglu_bwd(res, dy):
    g, u, w = _restored(res[0], dy.dtype), _restored(res[1], dy.dtype), res[2]
    h = gated_mlp_input(g, u)                           # recomputed: elementwise
    dh, dw = _project_bwd(1, (h, w), dy)                # the down projection's own backward
    sig = jax.nn.sigmoid(g)
    du = dh * (g * sig)
    dg = dh * u * (sig * (1 + g * (1 - sig)))
    return dg.astype(g.dtype), du.astype(u.dtype), dw


swiglu_down.defvjp(_swiglu_fwd, _swiglu_bwd)
