"""The one place that touches private attributes of accelerate, peft, datasets and torch.

Each function names the library version its attribute was checked against and raises an
:class:`AttributeError` naming that version when the attribute is gone, rather than silently
creating or ignoring it. The libraries are imported inside the functions (or not at all): this
module is part of the pure library and imports none of them at import time.

Example::

    from fastgen_diffusers.compat import dataset_fingerprint, set_peft_layer_adapter

    key = dataset_fingerprint(dataset)  # follows the dataset's files and selections
    for layer in tuner_layers:
        set_peft_layer_adapter(layer, "student")  # requires_grad left as it is
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "accelerator_models_and_optimizers",
    "dataset_fingerprint",
    "enable_peft_layer_adapters",
    "remove_forward_hook",
    "remove_forward_pre_hook",
    "set_peft_layer_adapter",
]

ACCELERATE_CHECKED = "accelerate 1.16.0"
PEFT_CHECKED = "peft 0.21.2"
DATASETS_CHECKED = "datasets 5.2.0"
TORCH_CHECKED = "torch 2.13"


def _installed(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _require(obj: Any, name: str, checked: str) -> Any:
    """``getattr(obj, name)``, or an error naming the version the attribute was checked against."""
    try:
        return getattr(obj, name)
    except AttributeError:
        package = checked.split()[0]
        raise AttributeError(
            f"{type(obj).__module__}.{type(obj).__qualname__} has no private attribute {name!r}, "
            f"which fastgen_diffusers.compat relies on (checked against {checked}; installed "
            f"{package} {_installed(package)}): update fastgen_diffusers/compat.py"
        ) from None


# -- accelerate -----------------------------------------------------------------------------------


def accelerator_models_and_optimizers(accelerator: Any) -> tuple[list[Any], list[Any]]:
    """The live lists of models and optimizers an ``Accelerator`` has prepared (saved and loaded
    pairwise by ``save_state`` / ``load_state``); the caller may append to them.

    Checked against accelerate 1.16.0: ``Accelerator._models`` and ``Accelerator._optimizers``.
    """
    models = _require(accelerator, "_models", ACCELERATE_CHECKED)
    optimizers = _require(accelerator, "_optimizers", ACCELERATE_CHECKED)
    return models, optimizers


# -- datasets -------------------------------------------------------------------------------------


def dataset_fingerprint(dataset: Any) -> str:
    """The fingerprint ``datasets`` keeps for a ``Dataset`` (it follows the source files and every
    transform / selection applied), a stable key for what the rows hold.

    Checked against datasets 5.2.0: ``Dataset._fingerprint``.
    """
    fingerprint = _require(dataset, "_fingerprint", DATASETS_CHECKED)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise AttributeError(
            f"{type(dataset).__name__}._fingerprint is {fingerprint!r}, expected a non-empty str "
            f"(checked against {DATASETS_CHECKED}; installed datasets {_installed('datasets')})"
        )
    return fingerprint


# -- peft -----------------------------------------------------------------------------------------


def set_peft_layer_adapter(layer: Any, adapter: str | None) -> None:
    """Run the peft tuner ``layer`` with ``adapter`` only (``None``: adapters off, the active
    adapter kept for later). Unlike peft's ``set_adapter`` / ``enable_adapters`` it leaves
    ``requires_grad`` untouched: autograd drops the gradient of a parameter switched off between
    its forward and backward.

    Checked against peft 0.21.2: ``BaseTunerLayer._disable_adapters`` and
    ``BaseTunerLayer._active_adapter``.
    """
    _require(layer, "_disable_adapters", PEFT_CHECKED)
    _require(layer, "_active_adapter", PEFT_CHECKED)
    layer._disable_adapters = adapter is None
    if adapter is not None:
        layer._active_adapter = [adapter]


def enable_peft_layer_adapters(layer: Any) -> None:
    """Turn the peft tuner ``layer``'s adapters back on, the active adapter unchanged and
    ``requires_grad`` untouched.

    Checked against peft 0.21.2: ``BaseTunerLayer._disable_adapters``.
    """
    _require(layer, "_disable_adapters", PEFT_CHECKED)
    layer._disable_adapters = False


# -- torch ----------------------------------------------------------------------------------------

# Hook dicts keyed by hook id, as RemovableHandle.remove() clears them. Removing by id from the
# module itself (rather than through the handle) also works on a deep copy of the module, whose
# hook dicts are copies the original handle does not reach.
_FORWARD_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_FORWARD_PRE_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def _pop_hook(module: nn.Module, hook_id: int, dicts: tuple[str, ...]) -> None:
    for name in dicts:
        _require(module, name, TORCH_CHECKED).pop(hook_id, None)


def remove_forward_hook(module: nn.Module, hook_id: int) -> None:
    """Remove the forward hook with id ``hook_id`` (``handle.id``) from ``module``; a no-op when
    it is not there.

    Checked against torch 2.13: ``Module._forward_hooks``, ``_forward_hooks_with_kwargs``,
    ``_forward_hooks_always_called``.
    """
    _pop_hook(module, hook_id, _FORWARD_HOOK_DICTS)


def remove_forward_pre_hook(module: nn.Module, hook_id: int) -> None:
    """Remove the forward pre-hook with id ``hook_id`` (``handle.id``) from ``module``; a no-op
    when it is not there.

    Checked against torch 2.13: ``Module._forward_pre_hooks``, ``_forward_pre_hooks_with_kwargs``.
    """
    _pop_hook(module, hook_id, _FORWARD_PRE_HOOK_DICTS)
