"""Teacher = base + the user's LoRA (``--teacher_lora``): fused into the teacher, frozen in every
layout, and exported both as the student adapter alone (stacked on the user's LoRA in the stock
pipeline) and as one merged LoRA.

Tolerances: everything runs in fp32. Fusing adds ``s B A`` to the weights once, where the stock
pipeline adds the LoRA branch per call: the outputs differ by float32 rounding (~1e-6 on O(1)
latents); we allow 1e-5 absolute + 1e-4 relative, as the other stock-pipeline export tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import fastgen_diffusers as fgd
from fastgen_diffusers.lora import (
    LAYOUTS,
    MERGED_LORA_WEIGHT_NAME,
    LoraSettings,
    build_dmd_networks,
    fuse_user_lora,
    save_merged_lora,
    save_student_lora,
)
from fastgen_diffusers.plugins import sd3
from fastgen_diffusers.sampling import sample_student

pytestmark = pytest.mark.usefixtures("single_thread")

B, C, H, W = 2, 4, 8, 12
SCALE = 0.7
# The user's LoRA and the student adapter overlap on to_q / to_v; to_k and ff.net.2 are the
# user's only, add_q_proj the student's only.
USER_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "ff.net.2"]
STUDENT = LoraSettings(rank=3, alpha=6, target_modules=["attn.to_q", "attn.to_v", "add_q_proj"])
ATOL, RTOL = 1e-5, 1e-4


def tiny_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=C,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=C,
        pos_embed_max_size=16,
    ).eval()


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(B, C, H, W, generator=g),
        "noise": torch.randn(B, C, H, W, generator=g),
        "ehs": torch.randn(B, 5, 16, generator=g),
        "pooled": torch.randn(B, 8, generator=g),
    }


def stock_pipeline(transformer: SD3Transformer2DModel) -> StableDiffusion3Pipeline:
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=C,
        block_out_channels=(4,),
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


def run_stock(pipe: StableDiffusion3Pipeline, x: dict, t_list: list[float]) -> torch.Tensor:
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


@pytest.fixture(scope="module")
def user_lora(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A rank-2, alpha-4 LoRA (scaling 2) with random A and B, in diffusers' format."""
    model = tiny_transformer()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=USER_TARGETS, init_lora_weights=False)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("style")
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return str(folder)


def stock_with_user_lora(user_lora: str) -> StableDiffusion3Pipeline:
    pipe = stock_pipeline(tiny_transformer())
    pipe.load_lora_weights(user_lora, adapter_name="style")
    pipe.set_adapters(["style"], [SCALE])
    return pipe


def fused_teacher(user_lora: str) -> tuple[sd3.SD3Wrapper, fgd.lora.UserLora]:
    transformer = tiny_transformer()
    user = fuse_user_lora(transformer, user_lora, SCALE)
    return sd3.SD3Wrapper(transformer), user


def test_fused_teacher_is_the_stock_pipeline_with_the_lora_at_its_scale(user_lora):
    teacher, user = fused_teacher(user_lora)
    transformer = teacher.transformer
    # A plain model again: no LoRA layer, no peft config, nothing trainable.
    assert not any(isinstance(m, BaseTunerLayer) for m in transformer.modules())
    assert not getattr(transformer, "peft_config", None)
    assert not any(p.requires_grad for p in transformer.parameters())
    assert user.scale == SCALE and user.rank == 2
    assert len(user.layers) == 2 * len(USER_TARGETS)  # two blocks
    a, b = user.layers["transformer_blocks.0.attn.to_k"]
    assert a.shape == (2, 16) and b.shape == (16, 2)
    x, t_list = inputs(), [0.999, 0.6, 0.0]
    expected = run_stock(stock_with_user_lora(user_lora), x, t_list)
    plain = run_stock(stock_pipeline(tiny_transformer()), x, t_list)
    assert (expected - plain).abs().max() > 1e-2  # the LoRA changes the teacher
    ours = run_stock(stock_pipeline(transformer), x, t_list)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_bad_lora_and_scale_are_refused(tmp_path, user_lora):
    with pytest.raises(ValueError, match="finite"):
        fuse_user_lora(tiny_transformer(), user_lora, math.nan)
    from safetensors.torch import save_file

    save_file({"unet.down.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="no transformer weights"):
        fuse_user_lora(tiny_transformer(), str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_starts_at_teacher_plus_lora_and_trains_the_student_only(user_lora, layout):
    teacher, _ = fused_teacher(user_lora)
    nets = build_dmd_networks(teacher, layout, STUDENT)
    x = inputs()
    t = torch.tensor([0.9, 0.4])
    x_t = (1 - t[:, None, None, None]) * x["latents"] + t[:, None, None, None] * x["noise"]
    cond = {"encoder_hidden_states": x["ehs"], "pooled_projections": x["pooled"]}
    with torch.no_grad():
        stock = stock_with_user_lora(user_lora).transformer
        ref = stock(hidden_states=x_t, timestep=1000 * t, **cond, return_dict=False)[0]
        for role in ("teacher", "student", "fake_score"):
            out = getattr(nets, role)(hidden_states=x_t, timestep=t, **cond)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=role)
    if layout == "shared_lora":
        # one copy of the weights: the teacher (base + user LoRA) under both adapters
        assert nets.base is nets.teacher.module is nets.student.module
    dmd = fgd.DMDPipeline(nets.student, nets.teacher, nets.fake_score, fgd.DMDConfig())
    torch.manual_seed(0)
    loss = dmd.compute_student_loss(
        x["latents"], x["noise"], x["ehs"], pooled_projections=x["pooled"]
    )
    loss["total"].backward()
    student_ids = {id(p) for p in nets.student.parameters()}
    fake_ids = {id(p) for p in nets.fake_score.parameters()}
    everything = {
        id(p): p
        for net in (nets.student, nets.teacher, nets.fake_score)
        for p in getattr(net, "module", net).parameters()
    }
    for pid, p in everything.items():
        # The user's LoRA lives in the frozen base weights: never trainable, never a gradient.
        assert p.requires_grad == (pid in student_ids or pid in fake_ids)
        if pid not in student_ids:
            assert p.grad is None
    assert sum(p.grad is not None for p in nets.student.parameters()) > 0


def test_exports_equal_sample_student_in_the_stock_pipeline(tmp_path, user_lora):
    teacher, user = fused_teacher(user_lora)
    nets = build_dmd_networks(teacher, "shared_lora", STUDENT)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in nets.student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x, t_list = inputs(), [0.999, 0.6, 0.0]
    kwargs = {
        "encoder_hidden_states": x["ehs"],
        "model_kwargs": {"pooled_projections": x["pooled"]},
    }
    with torch.no_grad():
        expected = sample_student(nets.student, x["noise"], t_list, **kwargs)
    save_student_lora(nets.student, tmp_path)
    merged_path = save_merged_lora(nets.student, user, tmp_path)
    assert merged_path.endswith(MERGED_LORA_WEIGHT_NAME)

    # 1. The student adapter stacked on the user's LoRA.
    pipe = stock_pipeline(tiny_transformer())
    pipe.load_lora_weights(user_lora, adapter_name="style")
    pipe.load_lora_weights(tmp_path, adapter_name="student")  # finds the student file
    pipe.set_adapters(["style", "student"], [SCALE, 1.0])
    torch.testing.assert_close(run_stock(pipe, x, t_list), expected, atol=ATOL, rtol=RTOL)

    # 2. The merged LoRA alone: rank 2 + 3, scaling 1, zeros where only one of them adapts.
    pipe = stock_pipeline(tiny_transformer())
    pipe.load_lora_weights(tmp_path, weight_name=MERGED_LORA_WEIGHT_NAME, adapter_name="m")
    config = pipe.transformer.peft_config["m"]
    assert (config.r, config.lora_alpha) == (5, 5)
    torch.testing.assert_close(run_stock(pipe, x, t_list), expected, atol=ATOL, rtol=RTOL)
    state = load_file(merged_path)
    k_only = state["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"]
    add_q_only = state["transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"]
    assert k_only.shape == (5, 16) and not k_only[2:].any() and k_only[:2].any()
    assert not add_q_only[:, :2].any() and add_q_only[:, 2:].any()


# -- train_dmd2.py --------------------------------------------------------------------------------


def _argv(*extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "m", "--recipe", "r", "--dataset_name", "d", *extra]


def test_flags_are_checked_before_anything_loads(tmp_path, capsys):
    from fastgen_diffusers.training import parse_args

    for extra, message in [
        (["--teacher_lora", "./missing/style"], "--teacher_lora './missing/style' does not exist"),
        (["--teacher_lora", "style.safetensors"], "does not exist; expected a diffusers LoRA"),
        (["--teacher_lora", "a/b/c"], "'a/b/c' does not exist"),
        (["--teacher_lora", "x", "--teacher_lora_scale", "nan"], "--teacher_lora_scale nan"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(_argv(*extra))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, extra
    # a Hub repo id, or an existing file, passes
    assert parse_args(_argv("--teacher_lora", "me/style-lora")).teacher_lora == "me/style-lora"
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    args = parse_args(_argv("--teacher_lora", str(lora), "--teacher_lora_scale", "0.5"))
    assert (args.teacher_lora, args.teacher_lora_scale) == (str(lora), 0.5)
    assert parse_args(_argv()).teacher_lora is None


@pytest.mark.slow
def test_train_dmd2_with_teacher_lora_exports_both_loras(tmp_path):
    """A 2-step shared_lora run on a tiny SD3 teacher + a LoRA: the student adapter stacked on
    the LoRA and the merged LoRA give the same images in the stock pipeline, and the card and
    the merged snippet name the LoRA."""
    from tiny_pipelines import CALL_KWARGS, save_tiny_sd3

    from fastgen_diffusers.training import parse_args, train

    model = save_tiny_sd3(tmp_path / "model")
    base = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["attn.to_k"], init_lora_weights=False)
    base.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "style",
        transformer_lora_layers=get_peft_model_state_dict(base),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    (tmp_path / "recipe.yaml").write_text("student_update_freq: 2\n")
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    out = tmp_path / "out"
    size = CALL_KWARGS["sd3"]
    argv = [
        "--pretrained_model_name_or_path", str(model), "--recipe", str(tmp_path / "recipe.yaml"),
        "--dataset_name", str(tmp_path / "p.txt"), "--output_dir", str(out),
        "--height", str(size["height"]), "--width", str(size["width"]),
        "--max_train_steps", "2", "--learning_rate", "1e-2", "--report_to", "none",
        "--use_lora", "--rank", "2", "--teacher_lora", str(tmp_path / "style"),
        "--teacher_lora_scale", "0.5",
    ]  # fmt: skip
    train(parse_args(argv))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / MERGED_LORA_WEIGHT_NAME).is_file()
    card = (out / "README.md").read_text()
    assert "`style` (local) at scale 0.5" in card
    assert f"weight_name={MERGED_LORA_WEIGHT_NAME!r}" in card

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt="a cat",
            num_inference_steps=1,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            max_sequence_length=8,
            **size,
        ).images

    stacked = StableDiffusion3Pipeline.from_pretrained(model)
    stacked.load_lora_weights(tmp_path / "style", adapter_name="style")
    stacked.load_lora_weights(out, adapter_name="student")
    stacked.set_adapters(["style", "student"], [0.5, 1.0])
    merged = StableDiffusion3Pipeline.from_pretrained(model)
    merged.load_lora_weights(out, weight_name=MERGED_LORA_WEIGHT_NAME)
    plain = StableDiffusion3Pipeline.from_pretrained(model)
    plain.load_lora_weights(out)  # the student adapter without the style
    a, b, c = images(stacked), images(merged), images(plain)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    assert (a - c).abs().max() > 1e-3  # the style is part of the student
