"""The platform's attention: the decoder's full-sequence attention through
:func:`jax.nn.dot_product_attention` (cuDNN's fused flash attention on NVIDIA GPUs, XLA elsewhere)
or TPU's Pallas splash kernel (:mod:`opd_jax.model.splash_attention`).

Modes (``ModelConfig.attention``; the decoder's ``"dense"`` and ``"blocked"`` stay as they are):

====================  ==========================================================================
``"platform"``        cuDNN when every condition below holds (GPU with CUDA, bfloat16 / float16
                      inputs, head dim a multiple of 8 and <= 128, or <= 256 from Hopper on,
                      even ``T`` when a mask is needed), else XLA; on a GPU the fallback warns
                      once with its reason. On a TPU: the splash kernel for rows of 128 tokens
                      or more, else XLA. The CPU runs XLA.
``"platform_xla"``    always ``implementation="xla"`` (the same math as ``"dense"``).
``"platform_cudnn"``  always ``implementation="cudnn"``; a ``ValueError`` with the reason at trace
                      time where cuDNN cannot run (never a silent fallback).
``"platform_splash"`` always the splash kernel (any ``T``: padded to 128-blocks); off TPU in
                      Pallas's interpret mode (slow: a check, not a speed path).
====================  ==========================================================================

JAX's own ``implementation=None`` runs XLA everywhere today (jax 0.10: "defaults to XLA for now"),
hence the explicit choice by :func:`choose_implementation`.

The masks, for a call without a KV cache (``T == S``, the train step and the teacher's forward):
query ``t`` attends slot ``s`` when ``s <= t`` (``is_causal=True``: cuDNN skips the upper
triangle), ``kv_valid[b, s]`` (left padding) and ``segments[b, t] == segments[b, s]`` (packed
rows). ``query_seq_lengths`` / ``key_value_seq_lengths`` express right padding only, and
``jax.nn.dot_product_attention`` does not expose cuDNN's packed (``q_offsets``) layout, so left
padding and segments go in as an explicit boolean ``mask``: ``[B, 1, 1, S]`` on XLA (broadcast
against the causal mask), ``[B, 1, T, S]`` on cuDNN, which turns it into an additive bias in HBM
(``B T S`` elements read forward, a bias gradient of the same size written backward: cuDNN's
backward pass with a bias needs even ``T``). A call with ``valid_BxT=None`` and no segments passes
no mask at all (pure causal: the fastest cuDNN path); the train step always passes ``valid``.
Grouped-query attention (``G < H`` key/value heads, query head ``h`` reading kv head
``h // (H / G)``) is native on both paths.

A query with nothing to attend to (a left-padding slot, a packed row's padding tail) gets the mean
of all values on XLA, exactly like ``"dense"``; cuDNN may differ there. Those positions are
padding and masked downstream. A cached call (the sampler's prefill and decode) never comes here:
the decoder runs it dense, so sampling does not change with this mode.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.model.splash_attention import attention_splash, splash_blockers

__all__ = ["PLATFORM_MODES", "PlatformMask", "platform_mask", "cudnn_blockers",
           "choose_implementation", "attention_platform"]

#: ``ModelConfig.attention`` value -> requested implementation (``None``: choose per platform)
PLATFORM_MODES = {"platform": None, "platform_xla": "xla", "platform_cudnn": "cudnn",
                  "platform_splash": "splash"}

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class PlatformMask(NamedTuple):
    """The decoder's mask in factored form for :func:`attention_platform` (no cache, ``T == S``):
    causal, and ``kv_valid[b, s]`` (``None``: every slot real) and equal segment ids (``None``:
    unpacked rows). ``implementation``: ``None`` (choose per platform), ``"xla"`` or ``"cudnn"``."""

    kv_valid: jax.Array | None    # [B, S] bool
    segments: jax.Array | None    # [B, T] int32
    implementation: str | None = None


def platform_mask(mode: str, kv_valid_BxS: jax.Array | None,
                  segments_BxT: jax.Array | None) -> PlatformMask:
    """A :class:`PlatformMask` for a ``ModelConfig.attention`` mode of :data:`PLATFORM_MODES`."""
    if mode not in PLATFORM_MODES:
        raise ValueError(f"unknown platform attention {mode!r}; expected one of "
                         f"{sorted(PLATFORM_MODES)}")
    kv_valid = None if kv_valid_BxS is None else kv_valid_BxS.astype(bool)
    segments = None if segments_BxT is None else segments_BxT.astype(jnp.int32)
    return PlatformMask(kv_valid, segments, PLATFORM_MODES[mode])


def cudnn_blockers(*, dtype, length: int, head_dim: int, masked: bool, platform: str,
                   compute_capability: str | None) -> list[str]:
    """Why cuDNN's flash attention cannot run this call (empty: it can). Pure: every input given.

    ``platform``: the device platform (``"gpu"``, ``"cpu"``, ``"tpu"``); ``compute_capability``:
    a CUDA device's ``"9.0"``-style string, ``None`` when not CUDA. The conditions mirror the
    checks jax's cuDNN wrapper makes at trace time (dtype, head dim, even length with a bias).
    """
    reasons = []
    if platform != "gpu" or compute_capability is None:
        return [f"cuDNN runs on CUDA GPUs only (platform {platform!r})"]
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        reasons.append(f"cuDNN needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}")
    major = int(str(compute_capability).split(".")[0])
    e_max = 256 if major >= 9 else 128
    if head_dim % 8 or head_dim > e_max:
        reasons.append(f"cuDNN needs a head dim that is a multiple of 8 and <= {e_max} on "
                       f"compute capability {compute_capability}, got {head_dim}")
    if masked and length % 2:
        reasons.append(f"cuDNN's backward pass with a mask (bias) needs an even length, got "
                       f"T = {length}")
    return reasons


def _device_facts() -> tuple[str, str | None]:
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return device.platform, (str(capability) if capability is not None else None)


def choose_implementation(requested: str | None, *, dtype, length: int, head_dim: int,
                          masked: bool, platform: str | None = None,
                          compute_capability: str | None = None,
                          device_count: int | None = None) -> tuple[str, str]:
    """``(implementation, reason)`` for a call: ``"xla"``, ``"cudnn"`` or ``"splash"`` and why.

    ``requested``: ``None`` (on a TPU the splash kernel where
    :func:`~opd_jax.model.splash_attention.splash_blockers` finds nothing; elsewhere cuDNN where
    :func:`cudnn_blockers` finds nothing; else XLA), ``"xla"``, ``"cudnn"`` or ``"splash"``
    (``ValueError`` listing the blockers where it cannot run).
    ``platform`` / ``compute_capability`` default to the first device's, ``device_count`` to
    ``jax.device_count()``.
    """
    if requested == "xla":
        return "xla", "requested"
    if requested not in (None, "cudnn", "splash"):
        raise ValueError(f"unknown implementation {requested!r}; expected None, 'xla', 'cudnn' or "
                         "'splash'")
    if platform is None:
        platform, compute_capability = _device_facts()
    if device_count is None:
        device_count = jax.device_count()
    if requested == "splash" or (requested is None and platform == "tpu"):
        blockers = splash_blockers(length=length, platform=platform, device_count=device_count,
                                   forced=requested == "splash")
        if not blockers:
            return "splash", ("requested" + (" (Pallas interpret mode off TPU)"
                                             if platform != "tpu" else "")
                              if requested else "platform default on a TPU")
        return "xla", "; ".join(blockers)
    blockers = cudnn_blockers(dtype=dtype, length=length, head_dim=head_dim, masked=masked,
                              platform=platform, compute_capability=compute_capability)
    if requested == "cudnn":
        if blockers:
            raise ValueError("attention 'platform_cudnn' cannot run here: " + "; ".join(blockers)
                             + " (use 'platform' to fall back to XLA)")
        return "cudnn", "requested"
    if blockers:
        return "xla", "; ".join(blockers)
    return "cudnn", "platform default on a CUDA GPU"


def _mask(mask: PlatformMask, B: int, T: int, full: bool) -> jax.Array | None:
    """The boolean mask beyond causality, ``[B, 1, 1 or T, S]`` (``full``: always ``[B, 1, T,
    S]``, as cuDNN's bias needs); ``None`` when every slot is real and rows are unpacked."""
    if mask.kv_valid is None and mask.segments is None:
        return None
    m = jnp.ones((B, 1, 1, T), bool) if mask.kv_valid is None else mask.kv_valid[:, None, None, :]
    if mask.segments is not None:
        seg = mask.segments
        m = m & (seg[:, None, :, None] == seg[:, None, None, :])
    return jnp.broadcast_to(m, (B, 1, T, T)) if full else m


def attention_platform(q_BxTxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array,
                       mask: PlatformMask) -> jax.Array:
    """Causal grouped-query attention over one call's own tokens through
    :func:`jax.nn.dot_product_attention` (``T == S``, no cache); output ``[B, T, H, E]``.

    .. math:: o_t = \\sum_{s \\le t,\\ m_{ts}} \\mathrm{softmax}_s(q_t \\cdot k_s / \\sqrt{E})\\, v_s

    Equal to ``layers.attention`` with the decoder's dense mask (values and gradients; on XLA
    also at fully masked queries). The implementation is resolved at trace time
    (:func:`choose_implementation`; see the module docstring for what cuDNN can take).
    """
    B, T, H, E = q_BxTxHxE.shape
    if k_BxSxGxE.shape[1] != T:
        raise ValueError(f"platform attention is for calls without a cache (T == S); got T = {T},"
                         f" S = {k_BxSxGxE.shape[1]}")
    masked = mask.kv_valid is not None or mask.segments is not None
    platform, capability = _device_facts()
    impl, reason = choose_implementation(mask.implementation, dtype=q_BxTxHxE.dtype, length=T,
                                         head_dim=E, masked=masked, platform=platform,
                                         compute_capability=capability)
    if impl == "xla" and mask.implementation is None and platform == "gpu":
        warnings.warn(f"platform attention runs XLA, not cuDNN: {reason}", stacklevel=2)
    if impl == "splash":
        return attention_splash(q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, mask.kv_valid, mask.segments,
                                interpret=platform != "tpu")
    return jax.nn.dot_product_attention(
        q_BxTxHxE, k_BxSxGxE, v_BxSxGxE, mask=_mask(mask, B, T, full=impl == "cudnn"),
        scale=float(1.0 / np.sqrt(E)), is_causal=True, implementation=impl)
