"""One interface over the model families (SD3, Flux, Wan, Qwen-Image) for the training loop.

Each :class:`Family` pairs a stock diffusers pipeline with its plugin
(:mod:`fastgen_diffusers.plugins`): loading, wrapping the transformer in the pipeline's call
convention, prompt and media encoding for the cache, decoding for validation, the GAN branch,
and the scheduler / call arguments of the exported student. The loop never branches on the
family.

Example::

    from fastgen_diffusers.training.families import family_from_pretrained

    family = family_from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    pipe = family.load_pipeline("stabilityai/stable-diffusion-3.5-medium",
                                torch_dtype=torch.bfloat16).to("cuda")
    cond = family.encode_prompts(pipe, ["a cat", "a dog"])      # {"encoder_hidden_states", ...}
    negative = family.encode_prompts(pipe, [""])                # same keys, batch of 1
    latents = family.encode_media(pipe, pixels)                 # pixels in [-1, 1]
    family.free_encoders(pipe)

    teacher = family.wrap(pipe.transformer)
    flow = teacher(hidden_states=x_t, timestep=t, **cond)
    images = family.decode(pipe, latents)                       # [B, 3, H, W] in [0, 1]

Conditioning dicts are keyed by the wrapper's ``forward`` argument names, batch first, with the
same keys for every prompt (Qwen-Image masks are always present, all-ones where nothing is
padded), so cached samples collate by ``torch.cat`` per key.
"""

from __future__ import annotations

import gc
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)
from torch import nn

from ..features import FeatureCapture, get_feature_capture
from ..plugins import flux, qwen_image, sd3, wan

__all__ = [
    "FAMILY_NAMES",
    "SUPPORTED_PIPELINES",
    "Family",
    "FluxFamily",
    "QwenImageFamily",
    "SD3Family",
    "WanFamily",
    "family_from_pretrained",
    "get_family",
]

# model_index.json `_class_name` -> family name, and the transformer class of each family
# (read when a folder has no model_index.json).
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "WanPipeline": "wan",
    "QwenImagePipeline": "qwen_image",
}
_TRANSFORMER_FAMILIES: dict[str, str] = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
    "QwenImageTransformer2DModel": "qwen_image",
}
FAMILY_NAMES: tuple[str, ...] = ("sd3", "flux", "wan", "qwen_image")
# Pixels outside [-1, 1] by more than this are a caller error (e.g. [0, 255] images).
_PIXEL_TOLERANCE = 1e-3


class Family(ABC):
    """What the training loop needs from a model family; one subclass per family.

    Attributes:
        name: ``"sd3"``, ``"flux"``, ``"wan"`` or ``"qwen_image"`` (the plugin's module name).
        pipeline_class: the stock diffusers pipeline the teacher loads into and the student is
            exported for.
        is_video: whether media are videos (``[B, 3, F, H, W]`` pixels, 5-D latents).
        default_max_sequence_length: text tokens when ``max_sequence_length`` is ``None``
            (what the stock pipeline's ``__call__`` uses).
        text_components: the pipeline components :meth:`free_encoders` drops.
    """

    name: str
    pipeline_class: type[DiffusionPipeline]
    is_video: bool = False
    default_max_sequence_length: int
    text_components: tuple[str, ...]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- loading and wrapping -------------------------------------------------------------------

    def load_pipeline(
        self,
        path: str | os.PathLike,
        *,
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        **components: Any,
    ) -> DiffusionPipeline:
        """``pipeline_class.from_pretrained`` on a local folder or a Hub id; ``components``
        (e.g. ``transformer=``) replace the checkpoint's.

        The checkpoint's own scheduler is kept (teacher reference samples use
        :func:`~fastgen_diffusers.sampling.sample_teacher` with explicit sigmas).
        """
        return self.pipeline_class.from_pretrained(
            path, revision=revision, variant=variant, torch_dtype=torch_dtype, **components
        )

    @abstractmethod
    def wrap(self, transformer: nn.Module, *, flux_guidance: float | None = None) -> nn.Module:
        """The plugin wrapper around ``transformer`` (``model(hidden_states=x_t, timestep=t in
        [0, 1], **cond)``). ``flux_guidance`` is read by Flux only (embedded guidance of
        guidance-distilled checkpoints); other families ignore it."""

    # -- prompts ---------------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning for ``prompts`` through the pipeline's own text encoders: per-sample
        tensors, batch first, keyed by the wrapper's ``forward`` argument names. The negative
        prompt goes through the same call (as a one-element list) and gets the same keys."""

    def _max_length(self, max_sequence_length: int | None) -> int:
        if max_sequence_length is None:
            return self.default_max_sequence_length
        length = int(max_sequence_length)
        if length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        return length

    # -- media -----------------------------------------------------------------------------------

    @abstractmethod
    def encode_media(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        """Model-space latents (the wrapper's input layout) of ``pixels`` in [-1, 1]
        (``[B, 3, H, W]``, video ``[B, 3, F, H, W]``), through the pipeline's VAE.

        The posterior's mode (its mean) is used, not a sample, so a cache of latents is
        deterministic; the result is in the VAE's dtype.
        """

    @abstractmethod
    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (video ``[B, 3, F, H, W]``) in [0, 1] from model-space
        latents, computed as the stock pipeline does for ``output_type="pt"``."""

    @abstractmethod
    def latent_shape(
        self, pipe: DiffusionPipeline, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        """Per-sample latent shape (no batch axis) for media of ``height x width`` pixels
        (and ``num_frames`` frames for video)."""

    def _vae_mode(
        self, pipe: DiffusionPipeline, pixels: torch.Tensor, *, frame_axis: bool = False
    ) -> torch.Tensor:
        """``pipe.vae.encode(pixels).latent_dist.mode()`` after checking layout and range;
        ``frame_axis`` feeds images to a video VAE as one frame, ``[B, 3, 1, H, W]``."""
        ndim = 5 if self.is_video else 4
        layout = "[B, 3, F, H, W]" if self.is_video else "[B, 3, H, W]"
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != ndim or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels)
            raise ValueError(f"{self.name} encodes pixels {layout}, got {shape}")
        low, high = float(pixels.min()), float(pixels.max())
        if low < -1.0 - _PIXEL_TOLERANCE or high > 1.0 + _PIXEL_TOLERANCE:
            raise ValueError(
                f"pixels must be in [-1, 1] (x / 127.5 - 1 for uint8 images), got values in "
                f"[{low:.4g}, {high:.4g}]"
            )
        vae = pipe.vae
        if vae is None:
            raise ValueError(f"{type(pipe).__name__} has no VAE (vae=None): cannot encode media")
        param = next(vae.parameters())
        x = pixels.to(device=param.device, dtype=vae.dtype)
        if frame_axis:
            x = x.unsqueeze(2)
        return vae.encode(x).latent_dist.mode()

    @staticmethod
    def _vae_input(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        if pipe.vae is None:
            raise ValueError(f"{type(pipe).__name__} has no VAE (vae=None): cannot decode")
        return latents.to(device=next(pipe.vae.parameters()).device, dtype=pipe.vae.dtype)

    def _check_image_frames(self, num_frames: int | None) -> None:
        if num_frames not in (None, 1):
            raise ValueError(
                f"{self.name} generates images: num_frames must be None (or 1), got {num_frames}"
            )

    # -- GAN branch -----------------------------------------------------------------------------

    @abstractmethod
    def attach_feature_capture(
        self, teacher: nn.Module, feature_indices: Sequence[int] | None = None
    ) -> FeatureCapture:
        """Hook the teacher's blocks for the GAN branch (default indices: the plugin's)."""

    @abstractmethod
    def build_discriminator(
        self,
        teacher: nn.Module,
        feature_indices: Sequence[int] | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> nn.Module:
        """Discriminator heads for the captured features. ``feature_indices=None`` takes the
        indices of the capture attached to ``teacher`` (else the plugin's defaults)."""

    @staticmethod
    def _capture_indices(
        teacher: nn.Module, feature_indices: Sequence[int] | None
    ) -> Sequence[int] | None:
        if feature_indices is not None:
            return feature_indices
        capture = get_feature_capture(teacher)
        return None if capture is None else capture.feature_indices

    # -- the exported student -------------------------------------------------------------------

    @abstractmethod
    def student_scheduler_config(
        self,
        t_list: Sequence[float],
        sample_type: str = "ode",
        base_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Scheduler config under which the stock pipeline follows the student's ``t_list``."""

    @abstractmethod
    def stock_pipeline_kwargs(
        self, t_list: Sequence[float], *, flux_guidance: float | None = None
    ) -> dict[str, Any]:
        """Stock-pipeline call arguments for the student (CFG off, the student's steps).
        ``flux_guidance`` is read by Flux only."""

    # -- memory ---------------------------------------------------------------------------------

    def free_encoders(self, pipe: DiffusionPipeline) -> None:
        """Drop the text encoders and tokenizers (set to ``None``, the pipeline config too)
        once prompts are cached; the pipeline keeps its transformer, VAE and scheduler and
        still runs from ``prompt_embeds``."""
        for component in self.text_components:
            if getattr(pipe, component, None) is not None:
                setattr(pipe, component, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise TypeError(
            f"prompts must be a non-empty list of strings, got {prompts!r:.80}"
            + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else "")
        )
    return list(prompts)


def _postprocess_images(pipe: DiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
    # VaeImageProcessor.postprocess(output_type="pt"): (x / 2 + 0.5).clamp(0, 1).
    return pipe.image_processor.postprocess(images, output_type="pt")


# -- Stable Diffusion 3 / 3.5 -------------------------------------------------------------------


class SD3Family(Family):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5) with :mod:`~fastgen_diffusers.plugins.sd3`.

    Conditioning: ``encoder_hidden_states`` (CLIP + T5 tokens) and ``pooled_projections``.
    """

    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    is_video = False
    default_max_sequence_length = 256
    text_components = (
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    )

    def wrap(self, transformer: nn.Module, *, flux_guidance: float | None = None) -> nn.Module:
        return sd3.SD3Wrapper(transformer)

    @torch.no_grad()
    def encode_prompts(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        # The plugin also encodes the pipeline's default negative (""); only the prompts' part
        # is kept, so positive and negative prompts come out of one code path.
        emb = sd3.encode_prompt(
            pipe,
            _check_prompts(prompts),
            max_sequence_length=self._max_length(max_sequence_length),
        )
        return {
            "encoder_hidden_states": emb["prompt_embeds"],
            "pooled_projections": emb["pooled_prompt_embeds"],
        }

    @torch.no_grad()
    def encode_media(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return sd3.normalize_latents(pipe.vae, self._vae_mode(pipe, pixels))

    @torch.no_grad()
    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        z = sd3.denormalize_latents(pipe.vae, self._vae_input(pipe, latents))
        return _postprocess_images(pipe, pipe.vae.decode(z, return_dict=False)[0])

    def latent_shape(
        self, pipe: DiffusionPipeline, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        self._check_image_frames(num_frames)
        return sd3.latent_shape(pipe, height, width)[1:]

    def attach_feature_capture(
        self, teacher: nn.Module, feature_indices: Sequence[int] | None = None
    ) -> FeatureCapture:
        return sd3.attach_feature_capture(teacher, feature_indices)

    def build_discriminator(
        self,
        teacher: nn.Module,
        feature_indices: Sequence[int] | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> nn.Module:
        indices = self._capture_indices(teacher, feature_indices)
        return sd3.build_discriminator(teacher, indices, hidden_channels=hidden_channels)

    def student_scheduler_config(
        self,
        t_list: Sequence[float],
        sample_type: str = "ode",
        base_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return sd3.student_scheduler_config(t_list, sample_type, base_config)

    def stock_pipeline_kwargs(
        self, t_list: Sequence[float], *, flux_guidance: float | None = None
    ) -> dict[str, Any]:
        return sd3.stock_pipeline_kwargs(t_list)


# -- Flux.1 -------------------------------------------------------------------------------------


class FluxFamily(Family):
    """``FluxPipeline`` (Flux.1 dev / schnell) with :mod:`~fastgen_diffusers.plugins.flux`.

    Conditioning: ``encoder_hidden_states`` (T5 tokens) and ``pooled_projections`` (CLIP).
    Guidance-distilled checkpoints (``guidance_embeds``) embed a guidance value:
    ``flux_guidance``, 3.5 (``FluxPipeline``'s default) when ``None``.
    """

    name = "flux"
    pipeline_class = FluxPipeline
    is_video = False
    default_max_sequence_length = 512
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    default_guidance = 3.5

    def wrap(self, transformer: nn.Module, *, flux_guidance: float | None = None) -> nn.Module:
        if not transformer.config.guidance_embeds:
            # Flux-schnell: no guidance embedding, the value is not used.
            return flux.FluxWrapper(transformer, guidance_scale=None)
        guidance = self.default_guidance if flux_guidance is None else float(flux_guidance)
        return flux.FluxWrapper(transformer, guidance_scale=guidance)

    @torch.no_grad()
    def encode_prompts(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        emb = flux.encode_prompt(
            pipe,
            _check_prompts(prompts),
            max_sequence_length=self._max_length(max_sequence_length),
        )
        return {
            "encoder_hidden_states": emb["encoder_hidden_states"],
            "pooled_projections": emb["pooled_projections"],
        }

    @torch.no_grad()
    def encode_media(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return flux.normalize_latents(pipe.vae, self._vae_mode(pipe, pixels))

    @torch.no_grad()
    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        z = flux.denormalize_latents(pipe.vae, self._vae_input(pipe, latents))
        return _postprocess_images(pipe, pipe.vae.decode(z, return_dict=False)[0])

    def latent_shape(
        self, pipe: DiffusionPipeline, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        self._check_image_frames(num_frames)
        # FluxPipeline silently rounds other sizes down; a cache at a rounded size would not
        # match the requested resolution.
        multiple = 2 * int(pipe.vae_scale_factor)
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (2 x vae_scale_factor), got "
                f"{height} and {width}"
            )
        return flux.latent_shape(pipe, height, width)[1:]

    def attach_feature_capture(
        self, teacher: nn.Module, feature_indices: Sequence[int] | None = None
    ) -> FeatureCapture:
        return flux.attach_feature_capture(teacher, feature_indices)

    def build_discriminator(
        self,
        teacher: nn.Module,
        feature_indices: Sequence[int] | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> nn.Module:
        indices = self._capture_indices(teacher, feature_indices)
        return flux.build_discriminator(teacher, indices, hidden_channels=hidden_channels)

    def student_scheduler_config(
        self,
        t_list: Sequence[float],
        sample_type: str = "ode",
        base_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return flux.student_scheduler_config(t_list, sample_type, base_config)

    def stock_pipeline_kwargs(
        self, t_list: Sequence[float], *, flux_guidance: float | None = None
    ) -> dict[str, Any]:
        return flux.stock_pipeline_kwargs(t_list, guidance_scale=flux_guidance)


# -- Wan 2.1 / 2.2 ------------------------------------------------------------------------------


class WanFamily(Family):
    """``WanPipeline`` (Wan 2.1 / 2.2 text-to-video) with :mod:`~fastgen_diffusers.plugins.wan`.

    Conditioning: ``encoder_hidden_states`` (umT5 tokens, zero-padded to
    ``max_sequence_length``). Media are videos: pixels ``[B, 3, F, H, W]``, latents
    ``[B, C, F', H', W']``.

    Args:
        expand_timesteps: the pipeline's ``expand_timesteps`` (Wan 2.2 TI2V-5B: per-token
            timesteps); :func:`family_from_pretrained` reads it from ``model_index.json``.
    """

    name = "wan"
    pipeline_class = WanPipeline
    is_video = True
    default_max_sequence_length = 512
    default_num_frames = 81  # WanPipeline.__call__'s default
    text_components = ("text_encoder", "tokenizer")

    def __init__(self, expand_timesteps: bool = False) -> None:
        self.expand_timesteps = bool(expand_timesteps)

    def __repr__(self) -> str:
        return f"WanFamily(expand_timesteps={self.expand_timesteps})"

    def load_pipeline(
        self,
        path: str | os.PathLike,
        *,
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        **components: Any,
    ) -> DiffusionPipeline:
        pipe = super().load_pipeline(
            path, revision=revision, variant=variant, torch_dtype=torch_dtype, **components
        )
        loaded = bool(getattr(pipe.config, "expand_timesteps", False))
        if loaded != self.expand_timesteps:
            raise ValueError(
                f"{path} has expand_timesteps={loaded}, this WanFamily expand_timesteps="
                f"{self.expand_timesteps}: build the family with family_from_pretrained(path)"
            )
        return pipe

    def wrap(self, transformer: nn.Module, *, flux_guidance: float | None = None) -> nn.Module:
        return wan.WanWrapper(transformer, expand_timesteps=self.expand_timesteps)

    @torch.no_grad()
    def encode_prompts(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        # As for SD3, the plugin also encodes the default negative; only the prompts are kept.
        emb = wan.encode_prompt(
            pipe,
            _check_prompts(prompts),
            max_sequence_length=self._max_length(max_sequence_length),
        )
        return {"encoder_hidden_states": emb["prompt_embeds"]}

    @torch.no_grad()
    def encode_media(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return wan.normalize_latents(pipe.vae, self._vae_mode(pipe, pixels))

    @torch.no_grad()
    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        z = wan.denormalize_latents(pipe.vae, self._vae_input(pipe, latents))
        video = pipe.vae.decode(z, return_dict=False)[0]
        # postprocess_video gives [B, F, 3, H, W]; the media layout is channels first.
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")
        return frames.permute(0, 2, 1, 3, 4)

    def latent_shape(
        self, pipe: DiffusionPipeline, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        frames = self.default_num_frames if num_frames is None else int(num_frames)
        return wan.latent_shape(pipe, height, width, frames)[1:]

    def attach_feature_capture(
        self, teacher: nn.Module, feature_indices: Sequence[int] | None = None
    ) -> FeatureCapture:
        return wan.attach_feature_capture(teacher, feature_indices)

    def build_discriminator(
        self,
        teacher: nn.Module,
        feature_indices: Sequence[int] | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> nn.Module:
        indices = self._capture_indices(teacher, feature_indices)
        return wan.build_discriminator(teacher, indices, hidden_channels=hidden_channels)

    def student_scheduler_config(
        self,
        t_list: Sequence[float],
        sample_type: str = "ode",
        base_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return wan.student_scheduler_config(t_list, sample_type, base_config)

    def stock_pipeline_kwargs(
        self, t_list: Sequence[float], *, flux_guidance: float | None = None
    ) -> dict[str, Any]:
        return wan.stock_pipeline_kwargs(t_list)


# -- Qwen-Image ---------------------------------------------------------------------------------


class QwenImageFamily(Family):
    """``QwenImagePipeline`` with :mod:`~fastgen_diffusers.plugins.qwen_image`.

    Conditioning: ``encoder_hidden_states`` (Qwen2.5-VL hidden states) zero-padded to
    ``max_sequence_length`` tokens and ``encoder_hidden_states_mask`` (``[B, L]``, 1 on valid
    tokens; all ones where the pipeline would pass ``None``), so every prompt has the same
    length and keys. Latents are the VAE's ``[B, C, 1, H, W]``.
    """

    name = "qwen_image"
    pipeline_class = QwenImagePipeline
    is_video = False
    default_max_sequence_length = 512
    max_sequence_length_limit = 1024  # QwenImagePipeline.check_inputs
    text_components = ("text_encoder", "tokenizer")

    def wrap(self, transformer: nn.Module, *, flux_guidance: float | None = None) -> nn.Module:
        return qwen_image.QwenImageWrapper(transformer)

    @torch.no_grad()
    def encode_prompts(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        length = self._max_length(max_sequence_length)
        if length > self.max_sequence_length_limit:
            raise ValueError(
                f"max_sequence_length={length} exceeds QwenImagePipeline's limit of "
                f"{self.max_sequence_length_limit}"
            )
        emb = qwen_image.encode_prompt(pipe, _check_prompts(prompts), max_sequence_length=length)
        # The pipeline pads to the longest prompt of the call; padding every call to one length
        # (masked, so the model output is unchanged) lets samples of any batches collate.
        embeds, mask = qwen_image.pad_prompt_embeds(
            emb["encoder_hidden_states"], emb["encoder_hidden_states_mask"], length
        )
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    @torch.no_grad()
    def encode_media(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        # The Qwen-Image VAE is a causal video VAE: an image is one frame, [B, 3, 1, H, W].
        z = self._vae_mode(pipe, pixels, frame_axis=True)
        return qwen_image.normalize_latents(pipe.vae, z)

    @torch.no_grad()
    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        z = qwen_image.denormalize_latents(pipe.vae, self._vae_input(pipe, latents))
        image = pipe.vae.decode(z, return_dict=False)[0][:, :, 0]
        return _postprocess_images(pipe, image)

    def latent_shape(
        self, pipe: DiffusionPipeline, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        self._check_image_frames(num_frames)
        return qwen_image.latent_shape(pipe, height, width)[1:]

    def attach_feature_capture(
        self, teacher: nn.Module, feature_indices: Sequence[int] | None = None
    ) -> FeatureCapture:
        return qwen_image.attach_feature_capture(teacher, feature_indices)

    def build_discriminator(
        self,
        teacher: nn.Module,
        feature_indices: Sequence[int] | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> nn.Module:
        indices = self._capture_indices(teacher, feature_indices)
        return qwen_image.build_discriminator(teacher, indices, hidden_channels=hidden_channels)

    def student_scheduler_config(
        self,
        t_list: Sequence[float],
        sample_type: str = "ode",
        base_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return qwen_image.student_scheduler_config(t_list, sample_type, base_config)

    def stock_pipeline_kwargs(
        self, t_list: Sequence[float], *, flux_guidance: float | None = None
    ) -> dict[str, Any]:
        return qwen_image.stock_pipeline_kwargs(t_list)


# -- lookup -------------------------------------------------------------------------------------


def get_family(name: str) -> Family:
    """The family called ``name`` (one of :data:`FAMILY_NAMES`), with default settings."""
    if name == "sd3":
        return SD3Family()
    if name == "flux":
        return FluxFamily()
    if name == "wan":
        return WanFamily()
    if name == "qwen_image":
        return QwenImageFamily()
    raise ValueError(f"Unknown model family {name!r}; expected one of {', '.join(FAMILY_NAMES)}")


def _supported() -> str:
    return ", ".join(f"{pipeline} ({family})" for pipeline, family in SUPPORTED_PIPELINES.items())


def _read_json(path: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    """``filename`` of a local folder or Hub repo as a dict; ``None`` when there is none."""
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            return None
    elif os.path.exists(path) or path.startswith(("/", ".", "~")):
        raise ValueError(f"{path!r} is not a folder (expected a diffusers pipeline folder)")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            file = hf_hub_download(path, filename, revision=revision)
        except RemoteEntryNotFoundError:
            return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def family_from_pretrained(path: str | os.PathLike, *, revision: str | None = None) -> Family:
    """The family of the diffusers pipeline at ``path`` (local folder or Hub id).

    Reads ``_class_name`` of ``model_index.json`` (:data:`SUPPORTED_PIPELINES`); a folder
    without one is recognised by ``transformer/config.json``'s class. Wan takes
    ``expand_timesteps`` from ``model_index.json``. Raises ``ValueError`` naming what was found
    and the supported pipelines otherwise.
    """
    path = os.fspath(path)
    index = _read_json(path, "model_index.json", revision)
    if index is not None:
        pipeline = index.get("_class_name")
        family = SUPPORTED_PIPELINES.get(pipeline)
        if family is None:
            transformer = (index.get("transformer") or [None, None])[1]
            raise ValueError(
                f"{path} holds a {pipeline} (transformer: {transformer}); supported pipelines: "
                f"{_supported()}"
            )
        if family == "wan":
            if (index.get("transformer_2") or [None, None])[1] is not None:
                raise ValueError(
                    f"{path} is a two-expert Wan 2.2 pipeline (transformer_2 is set): distilling "
                    "it into one student is not supported; use a single-transformer WanPipeline"
                )
            return WanFamily(expand_timesteps=bool(index.get("expand_timesteps", False)))
        return get_family(family)
    config = _read_json(path, os.path.join("transformer", "config.json"), revision)
    transformer = None if config is None else config.get("_class_name")
    if transformer in _TRANSFORMER_FAMILIES:
        return get_family(_TRANSFORMER_FAMILIES[transformer])
    found = (
        f"a transformer of class {transformer}"
        if config is not None
        else "neither model_index.json nor transformer/config.json"
    )
    raise ValueError(
        f"{path} is not a supported diffusers pipeline ({found}); supported pipelines: "
        f"{_supported()}"
    )
