"""The diffusers helpers that replaced hand-written code give the same results: validation grids
through ``make_image_grid`` are pixel-identical to the previous canvas code, and the teacher's
dynamically shifted sigmas through ``calculate_shift`` equal the previous closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fastgen_diffusers.plugins.common import flow_match_sigmas
from fastgen_diffusers.training.validation import image_grid, video_preview


def canvas_grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """The grid as validation built it before ``make_image_grid``: row-major tiles on black."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round()
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, image in enumerate(array.astype(np.uint8)):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return canvas


@pytest.mark.parametrize(("n", "rows"), [(6, 2), (4, 4), (5, 2)])  # (5, 2): a short last row
def test_image_grid_is_pixel_identical_to_the_canvas_layout(n, rows):
    images = torch.rand(n, 3, 8, 12, generator=torch.Generator().manual_seed(n)) * 1.2 - 0.1
    assert np.array_equal(np.asarray(image_grid(images, rows)), canvas_grid(images, rows))


def test_video_preview_shows_first_middle_and_last_frame_per_sample():
    videos = torch.rand(2, 3, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    preview = np.asarray(video_preview(videos))
    frames = videos[:, :, [0, 2, 4]].permute(0, 2, 1, 3, 4).reshape(6, 3, 8, 12)
    assert np.array_equal(preview, canvas_grid(frames, rows=2))


FLUX_DEV = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6144])
def test_dynamic_shift_sigmas_equal_the_pipelines(seq_len):
    sigmas = flow_match_sigmas(FLUX_DEV, 4, seq_len)
    # What FluxPipeline.__call__ passes: mu from diffusers' calculate_shift.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV)
    scheduler.set_timesteps(4, mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    assert sigmas == [float(s) for s in scheduler.sigmas]
    # The previous closed form (the same line, other float association order): equal to float32.
    slope = (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(4, mu=seq_len * slope + 0.5 - slope * 256)
    assert sigmas == pytest.approx([float(s) for s in scheduler.sigmas], abs=1e-7)
