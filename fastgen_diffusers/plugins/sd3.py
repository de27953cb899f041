"""Stable Diffusion 3 / 3.5 plugin: ``SD3Transformer2DModel`` in the pipeline's call convention.

What the family needs (checked against diffusers 0.42):

- The transformer takes ``timestep`` in [0, 1000]: ``StableDiffusion3Pipeline`` passes the
  scheduler's ``timesteps = sigmas * num_train_timesteps`` (1000). :class:`SD3Wrapper` takes the
  RF time ``t`` in [0, 1] and multiplies it by 1000 itself (leave
  ``DistillationConfig.num_train_timesteps`` null).
- ``pooled_projections`` (the two CLIP pooled embeddings, ``[B, 2048]``) is required besides
  ``encoder_hidden_states`` (CLIP + T5 tokens, ``[B, 77 + 256, 4096]``); there is no text mask.
- Latents ``[B, 16, H/8, W/8]`` are normalised as ``(z - shift_factor) * scaling_factor``.
- ``JointTransformerBlock`` returns ``(encoder_hidden_states, hidden_states)``; the last block is
  ``context_pre_only`` and returns ``None`` as its text stream. Image tokens come from a
  ``patch_size`` (2) conv, flattened row-major over the ``(H/p, W/p)`` grid.
- SD3.5 (``qk_norm="rms_norm"``, ``dual_attention_layers``) uses the same class and the same
  convention; nothing in this module depends on those keys.

Example::

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    import fastgen_diffusers as fgd
    from fastgen_diffusers.plugins import sd3

    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    teacher = sd3.SD3Wrapper(pipe.transformer)
    student = sd3.SD3Wrapper.from_pretrained(path, torch_dtype=torch.bfloat16)
    capture = sd3.attach_feature_capture(teacher)  # GAN branch: blocks ~1/3, ~2/3, last
    disc = sd3.build_discriminator(teacher, capture.feature_indices)
    cfg = fgd.DMDConfig(guidance_scale=7.0, gan_loss_weight_gen=0.03,
                        sample_t_cfg={"time_dist_type": "logitnormal"})
    dmd = fgd.DMDPipeline(student, teacher, fgd.create_fake_score(teacher), cfg,
                          discriminator=disc)

    emb = sd3.encode_prompt(pipe, ["a cat"], negative_prompt="")
    latents = sd3.normalize_latents(pipe.vae, pipe.vae.encode(images).latent_dist.sample())
    losses = dmd.compute_student_loss(
        latents, torch.randn_like(latents), emb["prompt_embeds"],
        negative_encoder_hidden_states=emb["negative_prompt_embeds"],
        negative_model_kwargs={"pooled_projections": emb["negative_pooled_prompt_embeds"]},
        pooled_projections=emb["pooled_prompt_embeds"],
    )

    # The distilled student in the stock pipeline (CFG off, the student's rungs):
    t_list = [0.999, 0.5, 0.0]
    pipe.transformer = student.transformer
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        sd3.student_scheduler_config(t_list, base_config=pipe.scheduler.config))
    image = pipe("a cat", **sd3.stock_pipeline_kwargs(t_list)).images[0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import SD3LoraLoaderMixin
from torch import nn

from ..discriminators import ImageDiTDiscriminator
from ..features import FeatureCapture
from ..features import attach_feature_capture as _attach_feature_capture
from ..sampling import validate_t_list
from .base import Family
from .common import (
    JOINT_ATTENTION_LORA_TARGETS,
    TransformerWrapper,
    config_of,
    find_transformer,
    flow_match_student_config,
    identical_token_runs,
    inner_dim,
    latent_grid_hook,
    tokens_to_map,
)
from .registry import register_family

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "TOKEN_LOG_MULTIPLICITY",
    "MultiplicityJointAttnProcessor",
    "collapse_identical_tokens",
    "collapse_prompt_embeds",
    "install_token_dedup",
    "SD3Family",
    "SD3Wrapper",
    "attach_feature_capture",
    "build_discriminator",
    "default_feature_indices",
    "denormalize_latents",
    "encode_prompt",
    "latent_shape",
    "normalize_latents",
    "stock_pipeline_kwargs",
    "student_scheduler_config",
]

# FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000) in every SD3 / SD3.5 checkpoint.
NUM_TRAIN_TIMESTEPS = 1000
_TOKEN_GRID_KEY = "sd3_token_grid"


# -- identical text tokens ----------------------------------------------------------------------

# The ``joint_attention_kwargs`` key carrying the text keys' log-multiplicities.
TOKEN_LOG_MULTIPLICITY = "token_log_multiplicity"


class MultiplicityJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` that can weigh each text key by a multiplicity.

    With ``token_log_multiplicity`` (``[L_text]``, passed through the transformer's
    ``joint_attention_kwargs``) the attention logits of text key ``j`` get ``+log n_j``: the
    attention over one token standing for ``n_j`` identical ones, which equals the attention
    over all of them (``n e^s / (n e^s + Z) = softmax`` over the ``n`` copies). Without it the
    numbers are ``JointAttnProcessor2_0``'s. Projections are the module's own (``attn.to_q``
    etc.), so peft's LoRA layers on them stay in effect. The processor is not part of a saved
    model: ``save_pretrained`` writes weights and config only.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_log_multiplicity: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = None
        if encoder_hidden_states is not None:
            context_query = heads(attn.add_q_proj(encoder_hidden_states))
            context_key = heads(attn.add_k_proj(encoder_hidden_states))
            context_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)
            if token_log_multiplicity is not None:
                text_bias = token_log_multiplicity.to(device=query.device, dtype=query.dtype)
                if text_bias.shape != (context_key.shape[2],):
                    raise ValueError(
                        f"{TOKEN_LOG_MULTIPLICITY} must be [L_text={context_key.shape[2]}], "
                        f"got {tuple(text_bias.shape)}"
                    )
                bias = torch.cat([text_bias.new_zeros(residual.shape[1]), text_bias])
                bias = bias.view(1, 1, 1, -1)

        hidden_states = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(
            batch_size, -1, query.shape[1] * query.shape[3]
        )
        hidden_states = hidden_states.to(query.dtype)

        context_out = None
        if encoder_hidden_states is not None:
            hidden_states, context_out = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                context_out = attn.to_add_out(context_out)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if context_out is not None:
            return hidden_states, context_out
        return hidden_states


def _attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """The attention modules of the joint blocks (``attn``, and SD3.5's ``attn2``)."""
    modules = []
    for block in getattr(transformer, "transformer_blocks", ()):
        found = [getattr(block, name, None) for name in ("attn", "attn2")]
        if not hasattr(found[0], "processor"):
            return []  # not a JointTransformerBlock: nothing is collapsed
        modules += [m for m in found if m is not None]
    return modules


def install_token_dedup(transformer: nn.Module) -> bool:
    """Set :class:`MultiplicityJointAttnProcessor` on every attention module of an SD3
    transformer that runs diffusers' stock ``JointAttnProcessor2_0`` (the same numbers until a
    multiplicity is passed). Returns whether every joint attention now runs it; other
    processors (IP-Adapter, fused projections) are left alone, and then no tokens are
    collapsed."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    modules = _attention_modules(transformer)
    processor = MultiplicityJointAttnProcessor()
    for module in modules:
        if type(module.processor) is JointAttnProcessor2_0:
            module.processor = processor
    return _dedup_installed(transformer)


def _dedup_installed(transformer: nn.Module) -> bool:
    modules = _attention_modules(transformer)
    return bool(modules) and all(
        isinstance(m.processor, MultiplicityJointAttnProcessor) for m in modules
    )


def collapse_identical_tokens(
    *token_batches: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """Collapse the runs of identical rows the ``[B, L, D]`` batches share
    (:func:`~fastgen_diffusers.plugins.common.identical_token_runs`) to one row each:
    ``([collapsed batches], log_multiplicity [L'])``, or ``None`` when there is nothing to
    collapse. The gradient of a collapsed row reaches the first row of its run."""
    runs = identical_token_runs(*token_batches)
    if runs is None:
        return None
    starts, counts = runs
    collapsed = [tokens.index_select(1, starts) for tokens in token_batches]
    return collapsed, counts.to(torch.float32).log()


def collapse_prompt_embeds(
    pipe: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Call arguments for the stock ``StableDiffusion3Pipeline`` with identical prompt tokens
    collapsed (``prompt_embeds``, ``negative_prompt_embeds``, ``joint_attention_kwargs``).

    Installs :class:`MultiplicityJointAttnProcessor` on ``pipe.transformer`` (not saved with
    the model). The positive and negative embeddings are collapsed together (the pipeline
    batches them for CFG); when nothing collapses, or the transformer runs other attention
    processors, the embeddings are returned unchanged.
    """
    kwargs: dict[str, Any] = {"prompt_embeds": prompt_embeds}
    if negative_prompt_embeds is not None:
        kwargs["negative_prompt_embeds"] = negative_prompt_embeds
    if joint_attention_kwargs is not None:
        kwargs["joint_attention_kwargs"] = joint_attention_kwargs
    if not install_token_dedup(pipe.transformer):
        return kwargs
    batches = [prompt_embeds] + (
        [negative_prompt_embeds] if negative_prompt_embeds is not None else []
    )
    result = collapse_identical_tokens(*batches)
    if result is None:
        return kwargs
    collapsed, log_multiplicity = result
    kwargs["prompt_embeds"] = collapsed[0]
    if negative_prompt_embeds is not None:
        kwargs["negative_prompt_embeds"] = collapsed[1]
    kwargs["joint_attention_kwargs"] = {
        **(joint_attention_kwargs or {}),
        TOKEN_LOG_MULTIPLICITY: log_multiplicity,
    }
    return kwargs


class SD3Wrapper(TransformerWrapper):
    """``SD3Transformer2DModel`` called as ``model(hidden_states=x_t, timestep=t, ...)``.

    Args:
        transformer: the diffusers transformer (SD3 or SD3.5), held as ``self.transformer``.
        num_train_timesteps: the transformer's timestep scale (1000 for SD3 / SD3.5).
        dedup_text_tokens: collapse runs of identical ``encoder_hidden_states`` rows (the same
            in every sample, e.g. the 256 zero T5 tokens of SD3 run without T5) to one token
            each, weighted in attention by its multiplicity: the same output (to float
            rounding) at a fraction of the cost. ``None`` (default): on when the transformer
            computes in float32 / float64; ``True``: in half precision too (``log n`` then
            rounds to it); ``False``: never. The attention processors become
            :class:`MultiplicityJointAttnProcessor` (the stock numbers without multiplicities).

    ``forward`` takes ``x_t`` as ``[B, C, H, W]`` latents (``H`` and ``W`` multiples of
    ``patch_size``) and ``t`` in [0, 1], and returns the flow prediction ``eps - x0`` in the
    same layout, in the transformer's dtype (inputs are cast to it; weights are never cast).

    Timestep precision: ``StableDiffusion3Pipeline`` passes ``scheduler.timesteps`` (``1000
    sigma`` in float32) unchanged, and the transformer feeds it to its sinusoidal projection
    without a cast, whatever the weights' dtype. The wrapper passes ``1000 t`` in float32, so
    the time projection gets the pipeline's exact value with fp32 weights, bf16 weights, and
    fp32 weights under bf16 autocast (whose stock equivalent, the bf16 pipeline, also passes
    float32).
    """

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        *,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        dedup_text_tokens: bool | None = None,
    ) -> None:
        super().__init__(transformer)
        self.num_train_timesteps = int(num_train_timesteps)
        if dedup_text_tokens not in (None, True, False):
            raise TypeError(
                f"dedup_text_tokens must be None, True or False, got {dedup_text_tokens!r}"
            )
        self.dedup_text_tokens = dedup_text_tokens
        if dedup_text_tokens is not False:
            install_token_dedup(transformer)

    def _collapse(
        self, encoder_hidden_states: torch.Tensor, kwargs: dict[str, Any], dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Identical text tokens collapsed to one each, with their log-multiplicities for the
        attention (exact: every op on text tokens is per token except attention, whose keys
        the multiplicity weighs; text tokens have no position embedding and the last block's
        text output is dropped)."""
        # The runs are data-dependent: a wrapper traced as a whole keeps every token
        # (regional compilation of the blocks keeps the collapse).
        if self.dedup_text_tokens is False or torch.compiler.is_compiling():
            return encoder_hidden_states, kwargs
        # In half precision log(n) rounds to the compute dtype (~0.4% on the weight of a
        # collapsed run): only on request.
        if self.dedup_text_tokens is None and dtype not in (torch.float32, torch.float64):
            return encoder_hidden_states, kwargs
        joint = kwargs.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in joint or not _dedup_installed(self.transformer):
            return encoder_hidden_states, kwargs
        result = collapse_identical_tokens(encoder_hidden_states)
        if result is None:
            return encoder_hidden_states, kwargs
        (collapsed,), log_multiplicity = result
        joint = {**joint, TOKEN_LOG_MULTIPLICITY: log_multiplicity}
        return collapsed, {**kwargs, "joint_attention_kwargs": joint}

    @classmethod
    def from_pretrained(
        cls, path: str, subfolder: str | None = "transformer", **kwargs: Any
    ) -> SD3Wrapper:
        """Load the transformer (``SD3Transformer2DModel.from_pretrained``) and wrap it."""
        return cls(SD3Transformer2DModel.from_pretrained(path, subfolder=subfolder, **kwargs))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Flow prediction for ``x_t`` at RF time ``t`` in [0, 1].

        Args:
            hidden_states: ``x_t``, ``[B, C, H, W]`` normalised VAE latents.
            timestep: ``t`` in [0, 1], ``[B]`` (or a scalar / ``[1]``, broadcast).
            encoder_hidden_states: ``prompt_embeds`` ``[B, L, joint_attention_dim]``.
            pooled_projections: ``pooled_prompt_embeds`` ``[B, pooled_projection_dim]``.
            **kwargs: passed to the transformer (``joint_attention_kwargs``, ``skip_layers``,
                ``block_controlnet_hidden_states``).
        """
        if encoder_hidden_states is None or pooled_projections is None:
            raise ValueError(
                "SD3Wrapper needs encoder_hidden_states (prompt_embeds) and pooled_projections "
                "(pooled_prompt_embeds); got "
                f"encoder_hidden_states={_describe(encoder_hidden_states)}, "
                f"pooled_projections={_describe(pooled_projections)}"
            )
        if hidden_states.ndim != 4:
            raise ValueError(
                f"SD3Wrapper expects latents [B, C, H, W], got shape {tuple(hidden_states.shape)}"
            )
        patch = self.transformer.config.patch_size
        height, width = hidden_states.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(
                f"latent height/width ({height}, {width}) must be multiples of patch_size={patch}"
            )
        t = self._check_timestep(
            timestep,
            hidden_states.shape[0],
            hidden_states.device,
            scaling=f"scales it by {self.num_train_timesteps} itself",
        )
        # The patch-embedding conv takes the latents, so its weight dtype is the compute dtype
        # (diffusers' layerwise casting skips pos_embed); cheaper than walking every module.
        dtype = self.transformer.pos_embed.proj.weight.dtype
        encoder_hidden_states, kwargs = self._collapse(encoder_hidden_states, kwargs, dtype)
        # The stock pipeline passes float32 timesteps (sigma * 1000, computed in float32) to a
        # model of any dtype; the time embedding casts after the sinusoidal projection.
        out = self.transformer(
            hidden_states=hidden_states.to(dtype),
            timestep=t * float(self.num_train_timesteps),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            pooled_projections=pooled_projections.to(dtype),
            return_dict=False,
            **kwargs,
        )[0]
        return out


def _describe(value: Any) -> str:
    return "None" if value is None else f"shape {tuple(value.shape)}"


# -- feature capture ----------------------------------------------------------------------------


def _find_transformer(model: nn.Module) -> nn.Module:
    """The module holding ``transformer_blocks`` (the wrapper, DDP, compile wrappers unwrapped)."""
    return find_transformer(
        model,
        lambda module: isinstance(getattr(module, "transformer_blocks", None), nn.ModuleList),
        ValueError,
        "holds no SD3 transformer (no .transformer_blocks found through .transformer / .module / "
        "._orig_mod)",
    )


def _config_of(source: Any) -> Mapping[str, Any]:
    return config_of(
        source, _find_transformer, expected="an SD3 transformer, SD3Wrapper, pipeline or config"
    )


def default_feature_indices(model_or_config: Any) -> tuple[int, ...]:
    """Blocks at about 1/3, 2/3 and the end of the depth (``num_layers`` int, config or model).

    SD3 / SD3.5 medium (24 layers): ``(7, 15, 23)``; SD3.5 large (38 layers): ``(12, 24, 37)``.
    """
    if isinstance(model_or_config, int):
        num_layers = model_or_config
    else:
        num_layers = int(_config_of(model_or_config)["num_layers"])
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return tuple(sorted({max(round(num_layers * k / 3) - 1, 0) for k in (1, 2, 3)}))


def _image_tokens_to_map(output: Any, capture: FeatureCapture) -> torch.Tensor:
    """``(encoder_hidden_states, hidden_states)`` -> image stream as ``[B, C, H/p, W/p]``."""
    if not (isinstance(output, tuple) and len(output) == 2 and torch.is_tensor(output[1])):
        raise TypeError(
            "SD3 feature capture expects a JointTransformerBlock output "
            f"(encoder_hidden_states, hidden_states), got {type(output).__name__}"
        )
    grid = capture.meta.get(_TOKEN_GRID_KEY)
    if grid is None:
        raise RuntimeError("SD3 feature capture saw no transformer input (token grid unknown)")
    # PatchEmbed flattens the conv output row-major: token index = row * width + col.
    return tokens_to_map(output[1], grid, "image")


def attach_feature_capture(
    model: nn.Module, feature_indices: Sequence[int] | None = None
) -> FeatureCapture:
    """Hook ``transformer_blocks[i]`` of an SD3 model (wrapper or raw transformer) for the GAN.

    Each captured feature is the block's image-token stream (the second item of its output;
    the text stream is ignored) folded back to ``[B, inner_dim, H/p, W/p]`` for ``[B, C, H, W]``
    latents. ``feature_indices`` defaults to :func:`default_feature_indices`.
    """
    transformer = _find_transformer(model)
    indices = (
        default_feature_indices(transformer.config) if feature_indices is None else feature_indices
    )
    capture = _attach_feature_capture(
        model, indices, blocks="transformer_blocks", transform=_image_tokens_to_map
    )
    patch = int(transformer.config.patch_size)
    capture.add_input_hook(transformer, latent_grid_hook(_TOKEN_GRID_KEY, (patch, patch)))
    return capture


def build_discriminator(
    model_or_config: Any,
    feature_indices: Sequence[int] | None = None,
    *,
    hidden_channels: int | None = None,
) -> ImageDiTDiscriminator:
    """An :class:`ImageDiTDiscriminator` for the maps :func:`attach_feature_capture` yields.

    Channels are the transformer's inner dim (``num_attention_heads * attention_head_dim``);
    one head per captured block.
    """
    config = _config_of(model_or_config)
    indices = default_feature_indices(config) if feature_indices is None else feature_indices
    return ImageDiTDiscriminator(
        inner_dim(config), len(set(indices)), hidden_channels=hidden_channels
    )


# -- pipeline glue ------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompt(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    prompt_2: str | list[str] | None = None,
    prompt_3: str | list[str] | None = None,
    negative_prompt_2: str | list[str] | None = None,
    negative_prompt_3: str | list[str] | None = None,
    device: torch.device | str | None = None,
    num_images_per_prompt: int = 1,
    max_sequence_length: int = 256,
    clip_skip: int | None = None,
) -> dict[str, torch.Tensor]:
    """Positive and negative conditioning through ``StableDiffusion3Pipeline.encode_prompt``.

    Returns ``{"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
    "negative_pooled_prompt_embeds"}`` (the stock pipeline's own argument names, so
    ``pipe(**emb)`` works). For the networks: ``encoder_hidden_states=prompt_embeds`` and
    ``pooled_projections=pooled_prompt_embeds``. SD3 has no text attention mask. A missing
    ``negative_prompt`` is ``""``, as in the pipeline.
    """
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=prompt_2,
        prompt_3=prompt_3,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        negative_prompt_3=negative_prompt_3,
        device=device,
        num_images_per_prompt=num_images_per_prompt,
        do_classifier_free_guidance=True,
        max_sequence_length=max_sequence_length,
        clip_skip=clip_skip,
    )
    return {
        "prompt_embeds": pos,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": neg,
        "negative_pooled_prompt_embeds": neg_pooled,
    }


def _vae_factors(vae: Any) -> tuple[float, float]:
    config = vae if isinstance(vae, Mapping) else vae.config
    scaling = config["scaling_factor"]
    # SD3 VAEs set shift_factor; a VAE without one (None) is treated as unshifted.
    shift = config.get("shift_factor") or 0.0
    return float(scaling), float(shift)


def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE posterior sample -> model latents: ``(z - shift_factor) * scaling_factor``.

    ``vae`` is the ``AutoencoderKL`` or its config.
    """
    scaling, shift = _vae_factors(vae)
    return (latents - shift) * scaling


def denormalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> VAE decoder input: ``z / scaling_factor + shift_factor`` (what
    ``StableDiffusion3Pipeline`` does before ``vae.decode``)."""
    scaling, shift = _vae_factors(vae)
    return latents / scaling + shift


def latent_shape(
    source: Any,
    height: int,
    width: int,
    batch_size: int = 1,
    *,
    vae_scale_factor: int | None = None,
) -> tuple[int, int, int, int]:
    """``(B, in_channels, height / 8, width / 8)`` for an image of ``height x width`` pixels.

    ``source`` is a pipeline (its ``vae_scale_factor`` is used), a transformer / wrapper, or a
    transformer config (``vae_scale_factor`` defaults to 8, the SD3 VAE). Like the pipeline's
    ``check_inputs``, ``height`` and ``width`` must be multiples of ``vae_scale_factor *
    patch_size``.
    """
    config = _config_of(source)
    if vae_scale_factor is None:
        vae_scale_factor = int(getattr(source, "vae_scale_factor", 8))
    multiple = vae_scale_factor * int(config["patch_size"])
    if height % multiple or width % multiple:
        raise ValueError(
            f"height and width must be multiples of {multiple} (vae_scale_factor * patch_size), "
            f"got {height} and {width}"
        )
    return (
        int(batch_size),
        int(config["in_channels"]),
        height // vae_scale_factor,
        width // vae_scale_factor,
    )


# -- stock-pipeline inference -------------------------------------------------------------------


def student_scheduler_config(
    t_list: Sequence[float],
    sample_type: str = "ode",
    base_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``FlowMatchEulerDiscreteScheduler`` config under which ``StableDiffusion3Pipeline``,
    called with :func:`stock_pipeline_kwargs`, visits exactly the student's rungs.

    ``set_timesteps(sigmas=...)`` shifts custom sigmas (statically with ``shift``, or
    dynamically with ``mu``), stretches them with ``shift_terminal`` and may convert them to
    Karras / exponential / beta; all of that is switched off here, so the sigmas stay
    ``t_list[:-1]`` and the scheduler appends the final ``0.0``. The transformer then sees
    ``timestep = 1000 * t``. ``sample_type="ode"`` gives Euler steps (the same as
    :func:`~fastgen_diffusers.sampling.sample_student`'s ODE transition); ``"sde"`` sets
    ``stochastic_sampling=True`` (predict x0, re-noise with fresh noise).

    The schedule itself cannot live in the config (``num_inference_steps`` alone gives
    ``linspace(1, sigma_min)``): pass ``sigmas`` as :func:`stock_pipeline_kwargs` does.
    ``base_config`` (e.g. the teacher's ``scheduler.config``) keeps its other keys (private
    ones and ``use_flow_sigmas`` aside). Save the result as ``scheduler/scheduler_config.json``
    of the exported student.
    """
    # StableDiffusion3Pipeline passes scheduler timesteps (sigma * num_train_timesteps) to the
    # transformer: keep the base's scale.
    steps = int((base_config or {}).get("num_train_timesteps") or NUM_TRAIN_TIMESTEPS)
    return flow_match_student_config(t_list, sample_type, base_config, num_train_timesteps=steps)


def stock_pipeline_kwargs(t_list: Sequence[float]) -> dict[str, Any]:
    """Call arguments making ``StableDiffusion3Pipeline`` run the distilled student's schedule.

    ``{"num_inference_steps": N, "sigmas": t_list[:-1], "guidance_scale": 1.0}`` (CFG off:
    the student is distilled with guidance). Use with a scheduler built from
    :func:`student_scheduler_config`.

    The pipeline starts from unscaled noise ``x = noise``, while
    :func:`~fastgen_diffusers.sampling.sample_student` starts at ``t_list[0] * noise``; pass
    ``latents=t_list[0] * noise`` to reproduce it exactly. For ``sde`` the pipeline does not
    hand its ``generator`` to ``scheduler.step``, so the fresh noise comes from the global RNG:
    ``torch.manual_seed(s)`` before the call matches ``sample_student(...,
    generator=torch.Generator(device).manual_seed(s))`` (given explicit ``latents``).
    """
    values = validate_t_list(t_list)
    return {
        "num_inference_steps": len(values) - 1,
        "sigmas": values[:-1],
        "guidance_scale": 1.0,
    }


# -- the family ---------------------------------------------------------------------------------


@register_family
class SD3Family(Family):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5) for the training machinery.

    Conditioning: ``encoder_hidden_states`` (CLIP + T5 tokens) and ``pooled_projections``.

    Example::

        family = SD3Family()
        pipe = family.load_pipeline("stabilityai/stable-diffusion-3.5-medium")
        teacher = family.wrap(pipe.transformer)
        cond = family.encode_prompts(pipe, ["a cat"])
    """

    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    transformer_class = SD3Transformer2DModel
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
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS + (
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    lora_loader_class = SD3LoraLoaderMixin
    pipeline_tag = "text-to-image"

    # The rest of the contract is this module's functions.
    normalize_latents = staticmethod(normalize_latents)
    denormalize_latents = staticmethod(denormalize_latents)
    attach_feature_capture = staticmethod(attach_feature_capture)
    student_scheduler_config = staticmethod(student_scheduler_config)
    stock_pipeline_kwargs = staticmethod(stock_pipeline_kwargs)
    _discriminator = staticmethod(build_discriminator)
    _latent_shape = staticmethod(latent_shape)

    def wrap(self, transformer: nn.Module) -> SD3Wrapper:
        return SD3Wrapper(transformer)

    def _encode_prompts(
        self, pipe: Any, prompts: list[str], max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        # encode_prompt also encodes the pipeline's default negative (""); only the prompts'
        # part is kept, so positive and negative prompts come out of one code path.
        emb = encode_prompt(pipe, prompts, max_sequence_length=max_sequence_length)
        return {
            "encoder_hidden_states": emb["prompt_embeds"],
            "pooled_projections": emb["pooled_prompt_embeds"],
        }
