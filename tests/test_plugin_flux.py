"""Tests of the Flux.1 plugin against the installed diffusers ``FluxPipeline``.

Every model is built tiny from config (1 double-stream + 2 single-stream blocks, inner dim 16,
4 latent channels); nothing is downloaded. Latents are NON-square (8x12) throughout so that a
transposed token grid would be caught.
"""

from __future__ import annotations

import json
import string

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from fastgen_diffusers import DMDConfig, DMDPipeline, create_fake_score, get_feature_capture
from fastgen_diffusers.plugins import flux
from fastgen_diffusers.sampling import sample_student, sample_teacher

B, C, H, W = 2, 4, 8, 12  # latent layout [B, C, H, W]; packed: 24 tokens of 16 channels
S, TEXT_DIM, POOLED_DIM, INNER = 5, 32, 16, 16
# Flux-dev's scheduler: dynamic (resolution-dependent) shifting.
DEV_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
T_LISTS = ([0.999, 0.0], [0.999, 0.5, 0.0], [0.999, 0.75, 0.5, 0.25, 0.0])

pytestmark = pytest.mark.usefixtures("single_thread")


def _transformer(guidance_embeds: bool = True, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * C,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    assert all(p.abs().max() > 0 for p in model.parameters())  # no zero-init layer hides bugs
    return model.eval()


def _inputs(seed: int = 1, batch: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "noise": torch.randn(batch, C, H, W, generator=g),
        "latents": torch.randn(batch, C, H, W, generator=g),
        "embeds": torch.randn(batch, S, TEXT_DIM, generator=g),
        "pooled": torch.randn(batch, POOLED_DIM, generator=g),
        "neg_embeds": torch.randn(batch, S, TEXT_DIM, generator=g),
        "neg_pooled": torch.randn(batch, POOLED_DIM, generator=g),
    }


def _pipe(transformer, scheduler=None, **components) -> FluxPipeline:
    parts = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    parts.update(components)
    pipe = FluxPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER),
        transformer=transformer,
        **parts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(pipe: FluxPipeline) -> dict[str, int]:
    return {"height": H * pipe.vae_scale_factor, "width": W * pipe.vae_scale_factor}


class _PackedView(torch.nn.Module):
    """The wrapper seen in FluxPipeline's packed token layout (for SDE noise-order tests)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, **kwargs):
        x = flux.unpack_latents(hidden_states, H, W)
        return flux.pack_latents(self.model(x, timestep, **kwargs))


# -- packing and the wrapper's call ---------------------------------------------------------


def test_packing_and_ids_match_flux_pipeline():
    x = torch.randn(B, C, H, W)
    packed = flux.pack_latents(x)
    assert packed.shape == (B, (H // 2) * (W // 2), 4 * C)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, B, C, H, W))
    # The pipeline's unpack takes pixel sizes and the VAE factor.
    assert torch.equal(
        flux.unpack_latents(packed, H, W), FluxPipeline._unpack_latents(packed, H * 8, W * 8, 8)
    )
    assert torch.equal(flux.unpack_latents(packed, H, W), x)
    ids = flux.latent_image_ids(H // 2, W // 2)
    assert torch.equal(
        ids, FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
    )
    # Token i * (W/2) + j is the 2x2 patch at rows 2i.., cols 2j.., channel-major.
    assert torch.equal(packed[:, 1 * (W // 2) + 2].view(B, C, 2, 2), x[:, :, 2:4, 4:6])
    with pytest.raises(ValueError, match="even"):
        flux.pack_latents(torch.randn(1, C, 7, 8))


def test_wrapper_call_convention_and_guidance():
    tr = _transformer(guidance_embeds=True)
    wrapper = flux.FluxWrapper(tr, guidance_scale=3.5)
    d = _inputs()
    t = torch.tensor([0.7, 0.3])
    out = wrapper(d["noise"], t, d["embeds"], pooled_projections=d["pooled"])
    assert out.shape == (B, C, H, W) and out.dtype == torch.float32
    assert wrapper.config is tr.config
    # Exactly FluxPipeline's transformer call: packed tokens, t in [0, 1], float32 guidance.
    with torch.no_grad():
        raw = tr(
            hidden_states=FluxPipeline._pack_latents(d["noise"], B, C, H, W),
            timestep=(t * 1000) / 1000,  # scheduler timestep / 1000
            guidance=torch.full([1], 3.5).expand(B),
            pooled_projections=d["pooled"],
            encoder_hidden_states=d["embeds"],
            txt_ids=torch.zeros(S, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32),
            return_dict=False,
        )[0]
    assert torch.equal(out, FluxPipeline._unpack_latents(raw, H * 8, W * 8, 8))
    # Per-sample guidance [B]: sample 0 keeps 3.5, sample 1 changes.
    per_sample = wrapper(d["noise"], t, d["embeds"], d["pooled"], guidance=torch.tensor([3.5, 1.0]))
    assert torch.equal(per_sample[0], out[0])
    assert not torch.allclose(per_sample[1], out[1])
    assert torch.equal(wrapper(d["noise"], t, d["embeds"], d["pooled"], guidance=3.5), out)
    # Scalar t broadcasts over the batch.
    assert torch.equal(wrapper(d["noise"], 0.7, d["embeds"], d["pooled"])[0], out[0])
    with pytest.raises(ValueError, match="guidance"):
        flux.FluxWrapper(tr, guidance_scale=None)(d["noise"], t, d["embeds"], d["pooled"])
    with pytest.raises(ValueError, match="pooled_projections"):
        wrapper(d["noise"], t, d["embeds"])
    schnell = flux.FluxWrapper(_transformer(guidance_embeds=False))
    assert schnell(d["noise"], t, d["embeds"], d["pooled"]).shape == (B, C, H, W)
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        schnell(d["noise"], t, d["embeds"], d["pooled"], guidance=3.5)
    with pytest.raises(ValueError, match=r"t in \[0, 1\]"):  # doubly scaled t, first call
        flux.FluxWrapper(tr)(d["noise"], t * 1000, d["embeds"], d["pooled"])


# -- teacher: the wrapper + sample_teacher reproduce FluxPipeline ---------------------------

# Both sides run the same fp32 ops on the same inputs; the only possible differences are the
# pipeline's timestep round trip (sigma * 1000) / 1000 and CFG written as
# cond + (s - 1)(cond - uncond) instead of uncond + s (cond - uncond): a few fp32 ulps.
TOL = dict(rtol=1e-5, atol=1e-5)


# In bf16 FluxPipeline's scheduler multiplies dt * v in bf16 (a 0-d fp32 tensor does not
# promote a bf16 tensor) where sample_teacher uses fp32: one bf16 rounding (2**-8 relative, one
# ulp = 0.0156 at |x| in [2, 4)) per step, 4 steps.
BF16_TOL = dict(rtol=1e-2, atol=3e-2)


@pytest.mark.parametrize(
    "guidance_embeds,dtype",
    [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
    ids=["dev", "schnell", "dev-bf16"],
)
def test_teacher_reproduces_flux_pipeline(guidance_embeds, dtype):
    tr = _transformer(guidance_embeds=guidance_embeds).to(dtype)
    # schnell ships a static, unshifted scheduler; dev the dynamic-shift one.
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(DEV_SCHEDULER if guidance_embeds else dict(shift=1.0, use_dynamic_shifting=False))
    )
    pipe = _pipe(tr, scheduler)
    d = {k: v.to(dtype) for k, v in _inputs().items()}
    out = pipe(
        prompt_embeds=d["embeds"],
        pooled_prompt_embeds=d["pooled"],
        num_inference_steps=4,
        guidance_scale=2.5,  # the embedded value (ignored by schnell)
        latents=flux.pack_latents(d["noise"]),
        output_type="latent",
        **_pixels(pipe),
    ).images
    sigmas = pipe.scheduler.sigmas.tolist()
    if guidance_embeds:  # mu from the 24-token sequence really shifted the schedule
        assert abs(sigmas[1] - 0.75) > 1e-3
    teacher = flux.FluxWrapper(tr, guidance_scale=2.5)
    ref = sample_teacher(
        teacher,
        d["noise"],
        sigmas,
        encoder_hidden_states=d["embeds"],
        model_kwargs={"pooled_projections": d["pooled"]},
    )
    assert out.dtype == ref.dtype == dtype
    tol = TOL if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(flux.unpack_latents(out, H, W), ref, **tol)
    assert ref.abs().max() > 0.1


def test_teacher_reproduces_true_cfg():
    tr = _transformer(guidance_embeds=True)
    pipe = _pipe(tr)
    d = _inputs()
    out = pipe(
        prompt_embeds=d["embeds"],
        pooled_prompt_embeds=d["pooled"],
        negative_prompt_embeds=d["neg_embeds"],
        negative_pooled_prompt_embeds=d["neg_pooled"],
        true_cfg_scale=2.0,
        guidance_scale=3.5,
        num_inference_steps=3,
        latents=flux.pack_latents(d["noise"]),
        output_type="latent",
        **_pixels(pipe),
    ).images
    kwargs = dict(
        encoder_hidden_states=d["embeds"],
        model_kwargs={"pooled_projections": d["pooled"]},
    )
    teacher = flux.FluxWrapper(tr, guidance_scale=3.5)
    sigmas = pipe.scheduler.sigmas.tolist()
    ref = sample_teacher(
        teacher,
        d["noise"],
        sigmas,
        negative_encoder_hidden_states=d["neg_embeds"],
        negative_model_kwargs={"pooled_projections": d["neg_pooled"]},
        guidance_scale=2.0,
        **kwargs,
    )
    torch.testing.assert_close(flux.unpack_latents(out, H, W), ref, **TOL)
    # CFG really changed the result.
    no_cfg = sample_teacher(teacher, d["noise"], sigmas, **kwargs)
    assert (no_cfg - ref).abs().max() > 1e-2


# -- student: the exported scheduler makes FluxPipeline follow sample_student ---------------


@pytest.mark.parametrize("sample_type", ["ode", "sde"])
@pytest.mark.parametrize("t_list", T_LISTS, ids=lambda t: f"{len(t) - 1}step")
def test_student_scheduler_config_matches_sample_student(t_list, sample_type, tmp_path):
    config = flux.student_scheduler_config(
        t_list, sample_type, base_config=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER).config
    )
    # Ship it the way an export does and load it back like a Hub checkout.
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert scheduler.config.stochastic_sampling == (sample_type == "sde")
    assert not scheduler.config.use_dynamic_shifting and scheduler.config.shift == 1.0

    tr = _transformer(guidance_embeds=True, seed=3)
    student = flux.FluxWrapper(tr, guidance_scale=3.5)
    pipe = _pipe(tr, scheduler)
    d = _inputs()
    kwargs = flux.stock_pipeline_kwargs(t_list, guidance_scale=3.5)
    assert kwargs["sigmas"] == t_list[:-1] and kwargs["true_cfg_scale"] == 1.0
    # FluxPipeline draws the SDE noise from the global RNG (it does not pass its generator to
    # scheduler.step), in the packed layout.
    torch.manual_seed(1234)
    out = pipe(
        prompt_embeds=d["embeds"],
        pooled_prompt_embeds=d["pooled"],
        latents=flux.student_initial_latents(d["noise"], t_list),
        output_type="latent",
        **_pixels(pipe),
        **kwargs,
    ).images
    # The pipeline visited exactly the rungs (float32), final 0 appended by the scheduler.
    assert torch.equal(pipe.scheduler.sigmas, torch.tensor(t_list, dtype=torch.float32))

    model_kwargs = {"pooled_projections": d["pooled"]}
    if sample_type == "ode":
        # Layout-free: run the wrapper in the latent layout.
        ref = sample_student(
            student,
            d["noise"],
            t_list,
            encoder_hidden_states=d["embeds"],
            model_kwargs=model_kwargs,
        )
        got = flux.unpack_latents(out, H, W)
    else:
        # Same draws only in the same layout: sample in the packed layout.
        ref = sample_student(
            _PackedView(student),
            flux.pack_latents(d["noise"]),
            t_list,
            sample_type="sde",
            encoder_hidden_states=d["embeds"],
            model_kwargs=model_kwargs,
            generator=torch.Generator().manual_seed(1234),
        )
        got = out
    # sample_student re-noises in float64, the scheduler steps in float32: ~1e-7 apart.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if sample_type == "sde" and len(t_list) > 2:  # the fresh noise really entered
        ode = sample_student(
            student,
            d["noise"],
            t_list,
            encoder_hidden_states=d["embeds"],
            model_kwargs=model_kwargs,
        )
        assert (flux.unpack_latents(out, H, W) - ode).abs().max() > 1e-2


def test_student_scheduler_config_validation_and_default_shift():
    base = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    # Without the student config, FluxPipeline's mu would shift custom sigmas.
    base.set_timesteps(sigmas=[0.999, 0.5], mu=0.6)
    assert abs(base.sigmas[1].item() - 0.5) > 1e-2
    with pytest.raises(ValueError, match="sample_type"):
        flux.student_scheduler_config([0.9, 0.0], "euler")
    with pytest.raises(ValueError, match="t_list"):
        flux.student_scheduler_config([0.9, 0.5], "ode")
    config = flux.student_scheduler_config([0.9, 0.0])
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert flux.stock_pipeline_kwargs([1.0, 0.3, 0.0]) == {
        "sigmas": [1.0, 0.3],
        "num_inference_steps": 2,
        "true_cfg_scale": 1.0,
    }


# -- feature capture and the GAN branch -----------------------------------------------------


def test_feature_maps_are_image_stream_non_square():
    tr = _transformer()
    wrapper = flux.FluxWrapper(tr)
    capture = flux.attach_feature_capture(wrapper, feature_indices=[0, 1, 2])
    assert get_feature_capture(wrapper) is capture
    # Independent views of the streams: the input of the next block / of norm_out.
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def pre_hook(module, args, kwargs):
            seen[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[name + "_text"] = kwargs.get("encoder_hidden_states")
            if len(args) > 1:
                seen["temb"] = args[1]

        return pre_hook

    tr.single_transformer_blocks[0].register_forward_pre_hook(grab("single0"), with_kwargs=True)
    tr.single_transformer_blocks[1].register_forward_pre_hook(grab("single1"), with_kwargs=True)
    tr.norm_out.register_forward_pre_hook(grab("norm_out"), with_kwargs=True)
    d = _inputs()
    t = torch.tensor([0.6, 0.9])
    with torch.no_grad(), capture.record() as feats:
        out = wrapper(d["noise"], t, d["embeds"], d["pooled"])
    assert [f.shape for f in feats] == [(B, INNER, H // 2, W // 2)] * 3
    tokens = [f.flatten(2).transpose(1, 2) for f in feats]  # back to [B, N, D]
    # Block 0 (double) -> single block 0's image input; single 0 -> single 1; single 1 -> norm_out.
    for tok, name in zip(tokens, ["single0", "single1", "norm_out"]):
        torch.testing.assert_close(tok, seen[name], rtol=0, atol=0)
    # The text stream is a different sequence (S tokens, not (H/2)(W/2)).
    assert seen["single0_text"].shape[1] == S != tokens[0].shape[1]

    # Geometry: map[:, :, i, j], decoded by norm_out + proj_out, is the output's 2x2 patch
    # at rows 2i.., cols 2j.. (a transposed / mis-folded grid fails here).
    with torch.no_grad():
        for i in range(H // 2):
            for j in range(W // 2):
                token = feats[2][:, :, i, j][:, None, :]
                patch = tr.proj_out(tr.norm_out(token, seen["temb"])).view(B, C, 2, 2)
                torch.testing.assert_close(patch, out[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2])

    # The raw transformer, called as FluxPipeline calls it, gives the same maps.
    with torch.no_grad(), capture.record() as raw_feats:
        tr(
            hidden_states=flux.pack_latents(d["noise"]),
            timestep=t,
            guidance=torch.full([B], 3.5),
            pooled_projections=d["pooled"],
            encoder_hidden_states=d["embeds"],
            txt_ids=torch.zeros(S, 3),
            img_ids=flux.latent_image_ids(H // 2, W // 2),
            return_dict=False,
        )
    for a, b in zip(feats, raw_feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_feature_indices_and_discriminator():
    flux1 = {"num_layers": 19, "num_single_layers": 38}
    assert flux.default_feature_indices(flux1) == flux.DEFAULT_FEATURE_INDICES == (28, 42, 56)
    tr = _transformer()
    assert flux.default_feature_indices(tr.config) == (1, 2)
    capture = flux.attach_feature_capture(flux.FluxWrapper(tr))
    assert capture.feature_indices == (1, 2)
    disc = flux.build_discriminator(tr.config, [0, 2])
    assert disc.feature_channels == [INNER, INNER]
    feats = [torch.randn(B, INNER, H // 2, W // 2) for _ in range(2)]
    assert disc(feats).shape == (B, 2)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        flux.attach_feature_capture(torch.nn.Linear(2, 2))


def _dmd_setup(checkpointing: bool = False, cfg_scale: float | None = None, batch_cfg=False):
    student = flux.FluxWrapper(_transformer(seed=0)).train()
    teacher = flux.FluxWrapper(_transformer(seed=0))
    flux.attach_feature_capture(teacher)
    fake_score = create_fake_score(teacher)
    torch.manual_seed(5)
    disc = flux.build_discriminator(teacher)  # sized from the attached capture
    if checkpointing:
        for model in (student, teacher, fake_score):
            model.enable_gradient_checkpointing()
    config = DMDConfig(gan_loss_weight_gen=0.5, guidance_scale=cfg_scale)
    dmd = DMDPipeline(student, teacher, fake_score, config, discriminator=disc, batch_cfg=batch_cfg)
    return dmd


def _student_loss(dmd, d, cfg_scale):
    kwargs = {}
    if cfg_scale is not None:
        kwargs = dict(
            negative_encoder_hidden_states=d["neg_embeds"],
            negative_model_kwargs={"pooled_projections": d["neg_pooled"]},
        )
    torch.manual_seed(11)
    return dmd.compute_student_loss(
        d["latents"], d["noise"], d["embeds"], pooled_projections=d["pooled"], **kwargs
    )


@pytest.mark.parametrize("cfg_scale,batch_cfg", [(None, False), (2.0, True)], ids=["nocfg", "cfg"])
def test_dmd_step_with_gan_branch(cfg_scale, batch_cfg):
    dmd = _dmd_setup(cfg_scale=cfg_scale, batch_cfg=batch_cfg)
    d = _inputs()
    losses = _student_loss(dmd, d, cfg_scale)
    assert set(losses) == {"vsd", "gan_gen", "total"}
    student_params = list(dmd.student.parameters())
    # The GAN term alone reaches the student through the teacher's image-stream features.
    gan_grads = torch.autograd.grad(losses["gan_gen"], student_params, retain_graph=True)
    assert sum(g.abs().sum() for g in gan_grads) > 0
    losses["total"].backward()
    assert all(p.grad is not None for p in student_params)
    assert sum(p.grad.abs().sum() for p in student_params) > 0
    for module in (dmd.teacher, dmd.fake_score, dmd.discriminator):
        assert all(p.grad is None for p in module.parameters())

    fake = dmd.compute_fake_score_loss(
        d["latents"], d["noise"], d["embeds"], pooled_projections=d["pooled"]
    )
    fake["total"].backward()
    assert sum(p.grad.abs().sum() for p in dmd.fake_score.parameters()) > 0
    disc = dmd.compute_discriminator_loss(
        d["latents"], d["noise"], d["embeds"], pooled_projections=d["pooled"]
    )
    disc["total"].backward()
    assert sum(p.grad.abs().sum() for p in dmd.discriminator.parameters()) > 0
    assert all(p.grad is None for p in dmd.teacher.parameters())


# -- precision, checkpointing, compile ------------------------------------------------------


def test_bf16_forward_and_backward():
    ref_model = flux.FluxWrapper(_transformer())
    model = flux.FluxWrapper(_transformer().to(torch.bfloat16))
    d = _inputs()
    t = torch.tensor([0.8, 0.2])
    ref = ref_model(d["noise"], t, d["embeds"], d["pooled"])
    out = model(d["noise"], t, d["embeds"], d["pooled"])  # fp32 inputs are cast, weights not
    assert out.dtype == torch.bfloat16 and out.shape == (B, C, H, W)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    rel = (out.float() - ref).norm() / ref.norm()
    # bf16 rounds at 2**-8 relative per op; through 3 random-init blocks this measured 2.4e-2.
    assert rel < 5e-2, rel
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    # Bit-exact with FluxPipeline's bf16 call, which rounds the timestep as
    # (sigma * 1000).to(bf16) / 1000 (a plain bf16(t) differs by up to 4 / 1000 for some t).
    sigmas = torch.tensor([0.9137, 0.6171])
    with torch.no_grad():
        exact = model(d["noise"], sigmas, d["embeds"], d["pooled"])
        pipeline_call = dict(
            hidden_states=flux.pack_latents(d["noise"]).bfloat16(),
            guidance=torch.full([1], 3.5).expand(B),
            pooled_projections=d["pooled"].bfloat16(),
            encoder_hidden_states=d["embeds"].bfloat16(),
            txt_ids=torch.zeros(S, 3, dtype=torch.bfloat16),
            img_ids=flux.latent_image_ids(H // 2, W // 2, dtype=torch.bfloat16),
            return_dict=False,
        )
        timestep = (sigmas * 1000).to(torch.bfloat16) / 1000
        raw = model.transformer(timestep=timestep, **pipeline_call)[0]
        naive = model.transformer(timestep=sigmas.bfloat16(), **pipeline_call)[0]
    assert torch.equal(exact, flux.unpack_latents(raw, H, W))
    assert not torch.equal(exact[0], flux.unpack_latents(naive, H, W)[0])  # 0.9137: 912 vs 916


def _counting(fn, calls: list[int]):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_gradient_checkpointing_same_loss_and_grads():
    d = _inputs()
    results = []
    for checkpointing in (False, True):
        dmd = _dmd_setup(checkpointing=checkpointing)
        # Count forward() runs (torch's checkpoint recompute does not fire forward hooks).
        calls: list[int] = []
        block = dmd.student.transformer.transformer_blocks[0]
        block.forward = _counting(block.forward, calls)
        losses = _student_loss(dmd, d, None)
        losses["total"].backward()
        grads = [p.grad.clone() for p in dmd.student.parameters()]
        results.append((losses["total"].detach(), losses["gan_gen"].detach(), grads, len(calls)))
    (loss0, gan0, grads0, calls0), (loss1, gan1, grads1, calls1) = results
    assert calls1 > calls0  # checkpointing really re-ran the block in the backward
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gan1, gan0, rtol=1e-6, atol=1e-7)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_wrapper():
    # aot_eager traces the wrapper with dynamo + AOTAutograd (forward and backward graphs) in
    # ~20 s; inductor's C++ codegen takes ~150 s on 2 CPU cores for the same check.
    model = flux.FluxWrapper(_transformer())
    d = _inputs()
    t = torch.tensor([0.8, 0.2])
    ref = model(d["noise"], t, d["embeds"], d["pooled"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(d["noise"], t, d["embeds"], d["pooled"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert model.transformer.proj_out.weight.grad.abs().sum() > 0


# -- pipeline glue --------------------------------------------------------------------------


def _text_components(max_len: int = 8):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + c, -1.0) for c in string.ascii_lowercase]
    pieces += [(c, -2.0) for c in string.ascii_lowercase]
    tokenizer_2 = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(0)
    clip = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=POOLED_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_len,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    t5 = T5Config(
        vocab_size=len(tokenizer_2), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(clip).eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_2=T5EncoderModel(t5).eval(),
    )


def test_encode_prompt_matches_pipeline_encoding():
    text = _text_components()
    pipe = _pipe(_transformer(), **text)
    prompts = ["a cat", "dog"]
    cond = flux.encode_prompt(pipe, prompts, negative_prompt="", max_sequence_length=8)
    assert cond["encoder_hidden_states"].shape == (2, 8, TEXT_DIM)
    assert cond["pooled_projections"].shape == (2, POOLED_DIM)
    assert cond["negative_encoder_hidden_states"].shape == (2, 8, TEXT_DIM)
    assert cond["negative_pooled_projections"].shape == (2, POOLED_DIM)
    assert not cond["encoder_hidden_states"].requires_grad
    # T5 sequence and CLIP pooled output of the prompts, computed directly.
    ids_2 = text["tokenizer_2"](prompts, padding="max_length", max_length=8, return_tensors="pt")
    ids = text["tokenizer"](prompts, padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        t5 = text["text_encoder_2"](ids_2.input_ids)[0]
        pooled = text["text_encoder"](ids.input_ids).pooler_output
    torch.testing.assert_close(cond["encoder_hidden_states"], t5)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    assert not torch.allclose(cond["negative_pooled_projections"], pooled)
    assert (
        flux.encode_prompt(pipe, prompts, max_sequence_length=8)["negative_pooled_projections"]
        is None
    )

    # The pipeline fed with our embeddings equals the pipeline encoding the prompts itself.
    d = _inputs()
    common = dict(
        num_inference_steps=2, latents=flux.pack_latents(d["noise"]), output_type="latent"
    )
    common.update(max_sequence_length=8, **_pixels(pipe))
    from_text = pipe(prompt=prompts, **common).images
    from_embeds = pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        pooled_prompt_embeds=cond["pooled_projections"],
        **common,
    ).images
    torch.testing.assert_close(from_embeds, from_text, rtol=0, atol=0)


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=C,
        norm_num_groups=4,
        scaling_factor=0.3611,  # Flux's VAE factors
        shift_factor=0.1159,
    ).eval()


def test_vae_normalization_matches_flux_pipelines():
    vae = _tiny_vae()
    tr = _transformer()
    pipe = _pipe(tr, vae=vae)
    assert pipe.vae_scale_factor == 2
    d = _inputs()
    x = d["latents"]
    torch.testing.assert_close(flux.normalize_latents(vae, flux.denormalize_latents(vae, x)), x)
    torch.testing.assert_close(flux.denormalize_latents(vae.config, x), x / 0.3611 + 0.1159)

    # Decoding: FluxPipeline's image == vae.decode(denormalize(latents)).
    common = dict(
        prompt_embeds=d["embeds"],
        pooled_prompt_embeds=d["pooled"],
        num_inference_steps=1,
        latents=flux.pack_latents(d["noise"]),
        **_pixels(pipe),
    )
    image = pipe(output_type="pt", **common).images
    latents = flux.unpack_latents(pipe(output_type="latent", **common).images, H, W)
    with torch.no_grad():
        decoded = vae.decode(flux.denormalize_latents(vae, latents)).sample
    torch.testing.assert_close(image, pipe.image_processor.postprocess(decoded, output_type="pt"))

    # Encoding: FluxImg2ImgPipeline's image latents == normalize(vae.encode(image)).
    img2img = FluxImg2ImgPipeline(
        scheduler=pipe.scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tr,
    )
    pixels = torch.rand(B, 3, H * 2, W * 2) * 2 - 1
    with torch.no_grad():
        expected = img2img._encode_vae_image(pixels, torch.Generator().manual_seed(0))
        raw = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(flux.normalize_latents(vae, raw), expected)


def test_latent_shape_matches_prepare_latents():
    tr = _transformer()
    for pipe in (_pipe(tr), _pipe(tr, vae=_tiny_vae())):
        factor = pipe.vae_scale_factor
        height, width = 8 * 2 * factor + factor, 12 * 2 * factor  # a non-multiple rounds down
        shape = flux.latent_shape(pipe, height, width, batch_size=3)
        packed, ids = pipe.prepare_latents(3, C, height, width, torch.float32, "cpu", None)
        assert shape == (3, C, 16, 24)
        assert packed.shape == flux.pack_latents(torch.zeros(shape)).shape
        assert ids.shape == (8 * 12, 3)
    assert flux.latent_shape(flux.FluxWrapper(tr), 1024, 768) == (1, C, 128, 96)
    assert flux.latent_shape({"in_channels": 64}, 1024, 1024, 2) == (2, 16, 128, 128)
