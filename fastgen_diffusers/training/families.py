"""The model families for the training loop, re-exported from their plugin modules.

Each family lives in its plugin (:mod:`fastgen_diffusers.plugins.sd3`, ...) on the
:class:`~fastgen_diffusers.plugins.base.Family` contract and is found through the registry
(:mod:`fastgen_diffusers.plugins.registry`); this module keeps the training package's names.

Example::

    from fastgen_diffusers.training.families import family_from_pretrained

    family = family_from_pretrained("black-forest-labs/FLUX.1-dev", guidance=3.5)
    teacher = family.wrap(family.load_pipeline("black-forest-labs/FLUX.1-dev").transformer)
"""

from __future__ import annotations

from ..plugins.base import Family
from ..plugins.flux import FluxFamily
from ..plugins.qwen_image import QwenImageFamily
from ..plugins.registry import family_from_pretrained, get_family, registered_families
from ..plugins.sd3 import SD3Family
from ..plugins.wan import WanFamily

__all__ = [
    "FAMILY_NAMES",
    "SUPPORTED_PIPELINES",
    "Family",
    "FluxFamily",
    "QwenImageFamily",
    "SD3Family",
    "WanFamily",
    "family_from_pretrained",
    "get_family",
]

# The registered family names, and model_index.json `_class_name` -> family name.
FAMILY_NAMES: tuple[str, ...] = tuple(registered_families())
SUPPORTED_PIPELINES: dict[str, str] = {
    cls.pipeline_class.__name__: name for name, cls in registered_families().items()
}
