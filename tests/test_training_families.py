"""The training loop's family interface against complete tiny pipelines saved to disk.

Each family's pipeline (``tests/tiny_pipelines.py``) is loaded the way a Hub checkpoint is, and
the interface is checked against the stock pipeline itself: prompt conditioning drives the
wrapper to the pipeline's own latents (with CFG), decoding gives the pipeline's
``output_type="pt"`` images, and the exported student's scheduler makes the pipeline follow the
student's rungs.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tiny_pipelines import (
    CALL_KWARGS,
    TEXT_LENGTHS,
    save_tiny_flux,
    save_tiny_qwen_image,
    save_tiny_sd3,
    save_tiny_wan,
)

from fastgen_diffusers.plugins import family_from_pretrained, flux, qwen_image, sd3, wan
from fastgen_diffusers.plugins.flux import FluxFamily
from fastgen_diffusers.plugins.qwen_image import QwenImageFamily
from fastgen_diffusers.plugins.sd3 import SD3Family
from fastgen_diffusers.plugins.wan import WanFamily
from fastgen_diffusers.sampling import sample_student, sample_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["sd3", "flux", "wan", "qwen_image"]
SAVERS = {
    "sd3": save_tiny_sd3,
    "flux": save_tiny_flux,
    "wan": save_tiny_wan,
    "qwen_image": save_tiny_qwen_image,
}
EXPECTED = {
    "sd3": (SD3Family, "StableDiffusion3Pipeline", sd3.SD3Wrapper, False),
    "flux": (FluxFamily, "FluxPipeline", flux.FluxWrapper, False),
    "wan": (WanFamily, "WanPipeline", wan.WanWrapper, True),
    "qwen_image": (QwenImageFamily, "QwenImagePipeline", qwen_image.QwenImageWrapper, False),
}
COND_KEYS = {
    "sd3": {"encoder_hidden_states", "pooled_projections"},
    "flux": {"encoder_hidden_states", "pooled_projections"},
    "wan": {"encoder_hidden_states"},
    "qwen_image": {"encoder_hidden_states", "encoder_hidden_states_mask"},
}
PROMPTS = ["a cat", "a red fox jumping over the lazy dog"]
NEGATIVE = "blurry"
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: str(SAVERS[name](root / name)) for name in FAMILIES}


def _load(saved: dict[str, str], name: str):
    family = family_from_pretrained(saved[name])
    pipe = family.load_pipeline(saved[name])
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def _size(name: str) -> dict[str, int]:
    return dict(CALL_KWARGS[name])


def _media_size(name: str) -> tuple[int, int, int | None]:
    size = _size(name)
    return size["height"], size["width"], size.get("num_frames")


def _noise(family, pipe, name: str, batch: int, seed: int = 0) -> torch.Tensor:
    shape = family.latent_shape(pipe, *_media_size(name))
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _pipeline_latents(name: str, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the layout the stock pipeline's ``latents=`` takes (Flux / Qwen pack)."""
    if name == "flux":
        return flux.pack_latents(latents)
    if name == "qwen_image":
        return qwen_image.pack_latents(latents)
    return latents


def _pipeline_output(name: str, out, like: torch.Tensor) -> torch.Tensor:
    """The ``output_type="latent"`` result in the wrapper's layout (``like``'s shape)."""
    if name == "wan":
        return out.frames
    if name == "flux":
        return flux.unpack_latents(out.images, *like.shape[-2:])
    if name == "qwen_image":
        return qwen_image.unpack_latents(out.images, *like.shape[-2:])
    return out.images


def _cfg(name: str, scale: float) -> dict[str, float]:
    # Flux (dev) and Qwen-Image run real CFG through true_cfg_scale; Flux keeps its embedded
    # guidance at the default 3.5, as the wrapper does.
    return (
        {"true_cfg_scale": scale} if name in ("flux", "qwen_image") else {"guidance_scale": scale}
    )


def _split(cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rest = dict(cond)
    return rest.pop("encoder_hidden_states"), rest


@pytest.mark.parametrize("name", FAMILIES)
def test_family_detected_and_pipeline_loaded(saved, name):
    family_cls, pipeline_name, wrapper_cls, is_video = EXPECTED[name]
    family = family_from_pretrained(saved[name])
    assert isinstance(family, family_cls) and family.name == name
    assert family.pipeline_class.__name__ == pipeline_name and family.is_video is is_video
    pipe = family.load_pipeline(saved[name], torch_dtype=torch.bfloat16)
    assert type(pipe) is family.pipeline_class
    assert pipe.transformer.dtype == torch.bfloat16
    assert isinstance(family.wrap(pipe.transformer), wrapper_cls)


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_prompts_feed_the_wrapper_like_the_stock_pipeline(saved, name):
    family, pipe = _load(saved, name)
    length = TEXT_LENGTHS[name]
    cond = family.encode_prompts(pipe, PROMPTS, max_sequence_length=length)
    negative = family.encode_prompts(pipe, [NEGATIVE], max_sequence_length=length)
    # Same keys for prompts and the negative prompt, batch first, one shape per sample.
    assert set(cond) == set(negative) == COND_KEYS[name]
    for key in cond:
        assert cond[key].shape[0] == 2 and negative[key].shape[0] == 1
        assert cond[key].shape[1:] == negative[key].shape[1:]
        assert not cond[key].requires_grad
    if name == "qwen_image":
        mask = cond["encoder_hidden_states_mask"]
        assert cond["encoder_hidden_states"].shape[1] == length  # padded to the fixed length
        assert mask[0].sum() < mask[1].sum() < length  # the shorter prompt has more padding

    noise = _noise(family, pipe, name, batch=2)
    scale = 4.0
    out = pipe(
        prompt=PROMPTS,
        negative_prompt=NEGATIVE,
        latents=_pipeline_latents(name, noise),
        num_inference_steps=3,
        max_sequence_length=length,
        output_type="latent",
        **_cfg(name, scale),
        **_size(name),
    )
    reference = _pipeline_output(name, out, noise)
    sigmas = pipe.scheduler.sigmas.tolist()  # the schedule the call used, final 0 included
    assert len(sigmas) == 4 and sigmas[-1] == 0.0

    model = family.wrap(pipe.transformer)
    embeds, kwargs = _split(cond)
    neg_embeds, neg_kwargs = _split({k: v.expand(2, *v.shape[1:]) for k, v in negative.items()})
    if name == "qwen_image":
        # QwenImagePipeline rescales the guided flow per token (true_cfg_guidance); the
        # library's sample_teacher applies plain CFG, so the Euler loop is spelled out here.
        x = noise
        for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((2,), s_cur)
            with torch.no_grad():
                v_cond = model(x, t, embeds, **kwargs)
                v_uncond = model(x, t, neg_embeds, **neg_kwargs)
            x = x + (s_next - s_cur) * qwen_image.true_cfg_guidance(v_cond, v_uncond, scale)
        ours = x
    else:
        ours = sample_teacher(
            model,
            noise,
            sigmas,
            guidance_scale=scale,
            encoder_hidden_states=embeds,
            negative_encoder_hidden_states=neg_embeds,
            model_kwargs=kwargs,
            negative_model_kwargs=neg_kwargs,
        )
    assert ours.shape == noise.shape
    torch.testing.assert_close(ours, reference, **TOL)
    assert (reference - noise).abs().mean() > 0.1  # the pipeline moved the latents


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_equals_the_stock_pt_output(saved, name):
    family, pipe = _load(saved, name)
    noise = _noise(family, pipe, name, batch=1, seed=3)
    call = dict(
        prompt="a cat",
        latents=_pipeline_latents(name, noise),
        num_inference_steps=2,
        max_sequence_length=TEXT_LENGTHS[name],
        **_size(name),
    )
    latents = _pipeline_output(name, pipe(output_type="latent", **call), noise)
    stock = pipe(output_type="pt", **call)
    ours = family.decode(pipe, latents)
    height, width, frames = _media_size(name)
    if name == "wan":
        assert ours.shape == (1, 3, frames, height, width)
        # WanPipeline returns [B, F, 3, H, W]; the family's media layout is channels first.
        torch.testing.assert_close(ours, stock.frames.permute(0, 2, 1, 3, 4), rtol=0, atol=0)
    else:
        assert ours.shape == (1, 3, height, width)
        torch.testing.assert_close(ours, stock.images, rtol=0, atol=0)
    assert 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_media_gives_deterministic_normalised_latents(saved, name):
    family, pipe = _load(saved, name)
    height, width, frames = _media_size(name)
    media = (2, 3, frames, height, width) if family.is_video else (2, 3, height, width)
    pixels = torch.rand(media, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latents = family.encode_media(pipe, pixels)
    assert latents.shape == (2, *family.latent_shape(pipe, height, width, frames))
    # The posterior mean, normalised by the plugin: a cache of it is reproducible.
    assert torch.equal(latents, family.encode_media(pipe, pixels))
    vae_input = pixels.unsqueeze(2) if name == "qwen_image" else pixels
    with torch.no_grad():
        mean = pipe.vae.encode(vae_input).latent_dist.mean
    plugin = {"sd3": sd3, "flux": flux, "wan": wan, "qwen_image": qwen_image}[name]
    torch.testing.assert_close(latents, plugin.normalize_latents(pipe.vae, mean))
    images = family.decode(pipe, latents)
    assert images.shape == media
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0

    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        family.encode_media(pipe, (pixels + 1) * 127.5)  # uint8-range pixels
    with pytest.raises(ValueError, match=r"\[B, 3, "):
        family.encode_media(pipe, pixels[:, :, 0] if family.is_video else pixels[:, None])


@pytest.mark.parametrize("name", FAMILIES)
def test_free_encoders_drops_text_encoders_and_tokenizers(saved, name):
    family, pipe = _load(saved, name)
    encoder = weakref.ref(pipe.text_encoder)
    family.free_encoders(pipe)
    for component in family.text_components:
        assert getattr(pipe, component) is None
        assert tuple(pipe.config[component]) == (None, None)  # a saved pipeline omits them too
    assert encoder() is None  # the memory is released, not just unreferenced by name
    assert pipe.transformer is not None and pipe.vae is not None


@pytest.mark.parametrize("name", FAMILIES)
def test_student_scheduler_makes_the_stock_pipeline_follow_t_list(saved, name, tmp_path):
    """The exported student's scheduler (written as the export writes it, by diffusers'
    save_pretrained) and call arguments make the stock pipeline reproduce the few-step sampler
    fed with the cached conditioning."""
    from fastgen_diffusers.training.export import write_scheduler

    family, pipe = _load(saved, name)
    t_list = [0.999, 0.5, 0.0]
    config = family.student_scheduler_config(t_list, "ode", pipe.scheduler.config)
    written = json.loads(write_scheduler(tmp_path, config).read_text())
    assert written["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    values = {k: v for k, v in config.items() if k != "_class_name"}
    assert {k: written[k] for k in values} == values  # diffusers adds defaults, keeps these
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tmp_path, subfolder="scheduler"
    )
    noise = _noise(family, pipe, name, batch=1, seed=7)
    start = (noise.double() * t_list[0]).float()  # stock pipelines use latents as given
    out = pipe(
        prompt=PROMPTS[:1],
        latents=_pipeline_latents(name, start),
        max_sequence_length=TEXT_LENGTHS[name],
        output_type="latent",
        **family.stock_pipeline_kwargs(t_list),
        **_size(name),
    )
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor(t_list), rtol=0, atol=1e-6)
    cond = family.encode_prompts(pipe, PROMPTS[:1], max_sequence_length=TEXT_LENGTHS[name])
    embeds, kwargs = _split(cond)
    ours = sample_student(
        family.wrap(pipe.transformer),
        noise,
        t_list,
        encoder_hidden_states=embeds,
        model_kwargs=kwargs,
    )
    torch.testing.assert_close(ours, _pipeline_output(name, out, noise), **TOL)


def test_flux_embedded_guidance(saved):
    family, pipe = _load(saved, "flux")
    assert family.wrap(pipe.transformer).guidance_scale == 3.5  # FluxPipeline's default
    assert FluxFamily(guidance=4.0).wrap(pipe.transformer).guidance_scale == 4.0
    assert FluxFamily(guidance=4.0).stock_pipeline_kwargs([0.999, 0.0])["guidance_scale"] == 4.0
    schnell = FluxTransformer2DModel.from_config(
        {**pipe.transformer.config, "guidance_embeds": False}
    )
    assert FluxFamily(guidance=4.0).wrap(schnell).guidance_scale is None
    # Families without an embedded guidance take no guidance option.
    _, sd3_pipe = _load(saved, "sd3")
    assert isinstance(SD3Family().wrap(sd3_pipe.transformer), sd3.SD3Wrapper)


def test_latent_shapes(saved):
    wan_family, wan_pipe = _load(saved, "wan")
    # 64 x 96 pixels, VAE 8x spatial / 4x temporal; WanPipeline's default is 81 frames.
    assert wan_family.latent_shape(wan_pipe, 64, 96, num_frames=5) == (4, 2, 8, 12)
    assert wan_family.latent_shape(wan_pipe, 64, 96) == (4, 21, 8, 12)
    flux_family, flux_pipe = _load(saved, "flux")
    assert flux_family.latent_shape(flux_pipe, 16, 24) == (4, 8, 12)
    with pytest.raises(ValueError, match="multiples of 4"):
        flux_family.latent_shape(flux_pipe, 18, 24)
    with pytest.raises(ValueError, match="num_frames"):
        flux_family.latent_shape(flux_pipe, 16, 24, num_frames=5)


def test_wan_expand_timesteps_comes_from_the_checkpoint(tmp_path):
    path = save_tiny_wan(tmp_path / "ti2v", expand_timesteps=True)
    family = family_from_pretrained(path)
    assert isinstance(family, WanFamily) and family.expand_timesteps is True
    pipe = family.load_pipeline(path)
    assert family.wrap(pipe.transformer).expand_timesteps is True
    with pytest.raises(ValueError, match="expand_timesteps=True"):
        WanFamily().load_pipeline(path)


def test_unsupported_folders_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither model_index.json nor transformer/config.json"):
        family_from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        family_from_pretrained(tmp_path / "missing")

    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline") as err:
        family_from_pretrained(sdxl)
    for supported in (
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "WanPipeline",
        "QwenImagePipeline",
    ):
        assert supported in str(err.value)

    a14b = tmp_path / "a14b"
    a14b.mkdir()
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
    }
    (a14b / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="two-expert.*boundary_ratio=None"):
        family_from_pretrained(a14b)  # transformer_2 would never run
    (a14b / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    family = family_from_pretrained(a14b)
    assert family.boundary_ratio == 0.875
    assert family.transformer_components == ("transformer", "transformer_2")

    # A folder holding only a transformer is recognised by its config class.
    bare = tmp_path / "bare" / "transformer"
    bare.mkdir(parents=True)
    (bare / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert isinstance(family_from_pretrained(bare.parent), FluxFamily)
