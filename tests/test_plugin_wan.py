"""Wan plugin: wrapper vs stock pipelines, student scheduler, feature capture, DMD step, dtypes.

Tiny models built from config (1-2 layers, inner dim 24, 3 latent frames of 8 x 12, a 4-channel
VAE); nothing is downloaded. Tolerances: the wrapper and the pipelines run the same float32
transformer calls; what differs is float32 rounding of the update arithmetic (sample_teacher's
Euler step and CFG are written differently, sample_student re-noises in float64), a few 1e-7
relative per step, so 1e-5 is tight yet safe.
"""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

import fastgen_diffusers.plugins.wan22 as wan22
from fastgen_diffusers import DMDConfig, DMDPipeline, create_fake_score, get_feature_capture
from fastgen_diffusers.plugins import wan
from fastgen_diffusers.sampling import sample_student, sample_teacher

TOL = {"rtol": 1e-5, "atol": 1e-5}
Z = 4  # latent channels of the tiny VAE
HEIGHT, WIDTH, FRAMES = 64, 96, 9  # -> latents [Z, 3, 8, 12], token grid (3, 4, 6)
LATENT = (Z, 3, 8, 12)
INNER = 24  # 2 heads x 12

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_diffusers")


def _transformer(seed: int = 0, *, num_layers: int = 2, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=Z,
        out_channels=Z,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=32,
    )
    config.update(overrides)
    return WanTransformer3DModel(**config).eval()


def _i2v14b_transformer(seed: int = 0) -> WanTransformer3DModel:
    # Wan 2.1 I2V layout: [latents, 4-channel frame mask, condition latents], CLIP embeddings.
    return _transformer(seed, in_channels=2 * Z + 4, image_dim=8, added_kv_proj_dim=INNER)


def _vae() -> AutoencoderKLWan:
    torch.manual_seed(1)
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=Z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.3, -0.5, 0.1, 0.8],
        latents_std=[1.7, 0.6, 2.5, 1.1],
    ).eval()


def _clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    config = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPVisionModel(config).eval(), processor


def _image(seed: int = 3) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))


def _embeds(batch: int = 1, tokens: int = 7, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, tokens, 16, generator=gen)
    return pos, torch.randn(batch, tokens, 16, generator=gen)


def _noise(batch: int = 1, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(seed))


def _record_timesteps(transformer: WanTransformer3DModel) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["timestep"].detach().clone())

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


# -- teacher reproduction --------------------------------------------------------------------


@pytest.mark.parametrize("expand_timesteps", [False, True], ids=["wan21", "ti2v_t2v"])
def test_teacher_reproduces_wan_pipeline(expand_timesteps):
    """WanPipeline (built with FlowMatchEulerDiscreteScheduler, shift 3, CFG 5) and
    sample_teacher on the wrapper give the same latents; the model sees identical timesteps
    (scalar, or per-token [B, F*H/2*W/2] with expand_timesteps)."""
    transformer = _transformer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=scheduler,
        transformer=transformer,
        expand_timesteps=expand_timesteps,
    )
    pos, neg = _embeds(batch=2)
    noise = _noise(batch=2)
    seen, handle = _record_timesteps(transformer)
    ref = pipe(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=noise,
        output_type="latent",
    ).frames
    sigmas = pipe.scheduler.sigmas.tolist()
    pipe_timesteps, seen[:] = list(seen), []
    teacher = wan.WanWrapper.from_pipeline(pipe)
    assert teacher.expand_timesteps is expand_timesteps
    ours = sample_teacher(
        teacher,
        noise,
        sigmas,
        guidance_scale=5.0,
        encoder_hidden_states=pos,
        negative_encoder_hidden_states=neg,
    )
    handle.remove()
    assert len(sigmas) == 5 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    torch.testing.assert_close(ours, ref, **TOL)
    # Same transformer inputs: the timesteps are bit-identical (cond and uncond passes).
    assert len(seen) == len(pipe_timesteps) == 8
    for a, b in zip(seen, pipe_timesteps):
        assert torch.equal(a, b)
    if expand_timesteps:
        assert seen[0].shape == (2, 3 * 4 * 6)
    assert float(seen[0].max()) == pytest.approx(1000.0)
    # Negative control: the unscaled t (what a missing x1000 would feed) is far off.
    wrong = sample_teacher(
        transformer,
        noise,
        sigmas,
        guidance_scale=5.0,
        encoder_hidden_states=pos,
        negative_encoder_hidden_states=neg,
    )
    assert (wrong - ref).abs().max() > 1e-3


def _i2v_pipe(kind: str) -> WanImageToVideoPipeline:
    if kind == "ti2v":
        transformer, encoder, processor = _transformer(), None, None
    else:
        transformer = _i2v14b_transformer()
        encoder, processor = _clip()
    return WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        image_processor=processor,
        image_encoder=encoder,
        transformer=transformer,
        expand_timesteps=kind == "ti2v",
    )


@pytest.mark.parametrize("kind", ["ti2v", "i2v14b"])
def test_teacher_reproduces_i2v_pipeline(kind):
    """WanImageToVideoPipeline vs sample_teacher on the wrapper with prepare_image_condition:
    TI2V-5B style (expand_timesteps, first latent frame = image latent at t=0, restored at the
    end) and Wan 2.1 I2V style (channel-concatenated mask + condition, CLIP embeddings, 512 text
    tokens)."""
    pipe = _i2v_pipe(kind)
    image = _image()
    tokens = 7 if kind == "ti2v" else wan.WAN_TEXT_TOKENS_WITH_IMAGE
    pos, neg = _embeds(tokens=tokens)
    noise = _noise()
    seen, handle = _record_timesteps(pipe.transformer)
    ref = pipe(
        image=image,
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=noise,
        output_type="latent",
    ).frames
    pipe_timesteps, seen[:] = list(seen), []
    cond = wan.prepare_image_condition(pipe, image, HEIGHT, WIDTH, FRAMES)
    teacher = wan.WanWrapper.from_pipeline(pipe)
    ours = sample_teacher(
        teacher,
        noise,
        pipe.scheduler.sigmas.tolist(),
        guidance_scale=4.0,
        encoder_hidden_states=pos,
        negative_encoder_hidden_states=neg,
        model_kwargs=cond,
    )
    handle.remove()
    torch.testing.assert_close(ours, ref, **TOL)
    assert len(seen) == len(pipe_timesteps) == 6
    for a, b in zip(seen, pipe_timesteps):
        assert torch.equal(a, b)
    if kind == "ti2v":
        assert set(cond) == {"condition_latents"}
        assert cond["condition_latents"].shape == (1, Z, 1, 8, 12)
        # Per-token timesteps: the 4 x 6 tokens of the first latent frame at t = 0.
        assert seen[0].shape == (1, 72)
        assert torch.all(seen[0][:, :24] == 0) and torch.all(seen[0][:, 24:] == 1000.0)
        torch.testing.assert_close(ours[:, :, :1], cond["condition_latents"], **TOL)
    else:
        assert cond["condition_latents"].shape == (1, 4 + Z, 3, 8, 12)
        assert cond["encoder_hidden_states_image"].shape == (1, 5, 8)
        assert seen[0].shape == (1,)


# -- student scheduler ------------------------------------------------------------------------

FASTGEN_4STEP = [0.999, 0.937, 0.833, 0.624, 0.0]
T_LISTS = {
    "1step": [0.999, 0.0],
    "2step": [0.999, 0.833, 0.0],
    "4step": wan.closest_reachable_t_list(FASTGEN_4STEP),
}


@pytest.mark.parametrize("sample_type", ["ode", "sde"])
@pytest.mark.parametrize("name", list(T_LISTS))
def test_student_in_stock_pipeline_matches_sample_student(name, sample_type):
    """A student transformer in WanPipeline with student_scheduler_config (built from the Wan
    default UniPC config) visits exactly t_list and reproduces sample_student (ODE: Euler ==
    x0 re-noising; SDE: same global-RNG draws, the pipeline passes no generator to step)."""
    t_list = T_LISTS[name]
    config = wan.student_scheduler_config(
        t_list, sample_type, base_config=UniPCMultistepScheduler(flow_shift=5.0).config
    )
    transformer = _transformer(seed=7)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(config),
        transformer=transformer,
    )
    pos, _ = _embeds()
    noise = _noise()
    kwargs = wan.stock_pipeline_kwargs(t_list)
    assert kwargs == {"num_inference_steps": len(t_list) - 1, "guidance_scale": 1.0}
    seen, handle = _record_timesteps(transformer)
    torch.manual_seed(123)
    ref = pipe(
        prompt_embeds=pos,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        latents=t_list[0] * noise,
        output_type="latent",
        **kwargs,
    ).frames
    handle.remove()
    visited = pipe.scheduler.sigmas
    assert torch.equal(visited, torch.tensor(t_list, dtype=torch.float32))
    assert [float(t) for t in seen] == [float(t) for t in visited[:-1] * 1000.0]
    torch.manual_seed(123)
    ours = sample_student(
        wan.WanWrapper(transformer),
        noise,
        t_list,
        sample_type=sample_type,
        encoder_hidden_states=pos,
    )
    torch.testing.assert_close(ours, ref, **TOL)


def test_student_scheduler_config_reachability(tmp_path):
    """Which t_lists a config alone reaches: every 1-/2-step list; 3+ rungs only on a curve.
    Facts of FlowMatchEulerDiscreteScheduler 0.42 the construction rests on are asserted too."""
    # Without extra keys the first rung is 1.0 whatever the shift, and shift_terminal with one
    # step divides 0 by 0.
    for shift in (1.0, 3.0, 5.0, 12.0):
        assert wan.pipeline_t_list({"shift": shift}, 3)[0] == 1.0
    assert math.isnan(wan.pipeline_t_list({"shift_terminal": 0.5}, 1)[0])
    assert wan.pipeline_t_list({"shift": 5.0}, 1) == [1.0, 0.0]

    for t_list in ([0.999, 0.0], [0.5, 0.0], [1.0, 0.0], [0.999, 0.833, 0.0], [0.9, 0.1, 0.0]):
        config = wan.student_scheduler_config(t_list)
        assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert config["num_train_timesteps"] == 1000 and config["stochastic_sampling"] is False
        visited = wan.pipeline_t_list(config, len(t_list) - 1)
        assert visited == torch.tensor(t_list, dtype=torch.float32).tolist()

    with pytest.raises(ValueError, match="Closest reachable"):
        wan.student_scheduler_config(FASTGEN_4STEP)
    closest = wan.closest_reachable_t_list(FASTGEN_4STEP)
    assert len(closest) == 5 and closest[-1] == 0.0
    assert closest[0] == pytest.approx(0.999) and closest[3] == pytest.approx(0.624)
    assert all(abs(a - b) < 0.15 for a, b in zip(closest, FASTGEN_4STEP))
    assert wan.closest_reachable_t_list(closest) == closest

    # The documented-keys family (first rung 1.0): found with shift / shift_terminal only.
    stock = FlowMatchEulerDiscreteScheduler(shift=5.0, shift_terminal=0.3)
    stock.set_timesteps(4)
    shifted = stock.sigmas.tolist()
    config = wan.student_scheduler_config(shifted, "sde")
    assert "sigma_max" not in config and config["shift"] == pytest.approx(5.0, rel=1e-4)
    assert config["stochastic_sampling"] is True
    assert wan.pipeline_t_list(config, 4) == shifted

    # Exported as scheduler/scheduler_config.json, the extra keys survive from_pretrained.
    config = wan.student_scheduler_config(T_LISTS["4step"])
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(4)
    assert loaded.sigmas.tolist() == T_LISTS["4step"]

    with pytest.raises(ValueError, match="num_train_timesteps"):
        wan.student_scheduler_config([0.999, 0.0], base_config={"num_train_timesteps": 500})
    with pytest.raises(ValueError, match="sample_type"):
        wan.student_scheduler_config([0.999, 0.0], "euler")
    with pytest.raises(ValueError, match="end with 0.0"):
        wan.student_scheduler_config([0.999, 0.5])


# -- feature capture --------------------------------------------------------------------------


def _block_outputs_by_hand(transformer, x, t, ehs):
    """The video-token stream after each block, recomputed from the transformer's parts."""
    rotary = transformer.rope(x)
    tokens = transformer.patch_embedding(x).flatten(2).transpose(1, 2)
    _, proj, text, _ = transformer.condition_embedder(t * 1000.0, ehs, None)
    proj = proj.unflatten(1, (6, -1))
    outs = []
    for block in transformer.blocks:
        tokens = block(tokens, text, proj, rotary)
        outs.append(tokens)
    return outs


@pytest.mark.parametrize("target", ["wrapper", "raw"])
def test_feature_maps_nonsquare_video_stream(target):
    """Maps are [B, D, F, H/2, W/2] = [2, 24, 3, 4, 6] for 8 x 12 latents and equal the block's
    video-token output folded frame-major / row-major (the text stream has 7 tokens, not 72)."""
    transformer = _transformer()
    wrapper = wan.WanWrapper(transformer)
    capture = wan.attach_feature_capture(wrapper if target == "wrapper" else transformer, [0, 1])
    assert get_feature_capture(wrapper) is capture
    x = _noise(batch=2)
    t = torch.tensor([0.3, 0.8])
    pos, _ = _embeds(batch=2)
    with torch.no_grad(), capture.record() as maps:
        if target == "wrapper":
            wrapper(x, t, pos)
        else:
            transformer(x, t * 1000.0, pos)
    with torch.no_grad():
        expected = _block_outputs_by_hand(transformer, x, t, pos)
    assert [tuple(m.shape) for m in maps] == [(2, INNER, 3, 4, 6)] * 2
    for fmap, tokens in zip(maps, expected):
        assert tokens.shape == (2, 72, INNER) and pos.shape[1] == 7
        torch.testing.assert_close(fmap.permute(0, 2, 3, 4, 1).reshape(2, 72, INNER), tokens)
        # Token (f, h, w) = index f * 24 + h * 6 + w.
        torch.testing.assert_close(fmap[:, :, 2, 1, 5], tokens[:, 2 * 24 + 1 * 6 + 5])


def test_wan22_documented_call_and_defaults():
    """`wan22.attach_feature_capture(teacher, feature_indices=[15, 22, 29])` on a 30-layer raw
    transformer and on the wrapper; defaults are (15, 22, 29); the discriminator fits."""
    assert wan22.WanWrapper is wan.WanWrapper
    assert wan.default_feature_indices(30) == wan.DEFAULT_FEATURE_INDICES == (15, 22, 29)
    assert wan.default_feature_indices(40) == (20, 29, 39)
    assert wan.default_feature_indices(2) == (1,) and wan.default_feature_indices(1) == (0,)
    transformer = _transformer(num_layers=30)
    assert wan.default_feature_indices(transformer) == (15, 22, 29)
    x, t, (pos, _) = _noise(), torch.tensor([0.5]), _embeds()
    for target in (transformer, wan.WanWrapper(transformer)):
        capture = wan22.attach_feature_capture(target, feature_indices=[15, 22, 29])
        assert capture.feature_indices == (15, 22, 29)
        assert get_feature_capture(target) is capture
        with torch.no_grad(), capture.record() as maps:
            wan.WanWrapper(transformer)(x, t, pos)
        assert [tuple(m.shape) for m in maps] == [(1, INNER, 3, 4, 6)] * 3
    assert wan22.attach_feature_capture(transformer).feature_indices == (15, 22, 29)
    disc = wan22.build_discriminator(transformer)
    assert disc.num_features == 3 and disc.feature_channels == [INNER] * 3
    assert disc(maps).shape == (1, 3)


# -- DMD step ---------------------------------------------------------------------------------


def _dmd_setup(kind: str, *, checkpointing: bool = False):
    if kind == "i2v14b":
        student = wan.WanWrapper(_i2v14b_transformer(seed=0))
        teacher = wan.WanWrapper(_i2v14b_transformer(seed=1))
    else:
        expand = kind == "ti2v"
        student = wan.WanWrapper(_transformer(seed=0), expand_timesteps=expand)
        teacher = wan.WanWrapper(_transformer(seed=1), expand_timesteps=expand)
    student.train()
    if checkpointing:
        student.enable_gradient_checkpointing()
        teacher.enable_gradient_checkpointing()
    fake_score = create_fake_score(teacher)
    capture = wan.attach_feature_capture(teacher, [0, 1])
    torch.manual_seed(11)
    disc = wan.build_discriminator(teacher, capture.feature_indices)
    config = DMDConfig(guidance_scale=3.0, gan_loss_weight_gen=0.5, gan_r1_reg_weight=0.1)
    dmd = DMDPipeline(student, teacher, fake_score, config, discriminator=disc)
    gen = torch.Generator().manual_seed(12)
    latents = torch.randn(2, *LATENT, generator=gen)
    tokens = wan.WAN_TEXT_TOKENS_WITH_IMAGE if kind == "i2v14b" else 7
    pos, neg = _embeds(batch=2, tokens=tokens)
    kwargs = {}
    if kind == "ti2v":
        kwargs["condition_latents"] = torch.randn(2, Z, 1, 8, 12, generator=gen)
    elif kind == "i2v14b":
        kwargs["condition_latents"] = torch.randn(2, 4 + Z, 3, 8, 12, generator=gen)
        kwargs["encoder_hidden_states_image"] = torch.randn(2, 5, 8, generator=gen)
    return dmd, latents, pos, neg, kwargs


def _grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kind", ["t2v", "ti2v", "i2v14b"])
def test_dmd_step_with_gan_branch(kind):
    """Student / teacher / fake score are wrappers: the student loss puts (finite, non-zero)
    gradient on the student only, the GAN term alone reaches the student through the teacher's
    features, and the fake-score and discriminator losses reach only their own networks."""
    dmd, latents, pos, neg, kwargs = _dmd_setup(kind)
    noise = torch.randn_like(latents)
    torch.manual_seed(0)
    losses = dmd.compute_student_loss(
        latents, noise, pos, negative_encoder_hidden_states=neg, **kwargs
    )
    assert set(losses) == {"vsd", "gan_gen", "total"}
    losses["gan_gen"].backward(retain_graph=True)
    gan_grad = [g for g in _grads(dmd.student) if g is not None]
    assert gan_grad and any(g.abs().sum() > 0 for g in gan_grad)
    dmd.student.zero_grad(set_to_none=True)
    losses["total"].backward()
    student_grads = [g for g in _grads(dmd.student) if g is not None]
    assert len(student_grads) > 0.8 * len(list(dmd.student.parameters()))
    assert all(torch.isfinite(g).all() for g in student_grads)
    assert sum(float(g.abs().sum()) for g in student_grads) > 0
    for other in (dmd.teacher, dmd.fake_score, dmd.discriminator):
        assert all(g is None for g in _grads(other))

    dmd.student.zero_grad(set_to_none=True)
    dmd.compute_fake_score_loss(latents, noise, pos, **kwargs)["total"].backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(dmd.fake_score))
    assert all(g is None for g in _grads(dmd.student) + _grads(dmd.teacher))
    dmd.fake_score.zero_grad(set_to_none=True)
    disc_losses = dmd.compute_discriminator_loss(latents, noise, pos, **kwargs)
    assert set(disc_losses) == {"gan_disc", "r1", "total"}
    disc_losses["total"].backward()
    assert all(g is not None for g in _grads(dmd.discriminator))
    assert all(
        g is None for g in _grads(dmd.student) + _grads(dmd.teacher) + _grads(dmd.fake_score)
    )


def test_gradient_checkpointing_same_loss_and_grads():
    """Checkpointed blocks (student and teacher) give the same student loss, GAN term included,
    and the same student gradients."""
    results = []
    for checkpointing in (False, True):
        dmd, latents, pos, neg, kwargs = _dmd_setup("ti2v", checkpointing=checkpointing)
        assert dmd.student.transformer.gradient_checkpointing is checkpointing
        torch.manual_seed(0)
        noise = torch.randn_like(latents)
        losses = dmd.compute_student_loss(
            latents, noise, pos, negative_encoder_hidden_states=neg, **kwargs
        )
        losses["total"].backward()
        results.append((losses, [p.grad.clone() for p in dmd.student.parameters()]))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    for key in ("vsd", "gan_gen", "total"):
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- wrapper behaviour ------------------------------------------------------------------------


def test_ti2v_condition_frame_is_clean_and_decoupled():
    """With expand_timesteps and a condition, x0 = x_t - t v equals the condition on the first
    latent frame, and the other frames do not depend on x_t's first frame (replaced)."""
    wrapper = wan.WanWrapper(_transformer(), expand_timesteps=True)
    x, (pos, _) = _noise(batch=2), _embeds(batch=2)
    cond = torch.randn(2, Z, 1, 8, 12, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        flow = wrapper(x, t, pos, condition_latents=cond)
        x_other = x.clone()
        x_other[:, :, 0] += 3.0
        flow_other = wrapper(x_other, t, pos, condition_latents=cond)
        plain = wrapper(x, t, pos)
    x0 = x - t.view(2, 1, 1, 1, 1) * flow
    torch.testing.assert_close(x0[:, :, :1], cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow_other[:, :, 1:], flow[:, :, 1:])
    assert (plain[:, :, 1:] - flow[:, :, 1:]).abs().max() > 1e-4  # the condition matters


def test_wrapper_errors_name_the_problem():
    t2v = wan.WanWrapper(_transformer())
    x, (pos, _) = _noise(), _embeds()
    with pytest.raises(ValueError, match=r"t in \[0, 1\]"):
        t2v(x, torch.tensor([500.0]), pos)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        t2v(x, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="expand_timesteps=True"):
        t2v(x, torch.tensor([0.5]), pos, condition_latents=x[:, :, :1])
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        t2v(x[:, :, 0], torch.tensor([0.5]), pos)
    i2v = wan.WanWrapper(_i2v14b_transformer())
    cond = torch.zeros(1, 4 + Z, 3, 8, 12)
    image = torch.zeros(1, 5, 8)
    with pytest.raises(ValueError, match="condition_latents"):
        i2v(x, torch.tensor([0.5]), pos, encoder_hidden_states_image=image)
    with pytest.raises(ValueError, match="encoder_hidden_states_image"):
        i2v(x, torch.tensor([0.5]), pos, condition_latents=cond)
    with pytest.raises(ValueError, match="512 tokens"):
        i2v(x, torch.tensor([0.5]), pos, condition_latents=cond, encoder_hidden_states_image=image)


def test_bf16_mixed_dtype_load_and_from_pretrained(tmp_path):
    """A bf16 load keeps _keep_in_fp32_modules in fp32; the wrapper runs it, returns bf16 close
    to fp32, and backpropagates; from_pretrained reads expand_timesteps from model_index.json."""
    transformer = _transformer()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=transformer,
        expand_timesteps=True,
    )
    pipe.save_pretrained(tmp_path)
    wrapper = wan.WanWrapper.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    assert wrapper.expand_timesteps is True
    forced = wan.WanWrapper.from_pretrained(str(tmp_path), expand_timesteps=False)
    assert forced.expand_timesteps is False
    inner = wrapper.transformer
    assert inner.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert inner.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert inner.blocks[0].scale_shift_table.dtype == torch.float32
    assert wrapper.dtype == torch.bfloat16
    x, (pos, _), t = _noise(), _embeds(), torch.tensor([0.6])
    cond = torch.randn(1, Z, 1, 8, 12, generator=torch.Generator().manual_seed(9))
    out = wrapper(x, t, pos, condition_latents=cond)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    with torch.no_grad():
        ref = wan.WanWrapper(transformer, expand_timesteps=True)(x, t, pos, condition_latents=cond)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2
    out.float().square().mean().backward()
    assert inner.blocks[0].attn1.to_q.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(inner.proj_out.weight.grad.float()).all()
    assert inner.proj_out.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_torch_compile_wrapper():
    """torch.compile (inductor, CPU) of the wrapper gives the eager output."""
    wrapper = wan.WanWrapper(_transformer(), expand_timesteps=True)
    x, (pos, _), t = _noise(), _embeds(), torch.tensor([0.4])
    cond = torch.randn(1, Z, 1, 8, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        eager = wrapper(x, t, pos, condition_latents=cond)
        compiled = torch.compile(wrapper)(x, t, pos, condition_latents=cond)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# -- pipeline glue ----------------------------------------------------------------------------


def test_vae_normalisation_matches_pipelines():
    """normalize_latents is what prepare_latents applies to the image latent; denormalize then
    decode is WanPipeline's output_type='pt' path; the two are inverse."""
    vae = _vae()
    pipe = _i2v_pipe("ti2v")
    pipe.vae = vae
    image = _image()
    cond = wan.prepare_image_condition(pipe, image, HEIGHT, WIDTH, FRAMES)["condition_latents"]
    pixels = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH).unsqueeze(2)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    assert torch.equal(wan.normalize_latents(vae, raw), cond)
    assert not torch.allclose(raw, cond, atol=1e-2)

    t2v = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_transformer(),
    )
    pos, _ = _embeds()
    call = dict(
        prompt_embeds=pos,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=2,
        guidance_scale=1.0,
        latents=_noise(),
    )
    latents = t2v(output_type="latent", **call).frames
    video = t2v(output_type="pt", **call).frames
    with torch.no_grad():
        decoded = vae.decode(wan.denormalize_latents(vae, latents)).sample
    ours = t2v.video_processor.postprocess_video(decoded, output_type="pt")
    assert torch.equal(ours, video)
    torch.testing.assert_close(
        wan.normalize_latents(vae.config, wan.denormalize_latents(vae.config, latents)), latents
    )


def test_latent_shape_matches_pipelines():
    vae_pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=_transformer(),
    )
    shape = wan.latent_shape(vae_pipe, HEIGHT, WIDTH, FRAMES, batch_size=2)
    stock = vae_pipe.prepare_latents(2, Z, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu")
    assert shape == tuple(stock.shape) == (2, *LATENT)
    assert wan.latent_shape(_i2v14b_transformer(), 480, 832, 81) == (1, Z, 21, 60, 104)
    ti2v_config = {"out_channels": 48, "in_channels": 48, "patch_size": (1, 2, 2)}
    assert wan.latent_shape(ti2v_config, 704, 1280, 121) == (1, 48, 31, 44, 80)
    with pytest.raises(ValueError, match="num_frames"):
        wan.latent_shape(vae_pipe, HEIGHT, WIDTH, 10)
    with pytest.raises(ValueError, match="multiples of 16"):
        wan.latent_shape(vae_pipe, 72, WIDTH, FRAMES)


def test_encode_prompt_matches_pipeline_strings():
    """Prompt strings through the pipeline == prompt_embeds from encode_prompt (same padding to
    512 tokens as WanPipeline.__call__), with a tiny local umT5 and word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a cat dog blurry surfing on the sea".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(6)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=16,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_transformer(),
    )
    emb = wan.encode_prompt(pipe, "a cat surfing", negative_prompt="blurry")
    assert emb["prompt_embeds"].shape == emb["negative_prompt_embeds"].shape == (1, 512, 16)
    assert emb["prompt_embeds"][:, 3:].abs().sum() == 0  # zero padding after 3 tokens
    call = dict(
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=2,
        guidance_scale=3.0,
        latents=_noise(),
        output_type="latent",
    )
    from_strings = pipe(prompt="a cat surfing", negative_prompt="blurry", **call).frames
    from_embeds = pipe(**emb, **call).frames
    assert torch.equal(from_strings, from_embeds)
