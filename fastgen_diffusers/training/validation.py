"""Validation samples: the student's few-step grid and the teacher's reference grid.

Noise comes from per-image seeded generators (never the global RNG), so validation does not
change the training run it is part of. :func:`validate` is the training loop's phase: it draws
the grids, writes ``validation/<student|teacher>-<step>.png`` (video families: also one MP4 per
prompt) and logs them to the trackers.

Example::

    images = sample_images(student, cond, shape, seeds=[0, 1], t_list=[0.999, 0.0])
    grid = image_grid(family.decode(pipe, images), rows=2)
    grid.save("validation.png")
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Sequence
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

__all__ = [
    "final_image_paths",
    "image_grid",
    "sample_images",
    "save_video",
    "teacher_sigmas",
    "to_pil",
    "validate",
    "video_preview",
]

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
    guidance_scale_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        guidance_scale_fn=guidance_scale_fn,
    )


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """``[N, 3, H, W]`` images in [0, 1] as one PIL grid of ``rows`` rows (a short last row is
    left black); video ``[N, 3, F, H, W]``: one row per sample of its first, middle and last
    frame (:func:`video_preview`)."""
    if images.ndim == 5:
        return video_preview(images)
    n = images.shape[0]
    cols = -(-n // rows)
    tiles = to_pil(images)
    if n == rows * cols:  # diffusers' helper, same pixels (tests/test_validation_helpers.py)
        from diffusers.utils import make_image_grid

        return make_image_grid(tiles, rows=rows, cols=cols)
    # make_image_grid asserts a full grid; the same layout with the missing tiles black.
    w, h = tiles[0].size
    canvas = Image.new("RGB", (cols * w, rows * h))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, box=(i % cols * w, i // cols * h))
    return canvas


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` in [0, 1] -> N RGB PIL images (rounded to 8 bits)."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round()
    return [Image.fromarray(a) for a in array.astype(np.uint8)]


def video_preview(videos: torch.Tensor) -> Image.Image:
    """``[N, 3, F, H, W]`` in [0, 1] -> a still grid: one row per video, its first, middle and
    last frame side by side (the saved MP4s hold the motion)."""
    from diffusers.utils import make_image_grid

    frames = videos.shape[2]
    picks = sorted({0, frames // 2, frames - 1})
    tiles = [tile for video in videos for tile in to_pil(video[:, picks].permute(1, 0, 2, 3))]
    return make_image_grid(tiles, rows=videos.shape[0], cols=len(picks))


def save_video(video: torch.Tensor, path: Path, fps: int) -> Path:
    """``[3, F, H, W]`` in [0, 1] -> an MP4 at ``fps`` (``diffusers.utils.export_to_video``,
    imageio + imageio-ffmpeg: ``pip install fastgen_diffusers[video]``), written atomically."""
    from diffusers.utils import export_to_video

    _require_video_backend()
    frames = list(video.clamp(0, 1).permute(1, 2, 3, 0).float().cpu().numpy())
    with atomic_path(path) as tmp:  # the temporary keeps the ".mp4" ffmpeg reads the format from
        export_to_video(frames, str(tmp), fps=fps)
    return path


def _require_video_backend() -> None:
    # Without imageio, export_to_video silently falls back to OpenCV (or fails on its import).
    if importlib.util.find_spec("imageio") is None or (
        importlib.util.find_spec("imageio_ffmpeg") is None
    ):
        raise ImportError(
            "writing validation videos needs imageio and imageio-ffmpeg: "
            "`pip install fastgen_diffusers[video]` (or `pip install imageio imageio-ffmpeg`)"
        )


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
            guidance_scale_fn=trainer.dmd.guidance_scale_fn,  # two experts: one scale each
            negative=to_device(data.negative, run.device, run.weight_dtype),
        )
        prepared.reshard()
    if run.is_main:
        rows = len(next(iter(data.validation_cond.values())))
        _save_grids(run, teacher, grids, step, rows)


def _save_grids(
    run: Run, teacher: Teacher, grids: dict[str, torch.Tensor], step: int, rows: int
) -> None:
    """Write each grid as ``<name>-<step>.png`` (video: the first / middle / last frame of each
    sample, plus one MP4 per prompt, its first seed, ``<name>-<step>-<i>.mp4`` at the family's
    ``video_fps``), and at the last iteration one student sample per prompt
    (``validation/final-<i>.png``, ``.mp4`` for video: the model card's gallery); log every
    draw to the trackers."""
    from .trackers import log_validation

    folder = run.output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = list(run.args.validation_prompts or [])
    fps = teacher.family.video_fps or 16
    final = step == run.args.max_train_steps
    for name, latents in grids.items():
        with torch.no_grad():
            images = teacher.family.decode(teacher.pipe, latents.to(run.weight_dtype)).float()
        grid = image_grid(images, rows=rows)
        _save_image(grid, folder / f"{name}-{step:06d}.png")
        per_prompt = len(images) // rows
        firsts = [images[i * per_prompt] for i in range(rows)]  # the first seed of each prompt
        videos = []
        if images.ndim == 5:
            videos = [
                save_video(v, folder / f"{name}-{step:06d}-{i}.mp4", fps)
                for i, v in enumerate(firsts)
            ]
        if name == "student" and final:
            for i, sample in enumerate(firsts):
                if sample.ndim == 4:
                    save_video(sample, folder / f"final-{i}.mp4", fps)
                else:
                    _save_image(to_pil(sample[None])[0], folder / f"final-{i}.png")
        still = images[:, :, images.shape[2] // 2] if images.ndim == 5 else images
        log_validation(run, name, still, step, grid=grid, prompts=prompts, videos=videos, fps=fps)


def final_image_paths(output_dir: str | Path, num_prompts: int) -> list[Path]:
    """The per-prompt samples the last validation wrote (``validation/final-<i>.png`` or
    ``.mp4``), in prompt order; prompts without one are skipped."""
    folder = Path(output_dir) / "validation"
    found = []
    for i in range(num_prompts):
        for ext in ("png", "mp4"):
            if (folder / f"final-{i}.{ext}").is_file():
                found.append(folder / f"final-{i}.{ext}")
                break
    return found


def _save_image(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
