"""The engine behind :mod:`opd_jax.losses.chunk_map`: token chunks, LM-head gradients.

A chunked loss is ``y_t = fn(features(h_t W), extras_t)`` evaluated one chunk of ``C`` token
rows at a time under :func:`jax.lax.scan`.  Two *heads* turn a chunk's logits
``z = h W`` (``[C, V]``, float32) into the features ``fn`` sees:

* :data:`DENSE_HEAD`: the logits themselves (full-vocabulary divergences);
* :data:`SPARSE_HEAD`: log-probs at given ids only, ``log softmax(z / tau)[ids]`` (``[C, K]``)
  (teacher top-k divergences, token log-probs, log-probs at top-k ids).  Masking and
  ``1 / tau`` scale the hidden rows before the matmul, and the logit gradient is formed
  directly, :math:`\\partial x = \\mathrm{scatter}(g) - (\\textstyle\\sum_k g_k)\\,
  \\mathrm{softmax}(x)` with :math:`x = z/\\tau`, so a chunk holds about one ``[C, V]``
  buffer.

Two drivers differentiate w.r.t. the student hidden states ``h`` and unembedding ``W`` only
(extras, constants and closed-over values are constants):

* :func:`per_token` returns the ``[N, C, ...]`` outputs; its backward pass recomputes each
  chunk's logits (rematerialisation, 4 student matmuls per chunk);
* :func:`weighted_sum` returns ``(sum_t w_t y_t, y)`` and forms the gradient during the forward
  pass (3 student matmuls per chunk; the backward pass only scales it).

Per chunk, with ``G = dL/dz``: ``dL/dh = G W^T`` and ``dL/dW += h^T G``, both computed one
vocabulary block at a time, the latter written in place into the ``[D, V]`` float32
accumulator (a plain ``dW + h^T G`` would need a second ``[D, V]`` temporary).  Inputs that are
not differentiated (``perturbed`` False, e.g. a frozen unembedding under LoRA) skip their
matmul (symbolic zeros).  ``W`` is a ``[D, V]`` matrix or a tied model's ``[V, D]`` table
(:class:`~opd_jax.losses.unembedding.TiedUnembedding`), read and accumulated in its own layout.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from opd_jax.losses import unembedding as unemb

# --------------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------------


def logits(hidden_CxD: jax.Array, unembed_DxV: unemb.Unembedding) -> jax.Array:
    """One chunk's logits, accumulated in float32 whatever the input dtype (``unembed_DxV`` a
    ``[D, V]`` matrix or a :class:`~opd_jax.losses.unembedding.TiedUnembedding`)."""
    return unemb.logits(hidden_CxD, unembed_DxV)


# --------------------------------------------------------------------------------------------
# heads: logits -> features, and feature cotangents -> logit cotangents
# --------------------------------------------------------------------------------------------


class Head(NamedTuple):
    """How a chunk's logits become the features a loss sees, and back.

    * ``row_scale(head_extras, head_consts) -> [C] or None``: a per-row factor applied to the
      hidden states *before* the matmul (``z = (s * h) W``), so masking and temperature cost
      no ``[C, V]`` pass;
    * ``features(z, head_extras, head_consts) -> (features, saved)``;
    * ``dlogits(saved, dfeatures, head_extras, head_consts) -> dz [C, V]``, or, when
      ``blockwise`` is True, ``dlogits(..., start, size) -> dz[:, start:start + size]`` so the
      full ``[C, V]`` logit gradient never exists.
    """

    row_scale: Callable
    features: Callable
    dlogits: Callable
    blockwise: bool = False


def _no_scale(head_extras, head_consts):
    del head_extras, head_consts
    return None


def _dense_features(z_CxV, head_extras, head_consts):
    del head_extras, head_consts
    return z_CxV, None


def _dense_dlogits(saved, dz_CxV, head_extras, head_consts):
    del saved, head_extras, head_consts
    return dz_CxV


DENSE_HEAD = Head(_no_scale, _dense_features, _dense_dlogits)


def _sparse_scale(head_extras, inv_temp):
    """Rows are scaled by ``1 / tau`` (valid) or 0 (masked: uniform log-probs, zero gradient)."""
    _, valid_C = head_extras
    return jnp.where(valid_C, inv_temp, 0.0)


def _sparse_features(x_CxV, head_extras, inv_temp):
    """``log softmax(x)`` at ``ids`` (``x = z / tau``) without a ``[C, V]`` log-prob array."""
    del inv_temp
    ids_CxK, _ = head_extras
    lse_Cx1 = jax.nn.logsumexp(x_CxV, axis=-1, keepdims=True)
    logp_CxK = jnp.take_along_axis(x_CxV, ids_CxK, axis=-1) - lse_Cx1
    return logp_CxK, (x_CxV, lse_Cx1)


def _sparse_dlogits(saved, g_CxK, head_extras, inv_temp, start, size):
    """Block ``[start, start + size)`` of ``d/dx sum(g * logp_K) = scatter(g) - sum(g) softmax(x)``."""
    del inv_temp
    x_CxV, lse_Cx1 = saved
    ids_CxK, _ = head_extras
    x_CxB = lax.dynamic_slice_in_dim(x_CxV, start, size, axis=1)
    dense_CxB = -jnp.sum(g_CxK, axis=-1, keepdims=True) * jnp.exp(x_CxB - lse_Cx1)
    local_CxK = ids_CxK - start
    local_CxK = jnp.where((local_CxK >= 0) & (local_CxK < size), local_CxK, size)  # size: dropped
    rows_CxK = jnp.broadcast_to(jnp.arange(ids_CxK.shape[0])[:, None], ids_CxK.shape)
    return dense_CxB.at[rows_CxK, local_CxK].add(g_CxK, mode="drop")


SPARSE_HEAD = Head(_sparse_scale, _sparse_features, _sparse_dlogits, blockwise=True)


# --------------------------------------------------------------------------------------------
# gradient pieces
# --------------------------------------------------------------------------------------------


def _flag(perturbed: bool):
    """A static bool carried through custom-VJP residuals as pytree structure."""
    return () if perturbed else None


def _perturbed(primal) -> bool:
    """Whether a custom-VJP primal (an array or a ``TiedUnembedding`` of one) is differentiated."""
    return any(leaf.perturbed for leaf in jax.tree.leaves(primal))


def _is_zero(x) -> bool:
    return isinstance(x, SymbolicZero)


def _instantiate(ct):
    """Replace symbolic-zero cotangent leaves by zeros arrays."""
    return jax.tree.map(
        lambda c: jnp.zeros(c.aval.shape, c.aval.dtype) if _is_zero(c) else c,
        ct,
        is_leaf=_is_zero,
    )


def convert_closure(head: Head, fn: Callable, chunk_size: int, vocab: int, chunks, consts):
    """Hoist values ``fn`` closes over (e.g. a traced temperature) into explicit constants.

    ``jax.custom_vjp`` cannot close over values being differentiated; after conversion they
    are ordinary (non-differentiated) inputs.  Returns ``(fn(features, extras_C, consts),
    consts)`` with the new ``consts = (consts, hoisted)``.
    """
    head_consts, loss_consts = consts
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    z = jax.ShapeDtypeStruct((chunk_size, vocab), jnp.float32)
    ex = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), chunks)
    feats, _ = jax.eval_shape(head.features, z, ex[0], head_consts)
    converted, hoisted = jax.closure_convert(fn, feats, ex[1], jax.tree.map(spec, loss_consts))

    def fn_explicit(features, loss_extras_C, all_loss_consts):
        own, extra = all_loss_consts
        return converted(features, loss_extras_C, own, *extra)

    return fn_explicit, (head_consts, (loss_consts, tuple(hoisted)))


# --------------------------------------------------------------------------------------------
# driver 1: per-token outputs, rematerialising backward pass
# --------------------------------------------------------------------------------------------


def _apply(head, hidden_CxD, unembed_DxV, extras_C, consts):
    """The chunk through the head: ``(features, saved, scaled hidden, row scale)``."""
    scale_C = head.row_scale(extras_C[0], consts[0])
    if scale_C is not None:
        hidden_CxD = (hidden_CxD * scale_C[:, None]).astype(hidden_CxD.dtype)
    feats, saved = head.features(logits(hidden_CxD, unembed_DxV), extras_C[0], consts[0])
    return feats, saved, hidden_CxD, scale_C


def _head_grads(head, saved, dfeats, extras_C, consts, hidden_in_CxD, scale_C, unembed_DxV,
                dunembed_DxV, need_h, need_w, n_blocks, hidden_dtype):
    """Chunk gradients ``dL/dh = G W^T`` and ``dL/dW += h^T G``, one vocabulary block at a time.

    ``G`` (``dL/dz``) is produced per block by a blockwise head (never whole) or sliced from
    the full ``[C, V]`` array otherwise; ``dL/dW`` is updated in place block by block, so no
    second ``[D, V]`` buffer exists.  Returns ``(dL/dh [C, D] or None, dL/dW accumulator)``.
    """
    block = unembed_DxV.shape[1] // n_blocks
    tied, axis = unemb.is_tied(unembed_DxV), unemb.vocab_axis(unembed_DxV)
    if head.blockwise:
        def dlogits_block(start):
            return head.dlogits(saved, dfeats, extras_C[0], consts[0], start, block)
    else:
        dlogits_CxV = head.dlogits(saved, dfeats, extras_C[0], consts[0])

        def dlogits_block(start):
            return lax.dynamic_slice_in_dim(dlogits_CxV, start, block, axis=1)

    dt = unemb.product_dtype(hidden_in_CxD, unembed_DxV)   # float32, or bfloat16 when mixed
    h_CxD = hidden_in_CxD.astype(dt)

    def body(j, carry):
        dh_CxD, dw_DxV = carry
        start = j * block
        g_CxB = dlogits_block(start).astype(dt)
        if need_h:   # w: [D, B], or the tied table's [B, D] rows
            w = unemb.block(unembed_DxV, start, block)
            dh_CxD = dh_CxD + unemb.hidden_grad(g_CxB, w, tied)
        if need_w:   # in place: the accumulator has the weights' layout ([D, V] or [V, D])
            upd = unemb.weight_grad(h_CxD, g_CxB, tied)
            cur = lax.dynamic_slice_in_dim(dw_DxV, start, block, axis=axis)
            dw_DxV = lax.dynamic_update_slice_in_dim(dw_DxV, cur + upd, start, axis=axis)
        return dh_CxD, dw_DxV

    dh0 = jnp.zeros(h_CxD.shape, jnp.float32) if need_h else None
    dh_CxD, dunembed_DxV = lax.fori_loop(0, n_blocks, body, (dh0, dunembed_DxV))
    if need_h:
        if scale_C is not None:
            dh_CxD = dh_CxD * scale_C[:, None]
        dh_CxD = dh_CxD.astype(hidden_dtype)
    return dh_CxD, dunembed_DxV


def _unless_dead(live, compute: Callable, operands, default: Callable):
    """``compute(*operands)``, or ``default(*operands)`` without computing it when the traced
    bool ``live`` is False (a chunk with no row to compute); ``live`` None: always computed."""
    if live is None:
        return compute(*operands)
    return lax.cond(live, compute, default, *operands)


def _zeros_like_output(compute: Callable):
    """A ``default`` for :func:`_unless_dead`: zeros shaped as ``compute``'s outputs."""
    def default(*operands):
        shapes = jax.eval_shape(compute, *operands)
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return default


def _per_token_forward(head, fn, hidden_NxCxD, unembed_DxV, chunks, consts, live_N):
    def outputs(hidden_CxD, extras_C):
        feats = _apply(head, hidden_CxD, unembed_DxV, extras_C, consts)[0]
        return fn(feats, extras_C[1], consts[1])

    def step(carry, x):
        hidden_CxD, extras_C, live = x
        return carry, _unless_dead(live, outputs, (hidden_CxD, extras_C),
                                   _zeros_like_output(outputs))

    return lax.scan(step, None, (hidden_NxCxD, chunks, live_N))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def per_token(head, fn, n_blocks, hidden_NxCxD, unembed_DxV, chunks, consts, live_N=None):
    """``[N, C, ...]`` outputs ``fn(head.features(h W), extras)``; remat backward pass.

    ``chunks = (head_extras, loss_extras)`` (leaves ``[N, C, ...]``) and ``consts =
    (head_consts, loss_consts)``; gradients flow to ``hidden_NxCxD`` and ``unembed_DxV`` only.
    ``live_N`` (``[N]`` bool, or None: every chunk): a chunk marked False is not computed in
    either pass; its outputs are zeros and it adds no gradient.
    """
    del n_blocks
    return _per_token_forward(head, fn, hidden_NxCxD, unembed_DxV, chunks, consts, live_N)


def _per_token_fwd(head, fn, n_blocks, hidden, unembed, chunks, consts, live_N):
    del n_blocks
    values = custom_vjp_primal_tree_values((hidden, unembed, chunks, consts, live_N))
    out = _per_token_forward(head, fn, *values)
    return out, (values, _flag(_perturbed(hidden)), _flag(_perturbed(unembed)))


def _per_token_bwd(head, fn, n_blocks, residuals, ct):
    (hidden_NxCxD, unembed_DxV, chunks, consts, live_N), need_h, need_w = residuals
    if all(_is_zero(c) for c in jax.tree.leaves(ct, is_leaf=_is_zero)):
        return None, None, None, None, None
    ct = _instantiate(ct)
    need_h, need_w = need_h is not None, need_w is not None

    def grads(dunembed_DxV, hidden_CxD, extras_C, ct_C):
        feats, saved, hidden_in_CxD, scale_C = _apply(
            head, hidden_CxD, unembed_DxV, extras_C, consts
        )
        _, vjp = jax.vjp(lambda f: fn(f, extras_C[1], consts[1]), feats)
        (dfeats,) = vjp(ct_C)
        dhidden_CxD, dunembed_DxV = _head_grads(
            head, saved, dfeats, extras_C, consts, hidden_in_CxD, scale_C, unembed_DxV,
            dunembed_DxV, need_h, need_w, n_blocks, hidden_CxD.dtype,
        )
        return dunembed_DxV, dhidden_CxD

    def skipped(dunembed_DxV, hidden_CxD, extras_C, ct_C):
        del extras_C, ct_C
        return dunembed_DxV, jnp.zeros(hidden_CxD.shape, hidden_CxD.dtype) if need_h else None

    def step(dunembed_DxV, x):
        hidden_CxD, extras_C, ct_C, live = x
        return _unless_dead(live, grads, (dunembed_DxV, hidden_CxD, extras_C, ct_C), skipped)

    init = unemb.grad_accumulator(unembed_DxV) if need_w else None
    dunembed, dhidden = lax.scan(step, init, (hidden_NxCxD, chunks, ct, live_N))
    return (dhidden, (unemb.as_cotangent(unembed_DxV, dunembed) if need_w else None), None, None,
            None)


per_token.defvjp(_per_token_fwd, _per_token_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# driver 2: weighted sum with the gradient formed in the forward pass
# --------------------------------------------------------------------------------------------


def _weighted_forward(head, fn, hidden_NxCxD, unembed_DxV, chunks, consts):
    def step(total, x):
        hidden_CxD, (extras_C, weights_C) = x
        feats = _apply(head, hidden_CxD, unembed_DxV, extras_C, consts)[0]
        per_C = fn(feats, extras_C[1], consts[1])
        return total + jnp.sum(weights_C * per_C), per_C

    return lax.scan(step, jnp.zeros((), jnp.float32), (hidden_NxCxD, chunks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def weighted_sum(head, fn, n_blocks, hidden_NxCxD, unembed_DxV, chunks, consts):
    """``(sum_t w_t y_t, y [N, C])`` with ``chunks = ((head_extras, loss_extras), weights)``.

    ``fn`` must return one value per token (``[C]``).  The gradient w.r.t. ``hidden_NxCxD``
    and ``unembed_DxV`` is formed during the forward pass; ``y`` must be consumed under
    ``stop_gradient`` (its cotangent is ignored).
    """
    del n_blocks
    return _weighted_forward(head, fn, hidden_NxCxD, unembed_DxV, chunks, consts)


def _weighted_fwd(head, fn, n_blocks, hidden, unembed, chunks, consts):
    need_h, need_w = _perturbed(hidden), _perturbed(unembed)
    hidden_NxCxD, unembed_DxV, chunks, consts = custom_vjp_primal_tree_values(
        (hidden, unembed, chunks, consts)
    )

    def step(carry, x):
        total, dunembed_DxV = carry
        hidden_CxD, (extras_C, weights_C) = x
        feats, saved, hidden_in_CxD, scale_C = _apply(
            head, hidden_CxD, unembed_DxV, extras_C, consts
        )

        def weighted(f):
            per_C = fn(f, extras_C[1], consts[1])
            return jnp.sum(weights_C * per_C), per_C

        (chunk_total, per_C), dfeats = jax.value_and_grad(weighted, has_aux=True)(feats)
        dhidden_CxD, dunembed_DxV = _head_grads(
            head, saved, dfeats, extras_C, consts, hidden_in_CxD, scale_C, unembed_DxV,
            dunembed_DxV, need_h, need_w, n_blocks, hidden_CxD.dtype,
        )
        return (total + chunk_total, dunembed_DxV), (per_C, dhidden_CxD)

    init = (jnp.zeros((), jnp.float32), unemb.grad_accumulator(unembed_DxV) if need_w else None)
    (total, dunembed), (per_NxC, dhidden) = lax.scan(step, init, (hidden_NxCxD, chunks))
    dunembed = unemb.as_cotangent(unembed_DxV, dunembed) if need_w else None
    return (total, per_NxC), (dhidden, dunembed)


def _weighted_bwd(head, fn, n_blocks, residuals, cotangents):
    del head, fn, n_blocks
    dhidden, dunembed = residuals
    g = cotangents[0]
    if _is_zero(g):
        return None, None, None, None
    return (
        None if dhidden is None else (g * dhidden).astype(dhidden.dtype),
        None if dunembed is None else jax.tree.map(lambda d: (g * d).astype(d.dtype), dunembed),
        None,
        None,
    )


weighted_sum.defvjp(_weighted_fwd, _weighted_bwd, symbolic_zeros=True)
