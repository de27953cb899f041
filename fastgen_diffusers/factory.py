"""Construction helpers for the auxiliary DMD networks."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .features import detach_feature_capture
from .utils import is_dtensor

__all__ = ["create_fake_score", "create_fake_score_meta", "load_from_rank0"]


def _looks_fsdp_wrapped(module: nn.Module) -> bool:
    if any("_fsdp_wrapped_module" in name for name, _ in module.named_modules()):
        return True
    return any(is_dtensor(p) for p in module.parameters())


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
            the meta device and load the teacher's weights: :func:`create_fake_score_meta`), then
            shard it.

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


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_from_rank0(
    module: nn.Module,
    source: nn.Module | Mapping[str, torch.Tensor] | None,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Fill ``module`` with full weights that only rank 0 holds, without a full copy per rank.

    ``module`` may live on the meta device (it is materialised on ``device`` first) and may be
    FSDP2-sharded (``fully_shard``): each rank then receives only its shards. ``source`` is, on
    rank 0, the loaded (unsharded) model or its full state dict, and ``None`` on the other ranks.
    Buffers, including non-persistent ones that no state dict carries (rotary tables), come from
    rank 0 too: pass the model itself when ``module`` has such buffers. Collective: call on every
    rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = _rank()
    if rank == 0 and source is None:
        raise ValueError("load_from_rank0: rank 0 must pass the loaded model or its state dict")
    target = torch.device(device) if device is not None else torch.device("cpu")
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        module.to_empty(device=target)
    if rank == 0:
        assert source is not None  # checked above
        state_dict = dict(source.state_dict() if isinstance(source, nn.Module) else source)
        buffers = dict(source.named_buffers()) if isinstance(source, nn.Module) else state_dict
        missing = [name for name, _ in module.named_buffers() if name not in buffers]
        if missing:
            raise ValueError(
                f"Buffers {missing[:5]} are not in the state dict (non-persistent): pass the "
                "loaded model itself as source"
            )
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        module.load_state_dict(state_dict, strict=True)
        return module
    if rank == 0:  # a mapping source may carry non-persistent buffers too: not state-dict keys
        keys = module.state_dict().keys()
        state_dict = {k: v for k, v in state_dict.items() if k in keys}
    set_model_state_dict(
        module,
        state_dict if rank == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    return module


def create_fake_score_meta(
    build: Callable[[], nn.Module],
    teacher: nn.Module | Mapping[str, torch.Tensor] | None,
    *,
    shard: Callable[[nn.Module], object] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build the fake score on the meta device, shard it, and load the teacher's weights from
    rank 0: the FSDP2 path where :func:`create_fake_score` (a deep copy) is unsafe.

    Args:
        build: builds the network from its config (no weights), e.g.
            ``lambda: SD3Wrapper(SD3Transformer2DModel.from_config(config))``.
        teacher: on rank 0 the loaded, unsharded teacher (or its full state dict when the model
            has no non-persistent buffers); ``None`` on the other ranks.
        shard: applied to the meta module before loading, e.g. ``fully_shard``.
        device: where the weights are materialised.

    Returns:
        The fake score in training mode with every parameter requiring gradients.

    Example::

        fake = create_fake_score_meta(build, teacher if rank == 0 else None,
                                      shard=fully_shard, device="cuda")
    """
    with torch.device("meta"):
        fake = build()
    if shard is not None:
        shard(fake)
    load_from_rank0(fake, teacher, device=device)
    fake.train()
    fake.requires_grad_(True)
    return fake
