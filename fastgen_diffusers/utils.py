"""Small tensor helpers shared across the library."""

from __future__ import annotations

from typing import TypeGuard

import torch

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    # Builds without torch.distributed: the name exists, and is_dtensor is always False.
    DTensor = None  # type: ignore[misc,assignment]

__all__ = ["classifier_free_guidance", "expand_like", "is_dtensor", "normalize_guidance"]


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2); ``False`` where torch has
    no ``torch.distributed``.

    Example::

        sharded = any(is_dtensor(p) for p in model.parameters())
    """
    return DTensor is not None and isinstance(t, DTensor)


def expand_like(x: torch.Tensor | float, target: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor ``[B]`` to ``[B, 1, ..., 1]`` to broadcast against ``target``.

    A 0-d tensor or a Python number is returned as a 0-d tensor (it broadcasts as is).

    Example::

        t = torch.rand(4)
        x = torch.randn(4, 16, 8, 8)
        x_t = (1 - expand_like(t, x)) * x
    """
    if not isinstance(x, torch.Tensor):
        return torch.as_tensor(x, device=target.device)
    if x.ndim == 0:
        return x
    if x.ndim != 1 or x.shape[0] != target.shape[0]:
        if x.ndim == target.ndim:
            return x
        raise ValueError(
            f"expand_like expects a per-sample tensor of shape [{target.shape[0]}] for a target "
            f"of shape {tuple(target.shape)}, got shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], *([1] * (target.ndim - 1)))


def classifier_free_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float | torch.Tensor
) -> torch.Tensor:
    """DMD2-convention classifier-free guidance: ``cond + (s - 1) * (cond - uncond)``.

    ``guidance_scale`` is a number or a tensor of per-sample scales, ``[B]`` or
    ``[B, 1, ...]``.

    Equivalent to the usual ``uncond + s * (cond - uncond)``; written this way so that
    ``s = 1`` returns ``cond`` exactly. Applied to x0 predictions by :class:`DMDPipeline`.
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"classifier_free_guidance needs matching shapes, got cond {tuple(cond.shape)} "
            f"and uncond {tuple(uncond.shape)}"
        )
    scale = (
        expand_like(guidance_scale, cond).to(cond.dtype)
        if isinstance(guidance_scale, torch.Tensor)
        else guidance_scale
    )
    return cond + (scale - 1.0) * (cond - uncond)


def normalize_guidance(
    guided_x0: torch.Tensor,
    cond_x0: torch.Tensor,
    x_t: torch.Tensor,
    mode: str,
    clamp: float = 1.0,
) -> torch.Tensor:
    """Per-token norm control of a CFG-guided teacher prediction, in velocity space.

    With ``v = (x_t - x0) / t`` (rectified flow), per token (norm over dim 1, the channels):
    ``"rescale"``: ``v <- v ||v_cond|| / ||v||`` (Qwen-Image's true-CFG norm, LightX2V's
    ``cfg_norm: layer_norm``); ``"clamp"``: ``v <- v min(1, clamp ||v_cond|| / ||v||)``.
    Returns the x0 of the new velocity, ``x_t - t v``. ``t`` cancels in the norm ratio, so
    this computes ``x_t - ratio (x_t - guided_x0)`` (no division by a small ``t``), in fp32.

    Example::

        x0 = normalize_guidance(classifier_free_guidance(c, u, 4.0), c, x_t, "rescale")
    """
    if mode not in ("rescale", "clamp"):
        raise ValueError(f"guidance norm mode must be 'rescale' or 'clamp', got {mode!r}")
    if not guided_x0.shape == cond_x0.shape == x_t.shape:
        raise ValueError(
            f"normalize_guidance needs matching shapes, got guided {tuple(guided_x0.shape)}, "
            f"cond {tuple(cond_x0.shape)}, x_t {tuple(x_t.shape)}"
        )
    x32 = x_t.float()
    v = x32 - guided_x0.float()  # t * v_guided
    v_cond = x32 - cond_x0.float()  # t * v_cond
    ratio = v_cond.norm(dim=1, keepdim=True) / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if mode == "clamp":
        ratio = (clamp * ratio).clamp(max=1.0)
    return (x32 - ratio * v).to(guided_x0.dtype)
