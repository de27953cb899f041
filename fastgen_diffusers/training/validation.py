"""Validation samples: the student's few-step grid and the teacher's reference grid.

Noise comes from per-image seeded generators (never the global RNG), so validation does not
change the training run it is part of. :func:`validate` is the training loop's phase: it draws
the grids, writes ``validation/<student|teacher>-<step>.png`` and logs them to the trackers.

Example::

    images = sample_images(student, cond, shape, seeds=[0, 1], t_list=[0.999, 0.0])
    grid = image_grid(family.decode(pipe, images), rows=2)
    grid.save("validation.png")
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..ema import ema_weights
from ..io import atomic_path
from ..plugins.common import flow_match_sigmas
from ..sampling import sample_student, sample_teacher

if TYPE_CHECKING:
    from .state import Run, Teacher, Trainer, TrainingData

__all__ = ["final_image_paths", "image_grid", "sample_images", "teacher_sigmas", "validate"]

# Validation draws each prompt with these seeds (offsets from --seed).
_NUM_SEEDS = 2


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


def validate(
    run: Run,
    teacher: Teacher,
    data: TrainingData,
    trainer: Trainer,
    step: int,
    *,
    teacher_grid: bool = False,
) -> None:
    """Draw the student's grid at ``step`` (EMA weights when the recipe has an EMA) and, with
    ``teacher_grid``, the teacher's reference grid; save and log them on the main process.

    A sharded model needs every rank in its forward, so under FSDP2 every rank samples.
    """
    from .setup import to_device

    accelerator, prepared = run.accelerator, trainer.prepared
    if data.validation_cond is None or not (run.is_main or prepared.fsdp2):
        return
    cond = to_device(data.validation_cond, run.device, run.weight_dtype)
    seeds = list(range(run.args.seed, run.args.seed + _NUM_SEEDS))
    model = accelerator.unwrap_model(trainer.student)
    ema = trainer.dmd.ema
    with ema_weights(ema, model) if ema is not None else contextlib.nullcontext():
        grids = {
            "student": sample_images(
                model,
                cond,
                teacher.latent_shape,
                seeds,
                t_list=run.t_list,
                sample_type=run.cfg.student_sample_type,
            )
        }
        prepared.reshard()  # before the live weights go back into the shards
    if teacher_grid:  # once, at the start: the reference the student is distilled from
        sigmas = teacher.family.teacher_sigmas(
            teacher.pipe.scheduler, run.args.teacher_validation_steps, teacher.latent_shape
        )
        grids["teacher"] = sample_images(
            prepared.teacher,
            cond,
            teacher.latent_shape,
            seeds,
            sigmas=sigmas,
            guidance_scale=run.cfg.guidance_scale,
            negative=to_device(data.negative, run.device, run.weight_dtype),
        )
        prepared.reshard()
    if run.is_main:
        rows = len(next(iter(data.validation_cond.values())))
        _save_grids(run, teacher, grids, step, rows)


def _save_grids(
    run: Run, teacher: Teacher, grids: dict[str, torch.Tensor], step: int, rows: int
) -> None:
    """Write each grid (video: also an animated GIF of it), and at the last iteration one
    student image per prompt (``validation/final-<i>.png``, ``.gif`` for video: the model
    card's gallery); log every draw to the trackers."""
    from .trackers import log_validation

    folder = run.output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = list(run.args.validation_prompts or [])
    fps = teacher.family.video_fps or 16
    for name, latents in grids.items():
        with torch.no_grad():
            images = teacher.family.decode(teacher.pipe, latents.to(run.weight_dtype)).float()
        grid = image_grid(images, rows=rows)
        _save_image(grid, folder / f"{name}-{step:06d}.png")
        video = None
        if images.ndim == 5:
            video = _save_gif(
                [image_grid(images[:, :, f], rows) for f in range(images.shape[2])],
                folder / f"{name}-{step:06d}.gif",
                fps,
            )
        if name == "student" and step == run.args.max_train_steps:
            per_prompt = len(images) // rows
            for i in range(rows):  # the first seed of each prompt
                sample = images[i * per_prompt : i * per_prompt + 1]
                if sample.ndim == 5:
                    frames = [image_grid(sample[:, :, f], 1) for f in range(sample.shape[2])]
                    _save_gif(frames, folder / f"final-{i}.gif", fps)
                else:
                    _save_image(image_grid(sample, 1), folder / f"final-{i}.png")
        still = images[:, :, images.shape[2] // 2] if images.ndim == 5 else images
        log_validation(run, name, still, step, grid=grid, prompts=prompts, video=video)


def final_image_paths(output_dir: str | Path, num_prompts: int) -> list[Path]:
    """The per-prompt images the last validation wrote (``validation/final-<i>.png`` or
    ``.gif``), in prompt order; prompts without one are skipped."""
    folder = Path(output_dir) / "validation"
    found = []
    for i in range(num_prompts):
        for ext in ("png", "gif"):
            if (folder / f"final-{i}.{ext}").is_file():
                found.append(folder / f"final-{i}.{ext}")
                break
    return found


def _save_image(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _save_gif(frames: list[Image.Image], path: Path, fps: int) -> Path:
    with atomic_path(path) as tmp:
        frames[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=max(int(1000 / fps), 20),
            loop=0,
        )
    return path
