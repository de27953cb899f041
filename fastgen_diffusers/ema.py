"""Exponential moving average of the student, aware of FSDP2 (DTensor) parameters.

Example::

    ema = ExponentialMovingAverage(student, EMAConfig(decay=0.999))
    for step in range(1, max_steps + 1):
        ...  # loss.backward(); optimizer.step()
        ema.update(student, iteration=step)
    ema.copy_to(student_for_eval)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from .config import EMAConfig
from .utils import DTensor, is_dtensor

__all__ = ["ExponentialMovingAverage", "ema_weights"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Wrapper prefixes that must not change a parameter's identity in the shadow.
_STRIP = ("_checkpoint_wrapped_module.", "_orig_mod.")

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover
    distribute_tensor = None  # type: ignore[assignment]


def _clean(name: str) -> str:
    for prefix in _STRIP:
        name = name.replace(prefix, "")
    return name


class ExponentialMovingAverage:
    """FSDP2-aware EMA tracker for a PyTorch module.

    Parameter shadows are kept in ``config.dtype`` (fp32 by default) and updated with
    ``shadow = beta * shadow + (1 - beta) * live``; buffer shadows keep the live dtype and are
    copied. With DTensor parameters (FSDP2), ``mode='full_tensor'`` gathers each parameter
    (every rank must call :meth:`update`; every rank holds the full EMA, equal to the
    single-process one) and ``mode='local_shard'`` averages each rank's local shard only (save
    and restore the state per rank).

    Args:
        model: the module to track.
        config: schedule and storage options.
        trainable_only: track only parameters with ``requires_grad`` (LoRA students: the frozen
            base needs no shadow). Buffers are always tracked.
    """

    def __init__(
        self, model: nn.Module, config: EMAConfig, *, trainable_only: bool = False
    ) -> None:
        if not isinstance(config, EMAConfig):
            raise TypeError(f"config must be an EMAConfig, got {type(config).__name__}")
        self.config = config
        self.trainable_only = trainable_only
        self._initialized = False
        self._params: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in self.tracked_parameters(model):
                if is_dtensor(param) and not config.fsdp2:
                    raise ValueError(
                        f"Parameter {name!r} is a DTensor (FSDP2-sharded) but EMAConfig.fsdp2 is "
                        "False; set fsdp2=True to track sharded parameters"
                    )
                live = self._live(param)
                dtype = _DTYPES[config.dtype] if config.dtype is not None else live.dtype
                self._params[name] = live.detach().to(dtype=dtype, copy=True)
            for name, buf in model.named_buffers():
                self._buffers[_clean(name)] = buf.detach().clone()
        if not self._params:
            raise ValueError(
                f"{type(model).__name__} has no parameters to track"
                + (" with requires_grad=True" if trainable_only else "")
            )
        self._sharded = config.mode == "local_shard" and any(
            is_dtensor(p) for _, p in self.tracked_parameters(model)
        )

    @property
    def is_sharded(self) -> bool:
        """True when the state is this rank's shards only (``local_shard`` over FSDP2
        parameters): save and restore it on every rank."""
        return self._sharded

    @property
    def initialized(self) -> bool:
        """Whether the shadows hold an average (an update at or after ``start_iter`` ran, or a
        state was loaded)."""
        return self._initialized

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The shadow state in a form that does not depend on the number of ranks: a
        ``local_shard`` shadow is returned as a DTensor over this rank's shard, with the
        tracked parameter's mesh, placements and global shape (saving it with
        ``torch.distributed.checkpoint`` writes one global tensor); every other shadow as it is.
        The tensors alias the shadows, so loading into them in place restores the EMA (then
        call :meth:`load_state_dict` with :meth:`local_tensors` of them to check and mark it).
        """
        out: dict[str, torch.Tensor] = dict(self._buffers)
        for name, param in self.tracked_parameters(model):
            shadow = self._params[name]
            if is_dtensor(param) and shadow.shape != param.shape:
                dt = param
                out[name] = DTensor.from_local(
                    shadow,
                    dt.device_mesh,
                    dt.placements,
                    run_check=False,
                    shape=dt.shape,
                    stride=dt.stride(),
                )
            else:
                out[name] = shadow
        return out

    @staticmethod
    def local_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with each DTensor replaced by this rank's local part."""
        return {k: v.to_local() if is_dtensor(v) else v for k, v in state.items()}

    # -- schedule ---------------------------------------------------------------------------

    def beta(self, iteration: int) -> float:
        """Decay coefficient used by the update at ``iteration``."""
        cfg = self.config
        if cfg.type == "constant":
            return cfg.decay
        if cfg.type == "power":
            it = max(iteration, 1)
            return (1.0 - 1.0 / it) ** (cfg.gamma + 1.0)
        # halflife (EDM): halflife in images, optionally ramped up with the images seen so far.
        halflife_nimg = cfg.halflife_kimg * 1000.0
        if cfg.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, iteration * cfg.batch_size * cfg.rampup_ratio)
        return 0.5 ** (cfg.batch_size / max(halflife_nimg, 1e-8))

    def tracked_parameters(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` of every parameter of ``model`` this EMA shadows, named as in
        its state (wrapper prefixes such as ``_orig_mod.`` removed).

        Example::

            live = {name: p.detach().clone() for name, p in ema.tracked_parameters(student)}
        """
        for name, param in model.named_parameters():
            if self.trainable_only and not param.requires_grad:
                continue
            yield _clean(name), param

    # -- internals --------------------------------------------------------------------------

    def _live(self, param: torch.Tensor) -> torch.Tensor:
        if is_dtensor(param):
            detached = cast(DTensor, param.detach())  # still a DTensor; torch types it Tensor
            if self.config.mode == "full_tensor":
                return detached.full_tensor()
            return detached.to_local()
        return param.detach()

    def _matched(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        seen = set()
        for name, param in self.tracked_parameters(model):
            if name not in self._params:
                raise KeyError(
                    f"EMA has no shadow for parameter {name!r} of {type(model).__name__}"
                )
            seen.add(name)
            yield name, param, self._params[name]
        missing = set(self._params) - seen
        if missing:
            raise KeyError(f"Model lacks EMA-tracked parameters: {sorted(missing)[:5]}")

    @torch.no_grad()
    def _copy_from(self, model: nn.Module) -> None:
        for _, param, shadow in self._matched(model):
            shadow.copy_(self._live(param))
        self._copy_buffers(model)

    def _copy_buffers(self, model: nn.Module) -> None:
        for name, buf in model.named_buffers():
            shadow = self._buffers.get(_clean(name))
            if shadow is not None:
                shadow.copy_(buf.detach())

    # -- public API -------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: nn.Module, *, iteration: int) -> None:
        """Update the shadow state from ``model`` at ``iteration``.

        Skips iterations before ``start_iter``. At ``start_iter`` (and at the first update after
        it, unless a state was loaded) the shadow is (re-)initialised from the live weights;
        after that ``shadow = beta * shadow + (1 - beta) * live``.
        """
        if iteration < self.config.start_iter:
            return
        if iteration == self.config.start_iter or not self._initialized:
            self._copy_from(model)
            self._initialized = True
            return
        weight = 1.0 - self.beta(iteration)
        for _, param, shadow in self._matched(model):
            live = self._live(param)
            shadow.lerp_(live.to(device=shadow.device, dtype=shadow.dtype), weight)
        self._copy_buffers(model)

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> None:
        """Load the shadow weights into ``target`` (same structure, any dtype).

        ``target`` is normally unsharded. A DTensor target is accepted too: a full-tensor EMA is
        redistributed to the target's placements (collective: call on every rank), a
        local-shard EMA is copied into each rank's shard.
        """
        for name, param, shadow in self._matched(target):
            _assign(param, shadow, name)
        for name, buf in target.named_buffers():
            buf_shadow = self._buffers.get(_clean(name))
            if buf_shadow is not None:
                _assign(buf, buf_shadow, name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow state (parameters, then buffers) keyed by parameter name.

        Tensors are the live shadows, not copies (like ``nn.Module.state_dict``). In
        ``local_shard`` mode under FSDP2 this is the calling rank's shard: save it per rank.
        """
        return {**self._params, **self._buffers}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a state saved by :meth:`state_dict` (keys and shapes must match)."""
        state = {_clean(k): v for k, v in state.items()}
        expected = set(self._params) | set(self._buffers)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the tracked model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, value in state.items():
            shadow = self._params.get(name, self._buffers.get(name))
            assert shadow is not None  # every key was checked against expected above
            if shadow.shape != value.shape:
                raise ValueError(
                    f"EMA state for {name!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(shadow.shape)} (a local-shard state must be loaded on the rank "
                    "that saved it)"
                )
            shadow.copy_(value.to(device=shadow.device, dtype=shadow.dtype))
        self._initialized = True


def _assign(target: torch.Tensor, shadow: torch.Tensor, name: str) -> None:
    if is_dtensor(target):
        local = target.to_local()
        if shadow.shape == target.shape:
            full = shadow.to(device=local.device, dtype=target.dtype)
            local.copy_(distribute_tensor(full, target.device_mesh, target.placements).to_local())
            return
        if shadow.shape == local.shape:
            local.copy_(shadow.to(device=local.device, dtype=local.dtype))
            return
    elif shadow.shape == target.shape:
        target.copy_(shadow.to(device=target.device, dtype=target.dtype))
        return
    raise ValueError(
        f"EMA shadow for {name!r} has shape {tuple(shadow.shape)}, target has {tuple(target.shape)}"
    )


@contextlib.contextmanager
def ema_weights(ema: ExponentialMovingAverage, model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily load the EMA weights into ``model`` (e.g. to validate or export them), then
    put the live weights back.

    Example::

        with ema_weights(pipe.ema, student):
            save_student_lora(student, "output/")
    """
    with torch.no_grad():
        live = {name: p.detach().clone() for name, p in ema.tracked_parameters(model)}
    ema.copy_to(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, param in ema.tracked_parameters(model):
                param.copy_(live[name])
