"""DMDConfig & friends: documented defaults, JSON round trip, every validation rule."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fastgen_diffusers import DistillationConfig, DMDConfig, EMAConfig, SampleTimestepConfig

# The default-config JSON blocks of the API reference, verbatim.
DOC_DMD = {
    "pred_type": "flow",
    "guidance_scale": None,
    "sample_t_cfg": None,
    "student_sample_steps": 1,
    "student_sample_type": "ode",
    "num_train_timesteps": None,
    "student_update_freq": 5,
    "fake_score_pred_type": "x0",
    "gan_loss_weight_gen": 0.0,
    "gan_use_same_t_noise": False,
    "gan_r1_reg_weight": 0.0,
    "gan_r1_reg_alpha": 0.1,
    "ema": None,
}
DOC_EMA = {
    "decay": 0.9999,
    "type": "constant",
    "start_iter": 0,
    "gamma": 16.97,
    "halflife_kimg": 500.0,
    "rampup_ratio": 0.05,
    "batch_size": 1,
    "fsdp2": True,
    "mode": "full_tensor",
    "dtype": "float32",
}
DOC_T = {
    "time_dist_type": "shifted",
    "min_t": 0.001,
    "max_t": 0.999,
    "shift": 5.0,
    "p_mean": 0.0,
    "p_std": 1.0,
    "t_list": None,
}


def test_documented_defaults():
    dumped = DMDConfig().model_dump()
    for key, value in DOC_DMD.items():
        if key != "sample_t_cfg":
            assert dumped[key] == value, key
    assert dumped["sample_t_cfg"] == DOC_T
    assert dumped["backward_simulation"] is False
    assert EMAConfig().model_dump() == DOC_EMA
    assert SampleTimestepConfig().model_dump() == DOC_T
    dist = DistillationConfig().model_dump()
    assert set(dist) == {
        "pred_type",
        "guidance_scale",
        "sample_t_cfg",
        "student_sample_steps",
        "student_sample_type",
        "num_train_timesteps",
    }


def test_documented_json_validates_to_defaults():
    # The reference shows sample_t_cfg as null: it must mean "the default distribution".
    assert DMDConfig.model_validate(DOC_DMD) == DMDConfig()
    assert DMDConfig.model_validate_json(json.dumps(DOC_DMD)) == DMDConfig()


def test_json_round_trip_of_a_full_config():
    cfg = DMDConfig(
        guidance_scale=5.0,
        student_sample_steps=2,
        sample_t_cfg={"time_dist_type": "logitnormal", "t_list": [0.999, 0.833, 0.0]},
        gan_loss_weight_gen=0.03,
        gan_r1_reg_weight=100.0,
        ema={"type": "halflife", "halflife_kimg": 10.0, "mode": "local_shard", "dtype": None},
        backward_simulation=True,
    )
    again = DMDConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.ema.dtype is None and again.sample_t_cfg.t_list == [0.999, 0.833, 0.0]


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (DMDConfig, {"no_such_key": 1}, "no_such_key"),
        (SampleTimestepConfig, {"typo_t": 1}, "typo_t"),
        (EMAConfig, {"decay_rate": 0.9}, "decay_rate"),
        (DMDConfig, {"pred_type": "velocity"}, "pred_type"),
        (DMDConfig, {"fake_score_pred_type": "score"}, "fake_score_pred_type"),
        (DMDConfig, {"student_sample_type": "euler"}, "student_sample_type"),
        (DMDConfig, {"student_sample_steps": 0}, "student_sample_steps"),
        (DMDConfig, {"student_update_freq": 0}, "student_update_freq"),
        (DMDConfig, {"num_train_timesteps": 0}, "num_train_timesteps"),
        (DMDConfig, {"guidance_scale": 0.5}, "guidance_scale"),
        (DMDConfig, {"gan_loss_weight_gen": -0.1}, "gan_loss_weight_gen"),
        (DMDConfig, {"gan_r1_reg_weight": -1.0}, "gan_r1_reg_weight"),
        (DMDConfig, {"gan_r1_reg_alpha": 0.0}, "gan_r1_reg_alpha"),
        (SampleTimestepConfig, {"time_dist_type": "cosine"}, "time_dist_type"),
        (SampleTimestepConfig, {"min_t": -0.1}, "min_t"),
        (SampleTimestepConfig, {"max_t": 1.5}, "max_t"),
        (SampleTimestepConfig, {"shift": 0.5}, "shift"),
        (SampleTimestepConfig, {"p_std": 0.0}, "p_std"),
        (EMAConfig, {"decay": 1.5}, "decay"),
        (EMAConfig, {"type": "linear"}, "type"),
        (EMAConfig, {"start_iter": -1}, "start_iter"),
        (EMAConfig, {"gamma": -1.0}, "gamma"),
        (EMAConfig, {"halflife_kimg": 0.0}, "halflife_kimg"),
        (EMAConfig, {"rampup_ratio": 0.0}, "rampup_ratio"),
        (EMAConfig, {"batch_size": 0}, "batch_size"),
        (EMAConfig, {"mode": "sharded"}, "mode"),
        (EMAConfig, {"dtype": "float64"}, "dtype"),
    ],
)
def test_field_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_t": 0.5, "max_t": 0.5}, "min_t"),
        ({"t_list": [0.5]}, "t_list"),
        ({"t_list": [0.9, 0.5]}, "0.0"),
        ({"t_list": [0.5, 0.9, 0.0]}, "decreasing"),
        ({"t_list": [1.5, 0.0]}, "[0, 1]"),
    ],
)
def test_timestep_cross_field_rules(kwargs, message):
    with pytest.raises(ValidationError) as info:
        SampleTimestepConfig(**kwargs)
    assert message in str(info.value)


def test_multistep_student_needs_matching_t_list():
    with pytest.raises(ValidationError, match="t_list"):
        DMDConfig(student_sample_steps=2)
    with pytest.raises(ValidationError, match="expects 3"):
        DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": [0.9, 0.0]})
    cfg = DMDConfig(student_sample_steps=2, sample_t_cfg={"t_list": [0.9, 0.5, 0.0]})
    assert cfg.sample_t_cfg.t_list == [0.9, 0.5, 0.0]


def test_r1_needs_gan_branch():
    with pytest.raises(ValidationError, match="gan_loss_weight_gen"):
        DMDConfig(gan_r1_reg_weight=100.0)
    assert DMDConfig(gan_r1_reg_weight=100.0, gan_loss_weight_gen=0.03).gan_r1_reg_weight == 100


def test_assignment_is_validated():
    cfg = DMDConfig()
    with pytest.raises(ValidationError, match="gan_loss_weight_gen"):
        cfg.gan_loss_weight_gen = -1.0
