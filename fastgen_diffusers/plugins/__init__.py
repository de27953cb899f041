"""Model-family plugins (one module per family). Each imports diffusers, so each loads only
when first accessed: ``fastgen_diffusers.plugins.wan22`` imports the Wan plugin."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["available_plugins"]

_PLUGINS = ("wan", "wan22", "sd3", "flux", "qwen_image")


def available_plugins() -> tuple[str, ...]:
    return _PLUGINS


def __getattr__(name: str) -> ModuleType:
    if name in _PLUGINS:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
