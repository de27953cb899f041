"""Tiny, complete diffusers pipelines of every supported family, built offline and saved to disk.

Each ``save_tiny_<family>(path)`` builds the whole pipeline from config (a 1-2 layer transformer,
a tiny VAE, the scheduler, text encoders and tokenizers made from local vocabularies), seeded so
that two calls give identical weights, and saves it with ``save_pretrained``. The folder then
loads like a Hub checkpoint::

    path = save_tiny_sd3(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    image = pipe(prompt="a cat", num_inference_steps=2, output_type="pt", **CALL_KWARGS["sd3"])

Nothing is downloaded. ``CALL_KWARGS[family]`` holds pixel sizes (and ``num_frames`` for Wan)
the tiny models accept; ``TEXT_LENGTHS[family]`` a ``max_sequence_length`` that keeps the text
encoders fast.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = [
    "CALL_KWARGS",
    "TEXT_LENGTHS",
    "save_tiny_flux",
    "save_tiny_qwen_image",
    "save_tiny_sd3",
    "save_tiny_wan",
]

# Pixel sizes the tiny pipelines take (non-square, so a transposed grid shows). Latents:
# SD3 / Flux 8 x 12 (VAE factor 2), Wan 2 frames of 8 x 12, Qwen-Image 1 frame of 8 x 12.
CALL_KWARGS: dict[str, dict[str, int]] = {
    "sd3": {"height": 16, "width": 24},
    "flux": {"height": 16, "width": 24},
    "wan": {"height": 64, "width": 96, "num_frames": 5},
    "wan_i2v": {"height": 64, "width": 96, "num_frames": 5},
    "qwen_image": {"height": 64, "width": 96},
}
# max_sequence_length for the T5 / umT5 / Qwen text encoders in tests. Qwen's byte-level
# tokenizer has no merges, so the chat template alone is ~150 tokens: keep room for the prompt.
TEXT_LENGTHS: dict[str, int] = {"sd3": 8, "flux": 8, "wan": 8, "wan_i2v": 8, "qwen_image": 256}

_LETTERS = string.ascii_lowercase


# -- shared pieces ------------------------------------------------------------------------------


def _save(pipe: DiffusionPipeline, path: str | os.PathLike) -> Path:
    """``pipe.save_pretrained`` into a sibling temporary folder, then rename it to ``path``
    (which must not exist, or be an empty folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pipe.save_pretrained(staging)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _clip_tokenizer(max_length: int) -> Any:
    """A CLIP BPE tokenizer over single letters (no merges): ``"cat"`` -> ``c a t</w>``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer() -> Any:
    """A T5 / umT5 Unigram tokenizer over letters and word-initial letters."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + c, -1.0) for c in _LETTERS]
    pieces += [(c, -2.0) for c in _LETTERS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip_text_encoder(
    seed: int, vocab_size: int, hidden: int, max_length: int, projection: int | None
) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    return model.eval()


def _t5_text_encoder(seed: int, vocab_size: int, d_model: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    return T5EncoderModel(config).eval()


def _image_vae(seed: int, latent_channels: int, scaling: float, shift: float) -> AutoencoderKL:
    """Two-level ``AutoencoderKL`` (``vae_scale_factor = 2``) with the family's factors."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        scaling_factor=scaling,
        shift_factor=shift,
    ).eval()


# -- Stable Diffusion 3 -------------------------------------------------------------------------


# The tiny SD3 transformer of save_tiny_sd3 (tests that build the transformer alone use it too).
TINY_SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=24,
    out_channels=4,
    pos_embed_max_size=16,
)


def save_tiny_sd3(path: str | os.PathLike) -> Path:
    """A tiny ``StableDiffusion3Pipeline``: 2-layer transformer (4 latent channels), two CLIP
    encoders (pooled 12 + 12) and a T5 encoder, SD3's VAE factors."""
    with torch.random.fork_rng(devices=[]):
        clip_length = 8
        tokenizer = _clip_tokenizer(clip_length)
        tokenizer_3 = _t5_tokenizer()
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**TINY_SD3_CONFIG).eval()
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_image_vae(1, 4, scaling=1.5305, shift=0.0609),
            text_encoder=_clip_text_encoder(2, len(tokenizer), 8, clip_length, projection=12),
            tokenizer=tokenizer,
            text_encoder_2=_clip_text_encoder(3, len(tokenizer), 8, clip_length, projection=12),
            tokenizer_2=_clip_tokenizer(clip_length),
            text_encoder_3=_t5_text_encoder(4, len(tokenizer_3), 32),
            tokenizer_3=tokenizer_3,
        )
    return _save(pipe, path)


# -- Flux ---------------------------------------------------------------------------------------


def save_tiny_flux(path: str | os.PathLike, *, guidance_embeds: bool = True) -> Path:
    """A tiny ``FluxPipeline`` (Flux-dev layout with ``guidance_embeds``): 1 double + 1 single
    block, CLIP (pooled 16) + T5 encoders, Flux's VAE factors and dynamic-shift scheduler."""
    with torch.random.fork_rng(devices=[]):
        clip_length = 8
        tokenizer = _clip_tokenizer(clip_length)
        tokenizer_2 = _t5_tokenizer()
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        ).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=_image_vae(1, 4, scaling=0.3611, shift=0.1159),
            text_encoder=_clip_text_encoder(2, len(tokenizer), 16, clip_length, projection=None),
            tokenizer=tokenizer,
            text_encoder_2=_t5_text_encoder(3, len(tokenizer_2), 32),
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
    return _save(pipe, path)


# -- Wan ----------------------------------------------------------------------------------------


def save_tiny_wan(
    path: str | os.PathLike,
    *,
    expand_timesteps: bool = False,
    boundary_ratio: float | None = None,
    image_to_video: bool = False,
) -> Path:
    """A tiny text-to-video ``WanPipeline``: 2-layer transformer, umT5 encoder, a Wan VAE with
    the 8x spatial / 4x temporal factors of the real one (4 latent channels).

    ``boundary_ratio`` (e.g. 0.875): a Wan 2.2 A14B-style two-expert pipeline, ``transformer_2``
    (the low-noise expert) of the same architecture with other weights.

    ``image_to_video``: a ``WanImageToVideoPipeline`` of the Wan 2.2 I2V-A14B layout (no CLIP
    image encoder; the transformers take 4 noisy + 4 frame-mask + 4 condition channels).

    The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (the released checkpoints
    ship UniPC), so that an Euler sampler can reproduce the pipeline step for step.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = _t5_tokenizer()
        torch.manual_seed(0)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=12 if image_to_video and not expand_timesteps else 4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        ).eval()
        transformer_2 = None
        if boundary_ratio is not None:
            torch.manual_seed(3)
            transformer_2 = WanTransformer3DModel.from_config(transformer.config).eval()
        torch.manual_seed(1)
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.3, -0.5, 0.1, 0.8],
            latents_std=[1.7, 0.6, 2.5, 1.1],
        ).eval()
        torch.manual_seed(2)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=16,
                d_kv=4,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
            )
        ).eval()
        extra = {"image_processor": None, "image_encoder": None} if image_to_video else {}
        pipe = (WanImageToVideoPipeline if image_to_video else WanPipeline)(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            transformer=transformer,
            expand_timesteps=expand_timesteps,
            **extra,
            **(
                {"transformer_2": transformer_2, "boundary_ratio": boundary_ratio}
                if boundary_ratio is not None
                else {}
            ),
        )
    return _save(pipe, path)


# -- Qwen-Image ---------------------------------------------------------------------------------


def save_tiny_qwen_image(path: str | os.PathLike) -> Path:
    """A tiny ``QwenImagePipeline``: 2-layer transformer, a 1-layer Qwen2.5-VL text encoder with a
    byte-level tokenizer (one token per byte, plus the chat-template specials), a Qwen-Image VAE
    (8x spatial) and Qwen-Image's scheduler config."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from fastgen_diffusers.plugins.qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG

    with torch.random.fork_rng(devices=[]):
        vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        text_dim = 24
        torch.manual_seed(0)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_dim,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        torch.manual_seed(1)
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.2, 0.3, -0.4],
            latents_std=[1.5, 0.5, 2.0, 0.8],
        ).eval()
        torch.manual_seed(2)
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=text_dim,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
                # The released ids (151643 / 151645) lie outside the tiny vocabulary.
                bos_token_id=None,
                eos_token_id=None,
            ),
            vision_config=dict(
                depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_dim
            ),
        )
        scheduler_config = {
            k: v for k, v in QWEN_IMAGE_SCHEDULER_CONFIG.items() if k != "_class_name"
        }
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
            vae=vae,
            text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
            tokenizer=tokenizer,
            transformer=transformer,
        )
    return _save(pipe, path)
