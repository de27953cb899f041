"""SD3 / SD3.5 plugin: wrapper convention, stock-pipeline parity, feature capture, DMD step.

Tiny transformers built from config (3 layers, inner dim 16, 4 latent channels); nothing is
downloaded. fp32 parity tolerances are 1e-5: the wrapper computes exactly what the stock
pipeline computes (same float32 timesteps ``sigma * 1000``), and the only differences are
float32 re-associations (batched CFG pass vs two passes, ``cond + (s-1)(cond-uncond)`` vs
``uncond + s(cond-uncond)``, Euler step vs x0/eps re-noising in float64), measured ~1e-6 on
latents of magnitude ~4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import nn

from fastgen_diffusers import DMDConfig, DMDPipeline, create_fake_score
from fastgen_diffusers.features import get_feature_capture
from fastgen_diffusers.plugins import sd3
from fastgen_diffusers.sampling import sample_student, sample_teacher

TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=24,
    out_channels=4,
    pos_embed_max_size=16,
)
# SD3.5 adds qk RMS norm and dual-attention (MMDiT-X) blocks.
VARIANTS = {"sd3": {}, "sd35": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}}
INNER_DIM = 16
TOL = dict(rtol=1e-5, atol=1e-5)
B, H, W, L = 2, 8, 12, 7  # non-square latents: token grid 4 x 6; 7 text tokens

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_transformer(variant: str = "sd3", seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY, **VARIANTS[variant])


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "noise": torch.randn(B, 4, H, W, generator=g),
        "pe": torch.randn(B, L, 32, generator=g),
        "pp": torch.randn(B, 24, generator=g),
        "npe": torch.randn(B, L, 32, generator=g),
        "npp": torch.randn(B, 24, generator=g),
    }


def stock_pipe(transformer: nn.Module, scheduler=None, **components) -> StableDiffusion3Pipeline:
    parts = dict.fromkeys(
        (
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "text_encoder_3",
            "tokenizer_3",
        )
    )
    parts.update(components)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        **parts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- wrapper ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_wrapper_scales_timestep_and_validates(variant):
    transformer = tiny_transformer(variant)
    wrapper = sd3.SD3Wrapper(transformer)
    x = inputs()
    t = torch.tensor([0.3, 0.85])
    out = wrapper(x["noise"], t, x["pe"], pooled_projections=x["pp"])
    raw = transformer(
        hidden_states=x["noise"],
        timestep=t * 1000,
        encoder_hidden_states=x["pe"],
        pooled_projections=x["pp"],
    ).sample
    assert out.shape == (B, 4, H, W)
    torch.testing.assert_close(out, raw, rtol=0, atol=0)
    unscaled = transformer(x["noise"], x["pe"], x["pp"], t).sample
    assert (out - unscaled).abs().max() > 1e-2  # the scaling matters
    # A scalar t broadcasts over the batch.
    torch.testing.assert_close(
        wrapper(x["noise"], 0.3, x["pe"], x["pp"]),
        wrapper(x["noise"], torch.full((B,), 0.3), x["pe"], x["pp"]),
    )
    assert wrapper.config is transformer.config
    with pytest.raises(ValueError, match="pooled_projections"):
        wrapper(x["noise"], t, x["pe"])
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        wrapper(x["noise"][..., :7], t, x["pe"], x["pp"])
    fresh = sd3.SD3Wrapper(transformer)
    with pytest.raises(ValueError, match=r"t in \[0, 1\]"):
        fresh(x["noise"], t * 1000, x["pe"], x["pp"])  # doubly scaled t caught on first call


def test_from_pretrained(tmp_path):
    transformer = tiny_transformer("sd35")
    transformer.save_pretrained(tmp_path / "transformer")
    loaded = sd3.SD3Wrapper.from_pretrained(str(tmp_path))
    assert loaded.config.qk_norm == "rms_norm" and tuple(loaded.config.dual_attention_layers) == (
        0,
        1,
    )
    x = inputs()
    t = torch.tensor([0.5, 0.2])
    torch.testing.assert_close(
        loaded(x["noise"], t, x["pe"], x["pp"]),
        sd3.SD3Wrapper(transformer)(x["noise"], t, x["pe"], x["pp"]),
        rtol=0,
        atol=0,
    )


# -- stock pipeline parity ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_teacher_reproduces_stock_pipeline_with_cfg(variant):
    transformer = tiny_transformer(variant)
    pipe = stock_pipe(transformer)  # shift=3.0 like the SD3 / SD3.5 checkpoints
    x = inputs()
    ref = pipe(
        prompt_embeds=x["pe"],
        pooled_prompt_embeds=x["pp"],
        negative_prompt_embeds=x["npe"],
        negative_pooled_prompt_embeds=x["npp"],
        latents=x["noise"],
        num_inference_steps=4,
        guidance_scale=4.0,
        output_type="latent",
    ).images
    sigmas = pipe.scheduler.sigmas.tolist()
    assert len(sigmas) == 5 and sigmas[-1] == 0.0 and 0.5 < sigmas[1] < 1.0  # shifted schedule
    ours = sample_teacher(
        sd3.SD3Wrapper(transformer),
        x["noise"],
        sigmas,
        guidance_scale=4.0,
        encoder_hidden_states=x["pe"],
        negative_encoder_hidden_states=x["npe"],
        model_kwargs={"pooled_projections": x["pp"]},
        negative_model_kwargs={"pooled_projections": x["npp"]},
    )
    torch.testing.assert_close(ours, ref, **TOL)
    assert (ours - x["noise"]).abs().mean() > 0.1  # the sampler moved the latents


def _tiny_text_stack():
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    t5_vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]

    def clip(seed):
        torch.manual_seed(seed)
        config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
            projection_dim=12,  # 12 + 12 = pooled_projection_dim
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(config).eval()

    torch.manual_seed(3)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).eval()
    return {
        "text_encoder": clip(1),
        "tokenizer": CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8),
        "text_encoder_2": clip(2),
        "tokenizer_2": CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8),
        "text_encoder_3": t5,
        "tokenizer_3": T5TokenizerFast(vocab=t5_vocab, extra_ids=0),
    }


def test_encode_prompt_feeds_wrapper_like_the_stock_pipeline():
    transformer = tiny_transformer()
    pipe = stock_pipe(transformer, **_tiny_text_stack())
    prompts, negatives = ["a red cat", "dog"], ["blurry", "ugly face"]
    emb = sd3.encode_prompt(pipe, prompts, negatives, max_sequence_length=6)
    assert emb["prompt_embeds"].shape == (B, 8 + 6, 32)  # CLIP tokens (padded) + T5 tokens
    assert emb["pooled_prompt_embeds"].shape == (B, 24)
    assert emb["negative_prompt_embeds"].shape == emb["prompt_embeds"].shape
    assert not torch.allclose(emb["prompt_embeds"], emb["negative_prompt_embeds"])
    noise = inputs()["noise"]
    ref = pipe(
        prompt=prompts,
        negative_prompt=negatives,
        latents=noise,
        num_inference_steps=3,
        guidance_scale=5.0,
        max_sequence_length=6,
        output_type="latent",
    ).images
    ours = sample_teacher(
        sd3.SD3Wrapper(transformer),
        noise,
        pipe.scheduler.sigmas.tolist(),
        guidance_scale=5.0,
        encoder_hidden_states=emb["prompt_embeds"],
        negative_encoder_hidden_states=emb["negative_prompt_embeds"],
        model_kwargs={"pooled_projections": emb["pooled_prompt_embeds"]},
        negative_model_kwargs={"pooled_projections": emb["negative_pooled_prompt_embeds"]},
    )
    torch.testing.assert_close(ours, ref, **TOL)


T_LISTS = [[0.999, 0.0], [0.999, 0.5, 0.0], [0.999, 0.75, 0.5, 0.25, 0.0]]


@pytest.mark.parametrize("sample_type", ["ode", "sde"])
@pytest.mark.parametrize("t_list", T_LISTS, ids=lambda t: f"{len(t) - 1}step")
def test_student_in_stock_pipeline_matches_sample_student(t_list, sample_type):
    student = tiny_transformer(seed=7)  # any SD3 transformer stands in for a distilled student
    teacher_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    config = sd3.student_scheduler_config(t_list, sample_type, base_config=teacher_scheduler.config)
    pipe = stock_pipe(student, FlowMatchEulerDiscreteScheduler.from_config(config))
    x = inputs()
    call = dict(
        prompt_embeds=x["pe"],
        pooled_prompt_embeds=x["pp"],
        latents=t_list[0] * x["noise"],  # sample_student starts at t_list[0] * noise
        output_type="latent",
        **sd3.stock_pipeline_kwargs(t_list),
    )
    torch.manual_seed(11)  # SD3's pipeline draws the SDE noise from the global RNG
    ref = pipe(**call).images
    assert pipe.scheduler.sigmas.tolist() == torch.tensor(t_list).tolist()  # exact rungs + 0.0
    ours = sample_student(
        sd3.SD3Wrapper(student),
        x["noise"],
        t_list,
        sample_type=sample_type,
        encoder_hidden_states=x["pe"],
        model_kwargs={"pooled_projections": x["pp"]},
        generator=torch.Generator().manual_seed(11),
    )
    torch.testing.assert_close(ours, ref, **TOL)
    if len(t_list) > 2:
        # The scheduler config is what makes it match: the teacher's (shift=3) does not.
        pipe.scheduler = teacher_scheduler
        torch.manual_seed(11)
        assert (pipe(**call).images - ref).abs().max() > 1e-3
        if sample_type == "sde":
            ode = sample_student(
                sd3.SD3Wrapper(student),
                x["noise"],
                t_list,
                sample_type="ode",
                encoder_hidden_states=x["pe"],
                model_kwargs={"pooled_projections": x["pp"]},
            )
            assert (ode - ours).abs().max() > 1e-2  # SDE really drew fresh noise


def test_scheduler_config_and_kwargs_validation():
    base = dict(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config)
    config = sd3.student_scheduler_config([0.9, 0.4, 0.0], "sde", base_config=base)
    assert config["shift"] == 1.0 and config["use_dynamic_shifting"] is False
    assert config["stochastic_sampling"] is True and config["base_image_seq_len"] == 256
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert not any(k.startswith("_") and k != "_class_name" for k in config)
    assert sd3.stock_pipeline_kwargs([0.9, 0.4, 0.0]) == {
        "num_inference_steps": 2,
        "sigmas": [0.9, 0.4],
        "guidance_scale": 1.0,
    }
    for bad in ([0.9], [0.9, 0.4], [0.4, 0.9, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError, match="t_list"):
            sd3.student_scheduler_config(bad)
    with pytest.raises(ValueError, match="sample_type"):
        sd3.student_scheduler_config([0.9, 0.0], "euler")


# -- latents ------------------------------------------------------------------------------------


def test_vae_normalisation_matches_stock_decode():
    torch.manual_seed(4)
    vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),  # vae_scale_factor 8, like SD3
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=1.5305,  # the SD3 VAE's factors
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    z = torch.randn(B, 4, H, W)
    torch.testing.assert_close(sd3.normalize_latents(vae, z), (z - 0.0609) * 1.5305)
    torch.testing.assert_close(sd3.denormalize_latents(vae, sd3.normalize_latents(vae, z)), z)
    pipe = stock_pipe(tiny_transformer(), vae=vae)
    x = inputs()
    call = dict(
        prompt_embeds=x["pe"],
        pooled_prompt_embeds=x["pp"],
        latents=x["noise"],
        num_inference_steps=2,
        guidance_scale=1.0,
    )
    latents = pipe(output_type="latent", **call).images
    image = pipe(output_type="pt", **call).images
    with torch.no_grad():
        decoded = vae.decode(sd3.denormalize_latents(vae, latents)).sample
    ours = pipe.image_processor.postprocess(decoded, output_type="pt")
    assert image.shape == (B, 3, 8 * H, 8 * W)
    torch.testing.assert_close(ours, image, rtol=0, atol=0)


def test_latent_shape():
    pipe = stock_pipe(tiny_transformer())
    assert sd3.latent_shape(pipe, 512, 768, 3) == (3, 4, 64, 96)
    assert sd3.latent_shape(sd3.SD3Wrapper(pipe.transformer), 64, 96) == (1, 4, 8, 12)
    assert sd3.latent_shape(pipe.transformer.config, 1024, 1024, 2) == (2, 4, 128, 128)
    with pytest.raises(ValueError, match="multiples of 16"):
        sd3.latent_shape(pipe, 520, 512)


# -- feature capture ----------------------------------------------------------------------------


class _IdentityJointBlock(nn.Module):
    """Stands in for a JointTransformerBlock: returns its streams unchanged."""

    context_pre_only = False

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        return encoder_hidden_states, hidden_states


def test_feature_maps_keep_the_non_square_layout():
    transformer = tiny_transformer()
    transformer.transformer_blocks[0] = _IdentityJointBlock()
    with torch.no_grad():
        transformer.pos_embed.pos_embed.zero_()
    wrapper = sd3.SD3Wrapper(transformer)
    capture = sd3.attach_feature_capture(wrapper, [0])
    x = inputs()
    with capture.record() as feats:
        wrapper(x["noise"], torch.tensor([0.5, 0.5]), x["pe"], x["pp"])
    # Block 0 passes the patch embedding through, so its map must be the conv output itself
    # ([B, C, H/2, W/2], computed spatially): rows and columns are where they belong.
    expected = transformer.pos_embed.proj(x["noise"])
    assert feats[0].shape == (B, INNER_DIM, H // 2, W // 2) == expected.shape
    torch.testing.assert_close(feats[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_feature_maps_come_from_the_image_stream(variant):
    transformer = tiny_transformer(variant)
    wrapper = sd3.SD3Wrapper(transformer)
    capture = sd3.attach_feature_capture(wrapper)
    assert capture.feature_indices == (0, 1, 2) == sd3.default_feature_indices(transformer)
    assert get_feature_capture(wrapper) is capture
    x = inputs()
    t = torch.tensor([0.4, 0.7])
    with torch.no_grad(), capture.record() as feats:
        wrapper(x["noise"], t, x["pe"], x["pp"])
    # The same blocks by hand (outside record(), so the hooks stay silent).
    with torch.no_grad():
        hidden = transformer.pos_embed(x["noise"])
        temb = transformer.time_text_embed(t * 1000, x["pp"])
        text = transformer.context_embedder(x["pe"])
        image_streams, text_streams = [], []
        for block in transformer.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
            image_streams.append(hidden)
            text_streams.append(text)
    for feat, tokens in zip(feats, image_streams):
        assert feat.shape == (B, INNER_DIM, H // 2, W // 2)
        torch.testing.assert_close(feat.flatten(2).transpose(1, 2), tokens, rtol=0, atol=0)
    # Text streams have L tokens, not (H/2)(W/2); the last block is context_pre_only (None).
    assert all(s.shape == (B, L, INNER_DIM) for s in text_streams[:-1])
    assert transformer.transformer_blocks[-1].context_pre_only and text_streams[-1] is None
    # The raw transformer (pipeline convention t * 1000) gives the same captures.
    raw_capture = sd3.attach_feature_capture(transformer, [1])
    with torch.no_grad(), raw_capture.record() as raw_feats:
        transformer(x["noise"], x["pe"], x["pp"], t * 1000)
    torch.testing.assert_close(raw_feats[0], feats[1], rtol=0, atol=0)


def test_default_feature_indices_and_discriminator():
    assert sd3.default_feature_indices(24) == (7, 15, 23)  # SD3 / SD3.5 medium
    assert sd3.default_feature_indices(38) == (12, 24, 37)  # SD3.5 large
    assert sd3.default_feature_indices(1) == (0,)
    wrapper = sd3.SD3Wrapper(tiny_transformer())
    disc = sd3.build_discriminator(wrapper)
    assert disc.feature_channels == [INNER_DIM] * 3
    assert sd3.build_discriminator(wrapper.config, [2]).num_features == 1
    logits = disc([torch.randn(B, INNER_DIM, H // 2, W // 2) for _ in range(3)])
    assert logits.shape == (B, 3)


# -- DMD2 training step -------------------------------------------------------------------------


def _dmd_setup(checkpointing: bool = False, batch_cfg: bool = False):
    student = sd3.SD3Wrapper(tiny_transformer(seed=0))
    teacher = sd3.SD3Wrapper(tiny_transformer(seed=1))
    if checkpointing:
        student.enable_gradient_checkpointing()
        teacher.enable_gradient_checkpointing()
    capture = sd3.attach_feature_capture(teacher)
    fake_score = create_fake_score(teacher)  # the copy must not inherit the hooks
    assert get_feature_capture(fake_score) is None and get_feature_capture(teacher) is capture
    torch.manual_seed(5)
    disc = sd3.build_discriminator(teacher, capture.feature_indices)
    config = DMDConfig(
        pred_type="flow",
        guidance_scale=3.0,
        gan_loss_weight_gen=0.5,
        gan_r1_reg_weight=10.0,
        sample_t_cfg={"time_dist_type": "logitnormal"},
    )
    pipe = DMDPipeline(
        student, teacher, fake_score, config, discriminator=disc, batch_cfg=batch_cfg
    )
    return pipe, student, teacher, fake_score, disc


def _student_loss(pipe, seed: int = 0):
    x = inputs()
    torch.manual_seed(seed)
    return pipe.compute_student_loss(
        torch.randn(B, 4, H, W),
        x["noise"],
        x["pe"],
        negative_encoder_hidden_states=x["npe"],
        negative_model_kwargs={"pooled_projections": x["npp"]},
        pooled_projections=x["pp"],
    )


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_dmd_step_with_gan_branch(batch_cfg):
    pipe, student, teacher, fake_score, disc = _dmd_setup(batch_cfg=batch_cfg)
    losses = _student_loss(pipe)
    assert set(losses) == {"vsd", "gan_gen", "total"}
    losses["total"].backward()
    grads = _grads(student)
    assert len(grads) == len(list(student.parameters()))
    assert sum(g.abs().sum() for g in grads.values()) > 0
    assert not _grads(teacher) and not _grads(fake_score) and not _grads(disc)
    # The GAN term alone reaches the student through the teacher's image features.
    student.zero_grad(set_to_none=True)
    _student_loss(pipe)["gan_gen"].backward()
    assert sum(g.abs().sum() for g in _grads(student).values()) > 0
    assert not _grads(teacher)

    student.zero_grad(set_to_none=True)
    x = inputs()
    kwargs = dict(pooled_projections=x["pp"])
    pipe.compute_fake_score_loss(None, x["noise"], x["pe"], **kwargs)["total"].backward()
    assert _grads(fake_score) and not _grads(student) and not _grads(teacher)
    d = pipe.compute_discriminator_loss(torch.randn(B, 4, H, W), x["noise"], x["pe"], **kwargs)
    assert set(d) == {"gan_disc", "r1", "total"}
    d["total"].backward()
    assert sum(g.abs().sum() for g in _grads(disc).values()) > 0
    assert not _grads(student) and not _grads(teacher)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    results = []
    for checkpointing in (False, True):
        pipe, student, *_ = _dmd_setup(checkpointing)
        assert student.transformer.gradient_checkpointing is checkpointing
        losses = _student_loss(pipe)
        losses["total"].backward()
        results.append((losses, _grads(student)))
    (loss_off, grads_off), (loss_on, grads_on) = results
    for key in ("vsd", "gan_gen", "total"):
        torch.testing.assert_close(loss_on[key], loss_off[key], rtol=1e-6, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-6)


def test_bf16_forward_and_backward():
    wrapper = sd3.SD3Wrapper(tiny_transformer())
    x = inputs()
    t = torch.tensor([0.3, 0.9])
    ref = wrapper(x["noise"], t, x["pe"], x["pp"]).detach()
    wrapper.to(torch.bfloat16)
    out = wrapper(x["noise"], t, x["pe"], x["pp"])  # fp32 inputs are cast, weights are not
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert all(p.dtype == torch.bfloat16 for p in wrapper.parameters())
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 5e-2, rel  # bf16 has ~3 significant digits; 3 blocks accumulate a few ulps
    out.float().square().mean().backward()
    grads = _grads(wrapper)
    assert grads and all(
        g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads.values()
    )


@pytest.mark.slow
def test_torch_compile_wrapper():
    # Inductor needs minutes on 2 CPU cores; aot_eager traces the same graphs (dynamo +
    # AOTAutograd) and fullgraph=True proves the wrapper adds no graph break.
    wrapper = sd3.SD3Wrapper(tiny_transformer())
    eager = copy.deepcopy(wrapper)
    compiled = torch.compile(wrapper, backend="aot_eager", fullgraph=True)
    x = inputs()
    t = torch.tensor([0.3, 0.9])
    out = compiled(x["noise"], t, x["pe"], pooled_projections=x["pp"])
    ref = eager(x["noise"], t, x["pe"], pooled_projections=x["pp"])
    torch.testing.assert_close(out, ref, **TOL)
    out.square().mean().backward()
    ref.square().mean().backward()
    grads, ref_grads = _grads(wrapper), _grads(eager)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL)
