"""The ``Family`` contract: every per-family fact the training loop, LoRA export and model card
need, on one object defined in the family's own plugin module.

A family pairs a stock diffusers pipeline with its plugin: loading, wrapping the transformer in
the pipeline's call convention, prompt and media encoding for the cache, decoding for
validation, the GAN branch, the validation reference schedule, the scheduler / call arguments
of the exported student, LoRA targets and file format, and the model card's notes. Nothing
outside the plugin branches on the family.

Example::

    from fastgen_diffusers.plugins import family_from_pretrained

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
    sigmas = family.teacher_sigmas(pipe.scheduler, 28, latents.shape[1:])

Conditioning dicts are keyed by the wrapper's ``forward`` argument names, batch first, with the
same keys for every prompt (Qwen-Image masks are always present, all-ones where nothing is
padded), so cached samples collate by ``torch.cat`` per key.
"""

from __future__ import annotations

import gc
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..features import FeatureCapture, get_feature_capture
from .common import flow_match_sigmas

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, ModelMixin

__all__ = ["Family"]

# Pixels outside [-1, 1] by more than this are a caller error (e.g. [0, 255] images).
_PIXEL_TOLERANCE = 1e-3


class Family(ABC):
    """What the training machinery needs from a model family; one subclass per family, in the
    family's plugin module, registered with
    :func:`~fastgen_diffusers.plugins.registry.register_family`.

    A plugin module's public functions (``normalize_latents``, ``latent_shape``,
    ``student_scheduler_config``, ...) are usable on their own; the family class binds them as
    its contract members (``normalize_latents = staticmethod(normalize_latents)``), so both are
    one implementation.

    Example (the layout of :mod:`fastgen_diffusers.plugins.sd3`)::

        @register_family
        class SD3Family(Family):
            name = "sd3"
            pipeline_class = StableDiffusion3Pipeline
            transformer_class = SD3Transformer2DModel
            default_max_sequence_length = 256
            text_components = ("text_encoder", "tokenizer", ...)
            lora_target_modules = ("attn.to_q", ...)
            lora_loader_class = SD3LoraLoaderMixin

            normalize_latents = staticmethod(normalize_latents)   # the module's functions
            ...
            def wrap(self, transformer): return SD3Wrapper(transformer)
            def _encode_prompts(self, pipe, prompts, max_sequence_length): ...

    Attributes:
        name: the plugin's module name (``"sd3"``, ``"flux"``, ``"wan"``, ``"qwen_image"``).
        aliases: other names :func:`~fastgen_diffusers.plugins.get_family` accepts.
        pipeline_class: the stock diffusers pipeline the teacher loads into and the student is
            exported for; :func:`~fastgen_diffusers.plugins.family_from_pretrained` matches
            ``model_index.json``'s ``_class_name`` against its name.
        transformer_class: the diffusers transformer (matched by ``isinstance``, so FSDP2's
            ``FSDP<Class>`` subclass counts).
        is_video: whether media are videos (``[B, 3, F, H, W]`` pixels, 5-D latents).
        default_max_sequence_length: text tokens when ``max_sequence_length`` is ``None``
            (what the stock pipeline's ``__call__`` uses).
        default_num_frames: frames per sample when ``num_frames`` is ``None`` (video only).
        text_components: the pipeline components :meth:`free_encoders` drops.
        lora_target_modules: module-name suffixes of the default LoRA targets (attention
            projections and feed-forwards).
        lora_loader_class: the diffusers LoRA loader mixin whose ``save_lora_weights`` writes
            the file the pipeline's ``load_lora_weights`` reads.
        pipeline_tag: the Hub task of the exported student.
        license_hint: licence metadata of well-known base models, keyed by a substring of the
            base model id (e.g. ``"FLUX.1-dev"``), used by the model card when no licence is
            given; ``None`` when there is none to suggest.
        video_fps: frames per second of the model card's ``export_to_video`` (video only).
        condition_image: each sample is generated from an image too (image-to-video): the cache
            holds :meth:`encode_condition` of every row's image (or its video's first frame)
            and validation needs one image per prompt.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    transformer_class: ClassVar[type[ModelMixin]]
    is_video: ClassVar[bool] = False
    default_max_sequence_length: ClassVar[int]
    default_num_frames: ClassVar[int | None] = None
    text_components: ClassVar[tuple[str, ...]]
    lora_target_modules: ClassVar[tuple[str, ...]]
    lora_loader_class: ClassVar[type]
    pipeline_tag: ClassVar[str] = "text-to-image"
    license_hint: ClassVar[Mapping[str, Mapping[str, str]] | None] = None
    video_fps: ClassVar[int | None] = None
    condition_image: ClassVar[bool] = False
    # Image families whose VAE is a video VAE (Qwen-Image) see an image as one frame.
    _vae_frame_axis: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- detection ------------------------------------------------------------------------------

    @classmethod
    def options_from_model_index(cls, index: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Constructor options read from a checkpoint's ``model_index.json`` (``path`` for
        messages); ``ValueError`` for a checkpoint of this pipeline the family cannot train."""
        return {}

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
        :func:`~fastgen_diffusers.sampling.sample_teacher` with :meth:`teacher_sigmas`).
        """
        return self.pipeline_class.from_pretrained(
            path, revision=revision, variant=variant, torch_dtype=torch_dtype, **components
        )

    @abstractmethod
    def wrap(self, transformer: nn.Module) -> nn.Module:
        """The plugin wrapper around ``transformer`` (``model(hidden_states=x_t, timestep=t in
        [0, 1], **cond)``), configured by the family's constructor options."""

    @property
    def transformer_components(self) -> tuple[str, ...]:
        """The pipeline components holding the denoiser's weights, in the order
        :meth:`wrap_transformers` takes them (``("transformer",)``; Wan 2.2 A14B adds
        ``"transformer_2"``)."""
        return ("transformer",)

    def wrap_transformers(self, transformers: Sequence[nn.Module]) -> nn.Module:
        """The teacher network from the modules of :attr:`transformer_components` (in that
        order): :meth:`wrap` of the one transformer unless the family has several."""
        if len(transformers) != 1:
            raise ValueError(
                f"{type(self).__name__} wraps one transformer, got {len(transformers)}"
            )
        return self.wrap(transformers[0])

    def default_size(self, pipe: DiffusionPipeline) -> tuple[int, int]:
        """``(height, width)`` the stock pipeline generates when none is given
        (``default_sample_size * vae_scale_factor`` for the image pipelines)."""
        size = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        return size, size

    # -- prompts ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(
        self,
        pipe: DiffusionPipeline,
        prompts: Sequence[str],
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning for ``prompts`` through the pipeline's own text encoders: per-sample
        tensors, batch first, keyed by the wrapper's ``forward`` argument names. The negative
        prompt goes through the same call (as a one-element list) and gets the same keys.
        ``max_sequence_length=None`` is :attr:`default_max_sequence_length`."""
        checked = self._check_prompts(prompts)
        return self._encode_prompts(pipe, checked, self._max_length(max_sequence_length))

    @abstractmethod
    def _encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        """:meth:`encode_prompts` after its checks: ``prompts`` a non-empty list of strings,
        ``max_sequence_length`` a positive int."""

    def _max_length(self, max_sequence_length: int | None) -> int:
        if max_sequence_length is None:
            return self.default_max_sequence_length
        length = int(max_sequence_length)
        if length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        return length

    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise TypeError(
                f"prompts must be a non-empty list of strings, got {prompts!r:.80}"
                + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else "")
            )
        return list(prompts)

    # -- image condition (image-to-video) -------------------------------------------------------

    def encode_condition(
        self,
        pipe: DiffusionPipeline,
        images: torch.Tensor | Sequence[Any],
        height: int,
        width: int,
        num_frames: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample conditioning from one image per sample (families with
        :attr:`condition_image`), keyed by the wrapper's ``forward`` argument names, batch
        first: ``images`` are pixels ``[B, 3, height, width]`` in [-1, 1] (the training data's
        preprocessing) or PIL images, which go through the stock pipeline's own preprocessing
        (resized to ``height x width``) exactly as its ``image=`` argument does."""
        raise ValueError(f"{self.name} generates from prompts only: it takes no condition image")

    # -- media -----------------------------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE posterior latents -> model latents (``vae``: the VAE or its config)."""

    @staticmethod
    @abstractmethod
    def denormalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> VAE decoder input (``vae``: the VAE or its config)."""

    @torch.no_grad()
    def encode_media(self, pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        """Model-space latents (the wrapper's input layout) of ``pixels`` in [-1, 1]
        (``[B, 3, H, W]``, video ``[B, 3, F, H, W]``), through the pipeline's VAE.

        The posterior's mode (its mean) is used, not a sample, so a cache of latents is
        deterministic; the result is in the VAE's dtype.
        """
        z = self._vae_mode(pipe, pixels, frame_axis=self._vae_frame_axis)
        return self.normalize_latents(pipe.vae, z)

    @torch.no_grad()
    def decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` (video ``[B, 3, F, H, W]``) in [0, 1] from model-space
        latents, computed as the stock pipeline does for ``output_type="pt"``."""
        if self._vae_frame_axis and latents.ndim == 4:
            latents = latents.unsqueeze(2)
        z = self.denormalize_latents(pipe.vae, self._vae_input(pipe, latents))
        images = pipe.vae.decode(z, return_dict=False)[0]
        if self._vae_frame_axis:
            images = images[:, :, 0]
        return self._postprocess_images(pipe, images)

    def latent_shape(
        self, pipe: DiffusionPipeline, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        """Per-sample latent shape (no batch axis) for media of ``height x width`` pixels
        (and ``num_frames`` frames for video, :attr:`default_num_frames` when ``None``)."""
        if not self.is_video:
            self._check_image_frames(num_frames)
            return tuple(self._latent_shape(pipe, height, width)[1:])
        frames = self.default_num_frames if num_frames is None else int(num_frames)
        return tuple(self._latent_shape(pipe, height, width, frames)[1:])

    @staticmethod
    @abstractmethod
    def _latent_shape(pipe: DiffusionPipeline, height: int, width: int, *frames: int) -> tuple:
        """The plugin's latent shape with the batch axis first (``frames``: video only)."""

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

    @staticmethod
    def _postprocess_images(pipe: DiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
        # VaeImageProcessor.postprocess(output_type="pt"): (x / 2 + 0.5).clamp(0, 1).
        return pipe.image_processor.postprocess(images, output_type="pt")

    def _check_image_frames(self, num_frames: int | None) -> None:
        if num_frames not in (None, 1):
            raise ValueError(
                f"{self.name} generates images: num_frames must be None (or 1), got {num_frames}"
            )

    # -- validation reference -------------------------------------------------------------------

    def image_seq_len(self, latent_shape: Sequence[int]) -> int:
        """Image tokens the scheduler's dynamic shift sees for per-sample ``latent_shape``: the
        latent grid in 2x2 patches (the patch size of every supported family)."""
        return math.prod(latent_shape[-2:]) // 4

    def teacher_sigmas(
        self, scheduler: Any, num_steps: int, latent_shape: Sequence[int]
    ) -> list[float]:
        """The sigmas the teacher's own flow-matching scheduler visits in ``num_steps`` steps at
        ``latent_shape`` (dynamic shifting resolved), ending with 0: the validation reference."""
        return flow_match_sigmas(scheduler.config, num_steps, self.image_seq_len(latent_shape))

    # -- GAN branch -----------------------------------------------------------------------------

    @abstractmethod
    def attach_feature_capture(
        self, teacher: nn.Module, feature_indices: Sequence[int] | None = None
    ) -> FeatureCapture:
        """Hook the teacher's blocks for the GAN branch (default indices: the plugin's)."""

    @staticmethod
    @abstractmethod
    def _discriminator(
        teacher: nn.Module, feature_indices: Sequence[int] | None, *, hidden_channels: int | None
    ) -> nn.Module:
        """The plugin's discriminator builder (indices resolved by :meth:`build_discriminator`)."""

    def build_discriminator(
        self,
        teacher: nn.Module,
        feature_indices: Sequence[int] | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> nn.Module:
        """Discriminator heads for the captured features. ``feature_indices=None`` takes the
        indices of the capture attached to ``teacher`` (else the plugin's defaults)."""
        if feature_indices is None:
            capture = get_feature_capture(teacher)
            feature_indices = None if capture is None else capture.feature_indices
        return self._discriminator(teacher, feature_indices, hidden_channels=hidden_channels)

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
    def stock_pipeline_kwargs(self, t_list: Sequence[float]) -> dict[str, Any]:
        """Stock-pipeline call arguments for the student (CFG off, the student's steps)."""

    # -- model card -----------------------------------------------------------------------------

    def card_notes(self, *, base_model: str, lora: bool) -> str:
        """Family-specific paragraph(s) of the model card's usage section (Markdown); empty
        when the generic text says everything."""
        return ""

    def card_license(self, base_model: str) -> dict[str, str]:
        """Card metadata (``license``, ``license_name``, ``license_link``) of ``base_model``
        from :attr:`license_hint`; empty when nothing is known."""
        for key, fields in (self.license_hint or {}).items():
            if key in base_model:
                return dict(fields)
        return {}

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
