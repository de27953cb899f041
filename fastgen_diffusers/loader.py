"""YAML recipe loading.

A recipe is named either by its path inside the built-in recipe package
(``"general/distillation/dmd2_wan22_5b"``) or by a filesystem path. Built-in recipes are
searched first, then the filesystem; the ``.yaml`` / ``.yml`` suffix may be omitted.

Example::

    from fastgen_diffusers import load_dmd_config

    cfg = load_dmd_config("general/distillation/dmd2_wan22_5b")
    cfg = load_dmd_config("./my_recipe.yaml", overrides={"guidance_scale": 4.5})
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import DMDConfig

__all__ = [
    "builtin_recipes",
    "load_config",
    "load_dmd_config",
    "merge_overrides",
    "resolve_config_path",
]

_SUFFIXES = ("", ".yaml", ".yml")


def _builtin_root() -> Path | None:
    """Directory holding the built-in recipes, installed or in a source checkout."""
    try:
        root = resources.files("fastgen_diffusers.recipes")
        path = Path(str(root))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    # Source checkout without an install: recipes/ sits beside the package.
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    return checkout if checkout.is_dir() else None


def builtin_recipes() -> list[str]:
    """Names of the built-in recipes, e.g. ``"general/distillation/dmd2_wan22_5b"``."""
    root = _builtin_root()
    if root is None:
        return []
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.y*ml")]
    return sorted(names)


def resolve_config_path(config_file: str | Path) -> Path:
    """Return the file a recipe name refers to (built-in recipes first, then the filesystem).

    Raises:
        FileNotFoundError: naming every place that was looked at.
    """
    name = str(config_file)
    candidates: list[Path] = []
    root = _builtin_root()
    if root is not None and not Path(name).is_absolute():
        candidates += [root / (name + suffix) for suffix in _SUFFIXES]
    candidates += [Path(name + suffix).expanduser() for suffix in _SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    available = ", ".join(builtin_recipes()) or "none"
    raise FileNotFoundError(
        f"Recipe {name!r} not found. Looked at:\n  {looked}\nBuilt-in recipes: {available}"
    )


def load_config(config_file: str | Path) -> dict[str, Any]:
    """Load a YAML file (or built-in recipe) and return the parsed mapping.

    An empty file yields ``{}``. A file whose top level is not a mapping raises ``ValueError``.
    """
    path = resolve_config_path(config_file)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"Recipe {str(path)!r} must hold a mapping of config fields at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: nested mappings merge key by key, any other value
    replaces the base's (``{"ema": {"decay": 0.9}}`` keeps the recipe's other EMA fields)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def load_dmd_config(
    config_file: str | Path, overrides: Mapping[str, Any] | None = None
) -> DMDConfig:
    """Load a YAML file (or built-in recipe) and construct a :class:`DMDConfig`.

    ``overrides`` (nested mapping, e.g. ``{"guidance_scale": 4.5, "ema": {"decay": 0.999}}``)
    is merged into the file's mapping before validation. The mapping is validated against the
    pydantic schema: unknown keys and out-of-range values raise ``pydantic.ValidationError``
    naming the field.
    """
    return DMDConfig.model_validate(merge_overrides(load_config(config_file), overrides or {}))
