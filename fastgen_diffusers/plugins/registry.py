"""The registry of model families: each family module registers its :class:`Family` subclass
with :func:`register_family`; lookups by name, pipeline class, transformer class or checkpoint
import the built-in family modules on first use.

Example::

    from fastgen_diffusers.plugins import family_from_pretrained, get_family, register_family

    family = family_from_pretrained("black-forest-labs/FLUX.1-dev", guidance=3.5)
    sd3 = get_family("sd3")

    @register_family
    class MyFamily(Family):
        name = "my_family"
        ...
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Any, TypeVar

from torch import nn

from ..features import unwrap_module
from .base import Family

__all__ = [
    "BUILTIN_FAMILY_MODULES",
    "family_for_pipeline_class",
    "family_for_transformer",
    "family_from_pretrained",
    "get_family",
    "register_family",
    "registered_families",
]

# The built-in family modules, imported on first lookup (each imports diffusers). A new built-in
# family adds its module name here.
BUILTIN_FAMILY_MODULES = ("sd3", "flux", "wan", "wan_i2v", "qwen_image")

_REGISTRY: dict[str, type[Family]] = {}
_loaded = False

F = TypeVar("F", bound=type[Family])


def register_family(cls: F) -> F:
    """Class decorator: make the :class:`Family` subclass ``cls`` known under ``cls.name`` (and
    ``cls.aliases``). Registering a second class under a taken name raises ``ValueError``."""
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"register_family takes a Family subclass, got {cls!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TypeError(f"{cls.__name__} does not implement the Family contract: {missing}")
    names = (cls.name, *cls.aliases)
    for name in names:
        taken = _REGISTRY.get(name)
        # The same class again (a module re-import) replaces itself.
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(f"model family {name!r} is already registered by {taken.__name__}")
    _REGISTRY.update(dict.fromkeys(names, cls))
    return cls


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_FAMILY_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _loaded = True


def registered_families() -> dict[str, type[Family]]:
    """Family name -> class, one entry per family (aliases left out), built-ins first."""
    _load_builtin()
    return {name: cls for name, cls in _REGISTRY.items() if name == cls.name}


def get_family(name: str, **options: Any) -> Family:
    """The family called ``name`` (or one of its aliases), built with ``options`` (e.g.
    ``get_family("flux", guidance=4.0)``); ``None``-valued options are dropped."""
    if not isinstance(name, str):
        raise TypeError(f"family name must be a str, got {type(name).__name__}")
    _load_builtin()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"family={name!r} is not a registered model family; expected one of "
            f"{', '.join(registered_families())}"
        )
    return _build(cls, options, f"the {cls.name} family")


def _build(cls: type[Family], options: dict[str, Any], what: str) -> Family:
    options = {key: value for key, value in options.items() if value is not None}
    accepted = inspect.signature(cls).parameters
    for key in options:
        if key not in accepted:
            takers = [
                other.name
                for other in registered_families().values()
                if key in inspect.signature(other).parameters
            ]
            where = f"the {', '.join(takers)} famil{'ies' if len(takers) > 1 else 'y'} only"
            raise ValueError(
                f"{key} applies to {where if takers else 'no model family'}; {what} takes "
                f"{', '.join(accepted) or 'no options'}"
            )
    return cls(**options)


def family_for_pipeline_class(name: str) -> type[Family] | None:
    """The family whose ``pipeline_class.__name__`` is ``name``, else ``None``."""
    return next(
        (cls for cls in registered_families().values() if cls.pipeline_class.__name__ == name),
        None,
    )


def family_for_transformer(model: nn.Module | type) -> type[Family] | None:
    """The family of a diffusers transformer (a module, seen through wrappers, DDP and compile,
    or a class), matched by ``isinstance`` so FSDP2's ``FSDP<Class>`` subclass counts; else
    ``None``. Families sharing a transformer class (Wan text- and image-to-video) answer with
    the first registered, whose transformer-level members they share."""
    families = registered_families().values()
    if isinstance(model, type):
        return next((cls for cls in families if issubclass(model, cls.transformer_class)), None)
    for module in unwrap_module(model):
        found = family_for_transformer(type(module))
        if found is not None:
            return found
    return None


def _supported() -> str:
    return ", ".join(
        f"{cls.pipeline_class.__name__} ({name})" for name, cls in registered_families().items()
    )


def _read_json(path: str, filename: str, revision: str | None) -> dict[str, Any] | None:
    """``filename`` of a local folder or Hub repo as a dict; ``None`` when there is none."""
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            return None
    elif os.path.exists(path) or path.startswith(("/", ".", "~")):
        raise ValueError(f"{path!r} is not a folder (expected a diffusers pipeline folder)")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            file = hf_hub_download(path, filename, revision=revision)
        except RemoteEntryNotFoundError:
            return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def family_from_pretrained(
    path: str | os.PathLike, *, revision: str | None = None, **options: Any
) -> Family:
    """The family of the diffusers pipeline at ``path`` (local folder or Hub id), built with
    ``options`` (e.g. ``guidance=3.5`` for Flux).

    Reads ``_class_name`` of ``model_index.json`` (matched against each family's
    ``pipeline_class``); a folder without one is recognised by ``transformer/config.json``'s
    class. Options the checkpoint decides (Wan's ``expand_timesteps``) come from
    ``model_index.json``. ``None``-valued options are dropped; any other option the family does
    not take raises ``ValueError`` naming it. Raises ``ValueError`` naming what was found and
    the supported pipelines for anything else.
    """
    path = os.fspath(path)
    index = _read_json(path, "model_index.json", revision)
    if index is not None:
        pipeline = index.get("_class_name")
        cls = family_for_pipeline_class(pipeline) if isinstance(pipeline, str) else None
        if cls is None:
            transformer = (index.get("transformer") or [None, None])[1]
            raise ValueError(
                f"{path} holds a {pipeline} (transformer: {transformer}); supported pipelines: "
                f"{_supported()}"
            )
        given = {key: value for key, value in options.items() if value is not None}
        options = {**cls.options_from_model_index(index, path), **given}
        return _build(cls, options, f"{path} ({pipeline})")
    config = _read_json(path, os.path.join("transformer", "config.json"), revision)
    transformer = None if config is None else config.get("_class_name")
    cls = next(
        (
            family
            for family in registered_families().values()
            if family.transformer_class.__name__ == transformer
        ),
        None,
    )
    if cls is not None:
        return _build(cls, options, f"{path} ({transformer})")
    found = (
        f"a transformer of class {transformer}"
        if config is not None
        else "neither model_index.json nor transformer/config.json"
    )
    raise ValueError(
        f"{path} is not a supported diffusers pipeline ({found}); supported pipelines: "
        f"{_supported()}"
    )
