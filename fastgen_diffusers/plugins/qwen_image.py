"""Qwen-Image plugin: ``QwenImageTransformer2DModel`` in the pipeline's call convention.

What the stock ``QwenImagePipeline`` (diffusers 0.42) does, and what this module mirrors:

- Timestep: the pipeline passes ``scheduler.timesteps / 1000``, i.e. the RF time ``t`` in
  [0, 1], cast to the latents' dtype before the division, and the model scales it itself
  (``Timesteps(..., scale=1000)``). The wrapper rounds ``t`` the same way (bf16:
  0.74925 -> 0.746094); recipes used with it leave ``num_train_timesteps`` null.
- Latents: ``AutoencoderKLQwenImage`` (a Wan-style causal 3-D VAE) encodes an image to
  ``[B, 16, 1, H/8, W/8]``. That 5-D layout is the wrapper's latent layout (a 4-D
  ``[B, C, H, W]`` input is accepted too and answered in 4-D). The transformer sees 2x2
  patches packed into tokens ``[B, (H/2)(W/2), 4C]`` (as Flux), with ``img_shapes`` giving the
  token grid for the rotary embedding.
- Text: Qwen2.5-VL hidden states with a padding mask (``encoder_hidden_states_mask``): prompts
  of different lengths are zero-padded and the mask keeps the padding out of attention. The
  positive and the negative prompt have their own masks.
- CFG: real CFG (``true_cfg_scale`` with a negative prompt), followed by a rescale of each
  token's prediction to the norm of the conditional one (:func:`true_cfg_guidance`).
  :class:`~fastgen_diffusers.DMDPipeline` and :func:`~fastgen_diffusers.sampling.sample_teacher`
  apply plain CFG (DMD2 convention) without that rescale.
- VAE normalisation: per-channel ``latents_mean`` / ``latents_std`` of the VAE config.

Example::

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from fastgen_diffusers import DMDConfig, DMDPipeline, create_fake_score
    from fastgen_diffusers.plugins import qwen_image as qi

    pipe = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image", torch_dtype=torch.bfloat16)
    teacher = qi.QwenImageWrapper(pipe.transformer).requires_grad_(False)
    student = qi.QwenImageWrapper.from_pretrained("Qwen/Qwen-Image", torch_dtype=torch.bfloat16)
    capture = qi.attach_feature_capture(teacher)  # GAN branch: image-stream maps
    disc = qi.build_discriminator(teacher, capture.feature_indices)
    cfg = DMDConfig(guidance_scale=4.0, gan_loss_weight_gen=0.03)
    dmd = DMDPipeline(student, teacher, create_fake_score(teacher), cfg, discriminator=disc)

    c = qi.encode_prompt(pipe, prompts, negative_prompt=" ")
    latents = qi.normalize_latents(pipe.vae, vae_latents)  # [B, 16, 1, h, w]
    losses = dmd.compute_student_loss(
        latents, torch.randn_like(latents), c["encoder_hidden_states"],
        negative_encoder_hidden_states=c["negative_encoder_hidden_states"],
        negative_model_kwargs={
            "encoder_hidden_states_mask": c["negative_encoder_hidden_states_mask"]},
        encoder_hidden_states_mask=c["encoder_hidden_states_mask"],
    )

    # The exported student in the stock pipeline (t_list = the student's rungs, ending in 0):
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        qi.student_scheduler_config(t_list))
    image = pipe(prompt, **qi.stock_pipeline_kwargs(t_list)).images[0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.loaders import QwenImageLoraLoaderMixin
from torch import nn

from ..discriminators import ImageDiTDiscriminator
from ..features import FeatureCapture
from ..features import attach_feature_capture as _attach_feature_capture
from ..sampling import validate_t_list
from .base import Family
from .common import (
    JOINT_ATTENTION_LORA_TARGETS,
    TransformerWrapper,
    cfg_get,
    config_of,
    find_transformer,
    flow_match_student_config,
    inner_dim,
    scaled_initial_latents,
    tokens_to_map,
)
from .registry import register_family

__all__ = [
    "DEFAULT_FEATURE_INDICES",
    "PATCH_SIZE",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QwenImageFamily",
    "QwenImageWrapper",
    "VAE_SCALE_FACTOR",
    "attach_feature_capture",
    "build_discriminator",
    "default_feature_indices",
    "denormalize_latents",
    "encode_prompt",
    "image_tokens_to_map",
    "latent_shape",
    "normalize_latents",
    "pack_latents",
    "pad_prompt_embeds",
    "stock_pipeline_kwargs",
    "student_initial_latents",
    "student_scheduler_config",
    "true_cfg_guidance",
    "unpack_latents",
]

# 2 ** len(AutoencoderKLQwenImage.temperal_downsample) for the released VAE; the pipeline falls
# back to the same value when it has no VAE.
VAE_SCALE_FACTOR = 8
PATCH_SIZE = 2
_FEATURE_FRACTIONS = (0.5, 0.75, 1.0)
_GRID_KEY = "qwen_image_grid"

# scheduler/scheduler_config.json of Qwen/Qwen-Image: resolution-dependent (dynamic) shift and
# a terminal sigma of 0.02. The teacher's schedule; students use student_scheduler_config().
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


# -- packing --------------------------------------------------------------------------------


def _as_4d(latents: torch.Tensor, name: str = "latents") -> tuple[torch.Tensor, bool]:
    """``[B, C, H, W]`` view of a 4-D or single-frame 5-D latent, and whether it was 5-D."""
    if latents.ndim == 5:
        if latents.shape[2] != 1:
            raise ValueError(
                f"{name} of shape {tuple(latents.shape)} has {latents.shape[2]} frames; "
                "Qwen-Image latents are [B, C, 1, H, W] (one frame)"
            )
        return latents[:, :, 0], True
    if latents.ndim == 4:
        return latents, False
    raise ValueError(
        f"{name} must be [B, C, 1, H, W] (the VAE layout) or [B, C, H, W], got shape "
        f"{tuple(latents.shape)}"
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack ``[B, C, 1, H, W]`` (or ``[B, C, H, W]``) latents into 2x2-patch tokens
    ``[B, (H/2)(W/2), 4C]``, in ``QwenImagePipeline._pack_latents`` order (token ``i * W/2 + j``
    holds the patch at rows ``2i, 2i+1`` and columns ``2j, 2j+1``; features ``c * 4 + 2 dy +
    dx``). This is the layout the stock pipeline's ``latents=`` argument takes."""
    x, _ = _as_4d(latents)
    b, c, h, w = x.shape
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(
    tokens: torch.Tensor, height: int, width: int, *, frame_axis: bool = True
) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C]`` -> ``[B, C, 1, H, W]`` (or
    ``[B, C, H, W]`` with ``frame_axis=False``). ``height`` / ``width`` are latent sizes (the
    stock ``_unpack_latents`` takes pixel sizes)."""
    b, n, d = tokens.shape
    if height % PATCH_SIZE or width % PATCH_SIZE or n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not unpack to a {height}x{width} latent "
            f"(expected [B, {(height // 2) * (width // 2)}, 4C])"
        )
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(b, d // 4, height, width)
    return x.unsqueeze(2) if frame_axis else x


def student_initial_latents(noise: torch.Tensor, t_list: Sequence[float]) -> torch.Tensor:
    """Packed ``latents=`` for the stock pipeline that make it start where
    :func:`~fastgen_diffusers.sampling.sample_student` starts: ``t_list[0] * noise`` (in
    float64, as the sampler does). Stock pipelines use the given latents unscaled, so with
    ``t_list[0] < 1`` passing the plain noise would start off the student's first rung."""
    return pack_latents(scaled_initial_latents(noise, t_list))


# -- the wrapper ----------------------------------------------------------------------------


class QwenImageWrapper(TransformerWrapper):
    """``QwenImageTransformer2DModel`` speaking the pipeline convention.

    ``forward(hidden_states=x_t, timestep=t, encoder_hidden_states=..., encoder_hidden_states_mask
    =...)`` takes ``x_t`` as ``[B, C, 1, H, W]`` (the layout ``AutoencoderKLQwenImage``
    produces; ``[B, C, H, W]`` works too) and ``t`` in [0, 1], packs 2x2 patches into tokens,
    builds ``img_shapes``, and returns the flow prediction ``v = eps - x0`` unpacked to the
    input's layout, in the transformer's dtype.

    Args:
        transformer: the diffusers ``QwenImageTransformer2DModel`` (kept as ``.transformer``).

    Timestep precision: ``QwenImagePipeline`` casts ``scheduler.timesteps`` (``1000 sigma``,
    float32) to the latents' dtype and divides by 1000 in it; the transformer casts that to the
    dtype of its ``img_in`` output and its time projection scales it by 1000. The wrapper rounds
    ``t`` the same way in :meth:`compute_dtype`: with fp32 or bf16 weights the time projection
    gets what the stock pipeline of that dtype gives it, and under bf16 autocast with fp32
    weights (``--mixed_precision bf16``) what the bf16 stock pipeline gives it (t = 0.74925 ->
    0.746094, where passing ``t`` unchanged gives 0.75).

    Example::

        model = QwenImageWrapper(pipe.transformer)
        v = model(x_t, t, prompt_embeds, encoder_hidden_states_mask=prompt_mask)
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)

    @classmethod
    def from_pretrained(
        cls, path: str, subfolder: str | None = "transformer", **kwargs: Any
    ) -> QwenImageWrapper:
        """Load the transformer with ``QwenImageTransformer2DModel.from_pretrained`` and wrap it."""
        from diffusers import QwenImageTransformer2DModel

        return cls(QwenImageTransformer2DModel.from_pretrained(path, subfolder=subfolder, **kwargs))

    @property
    def num_channels_latents(self) -> int:
        """Latent channels ``C`` (the transformer reads 2x2 patches: ``in_channels = 4 C``)."""
        return self.transformer.config.in_channels // 4

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Flow prediction for ``x_t`` at RF time ``t``.

        Args:
            hidden_states: ``x_t``, ``[B, C, 1, H, W]`` or ``[B, C, H, W]`` (``H``, ``W`` even).
            timestep: ``t`` in [0, 1], ``[B]`` or a scalar; rounded as the pipeline rounds it
                (see the class docstring); the transformer multiplies by 1000 itself.
            encoder_hidden_states: text embeddings ``[B, L, joint_attention_dim]``.
            encoder_hidden_states_mask: ``[B, L]``, 1 for valid tokens, 0 for padding; ``None``
                when every token is valid.
            **kwargs: forwarded to the transformer (e.g. ``attention_kwargs``);
                ``img_shapes`` is derived from ``hidden_states`` and may not be given.
        """
        if encoder_hidden_states is None:
            raise ValueError(
                "QwenImageWrapper needs encoder_hidden_states (the text stream of the "
                "double-stream blocks); pass the prompt embeddings"
            )
        if "img_shapes" in kwargs:
            raise ValueError("img_shapes is derived from hidden_states; do not pass it")
        if kwargs.pop("return_dict", False):
            raise ValueError("QwenImageWrapper returns a Tensor; return_dict=True is not supported")
        x, five_d = _as_4d(hidden_states, "hidden_states")
        batch, channels, height, width = x.shape
        if 4 * channels != self.transformer.config.in_channels:
            raise ValueError(
                f"hidden_states has {channels} channels; the transformer reads 2x2 patches of "
                f"in_channels/4 = {self.transformer.config.in_channels // 4} channels"
            )
        dtype = self.dtype
        tokens = pack_latents(x.to(dtype))
        t = self._check_timestep(
            timestep, batch, x.device, scaling="the transformer scales it by 1000 itself"
        )
        # One image per sample: (frames, token rows, token columns) for the 3-D RoPE.
        img_shapes = [[(1, height // 2, width // 2)]] * batch
        out = self.transformer(
            hidden_states=tokens,
            timestep=self._pipeline_rounded_t(t),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            img_shapes=img_shapes,
            return_dict=False,
            **kwargs,
        )[0]
        return unpack_latents(out, height, width, frame_axis=five_d)


# -- feature capture ------------------------------------------------------------------------


def _find_transformer(model: nn.Module) -> nn.Module:
    """The module holding ``transformer_blocks`` (the wrapper's transformer, or ``model``)."""
    return find_transformer(
        model,
        lambda module: isinstance(getattr(module, "transformer_blocks", None), nn.ModuleList),
        ValueError,
        "holds no QwenImageTransformer2DModel (no transformer_blocks)",
    )


def _config_of(model_or_config: Any) -> Any:
    return config_of(model_or_config, _find_transformer)


def default_feature_indices(model_or_config: Any) -> tuple[int, ...]:
    """Blocks at 1/2, 3/4 of the depth and the last one (``(30, 45, 59)`` for Qwen-Image's 60)."""
    num_layers = int(cfg_get(_config_of(model_or_config), "num_layers"))
    return tuple(sorted({min(int(num_layers * f), num_layers - 1) for f in _FEATURE_FRACTIONS}))


DEFAULT_FEATURE_INDICES: tuple[int, ...] = default_feature_indices({"num_layers": 60})


def _first_image_grid(img_shapes: Any) -> tuple[int, int, int]:
    """``(frames, rows, cols)`` of the generated image from the transformer's ``img_shapes``:
    ``[[(1, h, w), *condition_images], ...]`` per sample, ``[(1, h, w), ...]`` or ``(1, h, w)``."""
    entry = img_shapes
    while isinstance(entry, (list, tuple)) and entry and not isinstance(entry[0], int):
        entry = entry[0]
    if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
        raise ValueError(f"Cannot read an image grid (frames, rows, cols) from {img_shapes!r}")
    return int(entry[0]), int(entry[1]), int(entry[2])


def image_tokens_to_map(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Fold image tokens ``[B, N, D]`` into a map ``[B, D, h, w]`` (``grid = (1, h, w)``).

    Token ``i * w + j`` lands at ``[:, :, i, j]`` (the packing order). Only the first ``h * w``
    tokens are read: in the edit pipelines condition images follow the generated one.
    """
    frames, h, w = (int(g) for g in grid)
    if frames != 1:
        raise ValueError(f"image grid {tuple(grid)} has {frames} frames; expected 1")
    if tokens.ndim != 3 or tokens.shape[1] < h * w:
        raise ValueError(
            f"image tokens of shape {tuple(tokens.shape)} cannot hold a {h}x{w} token grid"
        )
    return tokens_to_map(tokens[:, : h * w], (h, w), "image")


def _note_grid(args: tuple, kwargs: dict, capture: FeatureCapture) -> None:
    # forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
    # img_shapes, ...): the stock pipeline and the wrapper pass it by keyword.
    img_shapes = kwargs.get("img_shapes", args[4] if len(args) > 4 else None)
    capture.meta[_GRID_KEY] = None if img_shapes is None else _first_image_grid(img_shapes)


def _image_stream_map(output: Any, capture: FeatureCapture) -> torch.Tensor:
    # QwenImageTransformerBlock returns (encoder_hidden_states, hidden_states): text, then image.
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise TypeError(
            "expected a QwenImageTransformerBlock output (encoder_hidden_states, hidden_states), "
            f"got {type(output).__name__}"
        )
    grid = capture.meta.get(_GRID_KEY)
    if grid is None:
        raise RuntimeError(
            "The image token grid of the current forward is unknown: the transformer was "
            "called without img_shapes"
        )
    return image_tokens_to_map(output[1], grid)


def attach_feature_capture(
    model: nn.Module, feature_indices: Sequence[int] | None = None
) -> FeatureCapture:
    """Hook ``transformer_blocks[i]`` of ``model`` (a :class:`QwenImageWrapper` or the raw
    transformer) and capture their image-token stream as maps ``[B, inner_dim, H/2, W/2]`` for
    latents ``[B, C, 1, H, W]``.

    ``feature_indices`` defaults to :func:`default_feature_indices`. The token grid is read
    from ``img_shapes`` before each transformer forward, so non-square inputs fold correctly
    whether the stock pipeline or the wrapper calls the transformer.
    """
    transformer = _find_transformer(model)
    indices = (
        default_feature_indices(transformer.config)
        if feature_indices is None
        else tuple(feature_indices)
    )
    capture = _attach_feature_capture(
        transformer, indices, blocks="transformer_blocks", transform=_image_stream_map
    )
    capture.add_input_hook(transformer, _note_grid)
    return capture


def build_discriminator(
    model_or_config: Any,
    feature_indices: Sequence[int] | None = None,
    *,
    hidden_channels: int | None = None,
) -> ImageDiTDiscriminator:
    """An :class:`~fastgen_diffusers.ImageDiTDiscriminator` for the captured maps: one head per
    index, ``num_attention_heads * attention_head_dim`` input channels each."""
    config = _config_of(model_or_config)
    indices = default_feature_indices(config) if feature_indices is None else tuple(feature_indices)
    return ImageDiTDiscriminator(
        inner_dim(config), len(set(indices)), hidden_channels=hidden_channels
    )


# -- pipeline glue --------------------------------------------------------------------------


def pad_prompt_embeds(
    embeds: torch.Tensor, mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[B, L, D]`` embeddings to ``length`` tokens and return them with a ``[B,
    length]`` mask (``None`` = all valid), as the pipeline pads prompts of a batch.

    Padding with a mask leaves the model's output unchanged; use it to give the positive and
    the negative prompt one length (``DMDPipeline(batch_cfg=True)``) or to collate prompts.
    """
    b, n, d = embeds.shape
    if length < n:
        raise ValueError(f"cannot pad {n} tokens to length={length}")
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
    if mask.shape != (b, n):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match embeds [{b}, {n}, ...]")
    embeds = torch.cat([embeds, embeds.new_zeros(b, length - n, d)], dim=1)
    mask = torch.cat([mask, mask.new_zeros(b, length - n)], dim=1)
    return embeds, mask


def encode_prompt(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    device: torch.device | str | None = None,
    num_images_per_prompt: int = 1,
    max_sequence_length: int = 512,
    pad_to_same_length: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Encode prompts with ``QwenImagePipeline.encode_prompt`` (Qwen2.5-VL, chat template).

    Returns ``{"encoder_hidden_states", "encoder_hidden_states_mask",
    "negative_encoder_hidden_states", "negative_encoder_hidden_states_mask"}``. A mask is
    ``None`` when every token is valid (what the pipeline does); the negative entries are
    ``None`` without ``negative_prompt`` (the official examples use ``" "``). A single negative
    string is repeated for every prompt. ``num_images_per_prompt`` repeats each prompt's
    embeddings and mask together (``repeat_interleave``; the pipeline's own repeat of the mask
    is only right for one prompt). ``pad_to_same_length`` pads both to a common length with
    tensor masks, as ``DMDPipeline(batch_cfg=True)`` needs. Use with the DMD pipeline::

        c = encode_prompt(pipe, prompts, negative_prompt=" ")
        dmd.compute_student_loss(latents, noise, c["encoder_hidden_states"],
            negative_encoder_hidden_states=c["negative_encoder_hidden_states"],
            negative_model_kwargs={
                "encoder_hidden_states_mask": c["negative_encoder_hidden_states_mask"]},
            encoder_hidden_states_mask=c["encoder_hidden_states_mask"])
    """
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")

    def _encode(text: str | list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, mask = pipe.encode_prompt(
            prompt=text,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        if num_images_per_prompt > 1:
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
            mask = None if mask is None else mask.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, mask

    embeds, mask = _encode(prompt)
    neg, neg_mask = None, None
    if negative_prompt is not None:
        if isinstance(prompt, list) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        neg, neg_mask = _encode(negative_prompt)
        if neg.shape[0] != embeds.shape[0]:
            raise ValueError(
                f"negative_prompt gives {neg.shape[0]} embeddings for {embeds.shape[0]} prompts: "
                "pass one negative prompt, or one per prompt"
            )
        if pad_to_same_length:
            length = max(embeds.shape[1], neg.shape[1])
            embeds, mask = pad_prompt_embeds(embeds, mask, length)
            neg, neg_mask = pad_prompt_embeds(neg, neg_mask, length)
    return {
        "encoder_hidden_states": embeds,
        "encoder_hidden_states_mask": mask,
        "negative_encoder_hidden_states": neg,
        "negative_encoder_hidden_states_mask": neg_mask,
    }


def true_cfg_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, true_cfg_scale: float
) -> torch.Tensor:
    """``QwenImagePipeline``'s real CFG on latent-layout predictions: ``uncond + s (cond -
    uncond)``, then each 2x2-patch token rescaled to the norm of the conditional prediction
    (the pipeline takes the norm over the packed feature axis, i.e. C channels x 2 x 2).

    This is what the stock teacher samples with; ``DMDPipeline`` / ``sample_teacher`` use plain
    CFG without the rescale (the DMD2 recipe).
    """
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} must have one shape"
        )
    x, five_d = _as_4d(cond, "cond")
    height, width = x.shape[-2:]
    cond_t, uncond_t = pack_latents(cond), pack_latents(uncond)
    comb = uncond_t + true_cfg_scale * (cond_t - uncond_t)
    cond_norm = torch.norm(cond_t, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return unpack_latents(comb * (cond_norm / comb_norm), height, width, frame_axis=five_d)


def _vae_config(vae: Any) -> Any:
    return getattr(vae, "config", vae)


def _mean_std(vae: Any, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = _vae_config(vae)
    z_dim = int(cfg_get(config, "z_dim"))
    if latents.ndim not in (4, 5) or latents.shape[1] != z_dim:
        raise ValueError(
            f"latents of shape {tuple(latents.shape)} do not match the VAE's z_dim={z_dim} "
            "([B, z_dim, 1, H, W] or [B, z_dim, H, W])"
        )
    shape = (1, z_dim) + (1,) * (latents.ndim - 2)
    # Same construction as the pipeline: float32 lists cast to the latents' dtype.
    mean = torch.tensor(cfg_get(config, "latents_mean")).view(shape)
    std = torch.tensor(cfg_get(config, "latents_std")).view(shape)
    return mean.to(latents.device, latents.dtype), std.to(latents.device, latents.dtype)


def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> model space: ``(z - mean) * (1 / std)`` per channel, as the Qwen-Image
    img2img / edit pipelines compute it after ``vae.encode``. ``vae`` or its config."""
    mean, std = _mean_std(vae, latents)
    return (latents - mean) * (1.0 / std)


def denormalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> VAE latents: ``z / (1 / std) + mean``, exactly as
    ``QwenImagePipeline`` computes it before ``vae.decode`` (give ``[B, C, 1, H, W]`` to the
    VAE)."""
    mean, std = _mean_std(vae, latents)
    return latents / (1.0 / std) + mean


def latent_shape(
    model_or_pipe: Any, height: int, width: int, batch_size: int = 1
) -> tuple[int, int, int, int, int]:
    """``(B, C, 1, H, W)`` latents for a ``height`` x ``width`` image: ``H = height / 8`` (the
    VAE's factor) and ``C = in_channels / 4`` as ``QwenImagePipeline.prepare_latents`` (before
    packing). ``model_or_pipe``: the pipeline, the wrapper, the transformer or its config."""
    vae_scale_factor = int(getattr(model_or_pipe, "vae_scale_factor", VAE_SCALE_FACTOR))
    in_channels = int(cfg_get(_config_of(model_or_pipe), "in_channels"))
    multiple = vae_scale_factor * PATCH_SIZE
    if height % multiple or width % multiple:
        raise ValueError(
            f"height={height} and width={width} must be multiples of {multiple} (VAE factor "
            f"{vae_scale_factor} x 2x2 packing); the stock pipeline would round them down"
        )
    return (
        int(batch_size),
        in_channels // 4,
        1,
        height // vae_scale_factor,
        width // vae_scale_factor,
    )


# -- stock-pipeline inference ---------------------------------------------------------------


def student_scheduler_config(
    t_list: Sequence[float],
    sample_type: str = "ode",
    base_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` config under which ``QwenImagePipeline`` visits
    exactly the student's rungs (ship it as ``scheduler/scheduler_config.json``).

    ``QwenImagePipeline`` always computes ``mu`` from the packed sequence length and calls
    ``set_timesteps(sigmas=..., mu=mu)`` (with ``np.linspace(1, 1/N, N)`` when no ``sigmas``
    are given); ``set_timesteps`` shifts the sigmas (dynamic shift with ``mu``, else the static
    ``shift``), stretches them to ``shift_terminal`` and appends the final 0. With
    ``use_dynamic_shifting=False``, ``shift=1.0`` and no ``shift_terminal`` (nor Karras /
    exponential / beta sigmas) the custom ``sigmas=t_list[:-1]`` of
    :func:`stock_pipeline_kwargs` are used as given and the schedule is ``t_list``. There is no
    config-only route: the pipeline's default sigmas are ``linspace(1, 1/N, N)``.

    ``ode`` is the Euler step, equal to :func:`~fastgen_diffusers.sampling.sample_student`'s
    ODE transition. ``sde`` sets ``stochastic_sampling=True`` (predict x0, re-noise with fresh
    noise). ``QwenImagePipeline`` does not pass its ``generator`` to ``scheduler.step``: SDE
    noise comes from the global torch RNG (seed it with ``torch.manual_seed``), drawn in the
    packed ``[B, N, 4C]`` layout, so the same seed lands the same numbers on other latent
    positions than ``sample_student`` on ``[B, C, 1, H, W]`` noise (same distribution).

    ``base_config`` (e.g. the teacher's ``pipe.scheduler.config``, default
    :data:`QWEN_IMAGE_SCHEDULER_CONFIG`) is copied and the settings above override it; its
    private keys (``_use_default_values`` would reset the overrides on load) are dropped.
    """
    base = QWEN_IMAGE_SCHEDULER_CONFIG if base_config is None else base_config
    # The pipeline divides scheduler timesteps by a hard-coded 1000.
    return flow_match_student_config(t_list, sample_type, base, num_train_timesteps=1000)


def stock_pipeline_kwargs(t_list: Sequence[float]) -> dict[str, Any]:
    """``QwenImagePipeline.__call__`` kwargs that run the student over ``t_list`` (with the
    scheduler of :func:`student_scheduler_config`).

    ``sigmas`` are the rungs without the final 0 (the scheduler appends it; the pipeline then
    ignores ``num_inference_steps``). Real CFG is off (``true_cfg_scale=1.0``: the pipeline's
    default is 4.0, active as soon as a negative prompt is given) and ``guidance_scale`` stays
    ``None`` (Qwen-Image has no guidance embedding). Stock pipelines start from the latents as
    given while :func:`~fastgen_diffusers.sampling.sample_student` starts at ``t_list[0] *
    noise``: for an exact match pass ``latents=student_initial_latents(noise, t_list)``
    (identical to packed noise when ``t_list[0] == 1``).
    """
    t_list = validate_t_list(t_list)
    return {
        "sigmas": t_list[:-1],
        "num_inference_steps": len(t_list) - 1,
        "true_cfg_scale": 1.0,
        "guidance_scale": None,
    }


# -- the family ---------------------------------------------------------------------------------


@register_family
class QwenImageFamily(Family):
    """``QwenImagePipeline`` for the training machinery.

    Conditioning: ``encoder_hidden_states`` (Qwen2.5-VL hidden states) zero-padded to
    ``max_sequence_length`` tokens and ``encoder_hidden_states_mask`` (``[B, L]``, 1 on valid
    tokens; all ones where the pipeline would pass ``None``), so every prompt has the same
    length and keys. Latents are the VAE's ``[B, C, 1, H, W]``.

    Example::

        family = QwenImageFamily()
        cond = family.encode_prompts(pipe, ["a cat"], max_sequence_length=256)
        latents = family.encode_media(pipe, pixels)   # [B, 16, 1, H/8, W/8]
    """

    name = "qwen_image"
    pipeline_class = QwenImagePipeline
    transformer_class = QwenImageTransformer2DModel
    is_video = False
    default_max_sequence_length = 512
    max_sequence_length_limit = 1024  # QwenImagePipeline.check_inputs
    text_components = ("text_encoder", "tokenizer")
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS + (
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )
    lora_loader_class = QwenImageLoraLoaderMixin
    pipeline_tag = "text-to-image"
    # The Qwen-Image VAE is a causal video VAE: an image is one frame, [B, 3, 1, H, W].
    _vae_frame_axis = True

    # The rest of the contract is this module's functions.
    normalize_latents = staticmethod(normalize_latents)
    denormalize_latents = staticmethod(denormalize_latents)
    attach_feature_capture = staticmethod(attach_feature_capture)
    student_scheduler_config = staticmethod(student_scheduler_config)
    stock_pipeline_kwargs = staticmethod(stock_pipeline_kwargs)
    _discriminator = staticmethod(build_discriminator)
    _latent_shape = staticmethod(latent_shape)

    def wrap(self, transformer: nn.Module) -> QwenImageWrapper:
        return QwenImageWrapper(transformer)

    def _encode_prompts(
        self, pipe: Any, prompts: list[str], max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        length = max_sequence_length
        if length > self.max_sequence_length_limit:
            raise ValueError(
                f"max_sequence_length={length} exceeds QwenImagePipeline's limit of "
                f"{self.max_sequence_length_limit}"
            )
        emb = encode_prompt(pipe, prompts, max_sequence_length=length)
        # The pipeline pads to the longest prompt of the call; padding every call to one length
        # (masked, so the model output is unchanged) lets samples of any batches collate.
        embeds, mask = pad_prompt_embeds(
            emb["encoder_hidden_states"], emb["encoder_hidden_states_mask"], length
        )
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
