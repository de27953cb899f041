"""Flux.1 plugin: ``FluxTransformer2DModel`` in the pipeline's call convention, GAN feature
capture, and the glue to train on and export for ``FluxPipeline``.

Facts this module relies on (diffusers 0.42, ``transformer_flux.py`` / ``pipeline_flux.py``):

- ``FluxPipeline`` calls the transformer with ``timestep = scheduler_t / 1000`` (t in [0, 1]); the
  transformer multiplies ``timestep`` and ``guidance`` by 1000 itself.
- Latents ``[B, C, H, W]`` are packed 2x2 into tokens ``[B, (H/2)(W/2), 4C]`` (row-major over the
  ``(H/2, W/2)`` grid); ``img_ids`` ``[(H/2)(W/2), 3]`` hold ``(0, row, col)``, ``txt_ids`` are
  zeros ``[S, 3]``.
- Flux-dev (``guidance_embeds=True``) takes the guidance scale as an embedded input (3.5 typical)
  instead of real CFG; Flux-schnell has no guidance embedding. ``pooled_projections`` (CLIP
  pooled output) is always required.
- Double-stream and single-stream blocks both return ``(encoder_hidden_states, hidden_states)``;
  the second item is the image stream.
- The VAE latents are normalised as ``(x - shift_factor) * scaling_factor``.

Example::

    from diffusers import FluxPipeline
    from fastgen_diffusers.plugins import flux

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    teacher = flux.FluxWrapper(pipe.transformer, guidance_scale=3.5)
    cond = flux.encode_prompt(pipe, ["a photo of a cat"])
    noise = torch.randn(flux.latent_shape(pipe, 1024, 1024, batch_size=1))
    flow = teacher(noise, torch.ones(1), cond["encoder_hidden_states"],
                   pooled_projections=cond["pooled_projections"])      # [1, 16, 128, 128]

    capture = flux.attach_feature_capture(teacher)          # GAN branch features
    disc = flux.build_discriminator(teacher)

    # Exported 4-step student, run in the stock pipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler

    t_list = [0.999, 0.75, 0.5, 0.25, 0.0]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        flux.student_scheduler_config(t_list, base_config=pipe.scheduler.config))
    image = pipe("a photo of a cat", **flux.stock_pipeline_kwargs(t_list)).images[0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from torch import nn

from ..discriminators import ImageDiTDiscriminator
from ..features import FeatureCapture, get_feature_capture
from ..features import attach_feature_capture as _attach_blocks
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
    "FluxFamily",
    "FluxWrapper",
    "attach_feature_capture",
    "build_discriminator",
    "default_feature_indices",
    "denormalize_latents",
    "encode_prompt",
    "latent_image_ids",
    "latent_shape",
    "normalize_latents",
    "pack_latents",
    "stock_pipeline_kwargs",
    "student_initial_latents",
    "student_scheduler_config",
    "unpack_latents",
]

# Flux.1 dev / schnell: 19 double-stream + 38 single-stream blocks, indexed as one list
# (double first). Half-way, three quarters and the last block, like the Wan recipe's
# (15, 22, 29) of 30 blocks.
DEFAULT_FEATURE_INDICES: tuple[int, ...] = (28, 42, 56)
_FEATURE_FRACTIONS = (0.5, 0.75, 1.0)


# -- packing --------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` latents to Flux tokens ``[B, (H/2)(W/2), 4C]``
    (``FluxPipeline._pack_latents``).

    Token ``i * (W/2) + j`` holds the 2x2 patch at rows ``2i, 2i+1`` / columns ``2j, 2j+1``,
    channel-major (``c * 4 + 2 * di + dj``).
    """
    if latents.ndim != 4:
        raise ValueError(f"pack_latents expects [B, C, H, W] latents, got {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 patches: latent H and W must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (H/2)(W/2), 4C]`` to ``[B, C, H, W]``.

    ``height`` / ``width`` are the LATENT sizes (the pipeline's ``_unpack_latents`` takes pixels
    and the VAE scale factor instead).
    """
    b, n, d = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(
            f"Cannot unpack tokens {tuple(tokens.shape)} to a {height}x{width} latent: expected "
            f"{(height // 2) * (width // 2)} tokens of 4*C channels and even sizes"
        )
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(
    grid_height: int,
    grid_width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` = ``(0, row, col)`` of the packed token grid
    (``FluxPipeline._prepare_latent_image_ids``). float32 keeps rows/cols exact at any size."""
    rows = torch.arange(grid_height, device=device, dtype=dtype)
    cols = torch.arange(grid_width, device=device, dtype=dtype)
    ids = torch.zeros(grid_height, grid_width, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(grid_height * grid_width, 3)


# -- wrapper --------------------------------------------------------------------------------


class FluxWrapper(TransformerWrapper):
    """``FluxTransformer2DModel`` speaking the pipeline convention.

    ``forward(hidden_states=x_t [B, C, H, W], timestep=t in [0, 1] [B], encoder_hidden_states
    [B, S, D], pooled_projections [B, P], guidance=None)`` packs ``x_t`` into tokens, builds
    ``img_ids`` / ``txt_ids``, embeds the guidance value (guidance-distilled checkpoints only) and
    returns the flow prediction ``eps - x0`` unpacked to ``[B, C, H, W]`` in the transformer's
    dtype (inputs are cast to it; weights are never upcast).

    Args:
        transformer: the diffusers transformer (kept as ``self.transformer``).
        guidance_scale: embedded guidance used when ``forward`` gets ``guidance=None``; only read
            when ``transformer.config.guidance_embeds`` (Flux-dev). 3.5 is FluxPipeline's
            default.

    Timestep precision: ``FluxPipeline`` casts ``scheduler.timesteps`` (``1000 sigma``, float32)
    to the latents' dtype and divides by 1000 in it; the transformer casts that to the dtype of
    its ``x_embedder`` output and multiplies by 1000. The wrapper rounds ``t`` the same way in
    :meth:`compute_dtype`: with fp32 or bf16 weights the time projection gets what the stock
    pipeline of that dtype gives it; under bf16 autocast with fp32 weights (``--mixed_precision
    bf16``) it gets what the bf16 stock pipeline gives it (t = 0.749 -> 748, not 752), as the
    autocast model then computes in bf16. ``guidance`` goes in as float32, as in the pipeline.

    Example::

        teacher = FluxWrapper(pipe.transformer, guidance_scale=3.5)
        v = teacher(x_t, t, prompt_embeds, pooled_projections=pooled)
    """

    def __init__(self, transformer: nn.Module, guidance_scale: float | None = 3.5) -> None:
        patch_size = getattr(transformer.config, "patch_size", 1)
        if patch_size != 1:
            # FluxPipeline packs 2x2 patches itself and expects a patch_size=1 transformer.
            raise ValueError(
                f"FluxWrapper expects transformer.config.patch_size=1, got {patch_size}"
            )
        super().__init__(transformer)
        self.guidance_scale = guidance_scale

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        subfolder: str | None = "transformer",
        *,
        guidance_scale: float | None = 3.5,
        **kwargs: Any,
    ) -> FluxWrapper:
        """Load ``FluxTransformer2DModel`` (``kwargs`` go to ``from_pretrained``) and wrap it."""
        transformer = FluxTransformer2DModel.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return cls(transformer, guidance_scale=guidance_scale)

    def _guidance(
        self, guidance: float | torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            if guidance is not None:
                raise ValueError(
                    f"guidance={guidance!r} was passed, but this transformer has no guidance "
                    "embedding (config.guidance_embeds=False, e.g. Flux-schnell); pass "
                    "guidance=None"
                )
            return None
        if guidance is None:
            guidance = self.guidance_scale
        if guidance is None:
            raise ValueError(
                "This transformer embeds a guidance value (config.guidance_embeds=True, e.g. "
                "Flux-dev): pass guidance=... or build FluxWrapper(..., guidance_scale=3.5)"
            )
        # float32 like FluxPipeline (torch.full([1], guidance_scale, dtype=torch.float32)).
        g = torch.as_tensor(guidance, device=device, dtype=torch.float32)
        if g.ndim == 0:
            return g.expand(batch)
        if g.shape != (batch,):
            raise ValueError(
                f"guidance must be a float or a [{batch}] tensor, got {tuple(g.shape)}"
            )
        return g

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        guidance: float | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Flow prediction ``[B, C, H, W]`` for ``x_t`` at ``t`` in [0, 1].

        ``kwargs`` go to the transformer (``txt_ids``, ``joint_attention_kwargs``, controlnet
        residuals); ``txt_ids`` defaults to zeros as in ``FluxPipeline.encode_prompt``.
        """
        if hidden_states.ndim != 4:
            raise ValueError(
                f"FluxWrapper expects latents [B, C, H, W], got {tuple(hidden_states.shape)}"
            )
        if encoder_hidden_states is None or pooled_projections is None:
            raise ValueError(
                "Flux needs encoder_hidden_states (T5 embeddings) and pooled_projections (CLIP "
                "pooled embeddings)"
            )
        for name in ("img_ids", "return_dict"):
            if name in kwargs:
                raise TypeError(f"FluxWrapper builds {name!r} itself; do not pass it")
        batch, _, height, width = hidden_states.shape
        device, dtype = hidden_states.device, self.dtype
        t = self._check_timestep(
            timestep, batch, device, scaling="the transformer scales it by 1000 itself"
        )

        # FluxPipeline passes scheduler timesteps (t * 1000, fp32) cast to the latents dtype and
        # divided by 1000; the transformer multiplies by 1000 again in the dtype of its
        # x_embedder output (the autocast dtype under autocast).
        timestep = self._pipeline_rounded_t(t)

        txt_ids = kwargs.pop("txt_ids", None)
        if txt_ids is None:
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=device)
        img_ids = latent_image_ids(height // 2, width // 2, device=device)
        out = self.transformer(
            hidden_states=pack_latents(hidden_states).to(dtype),
            timestep=timestep,
            guidance=self._guidance(guidance, batch, device),
            pooled_projections=pooled_projections.to(dtype),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
            **kwargs,
        )[0]
        return unpack_latents(out, height, width)


# -- feature capture ------------------------------------------------------------------------


def _is_flux_transformer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "transformer_blocks", None), nn.ModuleList) and isinstance(
        getattr(module, "single_transformer_blocks", None), nn.ModuleList
    )


def _find_transformer(model: nn.Module) -> nn.Module:
    return find_transformer(
        model,
        _is_flux_transformer,
        TypeError,
        "is neither a FluxTransformer2DModel nor a wrapper around one (no transformer_blocks + "
        "single_transformer_blocks found)",
    )


def _flux_config(model_or_config: Any) -> Any:
    return config_of(model_or_config, _find_transformer)


def default_feature_indices(config: Any) -> tuple[int, ...]:
    """Blocks at 1/2, 3/4 and the end of the depth, counting double-stream blocks first and then
    single-stream blocks (``DEFAULT_FEATURE_INDICES`` for Flux.1's 19 + 38)."""
    n = int(cfg_get(config, "num_layers")) + int(cfg_get(config, "num_single_layers"))
    if n < 1:
        raise ValueError("The transformer has no blocks to capture features from")
    return tuple(sorted({int(f * (n - 1) + 0.5) for f in _FEATURE_FRACTIONS}))


def _note_token_grid(args: tuple, kwargs: dict, capture: FeatureCapture) -> None:
    # Runs before every transformer forward (wrapper or raw pipeline call alike): keep the
    # inputs that define the token grid; the grid itself is read lazily while recording.
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    img_ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
    capture.meta["flux_num_image_tokens"] = hidden_states.shape[1]
    capture.meta["flux_img_ids"] = img_ids
    capture.meta["flux_grid"] = None


def _token_grid(capture: FeatureCapture) -> tuple[int, int]:
    grid = capture.meta.get("flux_grid")
    if grid is not None:
        return grid
    ids = capture.meta.get("flux_img_ids")
    if ids is None:
        raise RuntimeError(
            "Flux feature capture saw no img_ids: the transformer forward did not run"
        )
    ids = ids[0] if ids.ndim == 3 else ids
    num_tokens = capture.meta["flux_num_image_tokens"]
    rows, cols = (int(v) + 1 for v in ids[:, 1:].amax(dim=0).tolist())
    if rows * cols != num_tokens or ids.shape[0] != num_tokens:
        raise ValueError(
            f"img_ids describe a {rows}x{cols} grid but the input has {num_tokens} image tokens; "
            "Flux feature maps need plain text-to-image token grids"
        )
    capture.meta["flux_grid"] = (rows, cols)
    return rows, cols


def _image_stream_map(output: Any, capture: FeatureCapture) -> torch.Tensor:
    """Block output to the image-stream map ``[B, inner_dim, H/2, W/2]``."""
    num_tokens = capture.meta["flux_num_image_tokens"]
    if isinstance(output, (tuple, list)):
        image = output[1]  # (encoder_hidden_states, hidden_states) for both block types
    else:
        image = output[:, -num_tokens:]  # older single blocks returned the [text, image] concat
    rows, cols = _token_grid(capture)
    if image.shape[1] != num_tokens:
        raise RuntimeError(f"Captured {image.shape[1]} tokens, expected {num_tokens} image tokens")
    return tokens_to_map(image, (rows, cols), "image")


def attach_feature_capture(
    model: nn.Module, feature_indices: Sequence[int] | None = None
) -> FeatureCapture:
    """Hook image-stream features of a Flux transformer (or a :class:`FluxWrapper` around one).

    Blocks are indexed as one list: ``transformer_blocks`` (double-stream) first, then
    ``single_transformer_blocks``. Each captured feature is the block's image stream folded to
    ``[B, inner_dim, H/2, W/2]`` (``H, W`` the latent size), the text tokens dropped. The capture
    lives on the transformer, so :func:`fastgen_diffusers.features.get_feature_capture` finds it
    through the wrapper, DDP or ``torch.compile``.
    """
    transformer = _find_transformer(model)
    indices = (
        default_feature_indices(transformer.config) if feature_indices is None else feature_indices
    )
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    capture = _attach_blocks(transformer, indices, blocks=blocks, transform=_image_stream_map)
    capture.add_input_hook(transformer, _note_token_grid)
    return capture


def build_discriminator(
    model_or_config: Any, feature_indices: Sequence[int] | None = None, **kwargs: Any
) -> ImageDiTDiscriminator:
    """:class:`ImageDiTDiscriminator` sized for Flux features (``inner_dim`` channels, one head
    per captured block). ``kwargs`` go to the discriminator (e.g. ``hidden_channels``)."""
    config = _flux_config(model_or_config)
    if feature_indices is None:
        capture_indices = None
        if isinstance(model_or_config, nn.Module):
            capture = get_feature_capture(model_or_config)
            capture_indices = capture.feature_indices if capture is not None else None
        feature_indices = capture_indices or default_feature_indices(config)
    return ImageDiTDiscriminator(inner_dim(config), len(set(feature_indices)), **kwargs)


# -- pipeline glue ---------------------------------------------------------------------------


@torch.no_grad()
def encode_prompt(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    prompt_2: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    device: torch.device | str | None = None,
    num_images_per_prompt: int = 1,
    max_sequence_length: int = 512,
) -> dict[str, torch.Tensor | None]:
    """Encode prompts with ``FluxPipeline.encode_prompt`` (CLIP pooled + T5 sequence).

    Returns ``{"encoder_hidden_states", "pooled_projections", "negative_encoder_hidden_states",
    "negative_pooled_projections"}``; the negative entries are ``None`` without
    ``negative_prompt`` (Flux-dev uses embedded guidance, not real CFG). A single negative string
    is repeated for every prompt. Flux has no text attention mask (T5 pads to
    ``max_sequence_length``). Use with :class:`~fastgen_diffusers.DMDPipeline`::

        c = encode_prompt(pipe, prompts, negative_prompt="")
        dmd.compute_student_loss(latents, noise, c["encoder_hidden_states"],
            negative_encoder_hidden_states=c["negative_encoder_hidden_states"],
            negative_model_kwargs={"pooled_projections": c["negative_pooled_projections"]},
            pooled_projections=c["pooled_projections"])
    """
    kwargs = dict(
        device=device,
        num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_sequence_length,
    )
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, **kwargs)
    out: dict[str, torch.Tensor | None] = {
        "encoder_hidden_states": embeds,
        "pooled_projections": pooled,
        "negative_encoder_hidden_states": None,
        "negative_pooled_projections": None,
    }
    if negative_prompt is not None:
        if isinstance(prompt, list) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        if isinstance(prompt, list) and isinstance(negative_prompt_2, str):
            negative_prompt_2 = [negative_prompt_2] * len(prompt)
        neg, neg_pooled, _ = pipe.encode_prompt(
            prompt=negative_prompt, prompt_2=negative_prompt_2, **kwargs
        )
        if neg.shape != embeds.shape:
            raise ValueError(
                f"negative_prompt gives embeddings {tuple(neg.shape)}, the prompt "
                f"{tuple(embeds.shape)}: pass one negative prompt per prompt"
            )
        out["negative_encoder_hidden_states"] = neg
        out["negative_pooled_projections"] = neg_pooled
    return out


def _vae_factors(vae: Any) -> tuple[float, float]:
    config = getattr(vae, "config", vae)
    scaling = cfg_get(config, "scaling_factor")
    try:
        shift = cfg_get(config, "shift_factor")
    except (KeyError, AttributeError):
        shift = None
    return float(scaling), float(shift or 0.0)


def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE-encoder output to model space: ``(x - shift_factor) * scaling_factor`` (as
    ``FluxImg2ImgPipeline._encode_vae_image``). ``vae`` may be the VAE or its config."""
    scaling, shift = _vae_factors(vae)
    return (latents - shift) * scaling


def denormalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model space to VAE-decoder input: ``x / scaling_factor + shift_factor`` (as
    ``FluxPipeline`` before ``vae.decode``)."""
    scaling, shift = _vae_factors(vae)
    return latents / scaling + shift


def latent_shape(
    config_or_pipe: Any,
    height: int,
    width: int,
    batch_size: int = 1,
    *,
    vae_scale_factor: int | None = None,
) -> tuple[int, int, int, int]:
    """``(B, C, H, W)`` of the (unpacked) latents for a ``height x width`` image.

    ``config_or_pipe``: a ``FluxPipeline`` (its ``vae_scale_factor`` is used) or a transformer /
    wrapper / config (``vae_scale_factor`` defaults to 8, Flux's VAE). Sizes round down to a
    multiple of ``2 * vae_scale_factor`` exactly as ``FluxPipeline.prepare_latents`` does.
    """
    if hasattr(config_or_pipe, "vae_scale_factor") and hasattr(config_or_pipe, "transformer"):
        config = config_or_pipe.transformer.config
        factor = vae_scale_factor or config_or_pipe.vae_scale_factor
    else:
        config = _flux_config(config_or_pipe)
        factor = vae_scale_factor or 8
    channels = int(cfg_get(config, "in_channels")) // 4
    return (
        batch_size,
        channels,
        2 * (int(height) // (factor * 2)),
        2 * (int(width) // (factor * 2)),
    )


# -- stock-pipeline inference for a distilled student ---------------------------------------


def student_scheduler_config(
    t_list: Sequence[float],
    sample_type: str = "ode",
    base_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``FlowMatchEulerDiscreteScheduler`` config under which ``FluxPipeline`` visits exactly the
    student's rungs (ship it as ``scheduler/scheduler_config.json``).

    ``FluxPipeline`` always computes ``mu`` from the image sequence length and hands custom
    ``sigmas`` to ``set_timesteps``, which shifts them (dynamic or static) before use and then
    appends the final 0. With ``use_dynamic_shifting=False`` and ``shift=1.0`` the shift is the
    identity and ``mu`` is ignored, so ``sigmas=t_list[:-1]`` (:func:`stock_pipeline_kwargs`)
    become the schedule ``t_list``. ``ode`` is the Euler step (=
    :func:`~fastgen_diffusers.sampling.sample_student`'s ODE transition); ``sde`` sets
    ``stochastic_sampling=True`` (predict x0, re-noise with fresh noise). Note ``FluxPipeline``
    does not pass its ``generator`` to ``scheduler.step``: SDE noise comes from the global
    torch RNG, drawn in the packed ``[B, N, 4C]`` layout (so a seed reproduces
    ``sample_student`` only when it samples in that layout too).

    ``base_config`` (e.g. the teacher's ``pipe.scheduler.config``) is copied and the settings
    above override it.
    """
    # FluxPipeline divides the scheduler timesteps by a hard-coded 1000. Private keys and
    # use_flow_sigmas (FluxPipeline drops custom sigmas when it is set) are not copied.
    return flow_match_student_config(t_list, sample_type, base_config, num_train_timesteps=1000)


def student_initial_latents(noise: torch.Tensor, t_list: Sequence[float]) -> torch.Tensor:
    """Packed ``latents=`` that make ``FluxPipeline`` start where
    :func:`~fastgen_diffusers.sampling.sample_student` starts, ``t_list[0] * noise`` (float64
    multiply, as the sampler does): the stock pipeline uses given latents unscaled."""
    return pack_latents(scaled_initial_latents(noise, t_list))


def stock_pipeline_kwargs(
    t_list: Sequence[float], *, guidance_scale: float | None = None
) -> dict[str, Any]:
    """``FluxPipeline.__call__`` kwargs that run the student over ``t_list`` (with the scheduler
    of :func:`student_scheduler_config`).

    ``sigmas`` are the rungs without the final 0 (the scheduler appends it); real CFG is off
    (``true_cfg_scale=1.0``). ``guidance_scale`` is Flux-dev's *embedded* guidance: pass the
    value the student was trained with (the wrapper's ``guidance_scale``); the pipeline ignores
    it for models without a guidance embedding. Stock pipelines start from the latents as
    given while :func:`~fastgen_diffusers.sampling.sample_student` starts at
    ``t_list[0] * noise``: for an exact match pass
    ``latents=student_initial_latents(noise, t_list)`` (no difference when ``t_list[0] == 1``).
    """
    t_list = validate_t_list(t_list)
    kwargs: dict[str, Any] = {
        "sigmas": t_list[:-1],
        "num_inference_steps": len(t_list) - 1,
        "true_cfg_scale": 1.0,
    }
    if guidance_scale is not None:
        kwargs["guidance_scale"] = float(guidance_scale)
    return kwargs


# -- the family ---------------------------------------------------------------------------------

# FluxPipeline.__call__'s guidance_scale: the embedded guidance of guidance-distilled checkpoints.
DEFAULT_GUIDANCE = 3.5


@register_family
class FluxFamily(Family):
    """``FluxPipeline`` (Flux.1 dev / schnell) for the training machinery.

    Conditioning: ``encoder_hidden_states`` (T5 tokens) and ``pooled_projections`` (CLIP).

    Args:
        guidance: the embedded guidance value of guidance-distilled checkpoints
            (``guidance_embeds``, e.g. Flux.1-dev) that the student learns at; ``None`` is
            ``FluxPipeline``'s default, 3.5, and leaves ``guidance_scale`` out of
            :meth:`stock_pipeline_kwargs` (the pipeline's default applies). Unused for
            checkpoints without a guidance embedding (Flux.1-schnell).

    Example::

        family = FluxFamily(guidance=4.0)   # or family_from_pretrained(path, guidance=4.0)
        teacher = family.wrap(pipe.transformer)
        kwargs = family.stock_pipeline_kwargs([0.999, 0.5, 0.0])  # guidance_scale=4.0
    """

    name = "flux"
    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    is_video = False
    default_max_sequence_length = 512
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS + (
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    )
    lora_loader_class = FluxLoraLoaderMixin
    pipeline_tag = "text-to-image"
    license_hint = {
        "FLUX.1-dev": {
            "license": "other",
            "license_name": "flux-1-dev-non-commercial-license",
            "license_link": (
                "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
            ),
        },
        "FLUX.1-schnell": {"license": "apache-2.0"},
    }
    default_guidance = DEFAULT_GUIDANCE

    # The rest of the contract is this module's functions.
    normalize_latents = staticmethod(normalize_latents)
    denormalize_latents = staticmethod(denormalize_latents)
    attach_feature_capture = staticmethod(attach_feature_capture)
    student_scheduler_config = staticmethod(student_scheduler_config)
    _discriminator = staticmethod(build_discriminator)
    _latent_shape = staticmethod(latent_shape)

    def __init__(self, guidance: float | None = None) -> None:
        if guidance is not None:
            if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
                raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
            if not math.isfinite(guidance):
                raise ValueError(f"guidance must be a finite number, got {guidance}")
            guidance = float(guidance)
        self.guidance = guidance

    def __repr__(self) -> str:
        return f"FluxFamily(guidance={self.guidance})"

    def wrap(self, transformer: nn.Module) -> FluxWrapper:
        if not transformer.config.guidance_embeds:
            # Flux-schnell: no guidance embedding, the value is not used.
            return FluxWrapper(transformer, guidance_scale=None)
        guidance = self.default_guidance if self.guidance is None else self.guidance
        return FluxWrapper(transformer, guidance_scale=guidance)

    def _encode_prompts(
        self, pipe: Any, prompts: list[str], max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        emb = encode_prompt(pipe, prompts, max_sequence_length=max_sequence_length)
        return {
            "encoder_hidden_states": emb["encoder_hidden_states"],
            "pooled_projections": emb["pooled_projections"],
        }

    def latent_shape(
        self, pipe: Any, height: int, width: int, num_frames: int | None = None
    ) -> tuple[int, ...]:
        # FluxPipeline silently rounds other sizes down; a cache at a rounded size would not
        # match the requested resolution.
        multiple = 2 * int(pipe.vae_scale_factor)
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (2 x vae_scale_factor), got "
                f"{height} and {width}"
            )
        return super().latent_shape(pipe, height, width, num_frames)

    def stock_pipeline_kwargs(self, t_list: Sequence[float]) -> dict[str, Any]:
        return stock_pipeline_kwargs(t_list, guidance_scale=self.guidance)
