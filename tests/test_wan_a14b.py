"""Wan 2.2 A14B: two experts (transformer / transformer_2) switched at boundary_ratio.

One tiny two-expert WanPipeline built from config (tests/tiny_pipelines.py) per module. The
teacher mixture must reproduce the stock pipeline (both experts, both CFG scales); DMD2's teacher
CFG must use each sample's expert scale; the exported student (full and LoRA) run by the stock
pipeline must equal sample_student. Tolerances: the same float32 transformer calls on both
sides; only the update arithmetic is written differently (a few 1e-7 relative per step).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from fastgen_diffusers import DMDConfig, DMDPipeline
from fastgen_diffusers.lora import LoraSettings, build_dmd_networks, lora_weight_names
from fastgen_diffusers.plugins import family_from_pretrained
from fastgen_diffusers.plugins.wan import WanFamily, WanWrapper
from fastgen_diffusers.plugins.wan_experts import WanExperts, expert_of_rungs
from fastgen_diffusers.sampling import sample_student, sample_teacher
from fastgen_diffusers.training.export import export_student
from tests.tiny_pipelines import save_tiny_wan

TOL = {"rtol": 1e-5, "atol": 1e-5}
HEIGHT, WIDTH, FRAMES = 64, 96, 5  # latents [4, 2, 8, 12]
LATENT = (4, 2, 8, 12)
BOUNDARY = 0.875
# Wan2.2-Lightning's 4 rungs (shift 5): two per expert.
T_LIST = [1.0, 0.9375, 0.8333333134651184, 0.625, 0.0]

pytestmark = pytest.mark.usefixtures("single_thread", "quiet_diffusers")


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """(path, family, pipeline without text encoder) of the tiny two-expert pipeline."""
    path = save_tiny_wan(tmp_path_factory.mktemp("a14b") / "pipe", boundary_ratio=BOUNDARY)
    family = family_from_pretrained(path)
    pipe = family.load_pipeline(path, text_encoder=None, tokenizer=None)
    return path, family, pipe


def _embeds(batch: int, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, 16, generator=gen), torch.randn(batch, 7, 16, generator=gen)


def _noise(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, *LATENT, generator=torch.Generator().manual_seed(seed))


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


def test_family_detects_two_experts(a14b, tmp_path):
    path, family, pipe = a14b
    assert isinstance(family, WanFamily) and family.boundary_ratio == BOUNDARY
    assert family.transformer_components == ("transformer", "transformer_2")
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    assert isinstance(teacher, WanExperts)
    assert teacher.high.transformer is pipe.transformer
    assert teacher.low.transformer is pipe.transformer_2
    # A pipeline with transformer_2 but no boundary would run transformer_2 never: refused.
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "boundary_ratio": None,
    }
    with pytest.raises(ValueError, match="boundary_ratio=None"):
        WanFamily.options_from_model_index(index, "some/a14b")
    # The single-expert family refuses to load it (its experts would be dropped silently).
    with pytest.raises(ValueError, match="boundary_ratio=0.875"):
        WanFamily().load_pipeline(path, text_encoder=None, tokenizer=None)


def test_teacher_mixture_reproduces_stock_pipeline(a14b):
    """WanPipeline (Euler shift 3, 6 steps, guidance_scale 5 / guidance_scale_2 2) and
    sample_teacher on the mixture with its per-step scales give the same latents; each expert
    runs exactly at the steps the pipeline gives it."""
    _, family, pipe = a14b
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pos, neg = _embeds(2)
    noise = _noise(2)
    high_calls, low_calls = _count_calls(pipe.transformer), _count_calls(pipe.transformer_2)
    ref = pipe(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=6,
        guidance_scale=5.0,
        guidance_scale_2=2.0,
        latents=noise,
        output_type="latent",
    ).frames
    sigmas = pipe.scheduler.sigmas.tolist()
    sides = expert_of_rungs(sigmas, BOUNDARY)
    assert "high" in sides and "low" in sides  # both experts visited
    assert high_calls[0] == 2 * sides.count("high") and low_calls[0] == 2 * sides.count("low")
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    ours = sample_teacher(
        teacher,
        noise,
        sigmas,
        guidance_scale=5.0,
        guidance_scale_fn=lambda t: teacher.guidance_scales(t, 5.0, 2.0),
        encoder_hidden_states=pos,
        negative_encoder_hidden_states=neg,
    )
    torch.testing.assert_close(ours, ref, **TOL)
    # Negative controls: one scale for both experts, or one expert throughout, is far off.
    one_scale = sample_teacher(
        teacher,
        noise,
        sigmas,
        guidance_scale=5.0,
        encoder_hidden_states=pos,
        negative_encoder_hidden_states=neg,
    )
    assert (one_scale - ref).abs().max() > 1e-3
    high_only = sample_teacher(
        WanWrapper(pipe.transformer),
        noise,
        sigmas,
        guidance_scale=5.0,
        guidance_scale_fn=lambda t: teacher.guidance_scales(t, 5.0, 2.0),
        encoder_hidden_states=pos,
        negative_encoder_hidden_states=neg,
    )
    assert (high_only - ref).abs().max() > 1e-3


def test_mixed_batch_routing_and_per_sample_cfg(a14b):
    """A batch mixing both experts' times: each row equals its expert run alone, and DMD2's
    teacher x0 uses guidance_scale on high-noise rows and guidance_scale_2 on the others."""
    _, family, pipe = a14b
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    t = torch.tensor([0.95, 0.3, 0.875, 0.87])
    assert teacher.is_high_noise(t).tolist() == [True, False, True, False]
    x = _noise(4)
    pos, neg = _embeds(4)
    out = teacher(hidden_states=x, timestep=t, encoder_hidden_states=pos)
    for i, expert in enumerate([teacher.high, teacher.low, teacher.high, teacher.low]):
        alone = expert(
            hidden_states=x[i : i + 1], timestep=t[i : i + 1], encoder_hidden_states=pos[i : i + 1]
        )
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-6, atol=1e-6)

    cfg = DMDConfig(guidance_scale=4.0)
    dmd = DMDPipeline(
        teacher,
        teacher,
        teacher,
        cfg,
        guidance_scale_fn=lambda tt: teacher.guidance_scales(tt, 4.0, 2.5),
    )
    guided, _ = dmd._guided_teacher_x0(x, t, pos, neg, 4.0, {}, {}, None)
    with torch.no_grad():
        cond = dmd._predict_x0(teacher, x, t, pos, {})
        uncond = dmd._predict_x0(teacher, x, t, neg, {})
    scales = torch.tensor([4.0, 2.5, 4.0, 2.5]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(guided, cond + (scales - 1) * (cond - uncond), **TOL)
    wrong = DMDPipeline(teacher, teacher, teacher, cfg, guidance_scale_fn=lambda tt: tt[:1])
    with pytest.raises(ValueError, match="one scale per sample"):
        wrong._guided_teacher_x0(x, t, pos, neg, 4.0, {}, {}, None)


def test_i2v_condition_follows_its_rows():
    """Wan 2.2 I2V-A14B layout (boundary 0.9, [mask, condition latents] concatenated to the
    noisy latents): each row's condition_latents go with it to its expert."""
    from diffusers import WanTransformer3DModel

    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        experts.append(
            WanWrapper(
                WanTransformer3DModel(
                    patch_size=(1, 2, 2),
                    num_attention_heads=2,
                    attention_head_dim=12,
                    in_channels=12,  # 4 noisy + 4 mask + 4 condition channels
                    out_channels=4,
                    text_dim=16,
                    freq_dim=16,
                    ffn_dim=32,
                    num_layers=1,
                    rope_max_seq_len=32,
                ).eval()
            )
        )
    model = WanExperts(*experts, boundary_ratio=0.9)
    t = torch.tensor([0.3, 0.95, 0.9])
    x, (pos, _) = _noise(3), _embeds(3)
    cond = torch.randn(3, 8, *LATENT[1:], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=pos, condition_latents=cond)
        for i, expert in enumerate([experts[1], experts[0], experts[0]]):
            alone = expert(
                hidden_states=x[i : i + 1],
                timestep=t[i : i + 1],
                encoder_hidden_states=pos[i : i + 1],
                condition_latents=cond[i : i + 1],
            )
            torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-6, atol=1e-6)


def _stock_student_run(pipe_path, export_dir, lora: bool, noise, pos) -> torch.Tensor:
    if lora:
        pipe = WanPipeline.from_pretrained(pipe_path, text_encoder=None, tokenizer=None)
        high, low = lora_weight_names_for_two()
        pipe.load_lora_weights(export_dir, weight_name=high)
        pipe.load_lora_weights(export_dir, weight_name=low, load_into_transformer_2=True)
    else:
        from diffusers import WanTransformer3DModel

        pipe = WanPipeline.from_pretrained(
            pipe_path,
            text_encoder=None,
            tokenizer=None,
            transformer=WanTransformer3DModel.from_pretrained(export_dir, subfolder="transformer"),
            transformer_2=WanTransformer3DModel.from_pretrained(
                export_dir, subfolder="transformer_2"
            ),
        )
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        export_dir, subfolder="scheduler"
    )
    family = WanFamily(boundary_ratio=BOUNDARY)
    return pipe(
        prompt_embeds=pos,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        latents=T_LIST[0] * noise,
        output_type="latent",
        **family.stock_pipeline_kwargs(T_LIST),
    ).frames


def lora_weight_names_for_two() -> list[str]:
    return ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"]


@pytest.mark.parametrize("layout", ["full", "shared_lora"])
def test_exported_student_runs_in_stock_pipeline(a14b, tmp_path, layout):
    """Student experts changed away from the teacher (so a swapped or missing expert shows),
    exported, loaded into the stock two-expert WanPipeline: it follows T_LIST (two rungs per
    expert) and equals sample_student on the training network."""
    path, family, pipe = a14b
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    nets = build_dmd_networks(teacher, layout, LoraSettings(rank=4, init=False))
    student = nets.student
    torch.manual_seed(11)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = family.student_scheduler_config(T_LIST, "ode", dict(pipe.scheduler.config))
    assert expert_of_rungs(T_LIST, BOUNDARY) == ["high", "high", "low", "low"]
    written = export_student(tmp_path, student=student, scheduler_config=config)
    if layout == "full":
        assert (tmp_path / "transformer").is_dir() and (tmp_path / "transformer_2").is_dir()
    else:
        assert lora_weight_names(student) == lora_weight_names_for_two()
        assert [p.name for p in written[:2]] == lora_weight_names_for_two()
    pos, _ = _embeds(1)
    noise = _noise(1)
    ref = _stock_student_run(path, tmp_path, layout != "full", noise, pos)
    with torch.no_grad():
        ours = sample_student(student, noise, T_LIST, encoder_hidden_states=pos)
    torch.testing.assert_close(ours, ref, **TOL)
    # The experts matter: the student's low expert in both places is far off.
    with torch.no_grad():
        base = student.module if layout != "full" else student
        swapped = WanExperts(base.low, base.low, BOUNDARY)
        if layout != "full":
            from fastgen_diffusers.lora import AdapterRole

            object.__setattr__(swapped, "_fastgen_adapter_state", None)
            wrong = sample_student(
                AdapterRole(swapped, "student"), noise, T_LIST, encoder_hidden_states=pos
            )
        else:
            wrong = sample_student(swapped, noise, T_LIST, encoder_hidden_states=pos)
    assert (wrong - ref).abs().max() > 1e-3


def test_a_scheduler_sending_a_rung_to_the_other_expert_is_refused():
    from fastgen_diffusers.plugins.wan_experts import check_expert_sides

    family = WanFamily(boundary_ratio=BOUNDARY)
    # 0.875 exactly is the high expert's (t >= boundary), in training and in the pipeline.
    assert expert_of_rungs([0.999, 0.875, 0.0], BOUNDARY) == ["high", "high"]
    config = family.student_scheduler_config([0.999, 0.875, 0.0])
    assert config["sigma_max"] == pytest.approx(0.999)
    # A config whose second rung (0.87) falls below the boundary, for a student trained on 0.88.
    other = family.student_scheduler_config([0.999, 0.87, 0.0])
    with pytest.raises(ValueError, match=r"other sides of boundary_ratio=0.875.*\['high', 'low'\]"):
        check_expert_sides([0.999, 0.88, 0.0], other, BOUNDARY)


@pytest.mark.parametrize("rung", [0, 1, 2, 3])
def test_each_rung_trains_the_expert_the_pipeline_runs_it_with(a14b, rung):
    """Backward simulation stopped at rung k: the student loss's gradient reaches the student's
    high expert for rungs at or above the boundary (1.0, 0.9375) and its low expert for the
    others (0.8333, 0.625), never both."""
    _, family, pipe = a14b
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    nets = build_dmd_networks(teacher, "full")
    cfg = DMDConfig(
        guidance_scale=4.0,
        student_sample_steps=4,
        backward_simulation=True,
        sample_t_cfg={"t_list": T_LIST, "time_dist_type": "uniform"},
    )
    dmd = DMDPipeline(nets.student, nets.teacher, nets.fake_score, cfg)
    dmd._rung_index = lambda num_rungs, device: rung  # the rung drawn at random in training
    pos, neg = _embeds(2)
    loss = dmd.compute_student_loss(None, _noise(2), pos, negative_encoder_hidden_states=neg)
    loss["total"].backward()
    reached = {
        name
        for name, expert in zip(("high", "low"), nets.student.experts())
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())
    }
    assert reached == {expert_of_rungs(T_LIST, BOUNDARY)[rung]}


def test_two_expert_run_mistakes_are_caught_before_loading(a14b, tmp_path):
    """--guidance_scale_2 without CFG is refused by the preflight, naming the value and the
    fix."""
    from fastgen_diffusers.training import parse_args
    from fastgen_diffusers.training.errors import UserError
    from fastgen_diffusers.training.preflight import preflight

    (tmp_path / "prompts.jsonl").write_text('{"text": "a cat"}\n')
    base = _train_argv(a14b[0], tmp_path, tmp_path / "out")
    cases = {
        "guidance_scale=null": ["--guidance_scale_2 3.0", "guidance_scale is null"],
    }
    for override, expected in cases.items():
        argv = [*base, "--recipe_overrides", "student_update_freq=2", override]
        with pytest.raises(UserError) as err:
            preflight(parse_args(argv))
        for part in expected:
            assert part in str(err.value), (override, str(err.value))


# -- training runs ------------------------------------------------------------------------------

RUN_PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
RUN_STEPS = 4


def _train_argv(model, root, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--recipe",
        "general/distillation/dmd2_wan22_a14b_t2v",
        "--recipe_overrides",
        "student_update_freq=2",
        "ema.decay=0.9",
        "--guidance_scale_2",
        "3.0",
        "--dataset_name",
        str(root / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--height",
        str(HEIGHT),
        "--width",
        str(WIDTH),
        "--num_frames",
        str(FRAMES),
        "--max_sequence_length",
        "8",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(RUN_STEPS),
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "7",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(a14b, tmp_path_factory):
    """Two 4-iteration runs on the tiny A14B pipeline, a checkpoint every 2: the full layout,
    and shared_lora (each expert its own shared base with student and fake-score adapters)."""
    import json

    from fastgen_diffusers.training import parse_args, train

    path = a14b[0]
    root = tmp_path_factory.mktemp("a14b-runs")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in RUN_PROMPTS)
    )
    runs = {}
    for layout, flags in {
        "full": [],
        "shared_lora": ["--use_lora", "--rank", "4", "--lora_layout", "shared_lora"],
    }.items():
        out = root / layout
        train(parse_args(_train_argv(path, root, out, "--checkpointing_steps", "2", *flags)))
        runs[layout] = (out, flags)
    return root, runs


def _exported(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("transformer*/*.safetensors")) or sorted(
        out.glob("pytorch_lora_weights*.safetensors")
    )
    return {f"{f.relative_to(out)}/{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow  # end-to-end training runs
@pytest.mark.parametrize("layout", ["full", "shared_lora"])
def test_trained_student_runs_in_stock_pipeline(a14b, trained, layout):
    """The run's export (both experts) loads into the stock two-expert pipeline,
    which follows the recipe's rungs and equals sample_student on the loaded experts."""
    path, family, _ = a14b
    out = trained[1][layout][0]
    if layout == "full":
        assert (out / "transformer").is_dir() and (out / "transformer_2").is_dir()
    else:
        assert [p.name for p in sorted(out.glob("*.safetensors"))] == lora_weight_names_for_two()
    pos, _ = _embeds(1)
    noise = _noise(1)
    ref = _stock_student_run(path, out, layout != "full", noise, pos)
    if layout == "full":
        from diffusers import WanTransformer3DModel

        high, low = (
            WanTransformer3DModel.from_pretrained(out, subfolder=name)
            for name in ("transformer", "transformer_2")
        )
    else:
        pipe = WanPipeline.from_pretrained(path, text_encoder=None, tokenizer=None)
        pipe.load_lora_weights(out)
        pipe.load_lora_weights(
            out, weight_name=lora_weight_names_for_two()[1], load_into_transformer_2=True
        )
        high, low = pipe.transformer, pipe.transformer_2
    student = family.wrap_transformers([high, low])
    with torch.no_grad():
        ours = sample_student(student, noise, T_LIST, encoder_hidden_states=pos)
    torch.testing.assert_close(ours, ref, **TOL)
    card = (out / "README.md").read_text()
    assert "transformer_2" in card and "boundary_ratio = 0.875" in card
    assert "| teacher CFG scale | 4 |" in card
    assert "| teacher CFG scale, low-noise expert | 3 |" in card


@pytest.mark.slow  # end-to-end training runs
@pytest.mark.parametrize("layout", ["full", "shared_lora"])
def test_resume_is_exact(a14b, trained, layout, tmp_path):
    """Resumed from checkpoint-2, the run logs the same losses and exports the same two
    experts, bit for bit."""
    import shutil

    from fastgen_diffusers.training import parse_args, train

    root, runs = trained
    straight, flags = runs[layout]
    out = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(straight / "logs", out / "logs")  # rows 3-4 are cut and written again
    train(parse_args(_train_argv(a14b[0], root, out, "--resume_from_checkpoint", "latest", *flags)))
    losses = (out / "logs" / "losses.jsonl").read_text()
    assert losses == (straight / "logs" / "losses.jsonl").read_text()
    assert len(losses.splitlines()) == RUN_STEPS
    a, b = _exported(straight), _exported(out)
    assert a.keys() == b.keys() and any("transformer_2" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # end-to-end training runs
@pytest.mark.parametrize("layout", ["full", "shared_lora"])
def test_card_snippet_runs_both_experts(trained, layout, tmp_path, monkeypatch):
    """The model card's snippet, run as written (CPU, float32) from another directory, loads
    the student's two experts into the stock pipeline and makes a video."""
    from test_card_snippets import run_card_snippet

    out = trained[1][layout][0]
    ns = run_card_snippet(out, tmp_path / "elsewhere", monkeypatch)
    pipe = ns["pipe"]
    assert type(pipe).__name__ == "WanPipeline" and pipe.config.boundary_ratio == BOUNDARY
    if layout == "full":
        assert "transformer_2=transformer_2" in (out / "README.md").read_text()
    else:
        for expert in (pipe.transformer, pipe.transformer_2):
            assert list(expert.peft_config) == ["default_0"]
    assert ns["video"] is not None and len(ns["video"]) == FRAMES


def test_memory_plan_counts_both_experts(a14b, tmp_path, capsys):
    """A pipeline with transformer_2 plans two of every network: frozen weights, trained
    weights, gradients, optimizer state and EMA are exactly twice the one-expert figures (same
    transformer config), and the one-GPU activations are the one-expert ones (each row runs
    through one expert); the command line reads the experts from model_index.json."""
    import dataclasses

    from fastgen_diffusers.plan import (
        PlanSettings,
        load_experts,
        load_transformer_config,
        main,
        plan_memory,
    )

    path = a14b[0]
    one = save_tiny_wan(tmp_path / "one")
    assert (load_experts(str(path)), load_experts(str(one))) == (2, 1)
    assert load_experts("Wan-AI/Wan2.2-T2V-A14B-Diffusers") == 2  # shipped copy, no network
    assert load_experts("Wan-AI/Wan2.1-T2V-14B-Diffusers") == 1
    config = load_transformer_config(str(path))
    assert config == load_transformer_config(str(one))
    settings = PlanSettings(height=HEIGHT, width=WIDTH, num_frames=FRAMES, gan=False)
    doubled = (
        "frozen weights",
        "trained weights (fp32)",
        "optimizer state",
        "EMA (fp32, full on every GPU)",
    )
    for layout in ("full", "shared_lora"):
        s = dataclasses.replace(settings, layout=layout, rank=4)
        single, pair = plan_memory(config, s), plan_memory(config, s, experts=2)
        assert pair.experts == 2 and pair.num_params == 2 * single.num_params
        for line in doubled:
            assert single.lines[line] > 0 and pair.lines[line] == 2 * single.lines[line], line
        acts = [k for k in single.lines if k.startswith("activations")]
        assert acts and all(pair.lines[k] == single.lines[k] for k in acts)
        # Two ranks: every rank also runs one row through the expert it has no sample for.
        two = dataclasses.replace(s, num_gpus=2)
        pair2, single2 = plan_memory(config, two, experts=2), plan_memory(config, two)
        assert pair2.lines["frozen weights"] == 2 * single2.lines["frozen weights"]
        assert sum(pair2.lines[k] for k in acts if k in pair2.lines) > sum(
            single2.lines[k] for k in acts if k in single2.lines
        )
    assert main(["--pretrained_model_name_or_path", str(path), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "WanTransformer3DModel (2 experts," in out and "2 experts (transformer" in out


def test_i2v_teacher_mixture_reproduces_stock_pipeline(a14b):
    """Wan 2.2 I2V-A14B layout: a two-expert WanImageToVideoPipeline (boundary_ratio 0.9, no
    CLIP image encoder, [mask, condition latents] concatenated along channels; Euler shift 5,
    6 steps, guidance_scale 4 / guidance_scale_2 2) and sample_teacher on WanExperts with the
    pipeline's own image condition (prepare_image_condition) give the same latents."""
    import numpy as np
    import PIL.Image
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from fastgen_diffusers.plugins import wan

    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        experts.append(
            WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=12,  # 4 noisy + 4 frame mask + 4 condition channels
                out_channels=4,
                text_dim=16,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ).eval()
        )
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=a14b[2].vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        image_processor=None,
        image_encoder=None,
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=0.9,
    )
    rng = np.random.default_rng(3)
    image = PIL.Image.fromarray((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))
    pos, neg = _embeds(1)
    noise = _noise(1)
    high_calls, low_calls = _count_calls(experts[0]), _count_calls(experts[1])
    ref = pipe(
        image=image,
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=6,
        guidance_scale=4.0,
        guidance_scale_2=2.0,
        latents=noise,
        output_type="latent",
    ).frames
    sigmas = pipe.scheduler.sigmas.tolist()
    sides = expert_of_rungs(sigmas, 0.9)
    assert "high" in sides and "low" in sides
    assert high_calls[0] == 2 * sides.count("high") and low_calls[0] == 2 * sides.count("low")
    cond = wan.prepare_image_condition(pipe, image, HEIGHT, WIDTH, FRAMES)
    assert set(cond) == {"condition_latents"}
    assert cond["condition_latents"].shape == (1, 8, *LATENT[1:])
    teacher = WanExperts(WanWrapper(experts[0]), WanWrapper(experts[1]), boundary_ratio=0.9)
    kwargs = dict(encoder_hidden_states=pos, negative_encoder_hidden_states=neg)
    ours = sample_teacher(
        teacher,
        noise,
        sigmas,
        guidance_scale=4.0,
        guidance_scale_fn=lambda t: teacher.guidance_scales(t, 4.0, 2.0),
        model_kwargs=cond,
        **kwargs,
    )
    torch.testing.assert_close(ours, ref, **TOL)
    # Negative control: without the image condition's content the result is far off.
    blank = {"condition_latents": torch.zeros_like(cond["condition_latents"])}
    wrong = sample_teacher(
        teacher,
        noise,
        sigmas,
        guidance_scale=4.0,
        guidance_scale_fn=lambda t: teacher.guidance_scales(t, 4.0, 2.0),
        model_kwargs=blank,
        **kwargs,
    )
    assert (wrong - ref).abs().max() > 1e-3


def test_teacher_lora_with_two_experts_is_refused_before_loading(a14b, tmp_path):
    from fastgen_diffusers.training import parse_args
    from fastgen_diffusers.training.errors import UserError
    from fastgen_diffusers.training.preflight import preflight

    (tmp_path / "prompts.jsonl").write_text('{"text": "a cat"}\n')
    argv = _train_argv(a14b[0], tmp_path, tmp_path / "out")
    with pytest.raises(UserError) as err:
        preflight(parse_args([*argv, "--use_lora", "--teacher_lora", "some/style-lora"]))
    message = str(err.value)
    assert "--teacher_lora 'some/style-lora' with a two-expert teacher" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


@pytest.mark.slow  # end-to-end training runs
@pytest.mark.parametrize("layout", ["full", "shared_lora"])
def test_gan_with_two_experts_trains_and_resumes_exactly(a14b, tmp_path, layout):
    """The GAN branch with two experts: one head set per expert, each fed the features of the
    rows its expert scored. A run on videos trains both head sets and, resumed from
    checkpoint-2, logs the same losses and exports the same two experts bit for bit."""
    import json
    import shutil

    import numpy as np
    from diffusers.utils import export_to_video
    from safetensors.torch import load_file

    from fastgen_diffusers.training import parse_args, train

    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(RUN_PROMPTS):
        frames = [rng.random((HEIGHT, WIDTH, 3)).astype(np.float32) for _ in range(FRAMES)]
        export_to_video(frames, str(root / f"clip{i}.mp4"), fps=16)
        rows.append(json.dumps({"text": prompt, "video": f"clip{i}.mp4"}) + "\n")
    (root / "prompts.jsonl").write_text("".join(rows))
    flags = ["--video_column", "video", "--checkpointing_steps", "2"]
    if layout == "shared_lora":
        flags += ["--use_lora", "--rank", "4", "--lora_layout", "shared_lora"]
    flags += ["--recipe_overrides"]
    flags += ["student_update_freq=2", "ema.decay=0.9", "gan_loss_weight_gen=0.03"]
    flags += ["backward_simulation=false", "gan_use_same_t_noise=true"]
    straight = tmp_path / "straight"
    train(parse_args(_train_argv(a14b[0], root, straight, *flags)))
    logged = [
        json.loads(line) for line in (straight / "logs" / "losses.jsonl").read_text().splitlines()
    ]
    assert all(("student/gan_gen" in r) != ("discriminator/gan_disc" in r) for r in logged)

    # Both head sets trained (the batch of 2 at shift 5 draws t on both sides of 0.875).
    def heads(step: int) -> dict[str, torch.Tensor]:
        files = sorted((straight / f"checkpoint-{step}" / "state").glob("*.safetensors"))
        tensors = {k: v for f in files for k, v in load_file(f).items()}
        return {k: v for k, v in tensors.items() if "discriminator" in k and "optim" not in k}

    disc, later = heads(2), heads(4)
    for expert in ("high", "low"):
        keys = [k for k in disc if f"{expert}." in k]
        assert keys and any(not torch.equal(disc[k], later[k]) for k in keys), expert
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(straight / "logs", resumed / "logs")
    train(
        parse_args(
            _train_argv(a14b[0], root, resumed, "--resume_from_checkpoint", "latest", *flags)
        )
    )
    losses = (resumed / "logs" / "losses.jsonl").read_text()
    assert losses == (straight / "logs" / "losses.jsonl").read_text()
    a, b = _exported(straight), _exported(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gan_features_and_heads_follow_each_rows_expert(a14b):
    """With two experts each row's captured features come from the expert its t belongs to (in
    batch order) and its logits from that expert's head set."""
    from fastgen_diffusers.features import detach_feature_capture, get_feature_capture
    from fastgen_diffusers.plugins import wan
    from fastgen_diffusers.plugins.wan_experts import ExpertsDiscriminator

    _, family, pipe = a14b
    teacher = family.wrap_transformers([pipe.transformer, pipe.transformer_2])
    capture = wan.attach_feature_capture(teacher)
    try:
        torch.manual_seed(0)
        disc = wan.build_discriminator(teacher)
        assert isinstance(disc, ExpertsDiscriminator) and get_feature_capture(teacher) is capture
        t = torch.tensor([0.3, 0.95, 0.9, 0.5])
        x, (pos, _) = _noise(4), _embeds(4)
        with torch.no_grad():
            with capture.record() as mixed:
                teacher(hidden_states=x, timestep=t, encoder_hidden_states=pos)
            logits = disc(mixed)
            assert mixed[-1].tolist() == [False, True, True, False]
            for i, side in enumerate(["low", "high", "high", "low"]):
                with capture.record() as alone:
                    teacher(
                        hidden_states=x[i : i + 1],
                        timestep=t[i : i + 1],
                        encoder_hidden_states=pos[i : i + 1],
                    )
                assert alone[-1].tolist() == [side == "high"]
                for a, b in zip(mixed[:-1], alone[:-1]):
                    torch.testing.assert_close(a[i : i + 1], b, rtol=1e-5, atol=1e-5)
                head = getattr(disc, side)(alone[:-1])
                other = getattr(disc, "low" if side == "high" else "high")(alone[:-1])
                torch.testing.assert_close(logits[i : i + 1], head, rtol=1e-5, atol=1e-5)
                assert (logits[i : i + 1] - other).abs().max() > 1e-4
        with pytest.raises(ValueError, match="ExpertsFeatureCapture"):
            disc(mixed[:-1])
    finally:
        detach_feature_capture(teacher)
