"""Wan image-to-video: ``WanImageToVideoPipeline`` (Wan 2.2 I2V-A14B: two experts switched at
``boundary_ratio`` 0.9, no CLIP image encoder) for the training machinery.

Everything but the conditioning is :class:`~fastgen_diffusers.plugins.wan.WanFamily`'s: the
same transformer, wrapper, VAE, schedules, two-expert networks and LoRA files. Each sample
also carries ``condition_latents`` (the frame mask and the VAE latents of its first frame
followed by zero frames, exactly as the pipeline's ``prepare_latents`` builds them,
:func:`~fastgen_diffusers.plugins.wan.prepare_image_condition`), which the teacher, fake score
and student all take, conditional and unconditional passes alike.

Example::

    family = family_from_pretrained("Wan-AI/Wan2.2-I2V-A14B-Diffusers")  # WanImageToVideoFamily
    pipe = family.load_pipeline("Wan-AI/Wan2.2-I2V-A14B-Diffusers", torch_dtype=torch.bfloat16)
    cond = family.encode_prompts(pipe, ["a cat turns its head"])
    cond |= family.encode_condition(pipe, [load_image("cat.png")], 480, 832, num_frames=81)
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    flow = teacher(hidden_states=x_t, timestep=t, **cond)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import WanImageToVideoPipeline

from .registry import register_family
from .wan import WanFamily, prepare_image_condition

__all__ = ["WanImageToVideoFamily"]


@register_family
class WanImageToVideoFamily(WanFamily):
    """``WanImageToVideoPipeline`` (Wan 2.2 I2V-A14B): :class:`WanFamily` plus one condition
    image per sample (:meth:`encode_condition`).

    Training rows give the image as an image column (prompts + images: enough for the
    backward-simulation recipes) or as the first frame of a video column (the video's latents
    then also serve the GAN branch and data-started students). Wan 2.1 I2V checkpoints, whose
    pipelines also encode the image with CLIP (``image_encoder``), are refused.

    Args:
        expand_timesteps: the pipeline's ``expand_timesteps`` (the condition then replaces the
            first latent frame, at ``t = 0``).
        boundary_ratio: the switch between the two experts (0.9 for Wan2.2-I2V-A14B).
    """

    name = "wan_i2v"
    aliases = ()
    pipeline_class = WanImageToVideoPipeline
    pipeline_tag = "image-to-video"
    condition_image = True

    def __repr__(self) -> str:
        return super().__repr__().replace("WanFamily", type(self).__name__, 1)

    @classmethod
    def options_from_model_index(cls, index: Mapping[str, Any], path: str) -> dict[str, Any]:
        encoder = (index.get("image_encoder") or [None, None])[1]
        if encoder is not None:
            raise ValueError(
                f"{path} encodes its image with CLIP too (image_encoder: {encoder}, Wan 2.1 "
                "I2V): distilling it is not supported; image-to-video pipelines without an image "
                "encoder are (Wan-AI/Wan2.2-I2V-A14B-Diffusers)"
            )
        return super().options_from_model_index(index, path)

    @torch.no_grad()
    def encode_condition(
        self,
        pipe: Any,
        images: torch.Tensor | Sequence[Any],
        height: int,
        width: int,
        num_frames: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"condition_latents": [B, 4 + C, F, H/8, W/8]}`` in float32 (``[B, C, 1, ...]``
        with ``expand_timesteps``), one row per image, computed by the pipeline's own
        ``prepare_latents`` (:func:`~fastgen_diffusers.plugins.wan.prepare_image_condition`).

        ``images``: pixels ``[B, 3, height, width]`` in [-1, 1] used as they are, or PIL
        images resized by the pipeline's ``video_processor`` as its ``image=`` argument is.
        """
        frames = self.default_num_frames if num_frames is None else int(num_frames)
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(
                    f"condition pixels must be [B, 3, {height}, {width}], got {tuple(images.shape)}"
                )
            rows: list[Any] = [images[i : i + 1] for i in range(images.shape[0])]
        else:
            rows = list(images)
        if not rows:
            raise ValueError("encode_condition needs at least one image")
        # One image per call: prepare_latents repeats a single image over its batch.
        parts = [prepare_image_condition(pipe, image, height, width, frames) for image in rows]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def card_notes(self, *, base_model: str, lora: bool) -> str:
        return super().card_notes(base_model=base_model, lora=lora) + (
            "\n\nThe first frame is the `image=` argument; the student was trained on images "
            "resized and center-cropped to the video's size, so pass one of that size (the "
            "pipeline stretches any other)."
        )
