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
the weight gradient. Same dots, same FLOPs as before (bfloat16 on the CPU: see :func:`opd_jax.dots.dot`):

.. math:: y = x W,\\quad \\partial x = \\partial y\\, W^\\top,\\quad \\partial W = x^\\top \\partial y

.. math:: h = \\mathrm{silu}(g) \\odot u,\\ \\ \\partial u = \\mathrm{silu}(g) \\odot \\partial h,
   \\ \\ \\partial g = u \\odot \\partial h \\odot \\sigma(g)\\,(1 + g\\,(1 - \\sigma(g)))
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from opd_jax import dots
from opd_jax.model import bits
from opd_jax.sharding import constrain

__all__ = ["project", "swiglu_down", "gated_mlp_input", "OutMajor", "out_major", "project_out_major"]

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x_BxTxI: jax.Array, w_IxO: jax.Array, n_in: int) -> jax.Array:
    """``x`` ``[B, T, *in]`` times ``w`` ``[*in, *out]`` (``n_in`` = len(in)) -> ``[B, T, *out]``,
    as one 2-D ``[B*T, K] @ [K, N]`` dot (XLA CPU runs it faster than the 3-/4-D einsum), in
    ``x``'s dtype: a float32 ``w`` under bfloat16 activations (mixed precision's master weights)
    is cast here, inside the VJP, so the saved operand is the layer scan's own weight slice and
    ``dw`` comes back in float32 (no bfloat16 gradient stacked over the layers)."""
    k = math.prod(w_IxO.shape[:n_in])
    y = dots.dot(x_BxTxI.reshape(-1, k), w_IxO.reshape(k, -1).astype(x_BxTxI.dtype), dots.NN)
    return y.reshape(*x_BxTxI.shape[:2], *w_IxO.shape[n_in:])


def _project_fwd(x, w, n_in):
    # 2-byte floats saved as uint16 bits: the layer scan stacks them in place (``bits``)
    return project(x, w, n_in), (bits.to_bits(x), w)


def _project_bwd(n_in, res, dy):
    x, w = res
    x = bits.from_bits(x, dy.dtype)      # y (so dy) has x's dtype
    k = math.prod(w.shape[:n_in])
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype)
    dy2 = dy.reshape(x2.shape[0], -1).astype(x.dtype)
    dx = dots.dot(dy2, w2, dots.NT).reshape(x.shape)
    return dx, dots.dot(x2, dy2, dots.TN, out_dtype=w.dtype).reshape(w.shape)


project.defvjp(_project_fwd, _project_bwd)


@flax.struct.dataclass
class OutMajor:
    """A projection weight ``[*in, *out]`` kept out-major: the row-major ``[N, K]`` copy
    (``K = prod(in)``, ``N = prod(out)``; torch ``Linear``'s layout), for the sampler's decode.

    XLA CPU runs a small-M product ``[M, K] x [N, K]^T`` faster than ``[M, K] x [K, N]``: each
    output reads one contiguous weight row. A 27-layer bfloat16 stack of the student's
    projections, one process per form, min of 15 calls: 26.0 -> 16.0 ms at M = 8, 30.4 -> 23.0
    ms at M = 32 (float32: 59.1 -> 47.0 ms at M = 32). Training keeps ``[*in, *out]``: at M in
    the hundreds the row-major ``NN`` form is XLA CPU's fast bfloat16 path (:mod:`opd_jax.dots`).
    """

    w_NxK: jax.Array
    out_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)


def out_major(w_IxO: jax.Array, n_in: int) -> OutMajor:
    """``w`` ``[*in, *out]`` (``n_in`` = len(in)) as an :class:`OutMajor` row-major copy."""
    k = math.prod(w_IxO.shape[:n_in])
    return OutMajor(dots.row_major_transpose(w_IxO.reshape(k, -1)), tuple(w_IxO.shape[n_in:]))


def project_out_major(x_BxTxI: jax.Array, w: OutMajor) -> jax.Array:
    """:func:`project` with an :class:`OutMajor` weight: ``[B, T, *in]`` -> ``[B, T, *out]`` in
    ``x``'s dtype, summed in float32 (same math; the sums run in another order)."""
    w_NxK = w.w_NxK.astype(x_BxTxI.dtype)
    y = jax.lax.dot_general(x_BxTxI.reshape(-1, w_NxK.shape[1]), w_NxK, dots.NT,
                            preferred_element_type=jnp.float32).astype(x_BxTxI.dtype)
    return y.reshape(*x_BxTxI.shape[:2], *w.out_shape)


def _widened(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """``xs`` in their common dtype widened to at least float32 (float64 stays float64; the
    losses' ``losses.checks.compute_dtype`` is the same rule, in a package the model does not
    import)."""
    wide = jnp.promote_types(jnp.result_type(*xs), jnp.float32)
    return tuple(x.astype(wide) for x in xs)


def gated_mlp_input(g_BxTxF: jax.Array, u_BxTxF: jax.Array) -> jax.Array:
    """``silu(g) * u``, the down projection's input (the LoRA path calls it: its adapter needs
    the product itself). Computed in float32 and rounded once to the inputs' dtype: XLA CPU
    runs a bfloat16 chain with a rounding after every op (15 converts in the fusion), 2.2x
    slower than the float32 chain (``BUILD_NOTES.md`` "Session 26")."""
    g, u = _widened(g_BxTxF, u_BxTxF)
    h = jax.nn.silu(g) * u
    return constrain(h.astype(jnp.result_type(g_BxTxF, u_BxTxF)), ("batch", "length", "mlp"))


@jax.custom_vjp
def swiglu_down(g_BxTxF: jax.Array, u_BxTxF: jax.Array, w_FxD: jax.Array) -> jax.Array:
    """``(silu(g) * u) @ w_down``: ``[B, T, F]``, ``[B, T, F]``, ``[F, D]`` -> ``[B, T, D]``."""
    return project(gated_mlp_input(g_BxTxF, u_BxTxF), w_FxD, 1)


def _swiglu_fwd(g, u, w):
    return swiglu_down(g, u, w), (bits.to_bits(g), bits.to_bits(u), w)


def _swiglu_bwd(res, dy):
    g, u, w = bits.from_bits(res[0], dy.dtype), bits.from_bits(res[1], dy.dtype), res[2]
    h = gated_mlp_input(g, u)                           # recomputed: elementwise
    dh, dw = _project_bwd(1, (h, w), dy)                # the down projection's own backward
    g32, u32, dh32 = _widened(g, u, dh)                # one rounding, as above
    sig = jax.nn.sigmoid(g32)
    du = dh32 * (g32 * sig)
    dg = dh32 * u32 * (sig * (1 + g32 * (1 - sig)))
    return dg.astype(g.dtype), du.astype(u.dtype), dw


swiglu_down.defvjp(_swiglu_fwd, _swiglu_bwd)
