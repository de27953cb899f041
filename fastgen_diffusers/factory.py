"""Construction helpers for the auxiliary DMD networks."""

from __future__ import annotations

import copy

from torch import nn

from .ema import _is_dtensor
from .features import detach_feature_capture

__all__ = ["create_fake_score"]


def _looks_fsdp_wrapped(module: nn.Module) -> bool:
    if any("_fsdp_wrapped_module" in name for name, _ in module.named_modules()):
        return True
    return any(_is_dtensor(p) for p in module.parameters())


def create_fake_score(teacher: nn.Module, *, deep_copy: bool = True) -> nn.Module:
    """Return a trainable fake-score network initialized from the teacher.

    Args:
        teacher: the already-built teacher, weights loaded.
        deep_copy: ``copy.deepcopy`` the teacher (default). ``False`` reuses the same instance,
            only sensible when it is no longer held elsewhere as the frozen teacher.

    Returns:
        The copy in training mode with every parameter requiring gradients. Feature-capture
        hooks of the teacher are not carried over to the copy.

    Raises:
        RuntimeError: when ``deep_copy=True`` and the teacher is FSDP-wrapped (FSDP1
            ``_fsdp_wrapped_module`` or FSDP2 DTensor parameters): deep-copying sharded
            parameters and FSDP hooks is not safe. Build the fake score before sharding (or on
            the meta device and load the teacher's weights), then shard it.

    Example::

        fake_score = create_fake_score(teacher)
        fake_score_opt = torch.optim.AdamW(fake_score.parameters(), lr=1e-5)
    """
    if deep_copy:
        if _looks_fsdp_wrapped(teacher):
            raise RuntimeError(
                "create_fake_score(deep_copy=True) got an FSDP-wrapped teacher "
                f"({type(teacher).__name__} has sharded parameters or FSDP wrappers); build the "
                "fake score before sharding, or from the config on the meta device and load the "
                "teacher's weights into it"
            )
        fake_score = copy.deepcopy(teacher)
        detach_feature_capture(fake_score)
    else:
        fake_score = teacher
    fake_score.train()
    fake_score.requires_grad_(True)
    return fake_score
