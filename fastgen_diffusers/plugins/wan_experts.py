"""Wan 2.2 A14B: two experts (high noise, low noise) as one network.

``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2`` and ``boundary_ratio`` set
(diffusers 0.42, ``pipeline_wan.py``) run ``transformer`` (the high-noise expert) at every
scheduler timestep ``t >= boundary_ratio * num_train_timesteps`` (875 for T2V, 900 for I2V) and
``transformer_2`` (the low-noise expert) below it, with CFG scale ``guidance_scale`` for the first
and ``guidance_scale_2`` (default: ``guidance_scale``) for the second. The timestep compared is
the float32 ``sigma * 1000`` the pipeline passes to the model.

:class:`WanExperts` is that switch as one module in the pipeline's call convention: each sample
of a batch goes to the expert its ``t`` belongs to (a batch may hold both; each expert runs on its
own rows and the outputs are put back in order). The DMD2 teacher, fake score and student are
each one ``WanExperts``: the student's rungs at or above the boundary are served by its high
expert, the rest by its low expert, exactly as the stock pipeline will run the exported
``transformer`` / ``transformer_2``. The GAN branch keeps one discriminator head set per expert
(:class:`ExpertsDiscriminator`) fed by :class:`ExpertsFeatureCapture`.

Example::

    from fastgen_diffusers.plugins.wan import WanWrapper
    from fastgen_diffusers.plugins.wan_experts import WanExperts

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    teacher = WanExperts(WanWrapper(pipe.transformer), WanWrapper(pipe.transformer_2),
                         boundary_ratio=pipe.config.boundary_ratio)
    scales = teacher.guidance_scales(t, 4.0, 3.0)  # per-sample CFG for DMDPipeline
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..features import (
    FEATURE_CAPTURE_ATTR,
    FeatureCapture,
    detach_feature_capture,
    unwrap_module,
)
from ..sampling import validate_t_list
from .wan_schedule import NUM_TRAIN_TIMESTEPS, pipeline_t_list

__all__ = [
    "EXPERT_NAMES",
    "ExpertsDiscriminator",
    "ExpertsFeatureCapture",
    "WanExperts",
    "check_expert_sides",
    "expert_of_rungs",
    "find_experts",
]

# Attribute names of the experts, in the order of the pipeline's components (transformer,
# transformer_2).
EXPERT_NAMES = ("high", "low")


class WanExperts(nn.Module):
    """Two Wan networks (wrappers) called as one: ``high`` for ``t * 1000 >= boundary_ratio *
    1000``, ``low`` below.

    Args:
        high: the high-noise expert (the pipeline's ``transformer``), in the pipeline's call
            convention (e.g. a :class:`~fastgen_diffusers.plugins.wan.WanWrapper`).
        low: the low-noise expert (``transformer_2``), same convention.
        boundary_ratio: the pipeline's ``boundary_ratio`` (0.875 Wan 2.2 T2V-A14B, 0.9 I2V-A14B).
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary_ratio: float) -> None:
        super().__init__()
        if not 0.0 < float(boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        self.high = high
        self.low = low
        self.boundary_ratio = float(boundary_ratio)
        # Rows each expert served in the last forward ({"high": idx, "low": idx}, dummy rows
        # left out): the GAN branch's feature capture puts features back in batch order by it.
        self.last_rows: dict[str, torch.Tensor] = {}

    def experts(self) -> tuple[nn.Module, nn.Module]:
        """``(high, low)``: the networks for the pipeline's ``transformer`` and
        ``transformer_2``, in that order."""
        return (self.high, self.low)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts():
            expert.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for expert in self.experts():
            expert.disable_gradient_checkpointing()

    @property
    def config(self) -> Any:
        """The high expert's config (both experts share their architecture)."""
        return self.high.config

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def boundary_timestep(self) -> float:
        """``boundary_ratio * num_train_timesteps``, as the pipeline computes it."""
        return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def is_high_noise(self, t: torch.Tensor) -> torch.Tensor:
        """Per sample, whether RF time ``t`` (``[B]`` in [0, 1]) belongs to the high expert: the
        pipeline's test ``timestep >= boundary`` on the float32 ``t * 1000`` it passes."""
        return t.to(torch.float32) * float(NUM_TRAIN_TIMESTEPS) >= self.boundary_timestep

    def guidance_scales(
        self, t: torch.Tensor, guidance_scale: float, guidance_scale_2: float | None = None
    ) -> torch.Tensor:
        """Per-sample CFG scales ``[B]`` (float32): ``guidance_scale`` where ``t`` is the high
        expert's, ``guidance_scale_2`` (default: ``guidance_scale``, as the pipeline) elsewhere."""
        low = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        high_t = self.is_high_noise(t)
        return torch.where(
            high_t,
            torch.tensor(float(guidance_scale), device=t.device),
            torch.tensor(float(low), device=t.device),
        )

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, **kwargs: Any
    ) -> torch.Tensor:
        """Each sample through its expert; keyword tensors whose first dimension is the batch
        are split alongside (others, such as ``attention_kwargs``, go to both)."""
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(
                f"WanExperts routes per sample and needs timestep as [B] = [{batch}] (or a "
                f"scalar), got shape {tuple(t.shape)}"
            )
        high = self.is_high_noise(t)
        rows = {"high": high.nonzero().squeeze(1), "low": (~high).nonzero().squeeze(1)}
        self.last_rows = {name: index for name, index in rows.items() if len(index) > 0}
        sharded = _several_ranks()
        if not sharded:  # one expert for the whole batch: no split, no copy
            if len(rows["low"]) == 0:
                return self.high(hidden_states=hidden_states, timestep=timestep, **kwargs)
            if len(rows["high"]) == 0:
                return self.low(hidden_states=hidden_states, timestep=timestep, **kwargs)
        outs: dict[str, torch.Tensor] = {}
        unused: list[torch.Tensor] = []
        for name, index in rows.items():  # always high, then low: the same order on every rank
            expert = self.high if name == "high" else self.low
            if len(index) == 0:
                # Several ranks: every rank runs both experts, so that the sharded experts'
                # all-gathers (and gradient reductions) pair up across ranks whatever rows each
                # rank holds; this rank runs one row and keeps none of it.
                index = torch.zeros(1, dtype=torch.long, device=hidden_states.device)
                part = {k: _rows(v, index, batch) for k, v in kwargs.items()}
                out = expert(hidden_states=hidden_states[index], timestep=t[index], **part)
                unused.append(out[:0].sum())  # in the graph with a zero gradient
                continue
            part = {k: _rows(v, index, batch) for k, v in kwargs.items()}
            outs[name] = expert(hidden_states=hidden_states[index], timestep=t[index], **part)
        # Back in the batch's order: row i of the concatenation came from sample order[i].
        used = [name for name in ("high", "low") if name in outs]
        order = torch.cat([rows[name] for name in used])
        out = torch.cat([outs[name] for name in used])[torch.argsort(order)]
        for zero in unused:
            out = out + zero.to(out.dtype)
        return out


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[index]
    return value


def expert_of_rungs(t_list: Sequence[float], boundary_ratio: float) -> list[str]:
    """``"high"`` or ``"low"`` for each rung ``t_list[:-1]``: the expert that serves it (the
    pipeline's test on the float32 ``t * 1000``)."""
    rungs = torch.tensor(validate_t_list(t_list)[:-1], dtype=torch.float32)
    high = rungs * float(NUM_TRAIN_TIMESTEPS) >= boundary_ratio * NUM_TRAIN_TIMESTEPS
    return ["high" if h else "low" for h in high.tolist()]


def check_expert_sides(
    t_list: Sequence[float], scheduler_config: Mapping[str, Any], boundary_ratio: float
) -> None:
    """``ValueError`` unless a two-expert Wan pipeline with ``scheduler_config`` sends every
    rung to the expert the student trained it on (a rung within float32 rounding of the
    boundary could cross it)."""
    values = validate_t_list(t_list)
    trained = expert_of_rungs(values, boundary_ratio)
    visited = pipeline_t_list(scheduler_config, len(values) - 1)
    run = expert_of_rungs(visited, boundary_ratio)
    if trained != run:
        raise ValueError(
            f"t_list={values}: the stock pipeline's rungs {visited[:-1]} fall on other sides of "
            f"boundary_ratio={boundary_ratio} ({run}) than the student's ({trained}); move the "
            "rungs next to the boundary away from it"
        )


# -- GAN branch ---------------------------------------------------------------------------------
#
# Each expert has its own weights, so its block features live in its own space: one set of
# discriminator heads per expert, each fed the features of the rows its expert scored (the
# expert the sample's t belongs to, as in the DMD loss). Both head sets run on every row and
# each row keeps its expert's logits, so both are always in the graph (DDP / FSDP2 reduce every
# parameter on every rank) and a row's logits never mix the two feature spaces.


def find_experts(model: nn.Module) -> WanExperts | None:
    """The :class:`WanExperts` ``model`` is or wraps (role views, DDP, compile), else ``None``."""
    return next((m for m in unwrap_module(model) if isinstance(m, WanExperts)), None)


class ExpertsFeatureCapture(FeatureCapture):
    """The two experts' captures recorded as one: one tensor per block in batch order, each
    row's from the expert that ran it, then ``high_rows`` (``[B]`` bool: the rows the high
    expert scored). The routing travels in the list, as a tensor, because wrappers (FSDP2)
    rebuild the discriminator's inputs."""

    def __init__(self, experts: WanExperts, captures: Sequence[FeatureCapture]) -> None:
        high, low = captures
        if high.feature_indices != low.feature_indices:
            raise ValueError(
                f"both experts must capture the same blocks, got {high.feature_indices} and "
                f"{low.feature_indices}"
            )
        # No hooks of its own: the experts' captures hold them.
        self.feature_indices = high.feature_indices
        self.transform = high.transform
        self.meta = {}
        self._recording = False
        self._store = {}
        self._hooks = []
        self._pre_hooks = []
        self.experts = experts
        self.captures = (high, low)

    @contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        features: list[torch.Tensor] = []
        self.experts.last_rows = {}
        per_expert: list[list[torch.Tensor]] = []
        with ExitStack() as stack:
            for capture in self.captures:
                per_expert.append(stack.enter_context(capture.record(optional=True)))
            yield features
        rows = self.experts.last_rows
        if not rows:
            raise RuntimeError("Feature capture saw no expert run: record() must run the experts")
        used = [name for name in EXPERT_NAMES if name in rows]
        parts = dict(zip(EXPERT_NAMES, per_expert))
        order = torch.argsort(torch.cat([rows[name] for name in used]))
        for i in range(len(self.feature_indices)):
            block = [parts[name][i][: len(rows[name])] for name in used]
            features.append(torch.cat(block)[order.to(block[0].device)])
        # An expert run on a dummy row (several ranks) has features but no rows: kept in the
        # graph with a zero weight, so that the GAN loss's backward runs through both sharded
        # experts on every rank (their gathers pair up across ranks).
        for name in EXPERT_NAMES:
            if name not in rows and parts[name]:
                zero = sum(f[:0].sum() for f in parts[name])
                features[0] = features[0] + zero.to(features[0].dtype)
        batch = sum(len(rows[name]) for name in used)
        high_rows = torch.zeros(batch, dtype=torch.bool, device=order.device)
        if "high" in rows:
            high_rows[rows["high"]] = True
        features.append(high_rows)

    def remove(self) -> None:
        for expert in self.experts.experts():
            detach_feature_capture(expert)


def attach_experts_feature_capture(
    experts: WanExperts, attach: Callable[[nn.Module], FeatureCapture]
) -> ExpertsFeatureCapture:
    """``attach`` (the family's capture) on each expert, combined and stored on ``experts``."""
    capture = ExpertsFeatureCapture(experts, [attach(expert) for expert in experts.experts()])
    setattr(experts, FEATURE_CAPTURE_ATTR, capture)
    return capture


class ExpertsDiscriminator(nn.Module):
    """One discriminator per expert (``high``, ``low``) over an :class:`ExpertsFeatureCapture`'s
    list (block features, then ``high_rows``); each row gets its expert's logits."""

    def __init__(self, high: nn.Module, low: nn.Module) -> None:
        super().__init__()
        self.high = high
        self.low = low

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        *blocks, high_rows = features
        if high_rows.dtype != torch.bool or high_rows.ndim != 1:
            raise ValueError(
                "ExpertsDiscriminator needs the features of an ExpertsFeatureCapture (block "
                f"features, then the [B] bool rows of the high expert); the last item is a "
                f"{high_rows.dtype} tensor of shape {tuple(high_rows.shape)}"
            )
        high, low = self.high(blocks), self.low(blocks)
        return torch.where(high_rows.to(high.device).view(-1, *[1] * (high.ndim - 1)), high, low)
