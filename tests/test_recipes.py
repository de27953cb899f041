"""Built-in DMD2 recipes: they load by name, their values are the published ones, their header
names the teacher and the GAN feature blocks of the family plugin, and the stock pipeline of
their family can follow their ``t_list``.

Nothing is built or downloaded: only YAML, the configs and the plugins' scheduler helpers.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import fastgen_diffusers
from fastgen_diffusers.loader import builtin_recipes, resolve_config_path
from fastgen_diffusers.plugins import flux, qwen_image, sd3, wan

PREFIX = "general/distillation/"
EMA = {"ema.type": "constant", "ema.decay": 0.9999, "ema.mode": "full_tensor"}
# FastGen's RF noise schedule, no t_list given: torch.linspace(max_t=0.999, 0, steps + 1).
LINSPACE_4 = torch.linspace(0.999, 0.0, 5, dtype=torch.float64).tolist()
# FastGen's Wan 2.1 1.3B 4-step list: not reachable by the stock WanPipeline.
FASTGEN_WAN21_4STEP = [0.999, 0.937, 0.833, 0.624, 0.0]
# SenseFlow's SD3.5 rungs [999, 749, 499, 249] through the shift-3.0 sigma table.
SD35_T_LIST = [1.0, 0.9, 0.75, 0.5, 0.0]
# SenseFlow's FLUX rungs: denoising_step_list [1000, 904, 759, 512] / 1000.
FLUX_T_LIST = [1.0, 0.904, 0.759, 0.512, 0.0]

# Values taken from the sources named in each recipe's header (dotted keys reach nested fields).
EXPECTED: dict[str, dict[str, Any]] = {
    "dmd2_wan22_5b": {
        "pred_type": "flow",
        "guidance_scale": 5.0,
        "student_sample_steps": 2,
        "student_sample_type": "ode",
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 5.0,
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        "sample_t_cfg.t_list": [0.999, 0.833, 0.0],
        **EMA,
    },
    "dmd2_wan21_t2v_1_3b": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 5.0,
        "student_sample_steps": 4,
        "student_sample_type": "ode",
        "backward_simulation": False,
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "gan_r1_reg_weight": 0.0,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 5.0,
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        # closest_reachable_t_list(FASTGEN_WAN21_4STEP), rounded to 7 decimals.
        "sample_t_cfg.t_list": [0.999, 0.8569464, 0.7325706, 0.624, 0.0],
        **EMA,
    },
    "dmd2_wan21_t2v_14b": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 5.0,
        "student_sample_steps": 2,
        "student_sample_type": "ode",
        "backward_simulation": False,
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "gan_r1_reg_weight": 0.0,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 5.0,
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        "sample_t_cfg.t_list": [0.999, 0.833, 0.0],
        **EMA,
    },
    "dmd2_wan22_a14b_t2v": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 4.0,
        "student_sample_steps": 4,
        "student_sample_type": "ode",
        "backward_simulation": True,
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.0,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 5.0,
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        "sample_t_cfg.t_list": [1.0, 0.9375, 0.8333333134651184, 0.625, 0.0],
        **EMA,
    },
    "dmd2_sd35_medium": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 4.0,
        "student_sample_steps": 4,
        "student_sample_type": "sde",
        "backward_simulation": False,
        "student_update_freq": 10,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "gan_r1_reg_weight": 0.0,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 3.0,
        "sample_t_cfg.min_t": 0.02,
        "sample_t_cfg.max_t": 0.98,
        "sample_t_cfg.t_list": SD35_T_LIST,
        **EMA,
    },
    "dmd2_sd35_large": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 4.0,
        "guidance_scale_range": (3.0, 10.0),
        "student_sample_steps": 4,
        "student_sample_type": "sde",
        "backward_simulation": True,
        "backward_simulation_prob": 0.5,
        "ida_ratio": 0.03,
        "isg_weight": 1.0,
        "isg_huber_c": 0.001,
        "isg_guidance_scale": 5.0,
        "isg_margin": 0.05,
        "gan_rung_weighting": "constant",
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "gan_r1_reg_weight": 0.0,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 3.0,
        "sample_t_cfg.min_t": 0.02,
        "sample_t_cfg.max_t": 0.98,
        "sample_t_cfg.t_list": SD35_T_LIST,
        **EMA,
    },
    "dmd2_flux1_dev": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": None,  # embedded guidance 3.5 lives on FluxWrapper
        "student_sample_steps": 4,
        "student_sample_type": "sde",
        "backward_simulation": True,
        "backward_simulation_prob": 0.5,
        "ida_ratio": 0.03,
        "isg_weight": 1.0,
        "isg_huber_c": 0.001,
        "isg_margin": 0.02,
        "gan_rung_weighting": "one_minus_t_squared",
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "gan_r1_reg_weight": 0.0,
        "sample_t_cfg.time_dist_type": "uniform",
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        "sample_t_cfg.t_list": FLUX_T_LIST,
        **EMA,
    },
    "dmd2_qwen_image": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 4.0,
        "student_sample_steps": 4,
        "student_sample_type": "sde",
        "backward_simulation": False,
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.03,
        "gan_use_same_t_noise": True,
        "gan_r1_reg_weight": 0.0,
        "sample_t_cfg.time_dist_type": "uniform",
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        "sample_t_cfg.t_list": LINSPACE_4,
        **EMA,
    },
    # The shipped digits teacher (README main command): values measured on it.
    "dmd2_digits_sd3": {
        "pred_type": "flow",
        "num_train_timesteps": None,
        "guidance_scale": 2.0,
        "student_sample_steps": 1,
        "student_sample_type": "sde",
        "student_update_freq": 5,
        "fake_score_pred_type": "x0",
        "gan_loss_weight_gen": 0.0,
        "sample_t_cfg.time_dist_type": "shifted",
        "sample_t_cfg.shift": 3.0,
        "sample_t_cfg.min_t": 0.001,
        "sample_t_cfg.max_t": 0.999,
        "sample_t_cfg.t_list": [0.999, 0.0],
        "ema.decay": 0.99,
    },
    # The 4-step digits student: same loss shape, SenseFlow's SD3.5 rungs, backward simulation.
    "dmd2_digits_sd3_4step": {
        "guidance_scale": 2.0,
        "student_sample_steps": 4,
        "student_sample_type": "ode",
        "backward_simulation": True,
        "sample_t_cfg.shift": 3.0,
        "sample_t_cfg.t_list": [0.999, 0.9, 0.75, 0.5, 0.0],
        "ema.decay": 0.99,
    },
}

# Recipe -> (plugin, teacher Hub id named in the header, GAN feature blocks of the real model's
# depth as the plugin computes them; the header must name them). The Wan 2.2 5B recipe predates
# the header convention: no teacher id there.
FAMILY: dict[str, tuple[Any, str | None, tuple[int, ...]]] = {
    "dmd2_wan22_5b": (wan, None, wan.default_feature_indices(30)),
    "dmd2_wan21_t2v_1_3b": (
        wan,
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        wan.default_feature_indices(30),
    ),
    "dmd2_wan21_t2v_14b": (wan, "Wan-AI/Wan2.1-T2V-14B-Diffusers", wan.default_feature_indices(40)),
    # No GAN branch with two experts: no feature blocks.
    "dmd2_wan22_a14b_t2v": (wan, "Wan-AI/Wan2.2-T2V-A14B-Diffusers", None),
    "dmd2_wan22_a14b_i2v": (wan, "Wan-AI/Wan2.2-I2V-A14B-Diffusers", None),
    "dmd2_sd35_medium": (
        sd3,
        "stabilityai/stable-diffusion-3.5-medium",
        sd3.default_feature_indices(24),
    ),
    "dmd2_sd35_large": (
        sd3,
        "stabilityai/stable-diffusion-3.5-large",
        sd3.default_feature_indices(38),
    ),
    "dmd2_flux1_dev": (
        flux,
        "black-forest-labs/FLUX.1-dev",
        flux.default_feature_indices({"num_layers": 19, "num_single_layers": 38}),
    ),
    "dmd2_qwen_image": (
        qwen_image,
        "Qwen/Qwen-Image",
        qwen_image.default_feature_indices({"num_layers": 60}),
    ),
    "dmd2_digits_sd3": (sd3, "embedded/digits-sd3", None),  # no GAN: no feature blocks
    "dmd2_digits_sd3_4step": (sd3, "embedded/digits-sd3", None),
}

# The I2V recipe is the T2V one at Wan 2.2 I2V-A14B's CFG (wan_i2v_A14B: 3.5 for both experts).
EXPECTED["dmd2_wan22_a14b_i2v"] = {**EXPECTED["dmd2_wan22_a14b_t2v"], "guidance_scale": 3.5}
RECIPES = sorted(EXPECTED)


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    # Building FlowMatchEulerDiscreteScheduler configs logs about the extra sigma_min/max keys.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


def _get(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _header(name: str) -> str:
    """The leading comment block of the recipe file."""
    lines = resolve_config_path(PREFIX + name).read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    return "\n".join(header)


def test_every_builtin_distillation_recipe_is_covered():
    found = {n.removeprefix(PREFIX) for n in builtin_recipes() if n.startswith(PREFIX)}
    assert found == set(EXPECTED) == set(FAMILY)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_the_published_values(name):
    cfg = fastgen_diffusers.load_dmd_config(PREFIX + name)
    assert isinstance(cfg, fastgen_diffusers.DMDConfig)
    assert cfg == fastgen_diffusers.DMDConfig.from_yaml(PREFIX + name)
    for key, expected in EXPECTED[name].items():
        got = _get(cfg, key)
        if isinstance(expected, list):
            assert got == pytest.approx(expected, abs=1e-12), key
        elif isinstance(expected, float):
            assert got == pytest.approx(expected, abs=1e-12), key
        else:
            assert got == expected, key


@pytest.mark.parametrize("name", RECIPES)
def test_steps_match_t_list(name):
    cfg = fastgen_diffusers.load_dmd_config(PREFIX + name)
    t_list = cfg.sample_t_cfg.t_list
    assert t_list is not None and t_list[-1] == 0.0
    assert cfg.student_sample_steps == len(t_list) - 1


@pytest.mark.parametrize("name", RECIPES)
def test_stock_pipeline_can_follow_t_list(name):
    cfg = fastgen_diffusers.load_dmd_config(PREFIX + name)
    plugin = FAMILY[name][0]
    t_list = cfg.sample_t_cfg.t_list
    # Wan: no `sigmas` argument, the schedule must come from the config alone (raises when the
    # list is unreachable). SD3 / Flux / Qwen-Image: any list, through `sigmas=`.
    config = plugin.student_scheduler_config(t_list, cfg.student_sample_type)
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert config["stochastic_sampling"] is (cfg.student_sample_type == "sde")
    kwargs = plugin.stock_pipeline_kwargs(t_list)
    assert kwargs["num_inference_steps"] == cfg.student_sample_steps
    if plugin is not wan:
        assert kwargs["sigmas"] == pytest.approx(t_list[:-1])


@pytest.mark.parametrize("name", RECIPES)
def test_header_names_teacher_and_feature_blocks(name):
    _, teacher, blocks = FAMILY[name]
    header = _header(name)
    assert header, f"{name} has no leading comment block"
    if teacher is not None:
        assert teacher in header
        if blocks is not None:  # None: a recipe without the GAN branch
            assert str(blocks) in header, f"{name} header should name feature blocks {blocks}"


def test_wan21_1_3b_list_is_the_closest_reachable_to_fastgens():
    # FastGen's own 4-step list cannot be followed by the stock pipeline...
    with pytest.raises(ValueError, match="closest_reachable_t_list"):
        wan.student_scheduler_config(FASTGEN_WAN21_4STEP)
    # ...the recipe trains on the closest list that can (same end rungs, Karras interior).
    cfg = fastgen_diffusers.load_dmd_config(PREFIX + "dmd2_wan21_t2v_1_3b")
    closest = wan.closest_reachable_t_list(FASTGEN_WAN21_4STEP)
    assert cfg.sample_t_cfg.t_list == pytest.approx(closest, abs=1e-6)
    a, b = FASTGEN_WAN21_4STEP[0], FASTGEN_WAN21_4STEP[3]
    karras = [(a ** (1 / 7) + i / 3 * (b ** (1 / 7) - a ** (1 / 7))) ** 7 for i in range(4)]
    assert cfg.sample_t_cfg.t_list[:-1] == pytest.approx(karras, abs=1e-7)


def test_sd35_t_list_is_senseflows_rungs_through_the_shift_3_table():
    # SenseFlow indexes flip(scheduler.sigmas) (shift 3.0, 1000 entries) at [999, 749, 499, 249]:
    # sigma = shift(u) with u = (index + 1) / 1000.
    shift = 3.0
    rungs = [(i + 1) / 1000 for i in (999, 749, 499, 249)]
    shifted = [shift * u / (1 + (shift - 1) * u) for u in rungs]
    assert shifted + [0.0] == pytest.approx(SD35_T_LIST, abs=1e-12)


def test_qwen_t_list_is_fastgens_default_linspace():
    assert LINSPACE_4 == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0], abs=1e-12)
    assert all(math.isclose(a - b, 0.999 / 4) for a, b in zip(LINSPACE_4, LINSPACE_4[1:]))


def test_wan22_a14b_t_list_is_lightnings_shift_5_schedule_two_rungs_per_expert():
    """Wan2.2-Lightning: 4 Euler steps at shift 5, two per expert. The stock two-expert
    pipeline follows the rungs from the exported scheduler config, each on its expert's side of
    boundary_ratio 0.875."""
    from fastgen_diffusers.plugins.wan import WanFamily
    from fastgen_diffusers.plugins.wan_experts import expert_of_rungs

    cfg = fastgen_diffusers.load_dmd_config(PREFIX + "dmd2_wan22_a14b_t2v")
    t_list = cfg.sample_t_cfg.t_list
    shifted = [5 * u / (1 + 4 * u) for u in (1.0, 0.75, 0.5, 0.25)]
    assert t_list[:-1] == pytest.approx(shifted, abs=1e-7)
    assert expert_of_rungs(t_list, 0.875) == ["high", "high", "low", "low"]
    config = WanFamily(boundary_ratio=0.875).student_scheduler_config(t_list)
    assert wan.pipeline_t_list(config, 4) == pytest.approx(t_list, abs=1e-6)


def test_wan22_a14b_i2v_rungs_fall_two_per_expert_of_boundary_0_9():
    """The I2V recipe keeps Lightning's shift-5 rungs; at the I2V boundary 0.9 they still
    split two and two, and the exported scheduler config leads the stock pipeline over them."""
    from fastgen_diffusers.plugins.wan_experts import expert_of_rungs
    from fastgen_diffusers.plugins.wan_i2v import WanImageToVideoFamily

    t_list = fastgen_diffusers.load_dmd_config(PREFIX + "dmd2_wan22_a14b_i2v").sample_t_cfg.t_list
    assert expert_of_rungs(t_list, 0.9) == ["high", "high", "low", "low"]
    config = WanImageToVideoFamily(boundary_ratio=0.9).student_scheduler_config(t_list)
    assert wan.pipeline_t_list(config, 4) == pytest.approx(t_list, abs=1e-6)
