"""Trackers of ``--report_to``: checked before the teacher loads, started with a config free of
secrets, and given the validation images (and MP4 videos) whatever the tracker.

Example::

    check_trackers(args)              # in setup_run: a missing package is a UserError
    start_trackers(run)               # the public arguments as the tracker config
    log_validation(run, "student", images, step, grid=grid, prompts=["a cat"], videos=[mp4])
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UserError

if TYPE_CHECKING:
    from .state import Run

__all__ = ["check_trackers", "log_validation", "requested_trackers", "start_trackers"]

# The pip package each tracker needs (accelerate's names), for the message of a missing one.
_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "aim": "aim",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def requested_trackers(report_to: str) -> list[str]:
    """The tracker names of ``--report_to`` (comma-separated; ``"all"``: every installed one
    accelerate knows, ``"none"``: none)."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if "all" in names:
        return [name for name, package in _PACKAGES.items() if _installed(package)]
    return names


def check_trackers(args: Any) -> None:
    """Raise :class:`UserError` when ``--report_to`` names an unknown tracker or one whose
    package is missing, or when ``--hub_token`` would be recorded by wandb (it stores the
    command line: use ``HF_TOKEN`` or ``hf auth login`` instead, as the diffusers examples say).
    Runs before any model is loaded."""
    names = requested_trackers(args.report_to)
    for name in names:
        if name not in _PACKAGES:
            raise UserError(
                f"--report_to {args.report_to!r}: unknown tracker {name!r}; expected 'none', "
                f"'all' or a comma-separated list of {', '.join(_PACKAGES)}"
            )
        if not _installed(_PACKAGES[name]):
            raise UserError(
                f"--report_to {args.report_to!r} needs the {name!r} package, which is not "
                f"installed: `pip install {_PACKAGES[name]}`, or pass --report_to none"
            )
    if args.hub_token is not None and "wandb" in names:
        raise UserError(
            "--hub_token cannot be used with --report_to wandb: wandb records the command line, "
            "so the token would be exposed. Log in with `hf auth login` or set HF_TOKEN instead"
        )


def _config_value(value: Any) -> bool | int | float | str:
    # Tensorboard hparams take scalars and strings only; None, lists and dicts become text.
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def start_trackers(run: Run) -> None:
    """Start the trackers of ``--report_to`` under ``--tracker_project_name``, with the
    arguments without secrets (``args.public_dict()``) as their config. wandb writes its run
    folder under the logging folder (not the working directory)."""
    args = run.args
    if not run.is_main or not requested_trackers(args.report_to):
        return
    config = {k: _config_value(v) for k, v in args.public_dict().items()}
    run.log_dir.mkdir(parents=True, exist_ok=True)
    run.accelerator.init_trackers(
        args.tracker_project_name,
        config=config,
        init_kwargs={"wandb": {"dir": str(run.log_dir)}},
    )


def log_validation(
    run: Run,
    name: str,
    images: torch.Tensor,
    step: int,
    *,
    grid: Any,
    prompts: Sequence[str],
    videos: Sequence[Path] = (),
    fps: int = 16,
) -> None:
    """Send one validation draw to every tracker.

    Images (``images``: ``[N, 3, H, W]`` in [0, 1], prompt-major): wandb gets one captioned
    image per sample, tensorboard and the others the grid (``grid``, a PIL image). Video
    (``videos``: one MP4 per prompt): wandb gets each as a captioned ``wandb.Video``;
    tensorboard ``add_video`` when moviepy (which it encodes with) is installed, otherwise each
    video's frames as one image strip; other trackers get the still ``grid``.
    """
    per_prompt = max(len(images) // max(len(prompts), 1), 1)
    captions = [prompts[i // per_prompt] if prompts else "" for i in range(len(images))]
    key = f"validation/{name}"
    for tracker in run.accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            if videos:
                media = [
                    wandb.Video(str(v), caption=prompts[i] if i < len(prompts) else "")
                    for i, v in enumerate(videos)
                ]
            else:
                pixels = images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255
                media = [
                    wandb.Image(p.round().astype(np.uint8), caption=c)
                    for p, c in zip(pixels, captions)
                ]
            tracker.log({key: media}, step=step)
        elif tracker.name == "tensorboard":
            if videos:
                _tensorboard_videos(tracker, key, videos, step, fps)
            tracker.log_images({key: np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: [grid]}, step=step)


# Frames of a video's tensorboard image strip when moviepy is missing: enough to see motion,
# few enough that an 81-frame 832-wide video stays a reasonable image.
_STRIP_FRAMES = 8


def _tensorboard_videos(
    tracker: Any, key: str, videos: Sequence[Path], step: int, fps: int
) -> None:
    from diffusers.utils import load_video

    for i, path in enumerate(videos):
        frames = np.stack([np.asarray(f) for f in load_video(str(path))])  # [F, H, W, 3] uint8
        if _installed("moviepy"):  # SummaryWriter.add_video encodes with moviepy
            clip = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [1, F, 3, H, W]
            tracker.writer.add_video(f"{key}/{i}", clip, global_step=step, fps=fps)
            continue
        picks = np.linspace(0, len(frames) - 1, min(_STRIP_FRAMES, len(frames))).round()
        strip = np.concatenate([frames[int(j)] for j in dict.fromkeys(picks)], axis=1)
        tracker.writer.add_image(f"{key}/{i}", strip, global_step=step, dataformats="HWC")
