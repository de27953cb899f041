"""Validation samples: the student's few-step grid and the teacher's reference grid.

Noise comes from per-image seeded generators (never the global RNG), so validation does not
change the training run it is part of.

Example::

    images = sample_images(student, cond, shape, seeds=[0, 1], t_list=[0.999, 0.0])
    grid = image_grid(family.decode(pipe, images), rows=2)
    grid.save("validation.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..plugins.common import flow_match_sigmas
from ..sampling import sample_student, sample_teacher

__all__ = ["image_grid", "sample_images", "teacher_sigmas"]


def _noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device)


def teacher_sigmas(scheduler: Any, num_steps: int, image_seq_len: int) -> list[float]:
    """The sigmas the teacher's own flow-matching scheduler visits in ``num_steps`` steps
    (dynamic shifting resolved for ``image_seq_len`` tokens), ending with 0.

    A family whose checkpoints ship another scheduler resolves it in its own
    ``Family.teacher_sigmas``; call that when the family is known.
    """
    return flow_match_sigmas(scheduler.config, num_steps, image_seq_len)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    cond: dict[str, torch.Tensor],
    latent_shape: Sequence[int],
    seeds: Sequence[int],
    *,
    t_list: Sequence[float] | None = None,
    sample_type: str = "ode",
    sigmas: Sequence[float] | None = None,
    guidance_scale: float | None = None,
    negative: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Latents for each (prompt, seed): student few-step over ``t_list`` or, with ``sigmas``,
    the teacher's Euler with CFG. ``cond`` holds one row per prompt; the result has
    ``len(prompts) * len(seeds)`` rows, prompt-major."""
    device = next(iter(cond.values())).device
    prompts = next(iter(cond.values())).shape[0]
    rows = {k: v.repeat_interleave(len(seeds), dim=0) for k, v in cond.items()}
    noise = _noise(latent_shape, list(seeds) * prompts, device)
    ehs = rows.pop("encoder_hidden_states", None)
    if sigmas is None:
        generator = torch.Generator().manual_seed(int(seeds[0]))
        return sample_student(
            model,
            noise,
            t_list,
            sample_type=sample_type,
            encoder_hidden_states=ehs,
            model_kwargs=rows,
            generator=generator,
        )
    neg_ehs, neg_kwargs = None, None
    if guidance_scale is not None:
        negative = {k: v.expand(noise.shape[0], *v.shape[1:]) for k, v in negative.items()}
        neg_ehs = negative.pop("encoder_hidden_states", None)
        neg_kwargs = negative
    return sample_teacher(
        model,
        noise,
        sigmas,
        encoder_hidden_states=ehs,
        model_kwargs=rows,
        negative_encoder_hidden_states=neg_ehs,
        negative_model_kwargs=neg_kwargs,
        guidance_scale=guidance_scale,
    )


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """``[N, 3, H, W]`` images in [0, 1] (video ``[N, 3, F, H, W]``: the middle frame) as one
    PIL grid of ``rows`` rows."""
    if images.ndim == 5:
        images = images[:, :, images.shape[2] // 2]
    n, _, h, w = images.shape
    cols = -(-n // rows)
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round()
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, image in enumerate(array.astype(np.uint8)):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray(canvas)
