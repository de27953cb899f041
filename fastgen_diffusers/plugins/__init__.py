"""Model-family plugins (one module per family) and the family registry.

Each family module imports diffusers, so each loads only when first accessed:
``fastgen_diffusers.plugins.wan22`` imports the Wan plugin. The registry's functions
(:func:`get_family`, :func:`family_from_pretrained`, ...) load the built-in families on first
use.

Example::

    from fastgen_diffusers.plugins import family_from_pretrained, registered_families

    family = family_from_pretrained(path)          # e.g. SD3Family()
    sorted(registered_families())                  # ['flux', 'qwen_image', 'sd3', 'wan']
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Family",
    "available_plugins",
    "family_for_pipeline_class",
    "family_for_transformer",
    "family_from_pretrained",
    "get_family",
    "register_family",
    "registered_families",
]

# Module aliases kept for old imports (``plugins.wan22`` is the Wan plugin).
_ALIASES = ("wan22",)
# Names served lazily from the submodule that defines them.
_LAZY = {
    "Family": "base",
    "family_for_pipeline_class": "registry",
    "family_for_transformer": "registry",
    "family_from_pretrained": "registry",
    "get_family": "registry",
    "register_family": "registry",
    "registered_families": "registry",
}


def available_plugins() -> tuple[str, ...]:
    """Module names of the built-in plugins (``wan22`` is an alias of ``wan``)."""
    from .registry import BUILTIN_FAMILY_MODULES

    return BUILTIN_FAMILY_MODULES + _ALIASES


def __getattr__(name: str) -> Any:
    if name in available_plugins():
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
