"""Every registered family implements the whole ``Family`` contract, checked on the tiny
pipelines of ``tests/tiny_pipelines.py`` saved to disk: attributes of the right types, no
abstract method left, detection round trip, and a wrapper answering in the latent layout."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from diffusers import DiffusionPipeline, ModelMixin
from tiny_pipelines import (
    CALL_KWARGS,
    TEXT_LENGTHS,
    save_tiny_flux,
    save_tiny_qwen_image,
    save_tiny_sd3,
    save_tiny_wan,
)
from torch import nn

from fastgen_diffusers.lora import default_target_modules
from fastgen_diffusers.plugins import (
    Family,
    available_plugins,
    family_for_pipeline_class,
    family_for_transformer,
    family_from_pretrained,
    get_family,
    register_family,
    registered_families,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SAVERS = {
    "sd3": save_tiny_sd3,
    "flux": save_tiny_flux,
    "wan": save_tiny_wan,
    "wan_i2v": functools.partial(save_tiny_wan, boundary_ratio=0.9, image_to_video=True),
    "qwen_image": save_tiny_qwen_image,
}
VIDEO_TAGS = ("text-to-video", "image-to-video")
TAGS = ("text-to-image", *VIDEO_TAGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: str(save(root / name)) for name, save in SAVERS.items()}


def test_the_builtin_families_are_registered():
    assert set(registered_families()) == set(SAVERS)
    assert "wan22" in available_plugins()
    assert type(get_family("wan22")) is registered_families()["wan"]
    with pytest.raises(ValueError, match="family='sdxl'"):
        get_family("sdxl")
    with pytest.raises(TypeError, match="family name"):
        get_family(3)


@pytest.mark.parametrize("name", sorted(SAVERS))
def test_family_attributes(name):
    cls = registered_families()[name]
    assert issubclass(cls, Family) and not inspect.isabstract(cls)
    for method in Family.__abstractmethods__:
        assert getattr(cls, method) is not getattr(Family, method, None), method
    assert cls.name == name and isinstance(cls.name, str)
    assert isinstance(cls.aliases, tuple) and all(isinstance(a, str) for a in cls.aliases)
    assert issubclass(cls.pipeline_class, DiffusionPipeline)
    assert issubclass(cls.transformer_class, ModelMixin)
    assert isinstance(cls.is_video, bool)
    assert isinstance(cls.default_max_sequence_length, int) and cls.default_max_sequence_length > 0
    if cls.is_video:
        assert isinstance(cls.default_num_frames, int) and cls.default_num_frames > 0
        assert isinstance(cls.video_fps, int)
    else:
        assert cls.default_num_frames is None
    assert isinstance(cls.text_components, tuple) and cls.text_components
    assert all(isinstance(c, str) for c in cls.text_components)
    targets = cls.lora_target_modules
    assert isinstance(targets, tuple) and targets and all(isinstance(t, str) for t in targets)
    assert len(set(targets)) == len(targets)
    loader = cls.lora_loader_class
    assert isinstance(loader, type) and loader.__module__.startswith("diffusers.loaders")
    assert callable(getattr(loader, "load_lora_weights", None))
    assert callable(getattr(loader, "save_lora_weights", None))
    assert cls.pipeline_tag in TAGS and (cls.pipeline_tag in VIDEO_TAGS) == cls.is_video
    assert isinstance(cls.condition_image, bool)
    assert cls.condition_image == (cls.pipeline_tag == "image-to-video")
    assert cls.license_hint is None or all(
        isinstance(key, str) and "license" in fields for key, fields in cls.license_hint.items()
    )
    assert family_for_pipeline_class(cls.pipeline_class.__name__) is cls
    # Families sharing a transformer class (Wan T2V / I2V) resolve to the first registered.
    sharing = [
        f for f in registered_families().values() if f.transformer_class is cls.transformer_class
    ]
    assert family_for_transformer(cls.transformer_class) is sharing[0]
    family = cls()
    assert isinstance(family.card_notes(base_model="a/b", lora=False), str)
    assert isinstance(family.card_license("a/b"), dict)


@pytest.mark.parametrize("name", sorted(SAVERS))
def test_detection_wrap_and_latent_layout(saved, name):
    family = family_from_pretrained(saved[name])
    assert type(family) is registered_families()[name]
    pipe = family.load_pipeline(saved[name])
    assert type(pipe) is family.pipeline_class
    assert isinstance(pipe.transformer, family.transformer_class)
    assert family_for_transformer(pipe.transformer).transformer_class is family.transformer_class
    height, width = family.default_size(pipe)
    assert height > 0 and width > 0

    size = CALL_KWARGS[name]
    shape = family.latent_shape(pipe, size["height"], size["width"], size.get("num_frames"))
    assert len(shape) == (4 if family.is_video or name == "qwen_image" else 3)
    assert family.image_seq_len(shape) > 0
    sigmas = family.teacher_sigmas(pipe.scheduler, 4, shape)
    assert len(sigmas) == 5 and sigmas[-1] == 0.0 and sigmas == sorted(sigmas, reverse=True)

    teacher = family.wrap(pipe.transformer)
    assert isinstance(teacher, nn.Module)
    wrapped = family.wrap(teacher.transformer)
    assert default_target_modules(wrapped) == list(family.lora_target_modules)
    cond = family.encode_prompts(pipe, ["a cat"], max_sequence_length=TEXT_LENGTHS[name])
    if family.condition_image:  # image-to-video: the image's condition, one row per sample
        pixels = torch.rand(1, 3, size["height"], size["width"]) * 2 - 1
        cond.update(
            family.encode_condition(pipe, pixels, size["height"], size["width"], size["num_frames"])
        )
    else:
        with pytest.raises(ValueError, match="takes no condition image"):
            family.encode_condition(pipe, [], 16, 16)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = teacher(hidden_states=x, timestep=torch.tensor([0.5]), **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()

    t_list = [0.999, 0.5, 0.0]
    config = family.student_scheduler_config(t_list, "ode", dict(pipe.scheduler.config))
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert family.stock_pipeline_kwargs(t_list)["num_inference_steps"] == 2


def test_options_are_checked_per_family(saved):
    with pytest.raises(ValueError, match="guidance"):
        family_from_pretrained(saved["sd3"], guidance=3.0)
    with pytest.raises(ValueError, match="guidance"):
        get_family("wan", guidance=3.0)
    # None-valued options are dropped: the loop passes --flux_guidance to every family.
    assert type(family_from_pretrained(saved["sd3"], guidance=None)).__name__ == "SD3Family"
    flux = family_from_pretrained(saved["flux"], guidance=4.5)
    assert flux.guidance == 4.5
    with pytest.raises(TypeError, match="guidance"):
        get_family("flux", guidance="high")


def test_register_family_refuses_incomplete_or_clashing_classes():
    class Half(Family):
        name = "half"

    with pytest.raises(TypeError, match="does not implement the Family contract"):
        register_family(Half)
    with pytest.raises(TypeError, match="Family subclass"):
        register_family(int)

    sd3 = registered_families()["sd3"]
    clash = type("OtherSD3Family", (sd3,), {})
    with pytest.raises(ValueError, match="already registered"):
        register_family(clash)
    assert registered_families()["sd3"] is sd3
