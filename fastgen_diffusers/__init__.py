"""fastgen_diffusers: DMD2 step distillation for Hugging Face diffusers.

The top level is the framework-agnostic loss library (no diffusers / accelerate / peft
import). Model-family glue lives in :mod:`fastgen_diffusers.plugins` and the training machinery
in :mod:`fastgen_diffusers.training`; both are imported on first use.

Example::

    import fastgen_diffusers as fgd

    cfg = fgd.load_dmd_config("general/distillation/dmd2_wan22_5b")
    pipe = fgd.DMDPipeline(student, teacher, fgd.create_fake_score(teacher), cfg)
"""

from __future__ import annotations

import importlib
from typing import Any

from . import flow_matching, losses, utils
from .config import DistillationConfig, DMDConfig, EMAConfig, SampleTimestepConfig
from .discriminators import ImageDiTDiscriminator, VideoDiTDiscriminator
from .ema import ExponentialMovingAverage
from .factory import create_fake_score, create_fake_score_meta
from .features import attach_feature_capture, get_feature_capture
from .loader import load_config, load_dmd_config
from .methods import DMDPipeline
from .pipeline import DistillationPipeline

__version__ = "0.1.0"

__all__ = [
    "DMDConfig",
    "DMDPipeline",
    "DistillationConfig",
    "DistillationPipeline",
    "EMAConfig",
    "ExponentialMovingAverage",
    "ImageDiTDiscriminator",
    "SampleTimestepConfig",
    "VideoDiTDiscriminator",
    "attach_feature_capture",
    "create_fake_score",
    "create_fake_score_meta",
    "flow_matching",
    "get_feature_capture",
    "load_config",
    "load_dmd_config",
    "losses",
    "plugins",
    "utils",
]


def __getattr__(name: str) -> Any:
    # Subpackages that import diffusers / accelerate load only when asked for.
    if name in ("plugins", "training", "sampling", "lora"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
