"""Small tensor helpers shared across the library."""

from __future__ import annotations

from typing import TypeGuard

import torch

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    # Builds without torch.distributed: the name exists, and is_dtensor is always False.
    DTensor = None  # type: ignore[misc,assignment]

__all__ = ["classifier_free_guidance", "expand_like", "is_dtensor"]


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

    ``guidance_scale`` is a number or a tensor broadcasting against ``cond`` (per-sample scales
    ``[B, 1, ...]``).

    Equivalent to the usual ``uncond + s * (cond - uncond)``; written this way so that
    ``s = 1`` returns ``cond`` exactly. Applied to x0 predictions by :class:`DMDPipeline`.
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"classifier_free_guidance needs matching shapes, got cond {tuple(cond.shape)} "
            f"and uncond {tuple(uncond.shape)}"
        )
    return cond + (guidance_scale - 1.0) * (cond - uncond)
