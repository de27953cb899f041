"""Qwen-Image plugin: the wrapper against the stock ``QwenImagePipeline``, masks, feature
capture, the DMD step, dtypes, and the student's stock-pipeline schedule.

Tiny models are built from config (nothing is downloaded). Tolerances: every comparison runs
in fp32; the wrapper feeds the transformer ``(1000 t) / 1000`` as the pipeline does (exact in
every precision mode: ``tests/test_timestep_precision.py``), and ``sample_student`` re-noises
in float64 while the scheduler steps in float32, so results agree to ~1e-6 relative; we allow
2e-5 absolute + 1e-5 relative on O(1) latents.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import (
    QwenImageImg2ImgPipeline,
    retrieve_latents,
)
from torch import nn

from fastgen_diffusers import DMDConfig, DMDPipeline, create_fake_score
from fastgen_diffusers.features import get_feature_capture
from fastgen_diffusers.plugins import qwen_image as qi
from fastgen_diffusers.sampling import sample_student, sample_teacher

ATOL, RTOL = 2e-5, 1e-5
B, C, H, W = 2, 4, 8, 12  # non-square latent: a 4 x 6 token grid
TXT_DIM = 24

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_transformer(seed: int = 0, num_layers: int = 2) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * C,
        out_channels=C,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    return model.eval()


def stock_pipe(transformer: nn.Module, scheduler_config: dict, vae=None) -> QwenImagePipeline:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def prompts(seed: int = 1) -> dict[str, torch.Tensor]:
    """Positive prompts of 5 and 3 valid tokens padded to 5; negatives of 2 and 4 padded to 4."""
    pos = randn(B, 5, TXT_DIM, seed=seed)
    pos_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    neg = randn(B, 4, TXT_DIM, seed=seed + 1)
    neg_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    return {
        "pos": pos * pos_mask[..., None],
        "pos_mask": pos_mask,
        "neg": neg * neg_mask[..., None],
        "neg_mask": neg_mask,
    }


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> bool:
    return torch.allclose(a, b, atol=atol, rtol=rtol)


class PackedView(nn.Module):
    """The wrapper seen on packed tokens ``[B, N, 4C]`` (the stock pipeline's layout), so that
    ``sample_student`` draws its SDE noise in the same layout as the stock scheduler."""

    def __init__(self, model: nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.model, self.height, self.width = model, height, width

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        x = qi.unpack_latents(hidden_states, self.height, self.width)
        return qi.pack_latents(self.model(x, timestep, encoder_hidden_states, **kwargs))


# -- packing and layout ---------------------------------------------------------------------


def test_pack_unpack_match_the_stock_pipeline():
    lat = randn(B, C, 1, H, W, seed=0)
    tokens = qi.pack_latents(lat)
    assert tokens.shape == (B, (H // 2) * (W // 2), 4 * C)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(lat[:, :, 0], B, C, H, W))
    assert torch.equal(qi.pack_latents(lat[:, :, 0]), tokens)  # 4-D input, same tokens
    # The pipeline unpacks with pixel sizes and the VAE factor 8.
    stock = QwenImagePipeline._unpack_latents(tokens, H * 8, W * 8, 8)
    assert torch.equal(qi.unpack_latents(tokens, H, W), stock)
    assert torch.equal(qi.unpack_latents(tokens, H, W, frame_axis=False), lat[:, :, 0])
    with pytest.raises(ValueError, match="even"):
        qi.pack_latents(randn(1, C, 1, 7, 12, seed=0))
    with pytest.raises(ValueError, match="frames"):
        qi.pack_latents(randn(1, C, 2, 8, 12, seed=0))
    with pytest.raises(ValueError, match="unpack"):
        qi.unpack_latents(tokens, W, W)


def test_token_maps_follow_the_packing_order():
    # Fold the pipeline's packed latents: token (i, j), feature c*4 + 2*dy + dx must be the
    # latent at channel c, row 2i+dy, column 2j+dx (non-square grid).
    lat = randn(B, C, H, W, seed=3)
    tokens = QwenImagePipeline._pack_latents(lat, B, C, H, W)
    maps = qi.image_tokens_to_map(tokens, (1, H // 2, W // 2))
    assert maps.shape == (B, 4 * C, H // 2, W // 2)
    for c in range(C):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(maps[:, c * 4 + 2 * dy + dx], lat[:, c, dy::2, dx::2])
    # Extra tokens after the first image (edit pipelines' condition images) are ignored.
    extra = torch.cat([tokens, randn(B, 5, 4 * C, seed=4)], dim=1)
    assert torch.equal(qi.image_tokens_to_map(extra, (1, H // 2, W // 2)), maps)


def test_wrapper_is_the_transformer_on_packed_tokens_with_the_pipelines_t():
    transformer = tiny_transformer()
    wrapper = qi.QwenImageWrapper(transformer)
    assert wrapper.config is transformer.config and wrapper.num_channels_latents == C
    # The model scales t itself: the sinusoidal projection multiplies by 1000.
    assert transformer.time_text_embed.time_proj.scale == 1000
    x = randn(B, C, 1, H, W, seed=0)
    t = torch.tensor([0.9, 0.3])
    p = prompts()
    with torch.no_grad():
        out = wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
        raw = transformer(
            hidden_states=QwenImagePipeline._pack_latents(x[:, :, 0], B, C, H, W),
            timestep=(t * 1000) / 1000,  # QwenImagePipeline: scheduler timesteps / 1000
            encoder_hidden_states=p["pos"],
            encoder_hidden_states_mask=p["pos_mask"],
            img_shapes=[[(1, H // 2, W // 2)]] * B,
            return_dict=False,
        )[0]
        out_4d = wrapper(x[:, :, 0], t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
        out_scalar_t = wrapper(x[:1], 0.9, p["pos"][:1])
        out_vector_t = wrapper(x[:1], torch.tensor([0.9]), p["pos"][:1])
    assert out.shape == x.shape and out_4d.shape == (B, C, H, W)
    assert torch.equal(out, QwenImagePipeline._unpack_latents(raw, H * 8, W * 8, 8))
    assert torch.equal(out_4d, out[:, :, 0])
    assert torch.equal(out_scalar_t, out_vector_t)
    assert out.abs().mean() > 1e-2  # a real prediction, not a zero-initialised head
    with pytest.raises(ValueError, match="channels"):
        wrapper(randn(1, C + 1, 1, H, W, seed=0), t[:1], p["pos"][:1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        wrapper(x, t)
    with pytest.raises(ValueError, match="img_shapes"):
        wrapper(x, t, p["pos"], img_shapes=[[(1, 4, 6)]] * B)
    with pytest.raises(ValueError, match=r"t in \[0, 1\]"):  # doubly scaled t, first call
        qi.QwenImageWrapper(transformer)(x, t * 1000, p["pos"])


# -- teacher against the stock pipeline ------------------------------------------------------


def test_teacher_sampling_reproduces_the_stock_pipeline_without_cfg():
    transformer = tiny_transformer()
    wrapper = qi.QwenImageWrapper(transformer)
    pipe = stock_pipe(transformer, qi.QWEN_IMAGE_SCHEDULER_CONFIG)
    noise, p = randn(B, C, 1, H, W, seed=5), prompts()
    stock = pipe(
        prompt_embeds=p["pos"],
        prompt_embeds_mask=p["pos_mask"],
        height=H * 8,
        width=W * 8,
        num_inference_steps=4,
        latents=qi.pack_latents(noise),
        true_cfg_scale=1.0,
        output_type="latent",
    ).images
    sigmas = pipe.scheduler.sigmas.tolist()
    # The stock schedule: dynamic shift (mu from the 24-token sequence), stretched to 0.02.
    assert len(sigmas) == 5 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[-2] == pytest.approx(0.02, abs=1e-6) and sigmas[1] != pytest.approx(0.75)
    ours = sample_teacher(
        wrapper,
        noise,
        sigmas,
        encoder_hidden_states=p["pos"],
        model_kwargs={"encoder_hidden_states_mask": p["pos_mask"]},
    )
    stock = qi.unpack_latents(stock, H, W)
    assert close(ours, stock), (ours - stock).abs().max()
    assert (stock - noise).abs().mean() > 0.1  # the model moved the latents


def test_teacher_true_cfg_reproduces_the_stock_pipeline_with_negative_masks():
    transformer = tiny_transformer()
    wrapper = qi.QwenImageWrapper(transformer)
    pipe = stock_pipe(transformer, qi.QWEN_IMAGE_SCHEDULER_CONFIG)
    noise, p = randn(B, C, 1, H, W, seed=6), prompts()
    scale = 4.0
    stock = pipe(
        prompt_embeds=p["pos"],
        prompt_embeds_mask=p["pos_mask"],
        negative_prompt_embeds=p["neg"],
        negative_prompt_embeds_mask=p["neg_mask"],
        height=H * 8,
        width=W * 8,
        num_inference_steps=3,
        latents=qi.pack_latents(noise),
        true_cfg_scale=scale,
        output_type="latent",
    ).images
    stock = qi.unpack_latents(stock, H, W)
    sigmas = pipe.scheduler.sigmas.tolist()
    # Euler with the pipeline's norm-rescaled real CFG, each prompt with its own mask.
    x = noise
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((B,), s)
            cond = wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
            uncond = wrapper(x, t, p["neg"], encoder_hidden_states_mask=p["neg_mask"])
            x = x + (s_next - s) * qi.true_cfg_guidance(cond, uncond, scale)
    assert close(x, stock), (x - stock).abs().max()
    # sample_teacher's plain CFG (the DMD2 convention) is a different sampler.
    plain = sample_teacher(
        wrapper,
        noise,
        sigmas,
        encoder_hidden_states=p["pos"],
        negative_encoder_hidden_states=p["neg"],
        guidance_scale=scale,
        model_kwargs={"encoder_hidden_states_mask": p["pos_mask"]},
        negative_model_kwargs={"encoder_hidden_states_mask": p["neg_mask"]},
    )
    assert (plain - stock).abs().max() > 1e-2


# -- masks -----------------------------------------------------------------------------------


def test_padded_prompt_with_mask_gives_the_unpadded_result():
    transformer = tiny_transformer()
    wrapper = qi.QwenImageWrapper(transformer)
    x, t = randn(B, C, 1, H, W, seed=7), torch.tensor([0.7, 0.2])
    short = randn(B, 3, TXT_DIM, seed=8)
    padded, mask = qi.pad_prompt_embeds(short, None, 7)
    assert padded.shape == (B, 7, TXT_DIM) and mask.tolist() == [[1, 1, 1, 0, 0, 0, 0]] * B
    garbage = padded.clone()
    garbage[:, 3:] = randn(B, 4, TXT_DIM, seed=9)  # padding content must not matter

    text_streams: list[torch.Tensor] = []
    hook = transformer.transformer_blocks[1].register_forward_hook(
        lambda mod, args, out: text_streams.append(out[0])
    )
    with torch.no_grad():
        ref = wrapper(x, t, short)
        ours = wrapper(x, t, padded, encoder_hidden_states_mask=mask)
        ours_garbage = wrapper(x, t, garbage, encoder_hidden_states_mask=mask)
        unmasked = wrapper(x, t, garbage)
    hook.remove()
    assert close(ours, ref) and close(ours_garbage, ref)
    # The valid text tokens' stream is unchanged too.
    assert close(text_streams[1][:, :3], text_streams[0])
    assert close(text_streams[2][:, :3], text_streams[0])
    assert (unmasked - ref).abs().max() > 1e-3  # without the mask the padding leaks in

    # A batch of prompts of different lengths equals each prompt alone.
    p = prompts()
    with torch.no_grad():
        batch = wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
        second = wrapper(x[1:], t[1:], p["pos"][1:, :3])
        # Positive and negative concatenated (DMDPipeline batch_cfg) after padding to one length.
        pos, pos_mask = qi.pad_prompt_embeds(p["pos"], p["pos_mask"], 5)
        neg, neg_mask = qi.pad_prompt_embeds(p["neg"], p["neg_mask"], 5)
        both = wrapper(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([pos, neg]),
            encoder_hidden_states_mask=torch.cat([pos_mask, neg_mask]),
        )
        neg_alone = wrapper(x, t, p["neg"], encoder_hidden_states_mask=p["neg_mask"])
    assert close(batch[1:], second)
    assert close(both[:B], batch) and close(both[B:], neg_alone)
    with pytest.raises(ValueError, match="pad"):
        qi.pad_prompt_embeds(short, None, 2)


# -- the student in the stock pipeline ------------------------------------------------------

T_LISTS = [[0.999, 0.0], [0.999, 0.6, 0.0], [0.999, 0.85, 0.6, 0.3, 0.0]]


def _stock_student(pipe: QwenImagePipeline, noise: torch.Tensor, t_list, p) -> torch.Tensor:
    out = pipe(
        prompt_embeds=p["pos"],
        prompt_embeds_mask=p["pos_mask"],
        height=H * 8,
        width=W * 8,
        latents=qi.student_initial_latents(noise, t_list),
        output_type="latent",
        **qi.stock_pipeline_kwargs(t_list),
    ).images
    # The scheduler visited exactly the rungs, then 0.
    assert pipe.scheduler.sigmas.tolist() == torch.tensor(t_list, dtype=torch.float32).tolist()
    return out


@pytest.mark.parametrize("t_list", T_LISTS, ids=["1step", "2step", "4step"])
def test_student_ode_in_the_stock_pipeline_matches_sample_student(t_list):
    student = qi.QwenImageWrapper(tiny_transformer(seed=11))
    config = qi.student_scheduler_config(t_list, "ode", base_config=qi.QWEN_IMAGE_SCHEDULER_CONFIG)
    pipe = stock_pipe(student.transformer, config)
    noise, p = randn(B, C, 1, H, W, seed=12), prompts()
    stock = qi.unpack_latents(_stock_student(pipe, noise, t_list, p), H, W)
    ours = sample_student(
        student,
        noise,
        t_list,
        encoder_hidden_states=p["pos"],
        model_kwargs={"encoder_hidden_states_mask": p["pos_mask"]},
    )
    assert close(ours, stock), (ours - stock).abs().max()
    # The teacher's scheduler config would have shifted the same sigmas.
    teacher_sched = FlowMatchEulerDiscreteScheduler.from_config(qi.QWEN_IMAGE_SCHEDULER_CONFIG)
    teacher_sched.set_timesteps(sigmas=t_list[:-1], mu=0.5)
    assert not torch.allclose(teacher_sched.sigmas, torch.tensor(t_list))


@pytest.mark.parametrize("t_list", T_LISTS, ids=["1step", "2step", "4step"])
def test_student_sde_in_the_stock_pipeline_matches_sample_student(t_list):
    student = qi.QwenImageWrapper(tiny_transformer(seed=11))
    pipe = stock_pipe(student.transformer, qi.student_scheduler_config(t_list, "sde"))
    assert pipe.scheduler.config.stochastic_sampling
    noise, p = randn(B, C, 1, H, W, seed=13), prompts()
    kwargs = {"encoder_hidden_states_mask": p["pos_mask"]}
    # QwenImagePipeline does not hand its generator to scheduler.step: the SDE noise comes
    # from the global RNG, drawn in the packed layout. sample_student on the packed view with
    # a generator of the same seed draws the same numbers at the same places.
    view = PackedView(student, H, W)

    def ours(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        packed = sample_student(
            view,
            qi.pack_latents(noise),
            t_list,
            sample_type="sde",
            encoder_hidden_states=p["pos"],
            model_kwargs=kwargs,
            generator=gen,
        )
        return qi.unpack_latents(packed, H, W)

    torch.manual_seed(21)
    stock = qi.unpack_latents(_stock_student(pipe, noise, t_list, p), H, W)
    assert close(ours(21), stock), (ours(21) - stock).abs().max()
    ode = sample_student(
        student, noise, t_list, encoder_hidden_states=p["pos"], model_kwargs=kwargs
    )
    if len(t_list) == 2:  # one step: no re-noising, SDE == ODE
        assert close(stock, ode)
    else:  # the fresh noise matters
        assert (ours(22) - stock).abs().max() > 1e-3 and (ode - stock).abs().max() > 1e-3


def test_scheduler_config_and_pipeline_kwargs():
    t_list = [0.999, 0.5, 0.0]
    config = qi.student_scheduler_config(t_list, base_config={"shift": 3.0, "max_shift": 0.9})
    assert config["shift"] == 1.0 and config["use_dynamic_shifting"] is False
    assert config["shift_terminal"] is None and config["stochastic_sampling"] is False
    assert config["max_shift"] == 0.9 and config["num_train_timesteps"] == 1000
    json.dumps(config)  # ships as scheduler/scheduler_config.json
    assert qi.student_scheduler_config(t_list, "sde")["stochastic_sampling"] is True
    # A loaded teacher config lists keys absent from its JSON in _use_default_values, which
    # from_config resets to their defaults: private keys must not reach the student config.
    teacher = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in qi.QWEN_IMAGE_SCHEDULER_CONFIG.items() if k != "stochastic_sampling"}
    )
    assert "stochastic_sampling" in teacher.config["_use_default_values"]
    config = qi.student_scheduler_config(t_list, "sde", base_config=teacher.config)
    assert not any(k.startswith("_") and k != "_class_name" for k in config)
    assert FlowMatchEulerDiscreteScheduler.from_config(config).config.stochastic_sampling is True
    assert qi.stock_pipeline_kwargs(t_list) == {
        "sigmas": [0.999, 0.5],
        "num_inference_steps": 2,
        "true_cfg_scale": 1.0,
        "guidance_scale": None,
    }
    noise = randn(1, C, 1, H, W, seed=0)
    assert torch.equal(
        qi.student_initial_latents(noise, t_list),
        qi.pack_latents((noise.double() * 0.999).float()),
    )
    for bad in ([0.5], [0.5, 0.1], [0.5, 0.7, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError, match="t_list"):
            qi.student_scheduler_config(bad)
    with pytest.raises(ValueError, match="sample_type"):
        qi.student_scheduler_config(t_list, "euler")


# -- feature capture and the DMD step -------------------------------------------------------


def test_feature_capture_reads_the_image_stream_as_non_square_maps():
    assert qi.DEFAULT_FEATURE_INDICES == (30, 45, 59)
    assert qi.default_feature_indices({"num_layers": 30}) == (15, 22, 29)
    transformer = tiny_transformer(num_layers=4)
    wrapper = qi.QwenImageWrapper(transformer)
    capture = qi.attach_feature_capture(wrapper)
    assert capture.feature_indices == (2, 3) and get_feature_capture(wrapper) is capture

    block_outputs: dict[int, tuple] = {}
    hooks = [
        transformer.transformer_blocks[i].register_forward_hook(
            lambda mod, args, out, i=i: block_outputs.__setitem__(i, out)
        )
        for i in (2, 3)
    ]
    x, t, p = randn(B, C, 1, H, W, seed=14), torch.tensor([0.6, 0.4]), prompts()
    with torch.no_grad(), capture.record() as feats:
        wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
    for hook in hooks:
        hook.remove()
    inner = transformer.inner_dim
    assert [f.shape for f in feats] == [(B, inner, H // 2, W // 2)] * 2
    for feat, i in zip(feats, (2, 3)):
        text, image = block_outputs[i]
        assert text.shape[1] == 5 and image.shape[1] == (H // 2) * (W // 2)
        # Map position (r, c) is image token r * W/2 + c of the block's second output.
        for r, c in [(0, 0), (1, 4), (3, 5)]:
            assert torch.equal(feat[:, :, r, c], image[:, r * (W // 2) + c])

    # The raw transformer, called as the stock pipeline calls it, gives the same maps.
    raw_capture = qi.attach_feature_capture(transformer, capture.feature_indices)
    with torch.no_grad(), raw_capture.record() as raw_feats:
        transformer(
            hidden_states=qi.pack_latents(x),
            timestep=(t * 1000) / 1000,  # QwenImagePipeline: scheduler timesteps / 1000
            encoder_hidden_states=p["pos"],
            encoder_hidden_states_mask=p["pos_mask"],
            img_shapes=[[(1, H // 2, W // 2)]] * B,
        )
    assert all(torch.equal(a, b) for a, b in zip(raw_feats, feats))

    disc = qi.build_discriminator(wrapper, capture.feature_indices)
    assert disc.feature_channels == [inner, inner]
    assert disc(feats).shape == (B, 2)


def _dmd(batch_cfg: bool = False, gan: bool = True):
    teacher = qi.QwenImageWrapper(tiny_transformer(seed=0, num_layers=3))
    student = qi.QwenImageWrapper(tiny_transformer(seed=1, num_layers=3)).train()
    fake = create_fake_score(teacher)
    teacher.requires_grad_(False)
    capture = qi.attach_feature_capture(teacher)
    disc = qi.build_discriminator(teacher, capture.feature_indices) if gan else None
    config = DMDConfig(
        guidance_scale=3.0,
        gan_loss_weight_gen=0.5 if gan else 0.0,
        gan_r1_reg_weight=100.0 if gan else 0.0,
    )
    return DMDPipeline(student, teacher, fake, config, discriminator=disc, batch_cfg=batch_cfg)


def test_dmd_step_with_gan_trains_the_student_only():
    dmd = _dmd()
    noise, latents, p = randn(B, C, 1, H, W, seed=15), randn(B, C, 1, H, W, seed=16), prompts()
    cond = {"encoder_hidden_states_mask": p["pos_mask"]}
    neg = {
        "negative_encoder_hidden_states": p["neg"],
        "negative_model_kwargs": {"encoder_hidden_states_mask": p["neg_mask"]},
    }

    losses = dmd.compute_student_loss(latents, noise, p["pos"], **neg, **cond)
    assert set(losses) == {"vsd", "gan_gen", "total"}
    losses["gan_gen"].backward(retain_graph=True)
    # The GAN term alone reaches the student (through the teacher's captured features).
    gan_grad = [q.grad.abs().sum() for q in dmd.student.parameters() if q.grad is not None]
    assert gan_grad and sum(gan_grad) > 0
    dmd.student.zero_grad()
    losses["total"].backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in dmd.student.parameters())
    assert all(q.grad is None for q in dmd.teacher.parameters())
    assert all(q.grad is None for q in dmd.fake_score.parameters())
    assert all(q.grad is None for q in dmd.discriminator.parameters())

    fake_loss = dmd.compute_fake_score_loss(latents, noise, p["pos"], **cond)["total"]
    fake_loss.backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in dmd.fake_score.parameters())

    dmd.student.zero_grad()
    disc_losses = dmd.compute_discriminator_loss(latents, noise, p["pos"], **cond)
    assert set(disc_losses) == {"gan_disc", "r1", "total"}
    disc_losses["total"].backward()
    assert all(q.grad is not None for q in dmd.discriminator.parameters())
    assert all(q.grad is None or q.grad.abs().sum() == 0 for q in dmd.student.parameters())


def test_dmd_batch_cfg_with_padded_masks_equals_separate_passes():
    p = prompts()
    pos, pos_mask = qi.pad_prompt_embeds(p["pos"], p["pos_mask"], 5)
    neg, neg_mask = qi.pad_prompt_embeds(p["neg"], p["neg_mask"], 5)
    noise = randn(B, C, 1, H, W, seed=17)
    vsd = []
    for batch_cfg in (False, True):
        dmd = _dmd(batch_cfg=batch_cfg, gan=False)
        torch.manual_seed(0)
        losses = dmd.compute_student_loss(
            None,
            noise,
            pos,
            negative_encoder_hidden_states=neg,
            negative_model_kwargs={"encoder_hidden_states_mask": neg_mask},
            encoder_hidden_states_mask=pos_mask,
        )
        vsd.append(losses["vsd"].detach())
    assert torch.allclose(vsd[0], vsd[1], rtol=1e-5, atol=1e-8)


# -- dtypes, checkpointing, compile ---------------------------------------------------------


def test_bf16_forward_returns_bf16_without_upcasting_weights():
    wrapper = qi.QwenImageWrapper(tiny_transformer())
    x, t, p = randn(B, C, 1, H, W, seed=18), torch.tensor([0.8, 0.5]), prompts()
    with torch.no_grad():
        ref = wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
        wrapper.to(torch.bfloat16)
        out = wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
        out_bf16_in = wrapper(x.bfloat16(), t, p["pos"].bfloat16(), p["pos_mask"])
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, out_bf16_in)
    assert all(q.dtype == torch.bfloat16 for q in wrapper.parameters())
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    p = prompts()
    x = randn(B, C, 1, H, W, seed=19)
    t = torch.tensor([0.9, 0.4])
    results = []
    for checkpointing in (False, True):
        transformer = tiny_transformer(seed=3).train()
        calls = []
        if checkpointing:
            transformer.enable_gradient_checkpointing()
            inner = transformer._gradient_checkpointing_func

            def counting(*args, inner=inner, calls=calls, **kwargs):
                calls.append(1)
                return inner(*args, **kwargs)

            transformer._gradient_checkpointing_func = counting
        wrapper = qi.QwenImageWrapper(transformer)
        x_in = x.clone().requires_grad_(True)
        loss = wrapper(x_in, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"]).pow(2).mean()
        loss.backward()
        assert len(calls) == (2 if checkpointing else 0)  # both blocks went through checkpoint
        grads = {n: q.grad.clone() for n, q in transformer.named_parameters() if q.grad is not None}
        results.append((loss.detach(), x_in.grad.clone(), grads))
    (loss0, xg0, g0), (loss1, xg1, g1) = results
    assert torch.allclose(loss0, loss1, rtol=1e-6)
    assert torch.allclose(xg0, xg1, rtol=1e-5, atol=1e-8) and xg0.abs().sum() > 0
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.slow
def test_torch_compile_traces_the_wrapper_as_one_graph():
    # fullgraph=True: packing, img_shapes and the transformer trace without a graph break.
    # aot_eager keeps this at ~15 s on 2 CPU cores; the inductor backend gives the same result
    # but spends ~1 min compiling C++ here.
    wrapper = qi.QwenImageWrapper(tiny_transformer())
    x, t, p = randn(B, C, 1, H, W, seed=20), torch.tensor([0.8, 0.5]), prompts()
    torch._dynamo.reset()
    compiled = torch.compile(wrapper, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        ref = wrapper(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
        out = compiled(x, t, p["pos"], encoder_hidden_states_mask=p["pos_mask"])
    assert out.shape == ref.shape and close(out, ref), (out - ref).abs().max()
    # Feature capture is found through the compiled module's _orig_mod.
    capture = qi.attach_feature_capture(compiled, [1])
    assert get_feature_capture(compiled) is capture


# -- VAE and prompt glue --------------------------------------------------------------------


def tiny_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=C,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4],
        latents_std=[1.5, 0.5, 2.0, 0.8],
    ).eval()


def test_vae_normalisation_matches_the_stock_pipelines():
    vae, transformer = tiny_vae(), tiny_transformer()
    pipe = stock_pipe(transformer, qi.student_scheduler_config([1.0, 0.0]), vae=vae)
    noise, p = randn(1, C, 1, H, W, seed=21), prompts()
    kwargs = dict(
        prompt_embeds=p["pos"][:1],
        height=H * 8,
        width=W * 8,
        latents=qi.pack_latents(noise),
        **qi.stock_pipeline_kwargs([1.0, 0.0]),
    )
    image = pipe(**kwargs, output_type="np").images
    latents = qi.unpack_latents(pipe(**kwargs, output_type="latent").images, H, W)
    with torch.no_grad():
        decoded = vae.decode(qi.denormalize_latents(vae, latents)).sample[:, :, 0]
    assert torch.equal(
        torch.from_numpy(pipe.image_processor.postprocess(decoded, "np")), torch.from_numpy(image)
    )

    # Encoding direction: the img2img pipeline's normalisation of vae.encode output.
    pixels = torch.rand(1, 3, 1, H * 8, W * 8) * 2 - 1
    img2img = QwenImageImg2ImgPipeline(
        scheduler=pipe.scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    with torch.no_grad():
        stock = img2img._encode_vae_image(pixels, torch.Generator().manual_seed(0))
        raw = retrieve_latents(vae.encode(pixels), generator=torch.Generator().manual_seed(0))
    ours = qi.normalize_latents(vae, raw)
    assert ours.shape == (1, C, 1, H, W) and torch.equal(ours, stock)
    assert close(qi.denormalize_latents(vae, ours), raw)
    assert torch.equal(qi.normalize_latents(vae.config, raw[:, :, 0]), ours[:, :, 0])
    with pytest.raises(ValueError, match="z_dim"):
        qi.normalize_latents(vae, randn(1, C + 1, 1, H, W, seed=0))


def test_latent_shape_matches_prepare_latents():
    transformer = tiny_transformer()
    pipe = stock_pipe(transformer, qi.QWEN_IMAGE_SCHEDULER_CONFIG)
    shape = qi.latent_shape(pipe, 64, 96, batch_size=3)
    assert shape == (3, C, 1, 8, 12)
    packed = pipe.prepare_latents(3, C, 64, 96, torch.float32, "cpu", torch.Generator())
    assert packed.shape == qi.pack_latents(torch.zeros(shape)).shape
    for source in (transformer, qi.QwenImageWrapper(transformer), transformer.config):
        assert qi.latent_shape(source, 64, 96, 3) == shape
    with pytest.raises(ValueError, match="multiples of 16"):
        qi.latent_shape(pipe, 72, 96)


def _tiny_text_pipe() -> QwenImagePipeline:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Byte-level BPE without merges: one token per byte, plus the chat-template specials.
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TXT_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TXT_DIM
        ),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(qi.QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_encode_prompt_masks_padding_end_to_end():
    pipe = _tiny_text_pipe()
    texts = ["a cat", "a red fox jumping over a lazy dog"]
    with torch.no_grad():
        c = qi.encode_prompt(pipe, texts, negative_prompt=" ")
        alone = qi.encode_prompt(pipe, texts[0])
        stock_embeds, stock_mask = pipe.encode_prompt(texts)
        twice = qi.encode_prompt(pipe, texts, negative_prompt=" ", num_images_per_prompt=2)
        same = qi.encode_prompt(pipe, texts, negative_prompt=" ", pad_to_same_length=True)
    emb, mask = c["encoder_hidden_states"], c["encoder_hidden_states_mask"]
    assert torch.equal(emb, stock_embeds) and torch.equal(mask, stock_mask)
    n_short = int(mask[0].sum())
    assert mask[1].all() and n_short < emb.shape[1] and alone["encoder_hidden_states_mask"] is None
    assert close(alone["encoder_hidden_states"][0], emb[0, :n_short])
    # The negative " " for both prompts: one length, all valid, so no mask (as the pipeline).
    assert c["negative_encoder_hidden_states"].shape[0] == 2
    assert c["negative_encoder_hidden_states_mask"] is None
    # Repeats keep each prompt with its own mask.
    assert torch.equal(twice["encoder_hidden_states"], emb.repeat_interleave(2, dim=0))
    assert torch.equal(twice["encoder_hidden_states_mask"], mask.repeat_interleave(2, dim=0))
    # Common length for batch_cfg: tensor masks on both sides.
    length = same["encoder_hidden_states"].shape[1]
    assert same["negative_encoder_hidden_states"].shape[1] == length
    assert same["negative_encoder_hidden_states_mask"].shape == (2, length)

    # The short prompt inside the padded batch denoises as the prompt alone.
    wrapper = qi.QwenImageWrapper(pipe.transformer)
    x, t = randn(2, C, 1, H, W, seed=22), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        batch = wrapper(x, t, emb, encoder_hidden_states_mask=mask)
        single = wrapper(x[:1], t[:1], alone["encoder_hidden_states"])
    assert close(batch[:1], single)
    with pytest.raises(ValueError, match="negative"):
        qi.encode_prompt(pipe, texts, negative_prompt=["x", "y", "z"])
