"""Wan 2.1 / 2.2 plugin: ``WanTransformer3DModel`` in the pipeline's call convention.

What the family needs (checked against diffusers 0.42):

- The transformer takes ``timestep`` in [0, 1000]: ``WanPipeline`` passes the scheduler's
  ``timesteps = sigmas * num_train_timesteps`` (1000). :class:`WanWrapper` takes the RF time
  ``t`` in [0, 1] and multiplies it by 1000 itself (leave
  ``DistillationConfig.num_train_timesteps`` null).
- Latents are video ``[B, C, F, H, W]``; ``patch_size`` is ``(1, 2, 2)``, so the image tokens are
  the ``(F, H/2, W/2)`` grid flattened frame-major then row-major. ``WanTransformerBlock``
  returns the video-token stream only (the text is read by cross-attention, never updated).
- Wan 2.2 TI2V-5B pipelines set ``expand_timesteps=True``: the timestep becomes per-token
  ``[B, F * H/2 * W/2]``; with an image (``WanImageToVideoPipeline``) the first latent frame is
  the VAE latent of the image, fed at ``t = 0`` and put back into the result after the loop.
  :class:`WanWrapper` (``expand_timesteps=True`` plus ``condition_latents``) does the same and
  returns, for that frame, the flow whose x0 is the condition (``(x_t - cond) / t``), so every
  loss sees the conditioning frame as clean.
- Wan 2.1 I2V / Wan 2.2 I2V-A14B concatenate ``[mask (4 ch), condition latents]`` (``in_channels
  = 36``, ``out_channels = 16``) to the noisy latents along channels; Wan 2.1 I2V also takes
  CLIP image embeddings (``image_dim``, ``added_kv_proj_dim``) as ``encoder_hidden_states_image``
  and then hard-codes 512 text tokens (the attention splits the context at ``len - 512``). No
  frame is kept at ``t = 0`` there.
- VAE (``AutoencoderKLWan``) latents are normalised per channel with the config's
  ``latents_mean`` / ``latents_std``: ``(z - mean) * (1 / std)``; decoding undoes it.
- ``_keep_in_fp32_modules`` keeps the time embedder, norms, modulation tables and rope in fp32
  when the model loads in bf16: the wrapper feeds inputs in ``transformer.dtype`` (bf16) and a
  float32 timestep, as the stock pipeline does, and returns the transformer's dtype.

Example::

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    import fastgen_diffusers as fgd
    from fastgen_diffusers.plugins import wan

    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    teacher = wan.WanWrapper.from_pipeline(pipe)
    student = wan.WanWrapper.from_pretrained(path, torch_dtype=torch.bfloat16)
    emb = wan.encode_prompt(pipe, ["a cat surfing"], negative_prompt="")
    latents = wan.normalize_latents(pipe.vae, pipe.vae.encode(videos).latent_dist.sample())

    capture = wan.attach_feature_capture(teacher)  # GAN branch, [15, 22, 29] for 30 layers
    disc = wan.build_discriminator(teacher, capture.feature_indices)
    dmd = fgd.DMDPipeline(student, teacher, fgd.create_fake_score(teacher), cfg,
                          discriminator=disc)
    losses = dmd.compute_student_loss(
        latents, torch.randn_like(latents), emb["prompt_embeds"],
        negative_encoder_hidden_states=emb["negative_prompt_embeds"],
        # image-to-video: **wan.prepare_image_condition(i2v_pipe, image, height, width, frames)
    )

    # Inference of the exported student with the stock pipeline (no `sigmas` argument there):
    t_list = [0.999, 0.833, 0.0]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        wan.student_scheduler_config(t_list, base_config=pipe.scheduler.config))
    video = pipe("a cat surfing", **wan.stock_pipeline_kwargs(t_list)).frames[0]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from torch import nn

from ..discriminators import VideoDiTDiscriminator
from ..features import FeatureCapture
from ..features import attach_feature_capture as _attach_feature_capture
from ..sampling import validate_t_list
from .base import Family
from .common import (
    TransformerWrapper,
    config_of,
    find_transformer,
    inner_dim,
    latent_grid_hook,
    tokens_to_map,
)
from .registry import register_family
from .wan_experts import (
    ExpertsDiscriminator,
    WanExperts,
    attach_experts_feature_capture,
    check_expert_sides,
    find_experts,
)
from .wan_schedule import (
    NUM_TRAIN_TIMESTEPS,
    closest_reachable_t_list,
    pipeline_t_list,
    student_scheduler_config,
)

__all__ = [
    "DEFAULT_FEATURE_INDICES",
    "NUM_TRAIN_TIMESTEPS",
    "WAN_TEXT_TOKENS_WITH_IMAGE",
    "WanFamily",
    "WanWrapper",
    "attach_feature_capture",
    "build_discriminator",
    "closest_reachable_t_list",
    "default_feature_indices",
    "denormalize_latents",
    "encode_prompt",
    "latent_shape",
    "normalize_latents",
    "pipeline_t_list",
    "prepare_image_condition",
    "stock_pipeline_kwargs",
    "student_scheduler_config",
]

# Blocks the GAN branch reads on the 30-layer Wan 2.2 TI2V-5B (FastGen's choice).
DEFAULT_FEATURE_INDICES: tuple[int, ...] = (15, 22, 29)
# WanAttnProcessor splits the cross-attention context at `len - 512` when the model has image
# projections (added_kv_proj_dim): the text part must be exactly 512 tokens.
WAN_TEXT_TOKENS_WITH_IMAGE = 512
_TOKEN_GRID_KEY = "wan_token_grid"
_CLAMP = 1e-6


class WanWrapper(TransformerWrapper):
    """``WanTransformer3DModel`` called as ``model(hidden_states=x_t, timestep=t, ...)``.

    Args:
        transformer: the diffusers transformer (Wan 2.1 / 2.2, T2V / I2V / TI2V), held as
            ``self.transformer``.
        expand_timesteps: the pipeline's ``expand_timesteps`` (True for Wan 2.2 TI2V-5B):
            per-token timesteps, and with ``condition_latents`` the first latent frame is the
            condition at ``t = 0``. :meth:`from_pretrained` / :meth:`from_pipeline` read it.
        num_train_timesteps: the transformer's timestep scale (1000).

    ``forward`` takes ``x_t`` as ``[B, C, F, H, W]`` normalised latents (``H``, ``W`` multiples
    of the patch size) and ``t`` in [0, 1], and returns the flow prediction ``eps - x0`` in the
    latent layout (``out_channels``), in the transformer's dtype. Inputs are cast to it; weights
    are never cast.

    Timestep precision: ``WanPipeline`` passes ``scheduler.timesteps`` in float32 (with
    ``expand_timesteps``, a float32 mask times it, per token) and the transformer's
    ``timesteps_proj`` reads it without a cast (the time embedder is kept in fp32). The wrapper
    passes ``1000 t`` in float32: the exact pipeline value with fp32 weights, bf16 weights, and
    fp32 weights under bf16 autocast (the bf16 pipeline passes float32 too). The released
    checkpoints' UniPC scheduler rounds its timesteps to integers; the student's
    ``FlowMatchEulerDiscreteScheduler`` (:func:`student_scheduler_config`) does not.
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        *,
        expand_timesteps: bool = False,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    ) -> None:
        super().__init__(transformer)
        self.expand_timesteps = bool(expand_timesteps)
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        subfolder: str | None = "transformer",
        *,
        expand_timesteps: bool | None = None,
        **kwargs: Any,
    ) -> WanWrapper:
        """Load ``WanTransformer3DModel.from_pretrained(path, subfolder=...)`` and wrap it.

        ``expand_timesteps=None`` reads it from the pipeline's ``model_index.json`` under
        ``path`` (absent there, or no pipeline folder: ``False``, the Wan 2.1 / A14B setting).
        """
        transformer = WanTransformer3DModel.from_pretrained(path, subfolder=subfolder, **kwargs)
        if expand_timesteps is None:
            expand_timesteps = _read_expand_timesteps(path, kwargs)
        return cls(transformer, expand_timesteps=expand_timesteps)

    @classmethod
    def from_pipeline(cls, pipe: Any, *, transformer: str = "transformer") -> WanWrapper:
        """Wrap ``pipe.transformer`` (or ``pipe.transformer_2``) with the pipeline's
        ``expand_timesteps``."""
        return cls(
            getattr(pipe, transformer),
            expand_timesteps=bool(getattr(pipe.config, "expand_timesteps", False)),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        condition_latents: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Flow prediction for ``x_t`` at RF time ``t`` in [0, 1].

        Args:
            hidden_states: ``x_t``, ``[B, C, F, H, W]`` normalised VAE latents
                (``C = out_channels``).
            timestep: ``t`` in [0, 1], ``[B]`` (or a scalar / ``[1]``, broadcast).
            encoder_hidden_states: ``prompt_embeds`` ``[B, L, text_dim]`` (umT5, L = 512 as the
                pipeline pads them; exactly 512 for models with image projections).
            encoder_hidden_states_image: CLIP image embeddings ``[B, 257, image_dim]`` for
                Wan 2.1 I2V (``pipe.encode_image``); ``None`` otherwise.
            condition_latents: image conditioning as ``WanImageToVideoPipeline.prepare_latents``
                builds it (see :func:`prepare_image_condition`): with ``expand_timesteps`` the
                normalised latent of the first frame ``[B, C, 1, H, W]`` (extra frames are
                ignored); for concat models (``in_channels > out_channels``)
                ``[B, in_channels - out_channels, F, H, W]`` (frame mask + condition latents).
            **kwargs: passed to the transformer (e.g. ``attention_kwargs``).
        """
        self._check_latents(hidden_states, encoder_hidden_states)
        kwargs.pop("return_dict", None)
        t = self._check_timestep(
            timestep,
            hidden_states.shape[0],
            hidden_states.device,
            scaling=f"scales it by {self.num_train_timesteps} itself",
        )
        x_in, first_frame_cond = self._conditioned_input(hidden_states, condition_latents)
        self._check_context(encoder_hidden_states, encoder_hidden_states_image)
        t_model = self._model_timestep(t, hidden_states, first_frame_cond is not None)
        out = self._run_transformer(
            x_in, t_model, encoder_hidden_states, encoder_hidden_states_image, **kwargs
        )
        if first_frame_cond is not None:
            out = self._with_first_frame_flow(out, hidden_states, t, first_frame_cond)
        return out

    def _check_latents(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> None:
        """Prompt embeddings present; latents ``[B, C, F, H, W]`` on whole patches."""
        if encoder_hidden_states is None:
            raise ValueError("WanWrapper needs encoder_hidden_states (umT5 prompt_embeds)")
        if hidden_states.ndim != 5:
            raise ValueError(
                f"WanWrapper expects video latents [B, C, F, H, W], got shape "
                f"{tuple(hidden_states.shape)}"
            )
        patch_size = self.transformer.config.patch_size
        p_t, p_h, p_w = (int(p) for p in patch_size)
        _, _, frames, height, width = hidden_states.shape
        if frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"latent frames/height/width ({frames}, {height}, {width}) must be multiples of "
                f"patch_size={tuple(patch_size)}"
            )

    def _conditioned_input(
        self, hidden_states: torch.Tensor, condition_latents: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transformer's input and, for a first-frame condition, that frame's latent.

        With ``expand_timesteps`` the condition replaces the first latent frame; otherwise it is
        concatenated along channels (Wan 2.1 I2V / Wan 2.2 I2V-A14B).
        """
        config = self.transformer.config
        batch, channels, frames, height, width = hidden_states.shape
        x_in = hidden_states
        first_frame_cond = None
        if self.expand_timesteps:
            if condition_latents is not None:
                p_t = int(config.patch_size[0])
                if p_t != 1:
                    raise ValueError(f"a first-frame condition needs patch_size[0] == 1, got {p_t}")
                first_frame_cond = self._first_frame_condition(condition_latents, hidden_states)
                # WanImageToVideoPipeline: input = (1 - mask) * cond + mask * latents, the mask
                # being 0 on the first latent frame (its tokens get t = 0, _model_timestep).
                x_in = torch.cat([first_frame_cond.to(x_in.dtype), x_in[:, :, 1:]], dim=2)
        elif condition_latents is not None:
            expected = int(config.in_channels) - channels
            if expected <= 0:
                raise ValueError(
                    "condition_latents given, but this Wan model takes no concatenated "
                    f"condition (in_channels={config.in_channels}, latents have {channels} "
                    "channels) and expand_timesteps=False; for Wan 2.2 TI2V-5B build the wrapper "
                    "with expand_timesteps=True (WanWrapper.from_pipeline / from_pretrained)"
                )
            if condition_latents.shape != (batch, expected, frames, height, width):
                raise ValueError(
                    f"condition_latents must be [B, in_channels - C, F, H, W] = "
                    f"{(batch, expected, frames, height, width)} (frame mask + condition "
                    f"latents, from prepare_image_condition), got {tuple(condition_latents.shape)}"
                )
            x_in = torch.cat([x_in, condition_latents.to(x_in.dtype)], dim=1)
        if x_in.shape[1] != int(config.in_channels):
            raise ValueError(
                f"the transformer takes {config.in_channels} input channels, got {x_in.shape[1]}"
                + (
                    " (an image-to-video model: pass condition_latents from "
                    "prepare_image_condition)"
                    if int(config.in_channels) > channels
                    else ""
                )
            )
        return x_in, first_frame_cond

    def _check_context(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None,
    ) -> None:
        """Models with image projections need CLIP embeddings and exactly 512 text tokens."""
        config = self.transformer.config
        if config.added_kv_proj_dim is None:
            return
        if encoder_hidden_states_image is None:
            raise ValueError(
                "this Wan model has image projections (added_kv_proj_dim="
                f"{config.added_kv_proj_dim}): pass encoder_hidden_states_image "
                "(CLIP embeddings, see prepare_image_condition)"
            )
        if encoder_hidden_states.shape[1] != WAN_TEXT_TOKENS_WITH_IMAGE:
            raise ValueError(
                f"Wan I2V attention splits the context at len - {WAN_TEXT_TOKENS_WITH_IMAGE}"
                f": prompt embeddings must have {WAN_TEXT_TOKENS_WITH_IMAGE} tokens (pad as "
                f"the pipeline does), got {encoder_hidden_states.shape[1]}"
            )

    def _model_timestep(
        self, t: torch.Tensor, hidden_states: torch.Tensor, first_frame_clean: bool
    ) -> torch.Tensor:
        """``t * 1000`` as ``[B]``, or per token ``[B, F * H/p * W/p]`` with ``expand_timesteps``.

        float32 timesteps of sigma * 1000 computed in float32, as the stock pipeline passes them
        (scheduler.timesteps) to a model of any dtype.
        """
        t_model = t * float(self.num_train_timesteps)
        if not self.expand_timesteps:
            return t_model
        p_t, p_h, p_w = (int(p) for p in self.transformer.config.patch_size)
        batch, _, frames, height, width = hidden_states.shape
        grid = (frames // p_t, height // p_h, width // p_w)
        token_t = torch.ones(batch, math.prod(grid), device=t.device, dtype=torch.float32)
        if first_frame_clean:
            # WanImageToVideoPipeline: per-token t = mask * t, the mask being 0 on the first
            # latent frame.
            token_t[:, : grid[1] * grid[2]] = 0.0
        return token_t * t_model[:, None]

    def _run_transformer(
        self,
        x_in: torch.Tensor,
        t_model: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The transformer's output, inputs cast to its dtype (the timestep stays float32)."""
        dtype = self.dtype
        if encoder_hidden_states_image is not None:
            encoder_hidden_states_image = encoder_hidden_states_image.to(dtype)
        return self.transformer(
            hidden_states=x_in.to(dtype),
            timestep=t_model,
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            encoder_hidden_states_image=encoder_hidden_states_image,
            return_dict=False,
            **kwargs,
        )[0]

    @staticmethod
    def _with_first_frame_flow(
        out: torch.Tensor,
        hidden_states: torch.Tensor,
        t: torch.Tensor,
        first_frame_cond: torch.Tensor,
    ) -> torch.Tensor:
        """``out`` with the first frame's flow replaced by ``(x_t - cond) / t``.

        The pipeline overwrites the first frame with the condition after the loop; the flow
        (x_t - cond) / t makes x0 = cond there, and Euler steps on it keep (x - cond) / t
        constant so they also end exactly on cond.
        """
        x_first = hidden_states[:, :, :1].float()
        t_b = t.reshape(hidden_states.shape[0], 1, 1, 1, 1).clamp_min(_CLAMP)
        flow_first = ((x_first - first_frame_cond.float()) / t_b).to(out.dtype)
        return torch.cat([flow_first, out[:, :, 1:]], dim=2)

    @staticmethod
    def _first_frame_condition(condition: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, _, height, width = latents.shape
        if (
            condition.ndim != 5
            or condition.shape[0] != batch
            or condition.shape[1] != channels
            or condition.shape[3:] != (height, width)
        ):
            raise ValueError(
                "with expand_timesteps, condition_latents must be the normalised latent of the "
                f"first frame [B, C, 1, H, W] = {(batch, channels, 1, height, width)}, got "
                f"{tuple(condition.shape)}"
            )
        return condition[:, :, :1]


def _read_expand_timesteps(path: str, kwargs: Mapping[str, Any]) -> bool:
    """``expand_timesteps`` from the pipeline's ``model_index.json`` (False if there is none)."""
    from diffusers import DiffusionPipeline

    load_keys = ("cache_dir", "revision", "token", "local_files_only", "proxies")
    try:
        index = DiffusionPipeline.load_config(
            path, **{k: kwargs[k] for k in load_keys if k in kwargs}
        )
    except (OSError, ValueError):
        return False
    return bool(index.get("expand_timesteps", False))


# -- feature capture ----------------------------------------------------------------------------


def _find_transformer(model: nn.Module) -> WanTransformer3DModel:
    """The ``WanTransformer3DModel`` inside ``model`` (wrapper, DDP, compile unwrapped)."""
    return find_transformer(
        model,
        lambda module: isinstance(module, WanTransformer3DModel),
        ValueError,
        "holds no WanTransformer3DModel (looked through .transformer / .module / ._orig_mod)",
    )


def _config_of(source: Any) -> Mapping[str, Any]:
    return config_of(
        source, _find_transformer, expected="a Wan transformer, WanWrapper, pipeline or config"
    )


def default_feature_indices(model_or_config: Any) -> tuple[int, ...]:
    """Blocks at the middle, three quarters and the end of the depth.

    ``num_layers`` (int, config, model or pipeline) 30 (Wan 2.2 TI2V-5B, Wan 2.1 1.3B):
    ``(15, 22, 29)``; 40 (the 14B models): ``(20, 29, 39)``; fewer layers give fewer, distinct
    blocks.
    """
    if isinstance(model_or_config, int):
        num_layers = model_or_config
    else:
        num_layers = int(_config_of(model_or_config)["num_layers"])
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    middle, last = num_layers // 2, num_layers - 1
    return tuple(sorted({middle, (middle + last) // 2, last}))


def _video_tokens_to_map(output: Any, capture: FeatureCapture) -> torch.Tensor:
    """``WanTransformerBlock`` output ``[B, F'H'W', D]`` -> ``[B, D, F', H', W']``."""
    if not isinstance(output, torch.Tensor) or output.ndim != 3:
        raise TypeError(
            "Wan feature capture expects a WanTransformerBlock output [B, tokens, dim], got "
            f"{type(output).__name__}"
            + (f" of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
        )
    grid = capture.meta.get(_TOKEN_GRID_KEY)
    if grid is None:
        raise RuntimeError("Wan feature capture saw no transformer input (token grid unknown)")
    # patch_embedding (Conv3d) output [B, D, F', H', W'] is flatten(2)-ed: frame-major, then
    # row-major, so the inverse is a reshape to the grid.
    return tokens_to_map(output, grid, "video")


def attach_feature_capture(
    model: nn.Module, feature_indices: Sequence[int] | None = None
) -> FeatureCapture:
    """Hook ``blocks[i]`` of a Wan model (wrapper or raw transformer) for the GAN branch.

    Each captured feature is the block's video-token output folded back to
    ``[B, inner_dim, F/p_t, H/p_h, W/p_w]`` (``[B, D, F, H/2, W/2]`` for Wan), for any (also
    non-square) latent size. ``feature_indices`` defaults to :func:`default_feature_indices`
    (``[15, 22, 29]`` for 30 layers). The capture lives on the transformer, so
    :func:`~fastgen_diffusers.features.get_feature_capture` finds it through the wrapper.
    """
    experts = find_experts(model)
    if experts is not None:  # Wan 2.2 A14B: one capture per expert, rows in batch order
        return attach_experts_feature_capture(
            experts, lambda expert: attach_feature_capture(expert, feature_indices)
        )
    transformer = _find_transformer(model)
    indices = (
        default_feature_indices(transformer.config) if feature_indices is None else feature_indices
    )
    capture = _attach_feature_capture(
        transformer, indices, blocks="blocks", transform=_video_tokens_to_map
    )
    capture.add_input_hook(
        transformer, latent_grid_hook(_TOKEN_GRID_KEY, transformer.config.patch_size)
    )
    return capture


def build_discriminator(
    model_or_config: Any,
    feature_indices: Sequence[int] | None = None,
    *,
    hidden_channels: int | None = None,
) -> VideoDiTDiscriminator | ExpertsDiscriminator:
    """A :class:`VideoDiTDiscriminator` for the maps :func:`attach_feature_capture` yields.

    Channels are the transformer's inner dim (``num_attention_heads * attention_head_dim``,
    3072 for TI2V-5B); one head per captured block.
    """
    if isinstance(model_or_config, nn.Module) and find_experts(model_or_config) is not None:
        # Wan 2.2 A14B: one head set per expert (each expert's features are its own).
        high, low = (
            build_discriminator(e, feature_indices, hidden_channels=hidden_channels)
            for e in find_experts(model_or_config).experts()  # type: ignore[union-attr]
        )
        return ExpertsDiscriminator(high, low)
    config = _config_of(model_or_config)
    indices = default_feature_indices(config) if feature_indices is None else feature_indices
    return VideoDiTDiscriminator(
        inner_dim(config), len(set(indices)), hidden_channels=hidden_channels
    )


# -- pipeline glue ------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompt(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    device: torch.device | str | None = None,
    num_videos_per_prompt: int = 1,
    max_sequence_length: int = 512,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Positive and negative conditioning through the Wan pipeline's own ``encode_prompt``.

    Returns ``{"prompt_embeds", "negative_prompt_embeds"}`` (``[B, max_sequence_length,
    text_dim]``, zero-padded after each prompt's tokens; the stock pipeline's argument names,
    so ``pipe(**emb)`` works). ``max_sequence_length=512`` is what ``WanPipeline.__call__``
    uses (``encode_prompt`` itself defaults to 226) and what I2V models require. A missing
    ``negative_prompt`` is ``""``, as in the pipeline. Wan has no pooled embeddings or masks.
    """
    pos, neg = pipe.encode_prompt(
        prompt=prompt,
        negative_prompt=negative_prompt,
        do_classifier_free_guidance=True,
        num_videos_per_prompt=num_videos_per_prompt,
        max_sequence_length=max_sequence_length,
        device=device,
        dtype=dtype,
    )
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}


@torch.no_grad()
def prepare_image_condition(
    pipe: Any,
    image: Any,
    height: int,
    width: int,
    num_frames: int = 81,
    batch_size: int = 1,
    *,
    last_image: Any = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The image conditioning of a ``WanImageToVideoPipeline`` as :class:`WanWrapper` kwargs.

    Runs the pipeline's own steps (``encode_image`` when the transformer has ``image_dim``,
    ``video_processor.preprocess``, ``prepare_latents``: VAE encode with the argmax latent and
    per-channel normalisation) and returns ``{"condition_latents": ...}`` plus
    ``"encoder_hidden_states_image"`` for Wan 2.1 I2V. With ``expand_timesteps`` (TI2V-5B) the
    condition is the first frame's latent ``[B, C, 1, H, W]``; otherwise it is ``[B, 4 + C, F,
    H, W]`` (frame mask, then the latents of the image followed by zero frames).

    ``image`` may also be already preprocessed pixels ``[1, 3, height, width]`` in [-1, 1]
    (what ``video_processor.preprocess`` returns; training data's first frames): they are used
    as they are. Models with a CLIP image encoder need a PIL image.
    """
    device = torch.device(device) if device is not None else pipe._execution_device
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    out: dict[str, torch.Tensor] = {}
    if transformer.config.image_dim is not None:
        if isinstance(image, torch.Tensor):
            raise ValueError(
                "this Wan model encodes its image with CLIP (image_dim is set): pass the "
                "image as a PIL image, not a pixel tensor"
            )
        images = image if last_image is None else [image, last_image]
        embeds = pipe.encode_image(images, device).repeat(batch_size, 1, 1)
        out["encoder_hidden_states_image"] = embeds.to(transformer.dtype)
    shape = latent_shape(pipe, height, width, num_frames, batch_size)
    if isinstance(image, torch.Tensor):
        pixels = _preprocessed_pixels(image, height, width)
    else:
        pixels = pipe.video_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(device, dtype=torch.float32)
    if last_image is not None:
        last_image = pipe.video_processor.preprocess(last_image, height=height, width=width)
        last_image = last_image.to(device, dtype=torch.float32)
    # Placeholder latents: prepare_latents would otherwise draw noise from `generator`.
    placeholder = torch.zeros(shape, device=device, dtype=torch.float32)
    prepared = pipe.prepare_latents(
        pixels,
        batch_size,
        pipe.vae.config.z_dim,
        height,
        width,
        num_frames,
        torch.float32,
        device,
        generator,
        placeholder,
        last_image,
    )
    out["condition_latents"] = prepared[1]
    return out


def _preprocessed_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One image's pixels ``[1, 3, height, width]`` in [-1, 1], checked."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if tuple(pixels.shape) != (1, 3, height, width):
        raise ValueError(
            f"condition pixels must be one image [1, 3, {height}, {width}] (or [3, H, W]), got "
            f"{tuple(pixels.shape)}"
        )
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(
            f"condition pixels must be in [-1, 1] (x / 127.5 - 1), got values in "
            f"[{low:.4g}, {high:.4g}]"
        )
    return pixels


def _latent_stats(
    vae: Any, latents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents, mean, 1 / std)`` the way the Wan pipelines build them (cast, then invert)."""
    config = vae if isinstance(vae, Mapping) else vae.config
    if isinstance(vae, nn.Module):
        # Decoding casts to the VAE's device and dtype first (pipeline_wan.py, output step).
        latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    z_dim = int(config["z_dim"])
    if latents.ndim != 5 or latents.shape[1] != z_dim:
        raise ValueError(
            f"Wan VAE latents must be [B, z_dim={z_dim}, F, H, W], got {tuple(latents.shape)}"
        )
    shape = (1, z_dim, 1, 1, 1)
    mean = torch.tensor(config["latents_mean"]).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(config["latents_std"]).view(shape).to(
        latents.device, latents.dtype
    )
    return latents, mean, inv_std


def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> model latents: ``(z - latents_mean) * (1 / latents_std)`` per channel.

    ``vae`` is the ``AutoencoderKLWan`` or its config. The arithmetic is the pipeline's
    (``WanImageToVideoPipeline.prepare_latents``), in ``latents``' dtype.
    """
    config = vae if isinstance(vae, Mapping) else vae.config
    _, mean, inv_std = _latent_stats(config, latents)
    return (latents - mean) * inv_std


def denormalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> VAE decoder input: ``z / (1 / latents_std) + latents_mean``.

    Exactly what ``WanPipeline`` does before ``vae.decode``; given the VAE module (not just its
    config) the latents are first moved to its device and dtype, as there.
    """
    latents, mean, inv_std = _latent_stats(vae, latents)
    return latents / inv_std + mean


def latent_shape(
    source: Any,
    height: int,
    width: int,
    num_frames: int = 81,
    batch_size: int = 1,
    *,
    vae_scale_factor_spatial: int | None = None,
    vae_scale_factor_temporal: int | None = None,
) -> tuple[int, int, int, int, int]:
    """``(B, C, (num_frames - 1) / 4 + 1, height / s, width / s)`` for a video in pixels.

    ``source`` is a pipeline (its VAE's scale factors and ``z_dim``), a transformer / wrapper or
    a transformer config (``C = out_channels``; ``s`` defaults to 16 for the 48-channel Wan 2.2
    VAE and to 8 otherwise, the temporal factor to 4). Unlike the pipeline, which rounds with a
    warning, sizes it would round are errors: ``num_frames - 1`` must be a multiple of the
    temporal factor and ``height`` / ``width`` multiples of ``s * patch_size``.
    """
    config = _config_of(source)
    vae = getattr(source, "vae", None)
    if vae is not None:
        channels = int(vae.config.z_dim)
    else:
        channels = int(config["out_channels"] or config["in_channels"])
    if vae_scale_factor_spatial is None:
        vae_scale_factor_spatial = getattr(source, "vae_scale_factor_spatial", None)
        if vae_scale_factor_spatial is None:
            vae_scale_factor_spatial = 16 if channels == 48 else 8
    if vae_scale_factor_temporal is None:
        vae_scale_factor_temporal = getattr(source, "vae_scale_factor_temporal", 4)
    spatial, temporal = int(vae_scale_factor_spatial), int(vae_scale_factor_temporal)
    p_t, p_h, p_w = (int(p) for p in config["patch_size"])
    if height % (spatial * p_h) or width % (spatial * p_w):
        raise ValueError(
            f"height and width must be multiples of {spatial * p_h} x {spatial * p_w} "
            f"(VAE scale factor * patch_size), got {height} x {width}"
        )
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(
            f"num_frames - 1 must be a multiple of {temporal} (the VAE's temporal factor), "
            f"got num_frames={num_frames}"
        )
    latent_frames = (num_frames - 1) // temporal + 1
    if latent_frames % p_t:
        raise ValueError(f"{latent_frames} latent frames are not a multiple of p_t={p_t}")
    return (int(batch_size), channels, latent_frames, height // spatial, width // spatial)


# -- stock-pipeline inference -------------------------------------------------------------------
#
# The scheduler config that makes WanPipeline follow the student's rungs lives in wan_schedule.


def stock_pipeline_kwargs(t_list: Sequence[float]) -> dict[str, Any]:
    """Call arguments making ``WanPipeline`` / ``WanImageToVideoPipeline`` run the distilled
    student: ``{"num_inference_steps": N, "guidance_scale": 1.0}`` (CFG off: the student is
    distilled with guidance). The schedule comes from a scheduler built from
    :func:`student_scheduler_config`; there is no ``sigmas`` argument.

    The pipeline starts from unscaled noise ``x = noise``, while
    :func:`~fastgen_diffusers.sampling.sample_student` starts at ``t_list[0] * noise``; pass
    ``latents=t_list[0] * noise`` to reproduce it exactly. For ``sde`` the pipeline does not
    hand its ``generator`` to ``scheduler.step``, so the fresh noise comes from the global RNG:
    ``torch.manual_seed(s)`` before the call matches ``torch.manual_seed(s)`` before
    ``sample_student(..., generator=None)`` (given explicit ``latents``); the pipeline draws one
    extra, unused noise at the last step.
    """
    values = validate_t_list(t_list)
    return {"num_inference_steps": len(values) - 1, "guidance_scale": 1.0}


# -- the family ---------------------------------------------------------------------------------


@register_family
class WanFamily(Family):
    """``WanPipeline`` (Wan 2.1 / 2.2 text-to-video) for the training machinery.

    Conditioning: ``encoder_hidden_states`` (umT5 tokens, zero-padded to
    ``max_sequence_length``). Media are videos: pixels ``[B, 3, F, H, W]``, latents
    ``[B, C, F', H', W']``.

    Args:
        expand_timesteps: the pipeline's ``expand_timesteps`` (Wan 2.2 TI2V-5B: per-token
            timesteps); :func:`~fastgen_diffusers.plugins.family_from_pretrained` reads it from
            ``model_index.json``.
        boundary_ratio: set for a two-expert Wan 2.2 A14B pipeline (``transformer_2``; 0.875
            for T2V): the family's networks are then
            :class:`~fastgen_diffusers.plugins.wan_experts.WanExperts` of ``transformer`` and
            ``transformer_2`` (:meth:`wrap_transformers`), and :meth:`student_scheduler_config`
            also checks that each rung stays on its expert's side of the boundary.

    Example::

        family = family_from_pretrained("Wan-AI/Wan2.2-TI2V-5B-Diffusers")  # expand_timesteps
        pipe = family.load_pipeline("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
        shape = family.latent_shape(pipe, 704, 1280, num_frames=121)
    """

    name = "wan"
    aliases = ("wan22",)
    pipeline_class = WanPipeline
    transformer_class = WanTransformer3DModel
    is_video = True
    default_max_sequence_length = 512
    default_num_frames = 81  # WanPipeline.__call__'s default
    text_components = ("text_encoder", "tokenizer")
    lora_target_modules = tuple(
        f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")
    ) + ("ffn.net.0.proj", "ffn.net.2")
    lora_loader_class = WanLoraLoaderMixin
    pipeline_tag = "text-to-video"
    video_fps = 16  # the frame rate Wan is trained at (WanPipeline's examples)

    # The rest of the contract is this module's functions.
    normalize_latents = staticmethod(normalize_latents)
    denormalize_latents = staticmethod(denormalize_latents)
    attach_feature_capture = staticmethod(attach_feature_capture)
    stock_pipeline_kwargs = staticmethod(stock_pipeline_kwargs)
    _discriminator = staticmethod(build_discriminator)
    _latent_shape = staticmethod(latent_shape)

    def __init__(self, expand_timesteps: bool = False, boundary_ratio: float | None = None) -> None:
        self.expand_timesteps = bool(expand_timesteps)
        if boundary_ratio is not None and not 0.0 < float(boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1) or None, got {boundary_ratio}")
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)

    def __repr__(self) -> str:
        extra = "" if self.boundary_ratio is None else f", boundary_ratio={self.boundary_ratio}"
        return f"WanFamily(expand_timesteps={self.expand_timesteps}{extra})"

    @property
    def transformer_components(self) -> tuple[str, ...]:
        """Wan 2.2 A14B (``boundary_ratio`` set): the high-noise ``transformer`` and the
        low-noise ``transformer_2``."""
        if self.boundary_ratio is None:
            return ("transformer",)
        return ("transformer", "transformer_2")

    @classmethod
    def options_from_model_index(cls, index: Mapping[str, Any], path: str) -> dict[str, Any]:
        options: dict[str, Any] = {"expand_timesteps": bool(index.get("expand_timesteps", False))}
        if (index.get("transformer_2") or [None, None])[1] is not None:
            boundary = index.get("boundary_ratio")
            if boundary is None or (index.get("transformer") or [None, None])[1] is None:
                raise ValueError(
                    f"{path} is a two-expert Wan 2.2 pipeline (transformer_2 is set) with "
                    f"boundary_ratio={boundary} and transformer="
                    f"{(index.get('transformer') or [None, None])[1]}: expected both experts and "
                    "a boundary_ratio (0.875 for Wan2.2-T2V-A14B)"
                )
            options["boundary_ratio"] = float(boundary)
        return options

    def load_pipeline(self, path: str | os.PathLike, **kwargs: Any) -> Any:
        """:meth:`Family.load_pipeline`, refusing a checkpoint whose ``expand_timesteps`` or
        ``boundary_ratio`` differ from this family's."""
        pipe = super().load_pipeline(path, **kwargs)
        loaded = bool(getattr(pipe.config, "expand_timesteps", False))
        if loaded != self.expand_timesteps:
            raise ValueError(
                f"{path} has expand_timesteps={loaded}, this WanFamily expand_timesteps="
                f"{self.expand_timesteps}: build the family with family_from_pretrained(path)"
            )
        boundary = getattr(pipe.config, "boundary_ratio", None)
        if getattr(pipe, "transformer_2", None) is None:
            boundary = None  # a single-expert pipeline, whatever its config says
        if boundary != self.boundary_ratio:
            raise ValueError(
                f"{path} has boundary_ratio={boundary}, this WanFamily boundary_ratio="
                f"{self.boundary_ratio}: build the family with family_from_pretrained(path)"
            )
        return pipe

    def wrap(self, transformer: nn.Module) -> WanWrapper:
        return WanWrapper(transformer, expand_timesteps=self.expand_timesteps)

    def wrap_transformers(self, transformers: Sequence[nn.Module]) -> nn.Module:
        """One expert: :meth:`wrap`. Wan 2.2 A14B: a :class:`~.wan_experts.WanExperts` of the
        wrapped ``transformer`` (high noise) and ``transformer_2`` (low noise)."""
        if self.boundary_ratio is None:
            return super().wrap_transformers(transformers)
        if len(transformers) != 2:
            raise ValueError(
                f"a two-expert WanFamily wraps 2 transformers (transformer, transformer_2), "
                f"got {len(transformers)}"
            )
        high, low = (self.wrap(t) for t in transformers)
        return WanExperts(high, low, self.boundary_ratio)

    def student_scheduler_config(
        self,
        t_list: Sequence[float],
        sample_type: str = "ode",
        base_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """:func:`~.wan_schedule.student_scheduler_config`; with two experts the pipeline must
        also send each rung to the expert that trained it (same side of the boundary)."""
        config = student_scheduler_config(t_list, sample_type, base_config)
        if self.boundary_ratio is not None:
            check_expert_sides(t_list, config, self.boundary_ratio)
        return config

    def default_size(self, pipe: Any) -> tuple[int, int]:
        return 480, 832  # WanPipeline.__call__'s defaults

    def _encode_prompts(
        self, pipe: Any, prompts: list[str], max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        # encode_prompt also encodes the default negative; only the prompts are kept.
        emb = encode_prompt(pipe, prompts, max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": emb["prompt_embeds"]}

    @torch.no_grad()
    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        z = denormalize_latents(pipe.vae, self._vae_input(pipe, latents))
        video = pipe.vae.decode(z, return_dict=False)[0]
        # postprocess_video gives [B, F, 3, H, W]; the media layout is channels first.
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")
        return frames.permute(0, 2, 1, 3, 4)

    def teacher_sigmas(
        self, scheduler: Any, num_steps: int, latent_shape: Sequence[int]
    ) -> list[float]:
        # Wan ships UniPC with a flow shift: draw the reference with Euler at the same shift.
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            config = dict(scheduler.config)
            shift = config.get("flow_shift") or config.get("shift") or 1.0
            scheduler = FlowMatchEulerDiscreteScheduler(shift=float(shift))
        return super().teacher_sigmas(scheduler, num_steps, latent_shape)

    def card_notes(self, *, base_model: str, lora: bool) -> str:
        if self.boundary_ratio is None:
            experts = (
                "For a Wan 2.2 A14B base model also pass `transformer_2=None, "
                "boundary_ratio=None` to `from_pretrained`."
            )
        else:
            weights = (
                "`pytorch_lora_weights.safetensors` (high noise, into `transformer`) and "
                "`pytorch_lora_weights_transformer_2.safetensors` (low noise, loaded with "
                "`load_into_transformer_2=True`)"
                if lora
                else "`transformer/` (high noise) and `transformer_2/` (low noise)"
            )
            experts = (
                "The student keeps the base model's two experts: "
                f"{weights}. The pipeline switches from the first to the second at "
                f"`boundary_ratio = {self.boundary_ratio:g}` (timestep "
                f"{self.boundary_ratio * NUM_TRAIN_TIMESTEPS:g}), and each of the student's steps "
                "was trained on the expert the pipeline runs it with: keep the shipped scheduler "
                "and the base model's `boundary_ratio`. `guidance_scale=1.0` also turns off "
                "`guidance_scale_2`."
            )
        return (
            "Wan pipelines take no `sigmas`: the student's schedule lives entirely in the shipped "
            f"scheduler config, so only `num_inference_steps` is passed. {experts}\n\n"
            "Loading that scheduler may log \"The config attributes {'sigma_max': ..., "
            "'sigma_min': ...} were passed to FlowMatchEulerDiscreteScheduler, but are not "
            'expected and will be ignored". The warning is harmless and the keys are needed: '
            "diffusers keeps them in the scheduler's config and its Karras sigmas start and end "
            "at them, which is how the pipeline visits the student's first and last timestep "
            "(without them the schedule would start at 1.0)."
        )
