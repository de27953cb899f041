"""LoRA layouts: role views, gradient routing (with GAN and gradient checkpointing), DDP,
EMA of the adapter only, export into the stock pipeline, checkpoint/resume."""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

import fastgen_diffusers as fgd
from fastgen_diffusers.lora import (
    AdapterRole,
    LoraSettings,
    add_adapters,
    build_dmd_networks,
    default_target_modules,
    enable_gradient_checkpointing,
    fuse_student,
    save_student_lora,
    use_adapter,
)
from fastgen_diffusers.plugins import sd3
from fastgen_diffusers.sampling import sample_student

B, C, H, W = 2, 4, 8, 12
LORA = LoraSettings(rank=4, alpha=8)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=C,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=C,
        pos_embed_max_size=16,
    )


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(B, C, H, W, generator=g),
        "noise": torch.randn(B, C, H, W, generator=g),
        "ehs": torch.randn(B, 5, 16, generator=g),
        "neg": torch.randn(B, 5, 16, generator=g),
        "pooled": torch.randn(B, 8, generator=g),
        "neg_pooled": torch.randn(B, 8, generator=g),
    }


def randomize_adapters(model, seed: int = 3):
    """Non-zero LoRA B (of a model, or of one role) so roles differ: fresh adapters equal the
    teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def student_loss(nets, x, *, gan: bool, guidance: float | None = 3.0):
    disc = None
    if gan:
        sd3.attach_feature_capture(nets.teacher)
        torch.manual_seed(9)
        disc = sd3.build_discriminator(nets.teacher)
    cfg = fgd.DMDConfig(guidance_scale=guidance, gan_loss_weight_gen=0.1 if gan else 0.0)
    pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg, discriminator=disc)
    torch.manual_seed(0)
    return pipe.compute_student_loss(
        x["latents"],
        x["noise"],
        x["ehs"],
        negative_encoder_hidden_states=x["neg"],
        negative_model_kwargs={"pooled_projections": x["neg_pooled"]},
        pooled_projections=x["pooled"],
    ), disc


def grads(module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters()}


# -- layouts and views ------------------------------------------------------------------------


def test_layouts_share_or_copy_as_documented():
    teacher = sd3.SD3Wrapper(tiny_transformer())
    n_base = sum(p.numel() for p in teacher.parameters())

    full = build_dmd_networks(copy.deepcopy(teacher), "full")
    assert all(p.requires_grad for p in full.student.parameters())
    assert sum(p.numel() for p in full.student.parameters()) == n_base

    shared = build_dmd_networks(teacher, "shared_lora", LORA)
    assert shared.base is teacher
    assert shared.teacher.module is shared.student.module is shared.fake_score.module
    student_params = dict(shared.student.named_parameters())
    fake_params = dict(shared.fake_score.named_parameters())
    base_params = dict(shared.teacher.named_parameters())
    assert student_params and all(".lora_" in n and ".student." in n for n in student_params)
    assert fake_params and all(".fake_score." in n for n in fake_params)
    assert not any("lora" in n for n in base_params)
    assert sum(p.numel() for p in base_params.values()) == n_base  # one copy of the weights
    assert all(p.requires_grad for p in [*student_params.values(), *fake_params.values()])
    assert not any(p.requires_grad for p in base_params.values())
    # rank 4 on every default target of 3 blocks (the last block has no text-stream outputs)
    layers = {n.split(".lora_")[0] for n in student_params}
    assert any(n.endswith("attn.to_q") for n in layers) and any(
        n.endswith("ff.net.2") for n in layers
    )
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in student_params.values())

    separate = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "separate_lora", LORA)
    assert separate.student.module is not separate.fake_score.module


def test_roles_start_as_the_teacher_and_switch_without_touching_requires_grad():
    teacher = sd3.SD3Wrapper(tiny_transformer())
    reference = copy.deepcopy(teacher)
    nets = build_dmd_networks(teacher, "shared_lora", LORA)
    x, t = inputs(), torch.tensor([0.7, 0.3])
    args = (x["noise"], t, x["ehs"])
    kw = {"pooled_projections": x["pooled"]}
    with torch.no_grad():
        expected = reference(*args, **kw)
        for role in (nets.teacher, nets.student, nets.fake_score):
            torch.testing.assert_close(role(*args, **kw), expected)  # zero-init LoRA B
        randomize_adapters(nets.base)
        before = {n: p.requires_grad for n, p in nets.base.named_parameters()}
        out = {r: getattr(nets, r)(*args, **kw) for r in ("teacher", "student", "fake_score")}
        assert {n: p.requires_grad for n, p in nets.base.named_parameters()} == before
    torch.testing.assert_close(out["teacher"], expected)
    assert (out["student"] - expected).abs().max() > 1e-3
    assert (out["fake_score"] - out["student"]).abs().max() > 1e-3


def test_lora_settings_are_honoured():
    model = tiny_transformer()
    settings = LoraSettings(
        rank=2, alpha=6, dropout=0.25, init="gaussian", target_modules=["attn.to_q", "attn.to_v"]
    )
    add_adapters(model, settings, ["student"])
    layer = model.transformer_blocks[0].attn.to_q
    assert layer.r["student"] == 2 and layer.scaling["student"] == 3.0
    assert layer.lora_dropout["student"].p == 0.25
    assert not hasattr(model.transformer_blocks[0].attn.to_k, "lora_A")
    assert layer.lora_A["student"].weight.abs().sum() > 0
    assert default_target_modules(sd3.SD3Wrapper(tiny_transformer()))[0] == "attn.to_q"
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="nope"):
        add_adapters(tiny_transformer(), LoraSettings(target_modules=["nope"]), ["x"])
    with pytest.raises(ValueError, match="layout='half'"):
        build_dmd_networks(tiny_transformer(), "half")
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        AdapterRole(model, "other")


# -- gradient routing ---------------------------------------------------------------------------


@pytest.mark.parametrize("gan", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_base_gradients_match_separate_copies(gan, checkpointing):
    """Same initial weights, same seed: the shared base must give exactly the losses and student
    gradients of the layout with one copy per role. A wrong adapter in any forward or in the
    checkpointed recomputation would change them."""
    x = inputs()
    layouts = {}
    for layout in ("separate_lora", "shared_lora"):
        teacher = sd3.SD3Wrapper(tiny_transformer())
        nets = build_dmd_networks(teacher, layout, LORA)
        randomize_adapters(nets.student, seed=3)
        randomize_adapters(nets.fake_score, seed=4)
        if checkpointing:
            for role in {id(r.module): r for r in (nets.student, nets.fake_score)}.values():
                enable_gradient_checkpointing(role.module)
        losses, disc = student_loss(nets, x, gan=gan)
        losses["total"].backward()
        layouts[layout] = (losses, nets, disc)

    (l_sep, sep, _), (l_sh, sh, disc) = layouts["separate_lora"], layouts["shared_lora"]
    for key in l_sep:
        torch.testing.assert_close(l_sh[key], l_sep[key], rtol=1e-5, atol=1e-7)
    g_sep, g_sh = grads(sep.student), grads(sh.student)
    assert g_sep.keys() == g_sh.keys()
    for name in g_sep:
        assert g_sh[name] is not None, name
        torch.testing.assert_close(g_sh[name], g_sep[name], rtol=1e-4, atol=1e-7)
    assert sum(g.abs().sum() for g in g_sh.values()) > 0
    assert all(g is None for g in grads(sh.fake_score).values())
    assert all(p.grad is None for p in sh.teacher.parameters())
    if gan:
        assert all(p.grad is None for p in disc.parameters())


def test_fake_score_step_reaches_the_fake_adapter_only():
    nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
    randomize_adapters(nets.base)
    enable_gradient_checkpointing(nets.base)
    x = inputs()
    pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, fgd.DMDConfig())
    loss = pipe.compute_fake_score_loss(
        x["latents"], x["noise"], x["ehs"], pooled_projections=x["pooled"]
    )
    loss["total"].backward()
    fake_grads = grads(nets.fake_score)
    # every fake-score LoRA weight is in the graph (the last block's text query has no effect
    # on the image stream, so its gradient is exactly zero)
    assert all(g is not None for g in fake_grads.values())
    assert sum(bool(g.abs().sum() > 0) for g in fake_grads.values()) >= len(fake_grads) - 2
    assert all(g is None for g in grads(nets.student).values())
    assert all(p.grad is None for p in nets.teacher.parameters())


def test_peft_set_adapter_would_drop_the_gradient():
    """Why roles never call peft's set_adapter: it flips requires_grad, and a gradient whose
    requires_grad went off between forward and backward is silently dropped."""
    x, t = inputs(), torch.tensor([700.0, 300.0])

    def student_grads(switch):
        model = tiny_transformer()
        add_adapters(model, LORA, ["student", "fake_score"])
        randomize_adapters(model)
        with use_adapter(model, "student"):
            out = model(
                hidden_states=x["noise"],
                timestep=t,
                encoder_hidden_states=x["ehs"],
                pooled_projections=x["pooled"],
            ).sample
        switch(model)  # e.g. the fake-score forward of the same step
        out.square().mean().backward()
        return [p.grad for n, p in model.named_parameters() if ".student." in n]

    assert all(g is None for g in student_grads(lambda m: m.set_adapter("fake_score")))
    kept = student_grads(lambda m: use_adapter(m, "fake_score").__enter__())
    assert all(g is not None for g in kept) and sum(g.abs().sum() for g in kept) > 0


def test_model_checkpointing_without_the_adapter_aware_function_is_refused():
    nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
    nets.base.transformer.enable_gradient_checkpointing()
    x = inputs()
    with pytest.raises(RuntimeError, match="enable_gradient_checkpointing"):
        nets.student(x["noise"], torch.tensor([0.5, 0.5]), x["ehs"], pooled_projections=x["pooled"])


def test_ema_tracks_the_student_adapter_only():
    nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
    cfg = fgd.DMDConfig(ema={"decay": 0.5})
    pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg)
    keys = pipe.ema.state_dict().keys()
    assert keys == dict(nets.student.named_parameters()).keys()
    assert all(".student." in k for k in keys)


# -- export ------------------------------------------------------------------------------------


def tiny_pipeline(transformer) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        latent_channels=C,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_stock(pipe, x, t_list):
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        sd3.student_scheduler_config(t_list, base_config=pipe.scheduler.config)
    )
    return pipe(
        prompt_embeds=x["ehs"],
        pooled_prompt_embeds=x["pooled"],
        height=H * 8,
        width=W * 8,
        latents=t_list[0] * x["noise"],
        output_type="latent",
        **sd3.stock_pipeline_kwargs(t_list),
    ).images


@pytest.mark.parametrize("use_ema", [False, True])
def test_exported_student_runs_in_the_stock_pipeline(tmp_path, use_ema):
    nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
    randomize_adapters(nets.student, seed=3)
    randomize_adapters(nets.fake_score, seed=4)
    x, t_list = inputs(), [0.999, 0.6, 0.0]
    kwargs = {
        "encoder_hidden_states": x["ehs"],
        "model_kwargs": {"pooled_projections": x["pooled"]},
    }
    ema = None
    if use_ema:
        ema = fgd.ExponentialMovingAverage(nets.student, fgd.EMAConfig(decay=0.5))
        ema.update(nets.student, iteration=0)
        randomize_adapters(nets.student, seed=5)  # live weights move on
        ema.update(nets.student, iteration=1)  # EMA = mean of both
    context = fgd.ema.ema_weights(ema, nets.student) if use_ema else contextlib.nullcontext()
    with context:
        expected = sample_student(nets.student, x["noise"], t_list, **kwargs)
        path = save_student_lora(nets.student, tmp_path / "lora")
        fused = fuse_student(nets.student)
        fused.save_pretrained(tmp_path / "fused")
    live = sample_student(nets.student, x["noise"], t_list, **kwargs)
    assert (live - expected).abs().max() > 1e-4 if use_ema else torch.equal(live, expected)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    assert not [f for f in os.listdir(tmp_path / "lora") if f.startswith(".tmp")]

    # LoRA file into a fresh stock pipeline built on the (untouched) base weights
    pipe = tiny_pipeline(tiny_transformer())
    pipe.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(run_stock(pipe, x, t_list), expected, rtol=1e-4, atol=1e-5)
    assert pipe.transformer.peft_config["default_0"].r == 4  # metadata restored the rank

    # fused transformer, loaded like any checkpoint
    pipe = tiny_pipeline(SD3Transformer2DModel.from_pretrained(tmp_path / "fused"))
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    torch.testing.assert_close(run_stock(pipe, x, t_list), expected, rtol=1e-4, atol=1e-5)
    # the training model still has both adapters and the teacher is intact
    assert len(nets.base.transformer.peft_config) == 2


def test_adapter_checkpoint_resume_is_exact(tmp_path):
    x = inputs()

    def setup():
        nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
        pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, fgd.DMDConfig())
        opts = {
            role: torch.optim.AdamW(getattr(nets, role).parameters(), lr=1e-2)
            for role in ("student", "fake_score")
        }
        return nets, pipe, opts

    def step(nets, pipe, opts, seed):
        torch.manual_seed(seed)
        for role, fn in (
            ("fake_score", pipe.compute_fake_score_loss),
            ("student", pipe.compute_student_loss),
        ):
            opts[role].zero_grad()
            kwargs = {"pooled_projections": x["pooled"]}
            loss = fn(x["latents"], x["noise"], x["ehs"], **kwargs)["total"]
            loss.backward()
            opts[role].step()
        return loss.item()

    nets, pipe, opts = setup()
    step(nets, pipe, opts, 0)
    state = {
        role: {"weights": getattr(nets, role).state_dict(), "opt": opt.state_dict()}
        for role, opt in opts.items()
    }
    torch.save(state, tmp_path / "ckpt.pt")
    straight = [step(nets, pipe, opts, s) for s in (1, 2)]

    nets2, pipe2, opts2 = setup()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for role, opt in opts2.items():
        getattr(nets2, role).load_state_dict(saved[role]["weights"])
        opt.load_state_dict(saved[role]["opt"])
    resumed = [step(nets2, pipe2, opts2, s) for s in (1, 2)]
    assert resumed == straight
    for role in ("student", "fake_score"):
        for (n, a), (_, b) in zip(
            getattr(nets, role).named_parameters(), getattr(nets2, role).named_parameters()
        ):
            assert torch.equal(a, b), n
    with pytest.raises(RuntimeError, match="missing"):
        nets2.student.load_state_dict({})


# -- DDP ---------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, out: str) -> None:
    # A file rendezvous: no TCP port to race other processes for.
    rendezvous = f"file://{out}/rendezvous"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
        randomize_adapters(nets.student, seed=3)
        randomize_adapters(nets.fake_score, seed=4)
        # One DDP per trainable role: each registers exactly its adapter (requires_grad is on for
        # both adapters from the start, never flipped).
        student, fake = DDP(nets.student), DDP(nets.fake_score)
        x = inputs(seed=10 + rank)  # each rank its own data
        pipe = fgd.DMDPipeline(student, nets.teacher, fake, fgd.DMDConfig())
        torch.manual_seed(rank)
        pipe.compute_student_loss(
            x["latents"], x["noise"], x["ehs"], pooled_projections=x["pooled"]
        )["total"].backward()
        torch.manual_seed(rank)
        pipe.compute_fake_score_loss(
            x["latents"], x["noise"], x["ehs"], pooled_projections=x["pooled"]
        )["total"].backward()
        result = {
            role: {n: p.grad.clone() for n, p in getattr(nets, role).named_parameters()}
            for role in ("student", "fake_score")
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_both_adapters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # single-process gradients of each rank's data, averaged = what DDP must give every rank
    expected = {}
    for rank in range(2):
        nets = build_dmd_networks(sd3.SD3Wrapper(tiny_transformer()), "shared_lora", LORA)
        randomize_adapters(nets.student, seed=3)
        randomize_adapters(nets.fake_score, seed=4)
        x = inputs(seed=10 + rank)
        pipe = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, fgd.DMDConfig())
        torch.manual_seed(rank)
        pipe.compute_student_loss(
            x["latents"], x["noise"], x["ehs"], pooled_projections=x["pooled"]
        )["total"].backward()
        torch.manual_seed(rank)
        pipe.compute_fake_score_loss(
            x["latents"], x["noise"], x["ehs"], pooled_projections=x["pooled"]
        )["total"].backward()
        for role in ("student", "fake_score"):
            for n, p in getattr(nets, role).named_parameters():
                expected.setdefault((role, n), []).append(p.grad)
    for (role, name), per_rank in expected.items():
        mean = (per_rank[0] + per_rank[1]) / 2
        for rank in range(2):
            torch.testing.assert_close(ranks[rank][role][name], mean, rtol=1e-4, atol=1e-7)
    assert any(
        (a - b).abs().max() > 1e-6 for a, b in (v for v in expected.values())
    )  # ranks really saw different data


def test_default_targets_exist_in_every_family():
    from diffusers import (
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        WanTransformer3DModel,
    )
    from peft.tuners.tuners_utils import BaseTunerLayer

    models = [
        tiny_transformer(),
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        ),
        WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=1,
            rope_max_seq_len=32,
        ),
        QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            axes_dims_rope=(2, 2, 4),
        ),
    ]
    for model in models:
        targets = default_target_modules(model)
        add_adapters(model, LoraSettings(rank=2), ["student"])
        adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        for target in targets:  # every default names real layers of the family
            assert any(n.endswith("." + target) for n in adapted), (type(model), target)
        assert not any(n in ("proj_out", "norm_out.linear") for n in adapted)
