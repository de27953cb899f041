"""Feature capture: how the GAN branch reads intermediate teacher features.

The protocol :class:`~fastgen_diffusers.methods.dmd.DMDPipeline` relies on:

1. ``attach_feature_capture(teacher, feature_indices, ...)`` registers forward hooks on the
   chosen blocks and stores a :class:`FeatureCapture` on the module (attribute
   ``_fastgen_feature_capture``).
2. The pipeline finds it with :func:`get_feature_capture` (through DDP / ``torch.compile`` /
   activation-checkpoint wrappers) and runs the teacher inside ``capture.record()``; hooks
   fire only while recording, so re-computation during a checkpointed backward and the
   unconditional CFG pass record nothing.
3. On leaving ``record()`` the list it yielded holds one tensor per captured block, in
   ascending block order, each already turned into a spatial map by ``transform``.

Model-family plugins supply ``transform`` (tokens to ``[B, C, H', W']`` maps, image stream
only) and fill ``capture.meta`` (e.g. the token grid) from their wrapper before each forward.

Example::

    capture = attach_feature_capture(model, [2, 5], blocks="transformer_blocks")
    with capture.record() as feats:
        model(x)
    # feats == [output of block 2, output of block 5]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .compat import remove_forward_hook, remove_forward_pre_hook

__all__ = [
    "FEATURE_CAPTURE_ATTR",
    "FeatureCapture",
    "attach_feature_capture",
    "detach_feature_capture",
    "get_feature_capture",
    "unwrap_module",
]

FEATURE_CAPTURE_ATTR = "_fastgen_feature_capture"
# Attributes through which wrappers (DDP, torch.compile, checkpoint wrappers, role views)
# expose the module they wrap.
_WRAPPER_ATTRS = (
    "module",
    "_orig_mod",
    "_checkpoint_wrapped_module",
    "_fsdp_wrapped_module",
    "transformer",
)
_DEFAULT_BLOCK_ATTRS = ("blocks", "transformer_blocks", "layers")

Transform = Callable[[Any, "FeatureCapture"], torch.Tensor]


def _first_tensor(output: Any, capture: FeatureCapture) -> torch.Tensor:
    """Default transform: the block output itself, or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"Cannot read a feature from a block output of type {type(output).__name__}; "
        "pass a transform to attach_feature_capture"
    )


def unwrap_module(module: nn.Module) -> Iterator[nn.Module]:
    """Yield ``module`` and then each module it wraps (DDP, compile, checkpoint, role views)."""
    seen: set[int] = set()
    current: Any = module
    while isinstance(current, nn.Module) and id(current) not in seen:
        seen.add(id(current))
        yield current
        for attr in _WRAPPER_ATTRS:
            inner = getattr(current, attr, None)
            if isinstance(inner, nn.Module):
                current = inner
                break
        else:
            return


class FeatureCapture:
    """Forward hooks on selected blocks that record their (transformed) outputs on demand."""

    def __init__(
        self,
        blocks: Sequence[nn.Module] | nn.ModuleList | nn.Sequential,
        feature_indices: Sequence[int],
        transform: Transform | None = None,
    ) -> None:
        indices = sorted({int(i) for i in feature_indices})
        if not indices:
            raise ValueError("feature_indices must name at least one block")
        bad = [i for i in indices if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(
                f"feature_indices {bad} out of range: the module has {len(blocks)} blocks "
                f"(valid 0..{len(blocks) - 1})"
            )
        self.feature_indices: tuple[int, ...] = tuple(indices)
        self.transform: Transform = transform or _first_tensor
        self.meta: dict[str, Any] = {}
        self._recording = False
        self._store: dict[int, torch.Tensor] = {}
        self._hooks: list[tuple[nn.Module, int]] = []
        self._pre_hooks: list[tuple[nn.Module, int]] = []
        for index in indices:
            handle = blocks[index].register_forward_hook(self._make_hook(index))
            self._hooks.append((blocks[index], handle.id))

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._recording:
                return
            if index in self._store:
                raise RuntimeError(
                    f"Block {index} ran twice inside one FeatureCapture.record(); record one "
                    "forward at a time"
                )
            self._store[index] = self.transform(output, self)

        return hook

    def add_input_hook(
        self, module: nn.Module, fn: Callable[[tuple, dict, FeatureCapture], None]
    ) -> None:
        """Call ``fn(args, kwargs, capture)`` before every forward of ``module``.

        Plugins use it on the transformer to note the token grid of the current input in
        ``capture.meta`` (so ``transform`` can fold tokens back into maps). Removed with the
        capture.
        """

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            fn(args, kwargs, self)

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._pre_hooks.append((module, handle.id))

    @property
    def num_features(self) -> int:
        return len(self.feature_indices)

    @contextmanager
    def record(self, *, optional: bool = False) -> Iterator[list[torch.Tensor]]:
        """Record the hooked blocks during the enclosed forward; the yielded list is filled on
        exit. ``optional``: a forward that did not run the hooked module leaves it empty (one of
        two experts) instead of raising."""
        if self._recording:
            raise RuntimeError("FeatureCapture.record() is not re-entrant")
        features: list[torch.Tensor] = []
        self._store = {}
        self._recording = True
        try:
            yield features
        finally:
            self._recording = False
            store, self._store = self._store, {}
        missing = [i for i in self.feature_indices if i not in store]
        if optional and len(missing) == len(self.feature_indices):
            return
        if missing:
            raise RuntimeError(
                f"Feature capture recorded no output for blocks {missing}; the forward inside "
                "record() must run the hooked module"
            )
        features.extend(store[i] for i in self.feature_indices)

    def remove(self) -> None:
        """Remove the hooks from the blocks this capture holds (a deep copy holds the copy's)."""
        for block, hook_id in self._hooks:
            remove_forward_hook(block, hook_id)
        for module, hook_id in self._pre_hooks:
            remove_forward_pre_hook(module, hook_id)
        self._hooks = []
        self._pre_hooks = []


def _resolve_blocks(
    module: nn.Module, blocks: str | Sequence[nn.Module] | None
) -> Sequence[nn.Module] | nn.ModuleList | nn.Sequential:
    if blocks is not None and not isinstance(blocks, str):
        return blocks
    names = (blocks,) if isinstance(blocks, str) else _DEFAULT_BLOCK_ATTRS
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, (nn.ModuleList, nn.Sequential)):
            return found
    raise ValueError(
        f"{type(module).__name__} has no block list named {' / '.join(names)}; pass blocks="
    )


def attach_feature_capture(
    module: nn.Module,
    feature_indices: Sequence[int],
    *,
    blocks: str | Sequence[nn.Module] | None = None,
    transform: Transform | None = None,
) -> FeatureCapture:
    """Hook ``module``'s blocks ``feature_indices`` and store the capture on ``module``.

    Args:
        module: the teacher (or the transformer inside it).
        feature_indices: indices into the block list.
        blocks: the block list, or the name of the attribute holding it; by default the first
            of ``blocks`` / ``transformer_blocks`` / ``layers`` that exists.
        transform: ``transform(block_output, capture) -> Tensor``; default takes the output
            (or its first item).

    A capture already on ``module`` is replaced.
    """
    target = next((m for m in unwrap_module(module) if _has_blocks(m, blocks)), module)
    existing = getattr(target, FEATURE_CAPTURE_ATTR, None)
    if existing is not None:
        existing.remove()
    capture = FeatureCapture(_resolve_blocks(target, blocks), feature_indices, transform)
    setattr(target, FEATURE_CAPTURE_ATTR, capture)
    return capture


def _has_blocks(module: nn.Module, blocks: str | Sequence[nn.Module] | None) -> bool:
    try:
        _resolve_blocks(module, blocks)
    except ValueError:
        return False
    return True


def get_feature_capture(module: nn.Module) -> FeatureCapture | None:
    """Return the capture attached to ``module`` or to a module it wraps, else ``None``."""
    for candidate in unwrap_module(module):
        capture = getattr(candidate, FEATURE_CAPTURE_ATTR, None)
        if isinstance(capture, FeatureCapture):
            return capture
    return None


def detach_feature_capture(module: nn.Module) -> None:
    """Remove the capture (and its hooks) stored on ``module`` or a module it wraps.

    Works on a deep copy too: the copy carries the same hook ids, which are removed from the
    copy's own blocks, leaving the original's hooks in place.
    """
    for candidate in unwrap_module(module):
        capture = getattr(candidate, FEATURE_CAPTURE_ATTR, None)
        if capture is None:
            continue
        delattr(candidate, FEATURE_CAPTURE_ATTR)
        capture.remove()
        return
